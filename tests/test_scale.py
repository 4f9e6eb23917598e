"""Sweeps: many training processes logging at once into one MLflow server on PostgreSQL.

The stack is real: a PostgreSQL cluster (``tests/postgres.py``), ``mlflow server`` with
``--backend-store-uri postgresql://…`` on loopback, and training processes started as
a sweep would start them: one settings file, the job number from SLURM's
``SLURM_ARRAY_TASK_ID`` (or Hydra's multirun), each job its own ``run_dir``. What
arrived is read back with ``MlflowClient`` and decoded with PyAV.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.entities import Run

from tests.postgres import PostgresServer
from tests.readback import decode_mp4
from tests.servers import MlflowServer

JOBS = 8
DUMPS = 100
KEYS = 50
VIDEO_STEP = 60
FRAMES, HEIGHT, WIDTH = 8, 16, 16


@dataclass
class Stack:
    postgres: PostgresServer
    mlflow: MlflowServer

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.mlflow.url)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """PostgreSQL and an ``mlflow server`` on it, once for this module (~20 s)."""
    postgres = PostgresServer()
    try:
        postgres.start()
        server = MlflowServer(
            tmp_path_factory.mktemp("mlflow-postgres"),
            backend_store_uri=postgres.uri,
            workers=2,
        )
        server.start()
        try:
            yield Stack(postgres, server)
        finally:
            server.stop()
    finally:
        postgres.remove()


def value(job: int, key: int, step: int) -> float:
    """The value job ``job`` logs for key ``key`` at ``step``: unique across the sweep."""
    return job * 1_000_000 + key * 1_000 + step + 0.25


# The sweep: a launcher imports tracklog once and forks JOBS processes (a fresh
# interpreter each would spend ~3 s of CPU per job importing torch and MLflow on a
# 2-core machine). Each job sets its SLURM_ARRAY_TASK_ID and TRACKLOG_RUN_DIR as a
# job array would, builds its logger from the one settings file, says "ready", waits
# for "go" (so all jobs dump at once), marks "half" after half its dumps (and, with
# "pause", waits there until the test has stopped the server) and paces its dumps as
# training would.
SWEEP_SCRIPT = """
import os, sys, time, traceback
from pathlib import Path
import numpy as np
import mlflow
import tracklog
import tracklog.outputs.mlflow

settings, pace, root = sys.argv[1], float(sys.argv[2]), Path(sys.argv[3])
pause = sys.argv[4] == "pause"
go_read, go_write = os.pipe()


def job(number: int) -> None:
    here = root / f"job{number}"
    os.environ["SLURM_ARRAY_TASK_ID"] = str(number)
    os.environ["TRACKLOG_RUN_DIR"] = str(here / "run")
    (here / "ready").touch()
    assert os.read(go_read, 1) == b"g"
    with tracklog.build_logger(settings) as logger:
        logger.record("hparams", tracklog.HParam({"lr": 0.001 * (number + 1), "job": number}))
        for step in range(DUMPS):
            for key in range(KEYS):
                logger.record(f"train/m{key:02d}", number * 1_000_000 + key * 1_000 + step + 0.25)
            if step == VIDEO_STEP:
                frames = np.full((FRAMES, 3, HEIGHT, WIDTH), 16 * number, dtype=np.uint8)
                logger.record("eval/video", tracklog.Video(frames, fps=10))
            logger.dump(step)
            if step == DUMPS // 2:
                (here / "half").touch()
                while pause and not (root / "server-stopped").exists():
                    time.sleep(0.01)
            time.sleep(pace)


children = {}
for number in range(JOBS):
    (root / f"job{number}").mkdir()
    pid = os.fork()
    if pid == 0:
        log = os.open(root / f"job{number}" / "output.log", os.O_WRONLY | os.O_CREAT)
        os.dup2(log, 1)
        os.dup2(log, 2)
        code = 0
        try:
            job(number)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    children[pid] = number
assert sys.stdin.readline().strip() == "go"
os.write(go_write, b"g" * JOBS)
failed = []
for _ in range(JOBS):
    pid, status = os.wait()
    if os.waitstatus_to_exitcode(status) != 0:
        failed.append(children[pid])
sys.exit(f"jobs {failed} failed" if failed else 0)
"""


def job_env(job: int, run_dir: Path) -> dict[str, str]:
    dropped = ("TRACKLOG_", "MLFLOW_", "SLURM_", "RANK", "LOCAL_RANK", "WORLD_SIZE")
    env = {name: value for name, value in os.environ.items() if not name.startswith(dropped)}
    env.update(SLURM_ARRAY_TASK_ID=str(job), TRACKLOG_RUN_DIR=str(run_dir), WANDB_SILENT="true")
    return env


@dataclass
class Sweep:
    experiment: str
    group: str
    root: Path
    launcher: subprocess.Popen[bytes]

    def dirs(self) -> list[Path]:
        return [self.root / f"job{job}" for job in range(JOBS)]

    def wait_for(self, marker: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not all((folder / marker).exists() for folder in self.dirs()):
            if self.launcher.poll() is not None:
                raise AssertionError(f"the sweep ended before {marker!r}:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"not every job reached {marker!r} within {timeout} s:\n{self.logs()}"
                )
            time.sleep(0.05)

    def log(self, job: int) -> str:
        path = self.dirs()[job] / "output.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        launcher = (self.root / "launcher.log").read_text(errors="replace")
        return launcher + "".join(f"--- job {job}:\n{self.log(job)}" for job in range(JOBS))

    def finish(self, timeout: float) -> None:
        try:
            code = self.launcher.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.launcher.pid, signal.SIGKILL)
            raise
        assert code == 0, self.logs()


def start_sweep(
    launched: list[Sweep], root: Path, url: str, *, pace: float, pause: bool = False
) -> Sweep:
    """``JOBS`` processes, one settings file; each told its job number as SLURM would."""
    experiment, group = f"scale-{uuid.uuid4().hex[:8]}", f"sweep-{uuid.uuid4().hex[:6]}"
    settings = {
        "group": group,
        "outputs": [
            {
                "type": "mlflow",
                "tracking_uri": url,
                "experiment": experiment,
                "request_retries": 0,  # a server that is down is seen at once
                "request_timeout": 10,
            }
        ],
        "delivery": {"retry_initial": 0.1, "retry_max": 1.0, "close_timeout": 120},
    }
    settings_file = root / "sweep.yaml"
    settings_file.write_text(yaml.safe_dump(settings))
    constants = f"JOBS, DUMPS, KEYS, VIDEO_STEP = {JOBS}, {DUMPS}, {KEYS}, {VIDEO_STEP}\n"
    constants += f"FRAMES, HEIGHT, WIDTH = {FRAMES}, {HEIGHT}, {WIDTH}\n"
    script = root / "sweep.py"
    script.write_text(constants + textwrap.dedent(SWEEP_SCRIPT))
    env = job_env(0, root)
    for name in ("SLURM_ARRAY_TASK_ID", "TRACKLOG_RUN_DIR"):
        del env[name]  # each job sets its own
    with open(root / "launcher.log", "wb") as output:
        launcher = subprocess.Popen(
            [sys.executable, str(script), settings_file, str(pace), root, str(pause and "pause")],
            cwd=root,
            stdin=subprocess.PIPE,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # a timeout kills the launcher and its jobs
        )
    sweep = Sweep(experiment, group, root, launcher)
    launched.append(sweep)
    sweep.wait_for("ready", timeout=120)
    assert launcher.stdin is not None
    launcher.stdin.write(b"go\n")
    launcher.stdin.close()
    return sweep


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((point.step, point.value) for point in client.get_metric_history(run_id, key))


def check_sweep(client: MlflowClient, sweep: Sweep, downloads: Path) -> None:
    """Every run, point, param and video of the sweep is on the server, exactly once."""
    experiment = client.get_experiment_by_name(sweep.experiment)
    assert experiment is not None
    runs: list[Run] = client.search_runs([experiment.experiment_id], max_results=1000)
    assert len(runs) == JOBS, sorted(run.info.run_name for run in runs)  # none duplicated
    by_job = {int(run.data.tags["tracklog.job"]): run for run in runs}
    assert sorted(by_job) == list(range(JOBS))
    for job, run in by_job.items():
        assert run.info.status == "FINISHED", (job, run.info.status)
        assert run.info.run_name == f"{sweep.group}-{job}"
        assert run.data.tags["tracklog.group"] == sweep.group
        assert "tracklog.rank" not in run.data.tags
        assert run.data.params == {"lr": str(0.001 * (job + 1)), "job": str(job)}
        logged = {key for key in run.data.metrics if not key.startswith("system/")}
        assert logged == {f"train/m{key:02d}" for key in range(KEYS)}  # and system samples

    def points(item: tuple[int, int]) -> tuple[int, int, list[tuple[int, float]]]:
        job, key = item
        return job, key, history(client, by_job[job].info.run_id, f"train/m{key:02d}")

    with ThreadPoolExecutor(8) as pool:
        fetched = list(pool.map(points, [(j, k) for j in range(JOBS) for k in range(KEYS)]))
    for job, key, got in fetched:
        expected = [(step, value(job, key, step)) for step in range(DUMPS)]
        assert got == expected, (job, key, len(got))  # every point, once, exact
    for job, run in by_job.items():
        listed = [item.path for item in client.list_artifacts(run.info.run_id, "videos/eval/video")]
        assert listed == [f"videos/eval/video/step_{VIDEO_STEP}.mp4"], (job, listed)
        local = client.download_artifacts(run.info.run_id, listed[0], str(downloads / str(job)))
        frames, rate = decode_mp4(Path(local))
        assert len(frames) == FRAMES
        assert rate == 10
        assert frames[0].shape == (HEIGHT, WIDTH, 3)
        assert np.abs(frames[0].astype(int) - 16 * job).max() <= 3  # H.264 is lossy


def spooled(sweep: Sweep) -> int:
    """How many jobs reported the outage: rows waiting in the queue, then the server back."""
    return sum(
        "the rows wait in the queue" in sweep.log(job) and "reachable again" in sweep.log(job)
        for job in range(JOBS)
    )


@pytest.fixture
def launched() -> Iterator[list[Sweep]]:
    """Sweeps a test started; any still running at its end (it failed) are killed."""
    sweeps: list[Sweep] = []
    yield sweeps
    for sweep in sweeps:
        if sweep.launcher.poll() is None:
            os.killpg(sweep.launcher.pid, signal.SIGKILL)
            sweep.launcher.wait()


def test_eight_jobs_at_once_land_in_one_experiment(
    stack: Stack, launched: list[Sweep], tmp_path: Path
) -> None:
    sweep = start_sweep(launched, tmp_path, stack.mlflow.url, pace=0.0)
    sweep.finish(timeout=180)
    check_sweep(stack.client, sweep, tmp_path / "downloads")


def test_eight_jobs_survive_a_server_restart(
    stack: Stack, launched: list[Sweep], tmp_path: Path
) -> None:
    """The server stops half-way through the dumps and comes back on the same database."""
    sweep = start_sweep(launched, tmp_path, stack.mlflow.url, pace=0.01, pause=True)
    sweep.wait_for("half", timeout=120)
    stack.mlflow.stop()
    (tmp_path / "server-stopped").touch()  # the jobs dump their second half now
    time.sleep(1.0)
    stack.mlflow.start()
    sweep.finish(timeout=180)  # close() waited for the server: no job gave up
    check_sweep(stack.client, sweep, tmp_path / "downloads")
    assert spooled(sweep) == JOBS  # every job saw the outage and spooled through it


# A Hydra app: a real multirun sweep (Hydra's basic launcher runs the jobs one after
# the other in this process), logging through settings that name only the group.
HYDRA_APP = """
import sys
import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
import tracklog

URL, EXPERIMENT = sys.argv.pop(1), sys.argv.pop(1)


@hydra.main(version_base=None, config_path=None, config_name=None)
def main(config: DictConfig) -> None:
    settings = {
        "run_dir": HydraConfig.get().runtime.output_dir,  # each job's own directory
        "group": "hydra-sweep",
        "outputs": [{"type": "mlflow", "tracking_uri": URL, "experiment": EXPERIMENT}],
    }
    with tracklog.build_logger(settings) as logger:
        logger.record("lr", float(config.lr))
        logger.dump(0)


main()
"""


def test_hydra_multirun_jobs_are_numbered(stack: Stack, tmp_path: Path) -> None:
    experiment = f"hydra-{uuid.uuid4().hex[:8]}"
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent(HYDRA_APP))
    command = [sys.executable, str(app), stack.mlflow.url, experiment, "--multirun"]
    command += ["+lr=0.1,0.2,0.3", f"hydra.sweep.dir={tmp_path / 'multirun'}"]
    env = job_env(41, tmp_path)  # a SLURM array task too: Hydra's job number wins
    del env["TRACKLOG_RUN_DIR"]
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    assert done.returncode == 0, done.stderr
    found = stack.client.get_experiment_by_name(experiment)
    assert found is not None
    runs = stack.client.search_runs([found.experiment_id])
    got = {
        (
            run.info.run_name,
            run.data.tags["tracklog.job"],
            run.data.tags["tracklog.overrides"],
            run.data.metrics["lr"],
        )
        for run in runs
    }
    assert got == {
        ("hydra-sweep-0", "0", "+lr=0.1", 0.1),
        ("hydra-sweep-1", "1", "+lr=0.2", 0.2),
        ("hydra-sweep-2", "2", "+lr=0.3", 0.3),
    }
    assert json.loads(runs[0].data.tags["tracklog.settings"])["group"] == "hydra-sweep"
