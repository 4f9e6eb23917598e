"""``build_logger``: settings in, a ready :class:`tracklog.Logger` out."""

from __future__ import annotations

import os
from collections.abc import Mapping

from stable_baselines3.common.logger import KVWriter

from tracklog._logger import Logger
from tracklog._media import MediaStore
from tracklog._outbox import Outbox, RemoteOutput
from tracklog._ranks import detect
from tracklog._registry import LocalContext, backend, require
from tracklog.settings import LoggerSettings, OutputSettings, load_settings

__all__ = ["build_logger"]


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
    for output in resolved.outputs:
        require(output)
    resolved.run_dir.mkdir(parents=True, exist_ok=True)
    remote: list[tuple[int, OutputSettings]] = []
    local: list[tuple[int, OutputSettings]] = []
    for index, output in enumerate(resolved.outputs):
        (remote if backend(output).remote else local).append((index, output))
    files = any(backend(output).files for _, output in local)
    outbox = None
    if remote or files:
        media = any(backend(output).media for _, output in local)
        outbox = Outbox(resolved, remote, media=media, files=files, strict=resolved.strict)
    store = MediaStore(resolved.run_dir, defer=outbox is not None)
    context = LocalContext(run_dir=resolved.run_dir, media=store)
    outputs: dict[int, KVWriter] = {}
    try:
        for index, output in local:
            build = backend(output).build_local
            assert build is not None
            outputs[index] = build(output, context)
    except BaseException:
        for opened in outputs.values():
            opened.close()
        if outbox is not None:
            outbox.close(0.0)
        raise
    if outbox is not None:
        for index, output in remote:
            outputs[index] = RemoteOutput(output, index, outbox)
    return Logger(
        folder=str(resolved.run_dir),
        output_formats=[outputs[index] for index in sorted(outputs)],
        level=resolved.level_number,
        strict=resolved.strict,
        settings=resolved,
        outbox=outbox,
        media=store,
    )
