"""Keeping one failing output from taking the others, or training, down with it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

__all__ = ["Isolation"]

_log = logging.getLogger("tracklog")


def _name(output: object) -> str:
    name = getattr(output, "name", "")
    return f"{type(output).__name__}({name})" if name else type(output).__name__


class Isolation:
    """Runs output calls one by one; a call that raises does not stop the others.

    Each failing output is reported once on the ``tracklog`` logger with its traceback,
    then counted; ``summary()`` reports the counts. With ``strict``, the first error is
    raised again once every output has had its turn. ``KeyboardInterrupt`` and other
    ``BaseException``s are always raised again, also after the other outputs ran.
    """

    def __init__(self, *, strict: bool = False) -> None:
        self.strict = strict
        self.failures: dict[str, int] = {}
        self._lock = threading.Lock()  # background workers report here too

    def run(self, calls: list[tuple[object, Callable[[], None]]]) -> None:
        """Call each ``(output, call)`` in order, isolating failures."""
        first_error: Exception | None = None
        interrupt: BaseException | None = None
        for output, call in calls:
            try:
                call()
            except Exception as error:
                self.report(output, error)
                first_error = first_error or error
            except BaseException as error:  # Ctrl-C: let the other outputs finish first
                interrupt = interrupt or error
        if interrupt is not None:
            raise interrupt
        if self.strict and first_error is not None:
            raise first_error

    def report(self, output: object, error: Exception) -> None:
        """Report ``error`` of ``output``: with its traceback the first time, then counted."""
        name = _name(output)
        with self._lock:
            count = self.failures.get(name, 0) + 1
            self.failures[name] = count
        if count == 1:
            _log.error(
                "tracklog output %s failed; the other outputs keep logging "
                "(further failures of this output are only counted)",
                name,
                exc_info=error,
            )

    def summary(self) -> None:
        """Report how often each output failed (called at close)."""
        for name, count in self.failures.items():
            if count > 1:
                _log.error("tracklog output %s failed %d times in all", name, count)
