"""Hydra and OmegaConf: settings from a ``DictConfig``, and the example app's sweeps.

``examples/hydra/train.py`` runs as a real subprocess with ``--multirun`` over two tiny
jobs, logging to a real sqlite MLflow store and to real W&B offline runs. What arrived
is read back with ``MlflowClient``, W&B's own transaction log and the JSONL reader, and
matched job by job against the overrides Hydra itself recorded for that job.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from mlflow import MlflowClient
from mlflow.entities import Run
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from pydantic import ValidationError

import tracklog
from tracklog.readers import read_jsonl, read_wandb_offline, wandb_records
from tracklog.settings import (
    ConsoleOutput,
    CsvOutput,
    FileOutput,
    JsonlOutput,
    MlflowOutput,
    WandbOutput,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hydra"
LEARNING_RATES = {"1e-3": 1e-3, "3e-4": 3e-4}
TINY = [
    f"ppo.learning_rate={','.join(LEARNING_RATES)}",
    "ppo.total_timesteps=128",  # one rollout: 4 envs x 256 steps
    "eval_episodes=2",
]


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")


# build_logger(DictConfig) ------------------------------------------------------------


def test_build_logger_takes_a_dictconfig_with_interpolations(
    tmp_path: Path, mlflow_sqlite_uri: str
) -> None:
    experiment = f"hydra-{uuid.uuid4().hex[:10]}"
    cfg = OmegaConf.create(
        {
            "root": str(tmp_path),
            "env_id": "CartPole-v1",
            "logging": {
                "run_dir": "${root}/run",
                "group": "${env_id}-sweep",
                "outputs": [
                    {"type": "jsonl", "path": "${env_id}.jsonl"},
                    {"type": "mlflow", "tracking_uri": mlflow_sqlite_uri, "experiment": experiment},
                    # Free-form values stay DictConfigs unless converted: MLflow's copy
                    # of the settings and W&B's config need plain, resolved ones.
                    {"type": "wandb", "config": {"env": "${env_id}", "net": {"layers": [64, 64]}}},
                ],
            },
        }
    )
    assert isinstance(cfg.logging, DictConfig)
    with tracklog.build_logger(cfg.logging) as logger:
        logger.record("loss", 0.5)
        logger.dump(step=3)
    rows = read_jsonl(tmp_path / "run" / "CartPole-v1.jsonl")
    assert [(row.step, row.values) for row in rows] == [(3, {"loss": 0.5})]
    wanted = {"env": "CartPole-v1", "net": {"layers": [64, 64]}}
    client = MlflowClient(mlflow_sqlite_uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    (run,) = client.search_runs([found.experiment_id])
    assert run.data.tags["tracklog.group"] == "CartPole-v1-sweep"
    assert json.loads(run.data.tags["tracklog.settings"])["outputs"][2]["config"] == wanted
    assert metric_history(client, run, "loss") == [(3, 0.5)]
    wandb_run = read_wandb_offline(tmp_path / "run")
    assert {key: wandb_run.config[key] for key in wanted} == wanted
    assert wandb_identity(tmp_path / "run").run_group == "CartPole-v1-sweep"


def test_a_bad_dictconfig_is_pydantics_error_naming_the_path() -> None:
    cfg = OmegaConf.create(
        {"level": "loud", "outputs": [{"type": "console"}, {"type": "csv", "colour": "red"}]}
    )
    with pytest.raises(ValidationError) as raised:
        tracklog.build_logger(cfg)
    assert not list(Path.cwd().iterdir())  # raised before creating anything
    paths = {".".join(str(part) for part in error["loc"]) for error in raised.value.errors()}
    assert paths == {"level", "outputs.1.csv.colour"}
    assert "outputs.1.csv.colour" in str(raised.value)


def test_an_unset_value_or_a_list_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(MissingMandatoryValue, match=r"full_key: outputs\[0\]\.experiment"):
        tracklog.load_settings(
            OmegaConf.create({"outputs": [{"type": "mlflow", "experiment": "???"}]})
        )
    with pytest.raises(TypeError, match="not ListConfig"):
        tracklog.load_settings(OmegaConf.create([{"type": "console"}]))
    assert not list(tmp_path.iterdir())  # nothing was created


@pytest.fixture
def hydra_job(tmp_path: Path) -> Iterator[Path]:
    """A Hydra job's context as in ``@hydra.main``, whose output directory is returned."""
    yield tmp_path / "job"
    HydraConfig.instance().cfg = None  # later tests must not see a Hydra job


@pytest.mark.parametrize(
    ("group", "backend"),
    [("local", None), ("offline_wandb", WandbOutput), ("server", MlflowOutput)],
)
def test_every_logging_config_of_the_example_validates(
    hydra_job: Path, group: str, backend: type[WandbOutput | MlflowOutput] | None
) -> None:
    with initialize_config_dir(str(EXAMPLE / "conf"), version_base=None, job_name="train"):
        cfg = compose(
            "config",
            overrides=[f"logging={group}", f"hydra.runtime.output_dir={hydra_job}"],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    settings = tracklog.load_settings(cfg.logging)
    assert settings.run_dir == hydra_job
    assert str(settings.group).startswith("train_")
    kinds = [type(output) for output in settings.outputs]
    assert kinds[:4] == [ConsoleOutput, FileOutput, JsonlOutput, CsvOutput]
    assert kinds[4:] == ([] if backend is None else [backend])


# The example, as a real --multirun sweep ----------------------------------------------


def run_sweep(cwd: Path, *overrides: str, **env: str) -> Path:
    """Run the example with ``--multirun`` in ``cwd``; the sweep's directory."""
    child_env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("TRACKLOG_", "MLFLOW_", "WANDB_", "HYDRA_"))
        and name not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID")
    }
    # Read back right after the sweep ends: its close() must not give up on a delivery
    # process that the rest of the suite starves of CPU (it runs at nice 10).
    child_env.update(
        WANDB_SILENT="true",
        HYDRA_FULL_ERROR="1",
        TRACKLOG_DELIVERY='{"close_timeout": 120}',
        **env,
    )
    done = subprocess.run(
        [sys.executable, str(EXAMPLE / "train.py"), "--multirun", *TINY, *overrides],
        cwd=cwd,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    (sweep,) = (cwd / "multirun").glob("*/*")  # multirun/<date>/<time>, Hydra's default
    return sweep


def job_dirs(sweep: Path) -> dict[int, Path]:
    return {int(path.name): path for path in sweep.iterdir() if path.name.isdigit()}


def job_learning_rate(job_dir: Path) -> tuple[list[str], float]:
    """The overrides Hydra recorded for a job, and the learning rate they set."""
    overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())
    assert isinstance(overrides, list)
    (rate,) = (item.split("=", 1)[1] for item in overrides if item.startswith("ppo.learning_"))
    return overrides, float(rate)


def sweep_group(sweep: Path) -> str:
    """The group config.yaml derives from the same ${now:} values as the sweep's folder."""
    return f"train_{sweep.parent.name}_{sweep.name}"


def check_job_files(job_dir: Path, rate: float) -> None:
    """The job's own run_dir holds its own learning curve, trained at its own rate."""
    rows = read_jsonl(job_dir / "progress.jsonl")
    assert [
        row.values["train/learning_rate"] for row in rows if "train/learning_rate" in row.values
    ] == [rate]
    assert "|    ep_rew_mean " in (job_dir / "train.log").read_text()  # under rollout/
    assert (job_dir / "hydra.log").exists()  # Hydra's Python log, kept apart from train.log


def metric_history(client: MlflowClient, run: Run, key: str) -> list[tuple[int, float]]:
    # By step: MLflow does not promise the order it returns a history in.
    points = client.get_metric_history(run.info.run_id, key)
    return sorted((point.step, point.value) for point in points)


@pytest.mark.slow
def test_a_server_sweep_gives_each_job_an_mlflow_run_in_one_experiment(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = run_sweep(tmp_path, "logging=server", MLFLOW_TRACKING_URI=uri)
    group = sweep_group(sweep)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tracklog-hydra")
    assert experiment is not None
    runs = {
        int(run.data.tags["tracklog.job"]): run
        for run in client.search_runs([experiment.experiment_id])
    }
    jobs = job_dirs(sweep)
    assert sorted(runs) == sorted(jobs) == [0, 1]
    seen_rates = set()
    for job, run in runs.items():
        overrides, rate = job_learning_rate(jobs[job])
        seen_rates.add(rate)
        assert run.info.status == "FINISHED"
        assert run.info.run_name == f"{group}-{job}"
        assert run.data.tags["tracklog.group"] == group
        assert run.data.tags["tracklog.overrides"] == " ".join(overrides)
        params = run.data.params
        assert float(params["ppo.learning_rate"]) == rate
        assert (params["ppo.total_timesteps"], params["env_id"]) == ("128", "CartPole-v1")
        assert "logging.run_dir" not in params  # only the hyperparameters
        assert metric_history(client, run, "train/learning_rate") == [(1024, rate)]
        assert [step for step, _ in metric_history(client, run, "rollout/ep_rew_mean")] == [1024]
        ((step, reward),) = metric_history(client, run, "eval/mean_reward")
        assert (step, reward > 0) == (1024, True)
        check_job_files(jobs[job], rate)
    assert seen_rates == set(LEARNING_RATES.values())


class _RunIdentity(Protocol):
    run_group: str
    display_name: str


def wandb_identity(job_dir: Path) -> _RunIdentity:
    """The group and name of the job's W&B offline run, from W&B's transaction log."""
    (log,) = job_dir.glob("wandb/offline-run-*/run-*.wandb")
    record_class = importlib.import_module("wandb.proto.wandb_internal_pb2").Record
    for payload in wandb_records(log):
        record = record_class()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "run":
            run: _RunIdentity = record.run
            return run
    raise AssertionError(f"{log} holds no run record")


@pytest.mark.slow
def test_an_offline_wandb_sweep_gives_each_job_a_run_in_the_sweeps_group(tmp_path: Path) -> None:
    sweep = run_sweep(tmp_path, "logging=offline_wandb")
    group = sweep_group(sweep)
    jobs = job_dirs(sweep)
    assert sorted(jobs) == [0, 1]
    for job, job_dir in jobs.items():
        _, rate = job_learning_rate(job_dir)
        identity = wandb_identity(job_dir)
        assert (identity.run_group, identity.display_name) == (group, f"{group}-{job}")
        run = read_wandb_offline(job_dir)
        assert run.exit_code == 0
        assert (run.project, run.config["ppo.learning_rate"]) == ("tracklog-hydra", rate)
        assert "logging.run_dir" not in run.config
        curve = [row.global_step for row in run.rows if "rollout/ep_rew_mean" in row.values]
        assert curve == [1024]
        assert isinstance(run.summary["eval/mean_reward"], float)
        check_job_files(job_dir, rate)
