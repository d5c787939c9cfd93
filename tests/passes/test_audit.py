"""AuditInstrument: a pass that edits the graph without logging the edit is caught (issue 13 item 6)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

import qdqsurgeon
from qdqsurgeon.examples import example_calibration, example_model
from qdqsurgeon.passes.audit import AuditInstrument, EscapedEdit
from qdqsurgeon.passes.base import Pass, PassContext, PassManager
from qdqsurgeon.graph import import_model

from ..analysis_helpers import Builder


def _graph():
    b = Builder(seed=3)
    x = b.input("input", [1, 8, 8, 8])
    b.output(b.conv(b.conv(x, 8, act="relu", name="c1"), 8, name="c2"))
    return import_model(b.build())


class _Silent(Pass):
    name = "silent-edit"

    def run(self, graph, rw, ctx):
        conv = next(n for n in graph.nodes if n.name == "c2")
        conv.attrs["dilations"] = [1, 1]  # behind the rewriter's back
        rw.note(conv, "looked at it")  # a note is not an edit


class _Logged(Pass):
    name = "logged-edit"

    def run(self, graph, rw, ctx):
        conv = next(n for n in graph.nodes if n.name == "c2")
        rw.set_attr(conv, "dilations", [1, 1], detail="explicit dilations", rule="F1")


class _InPlaceConstant(Pass):
    name = "in-place-constant"

    def run(self, graph, rw, ctx):
        dq = next(n for n in graph.nodes if n.op == "DequantizeLinear")
        dq.inputs[1].values[...] = dq.inputs[1].values * 2  # mutating a scale array in place
        rw.note(dq, "scaled")


@pytest.mark.parametrize("bad", [_Silent, _InPlaceConstant])
def test_unlogged_edit_is_caught(bad):
    with pytest.raises(EscapedEdit, match=bad.name):
        PassManager([bad()], instruments=[AuditInstrument()]).run(_graph(), PassContext())


def test_logged_edit_passes():
    res = PassManager([_Logged()], instruments=[AuditInstrument()]).run(_graph(), PassContext())
    assert [c.kind for c in res.changes] == ["attr"]


def test_every_pipeline_pass_logs_its_edits():
    """The full PTQ and fix pipelines on the example model, audited (the suite audits every run too)."""
    model = qdqsurgeon.load(example_model())
    ranges = qdqsurgeon.build_ranges(model, calib=example_calibration(), progress=False)
    res = qdqsurgeon.optimize(model, ranges=ranges, instruments=[AuditInstrument()])
    fixed = qdqsurgeon.optimize(res.model, instruments=[AuditInstrument()])
    assert fixed.mode == "fix"


def test_fingerprint_leaves_lazy_constants_unloaded_and_sees_in_place_edits():
    """Checksumming must not pull every weight into memory (a debug run would then differ from a
    normal one in memory), and a one-element edit of a loaded constant changes the fingerprint."""
    from onnx import numpy_helper
    from onnx_graphsurgeon.ir.tensor import LazyValues

    from qdqsurgeon.passes.audit import fingerprint

    graph = _graph()
    weights = [t for t in graph.tensors().values() if isinstance(t, gs.Constant) and t.values.ndim == 4]
    for t in weights:  # re-wrap as import does for large initializers
        t.values = LazyValues(numpy_helper.from_array(t.values, t.name))
    first = fingerprint(graph)[1]
    assert all(isinstance(t._values, LazyValues) for t in weights)
    assert fingerprint(graph)[1] == first
    weights[0].values[0, 0, 0, 0] += np.float32(1e-6)
    assert fingerprint(graph)[1] != first
