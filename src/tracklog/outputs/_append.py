"""Opening a line-oriented file to append to, as a resumed run does."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TextIO

__all__ = ["open_for_append"]


def _drop_partial_line(path: Path) -> None:
    """Cut a last line that a killed process left without its newline.

    Appending after it would glue the next row onto it and make the whole file
    unreadable; the partial line was never a complete row, so nothing is lost.
    """
    with open(path, "rb+") as file:
        size = file.seek(0, os.SEEK_END)
        if size == 0:
            return
        file.seek(size - 1)
        if file.read(1) == b"\n":
            return
        block = 1 << 16
        end = size
        while end > 0:
            start = max(0, end - block)
            file.seek(start)
            newline = file.read(end - start).rfind(b"\n")
            if newline >= 0:
                cut = start + newline + 1
                break
            end = start
        else:
            cut = 0
        file.truncate(cut)
    warnings.warn(
        f"{path}: removed an incomplete last line ({size - cut} bytes) left by an "
        "interrupted process before appending",
        stacklevel=3,
    )


def open_for_append(path: Path, *, newline: str | None = None) -> TextIO:
    """Open ``path`` (creating its folder) to append UTF-8 text after its last full line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        _drop_partial_line(path)
    return open(path, "a", encoding="utf-8", newline=newline)  # caller closes
