"""Recognise kernel log lines that mean something went wrong.

Shared by the host harness (it scans the guest's whole ``dmesg`` after the
command) and by the in-guest test helpers (they scan the records logged during
one test).  A test that leaves a WARN, BUG, Oops or stack trace in the log is a
failed test even if its assertions passed: the kernel is in an unknown state.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["PROBLEM_RE", "problems"]

#: Markers the kernel prints for WARN()/BUG()/oopses and their backtraces.
#: Word boundaries keep e.g. ``DEBUG`` or ``BUGS`` from matching.
PROBLEM_RE = re.compile(r"\bWARNING\b|\bBUG\b|\bOops\b|Call Trace")


def problems(lines: Iterable[str]) -> list[str]:
    """Return the lines of *lines* that contain a kernel problem marker."""
    return [line for line in lines if PROBLEM_RE.search(line)]
