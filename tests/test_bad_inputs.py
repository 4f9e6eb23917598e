"""Bad inputs get a clear error at the call, naming the field path or the key.

Each case was once accepted and then broke later (an OverflowError at close, a file
written where a folder belongs, a 0-byte video) or failed with a message that named
nothing, or showed a secret. Nothing here writes a run_dir: settings are refused before
anything is created, values before anything is recorded.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

import tracklog
from tracklog.settings import load_settings

SECRET = "hunter2-Sekr3t/#?"


def refused(settings: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as caught:
        load_settings(settings)
    return str(caught.value)


# Timeouts and intervals: finite and bounded ----------------------------------------------


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 1e300])
@pytest.mark.parametrize(
    ("output", "field"),
    [
        ({"type": "mlflow"}, "request_timeout"),
        ({"type": "mlflow"}, "artifact_upload_interval"),
        ({"type": "wandb"}, "finish_timeout"),
    ],
)
def test_a_timeout_must_be_a_finite_number_of_seconds(
    output: dict[str, Any], field: str, value: float
) -> None:
    message = refused({"outputs": [{**output, field: value}]})
    assert f"outputs.0.{output['type']}.{field}" in message


@pytest.mark.parametrize("field", ["close_timeout", "deadline", "retry_max", "linger"])
@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_a_delivery_time_must_be_a_finite_number_of_seconds(field: str, value: float) -> None:
    assert f"delivery.{field}" in refused({"delivery": {field: value}})


# File paths: a file, not a folder, and not where tracklog writes something else --------


@pytest.mark.parametrize("kind", ["jsonl", "csv", "file"])
@pytest.mark.parametrize(
    ("path", "detail"),
    [
        ("..", "must name a file"),
        ("logs/..", "must name a file"),
        ("a\x00b.jsonl", "NUL"),
        ("media", "media"),
        ("media/progress.jsonl", "media"),
        ("wandb", "wandb"),
        ("spool", "spool"),
        ("spool/rows.csv", "spool"),
    ],
)
def test_a_file_path_that_cannot_be_that_files_is_refused_naming_the_field(
    tmp_path: Path, kind: str, path: str, detail: str
) -> None:
    settings = {"run_dir": str(tmp_path / "run"), "outputs": [{"type": kind, "path": path}]}
    message = refused(settings)
    assert f"outputs.0.{kind}" in message
    assert detail in message
    assert not (tmp_path / "run").exists()


def test_a_file_where_the_tensorboard_folder_is_is_refused(tmp_path: Path) -> None:
    # Files beside the event files are fine (SB3 puts them all in one folder); a file
    # in the folder's own place is not.
    message = refused(
        {
            "run_dir": str(tmp_path / "run"),
            "outputs": [{"type": "tensorboard"}, {"type": "jsonl", "path": "tensorboard"}],
        }
    )
    assert "outputs.1.path: tensorboard is already written by outputs.0" in message
    beside = load_settings(
        {
            "run_dir": str(tmp_path / "run"),
            "outputs": [{"type": "tensorboard"}, {"type": "jsonl", "path": "tensorboard/x.jsonl"}],
        }
    )
    assert len(beside.outputs) == 2


def test_a_spool_named_file_is_fine_when_the_queue_lives_elsewhere(tmp_path: Path) -> None:
    settings = load_settings(
        {
            "run_dir": str(tmp_path / "run"),
            "outputs": [{"type": "jsonl", "path": "spool"}],
            "delivery": {"spool_dir": str(tmp_path / "queue")},
        }
    )
    assert settings.outputs[0].path == Path("spool")  # type: ignore[union-attr]


# W&B config: JSON data only, named by its path ------------------------------------------


def test_a_wandb_config_holding_an_object_names_where(tmp_path: Path) -> None:
    message = refused(
        {"outputs": [{"type": "wandb", "config": {"model": {"layers": [64, object()]}}}]}
    )
    assert "outputs.0.wandb.config" in message
    assert "config['model']['layers'][1]" in message
    assert "object" in message


def test_a_wandb_config_of_json_data_is_kept() -> None:
    config = {"lr": 3e-4, "arch": {"layers": [64, 64], "act": "tanh"}, "seed": None}
    (output,) = load_settings({"outputs": [{"type": "wandb", "config": config}]}).outputs
    assert output.config == config  # type: ignore[union-attr]


# Settings files: a key given twice is an error, not "the last one wins" ---------------


def test_a_duplicate_yaml_key_is_refused_naming_it_and_its_line(tmp_path: Path) -> None:
    path = tmp_path / "logging.yaml"
    path.write_text(
        "run_dir: runs/a\noutputs:\n  - type: jsonl\n    path: a.jsonl\n    path: b.jsonl\n",
        encoding="utf-8",
    )
    with pytest.raises(ValueError, match="duplicate key 'path'") as caught:
        load_settings(path)
    assert "line 5" in str(caught.value)
    assert str(path) in str(caught.value)
    path.write_text("run_dir: runs/a\nrun_dir: runs/b\n", encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"line 2: duplicate key 'run_dir' \(first given on line 1\)"
    ):
        load_settings(path)
    path = tmp_path / "logging.json"
    path.write_text('{"run_dir": "a", "run_dir": "b"}', encoding="utf-8")
    with pytest.raises(ValueError, match="duplicate key 'run_dir'"):
        load_settings(path)


# HParam: names that collide once flattened, and a dict that holds itself ----------------


def test_hparam_names_that_collide_when_flattened_are_refused_naming_both() -> None:
    with pytest.raises(ValueError, match="hparam_dict") as caught:
        tracklog.HParam({"a.b": 1, "a": {"b": 2}}, {})
    message = str(caught.value)
    assert "'a.b'" in message
    assert "['a']['b']" in message


def test_an_hparam_dict_that_contains_itself_is_refused_naming_where() -> None:
    looped: dict[str, object] = {"lr": 0.1}
    looped["opt"] = {"inner": looped}
    with pytest.raises(ValueError, match=r"hparam_dict\['opt'\]\['inner'\] contains itself"):
        tracklog.HParam(looped, {})


# Video size: refused at record(), naming the key and the setting ----------------------


def test_a_video_larger_than_max_media_bytes_is_refused_at_record(tmp_path: Path) -> None:
    settings = {
        "run_dir": str(tmp_path / "run"),
        "outputs": [{"type": "jsonl"}],
        "max_media_bytes": 1_000_000,
    }
    frames = np.zeros((1, 20, 3, 128, 128), dtype=np.uint8)  # 983,040 bytes: allowed
    with tracklog.build_logger(settings) as logger:
        logger.record("eval/small", tracklog.Video(frames, fps=10))
        big = tracklog.Video(np.zeros((1, 21, 3, 128, 128), dtype=np.uint8), fps=10)
        with pytest.raises(ValueError, match="'eval/big'") as caught:
            logger.record("eval/big", big)
        assert "max_media_bytes" in str(caught.value)
        assert "1,032,192 bytes" in str(caught.value)
        logger.dump(1)
    rows = tracklog.readers.read_jsonl(tmp_path / "run" / "progress.jsonl")
    assert [sorted(row.values) for row in rows] == [["eval/small"]]


def test_max_media_bytes_defaults_to_a_gibibyte_and_must_be_positive() -> None:
    assert load_settings({}).max_media_bytes == 2**30
    assert "max_media_bytes" in refused({"max_media_bytes": 0})


# Secrets never appear in a validation error ---------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        {"outputs": [{"type": "mlflow", "password": SECRET}]},  # a password without username
        {"outputs": [{"type": "wandb", "apikey": SECRET}]},  # a misspelt api_key
        {"outputs": [{"type": "wandb", "api_key": SECRET, "mode": "sometimes"}]},
        {"outputs": [{"type": "mlflow", "username": "u", "password": SECRET, "tags": 3}]},
        {
            "outputs": [
                {"type": "mlflow", "tracking_uri": f"http://u:{SECRET}@host", "request_timeout": 0}
            ]
        },
    ],
    ids=["password-without-username", "misspelt-api-key", "bad-mode", "bad-tags", "uri"],
)
def test_no_validation_error_shows_a_secret(settings: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as caught:
        tracklog.build_logger(settings)
    assert SECRET not in str(caught.value)
    assert SECRET not in repr(caught.value)
    assert "outputs.0" in str(caught.value)  # still names where
