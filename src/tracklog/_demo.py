"""``tracklog demo`` (and ``make demo``): PPO learns CartPole-v1 with tracklog as its logger.

It logs SB3's own metrics, the PPO hyperparameters as an ``HParam`` (at the start, so
a crashed run still has them, and again at the end with the final score), and a greedy
evaluation episode as a ``Video`` every ``video_every`` steps. Then it reads the JSONL
file, the MLflow run and the W&B offline run back with their own readers and checks
that the agent learned.

Needs the ``demo`` extra (``pip install 'tracklog[demo]'``: gymnasium with its
classic-control renderer, pygame).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO, cast

import gymnasium as gym
import numpy as np
import numpy.typing as npt
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

import tracklog
from tracklog.readers import LoggedRow, read_csv, read_jsonl, read_wandb_offline
from tracklog.settings import CsvOutput, JsonlOutput, LoggerSettings, load_settings

__all__ = ["DEFAULT_SETTINGS", "run_demo"]

#: The settings ``tracklog demo`` uses without ``--settings``: the same as
#: ``examples/demo.yaml`` in the source tree (a test keeps the two equal).
DEFAULT_SETTINGS: Mapping[str, object] = {
    "run_dir": "runs/demo",
    "level": "info",
    "outputs": [
        {"type": "console"},
        {"type": "file"},
        {"type": "jsonl"},
        {"type": "csv"},
        {
            "type": "mlflow",
            "tracking_uri": "sqlite:///mlflow.db",
            "experiment": "tracklog-demo",
            "run_name": "ppo-cartpole",
            "tags": {"algorithm": "PPO", "env": "CartPole-v1"},
        },
        {
            "type": "wandb",
            "project": "tracklog-demo",
            "name": "ppo-cartpole",
            "tags": ["PPO", "CartPole-v1"],
        },
    ],
}

HParams = dict[str, bool | int | float | str | None]


class EvalVideoCallback(BaseCallback):
    """Every ``every`` steps, plays one greedy episode and records it as a Video."""

    def __init__(self, logger: tracklog.Logger, every: int, seed: int) -> None:
        super().__init__()
        self.tracklog = logger
        self.every = every
        self.seed = seed
        self.next_at = every
        self.hparams: HParams = {}
        self.last_step, self.last_return = -1, 0.0
        self.env = gym.make("CartPole-v1", render_mode="rgb_array")

    def _on_training_start(self) -> None:
        model = self.model
        assert isinstance(model, PPO)
        self.hparams = {
            "algorithm": type(model).__name__,
            "learning_rate": float(model.learning_rate)
            if isinstance(model.learning_rate, float)
            else str(model.learning_rate),
            "n_steps": model.n_steps,
            "batch_size": model.batch_size,
            "n_epochs": model.n_epochs,
            "gamma": model.gamma,
            "gae_lambda": model.gae_lambda,
            "ent_coef": model.ent_coef,
            "n_envs": model.n_envs,
            "seed": self.seed,
        }
        # No placeholder metrics: backends log metric_dict values as real data points.
        self.tracklog.record("hparams", tracklog.HParam(self.hparams))
        self.tracklog.info(f"training {self.hparams['algorithm']} on CartPole-v1")

    def _on_step(self) -> bool:
        if self.num_timesteps >= self.next_at:
            self.next_at += self.every
            self._evaluate()
        return True

    def _on_training_end(self) -> None:
        final_return = (
            self.last_return if self.last_step == self.num_timesteps else self._evaluate()
        )
        self.env.close()
        final = {"final/eval_return": final_return}
        self.tracklog.record("hparams", tracklog.HParam(self.hparams, final))
        self.tracklog.dump(step=self.num_timesteps)

    def _evaluate(self) -> float:
        frames, episode_return = self._play()
        self.tracklog.record("eval/return", episode_return)
        self.tracklog.record("eval/video", tracklog.Video(frames, fps=25))
        self.tracklog.dump(step=self.num_timesteps)
        self.tracklog.info(f"evaluation at step {self.num_timesteps}: return {episode_return:g}")
        self.last_step, self.last_return = self.num_timesteps, episode_return
        return episode_return

    def _play(self) -> tuple[npt.NDArray[np.uint8], float]:
        observation, _ = self.env.reset(seed=self.seed)
        frames: list[npt.NDArray[np.uint8]] = []
        total, done, t = 0.0, False, 0
        while not done:
            if t % 2 == 0:  # 25 fps from CartPole's 50, at half resolution: small MP4s
                frame: Any = self.env.render()
                frames.append(np.asarray(frame)[::2, ::2])
            action, _ = self.model.predict(observation, deterministic=True)
            observation, reward, terminated, truncated, _ = self.env.step(int(action))
            total += float(reward)
            done = terminated or truncated
            t += 1
        # (T,H,W,C) -> (T,C,H,W), as tracklog.Video (like SB3's) expects
        return np.stack(frames).transpose(0, 3, 1, 2), total


def _check_mlflow(tracking_uri: str, run_id: str, out: TextIO) -> bool:
    """Read the run back with MLflow's own client and say where to look at it."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    points = client.get_metric_history(run_id, "rollout/ep_rew_mean")
    # mlflow leaves list_artifacts's path parameter unannotated.
    videos = [entry.path for entry in client.list_artifacts(run_id, "videos/eval/video")]  # pyright: ignore[reportUnknownMemberType]
    print(
        f"MLflow run {run_id} ({run.info.status}): {len(points)} rollout/ep_rew_mean points, "
        f"{len(run.data.params)} params, {len(videos)} videos",
        file=out,
    )
    print(f"  look at it: mlflow ui --backend-store-uri {tracking_uri}", file=out)
    return len(points) >= 2 and len(videos) >= 1


def _check_wandb(run_dir: Path, out: TextIO) -> bool:
    """Read the offline run back from its .wandb log and say how to upload it."""
    run = read_wandb_offline(run_dir)
    curve = [row for row in run.rows if "rollout/ep_rew_mean" in row.values]
    videos = [row for row in run.rows if "eval/video" in row.values]
    print(
        f"W&B offline run {run.run_id}: {len(curve)} rollout/ep_rew_mean rows, "
        f"{len(run.config)} config entries, {len(videos)} MP4 videos",
        file=out,
    )
    print(f"  upload it: wandb sync {run_dir}", file=out)
    return len(curve) >= 2 and len(videos) >= 1


def missing_dependency() -> str | None:
    """Why the demo cannot run here (pygame, which renders the videos, is absent), or None."""
    if importlib.util.find_spec("pygame") is None:
        return "pygame"
    return None


def run_demo(
    settings: LoggerSettings | Mapping[str, object] | str | os.PathLike[str] | None = None,
    *,
    steps: int = 60_000,
    video_every: int = 20_000,
    seed: int = 0,
    out: TextIO | None = None,
) -> int:
    """Train, log, read everything back; 0 if the agent learned and every output has it.

    ``settings`` defaults to :data:`DEFAULT_SETTINGS`; ``TRACKLOG_*`` environment
    variables override it as they do any settings. The summary goes to ``out``
    (standard output); a failed check is explained on standard error and returns 1.
    """
    out = out or cast(TextIO, sys.stdout)  # typeshed: sys.stdout may be None
    torch.set_num_threads(1)  # a 64x64 MLP runs faster on one thread than on two
    os.environ.setdefault("WANDB_SILENT", "true")
    resolved = load_settings(DEFAULT_SETTINGS if settings is None else settings)
    progress = _progress_file(resolved)
    if progress is None:
        print(
            "tracklog demo reads its learning curve back from the JSONL or CSV file: "
            "add an output of type jsonl or csv to the settings",
            file=sys.stderr,
        )
        return 1
    with tracklog.build_logger(resolved) as logger:
        # Run twice, the demo's second run goes to runs/demo_2: read back where it went.
        resolved = logger.settings or resolved
        progress = _progress_file(resolved) or progress
        mlflow_runs = [
            (output.settings.tracking_uri, output.run_id)
            for output in logger.output_formats
            if isinstance(output, tracklog.MLFlowOutputFormat)
        ]
        wandb_runs = [
            output.run_dir
            for output in logger.output_formats
            if isinstance(output, tracklog.WandBOutputFormat)
        ]
        env = make_vec_env("CartPole-v1", n_envs=4, seed=seed)
        model = PPO("MlpPolicy", env, n_steps=256, batch_size=256, n_epochs=10, seed=seed)
        model.set_logger(logger)
        # SB3 types learn's callback parameter with a bare Callable.
        model.learn(steps, callback=EvalVideoCallback(logger, video_every, seed))  # pyright: ignore[reportUnknownMemberType]
    return _check(resolved.run_dir, progress, mlflow_runs, wandb_runs, out)


Reader = Callable[[Path], list[LoggedRow]]


def _progress_file(settings: LoggerSettings) -> tuple[Path, Reader] | None:
    """The JSONL file the demo reads back (else the CSV file), or None if neither is logged."""
    files: list[tuple[Path, Reader]] = [
        (settings.resolve(output.path), read_jsonl)
        for output in settings.outputs
        if isinstance(output, JsonlOutput)
    ]
    files += [
        (settings.resolve(output.path), read_csv)
        for output in settings.outputs
        if isinstance(output, CsvOutput)
    ]
    return files[0] if files else None


def _check(
    run_dir: Path,
    progress: tuple[Path, Reader],
    mlflow_runs: list[tuple[str, str]],
    wandb_runs: list[Path],
    out: TextIO,
) -> int:
    path, read = progress
    rows = read(path)
    curve = [
        (row.step, float(reward))
        for row in rows
        if isinstance(reward := row.values.get("rollout/ep_rew_mean"), int | float)
        and not isinstance(reward, bool)
    ]
    videos = [row for row in rows if "eval/video" in row.values]
    print(
        f"\n{run_dir}: {len(curve)} dumps, {len(videos)} evaluation videos under media/", file=out
    )
    if len(curve) < 2:
        print("no learning curve was logged (train for more steps)", file=sys.stderr)
        return 1
    for tracking_uri, run_id in mlflow_runs:
        if not _check_mlflow(tracking_uri, run_id, out):
            return 1
    for wandb_dir in wandb_runs:
        if not _check_wandb(wandb_dir, out):
            return 1
    (first_step, first), (last_step, last) = curve[0], curve[-1]
    print(
        f"rollout/ep_rew_mean: {first:.1f} (step {first_step}) -> {last:.1f} (step {last_step})",
        file=out,
    )
    print(f"  plot it: tracklog plot {run_dir} --key rollout/ep_rew_mean", file=out)
    if not last > first:
        print("the agent did not improve", file=sys.stderr)
        return 1
    return 0
