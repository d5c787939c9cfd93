"""quantize-residual, exclude-output-layers, remove-misplaced-qdq (Pad) on small graphs (issue 4; P3, F5-F7, P9, P8).

Each pass runs alone on the graph ``insert-qdq`` (+ the passes the pipeline runs before it) made
of a float pattern, with the float model's exact ranges. Per pattern: structure and exact change
counts by (kind, rule), a near miss with its reason, idempotence, numerics against the graph
*before the pass* in onnxruntime (optimizations off), and onnx.checker full check.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from qdqsurgeon.analysis import predict
from qdqsurgeon.graph import import_model
from qdqsurgeon.passes.exclude_output_layers import output_layers
from qdqsurgeon.trt_rules import commutes

from ..helpers import F, full_check, init, make_model, qdq_nodes, run
from .placement_graphs import (act_out, by_kind_rule, calib_feeds, count_ops, edits, nodes_by_name, notes, optimize,
                               pair_scale, prepare, reads_quantized, resnet_block, run_tensors, source, sqnr, tapped_backbone,
                               with_pair)

RNG = np.random.default_rng(0)


def _idempotent(model, passes, ranges=None, **cfg):
    again = optimize(model, passes, ranges, **cfg)
    assert edits(again.changes) == [], again.changes


# --- quantize-residual (P3, F5, F6, F7) -------------------------------------------------------------


def _add_inputs(model):
    return nodes_by_name(model)["block.add"].input


def test_residual_downsample_block_quantizes_only_the_shorter_branch():
    model, rng = prepare(resnet_block("downsample"), "exclude-output-layers")
    res = optimize(model, ["quantize-residual"], rng)
    conv_side, skip = _add_inputs(res.model)
    # Both operands are conv chains (F6): the downsample (1 node from the shared input pair) is
    # quantized, the conv1→conv2 branch (5 nodes) stays float and fuses with the Add.
    assert conv_side == "block.conv2_out"
    assert reads_quantized(res.model, "block.add", 1) and source(res.model, skip) == "block.downsample_out"
    assert by_kind_rule(res.changes) == {("add", "P3"): 2}
    assert "block.downsample has the shorter path (1 vs 5 nodes)" in res.changes[0].detail
    # The new pair is calibrated on the downsample output (nothing shared it before).
    assert pair_scale(res.model, skip) == np.float32(rng(["block.downsample_out"])["block.downsample_out"] / 127)
    full_check(res.model)
    _idempotent(res.model, ["quantize-residual"], rng)
    # Numerics vs the graph before the pass: the Add moves by at most half a step of the skip scale.
    feeds = calib_feeds(model)
    before = run_tensors(model, ["block.add_out"], feeds)["block.add_out"]
    after = run_tensors(res.model, ["block.add_out"], feeds)["block.add_out"]
    assert np.max(np.abs(after - before)) <= 0.5 * pair_scale(res.model, skip) * (1 + 1e-5)


def test_residual_identity_block_shares_the_skip_pair_and_removes_conv_side_pair():
    base, rng = prepare(resnet_block("identity"), "exclude-output-layers")
    skip_src = act_out(base, "stem")
    # F7: a Q/DQ on the conv-side operand (as some QAT exports put it) splits Conv2 from the Add.
    s_conv = rng(["block.conv2_out"])["block.conv2_out"] / 127
    model = with_pair(base, "block.conv2_out", "block.add", s_conv, name="conv_side")
    res = optimize(model, ["quantize-residual"], rng)
    conv_side, skip = _add_inputs(res.model)
    assert conv_side == "block.conv2_out"  # read in float again
    assert reads_quantized(res.model, "block.add", 1) and source(res.model, skip) == skip_src
    # The skip reads the very pair block.conv1 reads (P6): no new Q/DQ.
    assert skip == nodes_by_name(res.model)["block.conv1"].input[0]
    assert by_kind_rule(res.changes) == {("rewire", "F7"): 1, ("rewire", "P3"): 1, ("cleanup", "cleanup"): 2}
    assert count_ops(res.model, "QuantizeLinear") == count_ops(model, "QuantizeLinear") - 1
    full_check(res.model)
    _idempotent(res.model, ["quantize-residual"], rng)
    feeds = calib_feeds(model)
    before = run_tensors(model, ["block.add_out"], feeds)["block.add_out"]
    after = run_tensors(res.model, ["block.add_out"], feeds)["block.add_out"]
    bound = 0.5 * (s_conv + pair_scale(res.model, skip))  # one pair removed, one added
    assert np.max(np.abs(after - before)) <= bound * (1 + 1e-5)


def test_residual_near_miss_block_feeding_float_head_keeps_skip_float():
    for kind in ("identity", "downsample"):
        # fc excluded by the user: the block output is read in float by the head.
        model, rng = prepare(resnet_block(kind, tail="float"), "exclude-output-layers", exclude=["^fc$"])
        res = optimize(model, ["quantize-residual"], rng, exclude=["^fc$"])
        assert edits(res.changes) == []
        assert notes(res.changes) == ["output is read in float (head or graph output): skip left float, no standalone Dequantize"]
        assert res.changes[0].node == "block.add" and res.changes[0].rule == "P3"
        assert not reads_quantized(res.model, "block.add", 0) and not reads_quantized(res.model, "block.add", 1)
        np.testing.assert_array_equal(run(model, calib_feeds(model))[0], run(res.model, calib_feeds(model))[0])


def test_residual_near_miss_without_range_or_pair_leaves_skip_float():
    from qdqsurgeon.ranges import StaticRanges

    model, _ = prepare(resnet_block("downsample"), "exclude-output-layers")
    res = optimize(model, ["quantize-residual"], StaticRanges({}))
    assert edits(res.changes) == []
    assert notes(res.changes) == ["skip input block.downsample_out has no Q/DQ to share and no calibrated range; left float"]


# --- exclude-output-layers (P9) -----------------------------------------------------------------------


def test_exclude_output_layers_final_gemm_kept_float():
    float_model = resnet_block("downsample")
    model, rng = prepare(float_model)
    fc = nodes_by_name(model)["fc"]
    assert reads_quantized(model, "fc", 0) and reads_quantized(model, "fc", 1)
    res = optimize(model, ["exclude-output-layers"])
    fc = nodes_by_name(res.model)["fc"]
    inits = {i.name for i in res.model.graph.initializer}
    assert fc.input[0] == "flatten_out" and fc.input[1] in inits  # float activation and float weight
    # activation + weight rewired; the activation pair, read by nothing INT8 any more, removed
    # (P2: it would be a standalone Quantize + Dequantize); the weight pair orphaned; the note
    # points at the flag
    assert by_kind_rule(res.changes) == {("rewire", "P9"): 2, ("remove", "P9"): 2, ("cleanup", "cleanup"): 2}
    assert notes(res.changes) == ["output layer kept float (use --keep-output-layers to quantize it)"]
    # Near miss: tail_conv reaches the output only through fc (another weighted op): stays quantized.
    assert reads_quantized(res.model, "tail_conv", 0) and reads_quantized(res.model, "tail_conv", 1)
    assert not any(c.node == "tail_conv" for c in res.changes)
    assert [n.name for n in output_layers(import_model(model))] == ["fc"]
    full_check(res.model)
    _idempotent(res.model, ["exclude-output-layers"])
    # Numerics move towards the float model (the head is exact float again).
    feeds = calib_feeds(model)
    ref = run(float_model, feeds)[0]
    assert sqnr(ref, run(res.model, feeds)[0]) >= sqnr(ref, run(model, feeds)[0])


def test_exclude_output_layers_conv_head_and_residual_stream():
    from .placement_graphs import c2f

    model, _ = prepare(c2f())
    res = optimize(model, ["exclude-output-layers"])
    assert not reads_quantized(res.model, "head", 0) and not reads_quantized(res.model, "head", 1)
    assert reads_quantized(res.model, "cv2", 0)
    # head activation + weight rewired; the head's input pair (cv2's SiLU output), read by
    # nothing INT8 any more, is removed (it would be a standalone Quantize + Dequantize, P2);
    # the weight pair is orphaned.
    assert by_kind_rule(res.changes) == {("rewire", "P9"): 2, ("remove", "P9"): 2, ("cleanup", "cleanup"): 2}
    assert count_ops(res.model, "QuantizeLinear") == count_ops(model, "QuantizeLinear") - 2
    # An identity block straight to the output: the residual Add ends the path (the residual
    # stream is not a head), so conv2 stays quantized; nothing is excluded.
    b = resnet_block("identity")
    graph = import_model(b)
    assert "block.conv2" not in [n.name for n in output_layers(graph)]


def test_exclude_output_layers_tapped_feature_keeps_backbone_quantized():
    """convA feeds a graph output (so it stays float) and the backbone: convB keeps its input pair (C1)."""
    model, rng = prepare(tapped_backbone())
    res = optimize(model, ["exclude-output-layers"], rng)
    assert reads_quantized(res.model, "convB", 0) and reads_quantized(res.model, "convB", 1)
    assert reads_quantized(res.model, "convC", 0)
    assert not reads_quantized(res.model, "convA", 0) and not reads_quantized(res.model, "head", 0)
    # convA and head rewired (activation + weight each); the graph-input pair only fed convA
    # and head's input pair only fed head: both removed (P2); the weight pairs orphaned
    assert by_kind_rule(res.changes) == {("rewire", "P9"): 4, ("remove", "P9"): 4, ("cleanup", "cleanup"): 4}
    assert sorted(c.node for c in res.changes if c.kind == "note") == ["convA", "head"]
    full_check(res.model)
    _idempotent(res.model, ["exclude-output-layers"], rng)
    pred = predict(res.model)
    assert pred.precision_of("convB") == "int8->int8" and pred.precision_of("convA") == "float"
    # convA writes float for the graph output; convB's Quantize is a kernel of its own (C1)
    assert [s.node for s in pred.standalone_layers] == [act_out(res.model, "convA") + "_QuantizeLinear"]


def test_exclude_output_layers_classifier_reading_residual_block_keeps_int8_inputs():
    """P9's second form: fc reads the block output through GAP/Flatten, so it stays INT8 in, float out."""
    from qdqsurgeon.passes.exclude_output_layers import reads_residual_stream

    for kind in ("identity", "downsample"):
        model, rng = prepare(resnet_block(kind, tail="float"))
        assert reads_quantized(model, "fc", 0) and reads_quantized(model, "fc", 1)
        res = optimize(model, ["exclude-output-layers"], rng)
        assert edits(res.changes) == []
        assert [(c.node, c.rule) for c in res.changes] == [("fc", "P9")]
        assert "reads a residual block" in res.changes[0].detail
        assert reads_quantized(res.model, "fc", 0) and reads_quantized(res.model, "fc", 1)
        np.testing.assert_array_equal(run(model, calib_feeds(model))[0], run(res.model, calib_feeds(model))[0])
        _idempotent(res.model, ["exclude-output-layers"], rng)
        # Near miss: a conv tail between the block and the head; fc reads tail_conv, not the block.
        near = import_model(resnet_block(kind, tail="conv"))
        assert [reads_residual_stream(n) for n in output_layers(near)] == [False]


def test_exclude_output_layers_fills_missing_classifier_pair_only_with_ranges():
    """A Q/DQ model whose classifier was left float (ModelOpt): the pair is added when ranges are
    at hand (fix path with --calib), else the layer stays float with a note saying why."""
    float_model = resnet_block("identity", tail="float")
    model, rng = prepare(float_model, exclude=["^fc$"])
    assert not reads_quantized(model, "fc", 0)
    res = optimize(model, ["exclude-output-layers"], None)
    assert edits(res.changes) == [] and "no pair or calibrated range" in notes(res.changes)[0]
    res = optimize(model, ["exclude-output-layers"], rng)
    assert reads_quantized(res.model, "fc", 0) and reads_quantized(res.model, "fc", 1)
    assert by_kind_rule(res.changes) == {("add", "P1"): 2, ("add", "V3"): 2, ("rewire", "F1"): 1}  # act pair, weight pair
    full_check(res.model)
    _idempotent(res.model, ["exclude-output-layers"], rng)
    feeds = calib_feeds(model)
    assert sqnr(run(float_model, feeds)[0], run(res.model, feeds)[0]) > 25
    # --exclude wins over the rule: the user's float classifier stays float.
    res = optimize(model, ["exclude-output-layers"], rng, exclude=["^fc$"])
    assert not reads_quantized(res.model, "fc", 0)


def test_keep_output_layers_flag_keeps_head_quantized():
    model, _ = prepare(resnet_block("downsample"))
    res = optimize(model, ["exclude-output-layers"], keep_output_layers=True)
    assert res.changes == [] and reads_quantized(res.model, "fc", 0) and reads_quantized(res.model, "fc", 1)
    np.testing.assert_array_equal(run(model, calib_feeds(model))[0], run(res.model, calib_feeds(model))[0])


def _output_qdq_model():
    w = (RNG.standard_normal((8, 8, 1, 1)) * 0.3).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["r"], name="relu")]
    nodes += qdq_nodes("r", "y", "s", "z", "out")
    return make_model(nodes, [("x", F, [1, 8, 4, 4])], [("y", F, [1, 8, 4, 4])],
                      [init("w", w), init("s", np.float32(0.02)), init("z", np.int8(0))])


def test_output_qdq_removed_and_output_name_kept():
    model = _output_qdq_model()
    for keep in (False, True):  # P9 on graph outputs holds with --keep-output-layers too
        res = optimize(model, ["exclude-output-layers"], keep_output_layers=keep)
        assert [o.name for o in res.model.graph.output] == ["y"]
        assert [n.op_type for n in res.model.graph.node] == ["Conv", "Relu"]
        assert nodes_by_name(res.model)["relu"].output[0] == "y"
        # Without the flag the pair lies in the float head after the output layer conv; with it,
        # only the graph-output rule fires. Either way the pass removes both nodes itself.
        expected = {("rewire", "P9"): 1, ("remove", "P9"): 2}
        assert by_kind_rule(res.changes) == expected
        full_check(res.model)
        _idempotent(res.model, ["exclude-output-layers"], keep_output_layers=keep)
        feeds = calib_feeds(model)
        # the output is the exact float value the pair approximated
        np.testing.assert_array_equal(run(res.model, feeds)[0], run_tensors(model, ["r"], feeds)["r"])


# --- remove-misplaced-qdq: Pad (P8) -----------------------------------------------------------------


def _pad_model(value: float = 0.0, mode: str = "constant", extra_reader: bool = False):
    w = (RNG.standard_normal((8, 8, 3, 3)) * 0.2).astype(np.float32)
    ws = (np.abs(w).reshape(8, -1).max(axis=1) / 127).astype(np.float32)
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Pad", ["r", "pads", "pad_value"], ["p"], name="pad", mode=mode)]
    nodes += qdq_nodes("p", "pq", "s", "z", "act")
    nodes += qdq_nodes("w", "wq", "ws", "wz", "wt", axis=0)
    nodes.append(helper.make_node("Conv", ["pq", "wq"], ["y"], name="conv"))
    outputs = [("y", F, [1, 8, 6, 6])]
    if extra_reader:
        nodes.append(helper.make_node("Sigmoid", ["pq"], ["side"], name="side"))
        outputs.append(("side", F, [1, 8, 8, 8]))
    inits = [init("pads", np.asarray([0, 0, 1, 1, 0, 0, 1, 1], np.int64)), init("pad_value", np.float32(value)),
             init("s", np.float32(0.02)), init("z", np.int8(0)), init("w", w), init("ws", ws), init("wz", np.zeros(8, np.int8))]
    return make_model(nodes, [("x", F, [1, 8, 6, 6])], outputs, inits)


def test_pad_qdq_moves_above_the_pad_bit_exact():
    model = _pad_model()
    res = optimize(model, ["remove-misplaced-qdq"])
    nodes = nodes_by_name(res.model)
    assert nodes["conv"].input[0] == "p"  # Conv reads the Pad directly: Pad+Conv fuse
    assert reads_quantized(res.model, "pad", 0) and source(res.model, nodes["pad"].input[0]) == "r"
    pair = [n.op_type for n in res.model.graph.node if n.input[0] in ("r", nodes["pad"].input[0])]
    assert pair == ["QuantizeLinear", "Pad"] and count_ops(res.model, "QuantizeLinear") == count_ops(model, "QuantizeLinear")
    assert by_kind_rule(res.changes) == {("add", "P8"): 2, ("rewire", "P8"): 2, ("remove", "P8"): 2}
    assert pair_scale(res.model, nodes["pad"].input[0]) == np.float32(0.02)
    full_check(res.model)
    _idempotent(res.model, ["remove-misplaced-qdq"])
    feeds = calib_feeds(model)
    np.testing.assert_array_equal(run(model, feeds)[0], run(res.model, feeds)[0])  # Q(0) = 0: exact


def test_pad_near_misses_are_untouched():
    cases = {"non-zero pad value": _pad_model(value=0.5), "reflect mode": _pad_model(mode="reflect"),
             "DQ read by another node": _pad_model(extra_reader=True)}
    for why, model in cases.items():
        res = optimize(model, ["remove-misplaced-qdq"])
        assert res.changes == [], why
        assert sorted((n.op_type, list(n.input)) for n in res.model.graph.node) == \
            sorted((n.op_type, list(n.input)) for n in model.graph.node), why
        pad = next(n for n in import_model(model).nodes if n.op == "Pad")
        # the reason: a non-zero or non-constant Pad does not commute with Q (P8); with a second
        # reader the move would change what that reader sees
        assert commutes(pad) is (why == "DQ read by another node"), why
