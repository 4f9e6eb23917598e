"""``tracklog replay SPOOL``: deliver what a logger left in its spool, exactly once.

A spool is left behind when a backend was still unreachable at ``close_timeout``, or
when the process died (SIGKILL, OOM, node failure) before delivering it. Replay
rebuilds the output from the spool's header (settings without secrets, run identity),
resumes the same run, delivers the records not acked yet, in order, and ends the run:
with the status the logger recorded, or KILLED if the process died without closing.
The spool directory is then removed, so a second replay finds nothing to do; a replay
cut off half-way continues where it stopped (acked records are not sent again).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tracklog._delivery import Message, dispatch, groups
from tracklog._spool import Spool, is_spool, read_header
from tracklog.outputs._base import OutputFormat

__all__ = ["ReplayResult", "find_spools", "replay"]

_log = logging.getLogger("tracklog")


@dataclass(frozen=True)
class ReplayResult:
    directory: Path
    delivered: int
    remaining: int

    @property
    def complete(self) -> bool:
        return self.remaining == 0


def find_spools(path: Path) -> list[Path]:
    """The spool directories at ``path``: a spool, a folder of spools, or a run_dir."""
    if is_spool(path):
        return [path]
    for folder in (path, path / "spool"):
        if folder.is_dir():
            found = sorted(child for child in folder.iterdir() if is_spool(child))
            if found:
                return found
    return []


def rebuild(header: dict[str, Any], directory: Path, tracking_uri: str | None) -> OutputFormat:
    """The output a spool belongs to, reconnected to the same run."""
    kind = header.get("output")
    if kind == "mlflow":
        from tracklog.outputs.mlflow import MLFlowOutputFormat
        from tracklog.settings import MlflowOutput

        fields = dict(header["settings"])
        fields["run_id"] = header.get("run_id")
        if tracking_uri is not None:
            fields["tracking_uri"] = tracking_uri
        return MLFlowOutputFormat(
            MlflowOutput.model_validate(fields),
            settings_json=header.get("settings_json"),
            spool_dir=directory,
            run_key=header.get("run_key"),
            replaying=True,
        )
    if kind == "wandb":
        from tracklog.outputs.wandb import WandBOutputFormat
        from tracklog.settings import WandbOutput

        fields = dict(header["settings"])
        fields.update(id=header["id"], resume="allow")
        return WandBOutputFormat(
            WandbOutput.model_validate(fields), run_dir=Path(header["run_dir"]), spool_dir=None
        )
    raise ValueError(f"{directory}: a spool of output {kind!r} cannot be replayed")


def _pending(spool: Spool) -> Iterator[Message]:
    while spool.pending > 0:
        yield Message.decode(spool.read_next())


def replay(
    directory: Path, *, timeout: float = 600.0, tracking_uri: str | None = None
) -> ReplayResult:
    """Deliver ``directory``'s undelivered records; retry a down backend until ``timeout``."""
    header = read_header(directory)
    spool = Spool(directory, header)
    spool.claim()  # raises SpoolBusyError while the logger that owns it is alive
    deadline = time.monotonic() + timeout
    try:
        output = rebuild(header, directory, tracking_uri)
    except BaseException:
        spool.close(remove=False)
        raise
    messages = list(_pending(spool))
    start = spool.acked
    delivered = 0
    closed = any(message.kind == "close" for message in messages)
    if not closed:  # the process died: end the run once everything is in
        if not any(message.kind == "failed" for message in messages):
            messages.append(Message("failed", text="died"))  # MLflow KILLED
        messages.append(Message("close"))
    batch_rows = type(output).write_rows is not OutputFormat.write_rows
    delay = 0.5
    for group in groups(messages, batch_rows=batch_rows):
        while True:
            try:
                dispatch(output, group)
                break
            except Exception as error:
                if not output.is_transient(error) or time.monotonic() + delay > deadline:
                    spool.ack(min(start + delivered, spool.written))
                    spool.close(remove=False)
                    _log.error(
                        "tracklog replay %s: stopped after %d record(s): %s: %s",
                        directory,
                        delivered,
                        type(error).__name__,
                        error,
                    )
                    return ReplayResult(directory, delivered, len(messages) - delivered)
                _log.warning("tracklog replay %s: %s; retrying in %gs", directory, error, delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
        delivered += len(group)
        spool.ack(min(start + delivered, spool.written))
    spool.close(remove=True)
    return ReplayResult(directory, delivered, 0)
