"""Machine + policy + gate driven together: a hypothesis state machine and replays.

The stateful test plays kernel and daemon at once.  The kernel keeps its own
mode, checks every set-mode against the graph, and queues a mode-event for
every change (the bus's own included); the machine mirrors each move before
making it (``mirror=``) and the events are delivered later, in order, so
echoes and kernel fallbacks race the bus's moves as they do for real.  Each
batch of decisions goes through the reference gate in the kernel's mode,
becomes telemetry samples and feedback with chosen per-arm efficiencies, and
the policy's decisions are applied.  Faults, operator pins, kernel events
and clock advances are interleaved.  The test keeps its own counts since the
last mode change, so the guards are checked against an independent tally
rather than the evidence object itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from kmlbus.contract import graph as mgraph
from kmlbus.contract import spec as kspec
from kmlbus.wire import codec
from modes.evidence import Evidence
from modes.machine import ModeError, ProxyModes, TransitionRecord
from modes.policy import Fault, Policy
from tests.support import gate as mgate

SPEC = kspec.load()
FB = codec.struct_dtype("feedback")
SAMPLE = codec.struct_dtype("sample")
GRAPH = mgraph.load()
STATES = GRAPH.states
REASONS = SPEC.enums["reason"].entries
BOUNDS = (1, 64)


class Clock:
    def __init__(self) -> None:
        self.t = 50.0

    def __call__(self) -> float:
        return self.t


def run_batch(mode: str, seq0: int, fresh: np.ndarray, draw: np.ndarray, share: int, explore: int,
              shadow: np.ndarray, eff_default: np.ndarray, eff_model: np.ndarray,
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gate a batch like the kernel would; return (arm, samples, feedback)."""
    n = fresh.size
    arm, flags = mgate.gate_batch(mode, fresh, share, explore, draw)
    seq = np.arange(seq0, seq0 + n, dtype=np.uint64)
    s = np.zeros(n, SAMPLE)
    s["seq"], s["mode"], s["arm"], s["flags"] = seq, STATES.index(mode), arm, flags
    s["shadow"] = np.where(flags & mgate.FLAG_HAS_SHADOW, shadow, 0)
    f = np.zeros(n, FB)
    f["seq"], f["arm"] = seq, arm
    f["efficiency"] = np.where(arm == mgate.ARM_MODEL, eff_model, eff_default)
    return arm, s, f


class Refused(Exception):
    """The test kernel refused a set-mode (the netlink layer would raise NetlinkError)."""


class ModeMachine(RuleBasedStateMachine):
    """Random evidence, faults, pins, kernel events and time against the invariants."""

    def __init__(self) -> None:
        super().__init__()
        self.clk = Clock()
        self.g = dataclasses.replace(
            GRAPH, guards=dataclasses.replace(GRAPH.guards, window=40, min_decisions=20))
        self.kmode = self.g.initial  # the kernel's mode
        self.events: list[tuple[str, str, str]] = []  # (old, new, reason) not yet delivered
        self.pm = ProxyModes("p", self.g, clock=self.clk, mirror=self.kernel_set_mode)
        self.ev = Evidence(self.pm, bounds=BOUNDS)
        self.pol = Policy(self.g, self.clk)
        self.seq = 1
        self.share = self.g.guards.collaboration_share
        self.explore = self.g.guards.exploration_share
        self.reset_tally()
        self.pm.subscribe(self.on_transition)
        self.seen = 0
        self.lost = False

    def kernel_set_mode(self, source: str, dest: str, reason: str) -> None:
        """The kernel's set-mode: checked from its own mode, announced if it changes."""
        if not self.g.is_allowed(self.kmode, dest):
            raise Refused(f"{self.kmode} -> {dest}")
        self.kernel_change(dest, reason)

    def kernel_change(self, dest: str, reason: str, force: bool = False) -> None:
        if dest != self.kmode or force:
            self.events.append((self.kmode, dest, reason))
        self.kmode = dest

    @property
    def synced(self) -> bool:
        return not self.events and self.kmode == self.pm.mode

    def reset_tally(self) -> None:
        self.tally = {"default": 0, "model": 0, "valid": 0}

    def on_transition(self, rec: TransitionRecord) -> None:
        # Independent checks of the guards at the moment of each policy move.
        n = self.g.guards.min_decisions
        event(f"{rec.origin} {rec.trigger}")
        if rec.origin == "policy":
            if rec.trigger == "promote":
                assert self.tally["model"] >= n and self.tally["default"] >= n, self.tally
            if rec.trigger == "mature":
                assert self.tally["valid"] >= n, self.tally
            if rec.trigger == "degrade":
                assert self.tally["model"] >= n, self.tally
            if rec.trigger == "recover":
                since = max(rec.evidence["checks"]["cooldown"]["quiet_s"], 0.0)
                assert since >= self.g.guards.cooldown_s
        self.reset_tally()

    @initialize(share=st.integers(0, 1000), explore=st.sampled_from([0, 0, 50, 500]))
    def params(self, share: int, explore: int) -> None:
        self.share, self.explore = share, explore

    @rule(rounds=st.integers(1, 8), n=st.integers(1, 60),
          model_mean=st.sampled_from([200, 550, 600, 900]), default_mean=st.sampled_from([300, 600]),
          fresh_frac=st.sampled_from([0.0, 0.5, 0.95, 1.0]), valid_frac=st.sampled_from([0.0, 0.7, 1.0]),
          seed=st.integers(0, 2**32 - 1))
    def decisions(self, rounds: int, n: int, model_mean: int, default_mean: int, fresh_frac: float,
                  valid_frac: float, seed: int) -> None:
        """Batches of decisions with the chosen per-arm efficiencies, each followed by a policy
        evaluation as the daemon does."""
        rng = np.random.default_rng(seed)
        for _ in range(rounds):
            self.batch(rng, n, model_mean, default_mean, fresh_frac, valid_frac)
            self.evaluate(True)
            self.clk.t += 0.02

    def batch(self, rng: np.random.Generator, n: int, model_mean: int, default_mean: int,
              fresh_frac: float, valid_frac: float) -> None:
        mode = self.kmode  # the kernel decides in its own mode
        fresh = rng.random(n) < fresh_frac
        draw = rng.integers(0, mgate.PERMILLE, n)
        shadow = np.where(rng.random(n) < valid_frac, 8, 500)
        eff_d = rng.normal(default_mean, 20, n).round()
        eff_m = rng.normal(model_mean, 20, n).round()
        arm, s, f = run_batch(mode, self.seq, fresh, draw, self.share, self.explore, shadow, eff_d, eff_m)
        self.seq += n
        model = arm == mgate.ARM_MODEL
        # the gate's mode semantics
        if mode == "emergency":
            assert not model.any()
        elif mode == "learning":
            assert np.array_equal(model, fresh & (draw < self.explore))
            assert np.array_equal(model, (s["flags"] & mgate.FLAG_EXPLORED) != 0)
            if self.explore == 0:
                assert not model.any()
        elif mode == "collaboration":
            assert np.array_equal(model, fresh & (draw < self.share))
        else:
            assert np.array_equal(model, fresh)
        self.ev.add_samples(s)
        self.ev.add_feedback(f)
        if mode == self.pm.mode:  # records of another mode are discarded by the evidence
            self.tally["model"] += int(model.sum())
            self.tally["default"] += int((~model).sum())
        if mode == "learning" and mode == self.pm.mode:
            self.tally["valid"] += int(np.count_nonzero(fresh & (shadow == 8)))

    @rule(healthy=st.booleans())
    def evaluate_now(self, healthy: bool) -> None:
        self.evaluate(healthy)

    def evaluate(self, healthy: bool) -> None:
        before, pinned = self.pm.mode, self.pm.pinned
        d = self.pol.evaluate(self.pm, self.ev, healthy=healthy)
        if pinned is not None:
            assert d is None
        if d is None:
            return
        assert d.source == before and self.g.is_allowed(before, d.target)
        if before == "emergency":
            assert healthy
        try:
            rec = self.pm.apply(d)
        except Refused:
            assert self.pm.mode == before  # the kernel moved meanwhile; the event will tell
            return
        assert rec is not None and self.pm.mode == d.target == self.kmode

    @rule(fault=st.sampled_from(list(Fault)))
    def fault(self, fault: Fault) -> None:
        d = self.pol.fault(self.pm, fault, "stateful", self.ev)
        if d is not None:
            self.pm.apply(d)  # the kernel takes emergency from any mode
        assert self.pm.mode == "emergency" == self.kmode or (d is None and self.pm.mode == "emergency")
        assert self.pm.last_fault_at == self.clk.t

    @precondition(lambda self: self.synced)
    @rule(mode=st.sampled_from(STATES))
    def pin(self, mode: str) -> None:
        self.pm.pin(mode)
        assert self.pm.mode == mode == self.kmode and self.pm.pinned == mode

    @rule()
    def unpin(self) -> None:
        self.pm.unpin()
        assert self.pm.pinned is None

    @precondition(lambda self: self.synced)
    @rule(mode=st.sampled_from(STATES))
    def operator_set(self, mode: str) -> None:
        if self.pm.pinned not in (None, mode):
            with pytest.raises(ModeError):
                self.pm.set_mode(mode)
        else:
            self.pm.set_mode(mode)
            assert self.pm.mode == mode == self.kmode

    @rule(data=st.data())
    def kernel_initiated(self, data: Any) -> None:
        """The kernel moves on its own: a fallback (bus gone, stale), or another process's set-mode."""
        fallback = data.draw(st.booleans(), label="fallback")
        if fallback:
            reason = data.draw(st.sampled_from(["bus-gone", "stale", "detach", "fault"]), label="reason")
            self.kernel_change("emergency", reason, force=True)
            return
        allowed = sorted(d for s, d in self.g.allowed if s == self.kmode and d != "emergency")
        if allowed:
            self.kernel_change(data.draw(st.sampled_from(allowed), label="mode"), "operator")

    @rule(k=st.integers(1, 4))
    def deliver_events(self, k: int) -> None:
        for old, new, reason in self.events[:k]:
            self.pm.sync_kernel(new, reason, old)
            if new == "emergency":
                assert self.pm.last_fault_at == self.clk.t
        del self.events[:k]
        if not self.events:
            assert self.pm.mode == self.kmode  # all told, the machine agrees with the kernel

    @rule()
    def overrun(self) -> None:
        """The socket overran: pending events are lost; the daemon reads the kernel's mode."""
        self.events.clear()
        self.lost = True
        self.pm.events_lost(self.kmode)
        assert self.pm.mode == self.kmode

    @precondition(lambda self: not self.events)  # the daemon keeps up with the events
    @rule(dt=st.floats(0.0, 3.0))
    def advance(self, dt: float) -> None:
        self.clk.t += dt

    @invariant()
    def pin_holds(self) -> None:
        # A pinned proxy is in its pinned mode, or was taken to emergency by a fault.
        assert self.pm.pinned is None or self.pm.mode in (self.pm.pinned, "emergency")
        assert self.pm.pin_broken == (self.pm.pinned not in (None, self.pm.mode))

    @invariant()
    def history_uses_only_graph_edges(self) -> None:
        hist = self.pm.history
        for r in hist[self.seen:] if self.seen <= len(hist) else hist:
            if r.trigger is None:
                assert self.lost and r.origin == "kernel"  # resync only after lost events
            else:
                assert (r.source, r.dest) in self.g.allowed
                assert r.trigger == self.g.trigger_for(r.source, r.dest)
        for a, b in zip(hist, hist[1:]):
            assert a.dest == b.source
        if hist:
            assert hist[-1].dest == self.pm.mode
        self.seen = len(hist)

    @invariant()
    def evidence_follows_the_mode(self) -> None:
        assert self.ev.mode == self.pm.mode


TestModeMachine = ModeMachine.TestCase
TestModeMachine.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


# -- replays of the sample workload (DESIGN.md) with full-size guards -------------------


def sample_workload(model: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(default efficiency, model efficiency, model value) for *n* decisions."""
    s = rng.random(64)
    k = rng.integers(0, 64, n)
    f0 = np.clip(s[k] + rng.normal(0, 0.05, n), 0, 1) * 1000
    wstar = 1 + np.round(63 * s[k])
    w_model = {"good": 1 + np.round(63 * f0 / 1000), "bad": np.full(n, 64.0)}[model]

    def eff(w: np.ndarray) -> np.ndarray:
        return np.round(1000 - 1000 * np.abs(w - wstar) / 64)

    return eff(np.full(n, 8.0)), eff(w_model), w_model


def replay(model: str, steps: int = 60, batch: int = 32) -> ProxyModes:
    clk = Clock()
    pm = ProxyModes("sample", GRAPH, clock=clk)
    ev = Evidence(pm, bounds=BOUNDS)
    pol = Policy(GRAPH, clk)
    rng = np.random.default_rng(7)
    seq = 1
    for _ in range(steps):
        for _ in range(20):
            clk.t += batch / 2000  # the sample proxy's default rate
            eff_d, eff_m, w = sample_workload(model, batch, rng)
            fresh = np.ones(batch, bool)
            draw = rng.integers(0, mgate.PERMILLE, batch)
            _, s, f = run_batch(pm.mode, seq, fresh, draw, GRAPH.guards.collaboration_share,
                                GRAPH.guards.exploration_share, w.astype(np.int32), eff_d, eff_m)
            seq += batch
            ev.add_samples(s)
            ev.add_feedback(f)
            d = pol.evaluate(pm, ev)
            if d is not None:
                pm.apply(d)
    return pm


def test_a_good_model_is_promoted_all_the_way_to_recommendation() -> None:
    pm = replay("good")
    assert [(r.source, r.dest) for r in pm.history] == [
        ("emergency", "learning"), ("learning", "collaboration"), ("collaboration", "recommendation")]
    assert pm.mode == "recommendation"
    promote = pm.history[-1].evidence
    assert promote["arms"]["model"]["count"] >= GRAPH.guards.min_decisions


def test_a_bad_model_is_shadowed_then_demoted_and_never_recommended() -> None:
    pm = replay("bad")
    moves = [(r.source, r.dest) for r in pm.history]
    assert ("collaboration", "learning") in moves
    assert all(dest != "recommendation" for _, dest in moves)
