"""``MLFlowOutputFormat``: one MLflow run per logger, metrics in batches, media as artifacts."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, assert_never

from tracklog._row import Row
from tracklog.convert.mlflow import (
    ArtifactFile,
    MetricPoint,
    MlflowNames,
    ParamValue,
    StepImage,
    TextAppend,
    to_mlflow,
)
from tracklog.outputs._base import OutputFormat
from tracklog.settings import MlflowOutput, mask_uri
from tracklog.values import Scalar

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

__all__ = ["MLFlowOutputFormat"]

_MAX_TAG_LENGTH = 8000
_TRAIN_LOG = "train.log"
_TEXT_SEQS = "text-rows"  # in staging: the rows whose text values are already appended


def _tracklog_version() -> str:
    try:
        return version("tracklog")
    except PackageNotFoundError:
        return "unknown"


_USER_SET = frozenset(
    name
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    if name in os.environ
)


def _bound_requests(settings: MlflowOutput) -> None:
    """Keep one request to a server that is down from blocking for minutes.

    MLflow's defaults (7 retries with exponential backoff, 120 s timeout) hold a
    ``dump()`` for about 4 minutes when the server is down. MLflow reads these from
    its environment variables, for the whole process; values the user set are kept.
    """
    for name, value in (
        ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", settings.request_retries),
        ("MLFLOW_HTTP_REQUEST_TIMEOUT", int(settings.request_timeout)),
    ):
        if name not in _USER_SET:
            os.environ[name] = str(value)
    if settings.allow_file_store:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.17's own opt-in


_CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def _export_credentials(settings: MlflowOutput) -> dict[str, str | None]:
    """Put the settings' credentials where MLflow reads them; return what was there.

    MLflow reads basic-auth credentials only from its environment variables (or
    ~/.mlflow/credentials), for every request and artifact upload it makes. They stay
    set while the output is open (one set of credentials per process) and are put back
    as they were at ``close()``.
    """
    if settings.username is None:
        return {}
    previous = {name: os.environ.get(name) for name in _CREDENTIALS}
    os.environ["MLFLOW_TRACKING_USERNAME"] = settings.username
    if settings.password is not None:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = settings.password.get_secret_value()
    return previous


def _restore_credentials(previous: dict[str, str | None]) -> None:
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


# MLflow error codes (their names) that mean "the server is down, overloaded or slow".
_RETRYABLE_CODES = frozenset(
    {
        "TEMPORARILY_UNAVAILABLE",
        "REQUEST_LIMIT_EXCEEDED",
        "RESOURCE_EXHAUSTED",
        "DEADLINE_EXCEEDED",
        "ABORTED",
        "SERVICE_UNDER_MAINTENANCE",
    }
)


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` from an MLflow call means "retry later" rather than "wrong input".

    Transient: the server unreachable or timing out (also after MLflow's own retries),
    HTTP 5xx and 429, and a database that is locked or gone. Not transient: a rejected
    request (4xx: invalid name, unknown run, permission denied).
    """
    import requests
    from mlflow.exceptions import MlflowException, RestException

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, requests.exceptions.ConnectionError | requests.Timeout):
            return True
        if isinstance(
            current, requests.exceptions.RetryError | requests.exceptions.ChunkedEncodingError
        ):
            return True
        if isinstance(current, ConnectionError | TimeoutError):
            return True
        if type(current).__name__ in ("OperationalError", "DisconnectionError"):
            return True  # SQLAlchemy: database locked, server gone
        if isinstance(current, MlflowException):
            message = current.message if isinstance(current.message, str) else str(current)
            if current.error_code in _RETRYABLE_CODES:
                return True
            if isinstance(current, RestException) and current.error_code == "INTERNAL_ERROR":
                return True  # the server answered 500
            if message.startswith("API request to") and (
                "failed with exception" in message
                or "failed with timeout" in message
                or "failed with error code 5" in message
                or "failed with error code 429" in message
            ):
                return True
        current = current.__cause__ or current.__context__
    return False


@dataclass
class _Prepared:
    """One row converted for MLflow, kept until fully sent so a retry sends nothing twice."""

    metrics: list[Metric]
    params: dict[str, str]
    files: list[tuple[str, ArtifactFile]]
    images: list[StepImage]
    batch_sent: bool = False
    files_done: int = 0
    images_done: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class MLFlowOutputFormat(OutputFormat):
    """Logs every dump to one MLflow run, created (or resumed by ``run_id``) at construction.

    Scalars become metrics at the dump's step, sent with ``log_batch`` in chunks of at
    most 1000 metrics and 100 params, never one request per key. Images and figures go
    through MLflow's image logging at their step; videos are H.264 MP4 artifacts at
    ``videos/<key>/step_<step>.mp4``; histograms are ``key/mean|std|min|max`` metrics
    plus ``histograms/<key>/step_<step>.npy``; ``HParam`` becomes params. Text values
    and ``info()`` lines are appended to ``text/<key>.txt`` and ``train.log``, uploaded
    every ``artifact_upload_interval`` seconds and at ``close()``.
    """

    name = "mlflow"
    background = True

    def __init__(
        self,
        settings: MlflowOutput,
        *,
        settings_json: str | None = None,
        spool_dir: Path | None = None,
        run_key: str | None = None,
        replaying: bool = False,
    ) -> None:
        from mlflow import MlflowClient

        _bound_requests(settings)
        self._previous_credentials = _export_credentials(settings)
        self.settings = settings
        self.client: MlflowClient = MlflowClient(tracking_uri=settings.tracking_uri)
        self._names = MlflowNames()
        self._params: dict[str, str] = {}
        self._status = "FINISHED"
        self.spool_dir = spool_dir
        # Text appended since the last upload lives here; under the spool directory it
        # survives a crash, and `tracklog replay` uploads it.
        if spool_dir is not None:
            self._staging = spool_dir / "staging"
            self._staging.mkdir(parents=True, exist_ok=True)
        else:
            self._staging = Path(tempfile.mkdtemp(prefix="tracklog-mlflow-"))
        self._dirty: set[str] = set()
        self._uploaded: set[str] = set()
        self._listed: set[str] = set()
        self._prepared: dict[int, _Prepared] = {}
        self._texts_applied: set[int] = set()
        if replaying and (self._staging / _TEXT_SEQS).is_file():
            text = (self._staging / _TEXT_SEQS).read_text(encoding="utf-8")
            self._texts_applied = {int(seq) for seq in text.split()}
        self._checked: set[tuple[str, type]] = set()
        self._scalar_keys: set[str] = set()  # keys checked as Scalar
        self._last_upload = time.monotonic()
        self._closed = False
        self._settings_json = settings_json
        self._settings_uploaded = settings_json is None
        #: Tags the run, so a create_run whose reply was lost is found, not repeated.
        self.run_key = run_key or uuid.uuid4().hex
        self._create_attempted = replaying
        self._replaying = replaying
        self._run_id: str | None = None
        try:
            self._ensure_run()
        except Exception as error:
            if not is_transient(error):
                self._cleanup()
                raise
            # Training must not wait for (or fail on) the server: the run is created by
            # the background worker as soon as the server answers.
            warnings.warn(
                f"MLflow at {mask_uri(settings.tracking_uri)} is unreachable "
                f"({type(error).__name__}); tracklog keeps training and logging, and "
                "creates the run when the server answers",
                stacklevel=3,
            )
        except BaseException:
            self._cleanup()
            raise

    @property
    def run_id(self) -> str:
        """The MLflow run's id; an error until the tracking server has answered once."""
        if self._run_id is None:
            raise RuntimeError(
                "the MLflow run is not created yet: the tracking server has not answered"
            )
        return self._run_id

    def is_transient(self, error: Exception) -> bool:
        return is_transient(error)

    def spool_header(self) -> dict[str, Any] | None:
        return {
            "format": 1,
            "output": "mlflow",
            # Credentials stay out: replay reads them from the environment.
            "settings": self.settings.model_dump(
                mode="json", exclude={"username", "password", "run_id"}
            ),
            "run_id": self._run_id or self.settings.run_id,
            "run_key": self.run_key,
            "settings_json": self._settings_json,
        }

    def _cleanup(self) -> None:
        shutil.rmtree(self._staging, ignore_errors=True)
        _restore_credentials(self._previous_credentials)

    # Run lifecycle -------------------------------------------------------------------
    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        name = self.settings.experiment
        if name is None:
            return "0"  # MLflow's "Default" experiment
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        try:
            return str(
                self.client.create_experiment(
                    name, artifact_location=self.settings.artifact_location
                )
            )
        except MlflowException:
            # Another process of the same sweep created it between our two calls.
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return str(found.experiment_id)

    def _ensure_run(self) -> None:
        """Create (or resume) the run if that has not happened yet; safe to call again."""
        if self._run_id is None:
            tags = {
                **self.settings.tags,
                "tracklog.version": _tracklog_version(),
                "tracklog.run_key": self.run_key,
            }
            settings_json = self._settings_json
            if settings_json is not None and len(settings_json) <= _MAX_TAG_LENGTH:
                tags["tracklog.settings"] = settings_json  # too long: only the artifact
            if self.settings.run_id is not None:
                self._run_id = self._resume(tags)
            else:
                experiment = self._experiment_id()
                found = self._find_run(experiment) if self._create_attempted else None
                if found is None:
                    self._create_attempted = True
                    run = self.client.create_run(
                        experiment, run_name=self.settings.run_name, tags=tags
                    )
                    found = str(run.info.run_id)
                self._run_id = found
                self._adopt_local_text()
        if not self._settings_uploaded and self._settings_json is not None:
            self._upload_fixed("tracklog/settings.json", self._settings_json.encode("utf-8"))
            self._settings_uploaded = True

    def _find_run(self, experiment: str) -> str | None:
        """The run this output created before (its reply may have been lost)."""
        runs = self.client.search_runs(
            [experiment], filter_string=f"tags.`tracklog.run_key` = '{self.run_key}'", max_results=1
        )
        return str(runs[0].info.run_id) if runs else None

    def _resume(self, tags: dict[str, str]) -> str:
        assert self.settings.run_id is not None
        run = self.client.get_run(self.settings.run_id)
        run_id = str(run.info.run_id)
        if run.info.status == "RUNNING" and not self._replaying:
            warnings.warn(
                f"MLflow run {run_id} is still RUNNING: if another process logs to it, "
                "the two overwrite each other's train.log",
                stacklevel=4,
            )
        if self.settings.run_name is not None and self.settings.run_name != run.info.run_name:
            warnings.warn(
                f"resuming MLflow run {run_id} named {run.info.run_name!r}; "
                f"run_name {self.settings.run_name!r} is ignored",
                stacklevel=4,
            )
        if self.settings.experiment is not None:
            experiment = self.client.get_experiment(run.info.experiment_id)
            if experiment.name != self.settings.experiment:
                warnings.warn(
                    f"resuming MLflow run {run_id} of experiment {experiment.name!r}; "
                    f"experiment {self.settings.experiment!r} is ignored",
                    stacklevel=4,
                )
        self._params = dict(run.data.params)
        self.client.update_run(run_id, status="RUNNING")
        for name, value in tags.items():
            self.client.set_tag(run_id, name, value)
        self._resume_text(run_id)
        return run_id

    def _resume_text(self, run_id: str) -> None:
        """Fetch the run's train.log and text files, so appends continue them.

        A replay keeps the local copies instead: they were appended to after the last
        upload, so they hold at least what the server has.
        """
        from mlflow.artifacts import download_artifacts

        if self._adopt_local_text():
            return
        for entry in self.client.list_artifacts(run_id):
            if entry.path in (_TRAIN_LOG, "text"):
                download_artifacts(
                    run_id=run_id,
                    artifact_path=entry.path,
                    dst_path=str(self._staging / "text-root"),
                    tracking_uri=self.settings.tracking_uri,
                )

    def _adopt_local_text(self) -> bool:
        """On replay: mark text files a dead process left in staging for upload."""
        root = self._staging / "text-root"
        if not self._replaying or not root.is_dir():
            return False
        for path in root.rglob("*"):
            if path.is_file():
                self._dirty.add(path.relative_to(root).as_posix())
        return True

    def mark_failed(self, reason: str) -> None:
        self._status = "KILLED" if reason in ("KeyboardInterrupt", "SIGTERM", "died") else "FAILED"

    def close(self) -> None:
        """Upload the text files, end the run with its status, release the staging files.

        Raises a transient error (the worker retries) without giving anything up.
        """
        if self._closed:
            return
        try:
            self._ensure_run()  # the server was down all along: the run still gets made
            self._upload_text(force=True)
            self.client.set_terminated(self.run_id, status=self._status)
        except Exception as error:
            if not is_transient(error):
                self._closed = True
                self._cleanup()
            raise
        self._closed = True
        self._cleanup()

    # Writing -------------------------------------------------------------------------
    def check_row(self, row: Row) -> None:
        # Name each new (key, kind) now, so a rename warning points at this dump. The
        # set difference skips a row of known scalars without a Python loop; new keys
        # are named in the row's order, which decides who keeps a contested name.
        new = row.values.keys() - self._scalar_keys
        if not new:
            return
        for key, value in row.values.items():
            if key not in new:
                continue
            kind = (key, type(value))
            if kind not in self._checked:
                to_mlflow(key, value, row, self._names)
                self._checked.add(kind)
            if isinstance(value, Scalar):
                self._scalar_keys.add(key)

    def write_row(self, row: Row) -> None:
        self.write_rows([row])

    def write_rows(self, rows: list[Row]) -> None:
        """Send the rows' metrics and params in one ``log_batch``, then their media.

        Each row is converted once and remembered until it is fully sent, so a call
        repeated after a transient error sends only what did not arrive (artifact names
        stay the same; MLflow ignores metric points it already has).
        """
        from mlflow.entities import Param

        self._ensure_run()
        try:
            prepared = [self._prepare(row) for row in rows]
            unsent = [item for item in prepared if not item.batch_sent]
            metrics = [metric for item in unsent for metric in item.metrics]
            params: dict[str, str] = {}
            for item in unsent:
                for name, value in item.params.items():
                    if name not in params and self._is_new_param(name, value):
                        params[name] = value
                    elif name in params and params[name] != value:
                        self._warn_param(name, params[name], value)
            if metrics or params:
                # MlflowClient.log_batch splits this into requests within MLflow's
                # limits (1000 metrics, 100 params per request); never one per key.
                self.client.log_batch(
                    self.run_id,
                    metrics=metrics,
                    params=[Param(name, value) for name, value in params.items()],
                    synchronous=True,
                )
            self._params.update(params)  # only once MLflow has them
            for item in unsent:
                item.batch_sent = True
            for item in prepared:
                while item.files_done < len(item.files):
                    path, file = item.files[item.files_done]
                    self._upload_fixed(path, file.encode())
                    item.files_done += 1
                while item.images_done < len(item.images):
                    self._log_image(item.images[item.images_done])
                    item.images_done += 1
            for row in rows:
                self._prepared.pop(row.seq, None)
            self._upload_text()
        except Exception as error:
            if not is_transient(error):
                for row in rows:
                    self._prepared.pop(row.seq, None)
            raise

    def _prepare(self, row: Row) -> _Prepared:
        done = self._prepared.get(row.seq)
        if done is not None:
            return done
        from mlflow.entities import Metric

        prepared = _Prepared(metrics=[], params={}, files=[], images=[])
        texts: list[TextAppend] = []
        try:
            for key, value in row.values.items():
                for item in to_mlflow(key, value, row, self._names):
                    match item:
                        case MetricPoint():
                            prepared.metrics.append(
                                Metric(item.name, item.value, item.timestamp_ms, item.step)
                            )
                        case ParamValue():
                            prepared.params.setdefault(item.name, item.value)
                        case ArtifactFile():
                            prepared.files.append((self._unique(item.path), item))
                        case StepImage():
                            prepared.images.append(item)
                        case TextAppend():
                            texts.append(item)
                        case _:
                            assert_never(item)
        except BaseException:
            self._uploaded.difference_update(path for path, _ in prepared.files)
            raise
        if row.seq not in self._texts_applied:
            # Local appends, once: the row is remembered from here on, and in staging
            # (a replay of a row whose delivery failed must not append it again).
            for text in texts:
                self._append(text.path, text.text)
            if texts:
                self._texts_applied.add(row.seq)
                with open(self._staging / _TEXT_SEQS, "a", encoding="utf-8") as record:
                    record.write(f"{row.seq}\n")
        self._prepared[row.seq] = prepared
        return prepared

    def write_line(self, line: str) -> None:
        self._append(_TRAIN_LOG, line + "\n")
        # The line is in the staging train.log now, marked for upload: a server that
        # is down only delays that upload (to a later line, dump, or close), and this
        # call must not fail, or the line would be appended again on the retry.
        try:
            self._ensure_run()
            self._upload_text()
        except Exception as error:
            if not is_transient(error):
                raise

    def _is_new_param(self, name: str, value: str) -> bool:
        logged = self._params.get(name)
        if logged is None:
            return True
        if logged != value:
            self._warn_param(name, logged, value)
        return False

    def _warn_param(self, name: str, logged: str, value: str) -> None:
        warnings.warn(
            f"MLflow params cannot change: {name!r} stays {logged!r}, not {value!r}",
            stacklevel=2,
        )

    def _log_image(self, image: StepImage) -> None:
        self.client.log_image(
            self.run_id,
            image.picture(),
            key=image.name,
            step=image.step,
            timestamp=image.timestamp_ms,
            synchronous=True,
        )

    def _unique(self, path: str) -> str:
        """``path``, or ``stem-N.ext`` if this run already has a file there (two dumps
        of one key at one step must not overwrite each other, also across a resume)."""
        relative, n = PurePosixPath(path), 0
        folder = relative.parent.as_posix()
        if self.settings.run_id is not None and folder not in self._listed:
            # A resumed run: an earlier session may have written this folder.
            self._listed.add(folder)
            listed = self.client.list_artifacts(self.run_id, None if folder == "." else folder)
            self._uploaded.update(entry.path for entry in listed if not entry.is_dir)
        while path in self._uploaded:
            n += 1
            path = relative.with_name(f"{relative.stem}-{n}{relative.suffix}").as_posix()
        self._uploaded.add(path)
        return path

    def _upload_fixed(self, path: str, data: bytes) -> None:
        """Upload ``data`` as the artifact ``path`` (replacing a file of that name)."""
        relative = PurePosixPath(path)
        folder = Path(tempfile.mkdtemp(dir=self._staging, prefix="upload-"))
        try:
            local = folder / relative.name
            local.write_bytes(data)
            parent = relative.parent.as_posix()
            self.client.log_artifact(
                self.run_id, str(local), artifact_path=None if parent == "." else parent
            )
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _append(self, path: str, text: str) -> None:
        local = self._staging / "text-root" / path
        local.parent.mkdir(parents=True, exist_ok=True)
        with open(local, "a", encoding="utf-8") as file:
            file.write(text)
        self._dirty.add(path)

    def _upload_text(self, *, force: bool = False) -> None:
        """Upload appended text files, at most every ``artifact_upload_interval`` seconds."""
        if not self._dirty:
            return
        now = time.monotonic()
        if not force and now - self._last_upload < self.settings.artifact_upload_interval:
            return
        self._last_upload = now
        for path in sorted(self._dirty):
            relative = PurePosixPath(path)
            parent = relative.parent.as_posix()
            self.client.log_artifact(
                self.run_id,
                str(self._staging / "text-root" / path),
                artifact_path=None if parent == "." else parent,
            )
        self._dirty.clear()
