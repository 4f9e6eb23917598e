"""``FixedHumanOutputFormat``: SB3's table, fixed, on the console or in ``train.log``."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import TextIO

from tracklog._row import Row
from tracklog.convert.text import one_line, to_text
from tracklog.outputs._base import OutputFormat
from tracklog.values import Scalar

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


@functools.lru_cache(maxsize=32)
def _layout(keys: tuple[str, ...], max_length: int) -> tuple[tuple[str, str | None], ...]:
    """The key column for sorted ``keys``: (shown text, key) rows, key None for tag rows.

    Cached: an RL run dumps the same keys over and over, so the layout is worked out
    once and each dump only formats its values.
    """
    rows: list[tuple[str, str | None]] = []
    taken: set[str] = set()
    current_tag: str | None = None
    for key in keys:
        tag, rest = _split_tag(key)
        if tag and tag != current_tag:
            rows.append((_unique(shorten(one_line(tag), max_length), taken, max_length), None))
        current_tag = tag or None
        shown = (
            _INDENT + shorten(one_line(rest), max_length - len(_INDENT))
            if tag
            else shorten(one_line(key), max_length)
        )
        rows.append((_unique(shown, taken, max_length), key))
    return tuple(rows)


def render_table(cells: dict[str, str], max_length: int) -> list[str]:
    """SB3's table: keys sorted and grouped under their first ``tag/``.

    Keys and values longer than ``max_length`` are shortened in the middle (values
    only beyond 12 characters, so numbers are never cut); two keys never end up showing
    the same text (a ``~2`` suffix tells them apart).
    """
    if not cells:
        return []
    value_length = max(max_length, _NUMBER_WIDTH)
    order, prefixes = _plan(tuple(cells), max_length)
    values = [
        ""
        if key is None
        else text
        if len(text := cells[key]) <= value_length
        else shorten(text, value_length)
        for key in order
    ]
    value_width = max(map(len, values))
    dashes = "-" * (len(prefixes[0]) + value_width + 2)  # as long as every line
    lines = [dashes]
    lines.extend(
        prefix + value.ljust(value_width) + " |"
        for prefix, value in zip(prefixes, values, strict=True)
    )
    lines.append(dashes)
    return lines


@functools.lru_cache(maxsize=32)
def _plan(keys: tuple[str, ...], max_length: int) -> tuple[tuple[str | None, ...], tuple[str, ...]]:
    """For ``keys`` in the order they were dumped: the table's rows as keys (None for a
    tag row), sorted and grouped, and each row's ``"| key<padding> | "``. Worked out
    once per set of keys, so a dump only formats and pads its values."""
    layout = _layout(tuple(sorted(keys)), max_length)
    key_width = max(len(shown) for shown, _ in layout)
    prefixes = tuple(f"| {shown.ljust(key_width)} | " for shown, _ in layout)
    return tuple(key for _, key in layout), prefixes


def _render_row(row: Row, max_length: int) -> str:
    # The console and train.log usually get the very same row: render it once for both.
    memo_key = ("table", max_length)
    text = row.memo.get(memo_key)
    if not isinstance(text, str):
        # Floats are nearly every cell of an RL table: formatted here without dispatch.
        cells = {
            key: f"{value.value:.4g}"
            if type(value) is Scalar and type(value.value) is float
            else to_text(value)
            for key, value in row.values.items()
        }
        lines = render_table(cells, max_length)
        text = row.memo[memo_key] = "\n".join(lines) + "\n" if lines else ""
    return text


def _progress_bars() -> bool:
    """Whether a tqdm progress bar may be on screen (SB3's ``progress_bar=True``).

    Printed through ``tqdm.write`` then, which clears and redraws the bars; with none,
    that is a plain write under a lock and a generator, a tenth of a dump's time.
    """
    tqdm = sys.modules.get("tqdm")
    if tqdm is None:
        return False
    bars = getattr(getattr(tqdm, "tqdm", None), "_instances", None)  # every open bar
    return bars is None or len(bars) > 0


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
        text = _render_row(row, self.max_length)
        if text:
            self._emit(text)

    def write_line(self, line: str) -> None:
        self._emit(line + "\n")

    def _emit(self, text: str) -> None:
        if self._closed:
            return
        out = self._out
        if self._stream is None and _progress_bars():
            sys.modules["tqdm"].tqdm.write(text, file=out, end="")  # keeps the bars intact
        else:
            out.write(text)
        out.flush()

    def close(self) -> None:
        if self._path is not None and self._stream is not None and not self._closed:
            self._stream.close()
        self._closed = True
