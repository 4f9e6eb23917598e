"""Byte encodings of media values: PNG, H.264 MP4, ``.npy`` and JSON.

Pure functions over the frozen values, so any output format (and any thread) can
call them; which value gets which encoding is decided by each backend's converter.
"""

from __future__ import annotations

import io
import json
import threading
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from tracklog.values import Histogram, HParam, Image, Video

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = ["decoded", "hparam_json", "mp4", "npy", "picture", "png"]


def _tile(batch: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """Lay a batch (N,H,W,C) side by side into one (H, N*W, C) picture."""
    return np.concatenate(list(batch), axis=1) if batch.shape[0] > 1 else batch[0]


def picture(image: Image) -> PILImage.Image:
    """The image as a Pillow image; a batch of N images is tiled left to right."""
    from PIL import Image as PILImage

    pixels = _tile(image.image)
    channels = pixels.shape[2]
    # Pillow infers L, RGB or RGBA from the array's shape and uint8 dtype.
    return PILImage.fromarray(pixels[..., 0] if channels == 1 else pixels)


def decoded(png_bytes: bytes) -> PILImage.Image:
    """A PNG (a rendered figure) as a Pillow image, fully loaded."""
    from PIL import Image as PILImage

    loaded = PILImage.open(io.BytesIO(png_bytes))
    # Pillow types load()'s result as its untyped C core's PixelAccess.
    loaded.load()  # pyright: ignore[reportUnknownMemberType]
    return loaded


def png(image: Image) -> bytes:
    """The image as PNG; a batch of N images is tiled left to right."""
    buffer = io.BytesIO()
    picture(image).save(buffer, format="PNG")
    return buffer.getvalue()


_memo_lock = threading.Lock()


def mp4(video: Video) -> bytes:
    """The clip as an H.264/yuv420p MP4 that browsers play, at the video's fps.

    A batch of N clips is tiled left to right; odd sizes are padded by one pixel
    because yuv420p needs even dimensions. Encoded once per ``Video`` object: the
    media thread and the MLflow and W&B workers receive the same object, and the
    ones that ask while it is being encoded wait for that encoding instead of
    repeating it (an encode holds the GIL for much of its time).
    """
    # The cache lives in the instance's __dict__, past the frozen __setattr__: it is
    # derived data, dropped with the video, and not part of its value or its pickle.
    state = video.__dict__
    encoded = state.get("_mp4")
    if encoded is None:
        with _memo_lock:
            lock = state.setdefault("_mp4_lock", threading.Lock())
        with lock:
            encoded = state.get("_mp4")
            if encoded is None:
                encoded = state["_mp4"] = _encode_mp4(video)
    assert isinstance(encoded, bytes)
    return encoded


def _encode_mp4(video: Video) -> bytes:
    import av

    c = video.shape[2]
    # (N,T,C,H,W) -> (T,H,N*W,C) as RGB
    frames = np.concatenate(list(video.frames.transpose(0, 1, 3, 4, 2)), axis=2)
    if c == 1:
        frames = np.repeat(frames, 3, axis=3)
    elif c == 4:
        frames = frames[..., :3]
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    buffer = io.BytesIO()
    # PyAV's stubs leave add_stream's **kwargs and Packet's stream parameter untyped,
    # hence the reportUnknown* ignores below.
    with av.open(buffer, mode="w", format="mp4") as container:
        rate = Fraction(video.fps).limit_denominator(1000)
        stream = container.add_stream("libx264", rate=rate)  # pyright: ignore[reportUnknownMemberType]
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            image = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            for packet in stream.encode(image):  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
                container.mux(packet)  # pyright: ignore[reportUnknownMemberType]
        for packet in stream.encode(None):  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
            container.mux(packet)  # pyright: ignore[reportUnknownMemberType]
    return buffer.getvalue()


def npy(histogram: Histogram) -> bytes:
    """The histogram's raw values in NumPy's ``.npy`` format (``numpy.load`` reads it)."""
    buffer = io.BytesIO()
    np.save(buffer, histogram.values, allow_pickle=False)
    return buffer.getvalue()


def hparam_json(hparam: HParam) -> bytes:
    """``{"hparams": {...nested...}, "metrics": {...}}`` as UTF-8 JSON."""
    document = {"hparams": hparam.plain(), "metrics": dict(hparam.metric_dict)}
    return json.dumps(document, indent=2, allow_nan=True).encode("utf-8")
