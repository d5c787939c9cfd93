"""The passes and the static analysis ask trt_rules the same questions (issue 13 item 1).

Three disagreements the review found, each reproduced here on a small graph, then the shared real models
checked for any chain the two walks see differently (the zoo models are checked in tests/test_zoo.py):

1. the fused chain: the analysis walks it forward, the passes backward (``qdq.conv_chain``); only the
   forward walk respected F9 (no BN after ConvTranspose) and took an Erf-form GELU;
2. Q/DQ identity: ``graph.same_qparams`` (passes) and the analysis's merge key disagreed on an fp16 and an
   fp32 scale of the same value (the scale type is the DQ's output type: they are not the same);
3. the activation after a residual Add (ResNet order): quantize-residual and quantize-pooling listed
   ReLU/Clip/LeakyReLU only, the table also has HardSigmoid/HardSwish.

A fourth (item 2): move-qdq compared the scales on a Split's outputs by value while the analysis's Q
movement compared them by identity; both now ask ``qdq.agreed_q_readers``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

import qdqsurgeon
from qdqsurgeon import trt_rules as R
from qdqsurgeon.analysis import predict
from qdqsurgeon.analysis.simulate import _qkey, _Sim
from qdqsurgeon.graph import import_model, same_qparams
from qdqsurgeon.passes.move_qdq import agreed_output_scale
from qdqsurgeon.qdq import conv_chain

from .analysis_helpers import Builder, chain_disagreements
from .helpers import MODELS, need_shared


def _convtranspose_bn_relu() -> onnx.ModelProto:
    b = Builder(seed=5)
    x = b.input("input", [1, 8, 8, 8])
    w = b.weight((8, 4, 2, 2), axis=1)
    up = b.node("ConvTranspose", [b.qdq(x), w], name="up", strides=[2, 2], kernel_shape=[2, 2])
    ones, zeros = np.ones(4, np.float32), np.zeros(4, np.float32)
    bn = b.node("BatchNormalization", [up, b.const(ones), b.const(zeros), b.const(zeros), b.const(ones)], name="bn")
    b.output(b.node("Relu", [bn], name="relu"))
    return b.build()


def test_chain_respects_f9_both_ways():
    model = _convtranspose_bn_relu()
    graph = import_model(model)
    relu = next(n for n in graph.nodes if n.name == "relu")
    assert conv_chain(relu.outputs[0], exclusive=False) is None  # BN does not fuse after ConvTranspose
    fused = next(w["fused"] for w in predict(model).weighted_ops if w["node"] == "up")
    assert list(fused) == ["up"]
    assert chain_disagreements(model) == []


def test_gelu_chain_is_seen_from_both_ends():
    b = Builder(seed=6)
    x = b.input("input", [2, 16])
    h = b.gemm(x, 16, 16, name="fc1")
    d = b.node("Div", [h, b.const(np.asarray(1.4142135, np.float32))], name="div")
    e = b.node("Erf", [d], name="erf")
    a = b.node("Add", [e, b.const(np.asarray(1.0, np.float32))], name="add1")
    m = b.node("Mul", [h, a], name="mul")
    g = b.node("Mul", [m, b.const(np.asarray(0.5, np.float32))], name="mul_half")
    b.output(b.gemm(g, 16, 4, name="fc2"))
    model = b.build()
    graph = import_model(model)
    back = conv_chain(next(n for n in graph.nodes if n.name == "mul_half").outputs[0], exclusive=False)
    assert back is not None and back[0].name == "fc1" and {n.name for n in back[1:]} == {"div", "erf", "add1", "mul", "mul_half"}
    assert chain_disagreements(model) == []


def _q_with_scale(scale: np.ndarray) -> gs.Node:
    x = gs.Variable("x", dtype=scale.dtype, shape=[4])
    return gs.Node("QuantizeLinear", inputs=[x, gs.Constant("s", scale), gs.Constant("z", np.zeros((), np.int8))],
                   outputs=[gs.Variable("y", dtype=np.int8, shape=[4])])


def test_qdq_identity_is_one_question():
    a, b = _q_with_scale(np.asarray(0.5, np.float32)), _q_with_scale(np.asarray(0.5, np.float16))
    c = _q_with_scale(np.asarray(0.5, np.float32))
    assert not same_qparams(a, b) and _qkey(a) != _qkey(b)
    assert same_qparams(a, c) and _qkey(a) == _qkey(c)


def _split_read_by_qs(dtypes: tuple[type, type]) -> tuple[gs.Graph, gs.Node]:
    x = gs.Variable("x", dtype=np.float32, shape=[8])
    r = gs.Variable("r", dtype=np.float32, shape=[8])
    halves = [gs.Variable(f"h{i}", dtype=np.float32, shape=[4]) for i in range(2)]
    split = gs.Node("Split", name="split", inputs=[r], outputs=halves, attrs={"axis": 0, "num_outputs": 2})
    nodes, outs = [gs.Node("Relu", name="relu", inputs=[x], outputs=[r]), split], []
    for i, (h, dt) in enumerate(zip(halves, dtypes)):
        y = gs.Variable(f"y{i}", dtype=np.int8, shape=[4])
        nodes.append(gs.Node("QuantizeLinear", name=f"q{i}", inputs=[h, gs.Constant(f"s{i}", np.asarray(0.5, dt)),
                                                                     gs.Constant(f"z{i}", np.zeros((), np.int8))], outputs=[y]))
        outs.append(gs.Node("DequantizeLinear", name=f"dq{i}", inputs=[y, nodes[-1].inputs[1], nodes[-1].inputs[2]],
                            outputs=[gs.Variable(f"o{i}", dtype=np.float32, shape=[4])]).outputs[0])
        nodes.append(outs[-1].inputs[0])
    graph = gs.Graph(nodes=nodes, inputs=[x], outputs=outs, opset=21)
    return graph, split


@pytest.mark.parametrize("dtypes, agree", [((np.float32, np.float32), True), ((np.float32, np.float16), False)])
def test_carrying_q_back_is_one_question(dtypes, agree):
    graph, split = _split_read_by_qs(dtypes)
    assert (agreed_output_scale(graph, split) is not None) is agree  # move-qdq copies a pair back
    sim = _Sim(graph)
    sim.move()  # the analysis moves TensorRT's Q into the Split
    assert (split.inputs[0].inputs[0].op == "QuantizeLinear") is agree, [n.name for n in graph.nodes]
    assert sim.rw.changes == []  # the simulation's rewriter keeps no change log


@pytest.mark.parametrize("act", ["HardSwish", "HardSigmoid", "Relu"])
def test_activation_after_residual_add_is_one_list(act):
    assert R.is_pointwise_activation(gs.Node(act, inputs=[gs.Variable("x")], outputs=[gs.Variable("y")]))
    # ResNet order with this activation: the skip is quantized (the Add and the activation fuse into the conv)
    b = Builder(seed=7)
    x = b.input("input", [1, 8, 8, 8])
    stem = b.conv(x, 8, act="relu", qx=False, qw=False, name="stem")
    branch = b.conv(stem, 8, qx=False, qw=False, bn=True, name="block")
    add = b.node("Add", [stem, branch], name="add")
    y = b.node(act, [add], name="act")
    # a classifier reading the block through pooling (ResNet's head): INT8 in, float out (P9)
    flat = b.node("Flatten", [b.node("GlobalAveragePool", [y], name="gap")], name="flatten")
    b.output(b.gemm(flat, 8, 4, qx=False, qw=False, name="fc"))
    model = b.build()
    res = qdqsurgeon.optimize(model, ranges=qdqsurgeon.build_ranges(model, calib_random=2, progress=False))
    pred = predict(res.model)
    assert pred.precision_of("block") == "int8->int8", pred.weighted_ops
    assert pred.precision_of("fc") == "int8->float", pred.weighted_ops
    assert pred.standalone_qdq_layers == 1, pred.standalone_qdq


SHARED_MODELS = sorted([*(MODELS / "fp32").glob("*.onnx"), *(MODELS / "qdq").glob("*.onnx")]) if MODELS.exists() else []


@pytest.mark.parametrize("path", SHARED_MODELS, ids=[p.stem for p in SHARED_MODELS])
def test_shared_models_have_no_chain_drift(path: Path):
    need_shared()
    assert chain_disagreements(onnx.load(path)) == []
