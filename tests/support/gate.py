"""Reference of the kernel's per-decision gate: which arm decides, with which flags.

The kernel proxy decides every call of ``decide(key, features)`` without
waiting for user space: it reads slot *key* of its recommendation table and,
by mode, lets the model's value or the default algorithm decide.  This module
is that rule in plain Python, for the user-space stand-in of a proxy, for
offline replay of traces, and as the oracle the property tests hold the
kernel to.  Semantics (DESIGN.md, "Kernel proxy semantics" and the modes table):

* a fresh recommendation is available to the gate, clamped to the
  recommendation field's ``[min, max]`` (flag ``clamped`` when that changed
  it); a stale or absent one is not, and the default decides;
* a fresh value is always reported as the sample's ``shadow`` (flag
  ``has-shadow``), whatever the mode, so telemetry shows what the model said
  even where it did not decide (the kernel, ``kml_proxy_decide``, does so);
* emergency: default only; a fresh value is *ignored* (counted
  ``recs-ignored``);
* learning: the default decides; with ``explore`` permille of the fresh
  decisions the model value is applied instead (flag ``explored``);
* collaboration: the model value decides ``share`` permille of the decisions
  that have a fresh value, the default the rest;
* recommendation: the model value decides whenever fresh.

Randomness is one uniform integer *draw* in ``[0, PERMILLE)`` per decision;
the model arm is taken when ``draw < share`` (collaboration) or
``draw < explore`` (learning), so a share of 0 never and of ``PERMILLE``
always picks the model.  The kernel draws it only when it needs it; the
reference takes it as an argument so that results are reproducible.

Arm values and flag bits come from the spec (``arm`` enum, ``sample-flags``).
:func:`gate` is the readable scalar form; :func:`gate_batch` the vectorised
form for replay, and a test checks they agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from kmlbus.contract import spec as kspec

__all__ = ["ARM_DEFAULT", "ARM_MODEL", "FLAG_CLAMPED", "FLAG_EXPLORED", "FLAG_HAS_SHADOW",
           "PERMILLE", "Fate", "GateResult", "clamp", "gate", "gate_batch"]

_spec = kspec.load()
ARM_DEFAULT = _spec.enums["arm"].value("default")
ARM_MODEL = _spec.enums["arm"].value("model")
FLAG_HAS_SHADOW = _spec.enums["sample-flags"].value("has-shadow")
FLAG_CLAMPED = _spec.enums["sample-flags"].value("clamped")
FLAG_EXPLORED = _spec.enums["sample-flags"].value("explored")
PERMILLE = int(_spec.consts["permille"])
_MODES = _spec.enums["mode"].entries

#: What happened to the recommendation slot's value in one decision.
#: none: no fresh value (absent or stale); ignored: fresh, but the mode is
#: emergency (the kernel counts it ignored); shadowed: fresh, reported as the
#: shadow, the default decided; applied: it decided (counted applied).
Fate = Literal["none", "ignored", "shadowed", "applied"]


@dataclass(frozen=True)
class GateResult:
    """The gate's verdict for one decision."""

    arm: int  # spec ``arm`` enum value
    flags: int  # spec ``sample-flags`` bits
    fate: Fate


def clamp(value: int, lo: int, hi: int) -> tuple[int, bool]:
    """*value* limited to ``[lo, hi]`` and whether that changed it."""
    v = min(max(value, lo), hi)
    return v, v != value


def _check(mode: str, share: int, explore: int) -> None:
    if mode not in _MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {list(_MODES)}")
    for name, v in (("share", share), ("explore", explore)):
        if not 0 <= v <= PERMILLE:
            raise ValueError(f"{name} must be in [0, {PERMILLE}] permille, got {v}")


def gate(mode: str, fresh: bool, share: int, explore: int, draw: int,
         clamped: bool = False) -> GateResult:
    """Decide one call: *fresh* says whether the slot holds a fresh value,
    *clamped* whether clamping changed it, *draw* is uniform in ``[0, PERMILLE)``.
    """
    _check(mode, share, explore)
    if not 0 <= draw < PERMILLE:
        raise ValueError(f"draw must be in [0, {PERMILLE}), got {draw}")
    if not fresh:
        return GateResult(ARM_DEFAULT, 0, "none")
    f = FLAG_HAS_SHADOW | (FLAG_CLAMPED if clamped else 0)
    if mode == "emergency":
        return GateResult(ARM_DEFAULT, f, "ignored")
    if mode == "learning":
        if draw < explore:
            return GateResult(ARM_MODEL, f | FLAG_EXPLORED, "applied")
        return GateResult(ARM_DEFAULT, f, "shadowed")
    if mode == "collaboration":
        if draw < share:
            return GateResult(ARM_MODEL, f, "applied")
        return GateResult(ARM_DEFAULT, f, "shadowed")
    return GateResult(ARM_MODEL, f, "applied")  # recommendation


def gate_batch(mode: str, fresh: npt.NDArray[np.bool_], share: int, explore: int,
               draw: npt.NDArray[np.integer], clamped: npt.NDArray[np.bool_] | None = None,
               ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint16]]:
    """Vectorised :func:`gate` over decisions of one mode: returns ``(arm, flags)`` arrays."""
    _check(mode, share, explore)
    fresh = np.asarray(fresh, dtype=bool)
    draw = np.asarray(draw)
    if draw.shape != fresh.shape:
        raise ValueError(f"draw shape {draw.shape} != fresh shape {fresh.shape}")
    if draw.size and (draw.min() < 0 or draw.max() >= PERMILLE):
        raise ValueError(f"draws must be in [0, {PERMILLE})")
    cl = np.zeros(fresh.shape, bool) if clamped is None else np.asarray(clamped, dtype=bool)
    flags = np.where(fresh, FLAG_HAS_SHADOW, 0).astype(np.uint16)
    flags |= np.where(fresh & cl, FLAG_CLAMPED, 0).astype(np.uint16)
    if mode == "emergency":
        model = np.zeros(fresh.shape, bool)
    elif mode == "learning":
        model = fresh & (draw < explore)
        flags |= np.where(model, FLAG_EXPLORED, 0).astype(np.uint16)
    elif mode == "collaboration":
        model = fresh & (draw < share)
    else:
        model = fresh.copy()
    arm = np.where(model, ARM_MODEL, ARM_DEFAULT).astype(np.uint8)
    return arm, flags
