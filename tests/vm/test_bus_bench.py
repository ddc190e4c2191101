"""``kmlbus bench`` (a) measures what it says: real round trips, on both paths, applied by the kernel.

No timing assertions (the numbers are the benchmark's to print): these check
that both paths answer real batches, that every latency runs from a sample the
kernel stamped to a send after it, and that the kernel applied what was sent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kmlbus.tools import bench
from kmlbus.wire.netlink import Connection


@pytest.mark.sample_params(rate=500)
def test_interleaved_round_trips_are_real_and_applied(modules: Any, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KMLBUS_STATE", str(tmp_path / "state.json"))
    with Connection() as ctl:
        pid = int(ctl.proxy("sample")["id"])
        bus = bench._bus(tmp_path)
        try:
            received0 = ctl.proxy(pid)["counters"]["recs-received"]
            d0 = bus.dispatcher.counters_of("sample").recs_sent
            floor, lat = bench.interleaved_roundtrip(pid, bus, 3.0, rounds=3)
            received = ctl.proxy(pid)["counters"]["recs-received"] - received0
            sent = bus.dispatcher.counters_of("sample").recs_sent - d0
        finally:
            bus.shutdown()
    assert len(floor.e2e) >= 10 and len(lat.e2e) >= 10, (len(floor.e2e), len(lat.e2e))
    for path in (floor, lat):
        assert len(path.e2e) == len(path.user)
        assert all(0 < u <= e for e, u in zip(path.e2e, path.user)), path
    # every floor batch sent one rec, and the bus's dispatcher counted what it sent: the
    # kernel received exactly those (a refused request would have received nothing)
    assert received == len(floor.e2e) + sent, (received, len(floor.e2e), sent)
    assert sent >= len(lat.e2e)
