"""Values as the short strings of the human-readable table (console and ``train.log``)."""

from __future__ import annotations

from decimal import Decimal
from typing import assert_never

import numpy as np

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

__all__ = ["byte_size", "checkpoint_summary", "format_number", "one_line", "to_text"]

_ESCAPES = str.maketrans({"\n": "\\n", "\r": "\\r", "\t": "\\t", "\x00": "\\0"})


def one_line(text: str) -> str:
    """``text`` with line breaks, tabs and other unprintable characters escaped.

    A table row stays one line, and no control character (a vertical tab, U+2028, an
    ANSI escape sequence) can move the cursor or recolour the terminal.
    """
    text = text.translate(_ESCAPES)
    if text.isprintable():
        return text
    return "".join(
        char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
        for char in text
    )


def format_number(value: bool | int | float) -> str:
    """Up to 4 significant digits for floats; ints in full unless too long to read."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        if -(10**11) < value < 10**12:  # at most 12 characters
            return str(value)
        if abs(value) >= 2**1023:  # float() could overflow; Decimal formats any int
            return f"{Decimal(value):.4g}"
    return f"{value:.4g}"


def byte_size(size: int) -> str:
    """``size`` bytes for a reader: ``512 B``, ``1.5 KiB``, ``2.3 GiB``."""
    amount = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if amount < 1024 or unit == "TiB":
            return f"{size} B" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    raise AssertionError("unreachable")


_LISTED_FILES = 3


def checkpoint_summary(checkpoint: Checkpoint) -> str:
    """``model.zip, vecnormalize.pkl (1.2 MiB) [latest, best]``: a checkpoint in a line."""
    names = [name for name, _ in checkpoint.files]
    listed = ", ".join(names[:_LISTED_FILES])
    if len(names) > _LISTED_FILES:
        listed += f" and {len(names) - _LISTED_FILES} more"
    aliases = f" [{', '.join(checkpoint.aliases)}]" if checkpoint.aliases else ""
    return one_line(f"{listed} ({byte_size(checkpoint.size)}){aliases}")


def to_text(value: LogValue) -> str:
    """The table cell for ``value``: the number or text, or a one-line summary of media."""
    match value:
        case Scalar(value=number):
            return format_number(number)
        case Text(value=text):
            return one_line(text)
        case Histogram(values=values):
            mean = float(values.astype(np.float64).mean())
            return f"<histogram n={values.size} mean={format_number(mean)}>"
        case Image():
            n, h, w, c = value.shape
            return f"<image {n}x{h}x{w}x{c}>"
        case Figure():
            width, height = value.size
            return f"<figure {width}x{height}>"
        case Video():
            shape = "x".join(str(size) for size in value.shape)
            return f"<video {shape} @{value.fps:g}fps>"
        case HParam():
            return f"<hparam {len(value.flat())} params, {len(value.metric_dict)} metrics>"
        case Checkpoint():
            return f"<checkpoint {checkpoint_summary(value)}>"
        case _:
            assert_never(value)
