"""Values as TensorBoard summaries: scalars, histograms, images, text and hparams.

The items are plain data; :mod:`tracklog.outputs.tensorboard` turns them into
TensorBoard's protobufs. Nothing here imports TensorBoard, so the encodings (PNG,
animated GIF, histogram buckets) run and are tested without the optional extra.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias, assert_never

import numpy as np
import numpy.typing as npt

from tracklog import _encode
from tracklog._row import Row
from tracklog.convert._buckets import HISTOGRAM_BINS, equal_buckets
from tracklog.convert.text import checkpoint_summary
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
    to_plain,
)

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = [
    "GIF_MAX_FPS",
    "HISTOGRAM_BINS",
    "HParamsSummary",
    "HistogramSummary",
    "ImageSummary",
    "ScalarSummary",
    "TensorBoardHParamsCheck",
    "TensorboardItem",
    "TextSummary",
    "gif",
    "to_tensorboard",
]

#: Browsers play a GIF frame delay under 20 ms as 100 ms; faster clips drop frames instead.
GIF_MAX_FPS = 50.0


@dataclass(frozen=True, slots=True)
class ScalarSummary:
    """A point of the scalar chart ``tag``."""

    tag: str
    value: float


@dataclass(frozen=True, slots=True)
class HistogramSummary:
    """TensorBoard's ``HistogramProto``: 64 equal buckets of the finite values.

    ``bucket_limit[i]`` is the right edge of bucket ``i``; the first bucket starts at
    ``min``. ``min``, ``max``, ``sum`` and ``sum_squares`` are of the finite values.
    A single value is one bucket; a range too narrow for 64 distinct edges has fewer.
    """

    tag: str
    min: float
    max: float
    num: int
    sum: float
    sum_squares: float
    bucket_limit: tuple[float, ...]
    bucket: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class ImageSummary:
    """An encoded picture (PNG, or an animated GIF for a video) for the Images tab."""

    tag: str
    height: int
    width: int
    colorspace: int  # 1 grey, 2 grey + alpha, 3 RGB, 4 RGBA
    encoded: bytes


@dataclass(frozen=True, slots=True)
class TextSummary:
    """A string for the Text tab (which renders it as Markdown)."""

    tag: str
    text: str


@dataclass(frozen=True, slots=True)
class HParamsSummary:
    """Hyperparameters and the metrics that judge them (the HPARAMS tab).

    ``metrics`` maps each metric's name (a scalar tag) to the ``HParam``'s value for
    it; the output decides whether that value becomes a point of the tag's chart.
    """

    hparams: dict[str, bool | float | str]
    metrics: dict[str, float]


TensorboardItem: TypeAlias = (
    ScalarSummary | HistogramSummary | ImageSummary | TextSummary | HParamsSummary
)


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _scalar(key: str, number: bool | int | float) -> ScalarSummary:
    value = float(number)
    if math.isfinite(value) and abs(value) > _FLOAT32_MAX:
        warnings.warn(
            f"TensorBoard keeps scalars as float32: {key!r} has a value beyond "
            "±3.4e38, which TensorBoard shows as ±inf",
            stacklevel=3,
        )
    return ScalarSummary(key, value)


def _histogram(key: str, values: npt.NDArray[np.number | np.bool_]) -> list[TensorboardItem]:
    data = values.astype(np.float64)
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        warnings.warn(
            f"TensorBoard: histogram {key!r} has no finite values; not logged to TensorBoard",
            stacklevel=3,
        )
        return []
    low, high = float(finite.min()), float(finite.max())
    histogram, edges = equal_buckets(finite, HISTOGRAM_BINS)
    limits, counts = edges[1:].tolist(), histogram.astype(np.float64).tolist()
    with np.errstate(over="ignore"):  # beyond ±1.3e154 squares are inf, as they should be
        total, squares = float(finite.sum()), float(np.square(finite).sum())
    return [
        HistogramSummary(
            key, low, high, int(finite.size), total, squares, tuple(limits), tuple(counts)
        )
    ]


# A PNG's colour type (IHDR byte 25) as TensorBoard's colorspace.
_PNG_COLORSPACE = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}


def _figure(key: str, figure: Figure) -> ImageSummary:
    width, height = figure.size
    colorspace = _PNG_COLORSPACE.get(figure.png[25], 4)
    return ImageSummary(key, height, width, colorspace, figure.png)


def _image(key: str, image: Image) -> ImageSummary:
    n, height, width, channels = image.shape
    return ImageSummary(key, height, n * width, channels, _encode.png(image))


def _centiseconds(ms: float) -> int:
    return math.floor(ms / 10.0 + 0.5)


def _paletted(frame: npt.NDArray[np.uint8]) -> PILImage.Image:
    """An RGB frame as a GIF frame: exact when it has at most 256 colours."""
    from PIL import Image as PILImage

    picture = PILImage.fromarray(frame)
    counted = picture.getcolors(256)  # None when there are more
    if counted is None:
        # GIF holds 256 colours a frame; octree quantisation is fast enough to run on
        # every frame (median cut, Pillow's default, takes 40x longer).
        return picture.quantize(256, method=PILImage.Quantize.FASTOCTREE)
    rgb = np.array([colour for _, colour in counted if isinstance(colour, tuple)], np.uint32)
    colours = np.sort((rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2])
    packed = (
        (frame[..., 0].astype(np.uint32) << 16)
        | (frame[..., 1].astype(np.uint32) << 8)
        | frame[..., 2].astype(np.uint32)
    )
    index = np.searchsorted(colours, packed).astype(np.uint8)
    paletted = PILImage.fromarray(index)  # 2-D uint8: mode L
    palette = np.stack([colours >> 16, (colours >> 8) & 255, colours & 255], axis=1)
    paletted.putpalette(palette.astype(np.uint8).tobytes())  # L becomes P
    return paletted


def gif(video: Video) -> tuple[bytes, int, int]:
    """The clip as an endlessly looping animated GIF; returns ``(gif, height, width)``.

    A batch of N clips is tiled left to right; an alpha channel is dropped. Grey clips
    and frames of at most 256 colours are exact; others are reduced to 256 colours.
    Frame delays are whole centiseconds (GIF's unit), chosen so that frame ``i``
    starts as close to ``i / fps`` seconds as the unit allows and the clip lasts
    ``T / fps`` seconds. Above 50 fps, frames are skipped so that none is shown for
    less than 20 ms: browsers play shorter delays as 100 ms.
    """
    from PIL import Image as PILImage

    n, t, c, h, w = video.shape
    # (N,T,C,H,W) -> (T,H,N*W,C)
    frames = np.concatenate(list(video.frames.transpose(0, 1, 3, 4, 2)), axis=2)
    stride = max(1, math.ceil(video.fps / GIF_MAX_FPS - 1e-9))
    shown = range(0, t, stride)
    starts = [_centiseconds(i * 1000.0 / video.fps) for i in shown]
    ends = [*starts[1:], max(_centiseconds(t * 1000.0 / video.fps), starts[-1] + 2)]
    pictures = [
        PILImage.fromarray(frames[i, ..., 0]) if c == 1 else _paletted(frames[i, ..., :3])
        for i in shown
    ]
    buffer = io.BytesIO()
    pictures[0].save(
        buffer,
        format="GIF",
        save_all=True,
        append_images=pictures[1:],
        duration=[10 * (end - start) for start, end in zip(starts, ends, strict=True)],
        loop=0,
        optimize=False,  # Pillow's palette optimisation costs more than it saves here
    )
    return buffer.getvalue(), h, n * w


def _video(key: str, video: Video) -> ImageSummary:
    encoded, height, width = gif(video)
    return ImageSummary(key, height, width, 1 if video.shape[2] == 1 else 3, encoded)


def _hparam_value(value: bool | int | float | str | None) -> bool | float | str:
    if value is None:
        return "None"  # TensorBoard has no null hparam; MLflow shows None the same way
    if isinstance(value, bool | str):
        return value
    return float(value)


def _hparams(hparam: HParam) -> HParamsSummary:
    values = {name: _hparam_value(value) for name, value in hparam.flat().items()}
    return HParamsSummary(values, dict(hparam.metric_dict))


def _checkpoint_text(checkpoint: Checkpoint) -> str:
    """The Text tab's entry (Markdown): where the checkpoint is kept, its files, aliases
    and metadata."""
    where = checkpoint.stored or str(checkpoint.path)
    text = f"checkpoint `{where}`: {checkpoint_summary(checkpoint)}"
    if checkpoint.metadata:
        metadata = json.dumps(to_plain(checkpoint.metadata), allow_nan=True, ensure_ascii=False)
        text += f"\n\nmetadata: `{metadata}`"
    return text


def to_tensorboard(key: str, value: LogValue) -> list[TensorboardItem]:
    """What TensorBoard receives for ``value`` recorded under ``key`` (the tag, unchanged).

    Media are encoded here (PNG, GIF, histogram buckets); the TensorBoard output calls
    this in the delivery process, never on the training thread.
    """
    match value:
        case Scalar(value=number):
            return [_scalar(key, number)]
        case Text(value=text):
            return [TextSummary(key, text)]
        case Histogram(values=values):
            return _histogram(key, values)
        case Image():
            return [_image(key, value)]
        case Figure():
            return [_figure(key, value)]
        case Video():
            return [_video(key, value)]
        case HParam():
            return [_hparams(value)]
        case Checkpoint():
            return [TextSummary(key, _checkpoint_text(value))]
        case _:
            assert_never(value)


class TensorBoardHParamsCheck:
    """Warns, on the training side, when an ``HParam`` asks for what the HPARAMS tab
    cannot show: a second set of hyperparameters, or metrics beyond the first ones
    declared. The warning then points at the ``dump()`` that caused it."""

    def __init__(self) -> None:
        self._first_hparams: dict[str, bool | int | float | str | None] | None = None
        self._declared_metrics: tuple[str, ...] | None = None

    def __call__(self, row: Row) -> None:
        # Every dump pays this: a C-level look at the few types of the row's values first.
        if not any(issubclass(kind, HParam) for kind in set(map(type, row.values.values()))):
            return
        for key, value in row.values.items():
            if isinstance(value, HParam):
                self._check(key, value)

    def _check(self, key: str, value: HParam) -> None:
        flat = value.flat()
        if self._first_hparams is None:
            self._first_hparams = flat
        elif flat != self._first_hparams:
            warnings.warn(
                f"TensorBoard shows one set of hparams per run: the HPARAMS tab keeps the "
                f"first HParam's hyperparameters, not {key!r}'s",
                stacklevel=2,
            )
        names = tuple(value.metric_dict)
        if not names:
            return
        if self._declared_metrics is None:
            self._declared_metrics = names
            return
        added = [name for name in names if name not in self._declared_metrics]
        if added:
            warnings.warn(
                f"TensorBoard's HPARAMS tab keeps the metrics of the first HParam naming "
                f"any, {list(self._declared_metrics)}; {key!r} also names {added}, which "
                "the tab cannot add",
                stacklevel=2,
            )
