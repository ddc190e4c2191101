"""The kmlbus interaction modes: one mode graph shared by kernel and bus."""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())
