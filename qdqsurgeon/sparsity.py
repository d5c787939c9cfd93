"""2:4 structured sparsity: detect it, check TensorRT's conditions for sparse kernels, prune to it.

NVIDIA's Ampere/Hopper sparse Tensor Cores skip half the multiplications of a layer whose weight
has, in every group of 4 consecutive values along the *reduction* dimension (the input channels),
at least 2 zeros. This module answers, per weighted op with a constant weight:

- whether its weight has that pattern as the op sees it (after any DequantizeLinear, Transpose or
  Cast between the stored constant and the op), and which fraction of its groups do;
- whether TensorRT's other conditions hold (rules S1-S6 in ``docs/sparsity.md``, each with its
  source), so that the layer could run a sparse kernel when built with ``--sparsity``;
- the share of the weighted MACs that could run sparse.

:func:`sparsify` prunes eligible weights to the pattern by magnitude (the m4n2_1d mask of NVIDIA's
Automatic SParsity: in each group of 4 keep the 2 largest ``|w|``). Pruning without fine-tuning
costs accuracy; the usual path is prune + fine-tune in the training framework, then qdqsurgeon.

Weight layouts and reduction axes (S2):

=============  ==================  ==============
op             weight              reduction axis
=============  ==================  ==============
Conv           ``[K, C/g, R, S]``  1 (C)
ConvTranspose  ``[C, K/g, R, S]``  0 (C)
Gemm           ``[K, N]`` / ``[N, K]`` with ``transB``  0 / 1
MatMul         B ``[..., K, N]``   -2
=============  ==================  ==============
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .graph import (
    DQ_OP,
    Q_OP,
    WEIGHTED_OPS,
    activation_input_index,
    export_model,
    import_model,
    is_dq,
    np_dtype,
    producer,
    qparams,
    weight_input_index,
)
from .graph import infer_missing_shapes
from .quant import _bshape, dequantize
from .trt_rules import weight_axis

__all__ = [
    "GROUP",
    "LayerSparsity",
    "SparsityReport",
    "sparsity_report",
    "effective_weight",
    "reduction_axis",
    "group_stats",
    "m4n2_mask",
    "SparsifyResult",
    "sparsify",
]

logger = logging.getLogger(__name__)

GROUP = 4  # 2:4: at most 2 non-zeros in each group of 4 along the reduction axis
KEEP = 2
# Ops a weight passes through between its stored constant and the weighted op.
_CHAIN_OPS = (Q_OP, DQ_OP, "Transpose", "Identity", "Cast")
# Below these sizes TensorRT usually times a dense kernel faster (advisory, not a condition; S6:
# "sparse conv kernels are faster than dense conv kernels if C and K are large enough (>256)",
# NVIDIA/TensorRT#3849; "256 or above", #4065).
_FAST_REDUCTION = 256
_FAST_OUTPUTS = 256


# --------------------------------------------------------------------------------------------
# Where a weight's values live, and what the op sees


@dataclass
class _Source:
    holder: gs.Constant | gs.Node  # an initializer, or a Constant node whose ``value`` holds it
    chain: list[gs.Node]  # Q/DQ/Transpose/Identity/Cast nodes from the op back to the holder

    @property
    def values(self) -> np.ndarray:
        if isinstance(self.holder, gs.Constant):
            return np.asarray(self.holder.values)
        return np.asarray(self.holder.attrs["value"].values)

    def set_values(self, values: np.ndarray) -> None:
        if isinstance(self.holder, gs.Constant):
            self.holder.values = values
        else:
            self.holder.attrs["value"].values = values

    @property
    def shared(self) -> bool:
        """Read by more than one node: pruning it would change another layer too."""
        if isinstance(self.holder, gs.Constant):
            return len(self.holder.outputs) > 1
        return len(self.holder.outputs[0].outputs) > 1

    @property
    def forward(self) -> list[gs.Node]:
        return list(reversed(self.chain))


def _source(tensor: gs.Tensor) -> _Source | None:
    chain: list[gs.Node] = []
    t = tensor
    for _ in range(8):
        if isinstance(t, gs.Constant):
            return _Source(t, chain)
        node = producer(t)
        if node is None:
            return None
        if node.op == "Constant":
            return _Source(node, chain) if isinstance(node.attrs.get("value"), gs.Constant) else None
        if node.op not in _CHAIN_OPS or not node.inputs:
            return None
        chain.append(node)
        t = node.inputs[0]
    return None


def _quantize(x: np.ndarray, node: gs.Node) -> np.ndarray | None:
    qp = qparams(node)
    if qp is None or qp.blocked:
        return None
    dtype = np.dtype(qp.qdtype)
    info = np.iinfo(dtype) if dtype.kind in "iu" else None
    if info is None:
        return None  # float8 weights: not a TensorRT sparse precision anyway (S5)
    axis = qp.axis if qp.per_channel else None
    q = np.rint(np.asarray(x, np.float32) / _bshape(qp.scale.astype(np.float32), x.ndim, axis))
    if qp.zero_point is not None:
        q = q + _bshape(qp.zero_point.astype(np.float32), x.ndim, axis)
    return np.clip(q, info.min, info.max).astype(dtype)


def _evaluate(src: _Source) -> np.ndarray | None:
    v = src.values
    for node in src.forward:
        if node.op == Q_OP:
            v = _quantize(v, node)
        elif node.op == DQ_OP:
            qp = qparams(node)
            if qp is None:
                return None
            v = dequantize(v, qp.scale, qp.axis if qp.per_channel or qp.blocked else None, qp.zero_point, qp.block_size)
        elif node.op == "Transpose":
            perm = node.attrs.get("perm") or list(reversed(range(v.ndim)))
            v = np.transpose(v, perm)
        elif node.op == "Cast":
            v = v.astype(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
        if v is None:
            return None
    return v


def effective_weight(node: gs.Node) -> np.ndarray | None:
    """The weight of ``node`` as the op reads it (dequantized, transposed), or None if not constant."""
    idx = weight_input_index(node)
    if idx is None:
        return None
    src = _source(node.inputs[idx])
    return None if src is None else _evaluate(src)


def reduction_axis(node: gs.Node, weight_rank: int) -> int | None:
    """The axis of ``node``'s weight that its kernel reduces over (the groups of 4 run along it)."""
    idx = weight_input_index(node)
    if idx is None or weight_rank < 1:
        return None
    if node.op == "Conv":
        return 1
    if node.op == "ConvTranspose":
        return 0
    if node.op == "Gemm":
        return 1 if int(node.attrs.get("transB", 0)) else 0
    if node.op == "MatMul":
        if idx == 1:
            return weight_rank - 2 if weight_rank >= 2 else 0
        return weight_rank - 1  # a constant A: the reduction runs along its last axis
    return None


def _grouped(w: np.ndarray, axis: int) -> np.ndarray:
    """``w`` with ``axis`` moved last, zero-padded to a multiple of 4 and split into groups: ``[..., G, 4]``."""
    moved = np.moveaxis(np.asarray(w), axis, -1)
    pad = (-moved.shape[-1]) % GROUP
    if pad:
        moved = np.concatenate([moved, np.zeros(moved.shape[:-1] + (pad,), moved.dtype)], axis=-1)
    return moved.reshape(moved.shape[:-1] + (moved.shape[-1] // GROUP, GROUP))


def group_stats(w: np.ndarray, axis: int) -> tuple[int, int]:
    """(groups with at most 2 non-zeros, all groups) along ``axis`` (TensorRT's check, S1)."""
    g = _grouped(w, axis)
    nonzero = np.count_nonzero(g, axis=-1)
    return int(np.sum(nonzero <= KEEP)), int(nonzero.size)


def m4n2_mask(w: np.ndarray, axis: int) -> np.ndarray:
    """Boolean keep-mask of ``w``'s shape: in each group of 4 along ``axis``, the 2 largest ``|w|``.

    Ties keep the earlier position (a stable sort), so the mask is deterministic.
    """
    w = np.asarray(w, dtype=np.float32)
    g = np.abs(_grouped(w, axis))
    order = np.argsort(-g, axis=-1, kind="stable")
    keep = np.zeros(g.shape, dtype=bool)
    np.put_along_axis(keep, order[..., :KEEP], True, axis=-1)
    moved = keep.reshape(keep.shape[:-2] + (-1,))[..., : w.shape[axis]]
    return np.moveaxis(moved, -1, axis)


# --------------------------------------------------------------------------------------------
# TensorRT's conditions (docs/sparsity.md)


def _precision(node: gs.Node, src: _Source | None, w: np.ndarray | None) -> str:
    """The precision TensorRT would run ``node`` in under strong typing: int8 (Q/DQ on both inputs), fp16, fp32, ..."""
    if src is not None:
        dqs = [n for n in src.chain if n.op == DQ_OP]
        if dqs:
            qp = qparams(dqs[0])
            name = np.dtype(qp.qdtype).name if qp is not None else "?"
            act = node.inputs[activation_input_index(node)]
            if name in ("int8", "uint8") and is_dq(producer(act)):
                return "int8"
            return "int8-weight-only" if name in ("int8", "uint8") else name
    if w is not None:
        dt = np_dtype(w.dtype)
        if dt is not None and dt.name == "float16":
            return "fp16"
        if dt is not None and dt.name == "bfloat16":
            return "bf16"
    return "fp32"


def _conditions(node: gs.Node, src: _Source | None, w: np.ndarray | None, axis: int | None) -> dict[str, str | None]:
    """Each structural condition of TensorRT's sparse kernels: None when it holds, else why not (S-rule first)."""
    out: dict[str, str | None] = {}
    # S4: kSPARSE_WEIGHTS lets the builder "examine weights" (NvInfer.h BuilderFlag doc), so they
    # must be constant at build time.
    if src is None:
        out["constant"] = "S4: the weight is not a build-time constant"
        return out
    if w is None:
        out["constant"] = "S5: the weight's quantization (float8, blocked or computed scales) has no INT8/FP16 sparse kernel"
        return out
    out["constant"] = None
    rank = w.ndim
    # S3: "the convolution kernel weights and the fully connected weights" (TensorRT Developer
    # Guide, Structured Sparsity); MatMul/Gemm layers appear as "eligible for sparse math" in the
    # build logs of NVIDIA/TensorRT#2169 and #4054. Nothing documents deconvolution or 3-D kernels.
    if node.op == "Conv":
        out["op"] = None if rank in (3, 4) else f"S3: {rank - 2}-D convolution; sparse kernels are documented for [K, C, R, S] weights"
    elif node.op == "ConvTranspose":
        out["op"] = "S3: ConvTranspose; TensorRT documents sparse kernels for convolutions and fully connected layers only"
    elif node.op == "Gemm":
        out["op"] = None
    else:  # MatMul
        widx = weight_input_index(node)
        if widx != 1:
            out["op"] = "S3: the constant is MatMul's first operand; sparse GEMMs are documented for constant weights B"
        elif rank != 2:
            out["op"] = f"S3: {rank}-D constant B (batched); only 2-D fully connected weights are documented"
        else:
            out["op"] = None
    # S2: "TRT does not consider sparse conv kernels for group convs" (maintainer, NVIDIA/TensorRT#4054).
    group = int(node.attrs.get("group", 1)) if node.op in ("Conv", "ConvTranspose") else 1
    out["groups"] = None if group == 1 else f"S2: grouped convolution (group={group}); TensorRT does not consider sparse kernels for it"
    # S1: the guide's check presupposes kernel weights [K, C, R, S] with C % 4 == 0.
    c = int(w.shape[axis]) if axis is not None else 0
    out["channels"] = None if c % GROUP == 0 else f"S1: reduction dimension {c} is not a multiple of 4"
    return out


@dataclass
class LayerSparsity:
    """The 2:4 state of one weighted op (``inspect``'s per-layer row)."""

    node: str
    op: str
    weight_shape: list[int]
    reduction_axis: int | None
    groups: int
    sparse_groups: int
    is_2_4: bool
    precision: str
    eligible: bool  # every structural condition (S1-S4) holds; precision not counted
    sparse_ready: bool  # 2:4, eligible, and INT8/FP16 (S5): could run a sparse kernel as the model is
    speedup_likely: bool  # S6 (advisory): large enough that a sparse kernel usually wins the timing
    macs: int
    reasons: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.sparse_groups / self.groups if self.groups else 0.0

    def to_dict(self) -> dict[str, Any]:
        # asdict's recursive deep copy, for fields that are scalars or lists of scalars (a third of
        # ``inspect``'s time on a 40k-layer graph)
        d = {f.name: (list(v) if isinstance(v := getattr(self, f.name), list) else v) for f in fields(self)}
        d["sparse_group_fraction"] = round(self.fraction, 6)
        return d


@dataclass
class SparsityReport:
    layers: list[LayerSparsity]

    @property
    def total_macs(self) -> int:
        return sum(l.macs for l in self.layers)

    def _share(self, pick) -> float:
        total = self.total_macs
        return sum(l.macs for l in self.layers if pick(l)) / total if total else 0.0

    @property
    def sparse_mac_fraction(self) -> float:
        """Share of weighted MACs in layers that could run sparse kernels as the model is."""
        return self._share(lambda l: l.sparse_ready)

    @property
    def sparse_mac_fraction_int8(self) -> float:
        """The same if every layer ran INT8 (after PTQ): 2:4 and eligible, precision not counted."""
        return self._share(lambda l: l.is_2_4 and l.eligible)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers_2_4": sum(1 for l in self.layers if l.is_2_4),
            "layers_eligible": sum(1 for l in self.layers if l.eligible),
            "layers_sparse_ready": sum(1 for l in self.layers if l.sparse_ready),
            "layers_total": len(self.layers),
            "sparse_mac_fraction": round(self.sparse_mac_fraction, 6),
            "sparse_mac_fraction_int8": round(self.sparse_mac_fraction_int8, 6),
            "details": [l.to_dict() for l in self.layers],
        }


def _layer(node: gs.Node) -> tuple[LayerSparsity, _Source | None, np.ndarray | None] | None:
    from .analysis import weighted_op_macs

    idx = weight_input_index(node)
    if node.op not in WEIGHTED_OPS or idx is None:
        return None
    src = _source(node.inputs[idx])
    w = _evaluate(src) if src is not None else None
    axis = reduction_axis(node, w.ndim) if w is not None else None
    cond = _conditions(node, src, w, axis)
    reasons = [r for r in cond.values() if r]
    sparse, total = group_stats(w, axis) if w is not None and axis is not None else (0, 0)
    precision = _precision(node, src, w)
    # S5: "make sure that kFP16 or kINT8 modes are enabled" (Developer Guide); under strong typing
    # the graph's Q/DQ or FP16 weights are what enables them.
    prec_ok = precision in ("int8", "fp16")
    if not prec_ok:
        reasons.append(f"S5: runs {precision}; sparse kernels need INT8 (Q/DQ on both inputs) or FP16")
    eligible = not any(cond.values())
    # A reduction dimension that is not a multiple of 4 pads its last group with zeros, so a
    # 1-channel conv would look 2:4 by construction; TensorRT's check presupposes C % 4 == 0 (S1).
    is_24 = total > 0 and sparse == total and cond.get("channels") is None
    big = False
    out_axis = weight_axis(node)
    if w is not None and axis is not None and out_axis is not None:
        outputs = int(w.shape[out_axis])
        big = w.size // max(outputs, 1) >= _FAST_REDUCTION and outputs >= _FAST_OUTPUTS
    row = LayerSparsity(node.name, node.op, list(w.shape) if w is not None else [], axis, total, sparse, is_24, precision,
                        eligible, is_24 and eligible and prec_ok, big, weighted_op_macs(node), reasons)
    return row, src, w


def sparsity_report(model: onnx.ModelProto | gs.Graph) -> SparsityReport:
    """2:4 state of every Conv/ConvTranspose/Gemm/MatMul with a constant weight; nothing is modified."""
    if isinstance(model, onnx.ModelProto):
        try:  # shapes only feed the MAC counts
            model = infer_missing_shapes(model)
        except Exception as exc:
            logger.debug("shape inference failed: %s", exc)
        model = import_model(model)
    graph = model
    rows = [r[0] for r in (_layer(n) for n in graph.nodes) if r is not None]
    return SparsityReport(rows)


# --------------------------------------------------------------------------------------------
# Pruning


def _prune_source(src: _Source, keep_effective: np.ndarray) -> None:
    """Zero the stored values that the op sees outside ``keep_effective`` (mapped back through the chain)."""
    keep = keep_effective
    for n in src.chain:  # from the op back to the stored constant
        if n.op == "Transpose":
            perm = n.attrs.get("perm") or list(reversed(range(keep.ndim)))
            keep = np.transpose(keep, np.argsort(perm))
    values = src.values.copy()
    dq = next((n for n in src.forward if n.op == DQ_OP), None)
    if values.dtype.kind in "iu":
        qp = qparams(dq) if dq is not None else None
        zero = np.zeros_like(values)
        if qp is not None and qp.zero_point is not None:
            axis_q = qp.axis if qp.per_channel else None
            zero = np.broadcast_to(_bshape(qp.zero_point, values.ndim, axis_q), values.shape).astype(values.dtype)
        values = np.where(keep, values, zero)
    else:
        values = np.where(keep, values, np.zeros((), values.dtype)).astype(values.dtype)
    src.set_values(values)


@dataclass
class SparsifyResult:
    model: onnx.ModelProto
    pruned: list[str]
    skipped: dict[str, str]
    already: list[str]
    sensitivity: dict[str, float] = field(default_factory=dict)  # top-1 points lost pruning the layer alone
    drop: float | None = None  # top-1 agreement points lost with everything pruned
    sqnr_db: float | None = None
    top1_agreement: float | None = None
    macs_pruned_fraction: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"pruned": list(self.pruned), "already_2_4": list(self.already), "skipped": dict(self.skipped),
                "sensitivity": dict(self.sensitivity), "drop_top1_points": self.drop,
                "top1_agreement": self.top1_agreement, "sqnr_db": self.sqnr_db,
                "macs_pruned_fraction": round(self.macs_pruned_fraction, 6)}


def _evaluate_drop(reference: onnx.ModelProto, candidate: onnx.ModelProto, batches: Sequence[dict[str, np.ndarray]]):
    from .check import compare

    report = compare(reference, candidate, batches)
    if report.top1_agreement is None:
        return None, report
    return 100.0 * (1.0 - report.top1_agreement), report


def sparsify(model: onnx.ModelProto, *, exclude: Iterable[str] = (), data: Iterable[dict[str, np.ndarray]] | None = None,
             max_drop: float | None = None) -> SparsifyResult:
    """Prune every eligible weight to 2:4 by magnitude (m4n2_1d along the reduction axis).

    Skipped: layers TensorRT would not run sparse (S1-S4; precision is not counted, since a float
    model is quantized later), weights shared with another node, ``exclude`` regexes over node
    names, and, with ``data`` and ``max_drop`` (top-1 agreement points with the dense model), the
    layers whose pruning would push the drop above ``max_drop``: each layer is first pruned alone
    to measure its sensitivity, then they are added least sensitive first, most sensitive last, and
    a layer that exceeds the budget is left dense. ``model`` is not modified.
    """
    import re

    from .errors import UsageError

    patterns = [re.compile(p) for p in exclude]
    graph = import_model(model)
    skipped: dict[str, str] = {}
    already: list[str] = []
    plans: dict[str, tuple[_Source, np.ndarray]] = {}
    macs: dict[str, int] = {}
    total_macs = 0
    for node in graph.nodes:
        got = _layer(node)
        if got is None:
            continue
        row, src, w = got
        total_macs += row.macs
        if any(p.search(node.name) for p in patterns):
            skipped[node.name] = "excluded"
        elif not row.eligible:
            skipped[node.name] = "; ".join(r for r in row.reasons if not r.startswith("S5"))
        elif row.is_2_4:
            already.append(node.name)
        elif src.shared:
            skipped[node.name] = "weight shared with another node"
        else:
            plans[node.name] = (src, m4n2_mask(w, row.reduction_axis))
            macs[node.name] = row.macs
    originals = {name: src.values.copy() for name, (src, _) in plans.items()}

    def build(chosen: Iterable[str]) -> onnx.ModelProto:
        chosen = set(chosen)
        for name, (src, keep) in plans.items():
            src.set_values(originals[name].copy())
            if name in chosen:
                _prune_source(src, keep)
        return export_model(graph, template=model)

    order = list(plans)
    sensitivity: dict[str, float] = {}
    batches: list[dict[str, np.ndarray]] | None = list(data) if data is not None else None
    if batches is not None and max_drop is not None:
        for name in plans:
            drop, _ = _evaluate_drop(model, build([name]), batches)
            if drop is None:
                raise UsageError("--max-drop needs a model with a class-score output (top-1 agreement is the measure)")
            sensitivity[name] = drop
        order = sorted(plans, key=lambda n: (sensitivity[n], n))
        accepted: list[str] = []
        for name in order:
            drop, _ = _evaluate_drop(model, build([*accepted, name]), batches)
            if drop is not None and drop > max_drop:
                skipped[name] = f"pruning it too would cost {drop:.2f} top-1 points (> --max-drop {max_drop:g})"
                continue
            accepted.append(name)
        order = accepted
    out = build(order)
    result = SparsifyResult(out, [n for n in plans if n in set(order)], skipped, already, sensitivity,
                            macs_pruned_fraction=sum(macs[n] for n in order) / total_macs if total_macs else 0.0)
    if batches is not None:
        drop, report = _evaluate_drop(model, out, batches)
        result.drop = drop
        result.top1_agreement = report.top1_agreement
        result.sqnr_db = min((m.sqnr_db for m in report.outputs.values()), default=None)
    for name in result.pruned:
        logger.info("pruned %s to 2:4", name)
    return result
