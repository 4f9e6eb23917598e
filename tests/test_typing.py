"""mypy --strict and pyright --strict on user code: both accept correct algorithm code
without a report, and both reject, at the line, what tracklog cannot log."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import mypy.api
import pytest

ROOT = Path(__file__).resolve().parents[1]

_BAD = """\
import numpy as np

import tracklog

logger = tracklog.build_logger({"run_dir": "runs/typing", "outputs": [{"type": "jsonl"}]})
logger.record("ok", 1.0)
logger.record("k", object())
logger.record("none", None)
logger.record("dict", {"a": 1.0})
logger.record("strings", "a b".split())
clip = tracklog.Video(np.zeros((2, 3, 8, 8), np.uint8), fps="30")
logger.dump(step="100")
logger.close()
"""
# The line of each mistake, and the type each checker names in its message.
_BAD_LINES = {
    7: "object",
    8: "None",
    9: "dict[str, float]",
    10: "list[str]",
    11: "str",
    12: "str",
}
_PYRIGHT_TYPES = {10: "list[LiteralString]", 11: "Literal['30']", 12: "Literal['100']"}

_GOOD = """\
from __future__ import annotations

import numpy as np
import torch
from stable_baselines3.common.logger import Video as SB3Video

import tracklog
from tracklog import Figure, HParam, Image, Video

with tracklog.build_logger({"run_dir": "runs/typing", "outputs": [{"type": "jsonl"}]}) as logger:
    logger.record("float", 0.5)
    logger.record("int", 3, exclude="stdout")
    logger.record("bool", True, exclude=("json", "csv"))
    logger.record("text", "hello")
    logger.record("np_scalar", np.float32(0.5))
    logger.record("np_array", np.zeros((2, 3)))
    logger.record("tensor", torch.zeros(()))
    logger.record("video", Video(np.zeros((2, 3, 8, 8), np.uint8), fps=30))
    logger.record("sb3_video", SB3Video(torch.zeros((2, 3, 8, 8)), fps=30))
    logger.record("image", Image(np.zeros((8, 8, 3), np.uint8), "HWC"))
    logger.record("hparam", HParam({"lr": 0.1}, {"reward": 0.0}))
    episode_lengths: list[int] = [200, 187]
    logger.record("lengths", episode_lengths)
    logger.record("returns", (0.5, 1.5))
    logger.record_mean("mean", 0.5)
    logger.record_mean("mean", None)
    logger.dump(step=1)
    logger.info("done", 1)

def log_figure(logger: tracklog.Logger, figure: Figure) -> None:
    logger.record("figure", figure)
"""


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private cache, seeded from the project's own when ``mypy --strict`` has already run.

    Analysing torch, NumPy and SB3 from scratch takes about half a minute; a copy of a
    warm cache brings that down to a second or two without writing into the project's.
    """
    cache = tmp_path_factory.mktemp("mypy") / "cache"
    project_cache = ROOT / ".mypy_cache"
    if project_cache.is_dir():
        shutil.copytree(project_cache, cache, ignore=shutil.ignore_patterns("*.tmp"))
    return cache


def _mypy(tmp_path: Path, cache: Path, name: str, source: str) -> tuple[str, int]:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    # Explicit file arguments replace the config's `files`; everything else (strict,
    # mypy_path, overrides) comes from the project's pyproject.toml.
    stdout, stderr, status = mypy.api.run(
        [
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--strict",
            "--cache-dir",
            str(cache),
            "--no-error-summary",
            "--show-error-codes",
            str(path),
        ]
    )
    assert stderr == ""
    return stdout, status


def test_mypy_rejects_each_mistake_at_its_line(
    tmp_path: Path, mypy_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)  # relative paths in the config (mypy_path) resolve as in `make test`
    output, status = _mypy(tmp_path, mypy_cache, "bad_snippet.py", _BAD)
    assert status == 1, output
    errors = [line for line in output.splitlines() if ": error:" in line]
    assert len(errors) == len(_BAD_LINES), output
    for error, (line, kind) in zip(errors, sorted(_BAD_LINES.items()), strict=True):
        assert error.startswith(f"{tmp_path / 'bad_snippet.py'}:{line}: error:"), error
        assert f'incompatible type "{kind}"' in error, error
        assert error.endswith("[arg-type]")


def test_correct_user_code_passes_strict(
    tmp_path: Path, mypy_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    output, status = _mypy(tmp_path, mypy_cache, "good_snippet.py", _GOOD)
    assert output == ""
    assert status == 0


# pyright ----------------------------------------------------------------------------------


def _pyright(tmp_path: Path, name: str, source: str) -> list[dict[str, Any]]:
    """pyright --strict (the project's pinned version) on ``source``: its diagnostics."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    config = tmp_path / "pyrightconfig.json"
    config.write_text(json.dumps({"typeCheckingMode": "strict", "pythonVersion": "3.11"}))
    pyright = Path(sys.executable).with_name("pyright")
    process = subprocess.run(
        [
            str(pyright),
            "--outputjson",
            "--pythonpath",
            sys.executable,
            "-p",
            str(config),
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert process.returncode in (0, 1), process.stderr or process.stdout
    report = json.loads(process.stdout)
    diagnostics: list[dict[str, Any]] = report["generalDiagnostics"]
    return diagnostics


def test_pyright_rejects_each_mistake_at_its_line(tmp_path: Path) -> None:
    diagnostics = _pyright(tmp_path, "bad_snippet.py", _BAD)
    found = sorted((d["range"]["start"]["line"] + 1, d) for d in diagnostics)
    assert [line for line, _ in found] == sorted(_BAD_LINES), diagnostics
    for line, diagnostic in found:
        assert diagnostic["severity"] == "error"
        assert diagnostic["rule"] == "reportArgumentType", diagnostic
        kind = _PYRIGHT_TYPES.get(line, _BAD_LINES[line])
        assert f'Argument of type "{kind}" cannot be assigned' in diagnostic["message"], diagnostic


def test_correct_user_code_passes_pyright_strict(tmp_path: Path) -> None:
    # Before Recordable was a real type expression, pyright resolved it to Unknown and
    # reported every record() call here as "partially unknown".
    assert _pyright(tmp_path, "good_snippet.py", _GOOD) == []
