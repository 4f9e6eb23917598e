"""The ``tracklog`` command (also ``python -m tracklog``).

Commands (``tracklog COMMAND --help`` describes each):

- ``validate FILE``: print the resolved settings, secrets masked, or every error with
  its field path.
- ``schema``: the JSON Schema of the settings, for editor completion.
- ``demo``: PPO learns CartPole with every output on (what ``make demo`` runs).
- ``plot RUN_DIR --key K``: learning curves from a run's JSONL or CSV file, as a PNG.
- ``replay SPOOL``: deliver what a logger left in its spool.

Exit codes:

- 0: success.
- 1: the command ran and failed: invalid settings or a settings file that cannot be
  read or parsed (``validate``, ``demo``); a run without a progress file, or a key it
  does not hold (``plot``); a file that cannot be written (``schema``, ``plot``); a
  read-back check of the demo failed; records remain in a spool (``replay``).
- 2: bad usage: an unknown command or option, a missing or malformed argument.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import sqlite3
import sys
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from pydantic import ValidationError

    from tracklog.readers import LoggedRow
    from tracklog.settings import LoggerSettings

    # argparse's public add_subparsers() returns this class, which has no public name.
    _Commands: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]  # pyright: ignore[reportPrivateUsage]

__all__ = ["format_validation_error", "main", "settings_schema"]

# Errors whose input is a number or one of a fixed set of words, never a secret: for
# these the message is clearer with the value that was given. Every other input (an
# unknown field's value, a wrong type for a password) is left out of the output.
_SHOWN_INPUTS = frozenset(
    ("literal_error", "greater_than", "greater_than_equal", "less_than", "less_than_equal")
)


def _error(command: str, message: str) -> None:
    print(f"tracklog {command}: {message}", file=sys.stderr)


# validate -----------------------------------------------------------------------------


def format_validation_error(error: ValidationError) -> list[str]:
    """One line per error: ``field.path: pydantic's message``, without the input value.

    Input values are left out (except a number or word that failed a range or choice
    check) because the value of a misspelt field may be a password.
    """
    lines: list[str] = []
    for detail in error.errors(include_url=False):
        path = ".".join(str(part) for part in detail["loc"])
        message = detail["msg"]
        given = detail.get("input")
        if detail["type"] in _SHOWN_INPUTS and isinstance(given, int | float | str):
            message += f" (got {given!r})"
        lines.append(f"{path}: {message}" if path else message)
    return lines


def _yaml_problem(error: Exception) -> str:
    """A YAML syntax error by line and column, without the quoted text (it may hold a secret)."""
    import yaml

    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        problem = "; ".join(part for part in (error.context, error.problem) if part)
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return str(error).splitlines()[0]


def _load(path: Path, command: str) -> LoggerSettings | None:
    """The validated settings in ``path``, or None after explaining on stderr why not."""
    import yaml
    from pydantic import ValidationError

    from tracklog.settings import load_settings

    try:
        return load_settings(path)
    except ValidationError as error:
        lines = format_validation_error(error)
        _error(command, f"{path}: {len(lines)} error{'s' if len(lines) > 1 else ''}")
        for line in lines:
            print(f"  {line}", file=sys.stderr)
    except OSError as error:
        _error(command, f"cannot read {path}: {error.strerror or error}")
    except yaml.YAMLError as error:
        _error(command, f"{path}: invalid YAML: {_yaml_problem(error)}")
    except tomllib.TOMLDecodeError as error:
        _error(command, f"{path}: invalid TOML: {error}")
    except json.JSONDecodeError as error:
        _error(command, f"{path}: invalid JSON: {error}")
    except UnicodeDecodeError as error:
        _error(command, f"{path}: not UTF-8 text ({error.reason} at byte {error.start})")
    except (TypeError, ValueError) as error:  # a file type we do not read; not a mapping
        _error(command, str(error))
    return None


def _overriding_variables() -> list[str]:
    from tracklog.settings import LoggerSettings

    known = {f"TRACKLOG_{name}".upper() for name in LoggerSettings.model_fields}
    return sorted(name for name in os.environ if name.upper() in known)


def _validate(arguments: argparse.Namespace) -> int:
    import yaml

    settings = _load(Path(arguments.file), "validate")
    if settings is None:
        return 1
    from tracklog._registry import require

    missing: list[str] = []
    for index, output in enumerate(settings.outputs):
        try:
            require(output)
        except ImportError as error:
            missing.append(f"outputs.{index}: {error}")
    if missing:
        print(f"{arguments.file}: not usable here:", *missing, sep="\n  ", file=sys.stderr)
        return 1
    # mode="json" masks every SecretStr as "**********" and a tracking_uri's password.
    document = settings.model_dump(mode="json")
    if arguments.json:
        print(json.dumps(document, indent=2))
    else:
        # types-PyYAML types width with _typeshed.FloatInt, which pyright's typeshed lacks.
        print(yaml.safe_dump(document, sort_keys=False), end="")  # pyright: ignore[reportUnknownMemberType]
    overrides = _overriding_variables()
    note = f"; {', '.join(overrides)} from the environment applied" if overrides else ""
    print(f"{arguments.file}: valid{note}", file=sys.stderr)
    return 0


# schema -------------------------------------------------------------------------------


def settings_schema() -> dict[str, object]:
    """The JSON Schema of :class:`~tracklog.settings.LoggerSettings`, as pydantic makes it.

    It is valid, with the same meaning, as draft 7 and as draft 2020-12, and names no
    ``$schema`` dialect: the YAML language server implements draft 7 and warns about a
    schema that declares 2020-12.
    """
    from tracklog.settings import LoggerSettings

    return LoggerSettings.model_json_schema()


def _schema(arguments: argparse.Namespace) -> int:
    text = json.dumps(settings_schema(), indent=2) + "\n"
    if arguments.output is None:
        print(text, end="")
        return 0
    try:
        Path(arguments.output).write_text(text, encoding="utf-8")
    except OSError as error:
        _error("schema", f"cannot write {arguments.output}: {error.strerror or error}")
        return 1
    print(f"wrote {arguments.output}", file=sys.stderr)
    return 0


# demo ---------------------------------------------------------------------------------

_DEMO_EXTRA = "the demo needs the demo extra: pip install 'tracklog[demo]'"


def _demo(arguments: argparse.Namespace) -> int:
    try:
        from tracklog import _demo
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] != "gymnasium":
            raise
        _error("demo", f"{_DEMO_EXTRA} (gymnasium is missing)")
        return 1
    missing = _demo.missing_dependency()
    if missing is not None:
        _error("demo", f"{_DEMO_EXTRA} ({missing} is missing)")
        return 1
    settings = None
    if arguments.settings is not None:
        settings = _load(Path(arguments.settings), "demo")
        if settings is None:
            return 1
    return _demo.run_demo(
        settings, steps=arguments.steps, video_every=arguments.video_every, seed=arguments.seed
    )


# plot ---------------------------------------------------------------------------------

_PROGRESS_FILES = ("progress.jsonl", "progress.csv")


class _PlotError(Exception):
    """Why a plot cannot be drawn; the message names the file or key."""


@dataclass(frozen=True)
class _Series:
    key: str
    x: list[float]
    y: list[float]

    @property
    def starts(self) -> list[int]:
        """Where each line starts: at 0, and wherever x goes back (a second run written
        into the same file, its steps starting again), which is never joined to the
        line before it."""
        return [0] + [i for i in range(1, len(self.x)) if self.x[i] < self.x[i - 1]]

    def lines(self) -> list[tuple[list[float], list[float]]]:
        bounds = [*self.starts, len(self.x)]
        return [(self.x[a:b], self.y[a:b]) for a, b in itertools.pairwise(bounds)]


def _read_progress(target: Path) -> tuple[Path, list[LoggedRow]]:
    """The rows of ``target``: a progress file, or a run directory holding one."""
    from tracklog.readers import read_csv, read_jsonl

    if target.is_dir():
        found = [target / name for name in _PROGRESS_FILES if (target / name).is_file()]
        if not found:
            raise _PlotError(
                f"{target} holds neither {' nor '.join(_PROGRESS_FILES)} "
                "(the jsonl and csv outputs write them)"
            )
        target = found[0]
    elif not target.exists():
        raise _PlotError(f"{target} does not exist")
    read: Callable[[Path], list[LoggedRow]] = (
        read_csv if target.suffix.lower() == ".csv" else read_jsonl
    )
    try:
        rows = read(target)
    except (OSError, ValueError) as error:  # ValueError: also JSON and UTF-8 errors
        raise _PlotError(f"cannot read {target}: {error}") from error
    if not rows:
        raise _PlotError(f"{target} has no rows yet")
    return target, rows


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _missing(keys: list[str], known: list[str]) -> str:
    """``'a' (did you mean 'ab'?), 'c'``: each missing key with its nearest known one."""
    import difflib

    named: list[str] = []
    for key in keys:
        near = difflib.get_close_matches(key, known, n=1)
        named.append(f"{key!r} (did you mean {near[0]!r}?)" if near else repr(key))
    return ", ".join(named)


def _x_of(rows: list[LoggedRow], x: str) -> list[float | None]:
    if x == "_step":
        return [float(row.step) for row in rows]
    if x == "_timestamp":  # seconds since the first dump
        return [row.timestamp - rows[0].timestamp for row in rows]
    return [_number(row.values.get(x)) for row in rows]


def _series(rows: list[LoggedRow], source: Path, keys: list[str], x: str) -> list[_Series]:
    numeric = sorted({k for row in rows for k, v in row.values.items() if _number(v) is not None})
    if x not in ("_step", "_timestamp") and x not in numeric:
        raise _PlotError(
            f"--x {x!r} is not a numeric key of {source}; use _step, _timestamp or one of: "
            + ", ".join(numeric)
        )
    present = {key for row in rows for key in row.values}
    missing = [key for key in keys if key not in present]
    if missing:
        raise _PlotError(
            f"{source} has no key {_missing(missing, sorted(present))}; its numeric keys are: "
            + (", ".join(numeric) or "(none)")
        )
    not_numbers = [key for key in keys if key not in numeric]
    if not_numbers:
        raise _PlotError(
            f"{', '.join(map(repr, not_numbers))} in {source} holds no numbers (media files "
            "or text), so it cannot be plotted"
        )
    xs = _x_of(rows, x)
    series: list[_Series] = []
    for key in keys:
        points = [
            (x_value, y_value)
            for x_value, row in zip(xs, rows, strict=True)
            if x_value is not None and (y_value := _number(row.values.get(key))) is not None
        ]
        if not points:
            raise _PlotError(f"no row of {source} holds both {key!r} and --x {x!r}")
        # ±inf would stretch the axes to nothing; NaN leaves a gap in the line, as it should.
        series.append(
            _Series(
                key,
                [point[0] for point in points],
                [y if math.isfinite(y) else math.nan for _, y in points],
            )
        )
    return series


def _draw(series: list[_Series], output: Path, arguments: argparse.Namespace, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width, height = arguments.size
    dpi = 100
    figure = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)  # Agg, whatever backend matplotlib would pick: no display needed
    panels = len(series) if arguments.subplots else 1
    axes = figure.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    for index, line in enumerate(series):
        ax = axes[index if arguments.subplots else 0]
        marker = "o" if len(line.x) < 50 else None  # a single point must still show
        for part, (x, y) in enumerate(line.lines()):
            label = line.key if part == 0 else None
            ax.plot(x, y, label=label, marker=marker, markersize=3, color=f"C{index}")
        ax.grid(True, alpha=0.3)
    for ax in axes:
        ax.legend(loc="best")
    x_label = "seconds since the first dump" if arguments.x == "_timestamp" else arguments.x
    axes[-1].set_xlabel(x_label)
    axes[0].set_title(arguments.title if arguments.title is not None else title)
    # matplotlib types savefig's **kwargs without an annotation.
    figure.savefig(output, dpi=dpi)  # pyright: ignore[reportUnknownMemberType]


def _plot(arguments: argparse.Namespace) -> int:
    target = Path(arguments.run_dir)
    keys = list(dict.fromkeys(arguments.key))  # a key given twice is drawn once
    try:
        source, rows = _read_progress(target)
        series = _series(rows, source, keys, arguments.x)
    except _PlotError as error:
        _error("plot", str(error))
        return 1
    output = Path(arguments.output) if arguments.output else source.parent / "plot.png"
    try:
        _draw(series, output, arguments, title=str(source.parent if target.is_dir() else source))
    except OSError as error:
        _error("plot", f"cannot write {output}: {error.strerror or error}")
        return 1
    points = sum(len(line.x) for line in series)
    print(f"wrote {output}: {len(series)} curve(s), {points} points from {source}")
    back = max(len(line.starts) - 1 for line in series)
    if back and arguments.x != "_timestamp":
        print(
            f"tracklog plot: {arguments.x} goes back {back} time(s) in {source}: it holds more "
            "than one run (a run_dir used again?); each is drawn as a line of its own",
            file=sys.stderr,
        )
    return 0


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    try:
        size = (int(width), int(height))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels, not {text!r}") from None
    if not all(16 <= side <= 10_000 for side in size):
        raise argparse.ArgumentTypeError(f"each side must be 16 to 10000 pixels, not {text!r}")
    return size


# replay -------------------------------------------------------------------------------


def _replay(arguments: argparse.Namespace) -> int:
    from tracklog._replay import QueueBusyError, find_queues, replay

    queues = find_queues(Path(arguments.spool))
    if not queues:
        print(f"nothing to replay at {arguments.spool}: no queue there (already delivered?)")
        return 0
    status = 0
    for directory in queues:
        try:
            result = replay(
                directory, timeout=arguments.timeout, tracking_uri=arguments.tracking_uri
            )
        except QueueBusyError as error:
            print(f"tracklog replay: {error}", file=sys.stderr)
            status = 1
            continue
        except (OSError, sqlite3.Error) as error:
            # A damaged queue.db or acks.db, a file refused (a symlink), a disk error:
            # said as such, and the other queues are still replayed.
            print(
                f"tracklog replay: {directory}: cannot read the queue "
                f"({type(error).__name__}: {error}); its replay stopped there, and the "
                "queue's files are left as they are",
                file=sys.stderr,
            )
            status = 1
            continue
        if result.complete and result.delivered == 0:
            print(f"{directory}: nothing to replay (already delivered)")
        elif result.complete:
            print(f"{directory}: delivered {result.delivered} record(s); the queue is removed")
        else:
            print(
                f"{directory}: delivered {result.delivered}, {result.remaining} remain; "
                "run the same command again",
                file=sys.stderr,
            )
            status = 1
    return status


# the parser ---------------------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


_EXIT_CODES = "exit codes: 0 success, 1 failure (explained on stderr), 2 bad usage"


def _command(
    commands: _Commands,
    name: str,
    summary: str,
    description: str,
) -> argparse.ArgumentParser:
    return commands.add_parser(
        name,
        help=summary,
        description=description,
        epilog=_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _add_validate(commands: _Commands) -> None:
    validate = _command(
        commands,
        "validate",
        "check a settings file; print it resolved, secrets masked",
        "Validate a settings file (.yaml, .yml, .toml or .json) as build_logger would,\n"
        "TRACKLOG_* environment variables applied. Valid: print the resolved settings,\n"
        "every default filled in and secrets shown as **********. Invalid: print every\n"
        "error with its field path (outputs.2.wandb.mode: ...) on stderr and exit 1.\n"
        "Nothing is created and no backend is contacted.",
    )
    validate.add_argument("file", metavar="FILE", help="the settings file")
    validate.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    validate.set_defaults(run=_validate)


def _add_schema(commands: _Commands) -> None:
    schema = _command(
        commands,
        "schema",
        "print the JSON Schema of the settings (editor completion)",
        "Print the JSON Schema of the settings file (valid as draft 7 and 2020-12), for\n"
        "completion and checking in editors. With the YAML language server (VS Code's\n"
        "YAML extension, and others), save it and put this line in the settings file:\n\n"
        "  # yaml-language-server: $schema=./tracklog.schema.json\n\n"
        "The schema checks field names, types, ranges and choices; `tracklog validate`\n"
        "also checks what a schema cannot (a known tracking_uri scheme, one writer per\n"
        "file, TRACKLOG_* environment variables).",
    )
    schema.add_argument(
        "-o", "--output", metavar="FILE", default=None, help="write it to FILE, not stdout"
    )
    schema.set_defaults(run=_schema)


def _add_demo(commands: _Commands) -> None:
    demo = _command(
        commands,
        "demo",
        "train PPO on CartPole with every output on (make demo)",
        "PPO learns CartPole-v1 with tracklog as its SB3 logger: SB3's metrics, the\n"
        "hyperparameters and an evaluation video every --video-every steps reach the\n"
        "console, runs/demo/ (train.log, progress.jsonl, progress.csv, media/), MLflow\n"
        "in ./mlflow.db and a W&B offline run. Then it reads them back with each\n"
        "backend's reader and exits 1 if something is missing or the agent did not\n"
        "improve. Needs the demo extra: pip install 'tracklog[demo]'.",
    )
    demo.add_argument(
        "--settings",
        metavar="FILE",
        default=None,
        help="settings file (default: built in, the same as examples/demo.yaml); it "
        "needs a jsonl or csv output",
    )
    demo.add_argument(
        "--steps",
        "--timesteps",
        type=_positive,
        default=60_000,
        metavar="N",
        help="environment steps to train for (default 60000, about 20 s)",
    )
    demo.add_argument(
        "--video-every",
        type=_positive,
        default=20_000,
        metavar="N",
        help="record an evaluation video every N steps, and at the end (default 20000)",
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.set_defaults(run=_demo)


def _add_plot(commands: _Commands) -> None:
    plot = _command(
        commands,
        "plot",
        "draw learning curves from a run's progress.jsonl or progress.csv",
        "Draw one line per --key against the dump step from RUN_DIR/progress.jsonl (or,\n"
        "without it, RUN_DIR/progress.csv), into a PNG. RUN_DIR may also be the JSONL\n"
        "or CSV file itself. Nothing but the file is needed: no tracker, no display.\n\n"
        "  tracklog plot runs/demo --key rollout/ep_rew_mean --key eval/return",
    )
    plot.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, or its progress file")
    plot.add_argument(
        "-k",
        "--key",
        action="append",
        required=True,
        metavar="KEY",
        help="a logged key to draw; repeat for more curves",
    )
    plot.add_argument(
        "-o",
        "--output",
        metavar="PNG",
        default=None,
        help="where to write the image (default: plot.png beside the progress file)",
    )
    plot.add_argument(
        "--x",
        default="_step",
        metavar="KEY",
        help="the x axis: _step (default), _timestamp (seconds since the first dump) or a "
        "numeric key such as time/total_timesteps",
    )
    plot.add_argument(
        "--subplots", action="store_true", help="one panel per key instead of one shared panel"
    )
    plot.add_argument(
        "--size",
        type=_size,
        default=(960, 540),
        metavar="WxH",
        help="image size in pixels (default 960x540)",
    )
    plot.add_argument(
        "--title", default=None, help="title (default: the run directory, or the file)"
    )
    plot.set_defaults(run=_plot)


def _add_replay(commands: _Commands) -> None:
    replay = _command(
        commands,
        "replay",
        "deliver what a logger left in its delivery queue",
        "Deliver the records a logger's delivery process could not deliver (a backend\n"
        "down past delivery.deadline, an output that could not start, or the delivery\n"
        "process was killed) to the same run, exactly once, then end the run. SPOOL is\n"
        "one queue directory, a run_dir, or its spool/ folder. Credentials come from the\n"
        "environment (MLFLOW_TRACKING_USERNAME/PASSWORD, WANDB_API_KEY); they are never\n"
        "written to a queue. Nothing read from the queue can run code. Running it again\n"
        "after it completed does nothing; exit 1 means records remain: run it again.",
    )
    replay.add_argument("spool", metavar="SPOOL")
    replay.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds to keep retrying a backend that is down (default 600)",
    )
    replay.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI to use instead of the recorded one (whose password, "
        "if it had one, was masked)",
    )
    replay.set_defaults(run=_replay)


def _parser() -> argparse.ArgumentParser:
    from tracklog import __version__

    parser = argparse.ArgumentParser(
        prog="tracklog",
        description="Typed, validated logging for RL training. "
        "`tracklog COMMAND --help` describes a command.",
        epilog=_EXIT_CODES,
    )
    parser.add_argument("--version", action="version", version=f"tracklog {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_validate, _add_schema, _add_demo, _add_plot, _add_replay):
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tracklog`` command with ``argv`` (default ``sys.argv[1:]``); the exit code."""
    arguments = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    status: int = arguments.run(arguments)
    return status


if __name__ == "__main__":
    sys.exit(main())
