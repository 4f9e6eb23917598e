"""Training-thread time per dump of 50 scalars: tracklog against SB3's own Logger.

Both loggers write their file outputs into a temporary directory; console output goes
to /dev/null for both, so terminal speed does not count. The two are interleaved in
one process, dump by dump, so machine drift hits both alike. Between dumps a little
GIL-releasing NumPy work stands in for training.

    python bench/bench_dump.py [--dumps 2000]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from stable_baselines3.common.logger import configure

import tracklog

KEYS = [f"group{i % 5}/metric_{i}" for i in range(50)]


def _work(matrix: np.ndarray) -> None:
    np.dot(matrix, matrix)  # releases the GIL, as a training step's kernels do


def _one_dump(
    record: Callable[[str, float], None], dump: Callable[[int], None], step: int
) -> float:
    start = time.perf_counter()
    for i, key in enumerate(KEYS):
        record(key, float(step * 50 + i) / 7.0)
    dump(step)
    return time.perf_counter() - start


def _quantiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(0.99 * (len(ordered) - 1))]


def _report(name: str, samples: list[float]) -> float:
    median, p99 = _quantiles(samples)
    print(f"  {name:<38} median {median * 1e3:7.3f} ms   p99 {p99 * 1e3:7.3f} ms")
    return median


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dumps", type=int, default=2000)
    args = parser.parse_args()
    matrix = np.random.default_rng(0).random((128, 128))
    outputs = [{"type": "console"}, {"type": "file"}, {"type": "jsonl"}, {"type": "csv"}]
    sb3_times: list[float] = []
    our_times: list[float] = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        open(os.devnull, "w") as null,
        contextlib.redirect_stdout(null),
    ):
        sb3 = configure(str(Path(tmp) / "sb3"), ["stdout", "log", "csv"])
        ours = tracklog.build_logger({"run_dir": str(Path(tmp) / "ours"), "outputs": outputs})
        for step in range(args.dumps):
            _work(matrix)
            sb3_times.append(_one_dump(sb3.record, sb3.dump, step))
            _work(matrix)
            our_times.append(_one_dump(ours.record, ours.dump, step))
        sb3.close()
        ours.close()
    print(f"dump of {len(KEYS)} scalars, {args.dumps} dumps, interleaved")
    sb3_median = _report("SB3 Logger (stdout+log+csv)", sb3_times)
    our_median = _report("tracklog (console+file+jsonl+csv)", our_times)
    ratios = [ours / theirs for ours, theirs in zip(our_times, sb3_times, strict=True)]
    print(
        f"  ratio tracklog/SB3: median of per-dump ratios {statistics.median(ratios):.2f}, "
        f"ratio of medians {our_median / sb3_median:.2f}"
    )


if __name__ == "__main__":
    main()
