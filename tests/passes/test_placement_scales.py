"""align-scales, move-qdq, quantize-pooling on small graphs, plus a hypothesis property over commuting chains (issue 4; P4-P7, C1).

Numerics are always against the graph *before the pass*: bit-exact for pure moves (move-qdq),
within one step of the new scale where align-scales unifies scales, within half a step of the
new pair's scale where quantize-pooling wraps an op.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

from qdqsurgeon.graph import import_model
from qdqsurgeon.passes.move_qdq import agreed_output_scale
from qdqsurgeon.ranges import StaticRanges

from ..helpers import F, full_check, init, make_model, qdq_nodes, run
from .placement_graphs import (act_out, by_kind_rule, calib_feeds, concat_dedicated_readers, count_ops, edits,
                               nodes_by_name, notes, optimize, pair_scale, pooled_fanout, prepare, q_scales, qat_concat,
                               ranges_of, reads_quantized, readers, resnet_block, run_tensors, source, with_pair)

EPS = 1 + 1e-5  # float32 slack on the bounds


def _idempotent(model, passes, ranges=None, **cfg):
    again = optimize(model, passes, ranges, **cfg)
    assert edits(again.changes) == [], again.changes


# --- align-scales (P4, P5, P6) --------------------------------------------------------------------


def _branch_scales(gains=(1.0, 4.0)):
    probe = qat_concat([None, None], 1.0, gains)
    amax = ranges_of(probe)(["b0_out", "b1_out"])
    return float(np.float32(amax["b0_out"] / 127)), float(np.float32(amax["b1_out"] / 127))


def _within_one_step(before_model, after_model, tensor, step):
    feeds = calib_feeds(before_model)
    a = run_tensors(before_model, [tensor], feeds)[tensor]
    b = run_tensors(after_model, [tensor], feeds)[tensor]
    assert np.max(np.abs(a - b)) <= step * EPS, (np.max(np.abs(a - b)), step)


def test_align_concat_max_policy_takes_the_largest_scale():
    s0, s1 = _branch_scales()
    model = qat_concat([s0, s1], s1)  # max calibration: the output amax is the largest input's
    res = optimize(model, ["align-scales"], align="max")
    # one Q (in0) and its DQ re-scaled; in1 and the output already had the largest scale
    assert by_kind_rule(res.changes) == {("constant", "P4"): 2}
    for t in ("b0_out", "b1_out", "concat_out"):
        assert q_scales(res.model, t) == [np.float32(s1)], t
    assert "max policy over tied tensors [b0_out, b1_out, concat_out]" in res.changes[0].detail
    full_check(res.model)
    _idempotent(res.model, ["align-scales"], align="max")
    _within_one_step(model, res.model, "cat_dq_out", s1)


def test_align_concat_output_policy_takes_the_consumer_scale():
    s0, s1 = _branch_scales()
    s_out = float(np.float32(0.75 * s1))  # a percentile calibrator clips the Concat output
    model = qat_concat([s0, s1], s_out)
    res = optimize(model, ["align-scales"], align="output")
    assert by_kind_rule(res.changes) == {("constant", "P4"): 4}  # both inputs' Q and DQ
    for t in ("b0_out", "b1_out", "concat_out"):
        assert q_scales(res.model, t) == [np.float32(s_out)], t
    full_check(res.model)
    _idempotent(res.model, ["align-scales"], align="output")
    _within_one_step(model, res.model, "cat_dq_out", s_out)
    # the same graph under the max policy: everything takes s1 instead
    res_max = optimize(model, ["align-scales"], align="max")
    assert {q_scales(res_max.model, t)[0] for t in ("b0_out", "b1_out", "concat_out")} == {np.float32(s1)}


def test_align_concat_missing_input_pair_is_inserted_at_the_shared_scale():
    s0, s1 = _branch_scales()
    model = qat_concat([s0, None], s1)
    res = optimize(model, ["align-scales"])
    assert reads_quantized(res.model, "concat", 1) and source(res.model, nodes_by_name(res.model)["concat"].input[1]) == "b1_out"
    assert by_kind_rule(res.changes) == {("add", "P4"): 2, ("constant", "P4"): 2}
    assert {q_scales(res.model, t)[0] for t in ("b0_out", "b1_out", "concat_out")} == {np.float32(s1)}
    full_check(res.model)
    _idempotent(res.model, ["align-scales"])
    _within_one_step(model, res.model, "cat_dq_out", s1)


def test_align_concat_covers_each_input_own_range_with_calibration():
    """P4 with ranges: a percentile-clipped Concat output range is raised to the widest input's own range."""
    _, s1 = _branch_scales()
    s_out = float(np.float32(0.6 * s1))  # the mixture's percentile, below b1's own range
    model = qat_concat([None, None], s_out)
    rng = StaticRanges({"b0_out": 0.3 * s1 * 127, "b1_out": s1 * 127, "concat_out": s_out * 127})
    res = optimize(model, ["align-scales"], rng)
    assert {q_scales(res.model, t)[0] for t in ("b0_out", "b1_out", "concat_out")} == {np.float32(s1)}
    assert by_kind_rule(res.changes) == {("add", "P4"): 4, ("constant", "P4"): 6}
    _idempotent(res.model, ["align-scales"], rng)
    # nothing clips any more: the Concat reads its float inputs within half a step (before: clipped at s_out)
    feeds = calib_feeds(model)
    exact = run_tensors(model, ["concat_out"], feeds)["concat_out"]
    assert np.max(np.abs(run_tensors(res.model, ["cat_dq_out"], feeds)["cat_dq_out"] - exact)) <= s1 / 2 * EPS
    assert np.max(np.abs(run_tensors(model, ["cat_dq_out"], feeds)["cat_dq_out"] - exact)) > 0.3 * s1 * 127
    # --align scales: the carried-back pairs keep the Concat output's range, as before
    old = optimize(model, ["align-scales"], rng, align="scales")
    assert {q_scales(old.model, t)[0] for t in ("b0_out", "b1_out", "concat_out")} == {np.float32(s_out)}
    # without calibration (the fix path) the pairs' own scales are all there is
    assert {q_scales(optimize(model, ["align-scales"]).model, t)[0] for t in ("b1_out", "concat_out")} == {np.float32(s_out)}


def test_align_concat_with_one_quantizer_per_reader_is_idempotent():
    """The Concat's readers disagree (s1 != s2) until aligned; the missing input pair comes in the same run."""
    amax = ranges_of(concat_dedicated_readers())(["Relu_3_out", "concat_out"])
    s_in, s1 = (float(np.float32(amax[k] / 127)) for k in ("Relu_3_out", "concat_out"))
    s2 = float(np.float32(1.5 * s1))  # calibrated ranges throughout: nothing clips before or after
    model = concat_dedicated_readers(s_in, s1, s2)
    res = optimize(model, ["align-scales"])
    assert reads_quantized(res.model, "concat", 1)
    for t in ("Relu_3_out", "Relu_6_out", "concat_out"):
        assert set(q_scales(res.model, t)) == {np.float32(s2)}, t
    # ina (Q+DQ) and o1 (Q+DQ) re-scaled to the max, then B's pair inserted at that scale
    assert by_kind_rule(res.changes) == {("constant", "P4"): 4, ("add", "P4"): 2}
    full_check(res.model)
    _idempotent(res.model, ["align-scales"])
    for t in ("o1_dq_out", "o2_dq_out"):
        _within_one_step(model, res.model, t, s2)


def test_align_near_miss_non_int8_pair_leaves_group_alone():
    s0, s1 = _branch_scales()
    # a uint8 zero-point-128 pair on one input (onnxruntime's default, not TensorRT's symmetric
    # int8): the whole group is left alone, scales and all
    model = qat_concat([s0, s1], s1, zps=(np.uint8(128), None))
    res = optimize(model, ["align-scales"])
    assert res.changes == []
    from qdqsurgeon.passes.align_scales import _plain_int8, tied_groups

    graph = import_model(model)
    (group,) = [g for g in tied_groups(graph) if any(t.name == "concat_out" for t in g)]
    qs = [n for t in group for n in t.outputs if n.op == "QuantizeLinear"]
    # the reason: only groups of per-tensor int8 zero-point-0 Qs are re-scaled
    assert sorted(q.name for q in qs if not _plain_int8(q)) == ["in0_q"]


def test_align_equal_scales_no_change():
    s0, s1 = _branch_scales()
    res = optimize(qat_concat([s1, s1], s1), ["align-scales"])
    assert res.changes == []


# --- move-qdq (C1, P5, F11) ------------------------------------------------------------------------


def test_move_carries_pair_back_across_maxpool_bit_exact():
    model, rng = prepare(pooled_fanout(float_reader=False))
    relu = act_out(model, "conv")
    res = optimize(model, ["move-qdq"], rng)
    pool = nodes_by_name(res.model)["pool"]
    assert reads_quantized(res.model, "pool", 0) and source(res.model, pool.input[0]) == relu
    assert q_scales(res.model, relu) == q_scales(res.model, "pool_out")  # P5: one scale around the MaxPool
    assert by_kind_rule(res.changes) == {("add", "C1"): 2}
    full_check(res.model)
    _idempotent(res.model, ["move-qdq"], rng)
    feeds = calib_feeds(model)
    for a, b in zip(run(model, feeds), run(res.model, feeds)):
        np.testing.assert_array_equal(a, b)


def test_move_near_miss_maxpool_with_float_reader_stays():
    model, rng = prepare(pooled_fanout(float_reader=True))
    res = optimize(model, ["move-qdq"], rng)
    assert res.changes == []
    assert not reads_quantized(res.model, "pool", 0)
    # the reason (C1): the MaxPool output is also read in float, so its readers do not agree
    graph = import_model(model)
    pool = next(n for n in graph.nodes if n.name == "pool")
    assert agreed_output_scale(graph, pool) is None
    assert sorted(n.op_type for n in readers(model, "pool_out")) == ["QuantizeLinear", "Sigmoid"]


# --- quantize-pooling (P7) -------------------------------------------------------------------------


def test_pooling_wraps_gap_read_by_quantized_gemm():
    model, rng = prepare(resnet_block("downsample"), "move-qdq")  # Flatten carried fc's pair to the GAP output
    gap_in = nodes_by_name(model)["gap"].input[0]
    assert not reads_quantized(model, "gap", 0) and q_scales(model, "gap_out")
    res = optimize(model, ["quantize-pooling"], rng)
    assert reads_quantized(res.model, "gap", 0) and source(res.model, nodes_by_name(res.model)["gap"].input[0]) == gap_in
    assert pair_scale(res.model, nodes_by_name(res.model)["gap"].input[0]) == np.float32(rng([gap_in])[gap_in] / 127)
    assert by_kind_rule(res.changes) == {("add", "P7"): 2}
    assert "fully wrapped (calibrated range)" in res.changes[0].detail
    full_check(res.model)
    _idempotent(res.model, ["quantize-pooling"], rng)
    # the GAP output moves by at most half a step of the new input scale (a mean of rounding errors)
    feeds = calib_feeds(model)
    a = run_tensors(model, ["gap_out"], feeds)["gap_out"]
    b = run_tensors(res.model, ["gap_out"], feeds)["gap_out"]
    assert np.max(np.abs(a - b)) <= 0.5 * pair_scale(res.model, nodes_by_name(res.model)["gap"].input[0]) * EPS


def test_pooling_unwraps_half_quantized_gap_read_in_float():
    model, rng = prepare(resnet_block("downsample", tail="float"), "exclude-output-layers")
    gap_in = nodes_by_name(model)["gap"].input[0]
    s = rng([gap_in])[gap_in] / 127
    model = with_pair(model, gap_in, "gap", s, name="gapq")  # DQ in, no Q out: half-quantized
    res = optimize(model, ["quantize-pooling"], rng)
    assert nodes_by_name(res.model)["gap"].input[0] == gap_in
    assert by_kind_rule(res.changes) == {("rewire", "P7"): 1, ("cleanup", "cleanup"): 2}
    assert "output is read in float: no half-quantized op" in res.changes[0].detail
    full_check(res.model)
    _idempotent(res.model, ["quantize-pooling"], rng)
    feeds = calib_feeds(model)
    a = run_tensors(model, ["gap_out"], feeds)["gap_out"]
    b = run_tensors(res.model, ["gap_out"], feeds)["gap_out"]
    exact = run_tensors(res.model, [gap_in], feeds)[gap_in].mean(axis=(2, 3), keepdims=True)
    assert np.max(np.abs(a - b)) <= 0.5 * np.float32(s) * EPS
    np.testing.assert_allclose(b, exact, rtol=1e-5, atol=1e-6)  # exact float GAP again


def test_pooling_near_miss_no_calibrated_range_leaves_a_note():
    model, _ = prepare(resnet_block("downsample"), "move-qdq")
    gap_in = nodes_by_name(model)["gap"].input[0]
    res = optimize(model, ["quantize-pooling"], StaticRanges({}))
    assert edits(res.changes) == []
    assert notes(res.changes) == [f"input {gap_in} has no calibrated range; GlobalAveragePool left half-quantized"]


# --- property: chains of commuting ops between two Convs -------------------------------------------

CH, HW = 8, 6
_W1 = (np.random.default_rng(11).standard_normal((CH, CH, 1, 1)) * 0.4).astype(np.float32)
_W2 = (np.random.default_rng(12).standard_normal((CH, CH, 1, 1)) * 0.4).astype(np.float32)
_W2S = (np.abs(_W2).reshape(CH, -1).max(axis=1) / 127).astype(np.float32)
_FEEDS = {"x": np.random.default_rng(13).standard_normal((1, CH, HW, HW)).astype(np.float32)}
_AMAX = float(np.max(np.maximum(np.einsum("oc,nchw->nohw", _W1[:, :, 0, 0], _FEEDS["x"]), 0)))


def _op(kind: str, x: str, i: int) -> tuple[list[onnx.NodeProto], str, list[onnx.TensorProto]]:
    """One shape-preserving commuting step on [1, CH, HW, HW] (square spatial dims)."""
    o = f"t{i}"
    if kind == "maxpool":
        return [helper.make_node("MaxPool", [x], [o], name=f"op{i}", kernel_shape=[3, 3], pads=[1, 1, 1, 1])], o, []
    if kind == "transpose":
        return [helper.make_node("Transpose", [x], [o], name=f"op{i}", perm=[0, 1, 3, 2])], o, []
    if kind == "reshape":
        shape = init(f"shape{i}", np.asarray([1, CH, HW * 2, HW // 2], np.int64))
        back = init(f"back{i}", np.asarray([1, CH, HW, HW], np.int64))
        return [helper.make_node("Reshape", [x, shape.name], [o + "a"], name=f"op{i}"),
                helper.make_node("Reshape", [o + "a", back.name], [o], name=f"op{i}b")], o, [shape, back]
    if kind == "flatten":
        back = init(f"back{i}", np.asarray([1, CH, HW, HW], np.int64))
        return [helper.make_node("Flatten", [x], [o + "a"], name=f"op{i}", axis=1),
                helper.make_node("Reshape", [o + "a", back.name], [o], name=f"op{i}b")], o, [back]
    raise AssertionError(kind)


def _chain_model(kinds: list[str], mid: tuple[int, float] | None, s_last: float) -> onnx.ModelProto:
    """Conv → ReLU → commuting chain (a pair with scale ``mid[1]`` after step ``mid[0]``) → qdq(s_last) → Conv(W~)."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"), helper.make_node("Relu", ["c1"], ["r"], name="relu")]
    inits = [init("w1", _W1), init("w2", _W2), init("w2s", _W2S), init("w2z", np.zeros(CH, np.int8)), init("z", np.int8(0)),
             init("s_last", np.float32(s_last))]
    x = "r"
    for i, kind in enumerate(kinds):
        ns, x, extra = _op(kind, x, i)
        nodes += ns
        inits += extra
        if mid is not None and mid[0] == i:
            inits.append(init("s_mid", np.float32(mid[1])))
            nodes += qdq_nodes(x, f"{x}_mid", "s_mid", "z", "mid")
            x = f"{x}_mid"
    nodes += qdq_nodes(x, "xq", "s_last", "z", "last")
    nodes += qdq_nodes("w2", "w2q", "w2s", "w2z", "w2", axis=0)
    nodes.append(helper.make_node("Conv", ["xq", "w2q"], ["y"], name="conv2"))
    return make_model(nodes, [("x", F, [1, CH, HW, HW])], [("y", F, [1, CH, HW, HW])], inits)


_KINDS = st.lists(st.sampled_from(["maxpool", "transpose", "reshape", "flatten"]), min_size=1, max_size=4)
# scales from amax/127 (nothing clips) up to 4x that
_SCALE = st.floats(1.0, 4.0).map(lambda k: float(np.float32(k * _AMAX / 127)))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kinds=_KINDS, data=st.data(), s_last=_SCALE)
def test_property_commuting_chain_align_then_move(kinds, data, s_last):
    # the extra pair sits after step i < last, so at least one op separates it from the last pair
    # (back-to-back pairs with two scales: see test_align_stacked_pairs_with_two_scales)
    mid = data.draw(st.none() | st.tuples(st.integers(0, len(kinds) - 2), _SCALE)) if len(kinds) > 1 else None
    model = _chain_model(kinds, mid, s_last)
    passes = ["align-scales", "move-qdq"]
    res = optimize(model, passes)  # onnx.checker (full) inside
    _idempotent(res.model, passes)
    t = max(s_last, mid[1]) if mid else s_last
    # every activation Q now has one scale, and the pair sits right after the ReLU (C1: one reader)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in res.model.graph.initializer}
    acts = {float(inits[n.input[1]]) for n in res.model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] != "w2"}
    assert acts == {np.float32(t)}
    (reader,) = readers(res.model, "r")
    assert reader.op_type == "QuantizeLinear"
    # numerics at conv2's input vs the graph before the passes
    a = run_tensors(model, ["xq"], _FEEDS)["xq"]
    b = run_tensors(res.model, [nodes_by_name(res.model)["conv2"].input[0]], _FEEDS)
    b = next(iter(b.values()))
    if mid is None or mid[1] == s_last:
        np.testing.assert_array_equal(a, b)  # one scale throughout: a pure move, bit-exact
        np.testing.assert_array_equal(run(model, _FEEDS)[0], run(res.model, _FEEDS)[0])
    else:
        assert np.max(np.abs(a - b)) <= t * EPS
    assert count_ops(res.model, "Conv") == 2


def test_align_stacked_pairs_with_two_scales():
    model = _chain_model(["maxpool"], (0, float(np.float32(2 * _AMAX / 127))), float(np.float32(_AMAX / 127)))
    res = optimize(model, ["align-scales", "move-qdq", "fold-qdq-pairs", "dedupe-qdq"])
    from qdqsurgeon.analysis import predict

    assert predict(res.model).requantize == 0
