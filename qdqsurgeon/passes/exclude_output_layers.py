"""exclude-output-layers: weighted ops that feed the network's outputs stay float (P9).

Before → after::

    qdq(x) ─ Conv_head(W~) ─ Sigmoid ─ output      →   x ─ Conv_head(W) ─ Sigmoid ─ output
    ... ─ DQ ─ output                               →   ... ─ output   (Q/DQ never on a graph output)

An *output layer* is a weighted op from which a graph output is reachable without passing
through another weighted op or a residual Add (so detection heads, DFL and classifier layers
count, but the residual stream of a transformer or ResNet does not). Removing its Q/DQ makes its
output exact float again: numerics move towards the float model. ``--keep-output-layers`` keeps
them quantized. Q/DQ on graph outputs is removed in every case (P9).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import const_value, is_dq, is_graph_output, is_q, producer, qparams
from ..qdq import conv_chain_head, dequantized_input, pair_reading
from ..quant import dequantize
from ..rewriter import Rewriter
from ..trt_rules import is_weighted, weight_input_index
from .base import Pass, PassContext

__all__ = ["ExcludeOutputLayers", "output_layers", "drop_output_qdq", "restore_float_weight"]

logger = logging.getLogger(__name__)


def _is_residual(node: gs.Node) -> bool:
    """An Add joining a conv chain with another run-time tensor (F5), as opposed to head arithmetic."""
    if node.op != "Add" or len(node.inputs) != 2 or any(const_value(t) is not None for t in node.inputs):
        return False
    return any(conv_chain_head(t, exclusive=False) is not None for t in node.inputs)


def output_layers(graph: gs.Graph) -> list[gs.Node]:
    """Weighted ops with a path to a graph output through neither weighted ops nor residual Adds."""
    outputs = {id(t) for t in graph.outputs}
    memo: dict[int, bool] = {}

    def reaches(t: gs.Tensor, depth: int = 0) -> bool:
        key = id(t)
        if key in memo:
            return memo[key]
        memo[key] = False  # cycles cannot happen in ONNX, but guard deep recursion
        hit = key in outputs
        if not hit and depth < 400:
            for n in t.outputs:
                if is_weighted(n) or _is_residual(n):
                    continue
                if any(reaches(o, depth + 1) for o in n.outputs):
                    hit = True
                    break
        memo[key] = hit
        return hit

    return [n for n in graph.nodes if is_weighted(n) and any(reaches(o) for o in n.outputs)]


def drop_output_qdq(graph: gs.Graph, rw: Rewriter) -> None:
    """Remove DQ(Q(x)) pairs whose output is a graph output; the output keeps its name (P9)."""
    for t in list(graph.outputs):
        pair = pair_reading(t)
        if pair is None:
            continue
        q, dq = pair
        rw.replace_uses(dq.outputs[0], q.inputs[0], detail=f"graph output {t.name} no longer quantized", rule="P9")
        if not any(not rw.is_removed(n) for n in dq.outputs[0].outputs):
            rw.remove_node(dq, detail="Q/DQ on a graph output only adds a Quantize+Dequantize pair", rule="P9")


def restore_float_weight(rw: Rewriter, node: gs.Node, *, rule: str, detail: str) -> bool:
    """Make a weighted op read its weight in float again: Q→DQ bypassed, int8 + DQ dequantized."""
    idx = weight_input_index(node)
    if idx is None:
        return False
    t = node.inputs[idx]
    dq = producer(t)
    if not is_dq(dq):
        return False
    q = producer(dq.inputs[0])
    if is_q(q):
        rw.set_input(node, idx, q.inputs[0], detail=detail, rule=rule)
        return True
    value = const_value(dq.inputs[0])
    qp = qparams(dq)
    if value is None or qp is None:
        return False
    w = dequantize(value, qp.scale, qp.axis, qp.zero_point)
    rw.set_input(node, idx, rw.constant(f"{node.name}_weight_float", w), detail=detail, rule=rule)
    return True


class ExcludeOutputLayers(Pass):
    """Keep weighted ops feeding graph outputs float, and never leave Q/DQ on a graph output (P9)."""

    name = "exclude-output-layers"
    summary = "No Q/DQ on weighted ops whose output feeds the network outputs, none on graph outputs"
    rules = ("P9",)

    def run(self, graph: gs.Graph, rw: Rewriter, ctx: PassContext) -> None:
        if not ctx.config.keep_output_layers:
            for node in output_layers(graph):
                widx = weight_input_index(node)
                aidx = 1 - widx if node.op == "MatMul" and widx is not None else 0
                act = dequantized_input(rw, node, aidx, detail=f"{node.name} feeds a graph output: activation stays float", rule="P9")
                wgt = restore_float_weight(rw, node, rule="P9", detail=f"{node.name} feeds a graph output: weight stays float")
                if act or wgt:
                    rw.note(node, "output layer kept float (use --keep-output-layers to quantize it)", rule="P9")
        drop_output_qdq(graph, rw)
