"""JSONL and CSV outputs, their media files, and the readers, checked with real readers.

Every test builds a logger from settings, records, dumps, closes, then reads the files
back with the standard library, pandas, Pillow, PyAV or NumPy, the way a user's
analysis script would.
"""

from __future__ import annotations

import csv
import json
import math
import os
import struct
import time
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import numpy.typing as npt
import pandas as pd
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image as PILImage

import tracklog
from tests.readback import decode_mp4
from tests.rundirs import fresh_run_dir
from tests.samples import one_of_every_kind, random_pixels
from tracklog.readers import LoggedRow, Value, read_csv, read_jsonl

Number = bool | int | float
FILE_OUTPUTS: list[dict[str, str]] = [{"type": "jsonl"}, {"type": "csv"}]


# Helpers ---------------------------------------------------------------------------


def files_logger(run_dir: Path, *extra: dict[str, str]) -> tracklog.Logger:
    return tracklog.build_logger(
        {"run_dir": str(run_dir), "outputs": [*FILE_OUTPUTS, *extra]},
    )


def bits(value: float) -> bytes:
    return struct.pack("<d", value)


def same_value(read: object, written: object) -> bool:
    """Equal and of the same type; floats bit-exact, any NaN equal to any NaN."""
    if isinstance(written, float):
        if not isinstance(read, float):
            return False
        if math.isnan(written):
            return math.isnan(read)
        return bits(read) == bits(written)
    return type(read) is type(written) and read == written


def assert_rows(
    rows: Sequence[LoggedRow], dumps: Sequence[tuple[int, Mapping[str, Number]]]
) -> None:
    assert [row.step for row in rows] == [step for step, _ in dumps]
    for row, (_, values) in zip(rows, dumps, strict=True):
        assert set(row.values) == set(values)
        for key, written in values.items():
            assert same_value(row.values[key], written), (key, row.values[key], written)


def read_csv_raw(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="", encoding="utf-8") as file:
        table = list(csv.reader(file))
    return table[0], table[1:]


def read_jsonl_raw(path: Path) -> list[dict[str, object]]:
    documents = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line:
            document = json.loads(line)
            assert isinstance(document, dict)
            documents.append(document)
    return documents


def pandas_read_csv(path: Path) -> pd.DataFrame:
    # pandas 3 parses floats round-trip exactly by default and deprecates
    # float_precision; pandas 2 needs float_precision="round_trip" for that.
    if int(pd.__version__.split(".")[0]) >= 3:
        return pd.read_csv(path)
    return pd.read_csv(path, float_precision="round_trip")


def media_cell(run_dir: Path, cell: Value) -> Path:
    """The media file a JSONL/CSV cell points to, checked to lie inside ``run_dir/media``."""
    assert isinstance(cell, str)
    assert not os.path.isabs(cell)
    path = (run_dir / cell).resolve()
    assert path.is_relative_to((run_dir / "media").resolve()), cell
    assert path.is_file(), cell
    return path


def only_row(path: Path) -> LoggedRow:
    rows = read_jsonl(path)
    assert len(rows) == 1
    return rows[0]


# Strategies ------------------------------------------------------------------------

keys = st.text(min_size=1).filter(lambda key: not key.isspace() and not key.startswith("_"))
numbers: st.SearchStrategy[Number] = st.one_of(
    st.floats(),
    st.integers(min_value=-(2**53), max_value=2**53),
    st.booleans(),
)
steps = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@st.composite
def dump_sequences(
    draw: st.DrawFn, values: st.SearchStrategy[Number] = numbers
) -> list[tuple[int, dict[str, Number]]]:
    """Several non-empty dumps over a small pool of keys, so keys come and go."""
    pool = draw(st.lists(keys, min_size=1, max_size=6, unique=True))
    step = draw(steps)
    dumps = []
    for _ in range(draw(st.integers(min_value=1, max_value=5))):
        step = draw(st.one_of(st.just(step), steps, st.integers(step - 3, step + 3)))
        step = min(max(step, -(2**63)), 2**63 - 1)  # dump() refuses steps beyond int64
        chosen = draw(st.lists(st.sampled_from(pool), min_size=1, unique=True))
        dumps.append((step, {key: draw(values) for key in chosen}))
    return dumps


def log_dumps(run_dir: Path, dumps: Sequence[tuple[int, Mapping[str, Number]]]) -> None:
    with files_logger(run_dir) as logger:
        for step, values in dumps:
            for key, value in values.items():
                logger.record(key, value)
            logger.dump(step)


# Scalars: JSONL ----------------------------------------------------------------------


@settings(max_examples=300)
@given(dumps=dump_sequences())
def test_jsonl_round_trips_scalars_exactly(dumps: list[tuple[int, dict[str, Number]]]) -> None:
    with fresh_run_dir() as run_dir:
        before = time.time()
        log_dumps(run_dir, dumps)
        after = time.time()
        path = run_dir / "progress.jsonl"

        assert_rows(read_jsonl(path), dumps)

        documents = read_jsonl_raw(path)
        assert len(documents) == len(dumps)
        for document, (step, values) in zip(documents, dumps, strict=True):
            assert list(document)[:2] == ["_step", "_timestamp"]
            assert same_value(document["_step"], step)
            timestamp = document["_timestamp"]
            assert isinstance(timestamp, float)
            assert before - 1 <= timestamp <= after + 1
            assert set(document) - {"_step", "_timestamp"} == set(values)
            for key, written in values.items():
                assert same_value(document[key], written), (key, document[key], written)


@settings(max_examples=200)
@given(
    values=st.dictionaries(keys, st.one_of(numbers, st.text()), min_size=1, max_size=8),
    step=steps,
)
@example(values={"a": math.nan, "b": math.inf, "c": -math.inf, "d": -0.0, "e": 5e-324}, step=0)
@example(values={'q"\\\n\x00é\u2028\U0001f600': 1e300, "t": "\x85"}, step=-(2**63))
def test_a_jsonl_line_is_exactly_what_json_dumps_writes(
    values: dict[str, Number | str], step: int
) -> None:
    """tracklog builds JSONL lines from floats formatted once per dump: the text is the
    standard library's, byte for byte (its order, its escapes, its NaN and Infinity)."""
    with fresh_run_dir() as run_dir:
        with files_logger(run_dir) as logger:
            for key, value in values.items():
                logger.record(key, value)
            logger.dump(step)
        [line] = (run_dir / "progress.jsonl").read_text(encoding="utf-8").splitlines()
    timestamp = json.loads(line)["_timestamp"]
    document = {"_step": step, "_timestamp": timestamp, **values}
    expected = json.dumps(document, ensure_ascii=False, separators=(",", ":"))
    breaks: dict[str, str | int | None] = {"\x85": "\\u0085", "\u2028": "\\u2028"}
    breaks["\u2029"] = "\\u2029"
    assert line == expected.translate(str.maketrans(breaks))


# Scalars: CSV ------------------------------------------------------------------------


@settings(max_examples=300)
@given(dumps=dump_sequences())
def test_csv_round_trips_scalars_exactly(dumps: list[tuple[int, dict[str, Number]]]) -> None:
    with fresh_run_dir() as run_dir:
        before = time.time()
        log_dumps(run_dir, dumps)
        after = time.time()
        path = run_dir / "progress.csv"

        assert_rows(read_csv(path), dumps)

        header, rows = read_csv_raw(path)
        first_seen = list(dict.fromkeys(key for _, values in dumps for key in values))
        assert header == ["_step", "_timestamp", *first_seen]
        assert len(rows) == len(dumps)
        for fields, (step, values) in zip(rows, dumps, strict=True):
            assert len(fields) == len(header)
            assert int(fields[0]) == step
            assert before - 1 <= float(fields[1]) <= after + 1
            for key, field in zip(header[2:], fields[2:], strict=True):
                # A key missing from this dump (not seen yet, or gone again) is empty.
                assert (field != "") == (key in values), (key, field)


def test_key_first_seen_later_gets_its_own_csv_column(run_dir: Path) -> None:
    with files_logger(run_dir) as logger:
        logger.record("a", 1)
        logger.dump(0)
        logger.record("a", 2)
        logger.dump(1)
        logger.record("b", 0.5)
        logger.dump(2)
        logger.record("a", 4)
        logger.dump(3)

    header, rows = read_csv_raw(run_dir / "progress.csv")
    assert header == ["_step", "_timestamp", "a", "b"]
    assert [[row[0], row[2], row[3]] for row in rows] == [
        ["0", "1", ""],
        ["1", "2", ""],
        ["2", "", "0.5"],
        ["3", "4", ""],
    ]
    frame = pandas_read_csv(run_dir / "progress.csv")
    assert list(frame.columns) == header
    assert frame["b"].isna().tolist() == [True, True, False, True]


# Scalars: pandas ---------------------------------------------------------------------

pandas_floats = st.floats(allow_subnormal=False)


@settings(max_examples=100)
@given(dumps=st.lists(st.tuples(steps, st.tuples(pandas_floats, pandas_floats)), min_size=1))
@example(dumps=[(0, (0.0, -0.0))])
def test_pandas_reads_floats_exactly(dumps: list[tuple[int, tuple[float, float]]]) -> None:
    """pandas reads both files and gets every float64 back bit-exact, NaN and ±inf included.

    Subnormals are left out here (``json``/``csv`` cover them above): pandas' JSON parser
    flushes them to 0 by default and refuses them with ``precise_float=True``. Without
    ``dtype``, ``read_json`` turns an all-integral float column into int64, losing -0.0.
    """
    with fresh_run_dir() as run_dir:
        log_dumps(run_dir, [(step, {"train/x": x, "y": y}) for step, (x, y) in dumps])
        from_csv = pandas_read_csv(run_dir / "progress.csv")
        from_jsonl = pd.read_json(
            run_dir / "progress.jsonl",
            lines=True,
            precise_float=True,
            dtype={"train/x": "float64", "y": "float64"},
        )

        for frame in (from_csv, from_jsonl):
            assert frame["_step"].tolist() == [step for step, _ in dumps]
            assert frame["_timestamp"].dtype == np.float64
            for column, index in (("train/x", 0), ("y", 1)):
                read = frame[column].to_numpy(dtype=np.float64)
                written = np.array([pair[index] for _, pair in dumps], dtype=np.float64)
                assert np.array_equal(np.isnan(read), np.isnan(written))
                finite = ~np.isnan(written)
                assert read[finite].tobytes() == written[finite].tobytes()


def test_pandas_sees_nan_and_infinities(run_dir: Path) -> None:
    with files_logger(run_dir) as logger:
        logger.record("nan", float("nan"))
        logger.record("inf", float("inf"))
        logger.record("neg", -math.inf)
        logger.record("np", np.float32(np.inf))
        logger.dump(7)

    for frame in (
        pandas_read_csv(run_dir / "progress.csv"),
        pd.read_json(run_dir / "progress.jsonl", lines=True),
    ):
        assert frame.dtypes[["nan", "inf", "neg", "np"]].tolist() == [np.float64] * 4
        assert math.isnan(frame["nan"][0])
        assert frame["inf"][0] == math.inf
        assert frame["neg"][0] == -math.inf
        assert frame["np"][0] == math.inf
        assert frame["_step"][0] == 7


def test_numpy_and_python_scalars_keep_their_kind(run_dir: Path) -> None:
    with files_logger(run_dir) as logger:
        logger.record("f32", np.float32(0.1))
        logger.record("i64", np.int64(2**53))
        logger.record("u8", np.uint8(255))
        logger.record("b", np.bool_(True))
        logger.record("neg_zero", -0.0)
        logger.record("min_sub", 5e-324)
        logger.dump(0)

    expected: dict[str, Number] = {
        "f32": float(np.float32(0.1)),
        "i64": 2**53,
        "u8": 255,
        "b": True,
        "neg_zero": -0.0,
        "min_sub": 5e-324,
    }
    for rows in (read_jsonl(run_dir / "progress.jsonl"), read_csv(run_dir / "progress.csv")):
        assert_rows(rows, [(0, expected)])


# Text --------------------------------------------------------------------------------

AWKWARD_TEXT = "comma, \"quotes\", 'single'\nnew line\r\nCRLF\ttab \x00 nul \u2028 sep"


@settings(max_examples=150)
@given(texts=st.lists(st.text(min_size=1), min_size=1, max_size=4))
@example(texts=[AWKWARD_TEXT, "1,2", '"', "\n", "\r"])
def test_text_survives_jsonl_and_csv(texts: list[str]) -> None:
    with fresh_run_dir() as run_dir:
        with files_logger(run_dir) as logger:
            for step, text in enumerate(texts):
                logger.record("text", text)
                logger.record("n", step)
                logger.dump(step)

        assert [row.values["text"] for row in read_jsonl(run_dir / "progress.jsonl")] == texts
        assert [doc["text"] for doc in read_jsonl_raw(run_dir / "progress.jsonl")] == texts
        header, rows = read_csv_raw(run_dir / "progress.csv")
        assert [row[header.index("text")] for row in rows] == texts
        assert [row[header.index("n")] for row in rows] == [str(n) for n in range(len(texts))]


def test_pandas_reads_awkward_text(run_dir: Path) -> None:
    with files_logger(run_dir) as logger:
        logger.record("text", AWKWARD_TEXT)
        logger.record("x", 1.5)
        logger.dump(0)

    from_jsonl = pd.read_json(run_dir / "progress.jsonl", lines=True)
    assert from_jsonl["text"][0] == AWKWARD_TEXT
    from_csv = pandas_read_csv(run_dir / "progress.csv")
    assert from_csv["text"][0] == AWKWARD_TEXT
    assert from_csv["x"][0] == 1.5


def test_empty_text_survives_jsonl(run_dir: Path) -> None:
    # (CSV cannot tell an empty field from a missing key; JSONL is the lossless one.)
    with files_logger(run_dir) as logger:
        logger.record("text", "")
        logger.dump(0)
    assert only_row(run_dir / "progress.jsonl").values == {"text": ""}


# Resume ------------------------------------------------------------------------------


def test_resume_appends_to_jsonl_csv_and_train_log(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRACKLOG_RESUME", "auto")
    with files_logger(run_dir, {"type": "file"}) as logger:
        logger.info("first run")
        logger.record("a", 1)
        logger.record("b", 0.5)
        logger.dump(0)
    with files_logger(run_dir, {"type": "file"}) as logger:
        logger.info("second run")
        logger.record("a", 2)
        logger.dump(1)
        logger.record("c", "new")  # a key the first process never saw widens the CSV
        logger.dump(2)

    expected: list[tuple[int, Mapping[str, Number | str]]] = [
        (0, {"a": 1, "b": 0.5}),
        (1, {"a": 2}),
        (2, {"c": "new"}),
    ]
    for rows in (read_jsonl(run_dir / "progress.jsonl"), read_csv(run_dir / "progress.csv")):
        assert [(row.step, dict(row.values)) for row in rows] == expected

    header, fields = read_csv_raw(run_dir / "progress.csv")
    assert header == ["_step", "_timestamp", "a", "b", "c"]
    assert [len(row) for row in fields] == [5, 5, 5]
    assert pandas_read_csv(run_dir / "progress.csv")["c"].isna().tolist() == [True, True, False]

    log = (run_dir / "train.log").read_text(encoding="utf-8")
    assert log.index("first run") < log.index("second run")
    assert log.count("| a ") == 2


def test_resume_never_overwrites_media_files(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRACKLOG_RESUME", "auto")
    first, second = np.arange(4), np.arange(4) * 10
    with files_logger(run_dir) as logger:
        logger.record("hist", first)
        logger.dump(0)
    with files_logger(run_dir) as logger:
        logger.record("hist", second)
        logger.dump(0)

    rows = read_jsonl(run_dir / "progress.jsonl")
    paths = [media_cell(run_dir, row.values["hist"]) for row in rows]
    assert paths[0] != paths[1]
    assert np.array_equal(np.load(paths[0]), first)
    assert np.array_equal(np.load(paths[1]), second)


# Media -------------------------------------------------------------------------------


def log_one(run_dir: Path, key: str, value: tracklog.Recordable, step: int = 0) -> Path:
    """Log ``value`` alone; return its media file after checking JSONL and CSV agree on it."""
    with files_logger(run_dir) as logger:
        logger.record(key, value)
        logger.dump(step)
    from_jsonl = only_row(run_dir / "progress.jsonl").values[key]
    (from_csv,) = read_csv(run_dir / "progress.csv")
    assert from_csv.values[key] == from_jsonl
    return media_cell(run_dir, from_jsonl)


def read_png(path: Path) -> npt.NDArray[np.uint8]:
    with PILImage.open(path) as picture:
        assert picture.format == "PNG"
        return np.asarray(picture)


def test_image_hwc_is_a_lossless_png(run_dir: Path) -> None:
    pixels = random_pixels((5, 7, 3))
    path = log_one(run_dir, "eval/image", tracklog.Image(pixels, "HWC"))
    assert path.suffix == ".png"
    with PILImage.open(path) as picture:
        assert picture.size == (7, 5)
        assert picture.mode == "RGB"
    assert np.array_equal(read_png(path), pixels)


@pytest.mark.parametrize(
    ("shape", "dataformats", "size", "mode"),
    [
        ((3, 5, 7), "CHW", (7, 5), "RGB"),
        ((5, 7), "HW", (7, 5), "L"),
        ((5, 7, 4), "HWC", (7, 5), "RGBA"),
        ((2, 5, 7, 3), "NHWC", (14, 5), "RGB"),
    ],
)
def test_image_layouts_give_the_right_png_size(
    run_dir: Path, shape: tuple[int, ...], dataformats: str, size: tuple[int, int], mode: str
) -> None:
    path = log_one(run_dir, "img", tracklog.Image(random_pixels(shape), dataformats))
    with PILImage.open(path) as picture:
        assert picture.size == size
        assert picture.mode == mode


def test_image_batch_is_tiled_left_to_right(run_dir: Path) -> None:
    batch = random_pixels((2, 4, 6, 3))
    path = log_one(run_dir, "img", tracklog.Image(batch, "NHWC"))
    assert np.array_equal(read_png(path), np.concatenate([batch[0], batch[1]], axis=1))


def test_float_image_is_scaled_to_uint8(run_dir: Path) -> None:
    pixels = np.array([[0.0, 1.0], [0.2, 0.8]], dtype=np.float32)
    path = log_one(run_dir, "img", tracklog.Image(pixels, "HW"))
    assert read_png(path).tolist() == [[0, 255], [51, 204]]


def test_sb3_image_is_accepted(run_dir: Path) -> None:
    from stable_baselines3.common.logger import Image as SB3Image

    pixels = random_pixels((3, 4, 5))
    path = log_one(run_dir, "img", SB3Image(pixels, "CHW"))
    assert np.array_equal(read_png(path), pixels.transpose(1, 2, 0))


def test_figure_is_a_png_of_its_size(run_dir: Path) -> None:
    figure, axes = plt.subplots(figsize=(4, 3), dpi=50)
    axes.plot([0, 1, 2], [2, 0, 1])
    path = log_one(run_dir, "plots/curve", tracklog.Figure(figure, close=True))
    assert path.suffix == ".png"
    with PILImage.open(path) as picture:
        assert picture.size == (200, 150)
        assert picture.format == "PNG"


def solid_clip(
    levels: Sequence[int], channels: int, height: int, width: int
) -> npt.NDArray[np.uint8]:
    """(T,C,H,W) frames, frame t filled with grey level ``levels[t]``."""
    clip = np.empty((len(levels), channels, height, width), dtype=np.uint8)
    for t, level in enumerate(levels):
        clip[t] = level
    if channels == 4:
        clip[:, 3] = 255
    return clip


@pytest.mark.parametrize(
    ("channels", "height", "width", "fps"),
    [(3, 16, 16, 30.0), (1, 7, 9, 12.5), (4, 5, 11, 2.5), (3, 1, 1, 29.97)],
)
def test_video_tchw_is_an_mp4_with_its_frames_and_fps(
    run_dir: Path, channels: int, height: int, width: int, fps: float
) -> None:
    levels = [0, 255, 60, 200, 120]
    video = tracklog.Video(solid_clip(levels, channels, height, width), fps=fps)
    path = log_one(run_dir, "eval/video", video)
    assert path.suffix == ".mp4"

    frames, rate = decode_mp4(path)
    assert len(frames) == len(levels)
    assert rate == Fraction(fps).limit_denominator(1001)
    # yuv420p needs even sizes: odd ones are padded by one pixel, never cropped, and
    # the padding repeats the edge rather than adding a black line.
    assert frames[0].shape == (height + height % 2, width + width % 2, 3)
    for frame, level in zip(frames, levels, strict=True):
        assert abs(float(frame.mean()) - level) < 12


def test_video_batch_is_tiled_left_to_right(run_dir: Path) -> None:
    dark = solid_clip([10, 10, 10], 3, 8, 6)
    bright = solid_clip([240, 240, 240], 3, 8, 6)
    video = tracklog.Video(np.stack([dark, bright]), fps=10)  # (N,T,C,H,W)
    frames, rate = decode_mp4(log_one(run_dir, "video", video))
    assert len(frames) == 3
    assert rate == 10
    for frame in frames:
        assert frame.shape == (8, 12, 3)
        assert frame[:, :5].mean() < 40
        assert frame[:, 7:].mean() > 210


def test_odd_sized_video_batch(run_dir: Path) -> None:
    frames_in = random_pixels((3, 2, 3, 5, 3))  # N=3 clips of 5x3 → 5x9 → padded 6x10
    frames, rate = decode_mp4(log_one(run_dir, "video", tracklog.Video(frames_in, fps=0.5)))
    assert len(frames) == 2
    assert rate == Fraction(1, 2)
    assert frames[0].shape == (6, 10, 3)


def test_float_video_and_sb3_video(run_dir: Path) -> None:
    import torch
    from stable_baselines3.common.logger import Video as SB3Video

    clip = torch.full((4, 3, 6, 6), 0.5)  # SB3 documents (T,C,H,W) torch tensors
    frames, rate = decode_mp4(log_one(run_dir, "video", SB3Video(clip, fps=20)))
    assert len(frames) == 4
    assert rate == 20
    assert abs(float(frames[0].mean()) - 128) < 12


@pytest.mark.parametrize(
    "values",
    [
        np.arange(12, dtype=np.int64).reshape(3, 4),
        np.array([0.5, np.nan, -np.inf, 5e-324], dtype=np.float64),
        np.array([True, False, True]),
        np.linspace(0, 1, 7, dtype=np.float32),
    ],
)
def test_histogram_is_an_npy_file_numpy_loads(
    run_dir: Path, values: npt.NDArray[np.generic]
) -> None:
    path = log_one(run_dir, "weights/layer0", values)
    assert path.suffix == ".npy"
    loaded = np.load(path, allow_pickle=False)
    assert loaded.dtype == values.dtype
    assert np.array_equal(loaded, values.reshape(-1), equal_nan=values.dtype.kind == "f")


def test_torch_histogram(run_dir: Path) -> None:
    import torch

    tensor = torch.arange(6, dtype=torch.float32, requires_grad=True)
    loaded = np.load(log_one(run_dir, "grads", tensor))
    assert loaded.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_hparam_is_a_json_file_with_hparams_and_metrics(run_dir: Path) -> None:
    hparam = tracklog.HParam(
        {
            "lr": 3e-4,
            "gamma": 0.99,
            "algo": "PPO",
            "sde": False,
            "seed": None,
            "net_arch": [64, 64],
            "policy": {"activation": "tanh", "ortho": True},
        },
        {"rollout/ep_rew_mean": 0.0, "eval/success": 1},
    )
    path = log_one(run_dir, "hparams", hparam)
    assert path.suffix == ".json"
    assert json.loads(path.read_text(encoding="utf-8")) == {
        "hparams": {
            "lr": 3e-4,
            "gamma": 0.99,
            "algo": "PPO",
            "sde": False,
            "seed": None,
            "net_arch": [64, 64],
            "policy": {"activation": "tanh", "ortho": True},
        },
        "metrics": {"rollout/ep_rew_mean": 0.0, "eval/success": 1.0},
    }


def test_jsonl_and_csv_share_one_media_file(run_dir: Path) -> None:
    clip = random_pixels((2, 3, 4, 4))
    with files_logger(run_dir) as logger:
        logger.record("eval/video", tracklog.Video(clip, fps=5))
        logger.record("hist", np.arange(3))
        logger.dump(10)

    jsonl_row = only_row(run_dir / "progress.jsonl")
    (csv_row,) = read_csv(run_dir / "progress.csv")
    assert jsonl_row.values == csv_row.values
    for key in ("eval/video", "hist"):
        path = media_cell(run_dir, jsonl_row.values[key])
        assert [entry.name for entry in path.parent.iterdir()] == [path.name]
    assert sum(1 for entry in (run_dir / "media").rglob("*") if entry.is_file()) == 2


def test_two_dumps_at_the_same_step_keep_both_files(run_dir: Path) -> None:
    first, second = random_pixels((4, 4, 3), 1), random_pixels((4, 4, 3), 2)
    with files_logger(run_dir) as logger:
        logger.record("img", tracklog.Image(first))
        logger.dump(5)
        logger.record("img", tracklog.Image(second))
        logger.dump(5)

    for rows in (read_jsonl(run_dir / "progress.jsonl"), read_csv(run_dir / "progress.csv")):
        paths = [media_cell(run_dir, row.values["img"]) for row in rows]
        assert len(set(paths)) == 2
        assert np.array_equal(read_png(paths[0]), first)
        assert np.array_equal(read_png(paths[1]), second)


def test_keys_that_sanitise_alike_get_distinct_directories(run_dir: Path) -> None:
    arrays = {"a b": np.arange(2), "a_b": np.arange(3), "a?b": np.arange(4), "x/a b": np.arange(5)}
    with files_logger(run_dir) as logger:
        for key, values in arrays.items():
            logger.record(key, values)
        logger.record("x/a_b", np.arange(6))
        logger.dump(0)
        logger.record("a_b", np.arange(7))  # a later dump reuses its key's directory
        logger.record("a b", np.arange(8))
        logger.dump(1)

    first, second = read_jsonl(run_dir / "progress.jsonl")
    directories = {key: media_cell(run_dir, cell).parent for key, cell in first.values.items()}
    assert len(set(directories.values())) == len(directories)
    for key, values in arrays.items():
        assert np.array_equal(np.load(run_dir / str(first.values[key])), values)
    for key in ("a_b", "a b"):
        assert media_cell(run_dir, second.values[key]).parent == directories[key]


@pytest.mark.parametrize(
    ("earlier", "later"),
    [
        ("a", "a/step_0.npy"),  # a key's file sits where another key's directory goes
        ("a", "a/step_0.npy/b"),  # ... or where one of its parent directories goes
        ("a/step_0.npy", "a"),
    ],
)
def test_a_file_never_blocks_another_keys_directory(
    run_dir: Path, earlier: str, later: str
) -> None:
    with files_logger(run_dir) as logger:
        logger.record(earlier, np.arange(2))
        logger.record(later, np.arange(3))
        logger.dump(0)

    row = only_row(run_dir / "progress.jsonl")
    assert np.array_equal(np.load(media_cell(run_dir, row.values[earlier])), np.arange(2))
    assert np.array_equal(np.load(media_cell(run_dir, row.values[later])), np.arange(3))


@settings(max_examples=200)
@given(names=st.lists(keys, min_size=1, max_size=4, unique=True))
@example(names=["../../x", "a b", "a/b/c", "..", "/etc/passwd", "a/../../b", "./.", "~/x"])
@example(names=["k" * 300, "k" * 299 + "j", "é" * 200])
@example(names=["x/" * 3000 + "y", "x/" * 3000 + "z", "/" * 5000])
def test_media_paths_never_leave_the_media_directory(names: list[str]) -> None:
    with fresh_run_dir() as run_dir:
        with files_logger(run_dir) as logger:
            for index, name in enumerate(names):
                logger.record(name, np.full(3, index))
            logger.dump(0)

        row = only_row(run_dir / "progress.jsonl")
        paths = [media_cell(run_dir, row.values[name]) for name in names]
        assert len({path.parent for path in paths}) == len(names)
        for index, path in enumerate(paths):
            assert np.load(path).tolist() == [index] * 3
        # Nothing was written beside run_dir, and every file in it is in media/ or a log.
        assert list(run_dir.parent.iterdir()) == [run_dir]
        media = (run_dir / "media").resolve()
        for entry in run_dir.rglob("*"):
            if entry.is_file() and entry.suffix == ".npy":
                assert entry.resolve().is_relative_to(media)
        assert {entry.name for entry in run_dir.iterdir()} == {
            "media",
            "progress.jsonl",
            "progress.csv",
            "tracklog.json",
        }


def test_every_media_kind_in_one_dump(run_dir: Path) -> None:
    """One of each kind next to scalars: every cell points at a readable file."""
    with files_logger(run_dir) as logger:
        for key, value in one_of_every_kind().items():
            logger.record(key, value)
        logger.dump(0)

    row = only_row(run_dir / "progress.jsonl")
    assert row.values["scalar"] == 1.25
    assert row.values["text"] == "hello"
    suffixes = {
        key: media_cell(run_dir, row.values[key]).suffix
        for key in ("hist", "image", "figure", "video", "hparam")
    }
    assert suffixes == {
        "hist": ".npy",
        "image": ".png",
        "figure": ".png",
        "video": ".mp4",
        "hparam": ".json",
    }
    frame = pd.read_json(run_dir / "progress.jsonl", lines=True)
    assert frame["video"][0] == row.values["video"]


@given(st.text(alphabet=st.sampled_from("a\x85\u2028\u2029\u00e9\n\r"), max_size=8))
def test_a_jsonl_row_is_one_line_for_every_line_splitter(text: str) -> None:
    # U+0085, U+2028 and U+2029 are valid raw in JSON, but str.splitlines() ends a line
    # at each: written escaped, a row stays one line for every reader.
    with fresh_run_dir() as run_dir:
        with tracklog.build_logger(
            {"run_dir": str(run_dir), "outputs": [{"type": "jsonl"}]}
        ) as logger:
            logger.record(f"k{text}", text)
            logger.dump(0)
        content = (run_dir / "progress.jsonl").read_text(encoding="utf-8")
        frame = pd.read_json(run_dir / "progress.jsonl", lines=True)
    (line,) = content.splitlines()
    assert json.loads(line)[f"k{text}"] == text
    assert frame[f"k{text}"].tolist() == [text]
