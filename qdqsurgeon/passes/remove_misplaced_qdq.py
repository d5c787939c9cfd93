"""remove-misplaced-qdq: Q/DQ where TensorRT cannot use it (P8, V4, P9).

Before → after::

    x ─ Pad(0) ─ Q ─ DQ ─ Conv        →   x ─ Q ─ DQ ─ Pad(0) ─ Conv        (P8: Pad fuses into Conv)
    b ─ Q ─ DQ ─ Conv(bias)           →   b ─ Conv(bias)                      (V4: biases stay float)
    b_int8 ─ DQ ─ Conv(bias)          →   dequantized float b ─ Conv(bias)     (V4)
    ... ─ Q ─ DQ ─ graph output       →   ... ─ graph output                  (P9)
    Conv ─ qdq ─ BN ─ qdq ─ ReLU      →   Conv ─ BN ─ ReLU                      (F3: epilogues fuse)
    Conv ─ qdq ─ Sigmoid, qdq ─ Mul   →   Conv ─ Sigmoid·Mul (SiLU)             (F3, F10)
    x ─ qdq ─ float-only readers      →   x ─ float-only readers                (P2: no standalone pair)

Why exact: zero padding commutes with symmetric quantization (Q(0) = 0 with zero point 0), so
moving the pair above a constant-zero Pad gives bit-identical values. A bias Q/DQ removed gives
the bias back in float (closer to the float model; the dequantized value where only the int
form exists, which is then exact). A pair inside a fusible chain (between a Conv/Gemm and its
BN/bias/activation/SiLU epilogue, as onnxruntime's quantizer writes them) splits the kernel
TensorRT would build; removing it makes that value exact float again, so numerics move towards
the float model.
"""

from __future__ import annotations

import logging

import onnx_graphsurgeon as gs

from ..graph import const_value, is_dq, is_q, producer, qparams
from ..qdq import conv_chain_head, dequantized_input, drop_float_only_pairs, pair_reading, reads_fused_chain, source_of
from ..quant import dequantize
from ..rewriter import Rewriter
from ..trt_rules import BIAS_OPS, commutes, is_epilogue
from .base import Pass, PassContext
from .exclude_output_layers import drop_output_qdq
from .quantize_residual import residual_sides

__all__ = ["RemoveMisplacedQdq"]

logger = logging.getLogger(__name__)


class RemoveMisplacedQdq(Pass):
    """Move Q/DQ from between Pad and Conv to before the Pad; drop bias and graph-output Q/DQ."""

    name = "remove-misplaced-qdq"
    edits_through_rewriter = True
    summary = "Q/DQ between Pad and Conv moves above the Pad; Q/DQ inside conv epilogue chains, on biases and on graph outputs removed"
    rules = ("P8", "F3", "V4", "P9")

    def run(self, graph: gs.Graph, rw: Rewriter, ctx: PassContext) -> None:
        for node in list(graph.nodes):
            if rw.is_removed(node):
                continue
            if node.op in ("Conv", "ConvTranspose"):
                self._pad_before_conv(node, rw)
            if node.op in BIAS_OPS and len(node.inputs) > 2:
                self._float_bias(node, rw)
            if node.op == "Mul":
                self._unsplit_silu(node, rw)
            if is_epilogue(node) and residual_sides(node) is None:
                self._unsplit_chain(node, rw)
        drop_float_only_pairs(graph, rw, rule="P2")
        drop_output_qdq(graph, rw)

    def _pad_before_conv(self, conv: gs.Node, rw: Rewriter) -> None:
        pair = pair_reading(conv.inputs[0])
        if pair is None:
            return
        q, dq = pair
        pad = producer(q.inputs[0])
        if pad is None or pad.op != "Pad" or not commutes(pad):
            return
        qp = qparams(q)
        if qp is None or qp.per_channel or (qp.zero_point is not None and qp.zero_point.any()):
            return
        if len(pad.outputs[0].outputs) != 1 or len(q.outputs[0].outputs) != 1 or len(dq.outputs[0].outputs) != 1:
            return  # the padded tensor (or its DQ) has other readers: moving would change them
        src = pad.inputs[0]
        new_q = rw.add_node("QuantizeLinear", [src, *q.inputs[1:]], name=f"{q.name}_above_pad", attrs=dict(q.attrs),
                            out_dtype=q.outputs[0].dtype, detail=f"Q moved above {pad.name}", rule="P8")
        new_dq = rw.add_node("DequantizeLinear", [new_q.outputs[0], *dq.inputs[1:]], name=f"{dq.name}_above_pad",
                             attrs=dict(dq.attrs), out_dtype=dq.outputs[0].dtype, detail=f"DQ moved above {pad.name}", rule="P8")
        rw.set_input(pad, 0, new_dq.outputs[0], detail="Pad reads the quantized tensor", rule="P8")
        rw.set_input(conv, 0, pad.outputs[0], detail=f"{conv.name} reads the Pad directly so TensorRT fuses Pad+Conv", rule="P8")
        rw.remove_node(dq, rule="P8", detail="replaced by the pair above the Pad")
        rw.remove_node(q, rule="P8", detail="replaced by the pair above the Pad")

    def _unsplit_chain(self, node: gs.Node, rw: Rewriter) -> None:
        for i, t in enumerate(node.inputs):
            if t is None or pair_reading(t) is None or not reads_fused_chain(node, t):
                continue
            dequantized_input(rw, node, i, detail=f"Q/DQ inside the fused chain before {node.op} {node.name} removed", rule="F3")

    def _unsplit_silu(self, mul: gs.Node, rw: Rewriter) -> None:
        """Mul(qdq(x), qdq(Sigmoid(qdq(x)))) is SiLU split by Q/DQ: read x and Sigmoid(x) in float (F10)."""
        if len(mul.inputs) != 2:
            return
        for i in (0, 1):
            sig = producer(source_of(mul.inputs[1 - i]))
            x = source_of(mul.inputs[i])
            if sig is None or sig.op != "Sigmoid" or source_of(sig.inputs[0]) is not x:
                continue
            if pair_reading(mul.inputs[0]) is None and pair_reading(mul.inputs[1]) is None and pair_reading(sig.inputs[0]) is None:
                return
            if conv_chain_head(x, exclusive=False) is None and producer(x) is None:
                return
            with rw.rule("F10"):
                for node, idx in ((mul, 0), (mul, 1), (sig, 0)):
                    if pair_reading(node.inputs[idx]) is not None:
                        dequantized_input(rw, node, idx, detail=f"SiLU {sig.name}·{mul.name} split by Q/DQ: fused again", rule="F10")
            return

    def _float_bias(self, node: gs.Node, rw: Rewriter) -> None:
        bias = node.inputs[2]
        dq = producer(bias)
        if not is_dq(dq):
            return
        q = producer(dq.inputs[0])
        if is_q(q):
            rw.set_input(node, 2, q.inputs[0], detail=f"bias of {node.name} stays float", rule="V4")
            return
        value, qp = const_value(dq.inputs[0]), qparams(dq)
        if value is None or qp is None:
            return
        b = dequantize(value, qp.scale, qp.axis, qp.zero_point)
        rw.set_input(node, 2, rw.constant(f"{node.name}_bias", b), detail=f"{qp.zero_point.dtype if qp.zero_point is not None else 'int'} "
                     f"bias DQ of {node.name} folded into a float bias", rule="V4")
