"""Closing loggers when the process ends, and telling them whether training failed.

``atexit`` closes every logger still open. The registry holds loggers weakly: one its
owner dropped without closing is finalised by the garbage collector, which queues the
end of its runs for the delivery process without waiting. A forked child's copies of
its parent's loggers are marked closed at fork: the child never writes to or closes
its parent's runs. If the interpreter is ending through an uncaught
exception (``sys.last_exc``, set before atexit runs even when another library replaced
``sys.excepthook``), those loggers close as failed: MLflow FAILED (KILLED for Ctrl-C),
W&B exit code 1 (130). An uncaught ``SystemExit`` is not visible here: ``sys.exit(1)``
outside a ``with build_logger(...)`` block closes as finished.

SIGTERM (SLURM preemption, ``kill``, Kubernetes) ends a Python process at once by
default, without atexit. Unless the program installed its own handler, tracklog
installs one: it marks every open logger as killed and raises ``SystemExit(143)``, so
``with`` blocks and atexit close the loggers (flushing within ``close_timeout``). A
signal that arrives inside ``dump()`` or ``close()`` is held until that call returns,
so the row being written is not cut in half.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
import weakref
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tracklog._logger import Logger

__all__ = ["critical", "register", "unregister"]

_open: weakref.WeakValueDictionary[int, Logger] = weakref.WeakValueDictionary()
_installed = False
_lock = threading.Lock()
_depth = 0  # critical sections the main thread is in
_held: int | None = None  # a signal held until the critical section ends
SIGTERM_EXIT = 128 + signal.SIGTERM


def register(logger: Logger, *, handle_sigterm: bool = True) -> None:
    """Close ``logger`` at exit if its owner did not; install the SIGTERM handler."""
    global _installed
    with _lock:
        _open[id(logger)] = logger
        if not _installed:
            _installed = True
            atexit.register(_close_all)
    if handle_sigterm:
        _install_sigterm()


def _install_sigterm() -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread
    with contextlib.suppress(ValueError):
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    global _held
    if _depth > 0:
        _held = signum  # inside a logger call: act when it returns
        return
    _terminate()


def _terminate() -> None:
    with _lock:
        loggers = list(_open.values())
    for logger in loggers:
        logger.mark_failed("SIGTERM")
    raise SystemExit(SIGTERM_EXIT)


class _Critical:
    """``with critical():`` holds SIGTERM's ``SystemExit`` until the block ends.

    A class rather than a generator-based context manager: ``dump()`` enters one per
    call, and this costs a tenth as much.
    """

    __slots__ = ()

    def __enter__(self) -> None:
        global _depth
        if threading.current_thread() is threading.main_thread():
            _depth += 1

    def __exit__(self, *exc_info: object) -> None:
        global _depth, _held
        if threading.current_thread() is not threading.main_thread():
            return
        _depth -= 1
        if _depth == 0 and _held is not None:
            _held = None
            _terminate()


_CRITICAL = _Critical()


def critical() -> _Critical:
    """Hold SIGTERM's ``SystemExit`` until the block ends (main thread only)."""
    return _CRITICAL


def _after_fork_in_child() -> None:
    global _lock, _depth, _held
    _lock = threading.Lock()
    _depth, _held = 0, None
    for logger in list(_open.values()):
        logger._forked()  # pyright: ignore[reportPrivateUsage]  # tracklog-internal fork hook
    _open.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


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
