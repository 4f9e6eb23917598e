"""The package as users install it: a wheel built by pip from this source tree.

``pip wheel --no-deps .`` builds it through the build backend named in pyproject.toml
(hatchling, in pip's isolated build environment), exactly as ``pip install .`` does.
The wheel is read back as the zip file it is, and then installed, without its
dependencies, into a folder of its own and run from there, so ``python -m tracklog``
below is the installed copy, not this source tree.
"""

from __future__ import annotations

import configparser
import csv
import email.parser
import email.policy
import importlib.metadata
import json
import os
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from email.message import Message
from pathlib import Path, PurePosixPath

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "tracklog"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))

# Backends that are optional: each lives in an extra, never in the core install.
OPTIONAL = {
    "mlflow": "mlflow",
    "wandb": "wandb",
    "tensorboard": "tensorboard",
    "hydra": "hydra-core",
    "postgres": "psycopg",
}
#: The trackers, and the extra each needs; `all` installs every one.
TRACKERS = {"mlflow": "mlflow", "wandb": "wandb", "tensorboard": "tensorboard"}


@dataclass(frozen=True)
class Wheel:
    path: Path
    names: list[str]
    metadata: Message
    entry_points: configparser.ConfigParser

    @property
    def dist_info(self) -> str:
        name, version = self.metadata["Name"], self.metadata["Version"]
        return f"{name}-{version}.dist-info"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Wheel:
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", str(ROOT), "-w", str(out)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (path,) = out.glob("tracklog-*.whl")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        (metadata_name,) = [name for name in names if name.endswith(".dist-info/METADATA")]
        metadata = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(
            archive.read(metadata_name)
        )
        entry_points = configparser.ConfigParser()
        entry_points.read_string(
            archive.read(metadata_name.replace("METADATA", "entry_points.txt")).decode()
        )
    return Wheel(path, names, metadata, entry_points)


# Contents ------------------------------------------------------------------------------


def test_wheel_holds_py_typed_so_type_checkers_use_the_annotations(wheel: Wheel) -> None:
    assert "tracklog/py.typed" in wheel.names
    with zipfile.ZipFile(wheel.path) as archive:
        assert archive.read("tracklog/py.typed") == (SOURCE / "py.typed").read_bytes()


def test_wheel_holds_every_module_and_subpackage_of_the_source_tree(wheel: Wheel) -> None:
    source = {
        "tracklog/" + path.relative_to(SOURCE).as_posix()
        for path in SOURCE.rglob("*.py")
        if "__pycache__" not in path.parts
    }
    packaged = {name for name in wheel.names if name.endswith(".py")}
    assert packaged == source
    for package in ("tracklog/convert/__init__.py", "tracklog/outputs/__init__.py"):
        assert package in packaged


def test_wheel_holds_nothing_but_the_package_and_its_metadata(wheel: Wheel) -> None:
    tops = {PurePosixPath(name).parts[0] for name in wheel.names}
    assert tops == {"tracklog", wheel.dist_info}
    assert not [name for name in wheel.names if "/tests/" in f"/{name}" or "__pycache__" in name]


def test_wheel_declares_the_tracklog_console_script(wheel: Wheel) -> None:
    assert dict(wheel.entry_points["console_scripts"]) == {"tracklog": "tracklog.cli:main"}


def test_wheel_metadata_matches_pyproject(wheel: Wheel) -> None:
    project = PYPROJECT["project"]
    assert wheel.metadata["Name"] == project["name"]
    assert wheel.metadata["Version"] == project["version"]
    assert wheel.metadata["Requires-Python"] == project["requires-python"]
    extras = set(wheel.metadata.get_all("Provides-Extra") or [])
    assert extras == set(project["optional-dependencies"])


# Dependencies --------------------------------------------------------------------------


def _requirements() -> list[tuple[str, Requirement]]:
    """Every dependency pyproject.toml declares, with the group it is declared in."""
    project = PYPROJECT["project"]
    found = [("core", Requirement(text)) for text in project["dependencies"]]
    for extra, texts in project["optional-dependencies"].items():
        found += [(extra, Requirement(text)) for text in texts]
    return found


def _has_range(specifier: SpecifierSet) -> bool:
    operators = {spec.operator for spec in specifier}
    lower = operators & {">=", ">", "~=", "=="}
    upper = operators & {"<", "<=", "~=", "=="}
    return bool(lower and upper)


@pytest.mark.parametrize(
    ("group", "requirement"),
    [pytest.param(group, req, id=f"{group}:{req.name}") for group, req in _requirements()],
)
def test_every_dependency_is_given_as_a_version_range(group: str, requirement: Requirement) -> None:
    if requirement.name == PYPROJECT["project"]["name"]:
        assert not requirement.specifier, "an extra refers to tracklog's own extras only"
        assert requirement.extras <= set(PYPROJECT["project"]["optional-dependencies"])
        return
    assert _has_range(requirement.specifier), (
        f"{group}: {requirement} needs a lower and an upper bound, such as '>=1.2,<2'"
    )


def test_range_check_rejects_open_ended_and_bare_requirements() -> None:
    # The check above must be able to fail.
    assert not _has_range(Requirement("mypy>=1.10").specifier)
    assert not _has_range(Requirement("mypy").specifier)
    assert not _has_range(Requirement("mypy<2").specifier)
    assert _has_range(Requirement("mypy>=1.10,<3").specifier)
    assert _has_range(Requirement("numpy~=2.1").specifier)


def test_wheel_metadata_keeps_every_range(wheel: Wheel) -> None:
    for text in wheel.metadata.get_all("Requires-Dist") or []:
        requirement = Requirement(text)
        if requirement.name == wheel.metadata["Name"]:  # tracklog[...]: its own extras
            continue
        assert _has_range(requirement.specifier), text


def _requires(wheel: Wheel, extra: str | None) -> set[str]:
    """The names of the wheel's dependencies: the core ones, or those an extra adds."""
    names = set()
    for text in wheel.metadata.get_all("Requires-Dist") or []:
        requirement = Requirement(text)
        marker = requirement.marker
        if (marker is None and extra is None) or (
            marker is not None and extra is not None and marker.evaluate({"extra": extra})
        ):
            names.add(requirement.name)
    return names


@pytest.mark.parametrize(("extra", "package"), sorted(OPTIONAL.items()))
def test_optional_backends_are_extras_not_core_dependencies(
    wheel: Wheel, extra: str, package: str
) -> None:
    assert package not in _requires(wheel, None), f"{package} is a core dependency"
    assert package in _requires(wheel, extra), f"the extra {extra!r} does not install {package}"


def test_core_dependencies_are_the_ones_pyproject_lists(wheel: Wheel) -> None:
    core = {Requirement(text).name for text in PYPROJECT["project"]["dependencies"]}
    assert _requires(wheel, None) == core
    assert {"stable-baselines3", "numpy", "pydantic", "pydantic-settings", "pyyaml"} <= core
    assert {"av", "pillow"} <= core  # media are encoded for every output
    assert not core & set(TRACKERS.values()), "a tracker is a core dependency"


def test_the_all_extra_installs_every_tracker(wheel: Wheel) -> None:
    every = set[str]().union(*(_requires(wheel, extra) for extra in TRACKERS))
    assert set(TRACKERS.values()) <= every
    assert _requires(wheel, "all") == every  # and nothing the trackers' extras do not


# Installed from the wheel -------------------------------------------------------------


@pytest.fixture(scope="module")
def installed(wheel: Wheel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed into a folder of its own (its dependencies come from this venv)."""
    target = tmp_path_factory.mktemp("installed")
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet"]
    done = subprocess.run(
        [*install, "--target", str(target), str(wheel.path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return target


def _run_installed(installed: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("TRACKLOG_")}
    env["PYTHONPATH"] = str(installed)  # ahead of the editable source tree on sys.path
    env["WANDB_SILENT"] = "true"
    return subprocess.run(
        [sys.executable, *args],
        cwd=installed.parent,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def test_python_m_tracklog_version_from_the_installed_wheel(wheel: Wheel, installed: Path) -> None:
    where = _run_installed(installed, "-c", "import tracklog; print(tracklog.__file__)")
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(installed), "imported the source tree"
    done = _run_installed(installed, "-m", "tracklog", "--version")
    assert (done.returncode, done.stdout, done.stderr) == (
        0,
        f"tracklog {wheel.metadata['Version']}\n",
        "",
    )


def test_installed_wheel_validates_a_settings_file(installed: Path, tmp_path: Path) -> None:
    settings = tmp_path / "logging.yaml"
    settings.write_text("run_dir: runs/x\noutputs:\n  - type: jsonl\n", encoding="utf-8")
    done = _run_installed(installed, "-m", "tracklog", "validate", str(settings))
    assert done.returncode == 0, done.stderr
    assert "type: jsonl" in done.stdout
    assert not (tmp_path / "runs").exists(), "validate must create nothing"


# The bare wheel in a fresh venv: the core install, without any tracker ----------------


@pytest.fixture(scope="module")
def bare_venv(wheel: Wheel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv holding ``pip install tracklog`` (no extra), with real dependencies.

    torch is this venv's own copy, linked in (pip would copy its gigabyte; SB3 only needs
    it present); every other dependency is installed by pip as a user's would be.
    """
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    torch = importlib.metadata.distribution("torch")
    ours = Path(str(torch.locate_file("")))
    linked = [*(torch.read_text("top_level.txt") or "").split(), f"torch-{torch.version}.dist-info"]
    for name in linked:
        (Path(site) / name).symlink_to(ours / name)
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(wheel.path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return venv


BARE_SCRIPT = """
import importlib.util, json, sys
import tracklog

missing = [name for name in ("mlflow", "wandb", "tensorboard") if importlib.util.find_spec(name)]
assert not missing, f"installed without an extra: {missing}"
with tracklog.build_logger({"run_dir": sys.argv[1], "outputs": [
        {"type": "console"}, {"type": "jsonl"}, {"type": "csv"}]}) as logger:
    logger.record("loss", 0.25)
    logger.record("lengths", [200, 187])
    logger.dump(1)
for kind in ("mlflow", "wandb", "tensorboard"):
    try:
        tracklog.build_logger({"run_dir": sys.argv[1] + "-" + kind, "outputs": [{"type": kind}]})
    except ImportError as error:
        print("refused", kind, "|", error)
"""


def _run_bare(venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The bare venv's Python, without this environment's settings or source tree."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("TRACKLOG_")}
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [str(venv / "bin" / "python"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def test_the_bare_install_logs_to_console_jsonl_and_csv_and_names_each_missing_extra(
    bare_venv: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    done = _run_bare(bare_venv, tmp_path, "-c", BARE_SCRIPT, str(run_dir))
    assert done.returncode == 0, done.stderr
    (row,) = [json.loads(line) for line in (run_dir / "progress.jsonl").read_text().splitlines()]
    assert (row["_step"], row["loss"]) == (1, 0.25)
    with open(run_dir / "progress.csv", newline="", encoding="utf-8") as file:
        (csv_row,) = list(csv.DictReader(file))
    assert (csv_row["_step"], csv_row["loss"]) == ("1", "0.25")
    said = dict(
        line.removeprefix("refused ").split(" | ", 1)
        for line in done.stdout.splitlines()
        if line.startswith("refused ")
    )
    assert set(said) == set(TRACKERS), done.stdout
    for kind, extra in TRACKERS.items():
        assert f"pip install 'tracklog[{extra}]'" in said[kind], said[kind]
        assert not (tmp_path / f"run-{kind}").exists(), "a refused output left a run_dir"
    settings = tmp_path / "logging.yaml"
    settings.write_text("outputs:\n  - type: jsonl\n  - type: wandb\n", encoding="utf-8")
    validated = _run_bare(bare_venv, tmp_path, "-m", "tracklog", "validate", str(settings))
    assert validated.returncode == 1, validated.stdout
    assert "outputs.1: the wandb output (type: wandb) needs the 'wandb' package" in (
        validated.stderr
    )
    assert "pip install 'tracklog[wandb]'" in validated.stderr
