"""``python -m kmlbus``: see :mod:`kmlbus.cli`."""

import sys

from kmlbus.cli import main

sys.exit(main())
