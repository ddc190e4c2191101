"""kmlbus: a user-space bus that drives kernel model proxies over generic netlink."""

import logging

__all__ = ["__version__"]
__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
