"""dedupe-qdq: merge identical Q (and DQ) nodes reading the same tensor into one shared pair.

Before → after::

    x ─┬─ Q(s,z) ─ DQ(s,z) ─ Conv_a          x ─ Q(s,z) ─ DQ(s,z) ─┬─ Conv_a
       └─ Q(s,z) ─ DQ(s,z) ─ Conv_b    →                          └─ Conv_b

Why it is exact: identical nodes on the same input compute identical outputs, so readers of the
duplicate may read the kept node instead; outputs are bit-identical. Serves trt-rules P6: one
Q/DQ per tensor shared by every quantized consumer, so TensorRT can fold the Q into the
producer instead of running one Quantize kernel per consumer. The node kept is the first in
graph order, which makes the pass deterministic and idempotent.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ..graph import DQ_OP, Q_OP
from ..qdq import duplicates
from ..patterns.base import Match, NoMatch, Pattern, PatternPass
from ..rewriter import Rewriter
from .base import PassContext

__all__ = ["MergeDuplicateQdq", "DedupeQdq"]


class MergeDuplicateQdq(Pattern):
    """A Q or DQ with an identical earlier sibling on the same input is replaced by that sibling."""

    name = "merge-duplicate-qdq"
    summary = "Merge identical Q/DQ nodes on the same tensor"
    root_ops = (Q_OP, DQ_OP)
    rule = "P6"

    def match(self, node: gs.Node, ctx: PassContext) -> Match | NoMatch:
        src = node.inputs[0]
        siblings = [n for n in src.outputs if n is not node and n.op == node.op]
        if not siblings:
            return NoMatch(f"{node.name}: no other {node.op} reads {src.name}")
        order = {id(n): i for i, n in enumerate(src.outputs)}
        earlier = [n for n in siblings if order[id(n)] < order[id(node)]]
        for sib in earlier:
            if duplicates(sib, node):
                return Match(node, {"keep": sib})
        if not earlier:
            return NoMatch(f"{node.name}: first {node.op} on {src.name}, kept")
        return NoMatch(f"{node.name}: other {node.op} nodes on {src.name} have different parameters")

    def rewrite(self, match: Match, rw: Rewriter) -> None:
        node, keep = match.node, match["keep"]
        rw.replace_uses(node.outputs[0], keep.outputs[0], detail=f"share {keep.name}")
        rw.remove_node(node, detail=f"duplicate of {keep.name} on {keep.inputs[0].name}")


class DedupeQdq(PatternPass):
    """Merge identical Q/DQ nodes on the same tensor into one shared pair (P6)."""

    name = "dedupe-qdq"
    edits_through_rewriter = True
    summary = "Merge identical Q/DQ nodes on the same tensor into one shared pair"
    rules = ("P6",)

    def __init__(self) -> None:
        super().__init__([MergeDuplicateQdq()], name=self.name, summary=self.summary)
