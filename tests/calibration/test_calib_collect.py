"""Statistics collection in onnxruntime and the calibrate() entry point."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qdqsurgeon.calibration import (
    CALIBRATION_METHODS,
    DEFAULT_METHOD,
    Preprocess,
    calibrate,
    collect_stats,
    expose_tensors,
    open_data,
)
from qdqsurgeon.errors import DataError, ModelError, UsageError

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "models"

W = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
B = np.array([0.5, -1.0, 2.0], dtype=np.float32)


def mlp() -> onnx.ModelProto:
    """x[N,4] -> MatMul(W) -> mm -> Relu -> r -> Add(B) -> y; plus an int branch x -> Shape -> shp."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm"]),
        helper.make_node("Relu", ["mm"], ["r"]),
        helper.make_node("Add", ["r", "B"], ["y"]),
        helper.make_node("Shape", ["x"], ["shp"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("shp", TensorProto.INT64, [2])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def feeds(n_batches: int = 6, batch: int = 5, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((batch, 4)).astype(np.float32) * (i + 1)} for i in range(n_batches)]


def reference(data):
    x = np.concatenate([f["x"] for f in data])
    mm = x @ W
    r = np.maximum(mm, 0)
    return {"x": x, "mm": mm, "r": r, "y": r + B}


def test_max_gives_the_true_absmax_of_intermediates():
    data = feeds()
    amax = calibrate(mlp(), ["mm", "r", "y", "x", "W"], data, "max", progress=False)
    ref = reference(data)
    for name in ("mm", "r", "y", "x"):
        assert amax[name] == pytest.approx(float(np.abs(ref[name]).max()), rel=1e-6)
    assert amax["W"] == float(np.abs(W).max())


def test_stats_count_and_histogram():
    data = feeds()
    stats = collect_stats(mlp(), ["mm"], data, histogram=True, progress=False)
    s = stats["mm"]
    ref = np.abs(reference(data)["mm"]).astype(np.float64).ravel()
    assert s.count == ref.size
    np.testing.assert_array_equal(s.hist, np.bincount(np.floor(ref / s.width).astype(int), minlength=2048))


@pytest.mark.parametrize("method", sorted(CALIBRATION_METHODS))
def test_every_method_through_calibrate(method):
    data = feeds()
    amax = calibrate(mlp(), ["mm", "r"], data, method, progress=False)
    ref = reference(data)
    for name in ("mm", "r"):
        assert 0 < amax[name] <= np.abs(ref[name]).max() + 1e-6
    # Re-batching the same samples changes nothing (histograms are batching-independent).
    rebatched = [{"x": f["x"][i : i + 1]} for f in data for i in range(len(f["x"]))]
    again = calibrate(mlp(), ["mm", "r"], rebatched, method, progress=False)
    assert again == pytest.approx(amax, rel=1e-6)


def test_default_method_is_known():
    assert DEFAULT_METHOD in CALIBRATION_METHODS


def test_non_float_tensors_are_skipped_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        amax = calibrate(mlp(), ["shp", "r"], feeds(2), progress=False)
    assert set(amax) == {"r"}
    assert "shp" in caplog.text and "not a float" in caplog.text


def test_all_zero_tensor_is_positive():
    data = [{"x": np.zeros((2, 4), np.float32)}]
    for method in CALIBRATION_METHODS:
        assert calibrate(mlp(), ["r"], data, method, progress=False)["r"] > 0


def test_errors():
    with pytest.raises(ModelError, match="nope"):
        calibrate(mlp(), ["nope"], feeds(1), progress=False)
    with pytest.raises(UsageError, match="unknown calibration method"):
        calibrate(mlp(), ["r"], feeds(1), "kl", progress=False)
    with pytest.raises(DataError, match="no batches"):
        calibrate(mlp(), ["r"], [], progress=False)
    with pytest.raises(DataError, match="lacks model input"):
        calibrate(mlp(), ["r"], [{"z": np.zeros((1, 4), np.float32)}], progress=False)


def test_expose_tensors_leaves_the_original_alone():
    model = mlp()
    exposed = expose_tensors(model, ["mm", "r", "y"])
    assert [o.name for o in model.graph.output] == ["y", "shp"]
    assert [o.name for o in exposed.graph.output] == ["y", "shp", "mm", "r"]
    onnx.checker.check_model(exposed, full_check=True)


def test_progress_enabled_without_a_tty_is_silent(capsys):
    calibrate(mlp(), ["r"], open_like_list(feeds(2)), progress=True)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


class open_like_list(list):
    """A sized iterable, like the DataSource returned by open_data."""


@pytest.mark.skipif(not (SHARED / "fp32").is_dir(), reason=f"shared models not found at {SHARED}")
def test_resnet18_on_shared_photos():
    model = onnx.load(SHARED / "fp32" / "resnet18_cifar10.onnx")
    src = open_data(SHARED / "images", model, Preprocess.parse("size=32,mean=0.5/0.5/0.5,std=0.5/0.5/0.5"))
    relus = [n.output[0] for n in model.graph.node if n.op_type == "Relu"][:4]
    amax = calibrate(model, relus, src, "entropy", progress=False)
    assert set(amax) == set(relus) and all(v > 0 for v in amax.values())
    maxes = calibrate(model, relus, src, "max", progress=False)
    assert all(amax[n] <= maxes[n] for n in relus)


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "fp32").is_dir(), reason=f"shared models not found at {SHARED}")
def test_minilm_int64_inputs_from_npz(tmp_path):
    model = onnx.load(SHARED / "fp32" / "all_minilm_l6_v2.onnx")
    ids = np.array([[101, 7592, 2088, 102, 0, 0], [101, 2023, 2003, 1037, 3231, 102]], dtype=np.int64)
    np.savez(tmp_path / "tok.npz", input_ids=ids, attention_mask=(ids != 0).astype(np.int64),
             token_type_ids=np.zeros_like(ids))
    src = open_data(tmp_path / "tok.npz", model)
    matmuls = [n.output[0] for n in model.graph.node if n.op_type == "MatMul"][:3]
    amax = calibrate(model, matmuls, src, "percentile", progress=False)
    assert set(amax) == set(matmuls) and all(v > 0 for v in amax.values())
