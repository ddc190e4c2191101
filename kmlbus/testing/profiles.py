"""Hypothesis settings profiles for tests against a live module.

``kmlbus-ci`` (the default) keeps a VM test within a minute or two of a TCG
guest; ``kmlbus-soak`` runs about 20x more.  Choose with the environment
variable ``KMLBUS_HYPOTHESIS_PROFILE`` (``ci`` or ``soak``), read by
:func:`load_profile` (the kit's tests call it at import).  Every profile is
derandomized with no example database: a live kernel is shared state, and a
replayed example from an earlier run proves nothing about this one.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

__all__ = ["ENV", "PROFILES", "load_profile", "scaled"]

ENV = "KMLBUS_HYPOTHESIS_PROFILE"
#: profile name -> (hypothesis profile registered, multiplier for counts the tests choose)
PROFILES = {"ci": ("kmlbus-ci", 1), "soak": ("kmlbus-soak", 20)}

_COMMON = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                          HealthCheck.data_too_large, HealthCheck.filter_too_much])
settings.register_profile("kmlbus-ci", _COMMON, max_examples=12, stateful_step_count=25)
settings.register_profile("kmlbus-soak", _COMMON, max_examples=240, stateful_step_count=60)


def _name() -> str:
    name = os.environ.get(ENV, "ci")
    if name not in PROFILES:
        raise ValueError(f"{ENV}={name!r}: expected one of {sorted(PROFILES)}")
    return name


def load_profile() -> str:
    """Load the profile ``KMLBUS_HYPOTHESIS_PROFILE`` names (default ``ci``); its hypothesis name."""
    registered = PROFILES[_name()][0]
    settings.load_profile(registered)
    return registered


def scaled(n: int) -> int:
    """*n* for the CI profile, *n* times the profile's multiplier otherwise."""
    return n * PROFILES[_name()][1]
