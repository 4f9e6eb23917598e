"""``tracklog.configure``: SB3's ``configure(folder, format_strings)`` with a tracklog Logger.

SB3's own documented example runs with ``tracklog.configure`` in place of SB3's, and
what it wrote is read back with pandas and TensorBoard's EventAccumulator; the files
carry SB3's names, and ``SB3_LOGDIR``/``SB3_LOG_FORMAT`` work as in SB3.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from stable_baselines3 import A2C
from stable_baselines3.common import logger as sb3_logger

import tracklog
from tests.tensorboard_readback import read_events, scalars
from tracklog._registry import anchored_store_uri
from tracklog.readers import read_wandb_offline


def test_sb3s_documented_example_runs_with_tracklogs_configure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # https://stable-baselines3.readthedocs.io/en/master/common/logger.html, with the
    # import changed: from stable_baselines3.common.logger import configure
    tmp_path_str = str(tmp_path / "sb3_log")
    new_logger = tracklog.configure(tmp_path_str, ["stdout", "csv", "tensorboard"])
    model = A2C("MlpPolicy", "CartPole-v1", n_steps=5, verbose=1, seed=0)
    model.set_logger(new_logger)
    model.learn(1000)  # A2C dumps every 100 updates of 5 steps: twice
    new_logger.close()

    assert isinstance(new_logger, tracklog.Logger)
    out = capsys.readouterr().out
    assert f"Logging to {tmp_path_str}" in out
    assert "| time/" in out  # the console table
    progress = pd.read_csv(Path(tmp_path_str) / "progress.csv")
    assert progress["time/total_timesteps"].tolist() == [500, 1000]
    assert progress["_step"].tolist() == [500, 1000]
    events = read_events(Path(tmp_path_str))  # SB3's place: the folder itself
    losses = scalars(events, "train/value_loss")
    assert [step for step, _ in losses] == [500, 1000]
    assert [value for _, value in losses] == pytest.approx(
        progress["train/value_loss"].tolist(), rel=1e-6
    )


def test_the_files_have_sb3s_names(tmp_path: Path) -> None:
    formats = ["stdout", "log", "csv", "json", "tensorboard"]
    for configure, folder in ((sb3_logger.configure, "sb3"), (tracklog.configure, "tracklog")):
        logger = configure(str(tmp_path / folder), formats)
        logger.record("x", 1.5)
        logger.dump(3)
        logger.close()

    def written(folder: str) -> set[str]:
        names = {path.name for path in (tmp_path / folder).iterdir() if path.is_file()}
        return {"events" if name.startswith("events.out.tfevents") else name for name in names}

    assert written("sb3") <= written("tracklog")
    assert {"log.txt", "progress.csv", "progress.json", "events"} <= written("tracklog")
    rows = pd.read_json(tmp_path / "tracklog" / "progress.json", lines=True)
    assert rows["x"].tolist() == [1.5]
    assert rows["_step"].tolist() == [3]
    assert "Logging to" in (tmp_path / "tracklog" / "log.txt").read_text()


def test_sb3_logdir_and_sb3_log_format_are_read_as_sb3_reads_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SB3_LOGDIR", str(tmp_path / "from-env"))
    monkeypatch.setenv("SB3_LOG_FORMAT", "json,,jsonl")  # an empty name is skipped, as in SB3
    with tracklog.configure() as logger:
        logger.record("x", 2.0)
        logger.dump(7)
    folder = tmp_path / "from-env"
    assert pd.read_json(folder / "progress.json", lines=True)["x"].tolist() == [2.0]
    assert pd.read_json(folder / "progress.jsonl", lines=True)["_step"].tolist() == [7]
    assert not (folder / "progress.csv").exists()
    # Explicit arguments win over the environment.
    with tracklog.configure(str(tmp_path / "given"), ["csv"]) as logger:
        logger.record("x", 3.0)
        logger.dump(8)
    assert pd.read_csv(tmp_path / "given" / "progress.csv")["x"].tolist() == [3.0]


def test_without_a_folder_or_sb3_logdir_it_makes_one_in_the_temporary_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SB3_LOGDIR", raising=False)
    monkeypatch.delenv("SB3_LOG_FORMAT", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with tracklog.configure() as logger:  # SB3's default formats: stdout, log, csv
        logger.record("x", 1.0)
        logger.dump(1)
    (folder,) = tmp_path.glob("SB3-*")
    assert {"log.txt", "progress.csv"} <= {path.name for path in folder.iterdir()}
    assert logger.get_dir() == str(folder)


def test_an_unknown_format_is_refused_naming_it_and_what_is_known(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Unknown format specified: 'tensorbord'") as caught:
        tracklog.configure(str(tmp_path / "run"), ["stdout", "tensorbord"])
    assert "stdout, log, csv, json, jsonl, tensorboard, mlflow, wandb" in str(caught.value)
    assert not (tmp_path / "run").exists()


def test_a_folder_holding_sb3s_own_csv_is_left_alone_for_a_new_version(tmp_path: Path) -> None:
    folder = str(tmp_path / "run")
    sb3 = sb3_logger.configure(folder, ["csv"])
    sb3.record("x", 1.0)
    sb3.dump(1)
    sb3.close()
    with tracklog.configure(folder, ["csv"]) as logger:
        assert logger.get_dir() == f"{folder}_2"
        logger.record("x", 2.0)
        logger.dump(2)
    assert pd.read_csv(Path(folder) / "progress.csv")["x"].tolist() == [1.0]  # left as it was
    assert pd.read_csv(Path(f"{folder}_2") / "progress.csv")["x"].tolist() == [2.0]


def test_mlflow_and_wandb_formats_log_with_their_default_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A delivery process started before the chdir (it keeps its working directory):
    # MLflow's relative default store must still land in the trainer's new one.
    with tracklog.configure(str(tmp_path / "before"), ["tensorboard"]) as earlier:
        earlier.record("x", 1.0)
        earlier.dump(1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # MLflow's default store: sqlite:///mlflow.db here
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    folder = tmp_path / "run"
    with tracklog.configure(str(folder), ["mlflow", "wandb"]) as logger:
        for step in (1, 2):
            logger.record("reward", step * 1.5)
            logger.dump(step)
    client = MlflowClient(f"sqlite:///{elsewhere / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("Default")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "reward")
    assert sorted((point.step, point.value) for point in history) == [(1, 1.5), (2, 3.0)]
    assert run.info.status == "FINISHED"
    wandb_run = read_wandb_offline(folder)
    assert [(row.global_step, row.values["reward"]) for row in wandb_run.rows] == [
        (1, 1.5),
        (2, 3.0),
    ]


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("sqlite:///mlflow.db", "sqlite:///{cwd}/mlflow.db"),
        ("sqlite:///sub/m.db?timeout=5", "sqlite:///{cwd}/sub/m.db?timeout=5"),
        ("sqlite:////abs/m.db", "sqlite:////abs/m.db"),
        ("sqlite:///:memory:", "sqlite:///:memory:"),
        ("sqlite+pysqlite:///m.db", "sqlite+pysqlite:///{cwd}/m.db"),
        ("sqlite+pysqlite:////abs/m.db", "sqlite+pysqlite:////abs/m.db"),
        ("file:./mlruns", "file://{cwd}/mlruns"),
        ("mlruns", "{cwd}/mlruns"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
    ],
)
def test_a_relative_store_is_anchored_to_the_trainers_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uri: str, expected: str
) -> None:
    # The delivery process is started once per trainer and keeps the working directory
    # it started in; a logger built after a chdir (Hydra's, say) must still use its own.
    monkeypatch.chdir(tmp_path)
    assert anchored_store_uri(uri) == expected.format(cwd=tmp_path)
