"""The full PTQ pipeline on ResNet-like, MobileNetV2, C2f and SPPF blocks (issue 4 "Must show").

``qdqsurgeon.optimize(float_model, ranges=..., analyze=True)`` (mode detected: "ptq"), then the
static TensorRT prediction (:func:`qdqsurgeon.analysis.predict`) must show no standalone Q/DQ
layer but the graph input's Quantize (P10: an FP32 input always needs one), the placement must
have the pattern's shape, the SQNR against the float model on the calibration batch must stay
above 20 dB, and the placement passes must have nothing left to do on the result.
"""

from __future__ import annotations

import numpy as np
import pytest

from qdqsurgeon.analysis import predict
from qdqsurgeon.pipelines import CLEANUP, PLACEMENT

from ..helpers import run
from .placement_graphs import (act_out, c2f, calib_feeds, edits, inverted_residual, nodes_by_name, optimize, pair_scale,
                               producers, q_scales, ranges_of, reads_quantized, readers, resnet_block, source, sppf, sqnr)

INPUT_Q = ["input_QuantizeLinear"]


def _ptq(model, **cfg):
    rng = ranges_of(model)
    res = optimize(model, None, rng, **cfg)
    assert res.mode == "ptq"
    pred = predict(res.model).to_dict()
    assert res.after is not None and res.after["standalone_qdq"] == pred["standalone_qdq"]
    feeds = calib_feeds(model)
    db = min(sqnr(a, b) for a, b in zip(run(model, feeds), run(res.model, feeds)))
    assert db > 20, db
    again = optimize(res.model, [*PLACEMENT, *CLEANUP], rng, **cfg)
    assert edits(again.changes) == [], again.changes
    return res, pred


def _int8(pred) -> list[str]:
    return sorted(w["node"] for w in pred["weighted_ops"] if w["precision"].startswith("int8"))


def test_pipeline_resnet_downsample_block():
    res, pred = _ptq(resnet_block("downsample"))
    assert pred["standalone_qdq"] == INPUT_Q
    m = res.model
    # exactly one Add operand quantized: the downsample (shorter) branch (P3, F6)
    assert not reads_quantized(m, "block.add", 0) and reads_quantized(m, "block.add", 1)
    assert source(m, nodes_by_name(m)["block.add"].input[1]) == "block.downsample_out"
    assert _int8(pred) == ["block.conv1", "block.conv2", "block.downsample", "stem", "tail_conv"]  # fc: float head (P9)
    assert pred["requantize_layers"] == 0


def test_pipeline_resnet_identity_block():
    res, pred = _ptq(resnet_block("identity"))
    assert pred["standalone_qdq"] == INPUT_Q
    m = res.model
    # skip quantized with the pair block.conv1 reads (P6), conv side float (F7)
    assert not reads_quantized(m, "block.add", 0) and reads_quantized(m, "block.add", 1)
    assert nodes_by_name(m)["block.add"].input[1] == nodes_by_name(m)["block.conv1"].input[0]
    assert source(m, nodes_by_name(m)["block.add"].input[1]) == act_out(m, "stem")


@pytest.mark.parametrize("kind,expected", [
    ("downsample", INPUT_Q),
    # The stem output feeds block.conv1 (quantized) and the residual Add, which takes its skip in
    # float because the block output is read in float (no standalone Dequantize, P3). By C1 the
    # stem then writes float and block.conv1's Quantize is a kernel of its own: one more layer.
    # Quantizing the skip instead would trade it for a standalone Dequantize (the fused
    # Conv+Add writes float), so the count is the same either way.
    ("identity", INPUT_Q + ["Relu_3_out_QuantizeLinear"]),
])
def test_pipeline_block_into_float_head(kind, expected):
    # The classifier excluded by the user (--exclude fc): the block output is read in float.
    res, pred = _ptq(resnet_block(kind, tail="float"), exclude=["^fc$"])
    m = res.model
    assert not reads_quantized(m, "block.add", 0) and not reads_quantized(m, "block.add", 1)
    assert any(c.kind == "note" and c.node == "block.add" and "skip left float" in c.detail for c in res.changes)
    assert pred["standalone_qdq"] == expected
    if kind == "identity":
        reason = pred["standalone_reasons"]["Relu_3_out_QuantizeLinear"]
        assert reason.startswith("C1:") and "block.add" in reason
    assert not reads_quantized(m, "fc", 0) and not reads_quantized(m, "gap", 0)  # GAP not half-quantized (P7)


@pytest.mark.parametrize("kind", ["downsample", "identity"])
def test_pipeline_classifier_reading_residual_block_keeps_int8_input(kind):
    # P9's second form: the classifier after GAP reads the residual stream, so it keeps INT8
    # inputs and writes float; the block writes INT8, GAP runs wrapped (P7) and only the input
    # Quantize stays (trt-rules.md section 5, qat-residual-qgap).
    res, pred = _ptq(resnet_block(kind, tail="float"))
    m = res.model
    assert pred["standalone_qdq"] == INPUT_Q
    assert reads_quantized(m, "fc", 0) and reads_quantized(m, "fc", 1)
    assert [o.name for o in m.graph.output] == ["fc_out"]
    assert producers(m)["fc_out"].name == "fc"  # float output: no Q/DQ after the classifier
    assert reads_quantized(m, "gap", 0) and reads_quantized(m, "block.add", 1) and not reads_quantized(m, "block.add", 0)
    fc = next(w for w in pred["weighted_ops"] if w["node"] == "fc")
    assert fc["precision"] == "int8->float"
    assert any(c.kind == "note" and c.node == "fc" and "reads a residual block" in c.detail for c in res.changes)


def test_pipeline_mobilenetv2_inverted_residual():
    res, pred = _ptq(inverted_residual())
    assert pred["standalone_qdq"] == INPUT_Q
    m = res.model
    # project Conv (no activation) feeds the Add in float, the block input is the quantized skip
    assert nodes_by_name(m)["block.add"].input[0] == "project_out"
    assert reads_quantized(m, "block.add", 1) and nodes_by_name(m)["block.add"].input[1] == nodes_by_name(m)["expand"].input[0]
    # nothing between a Conv and its Clip (F3)
    for conv in ("stem", "expand", "depthwise"):
        assert [n.op_type for n in readers(m, f"{conv}_out")] == ["Clip"]
    assert _int8(pred) == ["depthwise", "expand", "project", "stem", "tail_conv"]


def test_pipeline_c2f_bottleneck():
    res, pred = _ptq(c2f())
    assert pred["standalone_qdq"] == INPUT_Q
    m = res.model
    split, cat = nodes_by_name(m)["split"], nodes_by_name(m)["concat"]
    # cv1 writes INT8: the pair moved back across the Split (C1); all Concat inputs quantized
    # with the Split's scale and the Concat output's (P4)
    assert reads_quantized(m, "split", 0)
    s = pair_scale(m, split.input[0])
    assert all(reads_quantized(m, "concat", i) for i in range(3))
    assert {pair_scale(m, t) for t in cat.input} == {s}
    assert q_scales(m, "concat_out") == [s]
    # bottleneck Add after SiLU: TensorRT keeps it out of the conv kernel (E8.1), so both inputs are
    # quantized (NVIDIA's YOLOv5/v7 QAT recipe): the skip shares the Split's pair, the branch gets its
    # own calibrated pair, and the Add runs as an INT8 PointWise layer between INT8 Conv+SiLU kernels
    assert reads_quantized(m, "m.add", 0) and reads_quantized(m, "m.add", 1)
    assert pair_scale(m, nodes_by_name(m)["m.add"].input[0]) == s
    branch_q = producers(m)[producers(m)[nodes_by_name(m)["m.add"].input[1]].input[0]]
    assert producers(m)[branch_q.input[0]].op_type == "Mul"
    assert "m.add" in pred["int8_ops"]
    # SiLU never split by a pair (F10): every Conv output is read by exactly Sigmoid and Mul
    for conv in ("cv1", "m.cv1", "m.cv2", "cv2"):
        assert sorted(n.op_type for n in readers(m, f"{conv}_out")) == ["Mul", "Sigmoid"], conv
    assert _int8(pred) == ["cv1", "cv2", "m.cv1", "m.cv2"]  # head: float (P9)


def test_pipeline_sppf_one_scale_around_the_pools():
    res, pred = _ptq(sppf())
    assert pred["standalone_qdq"] == INPUT_Q
    m = res.model
    nodes = nodes_by_name(m)
    scales = set()
    for i in (1, 2, 3):
        pool = nodes[f"pool{i}"]
        assert reads_quantized(m, pool.name, 0)
        scales.add(pair_scale(m, pool.input[0]))
        scales.update(q_scales(m, pool.output[0]))
    cat = nodes["concat"]
    assert all(reads_quantized(m, "concat", i) for i in range(4))
    scales.update(pair_scale(m, t) for t in cat.input)
    scales.update(q_scales(m, "concat_out"))
    assert len(scales) == 1, scales
    assert pred["requantize_layers"] == 0
    assert _int8(pred) == ["cv1", "cv2"]
    # cv1's SiLU output is quantized once (P6) and read by pool1 and the Concat through that pair
    silu = act_out(m, "cv1")
    assert len(q_scales(m, silu)) == 1
    assert np.float32(list(scales)[0]) > 0
