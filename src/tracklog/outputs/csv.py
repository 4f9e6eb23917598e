"""``CsvOutputFormat``: one CSV row per dump, a column for every key ever seen."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from tracklog._media import MediaStore
from tracklog._row import Row
from tracklog.convert.files import Cell, to_cell
from tracklog.outputs._base import OutputFormat

__all__ = ["CsvOutputFormat"]

_RESERVED = ("_step", "_timestamp")


def _field(cell: Cell) -> str:
    # repr keeps float64 exact and spells non-finite values nan/inf/-inf, which
    # pandas.read_csv parses as floats.
    return repr(cell) if isinstance(cell, float) else str(cell)


class CsvOutputFormat(OutputFormat):
    """Appends rows to ``path`` under a header of ``_step``, ``_timestamp`` and every key seen.

    A key that first appears in a later dump gets its own column: the file is rewritten
    once with the wider header (atomically, via a temporary file). A resumed run reads
    the existing header and keeps appending. A missing value is an empty field.
    """

    name = "csv"

    def __init__(self, path: str | Path, *, media: MediaStore | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._media = media or MediaStore(self.path.parent)
        self._keys: list[str] = []
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, newline="", encoding="utf-8") as existing:
                header = next(csv.reader(existing), [])
            self._keys = [key for key in header if key not in _RESERVED]
        self._key_set = set(self._keys)
        self._file = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115  # owned until close()
        self._writer = csv.writer(self._file)
        if not self._keys and self._file.tell() == 0:
            self._writer.writerow(_RESERVED)

    def write_row(self, row: Row) -> None:
        cells = {key: to_cell(key, value, row, self._media) for key, value in row.values.items()}
        new_keys = [key for key in cells if key not in self._key_set]
        if new_keys:
            self._widen(new_keys)
        fields = [str(row.step), repr(row.timestamp)]
        fields.extend(_field(cells[key]) if key in cells else "" for key in self._keys)
        self._writer.writerow(fields)
        self._file.flush()

    def _widen(self, new_keys: list[str]) -> None:
        """Rewrite the file with ``new_keys`` appended to the header; old rows get empty fields."""
        self._file.close()
        with open(self.path, newline="", encoding="utf-8") as old:
            rows = list(csv.reader(old))[1:]
        self._keys.extend(new_keys)
        self._key_set.update(new_keys)
        temporary = self.path.with_name(self.path.name + ".tmp")
        with open(temporary, "w", newline="", encoding="utf-8") as new:
            writer = csv.writer(new)
            writer.writerow([*_RESERVED, *self._keys])
            padding = [""] * len(new_keys)
            writer.writerows(row + padding for row in rows)
            new.flush()
            os.fsync(new.fileno())
        os.replace(temporary, self.path)
        self._file = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115  # owned until close()
        self._writer = csv.writer(self._file)

    def close(self) -> None:
        self._file.close()
