"""Mapping log keys to the names a backend accepts: deterministic, warned once, never merged."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable

__all__ = ["NameMap"]


class NameMap:
    """Remembers which backend name each key got, so that no two keys share one.

    A key the backend accepts keeps its name. Any other key becomes ``sanitise(key)``,
    with one warning. If that name is already held by another key, the newcomer gets
    ``-`` and 8 hex digits of its key's SHA-1 appended (cut to ``max_length``), also
    with one warning: a deterministic name, so the same key always lands in the same
    place, and two keys are never merged into one series.
    """

    def __init__(
        self,
        backend: str,
        is_valid: Callable[[str], bool],
        sanitise: Callable[[str], str],
        max_length: int,
    ) -> None:
        self.backend = backend
        self._is_valid = is_valid
        self._sanitise = sanitise
        self._max_length = max_length
        self._names: dict[str, str] = {}
        self._owners: dict[str, str] = {}

    def __call__(self, key: str) -> str:
        """The backend name for ``key`` (the same on every call)."""
        name = self._names.get(key)
        if name is not None:
            return name
        candidate = key if self._is_valid(key) else self._sanitise(key)
        name = candidate
        if candidate in self._owners:
            digest = hashlib.sha1(key.encode("utf-8")).hexdigest()
            width = 8
            while name in self._owners:
                name = f"{candidate[: self._max_length - width - 1]}-{digest[:width]}"
                width += 4
            warnings.warn(
                f"{self.backend}: keys {self._owners[candidate]!r} and {key!r} both map to "
                f"{candidate!r}; logging {key!r} as {name!r}",
                stacklevel=3,
            )
        elif candidate != key:
            warnings.warn(
                f"{self.backend} does not accept the key {key!r}; logging it as {name!r}",
                stacklevel=3,
            )
        self._names[key] = name
        self._owners[name] = key
        return name
