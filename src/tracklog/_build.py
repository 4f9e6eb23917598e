"""``build_logger``: settings in, a ready :class:`tracklog.Logger` out."""

from __future__ import annotations

import datetime
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from stable_baselines3.common.logger import KVWriter

from tracklog._checkpoints import CheckpointStore, kept_summaries
from tracklog._logger import Logger
from tracklog._media import MediaStore
from tracklog._outbox import Outbox, RemoteOutput, queue_root, refuse_busy
from tracklog._ranks import detect
from tracklog._registry import LocalContext, backend, require
from tracklog._runs import Claim, claim, claiming, read_run, unclaim
from tracklog.settings import LoggerSettings, OutputSettings, load_settings

__all__ = ["build_logger", "configure"]


def build_logger(
    settings: LoggerSettings | Mapping[str, object] | str | os.PathLike[str],
) -> Logger:
    """Validate ``settings`` completely, then create ``run_dir`` and every output.

    ``settings`` is a :class:`LoggerSettings`, a mapping, or a path to a YAML, TOML or
    JSON file. Invalid settings raise :class:`pydantic.ValidationError` (naming the
    field path) before any file or directory exists. If an output fails to open, the
    ones already opened are closed again before the error propagates.

    A run_dir that holds an earlier run is never appended to: unless ``resume`` is
    ``auto`` or ``must`` (then the earlier run continues in every backend, with the
    identity kept in ``<run_dir>/tracklog.json``), this run goes to ``<run_dir>_2``
    (``_3``, …) and says so on the console; :meth:`Logger.get_dir` is where it went
    (see docs/resume.md).

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
    resolved = resolved.model_copy(update={"outputs": [_anchor(o) for o in resolved.outputs]})
    for output in resolved.outputs:
        require(output)
    remote: list[tuple[int, OutputSettings]] = []
    local: list[tuple[int, OutputSettings]] = []
    for index, output in enumerate(resolved.outputs):
        (remote if backend(output).remote else local).append((index, output))
    writes_files = any(backend(output).files for output in resolved.outputs)
    run: Claim | None = None
    outbox = None
    files = False
    if not (remote or writes_files):
        resolved.run_dir.mkdir(parents=True, exist_ok=True)
    else:
        with claiming(resolved):  # until this logger's queue lock is taken
            resuming = resolved.resume != "never"
            if writes_files or resuming:  # a live logger there: refused, not versioned
                refuse_busy(queue_root(resolved), resolved.run_dir.absolute(), resuming=resuming)
            run = claim(resolved, remote)
            resolved = run.settings
            remote = [(index, resolved.outputs[index]) for index, _ in remote]
            local = [(index, resolved.outputs[index]) for index, _ in local]
            files = any(backend(output).files for _, output in local)
            if remote or files:
                try:
                    outbox = Outbox(
                        resolved,
                        remote,
                        media=any(backend(output).media for _, output in local),
                        files=files,
                        strict=resolved.strict,
                        identities=run.identities,
                        resumed=run.resumed,
                    )
                except BaseException:
                    unclaim(run)
                    raise
    store = MediaStore(resolved.run_dir, defer=outbox is not None)
    run_dir = resolved.run_dir
    checkpoints = CheckpointStore(run_dir, lambda: _run_identity(run_dir))
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
        if run is not None:
            unclaim(run)  # the run never started: the run_dir is free for the next try
        raise
    if outbox is not None:
        for index, output in remote:
            outputs[index] = RemoteOutput(output, index, outbox)
    logger = Logger(
        folder=str(resolved.run_dir),
        output_formats=[outputs[index] for index in sorted(outputs)],
        level=resolved.level_number,
        strict=resolved.strict,
        settings=resolved,
        outbox=outbox,
        media=store,
        checkpoints=checkpoints,
        summaries=kept_summaries(run_dir) if run is not None and run.resumed else None,
    )
    if run is not None and run.note:
        logger.log(run.note)
    return logger


def _run_identity(run_dir: Path) -> dict[str, Any] | None:
    """The run file's content, for the checkpoints of this run (None without one)."""
    try:
        return read_run(run_dir)
    except ValueError:
        return None


def _anchor(output: OutputSettings) -> OutputSettings:
    anchor = backend(output).anchor
    return anchor(output) if anchor is not None else output


#: SB3's format strings (and tracklog's own) as tracklog outputs, with SB3's file names.
_FORMATS: Final[dict[str, dict[str, object]]] = {
    "stdout": {"type": "console"},
    "log": {"type": "file", "path": "log.txt"},
    "csv": {"type": "csv", "path": "progress.csv"},
    "json": {"type": "jsonl", "path": "progress.json"},
    "jsonl": {"type": "jsonl", "path": "progress.jsonl"},
    "tensorboard": {"type": "tensorboard"},  # in the folder itself, as SB3 (see configure)
    "mlflow": {"type": "mlflow"},
    "wandb": {"type": "wandb"},
}


def configure(folder: str | None = None, format_strings: Sequence[str] | None = None) -> Logger:
    """SB3's ``configure(folder, format_strings)``, returning a tracklog :class:`Logger`.

    The one-line migration: ``from tracklog import configure`` in place of
    ``from stable_baselines3.common.logger import configure``. Same signature, same
    defaults and the same file names in ``folder`` (``log.txt``, ``progress.csv``,
    ``progress.json``, TensorBoard event files in ``folder`` itself); ``folder``
    defaults to ``$SB3_LOGDIR``, else a new ``SB3-<time>`` folder in the temporary
    directory, and ``format_strings`` to ``$SB3_LOG_FORMAT``, else
    ``stdout,log,csv``. Beside SB3's ``stdout``, ``log``, ``csv``, ``json`` and
    ``tensorboard``, it takes ``jsonl`` (``progress.jsonl``), ``mlflow`` and ``wandb``
    with their default settings (see docs/settings.md); for anything more, use
    :func:`build_logger` with a settings file.
    """
    if folder is None:
        folder = os.getenv("SB3_LOGDIR")
    if folder is None:
        stamp = datetime.datetime.now().strftime("SB3-%Y-%m-%d-%H-%M-%S-%f")
        folder = os.path.join(tempfile.gettempdir(), stamp)
    if format_strings is None:
        format_strings = os.getenv("SB3_LOG_FORMAT", "stdout,log,csv").split(",")
    names = [name for name in format_strings if name]
    unknown = [name for name in names if name not in _FORMATS]
    if unknown:
        raise ValueError(
            f"Unknown format specified: {unknown[0]!r}; configure() takes "
            f"{', '.join(_FORMATS)} (build_logger takes settings for anything else)"
        )
    outputs = [dict(_FORMATS[name]) for name in names]
    for output in outputs:
        if output["type"] == "tensorboard":
            # SB3 writes the event files into the folder itself; a settings file names
            # a folder of their own (a relative "." is refused there as a likely slip).
            output["path"] = os.path.abspath(folder)
    logger = build_logger({"run_dir": folder, "outputs": outputs})
    if names and names != ["stdout"]:  # as SB3: only when files are written
        logger.log(f"Logging to {logger.get_dir()}")
    return logger
