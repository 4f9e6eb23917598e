"""Mapping log keys to the names a backend accepts: deterministic, warned once, never merged."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable

__all__ = ["KeyWarning", "NameMap"]


class KeyWarning(UserWarning):
    """A key a backend does not accept is logged under another name there.

    Raised at the ``dump()`` that first records the key (the training side names keys
    as the delivery process will); the delivery process does not repeat it.
    """


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

    def __call__(self, key: str, derived: str | None = None) -> str:
        """The backend name for ``key`` (the same on every call).

        ``derived`` names a series computed from ``key`` (a histogram's ``mean``): its
        name is ``key/derived`` unless a recorded key already holds that name.
        """
        owner = key if derived is None else f"{key}\x00{derived}"
        name = self._names.get(owner)
        if name is not None:
            return name
        wanted = key if derived is None else f"{key}/{derived}"
        if self._is_valid(wanted):
            name = wanted
        else:
            name = self._renamed(wanted, owner)
            warnings.warn(
                f"{self.backend} does not accept the key {wanted!r}; logging it as {name!r}",
                KeyWarning,
                stacklevel=3,
            )
        if name in self._owners:  # e.g. a recorded "w/mean" and histogram "w"'s mean
            taken_by = self._owners[name].replace("\x00", "/")
            name = self._renamed(wanted, owner)
            warnings.warn(
                f"{self.backend}: {wanted!r} is already logged for {taken_by!r}; "
                f"logging it as {name!r}",
                KeyWarning,
                stacklevel=3,
            )
        self._names[owner] = name
        self._owners[name] = owner
        return name

    def _renamed(self, wanted: str, owner: str) -> str:
        digest = hashlib.sha1(owner.encode("utf-8")).hexdigest()
        width = 8
        while True:
            name = f"{self._sanitise(wanted)[: self._max_length - width - 1]}-{digest[:width]}"
            if name not in self._owners or width >= len(digest):
                return name
            width += 4
