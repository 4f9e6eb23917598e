"""The base class of tracklog's output formats."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tracklog._row import Row
from tracklog._sb3 import KVWriter, SeqWriter
from tracklog.values import LogValue, check_key, normalise

__all__ = ["OutputFormat", "PartlyWritten", "write_each"]


class PartlyWritten(Exception):
    """``write_rows`` wrote its first ``written`` rows (they are in the backend), then the
    next row failed with ``error``: the caller must not send those rows again."""

    def __init__(self, written: int, error: Exception) -> None:
        super().__init__(f"{written} row(s) written, then {type(error).__name__}: {error}")
        self.written = written
        self.error = error


def write_each(rows: list[Row], write: Callable[[Row], None]) -> None:
    """``write`` each row in order; a failure after the first row raises
    :class:`PartlyWritten`, naming how many rows were written before it."""
    for index, row in enumerate(rows):
        try:
            write(row)
        except Exception as error:
            if index == 0:
                raise
            raise PartlyWritten(index, error) from error


class OutputFormat(KVWriter, SeqWriter):
    """A destination for dumped rows and ``info()`` lines.

    Subclasses implement :meth:`write_row` (and :meth:`write_line` if they show text
    lines) and :meth:`close`. ``name`` is what ``exclude=`` refers to.

    It is also an SB3 ``KVWriter``/``SeqWriter``, so a tracklog format works inside
    SB3's own ``Logger`` too: :meth:`write` normalises SB3's raw dict first.
    """

    name: str = ""

    def write_row(self, row: Row) -> None:
        """Write one dump; ``row.values`` holds only keys not excluded for ``name``."""
        raise NotImplementedError

    def write_rows(self, rows: list[Row]) -> None:
        """Write several consecutive dumps; formats that can send them together override it.

        The delivery process hands over a backlog this way. If a row fails after
        earlier rows of the call were written, raise :class:`PartlyWritten` (as this
        loop does): the rows before it are then never sent again. A call may be repeated
        with rows it had sent when it raised anything else, after an error
        :meth:`is_transient` accepts or to send the rows one at a time after one it
        does not, so an override that sends rows together must not send anything twice.
        """
        write_each(rows, self.write_row)

    def write_line(self, line: str) -> None:
        """Show one text line from ``info()``/``warn()``/…; ignored unless overridden."""

    def flush(self) -> None:
        """Make every row written so far readable with the backend's own reader, for
        ``logger.flush()``; formats whose writes are readable at once need nothing."""

    def close(self) -> None:
        """Release files or runs; called once by ``Logger.close()``."""

    def mark_failed(self, reason: str) -> None:
        """Training is ending through an exception (``reason`` names it); ``close()`` follows.

        Formats that hold a run record the failure (MLflow status FAILED); others ignore it.
        """

    def check_row(self, row: Row) -> None:
        """A cheap check on the training thread, for an output whose writing happens
        elsewhere (in the delivery process), so its warnings belong to the ``dump()``
        that caused them (a key the backend renames)."""

    def is_transient(self, error: Exception) -> bool:
        """Whether ``error`` (raised by a write) means "try again later": the backend is
        down, overloaded or slow. The delivery process then retries the same call with
        backoff. Other errors are reported and that row is skipped for this output."""
        return False

    # SB3 interface ---------------------------------------------------------------
    _sb3_seq: int = 0

    def write(
        self, key_values: dict[str, Any], key_excluded: dict[str, tuple[str, ...]], step: int = 0
    ) -> None:
        values: dict[str, LogValue] = {
            key: normalise(check_key(key), value)
            for key, value in key_values.items()
            if self.name not in (key_excluded.get(key) or ())
        }
        self._sb3_seq += 1
        self.write_row(Row(step=step, timestamp=time.time(), seq=self._sb3_seq, values=values))

    def write_sequence(self, sequence: list[str]) -> None:
        self.write_line(" ".join(sequence))
