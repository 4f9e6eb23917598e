"""A row's numbers as text, made once per dump and shared by JSONL, CSV and the queue.

Formatting floats is most of what a dump of scalars costs, and JSONL, CSV and the
queue each used to ``repr`` every float of the row again. Here each float is formatted
once per row (memoised on it): ``float_reprs`` for CSV, and ``float_pairs``, the
compact JSON member ``"key":number`` that JSONL and the queue both join into their
objects. Each key's JSON string is kept across dumps, since an RL run logs the same
keys every time. The text is exactly what ``json`` writes with ``separators=(",",
":")`` and ``ensure_ascii=False``: the shortest round-trip ``repr`` for floats
(bit-exact when read back) and ``NaN``/``Infinity``/``-Infinity`` for the values JSON
has no number for.
"""

from __future__ import annotations

from json.encoder import encode_basestring  # json's C speed-up where it exists
from typing import Final, cast

from tracklog._row import Row
from tracklog.values import Scalar

__all__ = ["float_pairs", "float_reprs", "json_float", "member"]

_NONFINITE: Final = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_KEY_CACHE_SIZE: Final = 4096
_members: dict[str, str] = {}


def member(key: str) -> str:
    """``"key":`` with ``key`` as a JSON string: the start of its object member."""
    text = _members.get(key)
    if text is None:
        if len(_members) >= _KEY_CACHE_SIZE:  # a run inventing keys: stay bounded
            _members.clear()
        text = _members[key] = encode_basestring(key) + ":"
    return text


def json_float(text: str) -> str:
    """The JSON for a float whose ``repr`` is ``text``."""
    return text if text[-1] not in "nf" else _NONFINITE[text]


def float_reprs(row: Row) -> dict[str, str]:
    """``repr`` of every float scalar of ``row``, by key; worked out once per row."""
    reprs = row.memo.get("reprs")
    if reprs is None:
        reprs = row.memo["reprs"] = {
            key: repr(value.value)
            for key, value in row.values.items()
            if type(value) is Scalar and type(value.value) is float
        }
    return cast(dict[str, str], reprs)


def float_pairs(row: Row) -> dict[str, str]:
    """``"key":number`` for every float scalar of ``row``, by key; once per row."""
    pairs = row.memo.get("pairs")
    if pairs is None:
        known = _members.get
        # member() and json_float() inlined: two calls fewer per float of every dump.
        pairs = row.memo["pairs"] = {
            key: (known(key) or member(key)) + (text if text[-1] not in "nf" else _NONFINITE[text])
            for key, text in float_reprs(row).items()
        }
    return cast(dict[str, str], pairs)
