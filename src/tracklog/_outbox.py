"""The training side of delivery: one logger's queue, and what stands for remote outputs.

:class:`Outbox` is all a logger holds of delivery: ``put_row`` encodes the dump and
commits it to the queue (see :mod:`tracklog._queue`) before ``dump()`` returns;
``flush`` and ``close`` append a marker and wait, within their deadline, until every
output's ack passed it. Everything else (building MLflow, W&B and TensorBoard,
encoding media, retrying) happens in the delivery process (:mod:`tracklog._service`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import uuid
import warnings
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from tracklog._codec import encode_row
from tracklog._lifecycle import critical
from tracklog._queue import FORMAT, MEDIA, Lock, Queue, find_queues, remove, replay_command
from tracklog._registry import backend, split_secrets
from tracklog._row import Row
from tracklog._service import forget_later, service
from tracklog._summary import summary_metrics, wandb_summaries
from tracklog.outputs._base import OutputFormat
from tracklog.settings import LoggerSettings, OutputSettings
from tracklog.values import Figure, Histogram, Image, Video

__all__ = [
    "DeliveryError",
    "Outbox",
    "RemoteOutput",
    "RunDirBusyError",
    "queue_root",
    "refuse_busy",
]

_log = logging.getLogger("tracklog")

_WAIT_STEP: Final = 0.005
#: Rows the queue could not take (a full disk) are kept in memory, in order, and
#: appended before the next row once it can; beyond this many bytes of them, the oldest
#: are dropped (and said).
_HELD_BYTES: Final = 256 << 20
#: A row with its exclusions and media jobs, as ``put_row`` takes them.
_Entry = tuple[Row, Mapping[str, tuple[str, ...]], Mapping[str, tuple[str, str]]]
#: How often dump() looks for reports and a dead delivery process (seconds).
_POLL_EVERY: Final = 0.05
#: How long flush()/close() wait to hear what the delivery process reported before them
#: (one round trip down the report pipe; the bound is for a process too busy to answer).
_HEAR_LAST: Final = 2.0
# Filesystems where SQLite's WAL mode (shared memory beside the database) is unsafe.
_NETWORK_FS: Final = frozenset(
    {
        "nfs",
        "nfs4",
        "lustre",
        "cifs",
        "smb3",
        "smbfs",
        "gpfs",
        "beegfs",
        "ceph",
        "fuse.ceph",
        "glusterfs",
        "fuse.glusterfs",
        "fuse.sshfs",
        "9p",
        "afs",
        "panfs",
        "wekafs",
    }
)


class DeliveryError(RuntimeError):
    """An output in the delivery process failed (raised at the next call when ``strict``)."""


class RunDirBusyError(RuntimeError):
    """Another live logger writes to the same run_dir."""


def _hear_within(deadline: float) -> float:
    """How long flush()/close() wait to hear the reports made before their marker was
    delivered: a round trip, bounded by ``_HEAR_LAST`` and (all but) the deadline."""
    return min(_HEAR_LAST, max(deadline - time.monotonic(), 0.1))


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding ``path`` (``ext4``, ``nfs4``, …), or ''."""
    import psutil

    real = os.path.realpath(path)
    best, kind = "", ""
    for partition in psutil.disk_partitions(all=True):
        mount = partition.mountpoint
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, partition.fstype
    return kind


def queue_root(settings: LoggerSettings) -> Path:
    """Where this logger's queue goes (see ``DeliverySettings.spool_dir``)."""
    if settings.delivery.spool_dir is not None:
        return settings.resolve(settings.delivery.spool_dir)
    run_dir = settings.run_dir.absolute()
    if filesystem_type(run_dir) not in _NETWORK_FS:
        return run_dir / "spool"
    local = os.environ.get("SLURM_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    digest = hashlib.sha256(str(run_dir).encode()).hexdigest()[:16]
    root = Path(local) / "tracklog-spool" / digest
    _log.info(
        "tracklog: run_dir %s is on a network filesystem; the delivery queue is on local "
        "disk at %s (set delivery.spool_dir to choose)",
        run_dir,
        root,
    )
    return root


def _being_removed(directory: Path) -> bool:
    """Whether the delivery process is still removing ``directory`` (then its folder,
    once that is empty)."""
    if directory.exists():
        return True
    try:
        return not any(directory.parent.iterdir())
    except OSError:  # gone already
        return False


class RemoteOutput(OutputFormat):
    """Stands in ``Logger.output_formats`` for an output the delivery process runs.

    ``name`` is its ``exclude=`` name; ``settings`` its validated settings. What the
    backend publishes once it started (``run_id`` for MLflow and W&B, ``run_dir`` for
    W&B) is read from the queue, waiting up to ``timeout`` seconds for it.
    """

    def __init__(self, settings: OutputSettings, index: int, outbox: Outbox) -> None:
        self.settings = settings
        self.index = index
        self.consumer = f"{index}-{settings.type}"
        entry = backend(settings)
        self.name = entry.exclude
        self._outbox = outbox
        self._check = entry.check(settings) if entry.check is not None else None

    def check_row(self, row: Row) -> None:
        if self._check is not None:
            self._check(row)

    def published(self, key: str, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            value = self._outbox.published(self.consumer).get(key)
            if value is not None:
                return value
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"outputs.{self.index} ({self.settings.type}): the backend has not "
                    f"published {key!r} yet (is it reachable?)"
                )
            time.sleep(0.05)

    @property
    def run_id(self) -> str:
        """The backend's run id, once the delivery process has started the run."""
        return self.published("run_id")

    @property
    def run_dir(self) -> Path:
        """The backend's own run folder (W&B's ``offline-run-*``)."""
        return Path(self.published("run_dir"))

    def write_row(self, row: Row) -> None:
        raise TypeError(f"{self!r} is delivered through its logger's queue")

    def __repr__(self) -> str:
        return f"RemoteOutput(outputs.{self.index}: {self.settings.type})"


class Outbox:
    """One logger's queue, from the training side; see the module docstring."""

    def __init__(
        self,
        settings: LoggerSettings,
        remote: list[tuple[int, OutputSettings]],
        *,
        media: bool,
        files: bool,
        strict: bool,
        identities: Mapping[str, dict[str, str]] | None = None,
        resumed: bool = False,
    ) -> None:
        self.strict = strict
        self.error: DeliveryError | None = None
        root = queue_root(settings)
        run_dir = settings.run_dir.absolute()  # a live logger there: build_logger refused it
        outputs: list[dict[str, Any]] = []
        secrets: dict[str, dict[str, Any]] = {}
        identity: dict[str, dict[str, str]] = {}
        self._labels = {MEDIA: "media files"}  # consumer -> how messages name it
        for index, output in remote:
            consumer = f"{index}-{output.type}"
            self._labels[consumer] = f"outputs.{index} ({output.type})"
            public, private = split_secrets(output)
            outputs.append({"consumer": consumer, "index": index, "settings": public})
            secrets[consumer] = private
            chosen = identities.get(consumer) if identities is not None else None
            identity[consumer] = chosen if chosen is not None else backend(output).identity(output)
        self.consumers: list[str] = [str(entry["consumer"]) for entry in outputs]
        self.consumers += [MEDIA] if media else []
        header = {
            "format": FORMAT,
            "run_dir": str(run_dir),
            "delivery": settings.delivery.model_dump(mode="json"),
            "settings_json": settings.model_dump_json(),
            "media": media,
            "files": files,
            "outputs": outputs,
            "identity": identity,
            "resumed": resumed,
            "summaries": wandb_summaries(settings.summaries),
            "summary_metrics": summary_metrics(settings.summaries),
            "system_metrics": settings.system_metrics,
            "system_jsonl": _system_jsonl(settings),
            "trainer": {"pid": os.getpid(), "host": socket.gethostname()},
            # This logger's session of the run: when it started, then a random part.
            # A later session that resumes a run takes it over (MLflow's tracklog.session
            # tag): only the latest one ends the run and writes its train.log.
            "session": f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}",
        }
        root.mkdir(parents=True, exist_ok=True)
        self.directory = _free(root)
        self.queue = Queue.create(self.directory, header, fsync=settings.delivery.fsync)
        self._lock: Lock = self.queue.trainer_lock()
        if not self._lock.acquire():
            raise RunDirBusyError(f"{self.directory} is locked by another process")
        self.queue.set_meta("owner", json.dumps(header["trainer"]))
        self._secrets = secrets
        self._held: deque[_Entry] = deque()
        self._held_bytes = 0
        self._started = False
        self._next_poll = 0.0
        self._closed = False
        self._raised = False
        if remote:
            self._start()

    # Training thread ---------------------------------------------------------------------
    def put_row(
        self,
        row: Row,
        excluded: Mapping[str, tuple[str, ...]],
        media: Mapping[str, tuple[str, str]],
    ) -> None:
        if media and not self._started:
            self._start()
        try:
            self._put_held()
            self._append_row(row, excluded, media)
        except OSError:
            # A full disk: the row waits in memory, behind any earlier one, for the next
            # dump (or flush or close) to append it; this dump still reports the error.
            self._hold(row, excluded, media)
            raise
        now = time.monotonic()
        if now >= self._next_poll:  # a pipe read and a waitpid: not at every dump
            self._next_poll = now + _POLL_EVERY
            self.poll()

    def _append_row(
        self,
        row: Row,
        excluded: Mapping[str, tuple[str, ...]],
        media: Mapping[str, tuple[str, str]],
    ) -> None:
        body, blobs = encode_row(row, excluded, media, self.queue.blobs)
        if blobs and self.queue.fsync:
            _fsync_files(self.queue.blobs, blobs)
        self.queue.append("row", body, " ".join(blobs))

    def _put_held(self) -> None:
        """Append the rows held back, oldest first; raise if the queue still cannot."""
        while self._held:
            held = self._held[0]
            self._append_row(*held)
            self._held.popleft()
            self._held_bytes -= _row_bytes(held[0])
            if not self._held:
                _log.warning("tracklog: the rows held back are queued now (%s)", self.directory)

    def _hold(
        self,
        row: Row,
        excluded: Mapping[str, tuple[str, ...]],
        media: Mapping[str, tuple[str, str]],
    ) -> None:
        if not self._held:
            _log.error(
                "tracklog: the queue in %s cannot take rows (is its disk full?): they are "
                "kept in memory, up to %d MiB, and queued once it can",
                self.directory,
                _HELD_BYTES >> 20,
            )
        self._held.append((row, excluded, media))
        self._held_bytes += _row_bytes(row)
        dropped = 0
        while self._held_bytes > _HELD_BYTES and len(self._held) > 1:
            self._held_bytes -= _row_bytes(self._held.popleft()[0])
            dropped += 1
        if dropped:
            _log.error(
                "tracklog: %d row(s) dropped for MLflow, W&B and TensorBoard: the queue in "
                "%s has not taken rows for %d MiB of them",
                dropped,
                self.directory,
                _HELD_BYTES >> 20,
            )

    def _flush_held(self) -> bool:
        """Before a flush or close: append what is held; False (said) if it cannot."""
        if not self._held:
            return True
        try:
            self._put_held()
        except OSError as error:
            _log.error(
                "tracklog: %d row(s) held back could not be queued in %s (%s)",
                len(self._held),
                self.directory,
                error,
            )
            return False
        return True

    def put_line(self, line: str) -> None:
        self.queue.append("line", line)

    def put_failed(self, reason: str) -> None:
        self.queue.append("failed", reason)

    def poll(self) -> None:
        """Show what the delivery process reported; restart it if it died."""
        if self._started:
            service().poll()

    def flush(self, deadline: float) -> bool:
        """Wait until everything queued so far is delivered; False at ``deadline``."""
        if not self._started:
            return True
        if not self._flush_held():
            return False
        with critical():  # SIGTERM's "failed" is appended after it, never inside it
            flushed = self.queue.append("flush")
        done = self._wait(flushed, deadline)
        if done:  # and what delivering it reported (a conversion's warning, say)
            service().hear(self.directory, _hear_within(deadline))
        return done

    def close(self, deadline: float) -> bool:
        """Queue the end of the runs and wait for it until ``deadline``; True if done."""
        if self._closed:
            return True
        self._closed = True
        if not self._started:
            self._release()
            remove(self.directory)
            return True
        if not self._flush_held():
            _log.error(
                "tracklog: %d row(s) are lost for MLflow, W&B and TensorBoard: the queue "
                "could not take them before close()",
                len(self._held),
            )
            self._held.clear()
        self.queue.set_meta("closed", str(time.time()))  # the delivery deadline starts
        done = self._wait(self.queue.append("close"), deadline)
        # An output that gave up (it could not start) keeps its rows for replay: the
        # delivery process then leaves the queue in place, so there is no removal to await.
        gave_up = [name for name in self.consumers if self.queue.state(name).get("gave_up")]
        kept = bool(gave_up)
        if kept and done:
            # Said here, not left to the delivery process's own report, which may come
            # after close() returned and the program ended.
            labels = ", ".join(self._labels[name] for name in gave_up)
            _log.warning(
                "tracklog: %d message(s) could not be delivered (the delivery process gave "
                "up on %s); they stay in %s for:\n    %s",
                self.queue.pending(gave_up),
                labels,
                self.directory,
                replay_command(self.directory),
            )
        if not done:
            left = self.queue.pending(self.consumers)
            _log.warning(
                "tracklog: %d message(s) are not delivered yet; the delivery process goes on "
                "with them after this process ends (within delivery.deadline), and whatever "
                "it cannot deliver stays in %s for:\n    %s",
                left,
                self.directory,
                replay_command(self.directory),
            )
        # What its outputs' close() said. Not delivered yet: a delivery process that dies
        # while this trainer lives is replaced by one that goes on with it too.
        self._release(hear=_hear_within(deadline), resume=not done)
        # Once delivered, the delivery process removes the queue: wait for that too, so
        # the run_dir is left alone by the time close() returns.
        while done and not kept and _being_removed(self.directory) and time.monotonic() < deadline:
            time.sleep(_WAIT_STEP)
        return done

    def drop(self) -> None:
        """Close without waiting (the logger was dropped without ``close()``).

        The logger's finalizer: it runs wherever the garbage collector does, maybe in
        the middle of a call on the delivery process's handle (its lock held, a line
        half-written), so it touches only this queue's own files and leaves telling
        the delivery process to the handle's next call.
        """
        if self._closed:
            return
        self._closed = True
        if self._started:
            self.queue.set_meta("closed", str(time.time()))
            self.queue.append("close")
            forget_later(self.directory)
        self._close_files()
        if not self._started:
            remove(self.directory)

    def abandon(self) -> None:
        """In a forked child: forget the parent's queue without touching it."""
        self._closed = True
        self._lock.abandon()
        self.queue.abandon()

    def published(self, consumer: str) -> dict[str, str]:
        return self.queue.state(consumer)

    # Inside ------------------------------------------------------------------------------
    def _start(self) -> None:
        self._started = True
        service().open(self.directory, self._secrets, self._on_report)

    def _release(self, hear: float = 0.0, *, resume: bool = False) -> None:
        self.poll()
        if self._started:
            service().forget(self.directory, wait=hear, resume=resume)
        self._close_files()

    def _close_files(self) -> None:
        self._lock.release()
        self.queue.close()

    def _wait(self, seq: int, deadline: float) -> bool:
        while True:
            self.poll()
            acks = self.queue.acks()
            waiting = [name for name in self.consumers if acks.get(name, 0) < seq]
            if all(self.queue.state(name).get("gave_up") for name in waiting):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(_WAIT_STEP)

    def _on_report(self, level: int, message: str, warning: bool) -> None:
        if warning:
            warnings.warn(message, UserWarning, stacklevel=2)
            return
        _log.log(level, "%s", message)
        if self.strict and level >= logging.ERROR and not self._raised:
            # The first failure is raised; what follows from it (rows left for replay)
            # is only logged.
            self._raised = True
            self.error = DeliveryError(message.splitlines()[0])


def _fsync_files(folder: Path, names: list[str]) -> None:
    for name in names:
        fd = os.open(folder / name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _system_jsonl(settings: LoggerSettings) -> str | None:
    """``<run_dir>/system.jsonl`` when the logger has a JSONL output (the delivery
    process writes its system samples there, beside the trainer's file)."""
    if any(output.type == "jsonl" for output in settings.outputs):
        return str(settings.run_dir.absolute() / "system.jsonl")
    return None


def _free(root: Path) -> Path:
    n = 0
    while (root / f"queue-{n}").exists() or (root / f"queue-{n}").is_symlink():
        n += 1
    return root / f"queue-{n}"


def refuse_busy(root: Path, run_dir: Path, *, resuming: bool = False) -> None:
    """Refuse a run_dir another live logger writes to (its files would interleave;
    ``resuming``: whatever it writes, its runs are the ones to continue)."""
    for directory in find_queues(root):
        try:
            queue = Queue(directory)
        except Exception:
            continue
        try:
            header = queue.header()
            if Path(header["run_dir"]) != run_dir or not (resuming or header.get("files")):
                continue
            if not queue.trainer_lock().held_elsewhere():
                continue
            owner = json.loads(queue.meta("owner") or "{}")
        except Exception:
            continue
        finally:
            queue.close()
        pid = owner.get("pid", "?")
        mine = " (this process: close that logger first)" if pid == os.getpid() else ""
        raise RunDirBusyError(
            f"run_dir {run_dir} is in use by another tracklog logger in process {pid}"
            f"{mine}; give each run its own run_dir"
        )


def _row_bytes(row: Row) -> int:
    """About what ``row`` holds in memory: its arrays, and a little per value."""
    total = 0
    for value in row.values.values():
        total += 100
        match value:
            case Histogram():
                total += value.values.nbytes
            case Image():
                total += value.image.nbytes
            case Video():
                total += value.frames.nbytes
            case Figure():
                total += len(value.png)
            case _:
                pass
    return total
