"""The TensorBoard output against real event files, read back with TensorBoard's own code.

Every test builds a logger from settings, records, dumps, flushes or closes, then reads
the event files with TensorBoard's ``EventAccumulator`` (what ``tensorboard --logdir``
loads), decodes the pictures and GIFs with Pillow, and asks TensorBoard's hparams
plugin for what its HPARAMS tab would show; nothing is read from tracklog's memory.
"""

from __future__ import annotations

import importlib
import io
import math
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import numpy.typing as npt
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image as PILImage
from PIL import ImageSequence
from pydantic import ValidationError
from stable_baselines3.common import logger as sb3

import tracklog
from tests.rundirs import fresh_run_dir
from tests.samples import NESTED_HPARAMS, grey_clip, random_pixels
from tests.strategies import Number, dump_sequences
from tests.tensorboard_readback import (
    Accumulator,
    hparams_plugin_data,
    hparams_tab,
    read_events,
    scalars,
)
from tracklog._row import Row
from tracklog.outputs._base import PartlyWritten
from tracklog.outputs.tensorboard import TensorBoardOutputFormat
from tracklog.readers import read_jsonl, read_wandb_offline
from tracklog.settings import TensorboardOutput
from tracklog.values import normalise

os.environ.setdefault("WANDB_SILENT", "true")  # W&B's service process too


@pytest.fixture(autouse=True)
def _no_output_failed(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    # A failing output is reported on the "tracklog" logger and training goes on, so a
    # test would otherwise see only what is missing from the event file, not why.
    yield
    failures = [r for r in caplog.records if r.name == "tracklog" and r.levelno >= 40]
    assert not failures, [record.getMessage() for record in failures]


# Decoding pictures ------------------------------------------------------------------


def gif_frames(encoded: bytes) -> tuple[list[npt.NDArray[np.uint8]], list[int], int | None]:
    """A GIF's frames as RGB arrays, each frame's delay in ms, and its loop count."""
    with PILImage.open(io.BytesIO(encoded)) as picture:
        assert picture.format == "GIF"
        frames, delays = [], []
        for frame in ImageSequence.Iterator(picture):
            frames.append(np.asarray(frame.convert("RGB"), dtype=np.uint8))
            delays.append(int(frame.info["duration"]))
        loop = picture.info.get("loop")
    return frames, delays, loop


def decoded(encoded: bytes) -> PILImage.Image:
    picture = PILImage.open(io.BytesIO(encoded))
    picture.load()
    return picture


# Helpers -----------------------------------------------------------------------------


def tb_logger(run_dir: Path, *others: dict[str, object], **options: object) -> tracklog.Logger:
    output: dict[str, object] = {"type": "tensorboard", **options}
    return tracklog.build_logger({"run_dir": str(run_dir), "outputs": [output, *others]})


def as_float32(value: Number) -> float:
    """What TensorBoard keeps of ``value``: its nearest float32 (±inf beyond its range)."""
    with np.errstate(over="ignore"):
        return float(np.float32(float(value)))


def same_float(read: float, expected: float) -> bool:
    if math.isnan(expected):
        return math.isnan(read)
    return struct.pack("<d", read) == struct.pack("<d", expected)


# Settings ----------------------------------------------------------------------------


def test_defaults() -> None:
    assert TensorboardOutput().path == Path("tensorboard")


def test_writes_to_run_dir_tensorboard_by_default(run_dir: Path) -> None:
    with tb_logger(run_dir) as logger:
        logger.record("a", 1.0)
        logger.dump(0)
    (event_file,) = (run_dir / "tensorboard").iterdir()
    assert event_file.name.startswith("events.out.tfevents.")
    assert scalars(read_events(run_dir / "tensorboard"), "a") == [(0, 1.0)]


def test_path_is_relative_to_run_dir_unless_absolute(run_dir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere" / "tb"
    with tracklog.build_logger(
        {
            "run_dir": str(run_dir),
            "outputs": [
                {"type": "tensorboard", "path": "logs/tb"},
                {"type": "tensorboard", "path": str(elsewhere)},
            ],
        }
    ) as logger:
        logger.record("a", 2.0)
        logger.dump(3)
    assert scalars(read_events(run_dir / "logs" / "tb"), "a") == [(3, 2.0)]
    assert scalars(read_events(elsewhere), "a") == [(3, 2.0)]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("path", ".", "path must name a folder"),
        ("path", "", "path must name a folder"),
        ("path", 5, "Input is not a valid path"),
        ("flush_secs", 5, "Extra inputs are not permitted"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(
    run_dir: Path, field: str, value: object, message: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        tb_logger(run_dir, **{field: value})
    text = str(caught.value)
    assert f"outputs.0.tensorboard.{field}" in text, text
    assert message in text, text
    assert not run_dir.exists()  # refused before anything was created


def test_two_outputs_cannot_share_a_folder(run_dir: Path) -> None:
    with pytest.raises(ValidationError, match=r"outputs.1.path: tensorboard is already written"):
        tb_logger(run_dir, {"type": "tensorboard", "path": "./tensorboard"})


# Scalars and steps -------------------------------------------------------------------

numbers: st.SearchStrategy[Number] = st.one_of(
    st.floats(),  # NaN, ±inf, subnormals, -0.0 and values beyond float32's range
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.booleans(),
)


def log_dumps(
    logger: tracklog.Logger, dumps: Sequence[tuple[int, Mapping[str, Number]]]
) -> list[tuple[float, float]]:
    windows = []
    for step, values in dumps:
        for key, value in values.items():
            logger.record(key, value)
        before = time.time()
        logger.dump(step)
        windows.append((before, time.time()))
    return windows


def log_dumps_and_flush(
    logger: tracklog.Logger, dumps: Sequence[tuple[int, Mapping[str, Number | npt.NDArray[Any]]]]
) -> None:
    """Dump, then wait for the background worker (where conversion warnings come from)."""
    for step, values in dumps:
        for key, value in values.items():
            logger.record(key, value)
        logger.dump(step)
    assert logger.flush(timeout=30)


def assert_scalars(
    events: Accumulator,
    dumps: Sequence[tuple[int, Mapping[str, Number]]],
    windows: Sequence[tuple[float, float]],
) -> None:
    keys = {key for _, values in dumps for key in values}
    assert set(events.Tags()["scalars"]) == keys
    for key in keys:
        expected = [
            (step, as_float32(values[key]), window)
            for (step, values), window in zip(dumps, windows, strict=True)
            if key in values
        ]
        read = events.Scalars(key)
        # Every point, in dump order: a step that repeats or goes back loses nothing.
        assert [event.step for event in read] == [step for step, _, _ in expected]
        for event, (_, value, (before, after)) in zip(read, expected, strict=True):
            assert same_float(event.value, value), (key, event.value, value)
            assert before <= event.wall_time <= after  # when dumped, not when written


@settings(max_examples=40)
@given(dumps=dump_sequences(numbers))
@example(dumps=[(0, {"a": 5e-324, "x-y": -(2**53)}), (0, {"a": -0.0}), (-1, {"a": True})])
@example(dumps=[(2**63 - 1, {"a": math.nan, "x-y": math.inf}), (-(2**63), {"a": -math.inf})])
@example(dumps=[(5, {"a": 0.1}), (4, {"a": 3.4028235e38, "x-y": 2**24 + 1}), (5, {"a": 1e-46})])
def test_scalars_round_trip_as_float32(dumps: list[tuple[int, dict[str, Number]]]) -> None:
    with fresh_run_dir() as run_dir:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # values beyond float32 warn; tested below
            with tb_logger(run_dir) as logger:
                windows = log_dumps(logger, dumps)
        assert_scalars(read_events(run_dir / "tensorboard"), dumps, windows)


@given(records=st.lists(st.binary(max_size=3000), max_size=5))
@example(records=[b"", bytes(range(256)) * 4])
def test_event_records_are_byte_for_byte_tensorboards_own(records: list[bytes]) -> None:
    """The output frames records as TensorBoard's RecordWriter does, with the checksums
    from google-crc32c instead of TensorBoard's pure-Python CRC-32C: same bytes."""
    from tracklog.outputs.tensorboard import _RecordWriter, _tensorboard

    writer_module = importlib.import_module("tensorboard.summary.writer.record_writer")
    theirs, ours = io.BytesIO(), io.BytesIO()
    their_writer = writer_module.RecordWriter(theirs)
    our_writer = _RecordWriter(ours, _tensorboard().crc32c)
    for record in records:
        their_writer.write(record)
        our_writer.write(record)
    assert ours.getvalue() == theirs.getvalue()


def test_steps_going_backwards_and_repeating_are_all_kept(run_dir: Path) -> None:
    dumps: list[tuple[int, dict[str, Number]]] = [
        (100, {"loss": 1.5}),
        (100, {"loss": 1.25}),  # the same step again
        (50, {"loss": 1.0, "eval": 3}),  # back in time (a resume, a late evaluation)
        (200, {"eval": False}),
    ]
    with tb_logger(run_dir) as logger:
        windows = log_dumps(logger, dumps)
    events = read_events(run_dir / "tensorboard")
    assert_scalars(events, dumps, windows)
    assert scalars(events, "loss") == [(100, 1.5), (100, 1.25), (50, 1.0)]
    assert scalars(events, "eval") == [(50, 3.0), (200, 0.0)]


def test_a_value_beyond_float32_warns_and_reads_as_infinity(run_dir: Path) -> None:
    with tb_logger(run_dir) as logger, pytest.warns(UserWarning, match="float32") as caught:
        log_dumps_and_flush(logger, [(step, {"huge": -1e300}) for step in range(3)])
    # One message text, so Python's default warning filter shows it once per key.
    assert {str(w.message) for w in caught} == {
        "TensorBoard keeps scalars as float32: 'huge' has a value beyond ±3.4e38, "
        "which TensorBoard shows as ±inf"
    }
    assert scalars(read_events(run_dir / "tensorboard"), "huge") == [
        (0, -math.inf),
        (1, -math.inf),
        (2, -math.inf),
    ]


def test_keys_are_tags_as_they_are(run_dir: Path) -> None:
    keys = ["train/loss", "a b:c", "x//y/", "ünï/cödé 🎉", "rollout/ep_rew_mean", "a" * 300]
    with tb_logger(run_dir) as logger:
        for i, key in enumerate(keys):
            logger.record(key, float(i))
        logger.dump(1)
    events = read_events(run_dir / "tensorboard")
    assert sorted(events.Tags()["scalars"]) == sorted(keys)
    for i, key in enumerate(keys):
        assert scalars(events, key) == [(1, float(i))]


def test_exclude_tensorboard_keeps_a_key_out_of_tensorboard_only(run_dir: Path) -> None:
    with tb_logger(run_dir, {"type": "jsonl"}) as logger:
        logger.record("everywhere", 1.0)
        logger.record("not_tb", 2.0, exclude="tensorboard")
        logger.record("not_json", 3.0, exclude=("json", "stdout"))
        logger.record("clip", tracklog.Video(grey_clip([0, 9]), fps=4), exclude="tensorboard")
        logger.dump(7)
    events = read_events(run_dir / "tensorboard")
    assert events.Tags()["scalars"] == ["everywhere", "not_json"]
    assert events.Tags()["images"] == []
    (row,) = read_jsonl(run_dir / "progress.jsonl")
    assert set(row.values) == {"everywhere", "not_tb", "clip"}


# Histograms --------------------------------------------------------------------------


def test_histogram_buckets_of_the_finite_values(run_dir: Path) -> None:
    values = np.array([0.0, 1.0, 2.0, 3.0, np.nan, np.inf, -np.inf])
    with tb_logger(run_dir) as logger:
        logger.record("weights", values)
        logger.record("constant", np.full(5, 2.5, dtype=np.float32))
        logger.record("flags", np.array([True, False, True]))
        logger.dump(4)
    events = read_events(run_dir / "tensorboard")
    (event,) = events.Histograms("weights")
    histogram = event.histogram_value
    assert event.step == 4
    assert (histogram.min, histogram.max, histogram.num) == (0.0, 3.0, 4)
    assert (histogram.sum, histogram.sum_squares) == (6.0, 14.0)
    # 64 equal buckets over [0, 3]: the values land in buckets 0, 21, 42 and 63.
    assert len(histogram.bucket) == len(histogram.bucket_limit) == 64
    assert [i for i, count in enumerate(histogram.bucket) if count] == [0, 21, 42, 63]
    assert sum(histogram.bucket) == 4
    assert histogram.bucket_limit[-1] == 3.0
    assert histogram.bucket_limit == sorted(histogram.bucket_limit)

    (constant,) = events.Histograms("constant")
    assert constant.histogram_value.bucket_limit == [2.5]
    assert constant.histogram_value.bucket == [5.0]
    (flags,) = events.Histograms("flags")
    assert (flags.histogram_value.min, flags.histogram_value.max) == (0.0, 1.0)
    assert flags.histogram_value.sum == 2.0
    # TensorBoard's Distributions tab reads the same data.
    assert set(events.Tags()["distributions"]) == {"weights", "constant", "flags"}


@settings(max_examples=40)
@given(values=st.lists(st.floats() | st.integers(-(2**53), 2**53), min_size=1, max_size=200))
@example(values=[0.0, 5e-324])  # too narrow for 64 distinct float64 edges
@example(values=[1.0, 1.0000000000000002, 1.0])
@example(values=[-sys.float_info.max, sys.float_info.max, 0.0])  # max - min overflows
def test_histograms_count_every_finite_value(values: list[float]) -> None:
    array = np.array(values, dtype=np.float64)
    finite = array[np.isfinite(array)]
    with fresh_run_dir() as run_dir:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no finite value: warned, tested below
            with tb_logger(run_dir) as logger:
                logger.record("h", array)
                logger.record("marker", 1.0)
                logger.dump(0)
        events = read_events(run_dir / "tensorboard")
    if finite.size == 0:
        assert events.Tags()["histograms"] == []
        return
    (event,) = events.Histograms("h")
    histogram = event.histogram_value
    assert histogram.num == finite.size
    assert sum(histogram.bucket) == finite.size
    assert (histogram.min, histogram.max) == (finite.min(), finite.max())
    assert histogram.sum == pytest.approx(finite.sum(), rel=1e-9, abs=1e-6)
    assert histogram.bucket_limit[-1] == finite.max()
    assert np.all(np.diff(histogram.bucket_limit) > 0)


def test_a_histogram_without_finite_values_is_skipped_with_a_warning(run_dir: Path) -> None:
    with tb_logger(run_dir) as logger, pytest.warns(UserWarning, match="'nan' has no finite"):
        log_dumps_and_flush(logger, [(0, {"nan": np.array([np.nan, np.inf]), "ok": 1.0})])
    events = read_events(run_dir / "tensorboard")
    assert events.Tags()["histograms"] == []
    assert scalars(events, "ok") == [(0, 1.0)]


# Images and figures ------------------------------------------------------------------


# Each layout as (N,H,W,C), written out here rather than taken from tracklog's own
# normalisation, so a wrong axis order in tracklog cannot make the expectation agree.
_TO_NHWC = {
    "HWC": lambda raw: raw[np.newaxis],
    "CHW": lambda raw: raw.transpose(1, 2, 0)[np.newaxis],
    "HW": lambda raw: raw[np.newaxis, :, :, np.newaxis],
    "NHWC": lambda raw: raw,
    "NCHW": lambda raw: raw.transpose(0, 2, 3, 1),
}


def expected_pixels(raw: npt.NDArray[np.uint8], dataformats: str) -> npt.NDArray[np.uint8]:
    """What TensorBoard should show of ``raw``: its images tiled left to right."""
    nhwc: npt.NDArray[np.uint8] = _TO_NHWC[dataformats](raw)
    tiled = np.concatenate(list(nhwc), axis=1)
    return tiled[..., 0] if tiled.shape[2] == 1 else tiled


@pytest.mark.parametrize(
    ("shape", "dataformats", "mode"),
    [
        ((6, 5, 3), "HWC", "RGB"),
        ((4, 6, 5), "CHW", "RGBA"),
        ((6, 5), "HW", "L"),
        ((3, 6, 5, 3), "NHWC", "RGB"),
        ((2, 1, 6, 5), "NCHW", "L"),
    ],
)
def test_images_read_back_pixel_for_pixel(
    run_dir: Path, shape: tuple[int, ...], dataformats: str, mode: str
) -> None:
    raw = random_pixels(shape)
    with tb_logger(run_dir) as logger:
        logger.record("eval/frame", tracklog.Image(raw, dataformats))
        logger.dump(12)
    (event,) = read_events(run_dir / "tensorboard").Images("eval/frame")
    picture = decoded(event.encoded_image_string)
    assert picture.format == "PNG"
    assert picture.mode == mode
    expected = expected_pixels(raw, dataformats)
    assert (event.height, event.width) == expected.shape[:2]
    assert np.array_equal(np.asarray(picture), expected)
    assert event.step == 12


@settings(max_examples=25)
@given(
    height=st.integers(1, 12),
    width=st.integers(1, 12),
    channels=st.sampled_from([1, 3, 4]),
    as_float=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_image_reads_back_exactly(
    height: int, width: int, channels: int, as_float: bool, seed: int
) -> None:
    pixels = random_pixels((height, width, channels), seed)
    recorded: npt.NDArray[Any] = pixels / 255.0 if as_float else pixels
    with fresh_run_dir() as run_dir:
        with tb_logger(run_dir) as logger:
            logger.record("img", tracklog.Image(recorded, "HWC"))
            logger.dump(0)
        (event,) = read_events(run_dir / "tensorboard").Images("img")
    read = np.asarray(decoded(event.encoded_image_string))
    assert np.array_equal(read, pixels[..., 0] if channels == 1 else pixels)


def test_a_figure_is_its_rendered_png(run_dir: Path) -> None:
    figure, axes = plt.subplots(figsize=(2, 1), dpi=50)
    axes.plot([0, 1, 2], [2, 0, 1])
    reference = io.BytesIO()
    figure.savefig(reference, format="png")
    with tb_logger(run_dir) as logger:
        logger.record("curve", tracklog.Figure(figure))  # closes the figure
        logger.dump(3)
    (event,) = read_events(run_dir / "tensorboard").Images("curve")
    picture = decoded(event.encoded_image_string)
    assert picture.format == "PNG"
    assert (event.width, event.height) == picture.size == (100, 50)
    assert np.array_equal(np.asarray(picture), np.asarray(decoded(reference.getvalue())))
    assert not plt.fignum_exists(figure.number)


# Videos ------------------------------------------------------------------------------


def test_a_video_is_an_animated_gif_in_the_images_tab(run_dir: Path) -> None:
    levels = [0, 40, 80, 120, 160, 200]
    with tb_logger(run_dir) as logger:
        logger.record("eval/video", tracklog.Video(grey_clip(levels, height=8, width=6), fps=4))
        logger.dump(2048)
    events = read_events(run_dir / "tensorboard")
    (event,) = events.Images("eval/video")
    assert event.step == 2048
    assert (event.width, event.height) == (6, 8)
    frames, delays, loop = gif_frames(event.encoded_image_string)
    assert len(frames) == len(levels)
    for frame, level in zip(frames, levels, strict=True):
        assert frame.shape == (8, 6, 3)
        assert np.all(frame == level)
    assert delays == [250] * len(levels)  # 4 fps
    assert loop == 0  # plays in a loop


def test_a_batch_of_clips_is_tiled_and_colours_are_exact(run_dir: Path) -> None:
    rng = np.random.default_rng(3)
    palette = rng.integers(0, 256, size=(200, 3), dtype=np.uint8)  # 200 colours: exact
    clips = palette[rng.integers(0, 200, size=(2, 5, 7, 9))].transpose(0, 1, 4, 2, 3)
    rgba = np.concatenate([clips, np.full((2, 5, 1, 7, 9), 17, np.uint8)], axis=2)
    grey = random_pixels((5, 1, 7, 9), seed=4)
    with tb_logger(run_dir) as logger:
        logger.record("rgb", tracklog.Video(clips, fps=10))  # (N,T,C,H,W)
        logger.record("rgba", tracklog.Video(rgba, fps=10))  # the alpha channel is dropped
        logger.record("grey", tracklog.Video(grey, fps=10))
        logger.dump(0)
    events = read_events(run_dir / "tensorboard")
    expected_rgb = np.concatenate(list(clips.transpose(0, 1, 3, 4, 2)), axis=2)  # (T,H,N*W,C)
    for tag in ("rgb", "rgba"):
        (event,) = events.Images(tag)
        assert (event.width, event.height) == (18, 7)
        frames, delays, _ = gif_frames(event.encoded_image_string)
        assert np.array_equal(np.stack(frames), expected_rgb), tag
        assert delays == [100] * 5
    (event,) = events.Images("grey")
    frames, _, _ = gif_frames(event.encoded_image_string)
    assert np.array_equal(np.stack(frames), np.repeat(grey.transpose(0, 2, 3, 1), 3, axis=3))


def test_a_clip_of_many_colours_keeps_its_size_and_frame_count(run_dir: Path) -> None:
    noise = random_pixels((12, 3, 20, 20), seed=5)  # 400 pixels of random colours
    with tb_logger(run_dir) as logger:
        logger.record("noise", tracklog.Video(noise, fps=30))
        logger.dump(0)
    (event,) = read_events(run_dir / "tensorboard").Images("noise")
    frames, _, _ = gif_frames(event.encoded_image_string)
    assert len(frames) == 12
    assert all(frame.shape == (20, 20, 3) for frame in frames)
    # Reduced to 256 colours a frame: close to, not equal to, the original.
    error = np.abs(np.stack(frames).astype(int) - noise.transpose(0, 2, 3, 1).astype(int))
    assert error.mean() < 16


@settings(max_examples=30)
@given(
    frame_count=st.integers(1, 40),
    fps=st.floats(min_value=0.01, max_value=1000.0) | st.sampled_from([24.0, 30.0, 60.0, 144.0]),
)
@example(frame_count=12, fps=60.0)
@example(frame_count=7, fps=1000.0)
@example(frame_count=3, fps=0.01)
def test_gif_timing_follows_the_fps(frame_count: int, fps: float) -> None:
    levels = list(range(0, 2 * frame_count, 2))  # distinct frames (identical ones merge)
    with fresh_run_dir() as run_dir:
        with tb_logger(run_dir) as logger:
            logger.record("clip", tracklog.Video(grey_clip(levels, 2, 2), fps=fps))
            logger.dump(0)
        (event,) = read_events(run_dir / "tensorboard").Images("clip")
    frames, delays, _ = gif_frames(event.encoded_image_string)
    # Above 50 fps every k-th frame is shown, so that no delay is under 20 ms (browsers
    # play those as 100 ms); each shown frame starts within 5 ms of its time, i / fps.
    stride = max(1, math.ceil(fps / 50 - 1e-9))
    shown = list(range(0, frame_count, stride))
    assert [int(frame[0, 0, 0]) for frame in frames] == [levels[i] for i in shown]
    assert all(delay >= 20 and delay % 10 == 0 for delay in delays)
    starts = np.cumsum([0, *delays[:-1]])
    for start, i in zip(starts, shown, strict=True):
        assert abs(start - i * 1000 / fps) <= 5
    duration = frame_count * 1000 / fps
    assert abs(sum(delays) - duration) <= 5 or (sum(delays) == starts[-1] + 20)


def test_videos_need_no_moviepy(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        sys.modules["moviepy"] = None  # any import of moviepy fails
        import numpy as np, tracklog
        with tracklog.build_logger({"run_dir": "run", "outputs": [{"type": "tensorboard"}]}) as lg:
            lg.record("v", tracklog.Video(np.zeros((3, 3, 4, 4), np.uint8), fps=5))
            lg.dump(1)
        """
    )
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, check=True, timeout=120)
    (event,) = read_events(tmp_path / "run" / "tensorboard").Images("v")
    frames, delays, _ = gif_frames(event.encoded_image_string)
    assert (len(frames), delays) == (1, [600])  # three identical frames: one, for 600 ms


# Text --------------------------------------------------------------------------------


@settings(max_examples=30)
@given(text=st.text(st.characters(exclude_categories=["Cs"]), max_size=200))
@example(text="# Evaluation\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
@example(text="ünï cödé 🎉\x00\r\n")
def test_text_reaches_the_text_tab_unchanged(text: str) -> None:
    with fresh_run_dir() as run_dir:
        with tb_logger(run_dir) as logger:
            logger.record("notes", text)
            logger.dump(9)
        events = read_events(run_dir / "tensorboard")
    (event,) = events.Tensors("notes")
    assert event.step == 9
    assert [value.decode("utf-8") for value in event.tensor_proto.string_val] == [text]
    assert events.SummaryMetadata("notes").plugin_data.plugin_name == "text"


# Hyperparameters ---------------------------------------------------------------------

METRICS = {"eval/return": 0.0, "train/loss": 0.0}


def test_hparams_plugin_data_names_the_hparams_and_metrics(run_dir: Path) -> None:
    with tb_logger(run_dir) as logger:
        logger.record("hparams", tracklog.HParam(NESTED_HPARAMS, {"eval/return": 1.5}))
        logger.dump(0)
    data = hparams_plugin_data(read_events(run_dir / "tensorboard"))
    assert set(data) == {
        "_hparams_/experiment",
        "_hparams_/session_start_info",
        "_hparams_/session_end_info",
    }
    experiment = data["_hparams_/experiment"]["experiment"]
    assert {info["name"]: info["type"] for info in experiment["hparamInfos"]} == {
        "lr": "DATA_TYPE_FLOAT64",
        "algo": "DATA_TYPE_STRING",
        "sde": "DATA_TYPE_BOOL",
        "seed": "DATA_TYPE_STRING",
        "n_steps": "DATA_TYPE_FLOAT64",
        "net_arch": "DATA_TYPE_STRING",
        "policy.activation": "DATA_TYPE_STRING",
        "policy.kwargs.ortho": "DATA_TYPE_BOOL",
    }
    assert experiment["metricInfos"] == [{"name": {"tag": "eval/return"}}]
    assert data["_hparams_/session_start_info"]["sessionStartInfo"]["hparams"] == {
        "lr": 3e-4,
        "algo": "PPO",
        "sde": False,
        "seed": "None",  # TensorBoard has no null; MLflow shows None the same way
        "n_steps": 2048.0,
        "net_arch": "[64, 64]",
        "policy.activation": "tanh",
        "policy.kwargs.ortho": True,
    }
    assert data["_hparams_/session_end_info"]["sessionEndInfo"]["status"] == "STATUS_SUCCESS"


def tab_metrics(group: Mapping[str, Any]) -> dict[str, tuple[int, float]]:
    """A session group's metric columns: tag -> (step, value) of the value shown."""
    # protobuf's JSON form leaves out fields that are 0
    return {
        value["name"]["tag"]: (int(value.get("trainingStep", 0)), value.get("value", 0.0))
        for value in group.get("metricValues", [])
    }


def test_hparams_tab_shows_the_hparams_with_their_metrics(run_dir: Path) -> None:
    # SB3's convention: metric_dict names scalars logged during training, with
    # placeholder values. As in SB3's own writer, the placeholders are no points.
    with tb_logger(run_dir) as logger:
        logger.record("hparams", tracklog.HParam({"lr": 0.01, "algo": "PPO"}, METRICS))
        logger.record("eval/return", 5.0)
        logger.dump(0)
        logger.record("eval/return", 7.5)
        logger.record("train/loss", 0.25)
        logger.dump(10)
    events = read_events(run_dir / "tensorboard")
    assert scalars(events, "eval/return") == [(0, 5.0), (10, 7.5)]
    assert scalars(events, "train/loss") == [(10, 0.25)]

    experiment, groups = hparams_tab(run_dir / "tensorboard")
    assert {info["name"] for info in experiment["hparamInfos"]} == {"lr", "algo"}
    assert {info["name"]["tag"] for info in experiment["metricInfos"]} == set(METRICS)
    (group,) = groups["sessionGroups"]
    assert group["hparams"] == {"lr": 0.01, "algo": "PPO"}
    metrics = {value["name"]["tag"]: value for value in group["metricValues"]}
    assert metrics["eval/return"]["value"] == 7.5
    assert metrics["train/loss"]["value"] == 0.25
    assert metrics["eval/return"]["trainingStep"] == 10
    (session,) = group["sessions"]
    assert session["status"] == "STATUS_SUCCESS"


def test_a_failed_run_ends_its_hparams_session_as_failed(run_dir: Path) -> None:
    def train() -> None:
        with tb_logger(run_dir) as logger:
            logger.record("hparams", tracklog.HParam({"lr": 10.0}, {"eval/return": 0.0}))
            logger.dump(0)
            raise RuntimeError("diverged")

    with pytest.raises(RuntimeError, match="diverged"):
        train()
    _, groups = hparams_tab(run_dir / "tensorboard")
    (group,) = groups["sessionGroups"]
    assert group["sessions"][0]["status"] == "STATUS_FAILURE"


def test_a_second_hparam_warns_and_the_tab_keeps_the_first(run_dir: Path) -> None:
    with tb_logger(run_dir) as logger:
        logger.record("hparams", tracklog.HParam({"lr": 0.1}, {"m": 1.0}))
        logger.dump(0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # same hparams and metrics: no warning
            logger.record("hparams", tracklog.HParam({"lr": 0.1}, {"m": 2.0}))
            logger.dump(1)
        logger.record("again", tracklog.HParam({"lr": 0.5}, {"m": 3.0}))
        with pytest.warns(
            UserWarning, match="keeps the first HParam's hyperparameters, not 'again'"
        ):
            logger.dump(2)  # the warning belongs to this dump (the training thread)
    _, groups = hparams_tab(run_dir / "tensorboard")
    (group,) = groups["sessionGroups"]
    assert group["hparams"] == {"lr": 0.1}
    # "m" is never recorded itself: the HParams' values are its points.
    assert scalars(read_events(run_dir / "tensorboard"), "m") == [(0, 1.0), (1, 2.0), (2, 3.0)]
    assert tab_metrics(group) == {"m": (2, 3.0)}


def test_metrics_named_at_the_end_fill_the_tab_without_extra_points(run_dir: Path) -> None:
    # HParamCallback's way: the hyperparameters when training starts, the final value
    # of each chosen metric when it ends. TensorBoard keeps the first summary of each
    # hparams tag, so the metric columns must wait for the names.
    with tb_logger(run_dir) as logger, warnings.catch_warnings():
        warnings.simplefilter("error")  # the same hparams twice: nothing to warn about
        logger.record("hparams", tracklog.HParam({"lr": 0.01, "algo": "PPO"}))
        logger.dump(0)
        for step, reward in [(64, 10.0), (128, 12.5), (192, 11.0)]:
            logger.record("rollout/ep_rew_mean", reward)
            logger.record("train/loss", 1.0 / step)
            logger.dump(step)
        final = {"rollout/ep_rew_mean": 11.0, "eval/best": 20.0}  # eval/best: no chart
        logger.record("hparams", tracklog.HParam({"lr": 0.01, "algo": "PPO"}, final))
        logger.dump(200)
    events = read_events(run_dir / "tensorboard")
    assert scalars(events, "rollout/ep_rew_mean") == [(64, 10.0), (128, 12.5), (192, 11.0)]
    assert scalars(events, "eval/best") == [(200, 20.0)]

    experiment, groups = hparams_tab(run_dir / "tensorboard")
    assert [info["name"]["tag"] for info in experiment["metricInfos"]] == list(final)
    (group,) = groups["sessionGroups"]
    assert group["hparams"] == {"lr": 0.01, "algo": "PPO"}
    assert tab_metrics(group) == {"rollout/ep_rew_mean": (192, 11.0), "eval/best": (200, 20.0)}
    assert group["sessions"][0]["status"] == "STATUS_SUCCESS"


def test_until_an_hparam_names_metrics_the_tab_offers_every_scalar(run_dir: Path) -> None:
    # What a training run with HParamCallback shows while it runs (or after a crash).
    logger = tb_logger(run_dir)
    try:
        logger.record("hparams", tracklog.HParam({"lr": 0.01}))
        logger.dump(0)
        logger.record("a", 1.0)
        logger.record("b", 2.0)
        logger.dump(5)
        assert logger.flush(timeout=30)
        data = hparams_plugin_data(read_events(run_dir / "tensorboard"))
        assert set(data) == {"_hparams_/session_start_info"}
        # The folder above: TensorBoard's guess finds no values in a run named "."
        # (a --logdir that is the event files' folder itself).
        experiment, groups = hparams_tab(run_dir)
        assert {info["name"] for info in experiment["hparamInfos"]} == {"lr"}
        assert {info["name"]["tag"] for info in experiment["metricInfos"]} == {"a", "b"}
        (group,) = groups["sessionGroups"]
        assert tab_metrics(group) == {"a": (5, 1.0), "b": (5, 2.0)}
    finally:
        logger.close()


def test_metric_values_of_a_tag_never_recorded_are_written_at_close(run_dir: Path) -> None:
    logger = tb_logger(run_dir)
    try:
        logger.record("hparams", tracklog.HParam({"lr": 0.01}, {"final/score": 0.5}))
        logger.dump(3)
        assert logger.flush(timeout=30)
        # Not yet: a value recorded under the tag later would make it a placeholder.
        assert "final/score" not in read_events(run_dir / "tensorboard").Tags()["scalars"]
    finally:
        logger.close()
    assert scalars(read_events(run_dir / "tensorboard"), "final/score") == [(3, 0.5)]
    (group,) = hparams_tab(run_dir / "tensorboard")[1]["sessionGroups"]
    assert tab_metrics(group) == {"final/score": (3, 0.5)}


def test_a_later_hparam_naming_other_metrics_warns(run_dir: Path) -> None:
    with tb_logger(run_dir) as logger:
        logger.record("hparams", tracklog.HParam({"lr": 0.1}, {"m": 0.0}))
        logger.dump(0)
        logger.record("hparams", tracklog.HParam({"lr": 0.1}, {"m": 1.0, "n": 2.0}))
        with pytest.warns(UserWarning, match=r"metrics of the first HParam naming any, \['m'\]"):
            logger.dump(1)
    experiment, _ = hparams_tab(run_dir / "tensorboard")
    assert [info["name"]["tag"] for info in experiment["metricInfos"]] == ["m"]
    assert scalars(read_events(run_dir / "tensorboard"), "n") == [(1, 2.0)]


# A dump: (values recorded, an HParam's metric_dict or None). Float32 values, exact.
HParamDump = tuple[dict[str, float], dict[str, float] | None]
METRIC_TAGS = ["eval/return", "train/loss", "score"]
float32s = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=80)
@given(
    dumps=st.lists(
        st.tuples(
            st.dictionaries(st.sampled_from(METRIC_TAGS), float32s, max_size=2),
            st.none() | st.dictionaries(st.sampled_from(METRIC_TAGS), float32s, max_size=3),
        ),
        min_size=1,
        max_size=5,
    )
)
# SB3's placeholder, recorded later; HParamCallback's hparams first, metrics at the end.
@example(dumps=[({}, {"score": 0.0}), ({"score": 2.0}, None)])
@example(dumps=[({}, {}), ({"score": 1.5}, None), ({}, {"score": 1.5, "eval/return": 3.0})])
def test_hparam_metrics_never_add_points_to_a_recorded_chart(dumps: list[HParamDump]) -> None:
    """Each tag's chart is its recorded values if it has any, else the HParams' values;
    the tab's columns are the first metric names declared, showing each chart's end."""
    with fresh_run_dir() as run_dir:
        with tb_logger(run_dir) as logger, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step, (recorded, metrics) in enumerate(dumps):
                for tag, value in recorded.items():
                    logger.record(tag, value)
                if metrics is not None:
                    logger.record("hparams", tracklog.HParam({"lr": 0.1}, metrics))
                logger.dump(step)
        events = read_events(run_dir / "tensorboard")
        experiment, groups = hparams_tab(run_dir)  # (see the test above for why)

    charts: dict[str, list[tuple[int, float]]] = {}
    for tag in METRIC_TAGS:
        chart = [(step, rec[tag]) for step, (rec, _) in enumerate(dumps) if tag in rec]
        if not chart:
            chart = [(step, m[tag]) for step, (_, m) in enumerate(dumps) if m and tag in m]
        if chart:
            charts[tag] = chart
    assert {tag: scalars(events, tag) for tag in events.Tags()["scalars"]} == charts

    declared: list[str] | None = None
    adding = 0  # HParams naming a metric after the columns were declared
    for _, metrics in dumps:
        if metrics and declared is None:
            declared = list(metrics)
        elif metrics and declared is not None and not set(metrics) <= set(declared):
            adding += 1
    assert len([w for w in caught if "cannot add" in str(w.message)]) == adding
    if all(metrics is None for _, metrics in dumps):
        assert "sessionGroups" not in groups  # no HParam: no session
        return
    columns = declared if declared is not None else list(charts)  # else TensorBoard's own
    assert {info["name"]["tag"] for info in experiment.get("metricInfos", [])} == set(columns)
    (group,) = groups["sessionGroups"]
    shown = {tag: charts[tag][-1] for tag in columns if tag in charts}
    assert tab_metrics(group) == shown


def test_a_sweep_is_one_hparams_table_with_a_row_per_run(tmp_path: Path) -> None:
    for job, lr in enumerate([0.1, 0.01, 0.001]):
        with tb_logger(tmp_path / "sweep" / f"job{job}") as logger:
            logger.record("hparams", tracklog.HParam({"lr": lr, "job": job}, {"eval/return": 0}))
            logger.dump(0)
            logger.record("eval/return", 100.0 * job)
            logger.dump(1)
    experiment, groups = hparams_tab(tmp_path / "sweep")
    assert {info["name"] for info in experiment["hparamInfos"]} == {"lr", "job"}
    rows = {
        # (protobuf's JSON form leaves out a value of 0)
        group["name"]: (group["hparams"], group["metricValues"][0].get("value", 0.0))
        for group in groups["sessionGroups"]
    }
    assert rows == {
        "job0/tensorboard": ({"lr": 0.1, "job": 0.0}, 0.0),
        "job1/tensorboard": ({"lr": 0.01, "job": 1.0}, 100.0),
        "job2/tensorboard": ({"lr": 0.001, "job": 2.0}, 200.0),
    }


# Lifetime ----------------------------------------------------------------------------


def test_flush_makes_every_dump_readable_before_close(run_dir: Path) -> None:
    logger = tb_logger(run_dir)
    try:
        for step in range(5):
            logger.record("a", float(step))
            logger.record("clip", tracklog.Video(grey_clip([step, 100]), fps=2))
            logger.dump(step)
            assert logger.flush(timeout=30)
            events = read_events(run_dir / "tensorboard")
            assert [s for s, _ in scalars(events, "a")] == list(range(step + 1))
            assert len(events.Images("clip")) == step + 1
    finally:
        logger.close()
    logger.close()  # a second close does nothing
    with pytest.raises(RuntimeError, match="closed"):
        logger.dump(9)


def test_close_writes_every_queued_row(run_dir: Path) -> None:
    with tb_logger(run_dir) as logger:
        for step in range(50):
            logger.record("a", float(step))
            logger.record("clip", tracklog.Video(random_pixels((4, 3, 8, 8), step), fps=8))
            logger.dump(step)
    events = read_events(run_dir / "tensorboard")
    assert scalars(events, "a") == [(step, float(step)) for step in range(50)]
    assert [event.step for event in events.Images("clip")] == list(range(50))


CRASHING_SCRIPT = """
import tracklog
logger = tracklog.build_logger({"run_dir": "run", "outputs": [{"type": "tensorboard"}]})
logger.record("hparams", tracklog.HParam({"lr": 1.0}, {"loss": 0.0}))
logger.record("loss", 0.5)
logger.dump(1)
raise RuntimeError("uncaught")
"""


def test_an_uncaught_exception_ends_the_session_as_failed(tmp_path: Path) -> None:
    process = subprocess.run(
        [sys.executable, "-c", CRASHING_SCRIPT],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert process.returncode == 1
    assert "RuntimeError: uncaught" in process.stderr
    events = read_events(tmp_path / "run" / "tensorboard")
    assert scalars(events, "loss") == [(1, 0.5)]
    status = hparams_plugin_data(events)["_hparams_/session_end_info"]["sessionEndInfo"]
    assert status["status"] == "STATUS_FAILURE"


SIGTERM_SCRIPT = """
import itertools, numpy as np, tracklog
frames = np.random.default_rng(0).integers(0, 256, (60, 3, 48, 48), dtype=np.uint8)
logger = tracklog.build_logger({"run_dir": "run", "outputs": [{"type": "tensorboard"}]})
for step in itertools.count():  # never ends on its own
    logger.record("done", step)
    logger.record("clip", tracklog.Video(frames, fps=30))  # GIFs pile up in the queue
    logger.dump(step)
    print("dumped", step, flush=True)
"""


def test_sigterm_writes_every_queued_row_first(tmp_path: Path) -> None:
    with (tmp_path / "stderr").open("w") as stderr_file:
        child = subprocess.Popen(
            [sys.executable, "-c", SIGTERM_SCRIPT],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=stderr_file,
            text=True,
        )
    try:
        assert child.stdout is not None
        lines = []
        for line in child.stdout:
            lines.append(line)
            if line == "dumped 20\n":
                child.send_signal(signal.SIGTERM)
                break
        # Read on through the same file object: lines it read ahead are in its buffer.
        lines += child.stdout.read().splitlines(keepends=True)
        child.wait(timeout=120)
    finally:
        child.kill()
    stderr = (tmp_path / "stderr").read_text()
    # A line the signal cut off (print is several writes) was not a dump that returned.
    printed = [int(line.split()[1]) for line in lines if re.fullmatch(r"dumped \d+\n", line)]
    assert child.returncode == 143, stderr  # tracklog's SIGTERM handler: flush, then exit
    events = read_events(tmp_path / "run" / "tensorboard")
    steps = [step for step, _ in scalars(events, "done")]
    # Every dump that returned is in the file; the signal may have come during one more.
    assert steps[: len(printed)] == printed == list(range(len(printed)))
    assert [event.step for event in events.Images("clip")] == steps


def test_a_resumed_run_adds_an_event_file_and_keeps_the_first(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRACKLOG_RESUME", "auto")
    for session, steps in enumerate([(0, 1), (2, 3)]):
        with tb_logger(run_dir) as logger:
            for step in steps:
                logger.record("a", float(session))
                logger.dump(step)
    assert len(list((run_dir / "tensorboard").iterdir())) == 2
    assert scalars(read_events(run_dir / "tensorboard"), "a") == [
        (0, 0.0),
        (1, 0.0),
        (2, 1.0),
        (3, 1.0),
    ]


def test_works_inside_sb3s_own_logger(tmp_path: Path) -> None:
    output = tracklog.TensorBoardOutputFormat(tmp_path / "tb")
    logger = sb3.Logger(folder=None, output_formats=[output])
    logger.record("train/loss", 0.5)
    logger.record("eval/video", sb3.Video(torch.zeros((1, 2, 3, 4, 4), dtype=torch.uint8), fps=5))
    logger.record("hp", sb3.HParam({"lr": 0.1}, {"train/loss": 0}))
    logger.dump(7)
    logger.close()
    events = read_events(tmp_path / "tb")
    assert scalars(events, "train/loss") == [(7, 0.5)]  # recorded: wins over the hparam's 0
    assert len(events.Images("eval/video")) == 1
    assert "_hparams_/session_end_info" in hparams_plugin_data(events)


def test_a_missing_tensorboard_package_names_the_extra(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        sys.modules["tensorboard"] = None  # as if not installed
        import tracklog  # the package itself never needs it
        try:
            tracklog.build_logger({"run_dir": "run", "outputs": [{"type": "tensorboard"}]})
        except ImportError as error:
            print(error)
        else:
            raise SystemExit("no ImportError")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert "pip install 'tracklog[tensorboard]'" in result.stdout
    assert not (tmp_path / "run" / "tensorboard").exists()


# The output on its own (as the delivery process runs it) -----------------------------


def row(step: int, **values: object) -> Row:
    return Row(
        step=step,
        timestamp=1_700_000_000.0 + step,
        seq=step,
        values={key: normalise(key, value) for key, value in values.items()},
    )


def test_each_write_is_in_the_file_when_it_returns(tmp_path: Path) -> None:
    threads = threading.active_count()
    output = TensorBoardOutputFormat(tmp_path / "tb")
    try:
        output.write_row(row(0, a=1.0))
        assert scalars(read_events(tmp_path / "tb"), "a") == [(0, 1.0)]
        clip = tracklog.Video(random_pixels((3, 3, 8, 8)), fps=5)
        output.write_rows([row(1, a=2.0, clip=clip), row(2, a=3.0, notes="done")])
        events = read_events(tmp_path / "tb")
        assert scalars(events, "a") == [(0, 1.0), (1, 2.0), (2, 3.0)]
        assert [event.step for event in events.Images("clip")] == [1]
        assert [event.step for event in events.Tensors("notes")] == [2]
        assert threading.active_count() == threads  # no writer thread of its own
    finally:
        output.close()
    output.close()  # a second close does nothing
    (event_file,) = (tmp_path / "tb").iterdir()
    assert output.path == event_file


def test_a_failing_row_stops_the_batch_and_says_how_many_rows_are_written(
    tmp_path: Path,
) -> None:
    """The delivery process acknowledges the rows before the failing one and sends the
    rest again: written here, they would be written twice."""
    output = TensorBoardOutputFormat(tmp_path / "tb")
    try:
        bad = Row(step=1, timestamp=1.0, seq=1, values={"bad": object()})  # type: ignore[dict-item]
        with pytest.raises(PartlyWritten) as raised:
            output.write_rows([row(0, a=1.0), bad, row(2, a=3.0)])
        assert raised.value.written == 1
        assert isinstance(raised.value.error, AssertionError)  # assert_never: not a LogValue
        # Flushed even though the call raised.
        assert scalars(read_events(tmp_path / "tb"), "a") == [(0, 1.0)]
        output.write_rows([row(2, a=3.0)])
        assert scalars(read_events(tmp_path / "tb"), "a") == [(0, 1.0), (2, 3.0)]
    finally:
        output.close()


def test_hparams_are_in_the_runs_own_event_file(tmp_path: Path) -> None:
    output = TensorBoardOutputFormat(tmp_path / "tb")
    hparam = tracklog.HParam({"lr": 0.1, "algo": "PPO"}, {"eval/return": 0.0})
    output.write_rows([row(0, hparams=hparam, loss=0.5), row(1, **{"eval/return": 4.0})])
    output.close()
    (event_file,) = (tmp_path / "tb").iterdir()  # one file, no hparams subfolder
    assert event_file.is_file()
    events = read_events(event_file)
    assert scalars(events, "loss") == [(0, 0.5)]
    assert set(hparams_plugin_data(events)) == {
        "_hparams_/experiment",
        "_hparams_/session_start_info",
        "_hparams_/session_end_info",
    }
    start = hparams_plugin_data(events)["_hparams_/session_start_info"]["sessionStartInfo"]
    assert start["hparams"] == {"lr": 0.1, "algo": "PPO"}
    assert start["startTimeSecs"] == 1_700_000_000.0  # the first HParam's dump
    (group,) = hparams_tab(tmp_path)[1]["sessionGroups"]
    assert group["name"] == "tb"  # the run, not a hash of its hyperparameters
    assert tab_metrics(group) == {"eval/return": (1, 4.0)}


# Side by side with MLflow and W&B ----------------------------------------------------


@pytest.mark.slow
def test_tensorboard_mlflow_and_wandb_in_one_logger(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SB3's ``set_logger`` replaces its own TensorBoard writer; here it is one of three."""
    from mlflow import MlflowClient
    from stable_baselines3 import PPO

    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("API_KEY", "MODE", "DIR", "PROJECT", "ENTITY", "RUN_ID", "RESUME"):
        monkeypatch.delenv(f"WANDB_{name}", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = tracklog.build_logger(
        {
            "run_dir": str(run_dir),
            "outputs": [
                {"type": "tensorboard"},
                {"type": "mlflow", "tracking_uri": uri, "experiment": "side-by-side"},
                {"type": "wandb", "project": "side-by-side"},
            ],
        }
    )
    with logger:
        model = PPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=32, n_epochs=1, seed=0)
        model.set_logger(logger)
        model.learn(128)
        logger.record("hparams", tracklog.HParam({"lr": 3e-4}, {"eval/return": 0.0}))
        logger.record("eval/return", 21.0)
        logger.record("eval/video", tracklog.Video(grey_clip([0, 90, 180]), fps=10))
        logger.dump(model.num_timesteps)

    events = read_events(run_dir / "tensorboard")
    episode_lengths = scalars(events, "rollout/ep_len_mean")
    assert [step for step, _ in episode_lengths] == [64, 128]
    assert [step for step, _ in scalars(events, "train/loss")] == [128, 128]  # + our dump
    # SB3 records time/* with exclude="tensorboard": TensorBoard has its own wall time.
    assert "time/total_timesteps" not in events.Tags()["scalars"]
    assert scalars(events, "eval/return") == [(128, 21.0)]
    assert len(gif_frames(events.Images("eval/video")[0].encoded_image_string)[0]) == 3

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("side-by-side")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    # By step: MLflow does not promise the order it returns a history in.
    history = client.get_metric_history(run.info.run_id, "rollout/ep_len_mean")
    assert sorted((m.step, as_float32(m.value)) for m in history) == episode_lengths
    history = client.get_metric_history(run.info.run_id, "time/total_timesteps")
    assert sorted((m.step, m.value) for m in history) == [(64, 64.0), (128, 128.0)]
    # The HParam's placeholder 0.0 is no point: the recorded 21.0 is, in all three.
    history = client.get_metric_history(run.info.run_id, "eval/return")
    assert [(m.step, m.value) for m in history] == [(128, 21.0)]
    assert run.data.params == {"lr": "0.0003"}

    wandb_run = read_wandb_offline(run_dir)
    rows = [row for row in wandb_run.rows if "time/total_timesteps" in row.values]
    assert [(row.global_step, row.values["time/total_timesteps"]) for row in rows] == [
        (64, 64),
        (128, 128),
    ]
    assert wandb_run.config == {"lr": 3e-4}
    assert wandb_run.summary["eval/return"] == 21.0
    assert [row.global_step for row in wandb_run.rows if "eval/video" in row.values] == [128]
