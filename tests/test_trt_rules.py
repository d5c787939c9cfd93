"""Tests for the TensorRT rules table and its node-level queries (qdqsurgeon.trt_rules)."""

from __future__ import annotations

import re

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto

from qdqsurgeon import trt_rules as R

from .analysis_helpers import SHARED, Builder


def _graph(build) -> gs.Graph:
    b = Builder()
    build(b)
    return gs.import_onnx(b.build(check=False))


def _node(graph: gs.Graph, name: str) -> gs.Node:
    return next(n for n in graph.nodes if n.name == name)


def test_every_entry_is_well_formed():
    for op, rule in R.RULES.items():
        assert rule.op == op
        assert rule.role in R.ROLES
        assert rule.confidence and all(c in R.CONFIDENCES for c in rule.confidence)
        assert rule.rules and all(re.fullmatch(r"[CFPVE]\d+", r) for r in rule.rules), op
        assert not (rule.commutes and rule.role != "commuting"), op


def test_rule_ids_exist_in_the_spec():
    spec = SHARED / "docs" / "trt-rules.md"
    if not spec.exists():
        pytest.skip(f"spec not found at {spec}")
    ids = set(re.findall(r"\*\*([CFPVE]\d+)\.", spec.read_text())) | set(re.findall(r"- ([F]\d+)\.", spec.read_text()))
    used = {r for rule in R.RULES.values() for r in rule.rules}
    assert used <= ids, used - ids


def test_roles_cover_the_issue_lists():
    assert set(R.ops_with_role("commuting")) >= {"MaxPool", "GlobalMaxPool", "Concat", "Reshape", "Flatten", "Squeeze",
                                                 "Unsqueeze", "Transpose", "Slice", "Split", "Gather", "Expand", "Tile",
                                                 "Pad"}
    assert R.rule_for("MaxPool").equal_scales and R.rule_for("Concat").equal_scales
    assert R.rule_for("Concat").data_inputs == R.ALL
    assert R.rule_for("Reshape").data_inputs == (0,)
    assert {"AveragePool", "GlobalAveragePool", "Add", "Mul", "Sub", "Sigmoid", "Resize"} <= \
        {op for op, r in R.RULES.items() if r.role == "wrapped"}
    assert {"Softmax", "LayerNormalization"} <= set(R.ops_with_role("float"))
    assert {"Shape"} <= set(R.ops_with_role("shape"))
    assert set(R.ops_with_role("weighted")) == {"Conv", "ConvTranspose", "Gemm", "MatMul"}
    assert R.rule_for("NoSuchOp") is None
    with pytest.raises(ValueError):
        R.ops_with_role("nope")


def test_pad_commutes_only_with_constant_zero():
    def build(b: Builder):
        x = b.input("x", [1, 4, 8, 8])
        pads = b.const(np.asarray([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
        b.output(b.node("Pad", [x, pads], name="zero"))
        b.output(b.node("Pad", [x, pads, b.const(np.asarray(1.0, np.float32))], name="one"))
        b.output(b.node("Pad", [x, pads], name="reflect", mode="reflect"))
        b.output(b.node("MaxPool", [x], name="mp", kernel_shape=[2, 2]))
        b.output(b.node("Relu", [x], name="relu"))
        b.output(b.node("Cast", [x], name="to_half", to=TensorProto.FLOAT16), TensorProto.FLOAT16)
        b.output(b.node("Cast", [x], name="to_int", to=TensorProto.INT64), TensorProto.INT64)
    g = _graph(build)
    assert R.commutes(_node(g, "zero"))
    assert not R.commutes(_node(g, "one"))
    assert not R.commutes(_node(g, "reflect"))
    assert R.commutes(_node(g, "mp"))
    assert not R.commutes(_node(g, "relu"))
    assert R.commutes(_node(g, "to_half"))
    assert not R.commutes(_node(g, "to_int"))


def test_gather_on_a_shape_tensor_does_not_commute():
    def build(b: Builder):
        x = b.input("x", [1, 4, 8, 8])
        shape = b.node("Shape", [x], name="shape")
        b.output(b.node("Gather", [shape, b.const(np.asarray(1, np.int64))], name="g_shape", axis=0), TensorProto.INT64)
        b.output(b.node("Gather", [x, b.const(np.asarray([0, 1], np.int64))], name="g_data", axis=1))
    g = _graph(build)
    assert not R.commutes(_node(g, "g_shape"))
    assert R.commutes(_node(g, "g_data"))
    assert R.is_shape_op(_node(g, "shape"))


def test_epilogues_bias_residual_and_silu():
    def build(b: Builder):
        x = b.input("x", [1, 4, 8, 8])
        y = b.conv(x, 4, name="conv")
        bias = b.node("Add", [y, b.const(np.zeros((1, 4, 1, 1), np.float32))], name="bias")
        res = b.node("Add", [bias, x], name="res")
        sig = b.node("Sigmoid", [res], name="sig")
        silu = b.node("Mul", [sig, res], name="silu")  # operand order swapped on purpose
        plain_sig = b.node("Sigmoid", [silu], name="plain_sig")
        scale = b.node("Mul", [plain_sig, b.const(np.asarray(2.0, np.float32))], name="scale")
        b.output(b.node("BatchNormalization", [scale] + [b.const(np.ones(4, np.float32)) for _ in range(4)], name="bn"))
    g = _graph(build)
    assert R.is_bias_add(_node(g, "bias")) and R.is_epilogue(_node(g, "bias"))
    assert R.is_residual_add(_node(g, "res")) and R.is_epilogue(_node(g, "res"))
    assert R.is_silu_mul(_node(g, "silu")) and R.is_silu_mul(_node(g, "sig"))
    assert R.is_epilogue(_node(g, "silu")) and R.is_epilogue(_node(g, "sig"))
    assert not R.is_silu_mul(_node(g, "plain_sig")) and not R.is_epilogue(_node(g, "plain_sig"))
    assert not R.is_epilogue(_node(g, "scale"))
    assert R.is_epilogue(_node(g, "bn"))
    assert "ConvTranspose" not in R.rule_for("BatchNormalization").fuses_after  # F9
    assert not R.is_epilogue(_node(g, "conv"))


def test_weighted_and_weight_axes():
    def build(b: Builder):
        x = b.input("x", [1, 4, 8, 8])
        b.output(b.conv(x, 8, name="conv"))
        w_ct = b.weight((4, 6, 3, 3), axis=1)
        b.output(b.node("ConvTranspose", [x, w_ct], name="ct", kernel_shape=[3, 3]))
        w_ctg = b.const(np.zeros((4, 3, 3, 3), np.float32))
        b.output(b.node("ConvTranspose", [x, w_ctg], name="ct_grouped", kernel_shape=[3, 3], group=2))
        f = b.input("f", [2, 16])
        b.output(b.node("Gemm", [f, b.weight((10, 16)), b.const(np.zeros(10, np.float32))], name="gemm_t", transB=1))
        b.output(b.node("Gemm", [f, b.weight((16, 10), axis=1)], name="gemm_n"))
        b.output(b.node("MatMul", [f, b.weight((16, 10), axis=1)], name="mm2d"))
        s = b.input("s", [2, 3, 16])
        b.output(b.node("MatMul", [s, b.const(np.zeros((2, 16, 10), np.float32))], name="mm3d"))
        t = b.input("t", [2, 16, 3])
        b.output(b.node("MatMul", [s, t], name="mm_act"))
    g = _graph(build)
    assert R.weight_axis(_node(g, "conv")) == 0
    assert R.weight_axis(_node(g, "ct")) == 1
    assert R.weight_axis(_node(g, "ct"), convtranspose_axis=0) == 0
    assert R.weight_axis(_node(g, "ct"), convtranspose_axis=None) is None
    assert R.weight_axis(_node(g, "ct_grouped")) is None
    assert R.weight_axis(_node(g, "gemm_t")) == 0
    assert R.weight_axis(_node(g, "gemm_n")) == 1
    assert R.weight_axis(_node(g, "mm2d")) == 1
    assert R.weight_axis(_node(g, "mm3d")) is None  # V3: rank > 2 stays per-tensor until verified
    assert R.is_weighted(_node(g, "mm2d")) and R.is_weighted(_node(g, "mm3d"))
    assert not R.is_weighted(_node(g, "mm_act"))
    assert R.weight_axis(_node(g, "mm_act")) is None


def test_wrapped_and_float_only():
    def build(b: Builder):
        x = b.input("x", [1, 4, 8, 8])
        b.output(b.node("GlobalAveragePool", [x], name="gap"))
        b.output(b.node("Softmax", [x], name="softmax", axis=1))
        b.output(b.node("Relu", [x], name="relu"))
        b.output(b.node("Conv", [x, b.const(np.zeros((4, 4, 1, 1), np.float32))], name="conv"))
    g = _graph(build)
    assert R.is_quantizable_wrapped(_node(g, "gap"))
    assert R.is_quantizable_wrapped(_node(g, "relu"))  # an epilogue op outside a chain is wrapped-INT8 (P7)
    assert not R.is_quantizable_wrapped(_node(g, "softmax"))
    assert R.is_float_only(_node(g, "softmax"))
    assert not R.is_float_only(_node(g, "conv"))
    assert R.is_float_only(_node(g, "conv"), sensitive_ops=("Conv",))
    unknown = gs.Node("MyCustomOp", "custom")
    assert R.is_float_only(unknown)


def test_rule_validation_rejects_bad_entries():
    with pytest.raises(ValueError):
        R.OpRule("X", "bogus")
    with pytest.raises(ValueError):
        R.OpRule("X", "float", confidence=("maybe",))


# --- attention GEMMs (INT8 MHA fusion; NVIDIA/TensorRT#3243) ----------------------------------------


def test_attention_gemms_finds_score_and_context_pairs_through_mask_and_qdq():
    import qdqsurgeon

    from .passes.placement_graphs import ranges_of
    from .test_analysis import _attention

    model = _attention()
    pairs = R.attention_gemms(gs.import_onnx(model))
    assert [(a.name, b.name) for a, b in pairs] == [("scores", "context")]
    # the same pair once Q/DQ sits on the way (the analysis and a second insert-qdq run see the same block)
    quantized = qdqsurgeon.optimize(model, ranges=ranges_of(model)).model
    assert [(a.name, b.name) for a, b in R.attention_gemms(gs.import_onnx(quantized))] == [("scores", "context")]


def test_attention_gemms_near_misses():
    from onnx import helper

    from .test_analysis import _attention

    # a Tanh soft-cap between the GEMMs is not an op TensorRT's MHA fusion takes in
    assert R.attention_gemms(gs.import_onnx(_attention(cap=True))) == []
    # Softmax probabilities also read elsewhere (exported attention maps): the GEMMs do not fuse as one
    model = _attention()
    model.graph.output.append(helper.make_tensor_value_info("p", TensorProto.FLOAT, [1, 4, 4]))
    assert R.attention_gemms(gs.import_onnx(model)) == []
