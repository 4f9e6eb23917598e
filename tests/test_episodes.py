"""Every episode at its own step: ``EpisodeCallback`` and ``Logger.dump_rows``.

Read back with each backend's reader and compared with what SB3's own ``Monitor``
wrote into its CSV files for the same episodes.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from pathlib import Path
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow import MlflowClient
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import Logger as SB3Logger
from stable_baselines3.common.logger import make_output_format
from stable_baselines3.common.vec_env import DummyVecEnv

import tracklog
from tests.tensorboard_readback import read_events, scalars
from tracklog.callbacks import EpisodeCallback
from tracklog.readers import read_jsonl

N_ENVS = 4
N_STEPS = 256


def _monitor_episodes(folder: Path) -> list[tuple[float, int, float]]:
    """Every episode SB3's Monitor wrote (return, length, time), from its CSV files."""
    found: list[tuple[float, int, float]] = []
    for path in sorted(folder.glob("*.monitor.csv")):
        frame = pd.read_csv(path, skiprows=1)  # the first line is Monitor's JSON header
        found += [
            (float(r), int(n), float(t))
            for r, n, t in frame[["r", "l", "t"]].itertuples(index=False)
        ]
    return found


def test_every_episode_of_every_env_reaches_every_output_at_its_own_step(
    tmp_path: Path, mlflow_sqlite_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    settings = {
        "run_dir": run_dir,
        "outputs": [
            {"type": "console"},
            {"type": "jsonl"},
            {"type": "csv"},
            {"type": "tensorboard"},
            {"type": "mlflow", "tracking_uri": mlflow_sqlite_uri, "experiment": "episodes"},
        ],
    }
    monitors = tmp_path / "monitor"
    with tracklog.build_logger(settings) as logger:
        env = make_vec_env("CartPole-v1", n_envs=N_ENVS, seed=1, monitor_dir=str(monitors))
        model = PPO("MlpPolicy", env, n_steps=N_STEPS, batch_size=256, n_epochs=1, seed=1)
        model.set_logger(logger)
        callback = EpisodeCallback()
        model.learn(2 * N_STEPS * N_ENVS, callback=callback)
        mlflow_run = next(o for o in logger.output_formats if getattr(o, "name", "") == "mlflow")
        run_id = mlflow_run.run_id  # type: ignore[attr-defined]
    env.close()

    monitor = _monitor_episodes(monitors)
    assert len(monitor) > 50
    assert callback.episodes == len(monitor)
    rows = read_jsonl(run_dir / "progress.jsonl")
    episodes = [row for row in rows if "episode/return" in row.values]
    logged = [
        (row.values["episode/return"], row.values["episode/length"], row.values["episode/time"])
        for row in episodes
    ]
    assert Counter(logged) == Counter(monitor)
    steps = [row.step for row in episodes]
    assert steps == sorted(steps)
    assert all(step % N_ENVS == 0 and 0 < step <= 2 * N_STEPS * N_ENVS for step in steps)
    # SB3's own rows keep their steps and their values: none is moved into an episode row.
    others = [row for row in rows if "episode/return" not in row.values]
    assert [row.step for row in others] == [N_STEPS * N_ENVS, 2 * N_STEPS * N_ENVS]
    assert all(not key.startswith("episode/") for row in others for key in row.values)
    assert any(key.startswith("train/") for key in others[-1].values)
    with open(run_dir / "progress.csv", newline="", encoding="utf-8") as file:
        csv_returns = [
            float(r["episode/return"]) for r in csv.DictReader(file) if r["episode/return"]
        ]
    assert Counter(csv_returns) == Counter(r for r, _, _ in monitor)
    # Not on the console: a table per episode would bury everything else.
    assert "episode/" not in capsys.readouterr().out

    tensorboard = scalars(read_events(run_dir / "tensorboard"), "episode/length")
    assert sorted(tensorboard) == sorted(
        (s, float(n)) for s, (_, n, _) in zip(steps, logged, strict=True)
    )
    history = MlflowClient(mlflow_sqlite_uri).get_metric_history(run_id, "episode/return")
    assert Counter((p.step, p.value) for p in history) == Counter(
        (s, r) for s, (r, _, _) in zip(steps, logged, strict=True)
    )


def test_with_sb3s_own_logger_each_episode_is_a_dump_of_its_own(tmp_path: Path) -> None:
    logger = SB3Logger(str(tmp_path), [make_output_format("csv", str(tmp_path))])
    env = make_vec_env("CartPole-v1", n_envs=2, seed=0, monitor_dir=str(tmp_path / "monitor"))
    model = PPO("MlpPolicy", env, n_steps=128, batch_size=128, n_epochs=1, seed=0)
    model.set_logger(logger)
    callback = EpisodeCallback()
    model.learn(256, callback=callback)
    logger.close()
    frame = pd.read_csv(tmp_path / "progress.csv")
    assert frame["episode/return"].notna().sum() == callback.episodes
    assert callback.episodes == len(_monitor_episodes(tmp_path / "monitor"))


def _jsonl_logger(run_dir: Path) -> tracklog.Logger:
    return tracklog.build_logger(
        {"run_dir": run_dir, "outputs": [{"type": "jsonl"}, {"type": "csv"}]}
    )


finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.integers(-(2**63), 2**63 - 1), st.one_of(finite, st.just(math.inf))),
        max_size=20,
    ),
    pending=finite,
)
def test_dump_rows_writes_each_row_at_its_step_and_leaves_pending_values_alone(
    tmp_path_factory: pytest.TempPathFactory, rows: list[tuple[int, float]], pending: float
) -> None:
    run_dir = tmp_path_factory.mktemp("rows") / "run"
    logger = _jsonl_logger(run_dir)
    logger.record("pending", pending)
    logger.dump_rows([(step, {"episode/return": value}) for step, value in rows])
    logger.dump(7)
    logger.close()
    read = read_jsonl(run_dir / "progress.jsonl")
    assert [(row.step, row.values) for row in read] == [
        *((step, {"episode/return": value}) for step, value in rows),
        (7, {"pending": pending}),
    ]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ((3, {"episode/return": object()}), "episode/return"),
        ((3, {"": 1.0}), "key"),
        ((2**63, {"episode/return": 1.0}), "signed 64-bit"),
        (("3", {"episode/return": 1.0}), "dump step must be an int"),
    ],
)
def test_dump_rows_refuses_a_bad_row_before_writing_any(
    tmp_path: Path, bad: tuple[object, dict[str, object]], message: str
) -> None:
    logger = _jsonl_logger(tmp_path / "run")
    logger.record("pending", 1.0)
    good = (1, {"episode/return": 2.0})
    with pytest.raises((TypeError, ValueError), match=message):
        logger.dump_rows([good, bad])  # type: ignore[list-item]
    logger.dump(5)
    logger.close()
    assert [(row.step, row.values) for row in read_jsonl(tmp_path / "run" / "progress.jsonl")] == [
        (5, {"pending": 1.0})
    ]


class _ArrayEpisodeInfo(gym.Wrapper[Any, Any, Any, Any]):
    """Puts info["episode"] in another wrapper's shape at every episode's end: the
    return and length as 1-element arrays, and no time."""

    def __init__(self, env: gym.Env[Any, Any]) -> None:
        super().__init__(env)
        self.total = 0.0
        self.length = 0

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        observation, reward, terminated, truncated, info = self.env.step(action)
        self.total += float(reward)
        self.length += 1
        if terminated or truncated:
            episode = {"r": np.array([self.total]), "l": np.array([self.length])}
            info = {**info, "episode": episode}
            self.total, self.length = 0.0, 0
        return observation, reward, terminated, truncated, info


def test_episode_infos_of_another_shape_are_logged_and_a_missing_monitor_is_said(
    tmp_path: Path,
) -> None:
    def make() -> gym.Env[Any, Any]:
        return _ArrayEpisodeInfo(gym.make("CartPole-v1"))

    logger = _jsonl_logger(tmp_path / "run")
    model = PPO("MlpPolicy", DummyVecEnv([make]), n_steps=256, batch_size=256, n_epochs=1)
    model.set_logger(logger)
    callback = EpisodeCallback()
    with pytest.warns(UserWarning, match="no env of the training VecEnv is wrapped"):
        model.learn(256, callback=callback)
    logger.close()
    path = tmp_path / "run" / "progress.jsonl"
    rows = [row for row in read_jsonl(path) if "episode/length" in row.values]
    assert len(rows) == callback.episodes > 3
    assert all(row.values["episode/return"] == row.values["episode/length"] for row in rows)
    assert all("episode/time" not in row.values for row in rows)
