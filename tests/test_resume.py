"""One run across preemption (``resume``), and a reused run_dir that never merges two runs.

A trainer killed with SIGTERM (SLURM's preemption) or SIGKILL, restarted from its last
checkpoint with ``resume: auto``, is one run in every backend, read back with each
backend's own reader: MLflow's client, the W&B offline run files, TensorBoard's
EventAccumulator, the JSONL file. Without ``resume``, a second run in the same run_dir
goes to ``<run_dir>_2``.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tracklog
from tests.crashing import Dump, Plan, Trainer, as_float32, child_env
from tests.servers import MlflowServer
from tests.tensorboard_readback import read_events, scalars
from tracklog import cli
from tracklog.readers import read_jsonl, read_wandb_offline

#: The first process dumps steps 1-10 and dies; the checkpoint it restarts from was
#: saved at step 6, so the second process dumps steps 7-15 again from there.
FIRST = range(1, 11)
CHECKPOINT = 6
SECOND = range(CHECKPOINT + 1, 16)


def _loss(step: int, process: int) -> float:
    return step + 0.25 * process  # which process logged a point shows in its value


def _dumps(steps: range, process: int) -> list[Dump]:
    return [{"step": step, "scalars": {"loss": _loss(step, process)}} for step in steps]


def _restart_and_close(plan: Plan, tmp_path: Path) -> None:
    """The restarted process: resumes, dumps ``plan``'s rows, closes, and its delivery
    process is gone when this returns."""
    second = Trainer(replace(plan, then="close", resume="auto"), tmp_path / "second")
    try:
        second.wait_until_ready()
        assert second.finish() == 0, second.stderr
        second.wait_for_delivery_exit()
    finally:
        second.cleanup()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_run_killed_and_restarted_from_its_checkpoint_is_one_run_in_every_backend(
    tmp_path: Path, mlflow_sqlite_uri: str, signum: signal.Signals
) -> None:
    from mlflow import MlflowClient

    run_dir = tmp_path / "run"
    experiment = f"resume-{signum.name}"
    first = Trainer(
        Plan(run_dir, mlflow_sqlite_uri, experiment, _dumps(FIRST, 1), resume="auto"),
        tmp_path / "first",
    )
    try:
        first.wait_until_ready()
        first.wait_for_dumps(len(FIRST))
        first.signal(signum)
        first.finish()
        first.wait_for_delivery_exit()
    finally:
        first.cleanup()
    _restart_and_close(Plan(run_dir, mlflow_sqlite_uri, experiment, _dumps(SECOND, 2)), tmp_path)

    everything = [(s, _loss(s, 1)) for s in FIRST] + [(s, _loss(s, 2)) for s in SECOND]
    # MLflow: one run, FINISHED by the second process; the steps both processes logged
    # hold both points (MLflow keeps every point; it has no way to drop one).
    client = MlflowClient(mlflow_sqlite_uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1, [run.info.run_id for run in runs]
    assert runs[0].info.status == "FINISHED"
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    assert sorted((p.step, p.value) for p in history) == sorted(everything)

    # W&B: one run id in both processes' offline files; every row is kept, at its
    # global_step (W&B's own _step only counts rows, so none is refused).
    wandb_runs = [read_wandb_offline(d) for d in sorted((run_dir / "wandb").glob("offline-run-*"))]
    assert len(wandb_runs) == 2
    assert wandb_runs[0].run_id == wandb_runs[1].run_id
    wandb_points = sorted(
        (row.global_step, row.values["loss"]) for run in wandb_runs for row in run.rows
    )
    assert wandb_points == sorted(everything)

    # TensorBoard: the second process marks its restart (SessionLog.START at step 7),
    # so TensorBoard shows its points from there on, not the first process's.
    tensorboard = scalars(read_events(run_dir / "tensorboard"), "loss")
    shown = [(s, _loss(s, 1)) for s in range(1, CHECKPOINT + 1)] + [
        (s, _loss(s, 2)) for s in SECOND
    ]
    assert tensorboard == [(step, as_float32(value)) for step, value in shown]

    # JSONL: one file, both processes' rows in the order they were logged.
    rows = read_jsonl(run_dir / "progress.jsonl")
    assert [(row.step, row.values["loss"]) for row in rows] == everything

    record = json.loads((run_dir / "tracklog.json").read_text(encoding="utf-8"))
    assert len(record["resumed"]) == 1
    assert not (tmp_path / "run_2").exists()


def _build(run_dir: Path, resume: str = "never", **extra: object) -> tracklog.Logger:
    outputs = [{"type": "jsonl"}, {"type": "csv"}, {"type": "file", "path": "train.log"}]
    return tracklog.build_logger(
        {"run_dir": run_dir, "resume": resume, "outputs": outputs, **extra}
    )


def _read(run_dir: Path) -> tuple[list[int], list[int]]:
    """The steps in run_dir's JSONL and CSV files."""
    jsonl = [row.step for row in read_jsonl(run_dir / "progress.jsonl")]
    with open(run_dir / "progress.csv", newline="", encoding="utf-8") as file:
        csv_steps = [int(row["_step"]) for row in csv.DictReader(file)]
    return jsonl, csv_steps


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.sampled_from(["never", "auto"]), st.integers(min_value=1, max_value=3)),
        min_size=1,
        max_size=5,
    )
)
def test_runs_in_one_run_dir_never_merge_and_resume_continues_the_first(
    runs: list[tuple[str, int]],
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder) / "run"
        expected: dict[Path, list[int]] = {}
        step = 0
        for number, (resume, dumps) in enumerate(runs):
            if number == 0 or resume == "auto":
                target = base  # the first run, or a resume of it
            else:
                target = base.with_name(f"run_{len(expected) + 1}")  # _2, _3, ...
            logger = _build(base, resume)
            assert Path(logger.get_dir() or "") == target
            for _ in range(dumps):
                step += 1
                logger.record("step_value", step)
                logger.dump(step)
            logger.close()
            expected.setdefault(target, []).extend(range(step - dumps + 1, step + 1))
        found = sorted(Path(folder).iterdir())
        assert found == sorted(expected)
        for run_dir, steps in expected.items():
            assert _read(run_dir) == (steps, steps)
            log = (run_dir / "train.log").read_text(encoding="utf-8")
            assert log.count("| step_value") == len(steps)


def test_a_second_run_says_where_it_writes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tmp_path / "run"
    _build(base).close()
    second = tracklog.build_logger(
        {"run_dir": base, "outputs": [{"type": "console"}, {"type": "jsonl"}]}
    )
    second.close()
    out = capsys.readouterr().out
    assert f"{base} holds an earlier run; this run writes to {base}_2" in out
    assert "resume: auto continues that one" in out


def test_resume_must_refuses_a_run_dir_without_a_run_and_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"resume: must, but run_dir .* holds no tracklog run"):
        _build(tmp_path / "run", "must")
    assert list(tmp_path.iterdir()) == []
    first = _build(tmp_path / "run", "auto")  # auto starts one
    first.record("a", 1)
    first.dump(1)
    first.close()
    again = _build(tmp_path / "run", "must")
    again.record("a", 2)
    again.dump(2)
    again.close()
    assert _read(tmp_path / "run") == ([1, 2], [1, 2])


@pytest.mark.parametrize("damage", ["garbage", "symlink", "other format"])
def test_a_run_file_that_is_not_one_is_refused_naming_it(tmp_path: Path, damage: str) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = run_dir / "tracklog.json"
    if damage == "garbage":
        path.write_bytes(b"\x80not json")
    elif damage == "symlink":
        (tmp_path / "elsewhere.json").write_text('{"format": 1, "run": "x", "outputs": {}}')
        os.symlink(tmp_path / "elsewhere.json", path)
    else:
        path.write_text('{"format": 99, "run": "x", "outputs": {}}')
    with pytest.raises(ValueError, match=rf"{path}"):
        _build(run_dir, "auto")
    assert sorted(p.name for p in run_dir.iterdir()) == ["tracklog.json"]
    # Without resume the file is not read: the run goes to a new version.
    logger = _build(run_dir)
    assert logger.get_dir() == f"{run_dir}_2"
    logger.close()


def test_an_output_file_outside_run_dir_that_holds_an_earlier_run_is_refused(
    tmp_path: Path,
) -> None:
    outside = tmp_path / "shared.jsonl"
    settings = {
        "run_dir": tmp_path / "run",
        "outputs": [{"type": "csv"}, {"type": "jsonl", "path": outside}],
    }
    first = tracklog.build_logger(settings)
    first.record("a", 1)
    first.dump(1)
    first.close()
    with pytest.raises(
        ValueError, match=r"outputs\.1\.jsonl\.path: .*shared\.jsonl holds an earlier run"
    ):
        tracklog.build_logger(settings)
    assert [row.step for row in read_jsonl(outside)] == [1]


def test_configure_twice_in_one_folder_gives_two_runs_with_their_own_tensorboard_files(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "sb3"
    for step in (1, 2):
        logger = tracklog.configure(str(folder), ["csv", "tensorboard"])
        logger.record("x", float(step))
        logger.dump(step)
        logger.close()
    assert scalars(read_events(folder), "x") == [(1, 1.0)]
    assert scalars(read_events(Path(f"{folder}_2")), "x") == [(2, 2.0)]


def test_a_dump_at_step_0_before_training_does_not_hide_the_earlier_run_in_tensorboard(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    settings = {"run_dir": run_dir, "resume": "auto", "outputs": [{"type": "tensorboard"}]}
    with tracklog.build_logger(settings) as first:
        for step in FIRST:
            first.record("loss", _loss(step, 1))
            first.dump(step)
    with tracklog.build_logger(settings) as second:
        second.record("config/lr", 1e-3)
        second.dump(0)  # settings logged before training restarts from step 7
        for step in SECOND:
            second.record("loss", _loss(step, 2))
            second.dump(step)
    shown = [(s, _loss(s, 1)) for s in range(1, CHECKPOINT + 1)] + [
        (s, _loss(s, 2)) for s in SECOND
    ]
    assert scalars(read_events(run_dir / "tensorboard"), "loss") == [
        (step, as_float32(value)) for step, value in shown
    ]


def test_an_output_added_before_mlflow_still_continues_the_same_mlflow_run(
    tmp_path: Path, mlflow_sqlite_uri: str
) -> None:
    from mlflow import MlflowClient

    mlflow = {"type": "mlflow", "tracking_uri": mlflow_sqlite_uri, "experiment": "added"}
    run_dir = tmp_path / "run"
    with tracklog.build_logger({"run_dir": run_dir, "outputs": [mlflow]}) as first:
        first.record("a", 1.0)
        first.dump(1)
    resumed = {"run_dir": run_dir, "resume": "auto", "outputs": [{"type": "jsonl"}, mlflow]}
    with tracklog.build_logger(resumed) as second:
        second.record("a", 2.0)
        second.dump(2)
    client = MlflowClient(mlflow_sqlite_uri)
    experiment = client.get_experiment_by_name("added")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert sorted((p.step, p.value) for p in client.get_metric_history(run.info.run_id, "a")) == [
        (1, 1.0),
        (2, 2.0),
    ]


def test_a_run_file_of_an_earlier_tracklog_continues_its_run_and_gains_what_it_lacked(
    tmp_path: Path, mlflow_sqlite_uri: str
) -> None:
    # A run file written before MLflow's identity kept artifact_root: the resumed run is
    # still the one its run_key names, and its artifacts get a root from this process.
    from mlflow import MlflowClient

    mlflow = {"type": "mlflow", "tracking_uri": mlflow_sqlite_uri, "experiment": "older"}
    run_dir = tmp_path / "run"
    with tracklog.build_logger({"run_dir": run_dir, "outputs": [mlflow]}) as first:
        first.record("a", 1.0)
        first.dump(1)
    path = run_dir / "tracklog.json"
    record = json.loads(path.read_text(encoding="utf-8"))
    (name,) = [name for name, kept in record["outputs"].items() if "run_key" in kept]
    run_key = record["outputs"][name]["run_key"]
    del record["outputs"][name]["artifact_root"]
    path.write_text(json.dumps(record), encoding="utf-8")

    with tracklog.build_logger({"run_dir": run_dir, "resume": "auto", "outputs": [mlflow]}) as log:
        log.record("a", 2.0)
        log.dump(2)
    kept = json.loads(path.read_text(encoding="utf-8"))["outputs"][name]
    assert kept == {"run_key": run_key, "artifact_root": str(tmp_path / "mlruns")}
    client = MlflowClient(mlflow_sqlite_uri)
    experiment = client.get_experiment_by_name("older")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.tags["tracklog.run_key"] == run_key
    assert sorted(p.step for p in client.get_metric_history(run.info.run_id, "a")) == [1, 2]


def test_versions_skip_names_taken_by_a_file_or_a_symlink(tmp_path: Path) -> None:
    base = tmp_path / "run"
    _build(base).close()
    (tmp_path / "run_2").write_text("not a folder")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, tmp_path / "run_3")
    logger = _build(base)
    assert logger.get_dir() == str(tmp_path / "run_4")
    logger.close()
    assert list(elsewhere.iterdir()) == []


def test_a_run_dir_of_dot_gets_a_numbered_version_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "here"
    folder.mkdir()
    monkeypatch.chdir(folder)
    _build(Path(".")).close()
    logger = _build(Path("."))
    assert logger.get_dir() == str(tmp_path / "here_2")
    logger.close()


def test_a_refused_build_claims_no_version(tmp_path: Path) -> None:
    outside = tmp_path / "shared.csv"
    settings = {"run_dir": tmp_path / "run", "outputs": [{"type": "csv", "path": outside}]}
    tracklog.build_logger(settings).close()
    outside.write_text("_step,_timestamp\n")  # written by that earlier run
    for _ in range(2):
        with pytest.raises(ValueError, match="holds an earlier run"):
            tracklog.build_logger(settings)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "shared.csv"]


RESUMER = r"""
import os, sys, time
from pathlib import Path
import tracklog
from tracklog._outbox import RunDirBusyError

run_dir, go = Path(sys.argv[1]), Path(sys.argv[2])
(go.parent / f"ready-{os.getpid()}").touch()
while not go.exists():
    time.sleep(0.001)
settings = {"run_dir": str(run_dir), "resume": "auto", "outputs": [{"type": "jsonl"}]}
try:
    logger = tracklog.build_logger(settings)
except RunDirBusyError:
    print("busy", flush=True)
    sys.exit(0)
start = time.time()
logger.record("a", 1.0)
logger.dump(1)
time.sleep(1.0)
end = time.time()
logger.close()
print("ok", start, end, flush=True)
"""


def test_processes_resuming_one_run_at_once_never_hold_it_together(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _build(run_dir, "auto").close()
    script = tmp_path / "resume.py"
    script.write_text(RESUMER)
    go = tmp_path / "go"
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), str(run_dir), str(go)],
            stdout=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        for _ in range(8)
    ]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < len(processes):  # imported, waiting for go
        assert all(process.poll() is None for process in processes), "a resumer exited early"
        assert time.monotonic() < deadline, "the resumers did not all start"
        time.sleep(0.02)
    go.touch()
    held: list[tuple[float, float]] = []
    for process in processes:
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0
        words = out.split()
        if words[0] == "ok":
            held.append((float(words[1]), float(words[2])))
        else:
            assert words == ["busy"]
    assert held
    held.sort()
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(held)), held
    assert not (tmp_path / "run_2").exists()


def test_resuming_into_another_mlflow_experiment_says_a_new_run_starts(
    tmp_path: Path, mlflow_sqlite_uri: str
) -> None:
    from mlflow import MlflowClient

    run_dir = tmp_path / "run"

    def settings(experiment: str) -> dict[str, object]:
        mlflow = {"type": "mlflow", "tracking_uri": mlflow_sqlite_uri, "experiment": experiment}
        return {"run_dir": run_dir, "resume": "auto", "outputs": [mlflow]}

    with tracklog.build_logger(settings("resume-before")) as first:
        first.record("a", 1.0)
        first.dump(1)
    second = tracklog.build_logger(settings("resume-after"))
    second.record("a", 2.0)
    second.dump(2)
    with pytest.warns(UserWarning, match=r"not in experiment resume-after .* a new run is started"):
        second.close()  # hears what the delivery process said
    client = MlflowClient(mlflow_sqlite_uri)
    for name, value in (("resume-before", 1.0), ("resume-after", 2.0)):
        experiment = client.get_experiment_by_name(name)
        assert experiment is not None
        (run,) = client.search_runs([experiment.experiment_id])
        assert run.data.metrics["a"] == value


def _noted(steps: range, process: int) -> list[Dump]:
    return [
        {"step": step, "scalars": {"loss": _loss(step, process)}, "text": f"p{process} {step}"}
        for step in steps
    ]


def test_a_dead_jobs_rows_replayed_after_the_restart_stay_hidden_behind_its_restart_in_tensorboard(
    tmp_path: Path, mlflow_sqlite_uri: str
) -> None:
    """A job killed whole while its delivery process was stopped leaves rows that never
    reached TensorBoard; its restart marks its restart at step 7 (SessionLog.START) and
    closes; then the dead job's queue is replayed. TensorBoard shows the dead job's
    points before the checkpoint and the restart's from there on, as when nothing was
    left to replay. The replayed rows used to land in a file read after the restart's
    marker, so the dead job's steps 7-10 showed beside the restart's."""
    run_dir = tmp_path / "run"
    experiment = f"resume-tensorboard-{os.getpid()}-{time.monotonic_ns()}"
    first = Trainer(
        Plan(run_dir, mlflow_sqlite_uri, experiment, _dumps(FIRST, 1), warm=True, resume="auto"),
        tmp_path / "first",
    )
    left = first.die_undelivered(len(FIRST))
    _restart_and_close(Plan(run_dir, mlflow_sqlite_uri, experiment, _dumps(SECOND, 2)), tmp_path)
    assert cli.main(["replay", str(left), "--timeout", "120"]) == 0
    assert not left.exists()

    tensorboard = scalars(read_events(run_dir / "tensorboard"), "loss")
    shown = [(s, _loss(s, 1)) for s in range(1, CHECKPOINT + 1)] + [
        (s, _loss(s, 2)) for s in SECOND
    ]
    assert tensorboard == [(step, as_float32(value)) for step, value in shown]


def test_a_dead_jobs_queue_replayed_after_the_restart_leaves_the_run_to_the_restart(
    tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    """A job killed whole (trainer and delivery process: SLURM's SIGKILL) while MLflow did
    not answer leaves a queue; its restart resumes the run and ends it FINISHED; then the
    dead job's queue is replayed. Its rows go into the same run, but the run's status
    and text files stay the restart's: the replay used to end the run KILLED and put the
    dead job's copy of text/notes.txt over the restart's."""
    from mlflow import MlflowClient

    run_dir = tmp_path / "run"
    experiment = f"resume-replay-{os.getpid()}-{time.monotonic_ns()}"
    first = Trainer(
        Plan(run_dir, mlflow_server.url, experiment, _noted(FIRST, 1), warm=True, resume="auto"),
        tmp_path / "first",
    )
    try:
        first.wait_until_ready()  # warm: its MLflow run exists
        mlflow_server.pause()
        try:
            first.wait_for_dumps(len(FIRST))
            assert first.delivery is not None
            first.delivery.kill()
            first.signal(signal.SIGKILL)
            first.finish()
            first.wait_for_delivery_exit()
        finally:
            mlflow_server.resume()
    finally:
        first.cleanup()
    (left,) = (run_dir / "spool").iterdir()
    _restart_and_close(Plan(run_dir, mlflow_server.url, experiment, _noted(SECOND, 2)), tmp_path)
    assert cli.main(["replay", str(left), "--timeout", "120"]) == 0
    client = MlflowClient(mlflow_server.url)
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    (run,) = client.search_runs([found.experiment_id])  # one run: the replay found it
    assert run.info.status == "FINISHED"
    loss = sorted((p.step, p.value) for p in client.get_metric_history(run.info.run_id, "loss"))
    assert loss == sorted([(s, _loss(s, 1)) for s in FIRST] + [(s, _loss(s, 2)) for s in SECOND])
    notes = Path(client.download_artifacts(run.info.run_id, "text/notes.txt", str(tmp_path)))
    lines = notes.read_text(encoding="utf-8").splitlines()
    assert [line for line in lines if " p2 " in line] == [f"[step {s}] p2 {s}" for s in SECOND]
