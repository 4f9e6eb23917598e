"""The SB3 callbacks against a real PPO on CartPole and real backends.

Each training test builds a logger from settings, trains a tiny PPO (``n_steps=64``)
with the callbacks, and reads what the backends got back with their own readers:
pandas for the JSONL file, PyAV for the MP4s, ``MlflowClient`` for a sqlite store and
the ``.wandb`` transaction log for W&B. Steps are compared with what the callbacks
(and SB3's ``evaluations.npz``) say happened, never with the logger's memory.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import numpy.typing as npt
import pandas as pd
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from mlflow import MlflowClient
from stable_baselines3 import DQN, PPO, SAC
from stable_baselines3.common.callbacks import BaseCallback, EvalCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import configure
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.utils import LinearSchedule
from stable_baselines3.common.vec_env import VecEnv

import tracklog
from tests.readback import decode_mp4
from tests.tensorboard_readback import hparams_tab, read_events, scalars
from tracklog._outbox import RemoteOutput
from tracklog.callbacks import (
    HParamCallback,
    TracklogEvalCallback,
    VideoRecorderCallback,
    algorithm_hparams,
    dump_values,
)
from tracklog.readers import read_wandb_offline

ROOT = Path(__file__).resolve().parents[1]
N_STEPS = 64
EXPERIMENT = "tracklog-callbacks"
# The keys of SB3's own rows: one per rollout of PPO.
TRAIN_KEYS = {"train/loss", "train/n_updates", "train/value_loss"}

os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("API_KEY", "MODE", "DIR", "PROJECT", "ENTITY", "RUN_ID", "RESUME", "NAME"):
        monkeypatch.delenv(f"WANDB_{name}", raising=False)
    # pygame renders CartPole off screen; without a display it needs no window system.
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    torch.set_num_threads(1)  # a 64x64 MLP is faster on one thread, and other tests run


@pytest.fixture(autouse=True)
def _no_output_failed(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    # A failing output is reported on the "tracklog" logger and training goes on, so a
    # test would otherwise see only what is missing from the run, not why.
    yield
    failures = [r for r in caplog.records if r.name == "tracklog" and r.levelno >= 40]
    assert not failures, [record.getMessage() for record in failures]


# Helpers -----------------------------------------------------------------------------


def ppo(env: str | gym.Env[Any, Any] | VecEnv = "CartPole-v1", **options: Any) -> PPO:
    return PPO(
        "MlpPolicy",
        env,
        n_steps=N_STEPS,
        batch_size=32,
        n_epochs=1,
        seed=0,
        device="cpu",
        **options,
    )


def jsonl_logger(run_dir: Path) -> tracklog.Logger:
    return tracklog.build_logger({"run_dir": str(run_dir), "outputs": [{"type": "jsonl"}]})


def progress(run_dir: Path) -> pd.DataFrame:
    return pd.read_json(run_dir / "progress.jsonl", lines=True)


def steps_with(frame: pd.DataFrame, key: str) -> list[int]:
    """The ``_step`` of every row holding ``key``, in file order."""
    if key not in frame.columns:
        return []
    return [int(step) for step in frame.loc[frame[key].notna(), "_step"]]


def keys_of(frame: pd.DataFrame, index: int) -> set[str]:
    row = frame.iloc[index]
    return {key for key in frame.columns if not key.startswith("_") and not _missing(row[key])}


def _missing(value: object) -> bool:
    return isinstance(value, float) and math.isnan(value)


def first_frame(frames: Sequence[npt.NDArray[np.uint8]]) -> npt.NDArray[np.int16]:
    return np.asarray(frames[0], dtype=np.int16)


def rendered_reset(seed: int) -> npt.NDArray[np.int16]:
    """What CartPole shows right after ``reset(seed=seed)``, rendered by a fresh env."""
    env = gym.make("CartPole-v1", render_mode="rgb_array")
    env.reset(seed=seed)
    frame = np.asarray(env.render(), dtype=np.int16)
    env.close()
    return frame


def close_to(decoded: npt.NDArray[np.int16], expected: npt.NDArray[np.int16]) -> bool:
    """Same picture up to MP4's lossy YUV 4:2:0 encoding."""
    return decoded.shape == expected.shape and float(np.abs(decoded - expected).mean()) < 3.0


# All three callbacks, every backend ---------------------------------------------------


@pytest.mark.slow
def test_callbacks_log_at_their_step_in_every_backend(run_dir: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = tracklog.build_logger(
        {
            "run_dir": str(run_dir),
            "outputs": [
                {"type": "jsonl"},
                {"type": "tensorboard"},
                {"type": "mlflow", "tracking_uri": uri, "experiment": EXPERIMENT},
                {"type": "wandb", "project": "tests", "mode": "offline"},
            ],
        }
    )
    model = ppo(learning_rate=LinearSchedule(1e-3, 0.0, 1.0))
    model.set_logger(logger)
    video = VideoRecorderCallback(
        gym.make("CartPole-v1", render_mode="rgb_array", max_episode_steps=40),
        every_n_steps=96,
        seed=3,
    )
    hparams = HParamCallback(
        extra={"seed": 0, "note": "tiny"},
        metrics=["rollout/ep_rew_mean", "eval/mean_reward", "rollout/typo"],
    )
    evaluation = TracklogEvalCallback(
        Monitor(gym.make("CartPole-v1", max_episode_steps=100)),
        eval_freq=48,
        n_eval_episodes=2,
        log_path=str(tmp_path / "evaluations"),
        verbose=0,
    )
    with pytest.warns(UserWarning, match=r"rollout/typo") as caught:
        model.learn(3 * N_STEPS, callback=[video, hparams, evaluation])
    # The typo's warning only: nothing about TensorBoard keeping the first HParam.
    assert [str(w.message) for w in caught if "rollout/typo" not in str(w.message)] == []
    assert logger.flush()
    (run_id,) = [
        o.run_id
        for o in logger.output_formats
        if isinstance(o, RemoteOutput) and o.name == "mlflow"
    ]

    # What the callbacks say happened, and SB3's own record of the evaluations.
    assert video.recorded_steps == [96, 192]
    assert evaluation.eval_steps == [48, 96, 144, 192]
    npz = np.load(tmp_path / "evaluations" / "evaluations.npz")
    assert npz["timesteps"].tolist() == evaluation.eval_steps
    eval_means = [float(np.mean(results)) for results in npz["results"]]

    # JSONL, read with pandas.
    frame = progress(run_dir)
    assert steps_with(frame, "eval/video") == video.recorded_steps
    assert steps_with(frame, "eval/mean_reward") == evaluation.eval_steps
    evals = frame[frame["eval/mean_reward"].notna()]
    assert evals["eval/mean_reward"].tolist() == pytest.approx(eval_means)
    assert evals["time/total_timesteps"].tolist() == evaluation.eval_steps
    for index in evals.index:
        assert keys_of(frame, index) == {
            "eval/mean_reward",
            "eval/mean_ep_length",
            "time/total_timesteps",
        }
    # SB3's rows keep their steps: train/ values with the rollout after the update.
    assert steps_with(frame, "time/iterations") == [64, 128, 192]
    assert steps_with(frame, "train/loss") == [128, 192]
    assert steps_with(frame, "hparams") == [0, 192]

    for step, path in zip(video.recorded_steps, frame["eval/video"].dropna(), strict=True):
        assert path == f"media/eval/video/step_{step}.mp4"
        frames, rate = decode_mp4(run_dir / path)
        assert rate == 50  # CartPole's render_fps
        assert len(frames) > 1  # the reset frame and the steps after it
        assert close_to(first_frame(frames), rendered_reset(3))  # (T,H,W,C) -> Video -> MP4

    start, end = (json.loads((run_dir / path).read_text()) for path in frame["hparams"].dropna())
    assert start["metrics"] == {}
    assert start["hparams"]["algorithm"] == "PPO"
    assert start["hparams"]["env"] == "CartPole-v1"
    assert start["hparams"]["n_steps"] == N_STEPS
    assert start["hparams"]["clip_range"] == 0.2
    assert start["hparams"]["learning_rate"] == (
        "LinearSchedule(start=0.001, end=0.0, end_fraction=1.0)"
    )
    assert start["hparams"]["note"] == "tiny"
    assert end["hparams"] == start["hparams"]
    last_reward = frame["rollout/ep_rew_mean"].dropna().iloc[-1]
    assert end["metrics"] == {
        "rollout/ep_rew_mean": pytest.approx(last_reward),
        "eval/mean_reward": pytest.approx(eval_means[-1]),
    }
    assert hparams.metric_values == end["metrics"]

    # MLflow, read with its own client while the logger is still open.
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    params = run.data.params
    assert params["algorithm"] == "PPO"
    assert params["n_steps"] == str(N_STEPS)
    assert params["gamma"] == "0.99"
    assert params["seed"] == "0"
    assert params["learning_rate"].startswith("LinearSchedule(")
    # The metrics' histories hold the dumped points only: no hparam placeholder or copy.
    history = sorted(
        (p.step, p.value) for p in client.get_metric_history(run_id, "eval/mean_reward")
    )
    assert [step for step, _ in history] == evaluation.eval_steps
    assert [value for _, value in history] == pytest.approx(eval_means)
    rewards = frame.loc[frame["rollout/ep_rew_mean"].notna(), ["_step", "rollout/ep_rew_mean"]]
    reward_steps = rewards["_step"].tolist()
    assert reward_steps == [64, 128, 192]
    rollout = sorted(
        (p.step, p.value) for p in client.get_metric_history(run_id, "rollout/ep_rew_mean")
    )
    assert [step for step, _ in rollout] == reward_steps
    assert [value for _, value in rollout] == pytest.approx(rewards["rollout/ep_rew_mean"].tolist())
    videos = {entry.path for entry in client.list_artifacts(run_id, "videos/eval/video")}
    assert videos == {f"videos/eval/video/step_{step}.mp4" for step in video.recorded_steps}
    downloaded = client.download_artifacts(
        run_id, "videos/eval/video/step_192.mp4", str(tmp_path / "download")
    )
    assert close_to(first_frame(decode_mp4(Path(downloaded))[0]), rendered_reset(3))

    logger.close()

    # W&B, read from the offline run's transaction log.
    wandb_run = read_wandb_offline(run_dir)
    assert wandb_run.config["algorithm"] == "PPO"
    assert wandb_run.config["n_steps"] == N_STEPS
    assert wandb_run.config["note"] == "tiny"
    assert [r.global_step for r in wandb_run.rows if "eval/mean_reward" in r.values] == (
        evaluation.eval_steps
    )
    video_rows = [r for r in wandb_run.rows if "eval/video" in r.values]
    assert [r.global_step for r in video_rows] == video.recorded_steps
    for row in video_rows:
        path = wandb_run.media_path(row.values["eval/video"])
        assert path.suffix == ".mp4"
        assert close_to(first_frame(decode_mp4(path)[0]), rendered_reset(3))
    assert wandb_run.summary["eval/mean_reward"] == pytest.approx(eval_means[-1])
    assert wandb_run.summary["rollout/ep_rew_mean"] == pytest.approx(last_reward)
    metric_rows = [r for r in wandb_run.rows if "rollout/ep_rew_mean" in r.values]
    assert [r.global_step for r in metric_rows] == reward_steps

    # TensorBoard, read with its own event reader and hparams plugin. The HPARAMS tab
    # lists the metrics HParamCallback named (the typo left out) with their final
    # values, read from the metrics' own charts, which hold the dumped points only.
    events = read_events(run_dir / "tensorboard")
    assert scalars(events, "rollout/ep_rew_mean") == [
        (step, float(np.float32(value))) for step, value in rollout
    ]
    assert scalars(events, "eval/mean_reward") == [
        (step, float(np.float32(value)))
        for step, value in zip(evaluation.eval_steps, eval_means, strict=True)
    ]
    experiment, groups = hparams_tab(run_dir / "tensorboard")
    assert [info["name"]["tag"] for info in experiment["metricInfos"]] == [
        "rollout/ep_rew_mean",
        "eval/mean_reward",
    ]
    (group,) = groups["sessionGroups"]
    assert group["hparams"]["algorithm"] == "PPO"
    assert group["hparams"]["n_steps"] == N_STEPS
    assert group["hparams"]["learning_rate"].startswith("LinearSchedule(")
    shown = {value["name"]["tag"]: value for value in group["metricValues"]}
    assert {tag: shown[tag]["value"] for tag in shown} == {
        tag: float(np.float32(value)) for tag, value in hparams.metric_values.items()
    }
    assert {tag: int(shown[tag]["trainingStep"]) for tag in shown} == {
        "rollout/ep_rew_mean": 192,
        "eval/mean_reward": evaluation.eval_steps[-1],
    }
    assert group["sessions"][0]["status"] == "STATUS_SUCCESS"


# TracklogEvalCallback against SB3's EvalCallback ----------------------------------------


def _eval_callback(kind: str) -> list[BaseCallback]:
    env = Monitor(gym.make("CartPole-v1"))
    if kind == "sb3":
        return [EvalCallback(env, eval_freq=48, n_eval_episodes=1, verbose=0)]
    if kind == "tracklog":
        return [TracklogEvalCallback(env, eval_freq=48, n_eval_episodes=1, verbose=0)]
    return []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "train_steps"),
    [
        ("none", [128, 192]),
        # SB3's dump at each evaluation also writes the previous update's train/
        # values, which then sit at the evaluation's step, apart from their rollout.
        ("sb3", [96, 144]),
        ("tracklog", [128, 192]),
    ],
)
def test_evaluation_leaves_sb3_rows_where_they_were(
    kind: str, train_steps: list[int], run_dir: Path
) -> None:
    callbacks = _eval_callback(kind)
    with jsonl_logger(run_dir) as logger:
        model = ppo()
        model.set_logger(logger)
        model.learn(3 * N_STEPS, callback=callbacks)
    frame = progress(run_dir)
    assert steps_with(frame, "train/loss") == train_steps
    assert steps_with(frame, "time/iterations") == [64, 128, 192]
    if kind != "none":
        assert steps_with(frame, "eval/mean_reward") == [48, 96, 144, 192]
    if kind == "tracklog":
        assert isinstance(callbacks[0], TracklogEvalCallback)
        assert callbacks[0].eval_steps == [48, 96, 144, 192]
        for index in frame.index[frame["train/loss"].notna()]:
            assert "time/iterations" in keys_of(frame, index)


@pytest.mark.slow
def test_eval_callback_with_sb3s_own_logger(tmp_path: Path) -> None:
    logger = configure(str(tmp_path / "sb3"), ["csv"])
    model = ppo()
    model.set_logger(logger)
    callback = TracklogEvalCallback(
        Monitor(gym.make("CartPole-v1")), eval_freq=48, n_eval_episodes=1, verbose=0
    )
    model.learn(3 * N_STEPS, callback=callback)
    logger.close()
    table = pd.read_csv(tmp_path / "sb3" / "progress.csv")
    # SB3's CSV has no step column; time/total_timesteps is in every row.
    evals = table[table["eval/mean_reward"].notna()]
    assert evals["time/total_timesteps"].tolist() == callback.eval_steps == [48, 96, 144, 192]
    assert evals["train/loss"].isna().all()
    trains = table[table["train/loss"].notna()]
    assert trains["time/total_timesteps"].tolist() == [128, 192]


# VideoRecorderCallback ----------------------------------------------------------------


@pytest.mark.slow
def test_video_from_a_vec_env(run_dir: Path) -> None:
    # A short time limit keeps the clips short, however well the policy balances.
    env_kwargs = {"render_mode": "rgb_array", "max_episode_steps": 30}
    eval_env = make_vec_env("CartPole-v1", n_envs=2, env_kwargs=env_kwargs)
    callback = VideoRecorderCallback(
        eval_env, every_n_steps=100, n_episodes=2, frame_stride=2, seed=5, key="eval/clip"
    )
    # Two training envs: num_timesteps moves by 2, so 100 and 200 are hit exactly.
    with jsonl_logger(run_dir) as logger:
        model = ppo(make_vec_env("CartPole-v1", n_envs=2, seed=0))
        model.set_logger(logger)
        model.learn(4 * N_STEPS, callback=callback)
        final = callback.record_video()
        assert model.num_timesteps == 256
    assert callback.recorded_steps == [100, 200, 256]
    frame = progress(run_dir)
    assert steps_with(frame, "eval/clip") == callback.recorded_steps
    frames, rate = decode_mp4(run_dir / frame["eval/clip"].dropna().iloc[-1])
    assert rate == 25  # render_fps 50 / frame_stride 2
    assert len(frames) == final.shape[1]
    assert final.shape[2:] == (3, 400, 600)
    reference = make_vec_env("CartPole-v1", n_envs=2, env_kwargs=env_kwargs)
    reference.seed(5)
    reference.reset()
    expected = np.asarray(reference.get_images()[0], dtype=np.int16)
    assert close_to(first_frame(frames), expected)


def test_video_recorder_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"render_mode is None, not 'rgb_array'"):
        VideoRecorderCallback(gym.make("CartPole-v1"), every_n_steps=10)
    rgb = gym.make("CartPole-v1", render_mode="rgb_array")
    with pytest.raises(ValueError, match=r"every_n_steps must be a positive int, got 0"):
        VideoRecorderCallback(rgb, every_n_steps=0)
    with pytest.raises(ValueError, match=r"n_episodes must be a positive int"):
        VideoRecorderCallback(rgb, every_n_steps=10, n_episodes=-1)
    with pytest.raises(ValueError, match=r"frame_stride must be a positive int, got True"):
        VideoRecorderCallback(rgb, every_n_steps=10, frame_stride=True)
    with pytest.raises(ValueError, match=r"fps must be a positive number"):
        VideoRecorderCallback(rgb, every_n_steps=10, fps=0)
    with pytest.raises(ValueError, match=r"key"):
        VideoRecorderCallback(rgb, every_n_steps=10, key="")
    assert VideoRecorderCallback(rgb, every_n_steps=10).fps == 50.0
    assert VideoRecorderCallback(rgb, every_n_steps=10, frame_stride=5).fps == 10.0


# HParamCallback and algorithm_hparams ----------------------------------------------------


def test_hparam_callback_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match=r"metrics must be a sequence of metric names"):
        HParamCallback(metrics="rollout/ep_rew_mean")
    with pytest.raises(ValueError, match=r"metrics holds ''"):
        HParamCallback(metrics=["rollout/ep_rew_mean", ""])
    with pytest.raises(TypeError, match=r"HParamCallback extra: .*\['env'\] has unsupported type"):
        HParamCallback(extra={"env": object()})


def test_hyperparameters_are_readable() -> None:
    def schedule(progress: float) -> float:
        return 1e-3 * progress

    model = ppo(
        learning_rate=schedule,
        clip_range=LinearSchedule(0.3, 0.1, 0.5),
        policy_kwargs={"net_arch": [16, 16], "activation_fn": torch.nn.Tanh},
    )
    hparams = algorithm_hparams(model)
    assert hparams["learning_rate"] == (
        "test_hyperparameters_are_readable.<locals>.schedule: 0.001 -> 0"
    )
    assert hparams["clip_range"] == "LinearSchedule(start=0.3, end=0.1, end_fraction=0.5)"
    assert hparams["policy_kwargs"] == {"net_arch": (16, 16), "activation_fn": "Tanh"}
    assert hparams["rollout_buffer_class"] == "RolloutBuffer"
    assert hparams["device"] == "cpu"
    assert list(hparams)[:4] == ["algorithm", "policy", "env", "n_envs"]
    assert "verbose" not in hparams
    assert "tensorboard_log" not in hparams
    flat = tracklog.HParam(hparams).flat()  # what MLflow's params get
    assert flat["policy_kwargs.activation_fn"] == "Tanh"

    dqn = algorithm_hparams(DQN("MlpPolicy", "CartPole-v1", train_freq=(2, "episode"), seed=1))
    assert dqn["algorithm"] == "DQN"
    assert dqn["train_freq"] == {"frequency": 2, "unit": "episode"}
    assert dqn["exploration_fraction"] == 0.1
    assert dqn["learning_rate"] == 1e-4
    assert dqn["target_update_interval"] == 10000

    sac = algorithm_hparams(SAC("MlpPolicy", "Pendulum-v1", learning_starts=10, seed=1))
    assert sac["env"] == "Pendulum-v1"
    assert sac["ent_coef"] == "auto"
    assert sac["target_entropy"] == -1.0
    assert sac["tau"] == 0.005
    assert sac["replay_buffer_class"] == "ReplayBuffer"


class _WithKwargs(PPO):
    """A user's subclass that forwards **kwargs: its parent's arguments still count."""

    def __init__(self, *args: Any, my_option: int = 7, **kwargs: Any) -> None:
        self.my_option = my_option
        super().__init__(*args, **kwargs)


def test_hyperparameters_of_a_subclass_taking_kwargs() -> None:
    model = _WithKwargs("MlpPolicy", "CartPole-v1", n_steps=N_STEPS, batch_size=32, device="cpu")
    hparams = algorithm_hparams(model)
    assert hparams["algorithm"] == "_WithKwargs"
    assert hparams["my_option"] == 7
    assert hparams["n_steps"] == N_STEPS
    assert hparams["gamma"] == 0.99


# dump_values --------------------------------------------------------------------------

_keys = st.sampled_from([f"k/{name}" for name in "abcdefgh"])
_numbers = st.floats(-1e6, 1e6, allow_nan=False) | st.integers(-(2**40), 2**40)


@given(
    pending=st.dictionaries(_keys, _numbers, max_size=5),
    means=st.dictionaries(_keys, st.lists(_numbers, min_size=1, max_size=4), max_size=3),
    later=st.lists(_numbers, min_size=0, max_size=3),
    now=st.dictionaries(st.sampled_from(["now/x", "now/y"]), _numbers, min_size=1),
    steps=st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)),
)
def test_dump_values_writes_its_values_and_keeps_the_pending_ones(
    pending: dict[str, float],
    means: dict[str, list[float]],
    later: list[float],
    now: dict[str, float],
    steps: tuple[int, int],
) -> None:
    """A dump_values row holds only its values; the next dump holds exactly what it
    would have held without it, record_mean averages continuing across it."""
    means = {key: values for key, values in means.items() if key not in pending}
    with tempfile.TemporaryDirectory() as directory:
        run_dir = Path(directory) / "run"
        with jsonl_logger(run_dir) as logger:
            for key, value in pending.items():
                logger.record(key, value, exclude="csv")
            for key, values in means.items():
                for value in values:
                    logger.record_mean(key, value)
            dump_values(logger, steps[0], now)
            mean_key = next(iter(means), None)
            if mean_key is not None:
                for value in later:
                    logger.record_mean(mean_key, value)
                means[mean_key] = [*means[mean_key], *later]
            logger.dump(step=steps[1])
        rows = [json.loads(line) for line in (run_dir / "progress.jsonl").read_text().splitlines()]
    assert rows[0]["_step"] == steps[0]
    assert {k: v for k, v in rows[0].items() if not k.startswith("_")} == now
    if not pending and not means:
        assert len(rows) == 1
        return
    assert rows[1]["_step"] == steps[1]
    expected: dict[str, object] = {**pending}
    for key, values in means.items():
        expected[key] = pytest.approx(_sb3_mean(values))
    assert {k: v for k, v in rows[1].items() if not k.startswith("_")} == expected


def _sb3_mean(values: list[float]) -> float:
    mean = 0.0
    for count, value in enumerate(values):
        mean = mean * count / (count + 1) + value / (count + 1)
    return mean


def test_dump_values_keeps_exclusions_and_a_failed_record_moves_nothing(run_dir: Path) -> None:
    with tracklog.build_logger(
        {"run_dir": str(run_dir), "outputs": [{"type": "jsonl"}, {"type": "csv"}]}
    ) as logger:
        logger.record("pending/json_only", 1.5, exclude="csv")
        with pytest.raises(TypeError, match=r"'now/bad'"):
            dump_values(logger, 5, {"now/good": 1.0, "now/bad": object()})  # type: ignore[dict-item]  # the mistake under test
        logger.dump(step=10)
    frame = progress(run_dir)
    assert frame["_step"].tolist() == [10]
    assert keys_of(frame, 0) == {"pending/json_only"}
    assert "pending/json_only" not in pd.read_csv(run_dir / "progress.csv").columns


# The page docs/callbacks.md -----------------------------------------------------------


@pytest.mark.slow
def test_the_docs_example_runs(tmp_path: Path, mlflow_sqlite_uri: str) -> None:
    page = (ROOT / "docs" / "callbacks.md").read_text(encoding="utf-8")
    example = re.search(r"## Example\n\n```python\n(.*?)```", page, re.DOTALL)
    assert example is not None
    script = tmp_path / "example.py"
    script.write_text(example.group(1), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        # The session's store: creating a new sqlite store's tables takes seconds.
        env={**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": mlflow_sqlite_uri},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    frame = progress(tmp_path / "runs" / "callbacks")
    # What the page says the file holds.
    assert steps_with(frame, "hparams") == [0, 2048]
    assert steps_with(frame, "eval/mean_reward") == [512, 1024, 1536, 2048]
    assert steps_with(frame, "eval/video") == [1024, 2048]
    assert steps_with(frame, "time/iterations") == list(range(256, 2049, 256))
    client = MlflowClient(mlflow_sqlite_uri)
    experiment = client.get_experiment_by_name("callbacks-example")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["algorithm"] == "PPO"
    videos = client.list_artifacts(run.info.run_id, "videos/eval/video")
    assert {entry.path for entry in videos} == {
        "videos/eval/video/step_1024.mp4",
        "videos/eval/video/step_2048.mp4",
    }
