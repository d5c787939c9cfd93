"""remove-identity: Identity between a conv's bias Add and its activation no longer splits the chain (F3)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

import qdqsurgeon

from ..helpers import init, make_model, run

F = TensorProto.FLOAT
RNG = np.random.default_rng(5)


def _paddle_style() -> "onnx.ModelProto":  # noqa: F821
    """Paddle's p2o writes Conv → Add(bias) → Identity → Relu; PP-LCNet had 7 such Identity nodes."""
    nodes = []
    x = "x"
    for i, cout in enumerate((8, 8, 4)):
        nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("Add", [f"c{i}", f"b{i}"], [f"a{i}"], name=f"bias{i}"),
                  helper.make_node("Identity", [f"a{i}"], [f"id{i}"], name=f"identity{i}"),
                  helper.make_node("Relu", [f"id{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    nodes.append(helper.make_node("Identity", ["r2"], ["y"], name="out_identity"))
    cins = (3, 8, 8)
    inits = [init(f"w{i}", RNG.standard_normal((c, cins[i], 3, 3)).astype(np.float32) * 0.3) for i, c in enumerate((8, 8, 4))]
    inits += [init(f"b{i}", RNG.standard_normal((1, c, 1, 1)).astype(np.float32) * 0.1) for i, c in enumerate((8, 8, 4))]
    return make_model(nodes, [("x", F, [1, 3, 8, 8])], [("y", F, [1, 4, 8, 8])], inits)


def test_identity_no_longer_splits_conv_chains():
    model = _paddle_style()
    res = qdqsurgeon.optimize(model, ranges=lambda names: {n: 4.0 for n in names})
    assert res.by_pass()["remove-identity"] == {"F3": 8}  # 4 bypassed, each logged as rewire + remove
    assert "Identity" not in [n.op_type for n in res.model.graph.node]
    assert [o.name for o in res.model.graph.output] == ["y"]  # the graph output keeps its name
    # every chain fuses: only the graph-input Quantize is left standalone (was one per Identity'd Relu)
    assert res.after["standalone_qdq_layers"] == 1, res.after["standalone_qdq"]
    x = RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)
    ref = run(model, {"x": x})[0]
    got = run(res.model, {"x": x})[0]
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.99


def test_remove_identity_alone_is_exact():
    model = _paddle_style()
    res = qdqsurgeon.optimize(model, ["remove-identity"], analyze=False)
    x = RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert np.array_equal(run(model, {"x": x})[0], run(res.model, {"x": x})[0])
    again = qdqsurgeon.optimize(res.model, ["remove-identity"], analyze=False)
    assert [c for c in again.changes if c.kind != "note"] == []
