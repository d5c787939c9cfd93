"""move-qdq: carry Q/DQ backward across ops that commute with quantization (C1, P5, F2, F11).

Before → after::

    Conv ─ ReLU ─ MaxPool ─ Q(s) ─ DQ(s) ─ Conv        (every reader of the MaxPool quantizes with s)
    Conv ─ ReLU ─ Q(s) ─ DQ(s) ─ MaxPool ─ Q(s) ─ DQ(s) ─ Conv
    ⇒ TensorRT: Conv+ReLU writes INT8, MaxPool runs INT8 (ConvActPool when fused)

A pair is copied onto the data input(s) of a commuting op (MaxPool, Concat, Reshape, Flatten,
Transpose, Squeeze/Unsqueeze, Slice, Split, Gather data, Pad with 0, Identity) only when every
reader of every data output is a Q with the same per-tensor parameters (C1); it is not copied
when a reader is float. Why exact: these ops only select, reorder or take maxima of values, and
rounding is monotone, so ``Q(op(x)) == op(Q(x))`` element for element; the pair that stays after
the op then re-quantizes values already on the grid. Walks the graph from the outputs, so a
chain of commuting ops is crossed in one sweep. DQ→Q pairs that meet are removed by
``fold-qdq-pairs`` and duplicates merged by ``dedupe-qdq`` afterwards.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import is_graph_output, qparams
from ..qdq import agreed_q_readers, ensure_pair, pair_reading
from ..rewriter import Rewriter
from ..trt_rules import commutes, data_input_indices
from .base import Pass, PassContext

__all__ = ["MoveQdq", "agreed_output_scale", "copy_pair_backward"]

logger = logging.getLogger(__name__)


def agreed_output_scale(graph: gs.Graph, node: gs.Node) -> np.ndarray | None:
    """The one per-tensor int8 scale every reader of every data output of ``node`` quantizes with
    (:func:`qdq.agreed_q_readers`, the C1 question the static analysis asks too)."""
    readers = agreed_q_readers(node, is_output=lambda t: is_graph_output(graph, t))
    qp = qparams(readers[0][0]) if readers else None
    if qp is None or qp.per_channel or (qp.zero_point is not None and (qp.zero_point.dtype != np.int8 or qp.zero_point.any())):
        return None
    return qp.scale.reshape(())


def copy_pair_backward(graph: gs.Graph, node: gs.Node, rw: Rewriter, *, rule: str) -> bool:
    """Give each data input of commuting ``node`` the pair its outputs agree on; True if anything changed."""
    scale = agreed_output_scale(graph, node)
    if scale is None:
        return False
    changed = False
    for i in data_input_indices(node):
        t = node.inputs[i]
        if t is None or t.dtype is not None and np.dtype(t.dtype).kind != "f":
            continue
        pair = pair_reading(t)
        if pair is not None:
            continue  # already quantized (align-scales reconciles differing scales)
        ensure_pair(rw, t, [node], scale, detail=f"pair carried back across {node.op} {node.name}", rule=rule)
        changed = True
    return changed


class MoveQdq(Pass):
    """Propagate Q/DQ backward across commuting ops when all readers agree (C1)."""

    name = "move-qdq"
    edits_through_rewriter = True
    summary = "Carry Q/DQ backward across commuting ops (MaxPool, Concat, reshapes, ...) when all readers agree"
    rules = ("C1", "F2", "P5", "F11")

    def run(self, graph: gs.Graph, rw: Rewriter, ctx: PassContext) -> None:
        for node in reversed(list(graph.nodes)):
            if rw.is_removed(node) or not commutes(node) or node.op == "Cast":
                continue
            copy_pair_backward(graph, node, rw, rule="C1")
