"""kmlbus.ko against the real kernel: family, dump, the decision loop, privileges, bus loss, reload.

Runs inside the guest (``python -m kmlbus.vm test``) with the ``modules``
fixture of ``tests/vm/conftest.py``: kmlbus.ko plus the sample workload
(proxy ``sample``: 64 streams, features seq_ratio/req_size/noise at scale 1000,
recommendation ``window`` in [1, 64], default window 8).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest

from kmlbus.contract import graph as mgraph
from kmlbus.contract import spec as kspec
from kmlbus.vm import project_root
from kmlbus.vm.guest import KMLBUS_KO, SAMPLE_KO, insmod, is_loaded, rmmod
from kmlbus.wire import codec
from kmlbus.wire.codec import pack_attr
from kmlbus.wire.netlink import Connection, GenlSocket, ModuleNotLoaded, NetlinkError
from modes.machine import shortest_path

pytestmark = pytest.mark.vm

SPEC = kspec.load()
MODE = SPEC.enums["mode"]
ARM = SPEC.enums["arm"]
REASON = SPEC.enums["reason"]
FLAGS = SPEC.enums["sample-flags"]
GENL_ADMIN_PERM = 0x01
DEFAULT_WINDOW = 8


def sample_id(c: Connection) -> int:
    return int(c.proxy("sample")["id"])


def counters(c: Connection, pid: int) -> dict[str, int]:
    return dict(c.proxy(pid)["counters"])


def collect(c: Connection, seconds: float, *, min_records: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Telemetry samples and feedback records received for *seconds* (longer until *min_records*)."""
    tel: list[np.ndarray] = []
    fb: list[np.ndarray] = []
    end = time.monotonic() + seconds
    hard_end = end + 20.0
    while True:
        now = time.monotonic()
        n = sum(len(t) for t in tel)
        if (now >= end and n >= min_records) or now >= hard_end:
            break
        for m in c.recv(timeout=0.1):
            if m.op == "telemetry":
                tel.append(np.array(m.attrs["records"]))
            elif m.op == "feedback":
                fb.append(np.array(m.attrs["feedback"]))
    return (np.concatenate(tel) if tel else np.empty(0, codec.struct_dtype("sample")),
            np.concatenate(fb) if fb else np.empty(0, codec.struct_dtype("feedback")))


def check_seq_order(tel: np.ndarray) -> None:
    """Each CPU has its own sample ring, so messages from two CPUs may arrive out of seq
    order: in time order, seqs must be unique and, per key, increasing (the bus takes the
    highest seq of a key as its latest decision)."""
    seq = tel["seq"].astype(np.int64)
    assert np.all(seq > 0) and len(np.unique(seq)) == len(seq), "seq repeated"
    order = np.lexsort((seq, tel["ts_ns"].astype(np.int64)))
    keys, ordered = tel["key"][order], seq[order]
    for k in np.unique(keys):
        assert np.all(np.diff(ordered[keys == k]) > 0), f"key {k}: seq not in decision order"


def to_mode(c: Connection, pid: int, mode: str) -> None:
    """Walk the mode graph to *mode*, edge by edge."""
    for m in shortest_path(mgraph.load(), MODE.name_of(c.proxy(pid)["mode"]), mode):
        c.set_mode(pid, m)


# ---- the family ---------------------------------------------------------------------------

def test_family_resolves_with_admin_flagged_ops_and_both_groups(modules: Any) -> None:
    with Connection() as c:
        requests = {o.value: o for o in SPEC.ops if o.do_request is not None or o.dump_reply is not None}
        assert set(c.ops) == set(requests)
        for cmd, o in requests.items():
            assert bool(c.ops[cmd] & GENL_ADMIN_PERM) == o.admin, o.name
        assert set(c.groups) == set(SPEC.mcast_groups)
        assert c.version == SPEC.version


@pytest.mark.skipif(shutil.which("genl") is None, reason="iproute2 genl not installed")
def test_genl_ctrl_get_lists_ops_and_groups(modules: Any) -> None:
    out = subprocess.run(["genl", "-d", "ctrl", "get", "name", "kmlbus"], capture_output=True,
                         text=True, check=True).stdout
    assert "Name: kmlbus" in out
    for o in SPEC.ops:
        if o.do_request is not None:
            assert f"ID-0x{o.value:x} " in out, (o.name, out)
    for g in SPEC.mcast_groups:
        assert f"name: {g}" in out, out


def test_dump_lists_sample_proxy_with_schemas_and_counters(modules: Any) -> None:
    with Connection() as c:
        ps = [p for p in c.proxies() if p["name"] == "sample"]
        assert len(ps) == 1
        p = ps[0]
        assert p["id"] >= 1 and p["nkeys"] == 64
        assert p["mode"] == MODE.value("emergency")
        assert p["lifecycle"] in (SPEC.enums["lifecycle"].value("started"),
                                  SPEC.enums["lifecycle"].value("running"))
        assert [f["name"] for f in p["feature"]] == ["seq_ratio", "req_size", "noise"]
        assert all(f["scale"] == 1000 for f in p["feature"])
        assert p["recommendation"] == {"name": "window", "scale": 1, "min": 1, "max": 64}
        assert p["efficiency-scale"] == 1000
        names = [a.name for a in SPEC.attr_sets["counters"].attrs if a.type != "pad"]
        assert set(p["counters"]) == set(names)
        assert p["bus-portid"] == 0
        assert c.proxy(p["id"]) == c.proxy("sample") or c.proxy(p["id"])["id"] == p["id"]


# ---- the decision loop ----------------------------------------------------------------------

def test_telemetry_batches_have_the_spec_layout_and_increasing_seq(modules: Any) -> None:
    with Connection(groups=("telemetry",)) as c:
        tel, fb = collect(c, 0.5, min_records=300)
    assert len(tel) >= 300
    check_seq_order(tel)
    f = tel["features"]
    assert np.all((f[:, 0] >= 0) & (f[:, 0] <= 1000))
    assert np.all((f[:, 1] >= 1000) & (f[:, 1] <= 64000) & (f[:, 1] % 1000 == 0))
    assert np.all((f[:, 2] >= 0) & (f[:, 2] <= 1000))
    assert np.all(f[:, 3:] == 0)
    assert np.all(tel["key"] < 64)
    assert np.all(tel["mode"] == MODE.value("emergency"))
    assert np.all(tel["arm"] == ARM.value("default"))
    assert np.all(tel["decision"] == DEFAULT_WINDOW)
    assert len(fb) > 0
    assert np.all((fb["efficiency"] >= 0) & (fb["efficiency"] <= 1000))


def test_recommendation_mode_applies_fresh_recs_and_clamps(modules: Any) -> None:
    with Connection(groups=("telemetry",)) as c:
        pid = sample_id(c)
        c.attach(pid)
        to_mode(c, pid, "recommendation")
        before = counters(c, pid)
        c.recommend(pid, [(k, 20, 10_000) for k in range(64)])
        t_ack = time.monotonic_ns()
        tel, fb = collect(c, 0.5, min_records=100)
        new = tel[tel["ts_ns"] > t_ack]
        assert len(new) > 50
        assert np.all(new["arm"] == ARM.value("model"))
        assert np.all(new["decision"] == 20)
        assert np.all(new["flags"] & FLAGS.value("has-shadow"))
        fbm = fb[fb["seq"] >= new["seq"].min()]
        assert len(fbm) > 0 and np.all(fbm["arm"] == ARM.value("model")) and np.all(fbm["decision"] == 20)
        mid = counters(c, pid)
        assert mid["decisions-model"] - before["decisions-model"] >= len(new)
        assert mid["recs-received"] - before["recs-received"] == 64
        assert mid["recs-applied"] > before["recs-applied"]

        c.recommend(pid, [(k, 100, 10_000) for k in range(64)])  # above max 64
        t_ack = time.monotonic_ns()
        tel, _ = collect(c, 0.4, min_records=50)
        new = tel[tel["ts_ns"] > t_ack]
        assert len(new) > 20
        assert np.all(new["decision"] == 64)
        assert np.all(new["flags"] & FLAGS.value("clamped"))
        assert counters(c, pid)["recs-clamped"] - mid["recs-clamped"] >= len(new)


def test_emergency_ignores_fresh_recs_and_counts_them(modules: Any) -> None:
    with Connection(groups=("telemetry",)) as c:
        pid = sample_id(c)
        assert c.proxy(pid)["mode"] == MODE.value("emergency")
        before = counters(c, pid)
        c.recommend(pid, [(k, 40, 10_000) for k in range(64)])
        t_ack = time.monotonic_ns()
        tel, _ = collect(c, 0.4, min_records=50)
        new = tel[tel["ts_ns"] > t_ack]
        assert len(new) > 20
        assert np.all(new["arm"] == ARM.value("default"))
        assert np.all(new["decision"] == DEFAULT_WINDOW)
        assert np.all(new["shadow"] == 40)
        after = counters(c, pid)
        assert after["recs-ignored"] - before["recs-ignored"] >= len(new)
        assert after["decisions-model"] == before["decisions-model"]


def test_expired_recs_are_counted_once_and_the_default_decides(modules: Any) -> None:
    with Connection(groups=("telemetry",)) as c:
        pid = sample_id(c)
        c.attach(pid)
        to_mode(c, pid, "recommendation")
        before = counters(c, pid)
        c.recommend(pid, [(k, 30, 1) for k in range(64)])
        time.sleep(0.3)
        t_late = time.monotonic_ns()
        tel, _ = collect(c, 0.5, min_records=100)
        late = tel[tel["ts_ns"] > t_late]
        assert len(late) > 50
        assert np.all(late["arm"] == ARM.value("default")), "expired recs must not be applied"
        after = counters(c, pid)
        expired = after["recs-expired"] - before["recs-expired"]
        assert 0 < expired <= 64, expired


def test_collaboration_splits_decisions_by_share(modules: Any) -> None:
    with Connection(groups=("telemetry",)) as c:
        pid = sample_id(c)
        to_mode(c, pid, "collaboration")
        c.set_params(pid, share=500)
        c.recommend(pid, [(k, 33, 10_000) for k in range(64)])
        t_ack = time.monotonic_ns()
        tel, _ = collect(c, 0.6, min_records=200)
        new = tel[tel["ts_ns"] > t_ack]
        assert len(new) > 100
        model = new["arm"] == ARM.value("model")
        assert 0.3 < model.mean() < 0.7, model.mean()
        assert np.all(new["decision"][model] == 33)
        assert np.all(new["decision"][~model] == DEFAULT_WINDOW)


def test_illegal_transition_rejected_with_extack(modules: Any) -> None:
    with Connection() as c:
        pid = sample_id(c)
        with pytest.raises(NetlinkError) as ei:
            c.set_mode(pid, "recommendation")
        assert ei.value.errno == errno.EINVAL and ei.value.extack
        assert c.proxy(pid)["mode"] == MODE.value("emergency")


def test_recommend_batch_is_all_or_nothing(modules: Any) -> None:
    with Connection() as c:
        pid = sample_id(c)
        before = counters(c, pid)["recs-received"]
        for recs, code in (([(1, 5, 100), (64, 5, 100)], errno.EINVAL),   # key >= nkeys
                           ([(1, 5, 100), (2, 5, 0)], errno.EINVAL),      # ttl 0
                           ([(1, 5, 100), (2, 5, 60_001)], errno.EINVAL)):  # ttl > max
            with pytest.raises(NetlinkError) as ei:
                c.recommend(pid, recs)
            # the extack points at the offending rec's own attribute (the second one)
            assert ei.value.errno == code and ei.value.extack.endswith("[attribute recs[1]]"), ei.value
        rec_dt = codec.struct_dtype("rec")
        big = np.zeros(SPEC.consts["max-recs"] + 1, rec_dt)
        big["ttl_ms"] = 100
        with pytest.raises(NetlinkError) as ei:
            c.request("recommend", {"id": pid, "recs": big})
        assert ei.value.errno == errno.E2BIG and ei.value.extack
        raw = pack_attr(SPEC.attr_sets["proxy"].by_name["id"].value, struct.pack("=I", pid))
        raw += pack_attr(SPEC.attr_sets["proxy"].by_name["recs"].value, b"\1" * 13)
        err = [m for m in c.request_raw(SPEC.op_by_name["recommend"].value, raw) if m.error]
        assert err and err[0].error == -errno.EINVAL and "one struct kmlbus_rec" in err[0].extack
        with pytest.raises(NetlinkError) as ei:
            c.recommend(4242, [(0, 1, 1)])
        assert ei.value.errno == errno.ENOENT and ei.value.extack
        assert counters(c, pid)["recs-received"] == before


# ---- privileges -----------------------------------------------------------------------------

_UNPRIV = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
from kmlbus.wire.netlink import Connection, NetlinkError
# import first (the interpreter's files may be root-only), then drop to nobody: no capabilities
os.setgroups([]); os.setgid(65534); os.setuid(65534)
out = {}
with Connection() as c:
    pid = c.proxy("sample")["id"]
    out["dump"] = len(c.proxies())
    for op, attrs in (("set-mode", {"id": pid, "mode": "learning"}),
                      ("set-params", {"id": pid, "share": 1}),
                      ("attach", {"id": pid}),
                      ("detach", {"id": pid}),
                      ("recommend", {"id": pid, "recs": b"\0" * 8 + b"\x01\0\0\0"})):
        try:
            c.request(op, attrs)
            out[op] = 0
        except NetlinkError as e:
            out[op] = e.errno
    for g in ("telemetry", "events"):
        try:
            c.join(g)
            out["join " + g] = 0
        except OSError as e:
            out["join " + g] = e.errno
print(json.dumps(out))
"""


def test_unprivileged_control_requests_and_group_joins_get_eperm_and_change_nothing(modules: Any) -> None:
    with Connection() as c:
        pid = sample_id(c)
        before = c.proxy(pid)
        r = subprocess.run([sys.executable, "-c", _UNPRIV, str(project_root())], capture_output=True,
                           text=True, timeout=120, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert out.pop("dump") >= 1, "reading state is allowed to anyone"
        assert out == {op: errno.EPERM for op in out}, out
        after = c.proxy(pid)
        for k in ("mode", "share", "bus-portid", "explore", "stale-ms"):
            assert after[k] == before[k], k
        assert after["counters"]["recs-received"] == before["counters"]["recs-received"]


# ---- the bus going away ---------------------------------------------------------------------

_ATTACHED_CHILD = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from kmlbus.wire.netlink import Connection
c = Connection()
pid = c.proxy("sample")["id"]
c.attach(pid)
c.set_mode(pid, "learning")
print(c.portid, flush=True)
time.sleep(600)
"""


def test_killed_bus_drops_its_proxy_to_emergency_and_others_hear_bus_gone(modules: Any) -> None:
    with Connection(groups=("events",)) as watcher:
        pid = sample_id(watcher)
        child = subprocess.Popen([sys.executable, "-c", _ATTACHED_CHILD, str(project_root())],
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            portid = int(child.stdout.readline())
            p = watcher.proxy(pid)
            assert p["bus-portid"] == portid and p["mode"] == MODE.value("learning")
            watcher.recv(timeout=0.2)  # the learning event
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        # socket release runs before the child can be reaped: no decision after it sees learning
        p = watcher.proxy(pid)
        assert p["mode"] == MODE.value("emergency") and p["bus-portid"] == 0
        assert p["reason"] == REASON.value("bus-gone")
        events = []
        end = time.monotonic() + 5
        while time.monotonic() < end and not events:
            events = [m for m in watcher.recv(timeout=0.2) if m.op == "mode-event"
                      and m.attrs["reason"] == REASON.value("bus-gone")]
        assert events, "no mode-event with reason bus-gone"
        ev = events[0].attrs
        assert ev["id"] == pid and ev["name"] == "sample"
        assert ev["mode"] == MODE.value("emergency") and ev["old-mode"] == MODE.value("learning")


def test_detach_drops_to_emergency_with_reason_detach(modules: Any) -> None:
    with Connection(groups=("events",)) as c:
        pid = sample_id(c)
        c.attach(pid)
        c.set_mode(pid, "learning")
        c.detach(pid)
        p = c.proxy(pid)
        assert p["mode"] == MODE.value("emergency") and p["bus-portid"] == 0
        evs = [m.attrs for m in c.recv(timeout=1.0) if m.op == "mode-event"]
        assert evs and evs[-1]["reason"] == REASON.value("detach")
        with pytest.raises(NetlinkError) as ei:
            c.detach(pid)
        assert ei.value.extack


def test_second_bus_cannot_steal_an_attached_proxy(modules: Any) -> None:
    with Connection() as a, Connection() as b:
        pid = sample_id(a)
        a.attach(pid)
        with pytest.raises(NetlinkError) as ei:
            b.attach(pid)
        assert ei.value.errno == errno.EBUSY and ei.value.extack
        assert a.proxy(pid)["bus-portid"] == a.portid


def test_stale_recommendations_demote_to_emergency(modules: Any) -> None:
    with Connection(groups=("events",)) as c:
        pid = sample_id(c)
        c.set_params(pid, stale_ms=200)
        to_mode(c, pid, "collaboration")
        end = time.monotonic() + 5
        stale = []
        while time.monotonic() < end and not stale:
            stale = [m for m in c.recv(timeout=0.2)
                     if m.op == "mode-event" and m.attrs["reason"] == REASON.value("stale")]
        assert stale, "no stale demotion within 5 s"
        assert c.proxy(pid)["mode"] == MODE.value("emergency")


# ---- module reload --------------------------------------------------------------------------

NETLINK_GENERIC = 16
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
GENL_ID_CTRL = 0x10
CTRL_CMD_DELFAMILY = 2
CTRL_ATTR_FAMILY_NAME = 2


def _delfamily_names(data: bytes) -> list[str]:
    names = []
    off = 0
    while off + 20 <= len(data):
        ln, typ = struct.unpack_from("=IH", data, off)
        if ln < 16:
            break
        if typ == GENL_ID_CTRL and data[off + 16] == CTRL_CMD_DELFAMILY:
            a = off + 20
            while a + 4 <= off + ln:
                alen, atyp = struct.unpack_from("=HH", data, a)
                if alen < 4:
                    break
                if atyp & 0x3FFF == CTRL_ATTR_FAMILY_NAME:
                    names.append(data[a + 4:a + alen].split(b"\0")[0].decode())
                a += (alen + 3) & ~3
        off += (ln + 3) & ~3
    return names


def test_rmmod_insmod_with_a_subscribed_client(modules: Any) -> None:
    with GenlSocket() as ctl:
        notify = ctl.get_family("nlctrl").groups["notify"]
    raw = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
    raw.bind((0, 0))
    raw.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, notify)
    raw.settimeout(5.0)
    sub = Connection(groups=("telemetry", "events"))
    try:
        sub.attach(sample_id(sub))
        sub.recv(timeout=0.3)
        rmmod("kmlbus_sample")
        rmmod("kmlbus")
        seen: list[str] = []
        end = time.monotonic() + 5
        while time.monotonic() < end and "kmlbus" not in seen:
            try:
                seen += _delfamily_names(raw.recv(65536))
            except TimeoutError:
                break
        assert "kmlbus" in seen, "no CTRL_CMD_DELFAMILY for kmlbus on nlctrl notify"
        with pytest.raises(ModuleNotLoaded):
            Connection()
        sub.recv(timeout=0.1)  # whatever was queued; must not raise
    finally:
        sub.close()
        raw.close()
        if not is_loaded("kmlbus"):
            insmod(KMLBUS_KO)
        if not is_loaded("kmlbus_sample"):
            insmod(SAMPLE_KO)
    with Connection(groups=("telemetry",)) as c:
        assert c.proxy("sample")["bus-portid"] == 0
        tel, _ = collect(c, 0.3, min_records=10)
        assert len(tel) >= 10


def test_kmlbus_cannot_be_removed_while_the_sample_uses_it(modules: Any) -> None:
    r = subprocess.run(["rmmod", "kmlbus"], capture_output=True, text=True)
    assert r.returncode != 0
    assert is_loaded("kmlbus") and is_loaded("kmlbus_sample")


# ---- observability and the workload knobs ---------------------------------------------------

TRACING = "/sys/kernel/tracing"


@pytest.mark.skipif(not os.path.isdir(f"{TRACING}/events"), reason="tracefs not mounted")
def _toggle_kmlbus_events(ev: str, on: bool) -> None:
    """Enable or disable both events with the sample paused.

    Toggling a tracepoint rewrites kernel text (text_poke_bp, with IPIs to
    every CPU).  Once, in a CI run under TCG, the guest hung in this test:
    a soft lockup in the test's process on one CPU, the RCU kthread starved
    on the other, where the sample decides 2000 times a second through the
    rec_applied site; 25 further tries did not reproduce it, and the cause is
    not established.  With the sample paused, no CPU runs that site while it
    is being rewritten.
    """
    from kmlbus.vm.guest import set_sample_rate

    set_sample_rate(0)
    time.sleep(0.02)  # a tick already running finishes its decisions
    try:
        for e in ("kmlbus_mode_change", "kmlbus_rec_applied"):
            with open(f"{ev}/{e}/enable", "w") as f:
                f.write("1" if on else "0")
    finally:
        set_sample_rate(2000)


def test_tracepoints_fire_on_mode_change_and_applied_rec(modules: Any) -> None:
    ev = f"{TRACING}/events/kmlbus"
    assert os.path.isdir(f"{ev}/kmlbus_mode_change") and os.path.isdir(f"{ev}/kmlbus_rec_applied")
    with open(f"{TRACING}/trace", "w"):
        pass  # clear
    _toggle_kmlbus_events(ev, True)
    try:
        with Connection() as c:
            pid = sample_id(c)
            to_mode(c, pid, "recommendation")
            c.recommend(pid, [(k, 12, 10_000) for k in range(64)])
            time.sleep(0.3)
    finally:
        _toggle_kmlbus_events(ev, False)
    with open(f"{TRACING}/trace") as f:
        trace = f.read()
    assert "kmlbus_mode_change:" in trace and "name=sample" in trace
    assert "kmlbus_rec_applied:" in trace and "value=12" in trace


def test_sample_rate_zero_pauses_decisions(modules: Any) -> None:
    from kmlbus.vm.guest import set_sample_rate

    with Connection() as c:
        pid = sample_id(c)
        set_sample_rate(0)
        try:
            time.sleep(0.1)
            a = counters(c, pid)["samples"]
            time.sleep(0.4)
            assert counters(c, pid)["samples"] == a
        finally:
            set_sample_rate(2000)
        time.sleep(0.3)
        assert counters(c, pid)["samples"] > a
