"""The process and thread model, with real processes, threads and signals.

docs/delivery.md promises: a forked child never writes to or ends its parent's loggers
and runs (its ``dump()`` says to build a logger in the child, which then works); several
threads may ``record()``/``dump()`` one logger, every row whole and none lost; a second
process writing into a busy ``run_dir`` is refused, naming the first; a logger dropped
without ``close()`` leaves no process, thread or file descriptor behind; the delivery
process (one per trainer, a fresh ``python -m tracklog._service`` at ``nice`` 10 that
ignores SIGTERM and SIGINT) is replaced when it dies, without losing or doubling a row;
``build_logger`` never waits for a backend, whose errors come back at a later call.

Everything is read back with the backends' own readers: ``MlflowClient`` on the
session's sqlite store, ``read_jsonl``/``read_csv`` (and pandas), TensorBoard's
``EventAccumulator``; processes with ``psutil`` and ``waitid``. Two tests began as
strict xfails for bugs since fixed: a child forked while another thread held the
logger's locks hung in ``dump()``, and ``close()`` waited its whole ``close_timeout``
for a queue that an output which gave up keeps for replay.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import multiprocessing
import os
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import types
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
import pytest
from mlflow import MlflowClient
from mlflow.entities import Run

import tracklog
import tracklog._queue
from tests.tensorboard_readback import read_events, scalars
from tracklog import _inbox
from tracklog._outbox import _POLL_EVERY, DeliveryError, RemoteOutput, RunDirBusyError
from tracklog._queue import find_queues
from tracklog._service import Service, service
from tracklog.readers import read_csv, read_jsonl

REFUSED_IN_CHILD = "build a logger in the child"


# Helpers -----------------------------------------------------------------------------


def new_experiment() -> str:
    return f"processes-{uuid.uuid4().hex[:12]}"


def mlflow_output(uri: str, experiment: str, **options: object) -> dict[str, object]:
    return {
        "type": "mlflow",
        "tracking_uri": uri,
        "experiment": experiment,
        "artifact_upload_interval": 0,
        **options,
    }


def build(run_dir: Path, *outputs: dict[str, object], **settings: object) -> tracklog.Logger:
    return tracklog.build_logger({"run_dir": str(run_dir), "outputs": list(outputs), **settings})


def run_id_of(logger: tracklog.Logger) -> str:
    (output,) = [o for o in logger.output_formats if isinstance(o, RemoteOutput)]
    return output.run_id


def runs_of(client: MlflowClient, experiment: str) -> list[Run]:
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"experiment {experiment} was never created"
    return list(client.search_runs([found.experiment_id]))


def only_run(client: MlflowClient, experiment: str) -> Run:
    runs = runs_of(client, experiment)
    assert len(runs) == 1, [run.info.run_id for run in runs]  # never a second run
    return runs[0]


def points(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    """Every stored point of ``key`` as (step, value), sorted; duplicates stay."""
    return sorted((point.step, point.value) for point in client.get_metric_history(run_id, key))


def the_queue(run_dir: Path) -> Path:
    (queue,) = (run_dir / "spool").glob("queue-*")
    return queue


def committed(queue: Path) -> tuple[int, int]:
    """How many messages were ever appended to ``queue`` (the highest seq, in queue.db
    or still in its inbox), and the inbox's size: an append changes both."""
    db = sqlite3.connect(f"file:{queue / 'queue.db'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
    finally:
        db.close()
    seq, size = int(row[0]), 0
    for path in sorted(queue.glob("inbox-*.log")):
        data = path.read_bytes()
        size += len(data)
        seq = max([seq, *(record.seq for record in _inbox.parse(data, final=True)[0])])
    return seq, size


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def delivery_processes() -> list[psutil.Process]:
    """This process's live delivery processes (children running ``tracklog._service``)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "tracklog._service" in child.cmdline() and alive(child.pid):
                found.append(child)
    return found


def wait_until_exited(child: int, timeout: float = 30.0) -> None:
    """Wait until our child ``child`` has exited, without reaping it (its ``Popen``
    does). A multithreaded process shows as a zombie before it can be waited for."""
    deadline = time.monotonic() + timeout
    flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
    while os.waitid(os.P_PID, child, flags) is None:
        assert time.monotonic() < deadline, f"process {child} has not exited"
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port  # closed again: nothing listens there


def read_lines(process: subprocess.Popen[str], count: int, timeout: float) -> list[str]:
    """``count`` lines of the process's stdout, failing after ``timeout`` seconds."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while len(lines) < count:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([process.stdout], [], [], max(left, 0))
        assert ready, f"no output from {process.args!r} within {timeout} s; got {lines}"
        line = process.stdout.readline()
        assert line, f"{process.args!r} ended (status {process.wait()}) after {lines}"
        lines.append(line.strip())
    return lines


@pytest.fixture
def client(mlflow_sqlite_uri: str) -> MlflowClient:
    return MlflowClient(mlflow_sqlite_uri)


# 1. Forked children ----------------------------------------------------------------------


def in_forked_child(logger: tracklog.Logger, child_dir: Path) -> dict[str, Any]:
    """What a forked child does with its parent's logger, and with one of its own
    (one with MLflow, in a child that exits normally: see FORKING_TRAINER)."""
    report: dict[str, Any] = {"pid": os.getpid()}
    try:
        logger.dump(99)
        report["dump"] = "wrote"
    except RuntimeError as error:
        report["dump"] = str(error)
    try:
        logger.record("x", 99.0)
        report["record"] = "recorded"
    except RuntimeError as error:
        report["record"] = str(error)
    report["flush"] = logger.flush(timeout=5)
    logger.close()  # the parent's: a closed copy, so this does nothing
    with build(child_dir, {"type": "jsonl"}) as mine:
        for step in (100, 101):
            mine.record("y", float(step))
            mine.dump(step)
    return report


def fork_with_os(logger: tracklog.Logger, child_dir: Path) -> tuple[dict[str, Any], int]:
    readable, writable = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            os.close(readable)
            signal.alarm(120)  # a hung child must not outlive the test run
            try:
                report = in_forked_child(logger, child_dir)
                code = 0
            except BaseException:
                report = {"error": traceback.format_exc()}
            data = json.dumps(report).encode()
            while data:
                data = data[os.write(writable, data) :]
        finally:
            os._exit(code)
    os.close(writable)
    with os.fdopen(readable, "rb") as pipe:
        received = pipe.read()
    _, status = os.waitpid(pid, 0)
    return json.loads(received), os.waitstatus_to_exitcode(status)


def _multiprocessing_child(logger: tracklog.Logger, child_dir: Path, sender: Connection) -> None:
    try:
        sender.send(in_forked_child(logger, child_dir))
    except BaseException:
        sender.send({"error": traceback.format_exc()})
        raise


def fork_with_multiprocessing(
    logger: tracklog.Logger, child_dir: Path
) -> tuple[dict[str, Any], int]:
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_multiprocessing_child, args=(logger, child_dir, sender))
    process.start()
    sender.close()
    try:
        assert receiver.poll(120), "the multiprocessing child reported nothing"
        report: dict[str, Any] = receiver.recv()
    finally:
        process.join(60)
        if process.exitcode is None:
            process.kill()
            process.join()
    assert process.exitcode is not None
    return report, process.exitcode


@pytest.mark.parametrize("start", ["os.fork", "multiprocessing fork"])
def test_a_forked_child_never_writes_to_or_ends_its_parents_runs(
    start: str, tmp_path: Path, run_dir: Path, client: MlflowClient, mlflow_sqlite_uri: str
) -> None:
    experiment = new_experiment()
    logger = build(run_dir, {"type": "jsonl"}, mlflow_output(mlflow_sqlite_uri, experiment))
    for step in range(3):
        logger.record("x", float(step))
        logger.dump(step)
    assert logger.flush(timeout=120)
    run_id = run_id_of(logger)
    delivery = service().pid
    assert delivery is not None
    queue = the_queue(run_dir)
    before = committed(queue)

    fork = fork_with_os if start == "os.fork" else fork_with_multiprocessing
    report, code = fork(logger, tmp_path / "child")

    assert code == 0, report
    assert REFUSED_IN_CHILD in report["dump"]
    assert str(os.getpid()) in report["dump"]  # it names the process the logger is of
    assert REFUSED_IN_CHILD in report["record"]
    assert report["flush"] is True  # nothing of the parent's to wait for
    # The child's exit appended nothing to the parent's queue, ended nothing of it, and
    # left the parent's delivery process alone.
    assert committed(queue) == before
    assert client.get_run(run_id).info.status == "RUNNING"
    assert service().pid == delivery
    assert alive(delivery)
    # A logger the child built works.
    assert [row.step for row in read_jsonl(tmp_path / "child" / "progress.jsonl")] == [100, 101]

    for step in range(3, 6):  # the parent goes on logging into the same run
        logger.record("x", float(step))
        logger.dump(step)
    logger.close()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert points(client, run_id, "x") == [(step, float(step)) for step in range(6)]
    assert [row.step for row in read_jsonl(run_dir / "progress.jsonl")] == list(range(6))
    assert only_run(client, experiment).info.run_id == run_id


# A trainer that forks: the child exits normally (atexit, finalisers, the parent's
# logger copies collected), or lives on while the trainer is SIGKILLed.
FORKING_TRAINER = """
import gc, json, os, sqlite3, sys, time
import tracklog
from tracklog._outbox import RemoteOutput
from tracklog._queue import find_queues
from tracklog._service import service

mode, uri, experiment, run_dir, child_dir = sys.argv[1:6]


def say(**fields):
    print(json.dumps(fields), flush=True)


def mlflow():
    return {"type": "mlflow", "tracking_uri": uri, "experiment": experiment,
            "artifact_upload_interval": 0}


def run_id_of(logger):
    return next(o for o in logger.output_formats if isinstance(o, RemoteOutput)).run_id


def committed():
    from pathlib import Path
    from tracklog import _inbox

    queue = Path(run_dir) / "spool" / "queue-0"
    db = sqlite3.connect(f"file:{queue}/queue.db?mode=ro", uri=True)
    try:
        seq = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()[0]
    finally:
        db.close()
    size = 0
    for path in sorted(queue.glob("inbox-*.log")):
        data = path.read_bytes()
        size += len(data)
        seq = max([seq, *(record.seq for record in _inbox.parse(data, final=True)[0])])
    return [seq, size]


logger = tracklog.build_logger({"run_dir": run_dir, "outputs": [{"type": "jsonl"}, mlflow()]})
for step in range(3):
    logger.record("x", float(step))
    logger.dump(step)
assert logger.flush(timeout=120)
run_id = run_id_of(logger)
delivery = service().pid
before = committed()
pid = os.fork()
if pid == 0 and mode == "kill":
    time.sleep(600)  # holds whatever it inherited until the test kills it
    os._exit(0)
elif pid == 0:
    try:
        logger.dump(99)
        refused = ""
    except RuntimeError as error:
        refused = str(error)
    mine = tracklog.build_logger({"run_dir": child_dir, "outputs": [mlflow()]})
    mine.record("y", 7.0)
    mine.dump(100)
    say(child_run=run_id_of(mine), refused=refused, child_delivery=service().pid)
    del logger
    gc.collect()
    # Falls off the end: a normal exit, whose atexit closes `mine`, and only it.
elif mode == "kill":
    say(run_id=run_id, delivery=delivery, child=pid)
    time.sleep(600)  # SIGKILLed by the test
else:
    _, status = os.waitpid(pid, 0)
    from mlflow import MlflowClient

    status_after_child = MlflowClient(uri).get_run(run_id).info.status
    import psutil

    say(child_exit=os.waitstatus_to_exitcode(status), before=before, after=committed(),
        delivery_same=service().pid == delivery,
        delivery_alive=psutil.Process(delivery).status() != psutil.STATUS_ZOMBIE,
        status_after_child=status_after_child)
    for step in range(3, 6):
        logger.record("x", float(step))
        logger.dump(step)
    logger.close()
    say(run_id=run_id, delivery=delivery)
"""


def start_forking_trainer(
    mode: str, tmp_path: Path, uri: str, experiment: str
) -> subprocess.Popen[str]:
    script = tmp_path / "forking_trainer.py"
    script.write_text(textwrap.dedent(FORKING_TRAINER))
    arguments = [mode, uri, experiment, str(tmp_path / "run"), str(tmp_path / "child")]
    return subprocess.Popen(
        [sys.executable, str(script), *arguments], stdout=subprocess.PIPE, text=True
    )


def test_a_forked_child_exiting_normally_leaves_its_parents_run_alone(
    tmp_path: Path, client: MlflowClient, mlflow_sqlite_uri: str
) -> None:
    experiment = new_experiment()
    trainer = start_forking_trainer("exit", tmp_path, mlflow_sqlite_uri, experiment)
    try:
        stdout, _ = trainer.communicate(timeout=180)
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
    assert trainer.returncode == 0, stdout
    said: dict[str, Any] = {}
    for line in stdout.splitlines():
        said.update(json.loads(line))

    assert REFUSED_IN_CHILD in said["refused"]
    assert said["child_exit"] == 0
    assert said["after"] == said["before"]  # nothing appended to the parent's queue
    assert said["delivery_same"]
    assert said["delivery_alive"]
    assert said["status_after_child"] == "RUNNING"  # the child's exit ended nothing
    assert said["child_delivery"] != said["delivery"]
    run = client.get_run(said["run_id"])
    assert run.info.status == "FINISHED"
    assert points(client, said["run_id"], "x") == [(step, float(step)) for step in range(6)]
    rows = read_jsonl(tmp_path / "run" / "progress.jsonl")
    assert [row.step for row in rows] == list(range(6))
    # The child's own logger was closed by the child's atexit: its run is FINISHED.
    assert client.get_run(said["child_run"]).info.status == "FINISHED"
    assert points(client, said["child_run"], "y") == [(100, 7.0)]
    assert len(runs_of(client, experiment)) == 2


def test_a_forked_child_holds_no_pipe_that_keeps_the_delivery_process_waiting(
    tmp_path: Path, client: MlflowClient, mlflow_sqlite_uri: str
) -> None:
    """The delivery process learns of the trainer's death from its stdin closing: a
    forked child still alive must not hold that pipe open."""
    experiment = new_experiment()
    trainer = start_forking_trainer("kill", tmp_path, mlflow_sqlite_uri, experiment)
    child: int | None = None
    try:
        (line,) = read_lines(trainer, 1, timeout=120)
        said = json.loads(line)
        child = int(said["child"])
        delivery = psutil.Process(int(said["delivery"]))
        trainer.kill()  # SIGKILL: no atexit, no close()
        trainer.wait()
        delivery.wait(timeout=60)  # it delivered, ended the run and exited...
        assert alive(child)  # ...while the forked child still lives
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
    run = client.get_run(said["run_id"])
    assert run.info.status == "KILLED"
    assert points(client, said["run_id"], "x") == [(0, 0.0), (1, 1.0), (2, 2.0)]


def test_a_child_forked_while_another_thread_dumps_is_refused_not_hung(run_dir: Path) -> None:
    logger = build(run_dir, {"type": "jsonl"})
    stop = threading.Event()

    def keep_dumping() -> None:
        step = 0
        while not stop.is_set():
            logger.record("x", float(step))
            logger.dump(step)
            step += 1

    dumper = threading.Thread(target=keep_dumping)
    dumper.start()
    children: dict[int, int] = {}  # pid -> the read end of its pipe
    outcomes: dict[int, str] = {}
    try:
        time.sleep(0.1)
        for _ in range(6):
            readable, writable = os.pipe()
            pid = os.fork()
            if pid == 0:
                try:
                    os.close(readable)
                    signal.alarm(30)
                    try:
                        logger.dump(10**9)
                        outcome = b"wrote"
                    except RuntimeError as error:
                        outcome = b"refused" if REFUSED_IN_CHILD in str(error) else b"other"
                    os.write(writable, outcome)
                finally:
                    os._exit(0)
            os.close(writable)
            children[pid] = readable
            time.sleep(0.02)
        deadline = time.monotonic() + 5
        while len(outcomes) < len(children) and time.monotonic() < deadline:
            waiting = [fd for pid, fd in children.items() if pid not in outcomes]
            ready, _, _ = select.select(waiting, [], [], max(deadline - time.monotonic(), 0))
            for pid, fd in children.items():
                if fd in ready:
                    outcomes[pid] = os.read(fd, 100).decode() or "exited silently"
    finally:
        stop.set()
        dumper.join()
        for pid, fd in children.items():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(fd)
        logger.close()
    assert {pid: outcomes.get(pid, "hung") for pid in children} == dict.fromkeys(
        children, "refused"
    )


# 2. Threads --------------------------------------------------------------------------------

THREADS, DUMPS = 4, 200


@contextlib.contextmanager
def fast_thread_switches() -> Iterator[None]:
    """Switch threads every few microseconds, so their calls interleave finely."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


# SIGTERM arrives while the main thread holds a logging handler's lock, and a dump()
# on the training thread needs that lock (tracklog reports a checkpoint it cannot keep).
SIGTERM_IN_A_HANDLER = """
import logging, os, signal, sys, threading, time
from pathlib import Path
import tracklog

base = Path(sys.argv[1])

class SlowHandler(logging.StreamHandler):
    def emit(self, record):
        if record.name == "app":
            time.sleep(1.0)  # the main thread holds this handler's lock meanwhile
        super().emit(record)

logging.basicConfig(handlers=[SlowHandler(sys.stderr)], level=logging.INFO)
logger = tracklog.build_logger({"run_dir": str(base / "run"), "outputs": [{"type": "jsonl"}]})
model = base / "model.bin"
model.write_bytes(b"weights")
checkpoint = tracklog.Checkpoint(model)
model.unlink()  # dump() cannot keep it, and says so through logging

def train():
    time.sleep(0.2)
    logger.record("model", checkpoint)
    logger.dump(1)
    print("dumped", flush=True)

threading.Thread(target=train, daemon=True).start()
threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
try:
    logging.getLogger("app").warning("the main thread logs")  # SIGTERM comes in here
except SystemExit as stop:
    print(f"exit {stop.code}", flush=True)
"""


def test_sigterm_while_another_thread_dumps_never_deadlocks(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SIGTERM_IN_A_HANDLER), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # (Two threads print: the words, not the lines, are whole.)
    assert "exit 143" in done.stdout, done.stderr  # SIGTERM's exit, not a hang
    assert "dumped" in done.stdout, done.stderr


def test_mark_failed_while_another_thread_dumps_loses_neither_a_row_nor_the_failure(
    run_dir: Path, client: MlflowClient, mlflow_sqlite_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The training loop dumps on a thread of its own while the main thread's excepthook
    marks the run failed. Each inbox write is made slow (a busy disk) so that the two
    meet inside one: both messages must get numbers of their own."""
    write = os.write

    def slow_write(fd: int, data: bytes) -> int:
        time.sleep(0.002)
        return write(fd, data)

    slow_os = types.SimpleNamespace(**vars(os))  # the inbox's os module only
    slow_os.write = slow_write
    monkeypatch.setattr(_inbox, "os", slow_os)
    experiment = new_experiment()
    logger = build(run_dir, mlflow_output(mlflow_sqlite_uri, experiment))

    def train() -> None:
        for step in range(100):
            logger.record("x", float(step))
            logger.dump(step)

    training = threading.Thread(target=train)
    training.start()
    time.sleep(0.05)
    logger.mark_failed("RuntimeError")
    training.join()
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the failure's "View run" warnings, if any
        logger.close()
    (run,) = runs_of(client, experiment)
    assert len(client.get_metric_history(run.info.run_id, "x")) == 100
    assert run.info.status == "FAILED"


def test_threads_dumping_at_once_write_whole_rows_and_lose_no_value(
    run_dir: Path, client: MlflowClient, mlflow_sqlite_uri: str
) -> None:
    experiment = new_experiment()
    logger = build(
        run_dir, {"type": "jsonl"}, {"type": "csv"}, mlflow_output(mlflow_sqlite_uri, experiment)
    )
    start = threading.Barrier(THREADS)
    meet = threading.Barrier(THREADS)
    errors: list[BaseException] = []

    def work(thread: int) -> None:
        try:
            start.wait()
            for i in range(DUMPS):
                logger.record(f"t{thread}", float(i))
                logger.record("shared", float(thread * 1000 + i))
                if i % 25 == 0:
                    meet.wait()  # every thread has recorded: one dump takes them all
                logger.dump(i * THREADS + thread)
        except BaseException as error:
            errors.append(error)
            start.abort()
            meet.abort()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(THREADS)]
    with fast_thread_switches():
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    assert not any(thread.is_alive() for thread in threads)
    assert not errors, errors
    assert logger.flush(timeout=120)
    run_id = run_id_of(logger)
    logger.close()

    rows = read_jsonl(run_dir / "progress.jsonl")  # raises on a line that is not whole
    csv_rows = read_csv(run_dir / "progress.csv")  # raises on a row of the wrong width
    frame = pd.read_csv(run_dir / "progress.csv")
    assert [(row.step, dict(row.values)) for row in csv_rows] == [
        (row.step, dict(row.values)) for row in rows
    ]
    assert frame["_step"].tolist() == [row.step for row in rows]
    assert len({row.step for row in rows}) == len(rows)  # each dump() wrote one row
    # Every recorded value landed in exactly one dump: the one of its thread, or one
    # another thread made in between.
    for number in range(THREADS):
        key = f"t{number}"
        assert sorted(row.values[key] for row in rows if key in row.values) == [
            float(i) for i in range(DUMPS)
        ]
        assert frame[key].dropna().sort_values().tolist() == [float(i) for i in range(DUMPS)]
    assert any(sum(f"t{n}" in row.values for n in range(THREADS)) > 1 for row in rows)
    shared = [row.values["shared"] for row in rows if "shared" in row.values]
    assert len(set(shared)) == len(shared)  # a value recorded once is dumped once

    run = only_run(client, experiment)
    assert run.info.run_id == run_id
    assert run.info.status == "FINISHED"
    for key in [f"t{n}" for n in range(THREADS)] + ["shared"]:
        dumped = sorted((row.step, float(row.values[key])) for row in rows if key in row.values)
        assert points(client, run_id, key) == dumped, key


# 3. One run_dir, one process ---------------------------------------------------------------

FILE_WRITER = """
import sys
import tracklog

logger = tracklog.build_logger({"run_dir": sys.argv[1], "outputs": [{"type": "jsonl"},
                                                                   {"type": "csv"}]})
for step in range(3):
    logger.record("x", float(step))
    logger.dump(step)
print("ready", flush=True)
sys.stdin.readline()
logger.close()
print("closed", flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("ending", ["close", "SIGKILL"])
def test_a_second_process_on_a_busy_run_dir_is_refused_until_the_first_ends(
    ending: str, tmp_path: Path, run_dir: Path
) -> None:
    first = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(FILE_WRITER), str(run_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert first.stdin is not None
    try:
        assert read_lines(first, 1, timeout=120) == ["ready"]
        with pytest.raises(RunDirBusyError, match=rf"\bprocess {first.pid}\b"):
            build(run_dir, {"type": "jsonl"}, {"type": "csv"})
        if ending == "close":
            first.stdin.write("\n")
            first.stdin.flush()
            assert read_lines(first, 1, timeout=60) == ["closed"]
            assert first.poll() is None  # still alive: its logger is what counted
        else:
            first.kill()
            first.wait()
        with build(run_dir, {"type": "jsonl"}, {"type": "csv"}) as second:
            # Not appended to the first run's files: a run of its own, beside it.
            assert second.get_dir() == f"{run_dir}_2"
            second.record("x", 10.0)
            second.dump(10)
    finally:
        with contextlib.suppress(OSError):
            first.stdin.close()
        if first.poll() is None:
            first.kill()
        first.wait()
    for folder, expected in (
        (run_dir, [(0, 0.0), (1, 1.0), (2, 2.0)]),
        (Path(f"{run_dir}_2"), [(10, 10.0)]),
    ):
        for rows in (read_jsonl(folder / "progress.jsonl"), read_csv(folder / "progress.csv")):
            assert [(row.step, row.values["x"]) for row in rows] == expected


# 4. An Optuna-style loop -----------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    threads: int
    fds: int
    delivery: int
    delivery_threads: int
    delivery_fds: int


def test_loggers_dropped_without_close_leave_no_process_thread_or_fd(tmp_path: Path) -> None:
    trainer = psutil.Process()

    def trial(number: int) -> float:
        logger = build(tmp_path / f"trial-{number}", {"type": "tensorboard"})
        for step in range(2):
            logger.record("x", number + step / 2)
            logger.dump(step)
        return float(number)  # the logger is dropped here, never closed

    def settled(trials: int) -> Usage:
        gc.collect()
        # The delivery process ends each dropped logger's runs and removes its queue.
        deadline = time.monotonic() + 60
        spools = [tmp_path / f"trial-{number}" / "spool" for number in range(trials)]
        while any(spool.exists() for spool in spools):
            assert time.monotonic() < deadline, [str(s) for s in spools if s.exists()]
            time.sleep(0.05)
        time.sleep(0.3)  # the queues' delivery threads return
        processes = delivery_processes()
        assert [process.pid for process in processes] == [service().pid]  # at most one
        (delivery,) = processes
        return Usage(
            threads=trainer.num_threads(),
            fds=trainer.num_fds(),
            delivery=delivery.pid,
            delivery_threads=delivery.num_threads(),
            delivery_fds=delivery.num_fds(),
        )

    for number in range(20):
        trial(number)
    after_20 = settled(20)
    for number in range(20, 100):
        trial(number)
    after_100 = settled(100)

    assert after_100.delivery == after_20.delivery
    # 80 more loggers, each holding a thread or its queue's files, would show as 80+.
    assert after_100.threads <= after_20.threads + 1, (after_20, after_100)
    assert after_100.fds <= after_20.fds + 3, (after_20, after_100)
    assert after_100.delivery_threads <= after_20.delivery_threads + 1, (after_20, after_100)
    assert after_100.delivery_fds <= after_20.delivery_fds + 3, (after_20, after_100)
    for number in range(100):  # every dropped logger's rows reached its event file
        events = read_events(tmp_path / f"trial-{number}" / "tensorboard")
        assert scalars(events, "x") == [(0, number), (1, number + 0.5)], number


def test_queues_kept_for_replay_leave_no_file_open_in_the_delivery_process(
    tmp_path: Path, mlflow_sqlite_uri: str
) -> None:
    """An output that cannot start (an unknown run_id) keeps its logger's queue for
    ``tracklog replay``: the delivery process must close the queue's files all the same,
    or a sweep of such loggers grows its open files without bound."""
    unknown: dict[str, object] = {
        "type": "mlflow",
        "tracking_uri": mlflow_sqlite_uri,
        "run_id": "0" * 32,
    }

    def trial(number: int) -> None:
        logger = build(tmp_path / f"trial-{number}", unknown, delivery={"close_timeout": 30})
        for step in range(2):
            logger.record("x", number + step / 2)
            logger.dump(step)
        logger.close()

    def open_files(trials: int) -> int:
        # Each queue is kept: its delivery thread has returned once the lock is free.
        for number in range(trials):
            (queue,) = find_queues(tmp_path / f"trial-{number}")
            lock = tracklog._queue.Lock(queue / "delivery.lock")
            deadline = time.monotonic() + 60
            while lock.held_elsewhere():
                assert time.monotonic() < deadline, f"{queue} is still delivered"
                time.sleep(0.05)
        time.sleep(0.3)  # the queue's thread returns after it lets go of the lock
        return psutil.Process(service().pid).num_fds()

    for number in range(2):
        trial(number)
    after_2 = open_files(2)
    for number in range(2, 8):
        trial(number)
    after_8 = open_files(8)
    # Six more kept queues, each holding its inbox, queue.db (with -wal, -shm) and
    # acks.db open, would show as 30 or more.
    assert after_8 <= after_2 + 3, (after_2, after_8)


def test_a_logger_collected_inside_a_call_on_the_delivery_process_deadlocks_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A logger dropped in a reference cycle is finalized whenever the garbage collector
    runs: possibly inside another logger's call on the delivery process's handle, with
    its lock held. (The collection is forced there: it happens by chance otherwise.)"""
    kept = build(tmp_path / "kept", {"type": "tensorboard"})
    dropped = build(tmp_path / "dropped", {"type": "tensorboard"})
    kept.record("x", 1.0)
    kept.dump(1)
    dropped.record("x", 2.0)
    dropped.dump(1)
    assert kept.flush(30)
    cycle: list[object] = [dropped]
    cycle.append(cycle)  # only the cyclic collector frees the dropped logger
    del dropped, cycle
    send = Service._send  # pyright: ignore[reportPrivateUsage]

    def send_after_a_collection(handle: Service, line: bytes) -> None:
        gc.collect()
        send(handle, line)

    monkeypatch.setattr(Service, "_send", send_after_a_collection)
    flushed: list[bool] = []
    flushing = threading.Thread(target=lambda: flushed.append(kept.flush(30)), daemon=True)
    flushing.start()
    flushing.join(60)
    assert not flushing.is_alive(), "flush() waits forever on the dropped logger's finalizer"
    assert flushed == [True]
    monkeypatch.undo()
    kept.close()
    deadline = time.monotonic() + 60
    while (tmp_path / "dropped" / "spool").exists():  # delivered, its queue removed
        assert time.monotonic() < deadline, "the dropped logger's queue is never delivered"
        time.sleep(0.05)
    for name, value in (("kept", 1.0), ("dropped", 2.0)):
        assert scalars(read_events(tmp_path / name / "tensorboard"), "x") == [(1, value)]


# 5. The delivery process SIGKILLed -------------------------------------------------------

KEYS = 4


def test_a_killed_delivery_process_is_reported_replaced_and_nothing_is_lost_or_doubled(
    run_dir: Path,
    client: MlflowClient,
    mlflow_sqlite_uri: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tracklog")
    experiment = new_experiment()
    logger = build(run_dir, mlflow_output(mlflow_sqlite_uri, experiment))

    def dump(step: int) -> None:
        for key in range(KEYS):
            logger.record(f"m{key}", step * 10.0 + key)
        logger.dump(step)

    for step in range(10):
        dump(step)
    assert logger.flush(timeout=120)  # the run exists and has these rows
    for step in range(10, 300):
        dump(step)  # in flight, or not sent yet, when the process dies
    old = service().pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    wait_until_exited(old)
    seen = len(caplog.records)
    # dump() looks for reports and a dead process at most every _POLL_EVERY (a burst of
    # dumps makes no pipe read or waitpid each): the next dump after that interval.
    time.sleep(_POLL_EVERY + 0.01)
    dump(300)
    reports = [
        record
        for record in caplog.records[seen:]
        if record.name == "tracklog" and f"pid {old}" in record.getMessage()
    ]
    assert [record.levelno for record in reports] == [logging.ERROR], caplog.text
    new = service().pid
    assert new is not None
    assert new != old
    assert alive(new)
    for step in range(301, 320):
        dump(step)
    assert logger.flush(timeout=120)
    assert service().pid == new
    assert "tracklog._service" in psutil.Process(new).cmdline()  # exec'd by now
    logger.close()

    run = only_run(client, experiment)  # the new process continued the same run
    assert run.info.status == "FINISHED"
    for key in range(KEYS):
        # Exactly once per step: what was resent after the kill is not stored twice.
        assert points(client, run.info.run_id, f"m{key}") == [
            (step, step * 10.0 + key) for step in range(320)
        ]
    errors = [
        r.getMessage()
        for r in caplog.records
        if r.name == "tracklog" and r.levelno >= logging.ERROR
    ]
    assert len(errors) == 1, errors  # the report of the death, nothing else


def test_a_queue_whose_close_timed_out_is_finished_by_the_delivery_process_that_replaces_a_dead_one(
    tmp_path: Path,
) -> None:
    """close() gave up waiting (the delivery process was stopped), then the delivery
    process died while the trainer lived on: its replacement delivers the closed
    logger's rows too, as close() said would happen."""
    closed = build(tmp_path / "closed", {"type": "tensorboard"}, delivery={"close_timeout": 0.5})
    living = build(tmp_path / "living", {"type": "tensorboard"})
    living.record("x", 0.0)
    living.dump(0)
    assert living.flush(timeout=60)
    old = service().pid
    assert old is not None
    os.kill(old, signal.SIGSTOP)
    try:
        for step in range(3):
            closed.record("x", float(step))
            closed.dump(step)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            closed.close()  # times out: "the delivery process goes on with them"
    finally:
        os.kill(old, signal.SIGKILL)
        os.kill(old, signal.SIGCONT)
    wait_until_exited(old)
    time.sleep(_POLL_EVERY + 0.01)
    living.record("x", 1.0)
    living.dump(1)  # sees the dead process and starts another
    assert living.flush(timeout=120)
    living.close()
    deadline = time.monotonic() + 120
    while (tmp_path / "closed" / "spool").exists():
        assert time.monotonic() < deadline, "the closed logger's queue is never delivered"
        time.sleep(0.05)
    events = read_events(tmp_path / "closed" / "tensorboard")
    assert scalars(events, "x") == [(0, 0.0), (1, 1.0), (2, 2.0)]


# 6. What the delivery process is -----------------------------------------------------------


def test_the_delivery_process_is_a_fresh_low_priority_interpreter_ignoring_term_and_int(
    run_dir: Path,
) -> None:
    logger = build(run_dir, {"type": "tensorboard"})
    logger.record("x", 1.0)
    logger.dump(1)
    assert logger.flush(timeout=120)  # it is running its main loop by now
    pid = service().pid
    assert pid is not None
    delivery = psutil.Process(pid)
    trainer = psutil.Process()
    assert delivery.nice() >= min(trainer.nice() + 10, 19)
    command = delivery.cmdline()
    assert command[1:] == ["-m", "tracklog._service"]  # exec'd: a fork keeps our argv
    assert command != trainer.cmdline()
    assert os.path.realpath(command[0]) == os.path.realpath(sys.executable)
    assert delivery.ppid() == os.getpid()
    # It never loads SB3, so never torch: that import alone is over 2 CPU-s (this
    # process has both, so a fork would show them).
    assert any("libtorch" in region.path for region in psutil.Process().memory_maps())
    assert not any("libtorch" in region.path for region in delivery.memory_maps())

    os.kill(pid, signal.SIGTERM)  # SLURM signals every process of the job
    os.kill(pid, signal.SIGINT)
    time.sleep(0.5)
    assert alive(pid)
    logger.record("x", 2.0)
    logger.dump(2)
    assert logger.flush(timeout=60)
    logger.close()
    assert service().pid == pid
    assert scalars(read_events(run_dir / "tensorboard"), "x") == [(1, 1.0), (2, 2.0)]


DROPPED_HANDLE: str = """
import gc, sys, tracklog
from tracklog import _service
logger = tracklog.build_logger({"run_dir": sys.argv[1], "outputs": [{"type": "tensorboard"}]})
logger.record("x", 1.0)
logger.dump(0)
assert logger.flush(120)
logger.close()
pid = _service.service().pid
_service._service = None  # as at the interpreter's exit: the handle goes, the process lives on
gc.collect()
print(pid, flush=True)
"""


def test_a_dropped_handle_of_a_running_delivery_process_warns_nothing(tmp_path: Path) -> None:
    """The delivery process outlives its trainer on purpose: no "subprocess … is still
    running" or "unclosed file" ResourceWarning at every program's end."""
    script = tmp_path / "drop.py"
    script.write_text(DROPPED_HANDLE, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-W", "always::ResourceWarning", str(script), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "ResourceWarning" not in done.stderr, done.stderr
    assert int(done.stdout) > 0


# 7. Start-up never waits for a backend -------------------------------------------------


def test_an_unreachable_backend_blocks_neither_start_nor_dumps_nor_close(
    run_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tracklog")
    url = f"http://127.0.0.1:{free_port()}"
    delivery = {"close_timeout": 1, "deadline": 2, "retry_initial": 0.1, "retry_max": 0.5}
    mlflow = mlflow_output(url, new_experiment(), request_retries=0, request_timeout=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        started = time.monotonic()
        logger = build(run_dir, {"type": "jsonl"}, mlflow, delivery=delivery)
        assert time.monotonic() - started < 20
        step = 0
        deadline = time.monotonic() + 60

        def reported() -> list[str]:
            said = [str(warning.message) for warning in caught]
            said += [r.getMessage() for r in caplog.records if r.name == "tracklog"]
            return [message for message in said if url in message]

        def named() -> bool:
            return any("outputs.1 (mlflow)" in message for message in reported())

        while not named():  # dumps go on; the failure comes back at one of them
            assert time.monotonic() < deadline, f"not reported: {reported()}"
            logger.record("x", float(step))
            logger.dump(step)
            step += 1
            assert logger.flush(timeout=0.2) is False
        started = time.monotonic()
        logger.close()
        assert time.monotonic() - started < 20
    left = [r.getMessage() for r in caplog.records if "not delivered yet" in r.getMessage()]
    assert len(left) == 1
    assert "tracklog replay" in left[0]
    assert [row.step for row in read_jsonl(run_dir / "progress.jsonl")] == list(range(step))


def cannot_start(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.name == "tracklog" and "outputs.1 (mlflow): cannot start" in record.getMessage()
    ]


def dump_until_it_cannot_start(
    logger: tracklog.Logger, caplog: pytest.LogCaptureFixture, what: str
) -> int:
    """Dump steps 0, 1, ... until the MLflow output reports that it cannot start (the
    delivery process tried meanwhile); return the number of steps dumped."""
    step = 0
    deadline = time.monotonic() + 60
    while not cannot_start(caplog):
        assert time.monotonic() < deadline, f"{what} was never reported"
        logger.record("x", float(step))
        logger.dump(step)
        step += 1
        time.sleep(0.02)
    return step


def test_an_unknown_run_id_is_reported_once_at_a_later_call(
    run_dir: Path, mlflow_sqlite_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tracklog")
    missing = uuid.uuid4().hex
    mlflow = mlflow_output(mlflow_sqlite_uri, new_experiment(), run_id=missing)
    logger = build(run_dir, {"type": "jsonl"}, mlflow, delivery={"close_timeout": 3})
    assert not cannot_start(caplog)  # build_logger did not wait for MLflow
    step = dump_until_it_cannot_start(logger, caplog, "the unknown run_id")
    for _ in range(5):
        logger.record("x", float(step))
        logger.dump(step)
        step += 1
    assert logger.flush(timeout=30)  # an output that gave up is not waited for
    logger.close()
    (record,) = cannot_start(caplog)
    assert record.levelno == logging.ERROR
    assert missing in record.getMessage()
    assert sum(missing in r.getMessage() for r in caplog.records) == 1
    # Besides that one error, close() says once where its rows wait for a replay.
    kept = [r for r in caplog.records if "gave up on outputs.1 (mlflow)" in r.getMessage()]
    assert [r.levelno for r in kept] == [logging.WARNING]
    assert [row.step for row in read_jsonl(run_dir / "progress.jsonl")] == list(range(step))


def test_a_store_left_half_created_is_reported_at_a_later_call_not_retried_for_ever(
    run_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """MLflow's migrations of a new SQLite store, interrupted (a second process ran them
    at the same time), leave a table behind that fails every later attempt the same way.
    The output says so and gives up (its rows stay for replay); it used to retry in
    silence for as long as training ran."""
    caplog.set_level(logging.INFO, logger="tracklog")
    database = tmp_path / "store" / "mlflow.db"
    database.parent.mkdir()
    with contextlib.closing(sqlite3.connect(database)) as db:
        db.execute("CREATE TABLE _alembic_tmp_experiments (experiment_id INTEGER)")
        db.commit()
    mlflow = mlflow_output(f"sqlite:///{database}", new_experiment())
    logger = build(run_dir, {"type": "jsonl"}, mlflow, delivery={"close_timeout": 3})
    step = dump_until_it_cannot_start(logger, caplog, "the half-created store")
    assert logger.flush(timeout=30)  # an output that gave up is not waited for
    logger.close()
    (record,) = cannot_start(caplog)
    assert "_alembic_tmp_experiments already exists" in record.getMessage()
    assert [row.step for row in read_jsonl(run_dir / "progress.jsonl")] == list(range(step))
    (queue,) = find_queues(run_dir)  # kept for a replay once the store is mended
    assert tracklog._queue.Queue(queue).pending(["1-mlflow"]) == step + 2  # flush, close


def test_strict_raises_an_unknown_run_id_once_as_a_delivery_error(
    run_dir: Path, mlflow_sqlite_uri: str
) -> None:
    missing = uuid.uuid4().hex
    mlflow = mlflow_output(mlflow_sqlite_uri, new_experiment(), run_id=missing)
    logger = build(run_dir, {"type": "jsonl"}, mlflow, strict=True, delivery={"close_timeout": 3})
    written: list[int] = []

    def dump_until_raised() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            logger.record("x", float(len(written)))
            written.append(len(written))  # the row is written before the error is raised
            logger.dump(written[-1])
            time.sleep(0.02)

    with pytest.raises(DeliveryError, match=r"outputs\.1 \(mlflow\): cannot start") as raised:
        dump_until_raised()
    assert missing in str(raised.value)
    for step in range(len(written), len(written) + 3):  # raised once, not again
        logger.record("x", float(step))
        logger.dump(step)
    assert logger.flush(timeout=30)
    logger.close()
    steps = [row.step for row in read_jsonl(run_dir / "progress.jsonl")]
    assert steps == list(range(len(written) + 3))


def test_close_does_not_wait_for_an_output_that_gave_up(
    run_dir: Path, mlflow_sqlite_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tracklog")
    mlflow = mlflow_output(mlflow_sqlite_uri, new_experiment(), run_id=uuid.uuid4().hex)
    logger = build(run_dir, {"type": "jsonl"}, mlflow, delivery={"close_timeout": 5})
    deadline = time.monotonic() + 60
    step = 0
    while not cannot_start(caplog):
        assert time.monotonic() < deadline
        logger.record("x", float(step))
        logger.dump(step)
        step += 1
        time.sleep(0.02)
    started = time.monotonic()
    logger.close()
    assert time.monotonic() - started < 2.5  # nothing is left to wait for
    # ...and close() itself says where the rows are and how to deliver them later.
    (queue,) = find_queues(run_dir)
    said = [
        r.getMessage() for r in caplog.records if "gave up on outputs.1 (mlflow)" in r.getMessage()
    ]
    assert len(said) == 1, caplog.text
    assert f"python -m tracklog replay {queue}" in said[0]
