"""The delivery process under faults: a killed or hung server, SIGTERM, SIGKILL, bad rows.

The backends are real: this module's own ``mlflow server`` (SIGKILLed and started again
on the same port and store, or stopped with SIGSTOP), JSONL files, ``/dev/full``, and
``python -m tracklog replay`` in fresh processes. A fault proxy (``tests/faultproxy.py``)
stands in only to make the server refuse one particular row, which a real server does
not do on demand. What arrived is always read back with the backend's own reader:
``MlflowClient`` and ``read_jsonl``.

Scenarios that cost a server start (7-10 s) or a subprocess (3-5 s, mostly importing
MLflow) run once in a module fixture; several tests then check what they left behind.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import queue
import shutil
import signal
import sqlite3
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
from mlflow import MlflowClient
from mlflow.entities import Run

import tracklog
import tracklog._queue
import tracklog._service
from tests.crashing import run_script
from tests.faultproxy import FaultProxy
from tests.samples import random_pixels
from tests.servers import MlflowServer
from tracklog import cli
from tracklog._queue import FORMAT, Queue, find_queues
from tracklog.readers import read_jsonl, read_wandb_offline

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


def replay_in_process(spool: Path, timeout: float = 30) -> tuple[int, str, str]:
    """``tracklog replay SPOOL`` through its entry point here: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(["replay", str(spool), "--timeout", str(timeout)])
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


def queue_given_up(run_dir: Path, consumer: str) -> Path:
    """``run_dir``'s queue, once the delivery process gave up on ``consumer`` and let go
    of it (the queue is kept for a replay)."""
    (queue,) = find_queues(run_dir)
    kept, delivering = Queue(queue), tracklog._queue.Lock(queue / "delivery.lock")
    try:
        wait_until(
            lambda: bool(kept.state(consumer).get("gave_up")) and not delivering.held_elsewhere(),
            60,
            f"the delivery process to give up on {consumer}",
        )
    finally:
        kept.close()
    return queue


# The training script of the replay scenario: MLflow is down from the start. It prints
# its delivery process's pid, dumps, then dies (SIGKILL by the test) or closes with a
# one-second close_timeout; its delivery process gives up one second later (deadline)
# and leaves the queue for `tracklog replay`.
DOWN_SCRIPT = """
import sys, time
import tracklog, tracklog._service

run_dir, uri, experiment, ending, count = sys.argv[1:6]
assert sys.stdin.readline().strip() == "go"
logger = tracklog.build_logger({
    "run_dir": run_dir,
    "outputs": [
        {"type": "jsonl"},
        {"type": "mlflow", "tracking_uri": uri, "experiment": experiment,
         "request_retries": 0, "request_timeout": 1, "artifact_upload_interval": 0},
    ],
    "delivery": {"retry_initial": 0.05, "retry_max": 0.2, "close_timeout": 1, "deadline": 1},
})
print("delivery", tracklog._service.service().pid, flush=True)
logger.info("training starts")
for step in range(int(count)):
    logger.record("loss", step / 4)
    logger.record("note", f"note {step}")
    logger.dump(step)
print("dumped", count, flush=True)
if ending == "died":
    time.sleep(600)  # SIGKILLed by the test
logger.close()
print("closed", flush=True)
"""
DOWN_ROWS = 30


def wait_gone(pid: int, timeout: float = 60.0) -> None:
    """Wait until process ``pid`` (not a child of this one) has exited."""
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(pid).wait(timeout)


@dataclass
class Replayed:
    """One training process of the replay scenario and the replays of its queue."""

    ending: str  # "died" (SIGKILL) or "closed" (close_timeout ran out)
    experiment: str
    run_dir: Path
    training_code: int
    training_stderr: str
    header: dict[str, Any]
    published: dict[str, str]  # what its delivery process published before giving up
    busy: tuple[int, str, str] | None  # a replay tried while the process lived
    replays: list[tuple[int, str, str]]  # two replays started at once: (code, out, err)
    after_first_replay: list[tuple[int, float]]
    second: tuple[int, str, str]

    @property
    def queue(self) -> Path:
        return self.run_dir / "spool" / "queue-0"


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
    """Two training processes that log to ``url`` once told to go."""
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
    """The two training processes run while the server is down; their delivery
    processes give up at the deadline and leave their queues behind."""
    for child in children.values():
        child.send("go")
    busy: tuple[int, str, str] | None = None
    delivery: dict[str, int] = {}
    for ending, child in children.items():
        delivery[ending] = int(child.wait_for_line("delivery").split()[1])
        child.wait_for_line("dumped")
        if ending == "died":
            busy = replay_in_process(root / ending / "spool" / "queue-0")  # it still lives
            child.process.send_signal(signal.SIGKILL)
    results: dict[str, Replayed] = {}
    for ending, child in children.items():
        wait_gone(delivery[ending])
        code = child.finish()
        args = child.process.args
        assert isinstance(args, list)
        queue = Queue(root / ending / "spool" / "queue-0")
        try:
            header = queue.header()
            published = queue.state("1-mlflow")
        finally:
            queue.close()
        results[ending] = Replayed(
            ending=ending,
            experiment=str(args[4]),
            run_dir=root / ending,
            training_code=code,
            training_stderr=child.stderr,
            header=header,
            published=published,
            busy=busy if ending == "died" else None,
            replays=[],
            after_first_replay=[],
            second=(-1, "", ""),
        )
    return results


def _start_replays(root: Path, replayed: dict[str, Replayed]) -> dict[str, list[Child]]:
    """``python -m tracklog replay`` in fresh processes, two at once per queue."""
    command = [sys.executable, "-m", "tracklog", "replay"]
    return {
        ending: [Child([*command, str(item.queue), "--timeout", "60"], cwd=root) for _ in range(2)]
        for ending, item in replayed.items()
    }


def _finish_replays(
    client: MlflowClient, children: dict[str, list[Child]], replayed: dict[str, Replayed]
) -> None:
    """Wait for the replays, note what they delivered, then replay each queue again."""
    for ending, pair in children.items():
        item = replayed[ending]
        for child in pair:
            code = child.finish()
            item.replays.append((code, "\n".join(child.stdout_lines), child.stderr))
        run = only_run(client, item.experiment)
        item.after_first_replay = points(client, run.info.run_id, "loss")
        item.second = replay_in_process(item.queue)


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
    with tracklog_records() as seen:
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
        run_id = mlflow_run_id(logger)

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
        logger.close()
        records = list(seen.records)
    client = MlflowClient(server.url)
    _finish_replays(client, replays, replayed)
    return Outage(
        client=client,
        run_id=run_id,
        steps=steps,
        hist_steps=hist_steps,
        image_steps=image_steps,
        run_dir=run_dir,
        downloads=root / "downloads",
        records=records,
        replayed=replayed,
    )


def mlflow_run_id(logger: tracklog.Logger) -> str:
    """The MLflow run id its delivery process published (waits for the run to start)."""
    (output,) = [o for o in logger.output_formats if getattr(o, "name", None) == "mlflow"]
    run_id = getattr(output, "run_id")  # noqa: B009  # a RemoteOutput; KVWriter has none
    assert isinstance(run_id, str)
    return run_id


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
    assert not (outage.run_dir / "spool").exists()  # all delivered: the queue is removed


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


def test_after_a_server_kill_info_lines_reach_train_log_once(outage: Outage) -> None:
    log = download_text(outage.client, outage.run_id, "train.log", outage.downloads)
    assert log.splitlines() == ["before the outage", "during the outage", "after the outage"]


# 2. A queue left behind, replayed by fresh processes ------------------------------------


@pytest.mark.parametrize("ending", ["died", "closed"])
def test_the_delivery_process_gives_up_at_its_deadline_and_says_how_to_replay(
    outage: Outage, ending: str
) -> None:
    item = outage.replayed[ending]
    # The delivery process wrote to the trainer's stderr (its own, inherited).
    assert "could not be delivered in time" in item.training_stderr, item.training_stderr
    assert f"python -m tracklog replay {item.queue}" in item.training_stderr
    assert "run_id" not in item.published  # the server never answered this process
    assert "Traceback" not in item.training_stderr, item.training_stderr


@pytest.mark.parametrize("ending", ["died", "closed"])
def test_replay_delivers_every_queued_row_exactly_once(outage: Outage, ending: str) -> None:
    item = outage.replayed[ending]
    delivered = [out for code, out, _ in item.replays if code == 0 and "record(s)" in out]
    assert len(delivered) == 1, item.replays  # one of the two replays at once did it all
    # The rows. The info() line is not among them: MLflow's output took it while the
    # server was down (into the queue's state folder), and the replay uploads that file.
    # The close message too, when the logger closed.
    records = DOWN_ROWS + (1 if ending == "closed" else 0)
    assert f"delivered {records} record(s)" in delivered[0]
    for code, out, err in item.replays:
        # The other was refused, or found the queue already delivered.
        assert code == 0 or "another process is delivering it" in err, (code, out, err)
    assert jsonl_steps(item.run_dir / "progress.jsonl") == list(range(DOWN_ROWS))
    run = only_run(outage.client, item.experiment)  # created by the replay, once
    assert run.data.tags["tracklog.run_key"] == item.header["identity"]["1-mlflow"]["run_key"]
    expected = [(step, step / 4) for step in range(DOWN_ROWS)]
    assert points(outage.client, run.info.run_id, "loss") == expected
    assert item.after_first_replay == expected
    notes = download_text(outage.client, run.info.run_id, "text/note.txt", outage.downloads)
    assert [line.split("] ", 1)[1] for line in notes.splitlines()] == [
        f"note {step}" for step in range(DOWN_ROWS)
    ]
    assert not item.queue.exists()


def test_a_replay_whose_queue_another_replay_removes_meanwhile_has_nothing_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two replays at once: the first delivers and removes the queue while the second
    checks the trainer's lock. The second's check cannot open the lock then (SQLite
    opens files lazily): that is a delivered queue, not a living trainer. The removal
    is injected at that instant, which real timing hits only by chance."""
    directory = tmp_path / "run" / "spool" / "queue-0"
    queue = Queue.create(directory, {"format": FORMAT, "run_dir": str(tmp_path), "outputs": []})
    trainer = queue.trainer_lock()
    assert trainer.acquire()  # the trainer held it, then died
    trainer.release()
    queue.close()
    connect = tracklog._queue._connect

    def connect_then_lose_the_queue(path: Path, **options: Any) -> sqlite3.Connection:
        connection = connect(path, **options)
        if path.name == "trainer.lock":
            tracklog._queue.remove(directory)  # the other replay, done just now
        return connection

    monkeypatch.setattr(tracklog._queue, "_connect", connect_then_lose_the_queue)
    status, stdout, stderr = replay_in_process(directory)
    assert (status, stderr) == (0, "")
    assert "nothing to replay" in stdout
    assert not directory.parent.exists()


def test_replay_ends_the_run_of_a_dead_process_as_killed(outage: Outage) -> None:
    item = outage.replayed["died"]
    assert item.training_code == -signal.SIGKILL
    assert only_run(outage.client, item.experiment).info.status == "KILLED"


def test_replay_after_a_close_timeout_ends_the_run_finished(outage: Outage) -> None:
    item = outage.replayed["closed"]
    assert item.training_code == 0, item.training_stderr
    # close() said what it left to the delivery process and how to deliver it later.
    assert "not delivered yet" in item.training_stderr
    assert only_run(outage.client, item.experiment).info.status == "FINISHED"


@pytest.mark.parametrize("damage", ["zeroed first page", "symlinked acks"])
def test_a_queue_replay_cannot_read_is_reported_by_name_without_a_traceback(
    run_dir: Path, tmp_path: Path, damage: str
) -> None:
    """A damaged queue.db (its first page zeroed on disk) or an acks.db replaced by a
    symlink: replay says which queue and why and exits 1, without a traceback; the
    queue's files stay as they were."""
    logger = tracklog.build_logger(
        {
            "run_dir": str(run_dir),
            "outputs": [
                {"type": "jsonl"},
                {
                    "type": "mlflow",
                    "tracking_uri": "http://127.0.0.1:9",  # nothing listens on port 9
                    "request_retries": 0,
                    "request_timeout": 1,
                },
            ],
            # close() waits for the give-up, so the queue is not one a replacement of
            # this process's delivery process (another test's) would go on with
            "delivery": {**FAST, "close_timeout": 60, "deadline": 1},
        }
    )
    logger.record("loss", 1.0)
    logger.dump(0)
    logger.close()
    queue = queue_given_up(run_dir, "1-mlflow")
    if damage == "zeroed first page":
        with open(queue / "queue.db", "r+b") as database:
            database.write(bytes(4096))
    else:
        (queue / "acks.db").unlink()
        (queue / "acks.db").symlink_to(tmp_path / "elsewhere.db")
    before = sorted(path.name for path in queue.iterdir())
    status, _, err = replay_in_process(queue, timeout=2)
    assert status == 1
    assert "Traceback" not in err
    assert f"tracklog replay: {queue}: cannot read the queue (" in err, err
    assert sorted(path.name for path in queue.iterdir()) == before


def test_replay_refuses_a_queue_whose_trainer_still_lives(outage: Outage) -> None:
    item = outage.replayed["died"]
    assert item.busy is not None
    status, _, stderr = item.busy
    assert status == 1
    assert "is still running" in stderr
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


def test_replay_of_a_queue_kept_for_one_output_leaves_the_runs_the_others_ended_alone(
    tmp_path: Path, run_dir: Path, mlflow_sqlite_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    """One output's server never answers, so the queue stays after close(); the other
    output had delivered everything and ended its run FINISHED. Replaying the queue
    (twice) must not open that run again, and must not end it KILLED."""
    experiment = new_experiment()
    logger = tracklog.build_logger(
        {
            "run_dir": str(run_dir),
            "outputs": [
                {"type": "mlflow", "tracking_uri": mlflow_sqlite_uri, "experiment": experiment},
                {
                    "type": "mlflow",
                    "tracking_uri": "http://127.0.0.1:9",  # nothing listens on port 9
                    "request_retries": 0,
                    "request_timeout": 1,
                },
            ],
            "delivery": {**FAST, "close_timeout": 3, "deadline": 1},
        }
    )
    for step in range(3):
        logger.record("loss", _loss(step))
        logger.dump(step)
    logger.close()
    client = MlflowClient(mlflow_sqlite_uri)

    def finished() -> bool:  # close() did not wait for it: the run may not exist yet
        found = client.get_experiment_by_name(experiment)
        runs = [] if found is None else client.search_runs([found.experiment_id])
        return [run.info.status for run in runs] == ["FINISHED"]

    wait_until(
        lambda: finished() and bool(find_queues(run_dir)),
        60,
        "the first output's run FINISHED, the queue kept for the second",
    )
    (queue,) = find_queues(run_dir)
    delivering = tracklog._queue.Lock(queue / "delivery.lock")
    wait_until(lambda: not delivering.held_elsewhere(), 60, "the delivery process to give up")
    for _ in range(2):
        status, _, err = replay_in_process(queue, timeout=3)
        assert status != 0, err  # the second output still cannot deliver
        run = only_run(client, experiment)
        assert run.info.status == "FINISHED", err
        assert points(client, run.info.run_id, "loss") == [(s, _loss(s)) for s in range(3)]
    # Each output's state folder replaced with a symlink to a folder of someone else's:
    # replay must neither write there nor empty it.
    for number, state in enumerate(sorted(queue.glob("state-*"))):
        victim = tmp_path / f"victim-{number}"
        (victim / "staging").mkdir(parents=True)
        (victim / "staging" / "precious.txt").write_text("not tracklog's")
        shutil.rmtree(state)
        state.symlink_to(victim)
    with caplog.at_level(logging.ERROR, logger="tracklog"):
        status, _, _ = replay_in_process(queue, timeout=3)
    assert status != 0
    refused = [m for m in messages(caplog.records) if "(a symlink?); refused" in m]
    assert len(refused) == 1, messages(caplog.records)  # output 0 had ended: not started
    for victim in tmp_path.glob("victim-*"):
        assert [path.name for path in victim.rglob("*")] == ["staging", "precious.txt"]
    assert only_run(client, experiment).info.status == "FINISHED"


KILLED_AFTER_THE_CLOSE_IS_ACKED = """
import os, signal, sys
from tracklog import _queue, cli

acknowledge = _queue.Queue.ack


def ack(queue, consumer, seq, **marks):
    acknowledge(queue, consumer, seq, **marks)
    if [message.kind for message in queue.read(seq - 1, 1)] == ["close"]:
        os.kill(os.getpid(), signal.SIGKILL)  # right after the ack's transaction


_queue.Queue.ack = ack
sys.exit(cli.main(["replay", sys.argv[1], "--timeout", "60"]))
"""


def test_a_replay_killed_right_after_it_delivered_the_close_leaves_the_run_finished(
    server: MlflowServer, run_dir: Path
) -> None:
    """A delivery killed just after it acknowledged an output's close (the run ended
    FINISHED) must leave that output marked closed: the next replay must not start it
    again and end its run KILLED. The kill is injected at that point (the only fake)."""
    experiment = new_experiment()
    with hung(server):  # the trainer's delivery process gives up: the queue stays
        logger = tracklog.build_logger(
            {
                "run_dir": str(run_dir),
                "outputs": [mlflow_output(server.url, experiment)],
                "delivery": {**FAST, "close_timeout": 1, "deadline": 1},
            }
        )
        for step in range(3):
            logger.record("loss", _loss(step))
            logger.dump(step)
        logger.close()
        queue = queue_given_up(run_dir, "0-mlflow")
    killed = run_script(KILLED_AFTER_THE_CLOSE_IS_ACKED, queue, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    client = MlflowClient(server.url)
    assert only_run(client, experiment).info.status == "FINISHED"
    status, _, err = replay_in_process(queue)
    assert status == 0, err
    run = only_run(client, experiment)
    assert run.info.status == "FINISHED", err
    assert points(client, run.info.run_id, "loss") == [(s, _loss(s)) for s in range(3)]
    assert not queue.exists()  # delivered: the replay removed it


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
        print(f"dumped {step}", flush=True)  # one write: SIGTERM cannot split it
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


# 4. A custom format that raises ----------------------------------------------------------


class Broken(tracklog.OutputFormat):
    """A user's format whose backend rejects rows (at ``steps``, or every row)."""

    name = "broken"

    def __init__(self, *, steps: set[int] | None = None) -> None:
        self._steps = steps

    def write_row(self, row: tracklog.Row) -> None:
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


def test_a_raising_custom_format_costs_the_other_outputs_nothing(
    server: MlflowServer, run_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    experiment = new_experiment()
    logger = jsonl_and_mlflow(run_dir, server, experiment)
    logger.output_formats.insert(1, Broken())  # between the two
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


def test_strict_raises_a_failure_at_its_dump(server: MlflowServer, run_dir: Path) -> None:
    experiment = new_experiment()
    logger = jsonl_and_mlflow(run_dir, server, experiment, strict=True)
    logger.output_formats.insert(1, Broken())
    for step in range(2):
        logger.record("loss", _loss(step))
        with pytest.raises(RuntimeError, match=f"rejected step {step}"):
            logger.dump(step)  # raised after every other output had its turn
    logger.close()
    assert_both_have(run_dir, server, experiment, 2)


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


# 6. Bad rows: one the server refuses, one that is not a row at all -----------------------


def test_a_row_the_server_refuses_is_skipped_alone_and_named(
    server: MlflowServer, run_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    experiment = new_experiment()
    with FaultProxy(server.url) as proxy:
        # The server refuses any request that carries this key: a batch of rows holding
        # it fails as a whole (HTTP 400: permanent), then only that row fails again.
        proxy.reject(b"refused/by_server")
        logger = tracklog.build_logger(
            {
                "run_dir": str(run_dir),
                "outputs": [{"type": "jsonl"}, mlflow_output(proxy.url, experiment)],
                "delivery": {**FAST, "linger": 2.0},  # so the ten rows go as one batch
            }
        )
        with caplog.at_level(logging.ERROR, logger="tracklog"):
            for step in range(10):
                logger.record("loss", _loss(step))
                if step in (3, 8):
                    logger.record("weights", np.arange(step, dtype=np.float64))
                if step == 6:
                    logger.record("refused/by_server", 1.0)
                logger.dump(step)
            logger.close()
        batches = [seen for seen in proxy.seen if seen.path.endswith("/runs/log-batch")]
    assert jsonl_steps(run_dir / "progress.jsonl") == list(range(10))
    assert [seen.status for seen in batches].count(400) == 2  # the batch, then the row alone
    client = MlflowClient(server.url)
    run = only_run(client, experiment)
    assert points(client, run.info.run_id, "loss") == [(s, _loss(s)) for s in range(10) if s != 6]
    # Sent again one at a time, the rows keep their files' names (no step_3-1.npy).
    assert artifact_files(client, run.info.run_id, "histograms/weights") == [
        "histograms/weights/step_3.npy",
        "histograms/weights/step_8.npy",
    ]
    assert run.info.status == "FINISHED"
    skipped = [m for m in messages(caplog.records) if "was skipped" in m]
    assert len(skipped) == 1, messages(caplog.records)
    assert "step 6" in skipped[0]
    assert "refused/by_server" in skipped[0]


def test_a_row_that_fails_inside_a_batch_is_skipped_alone_and_no_row_is_written_twice(
    run_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """W&B writes a batch row by row: when one fails, the rows before it are already in
    the run, and sending the batch again row by row must not log them a second time.
    The bad row's checkpoint is deleted (a cleanup script) before the delivery process
    reads it, which only W&B does. (TensorBoard writes row by row too: see
    test_tensorboard.py.)"""
    model = tmp_path / "model.zip"
    model.write_bytes(b"weights")
    logger = tracklog.build_logger(
        {
            "run_dir": str(run_dir),
            "outputs": [{"type": "wandb", "mode": "offline", "project": "tracklog-tests"}],
            "delivery": {**FAST, "linger": 2.0},  # so the six rows go as one batch
        }
    )
    with caplog.at_level(logging.ERROR, logger="tracklog"):
        for step in range(6):
            logger.record("loss", _loss(step))
            if step == 2:
                logger.record("model", tracklog.Checkpoint(model))
            logger.dump(step)
            if step == 2:
                shutil.rmtree(run_dir / "checkpoints")
        logger.close()
    got = [
        (row.global_step, row.values["loss"])
        for row in read_wandb_offline(run_dir).rows
        if "loss" in row.values
    ]
    assert sorted(got) == [(s, _loss(s)) for s in range(6) if s != 2]  # each once
    skipped = [m for m in messages(caplog.records) if "was skipped" in m]
    assert len(skipped) == 1, messages(caplog.records)
    assert "step 2 (keys loss, model)" in skipped[0]


class Pwn:
    """Unpickling this would create a file: the queue's reader must never unpickle."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[..., object], tuple[object, ...]]:
        return (os.system, (f"touch {self.path}",))


def jsonl_and_sqlite_mlflow(run_dir: Path, tracking_uri: str, experiment: str) -> tracklog.Logger:
    return tracklog.build_logger(
        {
            "run_dir": str(run_dir),
            "outputs": [
                {"type": "jsonl"},
                {"type": "mlflow", "tracking_uri": tracking_uri, "experiment": experiment},
            ],
        }
    )


def test_a_record_that_is_not_a_row_is_reported_with_its_position_and_skipped(
    tmp_path: Path, run_dir: Path, mlflow_sqlite_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    import pickle

    experiment = new_experiment()
    logger = jsonl_and_sqlite_mlflow(run_dir, mlflow_sqlite_uri, experiment)
    pwned = tmp_path / "pwned"
    with caplog.at_level(logging.ERROR, logger="tracklog"):
        for step in range(3):
            logger.record("loss", _loss(step))
            logger.dump(step)
        assert logger.flush(30)
        # Records that are not rows reach the queue (a bug, a foreign writer): a
        # pickle and a JSON document of the wrong shape.
        (queue,) = find_queues(run_dir)
        outbox = logger._outbox  # pyright: ignore[reportPrivateUsage]
        assert outbox is not None
        bodies = (pickle.dumps(Pwn(pwned)).decode("latin-1"), '{"values": {"a": {"type": "??"}}}')
        bad = [outbox.queue.append("row", body) for body in bodies]
        for step in range(3, 6):
            logger.record("loss", _loss(step))
            logger.dump(step)
        logger.close()
    assert not pwned.exists()
    client = MlflowClient(mlflow_sqlite_uri)
    run = only_run(client, experiment)
    assert points(client, run.info.run_id, "loss") == [(s, _loss(s)) for s in range(6)]
    assert run.info.status == "FINISHED"
    reported = [m for m in messages(caplog.records) if "is not a row tracklog wrote" in m]
    for seq in bad:
        assert any(f"record {seq} of {queue}" in m for m in reported), reported


def test_damaged_bytes_in_the_inbox_are_reported_with_their_position_and_the_rest_delivered(
    run_dir: Path, mlflow_sqlite_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    experiment = new_experiment()
    logger = jsonl_and_sqlite_mlflow(run_dir, mlflow_sqlite_uri, experiment)
    with caplog.at_level(logging.ERROR, logger="tracklog"):
        for step in range(3):
            logger.record("loss", _loss(step))
            logger.dump(step)
        assert logger.flush(30)
        # Bytes that are no record land in the inbox between two dumps (a bad sector,
        # a foreign writer); the trainer's next records follow them.
        (queue,) = find_queues(run_dir)
        [segment] = sorted(queue.glob("inbox-*.log"))
        where = segment.stat().st_size
        with segment.open("ab") as file:
            file.write(b"\x00not a record\xff" * 8)
        for step in range(3, 6):
            logger.record("loss", _loss(step))
            logger.dump(step)
        logger.close()
    client = MlflowClient(mlflow_sqlite_uri)
    run = only_run(client, experiment)
    assert points(client, run.info.run_id, "loss") == [(s, _loss(s)) for s in range(6)]
    assert run.info.status == "FINISHED"
    reported = [m for m in messages(caplog.records) if "inbox" in m]
    assert len(reported) == 1, reported
    assert f"{segment} at byte {where}: not a record; 112 byte(s) skipped" in reported[0]


# 7. Linger: fewer requests, never a wait at flush or close ----------------------------------


@pytest.mark.parametrize("linger", [0.0, 9.0])
def test_mlflow_rows_wait_for_the_linger_but_never_for_flush_or_close(
    tmp_path: Path, mlflow_sqlite_uri: str, linger: float
) -> None:
    client = MlflowClient(mlflow_sqlite_uri)
    experiment = new_experiment()
    logger = tracklog.build_logger(
        {
            "run_dir": str(tmp_path / "run"),
            "outputs": [
                {"type": "mlflow", "tracking_uri": mlflow_sqlite_uri, "experiment": experiment}
            ],
            "delivery": {"linger": linger},
        }
    )
    for step in range(3):
        logger.record("a", float(step))
        logger.dump(step)
    run_id = mlflow_run_id(logger)

    def count() -> int:
        return len(client.get_metric_history(run_id, "a"))

    deadline = time.monotonic() + 5
    while count() < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert count() == (3 if linger == 0 else 0)  # 9 s of linger: nothing sent yet
    start = time.monotonic()
    assert logger.flush(timeout=10)
    assert count() == 3
    logger.record("a", 3.0)
    logger.dump(3)
    logger.close()
    assert time.monotonic() - start < 4  # neither flush() nor close() waited for the linger
    assert sorted(p.value for p in client.get_metric_history(run_id, "a")) == [0.0, 1.0, 2.0, 3.0]
    assert client.get_run(run_id).info.status == "FINISHED"


# 8. Reports: what delivering a row said is heard before flush() or close() returns -------

# The fault: the delivery process's report pipe is slow (a busy machine can delay its
# report thread that long; here it happens on demand). Installed through sitecustomize in
# the delivery process only, so the trainer runs unchanged.
SLOW_REPORTS_SITE = """
import sys, threading, time

if "tracklog._service" in sys.orig_argv:
    class _Slow:
        def __init__(self, pipe):
            self._pipe = pipe
        def write(self, data):
            time.sleep(0.5)
            return self._pipe.write(data)
        def flush(self):
            return self._pipe.flush()

    _start = threading.Thread.start
    def start(thread):
        if thread.name == "tracklog-reports":
            reports = thread._target.__self__
            reports._pipe = _Slow(reports._pipe)
        _start(thread)
    threading.Thread.start = start
"""

WARNED_SCRIPT = """
import warnings, tracklog
logger = tracklog.build_logger({"run_dir": "run", "outputs": [{"type": "tensorboard"}]})
for ending in ("flush", "close"):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger.record(ending, 1e300)  # TensorBoard's float32: the delivery process warns
        logger.dump(0 if ending == "flush" else 1)
        logger.flush(timeout=30) if ending == "flush" else logger.close()
    print(ending, " | ".join(str(w.message) for w in caught if "float32" in str(w.message)))
"""


def test_a_warning_from_delivering_a_row_is_heard_before_flush_or_close_returns(
    tmp_path: Path,
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_REPORTS_SITE)
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    process = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(WARNED_SCRIPT)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert process.returncode == 0, process.stderr
    lines = process.stdout.splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == ["flush", "close"]
    for line, key in zip(lines, ["flush", "close"], strict=True):
        assert f"'{key}' has a value beyond" in line, (line, process.stderr)
