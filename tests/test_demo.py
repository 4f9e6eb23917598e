"""The demo `make demo` runs (``tracklog demo``), shortened: it trains, records videos,
reads them back, and ``tracklog plot`` draws its learning curve."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import av
import pytest
import yaml
from mlflow import MlflowClient

from tests.test_cli import BLUE, assert_curve, child_env, run_subprocess
from tracklog._demo import DEFAULT_SETTINGS
from tracklog.readers import read_csv, read_jsonl, read_wandb_offline
from tracklog.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]


def test_built_in_settings_are_examples_demo_yaml() -> None:
    """``tracklog demo`` from a wheel (no examples/) logs exactly as ``make demo`` does."""
    assert load_settings(DEFAULT_SETTINGS) == load_settings(ROOT / "examples" / "demo.yaml")


def test_examples_demo_py_is_tracklog_demo() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--help"],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == run_subprocess("demo", "--help").stdout


@pytest.mark.slow
def test_demo_trains_logs_and_records_videos(tmp_path: Path) -> None:
    settings = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    settings["run_dir"] = str(tmp_path / "demo")
    # Read back right after the process ends: its close() must not give up on a delivery
    # process that the rest of the suite starves of CPU (it runs at nice 10).
    settings["delivery"] = {"close_timeout": 120}
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for output in settings["outputs"]:
        if output["type"] == "mlflow":
            output["tracking_uri"] = tracking_uri
    settings_file = tmp_path / "demo.yaml"
    settings_file.write_text(yaml.safe_dump(settings))

    def demo(steps: int, video_every: int) -> str:
        command = [sys.executable, "-m", "tracklog", "demo", "--settings", str(settings_file)]
        done = subprocess.run(
            [*command, "--steps", str(steps), "--video-every", str(video_every)],
            capture_output=True,
            text=True,
            env=child_env(),
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    demo(6144, 3072)

    run_dir = tmp_path / "demo"
    rows = read_jsonl(run_dir / "progress.jsonl")
    assert [row.step for row in read_csv(run_dir / "progress.csv")] == [row.step for row in rows]
    rewards = [
        row.values["rollout/ep_rew_mean"] for row in rows if "rollout/ep_rew_mean" in row.values
    ]
    assert len(rewards) >= 2
    videos = [row for row in rows if "eval/video" in row.values]
    assert len(videos) >= 2
    for row in videos:
        path = run_dir / str(row.values["eval/video"])
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            assert sum(1 for _ in container.decode(stream)) > 4
            assert stream.average_rate == 25
    hparams = [row for row in rows if "hparams" in row.values]
    assert len(hparams) == 2  # at the start, and with the final scores at the end
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("tracklog-demo")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["algorithm"] == "PPO"
    history = client.get_metric_history(run.info.run_id, "rollout/ep_rew_mean")
    # By step: MLflow does not promise the order it returns a history in.
    assert [point.value for point in sorted(history, key=lambda point: point.step)] == rewards
    assert len(client.list_artifacts(run.info.run_id, "videos/eval/video")) == len(videos)
    wandb_run = read_wandb_offline(run_dir)
    assert [
        row.values["rollout/ep_rew_mean"]
        for row in wandb_run.rows
        if "rollout/ep_rew_mean" in row.values
    ] == rewards
    wandb_videos = [
        row.values["eval/video"] for row in wandb_run.rows if "eval/video" in row.values
    ]
    assert len(wandb_videos) == len(videos)
    assert all(wandb_run.media_path(video).exists() for video in wandb_videos)
    assert wandb_run.config["algorithm"] == "PPO"
    log = (run_dir / "train.log").read_text()
    assert "rollout/" in log
    assert "evaluation at step" in log

    # Done when: `tracklog plot` on the demo run writes a PNG that shows the learning curve.
    plotted = run_subprocess("plot", run_dir, "--key", "rollout/ep_rew_mean")
    assert plotted.code == 0, plotted.stderr
    assert f"1 curve(s), {len(rewards)} points" in plotted.stdout
    assert_curve(run_dir / "plot.png", BLUE)

    # Run again in the same run_dir: a second, clean run in demo_2; the first is untouched.
    again = demo(2048, 1024)
    assert f"{run_dir} holds an earlier run; this run writes to {run_dir}_2" in again
    assert read_jsonl(run_dir / "progress.jsonl") == rows
    second = [row.step for row in read_jsonl(tmp_path / "demo_2" / "progress.jsonl")]
    assert second == sorted(second)
    assert second[-1] <= 2048 < rows[-1].step
    assert len(client.search_runs([experiment.experiment_id])) == 2
