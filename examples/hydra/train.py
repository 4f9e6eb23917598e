"""PPO on CartPole-v1, configured by Hydra, logged by tracklog (see docs/hydra.md).

    python examples/hydra/train.py                                  # conf/logging/local.yaml
    python examples/hydra/train.py logging=server ppo.learning_rate=1e-3
    python examples/hydra/train.py --multirun logging=offline_wandb \\
        ppo.learning_rate=1e-3,3e-4 seed=0,1

``cfg.logging`` goes to :func:`tracklog.build_logger` as it is, a ``DictConfig``. The
rest of the configuration, resolved, is logged as a :class:`tracklog.HParam`: MLflow
params and W&B config, so every job of a sweep carries the values its overrides set.
In a ``--multirun`` sweep, tracklog reads Hydra's job number and overrides itself and
tags each job's run with them.

Needs the ``hydra`` extra: ``pip install 'tracklog[hydra]'``.
"""

from __future__ import annotations

from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

import tracklog


def plain(cfg: DictConfig) -> dict[str, object]:
    """``cfg`` as plain dicts, every interpolation resolved; a ``???`` left unset raises."""
    data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert isinstance(data, dict)
    return {str(key): value for key, value in data.items()}


def hyperparameters(cfg: DictConfig) -> dict[str, object]:
    """Everything but the logging settings: what a run is compared by."""
    return {key: value for key, value in plain(cfg).items() if key != "logging"}


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> float:
    """Train, evaluate, and return the mean evaluation reward (for sweepers that optimise)."""
    torch.set_num_threads(1)  # a small MLP runs faster on one thread
    hparams = hyperparameters(cfg)
    ppo: dict[str, Any] = plain(cfg.ppo)  # PPO's keyword arguments, checked by PPO
    total_timesteps = int(ppo.pop("total_timesteps"))
    with tracklog.build_logger(cfg.logging) as logger:
        # Dumped at once: a job that crashes still has its hyperparameters logged.
        logger.record("hparams", tracklog.HParam(hparams))
        logger.dump(step=0)
        env = make_vec_env(cfg.env_id, n_envs=cfg.n_envs, seed=cfg.seed)
        model = PPO(env=env, seed=cfg.seed, **ppo)
        model.set_logger(logger)
        model.learn(total_timesteps=total_timesteps)
        eval_env = make_vec_env(cfg.env_id, n_envs=1, seed=cfg.seed + 1000)
        mean_reward, _ = evaluate_policy(model, eval_env, n_eval_episodes=cfg.eval_episodes)
        assert isinstance(mean_reward, float)
        logger.record("hparams", tracklog.HParam(hparams, {"eval/mean_reward": mean_reward}))
        logger.dump(step=model.num_timesteps)
        logger.info(f"eval/mean_reward {mean_reward:g} after {model.num_timesteps} steps")
    return mean_reward


if __name__ == "__main__":
    main()
