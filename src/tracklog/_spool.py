"""The on-disk spool: an append-only, checksummed log of what a background output still owes.

One directory per output (``<run_dir>/spool/<index>-<name>/``)::

    header.json   what output this is, its settings without secrets, and its run identity
    records.log   frames of <length u32 LE><crc32 u32 LE><pickle>, appended and fsynced
    acked         how many records, counted from the start of records.log, were delivered
    lock          held (flock) by the process that owns the spool, so replay cannot race it

A frame cut off by a crash (short, or with a wrong checksum) ends the log: everything
before it is intact. ``acked`` is rewritten atomically after each delivery, so a reader
resumes after the last record known to be delivered. A record delivered just before a
crash but not yet acked is delivered again; MLflow ignores a metric point it already
has (same key, step, timestamp and value), so metrics still arrive exactly once.

Records are pickles of plain data and of tracklog's values (see :func:`dumps`): replay
only spools you wrote yourself, as with any pickle.
"""

from __future__ import annotations

import contextlib
import copyreg
import fcntl
import io
import json
import os
import pickle
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from tracklog._row import Row
from tracklog.values import Figure, HParam, Image, Video, to_plain

__all__ = ["Spool", "SpoolBusyError", "dumps", "loads"]

_FRAME = struct.Struct("<II")
_HEADER = "header.json"
_RECORDS = "records.log"
_ACKED = "acked"
_LOCK = "lock"


class SpoolBusyError(RuntimeError):
    """Another live process (or logger) owns this spool."""


# Pickling: values are rebuilt through their constructors (which validate again), and a
# Row without its memo. A Figure keeps only its PNG: the matplotlib figure stays behind.
def _video(frames: Any, fps: float) -> Video:
    return Video(frames, fps)


def _image(pixels: Any) -> Image:
    return Image(pixels, "NHWC")


def _hparam(hparams: dict[str, Any], metrics: dict[str, float]) -> HParam:
    return HParam(hparams, metrics)


def _row(step: int, timestamp: float, seq: int, values: dict[str, Any]) -> Row:
    return Row(step=step, timestamp=timestamp, seq=seq, values=values)


def _figure(png: bytes, size: tuple[int, int]) -> Figure:
    figure = object.__new__(Figure)
    for name, value in (("figure", None), ("close", True), ("png", png), ("size", size)):
        object.__setattr__(figure, name, value)
    figure._freeze()
    return figure


_REDUCERS: dict[type[Any], Any] = {
    Video: lambda v: (_video, (v.frames, v.fps)),
    Image: lambda v: (_image, (v.image,)),
    Figure: lambda v: (_figure, (v.png, v.size)),
    HParam: lambda v: (_hparam, (to_plain(v.hparam_dict), dict(v.metric_dict))),
    Row: lambda r: (_row, (r.step, r.timestamp, r.seq, dict(r.values))),
}


def dumps(record: object) -> bytes:
    """Pickle a spool record (a tuple of plain data, rows and values)."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = {**copyreg.dispatch_table, **_REDUCERS}
    pickler.dump(record)
    return buffer.getvalue()


def loads(data: bytes) -> Any:
    return pickle.loads(data)  # our own spool files, see the module docstring


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


class Spool:
    """One output's spool directory; created on first use, removed when emptied at close."""

    def __init__(self, directory: Path, header: dict[str, Any]) -> None:
        self.directory = directory
        self.header = header
        self._append: IO[bytes] | None = None
        self._read: IO[bytes] | None = None
        self._size = 0  # bytes of records.log known to be intact and fsynced
        self.acked = 0
        self._lock_file: IO[bytes] | None = None
        #: Records appended (in this file), and records read by the delivering side.
        self.written = 0
        self.read_count = 0

    # Ownership -------------------------------------------------------------------------
    def claim(self) -> None:
        """Create the directory, take its lock and write the header; idempotent.

        A spool left by an earlier process of the same run (not replayed yet) is
        continued: its undelivered records come first.
        """
        if self._lock_file is not None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_file = _take_lock(self.directory)
        _write_atomic(self.directory / _HEADER, json.dumps(self.header, indent=2))
        records = self.directory / _RECORDS
        acked = read_acked(self.directory)
        intact = _intact_length(records)
        with open(records, "ab") as file:
            file.truncate(intact)  # drop a frame cut off by a crash
        self._size = intact
        self._append = open(records, "ab")  # noqa: SIM115  # held open for the run
        # Unbuffered: the file changes under this handle (appends, prepend's rewrite).
        self._read = open(records, "rb", buffering=0)  # noqa: SIM115
        self.written = sum(1 for _ in _frames(self._read))
        self._read.seek(0)
        for _ in range(min(acked, self.written)):
            _next_frame(self._read)
        self.read_count = min(acked, self.written)
        self.acked = self.read_count

    @property
    def claimed(self) -> bool:
        return self._lock_file is not None

    @property
    def pending(self) -> int:
        """Records written but not read yet."""
        return self.written - self.read_count

    # Writing ---------------------------------------------------------------------------
    def append(self, records: list[bytes]) -> None:
        """Append ``records`` and fsync them (one dump boundary).

        If writing or fsync fails (a full disk), the file is cut back to what it was,
        so the failed frames can never be read later, and the error is raised.
        """
        self.claim()
        assert self._append is not None
        blob = b"".join(_FRAME.pack(len(data), zlib.crc32(data)) + data for data in records)
        try:
            self._append.write(blob)
            self._append.flush()
            os.fsync(self._append.fileno())
        except BaseException:
            self._rollback()
            raise
        self._size += len(blob)
        self.written += len(records)

    def _rollback(self) -> None:
        """Drop whatever a failed append left in the file or in the writer's buffer."""
        path = self.directory / _RECORDS
        if self._append is not None:
            with contextlib.suppress(OSError):
                self._append.close()  # a failing flush still closes the file
        with contextlib.suppress(OSError):
            os.truncate(path, self._size)
        self._append = open(path, "ab")  # noqa: SIM115

    # Reading ---------------------------------------------------------------------------
    def read_next(self) -> bytes:
        assert self._read is not None
        assert self.pending > 0
        data = _next_frame(self._read)
        if data is None:
            raise OSError(f"{self.directory / _RECORDS}: record {self.read_count} is unreadable")
        self.read_count += 1
        return data

    def prepend(self, records: list[bytes]) -> None:
        """Put ``records`` before the records not read yet (a delivery taken from memory
        failed after newer records were spilled), then fsync.

        The new log (``records`` then the unread records; delivered ones are dropped) is
        written aside and renamed over the old one, so a failure leaves the old intact.
        """
        self.claim()
        assert self._append is not None
        assert self._read is not None
        path = self.directory / _RECORDS
        aside = path.with_name(_RECORDS + ".new")
        start = self._read.tell()
        with open(path, "rb") as old:
            old.seek(start)
            rest = old.read(self._size - start)
        blob = b"".join(_FRAME.pack(len(data), zlib.crc32(data)) + data for data in records)
        with contextlib.suppress(FileNotFoundError):
            aside.unlink()
        try:
            with open(aside, "ab") as new:
                new.write(blob + rest)
                new.flush()
                os.fsync(new.fileno())
            # Acked before the rename: a crash in between re-delivers (harmless), never
            # skips records of the new log.
            _write_atomic_fast(self.directory / _ACKED, "0")
        except BaseException:
            with contextlib.suppress(OSError):
                aside.unlink()
            raise
        os.replace(aside, path)
        pending = self.written - self.read_count
        with contextlib.suppress(OSError):
            self._append.close()
        self._read.close()
        self._append = open(path, "ab")  # noqa: SIM115
        self._read = open(path, "rb", buffering=0)  # noqa: SIM115
        self._size = len(blob) + len(rest)
        self.read_count = self.acked = 0
        self.written = len(records) + pending

    def ack(self, count: int) -> None:
        """Record that the first ``count`` records are delivered."""
        self.acked = count
        _write_atomic_fast(self.directory / _ACKED, str(count))

    def reset(self) -> None:
        """Everything is delivered: start an empty log (keeps the directory and lock)."""
        assert self._append is not None
        assert self._read is not None
        self._append.truncate(0)
        self._append.seek(0)
        self._read.seek(0)
        self._size = 0
        self.written = self.read_count = self.acked = 0
        # After the truncation: an older count on disk is harmless (claim() takes the
        # smaller of it and the records there).
        _write_atomic_fast(self.directory / _ACKED, "0")

    def close(self, *, remove: bool) -> None:
        """Release the files; with ``remove``, delete the directory (nothing is owed)."""
        for file in (self._append, self._read):
            if file is not None:
                file.close()
        self._append = self._read = None
        if remove and self._lock_file is not None:
            for name in (_RECORDS, _ACKED, _HEADER, _ACKED + ".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    (self.directory / name).unlink()
        if self._lock_file is not None:
            if remove:
                with contextlib.suppress(FileNotFoundError):
                    (self.directory / _LOCK).unlink()
            self._lock_file.close()
            self._lock_file = None
        if remove:
            with contextlib.suppress(OSError):
                self.directory.rmdir()  # only if empty: other files belong to the output
            with contextlib.suppress(OSError):
                self.directory.parent.rmdir()


def _write_atomic_fast(path: Path, text: str) -> None:
    # No fsync: a lost ack only means a record is delivered again (see the docstring).
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def _take_lock(directory: Path) -> IO[bytes]:
    lock = open(directory / _LOCK, "a+b")  # noqa: SIM115  # held for the spool's lifetime
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read().decode(errors="replace").strip() or "another process"
        lock.close()
        raise SpoolBusyError(
            f"{directory} is in use by {owner}; replay it once that process has ended"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()}".encode())
    lock.flush()
    return lock


def read_acked(directory: Path) -> int:
    try:
        return int((directory / _ACKED).read_text(encoding="utf-8").strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def read_header(directory: Path) -> dict[str, Any]:
    header = json.loads((directory / _HEADER).read_text(encoding="utf-8"))
    if not isinstance(header, dict):
        raise ValueError(f"{directory / _HEADER} is not a tracklog spool header")
    return header


def _next_frame(file: IO[bytes]) -> bytes | None:
    head = file.read(_FRAME.size)
    if len(head) < _FRAME.size:
        return None
    length, crc = _FRAME.unpack(head)
    if length == 0:
        return None  # records are never empty: zeros are a torn tail, not a frame
    data = file.read(length)
    if len(data) < length or zlib.crc32(data) != crc:
        return None
    return data


def _frames(file: IO[bytes]) -> Iterator[bytes]:
    while (data := _next_frame(file)) is not None:
        yield data


def _intact_length(path: Path) -> int:
    """Bytes of ``path`` up to the end of its last complete frame."""
    try:
        file = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        return 0
    with file:
        end = 0
        while _next_frame(file) is not None:
            end = file.tell()
        return end


def is_spool(directory: Path) -> bool:
    return (directory / _HEADER).is_file()


def owed(directory: Path) -> int:
    """How many records ``directory`` holds that were never delivered (0 if none)."""
    records = directory / _RECORDS
    if not records.exists():
        return 0
    with open(records, "rb") as file:
        total = sum(1 for _ in _frames(file))
    return max(0, total - read_acked(directory))


def free_directory(base: Path) -> Path:
    """``base``, or ``base~2``, ``base~3``… if an earlier process left something there.

    A spool left behind belongs to that process's run (records, or an MLflow output's
    unsent ``train.log``); a new logger with the same ``run_dir`` must not deliver it
    into its own run. ``tracklog replay`` delivers it.
    """
    candidate, n = base, 1
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = base.with_name(f"{base.name}~{n}")
    return candidate
