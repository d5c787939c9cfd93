"""FP32 vs Q/DQ comparison (qdqsurgeon.check) and the ``check`` command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from qdqsurgeon.check import compare, sqnr_db
from qdqsurgeon.cli_check import check_command
from qdqsurgeon.errors import UsageError, DataError, ModelError, QdqError

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "models"

RNG = np.random.default_rng(0)
W = RNG.standard_normal((8, 5)).astype(np.float32)
B = RNG.standard_normal(5).astype(np.float32)
X = RNG.standard_normal((12, 8)).astype(np.float32)


def classifier(w: np.ndarray = W, out: str = "logits") -> onnx.ModelProto:
    """x[N,8] -> MatMul(w) -> mm -> Add(B) -> logits[N,5]."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["mm"]), helper.make_node("Add", ["mm", "B"], [out])],
        "cls",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", 5])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(B, "B")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def fake_quant(a: np.ndarray, scale: float) -> np.ndarray:
    # onnxruntime rounds half to even, like np.round.
    return (np.clip(np.round(a / np.float32(scale)), -128, 127) * np.float32(scale)).astype(np.float32)


SX, SW, SMM = 0.02, 0.01, 0.05


def qdq_classifier() -> onnx.ModelProto:
    """The classifier with Q/DQ on the input x, the weight W and the intermediate mm."""
    nodes, inits = [], [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")]
    for tensor, scale in (("x", SX), ("W", SW), ("mm", SMM)):
        inits += [numpy_helper.from_array(np.array(scale, np.float32), f"{tensor}_s"),
                  numpy_helper.from_array(np.array(0, np.int8), f"{tensor}_zp")]
        nodes += [helper.make_node("QuantizeLinear", [tensor, f"{tensor}_s", f"{tensor}_zp"], [f"{tensor}_q"]),
                  helper.make_node("DequantizeLinear", [f"{tensor}_q", f"{tensor}_s", f"{tensor}_zp"], [f"{tensor}_dq"])]
    nodes.insert(4, helper.make_node("MatMul", ["x_dq", "W_dq"], ["mm"]))
    nodes.append(helper.make_node("Add", ["mm_dq", "B"], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def data(batch: int = 4) -> list[dict[str, np.ndarray]]:
    return [{"x": X[i : i + batch]} for i in range(0, len(X), batch)]


def hand_sqnr(ref: np.ndarray, cand: np.ndarray) -> float:
    ref, cand = ref.astype(np.float64), cand.astype(np.float64)
    return 10 * math.log10(np.sum(ref**2) / np.sum((ref - cand) ** 2))


def test_identical_models():
    report = compare(classifier(), classifier(), data())
    m = report.outputs["logits"]
    assert m.sqnr_db == math.inf and m.cosine == pytest.approx(1.0) and m.max_abs == 0.0
    assert report.top1_agreement == 1.0 and report.num_batches == 3 and report.num_samples == 12
    d = report.to_dict()
    assert d["outputs"]["logits"]["sqnr_db"] == "inf"
    assert "Infinity" not in json.dumps(d, allow_nan=False)


def test_perturbed_model_matches_hand_computed_metrics():
    w2 = W + np.float32(0.05) * RNG.standard_normal(W.shape).astype(np.float32)
    report = compare(classifier(), classifier(w2), data())
    ref, cand = X @ W + B, X @ w2 + B
    m = report.outputs["logits"]
    assert m.sqnr_db == pytest.approx(hand_sqnr(ref, cand), abs=1e-3)
    assert math.isfinite(m.sqnr_db)
    cos = float(np.sum(ref * cand) / np.sqrt(np.sum(ref**2) * np.sum(cand**2)))
    assert m.cosine == pytest.approx(cos, abs=1e-6)
    assert m.max_abs == pytest.approx(float(np.abs(ref - cand).max()), rel=1e-5)


def test_top1_agreement_on_a_toy_classifier():
    w2 = W[:, [1, 0, 2, 3, 4]]  # swap classes 0 and 1
    report = compare(classifier(), classifier(w2), data())
    ref, cand = X @ W + B, X @ w2 + B
    expected = float(np.mean(ref.argmax(1) == cand.argmax(1)))
    assert report.top1_agreement == pytest.approx(expected)
    assert 0.0 < expected < 1.0  # the swap must matter for some samples, not all
    assert report.top1_output == "logits"


def test_outputs_match_by_position_when_names_differ():
    report = compare(classifier(), classifier(out="scores"), data())
    assert report.output_pairs == {"logits": "scores"} and report.outputs["logits"].sqnr_db == math.inf


def test_no_top1_for_non_classifier_outputs():
    model = classifier()
    model.graph.output[0].type.tensor_type.shape.Clear()
    sq = helper.make_tensor_value_info("sq", TensorProto.FLOAT, None)
    model.graph.node.append(helper.make_node("Unsqueeze", ["logits", "ax"], ["sq"]))
    model.graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "ax"))
    del model.graph.output[:]
    model.graph.output.append(sq)  # [N, 1, 5]: not [batch, classes]
    report = compare(model, model, data())
    assert report.top1_agreement is None


def test_per_layer_on_a_toy_qdq_model():
    report = compare(classifier(), qdq_classifier(), data(), per_layer=True)
    mm_ref = X @ W
    mm_cand = fake_quant(X, SX) @ fake_quant(W, SW)
    expected = {
        "x": hand_sqnr(X, fake_quant(X, SX)),
        "W": hand_sqnr(W, fake_quant(W, SW)),
        "mm": hand_sqnr(mm_ref, fake_quant(mm_cand, SMM)),
    }
    got = {lm.tensor: lm.sqnr_db for lm in report.layers}
    assert got == pytest.approx(expected, abs=0.02)
    assert [lm.sqnr_db for lm in report.layers] == sorted(got.values())  # worst first
    assert report.outputs["logits"].sqnr_db == pytest.approx(hand_sqnr(mm_ref + B, fake_quant(mm_cand, SMM) + B), abs=0.02)
    d = report.to_dict()
    assert [row["tensor"] for row in d["layers"]] == [lm.tensor for lm in report.layers]
    json.dumps(d, allow_nan=False)


def test_sqnr_limits():
    assert sqnr_db(1.0, 0.0) == math.inf
    assert sqnr_db(0.0, 1.0) == -math.inf
    assert sqnr_db(100.0, 1.0) == pytest.approx(20.0)


def test_mismatched_models_are_model_errors():
    other = classifier()
    other.graph.output.append(helper.make_tensor_value_info("mm", TensorProto.FLOAT, None))
    with pytest.raises(ModelError, match="cannot match outputs"):
        compare(other, classifier(out="scores"), data())
    with pytest.raises(DataError, match="no batches"):
        compare(classifier(), classifier(), [])


# ----------------------------------------------------------------------------- the command


@pytest.fixture()
def files(tmp_path):
    onnx.save(classifier(), tmp_path / "fp32.onnx")
    onnx.save(qdq_classifier(), tmp_path / "qdq.onnx")
    np.savez(tmp_path / "data.npz", x=X)
    return tmp_path


def run(*args: str):
    return CliRunner().invoke(check_command, [str(a) for a in args])


def test_cli_json_keys(files):
    result = run(files / "fp32.onnx", files / "qdq.onnx", "--data", files / "data.npz", "--json", "--per-layer")
    assert result.exit_code == 0, result.output
    d = json.loads(result.output)
    assert set(d) == {"outputs", "top1_agreement", "layers"}
    assert set(d["outputs"]["logits"]) == {"sqnr_db", "cosine", "max_abs"}
    assert {row["tensor"] for row in d["layers"]} == {"x", "W", "mm"}
    assert 0.0 <= d["top1_agreement"] <= 1.0


def test_cli_table_and_min_sqnr_exit_code(files):
    ok = run(files / "fp32.onnx", files / "fp32.onnx", "--data", files / "data.npz", "--min-sqnr", "40")
    assert ok.exit_code == 0, ok.output
    assert "logits" in ok.output and "inf" in ok.output

    sqnr = compare(classifier(), qdq_classifier(), data()).outputs["logits"].sqnr_db
    passing = run(files / "fp32.onnx", files / "qdq.onnx", "--data", files / "data.npz", "--min-sqnr", sqnr - 1)
    assert passing.exit_code == 0, passing.output
    failing = run(files / "fp32.onnx", files / "qdq.onnx", "--data", files / "data.npz", "--min-sqnr", sqnr + 1, "--json")
    assert isinstance(failing.exception, ModelError) and failing.exception.exit_code == 1
    assert "below --min-sqnr" in str(failing.exception)
    assert "outputs" in json.loads(failing.output)  # the report is still printed


def test_cli_errors(files):
    missing = run(files / "nope.onnx", files / "qdq.onnx", "--data", files / "data.npz")
    # a missing file is a usage error (exit 2), as in every other command
    assert isinstance(missing.exception, UsageError) and "nope.onnx" in str(missing.exception)
    (files / "junk.onnx").write_bytes(b"\x00\x01garbage")
    junk = run(files / "fp32.onnx", files / "junk.onnx", "--data", files / "data.npz")
    assert isinstance(junk.exception, ModelError)
    np.savez(files / "bad.npz", y=X)
    bad = run(files / "fp32.onnx", files / "qdq.onnx", "--data", files / "bad.npz")
    assert isinstance(bad.exception, DataError) and bad.exception.exit_code == 2
    assert isinstance(bad.exception, QdqError)


def test_cli_help_has_an_example():
    result = run("--help")
    assert result.exit_code == 0 and "Example" in result.output and "--min-sqnr" in result.output


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "qdq").is_dir(), reason=f"shared models not found at {SHARED}")
def test_modelopt_resnet18_against_its_float_original():
    fp32 = onnx.load(SHARED / "fp32" / "resnet18_cifar10.onnx")
    qdq = onnx.load(SHARED / "qdq" / "resnet18_cifar10_modelopt_ptq.onnx")
    from qdqsurgeon.calibration import Preprocess, open_data

    src = open_data(SHARED / "images", fp32, Preprocess.parse("size=32,mean=0.5/0.5/0.5,std=0.5/0.5/0.5"))
    report = compare(fp32, qdq, src, per_layer=True)
    (m,) = report.outputs.values()
    assert 10.0 < m.sqnr_db < 60.0 and m.cosine > 0.9
    assert report.top1_agreement is not None and report.top1_agreement >= 0.5
    assert report.layers and all(math.isfinite(lm.sqnr_db) for lm in report.layers)


# ----------------------------------------------------------------------------- NaN and inf (issue 17 item 7)


def test_all_nan_data_is_refused_not_reported_as_agreement(files):
    np.savez(files / "nan.npz", x=np.full_like(X, np.nan))
    report = compare(classifier(), qdq_classifier(), [{"x": np.full_like(X, np.nan)}])
    m = report.outputs["logits"]
    assert math.isnan(m.sqnr_db) and math.isnan(m.cosine)  # was cosine 1.0
    assert m.nonfinite_reference == m.values == X.shape[0] * 5
    err = report.nonfinite_error()
    assert isinstance(err, DataError) and "NaN/inf in all 60 values" in str(err) and "96 of 96 input values" in str(err)
    result = CliRunner().invoke(check_command, [str(files / "fp32.onnx"), str(files / "qdq.onnx"),
                                                                "--data", str(files / "nan.npz")])
    assert isinstance(result.exception, DataError) and result.exception.exit_code == 2
    assert result.stdout == ""  # no table of nan pretending to be a measurement


def test_candidate_nan_where_reference_is_finite_fails(files):
    w = W.copy()
    w[:, 2] = np.nan
    onnx.save(classifier(w), files / "broken.onnx")
    result = run(files / "fp32.onnx", files / "broken.onnx", "--data", files / "data.npz", "--json")
    assert isinstance(result.exception, ModelError) and result.exception.exit_code == 1
    assert "NaN/inf in 12 of 60 values" in str(result.exception)
    row = json.loads(result.output)["outputs"]["logits"]
    assert row["sqnr_db"] is None and row["cosine"] is None and row["nonfinite_candidate"] == 12


def test_partly_nan_reference_compares_the_finite_values(caplog):
    x = X.copy()
    x[0] = np.nan
    report = compare(classifier(), classifier(), [{"x": x}])
    m = report.outputs["logits"]
    assert m.sqnr_db == math.inf and m.cosine == pytest.approx(1.0) and m.nonfinite_reference == 5
    assert report.nonfinite_error() is None
    assert "left out of the comparison" in caplog.text
