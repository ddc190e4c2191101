"""The host capacity benchmark measures like with like: both readers take every sample."""

from __future__ import annotations

from pathlib import Path

from kmlbus.contract import spec as kspec
from kmlbus.tools import bench_capacity as cap
from kmlbus.tools.rawtelemetry import TelemetryParser
from kmlbus.wire import codec


def test_floor_and_bus_take_the_same_samples_and_the_bus_recommends(tmp_path: Path) -> None:
    data = cap.datagrams(600)
    per = int(kspec.load().consts["msg-samples"])
    assert cap.floor_pass(data, TelemetryParser(cap.FAMILY_ID)) == 600 * per
    d = cap._dispatcher(tmp_path)
    assert cap.bus_pass(data, d) == 600 * per
    c = d.counters_of("sample")
    # one batch per receive's worth (256 datagrams), one recommendation per key in each
    assert c.batches == 3 and c.recs_sent == 3 * cap.NKEYS


def test_recorded_datagrams_are_what_the_kernel_sends() -> None:
    (d,) = cap.datagrams(1)
    m = codec.peek_event(d, cap.FAMILY_ID, views=False)
    assert m is not None and m.op == "telemetry" and m.attrs["id"] == cap.PROXY_ID
    assert len(m.attrs["records"]) == int(kspec.load().consts["msg-samples"])
