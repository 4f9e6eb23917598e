"""Where a process sits in a sweep (its job number) and in a process group (its rank).

``build_logger`` asks :func:`detect` once; :meth:`Placement.apply` then names and tags
the process's runs and, with ``all_ranks``, gives each rank a ``run_dir`` of its own.
Nothing here imports torch or Hydra: a process group or a Hydra job can only exist if
the program imported them already.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from tracklog._registry import RunNaming, backend
from tracklog.settings import LoggerSettings, OutputSettings

__all__ = ["Placement", "detect"]

_MAX_RUN_NAME = 250  # MLflow's limit (and the settings' run_name)
_MAX_OVERRIDES = 5000  # of MLflow's 8000 characters per tag value


@dataclass(frozen=True)
class Placement:
    """This process's job in its sweep and rank in its process group (None: not in one)."""

    job: int | None = None
    rank: int | None = None
    overrides: tuple[str, ...] = ()

    def writes(self, settings: LoggerSettings) -> bool:
        """Whether this process's logger writes anything: rank 0, or every rank if asked."""
        return self.rank in (None, 0) or settings.all_ranks

    def apply(self, settings: LoggerSettings) -> LoggerSettings:
        """``settings`` with this placement's run names, tags, W&B group and ``run_dir``."""
        own_run = settings.all_ranks and self.rank is not None
        if own_run:
            _check_own_run(settings)
        outputs = [self._identify(output, settings, own_run=own_run) for output in settings.outputs]
        update: dict[str, object] = {"outputs": outputs}
        if own_run:
            update["run_dir"] = settings.run_dir / f"rank{self.rank}"
        return settings.model_copy(update=update)

    def _identify(
        self, output: OutputSettings, settings: LoggerSettings, *, own_run: bool
    ) -> OutputSettings:
        """The output's settings named and tagged for this placement (its registry
        entry says how: MLflow run name and tags, W&B name and group)."""
        name = backend(output).name_run
        if name is None:
            return output
        naming = RunNaming(
            group=settings.group,
            tags=self._tags(settings.group),
            run_name=lambda explicit: self._run_name(explicit, settings.group, own_run=own_run),
        )
        return name(output, naming)

    def _tags(self, group: str | None) -> dict[str, str]:
        tags: dict[str, str] = {}
        if group is not None:
            tags["tracklog.group"] = group
        if self.job is not None:
            tags["tracklog.job"] = str(self.job)
        if self.rank is not None:
            tags["tracklog.rank"] = str(self.rank)
        if self.overrides:
            tags["tracklog.overrides"] = " ".join(self.overrides)[:_MAX_OVERRIDES]
        return tags

    def _run_name(self, explicit: str | None, group: str | None, *, own_run: bool) -> str | None:
        """An explicit name, else ``<group>-<job>`` (or ``<group>``); ``-rank<N>`` per rank."""
        name = explicit
        if name is None and group is not None:
            name = group if self.job is None else f"{group}-{self.job}"
        if not own_run:
            return name
        suffix = f"rank{self.rank}"
        return suffix if name is None else f"{name[: _MAX_RUN_NAME - len(suffix) - 1]}-{suffix}"


def _check_own_run(settings: LoggerSettings) -> None:
    """With ``all_ranks``, settings that would make every rank write the same thing fail."""
    for index, output in enumerate(settings.outputs):
        path = getattr(output, "path", None)  # the outputs that write files of their own
        if isinstance(path, Path) and path.is_absolute():
            raise ValueError(
                f"outputs.{index}.path: {path} is absolute, so with all_ranks: true "
                "every rank would write it; use a path relative to run_dir"
            )
        resumed = backend(output).resumed
        field = resumed(output) if resumed is not None else None
        if field is not None:
            raise ValueError(
                f"outputs.{index}.{field}: with all_ranks: true every rank would resume "
                f"the same {output.type} run"
            )
    if settings.delivery.spool_dir is not None and settings.delivery.spool_dir.is_absolute():
        # The ranks start together: two of them could pick the same free spool
        # directory (0-mlflow, 0-mlflow~2…) before either has claimed it.
        raise ValueError(
            f"delivery.spool_dir: {settings.delivery.spool_dir} is absolute, so with "
            "all_ranks: true the ranks would share it; use a path relative to run_dir"
        )


def detect(settings: LoggerSettings) -> Placement:
    """The placement of this process, from the settings, Hydra, SLURM and torch."""
    job, overrides = _hydra_job()
    if settings.job is not None:
        job = settings.job
    elif job is None:
        job = _env_int("SLURM_ARRAY_TASK_ID")
    return Placement(job=job, rank=_rank(), overrides=overrides)


def _rank() -> int | None:
    """The rank from ``torch.distributed`` if it is initialised, else the environment.

    ``RANK`` (the global rank, set by torchrun and most launchers), else ``LOCAL_RANK``.
    """
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    for name in ("RANK", "LOCAL_RANK"):
        rank = _env_int(name)
        if rank is not None:
            return rank
    return None


def _hydra_job() -> tuple[int | None, tuple[str, ...]]:
    """Hydra's ``job.num`` in a multirun, and the job's command-line overrides."""
    if "hydra" not in sys.modules:
        return None, ()
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None, ()
    config = HydraConfig.get()
    overrides = tuple(str(item) for item in config.overrides.task)
    if config.mode != RunMode.MULTIRUN:
        return None, overrides  # a single run: job.num means nothing
    return int(config.job.num), overrides


def _env_int(name: str) -> int | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"${name} must be a non-negative integer, not {text!r}")
    return int(text)
