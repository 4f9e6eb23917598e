"""``JsonlOutputFormat``: one flat JSON object per dump."""

from __future__ import annotations

import json
from pathlib import Path

from tracklog._jsontext import float_pairs, json_float, member
from tracklog._media import MediaStore
from tracklog._row import Row
from tracklog.convert.files import row_cells
from tracklog.outputs._append import open_for_append
from tracklog.outputs._base import OutputFormat

__all__ = ["JsonlOutputFormat"]

# One encoder for every row: json.dumps with options builds a new one per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=True, separators=(",", ":"))
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
        # json.dumps({"_step": …, "_timestamp": …, **cells}) with compact separators,
        # its floats formatted once per row for JSONL, CSV and the queue (_jsontext).
        pairs = float_pairs(row)
        cells = row_cells(row, self._media)
        head = f'{{"_step":{row.step},"_timestamp":{json_float(repr(row.timestamp))}'
        if len(pairs) == len(cells):  # every cell a float: a training loop's row
            body = ",".join(pairs.values())
        else:
            body = ",".join(
                pairs.get(key) or member(key) + _ENCODER.encode(cell) for key, cell in cells.items()
            )
        line = f"{head},{body}}}" if body else head + "}"
        if not line.isascii():
            line = line.translate(_LINE_BREAKS)
        self._file.write(line + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
