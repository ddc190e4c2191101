"""Operator pins: ``kmlbus mode PROXY MODE --pin`` holds a proxy in a mode.

A pin suspends the bus's automatic moves for that proxy until ``--unpin``.
Pins live in a small JSON file beside the daemon's state file so that they
survive a daemon restart and can be set from another process.
"""

from __future__ import annotations

import json
from pathlib import Path

from kmlbus.bus import atomic, statefile

__all__ = ["load", "pin", "pins_path", "unpin"]


def pins_path() -> Path:
    """Where pins are kept: ``pins.json`` next to the state file."""
    return statefile.default_path().with_name("pins.json")


def load(path: Path | None = None) -> dict[str, str]:
    """Pinned proxies as {proxy name or id: mode}; empty if none."""
    p = path or pins_path()
    try:
        with open(p, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _save(pins: dict[str, str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(path, json.dumps(pins, sort_keys=True).encode())


def pin(proxy: str, mode: str, path: Path | None = None) -> None:
    """Pin *proxy* to *mode*."""
    p = path or pins_path()
    pins = load(p)
    pins[proxy] = mode
    _save(pins, p)


def unpin(proxy: str, path: Path | None = None) -> None:
    """Remove the pin of *proxy* (no error if it had none)."""
    p = path or pins_path()
    pins = load(p)
    pins.pop(proxy, None)
    _save(pins, p)
