"""Small ONNX models built in code: the sample proxy's good and bad models, and
linear models exported by the learner.

Models are built with ``onnx.helper`` rather than shipped as binary files so
that every test and example can make exactly the model it needs, and so the
learner can export what it fitted.  The opset and IR version are pinned low
(opset 13, IR 8) so that any onnxruntime from 1.10 on loads them.

The tensor contract every kmlbus model follows (checked by
:mod:`kmlbus.bus.registry`): input ``float32 [N, n_features]`` with features in
real units (fixed point divided by the schema's scale), output
``float32 [N, 1]`` in the recommendation's real units.

Run ``python -m kmlbus.bus.models DIR`` to write the sample proxy's models into
DIR (used by ``examples/kmlbus.toml``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Literal

import numpy as np

from kmlbus.bus import atomic

if TYPE_CHECKING:
    import onnx

__all__ = [
    "INPUT_NAME",
    "IR_VERSION",
    "OPSET",
    "OUTPUT_NAME",
    "SAMPLE_FEATURES",
    "linear_model",
    "main",
    "mismatched_model",
    "sample_bad_model",
    "sample_good_model",
    "sample_inverted_model",
    "save",
    "to_bytes",
]

#: ONNX operator set the models use; MatMul/Add/Cast are unchanged since 13.
OPSET = 13
#: IR version 8 is what onnx 1.10..1.12 wrote; every onnxruntime >= 1.10 reads it.
IR_VERSION = 8
INPUT_NAME = "features"
OUTPUT_NAME = "value"
#: Features of the sample proxy (kernel/samples/kmlbus_sample.ko), schema order.
SAMPLE_FEATURES = ("seq_ratio", "req_size", "noise")


def _onnx() -> ModuleType:
    """The ``onnx`` package, imported on first use.

    Importing it costs about 1 s of CPU on the host (most of it in
    ``ml_dtypes``) and half a minute in a TCG guest; the daemon imports this
    module for its constants and only builds a model when a linear fit is
    exported, so ``kmlbus run`` and every CLI command start without it.
    """
    import onnx
    import onnx.checker
    import onnx.helper
    import onnx.numpy_helper

    return onnx


def _finish(graph: onnx.GraphProto, doc: str) -> onnx.ModelProto:
    ox = _onnx()
    helper = ox.helper
    model: onnx.ModelProto = helper.make_model(graph, producer_name="kmlbus", doc_string=doc,
                                               opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    ox.checker.check_model(model)
    return model


def linear_model(weights: Sequence[float], bias: float, n_features: int | None = None, *,
                 input_name: str = INPUT_NAME, output_name: str = OUTPUT_NAME,
                 doc: str = "") -> onnx.ModelProto:
    """``y = x @ weights + bias``: input float32 [N, n_features], output float32 [N, 1].

    *n_features* defaults to ``len(weights)``; it must equal it (the argument
    exists so callers state the width they expect).
    """
    w = np.asarray(weights, dtype=np.float32).reshape(-1, 1)
    n = w.shape[0] if n_features is None else n_features
    if n != w.shape[0] or n < 1:
        raise ValueError(f"linear_model: {w.shape[0]} weights for {n} features")
    ox = _onnx()
    helper, numpy_helper, TensorProto = ox.helper, ox.numpy_helper, ox.TensorProto
    graph = helper.make_graph(
        [helper.make_node("MatMul", [input_name, "W"], ["xw"]),
         helper.make_node("Add", ["xw", "B"], [output_name])],
        "kmlbus_linear",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", n])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", 1])],
        initializer=[numpy_helper.from_array(w, "W"),
                     numpy_helper.from_array(np.array([bias], dtype=np.float32), "B")],
    )
    return _finish(graph, doc or f"linear: weights={list(map(float, w.ravel()))} bias={bias}")


def sample_good_model() -> onnx.ModelProto:
    """The sample proxy's near-optimal model: ``window = 1 + 63 * seq_ratio``.

    The sample workload's optimum is ``1 + round(63 * s)`` for the stream's true
    sequentiality ``s``; ``seq_ratio`` is a noisy observation of it.
    """
    return linear_model([63.0, 0.0, 0.0], 1.0, 3, doc="sample good: window = 1 + 63*seq_ratio")


def sample_bad_model() -> onnx.ModelProto:
    """A model that loses to the default: always the largest window (64)."""
    return linear_model([0.0, 0.0, 0.0], 64.0, 3, doc="sample bad: window = 64")


def sample_inverted_model() -> onnx.ModelProto:
    """A model worse than constant: ``window = 64 - 63 * seq_ratio``."""
    return linear_model([-63.0, 0.0, 0.0], 64.0, 3, doc="sample inverted: 64 - 63*seq_ratio")


def mismatched_model(kind: Literal["width", "dtype", "output", "rank"],
                     n_features: int = 3) -> onnx.ModelProto:
    """A model that breaks the contract for a proxy with *n_features* features.

    ``width``: input [N, n_features + 1]; ``dtype``: input float64;
    ``output``: output [N, 2]; ``rank``: input of rank 3 [N, n_features, 1].
    """
    ox = _onnx()
    helper, numpy_helper, TensorProto = ox.helper, ox.numpy_helper, ox.TensorProto
    if kind == "width":
        return linear_model([1.0] * (n_features + 1), 0.0, doc="mismatch: input too wide")
    if kind == "dtype":
        graph = helper.make_graph(
            [helper.make_node("ReduceSum", [INPUT_NAME, "axes"], ["s"], keepdims=1),
             helper.make_node("Cast", ["s"], [OUTPUT_NAME], to=TensorProto.FLOAT)],
            "kmlbus_mismatch_dtype",
            [helper.make_tensor_value_info(INPUT_NAME, TensorProto.DOUBLE, ["N", n_features])],
            [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", 1])],
            initializer=[numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")],
        )
        return _finish(graph, "mismatch: float64 input")
    if kind == "output":
        w = np.ones((n_features, 2), dtype=np.float32)
        graph = helper.make_graph(
            [helper.make_node("MatMul", [INPUT_NAME, "W"], [OUTPUT_NAME])],
            "kmlbus_mismatch_output",
            [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", n_features])],
            [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", 2])],
            initializer=[numpy_helper.from_array(w, "W")],
        )
        return _finish(graph, "mismatch: two outputs per row")
    if kind == "rank":
        graph = helper.make_graph(
            [helper.make_node("ReduceSum", [INPUT_NAME, "axes"], [OUTPUT_NAME], keepdims=0)],
            "kmlbus_mismatch_rank",
            [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", n_features, 1])],
            [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", 1])],
            initializer=[numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")],
        )
        return _finish(graph, "mismatch: rank-3 input")
    raise ValueError(f"mismatched_model: unknown kind {kind!r}")


def to_bytes(model: onnx.ModelProto) -> bytes:
    """Serialized model, as :meth:`kmlbus.bus.registry.ModelRegistry.install` takes it."""
    return bytes(model.SerializeToString())


def save(model: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Write *model* to *path* atomically (temp file + rename).

    The registry watches model files by mtime; a rename means it never sees a
    half-written file.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return atomic.write_bytes(p, to_bytes(model))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kmlbus.bus.models DIR``: write the sample proxy's models to DIR."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m kmlbus.bus.models DIR", file=sys.stderr)
        return 2
    out = Path(args[0])
    for name, m in (("sample_good.onnx", sample_good_model()),
                    ("sample_bad.onnx", sample_bad_model()),
                    ("sample_inverted.onnx", sample_inverted_model())):
        print(save(m, out / name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
