"""The Logger: SB3 compatibility, exclude, record_mean, levels, lifetime and extension points."""

from __future__ import annotations

import csv
import json
import math
import re
import struct
import tempfile
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from stable_baselines3 import PPO
from stable_baselines3.common import logger as sb3

import tracklog
from tracklog import HParam, Image, Video

_ALL_OUTPUTS: list[dict[str, object]] = [
    {"type": "console"},
    {"type": "file"},
    {"type": "jsonl"},
    {"type": "csv"},
]


def _build(run_dir: Path, level: str = "info") -> tracklog.Logger:
    return tracklog.build_logger({"run_dir": str(run_dir), "level": level, "outputs": _ALL_OUTPUTS})


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def _table_keys(text: str) -> set[str]:
    """The keys shown in the first column of the human-readable tables in ``text``."""
    return set(re.findall(r"^\| (\S+) +\|", text, flags=re.MULTILINE))


def _bits(value: float) -> bytes:
    return struct.pack("<d", value)


class _Capture(sb3.KVWriter, sb3.SeqWriter):
    """An SB3-style output format, written the way the seed project documents."""

    def __init__(self) -> None:
        self.rows: list[tuple[dict[str, Any], dict[str, tuple[str, ...]], int]] = []
        self.sequences: list[list[str]] = []
        self.closed = 0

    def write(
        self, key_values: dict[str, Any], key_excluded: dict[str, tuple[str, ...]], step: int = 0
    ) -> None:
        self.rows.append((dict(key_values), dict(key_excluded), step))

    def write_sequence(self, sequence: list[str]) -> None:
        self.sequences.append(list(sequence))

    def close(self) -> None:
        self.closed += 1


# SB3 compatibility -------------------------------------------------------------------


def test_a_tracklog_logger_is_an_sb3_logger(run_dir: Path) -> None:
    assert issubclass(tracklog.Logger, sb3.Logger)
    with _build(run_dir) as logger:
        assert isinstance(logger, sb3.Logger)
        assert logger.get_dir() == str(run_dir)
        assert logger.level == sb3.INFO


@pytest.mark.slow
def test_ppo_logs_through_tracklog(run_dir: Path) -> None:
    env = gym.make("CartPole-v1")
    logger = tracklog.build_logger(
        {"run_dir": str(run_dir), "outputs": [{"type": "jsonl"}, {"type": "csv"}, {"type": "file"}]}
    )
    model = PPO("MlpPolicy", env, n_steps=64, batch_size=32, n_epochs=1, seed=0, device="cpu")
    model.set_logger(logger)
    assert model.logger is logger
    model.learn(total_timesteps=128)
    logger.close()
    env.close()

    rows = _jsonl(run_dir / "progress.jsonl")
    assert [row["_step"] for row in rows] == [64, 128]
    assert rows[-1]["_step"] == model.num_timesteps
    assert all(row["time/total_timesteps"] == row["_step"] for row in rows)
    frame = pd.read_json(run_dir / "progress.jsonl", lines=True)
    assert frame["_step"].tolist() == [64, 128]
    assert {"rollout/ep_rew_mean", "time/fps", "train/loss", "train/n_updates"} <= set(
        frame.columns
    )
    assert frame["rollout/ep_rew_mean"].gt(0).all()
    assert math.isfinite(frame["train/loss"].iloc[-1])
    assert frame["train/n_updates"].iloc[-1] == 1
    table = pd.read_csv(run_dir / "progress.csv")
    assert table["_step"].tolist() == [64, 128]
    assert table["train/loss"].iloc[-1] == frame["train/loss"].iloc[-1]
    assert "ep_rew_mean" in (run_dir / "train.log").read_text(encoding="utf-8")


# exclude ------------------------------------------------------------------------------


def test_exclude_removes_a_key_from_that_output_only(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = ("stdout", "log", "json", "csv")
    with _build(run_dir) as logger:
        for name in names:
            logger.record(f"no_{name}", 1.0, exclude=name)
        logger.record("no_json_no_csv", 2.0, exclude=("json", "csv"))
        logger.record("everywhere", 3.0, exclude=("tensorboard", "mlflow", "wandb"))
        logger.record("plain", 4.0, exclude=None)
        logger.dump(step=1)
    every = {f"no_{name}" for name in names} | {"no_json_no_csv", "everywhere", "plain"}
    shown = {
        "stdout": _table_keys(capsys.readouterr().out),
        "log": _table_keys((run_dir / "train.log").read_text(encoding="utf-8")),
        "json": set(_jsonl(run_dir / "progress.jsonl")[0]) - {"_step", "_timestamp"},
        "csv": set(pd.read_csv(run_dir / "progress.csv").columns) - {"_step", "_timestamp"},
    }
    for name in names:
        lost = {f"no_{name}"} | ({"no_json_no_csv"} if name in ("json", "csv") else set())
        assert shown[name] == every - lost, name


def test_exclude_must_be_str_or_tuple(run_dir: Path) -> None:
    with _build(run_dir) as logger, pytest.raises(TypeError, match="exclude must be a str"):
        logger.record("k", 1.0, exclude=["json"])  # type: ignore[arg-type]  # a list is the error under test


# record_mean --------------------------------------------------------------------------

_NUMBERS = st.one_of(st.floats(), st.integers(-(2**53), 2**53))


@given(st.lists(_NUMBERS, min_size=1, max_size=30))
def test_record_mean_is_bit_identical_to_sb3(values: list[float]) -> None:
    reference = sb3.Logger(folder=None, output_formats=[])
    for value in values:
        reference.record_mean("mean", value)
    expected = reference.name_to_value["mean"]
    with tempfile.TemporaryDirectory() as directory:
        with tracklog.build_logger(
            {"run_dir": directory, "outputs": [{"type": "jsonl"}]}
        ) as logger:
            for value in values:
                logger.record_mean("mean", value)
            logger.dump(step=3)
        (row,) = _jsonl(Path(directory) / "progress.jsonl")
    got = row["mean"]
    assert isinstance(got, float)
    if math.isnan(expected):
        assert math.isnan(got)
    else:
        assert _bits(got) == _bits(expected)


@given(
    st.lists(
        st.tuples(st.sampled_from(["record", "mean"]), st.one_of(_NUMBERS, st.none())),
        min_size=1,
        max_size=20,
    )
)
def test_record_and_record_mean_interleaved_match_sb3(
    calls: list[tuple[str, float | None]],
) -> None:
    reference = sb3.Logger(folder=None, output_formats=[])
    with tempfile.TemporaryDirectory() as directory:
        with tracklog.build_logger(
            {"run_dir": directory, "outputs": [{"type": "jsonl"}]}
        ) as logger:
            for method, value in calls:
                if method == "mean":
                    logger.record_mean("k", value)
                    reference.record_mean("k", value)
                elif value is not None:
                    logger.record("k", value)
                    reference.record("k", value)
            logger.dump(step=1)
        rows = _jsonl(Path(directory) / "progress.jsonl")
    if "k" not in reference.name_to_value:
        assert rows == []
        return
    expected = float(reference.name_to_value["k"])
    got = float(rows[0]["k"])
    assert _bits(got) == _bits(expected) or (math.isnan(got) and math.isnan(expected))


@pytest.mark.parametrize(
    ("calls", "expected"),
    [
        # record, then record_mean: SB3 starts the average afresh (its count was 0).
        ([("record", 5.0), ("mean", 1.0), ("mean", 2.0)], 1.5),
        # record_mean, then record: the recorded value wins.
        ([("mean", 1.0), ("mean", 3.0), ("record", 10.0)], 10.0),
        # ... and counts as the mean of the calls so far: (10 * 1 + 4) / 2.
        ([("mean", 1.0), ("record", 10.0), ("mean", 4.0)], 7.0),
        ([("mean", 1.0), ("mean", None), ("mean", 2.0), ("mean", None)], 1.5),
        ([("mean", 0.1), ("mean", 0.2), ("mean", 0.3)], None),
    ],
)
def test_record_and_record_mean_combine_as_in_sb3(
    run_dir: Path, calls: list[tuple[str, float | None]], expected: float | None
) -> None:
    reference = sb3.Logger(folder=None, output_formats=[])
    with tracklog.build_logger({"run_dir": str(run_dir), "outputs": [{"type": "jsonl"}]}) as logger:
        for method, value in calls:
            if method == "record":
                assert value is not None
                logger.record("k", value)
                reference.record("k", value)
            else:
                logger.record_mean("k", value)
                reference.record_mean("k", value)
        logger.dump(step=1)
    got = _jsonl(run_dir / "progress.jsonl")[0]["k"]
    assert _bits(got) == _bits(reference.name_to_value["k"])
    if expected is not None:
        assert got == expected


def test_record_mean_none_is_ignored(run_dir: Path) -> None:
    with tracklog.build_logger({"run_dir": str(run_dir), "outputs": [{"type": "jsonl"}]}) as logger:
        logger.record_mean("only_none", None)
        logger.record_mean("k", 4.0)
        logger.dump(step=1)
    (row,) = _jsonl(run_dir / "progress.jsonl")
    assert set(row) == {"_step", "_timestamp", "k"}


def test_record_mean_restarts_after_each_dump(run_dir: Path) -> None:
    with tracklog.build_logger({"run_dir": str(run_dir), "outputs": [{"type": "jsonl"}]}) as logger:
        for value in (1.0, 3.0):
            logger.record_mean("k", value)
        logger.dump(step=1)
        logger.record_mean("k", 10.0)
        logger.dump(step=2)
    assert [row["k"] for row in _jsonl(run_dir / "progress.jsonl")] == [2.0, 10.0]


@pytest.mark.parametrize(
    "value", ["text", np.array([1.0, 2.0]), Video(np.zeros((2, 3, 4, 4), np.uint8), fps=30)]
)
def test_record_mean_needs_a_number(run_dir: Path, value: Any) -> None:
    with (
        _build(run_dir) as logger,
        pytest.raises(TypeError, match=r"record_mean\('k'\) needs a number"),
    ):
        logger.record_mean("k", value)


def test_record_mean_rejects_what_record_rejects(run_dir: Path) -> None:
    with _build(run_dir) as logger, pytest.raises(TypeError, match="cannot log 'k'"):
        logger.record_mean("k", 1j)  # type: ignore[arg-type]  # the complex is the error under test


# Pending values and dump --------------------------------------------------------------


def test_a_later_record_replaces_and_dump_clears(run_dir: Path) -> None:
    with tracklog.build_logger({"run_dir": str(run_dir), "outputs": [{"type": "jsonl"}]}) as logger:
        logger.record("a", 1.0)
        logger.record("a", 2.0)
        logger.record("b", "x")
        logger.dump(step=np.int64(10))  # type: ignore[arg-type]  # NumPy ints are accepted at run time
        logger.record("c", 3)
        logger.dump(step=20)
        logger.dump(step=30)  # nothing pending: no row
    rows = _jsonl(run_dir / "progress.jsonl")
    assert [{k: v for k, v in row.items() if k != "_timestamp"} for row in rows] == [
        {"_step": 10, "a": 2.0, "b": "x"},
        {"_step": 20, "c": 3},
    ]
    assert type(rows[0]["_step"]) is int


@pytest.mark.parametrize("step", [1.5, "3", None, True, 2.0])
def test_dump_step_must_be_an_int(run_dir: Path, step: Any) -> None:
    with _build(run_dir) as logger:
        logger.record("k", 1.0)
        with pytest.raises(TypeError, match="dump step must be an int"):
            logger.dump(step=step)
        logger.dump(step=4)  # the values are still pending after the rejected dump
    assert _jsonl(run_dir / "progress.jsonl")[0]["_step"] == 4


# Levels -------------------------------------------------------------------------------


def test_info_lines_reach_console_and_train_log(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with _build(run_dir) as logger:
        logger.info("evaluation done:", 3, 0.5)
        logger.record("k", 1.0)
        logger.dump(step=1)
        logger.info("after dump")
    console = capsys.readouterr().out
    log = (run_dir / "train.log").read_text(encoding="utf-8")
    for text in (console, log):
        lines = text.splitlines()
        assert lines[0] == "evaluation done: 3 0.5"
        assert lines[-1] == "after dump"
        assert _table_keys(text) == {"k"}
    assert _jsonl(run_dir / "progress.jsonl")[0]["k"] == 1.0  # and not the info lines


def _say_everything(logger: tracklog.Logger, tag: str) -> None:
    logger.debug(f"debug-{tag}")
    logger.info(f"info-{tag}")
    logger.warn(f"warn-{tag}")
    logger.error(f"error-{tag}")


@pytest.mark.parametrize(
    ("level", "shown"),
    [
        ("debug", ["debug", "info", "warn", "error"]),
        ("info", ["info", "warn", "error"]),
        ("warn", ["warn", "error"]),
        ("error", ["error"]),
        ("disabled", []),
    ],
)
def test_level_from_settings(
    run_dir: Path, capsys: pytest.CaptureFixture[str], level: str, shown: list[str]
) -> None:
    with _build(run_dir, level=level) as logger:
        _say_everything(logger, "x")
    expected = [f"{name}-x" for name in shown]
    assert capsys.readouterr().out.splitlines() == expected
    assert (run_dir / "train.log").read_text(encoding="utf-8").splitlines() == expected


def test_set_level(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with _build(run_dir) as logger:
        _say_everything(logger, "1")
        logger.set_level(sb3.DEBUG)
        _say_everything(logger, "2")
        logger.set_level(sb3.ERROR)
        _say_everything(logger, "3")
    expected = ["info-1", "warn-1", "error-1", "debug-2", "info-2", "warn-2", "error-2", "error-3"]
    assert capsys.readouterr().out.splitlines() == expected
    assert (run_dir / "train.log").read_text(encoding="utf-8").splitlines() == expected


def test_disabled_dumps_nothing_and_drops_what_was_pending(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with _build(run_dir) as logger:
        logger.set_level(sb3.DISABLED)
        logger.record("while_disabled", 1.0)
        logger.record_mean("mean_while_disabled", 1.0)
        logger.dump(step=1)
        logger.set_level(sb3.INFO)
        logger.record("after", 2.0)
        logger.record_mean("mean_while_disabled", 5.0)
        logger.dump(step=2)
    rows = _jsonl(run_dir / "progress.jsonl")
    assert [(row["_step"], set(row) - {"_step", "_timestamp"}) for row in rows] == [
        (2, {"after", "mean_while_disabled"})
    ]
    assert rows[0]["mean_while_disabled"] == 5.0
    assert [row["_step"] for row in _csv(run_dir / "progress.csv")] == ["2"]
    assert _table_keys(capsys.readouterr().out) == {"after", "mean_while_disabled"}


def test_disabled_in_settings_writes_no_rows(run_dir: Path) -> None:
    with _build(run_dir, level="disabled") as logger:
        logger.record("k", 1.0)
        logger.dump(step=1)
    assert (run_dir / "progress.jsonl").read_text(encoding="utf-8") == ""
    assert (run_dir / "train.log").read_text(encoding="utf-8") == ""


# Lifetime -----------------------------------------------------------------------------


def test_context_manager_closes_every_output(run_dir: Path) -> None:
    capture = _Capture()
    with _build(run_dir) as logger:
        logger.output_formats.append(capture)
        logger.record("k", 1.0)
        logger.dump(step=1)
    assert capture.closed == 1
    with pytest.raises(RuntimeError, match="closed"):
        logger.record("k", 2.0)
    assert [row["k"] for row in _jsonl(run_dir / "progress.jsonl")] == [1.0]


def _crash_while_logging(run_dir: Path, capture: _Capture) -> None:
    with _build(run_dir) as logger:
        logger.output_formats.append(capture)
        raise KeyError("training crashed")


def test_context_manager_closes_on_error(run_dir: Path) -> None:
    capture = _Capture()
    with pytest.raises(KeyError, match="training crashed"):
        _crash_while_logging(run_dir, capture)
    assert capture.closed == 1


def test_close_is_idempotent(run_dir: Path) -> None:
    capture = _Capture()
    logger = _build(run_dir)
    logger.output_formats.append(capture)
    logger.record("k", 1.0)
    logger.dump(step=1)
    logger.close()
    logger.close()
    with logger:
        pass
    assert capture.closed == 1
    assert [row["k"] for row in _jsonl(run_dir / "progress.jsonl")] == [1.0]


def test_record_and_dump_after_close_raise(run_dir: Path) -> None:
    logger = _build(run_dir)
    logger.record("pending", 1.0)
    logger.close()
    with pytest.raises(RuntimeError, match="this tracklog Logger is closed"):
        logger.record("k", 1.0)
    with pytest.raises(RuntimeError, match="closed"):
        logger.record_mean("k", 1.0)
    with pytest.raises(RuntimeError, match="closed"):
        logger.dump(step=2)
    assert (run_dir / "progress.jsonl").read_text(encoding="utf-8") == ""


# Extension points ---------------------------------------------------------------------


def test_an_appended_sb3_writer_gets_what_sb3_would_give_it(run_dir: Path) -> None:
    capture = _Capture()
    video = Video(np.zeros((2, 3, 4, 4), np.uint8), fps=30)
    image = Image(np.zeros((4, 4, 3), np.uint8))
    hparam = HParam({"lr": 0.1}, {"reward": 0.0})
    with _build(run_dir) as logger:
        logger.output_formats.append(capture)
        logger.record("float", np.float32(0.5), exclude="json")
        logger.record("int", np.int64(3), exclude=("csv", "log"))
        logger.record("bool", True)
        logger.record("text", "hello")
        logger.record("array", np.arange(3.0))
        logger.record("tensor", torch.tensor([1.0, 2.0]))
        logger.record("video", video, exclude="stdout")
        logger.record("sb3_video", sb3.Video(torch.zeros((2, 3, 4, 4)), fps=10))
        logger.record("image", image)
        logger.record("hparam", hparam)
        logger.dump(step=7)
        logger.info("hello", "world")
    ((values, excluded, step),) = capture.rows
    assert step == 7
    assert type(values["float"]) is float
    assert values["float"] == 0.5
    assert type(values["int"]) is int
    assert values["bool"] is True
    assert values["text"] == "hello"
    assert isinstance(values["array"], np.ndarray)
    np.testing.assert_array_equal(values["array"], [0.0, 1.0, 2.0])
    assert isinstance(values["tensor"], np.ndarray)
    np.testing.assert_array_equal(values["tensor"], [1.0, 2.0])
    assert values["video"] is video
    assert isinstance(values["sb3_video"], sb3.Video)
    assert values["sb3_video"].frames.shape == (1, 2, 3, 4, 4)
    assert isinstance(values["image"], sb3.Image)
    assert isinstance(values["hparam"], sb3.HParam)
    assert excluded["float"] == ("json",)
    assert excluded["int"] == ("csv", "log")
    assert excluded["text"] == ("",)  # what SB3's Logger passes for exclude=None
    assert capture.sequences == [["hello", "world"]]


def test_sb3_own_output_formats_can_be_appended(run_dir: Path) -> None:
    with _build(run_dir) as logger:
        logger.output_formats.append(sb3.JSONOutputFormat(str(run_dir / "sb3.json")))
        logger.output_formats.append(sb3.CSVOutputFormat(str(run_dir / "sb3.csv")))
        logger.record("loss", 0.25)
        logger.record("n", 4)
        logger.record("hist", np.array([1.0, 2.0]), exclude="csv")
        logger.record("only_ours", 1.0, exclude=("json", "csv"))
        logger.dump(step=5)
    (row,) = _jsonl(run_dir / "sb3.json")
    assert row == {"loss": 0.25, "n": 4, "hist": [1.0, 2.0]}
    table = pd.read_csv(run_dir / "sb3.csv")
    assert table.to_dict("records") == [{"loss": 0.25, "n": 4}]


def test_tracklog_formats_work_inside_sb3_own_logger(run_dir: Path) -> None:
    plain = sb3.Logger(
        folder=str(run_dir),
        output_formats=[
            tracklog.JsonlOutputFormat(run_dir / "progress.jsonl"),
            tracklog.CsvOutputFormat(run_dir / "progress.csv"),
            tracklog.FixedHumanOutputFormat(run_dir / "train.log"),
        ],
    )
    plain.record("a", 1.5)
    plain.record("b", np.float32(0.25), exclude="json")
    plain.record("clip", sb3.Video(torch.zeros((2, 3, 4, 4), dtype=torch.uint8), fps=5))
    plain.record_mean("m", 1.0)
    plain.record_mean("m", 2.0)
    plain.dump(step=9)
    plain.info("hello from sb3")
    plain.close()

    (row,) = _jsonl(run_dir / "progress.jsonl")
    assert row["_step"] == 9
    assert (row["a"], row["m"]) == (1.5, 1.5)
    assert "b" not in row
    assert (run_dir / row["clip"]).stat().st_size > 0
    (csv_row,) = _csv(run_dir / "progress.csv")
    assert float(csv_row["b"]) == 0.25
    log = (run_dir / "train.log").read_text(encoding="utf-8")
    assert _table_keys(log) == {"a", "b", "clip", "m"}
    assert "<video 1x2x3x4x4 @5fps>" in log
    assert log.splitlines()[-1] == "hello from sb3"


@given(
    st.lists(
        st.lists(
            st.tuples(
                st.sampled_from(["a", "b/c", "d"]),
                st.one_of(_NUMBERS, st.integers(-(2**40), 2**40), st.text(max_size=3)),
                st.sampled_from([None, "json", ("csv", "json")]),
            ),
            max_size=6,
        ),
        min_size=1,
        max_size=4,
    )
)
def test_repeated_records_reach_outputs_as_sb3_would_give_them(
    dumps: list[list[tuple[str, float | int | str, str | tuple[str, ...] | None]]],
) -> None:
    # Later dumps of known keys take record()'s fast path for floats: exclusions of an
    # earlier record of the same key must not stick, and every value must arrive.
    reference, ours = _Capture(), _Capture()
    sb3_logger = sb3.Logger(folder=None, output_formats=[reference])
    with tempfile.TemporaryDirectory() as directory:
        with tracklog.build_logger(
            {"run_dir": directory, "outputs": [{"type": "jsonl"}, {"type": "csv"}]}
        ) as logger:
            logger.output_formats.append(ours)
            for step, records in enumerate(dumps):
                for key, value, exclude in records:
                    logger.record(key, value, exclude=exclude)
                    sb3_logger.record(key, value, exclude=exclude)
                logger.dump(step)
                sb3_logger.dump(step)
        jsonl = _jsonl(Path(directory) / "progress.jsonl")
        table = _csv(Path(directory) / "progress.csv")
    wanted = [row for row in reference.rows if row[0]]  # tracklog skips an empty dump
    assert len(ours.rows) == len(wanted)
    for (got, got_excluded, got_step), (want, want_excluded, want_step) in zip(
        ours.rows, wanted, strict=True
    ):
        assert got_step == want_step
        assert got_excluded == {k: v or ("",) for k, v in want_excluded.items()}
        assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in want.items()}
        assert all(_same(got[k], want[k]) for k in want)
    rows = iter(zip(jsonl, table, strict=True))
    for want, want_excluded, step in wanted:
        json_row, csv_row = next(rows)
        assert json_row["_step"] == step == int(csv_row["_step"])
        for key, value in want.items():
            in_json = "json" not in want_excluded[key]
            assert (key in json_row) == in_json
            if in_json:
                assert _same(json_row[key], value)
            in_csv = "csv" not in want_excluded[key]
            assert (csv_row.get(key, "") != "") == (in_csv and value != "")
    assert next(rows, None) is None


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b and type(a) is type(b)
