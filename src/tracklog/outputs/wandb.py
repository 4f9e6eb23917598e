"""``WandBOutputFormat``: one W&B run per logger, offline by default."""

from __future__ import annotations

import shutil
import tempfile
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, assert_never

from tracklog._row import Row
from tracklog.convert.wandb import (
    STEP_KEY,
    ConfigUpdate,
    HistoryValue,
    SummaryUpdate,
    to_wandb,
    wandb_names,
)
from tracklog.outputs._base import OutputFormat
from tracklog.settings import WandbOutput

if TYPE_CHECKING:
    from wandb.sdk.wandb_run import Run

__all__ = ["WandBOutputFormat"]


class WandBOutputFormat(OutputFormat):
    """Logs every dump as one history row of a W&B run created at construction.

    Every row carries ``global_step`` = the dump's step, and every chart uses it as its
    x axis (``define_metric``), so W&B's own ``_step`` only counts rows: a step that
    goes backwards (a resume, a late evaluation) is kept, and two dumps at one step are
    two rows. Numbers go in as they are, arrays as ``wandb.Histogram``, images and
    figures as ``wandb.Image`` (figures as their PNG), videos as MP4 ``wandb.Video``
    at the recorded fps, ``HParam`` into the run config (flattened) and its metrics
    into the summary. ``info()`` lines reach the run's console output (``output.log``).
    """

    name = "wandb"

    def __init__(self, settings: WandbOutput, *, run_dir: Path) -> None:
        import wandb

        self.settings = settings
        self._names = wandb_names()
        self._exit_code = 0
        self._closed = False
        directory = settings.dir if settings.dir is not None else run_dir
        directory.mkdir(parents=True, exist_ok=True)
        self._staging = Path(tempfile.mkdtemp(prefix="tracklog-wandb-"))
        init_settings = wandb.Settings(
            console="off",  # tracklog sends its own lines; no wrapping of sys.stdout
            api_key=settings.api_key.get_secret_value() if settings.api_key else None,
            silent=True,
        )
        self.run: Run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            group=settings.group,
            tags=settings.tags or None,
            name=settings.name,
            notes=settings.notes,
            id=settings.id,
            resume=settings.resume,
            mode=settings.mode,
            dir=str(directory),
            config=settings.config,
            settings=init_settings,
            reinit="create_new",  # several loggers (or runs) in one process
        )
        self.run.define_metric(STEP_KEY)
        self.run.define_metric("*", step_metric=STEP_KEY)

    @property
    def run_dir(self) -> Path:
        """The run's folder: ``<dir>/wandb/offline-run-*`` when offline."""
        return Path(self.run.dir).parent

    def write_row(self, row: Row) -> None:
        history: dict[str, Any] = {}
        for key, value in row.values.items():
            for item in to_wandb(key, value, self._names, self._staging):
                match item:
                    case HistoryValue():
                        history[item.name] = item.value
                    case ConfigUpdate():
                        self.run.config.update(  # type: ignore[no-untyped-call]  # wandb leaves Config.update unannotated
                            item.values, allow_val_change=True
                        )
                    case SummaryUpdate():
                        self.run.summary.update(item.values)
                    case _:
                        assert_never(item)
        if history:
            history[STEP_KEY] = row.step
            self.run.log(history)
        for staged in self._staging.iterdir():  # wandb copied the media into the run
            staged.unlink()

    def write_line(self, line: str) -> None:
        # The hook wandb's own console capture feeds: the line lands in output.log.
        self.run._console_raw_callback("stdout", line + "\n")

    def mark_failed(self, reason: str) -> None:
        self._exit_code = 130 if reason == "KeyboardInterrupt" else 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._finish()
        finally:
            shutil.rmtree(self._staging, ignore_errors=True)

    def _finish(self) -> None:
        """``run.finish()``, but never waiting longer than ``finish_timeout`` seconds."""
        errors: list[BaseException] = []

        def finish() -> None:
            try:
                self.run.finish(exit_code=self._exit_code)
            except BaseException as error:  # reported on the closing thread
                errors.append(error)

        worker = threading.Thread(target=finish, name="tracklog-wandb-finish", daemon=True)
        worker.start()
        worker.join(self.settings.finish_timeout)
        if worker.is_alive():
            warnings.warn(
                f"W&B did not finish the run within {self.settings.finish_timeout:g} s; "
                f"tracklog stopped waiting. Everything logged is in {self.run_dir}; "
                f"upload it with: wandb sync {self.run_dir}",
                stacklevel=3,
            )
        elif errors:
            raise errors[0]
