"""``tracklog.Logger``: SB3's ``Logger`` with validated values and typed outputs."""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, cast

import numpy as np
import numpy.typing as npt
from stable_baselines3.common import logger as sb3

from tracklog import _lifecycle
from tracklog._delivery import Channel, Message, size_of_row
from tracklog._isolation import Isolation
from tracklog._row import Row
from tracklog._spool import Spool, SpoolBusyError, free_directory
from tracklog.convert.sb3 import to_sb3
from tracklog.outputs._base import OutputFormat
from tracklog.settings import DeliverySettings, LoggerSettings
from tracklog.values import LogValue, Recordable, Scalar, check_key, normalise

if TYPE_CHECKING:
    from torch import Tensor as _Tensor
else:
    _Tensor = Any

__all__ = ["Logger", "MeanValue"]

_log = logging.getLogger("tracklog")

_new_scalar = object.__new__
# The slot's descriptor: it sets the field without the frozen __setattr__.
_set_scalar: Callable[[Scalar, float], None] = Scalar.__dict__["value"].__set__

Exclude = str | tuple[str, ...] | None


def _exclude_tuple(exclude: Exclude) -> tuple[str, ...]:
    if exclude is None:
        return ()
    if isinstance(exclude, str):
        return (exclude,)
    if isinstance(exclude, tuple) and all(isinstance(name, str) for name in exclude):
        return exclude
    raise TypeError(f"exclude must be a str, a tuple of str or None, not {exclude!r}")


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
    ) -> None:
        super().__init__(folder=folder, output_formats=list(output_formats))
        self.set_level(level)
        #: The validated settings this logger was built from (None if built by hand).
        self.settings = settings
        if delivery is None:
            delivery = settings.delivery if settings is not None else DeliverySettings()
        self.delivery = delivery
        self._values: dict[str, LogValue] = {}
        self._valid_keys: set[str] = set()  # keys check_key accepted
        self._seq = itertools.count()
        self._isolation = Isolation(strict=strict)
        self._channels: dict[int, Channel] = {}
        self._failed_reason: str | None = None
        self._closed = False
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
            self._values[key] = scalar
            self.name_to_value[key] = value
            self.name_to_excluded[key] = ()
            return
        self._store(key, normalise(check_key(key), value), exclude)
        self._valid_keys.add(key)

    def record_mean(self, key: str, value: MeanValue, exclude: Exclude = None) -> None:
        """Average ``value`` over the calls before the next dump, exactly as SB3 does.

        ``None`` is ignored, as in SB3. As in SB3, a ``record()`` of the same key in
        between replaces the running mean but not its count.
        """
        if value is None:
            return
        number = normalise(check_key(key), value)
        if not isinstance(number, Scalar):
            raise TypeError(f"record_mean({key!r}) needs a number, not {type(value).__name__}")
        # name_to_value is typed dict[str, float] by SB3 but holds any recorded value.
        previous: object = self.name_to_value.get(key, 0.0)
        old = previous if isinstance(previous, int | float) else 0.0  # media before: restart
        count = self.name_to_count[key]
        # SB3's running-mean formula, kept verbatim so the result is bit-identical.
        mean = old * count / (count + 1) + number.value / (count + 1)
        self._store(key, Scalar(mean), exclude)
        self.name_to_count[key] = count + 1

    def _store(self, key: str, value: LogValue, exclude: Exclude) -> None:
        self._check_open()
        excluded = _exclude_tuple(exclude)
        self._values[key] = value
        # SB3 declares dict[str, float] but its record() stores any value there too.
        self.name_to_value[key] = cast(float, to_sb3(value))
        self.name_to_excluded[key] = excluded

    # Writing -----------------------------------------------------------------------
    def dump(self, step: int = 0) -> None:
        """Write everything recorded since the last dump to every output, at ``step``."""
        if isinstance(step, bool) or not isinstance(step, int | np.integer):
            raise TypeError(f"dump step must be an int, not {type(step).__name__}: {step!r}")
        self._check_open()
        values, excluded, legacy = self._values, self.name_to_excluded, self.name_to_value
        self._values = {}
        self.name_to_value = defaultdict(float)
        self.name_to_count = defaultdict(int)
        self.name_to_excluded = {}
        if self.level == sb3.DISABLED or not values:
            return
        row = Row(step=int(step), timestamp=time.time(), seq=next(self._seq), values=values)
        with _lifecycle.critical():
            self._isolation.run(self._row_calls(row, excluded, legacy))
        self._raise_background_error()

    def _row_calls(
        self, row: Row, excluded: dict[str, tuple[str, ...]], legacy: dict[str, Any]
    ) -> list[tuple[object, Callable[[], None]]]:
        """One call per output handing it ``row`` (filtered by ``exclude``)."""
        any_excluded = any(excluded.values())
        size = 0
        calls: list[tuple[object, Callable[[], None]]] = []
        for index, output in enumerate(self.output_formats):
            if isinstance(output, OutputFormat):
                filtered = _for_output(row, excluded, output.name) if any_excluded else row
                if output.background:
                    if filtered is row:
                        size = size or size_of_row(row)
                        message = Message("row", row=row, size=size)
                    else:
                        message = Message("row", row=filtered)
                    call = functools.partial(self._put_row, index, output, message)
                    calls.append((output, call))
                else:
                    calls.append((output, functools.partial(output.write_row, filtered)))
            elif isinstance(output, sb3.KVWriter):
                sb3_excluded = {key: names or ("",) for key, names in excluded.items()}
                call = functools.partial(output.write, legacy, sb3_excluded, row.step)
                calls.append((output, call))
        return calls

    def log(self, *args: object, level: int = sb3.INFO) -> None:
        """Write ``args`` joined by spaces to every text output, if ``level`` is enabled."""
        self._check_open()
        if self.level > level:
            return
        words = [str(arg) for arg in args]
        line = " ".join(words)
        calls: list[tuple[object, Callable[[], None]]] = []
        for index, output in enumerate(self.output_formats):
            if isinstance(output, OutputFormat):
                if output.background:
                    message = Message("line", text=line)
                    calls.append((output, functools.partial(self._put, index, message)))
                else:
                    calls.append((output, functools.partial(output.write_line, line)))
            elif isinstance(output, sb3.SeqWriter):
                calls.append((output, functools.partial(output.write_sequence, words)))
        with _lifecycle.critical():
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
        if isinstance(level, bool) or not isinstance(level, int):
            raise TypeError(f"level must be an int or a level name, not {level!r}")
        self.level = level

    # Lifetime ----------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this tracklog Logger is closed; build a new one to log again")

    def mark_failed(self, reason: str) -> None:
        """Tell the outputs that training is ending through ``reason`` (an exception name).

        ``close()`` should follow; run-holding outputs then end their run as failed.
        Called by ``__exit__`` and by tracklog's excepthook; rarely needed by hand.
        """
        if self._closed or self._failed_reason is not None:
            return  # the first reason (SIGTERM before the SystemExit it causes) stands
        self._failed_reason = reason
        calls: list[tuple[object, Callable[[], None]]] = []
        for index, output in enumerate(self.output_formats):
            if isinstance(output, OutputFormat):
                if output.background:
                    message = Message("failed", text=reason)
                    calls.append((output, functools.partial(self._put, index, message)))
                else:
                    calls.append((output, functools.partial(output.mark_failed, reason)))
        with _lifecycle.critical():
            self._isolation.run(calls)

    def close(self) -> None:
        """Flush and close every output format once; later calls do nothing.

        Outputs on a background worker get until ``delivery.close_timeout`` seconds
        (all together) to deliver what they hold; whatever is still undelivered then
        stays in their spool, and the command that delivers it later is reported.
        """
        if self._closed:
            return
        self._closed = True
        with _lifecycle.critical():
            deadline = time.monotonic() + self.delivery.close_timeout
            channels = [
                self._channel(index, output)
                for index, output in enumerate(self.output_formats)
                if isinstance(output, OutputFormat) and output.background
            ]
            for channel in channels:
                channel.request_close()
            self._isolation.run(
                [
                    (output, output.close)
                    for output in self.output_formats
                    if not (isinstance(output, OutputFormat) and output.background)
                ]
            )
            for channel in channels:
                channel.wait(deadline)
            _lifecycle.unregister(self)
            self._isolation.summary()
        self._raise_background_error()

    # Background delivery -------------------------------------------------------------
    def _channel(self, index: int, output: OutputFormat) -> Channel:
        channel = self._channels.get(id(output))
        if channel is None:
            spool = None
            header = output.spool_header()
            directory = output.spool_dir
            if directory is None and header is not None and self.settings is not None:
                root = self.settings.resolve(self.delivery.spool_dir)
                directory = free_directory(root / f"{index}-{output.name or 'output'}")
            if directory is not None:
                spool = Spool(directory, header or {})
                try:
                    spool.claim()  # the header first: replay needs it even after a crash
                except (OSError, SpoolBusyError) as error:
                    _log.error("tracklog: cannot create the spool %s: %s", directory, error)
                    spool = None
            channel = self._channels[id(output)] = Channel(
                output,
                settings=self.delivery,
                spool=spool,
                isolation=self._isolation,
                label=f"{type(output).__name__}({output.name})",
            )
        return channel

    def _put_row(self, index: int, output: OutputFormat, message: Message) -> None:
        assert message.row is not None
        output.check_row(message.row)
        self._channel(index, output).put(message)

    def _put(self, index: int, message: Message) -> None:
        output = self.output_formats[index]
        assert isinstance(output, OutputFormat)
        self._channel(index, output).put(message)

    def _raise_background_error(self) -> None:
        if not self._isolation.strict:
            return
        for channel in self._channels.values():
            error, channel.error = channel.error, None
            if error is not None:
                raise error

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every background output has delivered what was dumped so far.

        Returns False if ``timeout`` seconds (default ``delivery.close_timeout``) pass
        first. Training never needs this; tests and notebooks that read a backend
        right after ``dump()`` do.
        """
        limit = self.delivery.close_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        for output in self.output_formats:
            media_flush = getattr(output, "flush", None)
            if isinstance(output, OutputFormat) and not output.background and media_flush:
                media_flush()  # JSONL/CSV media files encoded on their thread
        return all(channel.drain(deadline) for channel in list(self._channels.values()))

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
