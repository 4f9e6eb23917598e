"""Equal histogram buckets that any finite values fit, shared by the converters."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["HISTOGRAM_BINS", "equal_buckets"]

HISTOGRAM_BINS = 64


def equal_buckets(
    finite: npt.NDArray[np.float64], bins: int = HISTOGRAM_BINS
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float64]]:
    """``np.histogram``'s ``(counts, edges)`` of ``finite`` (finite, at least one value)
    in ``bins`` equal buckets, for any values: the edges are computed without
    ``high - low`` (which overflows for ±1e308) and merged where the range is too narrow
    for ``bins`` distinct float64 edges (``np.histogram`` raises on both); when every
    value is the same, one bucket from it to itself."""
    low, high = float(finite.min()), float(finite.max())
    if low == high:
        return np.array([finite.size], dtype=np.intp), np.array([low, high])
    t = np.linspace(0.0, 1.0, bins + 1)
    edges = np.unique(np.clip(low * (1.0 - t) + high * t, low, high))
    counts, _ = np.histogram(finite, bins=edges)
    return counts.astype(np.intp), edges
