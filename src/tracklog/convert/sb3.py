"""Values as SB3's own ``Logger`` would have held them, for SB3-style ``KVWriter`` formats."""

from __future__ import annotations

from typing import assert_never

from tracklog.values import Figure, Histogram, HParam, Image, LogValue, Scalar, Text, Video

__all__ = ["to_sb3"]


def to_sb3(value: LogValue) -> object:
    """A plain number, str or numpy array; media stay themselves (they subclass SB3's classes)."""
    match value:
        case Scalar(value=number):
            return number
        case Text(value=text):
            return text
        case Histogram(values=values):
            return values
        case Image() | Figure() | Video() | HParam():
            return value
        case _:
            assert_never(value)
