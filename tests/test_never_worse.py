"""Never worse (issue 12 item 3): the fix path keeps the input's placement where it cannot improve it, says
so, and flags a predicted regression with a non-zero exit; PTQ's "before" is the naive insert-only placement."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import qdqsurgeon
import qdqsurgeon.api as api
import qdqsurgeon.examples
import qdqsurgeon.pipelines
from qdqsurgeon.cli import cli

from .helpers import MODELS, need_shared


def _naive(model: onnx.ModelProto) -> onnx.ModelProto:
    """The example model with Q/DQ on weighted-op inputs only (a QAT export's placement)."""
    rng = lambda names: {n: 4.0 for n in names}  # noqa: E731
    return qdqsurgeon.optimize(model, list(qdqsurgeon.pipelines.PIPELINES["insert-only"]), ranges=rng).model


def test_fix_path_keeps_the_input_placement_when_the_pipeline_would_be_worse(monkeypatch):
    """The selection: when the repair-only pipeline scores better, its result is kept and the log says why.
    (The pipeline has to be made to lose by force here; test_onnxruntime_quantized_pplcnet_is_not_made_worse
    is the real model where it loses.)"""
    model = _naive(qdqsurgeon.load(qdqsurgeon.examples.example_model()))
    scores = iter([(0, 1), (0, 5)])  # _score(repair-only), then _score(fix pipeline)
    monkeypatch.setattr(api, "_score", lambda analysis: next(scores))
    res = qdqsurgeon.optimize(model)
    assert res.mode == "fix" and res.before_label == "input"
    assert res.passes[:2] == ["remove-identity", "normalize-qdq"] and "align-scales" not in res.passes  # repair-only
    assert any(c.pass_name == "optimize" and "kept that" in c.detail for c in res.changes)
    assert res.after["standalone_qdq_layers"] == res.before["standalone_qdq_layers"]  # the input's own placement
    assert res.regressions == []


def test_ptq_before_column_is_insert_only():
    model = qdqsurgeon.load(qdqsurgeon.examples.example_model())
    res = qdqsurgeon.optimize(model, ranges=lambda names: {n: 4.0 for n in names})
    assert res.before_label == "insert-only"
    assert res.before["standalone_qdq_layers"] > res.after["standalone_qdq_layers"] >= 1
    assert res.before["int8_weighted_ops"] > 0


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_cli_flags_a_regression_in_red_and_exits_non_zero(tmp_path, monkeypatch):
    src = tmp_path / "naive.onnx"
    onnx.save(_naive(qdqsurgeon.load(qdqsurgeon.examples.example_model())), src)
    before = _sha(src)
    # a regression neither pipeline can avoid (as on a model we have not seen): forced here
    monkeypatch.setattr(api, "_regressions", lambda b, a: ["predicted standalone Q/DQ layers 1 -> 3"])
    out = CliRunner().invoke(cli, ["optimize", str(src), str(tmp_path / "o.onnx")], color=True)
    assert out.exit_code == 1
    assert "\x1b[31m" in out.stdout and "REGRESSION: predicted standalone Q/DQ layers 1 -> 3" in out.stdout
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--allow-regression" in lines[0]
    assert (tmp_path / "o.onnx").exists() and _sha(src) == before
    ok = CliRunner().invoke(cli, ["optimize", str(src), str(tmp_path / "o2.onnx"), "--allow-regression"])
    assert ok.exit_code == 0 and "REGRESSION" in ok.stdout


ZOO_CACHE = Path(os.environ.get("QDQSURGEON_ZOO_CACHE", Path.home() / ".cache" / "qdqsurgeon-zoo"))


@pytest.mark.slow
def test_onnxruntime_quantized_pplcnet_is_not_made_worse(tmp_path):
    """PP-LCNet text orientation (HardSwish, HardSigmoid SE) quantized by onnxruntime (QDQ, uint8): the fix
    pipeline predicted 4 -> 5 standalone Q/DQ; the result must never be worse than the input."""
    need_shared()
    fetch = MODELS / "zoo" / "fetch.py"
    name = "pplcnet_text_orientation"
    if not (ZOO_CACHE / f"{name}.onnx").exists():
        r = subprocess.run([sys.executable, str(fetch), "--out", str(ZOO_CACHE), name], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot fetch {name}: {r.stdout[-200:]} {r.stderr[-200:]}")
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    m = onnx.load(ZOO_CACHE / f"{name}.onnx")
    for d, v in zip(m.graph.input[0].type.tensor_type.shape.dim, (1, 3, 224, 224)):
        d.ClearField("dim_param")
        d.dim_value = v
    fixed = tmp_path / "fixed.onnx"
    onnx.save(m, fixed)

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.it = iter([{"x": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)} for _ in range(2)])

        def get_next(self):
            return next(self.it, None)

    qpath = tmp_path / "ort_u8.onnx"
    quantize_static(str(fixed), str(qpath), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    res = qdqsurgeon.optimize(qdqsurgeon.load(qpath))
    assert res.regressions == []
    assert res.after["standalone_qdq_layers"] <= res.before["standalone_qdq_layers"]
    assert res.after["validity_problems"] == 0 < res.before["validity_problems"]
