"""Closing loggers when the process ends, and telling them whether training failed.

``atexit`` closes every logger still open (also one its owner dropped without
closing: the registry holds it). If the interpreter is ending through an uncaught
exception (``sys.last_exc``, set before atexit runs even when another library replaced
``sys.excepthook``), those loggers close as failed: MLflow FAILED (KILLED for Ctrl-C),
W&B exit code 1 (130). An uncaught ``SystemExit`` is not visible here: ``sys.exit(1)``
outside a ``with build_logger(...)`` block closes as finished.
"""

from __future__ import annotations

import atexit
import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tracklog._logger import Logger

__all__ = ["register", "unregister"]

_open: dict[int, Logger] = {}
_installed = False
_lock = threading.Lock()


def register(logger: Logger) -> None:
    """Close ``logger`` at exit if its owner did not."""
    global _installed
    with _lock:
        _open[id(logger)] = logger
        if not _installed:
            _installed = True
            atexit.register(_close_all)


def unregister(logger: Logger) -> None:
    with _lock:
        _open.pop(id(logger), None)


def _uncaught() -> BaseException | None:
    error = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    return error if isinstance(error, BaseException) else None


def _close_all() -> None:
    error = _uncaught()
    with _lock:
        loggers = list(_open.values())
    for logger in loggers:
        if error is not None:
            logger.mark_failed(type(error).__name__)
        logger.close()
