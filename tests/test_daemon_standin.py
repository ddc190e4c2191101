"""The bus daemon (kmlbus.bus.daemon.Bus) driven against the user-space stand-in of the family.

``Bus(cfg, clock=k.clock.now, opener=k.open)`` runs the real daemon code
(policy, mode machine, dispatcher, ONNX models, reconnects) against
:mod:`tests.support.standin` in simulated time, so what takes minutes in the VM
takes a second here.  These tests prove the daemon's logic; that the kernel
behaves like the stand-in is what tests/vm proves (test_bus_daemon.py and
test_modes_live.py check the same stories against the real module).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kmlbus.bus import fastlane, models
from kmlbus.bus.config import loads
from kmlbus.bus.daemon import Bus, Link, Opener
from kmlbus.contract import graph as mgraph
from kmlbus.contract import spec as kspec
from kmlbus.wire import codec
from tests.support.standin import SampleWorkload, StandinKernel, StandinLink

SPEC = kspec.load()
MODE = SPEC.enums["mode"]
REASON = SPEC.enums["reason"]
ARM = SPEC.enums["arm"]
CLIMB = [("emergency", "learning", "recovery"), ("learning", "collaboration", "promotion"),
         ("collaboration", "recommendation", "promotion")]


def raising_model() -> onnx.ModelProto:
    """Passes the registry's checks (a probe of zeros) but fails on real features:
    it gathers column ``int(100 * max(features))``, out of bounds once seq_ratio > 0.02."""
    i = models.INPUT_NAME
    graph = helper.make_graph(
        [helper.make_node("ReduceMax", [i], ["m"], axes=[0, 1], keepdims=0),
         helper.make_node("Mul", ["m", "hundred"], ["m100"]),
         helper.make_node("Cast", ["m100"], ["mi"], to=TensorProto.INT64),
         helper.make_node("Reshape", ["mi", "one"], ["idx"]),
         helper.make_node("Gather", [i, "idx"], [models.OUTPUT_NAME], axis=1)],
        "kmlbus_raises",
        [helper.make_tensor_value_info(i, TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info(models.OUTPUT_NAME, TensorProto.FLOAT, ["N", 1])],
        initializer=[numpy_helper.from_array(np.array(100.0, dtype=np.float32), "hundred"),
                     numpy_helper.from_array(np.array([1], dtype=np.int64), "one")],
    )
    return models._finish(graph, "raises at inference on real features")


@dataclass
class Rig:
    """A stand-in kernel, the daemon attached to it, and an observer link on both groups."""

    k: StandinKernel
    bus: Bus
    model: Path
    watch: StandinLink
    msgs: list[codec.Message] = field(default_factory=list)

    def step(self) -> None:
        self.bus.step()
        self.msgs += self.watch.recv(timeout=0)

    def run(self, seconds: float, until: Callable[[], bool] | None = None) -> bool:
        """Step the daemon for up to *seconds* of simulated time, or until *until()*."""
        end = self.k.clock.now() + seconds
        while self.k.clock.now() < end:
            self.step()
            if until is not None and until():
                return True
        return until is None

    def events(self) -> list[tuple[str, str, str]]:
        return [(MODE.name_of(m.attrs["old-mode"]), MODE.name_of(m.attrs["mode"]),
                 REASON.name_of(m.attrs["reason"])) for m in self.msgs if m.op == "mode-event"]

    def kmode(self) -> str:
        return self.k.find("sample").mode_name

    def at(self, mode: str) -> Callable[[], bool]:
        return lambda: self.kmode() == mode

    def swap_model(self, model: onnx.ModelProto) -> None:
        models.save(model, self.model)  # temp file + rename: the registry sees a new file

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        tel = [m.attrs["records"] for m in self.msgs if m.op == "telemetry"]
        fb = [m.attrs["feedback"] for m in self.msgs if m.op == "feedback"]
        return np.concatenate(tel), np.concatenate(fb)


class DecodedOnlyBus(Bus):
    """The reference the fast lane is held to: every batch decoded before it is answered."""

    def receive(self, timeout: float) -> None:
        assert self.conn is not None
        self.handle_all(self.conn.recv(timeout=timeout))


def make_rig(tmp_path: Path, model: onnx.ModelProto | bytes, names: tuple[str, ...] = ("sample",),
             bus_class: type[Bus] = Bus) -> Rig:
    path = tmp_path / "model.onnx"
    if isinstance(model, bytes):
        path.write_bytes(model)
    else:
        models.save(model, path)
    # as tests/vm/busproc.py writes it for the VM tests
    cfg = loads("[bus]\nttl_ms = 300\nlatency_budget_ms = 500\n"
                + "".join(f'\n[proxy.{n}]\nmodel = "model.onnx"\n' for n in names), tmp_path / "bus.toml")
    k = StandinKernel(seed=1)
    bus = bus_class(cfg, clock=k.clock.now, opener=k.open, state_path=tmp_path / "state.json")
    rig = Rig(k, bus, path, k.open(("telemetry", "events")))
    assert bus.connect()
    return rig


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the pins file lives beside the state file: keep both out of /run
    monkeypatch.setenv("KMLBUS_STATE", str(tmp_path / "state.json"))


@pytest.fixture
def good(tmp_path: Path) -> Iterator[Rig]:
    rig = make_rig(tmp_path, models.sample_good_model())
    yield rig
    rig.bus.shutdown()


def attached_to(rig: Rig) -> int:
    return int(rig.watch.proxy("sample")["bus-portid"])


def test_the_stand_in_offers_everything_the_daemon_uses_of_a_link() -> None:
    k = StandinKernel()
    opener: Opener = k.open  # mypy checks the signatures against the Link protocol
    link: Link = opener(("events",))
    members = {n for n in dir(Link) if not n.startswith("_")} | set(Link.__annotations__)
    missing = sorted(n for n in members if not hasattr(link, n))
    assert not missing, f"kmlbus.bus.daemon.Link grew {missing}: add them to tests/support/standin.py"
    link.close()


# ---- the climb and the demotion ------------------------------------------------------------

def test_good_model_climbs_to_recommendation_and_beats_the_default(good: Rig) -> None:
    assert attached_to(good) == good.bus.ctl.portid != 0  # type: ignore[union-attr]
    assert good.run(30, good.at("recommendation")), good.events()
    assert good.events() == CLIMB
    g = mgraph.load()
    assert all(g.is_allowed(a, b) for a, b, _ in good.events())
    good.run(2.0)
    assert good.kmode() == "recommendation"
    tel, fb = good.arrays()
    assert np.array_equal(tel["seq"][:len(fb)], fb["seq"][:len(tel)])
    model = fb["arm"] == ARM.value("model")
    default = fb["arm"] == ARM.value("default")
    assert model.sum() > 3000 and default.sum() > 3000
    m, d = fb["efficiency"][model].mean(), fb["efficiency"][default].mean()
    assert m > 1.3 * d, (m, d)
    cnt = good.watch.proxy("sample")["counters"]
    assert cnt["recs-applied"] == cnt["decisions-model"] > 3000
    assert good.bus.stats["send_errors"] == good.bus.stats["refused_moves"] == 0


def test_bad_model_swapped_in_while_in_recommendation_is_demoted(good: Rig) -> None:
    assert good.run(30, good.at("recommendation"))
    good.swap_model(models.sample_bad_model())
    assert good.run(30, lambda: good.kmode() != "recommendation"), good.events()
    assert good.events()[-1] == ("recommendation", "learning", "demotion")


def test_a_demoted_model_is_not_promoted_back_to_recommendation(good: Rig) -> None:
    assert good.run(30, good.at("recommendation"))
    good.swap_model(models.sample_bad_model())
    assert good.run(30, lambda: good.kmode() != "recommendation")
    n = len(good.events())
    good.run(20, good.at("recommendation"))
    assert all(e[1] != "recommendation" for e in good.events()[n:]), good.events()[n:]


# ---- the fast lane -------------------------------------------------------------------------

def test_the_fast_lane_answers_idle_telemetry_once_and_as_the_decoded_path_would(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Telemetry that ends an idle wait is answered from its bytes (fastlane.answer) before
    it is decoded; handle_all then only does its bookkeeping.  Against a twin bus that
    takes every batch the decoded way, on identical stand-in kernels: the same climb, the
    same recommendations applied, one inference per batch."""
    answered: list[bool] = []
    lane = fastlane.answer

    def counting(data: bytes, family_id: int, proxies: Any) -> bool:
        answered.append(lane(data, family_id, proxies))
        return answered[-1]

    monkeypatch.setattr(fastlane, "answer", counting)
    fast, plain = make_rig(tmp_path / "a", models.sample_good_model()), None
    try:
        plain = make_rig(tmp_path / "b", models.sample_good_model(), bus_class=DecodedOnlyBus)
        for rig in (fast, plain):
            assert rig.run(30, rig.at("recommendation")), rig.events()
            rig.run(2.0)
        assert fast.events() == plain.events() == CLIMB
        assert sum(answered) > 100 and not all(answered)  # feedback datagrams are not answered
        kf, kp = fast.watch.proxy("sample")["counters"], plain.watch.proxy("sample")["counters"]
        assert kf["recs-received"] == kp["recs-received"] > 1000
        assert kf["recs-applied"] == kp["recs-applied"]
        df, dp = (r.bus.dispatcher.counters_of("sample").as_dict() for r in (fast, plain))
        for key in ("batches", "records", "inferences", "recs_sent", "clamped"):
            assert df[key] == dp[key], (key, df, dp)
        assert df["recs_sent"] == kf["recs-received"]  # answered once: not again in handle_all
        # status shows how many batches took the lane
        assert fast.bus.snapshot()["proxies"]["sample"]["fast_lane"] == sum(answered)
        assert plain.bus.snapshot()["proxies"]["sample"]["fast_lane"] == 0
    finally:
        fast.bus.shutdown()
        if plain is not None:
            plain.bus.shutdown()


# ---- faults ------------------------------------------------------------------------------

def test_model_raising_at_inference_is_a_fault_and_the_bus_keeps_running(
        good: Rig, caplog: pytest.LogCaptureFixture) -> None:
    assert good.run(30, good.at("recommendation"))
    caplog.set_level(logging.WARNING)
    good.swap_model(raising_model())
    assert good.run(5, good.at("emergency")), good.events()
    assert good.events()[-1] == ("recommendation", "emergency", "fault")
    assert "inference failed" in (good.bus.proxies[good.k.find("sample").id].modes.last_fault or "")
    # still attached and serving: after the cool-down it tries again, and faults again
    good.run(5)
    assert attached_to(good) == good.bus.ctl.portid  # type: ignore[union-attr]
    assert [e for e in good.events() if e[1] == "emergency"][-1][2] == "fault"
    assert len([e for e in good.events() if e[1] == "emergency"]) >= 2
    # a good model again: the bus climbs back without a restart
    good.swap_model(models.sample_good_model())
    assert good.run(30, good.at("recommendation")), good.events()[-4:]


def test_corrupt_model_file_at_start_keeps_the_proxy_in_emergency(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, b"this is not an onnx model")
    try:
        rig.run(10)
        assert rig.kmode() == "emergency" and rig.events() == []
        assert attached_to(rig) == rig.bus.ctl.portid  # type: ignore[union-attr]
        assert rig.bus.registry.error("sample") is not None
        rig.swap_model(models.sample_good_model())  # fixed on disk: picked up, climbs
        assert rig.run(30, rig.at("recommendation")), rig.events()
    finally:
        rig.bus.shutdown()


def test_corrupt_or_removed_model_file_while_serving_keeps_the_last_good_model(good: Rig) -> None:
    # kmlbus.bus.registry: "On any failure the previously installed model ... stays in use";
    # a vanished file is ignored.  So neither is a fault: the proxy stays in recommendation.
    assert good.run(30, good.at("recommendation"))
    tmp = good.model.with_suffix(".tmp")
    tmp.write_bytes(b"garbage")
    tmp.replace(good.model)
    good.run(3)
    assert good.kmode() == "recommendation"
    assert good.bus.registry.error("sample") is not None
    good.model.unlink()
    good.run(3)
    assert good.kmode() == "recommendation"


def test_operator_move_by_another_process_is_followed_then_recovered(good: Rig) -> None:
    assert good.run(30, good.at("recommendation"))
    with good.k.open() as op:
        op.set_mode(good.k.find("sample").id, "emergency", "operator")
    good.run(0.5)
    assert good.bus.proxies[good.k.find("sample").id].modes.mode == "emergency"
    assert good.run(30, good.at("recommendation")), good.events()
    assert good.events()[-3:] == CLIMB


# ---- the module going away -----------------------------------------------------------------

@pytest.mark.parametrize("first_id", [1, 9], ids=["same-id", "new-id"])
def test_module_reload_is_followed_by_a_reattach_without_restart(good: Rig, first_id: int) -> None:
    assert good.run(30, good.at("collaboration"))
    good.k.unload()
    assert good.run(3, lambda: good.bus.conn is None), "the bus never noticed the family was gone"
    good.step()  # the opener says ModuleNotLoaded: the bus waits (0.5 s of wall time)
    assert good.bus.conn is None
    good.k.load(first_id=first_id)
    good.watch.close()
    good.watch = good.k.open(("telemetry", "events"))
    good.msgs.clear()
    assert good.run(5, lambda: attached_to(good) != 0)
    p = good.watch.proxy("sample")
    assert p["id"] == first_id and p["bus-portid"] == good.bus.ctl.portid  # type: ignore[union-attr]
    assert list(good.bus.proxies) == [first_id]
    assert good.bus.stats["reconnects"] == 1
    assert good.run(30, good.at("recommendation")), good.events()
    assert good.events() == CLIMB


def test_the_sample_module_alone_reloaded_is_adopted_again(good: Rig) -> None:
    assert good.run(30, good.at("recommendation"))
    good.k.remove_proxy("sample")  # rmmod kmlbus_sample
    assert good.run(3, lambda: not good.bus.proxies), "the bus still holds a proxy that is gone"
    good.k.add_proxy(lambda: SampleWorkload(1))  # insmod kmlbus_sample
    good.msgs.clear()
    assert good.run(5, lambda: attached_to(good) != 0)
    assert attached_to(good) == good.bus.ctl.portid  # type: ignore[union-attr]
    assert good.run(30, good.at("recommendation")), good.events()
    assert good.events() == CLIMB


def test_a_reload_between_two_steps_is_noticed_and_followed(good: Rig) -> None:
    assert good.run(30, good.at("recommendation"))
    old_ctl = good.bus.ctl
    good.k.unload()
    good.k.load()  # same id, new family id: the bus's sockets are dead, its attachment gone
    good.watch.close()
    good.watch = good.k.open(("telemetry", "events"))
    good.msgs.clear()
    assert good.run(3, lambda: good.bus.ctl is not None and good.bus.ctl is not old_ctl)
    assert good.run(3, lambda: attached_to(good) == good.bus.ctl.portid)  # type: ignore[union-attr]
    assert good.bus.stats["reconnects"] == 1
    assert good.run(30, good.at("recommendation")), good.events()
    assert good.events() == CLIMB


def test_shutdown_detaches_and_leaves_the_proxy_in_emergency(good: Rig) -> None:
    assert good.run(30, good.at("recommendation"))
    good.bus.shutdown()
    p = good.watch.proxy("sample")
    assert MODE.name_of(p["mode"]) == "emergency" and p["bus-portid"] == 0
    assert REASON.name_of(p["reason"]) == "detach"
    good.msgs += good.watch.recv(timeout=0)
    assert good.events()[-1] == ("recommendation", "emergency", "detach")
    good.watch.recv(timeout=1.0)
    assert good.kmode() == "emergency"


def test_a_killed_bus_leaves_the_proxy_in_emergency_with_bus_gone(good: Rig) -> None:
    assert good.run(30, good.at("collaboration"))
    # what SIGKILL does: the sockets are released, nobody detaches
    for link in (good.bus.conn, good.bus.ctl):
        assert link is not None
        link.close()
    good.bus.conn = good.bus.ctl = None
    p = good.watch.proxy("sample")
    assert MODE.name_of(p["mode"]) == "emergency" and p["bus-portid"] == 0
    assert REASON.name_of(p["reason"]) == "bus-gone"
    good.msgs += good.watch.recv(timeout=0)
    assert good.events()[-1] == ("collaboration", "emergency", "bus-gone")


# ---- lost events and new proxies ---------------------------------------------------------------

def test_a_stalled_bus_that_lost_events_follows_the_kernels_mode(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, models.sample_good_model())
    try:
        rig.bus._lost("test: reopen with a small receive buffer")
        rig.bus.opener = lambda groups, *, rcvbuf=0: rig.k.open(groups, rcvbuf=64 << 10)
        assert rig.run(30, rig.at("recommendation"))
        pid = rig.k.find("sample").id
        rig.k.clock.advance(1.0)  # the bus stalls; its socket fills up meanwhile
        with rig.k.open() as op:
            op.set_mode(pid, "learning", "operator")  # the event finds the bus's buffer full
        rig.k.clock.advance(0.1)
        assert rig.bus.proxies[pid].modes.mode == "recommendation"
        rig.run(1.5)
        assert rig.bus.conn is not None and rig.bus.conn.stats["overruns"] >= 1
        assert rig.bus.stats["reconnects"] == 1  # only ours, above
        modes = rig.bus.proxies[pid].modes
        assert any(r.source == "recommendation" and r.dest == "learning" and "lost events" in r.detail
                   for r in modes.history), [(r.source, r.dest, r.detail) for r in modes.history]
        assert rig.run(30, rig.at("recommendation"))
    finally:
        rig.bus.shutdown()


class OtherWorkload(SampleWorkload):
    """A second sample-like subsystem, proxy "other"."""

    desc = dataclasses.replace(SampleWorkload.desc, name="other")


def sample_events(rig: Rig) -> list[tuple[str, str, str]]:
    return [(MODE.name_of(m.attrs["old-mode"]), MODE.name_of(m.attrs["mode"]), REASON.name_of(m.attrs["reason"]))
            for m in rig.msgs if m.op == "mode-event" and m.attrs["name"] == "sample"]


def test_a_proxy_registered_later_is_adopted(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, models.sample_good_model(), ("sample", "other"))
    try:
        rig.run(1)
        rig.k.add_proxy(lambda: OtherWorkload(seed=2))
        assert rig.run(5, lambda: int(rig.watch.proxy("other")["bus-portid"]) != 0)
        assert sorted(p.name for p in rig.bus.proxies.values()) == ["other", "sample"]
        assert rig.run(30, lambda: rig.k.find("other").mode_name == "recommendation")
    finally:
        rig.bus.shutdown()


def test_a_proxy_registered_later_does_not_disturb_the_attached_ones(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, models.sample_good_model(), ("sample", "other"))
    try:
        assert rig.run(30, rig.at("recommendation"))
        n = len(sample_events(rig))
        rig.k.add_proxy(lambda: OtherWorkload(seed=2))
        assert rig.run(5, lambda: int(rig.watch.proxy("other")["bus-portid"]) != 0)
        assert sample_events(rig)[n:] == []
    finally:
        rig.bus.shutdown()


# ---- operator pins and kernel staleness --------------------------------------------------------

def test_an_operator_pin_holds_the_proxy_where_pinned(good: Rig) -> None:
    from kmlbus.bus import pins

    pins.pin("sample", "collaboration")
    assert good.run(10, good.at("collaboration")), good.events()
    good.run(5)
    assert good.kmode() == "collaboration", "a pinned proxy is not promoted"
    pins.unpin("sample")
    assert good.run(10, good.at("recommendation")), good.events()


def test_a_bus_stalled_past_stale_ms_finds_emergency_and_climbs_back(good: Rig) -> None:
    assert good.run(30, good.at("recommendation"))
    pid = good.k.find("sample").id
    with good.k.open() as op:
        op.set_params(pid, stale_ms=500)
    good.run(1)
    assert good.kmode() == "recommendation", "a serving bus keeps the proxy fresh"
    good.k.clock.advance(0.6)  # the bus stalls: no recommendations
    good.msgs += good.watch.recv(timeout=0)
    assert good.events()[-1] == ("recommendation", "emergency", "stale")
    good.run(0.2)
    assert good.bus.proxies[pid].modes.mode == "emergency"
    assert good.run(30, good.at("recommendation")), good.events()


# ---- learning (learn = true) ----------------------------------------------------------------

def make_learning_rig(tmp_path: Path, body: str, model: onnx.ModelProto | None = None) -> Rig:
    path = tmp_path / "model.onnx"
    if model is not None:
        models.save(model, path)
    cfg = loads("[bus]\nttl_ms = 300\nlatency_budget_ms = 500\n\n[proxy.sample]\n" + body,
                tmp_path / "bus.toml")
    k = StandinKernel(seed=1)
    bus = Bus(cfg, clock=k.clock.now, opener=k.open, state_path=tmp_path / "state.json")
    rig = Rig(k, bus, path, k.open(("telemetry", "events")))
    assert bus.connect()
    return rig


def _served_efficiency(rig: Rig, seconds: float) -> tuple[float, float]:
    """Mean efficiency of the model arm and, over the whole run, of the default arm."""
    n = len(rig.msgs)
    rig.run(seconds)
    fb_now = np.concatenate([m.attrs["feedback"] for m in rig.msgs[n:] if m.op == "feedback"])
    _, fb_all = rig.arrays()
    model = fb_now["efficiency"][fb_now["arm"] == ARM.value("model")]
    default = fb_all["efficiency"][fb_all["arm"] == ARM.value("default")]
    return float(model.mean()), float(default.mean())


def test_without_a_model_the_bus_learns_one_that_beats_the_default(tmp_path: Path) -> None:
    rig = make_learning_rig(tmp_path, 'learn = true\nexplore = 200\nlearn_every_s = 3\n'
                                      'learned_model = "learned.onnx"\n')
    try:
        assert rig.run(120, rig.at("recommendation")), rig.events()
        assert rig.events()[-3:] == CLIMB, rig.events()
        ps = next(iter(rig.bus.proxies.values()))
        assert ps.learning is not None and ps.learning.fits >= 1
        lm = rig.bus.registry.model("sample")
        assert lm is not None and str(lm.source).startswith("learned(")
        assert (tmp_path / "learned.onnx").stat().st_size > 0
        model, default = _served_efficiency(rig, 10)
        assert model > 1.3 * default, (model, default)
        snap = rig.bus.snapshot()["proxies"]["sample"]["learning"]
        assert snap["fits"] == ps.learning.fits and snap["last_fit"]["weights"][0] > 20
    finally:
        rig.bus.shutdown()


def test_without_exploration_data_nothing_is_fitted_and_the_proxy_stays_in_learning(
        tmp_path: Path) -> None:
    # explore = 0: the kernel never applies the bus's values, so every decision is the
    # default's and a fit could only copy it
    rig = make_learning_rig(tmp_path, 'learn = true\nexplore = 0\nlearn_every_s = 1\n')
    try:
        rig.run(30)
        ps = next(iter(rig.bus.proxies.values()))
        assert ps.learning is not None and ps.learning.fits == 0 and ps.learning.learner.n_samples > 0
        assert rig.kmode() == "learning", rig.events()
        assert not rig.bus.registry.has_model("sample")
    finally:
        rig.bus.shutdown()


def test_with_learning_a_bad_model_file_is_replaced_by_a_learned_one(tmp_path: Path) -> None:
    rig = make_learning_rig(tmp_path, 'model = "model.onnx"\nlearn = true\nexplore = 200\n'
                                      'learn_every_s = 3\n', models.sample_bad_model())
    try:
        assert rig.run(120, rig.at("recommendation")), rig.events()
        lm = rig.bus.registry.model("sample")
        assert lm is not None and str(lm.source).startswith("learned(")
        model, default = _served_efficiency(rig, 10)
        assert model > 1.3 * default, (model, default)
    finally:
        rig.bus.shutdown()


def test_a_demoted_model_is_held_in_learning_until_it_is_replaced(good: Rig) -> None:
    assert good.run(30, good.at("recommendation"))
    good.swap_model(models.sample_bad_model())
    assert good.run(30, lambda: good.kmode() != "recommendation")
    good.run(10)
    assert good.kmode() == "learning", good.events()[-3:]
    held = good.bus.snapshot()["proxies"]["sample"]["held"]
    assert held is not None and "demoted" in held
    good.swap_model(models.sample_good_model())  # a new model ends the hold
    assert good.run(30, good.at("recommendation")), good.events()[-3:]
    assert good.bus.snapshot()["proxies"]["sample"]["held"] is None


def test_every_refused_recommendation_is_counted_even_past_the_kept_errors(good: Rig) -> None:
    ctl = good.bus.ctl
    assert ctl is not None
    pid = good.k.find("sample").id
    before = good.bus.stats["send_errors"]
    for _ in range(300):  # more than the link keeps (256), all refused: key >= nkeys
        ctl.recommend(pid, [(1000, 8, 100)], wait=False)
    good.bus.housekeeping()
    assert good.bus.stats["send_errors"] - before == 300
    good.bus.housekeeping()  # counted once
    assert good.bus.stats["send_errors"] - before == 300


@pytest.mark.parametrize(("bus_table", "overruns"), [("rate = 2000", False), ("rcvbuf = 65536", True)])
def test_the_telemetry_socket_is_sized_for_the_rate_and_its_overruns_are_published(
        tmp_path: Path, bus_table: str, overruns: bool) -> None:
    models.save(models.sample_good_model(), tmp_path / "model.onnx")
    cfg = loads(f'[bus]\n{bus_table}\n\n[proxy.sample]\nmodel = "model.onnx"\n', tmp_path / "bus.toml")
    k = StandinKernel(seed=1)  # the sample decides 2000 times a second
    bus = Bus(cfg, clock=k.clock.now, opener=k.open, state_path=tmp_path / "state.json")
    try:
        assert bus.connect() and bus.conn is not None
        assert bus.conn.rcvbuf == cfg.bus.receive_buffer()
        bus.step()
        k.clock.advance(1.0)  # the loop is away for a second; the kernel keeps sending
        end = k.clock.now() + 1.5
        while k.clock.now() < end:
            bus.step()
        stats = bus.snapshot()["stats"]
        assert stats["socket_rcvbuf"] == cfg.bus.receive_buffer()
        assert (stats["socket_overruns"] > 0) is overruns, stats
        assert (k.find("sample").counters["send-failed"] > 0) is overruns
    finally:
        bus.shutdown()


def test_a_removed_proxy_is_forgotten_at_once_and_its_new_registration_adopted_afresh(
        good: Rig) -> None:
    assert good.run(30, good.at("recommendation"))
    old = good.k.find("sample").id
    held = good.bus.proxies[old]
    good.k.remove_proxy("sample")  # rmmod kmlbus_sample: proxy-removed on the events group
    good.bus.receive(0.05)
    assert old not in good.bus.proxies, "the bus kept a proxy the kernel destroyed"
    good.k.add_proxy(SampleWorkload)  # insmod again: same name, new id
    new = good.k.find("sample").id
    assert new != old
    good.run(1.5)  # housekeeping adopts the new registration
    assert good.bus.proxies[new] is not held  # no machine, evidence or hold carried over
    assert good.bus.proxies[new].modes.mode in ("emergency", "learning")  # starts from the bottom
    assert good.bus.stats["reconnects"] == 0 and good.bus.stats["send_errors"] == 0, good.bus.stats
    assert good.run(30, good.at("recommendation"))  # climbs again on its own evidence


def test_a_tree_learner_learns_from_scratch_and_climbs(tmp_path: Path) -> None:
    # learner = "tree": exploration over 1, 2, 4, ..., 64 held per key, a treefit policy
    rig = make_learning_rig(tmp_path, 'learn = true\nlearner = "tree"\nexplore = 300\n'
                                      'learn_every_s = 3\n')
    try:
        assert rig.run(180, rig.at("recommendation")), rig.events()
        assert rig.events()[-3:] == CLIMB, rig.events()
        ps = next(iter(rig.bus.proxies.values()))
        assert ps.learning is not None and ps.learning.fits >= 1
        snap = rig.bus.snapshot()["proxies"]["sample"]["learning"]
        assert snap["last_fit"]["model"] == "tree"
        model, default = _served_efficiency(rig, 10)
        assert model > 1.2 * default, (model, default)
    finally:
        rig.bus.shutdown()


# ---- sample_period ---------------------------------------------------------------------------

def test_the_configured_sample_period_is_set_when_the_proxy_is_adopted(tmp_path: Path) -> None:
    rig = make_learning_rig(tmp_path, "learn = true\nsample_period = 4\n")
    try:
        rig.run(0.2)
        p = rig.k.find("sample")
        assert p.sample_period == 4, "set with set-params when the daemon adopted the proxy"
        c = p.counters
        decided = c["decisions-default"] + c["decisions-model"]
        assert decided > 0 and c["unsampled"] > 0
        assert decided == c["samples"] + c["drops"] + c["unsampled"]
    finally:
        rig.bus.shutdown()


def test_without_sample_period_the_kernels_value_is_left_alone(tmp_path: Path) -> None:
    rig = make_learning_rig(tmp_path, "learn = true\n")
    try:
        assert rig.k.find("sample").sample_period == 1
    finally:
        rig.bus.shutdown()
