"""SB3's logger classes that tracklog's values and formats derive from, or stand-ins.

tracklog's ``Video``, ``Image``, ``Figure`` and ``HParam`` subclass SB3's, and its
output formats subclass SB3's ``KVWriter`` and ``SeqWriter``, so they work inside
SB3's own ``Logger``. Importing SB3 imports torch and every SB3 algorithm: over 2 CPU-s
on the cores training uses. The delivery process (``python -m tracklog._service``)
never hands anything to SB3, so there these names are empty stand-ins; they add no
attribute, since tracklog's classes define everything they have.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Final

__all__ = ["IN_DELIVERY_PROCESS", "Figure", "HParam", "Image", "KVWriter", "SeqWriter", "Video"]

#: Whether this process is a delivery process, which never loads SB3 (nor torch).
IN_DELIVERY_PROCESS: Final = (
    getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", None)
    == "tracklog._service"
)

if TYPE_CHECKING or not IN_DELIVERY_PROCESS:
    from stable_baselines3.common.logger import Figure, HParam, Image, KVWriter, SeqWriter, Video
else:

    class KVWriter:
        """Stands in for SB3's ``KVWriter`` in the delivery process."""

    class SeqWriter:
        """Stands in for SB3's ``SeqWriter`` in the delivery process."""

    class Video:
        """Stands in for SB3's ``Video`` in the delivery process."""

    class Image:
        """Stands in for SB3's ``Image`` in the delivery process."""

    class Figure:
        """Stands in for SB3's ``Figure`` in the delivery process."""

    class HParam:
        """Stands in for SB3's ``HParam`` in the delivery process."""
