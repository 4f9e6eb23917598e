"""Delivery through the delivery process: the training thread's cost, and nothing lost.

Every part logs to the seven outputs (console, train.log, JSONL, CSV, TensorBoard, a
real ``mlflow server`` on loopback and a W&B offline run) unless it says otherwise, and
prints each figure beside its anchor, measured in the same run, and its target:

(a) a dump of 50 scalars with NumPy work on every core (a 384x384 np.dot) before each,
    interleaved dump by dump with SB3's own Logger (stdout + log + csv; console to
    /dev/null for both): the wall time of dump() on the training thread, median <= 0.7x
    SB3's, p99 <= 1.5 ms, max <= 20 ms; its thread CPU time and record()+dump() beside;
(b) the same dumps against the seed project's pattern, one ``log_metric`` per key to
    the same mlflow server (interleaved with (a)): >= 2,000x cheaper (tracklog's
    record()+dump() against the seed's 50 calls);
(c) record + dump of a 200-frame 256x256 RGB video, training between videos: <= 20 ms
    on the training thread, and the trainer's RSS grows by no more than about one copy
    of the frames over a few videos;
(d) SB3 PPO on CartPole (torch on every core), each run in a fresh process, tracklog
    with the seven outputs against SB3's Logger alone (its stdout + csv), runs
    interleaved: median wall time (build + PPO + learn + close) <= 1.01x;
(e) the mlflow server SIGKILLed for 120 s, then restarted on its port and store, at
    20 dumps/s: the trainer's RSS grows <= 16 MiB, and every point arrives exactly once;
(f) ``build_logger`` with MLflow + W&B in a fresh process that has imported SB3:
    returns in <= 0.5 s;
(g) a trainer subprocess dumping at 100 and at 1,000 dumps/s, ``kill -9``-ed at a random
    moment (20 times each): every row whose ``dump()`` returned (the child prints its
    step after) reaches MLflow, W&B and TensorBoard by itself (the delivery process is
    waited for, nothing is replayed by hand);
(h) freshness with healthy backends (training on every core meanwhile): a dumped row
    is readable in MLflow, the W&B run file and TensorBoard within 1 s (polled; the
    latency distribution is printed), and at once after ``logger.flush()``.

After each part every point is read back with each backend's own reader (MlflowClient,
tracklog.readers for JSONL, CSV and the W&B run, TensorBoard's EventAccumulator): a fast
run that lost data fails. The exit status is 1 if any target or check fails.

NumPy's BLAS and torch use every core, as in a user's trainer: nothing here pins them.

    python bench/bench_delivery.py [--quick] [--only a,b,c,d,e,f,g,h] [--profile N]

``--quick`` is a smoke run of every part (a few minutes; its figures are not the
targets' evidence); ``--profile N`` adds a cProfile of N more dumps after (a).
"""

from __future__ import annotations

import os

# Nothing leaves the loopback; no "View run at" line from every run the delivery
# process ends; W&B quiet. The delivery process and the children inherit these.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
os.environ.setdefault("WANDB_SILENT", "true")

import argparse
import contextlib
import gc
import importlib
import json
import math
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# What a trainer has imported anyway (SB3 brings torch and NumPy). MLflow, W&B and
# TensorBoard are imported only where this process itself talks to them (the seed's
# anchor, reading back), so a child process of (d), (f) and (g) never has them.
import numpy as np
import numpy.typing as npt
import psutil
from stable_baselines3.common import logger as sb3_logger
from tests.servers import MlflowServer
from tests.tensorboard_readback import read_events, scalars

import tracklog
from tracklog.readers import LoggedRow, read_csv, read_jsonl, read_wandb_offline

if TYPE_CHECKING:
    from mlflow import MlflowClient

KEYS = [f"group{i % 5}/metric_{i}" for i in range(50)]
VIDEO_KEY = "eval/video"
EXPERIMENT = "bench"
MATRIX_SIZE = 384  # one np.dot of it: a few ms of work on every core, like a training step
MiB = 2**20

Expected = list[tuple[int, dict[str, float]]]  # (step, {key: value}) per dump, in order


def value(step: int, i: int) -> float:
    return step + i / 7


def expected_rows(steps: Sequence[int], keys: Sequence[str] = KEYS) -> Expected:
    return [(step, {key: value(step, i) for i, key in enumerate(keys)}) for step in steps]


# Reporting -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Line:
    part: str
    what: str
    figure: str
    anchor: str
    target: str
    ok: bool


@dataclass
class Report:
    lines: list[Line] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def target(self, part: str, what: str, figure: str, anchor: str, target: str, ok: bool) -> None:
        line = Line(part, what, figure, anchor, target, ok)
        self.lines.append(line)
        print(
            f"({part}) {what}: {figure}   [anchor: {anchor}]   target {target}   "
            f"{'PASS' if ok else 'FAIL'}",
            flush=True,
        )
        if not ok:
            self.failed.append(f"({part}) {what}")

    def check(self, part: str, what: str, problems: list[str]) -> None:
        status = "PASS" if not problems else f"FAIL ({len(problems)} problem(s))"
        print(f"({part}) read back: {what}   {status}", flush=True)
        for problem in problems[:10]:
            print(f"      {problem}")
        self.lines.append(Line(part, f"read back: {what}", "", "", "nothing lost", not problems))
        if problems:
            self.failed.append(f"({part}) read back: {what}")

    def error(self, part: str, error: BaseException) -> None:
        traceback.print_exception(error)
        print(f"({part}) raised {type(error).__name__}: {error}   FAIL", flush=True)
        self.lines.append(Line(part, f"raised {type(error).__name__}", "", "", "", False))
        self.failed.append(f"({part}) raised {type(error).__name__}: {error}")

    def summary(self) -> None:
        section("Summary")
        for line in self.lines:
            verdict = "PASS" if line.ok else "FAIL"
            if line.figure:
                print(
                    f"  ({line.part}) {verdict}  {line.what}: {line.figure}  [anchor: "
                    f"{line.anchor}]  target {line.target}"
                )
            else:
                print(f"  ({line.part}) {verdict}  {line.what}")


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def quantile(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def spread(samples: Sequence[float], unit: Callable[[float], str] = ms) -> str:
    return (
        f"median {unit(statistics.median(samples))}, p99 {unit(quantile(samples, 0.99))}, "
        f"max {unit(max(samples))}"
    )


def load() -> str:
    """The machine's load average: other processes skew every figure (both sides alike)."""
    return " ".join(f"{figure:.2f}" for figure in os.getloadavg())


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


def reset_peak_rss() -> bool:
    """Reset VmHWM (Linux: writing 5 to clear_refs); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


def peak_rss() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def tree_cpu(pid: int) -> float:
    """CPU seconds used so far by process ``pid`` and its live descendants."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def settle(server: MlflowServer, timeout: float = 90.0) -> float:
    """Wait until the server's processes are idle; return the seconds waited."""
    assert server.process is not None
    start = time.perf_counter()
    before = tree_cpu(server.process.pid)
    while time.perf_counter() - start < timeout:
        time.sleep(1.0)
        now = tree_cpu(server.process.pid)
        if now - before < 0.05:
            break
        before = now
    return time.perf_counter() - start


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Console output goes to /dev/null: the same sink for tracklog and SB3."""
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield


def blas_threads() -> str:
    """How many threads NumPy's BLAS uses (threadpoolctl, when it is installed)."""
    try:
        threadpoolctl = importlib.import_module("threadpoolctl")
    except ImportError:
        return "unknown (no threadpoolctl)"
    pools = threadpoolctl.threadpool_info()
    return ", ".join(f"{pool['internal_api']} {pool['num_threads']}" for pool in pools) or "none"


def work(matrix: npt.NDArray[np.float64]) -> None:
    np.dot(matrix, matrix)  # BLAS on every core, the GIL released: a training step's kernels


@contextlib.contextmanager
def training_load(matrix: npt.NDArray[np.float64]) -> Iterator[None]:
    """np.dot on a thread of its own, back to back, while the block runs."""
    stop = threading.Event()

    def train() -> None:
        while not stop.is_set():
            work(matrix)

    thread = threading.Thread(target=train, name="bench-training", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# Loggers and runs ----------------------------------------------------------------------------
def seven_outputs(
    url: str, name: str, *, console: bool = True, **mlflow: object
) -> list[dict[str, object]]:
    outputs: list[dict[str, object]] = [{"type": "console"}] if console else []
    return [
        *outputs,
        {"type": "file"},
        {"type": "jsonl"},
        {"type": "csv"},
        {"type": "tensorboard"},
        {
            "type": "mlflow",
            "tracking_uri": url,
            "experiment": EXPERIMENT,
            "run_name": name,
            **mlflow,
        },
        {"type": "wandb", "project": "bench", "mode": "offline", "name": name},
    ]


def build(run_dir: Path, outputs: list[dict[str, object]], **delivery: object) -> tracklog.Logger:
    settings: dict[str, object] = {"run_dir": str(run_dir), "outputs": outputs}
    if delivery:
        settings["delivery"] = delivery
    return tracklog.build_logger(settings)


def published(logger: sb3_logger.Logger, kind: str, key: str = "run_id") -> str:
    """What the delivery process published for the logger's output of type ``kind``
    (waits until the backend started the run); call it before ``close()``."""
    from tracklog._outbox import RemoteOutput

    for output in logger.output_formats:
        if isinstance(output, RemoteOutput) and output.settings.type == kind:
            return output.published(key)
    raise LookupError(f"no {kind} output")


def delivery_pid() -> int | None:
    """This process's delivery process (tracklog starts one per training process)."""
    from tracklog._service import service

    return service().pid


def mlflow_client(url: str) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(url)


def experiment_id(client: MlflowClient) -> str:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT)


def find_run(client: MlflowClient, name: str) -> tuple[str, str]:
    """(run id, status) of the one run named ``name`` in the bench experiment."""
    runs = client.search_runs(
        [experiment_id(client)], filter_string=f"attributes.run_name = '{name}'"
    )
    if len(runs) != 1:
        raise LookupError(f"{len(runs)} MLflow runs named {name!r}")
    return runs[0].info.run_id, runs[0].info.status


def warm_up(url: str) -> float:
    """The server's first ~100 requests are about 3x slower than later ones: send them
    before anything is timed (so the seed's anchor in (b) is not inflated)."""
    client = mlflow_client(url)
    start = time.perf_counter()
    run = client.create_run(experiment_id(client), run_name="warm-up").info.run_id
    for i in range(150):
        client.log_metric(run, "warm-up", float(i), step=i)
    client.set_terminated(run)
    return time.perf_counter() - start


def child_env() -> dict[str, str]:
    """A child's environment: this one's, without settings that would leak into it."""
    dropped = ("TRACKLOG_", "MLFLOW_TRACKING_", "WANDB_SERVICE")
    return {name: text for name, text in os.environ.items() if not name.startswith(dropped)}


def child_command(kind: str, spec: dict[str, object]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", kind, json.dumps(spec)]


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` (not our child: an orphan) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


# Reading back --------------------------------------------------------------------------------
def same(a: object, b: object) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) == float(b) or (math.isnan(float(a)) and math.isnan(float(b)))
    return a == b


def by_key(expected: Expected) -> dict[str, list[tuple[int, float]]]:
    points: dict[str, list[tuple[int, float]]] = {}
    for step, values in expected:
        for key, number in values.items():
            points.setdefault(key, []).append((step, number))
    return points


def compare_points(
    name: str, key: str, got: list[tuple[int, float]], want: list[tuple[int, float]]
) -> list[str]:
    got, want = sorted(got), sorted(want)
    if len({step for step, _ in got}) != len(got):
        return [f"{name} {key}: a step is there twice ({len(got)} points)"]
    if len(got) != len(want):
        return [f"{name} {key}: {len(got)} points, expected {len(want)}"]
    if not all(g[0] == w[0] and same(g[1], w[1]) for g, w in zip(got, want, strict=True)):
        return [f"{name} {key}: steps or values differ"]
    return []


def check_mlflow(client: MlflowClient, run_id: str, expected: Expected) -> list[str]:
    """Every scalar of ``expected`` is in the run's history once, at its step, exactly."""
    problems: list[str] = []
    for key, points in sorted(by_key(expected).items()):
        history = client.get_metric_history(run_id, key)
        got = [(point.step, point.value) for point in history]
        problems += compare_points("MLflow", key, got, points)
    return problems


def check_tensorboard(folder: Path, expected: Expected) -> list[str]:
    """TensorBoard's EventAccumulator holds every scalar once (float32, as it keeps them)."""
    events = read_events(folder)
    tags = set(events.Tags().get("scalars", []))
    problems: list[str] = []
    for key, points in sorted(by_key(expected).items()):
        got = scalars(events, key) if key in tags else []
        want = [(step, float(np.float32(number))) for step, number in points]
        problems += compare_points("TensorBoard", key, got, want)
    return problems


def expected_keys(expected: Expected) -> set[str]:
    return {key for _, values in expected for key in values}


def check_rows(name: str, rows: list[LoggedRow], expected: Expected) -> list[str]:
    """``rows`` (JSONL or CSV) with a key of ``expected`` hold it in order, values exact."""
    keys = expected_keys(expected)
    rows = [row for row in rows if not keys.isdisjoint(row.values)]
    if len(rows) != len(expected):
        return [f"{name}: {len(rows)} rows, expected {len(expected)}"]
    problems = []
    for index, (row, (step, values)) in enumerate(zip(rows, expected, strict=True)):
        if row.step != step or any(not same(row.values.get(k), v) for k, v in values.items()):
            problems.append(f"{name}: row {index} (step {step}) differs")
    return problems


def check_wandb(run_dir: Path, expected: Expected, exit_code: int | None = 0) -> list[str]:
    run = read_wandb_offline(run_dir)
    keys = expected_keys(expected)
    rows = [row for row in run.rows if not keys.isdisjoint(row.values)]
    if len(rows) != len(expected):
        return [f"W&B: {len(rows)} rows, expected {len(expected)}"]
    problems = []
    for index, (row, (step, values)) in enumerate(zip(rows, expected, strict=True)):
        if row.global_step != step or any(
            not same(row.values.get(k), v) for k, v in values.items()
        ):
            problems.append(f"W&B: row {index} (step {step}) differs")
    if exit_code is not None and run.exit_code != exit_code:
        problems.append(f"W&B: exit code {run.exit_code}, expected {exit_code}")
    return problems


def queues_left(run_dir: Path) -> list[str]:
    from tracklog._queue import find_queues

    return [f"undelivered queue left behind: {queue}" for queue in find_queues(run_dir)]


def check_all(
    client: MlflowClient,
    run_dir: Path,
    run_id: str,
    expected: Expected,
    *,
    status: str = "FINISHED",
    wandb_exit: int | None = 0,
    not_tensorboard: frozenset[str] = frozenset(),
) -> list[str]:
    """Every backend of a seven-output logger (closed) holds ``expected`` (TensorBoard
    without the keys ``not_tensorboard`` names: recorded with ``exclude="tensorboard"``)."""
    problems = check_mlflow(client, run_id, expected)
    problems += check_rows("JSONL", read_jsonl(run_dir / "progress.jsonl"), expected)
    problems += check_rows("CSV", read_csv(run_dir / "progress.csv"), expected)
    problems += check_wandb(run_dir, expected, wandb_exit)
    for_tensorboard: Expected = [
        (step, {k: v for k, v in values.items() if k not in not_tensorboard})
        for step, values in expected
    ]
    problems += check_tensorboard(run_dir / "tensorboard", for_tensorboard)
    got = client.get_run(run_id).info.status
    if got != status:
        problems.append(f"MLflow run status {got}, expected {status}")
    return problems + queues_left(run_dir)


# The training thread's clocks ----------------------------------------------------------------
class ThreadClock:
    """The calling thread's CPU time, and its time runnable but waiting for a core
    (Linux schedstat's run delay). Wall time minus both is time blocked: waiting for
    the GIL, a lock or I/O."""

    def __init__(self) -> None:
        self._fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)

    def read(self) -> tuple[float, float]:
        waiting = int(os.pread(self._fd, 128, 0).split()[1]) / 1e9
        return time.thread_time(), waiting

    def close(self) -> None:
        os.close(self._fd)


class GcClock:
    """Seconds spent in the cyclic garbage collector since the last ``take()``."""

    def __init__(self) -> None:
        self._started = 0.0
        self._spent = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._spent += time.perf_counter() - self._started

    def take(self) -> float:
        spent, self._spent = self._spent, 0.0
        return spent

    def close(self) -> None:
        gc.callbacks.remove(self._callback)


class CpuAccount:
    """Where the machine's CPU went while the timed dumps ran: this process (the np.dot
    load and both loggers), the delivery process with W&B's wandb-core under it, and
    the mlflow server (the seed's own calls, made in between, counted apart)."""

    def __init__(self, server: MlflowServer) -> None:
        assert server.process is not None
        self._server = server.process.pid
        self._spent: dict[str, float] = {}
        self._seed = 0.0
        self._wall = 0.0

    def _now(self) -> dict[str, float]:
        times = psutil.Process().cpu_times()
        delivery = delivery_pid()
        return {
            "this process": times.user + times.system,
            "delivery process and wandb-core": 0.0 if delivery is None else tree_cpu(delivery),
            "mlflow server": tree_cpu(self._server),
        }

    def start(self) -> None:
        self._spent = self._now()
        self._wall = time.perf_counter()

    def stop(self) -> None:
        self._wall = time.perf_counter() - self._wall
        self._spent = {name: cpu - self._spent[name] for name, cpu in self._now().items()}

    @contextlib.contextmanager
    def seed(self) -> Iterator[None]:
        before = tree_cpu(self._server)
        yield
        self._seed += tree_cpu(self._server) - before

    def describe(self, dumps: int) -> str:
        self._spent["mlflow server"] -= self._seed
        cores = psutil.cpu_count() or 1
        parts = ", ".join(
            f"{name} {cpu:.1f} CPU-s ({cpu / dumps * 1e3:.2f} ms per dump)"
            for name, cpu in self._spent.items()
        )
        seed = (
            f"; the seed's calls took the server {self._seed:.1f} CPU-s more" if self._seed else ""
        )
        return (
            f"CPU while the timed dumps ran ({self._wall:.1f} s on {cores} cores, "
            f"{self._wall * cores:.1f} core-s): {parts}{seed}"
        )


@dataclass(frozen=True)
class Sample:
    """One dump on the training thread. ``wall``, ``cpu``, ``waiting`` and ``gc`` cover
    ``dump()`` itself; ``with_record`` adds the ``record()`` calls before it."""

    wall: float  # dump(), wall time
    with_record: float  # record() of every value + dump(), wall time
    cpu: float  # the thread's CPU time in dump()
    waiting: float  # in dump(): runnable, but no core free
    gc: float = 0.0  # in dump(): in the cyclic garbage collector

    @property
    def blocked(self) -> float:
        """In dump(): neither on a core nor waiting for one (the GIL, a lock, I/O)."""
        return max(0.0, self.wall - self.cpu - self.waiting)


def timed_dump(
    clock: ThreadClock,
    collector: GcClock,
    logger: sb3_logger.Logger,
    step: int,
    values: Sequence[tuple[str, object]] | None = None,
) -> Sample:
    """Record ``values`` (default: the 50 scalars of ``step``), then dump, timed."""
    start = time.perf_counter()
    if values is None:
        for i, key in enumerate(KEYS):
            logger.record(key, value(step, i))
    else:
        for key, recorded_value in values:
            logger.record(key, recorded_value)
    recorded = time.perf_counter()
    collector.take()
    cpu, waiting = clock.read()
    begin = time.perf_counter()
    logger.dump(step)
    end = time.perf_counter()
    cpu_after, waiting_after = clock.read()
    return Sample(
        wall=end - begin,
        with_record=(recorded - start) + (end - begin),
        cpu=cpu_after - cpu,
        waiting=waiting_after - waiting,
        gc=collector.take(),
    )


def describe(name: str, samples: list[Sample]) -> None:
    print(f"  {name} ({len(samples)} dumps)")
    print(f"      dump() wall        {spread([s.wall for s in samples])}")
    print(f"      dump() thread CPU  {spread([s.cpu for s in samples])}")
    print(f"      record+dump wall   {spread([s.with_record for s in samples])}")
    slow = [index for index, sample in enumerate(samples) if sample.wall > 1.5e-3]
    if slow:
        them = [samples[index] for index in slow]
        where = ", ".join(f"#{index}" for index in slow[:12]) + (", ..." if len(slow) > 12 else "")
        print(
            f"      {len(slow)} dump() calls over 1.5 ms ({where}); on average in them: CPU "
            f"{ms(statistics.mean(s.cpu for s in them))}, waiting for a core "
            f"{ms(statistics.mean(s.waiting for s in them))}, blocked (GIL, locks, I/O) "
            f"{ms(statistics.mean(s.blocked for s in them))}, in the garbage collector "
            f"{ms(statistics.mean(s.gc for s in them))}"
        )


# The bench's state ---------------------------------------------------------------------------
@dataclass
class Bench:
    server: MlflowServer
    tmp: Path
    quick: bool
    report: Report
    matrix: npt.NDArray[np.float64] = field(
        default_factory=lambda: np.random.default_rng(0).random((MATRIX_SIZE, MATRIX_SIZE))
    )

    @property
    def url(self) -> str:
        return self.server.url

    def client(self) -> MlflowClient:
        return mlflow_client(self.url)


# (a) and (b): dumps of 50 scalars ------------------------------------------------------------
def part_ab(bench: Bench, parts: set[str], dumps: int, seed_dumps: int, profile: int) -> None:
    with_sb3, with_seed = "a" in parts, "b" in parts
    against = [
        *(["SB3's Logger"] if with_sb3 else []),
        *(["one log_metric per key"] if with_seed else []),
    ]
    section(
        f"({','.join(sorted(parts & {'a', 'b'}))}) dump of 50 scalars, seven outputs, vs "
        + " and ".join(against)
    )
    report, client, matrix = bench.report, bench.client(), bench.matrix
    seed_run = ""
    if with_seed:
        seed_run = client.create_run(experiment_id(client), run_name="b-seed").info.run_id
    seed_every = max(1, dumps // seed_dumps) if with_seed else 0
    warmup = 5
    ours_samples: list[Sample] = []
    sb3_samples: list[Sample] = []
    seed_times: list[float] = []
    seed_steps: list[int] = []
    clock, collector = ThreadClock(), GcClock()
    run_dir = bench.tmp / "ab-tracklog"
    account = CpuAccount(bench.server)
    with quiet_stdout():
        ours = build(run_dir, seven_outputs(bench.url, "ab-tracklog"))
        sb3 = sb3_logger.configure(str(bench.tmp / "ab-sb3"), ["stdout", "log", "csv"])
        for step in range(warmup + dumps):
            if step == warmup:
                account.start()
            sides: list[tuple[sb3_logger.Logger, list[Sample]]] = [(ours, ours_samples)]
            if with_sb3:
                sides.append((sb3, sb3_samples))
                if step % 2:
                    sides.reverse()  # neither side always follows the other's dump
            for logger, samples in sides:
                work(matrix)
                sample = timed_dump(clock, collector, logger, step)
                if step >= warmup:
                    samples.append(sample)
            if (
                seed_every
                and step >= warmup
                and (step - warmup) % seed_every == 0
                and len(seed_times) < seed_dumps
            ):
                work(matrix)
                with account.seed():
                    start = time.perf_counter()
                    for i, key in enumerate(KEYS):  # the seed's MLFlowOutputFormat.write
                        client.log_metric(seed_run, key, value(step, i), step=step)
                    seed_times.append(time.perf_counter() - start)
                seed_steps.append(step)
        account.stop()
        profiled = profile_dumps(ours, matrix, warmup + dumps, profile) if profile else ""
        total = warmup + dumps + profile
        run_id = published(ours, "mlflow")
        start = time.perf_counter()
        ours.close()
        close_time = time.perf_counter() - start
        sb3.close()
    clock.close()
    collector.close()
    if with_seed:
        client.set_terminated(seed_run)
    print(
        f"{dumps} timed dumps per side (+{warmup} warm-up), interleaved, a {MATRIX_SIZE}x"
        f"{MATRIX_SIZE} np.dot (BLAS: {blas_threads()}) before each; tracklog close() "
        f"{close_time:.2f} s; load {load()}"
    )
    print(account.describe(dumps))
    describe("tracklog, seven outputs", ours_samples)
    walls = [sample.wall for sample in ours_samples]
    our_median = statistics.median(walls)
    with_record = statistics.median(sample.with_record for sample in ours_samples)
    if with_sb3:
        describe("SB3 Logger, stdout+log+csv", sb3_samples)
        theirs = [sample.wall for sample in sb3_samples]
        sb3_median = statistics.median(theirs)
        ratio = our_median / sb3_median
        per_dump = statistics.median(
            o.wall / s.wall for o, s in zip(ours_samples, sb3_samples, strict=True)
        )
        cpu_ratio = statistics.median(s.cpu for s in ours_samples) / statistics.median(
            s.cpu for s in sb3_samples
        )
        record_ratio = with_record / statistics.median(s.with_record for s in sb3_samples)
        report.target(
            "a",
            "median dump() wall, tracklog/SB3",
            f"{ratio:.2f} ({ms(our_median)}; median of per-dump ratios {per_dump:.2f}; thread "
            f"CPU {cpu_ratio:.2f}; record+dump {record_ratio:.2f})",
            f"SB3 {ms(sb3_median)}",
            "<= 0.7",
            ratio <= 0.7,
        )
        p99 = quantile(walls, 0.99)
        report.target(
            "a",
            "p99 dump() wall",
            ms(p99),
            f"SB3 p99 {ms(quantile(theirs, 0.99))}",
            "<= 1.5 ms",
            p99 <= 1.5e-3,
        )
        report.target(
            "a",
            f"max dump() wall over {dumps} dumps",
            ms(max(walls)),
            f"SB3 max {ms(max(theirs))}",
            "<= 20 ms",
            max(walls) <= 20e-3,
        )
        with open(bench.tmp / "ab-sb3" / "progress.csv", encoding="utf-8") as csv_file:
            sb3_rows = sum(1 for _ in csv_file) - 1
        wrong = [] if sb3_rows == warmup + dumps else [f"SB3 CSV: {sb3_rows} rows"]
        report.check("a", "SB3 anchor: every dump in its CSV", wrong)
    if with_seed:
        seed_median = statistics.median(seed_times)
        speedup = seed_median / with_record
        report.target(
            "b",
            "training-thread time per dump, seed/tracklog (medians; tracklog's record+dump)",
            f"{speedup:.0f}x (tracklog {ms(with_record)}; against dump() alone "
            f"{seed_median / our_median:.0f}x)",
            f"seed, 50 log_metric calls: {ms(seed_median)} over {len(seed_times)} dumps",
            ">= 2000x",
            speedup >= 2000,
        )
        problems = check_mlflow(client, seed_run, expected_rows(seed_steps))
        report.check("b", f"seed run: {len(seed_steps)} dumps x 50 keys in MLflow", problems)
    if profiled:
        print(profiled)
    problems = check_all(client, run_dir, run_id, expected_rows(range(total)))
    report.check(
        "a" if with_sb3 else "b",
        f"tracklog: {total} dumps x 50 keys in MLflow, JSONL, CSV, W&B, TensorBoard",
        problems,
    )


def profile_dumps(
    logger: sb3_logger.Logger, matrix: npt.NDArray[np.float64], first: int, dumps: int
) -> str:
    """cProfile of ``dumps`` more dumps (after the timed ones: it slows them): where the
    training thread's time in ``dump()`` goes, by function."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    for step in range(first, first + dumps):
        work(matrix)
        for i, key in enumerate(KEYS):
            logger.record(key, value(step, i))
        profiler.enable()
        logger.dump(step)
        profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(20)
    return f"  cProfile of {dumps} more tracklog dump() calls (after the timed ones):\n" + (
        text.getvalue()
    )


# (c) video -----------------------------------------------------------------------------------
def video_frames(length: int = 200, size: int = 256) -> npt.NDArray[np.uint8]:
    """(T, C, H, W) uint8: a moving gradient (an encoder's ordinary work, not noise)."""
    t = np.arange(length, dtype=np.int32)[:, None, None, None]
    c = np.arange(3, dtype=np.int32)[None, :, None, None]
    y = np.arange(size, dtype=np.int32)[None, None, :, None]
    x = np.arange(size, dtype=np.int32)[None, None, None, :]
    return ((x + 2 * y + 3 * t + 85 * c) % 256).astype(np.uint8)


def part_c(bench: Bench, videos: int, gap: float) -> None:
    frames = video_frames()
    section(
        f"(c) record + dump of a {frames.shape[0]}-frame {frames.shape[3]}x{frames.shape[2]} "
        f"RGB video ({frames.nbytes / MiB:.1f} MiB), seven outputs"
    )
    report, client, matrix = bench.report, bench.client(), bench.matrix
    copies: list[float] = []
    for _ in range(3):  # the anchor: one copy of the frames, the least a logger can do
        start = time.perf_counter()
        copy = np.array(frames, copy=True)
        copies.append(time.perf_counter() - start)
        del copy
    samples: list[Sample] = []
    record_cpus: list[float] = []
    rss_after: list[int] = []
    clock, collector = ThreadClock(), GcClock()
    run_dir = bench.tmp / "c-tracklog"
    with quiet_stdout():
        logger = build(run_dir, seven_outputs(bench.url, "c-video"), close_timeout=300)
        logger.record("warm-up", 0.0)
        logger.dump(0)
        run_id = published(logger, "mlflow")
        gc.collect()
        rss_before = rss()
        peak_known = reset_peak_rss()
        for index in range(videos):
            step = index + 1
            until = time.perf_counter() + gap  # training between two evaluation videos
            while time.perf_counter() < until:
                work(matrix)
            record_cpu = time.thread_time()
            start = time.perf_counter()
            logger.record(VIDEO_KEY, tracklog.Video(frames, fps=30))  # validates and copies
            recorded = time.perf_counter()
            collector.take()
            cpu, waiting = clock.read()
            begin = time.perf_counter()
            logger.dump(step)
            end = time.perf_counter()
            cpu_after, waiting_after = clock.read()
            record_cpus.append(cpu - record_cpu)
            samples.append(
                Sample(
                    wall=end - begin,
                    with_record=(recorded - start) + (end - begin),
                    cpu=cpu_after - cpu,
                    waiting=waiting_after - waiting,
                    gc=collector.take(),
                )
            )
            rss_after.append(rss())
        peak = peak_rss() if peak_known else 0
        start = time.perf_counter()
        flushed = logger.flush(timeout=300)
        flush_time = time.perf_counter() - start
        logger.close()
    clock.close()
    collector.close()
    print(
        f"{videos} videos, {gap:g} s of np.dot between them; flush() after the last "
        f"{flush_time:.1f} s ({'done' if flushed else 'timed out'}); load {load()}"
    )
    describe("one video", samples)
    print(f"      record() thread CPU {spread(record_cpus)}")
    totals = [sample.with_record for sample in samples]
    median = statistics.median(totals)
    anchor = statistics.median(copies)
    report.target(
        "c",
        "median record+dump of one video",
        f"{ms(median)} (max {ms(max(totals))}; dump() alone "
        f"{ms(statistics.median(s.wall for s in samples))})",
        f"one copy of the frames {ms(anchor)}",
        "<= 20 ms",
        median <= 20e-3,
    )
    growth = rss_after[-1] - rss_before
    allowed = 1.1 * frames.nbytes
    peak_text = f"; peak {(peak - rss_before) / MiB:+.1f} MiB" if peak else ""
    report.target(
        "c",
        f"trainer RSS growth after {videos} videos (psutil)",
        f"{growth / MiB:+.1f} MiB (after each: "
        + ", ".join(f"{(after - rss_before) / MiB:+.1f}" for after in rss_after)
        + f"{peak_text})",
        f"one copy of the frames {frames.nbytes / MiB:.1f} MiB",
        f"<= about one copy ({allowed / MiB:.1f} MiB)",
        growth <= allowed,
    )
    steps = list(range(1, videos + 1))
    problems = check_videos(client, run_dir, run_id, steps, frames)
    problems += check_all(client, run_dir, run_id, [(0, {"warm-up": 0.0})])
    report.check("c", f"{videos} videos in JSONL, CSV, MLflow, W&B, TensorBoard", problems)


def check_videos(
    client: MlflowClient,
    run_dir: Path,
    run_id: str,
    steps: list[int],
    frames: npt.NDArray[np.uint8] | None = None,
) -> list[str]:
    """Each dump with a video reached every backend as a file (JSONL's decoded)."""
    from tests.readback import decode_mp4

    problems: list[str] = []
    rows = read_jsonl(run_dir / "progress.jsonl")
    video_steps = [row.step for row in rows if VIDEO_KEY in row.values]
    if video_steps != steps:
        problems.append(f"JSONL: videos at steps {video_steps}, expected {steps}")
    for name, file_rows in (("JSONL", rows), ("CSV", read_csv(run_dir / "progress.csv"))):
        for row in file_rows:
            if VIDEO_KEY in row.values:
                path = run_dir / str(row.values[VIDEO_KEY])
                if not path.is_file() or path.stat().st_size == 0:
                    problems.append(f"{name}: {path} missing or empty")
    media = [run_dir / str(row.values[VIDEO_KEY]) for row in rows if VIDEO_KEY in row.values]
    if frames is not None and media and media[-1].is_file():
        decoded, _ = decode_mp4(media[-1])
        want = (frames.shape[0], frames.shape[2], frames.shape[3], frames.shape[1])
        if len(decoded) != want[0] or decoded[0].shape != want[1:]:
            shape = decoded[0].shape if decoded else None
            problems.append(f"MP4 {media[-1].name}: {len(decoded)} frames {shape}, want {want}")
    listed = client.list_artifacts(run_id, f"videos/{VIDEO_KEY}")
    got = sorted(entry.path for entry in listed if (entry.file_size or 0) > 0)
    want_paths = sorted(f"videos/{VIDEO_KEY}/step_{step}.mp4" for step in steps)
    if got != want_paths:
        problems.append(f"MLflow: artifacts {got}, expected {want_paths}")
    run = read_wandb_offline(run_dir)
    wandb_steps = [entry.global_step for entry in run.rows if VIDEO_KEY in entry.values]
    if wandb_steps != steps:
        problems.append(f"W&B: video rows at {wandb_steps}, expected {steps}")
    for entry in run.rows:
        if VIDEO_KEY in entry.values and not run.media_path(entry.values[VIDEO_KEY]).is_file():
            problems.append(f"W&B: no file for the video at step {entry.global_step}")
    events = read_events(run_dir / "tensorboard")
    tb_steps = (
        [image.step for image in events.Images(VIDEO_KEY)]
        if VIDEO_KEY in events.Tags().get("images", [])
        else []
    )
    if sorted(tb_steps) != steps:
        problems.append(f"TensorBoard: video images at {tb_steps}, expected {steps}")
    return problems


# (d) PPO end to end, each run in a fresh process ---------------------------------------------
# SB3's on-policy algorithms record these with exclude="tensorboard".
SB3_NOT_TENSORBOARD = frozenset(
    ("time/iterations", "time/time_elapsed", "time/total_timesteps", "train/n_updates")
)


@dataclass(frozen=True)
class PpoRun:
    side: str
    name: str
    wall: float  # build + PPO(...) + learn + close, in the child
    build: float
    close: float
    process_wall: float  # the child from spawn to exit (interpreter start, imports, exit)
    thread_cpu: float
    process_cpu: float  # every thread of the trainer
    delivery_cpu: float  # the delivery process and its children (W&B's service)
    torch_threads: int
    dumps: int


def ppo_child(spec: dict[str, Any]) -> int:
    """A training process of (d): PPO on CartPole with tracklog or SB3's Logger."""
    import torch
    from stable_baselines3 import PPO

    clock = ThreadClock()
    process = os.times()
    cpu, _ = clock.read()
    start = time.perf_counter()
    if spec["side"] == "sb3":
        logger: sb3_logger.Logger = sb3_logger.configure(spec["run_dir"], ["stdout", "csv"])
    else:
        logger = build(Path(spec["run_dir"]), seven_outputs(spec["url"], spec["name"]))
    built = time.perf_counter()
    model = PPO("MlpPolicy", "CartPole-v1", n_steps=256, seed=0, device="cpu", verbose=0)
    model.set_logger(logger)
    model.learn(int(spec["timesteps"]))
    closing = time.perf_counter()
    logger.close()
    end = time.perf_counter()
    cpu_after, _ = clock.read()
    process_after = os.times()
    pid = delivery_pid()
    result = {
        "wall": end - start,
        "build": built - start,
        "close": end - closing,
        "thread_cpu": cpu_after - cpu,
        "process_cpu": (process_after.user - process.user)
        + (process_after.system - process.system),
        "delivery_cpu": tree_cpu(pid) if pid is not None else 0.0,
        "torch_threads": torch.get_num_threads(),
        "dumps": model.num_timesteps // model.n_steps,
        "delivery_pid": pid,
    }
    Path(spec["result"]).write_text(json.dumps(result), encoding="utf-8")
    return 0


def run_child(kind: str, spec: dict[str, Any], log: Path, timeout: float) -> float:
    """Run a child to its end (stdout to /dev/null: the console sink); its wall time."""
    start = time.perf_counter()
    with open(log, "wb") as stderr:
        process = subprocess.Popen(
            child_command(kind, spec),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=child_env(),
        )
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
    wall = time.perf_counter() - start
    if code != 0:
        tail = log.read_text("utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"{kind} child exited with status {code}:\n{tail}")
    return wall


def run_ppo(bench: Bench, side: str, name: str, timesteps: int) -> PpoRun:
    result_path = bench.tmp / f"{name}.json"
    spec = {
        "side": side,
        "name": name,
        "run_dir": str(bench.tmp / name),
        "url": bench.url,
        "timesteps": timesteps,
        "result": str(result_path),
    }
    process_wall = run_child("ppo", spec, bench.tmp / f"{name}.stderr", timeout=1800)
    result = json.loads(result_path.read_text("utf-8"))
    settle_child(result.pop("delivery_pid"))
    return PpoRun(side=side, name=name, process_wall=process_wall, **result)


def settle_child(pid: int | None) -> None:
    """Let a finished child's delivery process end (W&B's service stops after the trainer
    is gone) before the next run starts, so that run does not share the cores with it."""
    if pid is not None and not wait_gone(pid, 300):
        raise RuntimeError(f"the delivery process {pid} still runs 300 s after its trainer")


def check_ppo_run(client: MlflowClient, run: PpoRun, run_dir: Path) -> list[str]:
    """JSONL holds one row per PPO dump; MLflow, CSV, W&B and TensorBoard the same numbers."""
    rows = read_jsonl(run_dir / "progress.jsonl")
    problems = []
    if len(rows) != run.dumps:
        problems.append(f"JSONL: {len(rows)} rows, {run.dumps} dumps")
    expected: Expected = [
        (
            row.step,
            {
                k: float(v)
                for k, v in row.values.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            },
        )
        for row in rows
    ]
    run_id, status = find_run(client, run.name)
    problems += check_all(
        client, run_dir, run_id, expected, status=status, not_tensorboard=SB3_NOT_TENSORBOARD
    )
    if status != "FINISHED":
        problems.append(f"MLflow run status {status}")
    return [f"{run.name}: {problem}" for problem in problems]


def part_d(bench: Bench, timesteps: int, runs: int, *, warm_up: bool) -> None:
    section(
        f"(d) PPO CartPole-v1 {timesteps} steps, seven outputs vs SB3's Logger (stdout+csv), "
        f"each run in a fresh process, {runs} per side"
    )
    report, client = bench.report, bench.client()
    checks: list[str] = []
    # Untimed: the first runs pay for cold caches (bytecode, shared libraries).
    for side in ("tracklog", "sb3") if warm_up else ():
        warm = run_ppo(bench, side, f"d-warm-up-{side}", 1024)
        if side == "tracklog":
            checks += check_ppo_run(client, warm, bench.tmp / warm.name)
    results: dict[str, list[PpoRun]] = {"tracklog": [], "sb3": []}
    for index in range(runs):  # A B, B A, ...: drift hits both alike
        for side in ("tracklog", "sb3") if index % 2 == 0 else ("sb3", "tracklog"):
            run = run_ppo(bench, side, f"d-{side}-{index}", timesteps)
            results[side].append(run)
            if side == "tracklog":
                checks += check_ppo_run(client, run, bench.tmp / run.name)
            else:
                with open(bench.tmp / run.name / "progress.csv", encoding="utf-8") as csv_file:
                    rows = sum(1 for _ in csv_file) - 1
                if rows != run.dumps:
                    checks.append(f"{run.name}: {rows} CSV rows, {run.dumps} dumps")
    print(
        "  wall time of build + PPO(...) + learn() + close() in the child; [close; the child "
        "from spawn to exit; CPU s: training thread / whole trainer / delivery process + W&B]"
    )
    for side, label in (("tracklog", "tracklog"), ("sb3", "SB3")):
        for run in results[side]:
            print(
                f"    {label:<9} {run.wall:6.2f} s  [close {run.close:.2f} s, build "
                f"{run.build:.3f} s; process {run.process_wall:.2f} s; CPU {run.thread_cpu:.2f} "
                f"/ {run.process_cpu:.2f} / {run.delivery_cpu:.2f}]  {run.dumps} dumps, torch "
                f"threads {run.torch_threads}"
            )
    ours = statistics.median(run.wall for run in results["tracklog"])
    theirs = statistics.median(run.wall for run in results["sb3"])
    process_ratio = statistics.median(r.process_wall for r in results["tracklog"]) / (
        statistics.median(r.process_wall for r in results["sb3"])
    )
    report.target(
        "d",
        f"wall-time ratio tracklog/SB3 (medians of {runs})",
        f"{ours / theirs:.3f} ({ours:.2f} s; whole processes {process_ratio:.3f})",
        f"SB3 Logger alone {theirs:.2f} s",
        "<= 1.01",
        ours / theirs <= 1.01,
    )
    extra = " (+1 warm-up)" if warm_up else ""
    report.check("d", f"{runs} tracklog runs{extra}: every dump and key in every backend", checks)


# (e) MLflow down -----------------------------------------------------------------------------
def part_e(bench: Bench, before: float, outage: float, after: float) -> None:
    section(f"(e) mlflow server SIGKILLed for {outage:g} s at 20 dumps/s of 50 scalars")
    report, server, client = bench.report, bench.server, bench.client()
    run_dir = bench.tmp / "e-tracklog"
    period = 1 / 20
    step = 0
    clock, collector = ThreadClock(), GcClock()
    samples: list[tuple[float, Sample, int]] = []  # (when, the dump, RSS after it)
    drained_at: float | None = None

    with quiet_stdout():
        logger = build(
            run_dir,
            seven_outputs(
                server.url, "e-outage", request_retries=0, request_timeout=2
            ),  # fail fast: retries are delivery's, with backoff
            retry_initial=0.5,
            retry_max=5,
            close_timeout=600,
        )

        def dump_until(done: Callable[[], bool], *, watch_backlog: bool = False) -> None:
            nonlocal step, drained_at
            next_at = time.perf_counter()
            while not done():
                time.sleep(max(0.0, next_at - time.perf_counter()))
                next_at += period
                sample = timed_dump(clock, collector, logger, step)
                samples.append((time.perf_counter(), sample, rss()))
                step += 1
                if watch_backlog and drained_at is None and logger.flush(timeout=0):
                    drained_at = time.perf_counter()

        started = time.perf_counter()
        dump_until(lambda: time.perf_counter() >= started + before)
        run_id = published(logger, "mlflow")
        gc.collect()
        rss_before = rss()
        killed_at = time.perf_counter()
        server.stop(signal.SIGKILL)
        dump_until(lambda: time.perf_counter() >= killed_at + outage)
        restarted = threading.Event()
        errors: list[BaseException] = []

        def restart() -> None:
            try:
                server.start()
            except BaseException as error:
                errors.append(error)
            finally:
                restarted.set()

        restart_at = time.perf_counter()
        threading.Thread(target=restart, name="bench-mlflow-restart", daemon=True).start()
        dump_until(restarted.is_set)
        back_at = time.perf_counter()
        spool_bytes = sum(
            path.stat().st_size for path in (run_dir / "spool").rglob("*") if path.is_file()
        )
        if errors:
            raise errors[0]
        dump_until(lambda: time.perf_counter() >= back_at + after, watch_backlog=True)
        start = time.perf_counter()
        logger.close()
        close_time = time.perf_counter() - start
    clock.close()
    collector.close()
    during = [(sample, memory) for when, sample, memory in samples if killed_at <= when <= back_at]
    phases = {
        "before the outage": [s for when, s, _ in samples if when < killed_at],
        "while MLflow is down": [s for when, s, _ in samples if killed_at <= when < restart_at],
        "while it restarts": [s for when, s, _ in samples if restart_at <= when <= back_at],
        "once it is back": [s for when, s, _ in samples if when > back_at],
    }
    drained = (
        f"the backlog drained {drained_at - back_at:.1f} s after the server was back"
        if drained_at is not None
        else f"close() drained the rest of the backlog in {close_time:.1f} s"
    )
    peak = max(memory for _, memory in during)
    print(
        f"{step} dumps; down {back_at - killed_at:.1f} s (incl. the restart); queue on disk "
        f"{spool_bytes / MiB:.1f} MiB at the end of the outage; {drained}; RSS "
        f"{rss_before / MiB:.1f} MiB before, at most {peak / MiB:.1f} MiB during; load {load()}"
    )
    for name, phase in phases.items():
        if phase:
            describe(name, phase)
    growth = peak - rss_before
    before_dumps = [s.wall for s in phases["before the outage"]]
    report.target(
        "e",
        "trainer RSS growth over the outage (peak of a sample after every dump)",
        f"{growth / MiB:+.1f} MiB (worst dump while down {ms(max(s.wall for s, _ in during))})",
        f"RSS before {rss_before / MiB:.0f} MiB; worst dump before {ms(max(before_dumps))}",
        "<= 16 MiB",
        growth <= 16 * MiB,
    )
    problems = check_all(client, run_dir, run_id, expected_rows(range(step)))
    report.check(
        "e", f"{step} dumps x 50 keys in every backend, none missing or duplicated", problems
    )


# (f) build_logger in a fresh process ---------------------------------------------------------
def build_child(spec: dict[str, Any]) -> int:
    """A fresh process of (f): SB3 is imported (this module's imports), then build_logger."""
    import stable_baselines3  # noqa: F401  # already imported: a trainer imports SB3 first

    start = time.perf_counter()
    logger = tracklog.build_logger(
        {
            "run_dir": spec["run_dir"],
            "outputs": seven_outputs(spec["url"], spec["name"])[-2:],  # MLflow + W&B
        }
    )
    built = time.perf_counter() - start
    start = time.perf_counter()
    anchor = sb3_logger.configure(spec["sb3_dir"], ["stdout", "csv"])
    configured = time.perf_counter() - start
    anchor.close()
    for i, key in enumerate(KEYS):
        logger.record(key, value(0, i))
    logger.dump(0)
    start = time.perf_counter()
    logger.close()
    closed = time.perf_counter() - start
    result = {
        "built": built,
        "configured": configured,
        "closed": closed,
        "delivery_pid": delivery_pid(),
    }
    Path(spec["result"]).write_text(json.dumps(result), encoding="utf-8")
    return 0


def part_f(bench: Bench, runs: int) -> None:
    section(f"(f) build_logger with MLflow + W&B in a fresh process after SB3 is imported ({runs})")
    report, client = bench.report, bench.client()
    built: list[float] = []
    configured: list[float] = []
    closed: list[float] = []
    problems: list[str] = []
    for index in range(runs + 1):  # the first is a warm-up
        name = f"f-{index}"
        spec = {
            "run_dir": str(bench.tmp / name),
            "sb3_dir": str(bench.tmp / f"{name}-sb3"),
            "url": bench.url,
            "name": name,
            "result": str(bench.tmp / f"{name}.json"),
        }
        run_child("build", spec, bench.tmp / f"{name}.stderr", timeout=300)
        result = json.loads(Path(spec["result"]).read_text("utf-8"))
        settle_child(result["delivery_pid"])
        if index:
            built.append(result["built"])
            configured.append(result["configured"])
            closed.append(result["closed"])
        run_id, status = find_run(client, name)
        found = check_mlflow(client, run_id, expected_rows([0]))
        found += check_wandb(bench.tmp / name, expected_rows([0]))
        if status != "FINISHED":
            found.append(f"MLflow run status {status}")
        problems += [f"{name}: {problem}" for problem in found]
    print(
        "  build_logger: " + ", ".join(f"{seconds:.3f}" for seconds in built) + " s; close() "
        "after one dump: " + ", ".join(f"{seconds:.2f}" for seconds in closed) + " s"
    )
    median = statistics.median(built)
    report.target(
        "f",
        f"build_logger, MLflow + W&B (median of {runs})",
        f"{median:.3f} s (max {max(built):.3f} s)",
        f"SB3 configure(stdout, csv) {statistics.median(configured) * 1e3:.1f} ms",
        "<= 0.5 s",
        median <= 0.5,
    )
    report.check("f", f"{runs + 1} runs: the dump in MLflow and W&B", problems)


# (g) kill -9 of the trainer ------------------------------------------------------------------
G_KEYS = KEYS[:10]


def kill_child(spec: dict[str, Any]) -> int:
    """A trainer of (g): dumps at ``rate`` and prints each step once dump() returned."""
    run_dir = Path(spec["run_dir"])
    outputs = seven_outputs(spec["url"], spec["name"], console=False)
    logger = build(run_dir, outputs)
    print(f"ready {delivery_pid()}", flush=True)
    period = 1 / float(spec["rate"])
    next_at = time.perf_counter()
    for step in range(int(spec["max_dumps"])):
        for i, key in enumerate(G_KEYS):
            logger.record(key, value(step, i))
        logger.dump(step)
        print(step, flush=True)  # after dump() returned: this row must be delivered
        next_at += period
        delay = next_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
    logger.close()  # only if it was never killed
    return 0


@dataclass(frozen=True)
class Kill:
    rate: int
    delay: float  # seconds after the first dump returned
    returned: int  # dumps whose return the child printed
    achieved: float  # dumps/s the child managed
    drain: float  # seconds from the kill until the delivery process exited
    problems: list[str]
    lost: dict[str, int]  # backend -> rows printed but missing


def _read_lines(stream: IO[str], lines: list[str], first: threading.Event) -> None:
    for line in stream:
        lines.append(line.strip())
        if line.strip().isdigit():
            first.set()
    first.set()


def one_kill(bench: Bench, client: MlflowClient, rate: int, delay: float, name: str) -> Kill:
    run_dir = bench.tmp / name
    spec = {
        "run_dir": str(run_dir),
        "url": bench.url,
        "name": name,
        "rate": rate,
        "max_dumps": rate * 120,
    }
    stderr_path = bench.tmp / f"{name}.stderr"
    lines: list[str] = []
    first = threading.Event()
    with open(stderr_path, "wb") as stderr:
        child = subprocess.Popen(
            child_command("kill", spec),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=child_env(),
        )
    assert child.stdout is not None
    reader = threading.Thread(target=_read_lines, args=(child.stdout, lines, first), daemon=True)
    reader.start()
    if not first.wait(180) or child.poll() is not None:
        child.kill()
        child.wait()
        tail = stderr_path.read_text("utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"{name}: the trainer did not start dumping:\n{tail}")
    first_at = time.perf_counter()
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    killed_at = time.perf_counter()
    child.wait()
    reader.join(30)
    ready = [line for line in lines if line.startswith("ready ")]
    steps = [int(line) for line in lines if line.isdigit()]
    pid = int(ready[0].split()[1]) if ready and ready[0].split()[1].isdigit() else None
    problems: list[str] = []
    if pid is None:
        problems.append("the child named no delivery process")
    elif not wait_gone(pid, 600):
        problems.append(f"the delivery process {pid} still runs 600 s after the kill")
    drain = time.perf_counter() - killed_at
    if steps != list(range(len(steps))):
        problems.append("the child's printed steps are not 0, 1, 2, ...")
    returned = len(steps)
    achieved = returned / max(1e-9, killed_at - first_at)
    # A row may have been committed after its step was printed no more: the kill came
    # between dump() returning and the print. At most that one extra row is allowed.
    allowed = {returned}
    lost: dict[str, int] = {}

    def compare(backend: str, got: list[tuple[int, float]], key: str) -> None:
        seen = [step for step, _ in got]
        if len(set(seen)) != len(seen):
            problems.append(f"{backend} {key}: a step is there twice")
        missing = set(range(returned)) - set(seen)
        extra = set(seen) - set(range(returned)) - allowed
        if missing:
            lost[backend] = max(lost.get(backend, 0), len(missing))
            problems.append(f"{backend} {key}: {len(missing)} returned rows missing")
        if extra:
            problems.append(f"{backend} {key}: steps never dumped {sorted(extra)[:5]}")
        index = G_KEYS.index(key)
        if any(not same(number, cast_value(backend, value(s, index))) for s, number in got):
            problems.append(f"{backend} {key}: values differ")

    jsonl = [row.step for row in read_jsonl(run_dir / "progress.jsonl")]
    if jsonl[:returned] != list(range(returned)):
        problems.append(f"JSONL: {len(jsonl)} rows, {returned} returned")
    run_id, status = find_run(client, name)
    if status != "KILLED":
        problems.append(f"MLflow run status {status}, expected KILLED")
    for key in G_KEYS:
        history = client.get_metric_history(run_id, key)
        compare("MLflow", [(point.step, point.value) for point in history], key)
    wandb_rows = read_wandb_offline(run_dir).rows
    for key in G_KEYS:
        points = [
            (row.global_step, float(number))
            for row in wandb_rows
            if row.global_step is not None
            and isinstance(number := row.values.get(key), int | float)
            and not isinstance(number, bool)
        ]
        compare("W&B", points, key)
    events = read_events(run_dir / "tensorboard")
    tags = set(events.Tags().get("scalars", []))
    for key in G_KEYS:
        compare("TensorBoard", scalars(events, key) if key in tags else [], key)
    problems += queues_left(run_dir)
    return Kill(rate, delay, returned, achieved, drain, problems, lost)


def cast_value(backend: str, number: float) -> float:
    return float(np.float32(number)) if backend == "TensorBoard" else number


def part_g(bench: Bench, kills: int, window: float, seed: int) -> None:
    section(
        f"(g) kill -9 of a trainer subprocess at a random moment (0-{window:g} s after its "
        f"first dump), {kills} times at 100 and at 1,000 dumps/s of {len(G_KEYS)} scalars"
    )
    report, client = bench.report, bench.client()
    rng = random.Random(seed)
    for rate in (100, 1000):
        results: list[Kill] = []
        for trial in range(kills):
            delay = rng.uniform(0.0, window)
            kill = one_kill(bench, client, rate, delay, f"g-{rate}-{trial}")
            results.append(kill)
            status = "ok" if not kill.problems else f"{len(kill.problems)} problem(s)"
            print(
                f"  {rate:>5}/s #{trial:<2} killed {kill.delay:.2f} s in, {kill.returned:>5} "
                f"rows returned ({kill.achieved:.0f}/s), delivery done {kill.drain:.1f} s "
                f"after the kill: {status}",
                flush=True,
            )
            for problem in kill.problems[:5]:
                print(f"      {problem}")
        returned = sum(kill.returned for kill in results)
        lost = {
            backend: sum(kill.lost.get(backend, 0) for kill in results)
            for backend in ("MLflow", "W&B", "TensorBoard")
        }
        figure = " / ".join(f"{count}" for count in lost.values())
        report.target(
            "g",
            f"rows lost (MLflow / W&B / TensorBoard) over {kills} kills at {rate} dumps/s",
            f"{figure} of {returned} returned",
            f"{returned} rows whose dump() returned; delivery done "
            f"{statistics.median(k.drain for k in results):.1f} s (median) after the kill",
            "0",
            not any(lost.values()),
        )
        problems = [f"{kill.rate}/s: {p}" for kill in results for p in kill.problems]
        report.check("g", f"{kills} kills at {rate}/s: every returned row, once, exact", problems)


# (h) freshness -------------------------------------------------------------------------------
class Freshness:
    """Whether a step is readable yet in each backend, through its own reader."""

    def __init__(self, client: MlflowClient, run_id: str, run_dir: Path) -> None:
        self.client, self.run_id, self.run_dir = client, run_id, run_dir
        self.key = KEYS[-1]  # the last key of the row

    def mlflow(self, step: int) -> bool:
        history = self.client.get_metric_history(self.run_id, self.key)
        return any(point.step == step for point in history)

    def wandb(self, step: int) -> bool:
        try:
            rows = read_wandb_offline(self.run_dir).rows
        except (ValueError, OSError):
            return False
        return any(row.global_step == step and self.key in row.values for row in rows)

    def tensorboard(self, step: int) -> bool:
        events = read_events(self.run_dir / "tensorboard")
        if self.key not in events.Tags().get("scalars", []):
            return False
        return any(point == step for point, _ in scalars(events, self.key))

    def readers(self) -> dict[str, Callable[[int], bool]]:
        return {"MLflow": self.mlflow, "W&B": self.wandb, "TensorBoard": self.tensorboard}


def part_h(bench: Bench, rows: int, gap: float) -> None:
    section(
        f"(h) freshness: {rows} rows polled in MLflow, the W&B run file and TensorBoard, then "
        f"{rows} read right after flush(); np.dot on every core throughout"
    )
    report, client = bench.report, bench.client()
    run_dir = bench.tmp / "h-tracklog"
    clock, collector = ThreadClock(), GcClock()
    latency: dict[str, list[float]] = {"MLflow": [], "W&B": [], "TensorBoard": []}
    missing_after_flush: dict[str, int] = dict.fromkeys(latency, 0)
    flush_times: list[float] = []
    direct: list[float] = []
    timeout = 10.0
    with quiet_stdout():
        logger = build(run_dir, seven_outputs(bench.url, "h-fresh"))
        timed_dump(clock, collector, logger, 0)
        assert logger.flush(timeout=120), "the backends did not start within 120 s"
        fresh = Freshness(client, published(logger, "mlflow"), run_dir)
        for read in fresh.readers().values():
            read(0)  # imports and first reads, untimed
        anchor_run = client.create_run(experiment_id(client), run_name="h-direct").info.run_id
        step = 1
        with training_load(bench.matrix):
            for _ in range(rows):
                time.sleep(gap)
                timed_dump(clock, collector, logger, step)
                dumped = time.perf_counter()
                waiting = dict(fresh.readers())
                while waiting and time.perf_counter() - dumped < timeout:
                    for name, read in list(waiting.items()):
                        if read(step):
                            latency[name].append(time.perf_counter() - dumped)
                            del waiting[name]
                    time.sleep(0.005)
                for name in waiting:
                    latency[name].append(math.inf)
                step += 1
            for _ in range(rows):
                time.sleep(gap)
                timed_dump(clock, collector, logger, step)
                start = time.perf_counter()
                logger.flush()
                flush_times.append(time.perf_counter() - start)
                for name, read in fresh.readers().items():
                    if not read(step):
                        missing_after_flush[name] += 1
                step += 1
            from mlflow.entities import Metric

            for index in range(rows):  # the anchor: MLflow's own synchronous round trip
                now = int(time.time() * 1000)
                metrics = [Metric(key, value(index, i), now, index) for i, key in enumerate(KEYS)]
                start = time.perf_counter()
                client.log_batch(anchor_run, metrics=metrics)
                direct.append(time.perf_counter() - start)
        run_id = fresh.run_id
        logger.close()
    client.set_terminated(anchor_run)
    clock.close()
    collector.close()
    print(f"  load {load()}; latency from dump() returning to the row being readable:")
    for name, seconds in latency.items():
        finite = [s for s in seconds if math.isfinite(s)]
        shown = ", ".join(f"{s * 1e3:.0f}" if math.isfinite(s) else "never" for s in seconds)
        print(f"    {name:<12} {spread(finite) if finite else 'never'}   (ms: {shown})")
    for name, seconds in latency.items():
        worst = max(seconds)
        report.target(
            "h",
            f"{name}: a dumped row readable within (worst of {rows})",
            f"{ms(worst) if math.isfinite(worst) else f'not within {timeout:g} s'} (median "
            f"{ms(statistics.median(seconds))})",
            f"MLflow log_batch of 50 metrics, synchronous: {ms(statistics.median(direct))}",
            "<= 1 s",
            worst <= 1.0,
        )
    report.target(
        "h",
        f"rows not readable right after flush() (MLflow / W&B / TensorBoard, of {rows})",
        " / ".join(str(count) for count in missing_after_flush.values()),
        f"flush() took {spread(flush_times)}",
        "0",
        not any(missing_after_flush.values()),
    )
    problems = check_all(client, run_dir, run_id, expected_rows(range(step)))
    report.check("h", f"{step} dumps x 50 keys in every backend", problems)


# Main ----------------------------------------------------------------------------------------
def child_main(kind: str, spec_json: str) -> int:
    spec: dict[str, Any] = json.loads(spec_json)
    children: dict[str, Callable[[dict[str, Any]], int]] = {
        "ppo": ppo_child,
        "build": build_child,
        "kill": kill_child,
    }
    return children[kind](spec)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run of every part")
    parser.add_argument("--only", default="a,b,c,d,e,f,g,h", help="parts to run, e.g. a,c")
    parser.add_argument("--dumps", type=int, help="(a) timed dumps per side (1000)")
    parser.add_argument("--seed-dumps", type=int, help="(b) dumps the seed's way (15)")
    parser.add_argument("--videos", type=int, help="(c) videos (6)")
    parser.add_argument("--timesteps", type=int, help="(d) PPO steps per run (20000)")
    parser.add_argument("--runs", type=int, help="(d) runs per side (5); (f) runs (5)")
    parser.add_argument("--outage", type=float, help="(e) seconds MLflow is down (120)")
    parser.add_argument("--kills", type=int, help="(g) kills per rate (20)")
    parser.add_argument("--rows", type=int, help="(h) rows polled, then rows flushed (20)")
    parser.add_argument("--seed", type=int, default=0, help="(g) random kill moments")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="(a) then cProfile N more tracklog dumps and print where dump() spends its time",
    )
    args = parser.parse_args()
    parts = {part.strip() for part in args.only.split(",") if part.strip()}
    if not parts or not parts <= set("abcdefgh"):
        parser.error(f"--only takes letters from a to h, not {args.only!r}")
    quick = args.quick

    def pick(given: float | None, full: float, short: float) -> float:
        return given if given is not None else (short if quick else full)

    report = Report()
    began = time.perf_counter()
    pinned = [
        name
        for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
        if name in os.environ
    ]
    import torch

    print(
        f"{os.cpu_count()} cores; NumPy BLAS threads: {blas_threads()}; torch threads "
        f"{torch.get_num_threads()}; load average {load()}"
        + (f"; WARNING: {', '.join(pinned)} set: a trainer's threads are pinned" if pinned else "")
    )
    with tempfile.TemporaryDirectory(prefix="bench-delivery-") as directory:
        tmp = Path(directory)
        server = MlflowServer(tmp / "server")
        start = time.perf_counter()
        server.start()
        print(f"mlflow server at {server.url}, up in {time.perf_counter() - start:.1f} s", end="")
        print(f", warmed up in {warm_up(server.url):.1f} s", end="")
        print(f", idle after {settle(server):.0f} s", flush=True)
        bench = Bench(server=server, tmp=tmp, quick=quick, report=report)
        steps: list[tuple[str, Callable[[], None]]] = [
            (
                "ab",
                lambda: part_ab(
                    bench,
                    parts,
                    int(pick(args.dumps, 1000, 200)),
                    int(pick(args.seed_dumps, 15, 3)),
                    args.profile,
                ),
            ),
            ("c", lambda: part_c(bench, int(pick(args.videos, 6, 3)), 0.5 if quick else 1.0)),
            (
                "d",
                lambda: part_d(
                    bench,
                    int(pick(args.timesteps, 20_000, 2048)),
                    int(pick(args.runs, 5, 2)),
                    warm_up=not quick,
                ),
            ),
            ("f", lambda: part_f(bench, int(pick(args.runs, 5, 2)))),
            (
                "g",
                lambda: part_g(
                    bench, int(pick(args.kills, 20, 2)), 1.0 if quick else 2.0, args.seed
                ),
            ),
            ("h", lambda: part_h(bench, int(pick(args.rows, 20, 5)), 0.2)),
            (  # last: it kills and restarts the server
                "e",
                lambda: part_e(
                    bench,
                    before=2.0 if quick else 5.0,
                    outage=pick(args.outage, 120.0, 10.0),
                    after=3.0 if quick else 10.0,
                ),
            ),
        ]
        try:
            for letters, run in steps:
                if parts & set(letters):
                    try:
                        run()
                    except Exception as error:
                        report.error(letters, error)
                        if server.process is None:
                            server.start()
        finally:
            server.stop()
    report.summary()
    print(f"\ntotal {time.perf_counter() - began:.0f} s; load average {load()}")
    if report.failed:
        print("FAILED: " + "; ".join(report.failed))
        return 1
    print("all targets met, every point read back")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.exit(child_main(sys.argv[2], sys.argv[3]))
    sys.exit(main())
