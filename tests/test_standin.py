"""The stand-in of kmlbus.ko + kmlbus_sample.ko (tests/support/standin.py) holds to the kernel's semantics.

These tests check the stand-in, a user-space model, against what
kernel/kmlbus_core.c, kernel/kmlbus_nl.c and kernel/samples/kmlbus_sample.c
do (and what tests/vm/test_kernel_netlink.py checks of the real module).
They prove nothing about the kernel itself.
"""

from __future__ import annotations

import errno
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from kmlbus.bus.config import ProxySchema
from kmlbus.contract import graph as mgraph
from kmlbus.contract import spec as kspec
from kmlbus.wire import codec
from kmlbus.wire.netlink import KmlbusError, ModuleNotLoaded, NetlinkError
from modes.machine import shortest_path
from tests.support.standin import (
    FLUSH_COUNT,
    FLUSH_MS,
    MSG_SAMPLES,
    SampleWorkload,
    SimClock,
    StandinKernel,
    StandinLink,
)

SPEC = kspec.load()
MODE = SPEC.enums["mode"]
REASON = SPEC.enums["reason"]
ARM = SPEC.enums["arm"]
FLAGS = SPEC.enums["sample-flags"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def k() -> StandinKernel:
    return StandinKernel(seed=7)


@pytest.fixture
def c(k: StandinKernel) -> Iterator[StandinLink]:
    with k.open(("telemetry", "events")) as link:
        yield link


def sid(c: StandinLink) -> int:
    return int(c.proxy("sample")["id"])


def to_mode(c: StandinLink, pid: int, mode: str) -> None:
    """Walk the mode graph to *mode*, edge by edge (as the VM tests do)."""
    for m in shortest_path(mgraph.load(), MODE.name_of(c.proxy(pid)["mode"]), mode):
        c.set_mode(pid, m)


def collect(c: StandinLink, seconds: float) -> tuple[list[codec.Message], np.ndarray, np.ndarray]:
    """Everything received for *seconds* of simulated time: messages, samples, feedback."""
    msgs: list[codec.Message] = []
    end = c.kernel.clock.now() + seconds
    while c.kernel.clock.now() < end:
        msgs += c.recv(timeout=end - c.kernel.clock.now())
    tel = [m.attrs["records"] for m in msgs if m.op == "telemetry"]
    fb = [m.attrs["feedback"] for m in msgs if m.op == "feedback"]
    return (msgs, np.concatenate(tel) if tel else np.zeros(0, codec.struct_dtype("sample")),
            np.concatenate(fb) if fb else np.zeros(0, codec.struct_dtype("feedback")))


def events(msgs: list[codec.Message]) -> list[tuple[str, str, str]]:
    return [(MODE.name_of(m.attrs["old-mode"]), MODE.name_of(m.attrs["mode"]),
             REASON.name_of(m.attrs["reason"])) for m in msgs if m.op == "mode-event"]


# ---- the model is of the real thing ----------------------------------------------------------

def _defines(path: Path) -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(r"#define\s+(\w+)\s+(\d+)\b", path.read_text())}


def test_sample_constants_are_the_kernels() -> None:
    """(The buffering constants are the spec's: the kernel reads them from the generated uapi.)"""
    s = _defines(ROOT / "kernel" / "samples" / "kmlbus_sample.c")
    desc = SampleWorkload.desc
    assert desc.nkeys == s["SAMPLE_STREAMS"]
    assert (desc.recommendation.min, desc.recommendation.max) == (s["SAMPLE_MIN_WINDOW"], s["SAMPLE_MAX_WINDOW"])
    w = SampleWorkload(1)
    keys, f = w.observe(10)
    assert np.all(w.default(keys, f) == s["SAMPLE_DEFAULT_WINDOW"])


def _splitmix(state: int) -> tuple[int, int]:
    """kmlbus_sample.c's sample_next(), one call, in plain Python integers."""
    m = (1 << 64) - 1
    state = (state + 0x9E3779B97F4A7C15) & m
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31), state


def test_sample_workload_replays_the_modules_prng() -> None:
    seed = 12345
    state = seed

    def below(n: int) -> int:
        nonlocal state
        x, state = _splitmix(state)
        return ((x >> 32) * n) >> 32

    s = [below(1001) for _ in range(64)]
    want = []
    for _ in range(50):  # sample_one(): key, observation noise, req_size, noise
        key = below(64)
        obs = s[key] + below(101) - 50
        want.append((key, min(max(obs, 0), 1000), (1 + below(64)) * 1000, below(1001)))
    w = SampleWorkload(seed)
    assert w.seq_ratio.tolist() == s
    k1, f1 = w.observe(20)
    k2, f2 = w.observe(30)  # in two calls: the stream continues where it left off
    got = [(int(a), *map(int, b)) for a, b in zip(np.concatenate([k1, k2]), np.concatenate([f1, f2]))]
    assert got == want
    opt = w.optimal(np.arange(64))
    assert opt.tolist() == [1 + (63 * x + 500) // 1000 for x in s]
    eff = w.efficiency(np.array([3], np.uint32), np.array([8], np.int32))
    assert eff[0] == 1000 - 1000 * abs(8 - int(opt[3])) // 64


# ---- the get dump ---------------------------------------------------------------------------

def test_dump_has_every_reply_attribute_and_the_bus_can_read_it(c: StandinLink) -> None:
    (p,) = c.proxies()
    assert set(p) == set(SPEC.op_by_name["get"].dump_reply or ())
    assert set(p["counters"]) == {a.name for a in SPEC.attr_sets["counters"].attrs if a.type != "pad"}
    assert p["mode"] == MODE.value("emergency") and p["bus-portid"] == 0
    assert p["share"] == mgraph.load().guards.collaboration_share
    s = ProxySchema.from_attrs(p)
    assert (s.name, s.nkeys, s.id) == ("sample", 64, p["id"])
    assert [f.name for f in s.features] == ["seq_ratio", "req_size", "noise"]
    assert (s.recommendation.min, s.recommendation.max, s.efficiency_scale) == (1, 64, 1000)
    assert c.proxy(p["id"]) == c.proxy("sample")
    with pytest.raises(NetlinkError) as ei:
        c.proxy(99)
    assert ei.value.errno == errno.ENOENT and "[attribute id]" in ei.value.extack


def test_mode_ms_counts_simulated_time(k: StandinKernel, c: StandinLink) -> None:
    k.clock.advance(1.5)
    assert c.proxy("sample")["mode-ms"] == 1500


# ---- modes ----------------------------------------------------------------------------------

def test_illegal_set_mode_is_refused_with_extack_and_changes_nothing(c: StandinLink) -> None:
    pid = sid(c)
    c.recv(timeout=0.1)
    before = c.proxy(pid)
    with pytest.raises(NetlinkError) as ei:
        c.set_mode(pid, "recommendation")
    assert ei.value.errno == errno.EINVAL
    assert "mode graph" in ei.value.extack and "[attribute mode]" in ei.value.extack
    after = c.proxy(pid)
    assert after["mode"] == before["mode"] == MODE.value("emergency")
    assert after["counters"]["mode-changes"] == before["counters"]["mode-changes"]
    assert events(c.recv(timeout=0)) == []


def test_every_move_is_allowed_exactly_when_the_graph_allows_it(k: StandinKernel) -> None:
    g = mgraph.load()
    with k.open() as c:
        pid = sid(c)
        for src in g.states:
            for dst in g.states:
                to_mode(c, pid, src)
                if g.is_allowed(src, dst):
                    c.set_mode(pid, dst)
                    assert MODE.name_of(c.proxy(pid)["mode"]) == dst
                else:
                    with pytest.raises(NetlinkError) as ei:
                        c.set_mode(pid, dst)
                    assert ei.value.errno == errno.EINVAL
                    assert MODE.name_of(c.proxy(pid)["mode"]) == src


def test_every_change_is_a_mode_event_with_spec_enum_ints(c: StandinLink) -> None:
    pid = sid(c)
    c.recv(timeout=0.1)
    to_mode(c, pid, "recommendation")
    c.set_mode(pid, "learning", "demotion")
    c.set_mode(pid, "learning")  # no change: no event
    evs = [m for m in c.recv(timeout=0) if m.op == "mode-event"]
    assert events(evs) == [("emergency", "learning", "operator"), ("learning", "collaboration", "operator"),
                           ("collaboration", "recommendation", "operator"),
                           ("recommendation", "learning", "demotion")]
    assert all(type(m.attrs[a]) is int for m in evs for a in ("id", "mode", "old-mode", "reason"))
    assert all(m.attrs["id"] == pid and m.attrs["name"] == "sample" for m in evs)
    assert c.proxy(pid)["counters"]["mode-changes"] == 4


def test_set_mode_policy_rejects_an_out_of_range_mode(c: StandinLink) -> None:
    with pytest.raises(NetlinkError) as ei:
        c.request("set-mode", {"id": sid(c), "mode": len(MODE.entries)})
    assert ei.value.errno == errno.ERANGE and "[attribute mode]" in ei.value.extack
    with pytest.raises(NetlinkError) as ei:
        c.request("set-mode", {"id": sid(c)})
    assert ei.value.errno == errno.EINVAL and "missing attribute mode" in ei.value.extack


# ---- attachment -----------------------------------------------------------------------------

def test_closing_the_attached_link_is_bus_gone_and_others_hear_it(k: StandinKernel, c: StandinLink) -> None:
    pid = sid(c)
    bus = k.open()
    bus.attach(pid)
    bus.set_mode(pid, "learning")
    assert c.proxy(pid)["bus-portid"] == bus.portid
    c.recv(timeout=0.1)
    bus.close()
    p = c.proxy(pid)
    assert p["mode"] == MODE.value("emergency") and p["bus-portid"] == 0
    assert p["reason"] == REASON.value("bus-gone")
    assert events(c.recv(timeout=0)) == [("learning", "emergency", "bus-gone")]
    with pytest.raises(OSError):
        bus.proxies()


def test_closing_an_unattached_link_changes_nothing(k: StandinKernel, c: StandinLink) -> None:
    pid = sid(c)
    bus = k.open()
    bus.attach(pid)
    bus.set_mode(pid, "learning")
    k.open().close()
    assert c.proxy(pid)["mode"] == MODE.value("learning")


def test_a_second_link_cannot_steal_an_attached_proxy(k: StandinKernel) -> None:
    with k.open() as a, k.open() as b:
        pid = sid(a)
        a.attach(pid)
        a.attach(pid)  # the same port again is fine
        with pytest.raises(NetlinkError) as ei:
            b.attach(pid)
        assert ei.value.errno == errno.EBUSY and ei.value.extack
        assert a.proxy(pid)["bus-portid"] == a.portid


def test_detach_drops_to_emergency_with_reason_detach(c: StandinLink) -> None:
    pid = sid(c)
    c.attach(pid)
    c.set_mode(pid, "learning")
    c.detach(pid)
    p = c.proxy(pid)
    assert p["mode"] == MODE.value("emergency") and p["bus-portid"] == 0
    assert events(c.recv(timeout=0))[-1] == ("learning", "emergency", "detach")
    with pytest.raises(NetlinkError) as ei:
        c.detach(pid)
    assert ei.value.errno == errno.ENOTCONN and ei.value.extack


def test_unprivileged_links_cannot_join_the_groups(k: StandinKernel) -> None:
    with k.open(cap_net_admin=False) as nobody:
        for g in ("telemetry", "events"):
            with pytest.raises(PermissionError) as ei:
                nobody.join(g)
            assert ei.value.errno == errno.EPERM, g
    with pytest.raises(PermissionError):
        k.open(groups=("telemetry",), cap_net_admin=False)


def test_unprivileged_control_requests_get_eperm_and_change_nothing(k: StandinKernel) -> None:
    with k.open() as root, k.open(cap_net_admin=False) as nobody:
        pid = sid(root)
        before = root.proxy(pid)
        assert len(nobody.proxies()) == 1, "reading state is allowed to anyone"
        calls: dict[str, Callable[[], None]] = {"set-mode": lambda: nobody.set_mode(pid, "learning"),
                 "set-params": lambda: nobody.set_params(pid, share=1),
                 "attach": lambda: nobody.attach(pid), "detach": lambda: nobody.detach(pid),
                 "recommend": lambda: nobody.recommend(pid, [(0, 1, 1)])}
        for op, call in calls.items():
            with pytest.raises(NetlinkError) as ei:
                call()
            assert ei.value.errno == errno.EPERM, op
        after = root.proxy(pid)
        for key in ("mode", "share", "bus-portid", "explore", "stale-ms"):
            assert after[key] == before[key], key
        assert after["counters"]["recs-received"] == 0
        # genl_family_rcv_msg checks the permission before it looks for a dump handler
        with pytest.raises(NetlinkError) as ei:
            nobody.request("set-mode", {"id": pid, "mode": "learning"}, dump=True)
        assert ei.value.errno == errno.EPERM
        with pytest.raises(NetlinkError) as ei:
            root.request("set-mode", {"id": pid, "mode": "learning"}, dump=True)
        assert ei.value.errno == errno.EOPNOTSUPP


def test_attributes_an_operation_does_not_take_are_refused_strictly(c: StandinLink) -> None:
    """As the kernel's strict validation: past the op's maxattr, or without a policy entry."""
    pid = sid(c)
    for op, attrs, text in (("attach", {"id": pid, "share": 5}, "Unknown attribute type [attribute share]"),
                            ("get", {"id": pid, "mode": 1}, "Unknown attribute type [attribute mode]"),
                            ("set-params", {"id": pid, "name": "x"},
                             "Unsupported attribute [attribute name]")):
        with pytest.raises(NetlinkError) as ei:
            c.request(op, attrs)
        assert ei.value.errno == errno.EINVAL and ei.value.extack == text, (op, ei.value)
    assert c.proxy(pid)["bus-portid"] == 0


def test_closing_a_listener_after_a_quiet_spell_counts_what_it_heard_as_heard(
        k: StandinKernel) -> None:
    """The kernel flushed on its own timer while the socket listened: those batches were
    delivered (``batches``), whatever the reader did with them, never ``unheard``."""
    with k.open() as ctl:
        listener = k.open(("telemetry",))
        ctl.recv(timeout=0.2)  # simulated time passes; the listener makes no call
        listener.close()
        counters = ctl.proxy("sample")["counters"]
    assert counters["batches"] > 10 and counters["unheard"] == 0, counters


def test_recv_takes_at_most_drain_max_datagrams_per_call(k: StandinKernel) -> None:
    from kmlbus.wire.netlink import DRAIN_MAX

    k.set_rate("sample", 100_000)
    with k.open() as ctl, k.open(("telemetry",), rcvbuf=64 << 20) as c:
        ctl.recv(timeout=0.2)  # about 20000 samples: over 600 datagrams wait for c
        first = c.recv(timeout=0)
        assert len(first) == DRAIN_MAX
        assert len(c.recv(timeout=0)) > 0


# ---- recommendations ---------------------------------------------------------------------------

def test_recommend_batch_is_all_or_nothing(c: StandinLink) -> None:
    pid = sid(c)
    for recs, code in (([(1, 5, 100), (64, 5, 100)], errno.EINVAL),
                       ([(1, 5, 100), (2, 5, 0)], errno.EINVAL),
                       ([(1, 5, 100), (2, 5, 60_001)], errno.EINVAL)):
        with pytest.raises(NetlinkError) as ei:
            c.recommend(pid, recs)
        assert ei.value.errno == code and "[attribute recs[1]]" in ei.value.extack, ei.value
    big = np.zeros(SPEC.consts["max-recs"] + 1, codec.struct_dtype("rec"))
    big["ttl_ms"] = 100
    with pytest.raises(NetlinkError) as ei:
        c.request("recommend", {"id": pid, "recs": big})
    assert ei.value.errno == errno.E2BIG
    with pytest.raises(NetlinkError) as ei:
        c.recommend(4242, [(0, 1, 1)])
    assert ei.value.errno == errno.ENOENT
    assert c.proxy(pid)["counters"]["recs-received"] == 0
    c.recommend(pid, big)  # Connection.recommend splits it: two requests, both applied
    assert c.proxy(pid)["counters"]["recs-received"] == len(big)


def test_recommend_without_waiting_reports_refusals_later(c: StandinLink) -> None:
    pid = sid(c)
    c.recommend(pid, [(1, 5, 100)], wait=False)
    c.recommend(pid, [(99, 5, 100)], wait=False)  # key >= nkeys: refused
    c.recommend(4242, [(0, 5, 100)], wait=False)  # no such proxy
    assert c.proxy(pid)["counters"]["recs-received"] == 1
    errs = c.take_errors()
    assert [e.errno for e in errs] == [errno.EINVAL, errno.ENOENT] and c.stats["async_errors"] == 2
    assert c.take_errors() == []


def test_recommend_of_packed_bytes_is_the_same_request(c: StandinLink) -> None:
    pid = sid(c)
    recs = np.zeros(SPEC.consts["max-recs"] + 1, codec.struct_dtype("rec"))
    recs["key"], recs["value"], recs["ttl_ms"] = np.arange(len(recs)) % 64, 3, 100
    c.recommend(pid, recs.tobytes(), wait=False)
    c.recommend(pid, recs[:1].tobytes())
    assert c.proxy(pid)["counters"]["recs-received"] == len(recs) + 1
    with pytest.raises(KmlbusError, match="whole number"):
        c.recommend(pid, recs[:1].tobytes()[:-2], wait=False)
    bad = recs[:2].copy()
    bad["key"][1] = 99
    c.recommend(pid, bad.tobytes(), wait=False)  # all or nothing, refusal reported later
    assert [e.errno for e in c.take_errors()] == [errno.EINVAL]
    assert c.proxy(pid)["counters"]["recs-received"] == len(recs) + 1


def test_set_params_bounds(c: StandinLink) -> None:
    pid = sid(c)
    c.set_params(pid, share=250, explore=10, stale_ms=300)
    p = c.proxy(pid)
    assert (p["share"], p["explore"], p["stale-ms"]) == (250, 10, 300)
    for kw, code in (({"share": 1001}, errno.ERANGE), ({"explore": 5000}, errno.ERANGE),
                     ({"stale_ms": 60_000_001}, errno.ERANGE)):
        with pytest.raises(NetlinkError) as ei:
            c.set_params(pid, **kw)
        assert ei.value.errno == code and ei.value.extack
    p = c.proxy(pid)
    assert (p["share"], p["explore"], p["stale-ms"]) == (250, 10, 300)


def test_fresh_recommendation_decides_until_its_ttl_then_the_default(k: StandinKernel, c: StandinLink) -> None:
    pid = sid(c)
    to_mode(c, pid, "recommendation")
    collect(c, 0.05)
    t_rec = k.clock.now_ns()
    c.recommend(pid, [(key, 33, 100) for key in range(64)])
    _, tel, _ = collect(c, 0.6)
    tel = tel[tel["ts_ns"] > t_rec]  # decided by then, still buffered when the recs came
    fresh = tel["ts_ns"] < t_rec + 100_000_000
    assert fresh.sum() > 100 and (~fresh).sum() > 100
    assert np.all(tel["decision"][fresh] == 33) and np.all(tel["arm"][fresh] == ARM.value("model"))
    assert np.all(tel["decision"][~fresh] == 8) and np.all(tel["arm"][~fresh] == ARM.value("default"))
    assert np.all(tel["flags"][~fresh] & FLAGS.value("has-shadow") == 0)
    cnt = c.proxy(pid)["counters"]
    # every stream read after expiry is counted expired once (here: all 64)
    assert cnt["recs-expired"] == len(np.unique(tel["key"][~fresh])) == 64
    assert cnt["recs-applied"] == cnt["decisions-model"] == fresh.sum()


def test_out_of_bounds_value_is_clamped_and_flagged(c: StandinLink) -> None:
    pid = sid(c)
    to_mode(c, pid, "recommendation")
    c.recommend(pid, [(key, 500, 10_000) for key in range(64)])
    _, tel, _ = collect(c, 0.1)
    assert len(tel) and np.all(tel["decision"] == 64)
    assert np.all(tel["flags"] & FLAGS.value("clamped"))
    cnt = c.proxy(pid)["counters"]
    assert cnt["recs-clamped"] == cnt["samples"] >= len(tel)


def test_emergency_ignores_fresh_recommendations_but_reports_the_shadow(c: StandinLink) -> None:
    pid = sid(c)
    c.recommend(pid, [(key, 20, 10_000) for key in range(64)])
    _, tel, _ = collect(c, 0.2)
    assert np.all(tel["decision"] == 8) and np.all(tel["shadow"] == 20)
    assert np.all(tel["flags"] == FLAGS.value("has-shadow"))
    cnt = c.proxy(pid)["counters"]
    assert cnt["recs-ignored"] == cnt["samples"] >= len(tel) and cnt["decisions-model"] == 0


def test_collaboration_gives_the_model_its_share(c: StandinLink) -> None:
    pid = sid(c)
    for share in (500, 150):
        c.set_params(pid, share=share)
        to_mode(c, pid, "collaboration")
        c.recv(timeout=0.05)
        c.recommend(pid, [(key, 40, 60_000) for key in range(64)])
        _, tel, _ = collect(c, 3.0)
        tel = tel[(tel["mode"] == MODE.value("collaboration")) & ((tel["flags"] & FLAGS.value("has-shadow")) != 0)]
        n = len(tel)
        assert n > 4000
        p = share / 1000
        got = float(np.mean(tel["arm"] == ARM.value("model")))
        assert abs(got - p) < 5 * math.sqrt(p * (1 - p) / n), (share, got, n)
        assert np.all(tel["decision"][tel["arm"] == ARM.value("model")] == 40)


def test_learning_explores_its_share_with_the_explored_flag(c: StandinLink) -> None:
    pid = sid(c)
    c.set_params(pid, explore=100)
    to_mode(c, pid, "learning")
    c.recv(timeout=0.05)
    c.recommend(pid, [(key, 40, 60_000) for key in range(64)])
    _, tel, _ = collect(c, 2.0)
    tel = tel[tel["mode"] == MODE.value("learning")]
    model = tel["arm"] == ARM.value("model")
    assert 0.07 < model.mean() < 0.13
    assert np.all((tel["flags"][model] & FLAGS.value("explored")) != 0)
    assert np.all((tel["flags"][~model] & FLAGS.value("explored")) == 0)


def test_stale_limit_drops_collaboration_to_emergency(k: StandinKernel, c: StandinLink) -> None:
    pid = sid(c)
    c.set_params(pid, stale_ms=200)
    to_mode(c, pid, "collaboration")
    t0 = k.clock.now()
    msgs: list[codec.Message] = []
    while not any(e[2] == "stale" for e in events(msgs)) and k.clock.now() - t0 < 1:
        msgs += c.recv(timeout=0.05)
    assert events(msgs)[-1] == ("collaboration", "emergency", "stale")
    assert 0.2 < k.clock.now() - t0 <= 0.2 + FLUSH_MS / 1000 + 1e-9
    assert c.proxy(pid)["reason"] == REASON.value("stale")


def test_recommendations_keep_a_stale_limited_proxy_up(k: StandinKernel, c: StandinLink) -> None:
    pid = sid(c)
    c.set_params(pid, stale_ms=200)
    to_mode(c, pid, "recommendation")
    for _ in range(20):
        c.recommend(pid, [(0, 5, 100)])
        collect(c, 0.1)
    assert c.proxy(pid)["mode"] == MODE.value("recommendation")


# ---- telemetry and feedback ------------------------------------------------------------------------

def test_batches_hold_at_most_32_records_and_feedback_joins_telemetry_by_seq(c: StandinLink) -> None:
    msgs, tel, fb = collect(c, 1.0)
    sizes = [len(m.attrs["records"]) for m in msgs if m.op == "telemetry"]
    assert max(sizes) <= MSG_SAMPLES and sum(sizes) == len(tel)
    assert 1900 <= len(tel) <= 2000  # 2000 decisions/s, the last ones still buffered
    assert all(m.attrs["id"] == sid(c) and m.attrs["drops"] == 0 for m in msgs if m.op == "telemetry")
    assert np.all(np.diff(tel["seq"].astype(np.int64)) == 1)
    assert not any(m.attrs["records"].flags.writeable for m in msgs if m.op == "telemetry"), \
        "records are read-only views of the received bytes, like Connection's"
    assert np.array_equal(fb["seq"], tel["seq"])
    assert np.array_equal(fb["key"], tel["key"]) and np.array_equal(fb["decision"], tel["decision"])
    assert np.array_equal(fb["arm"], tel["arm"])
    w = c.kernel.find("sample").workload
    assert isinstance(w, SampleWorkload)
    assert np.array_equal(fb["efficiency"], w.efficiency(fb["key"], fb["decision"]))


def test_a_slow_workload_is_flushed_every_20_ms(k: StandinKernel, c: StandinLink) -> None:
    k.set_rate("sample", 100)
    c.recv(timeout=0.1)
    arrivals = []
    for _ in range(20):
        ms = [m for m in c.recv(timeout=1.0) if m.op == "telemetry"]
        if not ms:  # the flush's feedback, queued behind the telemetry taken last time
            ms = [m for m in c.recv(timeout=1.0) if m.op == "telemetry"]
        assert ms
        arrivals.append(k.clock.now_ns())
        for m in ms:
            r = m.attrs["records"]
            assert len(r) < FLUSH_COUNT
            assert np.all(k.clock.now_ns() - r["ts_ns"].astype(np.int64) <= FLUSH_MS * 1_000_000)
    gaps = np.diff(arrivals)
    assert np.all(gaps % (FLUSH_MS * 1_000_000) == 0)


def test_a_full_receive_buffer_drops_until_the_reader_has_emptied_it(k: StandinKernel) -> None:
    with k.open(("telemetry", "events"), rcvbuf=16 << 10) as slow, k.open(("events",)) as other:
        pid = sid(slow)
        k.clock.advance(0.5)  # ~30 flushes of ~3 KiB: far more than 16 KiB
        slow.set_mode(pid, "learning")  # its event is dropped for the congested socket only
        got = slow.recv(timeout=0)
        assert slow.stats["overruns"] == 1
        n = len([m for m in got if m.op == "telemetry"])
        counters = slow.proxy(pid)["counters"]
        assert 4 <= n <= 7  # ~16 KiB of ~30 flushes
        # only what the one listener took is a batch; the rest is counted send-failed
        assert counters["batches"] == len([m for m in got if m.op in ("telemetry", "feedback")])
        assert counters["send-failed"] > 20 * FLUSH_COUNT, counters
        assert not [m for m in got if m.op == "mode-event"]
        assert [m.op for m in other.recv(timeout=0)] == ["mode-event"]
        slow.set_mode(pid, "collaboration")  # emptied: delivered again
        assert [m.op for m in slow.recv(timeout=0)] == ["mode-event"]
        assert slow.stats["overruns"] == 1


def test_nobody_listening_means_unheard(k: StandinKernel) -> None:
    with k.open() as c:
        k.clock.advance(0.5)
        cnt = c.proxy("sample")["counters"]
        assert cnt["batches"] == 0 and cnt["unheard"] >= 2 * 900


def test_rate_zero_pauses_decisions(k: StandinKernel, c: StandinLink) -> None:
    k.set_rate("sample", 0)
    collect(c, 0.1)
    a = c.proxy("sample")["counters"]["samples"]
    _, tel, _ = collect(c, 0.5)
    assert len(tel) == 0 and c.proxy("sample")["counters"]["samples"] == a
    k.set_rate("sample", 2000)
    _, tel, _ = collect(c, 0.5)
    assert 900 <= len(tel) <= 1000


def test_same_seed_same_workload() -> None:
    a, b = StandinKernel(seed=3), StandinKernel(seed=3)
    ta = collect(a.open(("telemetry",)), 0.3)[1]
    tb = collect(b.open(("telemetry",)), 0.3)[1]
    assert np.array_equal(ta, tb)


# ---- time -----------------------------------------------------------------------------------------

def test_recv_runs_simulated_time_until_a_message_or_the_timeout(k: StandinKernel, c: StandinLink) -> None:
    t0 = k.clock.now()
    with k.open() as ctl:
        assert ctl.recv(timeout=0.25) == []
    assert k.clock.now() == pytest.approx(t0 + 0.25)
    assert c.recv(timeout=0), "c heard what was sent meanwhile"
    t1 = k.clock.now()
    got = c.recv(timeout=1.0)
    assert [m.op for m in got] == ["telemetry"] and 0 < k.clock.now() - t1 <= FLUSH_MS / 1000
    t2 = k.clock.now()
    # the datagram that ended the wait came alone; the flush's feedback waits, taken at once
    assert [m.op for m in c.recv(timeout=1.0)] == ["feedback"] and k.clock.now() == t2
    assert c.recv(timeout=0) == [] and k.clock.now() == t2


def test_wait_datagram_hands_out_the_datagram_that_ends_a_wait_undecoded(
        k: StandinKernel, c: StandinLink) -> None:
    c.recv(timeout=0.1)
    c.recv(timeout=0)
    data = c.wait_datagram(timeout=1.0)
    assert data is not None
    msgs = c.accept(data)
    assert [m.op for m in msgs] == ["telemetry"]
    peeked = codec.peek_event(data, c.family_id)
    assert peeked is not None and bytes(peeked.attrs["records"]) == msgs[0].attrs["records"].tobytes()
    k.clock.advance(0.5)  # more arrives while nobody reads: queued, so no wait and no datagram
    assert c.wait_datagram(timeout=1.0) is None
    assert c.recv(timeout=0)


def test_sim_clock() -> None:
    clk = SimClock(5.0)
    clk.advance(0.25)
    assert clk.now() == 5.25 and clk.now_ns() == 5_250_000_000
    with pytest.raises(ValueError):
        clk.advance(-1)


# ---- module reload ------------------------------------------------------------------------------

def test_unload_kills_links_and_load_brings_fresh_proxies(k: StandinKernel) -> None:
    old = k.open(("telemetry", "events"))
    pid = sid(old)
    old.attach(pid)
    old.set_mode(pid, "learning")
    k.unload()
    with pytest.raises(ModuleNotLoaded):
        k.open()
    with pytest.raises(NetlinkError) as ei:
        old.proxies()
    assert ei.value.errno == errno.ENOENT
    old.recv(timeout=0.1)  # whatever was queued; must not raise
    assert old.recv(timeout=0.1) == []
    k.load(first_id=5)
    with pytest.raises(NetlinkError) as ei:
        old.set_mode(pid, "emergency")
    assert ei.value.errno == errno.ENOENT, "the old family id stays unknown after a reload"
    with k.open(("telemetry",)) as new:
        p = new.proxy("sample")
        assert p["id"] == 5 and p["bus-portid"] == 0 and p["mode"] == MODE.value("emergency")
        assert p["counters"]["samples"] == 0
        assert len(collect(new, 0.1)[1]) > 100
    assert old.recv(timeout=0.1) == []
    old.close()
    k.unload()
    k.load()
    with k.open() as again:
        assert sid(again) == 1, "a fresh IDA numbers from 1 again, like the real module"


def test_the_sample_module_alone_can_be_removed_and_added_again(k: StandinKernel) -> None:
    with k.open(("events",)) as c:
        c.attach(sid(c))
        c.set_mode(sid(c), "learning")
        c.recv(timeout=0)
        k.remove_proxy("sample")
        assert c.proxies() == []
        assert [(m.op, m.attrs) for m in c.recv(timeout=0.1)] == [
            ("proxy-removed", {"id": 1, "name": "sample", "mode-seq": 1})]
        k.add_proxy(lambda: SampleWorkload(7))
        p = c.proxy("sample")
        assert p["id"] == 2, "ids are not reused within a load"
        assert p["bus-portid"] == 0 and p["mode"] == MODE.value("emergency")
    k.unload()
    k.load()
    assert [p.desc.name for p in k.proxies] == ["sample"], "load re-creates what is registered, once"


def test_unknown_group_is_refused(k: StandinKernel) -> None:
    with pytest.raises(KmlbusError):
        k.open(("nonsense",))
    assert k.links == []


# ---- sample-period -----------------------------------------------------------------------------

def test_sample_period_records_one_decision_in_n_and_counts_the_rest(k: StandinKernel, c: StandinLink) -> None:
    pid = sid(c)
    assert c.proxy(pid)["sample-period"] == 1
    c.set_params(pid, sample_period=5)
    assert c.proxy(pid)["sample-period"] == 5
    before = c.proxy(pid)["counters"]
    _, tel, fb = collect(c, 0.5)
    after = c.proxy(pid)["counters"]
    d = {key: after[key] - before[key] for key in after}
    decided = d["decisions-default"] + d["decisions-model"]
    assert decided > 500 and decided == d["samples"] + d["drops"] + d["unsampled"], d
    assert abs(d["samples"] + d["drops"] - decided / 5) <= 1, d
    assert np.all(np.diff(tel["seq"].astype(np.int64)) == 1), "a seq only for each recorded sample"
    # the feedback of every decision is kept; only every 5th carries a seq, the others 0
    assert np.all(np.diff(np.flatnonzero(fb["seq"])) == 5) and np.count_nonzero(fb["seq"] == 0) > 400
    assert set(fb["seq"][fb["seq"] > 0].tolist()) <= set(tel["seq"].tolist())


@pytest.mark.parametrize("bad", [0, 2**20 + 1])
def test_sample_period_out_of_range_is_einval_with_extack_and_changes_nothing(c: StandinLink, bad: int) -> None:
    pid = sid(c)
    c.set_params(pid, sample_period=3)
    with pytest.raises(NetlinkError) as ei:
        c.set_params(pid, share=7, sample_period=bad)
    assert ei.value.errno == errno.EINVAL and "sample-period" in ei.value.extack
    p = c.proxy(pid)
    assert p["sample-period"] == 3 and p["share"] != 7
