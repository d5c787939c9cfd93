"""insert-qdq: axis per op type, zero-range channels, shared pairs, exclusions, weights modes (issue 3; rules P1, F1, V1-V4, P6)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import qdqsurgeon
from qdqsurgeon.config import Config
from qdqsurgeon.errors import ModelError
from qdqsurgeon.inspection import inspect_model
from qdqsurgeon.quant import MIN_SCALE
from qdqsurgeon.ranges import StaticRanges

from ..helpers import F, full_check, init, make_model, random_feeds, run

RNG = np.random.default_rng(0)


def _ranges(model: onnx.ModelProto, feeds=None) -> StaticRanges:
    """Exact absmax of every float tensor (the 'max' method on one batch)."""
    feeds = feeds or random_feeds(model, seed=1)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    names = [n for node in m.graph.node for n in node.output]
    del m.graph.output[:]
    m.graph.output.extend([helper.make_empty_tensor_value_info(n) for n in names])
    values = run(m, feeds)
    amax = {n: float(np.max(np.abs(v))) for n, v in zip(names, values) if v.dtype.kind == "f"}
    amax.update({k: float(np.max(np.abs(v))) for k, v in feeds.items()})
    return StaticRanges(amax)


def _insert(model, **cfg):
    res = qdqsurgeon.optimize(model, passes=["insert-qdq"], ranges=_ranges(model), config=Config(**cfg), analyze=False)
    full_check(res.model)
    return res


def _dq_axis_for(model: onnx.ModelProto, consumer: str, index: int) -> tuple[int | None, int]:
    """(axis, number of scale values) of the DQ feeding input ``index`` of node ``consumer``."""
    nodes = {o: n for n in model.graph.node for o in n.output}
    target = next(n for n in model.graph.node if n.name == consumer)
    dq = nodes[target.input[index]]
    assert dq.op_type == "DequantizeLinear"
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    axis = next((a.i for a in dq.attribute if a.name == "axis"), None)
    return axis, inits[dq.input[1]].size


def _sqnr(a, b) -> float:
    return 10 * np.log10(np.sum(a.astype(np.float64) ** 2) / max(np.sum((a.astype(np.float64) - b) ** 2), 1e-30))


def _conv_model(groups=1, transpose=False):
    cin, cout = 4, 6
    if transpose:
        w = RNG.standard_normal((cin, cout // groups, 3, 3)).astype(np.float32)
        node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], name="op", group=groups)
        out = [1, cout, 6, 6]
    else:
        w = RNG.standard_normal((cout, cin // groups, 3, 3)).astype(np.float32)
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="op", group=groups, pads=[1, 1, 1, 1])
        out = [1, cout, 4, 4]
    return make_model([node], [("x", F, [1, cin, 4, 4])], [("y", F, out)],
                      [init("w", w), init("b", RNG.standard_normal(cout).astype(np.float32))])


@pytest.mark.parametrize("kind,expected", [
    ("conv", (0, 6)), ("conv_grouped", (0, 6)), ("convtranspose", (1, 6)), ("convtranspose_grouped", (None, 1)),
])
def test_conv_axes(kind, expected):
    model = _conv_model(groups=2 if "grouped" in kind else 1, transpose="transpose" in kind)
    res = _insert(model)
    assert _dq_axis_for(res.model, "op", 1) == expected
    assert _dq_axis_for(res.model, "op", 0) == (None, 1)  # activation per-tensor
    # the bias is never quantized (V4)
    assert next(n for n in res.model.graph.node if n.name == "op").input[2] == "b"
    assert inspect_model(res.model).problems == []


def test_convtranspose_axis_configurable():
    res = _insert(_conv_model(transpose=True), convtranspose_axis=0)
    assert _dq_axis_for(res.model, "op", 1) == (0, 4)


@pytest.mark.parametrize("trans_b,shape,axis", [(1, (5, 8), 0), (0, (8, 5), 1)])
def test_gemm_axis_follows_transB(trans_b, shape, axis):
    model = make_model([helper.make_node("Gemm", ["x", "w"], ["y"], name="op", transB=trans_b)],
                       [("x", F, [2, 8])], [("y", F, [2, 5])], [init("w", RNG.standard_normal(shape).astype(np.float32))])
    res = _insert(model)
    assert _dq_axis_for(res.model, "op", 1) == (axis, 5)


def test_matmul_kn_weight_last_axis_and_bmm_flag():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="linear"),
             helper.make_node("Transpose", ["h"], ["ht"], name="t", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["h", "ht"], ["y"], name="bmm")]
    model = make_model(nodes, [("x", F, [2, 3, 8])], [("y", F, [2, 3, 3])],
                       [init("w", RNG.standard_normal((8, 5)).astype(np.float32))])
    res = _insert(model)
    assert _dq_axis_for(res.model, "linear", 1) == (1, 5)
    bmm = next(n for n in res.model.graph.node if n.name == "bmm")
    assert bmm.input[0] == "h" and bmm.input[1] == "ht"  # a batch GEMM outside attention: untouched by default
    res = _insert(model, quantize_bmm=True)
    assert _dq_axis_for(res.model, "bmm", 0) == (None, 1) and _dq_axis_for(res.model, "bmm", 1) == (None, 1)


def test_transposed_initializer_weight_is_folded():
    w = RNG.standard_normal((5, 8)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], name="tw", perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["y"], name="op")]
    model = make_model(nodes, [("x", F, [2, 8])], [("y", F, [2, 5])], [init("w", w)])
    res = _insert(model)
    assert _dq_axis_for(res.model, "op", 1) == (1, 5)
    feeds = random_feeds(model, seed=1)  # the calibration batch: nothing clips
    assert _sqnr(run(model, feeds)[0], run(res.model, feeds)[0]) > 30


def test_zero_range_channel_gets_minimum_scale():
    w = RNG.standard_normal((4, 3, 1, 1)).astype(np.float32)
    w[2] = 0.0
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="op")], [("x", F, [1, 3, 2, 2])],
                       [("y", F, [1, 4, 2, 2])], [init("w", w)])
    res = _insert(model)
    inits = {i.name: numpy_helper.to_array(i) for i in res.model.graph.initializer}
    scale = next(v for k, v in inits.items() if k.startswith("w_scale"))
    assert scale.shape == (4,) and scale[2] == np.float32(MIN_SCALE) and np.all(scale > 0)
    assert any("zero-range" in c.detail for c in res.changes)
    assert inspect_model(res.model).problems == []
    out = run(res.model, random_feeds(model))[0]
    assert np.all(np.isfinite(out)) and np.all(out[:, 2] == 0)


def _fanout_model():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "wa"], ["ya"], name="conv_a"),
             helper.make_node("Conv", ["r", "wb"], ["yb"], name="conv_b"),
             helper.make_node("Sigmoid", ["r"], ["ys"], name="float_consumer")]
    inits = [init("wa", RNG.standard_normal((4, 4, 1, 1)).astype(np.float32)),
             init("wb", RNG.standard_normal((4, 4, 1, 1)).astype(np.float32))]
    return make_model(nodes, [("x", F, [1, 4, 3, 3])], [("ya", F, [1, 4, 3, 3]), ("yb", F, [1, 4, 3, 3]), ("ys", F, [1, 4, 3, 3])], inits)


def test_fanout_shares_one_pair_and_keeps_float_consumer():
    model = _fanout_model()
    res = _insert(model)
    q = [n for n in res.model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "r"]
    assert len(q) == 1  # P6
    convs = {n.name: n for n in res.model.graph.node if n.op_type == "Conv"}
    assert convs["conv_a"].input[0] == convs["conv_b"].input[0] != "r"
    assert next(n for n in res.model.graph.node if n.name == "float_consumer").input[0] == "r"
    assert any(c.rule == "P6" and c.kind == "note" for c in res.changes)
    counts = {}
    for c in res.changes:
        counts[(c.kind, c.rule)] = counts.get((c.kind, c.rule), 0) + 1
    # 1 activation pair + 2 weight pairs, 2 weight rewires
    assert counts[("add", "P1")] == 2 and counts[("add", "V3")] == 4 and counts[("rewire", "F1")] == 2


def test_shared_weight_gets_one_pair():
    w = RNG.standard_normal((4, 4, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="c1"), helper.make_node("Conv", ["a", "w"], ["y"], name="c2")]
    model = make_model(nodes, [("x", F, [1, 4, 2, 2])], [("y", F, [1, 4, 2, 2])], [init("w", w)])
    res = _insert(model)
    wq = [n for n in res.model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "w"]
    assert len(wq) == 1


def test_exclusions_by_name_op_and_hook():
    model = _fanout_model()
    res = _insert(model, exclude=["conv_a$"])
    convs = {n.name: n for n in res.model.graph.node if n.op_type == "Conv"}
    assert convs["conv_a"].input[1] == "wa" and convs["conv_b"].input[1] != "wb"
    assert any(c.node == "conv_a" and "--exclude" in c.detail for c in res.changes)
    res = _insert(model, exclude_ops=["Conv"])
    assert not any(n.op_type == "QuantizeLinear" for n in res.model.graph.node)
    cfg = Config(exclude_hook=lambda node: node.name == "conv_b")
    res = qdqsurgeon.optimize(model, passes=["insert-qdq"], ranges=_ranges(model), config=cfg, analyze=False)
    convs = {n.name: n for n in res.model.graph.node if n.op_type == "Conv"}
    assert convs["conv_b"].input[1] == "wb" and convs["conv_a"].input[1] != "wa"


def test_int8_weights_mode_matches_float_mode_numerically():
    model = _conv_model()
    a, b = _insert(model), _insert(model, weights="int8")
    assert sum(n.op_type == "QuantizeLinear" for n in b.model.graph.node) == 1  # only the activation Q
    int8_inits = [i for i in b.model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]
    assert len(int8_inits) == 1
    feeds = random_feeds(model)
    np.testing.assert_array_equal(run(a.model, feeds)[0], run(b.model, feeds)[0])


def test_numerics_bounded_and_idempotent():
    model = _conv_model()
    res = _insert(model)
    feeds = random_feeds(model, seed=1)  # the calibration batch: nothing clips
    ref, got = run(model, feeds)[0], run(res.model, feeds)[0]
    assert _sqnr(ref, got) > 30
    again = qdqsurgeon.optimize(res.model, passes=["insert-qdq"], ranges=_ranges(model), analyze=False)
    assert [c for c in again.changes if c.kind != "note"] == []


def test_uncalibrated_tensor_left_float_with_note():
    model = _conv_model()
    res = qdqsurgeon.optimize(model, passes=["insert-qdq"], ranges=StaticRanges({}), analyze=False)
    assert any(c.kind == "note" and "no calibrated range" in c.detail for c in res.changes)
    op = next(n for n in res.model.graph.node if n.name == "op")
    assert op.input[0] == "x"


def test_opset_12_is_upgraded_or_refused():
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="op")], [("x", F, [1, 3, 2, 2])],
                       [("y", F, [1, 4, 2, 2])], [init("w", RNG.standard_normal((4, 3, 1, 1)).astype(np.float32))], opset=12)
    with pytest.raises(ModelError, match="--no-opset-upgrade"):
        qdqsurgeon.optimize(model, passes=["insert-qdq"], ranges=_ranges(model), analyze=False, opset_upgrade=False)
    res = qdqsurgeon.optimize(model, passes=["insert-qdq"], ranges=_ranges(model), analyze=False)
    assert res.model.opset_import[0].version == 13 and res.passes[0] == "upgrade-opset"
    # the pass on its own (no optimize around it) still refuses clearly
    with pytest.raises(ModelError, match="--opset 13"):
        from qdqsurgeon.graph import import_model
        from qdqsurgeon.passes import PassContext
        from qdqsurgeon.passes.insert_qdq import InsertQdq
        InsertQdq()(import_model(model), PassContext(ranges=_ranges(model)))


def test_quantize_bmm_survives_the_full_pipeline():
    """Attention MatMuls quantized on both inputs (the default) stay quantized through placement."""
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="query"),
             helper.make_node("MatMul", ["x", "wk"], ["k"], name="key"),
             helper.make_node("MatMul", ["x", "wv"], ["v"], name="value"),
             helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["s"], name="scores"),
             helper.make_node("Softmax", ["s"], ["p"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["c"], name="context"),
             helper.make_node("MatMul", ["c", "wo"], ["y"], name="out")]
    model = make_model(nodes, [("x", F, [1, 4, 8])], [("y", F, [1, 4, 8])],
                       [init(n, RNG.standard_normal((8, 8)).astype(np.float32)) for n in ("wq", "wk", "wv", "wo")])
    res = qdqsurgeon.optimize(model, ranges=_ranges(model), config=Config(quantize_bmm=True), analyze=False)
    full_check(res.model)
    producers = {o: n for n in res.model.graph.node for o in n.output}
    scores = next(n for n in res.model.graph.node if n.name == "scores")
    assert [producers[t].op_type for t in scores.input] == ["DequantizeLinear", "DequantizeLinear"]
    default = qdqsurgeon.optimize(model, ranges=_ranges(model), analyze=False)
    assert onnx.helper.printable_graph(default.model.graph) == onnx.helper.printable_graph(res.model.graph)
    plain = qdqsurgeon.optimize(model, ranges=_ranges(model), config=Config(quantize_bmm=False), analyze=False)
    scores = next(n for n in plain.model.graph.node if n.name == "scores")
    assert all(producers_op != "DequantizeLinear" for producers_op in
               ({o: n for n in plain.model.graph.node for o in n.output}[t].op_type for t in scores.input))
