"""The delivery queue: one logger's rows on disk, in SQLite, data only.

A queue is a directory (``<spool_dir>/queue-<N>/``, mode 0700) holding:

- ``inbox-<N>.log``: what the training thread appends to, one ``write`` per message
  (see :mod:`tracklog._inbox`), so a row survives the process being killed by any
  signal once ``dump()`` returns.
- ``queue.db``: SQLite in WAL mode. ``messages(seq, kind, body, blobs)`` holds the
  messages moved out of the inbox by whoever delivers (:meth:`Queue.ingest`, in the
  same transaction as how far it got, ``meta('inbox')``); ``meta(key, value)`` also
  holds the header (settings without secrets, run identities) and the owner (the
  trainer's pid).
- ``acks.db``: SQLite in WAL mode, written only by whoever delivers: ``acks(consumer,
  seq)``, how far each output got, and ``state(consumer, key, value)``, what an output
  publishes (an MLflow run id) so a restarted delivery continues the same run.
- ``trainer.lock``, ``delivery.lock``: empty SQLite files held in an exclusive
  transaction by the live trainer and by the one process delivering. The operating
  system drops the lock when its holder dies, however it dies.
- ``blobs/``: large arrays as ``.npy`` files, written once for every output.

Kinds: ``row`` (a JSON document, see :mod:`tracklog._codec`), ``line`` (an ``info()``
line), ``failed`` (the exception name training ends with), ``flush`` and ``close``.
Every file is opened without following symlinks.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import sqlite3
import stat
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, cast

from tracklog import _inbox
from tracklog._codec import BLOBS, open_nofollow, remove_blobs
from tracklog._inbox import InboxWriter, segment_path

__all__ = [
    "MEDIA",
    "Lock",
    "Message",
    "Queue",
    "find_queues",
    "is_queue",
    "remove",
    "replay_command",
    "sqlite_transient",
    "storage_transient",
]

Kind = Literal["row", "line", "failed", "flush", "close"]
KINDS: Final = frozenset(("row", "line", "failed", "flush", "close"))
#: 3: the trainer appends to the inbox; a queue of format 2 (no inbox) is read as well.
FORMAT: Final = 3
#: How long Lock.held_elsewhere waits before it tries a taken lock again.
_CHECK_AGAIN: Final = 0.02
_READABLE: Final = frozenset((2, FORMAT))
_QUEUE: Final = "queue.db"
_ACKS: Final = "acks.db"
_log = logging.getLogger("tracklog")
#: At most this much of the inbox is read at once (a replay of a long backlog).
_READ_BYTES: Final = 8 << 20
#: The consumer that encodes the JSONL/CSV media files a row names.
MEDIA: Final = "media"


def replay_command(directory: object) -> str:
    return f"python -m tracklog replay {directory}"


#: SQLite's primary result codes that pass: another connection holds the database, an
#: I/O error, a full disk, a file that cannot be opened now (too many open files). Any
#: other, such as SQLITE_ERROR's "no such table" or SQLITE_CORRUPT, fails the same way
#: at every retry: it is reported, not retried.
_SQLITE_TRANSIENT: Final = frozenset(
    {"SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_IOERR", "SQLITE_FULL", "SQLITE_CANTOPEN"}
    | {"SQLITE_NOMEM", "SQLITE_PROTOCOL", "SQLITE_INTERRUPT"}
)
#: The same for a file written directly: a full disk or quota, an I/O error.
_OS_TRANSIENT: Final = frozenset((errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EMFILE))


def sqlite_transient(error: sqlite3.Error) -> bool:
    """Whether SQLite's result code says "retry later" (see ``_SQLITE_TRANSIENT``)."""
    name = getattr(error, "sqlite_errorname", None)  # SQLITE_IOERR_WRITE, SQLITE_BUSY, ...
    if not isinstance(name, str):
        return True  # not SQLite's own result: as for any other database's OperationalError
    return "_".join(name.split("_")[:2]) in _SQLITE_TRANSIENT


def storage_transient(error: BaseException) -> bool:
    """Whether writing the queue's own files failed for a while only (a full disk)."""
    if isinstance(error, sqlite3.Error):
        return sqlite_transient(error)
    return isinstance(error, OSError) and error.errno in _OS_TRANSIENT


@dataclass(frozen=True, slots=True)
class Message:
    seq: int
    kind: str
    body: str
    blobs: str = ""


def _refuse_links(path: Path) -> None:
    """Refuse ``path`` (and SQLite's -wal/-shm/-journal beside it) if it is a symlink
    or not a regular file; SQLite itself would follow one."""
    for name in (path.name, path.name + "-wal", path.name + "-shm", path.name + "-journal"):
        try:
            mode = os.lstat(path.with_name(name)).st_mode
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(mode):
            raise OSError(f"{path.with_name(name)} is not a regular file (a symlink?); refused")


def _connect(path: Path, *, create: bool, timeout: float = 30.0) -> sqlite3.Connection:
    if create and not path.exists():
        with contextlib.suppress(FileExistsError):
            os.close(open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    _refuse_links(path)
    connection = sqlite3.connect(
        f"file:{path}?mode={'rwc' if create else 'rw'}",
        uri=True,
        timeout=timeout,
        isolation_level=None,  # autocommit: one INSERT is one transaction
        check_same_thread=False,  # the logger serialises its own calls
    )
    return connection


def _wal(connection: sqlite3.Connection, *, fsync: bool) -> None:
    connection.execute("PRAGMA journal_mode=WAL")
    # NORMAL: a commit is in the WAL (the OS has it; a killed process loses nothing) but
    # not fsynced; FULL also survives power loss, at an fsync per dump.
    connection.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")


def _open_wal(path: Path, *, fsync: bool) -> sqlite3.Connection:
    """A connection to an existing database, in WAL mode. If WAL mode cannot be set
    (a full disk: its -shm file), the connection is closed, not kept half set up."""
    connection = _connect(path, create=False)
    try:
        _wal(connection, fsync=fsync)
    except BaseException:
        connection.close()
        raise
    return connection


class Lock:
    """An exclusive lock held as an open SQLite write transaction on ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._connection: sqlite3.Connection | None = None

    def acquire(self) -> bool:
        """Take the lock; False at once if another process holds it. Any other failure
        (its directory removed meanwhile, an I/O error) raises: it is not "held"."""
        connection = _connect(self.path, create=True, timeout=0)
        try:
            connection.execute("BEGIN EXCLUSIVE")
        except sqlite3.OperationalError as error:
            connection.close()
            if error.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY:
                return False
            raise
        self._connection = connection
        return True

    def held_elsewhere(self) -> bool:
        """Whether another process holds it now (the check takes and drops it).

        Another process's check holds it for an instant too: a lock found taken is
        tried again twice, 20 ms apart, before it counts as held.
        """
        if self._connection is not None:
            return False
        for attempt in range(3):
            if not self.path.exists():
                return False
            if self.acquire():
                self.release()
                return False
            if attempt < 2:
                time.sleep(_CHECK_AGAIN)
        return True

    def release(self) -> None:
        if self._connection is not None:
            self._connection.close()  # closing rolls the empty transaction back
            self._connection = None

    def abandon(self) -> None:
        """Forget the lock without touching the connection (in a forked child)."""
        self._connection = None


class Queue:
    """One logger's queue directory; see the module docstring."""

    def __init__(self, directory: Path, *, fsync: bool = False) -> None:
        self.directory = directory
        self.blobs = directory / BLOBS
        db = _connect(directory / _QUEUE, create=False)
        try:
            if not fsync:  # whoever delivers moves rows as durably as the trainer wrote them
                fsync = _fsync_of(db)
            _wal(db, fsync=fsync)
        except BaseException:
            db.close()
            raise
        self._db = db
        self.fsync = fsync
        self._acks: sqlite3.Connection | None = None
        self._acking = threading.Lock()  # one transaction at a time on _acks (the workers')
        self._mover: sqlite3.Connection | None = None  # ingest()'s own connection
        self._writer: InboxWriter | None = None
        self._ingesting = threading.Lock()
        self._reading: tuple[int, int] | None = None  # (segment, fd) being ingested
        self._refused: set[int] = set()  # segments found to be symlinks
        #: The inbox position this connection last committed: a look that finds nothing
        #: new costs a stat and an fstat, no query (a move checks it in its transaction).
        self._known: tuple[int, int, int] | None = None
        #: What ingest() skipped, as (logging level, text), said once each (the delivery
        #: side reports them).
        self.problems: list[tuple[int, str]] = []

    # Creating (training side) ----------------------------------------------------------
    @classmethod
    def create(cls, directory: Path, header: dict[str, Any], *, fsync: bool = False) -> Queue:
        directory.mkdir(mode=0o700, parents=True)
        (directory / BLOBS).mkdir(mode=0o700)
        db = _connect(directory / _QUEUE, create=True)
        _wal(db, fsync=fsync)
        db.executescript(
            """
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS messages (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                kind TEXT NOT NULL,
                body TEXT NOT NULL,
                blobs TEXT NOT NULL DEFAULT ''
            );
            """
        )
        db.execute(
            "INSERT OR REPLACE INTO meta VALUES ('header', ?)",
            (json.dumps(header, allow_nan=False),),
        )
        db.close()
        acks = _connect(directory / _ACKS, create=True)
        _wal(acks, fsync=fsync)
        acks.executescript(
            """
            CREATE TABLE IF NOT EXISTS acks (consumer TEXT PRIMARY KEY, seq INTEGER NOT NULL);
            CREATE TABLE IF NOT EXISTS state (
                consumer TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
                PRIMARY KEY (consumer, key)
            );
            """
        )
        acks.close()
        queue = cls(directory, fsync=fsync)
        # The trainer never checkpoints: that could take milliseconds inside dump().
        # Whoever delivers does, after deleting what every output has.
        queue._db.execute("PRAGMA wal_autocheckpoint=0")
        queue._writer = InboxWriter(directory, segment=0, seq=0, fsync=fsync)
        return queue

    def append(self, kind: Kind, body: str = "", blobs: str = "") -> int:
        """Append one message to the inbox, there before this returns; its sequence
        number. One process appends to a queue at a time (the trainer's lock)."""
        if self._writer is None:  # a queue opened again (a test, a tool): continue it
            self.ingest(final=True)
            newest = max(_inbox.segments(self.directory), default=-1)
            self._writer = InboxWriter(
                self.directory,
                segment=max(newest + 1, self._position()[0]),
                seq=self.last_seq(),
                fsync=self.fsync,
            )
        return self._writer.append(kind, body, blobs)

    # Moving the inbox into queue.db (delivery side) -------------------------------------
    def _position(self, db: sqlite3.Connection | None = None) -> tuple[int, int, int]:
        """How far the inbox was moved: (segment, byte offset, highest seq)."""
        row = (db or self._db).execute("SELECT value FROM meta WHERE key = 'inbox'").fetchone()
        text = None if row is None else str(row[0])
        if text is None:
            return (0, 0, 0)
        segment, offset, seq = (int(part) for part in text.split())
        return (segment, offset, seq)

    def _segment_fd(self, segment: int) -> int | None:
        if self._reading is not None:
            if self._reading[0] == segment:
                return self._reading[1]
            os.close(self._reading[1])
            self._reading = None
        path = segment_path(self.directory, segment)
        try:
            fd = open_nofollow(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO never blocks
        except FileNotFoundError:
            return None
        except OSError as error:  # a symlink (ELOOP): never followed, never moved
            if error.errno != errno.ELOOP:
                raise
            if segment not in self._refused:
                self._refused.add(segment)
                self.problems.append(
                    (logging.ERROR, f"{path} is a symlink; refused (nothing read from it)")
                )
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(f"{path} is not a regular file; refused")
        self._reading = (segment, fd)
        return fd

    def _newer(self, segment: int) -> bool:
        """Whether the writer started ``segment`` (so the one before it is complete). A
        symlink or special file there is not one the writer made: it could not rotate
        and still appends to the one before; said once."""
        path = segment_path(self.directory, segment)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return False
        if stat.S_ISREG(mode):
            return True
        if segment not in self._refused:
            self._refused.add(segment)
            kind = "a symlink" if stat.S_ISLNK(mode) else "not a regular file"
            self.problems.append((logging.ERROR, f"{path} is {kind}; refused (not read)"))
        return False

    @property
    def _move_db(self) -> sqlite3.Connection:
        """ingest()'s own connection: no other thread's statement runs inside its
        transactions (the delivery process's threads share ``_db``)."""
        if self._mover is None:
            self._mover = _open_wal(self.directory / _QUEUE, fsync=self.fsync)
        return self._mover

    def ingest(self, *, final: bool = False) -> int:
        """Move what the inbox holds into ``messages``; how many messages. ``final``:
        the trainer is gone, so a record cut short is an unfinished write, dropped.
        Safe to run in several processes at once: each move is one transaction that
        checks where the last one ended."""
        with self._ingesting:
            moved = 0
            while True:
                # ``final`` never trusts the cached position: another process may
                # have moved on (and deleted segments) since.
                segment, offset, high = (None if final else self._known) or self._position()
                newer = self._newer(segment + 1)
                fd = self._segment_fd(segment)
                if fd is None:
                    if not newer and self._known is not None:
                        self._known = None  # perhaps another process moved on: look
                        continue
                    if not newer:
                        return moved
                    self._advance(segment, offset, high, segment + 1)
                    continue
                status = os.fstat(fd)
                if status.st_nlink == 0 and self._known is not None:
                    self._known = None  # another process moved on and deleted it: look
                    continue
                size = status.st_size
                records: list[_inbox.Record] = []
                problems: list[_inbox.Problem] = []
                used = 0
                if size > offset:
                    data = os.pread(fd, min(size - offset, _READ_BYTES), offset)
                    last = offset + len(data) == size
                    records, used, problems = _inbox.parse(data, final=(newer or final) and last)
                    if used == 0 and not last:  # one record larger than a read
                        data = os.pread(fd, size - offset, offset)
                        records, used, problems = _inbox.parse(data, final=newer or final)
                fresh: list[_inbox.Record] = []
                for record in records:  # numbered 1, 2, …: one that is not next is foreign
                    if record.seq > max(high, fresh[-1].seq if fresh else 0):
                        fresh.append(record)
                    else:
                        problems.append(_inbox.Problem(-1, record.seq, "out of order"))
                if used:
                    top = max([high, *(record.seq for record in fresh)])
                    if not self._move(segment, offset, fresh, (segment, offset + used, top)):
                        continue  # another process moved them meanwhile: look again
                    moved += len(fresh)
                    self._say(segment, offset, problems)
                    if offset + used < size:
                        continue
                    offset, high = offset + used, top
                if newer and offset >= size:
                    self._advance(segment, offset, high, segment + 1)
                    continue
                return moved

    def _say(self, segment: int, offset: int, problems: list[_inbox.Problem]) -> None:
        path = segment_path(self.directory, segment)
        for problem in problems:
            if problem.offset < 0:
                text = (
                    f"{path}: message {problem.skipped} is numbered out of order (a foreign "
                    "writer?); skipped"
                )
            else:
                text = (
                    f"{path} at byte {offset + problem.offset}: {problem.reason}; "
                    f"{problem.skipped} byte(s) skipped"
                )
            # A killed trainer's last, unfinished write is expected; damage is not.
            expected = problem.reason == _inbox.UNFINISHED
            self.problems.append((logging.WARNING if expected else logging.ERROR, text))

    def _move(
        self,
        segment: int,
        offset: int,
        records: list[_inbox.Record],
        position: tuple[int, int, int],
    ) -> bool:
        """Insert ``records`` and set the position, if it still is (segment, offset)."""
        self._known = None  # until this commits
        db = self._move_db
        db.execute("BEGIN IMMEDIATE")
        try:
            if self._position(db)[:2] != (segment, offset):
                db.execute("ROLLBACK")
                return False
            db.executemany(
                "INSERT OR IGNORE INTO messages (seq, kind, body, blobs) VALUES (?, ?, ?, ?)",
                [(record.seq, record.kind, record.body, record.blobs) for record in records],
            )
            db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('inbox', ?)",
                (" ".join(str(part) for part in position),),
            )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._known = position
        return True

    def _advance(self, segment: int, offset: int, high: int, to: int) -> None:
        """Go on to segment ``to``; the old one, all moved, is deleted."""
        if self._move(segment, offset, [], (to, 0, high)):
            with contextlib.suppress(FileNotFoundError):
                segment_path(self.directory, segment).unlink()

    # Reading (delivery side) -----------------------------------------------------------
    def header(self) -> dict[str, Any]:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'header'").fetchone()
        if row is None:
            raise ValueError(f"{self.directory}: the queue has no header")
        loaded: object = json.loads(row[0])
        header = cast("dict[str, Any]", loaded) if isinstance(loaded, dict) else None
        if header is None or header.get("format") not in _READABLE:
            readable = " or ".join(str(each) for each in sorted(_READABLE))
            raise ValueError(f"{self.directory}: not a tracklog queue of format {readable}")
        return header

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _take_inbox(self) -> None:
        """A reader first moves what the inbox holds (the trainer never does). If that
        fails (a full disk, a locked database), it reads what was moved before; the
        rest stays in the inbox for the next look."""
        if self._writer is None:
            try:
                self.ingest()
            except (OSError, sqlite3.Error) as error:
                _log.debug("tracklog: cannot move %s's inbox yet: %s", self.directory, error)

    def read(self, after: int, limit: int) -> list[Message]:
        self._take_inbox()
        # As bytes, decoded here: one record that is not UTF-8 (a foreign writer, a bad
        # sector) must fail alone when it is decoded, not every read that holds it.
        rows = self._db.execute(
            "SELECT seq, CAST(kind AS BLOB), CAST(body AS BLOB), CAST(blobs AS BLOB) "
            "FROM messages WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, limit),
        ).fetchall()
        return [
            Message(int(seq), _text(kind), _text(body), _text(blobs))
            for seq, kind, body, blobs in rows
        ]

    def last_seq(self) -> int:
        self._take_inbox()
        row = self._db.execute("SELECT max(seq) FROM messages").fetchone()
        return int(row[0]) if row and row[0] is not None else self._deleted_up_to()

    def _deleted_up_to(self) -> int:
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
        return int(row[0]) if row else 0

    def has_kind(self, kind: Kind) -> bool:
        self._take_inbox()
        row = self._db.execute("SELECT 1 FROM messages WHERE kind = ? LIMIT 1", (kind,)).fetchone()
        return row is not None

    def pending(self, consumers: list[str]) -> int:
        """Messages some consumer has not acked yet."""
        low = min((self.acked(name) for name in consumers), default=self.last_seq())
        row = self._db.execute("SELECT count(*) FROM messages WHERE seq > ?", (low,)).fetchone()
        if self._writer is None:
            return int(row[0])
        # The trainer: and what is still in the inbox (it does not move it itself).
        return int(row[0]) + max(0, self._writer.seq - max(low, self._position()[2]))

    def forget(self, up_to: int) -> None:
        """Delete messages up to ``up_to`` (every consumer has them) and their blobs."""
        names = self._db.execute(
            "SELECT blobs FROM messages WHERE seq <= ? AND blobs != ''", (up_to,)
        ).fetchall()
        self._db.execute("DELETE FROM messages WHERE seq <= ?", (up_to,))
        remove_blobs(self.blobs, [name for (listed,) in names for name in _text(listed).split()])
        self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    # Acks and state --------------------------------------------------------------------
    @property
    def _ack_db(self) -> sqlite3.Connection:
        if self._acks is None:
            self._acks = _open_wal(self.directory / _ACKS, fsync=self.fsync)
        return self._acks

    def acked(self, consumer: str) -> int:
        row = self._ack_db.execute(
            "SELECT seq FROM acks WHERE consumer = ?", (consumer,)
        ).fetchone()
        return int(row[0]) if row else 0

    def acks(self) -> dict[str, int]:
        return {str(name): int(seq) for name, seq in self._ack_db.execute("SELECT * FROM acks")}

    @contextlib.contextmanager
    def _ack_transaction(self) -> Generator[sqlite3.Connection]:
        with self._acking:
            db = self._ack_db
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # a COMMIT that failed (a full disk) too
                    db.execute("ROLLBACK")
                raise

    def ack(self, consumer: str, seq: int, *, closed: bool = False) -> None:
        """Record that ``consumer`` has every message up to ``seq``. ``closed``: the last
        of them was its close, and the output is marked closed in the same transaction.
        Written apart, a delivery killed between the two left the close acked but the
        output not marked: the next replay started it again and ended its run KILLED."""
        with self._ack_transaction() as db:
            db.execute("INSERT OR REPLACE INTO acks VALUES (?, ?)", (consumer, seq))
            if closed:
                db.execute("INSERT OR REPLACE INTO state VALUES (?, 'closed', '1')", (consumer,))

    def state(self, consumer: str) -> dict[str, str]:
        rows = self._ack_db.execute(
            "SELECT key, value FROM state WHERE consumer = ?", (consumer,)
        ).fetchall()
        return {str(key): str(value) for key, value in rows}

    def set_state(self, consumer: str, values: dict[str, str]) -> None:
        with self._ack_transaction() as db:
            for key, value in values.items():
                db.execute("INSERT OR REPLACE INTO state VALUES (?, ?, ?)", (consumer, key, value))

    # Locks -----------------------------------------------------------------------------
    def trainer_lock(self) -> Lock:
        return Lock(self.directory / "trainer.lock")

    def delivery_lock(self) -> Lock:
        return Lock(self.directory / "delivery.lock")

    def close(self) -> None:
        if self._mover is not None:
            self._mover.close()
            self._mover = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._reading is not None:
            os.close(self._reading[1])
            self._reading = None
        self._db.close()
        if self._acks is not None:
            self._acks.close()
            self._acks = None

    def abandon(self) -> None:
        """Drop the connections without closing them (a forked child must not)."""
        _abandoned.append((self._db, self._acks, self._mover))


# A forked child keeps its parent's connections alive and unused: SQLite must not
# release (or touch) locks and shared memory the parent still uses.
_abandoned: list[object] = []


def _fsync_of(db: sqlite3.Connection) -> bool:
    """Whether the queue's trainer asked for ``delivery.fsync`` (its header says)."""
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'header'").fetchone()
        header: object = json.loads(row[0]) if row else {}
    except (sqlite3.Error, ValueError):
        return False
    if not isinstance(header, dict):
        return False
    delivery = cast("dict[str, object]", header).get("delivery")
    return isinstance(delivery, dict) and cast("dict[str, object]", delivery).get("fsync") is True


def _text(raw: object) -> str:
    """A column read as bytes, as text; bytes that are not UTF-8 become U+FFFD."""
    if isinstance(raw, bytes):
        return raw.decode("utf-8", errors="replace")
    return "" if raw is None else str(raw)


def remove(directory: Path) -> None:
    """Remove a delivered queue, and the folder holding it once it holds no other."""
    with contextlib.suppress(FileNotFoundError):
        (directory / _QUEUE).unlink()  # first: from here on it is no queue (is_queue)
    shutil.rmtree(directory, ignore_errors=True)
    with contextlib.suppress(OSError):
        directory.parent.rmdir()  # only if empty


def is_queue(path: Path) -> bool:
    return (path / _QUEUE).is_file() and not (path / _QUEUE).is_symlink()


def find_queues(path: Path) -> list[Path]:
    """The queues at ``path``: a queue, a folder of queues, or a run_dir (``spool/``)."""
    if is_queue(path):
        return [path]
    for folder in (path, path / "spool"):
        if folder.is_dir() and not folder.is_symlink():
            found = sorted(
                child for child in folder.iterdir() if is_queue(child) and not child.is_symlink()
            )
            if found:
                return found
    return []


def iter_messages(queue: Queue, after: int, batch: int = 256) -> Iterator[Message]:
    while True:
        messages = queue.read(after, batch)
        if not messages:
            return
        yield from messages
        after = messages[-1].seq
