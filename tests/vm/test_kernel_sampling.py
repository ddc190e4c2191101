"""1-in-N sampling (``sample-period``) in the real kmlbus.ko: the share recorded, the exact
counter identities, feedback of unsampled decisions, and refused values changing nothing.

Runs inside the guest with the ``modules`` fixture (kmlbus.ko plus the sample workload,
paused with ``rate=0`` until a test sets its rate).  About 15 s of VM time.
"""

from __future__ import annotations

import errno
import os
import time
from typing import Any

import numpy as np
import pytest

from kmlbus.contract import spec as kspec
from kmlbus.vm.guest import set_sample_rate
from kmlbus.wire import codec
from kmlbus.wire.netlink import Connection, NetlinkError

pytestmark = pytest.mark.vm

MAX_PERIOD = int(kspec.load().consts["max-sample-period"])


def _run(c: Connection, pid: int, rate: int, seconds: float) -> tuple[dict[str, int], np.ndarray, np.ndarray]:
    """Counter deltas and the telemetry/feedback records received while the sample decides
    at *rate* for *seconds* (then paused until both rings are flushed)."""
    before = dict(c.proxy(pid)["counters"])
    tel: list[np.ndarray] = []
    fb: list[np.ndarray] = []

    def drain(timeout: float) -> None:
        for m in c.recv(timeout=timeout):
            if m.op == "telemetry" and m.attrs["id"] == pid:
                tel.append(np.array(m.attrs["records"]))
            elif m.op == "feedback" and m.attrs["id"] == pid:
                fb.append(np.array(m.attrs["feedback"]))

    set_sample_rate(rate)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        drain(0.1)
    set_sample_rate(0)
    quiet = time.monotonic() + 0.5  # the 20 ms flushes empty every ring
    while time.monotonic() < quiet:
        drain(0.1)
    after = dict(c.proxy(pid)["counters"])
    drain(0.3)
    assert c.stats["overruns"] == 0, "the listener lost multicast: counts below would not add up"
    d = {k: after[k] - before[k] for k in after}
    return (d, np.concatenate(tel) if tel else np.empty(0, codec.struct_dtype("sample")),
            np.concatenate(fb) if fb else np.empty(0, codec.struct_dtype("feedback")))


@pytest.mark.sample_params(rate=0)
def test_period_n_records_one_decision_in_n_with_exact_identities(modules: Any) -> None:
    period = 8
    with Connection(groups=("telemetry",), rcvbuf=16 << 20) as c:
        pid = int(c.proxy("sample")["id"])
        assert c.proxy(pid)["sample-period"] == 1  # the default: every decision
        c.set_params(pid, sample_period=period)
        assert c.proxy(pid)["sample-period"] == period
        d, tel, fb = _run(c, pid, 4000, 2.0)
        c.set_params(pid, sample_period=1)
    decisions = d["decisions-default"] + d["decisions-model"]
    recorded = d["samples"] + d["drops"]
    assert decisions > 2000, d
    assert decisions == recorded + d["unsampled"], d  # each decision is in exactly one place
    # each CPU counts down on its own: at most one sample more or less per CPU than 1/N
    assert abs(recorded - decisions / period) <= (os.cpu_count() or 1) + 1, (d, decisions / period)
    assert d["unheard"] == d["send-failed"] == 0, d
    assert len(tel) == d["samples"], (len(tel), d)  # every sample recorded was delivered
    assert len(np.unique(tel["seq"])) == len(tel) and np.all(tel["seq"] > 0)
    # feedback of every decision is kept; an unsampled (or dropped) one carries seq 0
    assert d["feedback"] + d["feedback-drops"] == decisions, d
    if d["feedback-drops"] == 0:
        assert len(fb) == decisions
        assert int(np.count_nonzero(fb["seq"] == 0)) == d["unsampled"] + d["drops"], d
        assert set(fb["seq"][fb["seq"] > 0].tolist()) == set(tel["seq"].tolist())


@pytest.mark.sample_params(rate=0)
def test_period_one_records_every_decision(modules: Any) -> None:
    with Connection(groups=("telemetry",), rcvbuf=16 << 20) as c:
        pid = int(c.proxy("sample")["id"])
        c.set_params(pid, sample_period=1)
        d, tel, _ = _run(c, pid, 2000, 1.0)
    decisions = d["decisions-default"] + d["decisions-model"]
    assert decisions > 1000 and d["unsampled"] == 0, d
    assert decisions == d["samples"] + d["drops"] and len(tel) == d["samples"], (d, len(tel))


@pytest.mark.sample_params(rate=0)
@pytest.mark.parametrize("bad", [0, MAX_PERIOD + 1, 0xFFFFFFFF])
def test_a_period_out_of_range_is_refused_with_extack_and_changes_nothing(modules: Any, bad: int) -> None:
    with Connection() as c:
        pid = int(c.proxy("sample")["id"])
        c.set_params(pid, sample_period=MAX_PERIOD)  # the bound itself is allowed
        before = c.proxy(pid)
        with pytest.raises(NetlinkError) as ei:
            c.set_params(pid, share=1, sample_period=bad)  # all or nothing: share stays too
        after = c.proxy(pid)
        assert [p for p in c.proxies() if p["id"] == pid][0]["sample-period"] == MAX_PERIOD  # dump too
        c.set_params(pid, sample_period=1)
    assert ei.value.errno == errno.EINVAL and "sample-period" in ei.value.extack, ei.value
    keep = ("sample-period", "share", "explore", "stale-ms", "mode", "mode-seq")
    assert {k: after[k] for k in keep} == {k: before[k] for k in keep}
    assert after["sample-period"] == MAX_PERIOD
