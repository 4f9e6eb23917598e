"""The snapshot one ``dump(step)`` hands to every output format."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from tracklog.values import LogValue

__all__ = ["Row"]


def _new_memo() -> dict[object, object]:
    return {}


@dataclass(frozen=True, slots=True)
class Row:
    """The values of one dump, already filtered by ``exclude`` for the output receiving it.

    ``seq`` numbers the logger's dumps from 0, so formats sharing work (media files)
    can tell two dumps at the same ``step`` apart.
    """

    step: int
    timestamp: float
    seq: int
    values: Mapping[str, LogValue]
    #: Work that formats receiving this very row can share (the console and train.log
    #: render one table). Keys name the work, e.g. ``("table", 36)``.
    memo: dict[object, object] = field(default_factory=_new_memo, compare=False, repr=False)
