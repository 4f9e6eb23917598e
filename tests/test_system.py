"""System metrics sampled by the delivery process, read back from MLflow, TensorBoard,
``system.jsonl`` and the W&B run file (which gets none of tracklog's: W&B samples)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pydantic
import pytest
from mlflow import MlflowClient

import tracklog
from tests.tensorboard_readback import read_events, scalars
from tracklog.readers import read_jsonl, read_wandb_offline


def _settings(
    run_dir: Path, uri: str, experiment: str, interval: float | None
) -> dict[str, object]:
    return {
        "run_dir": run_dir,
        "system_metrics": interval,
        "outputs": [
            {"type": "jsonl"},
            {"type": "tensorboard"},
            {"type": "mlflow", "tracking_uri": uri, "experiment": experiment},
            {"type": "wandb", "project": "system", "mode": "offline"},
        ],
    }


def _mlflow_run(uri: str, experiment: str) -> str:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    (run,) = client.search_runs([found.experiment_id])
    return str(run.info.run_id)


def test_system_metrics_reach_mlflow_tensorboard_and_system_jsonl(
    tmp_path: Path, mlflow_sqlite_uri: str
) -> None:
    run_dir = tmp_path / "run"
    with tracklog.build_logger(_settings(run_dir, mlflow_sqlite_uri, "system-on", 0.2)) as logger:
        logger.record("a", 1.0)
        logger.dump(1)
        logger.flush()  # the delivery process is up: sampling
        time.sleep(1.5)
        rss = psutil.Process().memory_info().rss / 1e6  # this process is the trainer
    client = MlflowClient(mlflow_sqlite_uri)
    run_id = _mlflow_run(mlflow_sqlite_uri, "system-on")
    history = client.get_metric_history(run_id, "system/trainer_rss_megabytes")
    assert len(history) >= 4
    assert sorted(p.step for p in history) == list(range(len(history)))
    assert all(rss / 2 < p.value < rss * 2 for p in history), (rss, [p.value for p in history])
    cpu = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert len(cpu) == len(history)
    assert all(0 <= p.value <= 100 for p in cpu)
    memory = client.get_metric_history(run_id, "system/system_memory_usage_megabytes")
    total = psutil.virtual_memory().total / 1e6
    assert all(0 < p.value < total for p in memory)

    # TensorBoard and system.jsonl got the same samples (a sample taken while the
    # logger closed may reach only some of them).
    events = read_events(run_dir / "tensorboard")
    tensorboard = scalars(events, "system/trainer_rss_megabytes")
    samples = read_jsonl(run_dir / "system.jsonl")
    mlflow_steps = {p.step for p in history}
    assert len(mlflow_steps & {step for step, _ in tensorboard}) >= len(history) - 1
    assert len(mlflow_steps & {row.step for row in samples}) >= len(history) - 1
    # The trainer's own files and the W&B run hold only what it logged.
    assert [sorted(row.values) for row in read_jsonl(run_dir / "progress.jsonl")] == [["a"]]
    wandb_keys = {key for row in read_wandb_offline(run_dir).rows for key in row.values}
    assert not any(key.startswith("system/") for key in wandb_keys)


def test_system_metrics_null_samples_nothing(tmp_path: Path, mlflow_sqlite_uri: str) -> None:
    run_dir = tmp_path / "run"
    with tracklog.build_logger(_settings(run_dir, mlflow_sqlite_uri, "system-off", None)) as logger:
        logger.record("a", 1.0)
        logger.dump(1)
        logger.flush()
        time.sleep(0.5)
    run_id = _mlflow_run(mlflow_sqlite_uri, "system-off")
    assert set(MlflowClient(mlflow_sqlite_uri).get_run(run_id).data.metrics) == {"a"}
    assert not (run_dir / "system.jsonl").exists()


@pytest.mark.parametrize("interval", [0, -1, float("nan"), 10_000])
def test_a_bad_interval_is_refused_naming_the_field(interval: float) -> None:
    with pytest.raises(pydantic.ValidationError, match="system_metrics"):
        tracklog.load_settings({"system_metrics": interval})


def test_an_output_writing_system_jsonl_is_refused_while_sampling_writes_it() -> None:
    outputs = [{"type": "jsonl"}, {"type": "csv", "path": "system.jsonl"}]
    with pytest.raises(
        pydantic.ValidationError, match=r"system\.jsonl is already written by system_metrics"
    ):
        tracklog.load_settings({"outputs": outputs})
    tracklog.load_settings({"outputs": outputs, "system_metrics": None})  # not sampled: free


def test_gpus_are_sampled_through_nvml_where_its_driver_answers(tmp_path: Path) -> None:
    """nvidia-ml-py is installed (the ``gpu`` extra). Where NVML starts (an NVIDIA
    driver and GPUs), every GPU is in the sample; where it does not (this CI machine:
    no libnvidia-ml.so), GPUs are left out and the rest is sampled as always."""
    import pynvml

    from tracklog._system import SystemSampler

    try:
        pynvml.nvmlInit()
        gpus = pynvml.nvmlDeviceGetCount()
    except pynvml.NVMLError:
        gpus = 0
    sampler = SystemSampler(os.getpid(), tmp_path)
    time.sleep(0.05)
    values = sampler.sample().values
    assert "system/cpu_utilization_percentage" in values
    assert "system/trainer_rss_megabytes" in values
    sampled = {key.split("_")[1] for key in values if key.startswith("system/gpu_")}
    assert sampled == {str(i) for i in range(gpus)}
    for i in range(gpus):
        assert f"system/gpu_{i}_memory_usage_megabytes" in values
        assert f"system/gpu_{i}_utilization_percentage" in values


def test_wandb_samples_the_trainer_not_the_delivery_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """W&B runs in the delivery process but samples the trainer's pid (``x_stats_pid``):
    its ``proc.memory.rssMB`` is this process's, which holds a 1 GB array."""
    import json

    import numpy as np

    from tracklog.readers import wandb_records

    monkeypatch.setenv("WANDB_SILENT", "true")
    held = np.ones(2**30 // 8)  # touched: resident in this (the trainer's) memory
    settings = {
        "run_dir": tmp_path / "run",
        "system_metrics": 0.5,
        "outputs": [{"type": "wandb", "project": "system", "mode": "offline"}],
    }
    with tracklog.build_logger(settings) as logger:
        for step in range(8):
            logger.record("x", float(step))
            logger.dump(step)
            time.sleep(0.25)
    record_class = __import__("wandb.proto.wandb_internal_pb2", fromlist=["Record"]).Record
    (log,) = (tmp_path / "run").glob("wandb/offline-run-*/run-*.wandb")
    rss: list[float] = []
    for payload in wandb_records(log):
        record = record_class()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "stats":
            items = {item.key: json.loads(item.value_json) for item in record.stats.item}
            rss += [items["proc.memory.rssMB"]] if "proc.memory.rssMB" in items else []
    assert rss, "W&B wrote no process sample"
    assert min(rss) > 1024  # the delivery process holds no such array
    assert held.sum() == held.size
