"""Training-thread time per dump of 50 scalars against a real ``mlflow server``.

tracklog's MLflow output (one ``log_batch`` per dump) against the seed project's
approach (one synchronous ``log_metric`` per key), interleaved in one process against
the same server. Afterwards every point of both runs is read back with MlflowClient:
a fast run that lost data would be a failure.

    python bench/bench_mlflow.py [--dumps 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlflow import MlflowClient
from tests.servers import MlflowServer

import tracklog
from tracklog._outbox import RemoteOutput

KEYS = [f"group{i % 5}/metric_{i}" for i in range(50)]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dumps", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = MlflowServer(Path(tmp) / "server")
        server.start()
        try:
            return _run(server.url, Path(tmp), args.dumps)
        finally:
            server.stop()


def _run(url: str, tmp: Path, dumps: int) -> int:
    client = MlflowClient(url)
    experiment = client.create_experiment("bench")
    seed_run = client.create_run(experiment, run_name="seed-per-key").info.run_id
    logger = tracklog.build_logger(
        {
            "run_dir": str(tmp / "run"),
            "outputs": [{"type": "mlflow", "tracking_uri": url, "experiment": "bench"}],
        }
    )
    ours_run = next(  # the MLflow output runs in the delivery process: its stand-in
        output.run_id
        for output in logger.output_formats
        if isinstance(output, RemoteOutput) and output.settings.type == "mlflow"
    )
    seed_times: list[float] = []
    our_times: list[float] = []
    for step in range(dumps):
        start = time.perf_counter()
        for i, key in enumerate(KEYS):  # the seed's MLFlowOutputFormat.write
            client.log_metric(seed_run, key, step + i / 7, step=step)
        seed_times.append(time.perf_counter() - start)

        start = time.perf_counter()
        for i, key in enumerate(KEYS):
            logger.record(key, step + i / 7)
        logger.dump(step)
        our_times.append(time.perf_counter() - start)
    logger.close()
    client.set_terminated(seed_run)

    lost = 0
    for run_id in (seed_run, ours_run):
        for i, key in enumerate(KEYS):
            points = {(p.step, p.value) for p in client.get_metric_history(run_id, key)}
            lost += len({(step, step + i / 7) for step in range(dumps)} - points)
    seed, ours = statistics.median(seed_times), statistics.median(our_times)
    print(f"MLflow server, dump of {len(KEYS)} scalars, {dumps} dumps, interleaved")
    print(f"  seed: one log_metric per key     median {seed * 1e3:8.1f} ms")
    print(f"  tracklog: log_batch per dump     median {ours * 1e3:8.1f} ms")
    print(f"  tracklog is {seed / ours:.0f}x faster (target >= 20x); points lost: {lost}")
    return 1 if lost or seed / ours < 20 else 0


if __name__ == "__main__":
    sys.exit(main())
