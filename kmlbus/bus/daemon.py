"""``kmlbus run``: the bus daemon.

One :class:`Bus` owns one netlink socket.  That socket attaches to every
configured proxy, so when the daemon dies the kernel sees the socket released
and drops those proxies to emergency by itself: the kernel never depends on
the daemon shutting down cleanly.

The loop, per message from the kernel:

* ``telemetry`` -> evidence; in modes whose duty is to recommend, the
  dispatcher runs the model on the batch and the recommendations go back in
  one ``recommend`` request;
* ``feedback`` -> evidence (per-arm efficiency);
* ``mode-event`` -> the mode machine follows kernel-initiated changes.

Recommendations go out first; evidence, learning and the trace are updated
after the send.  A telemetry batch that ends an idle wait takes a fast lane
(:meth:`Bus._answer_idle`): the socket hands its datagram over before decoding
it, and the model's recommendations are made from the message's bytes and
sent before any array exists; the decoded message then only updates the
bookkeeping.  A proxy configured with ``learn = true`` also has a
:class:`~kmlbus.bus.learner.LearningLoop`: in learning the bus sends exploratory
values, refits in a background thread, and the learner's estimate of the
served model takes part in maturity.  A model demoted for losing to the
default is held in learning until it is replaced.

Several times a second the policy looks at each proxy's evidence; a move it
decides is sent to the kernel first and recorded in the machine only when the
kernel accepts it, so both always agree.  Once a second the daemon checks that
the family and its attachments are still there (module reloaded -> it
reconnects and re-attaches), hot-swaps changed model files, follows operator
pins, and writes its state file for ``kmlbus status``.
"""

from __future__ import annotations

import dataclasses
import errno as errno_mod
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from kmlbus.bus import pins, statefile
from kmlbus.bus.config import Config, ConfigError, ProxySchema, load
from kmlbus.bus.dispatcher import Dispatcher, DispatchError
from kmlbus.bus.learner import Learner, LearningLoop
from kmlbus.bus.registry import ModelError, ModelRegistry
from kmlbus.bus.tracefile import TraceWriter
from kmlbus.contract import graph as mgraph
from kmlbus.wire import codec, netlink
from modes.evidence import Evidence
from modes.machine import ModeError, ProxyModes, TransitionRecord
from modes.policy import Decision, Fault, Policy, duty

__all__ = ["Bus", "ProxyState", "main"]

log = logging.getLogger(__name__)

#: Seconds between policy evaluations.
TICK_S = 0.1
#: Seconds between health checks, model file polls and state file writes.
HOUSEKEEPING_S = 1.0
#: Consecutive batches over the latency budget that make a fault.  One slow
#: batch is noise (a page fault, a busy CPU); a run of them is a slow model.
LATENCY_STRIKES = 3


class Link(Protocol):
    """What the bus needs of a connection to the family.

    :class:`kmlbus.wire.netlink.Connection` is the real one; :mod:`tests.support.standin`
    provides an in-process stand-in for fast host tests of the daemon.
    """

    portid: int
    family_id: int
    stats: dict[str, int]
    #: see :attr:`kmlbus.wire.netlink.GenlSocket.on_idle_datagram`
    on_idle_datagram: Callable[[bytes], bool] | None

    def recv(self, timeout: float | None = None) -> list[codec.Message]: ...
    def join(self, group: str) -> None: ...
    def leave(self, group: str) -> None: ...
    def proxies(self) -> list[dict[str, Any]]: ...
    def set_mode(self, proxy_id: int, mode: str, reason: str = "operator") -> None: ...
    def set_params(self, proxy_id: int, *, share: int | None = None, explore: int | None = None,
                   stale_ms: int | None = None) -> None: ...
    def attach(self, proxy_id: int) -> None: ...
    def detach(self, proxy_id: int) -> None: ...
    def recommend(self, proxy_id: int, recs: Any, *, wait: bool = True) -> None: ...
    def take_errors(self) -> list[netlink.NetlinkError]: ...
    def close(self) -> None: ...


#: Opens a link joined to the given multicast groups; raises
#: :class:`kmlbus.wire.netlink.ModuleNotLoaded` when the family is absent.
Opener = Callable[[Sequence[str]], Link]


def _open_netlink(groups: Sequence[str]) -> Link:
    return netlink.Connection(groups=groups)


@dataclass
class ProxyState:
    """What the bus keeps about one attached proxy."""

    id: int
    name: str
    schema: ProxySchema
    modes: ProxyModes
    evidence: Evidence
    slow_batches: int = 0
    #: telemetry batches answered by the fast lane (:meth:`Bus._answer_idle`)
    fast_lane: int = 0
    #: the proxy's learning loop, when its config says ``learn = true``
    learning: LearningLoop | None = None
    #: the model that was being served when the proxy was last demoted (see :meth:`Bus.tick`)
    demoted_model: object | None = None


class Bus:
    """The daemon's state: connection, models, and one machine per proxy."""

    def __init__(self, config: Config, *, graph: mgraph.Graph | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 state_path: Path | None = None, opener: Opener = _open_netlink,
                 idle: Callable[[float], object] | None = None) -> None:
        self.config = config
        self.opener = opener
        #: waits between attempts to find the family (simulated time may replace it)
        self.idle: Callable[[float], object] = (
            idle if idle is not None else lambda seconds: self.stop.wait(seconds))
        g = graph or mgraph.load()
        # The config's latency budget is the operator's word; the graph's is the default.
        self.graph = dataclasses.replace(g, guards=dataclasses.replace(
            g.guards, latency_budget_ms=config.bus.latency_budget_ms))
        self.clock = clock
        self.policy = Policy(self.graph, clock)
        self.registry = ModelRegistry(config)
        self.dispatcher = Dispatcher(self.registry)
        self.state_path = state_path
        #: Receives telemetry, feedback and mode events (multicast only).
        self.conn: Link | None = None
        #: Sends requests and owns the attachments.  Separate from :attr:`conn` so
        #: that a multicast flood overrunning one socket never eats a request's ACK.
        self.ctl: Link | None = None
        self.proxies: dict[int, ProxyState] = {}
        self.stop = threading.Event()
        self.stats = {"reconnects": 0, "malformed": 0, "send_errors": 0, "refused_moves": 0}
        #: msgpack trace of every batch, when the config asks for one (``[bus] trace``).
        self.trace: TraceWriter | None = None
        if config.bus.trace is not None:
            self.trace = TraceWriter(config.bus.trace, append=True)
        self._next_tick = 0.0
        self._next_housekeeping = 0.0
        #: CLOCK_MONOTONIC ns when the last ``recommend`` was handed to the kernel
        #: (the moment it applied them; ``kmlbus bench`` reads it)
        self.last_send_ns = 0
        self._overruns = 0
        self._async_seen = 0
        self._pins_stamp: tuple[int, int] | None = None
        self._pins_dirty = True
        #: learning loops by proxy name: they outlive a module reload (same binding)
        self._loops: dict[str, LearningLoop] = {}

    # -- connection ------------------------------------------------------------

    def connect(self) -> bool:
        """Open the socket, attach configured proxies; False if the module is absent."""
        try:
            ctl = self.opener(())
        except netlink.ModuleNotLoaded:
            return False
        try:
            conn = self.opener(("telemetry", "events"))
        except BaseException:
            ctl.close()
            raise
        self.conn, self.ctl = conn, ctl
        conn.on_idle_datagram = self._answer_idle
        self._async_seen = 0  # ctl.stats["async_errors"] already counted
        self.proxies.clear()
        for attrs in ctl.proxies():
            name = str(attrs.get("name"))
            if name not in self.config.proxies:
                continue
            self._adopt(attrs)
        missing = set(self.config.proxies) - {p.name for p in self.proxies.values()}
        for name in sorted(missing):
            log.warning("proxy %s: configured but the kernel has no such proxy (yet)", name)
        return True

    def _adopt(self, attrs: dict[str, Any]) -> None:
        """Bind the model, build the machine, attach and parametrise one proxy."""
        assert self.ctl is not None
        schema = ProxySchema.from_attrs(attrs)
        kmode = codec.enum_name("mode", int(attrs.get("mode", 0)))
        pid = schema.id

        def mirror(_source: str, dest: str, reason: str) -> None:
            # Every move the machine makes (policy, fault, operator pin) goes to
            # the kernel first; a refusal raises and the machine does not move.
            if self.ctl is None:
                raise netlink.KmlbusError("no connection to the kernel")
            self.ctl.set_mode(pid, dest, reason)

        modes = ProxyModes(schema.name, self.graph, initial=kmode, clock=self.clock, mirror=mirror)
        name = schema.name

        if self.trace is not None:
            self.trace.add_schema(schema)
        try:
            self.registry.bind(schema)
        except (ModelError, ConfigError) as e:
            log.error("proxy %s: %s; it stays in emergency", schema.name, e)
        loop = self._learning_loop(schema)
        r = schema.recommendation
        bounds = (r.min, r.max) if r.min is not None and r.max is not None else None
        ev = Evidence(modes, bounds=bounds, scorer=None if loop is None else loop.score)
        ps = ProxyState(schema.id, schema.name, schema, modes, ev, learning=loop)

        def on_transition(rec: TransitionRecord) -> None:
            self._log_transition(name, rec)
            if rec.reason == "demotion":
                # measured worse than the default: not promoted again until it is replaced
                ps.demoted_model = self.registry.model(name)

        modes.subscribe(on_transition)
        g = self.graph.guards
        pc = self.config.proxies.get(name)
        explore = g.exploration_share if pc is None else pc.explore_share(g.exploration_share)
        self.ctl.attach(schema.id)
        self.ctl.set_params(schema.id, share=g.collaboration_share, explore=explore)
        self.proxies[schema.id] = ps
        self._pins_dirty = True
        if kmode != "emergency":
            # A new bus has no evidence for the mode a previous one reached.
            self._send_move(ps, self.policy.fault(modes, Fault.BUS_GONE, "new bus attached"))
        log.info("proxy %s (id %d): attached in %s; model %s%s", schema.name, schema.id, modes.mode,
                 "loaded" if self.registry.has_model(schema.name) else "missing",
                 "" if loop is None else f"; learning, explore {explore} permille")

    def _learning_loop(self, schema: ProxySchema) -> LearningLoop | None:
        """The proxy's learning loop if its config asks for one (kept across reloads)."""
        pc = self.config.proxies.get(schema.name)
        if pc is None or not pc.learn or schema.name not in self.registry.proxies:
            self._loops.pop(schema.name, None)
            return None
        b = self.registry.binding(schema.name)
        loop = self._loops.get(schema.name)
        if loop is not None and loop.binding == b:
            loop.learner.forget_pending()  # a reloaded module numbers decisions afresh
            return loop
        loop = LearningLoop(Learner(b), self.registry, every_s=pc.learn_every_s,
                            spread=pc.explore_spread, save_to=pc.learned_model, background=True)
        self._loops[schema.name] = loop
        return loop

    def _lost(self, why: str) -> None:
        """The family went away (module unloaded): forget it and wait for its return."""
        log.warning("kmlbus family lost (%s); waiting for the module to come back", why)
        for c in (self.conn, self.ctl):
            if c is not None:
                c.close()
        self.conn = self.ctl = None
        self.proxies.clear()
        self.stats["reconnects"] += 1

    # -- messages --------------------------------------------------------------

    def handle(self, m: codec.Message) -> None:
        """Route one multicast message; anything odd is counted, never fatal."""
        self.handle_all([m])

    def handle_all(self, msgs: list[codec.Message]) -> None:
        """Route what one receive returned, coalescing batches per proxy.

        Consecutive telemetry (and feedback) batches of a proxy are joined into
        one array, so a bus that fell behind catches up with one inference and
        one ``recommend`` per proxy instead of one per kernel message.  Mode
        events keep their place: batches before an event are handled before it.

        Recommendations go out first; evidence, learning and the trace are
        updated after every send, because until the kernel has the fresh
        values its decisions run on old ones.
        """
        # (proxy id, op, answered already by _answer_idle) -> the batches' arrays
        pending: dict[tuple[int, str, bool], list[np.ndarray]] = {}

        def flush() -> None:
            batches = []
            for (pid, op, answered), parts in pending.items():
                # Joining the raw bytes is several times cheaper than np.concatenate,
                # which re-derives the structured dtype for every call.
                arr = parts[0] if len(parts) == 1 else np.frombuffer(
                    b"".join(p.tobytes() for p in parts), dtype=parts[0].dtype)
                batches.append((self.proxies[pid], op, arr, answered))
            pending.clear()
            ok = [op != "telemetry" or answered or self._guarded(ps, op, self._recommend, arr)
                  for ps, op, arr, answered in batches]
            for (ps, op, arr, _), good in zip(batches, ok):
                if good:
                    self._guarded(ps, op, self._account, arr)

        for m in msgs:
            pid = m.attrs.get("id")
            if not isinstance(pid, int) or pid not in self.proxies:
                continue
            key = "records" if m.op == "telemetry" else "feedback" if m.op == "feedback" else ""
            if key:
                arr = m.attrs.get(key)
                if not isinstance(arr, np.ndarray):
                    self.stats["malformed"] += 1
                    continue
                pending.setdefault((pid, m.op, m.answered), []).append(arr)
            else:
                flush()
                self._on_event(self.proxies[pid], m)
        flush()

    def _guarded(self, ps: ProxyState, op: str,
                 step: Callable[[ProxyState, str, np.ndarray], object], arr: np.ndarray) -> bool:
        """Run one step on a batch; a malformed batch is counted and logged (False)."""
        try:
            step(ps, op, arr)
            return True
        except (KeyError, ValueError, TypeError) as e:
            self.stats["malformed"] += 1
            log.warning("proxy %s: malformed %s batch ignored: %s", ps.name, op, e)
            return False

    def _account(self, ps: ProxyState, op: str, arr: np.ndarray) -> None:
        """Bookkeeping of a batch: trace, learning, evidence."""
        learn = ps.learning if ps.learning is not None and duty(ps.modes.mode).learn else None
        if op == "telemetry":
            if self.trace is not None:
                self.trace.telemetry(ps.name, arr)
            if learn is not None:
                learn.telemetry(arr)
            ps.evidence.add_samples(arr)
        else:
            if self.trace is not None:
                self.trace.feedback(ps.name, arr)
            if learn is not None:
                learn.feedback(arr)
            ps.evidence.add_feedback(arr)

    def _on_event(self, ps: ProxyState, m: codec.Message) -> None:
        try:
            if m.op == "mode-event":
                if self.trace is not None:
                    self.trace.mode(ps.name, int(m.attrs["mode"]), int(m.attrs.get("old-mode", 0)),
                                    int(m.attrs.get("reason", 0)))
                mode = codec.enum_name("mode", int(m.attrs["mode"]))
                reason = codec.enum_name("reason", int(m.attrs.get("reason", 0)))
                old_mode = codec.enum_name("mode", int(m.attrs.get("old-mode", 0)))
                ps.modes.sync_kernel(mode, reason, old_mode)
        except (KeyError, ValueError, TypeError, ModeError) as e:
            self.stats["malformed"] += 1
            log.warning("proxy %s: malformed %s message ignored: %s", ps.name, m.op, e)

    @staticmethod
    def _exploring(ps: ProxyState) -> LearningLoop | None:
        """The proxy's learning loop while it explores (in learning), else None."""
        return ps.learning if ps.modes.mode == "learning" else None

    def _recommend(self, ps: ProxyState, _op: str, records: np.ndarray | memoryview) -> bool:
        """Telemetry -> recommendations sent (the latency-critical part of a batch);
        False when the proxy's mode asks for none or there is nothing to make them with.

        *records* may be the packed bytes of the samples only when the proxy is not
        exploring (exploration needs the keys as an array; see :meth:`_answer_idle`).
        """
        mode = ps.modes.mode
        exploring = self._exploring(ps)
        has_model = self.registry.has_model(ps.name)
        if not duty(mode).recommend or not (has_model or exploring is not None):
            return False
        recs: np.ndarray | bytes | None = None  # packed rec structs from the model
        if has_model:
            recs = self._model_recs(ps, records)
            if recs is None:
                return True
        if exploring is not None:
            assert isinstance(records, np.ndarray)
            # Learning: the kernel applies these only on its explore share; the rest are shadows.
            keys = np.unique(records["key"])
            recs = exploring.explore(keys[keys < ps.schema.nkeys],
                                     None if recs is None else _rec_array(recs))
        if recs is not None:
            self._send_recs(ps, recs)
        return True

    def _answer_idle(self, data: bytes) -> bool:
        """The socket's idle-datagram hook: the bus's fast lane.

        A telemetry batch that ended an idle wait, of a proxy that is not
        exploring, is answered (:meth:`_recommend`) from the message's bytes,
        before it is decoded and before any array is made; :meth:`handle_all`
        then does only its bookkeeping (the message comes with ``answered``
        set).  Anything else, or anything unusual, is left to
        :meth:`handle_all` (False).
        """
        if self.conn is None:
            return False
        m = codec.peek_event(data, self.conn.family_id)
        if m is None or m.op != "telemetry":
            return False
        ps = self.proxies.get(m.attrs.get("id", -1))
        raw = m.attrs.get("records")
        if ps is None or not isinstance(raw, memoryview) or self._exploring(ps) is not None:
            return False
        if not self._recommend(ps, m.op, raw):
            return False
        ps.fast_lane += 1
        return True

    def _model_recs(self, ps: ProxyState, records: np.ndarray | memoryview) -> bytes | None:
        """The model's recommendations for a batch, packed; None after a model fault."""
        try:
            recs = self.dispatcher.handle_telemetry_packed(ps.name, records)
        except DispatchError as e:
            self._send_move(ps, self.policy.fault(ps.modes, Fault.MODEL_ERROR, str(e), ps.evidence))
            return None
        ps.slow_batches = ps.slow_batches + 1 if self.dispatcher.over_budget(ps.name) else 0
        if ps.slow_batches >= LATENCY_STRIKES:
            ps.slow_batches = 0
            c = self.dispatcher.counters_of(ps.name)
            self._send_move(ps, self.policy.observe_latency(ps.modes, c.last_batch_ns / 1e6,
                                                            ps.evidence))
        return recs

    def _send_recs(self, ps: ProxyState, recs: np.ndarray | bytes) -> None:
        """Send recommendations unless the mode changed meanwhile; refusals come later."""
        if len(recs) and duty(ps.modes.mode).recommend and self.ctl is not None:
            try:
                # No ACK: the kernel has applied them when the send returns; a refusal
                # comes back later and is counted in housekeeping (_collect_errors).
                self.ctl.recommend(ps.id, recs, wait=False)
                self.last_send_ns = time.monotonic_ns()
            except (netlink.NetlinkError, OSError) as e:
                self.stats["send_errors"] += 1
                log.warning("proxy %s: recommendations not sent: %s", ps.name, e)
            if self.trace is not None:
                self.trace.recs(ps.name, _rec_array(recs))

    # -- moves -----------------------------------------------------------------

    def _log_transition(self, name: str, rec: TransitionRecord) -> None:
        log.info("proxy %s: %s -> %s [%s, %s] %s", name, rec.source, rec.dest,
                 rec.trigger or "resync", rec.reason, rec.detail)

    def _send_move(self, ps: ProxyState, d: Decision | None) -> None:
        """Mirror a decided move to the kernel, then record it in the machine."""
        if d is None or self.ctl is None:
            return
        try:
            ps.modes.apply(d)  # mirrors to the kernel first (see _adopt)
        except netlink.NetlinkError as e:
            self.stats["refused_moves"] += 1
            log.warning("proxy %s: kernel refused %s -> %s: %s", ps.name, d.source, d.target, e)

    def tick(self) -> None:
        """Follow operator pins, then let the policy judge every proxy's evidence."""
        self._follow_pins()
        for ps in list(self.proxies.values()):
            self._learn(ps)
            healthy = self.registry.has_model(ps.name) or (
                ps.learning is not None and self.registry.error(ps.name) is None)
            d = self.policy.evaluate(ps.modes, ps.evidence, healthy=healthy)
            if d is not None and d.target == "collaboration" and self._held(ps):
                d = None
            self._send_move(ps, d)

    def _held(self, ps: ProxyState) -> bool:
        """Whether the proxy's model was demoted and has not been replaced since.

        Shadow maturity says nothing about efficiency, so without this a model
        measured worse than the default would mature again at once and cycle
        learning -> collaboration -> (by chance) recommendation.  A new model
        file or a learned fit ends the hold.
        """
        if ps.demoted_model is None:
            return False
        if self.registry.model(ps.name) is ps.demoted_model:
            return True
        ps.demoted_model = None
        return False

    def _learn(self, ps: ProxyState) -> None:
        """Refit the proxy's learned model when due (only in modes whose duty is to learn)."""
        if ps.learning is None or not duty(ps.modes.mode).learn:
            return
        try:
            fit = ps.learning.tick(self.clock())
        except Exception as e:  # noqa: BLE001 - any failure of learning is a model fault, never fatal
            log.error("proxy %s: learning failed: %s: %s", ps.name, type(e).__name__, e)
            self._send_move(ps, self.policy.fault(ps.modes, Fault.MODEL_ERROR,
                                                  f"learning failed: {e}", ps.evidence))
            return
        if fit is not None:
            log.info("proxy %s: learned model installed (fit %d: %d samples, estimated %.3f, "
                     "observed %.3f)", ps.name, ps.learning.fits, fit.n_samples,
                     fit.estimated.efficiency, fit.observed)

    def housekeeping(self) -> None:
        """Check attachments, hot-swap models, follow pins, publish state."""
        assert self.conn is not None and self.ctl is not None
        self._collect_errors()
        seen = {int(a["id"]): a for a in self.ctl.proxies()}
        overruns = self.conn.stats.get("overruns", 0)
        for ps in list(self.proxies.values()):
            a = seen.get(ps.id)
            if a is None or a.get("name") != ps.name or int(a.get("bus-portid", 0)) != self.ctl.portid:
                # Module reloaded (ids and groups may be new) or someone detached us.
                raise _Reconnect(f"proxy {ps.name} is no longer attached to this bus")
            if overruns != self._overruns:
                # The socket overflowed: mode events may be lost; the kernel's word wins.
                ps.modes.events_lost(codec.enum_name("mode", int(a.get("mode", 0))))
        self._overruns = overruns
        for i, a in seen.items():
            if str(a.get("name")) in self.config.proxies and i not in self.proxies:
                # A subsystem registered its proxy: adopt it; the others stay as they are.
                try:
                    self._adopt(a)
                except netlink.NetlinkError as e:
                    if e.errno in (errno_mod.ENOENT, errno_mod.EOPNOTSUPP):
                        raise
                    log.warning("proxy %s: not adopted (will retry): %s", a.get("name"), e)
        for r in self.registry.poll():
            log.info("model reload: %s", r)
        self.write_state()

    def _collect_errors(self) -> None:
        """Count and log the kernel's refusals of recommendations sent without an ACK."""
        assert self.ctl is not None
        errors = self.ctl.take_errors()
        # The link keeps a bounded list of errors but counts every one: count from that.
        total = self.ctl.stats.get("async_errors", 0)
        new, self._async_seen = total - self._async_seen, total
        if not new:
            return
        self.stats["send_errors"] += new
        log.warning("%d recommend request(s) refused by the kernel since the last check; "
                    "first kept: %s", new, errors[0] if errors else "-")

    def _follow_pins(self) -> None:
        """Apply the operator's pins file when it changed (checked before every policy pass,
        so the bus never moves a proxy the operator has just pinned)."""
        try:
            st = pins.pins_path().stat()
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp == self._pins_stamp and not self._pins_dirty:
            return
        self._pins_stamp, self._pins_dirty = stamp, False
        pinned = pins.load()
        for ps in self.proxies.values():
            want = pinned.get(ps.name) or pinned.get(str(ps.id))
            if want and ps.modes.pinned != want:
                try:
                    ps.modes.pin(want)
                except (ModeError, netlink.NetlinkError) as e:
                    log.warning("proxy %s: pin %s not possible: %s", ps.name, want, e)
            elif not want and ps.modes.pinned is not None:
                ps.modes.unpin()

    def snapshot(self) -> dict[str, Any]:
        """The daemon's view for ``kmlbus status``: mode, reason, evidence vs thresholds."""
        out: dict[str, Any] = {"pid": os.getpid(), "at": time.time(), "stats": dict(self.stats),
                               "proxies": {}}
        for ps in self.proxies.values():
            st = ps.modes.status()
            rep = self.policy.report(ps.modes, ps.evidence)
            arms = rep.get("arms", {})
            last = ps.modes.last
            err = self.registry.error(ps.name)
            lm = self.registry.model(ps.name)
            out["proxies"][ps.name] = {
                "mode": st["mode"], "in_mode_s": st["in_mode_s"], "pinned": st["pinned"],
                "last": None if last is None else {
                    "from": last.source, "to": last.dest, "trigger": last.trigger,
                    "reason": f"{last.reason}: {last.detail}"},
                "evidence": {
                    "default_mean": arms.get("default", {}).get("mean"),
                    "model_mean": arms.get("model", {}).get("mean"),
                    "maturity": rep.get("maturity", {}).get("quality"),
                    "detail": rep,
                },
                "model": None if lm is None else str(lm.source),
                "model_error": None if err is None else str(err),
                "dispatch": self.dispatcher.counters_of(ps.name).as_dict(),
                "fast_lane": ps.fast_lane,
                "learning": None if ps.learning is None else _learning_status(ps.learning),
                "held": ("model demoted; waiting for a new model before collaboration"
                         if self._held(ps) else None),
            }
        return out

    def write_state(self) -> None:
        """Publish :meth:`snapshot` to the state file (errors only logged)."""
        try:
            statefile.write(self.snapshot(), self.state_path)
        except OSError as e:
            log.debug("state file not written: %s", e)

    # -- loop ------------------------------------------------------------------

    def step(self, timeout: float = 0.05) -> None:
        """Receive and handle what arrived within *timeout*, then run due periodic work."""
        if self.conn is None:
            if not self.connect():
                self.idle(0.5)
                return
        assert self.conn is not None
        try:
            self.handle_all(self.conn.recv(timeout=timeout))
            now = self.clock()
            if now >= self._next_tick:
                self._next_tick = now + TICK_S
                self.tick()
            if now >= self._next_housekeeping:
                self._next_housekeeping = now + HOUSEKEEPING_S
                self.housekeeping()
        except _Reconnect as e:
            self._lost(str(e))
        except netlink.ModuleNotLoaded as e:
            self._lost(str(e))
        except netlink.NetlinkError as e:
            if e.errno not in (errno_mod.ENOENT, errno_mod.EOPNOTSUPP):
                raise
            self._lost(str(e))
        except netlink.KmlbusError as e:
            # A request went unanswered (kernel busy, reply lost): count it, carry on;
            # the next housekeeping pass finds out whether the family is still there.
            self.stats["send_errors"] += 1
            log.warning("netlink request failed: %s", e)

    def run(self, duration: float | None = None) -> None:
        """Loop until :attr:`stop` is set or *duration* seconds have passed."""
        end = None if duration is None else self.clock() + duration
        while not self.stop.is_set() and (end is None or self.clock() < end):
            self.step()

    def shutdown(self) -> None:
        """Detach every proxy (the kernel falls back to emergency) and close."""
        if self.conn is None or self.ctl is None:
            return
        for ps in self.proxies.values():
            try:
                self.ctl.detach(ps.id)
            except netlink.KmlbusError as e:
                log.warning("proxy %s: detach failed: %s", ps.name, e)
        self.write_state()
        self.conn.close()
        self.ctl.close()
        self.conn = self.ctl = None
        if self.trace is not None:
            self.trace.close()


def _rec_array(recs: np.ndarray | bytes) -> np.ndarray:
    """Recommendations as a ``rec`` struct array (the hot path has them packed)."""
    if isinstance(recs, np.ndarray):
        return recs
    return np.frombuffer(recs, dtype=codec.struct_dtype("rec"))


def _learning_status(loop: LearningLoop) -> dict[str, Any]:
    """JSON-ready state of a learning loop for ``kmlbus status``."""
    last = loop.last
    return {
        "samples": loop.learner.n_samples, "fits": loop.fits, "kept": loop.kept,
        "unmatched_dropped": loop.learner.unmatched_dropped,
        "last_fit": None if last is None else {
            "weights": list(last.weights), "bias": last.bias, "samples": last.n_samples,
            "estimated": last.estimated.efficiency, "coverage": last.estimated.coverage,
            "observed": last.observed},
    }


class _Reconnect(Exception):
    """Internal: the attachments are gone; reconnect from scratch."""


def main(config_path: str, *, duration: float | None = None) -> int:
    """``kmlbus run``: load the config, serve until SIGTERM/SIGINT, detach, exit 0."""
    try:
        cfg = load(config_path)
    except ConfigError as e:
        print(f"kmlbus run: {e}")
        return 2
    bus = Bus(cfg)

    def _stop(signum: int, _frame: object) -> None:
        log.info("signal %d: detaching and exiting", signum)
        bus.stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if not bus.connect():
        raise netlink.ModuleNotLoaded()
    try:
        bus.run(duration)
    finally:
        bus.shutdown()
    return 0
