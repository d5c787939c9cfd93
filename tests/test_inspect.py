"""inspect: census and TensorRT validity problems V1-V5 (issue 2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import helper

from qdqsurgeon.cli import cli
from qdqsurgeon.inspection import inspect_model

from .helpers import F, QDQ, init, make_model, need_shared, qdq_nodes


@pytest.mark.slow
def test_ort_static_u8_problems():
    need_shared()
    path = QDQ / "mobilenetv2_ort_static_u8.onnx"
    result = CliRunner().invoke(cli, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.output)
    assert {"opset", "nodes", "qdq", "weighted_ops", "problems"} <= set(d)
    assert d["qdq"]["quantize"] > 0 and d["qdq"]["dequantize"] > d["qdq"]["quantize"]
    assert d["weighted_ops"]["quantized"] == d["weighted_ops"]["total"] > 50
    rules = {(p["rule"], p["message"].split(":")[0]) for p in d["problems"]}
    assert ("V2", "uint8 zero point") in rules
    bias = [p for p in d["problems"] if p["rule"] == "V4" and "bias" in p["message"]]
    assert len(bias) >= 50  # every conv's int32 bias DQ
    assert d["zero_point_dtypes"].get("uint8", 0) > 0 and d["zero_point_dtypes"].get("int32", 0) > 0


def _weighted(scale_w, axis: int | None = 0, act_scale=0.1, zp_dtype=np.int8, zp_value=0, matmul_axis=None):
    w = np.random.default_rng(0).standard_normal((4, 3, 1, 1)).astype(np.float32)
    nodes = qdq_nodes("x", "xd", "sx", "zx", "act")
    kw = {} if axis is None else {"axis": axis}
    nodes += [helper.make_node("QuantizeLinear", ["w", "sw", "zw"], ["wq"], name="wQ", **kw),
              helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], name="wDQ", **kw),
              helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv")]
    inits = [init("w", w), init("sx", np.float32(act_scale)), init("zx", np.array(zp_value, dtype=zp_dtype)),
             init("sw", np.asarray(scale_w, np.float32)), init("zw", np.zeros(np.asarray(scale_w).shape, np.int8))]
    return make_model(nodes, [("x", F, [1, 3, 4, 4])], [("y", F, [1, 4, 4, 4])], inits)


def _rules(model):
    return sorted({p.rule + ":" + p.message.split(" ")[0] for p in inspect_model(model).problems})


def test_clean_model_has_no_problems():
    m = _weighted([0.1, 0.2, 0.3, 0.4])
    r = inspect_model(m)
    assert r.problems == []
    assert r.to_dict()["weighted_ops"]["quantized"] == 1
    assert r.per_channel == [{"node": "wQ", "axis": 0, "channels": 4, "axis_written": True},
                             {"node": "wDQ", "axis": 0, "channels": 4, "axis_written": True}]


def test_zero_and_nan_scales_v1():
    probs = inspect_model(_weighted([0.1, 0.0, 0.3, 0.4])).problems
    assert any(p.rule == "V1" and "zero or negative" in p.message for p in probs)
    probs = inspect_model(_weighted([0.1, 0.2, 0.3, 0.4], act_scale=np.nan)).problems
    assert any(p.rule == "V1" and "NaN" in p.message for p in probs)


def test_uint8_and_nonzero_zero_point_v2():
    probs = inspect_model(_weighted([0.1, 0.2, 0.3, 0.4], zp_dtype=np.uint8, zp_value=128)).problems
    msgs = {p.message.split(":")[0] for p in probs if p.rule == "V2"}
    assert msgs == {"uint8 zero point", "non-zero zero point"}


def test_missing_axis_and_wrong_axis_v3():
    probs = inspect_model(_weighted([0.1, 0.2, 0.3], axis=1)).problems
    assert any(p.rule == "V3" and "not the output-channel axis" in p.message for p in probs)


def test_per_channel_activation_and_bias_dq():
    nodes = qdq_nodes("x", "xd", "s3", "z3", "act", axis=1)
    nodes += [helper.make_node("DequantizeLinear", ["b32", "sb"], ["bd"], name="biasDQ"),
              helper.make_node("Conv", ["xd", "w", "bd"], ["y"], name="conv")]
    inits = [init("s3", np.array([0.1, 0.2, 0.3], np.float32)), init("z3", np.zeros(3, np.int8)),
             init("w", np.ones((2, 3, 1, 1), np.float32)), init("b32", np.array([5, -5], np.int32)),
             init("sb", np.float32(0.01))]
    m = make_model(nodes, [("x", F, [1, 3, 2, 2])], [("y", F, [1, 2, 2, 2])], inits)
    probs = inspect_model(m).problems
    assert any(p.rule == "V3" and "activation" in p.message and p.node == "act_Q" for p in probs)
    assert any(p.rule == "V4" and "bias" in p.message and p.node == "biasDQ" for p in probs)
    # the weighted op counts as not quantized: its weight is float
    assert inspect_model(m).to_dict()["weighted_ops"] == {"total": 1, "quantized": 0, "details": [
        {"node": "conv", "op": "Conv", "activation_quantized": True, "weight_quantized": False,
         "weight_format": "float"}]}


def test_inspect_text_output(tmp_path):
    import qdqsurgeon

    p = tmp_path / "m.onnx"
    qdqsurgeon.save(_weighted([0.1, 0.0, 0.3, 0.4]), p)
    result = CliRunner().invoke(cli, ["inspect", str(p)])
    assert result.exit_code == 0
    assert "weighted ops: 1/1" in result.output and "[V1]" in result.output


def test_scale_counts_agree_with_numpy_on_every_kind_of_value():
    """scale_counts reads small scales as Python numbers (issue 15): the counts must be numpy's."""
    from qdqsurgeon.inspection import scale_counts

    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float16, np.float64):
        for n in (2, 8, 256, 257, 1000):
            for _ in range(20):
                s = rng.choice([0.0, -1.0, 1e-3, np.nan, np.inf, -np.inf, 2.5], size=n).astype(dtype)
                wide = s.astype(np.float64)
                assert scale_counts(s) == (bool(np.all(np.isfinite(wide))), int(np.sum(wide < 0)), int(np.sum(wide == 0)))
