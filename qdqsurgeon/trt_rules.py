"""TensorRT's treatment of each ONNX op under explicit (Q/DQ) quantization, as data.

This module is the single source of truth for "what TensorRT does with Q/DQ around op X": the
placement passes ask it where a Q/DQ may move and what fuses into a conv epilogue, and the static
analysis (:mod:`qdqsurgeon.analysis`) reads the same table to predict the engine. Change a rule
here and both follow.

Every entry cites rule IDs from ``trt-rules.md`` (C1, F1–F11, P1–P11, V1–V6, E1–E4) and carries
that document's confidence tags: ``documented``, ``seen in real engines``, ``inferred, unverified``.

Roles (``OpRule.role``):

* ``weighted``  – Conv/ConvTranspose/Gemm/MatMul: INT8 when activation *and* weight come from DQs (F1).
* ``commuting`` – pure data movement or order-preserving ops: Q/DQ slide through (§3 table, P5, P8).
* ``epilogue``  – fuses into a preceding weighted op's kernel (F3, F5): BN, ReLU, Clip, LeakyReLU...
* ``wrapped``   – INT8 only fully wrapped: DQ on every data input, Q on the output (P7).
* ``float``     – no INT8 kernel worth using; keep float (P9, V6).
* ``shape``     – integer / shape computations; never quantized (V4).

Some ops have two faces: Add is ``wrapped`` on its own but an epilogue as a bias Add or residual
Add after a conv (F5); Sigmoid and Mul are epilogues only as the two halves of SiLU (F10). The
node-level query functions (:func:`is_epilogue`, :func:`commutes`, ...) resolve this.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .graph import WEIGHTED_OPS, const_value, is_constant, is_dq, is_q, producer, weight_input_index

__all__ = [
    "ALL",
    "ROLES",
    "CONFIDENCES",
    "OpRule",
    "RULES",
    "DEFAULT_SENSITIVE_OPS",
    "rule_for",
    "ops_with_role",
    "data_input_indices",
    "commutes",
    "is_epilogue",
    "fuses_after",
    "gelu_region",
    "is_bias_add",
    "is_residual_add",
    "is_silu_mul",
    "is_silu_sigmoid",
    "is_weighted",
    "misaligned_channels",
    "weight_axis",
    "is_quantizable_wrapped",
    "is_float_only",
    "is_shape_op",
    "WEIGHT_PASSTHROUGH_OPS",
    "WEIGHTED_OPS",
    "BIAS_OPS",
    "POOLING_OPS",
    "FREE_OPS",
    "fuses_with_conv_act",
    "MHA_BETWEEN",
    "attention_gemms",
    "Version",
    "NEWEST_VERSION",
    "VersionedRule",
    "VERSIONED_RULES",
    "parse_version",
    "version_label",
    "is_activation",
    "is_pointwise_activation",
    "activation_add_fuses",
    "residual_add_joins_chain",
    "residual_placement",
    "convtranspose_axis_for",
    "int8_weight_initializers",
]

logger = logging.getLogger(__name__)

#: Sentinel for ``OpRule.data_inputs``: every input carries data (Concat).
ALL: tuple[int, ...] = (-1,)

ROLES = ("weighted", "commuting", "epilogue", "wrapped", "float", "shape")
CONFIDENCES = ("documented", "seen in real engines", "inferred, unverified")

_DOC = "documented"
_SEEN = "seen in real engines"
_INF = "inferred, unverified"

_WEIGHTED_HEADS = WEIGHTED_OPS


@dataclass(frozen=True)
class OpRule:
    """How TensorRT treats one ONNX op type around Q/DQ.

    ``data_inputs`` lists the inputs a Q/DQ moves across (or that must carry a DQ for a wrapped
    op); ``ALL`` means every input. ``equal_scales`` marks ops that commute only when input and
    output scales are equal (P4, P5); otherwise TensorRT inserts a requantize (E3).
    ``int8_wrapped`` says the op has an INT8 kernel when fully wrapped in Q/DQ (P7), which also
    holds for epilogue ops met outside a conv chain. ``fuses_after`` names the weighted ops an
    epilogue fuses into (F9: no BN fusion after ConvTranspose).
    """

    op: str
    role: str
    commutes: bool = False
    data_inputs: tuple[int, ...] = (0,)
    equal_scales: bool = False
    epilogue: bool = False
    int8_wrapped: bool = False
    fuses_after: tuple[str, ...] = ()
    rules: tuple[str, ...] = ()
    confidence: tuple[str, ...] = (_INF,)
    note: str = ""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"{self.op}: unknown role {self.role!r}")
        bad = [c for c in self.confidence if c not in CONFIDENCES]
        if bad:
            raise ValueError(f"{self.op}: unknown confidence {bad}")


def _commuting(op: str, rules: tuple[str, ...], confidence: tuple[str, ...], *, data_inputs: tuple[int, ...] = (0,),
               equal_scales: bool = False, note: str = "") -> OpRule:
    return OpRule(op, "commuting", commutes=True, data_inputs=data_inputs, equal_scales=equal_scales,
                  rules=rules, confidence=confidence, note=note)


def _epilogue(op: str, rules: tuple[str, ...], confidence: tuple[str, ...], *, role: str = "epilogue",
              data_inputs: tuple[int, ...] = (0,), fuses_after: tuple[str, ...] = _WEIGHTED_HEADS,
              note: str = "") -> OpRule:
    return OpRule(op, role, epilogue=True, int8_wrapped=True, data_inputs=data_inputs, fuses_after=fuses_after,
                  rules=rules, confidence=confidence, note=note)


def _wrapped(op: str, rules: tuple[str, ...], confidence: tuple[str, ...], *, data_inputs: tuple[int, ...] = (0,),
             note: str = "") -> OpRule:
    return OpRule(op, "wrapped", int8_wrapped=True, data_inputs=data_inputs, rules=rules, confidence=confidence,
                  note=note)


def _float(op: str, note: str = "", rules: tuple[str, ...] = ("P9",)) -> OpRule:
    return OpRule(op, "float", data_inputs=ALL, rules=rules, confidence=(_DOC,) if op in ("Softmax", "LayerNormalization")
                  else (_INF,), note=note)


def _shape(op: str, note: str = "") -> OpRule:
    return OpRule(op, "shape", data_inputs=(), rules=("V4",), confidence=(_DOC,), note=note or "integer/shape tensor")


_TABLE: tuple[OpRule, ...] = (
    # --- weighted (F1, P1; axes V3) -------------------------------------------------------------
    OpRule("Conv", "weighted", rules=("F1", "F2", "P1", "V3", "P11"), confidence=(_DOC, _SEEN),
           note="weight axis 0; grouped/depthwise included"),
    OpRule("ConvTranspose", "weighted", rules=("F1", "F9", "V3"), confidence=(_DOC,),
           note="weight axis 1 on TRT>=10.2 (inferred), 0 on 8.x; per-tensor when group>1; no BN fusion (F9)"),
    OpRule("Gemm", "weighted", rules=("F1", "F2", "P1", "V3"), confidence=(_DOC, _SEEN),
           note="weight axis 0 if transB else 1"),
    OpRule("MatMul", "weighted", data_inputs=(0, 1), rules=("F1", "P1", "V3"), confidence=(_DOC,),
           note="weighted only with a constant operand; rank>2 constant B per-tensor (V3, inferred)"),
    # --- commuting (§3 table; C1 for backward Q moves) ------------------------------------------
    _commuting("MaxPool", ("P5", "F11", "C1"), (_DOC, _SEEN), equal_scales=True,
               note="runs INT8; input and output share one scale"),
    _commuting("GlobalMaxPool", ("P5",), (_DOC,), equal_scales=True),
    _commuting("Concat", ("P4", "C1"), (_SEEN,), data_inputs=ALL, equal_scales=True,
               note="output Q moves back onto every input; equal scales make it a copy"),
    _commuting("Reshape", ("C1",), (_INF,)),
    _commuting("Flatten", ("C1",), (_INF,)),
    _commuting("Squeeze", ("C1",), (_INF,)),
    _commuting("Unsqueeze", ("C1",), (_INF,)),
    _commuting("Transpose", ("C1",), (_INF,)),
    _commuting("Slice", ("C1", "P4"), (_INF,)),
    _commuting("Split", ("C1", "P4"), (_INF,)),
    _commuting("Gather", ("C1",), (_INF,), note="data input only; a Gather on a shape tensor is a shape op"),
    _commuting("Expand", ("C1",), (_INF,)),
    _commuting("Tile", ("C1",), (_INF,)),
    _commuting("Pad", ("P8",), (_DOC,), note="only constant mode with pad value 0 (zero point 0 commutes)"),
    _commuting("Identity", ("C1",), (_INF,), note="removed by the parser"),
    _commuting("Dropout", ("C1",), (_INF,), note="inference no-op"),
    _commuting("Cast", ("P10",), (_INF,), note="float-to-float only (FP16 I/O casts); the DQ scale type sets precision"),
    # --- epilogues (F3, F5, F10) ------------------------------------------------------------------
    _epilogue("BatchNormalization", ("F3",), (_DOC,), fuses_after=("Conv", "Gemm", "MatMul"),
              note="not after ConvTranspose (F9)"),
    _epilogue("Relu", ("F3", "F11"), (_DOC, _SEEN)),
    _epilogue("Clip", ("F3",), (_DOC, _SEEN), note="ReLU6; min/max inputs are constants"),
    _epilogue("LeakyRelu", ("F3",), (_DOC,)),
    _epilogue("HardSigmoid", ("F3",), (_INF,)),
    _epilogue("HardSwish", ("F3",), (_INF,)),
    _epilogue("Add", ("F3", "F5", "F6", "F7", "P3", "P7"), (_DOC, _SEEN), role="wrapped", data_inputs=ALL,
              note="bias Add (one constant operand) or residual Add after a conv; else INT8 only fully wrapped"),
    _epilogue("Sigmoid", ("F10", "F8", "P7"), (_INF,), role="wrapped",
              note="epilogue only as the Sigmoid of SiLU = Mul(x, Sigmoid(x))"),
    _epilogue("Mul", ("F10", "P7"), (_INF,), role="wrapped", data_inputs=ALL,
              note="epilogue only as the Mul of SiLU; else INT8 only fully wrapped"),
    # --- wrapped (P7) ---------------------------------------------------------------------------
    _wrapped("AveragePool", ("P7",), (_DOC, _SEEN)),
    _wrapped("GlobalAveragePool", ("P7",), (_DOC, _SEEN)),
    _wrapped("ReduceMean", ("P7",), (_SEEN, _INF),
             note="a spatial mean becomes a pooling layer (TF ResNet-50 QAT engine: CudaPooling Int8)"),
    _wrapped("Sub", ("P7",), (_DOC,), data_inputs=ALL),
    _wrapped("Div", ("P7",), (_INF,), data_inputs=ALL),
    _wrapped("Resize", ("P7",), (_INF,), note="data input 0; roi/scales/sizes are constants"),
    _wrapped("Tanh", ("P7",), (_INF,)),
    _wrapped("Abs", ("P7",), (_INF,)),
    _wrapped("Neg", ("P7",), (_INF,)),
    _wrapped("Elu", ("P7",), (_INF,)),
    _wrapped("Selu", ("P7",), (_INF,)),
    _wrapped("Softplus", ("P7",), (_INF,)),
    _wrapped("PRelu", ("P7",), (_INF,)),
    _wrapped("Max", ("P7",), (_INF,), data_inputs=ALL),
    _wrapped("Min", ("P7",), (_INF,), data_inputs=ALL),
    # --- float only (P9, V6) --------------------------------------------------------------------
    _float("Softmax", "normalization; keep FP16/FP32 (NVIDIA/TensorRT#4084)"),
    _float("LogSoftmax"),
    _float("LayerNormalization", "normalization; keep FP16/FP32"),
    _float("InstanceNormalization"),
    _float("GroupNormalization"),
    _float("Erf", "float alone; inside an Erf-form GELU after a weighted op it is an epilogue (gelu_region)"),
    OpRule("Gelu", "epilogue", epilogue=True, fuses_after=("Conv", "Gemm", "MatMul"), rules=("F3",),
           confidence=(_SEEN, _INF),
           note="GEMM epilogue (MatMul+bias+Erf-GELU in one kernel, FP16 engine in NVIDIA/TensorRT#4397); "
                "INT8 output with a following Q inferred like F2; no wrapped INT8 kernel assumed"),
    _float("Exp"),
    _float("Log"),
    _float("Pow"),
    _float("Sqrt"),
    _float("Reciprocal"),
    _float("ReduceSum"),
    _float("ReduceMax"),
    _float("ReduceMin"),
    _float("ReduceProd"),
    _float("ReduceL2"),
    _float("TopK"),
    _float("NonMaxSuppression"),
    _float("ArgMax"),
    _float("Einsum"),
    _float("CumSum"),
    # --- shape / integer ops (V4) ---------------------------------------------------------------
    _shape("Shape"),
    _shape("Size"),
    _shape("ConstantOfShape"),
    _shape("Range"),
    _shape("NonZero"),
    _shape("Constant", "constant producer"),
    _shape("Equal"),
    _shape("Where"),
)

#: op type -> rule. Read-only by convention; the passes and the analysis share it.
RULES: Mapping[str, OpRule] = {r.op: r for r in _TABLE}

#: Ops kept float by default even though TensorRT might run them INT8 (P9).
DEFAULT_SENSITIVE_OPS: tuple[str, ...] = ()

#: Weighted ops whose input 2 is a bias (kept float, V4; folded into the kernel's epilogue, F3).
BIAS_OPS: tuple[str, ...] = ("Conv", "ConvTranspose", "Gemm")

#: Pooling ops: one INT8 or float "Pooling" kernel (P7); GAP-like means included (ReduceMean, seen as
#: CudaPooling Int8 in the TF ResNet-50 QAT engine).
POOLING_OPS: tuple[str, ...] = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean")

#: Ops that cost no kernel of their own: a buffer reshaped in place, a removed no-op, a Concat whose
#: inputs are written into one buffer (P4, E8.4).
FREE_OPS: tuple[str, ...] = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Concat")

#: Ops a weight may sit behind between its constant (or Q/DQ) and the weighted op: TensorRT
#: constant-folds them (TF exports transpose weights; PyTorch adds Identity for shared weights).
WEIGHT_PASSTHROUGH_OPS: tuple[str, ...] = ("Identity", "Cast", "Transpose", "Reshape")

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


def rule_for(op: str) -> OpRule | None:
    """The rule for an op type, or None for ops the table does not know (treated as float)."""
    return RULES.get(op)


def ops_with_role(role: str) -> tuple[str, ...]:
    """All op types with a given role, in table order."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    return tuple(r.op for r in _TABLE if r.role == role)


def data_input_indices(node: gs.Node) -> tuple[int, ...]:
    """Indices of ``node``'s inputs that carry data (Q/DQ move across these, P7 wraps these).

    For SiLU's Mul the data input is the Sigmoid's input only; for Add/Mul/Concat every
    non-constant input.
    """
    rule = rule_for(node.op)
    n = len(node.inputs)
    if rule is None or rule.data_inputs == ALL:
        idx = tuple(i for i in range(n) if node.inputs[i] is not None and node.inputs[i].name
                    and not is_constant(node.inputs[i]))
        return idx if rule is not None else tuple(range(n))
    return tuple(i for i in rule.data_inputs if i < n)


def _is_integer_tensor(tensor: gs.Tensor | None) -> bool:
    dtype = getattr(tensor, "dtype", None)
    if dtype is None:
        return False
    try:
        np_dtype = np.dtype(dtype)
    except TypeError:
        try:
            np_dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(dtype)))
        except Exception:  # an onnx enum gs could not map: unknown, assume float
            return False
    return np_dtype.kind in "iub"


def commutes(node: gs.Node) -> bool:
    """Whether Q/DQ slide through ``node`` (§3 table).

    Pad only in constant mode with pad value 0 (P8); Cast only float-to-float (P10, inferred);
    nothing commutes on integer/bool data (a Gather on a shape tensor is a shape op, V4).
    """
    rule = rule_for(node.op)
    if rule is None or not rule.commutes:
        return False
    if node.inputs and (_is_integer_tensor(node.inputs[0]) or is_shape_op(producer(node.inputs[0]))):
        return False
    if node.outputs and _is_integer_tensor(node.outputs[0]):
        return False
    if node.op == "Pad":
        mode = node.attrs.get("mode", "constant")
        if (mode.decode() if isinstance(mode, bytes) else str(mode)) != "constant":
            return False
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
            value = const_value(node.inputs[2])
            if value is None or np.any(np.asarray(value) != 0):
                return False
        elif float(node.attrs.get("value", 0.0)) != 0.0:  # opset < 11 keeps the value in an attribute
            return False
        return True
    if node.op == "Cast":
        return int(node.attrs.get("to", 0)) in _FLOAT_TYPES
    if node.op == "Gather" and len(node.inputs) > 0 and is_constant(node.inputs[0]):
        return False  # an embedding/table lookup on a constant, not data movement of an activation
    return True


def _non_const_inputs(node: gs.Node) -> list[gs.Tensor]:
    return [t for t in node.inputs if t is not None and t.name and not is_constant(t)]


def is_bias_add(node: gs.Node) -> bool:
    """An Add with exactly one constant operand (F3: folds into the conv bias)."""
    if node.op != "Add" or len(node.inputs) != 2:
        return False
    consts = [is_constant(t) for t in node.inputs]
    return consts.count(True) == 1


def is_residual_add(node: gs.Node) -> bool:
    """An Add of two run-time tensors (a residual/skip connection; F5, F6, P3)."""
    return node.op == "Add" and len(node.inputs) == 2 and len(_non_const_inputs(node)) == 2


def _sigmoid_of(tensor: gs.Tensor) -> gs.Node | None:
    p = producer(tensor)
    return p if p is not None and p.op == "Sigmoid" else None


def is_silu_mul(node: gs.Node) -> bool:
    """True for Mul(x, Sigmoid(x)) (either operand order) and for the Sigmoid feeding such a Mul (F10)."""
    if node.op == "Sigmoid":
        return is_silu_sigmoid(node)
    if node.op != "Mul" or len(node.inputs) != 2:
        return False
    a, b = node.inputs
    for x, s in ((a, b), (b, a)):
        sig = _sigmoid_of(s)
        if sig is not None and sig.inputs and sig.inputs[0] is x:
            return True
    return False


def is_silu_sigmoid(node: gs.Node) -> bool:
    """The Sigmoid half of a SiLU: Sigmoid(x) consumed by Mul(x, Sigmoid(x))."""
    if node.op != "Sigmoid" or not node.outputs:
        return False
    return any(c.op == "Mul" and is_silu_mul(c) for c in node.outputs[0].outputs)


#: Ops of an exported Erf-form GELU, x·0.5·(1 + erf(x/√2)) (PyTorch/HF: Div, Erf, Add, Mul, Mul).
_GELU_OPS = ("Div", "Mul", "Erf", "Add")


def gelu_region(tensor: gs.Tensor) -> tuple[list[gs.Node], gs.Tensor] | None:
    """The Erf-form GELU reading ``tensor``: (its nodes in order, its output), or None (F3).

    Accepts the exported arrangements of ``x·0.5·(1+erf(x/√2))``: five nodes (Div or Mul by a
    constant, Erf, Add of a constant, two Muls), one Erf, constants scalar, every intermediate
    tensor read only inside, every reader of ``tensor`` inside, one output.
    """
    region: list[gs.Node] = []
    inside = {id(tensor)}
    tensors = [tensor]
    grew = True
    while grew and len(region) < 5:
        grew = False
        for t in list(tensors):
            for n in t.outputs:
                if n in region or n.op not in _GELU_OPS or len(n.outputs) != 1:
                    continue
                data = _non_const_inputs(n)
                consts = [const_value(i) for i in n.inputs if i is not None and i.name and is_constant(i)]
                if not data or any(id(i) not in inside for i in data) or any(np.size(c) != 1 for c in consts):
                    continue
                if n.op == "Add" and len(data) != 1:
                    continue  # erf(·) + 1
                if n.op == "Div" and data != [n.inputs[0]]:
                    continue  # x / √2, never a constant divided by x
                region.append(n)
                inside.add(id(n.outputs[0]))
                tensors.append(n.outputs[0])
                grew = True
    if len(region) != 5 or [n.op for n in region].count("Erf") != 1 or [n.op for n in region].count("Add") != 1:
        return None
    exits = [t for t in tensors[1:] if any(r not in region for r in t.outputs) or not t.outputs]
    if len(exits) != 1 or exits[0] is not region[-1].outputs[0] or any(r not in region for r in tensor.outputs):
        return None
    return region, exits[0]


def is_epilogue(node: gs.Node) -> bool:
    """Whether ``node`` can fuse into a preceding weighted op's epilogue (F3, F5, F10).

    Add only as a bias Add (one constant operand) or a residual Add (two run-time operands);
    Sigmoid and Mul only as the halves of SiLU.
    """
    rule = rule_for(node.op)
    if rule is None or not rule.epilogue:
        return False
    if node.op == "Add":
        return is_bias_add(node) or is_residual_add(node)
    if node.op in ("Mul", "Sigmoid"):
        return is_silu_mul(node)
    return True


def fuses_after(node: gs.Node, head: gs.Node) -> bool:
    """Whether chain link ``node`` (an epilogue, a SiLU half, or a node of an Erf-form GELU) fuses
    after weighted op ``head`` (``OpRule.fuses_after``; F9: no BN after ConvTranspose)."""
    rule = rule_for(node.op)
    if rule is not None and rule.epilogue:
        return head.op in rule.fuses_after
    return node.op in _GELU_OPS + ("Erf",) and head.op in RULES["Gelu"].fuses_after


def is_weighted(node: gs.Node) -> bool:
    """Conv/ConvTranspose/Gemm, or MatMul with a constant operand (F1)."""
    rule = rule_for(node.op)
    if rule is None or rule.role != "weighted":
        return False
    return weight_input_index(node) is not None


def _weight_shape(tensor: gs.Tensor) -> tuple[int, ...] | None:
    """Shape of a weight, from the tensor itself or the constant behind its Q/DQ/Cast chain."""
    shape = getattr(tensor, "shape", None)
    if shape is not None and all(isinstance(d, (int, np.integer)) for d in shape):
        return tuple(int(d) for d in shape)
    seen = 0
    while tensor is not None and seen < 8:
        seen += 1
        value = const_value(tensor)
        if value is not None:
            return tuple(np.shape(value))
        node = producer(tensor)
        if node is not None and node.op == "Transpose":
            inner = _weight_shape(node.inputs[0])
            if inner is None:
                return None
            perm = node.attrs.get("perm") or list(reversed(range(len(inner))))
            return tuple(inner[p] for p in perm)
        if node is None or not (is_q(node) or is_dq(node) or node.op in ("Identity", "Cast")):
            return None
        tensor = node.inputs[0]
    return None


def misaligned_channels(node: gs.Node) -> str | None:
    """Why a Conv's channel counts make INT8 a poor fit (P11), or None.

    INT8 conv kernels work on channel groups of 32. P11 (ModelOpt's rule) leaves a Conv float when
    it has fewer than 16 input (per group) or output channels, except a plain Conv with either count
    divisible by 8, a square kernel and (first layer or one count >= 16), and a grouped Conv with
    the output count divisible by 8 and every kernel side >= 3. Applied here to its extreme only: a
    plain (group 1) Conv reading a single channel, a filter bank over one signal (basic-pitch's
    constant-Q front end on raw audio: 1x256 kernels), where one lane of 32 is used and the
    quantized signal is summed over a long kernel. Narrower multi-channel Convs stay INT8 (the
    rule is inferred, unverified for them).
    """
    if node.op != "Conv" or not is_weighted(node) or int(node.attrs.get("group", 1)) != 1:
        return None
    shape = _weight_shape(node.inputs[1])
    if shape is None or len(shape) < 3 or shape[1] != 1:
        return None
    k = shape[0]
    kernel = list(node.attrs.get("kernel_shape") or shape[2:])
    first = isinstance(node.inputs[0], gs.Variable) and not node.inputs[0].inputs  # reads a graph input
    if k % 8 == 0 and (first or k >= 16) and len(set(kernel)) == 1:
        return None
    return f"1 input channel, {k} output, kernel {'x'.join(map(str, kernel))}: misaligned for INT8 kernels"


def weight_axis(node: gs.Node, *, convtranspose_axis: int | None = 1) -> int | None:
    """The per-channel axis for ``node``'s weight per V3, or None for per-tensor.

    Conv: 0. ConvTranspose: ``convtranspose_axis`` (1 for TRT>=10.2, 0 for 8.x), None when
    ``group > 1`` or the target is unknown. Gemm: 0 when ``transB`` else 1. MatMul with a
    constant 2-D B: 1 (the last axis); B of rank > 2 or a constant A: None (unverified, V3).
    """
    if not is_weighted(node):
        return None
    if node.op == "Conv":
        return 0
    if node.op == "ConvTranspose":
        if int(node.attrs.get("group", 1)) > 1:
            return None
        return convtranspose_axis
    if node.op == "Gemm":
        return 0 if int(node.attrs.get("transB", 0)) else 1
    if node.op == "MatMul":
        idx = weight_input_index(node)
        if idx != 1:
            return None
        shape = _weight_shape(node.inputs[1])
        if shape is None or len(shape) != 2:
            return None
        return 1
    return None


def is_quantizable_wrapped(node: gs.Node) -> bool:
    """Whether ``node`` runs INT8 when fully wrapped: DQ on every data input, Q on the output (P7).

    True for wrapped ops and for epilogue ops met outside a conv chain (a standalone ReLU or Add).
    """
    rule = rule_for(node.op)
    if rule is None or not rule.int8_wrapped:
        return False
    if node.op == "Resize" and any(_is_integer_tensor(t) for t in node.inputs[:1]):
        return False
    return True


def is_float_only(node: gs.Node, sensitive_ops: Iterable[str] = DEFAULT_SENSITIVE_OPS) -> bool:
    """Whether ``node`` should stay float: role ``float``, listed in ``sensitive_ops`` (P9), or unknown to the table."""
    if node.op in set(sensitive_ops):
        return True
    rule = rule_for(node.op)
    return rule is None or rule.role == "float"


def is_shape_op(node: gs.Node | None) -> bool:
    """Integer/shape computations that never carry Q/DQ (V4)."""
    if node is None:
        return False
    rule = rule_for(node.op)
    return rule is not None and rule.role == "shape"


def fuses_with_conv_act(node: gs.Node) -> bool:
    """A commuting op that joins a preceding INT8 Conv+activation kernel (F11: ConvActPool)."""
    rule = rule_for(node.op)
    return rule is not None and rule.commutes and "F11" in rule.rules


#: Ops between the two attention GEMMs that TensorRT's MHA fusion takes in: score scaling, mask, Softmax.
MHA_BETWEEN = ("Div", "Mul", "Add", "Where", "Cast", "Softmax")


def _is_batch_gemm(node: gs.Node | None) -> bool:
    return node is not None and node.op == "MatMul" and weight_input_index(node) is None


def _skip_qdq_back(tensor: gs.Tensor) -> gs.Node | None:
    node = producer(tensor)
    while node is not None and (is_dq(node) or is_q(node)):
        node = producer(node.inputs[0])
    return node


def _score_gemm(node: gs.Node | None, budget: int, exported: set[int]) -> gs.Node | None:
    """Walk back from Softmax over scaling/mask ops read only on the score path to the score GEMM."""
    if node is None or budget < 0 or len(node.outputs[0].outputs) != 1 or id(node.outputs[0]) in exported:
        return None
    if _is_batch_gemm(node):
        return node
    if node.op not in MHA_BETWEEN:
        return None
    for i in node.inputs:
        if i is None or not i.name or is_constant(i):
            continue
        found = _score_gemm(_skip_qdq_back(i), budget - 1, exported)
        if found is not None:
            return found
    return None


def attention_gemms(graph: gs.Graph) -> list[tuple[gs.Node, gs.Node]]:
    """The (score, context) batch-GEMM pairs of the attention blocks in ``graph``.

    ``MatMul(a, b) → [Div/Mul scale, Add/Where mask, Cast] → Softmax → MatMul(·, v)`` with both
    MatMuls reading two run-time tensors: the shape TensorRT's MHA fusion runs as one kernel, INT8
    when a Q/DQ sits before both GEMMs (maintainer, NVIDIA/TensorRT#3243) [documented]. Existing
    Q/DQ on the way is looked through, so the answer is the same before and after quantization.
    """
    pairs: list[tuple[gs.Node, gs.Node]] = []
    exported = {id(t) for t in graph.outputs}  # an intermediate that is also a graph output cannot fuse away
    for soft in graph.nodes:
        if soft.op != "Softmax":
            continue
        # forward: the context GEMM reads the probabilities (possibly through a Cast or a Q/DQ) as input 0
        t = soft.outputs[0]
        for _ in range(3):
            readers = t.outputs
            if id(t) in exported:
                break
            if len(readers) == 1 and (readers[0].op == "Cast" or is_q(readers[0]) or is_dq(readers[0])):
                t = readers[0].outputs[0]
                continue
            break
        context = [n for n in t.outputs if _is_batch_gemm(n) and n.inputs[0] is t]
        if len(context) != 1 or len(t.outputs) != 1 or id(t) in exported:
            continue
        score = _score_gemm(_skip_qdq_back(soft.inputs[0]), 6, exported)
        if score is not None:
            pairs.append((score, context[0]))
    return pairs


# --------------------------------------------------------------------------------------------
# TensorRT versions (trt-rules.md §1, §8). Rules whose behaviour or whose evidence depends on the
# release. ``--trt-version`` picks the release; the default is the newest the rules describe, and
# a behaviour asked for outside the releases its evidence covers is the newest evidence's,
# extrapolated and therefore tagged "inferred, unverified".

Version = tuple[int, int]

#: The newest TensorRT release trt-rules.md §1 describes (11.x). The default target.
NEWEST_VERSION: Version = (11, 1)


def parse_version(text: str | Version | None) -> Version:
    """``"10.6"``, ``"10"``, ``"8.6.1.6"`` or ``(10, 6)`` as (major, minor); None is :data:`NEWEST_VERSION`."""
    if text is None:
        return NEWEST_VERSION
    if isinstance(text, tuple):
        return (int(text[0]), int(text[1]) if len(text) > 1 else 0)
    parts = str(text).strip().split(".")
    try:
        major = int(parts[0])
        minor = int(parts[1]) if len(parts) > 1 and parts[1] != "" else 0
    except ValueError:
        raise ValueError(f"TensorRT version {text!r} is not MAJOR[.MINOR], e.g. 10.6") from None
    if not 8 <= major <= NEWEST_VERSION[0]:
        raise ValueError(f"TensorRT version {text!r}: the rules cover 8.x to {NEWEST_VERSION[0]}.x")
    return major, minor


def version_label(v: Version) -> str:
    return f"{v[0]}.{v[1]}"


@dataclass(frozen=True)
class VersionedRule:
    """A rule whose evidence covers the TensorRT releases ``seen`` (inclusive)."""

    id: str
    claim: str
    seen: tuple[Version, Version]
    confidence: str
    sources: str

    def covers(self, version: Version | None = None) -> bool:
        v = parse_version(version)
        return self.seen[0] <= v <= self.seen[1]

    def confidence_at(self, version: Version | None = None) -> str:
        return self.confidence if self.covers(version) else _INF

    def describe(self, version: Version | None = None) -> str:
        span = f"{version_label(self.seen[0])}-{version_label(self.seen[1])}"
        if self.covers(version):
            return f"{self.id} ({self.confidence}, TensorRT {span}): {self.claim}"
        return (f"{self.id} (unverified for TensorRT {version_label(parse_version(version))}: evidence covers "
                f"{span} only): {self.claim}")


VERSIONED_RULES: Mapping[str, VersionedRule] = {r.id: r for r in (
    VersionedRule("E8.1", "an activation between a conv and a residual Add keeps the Add out of the INT8 conv "
                          "kernel; the activation and the Add run as their own PointWise layer",
                  ((8, 4), (10, 6)), _SEEN, "NVIDIA/TensorRT#2204 (8.4.1), #3861 (8.5, 10.6)"),
    VersionedRule("E8.2", "a residual Add followed by its activation (ResNet order) fuses into the conv",
                  ((8, 5), (10, 16)), _SEEN, "verbose build log, 8.5.2 Orin; F5 in NVIDIA's Q/DQ placement guide"),
    VersionedRule("V3.convtranspose", "ConvTranspose weights are quantized per output channel on axis 1",
                  ((10, 2), NEWEST_VERSION), _INF, "trt-rules.md V3; 8.x quantizes axis 0"),
    VersionedRule("V.int8-weights", "an INT8 weight initializer read by a DequantizeLinear is accepted",
                  ((10, 0), NEWEST_VERSION), _DOC, "trt-rules.md §1 table (not supported on 8.6)"),
)}

#: Epilogue ops that are linear (they fold into the conv's scale and bias): not an activation.
_LINEAR_EPILOGUES = ("BatchNormalization",)


def is_activation(node: gs.Node) -> bool:
    """A non-linear epilogue of a fused chain: ReLU/Clip/LeakyReLU/HardSigmoid/HardSwish, SiLU's halves,
    GELU; not BN or a bias Add (they are folded into the weights), not a residual Add."""
    if node.op in _LINEAR_EPILOGUES or node.op == "Add":
        return False
    return node.op == "Erf" or is_epilogue(node)  # Erf: the non-linear node of an Erf-form GELU region


def is_pointwise_activation(node: gs.Node) -> bool:
    """A one-input activation epilogue (ReLU, Clip, LeakyReLU, HardSigmoid, HardSwish, Gelu): the
    activation that follows a residual Add in ResNet order and joins its kernel (F5, E8.2)."""
    return is_activation(node) and node.op != "Erf" and not is_silu_mul(node)


def activation_add_fuses(version: Version | None = None) -> bool:
    """Whether TensorRT fuses ``Conv → activation → Add(skip)`` into one INT8 kernel (E8.1).

    No explicit-quantization engine of any release shows it: 8.4-10.6 run the activation and the
    Add as a separate PointWise layer and the conv writes float. Releases after 10.6 are assumed to
    behave the same (NVIDIA ModelOpt's skip-only placement hints they might not; no engine confirms
    it), which :meth:`VersionedRule.confidence_at` reports as unverified.
    """
    parse_version(version)
    return False


def residual_add_joins_chain(chain: Iterable[gs.Node], version: Version | None = None) -> bool:
    """Whether a residual Add reading the end of the fused ``chain`` (its nodes, head included)
    joins the chain's kernel: always when no activation precedes it (F5, E8.2), else per E8.1."""
    return activation_add_fuses(version) or not any(is_activation(n) for n in chain)


def residual_placement(version: Version | None = None, *, float_bytes: int = 4) -> tuple[str, str]:
    """Where a residual Add after an activated conv chain gets its Q/DQ: ``"skip"`` (the skip input
    only, so the Add fuses into the conv) or ``"both"`` (NVIDIA's YOLOv5/YOLOv7 QAT recipe: both
    Add inputs quantized, the Add an INT8 PointWise layer), with the reason.

    Chosen by predicted kernels, then bytes moved per output element of the block (the conv's
    input read is the same either way):

    * fused (``activation_add_fuses``): skip-only = 1 kernel [Conv+act+Add: read skip 1 B, write
      1 B] = 2 B; both = 2 kernels [Conv+act writes 1 B; Add reads 1+1 B, writes 1 B] = 4 B.
    * not fused (E8.1): skip-only = 2 kernels [Conv writes ``float_bytes``; PointWise(act, Add)
      reads ``float_bytes`` + 1 B, writes 1 B]; both = 2 kernels, 4 B.
    """
    fused = activation_add_fuses(version)
    skip = (1, 2) if fused else (2, 2 * float_bytes + 2)
    both = (2, 4)
    choice = "skip" if skip <= both else "both"
    rule = VERSIONED_RULES["E8.1"]
    why = (f"{rule.id}: TensorRT {version_label(parse_version(version))} "
           f"{'fuses' if fused else 'does not fuse'} activation+Add into the conv "
           f"({rule.confidence_at(version)}); skip-only {skip[0]} kernels/{skip[1]} B per element, "
           f"both inputs {both[0]} kernels/{both[1]} B")
    return choice, why


def convtranspose_axis_for(version: Version | None = None) -> int | None:
    """ConvTranspose's per-channel weight axis on ``version`` (V3): 0 on 8.x, 1 from 10.2, None
    (per-tensor: safe on both) for 10.0-10.1, where the parser's choice is not known."""
    v = parse_version(version)
    if v < (10, 0):
        return 0
    return 1 if VERSIONED_RULES["V3.convtranspose"].covers(v) else None


def int8_weight_initializers(version: Version | None = None) -> bool:
    """Whether ``version`` accepts INT8 weight initializers read by a DQ (§1: from 10.0)."""
    return VERSIONED_RULES["V.int8-weights"].covers(version)
