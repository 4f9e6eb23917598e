"""Settings: what build_logger accepts, what it rejects (and with which message), and the env."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr, ValidationError

import tracklog
from tracklog.settings import (
    ConsoleOutput,
    CsvOutput,
    FileOutput,
    JsonlOutput,
    LoggerSettings,
    MlflowOutput,
    WandbOutput,
    mask_uri,
)


def _jsonl_rows(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _log_one_row(settings: LoggerSettings | dict[str, object] | str | Path) -> None:
    with tracklog.build_logger(settings) as logger:
        logger.record("check/value", 1.5)
        logger.dump(step=7)


# Valid settings ------------------------------------------------------------------------


def test_settings_from_a_model_build_every_default_output(run_dir: Path) -> None:
    settings = LoggerSettings(run_dir=run_dir)
    assert [type(output) for output in settings.outputs] == [
        ConsoleOutput,
        FileOutput,
        JsonlOutput,
        CsvOutput,
    ]
    _log_one_row(settings)
    assert sorted(path.name for path in run_dir.iterdir()) == [
        "progress.csv",
        "progress.jsonl",
        "tracklog.json",
        "train.log",
    ]
    assert _jsonl_rows(run_dir / "progress.jsonl")[0]["check/value"] == 1.5


def test_settings_from_a_dict(run_dir: Path) -> None:
    _log_one_row(
        {
            "run_dir": str(run_dir),
            "level": "debug",
            "outputs": [{"type": "jsonl", "path": "metrics/out.jsonl"}, {"type": "csv"}],
        }
    )
    rows = _jsonl_rows(run_dir / "metrics" / "out.jsonl")
    assert [(row["_step"], row["check/value"]) for row in rows] == [(7, 1.5)]
    assert (run_dir / "progress.csv").exists()
    assert not (run_dir / "train.log").exists()


def _write_yaml(path: Path, data: dict[str, object]) -> None:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")


def _write_json(path: Path, data: dict[str, object]) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


def _write_toml(path: Path, data: dict[str, object]) -> None:
    # A tiny writer for the two shapes used here (the standard library only reads TOML).
    lines = [f'run_dir = "{data["run_dir"]}"', f'level = "{data["level"]}"']
    outputs = data["outputs"]
    assert isinstance(outputs, list)
    for output in outputs:
        lines.append("[[outputs]]")
        lines.extend(f'{name} = "{value}"' for name, value in output.items())
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.parametrize(
    ("suffix", "write"),
    [(".yaml", _write_yaml), (".yml", _write_yaml), (".toml", _write_toml), (".json", _write_json)],
)
def test_settings_from_a_file(
    tmp_path: Path,
    run_dir: Path,
    suffix: str,
    write: Callable[[Path, dict[str, object]], None],
) -> None:
    path = tmp_path / f"logging{suffix}"
    write(
        path,
        {
            "run_dir": str(run_dir),
            "level": "warn",
            "outputs": [{"type": "jsonl", "path": "p.jsonl"}, {"type": "file", "path": "x.log"}],
        },
    )
    settings = tracklog.load_settings(path)
    assert settings.run_dir == run_dir
    assert settings.level == "warn"
    assert settings.outputs == [JsonlOutput(path=Path("p.jsonl")), FileOutput(path=Path("x.log"))]
    _log_one_row(str(path))  # a str path works as well as a Path
    assert _jsonl_rows(run_dir / "p.jsonl")[0]["check/value"] == 1.5
    assert (run_dir / "x.log").exists()


def test_an_empty_yaml_file_means_all_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    assert tracklog.load_settings(path) == LoggerSettings()


# Rejected settings: each with its message, and nothing created -------------------------


def _expect_invalid(run_dir: Path, settings: dict[str, object]) -> str:
    with pytest.raises(ValidationError) as caught:
        tracklog.build_logger({"run_dir": str(run_dir), **settings})
    assert not run_dir.exists(), "invalid settings must not create the run directory"
    return str(caught.value)


def test_unknown_output_field_names_its_path(run_dir: Path) -> None:
    message = _expect_invalid(
        run_dir, {"outputs": [{"type": "console"}, {"type": "jsonl", "colour": "red"}]}
    )
    assert "outputs.1.jsonl.colour" in message
    assert "Extra inputs are not permitted" in message


def test_unknown_top_level_field(run_dir: Path) -> None:
    message = _expect_invalid(run_dir, {"colour": "red"})
    assert "colour" in message
    assert "Extra inputs are not permitted" in message


def test_unknown_output_type(run_dir: Path) -> None:
    message = _expect_invalid(run_dir, {"outputs": [{"type": "jsonl"}, {"type": "carrier-pigeon"}]})
    assert "outputs.1" in message
    assert "'carrier-pigeon'" in message
    assert "'console', 'file', 'jsonl', 'csv'" in message


def test_output_without_type(run_dir: Path) -> None:
    message = _expect_invalid(run_dir, {"outputs": [{"path": "a.jsonl"}]})
    assert "outputs.0" in message
    assert "type" in message


def test_bad_level(run_dir: Path) -> None:
    message = _expect_invalid(run_dir, {"level": "loud"})
    assert "level" in message
    assert "'debug', 'info', 'warn', 'error' or 'disabled'" in message


@pytest.mark.parametrize(
    "outputs",
    [
        [{"type": "jsonl"}, {"type": "jsonl"}],
        [{"type": "jsonl", "path": "same.txt"}, {"type": "csv", "path": "same.txt"}],
        [{"type": "file", "path": "a.log"}, {"type": "csv", "path": "./a.log"}],
    ],
)
def test_two_outputs_writing_one_file(run_dir: Path, outputs: list[dict[str, str]]) -> None:
    message = _expect_invalid(run_dir, {"outputs": outputs})
    assert "outputs.1.path" in message
    assert "is already written by outputs.0" in message


def test_an_absolute_path_inside_run_dir_is_the_same_file(run_dir: Path) -> None:
    absolute = str(run_dir / "progress.jsonl")
    message = _expect_invalid(
        run_dir, {"outputs": [{"type": "jsonl"}, {"type": "csv", "path": absolute}]}
    )
    assert "outputs.1.path" in message


def test_two_consoles(run_dir: Path) -> None:
    message = _expect_invalid(
        run_dir, {"outputs": [{"type": "console"}, {"type": "jsonl"}, {"type": "console"}]}
    )
    assert "outputs.2: only one console output is allowed" in message


@pytest.mark.parametrize("path", ["", "."])
@pytest.mark.parametrize("kind", ["file", "jsonl", "csv"])
def test_empty_path(run_dir: Path, kind: str, path: str) -> None:
    message = _expect_invalid(run_dir, {"outputs": [{"type": kind, "path": path}]})
    assert f"outputs.0.{kind}.path" in message
    assert "path must name a file" in message


def test_console_max_length_bounds(run_dir: Path) -> None:
    message = _expect_invalid(run_dir, {"outputs": [{"type": "console", "max_length": 3}]})
    assert "outputs.0.console.max_length" in message
    assert "greater than or equal to 8" in message


def test_outputs_must_be_a_list(run_dir: Path) -> None:
    message = _expect_invalid(run_dir, {"outputs": "console"})
    assert "outputs" in message
    assert "Input should be a valid list" in message


@pytest.mark.parametrize("suffix", [".ini", ".txt", ".png", ""])
def test_unsupported_file_extension(tmp_path: Path, run_dir: Path, suffix: str) -> None:
    path = tmp_path / f"logging{suffix}"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff" if suffix == ".png" else b"run_dir = 'x'\n")
    with pytest.raises(ValueError, match="unsupported settings file type") as caught:
        tracklog.build_logger(path)
    assert repr(suffix) in str(caught.value)
    assert ".yaml, .yml, .toml or .json" in str(caught.value)
    assert not run_dir.exists()


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("list.yaml", "- type: console\n- type: jsonl\n"),
        ("scalar.yml", "just a string\n"),
        ("list.json", '[{"run_dir": "x"}]'),
    ],
)
def test_non_mapping_top_level(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(TypeError, match="settings must be a mapping at the top level") as caught:
        tracklog.build_logger(path)
    assert name in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.parametrize("source", [["run_dir", "x"], 42, None])
def test_a_source_that_is_not_settings(source: object) -> None:
    with pytest.raises(TypeError, match="settings must be a LoggerSettings, a mapping or a path"):
        tracklog.load_settings(source)  # type: ignore[arg-type]  # the wrong type is the test


def test_settings_models_are_frozen() -> None:
    settings = LoggerSettings()
    with pytest.raises(ValidationError, match="frozen"):
        settings.level = "debug"


def test_an_invalid_file_creates_nothing(tmp_path: Path, run_dir: Path) -> None:
    path = tmp_path / "logging.yaml"
    _write_yaml(
        path,
        {"run_dir": str(run_dir), "outputs": [{"type": "jsonl"}, {"type": "csv", "colour": 1}]},
    )
    with pytest.raises(ValidationError, match=r"outputs\.1\.csv\.colour"):
        tracklog.build_logger(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logging.yaml"]


# Environment overrides -----------------------------------------------------------------


def test_environment_overrides(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, run_dir: Path
) -> None:
    monkeypatch.setenv("TRACKLOG_RUN_DIR", str(run_dir))
    monkeypatch.setenv("TRACKLOG_LEVEL", "error")
    monkeypatch.setenv(
        "TRACKLOG_OUTPUTS", json.dumps([{"type": "jsonl", "path": "from-env.jsonl"}])
    )
    settings = LoggerSettings()
    assert settings.run_dir == run_dir
    assert settings.level == "error"
    assert settings.level_number == 40
    assert settings.outputs == [JsonlOutput(path=Path("from-env.jsonl"))]
    _log_one_row({})
    assert _jsonl_rows(run_dir / "from-env.jsonl")[0]["check/value"] == 1.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_environment_wins_over_file_values(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, run_dir: Path
) -> None:
    file_run_dir = tmp_path / "from-file"
    path = tmp_path / "logging.yaml"
    _write_yaml(
        path,
        {"run_dir": str(file_run_dir), "level": "debug", "outputs": [{"type": "csv"}]},
    )
    monkeypatch.setenv("TRACKLOG_RUN_DIR", str(run_dir))
    monkeypatch.setenv("TRACKLOG_LEVEL", "warn")
    monkeypatch.setenv("TRACKLOG_OUTPUTS", '[{"type": "jsonl"}]')
    settings = tracklog.load_settings(path)
    assert (settings.run_dir, settings.level) == (run_dir, "warn")
    _log_one_row(path)
    assert not file_run_dir.exists()
    assert sorted(p.name for p in run_dir.iterdir()) == ["progress.jsonl", "tracklog.json"]


def test_environment_wins_over_a_dict(monkeypatch: pytest.MonkeyPatch, run_dir: Path) -> None:
    monkeypatch.setenv("TRACKLOG_LEVEL", "disabled")
    settings = tracklog.load_settings({"run_dir": str(run_dir), "level": "debug"})
    assert settings.level == "disabled"


def test_file_values_apply_where_the_environment_is_silent(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, run_dir: Path
) -> None:
    path = tmp_path / "logging.json"
    _write_json(path, {"run_dir": str(tmp_path / "other"), "level": "debug"})
    monkeypatch.setenv("TRACKLOG_RUN_DIR", str(run_dir))
    settings = tracklog.load_settings(path)
    assert (settings.run_dir, settings.level) == (run_dir, "debug")


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("TRACKLOG_LEVEL", "loud", "level"),
        ("TRACKLOG_OUTPUTS", '[{"type": "jsonl", "colour": 1}]', "outputs.0.jsonl.colour"),
        ("TRACKLOG_OUTPUTS", '[{"type": "console"}, {"type": "console"}]', "only one console"),
    ],
)
def test_invalid_environment_values_are_rejected_and_create_nothing(
    monkeypatch: pytest.MonkeyPatch, run_dir: Path, name: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as caught:
        tracklog.build_logger({"run_dir": str(run_dir)})
    assert expected in str(caught.value)
    assert not run_dir.exists()


# Secrets ---------------------------------------------------------------------------------

_PASSWORD = "hunter2-do-not-print"
_API_KEY = "wandb-key-0123456789abcdef"


@pytest.mark.parametrize(
    ("output", "secret"),
    [
        (MlflowOutput(username="me", password=SecretStr(_PASSWORD)), _PASSWORD),
        (MlflowOutput.model_validate({"username": "me", "password": _PASSWORD}), _PASSWORD),
        (WandbOutput(project="demo", api_key=SecretStr(_API_KEY)), _API_KEY),
        (WandbOutput.model_validate({"api_key": _API_KEY}), _API_KEY),
    ],
)
def test_secrets_are_never_shown(output: MlflowOutput | WandbOutput, secret: str) -> None:
    shown = [
        repr(output),
        str(output),
        output.model_dump_json(),
        str(output.model_dump()),
        json.dumps(output.model_dump(mode="json")),
    ]
    for text in shown:
        assert secret not in text
    assert "**********" in repr(output)
    # The secret is still there for the code that needs it.
    hidden = output.password if isinstance(output, MlflowOutput) else output.api_key
    assert hidden is not None
    assert hidden.get_secret_value() == secret


@pytest.mark.parametrize(
    ("uri", "masked"),
    [
        ("postgresql://u:pa/ss@h/db", "postgresql://u:***@h/db"),
        ("http://me:s3#c?r/et@host:5000/x", "http://me:***@host:5000/x"),
        ("postgresql://u@h/db?password=sec&x=1", "postgresql://u@h/db?password=***&x=1"),
        (
            "mssql+pyodbc:///?odbc_connect=DRIVER%3Dx%3BPWD%3Dsec%3BUID%3Du",
            "mssql+pyodbc:///?odbc_connect=DRIVER%3Dx%3BPWD%3D***%3BUID%3Du",
        ),
        ("sqlite:///a.db", "sqlite:///a.db"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ],
)
def test_every_password_in_a_tracking_uri_is_masked(uri: str, masked: str) -> None:
    assert mask_uri(uri) == masked


@given(
    password=st.text(
        st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="@"), min_size=6
    )
)
def test_a_userinfo_password_of_any_characters_is_masked(password: str) -> None:
    assert password not in mask_uri(f"postgresql://user:{password}@db.example:5432/mlflow")
    assert password not in mask_uri(f"http://user:{password}@127.0.0.1:5000")
