"""The property-based test kit (kmlbus.testing) on the host, against the user-space stand-in.

The strategies are checked against the schema they are generated from; the
state machine runs against the stand-in of the module (the same machine runs
against the real module in tests/vm/test_kit_live.py), and is shown to fail
when the stand-in's gate is broken the ways the invariants forbid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import run_state_machine_as_test

from kmlbus.contract import spec as kspec
from kmlbus.testing import profiles
from kmlbus.testing import strategies as ks
from kmlbus.testing.machine import Link, ProxyMachine, proxy_machine
from kmlbus.testing.schema import Field, ProxySchema
from tests.support import gate as mgate
from tests.support import standin as sd

profiles.load_profile()
SPEC = kspec.load()
MAX_TTL = int(SPEC.consts["max-ttl-ms"])
SAMPLE = ProxySchema(1, "sample", 64, (Field("a", 1000, 0, 1000), Field("b", 1)), Field("w", 1, 1, 64), 1000)
UNBOUNDED = ProxySchema(2, "u", 4, (), Field("v", 1), 1)


@given(st.sampled_from([SAMPLE, UNBOUNDED]).flatmap(lambda s: st.tuples(st.just(s), ks.recommendations(s))))
def test_recommendations_have_valid_keys_and_ttls(case: tuple[ProxySchema, list[tuple[int, int, int]]]) -> None:
    schema, recs = case
    assert recs
    for k, v, t in recs:
        assert 0 <= k < schema.nkeys and 1 <= t <= MAX_TTL and -(1 << 31) <= v < (1 << 31)


def test_recommendation_values_reach_beyond_both_bounds() -> None:
    seen: set[str] = set()

    @settings(max_examples=300, database=None)
    @given(ks.rec_values(SAMPLE))
    def run(v: int) -> None:
        seen.add("below" if v < 1 else "above" if v > 64 else "inside")

    run()
    assert seen == {"below", "inside", "above"}


@given(ks.bad_recommendations(SAMPLE))
def test_bad_batches_hold_exactly_the_rows_the_kernel_refuses(recs: list[tuple[int, int, int]]) -> None:
    bad = [r for r in recs if r[0] >= SAMPLE.nkeys or not 1 <= r[2] <= MAX_TTL]
    assert len(bad) >= 1


@given(ks.feature_vectors(SAMPLE))
def test_features_follow_their_declared_bounds(f: list[int]) -> None:
    assert len(f) == 2 and 0 <= f[0] <= 1000


@given(ks.samples(SAMPLE), ks.feedback_records(SAMPLE))
def test_samples_and_feedback_are_spec_structs_within_the_schema(s: np.ndarray, fb: np.ndarray) -> None:
    assert s.dtype.itemsize == SPEC.structs["sample"].size and fb.dtype.itemsize == SPEC.structs["feedback"].size
    assert np.all(s["key"] < 64) and np.all((s["decision"] >= 1) & (s["decision"] <= 64))
    assert np.all(s["features"][:, 0] <= 1000) and np.all(s["features"][:, 2:] == 0)
    assert np.all(np.diff(s["seq"].astype(np.int64)) > 0)
    assert np.all(np.abs(fb["efficiency"]) <= 2000)


def test_schema_is_read_from_the_kernels_description() -> None:
    k = sd.StandinKernel()
    with k.open() as link:
        s = ProxySchema.from_get(link.proxy("sample"))
    assert (s.name, s.nkeys, [f.name for f in s.features]) == ("sample", 64, ["seq_ratio", "req_size", "noise"])
    assert (s.recommendation.min, s.recommendation.max, s.recommendation.clamp(99)) == (1, 64, 64)


@dataclass
class StandinTarget:
    """The stand-in module as the machine's target, in simulated time."""

    kernel: sd.StandinKernel = field(default_factory=lambda: sd.StandinKernel(rate=2000))

    def connect(self, groups: Sequence[str] = ()) -> Link:
        return self.kernel.open(groups)

    def decide(self, seconds: float) -> None:
        self.kernel.clock.advance(seconds)

    def now_ns(self) -> int:
        # time passes while the machine works, as on a real machine (the sample's timer
        # keeps deciding between requests): 5 ms per look at the clock
        t = self.kernel.clock.now_ns()
        self.kernel.clock.advance(0.005)
        return t


def _machine() -> type[ProxyMachine]:
    """The machine on a fresh stand-in for every example: a replayed example must meet the
    module as it was, or hypothesis reports a flaky test instead of the failure."""
    base = proxy_machine(StandinTarget(), "sample")

    class Fresh(base):  # type: ignore[valid-type,misc]
        def __init__(self) -> None:
            super().__init__()
            self.target = StandinTarget()

    return Fresh


def test_the_machine_passes_against_the_standin_and_judges_decisions() -> None:
    judged: list[int] = []
    shares: list[int] = []
    base = _machine()

    class Counting(base):  # type: ignore[valid-type,misc]
        def teardown(self) -> None:
            super().teardown()
            judged.append(self.judged)
            shares.extend(n for n, _m in self.collab.values())

    run_state_machine_as_test(Counting, settings=settings(max_examples=30, stateful_step_count=30,
                                                          deadline=None, database=None, derandomize=True))
    # the runs compared thousands of decisions with what was sent, collaboration included
    assert sum(judged) > 5000 and sum(shares) > 300, (sum(judged), sum(shares), str(judged))


def _broken_gate(kind: str) -> Any:
    real = mgate.gate_batch

    def gate(mode: str, fresh: Any, share: int, explore: int, draw: Any, clamped: Any = None) -> Any:
        if kind == "emergency":  # applies fresh recommendations in emergency too
            mode = "recommendation" if mode == "emergency" else mode
        elif kind == "share":  # gives the model every fresh decision in collaboration
            share = 1000 if mode == "collaboration" else share
        return real(mode, fresh, share, explore, draw, clamped) if clamped is not None else \
            real(mode, fresh, share, explore, draw)
    return gate


@pytest.mark.parametrize("kind", ["emergency", "share"])
def test_the_machine_finds_a_gate_that_breaks_an_invariant(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mgate, "gate_batch", _broken_gate(kind))
    with pytest.raises(AssertionError):
        run_state_machine_as_test(_machine(), settings=settings(
            max_examples=60, stateful_step_count=40, deadline=None, database=None, derandomize=True,
            phases=[Phase.generate], report_multiple_bugs=False))


def test_the_binomial_test_is_exact_on_small_cases() -> None:
    from kmlbus.testing.machine import binomial_two_sided
    assert binomial_two_sided(5, 10, 0.5) == pytest.approx(1.0)
    assert binomial_two_sided(0, 10, 0.5) == pytest.approx(2 / 1024)
    assert binomial_two_sided(100, 100, 0.5) < 1e-6 and binomial_two_sided(97, 100, 0.99) > 0.05


def test_profiles_scale_with_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(profiles.ENV, "soak")
    assert profiles.scaled(10) == 200 and profiles.load_profile() == "kmlbus-soak"
    monkeypatch.setenv(profiles.ENV, "nonsense")
    with pytest.raises(ValueError, match="expected one of"):
        profiles.load_profile()
    monkeypatch.setenv(profiles.ENV, "ci")
    profiles.load_profile()
