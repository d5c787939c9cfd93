"""fold-qdq-pairs and dedupe-qdq on small graphs: positive, near miss with reason, idempotence, numerics (issue 2)."""

from __future__ import annotations

import numpy as np
from onnx import helper

from qdqsurgeon.graph import import_model
from qdqsurgeon.passes.dedupe_qdq import DedupeQdq
from qdqsurgeon.passes.fold_qdq_pairs import FoldQdqPairs

from ..helpers import F, assert_pass_contract, init, kinds, make_model, ops, qdq_nodes


def _chain(s1: float, s2: float, zp2: int = 0, extra_reader: bool = False):
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu_in")]
    nodes += qdq_nodes("r", "d1", "s1", "z", "a")
    nodes += qdq_nodes("d1", "d2", "s2", "z2", "b")
    nodes.append(helper.make_node("Relu", ["d2"], ["y"], name="relu_out"))
    outputs = [("y", F, [2, 8])]
    if extra_reader:
        nodes.append(helper.make_node("Sigmoid", ["d1"], ["y2"], name="side"))
        outputs.append(("y2", F, [2, 8]))
    inits = [init("s1", np.float32(s1)), init("s2", np.float32(s2)), init("z", np.int8(0)), init("z2", np.int8(zp2))]
    return make_model(nodes, [("x", F, [2, 8])], outputs, inits)


def test_fold_collapses_double_pair():
    model = _chain(0.05, 0.05)
    res = assert_pass_contract(model, ["fold-qdq-pairs"])
    assert ops(res.model) == ["Relu", "QuantizeLinear", "DequantizeLinear", "Relu"]
    assert kinds(res.changes) == {"rewire": 1, "remove": 1, "cleanup": 1}
    assert {c.rule for c in res.changes if c.kind == "remove"} == {"C1"}


def test_fold_keeps_dq_with_other_readers():
    model = _chain(0.05, 0.05, extra_reader=True)
    res = assert_pass_contract(model, ["fold-qdq-pairs"])
    assert ops(res.model).count("QuantizeLinear") == 1
    assert ops(res.model).count("DequantizeLinear") == 2  # the Sigmoid still reads the first DQ


def test_fold_near_miss_different_scale():
    model = _chain(0.05, 0.1)
    res = assert_pass_contract(model, ["fold-qdq-pairs"])
    assert kinds(res.changes) == {}
    plan = FoldQdqPairs().plan(import_model(model))
    reasons = [e.result.reason for e in plan if not e.fires]
    assert any("scales differ" in r for r in reasons), reasons


def test_fold_near_miss_different_zero_point():
    model = _chain(0.05, 0.05, zp2=3)
    res = assert_pass_contract(model, ["fold-qdq-pairs"])
    assert kinds(res.changes) == {}
    reasons = [e.result.reason for e in FoldQdqPairs().plan(import_model(model)) if not e.fires]
    assert any("zero points differ" in r for r in reasons), reasons


def _fanout(s_b: float, dq_as_output: bool = False):
    w = np.random.default_rng(0).standard_normal((4, 4, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu")]
    nodes += qdq_nodes("r", "da", "sa", "z", "qa")
    nodes += qdq_nodes("r", "db", "sb", "z", "qb")
    nodes.append(helper.make_node("Conv", ["da", "w"], ["ya"], name="conv_a"))
    nodes.append(helper.make_node("Conv", ["db", "w"], ["yb"], name="conv_b"))
    outputs = [("ya", F, [1, 4, 3, 3]), ("yb", F, [1, 4, 3, 3])]
    if dq_as_output:
        outputs.append(("db", F, [1, 4, 3, 3]))
    inits = [init("sa", np.float32(0.02)), init("sb", np.float32(s_b)), init("z", np.int8(0)), init("w", w)]
    return make_model(nodes, [("x", F, [1, 4, 3, 3])], outputs, inits)


def test_dedupe_merges_identical_pairs():
    res = assert_pass_contract(_fanout(0.02), ["dedupe-qdq"])
    assert ops(res.model).count("QuantizeLinear") == 1 and ops(res.model).count("DequantizeLinear") == 1
    convs = [n for n in res.model.graph.node if n.op_type == "Conv"]
    assert convs[0].input[0] == convs[1].input[0]
    assert kinds(res.changes) == {"rewire": 2, "remove": 2}
    assert {c.rule for c in res.changes if c.kind == "remove"} == {"P6"}


def test_dedupe_keeps_graph_output_name():
    model = _fanout(0.02, dq_as_output=True)
    res = assert_pass_contract(model, ["dedupe-qdq"])
    assert [o.name for o in res.model.graph.output] == ["ya", "yb", "db"]
    assert ops(res.model).count("DequantizeLinear") == 1


def test_dedupe_near_miss_different_scales():
    model = _fanout(0.03)
    res = assert_pass_contract(model, ["dedupe-qdq"])
    assert kinds(res.changes) == {}
    reasons = [e.result.reason for e in DedupeQdq().plan(import_model(model)) if not e.fires]
    assert any("different parameters" in r for r in reasons), reasons


def test_cleanup_pipeline_on_both():
    """Duplicates and round trips together: dedupe then fold reach one pair per tensor."""
    res = assert_pass_contract(_fanout(0.02), ["fold-qdq-pairs", "dedupe-qdq"])
    assert ops(res.model).count("QuantizeLinear") == 1
