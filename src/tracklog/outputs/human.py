"""``FixedHumanOutputFormat``: SB3's table, fixed, on the console or in ``train.log``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from tracklog._row import Row
from tracklog.convert.text import one_line, to_text
from tracklog.outputs._base import OutputFormat

__all__ = ["FixedHumanOutputFormat", "render_table", "shorten"]

_INDENT = "   "
# The longest number format_number writes ("-1.235e+308", "123456789012"). A value
# column is never narrower, because a number cut in the middle reads as another number.
_NUMBER_WIDTH = 12


def shorten(text: str, max_length: int) -> str:
    """``text`` cut in the middle to ``max_length`` characters, keeping both ends."""
    if len(text) <= max_length:
        return text
    tail = (max_length - 3) // 2
    head = max_length - 3 - tail
    return f"{text[:head]}...{text[len(text) - tail :]}"


def _unique(text: str, taken: set[str], max_length: int) -> str:
    """``text``, or ``text`` with a ``~n`` suffix if a row already shows it; marks it taken.

    Trailing spaces are invisible in the padded table, so ``"a"`` and ``"a "`` count as
    the same text.
    """
    candidate, n = text, 1
    while candidate.rstrip() in taken:
        n += 1
        suffix = f"~{n}"
        candidate = shorten(text, max_length - len(suffix)) + suffix
    taken.add(candidate.rstrip())
    return candidate


def _split_tag(key: str) -> tuple[str, str]:
    cut = key.find("/")
    if cut > 0 and cut < len(key) - 1:
        return key[: cut + 1], key[cut + 1 :]
    return "", key


def render_table(cells: dict[str, str], max_length: int) -> list[str]:
    """SB3's table: keys sorted and grouped under their first ``tag/``.

    Keys and values longer than ``max_length`` are shortened in the middle (values
    only beyond 12 characters, so numbers are never cut); two keys never end up showing
    the same text (a ``~2`` suffix tells them apart).
    """
    rows: list[tuple[str, str]] = []
    taken: set[str] = set()
    current_tag: str | None = None
    for key in sorted(cells):
        tag, rest = _split_tag(key)
        if tag and tag != current_tag:
            shown_tag = _unique(shorten(one_line(tag), max_length), taken, max_length)
            rows.append((shown_tag, ""))
        current_tag = tag or None
        shown = (
            _INDENT + shorten(one_line(rest), max_length - len(_INDENT))
            if tag
            else shorten(one_line(key), max_length)
        )
        shown = _unique(shown, taken, max_length)
        rows.append((shown, shorten(cells[key], max(max_length, _NUMBER_WIDTH))))
    if not rows:
        return []
    key_width = max(len(key) for key, _ in rows)
    value_width = max(len(value) for _, value in rows)
    dashes = "-" * (key_width + value_width + 7)
    lines = [dashes]
    lines.extend(f"| {key.ljust(key_width)} | {value.ljust(value_width)} |" for key, value in rows)
    lines.append(dashes)
    return lines


class FixedHumanOutputFormat(OutputFormat):
    """The table SB3 prints, without SB3's failure modes.

    Writes to a stream (the console: ``name="stdout"``) or appends to a file
    (``train.log``: ``name="log"``; a resumed run appends, never truncates). Media show
    as one-line summaries such as ``<video 1x100x3x64x64 @30fps>`` instead of raising.
    """

    def __init__(
        self,
        target: TextIO | str | Path | None = None,
        *,
        max_length: int = 36,
        name: str | None = None,
    ) -> None:
        """``target``: a path (appended to), a stream, or None for the current ``sys.stdout``."""
        self.max_length = max_length
        self._path: Path | None = None
        self._stream: TextIO | None = None
        self._closed = False
        if target is None or not isinstance(target, str | Path):
            self._stream = target
            self.name = name or "stdout"
        else:
            self._path = Path(target)
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._stream = open(self._path, "a", encoding="utf-8")  # noqa: SIM115  # owned until close()
            self.name = name or "log"

    @property
    def _out(self) -> TextIO:
        # Looked up on every write so pytest's capsys and contextlib.redirect_stdout work.
        return self._stream if self._stream is not None else sys.stdout

    def write_row(self, row: Row) -> None:
        lines = render_table(
            {key: to_text(value) for key, value in row.values.items()}, self.max_length
        )
        if lines:
            self._emit("\n".join(lines) + "\n")

    def write_line(self, line: str) -> None:
        self._emit(line + "\n")

    def _emit(self, text: str) -> None:
        if self._closed:
            return
        out = self._out
        tqdm = sys.modules.get("tqdm")
        if self._stream is None and tqdm is not None:
            tqdm.tqdm.write(text, file=out, end="")  # keeps an active progress bar intact
        else:
            out.write(text)
        out.flush()

    def close(self) -> None:
        if self._path is not None and self._stream is not None and not self._closed:
            self._stream.close()
        self._closed = True
