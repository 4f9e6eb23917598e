"""Inputs the backend tests share: pixels, clips, one value of every kind."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import numpy.typing as npt

import tracklog

__all__ = ["NESTED_HPARAMS", "grey_clip", "one_of_every_kind", "random_pixels"]

NESTED_HPARAMS: dict[str, object] = {
    "lr": 3e-4,
    "algo": "PPO",
    "sde": False,
    "seed": None,
    "n_steps": 2048,
    "net_arch": [64, 64],
    "policy": {"activation": "tanh", "kwargs": {"ortho": True}},
}


def random_pixels(shape: tuple[int, ...], seed: int = 0) -> npt.NDArray[np.uint8]:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def grey_clip(levels: Sequence[int], height: int = 8, width: int = 6) -> npt.NDArray[np.uint8]:
    """(T,C,H,W) RGB frames, frame t filled with grey level ``levels[t]``."""
    return np.stack([np.full((3, height, width), level, dtype=np.uint8) for level in levels])


def one_of_every_kind() -> dict[str, tracklog.Recordable]:
    """A scalar, a text, a histogram, an image, a figure, a video and an HParam."""
    figure, _ = plt.subplots(figsize=(2, 2), dpi=20)
    return {
        "scalar": 1.25,
        "text": "hello",
        "hist": np.ones(3),
        "image": tracklog.Image(random_pixels((2, 2, 3))),
        "figure": tracklog.Figure(figure),
        "video": tracklog.Video(random_pixels((2, 3, 4, 4)), fps=4),
        "hparam": tracklog.HParam({"lr": 0.1}),
    }
