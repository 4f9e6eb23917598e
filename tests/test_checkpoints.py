"""Checkpoints: the ``Checkpoint`` value in every output, and ``CheckpointCallback``.

Read back with each backend's reader: MlflowClient (artifacts and tags), the W&B
offline run file (its artifact records), EventAccumulator (the Text tab), JSONL, CSV,
and the files tracklog keeps in ``<run_dir>/checkpoints``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow import MlflowClient
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import configure as sb3_configure
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.vec_env import VecNormalize

import tracklog
from tests.tensorboard_readback import read_events
from tracklog import Checkpoint
from tracklog._codec import CodecError, decode_row, encode_row
from tracklog._row import Row
from tracklog.callbacks import CheckpointCallback, EpisodeCallback, TracklogEvalCallback
from tracklog.readers import (
    latest_checkpoint,
    read_checkpoints,
    read_csv,
    read_jsonl,
    read_wandb_offline,
)

RECORD = "tracklog-checkpoint.json"


@pytest.fixture(autouse=True)
def _quiet_offline_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")


def all_outputs(run_dir: Path, uri: str, experiment: str, **extra: object) -> dict[str, object]:
    return {
        "run_dir": run_dir,
        "system_metrics": None,
        "outputs": [
            {"type": "console", "max_length": 80},
            {"type": "file", "max_length": 80},
            {"type": "jsonl"},
            {"type": "csv"},
            {"type": "tensorboard"},
            {"type": "mlflow", "tracking_uri": uri, "experiment": experiment},
            {"type": "wandb", "project": "checkpoints", "mode": "offline"},
        ],
        **extra,
    }


def mlflow_run(uri: str, experiment: str) -> tuple[MlflowClient, str]:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    (run,) = client.search_runs([found.experiment_id])
    return client, run.info.run_id


def artifact_files(client: MlflowClient, run_id: str, path: str) -> dict[str, int]:
    """Every file under ``path`` in the run's artifacts, with its size."""
    found: dict[str, int] = {}
    for entry in client.list_artifacts(run_id, path):
        if entry.is_dir:
            found.update(artifact_files(client, run_id, entry.path))
        else:
            found[entry.path] = entry.file_size or 0
    return found


def downloaded(client: MlflowClient, run_id: str, path: str, into: Path) -> bytes:
    return Path(client.download_artifacts(run_id, path, str(into))).read_bytes()


def md5_b64(data: bytes) -> str:
    """W&B's manifest digest of a file's content."""
    return base64.b64encode(hashlib.md5(data).digest()).decode("ascii")


# The value in every output ----------------------------------------------------------------


def test_a_checkpoint_reaches_every_output_as_it_was_at_dump(
    tmp_path: Path, mlflow_sqlite_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    model = tmp_path / "model.zip"
    first = os.urandom(5000)
    model.write_bytes(first)
    folder = tmp_path / "saved"
    (folder / "inner").mkdir(parents=True)
    (folder / "policy.pt").write_bytes(b"policy" * 100)
    (folder / "inner" / "stats.pkl").write_bytes(b"stats")
    settings_ = all_outputs(run_dir, mlflow_sqlite_uri, "every-output")
    with tracklog.build_logger(settings_) as logger:
        logger.record("loss", 0.5)
        logger.record("ckpt", Checkpoint(model))
        logger.dump(100)
        model.write_bytes(b"saved over after the dump")  # must not change what is logged
        logger.record("ckpt", Checkpoint(folder, aliases=["best"], metadata={"score": 7.5}))
        logger.dump(200)
        (folder / "policy.pt").write_bytes(b"changed")
    console = capsys.readouterr().out

    # Kept in run_dir, with tracklog's record.
    kept = read_checkpoints(run_dir)
    assert [(k.key, k.step, k.aliases) for k in kept] == [
        ("ckpt", 100, ("latest",)),
        ("ckpt", 200, ("latest", "best")),
    ]
    assert (run_dir / "checkpoints/ckpt/step_100/model.zip").read_bytes() == first
    assert (run_dir / "checkpoints/ckpt/step_200/policy.pt").read_bytes() == b"policy" * 100
    assert (run_dir / "checkpoints/ckpt/step_200/inner/stats.pkl").read_bytes() == b"stats"
    assert kept[1].metadata == {"score": 7.5}
    run_file = json.loads((run_dir / "tracklog.json").read_text())
    assert kept[0].run == run_file  # the run's identity travels with the checkpoint

    # JSONL and CSV name the kept folder; the console and train.log summarise it.
    jsonl = read_jsonl(run_dir / "progress.jsonl")
    assert [row.values["ckpt"] for row in jsonl] == [
        "checkpoints/ckpt/step_100",
        "checkpoints/ckpt/step_200",
    ]
    csv_rows = read_csv(run_dir / "progress.csv")
    assert [row.values["ckpt"] for row in csv_rows] == [
        "checkpoints/ckpt/step_100",
        "checkpoints/ckpt/step_200",
    ]
    train_log = (run_dir / "train.log").read_text()
    for text in (console, train_log):
        assert "<checkpoint model.zip (4.9 KiB) [latest]>" in text
        assert "<checkpoint policy.pt, inner/stats.pkl (605 B) [latest, best]>" in text

    # TensorBoard: a Text tab entry at each step.
    events = read_events(run_dir / "tensorboard")
    texts = {
        event.step: event.tensor_proto.string_val[0].decode() for event in events.Tensors("ckpt")
    }
    assert set(texts) == {100, 200}
    assert "`checkpoints/ckpt/step_100`" in texts[100]
    assert '"score": 7.5' in texts[200]

    # MLflow: the files at the same paths, and the alias tags.
    client, run_id = mlflow_run(mlflow_sqlite_uri, "every-output")
    assert artifact_files(client, run_id, "checkpoints") == {
        "checkpoints/ckpt/step_100/model.zip": 5000,
        f"checkpoints/ckpt/step_100/{RECORD}": (run_dir / "checkpoints/ckpt/step_100" / RECORD)
        .stat()
        .st_size,
        "checkpoints/ckpt/step_200/policy.pt": 600,
        "checkpoints/ckpt/step_200/inner/stats.pkl": 5,
        f"checkpoints/ckpt/step_200/{RECORD}": (run_dir / "checkpoints/ckpt/step_200" / RECORD)
        .stat()
        .st_size,
    }
    fetched = downloaded(client, run_id, "checkpoints/ckpt/step_100/model.zip", tmp_path / "dl")
    assert fetched == first
    tags = client.get_run(run_id).data.tags
    assert tags["checkpoint/ckpt/latest"] == "checkpoints/ckpt/step_200"
    assert tags["checkpoint/ckpt/best"] == "checkpoints/ckpt/step_200"

    # W&B: two versions of one model artifact, with their aliases and files.
    wandb_run = read_wandb_offline(run_dir)
    versions = wandb_run.artifacts
    assert [(a.name, a.type) for a in versions] == [(f"ckpt-{wandb_run.run_id}", "model")] * 2
    assert [set(a.aliases) for a in versions] == [{"latest"}, {"latest", "best"}]
    assert versions[0].metadata == {"path": "checkpoints/ckpt/step_100", "step": 100}
    assert versions[1].metadata == {
        "score": 7.5,
        "path": "checkpoints/ckpt/step_200",
        "step": 200,
    }
    assert set(versions[1].files) == {"policy.pt", "inner/stats.pkl", RECORD}
    model_file = versions[0].files["model.zip"]
    assert model_file.size == 5000
    assert model_file.digest == md5_b64(first)
    assert Path(model_file.local_path).read_bytes() == first  # what `wandb sync` uploads


def test_a_folder_from_checkpoint_dir_is_kept_where_it_is(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with tracklog.build_logger({"run_dir": run_dir, "outputs": [{"type": "jsonl"}]}) as logger:
        folder = logger.checkpoint_dir("agent/ckpt", 64)
        assert folder == (run_dir / "checkpoints/agent/ckpt/step_64").absolute()
        (folder / "model.zip").write_bytes(b"z")
        again = logger.checkpoint_dir("agent/ckpt", 64)
        assert again.name == "step_64-1"  # never the same folder twice
        logger.dump_rows([(64, {"agent/ckpt": Checkpoint(folder)})])
    assert sorted(p.name for p in folder.iterdir()) == ["model.zip", RECORD]
    (row,) = read_jsonl(run_dir / "progress.jsonl")
    assert row.values["agent/ckpt"] == "checkpoints/agent/ckpt/step_64"
    assert not list((run_dir / "checkpoints/agent/ckpt").glob("step_64-2"))


def test_latest_checkpoint_is_the_last_dumped_that_carries_the_alias(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with tracklog.build_logger({"run_dir": run_dir, "outputs": [{"type": "jsonl"}]}) as logger:
        for step, aliases in [(10, ["best"]), (20, []), (5, [])]:
            saved = tmp_path / f"m{step}.zip"
            saved.write_bytes(b"m")
            logger.record("ckpt", Checkpoint(saved, aliases=aliases))
            logger.dump(step)
        # A folder whose record was never written (killed while saving) is not one.
        (run_dir / "checkpoints/ckpt/step_99").mkdir()
    latest = latest_checkpoint(run_dir)
    assert latest is not None
    assert latest.step == 5  # the last one dumped (a restarted run went back to step 5)
    best = latest_checkpoint(run_dir, alias="best")
    assert best is not None
    assert best.step == 10
    assert latest_checkpoint(run_dir, alias="final") is None
    assert latest_checkpoint(tmp_path / "elsewhere") is None


# Bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "names"),
    [
        (lambda p: Checkpoint(p / "missing.zip"), "missing.zip"),
        (lambda p: Checkpoint(p, aliases=["best", "no/slash"]), "'no/slash'"),
        (lambda p: Checkpoint(p, aliases=["v3"]), "'v3'"),
        (lambda p: Checkpoint(p, aliases="best"), "aliases=['best']"),
        (lambda p: Checkpoint(p, metadata={"score": object()}), "metadata['score']"),
        (lambda p: Checkpoint(p / "empty"), "holds no file"),
    ],
)
def test_a_bad_checkpoint_is_refused_where_it_is_made_naming_what(
    tmp_path: Path, make: object, names: str
) -> None:
    (tmp_path / "model.zip").write_bytes(b"m")
    (tmp_path / "empty").mkdir()
    assert callable(make)
    with pytest.raises((TypeError, ValueError)) as caught:
        make(tmp_path)
    assert names in str(caught.value)


def test_a_checkpoint_that_cannot_be_kept_is_reported_and_the_rest_of_the_dump_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    saved = tmp_path / "model.zip"
    saved.write_bytes(b"m")
    with tracklog.build_logger({"run_dir": run_dir, "outputs": [{"type": "jsonl"}]}) as logger:
        logger.record("ckpt", Checkpoint(saved))
        logger.record("loss", 1.5)
        saved.unlink()  # gone before the dump
        logger.dump(3)
    (row,) = read_jsonl(run_dir / "progress.jsonl")
    assert dict(row.values) == {"loss": 1.5}
    assert "checkpoint 'ckpt' at step 3 could not be kept" in caplog.text


# The queue's form ---------------------------------------------------------------------------

_names = st.text("abcXYZ019_-.", min_size=1, max_size=12).filter(lambda n: n not in (".", ".."))


@settings(max_examples=60, deadline=None)
@given(
    files=st.lists(
        st.tuples(st.lists(_names, min_size=1, max_size=3).map("/".join), st.integers(0, 2**40)),
        min_size=1,
        max_size=5,
        unique_by=lambda entry: entry[0],
    ),
    aliases=st.lists(st.sampled_from(["latest", "best", "final", "seed-1", "a.b"]), unique=True),
    score=st.floats(allow_nan=False) | st.integers(-(2**63), 2**63 - 1),
)
def test_a_queued_checkpoint_reads_back_as_it_was_written(
    files: list[tuple[str, int]], aliases: list[str], score: float
) -> None:
    from tracklog.values import build_checkpoint, freeze_mapping

    value = build_checkpoint(
        Path("checkpoints/k/step_1"),
        Path("checkpoints/k/step_1"),
        tuple(aliases),
        freeze_mapping({"score": score, "nested": {"x": [1, "a"]}}, "metadata"),
        tuple(files),
        "checkpoints/k/step_1",
    )
    row = Row(step=1, timestamp=1.0, seq=0, values={"k": value})
    text, _ = encode_row(row, {}, {}, None)
    read = decode_row(text, None).row.values["k"]
    assert isinstance(read, Checkpoint)
    assert read.stored == "checkpoints/k/step_1"
    assert read.files == tuple(files)
    assert read.aliases == tuple(aliases)
    assert read.metadata["score"] == score
    assert type(read.metadata["score"]) is type(score)


@pytest.mark.parametrize(
    "change",
    [
        {"path": "../../etc"},
        {"path": "/etc"},
        {"path": "checkpoints/../../x"},
        {"path": "media/k/step_1"},
        {"path": "checkpoints"},
        {"files": [["../../../etc/passwd", 10]]},
        {"files": [["/etc/passwd", 10]]},
        {"files": [["a//b", 1]]},
        {"files": []},
        {"files": [["a", -1]]},
        {"aliases": ["no/slash"]},
        {"metadata": []},
    ],
)
def test_a_queued_checkpoint_that_leaves_its_folder_is_refused(change: dict[str, object]) -> None:
    document: dict[str, object] = {
        "type": "checkpoint",
        "path": "checkpoints/k/step_1",
        "aliases": ["latest"],
        "metadata": {},
        "files": [["model.zip", 1]],
    }
    document.update(change)
    text = json.dumps({"step": 1, "time": 1.0, "seq": 0, "values": {"k": document}})
    with pytest.raises(CodecError, match="'k'"):
        decode_row(text, None)


@pytest.mark.parametrize(
    ("plant", "queued", "name"),
    [
        ("checkpoints/k/step_1/secret", "checkpoints/k/step_1", "secret"),
        ("checkpoints/k/step_1/sub", "checkpoints/k/step_1", "sub/hostname"),
        ("checkpoints/k/evil", "checkpoints/k/evil/etc", "hostname"),
        ("checkpoints/evil", "checkpoints/evil/step_1", "hostname"),
    ],
)
def test_a_link_planted_in_run_dir_is_never_followed_to_upload(
    tmp_path: Path, plant: str, queued: str, name: str
) -> None:
    """What a queued checkpoint names is opened from run_dir down without following a
    symbolic link at any depth, as the delivery process uploads it."""
    from tracklog._checkpoints import checkpoint_file

    run_dir = tmp_path / "run"
    folder = run_dir / "checkpoints/k/step_1"
    folder.mkdir(parents=True)
    (folder / "model.zip").write_bytes(b"m")
    secret = tmp_path / "secret"
    (secret / "etc" / "step_1").mkdir(parents=True)
    (secret / "hostname").write_text("secret")
    (secret / "etc" / "hostname").write_text("secret")
    (secret / "step_1" / "hostname").mkdir(parents=True, exist_ok=True)
    link = run_dir / plant
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(secret / "hostname" if name == "secret" else secret)
    with checkpoint_file(run_dir, Path("checkpoints/k/step_1"), "model.zip") as found:
        assert found.read_bytes() == b"m"
    with (
        pytest.raises(ValueError, match="checkpoint file"),
        checkpoint_file(run_dir, Path(queued), name),
    ):
        pass


# CheckpointCallback -------------------------------------------------------------------------


def test_checkpoint_callback_with_a_plain_sb3_logger_saves_as_sb3_does(tmp_path: Path) -> None:
    env = make_vec_env("CartPole-v1", n_envs=1, seed=0)
    model = PPO("MlpPolicy", env, n_steps=64, batch_size=64, n_epochs=1, seed=0)
    model.set_logger(sb3_configure(str(tmp_path / "sb3"), ["csv"]))
    with pytest.raises(ValueError, match="needs a save_path"):
        model.learn(64, callback=CheckpointCallback(save_freq=32))
    callback = CheckpointCallback(save_freq=32, save_path=str(tmp_path / "saved"))
    model.learn(64, callback=callback, reset_num_timesteps=False)
    assert [step for step, _ in callback.saved] == [32, 64]
    for _, folder in callback.saved:
        assert sorted(p.name for p in folder.iterdir()) == ["model.zip"]
        PPO.load(folder / "model.zip")
    env.close()


@pytest.fixture
def ppo_run(tmp_path: Path, mlflow_sqlite_uri: str) -> Iterator[dict[str, object]]:
    """A real PPO run with CheckpointCallback, TracklogEvalCallback and EpisodeCallback,
    VecNormalize, all seven outputs and system metrics sampled every half second."""
    run_dir = tmp_path / "run"
    monitors = tmp_path / "monitor"
    settings_ = all_outputs(
        run_dir,
        mlflow_sqlite_uri,
        "ppo-checkpoints",
        system_metrics=0.5,
        summaries={"eval/mean_reward": "best:max"},
    )
    env = VecNormalize(make_vec_env("CartPole-v1", n_envs=2, seed=3, monitor_dir=str(monitors)))
    eval_env = VecNormalize(make_vec_env("CartPole-v1", n_envs=1, seed=4), training=False)
    with tracklog.build_logger(settings_) as logger:
        model = PPO("MlpPolicy", env, n_steps=128, batch_size=128, n_epochs=2, seed=3)
        model.set_logger(logger)
        checkpoints = CheckpointCallback(save_freq=256)
        evaluation = TracklogEvalCallback(
            eval_env, eval_freq=128, n_eval_episodes=3, verbose=0, checkpoints=checkpoints
        )
        episodes = EpisodeCallback()
        model.learn(2048, callback=[checkpoints, evaluation, episodes])
    yield {
        "run_dir": run_dir,
        "monitors": monitors,
        "checkpoints": checkpoints,
        "evaluation": evaluation,
        "episodes": episodes,
        "env": env,
    }
    env.close()
    eval_env.close()


def test_a_ppo_run_keeps_its_checkpoints_with_latest_and_best_in_every_backend(
    ppo_run: dict[str, object], mlflow_sqlite_uri: str, tmp_path: Path
) -> None:
    run_dir = ppo_run["run_dir"]
    checkpoints = ppo_run["checkpoints"]
    evaluation = ppo_run["evaluation"]
    assert isinstance(run_dir, Path)
    assert isinstance(checkpoints, CheckpointCallback)
    assert isinstance(evaluation, TracklogEvalCallback)

    # What was dumped, from JSONL: every checkpoint, and the evaluations.
    rows = read_jsonl(run_dir / "progress.jsonl")
    logged = [(row.step, row.values["checkpoint"]) for row in rows if "checkpoint" in row.values]
    assert len(logged) == len(checkpoints.saved)
    assert [step for step, _ in logged] == [step for step, _ in checkpoints.saved]
    evals = [
        (row.step, row.values["eval/mean_reward"])
        for row in rows
        if "eval/mean_reward" in row.values
    ]
    assert [step for step, _ in evals] == evaluation.eval_steps
    periodic = [step for step in range(512, 2049, 512)]  # save_freq 256 calls x 2 envs
    kept = read_checkpoints(run_dir, key="checkpoint")
    assert [k.step for k in kept if k.aliases == ("latest",)] == periodic
    bests: list[tuple[int, float]] = []
    for step, reward in evals:
        assert isinstance(reward, float)
        if not bests or reward > bests[-1][1]:
            bests.append((step, reward))
    best_kept = [(k.step, k.metadata["mean_reward"]) for k in kept if "best" in k.aliases]
    assert best_kept == bests
    last = kept[-1]
    best = [k for k in kept if "best" in k.aliases][-1]

    # Each kept folder holds the model and the VecNormalize statistics; both load.
    for k in kept:
        assert {p.name for p in k.folder.iterdir()} == {
            "model.zip",
            "model_vecnormalize.pkl",
            RECORD,
        }
    PPO.load(best.folder / "model.zip")
    stats = VecNormalize.load(
        str(last.folder / "model_vecnormalize.pkl"), make_vec_env("CartPole-v1", n_envs=1)
    )
    # SB3 annotates obs_rms as a dict (for dict observations); CartPole's is one RunningMeanStd.
    assert cast("RunningMeanStd", stats.obs_rms).count > 2048

    # MLflow: every checkpoint's files, the tags at the last latest and best, system metrics.
    client, run_id = mlflow_run(mlflow_sqlite_uri, "ppo-checkpoints")
    files = artifact_files(client, run_id, "checkpoints")
    for k in kept:
        path = k.folder.relative_to(run_dir).as_posix()
        assert files[f"{path}/model.zip"] == (k.folder / "model.zip").stat().st_size
        assert f"{path}/model_vecnormalize.pkl" in files
    tags = client.get_run(run_id).data.tags
    assert tags["checkpoint/checkpoint/latest"] == last.folder.relative_to(run_dir).as_posix()
    assert tags["checkpoint/checkpoint/best"] == best.folder.relative_to(run_dir).as_posix()
    fetched = downloaded(
        client, run_id, f"{tags['checkpoint/checkpoint/best']}/model.zip", tmp_path
    )
    assert fetched == (best.folder / "model.zip").read_bytes()
    metrics = client.get_run(run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics
    assert "system/trainer_rss_megabytes" in metrics
    assert metrics["eval/mean_reward/best"] == bests[-1][1]

    # W&B: one model artifact, a version per checkpoint with its aliases; the summary.
    wandb_run = read_wandb_offline(run_dir)
    versions = [a for a in wandb_run.artifacts if a.type == "model"]
    assert [a.metadata["step"] for a in versions] == [k.step for k in kept]
    assert [set(a.aliases) for a in versions] == [set(k.aliases) for k in kept]
    assert {a.name for a in versions} == {f"checkpoint-{wandb_run.run_id}"}
    assert versions[-1].files["model.zip"].digest == md5_b64(
        (last.folder / "model.zip").read_bytes()
    )
    assert wandb_run.summary["eval/mean_reward"] == {"max": bests[-1][1]}

    # One JSONL row per episode, as SB3's Monitor wrote them.
    monitors = ppo_run["monitors"]
    assert isinstance(monitors, Path)
    episodes = sum(len(pd.read_csv(path, skiprows=1)) for path in monitors.glob("*.monitor.csv"))
    assert episodes > 20
    assert sum("episode/return" in row.values for row in rows) == episodes


# Preempted and restarted from the last checkpoint ---------------------------------------

PPO_JOB = """
import sys

from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env

import tracklog
from tracklog.callbacks import CheckpointCallback
from tracklog.readers import latest_checkpoint

run_dir, uri, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
settings = {
    "run_dir": run_dir,
    "resume": "auto",
    "system_metrics": None,
    "outputs": [
        {"type": "jsonl"},
        {"type": "tensorboard"},
        {"type": "mlflow", "tracking_uri": uri, "experiment": "ppo-preempted"},
        {"type": "wandb", "project": "preempted", "mode": "offline"},
    ],
}
env = make_vec_env("CartPole-v1", n_envs=1, seed=0)
with tracklog.build_logger(settings) as logger:
    last = latest_checkpoint(run_dir)
    if last is None:
        model = PPO("MlpPolicy", env, n_steps=128, batch_size=64, n_epochs=1, seed=0)
    else:
        model = PPO.load(last.folder / "model.zip", env=env)
    print("start", model.num_timesteps, flush=True)
    model.set_logger(logger)
    checkpoints = CheckpointCallback(save_freq=256)
    model.learn(total - model.num_timesteps, callback=checkpoints, reset_num_timesteps=False)
"""


def test_a_ppo_run_killed_and_restarted_from_its_last_checkpoint_is_one_run(
    tmp_path: Path, mlflow_sqlite_uri: str
) -> None:
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from tests.crashing import alive, as_float32, child_env
    from tests.tensorboard_readback import scalars

    run_dir = tmp_path / "run"
    script = tmp_path / "job.py"
    script.write_text(PPO_JOB, encoding="utf-8")

    def job(total: int) -> subprocess.Popen[str]:
        command = [sys.executable, str(script), str(run_dir), mlflow_sqlite_uri, str(total)]
        return subprocess.Popen(
            command, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )

    first = job(10**6)
    try:
        deadline = time.monotonic() + 120
        while len(read_checkpoints(run_dir)) < 2:
            assert first.poll() is None, "the first job ended by itself"
            assert time.monotonic() < deadline, "no two checkpoints within 120 s"
            time.sleep(0.05)
        delivery = psutil.Process(first.pid).children(recursive=True)
        assert delivery, "no delivery process"
        first.send_signal(signal.SIGKILL)  # the OOM killer, or SLURM after its grace time
        first.wait(30)
        deadline = time.monotonic() + 90
        while any(alive(process) for process in delivery):
            assert time.monotonic() < deadline, "the orphaned delivery did not finish"
            time.sleep(0.05)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    first_rows = read_jsonl(run_dir / "progress.jsonl")
    last = latest_checkpoint(run_dir)
    assert last is not None
    first_kept = read_checkpoints(run_dir)

    second = job(last.step + 512)
    output, _ = second.communicate(timeout=300)
    assert second.returncode == 0
    assert f"start {last.step}" in output  # the model continues from the checkpoint
    rows = read_jsonl(run_dir / "progress.jsonl")
    second_rows = rows[len(first_rows) :]
    assert rows[: len(first_rows)] == first_rows
    assert second_rows[0].step > last.step
    timed = [row for row in second_rows if "time/total_timesteps" in row.values]
    assert timed[-1].values["time/total_timesteps"] == last.step + 512
    kept = read_checkpoints(run_dir)
    assert kept[: len(first_kept)] == first_kept
    assert len(kept) > len(first_kept)

    # MLflow: one run, FINISHED by the second job, holding every point of both jobs
    # and every checkpoint; the latest tag names the second job's last one.
    client, run_id = mlflow_run(mlflow_sqlite_uri, "ppo-preempted")
    assert client.get_run(run_id).info.status == "FINISHED"
    history = client.get_metric_history(run_id, "time/total_timesteps")
    logged = [(r.step, r.values["time/total_timesteps"]) for r in rows if "time/fps" in r.values]
    assert sorted((point.step, point.value) for point in history) == sorted(
        (step, float(value)) for step, value in logged
    )
    files = artifact_files(client, run_id, "checkpoints")
    for checkpoint in kept:
        path = checkpoint.folder.relative_to(run_dir).as_posix()
        assert files[f"{path}/model.zip"] == (checkpoint.folder / "model.zip").stat().st_size
    tags = client.get_run(run_id).data.tags
    assert tags["checkpoint/checkpoint/latest"] == kept[-1].folder.relative_to(run_dir).as_posix()

    # W&B: both jobs wrote the same run id; one model artifact, a version per checkpoint.
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    wandb_runs = [read_wandb_offline(folder) for folder in folders]
    assert len(wandb_runs) == 2
    assert wandb_runs[0].run_id == wandb_runs[1].run_id
    versions = [a for run in wandb_runs for a in run.artifacts if a.type == "model"]
    assert [a.metadata["step"] for a in versions] == [checkpoint.step for checkpoint in kept]

    # TensorBoard: the first job's points up to the checkpoint, then the second job's.
    shown = [row for row in first_rows if row.step <= last.step] + second_rows
    expected = [
        (r.step, as_float32(float(r.values["time/fps"]))) for r in shown if "time/fps" in r.values
    ]
    assert scalars(read_events(run_dir / "tensorboard"), "time/fps") == expected


# Review fixes: callback order, ranks, disabled, strict, W&B names, late aliases ----------


@pytest.mark.parametrize("order", ["eval only", "eval first", "checkpoints first"])
def test_best_checkpoints_are_saved_at_the_models_step_whatever_the_callback_order(
    tmp_path: Path, order: str
) -> None:
    run_dir = tmp_path / "run"
    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    eval_env = make_vec_env("CartPole-v1", n_envs=1, seed=1)
    with tracklog.build_logger({"run_dir": run_dir, "outputs": [{"type": "jsonl"}]}) as logger:
        model = PPO("MlpPolicy", env, n_steps=64, batch_size=64, n_epochs=1, seed=0)
        model.set_logger(logger)
        checkpoints = CheckpointCallback(save_freq=64)
        evaluation = TracklogEvalCallback(
            eval_env, eval_freq=32, n_eval_episodes=1, verbose=0, checkpoints=checkpoints
        )
        orders: dict[str, list[BaseCallback]] = {
            "eval only": [evaluation],
            "eval first": [evaluation, checkpoints],
            "checkpoints first": [checkpoints, evaluation],
        }
        callbacks = orders[order]
        model.learn(256, callback=callbacks)
    env.close()
    eval_env.close()
    kept = read_checkpoints(run_dir)
    best = [k.step for k in kept if "best" in k.aliases]
    assert best
    assert set(best) <= set(evaluation.eval_steps)  # at the model's num_timesteps
    periodic = [k.step for k in kept if k.aliases == ("latest",)]
    assert periodic == ([] if order == "eval only" else [128, 256])


def test_a_logger_without_a_run_dir_saves_no_checkpoint(tmp_path: Path) -> None:
    """A rank other than 0 (its logger writes nothing) leaves the saving to rank 0."""
    env = make_vec_env("CartPole-v1", n_envs=1, seed=0)
    model = PPO("MlpPolicy", env, n_steps=64, batch_size=64, n_epochs=1, seed=0)
    model.set_logger(tracklog.Logger())
    callback = CheckpointCallback(save_freq=32)
    model.learn(64, callback=callback)
    assert callback.saved == []
    assert callback.save() is None
    env.close()


def test_a_disabled_logger_still_keeps_checkpoints_for_a_restart(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    settings_ = {"run_dir": run_dir, "level": "disabled", "outputs": [{"type": "jsonl"}]}
    saved = tmp_path / "model.zip"
    saved.write_bytes(b"m")
    with tracklog.build_logger(settings_) as logger:
        logger.record("ckpt", Checkpoint(saved))
        logger.record("loss", 1.0)
        logger.dump(7)
    assert not read_jsonl(run_dir / "progress.jsonl")
    latest = latest_checkpoint(run_dir)
    assert latest is not None
    assert latest.step == 7
    assert (latest.folder / "model.zip").read_bytes() == b"m"


def test_with_strict_a_checkpoint_that_cannot_be_kept_raises_after_the_dump(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    saved = tmp_path / "model.zip"
    saved.write_bytes(b"m")
    settings_ = {"run_dir": run_dir, "strict": True, "outputs": [{"type": "jsonl"}]}
    with tracklog.build_logger(settings_) as logger:
        logger.record("ckpt", Checkpoint(saved))
        logger.record("loss", 1.5)
        saved.unlink()
        with pytest.raises(FileNotFoundError, match=r"model\.zip"):
            logger.dump(3)
    (row,) = read_jsonl(run_dir / "progress.jsonl")
    assert dict(row.values) == {"loss": 1.5}


def test_keys_and_run_ids_wandb_refuses_still_name_distinct_artifacts(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    saved = tmp_path / "model.zip"
    saved.write_bytes(b"m")
    wandb_output = {"type": "wandb", "project": "names", "mode": "offline", "id": "exp 1+ü"}
    settings_ = {"run_dir": run_dir, "outputs": [wandb_output]}
    with tracklog.build_logger(settings_) as logger:
        logger.record("a/b", Checkpoint(saved))
        logger.record("a_b", Checkpoint(saved))
        logger.record("x" * 150, Checkpoint(saved))
        logger.dump(1)
    names = [artifact.name for artifact in read_wandb_offline(run_dir).artifacts]
    assert len(names) == len(set(names)) == 3
    assert "a_b-exp_1_" in names  # a key W&B takes keeps its name
    assert all(len(name) <= 128 for name in names)


def test_an_alias_is_never_taken_back_by_a_checkpoint_dumped_before(tmp_path: Path) -> None:
    """What a late delivery (a replay after the restart) of an older checkpoint may move."""
    from tracklog._checkpoints import superseded

    run_dir = tmp_path / "run"
    with tracklog.build_logger({"run_dir": run_dir, "outputs": [{"type": "jsonl"}]}) as logger:
        for step, aliases in [(1, ["best"]), (2, []), (3, ["best"]), (4, [])]:
            saved = tmp_path / "m.zip"
            saved.write_bytes(b"m")
            logger.record("ckpt", Checkpoint(saved, aliases=aliases))
            logger.dump(step)
    assert superseded(run_dir, Path("checkpoints/ckpt/step_1")) == {"latest", "best"}
    assert superseded(run_dir, Path("checkpoints/ckpt/step_3")) == {"latest"}
    assert superseded(run_dir, Path("checkpoints/ckpt/step_4")) == set()


def test_a_row_whose_checkpoint_files_are_gone_leaves_no_history_row_in_wandb(
    tmp_path: Path,
) -> None:
    """The W&B output checks a checkpoint's files before it logs the row: the row fails
    whole, so the delivery's retry of it logs no second history row."""
    from tracklog.outputs import WandBOutputFormat
    from tracklog.settings import WandbOutput
    from tracklog.values import Scalar, build_checkpoint

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints/ck/step_2").mkdir(parents=True)
    output = WandBOutputFormat(WandbOutput(project="gone", mode="offline"), run_dir=run_dir)
    gone = build_checkpoint(
        Path("checkpoints/ck/step_2"),
        Path("checkpoints/ck/step_2"),
        ("latest",),
        {},
        (("model.zip", 1),),
        "checkpoints/ck/step_2",
    )
    output.write_row(Row(step=1, timestamp=1.0, seq=0, values={"a": Scalar(1.0)}))
    with pytest.raises(ValueError, match=r"model\.zip"):
        output.write_row(Row(step=2, timestamp=2.0, seq=1, values={"a": Scalar(2.0), "ck": gone}))
    output.write_row(Row(step=3, timestamp=3.0, seq=2, values={"a": Scalar(3.0)}))
    output.close()
    run = read_wandb_offline(run_dir)
    assert [(row.global_step, row.values["a"]) for row in run.rows] == [(1, 1.0), (3, 3.0)]
    assert run.artifacts == ()


def test_an_off_policy_checkpoint_keeps_its_replay_buffer(tmp_path: Path) -> None:
    from stable_baselines3 import DQN

    run_dir = tmp_path / "run"
    env = make_vec_env("CartPole-v1", n_envs=1, seed=0)
    with tracklog.build_logger({"run_dir": run_dir, "outputs": [{"type": "csv"}]}) as logger:
        model = DQN("MlpPolicy", env, buffer_size=500, learning_starts=50, seed=0)
        model.set_logger(logger)
        model.learn(200, callback=CheckpointCallback(save_freq=100, save_replay_buffer=True))
    kept = read_checkpoints(run_dir)
    assert [k.step for k in kept] == [100, 200]
    last = kept[-1].folder
    assert {p.name for p in last.iterdir()} == {"model.zip", "model_replay_buffer.pkl", RECORD}
    restored = DQN.load(last / "model.zip", env=env)
    restored.load_replay_buffer(last / "model_replay_buffer.pkl")
    assert restored.replay_buffer is not None
    # SB3 calls callbacks after env.step() and before storing that step's transition.
    assert restored.replay_buffer.size() == 200 - 1
    rows = read_csv(run_dir / "progress.csv")
    assert [row.values["checkpoint"] for row in rows if "checkpoint" in row.values] == [
        "checkpoints/checkpoint/step_100",
        "checkpoints/checkpoint/step_200",
    ]
    env.close()


def test_a_run_resumed_from_a_checkpoint_summarises_from_that_checkpoint_on(
    tmp_path: Path,
) -> None:
    """The summaries kept with the newest checkpoint are where the resumed run's start:
    rows of the dead job after it are not the resumed run's, rows before it are."""
    run_dir = tmp_path / "run"
    settings_ = {
        "run_dir": run_dir,
        "resume": "auto",
        "summaries": {"eval/return": "best:max", "loss": ["min", "first"]},
        "outputs": [{"type": "file"}],
    }
    saved = tmp_path / "m.zip"
    saved.write_bytes(b"m")
    with tracklog.build_logger(settings_) as logger:  # the job that is preempted
        for step, reward, loss in [(1, 1.0, 0.9), (2, 9.0, 0.5), (3, 3.0, 0.7)]:
            logger.record("eval/return", reward)
            logger.record("loss", loss)
            logger.dump(step)
        logger.record("ckpt", Checkpoint(saved))
        logger.dump(3)
        logger.record("eval/return", 20.0)  # after the checkpoint: redone by the restart
        logger.record("loss", 0.1)
        logger.dump(4)
    with tracklog.build_logger(settings_) as logger:  # restarted from step 3
        for step, reward, loss in [(4, 5.0, 0.6), (5, 4.0, 0.4)]:
            logger.record("eval/return", reward)
            logger.record("loss", loss)
            logger.dump(step)
    table = (run_dir / "train.log").read_text().rsplit("summary of this run:", 1)[1]
    lines = {tuple(line.split()[:2]): line.split()[2:] for line in table.strip().splitlines()}
    assert lines[("eval/return", "best:max")] == ["9", "2"]
    assert lines[("loss", "min")] == ["0.4", "5"]
    assert lines[("loss", "first")] == ["0.9", "1"]


@pytest.mark.parametrize("call", ["dump", "dump_rows"])
def test_a_checkpoint_keeps_the_summaries_counting_the_row_it_is_dumped_with(
    tmp_path: Path, call: str
) -> None:
    """A best checkpoint dumped with its own score: a restart from it keeps that score."""
    run_dir = tmp_path / "run"
    settings_ = {
        "run_dir": run_dir,
        "resume": "auto",
        "summaries": {"eval/return": "best:max"},
        "outputs": [{"type": "file"}],
    }
    saved = tmp_path / "m.zip"
    saved.write_bytes(b"m")
    with tracklog.build_logger(settings_) as logger:
        logger.record("eval/return", 1.0)
        logger.dump(1)
        if call == "dump":
            logger.record("eval/return", 9.0)
            logger.record("ckpt", Checkpoint(saved, aliases=("best",)))
            logger.dump(2)
        else:
            logger.dump_rows([(2, {"eval/return": 9.0, "ckpt": Checkpoint(saved)})])
    (kept,) = read_checkpoints(run_dir)
    assert kept.summaries == {
        "eval/return": {
            "count": 2,
            "total": 10.0,
            "first": [1.0, 1],
            "last": [9.0, 2],
            "low": [1.0, 1],
            "high": [9.0, 2],
        }
    }
    with tracklog.build_logger(settings_) as logger:  # restarted from that checkpoint
        logger.record("eval/return", 4.0)
        logger.dump(3)
    table = (run_dir / "train.log").read_text().rsplit("summary of this run:", 1)[1]
    lines = {tuple(line.split()[:2]): line.split()[2:] for line in table.strip().splitlines()}
    assert lines[("eval/return", "best:max")] == ["9", "2"]
