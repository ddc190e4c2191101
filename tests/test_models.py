"""The ONNX models kmlbus builds load in the installed onnxruntime and compute what they say."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmlbus.bus import models


def run(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(models.to_bytes(m), providers=["CPUExecutionProvider"])
    return np.asarray(s.run(None, {s.get_inputs()[0].name: x})[0])


def test_pinned_opset_and_ir_version() -> None:
    m = models.sample_good_model()
    assert m.ir_version == models.IR_VERSION
    assert [(o.domain, o.version) for o in m.opset_import] == [("", models.OPSET)]


def test_sample_good_model_is_one_plus_63_seq_ratio() -> None:
    x = np.array([[0.0, 5, 7], [0.5, 1, 1], [1.0, 64, -3]], dtype=np.float32)
    np.testing.assert_allclose(run(models.sample_good_model(), x)[:, 0], [1.0, 32.5, 64.0])


def test_sample_bad_and_inverted_models() -> None:
    x = np.array([[0.0, 1, 1], [1.0, 1, 1]], dtype=np.float32)
    np.testing.assert_allclose(run(models.sample_bad_model(), x)[:, 0], [64.0, 64.0])
    np.testing.assert_allclose(run(models.sample_inverted_model(), x)[:, 0], [64.0, 1.0])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-100, 100, width=32), min_size=1, max_size=8),
       st.floats(-100, 100, width=32), st.integers(1, 16))
def test_linear_model_matches_numpy(w: list[float], b: float, n: int) -> None:
    x = np.random.default_rng(n).uniform(-1, 1, (n, len(w))).astype(np.float32)
    got = run(models.linear_model(w, b), x)
    assert got.shape == (n, 1)
    want = x @ np.asarray(w, dtype=np.float32) + np.float32(b)
    np.testing.assert_allclose(got[:, 0], want, rtol=1e-4, atol=1e-3)


def test_linear_model_rejects_wrong_width() -> None:
    with pytest.raises(ValueError, match="2 weights for 3 features"):
        models.linear_model([1, 2], 0, 3)


@pytest.mark.parametrize("kind", ["width", "dtype", "output", "rank"])
def test_mismatched_models_are_valid_onnx(kind: str) -> None:
    m = models.mismatched_model(kind)  # type: ignore[arg-type]
    onnx.checker.check_model(m)
    ort.InferenceSession(models.to_bytes(m), providers=["CPUExecutionProvider"])


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    p = models.save(models.sample_good_model(), tmp_path / "sub" / "m.onnx")
    assert p.read_bytes() == models.to_bytes(models.sample_good_model())
    assert [q.name for q in p.parent.iterdir()] == ["m.onnx"]


def test_main_writes_the_sample_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert models.main([str(tmp_path)]) == 0
    assert sorted(q.name for q in tmp_path.iterdir()) == [
        "sample_bad.onnx", "sample_good.onnx", "sample_inverted.onnx"]
    assert models.main([]) == 2


@pytest.mark.parametrize("module", ["kmlbus.bus.daemon", "kmlbus.tools.cli"])
def test_the_daemon_and_the_cli_start_without_importing_onnx(module: str) -> None:
    # onnx (with ml_dtypes) costs ~1 s of CPU to import on the host and ~30 s in
    # a TCG guest; only building a model needs it, so starting must not.
    import subprocess
    import sys

    code = f"import sys, {module}; print('onnx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_a_built_model_still_checks_and_loads() -> None:
    m = models.linear_model([1.0, 2.0], 0.5)
    onnx.checker.check_model(m)
    sess = ort.InferenceSession(models.to_bytes(m))
    y = sess.run(None, {models.INPUT_NAME: np.array([[1.0, 1.0]], dtype=np.float32)})[0]
    assert float(y[0, 0]) == pytest.approx(3.5)
