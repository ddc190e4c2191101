"""The daemon's published view of each proxy's mode machine and evidence.

The kernel knows modes and counters but not the bus's evidence (per-arm
efficiency, maturity, why the last transition happened).  ``kmlbus run``
writes that view atomically to a small JSON file so ``kmlbus status`` in
another process can show it next to the kernel's numbers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kmlbus.bus import atomic

__all__ = ["default_path", "read", "write"]


def default_path() -> Path:
    """``$KMLBUS_STATE`` if set, else ``/run/kmlbus/state.json``."""
    env = os.environ.get("KMLBUS_STATE")
    return Path(env) if env else Path("/run/kmlbus/state.json")


def write(state: dict[str, Any], path: Path | None = None) -> None:
    """Replace the state file atomically (write a temp file, then rename)."""
    p = path or default_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(p, json.dumps(state, indent=1, sort_keys=True, default=str).encode())


def read(path: Path | None = None) -> dict[str, Any]:
    """The last state the daemon wrote, or ``{}`` if none or unreadable."""
    p = path or default_path()
    try:
        with open(p, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
