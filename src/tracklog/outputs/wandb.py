"""``WandBOutputFormat``: one W&B run per logger, offline by default."""

from __future__ import annotations

import atexit
import contextlib
import importlib
import shutil
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Generator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, assert_never, cast

from tracklog._checkpoints import checkpoint_file, superseded
from tracklog._row import Row
from tracklog.convert.wandb import (
    STEP_KEY,
    ArtifactNames,
    ConfigUpdate,
    HistoryValue,
    ModelArtifact,
    SummaryUpdate,
    WandbHistogram,
    WandbHtml,
    WandbImage,
    WandbMedia,
    WandbVideo,
    to_wandb,
    wandb_names,
)
from tracklog.outputs._base import OutputFormat, PartlyWritten, write_each
from tracklog.readers import WandbLogTail, wandb_history
from tracklog.settings import WandbOutput

if TYPE_CHECKING:
    from wandb.sdk.wandb_run import Run

    class _Summary(Protocol):
        """W&B's run summary, whose ``update`` wandb annotates with a bare ``dict``."""

        def update(self, d: dict[str, float]) -> None: ...


__all__ = ["WandBOutputFormat"]

#: Seconds between W&B's writes of a running run's ``.wandb`` file (its default, 15 s,
#: left rows unreadable that long). The delivery process acks a W&B batch once it is
#: in the file, so this bounds W&B's rows per second (64 per wait): 0.1 s let it take
#: some 630 rows/s, 0.02 s 770-1300 (1400 when rows were acked unwritten). An idle
#: run's service uses 1.9% of a core at 0.02 s, 0.6% at 0.1 s (measured here).
WRITE_INTERVAL = 0.02
#: The longest ``flush()`` waits for W&B's service to write what it was given.
FLUSH_TIMEOUT = 10.0
#: W&B's service is one per process: restarted once for all of its W&B outputs when
#: it died (each output knows the generation its run was started under).
_service_lock = threading.Lock()
_service_generation: int = 0
#: How much of the end of the run's earlier files a continuing delivery reads for the
#: rows they hold (the one it continues sent at most one unacked batch: 64 rows).
_RECENT_BYTES = 4 << 20


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

    def __init__(
        self,
        settings: WandbOutput,
        *,
        run_dir: Path,
        summaries: Mapping[str, str] | None = None,
        stats: tuple[int | None, float | None] = (None, None),
        late: bool = False,
        durable: bool = False,
    ) -> None:
        import wandb
        from wandb.sdk.lib import runid

        self.settings = settings
        #: This delivery continues an earlier one's queue (see ``_model_version``).
        self._late = late
        #: write_row/write_rows return once their rows are in the run's file (offline).
        self._durable = durable and settings.mode == "offline"
        self._run_dir_setting = run_dir.absolute()
        self._names = wandb_names()
        self._exit_code = 0
        self._closed = False
        # Like the file outputs' paths: relative to run_dir unless absolute.
        directory = run_dir if settings.dir is None else run_dir / settings.dir
        directory.mkdir(parents=True, exist_ok=True)
        self._staging = Path(tempfile.mkdtemp(prefix="tracklog-wandb-"))
        options: dict[str, Any] = {}
        if "x_transaction_log_flush_interval" in wandb.Settings.model_fields:  # W&B >= 0.22
            options["x_transaction_log_flush_interval"] = WRITE_INTERVAL
        pid, interval = stats
        if "x_stats_pid" in wandb.Settings.model_fields and pid is not None:
            # W&B's own system sampler, of the trainer (not of this delivery process).
            if interval is None:
                options["x_disable_stats"] = True
            else:
                options["x_stats_pid"] = pid
                options["x_stats_sampling_interval"] = interval
        init_settings = wandb.Settings(
            console="off",  # tracklog sends its own lines; no wrapping of sys.stdout
            api_key=settings.api_key.get_secret_value() if settings.api_key else None,
            silent=True,
            **options,
        )
        self._init: dict[str, Any] = dict(
            project=settings.project,
            entity=settings.entity,
            group=settings.group,
            tags=settings.tags or None,
            name=settings.name,
            notes=settings.notes,
            # Fixed here, so `tracklog replay` of a spool can resume this very run.
            id=settings.id or runid.generate_id(),
            resume=settings.resume,
            mode=settings.mode,
            dir=str(directory),
            config=settings.config,
            settings=init_settings,
            reinit="create_new",  # several loggers (or runs) in one process
        )
        self._summaries = dict(summaries or {})
        self._directory = directory
        self._generation: int = _service_generation
        self._lost = False  # W&B's service died under this run (see _restart)
        self.run: Run = self._start_run()
        self._artifact_names = ArtifactNames(self.run.id)
        self._logged = 0  # history rows handed to W&B
        self._written = 0  # history rows seen in the .wandb file (offline)
        self._exited = False  # the exit record is in the .wandb file (offline)
        self._tail: WandbLogTail | None = None  # what of that file was read so far
        #: (global_step, _timestamp) of the rows at the end of the run's earlier files,
        #: when this delivery continues a queue (see ``_delivered_before``).
        self._before: set[tuple[int, float]] = (
            self._delivered_before(directory) if late and self._durable else set()
        )

    def _start_run(self) -> Run:
        import wandb

        run = wandb.init(**self._init)
        run.define_metric(STEP_KEY)
        run.define_metric("*", step_metric=STEP_KEY)
        for key, summary in self._summaries.items():
            # The logger's declared summaries ("min,max"), for W&B's runs table.
            run.define_metric(key, step_metric=STEP_KEY, summary=summary)
        return run

    def _restart(self) -> None:
        """W&B's service died (the OOM killer, a crash): a call on the run raised
        ``ConnectionError``. Start a new service and continue the same run in a new
        offline folder, skipping the rows the dead service had written (the batch
        that failed is sent again, and only what its file lacks is logged)."""
        import wandb

        global _service_generation
        with _service_lock:  # one new service for all of this process's W&B outputs
            if _service_generation == self._generation:
                with contextlib.suppress(Exception):  # its connection is broken
                    wandb.teardown()
                _service_generation += 1
            self._generation = _service_generation
        self._init["resume"] = "allow"
        self.run = self._start_run()
        self._lost = False
        self._logged = self._written = 0
        self._exited = False
        self._tail = None
        self._before = self._delivered_before(self._directory) if self._durable else set()

    def is_transient(self, error: Exception) -> bool:
        """W&B's service gone (``ConnectionError`` from its socket): the run is
        continued with a new service, and the rows are sent again."""
        return isinstance(error, ConnectionError)

    @contextlib.contextmanager
    def _service(self) -> Generator[None]:
        """A call on W&B's service: restart it first if it died under an earlier call;
        if it dies in this one, raise the ``ConnectionError`` (transient) for the whole
        call, even when rows went before it: they may never have been written."""
        if self._lost:
            self._restart()
        try:
            yield
        except Exception as error:
            cause = error.error if isinstance(error, PartlyWritten) else error
            if isinstance(cause, ConnectionError):
                self._lost = True
                raise cause from error
            raise

    @property
    def run_dir(self) -> Path:
        """The run's folder: ``<dir>/wandb/offline-run-*`` when offline."""
        return Path(self.run.dir).parent

    def write_row(self, row: Row) -> None:
        self.write_rows([row])

    def write_rows(self, rows: list[Row]) -> None:
        """Log each row; ``durable`` (the delivery process): then wait until W&B's
        service has written them to the ``.wandb`` file, so the queue's ack of a row
        means the file has it. W&B's service holds a row up to ``WRITE_INTERVAL``
        before it writes it; a job killed whole (trainer, delivery process and W&B's
        service, as SLURM does) lost the rows acked meanwhile, 8-18 at 500 dumps/s."""
        try:
            with self._service():
                write_each(rows, self._log_row)
        finally:
            if self._durable and not self._lost:
                self.flush()

    def _log_row(self, row: Row) -> None:
        history: dict[str, Any] = {}
        versions: list[tuple[Any, list[str]]] = []
        for key, value in row.values.items():
            for item in to_wandb(key, value, self._names):
                match item:
                    case HistoryValue(
                        value=WandbHistogram() | WandbImage() | WandbHtml() | WandbVideo() as media
                    ):
                        history[item.name] = self._native(media)
                    case HistoryValue():
                        history[item.name] = item.value
                    case ConfigUpdate():
                        self.run.config.update(  # type: ignore[no-untyped-call]  # wandb leaves Config.update unannotated
                            item.values, allow_val_change=True
                        )
                    case SummaryUpdate():
                        cast("_Summary", self.run.summary).update(item.values)
                    case ModelArtifact():
                        # Checked before the row is logged: a missing file must not
                        # leave half a row in the history, to be logged again.
                        versions.append(self._model_version(item, row.step))
                    case _:
                        assert_never(item)
        if history and (row.step, row.timestamp) not in self._before:
            history[STEP_KEY] = row.step
            history["_timestamp"] = row.timestamp  # when dumped, not when delivered
            self.run.log(history)
            self._logged += 1
        for staged in self._staging.iterdir():  # wandb copied the media into the run
            staged.unlink()
        for artifact, aliases in versions:
            self.run.log_artifact(artifact, aliases=aliases)

    def _delivered_before(self, directory: Path) -> set[tuple[int, float]]:
        """The rows at the end of this run's earlier offline files, as (global_step,
        _timestamp). A delivery killed after W&B's service wrote a batch but before
        the queue's ack (up to 64 rows) left them there; the delivery that continues
        the queue would log them again. Each dump has its own timestamp, so a row
        logged again in a later session (a resume) is not taken for one of these."""
        found: set[tuple[int, float]] = set()
        for log in directory.glob(f"wandb/offline-run-*/run-{self.run.id}.wandb"):
            if log.parent == self.run_dir:
                continue  # this delivery's own file
            try:
                rows = wandb_history(log, start=max(0, log.stat().st_size - _RECENT_BYTES))
            except Exception:  # unreadable (OSError, a damaged record): logged again
                continue
            found.update(
                (row.global_step, row.timestamp)
                for row in rows
                if row.global_step is not None and row.timestamp is not None
            )
        return found

    def _model_version(self, model: ModelArtifact, step: int) -> tuple[Any, list[str]]:
        """A kept checkpoint as a new version of the run's model artifact for its key,
        and the aliases to log it with; raises (before anything of its row is logged)
        if a file is not there as a regular file.

        The files are added by reference to where tracklog keeps them (W&B's
        ``immutable`` policy: no second copy in W&B's staging folder, which sits in the
        home directory); an offline run's ``wandb sync`` uploads them from there.
        """
        import wandb

        artifact = wandb.Artifact(
            self._artifact_names(model.key),
            type="model",
            metadata={"step": step, **model.metadata},
        )
        for name in model.files:
            with checkpoint_file(self._run_dir_setting, model.local, name) as local:
                artifact.add_file(str(local), name=name, policy="immutable")
        # Only a delivery continuing an earlier one's queue (a replay) can come after a
        # newer checkpoint's aliases; a live one sends rows in order.
        newer = superseded(self._run_dir_setting, model.local) if self._late else frozenset[str]()
        return artifact, [alias for alias in model.aliases if alias not in newer]

    def _native(self, media: WandbMedia) -> object:
        """The wandb object for converted media (a video's MP4 staged as a file)."""
        import wandb

        match media:
            case WandbHistogram(counts=counts, edges=edges):
                return wandb.Histogram(np_histogram=(counts, edges))
            case WandbImage(picture=picture):
                return wandb.Image(picture)
            case WandbHtml(html=markup):
                return wandb.Html(markup, inject=False)
            case WandbVideo(mp4=data):
                path = self._staging / f"{uuid.uuid4().hex}.mp4"
                path.write_bytes(data)
                return wandb.Video(str(path), format="mp4")
            case _:
                assert_never(media)

    def write_line(self, line: str) -> None:
        with self._service():
            # The hook wandb's own console capture feeds: the line lands in output.log.
            self.run._console_raw_callback("stdout", line + "\n")  # pyright: ignore[reportPrivateUsage]  # no public API

    def flush(self) -> None:
        """Offline, wait until every row logged so far is in the ``.wandb`` file, so a
        reader right after ``logger.flush()`` sees it (W&B's service writes the file
        every ``WRITE_INTERVAL`` seconds); at most ``FLUSH_TIMEOUT`` seconds (then the
        rows are left to W&B's service: an output never hangs delivery)."""
        if self.settings.mode != "offline":
            return
        deadline = time.monotonic() + FLUSH_TIMEOUT
        while self._written < self._logged and time.monotonic() < deadline:
            self._read_log()
            if self._written < self._logged:
                time.sleep(0.01)

    def _read_log(self) -> None:
        """Take in what W&B's service appended to the ``.wandb`` file since last time:
        the history rows (for ``flush()``) and the exit record (for ``close()``)."""
        if self._tail is None:
            log = self.run_dir / f"run-{self.run.id}.wandb"
            if not log.exists():
                return
            self._tail = WandbLogTail(log)
        record_class = importlib.import_module("wandb.proto.wandb_internal_pb2").Record
        try:
            payloads = self._tail.read()
        except (OSError, ValueError):  # being written: try again
            return
        for payload in payloads:
            record = record_class()
            record.ParseFromString(payload)
            kind = record.WhichOneof("record_type")
            self._written += kind == "history"
            self._exited = self._exited or kind == "exit"

    def mark_failed(self, reason: str) -> None:
        codes = {"KeyboardInterrupt": 130, "SIGTERM": 143}
        self._exit_code = codes.get(reason, 1)

    def close(self) -> None:
        if self._closed:
            return
        try:
            with self._service():
                self._finish()
        finally:
            if not self._lost:  # else retried: a new service finishes the run
                self._closed = True
                shutil.rmtree(self._staging, ignore_errors=True)

    def _finish(self) -> None:
        """``run.finish()``, but never waiting longer than ``finish_timeout`` seconds.

        Offline, ``finish()`` can return before W&B's service has written the run's
        last records; tracklog also waits (within the same bound) until the exit record
        is in the ``.wandb`` file, so a reader or ``wandb sync`` right after ``close()``
        sees the whole run.
        """
        deadline = time.monotonic() + self.settings.finish_timeout
        errors: list[BaseException] = []

        def finish() -> None:
            try:
                self.run.finish(exit_code=self._exit_code)
            except BaseException as error:  # reported on the closing thread
                errors.append(error)

        worker = threading.Thread(target=finish, name="tracklog-wandb-finish", daemon=True)
        worker.start()
        worker.join(self.settings.finish_timeout)
        if errors:
            raise errors[0]
        if worker.is_alive():
            _abandon_service_at_exit()
            warnings.warn(
                f"W&B did not finish the run within {self.settings.finish_timeout:g} s; "
                "tracklog stopped waiting (and stops W&B's service at exit, so the process "
                f"can end). What W&B had written is in {self.run_dir}; upload it with: "
                f"wandb sync {self.run_dir}",
                stacklevel=3,
            )
        elif not self._wait_for_exit_record(deadline):
            warnings.warn(
                f"W&B finished the run but had not written its last records to {self.run_dir} "
                f"within {self.settings.finish_timeout:g} s; once it has, upload it with: "
                f"wandb sync {self.run_dir}",
                stacklevel=3,
            )

    def _wait_for_exit_record(self, deadline: float) -> bool:
        if self.settings.mode != "offline":
            return True
        while not self._exited and time.monotonic() < deadline:
            self._read_log()
            if not self._exited:
                time.sleep(0.05)
        return self._exited


_abandoning = False


def _abandon_service_at_exit() -> None:
    """At exit, stop W&B's service before W&B's own exit hook waits for it forever.

    Registered after W&B's hook, so ``atexit`` runs it first. Only at exit: other
    W&B runs of the process keep their service until then.
    """
    global _abandoning
    if not _abandoning:
        _abandoning = True
        atexit.register(_abandon_service)


def _abandon_service() -> None:
    """Stop W&B's service process and drop W&B's exit hook, which would wait for it.

    W&B registers an ``atexit`` hook that waits, without a time limit, for its
    ``wandb-core`` service to end; a hung service then hangs the whole process at
    exit. These are private W&B objects (checked for, so a W&B change degrades to
    the old behaviour rather than an error).
    """
    try:
        from wandb.sdk import wandb_setup

        connection = getattr(wandb_setup.singleton(), "_connection", None)
        cleanup = getattr(connection, "_cleanup", None)
        if callable(cleanup):
            cleanup()  # atexit.unregister(W&B's teardown hook)
        process = getattr(getattr(connection, "_proc", None), "_process", None)
        if process is not None and hasattr(process, "kill"):
            process.kill()
    except Exception as error:  # best effort: never worse than not trying
        warnings.warn(f"could not stop W&B's service: {error!r}", stacklevel=4)
