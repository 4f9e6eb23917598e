"""The delivery process: one per training process, a fresh interpreter, low priority.

The trainer starts it with ``sys.executable -m tracklog._service`` (never by fork) on
the first logger that needs it, and keeps two pipes to it:

- its stdin, where the trainer writes one JSON line per logger (``open``: the queue's
  directory and the outputs' secrets, which so never touch disk or the environment).
  When the trainer dies, however it dies, the pipe closes: the delivery process then
  delivers what is queued, ends the runs as killed, and exits.
- its stdout, where it writes one JSON line per warning or error for a queue; the
  trainer reads them without blocking at each ``dump()``, ``flush()`` and ``close()``
  and shows them there (``warnings.warn`` or the ``tracklog`` logger).

If the delivery process dies, the next ``dump()`` (dumps look at most every 50 ms)
reports it and starts a new one, which continues every open queue from its acks. A
forked child of the trainer does not inherit it: the child's copies of the pipes are
closed at fork.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Final

from tracklog._names import KeyWarning

__all__ = ["Service", "service"]

_log = logging.getLogger("tracklog")

_NICE: Final = 10
#: Signals the delivery process ignores: it ends when its trainer has.
_IGNORED: Final = {signal.SIGTERM, signal.SIGINT}

Listener = Callable[[int, str, bool], None]


class Service:
    """The trainer's handle to its delivery process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._opens: dict[str, bytes] = {}  # queue -> its open line, sent again on restart
        self._listeners: dict[str, Listener] = {}
        self._partial = b""
        self._answered: set[tuple[str, str]] = set()  # (queue, op) the process answered
        self._pid = os.getpid()
        # Queues of loggers that were dropped without close(): forgotten at the next call.
        self._dropped: list[str] = []
        # Queues of loggers whose close() timed out: sent once more to a process that
        # replaces a dead one (one given up on is left for replay, not retried forever).
        self._resumable: dict[str, bytes] = {}

    def open(self, queue: Path, secrets: dict[str, dict[str, Any]], listener: Listener) -> None:
        """Have the delivery process deliver ``queue`` (starting the process if needed)."""
        self._forget_dropped()
        line = json.dumps({"op": "open", "queue": str(queue), "secrets": secrets}).encode()
        with self._lock:
            self._opens[str(queue)] = line + b"\n"
            self._listeners[str(queue)] = listener
            if self._process is None or self._process.poll() is not None:
                self._start()
            else:
                self._send(line + b"\n")

    def hear(self, queue: Path, wait: float) -> None:
        """Show, waiting up to ``wait`` seconds, every report the delivery process made
        of ``queue`` so far.

        The delivery process sends a report (a warning a conversion raised, say) before
        it acknowledges the message that caused it in the queue; its answer to this
        request comes after those reports down the same pipe. So once ``flush()`` has
        seen its marker acknowledged, this brings what delivering it said.
        """
        self._forget_dropped()
        self._round_trip(str(queue), "sync", wait)

    def forget(self, queue: Path, wait: float = 0.0, *, resume: bool = False) -> None:
        """The logger of ``queue`` is closed: (after hearing, within ``wait``, what was
        reported until now) nothing more to hear, and, unless ``resume`` (its close()
        timed out), nothing to send to a delivery process that replaces this one."""
        self._forget_dropped()
        self._forget(str(queue), wait, resume=resume)

    def forget_later(self, queue: Path) -> None:
        """``forget(queue)`` at the next call on this handle. For a logger's finalizer,
        which runs wherever the garbage collector does: maybe inside one of these calls,
        with ``_lock`` held or a line half-written to the pipe."""
        self._dropped.append(str(queue))

    def _forget_dropped(self) -> None:
        while self._dropped:
            try:
                key = self._dropped.pop()
            except IndexError:  # another thread took the last one
                return
            self._forget(key, 0.0)

    def _forget(self, key: str, wait: float, *, resume: bool = False) -> None:
        with self._lock:
            line = self._opens.pop(key, None)
            if resume and line is not None:
                self._resumable[key] = line
        self._round_trip(key, "closed", wait)  # later reports of it go to stderr
        with self._lock:
            self._listeners.pop(key, None)

    def _round_trip(self, key: str, op: str, wait: float) -> None:
        with self._lock:
            process = self._process
            if process is None or process.poll() is not None:
                return
            self._answered.discard((key, op))
            self._send(json.dumps({"op": op, "queue": key}).encode() + b"\n")
        until = time.monotonic() + wait
        while (key, op) not in self._answered and process.poll() is None:
            left = until - time.monotonic()
            if left <= 0:
                break
            assert process.stdout is not None
            with contextlib.suppress(OSError, ValueError):
                select.select([process.stdout], [], [], min(left, 0.05))
            self._read(process)
        self._answered.discard((key, op))

    def poll(self) -> None:
        """Show what the delivery process reported; restart it if it died."""
        self._forget_dropped()
        process = self._process
        if process is None:
            return
        self._read(process)
        if process.returncode is None and process.poll() is None:
            return
        with self._lock:
            if self._process is not process or not (self._opens or self._resumable):
                return
            for listener in list(self._listeners.values()):
                listener(
                    logging.ERROR,
                    f"tracklog: the delivery process (pid {process.pid}) exited with status "
                    f"{process.returncode}; starting a new one, which continues from the queue",
                    False,
                )
            self._start()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    # Inside ------------------------------------------------------------------------------
    def _start(self) -> None:
        # SLURM signals every process of the job at once: the new process starts with
        # SIGTERM and SIGINT blocked (a mask is inherited), so one that arrives while it
        # imports is held until main() ignores them. Blocked here, a signal for the
        # trainer waits only for Popen to return.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, _IGNORED)
        try:
            self._process = _DeliveryProcess(
                [sys.executable, "-m", "tracklog._service"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=None,  # the trainer's stderr: what W&B or MLflow print themselves
                start_new_session=True,  # Ctrl-C in the terminal is the trainer's to handle
                close_fds=True,
                env=_delivery_env(),
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        with contextlib.suppress(OSError):  # lower at once, so its imports yield too
            mine = os.getpriority(os.PRIO_PROCESS, 0)
            os.setpriority(os.PRIO_PROCESS, self._process.pid, min(19, mine + _NICE))
        assert self._process.stdout is not None
        os.set_blocking(self._process.stdout.fileno(), False)
        self._partial = b""
        resumable, self._resumable = self._resumable, {}
        for key, line in resumable.items():
            if Path(key).is_dir():  # not delivered and removed since
                self._send(line)
        for line in self._opens.values():
            self._send(line)

    def _send(self, line: bytes) -> None:
        process = self._process
        assert process is not None
        assert process.stdin is not None
        try:
            process.stdin.write(line)
            process.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it died: the next poll() restarts it and sends every open line again

    def _read(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        try:
            chunk = os.read(process.stdout.fileno(), 1 << 16)
        except (BlockingIOError, OSError):
            return
        if not chunk:
            return
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")
        for line in lines:
            try:
                report = json.loads(line)
                if "op" in report:  # the answer to a round trip
                    self._answered.add((str(report["queue"]), str(report["op"])))
                    continue
                listener = self._listeners.get(report["queue"])
                if listener is not None:
                    listener(int(report["level"]), str(report["message"]), bool(report["warning"]))
                else:  # its logger is closed (a queue delivered on after close() timed out)
                    _log.log(int(report["level"]), "%s", str(report["message"]))
            except (ValueError, KeyError, TypeError):
                continue
        if lines and len(chunk) == 1 << 16:
            self._read(process)

    def _after_fork_in_child(self) -> None:
        # The child must not hold the parent's pipes: the delivery process learns of the
        # trainer's death from its stdin closing. dup2 over them, so the file objects'
        # own close later closes /dev/null rather than a descriptor reused since.
        process = self._process
        self._process = None
        self._opens.clear()
        self._resumable.clear()
        self._listeners.clear()
        self._lock = threading.Lock()
        if process is not None:
            devnull = os.open(os.devnull, os.O_RDWR)
            for pipe in (process.stdin, process.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        os.dup2(devnull, pipe.fileno())
            os.close(devnull)
            _orphans.append(process)


class _DeliveryProcess(subprocess.Popen[bytes]):
    """The delivery process's ``Popen``: it outlives its handle on purpose (it finishes
    delivering after the trainer's exit), so a handle dropped at exit while it still
    runs closes its pipes quietly instead of warning "subprocess … is still running"."""

    def __del__(self) -> None:
        try:
            running = self.returncode is None and self.poll() is None
            if running:
                for pipe in (self.stdin, self.stdout):
                    if pipe is not None:
                        pipe.close()
                return
        except Exception:  # at interpreter shutdown: nothing left to tidy
            return
        super().__del__()


_orphans: list[object] = []  # kept alive so their __del__ never runs in the child
_service: Service | None = None
_service_lock = threading.Lock()


def service() -> Service:
    """This process's delivery process handle (created on first use)."""
    global _service
    with _service_lock:
        # Module-internal use of the handle's private state.
        if _service is None or _service._pid != os.getpid():  # pyright: ignore[reportPrivateUsage]
            _service = Service()
        return _service


#: Where W&B tells a process's children to find its service: a trainer that runs W&B
#: itself (wandb.init in the training script) has it set. The delivery process owns its
#: own service, or its rows would go through the trainer's, which dies with it.
_WANDB_SERVICE: Final = "WANDB_SERVICE"


def _delivery_env() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if name != _WANDB_SERVICE}


def forget_later(queue: Path) -> None:
    """``service().forget(queue)`` at this process's next call on its delivery process
    (see ``Service.forget_later``); takes no lock, as a finalizer may run inside
    ``service()`` itself."""
    handle = _service
    if handle is not None and handle._pid == os.getpid():  # pyright: ignore[reportPrivateUsage]
        handle.forget_later(queue)


def _forked() -> None:
    global _service, _service_lock
    _service_lock = threading.Lock()
    if _service is not None:
        _service._after_fork_in_child()  # pyright: ignore[reportPrivateUsage]  # module-internal
        _service = None


os.register_at_fork(after_in_child=_forked)


# The delivery process ------------------------------------------------------------------
class _Reports:
    """Report lines to the trainer, from a thread of its own (a full pipe blocks only it)."""

    def __init__(self, pipe: IO[bytes]) -> None:
        self._pipe: IO[bytes] | None = pipe
        self.detached: set[str] = set()  # queues whose logger is closed
        self._cond = threading.Condition()
        self._lines: list[bytes] = []
        threading.Thread(target=self._run, name="tracklog-reports", daemon=True).start()

    def send(self, queue: str, level: int, message: str, warning: bool) -> None:
        if self._pipe is None or queue in self.detached:
            # The trainer is gone, or its logger closed: its terminal still shows stderr.
            print(f"tracklog delivery: {message}", file=sys.stderr, flush=True)
            return
        self._put({"queue": queue, "level": level, "message": message, "warning": warning})

    def answer(self, queue: str, op: str) -> None:
        """Answer the trainer's round trip after every report made so far (the same
        pipe, in order); after "closed", later reports of ``queue`` go to stderr."""
        if self._pipe is not None and queue not in self.detached:
            self._put({"queue": queue, "op": op})
        if op == "closed":
            self.detached.add(queue)

    def _put(self, line: dict[str, object]) -> None:
        with self._cond:
            self._lines.append(json.dumps(line).encode() + b"\n")
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._lines:
                    self._cond.wait()
                lines, self._lines = self._lines, []
            try:
                assert self._pipe is not None
                self._pipe.write(b"".join(lines))
                self._pipe.flush()
            except (BrokenPipeError, OSError, AssertionError):
                self._pipe = None
                for line in lines:
                    message = json.loads(line).get("message")
                    if message is not None:
                        print(f"tracklog delivery: {message}", file=sys.stderr)


class _ToReporter(logging.Handler):
    """The ``tracklog`` logger inside the delivery process: to the queue's trainer."""

    def emit(self, record: logging.LogRecord) -> None:
        from tracklog._delivery import current

        report = getattr(current, "report", None)
        message = self.format(record)
        if report is None:
            print(f"tracklog delivery: {message}", file=sys.stderr, flush=True)
        else:
            report(record.levelno, message)


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: object = None,
    line: str | None = None,
) -> None:
    from tracklog._delivery import current

    report = getattr(current, "report", None)
    if report is None:
        print(f"tracklog delivery: {category.__name__}: {message}", file=sys.stderr, flush=True)
    else:
        report(logging.WARNING, str(message), warning=True)


def _deliver(
    queue_dir: Path,
    secrets: dict[str, dict[str, Any]],
    reports: _Reports,
    trainer_gone: threading.Event,
) -> None:
    from tracklog._delivery import Delivery
    from tracklog._queue import Queue

    def report(level: int, message: str, *, warning: bool = False) -> None:
        reports.send(str(queue_dir), level, message, warning)

    lock = queue = None
    try:
        queue = Queue(queue_dir)
        lock = queue.delivery_lock()
        if not lock.acquire():
            report(logging.ERROR, f"tracklog: {queue_dir} is being delivered by another process")
            return
        Delivery(queue, secrets=secrets, trainer_gone=trainer_gone.is_set, report=report).run()
    except Exception as error:
        report(
            logging.ERROR, f"tracklog: cannot deliver {queue_dir}: {type(error).__name__}: {error}"
        )
    finally:
        # Also a queue kept for `tracklog replay`: this process lives as long as its
        # trainer, which may open many more.
        if queue is not None:
            with contextlib.suppress(Exception):
                queue.close()
        if lock is not None:
            lock.release()


def main() -> int:
    """The delivery process: deliver the queues the trainer opens until it is gone."""
    # The trainer lowered this process's priority already (Service._start).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SLURM signals every process of the job: keep delivering through the grace period;
    # the trainer's exit (the pipe closing) is what ends this process.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _IGNORED)  # blocked since its start
    # Reports get the real stdout; whatever a backend prints goes to stderr instead.
    report_pipe = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    reports = _Reports(report_pipe)
    handler = _ToReporter()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("tracklog")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    warnings.showwarning = _show_warning
    # The trainer showed these at the dump that caused them (RemoteOutput.check_row).
    warnings.filterwarnings("ignore", category=KeyWarning)
    trainer_gone = threading.Event()
    threads: list[threading.Thread] = []
    for raw in sys.stdin.buffer:
        try:
            command = json.loads(raw)
            queue = Path(command["queue"])
            secrets = dict(command.get("secrets") or {})
        except (ValueError, KeyError, TypeError):
            continue
        if command.get("op") in ("sync", "closed"):
            reports.answer(str(queue), str(command["op"]))
            continue
        reports.detached.discard(str(queue))  # a new queue where a delivered one was
        thread = threading.Thread(
            target=_deliver,
            args=(queue, secrets, reports, trainer_gone),
            name=f"tracklog-queue-{queue.name}",
        )
        thread.start()
        threads = [alive for alive in threads if alive.is_alive()] + [thread]
    trainer_gone.set()
    for thread in threads:
        thread.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
