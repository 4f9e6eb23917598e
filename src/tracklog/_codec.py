"""Rows as data: how one dump is written into the delivery queue, and read back.

A queued row is one JSON document. Numbers, booleans and strings stand for themselves
(``Scalar`` and ``Text``); every other value is an object with a ``type``. Arrays (a
histogram, an image, a video's frames, a figure's PNG) are stored inline as base64
when small, else as a ``.npy``/``.png`` file in the queue's ``blobs/`` folder, written
once however many outputs read it. Reading uses ``json`` and ``numpy.load(...,
allow_pickle=False)`` only: nothing read from the queue can run code. A document that
does not have this shape raises :class:`CodecError`, which the delivery side reports
with the record's position and skips.

float64 values round-trip exactly (``repr`` is the shortest exact form), and NaN and
±inf are written as ``NaN``/``Infinity``, which ``json`` reads back.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, TypeVar, assert_never

import numpy as np
import numpy.typing as npt

from tracklog._row import Row
from tracklog.values import Figure, Histogram, HParam, Image, LogValue, Scalar, Text, Video

__all__ = ["BLOBS", "CodecError", "Decoded", "decode_row", "encode_row", "open_nofollow"]

BLOBS: Final = "blobs"
#: Arrays up to this many bytes are stored inside the row; larger ones as a blob file.
INLINE_BYTES: Final = 64 * 1024
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=True, separators=(",", ":"))
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DTYPES: Final = frozenset(
    np.dtype(name).str
    for name in (
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
    )
)


class CodecError(ValueError):
    """A queued record that is not a row tracklog wrote."""


@dataclass(frozen=True, slots=True)
class Decoded:
    """A queued row: the values, who they are excluded for, and its JSONL/CSV media jobs."""

    row: Row
    #: key -> the ``exclude=`` names that must not receive it
    excluded: Mapping[str, tuple[str, ...]]
    #: key -> (path relative to run_dir, extension) of a media file to encode
    media: Mapping[str, tuple[str, str]]

    def for_output(self, name: str) -> Row:
        """The row as the output ``name`` sees it (its excluded keys left out)."""
        if not any(name in names for names in self.excluded.values()):
            return self.row
        values = {
            key: value
            for key, value in self.row.values.items()
            if name not in self.excluded.get(key, ())
        }
        row = self.row
        return Row(step=row.step, timestamp=row.timestamp, seq=row.seq, values=values)


def open_nofollow(path: Path, flags: int, mode: int = 0o600) -> int:
    """``os.open`` that refuses a symlink at ``path`` (the queue's files are its own)."""
    return os.open(path, flags | _NOFOLLOW | os.O_CLOEXEC, mode)


# Writing --------------------------------------------------------------------------------
class _Writer:
    def __init__(self, blobs: Path | None, seq: int) -> None:
        self.blobs = blobs
        self.seq = seq
        self.names: list[str] = []

    def array(self, array: npt.NDArray[Any]) -> dict[str, object]:
        shape = list(array.shape)
        if array.nbytes <= INLINE_BYTES or self.blobs is None:
            data = base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")
            return {"dtype": array.dtype.str, "shape": shape, "data": data}
        name = f"{self.seq}-{len(self.names)}.npy"
        self.names.append(name)
        fd = open_nofollow(self.blobs / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with os.fdopen(fd, "wb") as file:
            np.lib.format.write_array(file, np.ascontiguousarray(array), allow_pickle=False)
        return {"dtype": array.dtype.str, "shape": shape, "blob": name}

    def value(self, value: LogValue) -> object:
        match value:
            case Scalar(value=number):
                return number
            case Text(value=text):
                return text
            case Histogram():
                return {"type": "histogram", **self.array(value.values)}
            case Image():
                return {"type": "image", **self.array(value.image)}
            case Figure():
                png = np.frombuffer(value.png, dtype=np.uint8)
                return {"type": "figure", "close": value.close, **self.array(png)}
            case Video():
                return {"type": "video", "fps": value.fps, **self.array(value.frames)}
            case HParam():
                return {
                    "type": "hparam",
                    "hparams": value.plain(),
                    "metrics": dict(value.metric_dict),
                }
            case _:
                assert_never(value)


def encode_row(
    row: Row,
    excluded: Mapping[str, tuple[str, ...]],
    media: Mapping[str, tuple[str, str]],
    blobs: Path | None,
) -> tuple[str, list[str]]:
    """``row`` as one JSON document, and the names of the files its large arrays went
    to in ``blobs`` (a directory; None keeps every array inline)."""
    writer = _Writer(blobs, row.seq)
    values: dict[str, object] = {}
    for key, value in row.values.items():
        values[key] = value.value if type(value) is Scalar else writer.value(value)
    document: dict[str, object] = {
        "step": row.step,
        "time": row.timestamp,
        "seq": row.seq,
        "values": values,
    }
    skip = {key: list(names) for key, names in excluded.items() if names}
    if skip:
        document["excluded"] = skip
    if media:
        document["media"] = {key: list(job) for key, job in media.items()}
    return _ENCODER.encode(document), writer.names


# Reading --------------------------------------------------------------------------------
def _field(document: Mapping[str, object], name: str, kind: type | tuple[type, ...]) -> Any:
    value = document.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CodecError(f"field {name!r} is missing or not {kind}")
    return value


class _Reader:
    def __init__(self, blobs: Path | None) -> None:
        self.blobs = blobs

    def array(self, document: Mapping[str, object]) -> npt.NDArray[Any]:
        dtype = _field(document, "dtype", str)
        shape = _field(document, "shape", list)
        if dtype not in _DTYPES or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
        ):
            raise CodecError(f"unsupported array {dtype!r} {shape!r}")
        if "blob" in document:
            array = self._blob(_field(document, "blob", str))
            if array.dtype.str != dtype or list(array.shape) != shape:
                raise CodecError("blob does not match its row")
        else:
            try:
                raw = base64.b64decode(_field(document, "data", str), validate=True)
                array = np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape)
            except ValueError as error:
                raise CodecError(f"bad inline array: {error}") from None
        array.flags.writeable = False
        return array

    def _blob(self, name: str) -> npt.NDArray[Any]:
        if self.blobs is None or "/" in name or name.startswith(".") or not name.endswith(".npy"):
            raise CodecError(f"bad blob name {name!r}")
        try:
            fd = open_nofollow(self.blobs / name, os.O_RDONLY)
        except OSError as error:
            raise CodecError(f"blob {name}: {error.strerror}") from None
        with os.fdopen(fd, "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                raise CodecError(f"blob {name} is not a file")
            try:
                array = np.load(file, allow_pickle=False)
            except ValueError as error:
                raise CodecError(f"blob {name}: {error}") from None
        if not isinstance(array, np.ndarray):
            raise CodecError(f"blob {name} is not an array")
        return array

    def value(self, raw: object) -> LogValue:
        if isinstance(raw, bool | int | float):
            return Scalar(raw)
        if isinstance(raw, str):
            return Text(raw)
        if not isinstance(raw, dict):
            raise CodecError(f"a value of JSON type {type(raw).__name__}")
        kind = raw.get("type")
        if kind == "histogram":
            values = self.array(raw)
            if values.ndim != 1 or values.size == 0:
                raise CodecError("a histogram must be 1-d and not empty")
            return Histogram(values)
        if kind == "image":
            image = self.array(raw)
            if image.dtype != np.uint8 or image.ndim != 4:
                raise CodecError("an image must be uint8 NHWC")
            return _build(Image, image=image, dataformats="NHWC")
        if kind == "video":
            frames = self.array(raw)
            fps = _field(raw, "fps", float)
            if frames.dtype != np.uint8 or frames.ndim != 5:
                raise CodecError("video frames must be uint8 NTCHW")
            return _build(Video, frames=frames, fps=fps)
        if kind == "figure":
            png = self.array(raw).tobytes()
            if not png.startswith(b"\x89PNG"):
                raise CodecError("a figure must be a PNG")
            size = (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big"))
            close = bool(raw.get("close", True))
            return _build(Figure, figure=None, close=close, png=png, size=size)
        if kind == "hparam":
            try:
                return HParam(_field(raw, "hparams", dict), _field(raw, "metrics", dict))
            except (TypeError, ValueError) as error:
                raise CodecError(f"bad hparam: {error}") from None
        raise CodecError(f"unknown value type {kind!r}")


_Media = TypeVar("_Media", Image, Figure, Video)


def _build(cls: type[_Media], **fields: object) -> _Media:
    """A frozen media value from fields already validated when it was recorded."""
    value = object.__new__(cls)
    for name, field in fields.items():
        object.__setattr__(value, name, field)
    value._freeze()
    return value


def decode_row(text: str, blobs: Path | None) -> Decoded:
    """The row ``encode_row`` wrote; :class:`CodecError` if ``text`` is anything else."""
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:
        raise CodecError(f"not JSON: {error}") from None
    if not isinstance(document, dict):
        raise CodecError("a row must be a JSON object")
    reader = _Reader(blobs)
    raw_values = _field(document, "values", dict)
    values: dict[str, LogValue] = {}
    for key, raw in raw_values.items():
        try:
            values[key] = reader.value(raw)
        except CodecError as error:
            raise CodecError(f"key {key!r}: {error}") from None
    excluded = {
        key: tuple(str(name) for name in names)
        for key, names in _field_or(document, "excluded", dict).items()
        if isinstance(names, list)
    }
    media: dict[str, tuple[str, str]] = {}
    for key, job in _field_or(document, "media", dict).items():
        if not (isinstance(job, list) and len(job) == 2 and all(isinstance(p, str) for p in job)):
            raise CodecError(f"bad media job for {key!r}")
        media[key] = (job[0], job[1])
    step = _field(document, "step", int)
    timestamp = _field(document, "time", (int, float))
    seq = _field(document, "seq", int)
    row = Row(step=step, timestamp=float(timestamp), seq=seq, values=MappingProxyType(values))
    return Decoded(row=row, excluded=excluded, media=media)


def _field_or(document: Mapping[str, object], name: str, kind: type) -> dict[str, Any]:
    if name not in document:
        return {}
    value = document[name]
    if not isinstance(value, kind):
        raise CodecError(f"field {name!r} is not {kind.__name__}")
    assert isinstance(value, dict)
    return value
