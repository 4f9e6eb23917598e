"""Read what tracklog wrote back into typed rows: JSONL, CSV and W&B offline runs; and
find the checkpoints a run kept (:func:`latest_checkpoint`, to restart from).

The JSONL and CSV readers use only the standard library's ``json`` and ``csv``
modules, so they return what any other tool reading the files would see. The W&B
reader parses the run's own transaction log, the file ``wandb sync`` uploads.
"""

from __future__ import annotations

import csv
import json
import os
import re
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

__all__ = [
    "KeptCheckpoint",
    "LoggedRow",
    "Value",
    "WandbArtifact",
    "WandbArtifactFile",
    "WandbLogTail",
    "WandbRow",
    "WandbRun",
    "latest_checkpoint",
    "read_checkpoint",
    "read_checkpoints",
    "read_csv",
    "read_jsonl",
    "read_wandb_offline",
    "wandb_history",
    "wandb_records",
]

Value = bool | int | float | str
"""A cell read back: a number, a text value, or a media path relative to the run directory."""


@dataclass(frozen=True, slots=True)
class LoggedRow:
    """One dump as written: its step, its Unix timestamp, and the keys it held."""

    step: int
    timestamp: float
    values: Mapping[str, Value]


def _row(document: Mapping[str, object], where: str) -> LoggedRow:
    step, timestamp = document.get("_step"), document.get("_timestamp")
    if isinstance(step, bool) or not isinstance(step, int):
        raise ValueError(f"{where}: _step must be an int, got {step!r}")
    if isinstance(timestamp, bool) or not isinstance(timestamp, int | float):
        raise ValueError(f"{where}: _timestamp must be a number, got {timestamp!r}")
    values: dict[str, Value] = {}
    for key, value in document.items():
        if key.startswith("_"):
            continue
        if not isinstance(value, bool | int | float | str):
            raise ValueError(f"{where}: {key!r} holds {type(value).__name__}, not a flat value")
        values[key] = value
    return LoggedRow(step=step, timestamp=float(timestamp), values=values)


def read_jsonl(path: str | os.PathLike[str]) -> list[LoggedRow]:
    """Every row of a tracklog JSONL file, in order (blank lines are skipped)."""
    rows: list[LoggedRow] = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if line.strip():
                document: object = json.loads(line)
                if not isinstance(document, dict):
                    raise ValueError(f"{os.fspath(path)}:{number}: not a JSON object")
                # A JSON object's keys are always strings.
                rows.append(
                    _row(cast("dict[str, object]", document), f"{os.fspath(path)}:{number}")
                )
    return rows


_INT = re.compile(r"[+-]?[0-9]+")


def parse_field(field: str) -> Value:
    """A CSV field as the value it was written from: bool, int, float, else str."""
    if field in ("True", "False"):
        return field == "True"
    if _INT.fullmatch(field):
        return int(field)
    try:
        return float(field)
    except ValueError:
        return field


def read_csv(path: str | os.PathLike[str]) -> list[LoggedRow]:
    """Every row of a tracklog CSV file; empty fields (keys absent from a dump) are left out.

    CSV has no types: a text value that looks like a number reads back as that number.
    Use JSONL where text values matter.
    """
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.reader(file)
        no_header: list[str] = []
        header = next(reader, no_header)
        rows: list[LoggedRow] = []
        for number, fields in enumerate(reader, start=2):
            document: dict[str, object] = {
                key: parse_field(field)
                for key, field in zip(header, fields, strict=True)
                if field != ""
            }
            rows.append(_row(document, f"{os.fspath(path)}:{number}"))
    return rows


# W&B offline runs -----------------------------------------------------------------
#
# A run's transaction log, <run>/run-<id>.wandb, is a 7-byte header (b":W&B", the
# magic 0xBEE1 little-endian, a version byte) followed by LevelDB's log format: 32 KiB
# blocks of records, each a 7-byte header (CRC-32 of the type byte and the data, the
# data length as uint16, the type: 1 full, 2 first, 3 middle, 4 last) and its data; a
# block tail shorter than 7 bytes is zero padding. Joined records are
# wandb.proto.wandb_internal_pb2.Record protobufs.

_WANDB_HEADER = b":W&B"
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


class _Item(Protocol):
    key: str
    nested_key: Sequence[str]
    value_json: str


class _Items(Protocol):
    item: Sequence[_Item]


class _Updates(Protocol):
    update: Sequence[_Item]


class _RunRecord(Protocol):
    run_id: str
    project: str
    run_group: str
    display_name: str
    tags: Sequence[str]
    config: _Updates


class _OutputRaw(Protocol):
    line: str


class _Exit(Protocol):
    exit_code: int


class _ManifestEntry(Protocol):
    path: str
    digest: str
    size: int
    local_path: str


class _Manifest(Protocol):
    contents: Sequence[_ManifestEntry]


class _ArtifactRecord(Protocol):
    name: str
    type: str
    aliases: Sequence[str]
    metadata: str
    manifest: _Manifest


class _Record(Protocol):
    artifact: _ArtifactRecord
    history: _Items
    config: _Updates
    summary: _Updates
    run: _RunRecord
    output_raw: _OutputRaw
    exit: _Exit

    def ParseFromString(self, data: bytes) -> int: ...
    def WhichOneof(self, name: str) -> str | None: ...


@dataclass(frozen=True, slots=True)
class WandbRow:
    """One history row: W&B's own row counter, tracklog's ``global_step``, the values.

    Media values are dicts as W&B stores them (``{"_type": "video-file", "path":
    "media/videos/…mp4", …}``); :meth:`WandbRun.media_path` finds their file.
    """

    step: int
    global_step: int | None
    timestamp: float | None
    values: Mapping[str, object]


@dataclass(frozen=True, slots=True)
class WandbArtifactFile:
    """A file of an artifact: its size, W&B's digest (base64 MD5) and where
    ``wandb sync`` reads it from."""

    size: int
    digest: str
    local_path: str


@dataclass(frozen=True, slots=True)
class WandbArtifact:
    """An artifact version the run logged (a checkpoint is one of type ``model``)."""

    name: str
    type: str
    aliases: tuple[str, ...]
    metadata: Mapping[str, object]
    files: Mapping[str, WandbArtifactFile]


@dataclass(frozen=True, slots=True)
class WandbRun:
    """What a W&B offline run holds, read from its ``.wandb`` transaction log."""

    directory: Path
    run_id: str
    project: str
    rows: list[WandbRow]
    #: The run's group, display name and tags ("" and () when not set).
    group: str
    name: str
    tags: tuple[str, ...]
    config: Mapping[str, object]
    summary: Mapping[str, object]
    console: str
    exit_code: int | None
    #: Artifact versions, in the order the run logged them.
    artifacts: tuple[WandbArtifact, ...] = ()

    def media_path(self, value: object) -> Path:
        """The file of a media value from :attr:`rows` (its ``path`` under ``files/``)."""
        media = cast("Mapping[object, object]", value) if isinstance(value, Mapping) else None
        if media is None or not isinstance(media.get("path"), str):
            raise ValueError(f"not a W&B media value: {value!r}")
        return self.directory / "files" / str(media["path"])


def _wandb_log(path: Path) -> Path:
    """The ``.wandb`` file for ``path``: the file, its run folder, or a folder holding one run.

    W&B starts a new ``offline-run-<time>-<id>`` folder for every session, also when
    an offline run is resumed; folders of one run id count as one run, and the
    newest is taken (sessions before it are separate folders: read them by folder).
    """
    if path.is_file():
        return path
    found = sorted(path.glob("run-*.wandb"))
    if not found:
        found = sorted(path.glob("wandb/offline-run-*/run-*.wandb"))
    run_ids = {log.stem for log in found}
    if len(run_ids) != 1:
        raise ValueError(
            f"{path}: expected one W&B run (a run-*.wandb file), found {len(run_ids)}: "
            + ", ".join(str(p) for p in found)
        )
    return found[-1]  # folder names start with the session's start time


class WandbLogTail:
    """The records of a ``.wandb`` file that W&B may still be writing, as they complete.

    Each :meth:`read` returns the protobuf payloads completed since the previous one
    and remembers where it stopped: a record not written to its end yet (W&B writes
    the file in pieces) is returned by a later read, once it is whole.

    ``start``: begin at the block holding this byte (the last records of a long file),
    from the first record that begins there.
    """

    def __init__(self, path: Path, start: int = 0) -> None:
        self.path = path
        self._position = start - start % _BLOCK  # where the next unread chunk starts
        self._pending = b""  # the first pieces of a record split across blocks
        self._resync = self._position > 0  # skip the pieces of a record begun before

    def read(self) -> list[bytes]:
        with open(self.path, "rb") as file:
            file.seek(self._position)
            data = file.read()
        base, offset = self._position, 0
        if base == 0:
            if len(data) < 7:
                return []  # the header is not written yet
            if data[:4] != _WANDB_HEADER:
                raise ValueError(f"{self.path}: not a W&B transaction log (header {data[:7]!r})")
            offset = 7
        records: list[bytes] = []
        pending, resync = self._pending, self._resync  # kept only if the whole read succeeds
        while offset + 7 <= len(data):
            room = _BLOCK - (base + offset) % _BLOCK
            if room < 7:
                offset += room  # zero padding at the end of a block
                continue
            checksum, length, kind = struct.unpack_from("<IHB", data, offset)
            chunk = data[offset + 7 : offset + 7 + length]
            if len(chunk) < length:
                break  # being written (or the writer was killed mid-record)
            if kind == 0 and length == 0 and checksum == 0:
                if not data[offset:].strip(b"\0"):
                    break  # zeros to the end: not written yet
                offset += room  # pre-allocated, never written
                continue
            if zlib.crc32(bytes([kind]) + chunk) != checksum:
                if not data[offset + 7 + length :].strip(b"\0"):
                    break  # only zeros follow: the last record, not written to its end
                raise ValueError(f"{self.path}: record at byte {base + offset} fails its checksum")
            offset += 7 + length
            if resync:
                if kind not in (_FULL, _FIRST):
                    continue  # the rest of a record that began before ``start``
                resync = False
            if kind == _FULL:
                records.append(chunk)
            elif kind == _FIRST:
                pending = chunk
            elif kind == _MIDDLE:
                pending += chunk
            elif kind == _LAST:
                records.append(pending + chunk)
                pending = b""
        self._position, self._pending, self._resync = base + offset, pending, resync
        return records


def wandb_records(path: Path) -> list[bytes]:
    """The protobuf payloads of a ``.wandb`` file; a record cut off at the end is dropped."""
    return WandbLogTail(path).read()


def _decode_items(items: Sequence[_Item]) -> dict[str, object]:
    values: dict[str, object] = {}
    for item in items:
        parts = [item.key] if item.key else list(item.nested_key)
        target = values
        for part in parts[:-1]:
            inner = target.setdefault(part, {})
            assert isinstance(inner, dict)
            target = cast("dict[str, object]", inner)  # made above, or a JSON object: str keys
        target[parts[-1]] = json.loads(item.value_json)
    return values


def _history_row(record: _Record, index: int) -> WandbRow:
    values = _decode_items(record.history.item)
    step = values.pop("_step", None)
    global_step = values.get("global_step")
    timestamp = values.pop("_timestamp", None)
    values.pop("_runtime", None)
    return WandbRow(
        step=step if isinstance(step, int) else index,
        global_step=global_step if isinstance(global_step, int) else None,
        timestamp=float(timestamp) if isinstance(timestamp, int | float) else None,
        values=values,
    )


def wandb_history(path: Path, *, start: int = 0) -> list[WandbRow]:
    """The history rows of a ``.wandb`` file, from the first record that begins in the
    block holding byte ``start`` (see :class:`WandbLogTail`)."""
    import importlib

    record_class = importlib.import_module("wandb.proto.wandb_internal_pb2").Record
    rows: list[WandbRow] = []
    for payload in WandbLogTail(path, start=start).read():
        record: _Record = record_class()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            rows.append(_history_row(record, len(rows)))
    return rows


def read_wandb_offline(path: str | os.PathLike[str]) -> WandbRun:
    """Read a W&B run back from its transaction log, as ``wandb sync`` would upload it.

    ``path`` is a ``run-*.wandb`` file, its ``offline-run-*`` folder, or a folder whose
    ``wandb/`` holds exactly one run.
    """
    import importlib

    record_class = importlib.import_module("wandb.proto.wandb_internal_pb2").Record
    log = _wandb_log(Path(path))
    rows: list[WandbRow] = []
    config: dict[str, object] = {}
    summary: dict[str, object] = {}
    console: list[str] = []
    run_id = project = group = name = ""
    tags: tuple[str, ...] = ()
    exit_code: int | None = None
    artifacts: list[WandbArtifact] = []
    for payload in wandb_records(log):
        record: _Record = record_class()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            rows.append(_history_row(record, len(rows)))
        elif kind == "run":
            run_id, project = record.run.run_id, record.run.project
            group, name, tags = (
                record.run.run_group,
                record.run.display_name,
                tuple(record.run.tags),
            )
            config.update(_decode_items(record.run.config.update))
        elif kind == "config":
            config.update(_decode_items(record.config.update))
        elif kind == "summary":
            summary.update(_decode_items(record.summary.update))
        elif kind == "output_raw":
            console.append(record.output_raw.line)
        elif kind == "artifact":
            artifacts.append(_artifact(record.artifact))
        elif kind == "exit":
            exit_code = record.exit.exit_code
    config.pop("_wandb", None)
    return WandbRun(
        directory=log.parent,
        run_id=run_id,
        project=project,
        rows=rows,
        group=group,
        name=name,
        tags=tags,
        config=config,
        summary=summary,
        console="".join(console),
        exit_code=exit_code,
        artifacts=tuple(artifacts),
    )


def _artifact(record: _ArtifactRecord) -> WandbArtifact:
    metadata: object = json.loads(record.metadata) if record.metadata else {}
    return WandbArtifact(
        name=record.name,
        type=record.type,
        aliases=tuple(record.aliases),
        metadata=cast("dict[str, object]", metadata) if isinstance(metadata, dict) else {},
        files={
            entry.path: WandbArtifactFile(entry.size, entry.digest, entry.local_path)
            for entry in record.manifest.contents
        },
    )


# Checkpoints ---------------------------------------------------------------------------

_CHECKPOINT_RECORD = "tracklog-checkpoint.json"  # tracklog.values.CHECKPOINT_RECORD


@dataclass(frozen=True, slots=True)
class KeptCheckpoint:
    """A checkpoint a run kept in ``<run_dir>/checkpoints/``, from its record file."""

    folder: Path
    key: str
    step: int
    #: When it was dumped (Unix time).
    time: float
    aliases: tuple[str, ...]
    metadata: Mapping[str, object]
    #: The run it belongs to: the content of that run_dir's ``tracklog.json``.
    run: Mapping[str, object] | None
    #: The declared summaries as they were at its dump (where a resumed run's start).
    summaries: Mapping[str, object] | None = None


def read_checkpoints(
    run_dir: str | os.PathLike[str], key: str | None = None
) -> list[KeptCheckpoint]:
    """Every checkpoint kept in ``run_dir`` (of ``key``, if given), oldest dump first.

    A folder whose record is missing or unreadable (a process killed while saving
    it) is left out: its files may be incomplete.
    """
    found: list[KeptCheckpoint] = []
    for record in Path(run_dir, "checkpoints").rglob(_CHECKPOINT_RECORD):
        kept = _kept_checkpoint(record)
        if kept is not None and (key is None or kept.key == key):
            found.append(kept)
    found.sort(key=lambda kept: kept.time)
    return found


def latest_checkpoint(
    run_dir: str | os.PathLike[str], alias: str = "latest", key: str | None = None
) -> KeptCheckpoint | None:
    """The checkpoint ``alias`` points at: the last one dumped that carries it (None
    if there is none). What to restart a preempted run from::

        kept = latest_checkpoint("runs/ppo")
        model = PPO.load(kept.folder / "model.zip", env=env)
    """
    carrying = [kept for kept in read_checkpoints(run_dir, key) if alias in kept.aliases]
    return carrying[-1] if carrying else None


def read_checkpoint(folder: str | os.PathLike[str]) -> KeptCheckpoint | None:
    """The checkpoint kept in ``folder``, from its record; None if it has no valid one."""
    return _kept_checkpoint(Path(folder, _CHECKPOINT_RECORD))


def _kept_checkpoint(record: Path) -> KeptCheckpoint | None:
    if record.is_symlink() or not record.is_file():
        return None
    try:
        document: object = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(document, dict):
        return None
    fields = cast("dict[str, object]", document)
    key, step, time = fields.get("key"), fields.get("step"), fields.get("time")
    aliases, metadata, run = fields.get("aliases"), fields.get("metadata"), fields.get("run")
    summaries = fields.get("summaries")
    if not (
        isinstance(key, str)
        and type(step) is int
        and isinstance(time, int | float)
        and isinstance(aliases, list)
        and isinstance(metadata, dict)
    ):
        return None
    names = tuple(alias for alias in cast("list[object]", aliases) if isinstance(alias, str))
    return KeptCheckpoint(
        folder=record.parent,
        key=key,
        step=step,
        time=float(time),
        aliases=names,
        metadata=cast("dict[str, object]", metadata),
        run=cast("dict[str, object]", run) if isinstance(run, dict) else None,
        summaries=cast("dict[str, object]", summaries) if isinstance(summaries, dict) else None,
    )
