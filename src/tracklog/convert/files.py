"""Values as JSONL/CSV cells: numbers and text inline, media as files under ``media/``,
checkpoints as their folder under ``checkpoints/``."""

from __future__ import annotations

from typing import TypeAlias, assert_never, cast

from tracklog import _encode
from tracklog._media import MediaStore
from tracklog._row import Row
from tracklog.values import (
    Checkpoint,
    Figure,
    Histogram,
    HParam,
    Image,
    LogValue,
    Scalar,
    Text,
    Video,
)

__all__ = ["Cell", "row_cells", "to_cell"]

Cell: TypeAlias = bool | int | float | str
"""A JSONL value or CSV field; media cells are paths relative to ``run_dir``."""


def to_cell(key: str, value: LogValue, row: Row, media: MediaStore) -> Cell:
    """The cell for ``value``; writes its media file (once per dump) when it has one."""
    match value:
        case Scalar(value=number):
            return number
        case Text(value=text):
            return text
        case Histogram():
            return media.save(row.seq, row.step, key, "npy", lambda: _encode.npy(value))
        case Image():
            return media.save(
                row.seq, row.step, key, "png", lambda: _encode.png(value), background=True
            )
        case Figure():
            return media.save(row.seq, row.step, key, "png", lambda: value.png)
        case Video():
            return media.save(
                row.seq, row.step, key, "mp4", lambda: _encode.mp4(value), background=True
            )
        case HParam():
            return media.save(row.seq, row.step, key, "json", lambda: _encode.hparam_json(value))
        case Checkpoint():
            return value.stored or str(value.path)
        case _:
            assert_never(value)


def row_cells(row: Row, media: MediaStore) -> dict[str, Cell]:
    """Every cell of ``row``; computed once for all formats sharing ``media`` (JSONL, CSV)."""
    memo_key = ("cells", id(media))
    cells = row.memo.get(memo_key)
    if cells is None:
        cells = row.memo[memo_key] = {
            key: value.value if type(value) is Scalar else to_cell(key, value, row, media)
            for key, value in row.values.items()
        }
    return cast(dict[str, Cell], cells)
