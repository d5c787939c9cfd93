"""Opset upgrade before the passes (issue 12 item 1, issue 17 items 6 and 9): exporters still write opset 11/12."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

import qdqsurgeon
from qdqsurgeon import opset as qopset
from qdqsurgeon.cli import cli
from qdqsurgeon.errors import ModelError

from .helpers import init, run

F = TensorProto.FLOAT


def _conv_model(opset: int, ir_version: int = 7, initializers_as_inputs: bool = False) -> onnx.ModelProto:
    """x -> Conv -> Relu -> Upsample/Resize-free GAP -> Flatten -> Gemm -> y at an old opset."""
    rng = np.random.default_rng(0)
    inits = [init("w", rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3),
             init("b", np.zeros(8, np.float32)),
             init("fw", rng.standard_normal((4, 8)).astype(np.float32) * 0.3),
             init("fb", np.zeros(4, np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2", "b"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c2"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], name="fc", transB=1)]
    inits.append(init("w2", rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2))
    inputs = [helper.make_tensor_value_info("x", F, [1, 3, 16, 16])]
    if initializers_as_inputs:  # IR 3: every initializer is also a graph input
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes, "old", inputs, [helper.make_tensor_value_info("y", F, [1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _opset(model: onnx.ModelProto) -> int:
    return qopset.default_opset(model)


def test_ptq_upgrades_an_opset_12_model_and_logs_it():
    model = _conv_model(12)
    res = qdqsurgeon.optimize(model, ranges=lambda names: {n: 4.0 for n in names})
    assert _opset(res.model) == 13
    up = [c for c in res.changes if c.pass_name == "upgrade-opset"]
    assert len(up) == 1 and "opset 12 -> 13" in up[0].detail and "insert-qdq" in up[0].detail
    assert res.passes[0] == "upgrade-opset" and res.by_pass()["upgrade-opset"] == {"V3": 1}
    # the passes ran on the upgraded model: both convs read per-channel weight DQs
    dq_axes = [n for n in res.model.graph.node if n.op_type == "DequantizeLinear" and any(a.name == "axis" for a in n.attribute)]
    assert len(dq_axes) >= 2
    onnx.checker.check_model(res.model, full_check=True)
    assert _opset(model) == 12  # the caller's model is not touched


def test_no_upgrade_refuses_before_calibration(tmp_path):
    src = tmp_path / "old.onnx"
    onnx.save(_conv_model(12), src)
    before = _sha(src)
    out = CliRunner().invoke(cli, ["optimize", str(src), str(tmp_path / "o.onnx"), "--calib-random", "1", "--no-opset-upgrade"])
    assert out.exit_code == 1, out.output
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    # one line, and no calibration warning before it: the refusal comes before calibration (issue 17 item 9)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "opset 12" in lines[0] and "--no-opset-upgrade" in lines[0]
    assert not (tmp_path / "o.onnx").exists() and _sha(src) == before


def test_cli_upgrades_and_summary_names_it(tmp_path):
    src = tmp_path / "old.onnx"
    onnx.save(_conv_model(11), src)
    out = CliRunner().invoke(cli, ["optimize", str(src), str(tmp_path / "o.onnx"), "--calib-random", "1"])
    assert out.exit_code == 0, out.output
    assert "upgrade-opset" in out.stdout
    assert _opset(onnx.load(tmp_path / "o.onnx")) == 13


def test_ir3_model_with_opset_flag(tmp_path):
    """IR 3 lists initializers as graph inputs; new scales are not, so the upgrade raises the IR version (issue 17.6)."""
    src = tmp_path / "ir3.onnx"
    onnx.save(_conv_model(9, ir_version=3, initializers_as_inputs=True), src)
    out = CliRunner().invoke(cli, ["optimize", str(src), str(tmp_path / "o.onnx"), "--calib-random", "1", "--opset", "13"])
    assert out.exit_code == 0, out.output
    got = onnx.load(tmp_path / "o.onnx")
    onnx.checker.check_model(got, full_check=True)
    assert got.ir_version >= 7


def test_upgrade_that_changes_outputs_is_refused(monkeypatch):
    real = qopset.version_converter.convert_version

    def wrong(model, target):  # a converter bug: Relu comes out as Sigmoid
        out = real(model, target)
        for n in out.graph.node:
            if n.op_type == "Relu":
                n.op_type = "Sigmoid"
        return out

    monkeypatch.setattr(qopset.version_converter, "convert_version", wrong)
    with pytest.raises(ModelError, match=r"opset 12 -> 13 upgrade changes the model's outputs"):
        qdqsurgeon.optimize(_conv_model(12), ranges=lambda names: {n: 4.0 for n in names})


def test_converter_failure_names_the_blocking_op(monkeypatch):
    real = qopset.version_converter.convert_version

    def no_adapter(model, target):
        if any(n.op_type == "GlobalAveragePool" for n in model.graph.node):
            raise RuntimeError("No adapter for this op")
        return real(model, target)

    monkeypatch.setattr(qopset.version_converter, "convert_version", no_adapter)
    with pytest.raises(ModelError, match=r"cannot upgrade opset 12 -> 13 .*op GlobalAveragePool cannot be converted"):
        qdqsurgeon.optimize(_conv_model(12), ranges=lambda names: {n: 4.0 for n in names})


def test_upgrade_keeps_numerics():
    model = _conv_model(10)
    up, change = qopset.upgrade_opset(model, 13, "test")
    feed = {"x": np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    np.testing.assert_allclose(run(model, feed)[0], run(up, feed)[0], rtol=1e-6, atol=1e-6)
    assert "opset 10 -> 13" in change.detail


def test_fix_path_keeps_a_per_tensor_opset_12_model():
    """A Q/DQ model with per-tensor pairs only needs no upgrade: its opset is left alone."""
    model = _conv_model(12)
    kept, changes = qdqsurgeon.api.prepare_opset(model, mode="fix")
    assert changes == [] and _opset(kept) == 12
    _, changes = qdqsurgeon.api.prepare_opset(model, mode="ptq")
    assert [c.kind for c in changes] == ["opset"]
