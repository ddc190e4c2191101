"""The learner beats the sample workload's default from feedback alone.

``SampleWorkload`` mirrors kernel/samples/kmlbus_sample.ko in Python (see
"The sample workload" in the design brief): 64 streams with a hidden
sequentiality s_k, noisy features, optimum w* = 1 + round(63 s_k),
efficiency = 1000 - 1000 |w - w*| / 64, default window 8.  It lives in the
test, not in the package: the learner must not know the workload's formula.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmlbus.bus import config as cfg
from kmlbus.bus import models
from kmlbus.bus.config import FieldSchema, ProxySchema
from kmlbus.bus.dispatcher import Dispatcher
from kmlbus.bus.fixedpoint import features_to_float
from kmlbus.bus.learner import EfficiencyTable, Learner, perturb
from kmlbus.bus.registry import ModelRegistry
from kmlbus.contract import spec
from kmlbus.wire import codec

SAMPLE = codec.struct_dtype("sample")
FEEDBACK = codec.struct_dtype("feedback")
REC = codec.struct_dtype("rec")
ARM_DEFAULT = spec.load().enums["arm"].value("default")
ARM_MODEL = spec.load().enums["arm"].value("model")


def sample_schema() -> ProxySchema:
    return ProxySchema("sample", tuple(FieldSchema(n, 1000) for n in models.SAMPLE_FEATURES),
                       FieldSchema("window", 1, 1, 64), 64)


@dataclass
class SampleWorkload:
    """A Python stand-in for the sample module's decision loop."""

    seed: int = 1
    nkeys: int = 64
    noise: float = 0.05

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.s = self.rng.uniform(0, 1, self.nkeys)
        self.seq = 0

    def features(self, n: int) -> tuple[npt.NDArray[np.void], npt.NDArray[np.int64]]:
        """n telemetry samples (decision not yet set) and the true optimum of each."""
        keys = self.rng.integers(0, self.nkeys, n)
        r = np.zeros(n, dtype=SAMPLE)
        r["seq"] = self.seq + 1 + np.arange(n)
        self.seq += n
        r["key"] = keys
        f0 = np.clip(self.s[keys] + self.rng.normal(0, self.noise, n), 0, 1)
        r["features"][:, 0] = np.rint(f0 * 1000)
        r["features"][:, 1] = self.rng.integers(1, 65, n) * 1000
        r["features"][:, 2] = self.rng.integers(0, 1001, n)
        wstar = 1 + np.rint(63 * self.s[keys]).astype(np.int64)
        return r, wstar

    @staticmethod
    def efficiency(w: npt.NDArray[np.int64], wstar: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        return np.asarray(1000 - (1000 * np.abs(w - wstar)) // 64, dtype=np.int64)

    def run(self, n: int, explore: float, policy: npt.NDArray[np.int64] | None = None
            ) -> tuple[npt.NDArray[np.void], npt.NDArray[np.void]]:
        """Telemetry and feedback of n decisions: default 8, or explored on a share."""
        r, wstar = self.features(n)
        w = np.full(n, 8, dtype=np.int64)
        arm = np.full(n, ARM_DEFAULT, dtype=np.uint8)
        ex = self.rng.uniform(0, 1, n) < explore
        cand = self.rng.integers(1, 65, n) if policy is None else policy
        w[ex] = cand[ex]
        arm[ex] = ARM_MODEL
        r["decision"] = w
        r["arm"] = arm
        fb = np.zeros(n, dtype=FEEDBACK)
        fb["seq"], fb["key"], fb["decision"], fb["arm"] = r["seq"], r["key"], w, arm
        fb["efficiency"] = self.efficiency(w, wstar)
        return r, fb


def mean_efficiency(wl: SampleWorkload, decide: object, n: int = 20000) -> float:
    r, wstar = wl.features(n)
    w = decide(r)  # type: ignore[operator]
    return float(wl.efficiency(np.asarray(w, dtype=np.int64), wstar).mean())


@pytest.mark.parametrize("explore", [0.1, 0.3])
def test_learned_model_beats_the_default_on_the_sample_workload(explore: float) -> None:
    b = cfg.bind(sample_schema())
    learner = Learner(b)
    wl = SampleWorkload(seed=7)
    for _ in range(40):  # 40 batches of 500, a share explored with random windows
        tel, fb = wl.run(500, explore=explore)
        learner.observe_feedback(fb[::-1])  # order does not matter for the join
        learner.observe_telemetry(tel)
    assert learner.n_samples == 20000

    reg = ModelRegistry()
    d = Dispatcher(reg, [sample_schema()])
    result = learner.update(reg)
    assert result is not None
    fit, lm = result
    assert lm.source.startswith("learned")

    def model_policy(r: npt.NDArray[np.void]) -> npt.NDArray[np.int32]:
        out = d.handle_telemetry("sample", r)  # latest per key: give each key its own row
        by_key = dict(zip(out["key"].tolist(), out["value"].tolist()))
        return np.array([by_key[k] for k in r["key"].tolist()], dtype=np.int32)

    def per_row_policy(r: npt.NDArray[np.void]) -> npt.NDArray[np.int64]:
        y = reg.predict("sample", features_to_float(r, b))
        return np.clip(np.rint(y), 1, 64).astype(np.int64)

    fresh = SampleWorkload(seed=7)  # same streams, new draws
    fresh.rng = np.random.default_rng(99)
    default = mean_efficiency(fresh, lambda r: np.full(len(r), 8))
    learned = mean_efficiency(fresh, per_row_policy)
    good_model = ModelRegistry()
    good_model.bind(sample_schema(), load=False)
    good_model.install("sample", models.to_bytes(models.sample_good_model()))
    good = mean_efficiency(fresh, lambda r: np.clip(np.rint(
        good_model.predict("sample", features_to_float(r, b))), 1, 64))
    assert learned > default + 200, (learned, default, fit)
    assert learned > good - 20, (learned, good, fit)  # near the hand-made optimum
    # the learner found seq_ratio and (nearly) nothing else
    assert fit.weights[0] == pytest.approx(63, rel=0.15)
    assert abs(fit.weights[1]) < 1 and abs(fit.weights[2]) < 10
    # its own estimate agrees with the truth to within a few percent
    assert fit.estimated.efficiency * 1000 == pytest.approx(learned, rel=0.05)
    assert fit.estimated.coverage > 0.3
    # the dispatcher path serves the same model
    small = SampleWorkload(seed=7)
    r, _ = small.features(64)
    np.testing.assert_array_equal(model_policy(r[:1]), per_row_policy(r[:1]))


def test_without_exploration_the_learner_reproduces_the_default() -> None:
    learner = Learner(cfg.bind(sample_schema()))
    wl = SampleWorkload(seed=3)
    tel, fb = wl.run(5000, explore=0.0)
    learner.observe_telemetry(tel)
    learner.observe_feedback(fb)
    fit = learner.fit()
    assert fit is not None
    x = features_to_float(tel, learner.binding)
    np.testing.assert_allclose(fit.predict(x), 8.0, atol=0.5)


def test_fit_needs_enough_samples() -> None:
    learner = Learner(cfg.bind(sample_schema()))
    assert learner.fit() is None
    assert learner.update(ModelRegistry()) is None


def test_join_is_by_seq_and_pending_buffers_are_bounded() -> None:
    learner = Learner(cfg.bind(sample_schema()), pending=100)
    wl = SampleWorkload(seed=5)
    tel, fb = wl.run(300, explore=0.5)
    assert learner.observe_telemetry(tel[:150]) == 0
    assert learner.unmatched_dropped == 50  # oldest 50 telemetry rows gone
    assert learner.observe_feedback(fb[100:200]) == 50  # seq 101..150 match
    assert learner.n_samples == 50
    x, d, e, arm = learner.data()
    np.testing.assert_array_equal(d, fb["decision"][100:150])
    np.testing.assert_allclose(e, fb["efficiency"][100:150] / 1000)
    np.testing.assert_array_equal(arm, fb["arm"][100:150])
    np.testing.assert_allclose(x, features_to_float(tel[100:150], learner.binding))


def test_ring_keeps_the_newest_rows() -> None:
    learner = Learner(cfg.bind(sample_schema()), capacity=10)
    learner.add(np.zeros((25, 3)), np.arange(25), np.zeros(25))
    assert learner.n_samples == 10
    np.testing.assert_array_equal(learner.data()[1], np.arange(15, 25))


def test_exported_model_uses_configured_tensor_names() -> None:
    text = '[proxy.sample]\ninput = "x"\noutput = "y"\nfeatures = ["seq_ratio"]\n'
    c = cfg.loads(text)
    reg = ModelRegistry(c)
    b = reg.bind(sample_schema())
    learner = Learner(b)
    rng = np.random.default_rng(0)
    s = rng.uniform(0, 1, 4000)
    d = rng.integers(1, 65, 4000)
    e = 1000 - 1000 * np.abs(d - (1 + np.rint(63 * s))) // 64
    learner.add(s[:, None], d, e)
    res = learner.update(reg)
    assert res is not None
    lm = res[1]
    assert (lm.input_name, lm.output_name) == ("x", "y")
    assert reg.predict("sample", [[1.0]])[0] == pytest.approx(64, abs=4)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0.05, 1.0))
def test_perturb_stays_in_bounds_and_keeps_keys(seed: int, spread: float) -> None:
    b = cfg.bind(sample_schema())
    recs = np.zeros(64, dtype=REC)
    recs["key"] = np.arange(64)
    recs["value"] = np.random.default_rng(seed).integers(1, 65, 64)
    recs["ttl_ms"] = 200
    out = perturb(recs, b, np.random.default_rng(seed), spread)
    assert ((out["value"] >= 1) & (out["value"] <= 64)).all()
    np.testing.assert_array_equal(out["key"], recs["key"])
    assert (out["ttl_ms"] == 200).all()


def test_efficiency_table_estimate_and_coverage() -> None:
    x = np.array([[0.0], [0.0], [0.0], [1.0], [1.0], [1.0]], dtype=np.float32)
    d = np.array([1.0, 1.0, 1.0, 60.0, 60.0, 60.0])
    e = np.array([0.9, 0.8, 1.0, 0.2, 0.4, 0.3])
    t = EfficiencyTable(x, d, e, d_lo=1, d_hi=64, bins=2, target_per_bucket=1, min_cell=3)
    est = t.estimate(np.array([[0.0], [1.0]], dtype=np.float32), np.array([1.0, 1.0]))
    assert est.coverage == 0.5 and est.efficiency == pytest.approx(0.9)
    bx, bd, bw = t.best_per_bucket()
    assert sorted(bd.tolist()) == [1.0, 60.0] and bw.tolist() == [3.0, 3.0]


def test_learning_loop_paces_refits_and_swaps_the_model() -> None:
    from kmlbus.bus.learner import LearningLoop

    reg = ModelRegistry()
    b = reg.bind(sample_schema())
    loop = LearningLoop(Learner(b), reg, every_s=5.0, min_samples=256, min_new=100)
    wl = SampleWorkload(seed=2)
    tel, fb = wl.run(200, explore=0.5)
    loop.telemetry(tel)
    loop.feedback(fb)
    assert loop.tick(0.0) is None  # 200 < min_samples: nothing installed
    assert not reg.has_model("sample")
    tel, fb = wl.run(2000, explore=0.5)
    loop.telemetry(tel)
    loop.feedback(fb)
    assert loop.tick(1.0) is None  # the failed attempt at 0.0 still paces
    fit = loop.tick(5.0)
    assert fit is not None and reg.has_model("sample") and loop.fits == 1
    tel, fb = wl.run(50, explore=0.5)
    loop.telemetry(tel)
    loop.feedback(fb)
    assert loop.tick(20.0) is None  # only 50 new decisions
    tel, fb = wl.run(100, explore=0.5)
    loop.telemetry(tel)
    loop.feedback(fb)
    assert loop.tick(21.0) is not None and loop.fits == 2


def _peaked_loop(tmp_path: object = None, **kw: object) -> tuple[object, ModelRegistry]:
    """A loop whose data has one feature bucket and an efficiency peak at decision 40."""
    from kmlbus.bus.learner import LearningLoop

    reg = ModelRegistry()
    b = reg.bind(sample_schema())
    learner = Learner(b)
    rng = np.random.default_rng(5)
    d = rng.integers(1, 65, 4000)
    x = np.full((len(d), 3), 0.5, dtype=np.float32)
    learner.add(x, d, 1000 - 20 * np.abs(d - 40), np.full(len(d), ARM_MODEL))
    return LearningLoop(learner, reg, min_samples=256, min_new=1, **kw), reg  # type: ignore[arg-type]


def test_a_refit_replaces_the_served_model_only_when_estimated_better() -> None:
    from kmlbus.bus.learner import LearningLoop

    loop, reg = _peaked_loop()
    assert isinstance(loop, LearningLoop)
    reg.install("sample", models.to_bytes(models.linear_model([0, 0, 0], 10.0)), "window 10")
    fit = loop.tick(0.0)
    assert fit is not None and loop.fits == 1 and loop.kept == 0
    assert reg.model("sample").source.startswith("learned")  # type: ignore[union-attr]
    assert 36 <= fit.bias + 0.5 * sum(fit.weights) <= 41  # the peak's decision bin

    loop2, reg2 = _peaked_loop()
    assert isinstance(loop2, LearningLoop)
    reg2.install("sample", models.to_bytes(models.linear_model([0, 0, 0], 40.0)), "window 40")
    assert loop2.tick(0.0) is None and loop2.kept == 1 and loop2.fits == 0
    assert reg2.model("sample").source == "window 40"  # type: ignore[union-attr]
    served = loop2.served_estimate()
    # the served window 40 shares the fit's cell (36.4..40.4): the cell's mean, full coverage
    assert served is not None and served.coverage == 1.0
    assert served.efficiency == pytest.approx(loop2.table.estimate(  # type: ignore[union-attr]
        np.full((1, 3), 0.5, np.float32), np.array([38.0])).efficiency)


def test_the_loop_does_not_fit_before_the_model_arm_decided_enough() -> None:
    from kmlbus.bus.learner import LearningLoop

    reg = ModelRegistry()
    loop = LearningLoop(Learner(reg.bind(sample_schema())), reg, min_samples=256, min_new=1)
    wl = SampleWorkload(seed=4)
    tel, fb = wl.run(5000, explore=0.0)  # the default's decisions only (emergency)
    loop.telemetry(tel)
    loop.feedback(fb)
    assert loop.tick(0.0) is None and not reg.has_model("sample")
    tel, fb = wl.run(2000, explore=0.2)
    loop.telemetry(tel)
    loop.feedback(fb)
    assert loop.learner.n_explored >= 256
    assert loop.tick(10.0) is not None and reg.has_model("sample")


def test_score_estimates_the_served_model_per_sample_and_says_nan_where_unexplored() -> None:
    from kmlbus.bus.learner import LearningLoop

    loop, reg = _peaked_loop()
    assert isinstance(loop, LearningLoop)
    r = np.zeros(4, dtype=SAMPLE)
    r["features"][:, :3] = 500
    assert np.isnan(loop.score(r)).all()  # no table yet
    reg.install("sample", models.to_bytes(models.linear_model([0, 0, 0], 30.0)), "window 30")
    loop.tick(0.0)  # builds the table; a fit (window ~40) replaces window 30
    reg.install("sample", models.to_bytes(models.linear_model([0, 0, 0], 30.0)), "window 30")
    est = loop.score(r)
    # cell of decision 30 (bins of 63/16 ~ 3.9 wide: decisions 28.6..32.5), in feedback scale
    assert est == pytest.approx(np.full(4, 1000 - 20 * 10), abs=45)
    far = r.copy()
    far["features"][:, 0] = 0  # features nobody decided at: no estimate
    assert np.isnan(loop.score(far)).all()


def test_explore_is_uniform_without_a_model_and_perturbed_with_one() -> None:
    from kmlbus.bus.learner import LearningLoop

    reg = ModelRegistry()
    b = reg.bind(sample_schema())
    loop = LearningLoop(Learner(b), reg, spread=0.1, rng=np.random.default_rng(3))
    keys = np.arange(64, dtype=np.uint32)
    out = np.concatenate([loop.explore(keys, None) for _ in range(50)])
    assert set(out["key"].tolist()) == set(range(64))
    assert out["value"].min() == 1 and out["value"].max() == 64  # the whole range, both ends
    assert (out["ttl_ms"] == b.ttl_ms).all()
    recs = np.zeros(64, dtype=REC)
    recs["key"], recs["value"], recs["ttl_ms"] = keys, 32, 100
    moved = loop.explore(keys, recs)
    assert (np.abs(moved["value"] - 32) <= 7).all() and len(set(moved["value"].tolist())) > 3
    assert (moved["key"] == keys).all() and (moved["ttl_ms"] == 100).all()


def test_explore_without_bounds_or_model_sends_nothing_and_perturbs_relatively() -> None:
    from kmlbus.bus.learner import LearningLoop

    schema = ProxySchema("sample", tuple(FieldSchema(n, 1000) for n in models.SAMPLE_FEATURES),
                         FieldSchema("window", 1), 64)
    reg = ModelRegistry()
    loop = LearningLoop(Learner(reg.bind(schema)), reg, spread=0.5, rng=np.random.default_rng(1))
    assert len(loop.explore(np.arange(4, dtype=np.uint32), None)) == 0
    recs = np.zeros(100, dtype=REC)
    recs["value"] = 1000
    v = loop.explore(np.arange(100, dtype=np.uint32), recs)["value"]
    assert (np.abs(v - 1000) <= 500).all() and v.std() > 100


def test_learned_models_are_saved_atomically(tmp_path: object) -> None:
    from pathlib import Path

    from kmlbus.bus.learner import LearningLoop

    target = Path(str(tmp_path)) / "learned.onnx"
    loop, reg = _peaked_loop(save_to=target)
    assert isinstance(loop, LearningLoop)
    fit = loop.tick(0.0)
    assert fit is not None and target.exists()
    assert [p.name for p in target.parent.iterdir()] == ["learned.onnx"]  # no temp file left
    other = ModelRegistry()
    other.bind(sample_schema(), load=False)
    other.install("sample", target.read_bytes())
    x = np.full((1, 3), 0.5, dtype=np.float32)
    assert other.predict("sample", x) == pytest.approx(reg.predict("sample", x))


def test_a_background_refit_is_collected_by_a_later_tick() -> None:
    from kmlbus.bus.learner import LearningLoop

    loop, reg = _peaked_loop(background=True)
    assert isinstance(loop, LearningLoop)
    assert loop.tick(0.0) is None  # started, not finished (or not yet collected)
    assert loop._job is not None
    fit = loop.wait()
    assert fit is not None and loop.fits == 1 and reg.has_model("sample")
    assert loop.tick(0.1) is None and loop._job is None  # nothing due, nothing running


def test_a_background_refit_failure_reaches_the_caller() -> None:
    from kmlbus.bus.learner import LearningLoop
    from kmlbus.bus.registry import UnknownProxyError

    loop, reg = _peaked_loop(background=True)
    assert isinstance(loop, LearningLoop)
    # the registry does not know this proxy: its install raises in the worker thread
    loop.learner.binding = dataclasses.replace(loop.binding, proxy="ghost")
    loop.tick(0.0)
    assert loop._job is not None
    loop._job.join()
    with pytest.raises(UnknownProxyError, match="ghost"):
        loop.tick(1.0)
    assert not reg.has_model("sample")


def test_feedback_of_unrecorded_decisions_seq_0_is_not_kept_waiting_for_a_join() -> None:
    # sample-period N: the kernel keeps the feedback of every decision, but only every Nth
    # has a sample (and a seq); the others come with seq 0 and can never be joined
    learner = Learner(cfg.bind(sample_schema()), pending=100)
    wl = SampleWorkload(seed=5)
    tel, fb = wl.run(400, explore=0.5)
    fb = fb.copy()
    fb["seq"][fb["seq"] % 4 != 0] = 0
    assert learner.observe_feedback(fb) == 0
    assert learner.observe_telemetry(tel[3::4]) == 100  # every recorded decision joined
    assert learner.unmatched_dropped == 0, "seq-0 feedback took room from joinable rows"
