"""Tests for the static TensorRT prediction (qdqsurgeon.analysis).

Small built graphs check one rule each; reconstructions of the networks behind real engine
dumps check the standalone Q/DQ counts against the dumps themselves (docs/static-analysis.md).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto

from qdqsurgeon.analysis import FLOAT, INT8_FLOAT, INT8_INT8, TrtPrediction, predict

from .analysis_helpers import (SHARED, Builder, count_origin, engine_layers, mobilenet_v2_from_shared, resnet18,
                               tf_resnet50)

MOBILENET = SHARED / "models" / "engines" / "trex_mobilenet_v2_a100"
NAIVE_JSON = MOBILENET / "mobilenet.qat.onnx.engine.graph.json"
RESIDUAL_JSON = MOBILENET / "mobilenet_v2_residuals.qat.onnx.engine.graph.json"
TF_RESNET_JSON = SHARED / "models" / "engines" / "trex_tf_resnet50_rtx3090" / "qat" / "resnet-qat.onnx.engine.graph.json"
QDQ_MODELS = sorted((SHARED / "models" / "qdq").glob("*.onnx"))


def need(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"shared asset missing: {path}")


def rules_of(pred: TrtPrediction) -> list[str]:
    return [s.rule for s in pred.standalone_layers]


# --- single rules on small graphs -----------------------------------------------------------------


def test_f2_output_q_gives_int8_to_int8():
    b = Builder()
    x = b.input("x", [1, 8, 16, 16])
    y = b.conv(x, 8, act="relu", name="conv_a")
    b.output(b.conv(y, 8, name="conv_b"))
    pred = predict(b.build())
    assert pred.precision_of("conv_a") == INT8_INT8
    assert pred.precision_of("conv_b") == INT8_FLOAT  # graph output: float (F2, P9)
    assert pred.standalone_qdq_layers == 1 and rules_of(pred) == ["P10"]  # only the network-input Quantize
    assert pred.int8_weighted_ops == 2 and pred.int8_mac_fraction == 1.0
    assert pred.standalone_qdq == [pred.standalone_layers[0].node]


def test_graph_input_quantize_is_always_standalone():
    b = Builder()
    x = b.input("x", [1, 8, 16, 16])
    b.output(b.conv(x, 8, name="conv"))
    pred = predict(b.build())
    assert pred.standalone_qdq_layers == 1
    layer = pred.standalone_layers[0]
    assert layer.kind == "quantize" and layer.rule == "P10" and "graph input" in layer.reason
    assert pred.precision_transitions == 1


def test_c1_fan_out_to_float_reader_leaves_a_standalone_quantize():
    b = Builder()
    x = b.input("x", [1, 8, 16, 16])
    y = b.conv(x, 8, act="relu", name="conv_a")
    b.output(b.conv(y, 8, name="conv_b"))
    b.output(b.node("Sigmoid", [y], name="float_reader"))
    pred = predict(b.build())
    assert pred.precision_of("conv_a") == INT8_FLOAT
    assert rules_of(pred) == ["P10", "C1"]
    assert "float_reader" in pred.standalone_layers[1].reason


def test_c1_fan_out_all_quantized_with_one_scale_fuses():
    b = Builder()
    x = b.input("x", [1, 8, 16, 16])
    y = b.conv(x, 8, act="relu", name="conv_a")
    b.output(b.conv(y, 8, name="conv_b"))
    b.output(b.conv(y, 8, name="conv_c"))  # its own Q on y, same scale: merged (P6)
    pred = predict(b.build())
    assert pred.precision_of("conv_a") == INT8_INT8
    assert pred.standalone_qdq_layers == 1


def test_p6_two_scales_on_one_tensor_leave_two_quantizes():
    b = Builder()
    x = b.input("x", [1, 8, 16, 16])
    y = b.conv(x, 8, act="relu", name="conv_a")
    b.output(b.conv(y, 8, name="conv_b"))
    w = b.weight((8, 8, 3, 3))
    b.output(b.node("Conv", [b.qdq(y, scale=0.5), w], name="conv_c", kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    pred = predict(b.build())
    assert pred.precision_of("conv_a") == INT8_FLOAT
    assert rules_of(pred) == ["P10", "P6", "P6"]


@pytest.mark.parametrize("skip_quantized", [False, True])
def test_f5_residual_skip_decides_the_fused_output(skip_quantized):
    b = Builder()
    x = b.input("x", [1, 8, 16, 16])
    y = b.conv(x, 8, act="relu", name="stem")
    h = b.conv(y, 8, act="relu", name="branch_a")
    h = b.conv(h, 8, bn=True, name="branch_b")  # BN left unfused after the Conv (F3)
    skip = b.qdq(y) if skip_quantized else y
    out = b.node("Relu", [b.node("Add", [h, skip], name="add")], name="relu")
    b.output(b.conv(out, 8, name="next"))
    pred = predict(b.build())
    group = next(g for g in pred.fused_groups if g[0] == "branch_b")
    assert "add" in group and "relu" in group
    if skip_quantized:
        assert pred.precision_of("branch_b") == INT8_INT8
        assert pred.precision_of("stem") == INT8_INT8
        assert rules_of(pred) == ["P10"]
    else:
        assert pred.precision_of("branch_b") == INT8_FLOAT
        assert pred.precision_of("stem") == INT8_FLOAT  # C1: y also feeds the float skip
        assert sorted(rules_of(pred)) == ["C1", "F5", "P10"]
        f5 = next(s for s in pred.standalone_layers if s.rule == "F5")
        assert f5.kind == "quantize" and "add" in f5.reason


def test_f5_quantized_skip_but_float_reader_leaves_a_standalone_dequantize():
    b = Builder()
    x = b.input("x", [1, 8, 16, 16])
    y = b.conv(x, 8, act="relu", name="stem")
    h = b.conv(y, 8, name="branch")
    out = b.node("Add", [h, b.qdq(y)], name="add")
    b.output(b.node("GlobalAveragePool", [out], name="gap"))  # unquantized GAP: chain writes float
    pred = predict(b.build())
    assert pred.precision_of("branch") == INT8_FLOAT
    kinds = sorted((s.kind, s.rule) for s in pred.standalone_layers)
    assert kinds == [("dequantize", "F5"), ("quantize", "P10")]  # cf. DequantizeLinear_291 in §5


def test_p4_concat_with_mismatched_scales_requantizes():
    def build(scales):
        b = Builder()
        x = b.input("x", [1, 8, 16, 16])
        a = b.conv(x, 8, act="relu", name="conv_a")
        c = b.conv(x, 8, act="relu", name="conv_c")
        cat = b.node("Concat", [b.qdq(a, scale=scales[0]), b.qdq(c, scale=scales[1])], name="concat", axis=1)
        b.channels[cat] = 16
        w = b.weight((8, 16, 1, 1))
        b.output(b.node("Conv", [b.qdq(cat, scale=scales[2]), w], name="conv_out", kernel_shape=[1, 1]))
        return predict(b.build())

    aligned = build((0.1, 0.1, 0.1))
    assert aligned.standalone_qdq_layers == 1 and aligned.requantize == 0
    assert aligned.precision_of("conv_a") == INT8_INT8 and "concat" in aligned.int8_ops
    mismatched = build((0.1, 0.2, 0.3))
    assert mismatched.requantize == 2
    assert rules_of(mismatched).count("E3") == 2
    half = build((0.1, 0.2, 0.1))
    assert half.requantize == 1


def test_p4_concat_input_without_qdq_gets_a_quantize_that_fuses_into_its_producer():
    b = Builder()
    x = b.input("x", [1, 8, 16, 16])
    a = b.conv(x, 8, act="relu", name="conv_a")
    c = b.conv(x, 8, act="relu", name="conv_c")
    cat = b.node("Concat", [a, c], name="concat", axis=1)
    b.channels[cat] = 16
    b.output(b.conv(cat, 8, k=1, name="conv_out"))
    pred = predict(b.build())
    # The output Q moves back onto both inputs (C1 holds there), and fuses into both convs.
    assert pred.precision_of("conv_a") == INT8_INT8 and pred.precision_of("conv_c") == INT8_INT8
    assert pred.standalone_qdq_layers == 1


def test_p5_maxpool_scale_change_requantizes_and_f11_fuses_conv_act_pool():
    def build(s1, s2):
        b = Builder()
        x = b.input("x", [1, 8, 16, 16])
        y = b.conv(x, 8, act="relu", name="conv")
        p = b.node("MaxPool", [b.qdq(y, scale=s1)], name="pool", kernel_shape=[2, 2], strides=[2, 2])
        w = b.weight((8, 8, 3, 3))
        b.output(b.node("Conv", [b.qdq(p, scale=s2), w], name="conv_b", kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
        return predict(b.build())

    same = build(0.1, 0.1)
    assert same.standalone_qdq_layers == 1 and "pool" in same.int8_ops
    mismatch = build(0.1, 0.2)
    assert mismatch.requantize == 1 and "pool" in mismatch.int8_ops

    b = Builder()
    x = b.input("x", [1, 8, 16, 16])
    y = b.conv(x, 8, act="relu", name="conv")
    p = b.node("MaxPool", [y], name="pool", kernel_shape=[2, 2], strides=[2, 2])
    b.output(b.conv(p, 8, name="conv_b"))
    pred = predict(b.build())
    assert pred.precision_of("conv") == INT8_INT8
    assert "pool" in next(g for g in pred.fused_groups if g[0] == "conv")  # ConvActPool (F11)


@pytest.mark.parametrize("wrap", ["none", "input", "output", "both"])
def test_p7_wrapped_gap(wrap):
    b = Builder()
    x = b.input("x", [1, 8, 16, 16])
    y = b.conv(x, 8, act="relu", name="conv")
    if wrap in ("input", "both"):
        y = b.qdq(y)
    g = b.node("GlobalAveragePool", [y], name="gap")
    f = b.node("Flatten", [g], name="flatten", axis=1)
    b.output(b.gemm(f, 8, 4, qx=wrap in ("output", "both"), name="fc"))
    pred = predict(b.build())
    expected = {"none": ["P10"], "input": ["P10", "P7"], "output": ["P10", "P7"], "both": ["P10"]}[wrap]
    assert sorted(rules_of(pred)) == sorted(expected)
    if wrap == "input":
        assert [s.kind for s in pred.standalone_layers if s.rule == "P7"] == ["dequantize"]
        assert pred.precision_of("fc") == FLOAT
    if wrap == "output":
        assert [s.kind for s in pred.standalone_layers if s.rule == "P7"] == ["quantize"]
        assert pred.precision_of("conv") == INT8_FLOAT
    if wrap == "both":
        assert pred.precision_of("conv") == INT8_INT8 and "gap" in pred.int8_ops


def test_f1_float_weight_keeps_the_conv_float():
    b = Builder()
    x = b.input("x", [1, 8, 16, 16])
    y = b.conv(x, 8, qw=False, name="conv")
    b.output(b.conv(y, 8, name="conv_b"))
    pred = predict(b.build())
    assert pred.precision_of("conv") == FLOAT
    # The input DQ has a float reader and the next Q a float producer: both standalone (F1).
    assert [(s.kind, s.rule) for s in pred.standalone_layers] == [
        ("quantize", "P10"), ("dequantize", "F1"), ("quantize", "F1")]
    assert 0.0 < pred.int8_mac_fraction < 1.0


def test_p8_pad_zero_commutes_nonzero_does_not():
    def build(value):
        b = Builder()
        x = b.input("x", [1, 8, 16, 16])
        pads = b.const(np.asarray([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
        p = b.node("Pad", [b.qdq(x), pads, b.const(np.asarray(value, np.float32))], name="pad")
        w = b.weight((8, 8, 3, 3))
        b.output(b.node("Conv", [p, w], name="conv", kernel_shape=[3, 3]))
        return predict(b.build())

    zero = build(0.0)
    assert zero.precision_of("conv") == INT8_FLOAT and zero.standalone_qdq_layers == 1
    one = build(1.0)
    assert one.precision_of("conv") == FLOAT
    assert sorted(s.kind for s in one.standalone_layers) == ["dequantize", "quantize"]


def test_silu_epilogue_fuses():
    b = Builder()
    x = b.input("x", [1, 8, 16, 16])
    y = b.conv(x, 8, act="silu", name="conv")
    b.output(b.conv(y, 8, name="conv_b"))
    pred = predict(b.build())
    assert pred.precision_of("conv") == INT8_INT8
    assert len(next(g for g in pred.fused_groups if g[0] == "conv")) == 3


def test_int8_initializer_weights_uint8_zero_points_and_fp16_io():
    b = Builder(float_type=TensorProto.FLOAT16)
    x = b.input("x", [1, 8, 16, 16], dtype=TensorProto.FLOAT)
    h = b.node("Cast", [x], name="cast_in", to=TensorProto.FLOAT16)
    b.channels[h] = 8
    y = b.conv(h, 8, act="relu", name="conv", int8_init=True)
    y2 = b.conv(y, 8, name="conv_b")
    b.output(b.node("Cast", [y2], name="cast_out", to=TensorProto.FLOAT), TensorProto.FLOAT)
    pred = predict(b.build(opset=19))
    assert pred.precision_of("conv") == INT8_INT8 and pred.precision_of("conv_b") == INT8_FLOAT
    assert rules_of(pred) == ["P10"]

    b = Builder()
    x = b.input("x", [1, 8, 16, 16])
    y = b.node("Conv", [b.qdq(x, zp=np.asarray(128, np.uint8)), b.weight((8, 8, 3, 3))], name="conv",
               kernel_shape=[3, 3])
    b.output(y)
    assert predict(b.build()).precision_of("conv") == INT8_FLOAT


def test_macs_from_shapes():
    b = Builder()
    x = b.input("x", ["batch", 8, 16, 16])
    y = b.conv(x, 16, k=3, stride=2, name="conv")  # out 1x16x8x8, Cin 8, 3x3
    dw = b.conv(y, 16, k=3, group=16, name="dw")  # out 1x16x8x8, Cin/group 1, 3x3
    g = b.node("Flatten", [b.node("GlobalAveragePool", [dw])], axis=1)
    b.output(b.gemm(g, 16, 10, name="fc"))
    pred = predict(b.build())
    macs = {w["node"]: w["macs"] for w in pred.weighted_ops}
    assert macs == {"conv": 16 * 8 * 8 * 8 * 9, "dw": 16 * 8 * 8 * 9, "fc": 16 * 10}


def test_to_dict_keys_and_input_not_mutated():
    b = Builder()
    x = b.input("x", [1, 8, 16, 16])
    y = b.conv(x, 8, act="relu", name="conv_a")
    p = b.node("MaxPool", [y], kernel_shape=[2, 2])
    b.output(b.conv(p, 8, name="conv_b"))
    model = b.build()
    before = model.SerializeToString()
    graph = gs.import_onnx(model)
    snapshot = [(n.name, n.op, [t.name for t in n.inputs], [t.name for t in n.outputs]) for n in graph.nodes]
    d_graph = predict(graph).to_dict()
    d_model = predict(model).to_dict()
    assert model.SerializeToString() == before
    assert [(n.name, n.op, [t.name for t in n.inputs], [t.name for t in n.outputs]) for n in graph.nodes] == snapshot
    for key in ("int8_weighted_ops", "int8_mac_fraction", "standalone_qdq_layers", "standalone_qdq",
                "precision_transitions"):
        assert key in d_model
    assert d_graph["standalone_qdq"] == d_model["standalone_qdq"]
    with pytest.raises(TypeError):
        predict("model.onnx")  # type: ignore[arg-type]


# --- trt-rules §5: ResNet-18 on A100 (10 -> 3 -> 1 standalone Q/DQ) --------------------------------


def test_section5_resnet18_trend():
    naive, residual, qgap = (predict(resnet18(v)) for v in ("naive", "residual", "residual_qgap"))
    # §5 table: qat 10, qat-residual 3, qat-residual-qgap 1 standalone Q/DQ layers.
    assert (naive.standalone_qdq_layers, residual.standalone_qdq_layers, qgap.standalone_qdq_layers) == (10, 3, 1)
    assert sorted(s.kind for s in residual.standalone_layers) == ["dequantize", "quantize", "quantize"]
    assert "maxpool" in residual.int8_ops and "maxpool" not in naive.int8_ops  # C1 then F11
    assert all(w["precision"] != FLOAT for w in naive.weighted_ops)
    int8_out = [sum(w["precision"] == INT8_INT8 for w in p.weighted_ops) for p in (naive, residual, qgap)]
    assert int8_out[0] < int8_out[1] < int8_out[2]


# --- real engine dumps ------------------------------------------------------------------------------


def _engine_int8_to_float(path: Path) -> int:
    """Conv/Gemm layers of a dump reading Int8 and writing a float type (E2's pattern)."""
    n = 0
    for layer in engine_layers(path):
        if layer.get("LayerType") in ("Reformat", "NoOp") or not layer.get("Inputs"):
            continue
        if "Convolution" not in str(layer.get("LayerType")):
            continue
        fin = layer["Inputs"][0].get("Format/Datatype", "")
        fout = layer["Outputs"][0].get("Format/Datatype", "")
        if "Int8" in fin and "Int8" not in fout:
            n += 1
    return n


@pytest.mark.slow
def test_mobilenet_v2_engines_standalone_qdq_agree():
    for p in (NAIVE_JSON, RESIDUAL_JSON, SHARED / "models" / "fp32" / "mobilenetv2_bottleneck.onnx"):
        need(p)
    naive = predict(mobilenet_v2_from_shared(residual=False))
    residual = predict(mobilenet_v2_from_shared(residual=True))
    actual_naive, actual_residual = count_origin(NAIVE_JSON), count_origin(RESIDUAL_JSON)
    assert naive.standalone_qdq_layers == actual_naive  # 17 == 17
    assert residual.standalone_qdq_layers == actual_residual  # 2 == 2
    assert naive.standalone_qdq_layers > residual.standalone_qdq_layers
    # Weighted layers writing float (Int8 in, FP16/FP32 out) agree too.
    for pred, path in ((naive, NAIVE_JSON), (residual, RESIDUAL_JSON)):
        assert sum(w["precision"] == INT8_FLOAT for w in pred.weighted_ops) == _engine_int8_to_float(path)
        assert pred.int8_weighted_ops == 53 and pred.int8_mac_fraction == 1.0
    # Everything the engine lists as a standalone Q is a Quantize here too: 15 block outputs + input + classifier.
    assert sorted(s.kind for s in naive.standalone_layers) == ["quantize"] * actual_naive


@pytest.mark.slow
def test_tf_resnet50_qat_engine_standalone_qdq_agree():
    need(TF_RESNET_JSON)
    pred = predict(tf_resnet50())
    assert pred.standalone_qdq_layers == count_origin(TF_RESNET_JSON)  # 1: the input Quantize
    assert rules_of(pred) == ["P10"]
    assert {"pool1_pool", "avg_pool"} <= set(pred.int8_ops)  # CudaPooling Int8 in the dump
    assert sum(w["precision"] == INT8_FLOAT for w in pred.weighted_ops) == _engine_int8_to_float(TF_RESNET_JSON)


# --- every shared Q/DQ model ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("path", QDQ_MODELS, ids=lambda p: p.stem)
def test_shared_qdq_models(path):
    model = onnx.load(str(path))
    start = time.perf_counter()
    pred = predict(model)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, elapsed  # the brief: < 1 s on a few-hundred-node model
    d = pred.to_dict()
    assert pred.weighted_ops and 0 < pred.int8_weighted_ops <= len(pred.weighted_ops)
    assert 0.9 <= d["int8_mac_fraction"] <= 1.0
    assert d["standalone_qdq_layers"] == len(d["standalone_qdq"]) >= 1  # at least the input Quantize
    assert pred.standalone_layers[0].rule == "P10" or any(s.rule == "P10" for s in pred.standalone_layers)
    assert set(pred.standalone_reasons) == set(d["standalone_qdq"])
    assert d["precision_transitions"] <= d["standalone_qdq_layers"]
    n_qdq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    assert d["standalone_qdq_layers"] < n_qdq


@pytest.mark.slow
def test_pytorch_qat_export_matches_the_naive_engine_pattern():
    path = SHARED / "models" / "qdq" / "mobilenetv2_bottleneck_torch_qat_export.onnx"
    need(path)
    pred = predict(onnx.load(str(path)))
    # Same placement as the TREx naive engine minus its classifier: input + 15 block outputs.
    assert pred.standalone_qdq_layers == 16
    assert sorted(set(rules_of(pred))) == ["C1", "F5", "P10"]


def _engine_qdq_sites(path: Path) -> list[str]:
    """Where each standalone Q/DQ of a dump sits: 'input', 'features.N' (its producer's block) or 'head'."""
    import re

    layers = engine_layers(path)
    writer = {t["Name"]: layer["Name"] for layer in layers for t in layer.get("Outputs", [])}
    sites = []
    for layer in layers:
        if layer.get("Origin") != "QDQ":
            continue
        src = writer.get(layer["Inputs"][0]["Name"])
        block = re.search(r"features\.(\d+)\.", src or "")
        sites.append("input" if src is None else f"features.{block.group(1)}" if block else "head")
    return sorted(sites)


def _predicted_sites(pred: TrtPrediction) -> list[str]:
    import re

    sites = []
    for s in pred.standalone_layers:
        block = re.search(r"features\.(\d+)/", s.tensor)
        sites.append("input" if s.tensor == "input" else f"features.{block.group(1)}" if block else "head")
    return sorted(sites)


@pytest.mark.slow
@pytest.mark.parametrize("residual", [False, True], ids=["naive", "residual"])
def test_mobilenet_v2_standalone_qdq_sit_where_the_engine_has_them(residual):
    path = RESIDUAL_JSON if residual else NAIVE_JSON
    need(path)
    need(SHARED / "models" / "fp32" / "mobilenetv2_bottleneck.onnx")
    pred = predict(mobilenet_v2_from_shared(residual=residual))
    assert _predicted_sites(pred) == _engine_qdq_sites(path)


def test_float_model_has_no_int8_and_no_standalone_qdq():
    b = Builder()
    x = b.input("x", [1, 8, 16, 16])
    y = b.conv(x, 8, qx=False, qw=False, act="relu", name="conv")
    b.output(b.conv(y, 8, qx=False, qw=False, name="conv_b"))
    pred = predict(b.build())
    assert pred.standalone_qdq_layers == 0 and pred.precision_transitions == 0
    assert pred.int8_weighted_ops == 0 and pred.int8_mac_fraction == 0.0
    assert {w["precision"] for w in pred.weighted_ops} == {FLOAT}


# --- GELU as a GEMM epilogue (F3; MatMul+bias+Erf-GELU fused in one kernel, NVIDIA/TensorRT#4397) ----


def _mlp(gelu: str = "erf", tap_erf: bool = False) -> onnx.ModelProto:
    """x → MatMul(W1) + b1 → GELU → MatMul(W2) + b2 → y; ``gelu``: "erf" (exported form) or "op" (opset 20 Gelu)."""
    from onnx import helper

    from .helpers import init, make_model

    rng = np.random.default_rng(7)
    inits = [init("w1", rng.normal(0, 0.3, (16, 32)).astype(np.float32)), init("b1", rng.normal(0, 0.1, 32).astype(np.float32)),
             init("w2", rng.normal(0, 0.3, (32, 16)).astype(np.float32)), init("b2", rng.normal(0, 0.1, 16).astype(np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="mm1"), helper.make_node("Add", ["h0", "b1"], ["h"], name="bias1")]
    if gelu == "op":
        nodes.append(helper.make_node("Gelu", ["h"], ["g"], name="gelu"))
    else:
        inits += [init("sqrt2", np.float32(np.sqrt(2.0))), init("one", np.float32(1.0)), init("half", np.float32(0.5))]
        nodes += [helper.make_node("Div", ["h", "sqrt2"], ["d"], name="gelu.div"),
                  helper.make_node("Erf", ["d"], ["e"], name="gelu.erf"),
                  helper.make_node("Add", ["e", "one"], ["a"], name="gelu.add"),
                  helper.make_node("Mul", ["h", "a"], ["m"], name="gelu.mul"),
                  helper.make_node("Mul", ["m", "half"], ["g"], name="gelu.mul_1")]
    nodes += [helper.make_node("MatMul", ["g", "w2"], ["y0"], name="mm2"), helper.make_node("Add", ["y0", "b2"], ["y"], name="bias2")]
    outputs = [("y", TensorProto.FLOAT, [1, 8, 16])] + ([("e", TensorProto.FLOAT, [1, 8, 32])] if tap_erf else [])
    return make_model(nodes, [("x", TensorProto.FLOAT, [1, 8, 16])], outputs, inits, opset=20 if gelu == "op" else 17)


@pytest.mark.parametrize("gelu", ["erf", "op"])
def test_gelu_after_matmul_is_an_epilogue(gelu):
    import qdqsurgeon

    from .passes.placement_graphs import ranges_of

    from qdqsurgeon.config import Config

    model = _mlp(gelu)
    res = qdqsurgeon.optimize(model, ranges=ranges_of(model), config=Config(keep_output_layers=True))
    pred = predict(res.model)
    # mm1 + bias + GELU + the Q mm2 reads form one INT8 kernel; only the input Quantize stays
    assert pred.precision_of("mm1") == INT8_INT8 and pred.precision_of("mm2") == INT8_FLOAT
    assert pred.standalone_qdq_layers == 1 and rules_of(pred) == ["P10"]
    fused = next(w["fused"] for w in pred.to_dict()["weighted_ops"] if w["node"] == "mm1")
    assert list(fused) == (["mm1", "bias1", "gelu"] if gelu == "op" else
                           ["mm1", "bias1", "gelu.div", "gelu.erf", "gelu.add", "gelu.mul", "gelu.mul_1"])


def test_gelu_near_miss_intermediate_read_outside():
    import qdqsurgeon

    from .passes.placement_graphs import ranges_of

    from qdqsurgeon.config import Config

    model = _mlp("erf", tap_erf=True)  # erf(x/√2) is also a graph output: the GELU cannot fuse
    res = qdqsurgeon.optimize(model, ranges=ranges_of(model), config=Config(keep_output_layers=True))
    pred = predict(res.model)
    assert pred.precision_of("mm1") == INT8_FLOAT
    assert pred.standalone_qdq_layers == 2  # input Quantize + the Quantize after the float GELU


# --- INT8 MHA fusion (Q/DQ before both batch GEMMs; NVIDIA/TensorRT#3243) -------------------------


def _attention(cap: bool = False, bias: bool = False) -> onnx.ModelProto:
    """x → query/key/value MatMuls (+ bias Adds ``q_bias``...) → scores = q·kᵀ / √d + mask → Softmax
    → context = p·v → out MatMul → tail MatMul."""
    from onnx import helper

    from .helpers import init, make_model

    rng = np.random.default_rng(3)
    nodes = []
    for p, name in (("q", "query"), ("k", "key"), ("v", "value")):
        nodes.append(helper.make_node("MatMul", ["x", f"w{p}"], [f"{p}0" if bias else p], name=name))
        if bias:
            nodes.append(helper.make_node("Add", [f"{p}0", f"b{p}"], [p], name=f"{p}_bias"))
    nodes += [helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["s0"], name="scores"),
             helper.make_node("Div", ["s0", "sqrt_d"], ["s1" if not cap else "s1c"], name="scale"),
             *([helper.make_node("Tanh", ["s1c"], ["s1"], name="softcap")] if cap else []),
             helper.make_node("Add", ["s1", "mask"], ["s"], name="mask_add"),
             helper.make_node("Softmax", ["s"], ["p"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["c"], name="context"),
             helper.make_node("MatMul", ["c", "wo"], ["o"], name="out"),
             helper.make_node("Relu", ["o"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "wt"], ["y"], name="tail")]
    inits = [init(n, rng.standard_normal((8, 8)).astype(np.float32) * 0.4) for n in ("wq", "wk", "wv", "wo", "wt")]
    inits.append(init("sqrt_d", np.float32(np.sqrt(8.0))))
    if bias:
        inits += [init(f"b{p}", rng.standard_normal(8).astype(np.float32) * 0.1) for p in "qkv"]
    return make_model(nodes, [("x", TensorProto.FLOAT, [1, 4, 8]), ("mask", TensorProto.FLOAT, [1, 4, 4])],
                      [("y", TensorProto.FLOAT, [1, 4, 8])], inits)


def test_mha_with_both_batch_gemms_quantized_absorbs_the_softmax_quantize():
    import qdqsurgeon
    from qdqsurgeon.config import Config

    from .passes.placement_graphs import ranges_of

    model = _attention()
    res = qdqsurgeon.optimize(model, ranges=ranges_of(model), config=Config(quantize_bmm=True))
    pred = predict(res.model)
    prod = {o: n for n in res.model.graph.node for o in n.output}
    for bmm in ("scores", "context"):
        node = next(n for n in res.model.graph.node if n.name == bmm)
        assert [prod[t].op_type for t in node.input] == ["DequantizeLinear", "DequantizeLinear"]
    # the Softmax output Quantize lives inside the fused MHA kernel; only the input Quantize stays
    assert pred.standalone_qdq == ["x_QuantizeLinear"]
    # the default quantizes the GEMMs of a recognised attention block the same way
    default = qdqsurgeon.optimize(model, ranges=ranges_of(model)).model
    assert predict(default).standalone_qdq == ["x_QuantizeLinear"]
    assert _q_inputs(default) == _q_inputs(res.model)
    # near miss: with --no-quantize-bmm the batch GEMMs run float, and the context output's
    # Quantize before the out projection is a kernel of its own
    plain = predict(qdqsurgeon.optimize(model, ranges=ranges_of(model), config=Config(quantize_bmm=False)).model)
    assert plain.standalone_qdq == ["x_QuantizeLinear", "c_QuantizeLinear"]


def _q_inputs(model: onnx.ModelProto) -> list[str]:
    return sorted(n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear")


def test_mha_near_miss_unknown_op_between_the_gemms():
    import qdqsurgeon
    from qdqsurgeon.config import Config

    from .passes.placement_graphs import ranges_of

    model = _attention(cap=True)  # a Tanh soft-cap between the GEMMs: not an MHA pattern TensorRT fuses
    res = qdqsurgeon.optimize(model, ranges=ranges_of(model), config=Config(quantize_bmm=True))
    pred = predict(res.model)
    assert pred.standalone_qdq == ["x_QuantizeLinear", "p_QuantizeLinear"]
    # by default the soft-capped attention is not recognised: its batch GEMMs stay float, and the
    # change log says why
    default = qdqsurgeon.optimize(model, ranges=ranges_of(model))
    prod = {o: n for n in default.model.graph.node for o in n.output}
    for bmm in ("scores", "context"):
        node = next(n for n in default.model.graph.node if n.name == bmm)
        assert all(t not in prod or prod[t].op_type != "DequantizeLinear" for t in node.input)
    assert any(c.node == "scores" and "outside an attention block" in c.detail for c in default.changes)
    assert predict(default.model).standalone_qdq == ["x_QuantizeLinear", "c_QuantizeLinear"]


def test_q_after_a_pad_on_the_network_input_stays_there():
    """TF QAT ResNet-50 dump (TRT 8.x): the Pad reading the network input ran as a float Slice with a
    standalone Quantize after it, while the Pad after conv1 took its Q across and ran INT8."""
    b = Builder()
    x = b.input("x", [1, 8, 16, 16])
    pad = b.node("Pad", [x, b.const(np.asarray([0, 0, 1, 1, 0, 0, 1, 1], np.int64))], name="pad_in")
    b.channels[pad] = 8
    y = b.conv(pad, 8, act="relu", name="conv")  # Q/DQ after the Pad, as the TF toolkit places it
    mid = b.node("Pad", [y, b.const(np.asarray([0, 0, 1, 1, 0, 0, 1, 1], np.int64))], name="pad_mid")
    b.channels[mid] = 8
    b.output(b.conv(mid, 8, name="conv_b"))
    pred = predict(b.build())
    assert [(s.kind, s.tensor, s.rule) for s in pred.standalone_layers] == [("quantize", "pad_in_out", "P10")]
    prec = {k.name: (k.in_precision, k.out_precision) for k in pred.kernels}
    assert prec["pad_in"] == ("float", "float")
    assert prec["pad_mid"] == ("int8", "int8"), prec
