"""The tree placement learner finds each region's lifetime class from death-time feedback alone.

``Regions`` stands in for kmlbus-lsd's placement proxy: 64 regions, a hidden
hot share, features as the kernel publishes them (region idle time and write
rate, noisy), and the kernel's feedback formula for a block placed in stream
*s* that lived in class *c*: 1 - |s - c| / (streams - 1).  It lives in the test:
the learner must not know the formula.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from kmlbus.bus import config as cfg
from kmlbus.bus.config import ConfigError, FieldSchema, ProxySchema
from kmlbus.bus.learner import LearningLoop
from kmlbus.bus.placefit import PlaceLearner
from kmlbus.bus.registry import ModelRegistry
from kmlbus.contract import spec
from kmlbus.wire import codec

SAMPLE = codec.struct_dtype("sample")
FEEDBACK = codec.struct_dtype("feedback")
ARM_DEFAULT = spec.load().enums["arm"].value("default")
ARM_MODEL = spec.load().enums["arm"].value("model")
STREAMS = 3
FEATURES = ("count", "age", "first", "region_idle", "region_rate")


def place_schema() -> ProxySchema:
    scales = (1, 1000, 1, 1000, 1000)
    return ProxySchema("lsd0.place", tuple(FieldSchema(n, s) for n, s in zip(FEATURES, scales)),
                       FieldSchema("stream", 1, 0, STREAMS - 1), 1024)


@dataclass
class Regions:
    """Writes to 64 regions; a region's heat decides how long its blocks live."""

    seed: int = 3
    n: int = 64

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        # lifetime class per region: 2 (hot) for a quarter, 1 for a quarter, 0 (cold) for half
        self.cls = np.repeat([2, 1, 0, 0], self.n // 4)
        self.seq = 0

    def batch(self, n: int, explore: float) -> tuple[npt.NDArray[np.void], npt.NDArray[np.void]]:
        """n decisions (default: stream 0) and their feedback; *explore* of them random streams."""
        keys = self.rng.integers(0, self.n, n)
        c = self.cls[keys]
        idle = np.array([5.0, 60.0, 700.0])[c] * self.rng.lognormal(0, 0.4, n)
        rate = np.array([900.0, 300.0, 20.0])[c] * self.rng.lognormal(0, 0.4, n)
        r = np.zeros(n, dtype=SAMPLE)
        r["seq"] = self.seq + 1 + np.arange(n)
        self.seq += n
        r["key"] = keys
        r["features"][:, 0] = self.rng.integers(1, 4, n)
        r["features"][:, 1] = self.rng.integers(0, 2000, n)
        r["features"][:, 3] = idle
        r["features"][:, 4] = rate
        model = self.rng.random(n) < explore
        d = np.where(model, self.rng.integers(0, STREAMS, n), 0)
        fb = np.zeros(n, dtype=FEEDBACK)
        fb["seq"] = r["seq"]
        fb["key"] = keys
        fb["decision"] = d
        fb["arm"] = np.where(model, ARM_MODEL, ARM_DEFAULT)
        fb["efficiency"] = 1000 - 1000 * np.abs(d - c) // (STREAMS - 1)
        return r, fb


def test_tree_fit_places_each_region_in_its_lifetime_class() -> None:
    w = Regions()
    learner = PlaceLearner(cfg.bind(place_schema()))
    r, fb = w.batch(6000, explore=0.2)
    learner.observe_telemetry(r)
    learner.observe_feedback(fb)
    fit = learner.fit(min_samples=256)
    assert fit is not None
    # the default (always stream 0) is right only for the cold half
    assert fit.observed < 0.8
    # the table's estimate (coarse quantile buckets mix classes near their edges)
    assert fit.estimated.efficiency > fit.observed + 0.2 and fit.estimated.coverage > 0.9
    reg = ModelRegistry()
    reg.bind(place_schema(), load=False)
    reg.install("lsd0.place", fit.to_onnx(cfg.bind(place_schema())), "test")
    test, _ = Regions(seed=9).batch(2000, explore=0.0)
    x = test["features"][:, :5].astype(np.float32) / np.array([1, 1000, 1, 1000, 1000], np.float32)
    chosen = np.rint(reg.predict("lsd0.place", x)).reshape(-1)
    right = chosen == Regions(seed=9).cls[test["key"]]
    assert right.mean() > 0.9, right.mean()


def test_tree_fit_waits_for_explored_decisions() -> None:
    learner = PlaceLearner(cfg.bind(place_schema()))
    r, fb = Regions().batch(4000, explore=0.0)  # the default's decisions only
    learner.observe_telemetry(r)
    learner.observe_feedback(fb)
    assert learner.fit(min_samples=256) is None


def test_learning_loop_installs_the_tree_and_then_keeps_it() -> None:
    b = cfg.bind(place_schema())
    reg = ModelRegistry()
    reg.bind(place_schema(), load=False)
    loop = LearningLoop(PlaceLearner(b), reg, every_s=0.0, min_samples=256, min_new=1)
    w = Regions()
    r, fb = w.batch(5000, explore=0.2)
    loop.telemetry(r)
    loop.feedback(fb)
    assert loop.tick(1.0) is not None and reg.has_model("lsd0.place") and loop.fits == 1
    r, fb = w.batch(500, explore=0.2)
    loop.telemetry(r)
    loop.feedback(fb)
    loop.tick(2.0)
    assert loop.fits + loop.kept == 2  # refitted: installed again or kept, never lost


def test_tree_needs_a_small_bounded_range() -> None:
    wide = ProxySchema("p", (FieldSchema("a", 1),), FieldSchema("v", 1, 0, 4096), 8)
    with pytest.raises(ValueError, match="at most 65 values"):
        PlaceLearner(cfg.bind(wide))


def test_learner_key_in_the_config(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[proxy.a]\nlearn = true\nlearner = 'choice'\n[proxy.b]\nlearn = true\n")
    c = cfg.load(p)
    assert c.proxies["a"].learner == "choice" and c.proxies["b"].learner == "linear"
    p.write_text("[proxy.a]\nlearner = 'forest'\n")
    with pytest.raises(ConfigError, match=r'proxy\.a\.learner.*"linear", "tree", "choice"'):
        cfg.load(p)
