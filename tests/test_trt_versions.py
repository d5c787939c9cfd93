"""Version-dependent TensorRT rules (trt_rules.VERSIONED_RULES) and the E8.1 evidence in placement and prediction.

E8.1 (trt-rules.md §8): TensorRT 8.4-10.6 does not fuse ``Conv → activation → Add(skip)`` into the INT8 conv;
the activation and the Add run as their own PointWise layer. ResNet order (Add, then activation) still fuses
(E8.2, F5). Placement then quantizes both Add inputs (NVIDIA's YOLOv5/v7 QAT recipe).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import qdqsurgeon
from qdqsurgeon import trt_rules as R
from qdqsurgeon.analysis import predict
from qdqsurgeon.cli import cli
from qdqsurgeon.config import Config

from .analysis_helpers import Builder


def test_parse_version():
    assert R.parse_version("10.6") == (10, 6)
    assert R.parse_version("8.6.1.6") == (8, 6)
    assert R.parse_version("11") == (11, 0)
    assert R.parse_version(None) == R.NEWEST_VERSION
    for bad in ("x", "7.1", "12.0", ""):
        with pytest.raises(ValueError):
            R.parse_version(bad)


def test_versioned_rule_confidence_follows_its_evidence():
    e81 = R.VERSIONED_RULES["E8.1"]
    assert e81.confidence_at("8.4") == e81.confidence_at("10.6") == "seen in real engines"
    assert e81.confidence_at("10.7") == e81.confidence_at(None) == "inferred, unverified"
    assert "unverified for TensorRT 11.1" in e81.describe(None)
    # no release is known to fuse an activation with the following Add: the placement is the same on all
    assert not any(R.activation_add_fuses(v) for v in ("8.4", "10.6", "11.0"))


def test_residual_placement_is_chosen_by_kernels_then_bytes():
    choice, why = R.residual_placement("10.6")
    assert choice == "both"
    assert "skip-only 2 kernels/10 B" in why and "both inputs 2 kernels/4 B" in why
    assert R.residual_placement("10.6", float_bytes=2)[1].count("2 kernels") == 2  # fp16: 6 B vs 4 B, still both


def test_version_selected_rules():
    assert R.convtranspose_axis_for("8.6") == 0
    assert R.convtranspose_axis_for("10.1") is None  # parser choice unknown: per-tensor is safe
    assert R.convtranspose_axis_for("10.2") == 1 and R.convtranspose_axis_for(None) == 1
    assert not R.int8_weight_initializers("8.6") and R.int8_weight_initializers("10.0")


def _block(order: str, quantize_branch: bool) -> onnx.ModelProto:
    """stem Conv → block Conv(+BN) → [SiLU → Add(skip)] or [Add(skip) → ReLU] → tail Conv → output.

    ``order`` is "silu-add" (YOLO bottleneck) or "add-relu" (ResNet). The skip is the stem output through
    its own pair; ``quantize_branch`` also puts a pair between the branch and the Add.
    """
    b = Builder(seed=1)
    x = b.input("input", [1, 8, 8, 8])
    stem = b.conv(x, 8, act="relu", name="stem")
    stem_q = b.qdq(stem, name="stem_pair")
    branch = b.conv(stem_q, 8, qx=False, bn=True, act="silu" if order == "silu-add" else None, name="block")
    if quantize_branch:
        branch = b.qdq(branch, name="branch_pair")
    add = b.node("Add", [stem_q, branch], name="add")
    out = b.node("Relu", [add], name="relu") if order == "add-relu" else add
    b.output(b.conv(out, 8, name="tail"))
    return b.build()


def _chain(pred, head: str) -> tuple[str, ...]:
    return next(tuple(w["fused"]) for w in pred.weighted_ops if w["node"] == head)


def test_prediction_silu_then_add_is_not_fused():
    pred = predict(_block("silu-add", quantize_branch=False))
    assert "add" not in _chain(pred, "block")
    assert pred.precision_of("block") == "int8->float"
    # both inputs quantized: Conv+SiLU writes INT8 and the Add is an INT8 PointWise layer
    pred = predict(_block("silu-add", quantize_branch=True))
    assert pred.precision_of("block") == "int8->int8" and "add" in pred.int8_ops
    assert [u["rule"] for u in pred.unverified if u["rule"] == "E8.1"] == ["E8.1"]
    assert not [u for u in predict(_block("silu-add", True), trt_version="10.6").unverified if u["rule"] == "E8.1"]


def test_prediction_add_then_relu_still_fuses():
    pred = predict(_block("add-relu", quantize_branch=False))
    assert _chain(pred, "block")[-2:] == ("add", "relu")
    assert not [u for u in pred.unverified if u["rule"] == "E8.1"]


def _float_block(order: str) -> onnx.ModelProto:
    b = Builder(seed=1)
    x = b.input("input", [1, 8, 8, 8])
    stem = b.conv(x, 8, act="relu", qx=False, qw=False, name="stem")
    branch = b.conv(stem, 8, qx=False, qw=False, bn=True, act="silu" if order == "silu-add" else None, name="block")
    add = b.node("Add", [stem, branch], name="add")
    out = b.node("Relu", [add], name="relu") if order == "add-relu" else add
    b.output(b.conv(out, 8, qx=False, qw=False, name="tail"))
    return b.build()


def _ptq(model: onnx.ModelProto, config: Config | None = None):
    ranges = qdqsurgeon.build_ranges(model, calib_random=4, progress=False)
    return qdqsurgeon.optimize(model, ranges=ranges, config=config or Config())


def test_ptq_quantizes_both_inputs_of_an_add_after_silu():
    res = _ptq(_float_block("silu-add"))
    m = res.model
    prod = {o: n for n in m.graph.node for o in n.output}
    add = next(n for n in m.graph.node if n.name == "add")
    assert [prod[t].op_type for t in add.input] == ["DequantizeLinear", "DequantizeLinear"]
    assert any(c.rule == "E8.1" and c.kind == "add" for c in res.changes)
    pred = predict(m)
    assert pred.precision_of("block") == "int8->int8" and "add" in pred.int8_ops
    assert pred.standalone_qdq_layers == 1  # the graph input's Quantize only
    again = qdqsurgeon.optimize(m, analyze=False)
    assert [c for c in again.changes if c.kind != "note"] == []


def test_ptq_resnet_order_keeps_skip_only():
    m = _ptq(_float_block("add-relu")).model
    prod = {o: n for n in m.graph.node for o in n.output}
    add = next(n for n in m.graph.node if n.name == "add")
    assert sorted(prod[t].op_type for t in add.input) == ["BatchNormalization", "DequantizeLinear"]
    assert predict(m).standalone_qdq_layers == 1


def test_fix_path_keeps_the_branch_pair_of_an_add_after_silu():
    """A QAT export with both Add inputs quantized (the recipe) is left as it is; before E8.1 the branch
    pair was removed as 'inside the fused chain'."""
    model = _block("silu-add", quantize_branch=True)
    res = qdqsurgeon.optimize(model)
    assert res.mode == "fix"
    add = next(n for n in res.model.graph.node if n.name == "add")
    prod = {o: n for n in res.model.graph.node for o in n.output}
    assert [prod[t].op_type for t in add.input] == ["DequantizeLinear", "DequantizeLinear"]


def test_cli_trt_version(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_block("silu-add", quantize_branch=True), path)
    runner = CliRunner()
    out = runner.invoke(cli, ["inspect", str(path), "--trt"])
    assert out.exit_code == 0 and "[E8.1]" in out.output and "unverified for TensorRT 11.1" in out.output
    out = runner.invoke(cli, ["inspect", str(path), "--trt", "--trt-version", "10.6"])
    assert out.exit_code == 0 and "[E8.1]" not in out.output
    out = runner.invoke(cli, ["inspect", str(path), "--trt", "--trt-version", "ten"])
    assert out.exit_code == 2 and "--trt-version" in out.output
    out = runner.invoke(cli, ["optimize", "--example", str(tmp_path / "o.onnx"), "--weights", "int8", "--trt-version", "8.6"])
    assert out.exit_code == 2 and "INT8 weight initializers" in out.output


def test_trt_version_sets_the_convtranspose_axis(tmp_path):
    b = Builder(seed=2)
    x = b.input("input", [1, 8, 8, 8])
    y = b.conv(x, 8, act="relu", qx=False, qw=False, name="stem")
    w = b.const((np.random.default_rng(0).standard_normal((8, 4, 2, 2)) * 0.1).astype(np.float32))
    up = b.node("ConvTranspose", [y, w], name="up", strides=[2, 2], kernel_shape=[2, 2])
    b.channels[up] = 4
    b.output(b.conv(b.node("Relu", [up]), 4, qx=False, qw=False, name="tail"))
    src = tmp_path / "ct.onnx"
    onnx.save(b.build(), src)
    axes = {}
    for version in ("8.6", "10.6"):
        dst = tmp_path / f"ct_{version}.onnx"
        out = CliRunner().invoke(cli, ["optimize", str(src), str(dst), "--calib-random", "2", "--trt-version", version,
                                       "--keep-output-layers", "-q"])
        assert out.exit_code == 0, out.output
        m = onnx.load(dst)
        prod = {o: n for n in m.graph.node for o in n.output}
        ct = next(n for n in m.graph.node if n.op_type == "ConvTranspose")
        dq = prod[ct.input[1]]
        axes[version] = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    assert axes == {"8.6": 0, "10.6": 1}
