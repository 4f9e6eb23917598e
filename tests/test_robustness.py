"""A failing output, odd values and interrupted files never cost the data already recorded."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydantic
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from stable_baselines3 import DQN, PPO, SAC
from stable_baselines3.common import logger as sb3
from stable_baselines3.common.logger import TensorBoardOutputFormat

import tracklog
from tracklog.readers import read_csv, read_jsonl

_FILES: list[dict[str, object]] = [{"type": "file"}, {"type": "jsonl"}, {"type": "csv"}]


def _build(run_dir: Path, *, strict: bool = False) -> tracklog.Logger:
    return tracklog.build_logger({"run_dir": str(run_dir), "outputs": _FILES, "strict": strict})


class _Exploding(tracklog.OutputFormat):
    """A user's custom format that raises on every row (a backend that is down)."""

    name = "exploding"

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.calls = 0

    def write_row(self, row: tracklog.Row) -> None:
        self.calls += 1
        raise self.error


# A failing output --------------------------------------------------------------------


def test_a_failing_output_does_not_stop_the_others(
    run_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    logger = _build(run_dir)
    exploding = _Exploding(ConnectionError("backend down"))
    logger.output_formats.insert(0, exploding)  # first, so it runs before the files
    with caplog.at_level(logging.ERROR, logger="tracklog"):
        for step in range(5):
            logger.record("loss", step / 3)
            logger.dump(step)
        logger.close()
    assert exploding.calls == 5
    rows = read_jsonl(run_dir / "progress.jsonl")
    assert [(row.step, row.values["loss"]) for row in rows] == [(s, s / 3) for s in range(5)]
    assert [row.step for row in read_csv(run_dir / "progress.csv")] == list(range(5))
    # Reported once, with its traceback, then as a count at close.
    tracebacks = [r for r in caplog.records if r.exc_info is not None]
    assert len(tracebacks) == 1
    assert "backend down" in str(tracebacks[0].exc_info[1])  # type: ignore[index]  # checked not None
    assert any("failed 5 times" in r.getMessage() for r in caplog.records)


def test_strict_raises_after_the_other_outputs_wrote(run_dir: Path) -> None:
    logger = _build(run_dir, strict=True)
    logger.output_formats.insert(0, _Exploding(ConnectionError("backend down")))
    logger.record("loss", 0.5)
    with pytest.raises(ConnectionError, match="backend down"):
        logger.dump(7)
    logger.close()
    assert [row.values for row in read_jsonl(run_dir / "progress.jsonl")] == [{"loss": 0.5}]


def test_ctrl_c_inside_an_output_still_lets_the_others_write(run_dir: Path) -> None:
    logger = _build(run_dir)
    logger.output_formats.insert(0, _Exploding(KeyboardInterrupt()))
    logger.record("loss", 0.25)
    with pytest.raises(KeyboardInterrupt):
        logger.dump(3)
    logger.close()
    assert [(row.step, row.values) for row in read_jsonl(run_dir / "progress.jsonl")] == [
        (3, {"loss": 0.25})
    ]


def test_a_failing_sb3_writer_is_isolated_too(run_dir: Path) -> None:
    class Broken(sb3.KVWriter):
        def write(self, key_values: Any, key_excluded: Any, step: int = 0) -> None:
            raise OSError("disk full")

        def close(self) -> None:
            raise OSError("still full")

    logger = _build(run_dir)
    logger.output_formats.append(Broken())
    logger.record("x", 1)
    logger.dump(1)
    logger.close()  # close() of the broken writer is isolated as well
    assert read_jsonl(run_dir / "progress.jsonl")[0].values == {"x": 1}


# Values that used to pass record() and fail at dump() ---------------------------------


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("bad\udcff", 1.0, "not valid Unicode"),
        ("text", "bad\udcff", "not valid Unicode"),
        ("big", 2**64 + 1, "does not fit in 64 bits"),
        ("small", -(2**63) - 1, "does not fit in 64 bits"),
    ],
)
def test_values_no_file_can_hold_fail_at_record(
    run_dir: Path, key: str, value: Any, message: str
) -> None:
    logger = _build(run_dir)
    logger.record("kept", 1.5)
    with pytest.raises(ValueError, match=message) as error:
        logger.record(key, value)
    assert repr(key) in str(error.value)
    logger.dump(0)
    logger.close()
    assert read_jsonl(run_dir / "progress.jsonl")[0].values == {"kept": 1.5}


def test_the_int64_range_is_accepted_and_pandas_reads_it(run_dir: Path) -> None:
    with _build(run_dir) as logger:
        logger.record("max", 2**63 - 1)
        logger.record("min", -(2**63))
        logger.dump(0)
    frame = pd.read_json(run_dir / "progress.jsonl", lines=True)
    assert int(frame["max"][0]) == 2**63 - 1
    assert int(frame["min"][0]) == -(2**63)


@pytest.mark.parametrize(
    "tensor",
    [
        torch.zeros(3, 3).to_sparse(),
        torch.zeros(3, device="meta"),
    ],
    ids=["sparse", "meta"],
)
def test_tensors_without_a_numpy_form_are_a_type_error_naming_the_key(
    run_dir: Path, tensor: torch.Tensor
) -> None:
    logger = _build(run_dir)
    with pytest.raises(TypeError, match="cannot log 'odd/tensor'"):
        logger.record("odd/tensor", tensor)
    logger.close()


def test_a_masked_array_logs_only_its_unmasked_values(run_dir: Path) -> None:
    data = np.ma.masked_array([1.0, 1e9, 3.0], mask=[False, True, False])
    with _build(run_dir) as logger:
        logger.record("values", data)
        logger.dump(0)
    path = read_jsonl(run_dir / "progress.jsonl")[0].values["values"]
    assert np.load(run_dir / str(path)).tolist() == [1.0, 3.0]


# SB3 compatibility -------------------------------------------------------------------


def test_name_to_value_holds_pending_values_as_in_sb3(run_dir: Path) -> None:
    # Callbacks (Optuna pruning, early stopping) read logger.name_to_value.
    logger = _build(run_dir)
    model = PPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=32, n_epochs=1, seed=0)
    model.set_logger(logger)
    model.learn(128, log_interval=10_000)  # never dumps: the train/ values stay pending
    pending = dict(logger.name_to_value)
    logger.close()
    assert {"train/value_loss", "train/entropy_loss", "train/n_updates"} <= set(pending)
    assert all(isinstance(value, int | float) for value in pending.values())

    other = _build(run_dir / "mean")
    for value in (1.0, 2.0, 4.0):
        other.record_mean("m", value)
    assert other.name_to_value["m"] == pytest.approx(7 / 3)
    assert other.name_to_count["m"] == 3
    other.record("e", 1.0, exclude="csv")
    assert other.name_to_excluded["e"] == ("csv",)
    other.dump(0)
    assert dict(other.name_to_value) == {}
    other.close()


@pytest.mark.parametrize("algorithm", [SAC, DQN])
def test_off_policy_algorithms_log_through_tracklog(run_dir: Path, algorithm: Any) -> None:
    env = "Pendulum-v1" if algorithm is SAC else "CartPole-v1"
    logger = _build(run_dir)
    model = algorithm("MlpPolicy", env, learning_starts=50, seed=0)
    model.set_logger(logger)
    model.learn(400, log_interval=1)
    logger.close()
    rows = read_jsonl(run_dir / "progress.jsonl")
    assert rows
    assert all(row.values["time/total_timesteps"] == row.step for row in rows)
    assert any("train/n_updates" in row.values for row in rows)


def test_sb3_tensorboard_format_receives_values_it_accepts(run_dir: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = _build(run_dir)
    logger.output_formats.append(TensorBoardOutputFormat(str(run_dir / "tb")))
    logger.record("train/loss", 0.5)
    logger.record("hp", tracklog.HParam({"lr": 1e-3, "net": {"pi": [64, 64]}}))
    logger.record("clip", tracklog.Video(np.zeros((2, 3, 8, 8), np.uint8), fps=4))
    logger.dump(11)
    logger.close()
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(11, 0.5)]
    assert read_jsonl(run_dir / "progress.jsonl")[0].values["train/loss"] == 0.5


def test_set_level_takes_names_and_rejects_nonsense(run_dir: Path) -> None:
    logger = _build(run_dir)
    logger.set_level("debug")
    assert logger.level == sb3.DEBUG
    with pytest.raises(ValueError, match="unknown level 'verbose'"):
        logger.set_level("verbose")
    logger.close()


def test_sb3_own_logger_cannot_overwrite_the_step_column(run_dir: Path) -> None:
    jsonl = tracklog.JsonlOutputFormat(run_dir / "p.jsonl")
    with pytest.raises(ValueError, match="reserved"):
        jsonl.write({"_step": 999}, {"_step": ("",)}, step=5)
    jsonl.close()


def test_a_typo_in_an_environment_variable_is_an_error(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRACKLOG_LEVL", "debug")
    with pytest.raises(pydantic.ValidationError, match="TRACKLOG_LEVL"):
        tracklog.build_logger({"run_dir": str(run_dir)})
    assert not run_dir.exists()


# Resuming into files left by an interrupted or foreign process -----------------------


def test_resume_after_a_cut_off_last_line(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRACKLOG_RESUME", "auto")
    with _build(run_dir) as logger:
        logger.record("a", 1)
        logger.dump(1)
    for name, partial in (("progress.jsonl", '{"_step": 2, "_timest'), ("progress.csv", "2,17")):
        with open(run_dir / name, "a", encoding="utf-8") as file:
            file.write(partial)  # what a SIGKILL in the middle of a write leaves
    with pytest.warns(UserWarning, match="incomplete last line"):
        logger = _build(run_dir)
    logger.record("a", 3)
    logger.dump(3)
    logger.close()
    for rows in (read_jsonl(run_dir / "progress.jsonl"), read_csv(run_dir / "progress.csv")):
        assert [(row.step, row.values["a"]) for row in rows] == [(1, 1), (3, 3)]
    assert len(pd.read_json(run_dir / "progress.jsonl", lines=True)) == 2


def test_resume_refuses_a_csv_file_that_is_not_ours(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _build(run_dir).close()  # a run, whose CSV file SB3's own logger then replaced
    (run_dir / "progress.csv").write_text("time/fps,train/loss\n100,0.5\n")
    monkeypatch.setenv("TRACKLOG_RESUME", "auto")
    with pytest.raises(ValueError, match="not a tracklog CSV file"):
        _build(run_dir)
    assert (run_dir / "progress.csv").read_text() == "time/fps,train/loss\n100,0.5\n"


def test_an_interrupted_csv_widening_leaves_the_file_and_format_usable(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    logger = _build(run_dir)
    logger.record("a", 1)
    logger.dump(1)
    real_replace = os.replace

    def interrupted(*args: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)  # Ctrl-C just before the swap
    logger.record("b", 2)
    with pytest.raises(KeyboardInterrupt):
        logger.dump(2)
    monkeypatch.setattr(os, "replace", real_replace)
    logger.record("b", 3)
    logger.dump(3)
    logger.close()
    assert not (run_dir / "progress.csv.tmp").exists()
    rows = read_csv(run_dir / "progress.csv")
    assert [(row.step, dict(row.values)) for row in rows] == [(1, {"a": 1}), (3, {"b": 3})]
    # JSONL ran after the CSV and still got dump 2.
    assert [row.step for row in read_jsonl(run_dir / "progress.jsonl")] == [1, 2, 3]


# The human table over many dumps -------------------------------------------------------

_KEYS = st.lists(
    st.sampled_from(
        [
            *("train/loss", "train/a_very_long_key_that_needs_shortening_1", "eval/x"),
            *("time/fps", "train/a_very_long_key_that_needs_shortening_2", "solo", "zeta/w"),
        ]
    ),
    min_size=1,
    unique=True,
)


def _tables(text: str) -> list[list[int]]:
    """The values of each table in ``text``, top to bottom (tag rows have none)."""
    tables: list[list[int]] = []
    inside = False
    for line in text.splitlines():
        if line and set(line) == {"-"}:
            inside = not inside
            if inside:
                tables.append([])
        elif inside:
            value = line.split("|")[2].strip()
            if value:
                tables[-1].append(int(value))
    return tables


@settings(max_examples=40)
@given(dumps=st.lists(_KEYS, min_size=2, max_size=6))
def test_tables_follow_keys_that_come_and_go(
    tmp_path_factory: pytest.TempPathFactory, dumps: list[list[str]]
) -> None:
    # The key layout is cached per key set: each dump must still show its own keys.
    run_dir = tmp_path_factory.mktemp("tables")
    with tracklog.build_logger(
        {"run_dir": str(run_dir), "outputs": [{"type": "file", "max_length": 20}]}
    ) as logger:
        for step, keys in enumerate(dumps):
            for i, key in enumerate(keys):
                logger.record(key, step * 10 + i)
            logger.dump(step)
    expected = [
        [step * 10 + keys.index(key) for key in sorted(keys)] for step, keys in enumerate(dumps)
    ]
    assert _tables((run_dir / "train.log").read_text()) == expected
