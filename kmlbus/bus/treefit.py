"""Non-linear policies learned from the kernel's feedback: tree ensembles, exported to ONNX.

The linear learner (`kmlbus.learner`) fits one line of efficiency against the
decision.  Some decisions are far from linear: the readahead window that is
best is 0 for a random mmap reader and megabytes for a sequential one.  This
module fits such a policy in two steps, both with scikit-learn:

1. a value model: a random forest predicting the log of the reported efficiency from
   (features, log2(1 + decision)), fitted on explored decisions;
2. a policy: for every recorded feature vector, the candidate decision (a
   window class: *lo*, then powers of two up to *hi*) the value model rates
   best, distilled into one decision tree from features to class, each leaf
   answering the class most of its samples chose (never an average of two
   classes: half-way between 0 and 8 MiB is good for nobody); skl2onnx exports
   it as the served ONNX model (input ``features`` float32 [N, F], output
   ``value`` float32 [N, 1], or the names the binding asks for).

The features must describe the state independently of the decisions taken
(the readahead proxy measures the reader's own accesses): a model fitted on
explored decisions is then fed the same kind of states when it serves.

``python -m kmlbus.bus.treefit TRACE... -o MODEL.onnx [--proxy NAME]`` fits
from traces the bus recorded (``[bus] trace``) in learning mode.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = ["Fitted", "candidate_windows", "fit_policy", "fraction_range", "from_traces", "main",
           "window_class"]

log = logging.getLogger(__name__)
log.addHandler(logging.NullHandler())

F32 = npt.NDArray[np.float32]


def candidate_windows(lo: int, hi: int) -> npt.NDArray[np.float64]:
    """Decisions the policy chooses among: *lo*, then powers of two up to *hi* (inclusive)."""
    out = [float(lo)]
    v = 1
    while v <= hi:
        if v > lo:
            out.append(float(v))
        v *= 2
    if out[-1] != hi:
        out.append(float(hi))
    return np.asarray(out)


def window_class(decision: npt.ArrayLike, cands: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    """Index of the candidate nearest to each decision on the log2(1 + d) scale."""
    ld = np.log2(1.0 + np.maximum(np.asarray(decision, dtype=np.float64), 0.0))
    lc = np.log2(1.0 + np.maximum(cands, 0.0))
    return np.asarray(np.argmin(np.abs(ld[:, None] - lc[None, :]), axis=1), dtype=np.int64)


@dataclass(frozen=True)
class Fitted:
    """A fitted policy: the ONNX bytes, and what the value model expects of it."""

    onnx: bytes
    n_samples: int
    #: geometric mean over the samples of the predicted efficiency of the policy's
    #: choice / of the recorded decision (the value model's opinion, not a measurement;
    #: the ratio of the means when the value model fits efficiency itself)
    predicted_gain: float


def _value_features(x: F32, decision: npt.NDArray[np.float64]) -> F32:
    return np.hstack([x, np.log2(1.0 + np.maximum(decision, 0.0))[:, None]]).astype(np.float32)


def fit_policy(x: F32, decision: npt.ArrayLike, efficiency: npt.ArrayLike, *,
               lo: int, hi: int, max_depth: int = 6, seed: int = 0,
               max_rows: int = 20000, candidates: npt.ArrayLike | None = None,
               log_value: bool = True, n_estimators: int = 60, input_name: str = "features",
               output_name: str = "value") -> Fitted:
    """Fit a value model on (x, decision) -> efficiency, distil its argmax into one tree.

    *x*: float32 [N, F] features as the model sees them; *decision*, *efficiency*:
    [N]; [*lo*, *hi*]: the recommendation's bounds.  *candidates*: the decisions
    the policy chooses among (default :func:`candidate_windows`).  *log_value*:
    fit the logarithm of efficiency (for efficiencies spanning orders of
    magnitude); off, the efficiency itself (for a bounded score where 0 is a
    real value).  *n_estimators*: trees in the value model's forest.  Raises ValueError
    with fewer than 50 samples.
    """
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.tree import DecisionTreeRegressor

    x = np.asarray(x, dtype=np.float32)
    d = np.asarray(decision, dtype=np.float64)
    e = np.asarray(efficiency, dtype=np.float64)
    if len(x) < 50:
        raise ValueError(f"treefit: {len(x)} samples, need at least 50 explored decisions")
    rng = np.random.default_rng(seed)
    if len(x) > max_rows:
        keep = rng.choice(len(x), max_rows, replace=False)
        x, d, e = x[keep], d[keep], e[keep]
    # Efficiencies of different kinds of state can differ by orders of magnitude (a sequential
    # reader's pages/ms against a random one's): the value model fits their logarithm, so the
    # squared error weighs every state alike; the argmax within a state is unchanged by it.
    if log_value:
        floor = max(float(np.percentile(e[e > 0], 1)) if np.any(e > 0) else 1e-6, 1e-9)
        target = np.log(np.maximum(e, floor))
    else:
        target = e
    value = RandomForestRegressor(n_estimators=n_estimators, min_samples_leaf=5, random_state=seed,
                                  n_jobs=1)
    value.fit(_value_features(x, d), target)

    cands = (candidate_windows(lo, hi) if candidates is None
             else np.asarray(candidates, dtype=np.float64))
    scores = np.stack([value.predict(_value_features(x, np.full(len(x), c))) for c in cands], axis=1)
    best = np.argmax(scores, axis=1)
    # split on the log of the window (a class index), then answer each leaf's majority class
    policy = DecisionTreeRegressor(max_depth=max_depth, min_samples_leaf=10, random_state=seed)
    policy.fit(x, np.log2(1.0 + cands[best]))
    leaf = policy.apply(x)
    votes = np.zeros((policy.tree_.node_count, len(cands)))
    np.add.at(votes, (leaf, best), 1.0)
    for node in np.unique(leaf):
        policy.tree_.value[node, 0, 0] = cands[int(np.argmax(votes[node]))]
    chosen = policy.predict(x)
    served = value.predict(_value_features(x, chosen))
    recorded = value.predict(_value_features(x, d))
    gain = float(np.exp(np.mean(served - recorded)) if log_value
                 else np.mean(served) / max(float(np.mean(recorded)), 1e-9))

    onx = convert_sklearn(policy, initial_types=[(input_name, FloatTensorType([None, x.shape[1]]))],
                          target_opset={"": 13, "ai.onnx.ml": 3})
    out = onx.graph.output[0]
    old = out.name
    for node in onx.graph.node:
        node.output[:] = [output_name if o == old else o for o in node.output]
    out.name = output_name
    onx.doc_string = (f"treefit policy: depth {max_depth} tree distilled from a random forest of "
                      f"efficiency on {len(x)} explored decisions; candidates {cands.tolist()}")
    return Fitted(onx.SerializeToString(), len(x), gain)


def from_traces(paths: Sequence[str | Path], proxy: str, *, explored_only: bool = True,
                rows: tuple[float, float] = (0.0, 1.0)
                ) -> tuple[F32, npt.NDArray[np.float64], npt.NDArray[np.float64], int, int]:
    """(features as floats, decisions, efficiencies, rec min, rec max) of *proxy* in recorded traces.

    Telemetry and feedback are joined by sequence number; with *explored_only*
    only decisions the kernel took from the bus's exploration (flag explored)
    or by the model arm count, so the decision varies independently of the state.
    *rows* = (a, b): only the part of each trace's rows from fraction *a* to *b*
    of them, in decision order (fit on the first half, replay on the second).
    """
    from kmlbus.bus import tracefile as traces
    from kmlbus.contract import spec

    flags = spec.load().enums["sample-flags"]
    explored_flag = flags.value("explored")
    xs, ds, es = [], [], []
    lo = hi = 0
    for path in paths:
        _, _, schema, t, f = traces.collect(path, proxy)
        if not len(t) or not len(f):
            raise ValueError(f"{path}: no telemetry or feedback of proxy {proxy!r}")
        lo, hi = int(schema.recommendation.min or 0), int(schema.recommendation.max or 0)
        _, ti, fi = np.intersect1d(t["seq"], f["seq"], return_indices=True)
        t, f = t[ti], f[fi]
        if explored_only:
            keep = (t["flags"] & explored_flag) != 0
            t, f = t[keep], f[keep]
        a, b = int(rows[0] * len(t)), int(rows[1] * len(t))
        t, f = t[a:b], f[a:b]
        scale = np.array([max(fs.scale, 1) for fs in schema.features], dtype=np.float64)
        xs.append((t["features"][:, :len(scale)] / scale).astype(np.float32))
        ds.append(f["decision"].astype(np.float64))
        es.append(f["efficiency"].astype(np.float64) / max(schema.efficiency_scale, 1))
    return np.concatenate(xs), np.concatenate(ds), np.concatenate(es), lo, hi


def fraction_range(text: str) -> tuple[float, float]:
    """``A:B`` with 0 <= A < B <= 1, for ``--rows``."""
    try:
        a, b = (float(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A:B (fractions), found {text!r}") from None
    if not 0.0 <= a < b <= 1.0:
        raise argparse.ArgumentTypeError(f"expected 0 <= A < B <= 1, found {text!r}")
    return a, b


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kmlbus.bus.treefit",
                                 description=(__doc__ or "").split("\n")[0])
    ap.add_argument("traces", nargs="+", help="traces recorded by `kmlbus run` ([bus] trace)")
    ap.add_argument("-o", "--output", required=True, help="ONNX file to write")
    ap.add_argument("--proxy", default="readahead")
    ap.add_argument("--all-decisions", action="store_true",
                    help="fit on every decision, not only explored ones")
    ap.add_argument("--max-depth", type=int, default=6)
    ap.add_argument("--rows", type=fraction_range, default=(0.0, 1.0), metavar="A:B",
                    help="fit on this part of each trace's decisions (fractions, e.g. 0:0.5)")
    args = ap.parse_args(argv)
    x, d, e, lo, hi = from_traces(args.traces, args.proxy, explored_only=not args.all_decisions,
                                  rows=args.rows)
    fitted = fit_policy(x, d, e, lo=lo, hi=hi, max_depth=args.max_depth)
    from kmlbus.bus import atomic

    atomic.write_bytes(Path(args.output), fitted.onnx)
    print(f"{args.output}: policy from {fitted.n_samples} decisions, predicted efficiency "
          f"{fitted.predicted_gain:.2f}x the recorded decisions'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
