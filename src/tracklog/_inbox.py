"""The queue's inbox: what ``dump()`` appends to, one ``os.write`` per message.

A committed SQLite ``INSERT`` from the training thread costs about 40 µs and a dozen
system calls (locks on the WAL index, three page-sized WAL frames), and under training
load each of those calls is a point where a BLAS thread takes the core: measured, it
was a sixth of SB3's whole dump. So the trainer does not write SQLite. It appends each
message to a segment file, ``inbox-<N>.log`` beside ``queue.db``, with one ``write``;
the delivery process (or ``tracklog replay``) moves the messages into ``queue.db``
(:meth:`tracklog._queue.Queue.ingest`) and delivers them from there. A message is in the
kernel once ``write`` returned, so ``dump()`` still returns only once the row survives
the training process being killed by any signal; with ``delivery.fsync`` the write is
also ``fdatasync``-ed (power loss).

A record is ``MAGIC``, the size and CRC-32 of what follows, then the sequence number
(the trainer numbers its messages 1, 2, …), the kind, the body's size, the body and
the blobs list, both UTF-8. A record is data: it is parsed with ``struct`` and decoded
as text, nothing else. A record cut short at the end of the newest segment is a write
the trainer did not finish (its ``dump()`` never returned): it is left alone while the
trainer lives and dropped once it is gone. A record whose checksum fails is reported
with its segment and byte position and skipped; reading goes on at the next record
that checks out.

The trainer starts a new segment once one holds ``SEGMENT_BYTES``, and never writes to
an older one again; a segment is deleted once it was moved into ``queue.db`` and a
newer one exists.
"""

from __future__ import annotations

import os
import re
import stat
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tracklog._codec import open_nofollow

__all__ = [
    "SEGMENT_BYTES",
    "InboxWriter",
    "Problem",
    "Record",
    "encode",
    "parse",
    "segment_path",
    "segments",
]

MAGIC: Final = b"TLq\x01"
_HEAD: Final = struct.Struct("<4sII")  # magic, size of the rest, CRC-32 of the rest
_FIXED: Final = struct.Struct("<qBI")  # seq, kind, body size
KIND_CODES: Final = {"row": 1, "line": 2, "failed": 3, "flush": 4, "close": 5}
_KINDS: Final = {code: kind for kind, code in KIND_CODES.items()}
#: No message is this large (arrays go to blob files): a size above it is damage.
MAX_RECORD: Final = 1 << 28
SEGMENT_BYTES: Final = 64 << 20
#: The reason given for a record a killed trainer left unfinished.
UNFINISHED: Final = "an unfinished write"
_SEGMENT: Final = re.compile(r"inbox-(\d{6,})\.log")


def segment_path(directory: Path, number: int) -> Path:
    return directory / f"inbox-{number:06d}.log"


def segments(directory: Path) -> list[int]:
    """The numbers of the segments in ``directory``, oldest first."""
    found: list[int] = []
    for name in os.listdir(directory):
        match = _SEGMENT.fullmatch(name)
        if match is not None:
            found.append(int(match.group(1)))
    return sorted(found)


def encode(seq: int, kind: str, body: str, blobs: str) -> bytes:
    """One message as one record."""
    text = body.encode("utf-8", "surrogatepass")
    rest = _FIXED.pack(seq, KIND_CODES[kind], len(text)) + text + blobs.encode()
    return _HEAD.pack(MAGIC, len(rest), zlib.crc32(rest)) + rest


@dataclass(frozen=True, slots=True)
class Record:
    seq: int
    kind: str
    body: str
    blobs: str


@dataclass(frozen=True, slots=True)
class Problem:
    """Bytes that were skipped: where, how many, and why."""

    offset: int
    skipped: int
    reason: str


def parse(data: bytes, *, final: bool) -> tuple[list[Record], int, list[Problem]]:
    """The records at the start of ``data``, how many bytes they (and whatever was
    skipped) take, and what was skipped. A record cut short at the end is not consumed,
    unless ``final`` (no more bytes will come): it is then dropped, with a problem."""
    records: list[Record] = []
    problems: list[Problem] = []
    view = memoryview(data)
    at, end = 0, len(data)
    while at < end:
        if end - at < _HEAD.size:
            if final:
                problems.append(Problem(at, end - at, UNFINISHED))
                at = end
            break
        magic, size, crc = _HEAD.unpack_from(data, at)
        start = at + _HEAD.size
        if magic != MAGIC or size < _FIXED.size or size > MAX_RECORD:
            found = _resync(data, at + 1, final=final)
            problems.append(Problem(at, found - at, "not a record"))
            at = found
            continue
        if start + size > end:
            if not final:
                break
            found = _resync(data, at + 1, final=True)
            reason = UNFINISHED if found == end else "a damaged record"
            problems.append(Problem(at, found - at, reason))
            at = found
            continue
        rest = view[start : start + size]
        record = _record(rest) if zlib.crc32(rest) == crc else None
        if record is None:
            found = _resync(data, at + 1, final=final)
            problems.append(Problem(at, found - at, "a damaged record (checksum)"))
            at = found
            continue
        records.append(record)
        at = start + size
    return records, at, problems


def _record(rest: memoryview) -> Record | None:
    seq, code, body_size = _FIXED.unpack_from(rest)
    kind = _KINDS.get(code)
    if kind is None or _FIXED.size + body_size > len(rest) or seq <= 0:
        return None
    body = bytes(rest[_FIXED.size : _FIXED.size + body_size])
    blobs = bytes(rest[_FIXED.size + body_size :])
    # Bytes that are not UTF-8 (a foreign writer) become U+FFFD; the body's JSON then
    # fails on its own when it is decoded, reported with its seq.
    return Record(seq, kind, body.decode("utf-8", "replace"), blobs.decode("utf-8", "replace"))


def _resync(data: bytes, start: int, *, final: bool) -> int:
    """Where the next record that checks out starts, at or after ``start``. Without
    one: the end of ``data`` when ``final``; else where a record that may still be
    being written starts, or where a magic may start in bytes still to come."""
    at = data.find(MAGIC, start)
    last = len(data)
    if not final:  # the last bytes may be the start of a magic whose rest is to come
        for keep in range(len(MAGIC) - 1, 0, -1):
            if last - keep >= start and data.endswith(MAGIC[:keep]):
                last -= keep
                break
    while at != -1:
        if at + _HEAD.size > len(data):
            return at if not final else len(data)
        _, size, crc = _HEAD.unpack_from(data, at)
        stop = at + _HEAD.size + size
        if _FIXED.size <= size <= MAX_RECORD:
            if stop > len(data) and not final:
                return at  # perhaps a record still being written: look again later
            if stop <= len(data) and zlib.crc32(data[at + _HEAD.size : stop]) == crc:
                return at
        at = data.find(MAGIC, at + 1)
    return last


class InboxWriter:
    """The trainer's end: appends records, one ``write`` each, numbering them."""

    def __init__(self, directory: Path, *, segment: int, seq: int, fsync: bool) -> None:
        self.directory = directory
        self.fsync = fsync
        self.seq: int = seq
        self._segment = segment
        self._fd = self._open(segment)
        self._size = os.fstat(self._fd).st_size
        self._failed_rotations = 0  # times the next segment could not be created
        # One message at a time, whichever thread appends (the excepthook's "failed"
        # beside a dump on another thread). The main thread appends only inside
        # _lifecycle.critical(), so SIGTERM's handler never re-enters an append there.
        self._lock = threading.Lock()

    def _open(self, number: int) -> int:
        path = segment_path(self.directory, number)
        fd = open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(f"{path} is not a regular file; refused")
        if self.fsync:
            _fsync_directory(self.directory)
        return fd

    def append(self, kind: str, body: str, blobs: str) -> int:
        """Append one message; its sequence number. It is in the kernel (and with
        ``fsync`` on the disk) when this returns."""
        with self._lock:
            return self._append(kind, body, blobs)

    def _append(self, kind: str, body: str, blobs: str) -> int:
        if self._size >= SEGMENT_BYTES * (1 + self._failed_rotations):
            self._rotate()
        seq = self.seq + 1
        record = encode(seq, kind, body, blobs)
        try:
            written = os.write(self._fd, record)
            while written < len(record):  # a regular file takes it whole, bar a full disk
                written += os.write(self._fd, record[written:])
            if self.fsync:
                os.fdatasync(self._fd)
        except BaseException:
            if os.fstat(self._fd).st_size < self._size + len(record):
                # Cut short: no reader takes a partial record, so none has it; drop it.
                os.ftruncate(self._fd, self._size)
            else:
                # Whole (only fdatasync failed, or Ctrl-C came after the write): a reader
                # may have moved it already; it stays, and the numbering goes on after it.
                self.seq = seq
                self._size += len(record)
            raise
        self.seq = seq
        self._size += len(record)
        return seq

    def _rotate(self) -> None:
        try:
            fd = self._open(self._segment + 1)
        except OSError:
            # Something not ours in the way (a symlink), or no room for a file: go on
            # in this segment, which whoever delivers keeps reading (and reports what
            # is in the way); try again a segment's worth later.
            self._failed_rotations += 1
            return
        os.close(self._fd)
        self._fd, self._segment, self._size = fd, self._segment + 1, 0
        self._failed_rotations = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
