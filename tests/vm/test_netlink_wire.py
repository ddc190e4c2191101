"""The Python wire layer (kmlbus.wire.codec + kmlbus.wire.netlink) against the real kmlbus.ko.

Runs inside the guest (``python -m kmlbus.vm test``) with kmlbus.ko and the
sample workload loaded by the ``modules`` fixture.  The kernel semantics are
tested in test_kernel_netlink.py; these tests prove what the transport
promises: family resolution, dump decoding, zero-copy telemetry views,
errors with extack naming the bad attribute, events never swallowed by a
request, receive-buffer overruns survived.
"""

from __future__ import annotations

import errno
import json
import time
from typing import Any

import numpy as np
import pytest

from kmlbus.contract import spec as kspec
from kmlbus.tools import bench_wire
from kmlbus.wire import codec
from kmlbus.wire.netlink import Connection, KmlbusError, NetlinkError

pytestmark = pytest.mark.vm

SPEC = kspec.load()
MODE = SPEC.enums["mode"]
REASON = SPEC.enums["reason"]
GENL_ADMIN_PERM = 0x01


def sample(c: Connection) -> dict[str, Any]:
    (p,) = [p for p in c.proxies() if p["name"] == "sample"]
    return p


def wait_for(c: Connection, op: str, seconds: float = 5.0) -> list[codec.Message]:
    """Messages of *op* received within *seconds* (stops at the first batch that has one)."""
    end = time.monotonic() + seconds
    got: list[codec.Message] = []
    while time.monotonic() < end and not got:
        got = [m for m in c.recv(timeout=0.2) if m.op == op]
    return got


def test_connection_resolves_family_ops_groups_and_port(modules: Any) -> None:
    with Connection() as c:
        assert c.family_id >= 0x10 and c.family_name == SPEC.name and c.version == SPEC.version
        assert set(c.groups) == set(SPEC.mcast_groups) and all(g > 0 for g in c.groups.values())
        for o in SPEC.ops:
            if o.do_request is not None:
                assert bool(c.ops[o.value] & GENL_ADMIN_PERM) == o.admin, o.name
        assert c.portid > 0 and c.stats["malformed"] == 0


def test_dump_decodes_the_sample_proxy_into_typed_values(modules: Any) -> None:
    with Connection() as c:
        p = sample(c)
        assert isinstance(p["id"], int) and isinstance(p["name"], str)
        assert codec.enum_name("mode", p["mode"]) == "emergency"
        assert [f["name"] for f in p["feature"]] == ["seq_ratio", "req_size", "noise"]
        assert p["recommendation"]["min"] == 1 and p["recommendation"]["max"] == 64
        assert all(isinstance(v, int) for v in p["counters"].values())
        assert "unknown" not in p, "the kernel sends attributes the spec does not know"
        by_id, by_name = c.proxy(p["id"]), c.proxy("sample")
        assert by_id["id"] == by_name["id"] == p["id"] and by_id.keys() == p.keys()


def test_telemetry_and_feedback_arrive_as_zero_copy_numpy_records(modules: Any) -> None:
    with Connection(groups=("telemetry",)) as c:
        tel = wait_for(c, "telemetry")
        fb = wait_for(c, "feedback")
    assert tel and fb
    recs = codec.records(tel[0].attrs)
    assert recs.dtype == codec.run_dtype("sample") and len(recs) >= 1
    assert not recs.flags.owndata and not recs.flags.writeable  # a view of the received datagram
    assert recs is tel[0].attrs["records"] and isinstance(tel[0].attrs["drops"], int)
    assert np.all(recs["seq"] > 0) and np.all(recs["key"] < 64)
    f = codec.records(fb[0].attrs)
    assert f.dtype == codec.run_dtype("feedback") and np.all(f["seq"] > 0)


def test_bad_requests_raise_netlink_error_with_extack(modules: Any) -> None:
    with Connection() as c:
        pid = sample(c)["id"]
        with pytest.raises(NetlinkError) as ei:
            c.set_mode(pid, "recommendation")  # emergency -> recommendation is not in the graph
        e = ei.value
        assert e.errno == errno.EINVAL and e.extack and e.op == "set-mode"
        assert str(e).startswith("kmlbus set-mode: Invalid argument (") and "\n" not in str(e)

        with pytest.raises(NetlinkError) as ei:
            c.proxy(60000)
        assert ei.value.extack and "[attribute id]" in ei.value.extack, ei.value.extack

        with pytest.raises(NetlinkError) as ei:
            c.recommend(pid, [(1, 8, 100), (1000, 8, 100)])  # key 1000 >= nkeys 64
        assert ei.value.errno in (errno.EINVAL, errno.ERANGE) and ei.value.extack
        assert "recs" in ei.value.extack, ei.value.extack


def test_request_raw_reports_kernel_errors_without_raising(modules: Any) -> None:
    with Connection() as c:
        replies = c.request_raw(SPEC.op_by_name["attach"].value, b"")  # no proxy id
        assert replies[-1].type == codec.NLMSG_ERROR
        assert replies[-1].error == -errno.EINVAL and replies[-1].extack
        ok = c.request_raw(SPEC.op_by_name["get"].value, codec.encode_attrs("proxy", {"name": "sample"}))
        assert [m.type for m in ok] == [c.family_id, codec.NLMSG_ERROR] and ok[-1].error == 0
        assert ok[0].attrs["name"] == "sample"


def test_mode_events_caused_by_our_own_request_reach_recv(modules: Any) -> None:
    # The kernel may stamp a notification with the triggering request's seq; the
    # transport must still hand it to recv() instead of taking it for the reply.
    with Connection(groups=("events",)) as c:
        pid = sample(c)["id"]
        c.attach(pid)
        c.set_mode(pid, "learning")
        evs: list[codec.Message] = []
        end = time.monotonic() + 5.0
        while not evs and time.monotonic() < end:
            evs = [m for m in wait_for(c, "mode-event", 0.5)
                   if m.attrs["id"] == pid and m.attrs["mode"] == MODE.value("learning")]
        assert evs, "no mode-event for our own set-mode"
        ev = evs[0]
        assert ev.attrs["mode"] == MODE.value("learning")
        assert ev.attrs["old-mode"] == MODE.value("emergency")
        assert ev.attrs["reason"] == REASON.value("operator")
        c.set_mode(pid, "emergency")


def test_recommend_accepts_tuples_and_struct_arrays_and_splits_big_batches(modules: Any) -> None:
    with Connection() as c:
        pid = sample(c)["id"]
        c.attach(pid)
        before = c.proxy(pid)["counters"]["recs-received"]
        c.recommend(pid, [(k, 10, 1000) for k in range(64)])
        arr = np.zeros(SPEC.consts["max-recs"] + 10, dtype=codec.struct_dtype("rec"))
        arr["key"] = np.arange(len(arr)) % 64
        arr["value"], arr["ttl_ms"] = 12, 1000
        c.recommend(pid, arr)  # more than max-recs: two requests
        after = c.proxy(pid)["counters"]["recs-received"]
        assert after - before == 64 + len(arr)


def test_recommend_without_ack_is_applied_on_return_and_refusals_come_back_later(
        modules: Any) -> None:
    with Connection(groups=("telemetry",)) as c:
        pid = sample(c)["id"]
        before = c.proxy(pid)["counters"]["recs-received"]
        c.recommend(pid, [(k, 9, 1000) for k in range(8)], wait=False)
        # netlink ran the request in our send: the kernel counted it before we asked
        assert c.proxy(pid)["counters"]["recs-received"] - before == 8
        assert c.take_errors() == [] and c.stats["async_errors"] == 0
        c.recommend(pid, [(1, 9, 1000), (999, 9, 1000)], wait=False)  # key out of range
        c.recommend(pid, [(2, 9, 0)], wait=False)  # ttl 0
        time.sleep(0.1)
        errs = c.take_errors()
        assert [e.errno for e in errs] == [errno.EINVAL, errno.EINVAL], errs
        assert "nkeys" in str(errs[0]) and "ttl-ms" in str(errs[1]), errs
        assert all(e.op == "recommend" for e in errs)
        assert c.stats["async_errors"] == 2 and c.take_errors() == []
        # all-or-nothing: the refused batches changed nothing; telemetry still flows
        assert c.proxy(pid)["counters"]["recs-received"] - before == 8
        assert wait_for(c, "telemetry")


def test_wait_datagram_hands_out_the_datagram_that_ends_an_idle_wait_undecoded(modules: Any) -> None:
    """The daemon's fast lane hangs on this: after a wait, the first datagram comes out as
    bytes before it is decoded; accept() decodes it as recv would; the rest stays queued."""
    with Connection(groups=("telemetry",)) as c:
        for _ in range(50):
            c.recv(timeout=0)  # whatever is waiting: taken without waiting
            data = c.wait_datagram(1.0)
            if data is not None:
                break
        else:
            pytest.fail("no telemetry datagram after an idle wait")
        peeked = codec.peek_event(data, c.family_id)
        msgs = c.accept(data)
        assert len(msgs) == 1 and peeked is not None
        assert peeked.op == msgs[0].op == "telemetry" and peeked.attrs["id"] == msgs[0].attrs["id"]
        assert bytes(peeked.attrs["records"]) == msgs[0].attrs["records"].tobytes()
        time.sleep(0.05)
        assert c.wait_datagram(1.0) is None  # datagrams are waiting: none handed out, no wait
        assert c.recv(timeout=0)


def test_recommend_of_packed_rec_bytes_splits_at_max_recs_and_is_applied(modules: Any) -> None:
    """The daemon's hot path sends the dispatcher's packed ``rec`` bytes as they are."""
    sp = kspec.load()
    n = sp.consts["max-recs"] + 3
    recs = np.zeros(n, dtype=codec.struct_dtype("rec"))
    recs["key"], recs["value"], recs["ttl_ms"] = np.arange(n) % 64, 7, 1000
    with Connection() as c:
        pid = sample(c)["id"]
        before = c.proxy(pid)["counters"]["recs-received"]
        c.recommend(pid, recs.tobytes(), wait=False)  # two requests: max-recs, then 3
        assert c.proxy(pid)["counters"]["recs-received"] - before == n
        c.recommend(pid, recs[:2].tobytes(), wait=True)
        assert c.proxy(pid)["counters"]["recs-received"] - before == n + 2
        with pytest.raises(KmlbusError, match="whole number"):
            c.recommend(pid, recs.tobytes()[:-1], wait=False)
        assert c.take_errors() == [] and c.proxy(pid)["counters"]["recs-received"] - before == n + 2


def test_receive_buffer_overrun_is_counted_and_the_connection_keeps_working(modules: Any) -> None:
    with Connection(groups=("telemetry",), rcvbuf=4096) as c:
        time.sleep(1.0)  # 2000 decisions/s overflow a 4 KiB buffer many times over
        got: list[codec.Message] = []
        end = time.monotonic() + 3.0
        while time.monotonic() < end and (not got or c.stats["overruns"] == 0):
            got += c.recv(timeout=0.2)
        assert c.stats["overruns"] >= 1
        assert any(m.op == "telemetry" for m in got + c.recv(timeout=1.0))
        assert sample(c)["name"] == "sample"  # requests still work amid the flood


def test_requests_amid_telemetry_flood_lose_no_multicast(modules: Any) -> None:
    with Connection(groups=("telemetry",)) as c:
        pid = sample(c)["id"]
        wait_for(c, "telemetry")
        batches: list[tuple[np.ndarray, int]] = []
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            c.proxy(pid)  # telemetry arriving meanwhile is queued
            batches += [(codec.records(m.attrs)["seq"].copy(), m.attrs["drops"])
                        for m in c.recv(timeout=0) if m.op == "telemetry" and m.attrs["id"] == pid]
        assert len(batches) >= 5 and c.stats["malformed"] == 0
        # per-CPU rings: batches of two CPUs interleave, so look at the seqs in order
        s = np.sort(np.concatenate([b for b, _ in batches]).astype(np.int64))
        assert np.all(np.diff(s) >= 1), "telemetry repeated"
        if c.stats["overruns"] == 0:  # every gap must be a drop the kernel counted
            gaps = int(np.sum(np.diff(s) - 1))
            assert gaps <= batches[-1][1] - batches[0][1], "a telemetry batch went missing between requests"


def test_closed_connection_fails_with_an_os_error_not_a_hang(modules: Any) -> None:
    c = Connection()
    c.close()
    with pytest.raises((OSError, KmlbusError)):
        c.proxies()


def test_bench_wire_in_the_guest(modules: Any, capsys: pytest.CaptureFixture[str]) -> None:
    out = bench_wire.run(requests=30, decodes=150)  # a smoke run in CI: the numbers come from bench_wire itself
    assert out["kmlbus_get_raw_us"] > 0 and out["decode_numpy_us"] > 0
    with capsys.disabled():
        print("\nbench_wire (guest):", json.dumps({k: round(v, 2) for k, v in out.items()}))
