"""``tracklog.Logger``: SB3's ``Logger`` with validated values and typed outputs."""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, cast

import numpy as np
import numpy.typing as npt
from stable_baselines3.common import logger as sb3

from tracklog import _lifecycle
from tracklog._isolation import Isolation
from tracklog._row import Row
from tracklog.convert.sb3 import to_sb3
from tracklog.outputs._base import OutputFormat
from tracklog.settings import LoggerSettings
from tracklog.values import LogValue, Recordable, Scalar, check_key, normalise

if TYPE_CHECKING:
    from torch import Tensor as _Tensor
else:
    _Tensor = Any

__all__ = ["Logger", "MeanValue"]

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
    ) -> None:
        super().__init__(folder=folder, output_formats=list(output_formats))
        self.set_level(level)
        #: The validated settings this logger was built from (None if built by hand).
        self.settings = settings
        self._values: dict[str, LogValue] = {}
        self._seq = itertools.count()
        self._isolation = Isolation(strict=strict)
        self._closed = False
        _lifecycle.register(self)

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
        self._store(key, normalise(check_key(key), value), exclude)

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
        values, excluded = self._values, dict(self.name_to_excluded)
        legacy = dict(self.name_to_value)
        self._values = {}
        self.name_to_value.clear()
        self.name_to_count.clear()
        self.name_to_excluded.clear()
        if self.level == sb3.DISABLED or not values:
            return
        row = Row(step=int(step), timestamp=time.time(), seq=next(self._seq), values=values)
        sb3_excluded = {key: names or ("",) for key, names in excluded.items()}
        calls: list[tuple[object, Callable[[], None]]] = []
        for output in self.output_formats:
            if isinstance(output, OutputFormat):
                filtered = _for_output(row, excluded, output.name)
                calls.append((output, functools.partial(output.write_row, filtered)))
            elif isinstance(output, sb3.KVWriter):
                call = functools.partial(output.write, legacy, sb3_excluded, row.step)
                calls.append((output, call))
        self._isolation.run(calls)

    def log(self, *args: object, level: int = sb3.INFO) -> None:
        """Write ``args`` joined by spaces to every text output, if ``level`` is enabled."""
        self._check_open()
        if self.level > level:
            return
        words = [str(arg) for arg in args]
        line = " ".join(words)
        calls: list[tuple[object, Callable[[], None]]] = []
        for output in self.output_formats:
            if isinstance(output, OutputFormat):
                calls.append((output, functools.partial(output.write_line, line)))
            elif isinstance(output, sb3.SeqWriter):
                calls.append((output, functools.partial(output.write_sequence, words)))
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
        if not self._closed:
            self._isolation.run(
                [
                    (output, functools.partial(output.mark_failed, reason))
                    for output in self.output_formats
                    if isinstance(output, OutputFormat)
                ]
            )

    def close(self) -> None:
        """Close every output format once; later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        _lifecycle.unregister(self)
        self._isolation.run([(output, output.close) for output in self.output_formats])
        self._isolation.summary()

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
