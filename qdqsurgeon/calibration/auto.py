"""``--method auto``: each activation range chosen by the error it causes at the layer that reads it.

A clipping range good for a tensor in isolation (least squared error of the tensor itself) is not
the one that is best for the network: a channel with large outliers may meet small weights, and a
layer's output mixes the activation's rounding with its own weight rounding. ``auto`` therefore
scores candidate ranges where the error lands:

1. One streamed pass collects, for every tensor, the histogram the fixed methods use (see
   :class:`.methods.TensorStats`) and, for every tensor read by a weighted layer (Conv, Gemm, MatMul
   with a constant weight), a small random sample of that layer's input patches (im2col rows at
   random output positions; rows of the last axis for Gemm/MatMul), 32 to 1024 rows.
2. Candidates per tensor come from its histogram: the absolute max, the 99.9/99.99/99.999th
   percentiles, the MSE-optimal threshold (the whole error curve from prefix sums,
   :func:`.methods.mse_curve`) and the entropy (KL) threshold (:func:`.methods.kl_curve` sampled,
   :func:`.methods.amax_entropy_fast`), so the candidates are the fixed methods' own values.
3. Each candidate ``T`` is scored as the relative squared error of the reading layer's output
   computed on the sample with the activation fake-quantized at ``T`` and the weight fake-quantized
   as insert-qdq quantizes it (symmetric int8 per output channel, V3), against the float output.
   A tensor with no weighted reader (a residual skip read by an Add, an attention GEMM input) is
   scored by the relative squared error of the tensor itself, from its histogram.
4. Tensors TensorRT ties into one INT8 buffer (Concat/Split inputs and output, MaxPool, reshapes:
   :func:`qdqsurgeon.passes.align_scales.tied_groups` on the float graph, rules P4-P6) get one
   choice: each candidate is the largest of the members' own values (what align-scales makes of a
   group calibrated per tensor by that method), scored on every member's readers, and the sum decides.
   A tensor read by several layers (fan-out, P6) sums the errors of all its readers.
5. **The gate.** With a few calibration samples most differences between candidates are noise, so
   the errors are kept per fold (calibration batch *i* in fold *i* mod 8) and a candidate replaces the
   baseline only when it has less error *consistently*: a paired one-sided t-test over the folds at
   1 % (:func:`gate`). First for the model as a whole, end to end (:meth:`AutoSelector._end_to_end`):
   a copy of the float model with Q/DQ on the tensors the placement asks for first (the weighted
   layers' inputs) and those layers' weights fake-quantized runs every calibration batch once per
   fixed method (max, the configured percentile, MSE, entropy), with the ranges that method finds on
   the *other* folds, and each fold's worst-output error against the float outputs goes through the
   gate (:func:`pick_end_to_end`): that picks the fixed method the model keeps (the configured
   percentile unless another passes). Where none passes (or the copy cannot run: bfloat16, over
   :data:`_E2E_MAX_NODES` nodes, onnxruntime refuses it), the gate on the per-layer errors summed over
   the model's tensors, confirmed on held-out errors, may still move it, unless the held-out outputs
   put its pick below the baseline (the per-layer error undervalues clipping, a coherent error the next
   layers add up). Then per tensor or group, against the model's method. Each departure, proposed on
   the errors of candidates found on all the data, is kept only if the gate also passes on held-out
   errors: each fold scored with the candidates found on the other folds (a range that fits the data
   it was found on, and not the next batch, pays for it there). A tensor kept at the model's method
   gets exactly that fixed method's range (tied groups: each member its own, as align-scales expects),
   so with no consistent evidence anywhere ``auto`` gives the ranges of ``--method percentile``.

The first request also collects the tensors the later placement passes ask for (Add inputs,
pooling/pointwise inputs), so their ranges are chosen without another pass over the data.
Tried before the gate and dropped: choosing on one half of the batches and scoring on the other
(two folds of four samples), and choosing the candidate of least error outright (ResNet-18, YOLOv8n,
the PP-OCR classifier, BlazeFace, openWakeWord and EasyOCR lost 0.4-8.5 dB against the best fixed
method in one run: the choices followed noise). An end-to-end check on the calibration batches with
the ranges found on all of them (in sample) was tried twice: to choose among the per-tensor choice and
each fixed method (it favoured wide ranges on the data it was fitted to), and as a veto on the gate's
departures (on the five models where it ran it never vetoed one, openWakeWord's included, whose
in-sample departures cost 1.2 dB on the evaluation data). Held out, the total end-to-end error alone
(the method of highest held-out SQNR, without the gate) moved the PP-OCR classifier to max (+7.1 dB
held out, from 3 of 8 folds), BlazeFace to max and openWakeWord to MSE, each 0.6-3.2 dB worse than
the percentile on the evaluation data by jittered means: the gate over the folds is what keeps them.
On EasyOCR, where max is best on the evaluation data, the held-out outputs do not favour it (33.3 dB
against the percentile's 33.1 and MSE's 34.3): the calibration crops hold no evidence for it.
Random choices use a fixed seed: the same data gives the same ranges.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from qdqsurgeon.calibration.methods import (
    TensorStats,
    amax_entropy_fast,
    amax_max,
    amax_mse_fast,
    amax_percentile,
    hist_energy,
    hist_sq_error,
)

__all__ = ["AutoSelector", "AUTO_PERCENTILES", "candidate_ranges", "gate", "layer_error", "pick_end_to_end"]

logger = logging.getLogger(__name__)

AUTO_PERCENTILES = (99.9, 99.99, 99.999)
# Sample budget per reading layer: rows of (input patch) such that rows x patch elements stays near
# this, and at most this many output channels, so one candidate costs about two million MACs (more only
# for patches over 2048 elements, which still get 32 rows: 1024 sampled outputs of sums over K terms).
_ELEMENTS = 1 << 16
_MIN_ROWS, _MAX_ROWS = 32, 1024
_MAX_CHANNELS = 32


def candidate_ranges(stats: TensorStats, only: Iterable[str] | None = None,
                     extra: Iterable[float] = ()) -> dict[str, float]:
    """Candidate amax values of one tensor, by the method that gives each (``only``: just those methods;
    ``extra``: more percentiles, such as the configured one).

    MSE from the whole error curve (:func:`.methods.mse_curve`); entropy from the KL curve at every
    8th bin count and around its 4 best (:func:`.methods.amax_entropy_fast`).
    """
    if stats.absmax <= 0.0 or stats.hist is None:
        return {"max": amax_max(stats)}
    percentiles = sorted(set(AUTO_PERCENTILES) | {float(p) for p in extra})
    makers = {"max": lambda: amax_max(stats),
              **{f"percentile {p:g}": (lambda p=p: amax_percentile(stats, p)) for p in percentiles},
              "mse": lambda: amax_mse_fast(stats),
              "entropy": lambda: amax_entropy_fast(stats)}
    wanted = list(makers) if only is None else [k for k in only if k in makers]
    return {k: makers[k]() for k in wanted}


# One-sided Student t quantiles at 1 %, by degrees of freedom (1-30; beyond, the normal's 2.326): the 5 %
# level of a paired test split over the five candidates that may replace the baseline (Bonferroni).
_T99 = (31.821, 6.965, 4.541, 3.747, 3.365, 3.143, 2.998, 2.896, 2.821, 2.764, 2.718, 2.681, 2.650, 2.624, 2.602,
        2.583, 2.567, 2.552, 2.539, 2.528, 2.518, 2.508, 2.500, 2.492, 2.485, 2.479, 2.473, 2.467, 2.462, 2.457)
MIN_FOLDS = 3


def gate(labels: Sequence[str], errors: np.ndarray, baseline: str) -> tuple[str, dict]:
    """The candidate to use, given its error per fold (``errors`` [len(labels), folds]): ``baseline``
    unless another candidate has less error *consistently*, i.e. a paired one-sided t-test over the folds
    of (baseline error - candidate error) rejects "no better" at 1 % (:data:`_T99`); among the candidates
    that pass, the least total error. With fewer than :data:`MIN_FOLDS` folds there is no evidence: the
    baseline. Returns the label and what decided it (t statistic and mean gain of the winner, folds).
    """
    labels = list(labels)
    if baseline not in labels:  # a tensor with nothing to choose (all zero): one candidate
        return labels[0], {"folds": errors.shape[1], "reason": "one candidate"}
    b = labels.index(baseline)
    folds = errors.shape[1]
    if folds < MIN_FOLDS:
        return baseline, {"folds": folds, "reason": "too few folds"}
    diff = errors[b][np.newaxis] - errors  # > 0: the candidate has less error than the baseline on that fold
    mean = diff.mean(axis=1)
    sd = diff.std(axis=1, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(sd > 0, mean / (sd / math.sqrt(folds)), np.where(mean > 0, np.inf, 0.0))
    crit = _T99[folds - 2] if folds - 2 < len(_T99) else 2.326
    passing = [i for i in range(len(labels)) if i != b and mean[i] > 0 and t[i] > crit]
    if not passing:
        i = int(np.argmax(np.where(np.arange(len(labels)) == b, -np.inf, t)))
        return baseline, {"folds": folds, "reason": "no consistent gain", "best_other": labels[i], "t": float(t[i])}
    i = min(passing, key=lambda j: (errors[j].sum(), j))
    gain = float(mean[i] * folds / max(errors[b].sum(), 1e-30))
    return labels[i], {"folds": folds, "reason": "consistent gain", "t": float(t[i]), "relative_gain": gain}


#: At most this many calibration batches are run end to end per fixed method (the first ones, in their folds).
_E2E_BATCHES = 16
#: The methods that do no better than the baseline on this many first batches are not run end to end on the rest.
_E2E_SCREEN = 3
#: Larger graphs (calibrated in slices, :mod:`.collect`) are not scored end to end: the per-layer gate decides.
_E2E_MAX_NODES = 4000


def _worst_relative(noise: np.ndarray, signal: np.ndarray) -> np.ndarray:
    """[labels, folds]: each fold's relative error at its worst output (outputs without signal left out)."""
    live = signal.sum(axis=0) > 0
    if not live.any():
        return noise[:, :, 0]
    return (noise[:, :, live] / np.maximum(signal[:, live], 1e-30)).max(axis=2)


def pick_end_to_end(labels: Sequence[str], noise: np.ndarray, signal: np.ndarray, screened: Sequence[str],
                    baseline: str) -> tuple[str, dict]:
    """The model's fixed method from its held-out error at the outputs (:meth:`AutoSelector._end_to_end`: ``noise``
    [labels, folds, outputs], NaN where a method was not run; ``signal`` [folds, outputs]; ``screened``: the methods
    not run past the first batches): :func:`gate` on each fold's worst-output relative error of the others, on the
    folds the baseline ran on, so a method replaces ``baseline`` only where it does better on the folds
    consistently. The evidence has each method's held-out worst-output SQNR gain over the baseline on the folds it
    ran on (errors summed over them, as ``benchmarks/accuracy.py`` scores evaluation data)."""
    from qdqsurgeon.check import sqnr_db

    labels = list(labels)
    b = labels.index(baseline)
    done = ~np.isnan(noise[:, :, 0])
    folds = done[b]
    live = signal[folds].sum(axis=0) > 0

    def worst(c: int, on: np.ndarray) -> float:
        return min((sqnr_db(float(s), float(e)) for s, e in
                    zip(signal[on].sum(axis=0)[live], noise[c][on].sum(axis=0)[live])), default=0.0)

    gain = {k: worst(c, done[c]) - worst(b, done[c]) for c, k in enumerate(labels) if c != b and done[c].any()}
    compared = [c for c, k in enumerate(labels) if k not in screened and done[c][folds].all()]
    if compared == [b]:
        return baseline, {"folds": int(folds.sum()), "reason": "end to end: no method better on the first folds",
                          "gain_db": gain}
    errors = _worst_relative(noise[compared][:, folds], signal[folds])
    choice, evidence = gate([labels[c] for c in compared], errors, baseline)
    return choice, {**evidence, "reason": f"end to end: {evidence['reason']}", "gain_db": gain}


def _fake_quant_copy(model: onnx.ModelProto, tensors: Sequence[str],
                     weights: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` with QuantizeLinear/DequantizeLinear (int8, symmetric) on ``tensors``, their scales graph
    inputs (returned, in order), and the initializers in ``weights`` replaced by those values."""
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for init in g.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(weights[init.name], init.name))
    zero = "__auto_e2e_zero_point"
    g.initializer.append(numpy_helper.from_array(np.zeros((), np.int8), zero))
    scales = {t: f"__auto_e2e_scale_{i}" for i, t in enumerate(tensors)}
    renamed = {t: f"{t}__auto_e2e_dq" for t in tensors}

    def pair(t: str) -> list[onnx.NodeProto]:
        return [helper.make_node("QuantizeLinear", [t, scales[t], zero], [f"{t}__auto_e2e_q"]),
                helper.make_node("DequantizeLinear", [f"{t}__auto_e2e_q", scales[t], zero], [renamed[t]])]

    produced = {o for n in g.node for o in n.output}
    nodes = [n for t in tensors if t not in produced for n in pair(t)]  # graph inputs first
    for node in g.node:
        for k, name in enumerate(node.input):
            if name in renamed:
                node.input[k] = renamed[name]
        nodes.append(node)
        nodes += [n for o in node.output if o in scales for n in pair(o)]
    new = [onnx.NodeProto() for _ in nodes]
    for a, b in zip(new, nodes):
        a.CopyFrom(b)
    del g.node[:]
    g.node.extend(new)
    g.input.extend(helper.make_tensor_value_info(scales[t], onnx.TensorProto.FLOAT, []) for t in tensors)
    return out, [scales[t] for t in tensors]


def _check_finite(stats: TensorStats, graph_input: bool) -> None:
    """What collect_stats checks of the statistics it accumulates, for those merged from per-fold ones."""
    from qdqsurgeon.errors import DataError

    if stats.nonfinite and stats.count == 0:
        where = "calibration input" if graph_input else "tensor (computed from the calibration data)"
        raise DataError(f"{where} {stats.name!r} has no finite values ({stats.nonfinite} NaN/inf): check the calibration data")
    if stats.nonfinite:
        logger.warning("%s: ignored %d non-finite value(s)", stats.name, stats.nonfinite)


def _fake_quant(x: np.ndarray, amax: float) -> np.ndarray:
    """Symmetric int8 fake quantization with scale ``amax / 127`` (as QuantizeLinear/DequantizeLinear)."""
    from qdqsurgeon.quant import scale_from_amax

    s = np.float32(scale_from_amax(amax))
    return np.clip(np.rint(x / s), -128, 127) * s


def _fake_quant_weight(w: np.ndarray, axis: int | None) -> np.ndarray:
    from qdqsurgeon.quant import fake_quant, weight_scales

    return fake_quant(w, weight_scales(w, axis), axis)


def layer_error(rows: np.ndarray, wq: np.ndarray, ref: np.ndarray, amaxes: Sequence[float],
                fold: np.ndarray | None = None, folds: int = 1) -> np.ndarray:
    """Relative squared error of a layer output for each of ``amaxes``.

    ``rows`` [G, P, K] are input rows (im2col patches per group), ``wq`` [G, K, O] the fake-quantized
    weight, ``ref`` [G, P, O] the float output; the rows are fake-quantized at each amax in turn.
    All candidates of an ungrouped layer go through one matrix product. With ``fold`` (the fold of
    each of the P rows) the result is [len(amaxes), folds]: each fold's share of the error, relative
    to the energy of all rows, so the folds sum to the total.
    """
    from qdqsurgeon.quant import scale_from_amax

    energy = max(float(np.sum(np.square(ref, dtype=np.float64))), 1e-30)
    scales = scale_from_amax(np.asarray(amaxes, dtype=np.float64)).reshape(-1, 1, 1, 1)
    per_row = np.empty((len(amaxes), rows.shape[1]))
    if rows.shape[0] == 1:
        q = np.clip(np.rint(rows[np.newaxis] / scales), -128, 127) * scales  # [C, 1, P, K]
        got = (q.reshape(-1, rows.shape[2]) @ wq[0]).reshape(len(amaxes), rows.shape[1], -1)
        diff = got - ref[0]
        per_row[:] = np.einsum("cpo,cpo->cp", diff, diff, dtype=np.float64)
    else:
        for i, amax in enumerate(amaxes):
            diff = _matmul(_fake_quant(rows, amax), wq) - ref
            per_row[i] = np.einsum("gpo,gpo->p", diff, diff, dtype=np.float64)
    if fold is None:
        return per_row.sum(axis=1) / energy
    out = np.zeros((len(amaxes), folds))
    for f in range(folds):
        out[:, f] = per_row[:, fold == f].sum(axis=1)
    return out / energy


def _matmul(rows: np.ndarray, w: np.ndarray) -> np.ndarray:
    # Depthwise convs are thousands of [P, K] @ [K, 1] products: a broadcast multiply-sum is faster.
    if w.shape[2] == 1 and w.shape[0] > 1:
        return np.einsum("gpk,gk->gp", rows, w[:, :, 0])[:, :, np.newaxis]
    if w.shape[0] <= 8:  # a stacked np.matmul is several times slower than one BLAS call per group
        return np.stack([r @ g for r, g in zip(rows, w)])
    return np.matmul(rows, w)


@dataclass
class _Reader:
    """A weighted layer reading the tensor: its weight as [G, K, O] and how to cut input rows."""

    node: str
    kind: str  # "conv" or "dense"
    w: np.ndarray  # [G, K, O] float32 (output channels possibly subsampled)
    wq: np.ndarray  # the same, fake-quantized per output channel as insert-qdq does
    rows_wanted: int
    conv: dict = field(default_factory=dict)  # kernel, strides, pads, dilations, group
    transpose: bool = False  # Gemm transA
    samples: list[np.ndarray] = field(default_factory=list)
    sample_folds: list[int] = field(default_factory=list)
    have: int = 0
    batches: int = 0
    rows: np.ndarray | None = None
    ref: np.ndarray | None = None
    fold: np.ndarray | None = None  # the fold of each row (the calibration batch it came from, mod the folds)

    def observe(self, x: np.ndarray, rng: np.random.Generator, per_batch: int, folds: int = 1) -> None:
        batch = self.batches
        self.batches += 1
        if self.have >= self.rows_wanted:
            return
        take = min(per_batch, self.rows_wanted - self.have)
        rows = self._conv_rows(x, rng, take) if self.kind == "conv" else self._dense_rows(x, rng, take)
        if rows is not None and rows.shape[1]:
            self.samples.append(rows)
            self.sample_folds.append(batch % folds)
            self.have += rows.shape[1]

    def _dense_rows(self, x: np.ndarray, rng: np.random.Generator, take: int) -> np.ndarray | None:
        x = np.asarray(x, dtype=np.float32)
        if self.transpose:
            x = x.T
        k = self.w.shape[1]
        if x.ndim == 0 or x.shape[-1] != k:
            return None
        flat = x.reshape(-1, k)
        return flat[np.sort(rng.integers(0, flat.shape[0], size=take))][np.newaxis]

    def _conv_rows(self, x: np.ndarray, rng: np.random.Generator, take: int) -> np.ndarray | None:
        c = self.conv
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 3:  # Conv1D as 2-D with height 1
            x = x[:, :, np.newaxis, :]
        if x.ndim != 4:
            return None
        n, ch, h, wd = x.shape
        kh, kw = c["kernel"]
        sh, sw = c["strides"]
        dh, dw = c["dilations"]
        pt, pl, pb, pr = _pads(c, h, wd)
        oh = (h + pt + pb - (dh * (kh - 1) + 1)) // sh + 1
        ow = (wd + pl + pr - (dw * (kw - 1) + 1)) // sw + 1
        if oh <= 0 or ow <= 0:
            return None
        total = n * oh * ow
        pos = np.sort(rng.integers(0, total, size=take))  # with replacement: no permutation of every position
        bi, rest = np.divmod(pos, oh * ow)
        yi, xi = np.divmod(rest, ow)
        rows_idx = (yi * sh)[:, None] + np.arange(kh) * dh - pt  # [P, kh], in unpadded coordinates
        cols_idx = (xi * sw)[:, None] + np.arange(kw) * dw - pl  # [P, kw]
        inside = ((rows_idx >= 0) & (rows_idx < h))[:, :, None] & ((cols_idx >= 0) & (cols_idx < wd))[:, None, :]
        # Advanced indices on batch, row and column around the channel slice: [P, kh, kw, C], indices P*kh*kw.
        patches = x[bi[:, None, None], :, np.clip(rows_idx, 0, h - 1)[:, :, None], np.clip(cols_idx, 0, wd - 1)[:, None, :]]
        patches *= inside[:, :, :, None]  # zero padding
        patches = patches.transpose(0, 3, 1, 2)  # [P, C, kh, kw]
        g = c["group"]
        return patches.reshape(len(pos), g, -1).transpose(1, 0, 2)  # [G, P, K]

    def finish(self) -> bool:
        """Stack the samples and compute their float output; False when nothing was sampled."""
        if not self.samples:
            return False
        self.fold = np.concatenate([np.full(r.shape[1], f) for r, f in zip(self.samples, self.sample_folds)])
        self.rows = np.concatenate(self.samples, axis=1)
        self.ref = _matmul(self.rows, self.w)
        self.samples = []
        return True

    def errors_by_fold(self, amaxes: np.ndarray) -> np.ndarray:
        """[C, F]: fold f's share of the relative output error with fold f's own candidates ``amaxes[f]``."""
        assert self.rows is not None and self.ref is not None and self.fold is not None
        total = max(float(np.sum(np.square(self.ref, dtype=np.float64))), 1e-30)
        out = np.zeros((amaxes.shape[1], amaxes.shape[0]))
        for f in range(amaxes.shape[0]):
            at = self.fold == f
            if at.any():
                ref = self.ref[:, at]
                share = float(np.sum(np.square(ref, dtype=np.float64))) / total
                out[:, f] = layer_error(self.rows[:, at], self.wq, ref, amaxes[f]) * share
        return out

    def errors(self, amaxes: Sequence[float], folds: int = 1) -> np.ndarray:
        """Relative output error on the sampled rows for each amax, per fold: [len(amaxes), folds]."""
        assert self.rows is not None and self.ref is not None
        return layer_error(self.rows, self.wq, self.ref, amaxes, self.fold, folds)


def _pads(c: dict, h: int, w: int) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) padding, resolving ``auto_pad`` SAME_UPPER/SAME_LOWER."""
    auto = c["auto_pad"]
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        out = []
        for size, k, s, d in ((h, *c["kernel"][:1], c["strides"][0], c["dilations"][0]),
                              (w, c["kernel"][1], c["strides"][1], c["dilations"][1])):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small = total // 2
            out.append((small, total - small) if auto == "SAME_UPPER" else (total - small, small))
        (t, b), (l, r) = out
        return t, l, b, r
    if auto == "VALID":
        return 0, 0, 0, 0
    return tuple(c["pads"])  # type: ignore[return-value]


def _make_reader(node, tensor_name: str, rng: np.random.Generator, convtranspose_axis: int | None) -> _Reader | None:
    """A :class:`_Reader` for a weighted ``node`` whose activation input is ``tensor_name``; None if not handled."""
    from qdqsurgeon.graph import activation_input_index, weight_input_index
    from qdqsurgeon.passes.insert_qdq import _folded_weight
    from qdqsurgeon.trt_rules import is_weighted, weight_axis

    if node.op not in ("Conv", "Gemm", "MatMul") or not is_weighted(node):
        return None
    widx = weight_input_index(node)
    aidx = activation_input_index(node)
    if widx is None or node.inputs[aidx].name != tensor_name or (node.op == "MatMul" and widx != 1):
        return None  # a constant left operand (W @ x) is scored per tensor
    w = _folded_weight(node.inputs[widx])
    if w is None or w.dtype.kind != "f":
        return None
    w = np.asarray(w, dtype=np.float32)
    axis = weight_axis(node, convtranspose_axis=convtranspose_axis)
    wq = _fake_quant_weight(w, axis)
    if node.op == "Conv":
        if w.ndim == 3:
            w, wq = w[:, :, np.newaxis, :], wq[:, :, np.newaxis, :]
        if w.ndim != 4:
            return None
        group = int(node.attrs.get("group", 1))
        nd = 2 if len(node.inputs[widx].shape or w.shape) != 3 else 1
        kernel = list(w.shape[2:])
        strides = list(node.attrs.get("strides", [1] * nd))
        dilations = list(node.attrs.get("dilations", [1] * nd))
        pads = list(node.attrs.get("pads", [0] * (2 * nd)))
        if nd == 1:
            strides, dilations, pads = [1, *strides], [1, *dilations], [0, pads[0], 0, pads[1]]
        else:
            pads = [pads[0], pads[1], pads[2], pads[3]]
        auto_pad = node.attrs.get("auto_pad", "NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        cout = w.shape[0]
        og = cout // group
        k = w.shape[1] * kernel[0] * kernel[1]

        def grouped(a: np.ndarray) -> np.ndarray:
            return a.reshape(group, og, k).transpose(0, 2, 1)  # [G, K, O]

        wg, wqg = grouped(w), grouped(wq)
        if group == 1 and og > _MAX_CHANNELS:
            keep = np.sort(rng.choice(og, size=_MAX_CHANNELS, replace=False))
            wg, wqg = wg[:, :, keep], wqg[:, :, keep]
        rows = int(np.clip(_ELEMENTS // max(1, k * group), _MIN_ROWS, _MAX_ROWS))
        conv = {"kernel": kernel, "strides": strides, "dilations": dilations, "pads": pads, "auto_pad": auto_pad,
                "group": group}
        return _Reader(node.name, "conv", np.ascontiguousarray(wg), np.ascontiguousarray(wqg), rows, conv)
    # Gemm / MatMul: y = x @ W with W [K, O] (Gemm transB: W stored [O, K]).
    if w.ndim != 2:
        return None
    transpose_a = node.op == "Gemm" and bool(int(node.attrs.get("transA", 0)))
    if node.op == "Gemm" and int(node.attrs.get("transB", 0)):
        w, wq = w.T, wq.T
    if w.shape[1] > _MAX_CHANNELS:
        keep = np.sort(rng.choice(w.shape[1], size=_MAX_CHANNELS, replace=False))
        w, wq = w[:, keep], wq[:, keep]
    rows = int(np.clip(_ELEMENTS // max(1, w.shape[0]), _MIN_ROWS, _MAX_ROWS))
    return _Reader(node.name, "dense", np.ascontiguousarray(w[np.newaxis]), np.ascontiguousarray(wq[np.newaxis]), rows,
                   transpose=transpose_a)


@dataclass
class _Pending:
    """What one pass collected for a tensor whose range is not chosen yet."""

    stats: TensorStats
    readers: list[_Reader]
    folds: list[TensorStats] | None = None  # per-fold histograms (None with one fold)


class AutoSelector:
    """Plans, collects and chooses ``auto`` ranges for one float model; reusable across requests.

    The graph analysis (readers, tied groups) is done once; each :meth:`select` call streams the data
    once for the tensors it needs. Ranges decided for a tied group are remembered for all its members,
    so a later request for another member gets the same range.
    """

    def __init__(self, model: onnx.ModelProto, *, convtranspose_axis: int | None = 1, seed: int = 0,
                 percentile: float = 99.99, folds: int = 8) -> None:
        from qdqsurgeon.graph import import_model, is_graph_output
        from qdqsurgeon.passes.align_scales import tied_groups
        from qdqsurgeon.trt_rules import is_shape_op, is_weighted

        self.model = model
        self.seed = seed
        self.percentile = float(percentile)
        self.baseline = f"percentile {self.percentile:g}"
        self.max_folds = max(1, int(folds))
        self.folds = 1
        self.evidence: dict[str, dict] = {}  # tensor -> what the gate saw (for the log / tests)
        self.model_choice: str | None = None  # the fixed method the tensors keep without evidence of their own
        self.model_evidence: dict = {}
        self._scores: dict = {}
        self._held: dict = {}
        self._fold_found: dict[tuple[str, int], dict[str, float]] = {}  # (tensor, fold) -> candidates found without it
        self._first_request: list[str] | None = None  # the tensors the placement quantizes for sure (weighted inputs)
        self._data = None
        self._reference: dict[str, list[np.ndarray]] | None = None  # float outputs per calibration batch
        self._outputs: list[str] = []
        self._runnable: onnx.ModelProto = model
        self.convtranspose_axis = convtranspose_axis
        try:
            graph = import_model(model)
            # The placement passes see the graph without Identity nodes (remove-identity runs first):
            # so must the analysis, or a Paddle bias Add's Identity hides the conv that reads it.
            from qdqsurgeon.passes.base import PassContext
            from qdqsurgeon.passes.remove_identity import RemoveIdentity

            RemoveIdentity()(graph, PassContext())
        except Exception as exc:  # the fallback is the plain per-tensor choice, never a failure
            logger.warning("auto calibration: cannot analyse the graph (%s); ranges are chosen per tensor", exc)
            graph = None
        self._graph = graph
        self._group_of: dict[str, int] = {}
        self._groups: list[list[str]] = []
        self._weighted_readers: dict[str, list] = {}
        self._plain_readers: dict[str, bool] = {}
        self.decided: dict[str, float] = {}
        self._pending: dict[str, _Pending] = {}  # collected, not yet asked for
        self._prefetched = False
        self._graph_inputs = {i.name for i in model.graph.input}
        self.chosen: dict[str, str] = {}  # tensor -> which candidate won (for the log / tests)
        if graph is None:
            return
        tensors = graph.tensors()
        for group in tied_groups(graph):
            names = [t.name for t in group if t.name]
            if len(names) > 1:
                for n in names:
                    self._group_of[n] = len(self._groups)
                self._groups.append(names)
        for name, t in tensors.items():
            readers = list(t.outputs)
            members = set(self._groups[self._group_of[name]]) if name in self._group_of else set()
            weighted = [n for n in readers if is_weighted(n)]
            self._weighted_readers[name] = weighted
            plain = [n for n in readers if n not in weighted and not is_shape_op(n)
                     and not (n.outputs and all(o.name in members for o in n.outputs))]
            self._plain_readers[name] = bool(plain) or is_graph_output(graph, t)

    def members(self, name: str) -> list[str]:
        """The tensors tied with ``name`` (itself included) that take part in choosing its range."""
        if name not in self._group_of:
            return [name]
        return self._groups[self._group_of[name]]

    def select(self, tensors: Sequence[str], data, *, num_bins: int = 2048, progress: bool = True) -> dict[str, float]:
        """Ranges for ``tensors`` (and the other members of their tied groups).

        The first call streams the data once for the tensors asked for, the members of their tied
        groups, and the tensors the placement passes ask for later (residual skips, pooling and
        pointwise inputs), whose ranges are then chosen when asked for, without another pass.
        """
        todo = [n for n in dict.fromkeys(tensors) if n not in self.decided]
        fresh = [n for n in todo if n not in self._pending]
        if self._first_request is None:
            self._first_request = list(todo)
        if fresh:
            wanted = list(fresh)
            if not self._prefetched:
                wanted += self._later_requests()
                self._prefetched = True
            for n in list(wanted):  # every member: kept at the baseline, each keeps its own range
                wanted += [m for m in self.members(n) if m != n]
            self._collect([m for m in dict.fromkeys(wanted) if m not in self.decided and m not in self._pending],
                          data, num_bins, progress)
        self._choose([n for n in todo if n in self._pending])
        return {n: self.decided[n] for n in tensors if n in self.decided}

    def _later_requests(self) -> list[str]:
        """Tensors quantize-residual and quantize-pooling may ask ranges for (skip inputs, wrapped ops' inputs)."""
        if self._graph is None:
            return []
        import onnx_graphsurgeon as gs

        from qdqsurgeon.graph import is_float_dtype
        from qdqsurgeon.qdq import wraps_standalone
        from qdqsurgeon.trt_rules import data_input_indices

        out = []
        for node in self._graph.nodes:
            if node.op == "Add" or wraps_standalone(node):
                # every Add input: which side is the skip is decided on the placed graph, not this one
                out += [node.inputs[i] for i in data_input_indices(node) if node.inputs[i] is not None]
        return [t.name for t in out if t.name and not isinstance(t, gs.Constant) and is_float_dtype(t.dtype)]

    def _collect(self, wanted: list[str], data, num_bins: int, progress: bool) -> None:
        """One pass over ``data``: statistics and reader samples of ``wanted``, each kept per fold."""
        from qdqsurgeon.calibration.collect import collect_stats

        if not wanted:
            return
        rng = np.random.default_rng(self.seed)
        readers: dict[str, list[_Reader]] = {}
        for m in wanted:
            made = [_make_reader(node, m, rng, self.convtranspose_axis) for node in self._weighted_readers.get(m, [])]
            readers[m] = [r for r in made if r is not None]
        n_batches = len(data) if hasattr(data, "__len__") else 8
        folds = self.folds = max(1, min(self.max_folds, n_batches))
        batch_rng = np.random.default_rng(self.seed + 1)
        # Every tensor keeps one histogram per fold: the gate needs its own error per fold, and candidates
        # found without each fold to score them on it.
        fold_stats = {m: [TensorStats(m, histogram=True, num_bins=num_bins) for _ in range(folds)]
                      for m in wanted if folds > 1}
        seen = dict.fromkeys(fold_stats, 0)
        reference = None
        if self._reference is None and folds >= MIN_FOLDS:  # the first pass keeps them for the end-to-end score
            self._data = data
            reference = self._reference = {}
            self._outputs = self._runnable_outputs()

        def observe(name: str, value: np.ndarray) -> None:
            if reference is not None and name in self._outputs:
                kept = reference.setdefault(name, [])
                if len(kept) < _E2E_BATCHES:
                    kept.append(np.asarray(value))
            for r in readers.get(name, ()):
                r.observe(value, batch_rng, max(1, math.ceil(r.rows_wanted / max(1, n_batches))), folds)
            if name in fold_stats:
                fold_stats[name][seen[name] % folds].update(value)
                seen[name] += 1

        # The per-fold histograms are the data: a tensor's whole histogram is their merge (exact, and the
        # same as one accumulated in one go: bin widths are powers of two), so none is computed twice.
        stats = collect_stats(self.model, wanted, data, histogram=True, num_bins=num_bins, progress=progress,
                              observe=observe, accumulate=not fold_stats, outputs=reference is not None)
        for name, st in list(stats.items()):
            parts = fold_stats.get(name)
            if parts is not None and st.count == 0:  # initializers are read whole, not per batch
                for part in parts:
                    st = st.merged(part)
                stats[name] = st
                _check_finite(st, name in self._graph_inputs)
        for name, st in stats.items():
            self._pending[name] = _Pending(st, [r for r in readers.get(name, []) if r.finish()], fold_stats.get(name))

    def _choose(self, todo: list[str]) -> None:
        pend = self._pending
        if self.model_choice is None:
            self._first_choice()
        base = self.model_choice
        for name in todo:
            if name in self.decided:
                continue
            group, own, labels, cands, errors = self._scored(name)
            best, evidence = self._pick(name, base)
            self.evidence[name] = evidence
            for m in group:
                # Kept at the baseline, each member keeps its own value: align-scales then ties the group
                # exactly as it does under that fixed method.
                self.decided[m] = float(cands[best] if best != base else own[m].get(base, own[m]["max"]))
                self.chosen[m] = best
                pend.pop(m, None)
            if len(group) > 1:
                logger.debug("auto: tied group of %d (%s ...): %s, amax %.6g", len(group), name, best, cands[best])

    def _first_choice(self) -> None:
        """The fixed method the model's tensors keep without evidence of their own, from every tensor collected.

        First end to end where that can run (:meth:`_end_to_end`): each fixed method's ranges, found on the other
        folds, put on the placement's first request in a fake-quantized copy of the model, scored by the
        worst-output error on each held-out fold, and the gate over the folds decides (:func:`pick_end_to_end`).
        Where no method passes there (or the copy cannot run), the gate on the per-layer errors summed over the
        model's tensors, proposed on the errors of candidates found on all the data and confirmed on held-out errors
        (:meth:`_per_layer_choice`); its pick stands unless the held-out outputs put it below the baseline.
        """
        pend = self._pending
        firsts = {self._group_of.get(n, n): n for n in reversed(list(pend)) if n not in self.decided}
        scored = {n: self._scored(n) for n in firsts.values()}
        labels = max((sc[2] for sc in scored.values()), key=len, default=[self.baseline])
        full = [sc for sc in scored.values() if sc[2] == labels]
        fixed = [k for k in ("max", self.baseline, "mse", "entropy") if k in labels]
        e2e = self._end_to_end(fixed) if full and self.folds >= MIN_FOLDS and self.baseline in fixed else None
        choice, evidence = pick_end_to_end(fixed, *e2e, self.baseline) if e2e is not None else (self.baseline, {})
        if choice == self.baseline and full:
            # The per-layer gate, as without the end-to-end score; its pick stands unless the held-out outputs say it is
            # worse than the baseline (the per-layer error undervalues clipping, whose error the next layers add up).
            layer, layer_evidence = self._per_layer_choice(labels, scored)
            if layer != self.baseline and evidence.get("gain_db", {}).get(layer, math.inf) < 0:
                evidence = {**evidence, "reason": f"per-layer pick {layer} worse end to end", "per_layer": layer_evidence}
            elif layer != self.baseline or not evidence:
                choice, evidence = layer, {**layer_evidence, **({"end_to_end": evidence} if evidence else {})}
        self.model_choice, self.model_evidence = choice, evidence
        ev = self.model_evidence
        logger.info("auto calibration: the model keeps %s (%s; %d calibration folds%s)", self.model_choice,
                    ev.get("reason", "no evidence"), self.folds,
                    f", {ev.get('best_other', self.model_choice)} t = {ev['t']:.2f}" if "t" in ev else
                    "".join(f", {k} {v:+.2f} dB" for k, v in ev.get("gain_db", {}).items()))

    def _per_layer_choice(self, labels: list[str], scored: dict) -> tuple[str, dict]:
        """The gate on the per-layer errors summed over the model's tensors, confirmed on held-out errors."""
        full = [sc for sc in scored.values() if sc[2] == labels]
        total = sum((sc[4] for sc in full), np.zeros((len(labels), self.folds)))
        choice, evidence = gate(labels, total, self.baseline)
        if choice == self.baseline:
            return choice, evidence
        pair = [self.baseline, choice]
        held = sum((self._held_out(n, pair) for n, sc in scored.items() if sc[2] == labels), np.zeros((2, self.folds)))
        confirmed, held_evidence = gate(pair, held, self.baseline)
        return confirmed, {**held_evidence, "in_sample": evidence}

    def _runnable_outputs(self) -> list[str]:
        """The float outputs of the model onnxruntime runs in calibration (constant Ifs inlined, cut at plugins)."""
        from qdqsurgeon.calibration.collect import cut_at_plugins, has_bfloat16, inline_constant_ifs

        if self._graph is None or has_bfloat16(self.model) or len(self.model.graph.node) > _E2E_MAX_NODES:
            return []
        try:
            self._runnable = cut_at_plugins(inline_constant_ifs(self.model))[0]
        except Exception as exc:  # noqa: BLE001 - no end-to-end score, the per-layer one decides
            logger.debug("auto calibration: no end-to-end score (%s)", exc)
            return []
        produced = {o for n in self._runnable.graph.node for o in n.output}
        return [o.name for o in self._runnable.graph.output
                if o.name in produced and o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]

    def _end_to_end(self, labels: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
        """Held-out error at the model's outputs of each fixed method (``labels``, the baseline among them):
        (noise [labels, folds, outputs], NaN where a method was not run; signal [folds, outputs]; the methods
        screened out), or None where it cannot run.

        A copy of the float model gets Q/DQ on the tensors the placement asked for first (the weighted layers'
        inputs) and those layers' weights fake-quantized as insert-qdq quantizes them; its scales are inputs, so one
        session runs every method. Calibration batch *i* (of the first :data:`_E2E_BATCHES`) runs with the ranges
        each method finds on the folds other than *i* mod k, and is compared with the float outputs the statistics
        pass kept: a method that fits the batches it was found on and not the next pays for it, as on new data.
        After the first :data:`_E2E_SCREEN` batches, a method with no less error than the baseline on them (on
        average, worst output per batch) is not run further: it cannot pass the gate but by a rare fluke, and each
        method run costs a pass of the model over the data.
        """
        from qdqsurgeon.calibration.collect import make_session
        from qdqsurgeon.quant import scale_from_amax

        ref, outs = self._reference or {}, [o for o in self._outputs if (self._reference or {}).get(o)]
        counts = {len(ref[o]) for o in outs}
        tensors = [t for t in dict.fromkeys(self._first_request or []) if t in self._pending]
        known = self._graph.tensors() if self._graph is not None else {}
        # collected, so float; untyped (no shape inference on the analysis graph) taken as float32: a float16 tensor's
        # Q/DQ then fails in onnxruntime, and the per-layer score decides
        tensors = [t for t in tensors if t in known and (known[t].dtype is None or np.dtype(known[t].dtype) == np.float32)]
        if not outs or len(counts) != 1 or not tensors or self._data is None:
            return None
        n = counts.pop()
        folds = self.folds
        base = labels.index(self.baseline)
        try:
            copy, scale_names = _fake_quant_copy(self._runnable, tensors, self._fake_quant_weights(set(tensors)))
            # Without graph optimizations: with them, Q/DQ whose scales are inputs came out far from the Q/DQ arithmetic
            # (8 dB against 17.7 on EfficientNet-Lite0's calibration data). One thread: a second one mostly spins.
            session = make_session(copy, optimize=False, threads=1)
            feeds = [i.name for i in session.get_inputs() if i.name not in set(scale_names)]
            groups = [self._scored(t)[0] for t in tensors]
            scales: dict[tuple[int, int], np.ndarray] = {}  # (fold, method) -> scale of each tensor, found without it

            def fold_scales(f: int, methods: list[int]) -> None:
                missing = [c for c in methods if (f, c) not in scales]
                if missing:
                    amax = np.array([self._fold_candidates(g, [labels[c] for c in missing], f) for g in groups])
                    scales.update({(f, c): scale_from_amax(amax[:, k]) for k, c in enumerate(missing)})

            noise = np.zeros((len(labels), folds, len(outs)))
            signal = np.zeros((folds, len(outs)))
            ran = np.zeros((len(labels), folds), dtype=bool)
            alive = list(range(len(labels)))
            for i, batch in enumerate(self._data):
                if i >= n:
                    break
                f = i % folds
                fold_scales(f, alive)
                feed = {k: batch[k] for k in feeds}
                want = [np.asarray(ref[o][i], dtype=np.float64) for o in outs]
                signal[f] += [float(np.sum(r * r)) for r in want]
                for c in alive:
                    got = session.run(outs, {**feed, **{s: np.asarray(v) for s, v in zip(scale_names, scales[f, c])}})
                    noise[c, f] += [float(np.sum(np.square(r - g, dtype=np.float64))) for r, g in zip(want, got)]
                    ran[c, f] = True
                if i + 1 == _E2E_SCREEN and folds > _E2E_SCREEN:
                    rel = _worst_relative(noise[:, :_E2E_SCREEN], signal[:_E2E_SCREEN])
                    alive = [c for c in alive if c == base or np.mean(rel[base] - rel[c]) > 0]
                    if alive == [base]:
                        break
        except Exception as exc:  # noqa: BLE001 - onnxruntime cannot run the copy: the per-layer score decides
            logger.debug("auto calibration: the end-to-end score could not run", exc_info=True)
            logger.info("auto calibration: no end-to-end score (%s)", str(exc).splitlines()[0][:160] if str(exc) else
                        type(exc).__name__)
            return None
        if not ran[base].any():  # data that cannot be read twice (a generator): nothing to score
            return None
        noise[~ran] = np.nan
        return noise, signal, [labels[c] for c in range(len(labels)) if c not in alive]

    def _fake_quant_weights(self, quantized: set[str]) -> dict[str, np.ndarray]:
        """{initializer: fake-quantized value} of the weights of the weighted layers reading ``quantized`` tensors."""
        import onnx_graphsurgeon as gs

        from qdqsurgeon.graph import activation_input_index, weight_input_index
        from qdqsurgeon.trt_rules import is_weighted, weight_axis

        inits = {t.name for t in self._runnable.graph.initializer}
        out: dict[str, np.ndarray] = {}
        clash: set[str] = set()
        for node in self._graph.nodes if self._graph is not None else ():
            if not is_weighted(node) or node.inputs[activation_input_index(node)].name not in quantized:
                continue
            widx = weight_input_index(node)
            w = node.inputs[widx] if widx is not None else None
            if not isinstance(w, gs.Constant) or w.name not in inits or np.dtype(w.values.dtype) != np.float32:
                continue
            wq = _fake_quant_weight(np.asarray(w.values), weight_axis(node, convtranspose_axis=self.convtranspose_axis))
            if w.name in out and not np.array_equal(out[w.name], wq):
                clash.add(w.name)  # shared by layers quantized on different axes: left float
            out[w.name] = wq.astype(np.float32)
        return {k: v for k, v in out.items() if k not in clash}

    def _pick(self, name: str, base: str) -> tuple[str, dict]:
        """``name``'s candidate: proposed by the gate on the per-fold errors of candidates found on all the data,
        confirmed by the gate on held-out errors (:meth:`_held_out`, computed only for a proposed departure)."""
        _group, _own, labels, _cands, errors = self._scored(name)
        best, evidence = gate(labels, errors, base)
        if best == base or base not in labels:
            return best, evidence
        pair = [base, best]
        best, held = gate(pair, self._held_out(name, pair), base)
        if best == base:
            held["reason"] = "not confirmed held out"
        return best, {**held, "in_sample": evidence}

    def _scored(self, name: str) -> tuple:
        """(members, their own candidates, labels, the group's candidates, errors [labels, folds]) of ``name``'s group."""
        key = self._group_of.get(name, name)
        if key in self._scores and all(m in self._pending for m in self._scores[key][0]):
            return self._scores[key]
        pend = self._pending
        group = [m for m in self.members(name) if m in pend and m not in self.decided]
        if name not in group:
            group.append(name)
        # Every candidate is what the fixed method of that name gives the group: each member's own
        # value, the largest taken (as align-scales does for a group calibrated per tensor).
        own = {m: candidate_ranges(pend[m].stats, extra=(self.percentile,)) for m in group}
        labels = list(own[name])
        cands = {k: max(own[m].get(k, own[m]["max"]) for m in group) for k in labels}
        errors = np.zeros((len(labels), self.folds))
        for m in group:
            errors += self._member_error(m, [cands[k] for k in labels])
        self._scores[key] = (group, own, labels, cands, errors)
        return self._scores[key]

    def _member_error(self, name: str, cands) -> np.ndarray:
        """Relative error per candidate and fold, [len(cands), folds]: at ``name``'s weighted readers, and
        of the tensor itself when other ops read it (or nothing weighted does). ``cands``: one amax per
        candidate, or [folds, candidates] for each fold's own (held out: found without that fold)."""
        p = self._pending[name]
        cands = np.asarray(cands, dtype=np.float64)
        per_fold = cands.ndim == 2
        err = np.zeros((cands.shape[-1], self.folds))
        for r in p.readers:
            err += r.errors_by_fold(cands) if per_fold else r.errors(cands, self.folds)
        if not p.readers or self._plain_readers.get(name, True):
            energy = hist_energy(p.stats) if p.stats.hist is not None and p.stats.width > 0 else 0.0
            if energy > 0:
                if p.folds is not None:
                    for f, st in enumerate(p.folds):
                        if st.width > 0:
                            err[:, f] += hist_sq_error(st, cands[f] if per_fold else cands) / energy
                else:  # one fold: no evidence, and the gate keeps the baseline anyway
                    err[:, 0] += hist_sq_error(p.stats, cands) / energy
        return err

    def _fold_candidates(self, group: list[str], labels: list[str], fold: int) -> list[float]:
        """The group's candidates (``labels``) found on every fold but ``fold``. Each member's are remembered: the
        end-to-end score and the held-out checks of departures ask for the same ones (the MSE and KL searches cost
        the most)."""
        own = {}
        for m in group:
            found = own[m] = self._fold_found.setdefault((m, fold), {})
            missing = [k for k in labels if k not in found]
            if not missing:
                continue
            p = self._pending[m]
            rest = [st for g, st in enumerate(p.folds or []) if g != fold and st.width > 0]
            merged = rest[0] if rest else p.stats
            for st in rest[1:]:
                merged = merged.merged(st)
            got = candidate_ranges(merged, only=missing, extra=(self.percentile,))
            for k in missing:  # a dead tensor has one candidate, its max
                found[k] = got[k] if k in got else got.get("max", amax_max(p.stats))
        return [max(own[m][k] for m in group) for k in labels]

    def _held_out(self, name: str, labels: list[str]) -> np.ndarray:
        """The errors of ``labels`` [len(labels), folds] as :meth:`_scored`'s, but each fold scored with the
        candidates found on the other folds (leave one fold out), so a candidate that fits the data it was
        found on and not the next pays for it. Only the candidates compared are found again (the MSE and KL
        searches cost the most)."""
        key = (self._group_of.get(name, name), tuple(labels))
        if key in self._held:
            return self._held[key]
        group = self._scored(name)[0]
        per_fold = np.array([self._fold_candidates(group, labels, f) for f in range(self.folds)])
        err = np.zeros((len(labels), self.folds))
        for m in group:
            err += self._member_error(m, per_fold)
        self._held[key] = err
        return err

