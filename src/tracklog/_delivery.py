"""Background delivery: one worker thread per slow output, a byte-budgeted queue, a spool.

The training thread calls :meth:`Channel.put` (an append to a deque, or to the spool
when spilling) and never waits for the backend. The worker delivers in order:

- from memory while the backend keeps up;
- from the on-disk spool (:mod:`tracklog._spool`) once the backend failed with an error
  the output calls transient (connection refused, timeout, 5xx, 429), or the queue
  outgrew ``queue_bytes``. While spilling, every new message goes to the spool too, so
  order is kept; when the spool is drained the channel goes back to memory.

A transient failure is retried with exponential backoff (``retry_initial`` doubling up
to ``retry_max``), forever until ``close()``'s deadline. Any other failure is reported
once through :class:`~tracklog._isolation.Isolation` and counted, and that message is
skipped for this output only. Consecutive rows are handed over together to an output
that has ``write_rows`` (MLflow sends them in one request), so a backlog drains fast.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, assert_never

from tracklog._isolation import Isolation
from tracklog._row import Row
from tracklog._spool import Spool, dumps, loads
from tracklog.values import Figure, Histogram, HParam, Image, Scalar, Text, Video

if TYPE_CHECKING:
    from tracklog.outputs._base import OutputFormat
    from tracklog.settings import DeliverySettings

__all__ = ["Channel", "Message", "dispatch", "replay_command", "size_of", "size_of_row"]

_log = logging.getLogger("tracklog")

Kind = Literal["row", "line", "failed", "close"]


@dataclass(frozen=True, slots=True)
class Message:
    kind: Kind
    row: Row | None = None
    text: str = ""
    #: ``size_of`` this message, when the caller already knows it (0: not known).
    size: int = 0

    def encode(self) -> bytes:
        return dumps((self.kind, self.row, self.text))

    @staticmethod
    def decode(data: bytes) -> Message:
        kind, row, text = loads(data)
        return Message(kind, row, text)


_MAX_GROUP = 64  # rows handed over in one write_rows call
_SPILL_RETRY = 10.0  # seconds before trying a spool that could not be written again


def size_of(message: Message) -> int:
    """A cheap estimate of the bytes ``message`` holds."""
    if message.size:
        return message.size
    return 200 + len(message.text) + (size_of_row(message.row) if message.row else 0)


def size_of_row(row: Row) -> int:
    """A cheap estimate of the bytes ``row`` holds (keys, numbers, media)."""
    size = 200 + 64 * len(row.values) + sum(map(len, row.values))
    for value in row.values.values():
        if type(value) is Scalar:
            continue  # nearly every value: skip the dispatch
        match value:
            case Scalar():
                pass
            case Video():
                size += value.frames.nbytes
            case Image():
                size += value.image.nbytes
            case Figure():
                size += len(value.png)
            case Histogram():
                size += value.values.nbytes
            case Text():
                size += len(value.value)
            case HParam():
                pass
            case _:
                assert_never(value)
    return size


def dispatch(output: OutputFormat, messages: list[Message]) -> None:
    """Hand ``messages`` (consecutive rows, or one other message) to ``output``."""
    first = messages[0]
    if first.kind == "row":
        rows = [message.row for message in messages if message.row is not None]
        if len(rows) == 1:
            output.write_row(rows[0])
        else:
            output.write_rows(rows)
    elif first.kind == "line":
        output.write_line(first.text)
    elif first.kind == "failed":
        output.mark_failed(first.text)
    else:
        output.close()


def groups(messages: list[Message], *, batch_rows: bool) -> list[list[Message]]:
    """Split ``messages`` into runs of consecutive rows (if batching) and single others."""
    result: list[list[Message]] = []
    for message in messages:
        if batch_rows and message.kind == "row" and result and result[-1][0].kind == "row":
            result[-1].append(message)
        else:
            result.append([message])
    return result


def replay_command(directory: object) -> str:
    return f"python -m tracklog replay {directory}"


class _SwitchInterval:
    """Lowers ``sys.setswitchinterval`` while delivery workers run; restores it after.

    A thread that wants the GIL waits up to the switch interval (5 ms by default) for
    the thread holding it. Inside ``dump()`` that happens whenever a file write
    releases the GIL while a worker is runnable: the training thread then waits for
    the worker's Python work. A 1 ms interval caps that wait at about 1 ms (measured in
    ``bench/bench_delivery.py``: p99 of the blocked time per dump 1.0 ms, against
    0.5 to 4.2 ms, max 9 to 26 ms, at 5 ms). Never raised above the interval in force,
    and left alone if the program changed it meanwhile.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved = 0.0
        self._set = 0.0

    def hold(self, interval: float | None) -> bool:
        if interval is None:
            return False
        with self._lock:
            if self._users == 0:
                self._saved = sys.getswitchinterval()
                self._set = min(interval, self._saved)
                sys.setswitchinterval(self._set)
            self._users += 1
        return True

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0 and sys.getswitchinterval() == self._set:
                sys.setswitchinterval(self._saved)


switch_interval = _SwitchInterval()


class Channel:
    """Delivers one output's messages on a worker thread; see the module docstring."""

    def __init__(
        self,
        output: OutputFormat,
        *,
        settings: DeliverySettings,
        spool: Spool | None,
        isolation: Isolation,
        label: str,
    ) -> None:
        self.output = output
        self.settings = settings
        self.spool = spool
        self.label = label
        self._isolation = isolation
        self._cond = threading.Condition()
        self._queue: deque[tuple[Message, int]] = deque()
        self._bytes = 0
        self._spilling = False
        self._spill_failed_at = -_SPILL_RETRY
        self._inflight: list[Message] = []
        self._inflight_from_memory = False
        self._closing = False
        self._abandoned = False
        self._done = False
        self._outage_reported = False
        self._first_queued = 0.0  # when the oldest message in the queue was put
        self._drainers = 0  # threads in drain(): the worker does not linger for them
        self._batch_rows = type(output).write_rows is not _base_write_rows()
        #: The first failure, raised on the training thread when ``strict``.
        self.error: Exception | None = None
        self._thread = threading.Thread(target=self._run, name=f"tracklog-{label}", daemon=True)
        self._holds_interval = switch_interval.hold(settings.switch_interval)
        self._thread.start()

    # Training thread -------------------------------------------------------------------
    def put(self, message: Message) -> None:
        size = size_of(message)
        with self._cond:
            if self._closing:
                raise RuntimeError(f"{self.label}: channel is closed")
            over = self._bytes + size > self.settings.queue_bytes
            if (self._spilling or over) and self._can_spill():
                pending = [queued for queued, _ in self._queue] + [message]
                if self._spill(pending):
                    self._queue.clear()
                    self._bytes = 0
                    self._cond.notify_all()
                    return
            if over and not self._spilling:
                self._warn_over_budget()
            self._queue.append((message, size))
            self._bytes += size
            if len(self._queue) == 1:
                self._first_queued = time.monotonic()
            # A waiting worker starts its linger at the first message and wakes by
            # itself when it ends; waking it at every dump would cost the GIL each time.
            if len(self._queue) == 1 or not self._batch_rows or self._linger_over():
                self._cond.notify_all()

    def _linger_over(self) -> bool:
        """Whether the queued rows should go now rather than wait for more."""
        return (
            self._closing
            or self._drainers > 0
            or len(self._queue) >= _MAX_GROUP
            or 2 * self._bytes > self.settings.queue_bytes
            or self._queue[0][0].kind != "row"
        )

    def _linger_left(self) -> float:
        """Seconds the worker waits for more rows before it delivers (0: now)."""
        # Only an output that sends rows together gains from waiting (MLflow: one
        # request per batch); another would do the same work later, in a longer burst.
        if not self._batch_rows or self.settings.linger == 0 or self._linger_over():
            return 0.0
        return self._first_queued + self.settings.linger - time.monotonic()

    def _can_spill(self) -> bool:
        return self.spool is not None and (time.monotonic() - self._spill_failed_at >= _SPILL_RETRY)

    def _spill(self, messages: list[Message], *, front: bool = False) -> bool:
        """Write ``messages`` to the spool (before its unread records if ``front``)."""
        assert self.spool is not None
        try:
            records = [message.encode() for message in messages]
            if front:
                self.spool.prepend(records)
            else:
                self.spool.append(records)
        except OSError as error:
            self._spill_failed_at = time.monotonic()
            _log.error(
                "tracklog %s: cannot write the spool %s (%s); keeping %d message(s) in "
                "memory and training goes on; free disk space or they are lost if the "
                "process dies",
                self.label,
                self.spool.directory,
                error,
                len(messages),
            )
            return False
        if not self._spilling:
            self._spilling = True
            _log.debug("tracklog %s: spilling to %s", self.label, self.spool.directory)
        return True

    _budget_warned = False

    def _warn_over_budget(self) -> None:
        if not self._budget_warned:
            self._budget_warned = True
            _log.warning(
                "tracklog %s: more than queue_bytes=%d bytes wait for delivery and there "
                "is no spool; keeping them in memory",
                self.label,
                self.settings.queue_bytes,
            )

    def close(self, deadline: float) -> bool:
        """Queue the output's close, wait until ``deadline`` (monotonic); True if all done.

        If the backend is still not done by then, what is undelivered stays in the spool
        and the replay command is reported.
        """
        self.request_close()
        return self.wait(deadline)

    def request_close(self) -> None:
        """Queue the output's ``close()`` after everything already queued."""
        with self._cond:
            if not self._closing:
                self._closing = True
                message = Message("close")
                pending = [queued for queued, _ in self._queue] + [message]
                if self._spilling and self._can_spill() and self._spill(pending):
                    self._queue.clear()
                    self._bytes = 0
                else:
                    self._queue.append((message, 0))
                self._cond.notify_all()

    def wait(self, deadline: float) -> bool:
        """Wait for the worker to deliver the close, until ``deadline`` (monotonic)."""
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if not self._thread.is_alive() and self._done:
            self._finish_spool()
            return True
        self._abandon()
        return False

    def _abandon(self) -> None:
        with self._cond:
            self._abandoned = True
            self._cond.notify_all()
            left = [message for message, _ in self._queue]
            inflight = self._inflight if self._inflight_from_memory else []
            saved = False
            if self.spool is not None and (left or inflight):
                # The in-flight messages may still arrive (the worker is blocked in the
                # backend); replaying them again is harmless (see tracklog._spool).
                saved = self._spill(inflight, front=True) if inflight else True
                saved = saved and (not left or self._spill(left))
            owed = (self.spool.written - self.spool.acked) if self.spool is not None else 0
            self._queue.clear()
        if self.spool is not None and (owed or saved):
            _log.error(
                "tracklog %s: the backend did not take everything within close_timeout=%gs; "
                "%d message(s) are kept in %s. Deliver them later with:\n    %s",
                self.label,
                self.settings.close_timeout,
                owed,
                self.spool.directory,
                replay_command(self.spool.directory),
            )
        else:
            _log.error(
                "tracklog %s: the backend did not take everything within close_timeout=%gs "
                "and there is no spool: %d message(s) are lost",
                self.label,
                self.settings.close_timeout,
                len(left) + len(inflight),
            )
        if self.spool is not None:
            self.spool.close(remove=False)

    def _finish_spool(self) -> None:
        if self.spool is None:
            return
        with self._cond:
            owed = self.spool.written - self.spool.acked if self.spool.claimed else 0
        if owed:
            _log.error(
                "tracklog %s: %d message(s) could not be delivered and are kept in %s. "
                "Deliver them later with:\n    %s",
                self.label,
                owed,
                self.spool.directory,
                replay_command(self.spool.directory),
            )
            self.spool.close(remove=False)
        else:
            self.spool.close(remove=True)

    # Worker thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                taken = self._take()
                if taken is None:
                    return
                messages, from_spool = taken
                self._deliver(messages, from_spool)
                if self._done:
                    return
        except BaseException:
            # A broken spool file, or a bug: say so loudly; close() then keeps what is
            # left in the spool and reports the replay command.
            _log.exception("tracklog %s: the delivery worker stopped", self.label)
        finally:
            with self._cond:
                self._cond.notify_all()
            if self._holds_interval:
                switch_interval.release()

    def _take(self) -> tuple[list[Message], bool] | None:
        with self._cond:
            while True:
                if self._abandoned:
                    return None
                spool = self.spool
                messages: list[Message]
                if spool is not None and spool.claimed and spool.pending > 0:
                    messages = [Message.decode(spool.read_next())]
                    while (
                        spool.pending > 0
                        and len(messages) < _MAX_GROUP
                        and messages[-1].kind == "row"
                    ):
                        messages.append(Message.decode(spool.read_next()))
                    self._inflight, self._inflight_from_memory = messages, False
                    return messages, True
                if self._queue:
                    wait = self._linger_left()
                    if wait > 0:
                        self._cond.wait(wait)
                        continue
                    messages = []
                    while self._queue and (
                        not messages or (len(messages) < _MAX_GROUP and messages[-1].kind == "row")
                    ):
                        message, size = self._queue.popleft()
                        self._bytes -= size
                        messages.append(message)
                    self._inflight, self._inflight_from_memory = messages, True
                    return messages, False
                if self._spilling and spool is not None:
                    # Drained: back to memory, and an empty log on disk.
                    self._spilling = False
                    try:
                        spool.reset()
                    except OSError as error:
                        _log.error("tracklog %s: cannot empty the spool: %s", self.label, error)
                    self._outage_reported = False
                if self._closing and self._done:
                    return None
                self._cond.wait()

    def _deliver(self, messages: list[Message], from_spool: bool) -> None:
        delivered = 0
        delay = self.settings.retry_initial
        for group in groups(messages, batch_rows=self._batch_rows):
            while True:
                if self._abandoned:
                    self._ack_partial(messages, delivered, from_spool)
                    return
                try:
                    dispatch(self.output, group)
                    break
                except Exception as error:
                    if not self.output.is_transient(error):
                        self._isolation.report(self.output, error)
                        self.error = self.error or error
                        break
                    self._report_outage(error)
                    if not from_spool and self.spool is not None:
                        with self._cond:
                            if self._can_spill() and self._spill(messages[delivered:], front=True):
                                # Continue from the spool: same order, now durable;
                                # rows waiting in memory follow them there.
                                self._inflight = []
                                queued = [message for message, _ in self._queue]
                                if queued and self._spill(queued):
                                    self._queue.clear()
                                    self._bytes = 0
                                return
                    with self._cond:
                        self._cond.wait_for(lambda: self._abandoned, timeout=delay)
                    delay = min(delay * 2, self.settings.retry_max)
            delivered += len(group)
            if group[0].kind == "close":
                self._done = True
            if self._outage_reported:
                self._outage_reported = False
                _log.warning("tracklog %s: the backend is reachable again", self.label)
        with self._cond:
            self._inflight = []
            if from_spool and self.spool is not None:
                self._ack(self.spool.read_count)
            self._cond.notify_all()

    def drain(self, deadline: float) -> bool:
        """Wait until everything put so far is delivered (or given up on)."""

        def idle() -> bool:
            spooled = self.spool is not None and self.spool.claimed and self.spool.pending > 0
            return (
                not (self._queue or self._inflight or spooled)
                or self._abandoned
                or not self._thread.is_alive()
            )

        with self._cond:
            self._drainers += 1
            self._cond.notify_all()  # a lingering worker delivers at once
            try:
                return self._cond.wait_for(idle, timeout=max(0.0, deadline - time.monotonic()))
            finally:
                self._drainers -= 1

    def _ack(self, count: int) -> None:
        """Record delivery; a failure (full disk) only means those may be sent again."""
        assert self.spool is not None
        try:
            self.spool.ack(count)
        except OSError as error:
            self.spool.acked = count
            _log.error(
                "tracklog %s: cannot record delivery in %s (%s); a replay would send "
                "those records again (MLflow ignores repeated metric points)",
                self.label,
                self.spool.directory,
                error,
            )

    def _ack_partial(self, messages: list[Message], delivered: int, from_spool: bool) -> None:
        if from_spool and self.spool is not None and delivered:
            with self._cond:
                self._ack(self.spool.read_count - (len(messages) - delivered))

    def _report_outage(self, error: Exception) -> None:
        if not self._outage_reported:
            self._outage_reported = True
            where = f"spooling to {self.spool.directory}" if self.spool else "keeping in memory"
            _log.warning(
                "tracklog %s: delivery failed (%s: %s); %s and retrying with backoff; "
                "training goes on",
                self.label,
                type(error).__name__,
                str(error).splitlines()[0][:300] if str(error) else "",
                where,
            )


def _base_write_rows() -> Callable[..., Any]:
    from tracklog.outputs._base import OutputFormat

    return OutputFormat.write_rows
