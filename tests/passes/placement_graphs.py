"""Small float (and hand-quantized) graphs for the placement-pass tests, plus the helpers they share.

Every builder returns a float model built with :class:`tests.analysis_helpers.Builder` (weights
``N(0, 0.1)``, zero biases, names given explicitly so the tests can find the nodes). The
pass-level tests quantize them with ``insert-qdq`` first (:func:`prepare`), which is what the
placement passes see in the PTQ pipeline; the full-pipeline tests start from the float model.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

import qdqsurgeon
from qdqsurgeon.config import Config
from qdqsurgeon.ranges import StaticRanges

from ..analysis_helpers import Builder
from ..helpers import full_check, random_feeds, run

# --- runners and model queries ------------------------------------------------------------------


def ranges_of(model: onnx.ModelProto, feeds: dict[str, np.ndarray] | None = None) -> StaticRanges:
    """Exact absmax of every float tensor of ``model`` on ``feeds`` (the 'max' calibrator on one batch)."""
    feeds = feeds if feeds is not None else calib_feeds(model)
    names = [n for node in model.graph.node for n in node.output]
    values = run_tensors(model, names, feeds)
    amax = {n: float(np.max(np.abs(v))) for n, v in values.items() if v.dtype.kind == "f" and v.size}
    amax.update({k: float(np.max(np.abs(v))) for k, v in feeds.items()})
    return StaticRanges(amax)


def calib_feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The calibration batch (seed 1): ranges come from it, so nothing clips on it."""
    return random_feeds(model, seed=1, batch=2)


def run_tensors(model: onnx.ModelProto, names: Iterable[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Values of any tensors of ``model`` (intermediates exposed as outputs at run time only)."""
    names = list(dict.fromkeys(names))
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    m.graph.output.extend([helper.make_empty_tensor_value_info(n) for n in names])
    return dict(zip(names, run(m, feeds)))


def optimize(model: onnx.ModelProto, passes: Sequence[str] | None, ranges: StaticRanges | None = None, **cfg):
    """Run passes (None: the pipeline for the detected mode) with verification; full checker on the result."""
    res = qdqsurgeon.optimize(model, passes=None if passes is None else list(passes), ranges=ranges,
                              config=Config(**cfg), analyze=passes is None)
    full_check(res.model)
    return res


def prepare(model: onnx.ModelProto, *passes: str, **cfg) -> tuple[onnx.ModelProto, StaticRanges]:
    """``model`` after ``insert-qdq`` (+ ``passes``), and the float model's ranges for later passes."""
    rng = ranges_of(model)
    return optimize(model, ["insert-qdq", *passes], rng, **cfg).model, rng


def nodes_by_name(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in model.graph.node}


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def readers(model: onnx.ModelProto, tensor: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if tensor in n.input]


def is_pair_output(model: onnx.ModelProto, tensor: str) -> bool:
    """``tensor`` is DQ(Q(x)) (the reader takes it quantized)."""
    p = producers(model)
    dq = p.get(tensor)
    return dq is not None and dq.op_type == "DequantizeLinear" and p.get(dq.input[0]) is not None \
        and p[dq.input[0]].op_type == "QuantizeLinear"


def source(model: onnx.ModelProto, tensor: str) -> str:
    """The float tensor behind a DQ(Q(x)) output, else ``tensor``."""
    p = producers(model)
    return p[p[tensor].input[0]].input[0] if is_pair_output(model, tensor) else tensor


def reads_quantized(model: onnx.ModelProto, node: str, index: int = 0) -> bool:
    return is_pair_output(model, nodes_by_name(model)[node].input[index])


def q_scales(model: onnx.ModelProto, tensor: str) -> list[float]:
    """Scales of every activation Q reading ``tensor``."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return [float(inits[n.input[1]]) for n in readers(model, tensor) if n.op_type == "QuantizeLinear"]


def pair_scale(model: onnx.ModelProto, tensor: str) -> float:
    """Scale of the pair whose DQ produces ``tensor``."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return float(inits[producers(model)[tensor].input[1]])


def count_ops(model: onnx.ModelProto, op: str) -> int:
    return sum(n.op_type == op for n in model.graph.node)


def by_kind_rule(changes) -> dict[tuple[str, str], int]:
    """Edits (notes excluded) counted by (kind, rule)."""
    return dict(Counter((c.kind, c.rule) for c in changes if c.kind != "note"))


def notes(changes) -> list[str]:
    return [c.detail for c in changes if c.kind == "note"]


def edits(changes) -> list:
    return [c for c in changes if c.kind != "note"]


def sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    return float(10 * np.log10(np.sum(ref ** 2) / max(np.sum((ref - got) ** 2), 1e-30)))


# --- the network patterns -------------------------------------------------------------------------

C = 16  # channel counts are multiples of 16 so nothing trips the channel-alignment rule (P11)


def _head(b: Builder, y: str, c: int) -> None:
    """A quantized 1x1 Conv+ReLU (so the block output is read INT8), then GAP → Flatten → Gemm classifier."""
    y = b.conv(y, c, k=1, act="relu", qx=False, qw=False, name="tail_conv")
    y = b.node("GlobalAveragePool", [y], name="gap")
    y = b.node("Flatten", [y], name="flatten", axis=1)
    b.output(b.gemm(y, c, 10, qx=False, qw=False, name="fc"))


def resnet_block(kind: str = "downsample", tail: str = "conv") -> onnx.ModelProto:
    """stem Conv+ReLU → basic block (``downsample``: 1x1 stride-2 Conv on the skip; ``identity``) → tail.

    Tail ``conv``: a quantized Conv reads the block output; ``float``: the block output goes
    straight to GAP → Flatten → Gemm head, which exclude-output-layers keeps float.
    Names: ``stem``, ``block.conv1``, ``block.conv2``, ``block.downsample``, ``block.add``, ``block.relu``.
    """
    b = Builder(seed=1)
    x = b.input("input", [2, C, 16, 16])
    y0 = b.conv(x, C, act="relu", qx=False, qw=False, name="stem")
    cout, stride = (2 * C, 2) if kind == "downsample" else (C, 1)
    h = b.conv(y0, cout, stride=stride, act="relu", qx=False, qw=False, name="block.conv1")
    h = b.conv(h, cout, qx=False, qw=False, name="block.conv2")
    skip = b.conv(y0, cout, k=1, stride=stride, qx=False, qw=False, name="block.downsample") if kind == "downsample" else y0
    y = b.node("Relu", [b.node("Add", [h, skip], name="block.add")], name="block.relu")
    b.channels[y] = cout
    if tail == "conv":
        _head(b, y, cout)
    else:
        y = b.node("GlobalAveragePool", [y], name="gap")
        y = b.node("Flatten", [y], name="flatten", axis=1)
        b.output(b.gemm(y, cout, 10, qx=False, qw=False, name="fc"))
    return b.build()


def inverted_residual() -> onnx.ModelProto:
    """MobileNetV2: stem Conv+Clip(0,6) → 1x1 expand Conv+Clip → 3x3 depthwise Conv+Clip → 1x1 project Conv
    (no activation) → Add(block input) → tail."""
    b = Builder(seed=2)
    x = b.input("input", [2, C, 16, 16])
    y0 = b.conv(x, C, act="relu6", qx=False, qw=False, name="stem")
    h = b.conv(y0, 4 * C, k=1, act="relu6", qx=False, qw=False, name="expand")
    h = b.conv(h, 4 * C, k=3, group=4 * C, act="relu6", qx=False, qw=False, name="depthwise")
    h = b.conv(h, C, k=1, qx=False, qw=False, name="project")
    y = b.node("Add", [h, y0], name="block.add")
    b.channels[y] = C
    _head(b, y, C)
    return b.build()


def c2f() -> onnx.ModelProto:
    """YOLOv8 C2f with one bottleneck, SiLU = Sigmoid·Mul everywhere, then a float detection-style head Conv.

    cv1 Conv+SiLU → Split(a, b) → bottleneck(b): Conv+SiLU, Conv+SiLU, Add(b, ·) → Concat(a, b, add)
    → cv2 Conv+SiLU → head Conv (graph output).
    """
    b = Builder(seed=3)
    x = b.input("input", [2, C, 16, 16])
    y = b.conv(x, 2 * C, k=1, act="silu", qx=False, qw=False, name="cv1")
    a, s = b.node("Split", [y, b.const(np.asarray([C, C], np.int64))], name="split", n_out=2, axis=1)
    b.channels[a] = b.channels[s] = C
    h = b.conv(s, C, act="silu", qx=False, qw=False, name="m.cv1")
    h = b.conv(h, C, act="silu", qx=False, qw=False, name="m.cv2")
    add = b.node("Add", [s, h], name="m.add")
    cat = b.node("Concat", [a, s, add], name="concat", axis=1)
    b.channels[cat] = 3 * C
    y = b.conv(cat, 2 * C, k=1, act="silu", qx=False, qw=False, name="cv2")
    b.output(b.conv(y, C, k=1, qx=False, qw=False, name="head"))
    return b.build()


def sppf() -> onnx.ModelProto:
    """YOLO SPPF: stem Conv+SiLU → cv1 Conv+SiLU → MaxPool ×3 → Concat(cv1, p1, p2, p3) → cv2 Conv+SiLU → head Conv."""
    b = Builder(seed=4)
    x = b.input("input", [2, C, 16, 16])
    y = b.conv(x, 2 * C, k=1, act="silu", qx=False, qw=False, name="cv1")
    pools = [y]
    for i in range(3):
        pools.append(b.node("MaxPool", [pools[-1]], name=f"pool{i + 1}", kernel_shape=[5, 5], pads=[2, 2, 2, 2]))
    cat = b.node("Concat", pools, name="concat", axis=1)
    b.channels[cat] = 8 * C
    y = b.conv(cat, 2 * C, k=1, act="silu", qx=False, qw=False, name="cv2")
    b.output(b.conv(y, C, k=1, qx=False, qw=False, name="head"))
    return b.build()


def concat_branches(gain: float = 8.0) -> onnx.ModelProto:
    """Two Conv+ReLU branches, one scaled by ``gain`` (a different range), Concat → Conv → Relu → Conv (output).

    Names: ``branch_a``, ``branch_b`` (its Mul ``gain``), ``concat``, ``fuse``, ``head``.
    """
    b = Builder(seed=5)
    x = b.input("input", [2, C, 8, 8])
    ya = b.conv(x, C, act="relu", qx=False, qw=False, name="branch_a")
    yb = b.conv(x, C, act="relu", qx=False, qw=False, name="branch_b")
    yb = b.node("Mul", [yb, b.const(np.asarray(gain, np.float32))], name="gain")
    cat = b.node("Concat", [ya, yb], name="concat", axis=1)
    b.channels[cat] = 2 * C
    y = b.conv(cat, C, k=1, act="relu", qx=False, qw=False, name="fuse")
    b.output(b.conv(y, C, k=1, qx=False, qw=False, name="head"))
    return b.build()


def pooled_fanout(float_reader: bool = True) -> onnx.ModelProto:
    """Conv+ReLU → MaxPool → {Conv (quantized), Add(·, input-pooled) float reader} (the C1 near miss).

    With ``float_reader`` False the MaxPool output feeds only the Conv.
    """
    b = Builder(seed=6)
    x = b.input("input", [2, C, 8, 8])
    y = b.conv(x, C, act="relu", qx=False, qw=False, name="conv")
    p = b.node("MaxPool", [y], name="pool", kernel_shape=[2, 2], strides=[2, 2])
    z = b.conv(p, C, k=1, act="relu", qx=False, qw=False, name="next")
    b.output(b.conv(z, C, k=1, qx=False, qw=False, name="head"))
    if float_reader:
        b.output(b.node("Sigmoid", [p], name="float_reader"))
    return b.build()


def with_pair(model: onnx.ModelProto, tensor: str, reader: str | None, scale: float, *, zero_point: int = 0,
              zp_dtype=np.int8, name: str | None = None) -> onnx.ModelProto:
    """``model`` with a per-tensor Q→DQ on ``tensor`` feeding node ``reader`` (every reader when None)."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    t = graph.tensors()[tensor]
    base = name or f"{tensor}_hand"
    s = gs.Constant(f"{base}_scale", np.asarray(scale, np.float32))
    z = gs.Constant(f"{base}_zp", np.asarray(zero_point, zp_dtype))
    qo = gs.Variable(f"{base}_q", dtype=zp_dtype, shape=t.shape)
    do = gs.Variable(f"{base}_dq", dtype=np.float32, shape=t.shape)
    targets = [n for n in t.outputs if reader is None or n.name == reader]
    assert targets, f"{reader} does not read {tensor}"
    for n in targets:
        for k, i in enumerate(n.inputs):
            if i is t:
                n.inputs[k] = do
    graph.nodes.append(gs.Node("QuantizeLinear", f"{base}_Q", inputs=[t, s, z], outputs=[qo]))
    graph.nodes.append(gs.Node("DequantizeLinear", f"{base}_DQ", inputs=[qo, s, z], outputs=[do]))
    graph.toposort()
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    full_check(out)
    return out


def act_out(model: onnx.ModelProto, conv: str) -> str:
    """The output tensor of the activation (the single reader) following node ``conv``."""
    node = nodes_by_name(model)[conv]
    found = [n for n in model.graph.node if node.output[0] in n.input]
    if len(found) == 2 and {n.op_type for n in found} == {"Sigmoid", "Mul"}:  # SiLU
        found = [n for n in found if n.op_type == "Mul"]
    (reader,) = found
    return reader.output[0]


def qat_concat(scales: Sequence[float | None], out_scale: float, gains: Sequence[float] = (1.0, 4.0),
               zps: Sequence[np.generic | None] = (None, None)) -> onnx.ModelProto:
    """Branches ``Conv+ReLU (× gain)`` → optional qdq(scale_i) → Concat → qdq(out_scale) → Conv, as a QAT export writes it.

    Branch outputs are ``b{i}_out`` (before their pair); the Concat is ``concat``, its DQ output
    ``cat_dq_out`` (what the next Conv reads). Scale None leaves that input without a pair;
    ``zps`` gives an input pair another zero point (type and value).
    """
    b = Builder(seed=7)
    x = b.input("input", [2, C, 8, 8])
    ins = []
    for i, (s, g, zp) in enumerate(zip(scales, gains, zps)):
        y = b.conv(x, C, act="relu", qx=False, qw=False, name=f"branch{i}")
        y = b.node("Mul", [y, b.const(np.asarray(g, np.float32))], name=f"b{i}")
        b.channels[y] = C
        ins.append(y if s is None else b.qdq(y, s, name=f"in{i}", zp=zp))
    cat = b.node("Concat", ins, name="concat", axis=1)
    b.channels[cat] = C * len(ins)
    b.output(b.conv(b.qdq(cat, out_scale, name="cat"), C, k=1, qx=False, name="fuse"))
    return b.build()


def tapped_backbone() -> onnx.ModelProto:
    """convA+ReLU is both a graph output (a feature tap) and the input of convB → convC → head Conv (output)."""
    b = Builder(seed=9)
    x = b.input("input", [2, C, 8, 8])
    a = b.conv(x, C, act="relu", qx=False, qw=False, name="convA")
    b.output(a)
    y = b.conv(a, C, act="relu", qx=False, qw=False, name="convB")
    y = b.conv(y, C, act="relu", qx=False, qw=False, name="convC")
    b.output(b.conv(y, C, k=1, qx=False, qw=False, name="head"))
    return b.build()


def concat_dedicated_readers(s_in: float = 0.02, s1: float = 0.03, s2: float = 0.05) -> onnx.ModelProto:
    """Concat(qdq(A), B) read by two Convs through their own quantizers (``o1`` s1, ``o2`` s2), B without a pair.

    ModelOpt's ``DedicatedQDQPair=True`` / one quantizer per consumer in QAT exports.
    """
    b = Builder(seed=10)
    x = b.input("input", [2, C, 8, 8])
    a = b.conv(x, C, act="relu", qx=False, qw=False, name="A")
    c = b.conv(x, C, act="relu", qx=False, qw=False, name="B")
    cat = b.node("Concat", [b.qdq(a, s_in, name="ina"), c], name="concat", axis=1)
    b.channels[cat] = 2 * C
    y1 = b.conv(b.qdq(cat, s1, name="o1"), C, k=1, qx=False, name="c1")
    y2 = b.conv(b.qdq(cat, s2, name="o2"), C, k=1, qx=False, name="c2")
    b.output(b.node("Add", [y1, y2], name="sum"))
    return b.build()
