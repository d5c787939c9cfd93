"""align-scales: tensors TensorRT treats as one INT8 buffer share one scale (P4, P5, P6).

Before → after::

    a ─ qdq(s1) ─┐                               a ─ qdq(s) ─┐
    b ───────────Concat ─ qdq(s3) ─ Conv    →    b ─ qdq(s) ─Concat ─ qdq(s) ─ Conv
    t ─ qdq(s1) ─ Conv_a, t ─ qdq(s2) ─ Conv_b  →  t ─ qdq(s) ─ {Conv_a, Conv_b}

Tensors are tied when a commuting op joins them (every input and output of a Concat or Split,
input and output of MaxPool, reshapes, slices, zero Pad), and every Q reading a tied tensor
gets one scale: ``--align max`` takes the largest (the union of the ranges: nothing that was
representable clips), where the ranges are the pairs' scales and, when calibration is available
outside the fix path, each Concat input's and Split output's own calibrated range (a range calibrated on the mixture, the
Concat output, clips its widest part beyond that part's own tail under percentile calibration);
``--align scales`` the largest of the pairs' scales only (the policy before); ``--align output`` the
scale of the Q furthest downstream (the consumer's), raised to that of any pair a layer outside the
tied ops also reads.
A Concat whose output is quantized gets the pair on every input that lacks one. Error bound:
inside the range the old scale represented, a re-scaled tensor moves by at most one step of the
new scale (half a step of the old grid plus half a step of the new); values an old, smaller scale
clipped are clipped less or not at all (they move towards the float value), and under ``output``
values beyond the consumer's range clip as the consumer's Q already clipped them. Per-tensor int8 Q/DQ with zero point 0 only; others are left alone.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import is_dq, is_q, qparams
from ..qdq import source_of
from ..quant import scale_from_amax
from ..rewriter import Rewriter
from ..trt_rules import commutes, data_input_indices
from .base import Pass, PassContext
from .move_qdq import copy_pair_backward

__all__ = ["AlignScales", "tied_groups"]

logger = logging.getLogger(__name__)


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, a: int) -> int:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def _plain_int8(q: gs.Node) -> bool:
    qp = qparams(q)
    return qp is not None and not qp.per_channel and qp.scale.dtype in (np.float32, np.float16) and \
        (qp.zero_point is None or (qp.zero_point.dtype == np.int8 and not qp.zero_point.any()))


def _scale(q: gs.Node) -> float:
    """A per-tensor Q's scale as a number (scalar or one-element, as a one-channel weight's scale is)."""
    return float(np.asarray(qparams(q).scale).reshape(-1)[0])


def tied_groups(graph: gs.Graph) -> list[list[gs.Tensor]]:
    """Groups of float tensors that must share one INT8 scale, in graph order."""
    uf = _UnionFind()
    tensors: dict[int, gs.Tensor] = {}
    order: dict[int, int] = {}
    for pos, node in enumerate(graph.nodes):
        for t in node.outputs:
            order.setdefault(id(t), pos)
        if not commutes(node) or node.op == "Cast":
            continue
        members = [source_of(node.inputs[i]) for i in data_input_indices(node) if node.inputs[i] is not None]
        members += list(node.outputs)
        members = [m for m in members if m.dtype is None or np.dtype(m.dtype).kind == "f"]
        for m in members:
            tensors[id(m)] = m
        for m in members[1:]:
            uf.union(id(members[0]), id(m))
    for node in graph.nodes:  # every quantized tensor is at least its own group (fan-out, P6)
        if is_q(node):
            t = node.inputs[0]
            tensors.setdefault(id(t), t)
            src = source_of(t)
            if src is not t:
                # Q(s2) reading DQ(Q(s1)(x)): one buffer re-quantized (E3); one scale lets fold-qdq-pairs drop it.
                tensors.setdefault(id(src), src)
                uf.union(id(src), id(t))
    groups: dict[int, list[gs.Tensor]] = {}
    for key, t in tensors.items():
        groups.setdefault(uf.find(key), []).append(t)
    out = [sorted(g, key=lambda t: order.get(id(t), -1)) for g in groups.values()]
    return sorted(out, key=lambda g: order.get(id(g[0]), -1))


class AlignScales(Pass):
    """Give every Q on tied tensors (Concat/Split/MaxPool/reshape neighbours, fan-out) one scale."""

    name = "align-scales"
    edits_through_rewriter = True
    summary = "One scale for tensors TensorRT shares as one INT8 buffer (Concat, MaxPool, fan-out); missing Concat-input Q/DQ inserted"
    rules = ("P4", "P5", "P6")

    def run(self, graph: gs.Graph, rw: Rewriter, ctx: PassContext) -> None:
        # A quantized Concat output wants every input quantized (P4); insert first, so the new
        # pairs are unified with the rest of their group below.
        self._fill_concat_inputs(graph, rw)
        # The fix path keeps the model's own scales (calibration there only fills missing pairs; ranges
        # calibrated on the Q/DQ model would move its scales on every run).
        parts = _mixture_parts(graph) if ctx.config.align == "max" and ctx.pipeline != "fix" else set()
        # A group with one Q and no Concat/Split part has nothing to align (most groups of a plain CNN).
        groups = [(g, qs) for g in tied_groups(graph) if (qs := [n for t in g for n in t.outputs if is_q(n)])
                  and (len(qs) > 1 or any(id(t) in parts for t in g)) and all(_plain_int8(q) for q in qs)]
        # One request for every part, so calibration runs once for the pass, not once per group.
        amax = ctx.amax([t.name for g, _ in groups for t in g if id(t) in parts])
        for group, qs in groups:
            scales = [_scale(q) for q in qs]
            union = _member_union(group, amax)
            if union is not None:  # in the scales' own type, so a float16 model's second run finds nothing to raise
                union = float(np.asarray(union, dtype=qparams(qs[0]).scale.dtype))
            if len(set(scales)) > 1 or union is not None and union > max(scales):
                target = self._target(group, qs, ctx.config.align)
                if union is not None:
                    target = max(target, union)
                names = ", ".join(t.name for t in group[:4]) + (" ..." if len(group) > 4 else "")
                for q in qs:
                    old = _scale(q)
                    if old == target:
                        continue
                    why = f"{ctx.config.align} policy over tied tensors [{names}] (max requantization error 1 step)"
                    old_scale = qparams(q).scale
                    new = np.asarray(target, dtype=old_scale.dtype).reshape(old_scale.shape)  # float16 stays float16
                    rw.set_constant(q, 1, new, base=f"{q.name}_scale", detail=f"scale of {q.inputs[0].name}: {why}", rule="P4")
                    for dq in q.outputs[0].outputs:
                        if is_dq(dq):
                            rw.set_constant(dq, 1, new, base=f"{dq.name}_scale", detail="follows its Q", rule="P4")

        # Concats whose output readers agreed only once aligned (one quantizer per consumer, with
        # different scales) get their missing input pairs now, at the unified scale; without this
        # a second run would still insert them (the pass would not be idempotent).
        self._fill_concat_inputs(graph, rw)

    @staticmethod
    def _fill_concat_inputs(graph: gs.Graph, rw: Rewriter) -> None:
        # From the outputs back, so a Concat feeding another Concat sees the pair just given to its output.
        for node in reversed(list(graph.nodes)):
            if node.op == "Concat" and not rw.is_removed(node):
                copy_pair_backward(graph, node, rw, rule="P4")

    @staticmethod
    def _target(group: list[gs.Tensor], qs: list[gs.Node], policy: str) -> float:
        scales = [_scale(q) for q in qs]
        if policy == "output":
            last = [_scale(q) for q in qs if q.inputs[0] is group[-1]]
            if last:
                # The consumer's scale, but never below a pair that a layer outside the tied ops
                # reads: shrinking that one would clip its values for a reader the Concat never sees.
                members = {id(t) for t in group}
                outside = [_scale(q) for q in qs if _read_outside(q, members)]
                return max(last + outside)
        return max(scales)


def _mixture_parts(graph: gs.Graph) -> set[int]:
    """id() of every Concat input and Split output: the parts whose mixture is the other side."""
    parts: set[int] = set()
    for node in graph.nodes:
        if node.op == "Concat":
            parts |= {id(source_of(node.inputs[i])) for i in data_input_indices(node) if node.inputs[i] is not None}
        elif node.op == "Split":
            parts |= {id(t) for t in node.outputs}
    return {p for p in parts if p}


def _member_union(group: list[gs.Tensor], amax: dict[str, float]) -> float | None:
    """The scale covering the own calibrated range of each Concat input / Split output in ``group``.

    A Concat's output is the mixture of its inputs (a Split's input of its outputs), so a range
    calibrated on it with a method that clips a tail (percentile, MSE, entropy) is the tail of the
    mixture: the widest part is clipped beyond its own tail when the others are narrower. A pair
    carried back across a Concat took that range (PP-OCRv6's detection neck: the full-resolution
    branch, a quarter of the Concat, clipped at 23.3 where its own 99.99th percentile is 25.2).
    With max calibration nothing changes: the mixture's max is the largest part's (P4).
    MaxPool and reshapes are not mixtures and keep the scales their pairs have.
    """
    known = [amax[t.name] for t in group if t.name in amax]
    return float(scale_from_amax(max(known))) if known else None


def _read_outside(q: gs.Node, members: set[int]) -> bool:
    """Whether a DQ of ``q`` feeds a reader other than a Q or a commuting op of the tied group."""
    for dq in q.outputs[0].outputs:
        if not is_dq(dq):
            continue
        for reader in dq.outputs[0].outputs:
            if is_q(reader):
                continue
            if commutes(reader) and any(id(o) in members for o in reader.outputs):
                continue
            return True
    return False
