"""``MLFlowOutputFormat``: one MLflow run per logger, metrics in batches, media as artifacts."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import re
import shutil
import sqlite3
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Final, Protocol, assert_never, cast
from urllib.parse import unquote, urlsplit, urlunsplit

from tracklog._checkpoints import checkpoint_file, superseded
from tracklog._queue import sqlite_transient
from tracklog._row import Row
from tracklog.convert.mlflow import (
    ArtifactFile,
    CheckpointUpload,
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
    import requests
    from mlflow import MlflowClient
    from mlflow.entities import FileInfo, Metric
    from mlflow.utils.rest_utils import MlflowHostCreds
    from PIL import Image as PILImage

    class _ArtifactCalls(Protocol):
        """The ``MlflowClient`` methods used here, whose parameters MLflow leaves
        (partly) unannotated: typed as tracklog calls them."""

        def list_artifacts(self, run_id: str, path: str | None = None) -> list[FileInfo]: ...

        def log_artifact(
            self, run_id: str, local_path: str, artifact_path: str | None = None
        ) -> None: ...

        def log_image(
            self,
            run_id: str,
            image: PILImage.Image,
            *,
            key: str,
            step: int,
            timestamp: int,
            synchronous: bool,
        ) -> None: ...


__all__ = ["MLFlowOutputFormat"]

_MAX_TAG_LENGTH = 8000
_TRAIN_LOG = "train.log"
_TEXT_SEQS = "text-rows"  # in staging: the rows whose text values are already appended


def _tracklog_version() -> str:
    try:
        return version("tracklog")
    except PackageNotFoundError:
        return "unknown"


def _allow_file_store(settings: MlflowOutput) -> None:
    """MLflow 3.17's own opt-in to its old file store, which it reads from its environment.

    ``FileStore.__init__`` checks ``$MLFLOW_ALLOW_FILE_STORE`` each time MLflow builds the
    store, and MLflow builds it where tracklog cannot hand it one (its store registry, its
    model registry), so this stays a process-wide variable; a value the user set is kept.
    """
    if settings.allow_file_store:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


_CREATING_WAIT: Final = 300.0  # seconds; creating a new store takes 2 CPU-seconds


@contextlib.contextmanager
def _creating(tracking_uri: str) -> Generator[None]:
    """Hold, for an SQLite store, an exclusive ``flock`` on the folder of its database.

    MLflow creates and migrates a new SQLite store with Alembic when a client is made,
    and its SQLite migrations are not transactional: two processes opening one fresh
    ``mlflow.db`` at once (the jobs of a sweep, each with its delivery process)
    interleave them, and both fail (``table _alembic_tmp_... already exists``) and leave
    the database half migrated, refusing every later client. Held while a delivery
    process makes its client, the lock lets one of them create the store and the others
    find it made. Other stores (PostgreSQL, a server) take no lock; a folder that cannot
    be locked (some network filesystems, where SQLite is unsafe anyway) goes without,
    and so does one whose lock another process holds for longer than ``_CREATING_WAIT``
    (it hangs or is stopped: this delivery must not wait for it forever).
    """
    if urlsplit(tracking_uri).scheme.lower().split("+", 1)[0] != "sqlite":  # sqlite+pysqlite
        yield
        return
    from sqlalchemy.engine import make_url

    database = make_url(tracking_uri).database
    if not database or database == ":memory:" or database.startswith("file:"):
        yield
        return
    try:
        fd = os.open(Path(database).parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        yield  # no such folder: MLflow's own error says so
        return
    try:
        give_up = time.monotonic() + _CREATING_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() < give_up:
                    time.sleep(0.05)
                    continue
            except OSError:
                pass  # cannot be locked here
            break
        yield
    finally:
        os.close(fd)  # releases the lock


def _shown_uri(uri: str) -> str:
    """``uri`` for a message: without its user info, query and fragment, where secrets live.

    The user info ends at the last ``@`` (as SQLAlchemy reads it), so a password with an
    unescaped ``/``, ``?`` or ``#`` goes too; an ``@`` in a query hides the host as well.
    """
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri  # "databricks", or a path
    rest = re.split(r"[?#]", rest.rsplit("@", 1)[-1], maxsplit=1)[0]
    if "=" in rest or "&" in rest:
        rest = "..."
    return f"{scheme}://{rest}"


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.rsplit("@", 1)[-1].lower()


@dataclass(frozen=True)
class _Connection:
    """One output's way to its http(s) tracking server: address, credentials, limits.

    ``address`` is the tracking URI without user info, query and fragment: MLflow appends
    its API paths to it, puts it in error messages and prints it ("View run at"). The
    credentials are the settings' ``username``/``password``, else the URI's user info,
    else MLflow's own (``$MLFLOW_TRACKING_USERNAME``/``PASSWORD``, ~/.mlflow/credentials).
    ``retries``/``timeout`` are None where the user set MLflow's variables for them.
    """

    address: str
    username: str | None
    password: str | None = field(repr=False)
    retries: int | None
    timeout: float | None

    @classmethod
    def of(cls, settings: MlflowOutput) -> _Connection:
        uri = settings.tracking_uri
        parts = urlsplit(uri)
        try:
            parts.port  # noqa: B018  # raises ValueError on a port that is not a number
        except ValueError:
            valid = False
        else:
            valid = bool(parts.hostname)
        if not valid or "@" in urlunsplit(("", "", parts.path, parts.query, parts.fragment)):
            # Also what a password with an unescaped "/", "?" or "#" looks like.
            raise ValueError(
                f"invalid MLflow tracking_uri {_shown_uri(uri)}: characters of a user name "
                "or password in it must be percent-encoded"
            )
        username, password = settings.username, None
        if settings.password is not None:
            password = settings.password.get_secret_value()
        if username is None and parts.username is not None:
            username = unquote(parts.username)
            password = unquote(parts.password) if parts.password is not None else None
        return cls(
            # No query or fragment: MLflow would append its API paths after them.
            address=urlunsplit(
                (parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path.rstrip("/"), "", "")
            ),
            username=username,
            password=password,
            retries=None
            if "MLFLOW_HTTP_REQUEST_MAX_RETRIES" in os.environ
            else settings.request_retries,
            timeout=None
            if "MLFLOW_HTTP_REQUEST_TIMEOUT" in os.environ
            else settings.request_timeout,
        )

    def host_creds(self, host: str) -> MlflowHostCreds:
        """MLflow's credentials for ``host`` (TLS options, token) with this output's user."""
        from mlflow.utils.credentials import (
            get_default_host_creds,  # pyright: ignore[reportUnknownVariableType]  # unannotated in MLflow
        )

        default_creds = cast("Callable[[str], MlflowHostCreds]", get_default_host_creds)
        creds = default_creds(host)
        if self.username is not None:
            creds.username = self.username
            if self.password is not None:
                creds.password = self.password
        return creds

    def request(self, host: str, endpoint: str, method: str, **kwargs: Any) -> requests.Response:
        from mlflow.utils.rest_utils import (
            http_request,  # pyright: ignore[reportUnknownVariableType]  # unannotated in MLflow
        )

        send = cast("Callable[..., requests.Response]", http_request)
        return send(
            self.host_creds(host),
            endpoint,
            method,
            max_retries=self.retries,
            timeout=self.timeout,
            **kwargs,
        )


def _client(settings: MlflowOutput, artifact_root: str | None = None) -> MlflowClient:
    """A client of ``settings.tracking_uri`` that writes no environment variable.

    For an http(s) server, its requests carry this output's credentials, retries and
    timeout (MLflow would read them from process-wide environment variables). For a
    database store, ``artifact_root`` is where it keeps the artifacts of experiments it
    creates (MLflow's default: ./mlruns of this process).
    """
    from mlflow import MlflowClient

    _allow_file_store(settings)
    if urlsplit(settings.tracking_uri).scheme.lower() not in ("http", "https"):
        with _creating(settings.tracking_uri):  # MlflowClient() creates a new store
            rooted = None if artifact_root is None else _rooted_client(settings, artifact_root)
            client = MlflowClient(tracking_uri=settings.tracking_uri)
        if rooted is not None:
            # As for a server below: MLflow takes no artifact root but from $MLFLOW_*.
            client._tracking_client = rooted  # pyright: ignore[reportPrivateUsage]
        return client
    connection = _Connection.of(settings)
    client = MlflowClient(tracking_uri=connection.address)
    # MlflowClient takes no store; its tracking service client is where MLflow keeps one
    # (a private attribute: MLflow has no public way to set it).
    client._tracking_client = _tracking_client_class()(connection)  # pyright: ignore[reportPrivateUsage]
    return client


def _rooted_client(settings: MlflowOutput, artifact_root: str) -> Any:
    """MLflow's tracking service client of a database store whose default artifact root
    is ``artifact_root``; made first, it also creates a new store with that root (the
    Default experiment's artifacts go there too)."""
    from mlflow.tracking._tracking_service import utils
    from mlflow.tracking._tracking_service.client import TrackingServiceClient

    get_store = cast(
        "Callable[[str, str], object]",
        utils._get_store,  # pyright: ignore[reportPrivateUsage, reportUnknownMemberType]  # unannotated
    )

    class RootedTrackingServiceClient(TrackingServiceClient):
        tracking_uri: str

        @property
        def store(self) -> object:
            # MLflow caches the store by (URI, artifact root): built once per process.
            return get_store(self.tracking_uri, artifact_root)

    return RootedTrackingServiceClient(settings.tracking_uri)  # type: ignore[no-untyped-call]


@functools.cache
def _tracking_client_class() -> Callable[[_Connection], Any]:
    """MLflow's tracking service client, REST store and artifact repository, for one
    connection each.

    Defined on first use: importing MLflow takes seconds, ``import tracklog`` must not.
    """
    import json
    import posixpath

    from mlflow.entities import FileInfo
    from mlflow.store.artifact import artifact_repo, artifact_repository_registry
    from mlflow.store.artifact.artifact_repo import ArtifactRepository
    from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository
    from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository
    from mlflow.store.tracking.rest_store import RestStore
    from mlflow.tracking._tracking_service.client import TrackingServiceClient
    from mlflow.utils import mime_type_utils, proto_json_utils, request_utils, rest_utils, uri

    # MLflow's helpers used here leave their parameters unannotated; typed once.
    verify_response = cast(
        "Callable[[requests.Response, str], requests.Response]",
        rest_utils.verify_rest_response,  # pyright: ignore[reportUnknownMemberType]  # unannotated
    )
    parse_dict = cast(
        "Callable[..., None]",  # called with keywords: js_dict=, message=
        proto_json_utils.parse_dict,  # pyright: ignore[reportUnknownMemberType]  # unannotated
    )
    raise_for_status = cast(
        "Callable[[requests.Response], None]",
        request_utils.augmented_raise_for_status,  # pyright: ignore[reportUnknownMemberType]  # unannotated
    )
    safe_path = cast(
        "Callable[[str], str]",
        uri.validate_path_is_safe,  # pyright: ignore[reportUnknownMemberType]  # unannotated
    )
    mime_type = cast(
        "Callable[[str], str]",
        # MLflow's own HttpArtifactRepository.log_artifact uses this private helper.
        mime_type_utils._guess_mime_type,  # pyright: ignore[reportUnknownMemberType, reportPrivateUsage]
    )
    check_path = cast(
        "Callable[[str | None], None]",
        artifact_repo.verify_artifact_path,  # pyright: ignore[reportUnknownMemberType]  # unannotated
    )
    resolve = cast(
        "Callable[[str, str], str]",
        MlflowArtifactsRepository.resolve_uri,  # pyright: ignore[reportUnknownMemberType]  # unannotated
    )
    default_repo: Callable[..., Any] = artifact_repository_registry.get_artifact_repository

    class Store(RestStore):
        """MLflow's REST store with the connection's credentials, retries and timeout.

        ``get_host_creds`` is RestStore's own seam for credentials. Retries and timeout
        have none: ``RestStore._call_endpoint`` calls ``rest_utils.call_endpoint``, which
        calls ``http_request`` without ``max_retries``/``timeout`` (so MLflow reads its
        environment variables). This ``_call_endpoint`` is MLflow 3.17's, with the two
        passed and ``call_endpoint`` inlined.
        """

        # RestStore's maps {request class: (path, HTTP method)}, built by an unannotated
        # MLflow function; annotated here only.
        _METHOD_TO_INFO: dict[type[object], tuple[str, str]]
        _V3_METHOD_TO_INFO: dict[type[object], tuple[str, str]]

        def __init__(self, connection: _Connection) -> None:
            super().__init__(lambda: connection.host_creds(connection.address))  # type: ignore[no-untyped-call]
            self.connection = connection

        def _call_endpoint(
            self,
            api: Any,
            json_body: str | None = None,
            endpoint: str | None = None,
            retry_timeout_seconds: float | None = None,
            response_proto: Any = None,
        ) -> Any:
            # retry_timeout_seconds: only for Databricks' SDK, which this store never uses.
            infos = self._V3_METHOD_TO_INFO if api in self._V3_APIS else self._METHOD_TO_INFO
            self._validate_workspace_support_if_specified()
            path, method = infos[api]
            path = endpoint or path
            body = None if json_body is None else json.loads(json_body)
            response = self.connection.request(
                self.connection.address,
                path,
                method,
                **({"params": body} if method == "GET" else {"json": body}),
            )
            response = verify_response(response, path)
            proto = response_proto or api.Response()
            if response.status_code != 204:
                parse_dict(js_dict=json.loads(response.text), message=proto)
            return proto

    class Artifacts(HttpArtifactRepository):
        """MLflow's HTTP artifact repository with the connection's credentials and limits.

        MLflow's methods build credentials from the environment (``get_default_host_creds``)
        and call ``http_request`` without retries or timeout; these three are MLflow
        3.17's with the connection's request. Multipart uploads (presigned, which build
        credentials the same way in four more methods) are off: tracklog's files are small.
        """

        def __init__(self, url: str, connection: _Connection) -> None:
            super().__init__(url, tracking_uri=connection.address)  # type: ignore[no-untyped-call]
            self.connection = connection

        @property
        def _host_creds(self) -> MlflowHostCreds:
            return self.connection.host_creds(self.artifact_uri)

        def _is_multipart_upload_enabled(self) -> bool:
            return False

        def log_artifact(self, local_file: str, artifact_path: str | None = None) -> None:
            check_path(artifact_path)
            name = os.path.basename(local_file)
            endpoint = posixpath.join("/", *((artifact_path, name) if artifact_path else (name,)))
            with open(local_file, "rb") as data:
                response = self.connection.request(
                    self.artifact_uri,
                    endpoint,
                    "PUT",
                    data=data,
                    extra_headers={"Content-Type": mime_type(name)},
                )
            raise_for_status(response)

        def list_artifacts(self, path: str | None = None) -> list[FileInfo]:
            endpoint = "/mlflow-artifacts/artifacts"
            url, tail = self.artifact_uri.split(endpoint, maxsplit=1)
            root = tail.lstrip("/")
            params = {"path": posixpath.join(root, path) if path else root}
            response = self.connection.request(url, endpoint, "GET", params=params)
            raise_for_status(response)
            infos: list[FileInfo] = []
            for entry in response.json().get("files", []):
                found = safe_path(entry["path"])
                size = int(entry["file_size"]) if "file_size" in entry else None
                infos.append(
                    FileInfo(posixpath.join(path, found) if path else found, entry["is_dir"], size)
                )
            if (  # MLflow's rule: listing a single file lists nothing
                len(infos) == 1
                and not infos[0].is_dir
                and path is not None
                and infos[0].path == posixpath.join(path, os.path.basename(path))
            ):
                return []
            return sorted(infos, key=lambda info: str(info.path))

        def _download_file(self, remote_file_path: str, local_path: str) -> None:
            endpoint = posixpath.join("/", remote_file_path)
            response = self.connection.request(self.artifact_uri, endpoint, "GET", stream=True)
            raise_for_status(response)
            with open(local_path, "wb") as file:
                for chunk in response.iter_content(chunk_size=1024 * 1024):
                    file.write(chunk)

    class Tracking(TrackingServiceClient):
        """MLflow's tracking service client with its own store and artifact repositories.

        ``store`` is a property MLflow resolves from the URI (a RestStore reading the
        environment). Artifact repositories are cached here, not in MLflow's process-wide
        cache keyed by run id alone, and get the connection only for this server: an
        artifact location on another server or in a cloud store gets MLflow's own.
        """

        def __init__(self, connection: _Connection) -> None:
            self._own_store = Store(connection)
            self._connection = connection
            self._repos: dict[tuple[str, str], ArtifactRepository] = {}
            super().__init__(connection.address)  # type: ignore[no-untyped-call]

        @property
        def store(self) -> Store:
            return self._own_store

        def _get_artifact_repo(self, resource_id: str, *, resource: str = "run") -> Any:
            repo = self._repos.get((resource, resource_id))
            if repo is None:
                if resource == "run":
                    run = self.store.get_run(resource_id)  # type: ignore[no-untyped-call]
                    location = str(run.info.artifact_uri)
                else:
                    location = str(self.get_logged_model(resource_id).artifact_location)
                repo = self._repos[resource, resource_id] = self._repo(location)
            return repo

        def _repo(self, location: str) -> Any:
            url = location
            scheme = urlsplit(location).scheme.lower()
            if scheme == "mlflow-artifacts":
                url = resolve(location, self._connection.address)
            if scheme in ("mlflow-artifacts", "http", "https") and _origin(url) == _origin(
                self._connection.address
            ):
                return Artifacts(url, self._connection)
            # Another server, or a cloud store: not this output's credentials.
            return default_repo(location, tracking_uri=self._connection.address)

        # MLflow's two below go through mlflow.artifacts, which builds a client of its own.
        def list_artifacts(self, run_id: str, path: str | None = None) -> list[FileInfo]:
            return list(self._get_artifact_repo(run_id).list_artifacts(path))

        def download_artifacts(self, run_id: str, path: str, dst_path: str | None = None) -> str:
            if dst_path is not None:
                Path(dst_path).mkdir(parents=True, exist_ok=True)
            return str(self._get_artifact_repo(run_id).download_artifacts(path, dst_path))

    return Tracking


#: The run's latest session ("<start ns>-<random>"): set by the logger that created or
#: last resumed the run; an earlier session's delivery leaves the status to it.
_SESSION_TAG: Final = "tracklog.session"

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
    request (4xx: invalid name, unknown run, permission denied), and a SQLite store that
    is not a whole MLflow database: a missing table, or "table _alembic_tmp_experiments
    already exists" (MLflow's migrations of a new store interrupted by a second process
    running them) fail the same way at every retry (see ``sqlite_transient``).
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
        kind = type(current)
        if kind.__name__ in ("OperationalError", "DisconnectionError"):
            # SQLAlchemy's (or the driver's own): a server gone, a database locked; for
            # SQLite, only what its result code says passes (sqlite_transient).
            database_error = getattr(current, "orig", current)
            if isinstance(database_error, sqlite3.Error):
                return sqlite_transient(database_error)
            return True
        if kind.__name__ == "TimeoutError" and kind.__module__.startswith("sqlalchemy"):
            return True  # SQLAlchemy: no free connection in the pool (many runs at once)
        if isinstance(current, MlflowException):
            message = (
                current.message
                if isinstance(current.message, str)  # pyright: ignore[reportUnnecessaryIsInstance]  # MLflow's str annotation is not enforced
                else str(current)
            )
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
    checkpoints: list[CheckpointUpload] = field(default_factory=list[CheckpointUpload])
    batch_sent: bool = False
    files_done: int = 0
    images_done: int = 0
    #: Files of ``checkpoints[0]`` uploaded (the list shrinks as each one is done).
    checkpoint_files_done: int = 0
    extra: dict[str, Any] = field(default_factory=dict[str, Any])


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

    def __init__(
        self,
        settings: MlflowOutput,
        *,
        settings_json: str | None = None,
        state_dir: Path | None = None,
        run_dir: Path | None = None,
        run_key: str | None = None,
        artifact_root: str | None = None,
        replaying: bool = False,
        resuming: bool = False,
        session: str = "",
    ) -> None:
        self.settings = settings
        #: Where kept checkpoints are (their queued paths are relative to it).
        self._run_dir = run_dir
        self.client: MlflowClient = _client(settings, artifact_root)
        self._names = MlflowNames()
        self._params: dict[str, str] = {}
        self._status = "FINISHED"
        # Text appended since the last upload lives here; in the delivery queue's folder
        # (state_dir) it survives a crash, and a later delivery or `tracklog replay`
        # uploads it.
        if state_dir is not None:
            self._staging = state_dir / "staging"
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
        self._last_upload = time.monotonic()
        self._closed = False
        self._settings_json = settings_json
        self._settings_uploaded = settings_json is None
        #: Tags the run, so a create_run whose reply was lost is found, not repeated.
        self.run_key = run_key or uuid.uuid4().hex
        self._replaying = replaying
        #: A process continuing an earlier one's run (``resume``): found by run_key.
        self._resuming = resuming
        #: This logger's session of the run (see ``_taken_over``); "" for none.
        self._session = session
        self._later_session: str | None = None  # the session that took the run over
        self._said_taken_over = False
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
                f"MLflow at {_shown_uri(settings.tracking_uri)} is unreachable "
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

    def _cleanup(self) -> None:
        shutil.rmtree(self._staging, ignore_errors=True)

    @property
    def _artifact_calls(self) -> _ArtifactCalls:
        """``self.client``, typed for its artifact methods (MLflow leaves them unannotated)."""
        return cast("_ArtifactCalls", self.client)

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
            if self._session:
                tags[_SESSION_TAG] = self._session
            if self.settings.run_id is not None:
                self._run_id = self._resume(self.settings.run_id, tags)
            else:
                experiment = self._experiment_id()
                # Always looked for: this output's create_run whose reply was lost, the
                # run a resume continues, and the run a later session created before
                # this queue's replay (a job killed whole, then restarted) are found.
                found = self._find_run(experiment)
                if found is not None and self._resuming:
                    found = self._resume(found, tags)
                elif found is None:
                    if self._resuming:
                        warnings.warn(
                            f"resume: the MLflow run this run_dir continues (tag "
                            f"tracklog.run_key = {self.run_key}) is not in experiment "
                            f"{self.settings.experiment or 'Default'} (never created: the "
                            "earlier process was killed before MLflow answered; or deleted, "
                            "or the experiment setting changed); a new run is started",
                            stacklevel=4,
                        )
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

    def _resume(self, run_id: str, tags: dict[str, str]) -> str:
        run = self.client.get_run(run_id)
        run_id = str(run.info.run_id)
        later = run.data.tags.get(_SESSION_TAG)
        if self._session and later is not None and later > self._session:
            # A later session (a restart after a SIGKILL) resumed the run while this
            # queue waited: this one's rows go in, but the run stays that session's.
            self._later_session = later
            return run_id
        # A run continued through `resume` is this run's own: after a SIGKILL nobody
        # ended it, so RUNNING is expected.
        if run.info.status == "RUNNING" and not (self._replaying or self._resuming):
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
        if self._adopt_local_text():
            return
        for entry in self._artifact_calls.list_artifacts(run_id):
            if entry.path in (_TRAIN_LOG, "text"):
                destination = self._staging / "text-root"
                destination.mkdir(parents=True, exist_ok=True)
                # Through this output's client: its credentials, retries and timeout.
                self.client.download_artifacts(run_id, entry.path, str(destination))

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
            if not self._taken_over():
                self.client.set_terminated(self.run_id, status=self._status)
        except Exception as error:
            if not is_transient(error):
                self._closed = True
                self._cleanup()
            raise
        self._closed = True
        self._cleanup()

    # Writing -------------------------------------------------------------------------
    def write_row(self, row: Row) -> None:
        self.write_rows([row])

    def write_rows(self, rows: list[Row]) -> None:
        """Send the rows' metrics and params in one ``log_batch``, then their media.

        Each row is converted once and remembered until it is fully sent, so a call
        repeated after an error sends only what did not arrive, under the artifact names
        it was given (MLflow ignores metric points it already has). That holds after an
        error that is not transient too: the delivery process then sends the rows again
        one at a time, and a row sent in full sends nothing the second time.
        """
        from mlflow.entities import Param

        if not rows:
            return
        self._ensure_run()
        # Rows are handed over in order: one remembered from before the first of these
        # was skipped after its last failure.
        first = min(row.seq for row in rows)
        for seq in [seq for seq in self._prepared if seq < first]:
            self._forget_prepared(seq)
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
            while item.checkpoints:
                self._upload_checkpoint(item)
                del item.checkpoints[0]
                item.checkpoint_files_done = 0
        for row in rows:
            self._prepared.pop(row.seq, None)
        self._upload_text()

    def _forget_prepared(self, seq: int) -> None:
        """Forget a row that was skipped: the names of its files that were never
        uploaded are free again."""
        skipped = self._prepared.pop(seq)
        self._uploaded.difference_update(path for path, _ in skipped.files[skipped.files_done :])

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
                        case CheckpointUpload():
                            prepared.checkpoints.append(item)
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
        self._artifact_calls.log_image(
            self.run_id,
            image.picture(),
            key=image.name,
            step=image.step,
            timestamp=image.timestamp_ms,
            synchronous=True,
        )

    def _upload_checkpoint(self, prepared: _Prepared) -> None:
        """Upload the first checkpoint's files (those not sent yet), then point its alias
        tags at it: a tag never names a folder whose files are not all there."""
        from mlflow.entities import RunTag

        checkpoint = prepared.checkpoints[0]
        while prepared.checkpoint_files_done < len(checkpoint.files):
            name = checkpoint.files[prepared.checkpoint_files_done]
            parent = PurePosixPath(checkpoint.path, name).parent.as_posix()
            with checkpoint_file(self._run_dir, checkpoint.local, name) as local:
                self._artifact_calls.log_artifact(self.run_id, str(local), artifact_path=parent)
            prepared.checkpoint_files_done += 1
        # A live delivery sends rows in order: only one that continues an earlier
        # delivery's queue (a replay) can come after a newer checkpoint's aliases.
        newer = superseded(self._run_dir, checkpoint.local) if self._replaying else frozenset[str]()
        tags = [
            RunTag(tag, checkpoint.path) for alias, tag in checkpoint.tags if alias not in newer
        ]
        if tags:
            self.client.log_batch(self.run_id, tags=tags, synchronous=True)

    def _unique(self, path: str) -> str:
        """``path``, or ``stem-N.ext`` if this run already has a file there (two dumps
        of one key at one step must not overwrite each other, also across a resume)."""
        relative, n = PurePosixPath(path), 0
        folder = relative.parent.as_posix()
        earlier = self.settings.run_id is not None or self._resuming
        if earlier and folder not in self._listed:
            # A resumed run (by run_id or by resume): an earlier session may have
            # written this folder.
            self._listed.add(folder)
            listed = self._artifact_calls.list_artifacts(
                self.run_id, None if folder == "." else folder
            )
            self._uploaded.update(entry.path for entry in listed if not entry.is_dir)
        while path in self._uploaded:
            n += 1
            path = relative.with_name(f"{relative.stem}-{n}{relative.suffix}").as_posix()
        self._uploaded.add(path)
        return path

    def _taken_over(self) -> bool:
        """Whether a later session of this run (a process that resumed it after this
        one was killed) has taken the run over. Its ``tracklog.session`` tag then names
        that session: this queue's rows still go in, but the run's status and its
        ``train.log`` and text files are left to that session, which uploads its own
        (it continued them from what this one had uploaded; the rest of this one's
        lines are in run_dir/train.log). Said once; once taken over, always."""
        if not self._session:
            return False  # a queue from before sessions: as before
        if self._later_session is None:
            run = self.client.get_run(self.run_id)
            current = run.data.tags.get(_SESSION_TAG)
            if current is None or current <= self._session:
                return False
            self._later_session = current
        if not self._said_taken_over:
            self._said_taken_over = True
            warnings.warn(
                f"MLflow run {self.run_id} was resumed by a later process (session "
                f"{self._later_session}): its status, train.log and text files are left "
                "to that process; the rows of this one are delivered",
                stacklevel=2,
            )
        return True

    def _upload_fixed(self, path: str, data: bytes) -> None:
        """Upload ``data`` as the artifact ``path`` (replacing a file of that name)."""
        relative = PurePosixPath(path)
        folder = Path(tempfile.mkdtemp(dir=self._staging, prefix="upload-"))
        try:
            local = folder / relative.name
            local.write_bytes(data)
            parent = relative.parent.as_posix()
            self._artifact_calls.log_artifact(
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
        if self._taken_over():
            self._dirty.clear()  # the later session's train.log is not replaced
            return
        for path in sorted(self._dirty):
            relative = PurePosixPath(path)
            parent = relative.parent.as_posix()
            self._artifact_calls.log_artifact(
                self.run_id,
                str(self._staging / "text-root" / path),
                artifact_path=None if parent == "." else parent,
            )
        self._dirty.clear()
