"""insert-qdq: put symmetric INT8 Q/DQ on the inputs of every weighted op (the PTQ path).

Before → after::

    x ─ Conv(W, b)          →   x ─ Q(s_x) ─ DQ(s_x) ─ Conv(W~, b)
                                W ─ Q(s_w, axis=0) ─ DQ(s_w, axis=0) ─┘     (or int8 W → DQ)

Rules served: P1/F1 (both operands of Conv/ConvTranspose/Gemm/MatMul from DQs), V1 (scales
positive), V2 (zero point int8 0), V3 (per-channel weights on the output-channel axis with
``axis`` written; activations per-tensor), V4 (biases stay float), P6 (one Q/DQ pair per tensor,
shared by every weighted consumer). Error bound: activations round to within half a step of
``amax/127`` inside the calibrated range and clip outside it; weights within half a step of
their channel's ``max|w|/127``. Needs opset ≥ 13 (per-channel ``axis``).

float16 and bfloat16 models keep their type: scales are written in the type of the tensor they
quantize (the DQ output type is its scale's), weights stay in the model's type, and the opset is
raised to 19 in place (where QuantizeLinear starts taking float16/bfloat16) when no op present
changes meaning on the way (``float16_regions.opset_blockers``), else :class:`ModelError` asks for
``--opset 19``. float16 scales are clamped to [2^-14, 65504] (V1).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..config import Config
from ..errors import ModelError
from ..graph import (DQ_OP, Q_OP, after_plugins, const_value, is_dq, is_float_dtype, nested_nodes, new_variable, np_dtype,
                     opset_version, producer)
from ..io import MIN_PER_CHANNEL_OPSET
from ..quant import quantize_int8, scale_from_amax, scale_in, weight_scales
from ..rewriter import Rewriter
from ..trt_rules import WEIGHTED_OPS, attention_gemms, commutes, is_weighted, misaligned_channels, weight_axis
from .base import Pass, PassContext
from .float16_regions import FP16_SCALE_OPSET

__all__ = ["InsertQdq", "is_excluded", "inline_constant_ifs", "unreachable_ops"]

logger = logging.getLogger(__name__)


def is_excluded(node: gs.Node, ctx: PassContext) -> tuple[str, str] | None:
    """(why, rule) when ``node`` must stay float: by user configuration (P1) or by its channel counts (P11); else None."""
    cfg = ctx.config
    if node.op in cfg.exclude_ops:
        return f"op type {node.op} excluded (--exclude-op)", "P1"
    for pattern in cfg.exclude:
        if re.search(pattern, node.name):
            return f"name matches --exclude {pattern!r}", "P1"
    if cfg.exclude_hook is not None and cfg.exclude_hook(node):
        return "excluded by the exclude hook", "P1"
    if not cfg.quantize_small_convs:
        why = misaligned_channels(node)
        if why:
            return f"{why} (P11; --quantize-small-convs quantizes it)", "P11"
    return None


def _folded_weight(tensor: gs.Tensor) -> np.ndarray | None:
    """The weight's value, folding Identity/Cast/Transpose applied to an initializer."""
    value = const_value(tensor)
    if value is not None:
        return value
    node = producer(tensor)
    if node is not None and node.op == "Transpose":
        inner = _folded_weight(node.inputs[0])
        if inner is not None:
            perm = node.attrs.get("perm")
            return np.transpose(inner, perm) if perm is not None else np.transpose(inner)
    return None


def _reads_quantized(tensor: gs.Tensor) -> bool:
    """A DQ output, or a zero Pad of one (the pair moved above the Pad, P8)."""
    node = producer(tensor)
    if node is not None and node.op == "Pad" and commutes(node):
        node = producer(node.inputs[0])
    return is_dq(node)


def _is_float(tensor: gs.Tensor) -> bool:
    return tensor.dtype is None or is_float_dtype(tensor.dtype)


def _float_type(tensor: gs.Tensor) -> np.dtype:
    """The float type Q/DQ on ``tensor`` compute in: its own (float16, bfloat16), float32 when unknown or wider."""
    dt = np_dtype(tensor.dtype)
    return dt if dt is not None and dt.name in ("float16", "bfloat16") else np.dtype(np.float32)


def _model_float_types(graph: gs.Graph) -> set[str]:
    """Names of the reduced float types (float16, bfloat16) the graph's inputs, outputs and initializers use."""
    found = set()
    for t in [*graph.inputs, *graph.outputs, *(t for t in graph.tensors().values() if isinstance(t, gs.Constant))]:
        dt = np_dtype(t.dtype)
        if dt is not None and dt.name in ("float16", "bfloat16"):
            found.add(dt.name)
    return found


class InsertQdq(Pass):
    """Insert per-tensor Q/DQ on activations and per-channel Q/DQ on weights of weighted ops."""

    name = "insert-qdq"
    edits_through_rewriter = True
    summary = "Insert symmetric INT8 Q/DQ on weighted-op inputs (per-tensor activations, per-channel weights)"
    rules = ("P1", "F1", "V1", "V2", "V3", "V4", "P6")
    min_opset = MIN_PER_CHANNEL_OPSET
    opset_reason = "per-channel weight Q/DQ (the axis attribute, V3)"

    def opset_needed(self, model: onnx.ModelProto, config: Config) -> tuple[int, str]:
        """13 for per-channel weights; 19 when the model computes in float16/bfloat16 (scales of that type)."""
        reduced = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
        g = model.graph
        if any(v.type.tensor_type.elem_type in reduced for v in [*g.input, *g.output]) or \
                any(t.data_type in reduced for t in g.initializer):
            return FP16_SCALE_OPSET, f"{self.name}: Q/DQ scales in the model's float16/bfloat16 type (P1)"
        return super().opset_needed(model, config)

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        if opset_version(graph) < MIN_PER_CHANNEL_OPSET:
            raise ModelError(f"insert-qdq needs opset >= {MIN_PER_CHANNEL_OPSET} for per-channel weights "
                             f"(model has {opset_version(graph)}); pass --opset {MIN_PER_CHANNEL_OPSET} to upgrade")

    def _targets(self, graph: gs.Graph, rw: Rewriter, ctx: PassContext) -> tuple[list[tuple[gs.Node, int, int | None]], list[tuple[gs.Node, int]]]:
        """(weighted op, weight index, axis) to quantize, and (op, input index) activations."""
        weighted: list[tuple[gs.Node, int, int | None]] = []
        acts: list[tuple[gs.Node, int]] = []
        bmm = ctx.config.quantize_bmm
        attention = {id(n) for pair in attention_gemms(graph) for n in pair} if bmm is None else set()
        for node in graph.nodes:
            if node.op not in WEIGHTED_OPS:
                continue
            excluded = is_excluded(node, ctx)
            if excluded:
                rw.note(node, f"left float: {excluded[0]}", rule=excluded[1])
                continue
            if is_weighted(node):
                widx = 1 if node.op != "MatMul" or _folded_weight(node.inputs[1]) is not None or is_dq(producer(node.inputs[1])) else 0
                aidx = 0 if widx == 1 else 1
                weighted.append((node, widx, weight_axis(node, convtranspose_axis=ctx.config.convtranspose_axis)))
                acts.append((node, aidx))
            elif node.op == "MatMul" and (bmm or id(node) in attention):
                acts.extend([(node, 0), (node, 1)])
            elif node.op == "MatMul" and bmm is None:
                rw.note(node, "batch GEMM outside an attention block: left float (--quantize-bmm quantizes it)", rule="P1")
        return weighted, acts

    def run(self, graph: gs.Graph, rw: Rewriter, ctx: PassContext) -> None:
        inline_constant_ifs(graph, rw)
        reduced = _model_float_types(graph)
        if reduced:
            # float16/bfloat16 data is quantized with scales of its own type (the DQ output type is the
            # scale's), which QuantizeLinear accepts from opset 19 on.
            from .float16_regions import raise_opset_for_float_scales

            raise_opset_for_float_scales(graph, rw, "/".join(sorted(reduced)), rule="P1")
        weighted, acts = self._targets(graph, rw, ctx)
        skip = unreachable_ops(graph, rw)
        weighted = [w for w in weighted if id(w[0]) not in skip]
        acts = [a for a in acts if id(a[0]) not in skip]
        self.quantize_activations(graph, rw, ctx, acts)
        self.quantize_weights(rw, ctx, weighted)

    def quantize_activations(self, graph: gs.Graph, rw: Rewriter, ctx: PassContext, acts: list[tuple[gs.Node, int]]) -> None:
        # One shared pair per tensor (P6): group the consumers that want each tensor quantized.
        wanted: dict[str, list[gs.Node]] = defaultdict(list)
        tensors: dict[str, gs.Tensor] = {}
        for node, idx in acts:
            t = node.inputs[idx]
            if _reads_quantized(t):
                continue  # already quantized: keeps the pass idempotent
            if not _is_float(t) or isinstance(t, gs.Constant):
                continue
            tensors[t.name] = t
            if node not in wanted[t.name]:
                wanted[t.name].append(node)
        if not wanted:
            return
        amax = ctx.amax(list(wanted))
        for name, nodes in wanted.items():
            if name not in amax:
                for n in nodes:
                    rw.note(n, f"activation {name} has no calibrated range; left float", rule="P1")
                continue
            scale = scale_in(scale_from_amax(amax[name]).reshape(()), _float_type(tensors[name]))
            detail = f"amax {amax[name]:.6g} -> scale {float(scale):.6g}, shared by {len(nodes)} consumer(s)"
            rw.insert_qdq(tensors[name], scale, np.zeros((), np.int8), consumers=nodes, detail=detail, rule="P1")
            if len(nodes) > 1:
                rw.note(name, f"one Q/DQ shared by {', '.join(n.name for n in nodes)}", rule="P6")

    def quantize_weights(self, rw: Rewriter, ctx: PassContext, weighted: list[tuple[gs.Node, int, int | None]]) -> None:
        shared: dict[tuple[int, int | None], gs.Tensor] = {}
        for node, widx, axis in weighted:
            src = node.inputs[widx]
            if is_dq(producer(src)):
                continue
            value = _folded_weight(src)
            if value is None or not is_float_dtype(value.dtype):
                rw.note(node, "weight is not a float constant; left as is", rule="F1")
                continue
            key = (id(src), axis)
            if key in shared:
                rw.set_input(node, widx, shared[key], detail=f"share weight Q/DQ of {src.name}", rule="P6")
                continue
            # The weight keeps the float type its op computes in (float16, bfloat16; float64 -> float32).
            ftype = value.dtype if value.dtype.name in ("float16", "bfloat16") else np.dtype(np.float32)
            if not isinstance(src, gs.Constant) or src.values.dtype != ftype:
                # Fold Transpose/Identity/Cast into an initializer so the Q reads a constant (V1).
                src = rw.constant(f"{node.name}_weight", value.astype(ftype))
                rw.log("constant", node.name, f"weight folded into initializer {src.name}", rule="F1")
            raw = weight_scales(value.astype(np.float32), axis)
            if axis is not None and raw.size == 1:
                # One output channel: per-channel is per-tensor; written as normalize-qdq wants a per-tensor
                # scale (0-D, no axis, V1), or a second run would rewrite it.
                raw, axis = raw.reshape(()), None
            scales = scale_in(raw, ftype)
            zero = np.zeros(scales.shape, np.int8)
            dead = int(np.sum(raw <= 1e-8)) if axis is not None else 0
            detail = (f"per-channel axis {axis} ({scales.size} channels)" if axis is not None else "per-tensor") + \
                     (f", {dead} zero-range channel(s) given the minimum scale" if dead else "")
            dq_out = self._weight_qdq(rw, ctx, src, value, scales, zero, axis, detail)
            rw.set_input(node, widx, dq_out, detail=f"weight {src.name} quantized", rule="F1")
            shared[(id(node.inputs[widx]), axis)] = dq_out
            shared[key] = dq_out

    def _weight_qdq(self, rw: Rewriter, ctx: PassContext, src: gs.Tensor, value: np.ndarray, scales: np.ndarray,
                    zero: np.ndarray, axis: int | None, detail: str) -> gs.Tensor:
        attrs = {} if axis is None else {"axis": int(axis)}
        scale_c = rw.constant(f"{src.name}_scale", scales)
        zp_c = rw.constant(f"{src.name}_zero_point", zero)
        dq_out = new_variable(rw.fresh_name(f"{src.name}_dequantized"), scales.dtype, list(value.shape))
        if ctx.config.weights == "int8":
            q = rw.constant(f"{src.name}_int8", quantize_int8(value.astype(np.float32), scales.astype(np.float32), axis))
            rw.add_node(DQ_OP, [q, scale_c, zp_c], name=f"{src.name}_DequantizeLinear", attrs=attrs, outputs=[dq_out],
                        detail=f"int8 weight + DQ, {detail}", rule="V3")
            return dq_out
        q_out = new_variable(rw.fresh_name(f"{src.name}_quantized"), np.int8, list(value.shape))
        rw.add_node(Q_OP, [src, scale_c, zp_c], name=f"{src.name}_QuantizeLinear", attrs=attrs, outputs=[q_out],
                    detail=f"weight Q, {detail}", rule="V3")
        rw.add_node(DQ_OP, [q_out, scale_c, zp_c], name=f"{src.name}_DequantizeLinear", attrs=attrs, outputs=[dq_out],
                    detail=f"weight DQ, {detail}", rule="V3")
        return dq_out


# --------------------------------------------------------------------------------------------
# Control flow and TensorRT plugins
#
# Where Q/DQ may go inside an If/Loop/Scan body, and why most bodies stay float:
#
# * An If whose condition is a constant is not control flow at all: onnx-tensorrt's If importer
#   parses only the selected branch, inline, when the condition is a build-time constant
#   (onnxOpImporters.cpp, "For constant conditions, parse only the selected subgraph"). We do the
#   same (exact: that branch is what every run executes), so its weighted ops become ordinary
#   top-level ops, quantized and calibrated like the rest (the calibration model is inlined alike).
# * An If with a run-time condition becomes a TensorRT IIfConditional; a Loop an ILoop. TensorRT
#   documents no Q/DQ fusion inside or across these boundaries (operators.md restricts If only on
#   branch output ranks/names, Loop on scan outputs and carried shapes), and onnxruntime cannot
#   expose a tensor inside a body as a graph output, so its activations cannot be calibrated (a
#   loop body would need one range over every iteration). Their weighted ops stay float, each with
#   a note saying why, and the static analysis counts their MACs as float.
# * Nodes after a TensorRT plugin (``TRT::EfficientNMS_TRT``...) cannot be calibrated: onnxruntime
#   cannot run the plugin. They stay float with a note; the plugin itself is never touched.



def _constant_condition(node: gs.Node) -> bool | None:
    value = const_value(node.inputs[0]) if node.op == "If" and node.inputs else None
    if value is None or np.size(value) != 1:
        return None
    return bool(np.asarray(value).reshape(()))


def inline_constant_ifs(graph: gs.Graph, rw: Rewriter) -> int:
    """Replace every top-level If with a constant condition by the branch it always takes; returns how many."""
    done = 0
    while True:
        target = next((n for n in graph.nodes if not rw.is_removed(n) and _constant_condition(n) is not None), None)
        if target is None:
            return done
        taken = "then_branch" if _constant_condition(target) else "else_branch"
        body: gs.Graph = target.attrs[taken]
        moved = [(n, list(n.inputs), list(n.outputs)) for n in body.nodes]
        results = list(body.outputs)
        outs = list(target.outputs)
        rw.remove_node(target, detail=f"condition is the constant {taken == 'then_branch'}: inlined its {taken} "
                                      f"({len(moved)} node(s)), as TensorRT's parser does", rule="P1")
        for node, ins, node_outs in moved:
            node.inputs.clear()  # the branch goes with the If; its tensors move to the graph
            node.outputs.clear()
            rw.add_node(node.op, ins, name=node.name or node.op, attrs=node.attrs, outputs=node_outs,
                        domain=node.domain, detail=f"from {target.name} {taken}", rule="P1")
        for old, new in zip(outs, results):
            rw.replace_uses(old, new, detail=f"{target.name} output {old.name} now comes from its {taken}", rule="P1")
        done += 1


def _where(path: list[tuple[gs.Node, str]]) -> str:
    return " > ".join(f"{n.op} '{n.name}' {attr}" for n, attr in path)


def unreachable_ops(graph: gs.Graph, rw: Rewriter) -> set[int]:
    """Weighted ops insert-qdq must leave float: inside control-flow bodies or after a plugin; each gets a note.

    Returns the ids of the top-level ops to skip (those after a plugin); ops inside bodies are
    never targets, they are only reported.
    """
    for node, path in nested_nodes(graph):
        if node.op not in WEIGHTED_OPS:
            continue
        owner, attr = path[-1]
        if any(p.op != "If" for p, _ in path):
            why = ("onnxruntime cannot expose tensors inside a loop body, so its activations cannot be calibrated "
                   "(and one range would have to hold for every iteration)")
        else:
            why = ("the condition is computed at run time, so TensorRT builds an IIfConditional, inside which it "
                   "documents no Q/DQ fusion, and onnxruntime cannot calibrate tensors inside a branch")
        rw.note(node, f"inside {_where(path)}: left float because {why}", rule="P1")
    below = after_plugins(graph)
    for node in graph.nodes:
        if id(node) in below and node.op in WEIGHTED_OPS:
            rw.note(node, f"after TensorRT plugin '{below[id(node)].name}' ({below[id(node)].op}): left float because "
                          "onnxruntime cannot run the plugin, so nothing after it can be calibrated", rule="P1")
    return set(below)
