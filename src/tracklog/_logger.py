"""``tracklog.Logger``: SB3's ``Logger`` with validated values and typed outputs."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Self

import numpy as np
from stable_baselines3.common import logger as sb3

from tracklog import _lifecycle
from tracklog._row import Row
from tracklog.convert.sb3 import to_sb3
from tracklog.outputs._base import OutputFormat
from tracklog.settings import LoggerSettings
from tracklog.values import LogValue, Recordable, Scalar, check_key, normalise

__all__ = ["Logger"]

Exclude = str | tuple[str, ...] | None


def _exclude_tuple(exclude: Exclude) -> tuple[str, ...]:
    if exclude is None:
        return ()
    if isinstance(exclude, str):
        return (exclude,)
    if isinstance(exclude, tuple) and all(isinstance(name, str) for name in exclude):
        return exclude
    raise TypeError(f"exclude must be a str, a tuple of str or None, not {exclude!r}")


class Logger(sb3.Logger):
    """An SB3 ``Logger`` (``model.set_logger(logger)`` works) that validates as you record.

    ``record()`` turns each value into a frozen :data:`~tracklog.values.LogValue` at the
    call site, so a mistake raises there, naming the key. ``dump(step)`` hands one
    snapshot to every output format. ``output_formats`` is a plain list: append a
    tracklog :class:`~tracklog.outputs.OutputFormat` or any SB3 ``KVWriter``/``SeqWriter``.
    """

    def __init__(
        self,
        folder: str | None = None,
        output_formats: Iterable[sb3.KVWriter] = (),
        *,
        level: int = sb3.INFO,
        settings: LoggerSettings | None = None,
    ) -> None:
        super().__init__(folder=folder, output_formats=list(output_formats))
        self.level = level
        #: The validated settings this logger was built from (None if built by hand).
        self.settings = settings
        self._values: dict[str, LogValue] = {}
        self._excluded: dict[str, tuple[str, ...]] = {}
        self._means: dict[str, tuple[float, int]] = {}
        self._seq = itertools.count()
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
        self._check_open()
        check_key(key)
        normalised = normalise(key, value)
        excluded = _exclude_tuple(exclude)
        self._values[key] = normalised
        self._excluded[key] = excluded
        previous = self._means.pop(key, None)
        if isinstance(normalised, Scalar):
            # As in SB3, a recorded number becomes the running mean and the count goes on,
            # so a later record_mean gives SB3's result bit for bit.
            self._means[key] = (normalised.value, previous[1] if previous else 0)

    def record_mean(
        self,
        key: str,
        value: bool | int | float | np.number[Any] | np.bool_ | None,
        exclude: Exclude = None,
    ) -> None:
        """Average ``value`` over the calls before the next dump, exactly as SB3 does.

        ``None`` is ignored, as in SB3.
        """
        if value is None:
            return
        self._check_open()
        check_key(key)
        normalised = normalise(key, value)
        if not isinstance(normalised, Scalar):
            raise TypeError(f"record_mean({key!r}) needs a number, not {type(value).__name__}")
        excluded = _exclude_tuple(exclude)
        old, count = self._means.get(key, (0.0, 0))
        # SB3's running-mean formula, kept verbatim so the result is bit-identical.
        mean = old * count / (count + 1) + normalised.value / (count + 1)
        self._means[key] = (mean, count + 1)
        self._values[key] = Scalar(mean)
        self._excluded[key] = excluded

    # Writing -----------------------------------------------------------------------
    def dump(self, step: int = 0) -> None:
        """Write everything recorded since the last dump to every output, at ``step``."""
        if isinstance(step, bool) or not isinstance(step, int | np.integer):
            raise TypeError(f"dump step must be an int, not {type(step).__name__}: {step!r}")
        self._check_open()
        values, excluded = self._values, self._excluded
        self._values, self._excluded, self._means = {}, {}, {}
        if self.level == sb3.DISABLED or not values:
            return
        row = Row(step=int(step), timestamp=time.time(), seq=next(self._seq), values=values)
        for output in self.output_formats:
            if isinstance(output, OutputFormat):
                output.write_row(_for_output(row, excluded, output.name))
            elif isinstance(output, sb3.KVWriter):
                legacy = {key: to_sb3(value) for key, value in values.items()}
                output.write(legacy, {key: excluded[key] or ("",) for key in values}, row.step)

    def log(self, *args: object, level: int = sb3.INFO) -> None:
        """Write ``args`` joined by spaces to every text output, if ``level`` is enabled."""
        self._check_open()
        if self.level <= level:
            words = [str(arg) for arg in args]
            for output in self.output_formats:
                if isinstance(output, OutputFormat):
                    output.write_line(" ".join(words))
                elif isinstance(output, sb3.SeqWriter):
                    output.write_sequence(words)

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
            for output in self.output_formats:
                if isinstance(output, OutputFormat):
                    output.mark_failed(reason)

    def close(self) -> None:
        """Close every output format once; later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        _lifecycle.unregister(self)
        for output in self.output_formats:
            output.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.mark_failed(exc_type.__name__)
        self.close()


def _for_output(row: Row, excluded: dict[str, tuple[str, ...]], name: str) -> Row:
    if not any(name in names for names in excluded.values()):
        return row
    values = {key: value for key, value in row.values.items() if name not in excluded[key]}
    return Row(step=row.step, timestamp=row.timestamp, seq=row.seq, values=values)
