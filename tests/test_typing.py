"""mypy --strict on user code: record() rejects what it cannot log and accepts what it can."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import mypy.api
import pytest

ROOT = Path(__file__).resolve().parents[1]

_BAD = """\
import tracklog

logger = tracklog.build_logger({"run_dir": "runs/typing", "outputs": [{"type": "jsonl"}]})
logger.record("ok", 1.0)
logger.record("k", object())
logger.record("none", None)
logger.record("dict", {"a": 1.0})
logger.record("strings", "a b".split())
logger.close()
"""
_BAD_LINES = {5: '"object"', 6: '"None"', 7: '"dict[str, float]"', 8: '"list[str]"'}

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


def test_recording_an_object_is_a_type_error(
    tmp_path: Path, mypy_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)  # relative paths in the config (mypy_path) resolve as in `make test`
    output, status = _mypy(tmp_path, mypy_cache, "bad_snippet.py", _BAD)
    assert status == 1, output
    errors = [line for line in output.splitlines() if ": error:" in line]
    assert len(errors) == len(_BAD_LINES), output
    for error, (line, kind) in zip(errors, sorted(_BAD_LINES.items()), strict=True):
        assert error.startswith(f"{tmp_path / 'bad_snippet.py'}:{line}: error:"), error
        assert f'Argument 2 to "record" of "Logger" has incompatible type {kind}' in error
        assert error.endswith("[arg-type]")


def test_correct_user_code_passes_strict(
    tmp_path: Path, mypy_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    output, status = _mypy(tmp_path, mypy_cache, "good_snippet.py", _GOOD)
    assert output == ""
    assert status == 0
