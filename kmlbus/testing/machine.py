"""A hypothesis state machine that drives any registered proxy through the mode graph.

:func:`proxy_machine` builds a ``RuleBasedStateMachine`` for one proxy of a
live module (:class:`LiveTarget`: the real ``kmlbus.ko`` over netlink) or of
anything that speaks the same control operations (the project's user-space
stand-in in its host tests).  Its rules are what a bus and an operator do:
move the proxy to any mode (edges of ``graph.yaml`` must be accepted, every
other move refused with EINVAL and an extack message, the mode unchanged),
send recommendations drawn from the proxy's own schema (values beyond the
safe bounds included), send batches the kernel must refuse whole, change the
collaboration share, let the subsystem decide, and kill the bus (close its
socket).  A second socket listens to the proxy's telemetry and mode events,
and every decision the kernel reports is checked against what the machine did:

* the decision was made in the mode the kernel had accepted last;
* emergency, and learning without exploration, apply nothing (default arm);
* a fresh recommendation is reported as the shadow, clamped into the declared
  bounds, with the ``clamped`` flag exactly when the sent value was outside;
* recommendation mode applies every fresh recommendation, and verbatim;
* collaboration gives the model its configured share of the fresh decisions
  (exact binomial test, p > 1e-6, checked at teardown per share value);
* a refused batch changes nothing (``recs-received`` and the slots' values);
* the bus going away puts the proxy in emergency at once (``get`` right after
  the close) with a ``bus-gone`` event, and mode events are numbered without gaps.

Decisions made within :data:`MARGIN_NS` of a request whose effect they could
straddle are not judged.
"""

from __future__ import annotations

import bisect
import errno
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kmlbus.contract import graph as mgraph
from kmlbus.contract import spec as kspec
from kmlbus.testing import strategies as ks
from kmlbus.testing.schema import ProxySchema
from kmlbus.wire.netlink import Connection, NetlinkError
from modes.machine import shortest_path

__all__ = ["LiveTarget", "MARGIN_NS", "ProxyMachine", "Target", "binomial_two_sided", "proxy_machine"]

# A decision this close to a request's edges is not judged: the decision path reads the mode
# and the slot a few microseconds before it stamps the sample, and a virtual CPU of a loaded
# host can be descheduled in between for tens of milliseconds.
MARGIN_NS = 50_000_000
SHARE_P_MIN = 1e-6  # a collaboration share this unlikely under the configured one is a failure
TTL_MS = 5_000  # recommendations sent by the machine: fresh for the whole step after them


class Link(Protocol):
    """What the machine needs of a socket: :class:`~kmlbus.wire.netlink.Connection`'s methods."""

    def proxy(self, id_or_name: int | str) -> dict[str, Any]: ...
    def set_mode(self, proxy_id: int, mode: str, reason: str = ...) -> None: ...
    def set_params(self, proxy_id: int, *, share: int | None = ..., explore: int | None = ...,
                   stale_ms: int | None = ...) -> None: ...
    def attach(self, proxy_id: int) -> None: ...
    def recommend(self, proxy_id: int, recs: Any, *, wait: bool = ...) -> None: ...
    def recv(self, timeout: float | None = ...) -> list[Any]: ...
    def close(self) -> None: ...


class Target(Protocol):
    """Where the proxy lives: sockets to it, a way to let it decide, and its sample clock."""

    def connect(self, groups: Sequence[str] = ()) -> Link:
        """A new socket to the family, joined to *groups*."""
        ...

    def decide(self, seconds: float) -> None:
        """Let the subsystem make decisions for about *seconds*."""
        ...

    def now_ns(self) -> int:
        """The clock of the samples' ``ts-ns`` (the kernel's ``ktime_get_ns``)."""
        ...


@dataclass
class LiveTarget:
    """The real module on this machine: a proxy whose subsystem decides on its own (the
    sample's timer) or when *workload* runs (a consumer that needs I/O, say)."""

    workload: Callable[[float], None] | None = None

    def connect(self, groups: Sequence[str] = ()) -> Link:
        return Connection(groups=groups)

    def decide(self, seconds: float) -> None:
        if self.workload is None:
            time.sleep(seconds)
        else:
            self.workload(seconds)

    def now_ns(self) -> int:
        return time.monotonic_ns()  # CLOCK_MONOTONIC, as ktime_get_ns()


@dataclass
class _Timeline:
    """Values that took effect at known times: (request started, request answered, value)."""

    starts: list[int] = field(default_factory=list)
    dones: list[int] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)

    def add(self, t0: int, t1: int, value: Any) -> None:
        self.starts.append(t0)
        self.dones.append(t1)
        self.values.append(value)

    def at(self, ts: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64]]:
        """For each time: (known, index of the value in effect).  Unknown before the first
        request and within MARGIN_NS of a request's start or answer."""
        dones = np.asarray(self.dones, np.int64)
        starts = np.asarray(self.starts + [np.iinfo(np.int64).max], np.int64)
        idx = np.searchsorted(dones, ts - MARGIN_NS, side="right") - 1
        ok = idx >= 0
        nxt = starts[np.maximum(idx, 0) + 1]
        ok &= ts < nxt - MARGIN_NS
        return ok, idx


class ProxyMachine(RuleBasedStateMachine):
    """Drives ``proxy`` of ``target`` (class attributes, set by :func:`proxy_machine`)."""

    target: Target
    proxy_name: str
    decide_s: float = 0.2
    #: the proxy has no ``apply`` callback: a model decision is the (clamped) value itself
    verbatim: bool = True

    def __init__(self) -> None:
        super().__init__()
        self.sp = kspec.load()
        self.graph = mgraph.load()
        self.modes = self.sp.enums["mode"]
        self.flags = self.sp.enums["sample-flags"]
        self.model_arm = self.sp.enums["arm"].value("model")
        self.obs: Link | None = None
        self.bus: Link | None = None
        self.mode_tl = _Timeline()
        self.share_tl = _Timeline()
        self.recs: dict[int, _Timeline] = {}
        self.ttl: dict[int, list[int]] = {}  # per key, per send: expiry (ns, the target's clock)
        self.collab: dict[int, list[int]] = {}  # share -> [fresh decisions, model decisions]
        self.last_seq = 0
        self.last_mode_seq: int | None = None
        self.events: list[tuple[str, str]] = []
        self.judged = 0
        self.seen_keys: set[int] = set()

    # --- set-up and tear-down ------------------------------------------------------------
    @initialize(data=st.data())
    def attach(self, data: st.DataObject) -> None:
        """Attach a bus socket, then recommend a value for every key (beyond the bounds too),
        so that every decision of the example can be judged from its first step on."""
        t = self.target
        self.obs = t.connect(groups=("telemetry", "events"))
        self.schema = ProxySchema.from_get(self.obs.proxy(self.proxy_name))
        self.pid = self.schema.id
        self.bus = t.connect()
        self.bus.attach(self.pid)
        # the machine's own ground: no kernel fallback on staleness, no exploration
        self._timed(lambda: self.bus_link.set_params(self.pid, share=None, explore=0, stale_ms=0))
        p = self.obs.proxy(self.pid)
        self.mode = self.modes.name_of(int(p["mode"]))
        now = t.now_ns()
        self.mode_tl.add(now, now, self.mode)
        self.share_tl.add(now, now, int(p["share"]))
        self._drain()  # what was decided before us is not ours to judge
        self.last_seq = 0
        values = data.draw(st.lists(ks.rec_values(self.schema), min_size=self.schema.nkeys,
                                    max_size=self.schema.nkeys), label="first values")
        self._send([(k, v, TTL_MS) for k, v in enumerate(values)])

    def teardown(self) -> None:
        try:
            if self.obs is not None:
                self._take_reports()
                self._check_share()
        finally:
            for c in (self.bus, self.obs):
                if c is not None:
                    c.close()

    @property
    def bus_link(self) -> Link:
        assert self.bus is not None
        return self.bus

    @property
    def obs_link(self) -> Link:
        assert self.obs is not None
        return self.obs

    def _timed(self, f: Callable[[], Any]) -> tuple[int, int]:
        t0 = self.target.now_ns()
        f()
        return t0, self.target.now_ns()

    def _kernel_mode(self) -> str:
        return self.modes.name_of(int(self.obs_link.proxy(self.pid)["mode"]))

    # --- rules ---------------------------------------------------------------------------
    @rule(data=st.data())
    def move(self, data: st.DataObject) -> None:
        """Ask for any mode: a graph edge (or staying) is accepted, anything else refused."""
        dest = data.draw(st.sampled_from(self.graph.states), label="dest")
        self._move(dest)

    @rule(data=st.data())
    def climb(self, data: st.DataObject) -> None:
        """Go to a mode along the graph's edges, as the bus does on evidence (every step accepted)."""
        dest = data.draw(st.sampled_from(self.graph.states[::-1]), label="climb to")
        for step in shortest_path(self.graph, self._kernel_mode(), dest):
            self._move(step)

    def _move(self, dest: str) -> None:
        src = self._kernel_mode()
        assert src == self.mode, f"the kernel is in {src}, the machine last saw {self.mode}"
        allowed = self.graph.is_allowed(src, dest)
        reason = "operator"
        if allowed and src != dest:
            t = self.graph.trigger_for(src, dest)
            reason = next(x.reason for x in self.graph.transitions if x.trigger == t)
        t0 = self.target.now_ns()
        try:
            self.bus_link.set_mode(self.pid, dest, reason)
        except NetlinkError as e:
            assert not allowed, f"{src} -> {dest} is an edge of the graph, yet refused: {e}"
            assert e.errno == errno.EINVAL and e.extack, (e.errno, e.extack)
            assert self._kernel_mode() == src, "a refused mode change changed the mode"
            return
        t1 = self.target.now_ns()
        assert allowed, f"{src} -> {dest} is not an edge of the graph, yet accepted"
        self.mode_tl.add(t0, t1, dest)
        self.mode = dest
        assert self._kernel_mode() == dest

    @rule(data=st.data())
    def recommend(self, data: st.DataObject) -> None:
        """Send a batch drawn from the proxy's schema (values beyond the bounds included)."""
        # keys the subsystem was seen deciding on come first: a consumer hashing its streams
        # into many keys uses few of them, and only those show what became of a recommendation
        key = ks.keys(self.schema)
        if self.seen_keys:
            key = st.one_of(st.sampled_from(sorted(self.seen_keys)), key)
        recs = data.draw(ks.recommendations(self.schema, max_size=8, ttl=st.just(TTL_MS), key=key),
                         label="recs")
        self._send(recs)

    def _send(self, recs: list[tuple[int, int, int]]) -> None:
        before = self._received()
        t0 = self.target.now_ns()
        self.bus_link.recommend(self.pid, recs)
        t1 = self.target.now_ns()
        last: dict[int, int] = {}
        for k, v, _ttl in recs:  # a key given twice keeps the later value
            last[k] = v
        for k, v in last.items():
            self.recs.setdefault(k, _Timeline()).add(t0, t1, v)
            self.ttl.setdefault(k, []).append(t0 + TTL_MS * 1_000_000)
        assert self._received() - before == len(recs)

    @rule(data=st.data())
    def recommend_refused(self, data: st.DataObject) -> None:
        """A batch with one bad row is refused whole, with an extack message, changing nothing."""
        recs = data.draw(ks.bad_recommendations(self.schema, max_size=8), label="bad recs")
        before = self._received()
        try:
            self.bus_link.recommend(self.pid, recs)
        except NetlinkError as e:
            assert e.errno == errno.EINVAL and e.extack, (e.errno, e.extack)
        else:
            raise AssertionError(f"a batch with a bad row was accepted: {recs}")
        assert self._received() == before, "a refused batch was counted as received"

    @rule(share=st.one_of(st.integers(0, 1000), st.sampled_from([0, 500, 1000])))
    def set_share(self, share: int) -> None:
        """Change the collaboration share (permille)."""
        t0, t1 = self._timed(lambda: self.bus_link.set_params(self.pid, share=share))
        self.share_tl.add(t0, t1, share)

    @rule()
    def decide(self) -> None:
        """Let the subsystem decide for a while."""
        self.target.decide(self.decide_s)

    @rule(really=st.booleans())
    def bus_gone(self, really: bool) -> None:
        """Close the bus's socket: the proxy is in emergency at once, and says bus-gone.

        Drawn as a coin (*really*) so that half the draws leave the proxy where it is
        and the climbs in between get somewhere."""
        if not really:
            return
        t0 = self.target.now_ns()
        self.bus_link.close()
        p = self.obs_link.proxy(self.pid)
        t1 = self.target.now_ns()
        assert self.modes.name_of(int(p["mode"])) == "emergency", p["mode"]
        assert int(p["bus-portid"]) == 0, p["bus-portid"]
        self.mode_tl.add(t0, t1, "emergency")
        self.mode = "emergency"
        self._take_reports()
        for _ in range(50):
            if ("emergency", "bus-gone") in self.events:
                break
            self._take_reports(wait=0.1)
        assert ("emergency", "bus-gone") in self.events, f"no bus-gone event: {self.events[-5:]}"
        self.events.clear()
        self.bus = self.target.connect()
        self.bus.attach(self.pid)

    @invariant()
    def reports_match(self) -> None:
        """Every decision reported so far agrees with what the machine did.

        The subsystem decides a little after every step first, so that each state
        the rules leave the proxy in is seen deciding."""
        if self.obs is not None:
            self.target.decide(self.decide_s / 4)
            self._take_reports()

    # --- checks --------------------------------------------------------------------------
    def _received(self) -> int:
        return int(self.obs_link.proxy(self.pid)["counters"]["recs-received"])

    def _drain(self) -> None:
        while self.obs_link.recv(timeout=0):
            pass

    def _take_reports(self, wait: float = 0.0) -> None:
        for m in self.obs_link.recv(timeout=wait):
            if int(m.attrs.get("id", 0)) != self.pid:
                continue
            if m.op == "telemetry":
                self._judge(np.asarray(m.attrs["records"]))
            elif m.op == "mode-event":
                seq = int(m.attrs["mode-seq"])
                if self.last_mode_seq is not None:
                    assert seq == self.last_mode_seq + 1, f"mode-seq {self.last_mode_seq} then {seq}"
                self.last_mode_seq = seq
                self.events.append((self.modes.name_of(int(m.attrs["mode"])),
                                    self.sp.enums["reason"].name_of(int(m.attrs.get("reason", 0)))))

    def _judge(self, r: npt.NDArray[Any]) -> None:
        if not len(r):
            return
        seq = r["seq"].astype(np.int64)
        assert seq[0] > self.last_seq and np.all(np.diff(seq) > 0), "sample seq went backwards"
        self.last_seq = int(seq[-1])
        ts = r["ts_ns"].astype(np.int64)
        mode = r["mode"].astype(np.int64)
        model = r["arm"] == self.model_arm
        shadow = (r["flags"] & self.flags.value("has-shadow")) != 0
        clamped = (r["flags"] & self.flags.value("clamped")) != 0
        explored = (r["flags"] & self.flags.value("explored")) != 0
        rd = self.schema.recommendation
        emergency, learning = self.modes.value("emergency"), self.modes.value("learning")
        collaboration, recommendation = self.modes.value("collaboration"), self.modes.value("recommendation")

        assert not np.any(model & (mode == emergency)), "a recommendation was applied in emergency"
        assert not np.any(model & (mode == learning) & ~explored), "applied in learning, not explored"
        assert not np.any(model & ~shadow), "the model arm decided without a fresh recommendation"
        sh = r["shadow"][shadow]
        lo = -(1 << 31) if rd.min is None else rd.min
        hi = (1 << 31) - 1 if rd.max is None else rd.max
        assert np.all((sh >= lo) & (sh <= hi)), f"shadow outside [{lo}, {hi}]: {sh[(sh < lo) | (sh > hi)]}"
        assert not np.any(clamped & ~shadow), "clamped without a recommendation"
        assert not np.any((mode == recommendation) & shadow & ~model), \
            "a fresh recommendation was not applied in recommendation mode"
        if self.verbatim:
            assert np.all(r["decision"][model] == r["shadow"][model]), "a model decision is not the value"

        known, idx = self.mode_tl.at(ts)
        want = np.array([self.modes.value(self.mode_tl.values[i]) for i in idx[known]], np.int64)
        bad = np.flatnonzero(mode[known] != want)
        assert not len(bad), (f"decision in mode {mode[known][bad[0]]} while the kernel had accepted "
                              f"{want[bad[0]]} (seq {seq[known][bad[0]]})")

        keys = r["key"].astype(np.int64)
        if len(self.seen_keys) < 64:
            self.seen_keys.update(int(k) for k in np.unique(keys)[:64])
        for k in np.unique(keys):
            tl = self.recs.get(int(k))
            if tl is None:
                continue
            sel = keys == k
            ok, i = tl.at(ts[sel])
            exp = np.asarray(self.ttl[int(k)], np.int64)[np.maximum(i, 0)]
            ok &= ts[sel] < exp - MARGIN_NS
            if not ok.any():
                continue
            val = np.asarray(tl.values, np.int64)[i[ok]]
            assert np.all(shadow[sel][ok]), f"key {k}: a fresh recommendation was not seen"
            assert np.all(r["shadow"][sel][ok] == np.clip(val, lo, hi)), f"key {k}: shadow is not the sent value"
            assert np.all(clamped[sel][ok] == ((val < lo) | (val > hi))), f"key {k}: clamped flag wrong"
            self.judged += int(ok.sum())

        fresh_collab = known & shadow & (mode == collaboration)
        if fresh_collab.any():
            sknown, sidx = self.share_tl.at(ts)
            use = fresh_collab & sknown
            for s in np.unique([self.share_tl.values[i] for i in sidx[use]]):
                sel = use & (np.array([self.share_tl.values[i] for i in sidx], np.int64) == s)
                tally = self.collab.setdefault(int(s), [0, 0])
                tally[0] += int(sel.sum())
                tally[1] += int((sel & model).sum())

    def _check_share(self) -> None:
        for share, (n, m) in self.collab.items():
            p = share / 1000
            if p in (0.0, 1.0):
                assert m == (n if p else 0), f"share {share}: {m} of {n} fresh decisions to the model"
            elif n >= 20:
                assert binomial_two_sided(m, n, p) > SHARE_P_MIN, \
                    f"share {share} permille: {m} of {n} fresh decisions to the model"


def binomial_two_sided(k: int, n: int, p: float) -> float:
    """P(an outcome at most as likely as *k* successes) for Binomial(*n*, *p*): the exact
    two-sided p-value, from log-probabilities (no scipy)."""
    def logpmf(i: int) -> float:
        return (math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
                + i * math.log(p) + (n - i) * math.log1p(-p))
    ref = logpmf(k) + 1e-9
    return min(1.0, sum(math.exp(lp) for i in range(n + 1) if (lp := logpmf(i)) <= ref))


def proxy_machine(target: Target, proxy: str, *, decide_s: float = 0.2, verbatim: bool = True,
                  name: str | None = None) -> type[ProxyMachine]:
    """A :class:`ProxyMachine` subclass for *proxy* on *target*; run it with
    ``TestX = proxy_machine(...).TestCase`` in a test module (pytest collects it)."""
    cls_name = name or f"{proxy.title().replace('.', '')}Machine"
    return type(cls_name, (ProxyMachine,), {"target": target, "proxy_name": proxy,
                                            "decide_s": decide_s, "verbatim": verbatim})
