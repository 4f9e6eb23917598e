"""Training processes that die: a trainer script, its handle, and backend readers.

The trainer (:data:`TRAINER_SCRIPT`, run by ``sys.executable`` from a file) imports
what it uses first (tracklog's build path: Stable-Baselines3; MLflow, W&B and
TensorBoard load in the delivery process, not here), then builds a logger with JSONL,
TensorBoard, MLflow (a sqlite store) and W&B (offline) outputs, prints
``delivery <pid>`` (its delivery process) and ``ready``, and dumps: after each
``logger.dump(step)`` returns it prints ``dumped <step>`` and flushes. What it dumps
and how it ends comes from a JSON plan (:class:`Plan`, a file named on argv):

- ``dumps``: the rows, in order (``scalars``, optional ``text`` and ``hist``);
- ``loop``: instead, dump row ``i`` = :func:`loop_values` at step ``i`` forever;
- ``pause``: seconds between dumps;
- ``warm``: wait until the delivery process has started the MLflow and W&B runs
  before ``ready`` (else the trainer dumps, and dies, while it is still starting);
- ``fork_child``: fork a child (``multiprocessing``'s ``fork``) that sleeps for ten
  minutes, and print ``child <pid>``;
- ``then``: after the rows, ``wait`` (sleep until killed), ``raise`` or ``close``
  (close the logger and exit 0);
- ``resume``: the logger's ``resume`` setting.

:class:`Trainer` starts it, reads its stdout on a thread (so a test can signal it
after the N-th ``dumped`` line), and waits for its delivery process to exit. The
readers return what each backend holds, read with its own reader.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import NotRequired, TypedDict

import numpy as np
import psutil

from tests.tensorboard_readback import read_events, scalars
from tracklog.readers import WandbRun, read_jsonl, read_wandb_offline

__all__ = [
    "LOOP_KEYS",
    "TRAINER_SCRIPT",
    "DeliveredRows",
    "Dump",
    "Plan",
    "Trainer",
    "alive",
    "as_float32",
    "child_env",
    "duplicates",
    "loop_values",
    "mlflow_stored",
    "read_back",
    "run_script",
    "wandb_steps",
]

TRAINER_SCRIPT = r"""
import json, resource, signal, sys, time

# As an interactive Python has them, whatever this process inherited (nohup, CI
# runners and background jobs ignore some), and no core files from SIGSEGV/SIGABRT.
for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGSEGV, signal.SIGABRT):
    signal.signal(signum, signal.SIG_DFL)
signal.signal(signal.SIGINT, signal.default_int_handler)
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
# Paid before "ready": everything the trainer imports (tracklog's build path imports
# Stable-Baselines3, ~2 s). MLflow, W&B and TensorBoard are the delivery process's.
import numpy as np
import tracklog
import tracklog._build
from tracklog._service import service

plan = json.loads(open(sys.argv[1], encoding="utf-8").read())
logger = tracklog.build_logger({
    "run_dir": plan["run_dir"],
    "resume": plan["resume"],
    "outputs": [
        {"type": "jsonl"},
        {"type": "tensorboard"},
        {"type": "mlflow", "tracking_uri": plan["tracking_uri"],
         "experiment": plan["experiment"], "artifact_upload_interval": 0},
        {"type": "wandb", "project": "crash-tests", "mode": "offline"},
    ],
    "delivery": {"close_timeout": 60},
})
print("delivery", service().pid, flush=True)
if plan["warm"]:  # dump into a delivery process that is delivering already
    for output in logger.output_formats:
        if getattr(output, "name", "") in ("mlflow", "wandb"):
            output.run_id  # waits until the delivery process has started the run
if plan["fork_child"]:  # a forked worker (SubprocVecEnv's) that outlives the trainer
    import multiprocessing, os

    def linger():
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # the test reads stdout to its end
        time.sleep(600)

    child = multiprocessing.get_context("fork").Process(target=linger)
    child.start()
    print("child", child.pid, flush=True)
print("ready", flush=True)
pause = plan["pause"]


def dump(step, scalars, text=None, hist=None):
    for key, value in scalars.items():
        logger.record(key, value)
    if text is not None:
        logger.record("notes", text)
    if hist is not None:
        logger.record("weights", np.array(hist, dtype=np.float64))
    logger.dump(step)
    # One write: print() with PYTHONUNBUFFERED writes "dumped", " " and the step apart,
    # and a SIGKILL between them leaves a line with no step.
    sys.stdout.write(f"dumped {step}\n")
    sys.stdout.flush()
    if pause:
        time.sleep(pause)


if plan["loop"]:
    keys = plan["loop_keys"]
    step = 0
    while True:
        dump(step, {key: (step * len(keys) + k) / 7 for k, key in enumerate(keys)})
        step += 1
for row in plan["dumps"]:
    dump(row["step"], row["scalars"], row.get("text"), row.get("hist"))
print("done", flush=True)
if plan["then"] == "raise":
    raise RuntimeError("training blew up")
if plan["then"] == "close":
    logger.close()
    sys.exit(0)
time.sleep(3600)  # until the test kills it
"""

#: The scalar keys of a ``loop`` trainer's rows.
LOOP_KEYS = ("loss", "reward", "policy/entropy", "value/loss", "lr")


def loop_values(step: int) -> dict[str, float]:
    """What a ``loop`` trainer records at ``step`` (the same arithmetic as the script)."""
    return {key: (step * len(LOOP_KEYS) + k) / 7 for k, key in enumerate(LOOP_KEYS)}


class Dump(TypedDict):
    """One ``dump()``: scalars, and maybe a text (key ``notes``) and a histogram
    (key ``weights``)."""

    step: int
    scalars: dict[str, float]
    text: NotRequired[str]
    hist: NotRequired[list[float]]


@dataclass
class Plan:
    """What a trainer dumps and how it ends (see the module docstring)."""

    run_dir: Path
    tracking_uri: str
    experiment: str
    dumps: list[Dump] = field(default_factory=list)
    loop: bool = False
    pause: float = 0.0
    then: str = "wait"
    warm: bool = False
    fork_child: bool = False
    resume: str = "never"

    def to_json(self) -> str:
        return json.dumps(
            {
                "run_dir": str(self.run_dir),
                "tracking_uri": self.tracking_uri,
                "experiment": self.experiment,
                "dumps": self.dumps,
                "loop": self.loop,
                "loop_keys": list(LOOP_KEYS),
                "pause": self.pause,
                "then": self.then,
                "warm": self.warm,
                "fork_child": self.fork_child,
                "resume": self.resume,
            }
        )


def child_env() -> dict[str, str]:
    """This environment without TRACKLOG_* or the developer's W&B settings."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("TRACKLOG_", "WANDB_", "MLFLOW_"))
    }
    env.update(WANDB_SILENT="true", MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1")
    return env


class Trainer:
    """A trainer process running :data:`TRAINER_SCRIPT` with ``plan``."""

    def __init__(self, plan: Plan, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        script = folder / "train.py"
        script.write_text(TRAINER_SCRIPT, encoding="utf-8")
        plan_file = folder / "plan.json"
        plan_file.write_text(plan.to_json(), encoding="utf-8")
        self.plan = plan
        # A file, not a pipe: the delivery process inherits the trainer's stderr and
        # outlives it, so a pipe would not end when the trainer does.
        self.stderr_path = folder / "stderr.txt"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115  # closed in finish()
        self.process = subprocess.Popen(
            [sys.executable, str(script), str(plan_file)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=folder,
            env=child_env(),
            text=True,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._eof = False
        self._dumped = 0  # dumped lines read
        self._ready = False
        self._reader = threading.Thread(target=self._read, name="trainer-stdout", daemon=True)
        self._reader.start()
        self.delivery: psutil.Process | None = None
        self.child: psutil.Process | None = None

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if not line.endswith("\n"):
                break  # cut off by the signal: the trainer never finished printing it
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._dumped += line.startswith("dumped ")
                self._ready = self._ready or line == "ready\n"
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    @property
    def printed(self) -> list[int]:
        """The steps of every ``dumped`` line read so far."""
        with self._changed:
            lines = list(self.lines)
        return [int(line.split()[1]) for line in lines if line.startswith("dumped ")]

    def wait_until_ready(self, timeout: float = 90.0) -> None:
        """Wait for ``ready``; note the delivery process."""
        self._wait_for(lambda: self._ready, timeout, "ready")
        (pid,) = [int(line.split()[1]) for line in self.lines if line.startswith("delivery ")]
        self.delivery = psutil.Process(pid)
        for line in self.lines:
            if line.startswith("child "):
                self.child = psutil.Process(int(line.split()[1]))

    def wait_for_dumps(self, count: int, timeout: float = 60.0) -> None:
        """Wait until ``count`` ``dumped`` lines have been read."""

        self._wait_for(lambda: self._dumped >= count, timeout, f"{count} dumped lines")

    def _wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not condition():
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    raise AssertionError(
                        f"trainer: no {what} (exit status {self.process.poll()}); stdout tail "
                        f"{self.lines[-5:]}; stderr:\n{self.stderr}"
                    )
                self._changed.wait(min(left, 0.5))

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def finish(self, timeout: float = 90.0) -> int:
        """Wait for the trainer to exit and its stdout to end; its exit status."""
        try:
            code = self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._reader.join(10)
            self._stderr.close()
        assert not self._reader.is_alive(), "the trainer's stdout is held open after its exit"
        return code

    def wait_for_delivery_exit(self, timeout: float = 90.0) -> float:
        """Wait until the delivery process has exited; the seconds it took.

        The delivery process is not our child (the trainer started it): it is reaped by
        whoever adopted it, so a zombie counts as exited.
        """
        assert self.delivery is not None, "wait_until_ready() first"
        started = time.monotonic()
        while alive(self.delivery):
            if time.monotonic() - started > timeout:
                state = _describe(self.delivery)
                with contextlib.suppress(psutil.NoSuchProcess):
                    self.delivery.kill()
                raise AssertionError(
                    f"the delivery process {self.delivery.pid} did not exit within {timeout} s "
                    f"of its trainer's death ({state}); trainer stderr:\n{self.stderr}"
                )
            time.sleep(0.05)
        return time.monotonic() - started

    def die_undelivered(self, dumps: int) -> Path:
        """The job killed whole with nothing delivered since ``ready``: the delivery
        process stopped (SIGSTOP) at once, then, after ``dumps`` dumps, it and the
        trainer SIGKILLed. The queue they leave for a replay."""
        try:
            self.wait_until_ready()
            assert self.delivery is not None
            self.delivery.suspend()
            self.wait_for_dumps(dumps)
            self.delivery.kill()
            self.signal(signal.SIGKILL)
            self.finish()
            self.wait_for_delivery_exit()
        finally:
            self.cleanup()
        (left,) = (Path(self.plan.run_dir) / "spool").iterdir()
        return left

    def cleanup(self) -> None:
        """Kill whatever is left: the trainer, its delivery process, its forked child."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for process in (self.delivery, self.child):
            if process is not None and alive(process):
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
        self._stderr.close()


def run_script(
    script: str, *args: object, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """Run ``script`` (Python source) in a new interpreter with ``args``, as a child
    with :func:`child_env`'s environment; its output captured."""
    return subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=child_env(),
    )


def alive(process: psutil.Process) -> bool:
    """Whether ``process`` runs (a zombie, exited but not reaped yet, does not)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _describe(process: psutil.Process) -> str:
    try:
        threads = len(process.threads())
        children = [" ".join(child.cmdline()[:3]) for child in process.children(recursive=True)]
        return f"status {process.status()}, {threads} threads, children {children}"
    except psutil.Error as error:
        return repr(error)


# Values as each backend keeps them ---------------------------------------------------


def mlflow_stored(value: float) -> float:
    """What MLflow's SQL store returns for ``value`` (float64)."""
    if math.isinf(value):
        # SQL has no ±inf: SqlAlchemyStore.sanitize_metric_value saves ±max float64.
        return math.copysign(sys.float_info.max, value)
    if value == 0:
        return 0.0  # SQLite keeps no sign on a REAL zero
    return value


def as_float32(value: float) -> float:
    """``value`` as TensorBoard keeps a scalar (float32, back as a Python float)."""
    with np.errstate(over="ignore"):
        return float(np.float32(value))


# What each backend holds -------------------------------------------------------------


@dataclass(frozen=True)
class DeliveredRows:
    """What each backend holds: scalar columns as ``(step, value)`` in the backend's
    own order (MLflow's sorted by step: it guarantees no order)."""

    mlflow: dict[str, list[tuple[int, float]]]
    #: ``(step, timestamp in ms)`` of every MLflow point, every key, sorted.
    mlflow_times: list[tuple[int, int]]
    mlflow_status: str
    #: The lines of the run's ``text/notes.txt`` artifact.
    mlflow_text: list[str]
    #: The file names under the run's ``histograms/weights/`` artifacts, sorted.
    mlflow_histogram_files: list[str]
    wandb: WandbRun
    tensorboard: dict[str, list[tuple[int, float]]]
    #: ``(step, wall time)`` of every TensorBoard scalar point, every key, sorted.
    tensorboard_times: list[tuple[int, float]]
    tensorboard_histograms: list[int]
    tensorboard_texts: list[int]
    jsonl: list[tuple[int, Mapping[str, object]]]
    jsonl_timestamps: list[float]

    def wandb_steps(self) -> list[int]:
        return [row.global_step for row in self.wandb.rows if row.global_step is not None]


def read_back(plan: Plan, keys: Sequence[str]) -> DeliveredRows:
    """Every backend of ``plan``'s trainer, read with its own reader."""
    from mlflow import MlflowClient  # here: importing MLflow takes seconds

    client = MlflowClient(plan.tracking_uri)
    experiment = client.get_experiment_by_name(plan.experiment)
    assert experiment is not None, f"MLflow experiment {plan.experiment} was never created"
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [run.info.run_id for run in runs]  # never a second run
    run_id = runs[0].info.run_id
    mlflow = {}
    mlflow_times: set[tuple[int, int]] = set()
    for key in keys:
        history = client.get_metric_history(run_id, key)
        mlflow[key] = sorted((point.step, point.value) for point in history)
        mlflow_times.update((point.step, point.timestamp) for point in history)
    text: list[str] = []
    if any(entry.path == "text/notes.txt" for entry in client.list_artifacts(run_id, "text")):
        with tempfile.TemporaryDirectory() as into:
            path = client.download_artifacts(run_id, "text/notes.txt", into)
            text = Path(path).read_text(encoding="utf-8").splitlines()
    histogram_files = sorted(
        PurePosixPath(entry.path).name
        for entry in client.list_artifacts(run_id, "histograms/weights")
    )

    events = read_events(plan.run_dir / "tensorboard")
    tags = events.Tags()
    tensorboard = {key: scalars(events, key) if key in tags["scalars"] else [] for key in keys}
    tensorboard_times = {
        (event.step, event.wall_time)
        for key in keys
        if key in tags["scalars"]
        for event in events.Scalars(key)
    }
    histograms = (
        [e.step for e in events.Histograms("weights")] if "weights" in tags["histograms"] else []
    )
    texts = [e.step for e in events.Tensors("notes")] if "notes" in tags["tensors"] else []

    jsonl_path = plan.run_dir / "progress.jsonl"
    jsonl = read_jsonl(jsonl_path) if jsonl_path.exists() else []
    return DeliveredRows(
        mlflow=mlflow,
        mlflow_times=sorted(mlflow_times),
        mlflow_status=runs[0].info.status,
        mlflow_text=text,
        mlflow_histogram_files=histogram_files,
        wandb=read_wandb_offline(plan.run_dir),
        tensorboard=tensorboard,
        tensorboard_times=sorted(tensorboard_times),
        tensorboard_histograms=histograms,
        tensorboard_texts=texts,
        jsonl=[(row.step, row.values) for row in jsonl],
        jsonl_timestamps=[row.timestamp for row in jsonl],
    )


def wandb_steps(run_dir: Path, key: str = "loss") -> list[int]:
    """The global_step of every W&B row holding ``key``, in all of the run's offline
    files under ``run_dir`` (one per delivery that went on with the run)."""
    runs = [read_wandb_offline(d) for d in sorted((run_dir / "wandb").glob("offline-run-*"))]
    assert len({run.run_id for run in runs}) == 1
    return [
        row.global_step
        for run in runs
        for row in run.rows
        if key in row.values and row.global_step is not None
    ]


def duplicates(steps: Sequence[int]) -> list[int]:
    return sorted(step for step, count in Counter(steps).items() if count > 1)
