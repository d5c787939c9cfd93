"""Convergence by construction (issue 12 item 2): one run reaches the fixpoint, a second changes nothing.

Each case is a pattern a real zoo model showed, cut down to a few nodes: the pass that adds a pair
and the pass that removes it asked different questions, so the pipeline never settled.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import TensorProto, helper

import qdqsurgeon

from ..helpers import init, make_model

F = TensorProto.FLOAT
RNG = np.random.default_rng(3)


def _ranges(names):
    return {n: 3.0 for n in names}


def _settles(model: onnx.ModelProto, caplog) -> qdqsurgeon.api.OptimizeResult:
    with caplog.at_level(logging.WARNING):
        res = qdqsurgeon.optimize(model, ranges=_ranges)
    assert "fixpoint" not in caplog.text
    again = qdqsurgeon.optimize(res.model, ranges=_ranges)
    assert [(c.pass_name, c.rule, c.node) for c in again.changes if c.kind != "note"] == []
    return res


def _w(cout: int, cin: int, k: int = 3):
    return RNG.standard_normal((cout, cin, k, k)).astype(np.float32) * 0.2


def test_hardswish_between_transposes_settles(caplog):
    """MediaPipe's NHWC sandwich: Conv → Transpose → HardSwish → Transpose → Conv. quantize-pooling wrapped the
    HardSwish (not a conv epilogue here), drop_float_only_pairs called it a float reader (an epilogue op type):
    8 iterations of add/remove on selfie_segmentation. Both now ask qdq.wraps_standalone."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Transpose", ["c1"], ["t1"], name="to_nhwc", perm=[0, 2, 3, 1]),
             helper.make_node("HardSwish", ["t1"], ["h"], name="hswish"),
             helper.make_node("Transpose", ["h"], ["t2"], name="to_nchw", perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["t2", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3"], ["y"], name="conv3", pads=[1, 1, 1, 1])]
    model = make_model(nodes, [("x", F, [1, 3, 8, 8])], [("y", F, [1, 4, 8, 8])],
                       [init("w1", _w(8, 3)), init("w2", _w(8, 8)), init("w3", _w(4, 8))])
    _settles(model, caplog)


def test_one_channel_conv_weight_is_written_per_tensor(caplog):
    """A 1-output-channel Conv (segmentation and pitch heads): insert-qdq wrote a 1-element 1-D 'per-channel'
    scale and normalize-qdq rewrote it to 0-D on the next run (basic_pitch, selfie_segmentation)."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="mask", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3"], ["y"], name="conv3", pads=[1, 1, 1, 1])]
    model = make_model(nodes, [("x", F, [1, 3, 8, 8])], [("y", F, [1, 4, 8, 8])],
                       [init("w1", _w(8, 3)), init("w2", _w(1, 8)), init("w3", _w(4, 1))])
    res = _settles(model, caplog)
    inits = {t.name: t for t in res.model.graph.initializer}
    wq = next(n for n in res.model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "w2")
    assert list(inits[wq.input[1]].dims) == [] and not any(a.name == "axis" for a in wq.attribute)


def test_unused_domain_import_dropped_on_ptq(caplog):
    """TFLite conversions import ai.onnx.ml without using it; the fix pipeline dropped it on a second run."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    model = make_model(nodes, [("x", F, [1, 3, 8, 8])], [("y", F, [1, 4, 8, 8])], [init("w1", _w(8, 3)), init("w2", _w(4, 8))])
    model.opset_import.append(helper.make_opsetid("ai.onnx.ml", 2))
    res = _settles(model, caplog)
    assert [o.domain for o in res.model.opset_import] == [""]
    assert res.by_pass()["remove-unused-domains"] == {"opset": 1}
