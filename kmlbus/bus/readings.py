"""A proxy's per-arm evidence in its subsystem's own unit (``efficiency = ...`` in the config).

The kernel reports one efficiency per decision in fixed point (real value =
raw / the proxy's ``efficiency_scale``), and the bus keeps a mean per arm.
That mean is what the mode machine compares, but an operator of a subsystem
thinks in the subsystem's unit.  A proxy's ``efficiency`` key names how its
efficiency converts, so ``kmlbus status`` can show each arm in that unit:

``"mean"`` (the default)
    the plain mean efficiency, raw, as the kernel reports it;
``"reclaimed"``
    the efficiency is the share of a cleaned unit that was freed (kmlbus-lsd's
    victim proxy: dead blocks / segment blocks), so the arm's cleaning write
    amplification is (freed + moved) / freed = 1 / mean freed share.  Segments
    are all the same size, so the mean of the shares is the ratio of the sums
    and this is the same number the target's ``wa_default``/``wa_model``
    computes from its counters, over the bus's evidence window;
``"class-match"``
    the efficiency falls linearly from full for the right class to 0 for a
    class off by the whole range of the recommendation (kmlbus-lsd's placement
    proxy: the stream a block went to against the one its death time asks
    for), so the arm's mean class error, in classes, is
    (1 - mean / scale) x (rec max - rec min).

Nothing here changes what the policy compares; it is a reading for people.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kmlbus.bus.config import EFFICIENCY_READINGS, ProxySchema

__all__ = ["DEFAULT", "KINDS", "LABELS", "line", "per_arm", "reading"]

#: The values of a proxy's ``efficiency`` config key (the first is the default).
KINDS = EFFICIENCY_READINGS
DEFAULT = KINDS[0]

#: What each kind's reading is called in ``kmlbus status``.
LABELS = {"mean": "efficiency", "reclaimed": "WA", "class-match": "class error"}

_ARMS = ("default", "model")


@dataclass(frozen=True)
class _Scale:
    efficiency: int  # raw units per 1.0 of efficiency
    classes: int  # recommendation range (rec max - rec min), 0 when unbounded


def _scale(schema: ProxySchema) -> _Scale:
    r = schema.recommendation
    span = r.max - r.min if r.min is not None and r.max is not None else 0
    return _Scale(schema.efficiency_scale or 1, max(span, 0))


def reading(kind: str, mean: float | None, schema: ProxySchema) -> float | None:
    """An arm's mean raw efficiency *mean* as *kind*'s reading; None when there is none.

    ``"reclaimed"`` gives None for a mean of 0 (nothing freed: the amplification
    is unbounded, not a number to show); ``"class-match"`` gives None when the
    recommendation has no bounded range (there are no classes to be off by).
    Raises ValueError for an unknown *kind* (the config check keeps them out).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown efficiency reading {kind!r} (expected one of {', '.join(KINDS)})")
    if mean is None:
        return None
    if kind == "mean":
        return float(mean)
    s = _scale(schema)
    share = float(mean) / s.efficiency
    if kind == "reclaimed":
        return 1.0 / share if share > 0 else None
    if s.classes == 0:
        return None
    return (1.0 - min(max(share, 0.0), 1.0)) * s.classes


def per_arm(kind: str, schema: ProxySchema, arms: Mapping[str, Any]) -> dict[str, Any]:
    """``evidence.per_arm`` of ``kmlbus status``: each arm's reading, with its label.

    *arms* is the policy report's ``arms`` table (name -> {"mean", "count", ...}).
    """
    out: dict[str, Any] = {"efficiency": kind, "label": LABELS[kind]}
    for arm in _ARMS:
        a = arms.get(arm) or {}
        out[arm] = reading(kind, a.get("mean"), schema)
        out[f"{arm}_count"] = int(a.get("count") or 0)
    return out


def line(per: Mapping[str, Any]) -> str:
    """The status table's line, e.g. ``WA per arm: default 2.04, model 1.79``."""

    def fmt(x: Any) -> str:
        return "-" if x is None else f"{float(x):.2f}"

    return (f"{per.get('label', 'efficiency')} per arm: default {fmt(per.get('default'))}, "
            f"model {fmt(per.get('model'))}")
