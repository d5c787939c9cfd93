"""Direct construction, lazy weights and the copy-free paths for heavy models give the old results exactly (issue 15).

``import_graph`` and ``new_variable``/``new_constant``/``new_node`` replace gs's importer and
constructors: the graphs must be the same objects field for field. ``is_constant`` replaces
``const_value(...) is not None`` without loading weights. Heavy models (weights over 256 MB) are
exported, checked and shape-inferred without whole-model copies; the tests lower the thresholds
so that the shared models take those branches, and compare with the ordinary path.
"""

from __future__ import annotations

import gc
import re

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper
from onnx_graphsurgeon.ir.tensor import LazyValues

import qdqsurgeon.graph as graph_mod
import qdqsurgeon.io as io_mod
from qdqsurgeon.analysis import predict
from qdqsurgeon import optimize
from qdqsurgeon.graph import (const_value, export_graph, export_model, gc_paused, import_graph, import_model, is_constant,
                               new_constant, new_node, new_variable)

from .helpers import FP32, QDQ, need_shared


def _models() -> list[onnx.ModelProto]:
    need_shared()
    paths = sorted(FP32.glob("*.onnx")) + sorted(QDQ.glob("*.onnx"))
    return [onnx.load(str(p)) for p in paths]


def _describe(graph: gs.Graph) -> str:
    """Every field of every node and tensor, the links between them by position, object ids renumbered."""
    ids: dict[int, int] = {}

    def ref(obj: object) -> int:
        return ids.setdefault(id(obj), len(ids))

    def tensor(t: gs.Tensor) -> tuple:
        d = t.__dict__
        values = d.get("_values")
        info = (type(values).__name__, repr(getattr(values, "shape", None)), repr(getattr(values, "dtype", None)),
                getattr(values, "nbytes", None)) if values is not None else ()
        return (type(t).__name__, ref(t), t.name, sorted(d), repr(d.get("dtype")), repr(d.get("shape")), d.get("type"),
                d.get("data_location"), info, [ref(n) for n in t.inputs], [ref(n) for n in t.outputs],
                type(t.inputs).__name__, t.inputs.parent_obj is t, t.inputs.field_name, t.outputs.field_name)

    rows = [(ref(n), n.op, n.name, sorted(n.__dict__), type(n.attrs).__name__, repr(list(n.attrs.items())), n.domain,
             [tensor(t) for t in n.inputs], [tensor(t) for t in n.outputs], n.inputs.parent_obj is n,
             n.inputs.field_name, n.outputs.field_name) for n in graph.nodes]
    rows.append(([tensor(t) for t in graph.inputs], [tensor(t) for t in graph.outputs], graph.name, graph.doc_string,
                 graph.opset, graph.producer_name, graph.producer_version, graph.ir_version, list(graph.import_domains)))
    return re.sub(r"0x[0-9a-f]+", "0x", repr(rows))


def _odd_model() -> onnx.ModelProto:
    """What gs's importer has rules for: a repeated initializer, value_info entries that add to and
    repeat each other, an omitted optional input, a node output nobody declared, string/float attributes."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
    nodes = [
        helper.make_node("Clip", ["x", "", "w"], ["c"], name="clip"),
        helper.make_node("Add", ["c", "w"], ["a"], name=""),
        helper.make_node("Resize", ["a", "", "scales"], ["y"], name="resize", mode="nearest", cubic_coeff_a=-0.5),
    ]
    g = helper.make_graph(
        nodes, "odd", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w, helper.make_tensor("w", TensorProto.FLOAT, [2], [3.0, 4.0]),
         helper.make_tensor("scales", TensorProto.FLOAT, [2], [1.0, 1.0])],
        value_info=[helper.make_tensor_value_info("c", TensorProto.FLOAT, None),
                    helper.make_tensor_value_info("c", TensorProto.FLOAT, ["n", 2]),
                    helper.make_tensor_value_info("w", TensorProto.FLOAT, [2])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def test_import_graph_builds_what_graphsurgeon_builds():
    for model in [*_models(), _odd_model(), onnx.shape_inference.infer_shapes(_models()[0])]:
        ours, theirs = import_graph(model), gs.import_onnx(model)
        assert _describe(ours) == _describe(theirs), model.graph.name
        assert gs.export_onnx(ours, do_type_check=False) == gs.export_onnx(theirs, do_type_check=False)


def test_import_graph_defers_to_graphsurgeon_for_subgraphs_and_functions(monkeypatch):
    calls = []
    monkeypatch.setattr(gs, "import_onnx", lambda m: calls.append(m) or "gs")
    body = helper.make_graph([helper.make_node("Identity", ["x"], ["z"])], "body", [],
                             [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=body, else_branch=body)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                                        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(g)
    assert import_graph(model) == "gs" and calls == [model]


def _edited_graph() -> gs.Graph:
    """A graph as passes leave it: numpy constants of several types (scalar and per-channel), a Constant
    node with a tensor attribute, bool/int/float/string/list/numpy-scalar attributes, an unnamed node,
    a tensor without dtype, and a custom domain."""
    g = import_graph(_odd_model())
    y = g.outputs[0]
    s16 = new_constant("s16", np.array([0.5, 0.25], np.float16))
    zp = new_constant("zp", np.array(3, np.int8))
    q, dq = new_variable("q", np.int8, [1, 2]), new_variable("dq")
    k = new_variable("k", np.float32, [])
    g.nodes += [
        new_node("QuantizeLinear", "q", {"axis": 1, "saturate": True}, [y, s16, zp], [q]),
        new_node("DequantizeLinear", "", {"axis": np.int64(1)}, [q, s16, zp], [dq]),
        new_node("Constant", "k", {"value": new_constant("kv", np.array(2.0, np.float32))}, [], [k]),
        new_node("Custom", "c", {"names": ["a", "b"], "f": 0.5, "fs": [0.5, 1.0], "is": [1, 2], "mixed": [1, 0.5]},
                 [dq, k], [new_variable("out", np.float32, ["n", 2])], domain="my.domain"),
    ]
    g.outputs.append(g.nodes[-1].outputs[0])
    return g


def test_export_graph_writes_what_graphsurgeon_writes():
    """The in-place exporter gives gs's bytes: on every shared model as imported and as optimized, on the
    generated scale graphs, and on a graph with every kind of attribute and constant passes create."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import scale

    models = [*_models(), _odd_model(), scale.conv_chain(200), scale.transformer_chain(200)]
    graphs = [import_graph(m) for m in models]
    graphs += [import_graph(optimize(m, analyze=False, verify=False).model) for m in models[:3] + models[-2:]]
    graphs.append(_edited_graph())
    for g in graphs:
        ours, theirs = export_graph(g), gs.export_onnx(g, do_type_check=False)
        assert ours.SerializeToString() == theirs.SerializeToString(), g.name


def test_export_graph_defers_to_graphsurgeon_for_functions_and_subgraphs(monkeypatch):
    calls = []
    monkeypatch.setattr(gs, "export_onnx", lambda g, **kw: calls.append(g) or "gs")
    g = _edited_graph()
    g.nodes[0].attrs["body"] = import_graph(_odd_model())
    assert export_graph(g) == "gs" and calls == [g]


def test_is_constant_agrees_with_const_value_and_loads_nothing():
    for model in _models():
        graph = import_model(model)
        tensors = [t for n in graph.nodes for t in n.inputs]
        answers = [is_constant(t) for t in tensors]
        assert all(isinstance(t._values, LazyValues) for t in tensors if isinstance(t, gs.Constant)), model.graph.name
        assert answers == [const_value(t) is not None for t in tensors], model.graph.name
        assert any(answers) and not all(answers)


def test_heavy_export_is_byte_identical_and_drops_the_graphs_copy(monkeypatch):
    monkeypatch.setattr(graph_mod, "_HEAVY_CONSTANTS", 10_000)
    monkeypatch.setattr(graph_mod, "_BIG_CONSTANT", 1_000)
    for model in _models():
        ordinary, heavy = import_model(model), import_model(model)
        for g in (ordinary, heavy):  # as after a pass that read the weights
            for t in g.tensors().values():
                if isinstance(t, gs.Constant) and t.values.nbytes >= 1_000:
                    t.values = t.values * 1  # an array of the graph's own
        big = graph_mod._big_constants(heavy)
        assert big, model.graph.name
        monkeypatch.setattr(graph_mod, "_HEAVY_CONSTANTS", 2**62)
        want = export_model(ordinary).SerializeToString()
        monkeypatch.setattr(graph_mod, "_HEAVY_CONSTANTS", 10_000)
        out = export_model(heavy)
        assert out.SerializeToString() == want, model.graph.name
        slots = {t.name: t for t in out.graph.initializer}
        for t in big:  # the graph now reads the exported tensors, and still exports the same
            assert isinstance(t._values, LazyValues) and t._values.tensor is not None
            np.testing.assert_array_equal(t.values, onnx.numpy_helper.to_array(slots[t.name]))
        assert export_model(heavy).SerializeToString() == want


def test_heavy_check_and_shape_inference_match_the_ordinary_ones(monkeypatch):
    need_shared()
    path = str(FP32 / "resnet18_cifar10.onnx")
    model = onnx.load(path)
    ordinary = io_mod._infer_shapes(onnx.load(path), "m")
    monkeypatch.setattr(io_mod, "HEAVY_PAYLOAD", 1_000)
    monkeypatch.setattr(io_mod, "_STRIP_TENSOR", 1_000)
    assert io_mod.heavy(model)
    lean, stripped = io_mod.without_weight_bytes(model)
    assert stripped and all(t.data_location == TensorProto.EXTERNAL for t in lean.graph.initializer if t.name in stripped)
    inferred = io_mod._infer_shapes(onnx.load(path), "m")
    assert inferred.graph.value_info == ordinary.graph.value_info and inferred.graph.output == ordinary.graph.output
    assert inferred.graph.initializer == ordinary.graph.initializer
    io_mod.check_model(model, full_check=True)
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    broken.graph.input[0].type.tensor_type.elem_type = TensorProto.DOUBLE  # a float32 weight on a float64 input
    with pytest.raises(onnx.shape_inference.InferenceError):
        onnx.checker.check_model(broken, full_check=True)
    with pytest.raises(onnx.shape_inference.InferenceError, match="type"):
        io_mod.check_model(broken, full_check=True)
    onnx.checker.check_model(broken)  # the plain check does not look at types, in memory or ...
    io_mod.check_model(broken)  # ... here
    broken.graph.node[0].input[0] = "nowhere"
    with pytest.raises(onnx.checker.ValidationError, match="nowhere"):
        io_mod.check_model(broken)
    # the plain check of a heavy model (its big tensors empty stand-ins) says what the ordinary one says
    for edit in (lambda m: m.graph.node[1].attribute.add(name="bogus", type=onnx.AttributeProto.INT, i=1),
                 lambda m: m.graph.node.reverse(),  # out of topological order
                 lambda m: m.graph.initializer[0].ClearField("data_type"),
                 lambda m: setattr(m.graph.node[0], "op_type", "NoSuchOp")):
        bad = onnx.ModelProto()
        bad.CopyFrom(model)
        edit(bad)
        with pytest.raises(onnx.checker.ValidationError) as ordinary_error:
            onnx.checker.check_model(bad)
        with pytest.raises(onnx.checker.ValidationError) as heavy_error:
            io_mod.check_model(bad)
        assert str(heavy_error.value).splitlines()[0] == str(ordinary_error.value).splitlines()[0]


def test_analysis_of_a_heavy_model_matches_the_ordinary_one(monkeypatch):
    need_shared()
    for path in sorted(QDQ.glob("*.onnx"))[:3]:
        model = onnx.load(str(path))
        want = predict(model).to_dict()
        monkeypatch.setattr(io_mod, "HEAVY_PAYLOAD", 1_000)
        monkeypatch.setattr(io_mod, "_STRIP_TENSOR", 1_000)
        assert predict(model).to_dict() == want, path.name
        monkeypatch.undo()


def test_gc_paused_restores_the_collector():
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        with gc_paused():
            raise RuntimeError("boom")
    assert gc.isenabled()


def test_copy_fields_copies_everything_but_the_skipped_field():
    """The skeleton writer's field copy (calibration of models over 2 GB) equals CopyFrom + ClearField, on a real
    model with metadata, and never needs the skipped field (a tensor's raw_data is not read)."""
    from qdqsurgeon.io import copy_fields as _copy_fields

    need_shared()
    model = onnx.load(str(FP32 / "resnet18_cifar10.onnx"))
    model.doc_string = "doc"
    model.metadata_props.add(key="k", value="v")
    for src, skip in [(model, "graph"), (model.graph, "initializer"), *((t, "raw_data") for t in model.graph.initializer)]:
        dst, ref = type(src)(), type(src)()
        _copy_fields(src, dst, skip)
        ref.CopyFrom(src)
        ref.ClearField(skip)
        assert dst == ref, skip


def test_is_large_from_the_payload_alone(monkeypatch):
    """A payload over the protobuf limit is large without sizing the message; within 10 % below it, the message
    size decides; well below it, it is not large."""
    import qdqsurgeon.examples

    model = onnx.load(str(qdqsurgeon.examples.example_model()))
    payload, size = io_mod.tensor_payload(model), model.ByteSize()
    assert payload < size
    monkeypatch.setattr(io_mod, "PROTOBUF_LIMIT", payload - 1)
    assert io_mod.is_large(model)
    monkeypatch.setattr(io_mod, "PROTOBUF_LIMIT", int(payload / 0.95))  # payload within 10 %: ByteSize decides
    assert io_mod.is_large(model) == (size > io_mod.PROTOBUF_LIMIT)
    monkeypatch.setattr(io_mod, "PROTOBUF_LIMIT", size * 2)
    assert not io_mod.is_large(model)


def test_heavy_checks_keep_local_functions(monkeypatch):
    """The weightless copy behind the checks and shape inference of heavy models keeps everything but the weights'
    bytes: a model calling a local function passes both checks, as it does in memory."""
    fn = helper.make_function("local", "Scale2", ["x", "w"], ["y"],
                              [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
                              [helper.make_opsetid("", 17)])
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Scale2", ["x", "w"], ["y"], domain="local", name="f")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
                              [onnx.numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                              functions=[fn])
    model.metadata_props.add(key="k", value="v")
    onnx.checker.check_model(model, full_check=True)
    monkeypatch.setattr(io_mod, "HEAVY_PAYLOAD", 1_000)
    monkeypatch.setattr(io_mod, "_STRIP_TENSOR", 1_000)
    assert io_mod.heavy(model)
    lean, stripped = io_mod.without_weight_bytes(model)
    assert list(stripped) == ["w"] and lean.functions == model.functions and lean.metadata_props == model.metadata_props
    io_mod.check_model(model)
    io_mod.check_model(model, full_check=True)
