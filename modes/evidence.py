"""Per-proxy evidence for mode moves, from the kernel's feedback and telemetry.

Inputs are the batches the daemon receives, as numpy structured arrays of the
dtypes of the spec's structs (``codec.struct_dtype("feedback")`` and ``"sample"``).
Everything is vectorised: a batch costs a few numpy calls, never a Python loop
per record.

Per arm (``arm`` enum of the spec: default, model)
    A sliding window of the last ``guards.window`` efficiencies reported in
    ``feedback`` records, their count and mean, and the total seen in this
    mode.  Efficiency is kept in the proxy's raw fixed point: the policy only
    compares the arms with each other, so the scale cancels out.

Shadow maturity (learning; samples of other modes only move the seq window)
    In learning the kernel applies the default and reports the fresh
    recommendation it did *not* apply as the sample's ``shadow`` (flag
    ``has-shadow``).  The kernel never measures a shadow's efficiency, so the
    honest, computable definition is about the bus's predictions reaching
    the decisions in time and being sane:

    * a decision's shadow is **valid** when the sample has ``has-shadow``
      (a fresh recommendation existed: the model produced it without error,
      fast enough for its ttl) and, when the recommendation field's bounds are
      known, the shadow lies within them (an out-of-range prediction is a sign
      of an immature model even though the kernel would clamp it);
    * **quality** = valid shadows / decisions, over the last ``guards.window``
      decisions made in this mode;
    * the proxy is **mature** when quality >= ``guards.maturity`` and at least
      ``guards.min_decisions`` valid shadows are in the window (the policy
      checks this; see :mod:`modes.policy`);
    * optionally, when the proxy provides an efficiency model (a
      :data:`ShadowScorer` mapping samples to the efficiency the model's
      decision would have had, e.g. the sample workload's known formula, or
      the learner's estimate from explored decisions), the mean estimated
      efficiency over the window is kept as well and the policy also asks it
      not to be worse than the default arm by the demotion margin, so a
      mature model would not be demoted at once.  A scorer may answer NaN
      for a sample it has no estimate for; the share of samples it could
      score is the **coverage**, and the policy asks it to reach the
      graph's ``coverage`` guard too.  Scoring runs only in learning, the one mode
      whose exit it decides.

Windows reset on every mode change
    Evidence gathered under one mode says nothing about the next (the arms
    run with different shares, the model may have been swapped), so the
    windows follow :attr:`modes.machine.ProxyModes.epoch` and start empty after
    each transition.  One thing survives: when the proxy moves from
    collaboration to recommendation the default arm's mean from collaboration
    is kept as :attr:`Evidence.reference_default`, because in recommendation
    the default decides only on stale fallbacks, too few and too biased to
    compare against.  Records of decisions made before the change are dropped
    (``discarded``): samples carry their mode, and feedback whose ``seq`` is
    not above the last decision seen in another mode is dropped with them.
    Feedback of an old-mode decision that arrives before any sample of it
    cannot be told apart; batches are at most 32 records or 20 ms, which
    against a 400-decision window is noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import numpy.typing as npt

from kmlbus.contract import spec as kspec

if TYPE_CHECKING:
    from modes.machine import ProxyModes

__all__ = ["ArmStats", "Evidence", "Maturity", "Ring", "ShadowScorer"]

#: Maps valid shadowed sample records to the efficiency (feedback scale) each
#: shadow value would have had.  Must return one float per record.
#: NaN where it has no estimate.
ShadowScorer = Callable[[np.ndarray], npt.NDArray[np.float64]]


class Ring:
    """Fixed-size ring buffer of float64 that keeps the latest ``size`` values."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"window size must be >= 1, got {size}")
        self._buf = np.zeros(size, dtype=np.float64)
        self._pos = 0
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def extend(self, values: npt.ArrayLike) -> None:
        """Append *values* (oldest first), overwriting the oldest kept ones."""
        v = np.asarray(values, dtype=np.float64).ravel()
        size = self._buf.size
        if v.size >= size:
            self._buf[:] = v[-size:]
            self._pos, self._n = 0, size
            return
        idx = (self._pos + np.arange(v.size)) % size
        self._buf[idx] = v
        self._pos = int((self._pos + v.size) % size)
        self._n = min(self._n + v.size, size)

    def values(self) -> npt.NDArray[np.float64]:
        """The kept values (order not guaranteed once the ring has wrapped)."""
        return self._buf if self._n == self._buf.size else self._buf[: self._n]

    def mean(self) -> float | None:
        """Mean of the kept values, None when empty."""
        return float(self.values().mean()) if self._n else None

    def sum(self) -> float:
        """Sum of the kept values."""
        return float(self.values().sum())

    def clear(self) -> None:
        """Forget everything."""
        self._pos = self._n = 0


@dataclass(frozen=True)
class ArmStats:
    """One arm's efficiency evidence in the current mode."""

    count: int  # decisions in the window
    mean: float | None  # mean efficiency over the window (raw fixed point)
    total: int  # feedback records of this arm since the mode was entered

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"count": self.count, "mean": self.mean, "total": self.total}


@dataclass(frozen=True)
class Maturity:
    """Shadow quality over the window of decisions in the current mode."""

    decisions: int  # decisions in the window
    valid: int  # of which had a valid shadow
    quality: float  # valid / decisions (0 when empty)
    estimated: float | None  # mean estimated efficiency, if a scorer is set and scored any
    coverage: float | None = None  # share of scored samples with an estimate (scorer set)
    scored: int = 0  # estimates in the window

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"decisions": self.decisions, "valid": self.valid,
                "quality": self.quality, "estimated": self.estimated,
                "coverage": self.coverage, "scored": self.scored}


class Evidence:
    """Evidence windows of one proxy, following its :class:`ProxyModes`.

    *bounds* is the recommendation field's ``(min, max)`` from the proxy's
    schema, if known; *scorer* an optional :data:`ShadowScorer`.
    """

    def __init__(self, modes: ProxyModes, *, bounds: tuple[int, int] | None = None,
                 scorer: ShadowScorer | None = None) -> None:
        sp = kspec.load()
        self.modes = modes
        self.window = modes.graph.guards.window
        self.bounds = bounds
        self.scorer = scorer
        self._arm_default = sp.enums["arm"].value("default")
        self._arm_model = sp.enums["arm"].value("model")
        self._has_shadow = sp.enums["sample-flags"].value("has-shadow")
        self._arms = {"default": Ring(self.window), "model": Ring(self.window)}
        self._totals = {"default": 0, "model": 0}
        self._valid = Ring(self.window)
        self._estimated = Ring(self.window)
        self._covered = Ring(self.window)
        self._reference: float | None = None
        #: Records dropped because they belong to a previous mode.
        self.discarded = 0
        self._epoch = modes.epoch
        self._mode = modes.mode
        self._min_seq = 0  # records with a lower seq predate the current mode
        self._max_seq = -1  # highest seq seen in any record

    # -- input ----------------------------------------------------------------

    def add_feedback(self, records: np.ndarray) -> int:
        """Take a batch of ``feedback`` records; return how many were used."""
        self._follow()
        if records.size == 0:
            return 0
        seq = records["seq"].astype(np.int64)
        self._max_seq = max(self._max_seq, int(seq.max()))
        keep = seq >= self._min_seq
        self.discarded += int(records.size - np.count_nonzero(keep))
        arm = records["arm"][keep]
        eff = records["efficiency"][keep]
        for name, value in (("default", self._arm_default), ("model", self._arm_model)):
            sel = eff[arm == value]
            if sel.size:
                self._arms[name].extend(sel)
                self._totals[name] += int(sel.size)
        return int(np.count_nonzero(keep))

    def add_samples(self, records: np.ndarray) -> int:
        """Take a batch of telemetry ``sample`` records; return how many were used."""
        self._follow()
        if records.size == 0:
            return 0
        seq = records["seq"].astype(np.int64)
        self._max_seq = max(self._max_seq, int(seq.max()))
        here = records["mode"] == self.modes.graph.states.index(self._mode)
        if not here.all():
            # Decisions of another mode: everything up to the last of them predates us.
            self._min_seq = max(self._min_seq, int(seq[~here].max()) + 1)
        keep = here & (seq >= self._min_seq)
        self.discarded += int(records.size - np.count_nonzero(keep))
        cur = records[keep]
        if cur.size == 0 or self._mode != "learning":
            # Shadows are only judged in learning, the one mode whose exit needs them.
            return int(cur.size)
        valid = (cur["flags"] & self._has_shadow) != 0
        if self.bounds is not None:
            lo, hi = self.bounds
            valid &= (cur["shadow"] >= lo) & (cur["shadow"] <= hi)
        self._valid.extend(valid)
        if self.scorer is not None and valid.any():  # (in learning: see the return above)
            est = np.asarray(self.scorer(cur[valid]), dtype=np.float64)
            if est.shape != (int(np.count_nonzero(valid)),):
                raise ValueError(f"shadow scorer returned shape {est.shape}, "
                                 f"expected ({int(np.count_nonzero(valid))},)")
            known = ~np.isnan(est)
            self._covered.extend(known)
            self._estimated.extend(est[known])
        return int(cur.size)

    # -- reading ----------------------------------------------------------------

    def arm(self, name: str) -> ArmStats:
        """Evidence of arm *name* (``default`` or ``model``) in the current mode."""
        self._follow()
        ring = self._arms[name]
        return ArmStats(len(ring), ring.mean(), self._totals[name])

    def maturity(self) -> Maturity:
        """Shadow quality over the current window."""
        self._follow()
        n = len(self._valid)
        valid = int(round(self._valid.sum()))
        if self.scorer is None:
            return Maturity(n, valid, valid / n if n else 0.0, None)
        scored = len(self._covered)
        return Maturity(n, valid, valid / n if n else 0.0, self._estimated.mean(),
                        self._covered.sum() / scored if scored else 0.0, len(self._estimated))

    def summary(self) -> dict[str, Any]:
        """JSON-ready evidence (``kmlbus status``); thresholds are added by the policy."""
        return {
            "mode": self.mode,
            "window": self.window,
            "arms": {name: self.arm(name).as_dict() for name in self._arms},
            "reference_default": self.reference_default,
            "maturity": self.maturity().as_dict(),
            "discarded": self.discarded,
        }

    @property
    def reference_default(self) -> float | None:
        """Default arm's collaboration mean, kept in recommendation (see module doc)."""
        self._follow()
        return self._reference

    @property
    def mode(self) -> str:
        """The mode these windows describe."""
        self._follow()
        return self._mode

    # -- mode following -----------------------------------------------------------

    def _follow(self) -> None:
        """Reset the windows if the proxy changed mode since we last looked."""
        if self.modes.epoch == self._epoch:
            return
        old, new = self._mode, self.modes.mode
        if new == "recommendation":
            dflt = self._arms["default"]
            if old == "collaboration" and len(dflt) >= self.modes.graph.guards.min_decisions:
                self._reference = dflt.mean()
            elif old != "recommendation":
                self._reference = None
        else:
            self._reference = None
        for ring in (*self._arms.values(), self._valid, self._estimated, self._covered):
            ring.clear()
        self._totals = {"default": 0, "model": 0}
        self._min_seq = self._max_seq + 1
        self._epoch, self._mode = self.modes.epoch, new
