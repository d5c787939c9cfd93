"""2:4-sparse test models: a float CNN built in code, its QAT-style export, and the zero-mask check."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qdqsurgeon.graph import import_model, weight_input_index
from qdqsurgeon.sparsity import effective_weight, m4n2_mask

from .helpers import REPO, make_model

DIGITS_SPARSE = REPO / "fixtures" / "digits_cnn_sparse24.onnx"
DIGITS_DENSE = REPO / "fixtures" / "digits_cnn_dense.onnx"


def _sparse(rng: np.random.Generator, shape: tuple[int, ...], axis: int) -> np.ndarray:
    w = rng.standard_normal(shape).astype(np.float32) * 0.3
    return (w * m4n2_mask(w, axis)).astype(np.float32)


def sparse_cnn(seed: int = 0) -> onnx.ModelProto:
    """Conv+ReLU, a residual block, MaxPool, Concat, GAP, Gemm (transB 0 and 1) and a MatMul, all 2:4.

    One output channel of ``conv2`` is all zeros (a dead channel: its scale is the minimum one).
    """
    rng = np.random.default_rng(seed)
    w1 = _sparse(rng, (16, 8, 3, 3), 1)
    w2 = _sparse(rng, (16, 16, 3, 3), 1)
    w2[3] = 0.0
    w3 = _sparse(rng, (16, 16, 1, 1), 1)
    fc1 = _sparse(rng, (32, 16), 0)  # Gemm transB=0: [K, N], reduction axis 0
    mm = _sparse(rng, (16, 16), 0)  # MatMul B [K, N]
    fc2 = _sparse(rng, (10, 16), 1)  # Gemm transB=1: [N, K], reduction axis 1
    inits = [numpy_helper.from_array(v, n) for n, v in [
        ("w1", w1), ("b1", rng.standard_normal(16).astype(np.float32) * 0.1), ("w2", w2),
        ("b2", np.zeros(16, np.float32)), ("w3", w3), ("fc1", fc1), ("mm", mm), ("fc2", fc2),
        ("fc2b", np.zeros(10, np.float32))]]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1] * 4),
        helper.make_node("Add", ["c2", "r1"], ["a2"], name="res_add"),
        helper.make_node("Relu", ["a2"], ["r2"], name="relu2"),
        helper.make_node("MaxPool", ["r2"], ["p2"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p2", "w3"], ["c3"], name="conv3"),
        helper.make_node("Concat", ["c3", "p2"], ["cat"], name="concat", axis=1),
        helper.make_node("GlobalAveragePool", ["cat"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc1"], ["h1"], name="fc1"),
        helper.make_node("Relu", ["h1"], ["hr"], name="relu3"),
        helper.make_node("MatMul", ["hr", "mm"], ["h2"], name="matmul"),
        helper.make_node("Relu", ["h2"], ["h2r"], name="relu4"),
        helper.make_node("Gemm", ["h2r", "fc2", "fc2b"], ["y"], name="fc2", transB=1),
    ]
    return make_model(nodes, [("x", TensorProto.FLOAT, [1, 8, 8, 8])], [("y", TensorProto.FLOAT, [1, 10])], inits, opset=17)


def qat_export(float_model: onnx.ModelProto, ranges) -> onnx.ModelProto:
    """A QAT-style export of ``float_model``: Q/DQ inserted by qdqsurgeon (insert-qdq only), then made
    the way other tools write it: scales in Constant nodes, conv1's weight as uint8 with zero point
    128 (onnxruntime's u8 weights), conv3's per-channel weight Q/DQ on the wrong axis (1), and an
    asymmetric uint8 activation pair. normalize-qdq re-quantizes all of these."""
    from qdqsurgeon import optimize

    m = optimize(float_model, ["insert-qdq"], ranges=ranges, analyze=False).model
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    nodes = list(g.node)
    by_out = {o: n for n in nodes for o in n.output}
    for n in nodes:
        if n.op_type != "Conv":
            continue
        dq = by_out[n.input[1]]
        q = by_out[dq.input[0]]
        w = numpy_helper.to_array(inits[q.input[0]])
        if n.name == "conv1":  # weight as a uint8 initializer with zero point 128 -> DQ
            s = np.max(np.abs(w), axis=(1, 2, 3)) / 127.0
            qv = (np.rint(w / s[:, None, None, None]) + 128).astype(np.uint8)
            name = q.input[0] + "_u8"
            g.initializer.extend([numpy_helper.from_array(qv, name), numpy_helper.from_array(s.astype(np.float32), name + "_s"),
                                  numpy_helper.from_array(np.full(16, 128, np.uint8), name + "_zp")])
            dq.input[:] = [name, name + "_s", name + "_zp"]
            g.node.remove(q)
        elif n.name == "conv3":  # per-channel on axis 1 (the wrong one for a Conv weight: V3)
            s = (np.max(np.abs(w), axis=(0, 2, 3)) / 127.0).astype(np.float32)
            s[s == 0] = 1e-8
            sname = q.input[0] + "_s_axis1"
            g.initializer.append(numpy_helper.from_array(s, sname))
            zname = sname + "_zp"
            g.initializer.append(numpy_helper.from_array(np.zeros(s.shape, np.int8), zname))
            for node in (q, dq):
                node.input[1], node.input[2] = sname, zname
                for a in node.attribute:
                    if a.name == "axis":
                        a.i = 1
    # Activation scales of the first pair as a Constant node, and that pair asymmetric uint8.
    first_q = next(n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    scale = numpy_helper.to_array(inits[first_q.input[1]])
    const = helper.make_node("Constant", [], ["x_scale_c"], name="x_scale_const",
                             value=numpy_helper.from_array(np.asarray(scale * 2, np.float32), "v"))
    zp = numpy_helper.from_array(np.asarray(128, np.uint8), "x_zp_u8")
    g.initializer.append(zp)
    first_dq = next(n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] == first_q.output[0])
    for node in (first_q, first_dq):
        node.input[1], node.input[2] = "x_scale_c", "x_zp_u8"
    g.node.insert(0, const)
    del g.value_info[:]  # inferred types of the pairs changed
    onnx.checker.check_model(m, full_check=True)
    return m


def zero_masks(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """node name -> where the weight the op reads is exactly zero."""
    graph = import_model(model)
    out = {}
    for node in graph.nodes:
        if weight_input_index(node) is None:
            continue
        w = effective_weight(node)
        if w is not None:
            out[node.name] = np.asarray(w, dtype=np.float32) == 0.0
    return out


def lost_zeros(before: dict[str, np.ndarray], after_model: onnx.ModelProto) -> dict[str, int]:
    """Per layer, how many weights that were exactly zero are not any more (empty: the pattern survived)."""
    after = zero_masks(after_model)
    lost = {}
    for name, mask in before.items():
        if name not in after:
            lost[name] = -1  # the layer or its constant weight disappeared
            continue
        n = int(np.sum(mask & ~after[name]))
        if n:
            lost[name] = n
    return lost
