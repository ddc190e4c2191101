"""An in-process, user-space stand-in of ``kmlbus.ko`` + ``kmlbus_sample.ko``, in simulated time.

This is NOT the kernel.  It is a Python model of what the bus daemon sees of
the ``kmlbus`` generic netlink family through its sockets, written from
``kernel/kmlbus_core.c``, ``kernel/kmlbus_nl.c`` and
``kernel/samples/kmlbus_sample.c``, so that the daemon's logic (mode climbing,
demotion, faults, re-attach) can be tested on the host in seconds.  The VM
tests against the real module stay the proof; a test that uses this module
tests the daemon (or this model), never the kernel.

What it models
    * :class:`StandinKernel` holds proxies; :func:`StandinKernel.open` is a
      drop-in ``opener`` for :class:`kmlbus.bus.daemon.Bus` and returns a
      :class:`StandinLink` with the methods of :class:`kmlbus.wire.netlink.Connection`
      the bus uses (plus ``proxy``, ``request``, ``join``/``leave``).  Every
      request and every multicast message goes through :mod:`kmlbus.wire.codec`
      (encoded to wire bytes and decoded again), so dump replies are the same
      dicts and telemetry/feedback the same read-only numpy views of the spec
      structs that ``Connection`` returns.
    * Requests as ``kmlbus_nl.c`` handles them: admin ops refused with EPERM for
      a link opened without ``cap_net_admin``, and so is joining a group whose
      spec flags say cap-net-admin (PermissionError, as the socket option); the generated policy's range
      checks (ERANGE, "integer out of range"); set-mode checked against
      :func:`kmlbus.contract.graph.load` (EINVAL + extack); set-params (stale-ms bound,
      ERANGE; sample-period outside 1..max-sample-period, EINVAL + extack, nothing changed); attach (EBUSY if another port holds the proxy); detach (ENOTCONN
      without a bus; otherwise emergency, reason detach); recommend, and
      set-mode with a reason other than operator to a mode other than
      emergency, of an attached proxy from another port (EBUSY); recommend
      checked all-or-nothing in the kernel's order (length, E2BIG, ttl, ENOENT,
      bus, key).  Proxy ids are not reused within a load; a destroyed proxy
      announces proxy-removed.
      Errors are raised as :class:`kmlbus.wire.netlink.NetlinkError` with the extack
      text formatted as ``Connection`` formats it (``[attribute x]``,
      ``: missing attribute x``).
    * The decision path (``kml_proxy_decide``): slots with expiry, a stale slot
      counted expired once and cleared, clamping to the recommendation's bounds,
      and the per-mode gate of :func:`tests.support.gate.gate_batch` (not re-implemented).
      Counters as the kernel's ``counters`` nest.
    * Sampling: one decision in ``sample-period`` recorded (the kernel's per-CPU
      countdown, with one CPU), the others counted ``unsampled``; a seq only for
      a sample kept in the ring (an unsampled, unheard or dropped one has seq 0,
      and so has its feedback).
    * Buffering: rings of 1024 samples / 1024 feedback records, a flush when 32
      samples are buffered or every 20 ms, telemetry in messages of at most 32
      records, feedback of at most 128, records counted ``unheard`` (and
      dropped) when nobody listens to group telemetry, at the decision (then
      without a seq) or at the flush; the stale check runs
      before every flush like ``flush_work_fn``.
    * Mode events on every change (and on every forced fallback) to group
      events, each with the proxy's next ``mode-seq``; closing the attached link drops the proxy to emergency with
      reason bus-gone, like the netlink release notifier.
    * The sample workload bit for bit: splitmix64 seeded with ``seed``, 64
      streams with hidden s_k, features seq_ratio/req_size/noise, default window
      8, efficiency reported right after each decision, ``rate`` decisions per
      second on a 1 ms tick with the module's credit arithmetic.
    * ``recommend(wait=False)`` / ``take_errors`` as ``Connection`` does them (the
      refusal kept for later), and a bounded receive buffer per link
      (``rcvbuf``) whose overrun is counted in ``stats["overruns"]``.
    * ``unload()``/``load()`` as rmmod/insmod of both modules: open links are
      dead afterwards (requests raise ``NetlinkError`` ENOENT, as for a family
      id the kernel no longer knows; ``recv`` returns what was queued, then
      nothing), the opener raises :class:`~kmlbus.wire.netlink.ModuleNotLoaded`
      while unloaded, and a new family id and fresh proxies come with load.

What it does not model
    Concurrency (there is one thread: decisions run when a link call lets
    simulated time pass), jiffies granularity (expiry and staleness are exact
    nanoseconds), the decision path's random draws (a seeded numpy generator,
    not ``get_random_u32_below``), the sample's catch-up cap after a stall
    (rates above 999000/s are refused), the lifecycle verbs beyond
    create/init/start, ``kml_proxy_submit``, tracepoints, network namespaces,
    malformed requests beyond what the codec can build (attributes an
    operation does not take are refused as the kernel's strict validation
    refuses them; the VM conformance test holds it), the nlctrl family, and
    skb truesize (a link's receive buffer counts message bytes; on overrun the
    socket is congested until its reader empties it, as in netlink).

Time
    :class:`SimClock` is the only clock.  ``recv(timeout)`` on a link with
    nothing queued lets simulated time run until this link has a message or
    *timeout* simulated seconds have passed, running the proxies' decisions for
    that time (one vectorised numpy batch per flush interval, never a Python
    loop per decision).  Build the daemon with ``clock=kernel.clock.now`` so its
    cool-downs and ticks run in the same time.  ``clock.advance(dt)`` may also
    be called directly; the proxies catch up at the next link call.
"""

from __future__ import annotations

import errno as errno_mod
import itertools
import logging
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, Self

import numpy as np
import numpy.typing as npt

from kmlbus.contract import graph as mgraph
from kmlbus.contract import spec as kspec
from kmlbus.wire import codec
from kmlbus.wire.codec import Message
from kmlbus.wire.netlink import (
    DRAIN_MAX,
    ControlOps,
    KmlbusError,
    ModuleNotLoaded,
    NetlinkError,
    refusal_text,
)
from tests.support import gate as mgate

__all__ = [
    "FieldDesc",
    "ProxyDesc",
    "SampleWorkload",
    "SimClock",
    "StandinKernel",
    "StandinLink",
    "StandinProxy",
    "Workload",
]

log = logging.getLogger(__name__)
log.addHandler(logging.NullHandler())

NS = 1_000_000_000
MS = 1_000_000


# kernel/samples/kmlbus_sample.c
SAMPLE_STREAMS = 64
SAMPLE_DEFAULT_WINDOW = 8
SAMPLE_MIN_WINDOW = 1
SAMPLE_MAX_WINDOW = 64
SAMPLE_SCALE = 1000
SAMPLE_TICK_NS = MS
SAMPLE_OBS_NOISE = 50
#: Above this rate the module's per-tick catch-up cap (1000) would bite; not modelled.
MAX_RATE = 999_000

_SPEC = kspec.load()
_MODES = _SPEC.enums["mode"]
_REASONS = _SPEC.enums["reason"]
_LIFECYCLE = _SPEC.enums["lifecycle"]
_SAMPLE_DT = codec.struct_dtype("sample")
_FEEDBACK_DT = codec.struct_dtype("feedback")
_COUNTERS = tuple(a.name for a in _SPEC.attr_sets["counters"].attrs if a.type != "pad")
_MAX_TTL_MS = int(_SPEC.consts["max-ttl-ms"])
_MAX_SAMPLE_PERIOD = int(_SPEC.consts["max-sample-period"])
_MAX_RECS = int(_SPEC.consts["max-recs"])
_MAX_KEYS = int(_SPEC.consts["max-keys"])
_MAX_FEATURES = int(_SPEC.consts["max-features"])
RING_SAMPLES = int(_SPEC.consts["ring-samples"])
RING_FEEDBACK = int(_SPEC.consts["ring-feedback"])
FLUSH_COUNT = int(_SPEC.consts["flush-count"])
FLUSH_MS = int(_SPEC.consts["flush-ms"])
MSG_SAMPLES = int(_SPEC.consts["msg-samples"])
MSG_FEEDBACK = int(_SPEC.consts["msg-feedback"])
_EMERGENCY = _MODES.value("emergency")


#: groups whose spec flags say joining needs CAP_NET_ADMIN (GENL_MCAST_CAP_NET_ADMIN)
_ADMIN_GROUPS = frozenset(g for g, fl in _SPEC.mcast_flags.items() if "admin-perm" in fl)


class SimClock:
    """Simulated monotonic time in integer nanoseconds; :meth:`now` in float seconds.

    Starts at *start* seconds (default 1000: a machine that has been up a while,
    so no code meets a clock value of 0).
    """

    def __init__(self, start: float = 1000.0) -> None:
        self._ns = round(start * NS)

    def now(self) -> float:
        """Seconds, like ``time.monotonic()``."""
        return self._ns / NS

    def now_ns(self) -> int:
        return self._ns

    def advance(self, dt: float) -> None:
        """Let *dt* simulated seconds pass (the proxies catch up at the next link call)."""
        if dt < 0:
            raise ValueError(f"SimClock.advance: time cannot go back ({dt} s)")
        self._ns += round(dt * NS)

    def _set_ns(self, t: int) -> None:
        if t < self._ns:
            raise AssertionError(f"SimClock: {t} ns is before now ({self._ns} ns)")
        self._ns = t


# -- proxies and workloads ----------------------------------------------------------------


@dataclass(frozen=True)
class FieldDesc:
    """A feature or recommendation field as ``struct kml_field_desc`` describes it."""

    name: str
    scale: int
    min: int | None = None
    max: int | None = None


@dataclass(frozen=True)
class ProxyDesc:
    """The schema part of ``struct kml_proxy_desc``."""

    name: str
    nkeys: int
    features: tuple[FieldDesc, ...]
    recommendation: FieldDesc
    efficiency_scale: int

    def check(self) -> None:
        """``desc_check`` of kmlbus_core.c (raises ValueError where it returns -EINVAL)."""
        limit = int(_SPEC.consts["name-len"])
        names = [self.name, self.recommendation.name, *(f.name for f in self.features)]
        if not all(n and len(n.encode()) < limit for n in names):
            raise ValueError(f"proxy {self.name!r}: every name must be 1..{limit - 1} bytes")
        if not 1 <= self.nkeys <= _MAX_KEYS or len(self.features) > _MAX_FEATURES:
            raise ValueError(f"proxy {self.name}: nkeys {self.nkeys} (1..{_MAX_KEYS}), "
                             f"{len(self.features)} features (at most {_MAX_FEATURES})")
        r = self.recommendation
        if r.min is None or r.max is None or r.min > r.max:
            raise ValueError(f"proxy {self.name}: recommendation needs min <= max")


class Workload(Protocol):
    """The subsystem side of a proxy: what drives ``decide`` and ``report``."""

    desc: ProxyDesc

    def observe(self, n: int) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.int32]]:
        """The next *n* decisions' keys and features ``[n, len(desc.features)]``."""

    def default(self, keys: npt.NDArray[np.uint32], features: npt.NDArray[np.int32]) -> npt.NDArray[np.int32]:
        """The default algorithm's values (``ops->default_decision``)."""

    def efficiency(self, keys: npt.NDArray[np.uint32], values: npt.NDArray[np.int32]
                   ) -> npt.NDArray[np.int32] | None:
        """Efficiency of each decision (``ops->estimate_efficiency``), or None if not reported."""


_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_U64 = (1 << 64) - 1


class SampleWorkload:
    """``kmlbus_sample.c``: the same splitmix64 stream, so the same s_k, keys and features."""

    desc = ProxyDesc(
        name="sample",
        nkeys=SAMPLE_STREAMS,
        features=(FieldDesc("seq_ratio", SAMPLE_SCALE), FieldDesc("req_size", SAMPLE_SCALE),
                  FieldDesc("noise", SAMPLE_SCALE)),
        recommendation=FieldDesc("window", 1, SAMPLE_MIN_WINDOW, SAMPLE_MAX_WINDOW),
        efficiency_scale=SAMPLE_SCALE,
    )

    def __init__(self, seed: int = 1) -> None:
        self._state = seed & _U64
        #: Hidden sequentiality of each stream, permille (``sample_seq_ratio``).
        self.seq_ratio = self._below(self._draws(SAMPLE_STREAMS), SAMPLE_SCALE + 1).astype(np.int64)

    def _draws(self, n: int) -> npt.NDArray[np.uint64]:
        """The next *n* outputs of ``sample_next`` (splitmix64), vectorised."""
        i = np.arange(1, n + 1, dtype=np.uint64)
        with np.errstate(over="ignore"):
            z = np.uint64(self._state) + i * _GAMMA
            z = (z ^ (z >> np.uint64(30))) * _MIX1
            z = (z ^ (z >> np.uint64(27))) * _MIX2
        self._state = (self._state + n * 0x9E3779B97F4A7C15) & _U64
        return np.asarray(z ^ (z >> np.uint64(31)), dtype=np.uint64)

    @staticmethod
    def _below(x: npt.NDArray[np.uint64], n: int) -> npt.NDArray[np.uint64]:
        """``sample_below``: ``((x >> 32) * n) >> 32``."""
        return ((x >> np.uint64(32)) * np.uint64(n)) >> np.uint64(32)

    def optimal(self, keys: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
        """``sample_optimal``: ``1 + DIV_ROUND_CLOSEST(63 * s_k, 1000)``."""
        return np.asarray(1 + (63 * self.seq_ratio[keys] + SAMPLE_SCALE // 2) // SAMPLE_SCALE, dtype=np.int64)

    def observe(self, n: int) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.int32]]:
        # sample_one() draws key, observation noise, req_size, noise: four per decision
        d = self._draws(4 * n).reshape(n, 4)
        keys = self._below(d[:, 0], SAMPLE_STREAMS).astype(np.int64)
        noise = self._below(d[:, 1], 2 * SAMPLE_OBS_NOISE + 1).astype(np.int64)
        obs = self.seq_ratio[keys] + noise - SAMPLE_OBS_NOISE
        f = np.empty((n, 3), dtype=np.int32)
        f[:, 0] = np.clip(obs, 0, SAMPLE_SCALE)
        f[:, 1] = (1 + self._below(d[:, 2], SAMPLE_MAX_WINDOW).astype(np.int64)) * SAMPLE_SCALE
        f[:, 2] = self._below(d[:, 3], SAMPLE_SCALE + 1)
        return keys.astype(np.uint32), f

    def default(self, keys: npt.NDArray[np.uint32], features: npt.NDArray[np.int32]) -> npt.NDArray[np.int32]:
        return np.full(len(keys), SAMPLE_DEFAULT_WINDOW, dtype=np.int32)

    def efficiency(self, keys: npt.NDArray[np.uint32], values: npt.NDArray[np.int32]) -> npt.NDArray[np.int32]:
        diff = np.abs(values.astype(np.int64) - self.optimal(keys))
        return np.asarray(SAMPLE_SCALE - SAMPLE_SCALE * diff // SAMPLE_MAX_WINDOW, dtype=np.int32)


class _Ring:
    """A bounded FIFO of struct records (``struct kml_ring``)."""

    def __init__(self, dtype: np.dtype[Any], cap: int) -> None:
        self.dtype = dtype
        self.cap = cap
        self.parts: list[npt.NDArray[Any]] = []
        self.count = 0

    def push(self, arr: npt.NDArray[Any]) -> int:
        """Append what fits; returns how many were kept (the rest are dropped)."""
        room = min(len(arr), self.cap - self.count)
        if room > 0:
            self.parts.append(arr[:room])
            self.count += room
        return max(room, 0)

    def take(self) -> npt.NDArray[Any]:
        out = (np.concatenate(self.parts) if len(self.parts) > 1 else
               self.parts[0] if self.parts else np.zeros(0, self.dtype))
        self.parts, self.count = [], 0
        return out


class StandinProxy:
    """One registered proxy: ``struct kml_proxy`` state plus its workload driver.

    Read-only from tests (``mode_name``, ``counters``, ``workload``); change it
    through a link, like the bus does, or through :class:`StandinKernel`.
    """

    def __init__(self, kernel: StandinKernel, pid: int, workload: Workload, rate: int) -> None:
        desc = workload.desc
        desc.check()
        g = kernel.graph.guards
        now = kernel.clock.now_ns()
        self.kernel = kernel
        self.id = pid
        self.desc = desc
        self.workload = workload
        #: what made the workload (re-run by :meth:`StandinKernel.load`), if known
        self.factory: Callable[[], Workload] | None = None
        self.mode = _MODES.value(kernel.graph.initial)
        self.reason = _REASONS.value("none")
        self.mode_since = now
        self.mode_seq = 0  # announced changes (struct kml_proxy.mode_seq)
        self.share = int(g.collaboration_share)  # KMLBUS_DEFAULT_SHARE is generated from the graph
        self.explore = int(g.exploration_share)
        self.stale_ms = 0
        self.sample_period = 1
        self.countdown = 0  # struct kml_cpu.countdown (one CPU)
        self.last_rec = now
        self.bus_portid = 0
        self.lifecycle = _LIFECYCLE.value("created")
        self.slot_value = np.zeros(desc.nkeys, dtype=np.int32)
        self.slot_expiry = np.zeros(desc.nkeys, dtype=np.int64)  # ns; 0 = empty
        self.seq = 0
        self.samples = _Ring(_SAMPLE_DT, RING_SAMPLES)
        self.feedback = _Ring(_FEEDBACK_DT, RING_FEEDBACK)
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self._rng = np.random.default_rng([kernel.seed, pid])
        # the workload's 1 ms tick: decision j (1-based, since the epoch) runs at tick
        # ceil((j * 1000 - credit0) / rate) after the epoch (sample_tick's credit arithmetic)
        self.rate = 0
        self._epoch = now
        self._epoch_done = 0
        self._credit0 = 0
        self.done = 0  # decisions made
        self.next_flush = 0
        self.lifecycle = _LIFECYCLE.value("initialized")
        self._start(now)
        self.set_rate(rate, now)

    # -- reading -------------------------------------------------------------

    @property
    def mode_name(self) -> str:
        return _MODES.name_of(self.mode)

    def attrs(self, now: int) -> dict[str, Any]:
        """``fill_proxy``: the attributes of a get reply."""
        r = self.desc.recommendation
        return {
            "id": self.id, "name": self.desc.name, "mode": self.mode, "lifecycle": self.lifecycle,
            "nkeys": self.desc.nkeys,
            "feature": [{"name": f.name, "scale": f.scale} for f in self.desc.features],
            "recommendation": {"name": r.name, "scale": r.scale, "min": r.min, "max": r.max},
            "counters": dict(self.counters),
            "bus-portid": self.bus_portid, "share": self.share, "explore": self.explore,
            "reason": self.reason, "mode-ms": (now - self.mode_since) // MS,
            "efficiency-scale": self.desc.efficiency_scale, "stale-ms": self.stale_ms,
            "mode-seq": self.mode_seq, "sample-period": self.sample_period,
        }

    # -- lifecycle and workload ------------------------------------------------

    def _start(self, now: int) -> None:
        self.lifecycle = _LIFECYCLE.value("started")
        self.next_flush = now + FLUSH_MS * MS

    def _live(self) -> bool:
        return self.lifecycle in (_LIFECYCLE.value("started"), _LIFECYCLE.value("running"))

    def set_rate(self, rate: int, now: int) -> None:
        """The sample module's ``rate`` parameter (decisions per second, 0 pauses)."""
        if not 0 <= rate <= MAX_RATE:
            raise ValueError(f"rate must be in 0..{MAX_RATE} decisions/s, got {rate}")
        if self.rate:
            ticks = (now - self._epoch) // SAMPLE_TICK_NS
            credit = self._credit0 + ticks * self.rate - 1000 * (self.done - self._epoch_done)
            self._epoch += ticks * SAMPLE_TICK_NS
        else:
            credit = self._credit0
            self._epoch = now
        self._credit0, self._epoch_done, self.rate = int(credit), self.done, rate

    def _decisions_by(self, t: int) -> int:
        """Decisions made by time *t* (inclusive)."""
        if not self.rate or t <= self._epoch:
            return self.done
        ticks = (t - self._epoch) // SAMPLE_TICK_NS
        return max(self.done, self._epoch_done + (self._credit0 + ticks * self.rate) // 1000)

    def _times(self, j: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Time of decisions number *j* (1-based, global)."""
        k = -((self._credit0 - (j - self._epoch_done) * 1000) // self.rate)  # ceil division
        return self._epoch + k * SAMPLE_TICK_NS

    def _next_flush_at(self) -> int:
        """When the flush work runs next: the 20 ms timer, or at once when 32 samples are buffered."""
        t = self.next_flush
        need = FLUSH_COUNT - self.samples.count
        if self.rate and need > 0:
            t = min(t, int(self._times(np.array([self.done + need], dtype=np.int64))[0]))
        return t

    # -- the decision path ------------------------------------------------------

    def run_until(self, t: int) -> None:
        """Make every decision due by *t* (one vectorised batch)."""
        n = self._decisions_by(t) - self.done
        if n <= 0 or not self._live():
            return
        j = np.arange(self.done + 1, self.done + n + 1, dtype=np.int64)
        self._decide(self._times(j))
        self.done += n

    def _decide(self, ts: npt.NDArray[np.int64]) -> None:
        """``kml_proxy_decide`` + ``kml_proxy_evaluate`` for decisions at times *ts*."""
        n = len(ts)
        c = self.counters
        keys, feats = self.workload.observe(n)
        default = np.asarray(self.workload.default(keys, feats), dtype=np.int32)
        self.lifecycle = _LIFECYCLE.value("running")
        exp = self.slot_expiry[keys]
        fresh = (exp != 0) & (ts < exp)
        stale = (exp != 0) & ~fresh
        if stale.any():  # slot_read: cleared and counted expired once, by whoever reads it first
            gone = np.unique(keys[stale])
            self.slot_expiry[gone] = 0
            c["recs-expired"] += len(gone)
        r = self.desc.recommendation
        assert r.min is not None and r.max is not None
        raw = self.slot_value[keys]
        clamped = fresh & ((raw < r.min) | (raw > r.max))
        mval = np.clip(raw, r.min, r.max).astype(np.int32)
        draw = self._rng.integers(0, mgate.PERMILLE, n)
        arm, flags = mgate.gate_batch(self.mode_name, fresh, self.share, self.explore, draw, clamped)
        model = arm == mgate.ARM_MODEL
        value = np.where(model, mval, default).astype(np.int32)
        nmodel = int(np.count_nonzero(model))
        c["recs-clamped"] += int(np.count_nonzero(clamped))
        if self.mode == _EMERGENCY:
            c["recs-ignored"] += int(np.count_nonzero(fresh))
        c["decisions-model"] += nmodel
        c["recs-applied"] += nmodel
        c["decisions-default"] += n - nmodel

        eff = self.workload.efficiency(keys, value)
        picked = self._sampled(n)
        c["unsampled"] += n - int(np.count_nonzero(picked))
        if not self.kernel._listeners("telemetry"):
            # record_sample / kml_proxy_report with nobody listening: counted, not kept, no seq
            c["samples"] += int(np.count_nonzero(picked))
            c["unheard"] += int(np.count_nonzero(picked))
            if eff is not None:
                c["feedback"] += n
                c["unheard"] += n
            return

        seqs = np.zeros(n, dtype=np.uint64)  # an unsampled or dropped decision has none
        idx = np.flatnonzero(picked)
        kept = min(len(idx), self.samples.cap - self.samples.count)
        seqs[idx[:kept]] = self.seq + 1 + np.arange(kept, dtype=np.uint64)
        self.seq += kept
        if len(idx) > kept:
            c["drops"] += len(idx) - kept
        if kept:
            self._record(idx[:kept], seqs, ts, keys, value, fresh, mval, arm, flags, feats)
            c["samples"] += kept

        if eff is not None:
            f = np.zeros(n, dtype=_FEEDBACK_DT)
            f["seq"] = seqs
            f["key"] = keys
            f["decision"] = value
            f["efficiency"] = eff
            f["arm"] = arm
            kept = self.feedback.push(f)
            c["feedback"] += kept
            c["feedback-drops"] += n - kept

    def _sampled(self, n: int) -> npt.NDArray[np.bool_]:
        """``sampled_out``: which of the next *n* decisions the countdown picks (1 in sample-period)."""
        period = self.sample_period
        if period <= 1:
            return np.ones(n, dtype=bool)
        c = self.countdown  # the kernel's countdown: decrement, picked unless 0 < left < period
        skip = c - 1 if 2 <= c <= period else 0
        i = np.arange(n)
        picked: npt.NDArray[np.bool_] = (i >= skip) & ((i - skip) % period == 0)
        hits = np.flatnonzero(picked)
        self.countdown = c - n if len(hits) == 0 else period - (n - 1 - int(hits[-1]))
        return picked

    def _record(self, idx: npt.NDArray[Any], seqs: npt.NDArray[np.uint64], ts: npt.NDArray[np.int64],
                keys: npt.NDArray[Any], value: npt.NDArray[Any], fresh: npt.NDArray[Any],
                mval: npt.NDArray[Any], arm: npt.NDArray[Any], flags: npt.NDArray[Any],
                feats: npt.NDArray[Any]) -> None:
        """Write the picked decisions *idx* into the sample ring (it has room for them)."""
        n = len(idx)
        s = np.zeros(n, dtype=_SAMPLE_DT)
        s["seq"] = seqs[idx]
        s["ts_ns"] = ts[idx]
        keys, value, fresh, mval = keys[idx], value[idx], fresh[idx], mval[idx]
        arm, flags, feats = arm[idx], flags[idx], feats[idx]
        s["key"] = keys
        s["decision"] = value
        s["shadow"] = np.where(fresh, mval, 0)
        s["arm"] = arm
        s["mode"] = self.mode
        s["flags"] = flags
        s["features"][:, :feats.shape[1]] = feats
        self.samples.push(s)

    # -- flushing, staleness, modes --------------------------------------------------

    def flush(self, now: int) -> None:
        """``flush_work_fn``: check staleness, send both rings, re-arm the 20 ms timer."""
        self._check_stale(now)
        self.flush_now()
        self.next_flush = now + FLUSH_MS * MS

    def flush_now(self) -> None:
        heard = self.kernel._listeners("telemetry")
        for ring, op, attr, batch in ((self.samples, "telemetry", "records", MSG_SAMPLES),
                                      (self.feedback, "feedback", "feedback", MSG_FEEDBACK)):
            arr = ring.take()
            if not len(arr):
                continue
            if not heard:
                self.counters["unheard"] += len(arr)
                continue
            for i in range(0, len(arr), batch):
                attrs: dict[str, Any] = {"id": self.id, attr: arr[i:i + batch]}
                if op == "telemetry":
                    attrs["drops"] = self.counters["drops"]
                # kmlbus_count_sent: a batch when a listener took it, else unheard or send-failed
                err = self.kernel._multicast("telemetry", op, attrs)
                if not err:
                    self.counters["batches"] += 1
                elif not self.kernel._listeners("telemetry"):
                    self.counters["unheard"] += len(attrs[attr])
                else:
                    self.counters["send-failed"] += len(attrs[attr])

    def _check_stale(self, now: int) -> None:
        if not self.stale_ms or _MODES.name_of(self.mode) not in ("collaboration", "recommendation"):
            return
        since = max(self.last_rec, self.mode_since)
        if now > since + self.stale_ms * MS:
            self.change_mode(_EMERGENCY, _REASONS.value("stale"), force=True, now=now)

    def change_mode(self, mode: int, reason: int, *, force: bool, now: int | None = None) -> int:
        """``kmlbus_change_mode``: 0 or -EINVAL; announces a mode-event."""
        if not 0 <= mode < len(_MODES.entries) or not 0 <= reason < len(_REASONS.entries):
            return -errno_mod.EINVAL
        old = self.mode
        if not force and not self.kernel.graph.is_allowed(_MODES.name_of(old), _MODES.name_of(mode)):
            return -errno_mod.EINVAL
        self.mode, self.reason = mode, reason
        if old != mode:
            self.mode_since = self.kernel.clock.now_ns() if now is None else now
            self.counters["mode-changes"] += 1
        if old != mode or force:  # a forced fallback is announced even if already in emergency
            self.mode_seq += 1
            self.kernel._multicast("events", "mode-event", {
                "id": self.id, "name": self.desc.name, "mode": mode, "old-mode": old, "reason": reason,
                "mode-seq": self.mode_seq})
        return 0

    def announce_removed(self) -> None:
        """``kmlbus_nl_removed_event``, sent by ``kml_proxy_destroy``."""
        self.kernel._multicast("events", "proxy-removed",
                               {"id": self.id, "name": self.desc.name, "mode-seq": self.mode_seq})

    def store_recs(self, recs: npt.NDArray[Any], now: int) -> None:
        """``kmlbus_store_recs`` (already checked)."""
        # a later entry for the same key wins, as the kernel's loop writes them in order
        keys, first_of_reversed = np.unique(recs["key"][::-1].astype(np.int64), return_index=True)
        last = len(recs) - 1 - first_of_reversed
        self.slot_value[keys] = recs["value"][last]
        self.slot_expiry[keys] = now + recs["ttl_ms"][last].astype(np.int64) * MS
        self.last_rec = now
        self.counters["recs-received"] += len(recs)


# -- the family ---------------------------------------------------------------------------


class _Refused(Exception):
    """A handler's error: negative errno, extack message, the attribute it points at."""

    def __init__(self, err: int, msg: str, attr: str = "", missing: str = "") -> None:
        super().__init__(msg)
        self.err, self.msg, self.attr, self.missing = err, msg, attr, missing


def _policy_max(a: kspec.Attr) -> int | None:
    if "max" in a.checks:
        return int(a.checks["max"])
    if a.enum and not _SPEC.enums[a.enum].is_flags:  # the generator bounds enum attributes
        return len(_SPEC.enums[a.enum].entries) - 1
    return None


class StandinKernel:
    """The stand-in of ``kmlbus.ko`` with ``kmlbus_sample.ko`` loaded (see the module doc).

    *seed* is the sample module's ``seed`` parameter (and seeds the decision
    path's draws); *rate* its ``rate``.  ``sample=False`` starts with no proxy
    (add some with :meth:`add_proxy`).  *graph* defaults to the project's mode
    graph, the one the kernel's table is generated from.
    """

    def __init__(self, clock: SimClock | None = None, *, seed: int = 1, rate: int = 2000,
                 sample: bool = True, graph: mgraph.Graph | None = None) -> None:
        self.clock = clock if clock is not None else SimClock()
        self.seed = seed
        self.graph = graph if graph is not None else mgraph.load()
        self.loaded = False
        self.family_id = 0
        self._family_ids = itertools.count(0x20)  # genl ids are allocated cyclically
        self._portids = itertools.count(4242)
        self._next_id = 1
        self.proxies: list[StandinProxy] = []
        self.links: list[StandinLink] = []
        self._factories: list[tuple[Callable[[], Workload], int]] = []
        if sample:
            self._factories.append((lambda: SampleWorkload(seed), rate))
        self.load()

    # -- modules -------------------------------------------------------------------

    def load(self, *, first_id: int = 1) -> None:
        """insmod: a new family id, and every registered workload's proxy created and started.

        Ids restart at 1 with a fresh kmlbus.ko, so like the real modules the
        proxies get 1, 2, ... again; within one load they are never reused
        (kmlbus_alloc_id is cyclic).  Pass *first_id* to have them numbered
        differently (as when another module's proxy registers first).
        """
        if self.loaded:
            raise RuntimeError("stand-in kmlbus is already loaded")
        self.loaded = True
        self.family_id = next(self._family_ids)
        self._next_id = first_id
        for factory, rate in self._factories:
            self._create(factory(), rate, factory)

    def unload(self) -> None:
        """rmmod kmlbus_sample kmlbus: buffered records flushed, proxies gone, family gone."""
        if not self.loaded:
            raise RuntimeError("stand-in kmlbus is not loaded")
        self._sync()
        for p in self.proxies:
            p.flush_now()  # kml_proxy_stop flushes what is buffered
            p.announce_removed()
        self.proxies.clear()
        self.loaded = False
        for ln in self.links:
            ln.groups.clear()  # genl_unregister_family clears the multicast memberships

    def add_proxy(self, factory: Callable[[], Workload], rate: int = 2000) -> StandinProxy:
        """insmod of another subsystem: *factory* makes its workload (again after each load)."""
        if not self.loaded:  # its insmod fails: unknown symbols of kmlbus
            raise ModuleNotLoaded()
        self._sync()
        p = self._create(factory(), rate, factory)
        self._factories.append((factory, rate))
        return p

    def remove_proxy(self, name: str) -> None:
        """rmmod of the subsystem that owns proxy *name* (e.g. kmlbus_sample): stopped, flushed,
        destroyed with a proxy-removed event.  Not re-created by load."""
        self._sync()
        p = self.find(name)
        p.flush_now()
        p.announce_removed()
        self.proxies.remove(p)
        self._factories = [(f, r) for f, r in self._factories if f is not p.factory]

    def _create(self, w: Workload, rate: int, factory: Callable[[], Workload] | None = None
                ) -> StandinProxy:
        if any(p.desc.name == w.desc.name for p in self.proxies):
            raise ValueError(f"a proxy named {w.desc.name} exists (kml_proxy_create: -EEXIST)")
        used = {p.id for p in self.proxies}
        pid = self._next_id  # kmlbus_alloc_id: cyclic, a destroyed proxy's id is not reused
        while pid in used:
            pid += 1
        self._next_id = pid + 1
        p = StandinProxy(self, pid, w, rate)
        p.factory = factory
        self.proxies.append(p)
        return p

    def find(self, name: str) -> StandinProxy:
        """The proxy named *name* (KeyError if none)."""
        for p in self.proxies:
            if p.desc.name == name:
                return p
        raise KeyError(name)

    def set_rate(self, name: str, rate: int) -> None:
        """``echo RATE > /sys/module/kmlbus_sample/parameters/rate``."""
        self._sync()
        self.find(name).set_rate(rate, self.clock.now_ns())

    # -- sockets ---------------------------------------------------------------------

    def open(self, groups: Sequence[str] = (), *, cap_net_admin: bool = True,
             rcvbuf: int = 8 << 20) -> StandinLink:
        """A link joined to *groups*, like ``Connection(groups=groups)``; usable as ``Bus(opener=)``.

        Raises :class:`ModuleNotLoaded` while the module is unloaded.
        """
        if not self.loaded:
            raise ModuleNotLoaded(_SPEC.name)
        self._sync()
        ln = StandinLink(self, next(self._portids), cap_net_admin=cap_net_admin, rcvbuf=rcvbuf)
        self.links.append(ln)
        try:
            for g in groups:
                ln.join(g)
        except BaseException:
            ln.close()
            raise
        return ln

    def _listeners(self, group: str) -> list[StandinLink]:
        return [ln for ln in self.links if group in ln.groups]

    def _multicast(self, group: str, op: str, attrs: Mapping[str, Any]) -> int:
        """``genlmsg_multicast``: 0 when some listener took it, else -ESRCH (no listener, or
        none had room; no stand-in socket sets NETLINK_BROADCAST_ERROR)."""
        targets = self._listeners(group)
        if not targets:
            return -errno_mod.ESRCH
        o = _SPEC.op_by_name[op]
        data = codec.pack_genlmsg(self.family_id, o.value, _SPEC.version,
                                  codec.encode_attrs(o.attr_set, attrs), seq=0, flags=0)
        delivered = [ln._deliver(data) for ln in targets]
        return 0 if any(delivered) else -errno_mod.ESRCH

    def _released(self, ln: StandinLink) -> None:
        """The netlink release notifier: the proxies this port was the bus of fall to emergency."""
        self.links.remove(ln)
        if not self.loaded:
            return
        self._sync()
        for p in self.proxies:
            if p.bus_portid == ln.portid:
                p.bus_portid = 0
                p.change_mode(_EMERGENCY, _REASONS.value("bus-gone"), force=True)

    # -- time -------------------------------------------------------------------------

    def _sync(self) -> None:
        """Bring every proxy up to the clock (decisions and flushes due by now)."""
        self._run_until(self.clock.now_ns())

    def _run_until(self, end: int, stop: Callable[[], bool] | None = None) -> None:
        """Run flushes in time order up to *end*; with *stop*, halt (clock there) at the
        first flush after which ``stop()`` is true."""
        while self.loaded:
            due = [(p._next_flush_at(), i) for i, p in enumerate(self.proxies) if p._live()]
            if not due:
                break
            t, i = min(due)
            if t > end:
                break
            p = self.proxies[i]
            p.run_until(t)
            self.clock._set_ns(max(t, self.clock.now_ns()))
            p.flush(t)
            if stop is not None and stop():
                return
        for p in self.proxies:
            p.run_until(end)
        self.clock._set_ns(max(end, self.clock.now_ns()))

    # -- requests (kmlbus_nl.c) -----------------------------------------------------------

    def _handle(self, ln: StandinLink, op: str, a: dict[str, Any], dump: bool) -> list[dict[str, Any]]:
        o = _SPEC.op_by_name[op]
        # genl_family_rcv_msg: the permission check comes before doit/dumpit is chosen
        if o.admin and not ln.cap_net_admin:
            raise _Refused(-errno_mod.EPERM, "")
        if (o.dump_reply is None) if dump else (o.do_request is None):
            raise _Refused(-errno_mod.EOPNOTSUPP, "")
        # Strict validation (__nla_validate_parse), attribute by attribute in message order:
        # past the op's maxattr "Unknown attribute type", in range but without a policy
        # entry "Unsupported attribute", else the attribute's own policy.
        req = tuple(o.do_request or ())
        aset = _SPEC.attr_sets[o.attr_set]
        maxattr = max((aset.by_name[n].value for n in req), default=0)
        for name, v in a.items():
            if name not in req:
                num = aset.by_name[name].value if name in aset.by_name else maxattr + 1
                raise _Refused(-errno_mod.EINVAL, "Unknown attribute type" if num > maxattr
                               else "Unsupported attribute", name)
            self._policy(o.attr_set, name, v)
        now = self.clock.now_ns()
        if op == "get":
            if dump:
                return [p.attrs(now) for p in self.proxies]
            return [self._get(a).attrs(now)]
        if op == "set-mode":
            if a.get("mode") is None:
                raise _Refused(-errno_mod.EINVAL, "missing mode (KMLBUS_A_PROXY_MODE)", missing="mode")
            p = self._proxy_of(a)
            reason = a.get("reason")
            if reason not in (None, _REASONS.value("operator")) and a["mode"] != _EMERGENCY:
                self._check_bus(p, ln)
            err = p.change_mode(int(a["mode"]), _REASONS.value("operator") if reason is None else int(reason),
                                force=False)
            if err:
                raise _Refused(err, "mode change not allowed by the mode graph (kmlbus/contract/graph.yaml)", "mode")
        elif op == "set-params":
            stale = a.get("stale-ms")
            if stale is not None and stale > _MAX_TTL_MS * 1000:
                raise _Refused(-errno_mod.ERANGE, "stale-ms too large (at most 1000 * max-ttl-ms)", "stale-ms")
            period = a.get("sample-period")
            if period is not None and not 1 <= period <= _MAX_SAMPLE_PERIOD:
                raise _Refused(-errno_mod.EINVAL, "sample-period out of range (1..max-sample-period)",
                               "sample-period")
            p = self._proxy_of(a)
            if period is not None:
                p.sample_period = int(period)
            if a.get("share") is not None:
                p.share = int(a["share"])
            if a.get("explore") is not None:
                p.explore = int(a["explore"])
            if stale is not None:
                p.stale_ms = int(stale)
        elif op == "attach":
            p = self._proxy_of(a)
            if p.bus_portid and p.bus_portid != ln.portid:
                raise _Refused(-errno_mod.EBUSY, "proxy already attached to another live bus socket", "id")
            p.bus_portid = ln.portid
        elif op == "detach":
            p = self._proxy_of(a)
            if not p.bus_portid:
                raise _Refused(-errno_mod.ENOTCONN, "proxy has no bus attached", "id")
            p.bus_portid = 0
            p.change_mode(_EMERGENCY, _REASONS.value("detach"), force=True)
        elif op == "recommend":
            self._recommend(ln, a, now)
        return []

    @staticmethod
    def _policy(set_name: str, name: str, v: Any) -> None:
        """The generated nla_policy of one request attribute (kmlbus_nl_gen.c)."""
        if v is None:
            return
        attr = _SPEC.attr_sets[set_name].by_name[name]
        if attr.type == "string":
            limit = attr.checks.get("max-len")
            if limit is not None and len(str(v).encode()) > int(limit):
                raise _Refused(-errno_mod.EINVAL, "Attribute failed policy validation", name)
            return
        if not isinstance(v, int):
            return
        lo, hi = attr.checks.get("min"), _policy_max(attr)
        if (lo is not None and v < int(lo)) or (hi is not None and v > hi):
            raise _Refused(-errno_mod.ERANGE, "integer out of range", name)

    def _proxy_of(self, a: Mapping[str, Any]) -> StandinProxy:
        """``get_proxy``: the proxy named by the id attribute."""
        if a.get("id") is None:
            raise _Refused(-errno_mod.EINVAL, "missing proxy id (KMLBUS_A_PROXY_ID)", missing="id")
        for p in self.proxies:
            if p.id == a["id"]:
                return p
        raise _Refused(-errno_mod.ENOENT, "no proxy with this id", "id")

    def _get(self, a: Mapping[str, Any]) -> StandinProxy:
        pid, name = a.get("id"), a.get("name")
        if pid is None and name is None:
            raise _Refused(-errno_mod.EINVAL,
                           "get needs KMLBUS_A_PROXY_ID or KMLBUS_A_PROXY_NAME (or a dump)")
        for p in self.proxies:
            if (pid is None or p.id == pid) and (name is None or p.desc.name == name):
                return p
        if pid is not None:
            raise _Refused(-errno_mod.ENOENT, "no proxy with this id (and name)", "id")
        raise _Refused(-errno_mod.ENOENT, "no proxy with this name", "name")

    @staticmethod
    def _check_bus(p: StandinProxy, ln: StandinLink) -> None:
        """``check_bus``: an attached proxy is steered by its bus only (recommend; set-mode
        unless the reason is operator or the mode emergency)."""
        if p.bus_portid and p.bus_portid != ln.portid:
            raise _Refused(-errno_mod.EBUSY, "proxy is attached to another bus socket: only that bus may "
                           "steer it (others: reason operator, mode emergency, or detach)", "id")

    def _recommend(self, ln: StandinLink, a: Mapping[str, Any], now: int) -> None:
        """``kmlbus_nl_recommend_doit``: the whole batch is checked before any slot is written,
        one rec attribute after the other; a refusal names the offending one (``recs[i]``)."""
        recs = a.get("recs")
        if recs is None:
            raise _Refused(-errno_mod.EINVAL, "missing recs (KMLBUS_A_PROXY_RECS)", missing="recs")
        bad = np.flatnonzero((recs["ttl_ms"][:_MAX_RECS] == 0) | (recs["ttl_ms"][:_MAX_RECS] > _MAX_TTL_MS))
        if len(bad):
            raise _Refused(-errno_mod.EINVAL, "recs[offset]: ttl-ms must be 1..KMLBUS_MAX_TTL_MS",
                           f"recs[{int(bad[0])}]")
        if len(recs) > _MAX_RECS:
            raise _Refused(-errno_mod.E2BIG, "recs: more than KMLBUS_MAX_RECS entries in one request",
                           f"recs[{_MAX_RECS}]")
        p = self._proxy_of(a)
        self._check_bus(p, ln)
        bad = np.flatnonzero(recs["key"] >= p.desc.nkeys)
        if len(bad):
            raise _Refused(-errno_mod.EINVAL, "recs[offset]: key >= the proxy's nkeys", f"recs[{int(bad[0])}]")
        p.store_recs(recs, now)


class StandinLink(ControlOps):
    """A socket on the stand-in family: the ``Connection`` methods the bus uses (see
    :class:`kmlbus.bus.daemon.Link`); the per-operation methods come from :class:`ControlOps`."""

    def __init__(self, kernel: StandinKernel, portid: int, *, cap_net_admin: bool, rcvbuf: int) -> None:
        self.kernel = kernel
        self.portid = portid
        self.family_id = kernel.family_id
        self.cap_net_admin = cap_net_admin
        self.rcvbuf = rcvbuf
        self.groups: set[str] = set()
        self.stats: dict[str, int] = {"malformed": 0, "overruns": 0, "dropped": 0, "async_errors": 0}
        #: kernel errors of requests sent without waiting (see :meth:`take_errors`)
        self.async_errors: deque[NetlinkError] = deque(maxlen=256)
        self.closed = False
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._overran = False
        self._congested = False
        self._seq = itertools.count(1)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        """False once the family this link resolved is gone (module unloaded)."""
        return self.kernel.loaded and self.kernel.family_id == self.family_id

    def _check_open(self) -> None:
        if self.closed:
            raise OSError(errno_mod.EBADF, "Bad file descriptor (stand-in link closed)")

    def close(self) -> None:
        """Close the socket: the kernel sees the port released (bus-gone for its proxies)."""
        if self.closed:
            return
        if self.alive:
            # flushes due until now ran while this socket still listened (the kernel's
            # timer does not wait for our next call): heard, not counted unheard
            self.kernel._sync()
        self.closed = True
        self.groups.clear()
        self._queue.clear()
        self.kernel._released(self)

    # -- groups ------------------------------------------------------------------------

    def join(self, group: str) -> None:
        self._check_open()
        if group not in _SPEC.mcast_groups:
            raise KmlbusError(f"{_SPEC.name} has no multicast group {group!r}; the kernel offers "
                              f"{sorted(_SPEC.mcast_groups)}")
        if group in _ADMIN_GROUPS and not self.cap_net_admin:  # genl_bind
            raise PermissionError(errno_mod.EPERM, f"joining group {group} needs CAP_NET_ADMIN")
        if self.alive:
            self.kernel._sync()  # records made before we joined were not heard by us
            self.groups.add(group)

    def leave(self, group: str) -> None:
        self._check_open()
        self.kernel._sync()
        self.groups.discard(group)

    # -- receiving ---------------------------------------------------------------------

    def _deliver(self, data: bytes) -> bool:
        # netlink_broadcast_deliver: delivered while the queue is within rcvbuf and the socket
        # not congested; an overrun marks it congested (everything dropped) until the reader
        # has emptied its queue (netlink_rcv_wake).  Bytes of messages stand for skb truesize.
        if self._congested or self._queued > self.rcvbuf:
            self._congested = self._overran = True
            return False
        self._queue.append(data)
        self._queued += len(data)
        return True

    def _take(self) -> bytes:
        data = self._queue.popleft()
        self._queued -= len(data)
        if self._overran:
            self._overran = False
            self.stats["overruns"] += 1
        if not self._queue:
            self._congested = False
        return data

    def wait_datagram(self, timeout: float | None = None) -> bytes | None:
        """As the socket's: None at once when datagrams are queued; else simulated time
        runs until one arrives (returned undecoded) or *timeout* simulated seconds pass."""
        self._check_open()
        k = self.kernel
        k._sync()
        if self._queue:
            return None
        if timeout is None:
            end = k.clock.now_ns() + 3600 * NS
        else:
            end = k.clock.now_ns() + max(0, math.ceil(timeout * NS))
        k._run_until(end, stop=lambda: bool(self._queue))
        if not self._queue:
            if timeout is None:
                raise KmlbusError("stand-in wait(timeout=None): nothing arrived in an hour of "
                                  "simulated time; the real socket would block forever")
            return None
        return self._take()

    def accept(self, data: bytes) -> list[Message]:
        """The messages of a datagram from :meth:`wait_datagram`, decoded."""
        try:
            return codec.decode_msg(data, family_id=self.family_id)
        except codec.CodecError:
            self.stats["malformed"] += 1
            return []

    def recv(self, timeout: float | None = None) -> list[Message]:
        """Multicast messages: the queued ones (at most DRAIN_MAX datagrams), else the first
        datagram that arrives within *timeout* simulated seconds, alone, as on the socket."""
        self._check_open()
        self.kernel._sync()
        if not self._queue:
            if timeout == 0:
                return []
            data = self.wait_datagram(timeout)
            return [] if data is None else self.accept(data)
        out: list[Message] = []
        for _ in range(DRAIN_MAX):
            if not self._queue:
                break
            out.extend(self.accept(self._take()))
        return out

    # -- requests ----------------------------------------------------------------------

    def request(self, op: str, attrs: Mapping[str, Any] | None = None, *, dump: bool = False
                ) -> list[dict[str, Any]]:
        """As :meth:`kmlbus.wire.netlink.Connection.request`: reply attribute dicts, or NetlinkError."""
        self._check_open()
        try:
            o = _SPEC.op(op)
        except kspec.SpecError as e:
            raise KmlbusError(str(e)) from None
        flags = codec.NLM_F_REQUEST | codec.NLM_F_ACK | (codec.NLM_F_DUMP if dump else 0)
        wire = codec.encode_msg(self.family_id, op, attrs or {}, seq=next(self._seq), flags=flags)
        k = self.kernel
        if not self.alive:  # genl_rcv_msg: no family with this id
            raise NetlinkError(errno_mod.ENOENT, "", op, _SPEC.name)
        k._sync()
        (msg,) = codec.decode_msg(wire)
        try:
            replies = k._handle(self, op, msg.attrs, dump)
        except _Refused as e:
            raise NetlinkError(-e.err, refusal_text(e.msg, e.missing, e.attr), op, _SPEC.name) from None
        reply_set = o.attr_set
        return [codec.decode_attrs(reply_set, codec.encode_attrs(reply_set, r)) for r in replies]

    def send_nowait(self, op: str, attrs: Mapping[str, Any]) -> int:
        """As ``Connection.send_nowait``: the request runs now; only a failure is kept."""
        seq = next(self._seq)
        try:
            self.request(op, attrs)
        except NetlinkError as e:
            self.async_errors.append(e)
            self.stats["async_errors"] += 1
        return seq

    def take_errors(self) -> list[NetlinkError]:
        """Errors of :meth:`send_nowait` requests, oldest first (then forgotten)."""
        self._check_open()
        out = list(self.async_errors)
        self.async_errors.clear()
        return out
