"""Checkpoints kept with the run: ``<run_dir>/checkpoints/<key>/step_<step>/``.

At ``dump()`` each :class:`~tracklog.values.Checkpoint` gets a folder of its own there
(``step_<step>-<n>`` when the key already has one at that step), holding a copy of its
files and ``tracklog-checkpoint.json`` (key, step, aliases, metadata and the run's
identity). A folder handed out by :meth:`CheckpointStore.new_dir` (what
``Logger.checkpoint_dir`` returns, and where ``CheckpointCallback`` saves) is kept as
it is, without a copy. Every output names the kept folder, and the delivery process
uploads from it: a later save over the user's files cannot change what is uploaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import time
from collections.abc import Callable, Generator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Final

from tracklog._media import safe_relpath
from tracklog.readers import read_checkpoint, read_checkpoints
from tracklog.values import CHECKPOINT_RECORD, Checkpoint, checkpoint_files, to_plain

__all__ = [
    "CHECKPOINTS",
    "CheckpointStore",
    "checkpoint_file",
    "kept_summaries",
    "new_step_dir",
    "stored_path",
    "superseded",
]

CHECKPOINTS: Final = "checkpoints"


def stored_path(path: str) -> PurePosixPath:
    """``path`` (a kept checkpoint, relative to run_dir) checked; ValueError otherwise."""
    relative = PurePosixPath(path)
    if (
        relative.is_absolute()
        or len(relative.parts) < 2
        or relative.parts[0] != CHECKPOINTS
        or any(part in ("", ".", "..") for part in relative.parts)
        or relative.as_posix() != path
    ):
        raise ValueError(f"checkpoint path {path!r} is not a folder under {CHECKPOINTS}/")
    return relative


_NOFOLLOW: Final = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY: Final = getattr(os, "O_DIRECTORY", 0)
_NONBLOCK: Final = getattr(os, "O_NONBLOCK", 0)  # a FIFO planted there must not block


@contextlib.contextmanager
def checkpoint_file(run_dir: Path | None, folder: Path, name: str) -> Generator[Path]:
    """The file ``name`` of the checkpoint in ``folder``, to upload by its path.

    ``folder`` relative (as read from the queue) is under ``<run_dir>/checkpoints/``:
    every part of the path below run_dir is opened without following a symbolic link,
    the file must be a regular one, and while the block runs it is still that very
    file (what a link planted in run_dir points at is not the queue's to upload).
    Raises ValueError naming the file otherwise.
    """
    parts = PurePosixPath(name).parts
    if not parts or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"checkpoint file {name!r} leaves its folder")
    if folder.is_absolute():  # in the training process: the logger's own folder
        base, below = folder, parts
    else:
        if run_dir is None:
            raise ValueError(f"checkpoint {folder.as_posix()!r}: no run_dir to find it in")
        base, below = run_dir, (*stored_path(folder.as_posix()).parts, *parts)
    path = base.joinpath(*below)
    fd = os.open(base, os.O_RDONLY | _DIRECTORY | os.O_CLOEXEC)
    try:
        for part in below[:-1]:
            try:
                inner = os.open(
                    part, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                )
            except OSError as error:
                raise ValueError(
                    f"checkpoint file {str(path)!r}: {part!r} is not a folder ({error.strerror})"
                ) from None
            os.close(fd)
            fd = inner
        try:
            inner = os.open(
                below[-1], os.O_RDONLY | _NOFOLLOW | _NONBLOCK | os.O_CLOEXEC, dir_fd=fd
            )
        except OSError as error:
            raise ValueError(f"checkpoint file {str(path)!r}: {error.strerror}") from None
        os.close(fd)
        fd = inner
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):
            raise ValueError(f"checkpoint file {str(path)!r} is not a regular file")
        found = os.stat(path)
        if (found.st_dev, found.st_ino) != (opened.st_dev, opened.st_ino):
            raise ValueError(f"checkpoint file {str(path)!r} was replaced while read")
        yield path
    finally:
        os.close(fd)


def superseded(run_dir: Path | None, folder: Path) -> frozenset[str]:
    """The aliases of the checkpoint kept in ``folder`` that a checkpoint of the same key
    dumped after it carries: not to be moved back to this one (a replay of a dead job's
    queue after the restarted job logged newer checkpoints)."""
    if run_dir is None or folder.is_absolute():
        return frozenset()
    try:
        here = run_dir.joinpath(*stored_path(folder.as_posix()).parts)
    except ValueError:
        return frozenset()
    own = read_checkpoint(here)
    if own is None:
        return frozenset()
    newer: set[str] = set()
    for record in here.parent.glob(f"*/{CHECKPOINT_RECORD}"):
        other = read_checkpoint(record.parent)
        if other is not None and other.key == own.key and other.time > own.time:
            newer.update(other.aliases)
    return frozenset(newer)


def new_step_dir(base: Path, step: int) -> Path:
    """A new, empty folder ``<base>/step_<step>`` (``step_<step>-<n>`` if taken)."""
    base.mkdir(parents=True, exist_ok=True)
    n = 0
    while True:
        folder = base / (f"step_{step}" if n == 0 else f"step_{step}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            n += 1


class CheckpointStore:
    """The ``checkpoints/`` folder of one run_dir, as one logger writes it."""

    def __init__(self, run_dir: Path, identity: Callable[[], dict[str, Any] | None]) -> None:
        self.run_dir = run_dir
        self._identity = identity
        self._handed_out: set[Path] = set()

    def new_dir(self, key: str, step: int) -> Path:
        """A new, empty folder for the checkpoint of ``key`` at ``step``."""
        folder = Path(
            os.path.abspath(new_step_dir(self.run_dir / CHECKPOINTS / safe_relpath(key), step))
        )
        self._handed_out.add(folder)
        return folder

    def keep(
        self, key: str, step: int, value: Checkpoint, summaries: dict[str, Any] | None = None
    ) -> Checkpoint:
        """``value`` as kept in run_dir: its files copied (unless it is a folder from
        :meth:`new_dir`) and its record written. Raises OSError if that fails."""
        if value.path in self._handed_out:
            folder = value.path
            self._handed_out.discard(folder)
            _resolve_links(folder)
        else:
            folder = self.new_dir(key, step)
            self._handed_out.discard(folder)
            try:
                _copy(value, folder)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
        files = checkpoint_files(folder)  # what is there now, should a file have changed
        relative = folder.relative_to(os.path.abspath(self.run_dir)).as_posix()
        record = {
            "key": key,
            "step": step,
            "time": time.time(),
            "aliases": list(value.aliases),
            "metadata": to_plain(value.metadata),
            "files": [list(entry) for entry in files],
            "run": self._identity(),
        }
        if summaries is not None:
            record["summaries"] = summaries
        text = json.dumps(record, indent=2, allow_nan=True, ensure_ascii=False)
        (folder / CHECKPOINT_RECORD).write_text(text + "\n", encoding="utf-8")
        return value.kept(folder, relative, files)


def _copy(value: Checkpoint, folder: Path) -> None:
    for name, _ in value.files:
        parts = PurePosixPath(name).parts
        target = folder.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        # copyfile: the kernel copies (sendfile), without Python buffers; links are
        # followed, so the kept folder holds files only.
        shutil.copyfile(value.folder.joinpath(*parts), target)


def _resolve_links(folder: Path) -> None:
    """Replace each symbolic link in ``folder`` by a copy of what it points at: the
    delivery process uploads files only, never through a link."""
    for parent, directories, names in os.walk(folder):
        for name in [*directories, *names]:
            link = Path(parent, name)
            if not link.is_symlink():
                continue
            aside = link.with_name(f".{name}.tracklog-copy")
            if link.is_dir():
                shutil.copytree(link, aside, symlinks=False)
                link.unlink()
                aside.rename(link)
            else:
                shutil.copyfile(link, aside)
                os.replace(aside, link)


def kept_summaries(run_dir: Path) -> Mapping[str, object] | None:
    """The summaries kept with the newest checkpoint of ``run_dir`` (None without one):
    where a resumed run's summaries start."""
    with_summaries = [kept for kept in read_checkpoints(run_dir) if kept.summaries is not None]
    return with_summaries[-1].summaries if with_summaries else None
