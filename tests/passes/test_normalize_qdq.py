"""normalize-qdq on small graphs, one sub-rule at a time: structure, exact change counts, near misses,
idempotence, onnxruntime numerics (bit-exact or within the stated bound), full checker (issue 5)."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from hypothesis import given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper

import qdqsurgeon
from qdqsurgeon.config import Config
from qdqsurgeon.errors import ModelError
from qdqsurgeon.inspection import inspect_model
from qdqsurgeon.passes.normalize_qdq import NormalizeQdq, added_error, symmetric_scale
from qdqsurgeon.registry import Registry

from ..helpers import F, assert_pass_contract, full_check, init, kinds, make_model, ops, qdq_nodes, run

U8 = TensorProto.UINT8
PASS = ["normalize-qdq"]


def registry() -> Registry:
    reg = Registry.builtin()
    if "normalize-qdq" not in reg:
        reg.add_pass(NormalizeQdq)
    return reg


def apply(model: onnx.ModelProto, **kw):
    return qdqsurgeon.optimize(model, passes=PASS, registry=registry(), analyze=False, **kw)


def contract(model: onnx.ModelProto, **kw):
    return assert_pass_contract(model, PASS, registry=registry(), **kw)


def rules(changes, kind: str | None = None) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in changes:
        if kind is None or c.kind == kind:
            out[c.rule] = out.get(c.rule, 0) + 1
    return out


def inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def node_qparams(model: onnx.ModelProto, op: str) -> list[tuple[np.ndarray, np.ndarray]]:
    vals = inits(model)
    return [(vals[n.input[1]], vals[n.input[2]]) for n in model.graph.node if n.op_type == op]


def problems(model: onnx.ModelProto) -> set[str]:
    return {p.rule for p in inspect_model(model).problems}


# -- V1: scales in Constant nodes / behind Identity ------------------------------------------------
def _constant_scale_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Constant", [], ["s"], name="scale_const", value=helper.make_tensor("v", F, [], [0.05])),
        helper.make_node("Identity", ["z0"], ["z"], name="zp_identity"),
        *qdq_nodes("x", "d", "s", "z", "a"),
        helper.make_node("Relu", ["d"], ["y"], name="relu"),
    ]
    return make_model(nodes, [("x", F, [2, 8])], [("y", F, [2, 8])], [init("z0", np.int8(0))])


def test_v1_constant_nodes_become_initializers():
    res = contract(_constant_scale_model())
    assert ops(res.model) == ["QuantizeLinear", "DequantizeLinear", "Relu"]
    assert kinds(res.changes) == {"constant": 4, "cleanup": 2}
    assert rules(res.changes, "constant") == {"V1": 4}
    names = set(inits(res.model))
    assert all(n.input[1] in names and n.input[2] in names for n in res.model.graph.node[:2])


def test_v1_one_element_scale_becomes_0d():
    nodes = [*qdq_nodes("x", "d", "s", "z", "a"), helper.make_node("Relu", ["d"], ["y"], name="relu")]
    model = make_model(nodes, [("x", F, [2, 8])], [("y", F, [2, 8])],
                       [init("s", np.array([0.05], np.float32)), init("z", np.array([0], np.int8))])
    res = contract(model)
    assert kinds(res.changes) == {"constant": 4}
    assert all(s.ndim == 0 and z.ndim == 0 for s, z in node_qparams(res.model, "QuantizeLinear"))


def test_v1_near_miss_initializers_left_alone():
    nodes = [*qdq_nodes("x", "d", "s", "z", "a"), helper.make_node("Relu", ["d"], ["y"], name="relu")]
    model = make_model(nodes, [("x", F, [2, 8])], [("y", F, [2, 8])], [init("s", np.float32(0.05)), init("z", np.int8(0))])
    res = contract(model)
    assert res.changes == []


# -- V2: asymmetric / uint8 activations ------------------------------------------------------------
def _act_model(scale: float, zp: int, qtype=np.uint8, producer: str | None = None, const_w: np.ndarray | None = None):
    nodes, inits_ = [], [init("s", np.float32(scale)), init("z", qtype(zp))]
    src = "x"
    shape = [1, 4, 3, 3]
    if producer == "conv":
        nodes.append(helper.make_node("Conv", ["x", "w"], ["c"], name="conv"))
        inits_.append(init("w", const_w))
        src = "c"
    elif producer == "relu":
        nodes.append(helper.make_node("Relu", ["x"], ["c"], name="relu_in"))
        src = "c"
    nodes += qdq_nodes(src, "d", "s", "z", "a")
    nodes.append(helper.make_node("Identity", ["d"], ["y"], name="keep_output"))  # P9 would remove a DQ output
    return make_model(nodes, [("x", F, shape)], [("y", F, shape)], inits_)


def _old_range(scale: float, zp: int, qtype) -> tuple[float, float]:
    qmin, qmax = (0, 255) if qtype == np.uint8 else (-128, 127)
    return (qmin - zp) * scale, (qmax - zp) * scale


def test_v2_uint8_pair_becomes_symmetric_int8_within_bound():
    s, zp = 0.02, 140
    model = _act_model(s, zp)
    s_new = float(symmetric_scale(s, zp, np.dtype(np.uint8)))
    lo, hi = _old_range(s, zp, np.uint8)
    x = np.random.default_rng(3).uniform(lo, hi, [1, 4, 3, 3]).astype(np.float32)
    res = contract(model, exact=False, atol=(s + s_new) / 2 + 1e-6, feeds={"x": x})
    assert kinds(res.changes) == {"constant": 2, "rewire": 2, "retype": 1}  # scale + zero point on the Q and its DQ; the Q writes int8
    assert set(rules(res.changes)) == {"V2"}
    for scale, zero in node_qparams(res.model, "QuantizeLinear") + node_qparams(res.model, "DequantizeLinear"):
        assert zero.dtype == np.int8 and zero == 0 and np.isclose(scale, s_new)
    detail = next(c.detail for c in res.changes if c.kind == "constant" and "max added error" in c.detail)
    assert f"zp={zp}" in detail and "int8 zp=0" in detail
    reported = float(re.search(r"max added error ([\d.]+)", detail).group(1))
    new, old = run(res.model, {"x": x})[0], run(model, {"x": x})[0]
    assert np.max(np.abs(new - x)) <= s_new / 2 + 1e-6  # the V2 bound against the float input
    assert np.max(np.abs(new - old)) <= reported * s + 1e-5  # the reported bound against the old output
    assert reported <= (s + s_new) / 2 / s + 1e-3
    assert problems(res.model) == set()
    full_check(res.model)


def test_v2_int8_asymmetric_is_converted():
    res = contract(_act_model(0.03, -20, np.int8), exact=False, atol=0.031)
    assert all(z == 0 for _, z in node_qparams(res.model, "QuantizeLinear"))


def test_v2_near_miss_symmetric_int8_untouched():
    res = contract(_act_model(0.03, 0, np.int8))
    assert res.changes == []


def test_v2_one_sided_after_relu_keeps_range_and_says_so():
    s = 0.01
    model = _act_model(s, 0, producer="relu")
    res = contract(model, exact=False, atol=s * 1.51 + 1e-6)
    assert "Relu" in ops(res.model) and ops(res.model).count("Relu") == 1  # nothing re-inserted: input is non-negative
    assert "add" not in kinds(res.changes)
    detail = next(c.detail for c in res.changes if "max added error" in c.detail)
    assert "one-sided" in detail and "alternative" in detail
    (scale, _), = node_qparams(res.model, "QuantizeLinear")
    assert np.isclose(scale * 127, 255 * s)  # the symmetric range still reaches the old maximum


@pytest.mark.parametrize("scale,act", [(6 / 255, "Clip"), (0.01, "Relu")])
def test_v2_folded_activation_reinserted(scale: float, act: str):
    """ORT removes Relu/ReLU6 before a uint8 Q with zero point 0; the symmetric Q must clip again."""
    w = np.random.default_rng(0).standard_normal((4, 4, 1, 1)).astype(np.float32)
    model = _act_model(scale, 0, producer="conv", const_w=w)
    x = np.random.default_rng(1).standard_normal((1, 4, 3, 3)).astype(np.float32) * 3
    s_new = float(symmetric_scale(scale, 0, np.dtype(np.uint8)))
    res = contract(model, exact=False, atol=(scale + s_new) / 2 + 1e-6, feeds={"x": x})
    assert ops(res.model) == ["Conv", act, "QuantizeLinear", "DequantizeLinear", "Identity"]
    notes = [c for c in res.changes if c.kind == "note"]
    assert len(notes) == 1 and notes[0].rule == "V2" and "folded" in notes[0].detail
    assert kinds(res.changes) == {"add": 1, "rewire": 3, "constant": 2, "retype": 1}
    assert rules(res.changes, "add") == {"V2": 1}
    new, old = run(res.model, {"x": x})[0], run(model, {"x": x})[0]
    conv = run(make_model([helper.make_node("Conv", ["x", "w"], ["y"])], [("x", F, [1, 4, 3, 3])],
                          [("y", F, [1, 4, 3, 3])], [init("w", w)]), {"x": x})[0]
    assert (conv < 0).any() and new.min() >= 0  # negatives still clipped
    assert np.max(np.abs(new - old)) <= (scale + s_new) / 2 + 1e-6


def test_v2_folded_activation_bound_without_reinsertion_would_fail():
    """Counter-check: the same conversion without the Relu would let negative values through."""
    w = -np.abs(np.random.default_rng(0).standard_normal((4, 4, 1, 1))).astype(np.float32)
    model = _act_model(0.01, 0, producer="conv", const_w=w)
    x = np.abs(np.random.default_rng(1).standard_normal((1, 4, 3, 3))).astype(np.float32)
    res = apply(model)
    assert np.all(run(model, {"x": x})[0] == 0) and np.all(run(res.model, {"x": x})[0] == 0)


def test_v2_q_with_two_dqs_changes_together():
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="Q"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d1"], name="DQ1"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d2"], name="DQ2"),
             helper.make_node("Add", ["d1", "d2"], ["y"], name="add")]
    model = make_model(nodes, [("x", F, [2, 8])], [("y", F, [2, 8])], [init("s", np.float32(0.1)), init("z", np.uint8(100))])
    res = contract(model, exact=False, atol=2 * 0.11)
    assert kinds(res.changes) == {"constant": 3, "rewire": 3, "retype": 1}
    params = node_qparams(res.model, "QuantizeLinear") + node_qparams(res.model, "DequantizeLinear")
    assert len({float(s) for s, _ in params}) == 1 and all(z == 0 for _, z in params)


@settings(max_examples=25, deadline=None)
@given(scale=st.floats(1e-3, 10.0), zp=st.integers(0, 255), seed=st.integers(0, 2**16))
def test_v2_bound_property(scale: float, zp: int, seed: int):
    """For any uint8 (s, zp): new output within s'/2 of the float input inside the old range, within the reported bound of the old output."""
    model = _act_model(np.float32(scale), zp)
    s = float(np.float32(scale))
    lo, hi = _old_range(s, zp, np.uint8)
    x = np.random.default_rng(seed).uniform(lo, hi, [1, 4, 3, 3]).astype(np.float32)
    res = apply(model)
    new, old = run(res.model, {"x": x})[0], run(model, {"x": x})[0]
    s_new = float(symmetric_scale(s, zp, np.dtype(np.uint8)))
    tol = 1e-5 * max(abs(lo), abs(hi))
    assert np.max(np.abs(new - x)) <= s_new / 2 + tol
    assert np.max(np.abs(new - old)) <= added_error(s, zp, np.dtype(np.uint8), s_new) * s + tol


# -- V2/V3: weights --------------------------------------------------------------------------------
def _matmul_model(wq: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int | None, gemm: bool = False):
    kw = {} if axis is None else {"axis": axis}
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], name="w_DQ", **kw),
             helper.make_node("Gemm" if gemm else "MatMul", ["x", "w"], ["y"], name="mm")]
    return make_model(nodes, [("x", F, [2, 4])], [("y", F, [2, 3])], [init("wq", wq), init("ws", scale), init("wz", zp)])


def _weight_after(model: onnx.ModelProto) -> tuple[np.ndarray, np.ndarray, np.ndarray, int | None]:
    vals = inits(model)
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    axis = next((a.i for a in dq.attribute if a.name == "axis"), None)
    return vals[dq.input[0]], vals[dq.input[1]], vals[dq.input[2]], axis


def _check_weight_bound(model, res, s_cols: np.ndarray):
    x = np.random.default_rng(5).standard_normal((2, 4)).astype(np.float32)
    diff = np.abs(run(res.model, {"x": x})[0] - run(model, {"x": x})[0])
    bound = np.abs(x).sum(axis=1, keepdims=True) * (s_cols / 2)[None, :] + 1e-5
    assert np.all(diff <= bound)


def test_v2_uint8_weight_requantized_symmetric():
    rng = np.random.default_rng(0)
    model = _matmul_model(rng.integers(0, 256, (4, 3)).astype(np.uint8), np.float32(0.01), np.uint8(120), None)
    res = contract(model, exact=False, atol=0.05)
    wq, ws, wz, _ = _weight_after(res.model)
    assert wq.dtype == np.int8 and wz == 0 and ws.ndim == 0
    assert rules(res.changes) == {"V2": 3} and kinds(res.changes) == {"constant": 2, "rewire": 1}
    _check_weight_bound(model, res, np.full(3, ws))
    assert "max change" in next(c.detail for c in res.changes if c.kind == "constant")


def test_v3_per_k_axis_on_matmul_corrected():
    """PPQ writes per-channel MatMul weights on axis 0 (per-K); TensorRT needs the last axis (V3)."""
    rng = np.random.default_rng(1)
    model = _matmul_model(rng.integers(-127, 128, (4, 3)).astype(np.int8), np.array([0.01, 0.02, 0.03, 0.04], np.float32),
                          np.zeros(4, np.int8), 0)
    assert "V3" in problems(model)
    res = contract(model, exact=False, atol=0.2)
    wq, ws, wz, axis = _weight_after(res.model)
    assert axis == 1 and ws.shape == (3,) and not wz.any()
    assert set(rules(res.changes)) == {"V3"}
    _check_weight_bound(model, res, ws)
    assert problems(res.model) == set()


def test_v3_missing_axis_written_exactly():
    rng = np.random.default_rng(2)
    model = _matmul_model(rng.integers(-127, 128, (4, 3)).astype(np.int8), np.array([0.01, 0.02, 0.03], np.float32),
                          np.zeros(3, np.int8), None)
    assert "V3" in problems(model)
    res = contract(model)  # bit-exact
    assert kinds(res.changes) == {"attr": 1} and rules(res.changes) == {"V3": 1}
    assert _weight_after(res.model)[3] == 1
    assert problems(res.model) == set()


def test_v3_near_miss_correct_int8_weight_untouched():
    rng = np.random.default_rng(2)
    model = _matmul_model(rng.integers(-127, 128, (4, 3)).astype(np.int8), np.array([0.01, 0.02, 0.03], np.float32),
                          np.zeros(3, np.int8), 1)
    assert contract(model).changes == []


def test_weights_fix_float_makes_q_dq_exactly():
    rng = np.random.default_rng(2)
    model = _matmul_model(rng.integers(-128, 128, (4, 3)).astype(np.int8), np.array([0.01, 0.02, 0.03], np.float32),
                          np.zeros(3, np.int8), 1)
    res = contract(model, config=Config(weights_fix="float"))
    assert ops(res.model) == ["QuantizeLinear", "DequantizeLinear", "MatMul"]
    assert kinds(res.changes) == {"add": 1, "rewire": 1}
    q = res.model.graph.node[0]
    assert inits(res.model)[q.input[0]].dtype == np.float32


def test_v2_uint8_float_weight_q_requantized():
    """float W → Q(uint8) → DQ: re-quantized from the dequantized weight, within s_new/2 per weight."""
    w = np.random.default_rng(4).standard_normal((4, 3)).astype(np.float32)
    nodes = [*qdq_nodes("w", "wd", "ws", "wz", "w"), helper.make_node("MatMul", ["x", "wd"], ["y"], name="mm")]
    model = make_model(nodes, [("x", F, [2, 4])], [("y", F, [2, 3])],
                       [init("w", w), init("ws", np.float32(0.02)), init("wz", np.uint8(128))])
    res = contract(model, exact=False, atol=0.1)
    (s, z), = node_qparams(res.model, "QuantizeLinear")
    assert z == 0 and z.dtype == np.int8
    _check_weight_bound(model, res, np.full(3, s))


# -- V4: bias DQ, integer tensors, operator-oriented models ----------------------------------------
def _conv_bias_model():
    rng = np.random.default_rng(0)
    s_in, s_w = np.float32(0.05), rng.uniform(0.01, 0.02, 4).astype(np.float32)
    nodes = [*qdq_nodes("x", "xd", "sx", "zx", "x"),
             helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], name="w_DQ", axis=0),
             helper.make_node("DequantizeLinear", ["bq", "sb", "zb"], ["bd"], name="b_DQ", axis=0),
             helper.make_node("Conv", ["xd", "wd", "bd"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    inits_ = [init("sx", s_in), init("zx", np.int8(0)), init("wq", rng.integers(-127, 128, (4, 4, 1, 1)).astype(np.int8)),
              init("sw", s_w), init("zw", np.zeros(4, np.int8)), init("bq", rng.integers(-5000, 5000, 4).astype(np.int32)),
              init("sb", (s_in * s_w).astype(np.float32)), init("zb", np.zeros(4, np.int32))]
    return make_model(nodes, [("x", F, [1, 4, 3, 3])], [("y", F, [1, 4, 3, 3])], inits_)


def test_v4_int32_bias_dq_folded_bit_exact():
    model = _conv_bias_model()
    assert "V4" in problems(model)
    res = contract(model)  # bit-exact
    assert ops(res.model) == ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "Conv", "Relu"]
    assert kinds(res.changes) == {"rewire": 1, "remove": 1} and rules(res.changes) == {"V4": 2}
    conv = next(n for n in res.model.graph.node if n.op_type == "Conv")
    assert inits(res.model)[conv.input[2]].dtype == np.float32
    assert problems(res.model) == set()


def test_v4_integer_tensor_qdq_removed():
    nodes = [*qdq_nodes("x", "d", "s", "z", "a"), helper.make_node("Identity", ["d"], ["y"], name="keep")]
    model = make_model(nodes, [("x", TensorProto.INT32, [2, 3])], [("y", F, [2, 3])],
                       [init("s", np.float32(1.0)), init("z", np.int8(0))])
    res = apply(model)  # onnxruntime has no int32 QuantizeLinear kernel: compare with the exact expectation
    full_check(res.model)
    x = np.arange(-3, 3, dtype=np.int32).reshape(2, 3)
    assert np.array_equal(run(res.model, {"x": x})[0], x.astype(np.float32))
    assert [c for c in apply(res.model).changes if c.kind != "note"] == []
    assert ops(res.model) == ["Cast", "Identity"]
    assert rules(res.changes) == {"V4": 4} and kinds(res.changes) == {"add": 1, "rewire": 1, "remove": 2}


def test_c1_float_noop_cast_dropped_integer_cast_kept():
    """A float→float Cast after a DQ hides the pair from its reader: readers read the DQ directly
    (exact). The int64→int64 Cast of a shape computation is none of the pass's business."""
    nodes = [*qdq_nodes("x", "d", "s", "z", "a"),
             helper.make_node("Cast", ["d"], ["dc"], name="noop", to=TensorProto.FLOAT),
             helper.make_node("Relu", ["dc"], ["y"], name="relu"),
             helper.make_node("Shape", ["x"], ["sh"], name="shape"),
             helper.make_node("Cast", ["sh"], ["shc"], name="int_noop", to=TensorProto.INT64),
             helper.make_node("Reshape", ["y", "shc"], ["out"], name="reshape")]
    model = make_model(nodes, [("x", F, [2, 3])], [("out", F, [2, 3])],
                       [init("s", np.float32(0.05)), init("z", np.int8(0))])
    model = onnx.shape_inference.infer_shapes(model)  # as qdqsurgeon.load does: the pass reads tensor types
    res = contract(model)  # bit-exact, idempotent, full checker
    assert [c.node for c in res.changes if c.kind == "remove"] == ["noop"]
    assert "int_noop" in [n.name for n in res.model.graph.node]
    relu = next(n for n in res.model.graph.node if n.name == "relu")
    assert relu.input[0] == "d"


def test_v4_operator_oriented_model_refused():
    nodes = [helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], name="qconv")]
    inits_ = [init("xs", np.float32(0.1)), init("xz", np.uint8(128)), init("w", np.ones((2, 2, 1, 1), np.uint8)),
              init("ws", np.float32(0.1)), init("wz", np.uint8(0)), init("ys", np.float32(0.2)), init("yz", np.uint8(128))]
    model = make_model(nodes, [("x", U8, [1, 2, 3, 3])], [("y", U8, [1, 2, 3, 3])], inits_, opset=13)
    with pytest.raises(ModelError, match=r"operator-oriented quantization \(QLinearConv\).*QuantFormat\.QDQ"):
        apply(model)


# -- P9: graph outputs ------------------------------------------------------------------------------
def test_p9_output_qdq_removed_keeping_name():
    s = 0.02
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), *qdq_nodes("r", "y", "s", "z", "out")]
    model = make_model(nodes, [("x", F, [2, 8])], [("y", F, [2, 8])], [init("s", np.float32(s)), init("z", np.int8(0))])
    x = np.random.default_rng(0).uniform(-2, 2, (2, 8)).astype(np.float32)
    res = contract(model, exact=False, atol=s / 2 + 1e-6, feeds={"x": x})
    assert ops(res.model) == ["Relu"] and [o.name for o in res.model.graph.output] == ["y"]
    assert rules(res.changes) == {"P9": 3} and kinds(res.changes) == {"rewire": 1, "remove": 2}
    assert np.array_equal(run(res.model, {"x": x})[0], np.maximum(x, 0))


def test_p9_near_miss_dq_before_other_op_kept():
    nodes = [*qdq_nodes("x", "d", "s", "z", "a"), helper.make_node("Relu", ["d"], ["y"], name="relu")]
    model = make_model(nodes, [("x", F, [2, 8])], [("y", F, [2, 8])], [init("s", np.float32(0.05)), init("z", np.int8(0))])
    assert apply(model).changes == []


# -- opsets ------------------------------------------------------------------------------------------
def _per_channel_model(opset: int, extra: list[onnx.NodeProto] = (), out: str = "y") -> onnx.ModelProto:
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], name="w_DQ", axis=1),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"), *extra]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [2, 4])],
                              [helper.make_tensor_value_info(out, F, [2, 3])],
                              [init("wq", np.ones((4, 3), np.int8)), init("ws", np.full(3, 0.1, np.float32)),
                               init("wz", np.zeros(3, np.int8))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def test_opset_raised_to_13_for_per_channel():
    res = apply(_per_channel_model(12), verify=False)
    assert res.model.opset_import[0].version == 13
    assert [c for c in res.changes if c.kind == "opset"][0].rule == "V3"
    full_check(res.model)
    x = np.ones((2, 4), np.float32)
    assert np.allclose(run(res.model, {"x": x})[0], 0.4)


def test_opset_upgraded_by_the_converter_when_an_op_changed_meaning():
    """Softmax changed meaning at 13: raising in place would be wrong, so onnx's converter upgrades the model first."""
    model = _per_channel_model(12, [helper.make_node("Softmax", ["y"], ["p"], name="sm")], out="p")
    res = apply(model, verify=False)
    assert res.model.opset_import[0].version == 13
    assert [c.pass_name for c in res.changes if c.kind == "opset"] == ["upgrade-opset"]
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    assert np.allclose(run(res.model, {"x": x})[0], 1 / 3, atol=1e-6)  # equal columns: softmax over the last axis


def test_unused_domains_removed():
    model = _per_channel_model(17)
    model.opset_import.extend([helper.make_opsetid("com.microsoft", 1), helper.make_opsetid("ai.onnx.ml", 5)])
    res = assert_pass_contract(model, ["remove-unused-domains"], registry=registry())
    assert [(o.domain, o.version) for o in res.model.opset_import] == [("", 17)]
    assert kinds(res.changes) == {"opset": 1}


# -- whole-pass properties -----------------------------------------------------------------------------
def test_fix_everything_at_once_then_idempotent():
    """Constant-node scales, uint8 activations, int32 bias and an output pair in one graph."""
    model = _conv_bias_model()
    graph = model.graph
    for n in graph.node:
        if n.name == "x_Q":
            n.input[2] = "zx_u8"
        if n.name == "x_DQ":
            n.input[2] = "zx_u8"
    graph.initializer.append(init("zx_u8", np.uint8(128)))
    model = onnx.shape_inference.infer_shapes(model)
    del model.graph.value_info[:]
    onnx.checker.check_model(model, full_check=True)
    res = contract(model, exact=False, atol=1.0)
    assert problems(res.model) == set()
    assert rules(res.changes).keys() >= {"V2", "V4"}


# --- V1: zero and negative scales ----------------------------------------------------------------
def _scaled_conv(scale_w):
    from onnx import helper

    from ..helpers import F, init, make_model, qdq_nodes

    w = np.random.default_rng(0).standard_normal((3, 2, 1, 1)).astype(np.float32)
    w[1] = 0.0
    nodes = qdq_nodes("x", "xd", "sx", "zx", "act")
    nodes += qdq_nodes("w", "wd", "sw", "zw", "wgt", axis=0)
    nodes.append(helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv"))
    inits = [init("w", w), init("sx", np.float32(0.05)), init("zx", np.int8(0)),
             init("sw", np.asarray(scale_w, np.float32)), init("zw", np.zeros(3, np.int8))]
    return make_model(nodes, [("x", F, [1, 2, 2, 2])], [("y", F, [1, 3, 2, 2])], inits)


def test_zero_scale_gets_minimum_scale():
    import qdqsurgeon
    from qdqsurgeon.inspection import inspect_model
    from qdqsurgeon.quant import MIN_SCALE

    from ..helpers import random_feeds, run

    model = _scaled_conv([0.01, 0.0, 0.02])
    assert any(p.rule == "V1" for p in inspect_model(model).problems)
    # channel 1's weights are all zero (a pruned channel calibrated to amax 0): repaired without asking
    res = qdqsurgeon.optimize(model, passes=["normalize-qdq"], analyze=False)
    assert inspect_model(res.model).problems == []
    changed = [c for c in res.changes if c.rule == "V1" and c.kind == "constant"]
    assert len(changed) == 2 and all("1 zero scale" in c.detail for c in changed)
    feeds = random_feeds(model)
    np.testing.assert_allclose(run(res.model, feeds)[0], run(model, feeds)[0], atol=128 * MIN_SCALE * 10)
    again = qdqsurgeon.optimize(res.model, passes=["normalize-qdq"], analyze=False)
    assert [c for c in again.changes if c.kind != "note"] == []


def test_other_zero_scales_are_refused_unless_repair_is_asked():
    """A zero scale on live weights or on an activation is bad input (V1): one error naming the flag;
    with ``repair_zero_scales`` it gets the minimum scale."""
    import qdqsurgeon

    model = _scaled_conv([0.01, 0.0, 0.02])
    w = next(t for t in model.graph.initializer if t.name == "w")
    value = numpy_helper.to_array(w).copy()
    value[1] = 0.5  # a live channel with a zero scale
    w.CopyFrom(numpy_helper.from_array(value, "w"))
    with pytest.raises(ModelError, match="zero scale.*--repair-zero-scales"):
        qdqsurgeon.optimize(model, passes=["normalize-qdq"], analyze=False)
    res = qdqsurgeon.optimize(model, passes=["normalize-qdq"], config=Config(repair_zero_scales=True), analyze=False)
    assert any(c.rule == "V1" and "1 zero scale" in c.detail for c in res.changes)
    act = _scaled_conv([0.01, 0.0, 0.02])
    next(t for t in act.graph.initializer if t.name == "sx").CopyFrom(numpy_helper.from_array(np.float32(0.0), "sx"))
    with pytest.raises(ModelError, match="zero scale"):
        qdqsurgeon.optimize(act, passes=["normalize-qdq"], analyze=False)


def test_a_refusal_runs_the_pipeline_once():
    """A pass's deliberate refusal is re-raised at once, not retried with a check after every pass."""
    import qdqsurgeon
    from qdqsurgeon.passes.base import Instrument

    class Count(Instrument):
        calls = 0

        def before_pass(self, pass_, graph, ctx):
            Count.calls += 1

    model = _scaled_conv([0.01, -0.5, 0.02])
    with pytest.raises(ModelError, match="negative"):
        qdqsurgeon.optimize(model, instruments=[Count()], analyze=False)
    assert Count.calls == 2  # remove-identity, then normalize-qdq refuses


def test_negative_scale_is_one_line_error(tmp_path):
    from click.testing import CliRunner

    import qdqsurgeon
    from qdqsurgeon.cli import cli

    src = tmp_path / "neg.onnx"
    qdqsurgeon.save(_scaled_conv([0.01, -0.02, 0.02]), src)
    result = CliRunner().invoke(cli, ["optimize", str(src), str(tmp_path / "out.onnx")])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "negative, NaN or infinite scale" in lines[0]
    assert not (tmp_path / "out.onnx").exists()
