"""bias-correction: each INT8 layer's float bias absorbs the mean output shift its own rounding causes.

Quantizing a layer's weights (W → W_q) and rounding its input activation (x → Q(x)) shifts the expected
value of every output channel: E[W_q·Q(x)] − E[W·x] is not zero. That shift is coherent, the same sign over
a whole feature map, so the next layers sum it instead of averaging it away (constant image regions, a
letterbox border, a white page: their rounding error is one value per channel). Since TensorRT keeps biases
float and adds them in the conv/GEMM epilogue (V4), subtracting the shift from the float bias removes it in
the engine too, at no run-time cost (bias correction, Nagel et al. 2019, "Data-Free Quantization", with the
input means measured on the calibration data).

What is corrected, per output channel of each weighted op whose weight comes from a DequantizeLinear (Conv,
ConvTranspose, Gemm, and MatMul with a constant 2-D weight followed by a bias Add):

* the weight term (W_q − W)·E[x], always (Nagel et al.'s bias correction, with measured means), and
* the activation *rounding* term W_q·E[Q(x) − x] over the elements Q does not saturate, for the layers
  ``Config.bias_correction_rounding`` names: "none" (default), "input" (layers reading a network input, where
  the INT8 model's input is exactly the float model's) or "all".

E[·] is over the calibration data run through the float model, per input channel and per kernel tap (the
mean of the padded input each tap sees over the output positions), so zero padding and strides are exact.
Each layer's correction counts its own error only: the input statistics come from the float model, so no
error of an upstream layer, which that layer's own correction removes, is counted twice.

Why the rounding term is off by default: deeper in the network it is measured on the float model's tensor,
but the INT8 model's tensor differs from it by the upstream layers' error, a good part of a step, and in
constant regions (where the rounding error is coherent) that decides the rounding error. With it on every
layer ("all"): YOLOv8n +8.9 dB over no correction (letterbox borders), but dnsmos +0.3 instead of +8.0 and
the PP-OCR classifier −12.6 dB instead of +1.5. Even on the first layer alone ("input"), where the input is
exact, a constant that removes the mean rounding error of the constant regions (a white background) moves
every other position: the PP-OCR classifier 31.1 dB against 36.1 without it. Clipping (saturation) is left out: its error sits on a few elements
(outlier tokens of a transformer, the tail of a ReLU6), and a constant removing its mean moves every other
element (all-MiniLM-L6: −11 dB with it). A Conv without a bias takes the correction in the mean of the
BatchNormalization it feeds alone (TensorRT folds the BN into the conv), else it gets a bias (a float input
the conv's epilogue adds at no cost); a Gemm without C gets one. A MatMul without a bias Add is left as it is
(a correction there would be a new node).

Whether it is applied at all is decided from the calibration data (the held-out check, ``_cross_validate``):
batch i is in fold i mod k (``Config.bias_correction_folds``, default 8); every batch runs through the Q/DQ model
corrected with the shifts measured on the *other* folds and through the uncorrected one, against the float
model. The correction is applied if that held-out worst-output SQNR is higher with it, else at half strength
if that is higher, else not at all (a change-log note gives the numbers either way). The weight term is exact
for the calibration data's means, but a model is not a single layer: the other errors (activation rounding,
clipping, the next layers' nonlinearities) and data whose means differ from the calibration data's decide
whether removing it helps the outputs (measured: YOLOv8n −0.5 dB and EasyOCR −1.0 dB by jittered means
without the check, which refuses both). Fewer than two calibration batches: nothing to hold out, not applied.

Measured and dropped (the branch history keeps the code): correcting each layer by its measured output error
in the Q/DQ model (counts upstream errors again: −16 to −20 dB on EfficientNet-Lite0 after 1-3 Jacobi rounds;
layer by layer in order, one run per layer, 35× the calibration time and −2.3 dB on MobileNetV2); the
rounding term measured a second time on the Q/DQ model's own inputs (dnsmos +6.7 dB, but pose −1.9,
YOLOv8n −2.1, SVTRv2 −0.9 against "all").

Only the PTQ pipeline runs it, once, after placement (``RUN_LAST``), and only with real calibration data
(``--calib``; not ``--calib-random``, not a TensorRT cache alone: asked for explicitly there, it says so once).
The fix path never changes a model's learned parameters. ``Config.bias_correction``: None (the default,
``DEFAULT_ON``), True (asked for), False / ``--no-bias-correction`` (off).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..graph import DQ_OP, Q_OP, const_value, is_constant, np_dtype, producer, qparams
from ..rewriter import Rewriter
from .base import Pass, PassContext

__all__ = ["BiasCorrection", "correction_targets", "DEFAULT_ON", "NO_DATA_MESSAGE"]

logger = logging.getLogger(__name__)

#: Whether PTQ corrects biases when Config.bias_correction is None (neither --bias-correction nor
#: --no-bias-correction); either way only where the held-out check on the calibration data finds that it helps
#: (README "Bias correction": on no model of accuracy.py's list worse beyond noise with the check).
DEFAULT_ON = True

NO_DATA_MESSAGE = ("bias correction needs real calibration data (--calib): not applied (random data and a TensorRT "
                   "calibration cache say nothing about the inputs' means)")

#: Corrections smaller than this fraction of the bias's own scale (max |b|, or 1) are not written.
_TINY = 1e-7


@dataclass
class _Target:
    node: gs.Node
    bias_node: gs.Node  # the node whose input holds the bias (the op itself, or the bias Add of a MatMul)
    bias_index: int
    bias: np.ndarray
    w_q: np.ndarray  # the weight as the DQ gives it, in the op's layout
    act: tuple[float, float, int, int] | None  # activation Q's (scale, zero point, qmin, qmax); None: float input
    kind: str  # "conv", "gemm", "matmul"
    scale: float = 1.0  # Gemm: alpha / beta
    geometry: tuple = field(default_factory=tuple)
    #: where the shift is removed: "bias" (b - shift), "bn-mean" (a bias-less Conv's BatchNormalization:
    #: mean + shift, the same as subtracting it before the BN) or "new-bias" (a bias-less Conv gets one)
    how: str = "bias"


def _attr(node: gs.Node, key: str, default: Any) -> Any:
    value = node.attrs.get(key, default)
    return default if value is None else value


def _dq_weight(dq: gs.Node) -> np.ndarray | None:
    """The float weight a weight DQ produces (from an int8 constant, or from Q of a float constant)."""
    from ..quant import dequantize

    qp = qparams(dq)
    if qp is None or qp.blocked:
        return None
    src = dq.inputs[0]
    if is_constant(src):
        q = const_value(src)
    else:
        qn = producer(src)
        if qn is None or qn.op != Q_OP or not is_constant(qn.inputs[0]):
            return None
        qq = qparams(qn)
        if qq is None or qq.blocked:
            return None
        w = np.asarray(const_value(qn.inputs[0]), np.float64)
        scale = np.asarray(qq.scale, np.float64)
        zp = np.zeros_like(scale) if qq.zero_point is None else np.asarray(qq.zero_point, np.float64)
        info = np.iinfo(qq.qdtype)
        shape = [1] * w.ndim
        if scale.size > 1:
            shape[qq.axis % w.ndim] = -1
        q = np.clip(np.rint(w / scale.reshape(shape)) + zp.reshape(shape), info.min, info.max)
    if q is None:
        return None
    zp = qp.zero_point if qp.zero_point is not None else None
    return np.asarray(dequantize(np.asarray(q), qp.scale, qp.axis, zp), np.float64)


def _act_params(tensor: gs.Tensor) -> tuple[float, float, int, int] | None:
    dq = producer(tensor)
    if dq is None or dq.op != DQ_OP:
        return None
    qp = qparams(dq)
    if qp is None or qp.per_channel or qp.blocked:
        return None
    info = np.iinfo(qp.qdtype) if np.issubdtype(qp.qdtype, np.integer) else None
    if info is None:
        return None
    zp = 0.0 if qp.zero_point is None else float(np.asarray(qp.zero_point).ravel()[0])
    return float(np.asarray(qp.scale).ravel()[0]), zp, int(info.min), int(info.max)


def _matmul_bias(graph: gs.Graph, node: gs.Node, n_out: int) -> tuple[gs.Node, int] | None:
    out = node.outputs[0]
    if len(out.outputs) != 1 or any(t is out for t in graph.outputs):
        return None
    add = out.outputs[0]
    if add.op != "Add" or len(add.inputs) != 2:
        return None
    idx = 1 if add.inputs[0] is out else 0
    b = add.inputs[idx]
    if not isinstance(b, gs.Constant):
        return None
    values = const_value(b)
    if values is None or values.ndim != 1 or values.shape[0] != n_out or values.dtype.kind != "f":
        return None
    return add, idx


def _batchnorm_after(graph: gs.Graph, node: gs.Node) -> gs.Node | None:
    """The inference BatchNormalization a bias-less Conv feeds alone (PaddlePaddle exports), or None."""
    out = node.outputs[0]
    if len(out.outputs) != 1 or any(t is out for t in graph.outputs):
        return None
    bn = out.outputs[0]
    if bn.op != "BatchNormalization" or len(bn.inputs) < 5 or len(bn.outputs) != 1 or int(_attr(bn, "training_mode", 0)):
        return None
    if not all(isinstance(t, gs.Constant) for t in bn.inputs[1:5]):
        return None
    return bn


def _reads_network_input(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    """Whether ``tensor`` is DQ(Q(x)) of a network input x, through nothing else."""
    dq = producer(tensor)
    q = producer(dq.inputs[0]) if dq is not None and dq.op == DQ_OP and dq.inputs else None
    return q is not None and q.op == Q_OP and any(q.inputs[0] is t for t in graph.inputs)


def correction_targets(graph: gs.Graph, rounding: str = "input") -> list[_Target]:
    """The layers bias correction can adjust: weight from a DQ, a float constant bias (see the module docstring).

    ``rounding``: which layers' activation rounding is corrected too: "input" (those reading a network input),
    "all" or "none"."""
    out: list[_Target] = []
    for node in graph.nodes:
        if node.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.inputs) < 2:
            continue
        wdq = producer(node.inputs[1])
        if wdq is None or wdq.op != DQ_OP:
            continue
        w_q = _dq_weight(wdq)
        if w_q is None:
            continue
        act = _act_params(node.inputs[0])
        if rounding == "none" or (rounding == "input" and not _reads_network_input(graph, node.inputs[0])):
            act = None
        if node.op in ("Conv", "ConvTranspose"):
            if w_q.ndim < 3:
                continue
            transposed = node.op == "ConvTranspose"
            # ConvTranspose's weight is [C_in, C_out / group, *kernel]: one bias per output channel all the same
            n_out = w_q.shape[1] * int(_attr(node, "group", 1)) if transposed else w_q.shape[0]
            has_bias = len(node.inputs) > 2 and node.inputs[2].name != ""
            if has_bias:
                if not isinstance(node.inputs[2], gs.Constant):
                    continue
                bias_node, bias_index, how = node, 2, "bias"
                bias = const_value(node.inputs[2])
            elif (bn := _batchnorm_after(graph, node)) is not None:
                bias_node, bias_index, how = bn, 3, "bn-mean"
                bias = const_value(bn.inputs[3])
            else:
                bias_node, bias_index, how = node, 2, "new-bias"
                dtype = np_dtype(node.inputs[1].dtype) or np_dtype(node.inputs[0].dtype) or np.dtype(np.float32)
                bias = np.zeros(n_out, dtype)  # the conv's float type (float16, bfloat16 models)
            if bias is None or bias.dtype.kind != "f" or bias.shape != (n_out,):
                continue
            sp = w_q.ndim - 2
            pads = list(_attr(node, "pads", [0] * (2 * sp)))
            geometry = (tuple(w_q.shape[2:]), tuple(_attr(node, "strides", [1] * sp)),
                        tuple(_attr(node, "dilations", [1] * sp)), tuple(pads), str(_attr(node, "auto_pad", "NOTSET")),
                        int(_attr(node, "group", 1)))
            if transposed:
                # explicit pads only (an output_shape or auto_pad sets them from the input's size)
                if geometry[4] != "NOTSET" or _attr(node, "output_shape", None) is not None or len(pads) != 2 * sp:
                    continue
                geometry += (tuple(_attr(node, "output_padding", [0] * sp)),)
            out.append(_Target(node, bias_node, bias_index, bias, w_q, act, "convT" if transposed else "conv", 1.0,
                               geometry, how))
        elif node.op == "Gemm":
            if int(_attr(node, "transA", 0)) or w_q.ndim != 2:
                continue
            w = w_q.T if int(_attr(node, "transB", 0)) else w_q  # [K, N]
            beta, alpha = float(_attr(node, "beta", 1.0)), float(_attr(node, "alpha", 1.0))
            how = "bias"
            if len(node.inputs) < 3 or node.inputs[2].name == "":  # no C: one added (beta·C, so C = shift / beta)
                how = "new-bias"
                dtype = np_dtype(node.inputs[1].dtype) or np_dtype(node.inputs[0].dtype) or np.dtype(np.float32)
                bias = np.zeros(w.shape[1], dtype)
                if len(node.inputs) == 3:
                    continue  # an empty C name left in place: not worth the special case
            elif not isinstance(node.inputs[2], gs.Constant):
                continue
            else:
                bias = const_value(node.inputs[2])
            if bias is None or bias.dtype.kind != "f" or bias.size != w.shape[1] or bias.ndim > 2 or beta == 0:
                continue
            out.append(_Target(node, node, 2, bias, w, act, "gemm", alpha / beta, how=how))
        else:  # MatMul: constant 2-D weight as the second operand, then Add(bias)
            if w_q.ndim != 2:
                continue
            found = _matmul_bias(graph, node, w_q.shape[1])
            if found is None:
                continue
            add, idx = found
            out.append(_Target(node, add, idx, const_value(add.inputs[idx]), w_q, act, "matmul"))
    return out


def _pads(ins: tuple[int, ...], geometry: tuple) -> list[int]:
    kernel, strides, dilations, pads, auto_pad, _ = geometry
    sp = len(kernel)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        out = [0] * (2 * sp)
        for i in range(sp):
            o = -(-ins[i] // strides[i])
            total = max(0, (o - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - ins[i])
            lo = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            out[i], out[i + sp] = lo, total - lo
        return out
    if auto_pad == "VALID":
        return [0] * (2 * sp)
    return list(pads) if len(pads) == 2 * sp else [0] * (2 * sp)


def _tap_sums(x: np.ndarray, geometry: tuple, rows_first: bool = True) -> tuple[np.ndarray, int]:
    """([C, *kernel] sums, over the batch and every output position, of the zero-padded input each kernel tap
    reads; the number of (sample, output position) pairs). Reduced one spatial axis at a time.

    ``rows_first``: an axis with more axes after it is summed with the axis moved to the front (one copy, then
    each tap's rows add as long contiguous vectors) rather than in place ([C, H, W] summed over H adds C·H short
    rows of W): numpy adds the rows in the same order either way, so the sums are the same to the bit (the
    tests compare both), 2-3x faster on a CNN's feature maps. The last axis is left as it is: numpy sums it
    pairwise, in another order than row by row."""
    kernel, strides, dilations, _, _, _ = geometry
    sp = len(kernel)
    ins = x.shape[2:]
    pads = _pads(ins, geometry)
    outs = [(ins[i] + pads[i] + pads[i + sp] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1 for i in range(sp)]
    if min(outs) <= 0 or x.shape[0] == 0:
        return np.zeros((x.shape[1], *kernel)), 0
    n = x.shape[0] * int(np.prod(outs))
    xb = x.sum(axis=0) if x.shape[0] > 1 else x[0]  # [C, *spatial]
    if all(k == 1 for k in kernel) and not any(pads):  # pointwise: one strided sum
        if any(st > 1 for st in strides):
            xb = xb[(slice(None), *(slice(0, (o - 1) * st + 1, st) for o, st in zip(outs, strides)))]
        sums = np.ascontiguousarray(xb).reshape(xb.shape[0], -1).sum(axis=1).astype(np.float64)
        return sums.reshape(x.shape[1], *kernel), n
    parts = [xb]  # one entry per tap prefix
    for i in range(sp):
        nxt = []
        # (a trailing size of 1 would make this axis numpy's inner one, summed pairwise: left in place then)
        front = rows_first and i < sp - 1 and kernel[i] > 1 and int(np.prod(ins[i + 1:])) > 1
        for part in parts:
            rows = np.ascontiguousarray(np.moveaxis(part, 1, 0)) if front else None  # [I, C, ...]
            for k in range(kernel[i]):
                # input rows o*s + k*d - pad_lo for o in 0..O-1, those inside [0, I)
                start = k * dilations[i] - pads[i]
                first = max(0, -(start // strides[i]))
                last = min(outs[i] - 1, (ins[i] - 1 - start) // strides[i])
                if last < first:
                    nxt.append(np.zeros(part.shape[:1] + part.shape[2:]))
                    continue
                lo = start + first * strides[i]
                hi = start + last * strides[i] + 1
                nxt.append(rows[lo:hi:strides[i]].sum(axis=0) if front else part[:, lo:hi:strides[i]].sum(axis=1))
        parts = nxt
    sums = np.stack(parts, axis=1).astype(np.float64).reshape(x.shape[1], *kernel)
    return sums, n


def _transposed_tap_sums(x: np.ndarray, geometry: tuple) -> tuple[np.ndarray, int]:
    """ConvTranspose: ([C, *kernel] sums, over the batch, of the input positions whose contribution through each
    kernel tap lands inside the output; the number of (sample, output position) pairs). Input position i reaches
    output o = i·s + k·d − pad_lo through tap k."""
    kernel, strides, dilations, pads, _, _, out_pad = geometry
    sp = len(kernel)
    ins = x.shape[2:]
    outs = [strides[i] * (ins[i] - 1) + out_pad[i] + (kernel[i] - 1) * dilations[i] + 1 - pads[i] - pads[i + sp]
            for i in range(sp)]
    if min(outs) <= 0 or x.shape[0] == 0:
        return np.zeros((x.shape[1], *kernel)), 0
    n = x.shape[0] * int(np.prod(outs))
    parts = [x.sum(axis=0) if x.shape[0] > 1 else x[0]]
    for i in range(sp):
        nxt = []
        for part in parts:
            for k in range(kernel[i]):
                off = k * dilations[i] - pads[i]  # o = i*s + off, inside [0, O)
                lo = max(0, -(off // strides[i]))  # ceil(-off / s)
                hi = min(ins[i] - 1, (outs[i] - 1 - off) // strides[i])
                nxt.append(part[:, lo:hi + 1].sum(axis=1) if hi >= lo else np.zeros(part.shape[:1] + part.shape[2:]))
        parts = nxt
    return np.stack(parts, axis=1).astype(np.float64).reshape(x.shape[1], *kernel), n


class _Stats:
    """Per input tensor and reader geometry: tap sums of x and of the rounding error Q(x) − x, one set per fold
    (batch i goes to fold i mod k)."""

    def __init__(self, folds: int) -> None:
        self.sx: list[np.ndarray | None] = [None] * folds
        self.sd: list[np.ndarray | None] = [None] * folds
        self.n = [0] * folds

    def add(self, fold: int, sx: np.ndarray, sd: np.ndarray | None, n: int) -> None:
        self.sx[fold] = sx if self.sx[fold] is None else self.sx[fold] + sx
        if sd is not None:
            self.sd[fold] = sd if self.sd[fold] is None else self.sd[fold] + sd
        self.n[fold] += n

    def pooled(self, leave_out: int | None = None) -> tuple[np.ndarray, np.ndarray | None] | None:
        """(E[x], E[Q(x) − x]) over every fold, or over all but fold ``leave_out``; None without data."""
        keep = [i for i in range(len(self.n)) if i != leave_out and self.n[i] and self.sx[i] is not None]
        n = sum(self.n[i] for i in keep)
        if not n:
            return None
        ds = [self.sd[i] for i in keep if self.sd[i] is not None]
        return sum(self.sx[i] for i in keep) / n, (sum(ds) / n if ds else None)


def _held_out_shifts(t: _Target, w: np.ndarray, st: _Stats, used: list[int]) -> np.ndarray:
    """[fold, channel]: the shift (both terms) fitted on every fold but each of ``used``, for the held-out check.

    The same arithmetic as :meth:`BiasCorrection._shift` on ``st.pooled(leave_out=f)``, for all folds at once (one
    product instead of a product and a sum per fold; einsum's own loops, not BLAS, whose threads spin on a loaded
    machine: 16 ms of CPU for an [8, 384] x [384, 1536] product with two threads under load, 0.6 with one):
    the float64 results differ from it in the last bits only, far below the float32 biases the check feeds (its
    SQNRs were the same on every model of ``benchmarks/accuracy.py``'s list). The shift written into the model is
    :meth:`BiasCorrection._shift`'s."""
    n = np.array([st.n[f] for f in used], np.float64)
    total = sum(st.n[f] for f in range(len(st.n)) if st.sx[f] is not None)

    def held(parts: list[np.ndarray | None]) -> np.ndarray | None:
        present = [parts[f] for f in range(len(parts)) if parts[f] is not None and st.n[f]]
        if not present:
            return None
        whole = sum(present)
        out = np.stack([whole - (parts[f] if parts[f] is not None else 0) for f in used])
        return out / (total - n).reshape((-1,) + (1,) * (out.ndim - 1))

    mx, md = held(st.sx), held(st.sd)  # [F, *means]
    folds = mx.shape[0]
    if t.kind == "conv":
        co, groups = t.w_q.shape[0], t.geometry[5]

        def per_out(weight: np.ndarray, means: np.ndarray) -> np.ndarray:
            wg = weight.reshape(groups, co // groups, -1)  # [g, co/g, ci/g * taps]
            return np.einsum("gok,fgk->fgo", wg, means.reshape(folds, groups, -1)).reshape(folds, co)
    elif t.kind == "convT":  # w [C_in, C_out/g, *k], means [C_in, *k]
        groups = t.geometry[5]
        ci = w.shape[0] // groups

        def per_out(weight: np.ndarray, means: np.ndarray) -> np.ndarray:
            m = means.reshape(folds, means.shape[1], -1)
            wt = weight.reshape(weight.shape[0], weight.shape[1], -1)
            return np.concatenate([np.einsum("fct,cot->fo", m[:, g * ci:(g + 1) * ci], wt[g * ci:(g + 1) * ci])
                                   for g in range(groups)], axis=1)
    else:
        w = w.T if t.kind == "gemm" and w.shape != t.w_q.shape else w

        def per_out(weight: np.ndarray, means: np.ndarray) -> np.ndarray:
            return np.einsum("fk,kn->fn", means, weight) * t.scale
    out = per_out(t.w_q - w, mx)
    return out + per_out(t.w_q, md) if md is not None else out


def _rounding_error(x: np.ndarray, act: tuple[float, float, int, int]) -> np.ndarray:
    """Q(x) − x where Q does not saturate, 0 where it does (clipping is left out, see the module docstring)."""
    scale, zp, qmin, qmax = act
    d = x / np.float32(scale)
    np.rint(d, out=d)
    saturated = (d < qmin - zp) | (d > qmax - zp)  # round(x/s) + zp outside [qmin, qmax]
    d *= np.float32(scale)
    d -= x
    d[saturated] = 0
    return d


def _key(t: _Target, x_name: str) -> tuple:
    return (x_name, t.kind, t.geometry, t.act)


class BiasCorrection(Pass):
    name = "bias-correction"
    summary = ("PTQ with calibration data: each INT8 layer's float bias absorbs the mean output shift of its own "
               "weight and activation rounding (kept float by TensorRT)")
    rules = ("V4",)
    edits_through_rewriter = True

    def run(self, graph: gs.Graph, rw: Rewriter, ctx: PassContext) -> None:
        asked = ctx.config.bias_correction  # True: asked for; None: the default (DEFAULT_ON); False: off
        if asked is False or ctx.pipeline != "ptq" or (asked is None and not DEFAULT_ON):
            return
        if ctx.calib_data is None or ctx.calib_model is None:
            if asked:  # asked for, and impossible: said once, not silently skipped
                logger.warning(NO_DATA_MESSAGE)
                rw.note("<model>", NO_DATA_MESSAGE, rule="V4")
            return
        targets = correction_targets(graph, ctx.config.bias_correction_rounding)
        if not targets:
            return
        from onnx import numpy_helper

        # the same layer in the float model: by node name, else (unnamed nodes) by its output tensor
        float_graph = ctx.calib_model.graph
        float_nodes = {n.name: n for n in float_graph.node if n.name}
        float_by_output = {n.output[0]: n for n in float_graph.node if n.output}
        weights = {i.name: i for i in float_graph.initializer}
        weights.update({n.output[0]: a.t for n in float_graph.node if n.op_type == "Constant"
                        for a in n.attribute if a.name == "value"})
        from ..calibration.collect import collect_stats, cut_at_plugins

        readers: dict[str, list[tuple[_Target, str]]] = {}
        for t in targets:
            fn = float_nodes.get(t.node.name)
            if fn is None or fn.op_type != t.node.op:
                fn = float_by_output.get(t.node.outputs[0].name)
            if fn is None or fn.op_type != t.node.op or not fn.input or not fn.input[0] or fn.input[0] in weights:
                continue
            if len(fn.input) < 2 or fn.input[1] not in weights:
                continue
            readers.setdefault(fn.input[0], []).append((t, fn.input[1]))
        if not readers:
            return

        folds = max(1, int(ctx.config.bias_correction_folds))
        stats: dict[tuple, _Stats] = {}
        by_tensor: dict[str, list[tuple]] = {}
        for x_name, ts in readers.items():
            for t, _ in ts:
                key = _key(t, x_name)
                if key not in stats:
                    stats[key] = _Stats(folds)
                    by_tensor.setdefault(x_name, []).append((key, t))
        seen: dict[str, int] = {}  # batches observed per tensor: batch i goes to fold i mod k
        # The held-out check's float reference: the model's outputs, kept from this pass (see _Reference)
        reference = _Reference([o.name for o in cut_at_plugins(ctx.calib_model)[0].graph.output]) if folds > 1 else None

        def observe(name: str, value: np.ndarray) -> None:
            if reference is not None:
                reference.observe(name, value)
            if name not in by_tensor:
                return
            fold = seen.get(name, 0) % folds
            seen[name] = seen.get(name, 0) + 1
            x = np.asarray(value, np.float32)
            for key, t in by_tensor.get(name, ()):
                d = _rounding_error(x, t.act) if t.act is not None else None
                c = x.shape[1] if x.ndim > 1 else 0
                if t.kind in ("conv", "convT"):
                    if x.ndim != len(t.geometry[0]) + 2:
                        continue
                    # x and its rounding error side by side on the channel axis: one reduction for both
                    taps = _tap_sums if t.kind == "conv" else _transposed_tap_sums
                    sums, n = taps(x if d is None else np.concatenate([x, d], axis=1), t.geometry)
                    sx, sd = sums[:c], (sums[c:] if d is not None else None)
                else:
                    if x.ndim < 2:
                        continue
                    flat = x.reshape(-1, x.shape[-1])
                    sx, n = flat.sum(axis=0, dtype=np.float64), flat.shape[0]
                    sd = d.reshape(-1, d.shape[-1]).sum(axis=0, dtype=np.float64) if d is not None else None
                stats[key].add(fold, sx, sd, n)

        collect_stats(ctx.calib_model, list(readers), ctx.calib_data, histogram=False, progress=False, observe=observe,
                      accumulate=False, outputs=reference is not None)

        shifts: list[tuple[_Target, np.ndarray, np.ndarray]] = []
        used = [f for f in range(folds) if any(st.n[f] for st in stats.values())]  # folds that got batches
        held_out: dict[int, list[np.ndarray]] = {f: [] for f in used}  # per fold: the shifts fitted without it
        for x_name, ts in readers.items():
            for t, w_name in ts:
                st = stats[_key(t, x_name)]
                pooled = st.pooled()
                if pooled is None:
                    continue
                w = np.asarray(numpy_helper.to_array(weights[w_name]), np.float64)
                shift = self._shift(t, w, *pooled)
                if shift is None:
                    continue
                if len(used) > 1:
                    for f, fitted in zip(used, _held_out_shifts(t, w, st, used)):
                        held_out[f].append(fitted)
                shifts.append((t, *shift))
        if not shifts:
            return
        if folds > 1:
            if len(used) < 2:
                batches = max(seen.values(), default=0)
                rw.note("<model>", f"not applied: the calibration data has {batches} batch, too few to check the "
                        "correction on data it was not fitted to (give more samples, or smaller batches)", rule="V4")
                return
            verdict = _cross_validate(graph, [t for t, _, _ in shifts], held_out, folds, ctx, reference)
            if not verdict.apply:
                rw.note("<model>", f"not applied: {verdict.why}", rule="V4")
                return
            rw.note("<model>", f"applied: {verdict.why}", rule="V4")
            shifts = [(t, wterm * verdict.strength, aterm * verdict.strength) for t, wterm, aterm in shifts]
        with rw.rule("V4"):
            for t, wterm, aterm in shifts:
                self._write(rw, t, (wterm, aterm))

    @staticmethod
    def _shift(t: _Target, w: np.ndarray, mx: np.ndarray, md: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | None:
        """(weight term, activation term) of the mean output shift per output channel."""
        if t.kind == "conv":
            if w.shape != t.w_q.shape:
                return None
            co, groups = w.shape[0], t.geometry[5]
            if co % groups or mx.shape[0] != w.shape[1] * groups:
                return None
            g = np.arange(co) // (co // groups)
            mxg = mx.reshape(groups, -1)[g]  # [co, ci/g * taps]
            dw = (t.w_q - w).reshape(co, -1)
            wterm = (dw * mxg).sum(axis=1)
            aterm = (t.w_q.reshape(co, -1) * md.reshape(groups, -1)[g]).sum(axis=1) if md is not None else np.zeros(co)
            return wterm, aterm
        if t.kind == "convT":  # w [C_in, C_out/g, *k], means [C_in, *k]
            if w.shape != t.w_q.shape or mx.shape[0] != w.shape[0] or w.shape[0] % t.geometry[5]:
                return None
            groups = t.geometry[5]
            ci, cog = w.shape[0] // groups, w.shape[1]

            def per_out(weight: np.ndarray, means: np.ndarray) -> np.ndarray:
                m = means.reshape(means.shape[0], -1)  # [C_in, taps]
                wt = weight.reshape(weight.shape[0], weight.shape[1], -1)  # [C_in, C_out/g, taps]
                return np.concatenate([np.einsum("ct,cot->o", m[g * ci:(g + 1) * ci], wt[g * ci:(g + 1) * ci])
                                       for g in range(groups)])

            wterm = per_out(t.w_q - w, mx)
            aterm = per_out(t.w_q, md) if md is not None else np.zeros(cog * groups)
            return wterm, aterm
        if t.kind == "gemm":
            w = w.T if w.shape != t.w_q.shape else w
        if w.shape != t.w_q.shape or mx.shape[0] != w.shape[0]:
            return None
        wterm = mx @ (t.w_q - w) * t.scale
        aterm = (md @ t.w_q) * t.scale if md is not None else np.zeros(w.shape[1])
        return wterm, aterm

    @staticmethod
    def _write(rw: Rewriter, t: _Target, shift: tuple[np.ndarray, np.ndarray]) -> None:
        wterm, aterm = shift
        total = wterm + aterm
        new = _corrected(t, total)
        if new is None:
            return
        where = {"bias": "", "bn-mean": f" (through the mean of {t.bias_node.name}, the BatchNormalization after it)",
                 "new-bias": " (it had no bias: one added)"}[t.how]
        name = f"{t.node.name}_{'bn_mean' if t.how == 'bn-mean' else 'bias'}_corrected"
        rw.set_constant(t.bias_node, t.bias_index, new, base=name,
                        detail=(f"bias correction of {t.node.name}{where}: mean output shift of INT8 rounding removed "
                                f"(weights max {np.max(np.abs(wterm)):.3g}, activation rounding max "
                                f"{np.max(np.abs(aterm)):.3g} per channel; biases stay float in TensorRT)"))


def _corrected(t: _Target, total: np.ndarray) -> np.ndarray | None:
    """The bias (or BatchNormalization mean) with the shift ``total`` removed; None when there is nothing to do."""
    bias = np.asarray(t.bias)
    ref = max(float(np.max(np.abs(bias))) if bias.size else 0.0, 1.0)
    if not np.all(np.isfinite(total)) or float(np.max(np.abs(total))) <= _TINY * ref:
        return None
    sign = 1.0 if t.how == "bn-mean" else -1.0
    return (bias.astype(np.float64) + sign * total.reshape(bias.shape)).astype(bias.dtype)


#: The strengths of the correction the held-out check tries (the best one that beats no correction is applied).
STRENGTHS = (1.0, 0.5)


@dataclass
class _Verdict:
    apply: bool
    why: str
    strength: float = 1.0


def _bias_inputs(base: Any, targets: list[_Target]) -> tuple[Any, dict[str, int]]:
    """A copy of the exported Q/DQ model ``base`` whose targets read their bias (or BatchNormalization mean) from a
    new graph input: one session runs the model with any set of corrections. Returns (model, input name -> target)."""
    import onnx
    from onnx import helper

    model = onnx.ModelProto()
    model.CopyFrom(base)
    by_output = {n.output[0]: n for n in model.graph.node if n.output}
    names: dict[str, int] = {}
    for i, t in enumerate(targets):
        node = by_output.get(t.bias_node.outputs[0].name)
        bias = np.asarray(t.bias)
        if node is None or bias.dtype not in (np.float32, np.float16, np.float64):
            continue
        name = f"__bias_correction_check_{i}"
        elem = helper.np_dtype_to_tensor_dtype(bias.dtype)
        model.graph.input.append(helper.make_tensor_value_info(name, elem, list(bias.shape)))
        while len(node.input) <= t.bias_index:
            node.input.append("")
        node.input[t.bias_index] = name
        names[name] = i
    return model, names


class _Reference:
    """The float model's outputs per calibration batch, kept by the statistics pass for the held-out check, which
    then runs no float model of its own (that was a third of the check on a CNN: one more unoptimized run per batch).

    They come from the statistics pass's session (onnxruntime's graph optimizations on, as calibration runs it),
    not an unoptimized one: float rounding differences of about 1e-6 relative, far below the INT8 error the check
    measures (the verdicts and the SQNRs the change log prints were the same on every model of
    ``benchmarks/accuracy.py``'s list). Past ``_REFERENCE_BYTES`` (a large calibration set of a model with large
    outputs) nothing is kept and the check runs the float model itself, as before."""

    def __init__(self, names: Sequence[str]) -> None:
        self.values: dict[str, list[np.ndarray]] = {n: [] for n in names}
        self.nbytes = 0

    def observe(self, name: str, value: np.ndarray) -> None:
        kept = self.values.get(name)
        if kept is None:
            return
        self.nbytes += value.nbytes
        if self.nbytes > _REFERENCE_BYTES:
            self.values = {}
            return
        kept.append(value)

    def batches(self, model: Any, names: list[str]) -> list[list[np.ndarray | None]] | None:
        """Per batch, the value of each of ``names`` (None for an output that is not float, which the check skips);
        None when they are not all there (not kept, or the pass ran the model in slices)."""
        declared = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
        counts = {len(self.values.get(n, ())) for n in names if self.values.get(n)}
        if len(counts) != 1:
            return None
        count = counts.pop()
        for n in names:
            if not self.values.get(n) and declared.get(n, 0) in (0, *_FLOAT_ELEM_TYPES):
                return None  # a float output (or one of unknown type) missing
        return [[self.values[n][i] if self.values.get(n) else None for n in names] for i in range(count)]


#: See _Reference.
_REFERENCE_BYTES = 1 << 28
_FLOAT_ELEM_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


def _dequantized_weights(model: Any) -> dict[str, np.ndarray]:
    """Take the constant DequantizeLinear chains out of ``model`` (in place): each DequantizeLinear of an INT8/UINT8
    initializer, or of QuantizeLinear of a float32 initializer, becomes a graph input, fed with the values it
    computes (returned, by input name).

    Without graph optimizations onnxruntime computes every weight's Q/DQ on every run, and its per-channel
    QuantizeLinear along the last axis goes one element at a time: 90 % of a MiniLM run, 1 s of 1.1. The values
    are onnxruntime's to the bit: round(x / scale) half to even, plus the zero point, saturated; then
    (q − zero point) · scale, in float32 as its kernels compute them (tests compare them with onnxruntime on real
    models). They are fed as inputs rather than written as initializers because onnxruntime prepacks a constant
    MatMul/Gemm weight, which sums in another order: as inputs the layers run exactly as they did on the DQ
    outputs. Chains with any other type, attribute or scale (float16, blocked, FP8, INT4) are left as they are."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    readers: dict[str, int] = {}
    for n in g.node:
        for name in n.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in g.output}

    def params(node: Any) -> tuple[np.ndarray, np.ndarray | None, int] | None:
        """(scale, zero point, axis) of a Q or DQ whose scale and zero point are initializers, or None."""
        if node.domain not in ("", "ai.onnx") or len(node.input) < 2 or node.input[1] not in inits:
            return None
        if any(a.name != "axis" for a in node.attribute):
            return None
        scale = numpy_helper.to_array(inits[node.input[1]])
        zp_name = node.input[2] if len(node.input) > 2 else ""
        if zp_name and zp_name not in inits:
            return None
        zp = numpy_helper.to_array(inits[zp_name]) if zp_name else None
        if scale.dtype != np.float32 or scale.ndim > 1 or not np.all(np.isfinite(scale)) or np.any(scale == 0):
            return None
        if zp is not None and (zp.dtype not in (np.int8, np.uint8) or zp.shape != scale.shape):
            return None
        axis = next((int(a.i) for a in node.attribute if a.name == "axis"), 1)
        return scale, zp, axis

    def along(v: np.ndarray, ndim: int, axis: int, size: int | None = None) -> np.ndarray | None:
        if v.size == 1:
            return v.reshape(())
        if ndim == 0 or not -ndim <= axis < ndim or (size is not None and v.size != size):
            return None
        shape = [1] * ndim
        shape[axis % ndim] = -1
        return v.reshape(shape)

    feeds: dict[str, np.ndarray] = {}
    drop: set[int] = set()
    for dq in g.node:
        if dq.op_type != "DequantizeLinear" or dq.output[0] in outputs or (p := params(dq)) is None:
            continue
        scale, zp, axis = p
        quantize = None
        if dq.input[0] in inits:
            q = numpy_helper.to_array(inits[dq.input[0]])
            if q.dtype not in (np.int8, np.uint8) or (zp is not None and zp.dtype != q.dtype):
                continue
        else:
            quantize = producers.get(dq.input[0])
            qp = params(quantize) if quantize is not None and quantize.op_type == "QuantizeLinear" else None
            if qp is None or qp[1] is None or quantize.input[0] not in inits:
                continue
            w = numpy_helper.to_array(inits[quantize.input[0]])
            q_scale = along(qp[0], w.ndim, qp[2], w.shape[qp[2]] if -w.ndim <= qp[2] < w.ndim else None)
            if w.dtype != np.float32 or q_scale is None or not np.all(np.isfinite(w)):
                continue
            info = np.iinfo(qp[1].dtype)
            q_zp = along(qp[1], w.ndim, qp[2]).astype(np.float32)
            q = np.clip(np.rint(w / q_scale) + q_zp, info.min, info.max).astype(qp[1].dtype)
            if zp is None or zp.dtype != q.dtype:
                continue
        s = along(scale, q.ndim, axis, q.shape[axis] if -q.ndim <= axis < q.ndim else None)
        if s is None:
            continue
        z = np.zeros((), np.int32) if zp is None else along(zp, q.ndim, axis).astype(np.int32)
        feeds[dq.output[0]] = (q.astype(np.int32) - z).astype(np.float32) * s
        drop.add(id(dq))
        if quantize is not None and readers.get(quantize.output[0]) == 1 and quantize.output[0] not in outputs:
            drop.add(id(quantize))
    if not feeds:
        return feeds
    kept = [n for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(kept)
    g.input.extend(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(v.shape)) for name, v in feeds.items())
    # the float weights the removed Qs read (If/Loop bodies may read any initializer: then none is dropped)
    if not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        used = {name for n in g.node for name in n.input} | outputs | {i.name for i in g.input}
        initializers = [t for t in g.initializer if t.name in used]
        del g.initializer[:]
        g.initializer.extend(initializers)
    return feeds


def _cross_validate(graph: gs.Graph, targets: list[_Target], held_out: dict[int, list[np.ndarray]], folds: int,
                    ctx: PassContext, reference: _Reference | None = None) -> _Verdict:
    """Whether the correction improves the model's outputs on data it was not fitted to: batch i of the calibration
    data is in fold i mod k; each batch runs through the Q/DQ model corrected with the shifts measured on the other
    folds, and through the uncorrected Q/DQ model, against the float model (``reference``: its outputs kept by the
    statistics pass; else run here). The Q/DQ model runs in onnxruntime without graph optimizations: the Q/DQ
    arithmetic as written (its weights' Q/DQ computed once, :func:`_dequantized_weights`). Applied if that held-out
    worst-output SQNR (errors summed over every batch) is higher with the correction; else, if it is higher with
    half of it, half (see ``STRENGTHS``)."""
    from ..calibration.collect import cut_at_plugins, float32_copy, has_bfloat16, make_session
    from ..check import _feed, _pair_outputs, sqnr_db
    from ..graph import export_graph

    worst: dict[float, float] = {}
    try:
        float_model, _ = cut_at_plugins(ctx.calib_model)
        plain, _ = cut_at_plugins(export_graph(graph))
        pairs = _pair_outputs(float_model, plain)
        checked, inputs = _bias_inputs(plain, targets)
        if has_bfloat16(float_model) or has_bfloat16(checked):
            float_model, checked = float32_copy(float_model), float32_copy(checked)
        names = list(pairs)
        outs = [pairs[n] for n in names]
        kept = reference.batches(float_model, names) if reference is not None else None
        ref_s = make_session(float_model, optimize=False) if kept is None else None
        weights = _dequantized_weights(checked)
        q_s = make_session(checked, optimize=False)
        original = {name: np.asarray(targets[i].bias) for name, i in inputs.items()}
        made: dict[tuple[float, int], dict[str, np.ndarray]] = {}  # (strength, fold): the biases fed

        def biases(strength: float, fold: int) -> dict[str, np.ndarray]:
            if strength == 0.0:
                return original
            if (strength, fold) not in made:
                values = {}
                for name, i in inputs.items():
                    new = _corrected(targets[i], strength * held_out[fold][i])
                    values[name] = new if new is not None else original[name]
                made[strength, fold] = values
            return made[strength, fold]

        def sqnrs(strengths: tuple[float, ...]) -> dict[float, float]:
            """Worst-output held-out SQNR per strength, over every calibration batch (one pass over the data)."""
            signal = dict.fromkeys(names, 0.0)
            noise = {k: dict.fromkeys(names, 0.0) for k in strengths}
            for i, batch in enumerate(ctx.calib_data):
                ref = kept[i] if kept is not None else ref_s.run(names, _feed(ref_s, batch, None))
                fold = i % folds
                got = {k: q_s.run(outs, _feed(q_s, {**batch, **biases(k, fold), **weights}, None)) for k in strengths}
                for j, n in enumerate(names):
                    if ref[j] is None:
                        continue
                    r = np.asarray(ref[j])
                    if r.dtype.kind != "f":
                        continue
                    r = r.astype(np.float64)
                    signal[n] += float(np.sum(r * r))
                    for k, values in got.items():
                        noise[k][n] += float(np.sum((r - np.asarray(values[j], np.float64)) ** 2))
            compared = [n for n in names if signal[n] > 0]
            if not compared:
                raise ValueError("no float output to compare")
            return {k: min(sqnr_db(signal[n], noise[k][n]) for n in compared) for k in strengths}

        worst.update(sqnrs((0.0, STRENGTHS[0])))
        for strength in STRENGTHS[1:]:  # a weaker correction only when the stronger one did not help
            if max(worst[k] for k in worst if k) > worst[0.0]:
                break
            worst.update(sqnrs((strength,)))
    except Exception as exc:  # onnxruntime cannot run it: unchecked, so not applied
        logger.debug("bias correction check failed", exc_info=True)
        return _Verdict(False, f"the held-out check could not run ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:160] if str(exc) else ''})")
    tried = [k for k in STRENGTHS if k in worst]
    what = (f"held out on {len(held_out)} folds of the calibration batches (each corrected with the shifts measured "
            f"on the others), worst-output SQNR {worst[0.0]:.2f} dB without, "
            + ", ".join(f"{worst[k]:.2f} dB with it" + (f" at {k:g}x" if k != 1.0 else "") for k in tried))
    good = [k for k in tried if worst[k] > worst[0.0]]
    if not good:
        return _Verdict(False, what)
    return _Verdict(True, what + (f"; applied at {good[0]:g}x" if good[0] != 1.0 else ""), good[0])
