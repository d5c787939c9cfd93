"""Parser unit tests: precision tokens, TRT 8/10/11 spellings, names-only dumps, robust loading, errors (§4)."""

from __future__ import annotations

import pytest
from trt_helpers import layer, tensor, write_json

from qdqsurgeon.errors import ModelError, UsageError
from qdqsurgeon.trt.engine import (
    load_layer_info,
    load_profile,
    onnx_names_from_layer_name,
    onnx_names_from_metadata,
    parse_layer_info,
    parse_profile,
    precision_of,
)


@pytest.mark.parametrize(
    ("text", "token"),
    [
        ("Row major linear FP32", "fp32"),
        ("Row major linear FP16 format", "fp16"),
        ("Row major Int8 format", "int8"),
        ("Four wide channel vectorized row major Int8 format", "int8"),
        ("Thirty-two wide channel vectorized row major Int8 format", "int8"),
        ("Two wide channel vectorized row major FP16 format", "fp16"),
        ("Channel major FP16 format where channel % 8 == 0", "fp16"),
        ("Row major linear Int32", "int32"),
        ("Float", "fp32"),
        ("Half", "fp16"),
        ("Int64", "int64"),
        ("BFloat16", "bf16"),  # before Float: must not read as fp32
        ("UInt8", "uint8"),  # before Int8
        ("FP8", "fp8"),
        ("Bool", "bool"),
        ("kINT8", "int8"),  # TRT 11 data-type enum spelling (unconfirmed, §7.2)
        ("Row major linear (kLINEAR)", None),
        ("", None),
    ],
)
def test_precision_tokens(text: str, token: str | None) -> None:
    assert precision_of(text) == token


def test_trt8_single_format_key() -> None:
    doc = {
        "Layers": [layer("Q", "Reformat", [tensor("x", "Row major linear FP32")], [tensor("xq", "Row major Int8 format")], Origin="QDQ", ParameterType="Reformat")],
        "Bindings": ["x", "xq"],
    }
    eng = parse_layer_info(doc)
    (q,) = eng.layers
    assert q.in_precisions == ["fp32"] and q.out_precisions == ["int8"]
    assert q.is_standalone_qdq and not q.is_reformat
    assert [t.name for t in eng.io_tensors] == ["x", "xq"]


@pytest.mark.parametrize("dtype_key", ["DataType", "Datatype"])
def test_trt11_split_format_and_io_tensors(dtype_key: str) -> None:
    # TRT 11 splits Format/Datatype; the data-type field wins, the "(kLINEAR)" suffix is stripped.
    t_in = {"Name": "x", "Dimensions": [1, 3, 8, 8], "Format": "Row major linear (kLINEAR)", dtype_key: "Float"}
    t_out = {"Name": "y", "Dimensions": [1, 3, 8, 8], "Format": "Thirty-two wide channel vectorized (kCHW32)", dtype_key: "Int8"}
    doc = {
        "Layers": [{"Name": "QuantizeLinear_1", "LayerType": "Reformat", "Origin": "QDQ", "Inputs": [t_in], "Outputs": [t_out]}],
        "I/O Tensors": [
            {"Name": "x", "IOMode": "Input", "DataType": "Float", "Dimensions": [1, 3, 8, 8]},
            {"Name": "y", "IOMode": "Output", "DataType": "Int8", "Dimensions": [1, 3, 8, 8]},
        ],
    }
    eng = parse_layer_info(doc)
    q = eng.layers[0]
    assert q.inputs[0].format == "Row major linear"
    assert (q.in_precisions, q.out_precisions) == (["fp32"], ["int8"])
    assert [(t.name, t.mode, t.precision) for t in eng.io_tensors] == [("x", "input", "fp32"), ("y", "output", "int8")]


def test_scale_layer_with_int8_on_one_side_is_standalone_qdq() -> None:
    # Some versions list an unfused Q/DQ as a Scale layer without Origin (§4).
    doc = {"Layers": [layer("DequantizeLinear_7", "Scale", [tensor("a", "Row major Int8 format")], [tensor("b", "Row major linear FP32")])]}
    assert parse_layer_info(doc).layers[0].is_standalone_qdq
    doc = {"Layers": [layer("Scale_7", "Scale", [tensor("a", "Row major linear FP32")], [tensor("b", "Row major linear FP32")])]}
    assert not parse_layer_info(doc).layers[0].is_standalone_qdq


def test_parameter_type_preferred_over_layer_type() -> None:
    doc = {"Layers": [layer("c", "CaskConvolution", [], [], ParameterType="Convolution"), layer("n", "NoOp", [], [])]}
    assert [l.kind for l in parse_layer_info(doc).layers] == ["Convolution", "NoOp"]


def test_names_only_dump() -> None:
    eng = parse_layer_info({"Layers": ["Conv_1 + Relu_2", "Reformatting CopyNode for Input Tensor 0 to Conv_3"], "Bindings": ["x", "y"]})
    assert not eng.detailed
    assert [l.name for l in eng.layers][0] == "Conv_1 + Relu_2"


def test_log_lines_around_json(tmp_path) -> None:
    body = '{"Layers": ["a", "b"], "Bindings": ["x"]}'
    p = tmp_path / "dump.log"
    p.write_text("[I] building...\n[I] Layer Information:\n" + body + "\n&&&& PASSED TensorRT.trtexec\n")
    eng = load_layer_info(p)
    assert len(eng.layers) == 2


def test_missing_file_is_usage_error(tmp_path) -> None:
    with pytest.raises(UsageError, match="file not found"):
        load_layer_info(tmp_path / "nope.json")


def test_not_json_is_model_error(tmp_path) -> None:
    p = tmp_path / "x.json"
    p.write_text("this is not json at all\n")
    with pytest.raises(ModelError, match="not JSON"):
        load_layer_info(p)


@pytest.mark.parametrize("doc", [{"foo": 1}, 42, {"Layers": "abc"}])
def test_json_that_is_not_a_dump(tmp_path, doc) -> None:
    with pytest.raises(ModelError, match="not a TensorRT layer-info dump"):
        load_layer_info(write_json(tmp_path / "x.json", doc))


def test_profile_given_as_layer_info(tmp_path) -> None:
    p = write_json(tmp_path / "p.json", [{"count": 3}, {"name": "a", "timeMs": 3, "averageMs": 1, "percentage": 100}])
    with pytest.raises(ModelError, match="--exportProfile"):
        load_layer_info(p)


def test_profile_parse_old_and_new_records(tmp_path) -> None:
    prof = parse_profile(
        [
            {"count": 4},
            {"name": "a", "timeMs": 4.0, "averageMs": 1.0, "medianMs": 0.9, "percentage": 80.0},
            {"name": "b", "timeMs": 1.0, "averageMs": 0.25, "percentage": 20.0},  # no medianMs (old trtexec)
        ]
    )
    assert prof.count == 4
    assert [r.name for r in prof.records] == ["a", "b"]
    assert prof.records[1].median_ms is None
    assert prof.total_average_ms == pytest.approx(1.25)
    with pytest.raises(ModelError, match="layer info, not an --exportProfile"):
        load_profile(write_json(tmp_path / "l.json", {"Layers": []}))


def test_onnx_names_from_metadata_both_separators() -> None:
    # E4: TRT 10 joins Cask fusions with \x1e and Myelin fusions with \x1f.
    assert onnx_names_from_metadata("[ONNX Layer: Conv_34]\x1e[ONNX Layer: Add_36]") == ["Conv_34", "Add_36"]
    assert onnx_names_from_metadata("[ONNX Layer: node_linear]\x1f[ONNX Layer: node_relu_2]") == ["node_linear", "node_relu_2"]
    assert onnx_names_from_metadata("") == []


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("layer1.0.conv2.weight + QuantizeLinear_32 + Conv_34 + Add_42 + Relu_43", ["layer1.0.conv2.weight", "QuantizeLinear_32", "Conv_34", "Add_42", "Relu_43"]),
        ("features.0.0.weight + QuantizeLinear_8 + Conv_12 + PWN(Clip_16)", ["features.0.0.weight", "QuantizeLinear_8", "Conv_12", "Clip_16"]),
        ("PWN(PWN(/Sub), PWN(/Div))", ["/Sub", "/Div"]),
        ("classifier.1.weight + Gemm_864 + (Unnamed Layer* 850) [ElementWise]", ["classifier.1.weight", "Gemm_864"]),
        ("Reformatting CopyNode for Input Tensor 0 to GlobalAveragePool_843", []),
        ("copied_squeeze_after_(Unnamed Layer* 850) [ElementWise]", []),
        ("{ForeignNode[/enc/MatMul.../enc/Add_3]}", ["/enc/MatMul", "/enc/Add_3"]),
        ("A/MatMul + A/Add || B/MatMul + B/Add", ["A/MatMul", "A/Add", "B/MatMul", "B/Add"]),
        ("Conv_9 [profile 1]", ["Conv_9"]),
    ],
)
def test_onnx_names_from_layer_name(name: str, expected: list[str]) -> None:
    assert onnx_names_from_layer_name(name) == expected
