"""When a proxy should change mode, and what the bus does in each mode.

:class:`Policy` turns a proxy's :class:`~modes.machine.ProxyModes` and
:class:`~modes.evidence.Evidence` into a :class:`Decision` (or None), which
the daemon applies with ``ProxyModes.apply`` and mirrors to the kernel.  The
thresholds are the graph's ``guards``; the triggers are looked up in the graph
(``Graph.trigger_for``), never restated.

Rules, with ``g = graph.guards`` (the guard of trigger ``mature``, ``promote``,
``degrade``, ``recover``; the rows name the moves of the shipped graph):

=================  ==============================================================
move               when
=================  ==============================================================
learning ->        shadow quality >= ``g.maturity`` with >= ``g.min_decisions``
collaboration      valid shadows in the window (and, with a shadow scorer, the
                   estimated efficiency not below the default arm by
                   ``g.demotion_margin``, over >= ``g.min_decisions`` scored
                   samples and a coverage >= ``g.coverage``; without a
                   scorer, once >= ``g.min_decisions`` decisions were
                   explored, the model arm not below the default by
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

What the bus does per mode (recommend, learn, explore) is each state's
``duty`` in the graph; the reason sent with each move is its edge's
``reason``.  The guards above are keyed by trigger name (``_GUARDS``); the
graph's unguarded edges are the fault edges.
"""

from __future__ import annotations

import enum
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from kmlbus.contract import graph as mgraph
from kmlbus.contract import spec as kspec
from modes.evidence import Evidence
from modes.machine import ProxyModes

__all__ = ["Check", "Decision", "Fault", "Policy"]


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

#: The guard method of each automatic trigger of the graph.  A trigger without
#: a guard (the graph's ``fault`` edges) is taken only through :meth:`Policy.fault`.
_GUARDS = {
    "recover": "_cooldown",
    "mature": "_maturity",
    "promote": "_promotion",
    "degrade": "_demotion",
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


@dataclass(frozen=True)
class Check:
    """One guard measured now: the move it allows, whether it is met, and the numbers."""

    name: str
    transition: mgraph.Transition
    met: bool
    detail: str
    values: dict[str, Any]

    @property
    def target(self) -> str:
        """The mode the move leads to."""
        return self.transition.dest

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form: ``met``, ``target`` and the values against their thresholds."""
        return {"target": self.target, "met": self.met, **self.values}


def _raised(x: float, margin: float) -> float:
    return x + margin * abs(x)


def _lowered(x: float, margin: float) -> float:
    return x - margin * abs(x)


class Policy:
    """The automatic mode rules over a graph's guards (see module doc).

    *clock* must be the clock the proxies' :class:`ProxyModes` use: the
    cool-down compares it with their ``entered_at`` and ``last_fault_at``.
    """

    def __init__(self, graph: mgraph.Graph | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.graph = graph if graph is not None else mgraph.load()
        self.guards = self.graph.guards
        self.clock = clock
        reasons = kspec.load().enums["reason"].entries
        for r in _FAULT_REASON.values():
            if r not in reasons:
                raise mgraph.GraphError(f"policy reason {r!r} is not in the spec's reason enum {list(reasons)}")
        triggers = {t.trigger for t in self.graph.transitions}
        missing = set(_GUARDS) - triggers
        if missing:
            raise mgraph.GraphError(f"policy guards {sorted(missing)} name no trigger of the mode graph")
        #: source mode -> the unguarded (fault) transition out of it
        self._fault_edges = {s: t for t in self.graph.transitions if t.trigger not in _GUARDS
                             for s in t.sources}

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
        for check in self.checks(modes, evidence, healthy=healthy):
            if check.met:
                return self._move(modes, evidence, check)
        return None

    def checks(self, modes: ProxyModes, evidence: Evidence, *,
               healthy: bool = True) -> list[Check]:
        """The guards of the moves out of the proxy's mode, measured now.

        :meth:`evaluate` takes the first one met; ``status`` shows them all.
        """
        out = []
        for t in self.graph.out_of(modes.mode):
            guard = _GUARDS.get(t.trigger)
            if guard is not None:
                out.append(getattr(self, guard)(t, modes, evidence, healthy))
        return out

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
        edge = self._fault_edges.get(modes.mode)
        if edge is None:  # already where faults lead
            return None
        return Decision(modes.mode, edge.dest, edge.trigger, fault.reason, what, True,
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

    def report(self, modes: ProxyModes, evidence: Evidence, *, healthy: bool = True) -> dict[str, Any]:
        """Evidence against the thresholds (the snapshot stored with each decision)."""
        ev = evidence.summary()
        ev["checks"] = {c.name: c.as_dict() for c in self.checks(modes, evidence, healthy=healthy)}
        return ev

    def status(self, modes: ProxyModes, evidence: Evidence, *, healthy: bool = True) -> dict[str, Any]:
        """Everything ``kmlbus status`` shows for a proxy: mode, time in it, pin, last
        reason and its evidence, and the live evidence against the thresholds."""
        st = modes.status()
        st["now"] = self.report(modes, evidence, healthy=healthy)
        st["duty"] = asdict(self.graph.duty(modes.mode))
        return st

    # -- guards --------------------------------------------------------------------------

    def _quiet(self, modes: ProxyModes) -> float:
        since = max(modes.entered_at, modes.last_fault_at or modes.entered_at)
        return self.clock() - since

    def _cooldown(self, t: mgraph.Transition, modes: ProxyModes, _evidence: Evidence,
                  healthy: bool) -> Check:
        g = self.guards
        quiet = self._quiet(modes)
        return Check("cooldown", t, healthy and quiet >= g.cooldown_s,
                     f"healthy for {quiet:.1f}s >= cool-down {g.cooldown_s}s",
                     {"quiet_s": round(quiet, 3), "threshold_s": g.cooldown_s, "healthy": healthy})

    def _maturity(self, t: mgraph.Transition, _modes: ProxyModes, evidence: Evidence,
                  _healthy: bool) -> Check:
        g = self.guards
        m = evidence.maturity()
        met = m.quality >= g.maturity and m.valid >= g.min_decisions
        values: dict[str, Any] = {"quality": m.quality, "threshold": g.maturity, "valid": m.valid,
                                  "decisions": m.decisions, "min_decisions": g.min_decisions}
        if m.coverage is not None:
            d = evidence.arm("default")
            floor = None if d.mean is None else _lowered(d.mean, g.demotion_margin)
            values.update(estimated=m.estimated, estimated_floor=floor, default_count=d.count,
                          coverage=m.coverage, coverage_threshold=g.coverage, scored=m.scored)
            met = (met and d.count >= g.min_decisions and floor is not None
                   and m.estimated is not None and m.estimated >= floor
                   and m.coverage >= g.coverage and m.scored >= g.min_decisions)
        else:
            # Without a scorer, explored decisions (the kernel's explore share applies the
            # model's values in learning) are direct evidence: once there are enough, the
            # model arm must not be worse than the default by the demotion margin.
            d, mdl = evidence.arm("default"), evidence.arm("model")
            if mdl.count >= g.min_decisions and d.count >= g.min_decisions and \
                    d.mean is not None and mdl.mean is not None:
                floor = _lowered(d.mean, g.demotion_margin)
                values.update(explored_mean=mdl.mean, explored_floor=floor)
                met = met and mdl.mean >= floor
        return Check("maturity", t, met,
                     f"shadow quality {m.quality:.3f} >= {g.maturity} over {m.decisions} "
                     f"decisions ({m.valid} valid shadows)", values)

    def _promotion(self, t: mgraph.Transition, _modes: ProxyModes, evidence: Evidence,
                   _healthy: bool) -> Check:
        g = self.guards
        d, m = evidence.arm("default"), evidence.arm("model")
        thr = None if d.mean is None else _raised(d.mean, g.promotion_margin)
        enough = d.count >= g.min_decisions and m.count >= g.min_decisions
        met = enough and thr is not None and m.mean is not None and m.mean >= thr
        return Check("promotion", t, met,
                     f"model {m.mean or 0:.1f} >= default {d.mean or 0:.1f} +{g.promotion_margin:.0%} "
                     f"over {m.count}/{d.count} decisions",
                     {"model": m.mean, "default": d.mean, "threshold": thr,
                      "counts": {"model": m.count, "default": d.count}, "min_decisions": g.min_decisions})

    def _demotion(self, t: mgraph.Transition, modes: ProxyModes, evidence: Evidence,
                  _healthy: bool) -> Check:
        g = self.guards
        d, m = evidence.arm("default"), evidence.arm("model")
        # Where the kernel splits decisions between the arms, the model is held against
        # the default side by side; elsewhere against the default measured before.
        collaboration = self.graph.duty(modes.mode).split
        if collaboration:
            ref, label = d.mean, "default"
            enough = d.count >= g.min_decisions and m.count >= g.min_decisions
        else:
            ref, label = self.reference(evidence), "reference default"
            enough = m.count >= g.min_decisions
        thr = None if ref is None else _lowered(ref, g.demotion_margin)
        met = enough and thr is not None and m.mean is not None and m.mean < thr
        return Check("demotion", t, met,
                     f"model {m.mean or 0:.1f} < {label} {ref or 0:.1f} -{g.demotion_margin:.0%} "
                     f"over {m.count} model decisions",
                     {"model": m.mean, "reference_default" if not collaboration else "default": ref,
                      "threshold": thr, "counts": {"model": m.count, "default": d.count},
                      "min_decisions": g.min_decisions})

    def _move(self, modes: ProxyModes, evidence: Evidence, check: Check) -> Decision:
        t = check.transition
        return Decision(modes.mode, t.dest, t.trigger, t.reason, check.detail, False,
                        self.report(modes, evidence))
