"""Closing loggers when the process ends, and telling them whether training failed.

``atexit`` closes every logger still open. A ``sys.excepthook`` wrapper notes an
uncaught exception first, so those loggers close as failed (MLflow: FAILED, or KILLED
for Ctrl-C) instead of FINISHED.
"""

from __future__ import annotations

import atexit
import sys
import threading
import weakref
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tracklog._logger import Logger

__all__ = ["register"]

_open: weakref.WeakSet[Logger] = weakref.WeakSet()
_failure: list[str] = []
_installed = False
_lock = threading.Lock()


def register(logger: Logger) -> None:
    """Close ``logger`` at exit if its owner did not; install the hooks on first use."""
    global _installed
    with _lock:
        _open.add(logger)
        if not _installed:
            _installed = True
            previous = sys.excepthook

            def excepthook(
                kind: type[BaseException], error: BaseException, traceback: TracebackType | None
            ) -> None:
                _failure.append(
                    "KeyboardInterrupt" if issubclass(kind, KeyboardInterrupt) else kind.__name__
                )
                previous(kind, error, traceback)

            sys.excepthook = excepthook
            atexit.register(_close_all)


def unregister(logger: Logger) -> None:
    _open.discard(logger)


def _close_all() -> None:
    for logger in list(_open):
        if _failure:
            logger.mark_failed(_failure[-1])
        logger.close()
