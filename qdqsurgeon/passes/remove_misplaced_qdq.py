"""remove-misplaced-qdq: Q/DQ where TensorRT cannot use it (P8, V4, P9).

Before → after::

    x ─ Pad(0) ─ Q ─ DQ ─ Conv        →   x ─ Q ─ DQ ─ Pad(0) ─ Conv        (P8: Pad fuses into Conv)
    b ─ Q ─ DQ ─ Conv(bias)           →   b ─ Conv(bias)                      (V4: biases stay float)
    b_int8 ─ DQ ─ Conv(bias)          →   dequantized float b ─ Conv(bias)     (V4)
    ... ─ Q ─ DQ ─ graph output       →   ... ─ graph output                  (P9)

Why exact: zero padding commutes with symmetric quantization (Q(0) = 0 with zero point 0), so
moving the pair above a constant-zero Pad gives bit-identical values. A bias Q/DQ removed gives
the bias back in float (closer to the float model; the dequantized value where only the int
form exists, which is then exact).
"""

from __future__ import annotations

import logging

import onnx_graphsurgeon as gs

from ..graph import const_value, is_dq, is_q, producer, qparams
from ..qdq import pair_reading
from ..quant import dequantize
from ..rewriter import Rewriter
from ..trt_rules import commutes
from .base import Pass, PassContext
from .exclude_output_layers import drop_output_qdq

__all__ = ["RemoveMisplacedQdq"]

logger = logging.getLogger(__name__)


class RemoveMisplacedQdq(Pass):
    """Move Q/DQ from between Pad and Conv to before the Pad; drop bias and graph-output Q/DQ."""

    name = "remove-misplaced-qdq"
    summary = "Q/DQ between Pad and Conv moves above the Pad; Q/DQ on biases and graph outputs removed"
    rules = ("P8", "V4", "P9")

    def run(self, graph: gs.Graph, rw: Rewriter, ctx: PassContext) -> None:
        for node in list(graph.nodes):
            if rw.is_removed(node):
                continue
            if node.op in ("Conv", "ConvTranspose"):
                self._pad_before_conv(node, rw)
            if node.op in ("Conv", "ConvTranspose", "Gemm") and len(node.inputs) > 2:
                self._float_bias(node, rw)
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
        if len(pad.outputs[0].outputs) != 1 or len(dq.outputs[0].outputs) != 1:
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
