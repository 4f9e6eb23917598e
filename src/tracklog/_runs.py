"""Which run a logger writes: a new one, a new version of its run_dir, or the one it resumes.

A logger that writes anything keeps its run's identity in ``<run_dir>/tracklog.json``:
a run id, and per remote output what its registry entry chose once (MLflow's
``run_key`` tag, W&B's run id). ``resume: auto``/``must`` reads it back, so a restarted
process continues the same MLflow run, W&B run and TensorBoard folder and appends to
JSONL/CSV. Without ``resume``, a run_dir that holds an earlier run is never appended
to: the new run goes to ``<run_dir>_2`` (``_3``, …), SB3's ``PPO_<N>`` habit. The file
is claimed with ``link()``, which fails if the name exists, so two processes starting
at once never take the same version. It is data only (JSON), opened without following
symlinks.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import secrets
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

from tracklog._codec import open_nofollow
from tracklog._registry import backend
from tracklog.settings import LoggerSettings, OutputSettings, TensorboardOutput

__all__ = ["RUN_FILE", "Claim", "claim", "claiming", "read_run", "unclaim"]

RUN_FILE: Final = "tracklog.json"
_FORMAT: Final = 1


@dataclass(frozen=True, slots=True)
class Claim:
    """The run a logger writes."""

    #: The settings, with run_dir (and output paths inside it) moved to a new version.
    settings: LoggerSettings
    #: The run's id (32 hex digits), the same in every process that continues it.
    run: str
    #: Per remote output (``<index>-<type>``), what its registry entry chose once.
    identities: dict[str, dict[str, str]]
    resumed: bool
    #: What build_logger says about it on the console ('' when nothing happened).
    note: str
    #: The run_dir whose run file this claim created (None: it continues a run).
    created: Path | None = None


@contextlib.contextmanager
def claiming(settings: LoggerSettings) -> Generator[None]:
    """Lock run_dir (``flock`` on the folder itself) while a logger decides its run and
    takes its queue's lock: two processes starting at once on one run_dir then see each
    other (the second is refused, or takes the next version), never both the same run."""
    run_dir = settings.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run_dir: {run_dir} exists and is not a folder")
    if settings.resume == "must" and not (run_dir / RUN_FILE).exists():
        raise _nothing_to_resume(run_dir)  # before anything is created
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def claim(settings: LoggerSettings, remote: list[tuple[int, OutputSettings]]) -> Claim:
    """Decide and record which run ``settings`` write (creating its run_dir); call it
    inside :func:`claiming`.

    Raises ValueError (naming the setting) for ``resume: must`` without a run, an
    unreadable run file, or an output file outside run_dir that holds an earlier run.
    """
    base = settings.run_dir
    names = _stable_names(remote)
    fresh = {names[i]: backend(o).identity(o) for i, o in remote}
    if settings.resume != "never" or _names_its_run(remote):
        earlier = read_run(base)
        if earlier is not None:
            return _resume(settings, earlier, fresh, names)
        if settings.resume == "must":
            raise _nothing_to_resume(base)
    run_id = secrets.token_hex(16)
    record: dict[str, Any] = {
        "format": _FORMAT,
        "run": run_id,
        "created": _now(),
        "resumed": [],
        "outputs": fresh,
    }
    if _holds_run(settings, base):
        _refuse_written_outside(settings)  # before any version is claimed
    run_dir, n = base, 1
    while not _claim_new(settings, run_dir, record):
        n += 1
        absolute = Path(os.path.abspath(base))  # "." has no name to number
        run_dir = absolute.with_name(f"{absolute.name}_{n}")
    note = ""
    if run_dir != base:
        continue_it = " (resume: auto continues that one)" if settings.resume == "never" else ""
        note = f"tracklog: {base} holds an earlier run; this run writes to {run_dir}{continue_it}"
        settings = _moved(settings, run_dir)
    identities = {_consumer(i, o): fresh[names[i]] for i, o in remote}
    return Claim(settings, run_id, identities, resumed=False, note=note, created=run_dir)


def _names_its_run(remote: list[tuple[int, OutputSettings]]) -> bool:
    """Whether an output continues a run it names itself (MLflow ``run_id``, W&B
    ``id``): its run_dir is then continued too, as with ``resume: auto``."""
    for _, output in remote:
        resumed = backend(output).resumed
        if resumed is not None and resumed(output) is not None:
            return True
    return False


def _nothing_to_resume(run_dir: Path) -> ValueError:
    return ValueError(
        f"resume: must, but run_dir {run_dir} holds no tracklog run (no {RUN_FILE}); "
        "use resume: auto to start one there"
    )


def unclaim(claimed: Claim) -> None:
    """Take back the run file of a run that never started (build_logger failed)."""
    if claimed.created is not None:
        with contextlib.suppress(OSError):
            (claimed.created / RUN_FILE).unlink()


def _stable_names(remote: list[tuple[int, OutputSettings]]) -> dict[int, str]:
    """Per output index, its name in the run file: its type, numbered among the outputs
    of that type (``mlflow``, ``mlflow-2``), so adding or moving another output does
    not change which run it continues."""
    seen: dict[str, int] = {}
    names: dict[int, str] = {}
    for index, output in remote:
        seen[output.type] = seen.get(output.type, 0) + 1
        count = seen[output.type]
        names[index] = output.type if count == 1 else f"{output.type}-{count}"
    return names


def read_run(run_dir: Path) -> dict[str, Any] | None:
    """The run file of ``run_dir``, or None if it has none; ValueError if it is not one."""
    path = run_dir / RUN_FILE
    try:
        fd = open_nofollow(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as error:  # a symlink (ELOOP), a folder, no permission
        raise ValueError(f"{path}: cannot read the run file ({error.strerror})") from None
    with os.fdopen(fd, "rb") as file:
        data = file.read(1 << 20)
    try:
        loaded: object = json.loads(data)
    except ValueError:
        loaded = None
    if not _valid(loaded):
        raise ValueError(
            f"{path} is not a tracklog run file; move it away or choose another run_dir"
        )
    return cast("dict[str, Any]", loaded)


def _valid(loaded: object) -> bool:
    if not isinstance(loaded, dict):
        return False
    record = cast("dict[str, object]", loaded)
    outputs = record.get("outputs")
    if record.get("format") != _FORMAT or not isinstance(record.get("run"), str):
        return False
    if not isinstance(outputs, dict):
        return False
    for identity in cast("dict[object, object]", outputs).values():
        if not isinstance(identity, dict):
            return False
        pairs = cast("dict[object, object]", identity).items()
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in pairs):
            return False
    return isinstance(record.get("resumed", []), list)


def _resume(
    settings: LoggerSettings,
    record: dict[str, Any],
    fresh: dict[str, dict[str, str]],
    names: dict[int, str],
) -> Claim:
    run_dir = settings.run_dir
    kept: dict[str, dict[str, str]] = record["outputs"]
    # What the earlier process chose wins; what it did not record yet (a setting a later
    # tracklog keeps there, such as MLflow's artifact_root) comes from this one.
    chosen = {name: {**made, **kept.get(name, {})} for name, made in fresh.items()}
    record = {
        **record,
        "outputs": {**kept, **chosen},
        "resumed": [*record.get("resumed", []), _now()][-100:],  # the latest 100
    }
    _write(run_dir, record, exclusive=False)
    added = sorted(set(fresh) - set(kept))
    extra = f"; new outputs start new runs: {', '.join(added)}" if added else ""
    note = f"tracklog: resuming run {record['run']} in {run_dir}{extra}"
    identities = {_consumer(i, o): chosen[names[i]] for i, o in _indexed(settings, names)}
    return Claim(settings, str(record["run"]), identities, resumed=True, note=note)


def _indexed(settings: LoggerSettings, names: dict[int, str]) -> list[tuple[int, OutputSettings]]:
    return [(index, settings.outputs[index]) for index in names]


def _file_outputs(settings: LoggerSettings) -> list[tuple[int, OutputSettings, Path]]:
    """Every output that writes files, with its file or folder (absolute or not)."""
    found: list[tuple[int, OutputSettings, Path]] = []
    for index, output in enumerate(settings.outputs):
        path = getattr(output, "path", None)
        if backend(output).files and isinstance(path, Path):
            found.append((index, output, settings.resolve(path)))
    return found


def _inside(path: Path, folder: Path | str) -> bool:
    return Path(os.path.abspath(path)).is_relative_to(os.path.abspath(folder))


def _holds_run(settings: LoggerSettings, run_dir: Path) -> bool:
    """Whether ``run_dir`` (``settings.run_dir`` or a version of it) holds a run: a run
    file, or files that these outputs wrote before."""
    is_version = run_dir != settings.run_dir
    if is_version and (run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir())):
        return True  # a version is never a link (or a file): the next number, then
    if (run_dir / RUN_FILE).exists() or (run_dir / RUN_FILE).is_symlink():
        return True
    base = settings.run_dir
    for _, output, path in _file_outputs(settings):
        if _inside(path, base):
            relative = os.path.relpath(os.path.abspath(path), os.path.abspath(base))
            if _written(output, run_dir / relative):
                return True
    return False


def _refuse_written_outside(settings: LoggerSettings) -> None:
    """Refuse output files outside run_dir that an earlier run wrote: a new version of
    run_dir cannot keep the two runs apart there."""
    for index, output, path in _file_outputs(settings):
        if not _inside(path, settings.run_dir) and _written(output, path):
            raise ValueError(
                f"outputs.{index}.{output.type}.path: {path} holds an earlier run; "
                "choose another path, or set resume: auto to continue that run"
            )


def _moved(settings: LoggerSettings, run_dir: Path) -> LoggerSettings:
    """``settings`` writing to ``run_dir``: absolute output paths inside the old run_dir
    (configure() gives TensorBoard the folder itself) move with it."""
    base = os.path.abspath(settings.run_dir)
    outputs: list[OutputSettings] = []
    for output in settings.outputs:
        path = getattr(output, "path", None)
        inside = isinstance(path, Path) and path.is_absolute() and _inside(path, base)
        if backend(output).files and inside:
            moved = Path(os.path.abspath(run_dir)) / os.path.relpath(str(path), base)
            output = output.model_copy(update={"path": moved})
        outputs.append(output)
    return settings.model_copy(update={"run_dir": run_dir, "outputs": outputs})


def _written(output: OutputSettings, path: Path) -> bool:
    try:
        if isinstance(output, TensorboardOutput):  # its folder may be run_dir itself
            return path.is_dir() and any(path.glob("events.out.tfevents.*"))
        return path.stat().st_size > 0
    except OSError:
        return False


def _claim_new(settings: LoggerSettings, run_dir: Path, record: dict[str, Any]) -> bool:
    """Take ``run_dir`` for a new run: False if it holds one (or someone took it first)."""
    if _holds_run(settings, run_dir):
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    return _write(run_dir, record, exclusive=True)


def _write(run_dir: Path, record: dict[str, Any], *, exclusive: bool) -> bool:
    """Write the run file whole (a temporary file renamed or linked into place);
    ``exclusive``: False, writing nothing, if it exists already."""
    temporary = run_dir / f".{RUN_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = open_nofollow(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump(record, file, indent=2)
            file.write("\n")
        if not exclusive:
            os.replace(temporary, run_dir / RUN_FILE)
            return True
        try:
            os.link(temporary, run_dir / RUN_FILE)
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: an exclusive create instead
            try:
                fd = open_nofollow(run_dir / RUN_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as file:
                file.write(temporary.read_bytes())
        return True
    finally:
        if temporary.exists():
            temporary.unlink()


def _consumer(index: int, output: OutputSettings) -> str:
    return f"{index}-{output.type}"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
