"""``MLFlowOutputFormat``: one MLflow run per logger, metrics in batches, media as artifacts."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, assert_never

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
from tracklog.settings import MlflowOutput

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

__all__ = ["MLFlowOutputFormat"]

_MAX_TAG_LENGTH = 8000
_TRAIN_LOG = "train.log"


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

    def __init__(self, settings: MlflowOutput, *, settings_json: str | None = None) -> None:
        from mlflow import MlflowClient

        _bound_requests(settings)
        self._previous_credentials = _export_credentials(settings)
        self.settings = settings
        self.client: MlflowClient = MlflowClient(tracking_uri=settings.tracking_uri)
        self._names = MlflowNames()
        self._params: dict[str, str] = {}
        self._status = "FINISHED"
        self._staging = Path(tempfile.mkdtemp(prefix="tracklog-mlflow-"))
        self._dirty: set[str] = set()
        self._uploaded: set[str] = set()
        self._listed: set[str] = set()
        self._last_upload = time.monotonic()
        self._closed = False
        try:
            self.run_id = self._start_run(settings_json)
        except BaseException:
            shutil.rmtree(self._staging, ignore_errors=True)
            _restore_credentials(self._previous_credentials)
            raise

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

    def _start_run(self, settings_json: str | None) -> str:
        tags = {**self.settings.tags, "tracklog.version": _tracklog_version()}
        if settings_json is not None and len(settings_json) <= _MAX_TAG_LENGTH:
            tags["tracklog.settings"] = settings_json  # too long: only the artifact below
        if self.settings.run_id is not None:
            run_id = self._resume(tags)
        else:
            experiment = self._experiment_id()
            run = self.client.create_run(experiment, run_name=self.settings.run_name, tags=tags)
            run_id = str(run.info.run_id)
        if settings_json is not None:
            self.run_id = run_id
            self._upload("tracklog/settings.json", settings_json.encode("utf-8"))
        return run_id

    def _resume(self, tags: dict[str, str]) -> str:
        assert self.settings.run_id is not None
        run = self.client.get_run(self.settings.run_id)
        run_id = str(run.info.run_id)
        if run.info.status == "RUNNING":
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
        """Fetch the run's train.log and text files, so appends continue them."""
        from mlflow.artifacts import download_artifacts

        for entry in self.client.list_artifacts(run_id):
            if entry.path in (_TRAIN_LOG, "text"):
                download_artifacts(
                    run_id=run_id,
                    artifact_path=entry.path,
                    dst_path=str(self._staging / "text-root"),
                    tracking_uri=self.settings.tracking_uri,
                )

    def mark_failed(self, reason: str) -> None:
        self._status = "KILLED" if reason == "KeyboardInterrupt" else "FAILED"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._upload_text(force=True)
        finally:
            try:
                self.client.set_terminated(self.run_id, status=self._status)
            finally:
                shutil.rmtree(self._staging, ignore_errors=True)
                _restore_credentials(self._previous_credentials)

    # Writing -------------------------------------------------------------------------
    def write_row(self, row: Row) -> None:
        from mlflow.entities import Metric, Param

        metrics: list[Metric] = []
        params: list[Param] = []
        new_params: dict[str, str] = {}
        files: list[ArtifactFile] = []
        images: list[StepImage] = []
        for key, value in row.values.items():
            for item in to_mlflow(key, value, row, self._names):
                match item:
                    case MetricPoint():
                        metrics.append(Metric(item.name, item.value, item.timestamp_ms, item.step))
                    case ParamValue():
                        if self._is_new_param(item) and item.name not in new_params:
                            new_params[item.name] = item.value
                            params.append(Param(item.name, item.value))
                    case ArtifactFile():
                        files.append(item)
                    case StepImage():
                        images.append(item)
                    case TextAppend():
                        self._append(item.path, item.text)
                    case _:
                        assert_never(item)
        if metrics or params:
            # MlflowClient.log_batch splits this into requests within MLflow's limits
            # (1000 metrics, 100 params per request); one dump is never one per key.
            self.client.log_batch(self.run_id, metrics=metrics, params=params, synchronous=True)
        self._params.update(new_params)  # only once MLflow has them
        for file in files:
            self._upload(file.path, file.encode())
        for image in images:
            self._log_image(image)
        self._upload_text()

    def write_line(self, line: str) -> None:
        self._append(_TRAIN_LOG, line + "\n")
        self._upload_text()

    def _is_new_param(self, param: ParamValue) -> bool:
        logged = self._params.get(param.name)
        if logged is None:
            return True
        if logged != param.value:
            warnings.warn(
                f"MLflow params cannot change: {param.name!r} stays {logged!r}, "
                f"not {param.value!r}",
                stacklevel=2,
            )
        return False

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

    def _upload(self, path: str, data: bytes) -> None:
        relative = PurePosixPath(self._unique(path))
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
