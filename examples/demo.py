"""The demo `make demo` runs: ``tracklog demo`` from a source tree.

PPO learns CartPole-v1 with tracklog as its SB3 logger; see ``tracklog demo --help``
and ``src/tracklog/_demo.py``. ``python examples/demo.py --settings examples/demo.yaml
--steps 60000`` is the same as ``tracklog demo --settings examples/demo.yaml --steps
60000``.
"""

from __future__ import annotations

import sys

from tracklog.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
