"""Small graph builders and runners shared by the tests."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO.parent / "shared").resolve()
MODELS = SHARED / "models"
FP32 = MODELS / "fp32"
QDQ = MODELS / "qdq"


def need_shared() -> Path:
    if not MODELS.is_dir():
        pytest.skip(f"shared models not found at {MODELS}")
    return MODELS


def model_from_text(text: str) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model, full_check=True)
    return model


def init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def make_model(nodes: Sequence[onnx.NodeProto], inputs: Sequence[tuple[str, int, list]], outputs: Sequence[tuple[str, int, list | None]],
               initializers: Sequence[onnx.TensorProto] = (), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        list(nodes), "test",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        list(initializers),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def qdq_nodes(x: str, out: str, scale: str, zp: str, prefix: str, axis: int | None = None) -> list[onnx.NodeProto]:
    kw = {} if axis is None else {"axis": axis}
    return [
        helper.make_node("QuantizeLinear", [x, scale, zp], [f"{prefix}_q"], name=f"{prefix}_Q", **kw),
        helper.make_node("DequantizeLinear", [f"{prefix}_q", scale, zp], [out], name=f"{prefix}_DQ", **kw),
    ]


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run in onnxruntime with graph optimizations disabled, so ORT's own Q/DQ fusions hide nothing."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def random_feeds(model: onnx.ModelProto, seed: int = 0, batch: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        # dynamic dims: the batch, then 64 (a multiple of every stride in the shared models)
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (batch if i == 0 else 64)
                 for i, d in enumerate(tt.shape.dim)]
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if dtype.kind == "f":
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[inp.name] = rng.integers(0, 2, shape).astype(dtype)  # valid ids, masks and token types alike
    return feeds


def full_check(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


F = TensorProto.FLOAT
I8 = TensorProto.INT8


def apply(model: onnx.ModelProto, passes: Sequence[str], **kw):
    """Run passes through the public API with verification on."""
    import qdqsurgeon

    return qdqsurgeon.optimize(model, passes=list(passes), analyze=False, **kw)


def assert_pass_contract(model: onnx.ModelProto, passes: Sequence[str], *, exact: bool = True, atol: float = 0.0,
                         feeds: dict[str, np.ndarray] | None = None, **kw):
    """Checker (full), numerics (bit-exact or within atol), idempotence; returns the first result."""
    first = apply(model, passes, **kw)
    full_check(first.model)
    feeds = feeds or random_feeds(model, seed=7)
    ref, got = run(model, feeds), run(first.model, feeds)
    for a, b in zip(ref, got):
        if exact:
            assert np.array_equal(a, b), f"max diff {np.max(np.abs(a.astype(np.float64) - b))}"
        else:
            np.testing.assert_allclose(b, a, rtol=0, atol=atol)
    second = apply(first.model, passes, **kw)
    assert [c for c in second.changes if c.kind != "note"] == [], second.changes
    return first


def kinds(changes) -> dict[str, int]:
    from collections import Counter

    return dict(Counter(c.kind for c in changes if c.kind != "note"))
