"""The delivery queue (``tracklog._queue``) and its rows (``tracklog._codec``), on real
files, in real processes, under real signals.

Whatever is written is read back the way the delivery process reads it: through a
*fresh* ``Queue(directory)`` and ``decode_row``, never from the writer's memory. A queue
is data only: whatever its files hold, reading one runs no code and raises nothing but
``CodecError`` (a record) or ``OSError`` (a symlink where a queue file should be).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import pickle
import queue as stdqueue
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final

import matplotlib.pyplot as plt
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tests.samples import NESTED_HPARAMS, one_of_every_kind, random_pixels
from tracklog._codec import BLOBS, INLINE_BYTES, CodecError, Decoded, decode_row, encode_row
from tracklog._queue import FORMAT, MEDIA, Kind, Lock, Message, Queue, find_queues
from tracklog._row import Row
from tracklog.values import (
    Figure,
    Histogram,
    HParam,
    Image,
    LogValue,
    Scalar,
    Text,
    Video,
    normalise,
)

HEADER: Final[dict[str, Any]] = {"format": FORMAT, "run_dir": "/nowhere", "outputs": []}
INT64: Final = st.integers(-(2**63), 2**63 - 1)
FLOATS: Final = st.floats(allow_nan=True, allow_infinity=True)  # -0.0 and subnormals too
#: Texts Hypothesis may not think of: line and paragraph separators, NEL, NUL, escapes.
ODD_TEXTS: Final = [
    "",
    "\u2028\u2029\x85",
    "nul\x00in the middle\x00",
    '\\u0000 "quoted" \\',
    "\U0001f600 \u200b\ufeff\uffff",
    "NaN",
    "Infinity",
    "\r\n\t\x1b[31m",
]
TEXTS: Final = st.text() | st.sampled_from(ODD_TEXTS)
KEYS: Final = st.text(min_size=1, max_size=8) | st.sampled_from(["train/loss", "a.b", "\x00"])


# Comparing what was read with what was written -------------------------------------------


def _bits(number: float) -> bytes:
    return struct.pack("<d", number)


def _same_float(read: float, written: float) -> bool:
    """Bit for bit (-0.0, subnormals, ±inf); a NaN as any NaN (JSON writes ``NaN``)."""
    if math.isnan(written):
        return math.isnan(read)
    return _bits(read) == _bits(written)


def _same_plain(read: object, written: object) -> bool:
    """Equal JSON-like data: dicts as mappings (the format keeps no key order), lists
    in order, numbers of the same type, floats bit for bit."""
    if isinstance(written, dict):
        return (
            isinstance(read, dict)
            and read.keys() == written.keys()
            and all(_same_plain(read[key], value) for key, value in written.items())
        )
    if isinstance(written, list | tuple):
        return (
            isinstance(read, list | tuple)
            and len(read) == len(written)
            and all(_same_plain(a, b) for a, b in zip(read, written, strict=True))
        )
    if type(read) is not type(written):
        return False
    if isinstance(written, float):
        assert isinstance(read, float)
        return _same_float(read, written)
    return read == written


def _stored(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """``array`` as the queue keeps it: in native byte order (values unchanged)."""
    return array.astype(array.dtype.newbyteorder("="))


def _assert_same_array(read: npt.NDArray[Any], written: npt.NDArray[Any]) -> None:
    expected = _stored(written)
    assert read.dtype == expected.dtype
    assert read.shape == expected.shape
    assert read.tobytes() == expected.tobytes()  # bit-exact: NaN payloads included
    assert not read.flags.writeable  # a snapshot, also on the delivery side


def assert_same_value(read: LogValue, written: LogValue) -> None:
    assert type(read) is type(written), (read, written)
    match written:
        case Scalar():
            assert isinstance(read, Scalar)
            assert _same_plain(read.value, written.value), (read, written)
        case Text():
            assert read == written
        case Histogram():
            assert isinstance(read, Histogram)
            _assert_same_array(read.values, written.values)
        case Image():
            assert isinstance(read, Image)
            _assert_same_array(read.image, written.image)
            assert read.dataformats == "NHWC"
        case Video():
            assert isinstance(read, Video)
            _assert_same_array(read.frames, written.frames)
            assert _bits(read.fps) == _bits(written.fps)
        case Figure():
            assert isinstance(read, Figure)
            assert (read.png, read.size, read.close) == (written.png, written.size, written.close)
            figure: object = read.figure
            assert figure is None  # only the PNG travels, never a matplotlib object
        case HParam():
            assert isinstance(read, HParam)
            assert _same_plain(read.plain(), written.plain()), (read, written)
            assert _same_plain(dict(read.metric_dict), dict(written.metric_dict))


def assert_same_row(
    read: Decoded,
    row: Row,
    excluded: Mapping[str, tuple[str, ...]],
    media: Mapping[str, tuple[str, str]],
) -> None:
    assert (read.row.step, read.row.seq) == (row.step, row.seq)
    assert _bits(read.row.timestamp) == _bits(row.timestamp)
    assert read.row.values.keys() == row.values.keys()
    for key, value in row.values.items():
        assert_same_value(read.row.values[key], value)
    # An empty exclusion is no exclusion: the format need not keep it.
    assert dict(read.excluded) == {key: names for key, names in excluded.items() if names}
    assert dict(read.media) == dict(media)
    for name in {name for names in excluded.values() for name in names}:
        seen = read.for_output(name).values.keys()
        assert seen == {key for key in row.values if name not in excluded.get(key, ())}


def _blob_count(row: Row) -> int:
    """How many of ``row``'s arrays are over INLINE_BYTES (each goes to a file)."""
    sizes = []
    for value in row.values.values():
        match value:
            case Histogram():
                sizes.append(value.values.nbytes)
            case Image():
                sizes.append(value.image.nbytes)
            case Video():
                sizes.append(value.frames.nbytes)
            case Figure():
                sizes.append(len(value.png))
    return sum(size > INLINE_BYTES for size in sizes)


# Values, built the way record() builds them ------------------------------------------------

_PARAMS: st.SearchStrategy[object] = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | FLOATS | TEXTS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(min_size=1, max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
_HIST_DTYPES: Final = [
    "<f8",
    ">f8",
    "<f4",
    ">f4",
    "<f2",
    "<i8",
    ">i8",
    "<i4",
    "<i2",
    "|i1",
    "<u8",
    ">u4",
    "<u2",
    "|u1",
    "|b1",
]


def _random_bits(seed: int, dtype: np.dtype[Any], count: int) -> npt.NDArray[Any]:
    """``count`` values of ``dtype`` from random bits: for floats, NaNs with payloads,
    subnormals and infinities among them."""
    rng = np.random.default_rng(seed)
    if dtype.kind == "b":
        return rng.integers(0, 2, count).astype(dtype)
    return rng.integers(0, 256, count * dtype.itemsize, dtype=np.uint8).view(dtype)


@st.composite
def histograms(draw: st.DrawFn, *, big: bool | None = None) -> LogValue:
    dtype = np.dtype(draw(st.sampled_from(_HIST_DTYPES)))
    if big is None:
        big = draw(st.booleans())
    if big:  # over INLINE_BYTES: a blob file
        count = INLINE_BYTES // dtype.itemsize + draw(st.integers(1, 64))
        values = _random_bits(draw(st.integers(0, 2**32 - 1)), dtype, count)
    else:
        values = draw(hnp.arrays(dtype, st.integers(1, 16)))
    return normalise("hist", values)


@st.composite
def images(draw: st.DrawFn, *, big: bool | None = None) -> LogValue:
    channels = draw(st.sampled_from([1, 3, 4]))
    if big if big is not None else draw(st.booleans()):
        pixels = random_pixels((1, 150, 150, channels), seed=draw(st.integers(0, 2**32 - 1)))
    else:
        shape = st.tuples(
            st.integers(1, 3), st.integers(1, 6), st.integers(1, 6), st.just(channels)
        )
        pixels = draw(hnp.arrays(np.uint8, shape))
    return normalise("image", Image(pixels, "NHWC"))


@st.composite
def videos(draw: st.DrawFn, *, big: bool | None = None) -> LogValue:
    channels = draw(st.sampled_from([1, 3, 4]))
    if big if big is not None else draw(st.booleans()):
        frames = random_pixels((1, 3, channels, 90, 90), seed=draw(st.integers(0, 2**32 - 1)))
    else:
        shape = st.tuples(
            st.integers(1, 2),
            st.integers(1, 3),
            st.just(channels),
            st.integers(1, 4),
            st.integers(1, 4),
        )
        frames = draw(hnp.arrays(np.uint8, shape))
    return normalise("video", Video(frames, fps=draw(st.floats(0.01, 1000))))


_FIGURES: list[Figure] = []


def figures() -> list[Figure]:
    """A small figure (its PNG inline) and a large one (a blob), rendered once."""
    if not _FIGURES:
        small, axes = plt.subplots(figsize=(2, 1), dpi=30)
        axes.plot([0, 1], [1, 0])
        large, axes = plt.subplots(figsize=(5, 5), dpi=100)
        axes.imshow(random_pixels((300, 300, 3), seed=3))
        _FIGURES.extend([Figure(small), Figure(large, close=False)])
        plt.close(large)
        assert len(_FIGURES[0].png) <= INLINE_BYTES < len(_FIGURES[1].png)
    return _FIGURES


@st.composite
def hparams(draw: st.DrawFn) -> LogValue:
    params = draw(st.dictionaries(st.text(min_size=1, max_size=5), _PARAMS, max_size=4))
    metrics = draw(st.dictionaries(st.text(min_size=1, max_size=5), FLOATS, max_size=3))
    return normalise("hparam", HParam(params, metrics))


def log_values(*, big: bool | None = None) -> st.SearchStrategy[LogValue]:
    """Any value an output can receive; ``big``: arrays over INLINE_BYTES (True), under
    it (False) or either (None)."""
    scalars = st.builds(Scalar, st.booleans() | INT64 | FLOATS)
    return st.one_of(
        scalars,
        st.builds(Text, TEXTS),
        histograms(big=big),
        images(big=big),
        videos(big=big),
        hparams(),
        st.sampled_from(figures()[:1] if big is False else figures()),
    )


def rows(*, big: bool | None = None) -> st.SearchStrategy[Row]:
    return st.builds(
        Row,
        step=INT64,
        timestamp=st.floats(allow_nan=False, allow_infinity=False),
        seq=st.integers(0, 2**63 - 1),
        values=st.dictionaries(KEYS, log_values(big=big), max_size=4),
    )


EXCLUDED: Final = st.dictionaries(
    KEYS, st.lists(st.text(max_size=8), max_size=3).map(tuple), max_size=3
)
MEDIA_JOBS: Final = st.dictionaries(
    KEYS, st.tuples(st.text(max_size=12), st.sampled_from(["mp4", "png", ""])), max_size=3
)


@dataclass(frozen=True)
class Queued:
    """A message as the training side appends it."""

    kind: Kind
    text: str = ""
    row: Row | None = None
    excluded: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    media: Mapping[str, tuple[str, str]] = field(default_factory=dict)


MESSAGES: Final[st.SearchStrategy[Queued]] = st.one_of(
    st.builds(Queued, st.just("row"), row=rows(), excluded=EXCLUDED, media=MEDIA_JOBS),
    st.builds(Queued, st.sampled_from(["line", "failed"]), text=TEXTS),
    st.builds(Queued, st.sampled_from(["flush", "close"])),
)


# Queues ------------------------------------------------------------------------------------


def shared_queue(tmp_path: Path) -> Path:
    """One queue for every example of a Hypothesis test (creating one takes ~0.1 s)."""
    directory = tmp_path / "queue-0"
    if not (directory / "queue.db").exists():
        Queue.create(directory, HEADER).close()
    return directory


def read_fresh(directory: Path, after: int = 0, limit: int = 10**6) -> list[Message]:
    """What the delivery side reads: a new Queue on the directory, then closed."""
    fresh = Queue(directory)
    try:
        return fresh.read(after, limit)
    finally:
        fresh.close()


def through_queue(directory: Path, body: str, blobs: str = "") -> Message:
    """``body`` appended by one connection and read back by a fresh one."""
    writer = Queue(directory)
    try:
        seq = writer.append("row", body, blobs)
    finally:
        writer.close()
    [message] = read_fresh(directory, seq - 1, 1)
    assert (message.seq, message.kind, message.body, message.blobs) == (seq, "row", body, blobs)
    return message


def append_row(
    queue: Queue,
    row: Row,
    excluded: Mapping[str, tuple[str, ...]] | None = None,
    media: Mapping[str, tuple[str, str]] | None = None,
) -> int:
    body, names = encode_row(row, excluded or {}, media or {}, queue.blobs)
    return queue.append("row", body, " ".join(names))


def big_histogram_row(seq: int, count: int = 9000) -> Row:
    values = normalise("h", np.linspace(-1.0, 1.0, count))
    assert isinstance(values, Histogram)
    assert values.values.nbytes > INLINE_BYTES or count <= INLINE_BYTES // 8
    return Row(step=seq, timestamp=1.7e9 + seq, seq=seq, values={"h": values})


def decode_or_refuse(text: str, blobs: Path | None) -> Decoded | None:
    """``decode_row``, which may refuse with CodecError and nothing else; a row it takes
    is one tracklog could have written: it encodes and decodes to itself."""
    try:
        decoded = decode_row(text, blobs)
    except CodecError:
        return None
    body, _ = encode_row(decoded.row, decoded.excluded, decoded.media, None)
    assert_same_row(decode_row(body, None), decoded.row, decoded.excluded, decoded.media)
    return decoded


# 1. Round trips ------------------------------------------------------------------------------


@settings(max_examples=60)
@given(
    messages=st.lists(MESSAGES, min_size=1, max_size=4),
    seqs=st.lists(st.integers(0, 2**63 - 1), min_size=4, max_size=4, unique=True),
    writer_stays_open=st.booleans(),
)
def test_every_message_round_trips_through_a_fresh_queue(
    tmp_path: Path, messages: list[Queued], seqs: list[int], writer_stays_open: bool
) -> None:
    directory = shared_queue(tmp_path)
    writer = Queue(directory)
    first = writer.last_seq()
    appended: list[tuple[int, list[str]]] = []
    for message, row_seq in zip(messages, seqs, strict=False):
        if message.row is None:
            appended.append((writer.append(message.kind, message.text), []))
            continue
        row = dataclasses.replace(message.row, seq=row_seq)  # blob names are per row.seq
        body, names = encode_row(row, message.excluded, message.media, writer.blobs)
        assert len(names) == _blob_count(row)
        appended.append((writer.append("row", body, " ".join(names)), names))
    assert [seq for seq, _ in appended] == sorted({seq for seq, _ in appended})
    assert appended[0][0] > first
    if not writer_stays_open:
        writer.close()

    read = read_fresh(directory, first)
    assert [message.seq for message in read] == [seq for seq, _ in appended]
    for got, message, (_, names), row_seq in zip(read, messages, appended, seqs, strict=False):
        assert got.kind == message.kind
        assert got.blobs.split() == names
        assert all((directory / BLOBS / name).is_file() for name in names)
        if message.row is None:
            assert got.body == message.text  # NUL, U+2028, NEL and all
            continue
        row = dataclasses.replace(message.row, seq=row_seq)
        assert_same_row(
            decode_row(got.body, directory / BLOBS), row, message.excluded, message.media
        )
    if writer_stays_open:
        writer.close()
    cleaner = Queue(directory)
    cleaner.forget(cleaner.last_seq())  # the next example starts from an empty queue
    cleaner.close()


def test_a_row_of_every_kind_round_trips_inline_and_as_blobs(tmp_path: Path) -> None:
    values = {key: normalise(key, value) for key, value in one_of_every_kind().items()}
    values["nested"] = HParam(NESTED_HPARAMS, {"reward": 1.5, "nan": math.nan, "inf": -math.inf})
    values["true"] = Scalar(True)
    values["int64 min"] = Scalar(-(2**63))
    values["int64 max"] = Scalar(2**63 - 1)
    values["-0.0"] = Scalar(-0.0)
    values["tiny"] = Scalar(5e-324)
    values["nan"] = Scalar(math.nan)
    values["-inf"] = Scalar(-math.inf)
    values["text"] = Text("".join(ODD_TEXTS))
    values["big hist"] = normalise("big hist", _random_bits(1, np.dtype("<f8"), 10_000))
    values["big image"] = normalise("big image", Image(random_pixels((1, 150, 150, 3)), "NHWC"))
    values["big video"] = normalise("big video", Video(random_pixels((1, 3, 3, 90, 90)), fps=7.5))
    values["big figure"] = figures()[1]
    row = Row(step=2**63 - 1, timestamp=1.7e9 + 0.123456, seq=41, values=values)
    excluded = {"video": ("mlflow", "wandb"), "text": ("stdout",), "scalar": ()}
    media = {"video": ("media/video/41.mp4", "mp4"), "image": ("media/image/41.png", "png")}

    queue = Queue.create(tmp_path / "queue-0", HEADER)
    seq = append_row(queue, row, excluded, media)
    queue.close()
    [message] = read_fresh(tmp_path / "queue-0")
    assert message.seq == seq
    assert len(message.blobs.split()) == 4 == _blob_count(row)
    assert_same_row(decode_row(message.body, queue.blobs), row, excluded, media)


@pytest.mark.parametrize(("size", "files"), [(INLINE_BYTES, 0), (INLINE_BYTES + 1, 1)])
def test_an_array_over_inline_bytes_goes_to_one_blob_file(
    tmp_path: Path, size: int, files: int
) -> None:
    values = normalise("h", random_pixels((size,), seed=size))
    row = Row(step=0, timestamp=0.0, seq=7, values={"h": values})
    queue = Queue.create(tmp_path / "queue-0", HEADER)
    body, names = encode_row(row, {}, {}, queue.blobs)
    queue.append("row", body, " ".join(names))
    queue.close()
    assert sorted(os.listdir(tmp_path / "queue-0" / BLOBS)) == names == ["7-0.npy"][:files]
    [message] = read_fresh(tmp_path / "queue-0")
    assert message.blobs == " ".join(names)
    assert ("blob" in json.loads(message.body)["values"]["h"]) == bool(files)
    assert_same_row(decode_row(message.body, queue.blobs), row, {}, {})


def test_arrays_of_another_byte_order_or_long_double_are_kept_as_values() -> None:
    # The reader takes native-order arrays of the common dtypes only; the writer
    # converts the rest rather than queue a row its reader refuses.
    big_endian = normalise("a", np.array([1.5, -2.0, math.inf], dtype=">f8"))
    long_double = normalise("b", np.array([1.25, -3.0], dtype=np.longdouble))
    row = Row(step=0, timestamp=0.0, seq=0, values={"a": big_endian, "b": long_double})
    decoded = decode_row(encode_row(row, {}, {}, None)[0], None)
    a, b = decoded.row.values["a"], decoded.row.values["b"]
    assert isinstance(a, Histogram)
    assert isinstance(b, Histogram)
    assert a.values.dtype == np.dtype(np.float64)
    assert a.values.tolist() == [1.5, -2.0, math.inf]
    assert b.values.dtype == np.float64
    assert b.values.tolist() == [1.25, -3.0]


# 2. Nothing read from a queue runs code --------------------------------------------------------


class Trap:
    """Unpickling it creates the directory ``path``: the proof that a pickle ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Callable[[str], None], tuple[str]]:
        return (os.mkdir, (self.path,))


def _armed(payload: bytes, marker: Path) -> None:
    """The control: unpickling ``payload`` does create ``marker``."""
    pickle.loads(payload)  # the point: this one runs
    assert marker.is_dir()
    marker.rmdir()


def test_a_pickled_row_body_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pickle-ran"
    directory = Queue.create(tmp_path / "queue-0", HEADER).directory
    hostile = sqlite3.connect(directory / "queue.db")
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        payload = pickle.dumps(Trap(marker), protocol=protocol)
        _armed(payload, marker)
        hostile.execute(  # stored as SQLite BLOB
            "INSERT INTO messages (kind, body, blobs) VALUES ('row', ?, '')", (payload,)
        )
        hostile.execute(  # and as text
            "INSERT INTO messages (kind, body, blobs) VALUES ('row', ?, '')",
            (payload.decode("latin-1"),),
        )
    hostile.commit()
    hostile.close()
    read = read_fresh(directory)
    assert len(read) == 2 * (pickle.HIGHEST_PROTOCOL + 1)
    for message in read:
        with pytest.raises(CodecError):
            decode_row(message.body, directory / BLOBS)
    assert not marker.exists()


def raw_record(seq: int, kind: int, body: bytes, blobs: bytes = b"") -> bytes:
    """An inbox record built by hand (a foreign writer), with a valid checksum."""
    rest = struct.pack("<qBI", seq, kind, len(body)) + body + blobs
    return struct.pack("<4sII", b"TLq\x01", len(rest), zlib.crc32(rest)) + rest


def append_raw(directory: Path, record: bytes) -> None:
    [segment] = sorted(directory.glob("inbox-*.log"))[-1:]
    with segment.open("ab") as file:
        file.write(record)


def test_a_pickled_record_in_the_inbox_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pickle-ran"
    queue = Queue.create(tmp_path / "queue-0", HEADER)
    queue.close()
    protocols = range(pickle.HIGHEST_PROTOCOL + 1)
    for protocol in protocols:
        payload = pickle.dumps(Trap(marker), protocol=protocol)
        _armed(payload, marker)
        append_raw(queue.directory, payload)  # as the whole record
        append_raw(queue.directory, raw_record(protocol + 1, 1, payload))  # as a row's body
    read = read_fresh(queue.directory)
    assert [message.seq for message in read] == [protocol + 1 for protocol in protocols]
    for message in read:
        with pytest.raises(CodecError):
            decode_row(message.body, queue.blobs)
    assert not marker.exists()


# Regression: Queue.read() decoded the body column as strict UTF-8, so one record whose
# bytes are not UTF-8 (a bad sector, a foreign writer) raised sqlite3.OperationalError for
# every read() whose batch held it, and the records after it were never delivered.
def test_a_record_that_is_not_utf8_is_refused_and_the_rest_read(tmp_path: Path) -> None:
    queue = Queue.create(tmp_path / "queue-0", HEADER)
    queue.append("line", "before")
    append_raw(queue.directory, raw_record(2, 1, b"\xff\x80 not utf-8"))
    queue._writer.seq = 2  # type: ignore[union-attr]  # the foreign writer took seq 2
    queue.append("line", "after")
    queue.close()
    read = read_fresh(queue.directory)
    assert [(m.seq, m.kind) for m in read] == [(1, "line"), (2, "row"), (3, "line")]
    with pytest.raises(CodecError):
        decode_row(read[1].body, queue.blobs)
    assert read[2].body == "after"


JSON: Final[st.SearchStrategy[object]] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | FLOATS
    | TEXTS
    | st.sampled_from(["histogram", "image", "video", "figure", "hparam", "<f8", "|u1", "0-0.npy"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "step",
                    "time",
                    "seq",
                    "values",
                    "excluded",
                    "media",
                    "type",
                    "dtype",
                    "shape",
                    "data",
                    "blob",
                    "fps",
                    "close",
                    "hparams",
                    "metrics",
                ]
            )
            | st.text(max_size=4),
            inner,
            max_size=5,
        )
    ),
    max_leaves=16,
)

_ROW = '{"step":0,"time":0.0,"seq":0,"values":%s}'
_SEVENTY_ONES = ",".join("1" * 70)  # more dimensions than numpy has
_NOT_ROWS: Final = [
    "1" * 5000,  # more digits than Python converts to an int
    "[" * 100_000,
    "NaN",
    "",
    '{"step":0,"time":' + "9" * 400 + ',"seq":0,"values":{}}',
    '{"step":0,"time":Infinity,"seq":0,"values":{}}',
    '{"step":0,"time":true,"seq":0,"values":{}}',
    '{"step":' + str(2**63) + ',"time":0.0,"seq":0,"values":{}}',
    _ROW % ('{"a":' + str(2**64) + "}"),
    _ROW % '{"t":"\\ud800 a lone surrogate"}',
    _ROW
    % ('{"h":{"type":"hparam","hparams":' + '{"a":' * 600 + "1" + "}" * 600 + ',"metrics":{}}}'),
    _ROW % '{"h":{"type":"hparam","hparams":{},"metrics":{"m":"x"}}}',
    _ROW % '{"i":{"type":"image","dtype":"|u1","shape":[0,0,0,0],"data":""}}',
    _ROW % '{"i":{"type":"image","dtype":"|u1","shape":[1,1,1,2],"data":"AAA="}}',
    _ROW % '{"i":{"type":"image","dtype":"<f8","shape":[1,1,1,1],"data":"AAAAAAAAAAA="}}',
    _ROW % '{"v":{"type":"video","fps":NaN,"dtype":"|u1","shape":[1,1,3,1,1],"data":"AAAA"}}',
    _ROW % '{"v":{"type":"video","fps":1e9,"dtype":"|u1","shape":[1,1,3,1,1],"data":"AAAA"}}',
    _ROW % '{"f":{"type":"figure","close":true,"dtype":"|u1","shape":[4],"data":"iVBORw=="}}',
    _ROW % '{"h":{"type":"histogram","dtype":"<f8","shape":[%d],"data":""}}' % 2**63,
    _ROW % ('{"h":{"type":"histogram","dtype":"<f8","shape":[' + _SEVENTY_ONES + '],"data":""}}'),
    _ROW % '{"h":{"type":"histogram","dtype":"|O","shape":[1],"data":"AAAAAAAAAAA="}}',
    _ROW % '{"h":{"type":"histogram","dtype":"<f8","shape":[1],"data":"not base64!"}}',
    _ROW % '{"h":{"type":"pickle","data":"gASVAAAAAAAAAAA="}}',
    '{"step":0,"time":0.0,"seq":0,"values":{},"excluded":{"a":[1,{"x":2}]}}',
    '{"step":0,"time":0.0,"seq":0,"values":{},"media":{"a":["media/a.png"]}}',
]


@settings(max_examples=150)
@given(document=JSON)
def test_json_of_any_shape_is_refused_with_a_codec_error(tmp_path: Path, document: object) -> None:
    text = json.dumps(document, allow_nan=True, ensure_ascii=False)
    message = through_queue(shared_queue(tmp_path), text)
    decode_or_refuse(message.body, tmp_path / "queue-0" / BLOBS)


@settings(max_examples=100)
@given(text=st.text() | st.sampled_from(_NOT_ROWS))
@example(text=_NOT_ROWS[0])
@example(text=_NOT_ROWS[4])
@example(text=_NOT_ROWS[9])
@example(text=_NOT_ROWS[10])
@example(text=_NOT_ROWS[12])
def test_any_text_is_refused_with_a_codec_error(tmp_path: Path, text: str) -> None:
    message = through_queue(shared_queue(tmp_path), text)
    decode_or_refuse(message.body, tmp_path / "queue-0" / BLOBS)


@pytest.mark.parametrize("text", _NOT_ROWS)
def test_what_tracklog_never_writes_is_refused(text: str) -> None:
    with pytest.raises(CodecError):
        decode_row(text, None)


def _paths(document: object, prefix: tuple[str | int, ...] = ()) -> Iterator[tuple[str | int, ...]]:
    yield prefix
    if isinstance(document, dict):
        for key, value in document.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            yield from _paths(value, (*prefix, index))


@st.composite
def mutants(draw: st.DrawFn) -> str:
    """A row tracklog wrote, with one place in it replaced, removed or added to."""
    row = draw(rows(big=False))
    excluded, media = draw(EXCLUDED), draw(MEDIA_JOBS)
    document: Any = json.loads(encode_row(row, excluded, media, None)[0])
    path = draw(st.sampled_from([path for path in _paths(document) if path]))
    parent = document
    for part in path[:-1]:
        parent = parent[part]
    action = draw(st.sampled_from(["replace", "remove", "add"]))
    if action == "replace":
        parent[path[-1]] = draw(JSON)
    elif action == "remove":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[draw(st.text(max_size=5))] = draw(JSON)
    else:
        parent.append(draw(JSON))
    return json.dumps(document, allow_nan=True, ensure_ascii=False)


@settings(max_examples=150)
@given(text=mutants())
def test_a_damaged_row_is_refused_or_is_a_row_tracklog_could_write(
    tmp_path: Path, text: str
) -> None:
    message = through_queue(shared_queue(tmp_path), text)
    decode_or_refuse(message.body, tmp_path / "queue-0" / BLOBS)


def _npy(array: npt.NDArray[Any], **options: Any) -> bytes:
    with tempfile.TemporaryFile() as file:
        np.lib.format.write_array(file, array, **options)
        file.seek(0)
        return file.read()


def _blob_queue(tmp_path: Path) -> tuple[Path, Message, npt.NDArray[Any]]:
    """A queue holding one row whose histogram (9000 float64) is in ``blobs/0-0.npy``."""
    queue = Queue.create(tmp_path / "queue-0", HEADER)
    row = big_histogram_row(0)
    append_row(queue, row)
    queue.close()
    [message] = read_fresh(tmp_path / "queue-0")
    assert message.blobs == "0-0.npy"
    decode_row(message.body, queue.blobs)  # the control: as written, it reads
    values = row.values["h"]
    assert isinstance(values, Histogram)
    return queue.blobs, message, values.values


@pytest.mark.parametrize("form", ["object .npy", "object .npz", "bare pickle"])
def test_a_blob_holding_a_pickle_runs_nothing(tmp_path: Path, form: str) -> None:
    blobs, _, _ = _blob_queue(tmp_path)
    marker = tmp_path / "pickle-ran"
    trap = np.array([Trap(marker)], dtype=object)
    path = blobs / "0-0.npy"
    if form == "object .npy":
        path.write_bytes(_npy(trap, allow_pickle=True))
        np.load(path, allow_pickle=True)  # the control: this would run it
    elif form == "object .npz":
        with path.open("wb") as file:
            np.savez(file, a=trap)
        with np.load(path, allow_pickle=True) as archive:
            archive["a"]
    else:
        path.write_bytes(pickle.dumps(trap))
        np.load(path, allow_pickle=True)
    assert marker.is_dir()
    marker.rmdir()

    [again] = read_fresh(tmp_path / "queue-0")
    with pytest.raises(CodecError):
        decode_row(again.body, blobs)
    assert not marker.exists()


@pytest.mark.parametrize(
    "name",
    [
        "../outside.npy",
        "../../outside.npy",
        "sub/0-0.npy",
        "ABSOLUTE",
        ".0-0.npy",
        "..",
        "0-0.npy\x00",
        "0-0.npz",
        "0-0.npy/",
        "",
        "0-0.NPY",
    ],
)
def test_a_blob_name_outside_blobs_or_of_another_form_is_refused(tmp_path: Path, name: str) -> None:
    blobs, message, values = _blob_queue(tmp_path)
    valid = (blobs / "0-0.npy").read_bytes()
    absolute = tmp_path / "absolute.npy"
    name = str(absolute) if name == "ABSOLUTE" else name
    # A valid array wherever the name could lead: only the name check stops it.
    for place in (blobs.parent / "outside.npy", tmp_path / "outside.npy", absolute):
        place.write_bytes(valid)
    (blobs / "sub").mkdir()
    (blobs / "sub" / "0-0.npy").write_bytes(valid)
    (blobs / ".0-0.npy").write_bytes(valid)
    (blobs / "0-0.NPY").write_bytes(valid)
    document = json.loads(message.body)
    document["values"]["h"]["blob"] = name
    text = json.dumps(document)
    with pytest.raises(CodecError):
        decode_row(through_queue(blobs.parent, text).body, blobs)
    decoded = decode_row(message.body, blobs)  # the control: the real name reads
    assert_same_value(decoded.row.values["h"], Histogram(values))
    with pytest.raises(CodecError):  # a queue read without its blobs/ folder
        decode_row(message.body, None)


@contextlib.contextmanager
def within(seconds: int) -> Iterator[None]:
    """Fail instead of hanging when a call blocks (a FIFO opened for reading)."""

    def expire(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _with_shape(npy: bytes, shape: str) -> bytes:
    """``npy`` (a version 1.0 file of 9000 values) with its header claiming ``shape``."""
    header = npy[:128].decode("latin-1")
    assert header.endswith("\n")
    changed = header.replace("(9000,)", shape).rstrip("\n").rstrip(" ").ljust(127) + "\n"
    assert len(changed) == 128
    return changed.encode("latin-1") + npy[128:]


def _damage(path: Path, how: str, values: npt.NDArray[Any]) -> None:
    valid = path.read_bytes()
    if how == "missing":
        path.unlink()
    elif how == "directory":
        path.unlink()
        path.mkdir()
    elif how == "fifo":
        path.unlink()
        os.mkfifo(path)
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "not .npy":
        path.write_bytes(b"just some bytes, no magic string")
    elif how == "header only":
        path.write_bytes(valid[:128])
    elif how == "cut short":
        path.write_bytes(valid[:-8])
    elif how == "trailing bytes":
        path.write_bytes(valid + bytes(8))
    elif how == "float32":
        path.write_bytes(_npy(values.astype(np.float32)))
    elif how == "big-endian":
        path.write_bytes(_npy(values.astype(">f8")))
    elif how == "one more":
        path.write_bytes(_npy(np.append(values, 0.0)))
    elif how == "2-d":
        path.write_bytes(_npy(values.reshape(2, -1)))
    elif how == "huge shape":
        path.write_bytes(_with_shape(valid, "(1099511627776,)"))
    elif how == "format 3.0":
        path.write_bytes(_npy(values, version=(3, 0)))
    else:
        raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "missing",
        "directory",
        "fifo",
        "empty",
        "not .npy",
        "header only",
        "cut short",
        "trailing bytes",
        "float32",
        "big-endian",
        "one more",
        "2-d",
        "huge shape",
        "format 3.0",
    ],
)
def test_a_blob_that_does_not_match_its_row_is_refused(tmp_path: Path, how: str) -> None:
    blobs, _, values = _blob_queue(tmp_path)
    _damage(blobs / "0-0.npy", how, values)
    [again] = read_fresh(tmp_path / "queue-0")
    with within(10), pytest.raises(CodecError):
        decode_row(again.body, blobs)


# Regression: a blob whose header (and row) claimed 8 TiB made numpy allocate them before
# reading: MemoryError, not CodecError (and a smaller claim is a real allocation).
def test_a_blob_claiming_more_data_than_it_holds_is_refused_before_allocating(
    tmp_path: Path,
) -> None:
    blobs, message, _ = _blob_queue(tmp_path)
    path = blobs / "0-0.npy"
    path.write_bytes(_with_shape(path.read_bytes(), "(1099511627776,)"))
    document = json.loads(message.body)
    document["values"]["h"]["shape"] = [2**40]
    with pytest.raises(CodecError):
        decode_row(through_queue(blobs.parent, json.dumps(document), message.blobs).body, blobs)


@pytest.mark.parametrize("options", [{"version": (2, 0)}, {"fortran": True}])
def test_a_blob_in_another_valid_npy_layout_reads_the_same_values(
    tmp_path: Path, options: dict[str, bool | tuple[int, int]]
) -> None:
    image = normalise("i", Image(random_pixels((1, 150, 150, 3), seed=5), "NHWC"))
    assert isinstance(image, Image)
    queue = Queue.create(tmp_path / "queue-0", HEADER)
    append_row(queue, Row(step=0, timestamp=0.0, seq=0, values={"i": image}))
    queue.close()
    path = queue.blobs / "0-0.npy"
    if options.get("fortran"):  # the same pixels laid out column-major
        path.write_bytes(_npy(np.asfortranarray(image.image)))
        with path.open("rb") as file:
            assert np.lib.format.read_magic(file) == (1, 0)
            assert np.lib.format.read_array_header_1_0(file)[1] is True  # fortran_order
    else:
        path.write_bytes(_npy(image.image, version=(2, 0)))
    [message] = read_fresh(tmp_path / "queue-0")
    assert_same_value(decode_row(message.body, queue.blobs).row.values["i"], image)


@settings(max_examples=60)
@given(position=st.integers(0, 127), mask=st.integers(1, 255), cut=st.integers(0, 200))
@example(position=8, mask=24, cut=8)  # a header length 8 short: the data read 8 bytes early
def test_a_blob_damaged_anywhere_is_refused_or_reads_its_values(
    tmp_path: Path, position: int, mask: int, cut: int
) -> None:
    directory = shared_queue(tmp_path)
    values = _random_bits(position, np.dtype("<f8"), 9000)
    valid = _npy(values)
    damaged = bytearray(valid)
    damaged[position] ^= mask
    damaged = damaged[: len(damaged) - cut]
    (directory / BLOBS / "0-0.npy").write_bytes(bytes(damaged))
    data = {"type": "histogram", "dtype": "<f8", "shape": [9000], "blob": "0-0.npy"}
    body = json.dumps({"step": 0, "time": 0.0, "seq": 0, "values": {"h": data}})
    message = through_queue(directory, body, "0-0.npy")
    decoded = decode_or_refuse(message.body, directory / BLOBS)
    if decoded is not None:  # the flip was in the header's padding: the same array
        assert cut == 0
        assert_same_value(decoded.row.values["h"], Histogram(values))


# 3. Symlinks --------------------------------------------------------------------------------


def _snapshot(path: Path) -> tuple[bytes, int] | None:
    """A file's bytes and modification time, or None if there is none."""
    if not path.exists():
        return None
    return path.read_bytes(), path.stat().st_mtime_ns


@pytest.mark.parametrize(
    "name", ["queue.db", "queue.db-wal", "queue.db-shm", "acks.db", "acks.db-wal"]
)
@pytest.mark.parametrize("target_exists", [True, False])
def test_a_symlinked_database_file_is_refused(
    tmp_path: Path, name: str, target_exists: bool
) -> None:
    directory = tmp_path / "queue-0"
    queue = Queue.create(directory, HEADER)
    append_row(queue, big_histogram_row(0, count=10))
    queue.close()  # SQLite removes the -wal and -shm files with the last connection
    target = tmp_path / "elsewhere" / name
    target.parent.mkdir()
    link = directory / name
    if link.exists():  # the database itself: moved away, a symlink in its place
        os.replace(link, target)
    elif target_exists:
        target.write_bytes(b"not for tracklog to touch")
    if not target_exists:
        target.unlink(missing_ok=True)
    os.symlink(target, link)
    before = _snapshot(target)

    with pytest.raises(OSError, match="symlink"):
        _open_both_databases(directory)
    assert _snapshot(target) == before
    assert sorted(os.listdir(target.parent)) == ([name] if target_exists else [])


def _open_both_databases(directory: Path) -> None:
    reader = Queue(directory)
    try:
        reader.acks()  # acks.db is opened at its first use
    finally:
        reader.close()


def test_a_symlinked_blob_is_refused_and_its_target_left_alone(tmp_path: Path) -> None:
    blobs, _, _ = _blob_queue(tmp_path)
    target = tmp_path / "elsewhere.npy"
    os.replace(blobs / "0-0.npy", target)
    os.symlink(target, blobs / "0-0.npy")
    before = _snapshot(target)
    [again] = read_fresh(tmp_path / "queue-0")
    with pytest.raises(CodecError):
        decode_row(again.body, blobs)
    assert _snapshot(target) == before

    # Writing: a symlink planted where the next row's blob goes is not followed.
    queue = Queue(tmp_path / "queue-0")
    os.symlink(target, blobs / "1-0.npy")
    with pytest.raises(OSError, match="symbolic links"):
        encode_row(big_histogram_row(1), {}, {}, queue.blobs)
    queue.close()
    assert _snapshot(target) == before


def test_a_symlinked_blobs_folder_is_refused(tmp_path: Path) -> None:
    blobs, _, _ = _blob_queue(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    os.replace(blobs, elsewhere)
    os.symlink(elsewhere, blobs)
    before = _snapshot(elsewhere / "0-0.npy")
    [again] = read_fresh(tmp_path / "queue-0")
    with pytest.raises(CodecError):
        decode_row(again.body, blobs)
    with pytest.raises(OSError, match=r"Not a directory|symbolic links"):
        encode_row(big_histogram_row(1), {}, {}, blobs)
    assert sorted(os.listdir(elsewhere)) == ["0-0.npy"]
    assert _snapshot(elsewhere / "0-0.npy") == before


@pytest.mark.parametrize("target_exists", [True, False])
def test_a_symlinked_lock_is_refused(tmp_path: Path, target_exists: bool) -> None:
    queue = Queue.create(tmp_path / "queue-0", HEADER)
    lock = queue.trainer_lock()
    assert lock.path == tmp_path / "queue-0" / "trainer.lock"
    target = tmp_path / "elsewhere.lock"
    if target_exists:
        target.write_bytes(b"not for tracklog to touch")
    os.symlink(target, lock.path)
    before = _snapshot(target)
    with pytest.raises(OSError, match="symlink"):
        lock.acquire()
    if target_exists:
        with pytest.raises(OSError, match="symlink"):
            lock.held_elsewhere()
    else:
        assert not lock.held_elsewhere()
    assert _snapshot(target) == before
    queue.close()


# 4. Locks across processes ----------------------------------------------------------------------


class Child:
    """A Python subprocess whose stdout lines are read with a timeout."""

    def __init__(self, script: str, *args: str, log: Path) -> None:
        self._log_path = log
        self._log = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self._lines: stdqueue.Queue[str | None] = stdqueue.Queue()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.endswith("\n"):  # a line the child finished writing
                self._lines.put(line[:-1])
        self._lines.put(None)

    def line(self, timeout: float = 60.0) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except stdqueue.Empty:
            raise AssertionError(f"no line in {timeout} s; stderr: {self.stderr()}") from None
        if line is None:
            raise AssertionError(f"the child ended ({self.process.poll()}): {self.stderr()}")
        return line

    def kill(self) -> list[str]:
        """SIGKILL the child; the lines it printed that were not read yet."""
        os.kill(self.process.pid, signal.SIGKILL)
        assert self.process.wait(timeout=30) == -signal.SIGKILL
        self._reader.join(timeout=30)
        rest = []
        while (line := self._lines.get_nowait()) is not None:
            rest.append(line)
        self.close()
        return rest

    def stderr(self) -> str:
        self._log.flush()
        return self._log_path.read_text(errors="replace")[-3000:]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()


LOCK_HOLDER: Final = """
import sys, time
from pathlib import Path
from tracklog._queue import Lock
lock = Lock(Path(sys.argv[1]))
print("held" if lock.acquire() else "refused", flush=True)
time.sleep(600)
"""


@contextlib.contextmanager
def child(script: str, *args: str, log: Path) -> Iterator[Child]:
    process = Child(script, *args, log=log)
    try:
        yield process
    finally:
        process.close()


def test_a_lock_held_by_another_process_is_free_once_it_is_killed(tmp_path: Path) -> None:
    queue = Queue.create(tmp_path / "queue-0", HEADER)
    lock = queue.trainer_lock()
    with child(LOCK_HOLDER, str(lock.path), log=tmp_path / "holder.log") as holder:
        assert holder.line() == "held"
        assert lock.held_elsewhere()
        assert not lock.acquire()
        assert lock.held_elsewhere()  # the refused attempt took nothing from the holder
        assert holder.process.poll() is None
        holder.kill()
    assert not lock.held_elsewhere()
    assert lock.acquire()
    assert not lock.held_elsewhere()  # its own holder is not "elsewhere"
    with child(LOCK_HOLDER, str(lock.path), log=tmp_path / "second.log") as second:
        assert second.line() == "refused"  # this process holds it now
    lock.release()
    assert not lock.held_elsewhere()
    queue.close()


# 5. Durability under SIGKILL ---------------------------------------------------------------------

WRITER: Final = """
import hashlib, sys, time
from pathlib import Path
import numpy as np
from tracklog._codec import INLINE_BYTES, encode_row
from tracklog._queue import Queue
from tracklog._row import Row
from tracklog.values import Histogram, Scalar, Text

queue = Queue.create(Path(sys.argv[1]), {"format": 2})
lock = queue.trainer_lock()  # held for as long as this process lives, as by Outbox
assert lock.acquire()
rng = np.random.default_rng(int(sys.argv[2]))
for i in range(10**9):
    if i % 3 == 2:
        body = "".join(map(chr, rng.integers(1, 0xD7FF, 30)))
        names = []
        seq = queue.append("line", body)
    else:
        noise = rng.standard_normal(int(rng.integers(1, 3 * INLINE_BYTES // 8)))
        noise.flags.writeable = False
        digest = hashlib.sha256(noise.tobytes()).hexdigest()
        values = {"i": Scalar(i), "noise": Histogram(noise), "digest": Text(digest)}
        body, names = encode_row(Row(i, time.time(), i, values), {}, {}, queue.blobs)
        seq = queue.append("row", body, " ".join(names))
    print(seq, hashlib.sha256(body.encode()).hexdigest(), ",".join(names), flush=True)
"""


@settings(max_examples=4)
@given(lines=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_every_append_that_returned_survives_sigkill(tmp_path: Path, lines: int, seed: int) -> None:
    directory = Path(tempfile.mkdtemp(dir=tmp_path)) / "queue-0"
    with child(WRITER, str(directory), str(seed), log=directory.parent / "writer.log") as writer:
        printed = [writer.line() for _ in range(lines)]
        assert Lock(directory / "trainer.lock").held_elsewhere()
        printed += writer.kill()  # lines it printed before the signal landed
    assert not Lock(directory / "trainer.lock").held_elsewhere()

    read = read_fresh(directory)
    seqs = [message.seq for message in read]
    said = [int(line.split(" ")[0]) for line in printed]
    assert seqs[: len(said)] == said  # every printed seq, in order, nothing before them lost
    assert len(seqs) - len(said) in (0, 1)  # at most the append the signal cut off from print
    digests = {int(seq): digest for seq, digest, _ in (line.split(" ") for line in printed)}
    for message in read:
        if message.seq in digests:
            assert hashlib.sha256(message.body.encode()).hexdigest() == digests[message.seq]
        if message.kind == "row":
            row = decode_row(message.body, directory / BLOBS).row  # blob files intact too
            noise, digest = row.values["noise"], row.values["digest"]
            assert isinstance(noise, Histogram)
            assert isinstance(digest, Text)
            assert hashlib.sha256(noise.values.tobytes()).hexdigest() == digest.value
        else:
            assert message.kind == "line"


# 6. Acks, state, forget, find_queues --------------------------------------------------------------

CONSUMERS: Final = ("0-mlflow", "1-wandb", MEDIA)


class QueueMachine(RuleBasedStateMachine):
    """The training side appends; a delivery side acks, publishes state and forgets;
    after every step a fresh Queue must read exactly what the model holds."""

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="tracklog-queue-"))
        self.directory = self.root / "queue-0"
        self.writer = Queue.create(self.directory, HEADER)
        self.delivery = Queue(self.directory)
        self.messages: dict[int, tuple[str, str, str]] = {}
        self.last = 0
        self.row_seq = 0
        self.acked: dict[str, int] = {}
        self.states: dict[str, dict[str, str]] = {}

    def _appended(self, seq: int, kind: str, body: str, blobs: str) -> None:
        assert seq > self.last  # never reused, also after forget()
        self.last = seq
        self.messages[seq] = (kind, body, blobs)

    @rule(big=st.booleans(), step=INT64)
    def append_row(self, big: bool, step: int) -> None:
        self.row_seq += 1
        row = big_histogram_row(self.row_seq, count=9000 if big else 10)
        row = dataclasses.replace(row, step=step)
        body, names = encode_row(row, {}, {}, self.writer.blobs)
        assert len(names) == int(big)
        self._appended(
            self.writer.append("row", body, " ".join(names)), "row", body, " ".join(names)
        )

    @rule(kind=st.sampled_from(["line", "failed", "flush", "close"]), text=TEXTS)
    def append_other(self, kind: Kind, text: str) -> None:
        self._appended(self.writer.append(kind, text), kind, text, "")

    @rule(consumer=st.sampled_from(CONSUMERS), data=st.data())
    def ack(self, consumer: str, data: st.DataObject) -> None:
        seq = data.draw(st.integers(0, self.last), label="seq")
        self.delivery.ack(consumer, seq)
        self.acked[consumer] = seq

    @rule(data=st.data())
    def forget(self, data: st.DataObject) -> None:
        up_to = data.draw(st.integers(0, self.last), label="up_to")
        self.delivery.forget(up_to)
        self.messages = {seq: m for seq, m in self.messages.items() if seq > up_to}

    @rule(
        consumer=st.sampled_from(CONSUMERS),
        values=st.dictionaries(st.sampled_from(["run_id", "built", "gave_up"]), TEXTS, max_size=2),
    )
    def set_state(self, consumer: str, values: dict[str, str]) -> None:
        self.delivery.set_state(consumer, values)
        self.states.setdefault(consumer, {}).update(values)

    @rule()
    def restart_delivery(self) -> None:
        self.delivery.close()
        self.delivery = Queue(self.directory)

    @invariant()
    def a_fresh_queue_reads_the_model(self) -> None:
        fresh = Queue(self.directory)
        try:
            read = fresh.read(0, 10**6)
            assert [(m.seq, m.kind, m.body, m.blobs) for m in read] == [
                (seq, *self.messages[seq]) for seq in sorted(self.messages)
            ]
            assert fresh.last_seq() == self.last
            assert fresh.acks() == self.acked
            for consumer in CONSUMERS:
                assert fresh.acked(consumer) == self.acked.get(consumer, 0)
                assert fresh.state(consumer) == self.states.get(consumer, {})
            for count in range(len(CONSUMERS) + 1):
                consumers = list(CONSUMERS[:count])
                low = min((self.acked.get(name, 0) for name in consumers), default=self.last)
                pending = sum(seq > low for seq in self.messages)
                assert fresh.pending(consumers) == pending
            names = [name for _, _, blobs in self.messages.values() for name in blobs.split()]
            assert sorted(os.listdir(self.directory / BLOBS)) == sorted(names)
            for message in read:
                if message.kind == "row":
                    decode_row(message.body, fresh.blobs)
        finally:
            fresh.close()

    def teardown(self) -> None:
        self.writer.close()
        self.delivery.close()
        shutil.rmtree(self.root)


TestQueueMachine = QueueMachine.TestCase
TestQueueMachine.settings = settings(max_examples=12, stateful_step_count=25)


# Regression: Queue.forget() unlinked ``self.blobs / name`` for every name in a message's
# blobs column, unchecked: "../x" and absolute paths deleted files outside the queue (the
# column is as untrusted as the body: replay reads foreign queues).
def test_forget_deletes_nothing_outside_blobs(tmp_path: Path) -> None:
    relative, absolute = tmp_path / "relative.txt", tmp_path / "absolute.txt"
    for victim in (relative, absolute):
        victim.write_text("not the queue's")
    queue = Queue.create(tmp_path / "queue-0", HEADER)
    queue.append("row", "{}", f"../../relative.txt {absolute}")
    queue.forget(queue.last_seq())
    queue.close()
    assert relative.exists()
    assert absolute.exists()


def test_the_header_and_meta_read_back(tmp_path: Path) -> None:
    Queue.create(tmp_path / "queue-0", HEADER).close()
    queue = Queue(tmp_path / "queue-0")
    assert queue.header() == HEADER
    assert queue.meta("closed") is None
    queue.set_meta("closed", "1700000000.5")
    queue.close()
    again = Queue(tmp_path / "queue-0")
    assert again.meta("closed") == "1700000000.5"
    again.close()
    Queue.create(tmp_path / "other", {**HEADER, "format": 1}).close()  # before the inbox's format 2
    old = Queue(tmp_path / "other")
    with pytest.raises(ValueError, match="format"):
        old.header()
    old.close()


def test_find_queues_finds_a_queue_a_folder_of_queues_and_a_run_dirs_spool(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    spool = run_dir / "spool"
    queues = [spool / "queue-0", spool / "queue-1"]
    for directory in queues:
        Queue.create(directory, HEADER).close()
    (spool / "queue-2").mkdir()  # no queue.db: not a queue
    (spool / "queue-3").mkdir()
    os.symlink(queues[0] / "queue.db", spool / "queue-3" / "queue.db")  # not its own
    (spool / "stray.txt").write_text("")

    assert find_queues(queues[1]) == [queues[1]]
    assert sorted(find_queues(spool)) == queues
    assert sorted(find_queues(run_dir)) == queues
    assert find_queues(spool / "queue-2") == []
    assert find_queues(spool / "queue-3") == []
    assert find_queues(tmp_path / "missing") == []
    linked = tmp_path / "linked-run"
    (linked).mkdir()
    os.symlink(spool, linked / "spool")  # a spool/ that is a symlink is not followed
    assert find_queues(linked) == []


# 7. A full disk ---------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A real tmpfs, 1 MiB unless the test is marked ``disk_size("8m")`` (needs root
    and mount(8); skipped otherwise)."""
    marker = request.node.get_closest_marker("disk_size")
    size = str(marker.args[0]) if marker is not None else "1m"
    mount = tmp_path / "disk"
    mount.mkdir()
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("a tmpfs needs root on Linux")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=True)  # still in use: detach


def test_rows_the_full_disk_refused_are_queued_in_order_once_it_has_room(
    small_disk: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The trainer's side of a full disk: each refused row raises (the logger reports
    it), waits in memory behind the earlier ones, and is queued, in order and once,
    by the first append after the disk has room. (Such rows used to be dropped.)"""
    from tracklog._outbox import Outbox
    from tracklog.settings import LoggerSettings

    settings = LoggerSettings.model_validate(
        {"run_dir": str(tmp_path / "run"), "delivery": {"spool_dir": str(small_disk / "spool")}}
    )
    outbox = Outbox(settings, [], media=False, files=False, strict=False)  # no delivery
    try:
        for step in range(3):
            outbox.put_row(big_histogram_row(step), {}, {})
        filler = _fill(small_disk)
        with caplog.at_level(logging.ERROR, logger="tracklog"):
            for step in range(3, 8):
                with pytest.raises(OSError, match=r"No space left|requested and .* written"):
                    outbox.put_row(big_histogram_row(step), {}, {})
        said = [r.getMessage() for r in caplog.records]
        assert sum("cannot take rows (is its disk full?)" in m for m in said) == 1, said
        filler.unlink()
        for step in range(8, 10):
            outbox.put_row(big_histogram_row(step), {}, {})
        directory = outbox.directory
        rows = [decode_row(message.body, directory / BLOBS) for message in read_fresh(directory)]
        assert [decoded.row.step for decoded in rows] == list(range(10))
        for decoded in rows:
            assert_same_row(decoded, big_histogram_row(decoded.row.step), {}, {})
    finally:
        outbox.drop()


@pytest.mark.parametrize("when", ["at start", "at an ack"])
def test_delivery_waits_out_a_full_disk_and_goes_on_once_it_has_room(
    small_disk: Path, tmp_path: Path, when: str
) -> None:
    """The delivery side of a full disk (the queue's disk; the output's is elsewhere):
    recording its progress in acks.db fails with SQLITE_FULL. That used to stop the
    output's worker for good ("the delivery worker stopped"): nothing more reached the
    output until a replay by hand. Now it waits, says so once, and goes on."""
    from tests.tensorboard_readback import read_events
    from tracklog._delivery import Delivery
    from tracklog.settings import DeliverySettings

    run_dir = tmp_path / "run"  # TensorBoard's files: not on the small disk
    consumer = "0-tensorboard"
    # linger: the worker holds the rows it read for 1 s before it writes and acks them
    delivery = DeliverySettings(linger=1.0, retry_initial=0.05, retry_max=0.2)
    header = {
        "format": FORMAT,
        "run_dir": str(run_dir),
        "delivery": delivery.model_dump(mode="json"),
        "outputs": [{"consumer": consumer, "index": 0, "settings": {"type": "tensorboard"}}],
        "identity": {consumer: {}},
    }
    writer = Queue.create(small_disk / "queue-0", header)
    scalar = {"a": Scalar(1.0)}
    steps = range(3) if when == "at start" else range(6)
    for step in steps[:3]:
        append_row(writer, Row(step=step, timestamp=1.7e9, seq=step, values=scalar))
    assert len(read_fresh(writer.directory)) == 3  # in queue.db, whose WAL is gone again
    said: list[str] = []
    trainer_gone = threading.Event()
    filler = _fill(small_disk) if when == "at start" else None
    reader = Queue(writer.directory)
    worker = threading.Thread(
        target=lambda: said.append(
            str(
                Delivery(
                    reader,
                    secrets=None,
                    trainer_gone=trainer_gone.is_set,
                    report=lambda level, message, warning=False: said.append(message),
                ).run()
            )
        )
    )
    worker.start()
    try:
        if filler is None:  # the first rows are acked; the next ones read, then the disk fills
            _wait_until(lambda: _acked(writer.directory, consumer) == 3)  # seq 1, 2, 3
            for step in steps[3:]:
                append_row(writer, Row(step=step, timestamp=1.7e9, seq=step, values=scalar))
            _wait_until(lambda: len(read_fresh(writer.directory)) == 6)  # moved, to be acked
            filler = _fill(small_disk)
        _wait_until(lambda: any("cannot write to" in message for message in said))
        time.sleep(0.5)  # retried meanwhile
        assert not any("worker stopped" in message for message in said), said
        filler.unlink()
        _wait_until(lambda: _acked(writer.directory, consumer) == len(steps), said)
        writer.append("close")
        writer.close()
        trainer_gone.set()
        worker.join(30)
        assert not worker.is_alive()
    finally:
        trainer_gone.set()
        worker.join(30)
    assert said[-1] == "True", said  # everything delivered (and the queue removed)
    assert sum("cannot write to" in message for message in said) == 1, said
    assert sum("takes writes again" in message for message in said) == 1, said
    assert not (small_disk / "queue-0").exists()
    events = read_events(run_dir / "tensorboard")
    assert sorted(event.step for event in events.Scalars("a")) == list(steps)


def _acked(directory: Path, consumer: str) -> int:
    fresh = Queue(directory)
    try:
        return fresh.acked(consumer)
    finally:
        fresh.close()


def _wait_until(condition: Callable[[], bool], said: object = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out; said {said}"
        time.sleep(0.02)


def _fill(disk: Path) -> Path:
    """Fill ``disk`` to the last byte; the file that does it."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (65536, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, bytes(chunk))
    finally:
        os.close(fd)
    assert os.statvfs(disk).f_bavail == 0
    return filler


# Regression: encode_row left the half-written .npy of a failed row in blobs/ (on the
# disk that had just filled up), and nothing ever removed it: no message names it.
@pytest.mark.parametrize("fsync", [False, True])
def test_an_append_on_a_full_disk_raises_and_leaves_nothing_behind(
    small_disk: Path, fsync: bool
) -> None:
    directory = small_disk / "queue-0"
    queue = Queue.create(directory, HEADER, fsync=fsync)
    try:
        _fill_and_append(small_disk, queue)
    finally:
        queue.close()


def _fill_and_append(disk: Path, queue: Queue) -> None:
    directory = queue.directory
    written = [big_histogram_row(0), big_histogram_row(1, count=10)]
    seqs = [append_row(queue, row) for row in written]
    blobs_before = sorted(os.listdir(queue.blobs))
    assert blobs_before == ["0-0.npy"]
    assert [m.seq for m in read_fresh(directory)] == seqs  # moved into queue.db
    filler = _fill(disk)

    # Its array cannot be written to blobs/ (numpy reports a short write without errno).
    with pytest.raises(OSError, match=r"No space left on device|requested and .* written"):
        encode_row(big_histogram_row(2), {}, {}, queue.blobs)
    assert sorted(os.listdir(queue.blobs)) == blobs_before  # no half-written file left
    small = big_histogram_row(2, count=10)
    body, names = encode_row(small, {}, {}, queue.blobs)
    assert names == []
    # A short record may still fit the inbox's last allocated page; a long one cannot.
    # An append that fails leaves no part of its record behind and takes no number.
    attempts: list[tuple[Kind, str]] = [("row", body), ("line", "x" * 10_000), ("flush", "")]
    failed = 0
    for kind, text in attempts:
        sizes = {path.name: path.stat().st_size for path in directory.glob("inbox-*.log")}
        try:
            seqs.append(queue.append(kind, text))
            written.append(small if kind == "row" else kind)  # type: ignore[arg-type]
        except OSError as error:
            assert error.errno == errno.ENOSPC  # noqa: PT017  # some appends may succeed
            failed += 1
            after = {path.name: path.stat().st_size for path in directory.glob("inbox-*.log")}
            assert after == sizes
    assert failed >= 1
    # Readable on the full disk too: what was moved before (moving more needs room).
    assert [m.seq for m in read_fresh(directory)][:2] == seqs[:2]

    filler.unlink()
    seqs.append(queue.append("row", body))  # the caller tries again once there is room
    written.append(small)
    assert seqs[-1] == seqs[-2] + 1  # the failed appends took no number
    read = read_fresh(directory)
    assert [message.seq for message in read] == seqs
    rows = [(m, row) for m, row in zip(read, written, strict=True) if isinstance(row, Row)]
    assert [m.kind for m, _ in rows] == ["row"] * len(rows)
    for message, row in rows:
        assert_same_row(decode_row(message.body, directory / BLOBS), row, {}, {})


def test_deep_hparams_are_refused_at_the_same_depth_whatever_the_recursion_limit() -> None:
    """Another library may raise Python's recursion limit in the delivery process: the
    reader's refusal of deep nesting does not depend on it, nor does record()'s."""
    import sys

    from tracklog import HParam

    deep = _ROW % (
        '{"h":{"type":"hparam","hparams":' + '{"a":' * 150 + "1" + "}" * 150 + ',"metrics":{}}}'
    )
    nested: dict[str, object] = {"a": 1}
    for _ in range(150):
        nested = {"a": nested}
    limit = sys.getrecursionlimit()
    try:
        sys.setrecursionlimit(20_000)
        with pytest.raises(CodecError, match="nested more than 100 levels"):
            decode_row(deep, None)
        with pytest.raises(ValueError, match="nested more than 100 levels"):
            HParam(nested)
    finally:
        sys.setrecursionlimit(limit)
