"""The linear-time graph maintenance and the copy-free onnxruntime sessions give the old results exactly (issue 15).

``cleanup_graph``/``toposort_graph`` replace gs's ``cleanup()``/``toposort()`` after every pass: they
must keep the same nodes in the same order, or every output would change. The session writer must
hand onnxruntime the same model without copying the weights.
"""

from __future__ import annotations

import random

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from qdqsurgeon.graph import cleanup_graph, import_model, toposort_graph, used_names
from qdqsurgeon.passes.base import Pass, PassContext, PassManager
from qdqsurgeon.rewriter import Rewriter

from .helpers import FP32, QDQ, need_shared


def _models() -> list[onnx.ModelProto]:
    need_shared()
    paths = sorted(FP32.glob("*.onnx")) + sorted(QDQ.glob("*.onnx"))
    return [onnx.load(str(p)) for p in paths]


def _names(graph: gs.Graph) -> list[str]:
    return [n.name for n in graph.nodes]


def _shuffled_pair(model: onnx.ModelProto, seed: int) -> tuple[gs.Graph, gs.Graph]:
    """Two independent imports of ``model`` with the same node order, shuffled, and the same dead nodes added."""
    graphs = []
    for _ in range(2):
        g = import_model(model)
        rng = random.Random(seed)
        order = list(range(len(g.nodes)))
        rng.shuffle(order)
        g.nodes = [g.nodes[i] for i in order]
        # a dead branch (read by nobody) and a node reading a graph input, as a pass leaves them
        src = g.nodes[rng.randrange(len(g.nodes))].outputs[0]
        dead = gs.Variable(f"dead_{seed}", dtype=np.float32)
        g.nodes.append(gs.Node("Relu", name=f"dead_relu_{seed}", inputs=[src], outputs=[dead]))
        g.nodes.append(gs.Node("Neg", name=f"dead_neg_{seed}", inputs=[dead], outputs=[gs.Variable(f"dead2_{seed}")]))
        graphs.append(g)
    return graphs[0], graphs[1]


def test_toposort_and_cleanup_match_graphsurgeon_on_real_models():
    for model in _models():
        for seed in (0, 1):
            ours, theirs = _shuffled_pair(model, seed)
            toposort_graph(ours)
            theirs.toposort()
            assert _names(ours) == _names(theirs), model.graph.name
            cleanup_graph(ours)
            theirs.cleanup(remove_unused_graph_inputs=False)
            assert _names(ours) == _names(theirs), model.graph.name
            assert f"dead_relu_{seed}" not in _names(ours)
            toposort_graph(ours)
            theirs.toposort()
            assert _names(ours) == _names(theirs)


def test_toposort_of_any_topological_order_matches_gs():
    # the one-pass levels of a graph already in a topological order (any one, not only gs's level order)
    for model in _models():
        for seed in (0, 1, 2):
            graphs = [import_model(model) for _ in range(2)]
            rng = random.Random(seed)
            g = graphs[0]
            readers: dict[int, list[int]] = {}
            pending = []
            index = {id(n): i for i, n in enumerate(g.nodes)}
            for i, n in enumerate(g.nodes):
                producers = {index[id(p)] for t in n.inputs for p in t.inputs if id(p) in index}
                pending.append(len(producers))
                for p in producers:
                    readers.setdefault(p, []).append(i)
            ready, order = [i for i, k in enumerate(pending) if k == 0], []
            while ready:  # Kahn's algorithm, ties broken at random
                i = ready.pop(rng.randrange(len(ready)))
                order.append(i)
                for r in readers.get(i, ()):
                    pending[r] -= 1
                    if pending[r] == 0:
                        ready.append(r)
            assert len(order) == len(g.nodes)
            for h in graphs:
                h.nodes = [h.nodes[i] for i in order]
            ours, theirs = graphs
            toposort_graph(ours)
            theirs.toposort()
            assert _names(ours) == _names(theirs), model.graph.name


def test_toposort_has_no_recursion_limit():
    # 5000 nodes appended in reverse order: gs's recursive levels would need a 5000-deep stack
    x = gs.Variable("x", dtype=np.float32, shape=[1])
    nodes, t = [], x
    for i in range(5000):
        out = gs.Variable(f"t{i}", dtype=np.float32, shape=[1])
        nodes.append(gs.Node("Relu", name=f"n{i}", inputs=[t], outputs=[out]))
        t = out
    g = gs.Graph(nodes=nodes[::-1], inputs=[x], outputs=[t], opset=17)
    toposort_graph(g)
    assert _names(g) == [f"n{i}" for i in range(5000)]


def test_used_names_are_the_tensor_map_keys_and_node_names():
    for model in _models()[:3]:
        g = import_model(model)
        assert used_names(g) == {n.name for n in g.nodes} | set(g.tensors().keys())


class _DirectEdit(Pass):
    """A user pass that edits gs objects without its rewriter and logs nothing."""

    name = "direct-edit"

    def run(self, graph: gs.Graph, rw: Rewriter, ctx: PassContext) -> None:
        for node in graph.nodes:
            if node.op == "Relu":
                node.outputs.clear()  # orphaned: only a cleanup removes it


def test_unedited_builtin_pass_skips_cleanup_but_user_pass_is_always_cleaned(monkeypatch):
    from qdqsurgeon.passes.remove_identity import RemoveIdentity

    model = _models()[0]
    graph = import_model(model)
    calls = []
    original = Rewriter.cleanup
    monkeypatch.setattr(Rewriter, "cleanup", lambda self: (calls.append(self.pass_name), original(self))[1])
    PassManager([RemoveIdentity(), RemoveIdentity(), _DirectEdit()]).run(graph, PassContext())
    # the first pass cleans the fresh import, the second edits nothing on a clean graph, the user pass is cleaned
    assert calls == ["remove-identity", "direct-edit"]
    assert not any(n.op == "Relu" for n in graph.nodes)


def test_file_session_gives_the_same_outputs_without_copying(monkeypatch, tmp_path):
    import qdqsurgeon.calibration.collect as col
    from qdqsurgeon.examples import example_model

    model = onnx.load(str(example_model()))
    before = model.SerializeToString()
    names = [model.graph.node[1].output[0], model.graph.node[3].output[0]]
    x = {model.graph.input[0].name: np.random.default_rng(0).standard_normal(
        [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]).astype(np.float32)}
    in_memory = col.make_session(model, outputs=names).run(names, x)
    monkeypatch.setattr(col, "_FILE_SESSION_BYTES", 100)
    by_file = col.make_session(model, outputs=names).run(names, x)
    for a, b in zip(in_memory, by_file):
        np.testing.assert_array_equal(a, b)
    assert model.SerializeToString() == before
    # the written model is the model plus the outputs, with its weights external
    path = col._write_external(model, tmp_path, col._output_infos(model, names, None))
    back = onnx.load(str(path))
    assert [o.name for o in back.graph.output] == [o.name for o in model.graph.output] + names
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in onnx.load(str(path), load_external_data=False).graph.initializer)
    for a, b in zip(back.graph.initializer, model.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
    assert list(back.graph.node) == list(model.graph.node)


def test_scale_generators_make_valid_models():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("scale", Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py")
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    for gen in (scale.conv_chain, scale.transformer_chain):
        m = gen(60)
        onnx.checker.check_model(m, full_check=True)
        assert 50 <= len(m.graph.node) <= 62


@pytest.mark.parametrize("n", [3])
def test_toposort_keeps_gs_tie_order_for_appended_nodes(n):
    # new Q/DQ nodes are appended at the end of the list by the rewriter; gs puts them by level
    model = _models()[2]
    ours, theirs = import_model(model), import_model(model)
    for g in (ours, theirs):
        for i, node in enumerate(list(g.nodes)[:n]):
            t = node.outputs[0]
            out = gs.Variable(f"extra{i}", dtype=np.float32)
            g.nodes.append(gs.Node("Identity", name=f"extra_{i}", inputs=[t], outputs=[out]))
            g.outputs.append(out)
    toposort_graph(ours)
    theirs.toposort()
    assert _names(ours) == _names(theirs)


class _BreakRelu(Pass):
    """Gives the first Relu an attribute Relu does not have: onnx.checker refuses the model."""

    name = "break-relu"
    edits_through_rewriter = True

    def run(self, graph: gs.Graph, rw: Rewriter, ctx: PassContext) -> None:
        node = next(n for n in graph.nodes if n.op == "Relu")
        rw.set_attr(node, "bogus", 1)


def test_verification_once_at_the_end_still_names_the_pass_that_broke_the_model():
    from qdqsurgeon.api import optimize
    from qdqsurgeon.errors import ModelError
    from qdqsurgeon.examples import example_model
    from qdqsurgeon.passes.remove_identity import RemoveIdentity

    model = onnx.load(str(example_model()))
    with pytest.raises(ModelError, match="pass break-relu produced an invalid model"):
        optimize(model, [RemoveIdentity(), _BreakRelu(), RemoveIdentity()], analyze=False)


def _scale_module():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("scale", Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py")
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    return scale


@pytest.mark.parametrize("family", ["conv_chain", "transformer_chain"])
def test_calibration_in_slices_gives_the_same_ranges(monkeypatch, family):
    import qdqsurgeon.calibration.collect as col
    from qdqsurgeon.calibration import random_data

    model = onnx.shape_inference.infer_shapes(getattr(_scale_module(), family)(200))
    names = [n.output[0] for n in model.graph.node][::3]
    data = random_data(model, 2)
    whole = col.calibrate(model, names, data, "max", progress=False)
    monkeypatch.setattr(col, "_SEGMENT_NODES", 20)
    built = []
    original = col._Segments.__init__
    monkeypatch.setattr(col._Segments, "__init__", lambda self, *a, **k: (original(self, *a, **k), built.append(len(self.slices)))[0])
    sliced = col.calibrate(model, names, data, "max", progress=False)
    assert built and built[0] >= 5  # it did run in slices
    assert sliced == whole


@pytest.mark.parametrize("child", ["works", "dies", "dies-later"])
def test_calibration_slices_half_in_a_forked_child_give_the_same_ranges(monkeypatch, child):
    """On a large graph the second half of the slices is set up and run in a forked child while this process does
    the first half: the statistics are those of the in-turn run; a child that dies is replaced by this process."""
    import os

    import qdqsurgeon.background as background
    import qdqsurgeon.calibration.collect as col
    from qdqsurgeon.calibration import random_data

    model = onnx.shape_inference.infer_shapes(_scale_module().conv_chain(300))
    names = [n.output[0] for n in model.graph.node][::2]
    data = random_data(model, 3)
    monkeypatch.setattr(col, "_SEGMENT_NODES", 20)
    whole = col.calibrate(model, names, data, "percentile", progress=False)
    monkeypatch.setattr(background, "FORK_NODES", 0)
    started = []
    real_init = col._RemoteSlices.__init__
    monkeypatch.setattr(col._RemoteSlices, "__init__", lambda self, *a: (started.append(len(a[0])), real_init(self, *a))[1])
    if child == "dies":
        monkeypatch.setattr(col, "_serve", lambda conn, *a: os._exit(3))
    elif child == "dies-later":  # after saying it is ready, at the first batch

        def dying(conn, *a):
            conn.send(("ready", None))
            conn.recv()
            os._exit(3)

        monkeypatch.setattr(col, "_serve", dying)
    forked = col.calibrate(model, names, data, "percentile", progress=False)
    assert started and started[0] >= 2  # half of the slices went to the child
    assert forked == whole


def test_shape_inference_adds_nothing_to_a_model_with_complete_types():
    """``types_complete`` lets the analysis, calibration and load skip ONNX shape inference: on every
    shared model as loaded, and on its PTQ export, inference must then return the very same types."""
    import qdqsurgeon
    from qdqsurgeon.graph import export_model, types_complete
    from qdqsurgeon.io import load

    need_shared()
    checked = 0
    for path in sorted(FP32.glob("*.onnx")) + sorted(QDQ.glob("*.onnx")):
        loaded = load(path)
        models = [loaded, export_model(import_model(loaded))]
        if path.parent == FP32 and "minilm" not in path.name:
            ranges = qdqsurgeon.build_ranges(loaded, calib_random=1, progress=False)
            models.append(qdqsurgeon.optimize(loaded, ranges=ranges, analyze=False, verify=False).model)
        for model in models:
            if not types_complete(model):
                continue
            checked += 1
            inferred = onnx.shape_inference.infer_shapes(model)
            for field in ("input", "output", "value_info"):
                assert [v.SerializeToString() for v in getattr(inferred.graph, field)] == \
                       [v.SerializeToString() for v in getattr(model.graph, field)], (path.name, field)
    assert checked >= 8  # (models with a symbolic batch dim are not complete)
    # a missing type, a symbolic dim or a subgraph means inference has work to do
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])
    relu = onnx.helper.make_node("Relu", ["x"], ["y"])
    assert not types_complete(onnx.helper.make_model(onnx.helper.make_graph([relu], "g", [x], [y])))
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])
    two = onnx.helper.make_graph([relu, onnx.helper.make_node("Relu", ["y"], ["z"])], "g", [x],
                                 [onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [2, 3])])
    assert not types_complete(onnx.helper.make_model(two))
    two.value_info.append(y)
    assert types_complete(onnx.helper.make_model(two))
