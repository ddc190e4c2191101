"""One attached proxy as the bus sees it: its mode machine, evidence, model duty and moves.

The daemon (:mod:`kmlbus.bus.daemon`) owns the connection and the loop and keeps
one :class:`Proxy` per attached kernel proxy.  Everything that concerns a single
proxy lives here: making and sending its recommendations, accounting a batch
(trace, learning, evidence), following the kernel's mode events, the policy's
tick, the hold after a demotion, and its part of ``kmlbus status``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, MutableMapping
from typing import Any, Protocol

import numpy as np

from kmlbus.bus import readings
from kmlbus.bus.config import ProxySchema
from kmlbus.bus.dispatcher import Dispatcher, DispatchError
from kmlbus.bus.learner import LearningLoop
from kmlbus.bus.registry import ModelRegistry
from kmlbus.bus.tracefile import TraceWriter
from kmlbus.wire import codec, netlink
from modes.evidence import Evidence
from modes.machine import ModeError, ProxyModes, TransitionRecord
from modes.policy import Decision, Fault, Policy

__all__ = ["LATENCY_STRIKES", "Proxy", "Sender"]

log = logging.getLogger(__name__)

#: Consecutive batches over the latency budget that make a fault.  One slow
#: batch is noise (a page fault, a busy CPU); a run of them is a slow model.
LATENCY_STRIKES = 3


class Sender(Protocol):
    """The requests a proxy sends to the kernel (a part of the daemon's control link)."""

    def set_mode(self, proxy_id: int, mode: str, reason: str = "operator") -> None: ...
    def recommend(self, proxy_id: int, recs: Any, *, wait: bool = True) -> None: ...


class Proxy:
    """The bus's side of one kernel proxy.

    *stats* is the daemon's counter dict (``malformed``, ``send_errors``,
    ``refused_moves``), shared by every proxy.  The machine mirrors each move
    to the kernel through *ctl* before it moves (see :mod:`modes.machine`).
    *reading* is the proxy's ``efficiency`` config key: how ``status`` shows
    each arm's mean efficiency (:mod:`kmlbus.bus.readings`).
    """

    def __init__(self, schema: ProxySchema, modes: ProxyModes, *, ctl: Sender,
                 registry: ModelRegistry, dispatcher: Dispatcher, policy: Policy,
                 stats: MutableMapping[str, int], learning: LearningLoop | None = None,
                 trace: TraceWriter | None = None, clock: Callable[[], float] = time.monotonic,
                 reading: str = readings.DEFAULT) -> None:
        self.id = schema.id
        self.name = schema.name
        self.schema = schema
        self.modes = modes
        self.ctl = ctl
        self.registry = registry
        self.dispatcher = dispatcher
        self.policy = policy
        self.stats = stats
        self.learning = learning
        self.trace = trace
        self.clock = clock
        if reading not in readings.KINDS:
            raise ValueError(f"proxy {schema.name}: unknown efficiency reading {reading!r}")
        self.reading = reading
        r = schema.recommendation
        bounds = (r.min, r.max) if r.min is not None and r.max is not None else None
        self.evidence = Evidence(modes, bounds=bounds,
                                 scorer=None if learning is None else learning.score)
        #: consecutive batches over the latency budget
        self.slow_batches = 0
        #: telemetry batches answered from their bytes (:func:`kmlbus.bus.fastlane.answer`)
        self.fast_lane = 0
        #: the model that was being served when the proxy was last demoted (see :meth:`held`)
        self.demoted_model: object | None = None
        modes.subscribe(self._on_transition)

    # -- recommendations ---------------------------------------------------------

    @property
    def exploring(self) -> LearningLoop | None:
        """The proxy's learning loop while it explores (in learning), else None."""
        return self.learning if self.modes.duty.explore else None

    def recommend(self, records: np.ndarray | memoryview) -> bool:
        """Telemetry -> recommendations sent (the latency-critical part of a batch);
        False when the proxy's mode asks for none or there is nothing to make them with.

        *records* may be the packed bytes of the samples only when the proxy is
        not exploring (exploration needs the keys as an array).
        """
        exploring = self.exploring
        has_model = self.registry.has_model(self.name)
        if not self.modes.duty.recommend or not (has_model or exploring is not None):
            return False
        recs: np.ndarray | bytes | None = None  # packed rec structs from the model
        if has_model:
            recs = self._model_recs(records)
            if recs is None:
                return True
        if exploring is not None:
            assert isinstance(records, np.ndarray)
            # Learning: the kernel applies these only on its explore share; the rest are shadows.
            keys = np.unique(records["key"])
            recs = exploring.explore(keys[keys < self.schema.nkeys],
                                     None if recs is None else rec_array(recs))
        if recs is not None:
            self._send_recs(recs)
        return True

    def _model_recs(self, records: np.ndarray | memoryview) -> bytes | None:
        """The model's recommendations for a batch, packed; None after a model fault."""
        try:
            recs = self.dispatcher.handle_telemetry_packed(self.name, records)
        except DispatchError as e:
            self.move(self.policy.fault(self.modes, Fault.MODEL_ERROR, str(e), self.evidence))
            return None
        self.slow_batches = self.slow_batches + 1 if self.dispatcher.over_budget(self.name) else 0
        if self.slow_batches >= LATENCY_STRIKES:
            self.slow_batches = 0
            c = self.dispatcher.counters_of(self.name)
            self.move(self.policy.observe_latency(self.modes, c.last_batch_ns / 1e6, self.evidence))
        return recs

    def _send_recs(self, recs: np.ndarray | bytes) -> None:
        """Send recommendations unless the mode changed meanwhile; refusals come later."""
        if not len(recs) or not self.modes.duty.recommend:
            return
        try:
            # No ACK: the kernel has applied them when the send returns; a refusal
            # comes back later and is counted by the daemon's housekeeping.
            self.ctl.recommend(self.id, recs, wait=False)
        except (netlink.NetlinkError, OSError) as e:
            self.stats["send_errors"] += 1
            log.warning("proxy %s: recommendations not sent: %s", self.name, e)
        if self.trace is not None:
            self.trace.recs(self.name, rec_array(recs))

    # -- bookkeeping -------------------------------------------------------------

    def account(self, op: str, arr: np.ndarray) -> None:
        """Bookkeeping of a telemetry or feedback batch: trace, learning, evidence."""
        learn = self.learning if self.learning is not None and self.modes.duty.learn else None
        if op == "telemetry":
            if self.trace is not None:
                self.trace.telemetry(self.name, arr)
            if learn is not None:
                learn.telemetry(arr)
            self.evidence.add_samples(arr)
        else:
            if self.trace is not None:
                self.trace.feedback(self.name, arr)
            if learn is not None:
                learn.feedback(arr)
            self.evidence.add_feedback(arr)

    def on_event(self, m: codec.Message) -> None:
        """A mode event from the kernel: the machine follows it; anything odd is counted."""
        if m.op != "mode-event":
            return
        try:
            if self.trace is not None:
                self.trace.mode(self.name, int(m.attrs["mode"]), int(m.attrs.get("old-mode", 0)),
                                int(m.attrs.get("reason", 0)))
            mode = codec.enum_name("mode", int(m.attrs["mode"]))
            reason = codec.enum_name("reason", int(m.attrs.get("reason", 0)))
            old_mode = codec.enum_name("mode", int(m.attrs.get("old-mode", 0)))
            self.modes.sync_kernel(mode, reason, old_mode)
        except (KeyError, ValueError, TypeError, ModeError) as e:
            self.stats["malformed"] += 1
            log.warning("proxy %s: malformed %s message ignored: %s", self.name, m.op, e)

    # -- moves -------------------------------------------------------------------

    def _on_transition(self, rec: TransitionRecord) -> None:
        log.info("proxy %s: %s -> %s [%s, %s] %s", self.name, rec.source, rec.dest,
                 rec.trigger or "resync", rec.reason, rec.detail)
        if rec.reason == "demotion":
            # measured worse than the default: not promoted again until it is replaced
            self.demoted_model = self.registry.model(self.name)

    def move(self, d: Decision | None) -> None:
        """Mirror a decided move to the kernel, then record it in the machine."""
        if d is None:
            return
        try:
            self.modes.apply(d)  # mirrors to the kernel first
        except netlink.NetlinkError as e:
            self.stats["refused_moves"] += 1
            log.warning("proxy %s: kernel refused %s -> %s: %s", self.name, d.source, d.target, e)

    def tick(self) -> None:
        """Refit when due, then let the policy judge the evidence (and respect a hold)."""
        self._learn()
        healthy = self.registry.has_model(self.name) or (
            self.learning is not None and self.registry.error(self.name) is None)
        d = self.policy.evaluate(self.modes, self.evidence, healthy=healthy)
        if d is not None and d.reason == "promotion" and self.held():
            d = None
        self.move(d)

    def held(self) -> bool:
        """Whether the proxy's model was demoted and has not been replaced since.

        Shadow maturity says nothing about efficiency, so without this a model
        measured worse than the default would mature again at once and cycle
        learning -> collaboration -> (by chance) recommendation.  A new model
        file or a learned fit ends the hold.
        """
        if self.demoted_model is None:
            return False
        if self.registry.model(self.name) is self.demoted_model:
            return True
        self.demoted_model = None
        return False

    def _learn(self) -> None:
        """Refit the learned model when due (only in modes whose duty is to learn)."""
        if self.learning is None or not self.modes.duty.learn:
            return
        try:
            fit = self.learning.tick(self.clock())
        except Exception as e:  # noqa: BLE001 - any failure of learning is a model fault, never fatal
            log.error("proxy %s: learning failed: %s: %s", self.name, type(e).__name__, e)
            self.move(self.policy.fault(self.modes, Fault.MODEL_ERROR,
                                        f"learning failed: {e}", self.evidence))
            return
        if fit is not None:
            log.info("proxy %s: learned model installed (fit %d: %d samples, estimated %.3f, "
                     "observed %.3f)", self.name, self.learning.fits, fit.n_samples,
                     fit.estimated.efficiency, fit.observed)

    # -- status ------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """This proxy's part of ``kmlbus status``: mode, reason, evidence vs thresholds."""
        st = self.modes.status()
        rep = self.policy.report(self.modes, self.evidence)
        arms = rep.get("arms", {})
        last = self.modes.last
        err = self.registry.error(self.name)
        lm = self.registry.model(self.name)
        return {
            "mode": st["mode"], "in_mode_s": st["in_mode_s"], "pinned": st["pinned"],
            "last": None if last is None else {
                "from": last.source, "to": last.dest, "trigger": last.trigger,
                "reason": f"{last.reason}: {last.detail}"},
            "evidence": {
                "default_mean": arms.get("default", {}).get("mean"),
                "model_mean": arms.get("model", {}).get("mean"),
                "maturity": rep.get("maturity", {}).get("quality"),
                "per_arm": readings.per_arm(self.reading, self.schema, arms),
                "detail": rep,
            },
            "model": None if lm is None else str(lm.source),
            "model_error": None if err is None else str(err),
            "dispatch": self.dispatcher.counters_of(self.name).as_dict(),
            "fast_lane": self.fast_lane,
            "learning": None if self.learning is None else _learning_status(self.learning),
            "held": ("model demoted; waiting for a new model before collaboration"
                     if self.held() else None),
        }


def rec_array(recs: np.ndarray | bytes) -> np.ndarray:
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
            **last.describe(), "samples": last.n_samples,
            "estimated": last.estimated.efficiency, "coverage": last.estimated.coverage,
            "observed": last.observed},
    }
