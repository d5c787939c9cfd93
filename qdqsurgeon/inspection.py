"""``qdqsurgeon inspect``: a census of a model's Q/DQ and its validity against TensorRT (rules V1–V6).

Pure reading: nothing here edits the graph.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .trt_rules import BIAS_OPS, WEIGHT_PASSTHROUGH_OPS
from .background import Background, can_fork
from .graph import (
    activation_input_index,
    dtype_name,
    gc_paused,
    behind_constant,
    DQ_OP,
    Q_OP,
    WEIGHTED_OPS,
    const_value,
    import_model,
    is_dq,
    is_graph_output,
    is_q,
    np_dtype,
    opset_version,
    producer,
    QParams,
    qparams,
    weight_input_index,
)

__all__ = ["Problem", "Inspection", "inspect_model", "validity_problems", "OPERATOR_QUANT_OPS", "has_qdq", "TRT_QTYPES",
           "QTYPE_LABELS", "layout_problem", "unsupported_qtype", "blocked_problem"]

logger = logging.getLogger(__name__)

# Operator-oriented and dynamic quantization ops that TensorRT's parser does not import (V4).
OPERATOR_QUANT_OPS = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QLinearAdd", "QLinearMul",
                      "QLinearGlobalAveragePool", "QLinearConcat", "QLinearLeakyRelu", "QLinearSigmoid",
                      "DynamicQuantizeLinear")
# Quantized types TensorRT's Quantize/Dequantize layers take. Sources (TensorRT 10/11 docs):
# - operator reference, Quantize: "T3: int4, int8, float4, float8"; block quantization "supported for
#   DataType::kINT4, DataType::kFP4, DataType::kFP8 and DataType::kINT8"; zero point all zeros, same
#   shape as the scale (docs.nvidia.com/deeplearning/tensorrt/latest/_static/operators/Quantize.html);
# - "Working with Quantized Types": INT8, INT4, FP8E4M3, FP4E2M1; "TensorRT quantizes activations and
#   weights for INT8, FP8, and FP4. Weight-only quantization is supported for INT4"
#   (docs.nvidia.com/deeplearning/tensorrt/10.11.0/inference-library/work-quantized-types.html);
# - NvInfer.h IQuantizeLayer: scale and zero point "rank lower or equal to 2"; FP8 clamps to [-448, 448].
# FP8 kernels need compute capability 8.9 or later (Ada GEMMs, Hopper). No 16-bit integer type is
# listed. uint8 is read as int8 with a symmetric range, which normalize-qdq converts (V2); int32 is a
# bias DQ (V4).
TRT_QTYPES = ("int8", "int4", "float8_e4m3fn", "float4_e2m1fn")
#: Types the engine computes in per data type label (the analysis's precision labels).
QTYPE_LABELS = {"int8": "int8", "uint8": "int8", "int4": "int4", "uint4": "int4", "float8_e4m3fn": "fp8",
                "float8_e5m2": "fp8", "float4_e2m1fn": "fp4", "int16": "int16", "uint16": "int16"}


@dataclass(frozen=True)
class Problem:
    rule: str
    node: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"rule": self.rule, "node": self.node, "message": self.message}


@dataclass
class Inspection:
    opset: int
    nodes: int
    ops: dict[str, int]
    quantize: int
    dequantize: int
    weighted: list[dict[str, Any]]
    scale_dtypes: dict[str, int]
    zero_point_dtypes: dict[str, int]
    per_channel: list[dict[str, Any]]
    problems: list[Problem] = field(default_factory=list)
    blocked: list[dict[str, Any]] = field(default_factory=list)
    quantized_dtypes: dict[str, int] = field(default_factory=dict)
    trt: dict[str, Any] | None = None
    sparsity: dict[str, Any] | None = None  # 2:4 structured sparsity per weighted op (qdqsurgeon.sparsity)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "opset": self.opset,
            "nodes": self.nodes,
            "ops": dict(sorted(self.ops.items(), key=lambda kv: (-kv[1], kv[0]))),
            "qdq": {"quantize": self.quantize, "dequantize": self.dequantize},
            "weighted_ops": {
                "total": len(self.weighted),
                "quantized": sum(1 for w in self.weighted if w["activation_quantized"] and w["weight_quantized"]),
                "details": self.weighted,
            },
            "scale_dtypes": self.scale_dtypes,
            "zero_point_dtypes": self.zero_point_dtypes,
            "per_channel": self.per_channel,
            "blocked": self.blocked,
            "quantized_dtypes": self.quantized_dtypes,
            "problems": [p.to_dict() for p in self.problems],
        }
        if self.sparsity is not None:
            out["sparsity"] = self.sparsity
        if self.trt is not None:
            out["trt"] = self.trt
        return out


def has_qdq(model: onnx.ModelProto) -> bool:
    """Whether the model already carries quantization (Q/DQ or operator-oriented ops)."""
    return any(n.op_type in (Q_OP, DQ_OP) or n.op_type in OPERATOR_QUANT_OPS for n in model.graph.node)


def _from_dq(tensor: gs.Tensor) -> bool:
    node = producer(tensor)
    # Transposed weights (TF exports) keep their quantization through the Transpose.
    while node is not None and node.op in WEIGHT_PASSTHROUGH_OPS:
        node = producer(node.inputs[0])
    return is_dq(node)


def _weight_format(tensor: gs.Tensor) -> str:
    """How a weight is stored: ``float``, or the quantized type and granularity of its DQ (``int4 block 32``)."""
    node = producer(tensor)
    while node is not None and node.op in WEIGHT_PASSTHROUGH_OPS:
        node = producer(node.inputs[0])
    qp = qparams(node) if is_dq(node) else None
    if qp is None:
        return "float"
    how = f"block {qp.block_size}" if qp.blocked else "per-channel" if qp.per_channel else "per-tensor"
    return f"{np.dtype(qp.qdtype).name} {how}"


def _weighted_ops(graph: gs.Graph) -> list[dict[str, Any]]:
    out = []
    for node in graph.nodes:
        if node.op not in WEIGHTED_OPS:
            continue
        widx = weight_input_index(node)
        if widx is None:
            continue
        aidx = activation_input_index(node)
        out.append({
            "node": node.name,
            "op": node.op,
            "activation_quantized": _from_dq(node.inputs[aidx]),
            "weight_quantized": _from_dq(node.inputs[widx]),
            "weight_format": _weight_format(node.inputs[widx]),
        })
    return out


def _output_channel_axis(node: gs.Node, weight_rank: int) -> tuple[int, ...]:
    """Axes TensorRT accepts for per-channel weights of ``node`` (V3 table)."""
    if node.op == "Conv":
        return (0,)
    if node.op == "ConvTranspose":
        return (0, 1)  # conflict across TensorRT versions, see V3
    if node.op == "Gemm":
        return (0,) if node.attrs.get("transB", 0) else (1,)
    if node.op == "MatMul":
        return (weight_rank - 1,)
    return tuple(range(weight_rank))


def _data_shape(node: gs.Node) -> list[int] | None:
    """The quantized side's static shape (a Q's input, a DQ's input), or None when unknown or dynamic."""
    t = node.inputs[0] if node.inputs else None
    shape = getattr(t, "shape", None)
    if shape is None:
        return None
    out = []
    for d in shape:
        if not isinstance(d, (int, np.integer)) or d < 0:
            return None
        out.append(int(d))
    return out


def layout_problem(node: gs.Node, *, zero_point: bool = True, qp: QParams | None = None) -> str | None:
    """Why a Q/DQ's scale / zero point layout is not one ONNX defines, or None.

    ONNX (QuantizeLinear 21): scale and zero point have the same shape; a scalar (per-tensor),
    a 1-D tensor of the ``axis`` extent (per-axis), or, with ``block_size``, the input's rank with
    ``ceil(extent / block_size)`` along ``axis`` and the input's extent elsewhere (blocked).
    ``zero_point=False`` checks the scale alone. ``qp``: the node's :func:`qparams`, when the caller has them.
    """
    qp = qp or qparams(node)
    if qp is None:
        return None
    scale, zp = qp.scale, qp.zero_point
    if zero_point and zp is not None and zp.shape != scale.shape and not (zp.size == 1 and scale.size == 1):
        return (f"zero point shape {list(zp.shape)} differs from the scale's {list(scale.shape)} "
                f"(ONNX requires the same shape)")
    if qp.blocked:
        shape = _data_shape(node)
        if shape is None:
            return None
        if scale.ndim != len(shape):
            return (f"block_size {qp.block_size} needs a scale of the input's rank {len(shape)}, "
                    f"got shape {list(scale.shape)}")
        axis = qp.axis % len(shape)
        want = [-(-d // qp.block_size) if i == axis else d for i, d in enumerate(shape)]
        if list(scale.shape) != want:
            return (f"blocked scale shape {list(scale.shape)} does not match input {shape} with "
                    f"block_size {qp.block_size} on axis {qp.axis} (expected {want})")
        return None
    if scale.size > 1:
        if scale.ndim != 1:
            return (f"scale of shape {list(scale.shape)} is neither per-tensor nor 1-D per-axis "
                    f"(and no block_size is set)")
        shape = _data_shape(node)
        if shape:
            axis = (qp.axis if qp.axis is not None else 1) % len(shape)
            if shape[axis] != scale.size:
                return (f"{scale.size} per-axis scales for axis {qp.axis} of extent {shape[axis]}")
    return None


def scale_counts(scale: np.ndarray) -> tuple[bool, int, int]:
    """(all values finite, how many are negative, how many are zero) of a Q/DQ scale (V1).

    A scale of up to a few hundred values (per-tensor ones and most per-channel ones) is read as
    Python numbers: numpy's reductions cost microseconds a call, which over the Q/DQ of a 100k-node
    graph added up to seconds.
    """
    if scale.size == 1:
        v = float(scale.reshape(-1)[0])
        return (True, int(v < 0), int(v == 0)) if math.isfinite(v) else (False, 0, 0)
    if scale.size <= 256:
        values = [float(v) for v in scale.reshape(-1).tolist()]
        return all(map(math.isfinite, values)), sum(v < 0 for v in values), sum(v == 0 for v in values)
    s = scale.astype(np.float64)
    return bool(np.all(np.isfinite(s))), int(np.sum(s < 0)), int(np.sum(s == 0))


def _nonzero(zp: np.ndarray) -> bool:
    """Whether a zero point has a non-zero value (small ones read as Python numbers, as in :func:`scale_counts`)."""
    if zp.size == 1:
        return float(zp.reshape(-1)[0]) != 0
    if zp.size <= 256 and zp.dtype.kind in "iu":
        return any(zp.reshape(-1).tolist())
    return bool(np.any(zp.astype(np.float64) != 0))


def unsupported_qtype(qp: "object") -> str | None:
    """Why TensorRT cannot import a Q/DQ of this quantized type (V4), or None (int8, uint8 -> V2, int32 -> bias)."""
    name = dtype_name(qp.qdtype)
    if name in TRT_QTYPES or name in ("uint8", "int32"):
        return None
    return (f"{name} quantization is not importable by TensorRT (its Quantize/Dequantize layers take "
            f"{', '.join(TRT_QTYPES)})")


def blocked_problem(node: gs.Node, qp: QParams | None = None) -> str | None:
    """Why TensorRT refuses a blocked Q/DQ (V3), or None.

    TensorRT (IQuantizeLayer / IDequantizeLayer, 10.x) takes block quantization for INT4, INT8,
    FP8 and FP4 with a build-time constant scale of the input's rank, "rank lower or equal to 2",
    symmetric; INT4 is weight-only ("Working with Quantized Types"): the blocked tensor must be a
    constant weight, and TensorRT runs the GEMM in float with the weight dequantized in its prologue.
    """
    qp = qp or qparams(node)
    if qp is None or not qp.blocked:
        return None
    if qp.scale.ndim > 2:
        return f"block-quantized {qp.scale.ndim}-D tensor: TensorRT takes block quantization on 2-D weights only"
    if dtype_name(qp.qdtype) == "int4" and not behind_constant(node.inputs[0]):
        return "INT4 block quantization of an activation: TensorRT supports INT4 as weight-only quantization"
    return None


def validity_problems(graph: gs.Graph) -> list[Problem]:
    """Everything in ``graph`` that TensorRT refuses or misreads (V1–V5), plus Q/DQ on graph outputs (P9)."""
    problems: list[Problem] = []
    opset = opset_version(graph)
    for node in graph.nodes:
        if node.op in OPERATOR_QUANT_OPS:
            problems.append(Problem("V4", node.name, f"{node.op} does not import into TensorRT; export in QDQ format"))
            continue
        if node.op not in (Q_OP, DQ_OP):
            continue
        qp = qparams(node)
        if qp is None:
            problems.append(Problem("V1", node.name, "scale is computed at run time; TensorRT needs a constant scale"))
            continue
        layout = layout_problem(node, qp=qp)
        if layout is not None:
            problems.append(Problem("V3", node.name, layout))
            continue
        bad_type = unsupported_qtype(qp)
        if bad_type is not None:
            problems.append(Problem("V4", node.name, bad_type))
        blocked = blocked_problem(node, qp)
        if blocked is not None:
            problems.append(Problem("V3", node.name, blocked))
        finite, negative, zero = scale_counts(qp.scale)
        if not finite:
            problems.append(Problem("V1", node.name, "scale has NaN or infinite values"))
        elif negative or zero:
            problems.append(Problem("V1", node.name, f"{negative + zero} scale value(s) are zero or negative"))
        if qp.zero_point is not None:
            zp = qp.zero_point
            if zp.dtype == np.uint8:
                problems.append(Problem("V2", node.name, "uint8 zero point: TensorRT reads it as int8 and quantizes symmetrically"))
            if _nonzero(zp):
                problems.append(Problem("V2", node.name, "non-zero zero point: TensorRT supports symmetric quantization only"))
            if qp.zero_point.dtype == np.int32:
                problems.append(Problem("V4", node.name, f"{qp.zero_point.dtype} dequantization (bias?) is not importable"))
        elif is_dq(node):
            src = node.inputs[0]
            if src.dtype is not None and np.dtype(src.dtype) == np.int32:
                problems.append(Problem("V4", node.name, "int32 dequantization (bias?) is not importable"))
        if qp.per_channel and not qp.blocked:
            if opset < 13:
                problems.append(Problem("V3", node.name, f"per-channel Q/DQ needs opset 13, model has {opset}"))
            if not qp.axis_written:
                problems.append(Problem("V3", node.name, "per-channel scale without explicit axis (TensorRT assumes 0, ONNX 1)"))
            if not behind_constant(node.inputs[0]):
                problems.append(Problem("V3", node.name, "per-channel quantization of an activation; TensorRT allows it on constant weights only"))
        if is_dq(node):
            for cons in node.outputs[0].outputs:
                if cons.op in BIAS_OPS and len(cons.inputs) > 2 and cons.inputs[2] is node.outputs[0]:
                    problems.append(Problem("V4", node.name, f"Q/DQ on the bias of {cons.name}; keep biases float"))
                elif qp.per_channel and not qp.blocked and cons.op in WEIGHTED_OPS and weight_input_index(cons) is not None \
                        and cons.inputs[weight_input_index(cons)] is node.outputs[0]:
                    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else 2
                    axis = qp.axis if qp.axis is not None and qp.axis >= 0 else (qp.axis or 0) + rank
                    if axis not in _output_channel_axis(cons, rank):
                        problems.append(Problem("V3", node.name, f"per-channel axis {qp.axis} is not the output-channel axis of {cons.op} {cons.name}"))
            if is_graph_output(graph, node.outputs[0]):
                problems.append(Problem("P9", node.name, "Q/DQ on a graph output only adds a Quantize+Dequantize pair"))
        src = node.inputs[0]
        # np_dtype: a constant not yet loaded carries types numpy cannot name (bfloat16) as ONNX enums
        if is_q(node) and src.dtype is not None and (kind := np_dtype(src.dtype)) is not None and kind.kind in "iub":
            problems.append(Problem("V4", node.name, f"quantizes an integer/bool tensor {src.name}"))
    return problems


def inspect_model(model: onnx.ModelProto | gs.Graph, *, trt: bool = False,
                  trt_version: tuple[int, int] | str | None = None) -> Inspection:
    """Census and validity problems of a model; with ``trt`` also the static TensorRT prediction."""
    with gc_paused():
        return _inspect(model, trt, trt_version)


def _inspect(model: onnx.ModelProto | gs.Graph, trt: bool, trt_version: tuple[int, int] | str | None) -> Inspection:
    graph = import_model(model) if isinstance(model, onnx.ModelProto) else model
    prediction = None
    if trt and isinstance(model, onnx.ModelProto) and can_fork(len(graph.nodes)):
        # A large graph's prediction runs in a forked child, on the graph as it is now (the census below
        # only reads it), while the census runs here (issue 15).
        prediction = Background(lambda: _predict(model, graph, trt_version), fork=True,
                                fallback=lambda: _predict(model, None, trt_version), name="qdqsurgeon-predict")
    ops = Counter(n.op for n in graph.nodes)
    scale_dtypes: Counter[str] = Counter()
    zp_dtypes: Counter[str] = Counter()
    per_channel: list[dict[str, Any]] = []
    blocked: list[dict[str, Any]] = []
    q_dtypes: Counter[str] = Counter()
    for node in graph.nodes:
        if node.op in (Q_OP, DQ_OP):
            qp = qparams(node)
            if qp is None:
                continue
            scale_dtypes[str(qp.scale.dtype)] += 1
            zp_dtypes[str(qp.zero_point.dtype) if qp.zero_point is not None else "none"] += 1
            q_dtypes[np.dtype(qp.qdtype).name] += 1
            if qp.blocked:
                blocked.append({"node": node.name, "dtype": np.dtype(qp.qdtype).name, "axis": qp.axis,
                                "block_size": qp.block_size, "scale_shape": list(qp.scale.shape),
                                "weight": behind_constant(node.inputs[0])})
            elif qp.per_channel:
                per_channel.append({"node": node.name, "axis": qp.axis, "channels": int(qp.scale.size),
                                    "axis_written": qp.axis_written})
    result = Inspection(
        opset=opset_version(graph),
        nodes=len(graph.nodes),
        ops=dict(ops),
        quantize=ops.get(Q_OP, 0),
        dequantize=ops.get(DQ_OP, 0),
        weighted=_weighted_ops(graph),
        scale_dtypes=dict(scale_dtypes),
        zero_point_dtypes=dict(zp_dtypes),
        per_channel=per_channel,
        problems=validity_problems(graph),
        blocked=blocked,
        quantized_dtypes=dict(q_dtypes),
    )
    from .sparsity import sparsity_report

    result.sparsity = sparsity_report(graph).to_dict()
    if prediction is not None:
        result.trt = prediction.result()
    elif trt:
        result.trt = _predict(model, graph, trt_version)
    return result


def _predict(model: onnx.ModelProto | gs.Graph, graph: gs.Graph | None, trt_version: tuple[int, int] | str | None) -> dict[str, Any]:
    """The static TensorRT prediction of ``model``; ``graph``, imported from it, is given up to the
    prediction (which then rewrites it instead of exporting and importing the model again)."""
    from .analysis import predict

    if isinstance(model, onnx.ModelProto):
        return predict(model, trt_version=trt_version, own=graph).to_dict()
    return predict(model, trt_version=trt_version).to_dict()
