"""``JsonlOutputFormat``: one flat JSON object per dump."""

from __future__ import annotations

import json
from pathlib import Path

from tracklog._media import MediaStore
from tracklog._row import Row
from tracklog.convert.files import row_cells
from tracklog.outputs._append import open_for_append
from tracklog.outputs._base import OutputFormat

__all__ = ["JsonlOutputFormat"]

# One encoder for every row: json.dumps with options builds a new one per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=True)
# Valid raw inside a JSON string, but str.splitlines() and some JSON Lines readers end
# a line there: escaped, so one row is always one line (json.loads gives them back).
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


class JsonlOutputFormat(OutputFormat):
    """Appends ``{"_step": …, "_timestamp": …, key: value, …}`` lines to ``path``.

    Floats are written with Python's shortest round-trip repr, so float64 values
    read back bit-exact; NaN and ±inf are written as ``NaN``/``Infinity``/``-Infinity``,
    which ``json.loads`` and ``pandas.read_json`` read. Media values are files under
    ``<run_dir>/media/`` and the row holds their path relative to ``run_dir``.
    """

    name = "json"

    def __init__(self, path: str | Path, *, media: MediaStore | None = None) -> None:
        self.path = Path(path)
        self._media = media or MediaStore(self.path.parent)
        self._file = open_for_append(self.path)

    def write_row(self, row: Row) -> None:
        document: dict[str, object] = {"_step": row.step, "_timestamp": row.timestamp}
        document.update(row_cells(row, self._media))
        line = _ENCODER.encode(document)
        if not line.isascii():
            line = line.translate(_LINE_BREAKS)
        self._file.write(line + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
