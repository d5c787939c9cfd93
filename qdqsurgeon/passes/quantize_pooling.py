"""quantize-pooling: non-weighted quantizable ops are fully wrapped or left float, never half (P7).

Before → after (output read quantized by an INT8 layer)::

    Conv ─ GAP ─ qdq ─ Gemm(W~)          →   Conv ─ qdq ─ GAP ─ qdq ─ Gemm(W~)
    ⇒ Conv [i8→i8], GAP [i8→i8], Gemm reads INT8 directly

Before → after (output read in float)::

    qdq(x) ─ AveragePool ─ float consumer  →   x ─ AveragePool ─ float consumer

Applies to AveragePool/GlobalAveragePool, ReduceMean, Resize, and Add/Mul/Sub/Sigmoid/... that
are not a conv epilogue (residual Adds belong to quantize-residual, SiLU to the conv chain).
When the output is quantized by every reader, each unquantized data input gets a pair from its
calibrated range (a nearest Resize reuses the output scale: it only copies values). When the
output stays float, the op reads its inputs in float. Error bound: a new input pair rounds
within half a step of its scale; unwrapping makes the op exact float.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import qparams
from ..qdq import conv_chain_head, dequantized_input, ensure_pair, pair_reading, pairs_on, wraps_standalone
from ..quant import scale_from_amax
from ..rewriter import Rewriter
from ..trt_rules import commutes, data_input_indices, is_pointwise_activation
from .base import Pass, PassContext
from .move_qdq import agreed_output_scale
from .quantize_residual import residual_sides

__all__ = ["QuantizePooling"]

logger = logging.getLogger(__name__)


def _int8_source(t: gs.Tensor, depth: int = 0) -> bool:
    """Whether TensorRT can produce ``t`` in INT8: a conv chain, or wrappable/commuting ops over such."""
    node = t.inputs[0] if t.inputs else None
    if node is None or depth > 8:
        return False
    if conv_chain_head(t, exclusive=False) is not None:
        return True
    if node.op == "Add" and residual_sides(node) is not None:
        return True  # Conv + residual Add fuse into one kernel (F5)
    if is_pointwise_activation(node) and node.inputs and _int8_source(node.inputs[0], depth + 1):
        return True  # the activation after a fused residual Add
    if commutes(node) or wraps_standalone(node):
        data = [node.inputs[i] for i in data_input_indices(node) if node.inputs[i] is not None]
        return bool(data) and all(pair_reading(d) is not None or _int8_source(d, depth + 1) for d in data)
    return False


def _mode(node: gs.Node) -> str:
    mode = node.attrs.get("mode", "nearest")
    return mode.decode() if isinstance(mode, bytes) else str(mode)


class QuantizePooling(Pass):
    """Fully wrap (DQ on every input, Q on the output) or fully unwrap non-weighted quantizable ops."""

    name = "quantize-pooling"
    edits_through_rewriter = True
    summary = "Pooling/Resize/standalone pointwise ops: fully wrapped in Q/DQ when their readers are INT8, else float"
    rules = ("P7",)

    def run(self, graph: gs.Graph, rw: Rewriter, ctx: PassContext) -> None:
        noted: set[int] = set()
        # Wrapping an op quantizes its inputs, which can make its producer's output quantized too (a
        # chain of pools): repeat until nothing more wraps, one calibration request per round.
        for _ in range(16):
            to_wrap = self._decide(graph, rw)
            if not to_wrap:
                return
            amax = ctx.amax(list(dict.fromkeys(t.name for _, missing, _ in to_wrap for t in missing)))
            if not any([self._wrap(node, missing, out_scale, amax, rw, noted) for node, missing, out_scale in to_wrap]):
                return

    def _decide(self, graph: gs.Graph, rw: Rewriter) -> list[tuple[gs.Node, list[gs.Tensor], np.ndarray]]:
        """Unwrap half-quantized ops read in float; return the ops to wrap with their unquantized inputs."""
        to_wrap: list[tuple[gs.Node, list[gs.Tensor], np.ndarray]] = []
        for node in reversed(list(graph.nodes)):
            if rw.is_removed(node) or not wraps_standalone(node) or residual_sides(node) is not None:
                # Epilogues (ReLU/Clip/BN/HardSwish, a GEMM's bias Add, SiLU) fuse into their chain or
                # read float (F3, F10); residual Adds belong to quantize-residual (P3).
                continue
            data = [i for i in data_input_indices(node) if node.inputs[i] is not None]
            if not data:
                continue
            quantized = [pair_reading(node.inputs[i]) is not None for i in data]
            out_scale = agreed_output_scale(graph, node)
            if out_scale is not None and all(quantized):
                continue
            if out_scale is None:
                for i, q in zip(data, quantized):
                    if q:
                        dequantized_input(rw, node, i, detail=f"{node.op} {node.name} output is read in float: no half-quantized op",
                                          rule="P7")
                continue
            missing = [node.inputs[i] for i, q in zip(data, quantized) if not q]
            if not all(_int8_source(t) for t in missing):
                # Wrapping would only move the Quantize kernel upstream of a float producer (a graph
                # input, LayerNorm, Erf, ...): no INT8 gained, one more rounding. Leave it.
                continue
            to_wrap.append((node, missing, out_scale))
        return to_wrap

    def _wrap(self, node: gs.Node, missing: list[gs.Tensor], out_scale: np.ndarray, amax: dict[str, float],
              rw: Rewriter, noted: set[int]) -> bool:
        """Pairs on ``missing`` inputs of ``node``; True if any was added."""
        added = False
        for t in missing:
            shared = [qparams(q) for q, _ in pairs_on(t)]
            shared = [qp for qp in shared if qp is not None and not qp.per_channel]
            if shared:  # another reader already quantizes it: share that pair (P6)
                scale, how = shared[0].scale, "shares the pair already on the input"
            elif t.name in amax:
                scale, how = scale_from_amax(amax[t.name]), "calibrated range"
            elif node.op == "Resize" and _mode(node) == "nearest":
                scale, how = out_scale, "nearest Resize copies values: output scale"
            else:
                if id(node) not in noted:
                    noted.add(id(node))
                    rw.note(node, f"input {t.name} has no calibrated range; {node.op} left half-quantized", rule="P7")
                continue
            ensure_pair(rw, t, [node], scale, detail=f"{node.op} {node.name} fully wrapped ({how})", rule="P7")
            added = True
        return added
