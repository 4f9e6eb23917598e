"""The ``tracklog`` command (also ``python -m tracklog``).

Exit codes: 0 success; 1 the command ran but did not complete (records remain in a
spool); 2 bad usage (argparse).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _replay(arguments: argparse.Namespace) -> int:
    from tracklog._replay import find_spools, replay
    from tracklog._spool import SpoolBusyError

    spools = find_spools(Path(arguments.spool))
    if not spools:
        print(f"nothing to replay at {arguments.spool}: no spool there (already delivered?)")
        return 0
    status = 0
    for directory in spools:
        try:
            result = replay(
                directory, timeout=arguments.timeout, tracking_uri=arguments.tracking_uri
            )
        except SpoolBusyError as error:
            print(f"tracklog replay: {error}", file=sys.stderr)
            status = 1
            continue
        if result.complete:
            print(f"{directory}: delivered {result.delivered} record(s); the spool is removed")
        else:
            print(
                f"{directory}: delivered {result.delivered}, {result.remaining} remain; "
                "run the same command again",
                file=sys.stderr,
            )
            status = 1
    return status


def _parser() -> argparse.ArgumentParser:
    from tracklog import __version__

    parser = argparse.ArgumentParser(
        prog="tracklog", description="Typed, validated logging for RL training."
    )
    parser.add_argument("--version", action="version", version=f"tracklog {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    replay = commands.add_parser(
        "replay",
        help="deliver what a logger left in its spool",
        description=(
            "Deliver the records a logger could not deliver (backend down at close, or the "
            "process died) to the same run, exactly once, then end the run. SPOOL is one "
            "spool directory, a run_dir, or its spool/ folder. Credentials come from the "
            "environment (MLFLOW_TRACKING_USERNAME/PASSWORD, WANDB_API_KEY); they are "
            "never written to a spool. Running it again after it completed does nothing."
        ),
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    status: int = arguments.run(arguments)
    return status


if __name__ == "__main__":
    sys.exit(main())
