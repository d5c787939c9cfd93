"""Data types and quantization formats end to end (issues 12.4, 17.1, 17.2, 17.5).

Each case goes through the CLI and checks what a user sees: the exit code, one stderr line on a
refusal, the input byte-identical, and on exit 0 a valid output whose numerics are what the
change log says (bit-exact where nothing but notes was logged). Models are built in code:
block-quantized INT4/INT8 weights (opset 21, as ModelOpt and onnxruntime write them), FP8 and
INT16 Q/DQ, float16 and bfloat16 float models.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from qdqsurgeon.calibration.collect import float32_copy
from qdqsurgeon.cli import cli
from qdqsurgeon.graph import import_model, qparams
from qdqsurgeon.inspection import inspect_model
from qdqsurgeon.quant import dequantize

from .helpers import random_feeds, run

_NP = {TP.INT4: ml_dtypes.int4, TP.UINT4: ml_dtypes.uint4, TP.INT8: np.int8, TP.INT16: np.int16, TP.UINT16: np.uint16,
       TP.FLOAT8E4M3FN: ml_dtypes.float8_e4m3fn, TP.FLOAT16: np.float16, TP.BFLOAT16: ml_dtypes.bfloat16}


# -- model builders -------------------------------------------------------------------------------
def _model(nodes, inputs, outputs, inits, opset: int = 21, ir: int = 10) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "formats", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    onnx.checker.check_model(model, full_check=True)
    return model


def _vi(name: str, elem: int, shape: list[int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _block_weight(name: str, shape: tuple[int, ...], axis: int, block: int, qtype: int, rng, zero_point=None):
    """A weight quantized symmetrically per block of ``axis``: (DQ node, initializers)."""
    w = rng.standard_normal(shape).astype(np.float32)
    qmax = 7 if qtype in (TP.INT4, TP.UINT4) else 127
    nb = shape[axis] // block
    blocks = w.reshape(*shape[:axis], nb, block, *shape[axis + 1:])
    scale = (np.abs(blocks).max(axis=axis + 1) / qmax).astype(np.float32)
    q = np.clip(np.rint(w / np.repeat(scale, block, axis=axis)), -qmax - 1, qmax)
    inits = [numpy_helper.from_array(q.astype(_NP[qtype]) if zero_point is None else (q + zero_point).astype(_NP[qtype]),
                                     f"{name}_q"),
             numpy_helper.from_array(scale, f"{name}_scale")]
    ins = [f"{name}_q", f"{name}_scale"]
    if zero_point is not None:
        inits.append(numpy_helper.from_array(np.full(scale.shape, zero_point).astype(_NP[qtype]), f"{name}_zp"))
        ins.append(f"{name}_zp")
    dq = helper.make_node("DequantizeLinear", ins, [name], name=f"{name}_DQ", axis=axis, block_size=block)
    return dq, inits


def weight_only_mlp(layers: int = 1, qtype: int = TP.INT4, gemm: bool = False, zero_point=None) -> onnx.ModelProto:
    """x -> [MatMul|Gemm](DQ(block-quantized W)) -> (Relu -> ...) -> y: weight-only INT4, the common LLM form."""
    rng = np.random.default_rng(layers)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        dq, ii = _block_weight(f"w{i}", (64, 48 if i == layers - 1 else 64), 0, 16, qtype, rng, zero_point)
        nodes.append(dq)
        inits += ii
        nodes.append(helper.make_node("Gemm" if gemm else "MatMul", [x, f"w{i}"], [f"y{i}"], name=f"mm{i}"))
        x = f"y{i}"
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    return _model(nodes, [_vi("x", TP.FLOAT, [2, 64])], [_vi(x, TP.FLOAT, [2, 48])], inits)


def block_conv() -> onnx.ModelProto:
    """A Conv whose 4-D weight is INT4 per block of the input channels, then a float Conv."""
    rng = np.random.default_rng(5)
    dq, inits = _block_weight("w", (8, 32, 3, 3), 1, 16, TP.INT4, rng)
    nodes = [dq, helper.make_node("Conv", ["x", "w"], ["c"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv1")]
    inits.append(numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "w2"))
    return _model(nodes, [_vi("x", TP.FLOAT, [1, 32, 8, 8])], [_vi("y", TP.FLOAT, [1, 4, 8, 8])], inits)


def qdq_conv(qtype: int, w_zp_shape=None, w_scale_shape=(8,), block: int = 0) -> onnx.ModelProto:
    """x -> Q/DQ(qtype) -> Conv(W -> Q/DQ per-channel or int8 W -> DQ) -> Relu -> Conv -> y."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    npt = _NP[qtype]
    top = {TP.FLOAT8E4M3FN: 448.0, TP.INT16: 32767.0, TP.UINT16: 32767.0}.get(qtype, 127.0)
    attrs = {"axis": 0, **({"block_size": block} if block else {})}
    sw = np.full(w_scale_shape, float(np.abs(w).max() / top), np.float32)
    if w_zp_shape is None:
        w_zp_shape = w_scale_shape
    if qtype == TP.INT8:  # int8 weight initializer -> DQ
        wnodes = [helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], name="w_DQ", **attrs)]
        winits = [numpy_helper.from_array(np.clip(np.rint(w / sw.ravel()[0]), -127, 127).astype(np.int8), "wq")]
    else:
        wnodes = [helper.make_node("QuantizeLinear", ["w", "sw", "zw"], ["wq"], name="w_Q", **attrs),
                  helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], name="w_DQ", **attrs)]
        winits = [numpy_helper.from_array(w, "w")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="x_Q"),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"], name="x_DQ"),
             *wnodes,
             helper.make_node("Conv", ["xd", "wd"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")]
    inits = [numpy_helper.from_array(np.float32(0.05 if top != 32767.0 else 1e-4), "sx"),
             numpy_helper.from_array(np.zeros((), npt), "zx"), *winits, numpy_helper.from_array(sw, "sw"),
             numpy_helper.from_array(np.zeros(w_zp_shape, npt), "zw"),
             numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "w2")]
    return _model(nodes, [_vi("x", TP.FLOAT, [1, 3, 8, 8])], [_vi("y", TP.FLOAT, [1, 4, 8, 8])], inits)


def float_cnn(elem: int) -> onnx.ModelProto:
    """A float16 (opset 17) or bfloat16 (opset 22: Conv takes bfloat16 from 22) Conv-Relu-Conv-GAP-Gemm model."""
    rng = np.random.default_rng(11)
    npt = _NP[elem]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w3"], ["y"], name="fc", transB=1)]
    inits = [numpy_helper.from_array((0.3 * rng.standard_normal((8, 3, 3, 3))).astype(npt), "w1"),
             numpy_helper.from_array((0.1 * rng.standard_normal(8)).astype(npt), "b1"),
             numpy_helper.from_array((0.2 * rng.standard_normal((8, 8, 3, 3))).astype(npt), "w2"),
             numpy_helper.from_array((0.3 * rng.standard_normal((5, 8))).astype(npt), "w3")]
    opset, ir = (17, 8) if elem == TP.FLOAT16 else (22, 10)
    return _model(nodes, [_vi("x", elem, [1, 3, 16, 16])], [_vi("y", elem, [1, 5])], inits, opset, ir)


def bfloat16_mlp() -> onnx.ModelProto:
    """A bfloat16 MatMul-Add-Relu MLP at opset 17 (MatMul takes bfloat16 from 13; Q/DQ only from 19)."""
    rng = np.random.default_rng(13)
    bf = ml_dtypes.bfloat16
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"), helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu1"), helper.make_node("MatMul", ["r1", "w2"], ["m2"], name="mm2"),
             helper.make_node("Relu", ["m2"], ["r2"], name="relu2"), helper.make_node("MatMul", ["r2", "w3"], ["y"], name="mm3")]
    inits = [numpy_helper.from_array((0.3 * rng.standard_normal((16, 32))).astype(bf), "w1"),
             numpy_helper.from_array((0.1 * rng.standard_normal(32)).astype(bf), "b1"),
             numpy_helper.from_array((0.2 * rng.standard_normal((32, 32))).astype(bf), "w2"),
             numpy_helper.from_array((0.2 * rng.standard_normal((32, 4))).astype(bf), "w3")]
    return _model(nodes, [_vi("x", TP.BFLOAT16, [2, 16])], [_vi("y", TP.BFLOAT16, [2, 4])], inits, 17, 8)


# -- CLI harness ----------------------------------------------------------------------------------
def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _optimize(tmp_path: Path, model: onnx.ModelProto, *extra: str, calib: bool = False):
    """Run ``optimize`` on ``model``; returns (result, output path, report dict or None). Asserts the input is untouched."""
    src, dst, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "report.json"
    onnx.save(model, src)
    before = _sha(src)
    args = ["optimize", str(src), str(dst), "-q", "--report", str(report), *extra]
    if calib:
        feeds = [random_feeds(float32_copy(model), seed=s, batch=1) for s in range(4)]
        np.savez(tmp_path / "calib.npz", **{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})
        args += ["--calib", str(tmp_path / "calib.npz")]
    result = CliRunner().invoke(cli, args)
    assert _sha(src) == before, "the input file changed"
    assert "Traceback" not in result.output and "internal error" not in result.output, result.output
    rep = json.loads(report.read_text()) if result.exit_code == 0 else None
    return result, dst, rep


def _refused(result, *needles: str) -> None:
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def _edits(report: dict) -> list[dict]:
    return [c for c in report["changes"] if c["kind"] != "note"]


def _inits(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


# -- 17.1 / 12.4: block-quantized weights ---------------------------------------------------------
BLOCKED = {
    "int4-matmul-1": lambda: weight_only_mlp(1),
    "int4-matmul-2": lambda: weight_only_mlp(2),
    "int4-gemm-2": lambda: weight_only_mlp(2, gemm=True),
    "int8-matmul-2": lambda: weight_only_mlp(2, TP.INT8),
    "int4-conv": block_conv,
}


@pytest.mark.parametrize("case", sorted(BLOCKED))
def test_block_quantized_weights_kept_exactly(tmp_path, case):
    model = BLOCKED[case]()
    result, dst, report = _optimize(tmp_path, model)
    assert result.exit_code == 0, result.output
    out = onnx.load(dst)
    onnx.checker.check_model(out, full_check=True)
    assert _edits(report) == []
    # the quantized weights are the input's, storage type and bytes alike (INT4 stays INT4)
    before, after = _inits(model), _inits(out)
    for name, t in before.items():
        if t.data_type in (TP.INT4, TP.INT8):
            assert after[name].data_type == t.data_type and after[name].raw_data == t.raw_data, name
    feeds = random_feeds(model, seed=1)
    for a, b in zip(run(model, feeds), run(out, feeds)):
        assert np.array_equal(a, b)


def test_exclude_output_layers_keeps_block_weight_and_says_so(tmp_path):
    result, dst, report = _optimize(tmp_path, weight_only_mlp(1), "--passes", "exclude-output-layers")
    assert result.exit_code == 0, result.output
    notes = [c["detail"] for c in report["changes"] if c["kind"] == "note"]
    assert any("block-quantized (int4, block_size 16): kept as it is" in n for n in notes), notes


def test_inspect_reports_block_quantization():
    ins = inspect_model(weight_only_mlp(2)).to_dict()
    assert ins["problems"] == []
    assert [(b["dtype"], b["block_size"], b["weight"]) for b in ins["blocked"]] == [("int4", 16, True)] * 2
    assert {w["weight_format"] for w in ins["weighted_ops"]["details"]} == {"int4 block 16"}
    assert ins["quantized_dtypes"] == {"int4": 2}
    # TensorRT takes blocks on 2-D weights only (IQuantizeLayer: scale rank <= 2)
    conv = inspect_model(block_conv()).to_dict()["problems"]
    assert [(p["rule"], p["node"]) for p in conv] == [("V3", "w_DQ")] and "2-D" in conv[0]["message"]


def test_analysis_calls_block_weight_only_layers_float_with_quantized_weight():
    from qdqsurgeon.analysis import FLOAT, predict

    pred = predict(weight_only_mlp(2))
    assert [w["precision"] for w in pred.weighted_ops] == [FLOAT, FLOAT]
    assert all("weight-only" in w["reason"] for w in pred.weighted_ops)


def test_dequantize_blocked():
    q = np.arange(12, dtype=np.int8).reshape(6, 2)
    scale = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    want = q.astype(np.float32) * np.repeat(scale, 3, axis=0)
    assert np.array_equal(dequantize(q, scale, 0, None, 3), want)
    qp = qparams(next(n for n in import_model(weight_only_mlp(1)).nodes if n.op == "DequantizeLinear"))
    assert qp.blocked and qp.block_size == 16 and qp.qdtype == np.dtype(ml_dtypes.int4) and qp.axis == 0


# -- zero point and scale layouts -----------------------------------------------------------------
@pytest.mark.parametrize("kw,needle", [
    ({"w_zp_shape": (4,)}, "zero point shape [4] differs from the scale's [8]"),
    ({"w_scale_shape": (4,)}, "4 per-axis scales for axis 0 of extent 8"),
    ({"w_scale_shape": (8, 2, 3, 3), "block": 2}, "blocked scale shape [8, 2, 3, 3] does not match input"),
])
def test_bad_layouts_refused_with_one_line(tmp_path, kw, needle):
    result, _, _ = _optimize(tmp_path, qdq_conv(TP.INT8, **kw))
    _refused(result, "w_DQ", needle)


@pytest.mark.parametrize("zp_shape", [(1,), ()])
def test_one_element_zero_point_is_repeated_to_the_scale_shape(tmp_path, zp_shape):
    # onnxruntime refuses this input ("x_zero_point must be null or 1D tensor with size 8"); the output runs
    model = qdq_conv(TP.INT8, w_zp_shape=zp_shape)
    result, dst, report = _optimize(tmp_path, model)
    assert result.exit_code == 0, result.output
    assert any(c["rule"] == "V3" and "repeated to the scale's [8]" in c["detail"] for c in report["changes"])
    out = onnx.load(dst)
    onnx.checker.check_model(out, full_check=True)
    assert [p.rule for p in inspect_model(out).problems] == []
    run(out, random_feeds(out))


# -- 17.5: FP8 and INT16 Q/DQ ---------------------------------------------------------------------
def test_fp8_qdq_understood_and_left_alone(tmp_path):
    from qdqsurgeon.analysis import predict

    model = qdq_conv(TP.FLOAT8E4M3FN)
    assert inspect_model(model).problems == []
    pred = predict(model)
    assert pred.precision_of("conv") == "fp8->float"
    assert pred.int8_weighted_ops == 0 and pred.int8_mac_fraction == 0.0
    result, dst, report = _optimize(tmp_path, model)
    assert result.exit_code == 0, result.output
    out = onnx.load(dst)
    onnx.checker.check_model(out, full_check=True)
    assert inspect_model(out).problems == []
    feeds = random_feeds(model, seed=2)
    for a, b in zip(run(model, feeds), run(out, feeds)):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("qtype", [TP.INT16, TP.UINT16])
def test_int16_qdq_refused_and_named_by_inspect(tmp_path, qtype):
    name = {TP.INT16: "int16", TP.UINT16: "uint16"}[qtype]
    model = qdq_conv(qtype)
    probs = inspect_model(model).problems
    assert probs and all(p.rule == "V4" and f"{name} quantization is not importable by TensorRT" in p.message
                         and "int8, int4, float8_e4m3fn" in p.message for p in probs)
    result, _, _ = _optimize(tmp_path, model)
    _refused(result, name, "--requantize")


def test_int16_requantize_gives_a_valid_int8_model(tmp_path):
    result, dst, _ = _optimize(tmp_path, qdq_conv(TP.INT16), "--requantize", calib=True)
    assert result.exit_code == 0, result.output
    out = onnx.load(dst)
    assert inspect_model(out).problems == []
    assert inspect_model(out).quantized_dtypes == {"int8": inspect_model(out).quantize + inspect_model(out).dequantize}


def test_uint4_block_weights_with_zero_point_8_become_int4_exactly(tmp_path):
    model = weight_only_mlp(2, TP.UINT4, zero_point=8)
    result, dst, report = _optimize(tmp_path, model)
    assert result.exit_code == 0, result.output
    assert {c["rule"] for c in _edits(report)} == {"V2"}
    out = onnx.load(dst)
    onnx.checker.check_model(out, full_check=True)
    assert inspect_model(out).problems == [] and inspect_model(out).quantized_dtypes == {"int4": 2}
    feeds = random_feeds(model, seed=6)
    assert np.array_equal(run(model, feeds)[0], run(out, feeds)[0])


def test_asymmetric_uint4_weights_refused(tmp_path):
    model = weight_only_mlp(2, TP.UINT4, zero_point=8)
    zp = _inits(model)["w1_zp"]
    values = numpy_helper.to_array(zp).copy()
    values[0, 0] = 9
    zp.CopyFrom(numpy_helper.from_array(values, "w1_zp"))
    result, _, _ = _optimize(tmp_path, model)
    _refused(result, "w1_DQ", "uint4 with zero points other than 8", "--requantize")


# -- 17.2 / 12.4: float16 and bfloat16 float models through PTQ ----------------------------------
def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("weights", ["float", "int8"])
@pytest.mark.parametrize("elem", [TP.FLOAT16, TP.BFLOAT16])
def test_reduced_float_cnn_through_ptq(tmp_path, elem, weights):
    model = float_cnn(elem)
    result, dst, report = _optimize(tmp_path, model, "--weights", weights, calib=True)
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == ""
    out = onnx.load(dst)
    onnx.checker.check_model(out, full_check=True)
    assert report["mode"] == "ptq" and inspect_model(out).problems == []
    g = import_model(out)
    qdq = [n for n in g.nodes if n.op in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) >= 6
    # scales in the model's float type, float parts kept in it (weights, bias, graph I/O)
    assert {np.dtype(qparams(n).scale.dtype) for n in qdq} == {np.dtype(_NP[elem])}
    floats = {t.data_type for t in out.graph.initializer if t.data_type in (TP.FLOAT, TP.FLOAT16, TP.BFLOAT16)}
    assert floats == {elem}
    assert out.graph.input[0].type.tensor_type.elem_type == elem == out.graph.output[0].type.tensor_type.elem_type
    assert out.opset_import[0].version >= 19
    ref = float32_copy(model)
    feeds = random_feeds(ref, seed=3)
    if elem == TP.FLOAT16:  # onnxruntime runs float16 (and its INT8 Q/DQ) natively
        f16 = {k: v.astype(np.float16) for k, v in feeds.items()}
        assert _cosine(run(model, f16)[0], run(out, f16)[0]) > 0.99
    # bfloat16: onnxruntime's CPU provider has no bfloat16 kernels; compare float32 copies
    assert _cosine(run(ref, feeds)[0], run(float32_copy(out), feeds)[0]) > 0.99


def test_bfloat16_mlp_opset_raised_for_qdq(tmp_path):
    result, dst, report = _optimize(tmp_path, bfloat16_mlp(), calib=True)
    assert result.exit_code == 0, result.output
    out = onnx.load(dst)
    onnx.checker.check_model(out, full_check=True)
    assert out.opset_import[0].version == 19
    assert any(c["kind"] == "opset" and "opset 17 -> 19 for insert-qdq: Q/DQ scales in the model's float16/bfloat16 type"
               in c["detail"] for c in report["changes"])
    assert {t.data_type for t in out.graph.initializer} <= {TP.BFLOAT16, TP.INT8}
    feeds = random_feeds(float32_copy(out), seed=4)
    assert _cosine(run(float32_copy(bfloat16_mlp()), feeds)[0], run(float32_copy(out), feeds)[0]) > 0.99


def test_bfloat16_check_compares_float32_copies(tmp_path):
    result, _, _ = _optimize(tmp_path, float_cnn(TP.BFLOAT16), "--check", calib=True)
    assert result.exit_code == 0, result.output
    assert "cosine 0.99" in result.output


def test_per_channel_int4_output_layer_weight_kept(tmp_path):
    # INT4 is weight-only in TensorRT: an output layer's INT4 weight is storage, not an INT8 input to undo
    rng = np.random.default_rng(17)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    scale = (np.abs(w).max(axis=0) / 7).astype(np.float32)
    q = np.clip(np.rint(w / scale), -8, 7).astype(ml_dtypes.int4)
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], name="w_DQ", axis=1),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    model = _model(nodes, [_vi("x", TP.FLOAT, [2, 64])], [_vi("y", TP.FLOAT, [2, 48])],
                   [numpy_helper.from_array(q, "wq"), numpy_helper.from_array(scale, "ws")])
    result, dst, report = _optimize(tmp_path, model)
    assert result.exit_code == 0, result.output
    assert _edits(report) == []
    out = onnx.load(dst)
    assert _inits(out)["wq"].data_type == TP.INT4
    feeds = random_feeds(model, seed=5)
    assert np.array_equal(run(model, feeds)[0], run(out, feeds)[0])


def test_float16_opset_upgraded_by_the_converter_and_no_upgrade_refuses(tmp_path):
    """ReduceMean's axes moved to an input at 18: raising the opset in place would be wrong, onnx's converter does it."""
    rng = np.random.default_rng(19)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("ReduceMean", ["r"], ["m"], name="rm", axes=[2, 3], keepdims=0),
             helper.make_node("Gemm", ["m", "w2"], ["y"], name="fc", transB=1)]
    model = _model(nodes, [_vi("x", TP.FLOAT16, [1, 3, 8, 8])], [_vi("y", TP.FLOAT16, [1, 4])],
                   [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float16), "w"),
                    numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float16), "w2")], 17, 8)
    result, _, _ = _optimize(tmp_path, model, "--no-opset-upgrade", calib=True)
    _refused(result, "opset 17 is too old for insert-qdq", "--opset 19")
    result, dst, _ = _optimize(tmp_path, model, calib=True)
    assert result.exit_code == 0, result.output
    out = onnx.load(dst)
    onnx.checker.check_model(out, full_check=True)
    assert inspect_model(out).problems == [] and inspect_model(out).quantize > 0
