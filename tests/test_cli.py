"""The ``tracklog`` command, run as a real subprocess and in-process through ``main(argv)``.

Every command's output is read back with a real reader: YAML and JSON parsers for
``validate``, a JSON Schema validator for ``schema``, Pillow for ``plot``'s PNG, the
JSONL reader for ``demo``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import numpy.typing as npt
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from jsonschema.protocols import Validator
from PIL import Image

import tracklog
from tracklog.cli import main, settings_schema
from tracklog.readers import read_jsonl
from tracklog.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["validate", "schema", "demo", "plot", "replay"]
MASK = "**********"

# Colours of matplotlib's default cycle, C0 and C1: the first and the second curve.
BLUE, ORANGE = (31, 119, 180), (255, 127, 14)


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str


Cli = Callable[..., Result]


def child_env() -> dict[str, str]:
    """The environment of a ``tracklog`` subprocess: no settings leak into it."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("TRACKLOG_")}
    env["WANDB_SILENT"] = "true"
    return env


def run_subprocess(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    done = subprocess.run(
        [sys.executable, "-m", "tracklog", *map(str, args)],
        env={**child_env(), **(env or {})},
        cwd=Path.cwd(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return Result(done.returncode, done.stdout, done.stderr)


@pytest.fixture
def in_process(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    def run(*args: str | Path, env: dict[str, str] | None = None) -> Result:
        with monkeypatch.context() as patch:
            for name, value in (env or {}).items():
                patch.setenv(name, value)
            try:
                code = main([str(arg) for arg in args])
            except SystemExit as exit_:  # --help, --version and usage errors
                code = exit_.code if isinstance(exit_.code, int) else 1
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


@pytest.fixture(params=["subprocess", "in-process"])
def cli(request: pytest.FixtureRequest, in_process: Cli) -> Cli:
    """The command both ways: a fresh ``python -m tracklog`` process, and ``main(argv)``."""
    return run_subprocess if request.param == "subprocess" else in_process


# --version and --help -----------------------------------------------------------------


def test_version_from_python_m_and_the_console_script() -> None:
    expected = f"tracklog {tracklog.__version__}"
    assert run_subprocess("--version") == Result(0, expected + "\n", "")
    script = Path(sys.executable).parent / "tracklog"  # [project.scripts] in pyproject
    done = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, check=False, timeout=120
    )
    assert (done.returncode, done.stdout.strip()) == (0, expected)


def test_top_level_help_lists_every_command_and_the_exit_codes() -> None:
    result = run_subprocess("--help")
    assert result.code == 0
    for command in COMMANDS:
        assert f"\n    {command} " in result.stdout, command
    assert "exit codes: 0 success, 1 failure" in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command(in_process: Cli, command: str) -> None:
    result = in_process(command, "--help")
    assert result.code == 0
    assert result.stdout.startswith(f"usage: tracklog {command} ")
    assert "exit codes: 0 success, 1 failure (explained on stderr), 2 bad usage" in result.stdout


def test_usage_errors_exit_2(in_process: Cli) -> None:
    assert in_process().code == 2  # no command
    assert in_process("frobnicate").code == 2
    assert in_process("validate").code == 2  # FILE missing
    result = in_process("plot", "run", "--key", "a", "--size", "wide")
    assert result.code == 2
    assert "expected WIDTHxHEIGHT in pixels, not 'wide'" in result.stderr
    assert in_process("demo", "--steps", "0").code == 2


# validate ------------------------------------------------------------------------------

SECRETS = {"password": "hunter2-mlflow-pw", "api_key": "wandb-key-0123456789abcdef"}


def secret_settings() -> dict[str, Any]:
    return {
        "run_dir": "runs/secret",
        "outputs": [
            {"type": "console"},
            {
                "type": "mlflow",
                "tracking_uri": f"https://alice:{SECRETS['password']}@mlflow.example.com",
                "username": "alice",
                "password": SECRETS["password"],
                "experiment": "exp",
            },
            {"type": "wandb", "project": "p", "api_key": SECRETS["api_key"]},
        ],
    }


def secret_toml() -> str:
    document = secret_settings()
    mlflow, wandb = document["outputs"][1], document["outputs"][2]
    return (
        f'run_dir = "{document["run_dir"]}"\n\n[[outputs]]\ntype = "console"\n\n'
        "[[outputs]]\n"
        + "".join(f'{key} = "{value}"\n' for key, value in mlflow.items())
        + "\n[[outputs]]\n"
        + "".join(f'{key} = "{value}"\n' for key, value in wandb.items())
    )


def write_settings(path: Path, kind: str) -> Path:
    if kind == "yaml":
        path.write_text(yaml.safe_dump(secret_settings()))
    elif kind == "json":
        path.write_text(json.dumps(secret_settings()))
    else:
        path.write_text(secret_toml())
    return path


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS.values():
            assert secret not in text


@pytest.mark.parametrize("kind", ["yaml", "toml", "json"])
def test_validate_prints_resolved_settings_with_secrets_masked(
    cli: Cli, tmp_path: Path, kind: str
) -> None:
    settings = write_settings(tmp_path / f"logging.{kind}", kind)
    result = cli("validate", settings, env={"TRACKLOG_LEVEL": "debug"})
    assert result.code == 0, result.stderr
    assert_no_secret(result.stdout, result.stderr)
    printed = yaml.safe_load(result.stdout)
    assert printed["level"] == "debug"  # the environment overrides the file
    mlflow, wandb = printed["outputs"][1], printed["outputs"][2]
    assert mlflow["password"] == MASK
    assert mlflow["tracking_uri"] == "https://alice:***@mlflow.example.com"
    assert wandb["api_key"] == MASK
    # Resolved: every default filled in, as build_logger would see it.
    assert wandb["mode"] == "offline"
    assert printed["delivery"]["close_timeout"] == 30.0
    assert mlflow["request_retries"] == 2
    assert result.stderr == f"{settings}: valid; TRACKLOG_LEVEL from the environment applied\n"


def test_validate_json_output_is_the_masked_model_dump(in_process: Cli, tmp_path: Path) -> None:
    settings = write_settings(tmp_path / "logging.yaml", "yaml")
    result = in_process("validate", "--json", settings)
    assert result.code == 0
    assert_no_secret(result.stdout, result.stderr)
    expected = load_settings(settings).model_dump(mode="json")
    assert json.loads(result.stdout) == expected
    assert expected["outputs"][2]["api_key"] == MASK
    assert result.stderr == f"{settings}: valid\n"


BROKEN = """\
run_dir: runs/broken
level: loud
colour: red
outputs:
  - type: console
    max_length: 3
  - type: jsonl
    pth: x.jsonl
  - type: wandb
    mode: sometimes
    api_kee: {api_key}
  - type: telegraph
  - type: mlflow
    password: 12345
delivery:
  deadline: -1
"""

BROKEN_PATHS = [
    "level",
    "outputs.0.console.max_length",
    "outputs.1.jsonl.pth",
    "outputs.2.wandb.mode",
    "outputs.2.wandb.api_kee",
    "outputs.3",
    "outputs.4.mlflow.password",
    "delivery.deadline",
    "colour",
]


def listed_errors(stderr: str) -> dict[str, str]:
    """``{field path: message}`` from the indented lines of ``validate``'s error list."""
    lines = [line[2:] for line in stderr.splitlines() if line.startswith("  ")]
    return dict(line.split(": ", 1) for line in lines)


def test_validate_lists_every_error_with_its_path(cli: Cli, tmp_path: Path) -> None:
    settings = tmp_path / "broken.yaml"
    settings.write_text(BROKEN.format(api_key=SECRETS["api_key"]))
    result = cli("validate", settings)
    assert result.code == 1
    assert result.stdout == ""
    assert_no_secret(result.stderr)
    assert result.stderr.startswith(f"tracklog validate: {settings}: {len(BROKEN_PATHS)} errors\n")
    errors = listed_errors(result.stderr)
    assert list(errors) == BROKEN_PATHS
    assert errors["outputs.2.wandb.mode"] == (
        "Input should be 'online', 'offline' or 'disabled' (got 'sometimes')"
    )
    assert errors["outputs.0.console.max_length"].endswith("(got 3)")
    assert errors["outputs.1.jsonl.pth"] == "Extra inputs are not permitted"
    assert "'telegraph'" in errors["outputs.3"]
    assert errors["outputs.4.mlflow.password"] == "Input should be a valid string"


# Each mistake: where it goes, what it sets, and the path its error must name.
TOP_MISTAKES: dict[str, tuple[str, object]] = {
    "level": ("level", "loud"),
    "colour": ("colour", "red"),
    "strict": ("strict", "sometimes"),
    "run_dir": ("run_dir", ["a", "list"]),
}
OUTPUT_MISTAKES: dict[str, tuple[str, object]] = {
    "console": ("max_length", 500),
    "file": ("max_length", 3),
    "jsonl": ("pth", "x.jsonl"),
    "csv": ("path", ""),
    "mlflow": ("request_retries", 99),
    "wandb": ("mode", "sometimes"),
}


@st.composite
def broken_settings(draw: st.DrawFn) -> tuple[dict[str, object], list[str]]:
    """Settings with at least one mistake, and the paths of all of them, in pydantic's order."""
    top = draw(st.lists(st.sampled_from(sorted(TOP_MISTAKES)), unique=True))
    types = draw(st.lists(st.sampled_from(sorted(OUTPUT_MISTAKES)), unique=True, max_size=6))
    wrong = [draw(st.booleans()) for _ in types]
    if not top and not any(wrong):
        top = ["level"]
    document: dict[str, object] = {TOP_MISTAKES[name][0]: TOP_MISTAKES[name][1] for name in top}
    outputs, paths = [], []
    for index, (kind, is_wrong) in enumerate(zip(types, wrong, strict=True)):
        output: dict[str, object] = {"type": kind}
        if is_wrong:
            field, value = OUTPUT_MISTAKES[kind]
            output[field] = value
            paths.append(f"outputs.{index}.{kind}.{field}")
        outputs.append(output)
    document["outputs"] = outputs
    # pydantic reports declared fields in declaration order, unknown ones last.
    before = [name for name in ("run_dir", "level") if name in top]
    after = [name for name in ("strict", "colour") if name in top]
    expected = [*before, *paths, *after]
    return document, expected


@given(broken_settings())
def test_validate_lists_every_error_property(
    in_process: Cli, tmp_path: Path, case: tuple[dict[str, object], list[str]]
) -> None:
    document, expected = case
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps(document))
    result = in_process("validate", settings)
    assert result.code == 1
    assert list(listed_errors(result.stderr)) == expected


def test_validate_model_level_errors_are_listed(in_process: Cli, tmp_path: Path) -> None:
    settings = tmp_path / "twice.yaml"
    settings.write_text("outputs: [{type: jsonl}, {type: jsonl}]\n")
    result = in_process("validate", settings)
    assert result.code == 1
    assert "outputs.1.path: progress.jsonl is already written by outputs.0" in result.stderr
    result = in_process("validate", settings, env={"TRACKLOG_LEVL": "debug"})
    assert result.code == 1
    assert "unknown environment variable(s) TRACKLOG_LEVL" in result.stderr


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.yaml", None, "cannot read {path}: No such file or directory"),
        ("folder.yaml", "<dir>", "cannot read {path}: Is a directory"),
        (
            "bad.yaml",
            "outputs:\n  - type: [wandb\n    api_key: {secret}\n",
            "{path}: invalid YAML:",
        ),
        ("tabs.yaml", "level: info\n\tapi_key: {secret}\n", "{path}: invalid YAML: line 2"),
        ("bad.toml", 'level = "info\napi_key = "{secret}"\n', "{path}: invalid TOML:"),
        ("bad.json", '{{"level": "info",}}', "{path}: invalid JSON:"),
        ("list.yaml", "- type: console\n", "{path}: settings must be a mapping at the top level"),
        ("latin1.yaml", b"level: \xe9t\xe9\n", "{path}: not UTF-8 text"),
        ("settings.ini", "[tracklog]\n", "{path}: unsupported settings file type '.ini'"),
    ],
)
def test_validate_unreadable_file(
    in_process: Cli, tmp_path: Path, name: str, content: str | bytes | None, message: str
) -> None:
    path = tmp_path / name
    if content == "<dir>":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content.format(secret=SECRETS["api_key"]))
    result = in_process("validate", path)
    assert result.code == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"tracklog validate: {message.format(path=path)}")
    assert result.stderr.count("\n") == 1  # one clear line, no traceback
    assert_no_secret(result.stderr)


# schema --------------------------------------------------------------------------------


# The YAML language server implements draft 7; pydantic targets 2020-12: both must agree.
DRAFTS: list[type[Validator]] = [jsonschema.Draft7Validator, jsonschema.Draft202012Validator]


def validators_for(schema: dict[str, Any]) -> list[Validator]:
    for draft in DRAFTS:
        draft.check_schema(schema)
    return [draft(schema) for draft in DRAFTS]


@functools.cache
def settings_validators() -> list[Validator]:
    return validators_for(settings_schema())


def schema_errors(validators: list[Validator], document: dict[str, Any]) -> list[str]:
    """The paths the schema flags in ``document``: the same under every draft."""
    verdicts = [
        sorted(".".join(map(str, error.absolute_path)) for error in validator.iter_errors(document))
        for validator in validators
    ]
    assert all(verdict == verdicts[0] for verdict in verdicts)
    return verdicts[0]


def test_schema_is_a_json_schema_that_accepts_the_demo_settings() -> None:
    result = run_subprocess("schema")
    assert result.code == 0, result.stderr
    schema = json.loads(result.stdout)
    assert "$schema" not in schema  # a 2020-12 dialect makes the YAML language server warn
    validators = validators_for(schema)
    demo = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    assert schema_errors(validators, demo) == []
    assert schema_errors(validators, secret_settings()) == []
    # ...and rejects what validate rejects, at the same place.
    broken = yaml.safe_load(BROKEN.format(api_key="k"))
    flagged = schema_errors(validators, broken)
    for path in (
        "level",
        "outputs.0",
        "outputs.1",
        "outputs.2",
        "outputs.3",
        "delivery.deadline",
    ):
        assert path in flagged
    assert "" in flagged  # colour: additionalProperties is false at the top level
    outputs = schema["properties"]["outputs"]["items"]
    assert outputs["discriminator"]["propertyName"] == "type"  # completion offers the types
    assert set(outputs["discriminator"]["mapping"]) >= {"console", "mlflow", "wandb"}


def test_schema_output_file(in_process: Cli, tmp_path: Path) -> None:
    target = tmp_path / "tracklog.schema.json"
    result = in_process("schema", "--output", target)
    assert result == Result(0, "", f"wrote {target}\n")
    assert json.loads(target.read_text()) == json.loads(in_process("schema").stdout)
    result = in_process("schema", "-o", tmp_path / "no" / "such" / "dir.json")
    assert result.code == 1
    assert "cannot write" in result.stderr


VALID_OUTPUTS: dict[str, st.SearchStrategy[dict[str, object]]] = {
    "console": st.fixed_dictionaries({"max_length": st.integers(0, 300)}),
    "file": st.fixed_dictionaries({}, optional={"max_length": st.integers(0, 300)}),
    "jsonl": st.fixed_dictionaries({}, optional={"pth": st.just("x")}),
    "csv": st.fixed_dictionaries({}),
    "mlflow": st.fixed_dictionaries(
        {},
        optional={
            "request_retries": st.integers(-2, 12),
            "experiment": st.text(max_size=3),
            "tags": st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
        },
    ),
    "wandb": st.fixed_dictionaries(
        {},
        optional={
            "mode": st.sampled_from(["online", "offline", "disabled", "sometimes"]),
            "tags": st.lists(st.text(min_size=1, max_size=3), max_size=2),
            "finish_timeout": st.floats(-1, 100, allow_nan=False),
        },
    ),
}


@st.composite
def any_settings(draw: st.DrawFn) -> dict[str, object]:
    """Settings that may or may not be valid, only in ways a JSON Schema can express."""
    types = draw(st.lists(st.sampled_from(sorted(VALID_OUTPUTS)), unique=True))
    document: dict[str, object] = {
        "outputs": [{"type": kind, **draw(VALID_OUTPUTS[kind])} for kind in types]
    }
    level = st.sampled_from(["debug", "info", "warn", "error", "disabled", "loud"])
    extra = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "level": level,
                "strict": st.booleans(),
                "delivery": st.fixed_dictionaries(
                    {"deadline": st.floats(-10, 10**6, allow_nan=False)}
                ),
            },
        )
    )
    return {**document, **extra}


@given(any_settings())
def test_schema_and_validate_agree(document: dict[str, object]) -> None:
    """The editor flags exactly what validate rejects (within what a schema can say)."""
    from pydantic import ValidationError

    try:
        load_settings(document)
    except ValidationError:
        assert schema_errors(settings_validators(), document) != []
    else:
        assert schema_errors(settings_validators(), document) == []


# plot ----------------------------------------------------------------------------------


@pytest.fixture
def short_run(tmp_path: Path) -> Path:
    """A real run made by build_logger: 40 dumps, reward rising, loss falling, a video."""
    run_dir = tmp_path / "run"
    settings = {"run_dir": str(run_dir), "outputs": [{"type": "jsonl"}, {"type": "csv"}]}
    with tracklog.build_logger(settings) as logger:
        for step in range(0, 4000, 100):
            logger.record("rollout/ep_rew_mean", 10.0 + step / 40)
            logger.record("train/loss", 1.0 / (1 + step))
            if step % 1000 == 0:
                frames = np.zeros((2, 3, 8, 8), dtype=np.uint8)
                logger.record("eval/video", tracklog.Video(frames, fps=4))
            logger.dump(step=step)
    return run_dir


def pixels_of(path: Path, colour: tuple[int, int, int]) -> npt.NDArray[np.intp]:
    """(row, column) of every pixel within a small distance of ``colour``."""
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB")).astype(np.int32)
    near = np.abs(rgb - np.array(colour)).max(axis=2) <= 30
    return np.argwhere(near)


def assert_curve(path: Path, colour: tuple[int, int, int]) -> npt.NDArray[np.intp]:
    """A line of ``colour`` spans the plot (not just the legend's sample); its pixels."""
    points = pixels_of(path, colour)
    assert len(points) > 200, f"no curve of colour {colour} in {path}"
    with Image.open(path) as image:
        assert points[:, 1].max() - points[:, 1].min() > image.width / 2
    return points


def assert_rising_curve(path: Path, colour: tuple[int, int, int]) -> None:
    """A line of ``colour`` is drawn, and it rises: higher (a smaller row) to the right.

    Compared between 30-40 % and 60-70 % of its width, away from the legend's corner.
    """
    points = assert_curve(path, colour)
    left, right = points[:, 1].min(), points[:, 1].max()

    def height_at(start: float, end: float) -> float:
        columns = points[:, 1]
        inside = (columns >= left + start * (right - left)) & (
            columns <= left + end * (right - left)
        )
        assert inside.any()
        return float(points[inside][:, 0].mean())

    assert height_at(0.6, 0.7) < height_at(0.3, 0.4) - 50


def test_plot_draws_one_line_per_key(cli: Cli, short_run: Path, tmp_path: Path) -> None:
    output = tmp_path / "curves.png"
    result = cli(
        "plot", short_run, "--key", "rollout/ep_rew_mean", "--key", "train/loss", "-o", output
    )
    assert result.code == 0, result.stderr
    assert result.stdout == (
        f"wrote {output}: 2 curve(s), 80 points from {short_run / 'progress.jsonl'}\n"
    )
    with Image.open(output) as image:
        assert image.format == "PNG"
        assert image.size == (960, 540)
        assert len(set(image.convert("RGB").getdata())) > 10  # not blank
    assert_rising_curve(output, BLUE)
    assert len(pixels_of(output, ORANGE)) > 200  # the loss, flat at this scale


def test_plot_defaults_to_plot_png_in_the_run_dir(in_process: Cli, short_run: Path) -> None:
    result = in_process("plot", short_run, "-k", "rollout/ep_rew_mean")
    assert result.code == 0, result.stderr
    assert_rising_curve(short_run / "plot.png", BLUE)


def test_plot_reads_the_csv_without_a_jsonl_file(in_process: Cli, short_run: Path) -> None:
    (short_run / "progress.jsonl").unlink()
    output = short_run / "from-csv.png"
    result = in_process("plot", short_run, "-k", "rollout/ep_rew_mean", "-o", output)
    assert result.code == 0, result.stderr
    assert f"from {short_run / 'progress.csv'}" in result.stdout
    assert_rising_curve(output, BLUE)


def test_plot_subplots_size_and_x_axis(in_process: Cli, short_run: Path) -> None:
    output = short_run / "panels.png"
    result = in_process(
        "plot", short_run / "progress.jsonl", "-k", "train/loss", "-k", "rollout/ep_rew_mean",
        "--subplots", "--size", "640x800", "--x", "_timestamp", "-o", output,
    )  # fmt: skip
    assert result.code == 0, result.stderr
    with Image.open(output) as image:
        assert image.size == (640, 800)
    reward = pixels_of(output, ORANGE)
    assert reward[:, 0].min() > 800 / 2 - 20  # the second key has the lower panel


def test_plot_skips_infinities_and_draws_around_nan(in_process: Cli, tmp_path: Path) -> None:
    run_dir = tmp_path / "odd"
    with tracklog.build_logger({"run_dir": str(run_dir), "outputs": [{"type": "jsonl"}]}) as logger:
        for step in range(60):
            value = {10: math.inf, 20: -math.inf, 30: math.nan}.get(step, float(step))
            logger.record("x", value)
            logger.dump(step=step)
    result = in_process("plot", run_dir, "-k", "x")
    assert result.code == 0, result.stderr
    assert_rising_curve(run_dir / "plot.png", BLUE)


def test_plot_starts_a_new_line_where_the_step_goes_back(in_process: Cli, tmp_path: Path) -> None:
    """Two runs in one progress file (a run resumed from its start, or files written by
    an older tracklog): the second run's steps start again at 0, and it is drawn as a
    line of its own, never joined to the first run's last point."""
    run_dir = tmp_path / "twice"
    for offset in (0.0, 100.0):
        settings = {"run_dir": str(run_dir), "resume": "auto", "outputs": [{"type": "jsonl"}]}
        with tracklog.build_logger(settings) as logger:
            for step in range(60):
                logger.record("x", offset + step)
                logger.dump(step=step)
    result = in_process("plot", run_dir, "-k", "x")
    assert result.code == 0, result.stderr
    assert "goes back 1 time(s)" in result.stderr
    assert "holds more than one run" in result.stderr
    points = assert_curve(run_dir / "plot.png", BLUE)
    left, right = points[:, 1].min(), points[:, 1].max()
    middle = points[np.abs(points[:, 1] - (left + right) / 2) <= 3]
    rows = np.sort(middle[:, 0])
    # Two lines cross the middle (x = 30 at y = 30 and y = 130), far apart; a line back
    # from the first run's last point (59, 59) to the second's first (0, 100) would
    # cross it between them, near y = 80.
    gaps = np.diff(rows)
    assert gaps.max() > 100
    assert (gaps > 10).sum() == 1, rows


def test_plot_missing_key_names_it_and_lists_the_available_ones(cli: Cli, short_run: Path) -> None:
    result = cli("plot", short_run, "--key", "rollout/ep_rew_mean", "--key", "rollout/ep_rew")
    assert result.code == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"tracklog plot: {short_run / 'progress.jsonl'} has no key 'rollout/ep_rew' (did you "
        "mean 'rollout/ep_rew_mean'?); its numeric keys are: rollout/ep_rew_mean, train/loss\n"
    )
    assert not (short_run / "plot.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-k", "eval/video"], "'eval/video' in {run}/progress.jsonl holds no numbers"),
        (["-k", "train/loss", "--x", "eval/video"], "--x 'eval/video' is not a numeric key"),
    ],
)
def test_plot_refuses_keys_without_numbers(
    in_process: Cli, short_run: Path, args: list[str], message: str
) -> None:
    result = in_process("plot", short_run, *args)
    assert result.code == 1
    assert result.stderr.startswith(f"tracklog plot: {message.format(run=short_run)}")


def test_plot_without_a_progress_file(in_process: Cli, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = in_process("plot", tmp_path / "empty", "-k", "a")
    assert result.code == 1
    assert "holds neither progress.jsonl nor progress.csv" in result.stderr
    result = in_process("plot", tmp_path / "nowhere", "-k", "a")
    assert (result.code, result.stderr) == (
        1,
        f"tracklog plot: {tmp_path / 'nowhere'} does not exist\n",
    )
    (tmp_path / "torn.jsonl").write_text('{"_step": 1, "_timestamp": 1.0, "a": 1}\n{"_st')
    result = in_process("plot", tmp_path / "torn.jsonl", "-k", "a")
    assert result.code == 1
    assert result.stderr.startswith(f"tracklog plot: cannot read {tmp_path / 'torn.jsonl'}:")


# demo ----------------------------------------------------------------------------------


def test_demo_with_invalid_settings_lists_the_errors_and_trains_nothing(
    in_process: Cli, tmp_path: Path
) -> None:
    settings = tmp_path / "demo.yaml"
    settings.write_text(f"run_dir: {tmp_path / 'never'}\noutputs: [{{type: jsonl, colour: red}}]\n")
    result = in_process("demo", "--settings", settings, "--steps", "1024")
    assert result.code == 1
    assert listed_errors(result.stderr) == {
        "outputs.0.jsonl.colour": "Extra inputs are not permitted"
    }
    assert not (tmp_path / "never").exists()


def test_demo_needs_a_progress_file_to_check(in_process: Cli, tmp_path: Path) -> None:
    settings = tmp_path / "demo.yaml"
    settings.write_text(f"run_dir: {tmp_path / 'never'}\noutputs: [{{type: console}}]\n")
    result = in_process("demo", "--settings", settings)
    assert result.code == 1
    assert "add an output of type jsonl or csv" in result.stderr
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_demo_tiny_run(in_process: Cli, tmp_path: Path) -> None:
    run_dir = tmp_path / "demo"
    settings = tmp_path / "demo.yaml"
    settings.write_text(
        yaml.safe_dump({"run_dir": str(run_dir), "outputs": [{"type": "file"}, {"type": "jsonl"}]})
    )
    result = in_process("demo", "--settings", settings, "--steps", "2048", "--video-every", "1024")
    assert result.code == 0, result.stderr
    rows = read_jsonl(run_dir / "progress.jsonl")
    assert [row.step for row in rows if "rollout/ep_rew_mean" in row.values] == [1024, 2048]
    videos = [run_dir / str(row.values["eval/video"]) for row in rows if "eval/video" in row.values]
    assert len(videos) == 2
    assert all(video.stat().st_size > 1000 for video in videos)
    assert f"plot it: tracklog plot {run_dir} --key rollout/ep_rew_mean" in result.stdout
    assert "evaluation at step 2048" in (run_dir / "train.log").read_text()
