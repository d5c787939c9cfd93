"""Control-flow bodies (If/Loop) and TensorRT plugin nodes (issue 17, items 3 and 4).

Models are built in code: a small CNN with an If (constant or run-time condition) or a Loop
around its middle Conv, a model with a scalar sample-rate input, and a detector ending in
``TRT::EfficientNMS_TRT`` with the attributes public YOLOv7 exports write. Each runs through the
CLI too: exit code, one stderr line on refusal, input byte-identical, valid output.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

import qdqsurgeon
from qdqsurgeon.analysis import predict
from qdqsurgeon.calibration import calibrate
from qdqsurgeon.calibration.collect import cut_at_plugins, make_session
from qdqsurgeon.calibration.data import open_data, random_data
from qdqsurgeon.cli import cli
from qdqsurgeon.ranges import CalibrationRanges

from .helpers import F, init, run

I64 = TensorProto.INT64


def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) * 0.3).astype(np.float32)


def _branch(name: str, conv: onnx.NodeProto, out: str) -> onnx.GraphProto:
    relu = helper.make_node("Relu", [conv.output[0]], [out], name=f"{name}_relu")
    return helper.make_graph([conv, relu], name, [], [helper.make_tensor_value_info(out, F, [1, 16, 8, 8])])


def if_model(condition: str) -> onnx.ModelProto:
    """x -> Conv stem -> If(cond){then: Conv 3x3, else: Conv 1x1} -> Conv head -> y.

    The branches hold most of the MACs (36864 and 4096 of 42688), so leaving them float must show
    in the INT8 MAC share. ``condition``: "constant" (an initializer True) or "dynamic" (mean(x) > 0).
    """
    rng = np.random.default_rng(0)
    inits = [init("w_stem", _w(rng, 4, 3, 1, 1)), init("w_then", _w(rng, 16, 4, 3, 3)),
             init("w_else", _w(rng, 16, 4, 1, 1)), init("w_head", _w(rng, 2, 16, 1, 1))]
    nodes = [helper.make_node("Conv", ["x", "w_stem"], ["s"], name="stem"),
             helper.make_node("Relu", ["s"], ["sr"], name="stem_relu")]
    if condition == "constant":
        inits.append(init("cond", np.array(True)))
    else:
        nodes += [helper.make_node("ReduceMean", ["x"], ["m"], name="mean", keepdims=0),
                  init_node("zero", np.array(0.0, np.float32)),
                  helper.make_node("Greater", ["m", "zero"], ["cond"], name="positive")]
    then_g = _branch("then", helper.make_node("Conv", ["sr", "w_then"], ["t"], name="conv_then", pads=[1, 1, 1, 1]), "tr")
    else_g = _branch("else", helper.make_node("Conv", ["sr", "w_else"], ["e"], name="conv_else"), "er")
    nodes += [helper.make_node("If", ["cond"], ["b"], name="branch", then_branch=then_g, else_branch=else_g),
              helper.make_node("Conv", ["b", "w_head"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "if_cnn", [helper.make_tensor_value_info("x", F, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", F, [1, 2, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def init_node(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"{name}_const", value=onnx.numpy_helper.from_array(value))


def loop_model(trips: int = 3) -> onnx.ModelProto:
    """x -> Conv stem -> Loop(M=trips, no condition){h = Relu(Conv(h))} -> y: the body runs exactly ``trips`` times."""
    rng = np.random.default_rng(1)
    body = helper.make_graph(
        [helper.make_node("Identity", ["c_in"], ["c_out"], name="keep_going"),
         helper.make_node("Conv", ["h_in", "w_body"], ["hc"], name="conv_body", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["hc"], ["h_out"], name="body_relu")],
        "body",
        [helper.make_tensor_value_info("i", I64, []), helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", F, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []), helper.make_tensor_value_info("h_out", F, [1, 4, 8, 8])])
    nodes = [helper.make_node("Conv", ["x", "w_stem"], ["s"], name="stem"),
             helper.make_node("Loop", ["trips", "", "s"], ["h"], name="repeat", body=body),
             helper.make_node("Relu", ["h"], ["y"], name="out_relu")]
    graph = helper.make_graph(nodes, "loop_cnn", [helper.make_tensor_value_info("x", F, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", F, [1, 4, 8, 8])],
                              [init("w_stem", _w(rng, 4, 3, 1, 1)), init("w_body", _w(rng, 4, 4, 3, 3)),
                               init("trips", np.array(trips, np.int64))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def scalar_input_model() -> onnx.ModelProto:
    """y = f(x) if sr == 16000 else -f(x), f two MatMuls: ``sr`` is a rank-0 int64 setting, as in silero VAD."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("MatMul", ["x", "w_in"], ["h"], name="fc_in"),
             helper.make_node("Relu", ["h"], ["hr"], name="relu"),
             helper.make_node("MatMul", ["hr", "w"], ["m"], name="fc"),
             helper.make_node("Equal", ["sr", "rate"], ["is16k"], name="is_16k"),
             helper.make_node("Neg", ["m"], ["n"], name="neg"),
             helper.make_node("Where", ["is16k", "m", "n"], ["y"], name="pick")]
    graph = helper.make_graph(nodes, "scalar", [helper.make_tensor_value_info("x", F, ["batch", 4]),
                                                helper.make_tensor_value_info("sr", I64, [])],
                              [helper.make_tensor_value_info("y", F, ["batch", 8])],
                              [init("w_in", _w(rng, 4, 4)), init("w", _w(rng, 4, 8)), init("rate", np.array(16000, np.int64))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def detector(domain: str = "TRT", tail_matmul: bool = False) -> onnx.ModelProto:
    """Conv -> Relu -> box/score heads -> EfficientNMS_TRT, attributes as public YOLOv7 exports write them.

    ``tail_matmul`` adds a weighted op after the plugin (det_boxes @ W), which cannot be calibrated.
    """
    rng = np.random.default_rng(3)
    inits = [init("w1", _w(rng, 8, 3, 3, 3)), init("b1", np.zeros(8, np.float32)), init("w_mid", _w(rng, 8, 8, 3, 3)),
             init("wb", _w(rng, 4, 8, 1, 1)), init("ws", _w(rng, 2, 8, 1, 1)),
             init("shb", np.array([1, 4, -1], np.int64)), init("shs", np.array([1, 2, -1], np.int64))]
    nodes = [helper.make_node("Conv", ["images", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w_mid"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "wb"], ["cb"], name="conv_box"),
             helper.make_node("Reshape", ["cb", "shb"], ["bb"], name="reshape_box"),
             helper.make_node("Transpose", ["bb"], ["boxes"], name="transpose_box", perm=[0, 2, 1]),
             helper.make_node("Conv", ["r2", "ws"], ["cs"], name="conv_score"),
             helper.make_node("Sigmoid", ["cs"], ["ss"], name="sigmoid"),
             helper.make_node("Reshape", ["ss", "shs"], ["sc"], name="reshape_score"),
             helper.make_node("Transpose", ["sc"], ["scores"], name="transpose_score", perm=[0, 2, 1]),
             helper.make_node("EfficientNMS_TRT", ["boxes", "scores"], ["num_dets", "det_boxes", "det_scores", "det_classes"],
                              name="batched_nms", domain=domain, background_class=-1, box_coding=0, iou_threshold=0.45,
                              max_output_boxes=100, plugin_version="1", score_activation=0, score_threshold=0.25)]
    outputs = [helper.make_tensor_value_info("num_dets", TensorProto.INT32, [1, 1]),
               helper.make_tensor_value_info("det_boxes", F, [1, 100, 4]),
               helper.make_tensor_value_info("det_scores", F, [1, 100]),
               helper.make_tensor_value_info("det_classes", TensorProto.INT32, [1, 100])]
    if tail_matmul:
        inits.append(init("w_tail", _w(rng, 4, 4)))
        nodes.append(helper.make_node("MatMul", ["det_boxes", "w_tail"], ["boxes_out"], name="box_transform"))
        outputs.append(helper.make_tensor_value_info("boxes_out", F, [1, 100, 4]))
    graph = helper.make_graph(nodes, "detector", [helper.make_tensor_value_info("images", F, [1, 3, 16, 16])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(domain, 1)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _ranges(model: onnx.ModelProto) -> CalibrationRanges:
    return CalibrationRanges(model, random_data(model, 2), "max", progress=False)


def _notes(result, needle: str) -> dict[str, str]:
    return {c.node: c.detail for c in result.changes if c.kind == "note" and needle in c.detail}


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cli(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _assert_one_line_error(result, code: int, *needles: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = [l for l in result.stderr.splitlines() if l.strip() and not l.startswith("WARNING")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for n in needles:
        assert n in lines[0], lines[0]


def _body_ops(model: onnx.ModelProto) -> list[str]:
    out = []
    for node in model.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out += [n.op_type for n in a.g.node]
    return out


# ------------------------------------------------------------------------------------------------
# If and Loop


def test_if_with_runtime_condition_leaves_branches_float_with_a_note_and_counts_their_macs():
    model = if_model("dynamic")
    res = qdqsurgeon.optimize(model, ranges=_ranges(model))
    notes = _notes(res, "inside If 'branch'")
    assert set(notes) == {"conv_then", "conv_else"}, notes
    assert all("left float because the condition is computed at run time" in d for d in notes.values())
    assert "QuantizeLinear" not in _body_ops(res.model)
    onnx.checker.check_model(res.model, full_check=True)
    pred = {w["node"]: w for w in res.after["weighted_ops"]}
    assert pred["conv_then"]["precision"] == "float" and pred["conv_then"]["macs"] == 16 * 4 * 9 * 64
    assert pred["conv_else"]["macs"] == 16 * 4 * 64
    # stem (768 MACs) is INT8; the head is an output layer (P9). Before: 1.0, the branches were invisible.
    assert res.after["int8_mac_fraction"] == pytest.approx(768 / (768 + 36864 + 4096 + 2048))


def test_if_with_constant_condition_is_inlined_calibrated_and_quantized():
    model = if_model("constant")
    res = qdqsurgeon.optimize(model, ranges=_ranges(model))
    out = res.model
    assert "If" not in [n.op_type for n in out.graph.node]
    prod = {o: n for n in out.graph.node for o in n.output}
    conv = next(n for n in out.graph.node if n.op_type == "Conv" and n.name.startswith("conv_then"))
    assert [prod[i].op_type for i in conv.input[:2]] == ["DequantizeLinear", "DequantizeLinear"]
    assert any(c.kind == "remove" and c.node == "branch" and "inlined its then_branch" in c.detail for c in res.changes)
    onnx.checker.check_model(out, full_check=True)
    x = np.random.default_rng(5).standard_normal((1, 3, 8, 8)).astype(np.float32)
    ref, got = run(model, {"x": x})[0], run(out, {"x": x})[0]
    cos = float(np.dot(ref.ravel(), got.ravel()) / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cos > 0.99
    assert res.after["int8_weighted_ops"] == 2  # stem and the inlined branch Conv (the head is an output layer)


def test_calibration_reaches_tensors_of_a_constant_if_branch():
    model = if_model("constant")
    amax = calibrate(model, ["sr", "t"], random_data(model, 2), "max", progress=False)
    assert set(amax) == {"sr", "t"} and all(v > 0 for v in amax.values())


def test_loop_body_left_float_with_a_note_and_counted_per_iteration():
    model = loop_model(trips=3)
    res = qdqsurgeon.optimize(model, ranges=_ranges(model))
    notes = _notes(res, "inside Loop 'repeat' body")
    assert list(notes) == ["conv_body"] and "cannot be calibrated" in notes["conv_body"]
    pred = {w["node"]: w for w in res.after["weighted_ops"]}
    assert pred["conv_body"]["macs"] == 3 * 4 * 4 * 9 * 64  # no condition can end the loop early: 3 iterations
    assert res.after["int8_mac_fraction"] < 0.1
    x = np.random.default_rng(6).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(res.model, {"x": x})[0], run(model, {"x": x})[0], atol=0.05)


def test_input_failing_the_full_check_but_run_by_onnxruntime_is_optimized(tmp_path, caplog):
    """Like SLANet: a shape the exporter declared disagrees with onnx's inference; onnxruntime runs it."""
    model = if_model("constant")
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", F, [1, 2, 8]))  # really [1, 2, 8, 8]
    onnx.checker.check_model(model)
    with pytest.raises(onnx.shape_inference.InferenceError):
        onnx.checker.check_model(model, full_check=True)
    make_session(model)  # onnxruntime loads it
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    digest = _sha(src)
    with caplog.at_level(logging.WARNING):
        result = _cli("optimize", src, dst, "--calib-random", "2")
    assert result.exit_code == 0, result.output
    assert "onnxruntime runs it" in result.stderr
    assert _sha(src) == digest
    onnx.checker.check_model(onnx.load(dst))


# ------------------------------------------------------------------------------------------------
# Scalar inputs


def test_scalar_input_from_npz_calibrates(tmp_path):
    model = scalar_input_model()
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32), sr=np.array(16000))
    batches = list(open_data(data, model, batch_size=4))
    assert [b["x"].shape for b in batches] == [(4, 4), (2, 4)] and all(b["sr"].shape == () for b in batches)
    src, dst = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(model, src)
    result = _cli("optimize", src, dst, "--calib", data, "--check")
    assert result.exit_code == 0, result.output
    assert "QuantizeLinear" in [n.op_type for n in onnx.load(dst).graph.node]


def test_scalar_input_in_random_data_takes_the_value_the_model_tests():
    model = scalar_input_model()
    batches = list(random_data(model, 2))
    assert all(b["sr"].shape == () and int(b["sr"]) == 16000 for b in batches)
    assert calibrate(model, ["x"], random_data(model, 2), "max", progress=False)["x"] > 0


def test_scalar_input_stored_with_a_batch_axis_is_refused_in_one_line(tmp_path):
    model = scalar_input_model()
    src, data = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(model, src)
    np.savez(data, x=np.zeros((2, 4), np.float32), sr=np.array([16000, 16000]))
    _assert_one_line_error(_cli("optimize", src, tmp_path / "o.onnx", "--calib", data), 2, "'sr' is a scalar", "0-d array")


# ------------------------------------------------------------------------------------------------
# TensorRT plugins


@pytest.mark.parametrize("domain", ["TRT", "com.nvidia", "trt.plugins"])
def test_detector_with_plugin_is_calibrated_up_to_the_plugin_and_the_plugin_left_untouched(tmp_path, domain):
    model = detector(domain)
    src, dst = tmp_path / "det.onnx", tmp_path / "det.int8.onnx"
    onnx.save(model, src)
    digest = _sha(src)
    result = _cli("optimize", src, dst, "--calib-random", "2")
    assert result.exit_code == 0, result.output
    assert _sha(src) == digest
    out = onnx.load(dst)
    onnx.checker.check_model(out, full_check=True)
    before = next(n for n in model.graph.node if n.domain == domain)
    after = next(n for n in out.graph.node if n.domain == domain)
    assert after == before  # same inputs, outputs, attributes
    prod = {o: n for n in out.graph.node for o in n.output}
    conv2 = next(n for n in out.graph.node if n.name == "conv2")
    assert [prod[i].op_type for i in conv2.input[:2]] == ["DequantizeLinear", "DequantizeLinear"]
    cut, after_plugin = cut_at_plugins(out)
    assert {"num_dets", "det_boxes"} <= set(after_plugin)
    assert [o.name for o in cut.graph.output] == ["boxes", "scores"]
    make_session(cut).run(None, {"images": np.zeros((1, 3, 16, 16), np.float32)})


def test_weighted_op_after_a_plugin_is_left_float_with_a_note():
    model = detector("TRT", tail_matmul=True)
    res = qdqsurgeon.optimize(model, ranges=_ranges(model))
    notes = _notes(res, "after TensorRT plugin 'batched_nms'")
    assert list(notes) == ["box_transform"] and "left float" in notes["box_transform"]
    tail = next(n for n in res.model.graph.node if n.name == "box_transform")
    assert list(tail.input) == ["det_boxes", "w_tail"]


def test_calibration_skips_tensors_computed_from_a_plugin(caplog):
    model = detector("TRT", tail_matmul=True)
    with caplog.at_level(logging.WARNING):
        amax = calibrate(model, ["r2", "boxes", "det_boxes"], random_data(model, 1), "max", progress=False)
    assert set(amax) == {"r2", "boxes"}
    assert "det_boxes: it is computed from TensorRT plugin batched_nms" in caplog.text


def test_check_compares_a_plugin_model_at_the_plugin_inputs(tmp_path):
    model = detector("TRT")
    src, dst, data = tmp_path / "det.onnx", tmp_path / "det.int8.onnx", tmp_path / "eval.npz"
    onnx.save(model, src)
    np.savez(data, images=np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32))
    assert _cli("optimize", src, dst, "--calib", data, "-q").exit_code == 0
    result = _cli("check", src, dst, "--data", data, "--json")
    assert result.exit_code == 0, result.output
    assert "comparing the tensors they read" in result.stderr
    assert '"boxes"' in result.stdout and '"scores"' in result.stdout


def test_unknown_domain_is_still_refused_in_one_line(tmp_path):
    model = detector("TRT")
    for node in model.graph.node:
        if node.domain == "TRT":
            node.domain = "example.custom"
    model.opset_import[1].domain = "example.custom"
    src = tmp_path / "det.onnx"
    onnx.save(model, src)
    _assert_one_line_error(_cli("optimize", src, tmp_path / "o.onnx", "--calib-random", "1"), 1,
                           "unknown opset domain 'example.custom'")


def test_rnn_state_batched_on_axis_one_is_sliced_on_that_axis(tmp_path):
    """silero VAD's ``state [2, batch, 128]``: the batch axis is the one named like the first input's batch dim."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"], name="ix"), helper.make_node("Identity", ["state"], ["s"], name="is")],
        "rnn", [helper.make_tensor_value_info("x", F, ["batch", 4]), helper.make_tensor_value_info("state", F, [2, "batch", 3]),
                helper.make_tensor_value_info("sr", I64, [])],
        [helper.make_tensor_value_info("y", F, ["batch", 4]), helper.make_tensor_value_info("s", F, [2, "batch", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = tmp_path / "d.npz"
    np.savez(data, x=np.arange(12, dtype=np.float32).reshape(3, 4), state=np.arange(18, dtype=np.float32).reshape(2, 3, 3),
             sr=np.array(8000))
    batches = list(open_data(data, model, batch_size=2))
    assert [(b["x"].shape, b["state"].shape) for b in batches] == [((2, 4), (2, 2, 3)), ((1, 4), (2, 1, 3))]
    np.testing.assert_array_equal(batches[1]["state"][:, 0], np.arange(18, dtype=np.float32).reshape(2, 3, 3)[:, 2])
    assert [b["sr"].item() for b in batches] == [8000, 8000]
    feed = next(iter(random_data(model, 1)))
    assert feed["x"].shape == (1, 4) and feed["state"].shape == (2, 1, 3) and feed["sr"].item() == 1
