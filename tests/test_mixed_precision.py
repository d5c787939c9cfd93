"""optimize --target: automatic mixed precision, precision files, output layers by evidence (issue 14 items 3, 4)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from qdqsurgeon.cli import cli
from qdqsurgeon.config import Config
from qdqsurgeon.errors import UsageError
from qdqsurgeon.examples import example_calibration, example_model
from qdqsurgeon.mixed_precision import load_precision, parse_target, precision_config
from qdqsurgeon.passes.insert_qdq import is_excluded

from .helpers import init, make_model


def _invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def _dq_fed(model: onnx.ModelProto, node_name: str) -> bool:
    """Whether ``node_name`` reads any DequantizeLinear output (runs INT8 in TensorRT's reading)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    node = next(n for n in model.graph.node if n.name == node_name)
    return any(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in node.input)


@pytest.mark.parametrize("extra", [[], ["--float16"]], ids=["fp32", "float16"])
def test_target_meets_and_precision_file_reproduces_the_model_byte_for_byte(tmp_path, extra):
    """Under --float16 the float layers are FP16 and the search measures that model (P10)."""
    a, b, prec = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "p.json"
    res = _invoke("optimize", str(example_model()), str(a), "--calib", str(example_calibration()), *extra,
                  "--target", "sqnr>=45", "--save-precision", str(prec))
    assert res.exit_code == 0, res.output + res.stderr
    assert "not met" not in res.stderr and "mixed precision: target sqnr>=45" in res.output
    text = prec.read_text()
    decision = json.loads(text)
    assert list(decision) == sorted(decision) and set(decision.values()) == {"int8", "float"}
    assert text == json.dumps(decision, indent=1, sort_keys=True) + "\n"  # stable: one layer a line, sorted
    out = onnx.load(str(a))
    onnx.checker.check_model(out, full_check=True)
    for name, precision in decision.items():  # the decision is what the model holds
        assert _dq_fed(out, name) == (precision == "int8"), name
    # the pipeline reproduces it without evaluation data (calibration still sets the INT8 ranges)
    res = _invoke("optimize", str(example_model()), str(b), "--calib", str(example_calibration()), *extra,
                  "--precision", str(prec), "-q")
    assert res.exit_code == 0, res.stderr
    assert a.read_bytes() == b.read_bytes()


def test_target_already_met_keeps_everything_int8(tmp_path):
    out, prec = tmp_path / "o.onnx", tmp_path / "p.json"
    res = _invoke("optimize", str(example_model()), str(out), "--calib", str(example_calibration()),
                  "--target", "cosine>=0.99", "--save-precision", str(prec), "-q")
    assert res.exit_code == 0, res.stderr
    assert set(json.loads(prec.read_text()).values()) == {"int8"}


def test_unreachable_target_warns_and_writes_the_best(tmp_path):
    """Labels no model predicts: even all float misses top1>=0.99; a warning, exit 0, a model."""
    out = tmp_path / "o.onnx"
    labels = tmp_path / "labels.npy"
    np.save(labels, np.full(16, 9, np.int64))  # the example classifier never says class 9 on its data
    res = _invoke("optimize", str(example_model()), str(out), "--calib", str(example_calibration()),
                  "--target", "top1>=0.99", "--labels", str(labels), "-q")
    assert res.exit_code == 0, res.stderr
    assert res.stderr.count("\n") == 1 and "warning: target top1>=0.99 not met: best top1" in res.stderr
    assert out.exists()


@pytest.mark.parametrize("args, message", [
    (["--target", "cosine>0.99"], "expected cosine>=X"),
    (["--target", "acc>=0.9"], "expected cosine>=X"),
    (["--target", "cosine>=1.5"], "at most 1"),
    (["--target", "cosine>=0.99", "--max-drop", "1"], "not both"),
    (["--max-drop", "150"], "between 0 and 100"),
    (["--save-precision", "p.json"], "--save-precision writes what --target"),
    (["--labels", "l.npy"], "--labels is for top1 targets"),
])
def test_bad_target_options_are_one_line_exit_2(tmp_path, args, message):
    res = _invoke("optimize", str(example_model()), str(tmp_path / "o.onnx"), "--calib", str(example_calibration()), *args)
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and message in res.stderr, res.stderr


def test_precision_file_for_another_model_is_refused(tmp_path):
    prec = tmp_path / "p.json"
    prec.write_text(json.dumps({"not_a_node": "float"}))
    res = _invoke("optimize", str(example_model()), str(tmp_path / "o.onnx"), "--calib", str(example_calibration()),
                  "--precision", str(prec))
    assert res.exit_code == 2 and "does not have" in res.stderr and res.stderr.count("\n") == 1
    prec.write_text(json.dumps({"fc": "fp16"}))
    model = onnx.load(str(example_model()))
    with pytest.raises(UsageError, match="int8"):
        load_precision(prec, model)


def test_parse_target_forms():
    assert parse_target("cosine>=0.995").value == 0.995
    assert parse_target(" sqnr >= 25 ").metric == "sqnr"
    assert parse_target("top1>=.99").value == 0.99


def test_precision_config_excludes_exact_names_only():
    """``conv.1`` must not leave ``conv21`` float: names are anchored and escaped, not regexes."""
    import onnx_graphsurgeon as gs

    from qdqsurgeon.passes.base import PassContext

    cfg = precision_config(Config(), {"conv.1": "float", "conv2": "int8"})
    ctx = PassContext(config=cfg, ranges=None)
    assert cfg.keep_output_layers  # P9 follows the decision
    assert is_excluded(gs.Node("Conv", "conv.1"), ctx)
    assert not is_excluded(gs.Node("Conv", "conv21"), ctx) and not is_excluded(gs.Node("Conv", "conv2"), ctx)


# ------------------------------------------------------------------------------------------------ item 4


def _plain_cnn(tmp_path):
    """Conv-ReLU-Conv-ReLU-GAP-Flatten-Gemm, no residual: P9 keeps the classifier float by default."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1)]
    inits = [init("w1", rng.normal(0, 0.3, (16, 3, 3, 3)).astype(np.float32)), init("b1", np.zeros(16, np.float32)),
             init("w2", rng.normal(0, 0.1, (16, 16, 3, 3)).astype(np.float32)), init("b2", np.zeros(16, np.float32)),
             init("wf", rng.normal(0, 0.3, (10, 16)).astype(np.float32)), init("bf", np.zeros(10, np.float32))]
    model = make_model(nodes, [("x", TensorProto.FLOAT, ["N", 3, 16, 16])], [("y", TensorProto.FLOAT, ["N", 10])], inits, opset=17)
    path, data = tmp_path / "cnn.onnx", tmp_path / "data.npz"
    onnx.save(model, str(path))
    np.savez(data, x=rng.normal(0, 1, (16, 3, 16, 16)).astype(np.float32))
    return path, data


def test_output_layer_quantized_when_the_evidence_allows(tmp_path):
    src, data = _plain_cnn(tmp_path)
    default, loose, strict = tmp_path / "d.onnx", tmp_path / "l.onnx", tmp_path / "s.onnx"
    assert _invoke("optimize", str(src), str(default), "--calib", str(data), "-q").exit_code == 0
    assert not _dq_fed(onnx.load(str(default)), "fc")  # without a target: P9's default, the head float
    res = _invoke("optimize", str(src), str(loose), "--calib", str(data), "--target", "cosine>=0.9", "-q")
    assert res.exit_code == 0, res.stderr
    assert _dq_fed(onnx.load(str(loose)), "fc")  # the target holds with it INT8: P9 gives way to the evidence
    # a strict target: whatever stays float is what the measurement asked for, and the target is met
    prec = tmp_path / "p.json"
    res = _invoke("optimize", str(src), str(strict), "--calib", str(data), "--target", "sqnr>=60", "--save-precision", str(prec), "-q")
    assert res.exit_code == 0 and "not met" not in res.stderr, res.stderr
    decision = json.loads(prec.read_text())
    assert "float" in decision.values()
    assert _dq_fed(onnx.load(str(strict)), "fc") == (decision["fc"] == "int8")


def test_max_drop_is_points_below_the_float_model():
    from qdqsurgeon.mixed_precision import Measured, drop_target

    t = drop_target(2)
    assert t.met(Measured(30.0, 0.99, top1=0.75, top1_float=0.76))  # 1 point below the float model's accuracy
    assert not t.met(Measured(30.0, 0.99, top1=0.73, top1_float=0.76))  # 3 points below
    assert t.met(Measured(30.0, 0.99, top1=0.98)) and not t.met(Measured(30.0, 0.99, top1=0.97))  # agreement: 1 - 2 %
    assert not t.met(Measured(30.0, 0.99, top1=None))  # no classifier output: a top-1 target cannot be met
