"""remove-qdq: every Q/DQ stripped, quantized constants dequantized, folded activations restored (issue 5)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import qdqsurgeon
from qdqsurgeon.passes.strip_qdq import RemoveQdq
from qdqsurgeon.registry import Registry

from ..helpers import F, FP32, QDQ, full_check, init, kinds, make_model, need_shared, ops, qdq_nodes, run

PASS = ["remove-qdq"]


def registry() -> Registry:
    reg = Registry.builtin()
    if "remove-qdq" not in reg:
        reg.add_pass(RemoveQdq)
    return reg


def apply(model: onnx.ModelProto):
    return qdqsurgeon.optimize(model, passes=PASS, registry=registry(), analyze=False)


def _float_and_qdq():
    """The same Conv+Relu in float and in Q/DQ form (int8 weight, int32 bias, output pair)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 4, 1, 1)).astype(np.float32)
    s_in = np.float32(0.05)
    s_w = (np.abs(w).reshape(4, -1).max(axis=1) / 127).astype(np.float32)
    wq = np.clip(np.rint(w / s_w[:, None, None, None]), -127, 127).astype(np.int8)
    b = rng.standard_normal(4).astype(np.float32)
    bq = np.rint(b / (s_in * s_w)).astype(np.int32)
    fp = make_model([helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["y"], name="relu")],
                    [("x", F, [1, 4, 3, 3])], [("y", F, [1, 4, 3, 3])], [init("w", w), init("b", b)])
    nodes = [*qdq_nodes("x", "xd", "sx", "zx", "x"),
             helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], name="w_DQ", axis=0),
             helper.make_node("DequantizeLinear", ["bq", "sb", "zb"], ["bd"], name="b_DQ", axis=0),
             helper.make_node("Conv", ["xd", "wd", "bd"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             *qdq_nodes("r", "y", "sy", "zy", "y")]
    inits_ = [init("sx", s_in), init("zx", np.int8(0)), init("wq", wq), init("sw", s_w), init("zw", np.zeros(4, np.int8)),
              init("bq", bq), init("sb", (s_in * s_w).astype(np.float32)), init("zb", np.zeros(4, np.int32)),
              init("sy", np.float32(0.05)), init("zy", np.int8(0))]
    qdq = make_model(nodes, [("x", F, [1, 4, 3, 3])], [("y", F, [1, 4, 3, 3])], inits_)
    return fp, qdq, s_w


def test_strip_small_graph():
    fp, qdq, s_w = _float_and_qdq()
    res = apply(qdq)
    full_check(res.model)
    assert ops(res.model) == ["Conv", "Relu"]
    assert [o.name for o in res.model.graph.output] == ["y"]
    assert kinds(res.changes) == {"rewire": 4, "remove": 6}
    x = np.random.default_rng(1).standard_normal((1, 4, 3, 3)).astype(np.float32)
    got, ref = run(res.model, {"x": x})[0], run(fp, {"x": x})[0]
    # only the weights (within s_w/2 each) and the bias (within s_in*s_w/2) still differ from the float model
    bound = (np.abs(x).sum(axis=1, keepdims=True) * s_w[None, :, None, None] / 2 + 0.05 * s_w[None, :, None, None])
    assert np.all(np.abs(got - ref) <= bound + 1e-6)
    second = apply(res.model)
    assert [c for c in second.changes if c.kind != "note"] == []


def test_strip_restores_folded_relu():
    w = np.random.default_rng(0).standard_normal((4, 4, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), *qdq_nodes("c", "d", "s", "z", "a"),
             helper.make_node("Identity", ["d"], ["y"], name="keep")]
    model = make_model(nodes, [("x", F, [1, 4, 3, 3])], [("y", F, [1, 4, 3, 3])],
                       [init("w", w), init("s", np.float32(0.01)), init("z", np.uint8(0))])
    res = apply(model)
    assert ops(res.model) == ["Conv", "Relu", "Identity"]
    assert any(c.kind == "note" and c.rule == "V2" for c in res.changes)
    x = np.random.default_rng(1).standard_normal((1, 4, 3, 3)).astype(np.float32)
    assert run(res.model, {"x": x})[0].min() >= 0


def test_strip_keeps_interface_q_with_note():
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], name="out_Q")]
    model = make_model(nodes, [("x", F, [2, 3])], [("y", onnx.TensorProto.INT8, [2, 3])],
                       [init("s", np.float32(0.1)), init("z", np.int8(0))])
    res = apply(model)
    assert ops(res.model) == ["QuantizeLinear"]
    assert [c.kind for c in res.changes] == ["note"]


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    return float(10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2)))


@pytest.mark.slow
def test_strip_resnet18_recovers_float_model():
    need_shared()
    qdq = onnx.load(str(QDQ / "resnet18_cifar10_ort_static_s8.onnx"))
    fp = onnx.load(str(FP32 / "resnet18_cifar10.onnx"))
    res = apply(qdq)
    full_check(res.model)
    got_ops = ops(res.model)
    assert "QuantizeLinear" not in got_ops and "DequantizeLinear" not in got_ops
    assert got_ops.count("Conv") == ops(fp).count("Conv") == 20
    assert sorted(got_ops) == sorted(ops(fp))
    xs = np.random.default_rng(0).uniform(-1, 1, (8, 1, 3, 32, 32)).astype(np.float32)  # the models take batch 1

    def outputs(model: onnx.ModelProto) -> np.ndarray:
        return np.concatenate([run(model, {model.graph.input[0].name: x})[0] for x in xs])

    ref, got, before = outputs(fp), outputs(res.model), outputs(qdq)
    assert not np.array_equal(got, ref)  # the weights were quantized: close, not equal
    assert _sqnr(ref, got) > 30.0
    assert _sqnr(ref, got) > _sqnr(ref, before)  # activations are float again
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.875
