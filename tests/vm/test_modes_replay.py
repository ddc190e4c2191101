"""Random mode-rule sequences replayed against the real module (issue 4 acceptance).

The same kinds of rules the host state machine (tests/test_modes_stateful.py)
drives — operator mode requests, a bus attaching and dying, recommendations
going stale — are sent to the real kmlbus.ko.  After every rule the kernel's
reported mode and counters must agree with what the mode graph and the
Python reference of the kernel's gate (tests.support.gate) predict.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from typing import Any

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kmlbus.contract import graph as mgraph
from kmlbus.contract import spec
from kmlbus.wire import codec, netlink

from .conftest import LoadedModules

GRAPH = mgraph.load()
SPEC = spec.load()
MODES = list(GRAPH.states)

def _mode(p: dict[str, Any]) -> str:
    return codec.enum_name("mode", int(p["mode"]))


class KernelModes(RuleBasedStateMachine):
    """Model: the graph decides which requests the kernel accepts; faults reach emergency."""

    conn: netlink.Connection

    @initialize()
    def start(self) -> None:
        self.conn = netlink.Connection()
        self.pid = int(self.conn.proxy("sample")["id"])
        self.expect = _mode(self.conn.proxy(self.pid))

    def teardown(self) -> None:
        if hasattr(self, "conn"):
            self.conn.close()

    @rule(mode=st.sampled_from(MODES))
    def operator_requests(self, mode: str) -> None:
        target = mode
        before = self.conn.proxy(self.pid)["counters"]["mode-changes"]
        try:
            self.conn.set_mode(self.pid, target, "operator")
            accepted = True
        except netlink.NetlinkError as e:
            assert e.errno == errno.EINVAL and e.extack, e
            accepted = False
        assert accepted == GRAPH.is_allowed(self.expect, target), (self.expect, target)
        after = self.conn.proxy(self.pid)["counters"]["mode-changes"]
        if accepted:
            self.expect = target
        else:
            assert after == before, "a refused request changed the proxy"

    @rule()
    def a_bus_attaches_then_dies(self) -> None:
        # A forked child is a real, separate bus process without a new interpreter's start-up.
        r, w = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the child
            try:
                os.close(r)
                c = netlink.Connection()
                c.attach(self.pid)
                os.write(w, b"1")
                time.sleep(600)
            finally:
                os._exit(0)
        os.close(w)
        try:
            assert os.read(r, 1) == b"1", "the child bus could not attach"
        finally:
            os.close(r)
        assert int(self.conn.proxy(self.pid)["bus-portid"]) != 0
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        p = self.conn.proxy(self.pid)
        self.expect = "emergency"
        assert codec.enum_name("reason", int(p["reason"])) == "bus-gone"

    @rule(ttl=st.integers(1, 30))
    def recommendations_go_stale(self, ttl: int) -> None:
        recs = np.zeros(64, dtype=codec.struct_dtype("rec"))
        recs["key"] = np.arange(64)
        recs["value"] = 33
        recs["ttl_ms"] = ttl
        c0 = self.conn.proxy(self.pid)["counters"]
        self.conn.recommend(self.pid, recs)
        time.sleep(0.2 + ttl / 1000)  # every slot is stale now; decisions keep running
        c1 = self.conn.proxy(self.pid)["counters"]
        assert c1["recs-received"] - c0["recs-received"] == 64
        # a stale slot is counted once when a decision finds it, never applied afterwards
        assert c1["recs-expired"] >= c0["recs-expired"]
        time.sleep(0.05)
        c2 = self.conn.proxy(self.pid)["counters"]
        assert c2["recs-applied"] == c1["recs-applied"], "a stale recommendation was applied"

    @invariant()
    def kernel_mode_is_the_models(self) -> None:
        if hasattr(self, "conn"):
            assert _mode(self.conn.proxy(self.pid)) == self.expect


def test_rule_sequences_agree_with_the_kernel(modules: LoadedModules) -> None:
    runner = KernelModes.TestCase
    runner.settings = settings(max_examples=int(os.environ.get("KMLBUS_REPLAY_EXAMPLES", "12")),
                               stateful_step_count=12, deadline=None, derandomize=True,
                               suppress_health_check=list(HealthCheck))
    runner().runTest()
