"""The W&B output against real offline runs, read back from W&B's own transaction log.

Every test builds a logger from settings, records, dumps, closes, then reads the run
back with :func:`tracklog.readers.read_wandb_offline` (the ``run-*.wandb`` file that
``wandb sync`` uploads) and decodes the media files it points at with PyAV and Pillow;
nothing is read from tracklog's memory. W&B's own Go service writes that file, so what
the tests see is what W&B would upload.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import struct
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Protocol

import matplotlib.pyplot as plt
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image as PILImage
from pydantic import SecretStr, ValidationError

import tracklog
from tests.readback import decode_mp4
from tests.rundirs import fresh_run_dir
from tests.samples import NESTED_HPARAMS, grey_clip, random_pixels
from tests.strategies import Number, dump_sequences
from tracklog._row import Row
from tracklog.readers import (
    WandbLogTail,
    WandbRun,
    read_jsonl,
    read_wandb_offline,
    wandb_records,
)
from tracklog.settings import WandbOutput
from tracklog.values import Scalar, check_key

# Also for the subprocesses and W&B's service process: no banners in the test output.
os.environ.setdefault("WANDB_SILENT", "true")

API_KEY = "0123456789abcdef0123456789abcdef01234567"  # W&B's 40-character key format


@pytest.fixture(autouse=True)
def _quiet_offline_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's W&B variables must not redirect or rename the test runs."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("API_KEY", "MODE", "DIR", "PROJECT", "ENTITY", "RUN_ID", "RESUME", "NAME"):
        monkeypatch.delenv(f"WANDB_{name}", raising=False)
    for name in ("TAGS", "RUN_GROUP", "NOTES", "CONSOLE"):
        monkeypatch.delenv(f"WANDB_{name}", raising=False)


@pytest.fixture(autouse=True)
def _no_output_failed(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    # A failing output is reported on the "tracklog" logger and training goes on, so a
    # test would otherwise see only what is missing from the run, not why.
    yield
    failures = [r for r in caplog.records if r.name == "tracklog" and r.levelno >= 40]
    assert not failures, [record.getMessage() for record in failures]


# Helpers -----------------------------------------------------------------------------


def wandb_logger(run_dir: Path, *others: dict[str, object], **options: object) -> tracklog.Logger:
    output: dict[str, object] = {"type": "wandb", "project": "tests", **options}
    return tracklog.build_logger({"run_dir": str(run_dir), "outputs": [output, *others]})


def read_finished(path: Path) -> WandbRun:
    """The run read back right after ``close()``, which waits for its exit record."""
    run = read_wandb_offline(path)
    assert run.exit_code is not None, "close() returned before the run was on disk"
    return run


def wandb_file(run_dir: Path) -> Path:
    """The one ``run-*.wandb`` transaction log under ``run_dir``."""
    (found,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    return found


def column(run: WandbRun, key: str) -> list[tuple[int | None, object]]:
    """``(global_step, value)`` of every row holding ``key``, in row order."""
    return [(row.global_step, row.values[key]) for row in run.rows if key in row.values]


def user_values(run: WandbRun) -> list[dict[str, object]]:
    """Each row's values without tracklog's step column."""
    return [{k: v for k, v in row.values.items() if k != "global_step"} for row in run.rows]


def bits(value: float) -> bytes:
    return struct.pack("<d", value)


def same_number(read: object, written: bool | int | float) -> bool:
    """Whether W&B holds ``written``: the same number, as W&B's JSON writes it.

    tracklog logs a bool as 0/1. W&B's service writes an integral float without its
    ``.0`` (so it reads back as an int of the same value) and -0.0 as 0; NaN and ±inf
    as the JSON extensions ``NaN``/``Infinity``. Ints must read back as exactly that int.
    """
    if isinstance(read, bool) or not isinstance(read, int | float):
        return False
    if isinstance(written, bool):
        return type(read) is int and read == int(written)
    if isinstance(written, int):
        return type(read) is int and read == written
    if math.isnan(written):
        return isinstance(read, float) and math.isnan(read)
    expected = 0.0 if written == 0 else written  # W&B drops the sign of a zero
    return bits(float(read)) == bits(expected)


def wandb_warnings(caught: Sequence[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "W&B" in str(w.message)]


# The raw protobuf records, for what read_wandb_offline does not return. wandb's
# generated protobuf module has no type information, so these Protocols describe the
# fields the tests read.


class _MetricRecord(Protocol):
    name: str
    glob_name: str
    step_metric: str


class _RunRecord(Protocol):
    run_id: str
    entity: str
    project: str
    run_group: str
    display_name: str
    notes: str
    tags: Sequence[str]
    resume: bool


class _Record(Protocol):
    metric: _MetricRecord
    run: _RunRecord

    def ParseFromString(self, data: bytes) -> int: ...
    def WhichOneof(self, name: str) -> str | None: ...


def raw_records(log: Path, kind: str) -> list[_Record]:
    """The records of one ``record_type`` (``"metric"``, ``"run"``, …) in ``log``."""
    record_class = importlib.import_module("wandb.proto.wandb_internal_pb2").Record
    found = []
    for payload in wandb_records(log):
        record: _Record = record_class()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == kind:
            found.append(record)
    return found


# Settings ----------------------------------------------------------------------------


def test_defaults() -> None:
    output = WandbOutput()
    assert output.mode == "offline"
    assert output.dir is None
    assert output.finish_timeout == 60.0
    assert output.tags == []
    assert output.config == {}
    assert output.api_key is None
    assert output.project is output.entity is output.group is output.name is None
    assert output.notes is output.id is output.resume is None


def test_every_field_reaches_the_run(run_dir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    with wandb_logger(
        run_dir,
        project="tracklog-tests",
        entity="rl-team",
        group="sweep-7",
        tags=["ppo", "cartpole"],
        name="ppo-cartpole-1",
        notes="a note\nover two lines",
        id="run-0001",
        resume="allow",
        dir=str(elsewhere),
        config={"seed": 3, "env": {"id": "CartPole-v1"}},
        finish_timeout=5,
    ) as logger:
        logger.record("a", 1)
        logger.dump(0)

    assert not (run_dir / "wandb").exists()  # dir moves the run out of run_dir
    run = read_finished(elsewhere)
    assert run.directory.parent == elsewhere / "wandb"
    assert run.directory.name.startswith("offline-run-")
    assert run.run_id == "run-0001"
    assert run.project == "tracklog-tests"
    assert (run.group, run.name, run.tags) == ("sweep-7", "ppo-cartpole-1", ("ppo", "cartpole"))
    assert run.config == {"seed": 3, "env": {"id": "CartPole-v1"}}
    (record,) = raw_records(wandb_file(elsewhere), "run")
    assert record.run.entity == "rl-team"
    assert record.run.run_group == "sweep-7"
    assert list(record.run.tags) == ["ppo", "cartpole"]
    assert record.run.display_name == "ppo-cartpole-1"
    assert record.run.notes == "a note\nover two lines"
    assert record.run.resume is True


@pytest.mark.parametrize(("resume", "resumable"), [("allow", True), ("never", False)])
def test_resume_reaches_the_run(run_dir: Path, resume: str, resumable: bool) -> None:
    with wandb_logger(run_dir, id="resumable", resume=resume):
        pass
    read_finished(run_dir)
    (record,) = raw_records(wandb_file(run_dir), "run")
    assert record.run.resume is resumable


def test_the_run_goes_to_run_dir_by_default(run_dir: Path) -> None:
    with wandb_logger(run_dir) as logger:
        logger.record("a", 1)
        logger.dump(0)
    run = read_finished(run_dir)
    assert run.directory.parent == run_dir / "wandb"
    assert len(run.run_id) >= 8
    assert [row.values for row in run.rows] == [{"a": 1, "global_step": 0}]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("tags", ["ok", "x" * 65], "W&B tags must be 1 to 64 characters long"),
        ("tags", [""], "W&B tags must be 1 to 64 characters long"),
        ("tags", "ppo", "Input should be a valid list"),
        ("mode", "cloud", "Input should be 'online', 'offline' or 'disabled'"),
        ("resume", "sometimes", "Input should be 'allow', 'must', 'never' or 'auto'"),
        ("id", "a/b", "String should match pattern"),
        ("id", "x" * 65, "String should match pattern"),
        ("project", "", "String should have at least 1 character"),
        ("project", "p" * 129, "String should have at most 128 characters"),
        ("entity", 5, "Input should be a valid string"),
        ("group", ["g"], "Input should be a valid string"),
        ("name", 1.5, "Input should be a valid string"),
        ("notes", {"a": 1}, "Input should be a valid string"),
        ("dir", 7, "Input is not a valid path"),
        ("config", ["lr", 0.1], "Input should be a valid dictionary"),
        ("api_key", 12345, "Input should be a valid string"),
        ("finish_timeout", 0, "Input should be greater than 0"),
        ("finish_timeout", -1.0, "Input should be greater than 0"),
        ("finish_timeout", "soon", "Input should be a valid number"),
        ("colour", "red", "Extra inputs are not permitted"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(
    run_dir: Path, field: str, value: object, message: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        wandb_logger(run_dir, **{field: value})
    text = str(caught.value)
    assert f"outputs.0.wandb.{field}" in text, text
    assert message in text, text
    assert not run_dir.exists()  # refused before anything was created


def test_api_key_is_never_shown_nor_stored(run_dir: Path) -> None:
    with wandb_logger(run_dir, api_key=API_KEY, config={"user": "me"}) as logger:
        assert logger.settings is not None
        (output,) = logger.settings.outputs
        assert isinstance(output, WandbOutput)
        assert isinstance(output.api_key, SecretStr)
        assert output.api_key.get_secret_value() == API_KEY
        for shown in (repr(logger.settings), str(logger.settings), repr(output)):
            assert API_KEY not in shown
        logger.record("hparams", tracklog.HParam({"lr": 0.1}))
        logger.info("started")
        logger.dump(0)

    run = read_finished(run_dir)
    assert run.config == {"user": "me", "lr": 0.1}
    assert API_KEY not in repr(run)
    # Not in the transaction log that wandb sync uploads, nor in any other file W&B wrote.
    files = [path for path in run_dir.rglob("*") if path.is_file()]
    assert wandb_file(run_dir) in files
    for path in files:
        assert API_KEY.encode() not in path.read_bytes(), path


def test_disabled_mode_logs_nothing_and_does_not_fail(run_dir: Path) -> None:
    with wandb_logger(run_dir, mode="disabled") as logger:
        logger.record("a", 1)
        logger.record("video", tracklog.Video(grey_clip([0, 9]), fps=4))
        logger.info("line")
        logger.dump(0)
    assert list(run_dir.iterdir()) == [run_dir / "tracklog.json"]  # the run's identity only
    with pytest.raises(ValueError, match=r"expected one W&B run .* found 0"):
        read_wandb_offline(run_dir)


# Scalars and steps -------------------------------------------------------------------

numbers: st.SearchStrategy[Number] = st.one_of(
    st.floats(),  # NaN, ±inf, subnormals and -0.0 included
    st.integers(min_value=-(2**53), max_value=2**53),
    st.booleans(),
)


def assert_scalar_rows(
    run: WandbRun,
    dumps: Sequence[tuple[int, Mapping[str, Number]]],
    windows: Sequence[tuple[float, float]],
) -> None:
    # One row per dump, in order: nothing dropped when a step repeats or goes back.
    assert [row.step for row in run.rows] == list(range(len(dumps)))
    assert [row.global_step for row in run.rows] == [step for step, _ in dumps]
    for row, (step, values), (before, after) in zip(run.rows, dumps, windows, strict=True):
        assert set(row.values) == {*values, "global_step"}
        assert row.values["global_step"] == step
        for key, written in values.items():
            assert same_number(row.values[key], written), (key, row.values[key], written)
        assert row.timestamp is not None
        assert before <= row.timestamp <= after


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


@settings(max_examples=30)
@given(dumps=dump_sequences(numbers))
@example(dumps=[(0, {"a": 5e-324, "x-y": -(2**53)}), (0, {"a": -0.0}), (-1, {"a": True})])
@example(dumps=[(2**63 - 1, {"a": math.nan, "x-y": math.inf}), (-(2**63), {"a": -math.inf})])
@example(dumps=[(5, {"a": 2.0}), (4, {"a": 1e16, "x-y": 2**53}), (5, {"a": sys.float_info.max})])
def test_scalars_round_trip_exactly(dumps: list[tuple[int, dict[str, Number]]]) -> None:
    with fresh_run_dir() as run_dir:
        with wandb_logger(run_dir) as logger:  # one run per example
            windows = log_dumps(logger, dumps)
        assert_scalar_rows(read_finished(run_dir), dumps, windows)


def test_backwards_and_repeated_steps_are_all_kept(run_dir: Path) -> None:
    dumps: list[tuple[int, dict[str, Number]]] = [
        (100, {"loss": 1.5}),
        (100, {"loss": 1.25}),  # the same step again: a second row
        (50, {"loss": 1.0, "eval": 3}),  # back in time (a resume, a late evaluation)
        (200, {"eval": False}),
    ]
    with wandb_logger(run_dir) as logger:
        windows = log_dumps(logger, dumps)
    run = read_finished(run_dir)
    assert_scalar_rows(run, dumps, windows)
    assert column(run, "loss") == [(100, 1.5), (100, 1.25), (50, 1)]
    assert column(run, "eval") == [(50, 3), (200, 0)]


def test_every_chart_uses_global_step_as_its_x_axis(run_dir: Path) -> None:
    with wandb_logger(run_dir) as logger:
        logger.record("a", 1)
        logger.dump(0)
    read_finished(run_dir)
    metrics = raw_records(wandb_file(run_dir), "metric")
    (glob,) = [record.metric for record in metrics if record.metric.glob_name]
    assert glob.glob_name == "*"
    assert glob.step_metric == "global_step"
    assert "global_step" in [record.metric.name for record in metrics]


def test_exclude_wandb_keeps_a_key_out_of_wandb_only(run_dir: Path) -> None:
    with wandb_logger(run_dir, {"type": "jsonl"}) as logger:
        logger.record("everywhere", 1.0)
        logger.record("not_in_wandb", 2.0, exclude="wandb")
        logger.record("not_in_json", 3.0, exclude=("json", "stdout"))
        logger.dump(0)
        logger.record("only_excluded", 4.0, exclude="wandb")
        logger.dump(1)

    run = read_finished(run_dir)
    assert user_values(run) == [{"everywhere": 1.0, "not_in_json": 3.0}]
    assert [dict(row.values) for row in read_jsonl(run_dir / "progress.jsonl")] == [
        {"everywhere": 1.0, "not_in_wandb": 2.0},
        {"only_excluded": 4.0},
    ]


# Keys --------------------------------------------------------------------------------


def is_log_key(key: str) -> bool:
    try:
        check_key(key)
    except ValueError:
        return False
    return True


log_keys = st.one_of(
    st.text(min_size=1, max_size=12),
    st.text(min_size=1),
    st.from_regex(r"[A-Za-z0-9_\-./ ]{1,12}", fullmatch=True),
    st.text(alphabet="ab/é\x00", min_size=190, max_size=260),
).filter(is_log_key)


def wandb_takes(key: str) -> bool:
    """Whether W&B can log ``key`` as it is, also as the name of a media file.

    W&B names a media file ``<key>_<row>_<id>.<ext>``, one folder per ``/``: no NUL
    byte and no part longer than a file name may be (tracklog keeps 200 of Linux's
    255 bytes, 1000 in all). ``global_step`` is tracklog's step column.
    """
    encoded = key.encode("utf-8")
    return (
        key != "global_step"
        and b"\x00" not in encoded
        and len(encoded) <= 1000
        and all(len(part) <= 200 for part in encoded.split(b"/"))
    )


def names_by_index(run: WandbRun, count: int, dumps: int) -> dict[int, str]:
    """The history key each recorded key got, found by its values (``index * 4 + dump``)."""
    found: dict[int, str] = {}
    names = {name for row in run.rows for name in row.values} - {"global_step"}
    for name in names:
        values = [value for _, value in column(run, name)]
        assert isinstance(values[0], int), (name, values)
        index = values[0] // 4
        assert values == [index * 4 + dump for dump in range(dumps)], name
        assert index not in found, (name, found)
        found[index] = name
    assert sorted(found) == list(range(count))
    return found


@settings(max_examples=25)
@given(keys=st.lists(log_keys, min_size=1, max_size=5, unique=True))
@example(keys=["global_step", "a.b", "a/b", " padded ", "é"])
@example(keys=["a\x00b", "k" * 201, "k" * 200, "x/" * 600, "é" * 101])
def test_any_key_is_a_history_key(keys: list[str]) -> None:
    with fresh_run_dir() as run_dir:
        with wandb_logger(run_dir) as logger:
            caught_per_dump = []
            for dump in range(2):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")  # so the once-only is tracklog's doing
                    for index, key in enumerate(keys):
                        logger.record(key, index * 4 + dump)
                    logger.dump(dump)
                caught_per_dump.append(wandb_warnings(caught))
        run = read_finished(run_dir)

    assert [row.global_step for row in run.rows] == [0, 1]  # never a user's value
    names = names_by_index(run, len(keys), dumps=2)
    renamed = [key for index, key in enumerate(keys) if names[index] != key]
    assert renamed == [key for key in keys if not wandb_takes(key)]
    for name in names.values():
        assert wandb_takes(name), name
    # One warning per renamed key, in the first dump, naming the key; none later.
    first, later = caught_per_dump
    assert len(first) == len(renamed), first
    for key in renamed:
        assert any(repr(key) in message for message in first), (key, first)
    assert later == []


def test_a_key_named_global_step_does_not_clobber_the_step(run_dir: Path) -> None:
    with wandb_logger(run_dir) as logger:
        logger.record("global_step", 999)
        logger.record("loss", 0.5)
        with pytest.warns(UserWarning, match="W&B does not accept the key 'global_step'"):
            logger.dump(7)

    (row,) = read_finished(run_dir).rows
    assert row.global_step == 7
    (renamed,) = set(row.values) - {"global_step", "loss"}
    assert renamed.startswith("global_step-")
    assert row.values[renamed] == 999
    assert row.values["loss"] == 0.5


# Media -------------------------------------------------------------------------------


def media_file(run: WandbRun, key: str, kind: str) -> Path:
    """The file of the one media value ``key`` holds, checking W&B's type and folder."""
    ((_, value),) = column(run, key)
    assert isinstance(value, Mapping), value
    assert value["_type"] == kind
    path = run.media_path(value)
    assert path.is_relative_to(run.directory / "files" / "media")
    assert path.is_file()
    assert path.stat().st_size == value["size"]
    return path


@pytest.mark.parametrize("batch", [False, True], ids=["TCHW", "NTCHW"])
def test_video_is_an_mp4_of_every_frame_at_its_fps(run_dir: Path, batch: bool) -> None:
    levels = [0, 255, 60, 200, 120]
    clip = grey_clip(levels)
    frames_in = np.stack([clip, clip]) if batch else clip
    with wandb_logger(run_dir) as logger:
        logger.record("eval/video", tracklog.Video(frames_in, fps=12.5))
        logger.record("loss", 0.5)
        logger.dump(2048)

    run = read_finished(run_dir)
    path = media_file(run, "eval/video", "video-file")
    assert path.suffix == ".mp4"
    assert column(run, "loss") == [(2048, 0.5)]
    frames, rate = decode_mp4(path)
    assert len(frames) == len(levels)
    assert rate == Fraction(25, 2)
    assert frames[0].shape == (8, 12 if batch else 6, 3)
    for frame, level in zip(frames, levels, strict=True):
        assert abs(float(frame.mean()) - level) < 12


@pytest.mark.parametrize(
    ("pixels", "dataformats", "expected"),
    [
        (random_pixels((5, 7), 1), "HW", random_pixels((5, 7), 1)),
        (random_pixels((3, 5, 7), 2), "CHW", random_pixels((3, 5, 7), 2).transpose(1, 2, 0)),
        (random_pixels((5, 7, 3), 3), "HWC", random_pixels((5, 7, 3), 3)),
        (random_pixels((5, 7, 4), 4), "HWC", random_pixels((5, 7, 4), 4)),
        (
            random_pixels((2, 5, 7, 3), 5),
            "NHWC",
            np.concatenate(list(random_pixels((2, 5, 7, 3), 5)), axis=1),
        ),
    ],
    ids=["HW", "CHW", "HWC", "HWC-RGBA", "NHWC"],
)
def test_image_is_a_png_of_its_pixels(
    run_dir: Path,
    pixels: npt.NDArray[np.uint8],
    dataformats: str,
    expected: npt.NDArray[np.uint8],
) -> None:
    with wandb_logger(run_dir) as logger:
        logger.record("eval/frame", tracklog.Image(pixels, dataformats))
        logger.dump(3)

    run = read_finished(run_dir)
    path = media_file(run, "eval/frame", "image-file")
    ((_, value),) = column(run, "eval/frame")
    assert isinstance(value, Mapping)
    height, width = expected.shape[:2]
    assert (value["width"], value["height"]) == (width, height)
    with PILImage.open(path) as picture:
        assert picture.format == "PNG"
        assert picture.size == (width, height)
        assert np.array_equal(np.asarray(picture), expected)


@pytest.mark.parametrize("close", [True, False])
def test_figure_is_a_png_as_it_was_recorded(run_dir: Path, close: bool) -> None:
    figure, axes = plt.subplots(figsize=(4, 3), dpi=50)
    axes.plot([0, 1, 2], [2, 0, 1])
    with wandb_logger(run_dir) as logger:
        logger.record("plots/curve", tracklog.Figure(figure, close=close))
        figure.set_size_inches(8, 6)  # after record(): not what is logged
        logger.dump(7)

    run = read_finished(run_dir)
    path = media_file(run, "plots/curve", "image-file")  # a picture, not a plotly chart
    with PILImage.open(path) as picture:
        assert picture.format == "PNG"
        assert picture.size == (200, 150)
    assert plt.fignum_exists(figure.number) is not close
    plt.close(figure)


@pytest.mark.parametrize(
    "values",
    [
        np.array([0.5, -2.25, 1e-3, 7.0, 3.0], dtype=np.float64),
        np.arange(1000, dtype=np.int64).reshape(10, 100) ** 2,
        np.random.default_rng(0).normal(size=500).astype(np.float32),
        np.array([1.0, np.nan, -np.inf, 2.5, np.inf, -1.0]),
        np.array([True, False, True]),
        np.full(4, 3.0),
    ],
    ids=["float64", "int64", "float32", "non-finite", "bool", "constant"],
)
def test_histogram_holds_numpys_64_bins_of_the_finite_values(
    run_dir: Path, values: npt.NDArray[np.generic]
) -> None:
    with wandb_logger(run_dir) as logger:
        logger.record("weights/layer0", values)
        logger.dump(9)

    ((step, value),) = column(read_finished(run_dir), "weights/layer0")
    assert step == 9
    assert isinstance(value, Mapping)
    assert value["_type"] == "histogram"
    data = values.astype(np.float64)
    counts, edges = np.histogram(data[np.isfinite(data)], 64)
    assert value["values"] == counts.tolist()
    bins = value["bins"]
    assert isinstance(bins, list)
    assert len(bins) == 65
    for read, edge in zip(bins, edges.tolist(), strict=True):
        assert same_number(read, edge), (read, edge)


@pytest.mark.parametrize(
    "values",
    [
        np.array([1.0, 1.0 + 2.2e-16, 1.0]),  # too narrow for 64 distinct float64 edges
        np.array([-1.7e308, 0.0, 1.7e308]),  # max - min overflows float64
        np.full(3, 1e300),  # one value that NumPy's ±0.5 range cannot widen
    ],
    ids=["narrow", "wide", "constant-huge"],
)
def test_a_histogram_numpy_cannot_bucket_is_logged_in_equal_buckets_with_its_row(
    run_dir: Path, values: npt.NDArray[np.float64]
) -> None:
    with wandb_logger(run_dir) as logger:
        logger.record("weights/layer0", values)
        logger.record("loss", 0.5)
        logger.dump(3)

    run = read_finished(run_dir)
    assert column(run, "loss") == [(3, 0.5)]  # the row is not lost with its histogram
    ((step, value),) = column(run, "weights/layer0")
    assert step == 3
    assert isinstance(value, Mapping)
    assert value["_type"] == "histogram"
    bins, counts = value["bins"], value["values"]
    assert isinstance(bins, list)
    assert isinstance(counts, list)
    assert len(bins) == len(counts) + 1
    assert sum(counts) == values.size
    assert same_number(bins[0], float(values.min()))
    assert same_number(bins[-1], float(values.max()))
    assert bins == sorted(bins)


def test_histogram_without_finite_values_is_skipped_with_a_warning(run_dir: Path) -> None:
    with wandb_logger(run_dir) as logger:
        logger.record("weights/bad", np.array([np.nan, np.inf, -np.inf]))
        logger.record("weights/good", np.arange(3))
        logger.record("loss", 0.25)
        logger.dump(1)
        with pytest.warns(UserWarning, match="'weights/bad' has no finite values"):
            logger.flush()  # the histogram is converted on W&B's worker

    (row,) = read_finished(run_dir).rows
    assert set(row.values) == {"weights/good", "loss", "global_step"}
    assert row.values["loss"] == 0.25
    assert row.global_step == 1


def test_text_is_a_string_or_an_html_file(run_dir: Path) -> None:
    multi = "episode 1: <reward> & more\nepisode 2: done"
    with wandb_logger(run_dir) as logger:
        logger.record("notes/short", "one line, <b>not</b> HTML")
        logger.record("notes/long", multi)
        logger.dump(4)

    run = read_finished(run_dir)
    assert column(run, "notes/short") == [(4, "one line, <b>not</b> HTML")]
    html = media_file(run, "notes/long", "html-file").read_text(encoding="utf-8")
    assert html == "<pre>episode 1: &lt;reward&gt; &amp; more\nepisode 2: done</pre>"


def test_hparam_is_flat_config_and_summary_metrics(run_dir: Path) -> None:
    hparam = tracklog.HParam(
        NESTED_HPARAMS,
        {"eval/success": 1, "hparam/score": -0.5},
    )
    with wandb_logger(run_dir, config={"user": "me"}) as logger:
        logger.record("hparams", hparam)
        logger.record("loss", 1.5)
        logger.dump(12)

    run = read_finished(run_dir)
    assert run.config == {
        "user": "me",
        "lr": 3e-4,
        "algo": "PPO",
        "sde": False,
        "seed": None,
        "n_steps": 2048,
        "net_arch": [64, 64],  # W&B takes real lists
        "policy.activation": "tanh",
        "policy.kwargs.ortho": True,
    }
    assert run.summary["eval/success"] == 1.0
    assert run.summary["hparam/score"] == -0.5
    assert user_values(run) == [{"loss": 1.5}]  # no history entry for the HParam


@pytest.mark.parametrize(
    "key",
    ["k" * 300, "a\x00b", "../../x", "/etc/passwd", "x/" * 10 + "é" * 150, "x/" * 600 + "y"],
    ids=["long", "nul", "dotdot", "absolute", "long-part", "deep"],
)
def test_media_key_of_any_name_is_logged_in_the_run(run_dir: Path, key: str) -> None:
    # W&B names the media file after the key; a name it cannot create lost the row.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the key may be renamed, with a warning
        with wandb_logger(run_dir) as logger:
            logger.record(key, tracklog.Image(random_pixels((4, 6, 3))))
            logger.record(key + "/clip", tracklog.Video(grey_clip([0, 90, 180]), fps=3))
            logger.record(key + "/text", "two\nlines")
            logger.record("loss", 0.5)
            logger.dump(1)

    run = read_finished(run_dir)
    (row,) = run.rows
    assert row.values["loss"] == 0.5
    kinds = {}
    for value in row.values.values():
        if isinstance(value, Mapping):
            path = run.media_path(value)
            assert path.is_file()
            assert path.resolve().is_relative_to((run.directory / "files" / "media").resolve())
            kinds[value["_type"]] = path
    assert sorted(kinds) == ["html-file", "image-file", "video-file"]
    with PILImage.open(kinds["image-file"]) as picture:
        assert picture.size == (6, 4)
    assert len(decode_mp4(kinds["video-file"])[0]) == 3


def test_media_of_two_dumps_at_one_step_are_both_kept(run_dir: Path) -> None:
    with wandb_logger(run_dir) as logger:
        for length in (2, 3):
            logger.record("video", tracklog.Video(grey_clip([0] * length), fps=4))
            logger.record("image", tracklog.Image(random_pixels((4, length, 3), length)))
            logger.dump(5)

    run = read_finished(run_dir)
    videos = column(run, "video")
    images = column(run, "image")
    assert [step for step, _ in videos] == [5, 5]
    lengths = [len(decode_mp4(run.media_path(value))[0]) for _, value in videos]
    assert lengths == [2, 3]
    widths = []
    for _, value in images:
        with PILImage.open(run.media_path(value)) as picture:
            widths.append(picture.size[0])
    assert widths == [2, 3]


# Lines -------------------------------------------------------------------------------


def test_info_lines_reach_the_console_output_in_order(run_dir: Path) -> None:
    with wandb_logger(run_dir) as logger:
        logger.info("evaluation", "done")
        logger.record("a", 1)
        logger.dump(0)
        logger.warn("low reward")
        logger.debug("not at level info")
        logger.error("multi\nline")
    assert read_finished(run_dir).console == "evaluation done\nlow reward\nmulti\nline\n"


# Lifecycle ---------------------------------------------------------------------------


def test_close_finishes_the_run(run_dir: Path) -> None:
    logger = wandb_logger(run_dir)
    logger.record("a", 1)
    logger.dump(0)
    logger.flush()  # the run starts in the delivery process
    assert read_wandb_offline(run_dir).exit_code is None  # still running
    logger.close()
    run = read_finished(run_dir)
    assert run.exit_code == 0
    logger.close()  # a second close changes nothing
    assert read_finished(run_dir) == run


@pytest.mark.parametrize(("error", "exit_code"), [(ValueError, 1), (KeyboardInterrupt, 130)])
def test_run_fails_when_the_with_block_raises(
    run_dir: Path, error: type[BaseException], exit_code: int
) -> None:
    logger = wandb_logger(run_dir)
    logger.record("a", 1)
    logger.dump(0)
    with pytest.raises(error), logger:
        raise error("training blew up")
    run = read_finished(run_dir)
    assert run.exit_code == exit_code
    assert column(run, "a") == [(0, 1)]


CRASHING_SCRIPT = """
import tracklog

logger = tracklog.build_logger({{
    "run_dir": {run_dir!r},
    "outputs": [{{"type": "wandb", "project": "tests"}}],
}})
logger.record("loss", 0.5)
logger.dump(1)
raise RuntimeError("uncaught")
"""


def test_uncaught_exception_ends_the_process_run_as_failed(tmp_path: Path) -> None:
    run_dir = tmp_path / "crashed"
    script = CRASHING_SCRIPT.format(run_dir=str(run_dir))
    process = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        cwd=tmp_path,
        text=True,
        timeout=120,
        check=False,
    )
    assert process.returncode != 0, process.stderr
    assert "RuntimeError: uncaught" in process.stderr
    run = read_finished(run_dir)
    assert run.exit_code not in (None, 0), process.stderr
    assert column(run, "loss") == [(1, 0.5)]


def test_a_finish_that_hangs_is_abandoned_after_the_timeout(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The output as the delivery process holds it (its run.finish is what hangs).
    output = tracklog.WandBOutputFormat(
        WandbOutput(project="tests", finish_timeout=0.5), run_dir=run_dir
    )
    real_finish = output.run.finish
    finished = threading.Event()
    errors: list[BaseException] = []

    def slow_finish(exit_code: int | None = None) -> None:
        try:
            time.sleep(3)  # the fault: a W&B service that takes seconds to answer
            real_finish(exit_code=exit_code)
        except BaseException as error:  # seen by the test, not lost in a daemon thread
            errors.append(error)
        finally:
            finished.set()

    monkeypatch.setattr(output.run, "finish", slow_finish)
    output.write_row(Row(step=0, timestamp=time.time(), seq=0, values={"a": Scalar(1)}))
    started = time.monotonic()
    with pytest.warns(UserWarning, match="did not finish the run within 0.5 s") as caught:
        output.close()
    assert time.monotonic() - started < 0.5 + 1.5
    (message,) = [str(w.message) for w in caught if "W&B" in str(w.message)]
    offline_dir = wandb_file(run_dir).parent
    assert f"wandb sync {offline_dir}" in message

    # The abandoned finish still completes the run when W&B answers at last. Offline,
    # run.finish() can return before W&B's service wrote the exit record (close() waits
    # for it; this abandoned finish has no one waiting), so the file is polled for it.
    assert finished.wait(30)
    assert errors == []
    deadline = time.monotonic() + 30
    while read_wandb_offline(run_dir).exit_code is None and time.monotonic() < deadline:
        time.sleep(0.1)
    run = read_finished(run_dir)
    assert column(run, "a") == [(0, 1)]
    assert run.exit_code == 0


def test_two_loggers_in_one_process_are_two_runs(run_dir: Path) -> None:
    first = wandb_logger(run_dir, name="first")
    second = wandb_logger(run_dir, name="second")
    for step in range(3):
        first.record("loss", step + 0.5)
        first.dump(step)
        second.record("reward", step * 10)
        second.dump(step * 100)
    first.close()
    second.close()

    # Each in a run_dir of its own: the second takes the next version of it.
    assert second.get_dir() == f"{run_dir}_2"
    runs = {}
    for folder in sorted((run_dir.parent).glob("run*/wandb/offline-run-*")):
        run = read_finished(folder)
        (record,) = raw_records(next(folder.glob("run-*.wandb")), "run")
        runs[record.run.display_name] = run
    assert sorted(runs) == ["first", "second"]
    assert runs["first"].run_id != runs["second"].run_id
    assert user_values(runs["first"]) == [{"loss": 0.5}, {"loss": 1.5}, {"loss": 2.5}]
    assert column(runs["second"], "reward") == [(0, 0), (100, 10), (200, 20)]
    assert runs["first"].exit_code == runs["second"].exit_code == 0


def test_the_offline_run_is_what_wandb_sync_would_upload(run_dir: Path) -> None:
    cli = Path(sys.executable).parent / "wandb"
    if not cli.is_file():
        pytest.skip("no wandb command next to this Python")
    with wandb_logger(run_dir) as logger:
        logger.record("a", 1)
        logger.dump(0)
    log = wandb_file(run_dir)
    environment = {k: v for k, v in os.environ.items() if k != "WANDB_SILENT"}
    listed = subprocess.run(
        [str(cli), "sync", "--dry-run", str(log.parent)],
        capture_output=True,
        text=True,
        env=environment,
        cwd=run_dir,
        timeout=120,
        check=True,
    )
    output = listed.stdout + listed.stderr
    assert "Would sync 1 run(s)" in output, output
    assert log.name in output, output
    # What it would upload, record by record, parsed with W&B's own protobuf classes: the
    # run, one history row (a = 1 at global_step 0), and the exit record last.
    record_class = importlib.import_module("wandb.proto.wandb_internal_pb2").Record
    kinds, rows = [], []
    for payload in wandb_records(log):
        record = record_class()
        record.ParseFromString(payload)
        kinds.append(record.WhichOneof("record_type"))
        if kinds[-1] == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    assert "run" in kinds
    assert kinds[-1] == "exit", kinds
    assert [(row.get("global_step"), row.get("a")) for row in rows] == [(0, 1)], rows


# The reader --------------------------------------------------------------------------


def test_reader_takes_the_file_the_run_folder_or_its_parent(run_dir: Path) -> None:
    with wandb_logger(run_dir) as logger:
        logger.record("a", 1.5)
        logger.dump(3)
    log = wandb_file(run_dir)
    runs = [read_finished(run_dir)]
    runs += [read_wandb_offline(path) for path in (log, log.parent, str(run_dir))]
    assert all(run == runs[0] for run in runs)
    assert runs[0].directory == log.parent
    assert column(runs[0], "a") == [(3, 1.5)]


def test_reader_refuses_what_is_not_a_wandb_log(tmp_path: Path) -> None:
    not_a_log = tmp_path / "run-x.wandb"
    not_a_log.write_bytes(b"PK\x03\x04 something else")
    with pytest.raises(ValueError, match="not a W&B transaction log"):
        read_wandb_offline(not_a_log)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="found 0"):
        read_wandb_offline(empty)


def record_spans(data: bytes, payloads: Sequence[bytes]) -> list[tuple[int, int] | None]:
    """Where each record lies in the file, for the records stored in one piece."""
    spans: list[tuple[int, int] | None] = []
    position = 7
    for payload in payloads:
        found = data.find(payload, position)
        if found < 0:  # spread over several blocks
            spans.append(None)
            continue
        spans.append((found - 7, found + len(payload)))  # from its 7-byte header
        position = found + len(payload)
    return spans


def test_a_cut_off_log_still_reads_every_complete_record(run_dir: Path, tmp_path: Path) -> None:
    big = "x" * 100_000  # one history record over four 32 KiB blocks
    with wandb_logger(run_dir) as logger:
        for step in range(3):
            logger.record("loss", step + 0.5)
            logger.dump(step)
        logger.record("big", big)
        logger.dump(3)
        logger.record("loss", 9.5)
        logger.dump(4)
    log = wandb_file(run_dir)
    full = read_finished(log)
    data = log.read_bytes()
    payloads = wandb_records(log)
    assert [row.global_step for row in full.rows] == [0, 1, 2, 3, 4]
    assert column(full, "big") == [(3, big)]

    cut = tmp_path / "run-cut.wandb"

    def records_up_to(length: int) -> list[bytes]:
        cut.write_bytes(data[:length])
        return wandb_records(cut)

    spans = record_spans(data, payloads)
    whole = [(index, span) for index, span in enumerate(spans) if span is not None]
    spread = [index for index, span in enumerate(spans) if span is None]
    assert spread  # the big row (and the summary holding it too)
    for index, (start, end) in whole[:: max(1, len(whole) // 12)] + whole[-2:]:
        assert records_up_to(end) == payloads[: index + 1]
        assert records_up_to(end - 1) == payloads[:index]  # cut in its data
        assert records_up_to(start + 3) == payloads[:index]  # cut in its header

    # Cut anywhere inside a record spread over blocks: the records before it remain.
    first = spread[0]
    start = data.find(payloads[first][:1000])
    for length in (start + 10, start + 40_000, start + len(payloads[first])):
        assert records_up_to(length) == payloads[:first]
    partial = read_wandb_offline(cut)
    assert [row.global_step for row in partial.rows] == [0, 1, 2]
    assert partial.exit_code is None


@pytest.fixture(scope="module")
def finished_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run's .wandb file: small records, and one spread over blocks."""
    run_dir = tmp_path_factory.mktemp("tail")
    with wandb_logger(run_dir) as logger:
        for step in range(40):
            logger.record("loss", step + 0.5)
            if step == 20:
                logger.record("big", "y" * 70_000)  # over three 32 KiB blocks
            logger.dump(step)
    return wandb_file(run_dir)


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(0, 10**6), max_size=12))
def test_reading_a_growing_log_as_it_grows_gives_every_record_once(
    finished_log: Path, cuts: list[int]
) -> None:
    """W&B's service writes the file piece by piece while tracklog's flush() reads it:
    reads at any points of its growth give each record once, in order, when whole."""
    data = finished_log.read_bytes()
    with fresh_run_dir() as folder:
        folder.mkdir(parents=True, exist_ok=True)
        log = folder / "run-growing.wandb"
        log.write_bytes(b"")
        tail = WandbLogTail(log)
        read: list[bytes] = []
        for cut in [*sorted({min(cut, len(data)) for cut in cuts}), len(data)]:
            with open(log, "ab") as file:
                file.write(data[log.stat().st_size : cut])
            got = tail.read()
            assert got == wandb_records(log)[len(read) :]  # what is whole by now, no more
            read += got
        assert read == wandb_records(log)
        assert tail.read() == []


def test_rows_are_in_the_run_file_within_a_second_and_at_once_after_flush(
    run_dir: Path,
) -> None:
    with wandb_logger(run_dir) as logger:
        logger.record("loss", 0.5)
        logger.dump(0)
        assert logger.flush(60)  # the run has started, in the delivery process
        for step in range(1, 4):
            logger.record("loss", step + 0.5)
            dumped = time.monotonic()
            logger.dump(step)
            while step not in [row.global_step for row in read_wandb_offline(run_dir).rows]:
                assert time.monotonic() - dumped < 1.0, f"row {step} not in the file after 1 s"
                time.sleep(0.01)
        for step in range(4, 30):
            logger.record("loss", step + 0.5)
            logger.dump(step)
        assert logger.flush(60)
        run = read_wandb_offline(run_dir)  # at once: no waiting here
        assert column(run, "loss") == [(step, step + 0.5) for step in range(30)]


def test_a_flipped_byte_fails_the_checksum(run_dir: Path, tmp_path: Path) -> None:
    with wandb_logger(run_dir) as logger:
        logger.record("loss", 0.123456789)
        logger.dump(0)
    read_finished(run_dir)
    data = bytearray(wandb_file(run_dir).read_bytes())
    where = data.find(b"0.123456789")
    assert where > 0
    data[where + 4] ^= 0x01  # 0.122456789: still a valid protobuf, a different number
    damaged = tmp_path / "run-damaged.wandb"
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"record at byte \d+ fails its checksum"):
        read_wandb_offline(damaged)


def test_close_returns_only_when_the_whole_run_is_on_disk(tmp_path: Path) -> None:
    # W&B's service writes the last block of the .wandb file after finish() returns.
    for attempt in range(8):
        run_dir = tmp_path / f"run{attempt}"
        with wandb_logger(run_dir) as logger:
            logger.record("x", attempt)
            logger.dump(attempt)
        run = read_wandb_offline(run_dir)
        assert run.exit_code == 0
        assert [row.values["x"] for row in run.rows] == [attempt]


HUNG_SERVICE_SCRIPT = """
import os, signal, time, warnings
os.environ["WANDB_SILENT"] = "true"
import tracklog

logger = tracklog.build_logger({{"run_dir": {run_dir!r}, "outputs": [
    {{"type": "wandb", "project": "tests", "finish_timeout": 2}}]}})
logger.record("x", 1.0)
logger.dump(0)
logger.flush()
# W&B's service runs under tracklog's delivery process, which hosts the W&B run.
import psutil
from tracklog._service import service as delivery
service = next(
    child for child in psutil.Process(delivery().pid).children(recursive=True)
    if "wandb" in " ".join(child.cmdline())
)
os.kill(service.pid, signal.SIGSTOP)  # the fault: W&B's service stops answering
print(service.pid, flush=True)
start = time.monotonic()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    logger.close()
print(round(time.monotonic() - start, 1), [str(w.message) for w in caught], flush=True)
"""


def test_a_hung_wandb_service_never_hangs_the_process(tmp_path: Path) -> None:
    script = HUNG_SERVICE_SCRIPT.format(run_dir=str(tmp_path / "run"))
    # Without this process's W&B service address, so the child starts (and owns) its own.
    env = {name: value for name, value in os.environ.items() if name != "WANDB_SERVICE"}
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    try:
        stdout, stderr = process.communicate(timeout=60)  # W&B alone waits forever
    finally:
        if process.poll() is None:
            process.kill()
    assert stdout, stderr
    service_pid = int(stdout.split()[0])
    with contextlib.suppress(ProcessLookupError):
        os.kill(service_pid, 9)  # in case tracklog did not
    assert "wandb sync" in stdout, stderr
    assert float(stdout.splitlines()[1].split()[0]) < 10


def test_the_reader_takes_the_newest_session_of_a_resumed_offline_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with wandb_logger(run_dir, id="resumed1") as logger:
        logger.record("x", 1.0)
        logger.dump(10)
    with wandb_logger(run_dir, id="resumed1", resume="allow") as logger:
        logger.record("x", 2.0)
        logger.dump(5)  # the resumed session goes back in steps
    sessions = sorted(run_dir.glob("wandb/offline-run-*"))
    assert len(sessions) == 2  # W&B starts a folder per session
    assert [row.global_step for row in read_wandb_offline(run_dir).rows] == [5]
    assert [row.global_step for row in read_wandb_offline(sessions[0]).rows] == [10]


def test_a_zero_filled_tail_is_a_cut_off_record_not_corruption(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with wandb_logger(run_dir) as logger:
        for step in range(3):
            logger.record("x", float(step))
            logger.dump(step)
    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = log.read_bytes()
    cut = tmp_path / "cut.wandb"
    cut.write_bytes(data[: len(data) // 2] + bytes(5000))  # what a power loss can leave
    whole = wandb_records(log)
    kept = wandb_records(cut)  # no error: the records before the zeros are read
    assert 0 < len(kept) < len(whole)
    assert kept == whole[: len(kept)]  # each one whole, in order, none invented
    plain_cut = tmp_path / "plain-cut.wandb"
    plain_cut.write_bytes(data[: len(data) // 2])
    assert wandb_records(plain_cut) == kept  # zeros after a cut change nothing
