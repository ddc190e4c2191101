"""The tree learner (``learner = "tree"``): log-spaced exploration, live fits, offline replay.

``ReadaheadWorkload`` is a Python caricature of the readahead proxy (kept in
the test so the learner cannot know its formula): sequential readers progress
faster with a larger window, random mmap readers slower; the features are
the proxy's five, measured from the reader's accesses, so they do not depend
on the window decided.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest

from kmlbus.bus import config as cfg
from kmlbus.bus.config import FieldSchema, ProxySchema
from kmlbus.bus.learner import EfficiencyTable, Learner, LearningLoop, TreeFit
from kmlbus.bus.registry import ModelRegistry
from kmlbus.bus.treefit import candidate_windows, window_class
from kmlbus.contract import spec
from kmlbus.tools.offline import replay
from kmlbus.wire import codec

REC = codec.struct_dtype("rec")
ARM_MODEL = spec.load().enums["arm"].value("model")
FEATURES = ("seq", "req_pages", "mmap", "jump_log2", "stock_pages")
CANDS = candidate_windows(0, 2048)


def readahead_schema() -> ProxySchema:
    scales = (1000, 1000, 1000, 1000, 1)
    return ProxySchema("readahead", tuple(FieldSchema(n, s) for n, s in zip(FEATURES, scales)),
                       FieldSchema("window_pages", 1, 0, 2048), 256)


@dataclass
class ReadaheadWorkload:
    """Half sequential read() streams, half random mmap streams; efficiency in pages/ms."""

    seed: int = 1

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def states(self, n: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
        seq = self.rng.random(n) < 0.5
        x = np.zeros((n, len(FEATURES)), dtype=np.float32)
        x[:, 0] = np.where(seq, self.rng.uniform(0.8, 1.0, n), self.rng.uniform(0.0, 0.2, n))
        x[:, 1] = np.where(seq, 1.0, 1.0)
        x[:, 2] = np.where(seq, 0.0, 1.0)
        x[:, 3] = np.where(seq, self.rng.uniform(0, 1, n), self.rng.uniform(12, 16, n))
        x[:, 4] = 32
        return x, seq

    def efficiency(self, w: npt.ArrayLike, seq: npt.NDArray[np.bool_]) -> npt.NDArray[np.float64]:
        lw = np.log2(1.0 + np.asarray(w, dtype=np.float64))
        e = np.where(seq, 5.0 + 2.0 * lw, 4.0 / (1.0 + lw))
        return np.asarray(e * self.rng.lognormal(0.0, 0.2, len(e)), dtype=np.float64)


def test_window_classes_are_nearest_on_the_log_scale() -> None:
    assert window_class([0, 1, 3, 5, 40, 2048, 5000], CANDS).tolist() == [0, 1, 3, 3, 6, 12, 12]


def test_tree_learner_explores_0_and_every_power_of_two_and_keeps_half_of_the_models() -> None:
    reg = ModelRegistry()
    b = reg.bind(readahead_schema())
    now = [0.0]
    loop = LearningLoop(Learner(b, model_class="tree"), reg, rng=np.random.default_rng(1),
                        hold_s=1.0, clock=lambda: now[0])
    keys = np.arange(256, dtype=np.uint32)
    out = []
    for _ in range(20):
        out.append(loop.explore(keys, None))
        now[0] += 1.0
    out = np.concatenate(out)
    assert set(out["value"].tolist()) == set(CANDS.astype(int).tolist())
    # uniform over the 13 classes: the small windows (< 64 pages) are 7 of them
    small = np.mean(out["value"] < 64)
    assert 0.45 < small < 0.65
    recs = np.zeros(256, dtype=REC)
    recs["key"], recs["value"], recs["ttl_ms"] = keys, 777, 100
    now[0] += 1.0
    mixed = loop.explore(keys, recs)
    kept = np.mean(mixed["value"] == 777)
    assert 0.35 < kept < 0.65
    assert set(mixed["value"][mixed["value"] != 777].tolist()) <= set(CANDS.astype(int).tolist())
    assert (mixed["key"] == keys).all() and (mixed["ttl_ms"] == 100).all()


def test_a_keys_explored_window_is_held_then_drawn_again() -> None:
    reg = ModelRegistry()
    b = reg.bind(readahead_schema())
    now = [0.0]
    loop = LearningLoop(Learner(b, model_class="tree"), reg, rng=np.random.default_rng(2),
                        hold_s=1.0, clock=lambda: now[0])
    keys = np.arange(256, dtype=np.uint32)
    first = loop.explore(keys, None)["value"].copy()
    now[0] = 0.9
    assert (loop.explore(keys[::-1], None)["value"] == first[::-1]).all()  # held, per key
    now[0] = 1.0
    again = loop.explore(keys, None)["value"]
    assert np.mean(again != first) > 0.8  # drawn anew (1 in 13 alike by chance)


def test_linear_learner_still_explores_uniformly_over_the_range() -> None:
    reg = ModelRegistry()
    b = reg.bind(readahead_schema())
    loop = LearningLoop(Learner(b), reg, rng=np.random.default_rng(1))
    out = loop.explore(np.arange(256, dtype=np.uint32), None)
    assert loop.candidates is None and len(set(out["value"].tolist())) > 100


def test_unknown_model_class_is_refused() -> None:
    with pytest.raises(ValueError, match="'forest'"):
        Learner(cfg.bind(readahead_schema()), model_class="forest")


def _explored(loop: LearningLoop, wl: ReadaheadWorkload, n: int) -> None:
    x, seq = wl.states(n)
    d = wl.rng.choice(CANDS, n)
    loop.learner.add(x, d, np.rint(wl.efficiency(d, seq) * 1000), np.full(n, ARM_MODEL))


def test_live_tree_fit_serves_0_to_random_mmap_and_megabytes_to_sequential() -> None:
    reg = ModelRegistry()
    b = reg.bind(readahead_schema())
    loop = LearningLoop(Learner(b, model_class="tree"), reg, min_samples=256, min_new=1)
    wl = ReadaheadWorkload(seed=3)
    _explored(loop, wl, 3000)
    fit = loop.tick(0.0)
    assert isinstance(fit, TreeFit) and loop.fits == 1 and reg.has_model("readahead")
    assert fit.describe()["model"] == "tree" and fit.estimated.coverage > 0.9
    x, seq = wl.states(400)
    w = reg.predict("readahead", x).reshape(-1)
    assert set(np.unique(w).tolist()) <= set(CANDS.tolist())  # a class, never an average
    assert np.median(w[seq]) >= 1024 and np.median(w[~seq]) <= 2
    # the kernel's measure of what it serves beats the stock 32-page window on both kinds
    for kind in (seq, ~seq):
        assert np.exp(np.mean(np.log(wl.efficiency(w[kind], seq[kind])))) > \
            np.exp(np.mean(np.log(wl.efficiency(np.full(kind.sum(), 32), seq[kind]))))


def test_tree_learner_bins_decisions_on_the_log_scale() -> None:
    t = EfficiencyTable(np.zeros((3, 1), np.float32), np.array([0.0, 1.0, 2048.0]), np.ones(3),
                        d_lo=0, d_hi=2048, decision_bins=12, log_decisions=True)
    assert t.dbin(CANDS).tolist() == [0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]


def test_replay_estimates_policies_from_uniformly_explored_classes() -> None:
    wl = ReadaheadWorkload(seed=4)
    x, seq = wl.states(20000)
    d = wl.rng.choice(CANDS, len(x))
    e = wl.efficiency(d, seq)
    best = np.where(seq, 2048.0, 0.0)
    got = {r.policy: r for r in replay(x, d, e, {"static 32": np.full(len(x), 32.0),
                                                 "best": best}, CANDS)}
    assert 0.05 < got["best"].matched / len(x) < 0.1  # about 1 in 13
    for name, pol in (("static 32", np.full(len(x), 32.0)), ("best", best)):
        truth = np.exp(np.mean(np.log(ReadaheadWorkload(seed=9).efficiency(pol, seq))))
        assert got[name].geomean == pytest.approx(truth, rel=0.08)
    assert got["best"].geomean > 1.3 * got["static 32"].geomean


def test_config_learner_key_takes_a_known_model_class_only() -> None:
    c = cfg.loads('[proxy.readahead]\nlearn = true\nlearner = "tree"\n')
    assert c.proxies["readahead"].learner == "tree"
    assert cfg.loads("[proxy.readahead]\nlearn = true\n").proxies["readahead"].learner == "linear"
    with pytest.raises(cfg.ConfigError, match='learner: expected "linear", "tree", "choice"'):
        cfg.loads('[proxy.readahead]\nlearner = "forest"\n')


def test_tree_fit_honours_the_bindings_tensor_names() -> None:
    reg = ModelRegistry(cfg.loads('[proxy.readahead]\ninput = "x"\noutput = "window"\n'))
    b = reg.bind(readahead_schema())
    learner = Learner(b, model_class="tree")
    loop = LearningLoop(learner, reg, min_samples=256, min_new=1)
    _explored(loop, ReadaheadWorkload(seed=5), 1000)
    fit = learner.fit(256)
    assert fit is not None
    sess = ort.InferenceSession(fit.to_onnx(b))
    assert [i.name for i in sess.get_inputs()] == ["x"]
    assert [o.name for o in sess.get_outputs()] == ["window"]
