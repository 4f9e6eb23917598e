"""Trainers killed with real signals: every row whose ``dump()`` returned is delivered.

Each test runs a real training process (:mod:`tests.crashing`) logging to JSONL,
TensorBoard, MLflow (a sqlite store) and W&B (offline), ends it with a real signal
(SIGKILL, SIGSEGV, SIGABRT, SIGHUP, SIGINT, SIGTERM) or an uncaught exception, waits
for its delivery process to exit on its own, and reads every backend back with its own
reader: ``MlflowClient``, W&B's run file (:func:`tracklog.readers.read_wandb_offline`),
TensorBoard's ``EventAccumulator`` and :func:`tracklog.readers.read_jsonl`. Nothing is
replayed by hand.

A trainer prints ``dumped <step>`` after each ``dump()`` returned, so the rows it
printed are the rows promised. It dumps one row at a time: what a backend holds is
always the first ``m`` rows, where ``m`` is the number printed, or one more (the dump
the signal cut short may or may not have been committed). The three backends of the
delivery process read the same queue, so they hold the same ``m``; JSONL, written by
the trainer itself, holds the printed rows or one more too. Steps increase, so a step
names one dump, and a row delivered twice shows as a repeated step in W&B and
TensorBoard (MLflow's SQL store keeps one point per key, step, timestamp and value).

Values are compared as ``repr`` of the float each backend keeps (exact, NaN as
``nan``, the sign of a zero kept): float64 in MLflow and JSONL, float32 in TensorBoard,
W&B's JSON (an integral float as an int, -0.0 as 0).
"""

from __future__ import annotations

import functools
import math
import random
import shutil
import signal
import string
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.crashing import (
    LOOP_KEYS,
    DeliveredRows,
    Dump,
    Plan,
    Trainer,
    alive,
    as_float32,
    duplicates,
    loop_values,
    mlflow_stored,
    read_back,
    run_script,
    wandb_steps,
)
from tests.rundirs import fresh_run_dir
from tests.strategies import SCALAR_KEYS
from tracklog import cli
from tracklog.readers import read_wandb_offline

# Seconds the delivery process may take to start the runs, deliver and exit after its
# trainer died (it takes 2-10 s: it may still be importing MLflow and W&B).
DELIVERY_EXIT = 120.0


@pytest.fixture(autouse=True)
def _no_download_progress_bars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


# Expected values, as each backend keeps them -----------------------------------------


def jsonl_kept(value: float) -> float:
    return value


def wandb_kept(value: float) -> float:
    return 0.0 if value == 0 else value  # W&B's JSON drops the sign of a zero


def column(
    dumps: Sequence[Dump], key: str, kept: Callable[[float], float]
) -> list[tuple[int, str]]:
    """``(step, repr(value))`` of every dump holding scalar ``key``, as a backend keeps it."""
    return [
        (dump["step"], repr(kept(dump["scalars"][key]))) for dump in dumps if key in dump["scalars"]
    ]


def as_read(points: Sequence[tuple[int, object]]) -> list[tuple[int, str]]:
    """What a backend returned, in the form of :func:`column`."""
    result = []
    for step, value in points:
        assert isinstance(value, int | float), (step, value)
        assert not isinstance(value, bool), (step, value)
        result.append((step, repr(float(value))))
    return result


def wandb_column(rows: DeliveredRows, key: str) -> list[tuple[int, object]]:
    return [
        (row.global_step, row.values[key])
        for row in rows.wandb.rows
        if key in row.values and row.global_step is not None
    ]


def jsonl_column(rows: DeliveredRows, key: str) -> list[tuple[int, object]]:
    return [(step, values[key]) for step, values in rows.jsonl if key in values]


# The check every test makes ------------------------------------------------------------


def assert_delivered(
    trainer: Trainer, dumps: Sequence[Dump], printed: Sequence[int], status: str
) -> DeliveredRows:
    """Every printed row is in every backend exactly once with its exact values; at most
    the one dump after them is there too; the run ended ``status``; the queue is gone."""
    plan = trainer.plan
    steps = [dump["step"] for dump in dumps]
    assert list(printed) == steps[: len(printed)], "the trainer printed rows out of order"
    stderr = trainer.stderr
    # No traceback but the one of the exception a trainer dies of (or Ctrl-C).
    died_of = stderr.count("RuntimeError: training blew up") + stderr.count("\nKeyboardInterrupt")
    assert stderr.count("Traceback") == died_of, stderr
    # What the delivery process reports when it gives a row or a run up. (close() may
    # time out on a loaded machine and say so: the delivery process goes on after.)
    for failure in (
        "could not be delivered in time",
        "was skipped for this output",
        "the delivery worker stopped",
        "tracklog: cannot deliver",
        "cannot start:",
        "still failing at the delivery deadline",
        "did not finish the run",
        "starting a new one",  # the delivery process died
    ):
        assert failure not in stderr, stderr
    # Everything delivered: the delivery process removed the queue (and spool/).
    assert not (plan.run_dir / "spool").exists(), sorted(plan.run_dir.rglob("spool/**/*"))

    keys = sorted({key for dump in dumps for key in dump["scalars"]})
    rows = read_back(plan, keys)
    wandb_steps = rows.wandb_steps()
    assert len(wandb_steps) == len(rows.wandb.rows), "a W&B row without global_step"
    assert not duplicates(wandb_steps), f"W&B holds rows twice: {duplicates(wandb_steps)}"
    m = len(wandb_steps)  # the number of rows the delivery process had in its queue
    assert len(printed) <= m <= min(len(printed) + 1, len(dumps)), (
        f"printed {len(printed)} rows, W&B holds {m}: {wandb_steps}"
    )
    assert wandb_steps == steps[:m], "W&B holds rows out of order"
    delivered = list(dumps[:m])
    jsonl_steps = [step for step, _ in rows.jsonl]
    assert not duplicates(jsonl_steps), f"JSONL holds rows twice: {duplicates(jsonl_steps)}"
    # A dump cut short may have reached JSONL and not the queue, or (a KeyboardInterrupt
    # in the JSONL write: the other outputs still get the row) the other way round.
    printed_steps = list(printed)
    assert jsonl_steps in (printed_steps, steps[: len(printed) + 1]), jsonl_steps
    for key in keys:
        assert as_read(rows.mlflow[key]) == column(delivered, key, mlflow_stored), f"MLflow {key}"
        assert as_read(rows.tensorboard[key]) == column(delivered, key, as_float32), f"TB {key}"
        assert as_read(wandb_column(rows, key)) == column(delivered, key, wandb_kept), f"W&B {key}"
        written = dumps[: len(jsonl_steps)]
        assert as_read(jsonl_column(rows, key)) == column(written, key, jsonl_kept), f"JSONL {key}"
    # Each point is the dump's own row, not one made again: it carries the dump's time.
    dumped_at = dict(zip(jsonl_steps, rows.jsonl_timestamps, strict=True))
    delivered_steps = set(steps[:m])
    expected_times = sorted((step, dumped_at[step]) for step in delivered_steps & set(dumped_at))
    assert [t for t in rows.tensorboard_times if t[0] in dumped_at] == expected_times
    expected_ms = [(step, int(stamp * 1000)) for step, stamp in expected_times]
    assert [t for t in rows.mlflow_times if t[0] in dumped_at] == expected_ms
    with_text = [dump["step"] for dump in delivered if "text" in dump]
    with_hist = [dump["step"] for dump in delivered if "hist" in dump]
    assert rows.tensorboard_texts == with_text
    assert rows.tensorboard_histograms == with_hist
    assert [row.global_step for row in rows.wandb.rows if "notes" in row.values] == with_text
    assert [row.global_step for row in rows.wandb.rows if "weights" in row.values] == with_hist
    expected_text = [
        f"[step {dump['step']}] {dump['text']}" for dump in delivered if "text" in dump
    ]
    assert rows.mlflow_text == expected_text
    assert rows.mlflow_histogram_files == sorted(f"step_{step}.npy" for step in with_hist)
    assert rows.mlflow_status == status
    return rows


def run_until_signalled(trainer: Trainer, after: int, signum: int, delay: float = 0.0) -> int:
    """Wait for ``after`` dumps, send ``signum``; the trainer's exit status."""
    trainer.wait_until_ready()
    trainer.wait_for_dumps(after)
    if delay:
        time.sleep(delay)
    trainer.signal(signum)
    return trainer.finish()


# 1. A fatal signal at any point of any dump sequence -------------------------------------

scalar_values = st.floats()  # NaN, ±inf, -0.0, subnormals, beyond float32
texts = st.text(alphabet=string.ascii_letters + string.digits + " ", min_size=1, max_size=16)
histograms = st.lists(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=1, max_size=4
)
# SIGKILL (the OOM killer, SLURM after its grace period), a native crash, a closed
# terminal: all end the process at once. Ctrl-C is a KeyboardInterrupt: the exit hook
# closes the logger, as KILLED.
FATAL_SIGNALS = (
    signal.SIGKILL,
    signal.SIGKILL,
    signal.SIGSEGV,
    signal.SIGABRT,
    signal.SIGHUP,
    signal.SIGINT,
)


@dataclass(frozen=True)
class Crash:
    dumps: list[Dump]  # at increasing steps
    kill_after: int  # dumped lines to read before the signal: 0 (at once) to all
    signum: int
    pause: float  # seconds between dumps
    warm: bool  # the delivery process started the runs before the first dump


@st.composite
def crashes(draw: st.DrawFn) -> Crash:
    count = draw(st.integers(min_value=1, max_value=8))
    step = draw(st.integers(min_value=-(2**40), max_value=2**40))
    dumps: list[Dump] = []
    for index in range(count):
        if index:
            step += draw(st.integers(min_value=1, max_value=2**20))
        keys = draw(st.lists(st.sampled_from(SCALAR_KEYS), min_size=1, max_size=3, unique=True))
        dump: Dump = {"step": step, "scalars": {key: draw(scalar_values) for key in keys}}
        extra = draw(st.sampled_from(["", "", "", "text", "hist"]))
        if extra == "text":
            dump["text"] = draw(texts)
        elif extra == "hist":
            dump["hist"] = draw(histograms)
        dumps.append(dump)
    return Crash(
        dumps,
        kill_after=draw(st.integers(min_value=0, max_value=count)),
        signum=draw(st.sampled_from(FATAL_SIGNALS)),
        pause=draw(st.sampled_from([0.0, 0.005, 0.05])),
        warm=draw(st.booleans()),
    )


@settings(
    max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(crash=crashes())
@example(
    crash=Crash(
        [
            {"step": 0, "scalars": {"a": math.nan, "x-y": -0.0}, "text": "first"},
            {"step": 1, "scalars": {"a": math.inf, "train/loss": 5e-324}, "hist": [1.0, 2.5]},
            {"step": 7, "scalars": {"a": -math.inf, "x-y": 1e300, "train/loss": 1 / 3}},
        ],
        kill_after=2,
        signum=signal.SIGKILL,
        pause=0.05,
        warm=True,
    )
)
def test_every_row_printed_before_a_fatal_signal_is_delivered_exactly_once(
    mlflow_sqlite_uri: str, crash: Crash
) -> None:
    with fresh_run_dir() as run_dir:
        plan = Plan(
            run_dir=run_dir,
            tracking_uri=mlflow_sqlite_uri,
            experiment=f"crash-{uuid.uuid4().hex[:12]}",
            dumps=crash.dumps,
            pause=crash.pause,
            warm=crash.warm,
        )
        trainer = Trainer(plan, run_dir.parent / "trainer")
        try:
            code = run_until_signalled(trainer, crash.kill_after, crash.signum)
            # Ctrl-C too: Python ends by SIGINT after the exit hook closed the logger.
            assert code == -crash.signum, trainer.stderr
            trainer.wait_for_delivery_exit(DELIVERY_EXIT)
        finally:
            trainer.cleanup()
        rows = assert_delivered(trainer, crash.dumps, trainer.printed, "KILLED")
        if crash.signum == signal.SIGINT:
            assert rows.wandb.exit_code == 130
        else:
            assert rows.wandb.exit_code not in (None, 0)


# 2 and 3. A high dump rate, an uncaught exception, SIGTERM, a forked child -------------
#
# Five trainers at once (each pays seconds of imports, and its delivery process more):
# three SIGKILLed at a random moment while dumping as fast as they can (the last with a
# forked child that lives on), one that dies of an uncaught exception, one SIGTERMed.
# The tests then check what each left behind.

FAST_SEEDS = (1, 2, 3)
RAISE_AFTER = 25  # dumps
SIGTERM_AFTER = 40  # dumps
FORKS = 3  # the seed whose trainer forks a child


def loop_dumps(count: int) -> list[Dump]:
    return [{"step": step, "scalars": loop_values(step)} for step in range(count)]


@dataclass
class Ended:
    """A trainer that ended, its delivery process gone."""

    trainer: Trainer
    code: int
    printed: list[int]
    waited_for: int  # dumped lines read before the signal
    child_outlived: bool = False  # its forked child was alive once delivery had exited


def new_plan(folder: Path, template: Path, **options: Any) -> Plan:
    """A plan logging under ``folder``, to an MLflow store of its own: a copy of
    ``template``, whose tables exist (five delivery processes writing one sqlite file
    would wait on each other's locks, and creating the tables takes seconds)."""
    folder.mkdir(parents=True)
    store = folder / "mlflow.db"
    shutil.copyfile(template, store)
    return Plan(
        run_dir=folder / "run",
        tracking_uri=f"sqlite:///{store}",
        experiment=f"crash-{folder.name}",
        **options,
    )


def sigkill_while_dumping_fast(trainer: Trainer, seed: int) -> Ended:
    rng = random.Random(seed)
    after, delay = rng.randint(200, 1000), rng.uniform(0.0, 0.05)
    code = run_until_signalled(trainer, after, signal.SIGKILL, delay)
    trainer.wait_for_delivery_exit(DELIVERY_EXIT)
    outlived = trainer.child is not None and alive(trainer.child)
    return Ended(trainer, code, trainer.printed, after, outlived)


def raise_after_dumps(trainer: Trainer) -> Ended:
    trainer.wait_until_ready()
    code = trainer.finish()
    trainer.wait_for_delivery_exit(DELIVERY_EXIT)
    return Ended(trainer, code, trainer.printed, 0)


def sigterm_while_dumping(trainer: Trainer) -> Ended:
    code = run_until_signalled(trainer, SIGTERM_AFTER, signal.SIGTERM)
    trainer.wait_for_delivery_exit(DELIVERY_EXIT)
    return Ended(trainer, code, trainer.printed, SIGTERM_AFTER)


@pytest.fixture(scope="module")
def ended(
    mlflow_sqlite_uri: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Ended | BaseException]:
    """The five trainers, each run to its end on a thread of its own."""
    from mlflow import MlflowClient

    MlflowClient(mlflow_sqlite_uri).search_experiments(max_results=1)  # creates the tables
    template = Path(mlflow_sqlite_uri.removeprefix("sqlite:///"))
    assert template.is_file(), mlflow_sqlite_uri
    root = tmp_path_factory.mktemp("crash")
    scenarios: dict[str, tuple[Trainer, Callable[[Trainer], Ended]]] = {}
    try:
        for seed in FAST_SEEDS:
            name = f"fast{seed}"
            # warm: killed while its delivery process is delivering
            plan = new_plan(root / name, template, loop=True, warm=True, fork_child=seed == FORKS)
            scenarios[name] = (
                Trainer(plan, root / name / "trainer"),
                functools.partial(sigkill_while_dumping_fast, seed=seed),
            )
        plan = new_plan(root / "raise", template, dumps=loop_dumps(RAISE_AFTER), then="raise")
        scenarios["raise"] = (Trainer(plan, root / "raise" / "trainer"), raise_after_dumps)
        plan = new_plan(root / "sigterm", template, loop=True)  # SIGTERM mostly inside dump()
        scenarios["sigterm"] = (Trainer(plan, root / "sigterm" / "trainer"), sigterm_while_dumping)
        with ThreadPoolExecutor(len(scenarios)) as pool:
            futures = {
                name: pool.submit(run, trainer) for name, (trainer, run) in scenarios.items()
            }
            # A scenario that failed fails its own test only.
            return {name: future.exception() or future.result() for name, future in futures.items()}
    finally:
        for trainer, _ in scenarios.values():
            trainer.cleanup()


def outcome(ended: dict[str, Ended | BaseException], name: str) -> Ended:
    result = ended[name]
    if isinstance(result, BaseException):
        raise result
    return result


@pytest.mark.parametrize("seed", FAST_SEEDS)
def test_a_sigkill_at_a_high_dump_rate_loses_and_repeats_nothing(
    ended: dict[str, Ended | BaseException], seed: int
) -> None:
    result = outcome(ended, f"fast{seed}")
    assert result.code == -signal.SIGKILL, result.trainer.stderr
    printed = result.printed
    assert len(printed) >= result.waited_for
    rows = assert_delivered(result.trainer, loop_dumps(len(printed) + 1), printed, "KILLED")
    assert set(rows.mlflow) == set(LOOP_KEYS)
    assert rows.wandb.exit_code not in (None, 0)
    # The rate it dumped at, by the rows' own timestamps (-s shows it).
    stamps = rows.jsonl_timestamps
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    print(f"seed {seed}: {len(printed)} rows printed at {rate:.0f} dumps/s")


def test_an_uncaught_exception_ends_the_run_failed_with_every_row(
    ended: dict[str, Ended | BaseException],
) -> None:
    result = outcome(ended, "raise")
    stderr = result.trainer.stderr
    assert result.code == 1, stderr
    assert "RuntimeError: training blew up" in stderr
    assert result.printed == list(range(RAISE_AFTER))
    rows = assert_delivered(result.trainer, loop_dumps(RAISE_AFTER), result.printed, "FAILED")
    assert len(rows.wandb.rows) == RAISE_AFTER
    assert rows.wandb.exit_code == 1


def test_sigterm_exits_143_and_ends_the_run_killed_with_every_row(
    ended: dict[str, Ended | BaseException],
) -> None:
    result = outcome(ended, "sigterm")
    assert result.code == 143, result.trainer.stderr  # SystemExit(128 + SIGTERM)
    printed = result.printed
    assert len(printed) >= SIGTERM_AFTER
    rows = assert_delivered(result.trainer, loop_dumps(len(printed) + 1), printed, "KILLED")
    assert rows.wandb.exit_code == 143


def test_a_forked_child_that_outlives_its_trainer_does_not_hold_delivery_back(
    ended: dict[str, Ended | BaseException],
) -> None:
    # The child inherited the trainer's end of the delivery process's stdin: tracklog
    # must have closed it there, or the delivery process would wait for the child.
    result = outcome(ended, f"fast{FORKS}")  # it exited: wait_for_delivery_exit passed
    assert result.trainer.child is not None
    assert result.child_outlived, "the forked child did not outlive the delivery process"


# A job killed whole: the delivery process and W&B's service with the trainer ------------
def test_a_job_killed_whole_while_it_dumps_loses_no_row_in_wandb(
    tmp_path: Path, mlflow_sqlite_uri: str
) -> None:
    """SLURM's end of a job: SIGKILL to the trainer, its delivery process and W&B's
    service at once, while rows stream. W&B's service writes its file every 0.1 s, and
    the queue's ack of a W&B row used to come as soon as W&B's SDK took it: the rows
    acked but not written yet (8-18 of them at 500 dumps/s) were lost, and no replay
    sent them again. Now a W&B row is acked once the file has it."""
    run_dir = tmp_path / "run"
    trainer = Trainer(
        Plan(
            run_dir,
            mlflow_sqlite_uri,
            f"wandb-killed-{uuid.uuid4().hex}",
            loop=True,
            pause=0.002,  # some 300 dumps/s: W&B keeps up, so rows stream through it
            warm=True,
        ),
        tmp_path / "trainer",
    )
    try:
        trainer.wait_until_ready()
        assert trainer.delivery is not None
        trainer.wait_for_dumps(600)
        whole = [trainer.delivery, *trainer.delivery.children(recursive=True)]
        assert any(process.name() == "wandb-core" for process in whole)
        for process in whole:
            process.kill()
        trainer.signal(signal.SIGKILL)
        trainer.finish()
        trainer.wait_for_delivery_exit()
    finally:
        trainer.cleanup()
    printed = trainer.printed
    (left,) = (run_dir / "spool").iterdir()
    assert cli.main(["replay", str(left), "--timeout", "120"]) == 0
    logged = wandb_steps(run_dir)
    assert not duplicates(logged), duplicates(logged)
    missing = sorted(set(printed) - set(logged))
    assert not missing, f"{len(missing)} of {len(printed)} rows lost: {missing[:20]}"


# A replay killed whole right before its W&B ack --------------------------------------------
KILLED_BEFORE_THE_WANDB_ACK = """
import os, signal, sys
import psutil
from tracklog import _queue, cli

acknowledge = _queue.Queue.ack


def ack(queue, consumer, seq, **marks):
    if consumer.endswith("-wandb"):  # its rows are in W&B's file: kill before the ack
        for child in psutil.Process().children(recursive=True):  # W&B's service
            child.kill()
        os.kill(os.getpid(), signal.SIGKILL)
    acknowledge(queue, consumer, seq, **marks)


_queue.Queue.ack = ack
sys.exit(cli.main(["replay", sys.argv[1], "--timeout", "60"]))
"""


def test_a_replay_killed_whole_before_its_wandb_ack_leaves_each_row_in_wandb_once(
    tmp_path: Path, mlflow_sqlite_uri: str
) -> None:
    """A replay (W&B's service with it) killed once W&B's file had a batch and before
    the queue's ack of it; then a second replay. That one used to log the batch again
    (W&B keeps both); it now skips the rows the run's earlier file ends with. The kill
    is injected at the ack (the only fake)."""
    run_dir = tmp_path / "run"
    steps = range(30)
    dumps: list[Dump] = [{"step": step, "scalars": {"loss": float(step)}} for step in steps]
    trainer = Trainer(
        Plan(run_dir, mlflow_sqlite_uri, f"wandb-ack-{uuid.uuid4().hex}", dumps, warm=True),
        tmp_path / "trainer",
    )
    left = trainer.die_undelivered(len(steps))  # warm: the W&B run exists
    killed = run_script(KILLED_BEFORE_THE_WANDB_ACK, left)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert cli.main(["replay", str(left), "--timeout", "120"]) == 0
    logged = wandb_steps(run_dir)
    assert sorted(logged) == list(steps), duplicates(logged)


# W&B's service killed while the trainer and its delivery process live -----------------------
SERVICE_KILLED_TRAINER = """
import sys, time
import psutil, wandb
import tracklog
from tracklog._service import service

run_dir, elsewhere = sys.argv[1], sys.argv[2]
# The training script's own W&B run, as many have: W&B then tells child processes
# where its service is (WANDB_SERVICE).
own = wandb.init(project="own", mode="offline", dir=elsewhere, reinit="create_new",
                 settings=wandb.Settings(silent=True, console="off"))
logger = tracklog.build_logger({
    "run_dir": run_dir,
    "outputs": [{"type": "wandb", "project": "crash-tests", "mode": "offline"}],
    "delivery": {"retry_initial": 0.1, "retry_max": 0.5},
})
for step in range(20):
    logger.record("loss", float(step))
    logger.dump(step)
assert logger.flush(timeout=60)
children = psutil.Process(service().pid).children(recursive=True)
(core,) = [child for child in children if child.name() == "wandb-core"]  # its own
core.kill()  # the OOM killer's choice
deadline = time.monotonic() + 10
while core.is_running() and core.status() != psutil.STATUS_ZOMBIE:
    assert time.monotonic() < deadline
    time.sleep(0.02)
for step in range(20, 40):
    logger.record("loss", float(step))
    logger.dump(step)
logger.info("after the service died")
assert logger.flush(timeout=60)
logger.close()
own.finish()
"""


def test_wandb_service_killed_under_a_live_run_is_restarted_and_loses_no_row(
    tmp_path: Path,
) -> None:
    """The OOM killer takes W&B's service (`wandb-core`), a child of the delivery
    process, while training goes on. Every later W&B row used to be skipped, one error
    each, as if the row were bad. Now the output starts a new service, continues the
    same run in a new offline folder, and sends the failed batch again: each row once.

    The trainer runs a W&B run of its own, and the delivery process used to inherit
    WANDB_SERVICE and send its rows through the trainer's service instead of its own."""
    run_dir = tmp_path / "run"
    trainer = run_script(SERVICE_KILLED_TRAINER, run_dir, tmp_path)
    assert trainer.returncode == 0, trainer.stderr[-3000:]
    logged = wandb_steps(run_dir)
    assert sorted(logged) == list(range(40)), duplicates(logged)
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2
    assert any("after the service died" in read_wandb_offline(f).console for f in folders)
