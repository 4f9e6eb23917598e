"""Every output type, found through one entry each: the one place that names a backend.

An entry says how to build the output from its settings, whether it runs in the
delivery process (``remote``: MLflow, W&B, TensorBoard) or in the training process
(console, ``train.log``, JSONL, CSV), what ``exclude=`` calls it, and, for a remote
one, which of its settings are secrets (left out of the queue's header) and what it
publishes once built (an MLflow run id), so a restarted delivery continues that run.
The logger, build, the delivery process and replay only ever look entries up here.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from pydantic import SecretStr, TypeAdapter

from tracklog.settings import OutputSettings, mask_uri

if TYPE_CHECKING:
    from stable_baselines3.common.logger import KVWriter

    from tracklog._media import MediaStore
    from tracklog._row import Row
    from tracklog.outputs._base import OutputFormat

__all__ = [
    "BACKENDS",
    "Backend",
    "LocalContext",
    "RemoteContext",
    "RunNaming",
    "backend",
    "parse_output",
    "require",
    "split_secrets",
]


@dataclass(frozen=True, slots=True)
class LocalContext:
    """What a training-side output needs besides its own settings."""

    run_dir: Path
    media: MediaStore


@dataclass(frozen=True, slots=True)
class RemoteContext:
    """What an output built in the delivery process (or by replay) needs."""

    run_dir: Path
    #: The logger's settings as JSON, secrets masked (MLflow keeps it with the run).
    settings_json: str
    #: A folder of this output's own in the queue (MLflow stages text files there).
    state_dir: Path
    #: Chosen by the trainer and kept in the queue's header (MLflow's run_key tag).
    identity: dict[str, str]
    #: What an earlier build of this output published (``Backend.publish``).
    published: dict[str, str]
    #: Whether an earlier delivery of this queue may have created the run already.
    again: bool
    #: Whether the logger continues the run of an earlier process (``resume``): the
    #: identity is that run's, and the run exists unless it was never created.
    resumed: bool = False
    #: The logger's declared summaries, per key, as W&B's ``define_metric`` takes them.
    summaries: dict[str, str] = field(default_factory=dict[str, str])
    #: Their ``<key>/<kind>`` metric names (TensorBoard's HPARAMS tab lists them).
    summary_metrics: tuple[str, ...] = ()
    #: The trainer's pid, and seconds between system samples (None: no sampling).
    trainer_pid: int | None = None
    system_metrics: float | None = None
    #: The queue's session of the run ("<start ns>-<random>", so later sorts after
    #: earlier); "" for a queue written before sessions were recorded.
    session: str = ""

    @property
    def session_started(self) -> float | None:
        """When the session started (seconds since the epoch); None if not recorded."""
        started, _, _ = self.session.partition("-")
        return int(started) / 1e9 if started.isdigit() else None


@dataclass(frozen=True, slots=True)
class RunNaming:
    """How a sweep and a process group name and tag this process's runs."""

    group: str | None
    #: ``tracklog.group``/``job``/``rank``/``overrides`` tags for this process
    tags: dict[str, str]
    #: the run name for an explicitly set one (None: the default, ``<group>-<job>``)
    run_name: Callable[[str | None], str | None]


@dataclass(frozen=True, slots=True)
class Backend:
    type: str
    exclude: str
    remote: bool
    #: Writes files into run_dir (two live loggers must not share it).
    files: bool = False
    #: Names media files (videos, images) that the delivery process encodes.
    media: bool = False
    build_local: Callable[[Any, LocalContext], KVWriter] | None = None
    build_remote: Callable[[Any, RemoteContext], OutputFormat] | None = None
    #: Setting names that never reach disk (replay takes them from the environment).
    secrets: frozenset[str] = frozenset()
    #: Settings that are secret only sometimes: (name, masking function).
    masked: tuple[tuple[str, Callable[[str], str]], ...] = ()
    #: Chosen once by the trainer, so every delivery of the queue reaches one run.
    identity: Callable[[Any], dict[str, str]] = field(default=lambda settings: {})
    #: What a built output tells later builds and the trainer (run id, run folder).
    publish: Callable[[Any], dict[str, str]] = field(default=lambda output: {})
    #: A training-side check of each row (names keys as the backend will, so a
    #: rename warning belongs to the dump that caused it); None: no check.
    check: Callable[[Any], Callable[[Row], None]] | None = None
    #: The package it imports and the extra that installs it (checked at build, so a
    #: missing one fails in the trainer, not later in the delivery process).
    package: str | None = None
    extra: str | None = None
    #: Its settings with the sweep's run name, tags and group (None: it holds no run).
    name_run: Callable[[Any, RunNaming], OutputSettings] | None = None
    #: The settings field that resumes an existing run, if set (every rank of a
    #: process group would then write one run).
    resumed: Callable[[Any], str | None] | None = None
    #: Its settings with paths that are relative to the trainer's working directory
    #: made absolute: the delivery process, started once per trainer, keeps the
    #: working directory it started in (None: nothing relative to it).
    anchor: Callable[[Any], OutputSettings] | None = None
    #: Whether it gets the delivery process's system metrics samples.
    system: bool = False
    #: Whether an error raised while building it means "try again later".
    transient: Callable[[Exception], bool] = field(
        default=lambda error: isinstance(error, ConnectionError | TimeoutError)
    )


# Training side -----------------------------------------------------------------------
def _console(settings: Any, context: LocalContext) -> KVWriter:
    from tracklog.outputs.human import FixedHumanOutputFormat

    return FixedHumanOutputFormat(None, max_length=settings.max_length)


def _file(settings: Any, context: LocalContext) -> KVWriter:
    from tracklog.outputs.human import FixedHumanOutputFormat

    return FixedHumanOutputFormat(context.run_dir / settings.path, max_length=settings.max_length)


def _jsonl(settings: Any, context: LocalContext) -> KVWriter:
    from tracklog.outputs.jsonl import JsonlOutputFormat

    return JsonlOutputFormat(context.run_dir / settings.path, media=context.media)


def _csv(settings: Any, context: LocalContext) -> KVWriter:
    from tracklog.outputs.csv import CsvOutputFormat

    return CsvOutputFormat(context.run_dir / settings.path, media=context.media)


# Delivery side -----------------------------------------------------------------------
def _tensorboard(settings: Any, context: RemoteContext) -> OutputFormat:
    from tracklog.outputs.tensorboard import TensorBoardOutputFormat

    resuming = context.resumed and not context.again  # once, at the first row it gets
    return TensorBoardOutputFormat(
        context.run_dir / settings.path,
        resuming=resuming,
        summary_metrics=context.summary_metrics,
        session_started=context.session_started,
    )


def _mlflow(settings: Any, context: RemoteContext) -> OutputFormat:
    from tracklog.outputs.mlflow import MLFlowOutputFormat

    run_id = context.published.get("run_id")
    if run_id is not None:
        settings = settings.model_copy(update={"run_id": run_id})
    return MLFlowOutputFormat(
        settings,
        settings_json=context.settings_json,
        state_dir=context.state_dir,
        run_dir=context.run_dir,
        run_key=context.identity.get("run_key"),
        artifact_root=context.identity.get("artifact_root"),
        replaying=context.again,
        resuming=context.resumed,
        session=context.session,
    )


def _mlflow_identity(settings: Any) -> dict[str, str]:
    identity = {"run_key": secrets.token_hex(16)}
    if settings.tracking_uri.split(":", 1)[0].split("+", 1)[0].lower() in _DATABASES:
        # A database store keeps the artifacts of the experiments it creates (and of its
        # Default one) in ./mlruns of the process that opens it: the trainer's, as with
        # MLflow's own client, not the delivery process's, which started wherever the
        # trainer's first logger was built, nor that of a later `tracklog replay`.
        identity["artifact_root"] = os.path.abspath("mlruns")
    return identity


def _mlflow_publish(output: Any) -> dict[str, str]:
    return {"run_id": output.run_id}


def _mlflow_transient(error: Exception) -> bool:
    from tracklog.outputs.mlflow import is_transient

    return is_transient(error)


def _mlflow_check(settings: Any) -> Callable[[Row], None]:
    from tracklog.convert.mlflow import MlflowKeyCheck

    return MlflowKeyCheck()


def _tensorboard_check(settings: Any) -> Callable[[Row], None]:
    from tracklog.convert.tensorboard import TensorBoardHParamsCheck

    return TensorBoardHParamsCheck()


def _wandb_check(settings: Any) -> Callable[[Row], None]:
    from tracklog.convert.wandb import WandbKeyCheck

    return WandbKeyCheck()


def _wandb(settings: Any, context: RemoteContext) -> OutputFormat:
    from tracklog.outputs.wandb import WandBOutputFormat

    update: dict[str, object] = {"id": settings.id or context.identity["id"]}
    if context.again or context.resumed:
        update["resume"] = "allow"  # an earlier delivery (or process) may have begun it
    return WandBOutputFormat(
        settings.model_copy(update=update),
        run_dir=context.run_dir,
        summaries=context.summaries,
        stats=(context.trainer_pid, context.system_metrics),
        late=context.again,
        durable=True,  # a row is acked in the queue once the run's file has it
    )


_ID_LETTERS: Final = string.ascii_lowercase + string.digits


def _wandb_identity(settings: Any) -> dict[str, str]:
    # W&B's own ids: 8 lowercase letters and digits (wandb.sdk.lib.runid).
    return {"id": "".join(secrets.choice(_ID_LETTERS) for _ in range(8))}


def _wandb_publish(output: Any) -> dict[str, str]:
    return {"run_id": str(output.run.id), "run_dir": str(output.run_dir)}


def _mlflow_name_run(settings: Any, naming: RunNaming) -> OutputSettings:
    tags = {**settings.tags, **naming.tags}
    update = {"tags": tags, "run_name": naming.run_name(settings.run_name)}
    return settings.model_copy(update=update)  # type: ignore[no-any-return]  # an MlflowOutput


def _mlflow_resumed(settings: Any) -> str | None:
    return "run_id" if settings.run_id is not None else None


_DATABASES: Final = ("sqlite", "postgresql", "mysql", "mssql")


def _mlflow_anchor(settings: Any) -> OutputSettings:
    uri: str = settings.tracking_uri
    anchored = anchored_store_uri(uri)
    if anchored == uri:
        return settings  # type: ignore[no-any-return]  # an MlflowOutput
    return settings.model_copy(update={"tracking_uri": anchored})  # type: ignore[no-any-return]


def anchored_store_uri(uri: str) -> str:
    """A sqlite or file-store ``uri`` whose path is relative, made absolute against the
    working directory (what MLflow itself resolves it against, in this process)."""
    scheme, sep, rest = uri.partition(":///")
    if sep and scheme.split("+", 1)[0].lower() == "sqlite" and not rest.startswith("/"):
        path, query = rest, ""
        if "?" in path:
            path, query = path.split("?", 1)
            query = "?" + query
        if path and path != ":memory:":
            return f"{scheme}:///{os.path.abspath(path)}{query}"
        return uri
    if uri.startswith("file:") and not uri.startswith("file:/"):  # file:./mlruns
        return "file://" + os.path.abspath(uri.removeprefix("file:"))
    if ":" not in uri and uri and not os.path.isabs(uri):  # a bare path: the file store
        return os.path.abspath(uri)
    return uri


def _wandb_name_run(settings: Any, naming: RunNaming) -> OutputSettings:
    group = settings.group if settings.group is not None else naming.group
    update = {"name": naming.run_name(settings.name), "group": group}
    return settings.model_copy(update=update)  # type: ignore[no-any-return]  # a WandbOutput


def _wandb_resumed(settings: Any) -> str | None:
    return "id" if settings.id is not None else None


BACKENDS: Final[dict[str, Backend]] = {
    entry.type: entry
    for entry in (
        Backend("console", "stdout", remote=False, build_local=_console),
        Backend("file", "log", remote=False, files=True, build_local=_file),
        Backend("jsonl", "json", remote=False, files=True, media=True, build_local=_jsonl),
        Backend("csv", "csv", remote=False, files=True, media=True, build_local=_csv),
        Backend(
            "tensorboard",
            "tensorboard",
            remote=True,
            files=True,
            build_remote=_tensorboard,
            check=_tensorboard_check,
            system=True,
            package="tensorboard",
            extra="tensorboard",
        ),
        Backend(
            "mlflow",
            "mlflow",
            remote=True,
            build_remote=_mlflow,
            system=True,
            secrets=frozenset({"username", "password"}),
            masked=(("tracking_uri", mask_uri),),
            identity=_mlflow_identity,
            publish=_mlflow_publish,
            check=_mlflow_check,
            name_run=_mlflow_name_run,
            resumed=_mlflow_resumed,
            transient=_mlflow_transient,
            anchor=_mlflow_anchor,
            package="mlflow",
            extra="mlflow",
        ),
        Backend(
            "wandb",
            "wandb",
            remote=True,
            build_remote=_wandb,
            secrets=frozenset({"api_key"}),
            identity=_wandb_identity,
            publish=_wandb_publish,
            check=_wandb_check,
            name_run=_wandb_name_run,
            resumed=_wandb_resumed,
            package="wandb",
            extra="wandb",
        ),
    )
}


def split_secrets(settings: OutputSettings) -> tuple[dict[str, Any], dict[str, Any]]:
    """``settings`` as JSON data without its secrets (for disk), and the secrets alone
    (for the delivery process's stdin)."""
    entry = backend(settings)
    public = settings.model_dump(mode="json", exclude=set(entry.secrets))
    private: dict[str, Any] = {}
    for name in entry.secrets:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if value is not None:
            private[name] = value
    for name, mask in entry.masked:
        value = getattr(settings, name)
        if isinstance(value, str) and mask(value) != value:
            public[name] = mask(value)
            private[name] = value
    return public, private


def require(settings: OutputSettings) -> None:
    """Raise ImportError, naming the extra to install, if the output's package is missing."""
    entry = backend(settings)
    if entry.package is None:
        return
    try:
        found = importlib.util.find_spec(entry.package) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules holds None for it
        found = False
    if not found:
        install = f"pip install 'tracklog[{entry.extra}]'" if entry.extra else ""
        raise ImportError(
            f"the {entry.type} output (type: {entry.type}) needs the {entry.package!r} "
            f"package; install it with: {install or 'pip install ' + entry.package}"
        )


def backend(settings: OutputSettings | str) -> Backend:
    kind = settings if isinstance(settings, str) else settings.type
    return BACKENDS[kind]


_OUTPUT: TypeAdapter[OutputSettings] = TypeAdapter(OutputSettings)


def parse_output(data: object) -> OutputSettings:
    """One output's settings from JSON data (the queue header or the delivery pipe)."""
    return _OUTPUT.validate_python(data)
