"""Step 4 of the static TensorRT model and its report: standalone Q/DQ, weighted-op precision and
MACs, the kernel list, the predictions resting on unverified rules; :func:`predict` runs all steps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .. import trt_rules as R
from ..graph import const_value, is_constant, is_dq, is_q, nested_nodes, producer, weight_input_index
from ..qdq import conv_chain, source_of

from .fuse import _Chain, _fuse
from .simulate import _const_shape, _qlabel, _shape, _Sim, _working_graph

__all__ = ["Kernel", "StandaloneLayer", "WeightedOpPrediction", "TrtPrediction", "predict", "weighted_op_macs",
           "INT8_INT8", "INT8_FLOAT", "FLOAT"]

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


def _fields(record: object) -> dict[str, Any]:
    """``dataclasses.asdict`` of a flat record (str, int and tuple-of-str fields): its fields as they are,
    without asdict's recursive copying, which was a tenth of the analysis on large graphs."""
    return dict(vars(record))


@dataclass(frozen=True)
class Kernel:
    """One predicted engine layer: the ONNX nodes it runs (``nodes``, weight initializers in
    ``weights``), the tensors it reads and writes (Q/DQ looked through), and its precision."""

    name: str
    kind: str  # "Convolution" | "Gemm" | "PointWise" | "Pooling" | "Quantize" | "Dequantize" | "Requantize" | op type
    nodes: tuple[str, ...]
    weights: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    in_precision: str = "float"
    out_precision: str = "float"
    standalone_qdq: bool = False


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
    trt_version: str = ""
    #: The predicted engine layers in graph order (:class:`Kernel`).
    kernels: list[Kernel] = field(default_factory=list)
    #: Predictions that rest on rules no engine or document confirms for ``trt_version``:
    #: [{"rule", "claim", "nodes"}], one entry per rule.
    unverified: list[dict[str, Any]] = field(default_factory=list)

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
            "standalone_layers": [_fields(s) for s in self.standalone_layers],
            "requantize_layers": self.requantize,
            "int8_ops": list(self.int8_ops),
            "trt_version": self.trt_version,
            "kernels": [_fields(k) for k in self.kernels],
            "unverified": [dict(u, nodes=list(u["nodes"])) for u in self.unverified],
        }


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
        out.append(_fields(WeightedOpPrediction(
            node.name, node.op, INT8_FLOAT if int8 else FLOAT, weighted_op_macs(node) * repeat, (node.name,),
            f"inside {where}" + ("" if int8 else ": runs float"))))
    return out




def _kernels(sim: _Sim, chains: list[_Chain], int8_units: list[gs.Node], layers: list[StandaloneLayer]) -> list[Kernel]:
    """The engine as a list of kernels, in graph order.

    A weighted chain is one kernel (its epilogue included); an INT8 wrapped op (or SiLU pair) is one;
    every standalone Q/DQ is one. Float compute left over is grouped the way TensorRT's PointWise
    fusion does it: a run of float elementwise/activation nodes, each read only by the next, is one
    PointWise kernel; other float ops are one kernel each; pure data movement is free (trt_rules.FREE_OPS,
    shape ops; trt_rules.FREE_OPS). Tensors are named by their float source (a DQ(Q(x)) output is ``x``), so kernels link.
    """
    def src(t: gs.Tensor | None) -> str:
        return source_of(t).name if t is not None and t.name else ""

    def weight_names(n: gs.Node) -> tuple[str, ...]:
        out = []
        for t in n.inputs:
            for _ in range(8):
                if t is None:
                    break
                if is_constant(t):
                    if t.name:
                        out.append(t.name)
                    break
                p = producer(t)
                if p is None or not (is_q(p) or is_dq(p) or p.op in R.WEIGHT_PASSTHROUGH_OPS):
                    break
                t = p.inputs[0]
        return tuple(out)

    placed: dict[int, Kernel] = {}  # first node id -> kernel, to emit in graph order
    taken: set[int] = set()
    for c in chains:
        ins = [src(t) for t in c.head.inputs[:1]] + ([src(c.skip_dq.outputs[0])] if c.skip_dq is not None else [])
        kind = "Gemm" if c.head.op in ("Gemm", "MatMul") else "Convolution"
        q = _qlabel(sim, c.head) if c.int8_in else "float"
        placed[id(c.head)] = Kernel(" + ".join(m.name for m in c.members), kind, tuple(m.name for m in c.members),
                                    weight_names(c.head), tuple(ins), (c.end.name,), q,
                                    q if c.int8_out else "float")
        taken.update(id(m) for m in c.members)
    unit: list[gs.Node] = []
    for n in int8_units:  # a SiLU pair comes as (Sigmoid, Mul): one kernel
        unit.append(n)
        if R.is_silu_sigmoid(n):
            continue
        kind = "Pooling" if n.op in R.POOLING_OPS else "PointWise"
        data = [src(t) for t in unit[0].inputs if t is not None and t.name and not sim.const_path(t)]
        placed[id(unit[0])] = Kernel(" + ".join(u.name for u in unit), kind, tuple(u.name for u in unit), (),
                                     tuple(dict.fromkeys(data)), tuple(o.name for o in n.outputs), "int8", "int8")
        taken.update(id(u) for u in unit)
        unit = []
    by_node = {s.layer: s for s in layers}
    float_nodes = [n for n in sim.nodes if sim.live(n) and id(n) not in taken and not is_q(n) and not is_dq(n)
                   and not R.is_shape_op(n) and n.op not in R.FREE_OPS and not sim.const_path(n.outputs[0] if n.outputs else None)]
    pointwise = {id(n) for n in float_nodes
                 if (R.rule_for(n.op) is not None and R.rule_for(n.op).role in ("epilogue", "wrapped")
                     and n.op not in R.POOLING_OPS and n.op != "Resize") or n.op in ("Erf", "Exp", "Log", "Pow", "Sqrt", "Reciprocal")}
    grouped: set[int] = set()
    for n in float_nodes:
        if id(n) in grouped:
            continue
        group = [n]
        grouped.add(id(n))
        while id(group[-1]) in pointwise and len(group[-1].outputs) == 1 and not sim.is_graph_output(group[-1].outputs[0]):
            nxt = [c for c in group[-1].outputs[0].outputs]
            if len(nxt) != 1 or id(nxt[0]) not in pointwise or id(nxt[0]) in grouped or id(nxt[0]) in taken:
                break
            group.append(nxt[0])
            grouped.add(id(nxt[0]))
        kind = "PointWise" if id(n) in pointwise else ("Pooling" if n.op in R.POOLING_OPS else n.op)
        data = [src(t) for g in group for t in g.inputs if t is not None and t.name and not sim.const_path(t)
                and t.inputs and t.inputs[0] not in group]
        prec = "int8" if id(n) in sim.int8_ops else "float"  # a commuting op the Q/DQ moved across runs INT8
        placed[id(n)] = Kernel(" + ".join(g.name for g in group), kind, tuple(g.name for g in group), weight_names(n),
                               tuple(dict.fromkeys(data)), tuple(o.name for o in group[-1].outputs), prec, prec)
    for n in sim.nodes:
        s_layer = by_node.get(n.name)
        if s_layer is None or not sim.live(n):
            continue
        prec = {"quantize": ("float", "int8"), "dequantize": ("int8", "float"), "requantize": ("int8", "int8")}[s_layer.kind]
        placed[id(n)] = Kernel(s_layer.node, s_layer.kind.capitalize(), (s_layer.node,), (),
                               (n.inputs[0].name,), (n.outputs[0].name,), *prec, standalone_qdq=True)
    return [placed[id(n)] for n in sim.nodes if id(n) in placed]


def _unverified(sim: _Sim, chains: list[_Chain], int8_units: list[gs.Node]) -> list[dict[str, Any]]:
    """Which parts of the prediction rest on rules tagged "inferred, unverified" for ``sim.version``:
    fusions and INT8 kernels of ops whose table entry has no documented or seen confidence, and the
    version-dependent rules (E8.1) applied outside the releases their evidence covers."""
    found: dict[str, dict[str, Any]] = {}

    def add(rule: str, claim: str, name: str) -> None:
        entry = found.setdefault(rule, {"rule": rule, "claim": claim, "nodes": []})
        if name not in entry["nodes"]:
            entry["nodes"].append(name)

    def check(n: gs.Node, as_what: str) -> None:
        rule = R.rule_for(n.op)
        if rule is not None and set(rule.confidence) == {R._INF}:
            add("/".join(rule.rules), f"{n.op} {as_what} ({rule.note or 'inferred'})", n.name)

    gelu = R.RULES["Gelu"]
    for c in chains:
        if not c.int8_in:
            continue
        in_gelu = any(m.op == "Erf" for m in c.members)  # an Erf-form GELU region: judged as the Gelu epilogue
        for m in c.members[1:]:
            if in_gelu and m.op in ("Div", "Mul", "Erf", "Add") and not R.is_bias_add(m) and not R.is_residual_add(m):
                if set(gelu.confidence) == {R._INF}:
                    add("/".join(gelu.rules), f"GELU fuses into the kernel before it ({gelu.note})", m.name)
                continue
            check(m, "fuses into the INT8 kernel before it")
    for n in int8_units:
        check(n, "runs as an INT8 layer when wrapped in Q/DQ")
    e81 = R.VERSIONED_RULES["E8.1"]
    if e81.confidence_at(sim.version) == R._INF:
        # Residual Adds after an activated conv chain: their kernels (and the placement chosen for them) rest on E8.1.
        for n in sim.nodes:
            if not sim.live(n) or not R.is_residual_add(n):
                continue
            chains = [c for c in (conv_chain(source_of(t), exclusive=False) for t in n.inputs) if c is not None]
            if chains and not any(R.residual_add_joins_chain(c, sim.version) for c in chains):
                add(e81.id, e81.describe(sim.version), n.name)
    return list(found.values())


def predict(model_or_graph: onnx.ModelProto | gs.Graph, *, trt_version: R.Version | str | None = None,
            own: gs.Graph | None = None) -> TrtPrediction:
    """Predict the TensorRT engine for a Q/DQ model (see the module docstring for the semantics).

    Takes an ``onnx.ModelProto`` or a ``gs.Graph``; neither is modified. ``trt_version``
    (default: the newest release the rules describe) selects the version-dependent rules.
    ``own``: the graph a ModelProto was exported from, given up by the caller, which the
    prediction then rewrites instead of importing the model again (optimize's pipeline graph).
    """
    graph = _working_graph(model_or_graph, own)
    sim = _Sim(graph, R.parse_version(trt_version))
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
            elif not others and R.commutes(p) and all(id(p.inputs[i]) in sim.inputs for i in R.data_input_indices(p)
                                                      if p.inputs[i] is not None and p.inputs[i].name):
                rule, why = "P10", f"quantize of the graph input after {p.name} ({p.op}): nothing before it to fuse into"
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
        weighted.append(_fields(WeightedOpPrediction(
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
        trt_version=R.version_label(sim.version),
        kernels=_kernels(sim, chains, int8_units, layers),
        unverified=_unverified(sim, chains, int8_units),
    )
    logger.debug("predicted %d standalone Q/DQ, %d/%d INT8 weighted ops", pred.standalone_qdq_layers,
                 pred.int8_weighted_ops, len(weighted))
    return pred
