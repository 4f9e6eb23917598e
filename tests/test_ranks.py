"""Ranks of a process group: rank 0 logs by default; ``all_ranks`` gives each rank a run.

Real process groups: ``torch.distributed`` (gloo, on loopback) started by hand and by
``torchrun``, and plain ``RANK`` variables, in subprocesses that log to the session's
``mlflow server``. In-process tests set ``RANK`` and log to a real sqlite store and a
real W&B offline run. What arrived is read back with ``MlflowClient``, the JSONL reader
and W&B's own transaction log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from mlflow import MlflowClient
from mlflow.entities import Run
from stable_baselines3.common import logger as sb3_logger

import tracklog
from tests.servers import MlflowServer, free_port
from tracklog import LoggerSettings
from tracklog._ranks import Placement
from tracklog.readers import read_jsonl, read_wandb_offline
from tracklog.settings import MlflowOutput, WandbOutput

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID")


@pytest.fixture(autouse=True)
def _no_rank_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A launcher's variables in the developer's shell must not change the results."""
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")


def new_experiment() -> str:
    return f"ranks-{uuid.uuid4().hex[:10]}"


def runs_of(client: MlflowClient, experiment: str) -> list[Run]:
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"experiment {experiment} was never created"
    return list(client.search_runs([found.experiment_id]))


def history(client: MlflowClient, run: Run, key: str) -> list[tuple[int, float]]:
    points = client.get_metric_history(run.info.run_id, key)
    return sorted((point.step, point.value) for point in points)


def jsonl_values(path: Path, key: str) -> list[tuple[int, object]]:
    return [(row.step, row.values[key]) for row in read_jsonl(path)]


# In one process, with RANK set --------------------------------------------------------


def test_a_rank_other_than_zero_validates_but_writes_nothing(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    mlflow_sqlite_uri: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    experiment = new_experiment()
    settings = {
        "run_dir": str(tmp_path / "run"),
        "group": "ddp",
        "outputs": [
            {"type": "console"},
            {"type": "jsonl"},
            {"type": "mlflow", "tracking_uri": mlflow_sqlite_uri, "experiment": experiment},
        ],
    }
    with tracklog.build_logger(settings) as logger:
        assert logger.output_formats == []
        with pytest.raises(TypeError, match="'train/loss'"):
            logger.record("train/loss", object())  # type: ignore[arg-type]  # the mistake under test
        with pytest.raises(ValueError, match="'eval/video'"):
            logger.record("eval/video", sb3_logger.Video(torch.zeros(3, 4), fps=30))
        with pytest.raises(TypeError, match="dump step"):
            logger.dump("3")  # type: ignore[arg-type]  # the mistake under test
        logger.record("train/loss", 0.5)
        logger.info("only rank 0 says this")
        logger.dump(1)
    assert not (tmp_path / "run").exists()
    assert capsys.readouterr().out == ""
    assert MlflowClient(mlflow_sqlite_uri).get_experiment_by_name(experiment) is None


@pytest.mark.parametrize(
    ("variables", "writes"),
    [
        ({"RANK": "0", "WORLD_SIZE": "2"}, True),
        ({"LOCAL_RANK": "1"}, False),  # no RANK: the local rank decides
        ({"LOCAL_RANK": "0"}, True),
        ({"RANK": "1", "LOCAL_RANK": "0"}, False),  # RANK is the global rank: it wins
        ({}, True),
    ],
)
def test_rank_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variables: dict[str, str], writes: bool
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with tracklog.build_logger(
        {"run_dir": str(tmp_path), "outputs": [{"type": "jsonl"}]}
    ) as logger:
        logger.record("x", 1.0)
        logger.dump(0)
    path = tmp_path / "progress.jsonl"
    assert (jsonl_values(path, "x") if path.exists() else []) == ([(0, 1.0)] if writes else [])


@pytest.mark.parametrize("name", ["RANK", "LOCAL_RANK", "SLURM_ARRAY_TASK_ID"])
@pytest.mark.parametrize("text", ["one", "-1", "1.5", "²"])
def test_a_variable_that_is_not_a_rank_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, text: str
) -> None:
    monkeypatch.setenv(name, text)
    with pytest.raises(ValueError, match=rf"\${name} must be a non-negative integer, not '{text}'"):
        tracklog.build_logger({"run_dir": str(tmp_path / "run"), "outputs": [{"type": "jsonl"}]})
    assert not (tmp_path / "run").exists()


def test_all_ranks_gives_a_rank_its_own_runs_and_run_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mlflow_sqlite_uri: str
) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "9")  # the settings' job wins
    experiment = new_experiment()
    settings = {
        "run_dir": str(tmp_path / "run"),
        "group": "ddp",
        "job": 3,
        "all_ranks": True,
        "outputs": [
            {"type": "jsonl"},
            {
                "type": "mlflow",
                "tracking_uri": mlflow_sqlite_uri,
                "experiment": experiment,
                "tags": {"team": "rl"},
            },
            {"type": "wandb", "project": "ranks"},
        ],
    }
    with tracklog.build_logger(settings) as logger:
        logger.record("x", 2.0)
        logger.dump(7)
    assert jsonl_values(tmp_path / "run" / "rank1" / "progress.jsonl", "x") == [(7, 2.0)]
    assert not (tmp_path / "run" / "progress.jsonl").exists()
    client = MlflowClient(mlflow_sqlite_uri)
    (run,) = runs_of(client, experiment)
    assert run.info.run_name == "ddp-3-rank1"
    tags = run.data.tags
    assert (tags["tracklog.group"], tags["tracklog.job"], tags["tracklog.rank"]) == (
        "ddp",
        "3",
        "1",
    )
    assert tags["team"] == "rl"
    assert json.loads(tags["tracklog.settings"])["all_ranks"] is True
    assert history(client, run, "x") == [(7, 2.0)]
    wandb_run = read_wandb_offline(tmp_path / "run" / "rank1")
    assert (wandb_run.group, wandb_run.name) == ("ddp", "ddp-3-rank1")


@pytest.mark.parametrize(
    ("shared", "error"),
    [
        (
            {"outputs": [{"type": "jsonl", "path": "/tmp/all.jsonl"}]},
            r"outputs\.0\.path: /tmp/all\.jsonl is absolute",
        ),
        (
            {"outputs": [{"type": "tensorboard", "path": "/tmp/tb"}]},
            r"outputs\.0\.path: /tmp/tb is absolute",
        ),
        ({"outputs": [{"type": "mlflow", "run_id": "abc123"}]}, r"outputs\.0\.run_id: with all"),
        ({"outputs": [{"type": "wandb", "id": "abc123"}]}, r"outputs\.0\.id: with all_ranks"),
        ({"delivery": {"spool_dir": "/tmp/spool"}}, r"delivery\.spool_dir: /tmp/spool is absolute"),
    ],
)
def test_all_ranks_refuses_what_every_rank_would_share(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, shared: dict[str, object], error: str
) -> None:
    monkeypatch.setenv("RANK", "0")
    settings = {"run_dir": str(tmp_path / "run"), "all_ranks": True, "outputs": [], **shared}
    with pytest.raises(ValueError, match=error):
        tracklog.build_logger(settings)
    assert not (tmp_path / "run").exists()


def test_without_a_group_or_rank_runs_are_named_as_before(
    tmp_path: Path, mlflow_sqlite_uri: str
) -> None:
    experiment = new_experiment()
    settings = {
        "run_dir": str(tmp_path / "run"),
        "all_ranks": True,  # no process group: nothing changes
        "outputs": [
            {"type": "jsonl"},
            {"type": "mlflow", "tracking_uri": mlflow_sqlite_uri, "experiment": experiment},
        ],
    }
    with tracklog.build_logger(settings) as logger:
        logger.record("x", 1.0)
        logger.dump(0)
    assert (tmp_path / "run" / "progress.jsonl").exists()
    (run,) = runs_of(MlflowClient(mlflow_sqlite_uri), experiment)
    assert not {"tracklog.group", "tracklog.job", "tracklog.rank"} & set(run.data.tags)
    assert run.info.run_name  # MLflow's own made-up name


def test_sweep_fields_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRACKLOG_GROUP", "sweep-7")
    monkeypatch.setenv("TRACKLOG_JOB", "4")
    monkeypatch.setenv("TRACKLOG_ALL_RANKS", "true")
    settings = tracklog.load_settings({"group": "from-file"})
    assert (settings.group, settings.job, settings.all_ranks) == ("sweep-7", 4, True)
    monkeypatch.setenv("TRACKLOG_JOB", "-1")
    with pytest.raises(ValueError, match="job"):
        tracklog.load_settings({})


# Names and tags as a property: every (job, rank) of a group gets a name of its own ----

groups = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=128)


@given(
    group=groups,
    run_name=st.none() | st.text(min_size=1, max_size=250),
    jobs=st.lists(st.none() | st.integers(0, 10**6), min_size=1, max_size=4, unique=True),
    ranks=st.lists(st.integers(0, 4096), min_size=1, max_size=4, unique=True),
)
def test_every_job_and_rank_of_a_group_gets_its_own_run_name(
    group: str, run_name: str | None, jobs: list[int | None], ranks: list[int]
) -> None:
    settings = LoggerSettings(
        group=group,
        all_ranks=True,
        outputs=[MlflowOutput(tracking_uri="sqlite:///x.db", run_name=run_name), WandbOutput()],
    )
    names: dict[str, tuple[int | None, int]] = {}
    for job in jobs:
        for rank in ranks:
            applied = Placement(job=job, rank=rank).apply(settings)
            mlflow, wandb = applied.outputs
            assert isinstance(mlflow, MlflowOutput)
            assert isinstance(wandb, WandbOutput)
            assert mlflow.run_name is not None
            MlflowOutput.model_validate(mlflow.model_dump())  # still within MLflow's limits
            assert mlflow.tags["tracklog.group"] == wandb.group == group
            assert mlflow.tags["tracklog.rank"] == str(rank)
            assert applied.run_dir == settings.run_dir / f"rank{rank}"
            if run_name is None:  # an explicit name is the user's: only ranks are added
                assert mlflow.run_name not in names, (names[mlflow.run_name], (job, rank))
                names[mlflow.run_name] = (job, rank)


# Real process groups ----------------------------------------------------------------

# One rank of a training job: logs its rank into JSONL and MLflow, and reports what it
# saw as one JSON line on stdout.
RANK_SCRIPT = """
import json, os, sys
import tracklog

how, settings = sys.argv[1], json.loads(sys.argv[2])
if how != "env":
    import torch.distributed as dist

    if how == "tcp":  # rank and size from the command line: no RANK in the environment
        rank, size, port = map(int, sys.argv[3:6])
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size
        )
    else:
        dist.init_process_group("gloo")  # torchrun's env:// variables
    rank = dist.get_rank()
else:
    rank = int(os.environ["RANK"])
report = {"rank": rank, "rank_in_env": "RANK" in os.environ}
with tracklog.build_logger(settings) as logger:
    report["outputs"] = len(logger.output_formats)
    try:
        logger.record("bad", {"not": "a value"})
    except TypeError as error:
        report["error"] = str(error)
    for step in range(5):
        logger.record("rank_value", rank * 100 + step)
        logger.dump(step)
if how != "env":
    dist.barrier()
    dist.destroy_process_group()
# A file per rank: torchrun relays its children's stdout, and two ranks' lines can
# interleave there.
with open(os.path.join(os.path.dirname(__file__), f"report-{rank}.json"), "w") as out:
    json.dump(report, out)
"""


def child_env(**extra: str) -> dict[str, str]:
    dropped = ("TRACKLOG_", "MLFLOW_", *RANK_VARIABLES, "MASTER_", "TORCHELASTIC_")
    env = {name: value for name, value in os.environ.items() if not name.startswith(dropped)}
    # Read back as soon as the ranks end: their close() must not give up on a delivery
    # process that the rest of the suite starves of CPU (it runs at nice 10).
    delivery = '{"close_timeout": 120}'
    return {**env, "WANDB_SILENT": "true", "TRACKLOG_DELIVERY": delivery, **extra}


def rank_settings(run_dir: Path, url: str, experiment: str, **extra: object) -> str:
    return json.dumps(
        {
            "run_dir": str(run_dir),
            "group": "ddp",
            "outputs": [
                {"type": "jsonl"},
                {"type": "mlflow", "tracking_uri": url, "experiment": experiment},
            ],
            **extra,
        }
    )


def run_ranks(commands: list[list[str]], envs: list[dict[str, str]]) -> list[dict[str, Any]]:
    children = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for command, env in zip(commands, envs, strict=True)
    ]
    for child in children:
        _, err = child.communicate(timeout=180)
        assert child.returncode == 0, err.decode(errors="replace")
    scripts = {
        Path(part).parent for command in commands for part in command if part.endswith(".py")
    }
    reports: list[dict[str, Any]] = [
        json.loads(report.read_text())
        for folder in scripts
        for report in folder.glob("report-*.json")
    ]
    return sorted(reports, key=lambda report: int(report["rank"]))


def check_rank_zero_only(
    reports: list[dict[str, Any]], run_dir: Path, server: MlflowServer, experiment: str
) -> None:
    """Rank 0 logged (JSONL, one MLflow run); rank 1 validated and wrote nothing."""
    assert [report["rank"] for report in reports] == [0, 1]
    assert [report["outputs"] for report in reports] == [2, 0]
    assert all("'bad'" in report["error"] for report in reports)  # both validated
    expected = [(step, float(step)) for step in range(5)]  # rank 0's values only
    assert jsonl_values(run_dir / "progress.jsonl", "rank_value") == expected
    assert not any(run_dir.glob("rank*"))
    client = MlflowClient(server.url)
    (run,) = runs_of(client, experiment)
    assert run.info.run_name == "ddp"
    assert (run.data.tags["tracklog.group"], run.data.tags["tracklog.rank"]) == ("ddp", "0")
    assert history(client, run, "rank_value") == expected
    assert run.info.status == "FINISHED"


def test_torch_distributed_logs_from_rank_zero(tmp_path: Path, mlflow_server: MlflowServer) -> None:
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(RANK_SCRIPT))
    experiment, port = new_experiment(), free_port()
    settings = rank_settings(tmp_path / "run", mlflow_server.url, experiment)
    commands = [
        [sys.executable, str(script), "tcp", settings, str(rank), "2", str(port)] for rank in (0, 1)
    ]
    reports = run_ranks(commands, [child_env(), child_env()])
    assert not any(report["rank_in_env"] for report in reports)  # torch told the rank
    check_rank_zero_only(reports, tmp_path / "run", mlflow_server, experiment)


def test_rank_variables_log_from_rank_zero(tmp_path: Path, mlflow_server: MlflowServer) -> None:
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(RANK_SCRIPT))
    experiment = new_experiment()
    settings = rank_settings(tmp_path / "run", mlflow_server.url, experiment)
    commands = [[sys.executable, str(script), "env", settings] for _ in (0, 1)]
    envs = [child_env(RANK=str(rank), WORLD_SIZE="2") for rank in (0, 1)]
    check_rank_zero_only(run_ranks(commands, envs), tmp_path / "run", mlflow_server, experiment)


def test_torchrun_with_all_ranks_gives_each_rank_a_run(
    tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(RANK_SCRIPT))
    experiment = new_experiment()
    settings = rank_settings(tmp_path / "run", mlflow_server.url, experiment, all_ranks=True)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    command = [torchrun, "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    command += ["--master-port", str(free_port()), str(script), "torchrun", settings]
    reports = run_ranks([command], [child_env()])
    assert [(report["rank"], report["outputs"]) for report in reports] == [(0, 2), (1, 2)]
    client = MlflowClient(mlflow_server.url)
    runs = {run.info.run_name: run for run in runs_of(client, experiment)}
    assert sorted(runs) == ["ddp-rank0", "ddp-rank1"]
    for rank in (0, 1):
        run = runs[f"ddp-rank{rank}"]
        expected = [(step, float(rank * 100 + step)) for step in range(5)]
        assert history(client, run, "rank_value") == expected
        assert (run.data.tags["tracklog.group"], run.data.tags["tracklog.rank"]) == (
            "ddp",
            str(rank),
        )
        assert run.info.status == "FINISHED"
        path = tmp_path / "run" / f"rank{rank}" / "progress.jsonl"
        assert jsonl_values(path, "rank_value") == expected
    assert not (tmp_path / "run" / "progress.jsonl").exists()
