"""Graph builders for the TensorRT rules and static-analysis tests.

:class:`Builder` writes small ONNX models with onnx.helper: convs with per-channel Q→DQ weights,
per-tensor activation Q/DQ (one scale per tensor unless told otherwise, as a max calibrator gives
for every quantizer reading the same tensor), pools, adds. On top of it sit reconstructions of
the networks behind real engine dumps: ResNet-18 (trt-rules §5), MobileNetV2 (TREx A100 dumps)
and the TF-QAT ResNet-50 (TREx RTX 3090 dump).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "SHARED",
    "Builder",
    "engine_layers",
    "count_origin",
    "resnet18",
    "tf_resnet50",
    "keras_resnet50_names",
    "mobilenet_v2_from_shared",
]

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"


def _scale_for(name: str) -> float:
    # Deterministic per tensor: two quantizers on one tensor calibrate to the same scale.
    return 0.01 + (zlib.crc32(name.encode()) % 1000) / 20000.0


class Builder:
    """A tiny NCHW graph builder; every helper returns the output tensor name."""

    def __init__(self, seed: int = 0, float_type: int = TensorProto.FLOAT) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.channels: dict[str, int] = {}
        self.rng = np.random.default_rng(seed)
        self.float_type = float_type
        self.np_float = helper.tensor_dtype_to_np_dtype(float_type)
        self._n = 0

    def _name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def input(self, name: str, shape: Sequence[int | str], dtype: int | None = None) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype or self.float_type, list(shape)))
        if len(shape) > 1 and isinstance(shape[1], int):
            self.channels[name] = shape[1]
        return name

    def output(self, name: str, dtype: int | None = None) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, dtype or self.float_type, None))
        return name

    def const(self, value: Any, name: str | None = None) -> str:
        name = name or self._name("const")
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: Sequence[str], name: str | None = None, n_out: int = 1, **attrs: Any) -> Any:
        name = name or self._name(op)
        outs = [f"{name}_out{i}" if n_out > 1 else f"{name}_out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, **attrs))
        if inputs and inputs[0] in self.channels and op not in ("Gemm", "MatMul", "Flatten", "Conv"):
            for o in outs:
                self.channels[o] = self.channels[inputs[0]]
        return outs[0] if n_out == 1 else outs

    # --- Q/DQ ---------------------------------------------------------------------------------

    def q(self, x: str, scale: float | None = None, name: str | None = None, zp: Any = None) -> str:
        s = self.const(np.asarray(_scale_for(x) if scale is None else scale, dtype=self.np_float))
        z = self.const(np.asarray(0, dtype=np.int8) if zp is None else np.asarray(zp))
        return self.node("QuantizeLinear", [x, s, z], name=name)

    def dq(self, x: str, scale: float | None = None, name: str | None = None, zp: Any = None,
           like: str | None = None) -> str:
        s = self.const(np.asarray(_scale_for(like or x) if scale is None else scale, dtype=self.np_float))
        z = self.const(np.asarray(0, dtype=np.int8) if zp is None else np.asarray(zp))
        out = self.node("DequantizeLinear", [x, s, z], name=name)
        if x in self.channels:
            self.channels[out] = self.channels[x]
        return out

    def qdq(self, x: str, scale: float | None = None, name: str | None = None, zp: Any = None) -> str:
        """Q→DQ on an activation; the scale defaults to one value per tensor."""
        out = self.dq(self.q(x, scale, name=f"{name}_q" if name else None, zp=zp), scale if scale is not None else
                      _scale_for(x), name=f"{name}_dq" if name else None, zp=zp)
        if x in self.channels:
            self.channels[out] = self.channels[x]
        return out

    def weight(self, shape: Sequence[int], quant: bool = True, axis: int = 0, int8_init: bool = False) -> str:
        w = (self.rng.standard_normal(shape) * 0.1).astype(self.np_float)
        if not quant:
            return self.const(w)
        amax = np.abs(w).reshape(shape[axis], -1).max(axis=1) if axis == 0 else \
            np.abs(np.moveaxis(w, axis, 0)).reshape(shape[axis], -1).max(axis=1)
        scale = np.maximum(amax / 127.0, 1e-8).astype(self.np_float)
        zp = np.zeros(shape[axis], dtype=np.int8)
        if int8_init:
            bshape = [1] * len(shape)
            bshape[axis] = shape[axis]
            qw = np.clip(np.round(w / scale.reshape(bshape)), -128, 127).astype(np.int8)
            src = self.const(qw)
        else:
            src = self.node("QuantizeLinear", [self.const(w), self.const(scale), self.const(zp)], axis=axis)
        return self.node("DequantizeLinear", [src, self.const(scale), self.const(zp)], axis=axis)

    # --- layers -------------------------------------------------------------------------------

    def conv(self, x: str, cout: int, k: int = 3, stride: int = 1, group: int = 1, *, qx: bool = True,
             qw: bool = True, bn: bool = False, act: str | None = None, name: str | None = None,
             int8_init: bool = False) -> str:
        cin = self.channels[x]
        xin = self.qdq(x) if qx else x
        w = self.weight((cout, cin // group, k, k), quant=qw, int8_init=int8_init)
        b = self.const(np.zeros(cout, dtype=self.np_float))
        out = self.node("Conv", [xin, w, b], name=name, kernel_shape=[k, k], strides=[stride, stride],
                        pads=[k // 2] * 4, group=group)
        self.channels[out] = cout
        if bn:
            ones, zeros = np.ones(cout, self.np_float), np.zeros(cout, self.np_float)
            out = self.node("BatchNormalization", [out, self.const(ones), self.const(zeros), self.const(zeros),
                                                   self.const(ones)])
            self.channels[out] = cout
        if act == "relu":
            out = self.node("Relu", [out])
        elif act == "relu6":
            out = self.node("Clip", [out, self.const(np.asarray(0, self.np_float)), self.const(np.asarray(6, self.np_float))])
        elif act == "silu":
            sig = self.node("Sigmoid", [out])
            out = self.node("Mul", [out, sig])
        self.channels[out] = cout
        return out

    def gemm(self, x: str, cin: int, cout: int, *, qx: bool = True, qw: bool = True, name: str | None = None) -> str:
        xin = self.qdq(x) if qx else x
        w = self.weight((cout, cin), quant=qw, axis=0)
        b = self.const(np.zeros(cout, dtype=self.np_float))
        return self.node("Gemm", [xin, w, b], name=name, transB=1)

    def build(self, opset: int = 17, check: bool = True) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "built", self.inputs, self.outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 9
        # Give the outputs their inferred shapes (full_check wants them).
        done = onnx.shape_inference.infer_shapes(model).graph
        inferred = {v.name: v for v in list(done.value_info) + list(done.output)}
        for out in model.graph.output:
            if out.name in inferred and not out.type.tensor_type.HasField("shape"):
                out.CopyFrom(inferred[out.name])
        if check:
            onnx.checker.check_model(model, full_check=True)
        return model


# --- real engine dumps ------------------------------------------------------------------------


def engine_layers(path: Path) -> list[dict[str, Any]]:
    doc = json.loads(Path(path).read_text())
    return doc["Layers"] if isinstance(doc, dict) else doc


def count_origin(path: Path, origin: str = "QDQ") -> int:
    """Layers of a TensorRT layer-info dump with a given ``Origin`` (E1)."""
    return sum(1 for layer in engine_layers(path) if isinstance(layer, dict) and layer.get("Origin") == origin)


# --- reconstructed networks ---------------------------------------------------------------------


def resnet18(variant: str = "naive", stages: Sequence[int] = (2, 2, 2, 2), width: int = 8,
             hw: int = 32) -> onnx.ModelProto:
    """A torchvision-shaped ResNet-18 (BN folded) with the Q/DQ placements of trt-rules §5.

    ``naive``: pytorch-quantization default, Q/DQ on Conv/Gemm inputs and weights only.
    ``residual``: + Q/DQ on the skip operand of every residual Add (P3).
    ``residual_qgap``: + Q/DQ on the GlobalAveragePool input (P7).
    """
    assert variant in ("naive", "residual", "residual_qgap")
    b = Builder()
    x = b.input("input", [1, 3, hw, hw])
    y = b.conv(x, width, k=7, stride=2, act="relu", name="conv1")
    y = b.node("MaxPool", [y], name="maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    c = width
    for si, blocks in enumerate(stages):
        cout = width * 2 ** si
        for bi in range(blocks):
            stride = 2 if si > 0 and bi == 0 else 1
            name = f"layer{si + 1}.{bi}"
            h = b.conv(y, cout, stride=stride, act="relu", name=f"{name}.conv1")
            h = b.conv(h, cout, name=f"{name}.conv2")
            skip = y
            if stride != 1 or c != cout:
                skip = b.conv(y, cout, k=1, stride=stride, name=f"{name}.downsample")
            if variant != "naive":
                skip = b.qdq(skip, name=f"{name}.residual_quantizer")
            y = b.node("Relu", [b.node("Add", [h, skip], name=f"{name}.add")], name=f"{name}.relu")
            b.channels[y] = cout
            c = cout
    if variant == "residual_qgap":
        y = b.qdq(y, name="gap_quantizer")
    y = b.node("GlobalAveragePool", [y], name="avgpool")
    y = b.node("Flatten", [y], name="flatten", axis=1)
    b.output(b.gemm(y, c, 10, name="fc"))
    return b.build()


def tf_resnet50(stages: Sequence[int] = (3, 4, 6, 3), width: int = 8, hw: int = 64) -> onnx.ModelProto:
    """ResNet-50 v1 with the TF QAT toolkit's placement (TREx ``trex_tf_resnet50_rtx3090/qat``).

    Q/DQ after the input Pad, on every Conv input and weight, on every residual Add input except
    the conv branch (ResidualConnectionQDQCase), on the Mean (GAP) input and on the Dense input.
    """
    b = Builder()
    x = b.input("input_1", [1, 3, hw, hw])
    x = b.node("Pad", [x, b.const(np.asarray([0, 0, 3, 3, 0, 0, 3, 3], np.int64))], name="conv1_pad")
    b.channels[x] = 3
    y = b.conv(x, width, k=7, stride=2, act="relu", name="conv1_conv")
    y = b.node("Pad", [y, b.const(np.asarray([0, 0, 1, 1, 0, 0, 1, 1], np.int64))], name="pool1_pad")
    y = b.node("MaxPool", [y], name="pool1_pool", kernel_shape=[3, 3], strides=[2, 2])
    c = width
    for si, blocks in enumerate(stages):
        mid, cout = width * 2 ** si, width * 4 * 2 ** si
        for bi in range(blocks):
            stride = 2 if si > 0 and bi == 0 else 1
            name = f"conv{si + 2}_block{bi + 1}"
            h = b.conv(y, mid, k=1, stride=stride, act="relu", name=f"{name}_1_conv")
            h = b.conv(h, mid, k=3, act="relu", name=f"{name}_2_conv")
            h = b.conv(h, cout, k=1, name=f"{name}_3_conv")
            skip = b.conv(y, cout, k=1, stride=stride, name=f"{name}_0_conv") if bi == 0 else y
            y = b.node("Relu", [b.node("Add", [h, b.qdq(skip)], name=f"{name}_add")], name=f"{name}_out")
            b.channels[y] = cout
            c = cout
    y = b.node("ReduceMean", [b.qdq(y)], name="avg_pool", axes=[2, 3], keepdims=0)
    w = b.weight((c, 10), axis=1)
    logits = b.node("Add", [b.node("MatMul", [b.qdq(y), w], name="predictions"), b.const(np.zeros(10, np.float32))],
                    name="predictions_bias")
    b.nodes.append(helper.make_node("Softmax", [logits], ["probs"], name="softmax", axis=-1))
    b.output("probs")
    return b.build()


def keras_resnet50_names(model: onnx.ModelProto, *, qat: bool) -> onnx.ModelProto:
    """Rename :func:`tf_resnet50`'s nodes as tf2onnx names a Keras ``ResNet50`` (``resnet50/<layer>/<op>``;
    the QAT toolkit's wrapped layers get ``quant_``), so an engine dump's layer names are this model's
    node names and the matcher pairs them by name, as it would for the exported model itself."""
    quant = "quant_" if qat else ""
    prod = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        src = prod.get(n.input[0]) if n.input else None
        if n.op_type == "Conv":
            n.name = f"resnet50/{quant}{n.name}/{'BiasAdd' if n.name == 'conv1_conv' else 'Conv2D'}"
        elif n.op_type == "Relu" and src is not None and src.op_type == "Conv":
            layer = src.name.split("/")[1].removeprefix("quant_").removesuffix("_conv")
            n.name = f"resnet50/{layer}_relu/Relu"
        elif n.op_type == "Relu" and n.name.endswith("_out"):
            n.name = f"resnet50/{n.name}/Relu"
        elif n.op_type == "Add" and n.name.endswith("_add"):
            n.name = f"resnet50/{quant}{n.name}/add"
        elif n.name in ("conv1_pad", "pool1_pad"):
            n.name = f"resnet50/{n.name}/Pad"
        elif n.name == "pool1_pool":
            n.name = "resnet50/pool1_pool/MaxPool"
        elif n.name == "avg_pool":
            n.name = f"resnet50/{quant}avg_pool/Mean"
        elif n.name == "predictions":
            n.name = f"resnet50/{quant}predictions/MatMul"
        elif n.name == "predictions_bias":
            n.name = f"resnet50/{quant}predictions/BiasAdd"
        elif n.name == "softmax":
            n.name = f"resnet50/{quant}predictions/Softmax"
    return model


def mobilenet_v2_from_shared(residual: bool, classes: int = 1000) -> onnx.ModelProto:
    """MobileNetV2 QAT as in the TREx A100 dumps, built on ``fp32/mobilenetv2_bottleneck.onnx``.

    pytorch-quantization placement: Q/DQ on every Conv input (one quantizer per Conv, calibrated
    on its input tensor) and per-channel Q→DQ on float weights; the embedding head (two
    ReduceMean) is replaced by torchvision's GlobalAveragePool → Flatten → Q/DQ → Gemm classifier.
    ``residual`` adds a Q/DQ on the skip operand of every residual Add (P3).
    """
    model = onnx.load(str(SHARED / "models" / "fp32" / "mobilenetv2_bottleneck.onnx"))
    graph = gs.import_onnx(model)
    counter = iter(range(1_000_000))

    def qdq(t: gs.Tensor, scale: float, zp_axis: int | None = None, per_channel: np.ndarray | None = None) -> gs.Tensor:
        k = next(counter)
        if per_channel is not None:
            s = gs.Constant(f"qdq{k}_scale", per_channel.astype(np.float32))
            z = gs.Constant(f"qdq{k}_zp", np.zeros(per_channel.shape, np.int8))
        else:
            s = gs.Constant(f"qdq{k}_scale", np.asarray(scale, np.float32))
            z = gs.Constant(f"qdq{k}_zp", np.asarray(0, np.int8))
        attrs = {"axis": zp_axis} if zp_axis is not None else {}
        qo = gs.Variable(f"qdq{k}_q", dtype=np.int8)
        do = gs.Variable(f"qdq{k}_dq", dtype=np.float32)
        graph.nodes.append(gs.Node("QuantizeLinear", f"QuantizeLinear_{k}", attrs, [t, s, z], [qo]))
        graph.nodes.append(gs.Node("DequantizeLinear", f"DequantizeLinear_{k}", attrs, [qo, s, z], [do]))
        return do

    skips = []
    if residual:
        for n in graph.nodes:
            if n.op == "Add" and len(n.inputs) == 2:
                # The skip operand is the block input: it also feeds the block's first Conv.
                skips.append((n, max((0, 1), key=lambda i: len(n.inputs[i].outputs))))
    for n in [n for n in graph.nodes if n.op == "Conv"]:
        x = n.inputs[0]
        n.inputs[0] = qdq(x, _scale_for(x.name))
        w = n.inputs[1]
        amax = np.abs(w.values).reshape(w.values.shape[0], -1).max(axis=1)
        n.inputs[1] = qdq(w, 0.0, zp_axis=0, per_channel=np.maximum(amax / 127.0, 1e-8))
    for add, i in skips:
        add.inputs[i] = qdq(add.inputs[i], _scale_for(add.inputs[i].name))
    # Classifier head of torchvision's MobileNetV2 instead of the embedding's two ReduceMean.
    means = [n for n in graph.nodes if n.op == "ReduceMean"]
    feat = means[0].inputs[0]
    for n in means:
        n.inputs.clear()
        n.outputs.clear()
    pooled = gs.Variable("pooled", dtype=np.float32)
    flat = gs.Variable("flat", dtype=np.float32)
    graph.nodes.append(gs.Node("GlobalAveragePool", "GlobalAveragePool_head", inputs=[feat], outputs=[pooled]))
    graph.nodes.append(gs.Node("Flatten", "Flatten_head", {"axis": 1}, [pooled], [flat]))
    rng = np.random.default_rng(0)
    wv = (rng.standard_normal((classes, 1280)) * 0.01).astype(np.float32)
    w = gs.Constant("classifier.1.weight", wv)
    wq = qdq(w, 0.0, zp_axis=0, per_channel=np.abs(wv).max(axis=1) / 127.0)
    logits = gs.Variable("logits", dtype=np.float32, shape=[1, classes])
    graph.nodes.append(gs.Node("Gemm", "Gemm_head", {"transB": 1},
                               [qdq(flat, _scale_for("flat")), wq, gs.Constant("classifier.1.bias", np.zeros(classes, np.float32))],
                               [logits]))
    graph.outputs = [logits]
    graph.cleanup().toposort()
    return gs.export_onnx(graph)


# --- drift between the passes' and the analysis's view of fused chains (issue 13 item 1) ----------

def chain_disagreements(model: onnx.ModelProto) -> list[str]:
    """Where the analysis's forward chain walk (``predict(...).weighted_ops[i]["fused"]``) and the passes'
    backward walk (:func:`qdqsurgeon.qdq.conv_chain`) disagree, one line per chain; empty when they agree.

    Both directions: every chain the analysis fuses, walked back from its last epilogue (before a residual
    Add, which only the forward walk takes in), gives the same nodes; and every tensor the backward walk
    calls the end of an exclusive chain lies on the chain the analysis found for that head.
    """
    from qdqsurgeon.analysis import predict
    from qdqsurgeon.graph import import_model
    from qdqsurgeon.qdq import conv_chain
    from qdqsurgeon import trt_rules as R

    graph = import_model(model)
    by_name = {n.name: n for n in graph.nodes}
    fused = {w["node"]: list(w["fused"]) for w in predict(graph).weighted_ops}
    problems: list[str] = []
    for head, names in fused.items():
        core = []
        for name in names:
            node = by_name.get(name)
            if node is None or R.is_residual_add(node) or (core and R.fuses_with_conv_act(node)):
                break
            core.append(node)
        if len(core) < 2:
            continue
        end = core[-1].outputs[0]
        back = conv_chain(end, exclusive=False)
        got = [n.name for n in back] if back else None
        if got != [n.name for n in core]:
            problems.append(f"analysis fuses {[n.name for n in core]}; conv_chain({end.name}) gives {got}")
    for node in graph.nodes:
        if not node.outputs or R.is_weighted(node) or not R.is_epilogue(node):
            continue
        back = conv_chain(node.outputs[0], exclusive=True)
        if back is None or R.is_residual_add(node):
            continue
        head = back[0].name
        if head in fused and node.name not in fused[head]:
            problems.append(f"conv_chain puts {node.name} on {head}'s chain; the analysis fuses {fused[head]}")
    return problems
