"""Background delivery under faults: a killed or hung server, SIGTERM, SIGKILL, full disks.

The backends are real: this module's own ``mlflow server`` (SIGKILLed and started again
on the same port and store, or stopped with SIGSTOP), JSONL files, ``/dev/full``, and
``python -m tracklog replay`` in a fresh process. A fake stands in only for a fault
nothing real produces on demand (a full disk under the spool, see
``tests.test_spool.FullDisk``), or as a deliberately flaky custom output. What arrived is
always read back with the backend's own reader: ``MlflowClient`` and ``read_jsonl``.

Scenarios that cost a server start (7-10 s) or a subprocess (3-5 s, mostly importing
MLflow) run once in a module fixture; several tests then check what they left behind.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow import MlflowClient
from mlflow.entities import Run

import tracklog
import tracklog._delivery
from tests.samples import random_pixels
from tests.servers import MlflowServer
from tests.test_spool import FullDisk
from tracklog import cli
from tracklog._spool import owed
from tracklog.readers import read_jsonl
from tracklog.values import Text

# Fast retries: a test waits for the backend, never for the backoff.
FAST: dict[str, object] = {"retry_initial": 0.05, "retry_max": 0.3}


# Helpers -----------------------------------------------------------------------------


def new_experiment() -> str:
    return f"delivery-{uuid.uuid4().hex[:12]}"


def mlflow_output(uri: str, experiment: str, **options: object) -> dict[str, object]:
    """An MLflow output that fails fast when the server is away (no MLflow retries)."""
    return {
        "type": "mlflow",
        "tracking_uri": uri,
        "experiment": experiment,
        "artifact_upload_interval": 0,
        "request_retries": 0,
        "request_timeout": 1,
        **options,
    }


def only_run(client: MlflowClient, experiment: str) -> Run:
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"experiment {experiment} was never created"
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1, [run.info.run_id for run in runs]  # never a second run
    return runs[0]


def points(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    """Every stored point of ``key`` as (step, value), by step; duplicates stay."""
    history = client.get_metric_history(run_id, key)
    return sorted((point.step, point.value) for point in history)


def artifact_files(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    files: list[str] = []
    for entry in client.list_artifacts(run_id, path):
        files += artifact_files(client, run_id, entry.path) if entry.is_dir else [entry.path]
    return sorted(files)


def download_text(client: MlflowClient, run_id: str, path: str, into: Path) -> str:
    destination = into / f"download-{uuid.uuid4().hex}"
    destination.mkdir(parents=True)
    return Path(client.download_artifacts(run_id, path, str(destination))).read_text("utf-8")


def jsonl_steps(path: Path) -> list[int]:
    return [row.step for row in read_jsonl(path)]


def messages(records: list[logging.LogRecord], level: int = logging.ERROR) -> list[str]:
    return [r.getMessage() for r in records if r.name == "tracklog" and r.levelno >= level]


class Records(logging.Handler):
    """Keeps what the ``tracklog`` logger reports (for module fixtures: no caplog there)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def tracklog_records() -> Iterator[Records]:
    handler = Records()
    logger = logging.getLogger("tracklog")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture(autouse=True)
def _mlflow_request_settings_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    # The MLflow output sets these for the whole process; put them back after each test.
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)


def child_env() -> dict[str, str]:
    """The environment of a training or replay subprocess: no settings leak into it."""
    dropped = ("TRACKLOG_", "MLFLOW_HTTP_REQUEST_", "MLFLOW_TRACKING_", "WANDB_SERVICE")
    env = {name: value for name, value in os.environ.items() if not name.startswith(dropped)}
    env["WANDB_SILENT"] = "true"
    return env


class Child:
    """A subprocess whose output is read on threads, so every wait can time out."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
            env=child_env(),
        )
        self.stdout_lines: list[str] = []
        self._stderr: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        assert self.process.stdout is not None
        assert self.process.stderr is not None
        self._readers = [
            threading.Thread(target=self._read_stdout, args=(self.process.stdout,), daemon=True),
            threading.Thread(target=self._read_stderr, args=(self.process.stderr,), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @classmethod
    def script(cls, source: str, path: Path, *args: object) -> Child:
        path.write_text(textwrap.dedent(source), encoding="utf-8")
        return cls([sys.executable, str(path), *map(str, args)], cwd=path.parent)

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def _read_stdout(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _read_stderr(self, stream: IO[str]) -> None:
        for line in stream:
            self._stderr.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def wait_for_line(self, prefix: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.kill()
                raise AssertionError(
                    f"no line starting {prefix!r}; stdout {self.stdout_lines}, stderr:\n"
                    + self.stderr
                )
            self.stdout_lines.append(line)
            if line.startswith(prefix):
                return line

    def finish(self, timeout: float = 90.0) -> int:
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        for reader in self._readers:
            reader.join(10)
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        while (line := self._lines.get_nowait() if not self._lines.empty() else None) is not None:
            self.stdout_lines.append(line)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def replay_in_process(spool: Path) -> tuple[int, str, str]:
    """``tracklog replay SPOOL`` through its entry point here: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(["replay", str(spool), "--timeout", "30"])
    return status, out.getvalue(), err.getvalue()


# One server for this module, killed and restarted by the outage scenario --------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real ``mlflow server`` this module may kill, restart and stop (SIGSTOP)."""
    started = MlflowServer(tmp_path_factory.mktemp("server"))
    started.start()
    yield started
    started.stop(signal.SIGKILL)  # its store is not read again: no graceful shutdown


@contextlib.contextmanager
def hung(server: MlflowServer) -> Iterator[None]:
    """The server stops answering (SIGSTOP): connections open, requests time out."""
    assert server.process is not None
    os.killpg(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(server.process.pid, signal.SIGCONT)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting until {what}")
        time.sleep(0.02)


# The training script of the replay scenario: MLflow is down from the start, so every
# row is spooled; it prints once it has dumped them, then dies (SIGKILL by the test) or
# closes with a short close_timeout.
DOWN_SCRIPT = """
import logging, sys, threading, time
import tracklog

run_dir, uri, experiment, ending, count = sys.argv[1:6]
logging.basicConfig(format="%(message)s")  # tracklog's reports on stderr
logging.getLogger().handlers[0].setLevel(logging.WARNING)
spilling = threading.Event()


class Watch(logging.Handler):
    def emit(self, record):
        if "spilling to" in record.getMessage():  # the channel now writes to its spool
            spilling.set()


logging.getLogger("tracklog").addHandler(Watch())
logging.getLogger("tracklog").setLevel(logging.DEBUG)
import tracklog.outputs.mlflow, mlflow  # imported while the test still sets up
assert sys.stdin.readline().strip() == "go"
logger = tracklog.build_logger({
    "run_dir": run_dir,
    "outputs": [
        {"type": "jsonl"},
        {"type": "mlflow", "tracking_uri": uri, "experiment": experiment,
         "request_retries": 0, "request_timeout": 1, "artifact_upload_interval": 0},
    ],
    "delivery": {"retry_initial": 0.05, "retry_max": 0.2, "close_timeout": 1},
})
logger.info("training starts")
for step in range(int(count)):
    logger.record("loss", step / 4)
    logger.record("note", f"note {step}")
    logger.dump(step)
    if step == 0 and not spilling.wait(60):
        sys.exit("the channel never began to spill")
print("dumped", count, flush=True)
if ending == "died":
    time.sleep(600)  # SIGKILLed by the test
logger.close()
print("closed", flush=True)
"""
DOWN_ROWS = 30


@dataclass
class Replayed:
    """One training process of the replay scenario and the replays of its spool."""

    ending: str  # "died" (SIGKILL) or "closed" (close_timeout ran out)
    experiment: str
    run_dir: Path
    training_code: int
    training_stderr: str
    header: dict[str, Any]
    busy: tuple[int, str, str] | None  # a replay tried while the process lived
    replay_code: int
    replay_stdout: str
    replay_stderr: str
    after_first_replay: list[tuple[int, float]]
    second: tuple[int, str, str]

    @property
    def spool(self) -> Path:
        return self.run_dir / "spool" / "1-mlflow"  # outputs: [jsonl, mlflow]


@dataclass
class Outage:
    """What the killed-server scenario left behind."""

    client: MlflowClient
    run_id: str
    steps: list[int]
    hist_steps: list[int]
    image_steps: list[int]
    run_dir: Path
    downloads: Path
    records: list[logging.LogRecord]
    replayed: dict[str, Replayed]


def _loss(step: int) -> float:
    return step * 0.25


def _start_down_processes(root: Path, url: str) -> dict[str, Child]:
    """Item 4: two training processes that log to ``url`` once told to go."""
    return {
        ending: Child.script(
            DOWN_SCRIPT,
            root / f"train_{ending}.py",
            root / ending,
            url,
            new_experiment(),
            ending,
            DOWN_ROWS,
        )
        for ending in ("died", "closed")
    }


def _run_down_processes(root: Path, children: dict[str, Child]) -> dict[str, Replayed]:
    """Item 4, first half: the two training processes run while the server is down."""
    for child in children.values():
        child.send("go")
    busy: tuple[int, str, str] | None = None
    for ending, child in children.items():
        child.wait_for_line("dumped")
        if ending == "died":
            busy = replay_in_process(root / ending / "spool" / "1-mlflow")  # it still lives
            child.process.send_signal(signal.SIGKILL)
    results: dict[str, Replayed] = {}
    for ending, child in children.items():
        code = child.finish()
        args = child.process.args
        assert isinstance(args, list)
        spool = root / ending / "spool" / "1-mlflow"
        header = json.loads((spool / "header.json").read_text("utf-8"))
        results[ending] = Replayed(
            ending=ending,
            experiment=str(args[4]),
            run_dir=root / ending,
            training_code=code,
            training_stderr=child.stderr,
            header=header,
            busy=busy if ending == "died" else None,
            replay_code=-1,
            replay_stdout="",
            replay_stderr="",
            after_first_replay=[],
            second=(-1, "", ""),
        )
    return results


def _start_replays(root: Path, replayed: dict[str, Replayed]) -> dict[str, Child]:
    """Item 4, second half: ``python -m tracklog replay`` in fresh processes."""
    command = [sys.executable, "-m", "tracklog", "replay"]
    return {
        ending: Child([*command, str(item.spool), "--timeout", "60"], cwd=root)
        for ending, item in replayed.items()
    }


def _finish_replays(
    client: MlflowClient, children: dict[str, Child], replayed: dict[str, Replayed]
) -> None:
    """Wait for the replays, note what they delivered, then replay each spool again."""
    for ending, child in children.items():
        item = replayed[ending]
        item.replay_code = child.finish()
        item.replay_stdout = "\n".join(child.stdout_lines)
        item.replay_stderr = child.stderr
        run = only_run(client, item.experiment)
        item.after_first_replay = points(client, run.info.run_id, "loss")
        item.second = replay_in_process(item.spool)


@pytest.fixture(scope="module")
def outage(server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Outage:
    """A run whose server is SIGKILLed mid-run and started again on its port and store.

    Phases: healthy (steps 0-9), server dead (10-29, then two other training processes
    start against the dead server and die or time out: see ``Replayed``), server booting
    (a dump every 100 ms), healthy again (5 more). Every dump has two scalars; every
    fifth a histogram (an .npy artifact), every twentieth an image; params are logged in
    each phase and info() lines before, during and after the outage.
    """
    root = tmp_path_factory.mktemp("outage")
    run_dir = root / "run"
    children = _start_down_processes(root, server.url)  # they import while we set up
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(_running_again, server, children)
        return _outage(server, root, run_dir, children)


def _running_again(server: MlflowServer, children: dict[str, Child]) -> None:
    """Whatever happened, leave the module's server up and no child behind."""
    for child in children.values():
        child.kill()
    if server.process is None:
        server.start()


def _outage(server: MlflowServer, root: Path, run_dir: Path, children: dict[str, Child]) -> Outage:
    experiment = new_experiment()
    steps: list[int] = []
    hist_steps: list[int] = []
    image_steps: list[int] = []
    with pytest.MonkeyPatch.context() as patch, tracklog_records() as seen:
        for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
            patch.delenv(name, raising=False)
        logger = tracklog.build_logger(
            {
                "run_dir": str(run_dir),
                "outputs": [{"type": "jsonl"}, mlflow_output(server.url, experiment)],
                "delivery": {**FAST, "close_timeout": 60},
            }
        )

        def dump(step: int, **extra: tracklog.Recordable) -> None:
            logger.record("loss", _loss(step))
            logger.record("reward", -step)
            if step % 5 == 0:
                logger.record("hist", np.array([step, step + 1.0, step + 2.0]))
                hist_steps.append(step)
            if step % 20 == 0:
                logger.record("frame", tracklog.Image(random_pixels((4, 4, 3), seed=step)))
                image_steps.append(step)
            for key, value in extra.items():
                logger.record(key, value)
            start = time.monotonic()
            logger.dump(step)
            assert time.monotonic() - start < 0.5, "dump() waited for the server"
            steps.append(step)

        logger.info("before the outage")
        dump(0, hparams=tracklog.HParam({"lr": 0.1}))
        for step in range(1, 10):
            dump(step)
        assert logger.flush(30)  # nothing in flight when the server dies

        server.stop(signal.SIGKILL)
        logger.info("during the outage")
        dump(10, hparams=tracklog.HParam({"gamma": 0.9}))
        for step in range(11, 30):
            dump(step)
            time.sleep(0.02)
        replayed = _run_down_processes(root, children)

        failure: list[BaseException] = []

        def restart() -> None:
            try:
                server.start()
            except BaseException as error:  # raised on the test thread below
                failure.append(error)

        starter = threading.Thread(target=restart)
        starter.start()
        step = 30
        while starter.is_alive():  # dumps while the server boots
            dump(step)
            step += 1
            time.sleep(0.1)
        starter.join()
        assert not failure, failure
        replays = _start_replays(root, replayed)  # in fresh processes, meanwhile
        logger.info("after the outage")
        dump(step, hparams=tracklog.HParam({"batch": 64}))
        for last in range(step + 1, step + 5):
            dump(last)
        (output,) = [o for o in logger.output_formats if isinstance(o, tracklog.MLFlowOutputFormat)]
        logger.close()
        records = list(seen.records)
    client = MlflowClient(server.url)
    _finish_replays(client, replays, replayed)
    return Outage(
        client=client,
        run_id=output.run_id,
        steps=steps,
        hist_steps=hist_steps,
        image_steps=image_steps,
        run_dir=run_dir,
        downloads=root / "downloads",
        records=records,
        replayed=replayed,
    )


# 1. A real server SIGKILLed mid-run ------------------------------------------------------


def test_after_a_server_kill_every_point_arrives_exactly_once(outage: Outage) -> None:
    assert len(outage.steps) > 40  # the outage really spanned many dumps
    assert jsonl_steps(outage.run_dir / "progress.jsonl") == outage.steps
    for key, value in (("loss", _loss), ("reward", lambda step: float(-step))):
        stored = points(outage.client, outage.run_id, key)
        assert [step for step, _ in stored] == outage.steps, key  # none missing or twice
        assert [point for _, point in stored] == [value(step) for step in outage.steps], key
    for stat, offset in (("mean", 1.0), ("min", 0.0), ("max", 2.0)):
        stored = points(outage.client, outage.run_id, f"hist/{stat}")
        assert stored == [(step, step + offset) for step in outage.hist_steps], stat


def test_after_a_server_kill_params_of_every_phase_are_logged(outage: Outage) -> None:
    run = outage.client.get_run(outage.run_id)
    assert run.data.params == {"lr": "0.1", "gamma": "0.9", "batch": "64"}


def test_after_a_server_kill_the_run_ends_finished_and_the_outage_is_reported(
    outage: Outage,
) -> None:
    assert outage.client.get_run(outage.run_id).info.status == "FINISHED"
    warnings = messages(outage.records, logging.WARNING)
    assert any("delivery failed" in message for message in warnings), warnings
    assert any("reachable again" in message for message in warnings), warnings
    assert messages(outage.records) == []  # nothing lost, nothing to report as an error
    assert not (outage.run_dir / "spool").exists()  # all delivered: the spool is removed


def test_after_a_server_kill_each_media_file_is_uploaded_once(outage: Outage) -> None:
    # Artifact names are fixed when a row is first converted: a retry overwrites, never
    # adds a "-1" copy.
    expected = [f"histograms/hist/step_{step}.npy" for step in outage.hist_steps]
    assert artifact_files(outage.client, outage.run_id, "histograms") == sorted(expected)
    images_by_step: dict[int, int] = {}
    for path in artifact_files(outage.client, outage.run_id, "images"):
        if path.endswith(".png"):
            step = int(path.split("+step+")[1].split("+")[0])  # MLflow's image file names
            images_by_step[step] = images_by_step.get(step, 0) + 1
    assert images_by_step == dict.fromkeys(outage.image_steps, 1)


# Regression: MLFlowOutputFormat.write_line appends the line to the local train.log before
# _ensure_run()/_upload_text(); when those raise a transient error the worker retries
# the same "line" message and the line is appended again, once per retry.
def test_after_a_server_kill_info_lines_reach_train_log_once(outage: Outage) -> None:
    log = download_text(outage.client, outage.run_id, "train.log", outage.downloads)
    assert log.splitlines() == ["before the outage", "during the outage", "after the outage"]


# 4. A spool replayed by a fresh process ------------------------------------------------


@pytest.mark.parametrize("ending", ["died", "closed"])
def test_replay_delivers_every_spooled_row_exactly_once(outage: Outage, ending: str) -> None:
    item = outage.replayed[ending]
    assert item.replay_code == 0, item.replay_stderr
    # The rows, then "failed" (added for a dead process) and "close". The info() line
    # is not among them: the live process appended it to the spool's staging train.log
    # (that is its delivery while the server is down), and replay uploads that file.
    records = DOWN_ROWS + (2 if ending == "died" else 1)
    assert f"delivered {records} record(s)" in item.replay_stdout
    assert jsonl_steps(item.run_dir / "progress.jsonl") == list(range(DOWN_ROWS))
    run = only_run(outage.client, item.experiment)  # created by the replay, once
    assert run.data.tags["tracklog.run_key"] == item.header["run_key"]
    assert item.header["run_id"] is None  # the server never answered the dead process
    expected = [(step, step / 4) for step in range(DOWN_ROWS)]
    assert points(outage.client, run.info.run_id, "loss") == expected
    assert item.after_first_replay == expected
    notes = download_text(outage.client, run.info.run_id, "text/note.txt", outage.downloads)
    assert [line.split("] ", 1)[1] for line in notes.splitlines()] == [
        f"note {step}" for step in range(DOWN_ROWS)
    ]
    assert not item.spool.exists()


def test_replay_ends_the_run_of_a_dead_process_as_killed(outage: Outage) -> None:
    item = outage.replayed["died"]
    assert item.training_code == -signal.SIGKILL
    assert only_run(outage.client, item.experiment).info.status == "KILLED"


def test_replay_after_a_close_timeout_ends_the_run_finished(outage: Outage) -> None:
    item = outage.replayed["closed"]
    assert item.training_code == 0, item.training_stderr
    # close() said what it kept and how to deliver it.
    assert f"python -m tracklog replay {item.spool}" in item.training_stderr
    assert "close_timeout=1s" in item.training_stderr
    assert only_run(outage.client, item.experiment).info.status == "FINISHED"


def test_replay_refuses_a_spool_its_process_still_owns(outage: Outage) -> None:
    item = outage.replayed["died"]
    assert item.busy is not None
    status, _, stderr = item.busy
    assert status == 1
    assert "is in use by pid" in stderr
    # ...and the refusal took nothing away: the later replay delivered every row.
    assert item.after_first_replay == [(step, step / 4) for step in range(DOWN_ROWS)]


@pytest.mark.parametrize("ending", ["died", "closed"])
def test_a_second_replay_changes_nothing(outage: Outage, ending: str) -> None:
    item = outage.replayed[ending]
    status, stdout, _ = item.second
    assert status == 0
    assert "nothing to replay" in stdout
    run = only_run(outage.client, item.experiment)
    assert points(outage.client, run.info.run_id, "loss") == item.after_first_replay


# Regression: the same write_line retry (see above) appends "training starts" to the staging
# train.log once per failed attempt in the training process, and replay appends it once
# more after adopting that file.
@pytest.mark.parametrize("ending", ["died", "closed"])
def test_replay_uploads_each_info_line_once(outage: Outage, ending: str) -> None:
    item = outage.replayed[ending]
    run = only_run(outage.client, item.experiment)
    log = download_text(outage.client, run.info.run_id, "train.log", outage.downloads)
    assert log == "training starts\n"


# 3. SIGTERM to a training process ------------------------------------------------------

SIGTERM_SCRIPT = """
import sys, time
import tracklog

run_dir, uri, experiment, ending = sys.argv[1:5]
logger = tracklog.build_logger({
    "run_dir": run_dir,
    "outputs": [
        {"type": "jsonl"},
        {"type": "mlflow", "tracking_uri": uri, "experiment": experiment},
    ],
    "delivery": {"close_timeout": 60},
})


def train():
    step = 0
    while True:  # never ends on its own
        logger.record("loss", step / 4)
        logger.record("done", step)
        logger.dump(step)
        print("dumped", step, flush=True)
        step += 1
        time.sleep(0.005)


if ending == "with":
    with logger:
        train()
else:
    train()  # closed by tracklog's exit hook
"""
SIGTERM_AFTER = 15  # dumps


@dataclass
class Terminated:
    code: int
    printed: list[int]
    stderr: str
    run_dir: Path
    experiment: str


@pytest.fixture(scope="module")
def terminated(
    server: MlflowServer, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Terminated]:
    """Two training processes (``with`` block, exit hook) SIGTERMed after some dumps."""
    root = tmp_path_factory.mktemp("sigterm")
    experiments = {ending: new_experiment() for ending in ("with", "atexit")}
    children = {
        ending: Child.script(
            SIGTERM_SCRIPT,
            root / f"train_{ending}.py",
            root / ending,
            server.url,
            experiment,
            ending,
        )
        for ending, experiment in experiments.items()
    }
    try:
        for child in children.values():
            child.wait_for_line(f"dumped {SIGTERM_AFTER - 1}")
        for child in children.values():
            child.process.send_signal(signal.SIGTERM)
        codes = {ending: child.finish() for ending, child in children.items()}
    finally:
        for child in children.values():
            child.kill()  # they never end on their own
    results = {}
    for ending, child in children.items():
        code = codes[ending]
        printed = [int(line.split()[1]) for line in child.stdout_lines if line.startswith("dumped")]
        results[ending] = Terminated(
            code, printed, child.stderr, root / ending, experiments[ending]
        )
    return results


@pytest.mark.parametrize("ending", ["with", "atexit"])
def test_sigterm_flushes_every_dumped_row_and_ends_the_run_killed(
    server: MlflowServer, terminated: dict[str, Terminated], ending: str
) -> None:
    result = terminated[ending]
    assert result.code == 143, result.stderr  # SystemExit(128 + SIGTERM)
    assert "Traceback" not in result.stderr, result.stderr
    steps = jsonl_steps(result.run_dir / "progress.jsonl")
    # Every dump that returned is in the file; the signal may have come during one more.
    assert steps == list(range(len(steps)))
    assert steps[: len(result.printed)] == result.printed
    assert len(steps) >= SIGTERM_AFTER
    client = MlflowClient(server.url)
    run = only_run(client, result.experiment)
    assert points(client, run.info.run_id, "loss") == [(step, step / 4) for step in steps]
    assert points(client, run.info.run_id, "done") == [(step, float(step)) for step in steps]
    assert run.info.status == "KILLED"
    assert not (result.run_dir / "spool").exists()  # all delivered within close_timeout


# 2. A custom format that raises ----------------------------------------------------------


class Broken(tracklog.OutputFormat):
    """A user's format whose backend rejects rows (at ``steps``, or every row).

    ``gate``, if given, holds each write until it is set, so a test knows the worker has
    not reached the row yet.
    """

    name = "broken"

    def __init__(
        self,
        *,
        background: bool,
        steps: set[int] | None = None,
        gate: threading.Event | None = None,
    ) -> None:
        self.background = background
        self._steps = steps
        self._gate = gate

    def write_row(self, row: tracklog.Row) -> None:
        if self._gate is not None:
            assert self._gate.wait(30)
        if self._steps is None or row.step in self._steps:
            raise RuntimeError(f"rejected step {row.step}")


def jsonl_and_mlflow(
    run_dir: Path, server: MlflowServer, experiment: str, **options: object
) -> tracklog.Logger:
    return tracklog.build_logger(
        {
            "run_dir": str(run_dir),
            "outputs": [{"type": "jsonl"}, mlflow_output(server.url, experiment)],
            "delivery": FAST,
            **options,
        }
    )


def assert_both_have(run_dir: Path, server: MlflowServer, experiment: str, count: int) -> None:
    assert jsonl_steps(run_dir / "progress.jsonl") == list(range(count))
    client = MlflowClient(server.url)
    run = only_run(client, experiment)
    assert points(client, run.info.run_id, "loss") == [(s, _loss(s)) for s in range(count)]
    assert run.info.status == "FINISHED"


@pytest.mark.parametrize("background", [False, True], ids=["sync", "background"])
def test_a_raising_custom_format_costs_the_other_outputs_nothing(
    server: MlflowServer, run_dir: Path, caplog: pytest.LogCaptureFixture, background: bool
) -> None:
    experiment = new_experiment()
    logger = jsonl_and_mlflow(run_dir, server, experiment)
    logger.output_formats.insert(1, Broken(background=background))  # between the two
    with caplog.at_level(logging.ERROR, logger="tracklog"):
        for step in range(5):
            logger.record("loss", _loss(step))
            logger.dump(step)
        logger.close()
    assert_both_have(run_dir, server, experiment, 5)
    reports = [r for r in caplog.records if r.name == "tracklog" and r.exc_info]
    assert len(reports) == 1, [r.getMessage() for r in reports]  # once with its traceback...
    assert "Broken(broken) failed" in reports[0].getMessage()
    assert reports[0].exc_info is not None
    _, error, traceback = reports[0].exc_info
    assert isinstance(error, RuntimeError)
    assert str(error) == "rejected step 0"
    assert traceback is not None
    counted = [m for m in messages(caplog.records) if "failed 5 times in all" in m]
    assert counted == ["tracklog output Broken(broken) failed 5 times in all"]  # ...then counted


def test_strict_raises_a_synchronous_failure_at_its_dump(
    server: MlflowServer, run_dir: Path
) -> None:
    experiment = new_experiment()
    logger = jsonl_and_mlflow(run_dir, server, experiment, strict=True)
    logger.output_formats.insert(1, Broken(background=False))
    for step in range(2):
        logger.record("loss", _loss(step))
        with pytest.raises(RuntimeError, match=f"rejected step {step}"):
            logger.dump(step)  # raised after every other output had its turn
    logger.close()
    assert_both_have(run_dir, server, experiment, 2)


@pytest.mark.parametrize("raised_at", ["next dump", "close"])
def test_strict_raises_a_background_failure_on_the_training_thread(
    server: MlflowServer, run_dir: Path, raised_at: str
) -> None:
    experiment = new_experiment()
    logger = jsonl_and_mlflow(run_dir, server, experiment, strict=True)
    gate = threading.Event()
    logger.output_formats.insert(1, Broken(background=True, steps={0}, gate=gate))
    logger.record("loss", _loss(0))
    logger.dump(0)  # only queued for the broken format: nothing to raise yet
    gate.set()
    assert logger.flush(30)
    if raised_at == "next dump":
        logger.record("loss", _loss(1))
        with pytest.raises(RuntimeError, match="rejected step 0"):
            logger.dump(1)
        logger.close()  # step 1 was fine: nothing more to raise
        count = 2
    else:
        with pytest.raises(RuntimeError, match="rejected step 0"):
            logger.close()
        count = 1
    assert_both_have(run_dir, server, experiment, count)


# 5. A file output on a full disk -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["jsonl", "file"])
def test_a_full_disk_under_one_file_output_costs_the_others_nothing(
    server: MlflowServer, run_dir: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    # /dev/full accepts opening and fails every write with ENOSPC: a real full disk.
    experiment = new_experiment()
    logger = tracklog.build_logger(
        {
            "run_dir": str(run_dir),
            "outputs": [
                {"type": kind, "path": "/dev/full"},
                {"type": "jsonl", "path": "kept.jsonl"},
                mlflow_output(server.url, experiment),
            ],
            "delivery": FAST,
        }
    )
    with caplog.at_level(logging.ERROR, logger="tracklog"):
        for step in range(5):
            logger.record("loss", _loss(step))
            logger.dump(step)
            logger.info(f"line {step}")
        logger.close()
    assert jsonl_steps(run_dir / "kept.jsonl") == list(range(5))
    client = MlflowClient(server.url)
    run = only_run(client, experiment)
    assert points(client, run.info.run_id, "loss") == [(s, _loss(s)) for s in range(5)]
    assert run.info.status == "FINISHED"
    reports = [r for r in caplog.records if r.name == "tracklog" and r.exc_info]
    assert len(reports) == 1, [r.getMessage() for r in reports]
    assert reports[0].exc_info is not None
    error = reports[0].exc_info[1]
    assert isinstance(error, OSError)
    assert error.errno == errno.ENOSPC
    name = "JsonlOutputFormat(json)" if kind == "jsonl" else "FixedHumanOutputFormat(log)"
    assert name in reports[0].getMessage()
    assert any(f"{name} failed" in m and "times in all" in m for m in messages(caplog.records))


# 6. The spool's own disk is full -----------------------------------------------------------


# Regression ("write"): with the server back but the disk still full, the worker delivers the
# spooled rows and then Spool.ack() raises ENOSPC (writing acked.tmp); the exception
# escapes Channel._deliver and ends the worker ("the delivery worker stopped"), so no
# later row is delivered. A lost ack is harmless by design (the row is sent again).
@pytest.mark.parametrize(
    "mode",
    [
        "fsync",
        "write",
    ],
)
def test_a_full_disk_under_the_spool_loses_no_row(
    server: MlflowServer,
    run_dir: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
) -> None:
    monkeypatch.setattr(tracklog._delivery, "_SPILL_RETRY", 0.3)  # not 10 s: a fast test
    disk = FullDisk(mode, run_dir / "spool")
    disk.install(monkeypatch)
    experiment = new_experiment()
    logger = jsonl_and_mlflow(run_dir, server, experiment, delivery={**FAST, "close_timeout": 60})
    spool = run_dir / "spool" / "1-mlflow"
    steps: list[int] = []

    def dump(count: int = 1) -> None:
        for _ in range(count):
            step = len(steps)
            logger.record("loss", _loss(step))
            start = time.monotonic()
            logger.dump(step)  # never raises, never waits
            assert time.monotonic() - start < 0.5, "dump() waited"
            steps.append(step)
            time.sleep(0.04)

    with caplog.at_level(logging.DEBUG, logger="tracklog"):
        dump()
        assert logger.flush(30)
        with hung(server):
            while owed(spool) < 3:  # unreachable: rows go to the spool
                dump()
                assert len(steps) < 200, "the rows never reached the spool"
            disk.full = True  # now the spool cannot be written either
            dump(12)  # longer than _SPILL_RETRY: the spool is tried again
            errors = messages(caplog.records)
            assert any("cannot write the spool" in m and str(spool) in m for m in errors), errors
        dump(5)  # the server is back
        time.sleep(0.5)
        disk.full = False
        dump(5)
        logger.close()

    assert jsonl_steps(run_dir / "progress.jsonl") == steps
    client = MlflowClient(server.url)
    run = only_run(client, experiment)
    assert points(client, run.info.run_id, "loss") == [(s, _loss(s)) for s in steps]
    assert run.info.status == "FINISHED"
    assert not any("worker stopped" in m for m in messages(caplog.records))


# 7. The channel: order, batching, spilling -------------------------------------------------


class Busy(Exception):
    """The custom backend's "try again later"."""


class FlakyJsonl(tracklog.OutputFormat):
    """A custom background format whose backend (a JSONL file) refuses its first calls.

    ``info()`` lines are written as rows with step -1 and the key ``line``, so the file
    shows rows and lines in the order they arrived. ``gate``, if given, holds every call
    until it is set (a stuck backend); while ``down`` is set, every call fails.
    """

    name = "flaky"
    background = True

    def __init__(
        self,
        path: Path,
        *,
        failures: int = 0,
        gate: threading.Event | None = None,
        down: threading.Event | None = None,
    ) -> None:
        self._jsonl = tracklog.JsonlOutputFormat(path)
        self._failures = failures
        self._gate = gate
        self._down = down
        self._lines = 0
        #: Set once the worker is inside a call (holding what it took from the queue).
        self.entered = threading.Event()

    def _attempt(self) -> None:
        self.entered.set()
        if self._gate is not None:
            assert self._gate.wait(30)
        if self._failures > 0:
            self._failures -= 1
            raise Busy("backend busy")
        if self._down is not None and self._down.is_set():
            raise Busy("backend down")

    def is_transient(self, error: Exception) -> bool:
        return isinstance(error, Busy)

    def spool_header(self) -> dict[str, Any] | None:
        return {"output": "flaky"}  # gives it a spool

    def write_row(self, row: tracklog.Row) -> None:
        self._attempt()
        self._jsonl.write_row(row)

    def write_line(self, line: str) -> None:
        self._attempt()
        self._lines += 1
        values = {"line": Text(line)}
        self._jsonl.write_row(tracklog.Row(step=-1, timestamp=0.0, seq=-self._lines, values=values))

    def close(self) -> None:
        self._jsonl.close()


class FlakyBatchJsonl(FlakyJsonl):
    """The same, taking consecutive rows in one call (all or nothing), as MLflow does."""

    def write_rows(self, rows: list[tracklog.Row]) -> None:
        self._attempt()
        for row in rows:
            self._jsonl.write_row(row)


def flaky_logger(run_dir: Path, **delivery: object) -> tracklog.Logger:
    return tracklog.build_logger(
        {
            "run_dir": str(run_dir),
            "outputs": [],
            "delivery": {"retry_initial": 0.001, "retry_max": 0.01, **delivery},
        }
    )


BIG = 20_000  # float64s: 160 kB, beyond the smallest queue_bytes (64 kB)

Event = tuple[str, str]  # ("row", "") / ("big", "") / ("line", text)
EVENTS: st.SearchStrategy[Event] = st.one_of(
    st.tuples(st.just("row"), st.just("")),
    st.tuples(st.just("big"), st.just("")),
    st.tuples(st.just("line"), st.text("ab \n", max_size=4)),
)


def play(logger: tracklog.Logger, events: list[Event], start: int = 0) -> list[tuple[str, object]]:
    """Dump and log ``events`` (steps from ``start``); what the backend should then hold."""
    expected: list[tuple[str, object]] = []
    for index, (kind, text) in enumerate(events, start):
        if kind == "line":
            logger.info(text)
            expected.append(("line", text))
            continue
        logger.record("x", index * 1.5)
        if kind == "big":
            logger.record("big", np.full(BIG, float(index)))
        logger.dump(index)
        expected.append((kind, index))
    return expected


def arrived(path: Path) -> list[tuple[str, object]]:
    """What the flaky backend holds, read back with read_jsonl; big rows checked."""
    result: list[tuple[str, object]] = []
    for row in read_jsonl(path):
        if row.step == -1:
            result.append(("line", row.values["line"]))
            continue
        assert row.values["x"] == row.step * 1.5
        big = row.values.get("big")
        if big is not None:
            assert isinstance(big, str)
            values = np.load(path.parent / big)
            assert values.shape == (BIG,)
            assert bool(np.all(values == row.step))
        result.append(("big" if big is not None else "row", row.step))
    return result


@settings(max_examples=15, deadline=None)
@given(
    events=st.lists(EVENTS, min_size=1, max_size=10),
    failures=st.integers(0, 4),
    batch=st.booleans(),
)
def test_rows_and_lines_arrive_in_order_exactly_once(
    tmp_path_factory: pytest.TempPathFactory,
    events: list[Event],
    failures: int,
    batch: bool,
) -> None:
    run_dir = tmp_path_factory.mktemp("flaky")
    with tracklog_records() as seen:
        logger = flaky_logger(run_dir, queue_bytes=65536)
        kind = FlakyBatchJsonl if batch else FlakyJsonl
        logger.output_formats.append(kind(run_dir / "flaky.jsonl", failures=failures))
        expected = play(logger, events)
        logger.close()
    assert arrived(run_dir / "flaky.jsonl") == expected
    assert messages(seen.records) == []
    assert not (run_dir / "spool").exists()  # everything delivered: the spool is gone


def test_large_rows_wait_in_the_spool_while_the_backend_is_stuck(run_dir: Path) -> None:
    gate = threading.Event()
    logger = flaky_logger(run_dir, queue_bytes=65536)
    logger.output_formats.append(FlakyBatchJsonl(run_dir / "flaky.jsonl", gate=gate))
    events: list[Event] = [("big", "")] * 8
    expected = play(logger, events)
    spool = run_dir / "spool" / "0-flaky"
    assert owed(spool) == 8  # on disk, not in memory: the queue holds at most 64 kB
    assert not logger.flush(0.2)  # and not delivered yet
    gate.set()
    assert logger.flush(30)
    logger.close()
    assert arrived(run_dir / "flaky.jsonl") == expected
    assert not spool.exists()


# Regression: rows the channel kept in memory while the spool could not be written are spilled
# again once it can; the failed attempts left uncounted frames in the records log (see
# tests/test_spool.py::test_a_failed_append_leaves_nothing_behind), so the worker reads
# those copies instead of the last rows, and reset() then discards the last rows unread.
# The "close" message spilled after them is lost the same way, so close() times out
# (the run would never end) and reports "there is no spool: 0 message(s) are lost".
def test_rows_kept_in_memory_during_a_full_disk_arrive_once_it_has_room(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tracklog._delivery, "_SPILL_RETRY", 0.05)
    disk = FullDisk("write", run_dir / "spool")
    disk.install(monkeypatch)
    down = threading.Event()
    down.set()
    logger = flaky_logger(run_dir, close_timeout=2)
    logger.output_formats.append(FlakyJsonl(run_dir / "flaky.jsonl", down=down))
    spool = run_dir / "spool" / "0-flaky"
    expected: list[tuple[str, object]] = []

    def dump(count: int) -> None:
        for _ in range(count):
            expected.extend(play(logger, [("row", "")], start=len(expected)))
            time.sleep(0.02)

    while owed(spool) < 3:  # the backend is down: rows go to the spool
        dump(1)
        assert len(expected) < 200, "the rows never reached the spool"
    disk.full = True  # then the disk fills up: rows stay in memory
    dump(6)
    disk.full = False  # the disk has room again, the backend is still down
    dump(6)
    down.clear()
    logger.close()
    assert arrived(run_dir / "flaky.jsonl") == expected


# Regression: when a delivery taken from memory fails, Channel._deliver spills only the messages
# in flight (_spill(messages[delivered:], front=True)); rows already waiting in the
# memory queue stay in memory until the next put() moves them. If no dump follows (a
# pause in training, the end of a job), they are not durable although the channel
# reports that it is spooling, and a SIGKILL loses them.
def test_rows_queued_in_memory_move_to_the_spool_when_delivery_fails(run_dir: Path) -> None:
    gate, down = threading.Event(), threading.Event()
    down.set()
    logger = flaky_logger(run_dir)
    flaky = FlakyJsonl(run_dir / "flaky.jsonl", gate=gate, down=down)
    logger.output_formats.append(flaky)
    spool = run_dir / "spool" / "0-flaky"
    play(logger, [("row", "")])
    assert flaky.entered.wait(10)  # row 0 is in flight, held by the gate
    play(logger, [("row", "")] * 2, start=1)  # rows 1 and 2 wait in memory
    gate.set()  # row 0 fails: the backend is down
    wait_until(lambda: owed(spool) > 0, 10, "the channel spills")
    time.sleep(0.2)
    durable = owed(spool)
    down.clear()
    logger.close()
    assert durable == 3  # every row dumped before the outage was noticed is on disk


# Regression (same cause): close() while the backend is down spills the "close" message into the
# spool, ahead of the rows still waiting in memory. When the backend answers within
# close_timeout the worker delivers the spooled rows, then close, and stops: the rows in
# memory are dropped without any error, and the spool is removed as if all was delivered.
def test_rows_waiting_in_memory_at_close_still_arrive(run_dir: Path) -> None:
    gate, down = threading.Event(), threading.Event()
    down.set()
    logger = flaky_logger(run_dir, close_timeout=30)
    flaky = FlakyJsonl(run_dir / "flaky.jsonl", gate=gate, down=down)
    logger.output_formats.append(flaky)
    spool = run_dir / "spool" / "0-flaky"
    with tracklog_records() as seen:
        expected = play(logger, [("row", "")])
        assert flaky.entered.wait(10)  # row 0 is in flight
        expected += play(logger, [("row", "")] * 2, start=1)  # rows 1 and 2 in memory
        gate.set()
        wait_until(lambda: owed(spool) > 0, 10, "the channel spills")
        threading.Timer(0.5, down.clear).start()  # the backend answers during close()
        logger.close()
    assert arrived(run_dir / "flaky.jsonl") == expected
    assert messages(seen.records) == []


def test_a_video_is_encoded_once_for_every_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The media thread (JSONL), the MLflow worker and the W&B worker receive the same
    # Video: the first to ask encodes it, the others wait for those bytes.
    from mlflow import artifacts

    from tracklog import _encode
    from tracklog.readers import read_wandb_offline

    calls: list[int] = []
    encode = _encode._encode_mp4

    def counted(video: tracklog.Video) -> bytes:
        calls.append(threading.get_ident())
        time.sleep(0.2)  # long enough for the other threads to ask meanwhile
        return encode(video)

    monkeypatch.setattr(_encode, "_encode_mp4", counted)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = {
        "run_dir": str(tmp_path / "run"),
        "outputs": [
            {"type": "jsonl"},
            {"type": "mlflow", "tracking_uri": uri, "experiment": "once"},
            {"type": "wandb", "project": "once", "mode": "offline"},
        ],
    }
    frames = random_pixels((8, 3, 16, 16))
    with tracklog.build_logger(settings) as logger:
        logger.record("eval/video", tracklog.Video(frames, fps=10))
        logger.dump(step=3)
        run_id = next(
            o.run_id for o in logger.output_formats if isinstance(o, tracklog.MLFlowOutputFormat)
        )
    assert len(calls) == 1
    jsonl_file = (
        tmp_path
        / "run"
        / str(read_jsonl(tmp_path / "run" / "progress.jsonl")[0].values["eval/video"])
    )
    downloaded = artifacts.download_artifacts(
        run_id=run_id, artifact_path="videos/eval/video/step_3.mp4", tracking_uri=uri
    )
    wandb_run = read_wandb_offline(tmp_path / "run")
    wandb_file = wandb_run.media_path(wandb_run.rows[0].values["eval/video"])
    assert jsonl_file.read_bytes() == Path(downloaded).read_bytes() == wandb_file.read_bytes()


@pytest.mark.parametrize(
    ("setting", "during"),
    [({}, 0.001), ({"switch_interval": 0.002}, 0.002), ({"switch_interval": None}, 0.005)],
)
def test_the_gil_switch_interval_is_lowered_while_workers_run(
    tmp_path: Path, setting: dict[str, object], during: float
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    try:
        logger = tracklog.build_logger(
            {
                "run_dir": str(tmp_path / "run"),
                "outputs": [{"type": "mlflow", "tracking_uri": uri}],
                "delivery": setting,
            }
        )
        logger.record("a", 1.0)
        logger.dump(0)
        assert sys.getswitchinterval() == pytest.approx(during)
        logger.close()
        assert sys.getswitchinterval() == pytest.approx(0.005)
    finally:
        sys.setswitchinterval(before)


def test_a_switch_interval_the_program_sets_meanwhile_is_kept(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.0005)  # already below tracklog's: never raised
        with tracklog.build_logger(
            {"run_dir": str(tmp_path / "a"), "outputs": [{"type": "mlflow", "tracking_uri": uri}]}
        ) as logger:
            logger.record("a", 1.0)
            logger.dump(0)
            assert sys.getswitchinterval() == pytest.approx(0.0005)
        sys.setswitchinterval(0.005)
        with tracklog.build_logger(
            {"run_dir": str(tmp_path / "b"), "outputs": [{"type": "mlflow", "tracking_uri": uri}]}
        ) as logger:
            logger.record("a", 1.0)
            logger.dump(0)
            sys.setswitchinterval(0.003)  # the program's own choice wins at close
        assert sys.getswitchinterval() == pytest.approx(0.003)
    finally:
        sys.setswitchinterval(before)


@pytest.mark.parametrize("linger", [0.0, 9.0])
def test_mlflow_rows_wait_for_the_linger_but_never_for_flush_or_close(
    tmp_path: Path, linger: float
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    logger = tracklog.build_logger(
        {
            "run_dir": str(tmp_path / "run"),
            "outputs": [{"type": "mlflow", "tracking_uri": uri, "experiment": "linger"}],
            "delivery": {"linger": linger},
        }
    )
    for step in range(3):
        logger.record("a", float(step))
        logger.dump(step)
    run_id = next(
        o.run_id for o in logger.output_formats if isinstance(o, tracklog.MLFlowOutputFormat)
    )

    def points() -> int:
        return len(client.get_metric_history(run_id, "a"))

    deadline = time.monotonic() + 5
    while points() < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert points() == (3 if linger == 0 else 0)  # 9 s of linger: nothing sent yet
    start = time.monotonic()
    assert logger.flush(timeout=10)
    assert points() == 3
    logger.record("a", 3.0)
    logger.dump(3)
    logger.close()
    assert time.monotonic() - start < 4  # neither flush() nor close() waited for the linger
    assert [p.value for p in client.get_metric_history(run_id, "a")] == [0.0, 1.0, 2.0, 3.0]
    assert client.get_run(run_id).info.status == "FINISHED"
