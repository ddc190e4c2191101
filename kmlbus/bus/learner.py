"""Learning from feedback: fit a linear model from (features, decision, efficiency).

This is kmlbus's version of the paper's "error back-propagation": the kernel
reports, for each decision, the efficiency it measured; the bus joins that
feedback to the decision's telemetry sample (by ``seq``), fits a better model
and hot-swaps it through the registry.

The method is deliberately simple and honest about what it needs:

1. **Cells.** Feature space is cut into buckets (per-feature quantile bins,
   fewer bins when data is scarce) and the recommendation's range into
   equal-width decision bins.  Each (bucket, decision bin) cell keeps the
   count and mean efficiency of the decisions that fell into it: the
   :class:`EfficiencyTable`.
2. **Best decision per bucket.** In each bucket the decision bin with the
   highest mean efficiency wins (means shrunk toward the bucket's mean by
   ``prior`` pseudo-samples, so one lucky sample does not beat a measured
   cell); its mean decision is the bucket's target.
3. **Regression.** Targets are regressed on the buckets' mean features by
   least squares weighted by bucket size; the line is exported as an ONNX
   ``MatMul + Add`` model (:func:`kmlbus.bus.models.linear_model`).

It can only learn what the data shows: if every decision was the default's,
every bucket's best decision is the default and the fitted model reproduces
it.  Exploration (the kernel's ``explore`` share in learning mode, fed with
perturbed recommendations from :func:`perturb`) is what gives it decisions
to compare.  The same table is the offline estimator used by
:func:`kmlbus.tools.offline.evaluate`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from kmlbus.contract import spec as _spec
from kmlbus.wire import codec

from . import atomic, models
from .config import Binding
from .fixedpoint import features_to_float, to_fixed
from .registry import LoadedModel, ModelRegistry, ModelRuntimeError, NoModelError

__all__ = [
    "EfficiencyTable",
    "Estimate",
    "Fit",
    "Learner",
    "LearningLoop",
    "LinearFit",
    "TreeFit",
    "perturb",
]

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Estimate:
    """Estimated mean efficiency of a policy, in real units (efficiency / scale)."""

    efficiency: float
    #: fraction of the evaluated samples whose cell had data (the rest are excluded)
    coverage: float
    n: int


class EfficiencyTable:
    """Mean efficiency per (feature bucket, decision bin) cell.

    Built from observed ``(x, d, e)``: features in model units, decisions and
    efficiencies in real units.  :meth:`estimate` is a *direct-method*
    counterfactual estimator: the efficiency of deciding ``d'`` at ``x`` is
    taken to be the mean observed efficiency of the cell ``(bucket(x),
    bin(d'))``.  It is unbiased when efficiency varies little inside a cell,
    and it cannot say anything about cells nobody explored (reported as
    coverage < 1).
    """

    def __init__(self, x: F32, d: F64, e: F64, *, d_lo: float, d_hi: float,
                 bins: int = 6, decision_bins: int = 16, target_per_bucket: int = 64,
                 min_cell: int = 1, prior: float = 1.0, log_decisions: bool = False) -> None:
        n, k = x.shape
        if n == 0:
            raise ValueError("EfficiencyTable: no samples")
        # fewer feature bins when data is scarce, so buckets keep ~target samples
        per = int(max(1, min(bins, np.floor((n / target_per_bucket) ** (1.0 / max(k, 1))))))
        self.edges: list[F64] = []
        for j in range(k):
            col = x[:, j].astype(np.float64)
            qs = np.unique(np.quantile(col, np.linspace(0, 1, per + 1)[1:-1])) if per > 1 else \
                np.zeros(0)
            self.edges.append(np.asarray(qs, dtype=np.float64))
        self.dims = tuple(len(ed) + 1 for ed in self.edges)
        self.n_buckets = int(np.prod(self.dims))
        self.d_lo, self.d_hi = float(d_lo), float(d_hi)
        if not self.d_hi > self.d_lo:
            self.d_hi = self.d_lo + 1.0
        self.decision_bins = decision_bins
        self.min_cell = min_cell
        self.prior = prior
        #: decision bins equal in log2(1 + d - d_lo) rather than in d
        self.log_decisions = log_decisions

        self._means: F64 | None = None
        cell = self.bucket(x) * decision_bins + self.dbin(d)
        size = self.n_buckets * decision_bins
        self.count = np.bincount(cell, minlength=size).astype(np.float64)
        self.sum_e = np.bincount(cell, weights=e, minlength=size)
        self.sum_d = np.bincount(cell, weights=d, minlength=size)
        b = self.bucket(x)
        self.bucket_count = np.bincount(b, minlength=self.n_buckets).astype(np.float64)
        self.bucket_x = np.stack(
            [np.bincount(b, weights=x[:, j].astype(np.float64), minlength=self.n_buckets)
             for j in range(k)], axis=1) / np.maximum(self.bucket_count, 1)[:, None]

    def bucket(self, x: F32) -> I64:
        """Bucket index of each row of *x*."""
        idx = [np.searchsorted(ed, x[:, j].astype(np.float64), side="right")
               for j, ed in enumerate(self.edges)]
        return np.asarray(np.ravel_multi_index(idx, self.dims), dtype=np.int64)

    def dbin(self, d: F64) -> I64:
        """Decision bin of each decision (real units), clipped into range."""
        frac = (np.asarray(d, dtype=np.float64) - self.d_lo) / (self.d_hi - self.d_lo)
        if self.log_decisions:
            span = self.d_hi - self.d_lo
            frac = np.log2(1.0 + np.maximum(frac, 0.0) * span) / np.log2(1.0 + span)
        return np.clip((frac * self.decision_bins).astype(np.int64), 0, self.decision_bins - 1)

    def cell_means(self) -> F64:
        """Mean efficiency per cell, NaN where the cell has fewer than ``min_cell`` samples.

        Computed once (the table does not change after construction); do not modify."""
        if self._means is None:
            with np.errstate(invalid="ignore", divide="ignore"):
                m = self.sum_e / self.count
            m[self.count < self.min_cell] = np.nan
            self._means = np.asarray(m, dtype=np.float64)
        return self._means

    def best_per_bucket(self) -> tuple[F64, F64, F64]:
        """For buckets with data: (mean features, best mean decision, weight).

        Cells are ranked by their mean efficiency shrunk toward the bucket's
        mean by ``prior`` pseudo-samples, so a lucky single explored decision
        does not beat a well-measured one by noise alone, yet a dense cell
        (the default's decision) does not win just by being dense.
        """
        nb, nd = self.n_buckets, self.decision_bins
        count = self.count.reshape(nb, nd)
        sum_e = self.sum_e.reshape(nb, nd)
        usable: npt.NDArray[np.bool_] = np.asarray(self.bucket_count > 0)
        if not usable.any():
            return np.zeros((0, self.bucket_x.shape[1])), np.zeros(0), np.zeros(0)
        bucket_mean = sum_e.sum(axis=1) / np.maximum(self.bucket_count, 1)
        score = (sum_e + self.prior * bucket_mean[:, None]) / (count + self.prior)
        score[count < self.min_cell] = -np.inf
        best = np.argmax(score, axis=1)
        cells = np.arange(nb) * nd + best
        d = self.sum_d[cells] / np.maximum(self.count[cells], 1)
        return self.bucket_x[usable], d[usable], self.bucket_count[usable]

    def cell_estimate(self, x: F32, d: F64) -> F64:
        """Per row: the mean efficiency of the cell ``(bucket(x), bin(d))``, NaN if unexplored."""
        return np.asarray(self.cell_means()[self.bucket(x) * self.decision_bins + self.dbin(d)],
                          dtype=np.float64)

    def estimate(self, x: F32, d: F64) -> Estimate:
        """Estimated mean efficiency of deciding *d* at *x* (see the class doc)."""
        if len(x) == 0:
            return Estimate(float("nan"), 0.0, 0)
        m = self.cell_estimate(x, d)
        ok = ~np.isnan(m)
        eff = float(m[ok].mean()) if ok.any() else float("nan")
        return Estimate(eff, float(ok.mean()), int(len(x)))


class Fit(Protocol):
    """What the learning loop needs of a fitted policy, whatever its model class."""

    @property
    def n_samples(self) -> int: ...

    @property
    def estimated(self) -> Estimate:
        """In-sample estimate of the fitted policy's efficiency."""

    @property
    def observed(self) -> float:
        """Observed mean efficiency of the training set."""

    def to_onnx(self, binding: Binding) -> bytes: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class TreeFit:
    """A fitted tree policy (:mod:`kmlbus.bus.treefit`): the ONNX bytes already bound."""

    onnx: bytes
    n_samples: int
    estimated: Estimate
    observed: float
    #: the value model's opinion of the policy over the explored decisions (a ratio)
    predicted_gain: float
    #: the ``learner`` that made it (``tree`` or ``choice``), shown in status
    model: str = "tree"

    def to_onnx(self, binding: Binding) -> bytes:
        return self.onnx

    def describe(self) -> dict[str, Any]:
        return {"model": self.model, "predicted_gain": self.predicted_gain}


@dataclass(frozen=True)
class LinearFit:
    """A fitted linear policy ``decision = x @ weights + bias`` (real units)."""

    weights: tuple[float, ...]
    bias: float
    n_samples: int
    n_buckets: int
    #: in-sample estimate of the fitted policy and of the observed decisions
    estimated: Estimate
    observed: float

    def predict(self, x: F32) -> F64:
        y = np.asarray(x, dtype=np.float64) @ np.asarray(self.weights, dtype=np.float64)
        return np.asarray(y + self.bias, dtype=np.float64)

    def describe(self) -> dict[str, Any]:
        return {"model": "linear", "weights": list(self.weights), "bias": self.bias}

    def to_onnx(self, binding: Binding) -> bytes:
        """The fit as a serialized ONNX model honouring *binding*'s tensor names."""
        return models.to_bytes(models.linear_model(
            self.weights, self.bias, binding.n_features,
            input_name=binding.input_name or models.INPUT_NAME,
            output_name=binding.output_name or models.OUTPUT_NAME,
            doc=f"kmlbus learner fit over {self.n_samples} samples"))


class Learner:
    """Collects (features, decision, efficiency) for one proxy and fits a model.

    Feed it every telemetry batch (:meth:`observe_telemetry`) and every
    feedback batch (:meth:`observe_feedback`) of the proxy; samples are joined
    by ``seq`` whichever arrives first.  Memory is bounded: the training set
    is a ring of ``capacity`` rows, and unmatched halves wait in bounded
    pending buffers (oldest dropped).

    *model_class* ``"linear"`` fits a line (:meth:`fit`); ``"tree"`` fits a
    :mod:`kmlbus.bus.treefit` policy over log-spaced decisions from the rows
    the model arm decided (explored ones, in learning), and bins decisions on
    the same log scale in its efficiency table.
    """

    def __init__(self, binding: Binding, *, capacity: int = 65536, pending: int = 16384,
                 bins: int = 6, decision_bins: int = 16, min_cell: int = 1,
                 prior: float = 1.0, model_class: str = "linear") -> None:
        if model_class not in ("linear", "tree"):
            raise ValueError(f"Learner: model_class {model_class!r}, expected linear or tree")
        self.binding = binding
        self.model_class = model_class
        self.capacity = capacity
        self.pending_cap = pending
        self.bins = bins
        self.decision_bins = decision_bins
        self.min_cell = min_cell
        self.prior = prior
        n = binding.n_features
        self._x = np.zeros((capacity, n), dtype=np.float32)
        self._d = np.zeros(capacity, dtype=np.float64)
        self._e = np.zeros(capacity, dtype=np.float64)
        self._arm = np.zeros(capacity, dtype=np.uint8)
        self._n = 0  # rows ever added
        self._tel_seq = np.zeros(0, dtype=np.uint64)
        self._tel_x = np.zeros((0, n), dtype=np.float32)
        self._fb = np.zeros(0, dtype=codec.struct_dtype("feedback"))
        self.unmatched_dropped = 0
        #: the table the last :meth:`fit` used (None before the first)
        self.last_table: EfficiencyTable | None = None

    # -- data -------------------------------------------------------------
    @property
    def n_samples(self) -> int:
        """Rows currently in the training set."""
        return min(self._n, self.capacity)

    @property
    def n_explored(self) -> int:
        """Rows in the training set decided by the model arm (explored or recommended)."""
        return int(np.count_nonzero(self._arm[:self.n_samples] == _ARM_MODEL))

    @property
    def total_added(self) -> int:
        """Rows ever added (including those the ring has since dropped)."""
        return self._n

    def add(self, x: npt.ArrayLike, decision: npt.ArrayLike, efficiency: npt.ArrayLike,
            arm: npt.ArrayLike | None = None) -> None:
        """Add rows directly: features in model units, decision and efficiency fixed point."""
        xa = np.asarray(x, dtype=np.float32).reshape(-1, self.binding.n_features)
        da = np.asarray(decision, dtype=np.float64) / self.binding.out_scale
        ea = np.asarray(efficiency, dtype=np.float64) / self.binding.schema.efficiency_scale
        aa = np.zeros(len(xa), np.uint8) if arm is None else np.asarray(arm, dtype=np.uint8)
        if not len(xa) == len(da) == len(ea) == len(aa):
            raise ValueError("Learner.add: x, decision, efficiency and arm differ in length")
        for lo in range(0, len(xa), self.capacity):
            hi = min(lo + self.capacity, len(xa))
            pos = (self._n + np.arange(hi - lo)) % self.capacity
            self._x[pos], self._d[pos], self._e[pos], self._arm[pos] = (
                xa[lo:hi], da[lo:hi], ea[lo:hi], aa[lo:hi])
            self._n += hi - lo

    def observe_telemetry(self, records: npt.NDArray[np.void]) -> int:
        """Remember the features of each decision; returns rows newly joined."""
        if len(records) == 0:
            return 0
        self._tel_seq = np.concatenate([self._tel_seq, records["seq"].astype(np.uint64)])
        self._tel_x = np.concatenate([self._tel_x, features_to_float(records, self.binding)])
        return self._join()

    def observe_feedback(self, feedback: npt.NDArray[np.void]) -> int:
        """Remember measured efficiencies; returns rows newly joined.  Feedback with seq 0
        (a decision the kernel did not record: unsampled, unheard or dropped) has no
        telemetry to join and is not kept."""
        feedback = feedback[feedback["seq"] != 0]
        if len(feedback) == 0:
            return 0
        self._fb = np.concatenate([self._fb, feedback])
        return self._join()

    def _join(self) -> int:
        ts, fb = self._tel_seq, self._fb
        if not len(ts) or not len(fb):
            return self._cap_pending(0)
        if len(ts) == len(fb) and np.array_equal(ts, fb["seq"]):
            # the usual case: a batch's feedback answers exactly the pending decisions
            self.add(self._tel_x, fb["decision"], fb["efficiency"], fb["arm"])
            self._tel_seq, self._tel_x, self._fb = ts[:0], self._tel_x[:0], fb[:0]
            return len(ts)
        _, ti, fi = np.intersect1d(self._tel_seq, self._fb["seq"].astype(np.uint64),
                                   assume_unique=False, return_indices=True)
        if len(ti):
            fb = self._fb[fi]
            self.add(self._tel_x[ti], fb["decision"], fb["efficiency"], fb["arm"])
            keep_t = np.ones(len(self._tel_seq), bool)
            keep_t[ti] = False
            keep_f = np.ones(len(self._fb), bool)
            keep_f[fi] = False
            self._tel_seq, self._tel_x, self._fb = (
                self._tel_seq[keep_t], self._tel_x[keep_t], self._fb[keep_f])
        return self._cap_pending(int(len(ti)))

    def _cap_pending(self, joined: int) -> int:
        """Drop the oldest unmatched halves beyond ``pending``; returns *joined*."""
        over_t = len(self._tel_seq) - self.pending_cap
        if over_t > 0:
            self._tel_seq, self._tel_x = self._tel_seq[over_t:], self._tel_x[over_t:]
            self.unmatched_dropped += over_t
        over_f = len(self._fb) - self.pending_cap
        if over_f > 0:
            self._fb = self._fb[over_f:]
            self.unmatched_dropped += over_f
        return joined

    def forget_pending(self) -> None:
        """Drop unmatched halves (the proxy's decision numbering restarted); rows stay."""
        self.unmatched_dropped += len(self._tel_seq) + len(self._fb)
        self._tel_seq = self._tel_seq[:0]
        self._tel_x = self._tel_x[:0]
        self._fb = self._fb[:0]

    def data(self) -> tuple[F32, F64, F64, npt.NDArray[np.uint8]]:
        """The training set: (x, decision, efficiency, arm), real units, oldest first."""
        n = self.n_samples
        if self._n <= self.capacity:
            sl = np.arange(n)
        else:
            sl = (self._n + np.arange(self.capacity)) % self.capacity
        return self._x[sl], self._d[sl], self._e[sl], self._arm[sl]

    # -- fitting ----------------------------------------------------------
    def table(self) -> EfficiencyTable:
        """The efficiency table of the current training set."""
        x, d, e, _ = self.data()
        b = self.binding
        lo, hi = b.rec_min / b.out_scale, b.rec_max / b.out_scale
        if not b.bounded:  # use the data
            lo, hi = float(d.min()), float(d.max())
        return EfficiencyTable(x, d, e, d_lo=lo, d_hi=hi, bins=self.bins,
                               decision_bins=self.decision_bins, min_cell=self.min_cell,
                               prior=self.prior, log_decisions=self.model_class == "tree")

    def candidates(self) -> F64 | None:
        """The decisions (real units) a tree learner explores and chooses among; None otherwise."""
        b = self.binding
        if self.model_class != "tree" or not b.bounded:
            return None
        from .treefit import candidate_windows

        lo, hi = b.rec_min / b.out_scale, b.rec_max / b.out_scale
        return np.asarray(candidate_windows(int(np.ceil(lo)), int(np.floor(hi))), dtype=np.float64)

    def fit(self, min_samples: int = 256) -> Fit | None:
        """Fit the policy of this learner's model class; None while there are fewer than
        *min_samples* rows."""
        if self.n_samples < min_samples:
            return None
        if self.model_class == "tree":
            return self._fit_tree(min_samples)
        return self._fit_linear()

    def _fit_tree(self, min_samples: int) -> TreeFit | None:
        """A treefit policy from the model arm's rows, estimated on the log-binned table."""
        from .registry import make_session
        from .treefit import fit_policy

        x, d, e, arm = self.data()
        mine = arm == _ARM_MODEL
        if np.count_nonzero(mine) < min_samples:
            return None
        b = self.binding
        lo, hi = int(np.ceil(b.rec_min / b.out_scale)), int(np.floor(b.rec_max / b.out_scale))
        # at most 8000 rows: a forest on more takes minutes in an emulated guest, and the
        # window classes are learned from a few thousand explored decisions already
        fitted = fit_policy(x[mine], d[mine], e[mine], lo=lo, hi=hi, max_rows=8000,
                            input_name=b.input_name or models.INPUT_NAME,
                            output_name=b.output_name or models.OUTPUT_NAME)
        t = self.last_table = self.table()
        sess = make_session(b.proxy, fitted.onnx)
        (y,) = sess.run(None, {sess.get_inputs()[0].name: x})
        fixed, _, _ = to_fixed(np.asarray(y, dtype=np.float32).reshape(-1), b)
        est = t.estimate(x, fixed.astype(np.float64) / b.out_scale)
        log.info("proxy %s: fitted a tree on %d explored of %d samples, estimated efficiency "
                 "%.3f (observed %.3f), value model's gain %.2fx", b.proxy, fitted.n_samples,
                 len(x), est.efficiency, float(e.mean()), fitted.predicted_gain)
        return TreeFit(fitted.onnx, len(x), est, float(e.mean()), fitted.predicted_gain)

    def _fit_linear(self) -> LinearFit | None:
        """The linear policy through the buckets' best decisions (see the module doc)."""
        x, d, e, _ = self.data()
        t = self.last_table = self.table()
        bx, bd, bw = t.best_per_bucket()
        if len(bd) == 0:
            return None
        a = np.hstack([bx, np.ones((len(bx), 1))])
        sw = np.sqrt(bw)[:, None]
        # a tiny ridge keeps constant features (one bucket wide) from exploding
        lam = 1e-6 * max(1.0, float(np.trace(a.T @ (a * bw[:, None]))))
        lhs = np.vstack([a * sw, np.sqrt(lam) * np.eye(a.shape[1])[:-1]])
        rhs = np.concatenate([bd * sw[:, 0], np.zeros(a.shape[1] - 1)])
        coef, *_ = np.linalg.lstsq(lhs, rhs, rcond=None)
        w = tuple(float(c) for c in coef[:-1])
        bias = float(coef[-1])
        fit = LinearFit(w, bias, len(x), len(bd), Estimate(0.0, 0.0, 0), float(e.mean()))
        est = t.estimate(x, self._policy_decisions(fit, x))
        fit = LinearFit(w, bias, len(x), len(bd), est, float(e.mean()))
        log.info("proxy %s: fitted weights=%s bias=%.3f on %d samples, %d buckets, "
                 "estimated efficiency %.3f (observed %.3f)", self.binding.proxy,
                 [round(v, 3) for v in w], bias, len(x), len(bd), est.efficiency, fit.observed)
        return fit

    def _policy_decisions(self, fit: LinearFit, x: F32) -> F64:
        """What the fitted model would decide, after the dispatcher's rounding and clamp."""
        b = self.binding
        fixed = np.clip(np.rint(fit.predict(x) * b.out_scale), b.rec_min, b.rec_max)
        return np.asarray(fixed / b.out_scale, dtype=np.float64)

    def update(self, registry: ModelRegistry, min_samples: int = 256
               ) -> tuple[Fit, LoadedModel] | None:
        """Fit and hot-swap the result into *registry* (None if not enough data yet)."""
        fit = self.fit(min_samples)
        if fit is None:
            return None
        lm = registry.install(self.binding.proxy, fit.to_onnx(self.binding),
                              f"learned({fit.n_samples} samples)")
        return fit, lm


class LearningLoop:
    """A :class:`Learner` plus what the daemon needs around it.

    * ``telemetry(records)`` / ``feedback(fb)`` on every batch of the proxy;
    * ``tick(now)`` from the daemon's periodic work refits at most every
      ``every_s``, only when ``min_new`` decisions were joined since the
      last fit and only once ``min_samples`` of the rows were decided by
      the model arm (without them a fit could only copy the default, and
      exploring around that copy would never find the far better
      decisions); the fit replaces the served model only when its estimated
      efficiency (on the same table) is at least the served model's, so a
      configured model that the data says is better is kept;
    * :meth:`score` is the :data:`modes.evidence.ShadowScorer` of a
      learning proxy: the estimated efficiency of the served model's
      decision for each sample, from the explored cells of the last table,
      NaN where nobody explored (maturity then needs coverage);
    * :meth:`explore` gives the recommendations to send in learning;
    * with ``save_to``, every installed fit is also written there atomically;
    * with ``background=True`` the refit runs in a thread (a fit over the whole
      training set takes tens of milliseconds natively, seconds under
      emulation, and the daemon's loop must keep serving meanwhile); the next
      ``tick`` after it finished returns its outcome.
    """

    def __init__(self, learner: Learner, registry: ModelRegistry, *, every_s: float = 5.0,
                 min_samples: int = 256, min_new: int = 128, spread: float = 0.25,
                 save_to: Path | None = None, rng: np.random.Generator | None = None,
                 background: bool = False, hold_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.learner = learner
        self.registry = registry
        self.every_s = every_s
        self.min_samples = min_samples
        self.min_new = min_new
        self.spread = spread
        self.save_to = save_to
        self.rng = rng if rng is not None else np.random.default_rng()
        self.last: Fit | None = None
        #: decisions explored (real units) for a tree learner: uniform over these
        self.candidates = learner.candidates()
        #: how long a tree learner holds a key's explored decision (seconds)
        self.hold_s = hold_s
        self.clock = clock
        nkeys = max(int(learner.binding.schema.nkeys), 1)
        #: per key: until when its held choice stands, and the choice (NaN: the model's)
        self._until = np.full(nkeys, -np.inf)
        self._held = np.full(nkeys, np.nan)
        self.fits = 0  # fits installed
        self.kept = 0  # fits not installed: the served model was estimated as good
        self.table: EfficiencyTable | None = None
        self._next = float("-inf")
        self._n_at_fit = 0
        self.background = background
        self._job: threading.Thread | None = None
        self._outcome: tuple[Fit | None, BaseException | None] = (None, None)

    @property
    def binding(self) -> Binding:
        return self.learner.binding

    def telemetry(self, records: npt.NDArray[np.void]) -> None:
        self.learner.observe_telemetry(records)

    def feedback(self, feedback: npt.NDArray[np.void]) -> None:
        self.learner.observe_feedback(feedback)

    def tick(self, now: float) -> Fit | None:
        """Refit and install if due and better; returns the installed fit, else None.

        A failed install (:class:`~kmlbus.bus.registry.ModelError`) propagates:
        the daemon treats it like any other model error.
        """
        if self._job is not None:
            if self._job.is_alive():
                return None
            return self.wait()
        if now < self._next or self.learner.total_added - self._n_at_fit < self.min_new:
            return None
        self._next = now + self.every_s
        if self.learner.n_explored < self.min_samples:
            return None
        self._n_at_fit = self.learner.total_added
        if not self.background:
            return self._refit()
        self._job = threading.Thread(target=self._run_job, daemon=True,
                                     name=f"kmlbus-learn-{self.binding.proxy}")
        self._job.start()
        return None

    def wait(self) -> Fit | None:
        """Wait for a background refit, if one runs; its outcome as :meth:`tick` gives it."""
        job, self._job = self._job, None
        if job is None:
            return None
        job.join()
        (fit, err), self._outcome = self._outcome, (None, None)
        if err is not None:
            raise err
        return fit

    def _run_job(self) -> None:
        try:
            self._outcome = (self._refit(), None)
        except Exception as e:  # handed to the daemon's thread by wait()
            self._outcome = (None, e)

    def _refit(self) -> Fit | None:
        """Fit; install the fit unless the served model is estimated at least as good."""
        fit = self.learner.fit(self.min_samples)
        if fit is None:
            return None
        self.table = self.learner.last_table
        served = self.served_estimate()
        if (served is not None and served.coverage >= 0.5
                and served.efficiency >= fit.estimated.efficiency):
            self.kept += 1
            log.info("proxy %s: served model estimated %.3f >= fit %.3f; kept",
                     self.binding.proxy, served.efficiency, fit.estimated.efficiency)
            return None
        data = fit.to_onnx(self.binding)
        self.registry.install(self.binding.proxy, data, f"learned({fit.n_samples} samples)")
        self.last = fit
        self.fits += 1
        if self.save_to is not None:
            self._save(data)
        return fit

    def _save(self, data: bytes) -> None:
        assert self.save_to is not None
        try:
            atomic.write_bytes(self.save_to, data)
        except OSError as e:
            log.warning("proxy %s: learned model not saved to %s: %s",
                        self.binding.proxy, self.save_to, e)

    def _served_decisions(self, x: F32) -> F64 | None:
        """The served model's decisions (real units, after rounding and clamp); None if none."""
        b = self.binding
        if not self.registry.has_model(b.proxy):
            return None
        try:
            y = self.registry.predict(b.proxy, x)
        except (ModelRuntimeError, NoModelError):
            return None
        fixed, _, valid = to_fixed(y, b)
        d = fixed.astype(np.float64) / b.out_scale
        d[~valid] = np.nan
        return d

    def served_estimate(self) -> Estimate | None:
        """Estimated efficiency of the served model on the training set (None: no model/table)."""
        if self.table is None:
            return None
        x, _, _, _ = self.learner.data()
        d = self._served_decisions(x)
        if d is None:
            return None
        ok = ~np.isnan(d)
        return self.table.estimate(x[ok], d[ok])

    def score(self, samples: npt.NDArray[np.void]) -> F64:
        """Estimated efficiency (feedback fixed point) of the served model's decision per sample."""
        out = np.full(len(samples), np.nan)
        if self.table is None or len(samples) == 0:
            return out
        b = self.binding
        x = features_to_float(samples, b)
        d = self._served_decisions(x)
        if d is None:
            return out
        ok = ~np.isnan(d)
        out[ok] = self.table.cell_estimate(x[ok], d[ok]) * b.schema.efficiency_scale
        return out

    def explore(self, keys: npt.NDArray[np.integer], recs: npt.NDArray[np.void] | None
                ) -> npt.NDArray[np.void]:
        """Recommendations to send in learning, where the kernel applies them only on its
        ``explore`` share: the model's *recs* moved by up to ``spread`` (:func:`perturb`),
        or, without them, values uniform over the recommendation's range for *keys*.
        Empty when there is neither a model nor a bounded range to explore.

        A tree learner explores its candidate decisions instead (see
        :meth:`Learner.candidates`): each key gets one drawn uniformly, or,
        with the model's *recs*, half the keys keep the model's value
        (on-policy: the states the served model creates stay in the data).
        The choice is held for ``hold_s`` per key: a decision's measured effect
        also depends on what its predecessors left in place (pages read ahead
        by a large window make the next period fast whatever it decides), so
        one stream keeps one window for several decisions in a row."""
        b = self.binding
        if self.candidates is not None:
            return self._explore_candidates(keys, recs, self.candidates)
        if recs is not None:
            return perturb(recs, b, self.rng, self.spread)
        if not b.bounded:
            return np.zeros(0, dtype=codec.struct_dtype("rec"))
        out = np.zeros(len(keys), dtype=codec.struct_dtype("rec"))
        out["key"] = keys
        out["value"] = self.rng.integers(b.rec_min, b.rec_max, len(keys), endpoint=True)
        out["ttl_ms"] = b.ttl_ms
        return out


    def _explore_candidates(self, keys: npt.NDArray[np.integer],
                            recs: npt.NDArray[np.void] | None, cands: F64) -> npt.NDArray[np.void]:
        b = self.binding
        if recs is None:
            out = np.zeros(len(keys), dtype=codec.struct_dtype("rec"))
            out["key"] = keys
            out["ttl_ms"] = b.ttl_ms
        else:
            out = recs.copy()
        k = out["key"].astype(np.int64)
        out = out[k < len(self._until)]
        k = k[k < len(self._until)]
        now = self.clock()
        due = self._until[k] <= now
        if recs is None:  # nothing of the model's to keep: a held "model's" choice is void
            due |= np.isnan(self._held[k])
        if due.any():
            kd = k[due]
            explore = np.ones(len(kd), dtype=bool) if recs is None else \
                self.rng.random(len(kd)) < 0.5
            self._held[kd] = np.where(explore, self.rng.choice(cands, len(kd)), np.nan)
            self._until[kd] = now + self.hold_s
        v = self._held[k]
        mine = ~np.isnan(v)
        out["value"][mine] = np.clip(np.rint(v[mine] * b.out_scale), b.rec_min, b.rec_max)
        return out


_ARM_MODEL = _spec.load().enums["arm"].value("model")


def perturb(recs: npt.NDArray[np.void], binding: Binding, rng: np.random.Generator,
            spread: float = 0.25) -> npt.NDArray[np.void]:
    """Exploration: a copy of *recs* with values moved by up to ``spread`` of the range.

    Meant for learning mode, where the kernel applies a recommendation only
    on its ``explore`` share of decisions: those decisions then try values
    near the model's, which is what the learner needs to compare.  Without
    bounds (an unbounded recommendation field) the move is relative to each
    value instead: up to ``spread * max(1, |value|)``.
    """
    out = recs.copy()
    lo, hi = binding.rec_min, binding.rec_max
    v = out["value"].astype(np.float64)
    if not binding.bounded:
        width = spread * np.maximum(1.0, np.abs(v))
    else:
        width = np.full(len(v), max(1.0, spread * (float(hi) - float(lo))))
    noise = rng.uniform(-1.0, 1.0, len(out)) * width
    out["value"] = np.clip(np.rint(v + noise), lo, hi)
    return out
