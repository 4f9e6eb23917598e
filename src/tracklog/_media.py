"""Media files next to JSONL/CSV rows: ``<run_dir>/media/<key>/step_<step>.<ext>``.

A row names its media files when it is dumped. Videos and images, whose encoding is
slow, are encoded by the delivery process when the logger has one (``defer``): the
name is claimed at dump time (an empty file) and the row's queue entry carries the job;
the file is complete (written aside, then renamed over the name) once ``flush()`` or
``close()`` returns. A store without ``defer`` (a format built by hand) encodes at once.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath

__all__ = ["MediaStore", "safe_relpath"]

_log = logging.getLogger("tracklog")

_REMEMBERED_DUMPS = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
# File systems refuse names over 255 bytes and paths over 4096: a long key must not
# make dump() raise, so parts are cut and deep keys folded (MediaStore keeps the
# resulting directories distinct).
_MAX_PART = 64
_MAX_DEPTH = 8


def safe_relpath(key: str) -> PurePosixPath:
    """A relative path for ``key`` that cannot leave its directory.

    Each ``/``-separated part keeps letters, digits, ``.``, ``_`` and ``-``; any other
    run of characters becomes ``_``; ``.``/``..``/empty parts become ``_``. Parts are
    cut to 64 characters, and parts beyond the 8th are joined into the 8th with ``_``.
    """
    parts = [_UNSAFE.sub("_", part) for part in key.split("/")]
    if len(parts) > _MAX_DEPTH:
        parts[_MAX_DEPTH - 1 :] = ["_".join(parts[_MAX_DEPTH - 1 :])]
    parts = [part[:_MAX_PART] for part in parts]
    return PurePosixPath(*("_" if part in ("", ".", "..") else part for part in parts))


class MediaStore:
    """Writes each (dump, key) media file once, however many formats ask for it.

    JSONL and CSV share one store per run, so a video is encoded and written once and
    both rows point at the same file. Two keys that sanitise to the same directory get
    distinct ones, and a file left by an earlier process is never overwritten.
    """

    def __init__(self, run_dir: Path, *, defer: bool = False) -> None:
        self.run_dir = run_dir
        self.defer = defer
        # seq -> key -> (path, extension): files the delivery process is to encode.
        self._deferred: dict[int, dict[str, tuple[str, str]]] = {}
        # seq -> key -> path, for the most recent dumps only (formats of one dump
        # write close together; older entries are never asked for again).
        self._written: dict[int, dict[str, str]] = {}
        self._dirs: dict[str, PurePosixPath] = {}
        self._dir_owner: dict[PurePosixPath, str] = {}

    def _dir_for(self, key: str) -> PurePosixPath:
        known = self._dirs.get(key)
        if known is not None:
            return known
        relative = safe_relpath(key)
        base = PurePosixPath("media") / relative
        # Raises if media/ itself is not a directory, so the loop below always ends.
        (self.run_dir / base.parts[0]).mkdir(parents=True, exist_ok=True)
        candidate, n = base, 1
        while candidate in self._dir_owner or not self._make_dir(candidate):
            if candidate not in self._dir_owner:
                # A media file sits where this directory or a parent should be (key "a"
                # wrote media/a/step_0.npy; key "a/step_0.npy" needs that name). Only
                # directories are ever created right under media/, so go there.
                base = PurePosixPath("media", "_".join(relative.parts)[:_MAX_PART])
            n += 1
            candidate = base.with_name(f"{base.name}~{n}")
        self._dirs[key] = candidate
        self._dir_owner[candidate] = key
        return candidate

    def _make_dir(self, directory: PurePosixPath) -> bool:
        try:
            (self.run_dir / directory).mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            return False
        return True

    def save(
        self,
        seq: int,
        step: int,
        key: str,
        ext: str,
        encode: Callable[[], bytes],
        *,
        background: bool = False,
    ) -> str:
        """Write ``encode()`` for dump ``seq`` once; return its path relative to ``run_dir``.

        With ``background`` (videos, images) and ``defer``, the name is claimed now and
        the job is kept for :meth:`take`, so ``dump()`` does not wait for an H.264 encode.
        """
        written = self._written.get(seq)
        if written is None:
            while len(self._written) >= _REMEMBERED_DUMPS:
                del self._written[next(iter(self._written))]
            written = self._written[seq] = {}
        done = written.get(key)
        if done is not None:
            return done
        directory = self._dir_for(key)
        later = background and self.defer
        data = b"" if later else encode()
        n = 0
        while True:
            name = f"step_{step}.{ext}" if n == 0 else f"step_{step}-{n}.{ext}"
            relative = directory / name
            try:
                with open(self.run_dir / relative, "xb") as file:
                    file.write(data)
                break
            except FileExistsError:
                n += 1
        path = relative.as_posix()
        written[key] = path
        if later:
            self._deferred.setdefault(seq, {})[key] = (path, ext)
        return path

    def take(self, seq: int) -> dict[str, tuple[str, str]]:
        """The media jobs dump ``seq`` left for the delivery process (and forget them)."""
        return self._deferred.pop(seq, {})
