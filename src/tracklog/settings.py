"""Logger settings: pydantic models, one per output, discriminated by ``type``.

Every model forbids unknown fields, so a typo is a :class:`pydantic.ValidationError`
naming its path (``outputs.1.colour``) instead of a silently ignored option.

Environment overrides (pydantic-settings) use the prefix ``TRACKLOG_``; a list or a
nested value is given as JSON. They take precedence over values from files, mappings and
code, so a job script can redirect a run without editing its settings file:

- ``TRACKLOG_RUN_DIR=/scratch/job42``
- ``TRACKLOG_LEVEL=debug``
- ``TRACKLOG_OUTPUTS='[{"type": "console"}, {"type": "jsonl"}]'`` (JSON)
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, cast

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

__all__ = [
    "ConsoleOutput",
    "CsvOutput",
    "DeliverySettings",
    "FileOutput",
    "JsonlOutput",
    "Level",
    "LoggerSettings",
    "MlflowOutput",
    "OutputSettings",
    "TensorboardOutput",
    "WandbOutput",
    "load_settings",
]

Level = Literal["debug", "info", "warn", "error", "disabled"]
#: What a declared summary keeps of a key's values (see docs/summaries.md).
SummaryKind = Literal["min", "max", "mean", "first", "last", "best:max", "best:min"]

#: SB3's numeric levels, by the names the settings file uses.
LEVELS: Mapping[str, int] = {"debug": 10, "info": 20, "warn": 30, "error": 40, "disabled": 50}


class _Output(BaseModel):
    # hide_input_in_errors: pydantic would print the offending input, a password or an
    # API key among them (a password given without its username, a misspelt api_key).
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class _FileBacked(_Output):
    path: Path

    @field_validator("path")
    @classmethod
    def _not_empty(cls, value: Path) -> Path:
        _no_nul(value)
        if str(value) in ("", ".") or value.name == "..":
            raise ValueError(f"path must name a file, not a folder: {str(value)!r}")
        return value


def _no_nul(path: Path) -> None:
    if "\x00" in str(path):
        raise ValueError(f"path must not contain a NUL byte: {str(path)!r}")


class ConsoleOutput(_Output):
    """The human-readable table on standard output (SB3's ``stdout``)."""

    type: Literal["console"] = Field(
        default="console", description="selects this output; its `exclude` name is `stdout`"
    )
    max_length: int = Field(default=36, ge=8, le=200, description="widest key or value shown")


class FileOutput(_FileBacked):
    """The same table and every ``info()`` line, appended to a file (SB3's ``log``)."""

    type: Literal["file"] = Field(
        default="file", description="selects this output; its `exclude` name is `log`"
    )
    path: Path = Field(
        default=Path("train.log"),
        description="the log file, appended to; relative to run_dir unless absolute",
    )
    max_length: int = Field(default=36, ge=8, le=200, description="widest key or value shown")


class JsonlOutput(_FileBacked):
    """One flat JSON object per dump (exclude name ``json``)."""

    type: Literal["jsonl"] = Field(
        default="jsonl", description="selects this output; its `exclude` name is `json`"
    )
    path: Path = Field(
        default=Path("progress.jsonl"),
        description="the JSONL file, appended to; relative to run_dir unless absolute; "
        "media values are files under <run_dir>/media/",
    )


class CsvOutput(_FileBacked):
    """One CSV row per dump; a key first seen later still gets a column (``csv``)."""

    type: Literal["csv"] = Field(
        default="csv", description="selects this output; its `exclude` name is `csv`"
    )
    path: Path = Field(
        default=Path("progress.csv"),
        description="the CSV file, appended to; relative to run_dir unless absolute; "
        "media values are files under <run_dir>/media/",
    )


# userinfo as SQLAlchemy and MLflow read it: the password runs to the next "@", so it
# may hold "/", "#" or "?" (a plain urlsplit would end it at the first of those).
_USERINFO = re.compile(r"^(?P<head>[A-Za-z][\w+.-]*://)(?P<user>[^:/@?#]*):(?P<password>[^@]*)@")
# ?password=..., &pwd=..., and the same percent-encoded inside another parameter
# (mssql's odbc_connect=...PWD%3D...%3B).
_SECRET_PARAMETER = re.compile(
    r"(?i)((?:password|passwd|pwd|token|secret|api_?key)(?:=|%3D))(.*?)(?=$|[&;#]|%26|%3B)"
)


def mask_uri(uri: str) -> str:
    """``uri`` with every password in it replaced by ``***``: the one of
    ``scheme://user:password@host`` and ``password=``/``pwd=``/``token=`` parameters."""
    masked = _USERINFO.sub(lambda match: f"{match['head']}{match['user']}:***@", uri, count=1)
    return _SECRET_PARAMETER.sub(lambda match: f"{match[1]}***", masked)


_MLFLOW_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


def _default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


class MlflowOutput(_Output):
    """One MLflow run per logger, logged in batches (exclude name ``mlflow``).

    ``tracking_uri`` defaults to ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``
    relative to the working directory (MLflow's own default). MLflow's old file store
    (``file:`` or a plain path) is refused unless ``allow_file_store`` is true; MLflow
    3.17+ refuses it too.
    """

    type: Literal["mlflow"] = Field(
        default="mlflow", description="selects this output; its `exclude` name is `mlflow`"
    )
    allow_file_store: bool = Field(  # before tracking_uri: its validator reads it
        default=False,
        description="accept MLflow's old file store (a `file:` URI or a plain path) as "
        "tracking_uri, which MLflow 3.17+ refuses; also sets $MLFLOW_ALLOW_FILE_STORE=true "
        "unless it is set",
    )
    tracking_uri: str = Field(
        default_factory=_default_tracking_uri,
        description="a sqlite, postgresql, mysql, mssql, http(s) or databricks URI; default: "
        "$MLFLOW_TRACKING_URI, else `sqlite:///mlflow.db` in the working directory; a "
        "password in it is masked as `***` wherever tracklog shows or stores the settings",
    )
    experiment: str | None = Field(
        default=None,
        min_length=1,
        max_length=500,
        description="the experiment's name, created if missing; default: MLflow's Default "
        "experiment; ignored, with a warning, when resuming run_id",
    )
    artifact_location: str | None = Field(
        default=None,
        description="where a new experiment keeps artifacts (default: the store's own; "
        "for a database store such as sqlite, ./mlruns of the working directory "
        "build_logger ran in, as MLflow's own client)",
    )
    run_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=250,
        description="default: <group>-<job> (or <group>) in a sweep, else a name MLflow "
        "makes up; with all_ranks, -rank<N> is appended; ignored, with a warning, when "
        "resuming run_id",
    )
    run_id: str | None = Field(
        default=None, pattern=r"^[0-9a-zA-Z_-]{1,64}$", description="resume this run"
    )
    tags: dict[str, str] = Field(
        default_factory=dict,
        description="tags of the run, also set on a resumed one; tracklog adds its own "
        "`tracklog.*` tags (version, settings; group, job and rank in a sweep), which win "
        "over these",
    )
    username: str | None = Field(
        default=None,
        description="basic-auth user name for a tracking server, or "
        "$MLFLOW_TRACKING_USERNAME; sent only to this output's server",
    )
    password: SecretStr | None = Field(
        default=None,
        description="basic-auth password (needs username), or $MLFLOW_TRACKING_PASSWORD; "
        "never shown",
    )
    artifact_upload_interval: float = Field(
        default=60.0,
        ge=0.0,
        le=24 * 3600,
        allow_inf_nan=False,
        description="seconds between uploads of train.log and text files",
    )
    request_timeout: float = Field(
        default=10.0,
        ge=1.0,
        le=3600,
        allow_inf_nan=False,
        description="seconds one MLflow request may take",
    )
    request_retries: int = Field(
        default=2, ge=0, le=10, description="retries of a failed MLflow request"
    )

    @field_serializer("tracking_uri")
    def _masked_uri(self, uri: str) -> str:
        return mask_uri(uri)

    def __repr_args__(self) -> Iterator[tuple[str | None, object]]:
        for name, value in super().__repr_args__():
            yield (
                name,
                mask_uri(value) if name == "tracking_uri" and isinstance(value, str) else value,
            )

    @field_validator("tracking_uri")
    @classmethod
    def _known_store(cls, uri: str, info: ValidationInfo) -> str:
        if uri == "databricks" or uri.startswith("databricks-uc"):  # MLflow's bare forms
            return uri
        scheme = uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in uri else ""
        if scheme in _MLFLOW_SCHEMES:
            return uri
        if scheme in ("file", "") or len(scheme) == 1:  # a path, or a Windows drive letter
            if info.data.get("allow_file_store"):
                return uri
            raise ValueError(
                f"{uri!r} is MLflow's old file store, which MLflow 3.17+ refuses; use "
                "sqlite:///mlflow.db, or set allow_file_store: true to use it anyway"
            )
        raise ValueError(
            f"unsupported tracking_uri scheme {scheme!r} in {uri!r}; expected one of "
            + ", ".join(_MLFLOW_SCHEMES)
        )

    @model_validator(mode="after")
    def _password_needs_username(self) -> MlflowOutput:
        if self.password is not None and self.username is None:
            raise ValueError("password is set but username is not")
        return self


class WandbOutput(_Output):
    """One W&B run per logger, offline by default (exclude name ``wandb``).

    Offline runs land in ``<dir>/wandb/offline-run-*`` (``dir`` defaults to the
    logger's ``run_dir``); ``wandb sync <that folder>`` uploads them later. ``api_key``
    (or ``$WANDB_API_KEY``) is only needed online.
    """

    type: Literal["wandb"] = Field(
        default="wandb", description="selects this output; its `exclude` name is `wandb`"
    )
    project: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="the W&B project; default: one W&B infers from the program, else uncategorized",
    )
    entity: str | None = Field(
        default=None,
        description="the W&B user or team that owns the run; default: your W&B default entity",
    )
    group: str | None = Field(
        default=None, description="groups runs in W&B; default: the logger's group"
    )
    tags: list[str] = Field(
        default_factory=list,
        description="tags of the run, 1 to 64 characters each; given for a resumed run, "
        "they replace its tags",
    )
    name: str | None = Field(
        default=None,
        description="the run's display name; default: <group>-<job> (or <group>) in a "
        "sweep, else a name W&B makes up; with all_ranks, -rank<N> is appended",
    )
    notes: str | None = Field(default=None, description="a longer description of the run")
    id: str | None = Field(
        default=None,
        pattern=r"^[^/\\#?%:]{1,64}$",
        description="the run's id, unique in its project; set it to resume that run (see "
        "resume); default: a new random id",
    )
    resume: Literal["allow", "must", "never", "auto"] | None = Field(
        default=None,
        description="for a run with this id: allow resumes it if it exists, else creates "
        "it; must resumes it or fails; never fails if it exists; auto resumes the run that "
        "crashed last on this machine; default: a new run",
    )
    mode: Literal["online", "offline", "disabled"] = Field(
        default="offline",
        description="offline: written to disk only, for `wandb sync` later; online: "
        "uploaded as it goes (needs a login or api_key); disabled: W&B writes nothing",
    )
    dir: Path | None = Field(
        default=None,
        description="the run goes to <dir>/wandb/; relative to run_dir unless absolute; "
        "default: the logger's run_dir",
    )
    api_key: SecretStr | None = Field(
        default=None,
        description="needed only online; default: $WANDB_API_KEY, else the key `wandb login` "
        "saved; never shown",
    )
    config: dict[str, Any] = Field(default_factory=dict, description="extra run config")
    finish_timeout: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="seconds close() waits for W&B to finish the run",
    )

    @field_validator("config")
    @classmethod
    def _json_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        _check_json_data(config, "config", ())
        return config

    @field_validator("tags")
    @classmethod
    def _short_tags(cls, tags: list[str]) -> list[str]:
        for tag in tags:
            if not 1 <= len(tag) <= 64:
                raise ValueError(f"W&B tags must be 1 to 64 characters long: {tag!r}")
        return tags


class TensorboardOutput(_FileBacked):
    """TensorBoard event files in the folder ``path`` (exclude name ``tensorboard``).

    ``tensorboard --logdir <run_dir>/tensorboard`` shows them; needs the optional extra
    ``pip install 'tracklog[tensorboard]'``.
    """

    type: Literal["tensorboard"] = Field(
        default="tensorboard",
        description="selects this output; its `exclude` name is `tensorboard`",
    )
    path: Path = Field(
        default=Path("tensorboard"),
        description="the event files' folder, relative to run_dir unless absolute; each "
        "logger adds an event file of its own",
    )

    @field_validator("path")
    @classmethod
    def _not_empty(cls, value: Path) -> Path:  # a folder, not a file: its own message
        _no_nul(value)
        if str(value) in ("", "."):
            raise ValueError("path must name a folder (default: tensorboard)")
        return value


OutputSettings = Annotated[
    ConsoleOutput
    | FileOutput
    | JsonlOutput
    | CsvOutput
    | TensorboardOutput
    | MlflowOutput
    | WandbOutput,
    Field(discriminator="type"),
]


def _check_json_data(value: object, where: str, inside: tuple[int, ...]) -> None:
    """Raise naming ``where`` unless ``value`` is JSON data (what W&B's config holds)."""
    if value is None or isinstance(value, str | bool | int | float):
        return
    if id(value) in inside:
        raise ValueError(f"{where} contains itself")
    within = (*inside, id(value))
    if isinstance(value, Mapping):
        for key, item in cast("Mapping[object, object]", value).items():
            if not isinstance(key, str):
                raise ValueError(f"{where} has a key of type {type(key).__name__}: {key!r}")
            _check_json_data(item, f"{where}[{key!r}]", within)
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(cast("list[object] | tuple[object, ...]", value)):
            _check_json_data(item, f"{where}[{index}]", within)
        return
    raise ValueError(
        f"{where} is {type(value).__module__}.{type(value).__qualname__}, which is not JSON "
        "data: use str, int, float, bool, None, lists and dicts with str keys (or str(value))"
    )


def _default_outputs() -> list[OutputSettings]:
    return [ConsoleOutput(), FileOutput(), JsonlOutput(), CsvOutput()]


class DeliverySettings(BaseModel):
    """How rows reach the outputs that run in the delivery process (MLflow, W&B, TensorBoard).

    ``dump()`` appends the row to an on-disk queue (SQLite) under ``spool_dir`` and
    returns; a separate delivery process drains it to each backend, retries a backend
    that is down, and outlives a trainer that dies (see docs/delivery.md).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    close_timeout: float = Field(
        default=30.0,
        ge=0,
        allow_inf_nan=False,
        le=24 * 3600,
        description="seconds close(), atexit and SIGTERM wait for the backends; the delivery "
        "process then finishes the rest on its own, within `deadline`",
    )
    deadline: float = Field(
        default=600.0,
        ge=0,
        allow_inf_nan=False,
        le=7 * 24 * 3600,
        description="seconds the delivery process keeps retrying a backend that is down after "
        "the trainer ended; what is left then stays in the queue for `tracklog replay`",
    )
    spool_dir: Path | None = Field(
        default=None,
        description="where the delivery queue lives, relative to run_dir unless absolute; "
        "default: run_dir/spool, or node-local disk ($SLURM_TMPDIR, $TMPDIR) when run_dir "
        "is on a network filesystem (NFS, Lustre, ...), where SQLite's WAL mode is unsafe",
    )
    fsync: bool = Field(
        default=False,
        description="fsync every dump's queue entry, so rows also survive a power loss or "
        "kernel crash (costs a disk flush per dump); by default a row survives the "
        "training process being killed by any signal",
    )
    retry_initial: float = Field(
        default=0.5,
        gt=0,
        le=60,
        allow_inf_nan=False,
        description="first wait, in seconds, after a failed delivery",
    )
    retry_max: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="longest wait between delivery attempts",
    )
    handle_sigterm: bool = Field(
        default=True,
        description="on SIGTERM (SLURM preemption), flush and close every logger, then "
        "exit with status 143; only installed if SIGTERM still has its default handler",
    )
    linger: float = Field(
        default=0.0,
        ge=0,
        allow_inf_nan=False,
        le=10,
        description="seconds the delivery process waits after a dump for more rows before it "
        "delivers to MLflow/W&B/TensorBoard, so a backend gets one request per batch of "
        "dumps; flush() and close() do not wait; 0 (default) delivers at once",
    )

    @model_validator(mode="after")
    def _retry_order(self) -> DeliverySettings:
        if self.retry_max < self.retry_initial:
            raise ValueError("retry_max must not be smaller than retry_initial")
        return self


class LoggerSettings(BaseSettings):
    """Everything :func:`tracklog.build_logger` needs; validated before anything is created."""

    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        env_prefix="TRACKLOG_",
        hide_input_in_errors=True,  # no secret of an output in an error's text
    )

    run_dir: Path = Field(
        default=Path("runs/default"),
        description="file outputs go here; a run_dir that holds an earlier run is never "
        "appended to unless `resume` says so: this run then goes to <run_dir>_2 (_3, ...)",
    )
    resume: Literal["never", "auto", "must"] = Field(
        default="never",
        description="continue the run that run_dir holds (after preemption: the same MLflow "
        "run, W&B run and TensorBoard folder, JSONL/CSV appended): auto continues it if there "
        "is one and starts one otherwise, must refuses to start a new one, never (default) "
        "always starts a new run (see docs/resume.md)",
    )
    level: Level = Field(
        default="info",
        description="debug(), info(), warn() and error() lines below this level are dropped; "
        "disabled also drops every dump",
    )
    outputs: list[OutputSettings] = Field(
        default_factory=_default_outputs,
        description="where each dump goes, one entry per output, chosen by its type; at most "
        "one console, and no two outputs may write the same file or folder",
    )
    strict: bool = Field(
        default=False,
        description="raise when an output fails (for tests and debugging); by default a "
        "failing output is reported and the others keep logging",
    )
    max_media_bytes: int = Field(
        default=2**30,
        ge=1,
        description="the largest video or image record() accepts, in bytes of its frames or "
        "pixels (a larger one is refused at record(), naming its key): encoding it would "
        "need several times that much memory",
    )
    on_bad_value: Literal["raise", "report"] = Field(
        default="raise",
        description="what record() does with a key or value it cannot log: raise "
        "TypeError/ValueError naming the key, or report it (once per key, on the tracklog "
        "logger) and skip it, so a mistake in a rarely run callback does not end a long run",
    )
    delivery: DeliverySettings = Field(
        default_factory=DeliverySettings,
        description="how the background outputs (TensorBoard, MLflow, W&B) get their rows: "
        "queue, spool, retries, closing (see docs/delivery.md)",
    )
    group: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="the sweep this run belongs to: MLflow tag tracklog.group and run name "
        "<group>-<job>, W&B group (see docs/deployment.md)",
    )
    job: int | None = Field(
        default=None,
        ge=0,
        description="this run's number in its sweep; default: Hydra's job.num in a "
        "multirun, else $SLURM_ARRAY_TASK_ID",
    )
    summaries: dict[str, SummaryKind | list[SummaryKind]] = Field(
        default_factory=dict,
        description="per key, what the run's summary keeps of its values: min, max, mean, "
        "first, last, or best:max/best:min (the best value and its step); W&B's runs "
        "table gets them through define_metric, MLflow as <key>/<kind> metrics at close, "
        "the console as a closing table (see docs/summaries.md)",
    )
    system_metrics: float | None = Field(
        default=15.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="seconds between samples of CPU, memory, the trainer's RSS, disk and "
        "network, taken by the delivery process: system/... metrics for MLflow (its System "
        "metrics tab) and TensorBoard, and <run_dir>/system.jsonl beside a JSONL output; "
        "W&B samples the trainer itself at the same interval; null: off",
    )
    all_ranks: bool = Field(
        default=False,
        description="in a process group (torch.distributed, $RANK), every rank logs to a "
        "run of its own under <run_dir>/rank<N>; by default only rank 0 writes",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_variables(cls, data: object) -> object:
        # pydantic-settings ignores TRACKLOG_* variables that match no field; a typo such
        # as TRACKLOG_LEVL=debug must be an error like an unknown field in a file.
        known = {f"TRACKLOG_{name}".upper() for name in cls.model_fields}
        unknown = sorted(
            name
            for name in os.environ
            if name.upper().startswith("TRACKLOG_") and name.upper() not in known
        )
        if unknown:
            raise ValueError(
                f"unknown environment variable(s) {', '.join(unknown)}; tracklog reads "
                + ", ".join(sorted(known))
            )
        return data

    @model_validator(mode="after")
    def _summaries_are_sound(self) -> LoggerSettings:
        for key, kinds in self.summaries.items():
            where = f"summaries.{key}"
            if not key or key.isspace() or key.startswith("_"):
                raise ValueError(f"{where}: not a key tracklog logs (empty, or starts with '_')")
            listed = [kinds] if isinstance(kinds, str) else kinds
            if not listed:
                raise ValueError(f"{where}: name at least one summary")
            if len(set(listed)) != len(listed):
                raise ValueError(f"{where}: a summary is named twice in {listed}")
            if sum(kind.startswith("best:") for kind in listed) > 1:
                raise ValueError(f"{where}: best:max and best:min contradict each other")
        return self

    @model_validator(mode="after")
    def _one_writer_per_file(self) -> LoggerSettings:
        seen: dict[Path, int | str] = {}
        if self.system_metrics is not None and any(o.type == "jsonl" for o in self.outputs):
            seen[self._same_file_key(Path("system.jsonl"))] = "system_metrics"
        consoles = 0
        for index, output in enumerate(self.outputs):
            if isinstance(output, ConsoleOutput):
                consoles += 1
                if consoles > 1:
                    raise ValueError(f"outputs.{index}: only one console output is allowed")
                continue
            if not isinstance(output, _FileBacked):
                continue
            target = self._same_file_key(output.path)
            if target in seen:
                writer = seen[target]
                by = f"outputs.{writer}" if isinstance(writer, int) else writer
                raise ValueError(f"outputs.{index}.path: {output.path} is already written by {by}")
            seen[target] = index
        return self

    @model_validator(mode="after")
    def _files_not_in_tracklogs_folders(self) -> LoggerSettings:
        folders: dict[Path, str] = {
            self._same_file_key(Path("media")): "media/, where media files go",
            self._same_file_key(Path("wandb")): "wandb/, where W&B writes its runs",
        }
        if self.delivery.spool_dir is None:
            folders[self._same_file_key(Path("spool"))] = "spool/, where the delivery queue is"
        for index, output in enumerate(self.outputs):
            if isinstance(output, WandbOutput) and output.dir is not None:
                where = self._same_file_key(output.dir / "wandb")
                folders[where] = f"the W&B folder of outputs.{index}"
        for index, output in enumerate(self.outputs):
            if not isinstance(output, _FileBacked) or isinstance(output, TensorboardOutput):
                continue
            target = self._same_file_key(output.path)
            for folder, what in folders.items():
                if target == folder or target.is_relative_to(folder):
                    raise ValueError(
                        f"outputs.{index}.{output.type}.path: {output.path} is inside {what}; "
                        "choose another path"
                    )
        return self

    def resolve(self, path: Path) -> Path:
        """An output's file: ``path`` itself when absolute, else relative to ``run_dir``."""
        return path if path.is_absolute() else self.run_dir / path

    def _same_file_key(self, path: Path) -> Path:
        # abspath normalises "sub/../x" and a relative run_dir against an absolute path
        # without touching the disk (validation creates and reads nothing).
        return Path(os.path.abspath(self.resolve(path)))

    @property
    def level_number(self) -> int:
        """The level as SB3's integer (``DEBUG=10`` … ``DISABLED=50``)."""
        return LEVELS[self.level]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment wins over files and code: a job script or a SLURM array
        # redirects a run without editing the settings file it shares with others.
        return (env_settings, init_settings)


def _read_file(path: Path) -> object:
    suffix = path.suffix.lower()
    # Checked before reading, so a wrong file (a .png, a directory) gets this message.
    if suffix not in (".yaml", ".yml", ".toml", ".json"):
        raise ValueError(
            f"{path}: unsupported settings file type {suffix!r}; use .yaml, .yml, .toml or .json"
        )
    text = path.read_text(encoding="utf-8")
    try:
        if suffix in (".yaml", ".yml"):
            return yaml.load(text, Loader=_UniqueKeyLoader) or {}  # a SafeLoader: data only
        if suffix == ".toml":
            return tomllib.loads(text)  # TOML itself refuses a key given twice
        return json.loads(text, object_pairs_hook=_unique_json_keys)
    except _DuplicateKeyError as error:
        raise ValueError(f"{path}, {error}; the last one would win silently") from None


class _DuplicateKeyError(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that gives a key twice (PyYAML's own
    keeps the last one without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[object, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue  # "<<" merges may be given again and overridden: YAML allows it
            key: object = self.construct_object(key_node)  # pyright: ignore[reportUnknownMemberType]  # types-PyYAML leaves its `deep` parameter untyped
            line = key_node.start_mark.line + 1
            if key in first:
                raise _DuplicateKeyError(
                    f"line {line}: duplicate key {key!r} (first given on line {first[key]})"
                )
            first[key] = line
        return super().construct_mapping(node, deep=deep)


def _unique_json_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise _DuplicateKeyError(f"duplicate key {key!r}")
        found[key] = value
    return found


def _is_omegaconf(source: object) -> bool:
    return any(cls.__module__.partition(".")[0] == "omegaconf" for cls in type(source).__mro__)


def _from_omegaconf(config: object) -> Mapping[str, object]:
    """A Hydra/OmegaConf ``DictConfig`` as plain dicts, every interpolation resolved."""
    # Only reached with an object whose class comes from omegaconf, so omegaconf is
    # already imported: tracklog itself never depends on Hydra or OmegaConf.
    from omegaconf import OmegaConf

    # throw_on_missing: a "???" left unset raises omegaconf's MissingMandatoryValue
    # naming its key, instead of reaching pydantic as the string "???" (a valid path).
    data: object = OmegaConf.to_container(config, resolve=True, throw_on_missing=True)
    if not isinstance(data, Mapping):
        raise TypeError(f"settings must be a mapping (a DictConfig), not {type(config).__name__}")
    mapping = cast("Mapping[object, object]", data)
    return {str(key): value for key, value in mapping.items()}


def load_settings(
    source: LoggerSettings | Mapping[str, object] | str | os.PathLike[str],
) -> LoggerSettings:
    """Validate ``source`` into :class:`LoggerSettings` without touching the disk beyond reading it.

    ``source`` is a ready model, a mapping (for example parsed YAML, or an OmegaConf
    ``DictConfig`` such as Hydra's ``cfg.logging``, resolved with
    ``OmegaConf.to_container(resolve=True)``), or a path to a
    ``.yaml``/``.yml``/``.toml``/``.json`` file. Errors are pydantic's own, naming the
    field path; an interpolation that does not resolve, or a ``???`` left unset, raises
    OmegaConf's own error naming its key.
    """
    if isinstance(source, LoggerSettings):
        return source
    if _is_omegaconf(source):
        source = _from_omegaconf(source)
    if isinstance(source, str | os.PathLike):
        data = _read_file(Path(source))
        if not isinstance(data, Mapping):
            raise TypeError(f"{os.fspath(source)}: settings must be a mapping at the top level")
        source = cast("Mapping[str, object]", data)  # keys made str below
    # User input: the annotation is not enforced at runtime.
    if not isinstance(source, Mapping):  # pyright: ignore[reportUnnecessaryIsInstance]
        raise TypeError(
            "settings must be a LoggerSettings, a mapping or a path to a settings file, "
            f"not {type(source).__name__}"
        )
    fields: dict[str, Any] = {str(key): value for key, value in source.items()}
    return LoggerSettings(**fields)
