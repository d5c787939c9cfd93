"""engine-diff on the published MobileNetV2 pair: residual Q/DQ removes Q/DQ kernels (E1, P3)."""

from __future__ import annotations

from collections import Counter

import pytest
from trt_helpers import MB_QAT, MB_QAT_PROFILE, MB_RES, MB_RES_PROFILE, layer, raw, tensor, write_json

from qdqsurgeon.trt.diff import engine_diff

pytestmark = pytest.mark.usefixtures("engines")


def test_mobilenet_pair_diff_reports_the_drop() -> None:
    diff = engine_diff(MB_QAT, MB_RES, profile_a=MB_QAT_PROFILE, profile_b=MB_RES_PROFILE)
    a, b = raw(MB_QAT)["Layers"], raw(MB_RES)["Layers"]
    origin_a = Counter(l.get("Origin") for l in a)
    origin_b = Counter(l.get("Origin") for l in b)
    reformat_a = sum(1 for l in a if l["LayerType"] == "Reformat")
    reformat_b = sum(1 for l in b if l["LayerType"] == "Reformat")
    d = diff.to_dict()
    assert d["delta"]["layers"] == len(b) - len(a) < 0
    assert d["delta"]["standalone_qdq_layers"] == origin_b["QDQ"] - origin_a["QDQ"] < 0
    assert d["delta"]["reformat_type_layers"] == reformat_b - reformat_a < 0
    assert d["delta"]["reformat_layers"] == origin_b["REFORMAT"] - origin_a["REFORMAT"]
    assert d["layer_types"]["Reformat"] == [reformat_a, reformat_b]
    t_a = sum(r["averageMs"] for r in raw(MB_QAT_PROFILE) if "name" in r)
    t_b = sum(r["averageMs"] for r in raw(MB_RES_PROFILE) if "name" in r)
    assert d["delta"]["total_time_ms"] == pytest.approx(t_b - t_a)
    assert d["delta"]["total_time_ms"] < 0
    # Layer names differ between the two exports (Conv_12 vs Conv_9), so matching is by the ONNX nodes a layer
    # contains (weights such as features.3.conv.2.weight): every layer of B is in A; A's extra layers are exactly
    # the 15 standalone Quantizes the residual Q/DQ removed. A name-only match said "added 57 / removed 72".
    assert diff.added == [] and len(diff.matched) == len(b)
    removed = {l["Name"]: l for l in a if l["Name"] in set(diff.removed)}
    assert len(removed) == origin_a["QDQ"] - origin_b["QDQ"] == 15
    assert all(l.get("Origin") == "QDQ" for l in removed.values())
    matched = dict(diff.matched)
    assert matched["features.3.conv.2.weight + QuantizeLinear_138 + Conv_142 + Add_144"] == \
        "features.3.conv.2.weight + QuantizeLinear_119 + Conv_121 + Add_123"
    # and the residual Add's conv now writes INT8 (its skip is quantized)
    assert any(c.after == "int8,int8 -> int8" and "Add_144" in c.layer for c in diff.precision_changes)
    text = diff.to_text()
    assert "standalone Q/DQ layers" in text and "Reformat-type layers" in text


def test_precision_change_of_a_layer_present_in_both(tmp_path) -> None:
    i8, f16 = "Row major Int8 format", "Row major linear FP16 format"
    a = write_json(tmp_path / "a.json", {"Layers": [layer("Conv_1", "CaskConvolution", [tensor("x", i8)], [tensor("y", f16)], ParameterType="Convolution"), layer("QuantizeLinear_2", "Reformat", [tensor("y", f16)], [tensor("z", i8)], Origin="QDQ")]})
    b = write_json(tmp_path / "b.json", {"Layers": [layer("Conv_1", "CaskConvolution", [tensor("x", i8)], [tensor("z", i8)], ParameterType="Convolution")]})
    diff = engine_diff(a, b)
    assert diff.removed == ["QuantizeLinear_2"] and diff.added == []
    assert [c.to_dict() for c in diff.precision_changes] == [{"layer": "Conv_1", "before": "int8 -> fp16", "after": "int8 -> int8"}]
    assert diff.to_dict()["delta"]["total_time_ms"] is None  # no profiles
