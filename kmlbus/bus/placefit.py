"""Learned data placement: which stream a written block goes to, fitted from its death times.

kmlbus-lsd's placement proxy (``lsd<N>.place``, keyed by region of the logical
space) decides the stream of every user write and, when the block dies
(overwritten or discarded), reports how well its stream matched the life it
actually had (1 for the stream whose lifetime band holds it, 0 for the one
farthest from it).  The best stream is a class of the block's lifetime, which
is not a linear function of the features (the region's idle time, its write
rate, the block's own update count): a linear fit cannot express "hot region
-> stream 2, cold -> stream 0".  So this learner keeps the
:class:`~kmlbus.bus.learner.Learner`'s data, join and efficiency table (the
table still estimates the served and the fitted policy, and scores shadows for
maturity) and replaces only the fit: :func:`kmlbus.bus.treefit.fit_policy` over
the streams, on the efficiency itself (0 is a real score here, not a floor).

Selected per proxy with ``learner = "choice"`` in the bus configuration.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import numpy.typing as npt

from kmlbus.contract import spec as _spec

from . import models, treefit
from .config import Binding
from .learner import Learner, TreeFit

__all__ = ["READY", "PlaceLearner"]

log = logging.getLogger(__name__)
log.addHandler(logging.NullHandler())

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

_ARM_MODEL = _spec.load().enums["arm"].value("model")

#: logged (INFO) once scikit-learn and skl2onnx are imported and a fit can start
READY = "placefit: tree fitting ready"


def _warm_up() -> None:
    """Import what a fit needs.  Under emulation (a TCG guest) these imports take a minute or
    more; done in a thread when the learner is made, so the first fit does not pay them."""
    try:
        import onnxruntime  # noqa: F401
        import skl2onnx  # noqa: F401
        import sklearn.ensemble
        import sklearn.tree  # noqa: F401
    except ImportError as e:
        log.error('placefit: learner = "choice" needs scikit-learn and skl2onnx '
                  "(pip install 'kmlbus[learn]'): %s", e)
        return
    log.info(READY)


def _run_onnx(data: bytes, x: F32) -> F64:
    import onnxruntime as ort

    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {sess.get_inputs()[0].name: np.ascontiguousarray(x, dtype=np.float32)})
    return np.asarray(y, dtype=np.float64).reshape(-1)


class PlaceLearner(Learner):
    """A :class:`~kmlbus.bus.learner.Learner` whose fit is a tree over a small integer range.

    The recommendation's range must be bounded and small (streams): every value
    in it is a candidate, and the efficiency table has one decision bin each.
    """

    def __init__(self, binding: Binding, *, max_depth: int = 6, max_rows: int = 4000,
                 n_estimators: int = 20, **kw: object) -> None:
        """*max_rows*, *n_estimators*: explored rows a fit samples and trees in its value
        forest (small: a fit takes seconds natively and tens of them in a TCG guest, while
        the proxy keeps exploring on the default); the rest as :class:`Learner`."""
        if not binding.bounded:
            raise ValueError(f"proxy {binding.proxy}: a tree placement needs a bounded "
                             "recommendation (the stream range)")
        lo, hi = binding.rec_min, binding.rec_max
        if hi - lo > 64:
            raise ValueError(f"proxy {binding.proxy}: a tree placement chooses among at most 65 "
                             f"values, the recommendation spans {lo}..{hi}")
        kw.setdefault("decision_bins", hi - lo + 1)
        super().__init__(binding, **kw)  # type: ignore[arg-type]
        self.max_depth = max_depth
        self.max_rows = max_rows
        self.n_estimators = n_estimators
        threading.Thread(target=_warm_up, daemon=True, name="kmlbus-placefit-imports").start()
        self.choices = np.arange(lo, hi + 1, dtype=np.float64) / binding.out_scale

    def fit(self, min_samples: int = 256) -> TreeFit | None:
        """Fit on the explored decisions (the model arm's); None while there are too few."""
        x, d, e, arm = self.data()
        explored = arm == _ARM_MODEL
        if int(explored.sum()) < max(min_samples, 50):
            return None
        t = self.last_table = self.table()
        b = self.binding
        fitted = treefit.fit_policy(x[explored], d[explored], e[explored],
                                    lo=b.rec_min, hi=b.rec_max, max_depth=self.max_depth,
                                    max_rows=self.max_rows, n_estimators=self.n_estimators,
                                    candidates=self.choices, log_value=False,
                                    input_name=b.input_name or models.INPUT_NAME,
                                    output_name=b.output_name or models.OUTPUT_NAME)
        chosen = np.clip(np.rint(_run_onnx(fitted.onnx, x) * b.out_scale), b.rec_min, b.rec_max)
        est = t.estimate(x, chosen / b.out_scale)
        fit = TreeFit(fitted.onnx, fitted.n_samples, est, float(e.mean()), fitted.predicted_gain,
                      model="choice")
        log.info("proxy %s: tree placement fitted on %d explored decisions, estimated %.3f "
                 "(observed %.3f, value model's gain %.2fx)", b.proxy, fitted.n_samples,
                 est.efficiency, fit.observed, fitted.predicted_gain)
        return fit
