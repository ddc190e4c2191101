"""When a proxy should change mode, and what the bus does in each mode.

:class:`Policy` turns a proxy's :class:`~modes.machine.ProxyModes` and
:class:`~modes.evidence.Evidence` into a :class:`Decision` (or None), which
the daemon applies with ``ProxyModes.apply`` and mirrors to the kernel.  The
thresholds are the graph's ``guards``; the triggers are looked up in the graph
(``Graph.trigger_for``), never restated.

Rules (issue 4), with ``g = graph.guards``:

=================  ==============================================================
move               when
=================  ==============================================================
learning ->        shadow quality >= ``g.maturity`` with >= ``g.min_decisions``
collaboration      valid shadows in the window (and, with a shadow scorer, the
                   estimated shadow efficiency not below the default arm by
                   ``g.demotion_margin``); see :mod:`modes.evidence`
collaboration ->   both arms have >= ``g.min_decisions`` decisions in the window
recommendation     and model mean >= default mean raised by ``g.promotion_margin``
collaboration ->   both arms have >= ``g.min_decisions`` and model mean < default
learning           mean lowered by ``g.demotion_margin``
recommendation ->  >= ``g.min_decisions`` model decisions and model mean < the
learning           reference default mean (kept from collaboration; if there is
                   none, the default window when it has >= min_decisions; else
                   no automatic demotion) lowered by ``g.demotion_margin``
any -> emergency   :meth:`Policy.fault`: model error, stale recommendations,
                   inference slower than ``g.latency_budget_ms``
                   (:meth:`Policy.observe_latency`), bus/kernel fallback,
                   operator.  Goes through a pin (see :mod:`modes.machine`).
emergency ->       ``g.cooldown_s`` have passed since entering emergency and
learning           since the last fault, and the daemon reports the proxy
                   healthy (model loaded, bus attached)
=================  ==============================================================

"Raised/lowered by a margin" is ``x + m*|x|`` / ``x - m*|x|``, which equals
``x*(1 +/- m)`` for the usual positive efficiencies and keeps its meaning if
a proxy reports negative ones.  While a proxy is pinned :meth:`Policy.evaluate`
returns None.  Evidence windows start empty after every mode change (see
:mod:`modes.evidence`), so each move is judged on evidence from the mode it
leaves.

What the bus does per mode (:data:`DUTIES`): in emergency it sends no
recommendations (the kernel would ignore them; not sending saves inference
and netlink work) but keeps the model loaded and may keep learning from
telemetry; in learning, collaboration and recommendation it sends
recommendations (in learning they become the kernel's shadows).
"""

from __future__ import annotations

import enum
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from kmlbus import spec as kspec
from modes import graph as mgraph
from modes.evidence import Evidence
from modes.machine import ProxyModes

__all__ = ["DUTIES", "Decision", "Duty", "Fault", "Policy", "duty"]


@dataclass(frozen=True)
class Duty:
    """What the bus does for a proxy in one mode."""

    recommend: bool  # run inference and send recommendations
    learn: bool  # train / correct the model from telemetry and feedback
    compare_arms: bool  # arm efficiencies decide the next move


#: The bus's duties per mode (keys are exactly the graph's states; a test checks).
DUTIES: dict[str, Duty] = {
    "emergency": Duty(recommend=False, learn=True, compare_arms=False),
    "learning": Duty(recommend=True, learn=True, compare_arms=False),
    "collaboration": Duty(recommend=True, learn=True, compare_arms=True),
    "recommendation": Duty(recommend=True, learn=False, compare_arms=True),
}


def duty(mode: str) -> Duty:
    """The bus's :class:`Duty` in *mode*."""
    return DUTIES[mode]


class Fault(enum.Enum):
    """Why the bus sends a proxy to emergency (``value``: name shown to people)."""

    MODEL_ERROR = "model-error"
    STALE = "stale"
    LATENCY = "latency"
    BUS_GONE = "bus-gone"
    KERNEL = "kernel-fallback"
    OPERATOR = "operator"

    @property
    def reason(self) -> str:
        """Entry of the spec's ``reason`` enum sent with the mode change."""
        return _FAULT_REASON[self]


_FAULT_REASON = {
    Fault.MODEL_ERROR: "fault",
    Fault.STALE: "stale",
    Fault.LATENCY: "fault",
    Fault.BUS_GONE: "bus-gone",
    Fault.KERNEL: "fault",
    Fault.OPERATOR: "operator",
}

#: Spec ``reason`` entry for each automatic trigger's destination.
_MOVE_REASON = {
    "learning->collaboration": "promotion",
    "collaboration->recommendation": "promotion",
    "collaboration->learning": "demotion",
    "recommendation->learning": "demotion",
    "emergency->learning": "recovery",
}


@dataclass(frozen=True)
class Decision:
    """A proposed mode change with its reason and the evidence behind it.

    ``reason`` is an entry of the spec's ``reason`` enum (sent to the kernel),
    ``detail`` the sentence for people, ``evidence`` the report the decision
    was taken on (see :meth:`Policy.report`).
    """

    source: str
    target: str
    trigger: str
    reason: str
    detail: str
    is_fault: bool = False
    evidence: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (``kmlbus status --json``)."""
        return asdict(self)


def _raised(x: float, margin: float) -> float:
    return x + margin * abs(x)


def _lowered(x: float, margin: float) -> float:
    return x - margin * abs(x)


class Policy:
    """The automatic mode rules over a graph's guards (see module doc)."""

    def __init__(self, graph: mgraph.Graph | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.graph = graph if graph is not None else mgraph.load()
        self.guards = self.graph.guards
        self.clock = clock
        reasons = kspec.load().enums["reason"].entries
        for r in (*_FAULT_REASON.values(), *_MOVE_REASON.values()):
            if r not in reasons:
                raise mgraph.GraphError(f"policy reason {r!r} is not in the spec's reason enum {list(reasons)}")
        for move in _MOVE_REASON:
            src, dst = move.split("->")
            if not self.graph.is_allowed(src, dst):
                raise mgraph.GraphError(f"policy rule {move} is not an edge of the mode graph")
        if set(DUTIES) != set(self.graph.states):
            raise mgraph.GraphError(f"DUTIES covers {sorted(DUTIES)}, graph has {sorted(self.graph.states)}")

    # -- automatic moves --------------------------------------------------------

    def evaluate(self, modes: ProxyModes, evidence: Evidence, *,
                 healthy: bool = True) -> Decision | None:
        """The automatic move the evidence calls for now, or None.

        *healthy* is the daemon's view of the proxy's prerequisites (model
        loaded and matching, bus attached); it only gates recovery from
        emergency.  Returns None while the proxy is pinned.
        """
        if modes.pinned is not None:
            return None
        g = self.guards
        mode = modes.mode
        if mode == "emergency":
            since = max(modes.entered_at, modes.last_fault_at or modes.entered_at)
            quiet = self.clock() - since
            if healthy and quiet >= g.cooldown_s:
                return self._move(modes, evidence, "learning",
                                  f"healthy for {quiet:.1f}s >= cool-down {g.cooldown_s}s")
            return None
        dflt, model = evidence.arm("default"), evidence.arm("model")
        if mode == "learning":
            if self._mature(evidence):
                m = evidence.maturity()
                return self._move(modes, evidence, "collaboration",
                                  f"shadow quality {m.quality:.3f} >= {g.maturity} "
                                  f"over {m.decisions} decisions ({m.valid} valid shadows)")
            return None
        if mode == "collaboration":
            n = g.min_decisions
            if dflt.count < n or model.count < n or dflt.mean is None or model.mean is None:
                return None
            if model.mean >= _raised(dflt.mean, g.promotion_margin):
                return self._move(modes, evidence, "recommendation",
                                  f"model {model.mean:.1f} >= default {dflt.mean:.1f} "
                                  f"+{g.promotion_margin:.0%} over {model.count}/{dflt.count} decisions")
            if model.mean < _lowered(dflt.mean, g.demotion_margin):
                return self._move(modes, evidence, "learning",
                                  f"model {model.mean:.1f} < default {dflt.mean:.1f} "
                                  f"-{g.demotion_margin:.0%} over {model.count}/{dflt.count} decisions")
            return None
        if mode == "recommendation":
            ref = self.reference(evidence)
            if ref is None or model.count < g.min_decisions or model.mean is None:
                return None
            if model.mean < _lowered(ref, g.demotion_margin):
                return self._move(modes, evidence, "learning",
                                  f"model {model.mean:.1f} < reference default {ref:.1f} "
                                  f"-{g.demotion_margin:.0%} over {model.count} decisions")
            return None
        raise mgraph.GraphError(f"policy has no rule for mode {mode!r}")

    def reference(self, evidence: Evidence) -> float | None:
        """Default-arm efficiency the model is held against in recommendation."""
        if evidence.reference_default is not None:
            return evidence.reference_default
        d = evidence.arm("default")
        return d.mean if d.count >= self.guards.min_decisions else None

    # -- faults -------------------------------------------------------------------

    def fault(self, modes: ProxyModes, fault: Fault, detail: str = "",
              evidence: Evidence | None = None) -> Decision | None:
        """Record *fault* and return the move to emergency (None if already there).

        Every fault restarts the emergency cool-down, also when the proxy is
        already in emergency.
        """
        what = f"{fault.value}: {detail}" if detail else fault.value
        modes.note_fault(what)
        if modes.mode == "emergency":
            return None
        trigger = self.graph.trigger_for(modes.mode, "emergency")
        if trigger is None:
            raise mgraph.GraphError(f"the mode graph has no fault edge {modes.mode} -> emergency")
        return Decision(modes.mode, "emergency", trigger, fault.reason, what, True,
                        self.report(modes, evidence) if evidence is not None else {})

    def observe_latency(self, modes: ProxyModes, latency_ms: float,
                        evidence: Evidence | None = None) -> Decision | None:
        """A fault decision if an inference took longer than the latency budget."""
        budget = self.guards.latency_budget_ms
        if latency_ms <= budget:
            return None
        return self.fault(modes, Fault.LATENCY, f"inference took {latency_ms:.1f} ms > budget {budget} ms",
                          evidence)

    # -- visibility -----------------------------------------------------------------

    def report(self, modes: ProxyModes, evidence: Evidence) -> dict[str, Any]:
        """Evidence against the thresholds, as ``kmlbus status`` shows it."""
        g = self.guards
        ev = evidence.summary()
        dflt, model = evidence.arm("default"), evidence.arm("model")
        m = evidence.maturity()
        checks: dict[str, Any] = {}
        if modes.mode == "emergency":
            since = max(modes.entered_at, modes.last_fault_at or modes.entered_at)
            checks["cooldown"] = {"quiet_s": round(self.clock() - since, 3), "threshold_s": g.cooldown_s}
        elif modes.mode == "learning":
            checks["maturity"] = {"quality": m.quality, "threshold": g.maturity,
                                  "valid": m.valid, "min_decisions": g.min_decisions,
                                  "estimated": m.estimated, "met": self._mature(evidence)}
        elif modes.mode == "collaboration":
            checks["promotion"] = {
                "model": model.mean, "default": dflt.mean,
                "threshold": None if dflt.mean is None else _raised(dflt.mean, g.promotion_margin),
                "counts": [model.count, dflt.count], "min_decisions": g.min_decisions}
            checks["demotion"] = {
                "model": model.mean,
                "threshold": None if dflt.mean is None else _lowered(dflt.mean, g.demotion_margin)}
        else:
            ref = self.reference(evidence)
            checks["demotion"] = {
                "model": model.mean, "reference_default": ref,
                "threshold": None if ref is None else _lowered(ref, g.demotion_margin),
                "count": model.count, "min_decisions": g.min_decisions}
        ev["checks"] = checks
        return ev

    # -- internals --------------------------------------------------------------------

    def _mature(self, evidence: Evidence) -> bool:
        g = self.guards
        m = evidence.maturity()
        if m.quality < g.maturity or m.valid < g.min_decisions:
            return False
        if m.estimated is None:
            return True
        d = evidence.arm("default")
        return (d.count >= g.min_decisions and d.mean is not None
                and m.estimated >= _lowered(d.mean, g.demotion_margin))

    def _move(self, modes: ProxyModes, evidence: Evidence, target: str, detail: str) -> Decision:
        trigger = self.graph.trigger_for(modes.mode, target)
        if trigger is None:  # checked in __init__; the graph may not change under us
            raise mgraph.GraphError(f"the mode graph has no edge {modes.mode} -> {target}")
        return Decision(modes.mode, target, trigger, _MOVE_REASON[f"{modes.mode}->{target}"],
                        detail, False, self.report(modes, evidence))
