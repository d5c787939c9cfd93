"""remove-identity: Identity nodes between layers are bypassed before anything is placed.

Before → after::

    Conv ─ Add(bias) ─ Identity ─ Relu     →   Conv ─ Add(bias) ─ Relu

Exact: Identity copies its input. Exporters leave them behind (Paddle's ``p2o`` writes one after
many bias Adds; transformer exports keep Dropout's inference form), and TensorRT's optimizer
removes them, so they must not split a conv chain in the placement passes or in the static
analysis either (F3): on PP-LCNet each such Identity kept a ReLU or HardSigmoid out of its conv
chain and cost a predicted standalone Quantize. An Identity that reads a graph input or a
constant is kept (a weight behind an Identity is folded by insert-qdq); one that writes a graph
output keeps the output's name.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ..rewriter import Rewriter
from .base import Pass, PassContext

__all__ = ["RemoveIdentity"]


class RemoveIdentity(Pass):
    """Bypass Identity nodes whose input is computed by another node."""

    name = "remove-identity"
    edits_through_rewriter = True
    summary = "Identity nodes between layers bypassed (TensorRT removes them; they split fusion chains)"
    rules = ("F3",)

    def run(self, graph: gs.Graph, rw: Rewriter, ctx: PassContext) -> None:
        outputs = {id(t) for t in graph.outputs}
        for node in list(graph.nodes):
            if node.op != "Identity" or node.domain not in (None, "", "ai.onnx") or rw.is_removed(node):
                continue
            if len(node.inputs) != 1 or len(node.outputs) != 1 or not node.inputs[0].inputs:
                continue  # reads a graph input or a constant
            if id(node.inputs[0]) in outputs and id(node.outputs[0]) in outputs:
                continue  # two graph outputs with one value: both names must stay
            rw.bypass(node, detail="Identity is a copy (TensorRT removes it)", rule="F3")
