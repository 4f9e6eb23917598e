"""Shared fixtures: every test logs into its own temporary run directory."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import pytest
from hypothesis import HealthCheck, settings

matplotlib.use("Agg")

settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _no_tracklog_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """TRACKLOG_* variables from the developer's shell must not change test results."""
    for name in list(os.environ):
        if name.startswith("TRACKLOG_"):
            monkeypatch.delenv(name)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"
