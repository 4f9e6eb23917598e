"""The on-disk spool (``tracklog._spool``): its records, its torn tails, its ack and its lock.

The spool is what a background output owes its backend, written before training goes
on; a process may die at any byte of it. These tests write records through ``Spool``
(or ``Message.encode``), damage the file the way a crash or a bad sector would, and read
it back through a *new* ``Spool`` (what a restarted logger or ``tracklog replay`` does).
"""

from __future__ import annotations

import builtins
import errno
import io
import math
import os
import pathlib
import struct
import zlib
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tracklog._spool
from tests.samples import NESTED_HPARAMS, one_of_every_kind, random_pixels
from tracklog._delivery import Message
from tracklog._row import Row
from tracklog._spool import Spool, SpoolBusyError, free_directory, owed, read_acked
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

HEADER: dict[str, Any] = {"format": 1, "output": "test"}
_FRAME_HEAD = 8  # <length u32><crc32 u32>, as documented in DEVELOPERS.md


# Comparing values read back ----------------------------------------------------------


def _same_number(read: object, expected: object) -> bool:
    if type(read) is not type(expected):
        return False
    if isinstance(expected, float) and isinstance(read, float):
        return struct.pack("<d", read) == struct.pack("<d", expected) or (
            math.isnan(read) and math.isnan(expected)
        )
    return read == expected


def _same_plain(read: object, expected: object) -> bool:
    """Equal plain data (dicts, lists, numbers, str, None), NaN equal to NaN, key order kept."""
    if isinstance(expected, dict):
        return (
            isinstance(read, dict)
            and list(read) == list(expected)
            and all(_same_plain(read[key], value) for key, value in expected.items())
        )
    if isinstance(expected, list):
        return (
            isinstance(read, list)
            and len(read) == len(expected)
            and all(_same_plain(a, b) for a, b in zip(read, expected, strict=True))
        )
    return _same_number(read, expected)


def _same_array(read: npt.NDArray[Any], expected: npt.NDArray[Any]) -> bool:
    return (
        read.dtype == expected.dtype
        and read.shape == expected.shape
        and read.tobytes() == expected.tobytes()  # bit-exact, NaN payloads included
        and not read.flags.writeable  # values are read-only snapshots, also after replay
    )


def assert_same_value(read: LogValue, expected: LogValue) -> None:
    """``read`` is ``expected`` as an output would receive it; matplotlib stays behind."""
    assert type(read) is type(expected)
    match expected:
        case Scalar():
            assert isinstance(read, Scalar)
            assert _same_number(read.value, expected.value), (read, expected)
        case Text():
            assert read == expected
        case Histogram():
            assert isinstance(read, Histogram)
            assert _same_array(read.values, expected.values)
        case Image():
            assert isinstance(read, Image)
            assert _same_array(read.image, expected.image)
            assert read.dataformats == expected.dataformats == "NHWC"
        case Figure():
            assert isinstance(read, Figure)
            assert read.png == expected.png
            assert read.size == expected.size
        case Video():
            assert isinstance(read, Video)
            assert _same_array(read.frames, expected.frames)
            assert read.fps == expected.fps
        case HParam():
            assert isinstance(read, HParam)
            assert _same_plain(read.plain(), expected.plain())
            assert _same_plain(dict(read.metric_dict), dict(expected.metric_dict))
            assert _same_plain(read.flat(), expected.flat())


def assert_same_message(read: Message, expected: Message) -> None:
    assert (read.kind, read.text) == (expected.kind, expected.text)
    if expected.row is None:
        assert read.row is None
        return
    assert read.row is not None
    assert (read.row.step, read.row.seq) == (expected.row.step, expected.row.seq)
    assert _same_number(read.row.timestamp, expected.row.timestamp)
    assert list(read.row.values) == list(expected.row.values)  # key order kept
    for key, value in expected.row.values.items():
        assert_same_value(read.row.values[key], value)


# Messages round trip ---------------------------------------------------------------


def test_a_row_of_every_kind_round_trips(tmp_path: Path) -> None:
    values = {key: normalise(key, value) for key, value in one_of_every_kind().items()}
    values["nested"] = HParam(NESTED_HPARAMS, {"reward": 1.5})
    values["bool"] = Scalar(True)
    values["int64"] = Scalar(-(2**63))
    values["nan"] = Scalar(math.nan)
    row = Row(step=2**63 - 1, timestamp=1.7e9 + 0.123456, seq=41, values=values)
    messages = [
        Message("line", text="an info() line\nwith a break ✓"),
        Message("row", row=row),
        Message("failed", text="SIGTERM"),
        Message("close"),
    ]
    spool = Spool(tmp_path / "0-test", HEADER)
    spool.append([message.encode() for message in messages])
    spool.close(remove=False)

    reopened = Spool(tmp_path / "0-test", HEADER)
    reopened.claim()
    assert reopened.pending == len(messages)
    read = [Message.decode(reopened.read_next()) for _ in messages]
    for got, expected in zip(read, messages, strict=True):
        assert_same_message(got, expected)
    figure = read[1].row.values["figure"] if read[1].row is not None else None
    assert isinstance(figure, Figure)
    matplotlib_figure: object = figure.figure
    assert matplotlib_figure is None  # only the PNG travels, not the matplotlib figure
    reopened.close(remove=True)


_FLOATS = st.floats(allow_nan=True, allow_infinity=True)
_PARAMS: st.SearchStrategy[object] = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | _FLOATS | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(min_size=1, max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
_PIXELS = hnp.arrays(
    np.uint8,
    st.tuples(st.integers(1, 4), st.integers(1, 4), st.sampled_from([1, 3, 4])),
)


@st.composite
def log_values(draw: st.DrawFn) -> LogValue:
    """Any value an output can receive, built the way ``record()`` builds it."""
    kind = draw(st.sampled_from(["scalar", "text", "histogram", "image", "video", "hparam"]))
    raw: object
    if kind == "scalar":
        raw = draw(st.booleans() | st.integers(-(2**63), 2**63 - 1) | _FLOATS)
    elif kind == "text":
        raw = draw(st.text(st.characters(exclude_categories=["Cs"]), max_size=20))
    elif kind == "histogram":
        raw = draw(
            hnp.arrays(
                st.sampled_from([np.float64, np.float32, np.int64, np.uint8, np.bool_]),
                st.integers(1, 20),
            )
        )
    elif kind == "image":
        raw = Image(draw(_PIXELS))
    elif kind == "video":
        frames = draw(
            hnp.arrays(
                np.uint8,
                st.tuples(
                    st.integers(1, 3),
                    st.sampled_from([1, 3]),
                    st.integers(1, 4),
                    st.integers(1, 4),
                ),
            )
        )
        raw = Video(frames, fps=draw(st.floats(0.01, 1000)))
    else:
        params = draw(st.dictionaries(st.text(min_size=1, max_size=5), _PARAMS, max_size=4))
        metrics = draw(st.dictionaries(st.text(min_size=1, max_size=5), _FLOATS, max_size=2))
        raw = HParam(params, metrics)
    return normalise("key", raw)


_ROWS = st.builds(
    Row,
    step=st.integers(-(2**63), 2**63 - 1),
    timestamp=st.floats(0, 4e9),
    seq=st.integers(0, 2**40),
    values=st.dictionaries(st.text(min_size=1, max_size=6), log_values(), max_size=4),
)
_MESSAGES: st.SearchStrategy[Message] = st.one_of(
    st.builds(Message, st.just("row"), row=_ROWS),
    st.builds(Message, st.just("line"), text=st.text(max_size=30)),
    st.builds(Message, st.just("failed"), text=st.sampled_from(["SIGTERM", "RuntimeError"])),
    st.just(Message("close")),
)


@settings(max_examples=60)
@given(message=_MESSAGES)
def test_any_message_round_trips_through_its_encoding(message: Message) -> None:
    assert_same_message(Message.decode(message.encode()), message)


def test_a_figure_is_kept_as_its_png() -> None:
    figure, axes = plt.subplots(figsize=(2, 1), dpi=30)
    axes.plot([0, 1], [1, 0])
    value = Figure(figure)
    row = Row(
        step=0, timestamp=0.0, seq=0, values={"fig": value, "img": Image(random_pixels((3, 2, 4)))}
    )
    read = Message.decode(Message("row", row=row).encode()).row
    assert read is not None
    assert_same_value(read.values["fig"], value)
    assert read.values["fig"].size == (60, 30)  # type: ignore[union-attr]  # checked above


# Torn and corrupted tails ----------------------------------------------------------


def _frame_ends(records: list[bytes]) -> list[int]:
    ends, position = [], 0
    for data in records:
        position += _FRAME_HEAD + len(data)
        ends.append(position)
    return ends


def _read_all(spool: Spool) -> list[bytes]:
    return [spool.read_next() for _ in range(spool.pending)]


@settings(max_examples=60)
@given(
    batches=st.lists(
        st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=4),  # never empty
        min_size=1,
        max_size=4,
    ),
    damage=st.sampled_from(["cut", "flip", "garbage"]),
    data=st.data(),
)
def test_a_torn_or_corrupted_tail_keeps_exactly_the_intact_prefix(
    tmp_path_factory: pytest.TempPathFactory,
    batches: list[list[bytes]],
    damage: str,
    data: st.DataObject,
) -> None:
    directory = tmp_path_factory.mktemp("spool") / "0-test"
    spool = Spool(directory, HEADER)
    for batch in batches:  # one append per dump
        spool.append(batch)
    spool.close(remove=False)
    records = [record for batch in batches for record in batch]
    path = directory / "records.log"
    content = path.read_bytes()
    ends = _frame_ends(records)
    assert len(content) == ends[-1]

    if damage == "cut":  # the process died in the middle of a write
        cut = data.draw(st.integers(0, len(content) - 1), label="cut")
        path.write_bytes(content[:cut])
        kept = sum(1 for end in ends if end <= cut)
    elif damage == "flip":  # one byte changed anywhere: the log ends before that frame
        position = data.draw(st.integers(0, len(content) - 1), label="position")
        mask = data.draw(st.integers(1, 255), label="mask")
        damaged = bytearray(content)
        damaged[position] ^= mask
        path.write_bytes(bytes(damaged))
        kept = sum(1 for end in ends if end <= position)
    else:  # junk after the last frame: a frame header cut short, or bytes that are none
        tail = data.draw(
            # 8 zero bytes happen to be a valid empty frame: see the zero-filled-tail test
            st.binary(min_size=1, max_size=12).filter(lambda tail: tail[:8] != bytes(8)),
            label="tail",
        )
        path.write_bytes(content + tail)
        kept = len(records)

    reopened = Spool(directory, HEADER)
    reopened.claim()
    assert _read_all(reopened) == records[:kept]
    assert path.stat().st_size == (ends[kept - 1] if kept else 0)  # the damage is cut away
    # Appending goes on after the intact prefix, never after the damage.
    reopened.append([b"after the crash"])
    assert reopened.read_next() == b"after the crash"
    reopened.close(remove=False)
    again = Spool(directory, HEADER)
    again.claim()
    assert _read_all(again) == [*records[:kept], b"after the crash"]
    again.close(remove=True)
    assert not directory.exists()


def test_a_frame_is_length_checksum_and_payload(tmp_path: Path) -> None:
    # The documented format (DEVELOPERS.md), so a spool can be inspected by hand.
    spool = Spool(tmp_path / "0-test", HEADER)
    spool.append([b"abc", b"de"])
    spool.close(remove=False)
    content = (tmp_path / "0-test" / "records.log").read_bytes()
    expected = b"".join(
        struct.pack("<II", len(data), zlib.crc32(data)) + data for data in (b"abc", b"de")
    )
    assert content == expected


# Regression: a zero-length frame with crc 0 is accepted as a record (crc32(b"") == 0), so a
# zero-filled tail, which a power loss can leave after the last fsynced frame (XFS, ext4
# delayed allocation), reads as hundreds of empty records; Message.decode(b"") then
# raises EOFError, which stops the delivery worker or `tracklog replay` before it
# delivers anything.
def test_a_zero_filled_tail_is_a_torn_frame_not_records(tmp_path: Path) -> None:
    directory = tmp_path / "0-test"
    spool = Spool(directory, HEADER)
    record = Message("line", text="kept").encode()
    spool.append([record])
    spool.close(remove=False)
    with open(directory / "records.log", "ab") as file:
        file.write(bytes(4096))  # what a power loss can leave instead of the last frame
    reopened = Spool(directory, HEADER)
    reopened.claim()
    assert _read_all(reopened) == [record]
    reopened.close(remove=False)


# Acknowledgements ------------------------------------------------------------------


@settings(max_examples=40)
@given(
    records=st.lists(st.binary(min_size=1, max_size=10), min_size=1, max_size=8),
    data=st.data(),
)
def test_acked_records_are_not_read_again_after_a_reopen(
    tmp_path_factory: pytest.TempPathFactory, records: list[bytes], data: st.DataObject
) -> None:
    directory = tmp_path_factory.mktemp("spool") / "0-test"
    spool = Spool(directory, HEADER)
    spool.append(records)
    delivered = data.draw(st.integers(0, len(records)), label="delivered")
    assert [spool.read_next() for _ in range(delivered)] == records[:delivered]
    spool.ack(delivered)
    spool.close(remove=False)
    assert read_acked(directory) == delivered
    assert owed(directory) == len(records) - delivered

    reopened = Spool(directory, HEADER)
    reopened.claim()
    assert _read_all(reopened) == records[delivered:]
    reopened.close(remove=False)


def test_an_ack_beyond_a_torn_tail_reads_nothing_twice(tmp_path: Path) -> None:
    directory = tmp_path / "0-test"
    spool = Spool(directory, HEADER)
    spool.append([b"one", b"two", b"three"])
    spool.ack(3)
    spool.close(remove=False)
    path = directory / "records.log"
    path.write_bytes(path.read_bytes()[:-2])  # "three" torn after it was acked
    reopened = Spool(directory, HEADER)
    reopened.claim()
    assert reopened.pending == 0
    reopened.append([b"four"])
    assert _read_all(reopened) == [b"four"]
    reopened.close(remove=False)


@pytest.mark.parametrize("acked", ["", "garbage", "-"])
def test_an_unreadable_ack_means_nothing_was_delivered(tmp_path: Path, acked: str) -> None:
    directory = tmp_path / "0-test"
    spool = Spool(directory, HEADER)
    spool.append([b"one", b"two"])
    spool.close(remove=False)
    (directory / "acked").write_text(acked)
    reopened = Spool(directory, HEADER)
    reopened.claim()
    assert _read_all(reopened) == [b"one", b"two"]  # delivered again rather than lost
    reopened.close(remove=False)


def test_prepend_puts_records_before_the_unread_ones(tmp_path: Path) -> None:
    directory = tmp_path / "0-test"
    spool = Spool(directory, HEADER)
    spool.append([b"a", b"b", b"c"])
    assert spool.read_next() == b"a"
    spool.ack(1)
    spool.prepend([b"x", b"y"])  # a delivery taken from memory failed: it goes first
    spool.append([b"d"])
    assert _read_all(spool) == [b"x", b"y", b"b", b"c", b"d"]
    spool.close(remove=False)
    reopened = Spool(directory, HEADER)
    reopened.claim()  # and on disk, after the acked record
    assert _read_all(reopened) == [b"x", b"y", b"b", b"c", b"d"]
    reopened.close(remove=False)


def test_reset_empties_the_log_and_close_removes_the_directory(tmp_path: Path) -> None:
    directory = tmp_path / "spool" / "0-test"
    spool = Spool(directory, HEADER)
    spool.append([b"a"])
    spool.read_next()
    spool.ack(1)
    spool.reset()
    assert owed(directory) == 0
    assert (directory / "records.log").stat().st_size == 0
    spool.append([b"b"])
    assert _read_all(spool) == [b"b"]
    spool.close(remove=True)
    assert not directory.exists()
    assert not directory.parent.exists()  # the empty spool/ folder goes too


def test_close_keeps_files_it_does_not_own(tmp_path: Path) -> None:
    directory = tmp_path / "spool" / "0-test"
    spool = Spool(directory, HEADER)
    spool.claim()
    (directory / "staging").mkdir()
    (directory / "staging" / "train.log").write_text("unsent\n")
    spool.close(remove=True)
    assert (directory / "staging" / "train.log").read_text() == "unsent\n"
    assert not (directory / "records.log").exists()


# Ownership -------------------------------------------------------------------------


def test_a_second_owner_of_a_spool_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "0-test"
    first = Spool(directory, HEADER)
    first.append([b"owned"])
    second = Spool(directory, HEADER)
    with pytest.raises(SpoolBusyError, match="in use by pid"):
        second.claim()
    assert not second.claimed
    assert _read_all(first) == [b"owned"]  # the refused claim changed nothing
    first.close(remove=False)
    second.claim()  # free once the owner let go
    assert _read_all(second) == [b"owned"]
    second.close(remove=True)


def test_the_header_is_written_at_claim(tmp_path: Path) -> None:
    import json

    directory = tmp_path / "0-test"
    spool = Spool(directory, {"output": "mlflow", "run_key": "abc"})
    spool.claim()
    assert json.loads((directory / "header.json").read_text()) == {
        "output": "mlflow",
        "run_key": "abc",
    }
    spool.close(remove=True)


def test_free_directory_skips_leftovers(tmp_path: Path) -> None:
    base = tmp_path / "spool" / "1-mlflow"
    assert free_directory(base) == base  # nothing there
    base.mkdir(parents=True)
    assert free_directory(base) == base  # an empty directory is free
    (base / "records.log").write_bytes(b"left by a dead process")
    assert free_directory(base) == base.with_name("1-mlflow~2")
    second = base.with_name("1-mlflow~2")
    second.mkdir()
    assert free_directory(base) == second  # empty again
    (second / "header.json").write_text("{}")
    assert free_directory(base) == base.with_name("1-mlflow~3")


# A full disk ---------------------------------------------------------------------------


class FullDisk:
    """The disk under the spools fills up and frees again, on demand.

    A real full disk cannot be made on demand without root, so this patches the spool
    module's own file access, and only that: its records log, header and ``acked``
    files. ``mode="write"``: write(2) fails with ENOSPC, and Python's buffered files
    behave as on a real full disk (a failed flush keeps its bytes for the next one).
    ``mode="fsync"``: the bytes reach the file but fsync fails (delayed allocation,
    NFS, thin provisioning).
    """

    def __init__(self, mode: str, root: Path) -> None:
        self.mode = mode
        self.root = root.resolve()
        self.full = False

    def _refuses(self, path: str | os.PathLike[str], mode: str) -> bool:
        inside = Path(path).resolve().is_relative_to(self.root)
        return self.full and self.mode == mode and inside

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        disk = self

        class Raw(io.FileIO):
            def write(self, data: Any) -> int:
                if disk._refuses(str(self.name), "write"):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.name))
                return super().write(data)

        def spool_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if mode == "ab":  # the records log
                return io.BufferedWriter(Raw(file, "ab"))
            if mode == "w":  # header.json (written atomically)
                return io.TextIOWrapper(io.BufferedWriter(Raw(file, "w")), **kwargs)
            return builtins.open(file, mode, *args, **kwargs)

        class Os:
            def __getattr__(self, name: str) -> Any:
                return getattr(os, name)

            @staticmethod
            def fsync(fd: int) -> None:
                if disk.full and disk.mode == "fsync":
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                os.fsync(fd)

        real_write_text = pathlib.Path.write_text

        def write_text(path: pathlib.Path, data: str, *args: Any, **kwargs: Any) -> int:
            if disk._refuses(path, "write"):  # the acked file
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return real_write_text(path, data, *args, **kwargs)

        monkeypatch.setattr(tracklog._spool, "open", spool_open, raising=False)
        monkeypatch.setattr(tracklog._spool, "os", Os())
        monkeypatch.setattr(pathlib.Path, "write_text", write_text)


def _refused(spool: Spool, call: str, records: list[bytes]) -> None:
    with pytest.raises(OSError, match="No space left") as error:
        getattr(spool, call)(records)
    assert error.value.errno == errno.ENOSPC


# Regression: Spool.append writes its frames and only then counts them (written += n) after
# flush() and fsync() succeed. When either fails, the frames stay in the file (fsync) or
# in the BufferedWriter's buffer (write: flushed by the next write), uncounted. The
# Channel keeps those messages in memory and spills them again later, so the file then
# holds the orphan copies followed by the real frames while `written` counts only the
# latter: the reader returns the orphans and never reaches the last records, which
# Channel._take's reset() then truncates away (rows lost without an error).
@pytest.mark.parametrize("mode", ["write", "fsync"])
def test_a_failed_append_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    disk = FullDisk(mode, tmp_path)
    disk.install(monkeypatch)
    spool = Spool(tmp_path / "0-test", HEADER)
    spool.append([b"a"])
    disk.full = True
    _refused(spool, "append", [b"b"])  # the caller keeps b and tries again later
    disk.full = False
    spool.append([b"b", b"c"])
    assert _read_all(spool) == [b"a", b"b", b"c"]
    spool.close(remove=False)
    reopened = Spool(tmp_path / "0-test", HEADER)
    reopened.claim()
    assert _read_all(reopened) == [b"a", b"b", b"c"]
    reopened.close(remove=False)


# Regression: Spool.prepend truncates the file at the read position before it writes the new
# records and the unread rest again; if that write fails (ENOSPC), the unread records
# are no longer on disk (a process dying now loses them, though they were fsynced) and
# the reader stands at the end of the truncated file, so read_next() raises "unreadable"
# (which stops the delivery worker). Reached from Channel._deliver and Channel._abandon
# (close_timeout) when a delivery taken from memory fails while the spool holds newer
# records.
def test_a_failed_prepend_keeps_the_unread_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = FullDisk("write", tmp_path)
    disk.install(monkeypatch)
    directory = tmp_path / "0-test"
    spool = Spool(directory, HEADER)
    spool.append([b"a", b"b", b"c"])
    assert spool.read_next() == b"a"
    spool.ack(1)
    disk.full = True
    _refused(spool, "prepend", [b"x"])
    assert owed(directory) == 2  # b and c are still on disk, should the process die now
    disk.full = False
    assert _read_all(spool) == [b"b", b"c"]  # and still readable by this spool
    spool.close(remove=False)


def test_the_full_disk_fault_is_what_the_spool_sees(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The injector itself: refuses spool writes only while full, and only under its root.
    disk = FullDisk("write", tmp_path / "spools")
    disk.install(monkeypatch)
    spool = Spool(tmp_path / "spools" / "0-test", HEADER)
    spool.append([b"a"])
    disk.full = True
    _refused(spool, "append", [b"b"])
    with pytest.raises(OSError, match="No space left"):
        spool.ack(1)
    (tmp_path / "elsewhere.txt").write_text("fine")  # other files are not on that disk
    disk.full = False
    spool.ack(1)
    assert read_acked(tmp_path / "spools" / "0-test") == 1
    spool.close(remove=False)
