"""The base class of tracklog's output formats."""

from __future__ import annotations

import time
from typing import Any

from stable_baselines3.common.logger import KVWriter, SeqWriter

from tracklog._row import Row
from tracklog.values import LogValue, check_key, normalise

__all__ = ["OutputFormat"]


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

    def write_line(self, line: str) -> None:
        """Show one text line from ``info()``/``warn()``/…; ignored unless overridden."""

    def close(self) -> None:
        """Release files or runs; called once by ``Logger.close()``."""

    def mark_failed(self, reason: str) -> None:
        """Training is ending through an exception (``reason`` names it); ``close()`` follows.

        Formats that hold a run record the failure (MLflow status FAILED); others ignore it.
        """

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
