"""fold-qdq-pairs: remove DQ→Q round trips that cannot change a value.

Before → after::

    x_q ─ DQ(s, z) ─ Q(s, z) ─ y_q        →   x_q ─ y_q          (the DQ stays if others read it)
    x ─ Q(s,z) ─ DQ(s,z) ─ Q(s,z) ─ DQ(s,z) ─ y   →   x ─ Q(s,z) ─ DQ(s,z) ─ y

Why it is exact: DQ yields ``(q - z)·s`` and Q maps it back to ``round((q - z)·s / s) + z = q``;
with identical scale, zero point (value and type) and axis the round trip is the identity on
every representable integer, so outputs are bit-identical. Serves trt-rules C1/F2: a DQ→Q pair
with identical parameters is a no-op TensorRT would otherwise have to fuse away. Works for
per-tensor and per-channel (equal axis) parameters, any opset with QuantizeLinear.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import Q_OP, is_dq, producer, qparams
from ..qdq import cancels
from ..patterns.base import Match, NoMatch, Pattern, PatternPass
from ..rewriter import Rewriter
from .base import PassContext

__all__ = ["FoldDqQ", "FoldQdqPairs"]


def _describe_mismatch(a: gs.Node, b: gs.Node) -> str:
    pa, pb = qparams(a), qparams(b)
    if pa is None or pb is None:
        return "scale is not a constant"
    if pa.scale.shape != pb.scale.shape or not np.array_equal(pa.scale, pb.scale):
        return f"scales differ ({a.name}: {pa.scale.ravel()[:3]}, {b.name}: {pb.scale.ravel()[:3]})"
    if pa.qdtype != pb.qdtype:
        return f"zero-point types differ ({pa.qdtype} vs {pb.qdtype})"
    if pa.per_channel and pa.axis != pb.axis:
        return f"axes differ ({pa.axis} vs {pb.axis})"
    return "zero points differ"


class FoldDqQ(Pattern):
    """DQ→Q with identical scale, zero point and axis: the Q's readers take the DQ's input."""

    name = "fold-dq-q"
    summary = "Remove DequantizeLinear→QuantizeLinear round trips with identical parameters"
    root_ops = (Q_OP,)
    benefit = 2
    rule = "C1"

    def match(self, node: gs.Node, ctx: PassContext) -> Match | NoMatch:
        src = producer(node.inputs[0])
        if not is_dq(src):
            return NoMatch(f"{node.name}: input is not produced by a DequantizeLinear")
        if node.attrs.get("saturate", 1) != 1:
            return NoMatch(f"{node.name}: non-default saturate attribute")
        if not cancels(src, node):
            return NoMatch(f"{src.name} -> {node.name}: {_describe_mismatch(src, node)}")
        return Match(node, {"dq": src})

    def rewrite(self, match: Match, rw: Rewriter) -> None:
        q, dq = match.node, match["dq"]
        rw.replace_uses(q.outputs[0], dq.inputs[0], detail=f"{dq.name}->{q.name} is an identity round trip")
        rw.remove_node(q, detail=f"DequantizeLinear {dq.name} -> QuantizeLinear {q.name} with identical parameters")


class FoldQdqPairs(PatternPass):
    """Collapse Q→DQ→Q→DQ chains with equal parameters to one pair; drop identity DQ→Q pairs."""

    name = "fold-qdq-pairs"
    edits_through_rewriter = True
    summary = "Collapse Q→DQ→Q→DQ with equal scale/zero point to one pair; remove DQ→Q with equal parameters"
    rules = ("C1", "F2")

    def __init__(self) -> None:
        super().__init__([FoldDqQ()], name=self.name, summary=self.summary)
