"""Rows as data: how one dump is written into the delivery queue, and read back.

A queued row is one JSON document. Numbers, booleans and strings stand for themselves
(``Scalar`` and ``Text``); every other value is an object with a ``type``. Arrays (a
histogram, an image, a video's frames, a figure's PNG) are stored inline as base64
when small, else as a ``.npy`` file in the queue's ``blobs/`` folder, written
once however many outputs read it. Reading uses ``json``, and for a blob
``ast.literal_eval`` of its ``.npy`` header and the raw bytes after it (never
``numpy.load``, never a pickle): nothing read from the queue can run code. A document
that does not have this shape, or a blob that does not match it exactly, raises
:class:`CodecError` and nothing else, which the delivery side reports with the
record's position and skips. The blob files are opened without following symlinks
(``blobs/`` itself included) and without blocking on a FIFO.

float64 values round-trip exactly (``repr`` is the shortest exact form), and NaN and
±inf are written as ``NaN``/``Infinity``, which ``json`` reads back.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import json
import math
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO, Final, TypeGuard, TypeVar, assert_never, cast

import numpy as np
import numpy.typing as npt

from tracklog._checkpoints import stored_path
from tracklog._jsontext import float_pairs, json_float, member
from tracklog._row import Row
from tracklog.values import (
    CHANNELS,
    MAX_FPS,
    MIN_FPS,
    Checkpoint,
    Figure,
    Histogram,
    HParam,
    Image,
    LogValue,
    Scalar,
    Text,
    Video,
    build_checkpoint,
    check_aliases,
    freeze_mapping,
    mark_frozen,
    to_plain,
)

__all__ = [
    "BLOBS",
    "CodecError",
    "Decoded",
    "decode_row",
    "encode_row",
    "open_nofollow",
    "remove_blobs",
]

BLOBS: Final = "blobs"
#: Arrays up to this many bytes are stored inside the row; larger ones as a blob file.
INLINE_BYTES: Final = 64 * 1024
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=True, separators=(",", ":"))
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
#: A FIFO planted in ``blobs/`` must not block the reader in open(2).
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_DIR_FD = os.open in os.supports_dir_fd and os.unlink in os.supports_dir_fd
#: The names the writer gives blob files (``<seq>-<n>.npy``); the reader takes no other.
_BLOB_NAME: Final = re.compile(r"-?[0-9]{1,20}-[0-9]{1,9}\.npy")
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
_PNG: Final = b"\x89PNG\r\n\x1a\n"
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


def _open_dir(directory: Path) -> int:
    """A descriptor of ``directory`` itself, refused if it is a symlink."""
    return os.open(directory, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | os.O_CLOEXEC)


class _Blobs:
    """The ``blobs/`` folder, opened once (not through a symlink) for a row's files."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._fd: int | None = None

    def open(self, name: str, flags: int, mode: int = 0o600) -> int:
        if not _DIR_FD:
            return open_nofollow(self.directory / name, flags, mode)
        if self._fd is None:
            self._fd = _open_dir(self.directory)
        return os.open(name, flags | _NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=self._fd)

    def unlink(self, name: str) -> None:
        if _DIR_FD and self._fd is not None:
            os.unlink(name, dir_fd=self._fd)
        else:
            (self.directory / name).unlink()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def remove_blobs(blobs: Path, names: list[str]) -> None:
    """Delete the blob files ``names`` from the folder ``blobs`` itself (never through a
    symlink); a name the writer would not give (``../x``, an absolute path) is left
    alone, since a queue's records are as untrusted as its bodies."""
    wanted = [name for name in names if _BLOB_NAME.fullmatch(name) is not None]
    if not wanted:
        return
    try:
        folder = _open_dir(blobs)
    except OSError:  # gone, or not a folder of its own: nothing of ours to delete
        return
    try:
        for name in wanted:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=folder)
    finally:
        os.close(folder)


# Writing --------------------------------------------------------------------------------
def _storable(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """``array`` in a dtype the reader takes: native byte order; a float type the
    reader does not know (``longdouble``) as float64."""
    if array.dtype.str in _DTYPES:
        return array
    native = array.dtype.newbyteorder("=")
    if native.str in _DTYPES:
        return array.astype(native)
    if array.dtype.kind == "f":
        return array.astype(np.float64)
    raise ValueError(f"cannot queue an array of dtype {array.dtype}")


class _Writer:
    def __init__(self, blobs: Path | None, seq: int) -> None:
        self.blobs = None if blobs is None else _Blobs(blobs)
        self.seq = seq
        self.names: list[str] = []

    def array(self, array: npt.NDArray[Any]) -> dict[str, object]:
        array = np.ascontiguousarray(_storable(array))
        shape = list(array.shape)
        if array.nbytes <= INLINE_BYTES or self.blobs is None:
            data = base64.b64encode(array.tobytes()).decode("ascii")
            return {"dtype": array.dtype.str, "shape": shape, "data": data}
        name = f"{self.seq}-{len(self.names)}.npy"
        fd = self.blobs.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        self.names.append(name)  # from here on, removed again if the row fails
        with os.fdopen(fd, "wb") as file:
            np.lib.format.write_array(file, array, allow_pickle=False)
        return {"dtype": array.dtype.str, "shape": shape, "blob": name}

    def discard(self) -> None:
        """Remove the files of a row that could not be written (a full disk)."""
        assert self.blobs is not None
        for name in self.names:
            with contextlib.suppress(OSError):
                self.blobs.unlink(name)
        self.names.clear()

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
            case Checkpoint():
                if value.stored is None:
                    raise ValueError("a checkpoint is queued only once kept in run_dir")
                return {
                    "type": "checkpoint",
                    "path": value.stored,
                    "aliases": list(value.aliases),
                    "metadata": to_plain(value.metadata),
                    "files": [list(entry) for entry in value.files],
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
    to in ``blobs`` (a directory; None keeps every array inline). If it raises (a full
    disk), the files it wrote are removed again."""
    writer = _Writer(blobs, row.seq)
    try:
        # _ENCODER.encode({"step": …, "time": …, "seq": …, "values": {…}, …}), with the
        # row's floats formatted once for JSONL, CSV and the queue (see _jsontext).
        pairs = float_pairs(row)
        if len(pairs) == len(row.values):  # every value a float: a training loop's row
            values = ",".join(pairs.values())
        else:
            values = ",".join(
                pairs.get(key)
                or member(key)
                + _ENCODER.encode(value.value if type(value) is Scalar else writer.value(value))
                for key, value in row.values.items()
            )
        time_ = json_float(repr(row.timestamp))
        parts = [f'{{"step":{row.step},"time":{time_},"seq":{row.seq},"values":{{{values}}}']
        skip = {key: list(names) for key, names in excluded.items() if names}
        if skip:
            parts.append(f',"excluded":{_ENCODER.encode(skip)}')
        if media:
            jobs = {key: list(job) for key, job in media.items()}
            parts.append(f',"media":{_ENCODER.encode(jobs)}')
        parts.append("}")
        text = "".join(parts)
    except BaseException:
        if writer.blobs is not None:
            writer.discard()
        raise
    finally:
        if writer.blobs is not None:
            writer.blobs.close()
    return text, writer.names


# Reading --------------------------------------------------------------------------------
def _field(document: Mapping[str, object], name: str, kind: type | tuple[type, ...]) -> Any:
    value = document.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CodecError(f"field {name!r} is missing or not {kind}")
    return value


def _int64(document: Mapping[str, object], name: str) -> int:
    value: int = _field(document, name, int)
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise CodecError(f"field {name!r} is outside the signed 64-bit range")
    return value


def _check_unicode(document: object) -> None:
    """Refuse a lone surrogate (a ``\\udXXX`` escape) in any key or string of
    ``document``: tracklog never writes one, and no output could encode it."""
    stack: list[object] = [document]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            mapping = cast("dict[object, object]", item)
            stack.extend(mapping.keys())
            stack.extend(mapping.values())
        elif isinstance(item, list):
            stack.extend(cast("list[object]", item))
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise CodecError(f"{item[:40]!r} is not valid Unicode") from None


_NPY_MAGIC: Final = b"\x93NUMPY"
_NPY_HEADER_MAX: Final = 10_000  # numpy's own limit for an untrusted header
_NPY_ALIGN: Final = 64  # numpy.lib.format.ARRAY_ALIGN


def _npy_header(file: BinaryIO) -> tuple[str, bool, tuple[int, ...]]:
    """``(descr, fortran_order, shape)`` from the header of a ``.npy`` file (format 1.0
    or 2.0, as numpy writes them), parsed as a literal and checked field by field."""
    start = file.read(8)
    if len(start) != 8 or start[:6] != _NPY_MAGIC:
        raise CodecError("not a .npy file")
    if start[6:] == b"\x01\x00":
        length = int.from_bytes(file.read(2), "little")
    elif start[6:] == b"\x02\x00":
        length = int.from_bytes(file.read(4), "little")
    else:
        raise CodecError(f".npy format {start[6]}.{start[7]} is not supported")
    if length > _NPY_HEADER_MAX:
        raise CodecError("the .npy header is too long")
    # numpy pads the header with spaces and a newline so the data starts on a 64-byte
    # boundary: a damaged length that still parses would move the data's start.
    if (file.tell() + length) % _NPY_ALIGN:
        raise CodecError("the .npy header does not end on numpy's alignment")
    text = file.read(length)
    if len(text) != length:
        raise CodecError("the .npy header is cut short")
    if not text.endswith(b"\n"):
        raise CodecError("the .npy header does not end its line")
    try:
        header = ast.literal_eval(text.decode("latin-1"))
    except Exception as error:  # a literal, not code: SyntaxError, ValueError, MemoryError…
        raise CodecError(f"the .npy header does not parse ({type(error).__name__})") from None
    if not isinstance(header, dict) or header.keys() != {"descr", "fortran_order", "shape"}:
        raise CodecError("the .npy header is not numpy's")
    fields = cast("dict[str, object]", header)
    descr, fortran, shape = fields["descr"], fields["fortran_order"], fields["shape"]
    if not isinstance(descr, str) or not isinstance(fortran, bool) or not _is_shape(shape):
        raise CodecError("the .npy header is not numpy's")
    return descr, fortran, shape


def _is_shape(value: object) -> TypeGuard[tuple[int, ...]]:
    """Whether ``value`` is a tuple of ints >= 0 (the shape in a ``.npy`` header)."""
    if not isinstance(value, tuple):
        return False
    return all(type(n) is int and n >= 0 for n in cast("tuple[object, ...]", value))


def _is_str_list(value: object, length: int | None = None) -> TypeGuard[list[str]]:
    """Whether ``value`` is a list of str (of ``length`` items, if given)."""
    if not isinstance(value, list):
        return False
    items = cast("list[object]", value)
    if length is not None and len(items) != length:
        return False
    return all(isinstance(item, str) for item in items)


class _Reader:
    def __init__(self, blobs: Path | None) -> None:
        self.blobs = None if blobs is None else _Blobs(blobs)

    def close(self) -> None:
        if self.blobs is not None:
            self.blobs.close()

    def array(self, document: Mapping[str, object]) -> npt.NDArray[Any]:
        dtype = _field(document, "dtype", str)
        shape = _field(document, "shape", list)
        if dtype not in _DTYPES or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
        ):
            raise CodecError(f"unsupported array {dtype!r} {shape!r}")
        if "blob" in document:
            array = self._blob(_field(document, "blob", str), np.dtype(dtype), shape)
        else:
            try:
                raw = base64.b64decode(_field(document, "data", str), validate=True)
                array = np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape)
            except ValueError as error:
                raise CodecError(f"bad inline array: {error}") from None
        array.flags.writeable = False
        return array

    def _blob(self, name: str, dtype: np.dtype[Any], shape: list[int]) -> npt.NDArray[Any]:
        """The array in ``blobs/name``: a ``.npy`` file of exactly ``dtype`` and ``shape``.

        The header is checked before any data is read, and the data is read as raw
        bytes: never unpickled, never more than the file holds."""
        if self.blobs is None or _BLOB_NAME.fullmatch(name) is None:
            raise CodecError(f"bad blob name {name!r}")
        try:
            fd = self.blobs.open(name, os.O_RDONLY | _NONBLOCK)
        except OSError as error:
            raise CodecError(f"blob {name}: {error.strerror or error}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise CodecError("not a file")
            with os.fdopen(fd, "rb") as file:
                fd = -1  # the file closes it
                descr, fortran, found = _npy_header(file)
                if descr != dtype.str or list(found) != shape:
                    raise CodecError("does not match its row")
                size = math.prod(shape) * dtype.itemsize
                if info.st_size - file.tell() != size:
                    raise CodecError(f"does not hold {size} bytes of data")
                data = file.read(size)
        except OSError as error:  # an I/O error reading it
            raise CodecError(f"blob {name}: {error}") from None
        except CodecError as error:
            raise CodecError(f"blob {name}: {error}") from None
        finally:
            if fd >= 0:
                os.close(fd)
        if len(data) != size:
            raise CodecError(f"blob {name} was cut short")
        return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")

    def value(self, raw: object) -> LogValue:
        if isinstance(raw, bool | float):
            return Scalar(raw)
        if isinstance(raw, int):
            if not _INT64_MIN <= raw <= _INT64_MAX:
                raise CodecError("an int outside the signed 64-bit range")
            return Scalar(raw)
        if isinstance(raw, str):
            return Text(raw)
        if not isinstance(raw, dict):
            raise CodecError(f"a value of JSON type {type(raw).__name__}")
        document = cast("dict[str, object]", raw)  # JSON object keys are str
        kind = document.get("type")
        if kind == "histogram":
            values = self.array(document)
            if values.ndim != 1 or values.size == 0:
                raise CodecError("a histogram must be 1-d and not empty")
            return Histogram(values)
        if kind == "image":
            image = self.array(document)
            if (
                image.dtype != np.uint8
                or image.ndim != 4
                or image.size == 0
                or image.shape[3] not in CHANNELS
            ):
                raise CodecError("an image must be uint8 NHWC, not empty, with 1, 3 or 4 channels")
            return _build(Image, image=image, dataformats="NHWC")
        if kind == "video":
            frames = self.array(document)
            fps = _field(document, "fps", float)
            if (
                frames.dtype != np.uint8
                or frames.ndim != 5
                or frames.size == 0
                or frames.shape[2] not in CHANNELS
            ):
                raise CodecError(
                    "video frames must be uint8 NTCHW, not empty, with 1, 3 or 4 channels"
                )
            if not MIN_FPS <= fps <= MAX_FPS:
                raise CodecError(f"video fps {fps!r} is outside [{MIN_FPS}, {MAX_FPS}]")
            return _build(Video, frames=frames, fps=fps)
        if kind == "figure":
            pixels = self.array(document)
            close = _field(document, "close", bool)
            png = pixels.tobytes()
            if pixels.dtype != np.uint8 or pixels.ndim != 1 or not png.startswith(_PNG):
                raise CodecError("a figure must be a PNG")
            if len(png) < 24:
                raise CodecError("a figure's PNG has no header chunk")
            size = (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big"))
            return _build(Figure, figure=None, close=close, png=png, size=size)
        if kind == "hparam":
            try:
                return HParam(_field(document, "hparams", dict), _field(document, "metrics", dict))
            except (TypeError, ValueError) as error:
                raise CodecError(f"bad hparam: {error}") from None
        if kind == "checkpoint":
            return _checkpoint(document)
        raise CodecError(f"unknown value type {kind!r}")


def _checkpoint(document: dict[str, object]) -> Checkpoint:
    path: str = _field(document, "path", str)
    aliases: list[object] = _field(document, "aliases", list)
    files: list[object] = _field(document, "files", list)
    try:
        stored_path(path)
        checked = check_aliases(aliases)
        metadata = freeze_mapping(_field(document, "metadata", dict), "checkpoint metadata")
    except (TypeError, ValueError) as error:
        raise CodecError(f"bad checkpoint: {error}") from None
    entries: list[tuple[str, int]] = []
    for entry in files:
        pair = cast("list[object]", entry) if isinstance(entry, list) else []
        name, size = (pair[0], pair[1]) if len(pair) == 2 else (None, None)
        if not (
            isinstance(name, str)
            and _is_file_name(name)
            and type(size) is int
            and 0 <= size <= _INT64_MAX
        ):
            raise CodecError(f"bad checkpoint file entry {str(pair)[:80]}")
        entries.append((name, size))
    if not entries:
        raise CodecError("a checkpoint without files")
    return build_checkpoint(Path(path), Path(path), checked, metadata, tuple(entries), path)


def _is_file_name(name: str) -> bool:
    """A relative ``/``-separated path that stays inside its folder."""
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and all(p not in ("", ".", "..") for p in parts)


_Media = TypeVar("_Media", Image, Figure, Video)


def _build(cls: type[_Media], **fields: object) -> _Media:
    """A frozen media value from fields already validated when it was recorded."""
    value = object.__new__(cls)
    for name, field in fields.items():
        object.__setattr__(value, name, field)
    mark_frozen(value)
    return value


def decode_row(text: str, blobs: Path | None) -> Decoded:
    """The row ``encode_row`` wrote; :class:`CodecError` if ``text`` is anything else.

    Nothing else is raised, whatever ``text`` and the files in ``blobs`` hold."""
    try:
        # ValueError: json's own errors, and an int of more digits than Python converts
        document = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise CodecError(f"not JSON: {error}") from None
    if not isinstance(document, dict):
        raise CodecError("a row must be a JSON object")
    fields = cast("dict[str, Any]", document)  # JSON object keys are str
    reader = _Reader(blobs)
    try:
        if "\\u" in text:  # tracklog escapes only control characters
            _check_unicode(fields)
        return _decode(fields, reader)
    except RecursionError:  # an HParam nested deeper than Python recurses
        raise CodecError("a value nested too deeply") from None
    finally:
        reader.close()


def _decode(document: dict[str, Any], reader: _Reader) -> Decoded:
    raw_values = _field(document, "values", dict)
    values: dict[str, LogValue] = {}
    for key, raw in raw_values.items():
        try:
            values[key] = reader.value(raw)
        except CodecError as error:
            raise CodecError(f"key {key!r}: {error}") from None
    excluded: dict[str, tuple[str, ...]] = {}
    for key, names in _field_or(document, "excluded", dict).items():
        if not _is_str_list(names):
            raise CodecError(f"bad excluded names for {key!r}")
        excluded[key] = tuple(names)
    media: dict[str, tuple[str, str]] = {}
    for key, job in _field_or(document, "media", dict).items():
        if not _is_str_list(job, length=2):
            raise CodecError(f"bad media job for {key!r}")
        media[key] = (job[0], job[1])
    step = _int64(document, "step")
    timestamp = _field(document, "time", (int, float))
    try:
        timestamp = float(timestamp)
    except OverflowError:
        raise CodecError("field 'time' is out of range") from None
    if isinstance(document["time"], bool) or not math.isfinite(timestamp):
        raise CodecError("field 'time' is not a finite number")
    seq = _int64(document, "seq")
    row = Row(step=step, timestamp=timestamp, seq=seq, values=MappingProxyType(values))
    return Decoded(row=row, excluded=excluded, media=media)


def _field_or(document: Mapping[str, object], name: str, kind: type) -> dict[str, Any]:
    if name not in document:
        return {}
    value = document[name]
    if not isinstance(value, kind):
        raise CodecError(f"field {name!r} is not {kind.__name__}")
    assert isinstance(value, dict)
    return cast("dict[str, Any]", value)
