"""AuditInstrument: a pass that edits the graph without logging the edit is caught (issue 13 item 6)."""

from __future__ import annotations

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
