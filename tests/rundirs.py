"""Run directories the tests share beyond pytest's fixtures."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["fresh_run_dir"]


@contextmanager
def fresh_run_dir() -> Iterator[Path]:
    """A new, not yet existing run directory, removed afterwards with its parent.

    For Hypothesis tests: the function-scoped ``run_dir`` fixture is shared by every
    example of a test, so each example takes one of these instead.
    """
    parent = Path(tempfile.mkdtemp(prefix="tracklog-test-"))
    try:
        yield parent / "run"
    finally:
        shutil.rmtree(parent)
