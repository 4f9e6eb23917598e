"""Mapping log keys to the names a backend accepts: deterministic, warned once, never merged."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable

__all__ = ["NameMap"]


class NameMap:
    """Gives each key a name the backend accepts, the same in every process and session.

    A key the backend accepts keeps its name. Any other key becomes ``sanitise(key)``
    followed by ``-`` and 8 hex digits of the key's SHA-1, with one warning. The name
    depends on the key alone, not on which keys came first, so a resumed run or another
    run of a sweep puts the same key in the same series, and a renamed key can never
    take the name of a key that is logged as itself (``a:b`` becomes ``a_b-<hash>``,
    never ``a_b``).
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
        if self._is_valid(key):
            name = key
        else:
            name = self._renamed(key)
            warnings.warn(
                f"{self.backend} does not accept the key {key!r}; logging it as {name!r}",
                stacklevel=3,
            )
        owner = self._owners.get(name)
        if owner is not None:  # a valid key spelled exactly like another key's new name
            raise ValueError(
                f"{self.backend}: keys {owner!r} and {key!r} would both be logged as {name!r}"
            )
        self._names[key] = name
        self._owners[name] = key
        return name

    def _renamed(self, key: str) -> str:
        digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:8]
        return f"{self._sanitise(key)[: self._max_length - 9]}-{digest}"
