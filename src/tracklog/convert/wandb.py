"""Values as W&B receives them: history entries, config updates and summary updates.

Pure: no wandb import and no files. Media come out as plain data (``WandbHistogram``,
``WandbImage``, ``WandbHtml``, ``WandbVideo``), which the W&B output turns into wandb's
objects (and, for a video, its file) in the delivery process.
"""

from __future__ import annotations

import html
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias, assert_never, cast

import numpy as np

from tracklog import _encode
from tracklog._names import NameMap
from tracklog._row import Row
from tracklog.convert._buckets import HISTOGRAM_BINS, equal_buckets
from tracklog.values import (
    CHECKPOINT_RECORD,
    Checkpoint,
    Figure,
    Histogram,
    HParam,
    Image,
    LogValue,
    Scalar,
    Text,
    Video,
    to_plain,
)

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = [
    "STEP_KEY",
    "ArtifactNames",
    "ConfigUpdate",
    "HistoryValue",
    "ModelArtifact",
    "SummaryUpdate",
    "WandbHistogram",
    "WandbHtml",
    "WandbImage",
    "WandbItem",
    "WandbKeyCheck",
    "WandbMedia",
    "WandbVideo",
    "to_wandb",
    "wandb_names",
]

STEP_KEY = "global_step"
"""The history column holding the dump's step; every chart uses it as its x axis."""


@dataclass(frozen=True, slots=True)
class WandbHistogram:
    """``wandb.Histogram(np_histogram=(counts, edges))``."""

    counts: np.ndarray
    edges: np.ndarray


@dataclass(frozen=True, slots=True)
class WandbImage:
    """``wandb.Image`` of this picture."""

    picture: PILImage


@dataclass(frozen=True, slots=True)
class WandbHtml:
    """``wandb.Html``: multi-line text, shown preformatted."""

    html: str


@dataclass(frozen=True, slots=True)
class WandbVideo:
    """``wandb.Video`` of this MP4 file's content."""

    mp4: bytes


WandbMedia: TypeAlias = WandbHistogram | WandbImage | WandbHtml | WandbVideo


@dataclass(frozen=True, slots=True)
class HistoryValue:
    """One entry of the dump's history row (``run.log``)."""

    name: str
    value: bool | int | float | str | WandbMedia


@dataclass(frozen=True, slots=True)
class ConfigUpdate:
    values: dict[str, object]


@dataclass(frozen=True, slots=True)
class SummaryUpdate:
    values: dict[str, float]


@dataclass(frozen=True, slots=True)
class ModelArtifact:
    """A kept checkpoint as a ``wandb.Artifact`` of type ``model``, logged with its aliases.

    The artifact is ``<key>-<run id>`` (see :class:`ArtifactNames`): each checkpoint of
    a key is a new version of it, and W&B moves an alias to the newest version that
    carries it.
    """

    key: str
    #: The folder holding the files (relative: to run_dir, as read from the queue).
    local: Path
    #: Relative ``/``-separated names; tracklog's record of the checkpoint last.
    files: tuple[str, ...]
    aliases: tuple[str, ...]
    metadata: dict[str, object]


WandbItem: TypeAlias = HistoryValue | ConfigUpdate | SummaryUpdate | ModelArtifact

#: W&B's artifact names: letters, digits, ``-``, ``_`` and ``.``, at most 128 of them.
_ARTIFACT_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_NOT_ARTIFACT_NAME = re.compile(r"[^A-Za-z0-9_.-]+")
_ARTIFACT_NAME_LENGTH = 128


class ArtifactNames:
    """Each checkpoint key's artifact name in one run: ``<key>-<run id>``.

    A key W&B takes as it is keeps its name; any other (``a/b``, or too long) is
    renamed as :class:`~tracklog._names.NameMap` renames, so two keys never share an
    artifact (``a/b`` becomes ``a_b-<hash>``, never ``a_b``).
    """

    def __init__(self, run_id: str) -> None:
        self._suffix = "-" + (_NOT_ARTIFACT_NAME.sub("_", run_id)[:40] or "_")
        room = _ARTIFACT_NAME_LENGTH - len(self._suffix)
        self._names = NameMap(
            "W&B artifact",
            lambda name: len(name) <= room and _ARTIFACT_NAME.fullmatch(name) is not None,
            lambda key: _NOT_ARTIFACT_NAME.sub("_", key) or "_",
            room,
        )

    def __call__(self, key: str) -> str:
        return self._names(key) + self._suffix


# W&B names a media file after its key: "<key>_<row>_<20 hex>.<ext>", one folder per
# "/". For a key with a NUL byte, or a part longer than a file name may be, run.log
# raises and the whole row is lost; such keys are renamed for every kind of value, so
# a key keeps one name. A part of 200 bytes leaves room for W&B's suffix in 255.
_PART_BYTES = 200
_KEY_BYTES = 1000  # well inside PATH_MAX (4096) with the run directory in front


def _usable(key: str) -> bool:
    return (
        key != STEP_KEY
        and "\x00" not in key
        and len(key.encode("utf-8")) <= _KEY_BYTES
        and all(len(part.encode("utf-8")) <= _PART_BYTES for part in key.split("/"))
    )


def _shortened(key: str) -> str:
    # Each part cut to 150 bytes: NameMap appends "-<hex digest>" (9 to 41 characters).
    parts = [
        part.replace("\x00", "_").encode("utf-8")[:150].decode("utf-8", errors="ignore")
        for part in key.split("/")
    ]
    return "/".join(parts)


def wandb_names() -> NameMap:
    """History keys: taken as they are, unless W&B could not name a media file after them.

    Renamed (once, with a warning): tracklog's own step column ``global_step``, and
    keys with a NUL byte, a ``/``-separated part over 200 UTF-8 bytes or over 1000
    bytes in all.
    """
    return NameMap("W&B", _usable, _shortened, 250)


class WandbKeyCheck:
    """Names each new key as the W&B output will, on the training side (see
    :class:`tracklog.convert.mlflow.MlflowKeyCheck`)."""

    def __init__(self) -> None:
        self._names = wandb_names()
        self._named: set[str] = set()

    def __call__(self, row: Row) -> None:
        new = row.values.keys() - self._named
        if not new:
            return
        for key, value in row.values.items():
            if key in new and not isinstance(value, HParam):
                self._names(key)
                self._named.add(key)


def _histogram(key: str, values: np.ndarray) -> list[WandbItem]:
    data = values.astype(np.float64)
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        warnings.warn(
            f"W&B: histogram {key!r} has no finite values; not logged to W&B", stacklevel=3
        )
        return []
    try:  # NumPy's buckets, as wandb.Histogram(values) makes them
        with np.errstate(over="ignore", invalid="ignore"):
            counts, edges = np.histogram(finite, bins=HISTOGRAM_BINS)
    except ValueError:  # a range too narrow for 64 distinct edges, or wider than float64
        counts, edges = equal_buckets(finite, HISTOGRAM_BINS)
    return [HistoryValue(key, WandbHistogram(counts, edges))]


def _text(text: str) -> str | WandbHtml:
    if "\n" not in text:
        return text
    return WandbHtml(f"<pre>{html.escape(text)}</pre>")


def to_wandb(key: str, value: LogValue, names: NameMap) -> list[WandbItem]:
    """What W&B receives for ``value`` recorded under ``key``."""
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
            return [HistoryValue(name, WandbImage(_encode.picture(value)))]
        case Figure():
            # Rendered PNG, never wandb's plotly conversion of the matplotlib figure.
            return [HistoryValue(name, WandbImage(_encode.decoded(value.png)))]
        case Video():
            return [HistoryValue(name, WandbVideo(_encode.mp4(value)))]
        case HParam():
            metrics = {metric: float(number) for metric, number in value.metric_dict.items()}
            return [ConfigUpdate(value.flat_with_lists()), SummaryUpdate(metrics)]
        case Checkpoint():
            described = cast("dict[str, object]", to_plain(value.metadata))
            if value.stored is not None:
                described = {"path": value.stored, **described}
            files = tuple(file for file, _ in value.files)
            if value.stored is not None:
                files += (CHECKPOINT_RECORD,)
            return [ModelArtifact(key, value.folder, files, value.aliases, described)]
        case _:
            assert_never(value)
