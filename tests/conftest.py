"""Shared fixtures: every test logs into its own temporary run directory."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import matplotlib
import pytest
from hypothesis import HealthCheck, settings

from tests.servers import MlflowServer

matplotlib.use("Agg")

settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# `make test` runs pytest-xdist with --dist loadfile: each file runs whole on one worker
# (module fixtures start servers, train agents or kill processes once per file), and a
# worker that is free takes the next file in collection order. The longest files go
# first, so that none of them starts last and leaves the other workers idle; the rest
# keep their order. Measured wall time per file with 3 workers, longest first.
LONGEST_FILES = (
    "test_doc_examples.py",
    "test_crash.py",
    "test_resume.py",
    "test_processes.py",
    "test_scale.py",
    "test_delivery.py",
    "test_mlflow.py",
    "test_outputs_files.py",
    "test_wandb.py",
    "test_packaging.py",
    "test_tensorboard.py",
    "test_typing.py",
    "test_hydra.py",
    "test_demo.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not hasattr(config, "workerinput"):
        return  # not an xdist worker: the usual order
    rank = {name: index for index, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file


@pytest.fixture(autouse=True)
def _no_tracklog_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """TRACKLOG_* variables from the developer's shell must not change test results."""
    for name in list(os.environ):
        if name.startswith("TRACKLOG_"):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative paths (MLflow's ./mlruns, sqlite:///mlflow.db) land in the test's tmp dir."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One real ``mlflow server`` for the whole session (it takes ~20 s to start)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_sqlite_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite tracking store for the session: creating its tables takes seconds.

    The tables are created here, before any test. Otherwise a test whose ``close()``
    returns while the delivery process is still creating them, and which then reads
    with its own MlflowClient, runs MLflow's migrations twice at once on a new file
    ("table _alembic_tmp_experiments already exists"), which MLflow does not support.
    """
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow-sqlite') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return uri
