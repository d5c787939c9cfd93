"""Findings on small synthetic dumps: one per rule branch (E2, E3), ONNX mapping (E4) and the
predicted-vs-actual comparison with qdqsurgeon.analysis."""

from __future__ import annotations

import sys
import types

import pytest
from trt_helpers import layer, qdq_conv_model, tensor, write_json

from qdqsurgeon.trt.engine import parse_layer_info
from qdqsurgeon.trt.report import build_report, engine_report

I8 = "Thirty-two wide channel vectorized row major Int8 format"
F16 = "Channel major FP16 format where channel % 8 == 0"
F32 = "Row major linear FP32"


def _report(layers: list[dict], bindings: list[str] | None = None):
    return build_report(parse_layer_info({"Layers": layers, "Bindings": bindings or ["x"]}))


def test_e3_requantize_between_int8_layers_needs_align_scales() -> None:
    # E3: a QDQ-origin layer Int8 → Int8 is a requantize (scale mismatch at Concat/MaxPool/fan-out).
    rep = _report(
        [
            layer("Conv_1", "CaskConvolution", [tensor("x", I8)], [tensor("a", I8)], ParameterType="Convolution"),
            layer("QuantizeLinear_2", "Reformat", [tensor("a", I8)], [tensor("b", I8)], Origin="QDQ"),
            layer("MaxPool_3", "CaskPooling", [tensor("b", I8)], [tensor("c", I8)], ParameterType="Pooling"),
        ]
    )
    (f,) = rep.findings
    assert (f.rule, f.layer, f.fix_pass) == ("E3", "QuantizeLinear_2", "align-scales")
    assert rep.standalone_qdq_layers == 1
    assert (f.pattern, f.kind, f.cost_layers) == ("E3/P4", "requantize", [1])
    (g,) = rep.finding_groups()
    assert (g.pattern, g.fix_pass, g.time_ms) == ("E3/P4", "align-scales", None)  # no profile: no cost


def test_e2_quantize_with_a_float_consumer_needs_move_qdq() -> None:
    # C1: the conv output feeds a float layer and a quantized one, so it stays float.
    rep = _report(
        [
            layer("Conv_1 + Relu_2", "CaskConvolution", [tensor("x", I8)], [tensor("a", F16)], ParameterType="Convolution"),
            layer("Sigmoid_3", "PointWise", [tensor("a", F16)], [tensor("s", F16)], ParameterType="PointWise"),
            layer("QuantizeLinear_4", "Reformat", [tensor("a", F16)], [tensor("q", I8)], Origin="QDQ"),
            layer("Conv_5", "CaskConvolution", [tensor("q", I8)], [tensor("y", I8)], ParameterType="Convolution"),
        ]
    )
    fixes = {f.layer: f.fix_pass for f in rep.findings}
    assert fixes == {"Conv_1 + Relu_2": "move-qdq", "QuantizeLinear_4": "move-qdq"}
    # Both findings are one pattern and charge the same Quantize kernel (layer 2), once.
    assert [f.cost_layers for f in rep.findings] == [[2], [2]]
    (g,) = rep.finding_groups()
    assert (g.pattern, g.cost_layers, g.kinds) == ("E2/C1", [2], {"INT8 layer writes float": 1, "standalone Quantize": 1})
    assert "Sigmoid_3" in rep.findings[0].message


def test_e2_standalone_dequantize_before_float_pooling() -> None:
    rep = _report(
        [
            layer("DequantizeLinear_1", "Reformat", [tensor("x", I8)], [tensor("a", F32)], Origin="QDQ"),
            layer("GlobalAveragePool_2", "CudaPooling", [tensor("a", F32)], [tensor("b", F32)], ParameterType="Pooling"),
        ]
    )
    (f,) = rep.findings
    assert (f.rule, f.fix_pass) == ("E2", "quantize-pooling")
    assert "Dequantize" in f.message


def test_e2_float_precision_reformat_is_info_without_a_pass() -> None:
    rep = _report(
        [
            layer("Reformatting CopyNode for Input Tensor 0 to Softmax_1", "Reformat", [tensor("a", F16)], [tensor("b", F32)], Origin="REFORMAT"),
            layer("Softmax_1", "CudaSoftMax", [tensor("b", F32)], [tensor("c", F32)], ParameterType="SoftMax"),
        ]
    )
    (f,) = rep.findings
    assert (f.rule, f.fix_pass, f.severity) == ("E2", None, "info")
    assert f.onnx_nodes == ["Softmax_1"]  # E4: a reformat is attributed to the layer it feeds
    assert rep.reformat_layers == 1 and rep.standalone_qdq_layers == 0


def test_layout_only_reformat_and_final_float_layer_are_not_findings() -> None:
    rep = _report(
        [
            layer("Reformatting CopyNode for Input Tensor 0 to Conv_1", "Reformat", [tensor("x", F16)], [tensor("a", "Row major linear FP16 format")], Origin="REFORMAT"),
            layer("Gemm_2", "CaskConvolution", [tensor("a", I8)], [tensor("y", F32)], ParameterType="Convolution"),  # P9: fine
        ]
    )
    assert rep.findings == []


def test_onnx_mapping_drops_names_that_are_not_nodes(tmp_path) -> None:
    # E4 rule 2 (no Metadata): split the Name, keep only real node names (weights dropped).
    model = qdq_conv_model(tmp_path / "m.onnx")
    dump = write_json(
        tmp_path / "l.json",
        {
            "Layers": [
                layer("QuantizeLinear_1", "Reformat", [tensor("x", F32)], [tensor("xq", I8)], Origin="QDQ"),
                layer("conv.weight + QuantizeLinear_3 + Conv_5 + PWN(Relu_6)", "CaskConvolution", [tensor("xq", I8)], [tensor("y", F16)], ParameterType="Convolution"),
                layer("QuantizeLinear_9", "Reformat", [tensor("y", F16)], [tensor("z", I8)], Origin="QDQ"),
                layer("Conv_10", "CaskConvolution", [tensor("z", I8)], [tensor("w", I8)], ParameterType="Convolution", Metadata="[ONNX Layer: Conv_5]\x1e[ONNX Layer: Ghost_1]"),
            ],
            "Bindings": ["x", "w"],
        },
    )
    rep = engine_report(dump, onnx_model=model)
    assert rep.rows[1].onnx_nodes == ["QuantizeLinear_3", "Conv_5", "Relu_6"]
    assert rep.rows[3].onnx_nodes == ["Conv_5"]  # Metadata wins; names not in the model dropped
    assert rep.rows[2].onnx_nodes == []  # QuantizeLinear_9 is not in this model
    conv_finding = next(f for f in rep.findings if f.layer.startswith("conv.weight"))
    assert conv_finding.onnx_nodes == ["QuantizeLinear_3", "Conv_5", "Relu_6"]
    assert rep.onnx_nodes_total == 6 and rep.onnx_nodes_mapped == 4
    assert rep.to_dict()["findings"][0]["onnx_nodes"] == ["QuantizeLinear_1"]


def _dump_with_one_qdq(tmp_path):
    return write_json(
        tmp_path / "l.json",
        {
            "Layers": [
                layer("QuantizeLinear_1", "Reformat", [tensor("x", F32)], [tensor("xq", I8)], Origin="QDQ"),
                layer("conv.weight + QuantizeLinear_3 + Conv_5 + Relu_6", "CaskConvolution", [tensor("xq", I8)], [tensor("y", F32)], ParameterType="Convolution"),
            ],
            "Bindings": ["x", "y"],
        },
    )


def test_predicted_vs_actual_when_analysis_is_available(tmp_path, monkeypatch) -> None:
    model = qdq_conv_model(tmp_path / "m.onnx")
    fake = types.ModuleType("qdqsurgeon.analysis")

    class TrtPrediction:
        standalone_qdq = ["QuantizeLinear_1", "DequantizeLinear_4"]
        standalone_qdq_layers = 2

    fake.predict = lambda m: TrtPrediction()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "qdqsurgeon.analysis", fake)
    rep = engine_report(_dump_with_one_qdq(tmp_path), onnx_model=model)
    assert rep.prediction is not None
    d = rep.to_dict()["prediction"]
    assert d["predicted_standalone_qdq_layers"] == 2 and d["actual_standalone_qdq_layers"] == 1
    assert d["matched"] == ["QuantizeLinear_1"] and d["only_predicted"] == ["DequantizeLinear_4"]
    assert "predicted vs actual: 2 vs 1" in rep.to_text()


def test_prediction_left_out_silently_without_analysis_module(tmp_path, monkeypatch) -> None:
    model = qdq_conv_model(tmp_path / "m.onnx")
    monkeypatch.setitem(sys.modules, "qdqsurgeon.analysis", None)  # import fails
    rep = engine_report(_dump_with_one_qdq(tmp_path), onnx_model=model)
    assert rep.prediction is None
    assert "prediction" not in rep.to_dict()
    assert "predicted" not in rep.to_text()


def test_bad_onnx_model_is_model_error(tmp_path) -> None:
    from qdqsurgeon.errors import ModelError, UsageError

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ModelError):
        engine_report(_dump_with_one_qdq(tmp_path), onnx_model=bad)
    with pytest.raises(UsageError):
        engine_report(_dump_with_one_qdq(tmp_path), onnx_model=tmp_path / "missing.onnx")
