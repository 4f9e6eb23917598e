"""Values as MLflow entities: metrics, params, artifacts, step images and text appends."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from posixpath import normpath
from typing import TYPE_CHECKING, TypeAlias, assert_never

import numpy as np

from tracklog import _encode
from tracklog._media import safe_relpath
from tracklog._names import NameMap
from tracklog._row import Row
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
)

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = [
    "MAX_NAME_LENGTH",
    "MAX_PARAM_LENGTH",
    "ArtifactFile",
    "CheckpointUpload",
    "MetricPoint",
    "MlflowItem",
    "MlflowKeyCheck",
    "MlflowNames",
    "ParamValue",
    "StepImage",
    "TextAppend",
    "to_mlflow",
]

MAX_NAME_LENGTH = 250  # mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH
MAX_PARAM_LENGTH = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
# MLflow names an image file "<key>+step+<step>+timestamp+<ms>+<uuid>+compressed.webp"
# ("/" in the key as "~"): up to 103 characters besides the key, in a file name that
# may hold 255 bytes.
MAX_IMAGE_NAME_LENGTH = 150
# The portable subset of what MLflow accepts (its image keys allow no more, and
# Windows servers refuse ':'): ASCII letters, digits, _ - . / and space.
_NAME = re.compile(r"[A-Za-z0-9_\-./ ]+")
_NOT_NAME = re.compile(r"[^A-Za-z0-9_\-./ ]+")


@dataclass(frozen=True, slots=True)
class MetricPoint:
    name: str
    value: float
    timestamp_ms: int
    step: int


@dataclass(frozen=True, slots=True)
class ParamValue:
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class ArtifactFile:
    """A file to upload at ``path`` (relative, ``/``-separated) in the run's artifacts."""

    path: str
    encode: Callable[[], bytes]


@dataclass(frozen=True, slots=True)
class StepImage:
    """A picture for MLflow's image logging (``log_image(key=…, step=…)``)."""

    name: str
    step: int
    timestamp_ms: int
    picture: Callable[[], PILImage.Image]


@dataclass(frozen=True, slots=True)
class TextAppend:
    """Text to append to the artifact text file at ``path``."""

    path: str
    text: str


@dataclass(frozen=True, slots=True)
class CheckpointUpload:
    """A kept checkpoint: its files go to the same path in the run's artifacts as in
    run_dir (``checkpoints/<key>/step_<step>/``); once they are there, each alias tag
    (``checkpoint/<key>/<alias>``) is set to that path."""

    path: str
    #: The folder holding the files (relative: to run_dir, as read from the queue).
    local: Path
    #: Relative ``/``-separated names; tracklog's record of the checkpoint last.
    files: tuple[str, ...]
    #: (alias, the name of its tag), for each alias.
    tags: tuple[tuple[str, str], ...]


MlflowItem: TypeAlias = (
    MetricPoint | ParamValue | ArtifactFile | StepImage | TextAppend | CheckpointUpload
)


def is_valid_name(name: str) -> bool:
    """Whether MLflow takes ``name`` as a metric or param name unchanged."""
    return (
        len(name) <= MAX_NAME_LENGTH
        and _NAME.fullmatch(name) is not None
        and normpath(name) == name
        and name != "."
        and not name.startswith(("..", "/"))
    )


def _normal_path(name: str) -> str:
    """``name`` without the ``""``/``.``/``..`` parts and leading ``..`` MLflow refuses."""
    parts = ["__" if part == ".." else part for part in name.split("/") if part not in ("", ".")]
    name = "/".join(parts) or "_"
    return "_" + name[1:] if name.startswith("..") else name  # e.g. "..a"


def sanitise_name(key: str, max_length: int = MAX_NAME_LENGTH) -> str:
    """A valid MLflow name for ``key``: other characters become ``_``, paths normalised."""
    name = _normal_path(_NOT_NAME.sub("_", key))
    # Cutting can leave a last part that is empty, "." or "..": normalise again.
    return _normal_path(name[:max_length])


def _is_image_name(name: str) -> bool:
    return len(name) <= MAX_IMAGE_NAME_LENGTH and is_valid_name(name)


def _image_name(key: str) -> str:
    return sanitise_name(key, MAX_IMAGE_NAME_LENGTH)


# Artifact files are <folder>.txt and <folder>/step_<step>.mp4 or .npy: a folder part
# named like one of those files ("a.txt", "step_0.npy") would have to be a file and a
# folder at once, which no artifact store allows. Its dot becomes "_".
_FILE_LIKE = re.compile(r"\.(?=(?:txt|mp4|npy)$)", re.IGNORECASE)


def _artifact_dir(key: str) -> str:
    return "/".join(_FILE_LIKE.sub("_", part) for part in safe_relpath(key).parts)


def _is_artifact_dir(key: str) -> bool:
    return _artifact_dir(key) == key


class MlflowNames:
    """The name spaces of one MLflow run: metrics, params, image keys, artifact folders."""

    def __init__(self) -> None:
        self.metric = NameMap("MLflow", is_valid_name, sanitise_name, MAX_NAME_LENGTH)
        self.param = NameMap("MLflow param", is_valid_name, sanitise_name, MAX_NAME_LENGTH)
        self.image = NameMap("MLflow image", _is_image_name, _image_name, MAX_IMAGE_NAME_LENGTH)
        self.folder = NameMap("MLflow artifact", _is_artifact_dir, _artifact_dir, MAX_NAME_LENGTH)
        self.tag = NameMap("MLflow tag", is_valid_name, sanitise_name, MAX_NAME_LENGTH)


class MlflowKeyCheck:
    """Names each new key of a row as the MLflow output will, on the training side, so
    a :class:`~tracklog._names.KeyWarning` points at the ``dump()`` that caused it."""

    def __init__(self) -> None:
        self._names = MlflowNames()
        self._checked: set[tuple[str, type]] = set()
        self._scalar_keys: set[str] = set()

    def __call__(self, row: Row) -> None:
        # The set difference skips a row of known scalars without a Python loop; new
        # keys are named in the row's order, which decides who keeps a contested name.
        new = row.values.keys() - self._scalar_keys
        if not new:
            return
        for key, value in row.values.items():
            if key not in new:
                continue
            kind = (key, type(value))
            if kind not in self._checked:
                to_mlflow(key, value, row, self._names)
                self._checked.add(kind)
            if isinstance(value, Scalar):
                self._scalar_keys.add(key)


def _param_text(name: str, value: bool | int | float | str | None) -> str:
    text = str(value)
    if len(text) > MAX_PARAM_LENGTH:
        warnings.warn(
            f"MLflow param {name!r} is {len(text)} characters long; "
            f"truncated to MLflow's limit of {MAX_PARAM_LENGTH}",
            stacklevel=2,
        )
        text = text[:MAX_PARAM_LENGTH]
    return text


def _histogram_metrics(
    key: str, values: np.ndarray, row: Row, names: MlflowNames, ms: int
) -> list[MlflowItem]:
    data = values.astype(np.float64)
    finite = data[np.isfinite(data)]
    stats = {
        "mean": float(data.mean()),
        "std": float(data.std()),
        "min": float(finite.min()) if finite.size else math.nan,
        "max": float(finite.max()) if finite.size else math.nan,
    }
    return [
        MetricPoint(names.metric(key, derived=stat), value, ms, row.step)
        for stat, value in stats.items()
    ]


def to_mlflow(key: str, value: LogValue, row: Row, names: MlflowNames) -> list[MlflowItem]:
    """What MLflow receives for ``value`` recorded under ``key`` in ``row``."""
    ms = int(row.timestamp * 1000)
    match value:
        case Scalar(value=number):
            return [MetricPoint(names.metric(key), float(number), ms, row.step)]
        case Text(value=text):
            return [TextAppend(f"text/{names.folder(key)}.txt", f"[step {row.step}] {text}\n")]
        case Histogram(values=values):
            raw = ArtifactFile(
                f"histograms/{names.folder(key)}/step_{row.step}.npy", lambda: _encode.npy(value)
            )
            return [*_histogram_metrics(key, values, row, names, ms), raw]
        case Image():
            return [StepImage(names.image(key), row.step, ms, lambda: _encode.picture(value))]
        case Figure():
            return [StepImage(names.image(key), row.step, ms, lambda: _encode.decoded(value.png))]
        case Video():
            path = f"videos/{names.folder(key)}/step_{row.step}.mp4"
            return [ArtifactFile(path, lambda: _encode.mp4(value))]
        case HParam():
            params: list[MlflowItem] = [
                ParamValue(names.param(name), _param_text(name, param))
                for name, param in value.flat().items()
            ]
            # A metric the same dump also records itself keeps that recorded value: two
            # points at one step would draw a spike (SB3's metric_dict values are often
            # placeholders for the real curve).
            metrics = [
                MetricPoint(names.metric(name), metric, ms, row.step)
                for name, metric in value.metric_dict.items()
                if not isinstance(row.values.get(name), Scalar)
            ]
            return [*params, *metrics]
        case Checkpoint(stored=stored):
            where = stored or f"checkpoints/{names.folder(key)}/step_{row.step}"
            tags = tuple(
                (alias, names.tag(f"checkpoint/{key}", derived=alias)) for alias in value.aliases
            )
            files = tuple(name for name, _ in value.files)
            if stored is not None:
                files += (CHECKPOINT_RECORD,)
            return [CheckpointUpload(where, value.folder, files, tags)]
        case _:
            assert_never(value)
