"""What ``pip install tracklog`` and ``pip install 'tracklog[all]'`` put on disk.

Reads the installed distributions of this environment (``make install-dev`` has them
all), follows pyproject.toml's requirements through each distribution's own metadata,
and sums the files each one's RECORD lists. torch is shown apart: SB3 needs it, and
its size depends on the build (here the CPU one).

    python bench/install_size.py
"""

from __future__ import annotations

import importlib.metadata
import os
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
TRACKERS = ("mlflow", "wandb", "tensorboard")


def installed() -> dict[str, importlib.metadata.Distribution]:
    return {
        canonicalize_name(dist.metadata["Name"]): dist
        for dist in importlib.metadata.distributions()
    }


def size(dist: importlib.metadata.Distribution) -> int:
    total = 0
    for file in dist.files or []:
        try:
            total += os.path.getsize(str(dist.locate_file(file)))
        except OSError:
            continue
    return total


def closure(
    requirements: list[Requirement], dists: dict[str, importlib.metadata.Distribution]
) -> set[str]:
    """The names of every distribution ``requirements`` install, with their extras."""
    seen: set[str] = set()
    stack = list(requirements)
    while stack:
        requirement = stack.pop()
        name = canonicalize_name(requirement.name)
        if name in seen or name not in dists:
            continue
        seen.add(name)
        for text in dists[name].requires or []:
            needed = Requirement(text)
            extras = ["", *requirement.extras]
            if needed.marker is None or any(needed.marker.evaluate({"extra": e}) for e in extras):
                stack.append(needed)
    return seen


def main() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    core = [Requirement(text) for text in project["dependencies"]]
    extras = project["optional-dependencies"]
    trackers = [Requirement(text) for extra in TRACKERS for text in extras[extra]]
    dists = installed()
    for label, requirements in (("tracklog", core), ("tracklog[all]", core + trackers)):
        names = closure(requirements, dists)
        total = sum(size(dists[name]) for name in names)
        torch = sum(size(dists[name]) for name in names if name == "torch")
        print(
            f"{label:14s} {len(names):4d} distributions  {total / 2**20:6.0f} MiB  "
            f"(torch {torch / 2**20:.0f} MiB of it)"
        )


if __name__ == "__main__":
    main()
