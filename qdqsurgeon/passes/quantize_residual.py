"""quantize-residual: at a residual Add, Q/DQ on the skip input only (P3, F5, F6, F7).

Before → after::

    Add(qdq(Conv_b(...)), x)       →   Add(Conv_b(...), qdq(x))
    ⇒ TensorRT: Conv_b + BN + Add + ReLU in one kernel [i8, i8 → i8]

The conv-branch operand is the one produced by a fusible chain (Conv/Gemm/MatMul with BN,
bias, ReLU/Clip/LeakyReLU or SiLU = Sigmoid·Mul epilogues, every intermediate read only by the
chain). When both operands are conv chains (a downsample Conv on the skip path), exactly one is
quantized: the one with the shorter path back to the two operands' closest common ancestor,
as ModelOpt does, so the longer branch fuses with the Add. The skip Q/DQ reuses a pair already on
that tensor (P6), else it is calibrated. Numerics: removing the conv-side pair makes that operand
exact float; adding the skip pair rounds it within half a step of its scale.
"""

from __future__ import annotations

import logging
from collections import deque

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import activation_input_index, is_constant, producer, qparams
from ..qdq import conv_chain, conv_chain_head, dequantized_input, ensure_pair, pair_reading, pairs_on, source_of
from ..quant import scale_from_amax
from ..rewriter import Rewriter
from ..trt_rules import residual_add_joins_chain, residual_placement
from .base import Pass, PassContext

__all__ = ["QuantizeResidual", "residual_sides"]

logger = logging.getLogger(__name__)


def _quantized_head(head: gs.Node | None) -> bool:
    """A weighted op TensorRT runs INT8: its activation reads a DQ (F1)."""
    if head is None:
        return False
    return pair_reading(head.inputs[activation_input_index(head)]) is not None


def _ancestor_depths(t: gs.Tensor, limit: int = 400) -> dict[int, int]:
    """Breadth-first distance (in nodes) from ``t`` back to every ancestor tensor."""
    depths = {id(t): 0}
    queue = deque([(t, 0)])
    while queue and len(depths) < limit:
        cur, d = queue.popleft()
        node = producer(cur)
        if node is None:
            continue
        for inp in node.inputs:
            if inp is None or is_constant(inp) or id(inp) in depths:
                continue
            depths[id(inp)] = d + 1
            queue.append((inp, d + 1))
    return depths


def residual_sides(add: gs.Node) -> tuple[int, int, str] | None:
    """(conv-branch input index, skip input index, why) for a residual Add, or None."""
    if add.op != "Add" or len(add.inputs) != 2 or any(is_constant(t) for t in add.inputs):
        return None
    srcs = [source_of(t) for t in add.inputs]
    heads = [conv_chain_head(s) for s in srcs]
    usable = [_quantized_head(h) for h in heads]
    if usable[0] and usable[1]:
        da, db = _ancestor_depths(srcs[0]), _ancestor_depths(srcs[1])
        common = set(da) & set(db)
        if not common:
            return 0, 1, "both operands are conv chains with no common ancestor: input 1 quantized"
        lca = min(common, key=lambda k: (max(da[k], db[k]), da[k] + db[k]))
        if da[lca] >= db[lca]:
            return 0, 1, f"both operands are conv chains: {heads[1].name} has the shorter path ({db[lca]} vs {da[lca]} nodes)"
        return 1, 0, f"both operands are conv chains: {heads[0].name} has the shorter path ({da[lca]} vs {db[lca]} nodes)"
    if usable[0]:
        return 0, 1, f"{heads[0].name} chain fuses with the Add"
    if usable[1]:
        return 1, 0, f"{heads[1].name} chain fuses with the Add"
    return None


def _int8_downstream(graph: gs.Graph, t: gs.Tensor, decided: dict[int, bool], depth: int = 0) -> bool:
    """Whether every reader of ``t`` (past a ReLU/Clip epilogue) takes it in INT8 (C1, F2).

    Readers that count: a Q, a residual Add that reads ``t`` as the skip it quantizes (``decided``
    holds the choices already made, walking from the outputs back), a commuting op
    or a pooling/pointwise op (P7) whose own output is INT8 downstream. A graph output or any
    other reader means TensorRT writes the fused Conv+Add in float, and a skip pair would only
    add a standalone Dequantize (the ``qat-residual`` engine of trt-rules.md section 5).
    """
    from ..graph import is_graph_output, is_q
    from ..trt_rules import commutes, is_pointwise_activation, is_quantizable_wrapped

    if depth > 12 or is_graph_output(graph, t) or not t.outputs:
        return False
    for n in t.outputs:
        if is_q(n):
            continue
        if is_pointwise_activation(n) and depth == 0:
            if _int8_downstream(graph, n.outputs[0], decided, depth + 1):
                continue
            return False
        sides = residual_sides(n) if n.op == "Add" else None
        if sides is not None:
            if decided.get(id(n), False) and source_of(n.inputs[sides[1]]) is t:
                continue
            return False
        if (commutes(n) or is_quantizable_wrapped(n)) and all(_int8_downstream(graph, o, decided, depth + 1) for o in n.outputs):
            continue
        return False
    return True


def _float_bytes(node: gs.Node) -> int:
    """Bytes per element of the float type ``node`` computes in (2 for float16/bfloat16, else 4)."""
    dtype = node.outputs[0].dtype if node.outputs else None
    try:
        return 2 if dtype is not None and np.dtype(dtype).itemsize == 2 else 4
    except TypeError:
        return 4


class QuantizeResidual(Pass):
    """Quantize the skip input of residual Adds and keep the conv-branch input float."""

    name = "quantize-residual"
    edits_through_rewriter = True
    summary = "Residual Add: Q/DQ on the skip input, none between the conv chain and the Add"
    rules = ("P3", "F5", "F6", "F7", "E8.1")

    def run(self, graph: gs.Graph, rw: Rewriter, ctx: PassContext) -> None:
        decided: dict[int, bool] = {}
        # From the outputs back: whether a block's skip pair pays off depends on the next block's choice.
        for add in reversed([n for n in graph.nodes if n.op == "Add"]):
            sides = residual_sides(add)
            if sides is None:
                continue
            conv_i, skip_i, why = sides
            decided[id(add)] = _int8_downstream(graph, add.outputs[0], decided)
            if not decided[id(add)]:
                rw.note(add, "output is read in float (head or graph output): skip left float, no standalone Dequantize", rule="P3")
                continue
            chain = conv_chain(source_of(add.inputs[conv_i]))
            both = chain is not None and not residual_add_joins_chain(chain, ctx.config.trt_version)
            if both:
                # E8.1: an activation before the Add keeps the Add out of the conv kernel whatever the
                # placement; quantizing both inputs lets Conv+activation write INT8 (fewer bytes, same kernels).
                placement, cost = residual_placement(ctx.config.trt_version, float_bytes=_float_bytes(add))
                both = placement == "both"
                if both and not self._quantize_branch(add, conv_i, chain, cost, rw, ctx):
                    both = False
            if not both and pair_reading(add.inputs[conv_i]) is not None:
                dequantized_input(rw, add, conv_i, detail=f"conv-side operand of {add.name} read in float so the chain fuses ({why})",
                                  rule="F7")
            if pair_reading(add.inputs[skip_i]) is not None:
                continue
            skip = add.inputs[skip_i]
            scale = self._skip_scale(skip, ctx)
            if scale is None:
                rw.note(add, f"skip input {skip.name} has no Q/DQ to share and no calibrated range; left float", rule="P3")
                continue
            ensure_pair(rw, skip, [add], scale, detail=f"skip input of residual {add.name} ({why})", rule="P3")

    def _quantize_branch(self, add: gs.Node, conv_i: int, chain: list[gs.Node], cost: str, rw: Rewriter,
                         ctx: PassContext) -> bool:
        """Q/DQ on the activated branch operand of ``add`` (E8.1); False when no scale is known for it."""
        if pair_reading(add.inputs[conv_i]) is not None:
            return True  # the input's own (learned or calibrated) pair stays
        branch = add.inputs[conv_i]
        amax = ctx.amax([branch.name])
        if branch.name not in amax:
            rw.note(add, f"activated branch {branch.name} has no calibrated range; skip-only placement kept ({cost})",
                    rule="E8.1")
            return False
        ensure_pair(rw, branch, [add], scale_from_amax(amax[branch.name]),
                    detail=f"both inputs of residual {add.name} quantized: {chain[-1].op} after {chain[0].name} "
                           f"keeps the Add a PointWise layer of its own ({cost})", rule="E8.1")
        return True

    def _skip_scale(self, skip: gs.Tensor, ctx: PassContext):
        # Share the pair other consumers already read (P6): usually the next block's first conv.
        for q, _ in pairs_on(skip):
            qp = qparams(q)
            if qp is not None and not qp.per_channel:
                return qp.scale
        amax = ctx.amax([skip.name])
        if skip.name in amax:
            return scale_from_amax(amax[skip.name])
        return None
