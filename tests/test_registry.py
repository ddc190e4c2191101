"""ModelRegistry: contract checks, isolation of bad models, atomic hot swap, file watch."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from kmlbus.bus import config as cfg
from kmlbus.bus import models
from kmlbus.bus.config import FieldSchema, ProxySchema
from kmlbus.bus.registry import (
    ModelContractError,
    ModelLoadError,
    ModelRegistry,
    ModelRuntimeError,
    NoModelError,
    UnknownProxyError,
    bind_all,
)


def sample_schema(name: str = "sample") -> ProxySchema:
    return ProxySchema(name, tuple(FieldSchema(n, 1000) for n in models.SAMPLE_FEATURES),
                       FieldSchema("window", 1, 1, 64), 64)


def registry_for(tmp_path: Path, **proxies: str) -> ModelRegistry:
    """A registry whose config maps proxy name -> model file name in tmp_path."""
    text = "".join(f'[proxy.{n}]\nmodel = "{m}"\n' for n, m in proxies.items())
    p = tmp_path / "bus.toml"
    p.write_text(text)
    return ModelRegistry(cfg.load(p))


def bump_mtime(p: Path) -> None:
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_good_model_loads_and_predicts(tmp_path: Path) -> None:
    models.save(models.sample_good_model(), tmp_path / "good.onnx")
    reg = registry_for(tmp_path, sample="good.onnx")
    reg.bind(sample_schema())
    assert reg.has_model("sample")
    y = reg.predict("sample", np.array([[0.0, 1, 1], [1.0, 0, 0], [0.5, 0, 0]]))
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, [1.0, 64.0, 32.5])


def test_session_is_single_threaded_cpu(tmp_path: Path) -> None:
    models.save(models.sample_good_model(), tmp_path / "good.onnx")
    reg = registry_for(tmp_path, sample="good.onnx")
    reg.bind(sample_schema())
    lm = reg.model("sample")
    assert lm is not None
    assert lm.session.get_providers() == ["CPUExecutionProvider"]
    assert lm.session.get_session_options().intra_op_num_threads == 1


@pytest.mark.parametrize("kind, tensor, expected, found", [
    ("width", "input 'features'", "tensor(float) [N, 3]", "tensor(float) [N, 4]"),
    ("dtype", "input 'features'", "tensor(float) [N, 3]", "tensor(double) [N, 3]"),
    ("output", "output 'value'", "[N, 1] or [N]", "tensor(float) [N, 2]"),
    ("rank", "input 'features'", "tensor(float) [N, 3]", "tensor(float) [N, 3, 1]"),
])
def test_mismatched_model_is_a_contract_error_naming_proxy_tensor_shapes(
        tmp_path: Path, kind: str, tensor: str, expected: str, found: str) -> None:
    models.save(models.mismatched_model(kind), tmp_path / "bad.onnx")  # type: ignore[arg-type]
    reg = registry_for(tmp_path, sample="bad.onnx")
    with pytest.raises(ModelContractError) as ei:
        reg.bind(sample_schema())
    msg = str(ei.value)
    assert ei.value.proxy == "sample"
    assert "proxy sample" in msg and tensor in msg and expected in msg and found in msg
    assert "\n" not in msg
    assert not reg.has_model("sample")
    assert reg.error("sample") is ei.value
    with pytest.raises(NoModelError):
        reg.predict("sample", np.zeros((1, 3)))


def test_feature_selection_changes_the_contract(tmp_path: Path) -> None:
    (tmp_path / "bus.toml").write_text(
        '[proxy.sample]\nmodel = "one.onnx"\nfeatures = ["seq_ratio"]\n')
    models.save(models.linear_model([63.0], 1.0), tmp_path / "one.onnx")
    reg = ModelRegistry(cfg.load(tmp_path / "bus.toml"))
    reg.bind(sample_schema())
    np.testing.assert_allclose(reg.predict("sample", [[1.0]]), [64.0])


def test_dynamic_width_is_caught_by_the_probe(tmp_path: Path) -> None:
    # input [N, ?] hides the width; MatMul with a [4,1] weight fails on 3 columns
    w = onnx.numpy_helper.from_array(np.ones((4, 1), np.float32), "W")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "F"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
                          initializer=[w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    models.save(m, tmp_path / "dyn.onnx")
    reg = registry_for(tmp_path, sample="dyn.onnx")
    with pytest.raises(ModelContractError, match="probe input float32 \\[2, 3\\]"):
        reg.bind(sample_schema())


def test_named_input_and_output_must_exist(tmp_path: Path) -> None:
    models.save(models.sample_good_model(), tmp_path / "good.onnx")
    (tmp_path / "bus.toml").write_text('[proxy.sample]\nmodel = "good.onnx"\ninput = "x"\n')
    reg = ModelRegistry(cfg.load(tmp_path / "bus.toml"))
    with pytest.raises(ModelContractError, match="no input 'x' \\(found inputs: features\\)"):
        reg.bind(sample_schema())
    (tmp_path / "bus.toml").write_text('[proxy.sample]\nmodel = "good.onnx"\noutput = "y"\n')
    reg = ModelRegistry(cfg.load(tmp_path / "bus.toml"))
    with pytest.raises(ModelContractError, match="no output 'y'"):
        reg.bind(sample_schema())


def test_one_bad_proxy_does_not_stop_the_others(tmp_path: Path) -> None:
    models.save(models.sample_good_model(), tmp_path / "good.onnx")
    models.save(models.mismatched_model("width"), tmp_path / "bad.onnx")
    reg = registry_for(tmp_path, a="good.onnx", b="bad.onnx", c="missing.onnx")
    failed = bind_all(reg, [sample_schema("a"), sample_schema("b"), sample_schema("c")])
    assert set(failed) == {"b", "c"}
    assert isinstance(failed["b"], ModelContractError)
    assert isinstance(failed["c"], ModelLoadError) and "missing.onnx" in str(failed["c"])
    assert reg.has_model("a") and not reg.has_model("b")
    np.testing.assert_allclose(reg.predict("a", [[1.0, 0, 0]]), [64.0])


def test_garbage_file_is_a_load_error(tmp_path: Path) -> None:
    (tmp_path / "junk.onnx").write_bytes(b"\x00not a model at all" * 10)
    reg = registry_for(tmp_path, sample="junk.onnx")
    with pytest.raises(ModelLoadError, match="proxy sample: cannot load .*junk.onnx"):
        reg.bind(sample_schema())


def test_unconfigured_proxy_binds_without_model(tmp_path: Path) -> None:
    reg = ModelRegistry()
    b = reg.bind(sample_schema("other"))
    assert b.n_features == 3 and not reg.has_model("other")
    with pytest.raises(NoModelError):
        reg.reload("other")
    with pytest.raises(UnknownProxyError, match="not bound"):
        reg.predict("nobody", np.zeros((1, 3)))


def test_reload_swaps_and_a_bad_new_file_keeps_the_old_model(tmp_path: Path) -> None:
    p = tmp_path / "m.onnx"
    models.save(models.sample_good_model(), p)
    reg = registry_for(tmp_path, sample="m.onnx")
    reg.bind(sample_schema())
    x = np.array([[0.0, 0, 0]])
    assert reg.predict("sample", x)[0] == 1.0

    models.save(models.sample_bad_model(), p)
    reg.reload("sample")
    assert reg.predict("sample", x)[0] == 64.0

    models.save(models.mismatched_model("output"), p)
    with pytest.raises(ModelContractError):
        reg.reload("sample")
    assert reg.predict("sample", x)[0] == 64.0  # old model still serving
    assert isinstance(reg.error("sample"), ModelContractError)


def test_poll_reloads_changed_files_only_and_reports_once(tmp_path: Path) -> None:
    p = tmp_path / "m.onnx"
    models.save(models.sample_good_model(), p)
    reg = registry_for(tmp_path, sample="m.onnx")
    reg.bind(sample_schema())
    assert reg.poll() == []

    models.save(models.sample_bad_model(), p)
    bump_mtime(p)
    r = reg.poll()
    assert [(x.proxy, x.ok) for x in r] == [("sample", True)]
    assert reg.predict("sample", [[0.0, 0, 0]])[0] == 64.0
    assert reg.poll() == []

    models.save(models.mismatched_model("width"), p)
    bump_mtime(p)
    r = reg.poll()
    assert len(r) == 1 and not r[0].ok and isinstance(r[0].error, ModelContractError)
    assert reg.poll() == []  # the broken file is not retried until it changes
    assert reg.predict("sample", [[0.0, 0, 0]])[0] == 64.0

    p.unlink()
    assert reg.poll() == []  # vanished: keep serving
    models.save(models.sample_good_model(), p)
    bump_mtime(p)
    assert [x.ok for x in reg.poll()] == [True]
    assert reg.predict("sample", [[0.0, 0, 0]])[0] == 1.0


def test_poll_loads_a_model_that_appears_later(tmp_path: Path) -> None:
    reg = registry_for(tmp_path, sample="later.onnx")
    with pytest.raises(ModelLoadError):
        reg.bind(sample_schema())
    models.save(models.sample_good_model(), tmp_path / "later.onnx")
    assert [x.ok for x in reg.poll()] == [True]
    assert reg.has_model("sample")


def test_install_bytes_and_reload_to_new_path(tmp_path: Path) -> None:
    reg = ModelRegistry()
    reg.bind(sample_schema())
    reg.install("sample", models.to_bytes(models.sample_bad_model()), "learned")
    assert reg.predict("sample", [[0.0, 0, 0]])[0] == 64.0
    assert reg.model("sample").source == "learned"  # type: ignore[union-attr]
    with pytest.raises(ModelContractError):
        reg.install("sample", models.to_bytes(models.mismatched_model("dtype")))
    assert reg.predict("sample", [[0.0, 0, 0]])[0] == 64.0
    p = models.save(models.sample_good_model(), tmp_path / "x.onnx")
    reg.reload("sample", p)
    assert reg.binding("sample").model == p
    assert reg.predict("sample", [[0.0, 0, 0]])[0] == 1.0


def test_rebind_with_changed_schema_rechecks(tmp_path: Path) -> None:
    models.save(models.sample_good_model(), tmp_path / "good.onnx")
    reg = registry_for(tmp_path, sample="good.onnx")
    reg.bind(sample_schema())
    wider = ProxySchema("sample", sample_schema().features + (FieldSchema("extra", 1),),
                        FieldSchema("window", 1, 1, 64), 64)
    with pytest.raises(ModelContractError):
        reg.bind(wider)
    assert not reg.has_model("sample")


def test_predict_validates_shape_and_wraps_runtime_errors(tmp_path: Path) -> None:
    reg = ModelRegistry()
    reg.bind(sample_schema())
    reg.install("sample", models.to_bytes(models.sample_good_model()))
    with pytest.raises(ModelRuntimeError, match="expected \\[N, 3\\]"):
        reg.predict("sample", np.zeros((2, 2)))
    assert reg.predict("sample", np.zeros((0, 3))).shape == (0,)

    class Boom:
        def run(self, *a: object) -> None:
            raise RuntimeError("onnxruntime exploded\nsecond line")

    lm = reg.model("sample")
    assert lm is not None
    from dataclasses import replace
    reg._models["sample"] = replace(lm, session=Boom())
    with pytest.raises(ModelRuntimeError, match="inference failed .*onnxruntime exploded$"):
        reg.predict("sample", np.zeros((1, 3)))


def test_predict_bypasses_the_wrapper_with_the_wrappers_results() -> None:
    """The bound C++ session gives what InferenceSession.run gives, on real inputs."""
    reg = ModelRegistry()
    reg.bind(sample_schema())
    reg.install("sample", models.to_bytes(models.linear_model([0.5, -2.0, 3.25], 1.5, 3)))
    lm = reg.model("sample")
    assert lm is not None and lm.run != lm.session.run  # the binding is there: bypassed
    x = np.random.default_rng(7).normal(size=(33, 3)).astype(np.float32)
    (want,) = lm.session.run([lm.output_name], {lm.input_name: x})
    np.testing.assert_array_equal(reg.predict("sample", x), np.asarray(want).reshape(-1))


def test_predict_rows_gives_predicts_values_as_a_list() -> None:
    reg = ModelRegistry()
    reg.bind(sample_schema())
    reg.install("sample", models.to_bytes(models.linear_model([0.5, -2.0, 3.25], 1.5, 3)))
    rows = np.random.default_rng(3).normal(size=(17, 3)).tolist()  # float64: rounded once
    want = reg.predict("sample", np.array(rows, dtype=np.float32))
    assert reg.predict_rows("sample", rows) == want.tolist() and reg.predict_rows("sample", []) == []
    with pytest.raises(ModelRuntimeError, match=r"shape \[2, 2\], expected \[N, 3\]"):
        reg.predict_rows("sample", [[1.0, 2.0, 3.0], [1.0, 2.0]])
    reg.bind(sample_schema("other"), load=False)
    with pytest.raises(NoModelError):
        reg.predict_rows("other", rows)


def test_concurrent_predict_during_swaps_never_fails(tmp_path: Path) -> None:
    reg = ModelRegistry()
    reg.bind(sample_schema())
    good = models.to_bytes(models.sample_good_model())
    bad = models.to_bytes(models.sample_bad_model())
    reg.install("sample", good)
    seen: set[float] = set()
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                seen.add(float(reg.predict("sample", [[0.0, 0, 0]])[0]))
        except BaseException as e:  # pragma: no cover - the failure we test for
            errors.append(e)

    t = threading.Thread(target=reader)
    t.start()
    for i in range(20):
        reg.install("sample", bad if i % 2 == 0 else good)
    stop.set()
    t.join()
    assert not errors
    assert seen <= {1.0, 64.0}


def test_rebind_with_a_schema_the_config_does_not_fit_unbinds(tmp_path: Path) -> None:
    (tmp_path / "bus.toml").write_text(
        '[proxy.sample]\nmodel = "one.onnx"\nfeatures = ["seq_ratio"]\n')
    models.save(models.linear_model([63.0], 1.0), tmp_path / "one.onnx")
    reg = ModelRegistry(cfg.load(tmp_path / "bus.toml"))
    reg.bind(sample_schema())
    renamed = ProxySchema("sample", (FieldSchema("ratio", 1000),),
                          FieldSchema("window", 1, 1, 64), 64)
    with pytest.raises(cfg.ConfigError, match="proxy.sample.features"):
        reg.bind(renamed)
    assert "sample" not in reg.proxies and not reg.has_model("sample")
