"""Training-thread cost of logging every episode (``EpisodeCallback``'s ``dump_rows``).

With all seven outputs (console and ``train.log`` excluded, as EpisodeCallback does),
each call writes the episodes that ended in one env step, ``--per-call`` at a time (a
4-env VecEnv where every env ends together is the worst case). Interleaved in one
process with two anchors: SB3's own Logger (CSV + log) dumping the same values one
episode at a time (what ``dump_values`` per episode costs a plain SB3 user), and one
``step()`` of a 4-env CartPole VecEnv with Monitor (the work an episode row rides on).
Nothing pins NumPy's threads. Every row is then read back from the JSONL file.

    python bench/bench_episodes.py [--calls 2000] [--per-call 4]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import configure

import tracklog
from tracklog.readers import read_jsonl


def _median_p99(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(0.99 * (len(ordered) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--per-call", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(open(os.devnull, "w")):
        root = Path(folder)
        outputs: list[dict[str, object]] = [
            {"type": "console"},
            {"type": "file"},
            {"type": "jsonl"},
            {"type": "csv"},
            {"type": "tensorboard"},
            {"type": "mlflow", "tracking_uri": f"sqlite:///{root / 'mlflow.db'}"},
            {"type": "wandb", "project": "bench", "mode": "offline"},
        ]
        logger = tracklog.build_logger({"run_dir": str(root / "tracklog"), "outputs": outputs})
        sb3 = configure(str(root / "sb3"), ["csv", "log"])
        env = make_vec_env("CartPole-v1", n_envs=4, seed=0)
        env.reset()
        actions = np.zeros(4, dtype=np.int64)
        ours: list[float] = []
        theirs: list[float] = []
        stepping: list[float] = []
        for call in range(args.calls):
            rows = [
                (
                    call * 4,
                    {
                        "episode/return": float(call + i),
                        "episode/length": call + i,
                        "episode/time": call / 10,
                    },
                )
                for i in range(args.per_call)
            ]
            start = time.perf_counter()
            logger.dump_rows(rows, exclude=("stdout", "log"))
            ours.append((time.perf_counter() - start) / args.per_call)
            start = time.perf_counter()
            for step, values in rows:
                for key, number in values.items():
                    sb3.record(key, number)
                sb3.dump(step)
            theirs.append((time.perf_counter() - start) / args.per_call)
            start = time.perf_counter()
            env.step(actions)
            stepping.append(time.perf_counter() - start)
        logger.close()
        sb3.close()
        env.close()
        logged = sum(
            "episode/return" in row.values
            for row in read_jsonl(root / "tracklog" / "progress.jsonl")
        )
    expected = args.calls * args.per_call
    ours_median, ours_p99 = _median_p99(ours)
    theirs_median, _ = _median_p99(theirs)
    step_median, _ = _median_p99(stepping)
    print(f"every episode, {args.per_call} per call, seven outputs ({args.calls} calls)")
    print(
        f"  tracklog dump_rows, per episode      median {ours_median * 1e3:.3f} ms  "
        f"p99 {ours_p99 * 1e3:.3f} ms"
    )
    print(f"  SB3 Logger, a dump per episode       median {theirs_median * 1e3:.3f} ms")
    print(f"  one step() of 4 CartPole envs        median {step_median * 1e3:.3f} ms")
    print(f"  ratio to SB3's dump per episode      {ours_median / theirs_median:.2f}x")
    print(f"  episodes/s at 10% of the training thread: {0.1 / ours_median:,.0f}")
    print(f"  read back: {logged} of {expected} episode rows in JSONL")
    if logged != expected:
        raise SystemExit("episode rows missing")


if __name__ == "__main__":
    main()
