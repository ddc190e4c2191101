"""One proxy's interaction mode: a ``transitions`` machine built from the graph.

:class:`ProxyModes` is the model object of a per-proxy
``transitions.Machine`` whose states and triggers come from
:func:`kmlbus.contract.graph.load` and nothing else, so a move the graph does not allow
cannot happen here either (the kernel rejects the same moves with -EINVAL).

It holds what ``kmlbus status`` shows for a proxy: the current mode, when it
was entered (injectable clock), the last transition's reason and evidence
snapshot, the operator pin, and a bounded history of transitions.

Who moves a proxy, and how each move is recorded (:attr:`TransitionRecord.origin`):

``policy``
    An automatic move proposed by :class:`modes.policy.Policy` and applied
    with :meth:`ProxyModes.apply`.  Suspended while the proxy is pinned.
``fault``
    A move to emergency proposed by ``Policy.fault``.  Safety first: a fault
    reaches emergency even through a pin.  The pin is *kept*: the operator
    took charge of the proxy, so after the fault it stays in emergency
    (automatic recovery is suspended like every automatic move) until the
    operator pins again (which walks back to the pinned mode) or unpins
    (which hands the proxy back to the policy, starting with the cool-down).
    Re-entering the pinned mode by itself would undo the fault; forgetting
    the pin would let the policy take over a proxy the operator holds.  The
    event is logged at WARNING and :attr:`ProxyModes.pin_broken` says so.
``operator``
    :meth:`ProxyModes.pin` / :meth:`ProxyModes.set_mode` (``kmlbus mode``).
    A target more than one edge away is reached along the shortest path of
    allowed edges, one recorded transition per edge, so each step is one the
    kernel accepts.
``kernel``
    :meth:`ProxyModes.sync_kernel`, for a ``mode-event`` the kernel sent
    (bus gone, stale recommendations, another process's set-mode).  The
    kernel is the authority on the mode actually applied, so a change is
    followed through the graph's edge when there is one, otherwise (events
    lost to a socket overrun) by resynchronising the machine's state with a
    WARNING.  A kernel fall to emergency is a fault (the pin is kept, as
    above); a kernel move to any other mode than the pinned one means someone
    else set the mode, and clears the pin.  These records have ``mirror``
    False: they are never sent back.

Mirroring and echoes.  Every other move must reach the kernel (``set-mode``).
Pass ``mirror=`` (called as ``mirror(source, dest, reason)`` *before* each
move; if it raises, e.g. the kernel refused, the move does not happen and the
exception propagates) and the machine does it itself, for policy, fault and
operator moves alike.  The kernel announces every change in a ``mode-event``,
ours included, and the events arrive later, in the kernel's order.  The
machine therefore keeps its mirrored moves until their echo arrives: an
event whose mode is the oldest unacknowledged move's destination is that
echo (or, when the kernel already was there and sent none, the event that
took it there); any other event arriving while moves are unacknowledged
happened before them (set-mode is synchronous) and is superseded by them.
When the daemon's socket overran (events lost), it must call
:meth:`ProxyModes.events_lost` with the kernel's mode from a ``get``; as a
safety net, unacknowledged moves are also forgotten after ``ECHO_TIMEOUT_S``
so that a move whose echo was lost cannot mask later events for long.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal, Protocol

from transitions import EventData, Machine

from kmlbus.contract import graph as mgraph

__all__ = [
    "ModeError",
    "Origin",
    "ProxyModes",
    "TransitionRecord",
    "TransitionRequest",
    "shortest_path",
]

log = logging.getLogger(__name__)

Origin = Literal["policy", "fault", "operator", "kernel"]

#: Transitions kept per proxy (enough for ``status``; the log has them all).
HISTORY_LEN = 256
#: Mirrored moves remembered until the kernel echoes them.
UNACKED_LEN = 64
#: Seconds after which an unacknowledged move's echo is presumed lost
#: (echoes take milliseconds; this only bounds the harm of a lost one).
ECHO_TIMEOUT_S = 10.0


class ModeError(ValueError):
    """A mode request that the graph or the pin does not allow."""


class TransitionRequest(Protocol):
    """What :meth:`ProxyModes.apply` needs from a decision (``modes.policy.Decision``)."""

    @property
    def source(self) -> str: ...
    @property
    def target(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def detail(self) -> str: ...
    @property
    def is_fault(self) -> bool: ...
    @property
    def evidence(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class TransitionRecord:
    """One mode change as it happened.

    ``trigger`` is the graph's trigger name, or None when the machine was
    resynchronised to a kernel mode that no single edge reaches.  ``reason``
    is an entry of the spec's ``reason`` enum (what goes on the wire);
    ``detail`` is the human explanation.
    """

    at: float
    source: str
    dest: str
    trigger: str | None
    reason: str
    detail: str
    origin: Origin
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def mirror(self) -> bool:
        """True if the daemon must send this change to the kernel."""
        return self.origin != "kernel"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (``kmlbus status --json``)."""
        d = asdict(self)
        d["mirror"] = self.mirror
        return d


def shortest_path(graph: mgraph.Graph, source: str, dest: str) -> list[str]:
    """Modes visited from *source* to *dest* along allowed edges (excluding *source*).

    Empty when source == dest.  Raises :class:`ModeError` if *dest* is unreachable.
    """
    if source == dest:
        return []
    prev: dict[str, str] = {source: source}
    queue = collections.deque([source])
    while queue:
        cur = queue.popleft()
        for s, d in sorted(graph.allowed):
            if s == cur and d not in prev:
                prev[d] = cur
                if d == dest:
                    path = [d]
                    while prev[path[-1]] != source:
                        path.append(prev[path[-1]])
                    return path[::-1]
                queue.append(d)
    raise ModeError(f"mode {dest!r} cannot be reached from {source!r} in the mode graph")


class ProxyModes:
    """The interaction mode of one proxy, driven by a graph-built ``transitions`` machine.

    ``mode`` is maintained by the machine (its ``model_attribute``).  The
    machine also binds the graph's triggers and ``is_<mode>()`` helpers onto
    this object; they are not part of the public API (use :meth:`apply`,
    :meth:`pin`, :meth:`set_mode`, :meth:`sync_kernel`).
    """

    mode: str  # set by transitions.Machine

    def __init__(
        self,
        proxy: str,
        graph: mgraph.Graph | None = None,
        *,
        initial: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        mirror: Callable[[str, str, str], None] | None = None,
        history_len: int = HISTORY_LEN,
    ) -> None:
        """Start *proxy* in *initial* (default: the graph's initial mode).

        Pass the kernel's current mode as *initial* when attaching to a proxy
        that already runs, and *mirror* to have every non-kernel move sent to
        the kernel before it is made (see module doc).
        """
        self.proxy = proxy
        self.graph = graph if graph is not None else mgraph.load()
        self.clock = clock
        start = initial if initial is not None else self.graph.initial
        if start not in self.graph.states:
            raise ModeError(f"proxy {proxy}: unknown mode {start!r}; expected one of {list(self.graph.states)}")
        self.entered_at: float = clock()
        #: Entry of the spec's ``reason`` enum for the last change ("none" at start).
        self.reason = "none"
        self.detail = "initial mode"
        self.evidence: dict[str, Any] = {}
        #: The mode the operator pinned, or None.
        self.pinned: str | None = None
        #: Incremented on every transition; evidence windows follow it.
        self.epoch = 0
        #: Clock time of the last fault seen (cool-down runs from here), or None.
        self.last_fault_at: float | None = None
        self.last_fault = ""
        self._history: collections.deque[TransitionRecord] = collections.deque(maxlen=history_len)
        self._listeners: list[Callable[[TransitionRecord], None]] = []
        # Mirrored moves whose kernel echo (mode-event) has not arrived yet.
        self._unacked: collections.deque[tuple[str, str, float]] = collections.deque(maxlen=UNACKED_LEN)
        self._mirror = mirror
        self._pending: dict[str, Any] = {}
        self._machine = Machine(
            model=self,
            states=list(self.graph.states),
            initial=start,
            transitions=[
                {"trigger": t.trigger, "source": list(t.sources), "dest": t.dest}
                for t in self.graph.transitions
            ],
            auto_transitions=False,
            send_event=True,
            model_attribute="mode",
            after_state_change=self._on_transition,
            name=proxy,
        )

    # -- reading ----------------------------------------------------------

    @property
    def history(self) -> list[TransitionRecord]:
        """Recent transitions, oldest first."""
        return list(self._history)

    @property
    def last(self) -> TransitionRecord | None:
        """The most recent transition, or None."""
        return self._history[-1] if self._history else None

    @property
    def pin_broken(self) -> bool:
        """True when a fault took the pinned proxy to emergency (it waits for the operator)."""
        return self.pinned is not None and self.mode != self.pinned

    def time_in_mode(self) -> float:
        """Seconds (clock units) since the current mode was entered."""
        return self.clock() - self.entered_at

    @property
    def duty(self) -> mgraph.Duty:
        """What the bus does for this proxy in its current mode (the graph's duty)."""
        return self.graph.duty(self.mode)

    def status(self) -> dict[str, Any]:
        """What ``kmlbus status`` shows for the mode (evidence comes from the policy)."""
        return {
            "proxy": self.proxy,
            "mode": self.mode,
            "in_mode_s": round(self.time_in_mode(), 3),
            "pinned": self.pinned,
            "pin_broken": self.pin_broken,
            "reason": self.reason,
            "detail": self.detail,
            "evidence": self.evidence,
            "last_fault": self.last_fault or None,
            "transitions": len(self._history),
        }

    def subscribe(self, listener: Callable[[TransitionRecord], None]) -> None:
        """Call *listener* with every future :class:`TransitionRecord` (e.g. to mirror it)."""
        self._listeners.append(listener)

    # -- moving -------------------------------------------------------------

    def apply(self, decision: TransitionRequest) -> TransitionRecord | None:
        """Carry out a policy decision; return the record, or None if it no longer applies.

        Ignored (None) when the proxy has left ``decision.source`` meanwhile,
        when the target is the current mode, or when the decision is automatic
        and the proxy is pinned.  A fault goes through a pin (see module doc).
        """
        if decision.source != self.mode or decision.target == self.mode:
            log.debug("proxy %s: decision %s -> %s ignored: proxy is in %s",
                      self.proxy, decision.source, decision.target, self.mode)
            return None
        if self.pinned is not None:
            if not decision.is_fault:
                log.debug("proxy %s: pinned to %s, automatic %s -> %s suspended",
                          self.proxy, self.pinned, decision.source, decision.target)
                return None
            if self.pinned != decision.target:
                log.warning("proxy %s: fault overrides the pin to %s: %s; held in %s until "
                            "re-pinned or unpinned", self.proxy, self.pinned, decision.detail,
                            decision.target)
        origin: Origin = "fault" if decision.is_fault else "policy"
        return self._step(decision.target, decision.reason, decision.detail, origin, decision.evidence)

    def pin(self, mode: str, detail: str = "operator pin") -> list[TransitionRecord]:
        """Move to *mode* (edge by edge) and hold it against automatic moves until :meth:`unpin`.

        Pinning the mode already pinned walks back to it after a fault.
        """
        records = self._walk(mode, detail, ignore_pin=True)
        self.pinned = mode
        log.info("proxy %s: pinned to %s", self.proxy, mode)
        return records

    def unpin(self) -> str | None:
        """Release the pin; return the mode that was pinned (None if none was)."""
        was, self.pinned = self.pinned, None
        if was is not None:
            log.info("proxy %s: unpinned from %s", self.proxy, was)
        return was

    def set_mode(self, mode: str, detail: str = "operator") -> list[TransitionRecord]:
        """Operator move to *mode* without pinning (edge by edge); refused while pinned elsewhere."""
        return self._walk(mode, detail, ignore_pin=False)

    def sync_kernel(self, mode: str, reason: str, old_mode: str | None = None,
                    detail: str = "") -> TransitionRecord | None:
        """Follow a kernel ``mode-event`` (*mode*, *reason*, *old_mode* as the event says).

        Echoes of this machine's own mirrored moves, and events they
        supersede, are recognised and skipped (module doc).  Returns the
        record of the change followed, or None when there was none to follow.
        """
        if mode not in self.graph.states:
            raise ModeError(f"proxy {self.proxy}: kernel reported unknown mode {mode!r}")
        if mode == "emergency":  # also when already there: the cool-down restarts
            self.note_fault(f"kernel: {reason}")
        now = self.clock()
        while self._unacked and now - self._unacked[0][2] > ECHO_TIMEOUT_S:
            src, dst, _ = self._unacked.popleft()
            log.warning("proxy %s: no kernel echo for %s -> %s; presumed lost", self.proxy, src, dst)
        if self._unacked:
            src, dst, _ = self._unacked[0]
            if mode == dst:
                self._unacked.popleft()
                log.debug("proxy %s: kernel echo %s -> %s of our %s -> %s",
                          self.proxy, old_mode, mode, src, dst)
            else:
                log.debug("proxy %s: kernel event %s -> %s (%s) superseded by our %s -> %s",
                          self.proxy, old_mode, mode, reason, src, dst)
            return None
        if mode == self.mode:
            return None
        if self.pinned is not None and self.pinned != mode:
            if mode == "emergency":
                log.warning("proxy %s: kernel fallback (%s) overrides the pin to %s; held in "
                            "emergency until re-pinned or unpinned", self.proxy, reason, self.pinned)
            else:
                log.warning("proxy %s: pin to %s cleared: kernel moved the proxy to %s (%s)",
                            self.proxy, self.pinned, mode, reason)
                self.pinned = None
        detail = detail or f"kernel: {reason}"
        if self.graph.is_allowed(self.mode, mode):
            return self._step(mode, reason, detail, "kernel", {})
        # Events were lost (the kernel only makes allowed moves): take its word.
        log.warning("proxy %s: resynchronising %s -> %s (kernel says it came from %s; events lost?)",
                    self.proxy, self.mode, mode, old_mode)
        source = self.mode
        self._machine.set_state(mode, model=self)
        rec = TransitionRecord(self.clock(), source, mode, None, reason, detail + " (resync)", "kernel", {})
        self._record(rec)
        return rec

    def events_lost(self, kernel_mode: str | None = None) -> TransitionRecord | None:
        """Mode events may have been lost (socket overrun): stop waiting for echoes
        and, given the kernel's current *kernel_mode* (from ``get``), follow it."""
        self._unacked.clear()
        if kernel_mode is None:
            return None
        return self.sync_kernel(kernel_mode, "none", detail="kernel mode after lost events")

    @property
    def unacknowledged(self) -> int:
        """Mirrored moves whose kernel echo has not arrived yet."""
        return len(self._unacked)

    def note_fault(self, what: str) -> None:
        """Remember a fault (the emergency cool-down restarts from now)."""
        self.last_fault_at = self.clock()
        self.last_fault = what

    # -- internals ------------------------------------------------------------

    def _walk(self, mode: str, detail: str, *, ignore_pin: bool) -> list[TransitionRecord]:
        if mode not in self.graph.states:
            raise ModeError(f"unknown mode {mode!r}; expected one of {list(self.graph.states)}")
        if not ignore_pin and self.pinned is not None and self.pinned != mode:
            raise ModeError(f"proxy {self.proxy} is pinned to {self.pinned}: "
                            f"unpin it first (kmlbus mode {self.proxy} --unpin) or pin {mode}")
        records = []
        for step in shortest_path(self.graph, self.mode, mode):
            records.append(self._step(step, "operator", detail, "operator", {}))
        return records

    def _step(self, dest: str, reason: str, detail: str, origin: Origin,
              evidence: dict[str, Any]) -> TransitionRecord:
        trigger = self.graph.trigger_for(self.mode, dest)
        if trigger is None:
            raise ModeError(f"proxy {self.proxy}: the mode graph has no move {self.mode} -> {dest}")
        if origin != "kernel" and self._mirror is not None:
            self._mirror(self.mode, dest, reason)  # raises if the kernel refuses: no move
        self._pending = {"reason": reason, "detail": detail, "origin": origin, "evidence": evidence}
        try:
            self._machine.events[trigger].trigger(self)
        finally:
            self._pending = {}
        rec = self._history[-1]
        assert rec.dest == dest, (rec, dest)
        return rec

    def _on_transition(self, event: EventData) -> None:
        """``after_state_change`` callback of the machine: record and log."""
        t = event.transition
        assert t is not None
        p = self._pending
        rec = TransitionRecord(
            self.clock(), t.source, self.mode, event.event.name if event.event else None,
            p.get("reason", "none"), p.get("detail", ""), p.get("origin", "policy"),
            dict(p.get("evidence", {})),
        )
        self._record(rec)

    def _record(self, rec: TransitionRecord) -> None:
        self.entered_at = rec.at
        self.reason = rec.reason
        self.detail = rec.detail
        self.evidence = rec.evidence
        self.epoch += 1
        self._history.append(rec)
        if rec.mirror:
            self._unacked.append((rec.source, rec.dest, rec.at))
        # The daemon logs each move in one line at INFO; this one carries the evidence.
        log.debug("proxy %s: %s -> %s by %s (%s, %s: %s) evidence=%s",
                 self.proxy, rec.source, rec.dest, rec.trigger, rec.origin, rec.reason,
                 rec.detail, rec.evidence)
        for listener in self._listeners:
            listener(rec)
