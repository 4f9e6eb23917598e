"""Readers the tests share for media files: what a browser or player would decode."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import numpy.typing as npt

__all__ = ["decode_mp4"]


def decode_mp4(path: Path) -> tuple[list[npt.NDArray[np.uint8]], Fraction]:
    """The RGB frames of the MP4 at ``path`` and its average frame rate, via PyAV."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [
            np.asarray(frame.to_ndarray(format="rgb24"), dtype=np.uint8)
            for frame in container.decode(stream)
        ]
        rate = stream.average_rate
    assert rate is not None
    return frames, Fraction(rate)
