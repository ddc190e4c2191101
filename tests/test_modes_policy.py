"""Evidence windows, the mode policy's rules, and the reference per-decision gate."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmlbus.contract import graph as mgraph
from kmlbus.contract import spec as kspec
from kmlbus.wire import codec
from modes.evidence import Evidence, Ring
from modes.machine import ProxyModes
from modes.policy import Decision, Fault, Policy
from tests.support import gate as mgate

SPEC = kspec.load()
FB = codec.struct_dtype("feedback")
SAMPLE = codec.struct_dtype("sample")
STATES = mgraph.load().states


def small_graph(**guards: float) -> mgraph.Graph:
    """The real graph with test-sized guards (window 40, min_decisions 20 unless given)."""
    g = mgraph.load()
    base: dict[str, Any] = {"window": 40, "min_decisions": 20}
    base.update(guards)
    return dataclasses.replace(g, guards=dataclasses.replace(g.guards, **base))


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Seq:
    """Decision sequence numbers shared by the samples and feedback of a test."""

    def __init__(self) -> None:
        self.next = 1

    def take(self, n: int) -> np.ndarray:
        s = np.arange(self.next, self.next + n, dtype=np.uint64)
        self.next += n
        return s


def feedback(seq: np.ndarray, arm: str, eff: float | np.ndarray) -> np.ndarray:
    a = np.zeros(seq.size, FB)
    a["seq"] = seq
    a["arm"] = SPEC.enums["arm"].value(arm)
    a["efficiency"] = eff
    return a


def samples(seq: np.ndarray, mode: str, shadow: np.ndarray | None = None) -> np.ndarray:
    """Samples in *mode*; where *shadow* is given, has-shadow with that value."""
    a = np.zeros(seq.size, SAMPLE)
    a["seq"] = seq
    a["mode"] = STATES.index(mode)
    if shadow is not None:
        a["shadow"] = shadow
        a["flags"] = SPEC.enums["sample-flags"].value("has-shadow")
    return a


def setup(mode: str, **guards: float) -> tuple[Clock, ProxyModes, Evidence, Policy, Seq]:
    clk = Clock()
    g = small_graph(**guards)
    pm = ProxyModes("p", g, initial=mode, clock=clk)
    return clk, pm, Evidence(pm, bounds=(1, 64)), Policy(g, clk), Seq()


# -- evidence -------------------------------------------------------------------------


def test_ring_keeps_the_latest_values_only() -> None:
    r = Ring(4)
    r.extend([1, 2, 3])
    assert len(r) == 3 and r.mean() == 2
    r.extend([4, 5])
    assert sorted(r.values()) == [2, 3, 4, 5]
    r.extend(np.arange(100))
    assert sorted(r.values()) == [96, 97, 98, 99]
    r.clear()
    assert len(r) == 0 and r.mean() is None


@given(st.lists(st.lists(st.integers(-1000, 1000), max_size=30), max_size=10), st.integers(1, 16))
def test_ring_matches_the_tail_of_everything_appended(batches: list[list[int]], size: int) -> None:
    r = Ring(size)
    everything: list[int] = []
    for b in batches:
        r.extend(b)
        everything += b
    assert sorted(r.values().tolist()) == sorted(everything[-size:]) if everything else len(r) == 0


def test_feedback_is_split_per_arm_in_sliding_windows() -> None:
    _, pm, ev, _, seq = setup("collaboration")
    ev.add_feedback(feedback(seq.take(30), "default", 500))
    ev.add_feedback(feedback(seq.take(50), "model", np.arange(50)))
    d, m = ev.arm("default"), ev.arm("model")
    assert (d.count, d.mean, d.total) == (30, 500, 30)
    assert (m.count, m.total) == (40, 50) and m.mean == pytest.approx(np.arange(10, 50).mean())


def test_windows_reset_on_a_mode_change_and_old_records_are_dropped() -> None:
    _, pm, ev, _, seq = setup("learning")
    s = seq.take(10)
    ev.add_samples(samples(s, "learning", np.full(10, 5)))
    pm.set_mode("collaboration")
    assert ev.maturity().decisions == 0 and ev.arm("default").count == 0
    # late feedback of learning decisions, then old- and new-mode samples in one batch
    assert ev.add_feedback(feedback(s, "default", 1)) == 0
    old, new = seq.take(3), seq.take(5)
    ev.add_samples(np.concatenate([samples(old, "learning"), samples(new, "collaboration")]))
    assert ev.add_feedback(feedback(old, "default", 1)) == 0
    assert ev.add_feedback(feedback(new, "model", 7)) == 5
    assert ev.discarded == 10 + 3 + 3 and ev.arm("model").count == 5


def test_reference_default_survives_collaboration_to_recommendation_only() -> None:
    _, pm, ev, _, seq = setup("collaboration")
    ev.add_feedback(feedback(seq.take(25), "default", 600))
    pm.set_mode("recommendation")
    assert ev.reference_default == 600 and ev.arm("default").count == 0
    pm.set_mode("learning")
    assert ev.reference_default is None


def test_maturity_counts_valid_shadows_over_the_window() -> None:
    _, pm, ev, _, seq = setup("learning")
    ev.add_samples(samples(seq.take(10), "learning"))  # no shadow: model did not answer in time
    ev.add_samples(samples(seq.take(25), "learning", np.full(25, 8)))
    ev.add_samples(samples(seq.take(5), "learning", np.full(5, 900)))  # out of bounds
    m = ev.maturity()
    assert (m.decisions, m.valid) == (40, 25) and m.quality == pytest.approx(25 / 40)
    assert m.estimated is None


def test_a_shadow_scorer_gives_the_estimated_shadow_efficiency() -> None:
    g = small_graph()
    pm = ProxyModes("p", g, initial="learning")
    ev = Evidence(pm, scorer=lambda recs: 1000.0 - recs["shadow"].astype(float))
    ev.add_samples(samples(np.arange(1, 11, dtype=np.uint64), "learning", np.arange(10)))
    assert ev.maturity().estimated == pytest.approx(1000 - 4.5)


def test_a_scorer_without_an_estimate_lowers_coverage_not_the_mean() -> None:
    g = small_graph()
    pm = ProxyModes("p", g, initial="learning")
    # no estimate (NaN) for odd shadows
    ev = Evidence(pm, scorer=lambda r: np.where(r["shadow"] % 2 == 1, np.nan, 800.0))
    ev.add_samples(samples(np.arange(1, 11, dtype=np.uint64), "learning", np.arange(10)))
    m = ev.maturity()
    assert (m.estimated, m.coverage, m.scored) == (800.0, 0.5, 5)


def test_the_scorer_runs_only_in_learning() -> None:
    calls: list[int] = []

    def scorer(r: np.ndarray) -> np.ndarray:
        calls.append(r.size)
        return np.full(r.size, 1.0)

    pm = ProxyModes("p", small_graph(), initial="collaboration")
    ev = Evidence(pm, scorer=scorer)
    ev.add_samples(samples(np.arange(1, 11, dtype=np.uint64), "collaboration", np.full(10, 8)))
    assert calls == [] and ev.maturity().scored == 0


def test_with_a_scorer_low_coverage_does_not_mature() -> None:
    clk = Clock()
    g = small_graph()
    pm = ProxyModes("p", g, initial="learning", clock=clk)
    pol = Policy(g, clk)
    g = small_graph(coverage=0.8)
    pm = ProxyModes("p", g, initial="learning", clock=clk)
    pol = Policy(g, clk)
    # a good estimate, but only for 3 shadows in 4 (< coverage 0.8)
    ev = Evidence(pm, scorer=lambda r: np.where(r["seq"] % 4 == 0, np.nan, 900.0))
    ev.add_samples(samples(np.arange(1, 41, dtype=np.uint64), "learning", np.full(40, 8)))
    ev.add_feedback(feedback(np.arange(1, 41, dtype=np.uint64), "default", 700))
    d = pol.evaluate(pm, ev)
    assert d is None
    assert ev.maturity().coverage == pytest.approx(0.75)
    ev2 = Evidence(pm, scorer=lambda r: np.full(r.size, 900.0))
    ev2.add_samples(samples(np.arange(1, 41, dtype=np.uint64), "learning", np.full(40, 8)))
    ev2.add_feedback(feedback(np.arange(1, 41, dtype=np.uint64), "default", 700))
    assert pol.evaluate(pm, ev2) is not None


# -- policy -------------------------------------------------------------------------------


def test_emergency_recovers_to_learning_after_the_cooldown_when_healthy() -> None:
    clk, pm, ev, pol, _ = setup("emergency")
    cd = pm.graph.guards.cooldown_s
    clk.t += cd * 0.9
    assert pol.evaluate(pm, ev) is None
    clk.t += cd * 0.2
    assert pol.evaluate(pm, ev, healthy=False) is None
    d = pol.evaluate(pm, ev)
    assert d is not None and (d.target, d.trigger, d.reason) == ("learning", "recover", "recovery")
    assert pol.fault(pm, Fault.MODEL_ERROR, "onnx raised") is None  # already in emergency...
    assert pol.evaluate(pm, ev) is None  # ...but the cool-down restarts
    clk.t += cd
    assert pol.evaluate(pm, ev) is not None


def test_learning_matures_with_enough_valid_shadows() -> None:
    _, pm, ev, pol, seq = setup("learning", maturity=0.8)
    ev.add_samples(samples(seq.take(19), "learning", np.full(19, 8)))
    assert pol.evaluate(pm, ev) is None  # quality 1.0 but 19 < min_decisions
    ev.add_samples(samples(seq.take(9), "learning"))  # 19/28 < 0.8
    assert pol.evaluate(pm, ev) is None
    ev.add_samples(samples(seq.take(30), "learning", np.full(30, 8)))
    assert pol.evaluate(pm, ev) is None  # window of 40 holds 9 invalid: 31/40 < 0.8
    ev.add_samples(samples(seq.take(2), "learning", np.full(2, 8)))
    d = pol.evaluate(pm, ev)
    assert d is not None and (d.target, d.trigger) == ("collaboration", "mature")
    assert d.evidence["checks"]["maturity"]["met"] is True


def test_with_a_scorer_a_worse_shadow_does_not_mature() -> None:
    clk = Clock()
    g = small_graph()
    pm = ProxyModes("p", g, initial="learning", clock=clk)
    pol = Policy(g, clk)
    ev = Evidence(pm, scorer=lambda r: np.full(r.size, 400.0))
    ev.add_samples(samples(np.arange(1, 41, dtype=np.uint64), "learning", np.full(40, 8)))
    ev.add_feedback(feedback(np.arange(1, 41, dtype=np.uint64), "default", 700))
    assert pol.evaluate(pm, ev) is None
    ev2 = Evidence(pm, scorer=lambda r: np.full(r.size, 690.0))
    ev2.add_samples(samples(np.arange(1, 41, dtype=np.uint64), "learning", np.full(40, 8)))
    ev2.add_feedback(feedback(np.arange(1, 41, dtype=np.uint64), "default", 700))
    assert pol.evaluate(pm, ev2) is not None


def test_explored_decisions_worse_than_the_default_block_maturity() -> None:
    _, pm, ev, pol, seq = setup("learning", maturity=0.8)
    s = seq.take(40)
    ev.add_samples(samples(s, "learning", np.full(40, 8)))  # valid shadows: quality 1.0
    ev.add_feedback(feedback(s[:20], "default", 700))
    ev.add_feedback(feedback(s[20:], "model", 600))  # explored: 600 < 700 - 5%
    d = pol.evaluate(pm, ev)
    assert d is None
    check = pol.report(pm, ev)["checks"]["maturity"]
    assert check["explored_mean"] == 600 and check["met"] is False
    s2 = seq.take(20)
    ev.add_samples(samples(s2, "learning", np.full(20, 8)))
    ev.add_feedback(feedback(s2, "model", 800))  # window of 40: 20 x 600 + 20 x 800 = 700
    d = pol.evaluate(pm, ev)
    assert d is not None and d.target == "collaboration"


def test_collaboration_promotes_only_with_margin_and_min_decisions() -> None:
    _, pm, ev, pol, seq = setup("collaboration", promotion_margin=0.05)
    ev.add_feedback(feedback(seq.take(40), "default", 600))
    ev.add_feedback(feedback(seq.take(19), "model", 900))
    assert pol.evaluate(pm, ev) is None  # 19 model decisions < 20
    ev.add_feedback(feedback(seq.take(1), "model", 900))
    d = pol.evaluate(pm, ev)
    assert d is not None and (d.target, d.trigger, d.reason) == ("recommendation", "promote", "promotion")


def test_collaboration_holds_inside_the_margins() -> None:
    _, pm, ev, pol, seq = setup("collaboration", promotion_margin=0.05, demotion_margin=0.05)
    ev.add_feedback(feedback(seq.take(40), "default", 600))
    ev.add_feedback(feedback(seq.take(40), "model", 629))  # < 630
    assert pol.evaluate(pm, ev) is None
    ev.add_feedback(feedback(seq.take(40), "model", 571))  # >= 570
    assert pol.evaluate(pm, ev) is None


def test_collaboration_degrades_when_the_model_falls_behind() -> None:
    _, pm, ev, pol, seq = setup("collaboration")
    ev.add_feedback(feedback(seq.take(40), "default", 600))
    ev.add_feedback(feedback(seq.take(40), "model", 300))
    d = pol.evaluate(pm, ev)
    assert d is not None and (d.target, d.trigger, d.reason) == ("learning", "degrade", "demotion")


def test_recommendation_demotes_against_the_collaboration_reference() -> None:
    _, pm, ev, pol, seq = setup("collaboration")
    ev.add_feedback(feedback(seq.take(40), "default", 600))
    ev.add_feedback(feedback(seq.take(40), "model", 900))
    d = pol.evaluate(pm, ev)
    assert d is not None and pm.apply(d) is not None and pm.mode == "recommendation"
    ev.add_feedback(feedback(seq.take(40), "model", 580))  # >= 570: holds
    assert pol.evaluate(pm, ev) is None
    ev.add_feedback(feedback(seq.take(40), "model", 500))
    d = pol.evaluate(pm, ev)
    assert d is not None and d.target == "learning"
    assert d.evidence["checks"]["demotion"]["reference_default"] == 600


def test_recommendation_without_reference_does_not_demote_on_too_little_default() -> None:
    _, pm, ev, pol, seq = setup("recommendation")
    ev.add_feedback(feedback(seq.take(40), "model", 1))
    ev.add_feedback(feedback(seq.take(5), "default", 900))
    assert pol.evaluate(pm, ev) is None
    ev.add_feedback(feedback(seq.take(20), "default", 900))
    assert pol.evaluate(pm, ev) is not None


@pytest.mark.parametrize("mode", [m for m in STATES if m != "emergency"])
@pytest.mark.parametrize("fault", list(Fault))
def test_every_fault_sends_every_mode_to_emergency(mode: str, fault: Fault) -> None:
    _, pm, ev, pol, _ = setup(mode)
    pm.pin(mode)
    d = pol.fault(pm, fault, "why", ev)
    assert d is not None and d.is_fault and d.target == "emergency" and d.reason == fault.reason
    assert pm.apply(d) is not None and pm.mode == "emergency"


def test_latency_beyond_the_budget_is_a_fault() -> None:
    _, pm, ev, pol, _ = setup("recommendation")
    budget = pm.graph.guards.latency_budget_ms
    assert pol.observe_latency(pm, budget) is None
    d = pol.observe_latency(pm, budget + 1)
    assert d is not None and d.target == "emergency" and "latency" in d.detail


def test_a_pinned_proxy_gets_no_automatic_decision() -> None:
    _, pm, ev, pol, seq = setup("collaboration")
    pm.pin("collaboration")
    ev.add_feedback(feedback(seq.take(40), "default", 100))
    ev.add_feedback(feedback(seq.take(40), "model", 900))
    assert pol.evaluate(pm, ev) is None


@pytest.mark.parametrize("mode", STATES)
def test_decisions_and_reports_are_json_ready(mode: str) -> None:
    _, pm, ev, pol, _ = setup(mode)
    json.dumps(pol.report(pm, ev))
    json.dumps(Decision("a", "b", "t", "none", "x", evidence=pol.report(pm, ev)).as_dict())


def test_duties_cover_every_mode_and_emergency_sends_nothing() -> None:
    g = mgraph.load()
    assert set(g.duties) == set(STATES)
    assert not g.duty("emergency").recommend
    assert all(g.duty(m).recommend for m in STATES if m != "emergency")
    assert [m for m in STATES if g.duty(m).explore] == ["learning"]
    assert [m for m in STATES if g.duty(m).split] == ["collaboration"]


def test_each_move_is_announced_with_its_edges_reason() -> None:
    g = mgraph.load()
    reasons = {(s, t.dest): t.reason for t in g.transitions for s in t.sources}
    assert reasons[("learning", "collaboration")] == reasons[("collaboration", "recommendation")] \
        == "promotion"
    assert reasons[("recommendation", "learning")] == reasons[("collaboration", "learning")] == "demotion"
    assert reasons[("emergency", "learning")] == "recovery"


def test_a_graph_edge_without_a_spec_reason_is_refused(tmp_path: Path) -> None:
    text = mgraph.GRAPH_PATH.read_text().replace("reason: recovery", "reason: comeback")
    (tmp_path / "g.yaml").write_text(text)
    with pytest.raises(mgraph.GraphError, match="transition recover: reason 'comeback' is not in"):
        mgraph.load(tmp_path / "g.yaml")


def test_a_state_with_an_unknown_duty_is_refused(tmp_path: Path) -> None:
    text = mgraph.GRAPH_PATH.read_text().replace("learn: false,", "learn: false, sing: true,")
    (tmp_path / "g.yaml").write_text(text)
    with pytest.raises(mgraph.GraphError, match="state recommendation: .*sing"):
        mgraph.load(tmp_path / "g.yaml")


def test_fault_and_move_reasons_are_spec_reason_entries() -> None:
    reasons = SPEC.enums["reason"].entries
    assert all(f.reason in reasons for f in Fault)
    Policy()  # checks its move reasons and edges against spec and graph


# -- gate -------------------------------------------------------------------------------------

A_D, A_M = mgate.ARM_DEFAULT, mgate.ARM_MODEL
SH, EX, CL = mgate.FLAG_HAS_SHADOW, mgate.FLAG_EXPLORED, mgate.FLAG_CLAMPED


@pytest.mark.parametrize("mode,fresh,draw,arm,flags,fate", [
    ("emergency", True, 0, A_D, SH, "ignored"),
    ("emergency", False, 0, A_D, 0, "none"),
    ("learning", True, 999, A_D, SH, "shadowed"),
    ("learning", True, 0, A_M, SH | EX, "applied"),  # explore=100
    ("learning", False, 0, A_D, 0, "none"),
    ("collaboration", True, 499, A_M, SH, "applied"),  # share=500
    ("collaboration", True, 500, A_D, SH, "shadowed"),
    ("collaboration", False, 0, A_D, 0, "none"),
    ("recommendation", True, 999, A_M, SH, "applied"),
    ("recommendation", False, 0, A_D, 0, "none"),
])
def test_gate_follows_the_mode_semantics(mode: str, fresh: bool, draw: int, arm: int,
                                         flags: int, fate: str) -> None:
    assert mgate.gate(mode, fresh, 500, 100, draw) == mgate.GateResult(arm, flags, fate)  # type: ignore[arg-type]


def test_gate_marks_a_clamped_fresh_value_in_every_mode() -> None:
    assert mgate.clamp(90, 1, 64) == (64, True) and mgate.clamp(8, 1, 64) == (8, False)
    for mode in STATES:
        assert mgate.gate(mode, True, 0, 0, 5, clamped=True).flags & CL
    assert mgate.gate("recommendation", False, 0, 0, 5, clamped=True).flags == 0


def test_gate_rejects_out_of_range_inputs() -> None:
    with pytest.raises(ValueError, match="share"):
        mgate.gate("collaboration", True, 1001, 0, 0)
    with pytest.raises(ValueError, match="draw"):
        mgate.gate("collaboration", True, 10, 0, 1000)
    with pytest.raises(ValueError, match="unknown mode"):
        mgate.gate("turbo", True, 10, 0, 0)


@settings(max_examples=200)
@given(st.sampled_from(STATES), st.integers(0, 1000), st.integers(0, 1000),
       st.lists(st.tuples(st.booleans(), st.integers(0, 999), st.booleans()), max_size=50))
def test_gate_batch_agrees_with_the_scalar_gate(mode: str, share: int, explore: int,
                                                 calls: list[tuple[bool, int, bool]]) -> None:
    fresh = np.array([c[0] for c in calls], bool)
    draw = np.array([c[1] for c in calls], np.int64)
    clamped = np.array([c[2] for c in calls], bool)
    arm, flags = mgate.gate_batch(mode, fresh, share, explore, draw, clamped)
    for i, (f, d, c) in enumerate(calls):
        r = mgate.gate(mode, f, share, explore, d, c)
        assert (arm[i], flags[i]) == (r.arm, r.flags)


@pytest.mark.parametrize("share", [0, 1, 100, 500, 937, 1000])
def test_gate_honours_the_collaboration_share_statistically(share: int) -> None:
    n = 200_000
    rng = np.random.default_rng(share)
    draw = rng.integers(0, mgate.PERMILLE, n)
    fresh = rng.random(n) < 0.9
    arm, _ = mgate.gate_batch("collaboration", fresh, share, 0, draw)
    got = np.count_nonzero(arm == A_M) / np.count_nonzero(fresh)
    p = share / mgate.PERMILLE
    tol = 5 * math.sqrt(p * (1 - p) / np.count_nonzero(fresh)) + 1e-12  # 5 sigma
    assert abs(got - p) <= tol
    assert not np.any((arm == A_M) & ~fresh)


def test_status_shows_mode_time_reason_and_evidence_against_thresholds() -> None:
    clk, pm, ev, pol, seq = setup("collaboration")
    ev.add_feedback(feedback(seq.take(40), "default", 600))
    ev.add_feedback(feedback(seq.take(10), "model", 900))
    clk.t += 2.5
    st_ = pol.status(pm, ev)
    json.dumps(st_)
    assert st_["mode"] == "collaboration" and st_["in_mode_s"] == 2.5
    promo = st_["now"]["checks"]["promotion"]
    assert promo["met"] is False and promo["threshold"] == pytest.approx(630)
    assert promo["counts"] == {"model": 10, "default": 40} and promo["min_decisions"] == 20
    assert st_["now"]["arms"]["default"]["mean"] == 600 and st_["duty"]["recommend"] is True
