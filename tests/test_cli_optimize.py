"""optimize through the CLI: summary, report, check, requantize, float16, calibration cache, build chaining."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import qdqsurgeon
from qdqsurgeon.analysis import predict
from qdqsurgeon.cli import cli
from qdqsurgeon.examples import example_calibration, example_model
from qdqsurgeon.inspection import inspect_model

from .helpers import MODELS, need_shared


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_example_summary_and_report(tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    res = _invoke("optimize", "--example", out, "--report", report, "--check")
    assert res.exit_code == 0, res.output
    assert "pipeline: PTQ" in res.output and "insert-qdq" in res.output and "standalone Q/DQ layers" in res.output
    assert "check logits: SQNR" in res.output
    log = json.loads(report.read_text())
    assert log["mode"] == "ptq" and log["passes"][:2] == ["remove-identity", "insert-qdq"]
    assert log["analysis_after"]["standalone_qdq_layers"] == 1
    assert {"pass", "rule", "kind", "node", "detail"} <= set(log["changes"][0])
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert inspect_model(model).problems == []
    assert predict(model).standalone_qdq == ["input_QuantizeLinear"]


def test_requantize_strips_and_recalibrates(tmp_path):
    qdq = tmp_path / "qdq.onnx"
    assert _invoke("optimize", "--example", qdq).exit_code == 0
    out = tmp_path / "re.onnx"
    res = _invoke("optimize", qdq, out, "--requantize", "--calib", example_calibration())
    assert res.exit_code == 0, res.output
    assert "pipeline: PTQ" in res.output
    assert predict(onnx.load(str(out))).standalone_qdq_layers == 1
    res = _invoke("optimize", qdq, tmp_path / "x.onnx", "--requantize")
    assert res.exit_code == 2 and "--requantize needs calibration data" in res.stderr


def test_fix_mode_detected(tmp_path):
    qdq = tmp_path / "qdq.onnx"
    _invoke("optimize", "--example", qdq, "--passes", "insert-qdq", "--calib", example_calibration())
    res = _invoke("optimize", qdq, tmp_path / "fixed.onnx")
    assert res.exit_code == 0, res.output
    assert "pipeline: fix" in res.output


def test_float16_regions_from_cli(tmp_path):
    out = tmp_path / "fp16.onnx"
    res = _invoke("optimize", "--example", out, "--float16")
    assert res.exit_code == 0, res.output
    model = onnx.load(str(out))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [19]
    inits = {i.name: i for i in model.graph.initializer}
    dq_scales = [inits[n.input[1]].data_type for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[1] in inits]
    assert onnx.TensorProto.FLOAT16 in dq_scales
    # I/O stays float32 by default
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    res = _invoke("check", example_model(), out, "--data", example_calibration(), "--json")
    assert json.loads(res.output)["outputs"]["logits"]["sqnr_db"] not in (None, "inf")


def test_calibration_cache_reports_missing_tensors(tmp_path):
    need_shared()
    cache = MODELS / "calib_caches" / "resnet18_imagenet_trt1015_entropy2.cache"
    report = tmp_path / "r.json"
    res = _invoke("optimize", "--example", tmp_path / "o.onnx", "--calib-cache", cache, "--report", report)
    assert res.exit_code == 0, res.output
    assert "missing from the calibration cache" in res.stderr
    assert "input" in json.loads(report.read_text())["uncalibrated_tensors"]


def test_build_without_tensorrt(tmp_path):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed: the exit-3 path does not apply")
    except ImportError:
        pass
    res = _invoke("optimize", "--example", tmp_path / "o.onnx", "--build", tmp_path / "o.plan")
    assert res.exit_code == 3
    assert res.stderr.strip().splitlines()[-1] == "error: TensorRT is not installed: pip install tensorrt (needs an NVIDIA GPU)"
    assert (tmp_path / "o.onnx").exists()  # the model is written before the build is attempted


@pytest.mark.parametrize("flag, quantized", [(None, {"scores", "context"}), ("--no-quantize-bmm", set()),
                                             ("--quantize-bmm", {"scores", "context"})])
def test_quantize_bmm_flags(tmp_path, flag, quantized):
    """Attention GEMMs get Q/DQ by default; --no-quantize-bmm leaves them float."""
    from .test_analysis import _attention

    src, out = tmp_path / "attn.onnx", tmp_path / "out.onnx"
    onnx.save(_attention(), str(src))
    res = _invoke("optimize", src, out, "--calib-random", "4", *([flag] if flag else []))
    assert res.exit_code == 0, res.output
    model = onnx.load(str(out))
    prod = {o: n.op_type for n in model.graph.node for o in n.output}
    got = {n.name for n in model.graph.node if n.name in ("scores", "context")
           and all(prod.get(t) == "DequantizeLinear" for t in n.input)}
    assert got == quantized


def test_check_on_all_nan_eval_data_is_refused(tmp_path):
    """--check used to print `SQNR nan dB, cosine 1.000000` and exit 0 (issue 17 item 7)."""
    nan = tmp_path / "nan.npz"
    np.savez(nan, input=np.full((2, 3, 32, 32), np.nan, np.float32))
    res = _invoke("optimize", "--example", tmp_path / "out.onnx", "--check", "--eval", nan)
    assert res.exit_code == 2, res.output
    assert "cosine 1.0" not in res.output
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: nothing to compare")
