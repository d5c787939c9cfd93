"""float16-regions (P10): float parts in FP16, FP16 Q/DQ scales, sensitive ops and I/O in FP32."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdqsurgeon
from qdqsurgeon.config import Config
from qdqsurgeon.errors import ModelError
from qdqsurgeon.passes.float16_regions import Float16Regions
from qdqsurgeon.ranges import StaticRanges
from qdqsurgeon.registry import Registry

from ..helpers import F, FP32, full_check, init, make_model, need_shared, random_feeds, run
from .test_insert_qdq import _ranges, _sqnr

H = TensorProto.FLOAT16
PASS = "float16-regions"


def _registry() -> Registry:
    reg = Registry.builtin()
    if PASS not in reg:
        reg.add_pass(Float16Regions)
    return reg


def _f16(model: onnx.ModelProto, **cfg):
    return qdqsurgeon.optimize(model, passes=[PASS], registry=_registry(), config=Config(float16=True, **cfg),
                               analyze=False)


def _ptq(model: onnx.ModelProto) -> onnx.ModelProto:
    return qdqsurgeon.optimize(model, mode="ptq", ranges=_ranges(model), registry=_registry(), analyze=False).model


def _cnn(softmax: bool = False, opset: int = 19) -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def rand(name: str, shape: tuple[int, ...], k: float) -> onnx.TensorProto:
        return init(name, (rng.standard_normal(shape) * k).astype(np.float32))

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["logits" if softmax else "y"], name="fc", transB=1),
    ]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["y"], name="softmax", axis=-1))
    inits = [rand("w1", (8, 3, 3, 3), 0.3), rand("w2", (16, 8, 3, 3), 0.15), rand("w3", (10, 16), 0.3),
             rand("b1", (8,), 0.1), rand("b2", (16,), 0.1), rand("b3", (10,), 0.1)]
    return make_model(nodes, [("x", F, [2, 3, 16, 16])], [("y", F, [2, 10])], inits, opset=opset)


def _types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor, after shape inference."""
    m = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    out = {i.name: i.data_type for i in m.graph.initializer}
    for vi in [*m.graph.input, *m.graph.output, *m.graph.value_info]:
        out[vi.name] = vi.type.tensor_type.elem_type
    return out


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def _sqnr_over(ref: onnx.ModelProto, got: onnx.ModelProto, seeds=(7, 8, 9)) -> float:
    refs, gots = [], []
    for seed in seeds:
        feeds = random_feeds(ref, seed=seed)
        refs.append(run(ref, feeds)[0])
        gots.append(run(got, feeds)[0].astype(np.float32))
    return _sqnr(np.concatenate(refs), np.concatenate(gots))


def _contract(model: onnx.ModelProto, **cfg):
    """Checker, P10 rule on every edit, idempotence; returns the first result."""
    res = _f16(model, **cfg)
    full_check(res.model)
    assert all(c.rule in ("P10", "cleanup") for c in res.changes if c.kind != "note"), res.changes
    again = _f16(res.model, **cfg)
    assert [c for c in again.changes if c.kind != "note"] == []
    return res


# -- basic behaviour ---------------------------------------------------------------------------
def test_noop_without_the_float16_flag():
    model = _ptq(_cnn())
    res = qdqsurgeon.optimize(model, passes=[PASS], registry=_registry(), config=Config(), analyze=False)
    assert res.changes == []
    assert res.model.graph == model.graph


def test_qdq_cnn_runs_fp16_with_fp16_scales_and_fp32_io():
    fp32 = _cnn()
    qdq = _ptq(fp32)
    res = _contract(qdq)
    m = res.model
    types = _types(m)
    prod = _producers(m)
    # I/O unchanged; one Cast writes the output, the input Q reads the FP32 input directly (P10).
    assert types["x"] == F and types["y"] == F
    assert prod["y"].op_type == "Cast" and types[prod["y"].input[0]] == H
    assert [n.op_type for n in m.graph.node].count("Cast") == 1
    q_in = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    assert types[q_in.input[1]] == F
    # Every DQ emits FP16 (its scale is FP16), every other float op computes in FP16.
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear":
            assert types[n.input[1]] == H and types[n.output[0]] == H
        if n.op_type in ("Conv", "Relu", "MaxPool", "GlobalAveragePool", "Flatten", "Gemm"):
            assert all(types[t] == H for t in [*n.input, *n.output] if t), n.name
        if n.op_type == "QuantizeLinear" and n is not q_in:
            assert types[n.input[0]] == H and types[n.input[1]] == H
    # The FP32 half of the input pair got the FP16-rounded scale: Q and DQ agree bit for bit.
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    dq_in = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q_in.output[0])
    assert inits[q_in.input[1]] == inits[dq_in.input[1]].astype(np.float32)
    kinds = Counter(c.kind for c in res.changes if c.kind != "note")
    assert kinds["add"] == 1 and kinds["retype"] > 0 and kinds["constant"] > 0
    assert not [i for i in m.graph.initializer if i.data_type == F and i.name not in (q_in.input[1],)]
    # Numerics: the FP16 model tracks the FP32 Q/DQ model and the float model.
    assert _sqnr_over(qdq, m) > 30
    assert _sqnr_over(fp32, m) > 30


def test_float_model_without_qdq_keeps_its_opset():
    fp32 = _cnn(opset=17)
    res = _contract(fp32)
    assert res.model.opset_import[0].version == 17
    assert _sqnr_over(fp32, res.model) > 40


def test_softmax_stays_fp32_with_a_cast_in_front():
    fp32 = _cnn(softmax=True)
    res = _contract(_ptq(fp32))
    m = res.model
    types = _types(m)
    sm = _node(m, "softmax")
    assert types[sm.input[0]] == F and types[sm.output[0]] == F
    cast = _producers(m)[sm.input[0]]
    assert cast.op_type == "Cast" and types[cast.input[0]] == H
    # Softmax writes the FP32 output itself: no Cast after it.
    assert [n.op_type for n in m.graph.node].count("Cast") == 1
    notes = [c for c in res.changes if c.kind == "note" and c.node == "softmax"]
    assert notes and notes[0].rule == "P9"
    assert _sqnr_over(fp32, m) > 30


def test_sensitive_ops_config_takes_node_names():
    fp32 = _cnn()
    res = _contract(fp32, sensitive_ops=["fc"])
    types = _types(res.model)
    fc = _node(res.model, "fc")
    assert all(types[t] == F for t in [*fc.input, *fc.output])
    assert types[_node(res.model, "conv2").output[0]] == H


@pytest.mark.parametrize("softmax", [False, True])
def test_io_float16(softmax):
    fp32 = _cnn(softmax=softmax)
    res = _contract(_ptq(fp32), io_float16=True)
    m = res.model
    types = _types(m)
    assert types["x"] == H and types["y"] == H
    casts = [n for n in m.graph.node if n.op_type == "Cast"]
    # Without a sensitive op the graph has no Cast at all; with Softmax, one each side of it.
    assert len(casts) == (2 if softmax else 0)
    q_in = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    assert types[q_in.input[1]] == H
    feeds = {"x": random_feeds(fp32, seed=7)["x"].astype(np.float16)}
    ref = run(fp32, {"x": feeds["x"].astype(np.float32)})[0]
    got = run(m, feeds)[0]
    assert got.dtype == np.float16
    assert _sqnr(ref, got.astype(np.float32)) > 30


# -- typed operands of non-data inputs -----------------------------------------------------------
def _aux_model(opset: int = 17) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Clip", ["x", "lo", "hi"], ["c"], name="clip"),
        helper.make_node("Resize", ["c", "", "scales"], ["r"], name="resize", mode="linear"),
        helper.make_node("Pad", ["r", "pads", "pad_value"], ["p"], name="pad"),
        helper.make_node("Shape", ["p"], ["s"], name="shape"),
        helper.make_node("Reshape", ["p", "s"], ["y"], name="reshape"),
    ]
    inits = [init("lo", np.array(-1.0, np.float32)), init("hi", np.array(2.5, np.float32)),
             init("scales", np.array([1, 1, 2, 2], np.float32)), init("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)),
             init("pad_value", np.array(0.5, np.float32))]
    return make_model(nodes, [("x", F, [1, 2, 4, 4])], [("y", F, [1, 2, 10, 10])], inits, opset=opset)


def test_clip_pad_follow_data_resize_scales_stay_fp32():
    fp32 = _aux_model()
    res = _contract(fp32)
    m = res.model
    types = _types(m)
    clip, resize, pad = _node(m, "clip"), _node(m, "resize"), _node(m, "pad")
    assert types[clip.input[0]] == H and types[clip.input[1]] == H and types[clip.input[2]] == H
    assert types[resize.input[0]] == H and types[resize.input[2]] == F  # scales is tensor(float) by schema
    assert types[pad.input[0]] == H and types[pad.input[2]] == H and types[pad.input[1]] == TensorProto.INT64
    assert _producers(m)[_node(m, "shape").input[0]].op_type == "Pad"  # Shape reads the FP16 tensor as is
    assert _sqnr_over(fp32, m) > 40


def test_layernorm_in_a_matmul_block_stays_fp32():
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("LayerNormalization", ["h", "g", "b"], ["n"], name="ln", axis=-1),
        helper.make_node("MatMul", ["n", "w2"], ["y"], name="mm2"),
    ]
    inits = [init("w1", rng.standard_normal((16, 16)).astype(np.float32) * 0.3),
             init("w2", rng.standard_normal((16, 8)).astype(np.float32) * 0.3),
             init("g", np.ones(16, np.float32)), init("b", np.zeros(16, np.float32))]
    fp32 = make_model(nodes, [("x", F, [2, 4, 16])], [("y", F, [2, 4, 8])], inits, opset=19)
    res = _contract(_ptq(fp32))
    m = res.model
    types = _types(m)
    ln = _node(m, "ln")
    assert all(types[t] == F for t in [*ln.input, *ln.output])
    assert _producers(m)[ln.input[0]].op_type == "Cast"
    assert _sqnr_over(fp32, m) > 30


# -- opset ----------------------------------------------------------------------------------------
def test_opset_17_qdq_model_is_raised_to_19():
    fp32 = _cnn(opset=17)
    qdq = _ptq(fp32)
    assert qdq.opset_import[0].version == 17
    res = _contract(qdq)
    assert res.model.opset_import[0].version == 19
    raised = [c for c in res.changes if c.kind == "opset"]
    assert len(raised) == 1 and raised[0].rule == "P10" and "17 -> 19" in raised[0].detail
    assert _sqnr_over(qdq, res.model) > 30


def test_opset_17_with_reduce_axes_attribute_errors_clearly():
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], name="dq"),
        helper.make_node("ReduceMean", ["d"], ["y"], name="mean", axes=[2, 3], keepdims=1),
    ]
    inits = [init("s", np.array(0.05, np.float32)), init("z", np.array(0, np.int8))]
    model = make_model(nodes, [("x", F, [1, 2, 4, 4])], [("y", F, [1, 2, 1, 1])], inits, opset=17)
    with pytest.raises(ModelError, match=r"opset 19.*ReduceMean mean: axes.*--opset 19"):
        _f16(model)
    # The version converter route the message suggests works.
    from onnx import version_converter

    res = _contract(version_converter.convert_version(model, 19))
    assert res.model.opset_import[0].version == 19


# -- end to end ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_resnet18_cifar10_ptq_then_fp16():
    need_shared()
    fp32 = qdqsurgeon.load(FP32 / "resnet18_cifar10.onnx", opset=19)
    # The model has a fixed batch of 1: calibrate sample by sample, keep the largest range ('max').
    per_sample = [_ranges(fp32, random_feeds(fp32, seed=s)) for s in range(1, 9)]
    names = [t for n in fp32.graph.node for t in n.output] + [i.name for i in fp32.graph.input]
    amax: dict[str, float] = {}
    for r in per_sample:
        for k, v in r(names).items():
            amax[k] = max(amax.get(k, 0.0), v)
    qdq = qdqsurgeon.optimize(fp32, mode="ptq", ranges=StaticRanges(amax), registry=_registry(), analyze=False).model
    res = qdqsurgeon.optimize(qdq, passes=[PASS], registry=_registry(), config=Config(float16=True), analyze=False)
    full_check(res.model)
    types = _types(res.model)
    assert types["input"] == F and types["output"] == F
    assert sum(n.op_type == "Cast" for n in res.model.graph.node) == 1
    convs = [n for n in res.model.graph.node if n.op_type == "Conv"]
    assert all(types[n.output[0]] == H for n in convs)
    vs_fp32, vs_qdq = _sqnr_over(fp32, res.model, seeds=range(10, 18)), _sqnr_over(qdq, res.model, seeds=range(10, 18))
    print(f"resnet18_cifar10 int8+fp16: SQNR {vs_fp32:.1f} dB vs FP32, {vs_qdq:.1f} dB vs int8+fp32 "
          f"(int8+fp32 vs FP32: {_sqnr_over(fp32, qdq, seeds=range(10, 18)):.1f} dB)")
    assert vs_fp32 > 25
    again = qdqsurgeon.optimize(res.model, passes=[PASS], registry=_registry(), config=Config(float16=True), analyze=False)
    assert [c for c in again.changes if c.kind != "note"] == []
