"""A sweep into one tracking server: aggregate points/s from 1, 4 and 8 processes.

A throwaway PostgreSQL cluster on 127.0.0.1 (``tests/postgres.py``) backs a real
``mlflow server``. For each process count the same server takes, in turn:

- the ceiling: each process calls ``MlflowClient.log_batch`` with 1000 metrics per
  call (MLflow's limit per request) as fast as it can;
- tracklog: each process builds a logger from one settings dict and dumps 50
  scalars per dump as fast as it can, then ``close()``s (every point delivered, the
  run FINISHED).

Both send the same points (keys, steps, values), into a run per process. The clock
runs from the moment every process is ready (imported, run created) until the last
one is done. After each run every point is read back with ``MlflowClient``; any point
missing or repeated is a failure (exit status 1).

Each process count is measured ``--rounds`` times, the ceiling and tracklog
alternating, and the medians are compared (other load on the machine moves single
runs by tens of percent).

    python bench/bench_scale.py [--processes 1 4 8] [--dumps 400] [--rounds 3] [--workers 2]
"""

from __future__ import annotations

import os

# No telemetry from the server or the clients: nothing leaves the loopback; and no
# "View run at" line from every process that ends a run.
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"

import argparse
import multiprocessing
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.postgres import PostgresServer
from tests.servers import MlflowServer

KEYS = 50
PER_CALL = 1000  # MLflow's MAX_METRICS_PER_BATCH: the most one request may carry
STEPS_PER_CALL = PER_CALL // KEYS
TARGET = 0.8


def key(index: int) -> str:
    return f"train/metric_{index:02d}"


def value(worker: int, index: int, step: int) -> float:
    return worker * 1_000_000 + index * 1_000 + step + 0.5


@dataclass(frozen=True)
class Task:
    url: str
    experiment: str
    worker: int
    dumps: int
    run_dir: str


@dataclass(frozen=True)
class Done:
    worker: int
    run_id: str
    started: float
    finished: float
    cpu: float  # seconds of CPU (all threads) between started and finished


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def ceiling(task: Task, barrier: Barrier) -> Done:
    """One process of the ceiling: ``log_batch`` calls of 1000 metrics, back to back."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(task.url)
    experiment = client.get_experiment_by_name(task.experiment)
    assert experiment is not None
    run_id = client.create_run(experiment.experiment_id).info.run_id
    barrier.wait()
    started, cpu = time.time(), _cpu()
    for first in range(0, task.dumps, STEPS_PER_CALL):
        now = int(time.time() * 1000)
        metrics = [
            Metric(key(index), value(task.worker, index, step), now, step)
            for step in range(first, min(first + STEPS_PER_CALL, task.dumps))
            for index in range(KEYS)
        ]
        client.log_batch(run_id, metrics=metrics)
    client.set_terminated(run_id)
    return Done(task.worker, run_id, started, time.time(), _cpu() - cpu)


def through_tracklog(task: Task, barrier: Barrier) -> Done:
    """One process of the sweep: a tracklog logger, 50 scalars per dump, then close()."""
    import tracklog
    from tracklog._outbox import RemoteOutput

    settings = {
        "run_dir": task.run_dir,
        "group": "bench-scale",
        "job": task.worker,
        "outputs": [{"type": "mlflow", "tracking_uri": task.url, "experiment": task.experiment}],
        "delivery": {"close_timeout": 600},
    }
    logger = tracklog.build_logger(settings)
    (output,) = logger.output_formats
    # The MLflow output runs in the delivery process; this is its stand-in. Its run id is
    # there once the run is created (and gone with the queue after close()).
    assert isinstance(output, RemoteOutput)
    run_id = output.run_id
    names = [key(index) for index in range(KEYS)]
    barrier.wait()
    started, cpu = time.time(), _cpu()
    for step in range(task.dumps):
        for index, name in enumerate(names):
            logger.record(name, value(task.worker, index, step))
        logger.dump(step)
    logger.close()
    return Done(task.worker, run_id, started, time.time(), _cpu() - cpu)


Worker = Callable[[Task, Barrier], Done]


def _child(
    worker: Worker, task: Task, barrier: Barrier, results: multiprocessing.queues.Queue[object]
) -> None:
    try:
        results.put(worker(task, barrier))
    except BaseException as error:
        barrier.abort()
        results.put(f"worker {task.worker}: {type(error).__name__}: {error}")
        raise


@dataclass(frozen=True)
class Measured:
    points_per_s: float
    seconds: float
    cpu_per_kpoint: float  # client CPU, ms per 1000 points
    lost: int
    repeated: int


def measure(
    context: multiprocessing.context.ForkServerContext,
    worker: Worker,
    url: str,
    processes: int,
    dumps: int,
    root: Path,
    round_: int,
) -> Measured:
    from mlflow import MlflowClient

    experiment = f"{worker.__name__}-{processes}-{round_}"
    MlflowClient(url).create_experiment(experiment)
    barrier = context.Barrier(processes)
    results: multiprocessing.queues.Queue[object] = context.Queue()
    children = [
        context.Process(
            target=_child,
            args=(
                worker,
                Task(url, experiment, number, dumps, str(root / f"{experiment}-{number}")),
                barrier,
                results,
            ),
        )
        for number in range(processes)
    ]
    for child in children:
        child.start()
    done: list[Done] = []
    for _ in children:
        result = results.get(timeout=1800)
        if not isinstance(result, Done):
            raise RuntimeError(str(result))
        done.append(result)
    for child in children:
        child.join()
    seconds = max(item.finished for item in done) - min(item.started for item in done)
    lost, repeated = check(url, done, dumps)
    points = processes * dumps * KEYS
    cpu = sum(item.cpu for item in done) * 1e6 / points
    return Measured(points / seconds, seconds, cpu, lost, repeated)


def check(url: str, done: list[Done], dumps: int) -> tuple[int, int]:
    """Points missing and points repeated, over every key of every run; all FINISHED."""
    from mlflow import MlflowClient

    client = MlflowClient(url)

    def points(item: tuple[Done, int]) -> tuple[int, int]:
        run, index = item
        history = client.get_metric_history(run.run_id, key(index))
        got = [(point.step, point.value) for point in history]
        expected = {(step, value(run.worker, index, step)) for step in range(dumps)}
        lost = len(expected - set(got))
        return lost, len(got) - (len(expected) - lost)

    with ThreadPoolExecutor(8) as pool:
        counted = list(pool.map(points, [(run, index) for run in done for index in range(KEYS)]))
    for run in done:
        status = client.get_run(run.run_id).info.status
        if status != "FINISHED":
            raise RuntimeError(f"run {run.run_id} is {status}, not FINISHED")
    return sum(lost for lost, _ in counted), sum(repeated for _, repeated in counted)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--dumps", type=int, default=400, help="dumps of 50 scalars per process")
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each, median")
    parser.add_argument("--workers", type=int, default=2, help="mlflow server --workers")
    args = parser.parse_args()
    if args.dumps % STEPS_PER_CALL:
        parser.error(f"--dumps must be a multiple of {STEPS_PER_CALL}")
    context = multiprocessing.get_context("forkserver")
    # Imported once in the fork server, not once per process (~3 s of CPU each).
    context.set_forkserver_preload(["tracklog", "tracklog.outputs.mlflow", "mlflow"])
    postgres = PostgresServer()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        postgres.start()
        server = MlflowServer(
            Path(tmp) / "server", backend_store_uri=postgres.uri, workers=args.workers
        )
        try:
            server.start()
            return _report(context, server.url, args, Path(tmp))
        finally:
            server.stop()
            postgres.remove()


def _report(
    context: multiprocessing.context.ForkServerContext,
    url: str,
    args: argparse.Namespace,
    tmp: Path,
) -> int:
    print(
        f"{args.dumps} dumps x {KEYS} scalars per process into mlflow server on PostgreSQL "
        f"(--workers {args.workers}, {os.cpu_count()} cores); median of {args.rounds} rounds"
    )
    print(
        f"{'processes':>9}  {'ceiling pts/s':>13}  {'tracklog pts/s':>14}  {'ratio':>5}  "
        f"{'client CPU ms/1k pts':>20}  {'lost':>4}  {'repeated':>8}  target   "
        "rounds (ceiling / tracklog pts/s)"
    )
    failed = False
    for processes in args.processes:
        tops: list[Measured] = []
        ours: list[Measured] = []
        for round_ in range(args.rounds):
            tops.append(measure(context, ceiling, url, processes, args.dumps, tmp, round_))
            ours.append(measure(context, through_tracklog, url, processes, args.dumps, tmp, round_))
        top = statistics.median(item.points_per_s for item in tops)
        our = statistics.median(item.points_per_s for item in ours)
        cpu = (
            f"{statistics.median(item.cpu_per_kpoint for item in tops):.0f} / "
            f"{statistics.median(item.cpu_per_kpoint for item in ours):.0f}"
        )
        lost = sum(item.lost for item in tops + ours)
        repeated = sum(item.repeated for item in tops + ours)
        failed |= bool(lost or repeated)
        verdict = "met" if our / top >= TARGET else "not met"
        rounds = " ".join(
            f"{a.points_per_s:,.0f}/{b.points_per_s:,.0f}" for a, b in zip(tops, ours, strict=True)
        )
        print(
            f"{processes:>9}  {top:>13,.0f}  {our:>14,.0f}  {our / top:>5.2f}  {cpu:>20}  "
            f"{lost:>4}  {repeated:>8}  {verdict:<7}  {rounds}",
            flush=True,
        )
    print(f"target: tracklog >= {TARGET:.0%} of the ceiling, nothing lost or repeated")
    if failed:
        print("FAILED: points were lost or repeated")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
