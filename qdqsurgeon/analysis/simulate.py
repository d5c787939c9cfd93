"""Steps 1 and 2 of the static TensorRT model: a private copy of the graph, and TensorRT's Q/DQ
propagation on it (weights, merging duplicates, DQs forward, Qs backward, DQ→Q cancelling).

See :mod:`qdqsurgeon.analysis` for the whole model; :mod:`.fuse` takes the result from here.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .. import trt_rules as R
from ..io import heavy, without_weight_bytes
from ..graph import _all_tensors, _flat_model, const_value, dtype_name, export_graph, import_graph, is_constant, is_dq, is_q, new_variable, producer, qparams, qparams_key, toposort_graph, types_complete, value_info_type
from ..qdq import agreed_dq_sources, agreed_q_readers, cancels, duplicates
from ..rewriter import Rewriter

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Preparing a private, shape-inferred graph


def _working_graph(model_or_graph: onnx.ModelProto | gs.Graph, own: gs.Graph | None = None) -> gs.Graph:
    """A graph this module may rewrite freely, with inferred shapes where ONNX can infer them.

    ``own``: the graph ``model_or_graph`` was exported from, which the caller gives up (optimize's
    pipeline graph, once its result is exported): it is used itself, with the shapes ONNX infers on
    the export, instead of importing the export again (on a 100k-node graph, 20 s of the analysis).
    """
    if isinstance(model_or_graph, onnx.ModelProto):
        model = model_or_graph
    elif isinstance(model_or_graph, gs.Graph):
        try:
            model = export_graph(model_or_graph)
        except Exception as exc:  # an unexportable graph is still analysable, just without new shapes
            logger.debug("gs export failed (%s); analysing a copy without shape inference", exc)
            return model_or_graph.copy()
    else:
        raise TypeError(f"predict() takes an onnx.ModelProto or a gs.Graph, not {type(model_or_graph).__name__}")
    originals = None
    flat = _flat_model(model)
    if not types_complete(model):  # (else inference would add nothing)
        if flat and heavy(model):
            model, originals = without_weight_bytes(model)
        try:
            model = onnx.shape_inference.infer_shapes(model)
        except Exception as exc:  # shapes only feed MAC counts; a model ONNX cannot infer still gets a prediction
            logger.debug("shape inference failed: %s", exc)
    if own is not None and flat:
        graph = _take_over(own, model)
        if graph is not None:
            return graph
    return import_graph(model, originals)


def _take_over(graph: gs.Graph, model: onnx.ModelProto) -> gs.Graph | None:
    """``graph`` as :func:`import_graph` of ``model`` (its export, shape-inferred) would build it: each
    variable typed and shaped as the model's value_info, inputs and outputs say, else untyped; each
    tensor's readers in node order. None when a tensor still links a node outside the graph (the
    import would not have it): then the model is imported after all."""
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    tensors = list(_all_tensors(graph))  # (a flat graph: those of graph.tensors(), without its name checks)
    linked = {id(n) for t in tensors for n in t.inputs}
    linked.update(id(n) for t in tensors for n in t.outputs)
    if not linked <= order.keys():
        return None
    infos: dict[str, tuple[object, object]] = {}
    for vi in model.graph.value_info:
        new = value_info_type(vi)
        old = infos.get(vi.name)
        # import_graph's merge of repeated entries, with its truth tests
        infos[vi.name] = new if old is None else (old[0] or new[0], old[1] or new[1])
    for vi in (*model.graph.input, *model.graph.output):
        if vi.name not in infos:
            infos[vi.name] = value_info_type(vi)
    none = (None, None)
    for t in tensors:
        if isinstance(t, gs.Variable):
            t.dtype, t.shape = infos.get(t.name, none)
        if len(t.outputs) > 1:  # the import links readers in node order; the passes, in edit order
            list.sort(t.outputs, key=lambda n: order[id(n)])
    return graph


def _dim(d: Any) -> int:
    # Dynamic dims count as 1, so a dynamic batch gives per-sample MACs.
    return int(d) if isinstance(d, (int, np.integer)) and int(d) > 0 else 1


def _shape(t: gs.Tensor | None) -> tuple[int, ...] | None:
    shape = getattr(t, "shape", None)
    if shape is None:
        return None
    return tuple(_dim(d) for d in shape)


def _const_shape(t: gs.Tensor) -> tuple[int, ...] | None:
    """Shape of a weight tensor, also behind its Q/DQ chain when shape inference did not run."""
    s = _shape(t)
    if s is not None:
        return s
    for _ in range(8):
        v = const_value(t)
        if v is not None:
            return tuple(np.shape(v))
        p = producer(t)
        if p is None or not (is_q(p) or is_dq(p) or p.op in R.WEIGHT_PASSTHROUGH_OPS):
            return None
        t = p.inputs[0]
    return None


# --------------------------------------------------------------------------------------------
# The simulation


def _qkey(node: gs.Node) -> tuple:
    """Hashable identity of a Q/DQ's quantization: the passes' own :func:`graph.qparams_key`.

    Bit-exact (trt-rules §7.5 leaves tolerances unverified). A computed scale (invalid for TRT,
    V1) is unique, so it never merges or cancels.
    """
    key = qparams_key(node)
    return key if key is not None else ("dynamic", id(node))


_INT8_TYPES = {np.int8: "int8", np.uint8: "uint8", np.dtype(np.int8): "int8", np.dtype(np.uint8): "uint8"}


def _qlabel(sim: "_Sim", node: gs.Node) -> str:
    """``int8``, ``fp8``... : the quantized type of the activation DQ feeding ``node`` (int8 when unknown)."""
    from ..inspection import QTYPE_LABELS

    for t in node.inputs:
        dq = sim.dq_of(t)
        if dq is None:
            continue
        ins = dq.inputs
        name = None
        if len(ins) > 2 and type(ins[1]) is gs.Constant and type(ins[2]) is gs.Constant and ins[2].name:
            name = _INT8_TYPES.get(ins[2].dtype)  # the zero point's type, as qparams would load it
        if name is None:
            qp = qparams(dq)
            if qp is None:
                continue
            name = dtype_name(qp.qdtype)
        return QTYPE_LABELS.get(name, "int8")
    return "int8"


class _Sim:
    """TensorRT's Q/DQ processing on a private graph; see the module docstring for the steps.

    Every edit goes through a :class:`Rewriter` that keeps no change log, and every decision is a
    question the passes ask too (:func:`qdq.duplicates`, :func:`qdq.cancels`,
    :func:`qdq.agreed_q_readers`, :func:`qdq.agreed_dq_sources`, :func:`trt_rules.commutes`). What
    differs is the unit that moves: TensorRT moves a single Q or DQ; the passes copy Q/DQ pairs.
    """

    def __init__(self, graph: gs.Graph, version: R.Version | None = None) -> None:
        self.g = graph
        self.version = R.parse_version(version)
        self.rw = Rewriter(graph, "analysis", record=False)
        self.nodes: list[gs.Node] = graph.nodes  # the rewriter appends new nodes here
        for i, n in enumerate(self.nodes):
            if not n.name:
                n.name = f"{n.op}_{i}"
        self.outputs = {id(t) for t in graph.outputs}
        self.inputs = {id(t) for t in graph.inputs}
        self.dead: set[int] = set()
        self.origin: dict[int, str] = {id(n): n.name for n in self.nodes}
        self.keys: dict[int, tuple] = {}
        self.weight_qdq: set[int] = set()
        self.int8_ops: set[int] = set()
        self.used_names = {n.name for n in self.nodes if is_q(n) or is_dq(n)}
        self.merged: list[str] = []
        self._var = 0

    # --- small helpers -------------------------------------------------------------------------

    def key(self, n: gs.Node) -> tuple:
        k = self.keys.get(id(n))
        if k is None:
            k = self.keys[id(n)] = _qkey(n)
        return k

    def live(self, n: gs.Node) -> bool:
        return id(n) not in self.dead

    def act_q(self, n: gs.Node | None) -> bool:
        return n is not None and is_q(n) and self.live(n) and id(n) not in self.weight_qdq

    def act_dq(self, n: gs.Node | None) -> bool:
        return n is not None and is_dq(n) and self.live(n) and id(n) not in self.weight_qdq

    def dq_of(self, t: gs.Tensor | None) -> gs.Node | None:
        """The activation DQ writing ``t``, if any."""
        p = producer(t) if t is not None else None
        return p if self.act_dq(p) else None

    def is_graph_output(self, t: gs.Tensor) -> bool:
        return id(t) in self.outputs

    def detach(self, n: gs.Node) -> None:
        self.dead.add(id(n))
        self.used_names.discard(n.name)
        self.rw.remove_node(n)

    def fresh_name(self, origin: str) -> str:
        if origin not in self.used_names:
            return origin
        k = 1
        while f"{origin}_clone_{k}" in self.used_names:
            k += 1
        return f"{origin}_clone_{k}"

    def new_var(self, base: str) -> gs.Variable:
        self._var += 1
        return new_variable(f"{base}__sim{self._var}")

    def template(self, like: gs.Node) -> tuple[str, str, dict, list[gs.Tensor], tuple]:
        """What a moved copy of ``like`` needs, captured before ``like`` is detached."""
        return (like.op, self.origin[id(like)], dict(like.attrs), list(like.inputs[1:]), self.key(like))

    def clone_qdq(self, tpl: tuple[str, str, dict, list[gs.Tensor], tuple], data: gs.Tensor,
                  out: gs.Tensor) -> gs.Node:
        op, origin, attrs, qinputs, key = tpl
        node = self.rw.add_node(op, [data, *qinputs], name=self.fresh_name(origin), attrs=attrs, outputs=[out])
        self.used_names.add(node.name)
        self.origin[id(node)] = origin
        self.keys[id(node)] = key
        return node

    def const_path(self, t: gs.Tensor | None) -> bool:
        # A weight may sit behind Q, DQ, Identity, Cast or Transpose (TF exports transpose weights).
        for _ in range(8):
            if t is None:
                return False
            if is_constant(t):
                return True
            p = producer(t)
            if p is None or not (is_q(p) or is_dq(p) or p.op in R.WEIGHT_PASSTHROUGH_OPS):
                return False
            t = p.inputs[0]
        return False

    def qweight(self, t: gs.Tensor | None) -> bool:
        """``t`` is a quantized weight: a constant behind a DQ (F1)."""
        for _ in range(8):
            p = producer(t) if t is not None else None
            if p is None:
                return False
            if is_dq(p) and id(p) in self.weight_qdq:
                return True
            if p.op in R.WEIGHT_PASSTHROUGH_OPS and p.inputs:
                t = p.inputs[0]
                continue
            return False
        return False

    # --- step 1: weights and duplicates --------------------------------------------------------

    def mark_weights(self) -> None:
        for n in self.nodes:
            if (is_q(n) or is_dq(n)) and n.inputs and self.const_path(n.inputs[0]):
                self.weight_qdq.add(id(n))

    def dedupe(self) -> bool:
        """Merge identical activation Qs (and DQs) reading one tensor (P6)."""
        changed = False
        tensors: dict[int, gs.Tensor] = {}
        for n in self.nodes:
            if self.live(n) and (is_q(n) or is_dq(n)) and id(n) not in self.weight_qdq and n.inputs:
                tensors[id(n.inputs[0])] = n.inputs[0]
        for t in tensors.values():
            for test in (self.act_q, self.act_dq):
                seen: list[gs.Node] = []
                for c in list(t.outputs):
                    if not test(c) or c.inputs[0] is not t:
                        continue
                    keep = next((s for s in seen if duplicates(s, c)), None)  # dedupe-qdq's question
                    if keep is None:
                        seen.append(c)
                        continue
                    out = c.outputs[0]
                    if self.is_graph_output(out):
                        continue
                    self.rw.replace_uses(out, keep.outputs[0])
                    self.merged.append(c.name)
                    self.detach(c)
                    changed = True
        return changed

    # --- step 2: movement ----------------------------------------------------------------------

    def dq_forward(self) -> bool:
        changed = False
        work = deque(n for n in self.nodes if self.act_dq(n))
        while work:
            d = work.popleft()
            if not self.live(d):
                continue
            for c in list(d.outputs[0].outputs):
                if not self.live(c) or not R.commutes(c):
                    continue
                srcs = agreed_dq_sources(c, self.dq_of, self.key)  # P4/P5: unequal scales, the DQ stays put
                if srcs is None or not any(s is d for _, s in srcs):
                    continue
                tpl = self.template(srcs[0][1])
                for i, s in srcs:
                    self.rw.set_input(c, i, s.inputs[0])
                for s in {id(s): s for _, s in srcs}.values():
                    if not s.outputs[0].outputs and not self.is_graph_output(s.outputs[0]):
                        self.detach(s)
                for j, o in enumerate(list(c.outputs)):
                    o8 = self.new_var(o.name)
                    self.rw.set_output(c, j, o8)
                    work.append(self.clone_qdq(tpl, o8, o))
                self.int8_ops.add(id(c))
                changed = True
        return changed

    def q_backward(self) -> bool:
        changed = False
        work = deque(n for n in self.nodes if self.act_q(n))
        while work:
            q = work.popleft()
            if not self.live(q):
                continue
            v = q.inputs[0]
            p = producer(v)
            if p is None or not R.commutes(p) or id(p) in self.int8_ops:
                continue
            # C1: the Q moves only if it is the sole reader of every output of the op (identical Qs
            # were merged already). For Split that means one Q, at one scale, on each output (P4).
            readers = agreed_q_readers(p, is_output=self.is_graph_output, accept=self.act_q, key=self.key)
            if readers is None or any(len(r) != 1 for r in readers):
                continue
            idx = [i for i in R.data_input_indices(p) if p.inputs[i] is not None and p.inputs[i].name]
            if not idx or all(id(p.inputs[i]) in self.inputs for i in idx):
                # Nothing to fuse into before a network input: the Q stays after the op, which runs
                # float (TF QAT ResNet-50 dump, TRT 8.x: input Pad a float Slice, then a standalone Q;
                # the Pad after conv1 took the Q across and ran INT8).
                continue
            tpl = self.template(q)
            for j, (qj,) in enumerate(readers):
                out = qj.outputs[0]
                self.detach(qj)
                self.rw.set_output(p, j, out)
            for i in idx:
                u = p.inputs[i]
                reuse = next((c for c in u.outputs if self.act_q(c) and self.key(c) == tpl[4]), None)
                if reuse is None:
                    reuse = self.clone_qdq(tpl, u, self.new_var(u.name))
                    work.append(reuse)
                self.rw.set_input(p, i, reuse.outputs[0])
            self.int8_ops.add(id(p))
            changed = True
        return changed

    def cancel(self) -> bool:
        """``DQ(s)→Q(s)`` disappears; the Q's readers take the INT8 tensor directly."""
        changed = False
        for d in [n for n in self.nodes if self.act_dq(n)]:
            v, a = d.outputs[0], d.inputs[0]
            for q in list(v.outputs):
                if self.act_q(q) and cancels(d, q) and not self.is_graph_output(q.outputs[0]):  # fold-qdq-pairs' question
                    self.rw.replace_uses(q.outputs[0], a)
                    self.detach(q)
                    changed = True
            if not v.outputs and not self.is_graph_output(v):
                self.detach(d)
                changed = True
        return changed

    def move(self) -> None:
        self.mark_weights()
        for _ in range(16):
            changed = self.dedupe()
            changed |= self.dq_forward()
            changed |= self.q_backward()
            changed |= self.cancel()
            if not changed:
                break
        self.nodes = [n for n in self.nodes if self.live(n)]
        self.g.nodes = self.nodes
        try:
            toposort_graph(self.g)
            self.nodes = list(self.g.nodes)
        except Exception as exc:  # a cyclic or odd graph: keep the original order
            logger.debug("toposort failed: %s", exc)
