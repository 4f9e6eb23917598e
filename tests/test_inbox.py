"""The queue's inbox (``tracklog._inbox``): what ``dump()`` appends to, moved into
``queue.db`` by whoever delivers.

Everything is read back the way the delivery process reads it: a fresh
``Queue(directory)`` moves the inbox (``ingest``) and ``read``s ``queue.db``; never the
writer's memory. Cuts and damage are made on the real segment files.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Final

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracklog import _inbox
from tracklog._queue import FORMAT, Kind, Message, Queue

HEADER: Final[dict[str, Any]] = {"format": FORMAT, "run_dir": "/nowhere", "outputs": []}
KINDS: Final[list[Kind]] = ["row", "line", "failed", "flush", "close"]
#: Text as a message holds it: any character but a lone surrogate (no JSON has one).
TEXT: Final = st.text(st.characters(exclude_categories=["Cs"]), max_size=300)
MESSAGES: Final = st.lists(
    st.tuples(st.sampled_from(KINDS), TEXT, st.sampled_from(["", "1-0.npy", "2-0.npy 2-1.npy"])),
    min_size=1,
    max_size=25,
)

Sent = tuple[Kind, str, str]


def read_all(directory: Path, *, final: bool = True) -> tuple[list[Message], list[str]]:
    """What a fresh delivery side reads, and the problems it reports."""
    queue = Queue(directory)
    try:
        queue.ingest(final=final)
        return queue.read(0, 10**6), [text for _, text in queue.problems]
    finally:
        queue.close()


def as_sent(messages: list[Message]) -> list[tuple[str, str, str]]:
    return [(message.kind, message.body, message.blobs) for message in messages]


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("inbox-*.log"))


def new_queue(root: Path, name: str) -> Queue:
    return Queue.create(root / name, HEADER)


# Round trips ------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    messages=MESSAGES,
    segment_bytes=st.sampled_from([1, 300, 2_000, _inbox.SEGMENT_BYTES]),
    looks=st.sets(st.integers(0, 25)),
)
def test_every_message_arrives_once_in_order_across_segments(
    tmp_path_factory: pytest.TempPathFactory,
    messages: list[Sent],
    segment_bytes: int,
    looks: set[int],
) -> None:
    """A reader that looks (moves the inbox) between any two appends, with segments
    rotated as often as after every record, gets each message once, in order."""
    root = tmp_path_factory.mktemp("inbox")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_inbox, "SEGMENT_BYTES", segment_bytes)
        writer = new_queue(root, "queue-0")
        reader = Queue(writer.directory)
        seqs: list[int] = []
        for index, (kind, body, blobs) in enumerate(messages):
            if index in looks:
                reader.ingest()
            seqs.append(writer.append(kind, body, blobs))
        writer.close()
        reader.close()
    assert seqs == list(range(1, len(messages) + 1))
    read, problems = read_all(root / "queue-0")
    assert problems == []
    assert [message.seq for message in read] == seqs
    assert as_sent(read) == messages
    # Moved segments are deleted: only the one the writer last wrote to can remain.
    assert len(segment_files(root / "queue-0")) <= 1


# A trainer killed in the middle of a write --------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(messages=MESSAGES, last=MESSAGES, cut=st.floats(0.0, 1.0, exclude_max=True))
def test_a_write_cut_short_loses_only_that_message(
    tmp_path_factory: pytest.TempPathFactory,
    messages: list[Sent],
    last: list[Sent],
    cut: float,
) -> None:
    """The bytes of the last record stop anywhere (the process was killed inside
    ``write``, so its ``dump()`` never returned). While the trainer may still be
    writing, the reader waits for the rest; once it is gone, every whole message is
    there and the cut one is dropped, said with its byte position."""
    root = tmp_path_factory.mktemp("inbox")
    writer = new_queue(root, "queue-0")
    for kind, body, blobs in messages:
        writer.append(kind, body, blobs)
    writer.close()
    [segment] = segment_files(writer.directory)
    whole = segment.stat().st_size
    kind, body, blobs = last[0]
    record = _inbox.encode(len(messages) + 1, kind, body, blobs)
    kept = int(cut * len(record))
    with segment.open("ab") as file:
        file.write(record[:kept])

    read, problems = read_all(writer.directory, final=False)
    assert as_sent(read) == messages
    assert problems == []
    read, problems = read_all(writer.directory, final=True)
    assert as_sent(read) == messages
    if kept:
        [problem] = problems
        assert f"{segment} at byte {whole}: an unfinished write; {kept} byte(s)" in problem
    else:
        assert problems == []


# Damage --------------------------------------------------------------------------------------
@settings(max_examples=80, deadline=None)
@given(messages=MESSAGES, where=st.floats(0.0, 1.0, exclude_max=True), flip=st.integers(1, 255))
def test_a_damaged_byte_skips_only_the_record_holding_it(
    tmp_path_factory: pytest.TempPathFactory, messages: list[Sent], where: float, flip: int
) -> None:
    root = tmp_path_factory.mktemp("inbox")
    writer = new_queue(root, "queue-0")
    starts = []
    for kind, body, blobs in messages:
        starts.append(os.fstat(writer._writer._fd).st_size)  # type: ignore[union-attr]
        writer.append(kind, body, blobs)
    writer.close()
    [segment] = segment_files(writer.directory)
    data = bytearray(segment.read_bytes())
    position = int(where * len(data))
    data[position] ^= flip
    segment.write_bytes(bytes(data))
    damaged = max(index for index, start in enumerate(starts) if start <= position)

    read, problems = read_all(writer.directory)
    expected = [(index + 1, sent) for index, sent in enumerate(messages) if index != damaged]
    assert [(message.seq, (message.kind, message.body, message.blobs)) for message in read] == (
        expected
    )
    assert len(problems) == 1
    assert f"{segment} at byte {starts[damaged]}:" in problems[0]
    assert "skipped" in problems[0]


def test_bytes_that_are_no_record_are_skipped_and_the_rest_read(tmp_path: Path) -> None:
    writer = new_queue(tmp_path, "queue-0")
    writer.append("line", "before")
    [segment] = segment_files(writer.directory)
    with segment.open("ab") as file:
        file.write(b"garbage that is not a record, " * 5)
    writer._writer.seq = 1  # type: ignore[union-attr]
    writer.append("line", "after")
    writer.close()
    read, problems = read_all(writer.directory)
    assert [(m.seq, m.body) for m in read] == [(1, "before"), (2, "after")]
    assert len(problems) == 1
    assert "not a record; 150 byte(s) skipped" in problems[0]


# Several readers -----------------------------------------------------------------------------
def test_readers_in_several_threads_and_connections_move_each_message_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three connections move the inbox at once while a fourth delivers and deletes
    what it delivered (as the delivery process trims): every message is delivered
    exactly once, none comes back after its deletion."""
    monkeypatch.setattr(_inbox, "SEGMENT_BYTES", 4_000)
    writer = new_queue(tmp_path, "queue-0")
    stop = threading.Event()
    errors: list[BaseException] = []
    delivered: list[Message] = []

    def look() -> None:
        reader = Queue(writer.directory)
        try:
            while not stop.is_set():
                reader.ingest()
        except BaseException as error:
            errors.append(error)
        finally:
            reader.close()

    def deliver() -> None:
        reader = Queue(writer.directory)
        cursor = 0
        try:
            while True:
                done = stop.is_set()
                got = reader.read(cursor, 100)
                delivered.extend(got)
                if got:
                    cursor = got[-1].seq
                    reader.forget(cursor)
                elif done:
                    return
        except BaseException as error:
            errors.append(error)
        finally:
            reader.close()

    threads = [threading.Thread(target=look) for _ in range(3)]
    threads.append(threading.Thread(target=deliver))
    for thread in threads:
        thread.start()
    sent = [("row", f'{{"n":{n}}}', "") for n in range(2_000)]
    for kind, body, blobs in sent:
        writer.append(kind, body, blobs)  # type: ignore[arg-type]
    stop.set()
    for thread in threads:
        thread.join()
    writer.close()
    assert errors == []
    read, problems = read_all(writer.directory)
    assert problems == []
    assert [m.seq for m in delivered + read] == list(range(1, 2_001))
    assert as_sent(delivered + read) == sent


def test_a_queue_opened_again_continues_its_numbering(tmp_path: Path) -> None:
    first = new_queue(tmp_path, "queue-0")
    assert [first.append("line", str(n)) for n in range(3)] == [1, 2, 3]
    first.close()
    again = Queue(tmp_path / "queue-0")
    assert again.append("line", "3") == 4
    again.close()
    read, _ = read_all(tmp_path / "queue-0")
    assert [(m.seq, m.body) for m in read] == [(n + 1, str(n)) for n in range(4)]


# Links and special files ---------------------------------------------------------------------
def test_a_symlinked_next_segment_is_refused_and_every_row_still_arrives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Something not the writer's where the next segment goes: the writer cannot rotate
    and goes on in its segment, which the reader keeps reading (it does not take the
    link for a newer segment), and the link is reported; its target is never touched."""
    monkeypatch.setattr(_inbox, "SEGMENT_BYTES", 100)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    writer = new_queue(tmp_path, "queue-0")
    _inbox.segment_path(writer.directory, 1).symlink_to(victim)
    bodies = [str(n) * 60 for n in range(5)]
    for body in bodies:
        writer.append("line", body)  # each past the segment's size: a rotation each
        read_all(writer.directory, final=False)  # a reader looks in between
    writer.close()
    read, problems = read_all(writer.directory)
    assert [m.body for m in read] == bodies
    assert any("inbox-000001.log is a symlink; refused" in problem for problem in problems)
    assert victim.read_text() == "precious"


def test_segments_keep_their_size_once_a_rotation_succeeds_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rotation that failed (a link in the way) is tried again a segment's worth
    later; once one succeeds, segments are cut at ``SEGMENT_BYTES`` again, not at
    twice that for the rest of the run."""
    monkeypatch.setattr(_inbox, "SEGMENT_BYTES", 100)
    writer = new_queue(tmp_path, "queue-0")
    link = _inbox.segment_path(writer.directory, 1)
    link.symlink_to(tmp_path / "elsewhere")
    body = "x" * 60
    for _ in range(3):  # the third finds segment 0 full: its rotation fails
        writer.append("line", body)
    link.unlink()
    for _ in range(8):
        writer.append("line", body)
    writer.close()
    record = len(_inbox.encode(1, "line", body, ""))
    numbers = _inbox.segments(writer.directory)
    assert numbers[:2] == [0, 1]
    for number in numbers[1:-1]:  # each cut at the first record past 100 bytes
        size = _inbox.segment_path(writer.directory, number).stat().st_size
        assert size < 100 + record, (number, size)
    read, problems = read_all(writer.directory)
    assert [m.body for m in read] == [body] * 11
    assert not problems


def test_a_fifo_in_place_of_the_next_segment_never_blocks_a_reader(tmp_path: Path) -> None:
    writer = new_queue(tmp_path, "queue-0")
    writer.append("line", "before")
    os.mkfifo(_inbox.segment_path(writer.directory, 1))
    writer.append("line", "after")
    writer.close()
    read, problems = read_all(writer.directory)
    assert [m.body for m in read] == ["before", "after"]
    assert any("inbox-000001.log is not a regular file" in problem for problem in problems)


# Failures of the writer --------------------------------------------------------------------
def test_a_record_written_whole_stays_when_only_its_fdatasync_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write finished (a reader may have moved it already), so the record is kept
    and the numbering goes on after it; the caller still hears of the failure."""
    writer = Queue.create(tmp_path / "queue-0", HEADER, fsync=True)
    writer.append("line", "a")
    real = os.fdatasync

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")  # EIO: a disk the test cannot break

    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(OSError, match="Input/output"):
        writer.append("line", "b")
    monkeypatch.setattr(os, "fdatasync", real)
    assert writer.append("line", "c") == 3
    writer.close()
    read, problems = read_all(tmp_path / "queue-0")
    assert [(m.seq, m.body) for m in read] == [(1, "a"), (2, "b"), (3, "c")]
    assert problems == []


def test_a_record_cut_short_by_a_failed_write_is_taken_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = new_queue(tmp_path, "queue-0")
    writer.append("line", "a")
    real = os.write
    calls = 0

    def half_then_full(fd: int, data: bytes) -> int:  # a disk filling up mid-record
        nonlocal calls
        calls += 1
        if calls == 1:
            return real(fd, bytes(data)[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError, match="No space"):
        writer.append("line", "b" * 100)
    monkeypatch.setattr(os, "write", real)
    assert writer.append("line", "c") == 2  # the failed one took no number
    writer.close()
    read, problems = read_all(tmp_path / "queue-0")
    assert [(m.seq, m.body) for m in read] == [(1, "a"), (2, "c")]
    assert problems == []


# Readers that fell behind ------------------------------------------------------------------
def test_a_reader_whose_segments_another_reader_moved_and_deleted_looks_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reader A keeps its position and its open segment between looks; reader B (a
    replay) moves several segments meanwhile and deletes them. A's next look notices and
    moves what came after, each message once, whether or not it is the final look."""
    monkeypatch.setattr(_inbox, "SEGMENT_BYTES", 60)
    writer = new_queue(tmp_path, "queue-0")
    early, late = Queue(writer.directory), Queue(writer.directory)
    writer.append("line", "1" * 40)  # segment 0 is full: the next append rotates
    assert early.ingest() == 1  # A has all of segment 0, and has it open
    for n in range(2, 8):
        writer.append("line", str(n) * 40)  # a rotation at every append
    assert late.ingest() == 6
    assert len(_inbox.segments(writer.directory)) == 1  # moved ones are deleted
    late.close()
    for n in range(8, 11):
        writer.append("line", str(n))
    assert early.ingest() == 3
    writer.append("line", "11")
    writer.close()
    assert early.ingest(final=True) == 1
    early.close()
    read, problems = read_all(writer.directory)
    assert [m.seq for m in read] == list(range(1, 12))
    assert problems == []


@settings(max_examples=200, deadline=None)
@given(
    bodies=st.lists(TEXT, min_size=2, max_size=12),
    where=st.floats(0.0, 1.0, exclude_max=True),
    flip=st.integers(1, 255),
    chunk=st.integers(1, 300),
)
def test_a_damaged_stream_read_in_any_chunks_loses_only_the_damaged_record(
    bodies: list[str], where: float, flip: int, chunk: int
) -> None:
    """As ``ingest`` reads a segment: in pieces (at most so many bytes at once, or what
    the writer has written so far), each ``parse`` non-final but the one that reaches
    the end. A magic cut by a piece's end must not be skipped with the damage."""
    records = [_inbox.encode(i + 1, "line", body, "") for i, body in enumerate(bodies)]
    starts = [sum(map(len, records[:i])) for i in range(len(records))]
    data = bytearray(b"".join(records))
    position = int(where * len(data))
    data[position] ^= flip
    damaged = max(i for i, start in enumerate(starts) if start <= position)
    got: list[int] = []
    at = 0
    while at < len(data):
        piece = bytes(data[at : at + chunk])
        last = at + len(piece) == len(data)
        found, used, _ = _inbox.parse(piece, final=last)
        if used == 0 and not last:
            found, used, _ = _inbox.parse(bytes(data[at:]), final=True)
        got += [record.seq for record in found]
        at += used
    assert got == [i + 1 for i in range(len(bodies)) if i != damaged]


# Formats and settings ----------------------------------------------------------------------
def test_a_queue_of_the_format_before_the_inbox_is_still_read(tmp_path: Path) -> None:
    old = Queue.create(tmp_path / "queue-0", {**HEADER, "format": 2})
    old.close()
    db = sqlite3.connect(tmp_path / "queue-0" / "queue.db")
    with db:
        db.execute("INSERT INTO messages (kind, body) VALUES ('line', 'from format 2')")
    db.close()
    queue = Queue(tmp_path / "queue-0")
    try:
        assert queue.header()["format"] == 2
        assert [m.body for m in queue.read(0, 10)] == ["from format 2"]
    finally:
        queue.close()


def test_whoever_delivers_commits_as_durably_as_the_trainer_asked(tmp_path: Path) -> None:
    """With ``delivery.fsync``, a reader opened without saying so still moves the inbox
    with ``synchronous=FULL`` (it deletes segments after moving them)."""
    for fsync, level in ((True, 2), (False, 1)):
        directory = tmp_path / f"queue-{int(fsync)}"
        Queue.create(directory, {**HEADER, "delivery": {"fsync": fsync}}, fsync=fsync).close()
        reader = Queue(directory)
        try:
            assert reader.fsync is fsync
            assert reader._move_db.execute("PRAGMA synchronous").fetchone()[0] == level  # pyright: ignore[reportPrivateUsage]
        finally:
            reader.close()
