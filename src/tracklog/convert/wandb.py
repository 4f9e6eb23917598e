"""Values as W&B receives them: history entries, config updates and summary updates."""

from __future__ import annotations

import html
import io
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias, assert_never

import numpy as np

from tracklog import _encode
from tracklog._names import NameMap
from tracklog.values import Figure, Histogram, HParam, Image, LogValue, Scalar, Text, Video

__all__ = [
    "STEP_KEY",
    "ConfigUpdate",
    "HistoryValue",
    "SummaryUpdate",
    "WandbItem",
    "to_wandb",
    "wandb_names",
]

STEP_KEY = "global_step"
"""The history column holding the dump's step; every chart uses it as its x axis."""

_HISTOGRAM_BINS = 64


@dataclass(frozen=True, slots=True)
class HistoryValue:
    """One entry of the dump's history row (``run.log``)."""

    name: str
    value: Any  # a number, a str, or a wandb media object


@dataclass(frozen=True, slots=True)
class ConfigUpdate:
    values: dict[str, bool | int | float | str | None]


@dataclass(frozen=True, slots=True)
class SummaryUpdate:
    values: dict[str, float]


WandbItem: TypeAlias = HistoryValue | ConfigUpdate | SummaryUpdate


def wandb_names() -> NameMap:
    """History keys: anything but tracklog's own step column is taken as it is."""
    return NameMap("W&B", lambda key: key != STEP_KEY, lambda key: key, 250)


def _pil(png: bytes) -> Any:
    from PIL import Image as PILImage

    picture = PILImage.open(io.BytesIO(png))
    picture.load()
    return picture


def _histogram(key: str, values: np.ndarray) -> list[WandbItem]:
    import wandb

    data = values.astype(np.float64)
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        warnings.warn(
            f"W&B: histogram {key!r} has no finite values; not logged to W&B", stacklevel=3
        )
        return []
    counts, edges = np.histogram(finite, bins=_HISTOGRAM_BINS)
    return [HistoryValue(key, wandb.Histogram(np_histogram=(counts.tolist(), edges.tolist())))]


def _text(text: str) -> Any:
    if "\n" not in text:
        return text
    import wandb

    return wandb.Html(f"<pre>{html.escape(text)}</pre>", inject=False)


def to_wandb(key: str, value: LogValue, names: NameMap, staging: Path) -> list[WandbItem]:
    """What W&B receives for ``value``; video files are written under ``staging``."""
    import wandb

    name = names(key)
    match value:
        case Scalar(value=number):
            plain = int(number) if isinstance(number, bool) else number
            return [HistoryValue(name, plain)]
        case Text(value=text):
            return [HistoryValue(name, _text(text))]
        case Histogram(values=values):
            return _histogram(name, values)
        case Image():
            return [HistoryValue(name, wandb.Image(_pil(_encode.png(value))))]
        case Figure():
            # Rendered PNG, never wandb's plotly conversion of the matplotlib figure.
            return [HistoryValue(name, wandb.Image(_pil(value.png)))]
        case Video():
            path = staging / f"{uuid.uuid4().hex}.mp4"
            path.write_bytes(_encode.mp4(value))
            return [HistoryValue(name, wandb.Video(str(path), format="mp4"))]
        case HParam():
            metrics = {metric: float(number) for metric, number in value.metric_dict.items()}
            return [ConfigUpdate(value.flat()), SummaryUpdate(metrics)]
        case _:
            assert_never(value)
