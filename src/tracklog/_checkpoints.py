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

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, Final

from tracklog._media import safe_relpath
from tracklog.values import CHECKPOINT_RECORD, Checkpoint, checkpoint_files, to_plain

__all__ = ["CHECKPOINTS", "CheckpointStore", "checkpoint_file", "stored_path"]

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


def checkpoint_file(folder: Path, name: str) -> Path:
    """The file ``name`` of the checkpoint kept in ``folder``, never through a link: a
    queue names files in run_dir, and what a link there points at is not its to upload."""
    local = folder.joinpath(*PurePosixPath(name).parts)
    for part in (local, *local.parents):
        if part == folder.parent:
            break
        if part.is_symlink():
            raise ValueError(f"checkpoint file {str(local)!r}: {str(part)!r} is a symbolic link")
    return local


class CheckpointStore:
    """The ``checkpoints/`` folder of one run_dir, as one logger writes it."""

    def __init__(self, run_dir: Path, identity: Callable[[], dict[str, Any] | None]) -> None:
        self.run_dir = run_dir
        self._identity = identity
        self._handed_out: set[Path] = set()

    def new_dir(self, key: str, step: int) -> Path:
        """A new, empty folder for the checkpoint of ``key`` at ``step``."""
        base = self.run_dir / CHECKPOINTS / safe_relpath(key)
        base.mkdir(parents=True, exist_ok=True)
        n = 0
        while True:
            folder = base / (f"step_{step}" if n == 0 else f"step_{step}-{n}")
            try:
                folder.mkdir()
                break
            except FileExistsError:
                n += 1
        folder = Path(os.path.abspath(folder))
        self._handed_out.add(folder)
        return folder

    def keep(self, key: str, step: int, value: Checkpoint) -> Checkpoint:
        """``value`` as kept in run_dir: its files copied (unless it is a folder from
        :meth:`new_dir`) and its record written. Raises OSError if that fails."""
        if value.path in self._handed_out:
            folder = value.path
            self._handed_out.discard(folder)
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
        text = json.dumps(record, indent=2, allow_nan=True, ensure_ascii=False)
        (folder / CHECKPOINT_RECORD).write_text(text + "\n", encoding="utf-8")
        return value.kept(folder, relative, files)


def _copy(value: Checkpoint, folder: Path) -> None:
    if len(value.files) == 1 and value.path.is_file():
        shutil.copyfile(value.path, folder / value.files[0][0])
        return
    for name, _ in value.files:
        target = folder.joinpath(*PurePosixPath(name).parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        # copyfile: the kernel copies (copy_file_range/sendfile), without Python buffers.
        shutil.copyfile(value.path.joinpath(*PurePosixPath(name).parts), target)
