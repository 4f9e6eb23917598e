"""``build_logger``: settings in, a ready :class:`tracklog.Logger` out."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import assert_never

from stable_baselines3.common.logger import KVWriter

from tracklog._logger import Logger
from tracklog._media import MediaStore
from tracklog._ranks import detect
from tracklog._spool import free_directory
from tracklog.outputs import (
    CsvOutputFormat,
    FixedHumanOutputFormat,
    JsonlOutputFormat,
    MLFlowOutputFormat,
    TensorBoardOutputFormat,
    WandBOutputFormat,
)
from tracklog.settings import (
    ConsoleOutput,
    CsvOutput,
    FileOutput,
    JsonlOutput,
    LoggerSettings,
    MlflowOutput,
    OutputSettings,
    TensorboardOutput,
    WandbOutput,
    load_settings,
)

__all__ = ["build_logger"]


def _make_output(
    output: OutputSettings, settings: LoggerSettings, media: MediaStore, index: int
) -> KVWriter:
    spool_root = settings.resolve(settings.delivery.spool_dir)
    match output:
        case ConsoleOutput():
            return FixedHumanOutputFormat(None, max_length=output.max_length)
        case FileOutput():
            return FixedHumanOutputFormat(
                settings.resolve(output.path), max_length=output.max_length
            )
        case JsonlOutput():
            return JsonlOutputFormat(settings.resolve(output.path), media=media)
        case CsvOutput():
            return CsvOutputFormat(settings.resolve(output.path), media=media)
        case TensorboardOutput():
            return TensorBoardOutputFormat(settings.resolve(output.path))
        case MlflowOutput():
            return MLFlowOutputFormat(
                output,
                settings_json=settings.model_dump_json(),
                spool_dir=free_directory(spool_root / f"{index}-mlflow"),
            )
        case WandbOutput():
            return WandBOutputFormat(
                output,
                run_dir=settings.run_dir,
                spool_dir=free_directory(spool_root / f"{index}-wandb"),
            )
        case _:
            assert_never(output)


def build_logger(
    settings: LoggerSettings | Mapping[str, object] | str | os.PathLike[str],
) -> Logger:
    """Validate ``settings`` completely, then create ``run_dir`` and every output.

    ``settings`` is a :class:`LoggerSettings`, a mapping, or a path to a YAML, TOML or
    JSON file. Invalid settings raise :class:`pydantic.ValidationError` (naming the
    field path) before any file or directory exists. If an output fails to open, the
    ones already opened are closed again before the error propagates.

    In a sweep and a process group (see docs/deployment.md), MLflow and W&B runs are
    named and tagged by ``group``, the job number and the rank. A rank other than 0
    gets a logger that validates every ``record()`` and ``dump()`` as usual but writes
    nothing, unless ``all_ranks`` is true: then each rank writes its own runs and files
    under ``<run_dir>/rank<N>``.
    """
    resolved = load_settings(settings)
    placement = detect(resolved)
    if not placement.writes(resolved):
        return Logger(
            folder=None, level=resolved.level_number, strict=resolved.strict, settings=resolved
        )
    resolved = placement.apply(resolved)
    resolved.run_dir.mkdir(parents=True, exist_ok=True)
    media = MediaStore(resolved.run_dir)
    outputs: list[KVWriter] = []
    try:
        for index, output in enumerate(resolved.outputs):
            outputs.append(_make_output(output, resolved, media, index))
    except BaseException:
        for opened in outputs:
            opened.close()
        raise
    return Logger(
        folder=str(resolved.run_dir),
        output_formats=outputs,
        level=resolved.level_number,
        strict=resolved.strict,
        settings=resolved,
    )
