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
* ``mode-event`` -> the mode machine follows kernel-initiated changes;
* ``proxy-removed`` -> the proxy's object is dropped (a new registration of
  the name is a new proxy, adopted at the next housekeeping).

Recommendations go out first; evidence, learning and the trace are updated
after the send.  When the socket was idle, the loop takes the datagram that
ended the wait undecoded and answers it through the fast lane
(:mod:`kmlbus.bus.fastlane`) before decoding it.  Everything about one proxy
(its machine, evidence, learning loop, moves and holds) lives in its
:class:`~kmlbus.bus.proxy.Proxy`; the bus keeps the connection, the loop and
housekeeping.

Several times a second the policy looks at each proxy's evidence; a move it
decides is sent to the kernel first and recorded in the machine only when the
kernel accepts it, so both always agree.  Once a second the daemon checks that
the family and its attachments are still there (module reloaded -> it
reconnects and re-attaches), hot-swaps changed model files, follows operator
pins, and writes its state file for ``kmlbus status``.

Run by systemd (``packaging/systemd/kmlbus.service``, ``Type=notify``), the
daemon says READY once its proxies are attached and pings the watchdog from
the loop itself (:mod:`kmlbus.bus.sdnotify`), so a hung loop is restarted too.
"""

from __future__ import annotations

import dataclasses
import errno as errno_mod
import functools
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from kmlbus.bus import pins, readings, statefile
from kmlbus.bus.config import Config, ConfigError, ProxySchema, load
from kmlbus.bus.dispatcher import Dispatcher
from kmlbus.bus import fastlane
from kmlbus.bus.learner import Learner, LearningLoop
from kmlbus.bus.placefit import PlaceLearner
from kmlbus.bus.proxy import Proxy
from kmlbus.bus.registry import ModelError, ModelRegistry
from kmlbus.bus.sdnotify import Notifier
from kmlbus.bus.tracefile import TraceWriter
from kmlbus.contract import graph as mgraph
from kmlbus.wire import codec, netlink
from modes.machine import ModeError, ProxyModes
from modes.policy import Fault, Policy

__all__ = ["Bus", "Link", "Opener", "Published", "main", "serve"]

log = logging.getLogger(__name__)

#: Seconds between policy evaluations.
TICK_S = 0.1
#: Seconds between health checks, model file polls and state file writes.
HOUSEKEEPING_S = 1.0


class Link(Protocol):
    """What the bus needs of a connection to the family.

    :class:`kmlbus.wire.netlink.Connection` is the real one; :mod:`tests.support.standin`
    provides an in-process stand-in for fast host tests of the daemon.
    """

    portid: int
    family_id: int
    stats: dict[str, int]

    @property
    def rcvbuf(self) -> int: ...

    def recv(self, timeout: float | None = None) -> list[codec.Message]: ...
    def wait_datagram(self, timeout: float | None = None) -> bytes | None: ...
    def accept(self, data: bytes) -> list[codec.Message]: ...
    def join(self, group: str) -> None: ...
    def leave(self, group: str) -> None: ...
    def proxies(self) -> list[dict[str, Any]]: ...
    def set_mode(self, proxy_id: int, mode: str, reason: str = "operator") -> None: ...
    def set_params(self, proxy_id: int, *, share: int | None = None, explore: int | None = None,
                   stale_ms: int | None = None, sample_period: int | None = None) -> None: ...
    def attach(self, proxy_id: int) -> None: ...
    def detach(self, proxy_id: int) -> None: ...
    def recommend(self, proxy_id: int, recs: Any, *, wait: bool = True) -> None: ...
    def take_errors(self) -> list[netlink.NetlinkError]: ...
    def close(self) -> None: ...


class Opener(Protocol):
    """Opens a link joined to *groups* with a receive buffer of *rcvbuf* bytes; raises
    :class:`kmlbus.wire.netlink.ModuleNotLoaded` when the family is absent."""

    def __call__(self, groups: Sequence[str], *, rcvbuf: int = ...) -> Link: ...


def _open_netlink(groups: Sequence[str], *, rcvbuf: int = 8 << 20) -> Link:
    # On the telemetry socket, a message the bus had no room for is counted send-failed
    # by the kernel even if another listener (kmlbus watch) took it.
    return netlink.Connection(groups=groups, rcvbuf=rcvbuf, broadcast_error="telemetry" in groups)


@dataclasses.dataclass(frozen=True)
class Published:
    """What the loop last published for readers in other threads (the metrics endpoint).

    Built by :meth:`Bus.housekeeping` and replaced whole, never changed in
    place, so a reader that takes :attr:`Bus.published` once sees one
    consistent moment: the kernel's dump and the daemon's snapshot of it.
    """

    #: the bus's clock when it was taken
    at: float
    #: the kernel's ``get`` dump, one reply per proxy name (every proxy, attached or not)
    kernel: dict[str, dict[str, Any]]
    #: :meth:`Bus.snapshot` at the same moment (what the state file holds)
    snapshot: dict[str, Any]


class Bus:
    """The daemon's state: connection, models, and one machine per proxy."""

    def __init__(self, config: Config, *, graph: mgraph.Graph | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 state_path: Path | None = None, opener: Opener = _open_netlink,
                 idle: Callable[[float], object] | None = None,
                 notifier: Notifier | None = None) -> None:
        self.config = config
        #: systemd's notify socket (READY, WATCHDOG from :meth:`step`), if run by systemd
        self.notifier = notifier
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
        self.proxies: dict[int, Proxy] = {}
        self.stop = threading.Event()
        self.stats = {"reconnects": 0, "malformed": 0, "send_errors": 0, "refused_moves": 0}
        #: msgpack trace of every batch, when the config asks for one (``[bus] trace``).
        self.trace: TraceWriter | None = None
        if config.bus.trace is not None:
            self.trace = TraceWriter(config.bus.trace, append=True)
        self._next_tick = 0.0
        self._next_housekeeping = 0.0
        self._overruns = 0
        self._async_seen = 0
        self._pins_stamp: tuple[int, int] | None = None
        self._pins_dirty = True
        #: learning loops by proxy name: they outlive a module reload (same binding)
        self._loops: dict[str, LearningLoop] = {}
        #: the last housekeeping's kernel dump and snapshot (None before the first)
        self.published: Published | None = None

    # -- connection ------------------------------------------------------------

    def connect(self) -> bool:
        """Open the socket, attach configured proxies; False if the module is absent."""
        try:
            ctl = self.opener(())
        except netlink.ModuleNotLoaded:
            return False
        want = self.config.bus.receive_buffer()
        try:
            conn = self.opener(("telemetry", "events"), rcvbuf=want)
        except BaseException:
            ctl.close()
            raise
        if conn.rcvbuf < want:
            log.warning("telemetry socket: receive buffer %d bytes, %d asked for [bus] rate %d "
                        "(no CAP_NET_ADMIN? raise net.core.rmem_max); expect overruns",
                        conn.rcvbuf, want, self.config.bus.rate)
        self.conn, self.ctl = conn, ctl
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
        if self.trace is not None:
            self.trace.add_schema(schema)
        try:
            self.registry.bind(schema)
        except (ModelError, ConfigError) as e:
            log.error("proxy %s: %s; it stays in emergency", schema.name, e)
        loop = self._learning_loop(schema)
        pc = self.config.proxies.get(schema.name)
        proxy = Proxy(schema, modes, ctl=self.ctl, registry=self.registry, dispatcher=self.dispatcher,
                      policy=self.policy, stats=self.stats, learning=loop, trace=self.trace,
                      clock=self.clock, reading=pc.efficiency if pc is not None else readings.DEFAULT)
        g = self.graph.guards
        explore = g.exploration_share if pc is None else pc.explore_share(g.exploration_share)
        self.ctl.attach(pid)
        self.ctl.set_params(pid, share=g.collaboration_share, explore=explore,
                            sample_period=None if pc is None else pc.sample_period)
        self.proxies[pid] = proxy
        self._pins_dirty = True
        if kmode != self.graph.initial:
            # A new bus has no evidence for the mode a previous one reached.
            proxy.move(self.policy.fault(modes, Fault.BUS_GONE, "new bus attached"))
        log.info("proxy %s (id %d): attached in %s; model %s%s", schema.name, pid, modes.mode,
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
        if pc.learner == "choice":
            learner: Learner = PlaceLearner(b)
        else:
            learner = Learner(b, model_class=pc.learner)
        loop = LearningLoop(learner, self.registry, every_s=pc.learn_every_s,
                            spread=pc.explore_spread, save_to=pc.learned_model, background=True,
                            clock=self.clock)
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

    def handle_all(self, msgs: list[codec.Message], *, answered: bool = False) -> None:
        """Route what one receive returned, coalescing batches per proxy.

        Consecutive telemetry (and feedback) batches of a proxy are joined into
        one array, so a bus that fell behind catches up with one inference and
        one ``recommend`` per proxy instead of one per kernel message.  Mode
        events keep their place: batches before an event are handled before it.

        Recommendations go out first; evidence, learning and the trace are
        updated after every send, because until the kernel has the fresh
        values its decisions run on old ones.  With *answered*, the fast lane
        has already sent the recommendations for the telemetry in *msgs*.
        """
        # (proxy id, op) -> the batches' arrays
        pending: dict[tuple[int, str], list[np.ndarray]] = {}

        def flush() -> None:
            batches = []
            for (pid, op), parts in pending.items():
                # Joining the raw bytes is several times cheaper than np.concatenate,
                # which re-derives the structured dtype for every call.
                arr = parts[0] if len(parts) == 1 else np.frombuffer(
                    b"".join(p.tobytes() for p in parts), dtype=parts[0].dtype)
                batches.append((self.proxies[pid], op, arr))
            pending.clear()
            ok = [op != "telemetry" or answered or self._guarded(p, op, p.recommend, arr)
                  for p, op, arr in batches]
            for (p, op, arr), good in zip(batches, ok):
                if good:
                    self._guarded(p, op, functools.partial(p.account, op), arr)

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
                pending.setdefault((pid, m.op), []).append(arr)
            elif m.op == "proxy-removed":
                flush()
                self._forget(pid)
            else:
                flush()
                self.proxies[pid].on_event(m)
        flush()

    def _forget(self, pid: int) -> None:
        """The kernel destroyed proxy *pid*: drop its object (machine, evidence, hold).

        Nothing more goes to that id; the kernel never hands it out again
        soon (ids are cyclic), and a subsystem that registers the name again
        gets a new id, which housekeeping adopts as a new proxy.  The learning
        loop is kept by name, as across a module reload.
        """
        p = self.proxies.pop(pid)
        self._pins_dirty = True
        log.info("proxy %s (id %d): removed by the kernel; forgotten", p.name, pid)

    def _guarded(self, p: Proxy, op: str, step: Callable[[np.ndarray], object],
                 arr: np.ndarray) -> bool:
        """Run one step on a batch; a malformed batch is counted and logged (False)."""
        try:
            step(arr)
            return True
        except (KeyError, ValueError, TypeError) as e:
            self.stats["malformed"] += 1
            log.warning("proxy %s: malformed %s batch ignored: %s", p.name, op, e)
            return False

    def receive(self, timeout: float) -> None:
        """Take what the kernel sent: the backlog in batches, else wait for the next datagram.

        A datagram that ends an idle wait goes through the fast lane first
        (:func:`kmlbus.bus.fastlane.answer`), then is decoded for its bookkeeping.
        """
        assert self.conn is not None
        msgs = self.conn.recv(timeout=0)
        if msgs:
            self.handle_all(msgs)
            return
        data = self.conn.wait_datagram(timeout)
        if data is None:
            return
        answered = False
        try:
            answered = fastlane.answer(data, self.conn.family_id, self.proxies)
        finally:  # whatever the lane raised, the datagram is still accounted
            self.handle_all(self.conn.accept(data), answered=answered)

    # -- moves -----------------------------------------------------------------

    def tick(self) -> None:
        """Follow operator pins, then let the policy judge every proxy's evidence."""
        self._follow_pins()
        for p in list(self.proxies.values()):
            p.tick()

    def housekeeping(self) -> None:
        """Check attachments, hot-swap models, follow pins, publish state."""
        assert self.conn is not None and self.ctl is not None
        self._collect_errors()
        seen = {int(a["id"]): a for a in self.ctl.proxies()}
        overruns = self.conn.stats.get("overruns", 0)
        for p in list(self.proxies.values()):
            a = seen.get(p.id)
            if a is None or a.get("name") != p.name or int(a.get("bus-portid", 0)) != self.ctl.portid:
                # Module reloaded (ids and groups may be new) or someone detached us.
                raise _Reconnect(f"proxy {p.name} is no longer attached to this bus")
            if overruns != self._overruns:
                # The socket overflowed: mode events may be lost; the kernel's word wins.
                p.modes.events_lost(codec.enum_name("mode", int(a.get("mode", 0))))
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
        snap = self.snapshot()
        self.published = Published(self.clock(), {str(a.get("name")): a for a in seen.values()}, snap)
        self.write_state(snap)

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
        stats = dict(self.stats)
        if self.conn is not None:
            # multicast lost because our receive buffer was full (ENOBUFS on the socket)
            stats["socket_overruns"] = self.conn.stats.get("overruns", 0)
            stats["socket_rcvbuf"] = self.conn.rcvbuf
        out: dict[str, Any] = {"pid": os.getpid(), "at": time.time(), "stats": stats,
                               "portid": 0 if self.ctl is None else self.ctl.portid,
                               "proxies": {}}
        for p in self.proxies.values():
            out["proxies"][p.name] = p.status()
        return out

    def write_state(self, snap: dict[str, Any] | None = None) -> None:
        """Publish *snap* (default: :meth:`snapshot`) to the state file (errors only logged)."""
        try:
            statefile.write(self.snapshot() if snap is None else snap, self.state_path)
        except OSError as e:
            log.debug("state file not written: %s", e)

    # -- loop ------------------------------------------------------------------

    def step(self, timeout: float = 0.05) -> None:
        """Receive and handle what arrived within *timeout*, then run due periodic work."""
        if self.notifier is not None:
            self.notifier.keepalive()  # from the loop itself: a hung loop stops the pings
        if self.conn is None:
            if not self.connect():
                self.idle(0.5)
                return
        assert self.conn is not None
        try:
            self.receive(timeout)
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
        for p in self.proxies.values():
            try:
                self.ctl.detach(p.id)
            except netlink.KmlbusError as e:
                log.warning("proxy %s: detach failed: %s", p.name, e)
        self.write_state()
        self.conn.close()
        self.ctl.close()
        self.conn = self.ctl = None
        if self.trace is not None:
            self.trace.close()


class _Reconnect(Exception):
    """Internal: the attachments are gone; reconnect from scratch."""


def main(config_path: str, *, duration: float | None = None, metrics: str | None = None) -> int:
    """``kmlbus run``: load the config, serve until SIGTERM/SIGINT, detach, exit 0.

    *metrics* (``HOST:PORT``) also serves Prometheus metrics (:mod:`kmlbus.bus.metrics`).
    """
    try:
        cfg = load(config_path)
    except ConfigError as e:
        print(f"kmlbus run: {e}")
        return 2
    notifier = Notifier()
    bus = Bus(cfg, notifier=notifier)
    endpoint = None
    if metrics is not None:
        from kmlbus.bus import metrics as metrics_mod

        try:
            endpoint = metrics_mod.serve(bus, metrics)
        except metrics_mod.MetricsError as e:
            print(f"kmlbus run: {e}")
            return 2

    def _stop(signum: int, _frame: object) -> None:
        log.info("signal %d: detaching and exiting", signum)
        bus.stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        serve(bus, duration)
    finally:
        if endpoint is not None:
            endpoint.close()
        notifier.close()
    return 0


def serve(bus: Bus, duration: float | None = None) -> None:
    """Attach, tell systemd we are ready, run the loop, detach (telling systemd we stop).

    Raises :class:`kmlbus.wire.netlink.ModuleNotLoaded` when the family is absent
    at start: a supervisor then sees the failure (and may restart us later).
    """
    if not bus.connect():
        raise netlink.ModuleNotLoaded()
    if bus.notifier is not None:
        names = sorted(p.name for p in bus.proxies.values())
        bus.notifier.ready(f"attached to {len(names)} proxies: {', '.join(names) or 'none yet'}")
    try:
        bus.run(duration)
    finally:
        if bus.notifier is not None:
            bus.notifier.stopping()
        bus.shutdown()
