"""Values: what record() accepts, what it turns each input into, and what it rejects."""

from __future__ import annotations

import io
import json
import logging
import math
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import av
import matplotlib.pyplot as plt
import numpy as np
import numpy.typing as npt
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image as PILImage
from pydantic import ValidationError
from stable_baselines3.common import logger as sb3

import tracklog
from tracklog import Figure, Histogram, HParam, Image, Scalar, Text, Video
from tracklog.values import check_key, normalise

# Helpers ---------------------------------------------------------------------------------


@pytest.fixture
def logger(run_dir: Path) -> Iterator[tracklog.Logger]:
    with tracklog.build_logger({"run_dir": str(run_dir), "outputs": [{"type": "jsonl"}]}) as built:
        yield built


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    text = (run_dir / "progress.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def _dumped(logger: tracklog.Logger, run_dir: Path, step: int = 1) -> dict[str, Any]:
    """Dump, then the last JSONL row as json.loads reads it (its media files written)."""
    logger.dump(step=step)
    assert logger.flush()
    row = _rows(run_dir)[-1]
    assert row["_step"] == step
    return row


def _same_float(a: float, b: float) -> bool:
    return struct.pack("<d", a) == struct.pack("<d", b) or (math.isnan(a) and math.isnan(b))


# Scalars ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (3, 3),
        (-(2**53), -(2**53)),
        (2.5, 2.5),
        (True, True),
        (False, False),
        (np.float32(0.25), 0.25),
        (np.float64(1e-300), 1e-300),
        (np.float16(0.5), 0.5),
        (np.int64(2**40), 2**40),
        (np.int8(-3), -3),
        (np.uint16(7), 7),
        (np.bool_(True), True),
        (np.array(1.75), 1.75),
        (np.array(4, dtype=np.int32), 4),
        (np.array(False), False),
        (torch.tensor(0.5), 0.5),
        (torch.tensor(3), 3),
        (torch.tensor(True), True),
        (torch.tensor(1.5, requires_grad=True) * 2, 3.0),
        (torch.tensor(1.5, dtype=torch.bfloat16), 1.5),
        (torch.tensor(0.75, dtype=torch.float16), 0.75),
    ],
    ids=lambda value: type(value).__name__,
)
def test_scalars_keep_their_python_type(
    logger: tracklog.Logger, run_dir: Path, value: Any, expected: bool | int | float
) -> None:
    normalised = normalise("k", value)
    assert isinstance(normalised, Scalar)
    assert normalised == Scalar(expected)
    assert type(normalised.value) is type(expected)
    logger.record("k", value)
    read = _dumped(logger, run_dir)["k"]
    assert read == expected
    assert type(read) is type(expected)


@given(st.floats())
def test_any_float_is_a_scalar_bit_for_bit(value: float) -> None:
    normalised = normalise("k", value)
    assert isinstance(normalised, Scalar)
    assert isinstance(normalised.value, float)
    assert _same_float(normalised.value, value)


@given(st.floats(width=32))
def test_float32_scalars_are_exact(value: float) -> None:
    normalised = normalise("k", np.float32(value))
    assert isinstance(normalised, Scalar)
    assert type(normalised.value) is float
    assert _same_float(normalised.value, float(np.float32(value)))


def test_nan_and_infinities_are_valid(logger: tracklog.Logger, run_dir: Path) -> None:
    logger.record("nan", math.nan)
    logger.record("inf", math.inf)
    logger.record("ninf", -math.inf)
    logger.record("np_nan", np.float32("nan"))
    logger.record("t_inf", torch.tensor(-math.inf))
    row = _dumped(logger, run_dir)
    assert math.isnan(row["nan"])
    assert math.isnan(row["np_nan"])
    assert row["inf"] == math.inf
    assert row["ninf"] == -math.inf
    assert row["t_inf"] == -math.inf


# Text ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["hello", "", "1.5", "line\nbreak", "ünïcödé ✓", np.str_("np")])
def test_strings_become_text(logger: tracklog.Logger, run_dir: Path, text: str) -> None:
    normalised = normalise("k", text)
    assert isinstance(normalised, Text)
    assert normalised == Text(str(text))
    assert type(normalised.value) is str
    logger.record("k", text)
    read = _dumped(logger, run_dir)["k"]
    assert read == text
    assert type(read) is str


# Histograms ------------------------------------------------------------------------------


def _histogram_file(run_dir: Path, row: dict[str, Any], key: str) -> npt.NDArray[Any]:
    path = row[key]
    assert isinstance(path, str)
    loaded: npt.NDArray[Any] = np.load(run_dir / path, allow_pickle=False)
    return loaded


@pytest.mark.parametrize(
    "value",
    [
        np.arange(6, dtype=np.float64).reshape(2, 3),
        np.array([1, 2, 3], dtype=np.int64),
        np.array([True, False]),
        np.array([0.5], dtype=np.float32),
        torch.arange(5, dtype=torch.float32),
        torch.ones((2, 2), requires_grad=True) * 3,
        torch.tensor([1.5, 2.5], dtype=torch.bfloat16),
    ],
    ids=["f64-2d", "i64", "bool", "one-element", "tensor", "grad-tensor", "bf16-tensor"],
)
def test_arrays_and_tensors_become_histograms(
    logger: tracklog.Logger, run_dir: Path, value: npt.NDArray[Any] | torch.Tensor
) -> None:
    expected = (
        value.detach().float().numpy().reshape(-1)
        if isinstance(value, torch.Tensor)
        else value.reshape(-1)
    )
    normalised = normalise("h", value)
    assert isinstance(normalised, Histogram)
    np.testing.assert_array_equal(normalised.values, expected)
    assert not normalised.values.flags.writeable
    logger.record("h", value)
    np.testing.assert_array_equal(_histogram_file(run_dir, _dumped(logger, run_dir), "h"), expected)


@given(
    hnp.arrays(
        dtype=st.sampled_from([np.float64, np.float32, np.int32, np.uint8, np.bool_]),
        shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=5),
    )
)
def test_histograms_hold_a_flat_copy(array: npt.NDArray[Any]) -> None:
    normalised = normalise("h", array)
    assert isinstance(normalised, Histogram)
    assert normalised.shape == (array.size,)
    assert normalised.values.dtype == array.dtype
    np.testing.assert_array_equal(normalised.values, array.reshape(-1))
    assert not np.shares_memory(normalised.values, array)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ([1.5, 2.5, -3.0], np.array([1.5, 2.5, -3.0])),
        ((200, 187, 500), np.array([200, 187, 500], dtype=np.int64)),
        ([True, 2, 0.5], np.array([1.0, 2.0, 0.5])),
        ([np.float32(0.25), np.int64(3)], np.array([0.25, 3.0])),
        ([math.nan, math.inf], np.array([math.nan, math.inf])),
    ],
    ids=["floats", "int-tuple", "mixed", "numpy-scalars", "non-finite"],
)
def test_a_list_or_tuple_of_numbers_is_a_histogram_as_sb3_accepts_it(
    logger: tracklog.Logger, run_dir: Path, value: Any, expected: npt.NDArray[Any]
) -> None:
    normalised = normalise("h", value)
    assert isinstance(normalised, Histogram)
    assert normalised.values.dtype == expected.dtype
    np.testing.assert_array_equal(normalised.values, expected)
    logger.record("h", value)
    np.testing.assert_array_equal(_histogram_file(run_dir, _dumped(logger, run_dir), "h"), expected)


@given(st.lists(st.floats(allow_nan=False) | st.integers(-(2**63), 2**63 - 1), min_size=1))
def test_any_list_of_numbers_is_the_histogram_numpy_makes_of_it(
    items: list[float | int],
) -> None:
    normalised = normalise("h", items)
    assert isinstance(normalised, Histogram)
    np.testing.assert_array_equal(normalised.values, np.array(items))


def test_mutating_an_array_after_record_changes_nothing(
    logger: tracklog.Logger, run_dir: Path
) -> None:
    array = np.array([1.0, 2.0, 3.0])
    tensor = torch.tensor([4.0, 5.0])
    logger.record("array", array)
    logger.record("tensor", tensor)
    array[:] = -1.0
    tensor.add_(100.0)  # in place: tensor.numpy() would share this memory
    row = _dumped(logger, run_dir)
    np.testing.assert_array_equal(_histogram_file(run_dir, row, "array"), [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(_histogram_file(run_dir, row, "tensor"), [4.0, 5.0])


# Rejected values -------------------------------------------------------------------------


class _Opaque:
    pass


@pytest.mark.parametrize(
    ("value", "error", "detail"),
    [
        (object(), TypeError, "builtins.object"),
        (_Opaque(), TypeError, "_Opaque"),
        (None, TypeError, "the value is None; skip the record() call when there is nothing"),
        ({"a": 1}, TypeError, "a dict is not one value; record each entry under a key of"),
        (["a"], TypeError, "a list is logged as a histogram, so it must hold only numbers; "),
        ((1.0, None), TypeError, "so it must hold only numbers; item 1 is builtins.NoneType"),
        ([[1.0, 2.0]], TypeError, "item 0 is builtins.list"),
        ([], ValueError, "the list is empty"),
        ((), ValueError, "the tuple is empty"),
        ([1, 2**70], ValueError, "an int of the list does not fit in 64 bits"),
        (range(3), TypeError, "builtins.range"),
        (b"bytes", TypeError, "bytes"),
        (1 + 2j, TypeError, "complex"),
        (np.complex64(1), TypeError, "complex64"),
        (np.datetime64("2024-01-01"), TypeError, "datetime64"),
        (np.array([object(), object()]), TypeError, "dtype object"),
        (np.array(object()), TypeError, "dtype object"),
        (np.array(["a", "b"]), TypeError, "dtype <U1"),
        (np.array([1j, 2j]), TypeError, "dtype complex128"),
        (torch.tensor([1j, 2j]), TypeError, "torch.Tensor"),
        (np.array([]), ValueError, "empty"),
        (np.zeros((3, 0)), ValueError, "empty"),
        (torch.zeros(0), ValueError, "empty"),
    ],
    ids=lambda value: type(value).__name__,
)
def test_unsupported_values_raise_naming_the_key(
    logger: tracklog.Logger, run_dir: Path, value: Any, error: type[Exception], detail: str
) -> None:
    with pytest.raises(error) as caught:
        normalise("bad/key", value)
    assert "'bad/key'" in str(caught.value)
    assert detail in str(caught.value)
    with pytest.raises(error, match="'bad/key'"):
        logger.record("bad/key", value)
    logger.dump(step=1)  # the rejected value was not kept for the dump
    assert _rows(run_dir) == []


def test_on_bad_value_report_says_each_key_once_and_keeps_every_other_value(
    run_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = {"run_dir": str(run_dir), "outputs": [{"type": "jsonl"}], "on_bad_value": "report"}
    with (
        caplog.at_level(logging.WARNING, logger="tracklog"),
        tracklog.build_logger(settings) as logger,
    ):
        for step in (1, 2):
            logger.record("kept/before", float(step))
            logger.record("callback/info", {"episode": step})  # type: ignore[arg-type]
            logger.record("callback/info", None)  # type: ignore[arg-type]  # said once
            logger.record_mean("callback/mean", "high")  # type: ignore[arg-type]
            logger.record(3, 1.0)  # type: ignore[arg-type]  # a bad key
            logger.record("kept/after", [step, step + 1])
            logger.dump(step)
    rows = _rows(run_dir)
    assert [row["_step"] for row in rows] == [1, 2]
    for step, row in zip((1, 2), rows, strict=True):
        assert set(row) == {"_step", "_timestamp", "kept/before", "kept/after"}
        assert row["kept/before"] == float(step)
    said = [record.getMessage() for record in caplog.records if record.name == "tracklog"]
    assert len(said) == 3, said
    assert "'callback/info': a dict is not one value" in said[0]
    assert "record_mean('callback/mean') needs a number, not str" in said[1]
    assert "log key must be a str, not int" in said[2]
    assert all(
        message.endswith("skipped (on_bad_value: report; said once for this key)")
        for message in said
    )


def test_on_bad_value_must_be_raise_or_report(run_dir: Path) -> None:
    with pytest.raises(ValidationError, match="on_bad_value") as caught:
        tracklog.build_logger({"run_dir": str(run_dir), "on_bad_value": "ignore"})
    assert "'raise' or 'report'" in str(caught.value)
    assert not run_dir.exists()


@pytest.mark.parametrize(
    ("key", "error", "message"),
    [
        ("", ValueError, "must not be empty or blank"),
        ("   ", ValueError, "must not be empty or blank"),
        ("\t\n", ValueError, "must not be empty or blank"),
        ("_x", ValueError, "starts with '_', which is reserved"),
        ("_step", ValueError, "starts with '_'"),
        (3, TypeError, "log key must be a str, not int"),
        (None, TypeError, "log key must be a str, not NoneType"),
        (b"k", TypeError, "log key must be a str, not bytes"),
    ],
)
def test_bad_keys_are_rejected(
    logger: tracklog.Logger, run_dir: Path, key: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        check_key(key)
    with pytest.raises(error, match=message):
        logger.record(key, 1.0)
    with pytest.raises(error, match=message):
        logger.record_mean(key, 1.0)
    logger.dump(step=1)
    assert _rows(run_dir) == []


@given(st.text(min_size=1).filter(lambda key: not key.isspace() and not key.startswith("_")))
def test_every_other_str_is_a_valid_key(key: str) -> None:
    assert check_key(key) == key


# Video -----------------------------------------------------------------------------------


def test_video_tchw_gets_a_batch_axis() -> None:
    frames = np.random.default_rng(0).integers(0, 256, (4, 3, 6, 8), dtype=np.uint8)
    video = Video(frames, fps=15)
    assert video.shape == (1, 4, 3, 6, 8)
    assert video.frames.dtype == np.uint8
    np.testing.assert_array_equal(video.frames[0], frames)
    assert video.fps == 15.0
    assert type(video.fps) is float


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_video_ntchw_is_kept(channels: int) -> None:
    frames = np.random.default_rng(1).integers(0, 256, (2, 3, channels, 4, 4), dtype=np.uint8)
    fps: Any = np.float32(12.5)  # the signature says float; NumPy floats work at run time
    video = Video(torch.from_numpy(frames), fps=fps)
    assert video.shape == (2, 3, channels, 4, 4)
    np.testing.assert_array_equal(video.frames, frames)
    assert video.fps == 12.5


def test_video_floats_in_unit_interval_scale_to_uint8() -> None:
    frames = np.zeros((2, 3, 2, 2), dtype=np.float32)
    frames[0] = 1.0
    frames[1, 0, 0, 0] = 0.5
    video = Video(frames, fps=10)
    assert video.frames.dtype == np.uint8
    assert (video.frames[0, 0] == 255).all()
    assert video.frames[0, 1, 0, 0, 0] == 128
    assert video.frames[0, 1, 1, 1, 1] == 0


def test_video_from_a_float_tensor_with_grad() -> None:
    frames = torch.ones((2, 3, 4, 4), requires_grad=True, dtype=torch.bfloat16)
    video = Video(frames, fps=5)
    assert (video.frames == 255).all()


def test_video_frames_are_a_read_only_copy() -> None:
    frames = np.zeros((2, 3, 4, 4), dtype=np.uint8)
    video = Video(frames, fps=30)
    frames[:] = 9
    assert (video.frames == 0).all()
    assert not video.frames.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        video.frames[0, 0, 0, 0, 0] = 1


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        (
            np.zeros((3, 4, 4), np.uint8),
            r"must have shape \(N,T,C,H,W\) or \(T,C,H,W\); got \(3, 4, 4\)",
        ),
        (np.zeros((1, 1, 2, 3, 4, 4), np.uint8), r"got \(1, 1, 2, 3, 4, 4\)"),
        (np.zeros((5, 8, 8, 3), np.uint8), r"1, 3 or 4 channels.*frames\.transpose\(0, 3, 1, 2\)"),
        (
            np.zeros((2, 5, 2, 4, 4), np.uint8),
            r"1, 3 or 4 channels on axis C; got shape \(2, 5, 2, 4, 4\)",
        ),
        (np.full((2, 3, 4, 4), 1.5), r"must hold values in \[0, 1\]; got min=1.5, max=1.5"),
        (np.full((2, 3, 4, 4), -0.25, np.float32), r"values in \[0, 1\]; got min=-0.25"),
        (np.full((2, 3, 4, 4), np.nan), r"values in \[0, 1\]"),
        (np.full((2, 3, 4, 4), np.inf), r"values in \[0, 1\]"),
        (np.zeros((2, 3, 4, 4), np.int64), "must be uint8 or float in \\[0, 1\\], not int64"),
        (np.zeros((0, 3, 4, 4), np.uint8), "must not be empty"),
    ],
    ids=["3d", "6d", "thwc", "2-channels", "above-1", "below-0", "nan", "inf", "int64", "empty"],
)
def test_malformed_video_frames(frames: npt.NDArray[Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Video(frames, fps=30)


@pytest.mark.parametrize("fps", [0, -1, -0.5, math.nan, math.inf, 1e-4, 1e6])
def test_video_fps_must_be_in_the_encodable_range(fps: float) -> None:
    with pytest.raises(ValueError, match=r"Video fps must be a number in \[0.01, 1000.0\]"):
        Video(np.zeros((2, 3, 4, 4), np.uint8), fps=fps)


@pytest.mark.parametrize("fps", ["30", None, True, [30]])
def test_video_fps_must_be_a_number(fps: Any) -> None:
    with pytest.raises(TypeError, match="Video fps must be a number"):
        Video(np.zeros((2, 3, 4, 4), np.uint8), fps=fps)


@pytest.mark.parametrize("frames", [[[[[0]]]], "frames.mp4", None])
def test_video_frames_must_be_an_array(frames: Any) -> None:
    with pytest.raises(TypeError, match="Video frames must be a numpy array or a torch tensor"):
        Video(frames, fps=30)


@given(
    n=st.integers(1, 2),
    t=st.integers(1, 3),
    c=st.sampled_from([1, 3, 4]),
    h=st.integers(1, 4),
    w=st.integers(1, 4),
    batched=st.booleans(),
    data=st.data(),
)
def test_video_keeps_every_uint8_frame(
    n: int, t: int, c: int, h: int, w: int, batched: bool, data: st.DataObject
) -> None:
    frames = data.draw(hnp.arrays(np.uint8, (n, t, c, h, w)))
    video = Video(frames if batched else frames[0], fps=data.draw(st.floats(0.1, 240)))
    np.testing.assert_array_equal(video.frames, frames if batched else frames[:1])


def test_sb3_video_is_accepted_and_written_as_a_playable_clip(
    logger: tracklog.Logger, run_dir: Path
) -> None:
    frames = torch.zeros((6, 3, 16, 24), dtype=torch.uint8)
    frames[:, 0] = 255  # red
    logger.record("eval/video", sb3.Video(frames, fps=12))
    logger.record("eval/ours", Video(frames.numpy(), fps=12))
    row = _dumped(logger, run_dir, step=3)
    for key in ("eval/video", "eval/ours"):
        with av.open(str(run_dir / row[key])) as container:
            decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
        assert len(decoded) == 6
        assert decoded[0].shape == (16, 24, 3)
        assert decoded[0][..., 0].mean() > 200
        assert decoded[0][..., 1].mean() < 50


def test_malformed_sb3_video_raises_naming_the_key(logger: tracklog.Logger) -> None:
    thwc = sb3.Video(torch.zeros((5, 8, 8, 3), dtype=torch.uint8), fps=30)
    with pytest.raises(ValueError, match=r"cannot log 'eval/video'.*transpose"):
        logger.record("eval/video", thwc)
    with pytest.raises(ValueError, match=r"cannot log 'eval/video'.*fps"):
        logger.record("eval/video", sb3.Video(torch.zeros((2, 3, 4, 4)), fps=0))


# Image -----------------------------------------------------------------------------------


def _marked(shape: tuple[int, ...], index: tuple[int, ...]) -> npt.NDArray[np.uint8]:
    array = np.zeros(shape, dtype=np.uint8)
    array[index] = 200
    return array


# One marked pixel: image index n=1 (or 0), row 2, column 3, channel 1 (or 0).
@pytest.mark.parametrize(
    ("dataformats", "array", "nhwc"),
    [
        ("HW", _marked((4, 5), (2, 3)), (0, 2, 3, 0)),
        ("WH", _marked((5, 4), (3, 2)), (0, 2, 3, 0)),
        ("HWC", _marked((4, 5, 3), (2, 3, 1)), (0, 2, 3, 1)),
        ("CHW", _marked((3, 4, 5), (1, 2, 3)), (0, 2, 3, 1)),
        ("chw", _marked((3, 4, 5), (1, 2, 3)), (0, 2, 3, 1)),
        ("NCHW", _marked((2, 3, 4, 5), (1, 1, 2, 3)), (1, 2, 3, 1)),
        ("NHWC", _marked((2, 4, 5, 4), (1, 2, 3, 1)), (1, 2, 3, 1)),
        ("NHW", _marked((2, 4, 5), (1, 2, 3)), (1, 2, 3, 0)),
    ],
)
def test_image_layouts_normalise_to_nhwc(
    dataformats: str, array: npt.NDArray[np.uint8], nhwc: tuple[int, int, int, int]
) -> None:
    image = Image(array, dataformats)
    n, h, w, c = image.shape
    assert (h, w) == (4, 5)
    assert n == (2 if "N" in dataformats.upper() else 1)
    assert c == (array.shape[dataformats.upper().index("C")] if "C" in dataformats.upper() else 1)
    assert image.dataformats == "NHWC"
    assert image.image.dtype == np.uint8
    assert image.image[nhwc] == 200
    assert int(image.image.sum()) == 200  # and nothing else moved there
    assert not image.image.flags.writeable


@given(
    layout=st.permutations("NHWC"),
    drop=st.sets(st.sampled_from("NC")),
    sizes=st.fixed_dictionaries(
        {
            "N": st.integers(1, 3),
            "H": st.integers(1, 5),
            "W": st.integers(1, 5),
            "C": st.sampled_from([1, 3, 4]),
        }
    ),
    data=st.data(),
)
def test_any_axis_order_puts_each_pixel_in_its_place(
    layout: list[str], drop: set[str], sizes: dict[str, int], data: st.DataObject
) -> None:
    letters = "".join(letter for letter in layout if letter not in drop)
    shape = tuple(sizes[letter] for letter in letters)
    index = tuple(data.draw(st.integers(0, size - 1)) for size in shape)
    image = Image(_marked(shape, index), letters)
    where = dict(zip(letters, index, strict=True))
    assert image.image[tuple(where.get(letter, 0) for letter in "NHWC")] == 200
    assert int(image.image.sum()) == 200


def test_image_floats_scale_and_tensors_work() -> None:
    image = Image(torch.ones((3, 2, 2)), "CHW")
    assert (image.image == 255).all()
    with pytest.raises(ValueError, match=r"Image with dtype float32 must hold values in \[0, 1\]"):
        Image(torch.full((3, 2, 2), 2.0), "CHW")


@pytest.mark.parametrize(
    ("shape", "dataformats", "error", "message"),
    [
        (
            (4, 5),
            "HWC",
            ValueError,
            r"dataformats 'HWC' has 3 axes but the image has shape \(4, 5\)",
        ),
        (
            (2, 3, 4, 5),
            "CHW",
            ValueError,
            r"'CHW' has 3 axes but the image has shape \(2, 3, 4, 5\)",
        ),
        ((4, 5, 3), "HWX", ValueError, "must use each of the letters N, C, H, W at most once"),
        ((4, 5, 3), "RGB", ValueError, "at most once"),
        ((4, 4, 5), "HHW", ValueError, "at most once"),
        ((4, 5), "NC", ValueError, "must contain both H and W"),
        ((4, 5, 3), "NHC", ValueError, "must contain both H and W"),
        ((), "", ValueError, "must contain both H and W"),
        ((4, 5, 2), "HWC", ValueError, "'HWC' has 2 channels; expected 1, 3 or 4"),
        ((5, 4, 5), "CHW", ValueError, "has 5 channels"),
        ((0, 5, 3), "HWC", ValueError, r"must not be empty; got shape \(0, 5, 3\)"),
        ((4, 5, 3), 3, TypeError, "dataformats must be a str, not int"),
    ],
)
def test_dataformats_are_checked_against_the_shape(
    shape: tuple[int, ...], dataformats: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        Image(np.zeros(shape, np.uint8), dataformats)


def test_image_dtype_must_be_uint8_or_float() -> None:
    with pytest.raises(ValueError, match="Image must be uint8 or float in \\[0, 1\\], not int32"):
        Image(np.zeros((4, 5, 3), np.int32), "HWC")


@pytest.mark.parametrize(("mode", "channels"), [("RGB", 3), ("RGBA", 4), ("L", 3)])
def test_image_from_a_png_path(tmp_path: Path, mode: str, channels: int) -> None:
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (6, 7, 4), dtype=np.uint8)
    picture = PILImage.fromarray(pixels).convert(mode)
    path = tmp_path / "picture.png"
    picture.save(path)
    image = Image(str(path), "HWC")
    assert image.shape == (1, 6, 7, channels)
    expected = np.asarray(picture.convert("RGBA" if channels == 4 else "RGB"))
    np.testing.assert_array_equal(image.image[0], expected)


@pytest.mark.parametrize(
    ("shape", "size"),
    [((1, 2, 3, 4, 16385), "16385x4 pixels;"), ((3, 2, 1, 2, 5462), "16386x2 pixels with its 3")],
)
def test_a_video_no_encoder_takes_is_refused_where_it_is_made(
    shape: tuple[int, ...], size: str
) -> None:
    """H.264 frames are at most 16384 pixels on a side (a batch is tiled side by side):
    refused here, not found by the delivery process, where the row would be lost."""
    with pytest.raises(ValueError, match=f"Video frames are {size}"):
        Video(np.zeros(shape, np.uint8), fps=10)
    with pytest.raises(ValueError, match=f"cannot log 'eval/clips': Video frames are {size}"):
        normalise("eval/clips", sb3.Video(torch.zeros(shape, dtype=torch.uint8), fps=10))
    Video(np.zeros((shape[0], 2, 1, 2, 16384 // shape[0]), np.uint8), fps=10)  # the widest


def test_a_16_bit_greyscale_png_is_scaled_to_8_bits_not_clipped(
    logger: tracklog.Logger, run_dir: Path, tmp_path: Path
) -> None:
    """A depth map saved as a 16-bit PNG: Pillow's own convert("RGB") clips every value
    above 255 to white."""
    depth = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    path = tmp_path / "depth.png"
    PILImage.fromarray(depth).save(path)
    logger.record("eval/depth", Image(str(path)))
    row = _dumped(logger, run_dir)
    with PILImage.open(run_dir / row["eval/depth"]) as picture:
        pixels = np.asarray(picture.convert("RGB"))
    expected = ((depth.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(pixels[..., channel], expected)
    assert len(np.unique(pixels)) == 256


def test_a_floating_point_image_file_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "heat.tiff"
    PILImage.fromarray(np.ones((4, 5), np.float32) * 7.5).save(path)
    with pytest.raises(ValueError, match=r"heat\.tiff.*floating-point pixels"):
        Image(str(path))


def test_sb3_image_is_accepted_and_written_as_png(logger: tracklog.Logger, run_dir: Path) -> None:
    chw = _marked((3, 4, 5), (1, 2, 3))
    logger.record("eval/image", sb3.Image(chw, "CHW"))
    logger.record("eval/tensor", sb3.Image(torch.from_numpy(chw), "CHW"))
    row = _dumped(logger, run_dir)
    for key in ("eval/image", "eval/tensor"):
        with PILImage.open(run_dir / row[key]) as picture:
            pixels = np.asarray(picture)
        assert pixels.shape == (4, 5, 3)
        assert tuple(pixels[2, 3]) == (0, 200, 0)


def test_malformed_sb3_image_raises_naming_the_key(logger: tracklog.Logger) -> None:
    with pytest.raises(ValueError, match=r"cannot log 'img'.*2 channels"):
        logger.record("img", sb3.Image(np.zeros((4, 5, 2), np.uint8), "HWC"))


# Figure ----------------------------------------------------------------------------------


def _figure(width: float = 2.0, height: float = 3.0, dpi: int = 50) -> Any:
    figure = plt.figure(figsize=(width, height), dpi=dpi)
    figure.add_subplot().plot([0, 1], [1, 0])
    return figure


def test_figure_renders_a_png_of_its_size() -> None:
    value = Figure(_figure(2.0, 3.0, dpi=50), close=True)
    assert value.size == (100, 150)
    with PILImage.open(io.BytesIO(value.png)) as picture:
        assert picture.format == "PNG"
        assert picture.size == (100, 150)


@pytest.mark.parametrize("close", [True, False])
def test_figure_close(close: bool) -> None:
    figure = _figure()
    value = Figure(figure, close=close)
    assert value.close is close
    assert plt.fignum_exists(figure.number) is not close
    plt.close(figure)


def test_figure_is_a_snapshot() -> None:
    figure = _figure()
    value = Figure(figure, close=False)
    before = value.png
    figure.patch.set_facecolor("red")
    figure.savefig(io.BytesIO())
    assert value.png == before
    plt.close(figure)


def test_sb3_figure_is_accepted_closed_and_written(logger: tracklog.Logger, run_dir: Path) -> None:
    figure = _figure(4.0, 2.0, dpi=25)
    logger.record("plots/curve", sb3.Figure(figure, close=True))
    assert not plt.fignum_exists(figure.number)
    row = _dumped(logger, run_dir)
    with PILImage.open(run_dir / row["plots/curve"]) as picture:
        assert picture.size == (100, 50)


@pytest.mark.parametrize("figure", [None, "figure.png", np.zeros((4, 4, 3))])
def test_figure_needs_a_matplotlib_figure(logger: tracklog.Logger, figure: Any) -> None:
    with pytest.raises(TypeError, match="Figure needs a matplotlib Figure, not"):
        Figure(figure)
    with pytest.raises(TypeError, match="cannot log 'fig': Figure needs a matplotlib Figure"):
        logger.record("fig", sb3.Figure(figure, close=True))


# HParam ----------------------------------------------------------------------------------


def test_hparam_nested_values_lists_become_tuples() -> None:
    float32_score: Any = np.float32(1.5)  # metric_dict says float; NumPy floats work at run time
    hparam = HParam(
        {
            "lr": 3e-4,
            "gamma": np.float32(0.5),
            "n_steps": np.int64(2048),
            "use_sde": False,
            "policy": "MlpPolicy",
            "clip": None,
            "net_arch": [64, 64],
            "nested": {"a": {"b": 1}, "c": ["x", 2]},
        },
        {"rollout/ep_rew_mean": 0, "eval/score": float32_score},
    )
    params = hparam.hparam_dict
    assert params["net_arch"] == (64, 64)
    assert params["gamma"] == 0.5
    assert type(params["gamma"]) is float
    assert type(params["n_steps"]) is int
    nested = params["nested"]
    assert isinstance(nested, Mapping)
    assert nested["c"] == ("x", 2)
    assert hparam.metric_dict == {"rollout/ep_rew_mean": 0.0, "eval/score": 1.5}
    assert hparam.flat() == {
        "lr": 3e-4,
        "gamma": 0.5,
        "n_steps": 2048,
        "use_sde": False,
        "policy": "MlpPolicy",
        "clip": None,
        "net_arch": "[64, 64]",
        "nested.a.b": 1,
        "nested.c": '["x", 2]',  # JSON, so a list of dicts reads back too
    }
    assert hparam.flat(sep="/")["nested/a/b"] == 1


def test_hparam_is_a_snapshot() -> None:
    source: dict[str, Any] = {"arch": [64, 64], "opt": {"lr": 1.0}}
    hparam = HParam(source, {})
    source["arch"].append(32)
    source["opt"]["lr"] = 2.0
    source["new"] = 1
    assert hparam.flat() == {"arch": "[64, 64]", "opt.lr": 1.0}
    with pytest.raises(TypeError):
        hparam.hparam_dict["arch"] = 1  # type: ignore[index]  # read-only mapping under test
    with pytest.raises(TypeError):
        hparam.metric_dict["m"] = 1.0  # type: ignore[index]  # read-only mapping under test


@pytest.mark.parametrize("metric_dict", [{}, None])
def test_hparam_allows_no_metrics(metric_dict: dict[str, float] | None) -> None:
    assert HParam({"lr": 0.1}, metric_dict).metric_dict == {}


@pytest.mark.parametrize(
    ("hparam_dict", "message"),
    [
        ({"device": object()}, r"hparam_dict\['device'\] has unsupported type object"),
        (
            {"opt": {"betas": {0.9, 0.99}}},
            r"hparam_dict\['opt'\]\['betas'\] has unsupported type set",
        ),
        ({"arch": [64, np.zeros(2)]}, r"hparam_dict\['arch'\]\[1\] has unsupported type ndarray"),
        ({"c": 1j}, r"hparam_dict\['c'\] has unsupported type complex"),
    ],
)
def test_hparam_rejects_unsupported_values_naming_the_key(
    hparam_dict: dict[str, Any], message: str
) -> None:
    with pytest.raises(TypeError, match=message):
        HParam(hparam_dict, {"m": 1.0})


@pytest.mark.parametrize(
    ("metric_dict", "error", "message"),
    [
        ({"m": "high"}, TypeError, r"metric_dict\['m'\] must be a number, not str"),
        ({"m": None}, TypeError, r"metric_dict\['m'\] must be a number, not NoneType"),
        ({"m": [1.0]}, TypeError, r"metric_dict\['m'\] must be a number, not list"),
        ({"": 1.0}, ValueError, "metric_dict key '' must be a non-empty str"),
        ({1: 1.0}, ValueError, "metric_dict key 1 must be a non-empty str"),
        ([("m", 1.0)], TypeError, "metric_dict must be a mapping, not list"),
    ],
)
def test_hparam_metrics_must_be_numbers(
    metric_dict: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        HParam({"lr": 0.1}, metric_dict)


@pytest.mark.parametrize(
    ("hparam_dict", "error", "message"),
    [
        ([("lr", 0.1)], TypeError, "hparam_dict must be a mapping, not list"),
        ({"": 1}, ValueError, "hparam_dict key '' must be a non-empty str"),
        ({"opt": {2: 1}}, ValueError, r"hparam_dict\['opt'\] key 2 must be a non-empty str"),
    ],
)
def test_hparam_dict_shape(hparam_dict: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        HParam(hparam_dict)


def test_sb3_hparam_is_accepted_and_written(logger: tracklog.Logger, run_dir: Path) -> None:
    logger.record("hparams", sb3.HParam({"lr": 0.1, "policy": "Mlp"}, {"reward": 2.0}))
    row = _dumped(logger, run_dir)
    written = json.loads((run_dir / row["hparams"]).read_text(encoding="utf-8"))
    assert written == {"hparams": {"lr": 0.1, "policy": "Mlp"}, "metrics": {"reward": 2.0}}


def test_malformed_sb3_hparam_raises_naming_the_key(logger: tracklog.Logger) -> None:
    with pytest.raises(TypeError, match=r"cannot log 'hp'.*hparam_dict\['x'\]"):
        logger.record("hp", sb3.HParam({"x": object()}, {"m": 1.0}))  # type: ignore[dict-item]  # SB3's type forbids it too; the runtime check is under test


# Frozen values ---------------------------------------------------------------------------


def _values() -> list[tuple[object, str]]:
    frames = np.zeros((2, 3, 4, 4), np.uint8)
    return [
        (Scalar(1.0), "value"),
        (Text("t"), "value"),
        (Histogram(np.zeros(2)), "values"),
        (Video(frames, fps=30), "fps"),
        (Video(frames, fps=30), "frames"),
        (Image(np.zeros((4, 4, 3), np.uint8)), "image"),
        (Image(np.zeros((4, 4, 3), np.uint8)), "dataformats"),
        (Figure(_figure()), "png"),
        (HParam({"a": 1}), "hparam_dict"),
        (HParam({"a": 1}), "metric_dict"),
    ]


@pytest.mark.parametrize(("value", "name"), _values(), ids=lambda v: type(v).__name__)
def test_values_are_frozen(value: object, name: str) -> None:
    before = getattr(value, name)
    with pytest.raises(AttributeError):
        setattr(value, name, before)
    with pytest.raises(AttributeError):
        delattr(value, name)
    # Frozen dataclasses with slots raise TypeError here on Python 3.11 (a CPython quirk).
    with pytest.raises((AttributeError, TypeError)):
        value.extra = 1  # type: ignore[attr-defined]  # adding an attribute is the error under test
    assert getattr(value, name) is before


def test_media_values_are_sb3_instances() -> None:
    checks: list[tuple[object, type]] = [
        (Video(np.zeros((2, 3, 4, 4), np.uint8), 30), sb3.Video),
        (Image(np.zeros((4, 4, 3), np.uint8)), sb3.Image),
        (Figure(_figure()), sb3.Figure),
        (HParam({"a": 1}), sb3.HParam),
    ]
    for value, sb3_class in checks:
        assert isinstance(value, sb3_class)
        assert normalise("k", value) is value  # already validated: passed through as is
