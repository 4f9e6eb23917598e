"""Read tracklog's JSONL and CSV files back into typed rows.

These use only the standard library's ``json`` and ``csv`` modules, so what they
return is what any other tool reading the files would see.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["LoggedRow", "Value", "read_csv", "read_jsonl"]

Value = bool | int | float | str
"""A cell read back: a number, a text value, or a media path relative to the run directory."""


@dataclass(frozen=True, slots=True)
class LoggedRow:
    """One dump as written: its step, its Unix timestamp, and the keys it held."""

    step: int
    timestamp: float
    values: Mapping[str, Value]


def _row(document: Mapping[str, object], where: str) -> LoggedRow:
    step, timestamp = document.get("_step"), document.get("_timestamp")
    if isinstance(step, bool) or not isinstance(step, int):
        raise ValueError(f"{where}: _step must be an int, got {step!r}")
    if isinstance(timestamp, bool) or not isinstance(timestamp, int | float):
        raise ValueError(f"{where}: _timestamp must be a number, got {timestamp!r}")
    values: dict[str, Value] = {}
    for key, value in document.items():
        if key.startswith("_"):
            continue
        if not isinstance(value, bool | int | float | str):
            raise ValueError(f"{where}: {key!r} holds {type(value).__name__}, not a flat value")
        values[key] = value
    return LoggedRow(step=step, timestamp=float(timestamp), values=values)


def read_jsonl(path: str | os.PathLike[str]) -> list[LoggedRow]:
    """Every row of a tracklog JSONL file, in order (blank lines are skipped)."""
    rows = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if line.strip():
                document = json.loads(line)
                if not isinstance(document, dict):
                    raise ValueError(f"{os.fspath(path)}:{number}: not a JSON object")
                rows.append(_row(document, f"{os.fspath(path)}:{number}"))
    return rows


_INT = re.compile(r"[+-]?[0-9]+")


def parse_field(field: str) -> Value:
    """A CSV field as the value it was written from: bool, int, float, else str."""
    if field in ("True", "False"):
        return field == "True"
    if _INT.fullmatch(field):
        return int(field)
    try:
        return float(field)
    except ValueError:
        return field


def read_csv(path: str | os.PathLike[str]) -> list[LoggedRow]:
    """Every row of a tracklog CSV file; empty fields (keys absent from a dump) are left out.

    CSV has no types: a text value that looks like a number reads back as that number.
    Use JSONL where text values matter.
    """
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.reader(file)
        header = next(reader, [])
        rows = []
        for number, fields in enumerate(reader, start=2):
            document: dict[str, object] = {
                key: parse_field(field)
                for key, field in zip(header, fields, strict=True)
                if field != ""
            }
            rows.append(_row(document, f"{os.fspath(path)}:{number}"))
    return rows
