"""``python -m kmlbus``: see :mod:`kmlbus.tools.cli`."""

import sys

from kmlbus.tools.cli import main

sys.exit(main())
