"""remove-qdq: strip every Q/DQ to recover a float model for ``--requantize`` (fresh calibration).

Before → after::

    x ─ Q(s,z) ─ DQ(s,z) ─ y                  →   x ─ y
    W_int8 ─ DQ(s_w, axis) ─ Conv             →   W_float ─ Conv        W_float = (W_int8 - z)·s_w
    b_int32 ─ DQ(s_in·s_w) ─ Conv.bias        →   b_float ─ Conv.bias   b_float = (b_int32 - z)·s
    W_float ─ Q(s_w) ─ DQ(s_w) ─ Conv         →   W_float ─ Conv        (the original float weight)

Error: activations lose their quantization step (at most ``s/2`` each inside the calibrated range,
and clipping outside it), which is the point: the result is the float model again. Quantized
constants (int8 weights, int32 biases) cannot be recovered beyond their dequantized values, so a
model made from a float one comes back within half a weight step of it. Activations a tool folded
into a one-sided Q range (ONNX Runtime drops Relu/Clip(0,6) before a uint8 Q with zero point 0)
are re-inserted first (rule V2, as in normalize-qdq), else the float model would lose them. Graph
output names are kept. Q nodes read by something other than a DQ (an int8 graph output) and DQs of graph inputs
are left in place and reported, since removing them would change the model's interface.
This pass serves no TensorRT rule; it prepares a model for the PTQ pipeline (``insert-qdq``).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import DQ_OP, Q_OP, const_value, is_q, producer, qparams
from ..rewriter import Rewriter
from .base import Pass, PassContext
from .normalize_qdq import dequantize_exact, refuse_operator_quantization, reinsert_folded_activation

__all__ = ["RemoveQdq"]

logger = logging.getLogger(__name__)

_RULE = "strip"


class RemoveQdq(Pass):
    """Remove all Q/DQ: pairs bypassed, quantized constants replaced by their float values."""

    name = "remove-qdq"
    edits_through_rewriter = True
    summary = "Strip every Q/DQ (pairs bypassed, quantized weights and biases dequantized) to recover a float model"
    rules = ()

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        # QLinearConv & co. carry the quantization inside the op: nothing to strip.
        refuse_operator_quantization(graph)

    def run(self, graph: gs.Graph, rw: Rewriter, ctx: PassContext) -> None:
        memo: dict[int, bool] = {}
        for q in [n for n in graph.nodes if n.op == Q_OP]:
            # A Relu/ReLU6 folded into a uint8 range must come back, or the float model loses it.
            reinsert_folded_activation(graph, rw, q, memo)
        with rw.rule(_RULE):
            self._constant_dqs(graph, rw)
            self._pairs(graph, rw)
            self._leftovers(graph, rw)

    @staticmethod
    def _constant_dqs(graph: gs.Graph, rw: Rewriter) -> None:
        for dq in [n for n in graph.nodes if n.op == DQ_OP]:
            value = const_value(dq.inputs[0])
            qp = qparams(dq)
            if value is None or qp is None:
                continue
            flt = dequantize_exact(np.asarray(value), qp.scale, qp.zero_point, qp.axis, qp.block_size)
            const = rw.constant(f"{dq.inputs[0].name}_float", flt)
            rw.replace_uses(dq.outputs[0], const, detail=f"read the dequantized constant {const.name}")
            rw.remove_node(dq, detail=f"{np.asarray(value).dtype} constant -> DQ replaced by its float values "
                                      f"({'per-channel' if qp.per_channel else 'per-tensor'} scale)")

    @staticmethod
    def _pairs(graph: gs.Graph, rw: Rewriter) -> None:
        for dq in [n for n in graph.nodes if n.op == DQ_OP and not rw.is_removed(n)]:
            q = producer(dq.inputs[0])
            if not is_q(q) or rw.is_removed(q):
                continue
            src = q.inputs[0]
            rw.replace_uses(dq.outputs[0], src, detail=f"bypass {q.name} -> {dq.name}")
            rw.remove_node(dq, detail=f"dequantize of {src.name}")
        for q in [n for n in graph.nodes if n.op == Q_OP and not rw.is_removed(n)]:
            if not q.outputs[0].outputs and not any(t is q.outputs[0] for t in graph.outputs):
                rw.remove_node(q, detail=f"quantize of {q.inputs[0].name}, no reader left")

    @staticmethod
    def _leftovers(graph: gs.Graph, rw: Rewriter) -> None:
        for node in graph.nodes:
            if node.op in (Q_OP, DQ_OP) and not rw.is_removed(node):
                rw.note(node, f"{node.op} kept: it is part of the model's interface (graph input or output of a "
                              f"quantized type)")
