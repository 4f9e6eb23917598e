"""Background delivery: the training thread's cost of MLflow and W&B, and nothing lost.

Every part logs to all six outputs (console, train.log, JSONL, CSV, a real ``mlflow
server`` on loopback and a W&B offline run) and measures, in this one process and
interleaved with its anchor so machine drift hits both alike:

(a) training-thread time per dump of 50 scalars, with GIL-releasing NumPy work in
    between, against SB3's own Logger (stdout + log + csv); console output goes to
    /dev/null for both;
(b) the same dumps against the seed project's one synchronous ``log_metric`` per key;
(c) record + dump of a 100-frame 64x64 video;
(d) PPO on CartPole end to end (with an evaluation video every quarter of training),
    tracklog as SB3's logger against SB3's default logger, wall time including close;
(e) MLflow killed for two minutes at 20 dumps/s: memory growth and the slowest dump
    while rows spool to disk, then every point delivered exactly once.

Afterwards every point is read back with each backend's own reader (MlflowClient,
tracklog.readers for JSONL, CSV and the W&B run): a fast run that lost data fails.
Each part prints its figure, its target and PASS/FAIL; the exit status is 1 if any
target or check fails.

The stand-in training work (NumPy's BLAS, and torch in (d)) runs on one thread, so on
a 2-core machine the other core is left to what this benchmark also runs locally (the
mlflow server, W&B's service); set OPENBLAS_NUM_THREADS to change that.

    python bench/bench_delivery.py [--quick] [--only a,b,c,d,e]
"""

from __future__ import annotations

import os

os.environ["WANDB_SILENT"] = "true"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # CartPole renders off-screen

import argparse
import contextlib
import math
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gymnasium as gym
import numpy as np
import numpy.typing as npt
import torch
from mlflow import MlflowClient
from stable_baselines3 import PPO
from stable_baselines3.common import logger as sb3_logger
from stable_baselines3.common.callbacks import BaseCallback
from tests.servers import MlflowServer

import tracklog
from tracklog.readers import LoggedRow, read_csv, read_jsonl, read_wandb_offline

KEYS = [f"group{i % 5}/metric_{i}" for i in range(50)]
VIDEO_KEY = "eval/video"
MATRIX_SIZE = 384  # one np.dot of it: a few ms of GIL-free work, like a training step

Expected = list[tuple[int, dict[str, float]]]  # (step, {key: value}) per dump, in order


def value(step: int, i: int) -> float:
    return step + i / 7


# Reporting ---------------------------------------------------------------------------
@dataclass
class Report:
    failed: list[str] = field(default_factory=list)

    def target(self, part: str, what: str, figure: str, target: str, ok: bool) -> None:
        print(f"({part}) {what}: {figure}   target {target}   {'PASS' if ok else 'FAIL'}")
        if not ok:
            self.failed.append(f"({part}) {what}")

    def check(self, part: str, what: str, problems: list[str]) -> None:
        status = "PASS" if not problems else f"FAIL ({len(problems)} problem(s))"
        print(f"({part}) read back: {what}   {status}")
        for problem in problems[:10]:
            print(f"      {problem}")
        if problems:
            self.failed.append(f"({part}) read back: {what}")


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[int(q * (len(ordered) - 1))]


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


_TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu(root: int, exclude: int | None = None) -> float:
    """CPU seconds used so far by process ``root`` and its descendants (not the subtree
    of ``exclude``), from /proc: what other processes took from the two cores."""
    parents: dict[int, int] = {}
    used: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        used[pid] = (int(fields[11]) + int(fields[12])) / _TICK
    total = 0.0
    for pid in used:
        ancestor: int | None = pid
        while ancestor is not None and ancestor not in (root, exclude):
            ancestor = parents.get(ancestor)
        if ancestor == root:
            total += used[pid]
    return total


def settle(server: MlflowServer, timeout: float = 90.0) -> float:
    """Wait until the server's processes are idle (its job runner and consumers take
    several CPU-seconds to start); return the seconds waited."""
    assert server.process is not None
    start = time.perf_counter()
    before = tree_cpu(server.process.pid)
    while time.perf_counter() - start < timeout:
        time.sleep(2.0)
        now = tree_cpu(server.process.pid)
        if now - before < 0.1:
            break
        before = now
    return time.perf_counter() - start


def load() -> str:
    """The machine's load: other processes skew every figure (both sides alike)."""
    return " ".join(f"{figure:.2f}" for figure in os.getloadavg())


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Console output of both sides goes to /dev/null: the same sink for both."""
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield


# Loggers -------------------------------------------------------------------------------
def six_outputs(url: str, run_name: str, **mlflow: object) -> list[dict[str, object]]:
    return [
        {"type": "console"},
        {"type": "file"},
        {"type": "jsonl"},
        {"type": "csv"},
        {
            "type": "mlflow",
            "tracking_uri": url,
            "experiment": "bench",
            "run_name": run_name,
            **mlflow,
        },
        {"type": "wandb", "project": "bench", "mode": "offline", "name": run_name},
    ]


def build(run_dir: Path, outputs: list[dict[str, object]], **delivery: object) -> tracklog.Logger:
    settings: dict[str, object] = {"run_dir": str(run_dir), "outputs": outputs}
    if delivery:
        settings["delivery"] = delivery
    return tracklog.build_logger(settings)


def experiment_id(client: MlflowClient) -> str:
    experiment = client.get_experiment_by_name("bench")
    return experiment.experiment_id if experiment else client.create_experiment("bench")


def warm_up(url: str) -> float:
    """The server's first ~100 requests are about 3x slower than later ones: send them
    before anything is timed (so the seed's anchor in (b) is not inflated)."""
    client = MlflowClient(url)
    start = time.perf_counter()
    with quiet_stdout():
        run = client.create_run(experiment_id(client), run_name="warm-up").info.run_id
        for i in range(150):
            client.log_metric(run, "warm-up", float(i), step=i)
        client.set_terminated(run)
    return time.perf_counter() - start


def mlflow_run_id(logger: tracklog.Logger) -> str:
    return next(
        output.run_id
        for output in logger.output_formats
        if isinstance(output, tracklog.MLFlowOutputFormat)
    )


# Read-back checks ------------------------------------------------------------------------
def same(a: object, b: object) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) == float(b) or (math.isnan(float(a)) and math.isnan(float(b)))
    return a == b


def check_mlflow(client: MlflowClient, run_id: str, expected: Expected) -> list[str]:
    """Every scalar of ``expected`` is in the run's history once, at its step, exactly."""
    problems: list[str] = []
    by_key: dict[str, list[tuple[int, float]]] = {}
    for step, values in expected:
        for key, number in values.items():
            by_key.setdefault(key, []).append((step, number))
    for key, points in sorted(by_key.items()):
        history = client.get_metric_history(run_id, key)
        got = sorted((point.step, point.value) for point in history)
        want = sorted(points)
        if len(got) != len(want):
            problems.append(f"MLflow {key}: {len(got)} points, expected {len(want)}")
        elif len({step for step, _ in got}) != len(got):
            problems.append(f"MLflow {key}: duplicated steps")
        elif not all(g[0] == w[0] and same(g[1], w[1]) for g, w in zip(got, want, strict=True)):
            problems.append(f"MLflow {key}: steps or values differ")
    return problems


def check_rows(name: str, rows: list[LoggedRow], expected: Expected) -> list[str]:
    """``rows`` (JSONL or CSV) hold ``expected`` in order, values exact."""
    if len(rows) != len(expected):
        return [f"{name}: {len(rows)} rows, expected {len(expected)}"]
    problems = []
    for index, (row, (step, values)) in enumerate(zip(rows, expected, strict=True)):
        if row.step != step or any(not same(row.values.get(k), v) for k, v in values.items()):
            problems.append(f"{name}: row {index} (step {step}) differs")
    return problems


def check_wandb(run_dir: Path, expected: Expected) -> list[str]:
    run = read_wandb_offline(run_dir)
    if len(run.rows) != len(expected):
        return [f"W&B: {len(run.rows)} rows, expected {len(expected)}"]
    problems = []
    for index, (row, (step, values)) in enumerate(zip(run.rows, expected, strict=True)):
        if row.global_step != step or any(
            not same(row.values.get(k), v) for k, v in values.items()
        ):
            problems.append(f"W&B: row {index} (step {step}) differs")
    if run.exit_code != 0:
        problems.append(f"W&B: exit code {run.exit_code}")
    return problems


def check_all(client: MlflowClient, logger: tracklog.Logger, expected: Expected) -> list[str]:
    """Every backend of a six-output logger (closed) holds ``expected``."""
    run_dir = Path(logger.get_dir() or ".")
    problems = check_mlflow(client, mlflow_run_id(logger), expected)
    problems += check_rows("JSONL", read_jsonl(run_dir / "progress.jsonl"), expected)
    problems += check_rows("CSV", read_csv(run_dir / "progress.csv"), expected)
    problems += check_wandb(run_dir, expected)
    status = client.get_run(mlflow_run_id(logger)).info.status
    if status != "FINISHED":
        problems.append(f"MLflow run status {status}")
    leftover = list((run_dir / "spool").rglob("records.log"))
    if leftover:
        problems.append(f"undelivered spool left behind: {leftover}")
    return problems


# (a) and (b): dumps of 50 scalars -------------------------------------------------------
def _dump(record: Callable[[str, float], None], dump: Callable[[int], None], step: int) -> float:
    start = time.perf_counter()
    for i, key in enumerate(KEYS):
        record(key, value(step, i))
    dump(step)
    return time.perf_counter() - start


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


@dataclass(frozen=True)
class Sample:
    wall: float
    cpu: float
    waiting: float  # runnable, no core free

    @property
    def blocked(self) -> float:
        return max(0.0, self.wall - self.cpu - self.waiting)


def _sampled_dump(clock: ThreadClock, logger: sb3_logger.Logger, step: int) -> Sample:
    cpu, waiting = clock.read()
    wall = _dump(logger.record, logger.dump, step)
    cpu_after, waiting_after = clock.read()
    return Sample(wall, cpu_after - cpu, waiting_after - waiting)


def _describe(name: str, samples: list[Sample]) -> None:
    walls = [sample.wall for sample in samples]
    print(
        f"  {name}: median {ms(statistics.median(walls))}, p99 {ms(quantile(walls, 0.99))}"
        f", max {ms(max(walls))}; thread CPU median "
        f"{ms(statistics.median(sample.cpu for sample in samples))}"
    )
    slow = [sample for sample in samples if sample.wall > 2e-3]
    if slow:
        print(
            f"      {len(slow)} dumps over 2 ms; in them on average: CPU "
            f"{ms(statistics.mean(s.cpu for s in slow))}, waiting for a core "
            f"{ms(statistics.mean(s.waiting for s in slow))}, blocked (GIL, locks, I/O) "
            f"{ms(statistics.mean(s.blocked for s in slow))}"
        )


def part_ab(
    report: Report, url: str, tmp: Path, parts: set[str], dumps: int, seed_dumps: int
) -> None:
    section("(a) dump of 50 scalars vs SB3's Logger; (b) vs one log_metric per key")
    client = MlflowClient(url)
    matrix = np.random.default_rng(0).random((MATRIX_SIZE, MATRIX_SIZE))
    with_sb3, with_seed = "a" in parts, "b" in parts
    seed_run = ""
    if with_seed:
        seed_run = client.create_run(experiment_id(client), run_name="seed-per-key").info.run_id
    seed_every = max(1, dumps // seed_dumps) if with_seed else 0
    warmup = 5
    ours_samples: list[Sample] = []
    sb3_samples: list[Sample] = []
    seed_times: list[float] = []
    seed_steps: list[int] = []
    clock = ThreadClock()
    with quiet_stdout():
        ours = build(tmp / "ab-tracklog", six_outputs(url, "ab-tracklog"))
        sb3 = sb3_logger.configure(str(tmp / "ab-sb3"), ["stdout", "log", "csv"])
        for step in range(warmup + dumps):
            sides: list[tuple[sb3_logger.Logger, list[Sample]]] = [(ours, ours_samples)]
            if with_sb3:
                sides.append((sb3, sb3_samples))
                if step % 2:
                    sides.reverse()  # neither side always follows the other's dump
            for logger, samples in sides:
                np.dot(matrix, matrix)  # releases the GIL, as a training step's kernels do
                sample = _sampled_dump(clock, logger, step)
                if step >= warmup:
                    samples.append(sample)
            if (
                seed_every
                and step >= warmup
                and (step - warmup) % seed_every == 0
                and len(seed_times) < seed_dumps
            ):
                np.dot(matrix, matrix)
                start = time.perf_counter()
                for i, key in enumerate(KEYS):  # the seed's MLFlowOutputFormat.write
                    client.log_metric(seed_run, key, value(step, i), step=step)
                seed_times.append(time.perf_counter() - start)
                seed_steps.append(step)
        start = time.perf_counter()
        ours.close()
        close_time = time.perf_counter() - start
        sb3.close()
        if with_seed:
            client.set_terminated(seed_run)
    clock.close()
    total = warmup + dumps
    print(
        f"{dumps} timed dumps per side (+{warmup} warm-up), interleaved, a {MATRIX_SIZE}x"
        f"{MATRIX_SIZE} np.dot before each; tracklog close() {close_time:.2f} s"
    )
    ours_times = [sample.wall for sample in ours_samples]
    our_median, our_p99 = statistics.median(ours_times), quantile(ours_times, 0.99)
    _describe("tracklog, six outputs", ours_samples)
    if with_sb3:
        _describe("SB3 Logger, stdout+log+csv", sb3_samples)
        sb3_median = statistics.median(sample.wall for sample in sb3_samples)
        ratios = [o.wall / s.wall for o, s in zip(ours_samples, sb3_samples, strict=True)]
        ratio = statistics.median(ratios)
        report.target(
            "a",
            "median per-dump ratio tracklog/SB3",
            f"{ratio:.2f} (ratio of medians {our_median / sb3_median:.2f})",
            "<= 1.0",
            ratio <= 1.0,
        )
        report.target("a", "tracklog p99 per dump", ms(our_p99), "<= 5 ms", our_p99 <= 5e-3)
    if with_seed:
        seed_median = statistics.median(seed_times)
        print(f"  seed, 50 log_metric calls   median {ms(seed_median)} ({len(seed_times)} dumps)")
        speedup = seed_median / our_median
        report.target(
            "b",
            "training-thread time per dump, seed/tracklog (medians)",
            f"{speedup:.0f}x ({ms(seed_median)} / {ms(our_median)})",
            ">= 1000x",
            speedup >= 1000,
        )
        seed_expected: Expected = [
            (step, {key: value(step, i) for i, key in enumerate(KEYS)}) for step in seed_steps
        ]
        report.check("b", "seed run, every point", check_mlflow(client, seed_run, seed_expected))
    expected: Expected = [
        (step, {key: value(step, i) for i, key in enumerate(KEYS)}) for step in range(total)
    ]
    report.check(
        "a" if with_sb3 else "b",
        f"tracklog: {total} dumps x 50 keys in MLflow, JSONL, CSV, W&B",
        check_all(client, ours, expected),
    )


# (c) one video -----------------------------------------------------------------------------
def part_c(report: Report, url: str, tmp: Path, videos: int, gap: float) -> None:
    section("(c) record + dump of one 100-frame 64x64 RGB video, six outputs")
    client = MlflowClient(url)
    matrix = np.random.default_rng(0).random((MATRIX_SIZE, MATRIX_SIZE))
    frames = np.random.default_rng(1).integers(0, 256, (1, 100, 3, 64, 64), dtype=np.uint8)
    samples: list[Sample] = []
    clock = ThreadClock()
    with quiet_stdout():
        logger = build(tmp / "c-tracklog", six_outputs(url, "c-video"))
        for step in range(videos):
            until = time.perf_counter() + gap  # training between two evaluation videos
            while time.perf_counter() < until:
                np.dot(matrix, matrix)
            cpu, waiting = clock.read()
            start = time.perf_counter()
            logger.record(VIDEO_KEY, tracklog.Video(frames, fps=30))
            logger.dump(step)
            wall = time.perf_counter() - start
            cpu_after, waiting_after = clock.read()
            samples.append(Sample(wall, cpu_after - cpu, waiting_after - waiting))
        start = time.perf_counter()
        logger.close()
        close_time = time.perf_counter() - start
    clock.close()
    print(f"{videos} videos, {gap:g} s of np.dot between them; close() {close_time:.2f} s")
    _describe("record + dump", samples)
    median = statistics.median(sample.wall for sample in samples)
    report.target("c", "median record+dump of one video", ms(median), "<= 5 ms", median <= 5e-3)
    problems = check_videos(client, logger, list(range(videos)))
    report.check("c", f"{videos} videos in MLflow, W&B, JSONL, CSV", problems)


def check_videos(
    client: MlflowClient, logger: tracklog.Logger, steps: list[int] | None = None
) -> list[str]:
    """Each dump with a video reached every backend as a playable file."""
    run_dir = Path(logger.get_dir() or ".")
    problems: list[str] = []
    rows = read_jsonl(run_dir / "progress.jsonl")
    video_steps = [row.step for row in rows if VIDEO_KEY in row.values]
    if steps is not None and video_steps != steps:
        problems.append(f"JSONL: videos at steps {video_steps}, expected {steps}")
    for name, file_rows in (("JSONL", rows), ("CSV", read_csv(run_dir / "progress.csv"))):
        for row in file_rows:
            if VIDEO_KEY in row.values:
                path = run_dir / str(row.values[VIDEO_KEY])
                if not path.is_file() or path.stat().st_size == 0:
                    problems.append(f"{name}: {path} missing or empty")
    listed = client.list_artifacts(mlflow_run_id(logger), f"videos/{VIDEO_KEY}")
    got = sorted(entry.path for entry in listed if (entry.file_size or 0) > 0)
    want = sorted(f"videos/{VIDEO_KEY}/step_{step}.mp4" for step in video_steps)
    if got != want:
        problems.append(f"MLflow: artifacts {got}, expected {want}")
    run = read_wandb_offline(run_dir)
    wandb_steps = [entry.global_step for entry in run.rows if VIDEO_KEY in entry.values]
    if wandb_steps != video_steps:
        problems.append(f"W&B: video rows at {wandb_steps}, expected {video_steps}")
    for entry in run.rows:
        if VIDEO_KEY in entry.values and not run.media_path(entry.values[VIDEO_KEY]).is_file():
            problems.append(f"W&B: no file for the video at step {entry.global_step}")
    return problems


# (d) PPO end to end ------------------------------------------------------------------------
class VideoCallback(BaseCallback):
    """Every ``every`` steps, renders a short greedy episode and records it as a video.

    Into a tracklog Logger as ``tracklog.Video``; into SB3's own Logger as SB3's
    ``Video``, excluded from its text and CSV formats (which cannot show it).
    """

    def __init__(self, every: int, frames: int = 50) -> None:
        super().__init__()
        self.every, self.frames, self.next_at = every, frames, every
        self.env = gym.make("CartPole-v1", render_mode="rgb_array")
        self.recorded = 0

    def _on_step(self) -> bool:
        if self.num_timesteps >= self.next_at:
            self.next_at += self.every
            clip = self._render()  # (T,C,H,W)
            if isinstance(self.logger, tracklog.Logger):
                self.logger.record(VIDEO_KEY, tracklog.Video(clip, fps=25))
            else:
                video = sb3_logger.Video(torch.from_numpy(clip[np.newaxis]), fps=25)
                self.logger.record(VIDEO_KEY, video, exclude=("stdout", "log", "json", "csv"))
            self.recorded += 1
        return True

    def _render(self) -> npt.NDArray[np.uint8]:
        observation, _ = self.env.reset(seed=0)
        frames: list[npt.NDArray[np.uint8]] = []
        while len(frames) < self.frames:
            rendered: Any = self.env.render()
            frames.append(np.asarray(rendered, dtype=np.uint8)[::4, ::4])  # 100x150
            action, _ = self.model.predict(observation, deterministic=True)
            observation, _, terminated, truncated, _ = self.env.step(int(action))
            if terminated or truncated:
                observation, _ = self.env.reset()
        return np.stack(frames).transpose(0, 3, 1, 2)

    def _on_training_end(self) -> None:
        self.env.close()


@dataclass(frozen=True)
class Run:
    """One training run: wall time, and where the training thread's time went."""

    wall: float
    close: float
    build: float
    thread: Sample  # the training thread over the whole run
    others_cpu: float  # CPU time of this process's other threads (workers, encoders, ...)
    server_cpu: float  # CPU time of the mlflow server's processes
    children_cpu: float  # CPU time of our other child processes (W&B's service)


def _train(
    logger: sb3_logger.Logger, timesteps: int, build: float, server: int
) -> tuple[Run, PPO, VideoCallback]:
    """PPO creation + learn + the logger's close, timed."""
    clock = ThreadClock()
    server_cpu = tree_cpu(server)
    everything = tree_cpu(os.getpid(), exclude=server)
    process = os.times()
    cpu, waiting = clock.read()
    start = time.perf_counter()
    model = PPO("MlpPolicy", "CartPole-v1", n_steps=256, seed=0, device="cpu", verbose=0)
    model.set_logger(logger)
    callback = VideoCallback(every=max(1, timesteps // 4))
    model.learn(timesteps, callback=callback)
    closing = time.perf_counter()
    logger.close()
    end = time.perf_counter()
    cpu_after, waiting_after = clock.read()
    clock.close()
    process_after = os.times()
    server_cpu = tree_cpu(server) - server_cpu
    everything = tree_cpu(os.getpid(), exclude=server) - everything
    process_cpu = (process_after.user - process.user) + (process_after.system - process.system)
    thread = Sample(end - start, cpu_after - cpu, waiting_after - waiting)
    others = max(0.0, process_cpu - thread.cpu)
    children = max(0.0, everything - process_cpu)
    run = Run(end - start, end - closing, build, thread, others, server_cpu, children)
    return run, model, callback


def _run_side(
    side: str, name: str, server: MlflowServer, tmp: Path, timesteps: int, client: MlflowClient
) -> tuple[Run, list[str]]:
    """One training run, and the problems found reading it back."""
    with quiet_stdout():
        start = time.perf_counter()
        if side == "sb3":
            logger: sb3_logger.Logger = sb3_logger.configure(
                str(tmp / name), ["stdout", "log", "csv"]
            )
        else:
            logger = build(tmp / name, six_outputs(server.url, name))
        assert server.process is not None
        built = time.perf_counter() - start
        run, model, callback = _train(logger, timesteps, built, server.process.pid)
    dumps = model.num_timesteps // model.n_steps
    if not isinstance(logger, tracklog.Logger):
        with open(tmp / name / "progress.csv", encoding="utf-8") as csv_file:
            rows = sum(1 for _ in csv_file) - 1
        return run, [] if rows == dumps else [f"{name}: {rows} CSV rows, {dumps} dumps"]
    problems = check_ppo_run(client, logger, dumps) + check_videos(client, logger)
    videos = [row for row in read_jsonl(tmp / name / "progress.jsonl") if VIDEO_KEY in row.values]
    if len(videos) != callback.recorded:
        problems.append(f"{len(videos)} video rows, {callback.recorded} videos recorded")
    return run, [f"{name}: {problem}" for problem in problems]


def part_d(report: Report, server: MlflowServer, tmp: Path, timesteps: int, runs: int) -> None:
    section(f"(d) PPO CartPole-v1 {timesteps} steps, six outputs vs SB3's default logger")
    torch.set_num_threads(1)
    client = MlflowClient(server.url)
    checks: list[str] = []
    # Untimed: the process's first PPO run pays for imports and warm-up (torch, PyAV, W&B).
    for side in ("tracklog", "sb3"):
        checks += _run_side(side, f"d-warm-up-{side}", server, tmp, 1024, client)[1]
    results: dict[str, list[Run]] = {"tracklog": [], "sb3": []}
    for index in range(runs):  # A B, B A, ...: drift hits both alike
        for side in ("tracklog", "sb3") if index % 2 == 0 else ("sb3", "tracklog"):
            run, problems = _run_side(side, f"d-{side}-{index}", server, tmp, timesteps, client)
            results[side].append(run)
            checks += problems
    print(
        "  wall time of PPO(...) + learn() + logger.close(), run by run; [of which close;"
        " training thread: CPU / waiting for a core / blocked (GIL, locks, I/O); CPU of our"
        " other threads, of the mlflow server, of W&B's service]"
    )
    for side, label in (("tracklog", "tracklog"), ("sb3", "SB3")):
        for run in results[side]:
            print(
                f"    {label:<9} {run.wall:6.2f} s  [close {run.close:.2f}; {run.thread.cpu:.2f}"
                f" / {run.thread.waiting:.2f} / {run.thread.blocked:.2f} s; {run.others_cpu:.2f}"
                f", {run.server_cpu:.2f}, {run.children_cpu:.2f} s]  logger build {run.build:.3f}"
                " s (not in the ratio)"
            )
    ours = [run.wall for run in results["tracklog"]]
    theirs = [run.wall for run in results["sb3"]]
    ratio = statistics.median(ours) / statistics.median(theirs)
    with_build = statistics.median(r.wall + r.build for r in results["tracklog"]) / (
        statistics.median(r.wall + r.build for r in results["sb3"])
    )
    report.target(
        "d",
        "wall-time ratio tracklog/SB3 (medians, PPO + learn + close)",
        f"{ratio:.3f} (sums {sum(ours) / sum(theirs):.3f}; with logger build {with_build:.3f})",
        "<= 1.05",
        ratio <= 1.05,
    )
    report.check("d", f"{runs} tracklog runs (+1 warm-up): every dump, key and video", checks)


def check_ppo_run(client: MlflowClient, logger: tracklog.Logger, dumps: int) -> list[str]:
    """JSONL holds one row per PPO dump; MLflow, CSV and W&B hold the same scalars."""
    run_dir = Path(logger.get_dir() or ".")
    rows = read_jsonl(run_dir / "progress.jsonl")
    problems = []
    counted = [row for row in rows if "time/total_timesteps" in row.values]
    if len(counted) != dumps:
        problems.append(f"JSONL: {len(counted)} rows with time/total_timesteps, {dumps} dumps")
    history = client.get_metric_history(mlflow_run_id(logger), "time/total_timesteps")
    if len(history) != len(counted):
        problems.append(f"MLflow: {len(history)} time/total_timesteps points, {len(counted)} dumps")
    expected: Expected = [
        (
            row.step,
            {k: float(v) for k, v in row.values.items() if isinstance(v, int | float)},
        )
        for row in rows
    ]
    problems += check_mlflow(client, mlflow_run_id(logger), expected)
    problems += check_rows("CSV", read_csv(run_dir / "progress.csv"), expected)
    problems += check_wandb(run_dir, expected)
    status = client.get_run(mlflow_run_id(logger)).info.status
    if status != "FINISHED":
        problems.append(f"MLflow run status {status}")
    return problems


# (e) MLflow down ---------------------------------------------------------------------------
def part_e(
    report: Report, server: MlflowServer, tmp: Path, before: float, outage: float, after: float
) -> None:
    section(f"(e) MLflow server killed for {outage:g} s at 20 dumps/s of 50 scalars")
    client = MlflowClient(server.url)
    run_dir = tmp / "e-tracklog"
    mlflow_settings: dict[str, object] = {
        "type": "mlflow",
        "tracking_uri": server.url,
        "experiment": "bench",
        "run_name": "e-outage",
        "request_retries": 0,
        "request_timeout": 2,
    }
    logger = build(
        run_dir,
        [{"type": "jsonl"}, {"type": "csv"}, mlflow_settings],
        retry_initial=0.5,
        retry_max=5,
        close_timeout=300,
    )
    run_id = mlflow_run_id(logger)
    period = 1 / 20
    step = 0
    clock = ThreadClock()
    samples: list[tuple[float, Sample]] = []  # (when, the dump)
    drained_at: float | None = None

    def dump_until(done: Callable[[], bool], *, watch_backlog: bool = False) -> None:
        nonlocal step, drained_at
        next_at = time.perf_counter()
        while not done():
            time.sleep(max(0.0, next_at - time.perf_counter()))
            next_at += period
            samples.append((time.perf_counter(), _sampled_dump(clock, logger, step)))
            step += 1
            if watch_backlog and drained_at is None and logger.flush(timeout=0):
                drained_at = time.perf_counter()

    started = time.perf_counter()
    dump_until(lambda: time.perf_counter() >= started + before)
    rss_before = rss_bytes()
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
    rss_after = rss_bytes()
    spool_bytes = sum(
        path.stat().st_size for path in (run_dir / "spool").rglob("*") if path.is_file()
    )
    if errors:
        raise errors[0]
    dump_until(lambda: time.perf_counter() >= back_at + after, watch_backlog=True)
    start = time.perf_counter()
    with quiet_stdout():  # MLflow prints a link to the run
        logger.close()
    close_time = time.perf_counter() - start
    clock.close()
    down = [x for when, x in samples if killed_at <= when <= back_at]
    phases = {
        "before the outage": [x for when, x in samples if when < killed_at],
        "while MLflow is down": [x for when, x in samples if killed_at <= when < restart_at],
        "while it restarts": [x for when, x in samples if restart_at <= when <= back_at],
        "once it is back": [x for when, x in samples if when > back_at],
    }
    drained = (
        f"the backlog drained {drained_at - back_at:.1f} s after the server was back"
        if drained_at is not None
        else f"close() drained the rest of the backlog in {close_time:.1f} s"
    )
    print(
        f"{step} dumps; down {back_at - killed_at:.1f} s (incl. the restart); spool "
        f"{spool_bytes / 2**20:.1f} MiB at the end of the outage; {drained}; RSS "
        f"{rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB"
    )
    for name, phase in phases.items():
        if phase:
            _describe(f"{len(phase)} dumps {name}", phase)
    growth = rss_after - rss_before
    report.target(
        "e",
        "RSS growth over the outage",
        f"{growth / 2**20:.1f} MiB",
        "<= 64 MiB",
        growth <= 64 * 2**20,
    )
    worst = max(sample.wall for sample in down)
    report.target(
        "e", "worst dump while MLflow is down (incl. restart)", ms(worst), "<= 50 ms", worst <= 0.05
    )
    expected: Expected = [
        (s, {key: value(s, i) for i, key in enumerate(KEYS)}) for s in range(step)
    ]
    problems = check_mlflow(client, run_id, expected)
    problems += check_rows("JSONL", read_jsonl(run_dir / "progress.jsonl"), expected)
    status = client.get_run(run_id).info.status
    if status != "FINISHED":
        problems.append(f"MLflow run status {status}")
    leftover = list((run_dir / "spool").rglob("records.log"))
    if leftover:
        problems.append(f"undelivered spool left behind: {leftover}")
    report.check("e", f"{step} dumps x 50 keys in MLflow, none missing or duplicated", problems)


# Main ----------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run of every part")
    parser.add_argument("--only", default="a,b,c,d,e", help="parts to run, e.g. a,c")
    parser.add_argument("--dumps", type=int, help="(a) timed dumps per side (400)")
    parser.add_argument("--seed-dumps", type=int, help="(b) seed dumps (15)")
    parser.add_argument("--videos", type=int, help="(c) videos (10)")
    parser.add_argument("--timesteps", type=int, help="(d) PPO steps (20000)")
    parser.add_argument("--runs", type=int, default=3, help="(d) runs per side (3)")
    parser.add_argument("--outage", type=float, help="(e) seconds MLflow is down (120)")
    args = parser.parse_args()
    parts = {part.strip() for part in args.only.split(",") if part.strip()}
    if not parts or not parts <= set("abcde"):
        parser.error(f"--only takes letters from a,b,c,d,e, not {args.only!r}")
    quick = args.quick

    def pick(given: float | None, full: float, short: float) -> float:
        return given if given is not None else (short if quick else full)

    dumps = int(pick(args.dumps, 400, 100))
    seed_dumps = int(pick(args.seed_dumps, 15, 4))
    videos = int(pick(args.videos, 10, 3))
    timesteps = int(pick(args.timesteps, 20_000, 5_000))
    outage = pick(args.outage, 120.0, 15.0)

    report = Report()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-delivery-") as directory:
        tmp = Path(directory)
        server = MlflowServer(tmp / "server")
        start = time.perf_counter()
        server.start()
        print(f"mlflow server at {server.url}, up in {time.perf_counter() - start:.1f} s", end="")
        print(
            f", warmed up in {warm_up(server.url):.1f} s, idle after {settle(server):.0f} s", end=""
        )
        print(f"; load average {load()}")
        try:
            if parts & {"a", "b"}:
                part_ab(report, server.url, tmp, parts, dumps, seed_dumps)
            if "c" in parts:
                part_c(report, server.url, tmp, videos, gap=0.5 if quick else 1.0)
            if "d" in parts:
                part_d(report, server, tmp, timesteps, args.runs)
            if "e" in parts:  # last: it kills and restarts the server
                part_e(
                    report,
                    server,
                    tmp,
                    before=2.0 if quick else 5.0,
                    outage=outage,
                    after=5.0 if quick else 10.0,
                )
        finally:
            server.stop()
    print(f"\ntotal {time.perf_counter() - began:.0f} s; load average {load()}")
    if report.failed:
        print("FAILED: " + "; ".join(report.failed))
        return 1
    print("all targets met, every point read back")
    return 0


if __name__ == "__main__":
    sys.exit(main())
