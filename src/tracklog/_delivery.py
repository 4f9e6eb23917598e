"""Delivering one queue: the code the delivery process runs, and ``tracklog replay`` too.

Each output the queue names (MLflow, W&B, TensorBoard, and ``media``: the JSONL/CSV
media files to encode) gets a worker thread with its own cursor in the queue. A worker
builds its output, then reads messages after its cursor in order, hands consecutive
rows over together (``write_rows``), and records its cursor (the ack) after each
batch. So an output that is slow or down holds back only itself.

- A transient error (the output's ``is_transient``: server down, 5xx, 429, a locked
  database) is retried with backoff from ``retry_initial`` doubling to ``retry_max``:
  for as long as the trainer lives (the rows wait on disk, not in memory), then until
  ``delivery.deadline`` seconds after it ended. What is left stays in the queue for
  ``tracklog replay``.
- Any other error of a batch splits it: the rows are sent one by one, and only the row
  that fails again is skipped, reported with its step and keys. An output that wrote
  rows one after another says how many it wrote before the one that failed
  (``PartlyWritten``): those are never sent again, and only the failing row is skipped
  (or, for a transient error, retried with the rest).
- A record that does not parse is reported with its position and skipped.
- Writing the queue's own progress (an ack) on a full disk is retried the same way:
  the output waits, and goes on where it was once the disk has room.
- If the trainer died without ``close()``, the run is ended KILLED (FAILED when the
  queue holds the exception training died of) once everything is delivered.

The queue is removed once every output has everything and the trainer is gone.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import sqlite3
import stat
import threading
import time
import traceback
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Final, Protocol

from tracklog import _encode
from tracklog._codec import CodecError, Decoded, decode_row, open_nofollow
from tracklog._queue import (
    KINDS,
    MEDIA,
    Message,
    Queue,
    remove,
    replay_command,
    storage_transient,
)
from tracklog._registry import RemoteContext, backend, parse_output
from tracklog._row import Row
from tracklog._system import SystemSampler
from tracklog.outputs._base import OutputFormat, PartlyWritten
from tracklog.outputs.jsonl import JsonlOutputFormat
from tracklog.settings import DeliverySettings, OutputSettings
from tracklog.values import Image, Video

__all__ = ["Delivery", "Reporter", "Target", "current", "targets"]

_log = logging.getLogger("tracklog")

_BATCH: Final = 64  # rows handed over in one write_rows call
#: The reporter of the queue the current thread delivers (the delivery process routes
#: the warnings and log records of a backend's own code there).
current = threading.local()
_POLL: Final = 0.02  # seconds between looks at the inbox for new messages
#: A worker with nothing to do waits to be told of new messages (one thread looks at the
#: inbox for all of them, so an idle delivery process wakes once per _POLL, not once
#: per output); it looks at the queue itself at least this often anyway.
_IDLE: Final = 1.0
_FORGET_EVERY: Final = 2.0  # seconds between deletions of what every output has


class Reporter(Protocol):
    """Where the delivery side's warnings and errors go (the trainer, or the log)."""

    def __call__(self, level: int, message: str, *, warning: bool = False) -> None: ...


def log_reporter(level: int, message: str, *, warning: bool = False) -> None:
    _log.log(level, "%s", message)


@dataclass(frozen=True, slots=True)
class Target:
    """One output of the queue: its consumer name, settings path and settings."""

    consumer: str
    index: int
    settings: OutputSettings

    @property
    def label(self) -> str:
        return f"outputs.{self.index} ({self.settings.type})"


def targets(header: dict[str, Any], secrets: dict[str, dict[str, Any]] | None) -> list[Target]:
    """The outputs ``header`` lists, with their secrets filled in when given."""
    found: list[Target] = []
    for entry in header["outputs"]:
        data = dict(entry["settings"])
        data.update((secrets or {}).get(entry["consumer"], {}))
        found.append(Target(entry["consumer"], int(entry["index"]), parse_output(data)))
    return found


class _Rows:
    """Decoded rows shared by the workers, so a video is loaded and encoded once."""

    def __init__(self, queue: Queue) -> None:
        self._queue = queue
        self._lock = threading.Lock()
        self._rows: OrderedDict[int, Decoded | CodecError] = OrderedDict()

    def get(self, message: Message) -> Decoded:
        with self._lock:
            found = self._rows.get(message.seq)
            if found is None:
                try:
                    found = decode_row(message.body, self._queue.blobs)
                except CodecError as error:
                    found = error
                self._rows[message.seq] = found
                while len(self._rows) > 2 * _BATCH:
                    self._rows.popitem(last=False)
        if isinstance(found, CodecError):
            raise found
        return found


@dataclass
class _Worker:
    target: Target | None  # None: the media worker
    consumer: str
    cursor: int = 0
    output: OutputFormat | None = None
    closed: bool = False
    failed_seen: bool = False
    gave_up: bool = False
    failures: int = 0
    thread: threading.Thread | None = field(default=None, repr=False)
    #: System metrics samples for it (the watcher appends, the worker writes them).
    side: deque[Row] = field(default_factory=lambda: deque(maxlen=256), repr=False)
    side_failed: bool = False

    @property
    def label(self) -> str:
        return self.target.label if self.target is not None else "media files"


class Delivery:
    """Delivers one queue until every output is closed or the deadline passes."""

    def __init__(
        self,
        queue: Queue,
        *,
        secrets: dict[str, dict[str, Any]] | None,
        trainer_gone: Callable[[], bool],
        report: Reporter = log_reporter,
        deadline: float | None = None,
    ) -> None:
        self.queue = queue
        self.header = queue.header()
        self.settings = DeliverySettings.model_validate(self.header["delivery"])
        self.run_dir = Path(self.header["run_dir"])
        self._trainer_gone = trainer_gone
        self._report = report
        self._rows = _Rows(queue)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._arrived = threading.Condition()
        self._arrivals = 0  # how often the watcher told the workers to look
        self._watching = True
        self._storage_outage = False  # said once: the queue's disk refuses writes
        #: monotonic time after which transient errors are no longer retried
        self._deadline = deadline
        self.workers = [
            _Worker(target, target.consumer) for target in targets(self.header, secrets)
        ]
        if self.header.get("media"):
            self.workers.append(_Worker(None, MEDIA))
        self._sampler: SystemSampler | None = None
        self._system_file: JsonlOutputFormat | None = None
        self._next_sample = 0.0
        trainer = self.header.get("trainer", {})
        interval = self.header.get("system_metrics")
        if interval and trainer.get("host") == socket.gethostname() and not trainer_gone():
            with contextlib.suppress(Exception):  # psutil cannot read this machine
                self._sampler = SystemSampler(int(trainer["pid"]), self.run_dir)
                self._next_sample = time.monotonic() + float(interval)

    # Running ---------------------------------------------------------------------------
    def run(self) -> bool:
        """Deliver; True if every output got everything (the queue is then removed)."""
        watcher = threading.Thread(target=self._watch, name="tracklog-inbox", daemon=True)
        watcher.start()
        try:
            self._run_workers()
        finally:
            self._watching = False
            watcher.join()
        complete = all(worker.closed and not worker.gave_up for worker in self.workers)
        self._forget()
        if complete:
            self._remove()
        else:
            left = self.queue.pending([worker.consumer for worker in self.workers])
            self._report(
                logging.ERROR,
                f"tracklog: {left} message(s) could not be delivered in time and are kept in "
                f"{self.queue.directory}. Deliver them later with:\n    "
                f"{replay_command(self.queue.directory)}",
            )
        return complete

    def _run_workers(self) -> None:
        for worker in self.workers:
            worker.thread = threading.Thread(
                target=self._work, args=(worker,), name=f"tracklog-{worker.consumer}", daemon=True
            )
            worker.thread.start()
        last_forget = time.monotonic()
        while any(
            worker.thread is not None and worker.thread.is_alive() for worker in self.workers
        ):
            for worker in self.workers:
                if worker.thread is not None and worker.thread.is_alive():
                    worker.thread.join(_FORGET_EVERY)  # the first one still working
                    break
            if time.monotonic() - last_forget >= _FORGET_EVERY:
                last_forget = time.monotonic()
                self._forget()

    def _watch(self) -> None:
        """Move the inbox into the queue every ``_POLL`` seconds, and wake the workers
        when that brought messages, or once the trainer is gone."""
        current.report = self._report
        while self._watching:
            gone = self._trainer_gone()
            try:
                moved = self.queue.ingest(final=gone)
            except (OSError, sqlite3.Error) as error:  # a full disk: the workers look too
                _log.debug("tracklog: cannot move %s's inbox: %s", self.queue.directory, error)
                moved = 0
            self._report_problems()
            sampled = not gone and self._sample_system()
            if moved or gone or sampled:
                with self._arrived:
                    self._arrivals += 1
                    self._arrived.notify_all()
            time.sleep(_POLL)  # half the CPU of a timed Event.wait per wake-up, measured
        if self._system_file is not None:
            self._system_file.close()

    def _sample_system(self) -> bool:
        """Take a system sample if one is due: for MLflow and TensorBoard (their workers
        write it) and system.jsonl. Best effort: a failure is logged, never retried."""
        if self._sampler is None or time.monotonic() < self._next_sample:
            return False
        self._next_sample = time.monotonic() + float(self.header["system_metrics"])
        try:
            row = self._sampler.sample()
            path = self.header.get("system_jsonl")
            if path:
                if self._system_file is None:
                    self._system_file = JsonlOutputFormat(path)
                self._system_file.write_row(row)
        except Exception as error:
            _log.debug("tracklog: system metrics: %s", error)
            return False
        for worker in self.workers:
            if worker.target is not None and backend(worker.target.settings).system:
                worker.side.append(row)
        return True

    def _write_system(self, worker: _Worker) -> None:
        """Write the system samples waiting for this output (reported once if it cannot)."""
        if not worker.side or worker.output is None:
            return
        rows: list[Row] = []
        while worker.side:
            rows.append(worker.side.popleft())
        try:
            worker.output.write_rows(rows)
        except Exception as error:
            if not worker.side_failed:
                worker.side_failed = True
                self._report(
                    logging.WARNING,
                    f"tracklog {worker.label}: system metrics not written: {_first_line(error)}",
                )

    def _await_messages(self, seen: int) -> None:
        """Wait until the watcher brought messages after ``seen`` (or ``_IDLE``)."""
        with self._arrived:
            if self._arrivals == seen:
                self._arrived.wait(_IDLE)

    def _forget(self) -> None:
        low = min((worker.cursor for worker in self.workers), default=0)
        if low > 0:
            try:
                self.queue.forget(low)
            except Exception as error:  # a locked database: next time
                _log.debug("tracklog: could not trim %s: %s", self.queue.directory, error)

    def _remove(self) -> None:
        """Remove the queue once its trainer is gone (it may still wait in close())."""
        lock = self.queue.trainer_lock()
        limit = time.monotonic() + 60.0
        with contextlib.suppress(OSError, sqlite3.Error):  # removed by a replay meanwhile
            while lock.held_elsewhere() and time.monotonic() < limit:
                time.sleep(0.05)
        self.queue.close()
        remove(self.queue.directory)

    def _past_deadline(self) -> bool:
        """Whether to stop retrying: ``deadline`` seconds after the logger closed or
        its trainer died; never while it is still logging (the rows wait on disk)."""
        if self._deadline is None:
            if not (self._trainer_gone() or self.queue.meta("closed")):
                return False
            self._deadline = time.monotonic() + self.settings.deadline
        return time.monotonic() >= self._deadline

    # One output ------------------------------------------------------------------------
    def _work(self, worker: _Worker) -> None:
        current.report = self._report

        ended = False

        def resume() -> None:  # where an earlier delivery left this output
            nonlocal ended
            worker.cursor = self.queue.acked(worker.consumer)
            ended = bool(self.queue.state(worker.consumer).get("closed"))

        try:
            if not self._store(worker, resume):
                return
            if ended:
                # Ended by an earlier delivery (the queue stayed for another output):
                # its run keeps the status it ended with; nothing is sent again.
                worker.closed = True
                return
            if worker.target is not None and not self._build(worker):
                return
            self._loop(worker)
            if worker.closed and not worker.gave_up:  # also ended without a close message
                closed = functools.partial(self.queue.set_state, worker.consumer, {"closed": "1"})
                self._store(worker, closed)
        except BaseException as error:  # a bug: say so; the queue keeps what is left
            self._give_up(worker)
            self._report(
                logging.ERROR,
                f"tracklog {worker.label}: the delivery worker stopped: "
                + "".join(traceback.format_exception(error)),
            )

    def _build(self, worker: _Worker) -> bool:
        target = worker.target
        assert target is not None
        entry = backend(target.settings)
        assert entry.build_remote is not None
        state_dir = self.queue.directory / f"state-{target.consumer}"
        try:
            state_dir.mkdir(mode=0o700)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(state_dir).st_mode):
                # Written to and emptied as this output's own: never through a link.
                self._give_up(worker)
                self._report(
                    logging.ERROR,
                    f"tracklog {target.label}: cannot start: {state_dir} is not a folder "
                    "(a symlink?); refused. Its rows stay in the queue.",
                    warning=False,
                )
                return False
        published = self.queue.state(target.consumer)
        again = published.pop("built", None) is not None
        if not self._store(
            worker, functools.partial(self.queue.set_state, target.consumer, {"built": "1"})
        ):
            return False
        context = RemoteContext(
            run_dir=self.run_dir,
            settings_json=str(self.header.get("settings_json", "{}")),
            state_dir=state_dir,
            identity=dict(self.header["identity"].get(target.consumer, {})),
            published=published,
            again=again,
            resumed=bool(self.header.get("resumed")),
            summaries=dict(self.header.get("summaries", {})),
            summary_metrics=tuple(self.header.get("summary_metrics", ())),
            trainer_pid=self.header.get("trainer", {}).get("pid"),
            system_metrics=self.header.get("system_metrics"),
            session=str(self.header.get("session", "")),
        )
        delay = self.settings.retry_initial
        while True:
            try:
                output = entry.build_remote(target.settings, context)
                break
            except Exception as error:
                if not entry.transient(error) or self._past_deadline():
                    self._give_up(worker)
                    self._report(
                        logging.ERROR,
                        f"tracklog {target.label}: cannot start: {type(error).__name__}: "
                        f"{error}; its rows stay in {self.queue.directory} for `tracklog "
                        "replay` once the settings are fixed",
                        warning=False,
                    )
                    return False
                self._wait(delay)
                delay = min(delay * 2, self.settings.retry_max)
        worker.output = output
        self._publish(worker)
        return True

    def _give_up(self, worker: _Worker) -> None:
        """Stop this output; what it has not acked stays in the queue for replay, and
        the trainer's flush() and close() no longer wait for it."""
        worker.gave_up = True
        try:
            self.queue.set_state(worker.consumer, {"gave_up": "1"})
        except (OSError, sqlite3.Error) as error:  # a full disk: close() waits its timeout
            _log.debug("tracklog: cannot mark %s given up: %s", worker.consumer, error)

    def _publish(self, worker: _Worker) -> None:
        assert worker.target is not None
        assert worker.output is not None
        try:
            published = backend(worker.target.settings).publish(worker.output)
        except Exception:  # not known yet (MLflow down at start): published later
            return
        self._store(worker, functools.partial(self.queue.set_state, worker.consumer, published))

    def _loop(self, worker: _Worker) -> None:
        while not worker.closed:
            self._write_system(worker)
            seen = self._arrivals
            gone = self._trainer_gone()  # before reading: rows written before it count
            # All the gone trainer left in the inbox (a record it left unfinished: dropped).
            if gone and not self._store(worker, functools.partial(self.queue.ingest, final=True)):
                return
            messages = self.queue.read(worker.cursor, _BATCH)
            self._report_problems()
            if not messages:
                if gone:
                    self._end_orphaned(worker)
                    return
                self._await_messages(seen)
                continue
            messages = self._linger(worker, messages)
            for group in _groups(messages):
                if not self._deliver(worker, group):
                    self._give_up(worker)
                    return
                worker.cursor = group[-1].seq
                # The close's ack marks the output closed too, in the same transaction.
                ack = functools.partial(
                    self.queue.ack, worker.consumer, worker.cursor, closed=worker.closed
                )
                if not self._store(worker, ack):
                    return

    def _store(self, worker: _Worker, call: Callable[[], object]) -> bool:
        """Use the queue's own files: record progress (an ack, a state), read where an
        earlier delivery left off, move the gone trainer's inbox. A full disk, a locked
        database or an I/O error is retried like a backend's transient error, up to the
        deadline: the output waits, then goes on where it was. Any other error, or the
        deadline: said, and this output gives up (False); what it has not recorded as
        delivered stays in the queue for ``tracklog replay``."""
        delay = self.settings.retry_initial
        while True:
            try:
                call()
            except (OSError, sqlite3.Error) as error:
                if not storage_transient(error) or self._past_deadline():
                    self._give_up(worker)
                    self._report(
                        logging.ERROR,
                        f"tracklog {worker.label}: cannot write to {self.queue.directory} "
                        f"({error}); what it has not recorded as delivered stays there "
                        f"for:\n    {replay_command(self.queue.directory)}",
                    )
                    return False
                with self._lock:
                    said, self._storage_outage = self._storage_outage, True
                if not said:
                    self._report(
                        logging.WARNING,
                        f"tracklog: cannot write to {self.queue.directory} ({error}); "
                        "delivery waits and tries again (nothing is lost); training goes on",
                    )
                self._wait(delay)
                delay = min(delay * 2, self.settings.retry_max)
                continue
            with self._lock:
                said, self._storage_outage = self._storage_outage, False
            if said:
                self._report(
                    logging.WARNING, f"tracklog: {self.queue.directory} takes writes again"
                )
            return True

    def _report_problems(self) -> None:
        """Say what moving the inbox skipped (damaged bytes), once each."""
        while self.queue.problems:
            try:
                level, problem = self.queue.problems.pop(0)
            except IndexError:  # another worker said it
                return
            self._report(level, f"tracklog: the queue's inbox {problem}")

    def _end_orphaned(self, worker: _Worker) -> None:
        """The trainer ended without close(): end the run as it ended (KILLED, or
        FAILED if the queue holds the exception it died of)."""
        if not worker.failed_seen:
            self._deliver(worker, [Message(0, "failed", "died")])
        if self._deliver(worker, [Message(0, "close", "")]):
            worker.cursor = self.queue.last_seq()
            ended = functools.partial(self.queue.ack, worker.consumer, worker.cursor, closed=True)
            self._store(worker, ended)  # ended, at once
        else:
            self._give_up(worker)

    def _linger(self, worker: _Worker, messages: list[Message]) -> list[Message]:
        """Wait up to ``linger`` for more rows, so a backend gets one request for many."""
        linger = self.settings.linger
        if linger == 0 or worker.target is None or len(messages) >= _BATCH:
            return messages
        if any(message.kind != "row" for message in messages):
            return messages
        until = time.monotonic() + linger
        while time.monotonic() < until and not self._trainer_gone():
            self._wait(min(_POLL, linger))
            more = self.queue.read(worker.cursor, _BATCH)
            if len(more) >= _BATCH or any(message.kind != "row" for message in more):
                return more
            messages = more
        return messages

    def _wait(self, seconds: float) -> None:
        self._stop.wait(seconds)

    # Handing messages over -------------------------------------------------------------
    def _deliver(self, worker: _Worker, group: list[Message]) -> bool:
        """Hand ``group`` over, retrying transient errors; False if given up."""
        delay = self.settings.retry_initial
        outage = False
        while True:
            try:
                self._dispatch(worker, group)
                if outage:
                    self._report(
                        logging.WARNING, f"tracklog {worker.label}: the backend is reachable again"
                    )
                return True
            except Exception as caught:
                error, written = caught, 0
                if isinstance(caught, PartlyWritten):  # the messages before are delivered
                    error, written = caught.error, caught.written
                    worker.cursor = group[written - 1].seq  # never sent again, by anyone
                    if not self._store(
                        worker, functools.partial(self.queue.ack, worker.consumer, worker.cursor)
                    ):
                        return False
                    group = group[written:]
                if worker.output is None or not worker.output.is_transient(error):
                    if written == 0 and len(group) > 1:  # which one failed: one at a time
                        return all(self._deliver(worker, [message]) for message in group)
                    self._skip(worker, group[0], error)
                    if group[0].kind == "close":
                        worker.closed = True
                    return len(group) == 1 or self._deliver(worker, group[1:])
                if self._past_deadline():
                    self._report(
                        logging.ERROR,
                        f"tracklog {worker.label}: still failing at the delivery deadline "
                        f"({type(error).__name__}: {_first_line(error)})",
                    )
                    return False
                if not outage:
                    outage = True
                    self._report(
                        logging.WARNING,
                        f"tracklog {worker.label}: delivery failed ({type(error).__name__}: "
                        f"{_first_line(error)}); the rows wait in the queue and delivery is "
                        "retried with backoff; training goes on",
                    )
                self._wait(delay)
                delay = min(delay * 2, self.settings.retry_max)

    def _dispatch(self, worker: _Worker, group: list[Message]) -> None:
        first = group[0]
        if first.kind not in KINDS:
            self._report(
                logging.ERROR,
                f"tracklog {worker.label}: record {first.seq} of {self.queue.directory} is not "
                f"a message tracklog wrote (kind {first.kind[:40]!r}); skipped",
            )
            return
        if worker.target is None:
            if first.kind == "row":
                for message in group:
                    self._encode_media(self._decoded(worker, message))
            elif first.kind == "close":
                worker.closed = True
            return
        output = worker.output
        assert output is not None
        name = backend(worker.target.settings).exclude
        if first.kind == "row":
            rows: list[Row] = []
            positions: list[int] = []  # each row's message in group
            for position, message in enumerate(group):
                decoded = self._decoded(worker, message)
                if decoded is not None:
                    rows.append(decoded.for_output(name))
                    positions.append(position)
            try:
                if len(rows) == 1:
                    output.write_row(rows[0])
                elif rows:
                    output.write_rows(rows)
            except PartlyWritten as partly:  # counted in messages: unreadable ones are done
                raise PartlyWritten(positions[partly.written], partly.error) from partly.error
            if "run_id" not in self.queue.state(worker.consumer):
                self._publish(worker)  # the run exists now if it did not at start
        elif first.kind == "line":
            output.write_line(first.body)
        elif first.kind == "flush":
            output.flush()
        elif first.kind == "failed":
            worker.failed_seen = True
            output.mark_failed(first.body)
        elif first.kind == "close":
            output.close()
            worker.closed = True

    def _decoded(self, worker: _Worker, message: Message) -> Decoded | None:
        try:
            return self._rows.get(message)
        except CodecError as error:
            self._report(
                logging.ERROR,
                f"tracklog {worker.label}: record {message.seq} of {self.queue.directory} "
                f"is not a row tracklog wrote ({error}); skipped",
            )
            return None

    def _skip(self, worker: _Worker, message: Message, error: Exception) -> None:
        worker.failures += 1
        if message.kind == "row":
            try:
                decoded = self._rows.get(message)
                keys = list(decoded.row.values)
                what = f"the row at step {decoded.row.step} (keys {', '.join(keys[:8])}"
                what += ", …)" if len(keys) > 8 else ")"
            except CodecError:
                what = f"record {message.seq}"
        else:
            what = f"the {message.kind} message"
        text = (
            f"tracklog {worker.label}: {what} was skipped for this output: "
            f"{type(error).__name__}: {error}"
        )
        if worker.failures == 1:
            text += "\n" + "".join(traceback.format_exception(error))
        self._report(logging.ERROR, text)

    def _encode_media(self, decoded: Decoded | None) -> None:
        """Write the JSONL/CSV media files a row named (aside, then renamed)."""
        if decoded is None:
            return
        for key, (path, ext) in decoded.media.items():
            value = decoded.row.values.get(key)
            target = _media_path(self.run_dir, path)
            if isinstance(value, Video) and ext == "mp4":
                data = _encode.mp4(value)
            elif isinstance(value, Image) and ext == "png":
                data = _encode.png(value)
            else:
                raise CodecError(f"media job {path!r} does not match its value")
            aside = target.with_name(target.name + ".part")
            fd = open_nofollow(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            with os.fdopen(fd, "wb") as file:
                file.write(data)
            os.replace(aside, target)


def _media_path(run_dir: Path, path: str) -> Path:
    relative = PurePosixPath(path)
    if (
        relative.is_absolute()
        or relative.parts[:1] != ("media",)
        or any(part in ("", ".", "..") for part in relative.parts)
    ):
        raise CodecError(f"media path {path!r} is not under media/")
    return run_dir.joinpath(*relative.parts)


def _groups(messages: list[Message]) -> list[list[Message]]:
    """Runs of consecutive rows, and every other message on its own."""
    result: list[list[Message]] = []
    for message in messages:
        if message.kind == "row" and result and result[-1][0].kind == "row":
            result[-1].append(message)
        else:
            result.append([message])
    return result


def _first_line(error: BaseException) -> str:
    text = str(error)
    return text.splitlines()[0][:300] if text else ""
