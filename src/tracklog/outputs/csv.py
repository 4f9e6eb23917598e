"""``CsvOutputFormat``: one CSV row per dump, a column for every key ever seen."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from tracklog._jsontext import float_reprs
from tracklog._media import MediaStore
from tracklog._row import Row
from tracklog.convert.files import row_cells
from tracklog.outputs._append import open_for_append
from tracklog.outputs._base import OutputFormat

__all__ = ["CsvOutputFormat"]

_RESERVED = ("_step", "_timestamp")


class CsvOutputFormat(OutputFormat):
    """Appends rows to ``path`` under a header of ``_step``, ``_timestamp`` and every key seen.

    A key that first appears in a later dump gets its own column: the file is rewritten
    once with the wider header (atomically, via a temporary file). A resumed run reads
    the existing header and keeps appending. A missing value is an empty field.
    """

    name = "csv"

    def __init__(self, path: str | Path, *, media: MediaStore | None = None) -> None:
        self.path = Path(path)
        self._media = media or MediaStore(self.path.parent)
        self._keys: list[str] = self._existing_keys()
        self._key_set = set(self._keys)
        self._file = open_for_append(self.path, newline="")
        self._writer = csv.writer(self._file)
        if self._file.tell() == 0:
            self._writer.writerow(_RESERVED)

    def _existing_keys(self) -> list[str]:
        """The keys of a file a resumed run appends to; refuses a file that is not ours."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return []
        with open(self.path, newline="", encoding="utf-8") as existing:
            no_header: list[str] = []
            header = next(csv.reader(existing), no_header)
        if tuple(header[:2]) != _RESERVED:
            raise ValueError(
                f"{self.path} exists but is not a tracklog CSV file (its header starts "
                f"{header[:3]}; tracklog's starts {list(_RESERVED)}, so it would not "
                "continue it but mix two layouts). If it is SB3's own progress.csv of an "
                "earlier run, move it away or log to another folder; otherwise choose "
                "another path or run_dir"
            )
        return header[2:]

    def write_row(self, row: Row) -> None:
        cells = row_cells(row, self._media)
        new_keys = [key for key in cells if key not in self._key_set]
        if new_keys:
            self._widen(new_keys)
        fields = [str(row.step), repr(row.timestamp)]
        # repr keeps float64 exact and spells non-finite values nan/inf/-inf, which
        # pandas.read_csv parses as floats (formatted once per row, for JSONL and the
        # queue too). A missing value is an empty field.
        reprs = float_reprs(row)
        fields.extend(
            ""
            if (cell := cells.get(key)) is None
            else reprs[key]
            if type(cell) is float
            else str(cell)
            for key in self._keys
        )
        self._writer.writerow(fields)
        self._file.flush()

    def _widen(self, new_keys: list[str]) -> None:
        """Rewrite the file with ``new_keys`` appended to the header; old rows get empty fields.

        The wider file is written next to the old one and swapped in with ``os.replace``,
        so an error or an interrupt part-way leaves the old file and this format intact.
        """
        self._file.flush()
        keys = [*self._keys, *new_keys]
        temporary = self.path.with_name(self.path.name + ".tmp")
        try:
            with (
                open(self.path, newline="", encoding="utf-8") as old,
                open(temporary, "w", newline="", encoding="utf-8") as new,
            ):
                rows = csv.reader(old)
                next(rows, None)
                writer = csv.writer(new)
                writer.writerow([*_RESERVED, *keys])
                padding = [""] * len(new_keys)
                writer.writerows(row + padding for row in rows)
                new.flush()
                os.fsync(new.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        self._file.close()
        self._keys = keys
        self._key_set.update(new_keys)
        self._file = open_for_append(self.path, newline="")
        self._writer = csv.writer(self._file)

    def close(self) -> None:
        self._file.close()
