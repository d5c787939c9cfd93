"""exclude-output-layers: weighted ops that feed the network's outputs stay float (P9).

Before → after::

    qdq(x) ─ Conv_head(W~) ─ Sigmoid ─ output      →   x ─ Conv_head(W) ─ Sigmoid ─ output
    ... ─ DQ ─ output                               →   ... ─ output   (Q/DQ never on a graph output)

An *output layer* is a weighted op from which a graph output is reachable without passing
through another weighted op or a residual Add (so detection heads, DFL and classifier layers
count, but the residual stream of a transformer or ResNet does not). Removing its Q/DQ makes its
output exact float again: numerics move towards the float model. ``--keep-output-layers`` keeps
them quantized.

This is the rule without data. With evaluation data (``optimize --target``, and ``--precision``
re-applying its decision) the pass stands aside (``keep_output_layers``) and the output layers
are candidates like every other group: ``qdqsurgeon.mixed_precision`` keeps one float only when
the measured sensitivity says the target needs it, and then through ``insert-qdq``'s exclusion list.

P9 allows two forms: "unquantized, or with a float output". The pass picks the first unless the
layer reads a residual block's output (through pooling, activations and reshapes, e.g. a ResNet
classifier after GlobalAveragePool): a float read there makes the last block's fused
Conv+Add write float and costs a standalone Quantize or Dequantize (F5; trt-rules.md section 5,
``qat-residual`` 26 layers / 3 standalone vs ``qat-residual-qgap`` 24 / 1). Such a layer keeps INT8
inputs (its existing pairs; ``insert-qdq`` put them there on the PTQ path) and writes float, the
form of NVIDIA's fastest ResNet-18 engine. Q/DQ in the float head after those layers (box decoding, DFL, sigmoids) goes too.
Q/DQ on graph outputs is removed in every case (P9), and so are pairs that,
once the output layers are float, no reader takes in INT8 (they would be standalone kernels).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import (activation_input_index, const_value, is_blocked, is_constant, is_dq, is_float_dtype, is_graph_output, is_q, opset_version,
                     producer, qparams)
from ..io import MIN_PER_CHANNEL_OPSET
from ..qdq import conv_chain_head, dequantized_input, drop_float_only_pairs, pair_reading, unquantize_graph_output
from ..quant import dequantize
from ..rewriter import Rewriter
from ..trt_rules import is_weighted, weight_axis, weight_input_index
from .insert_qdq import InsertQdq, is_excluded
from .base import Pass, PassContext

__all__ = ["ExcludeOutputLayers", "output_layers", "reads_residual_stream", "drop_output_qdq", "restore_float_weight"]

logger = logging.getLogger(__name__)


def _is_residual(node: gs.Node) -> bool:
    """An Add joining a conv chain with another run-time tensor (F5), as opposed to head arithmetic."""
    if node.op != "Add" or len(node.inputs) != 2 or any(is_constant(t) for t in node.inputs):
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




def reads_residual_stream(node: gs.Node) -> bool:
    """Whether ``node``'s activation comes from a residual Add through pooling, activations and data movement.

    Such an output layer keeps INT8 inputs: reading the residual stream in float costs a
    standalone Q/DQ kernel (F5), while INT8 in / float out is the other form P9 allows.
    """
    from ..trt_rules import POOLING_OPS, commutes, is_pointwise_activation, is_residual_add

    aidx = activation_input_index(node)
    t = node.inputs[aidx] if len(node.inputs) > aidx else None
    for _ in range(32):
        p = producer(t) if t is not None else None
        if p is None:
            return False
        if is_residual_add(p):
            return True
        if not (is_dq(p) or is_q(p) or commutes(p) or p.op in POOLING_OPS or is_pointwise_activation(p)):
            return False
        t = p.inputs[0] if p.inputs else None
    return False


def drop_output_qdq(graph: gs.Graph, rw: Rewriter) -> None:
    """Remove DQ(Q(x)) pairs whose output is a graph output; the output keeps its name (P9)."""
    for t in list(graph.outputs):
        pair = pair_reading(t)
        if pair is None:
            continue
        q, dq = pair
        unquantize_graph_output(graph, rw, q, dq, detail="Q/DQ on a graph output only adds a Quantize+Dequantize pair", rule="P9")


#: 4-bit weight types: TensorRT runs them weight-only (the GEMM in float), so an output layer keeps them.
_WEIGHT_ONLY_TYPES = ("int4", "uint4", "float4_e2m1fn")


def restore_float_weight(rw: Rewriter, node: gs.Node, *, rule: str, detail: str) -> bool:
    """Make a weighted op read its weight in float again: Q→DQ bypassed, int8 + DQ dequantized.

    Block-quantized weights (``block_size``, INT4/INT8 weight-only as ModelOpt and onnxruntime
    write them) are left exactly as they are: they are a storage format the user chose (an INT4
    model quadruples in size when dequantized), and TensorRT runs such a GEMM in float with the
    weight dequantized in its prologue, so the layer's output is float either way.
    """
    idx = weight_input_index(node)
    if idx is None:
        return False
    t = node.inputs[idx]
    dq = producer(t)
    if not is_dq(dq):
        return False
    qp = qparams(dq)
    if is_blocked(dq):
        rw.note(node, f"weight {t.name} is block-quantized ({qp.qdtype if qp else '?'}, block_size "
                      f"{dq.attrs.get('block_size')}): kept as it is", rule=rule)
        return False
    if qp is not None and np.dtype(qp.qdtype).name in _WEIGHT_ONLY_TYPES:
        rw.note(node, f"weight {t.name} is {qp.qdtype} (weight-only storage): kept as it is", rule=rule)
        return False
    q = producer(dq.inputs[0])
    if is_q(q):
        rw.set_input(node, idx, q.inputs[0], detail=detail, rule=rule)
        return True
    value = const_value(dq.inputs[0])
    if value is None or qp is None:
        return False
    # The DQ's output type is its scale's: a float16/bfloat16 model's weight stays in its type.
    w = dequantize(value, qp.scale, qp.axis, qp.zero_point)
    w = w.astype(qp.scale.dtype) if is_float_dtype(qp.scale.dtype) else w
    rw.set_input(node, idx, rw.constant(f"{node.name}_weight_float", w), detail=detail, rule=rule)
    return True


def _head_region(excluded: list[gs.Node]) -> list[gs.Tensor]:
    """Tensors computed from the excluded layers' outputs (the detection/classifier head), in order."""
    seen: dict[int, gs.Tensor] = {}
    stack = [t for n in excluded for t in n.outputs]
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen[id(t)] = t
        for reader in t.outputs:
            if not is_weighted(reader):
                stack.extend(reader.outputs)
    return list(seen.values())


def _feeds_backbone(tensor: gs.Tensor, excluded: set[int], memo: dict[int, bool] | None = None) -> bool:
    """Whether a weighted op that is not an excluded output layer reads ``tensor`` through non-weighted ops.

    Such a tensor is backbone, not head, even when it is computed from an output layer: a tapped
    intermediate output makes the stem an output layer while the network goes on from it. Its
    pairs are the other passes' business (residual, pooling, moves); removing them here made
    this pass and those undo each other on every iteration (issue 17 item 8).
    """
    memo = {} if memo is None else memo
    key = id(tensor)
    if key not in memo:
        memo[key] = False  # ONNX graphs are acyclic; this only stops re-walking shared tensors
        memo[key] = any((id(n) not in excluded) if is_weighted(n) else any(_feeds_backbone(o, excluded, memo) for o in n.outputs)
                        for n in tensor.outputs)
    return memo[key]


class ExcludeOutputLayers(Pass):
    """Keep weighted ops feeding graph outputs float, and never leave Q/DQ on a graph output (P9)."""

    name = "exclude-output-layers"
    edits_through_rewriter = True
    summary = "No Q/DQ on weighted ops whose output feeds the network outputs, none on graph outputs"
    rules = ("P9",)

    def run(self, graph: gs.Graph, rw: Rewriter, ctx: PassContext) -> None:
        if not ctx.config.keep_output_layers:
            excluded = output_layers(graph)
            int8_inputs = [n for n in excluded if reads_residual_stream(n) and not is_excluded(n, ctx)]
            for node in excluded:
                if node in int8_inputs:
                    self._int8_inputs(graph, rw, ctx, node)
                    continue
                act = dequantized_input(rw, node, activation_input_index(node), rule="P9",
                                        detail=f"{node.name} feeds a graph output: activation stays float")
                wgt = restore_float_weight(rw, node, rule="P9", detail=f"{node.name} feeds a graph output: weight stays float")
                if act or wgt:
                    rw.note(node, "output layer kept float (use --keep-output-layers to quantize it)", rule="P9")
            # The head stops at the layers that keep INT8 inputs: removing the pair _int8_inputs just
            # gave one (a tapped intermediate output upstream puts it in the head) would undo it on
            # every run, and the pipeline would never settle (issue 17 item 8).
            self._float_head(graph, rw, excluded, keep_int8=int8_inputs)
            # Pairs that fed only the excluded layers (possibly through reshapes) now feed float.
            drop_float_only_pairs(graph, rw, rule="P9")
        drop_output_qdq(graph, rw)

    @staticmethod
    def _int8_inputs(graph: gs.Graph, rw: Rewriter, ctx: PassContext, node: gs.Node) -> None:
        """INT8 in, float out for an output layer reading a residual block (P9 second form, F5).

        Existing (learned) pairs stay. A layer without them (a QAT model that left it float) is
        quantized only when calibration ranges are at hand, like ``insert-qdq`` would.
        """
        widx, aidx = weight_input_index(node), activation_input_index(node)
        if (pair_reading(node.inputs[aidx]) is None and widx is not None and ctx.ranges is not None
                and opset_version(graph) >= MIN_PER_CHANNEL_OPSET):
            ins = InsertQdq()
            ins.quantize_activations(graph, rw, ctx, [(node, aidx)])
            if pair_reading(node.inputs[aidx]) is not None:
                ins.quantize_weights(rw, ctx, [(node, widx, weight_axis(node, convtranspose_axis=ctx.config.convtranspose_axis))])
        if pair_reading(node.inputs[aidx]) is not None:
            rw.note(node, "output layer reads a residual block: INT8 inputs, float output "
                          "(a float read would cost a standalone Q/DQ, F5)", rule="P9")
        else:
            rw.note(node, "output layer reads a residual block: INT8 inputs wanted but no pair or calibrated range "
                          "(float kept)", rule="P9")

    @staticmethod
    def _float_head(graph: gs.Graph, rw: Rewriter, excluded: list[gs.Node], keep_int8: list[gs.Node] = ()) -> None:
        """Post-processing after the float output layers (box decoding, DFL, sigmoid) stays float too.

        ``keep_int8``: output layers that read INT8 (P9 second form); pairs feeding them stay.
        """
        head = {id(n) for n in excluded} - {id(n) for n in keep_int8}
        memo: dict[int, bool] = {}
        for t in _head_region(excluded):
            for q in [n for n in t.outputs if is_q(n)]:
                for dq in [n for n in q.outputs[0].outputs if is_dq(n)]:
                    if _feeds_backbone(dq.outputs[0], head, memo):
                        continue
                    rw.replace_uses(dq.outputs[0], t, detail=f"{t.name} is computed by the float head", rule="P9")
                    rw.remove_node(dq, detail="Q/DQ inside the float head (after the output layers)", rule="P9")
                if not q.outputs[0].outputs:
                    rw.remove_node(q, detail="Q/DQ inside the float head (after the output layers)", rule="P9")
