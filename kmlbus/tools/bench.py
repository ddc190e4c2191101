"""``kmlbus bench``: what the bus costs, as ratios against a floor measured in the same run.

Two measurements against the real module and the sample proxy:

(a) decision round trip.  For each telemetry batch: from the newest sample's
    kernel timestamp (``ts-ns``, CLOCK_MONOTONIC) and from the moment the
    batch was read, to the moment the kernel has applied the recommendations
    made from it.  Netlink runs a request in the sender's context, so that
    moment is when the ``send`` of the ``recommend`` returns; neither path
    asks for an ACK (the bus learns of refusals afterwards).  The bus path is
    the daemon's: a batch that ends an idle wait is answered from its bytes
    (the fast lane: latest sample per key, the ONNX model, one ``recommend``)
    before it is decoded, and evidence, learning and tracing follow the send;
    a batch found waiting goes through the decoded path.  User-space time
    starts when the datagram was read.  The floor is a raw-socket echo
    through the same family that answers every batch with one pre-encoded
    recommendation and no decoding at all.  The two alternate, in
    :data:`ROUNDS` windows each, so that the machine's drift falls on both.

(b) batched throughput.  Samples per second taken off the socket by the whole
    bus (decode, evidence, model, recommendations) versus a bare raw-socket
    reader that only counts records, with the sample workload running as fast
    as the ``--rate`` asks; the kernel's own production rate and drops are
    printed beside them.

(c) the kernel side (:mod:`kmlbus.tools.bench_kernel`): nanoseconds per
    ``kml_proxy_decide`` with and without a fresh recommendation against an
    empty callback, and telemetry delivered with 32 records per message versus
    one.

Numbers are printed, never asserted: these machines are noisy and QEMU's TCG
is several times slower than hardware.  Where this kernel cannot load
modules, the benchmark runs itself inside the VM (:mod:`kmlbus.vm`).
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import numpy as np

from kmlbus.bus import models
from kmlbus.bus.config import loads
from kmlbus.bus.daemon import Bus
from kmlbus.tools.rawtelemetry import TelemetryReader
from kmlbus.wire import codec, netlink

__all__ = ["main"]

RATE_PARAM = Path("/sys/module/kmlbus_sample/parameters/rate")


@dataclass
class Lat:
    """Latencies (ns) of one path: from kernel timestamp, and user-space only."""

    e2e: list[int]
    user: list[int]

    def pct(self, which: str, q: float) -> float:
        v = getattr(self, which)
        return float(np.percentile(v, q)) / 1000.0 if v else float("nan")


def _set_rate(rate: int) -> None:
    RATE_PARAM.write_text(f"{rate}\n")


def _echo_request(family_id: int, proxy_id: int) -> bytearray:
    recs = np.zeros(1, dtype=codec.struct_dtype("rec"))
    recs["value"], recs["ttl_ms"] = 8, 100
    return bytearray(codec.encode_msg(family_id, "recommend", {"id": proxy_id, "recs": recs}, seq=1,
                                      flags=codec.NLM_F_REQUEST))


def floor_roundtrip(sender: netlink.Connection, proxy_id: int, seconds: float) -> Lat:
    """Raw echo: answer each telemetry batch with one pre-encoded recommend (no ACK asked),
    sent on *sender*, the socket the proxy is attached to (the kernel takes recommendations
    of an attached proxy from its bus's socket only)."""
    peer = TelemetryReader(sender.family_id, sender.groups["telemetry"], timeout=0.2)
    req = _echo_request(sender.family_id, proxy_id)
    out = Lat([], [])
    seq = 1
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            for b in peer.read() or ():
                if b.records == 0:
                    continue
                seq += 1
                struct.pack_into("=I", req, 8, seq)
                sender.send_frame(req)  # returns once the kernel has run it
                t_done = time.monotonic_ns()
                out.e2e.append(t_done - b.newest_ts)
                out.user.append(t_done - b.read_ns)
    finally:
        peer.close()
    return out


class TimedConnection(netlink.Connection):
    """The bus's connection, noting the instants (a) measures: when what the bus answers
    was read (the datagram that ended an idle wait, or a backlog), when a ``recommend``
    returned (the kernel had run it), and the messages the last receive took (for their
    kernel timestamps, read after the send)."""

    read_ns = 0
    sent_ns = 0
    taken: list[codec.Message] = []

    def wait_datagram(self, timeout: float | None = None) -> bytes | None:
        data = super().wait_datagram(timeout)
        if data is not None:
            self.read_ns = time.monotonic_ns()
        return data

    def accept(self, data: bytes) -> list[codec.Message]:
        self.taken = super().accept(data)
        return self.taken

    def recv(self, timeout: float | None = None) -> list[codec.Message]:
        self.taken = super().recv(timeout)
        if self.taken:
            self.read_ns = time.monotonic_ns()
        return self.taken

    def recommend(self, proxy_id: int, recs: Any, *, wait: bool = True) -> None:
        super().recommend(proxy_id, recs, wait=wait)
        self.sent_ns = time.monotonic_ns()


def _bus(workdir: Path) -> Bus:
    (workdir / "good.onnx").write_bytes(models.to_bytes(models.sample_good_model()))
    cfg = loads("[bus]\nttl_ms = 300\nlatency_budget_ms = 1000\n[proxy.sample]\nmodel = \"good.onnx\"\n",
                workdir / "bench.toml")
    bus = Bus(cfg, state_path=workdir / "state.json",
              opener=lambda groups, *, rcvbuf=8 << 20: TimedConnection(groups=groups, rcvbuf=rcvbuf))
    if not bus.connect():
        raise netlink.ModuleNotLoaded()
    for p in bus.proxies.values():
        p.modes.pin("learning")  # recommending, and held there whatever the evidence
    return bus


def bus_roundtrip(bus: Bus, seconds: float) -> Lat:
    """The whole bus per batch: fast lane, decode, evidence, model, recommend (applied when sent)."""
    out = Lat([], [])
    end = time.monotonic() + seconds
    conn, ctl = bus.conn, bus.ctl
    assert isinstance(conn, TimedConnection) and isinstance(ctl, TimedConnection)
    while time.monotonic() < end:
        sent_before, read_before = ctl.sent_ns, conn.read_ns
        conn.taken = []
        bus.receive(0.2)
        t_read = conn.read_ns
        # the newest sample's timestamp is read after the send: measuring is not the bus's cost
        ts = [int(m.attrs["records"]["ts_ns"].max()) for m in conn.taken
              if m.op == "telemetry" and len(m.attrs.get("records", ()))]
        if ts and ctl.sent_ns != sent_before and t_read != read_before:
            t_done = ctl.sent_ns  # the kernel had them then; bookkeeping follows
            out.e2e.append(t_done - max(ts))
            out.user.append(t_done - t_read)
    return out


#: (a) alternates the floor and the bus in this many windows each, so that the drift of
#: a shared, emulated machine between two windows falls on both sides alike
ROUNDS = 5


def interleaved_roundtrip(proxy_id: int, bus: Bus, seconds: float,
                          rounds: int = ROUNDS) -> tuple[Lat, Lat]:
    """(floor, bus) round trips, measured in alternating windows of ``seconds / rounds``.

    The bus's socket leaves the telemetry group while the echo runs, so it
    neither buffers batches nor competes for them; the echo sends on the bus's
    control socket, the one the proxy is attached to.
    """
    conn = bus.conn
    assert conn is not None
    floor, lat = Lat([], []), Lat([], [])
    for _ in range(rounds):
        conn.leave("telemetry")
        bus.handle_all(conn.recv(timeout=0))
        assert isinstance(bus.ctl, netlink.Connection)
        f = floor_roundtrip(bus.ctl, proxy_id, seconds / rounds)
        conn.join("telemetry")
        b = bus_roundtrip(bus, seconds / rounds)
        floor.e2e += f.e2e
        floor.user += f.user
        lat.e2e += b.e2e
        lat.user += b.user
    return floor, lat


def _throughput(loop: Callable[[float], int], conn: netlink.Connection, proxy_id: int,
                seconds: float) -> tuple[float, float, float]:
    """(samples/s taken by *loop*, samples/s the kernel produced, drops+unheard/s)."""
    c0 = conn.proxy(proxy_id)["counters"]
    t0 = time.monotonic()
    n = loop(seconds)
    dt = time.monotonic() - t0
    c1 = conn.proxy(proxy_id)["counters"]
    made = (c1["samples"] - c0["samples"]) / dt
    lost = (c1["drops"] - c0["drops"]) / dt
    return n / dt, made, lost


def main(args: argparse.Namespace) -> int:
    """``kmlbus bench``: here where the module loads, else inside the VM."""
    from kmlbus.tools import demo

    if not (getattr(args, "here", False) or demo.can_load_modules()):
        from kmlbus import vm

        print("kmlbus bench: this kernel cannot load modules; booting the Debian kernel under QEMU",
              flush=True)
        return vm.run([sys.executable, "-m", "kmlbus", "bench", "--here", "--seconds", str(args.seconds),
                       "--rate", str(args.rate)], timeout=args.seconds * 10 + 400)
    loaded = demo.load_modules()
    try:
        return _run(args.seconds, args.rate)
    finally:
        if loaded:
            demo.unload_modules()


def _run(seconds: float, rate: int) -> int:
    work = Path(tempfile.mkdtemp(prefix="kmlbus-bench-"))
    os.environ.setdefault("KMLBUS_STATE", str(work / "state.json"))
    ctl = netlink.Connection()
    pid = int(ctl.proxy("sample")["id"])
    old_rate = RATE_PARAM.read_text().strip()
    try:
        _set_rate(500)
        bus = _bus(work)
        try:
            bus_roundtrip(bus, 1.0)  # warm up onnxruntime and the caches
            floor, lat = interleaved_roundtrip(pid, bus, seconds)

            _set_rate(rate)
            # The bus's socket must not buffer batches while the floor is measured.
            assert bus.conn is not None
            bus.conn.leave("telemetry")
            bus.conn.recv(timeout=0)
            peer = TelemetryReader(ctl.family_id, ctl.groups["telemetry"], timeout=0.2)

            def bare(sec: float) -> int:
                n, end = 0, time.monotonic() + sec
                while time.monotonic() < end:
                    n += sum(b.records for b in peer.read() or ())
                return n

            try:
                raw_tp = _throughput(bare, ctl, pid, seconds)
            finally:
                peer.close()

            bus.conn.join("telemetry")

            def whole_bus(sec: float) -> int:
                assert bus.conn is not None
                c = bus.dispatcher.counters_of("sample")
                before = c.records
                end = time.monotonic() + sec
                while time.monotonic() < end:
                    bus.handle_all(bus.conn.recv(timeout=0.2))
                return bus.dispatcher.counters_of("sample").records - before

            bus_tp = _throughput(whole_bus, ctl, pid, seconds)
        finally:
            bus.shutdown()
    finally:
        RATE_PARAM.write_text(old_rate + "\n")
        ctl.close()

    print(f"\nkmlbus bench ({seconds:.0f} s per measurement; kernel {os.uname().release})\n")
    print("(a) decision round trip: batch -> recommendations applied by the kernel, microseconds")
    print(f"    {'path':<44} {'p50':>9} {'p99':>9} {'x floor p50':>12} {'batches':>8}")
    for name, which in (("from newest sample's kernel timestamp", "e2e"), ("from batch read (user space only)", "user")):
        f50, f99 = floor.pct(which, 50), floor.pct(which, 99)
        b50, b99 = lat.pct(which, 50), lat.pct(which, 99)
        print(f"    raw echo floor, {name:<28} {f50:9.0f} {f99:9.0f} {1.0:12.2f} {len(floor.e2e):8d}")
        print(f"    whole bus,      {name:<28} {b50:9.0f} {b99:9.0f} {b50 / f50:12.2f} {len(lat.e2e):8d}")
    print(f"\n(b) batched throughput at --rate {rate}, samples per second")
    print(f"    {'reader':<30} {'taken':>10} {'kernel made':>12} {'lost/s':>8} {'x floor':>8}")
    print(f"    {'bare raw-socket reader':<30} {raw_tp[0]:10.0f} {raw_tp[1]:12.0f} {raw_tp[2]:8.0f} {1.0:8.2f}")
    print(f"    {'whole bus (model + recs)':<30} {bus_tp[0]:10.0f} {bus_tp[1]:12.0f} {bus_tp[2]:8.0f} "
          f"{bus_tp[0] / raw_tp[0] if raw_tp[0] else float('nan'):8.2f}")
    print("\n(x floor: bus / floor for latency, bus / floor for throughput; targets: <= 3x on (a), >= 0.5x on (b))")
    print("\n(c) the kernel side: kmlbus_bench.ko and the telemetry batching knob\n")
    from kmlbus.tools import bench_kernel

    return bench_kernel.main(["--seconds", f"{min(seconds, 3.0):g}"])
