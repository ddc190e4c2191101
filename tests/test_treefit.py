"""treefit learns a non-linear policy from (features, decision, efficiency) and exports it to ONNX."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from kmlbus.bus.treefit import candidate_windows, fit_policy


def _synthetic(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Readahead-like truth: sequential streams gain with the window, random mmap ones lose."""
    rng = np.random.default_rng(seed)
    seq = (rng.random(n) < 0.5).astype(np.float32)
    x = np.zeros((n, 8), dtype=np.float32)
    x[:, 0] = np.clip(seq + rng.normal(0, 0.1, n), 0, 1)
    x[:, 2] = 1 - seq                       # mmap flag on the random streams
    x[:, 7] = rng.random(n)                 # noise
    w = rng.integers(0, 2049, n).astype(np.float64)
    lw = np.log2(1 + w)
    eff = np.where(seq > 0, 2 + lw, 10 / (1 + lw)) + rng.normal(0, 0.2, n)
    return x, w, eff


def test_candidates_span_the_bounds_in_powers_of_two() -> None:
    assert candidate_windows(0, 2048).tolist() == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]
    assert candidate_windows(1, 100).tolist() == [1, 2, 4, 8, 16, 32, 64, 100]


def test_policy_picks_big_windows_for_sequential_and_zero_for_random_mmap() -> None:
    x, w, eff = _synthetic(3000)
    fitted = fit_policy(x, w, eff, lo=0, hi=2048)
    sess = ort.InferenceSession(fitted.onnx)
    assert [i.name for i in sess.get_inputs()] == ["features"]
    assert [o.name for o in sess.get_outputs()] == ["value"]
    xt, _, _ = _synthetic(400, seed=2)
    got = sess.run(None, {"features": xt})[0]
    assert got.shape == (400, 1)
    seq = xt[:, 2] == 0
    assert np.median(got[seq, 0]) >= 1024
    assert np.median(got[~seq, 0]) <= 16
    assert fitted.predicted_gain > 1.0


def test_too_few_samples_is_an_error_naming_the_count() -> None:
    x, w, eff = _synthetic(10)
    try:
        fit_policy(x, w, eff, lo=0, hi=2048)
    except ValueError as e:
        assert "10 samples" in str(e)
    else:
        raise AssertionError("fit_policy accepted 10 samples")
