"""``tracklog.Logger``: SB3's ``Logger`` with validated values and typed outputs."""

from __future__ import annotations

import functools
import itertools
import logging
import os
import threading
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, cast

import numpy as np
import numpy.typing as npt
from stable_baselines3.common import logger as sb3

from tracklog import _lifecycle
from tracklog._checkpoints import CheckpointStore
from tracklog._isolation import Isolation
from tracklog._media import MediaStore
from tracklog._outbox import Outbox, RemoteOutput
from tracklog._row import Row
from tracklog._summary import Summaries
from tracklog.convert.sb3 import to_sb3
from tracklog.outputs._base import OutputFormat
from tracklog.settings import DeliverySettings, LoggerSettings
from tracklog.values import (
    Checkpoint,
    Image,
    LogValue,
    Recordable,
    Scalar,
    Video,
    check_key,
    normalise,
)

if TYPE_CHECKING:
    from torch import Tensor as _Tensor
else:
    _Tensor = Any

__all__ = ["Logger", "MeanValue"]

_log = logging.getLogger("tracklog")

_MIN_STEP, _MAX_STEP = -(2**63), 2**63 - 1
#: Outputs the summary rows skip: W&B computes its own; files and the console get the
#: closing table instead of a row.
_NOT_SUMMARISED: tuple[str, ...] = ("stdout", "log", "json", "csv", "wandb")
_new_scalar = object.__new__
# The slot's descriptor: it sets the field without the frozen __setattr__.
_set_scalar: Callable[[Scalar, float], None] = Scalar.__dict__["value"].__set__

Exclude = str | tuple[str, ...] | None


def _check_step(step: object) -> None:
    # User input: the annotation is not enforced at runtime.
    if isinstance(step, bool) or not isinstance(step, int | np.integer):
        raise TypeError(f"dump step must be an int, not {type(step).__name__}: {step!r}")
    if not _MIN_STEP <= step <= _MAX_STEP:
        raise ValueError(f"dump step must fit in a signed 64-bit integer; got {step}")


def _exclude_tuple(exclude: Exclude) -> tuple[str, ...]:
    if exclude is None:
        return ()
    if isinstance(exclude, str):
        return (exclude,)
    # User input: the annotation is not enforced at runtime.
    if isinstance(exclude, tuple) and all(isinstance(name, str) for name in exclude):  # pyright: ignore[reportUnnecessaryIsInstance]
        return exclude
    raise TypeError(f"exclude must be a str, a tuple of str or None, not {exclude!r}")


#: How many keys on_bad_value: report remembers having reported (a run inventing keys
#: could otherwise grow the set without bound; past it, each new key is reported).
_REPORTED_KEYS = 10_000
_LEVEL_NAMES = {"debug": sb3.DEBUG, "info": sb3.INFO, "warn": sb3.WARN, "error": sb3.ERROR}
_LEVEL_NAMES["disabled"] = sb3.DISABLED

MeanValue = bool | int | float | np.number[Any] | np.bool_ | npt.NDArray[Any] | _Tensor | None
"""What ``record_mean`` accepts: a number, or a 0-d array or tensor; None is ignored."""


class Logger(sb3.Logger):
    """An SB3 ``Logger`` (``model.set_logger(logger)`` works) that validates as you record.

    ``record()`` turns each value into a frozen :data:`~tracklog.values.LogValue` at the
    call site, so a mistake raises there, naming the key. ``dump(step)`` hands one
    snapshot to every output format. ``output_formats`` is a plain list: append a
    tracklog :class:`~tracklog.outputs.OutputFormat` or any SB3 ``KVWriter``/``SeqWriter``.

    An output that raises does not stop the others or training: it is reported once
    with its traceback on the ``tracklog`` logger and then counted (``strict=True``
    raises instead, after every output had its turn). SB3's ``name_to_value``,
    ``name_to_count`` and ``name_to_excluded`` hold the pending values as SB3's own
    Logger would, for callbacks that read them.
    """

    def __init__(
        self,
        folder: str | None = None,
        output_formats: Iterable[sb3.KVWriter] = (),
        *,
        level: int = sb3.INFO,
        strict: bool = False,
        settings: LoggerSettings | None = None,
        delivery: DeliverySettings | None = None,
        outbox: Outbox | None = None,
        media: MediaStore | None = None,
        checkpoints: CheckpointStore | None = None,
        summaries: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(folder=folder, output_formats=list(output_formats))
        self.set_level(level)
        #: The validated settings this logger was built from (None if built by hand).
        self.settings = settings
        if delivery is None:
            delivery = settings.delivery if settings is not None else DeliverySettings()
        self.delivery = delivery
        self._values: dict[str, LogValue] = {}
        declared = settings.summaries if settings is not None else {}
        self._summary = Summaries(declared) if declared else None
        if self._summary is not None and summaries:
            self._summary.restore(summaries)  # a resumed run: from its last checkpoint
        self._valid_keys: set[str] = set()  # keys check_key accepted
        # on_bad_value: report: a refused key or value is said once per key, then skipped.
        self._report_bad_values = settings is not None and settings.on_bad_value == "report"
        limit = settings.max_media_bytes if settings is not None else None
        self._max_media_bytes: int = limit or LoggerSettings.model_fields["max_media_bytes"].default
        self._reported_keys: set[str] = set()
        self._seq = itertools.count()
        self._isolation = Isolation(strict=strict)
        self._outbox = outbox
        self._media = media
        if checkpoints is None and folder is not None:
            checkpoints = CheckpointStore(Path(folder), lambda: None)
        self._checkpoints = checkpoints
        self._failed_reason: str | None = None
        self._closed = False
        self._pid = os.getpid()
        # record() and dump()'s snapshot take _values_lock; a dump as a whole (and log,
        # flush, close) takes _call_lock: rows from several threads are whole, none lost.
        self._values_lock = threading.Lock()
        self._call_lock = threading.RLock()
        if outbox is not None:
            # Dropped without close(): the delivery process still ends the runs.
            self._finalizer = weakref.finalize(self, outbox.drop)
        _lifecycle.register(self, handle_sigterm=delivery.handle_sigterm)

    # Recording ---------------------------------------------------------------------
    # The value parameter is deliberately narrower than SB3's ``Any`` (mypy accepts
    # narrowing an ``Any`` parameter): with it, ``mypy --strict`` rejects
    # ``logger.record("k", object())`` in user code holding a ``tracklog.Logger``.
    # Code typed against SB3's Logger (``model.logger``) still sees ``Any``; at run
    # time every value is checked by ``normalise`` either way.
    def record(self, key: str, value: Recordable, exclude: Exclude = None) -> None:
        """Record ``value`` under ``key`` for the next dump; a later record replaces it.

        Raises ``TypeError``/``ValueError`` naming ``key`` for an invalid key or value.
        """
        if (
            type(value) is float
            and type(key) is str
            and exclude is None
            and key in self._valid_keys
        ):
            # The hot path of a training loop: a float under a key already checked
            # (str is immutable, so a key that was valid stays valid). Same result as
            # the general path below, with a third of its cost.
            if self._closed:
                self._check_open()
            scalar = _new_scalar(Scalar)  # Scalar(value) at a third of the cost: the
            _set_scalar(scalar, value)  # frozen dataclass's __init__ is the slow part
            with self._values_lock:
                self._values[key] = scalar
                self.name_to_value[key] = value
                self.name_to_excluded[key] = ()
            return
        normalised = self._accepted(key, value)
        if normalised is not None:
            self._store(key, normalised, exclude)
            self._valid_keys.add(key)

    def _accepted(self, key: str, value: object, *, number: bool = False) -> LogValue | None:
        """``value`` as a LogValue, checked; if it is refused, raise, or with
        ``on_bad_value: report`` say so (once per key) and return None."""
        try:
            normalised = normalise(check_key(key), value)
            if number and not isinstance(normalised, Scalar):
                raise TypeError(f"record_mean({key!r}) needs a number, not {type(value).__name__}")
            if isinstance(normalised, Video | Image):
                self._check_media_size(key, normalised)
            return normalised
        except (TypeError, ValueError) as error:
            if not self._report_bad_values:
                raise
            name = key if isinstance(key, str) else repr(key)[:200]  # pyright: ignore[reportUnnecessaryIsInstance]  # user input
            if name not in self._reported_keys:
                if len(self._reported_keys) < _REPORTED_KEYS:
                    self._reported_keys.add(name)
                _log.warning(
                    "tracklog: %s; skipped (on_bad_value: report; said once for this key)", error
                )
            return None

    def _check_media_size(self, key: str, value: Video | Image) -> None:
        pixels = value.frames if isinstance(value, Video) else value.image
        if pixels.nbytes > self._max_media_bytes:
            what = "video" if isinstance(value, Video) else "image"
            raise ValueError(
                f"cannot log {key!r}: the {what} is {pixels.nbytes:,} bytes, more than "
                f"max_media_bytes ({self._max_media_bytes:,}); log fewer or smaller frames, "
                "or raise the setting"
            )

    def record_mean(self, key: str, value: MeanValue, exclude: Exclude = None) -> None:
        """Average ``value`` over the calls before the next dump, exactly as SB3 does.

        ``None`` is ignored, as in SB3. As in SB3, a ``record()`` of the same key in
        between replaces the running mean but not its count.
        """
        if value is None:
            return
        number = self._accepted(key, value, number=True)
        if not isinstance(number, Scalar):
            return  # refused and reported (on_bad_value: report)
        # name_to_value is typed dict[str, float] by SB3 but holds any recorded value.
        previous = cast(object, self.name_to_value.get(key, 0.0))
        old = previous if isinstance(previous, int | float) else 0.0  # media before: restart
        with self._values_lock:
            count = self.name_to_count[key]
            # SB3's running-mean formula, kept verbatim so the result is bit-identical.
            mean = old * count / (count + 1) + number.value / (count + 1)
            self._store_locked(key, Scalar(mean), _exclude_tuple(exclude))
            self.name_to_count[key] = count + 1

    def _store(self, key: str, value: LogValue, exclude: Exclude) -> None:
        excluded = _exclude_tuple(exclude)
        with self._values_lock:
            self._store_locked(key, value, excluded)

    def _store_locked(self, key: str, value: LogValue, excluded: tuple[str, ...]) -> None:
        self._check_open()
        self._values[key] = value
        # SB3 declares dict[str, float] but its record() stores any value there too.
        self.name_to_value[key] = cast(float, to_sb3(value))
        self.name_to_excluded[key] = excluded

    # Writing -----------------------------------------------------------------------
    def dump(self, step: int = 0) -> None:
        """Write everything recorded since the last dump to every output, at ``step``."""
        _check_step(step)
        with self._call_lock:
            self._check_open()
            with self._values_lock:
                values, excluded, legacy = self._values, self.name_to_excluded, self.name_to_value
                self._values = {}
                self.name_to_value = defaultdict(float)
                self.name_to_count = defaultdict(int)
                self.name_to_excluded = {}
            failed: list[Exception] = []
            if self._summary is not None and self.level != sb3.DISABLED:
                # Before the checkpoints are kept: the summaries each one keeps count the
                # row it is dumped with (a best checkpoint's own score).
                self._summary.add_values(values, int(step))
            if Checkpoint in map(type, values.values()):  # a C-level scan: every dump pays it
                # Also when disabled: the files were saved, and a restart finds them.
                values = self._keep_checkpoints(values, int(step), failed)
                for key in [key for key in legacy if key not in values]:
                    del legacy[key]  # a checkpoint that could not be kept
                for key, value in values.items():
                    if type(value) is Checkpoint:  # SB3's formats see where it is kept
                        legacy[key] = cast(float, to_sb3(value))
            if self.level != sb3.DISABLED and values:
                row = Row(step=int(step), timestamp=time.time(), seq=next(self._seq), values=values)
                with _lifecycle.critical():
                    self._isolation.run(self._row_calls(row, excluded, legacy))
            self._raise_background_error()
            self._raise_kept(failed)

    def dump_rows(
        self,
        rows: Iterable[tuple[int, Mapping[str, Recordable]]],
        exclude: Exclude = None,
        *,
        summarising: bool = False,
    ) -> None:
        """Write each ``(step, values)`` as a row of its own, at its own step, in order.

        For values that happen many times between two dumps (every finished episode, at
        its own ``num_timesteps``): one call writes them all, and what was recorded for
        the next ``dump()`` stays pending, untouched. Every step, key and value is
        checked first: a bad one raises (naming it) before any row is written.
        ``exclude`` applies to every value, as in ``record()``. (``summarising``: the
        rows are the run's summaries, written by ``close()``.)
        """
        excluded = _exclude_tuple(exclude)
        checked: list[tuple[int, dict[str, LogValue]]] = []
        for step, values in rows:
            _check_step(step)
            typed: dict[str, LogValue] = {}
            for key, value in values.items():
                normalised = self._accepted(key, value)
                if normalised is not None:
                    typed[key] = normalised
            if typed:
                checked.append((int(step), typed))
        with self._call_lock:
            self._check_open()
            calls: list[tuple[object, Callable[[], None]]] = []
            failed: list[Exception] = []
            for step, typed in checked:
                if self._summary is not None and not summarising and self.level != sb3.DISABLED:
                    self._summary.add_values(typed, step)  # before its checkpoints: see dump()
                if Checkpoint in map(type, typed.values()):
                    # Also when disabled: the files were saved, and a restart finds them.
                    typed = self._keep_checkpoints(typed, step, failed)
                if self.level == sb3.DISABLED or not typed:
                    continue
                row = Row(step=step, timestamp=time.time(), seq=next(self._seq), values=typed)
                legacy = {key: to_sb3(value) for key, value in typed.items()}
                exclusions = dict.fromkeys(typed, excluded)
                calls += self._row_calls(row, exclusions, legacy, skip_empty=True)
            if calls:
                with _lifecycle.critical():
                    self._isolation.run(calls)
            self._raise_background_error()
            self._raise_kept(failed)

    def checkpoint_dir(self, key: str, step: int) -> Path:
        """A new, empty folder ``<run_dir>/checkpoints/<key>/step_<step>/`` to save into.

        A ``Checkpoint`` of this folder, dumped at ``step``, is kept where it is: no
        copy is made (for a large replay buffer, that is the difference). Do not write
        to it after that dump.
        """
        check_key(key)
        _check_step(step)
        store = self._checkpoints
        if store is None:
            raise RuntimeError("this Logger has no folder to keep checkpoints in")
        return store.new_dir(key, int(step))

    def _keep_checkpoints(
        self, values: dict[str, LogValue], step: int, failed: list[Exception]
    ) -> dict[str, LogValue]:
        """``values`` with each checkpoint kept in run_dir (see :mod:`tracklog._checkpoints`).

        One that cannot be kept (a full disk, its files gone) is reported, added to
        ``failed`` and left out; the other values of the row are written as always.
        """
        store = self._checkpoints
        if store is None:
            return values
        kept: dict[str, LogValue] = {}
        for key, value in values.items():
            if type(value) is not Checkpoint:
                kept[key] = value
                continue
            summaries = self._summary.state() if self._summary is not None else None
            try:
                kept[key] = store.keep(key, step, value, summaries)
            except (OSError, ValueError) as error:
                failed.append(error)
                _log.error(
                    "tracklog: checkpoint %r at step %d could not be kept in %s (%s); not logged",
                    key,
                    step,
                    store.run_dir,
                    error,
                )
        return kept

    def _raise_kept(self, failed: list[Exception]) -> None:
        """With ``strict``, a checkpoint that could not be kept raises (after the rest of
        the dump was written); otherwise it was reported."""
        if failed and self._isolation.strict:
            raise failed[0]

    def _row_calls(
        self,
        row: Row,
        excluded: dict[str, tuple[str, ...]],
        legacy: dict[str, Any],
        *,
        skip_empty: bool = False,
    ) -> list[tuple[object, Callable[[], None]]]:
        """One call per output handing it ``row`` (filtered by ``exclude``), then one
        queue entry for everything the delivery process does with it."""
        any_excluded = any(excluded.values())
        calls: list[tuple[object, Callable[[], None]]] = []
        for output in self.output_formats:
            if isinstance(output, OutputFormat):
                filtered = _for_output(row, excluded, output.name) if any_excluded else row
                if skip_empty and not filtered.values:
                    continue  # dump_rows: the row is excluded from this output as a whole
                write = output.check_row if isinstance(output, RemoteOutput) else output.write_row
                calls.append((output, functools.partial(write, filtered)))
            # output_formats is a plain list users append to: it may hold a SeqWriter only.
            elif isinstance(output, sb3.KVWriter):  # pyright: ignore[reportUnnecessaryIsInstance]
                sb3_excluded = {key: names or ("",) for key, names in excluded.items()}
                call = functools.partial(output.write, legacy, sb3_excluded, row.step)
                calls.append((output, call))
        if self._outbox is not None:
            outbox = self._outbox
            calls.append((outbox, functools.partial(self._queue_row, outbox, row, excluded)))
        return calls

    def _queue_row(self, outbox: Outbox, row: Row, excluded: dict[str, tuple[str, ...]]) -> None:
        media = self._media.take(row.seq) if self._media is not None else {}
        if media or self._remote:
            outbox.put_row(row, excluded, media)

    @functools.cached_property
    def _remote(self) -> bool:
        return any(isinstance(output, RemoteOutput) for output in self.output_formats)

    def log(self, *args: object, level: int = sb3.INFO) -> None:
        """Write ``args`` joined by spaces to every text output, if ``level`` is enabled."""
        self._check_open()
        if self.level > level:
            return
        words = [str(arg) for arg in args]
        line = " ".join(words)
        calls: list[tuple[object, Callable[[], None]]] = []
        for output in self.output_formats:
            if isinstance(output, RemoteOutput):
                continue
            if isinstance(output, OutputFormat):
                calls.append((output, functools.partial(output.write_line, line)))
            elif isinstance(output, sb3.SeqWriter):
                calls.append((output, functools.partial(output.write_sequence, words)))
        if self._outbox is not None and self._remote:
            calls.append((self._outbox, functools.partial(self._outbox.put_line, line)))
        with self._call_lock, _lifecycle.critical():
            self._isolation.run(calls)

    def debug(self, *args: object) -> None:
        """``log(*args, level=DEBUG)``."""
        self.log(*args, level=sb3.DEBUG)

    def info(self, *args: object) -> None:
        """``log(*args, level=INFO)``."""
        self.log(*args, level=sb3.INFO)

    def warn(self, *args: object) -> None:
        """``log(*args, level=WARN)``."""
        self.log(*args, level=sb3.WARN)

    def error(self, *args: object) -> None:
        """``log(*args, level=ERROR)``."""
        self.log(*args, level=sb3.ERROR)

    def set_level(self, level: int | str) -> None:
        """Set the level: SB3's ints (``DEBUG=10`` … ``DISABLED=50``) or their names."""
        if isinstance(level, str):
            if level.lower() not in _LEVEL_NAMES:
                raise ValueError(f"unknown level {level!r}; expected one of {list(_LEVEL_NAMES)}")
            level = _LEVEL_NAMES[level.lower()]
        # User input: the annotation is not enforced at runtime.
        if isinstance(level, bool) or not isinstance(level, int):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(f"level must be an int or a level name, not {level!r}")
        self.level = level

    # Lifetime ----------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            if self._pid != os.getpid():
                raise RuntimeError(
                    f"this tracklog Logger belongs to process {self._pid}; a forked child "
                    "does not write to its parent's outputs or runs: build a logger in the child"
                )
            raise RuntimeError("this tracklog Logger is closed; build a new one to log again")

    def _forked(self) -> None:
        """In a forked child: this logger is its parent's; never write or close it."""
        self._closed = True
        # Another thread of the parent may have held these at the fork: in the child it
        # never releases them, and dump() would hang instead of refusing.
        self._values_lock = threading.Lock()
        self._call_lock = threading.RLock()
        if self._outbox is not None:
            self._outbox.abandon()
            self._finalizer.detach()

    def mark_failed(self, reason: str) -> None:
        """Tell the outputs that training is ending through ``reason`` (an exception name).

        ``close()`` should follow; run-holding outputs then end their run as failed.
        Called by ``__exit__`` and by tracklog's excepthook; rarely needed by hand.
        """
        # Not under the call lock: SIGTERM's handler calls this wherever the main thread
        # is, maybe holding a lock a dump() on another thread waits for. (The queue
        # numbers messages under a lock of its own.)
        if self._closed or self._failed_reason is not None:
            return  # the first reason (SIGTERM before the SystemExit it causes) stands
        self._failed_reason = reason
        calls: list[tuple[object, Callable[[], None]]] = []
        for output in self.output_formats:
            if isinstance(output, OutputFormat) and not isinstance(output, RemoteOutput):
                calls.append((output, functools.partial(output.mark_failed, reason)))
        if self._outbox is not None and self._remote:
            calls.append((self._outbox, functools.partial(self._outbox.put_failed, reason)))
        with _lifecycle.critical():
            self._isolation.run(calls)

    def close(self) -> None:
        """Flush and close every output format once; later calls do nothing.

        The delivery process gets until ``delivery.close_timeout`` seconds to deliver
        what is queued; whatever is still undelivered then, it delivers after this
        process ends (within ``delivery.deadline``), or ``tracklog replay`` does later.
        """
        if self._closed:
            return
        self._write_summaries()
        with self._call_lock, _lifecycle.critical():
            self._close_outputs()
        self._raise_background_error()

    def _write_summaries(self) -> None:
        """The declared summaries: ``<key>/<kind>`` metrics for MLflow and TensorBoard
        (W&B computes its own), and a closing table on the console and in train.log."""
        if self._summary is None:
            return
        summary, self._summary = self._summary, None  # once, also if close() is retried
        rows = summary.rows()
        if rows:
            self.dump_rows(rows, exclude=_NOT_SUMMARISED, summarising=True)
        table = summary.table()
        if table:
            self.log(table)

    def _close_outputs(self) -> None:
        if not self._closed:  # another thread may have closed it while this one waited
            self._closed = True
            deadline = time.monotonic() + self.delivery.close_timeout
            self._isolation.run(
                [
                    (output, output.close)
                    for output in self.output_formats
                    if not isinstance(output, RemoteOutput)
                ]
            )
            if self._outbox is not None:
                self._finalizer.detach()
                self._outbox.close(deadline)
            _lifecycle.unregister(self)
            self._isolation.summary()

    def _raise_background_error(self) -> None:
        outbox = self._outbox
        if outbox is not None and outbox.error is not None:
            error, outbox.error = outbox.error, None
            raise error

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the delivery process has delivered everything dumped so far:
        MLflow, W&B and TensorBoard have it, and JSONL/CSV media files are written.

        Returns False if ``timeout`` seconds (default ``delivery.close_timeout``) pass
        first. Training never needs this; code that reads a backend right after
        ``dump()`` (tests, notebooks, a callback reading TensorBoard) does.
        """
        limit = self.delivery.close_timeout if timeout is None else timeout
        with self._call_lock:
            if self._outbox is None or self._closed:
                return True
            done = self._outbox.flush(time.monotonic() + limit)
        self._raise_background_error()
        return done

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is not None and not (
            issubclass(exc_type, SystemExit) and isinstance(exc, SystemExit) and not exc.code
        ):
            self.mark_failed(exc_type.__name__)  # sys.exit(0) inside the block is success
        self.close()


def _for_output(row: Row, excluded: dict[str, tuple[str, ...]], name: str) -> Row:
    if not any(name in names for names in excluded.values()):
        return row
    values = {key: value for key, value in row.values.items() if name not in excluded[key]}
    return Row(step=row.step, timestamp=row.timestamp, seq=row.seq, values=values)
