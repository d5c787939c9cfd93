"""Static model of TensorRT's explicit-quantization processing: predict the engine from the ONNX.

TensorRT cannot run everywhere qdqsurgeon does, so this module simulates what its builder does
with Q/DQ nodes (``trt-rules.md`` §3) and reports what the engine will contain: which weighted
ops run INT8 and with which output precision, the INT8 share of the MACs, and every Q/DQ that
stays a standalone Quantize/Dequantize (Reformat, ``Origin: "QDQ"``) layer, with the rule that
leaves it unfused.

The simulation runs on a private copy of the graph, in TensorRT's order:

1. Q/DQ on constants are weights (F1), never layers. Identical Qs (or DQs) on one tensor merge
   into one (P6).
2. DQs move forward and Qs backward across commuting ops (:func:`trt_rules.commutes`). A Q moves
   back only when it is the only reader of the op's output (C1); ops with ``equal_scales``
   (Concat) take a DQ forward only when all input scales agree (P4). ``DQ(s)→Q(s)`` cancels;
   ``DQ(s1)→Q(s2)`` stays as a requantize layer (E3).
3. Fusion: a weighted op is INT8 when its activation and weight come from DQs (F1); its epilogue
   chain (BN, bias Add, ReLU/Clip/..., SiLU, one residual Add) fuses (F3, F5, F10). The chain writes
   INT8 only when its end tensor is read by a single Q (F2, C1, P2) and, with a residual Add, the
   skip operand comes from a DQ (F5); otherwise it writes float and the skip DQ stays standalone
   (section 5, ``DequantizeLinear_291``). Other quantizable ops run INT8 only fully wrapped (P7).
4. What is left is standalone: every Q not absorbed by its producer (a graph input is always one,
   P10), every DQ with a reader that cannot take INT8.

All op knowledge comes from :mod:`qdqsurgeon.trt_rules`; nothing here lists op types.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import trt_rules as R
from .graph import const_value, is_dq, is_q, nested_nodes, producer, qparams, toposort_graph, weight_input_index

__all__ = ["StandaloneLayer", "WeightedOpPrediction", "TrtPrediction", "predict", "weighted_op_macs"]

logger = logging.getLogger(__name__)

INT8_INT8 = "int8->int8"
INT8_FLOAT = "int8->float"
FLOAT = "float"


@dataclass(frozen=True)
class StandaloneLayer:
    """A Q/DQ the engine keeps as its own layer. ``node`` is the ONNX node it comes from;
    ``layer`` is unique (``<node>_clone_<k>`` when one ONNX node becomes several layers)."""

    layer: str
    node: str
    kind: str  # "quantize" | "dequantize" | "requantize"
    tensor: str
    rule: str
    reason: str


@dataclass(frozen=True)
class WeightedOpPrediction:
    node: str
    op: str
    precision: str
    macs: int
    fused: tuple[str, ...] = ()
    reason: str = ""


@dataclass
class TrtPrediction:
    """What the TensorRT engine built from a Q/DQ model is predicted to contain."""

    weighted_ops: list[dict[str, Any]]
    int8_weighted_ops: int
    int8_mac_fraction: float
    standalone_qdq: list[str]
    standalone_qdq_layers: int
    standalone_reasons: dict[str, str]
    precision_transitions: int
    standalone_layers: list[StandaloneLayer] = field(default_factory=list)
    transitions: list[dict[str, str]] = field(default_factory=list)
    int8_ops: list[str] = field(default_factory=list)
    fused_groups: list[list[str]] = field(default_factory=list)

    @property
    def standalone_quantize(self) -> int:
        return sum(1 for s in self.standalone_layers if s.kind == "quantize")

    @property
    def standalone_dequantize(self) -> int:
        return sum(1 for s in self.standalone_layers if s.kind == "dequantize")

    @property
    def requantize(self) -> int:
        return sum(1 for s in self.standalone_layers if s.kind == "requantize")

    def precision_of(self, node_name: str) -> str | None:
        for w in self.weighted_ops:
            if w["node"] == node_name:
                return w["precision"]
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "int8_weighted_ops": self.int8_weighted_ops,
            "int8_mac_fraction": self.int8_mac_fraction,
            "standalone_qdq_layers": self.standalone_qdq_layers,
            "standalone_qdq": list(self.standalone_qdq),
            "precision_transitions": self.precision_transitions,
            "weighted_ops": [dict(w) for w in self.weighted_ops],
            "standalone_reasons": dict(self.standalone_reasons),
            "standalone_layers": [asdict(s) for s in self.standalone_layers],
            "requantize_layers": self.requantize,
            "int8_ops": list(self.int8_ops),
        }


# --------------------------------------------------------------------------------------------
# Preparing a private, shape-inferred graph


def _working_graph(model_or_graph: onnx.ModelProto | gs.Graph) -> gs.Graph:
    """A graph this module may rewrite freely, with inferred shapes where ONNX can infer them."""
    if isinstance(model_or_graph, onnx.ModelProto):
        model = model_or_graph
    elif isinstance(model_or_graph, gs.Graph):
        try:
            model = gs.export_onnx(model_or_graph, do_type_check=False)
        except Exception as exc:  # an unexportable graph is still analysable, just without new shapes
            logger.debug("gs export failed (%s); analysing a copy without shape inference", exc)
            return model_or_graph.copy()
    else:
        raise TypeError(f"predict() takes an onnx.ModelProto or a gs.Graph, not {type(model_or_graph).__name__}")
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:  # shapes only feed MAC counts; a model ONNX cannot infer still gets a prediction
        logger.debug("shape inference failed: %s", exc)
    return gs.import_onnx(model)


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


def weighted_op_macs(node: gs.Node) -> int:
    """Multiply-accumulates of one weighted op from tensor shapes (dynamic dims count as 1).

    Conv: output elements x Cin/group x prod(kernel); ConvTranspose: input elements x Cout/group x
    prod(kernel); Gemm/MatMul: M x K x N (times batch dims).
    """
    op = node.op
    if op in ("Conv", "ConvTranspose"):
        w = _const_shape(node.inputs[1]) if len(node.inputs) > 1 else None
        if w is None:
            return 0
        per = int(np.prod(w[1:])) if len(w) > 1 else 1
        ref = _shape(node.outputs[0]) if op == "Conv" else _shape(node.inputs[0])
        if ref is None:
            return per * (w[0] if op == "Conv" else 1)
        return int(np.prod(ref)) * per
    out = _shape(node.outputs[0])
    a = _shape(node.inputs[0]) or _const_shape(node.inputs[0])
    b = _shape(node.inputs[1]) or _const_shape(node.inputs[1])
    if op == "Gemm":
        if a is None or len(a) != 2:
            return int(np.prod(b)) if b is not None else 0
        k = a[0] if int(node.attrs.get("transA", 0)) else a[1]
        if out is None and b is not None:
            n = b[0] if int(node.attrs.get("transB", 0)) else b[1]
            out = (a[1] if int(node.attrs.get("transA", 0)) else a[0], n)
        return int(np.prod(out)) * k if out is not None else 0
    if op == "MatMul":
        if a is None or b is None:
            return int(np.prod(b)) if b is not None else 0
        k = a[-1]
        if out is None:
            out = tuple(a[:-1]) + (b[-1],)
        return int(np.prod(out)) * k
    return 0


# --------------------------------------------------------------------------------------------
# The simulation


def _qkey(node: gs.Node) -> tuple:
    """Hashable identity of a Q/DQ's quantization: scale values, zero point, quantized type, axis.

    Bit-exact on values (trt-rules §7.5 leaves tolerances unverified). The zero point's absence
    means uint8 by ONNX's default, which keeps it apart from an explicit int8 zero.
    """
    qp = qparams(node)
    if qp is None:  # a computed scale (invalid for TRT, V1): unique, so it never merges or cancels
        return ("dynamic", id(node))
    scale = tuple(np.asarray(qp.scale, dtype=np.float64).ravel().tolist())
    if qp.zero_point is not None:
        zp = tuple(np.broadcast_to(np.asarray(qp.zero_point).astype(np.int64), np.shape(qp.scale)).ravel().tolist())
    else:
        zp = (0,) * len(scale)
    return (scale, zp, str(qp.qdtype), qp.axis if qp.per_channel else None)


def _qlabel(sim: "_Sim", node: gs.Node) -> str:
    """``int8``, ``fp8``... : the quantized type of the activation DQ feeding ``node`` (int8 when unknown)."""
    from .inspection import QTYPE_LABELS

    for t in node.inputs:
        dq = sim.dq_of(t)
        qp = qparams(dq) if dq is not None else None
        if qp is not None:
            return QTYPE_LABELS.get(np.dtype(qp.qdtype).name, "int8")
    return "int8"


class _Sim:
    """TensorRT's Q/DQ processing on a private graph; see the module docstring for the steps."""

    def __init__(self, graph: gs.Graph) -> None:
        self.g = graph
        self.nodes: list[gs.Node] = list(graph.nodes)
        for i, n in enumerate(self.nodes):
            if not n.name:
                n.name = f"{n.op}_{i}"
        self.outputs = {id(t) for t in graph.outputs}
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
        n.inputs.clear()
        n.outputs.clear()

    def fresh_name(self, origin: str) -> str:
        if origin not in self.used_names:
            return origin
        k = 1
        while f"{origin}_clone_{k}" in self.used_names:
            k += 1
        return f"{origin}_clone_{k}"

    def new_var(self, base: str) -> gs.Variable:
        self._var += 1
        return gs.Variable(f"{base}__sim{self._var}")

    def template(self, like: gs.Node) -> tuple[str, str, dict, list[gs.Tensor], tuple]:
        """What a moved copy of ``like`` needs, captured before ``like`` is detached."""
        return (like.op, self.origin[id(like)], dict(like.attrs), list(like.inputs[1:]), self.key(like))

    def clone_qdq(self, tpl: tuple[str, str, dict, list[gs.Tensor], tuple], data: gs.Tensor,
                  out: gs.Tensor) -> gs.Node:
        op, origin, attrs, qinputs, key = tpl
        node = gs.Node(op, name=self.fresh_name(origin), attrs=dict(attrs), inputs=[data, *qinputs], outputs=[out])
        self.used_names.add(node.name)
        self.origin[id(node)] = origin
        self.keys[id(node)] = key
        self.nodes.append(node)
        return node

    def redirect(self, old: gs.Tensor, new: gs.Tensor) -> None:
        for c in list(old.outputs):
            for i, t in enumerate(c.inputs):
                if t is old:
                    c.inputs[i] = new

    def const_path(self, t: gs.Tensor | None) -> bool:
        # A weight may sit behind Q, DQ, Identity, Cast or Transpose (TF exports transpose weights).
        for _ in range(8):
            if t is None:
                return False
            if const_value(t) is not None:
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
                seen: dict[tuple, gs.Node] = {}
                for c in list(t.outputs):
                    if not test(c) or c.inputs[0] is not t:
                        continue
                    k = self.key(c)
                    keep = seen.get(k)
                    if keep is None:
                        seen[k] = c
                        continue
                    out = c.outputs[0]
                    if self.is_graph_output(out):
                        continue
                    self.redirect(out, keep.outputs[0])
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
                idx = [i for i in R.data_input_indices(c) if c.inputs[i] is not None and c.inputs[i].name]
                if not idx or not any(c.inputs[i] is d.outputs[0] for i in idx):
                    continue
                srcs = [self.dq_of(c.inputs[i]) for i in idx]
                if any(s is None for s in srcs):
                    continue
                if len({self.key(s) for s in srcs}) != 1:  # P4/P5: unequal scales, the DQ stays put
                    continue
                tpl = self.template(srcs[0])
                for i, s in zip(idx, srcs):
                    c.inputs[i] = s.inputs[0]
                for s in {id(s): s for s in srcs}.values():
                    if not s.outputs[0].outputs and not self.is_graph_output(s.outputs[0]):
                        self.detach(s)
                for j, o in enumerate(list(c.outputs)):
                    o8 = self.new_var(o.name)
                    c.outputs[j] = o8
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
            qs: list[gs.Node] = []
            for o in p.outputs:
                readers = list(o.outputs)
                if self.is_graph_output(o) or len(readers) != 1 or not self.act_q(readers[0]) \
                        or self.key(readers[0]) != self.key(q):
                    break
                qs.append(readers[0])
            if len(qs) != len(p.outputs):
                continue
            idx = [i for i in R.data_input_indices(p) if p.inputs[i] is not None and p.inputs[i].name]
            if not idx:
                continue
            tpl = self.template(q)
            for j, qj in enumerate(qs):
                out = qj.outputs[0]
                self.detach(qj)
                p.outputs[j] = out
            for i in idx:
                u = p.inputs[i]
                reuse = next((c for c in u.outputs if self.act_q(c) and self.key(c) == tpl[4]), None)
                if reuse is None:
                    reuse = self.clone_qdq(tpl, u, self.new_var(u.name))
                    work.append(reuse)
                p.inputs[i] = reuse.outputs[0]
            self.int8_ops.add(id(p))
            changed = True
        return changed

    def cancel(self) -> bool:
        """``DQ(s)→Q(s)`` disappears; the Q's readers take the INT8 tensor directly."""
        changed = False
        for d in [n for n in self.nodes if self.act_dq(n)]:
            v, a = d.outputs[0], d.inputs[0]
            for q in list(v.outputs):
                if self.act_q(q) and self.key(q) == self.key(d) and not self.is_graph_output(q.outputs[0]):
                    self.redirect(q.outputs[0], a)
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


@dataclass
class _Chain:
    head: gs.Node
    members: list[gs.Node]
    end: gs.Tensor
    int8_in: bool
    int8_out: bool
    residual: gs.Node | None
    skip_dq: gs.Node | None
    reason: str


def _fuse(sim: _Sim):
    """Step 3: fusion and precision. Returns (chains, absorbed DQ edges, absorbed Qs, node reasons)."""
    claimed: set[int] = set()
    absorbed_edges: set[tuple[int, int]] = set()
    absorbed_q: set[int] = set()
    float_reason: dict[int, tuple[str, str]] = {}  # node id -> (rule, why it runs float)
    end_reason: dict[int, tuple[str, str]] = {}  # tensor id -> (rule, why its producer writes float)
    chains: list[_Chain] = []
    int8_units: list[gs.Node] = []

    def single_q_reader(t: gs.Tensor) -> gs.Node | None:
        if sim.is_graph_output(t) or len(t.outputs) != 1:
            return None
        c = t.outputs[0]
        return c if sim.act_q(c) else None

    for n in sim.nodes:
        rule = R.rule_for(n.op)
        if rule is None or rule.role != "weighted" or id(n) in claimed or not n.outputs:
            continue
        widx = weight_input_index(n)
        if widx is None:
            if len(rule.data_inputs) < 2:
                continue
            act_idx = list(rule.data_inputs)  # activation x activation GEMM (attention): INT8 with both from DQs
        else:
            act_idx = [i for i in rule.data_inputs if i != widx]
        missing_act = [i for i in act_idx if sim.dq_of(n.inputs[i]) is None]
        weight_ok = widx is None or sim.qweight(n.inputs[widx])
        int8_in = not missing_act and weight_ok
        if missing_act:
            reason = ("F1", f"{n.name}: activation input not from a DQ; runs float"
                      + (" with its quantized weight dequantized (weight-only)" if widx is not None and weight_ok else ""))
        elif not weight_ok:
            reason = ("F1", f"{n.name}: weight not quantized (no DQ); runs float")
        else:
            reason = ("", "")
        members = [n]
        t = n.outputs[0]
        residual = skip = skip_dq = None
        while not sim.is_graph_output(t):
            cons = list(t.outputs)
            if len(cons) == 1 and id(cons[0]) not in claimed:
                e = cons[0]
                er = R.rule_for(e.op)
                if residual is None and R.is_residual_add(e):
                    other = e.inputs[1] if e.inputs[0] is t else e.inputs[0]
                    if other is t:
                        break
                    residual, skip, skip_dq = e, other, sim.dq_of(other)
                elif (R.is_epilogue(e) and not R.is_residual_add(e) and not R.is_silu_mul(e)
                      and er is not None and n.op in er.fuses_after):
                    pass
                else:
                    break
                members.append(e)
                claimed.add(id(e))
                t = e.outputs[0]
                continue
            if len(cons) == 2:  # SiLU: t feeds Sigmoid and Mul(t, Sigmoid(t)) (F10)
                sig = next((c for c in cons if R.is_silu_sigmoid(c)), None)
                mul = next((c for c in cons if R.is_silu_mul(c) and not R.is_silu_sigmoid(c)), None)
                if (sig is not None and mul is not None and id(sig) not in claimed and id(mul) not in claimed
                        and list(sig.outputs[0].outputs) == [mul] and any(x is t for x in mul.inputs)):
                    members += [sig, mul]
                    claimed.update((id(sig), id(mul)))
                    t = mul.outputs[0]
                    continue
            # Erf-form GELU after a GEMM/conv: one epilogue (F3; seen fused in NVIDIA/TensorRT#4397).
            gelu = R.gelu_region(t) if n.op in R.RULES["Gelu"].fuses_after else None
            if gelu is not None and not any(id(g) in claimed or sim.is_graph_output(g.outputs[0]) for g in gelu[0][:-1]):
                members += gelu[0]
                claimed.update(id(g) for g in gelu[0])
                t = gelu[1]
                continue
            break
        end_q = single_q_reader(t)
        skip_ok = residual is None or skip_dq is not None
        int8_out = int8_in and end_q is not None and skip_ok
        if int8_in:
            for i in act_idx:
                absorbed_edges.add((id(sim.dq_of(n.inputs[i])), id(n)))
        if int8_out:
            absorbed_q.add(id(end_q))
            if skip_dq is not None:
                absorbed_edges.add((id(skip_dq), id(residual)))
            # F11: an INT8 MaxPool reading the chain's INT8 output joins the kernel (ConvActPool).
            readers = list(end_q.outputs[0].outputs)
            if len(readers) == 1 and id(readers[0]) in sim.int8_ops and R.fuses_with_conv_act(readers[0]):
                members.append(readers[0])
        if not int8_in:
            end_reason[id(t)] = reason
        elif residual is not None and skip_dq is None:
            end_reason[id(t)] = ("F5", f"residual {residual.name} has a float skip operand, so the fused "
                                       f"{n.name} chain writes float")
        elif not int8_out:
            end_reason[id(t)] = ("F2", f"{n.name} chain output is not read by a single Q; it writes float")
        if residual is not None and skip_dq is not None and not int8_out:
            float_reason[id(residual)] = ("F5", f"{residual.name} fused into {n.name} writes float, so its skip "
                                                f"operand must be dequantized")
        if not int8_in:
            float_reason[id(n)] = reason
            for m in members[1:]:
                float_reason[id(m)] = reason
        chains.append(_Chain(n, members, t, int8_in, int8_out, residual, skip_dq, reason[1]))

    # Non-weighted compute: INT8 only fully wrapped (P7), float otherwise.
    for n in sim.nodes:
        if id(n) in claimed or is_q(n) or is_dq(n) or id(n) in sim.int8_ops or R.is_shape_op(n):
            continue
        rule = R.rule_for(n.op)
        if rule is not None and rule.role == "weighted":
            continue
        if R.is_silu_sigmoid(n):
            continue  # judged together with its Mul
        unit = [n]
        if R.is_silu_mul(n):
            sig = next(producer(t) for t in n.inputs if producer(t) is not None and R.is_silu_sigmoid(producer(t)))
            data = [sig.inputs[0]]
            unit = [sig, n]
        elif R.is_quantizable_wrapped(n) and not R.is_float_only(n):
            # Constant operands (also DQ'd constants, e.g. ORT's quantized anchors) need no DQ of their own.
            data = [n.inputs[i] for i in R.data_input_indices(n) if not sim.const_path(n.inputs[i])]
        else:
            why = ("P9", f"{n.name} ({n.op}) has no INT8 kernel; runs float") if rule is not None else \
                ("P9", f"{n.name} ({n.op}) is not in the TensorRT rules table; assumed float")
            if rule is not None and rule.role == "commuting":
                why = ("C1", f"{n.name} ({n.op}) commutes but its Q/DQ could not move through it "
                             f"(unquantized input, readers disagree, or unequal scales P4/P5); runs float")
            float_reason[id(n)] = why
            for o in n.outputs:
                end_reason[id(o)] = why
            continue
        out = unit[-1].outputs[0] if unit[-1].outputs else None
        dqs = [sim.dq_of(t) for t in data]
        end_q = single_q_reader(out) if out is not None and len(unit[-1].outputs) == 1 else None
        if data and all(d is not None for d in dqs) and end_q is not None:
            for d in dqs:
                absorbed_edges.add((id(d), id(unit[0])))
                if len(unit) > 1:
                    absorbed_edges.add((id(d), id(unit[-1])))
            absorbed_q.add(id(end_q))
            int8_units.extend(unit)
            continue
        missing = "its output is not read by a single Q" if all(d is not None for d in dqs) and data else \
            "not every data input comes from a DQ"
        why = ("P7", f"{n.name} ({n.op}) is not fully wrapped in Q/DQ ({missing}); runs float")
        for u in unit:
            float_reason[id(u)] = why
        if out is not None:
            end_reason[id(out)] = why
    _fuse_mha(sim, chains, absorbed_q)
    return chains, absorbed_edges, absorbed_q, float_reason, end_reason, int8_units


def _fuse_mha(sim: _Sim, chains: list[_Chain], absorbed_q: set[int]) -> None:
    """Attention with Q/DQ before both batch GEMMs fuses into one MHA kernel (NVIDIA/TensorRT#3243).

    ``MatMul(DQ, DQ) → [scale, mask] → Softmax → Q → DQ → MatMul(·, DQ)``: the Quantize of the
    Softmax output is inside the fused kernel, not a layer of its own. A maintainer's statement
    (explicit quantization needs Q/DQ before the two batch GEMMs for INT8 MHA fusion); the kernel
    boundaries of 10.x/11.x Myelin MHA are not in our engine dumps.
    """
    int8_heads = {id(c.head) for c in chains if c.int8_in}
    for score, context in R.attention_gemms(sim.g):
        if id(score) not in int8_heads or id(context) not in int8_heads:
            continue
        dq = sim.dq_of(context.inputs[0])
        q = producer(dq.inputs[0]) if dq is not None else None
        soft = producer(q.inputs[0]) if sim.act_q(q) else None
        if soft is not None and soft.op == "Softmax":
            absorbed_q.add(id(q))


def _trip_count(loop: gs.Node) -> int:
    """How many times a Loop surely runs its body: its constant trip count when no condition can end it
    early; else 1 (the count is only an upper bound, e.g. Paddle's 1024 for a decoder that stops at EOS)."""
    if loop.op != "Loop" or not loop.inputs or loop.inputs[0] is None or not loop.inputs[0].name:
        return 1
    if len(loop.inputs) > 1 and loop.inputs[1] is not None and loop.inputs[1].name:
        return 1
    value = const_value(loop.inputs[0])
    return max(1, int(np.asarray(value).reshape(()))) if value is not None and np.size(value) == 1 else 1


def _nested_weighted_ops(graph: gs.Graph) -> list[dict[str, Any]]:
    """Weighted ops inside If/Loop/Scan bodies, so the MAC share counts them (they used to be invisible).

    The simulation covers the top-level graph only. A body op is INT8 (writing float: nothing
    outside the body can absorb its output Q) when its activation and weight come from DQs in its
    own body (F1); otherwise float. Both branches of an If count (the engine holds both); a Loop
    body counts once, or trip-count times when the count is a constant and no condition ends it early.
    """
    out: list[dict[str, Any]] = []
    for node, path in nested_nodes(graph):
        rule = R.rule_for(node.op)
        if rule is None or rule.role != "weighted":  # GEMMs on loop-carried weights (Paddle exports) count too
            continue
        repeat = int(np.prod([_trip_count(p) for p, _ in path]))
        widx = weight_input_index(node)
        body = {id(n) for n in path[-1][0].attrs[path[-1][1]].nodes}
        local_dq = [producer(t) for t in node.inputs[:2]]
        int8 = widx is not None and all(p is not None and is_dq(p) and id(p) in body for p in local_dq)
        where = " > ".join(f"{p.op} '{p.name}' {attr}" for p, attr in path)
        out.append(asdict(WeightedOpPrediction(
            node.name, node.op, INT8_FLOAT if int8 else FLOAT, weighted_op_macs(node) * repeat, (node.name,),
            f"inside {where}" + ("" if int8 else ": runs float"))))
    return out


def predict(model_or_graph: onnx.ModelProto | gs.Graph) -> TrtPrediction:
    """Predict the TensorRT engine for a Q/DQ model (see the module docstring for the semantics).

    Takes an ``onnx.ModelProto`` or a ``gs.Graph``; neither is modified.
    """
    graph = _working_graph(model_or_graph)
    sim = _Sim(graph)
    macs = {id(n): weighted_op_macs(n) for n in sim.nodes if R.is_weighted(n)}
    sim.move()
    chains, absorbed_edges, absorbed_q, float_reason, end_reason, int8_units = _fuse(sim)

    layers: list[StandaloneLayer] = []
    transitions: list[dict[str, str]] = []
    for n in sim.nodes:
        if sim.act_dq(n):
            v = n.outputs[0]
            bad = [c for c in v.outputs
                   if (id(n), id(c)) not in absorbed_edges and not sim.act_q(c) and not R.is_shape_op(c)]
            if not bad and not sim.is_graph_output(v):
                continue
            if bad:
                rule, why = float_reason.get(id(bad[0]), ("P7", f"reader {bad[0].name} ({bad[0].op}) runs float"))
            else:
                rule, why = "P9", f"{v.name} is a graph output"
            layers.append(StandaloneLayer(n.name, sim.origin.get(id(n), n.name), "dequantize", v.name, rule, why))
            transitions.append({"tensor": v.name, "change": "int8->float", "layer": n.name})
        elif sim.act_q(n) and id(n) not in absorbed_q:
            v = n.inputs[0]
            p = producer(v)
            if sim.act_dq(p):
                rule, why = "E3", (f"requantize: {p.name} feeds {n.name} with a different scale "
                                   f"(align scales: P4 Concat, P5 MaxPool, P6 fan-out)")
                layers.append(StandaloneLayer(n.name, sim.origin.get(id(n), n.name), "requantize", v.name, rule, why))
                continue
            others = [c for c in v.outputs if c is not n]
            if p is None:
                rule, why = "P10", f"quantize of the graph input {v.name}"
            elif others and all(sim.act_q(c) for c in others):
                rule, why = "P6", f"{v.name} has Qs with different scales; none fuses into {p.name}"
            elif others or sim.is_graph_output(v):
                floats = [c.name for c in others if not sim.act_q(c)] or ["graph output"]
                rule, why = "C1", f"{v.name} also feeds float reader(s) {', '.join(floats[:3])}; {p.name} writes float"
            else:
                rule, why = end_reason.get(id(v), ("F2", f"producer {p.name} ({p.op}) writes float"))
            layers.append(StandaloneLayer(n.name, sim.origin.get(id(n), n.name), "quantize", v.name, rule, why))
            transitions.append({"tensor": v.name, "change": "float->int8", "layer": n.name})

    weighted: list[dict[str, Any]] = []
    by_head = {id(c.head): c for c in chains}
    for n in sim.nodes:
        if id(n) not in macs:
            continue
        c = by_head.get(id(n))
        # The chain's quantized type (its activation DQ's): FP8 layers are labelled fp8, not int8.
        q = "int8" if c is None or not c.int8_in else _qlabel(sim, n)
        prec = FLOAT if c is None or not c.int8_in else (f"{q}->{q}" if c.int8_out else f"{q}->float")
        weighted.append(asdict(WeightedOpPrediction(
            n.name, n.op, prec, int(macs[id(n)]), tuple(m.name for m in c.members) if c else (n.name,),
            c.reason if c else "")))
    weighted.extend(_nested_weighted_ops(graph))
    total = sum(w["macs"] for w in weighted)
    int8_macs = sum(w["macs"] for w in weighted if w["precision"].startswith("int8"))
    reasons: dict[str, str] = {}
    for s in layers:
        text = f"{s.rule}: {s.reason}"
        reasons[s.node] = text if s.node not in reasons else f"{reasons[s.node]}; {text}"
    int8_ops = [n.name for n in sim.nodes if id(n) in sim.int8_ops] + [n.name for n in int8_units]
    pred = TrtPrediction(
        weighted_ops=weighted,
        int8_weighted_ops=sum(1 for w in weighted if w["precision"].startswith("int8")),
        int8_mac_fraction=float(int8_macs / total) if total else 0.0,
        standalone_qdq=[s.node for s in layers],
        standalone_qdq_layers=len(layers),
        standalone_reasons=reasons,
        precision_transitions=len(transitions),
        standalone_layers=layers,
        transitions=transitions,
        int8_ops=int8_ops,
        fused_groups=[[m.name for m in c.members] for c in chains if len(c.members) > 1],
    )
    logger.debug("predicted %d standalone Q/DQ, %d/%d INT8 weighted ops", pred.standalone_qdq_layers,
                 pred.int8_weighted_ops, len(weighted))
    return pred
