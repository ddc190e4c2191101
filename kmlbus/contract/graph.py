"""Load the mode graph (``kmlbus/contract/graph.yaml``): states, triggers, guards.

This is the single definition of which mode moves are allowed.  The kernel's
allowed-transition table is generated from :func:`load` and the bus's
``transitions`` machine is built from it, so neither restates the graph.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kmlbus.contract import spec as kspec

__all__ = ["Duty", "Graph", "GraphError", "Guards", "Transition", "load"]

GRAPH_PATH = Path(__file__).resolve().parent / "graph.yaml"


class GraphError(ValueError):
    """The mode graph is malformed or disagrees with the family spec."""


@dataclass(frozen=True)
class Transition:
    """One edge set: *trigger* moves any of *sources* to *dest*, announced with *reason*
    (an entry of the spec's ``reason`` enum)."""

    trigger: str
    sources: tuple[str, ...]
    dest: str
    reason: str
    doc: str = ""


@dataclass(frozen=True)
class Duty:
    """What the bus does for a proxy in one mode (see graph.yaml)."""

    recommend: bool  # run inference and send recommendations
    learn: bool  # train / correct the model from telemetry and feedback
    explore: bool  # the kernel applies the bus's values on its explore share
    split: bool  # the kernel splits decisions between the arms: compare them side by side


@dataclass(frozen=True)
class Guards:
    """Evidence thresholds with their defaults (see graph.yaml for meanings)."""

    window: int
    min_decisions: int
    maturity: float
    coverage: float
    promotion_margin: float
    demotion_margin: float
    collaboration_share: int
    exploration_share: int
    cooldown_s: float
    latency_budget_ms: float


@dataclass(frozen=True)
class Graph:
    """States (in wire order) with their duties, the initial state, transitions and guards."""

    states: tuple[str, ...]
    initial: str
    transitions: tuple[Transition, ...]
    guards: Guards
    duties: dict[str, Duty]

    def duty(self, mode: str) -> Duty:
        """The bus's duty in *mode*."""
        return self.duties[mode]

    def out_of(self, source: str) -> tuple[Transition, ...]:
        """The transitions that can leave *source*, in graph order."""
        return tuple(t for t in self.transitions if source in t.sources)

    @functools.cached_property
    def allowed(self) -> frozenset[tuple[str, str]]:
        """Every (source, dest) pair some trigger allows."""
        return frozenset((s, t.dest) for t in self.transitions for s in t.sources)

    def is_allowed(self, source: str, dest: str) -> bool:
        """True if the graph lets a proxy move from *source* to *dest* (same mode: yes)."""
        return source == dest or (source, dest) in self.allowed

    def trigger_for(self, source: str, dest: str) -> str | None:
        """The trigger that moves *source* to *dest*, or None."""
        for t in self.transitions:
            if dest == t.dest and source in t.sources:
                return t.trigger
        return None


def _parse(raw: dict[str, Any]) -> Graph:
    sp = kspec.load()
    wire = sp.enums["mode"].entries
    reasons = sp.enums["reason"].entries
    raw_states = raw["states"]
    if not isinstance(raw_states, dict):
        raise GraphError("states: expected a mapping of mode name -> duty")
    states = tuple(raw_states)
    if states != wire:
        raise GraphError(f"graph states {list(states)} differ from the spec's mode enum {list(wire)}")
    if raw["initial"] not in states:
        raise GraphError(f"initial state {raw['initial']!r} is not a state")
    trans = []
    for t in raw["transitions"]:
        src = t["source"]
        sources = tuple(states if src == "*" else ([src] if isinstance(src, str) else src))
        for s in (*sources, t["dest"]):
            if s not in states:
                raise GraphError(f"transition {t['trigger']}: unknown state {s!r}")
        if t.get("reason") not in reasons:
            raise GraphError(f"transition {t['trigger']}: reason {t.get('reason')!r} is not in the "
                             f"spec's reason enum {list(reasons)}")
        trans.append(Transition(t["trigger"], sources, t["dest"], t["reason"], t.get("doc", "")))
    duties = {}
    for name, d in raw_states.items():
        fields = {k: v for k, v in (d or {}).items() if k != "doc"}
        try:
            duties[name] = Duty(**fields)
        except TypeError as e:
            raise GraphError(f"state {name}: {e}") from None
    g = raw["guards"]
    try:
        guards = Guards(**g)
    except TypeError as e:
        raise GraphError(f"guards: {e}") from None
    return Graph(states, raw["initial"], tuple(trans), guards, duties)


@functools.lru_cache(maxsize=None)
def load(path: Path = GRAPH_PATH) -> Graph:
    """Parse and check the mode graph (cached)."""
    with open(path, encoding="utf-8") as f:
        return _parse(yaml.load(f, Loader=kspec.SAFE_LOADER))
