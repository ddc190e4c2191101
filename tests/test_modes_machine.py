"""The per-proxy mode machine: built from the graph, pins, kernel sync, history, typing."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kmlbus.contract import graph as mgraph
from modes.machine import (
    ECHO_TIMEOUT_S,
    ModeError,
    ProxyModes,
    TransitionRecord,
    shortest_path,
)

ROOT = Path(__file__).resolve().parent.parent


class FakeClock:
    """A settable clock (seconds)."""

    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass(frozen=True)
class Req:
    """A minimal decision (what ``ProxyModes.apply`` reads)."""

    source: str
    target: str
    reason: str = "promotion"
    detail: str = "test"
    is_fault: bool = False
    evidence: dict[str, Any] = field(default_factory=dict)


def test_machine_states_and_triggers_come_from_the_graph() -> None:
    g = mgraph.load()
    p = ProxyModes("p", g)
    assert list(p._machine.states) == list(g.states)
    assert set(p._machine.events) == {t.trigger for t in g.transitions}
    edges = {(s, d) for ev in p._machine.events.values()
             for s, ts in ev.transitions.items() for d in (t.dest for t in ts)}
    assert edges == set(g.allowed)


def test_starts_in_the_graph_initial_mode_or_the_kernel_mode_given() -> None:
    assert ProxyModes("p").mode == mgraph.load().initial
    assert ProxyModes("p", initial="collaboration").mode == "collaboration"
    with pytest.raises(ModeError, match="unknown mode"):
        ProxyModes("p", initial="turbo")


def test_every_allowed_edge_is_applied_and_recorded_with_its_trigger() -> None:
    g = mgraph.load()
    for src, dst in sorted(g.allowed):
        p = ProxyModes("p", g, initial=src)
        rec = p.apply(Req(src, dst, evidence={"x": 1}))
        assert rec is not None and (rec.source, rec.dest) == (src, dst)
        assert rec.trigger == g.trigger_for(src, dst)
        assert p.mode == dst and p.evidence == {"x": 1} and p.epoch == 1
        assert rec.mirror and rec.origin == "policy"


def test_apply_ignores_a_decision_whose_source_is_no_longer_current() -> None:
    p = ProxyModes("p", initial="learning")
    assert p.apply(Req("collaboration", "recommendation")) is None
    assert p.apply(Req("learning", "learning")) is None
    assert p.mode == "learning" and p.history == []


def test_apply_refuses_an_edge_the_graph_does_not_have() -> None:
    p = ProxyModes("p", initial="learning")
    with pytest.raises(ModeError, match="no move learning -> recommendation"):
        p.apply(Req("learning", "recommendation"))
    assert p.mode == "learning"


def test_entered_at_and_time_in_mode_use_the_injected_clock() -> None:
    clk = FakeClock()
    p = ProxyModes("p", clock=clk)
    clk.t += 3.5
    assert p.time_in_mode() == pytest.approx(3.5)
    p.set_mode("learning")
    assert p.entered_at == clk.t and p.time_in_mode() == 0.0


def test_set_mode_walks_the_shortest_path_of_allowed_edges() -> None:
    g = mgraph.load()
    p = ProxyModes("p")
    recs = p.set_mode("recommendation")
    assert [(r.source, r.dest) for r in recs] == [
        ("emergency", "learning"), ("learning", "collaboration"), ("collaboration", "recommendation")]
    assert all(g.is_allowed(r.source, r.dest) and r.origin == "operator" and r.reason == "operator"
               for r in recs)
    assert shortest_path(g, "recommendation", "recommendation") == []


def test_pin_suspends_automatic_moves_until_unpin() -> None:
    p = ProxyModes("p")
    p.pin("collaboration")
    assert p.mode == "collaboration" and p.pinned == "collaboration"
    assert p.apply(Req("collaboration", "recommendation")) is None
    assert p.mode == "collaboration"
    assert p.unpin() == "collaboration" and p.pinned is None
    assert p.apply(Req("collaboration", "recommendation")) is not None


def test_operator_set_mode_is_refused_while_pinned_elsewhere() -> None:
    p = ProxyModes("p")
    p.pin("learning")
    with pytest.raises(ModeError, match="pinned to learning"):
        p.set_mode("collaboration")
    p.pin("collaboration")  # re-pinning is how the operator moves a pinned proxy
    assert p.mode == "collaboration"


def test_a_fault_goes_through_a_pin_which_then_holds_emergency() -> None:
    p = ProxyModes("p")
    p.pin("recommendation")
    rec = p.apply(Req("recommendation", "emergency", reason="fault", is_fault=True))
    assert rec is not None and rec.origin == "fault"
    assert p.mode == "emergency" and p.pinned == "recommendation" and p.pin_broken
    assert p.apply(Req("emergency", "learning", reason="recovery")) is None  # no automatic recovery
    p.pin("recommendation")  # the operator re-asserts the pin
    assert p.mode == "recommendation" and not p.pin_broken


def test_a_pin_to_emergency_survives_faults() -> None:
    p = ProxyModes("p", initial="learning")
    p.pin("emergency")
    assert p.apply(Req("emergency", "emergency", is_fault=True)) is None
    assert p.pinned == "emergency"


def test_kernel_changes_flow_back_without_being_mirrored() -> None:
    sent: list[TransitionRecord] = []
    p = ProxyModes("p", initial="collaboration")
    p.subscribe(lambda r: sent.append(r) if r.mirror else None)
    rec = p.sync_kernel("emergency", "bus-gone")
    assert rec is not None and rec.origin == "kernel" and not rec.mirror
    assert rec.trigger == "fault" and p.mode == "emergency" and p.reason == "bus-gone"
    assert p.last_fault_at is not None
    assert sent == []
    assert p.sync_kernel("emergency", "bus-gone") is None


def test_kernel_mode_without_an_edge_resynchronises_the_machine() -> None:
    p = ProxyModes("p", initial="recommendation")
    rec = p.sync_kernel("collaboration", "operator")  # events were lost
    assert rec is not None and rec.trigger is None and p.mode == "collaboration"
    assert p.apply(Req("collaboration", "recommendation")) is not None  # machine works on


def echo(p: ProxyModes, recs: list[TransitionRecord]) -> None:
    """Deliver the kernel's mode-events for our mirrored moves."""
    for r in recs:
        assert p.sync_kernel(r.dest, r.reason, r.source) is None


def test_kernel_fallback_keeps_the_pin_other_kernel_moves_clear_it() -> None:
    p = ProxyModes("p")
    echo(p, p.pin("learning"))
    p.sync_kernel("emergency", "bus-gone", "learning")
    assert p.pinned == "learning" and p.pin_broken
    echo(p, p.pin("collaboration"))
    p.sync_kernel("learning", "operator", "collaboration")  # someone else set the mode
    assert p.pinned is None and p.mode == "learning"


def test_kernel_echoes_of_mirrored_moves_are_ignored_even_late() -> None:
    p = ProxyModes("p")
    recs = p.pin("recommendation")  # three mirrored moves; the echoes arrive afterwards
    assert p.unacknowledged == 3
    echo(p, recs)
    assert p.mode == "recommendation" and p.pinned == "recommendation"
    assert len(p.history) == 3 and p.unacknowledged == 0


def test_kernel_events_older_than_our_move_are_superseded() -> None:
    p = ProxyModes("p", initial="collaboration")
    p.apply(Req("collaboration", "learning", reason="demotion"))
    # The kernel fell to emergency just before our set-mode, which it then took
    # from emergency: its events say collaboration -> emergency -> learning.
    assert p.sync_kernel("emergency", "stale", "collaboration") is None
    assert p.last_fault_at is not None
    assert p.sync_kernel("learning", "demotion", "emergency") is None
    assert p.mode == "learning" and p.unacknowledged == 0
    rec = p.sync_kernel("emergency", "stale", "learning")  # a genuine, later fallback
    assert rec is not None and p.mode == "emergency"


def test_a_kernel_that_was_already_there_acknowledges_without_an_echo() -> None:
    p = ProxyModes("p", initial="learning")
    p.apply(Req("learning", "emergency", reason="fault", is_fault=True))
    # the kernel had fallen already: our set-mode changed nothing and sent no event
    assert p.sync_kernel("emergency", "bus-gone", "learning") is None
    assert p.unacknowledged == 0


def test_a_lost_echo_stops_masking_events_after_the_timeout() -> None:
    clk = FakeClock()
    p = ProxyModes("p", initial="learning", clock=clk)
    p.apply(Req("learning", "collaboration"))
    clk.t += ECHO_TIMEOUT_S + 0.1
    rec = p.sync_kernel("emergency", "stale", "collaboration")
    assert rec is not None and p.mode == "emergency"


def test_mirror_is_called_before_each_move_and_a_refusal_prevents_it() -> None:
    sent: list[tuple[str, str, str]] = []

    def mirror(src: str, dst: str, reason: str) -> None:
        if dst == "recommendation":
            raise OSError("kernel refused")
        sent.append((src, dst, reason))

    p = ProxyModes("p", mirror=mirror)
    with pytest.raises(OSError):
        p.pin("recommendation")
    assert sent == [("emergency", "learning", "operator"), ("learning", "collaboration", "operator")]
    assert p.mode == "collaboration" and p.pinned is None
    p.sync_kernel("emergency", "bus-gone")
    assert len(sent) == 2  # kernel changes are never sent back


def test_listeners_see_every_transition_in_order() -> None:
    seen: list[tuple[str, str]] = []
    p = ProxyModes("p")
    p.subscribe(lambda r: seen.append((r.source, r.dest)))
    echo(p, p.set_mode("collaboration"))
    p.sync_kernel("emergency", "stale", "collaboration")
    assert seen == [("emergency", "learning"), ("learning", "collaboration"), ("collaboration", "emergency")]
    assert [(r.source, r.dest) for r in p.history] == seen


def test_history_is_bounded() -> None:
    p = ProxyModes("p", initial="learning", history_len=3)
    for _ in range(5):
        p.apply(Req("learning", "collaboration"))
        p.apply(Req("collaboration", "learning"))
    assert len(p.history) == 3 and p.epoch == 10


def test_every_transition_is_logged_with_reason_and_evidence(caplog: pytest.LogCaptureFixture) -> None:
    """At DEBUG, with the whole evidence (the daemon logs each move in one line at INFO)."""
    p = ProxyModes("sample", initial="learning")
    with caplog.at_level(logging.DEBUG, logger="modes.machine"):
        p.apply(Req("learning", "collaboration", reason="promotion", detail="quality 0.9",
                    evidence={"quality": 0.9}))
    msg = "\n".join(r.getMessage() for r in caplog.records if r.name == "modes.machine")
    assert "learning -> collaboration" in msg and "promotion" in msg
    assert "quality 0.9" in msg and "'quality': 0.9" in msg


def test_status_and_records_are_json_ready() -> None:
    p = ProxyModes("p")
    recs = p.set_mode("learning")
    json.dumps(p.status())
    json.dumps([r.as_dict() for r in recs])
    assert p.status()["mode"] == "learning"


@pytest.mark.skipif(shutil.which("mypy") is None and not any(
    (Path(d) / "mypy").exists() for d in sys.path), reason="mypy is not installed")
def test_modes_package_is_clean_under_mypy_strict() -> None:
    # follow-imports=silent: judge modes/ only, not the modules it imports.
    res = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "modes/"],
        cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_after_lost_events_the_machine_follows_the_kernel_mode_read_back() -> None:
    p = ProxyModes("p", initial="learning")
    p.apply(Req("learning", "collaboration"))  # its echo, and more, were lost
    rec = p.events_lost("emergency")
    assert rec is not None and p.mode == "emergency" and p.unacknowledged == 0
    assert p.events_lost("emergency") is None
