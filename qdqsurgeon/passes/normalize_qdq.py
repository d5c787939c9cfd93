"""normalize-qdq: make the Q/DQ another tool wrote importable by TensorRT, keeping its learned scales.

Each sub-rule is logged under its own rule ID. Before → after, and why it is exact or how far off:

* **V4 operator-oriented models are refused** (``requires``): ``QLinearConv``, ``ConvInteger``,
  ``DynamicQuantizeLinear``... have no Q/DQ to repair; re-export in QDQ format.
* **V4 bias DQ**: ``int32 b → DQ(s_in·s_w) → Conv.bias``  →  ``float b' → Conv.bias`` with
  ``b' = (b - zp)·s`` computed in float32 exactly as DequantizeLinear does: bit-exact.
* **V4 integer tensors**: ``int x → Q → DQ → y``  →  ``int x → Cast(float) → y``. Exact when the
  scale is 1 and no clipping occurred; a quantizer has no business there in the first place.
* **P9 graph outputs**: ``x → Q(s,z) → DQ → output``  →  ``x → output`` (same output name). The
  output loses the quantization step: it moves by at most ``s/2`` inside the old range
  ``[(qmin-z)·s, (qmax-z)·s]`` and is no longer clipped outside it.
* **V1 constant scales**: scales and zero points held in ``Constant`` nodes or behind
  Identity/Cast become initializers; a one-element 1-D per-tensor scale becomes 0-D. Exact.
* **V3/V2 weights** (``int8 W → DQ`` or ``float W → Q → DQ`` read by a weighted op, and any DQ
  of a constant): int8 with zero point 0 on the right axis stays as it is (or turns into
  ``float W → Q → DQ`` with the same scale when ``config.weights_fix == "float"``: exact, since
  ``round(q·s/s) = q``). uint8 / asymmetric weights and per-channel scales on an axis other than
  the output-channel axis of ``trt_rules.weight_axis`` (e.g. per-K scales on a MatMul/Gemm weight
  written by PPQ) are re-quantized symmetric int8 from the dequantized values: each weight moves
  by at most ``s_new/2`` (reported per weight in units of ``s_new``). A correct per-channel axis
  that was only implied gets ``axis`` written (exact).
* **V2 activations**: each Q together with every DQ reading it is converted as one unit, so pairs
  stay consistent. ``Q(s, zp, uint8)`` (or int8 with ``zp != 0``) becomes ``Q(s', 0, int8)`` with
  ``s' = max(|(qmin-zp)·s|, |(qmax-zp)·s|) / 127``, the symmetric range covering the old one.
  Against the float input the new error is at most ``s'/2`` inside the old range; against the old
  output the change is reported per tensor (computed exactly over the old grid, in units of the
  old scale; at most ``(s + s')/2``). Outside the old range the narrower side is no longer
  clipped. One-sided ranges (``zp = qmin``, ONNX Runtime after a ReLU) keep ``[0, 255·s]`` with
  ``s' ≈ 2s``: half the resolution, no new clipping (the alternative, ``s' = s`` clipping at
  ``127·s``, trades range for resolution and needs calibration data to judge, so it is not taken).
* **V2 folded activations**: ONNX Runtime removes a Relu/Clip(0,6) before a Q whose range is
  ``[0, x]``; the uint8 Q did the clipping. Once symmetric, negative values would pass, so a Relu
  (Clip(0, 6) when the old range ends at 6) is re-inserted before the Q wherever the input may be
  negative, and the fold is reported as a note. Outputs then stay within the bound above.
* **V3 opset**: per-channel Q/DQ below opset 13 raises the opset to 13 when no op present changed
  meaning on the way, else :class:`ModelError` asks for ``--opset 13``. Imported operator domains
  no node uses are dropped.
"""

from __future__ import annotations

import logging
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..config import Config
from ..errors import ModelError
from ..graph import (DQ_OP, Q_OP, WEIGHTED_OPS, QParams, const_value, is_constant, is_dq, is_float_dtype, is_graph_output, is_q,
                     opset_version, producer, qparams, weight_input_index)
from ..inspection import OPERATOR_QUANT_OPS, blocked_problem, layout_problem, scale_counts, unsupported_qtype
from ..quant import MIN_SCALE, QMAX, expand_blocks, weight_scales
from ..qdq import unquantize_graph_output
from ..rewriter import Rewriter
from ..trt_rules import BIAS_OPS, commutes, weight_axis
from .base import Pass, PassContext

__all__ = [
    "NormalizeQdq",
    "OPERATOR_QUANT_MESSAGE",
    "symmetric_scale",
    "added_error",
    "dequantize_exact",
    "refuse_operator_quantization",
    "reinsert_folded_activation",
]

logger = logging.getLogger(__name__)

MIN_PER_CHANNEL_OPSET = 13

OPERATOR_QUANT_MESSAGE = ("operator-oriented quantization ({ops}) is not importable by TensorRT: re-export in QDQ format, "
                          "e.g. onnxruntime quantize_static(quant_format=QuantFormat.QDQ)")

# The first opset at which an op's meaning changed (inputs moved from attributes, axis semantics...),
# up to 13. Raising the opset across such a version would need onnx.version_converter.
_CHANGED_BY_13 = {"Clip": 11, "Pad": 11, "Resize": 11, "Scatter": 11, "Upsample": 10, "Slice": 10, "TopK": 10,
                  "Dropout": 12, "Squeeze": 13, "Unsqueeze": 13, "Split": 13, "ReduceSum": 13, "Softmax": 13,
                  "LogSoftmax": 13, "Hardmax": 13}

_QRANGE = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127)}

# Ops whose output is never negative / ops that keep non-negativity of their data inputs.
_NONNEG_OPS = ("Relu", "Sigmoid", "Softmax", "Abs", "Exp", "HardSigmoid", "Softplus", "Sqrt")
_NONNEG_KEEPING = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Reshape", "Flatten", "Squeeze",
                   "Unsqueeze", "Transpose", "Slice", "Split", "Gather", "Expand", "Tile", "Concat", "Resize",
                   "Identity", "Pad", "Mul", "Add", "Div", "Min", "ReduceMean", "ReduceMax", "ReduceMin", "Dropout")


# -- arithmetic -----------------------------------------------------------------------------------
def dequantize_exact(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int | None,
                     block_size: int = 0) -> np.ndarray:
    """``(q - zp)·s`` in float32, the way onnxruntime's DequantizeLinear computes it (int32, int4, blocked included)."""
    q = np.asarray(q)
    scale = np.asarray(scale)
    zp = np.zeros((), np.int64) if zero_point is None else np.asarray(zero_point).astype(np.int64)
    if block_size and axis is not None:
        ax = axis % q.ndim
        scale = expand_blocks(scale, ax, block_size, q.shape[ax])
        zp = expand_blocks(zp, ax, block_size, q.shape[ax]) if zp.ndim else zp
    elif scale.size > 1 and axis is not None:
        shape = [1] * q.ndim
        shape[axis % q.ndim] = scale.size
        scale, zp = scale.reshape(shape), (zp.reshape(shape) if zp.size > 1 else zp)
    if not np.issubdtype(q.dtype, np.integer) and q.dtype.name not in ("int4", "uint4"):
        # float8: the code is the value; (q - zp) is computed in float.
        out = (q.astype(np.float32) - zp.astype(np.float32)) * scale.astype(np.float32)
    else:
        out = (q.astype(np.int64) - zp).astype(np.float32) * scale.astype(np.float32)
    # DequantizeLinear's output type is its scale's type (an FP16 or BF16 scale gives that tensor type).
    return out.astype(scale.dtype if is_float_dtype(scale.dtype) else np.float32)


def symmetric_scale(scale: float, zero_point: int, qdtype: np.dtype) -> np.float32:
    """``s' = max(|(qmin-zp)·s|, |(qmax-zp)·s|) / 127``: the symmetric int8 scale covering the old range (V2)."""
    qmin, qmax = _QRANGE[np.dtype(qdtype)]
    amax = max(abs((qmin - zero_point) * float(scale)), abs((qmax - zero_point) * float(scale)))
    return np.float32(max(amax / QMAX, MIN_SCALE))


def added_error(scale: float, zero_point: int, qdtype: np.dtype, s_new: float) -> float:
    """Largest ``|Q'DQ'(x) - QDQ(x)|`` over the old range, in units of the old scale.

    Both fake-quantizers are step functions, so the supremum is reached at (or next to) one of
    their step boundaries: every boundary inside the old range is evaluated exactly and one ulp
    either side, with ONNX rounding (half to even), so the figure is exact, not an estimate.
    """
    qmin, qmax = _QRANGE[np.dtype(qdtype)]
    s, s2 = float(scale), float(s_new)
    lo, hi = (qmin - zero_point) * s, (qmax - zero_point) * s
    old_edges = (np.arange(qmin, qmax + 2, dtype=np.float64) - zero_point - 0.5) * s
    new_edges = (np.arange(-128, 129, dtype=np.float64) - 0.5) * s2
    edges = np.concatenate([old_edges, new_edges, [lo, hi]])
    x = np.concatenate([edges, np.nextafter(edges, -np.inf), np.nextafter(edges, np.inf)])
    x = x[(x >= lo) & (x <= hi)]
    old = (np.clip(np.rint(x / s) + zero_point, qmin, qmax) - zero_point) * s
    new = np.clip(np.rint(x / s2), -128, 127) * s2
    return float(np.max(np.abs(new - old))) / s if x.size else 0.0


# -- graph queries --------------------------------------------------------------------------------
def refuse_operator_quantization(graph: gs.Graph) -> None:
    """Raise :class:`ModelError` for operator-oriented or dynamic quantization ops (V4)."""
    found = sorted({n.op for n in graph.nodes if n.op in OPERATOR_QUANT_OPS})
    if found:
        raise ModelError(OPERATOR_QUANT_MESSAGE.format(ops=", ".join(found)))


def _int_dtype(tensor: gs.Tensor | None) -> bool:
    dtype = getattr(tensor, "dtype", None)
    if dtype is None:
        return False
    try:
        return np.dtype(dtype).kind in "iub"
    except TypeError:
        return False


def _has_zp_input(node: gs.Node) -> bool:
    return len(node.inputs) > 2 and node.inputs[2] is not None and bool(node.inputs[2].name)


def _clip_min(node: gs.Node) -> float | None:
    if "min" in node.attrs:
        return float(node.attrs["min"])
    if len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].name:
        v = const_value(node.inputs[1])
        return None if v is None else float(np.min(v))
    return None


def _dead_channels_only(node: gs.Node, qp: QParams) -> bool:
    """Whether every zero scale of ``node`` belongs to a weight channel whose values are all zero (a
    pruned channel calibrated to amax 0): any scale represents it exactly, so the repair is exact."""
    value = const_value(node.inputs[0])
    src = node.inputs[0].inputs[0] if value is None and node.inputs[0].inputs else None
    if value is None and is_q(src):  # the DQ of a Q on float weights: the Q's weights
        value = const_value(src.inputs[0])
    if value is None:
        return False
    value = np.asarray(value)
    # float weights are dead where they are 0; stored integers where they equal the zero point
    zp = np.zeros((), value.dtype) if value.dtype.kind == "f" or qp.zero_point is None else qp.zero_point
    scale = np.asarray(qp.scale)
    if scale.size == 1:
        return bool(np.all(value == zp.reshape(-1)[0])) if zp.size == 1 else False
    if qp.blocked or qp.axis is None:
        return False
    axis = qp.axis % value.ndim
    moved = np.moveaxis(value, axis, 0).reshape(value.shape[axis], -1)
    zps = np.broadcast_to(np.asarray(zp).reshape(-1), (value.shape[axis],)) if np.asarray(zp).size in (1, value.shape[axis]) else None
    if zps is None:
        return False
    return all(np.all(moved[c] == zps[c]) for c in np.flatnonzero(scale.reshape(-1) == 0))


def _nonnegative(tensor: gs.Tensor, memo: dict[int, bool], depth: int = 0) -> bool:
    """Whether ``tensor`` can never be negative, judged from the ops (and DQ ranges) that produce it."""
    key = id(tensor)
    if key in memo:
        return memo[key]
    memo[key] = False  # cycles and deep chains count as "may be negative"
    result = False
    value = const_value(tensor)
    node = producer(tensor)
    if value is not None:
        result = bool(np.all(np.asarray(value) >= 0))
    elif node is None or depth > 48:
        result = False
    elif node.op in _NONNEG_OPS:
        result = True
    elif node.op == "Clip":
        lo = _clip_min(node)
        result = lo is not None and lo >= 0
    elif is_dq(node):
        qp = qparams(node)
        if qp is not None:
            qmin = _QRANGE.get(np.dtype(qp.qdtype), (-1, 0))[0]
            zp = np.zeros(1) if qp.zero_point is None else qp.zero_point.astype(np.int64)
            result = bool(np.all(qmin - zp >= 0))
    elif node.op in _NONNEG_KEEPING:
        if node.op == "Pad" and not commutes(node):
            result = False
        else:
            idx = (0,) if node.op in ("Gather", "Resize", "Reshape", "Expand", "Tile", "Slice", "Pad", "Squeeze",
                                      "Unsqueeze") else range(len(node.inputs))
            ins = [node.inputs[i] for i in idx if i < len(node.inputs) and node.inputs[i] is not None and node.inputs[i].name]
            result = bool(ins) and all(_nonnegative(t, memo, depth + 1) for t in ins)
    memo[key] = result
    return result


def _weight_readers(dq: gs.Node) -> list[gs.Node]:
    """Weighted ops reading ``dq``'s output as their weight operand (F1)."""
    out = []
    for cons in dq.outputs[0].outputs:
        if cons.op in WEIGHTED_OPS:
            idx = weight_input_index(cons)
            if idx is not None and cons.inputs[idx] is dq.outputs[0]:
                out.append(cons)
    return out


def _bshape(values: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    """``values`` shaped to broadcast along ``axis`` of an ``ndim``-D tensor (per-tensor: unchanged)."""
    values = np.asarray(values)
    if values.size <= 1 or axis is None:
        return values.reshape(())
    shape = [1] * ndim
    shape[axis % ndim] = values.size
    return values.reshape(shape)


def _fake_quant(value: np.ndarray, qp: QParams) -> np.ndarray:
    """What Q→DQ with ``qp`` makes of a float constant (ONNX rounding: half to even, then saturate)."""
    qmin, qmax = _QRANGE[np.dtype(qp.qdtype)]
    zp = np.zeros(()) if qp.zero_point is None else _bshape(qp.zero_point, value.ndim, qp.axis).astype(np.float32)
    q = np.clip(np.rint(value / _bshape(qp.scale, value.ndim, qp.axis).astype(np.float32)) + zp, qmin, qmax)
    return dequantize_exact(q.astype(np.int64), qp.scale, qp.zero_point, qp.axis)


def _uint4_convertible(node: gs.Node, qp: QParams) -> bool:
    """A DQ of a constant uint4 tensor whose zero points are all 8: exactly an int4 tensor with zero point 0."""
    return (is_dq(node) and np.dtype(qp.qdtype).name == "uint4" and qp.zero_point is not None
            and bool(np.all(qp.zero_point.astype(np.int16) == 8)) and is_constant(node.inputs[0]))


def _fmt(x: float) -> str:
    return f"{float(x):.6g}"


# Ops after which onnxruntime's quantizer removes a Relu/Clip into the next Q's one-sided range.
_FOLDS_ACTIVATION = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "Add"})


def _requant_needed(qp: QParams, qdtype: np.dtype, ndim: int, target: int | None) -> tuple[bool, bool]:
    """(not symmetric int8, per-channel on another axis than ``target``): why a weight is re-quantized (V2, V3)."""
    asym = np.dtype(qdtype) != np.int8 or (qp.zero_point is not None and bool(np.any(qp.zero_point != 0)))
    cur_axis = None if qp.axis is None else qp.axis % ndim
    return asym, bool(qp.per_channel and cur_axis != target)


def reinsert_folded_activation(graph: gs.Graph, rw: Rewriter, q: gs.Node, memo: dict[int, bool]) -> bool:
    """Put back the Relu / Clip(0, 6) a tool folded into ``q``'s one-sided range (V2); True if it did.

    A Q with range ``[0, hi]`` (zero point at the type's minimum) clips negative values itself, which
    is how ONNX Runtime can drop a Relu before it. When the Q's input may be negative and is computed
    in the graph, the clipping is made explicit so that the model keeps its meaning once the Q is
    symmetric (or gone). Clip(0, 6) is used when ``hi`` is within 2 % of 6 (ReLU6), else Relu.
    """
    qp = qparams(q)
    if qp is None or qp.per_channel or np.dtype(qp.qdtype) not in _QRANGE:
        return False
    qmin, qmax = _QRANGE[np.dtype(qp.qdtype)]
    zp = 0 if qp.zero_point is None else int(qp.zero_point.ravel()[0])
    if zp != qmin:
        return False
    src = q.inputs[0]
    if is_constant(src) or _nonnegative(src, memo):
        return False
    hi = (qmax - zp) * float(qp.scale.ravel()[0])
    prod = producer(src)
    if prod is None:
        rw.note(q, f"one-sided range [0, {_fmt(hi)}] on graph input {src.name}: negative inputs were clipped by the Q "
                   f"and will no longer be (inputs assumed inside the calibrated range)", rule="V2")
        return False
    if prod.op not in _FOLDS_ACTIVATION:
        # e.g. SiLU's Mul or a pooling: a one-sided range there is the calibrated minimum rounding to
        # the zero point (|min| < half a step), not a removed activation.
        return False
    relu6 = abs(hi - 6.0) <= 0.02 * 6.0
    act = "Clip(0, 6)" if relu6 else "Relu"
    with rw.rule("V2"):
        rw.note(q, f"{prod.op} -> {q.name} with range [0, {_fmt(hi)}] and no activation between: the tool folded "
                   f"{'ReLU6' if relu6 else 'a ReLU'} into the {qp.qdtype} range; re-inserting {act} so that negative "
                   f"values stay clipped")
        if relu6 and int(graph.opset or 13) >= 11:
            lo_c, hi_c = rw.constant(f"{src.name}_clip_min", np.float32(0)), rw.constant(f"{src.name}_clip_max", np.float32(6))
            node = rw.add_node("Clip", [src, lo_c, hi_c], name=f"{q.name}_Clip", out_dtype=src.dtype, out_shape=src.shape,
                               detail=f"re-insert the ReLU6 folded into {q.name}'s range")
        elif relu6:  # before opset 11 Clip keeps its bounds in attributes
            node = rw.add_node("Clip", [src], name=f"{q.name}_Clip", attrs={"min": 0.0, "max": 6.0}, out_dtype=src.dtype,
                               out_shape=src.shape, detail=f"re-insert the ReLU6 folded into {q.name}'s range")
        else:
            node = rw.add_node("Relu", [src], name=f"{q.name}_Relu", out_dtype=src.dtype, out_shape=src.shape,
                               detail=f"re-insert the ReLU folded into {q.name}'s range")
        rw.set_input(q, 0, node.outputs[0], detail=f"{q.name} reads the re-inserted {act}")
    return True


# -- the pass -------------------------------------------------------------------------------------
class NormalizeQdq(Pass):
    """Repair Q/DQ written by other tools into the form TensorRT imports (V1–V4, P9), keeping their scales."""

    name = "normalize-qdq"
    edits_through_rewriter = True
    summary = ("Make existing Q/DQ importable by TensorRT: constant scales, symmetric int8, output-channel weight axes, "
               "float biases, no Q/DQ on outputs or integer tensors")
    rules = ("V1", "V2", "V3", "V4", "P9")

    def opset_needed(self, model: onnx.ModelProto, config: Config) -> tuple[int, str]:
        """Opset 13 when the model carries per-channel Q/DQ below it (V3): the converter upgrades it exactly."""
        if int(opset_version(model)) >= MIN_PER_CHANNEL_OPSET:
            return 0, ""
        for n in model.graph.node:
            if n.op_type in (Q_OP, DQ_OP) and any(a.name == "axis" for a in n.attribute):
                return MIN_PER_CHANNEL_OPSET, f"{self.name}: per-channel Q/DQ ({n.name}, V3)"
        inits = {t.name: t for t in model.graph.initializer}
        for n in model.graph.node:
            if n.op_type in (Q_OP, DQ_OP) and len(n.input) > 1 and n.input[1] in inits and len(inits[n.input[1]].dims) > 0 \
                    and int(np.prod(inits[n.input[1]].dims)) > 1:
                return MIN_PER_CHANNEL_OPSET, f"{self.name}: per-channel Q/DQ ({n.name}, V3)"
        return 0, ""

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        refuse_operator_quantization(graph)
        for node in graph.nodes:
            if node.op not in (Q_OP, DQ_OP):
                continue
            qp = qparams(node)
            if qp is None:
                continue
            # A one-element zero point beside a per-axis/blocked scale is repaired in run() (exact).
            zp_one = qp.zero_point is not None and qp.zero_point.size == 1
            layout = layout_problem(node, zero_point=not zp_one, qp=qp)
            if layout is not None:
                raise ModelError(f"{node.op} {node.name}: {layout}; re-export the model")
            bad_type = unsupported_qtype(qp)
            if bad_type is not None and np.dtype(qp.qdtype).name == "uint4" and not _uint4_convertible(node, qp):
                raise ModelError(f"{node.op} {node.name}: uint4 with zero points other than 8 (or on an activation) is "
                                 f"asymmetric, and TensorRT takes symmetric int4 weights only; use --requantize --calib DATA "
                                 f"to re-quantize it as INT8")
            if bad_type is not None and not _uint4_convertible(node, qp):
                # Narrowing INT16 to INT8 would silently cost 256x resolution (an A16W8 model's very
                # point), so it is not done behind the user's back: strip and recalibrate instead.
                raise ModelError(f"{node.op} {node.name}: {bad_type}; use --requantize --calib DATA to re-quantize "
                                 f"it as INT8")
            finite, negative, zero = scale_counts(qp.scale)
            if not finite or negative:
                # A negative scale flips signs and a NaN poisons everything: no faithful repair exists (V1).
                raise ModelError(f"{node.op} {node.name} has a negative, NaN or infinite scale; "
                                 f"re-export or re-quantize the model (--requantize --calib DATA)")
            if zero and not ctx.config.repair_zero_scales and not _dead_channels_only(node, qp):
                # Q divides by its scale: a zero one is a broken quantizer TensorRT refuses (V1). Only an
                # all-zero weight channel has an exact repair, made without asking (see _zero_scales).
                raise ModelError(f"{node.op} {node.name} has a zero scale (TensorRT refuses it, V1); "
                                 f"--repair-zero-scales gives it 1e-8 (the tensor dequantizes to about 0, as now), "
                                 f"or re-quantize the model (--requantize --calib DATA)")

    def run(self, graph: gs.Graph, rw: Rewriter, ctx: PassContext) -> None:
        self._drop_noop_casts(graph, rw)
        self._fold_bias_dq(graph, rw)
        self._remove_integer_qdq(graph, rw)
        self._remove_output_qdq(graph, rw)
        self._constant_qparams(graph, rw)
        self._zero_point_shapes(graph, rw)
        self._uint4_weights(graph, rw)
        self._zero_scales(graph, rw)
        self._constant_dqs(graph, rw, ctx)
        self._float_weight_qs(graph, rw, ctx)
        self._activations(graph, rw)
        self._opset(graph, rw)

    @staticmethod
    def _live(graph: gs.Graph, rw: Rewriter, op: str) -> list[gs.Node]:
        return [n for n in graph.nodes if n.op == op and not rw.is_removed(n)]

    # C1: no-op casts -----------------------------------------------------------------------------
    def _drop_noop_casts(self, graph: gs.Graph, rw: Rewriter) -> None:
        """float→same-float Casts (PyTorch quantizer exports) hide a tensor's Q/DQ from its other readers.

        ``x ─ Cast(to=float) ─ y`` with x already float is the identity, so readers of y read x
        (exact); TensorRT drops such casts too, so the placement passes must see through them.
        """
        for node in self._live(graph, rw, "Cast"):
            src = node.inputs[0]
            if src.dtype is None or not src.outputs:
                continue
            if onnx.helper.np_dtype_to_tensor_dtype(np.dtype(src.dtype)) != int(node.attrs.get("to", 0)):
                continue
            if np.dtype(src.dtype).kind != "f":
                continue  # integer/bool casts belong to shape logic no Q/DQ reads: not ours to touch
            if not (src.inputs or any(t is src for t in graph.inputs)):
                continue  # a Cast of a constant is folded elsewhere
            rw.bypass(node, detail=f"Cast to the type {np.dtype(src.dtype)} it already has", rule="C1")

    # V4: int32 bias DQ ---------------------------------------------------------------------------
    def _fold_bias_dq(self, graph: gs.Graph, rw: Rewriter) -> None:
        for dq in self._live(graph, rw, DQ_OP):
            value = const_value(dq.inputs[0])
            if value is None:
                continue
            is_bias = any(c.op in BIAS_OPS and len(c.inputs) > 2 and c.inputs[2] is dq.outputs[0]
                          for c in dq.outputs[0].outputs)
            if np.asarray(value).dtype != np.int32 and not is_bias:
                continue
            qp = qparams(dq)
            if qp is None:
                continue
            flt = dequantize_exact(value, qp.scale, qp.zero_point, qp.axis, qp.block_size)
            const = rw.constant(f"{dq.inputs[0].name}_float", flt)
            s = qp.scale.ravel()
            rw.replace_uses(dq.outputs[0], const, rule="V4",
                            detail=f"{dq.name}: read the float bias {const.name} instead of its {value.dtype} DQ")
            rw.remove_node(dq, rule="V4", detail=(
                f"{value.dtype} bias DQ (scale = s_in*s_w, {s.size} value(s), first {_fmt(s[0])}) folded into a float "
                f"initializer: exact, the values are those the DQ computed"))

    # V4: Q/DQ on integer tensors -----------------------------------------------------------------
    def _remove_integer_qdq(self, graph: gs.Graph, rw: Rewriter) -> None:
        for q in self._live(graph, rw, Q_OP):
            src = q.inputs[0]
            if not _int_dtype(src) or is_constant(src):
                continue
            readers = list(q.outputs[0].outputs)
            if not readers or not all(is_dq(r) for r in readers) or is_graph_output(graph, q.outputs[0]):
                rw.note(q, f"quantizes integer tensor {src.name} but is read by non-DQ nodes; left alone", rule="V4")
                continue
            for dq in readers:
                cast = rw.add_node("Cast", [src], name=f"{src.name}_Cast", attrs={"to": onnx.TensorProto.FLOAT},
                                   out_dtype=np.float32, out_shape=src.shape, rule="V4",
                                   detail=f"{src.name} is an integer tensor: cast to float instead of Q/DQ")
                rw.replace_uses(dq.outputs[0], cast.outputs[0], rule="V4")
                rw.remove_node(dq, rule="V4", detail=f"DQ of the integer tensor {src.name} (never quantize int/shape tensors)")
            rw.remove_node(q, rule="V4", detail=f"Q of the integer tensor {src.name} (never quantize int/shape tensors)")

    # P9: Q/DQ on graph outputs -------------------------------------------------------------------
    def _remove_output_qdq(self, graph: gs.Graph, rw: Rewriter) -> None:
        for _ in range(len(graph.outputs) * 4):
            found = False
            for out in list(graph.outputs):
                dq = producer(out)
                if not is_dq(dq) or rw.is_removed(dq):
                    continue
                q = producer(dq.inputs[0])
                if not is_q(q):
                    if not is_constant(dq.inputs[0]):
                        rw.note(dq, f"graph output {out.name} is a DQ of a non-Q tensor; left alone", rule="P9")
                    continue
                qp = qparams(q)
                bound = ""
                if qp is not None and qp.scale.size == 1 and qp.qdtype in _QRANGE:
                    zp = 0 if qp.zero_point is None else int(qp.zero_point.ravel()[0])
                    qmin, qmax = _QRANGE[qp.qdtype]
                    s = float(qp.scale.ravel()[0])
                    bound = (f"; the output now differs by at most s/2 = {_fmt(s / 2)} inside the old range "
                             f"[{_fmt((qmin - zp) * s)}, {_fmt((qmax - zp) * s)}] and is no longer clipped outside it")
                unquantize_graph_output(graph, rw, q, dq, rule="P9",
                                        detail=f"Q/DQ on graph output {out.name} only adds a Quantize+Dequantize pair{bound}")
                found = True
            if not found:
                return

    # V1: scales and zero points as initializers -------------------------------------------------
    def _constant_qparams(self, graph: gs.Graph, rw: Rewriter) -> None:
        for node in [n for n in graph.nodes if n.op in (Q_OP, DQ_OP) and not rw.is_removed(n)]:
            qp = qparams(node)
            if qp is None:
                rw.note(node, "scale is computed at run time; TensorRT needs a constant scale (left alone)", rule="V1")
                continue
            per_tensor = qp.scale.size == 1
            for idx, what in ((1, "scale"), (2, "zero point")):
                if idx >= len(node.inputs) or node.inputs[idx] is None or not node.inputs[idx].name:
                    continue
                tensor = node.inputs[idx]
                value = const_value(tensor)
                if value is None:
                    continue
                value = np.asarray(value)
                reshape = per_tensor and value.ndim > 0
                if isinstance(tensor, gs.Constant) and not reshape:
                    continue
                how = "held in a Constant/Identity/Cast chain" if not isinstance(tensor, gs.Constant) else "1-element 1-D"
                rw.set_constant(node, idx, value.reshape(()) if reshape else value, base=f"{node.name}_{what.replace(' ', '_')}",
                                rule="V1", detail=f"{what} {how} -> {'0-D ' if reshape else ''}initializer (exact)")

    # V3: zero point layout ----------------------------------------------------------------------
    def _zero_point_shapes(self, graph: gs.Graph, rw: Rewriter) -> None:
        """A one-element zero point beside a per-axis or blocked scale gets the scale's shape.

        ONNX and TensorRT both want the two of the same shape; onnxruntime broadcasts the single
        value, so repeating it is exact.
        """
        for node in [n for n in graph.nodes if n.op in (Q_OP, DQ_OP) and not rw.is_removed(n)]:
            qp = qparams(node)
            if qp is None or qp.zero_point is None or qp.zero_point.shape == qp.scale.shape or qp.scale.size == 1:
                continue
            zp = np.broadcast_to(qp.zero_point.reshape(()), qp.scale.shape).copy()
            rw.set_constant(node, 2, zp, base=f"{node.name}_zero_point", rule="V3",
                            detail=f"zero point of shape {list(qp.zero_point.shape)} repeated to the scale's "
                                   f"{list(qp.scale.shape)} (exact)")

    # V2/V4: uint4 weights with the midpoint zero point ------------------------------------------
    def _uint4_weights(self, graph: gs.Graph, rw: Rewriter) -> None:
        """``uint4 q, zp = 8 → DQ``  →  ``int4 (q - 8), zp = 0 → DQ``: the same values, in the type TensorRT takes.

        Exact: ``(q - 8)·s`` is what the DQ computed, and ``q - 8`` spans [-8, 7], int4's range.
        Other uint4 zero points are asymmetric and refused in :meth:`requires`.
        """
        import ml_dtypes

        for dq in [n for n in graph.nodes if n.op == DQ_OP and not rw.is_removed(n)]:
            qp = qparams(dq)
            if qp is None or not _uint4_convertible(dq, qp):
                continue
            value = np.asarray(const_value(dq.inputs[0])).astype(np.int16)
            with rw.rule("V2"):
                rw.set_constant(dq, 0, (value - 8).astype(ml_dtypes.int4), base=f"{dq.inputs[0].name}_s4",
                                detail="uint4 weight with zero point 8 -> int4 with zero point 0 (same values, exact)")
                rw.set_constant(dq, 2, np.zeros(qp.scale.shape, ml_dtypes.int4), base=f"{dq.name}_zero_point",
                                detail="zero point -> int4 0")

    # V1: zero scales -----------------------------------------------------------------------------
    def _zero_scales(self, graph: gs.Graph, rw: Rewriter) -> None:
        """A zero scale fails TensorRT's parse: give it MIN_SCALE. Reached only for dead weight
        channels (all-zero weights, a pruned channel's calibration: exact, they stay 0) and, with
        ``--repair-zero-scales``, for any zero scale (``requires`` refuses the others).

        Bound: a zero scale dequantizes every value to 0; with MIN_SCALE a value dequantizes to at
        most 128·MIN_SCALE (1.3e-6) away from 0, so the outputs move by no more than that.
        """
        for node in [n for n in graph.nodes if n.op in (Q_OP, DQ_OP) and not rw.is_removed(n)]:
            qp = qparams(node)
            if qp is None or not scale_counts(qp.scale)[2]:
                continue
            fixed = np.where(qp.scale == 0, np.asarray(MIN_SCALE, qp.scale.dtype), qp.scale).astype(qp.scale.dtype)
            rw.set_constant(node, 1, fixed, base=f"{node.name}_scale", rule="V1",
                            detail=f"{int(np.sum(qp.scale == 0))} zero scale value(s) -> {MIN_SCALE:g}")

    # V2/V3: DQ of a constant (int8/uint8 weights, quantized constants) ----------------------------
    def _constant_dqs(self, graph: gs.Graph, rw: Rewriter, ctx: PassContext) -> None:
        for dq in self._live(graph, rw, DQ_OP):
            value = const_value(dq.inputs[0])
            qp = qparams(dq)
            if value is None or qp is None:
                continue
            if qp.blocked:
                # Blocked weights (INT8/INT4 weight-only, opset 21) are kept exactly as written: a
                # storage format the user chose, and one TensorRT takes on 2-D GEMM weights.
                why = blocked_problem(dq)
                if why:
                    rw.note(dq, f"{why}; left as it is (re-export it per-channel to run it in TensorRT)", rule="V3")
                continue
            if np.asarray(value).dtype not in _QRANGE:
                continue
            value = np.asarray(value)
            wreaders = _weight_readers(dq)
            target = self._target_axis(rw, dq, wreaders, qp, value.ndim, ctx)
            if target is False:
                continue
            zp = qp.zero_point
            asym, wrong_axis = _requant_needed(qp, value.dtype, value.ndim, target)
            if asym or wrong_axis:
                deq = dequantize_exact(value, qp.scale, zp, qp.axis)
                why = []
                if asym:
                    why.append(f"{value.dtype} zero point {'0' if zp is None or not np.any(zp) else 'non-zero'} (V2)")
                if wrong_axis:
                    why.append(f"per-channel axis {qp.axis} is not the output-channel axis {target} of "
                               f"{', '.join(sorted({r.op for r in wreaders})) or 'the reader'} (V3)")
                self._requantize_constant(rw, dq, deq, target, "; ".join(why), float_form=bool(wreaders) and ctx.config.weights_fix == "float")
                continue
            if qp.per_channel and not qp.axis_written:
                axis = qp.axis % value.ndim
                rw.set_attr(dq, "axis", int(axis), rule="V3",
                            detail=f"per-channel scale without explicit axis: write axis={axis} (ONNX's default; TensorRT would assume 0). Exact")
            if wreaders and ctx.config.weights_fix == "float":
                self._to_float_form(rw, dq, value, qp)

    @staticmethod
    def _target_axis(rw: Rewriter, dq: gs.Node, wreaders: list[gs.Node], qp: QParams, ndim: int,
                     ctx: PassContext) -> int | None | bool:
        """The axis a constant's scale should be on (None: per-tensor), or False to leave it alone."""
        if not wreaders:
            # Not a weight (e.g. an anchor table): keep its own layout, per-channel or not.
            return None if qp.axis is None else qp.axis % ndim
        axes = {weight_axis(r, convtranspose_axis=ctx.config.convtranspose_axis) for r in wreaders}
        if len(axes) > 1 and qp.per_channel:
            rw.note(dq, f"weight read by ops wanting different per-channel axes {sorted(map(str, axes))}; left alone", rule="V3")
            return False
        axis = axes.pop()
        if not qp.per_channel:
            return None  # per-tensor is always legal (V3); no reason to re-quantize
        return None if axis is None else axis % ndim

    def _requantize_constant(self, rw: Rewriter, dq: gs.Node, deq: np.ndarray, axis: int | None, why: str,
                             float_form: bool) -> None:
        scale = weight_scales(deq, axis)
        shape = [1] * deq.ndim
        if axis is not None:
            shape[axis] = scale.size
        q = np.clip(np.rint(deq / scale.reshape(shape) if axis is not None else deq / scale), -128, 127).astype(np.int8)
        err = np.abs(dequantize_exact(q, scale, None, axis) - deq) / (scale.reshape(shape) if axis is not None else scale)
        detail = (f"{why}: re-quantized symmetric int8 from the dequantized values, "
                  f"{'per-channel axis ' + str(axis) if axis is not None else 'per-tensor'}; "
                  f"max change {float(np.max(err)) if err.size else 0.0:.3f} new-scale units (bound 0.5)")
        zp = np.zeros(scale.shape, np.int8)
        with rw.rule("V3" if "(V3)" in why else "V2"):
            if float_form:
                wf = rw.constant(f"{dq.inputs[0].name}_float", deq)
                sc, zc = rw.constant(f"{dq.name}_scale", scale), rw.constant(f"{dq.name}_zero_point", zp)
                qn = rw.add_node(Q_OP, [wf, sc, zc], name=f"{dq.name}_QuantizeLinear", attrs={} if axis is None else {"axis": axis},
                                 out_dtype=np.int8, out_shape=list(deq.shape), detail=f"weight as float -> Q -> DQ; {detail}")
                rw.set_input(dq, 0, qn.outputs[0])
                rw.set_input(dq, 1, sc)
                self._set_zp(rw, dq, zc)
            else:
                rw.set_constant(dq, 0, q, base=f"{dq.inputs[0].name}_s8", detail=detail)
                rw.set_constant(dq, 1, scale, base=f"{dq.name}_scale", detail="symmetric scale")
                self._set_zp(rw, dq, rw.constant(f"{dq.name}_zero_point", zp))
            if axis is not None:
                rw.set_attr(dq, "axis", int(axis))

    @staticmethod
    def _set_zp(rw: Rewriter, node: gs.Node, zp: gs.Constant) -> None:
        if len(node.inputs) < 3:
            # The zero-point slot does not exist yet; the set_input below logs the edit.
            node.inputs.append(gs.Variable.empty())
        rw.set_input(node, 2, zp, detail=f"zero point -> int8 {_fmt(np.asarray(zp.values).ravel()[0])}")

    def _to_float_form(self, rw: Rewriter, dq: gs.Node, value: np.ndarray, qp: QParams) -> None:
        deq = dequantize_exact(value, qp.scale, qp.zero_point, qp.axis)
        wf = rw.constant(f"{dq.inputs[0].name}_float", deq)
        attrs = {"axis": int(dq.attrs["axis"])} if "axis" in dq.attrs else {}
        qn = rw.add_node(Q_OP, [wf, dq.inputs[1], dq.inputs[2] if _has_zp_input(dq) else None],
                         name=f"{dq.name}_QuantizeLinear", attrs=attrs, out_dtype=np.int8, out_shape=list(value.shape),
                         rule="V3", detail="weights_fix=float: int8 W -> DQ becomes float W -> Q -> DQ with the same scale (exact)")
        if not _has_zp_input(dq):
            qn.inputs.pop()
        rw.set_input(dq, 0, qn.outputs[0], rule="V3")

    # V2/V3: float W -> Q -> DQ -------------------------------------------------------------------
    def _float_weight_qs(self, graph: gs.Graph, rw: Rewriter, ctx: PassContext) -> None:
        for q in self._live(graph, rw, Q_OP):
            value = const_value(q.inputs[0])
            qp = qparams(q)
            if value is None or qp is None or qp.qdtype not in _QRANGE or qp.blocked:
                continue
            dqs = list(q.outputs[0].outputs)
            if not dqs or not all(is_dq(d) for d in dqs):
                continue
            value = np.asarray(value, dtype=np.float32)
            wreaders = [r for d in dqs for r in _weight_readers(d)]
            target = self._target_axis(rw, dqs[0], wreaders, qp, value.ndim, ctx) if wreaders else (
                None if qp.axis is None else qp.axis % value.ndim)
            if target is False:
                continue
            zp = qp.zero_point
            asym, wrong_axis = _requant_needed(qp, qp.qdtype, value.ndim, target)
            if asym or wrong_axis:
                # The values the model used are the Q→DQ round trip of the float weight.
                deq = _fake_quant(value, qp)
                scale = weight_scales(deq, target)
                why = "asymmetric/uint8 weight Q (V2)" if asym else f"per-channel axis {qp.axis} is not the output-channel axis {target} (V3)"
                with rw.rule("V3" if wrong_axis else "V2"):
                    rw.set_constant(q, 0, deq, base=f"{q.inputs[0].name}_dequantized",
                                    detail=f"{why}: re-quantize from the dequantized weight (each weight moves <= s_new/2)")
                    for node in [q, *dqs]:
                        rw.set_constant(node, 1, scale, base=f"{node.name}_scale", detail="symmetric scale")
                        self._set_zp(rw, node, rw.constant(f"{node.name}_zero_point", np.zeros(scale.shape, np.int8)))
                        if target is not None:
                            rw.set_attr(node, "axis", int(target))
                rw.set_dtype(q.outputs[0], np.int8, node=q, detail="quantized tensor int8 (symmetric)")
                continue
            if qp.per_channel and not qp.axis_written:
                axis = qp.axis % value.ndim
                for node in [q, *dqs]:
                    rw.set_attr(node, "axis", int(axis), rule="V3",
                                detail=f"per-channel scale without explicit axis: write axis={axis} (exact)")

    # V2: activation Q with its DQs ---------------------------------------------------------------
    def _activations(self, graph: gs.Graph, rw: Rewriter) -> None:
        memo: dict[int, bool] = {}
        for q in self._live(graph, rw, Q_OP):
            if is_constant(q.inputs[0]):
                continue
            qp = qparams(q)
            if qp is None or qp.qdtype not in _QRANGE:
                continue
            if qp.blocked:
                rw.note(q, "blocked activation quantization; left alone", rule="V2")
                continue
            zp_val = 0 if qp.zero_point is None else qp.zero_point
            if qp.qdtype == np.int8 and not np.any(zp_val):
                continue
            readers = list(q.outputs[0].outputs)
            if is_graph_output(graph, q.outputs[0]) or not all(is_dq(r) for r in readers):
                rw.note(q, "asymmetric Q read by non-DQ nodes or a graph output; left alone", rule="V2")
                continue
            if qp.per_channel:
                rw.note(q, "per-channel asymmetric activation quantization; left alone (V3: activations are per-tensor)", rule="V2")
                continue
            bad = [d.name for d in readers if not self._same_params(q, d)]
            if bad:
                rw.note(q, f"DQs {bad} use other parameters than their Q; left alone", rule="V2")
                continue
            self._convert_activation(graph, rw, q, readers, qp, memo)

    @staticmethod
    def _same_params(q: gs.Node, dq: gs.Node) -> bool:
        a, b = qparams(q), qparams(dq)
        if a is None or b is None or a.qdtype != b.qdtype or not np.array_equal(a.scale.ravel(), b.scale.ravel()):
            return False
        za = np.zeros(1) if a.zero_point is None else a.zero_point.ravel()
        zb = np.zeros(1) if b.zero_point is None else b.zero_point.ravel()
        return bool(np.array_equal(za, zb))

    def _convert_activation(self, graph: gs.Graph, rw: Rewriter, q: gs.Node, dqs: list[gs.Node], qp: QParams,
                            memo: dict[int, bool]) -> None:
        s = float(qp.scale.ravel()[0])
        zp = 0 if qp.zero_point is None else int(qp.zero_point.ravel()[0])
        qmin, qmax = _QRANGE[qp.qdtype]
        lo, hi = (qmin - zp) * s, (qmax - zp) * s
        s_new = symmetric_scale(s, zp, qp.qdtype)
        err = added_error(s, zp, qp.qdtype, float(s_new))
        one_sided = zp == qmin
        choice = ""
        if one_sided:
            choice = ("; one-sided range [0, %s]: kept whole with a symmetric scale (half the resolution, no new clipping); "
                      "alternative s'=s would keep resolution but clip above %s" % (_fmt(hi), _fmt(127 * s)))
        elif abs(lo) != abs(hi):
            choice = "; asymmetric range: values beyond the narrower old bound are no longer clipped"
        detail = (f"{qp.qdtype} zp={zp} s={_fmt(s)} range [{_fmt(lo)}, {_fmt(hi)}] -> int8 zp=0 s'={_fmt(s_new)}; "
                  f"max added error {err:.3f} old-scale units (<= s'/2 = {s_new / s / 2:.3f} vs the float input){choice}")
        reinsert_folded_activation(graph, rw, q, memo)
        with rw.rule("V2"):
            zp_new = np.zeros((), np.int8)
            for i, node in enumerate([q, *dqs]):
                rw.set_constant(node, 1, np.asarray(s_new, np.float32).reshape(qp.scale.shape) if qp.scale.ndim else s_new,
                                base=f"{node.name}_scale", detail=detail if i == 0 else f"pair of {q.name}: same conversion")
                self._set_zp(rw, node, rw.constant(f"{node.name}_zero_point", zp_new.reshape(qp.scale.shape) if qp.scale.ndim else zp_new))
            # The quantized tensor's declared type follows the new zero point.
            rw.set_dtype(q.outputs[0], np.int8, node=q, detail="quantized tensor int8 (follows the zero point)")

    # V3: opset -----------------------------------------------------------------------------------
    @staticmethod
    def _blocking_ops(graph: gs.Graph) -> list[str]:
        opset = int(graph.opset or 0)
        return sorted({n.op for n in graph.nodes if n.domain in (None, "", "ai.onnx")
                       and opset < _CHANGED_BY_13.get(n.op, 0) <= MIN_PER_CHANNEL_OPSET})

    def _opset(self, graph: gs.Graph, rw: Rewriter) -> None:
        opset = int(graph.opset or 0)
        if opset >= MIN_PER_CHANNEL_OPSET:
            return
        pcs = [n.name for n in graph.nodes if n.op in (Q_OP, DQ_OP) and (qp := qparams(n)) is not None and qp.per_channel]
        if not pcs:
            return
        blocking = self._blocking_ops(graph)
        if blocking:
            raise ModelError(f"per-channel Q/DQ ({pcs[0]}...) needs opset 13, the model has opset {opset}, and "
                             f"{', '.join(blocking)} changed meaning on the way: pass --opset 13 to convert it")
        rw.set_opset(MIN_PER_CHANNEL_OPSET, detail=f"opset {opset} -> 13 for per-channel Q/DQ ({len(pcs)} nodes); no op "
                                                   f"present changed meaning between the two", rule="V3")

