"""The 2:4 pattern survives every pass and pipeline (issue 16 item 2).

A weight that is exactly zero as the op reads it (after its DequantizeLinear, Transpose, Cast) must
be exactly zero after every pass: a symmetric int8 zero quantizes to 0 and dequantizes to 0.0, an
asymmetric one re-quantized by normalize-qdq must land on 0 too, and FP16 conversion keeps 0.0.
Checked on a 2:4 CNN built in code (Conv, residual, Concat, Gemm with transB 0 and 1, MatMul, a
dead output channel), on the digits CNN fixture (trained, pruned, fine-tuned) and on a QAT-style
export of the first (uint8 asymmetric weight, wrong per-channel axis, Constant-node scales).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from qdqsurgeon import Config, build_ranges, optimize
from qdqsurgeon.registry import Registry
from qdqsurgeon.sparsity import sparsity_report

from .sparse_helpers import DIGITS_SPARSE, lost_zeros, qat_export, sparse_cnn, zero_masks

PASSES = [e.name for e in Registry.builtin().entries()]


@pytest.fixture(scope="module")
def float_model() -> onnx.ModelProto:
    return sparse_cnn()


@pytest.fixture(scope="module")
def ranges(float_model):
    return build_ranges(float_model, calib_random=4, progress=False)


@pytest.fixture(scope="module")
def qat_model(float_model, ranges) -> onnx.ModelProto:
    return qat_export(float_model, ranges)


@pytest.fixture(scope="module")
def ptq_model(float_model, ranges) -> onnx.ModelProto:
    return optimize(float_model, ranges=ranges, analyze=False).model


def _two_four(model: onnx.ModelProto) -> set[str]:
    return {l.node for l in sparsity_report(model).layers if l.is_2_4}


def test_inputs_are_2_4(float_model, qat_model):
    assert _two_four(float_model) == {"conv1", "conv2", "conv3", "fc1", "matmul", "fc2"}
    assert _two_four(qat_model) == _two_four(float_model)  # the export's int8/uint8 weights keep it


@pytest.mark.parametrize("name", PASSES)
@pytest.mark.parametrize("which", ["float", "ptq", "qat"])
def test_every_pass_keeps_the_pattern(name, which, float_model, ptq_model, qat_model, ranges):
    model = {"float": float_model, "ptq": ptq_model, "qat": qat_model}[which]
    before = zero_masks(model)
    cfg = Config(float16=True) if name == "float16-regions" else Config()
    out = optimize(model, [name], ranges=ranges, config=cfg, analyze=False).model
    assert not lost_zeros(before, out), f"{name} on the {which} model made zero weights non-zero"
    assert _two_four(out) >= _two_four(model)


@pytest.mark.parametrize("case", ["ptq", "ptq-int8-weights", "ptq-float16", "fix", "fix-calib", "fix-own-output"])
def test_pipelines_keep_the_pattern(case, float_model, qat_model, ptq_model, ranges):
    model, kw = {
        "ptq": (float_model, {"ranges": ranges}),
        "ptq-int8-weights": (float_model, {"ranges": ranges, "config": Config(weights="int8")}),
        "ptq-float16": (float_model, {"ranges": ranges, "config": Config(float16=True)}),
        "fix": (qat_model, {}),
        "fix-calib": (qat_model, {"ranges": ranges}),
        "fix-own-output": (ptq_model, {}),
    }[case]
    before = zero_masks(model)
    res = optimize(model, **kw)
    assert not lost_zeros(before, res.model)
    assert _two_four(res.model) == _two_four(float_model)
    # The layers TensorRT could run sparse after the pipeline: everything INT8 but the classifier,
    # which stays float (P9); with --float16 it runs FP16, which sparse kernels take too (S5).
    ready = {l.node: l.precision for l in sparsity_report(res.model).layers if l.sparse_ready}
    expect = {"conv1": "int8", "conv2": "int8", "conv3": "int8", "fc1": "int8", "matmul": "int8"}
    if case == "ptq-float16":
        expect["fc2"] = "fp16"
    assert ready == expect


def test_digits_fixture_through_ptq(tmp_path):
    model = onnx.load(DIGITS_SPARSE)
    before = zero_masks(model)
    ranges = build_ranges(model, calib_random=8, progress=False)
    for cfg in (Config(), Config(weights="int8"), Config(float16=True)):
        out = optimize(model, ranges=ranges, config=cfg).model
        assert not lost_zeros(before, out)
        assert _two_four(out) == {"/2/Conv", "/5/Conv", "/9/Gemm", "/11/Gemm"}


def test_the_check_sees_a_broken_pattern(ptq_model):
    """A weight DQ whose int8 zero point is shifted dequantizes the zeros to non-zero: the check must say so."""
    m = optimize(sparse_cnn(), ranges=build_ranges(sparse_cnn(), calib_random=4, progress=False),
                 config=Config(weights="int8"), analyze=False).model
    before = zero_masks(m)
    conv = next(n for n in m.graph.node if n.name == "conv2")
    dq = next(n for n in m.graph.node if conv.input[1] in n.output)
    zp = next(t for t in m.graph.initializer if t.name == dq.input[2])
    zp.CopyFrom(numpy_helper.from_array(np.ones(numpy_helper.to_array(zp).shape, np.int8), zp.name))
    lost = lost_zeros(before, m)
    assert set(lost) == {"conv2"} and lost["conv2"] > 0
    assert "conv2" not in _two_four(m)
