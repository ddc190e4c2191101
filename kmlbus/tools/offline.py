"""Offline evaluation of recorded traces: estimate a model's efficiency, fit one, summarise.

``python -m kmlbus.tools.offline {show,evaluate,fit}`` (also ``kmlbus trace``).
Reads files written by :class:`kmlbus.bus.tracefile.TraceWriter`; needs no
kernel, so models and mode policies can be compared on a laptop.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from kmlbus.bus.config import ProxyConfig, bind
from kmlbus.bus.fixedpoint import features_to_float, to_fixed
from kmlbus.bus.learner import EfficiencyTable, Estimate, Learner, LinearFit
from kmlbus.bus.registry import ModelError, check_session, make_session
from kmlbus.bus.tracefile import TraceError, collect, open_trace
from kmlbus.contract import spec as _spec

__all__ = ["Evaluation", "Replay", "evaluate", "learn", "main", "replay", "summary"]

def learn(path: str | os.PathLike[str], *, proxy: str | None = None,
          config: ProxyConfig | None = None, **learner_options: Any) -> Learner:
    """A :class:`~kmlbus.bus.learner.Learner` fed with every decision of a recorded trace.

    ``learn(path).fit()`` fits a model offline from a run recorded in
    learning mode (with exploration); :func:`evaluate` then estimates it.
    """
    _, proxy, schema, t, f = collect(path, proxy)
    learner = Learner(bind(schema, config), **learner_options)
    # join here rather than through observe_*: a whole trace exceeds the pending buffers
    _, ti, fi = np.intersect1d(t["seq"], f["seq"], return_indices=True)
    fs = f[fi]
    learner.add(features_to_float(t[ti], learner.binding), fs["decision"], fs["efficiency"],
                fs["arm"])
    return learner


@dataclass(frozen=True)
class Evaluation:
    """A model's estimated efficiency on a trace, against the recorded default.

    Efficiencies are in real units (fixed point / the proxy's efficiency scale).
    """

    proxy: str
    telemetry_records: int
    feedback_records: int
    joined: int
    #: the model, estimated by the cell-mean estimator over the joined samples
    model: Estimate
    #: measured mean efficiency of the default arm's decisions
    default_measured: float
    default_n: int
    #: measured efficiency of the default arm on the samples the model's estimate
    #: covers (the like-for-like comparison when coverage is partial)
    default_on_covered: Estimate
    #: measured mean efficiency of decisions the recorded model made, if any
    recorded_model_measured: float
    recorded_model_n: int

    @property
    def gain(self) -> float:
        """Estimated model efficiency minus the default's measured efficiency."""
        return self.model.efficiency - self.default_measured

    def __str__(self) -> str:
        return (f"proxy {self.proxy}: model {self.model.efficiency:.3f} (estimated, coverage "
                f"{self.model.coverage:.0%} of {self.joined} decisions) vs default "
                f"{self.default_measured:.3f} (measured over {self.default_n}); "
                f"gain {self.gain:+.3f}")


def evaluate(path: str | os.PathLike[str], model: bytes | str | os.PathLike[str], *,
             proxy: str | None = None, config: ProxyConfig | None = None,
             bins: int = 6, decision_bins: int = 16) -> Evaluation:
    """Replay *path*'s telemetry through *model* offline and estimate its efficiency.

    Estimator (direct method, see :class:`kmlbus.bus.learner.EfficiencyTable`):
    every decision with both a telemetry sample and a feedback record (joined
    by ``seq``) goes into cells (feature bucket x decision bin) holding the
    mean measured efficiency.  The model is run on each sample's features (via
    the same binding, rounding and clamping as the dispatcher); its estimated
    efficiency is the mean of the cells its decisions land in.  Decisions in
    cells the trace never measured are left out and reported as coverage < 1:
    a trace from a default-only run can only evaluate models that decide like
    the default, which is why learning mode explores.  The default is reported
    as measured (all default-arm feedback) and as measured on the covered samples.
    """
    reader, proxy, schema, t, f = collect(path, proxy)
    sp = _spec.load()
    b = bind(schema, config)
    _, ti, fi = np.intersect1d(t["seq"], f["seq"], return_indices=True)
    ts, fs = t[ti], f[fi]
    escale = float(schema.efficiency_scale)
    arm_default = sp.enums["arm"].value("default")
    d_all = f["efficiency"].astype(np.float64) / escale
    is_def = f["arm"] == arm_default
    default_measured = float(d_all[is_def].mean()) if is_def.any() else float("nan")
    rec_model = float(d_all[~is_def].mean()) if (~is_def).any() else float("nan")
    nan_est = Estimate(float("nan"), 0.0, 0)
    if len(ts) == 0:
        return Evaluation(proxy, len(t), len(f), 0, nan_est, default_measured,
                          int(is_def.sum()), nan_est, rec_model, int((~is_def).sum()))

    session = make_session(proxy, model)
    inp, out = check_session(proxy, session, b.n_features, input_name=b.input_name,
                             output_name=b.output_name, source=str(model)[:80]
                             if not isinstance(model, bytes) else "in-memory model")
    x = features_to_float(ts, b)
    try:
        (y,) = session.run([out], {inp: x})
    except Exception as e:
        raise ModelError(proxy, f"proxy {proxy}: model failed on the trace's features: "
                                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    fixed, _, valid = to_fixed(np.asarray(y, dtype=np.float32).reshape(-1), b)
    d_model = fixed.astype(np.float64) / b.out_scale
    d_rec = fs["decision"].astype(np.float64) / b.out_scale
    e_rec = fs["efficiency"].astype(np.float64) / escale
    lo, hi = b.rec_min / b.out_scale, b.rec_max / b.out_scale
    if not b.bounded:
        lo, hi = float(min(d_rec.min(), d_model.min())), float(max(d_rec.max(), d_model.max()))
    table = EfficiencyTable(x, d_rec, e_rec, d_lo=lo, d_hi=hi, bins=bins,
                            decision_bins=decision_bins)
    model_est = table.estimate(x[valid], d_model[valid])
    # the default's own decisions, on the samples where the model's cell was measured
    means = table.cell_means()
    covered = ~np.isnan(means[table.bucket(x) * table.decision_bins + table.dbin(d_model)])
    covered &= valid
    dmask = covered & (fs["arm"] == arm_default)
    default_est = Estimate(float(e_rec[dmask].mean()) if dmask.any() else float("nan"),
                           float(dmask.mean()), int(dmask.sum()))
    return Evaluation(proxy, len(t), len(f), len(ts), model_est, default_measured,
                      int(is_def.sum()), default_est, rec_model, int((~is_def).sum()))


@dataclass(frozen=True)
class Replay:
    """A policy's efficiency on explored decisions it would have taken (see :func:`replay`)."""

    policy: str
    #: explored decisions whose window class the policy would have chosen, of all
    matched: int
    rows: int
    #: geometric mean of their efficiencies (real units), NaN without a match
    geomean: float


def replay(x: npt.NDArray[np.float32], d: npt.NDArray[np.float64], e: npt.NDArray[np.float64],
           policies: dict[str, npt.NDArray[np.float64]], cands: npt.NDArray[np.float64]
           ) -> list[Replay]:
    """Estimate each policy from decisions explored uniformly over the window classes *cands*.

    *policies*: name -> the decision the policy takes for each row of *x*.  When
    the explored decision was drawn independently of the state, the explored
    decisions that fall in the class the policy would choose are a random
    sample of the states, each decided as the policy decides: the geometric
    mean of their efficiencies estimates the policy's, without a model of the
    efficiency (a matching, or rejection-sampling, estimator; its error is that
    of a mean over ``matched`` rows).  Geometric, because efficiencies of a
    sequential and a random reader differ by orders of magnitude.
    """
    from kmlbus.bus.treefit import window_class

    got = window_class(d, cands)
    out = []
    for name, pd in policies.items():
        m = window_class(pd, cands) == got
        ok = m & (e > 0)
        g = float(np.exp(np.mean(np.log(e[ok])))) if ok.any() else float("nan")
        out.append(Replay(name, int(m.sum()), len(x), g))
    return out


def _replay_main(args: Any) -> int:
    """``replay``: policies on the explored decisions of traces, overall and per group."""
    from kmlbus.bus.treefit import candidate_windows, from_traces

    x, d, e, lo, hi = from_traces(args.traces, args.proxy, rows=args.rows)
    cands = candidate_windows(lo, hi)
    names = [f.name for f in collect(args.traces[0], args.proxy)[2].features]
    policies: dict[str, npt.NDArray[np.float64]] = {
        f"static {v}": np.full(len(x), float(v)) for v in args.static}
    for path in args.model:
        sess = make_session(args.proxy, Path(path).read_bytes())
        (y,) = sess.run(None, {sess.get_inputs()[0].name: x})
        policies[Path(path).name] = np.asarray(y, dtype=np.float64).reshape(-1)
    groups: dict[str, npt.NDArray[np.bool_]] = {"all": np.ones(len(x), dtype=bool)}
    for feat in args.by:
        j = names.index(feat)
        groups[f"{feat} >= 0.5"] = x[:, j] >= 0.5
        groups[f"{feat} < 0.5"] = x[:, j] < 0.5
    base = next(iter(policies))
    print(f"{len(x)} explored decisions of proxy {args.proxy} (rows {args.rows[0]:g}:"
          f"{args.rows[1]:g} of each trace), {len(cands)} window classes; geometric mean "
          f"efficiency of the decisions each policy would have taken, x = ratio to {base}")
    for gname, g in groups.items():
        res = replay(x[g], d[g], e[g], {k: v[g] for k, v in policies.items()}, cands)
        ref = res[0].geomean
        print(f"  {gname} ({int(g.sum())} rows)")
        for r in res:
            print(f"    {r.policy:<28} {r.geomean:10.3f} {r.geomean / ref:6.2f}x  "
                  f"({r.matched} matched)")
    return 0


def summary(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Counts per proxy and kind, rows, and the time span of a trace."""
    reader = open_trace(path)
    per: dict[str, dict[str, list[int]]] = {}
    first = last = None
    for ev in reader:
        c = per.setdefault(ev.proxy, {}).setdefault(ev.kind, [0, 0])
        c[0] += 1
        c[1] += len(ev.data)
        first = ev.ts if first is None else first
        last = ev.ts
    return {
        "path": str(reader.path), "version": reader.header.version,
        "spec_version": reader.header.spec_version, "proxies": sorted(reader.schemas),
        "batches": {p: {k: {"batches": v[0], "rows": v[1]} for k, v in kinds.items()}
                    for p, kinds in per.items()},
        "span_s": 0.0 if first is None or last is None else (last - first) / 1e9,
    }


def main(argv: Iterable[str] | None = None) -> int:
    """``python -m kmlbus.tools.offline``: show a trace, evaluate a model on it, fit one from it."""
    import argparse
    import json
    import sys

    from kmlbus.bus import config as _config
    from kmlbus.bus.treefit import fraction_range

    ap = argparse.ArgumentParser(prog="python -m kmlbus.tools.offline",
                                 description="Inspect kmlbus traces, evaluate and fit models.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("show", help="counts per proxy and kind")
    s.add_argument("trace")
    s = sub.add_parser("replay", help="policies' efficiency on decisions explored over window "
                                      "classes (learner = \"tree\" traces)")
    s.add_argument("traces", nargs="+")
    s.add_argument("--proxy", default="readahead")
    s.add_argument("--static", type=int, action="append", default=[],
                   help="a constant decision to replay (first one: the reference); repeatable")
    s.add_argument("--model", action="append", default=[], help="an ONNX policy; repeatable")
    s.add_argument("--by", action="append", default=[],
                   help="also per group of a feature above/below 0.5; repeatable")
    s.add_argument("--rows", type=fraction_range, default=(0.0, 1.0), metavar="A:B",
                   help="only this part of each trace's decisions (e.g. 0.5:1)")
    for name, hlp in (("evaluate", "estimate a model's efficiency on the trace"),
                      ("fit", "fit a linear model from the trace's feedback")):
        s = sub.add_parser(name, help=hlp)
        s.add_argument("trace")
        s.add_argument("model", help="ONNX model to evaluate" if name == "evaluate"
                       else "where to write the fitted ONNX model")
        s.add_argument("--proxy", help="proxy name (default: the first recorded)")
        s.add_argument("--config", help="bus TOML whose [proxy.<name>] binding to use")
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.cmd == "show":
            print(json.dumps(summary(args.trace), indent=2))
            return 0
        if args.cmd == "replay":
            if not args.static and not args.model:
                ap.error("replay: give at least one --static or --model policy")
            return _replay_main(args)
        pc = None
        if args.config:
            c = _config.load(args.config)
            pname = args.proxy or next(iter(c.proxies), None)
            pc = c.proxies.get(pname) if pname else None
        if args.cmd == "evaluate":
            print(evaluate(args.trace, args.model, proxy=args.proxy, config=pc))
            return 0
        learner = learn(args.trace, proxy=args.proxy, config=pc)
        fit = learner.fit()
        if not isinstance(fit, LinearFit):
            print(f"{args.trace}: only {learner.n_samples} joined decisions; need 256 to fit")
            return 1
        from kmlbus.bus import models as _models
        out = Path(args.model)
        _models.save(_models.linear_model(
            fit.weights, fit.bias, learner.binding.n_features,
            input_name=learner.binding.input_name or _models.INPUT_NAME,
            output_name=learner.binding.output_name or _models.OUTPUT_NAME), out)
        print(f"{out}: weights {[round(w, 4) for w in fit.weights]} bias {fit.bias:.4f} "
              f"({learner.binding.feature_names}) from {fit.n_samples} decisions")
        print(evaluate(args.trace, out, proxy=learner.binding.proxy, config=pc))
        return 0
    except (TraceError, ModelError, _config.ConfigError, ValueError) as e:
        print(f"kmlbus traces: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
