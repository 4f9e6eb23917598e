"""The demo `make demo` runs: PPO learns CartPole-v1 with tracklog as its SB3 logger.

It logs SB3's own metrics, the PPO hyperparameters as an ``HParam`` (at the start,
so a crashed run still has them, and again at the end with the final scores), and an
evaluation episode as a ``Video`` every ``--video-every`` steps. Then it reads the
JSONL file and the MLflow run back and checks that the agent learned.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import numpy.typing as npt
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

import tracklog
from tracklog.readers import read_jsonl, read_wandb_offline


class EvalVideoCallback(BaseCallback):
    """Every ``every`` steps, plays one greedy episode and records it as a Video."""

    def __init__(self, logger: tracklog.Logger, every: int, seed: int) -> None:
        super().__init__()
        self.tracklog = logger
        self.every = every
        self.seed = seed
        self.next_at = every
        self.hparams: dict[str, bool | int | float | str | None] = {}
        self.last_step, self.last_return = -1, 0.0
        self.env = gym.make("CartPole-v1", render_mode="rgb_array")

    def _on_training_start(self) -> None:
        model = self.model
        assert isinstance(model, PPO)
        hparams: dict[str, bool | int | float | str | None] = {
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
        self.hparams = hparams
        # No placeholder metrics: backends log metric_dict values as real data points.
        self.tracklog.record("hparams", tracklog.HParam(hparams))
        self.tracklog.info(f"training {hparams['algorithm']} on CartPole-v1")

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


def _check_mlflow(tracking_uri: str, run_id: str) -> bool:
    """Read the run back with MLflow's own client and say where to look at it."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    points = client.get_metric_history(run_id, "rollout/ep_rew_mean")
    videos = [entry.path for entry in client.list_artifacts(run_id, "videos/eval/video")]
    print(
        f"MLflow run {run_id} ({run.info.status}): {len(points)} rollout/ep_rew_mean points, "
        f"{len(run.data.params)} params, {len(videos)} videos"
    )
    print(f"  look at it: mlflow ui --backend-store-uri {tracking_uri}")
    return len(points) >= 2 and len(videos) >= 1


def _check_wandb(run_dir: Path) -> bool:
    """Read the offline run back from its .wandb log and say how to upload it."""
    run = read_wandb_offline(run_dir)
    curve = [row for row in run.rows if "rollout/ep_rew_mean" in row.values]
    videos = [row for row in run.rows if "eval/video" in row.values]
    print(
        f"W&B offline run {run.run_id}: {len(curve)} rollout/ep_rew_mean rows, "
        f"{len(run.config)} config entries, {len(videos)} MP4 videos"
    )
    print(f"  upload it: .venv/bin/wandb sync {run_dir}")
    return len(curve) >= 2 and len(videos) >= 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--settings", default="examples/demo.yaml", help="tracklog settings file")
    parser.add_argument("--timesteps", type=int, default=60_000)
    parser.add_argument("--video-every", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # a 64x64 MLP runs faster on one thread than on two
    os.environ.setdefault("WANDB_SILENT", "true")
    with tracklog.build_logger(args.settings) as logger:
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
        env = make_vec_env("CartPole-v1", n_envs=4, seed=args.seed)
        model = PPO("MlpPolicy", env, n_steps=256, batch_size=256, n_epochs=10, seed=args.seed)
        model.set_logger(logger)
        model.learn(args.timesteps, callback=EvalVideoCallback(logger, args.video_every, args.seed))
        run_dir = Path(logger.get_dir() or ".")

    curve: list[tuple[int, float]] = []
    for row in read_jsonl(run_dir / "progress.jsonl"):
        reward = row.values.get("rollout/ep_rew_mean")
        if isinstance(reward, float):
            curve.append((row.step, reward))
    videos = [row for row in read_jsonl(run_dir / "progress.jsonl") if "eval/video" in row.values]
    print(f"\n{run_dir}: {len(curve)} dumps, {len(videos)} evaluation videos under media/")
    if len(curve) < 2:
        print("no learning curve was logged", file=sys.stderr)
        return 1
    for tracking_uri, run_id in mlflow_runs:
        if not _check_mlflow(tracking_uri, run_id):
            return 1
    for wandb_dir in wandb_runs:
        if not _check_wandb(wandb_dir):
            return 1
    (first_step, first), (last_step, last) = curve[0], curve[-1]
    print(f"rollout/ep_rew_mean: {first:.1f} (step {first_step}) -> {last:.1f} (step {last_step})")
    if not last > first:
        print("the agent did not improve", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
