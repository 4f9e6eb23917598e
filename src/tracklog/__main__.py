"""``python -m tracklog``: the ``tracklog`` command."""

import sys

from tracklog.cli import main

sys.exit(main())
