"""The whole package type-checks (mypy with the project's configuration in pyproject.toml).

Per-module strict checks live beside their modules' tests; this one keeps
every module of ``kmlbus`` and ``modes`` from drifting, the daemon's ``Link``
protocol against :mod:`tests.support.standin` included.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kmlbus_and_modes_pass_mypy() -> None:
    r = subprocess.run([sys.executable, "-m", "mypy", "kmlbus", "modes",
                        "tests/support", "tests/test_daemon_standin.py"],
                       cwd=ROOT, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "Success" in r.stdout
