"""float16-regions: run the float parts of a Q/DQ model in FP16, as a strongly typed TensorRT build needs (P10).

Under strong typing (TensorRT 10 opt-in, 11 always) every layer outside the INT8 islands runs in
the float type the ONNX declares, so an FP32 ONNX with Q/DQ builds an FP32+INT8 engine, slower
than the old ``--int8 --fp16`` engine. This pass, enabled by ``Config.float16`` (``--float16``;
a no-op otherwise, so it can close every pipeline), rewrites the float32 parts to float16.

Before → after (``io_float16`` false)::

    x:f32 ─ Q(s:f32) ─ DQ(s:f32) ─ Conv(W~:f32, b:f32) ─ Relu ─ Gemm(W:f32) ─ Softmax ─ y:f32
    x:f32 ─ Q(s:f32) ─ DQ(s:f16) ─ Conv(W~:f16, b:f16) ─ Relu ─ Gemm(W:f16) ─ Cast(f32) ─ Softmax ─ y:f32

What changes, node by node (the node's ONNX schema decides which inputs share its float type):

- Ops with an FP16 type in their schema run in FP16: every float32 type variable of the node
  becomes float16 (inputs, outputs and constant operands alike: weights, biases, Clip min/max,
  Pad constant_value, Where branches, BatchNorm statistics). Inputs whose type is fixed or
  independent stay as they are: Resize ``scales`` (always float32) and ``roi``, OneHot
  indices/depth, integer shapes and axes. Constants are converted (one float16 copy per
  initializer, values outside ±65504 clipped with a note); run-time tensors get a Cast, one per
  tensor and target type.
- Q/DQ: "A DQ's output type equals its scale's type", so a float16 scale is the precision switch.
  A DQ runs in FP16 unless every reader stays FP32; a Q follows its input (FP32 at an FP32 graph
  input, as P10 asks: the Quantize at an FP32 network input stays); a weight Q follows its DQ.
  When the two halves of a pair end up in different types, the FP32 side's scale is rounded to
  the FP16 value so both halves quantize on the same grid. FP16 scales are clamped to
  [2^-14, 65504] (V1: a scale must stay positive; subnormal scales lose precision).
- Weights behind Q→DQ are converted with their pair (weight, Q and DQ share one float16 scale):
  the simplest valid form (one dtype per pair, no extra nodes; TensorRT folds the Q into INT8
  weights at build time anyway) and the form ModelOpt emits (``yolov8n_320_modelopt_ptq_fp16.onnx``:
  FP16 weight and FP16 scale into each weight Q). The price, bounded: rounding ``w`` and ``s`` to
  FP16 moves ``w/s`` by at most ``127 * 2^-10 ≈ 0.12`` steps, so an INT8 code moves by one where
  ``w/s`` sits that close to a rounding boundary; the dequantized weight stays within ``0.62``
  steps of the float weight instead of ``0.5``. (An FP32 weight and Q scale with an FP16 DQ scale
  would keep the codes exact, but gives one pair two scale tensors of two types, a form neither
  ModelOpt emits nor TensorRT's documentation shows.)
- Data-movement ops (Reshape, Transpose, Concat, ...) follow their inputs, so an FP32 island
  (Softmax → Flatten → output) needs no Cast round trip.
- Stay FP32, with Casts around them: ops named in ``Config.sensitive_ops`` (op types, or node
  names; default LayerNormalization and Softmax, P9), ops without an FP16 type in their schema
  (Range, NonMaxSuppression, ...), ops typed by attributes (Cast, CastLike, ConstantOfShape,
  EyeLike, Random*), nodes with subgraphs (If, Loop, Scan) and nodes of other domains.
  The final head (the layers ``exclude-output-layers`` leaves unquantized) runs FP16: that is
  what ``--best`` gave and what P9's example shows; name a head node in ``sensitive_ops`` to
  keep it FP32.
- Graph inputs and outputs stay float32 with Casts at the boundary, unless ``io_float16``.

Opset: FP16 scales need opset ≥ 19. When a Q/DQ is converted on an older model (≥ 13), the
opset is raised to 19 if no node present changes meaning between the two versions (onnx's
operator changelog: between 13 and 19 only the Reduce ops taking ``axes`` as an attribute
(moved to an input in 18) and RoiAlign without ``coordinate_transformation_mode`` (default
changed in 16) do); otherwise a :class:`ModelError` asks for ``--opset 19``, which runs onnx's
version converter at load time.

Error bound: each float16 tensor carries a relative rounding error of at most 2^-11 per
rounding; ops accumulate this per layer, so outputs differ from the FP32 model at the 1e-3..1e-2
relative level (signal-to-quantization-noise well above 30 dB on small graphs). INT8 islands
are unchanged apart from the 2^-11 relative change of their scales.

onnxruntime: the CPU provider runs every op above on float16 data. Most of its CPU kernels are
FP32-only (Conv, MatMul, Gemm, Add, Mul, Relu, Sigmoid, Softmax, MaxPool, GlobalAveragePool,
Resize, BatchNormalization); its mandatory cast transformer wraps those in Casts by itself, even
with optimizations disabled. Native FP16 kernels: Q/DQ with FP16 scales, LayerNormalization,
Concat, Clip, Reshape, Transpose. So no op is kept FP32 for onnxruntime's sake, and an ORT check
measures FP16 storage rounding, not FP16 accumulation.

Rule P10 (and P9 for the sensitive ops, V1 for the scale clamp). Preconditions: float32 model
(bfloat16/float64 tensors are left alone), opset ≥ 13, types known (taken from the graph and
from onnx shape inference). Idempotent: a second run finds no float32 tensor left to convert.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import ModelError
from ..graph import DQ_OP, Q_OP, export_model, infer_missing_shapes, opset_version, producer
from ..rewriter import Rewriter
from .base import Pass, PassContext

__all__ = ["Float16Regions", "FP16_SCALE_OPSET", "opset_blockers", "raise_opset_for_float_scales"]

logger = logging.getLogger(__name__)

#: FP16/BF16 Q/DQ scales on FP16/BF16 data (trt-rules.md section 1).
FP16_SCALE_OPSET = 19
#: Below 13, Softmax, Split, Squeeze, Unsqueeze and ReduceSum changed meaning; not worth a table.
_MIN_RAISE_FROM = 13

F32 = np.dtype(np.float32)
F16 = np.dtype(np.float16)
_F16_MAX = float(np.finfo(np.float16).max)
_F16_MIN_NORMAL = float(np.finfo(np.float16).tiny)  # 2^-14

# Output type fixed by an attribute, or input and output types independent: never retyped.
_FIXED_OPS = frozenset({
    "Cast", "CastLike", "Constant", "ConstantOfShape", "EyeLike", "RandomNormal", "RandomUniform",
    "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli", "MelWeightMatrix", "BitCast",
    "If", "Loop", "Scan", "SequenceMap",
})
# Inputs read for their shape only: any type will do, so they never get a Cast.
_SHAPE_READERS = frozenset({"Shape", "Size"})
# Type variables that are not the op's data type; float32 there is not a precision choice.
_KEEP_VARS: dict[str, frozenset[str]] = {
    "Resize": frozenset({"T2"}),  # roi (scales has the fixed type tensor(float))
    "OneHot": frozenset({"T1", "T2"}),  # indices, depth
}
# Pure data movement: same values in, same values out, so they take whatever type they are fed.
_FOLLOWERS = frozenset({
    "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Slice", "Gather", "GatherElements",
    "GatherND", "Split", "Expand", "Tile", "Concat", "DepthToSpace", "SpaceToDepth",
})
# Reduce ops whose `axes` became an input in opset 18.
_REDUCE_18 = frozenset({
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
    "ReduceProd", "ReduceSumSquare",
})


def _reduce_axes(node: gs.Node, old: int, new: int) -> str | None:
    if old < 18 <= new and "axes" in node.attrs:
        return "axes moved from attribute to input in opset 18"
    return None


def _roialign(node: gs.Node, old: int, new: int) -> str | None:
    if old < 16 <= new and "coordinate_transformation_mode" not in node.attrs:
        return "default coordinate_transformation_mode changed in opset 16"
    return None


# Ops whose schema changed meaning between 13 and 19; every other bump in that range only adds
# types or optional inputs/attributes whose defaults keep the old behaviour.
_OPSET_HAZARDS: dict[str, Callable[[gs.Node, int, int], str | None]] = {
    **{op: _reduce_axes for op in _REDUCE_18},
    "RoiAlign": _roialign,
}


def opset_blockers(graph: gs.Graph, target: int = FP16_SCALE_OPSET) -> list[str]:
    """Why raising the default-domain opset of ``graph`` to ``target`` would change its meaning (empty: safe)."""
    old = opset_version(graph)
    if old >= target:
        return []
    if old < _MIN_RAISE_FROM:
        return [f"opset {old} is below {_MIN_RAISE_FROM} (Softmax, Split, Squeeze, Unsqueeze and ReduceSum changed at 13)"]
    out: list[str] = []
    for g in [graph, *graph.subgraphs(recursive=True)]:
        for node in g.nodes:
            if node.domain not in (None, "", "ai.onnx"):
                continue
            check = _OPSET_HAZARDS.get(node.op)
            why = check(node, old, target) if check else None
            if why:
                out.append(f"{node.op} {node.name}: {why}")
    return out


def raise_opset_for_float_scales(graph: gs.Graph, rw: Rewriter, what: str, *, rule: str) -> None:
    """Raise the opset to 19, where Q/DQ take float16/bfloat16 data and scales, when no op changes meaning.

    Below 19, QuantizeLinear reads float32 (and int32) only. Raises :class:`ModelError` naming
    the ops that block an in-place raise (then ``--opset 19`` runs onnx's version converter).
    """
    old = opset_version(graph)
    if old >= FP16_SCALE_OPSET:
        return
    blockers = opset_blockers(graph, FP16_SCALE_OPSET)
    if blockers:
        raise ModelError(
            f"{what} Q/DQ scales need opset {FP16_SCALE_OPSET}; the model has opset {old} and raising it in place "
            f"would change {'; '.join(blockers[:3])}{' ...' if len(blockers) > 3 else ''}: "
            f"pass --opset {FP16_SCALE_OPSET} (onnx version converter) or load with opset={FP16_SCALE_OPSET}")
    rw.set_opset(FP16_SCALE_OPSET, detail=f"opset {old} -> {FP16_SCALE_OPSET} for {what} Q/DQ scales; no op present "
                                          f"changed meaning between the two", rule=rule)


def _known_dtypes(graph: gs.Graph) -> dict[str, np.dtype]:
    """Element type of every tensor: the graph's own annotations, completed by onnx shape inference."""
    out: dict[str, np.dtype] = {}
    try:
        model = infer_missing_shapes(export_model(graph))
        vis = [*model.graph.value_info, *model.graph.input, *model.graph.output]
        for vi in vis:
            elem = vi.type.tensor_type.elem_type
            if vi.type.HasField("tensor_type") and elem:
                out[vi.name] = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))
    except Exception as exc:  # a report-level loss: tensors without a type are left alone
        logger.warning("float16-regions: shape inference failed (%s); using the graph's own types", exc)
    for name, t in graph.tensors().items():
        try:
            if isinstance(t, gs.Constant):
                out[name] = np.dtype(t.values.dtype)  # LazyValues know their dtype without loading
            elif t.dtype is not None:
                out[name] = np.dtype(t.dtype)
        except TypeError:  # an ONNX type numpy cannot name (bfloat16, float8): not ours to convert
            out.pop(name, None)
    return out


def _is_const(t: gs.Tensor) -> bool:
    node = producer(t)
    return isinstance(t, gs.Constant) or (node is not None and node.op == "Constant")


def _const_values(t: gs.Tensor) -> np.ndarray:
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    attrs = producer(t).attrs
    if isinstance(attrs.get("value"), gs.Constant):
        return np.asarray(attrs["value"].values)
    if "value_float" in attrs:
        return np.asarray(attrs["value_float"], np.float32)
    return np.asarray(attrs["value_floats"], np.float32)


def _present(t: gs.Tensor | None) -> bool:
    return t is not None and bool(t.name)


@dataclass
class _Plan:
    """Per node: its precision and which input/output slots take float16."""

    fp16: dict[int, bool] = field(default_factory=dict)
    ins: dict[int, set[int]] = field(default_factory=dict)
    outs: dict[int, set[int]] = field(default_factory=dict)
    new: dict[int, np.dtype | None] = field(default_factory=dict)  # run-time tensors: type after the pass
    why32: dict[int, str] = field(default_factory=dict)


class Float16Regions(Pass):
    """Convert the float32 parts of the graph to float16; sensitive ops and graph I/O stay float32 (P10)."""

    name = "float16-regions"
    edits_through_rewriter = True
    summary = "Run non-INT8 layers in FP16: FP16 weights, activations and Q/DQ scales, Casts at I/O (P10)"
    rules = ("P10", "P9", "V1")

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        if not ctx.config.float16:
            return
        # A subgraph body reads outer tensors by name with the types it declares; retyping them here
        # would silently break the body, so such models are refused rather than converted.
        outer = {name for name, t in graph.tensors().items() if not isinstance(t, gs.Constant)}
        for sub in graph.subgraphs(recursive=True):
            own = {t.name for n in sub.nodes for t in n.outputs} | {t.name for t in sub.inputs}
            for t in (t for n in sub.nodes for t in n.inputs):
                if t is not None and not isinstance(t, gs.Constant) and t.name in outer and t.name not in own:
                    raise ModelError(f"--float16: a subgraph body reads the outer tensor {t.name}; models whose "
                                     f"If/Loop/Scan bodies read outer tensors are not converted (run without --float16)")

    def run(self, graph: gs.Graph, rw: Rewriter, ctx: PassContext) -> None:
        cfg = ctx.config
        if not cfg.float16:
            return
        graph.toposort()
        self.io16 = bool(cfg.io_float16)
        self.sensitive = set(cfg.sensitive_ops)
        self.types = _known_dtypes(graph)
        self.outputs = {id(t) for t in graph.outputs}
        self.inputs = list(graph.inputs)
        self._slot_cache: dict[int, tuple[set[int], set[int]] | str] = {}
        has_qdq = any(n.op in (Q_OP, DQ_OP) for n in graph.nodes)
        old = opset_version(graph)
        # Plan against opset-19 schemas when Q/DQ may get float16 scales; older Q/DQ schemas fix them to float.
        self.opset = max(old, FP16_SCALE_OPSET) if has_qdq else old
        plan = self._plan(graph)
        if old < FP16_SCALE_OPSET and any(n.op in (Q_OP, DQ_OP) and plan.fp16[id(n)] and plan.ins[id(n)]
                                          for n in graph.nodes):
            self._raise_opset(graph, rw, old)
        with rw.rule("P10"):
            self._apply(graph, rw, plan)

    # -- opset --------------------------------------------------------------------------------
    def _raise_opset(self, graph: gs.Graph, rw: Rewriter, old: int) -> None:
        raise_opset_for_float_scales(graph, rw, "float16", rule="P10")

    # -- planning (pure) ----------------------------------------------------------------------
    def _dtype(self, t: gs.Tensor) -> np.dtype | None:
        return self.types.get(t.name)

    def _slots(self, node: gs.Node) -> tuple[set[int], set[int]] | str:
        """Input and output indices whose float32 type would become float16, or why the node stays as it is."""
        key = id(node)
        if key not in self._slot_cache:
            self._slot_cache[key] = self._find_slots(node)
        return self._slot_cache[key]

    def _find_slots(self, node: gs.Node) -> tuple[set[int], set[int]] | str:
        if node.domain not in (None, "", "ai.onnx"):
            return f"domain {node.domain} unknown to the schema table"
        if node.op in _FIXED_OPS or any(isinstance(v, gs.Graph) for v in node.attrs.values()):
            return "type fixed by an attribute or subgraph"
        if node.op in _SHAPE_READERS:
            return "reads only shapes"
        try:
            schema = onnx.defs.get_schema(node.op, self.opset, "")
        except onnx.defs.SchemaError:
            return "no ONNX schema"
        f16_vars = {tc.type_param_str for tc in schema.type_constraints
                    if "tensor(float16)" in tc.allowed_type_strs and "tensor(float)" in tc.allowed_type_strs}
        f16_vars -= _KEEP_VARS.get(node.op, frozenset())

        def var_slots(formals, tensors) -> dict[str, list[int]]:
            out: dict[str, list[int]] = {}
            for i, t in enumerate(tensors):
                if not _present(t) or not formals:
                    continue
                formal = formals[min(i, len(formals) - 1)]
                if i >= len(formals) and formal.option != onnx.defs.OpSchema.FormalParameterOption.Variadic:
                    continue
                out.setdefault(formal.type_str, []).append(i)
            return out

        ins, outs = var_slots(schema.inputs, node.inputs), var_slots(schema.outputs, node.outputs)
        conv_in: set[int] = set()
        conv_out: set[int] = set()
        for var in f16_vars:
            tensors = [node.inputs[i] for i in ins.get(var, [])] + [node.outputs[i] for i in outs.get(var, [])]
            # A type variable binds one type: convert all of its slots or none.
            if any(self._dtype(t) == F32 for t in tensors):
                conv_in |= set(ins.get(var, []))
                conv_out |= set(outs.get(var, []))
        return conv_in, conv_out

    def _is_sensitive(self, node: gs.Node) -> bool:
        return node.op in self.sensitive or node.name in self.sensitive

    def _stays32(self, node: gs.Node) -> bool:
        """A reader that will want float32 whatever its producers do."""
        return self._is_sensitive(node) or isinstance(self._slots(node), str)

    def _plan(self, graph: gs.Graph) -> _Plan:
        plan = _Plan()
        for t in graph.inputs:
            d = self._dtype(t)
            plan.new[id(t)] = F16 if self.io16 and d == F32 else d
        for node in graph.nodes:
            slots = self._slots(node)
            key = id(node)
            if isinstance(slots, str):
                plan.fp16[key], plan.ins[key], plan.outs[key], plan.why32[key] = False, set(), set(), slots
            else:
                plan.ins[key], plan.outs[key] = slots
                plan.fp16[key] = self._decide(node, plan)
                if not plan.fp16[key]:
                    plan.why32[key] = self._why32(node)
            for i, t in enumerate(node.outputs):
                d = self._dtype(t)
                plan.new[id(t)] = F16 if plan.fp16[key] and i in plan.outs[key] else d
        return plan

    def _why32(self, node: gs.Node) -> str:
        if self._is_sensitive(node):
            return "sensitive op (P9)"
        if node.op == Q_OP:
            x = node.inputs[0]
            at_input = any(x is t for t in self.inputs)
            return f"reads float32 {x.name}" + (" (P10: the Q at a float32 graph input stays)" if at_input else "")
        return "every reader stays float32" if node.op == DQ_OP else "data-movement op fed float32"

    def _new(self, plan: _Plan, t: gs.Tensor) -> np.dtype | None:
        return plan.new.get(id(t), self._dtype(t)) if not _is_const(t) else self._dtype(t)

    def _decide(self, node: gs.Node, plan: _Plan) -> bool:
        if self._is_sensitive(node):
            return False
        if node.op == DQ_OP:
            # FP16 unless every reader stays FP32 anyway (then an FP16 DQ would only add a Cast).
            readers = [c for t in node.outputs for c in t.outputs]
            is_out = any(id(t) in self.outputs for t in node.outputs)
            if not readers and not is_out:
                return True
            return not (all(self._stays32(c) for c in readers) and (not is_out or not self.io16))
        if node.op == Q_OP:
            x = node.inputs[0]
            if _is_const(x):  # a weight's Q goes with its DQ: one dtype per pair
                return any(c.op == DQ_OP and self._decide(c, plan) for c in node.outputs[0].outputs)
            return self._new(plan, x) == F16
        if node.op in _FOLLOWERS:
            data = [node.inputs[i] for i in plan.ins[id(node)] if not _is_const(node.inputs[i])]
            return not data or any(self._new(plan, t) == F16 for t in data)
        return True

    # -- rewriting ----------------------------------------------------------------------------
    def _apply(self, graph: gs.Graph, rw: Rewriter, plan: _Plan) -> None:
        casts: dict[tuple[int, str], gs.Tensor] = {}
        consts: dict[tuple[int, str], gs.Constant] = {}
        scale_users = {id(n.inputs[1]) for n in graph.nodes
                       if n.op in (Q_OP, DQ_OP) and len(n.inputs) > 1 and plan.fp16[id(n)] and 1 in plan.ins[id(n)]}

        for node in list(graph.nodes):
            key = id(node)
            # Worth a note only where float32 arithmetic remains (not Shape, not our own Casts).
            writes32 = any(_present(t) and self._dtype(t) == F32 for t in node.outputs) or (
                node.op == Q_OP and self._dtype(node.inputs[0]) == F32)
            if key in plan.why32 and writes32 and node.op not in ("Cast", "Constant"):
                rw.note(node, f"kept float32: {plan.why32[key]}", rule="P9" if "P9" in plan.why32[key] else "P10")
            if plan.fp16[key] and plan.outs[key]:
                names = ", ".join(node.outputs[i].name for i in sorted(plan.outs[key]))
                what = "float16 scale, so it emits float16" if node.op == DQ_OP else "runs in float16"
                for i in plan.outs[key]:
                    rw.set_dtype(node.outputs[i], np.float16, node=node, detail=f"{node.op} {what}: {names} float32 -> float16")
            elif plan.fp16[key] and node.op == Q_OP and plan.ins[key]:
                rw.log("retype", node.name, "Q reads float16 with a float16 scale")

        for node in list(graph.nodes):
            key = id(node)
            for i, t in enumerate(list(node.inputs)):
                if not _present(t):
                    continue
                have, orig = self._new(plan, t), self._dtype(t)
                want = F16 if plan.fp16[key] and i in plan.ins[key] else orig
                if node.op in _SHAPE_READERS or have is None or want is None or have == want:
                    continue
                if have.kind != "f" or want.kind != "f":
                    continue
                if _is_const(t):
                    new = self._const_copy(rw, t, want, consts, is_scale=id(t) in scale_users, reader=node)
                else:
                    new = self._cast(rw, t, want, casts)
                rw.set_input(node, i, new, detail=f"input {i} {t.name} as {want.name}")
        self._pair_scales(graph, rw, plan, scale_users)
        self._boundary(graph, rw, plan, casts)

    def _const_copy(self, rw: Rewriter, t: gs.Tensor, dtype: np.dtype, cache: dict, *, is_scale: bool,
                    reader: gs.Node) -> gs.Constant:
        key = (id(t), dtype.name)
        if key in cache:
            return cache[key]
        values = _const_values(t).astype(np.float64)
        lo = _F16_MIN_NORMAL if is_scale and dtype == F16 else -_F16_MAX
        if dtype == F16:
            clipped = np.clip(values, lo, _F16_MAX)
            n = int(np.sum(clipped != values))
            if n:
                why = f"{n} scale value(s) clamped to [2^-14, 65504]" if is_scale else f"{n} value(s) beyond ±65504 clipped"
                rw.note(reader, f"{t.name}: {why}", rule="V1" if is_scale else "P10")
            values = clipped
        new = rw.constant(f"{t.name}_{'fp16' if dtype == F16 else 'fp32'}", values.astype(dtype))
        rw.log("constant", reader.name, f"{t.name} ({values.size} values) {self._dtype(t).name} -> {dtype.name} as {new.name}")
        cache[key] = new
        return new

    def _cast(self, rw: Rewriter, t: gs.Tensor, dtype: np.dtype, cache: dict) -> gs.Tensor:
        key = (id(t), dtype.name)
        if key not in cache:
            to = onnx.helper.np_dtype_to_tensor_dtype(dtype)
            suffix = "fp16" if dtype == F16 else "fp32"
            cast = rw.add_node("Cast", [t], name=f"{t.name}_Cast_{suffix}", attrs={"to": to}, out_dtype=dtype,
                               out_shape=t.shape, detail=f"{t.name} -> {dtype.name} at a precision boundary")
            cache[key] = cast.outputs[0]
        return cache[key]

    def _pair_scales(self, graph: gs.Graph, rw: Rewriter, plan: _Plan, scale_users: set[int]) -> None:
        """An FP32 half of a Q/DQ pair whose other half went FP16 gets the FP16-rounded scale: one grid."""
        for node in list(graph.nodes):
            if node.op not in (Q_OP, DQ_OP) or plan.fp16[id(node)] or len(node.inputs) < 2:
                continue
            s = node.inputs[1]
            partners = node.outputs[0].outputs if node.op == Q_OP else ([producer(node.inputs[0])] if producer(node.inputs[0]) else [])
            shared = id(s) in scale_users or any(p.op in (Q_OP, DQ_OP) and plan.fp16[id(p)] for p in partners)
            if not shared or not _is_const(s) or self._dtype(s) != F32:
                continue
            values = _const_values(s)
            rounded = np.clip(values, _F16_MIN_NORMAL, _F16_MAX).astype(np.float16).astype(np.float32)
            if not np.array_equal(rounded, values):
                rw.set_constant(node, 1, rounded, base=f"{s.name}_fp16_grid",
                                detail="float32 half of a pair with a float16 half: scale rounded to the float16 value")

    def _boundary(self, graph: gs.Graph, rw: Rewriter, plan: _Plan, casts: dict) -> None:
        """Graph inputs and outputs keep float32 unless io_float16."""
        for t in graph.inputs:
            if self.io16 and self._dtype(t) == F32:
                rw.set_dtype(t, np.float16, detail="graph input float32 -> float16 (io_float16)")
        for t in list(graph.outputs):
            orig = self._dtype(t)
            if orig is None or orig.kind != "f" or any(t is i for i in graph.inputs):
                continue
            want = F16 if self.io16 and orig == F32 else orig
            have = self._new(plan, t)
            if have == want:
                continue
            # The output keeps its name and type: the float16 tensor is renamed, a Cast writes the output.
            cast_out = self._cast(rw, t, want, casts)
            rw.replace_uses(t, cast_out, exclude=list(t.outputs), detail=f"graph output {t.name} stays {want.name}")

