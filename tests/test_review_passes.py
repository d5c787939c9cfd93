"""Regression tests for defects a review of the placement passes found (all fixed).

Every test states the pass contract it checks (checker, numerics, idempotence, TensorRT
validity).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import qdqsurgeon
from qdqsurgeon import Config, StaticRanges

from .helpers import F, FP32, full_check, init, make_model, need_shared, qdq_nodes, run

H = TensorProto.FLOAT16


def _w(name: str, shape: tuple[int, ...], seed: int = 0, dtype=np.float32) -> onnx.TensorProto:
    return init(name, np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def _non_notes(result) -> list:
    return [c for c in result.changes if c.kind != "note"]


class _AllRanges:
    """Every tensor calibrates to amax 3 (only the placement matters here)."""

    def __call__(self, names):
        return {n: 3.0 for n in names}


# ---------------------------------------------------------------------------------------------
# 1. A DQ that is a graph output *and* feeds an interior Conv: removing the output Q/DQ (P9)
#    rewires every reader, so the Conv loses its quantized activation (F1) and its numerics change.
# ---------------------------------------------------------------------------------------------
def _dq_output_also_feeds_conv() -> onnx.ModelProto:
    nodes = qdq_nodes("x", "xd", "s", "z", "a") + qdq_nodes("W", "Wd", "ws", "wz", "w", axis=0) + [
        helper.make_node("Conv", ["xd", "Wd"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2"], ["y"], name="conv2"),  # the output layer (float)
    ]
    return make_model(nodes, [("x", F, [1, 4, 8, 8])], [("y", F, [1, 4, 8, 8]), ("xd", F, [1, 4, 8, 8])],
                      [init("s", np.float32(0.05)), init("z", np.int8(0)), _w("W", (4, 4, 3, 3)), _w("W2", (4, 4, 1, 1), 1),
                       init("ws", np.full(4, 0.02, np.float32)), init("wz", np.zeros(4, np.int8))])


@pytest.mark.parametrize("pass_name", ["normalize-qdq", "remove-misplaced-qdq", "exclude-output-layers"])
def test_output_qdq_removal_keeps_other_readers_quantized(pass_name):
    model = _dq_output_also_feeds_conv()
    out = qdqsurgeon.optimize(model, passes=[pass_name], analyze=False).model
    full_check(out)
    conv1 = next(n for n in out.graph.node if n.name == "conv1")
    producers = {o: n for n in out.graph.node for o in n.output}
    reader = producers.get(conv1.input[0])
    assert reader is not None and reader.op_type == "DequantizeLinear", f"conv1 reads {conv1.input[0]}, must keep reading the DQ (F1)"
    feeds = {"x": np.random.default_rng(7).standard_normal((1, 4, 8, 8)).astype(np.float32)}
    # y does not depend on the output Q/DQ at all: it must be bit-identical
    assert np.array_equal(run(model, feeds)[0], run(out, feeds)[0])


# ---------------------------------------------------------------------------------------------
# 2. quantize-pooling walks the graph forward: in a chain of wrapped ops (AveragePool -> AveragePool
#    -> qdq -> Conv) the first op's output only becomes quantized when the second is wrapped, so a
#    second run wraps the first one: not idempotent (and the pipeline's output is not a fixpoint).
# ---------------------------------------------------------------------------------------------
def test_quantize_pooling_idempotent_on_chain_of_wrapped_ops():
    nodes = [
        helper.make_node("Conv", ["x", "W0"], ["c"], name="conv0"),  # an INT8-capable producer (P7)
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("AveragePool", ["r"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("AveragePool", ["p1"], ["p2"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]),
        *qdq_nodes("p2", "p2d", "s", "z", "o"),
        *qdq_nodes("W", "Wd", "ws", "wz", "w", axis=0),
        helper.make_node("Conv", ["p2d", "Wd"], ["y"], name="conv"),
    ]
    model = make_model(nodes, [("x", F, [1, 4, 8, 8])], [("y", F, [1, 4, 2, 2])],
                       [init("s", np.float32(0.05)), init("z", np.int8(0)), _w("W", (4, 4, 1, 1)), _w("W0", (4, 4, 1, 1)),
                        init("ws", np.full(4, 0.02, np.float32)), init("wz", np.zeros(4, np.int8))])
    ranges = StaticRanges({"r": 3.0, "p1": 3.0})
    first = qdqsurgeon.optimize(model, passes=["quantize-pooling"], ranges=ranges, analyze=False)
    assert _non_notes(first)  # pool2 gets wrapped
    second = qdqsurgeon.optimize(first.model, passes=["quantize-pooling"], ranges=ranges, analyze=False)
    assert _non_notes(second) == [], [(c.kind, c.node, c.detail) for c in _non_notes(second)]


# ---------------------------------------------------------------------------------------------
# 3. insert-qdq (and so the whole PTQ pipeline) is not idempotent on the PTQ pipeline's own output:
#    it re-quantizes the output layer that exclude-output-layers made float (P9), and the Conv
#    input behind a Pad whose pair remove-misplaced-qdq moved above the Pad (P8).
# ---------------------------------------------------------------------------------------------
def _conv_chain_with_pad() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Pad", ["r1", "pads"], ["p"], name="pad"),
        helper.make_node("Conv", ["p", "W2"], ["c2"], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "W3"], ["y"], name="head"),
    ]
    return make_model(nodes, [("x", F, [1, 4, 8, 8])], [("y", F, [1, 4, 8, 8])],
                      [_w("W1", (4, 4, 3, 3)), _w("W2", (4, 4, 3, 3), 1), _w("W3", (4, 4, 1, 1), 2),
                       init("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))])


def test_insert_qdq_sees_pair_moved_above_pad():
    """insert-qdq run again on the PTQ output adds nothing behind a Pad whose pair moved above it (P8)."""
    ranges = _AllRanges()
    out = qdqsurgeon.optimize(_conv_chain_with_pad(), mode="ptq", ranges=ranges, analyze=False).model
    again = qdqsurgeon.optimize(out, passes=["insert-qdq"], ranges=ranges, analyze=False)
    added_on = {c.node for c in _non_notes(again)}
    assert not any("pad" in n.lower() for n in added_on), added_on


def test_second_optimize_is_a_fixpoint():
    """optimize on its own PTQ output (detected as a Q/DQ model: the fix pipeline) changes nothing."""
    ranges = _AllRanges()
    out = qdqsurgeon.optimize(_conv_chain_with_pad(), mode="ptq", ranges=ranges, analyze=False).model
    again = qdqsurgeon.optimize(out, analyze=False)
    assert again.mode == "fix"
    assert _non_notes(again) == [], [(c.pass_name, c.kind, c.node) for c in _non_notes(again)]


@pytest.mark.slow
def test_second_optimize_is_a_fixpoint_on_real_model():
    need_shared()
    model = qdqsurgeon.load(FP32 / "resnet18_cifar10.onnx", opset=13)
    ranges = qdqsurgeon.build_ranges(model, calib_random=2, progress=False)
    out = qdqsurgeon.optimize(model, ranges=ranges, analyze=False).model
    again = qdqsurgeon.optimize(out, analyze=False)
    assert _non_notes(again) == [], [(c.pass_name, c.kind, c.node) for c in _non_notes(again)]


# ---------------------------------------------------------------------------------------------
# 4. align-scales --align output: the Concat output's (smaller) scale is forced onto an input
#    pair that another reader also uses, which now clips: far more than the documented 1 step.
# ---------------------------------------------------------------------------------------------
def test_align_output_policy_error_within_one_step():
    nodes = qdq_nodes("a", "ad", "sa", "z", "qa") + qdq_nodes("b", "bd", "sb", "z", "qb") + [
        helper.make_node("Concat", ["ad", "bd"], ["cat"], name="cat", axis=1),
        *qdq_nodes("cat", "catd", "sc", "z", "qc"),
        helper.make_node("Relu", ["catd"], ["y"], name="relu"),
        helper.make_node("Relu", ["ad"], ["y2"], name="relu2"),  # a second reader of a's pair
    ]
    model = make_model(nodes, [("a", F, [1, 4]), ("b", F, [1, 4])], [("y", F, [1, 8]), ("y2", F, [1, 4])],
                       [init("sa", np.float32(0.1)), init("sb", np.float32(0.01)), init("sc", np.float32(0.02)),
                        init("z", np.int8(0))])
    out = qdqsurgeon.optimize(model, passes=["align-scales"], config=Config(align="output"), analyze=False).model
    feeds = {"a": np.array([[5.0, 2.0, 1.0, 0.5]], np.float32), "b": np.array([[0.5, 1.0, 0.2, 0.1]], np.float32)}
    before, after = run(model, feeds)[1], run(out, feeds)[1]
    new_scale = 0.02
    assert np.max(np.abs(before - after)) <= new_scale + 1e-6, f"y2 {before} -> {after}"


# ---------------------------------------------------------------------------------------------
# 5. remove-misplaced-qdq (P8) with a Q read by two DQs after a Pad: the Q is removed while the
#    second DQ still reads it, and the pass raises ModelError (invalid model).
# ---------------------------------------------------------------------------------------------
def test_pad_move_with_q_shared_by_two_dqs():
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Pad", ["r", "pads"], ["p"], name="pad"),
        helper.make_node("QuantizeLinear", ["p", "s", "z"], ["pq"], name="Q"),
        helper.make_node("DequantizeLinear", ["pq", "s", "z"], ["pd1"], name="DQ1"),
        helper.make_node("DequantizeLinear", ["pq", "s", "z"], ["pd2"], name="DQ2"),
        *qdq_nodes("W", "Wd", "ws", "wz", "w", axis=0),
        helper.make_node("Conv", ["pd1", "Wd"], ["c1"], name="conv1"),
        helper.make_node("Conv", ["pd2", "Wd"], ["c2"], name="conv2"),
        helper.make_node("Add", ["c1", "c2"], ["y"], name="add"),
    ]
    model = make_model(nodes, [("x", F, [1, 4, 8, 8])], [("y", F, [1, 4, 8, 8])],
                       [init("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)), init("s", np.float32(0.05)),
                        init("z", np.int8(0)), _w("W", (4, 4, 3, 3)), init("ws", np.full(4, 0.02, np.float32)),
                        init("wz", np.zeros(4, np.int8))])
    out = qdqsurgeon.optimize(model, passes=["remove-misplaced-qdq"], analyze=False).model
    full_check(out)
    feeds = {"x": np.random.default_rng(7).standard_normal((1, 4, 8, 8)).astype(np.float32)}
    assert np.array_equal(run(model, feeds)[0], run(out, feeds)[0])


# ---------------------------------------------------------------------------------------------
# 6. FP16 model given to optimize() without value_info (e.g. onnx.load without shape inference):
#    move-qdq inserts a DQ declared float32 on a float16 tensor. The result fails the full checker
#    and onnxruntime, yet VerifyInstrument (full_check=False) and optimize's final check pass it.
# ---------------------------------------------------------------------------------------------
def test_move_qdq_fp16_without_value_info_is_valid():
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("MaxPool", ["r"], ["mp"], name="mp", kernel_shape=[2, 2], strides=[2, 2]),
        *qdq_nodes("mp", "mpd", "sh", "z", "b"),
        helper.make_node("Relu", ["mpd"], ["y"], name="relu2"),
    ]
    model = make_model(nodes, [("x", H, [1, 4, 8, 8])], [("y", H, [1, 4, 4, 4])],
                       [init("sh", np.float16(0.05)), init("z", np.int8(0))], opset=19)
    out = qdqsurgeon.optimize(model, passes=["move-qdq"], analyze=False).model
    full_check(out)
    feeds = {"x": np.random.default_rng(7).standard_normal((1, 4, 8, 8)).astype(np.float16)}
    assert np.array_equal(run(model, feeds)[0], run(out, feeds)[0])


# ---------------------------------------------------------------------------------------------
# 7. Found by the property tests (tests/passes/test_properties.py) and on MiniLM once the
#    pipeline repeats to a fixpoint:
#    a. the last move-qdq can carry a pair back across a MaxPool after quantize-pooling has run,
#       so a second optimize wrapped the SE Mul before it: the pipeline output was not a fixpoint.
#    b. quantize-pooling wrapped a transformer's bias Add (MatMul → Add(B)) once a pair reached
#       its output, and remove-misplaced-qdq took the pair out again (F3): 36 pairs added and
#       removed on MiniLM in every run, and the pipeline never settled.
# ---------------------------------------------------------------------------------------------
def test_bias_add_of_a_gemm_is_not_wrapped_and_the_pipeline_settles(caplog):
    from qdqsurgeon.analysis import predict

    from .passes.placement_graphs import ranges_of
    from .test_analysis import _attention

    model = _attention(bias=True)
    with caplog.at_level("WARNING"):
        res = qdqsurgeon.optimize(model, ranges=ranges_of(model))
    assert "fixpoint" not in caplog.text
    full_check(res.model)
    assert [c for c in _non_notes(res) if c.pass_name in ("quantize-pooling", "remove-misplaced-qdq")] == []
    prod = {o: n.op_type for n in res.model.graph.node for o in n.output}
    for p in "qkv":  # the bias Add reads its MatMul directly: one fused GEMM kernel (F3)
        bias = next(n for n in res.model.graph.node if n.name == f"{p}_bias")
        assert prod[bias.input[0]] == "MatMul"
    assert predict(res.model).standalone_qdq == ["x_QuantizeLinear"]
    again = qdqsurgeon.optimize(res.model, analyze=False)
    assert _non_notes(again) == [], [(c.pass_name, c.kind, c.node) for c in _non_notes(again)]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["all_minilm_l6_v2", "yolov8n_320", "efficientnet_lite0"])
def test_pipeline_settles_on_real_models(name, caplog):
    """No pipeline pass undoes another on the shared models: the repeat ends without the warning, and a
    second optimize changes nothing."""
    need_shared()
    model = qdqsurgeon.load(FP32 / f"{name}.onnx")
    ranges = qdqsurgeon.build_ranges(model, calib_random=1, progress=False)
    with caplog.at_level("WARNING"):
        out = qdqsurgeon.optimize(model, ranges=ranges, analyze=False).model
    assert "did not reach a fixpoint" not in caplog.text
    again = qdqsurgeon.optimize(out, analyze=False)
    assert _non_notes(again) == [], [(c.pass_name, c.kind, c.node) for c in _non_notes(again)][:10]
