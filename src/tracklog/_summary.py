"""A run's summaries: per declared key, its min, max, mean, first, last or best value.

Kept on the training side from every row the logger writes (``dump`` and
``dump_rows``), so every output sees the same numbers. At ``close()`` they become rows
of ``<key>/<kind>`` metrics (each at the step it belongs to: the step of the minimum,
of the best value, of the last one) for MLflow and TensorBoard, and a closing table
for the console and ``train.log``; W&B computes its own from the same declaration
(``define_metric(summary=...)``). NaN values are left out of every summary; a key never
logged as a number has none.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, cast

from tracklog._row import Row
from tracklog.values import Scalar

__all__ = ["Summaries", "summary_metrics", "wandb_summaries"]

#: W&B's define_metric aggregations for each kind (W&B has no "best": min or max).
_WANDB: Final = {
    "min": "min",
    "max": "max",
    "mean": "mean",
    "first": "first",
    "last": "last",
    "best:max": "max",
    "best:min": "min",
}


def kinds_of(declared: str | Sequence[str]) -> list[str]:
    return [declared] if isinstance(declared, str) else list(declared)


def _metric(key: str, kind: str) -> str:
    """The metric a summary is written as at close: ``<key>/<kind>`` (``best:max``: best)."""
    return f"{key}/{kind.partition(':')[0]}"


def summary_metrics(summaries: Mapping[str, str | Sequence[str]]) -> list[str]:
    """The ``<key>/<kind>`` metric names the summaries are written as at close."""
    return [_metric(key, kind) for key, kinds in summaries.items() for kind in kinds_of(kinds)]


def wandb_summaries(summaries: Mapping[str, str | Sequence[str]]) -> dict[str, str]:
    """Per key, the ``summary=`` of W&B's ``define_metric`` ("min,max", ...)."""
    found: dict[str, str] = {}
    for key, declared in summaries.items():
        names = dict.fromkeys(_WANDB[kind] for kind in kinds_of(declared))
        found[key] = ",".join(names)
    return found


@dataclass
class _Key:
    kinds: list[str]
    count: int = 0
    total: float = 0.0
    first: tuple[float, int] | None = None
    last: tuple[float, int] | None = None
    low: tuple[float, int] | None = None  # the first step it was reached at
    high: tuple[float, int] | None = None

    def add(self, value: float, step: int) -> None:
        if math.isnan(value):
            return
        self.count += 1
        self.total += value
        if self.first is None:
            self.first = (value, step)
        self.last = (value, step)
        if self.low is None or value < self.low[0]:
            self.low = (value, step)
        if self.high is None or value > self.high[0]:
            self.high = (value, step)

    def state(self) -> dict[str, object]:
        """What :meth:`restore` takes back: plain JSON data."""
        return {
            "count": self.count,
            "total": self.total,
            **{
                name: list(point)
                for name, point in (
                    ("first", self.first),
                    ("last", self.last),
                    ("low", self.low),
                    ("high", self.high),
                )
                if point is not None
            },
        }

    def restore(self, state: Mapping[str, object]) -> None:
        """Continue from ``state`` (as :meth:`state` made it); ignored if it is not one."""
        count, total = state.get("count"), state.get("total")
        points = {name: _point(state.get(name)) for name in ("first", "last", "low", "high")}
        if type(count) is not int or count < 1 or not isinstance(total, int | float):
            return
        if any(point is None for point in points.values()):
            return
        self.count, self.total = count, float(total)
        self.first, self.last = points["first"], points["last"]
        self.low, self.high = points["low"], points["high"]

    def result(self, kind: str) -> tuple[float, int] | None:
        """The summary's value and the step it belongs to."""
        if self.count == 0 or self.last is None:
            return None
        match kind:
            case "min" | "best:min":
                return self.low
            case "max" | "best:max":
                return self.high
            case "first":
                return self.first
            case "last":
                return self.last
            case "mean":
                return (self.total / self.count, self.last[1])
            case _:
                raise ValueError(f"unknown summary {kind!r}")


def _point(raw: object) -> tuple[float, int] | None:
    if not isinstance(raw, list) or len(cast("list[object]", raw)) != 2:
        return None
    value, step = cast("list[object]", raw)
    if isinstance(value, bool) or not isinstance(value, int | float) or type(step) is not int:
        return None
    return float(value), step


@dataclass
class Summaries:
    """The summaries declared in the settings, updated from every row."""

    declared: Mapping[str, str | Sequence[str]]
    _keys: dict[str, _Key] = field(init=False)

    def __post_init__(self) -> None:
        self._keys = {key: _Key(kinds_of(kinds)) for key, kinds in self.declared.items()}

    def add(self, row: Row) -> None:
        self.add_values(row.values, row.step)

    def add_values(self, values: Mapping[str, object], step: int) -> None:
        """The declared keys' numbers among ``values``, logged at ``step``."""
        for key, state in self._keys.items():
            value = values.get(key)
            if isinstance(value, Scalar):
                state.add(float(value.value), step)

    def state(self) -> dict[str, dict[str, object]]:
        """Per key, what was seen so far (kept with each checkpoint; see :meth:`restore`)."""
        return {key: state.state() for key, state in self._keys.items() if state.count}

    def restore(self, state: Mapping[str, object]) -> None:
        """Continue from ``state``: a resumed run's summaries cover the rows logged up to
        the checkpoint it restarted from, not only its own."""
        for key, kept in state.items():
            if key in self._keys and isinstance(kept, dict):
                self._keys[key].restore(cast("dict[str, object]", kept))

    def rows(self) -> list[tuple[int, dict[str, float]]]:
        """``<key>/<kind>`` metrics, grouped by the step each belongs to."""
        by_step: dict[int, dict[str, float]] = {}
        for key, state in self._keys.items():
            for kind in state.kinds:
                found = state.result(kind)
                if found is not None:
                    by_step.setdefault(found[1], {})[_metric(key, kind)] = found[0]
        return sorted(by_step.items())

    def table(self) -> str:
        """The closing table: one line per key and summary ('' if nothing was logged)."""
        lines: list[tuple[str, str, str, str]] = []
        for key, state in self._keys.items():
            for kind in state.kinds:
                found = state.result(kind)
                if found is not None:
                    value, step = found
                    lines.append((key, kind, f"{value:.6g}", str(step)))
        if not lines:
            return ""
        header = ("key", "summary", "value", "at step")
        widths = [max(len(line[i]) for line in [header, *lines]) for i in range(4)]
        rendered = [
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
            for line in [header, *lines]
        ]
        return "summary of this run:\n" + "\n".join(rendered)
