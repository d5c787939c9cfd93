"""Registry: built-ins, user pattern files (--patterns) and entry points (issue 2)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from onnx import helper

import qdqsurgeon
from qdqsurgeon.cli import cli
from qdqsurgeon.errors import UsageError
from qdqsurgeon.passes import BUILTIN_PASSES
from qdqsurgeon.registry import Registry

from .helpers import REPO, F, make_model, ops

USER_PATTERNS = REPO / "patterns"


def _identity_model():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"),
             helper.make_node("Identity", ["a"], ["b"], name="ident"),
             helper.make_node("Sigmoid", ["b"], ["y"], name="sig")]
    return make_model(nodes, [("x", F, [1, 4])], [("y", F, [1, 4])])


def test_builtin_registry_lists_every_builtin_pass():
    reg = Registry.builtin()
    assert [reg.entry(p.name).origin for p in BUILTIN_PASSES] == ["builtin"] * len(BUILTIN_PASSES)
    with pytest.raises(UsageError, match="unknown pass"):
        reg.create("nope")


def test_fresh_registries_are_independent():
    a, b = Registry.builtin(), Registry.builtin()
    a.load_path(USER_PATTERNS)
    assert "drop-identity" in a and "drop-identity" not in b


def test_user_pattern_file_runs_and_is_logged(tmp_path):
    src = tmp_path / "in.onnx"
    qdqsurgeon.save(_identity_model(), src)
    report = tmp_path / "report.json"
    result = CliRunner().invoke(cli, ["optimize", str(src), str(tmp_path / "out.onnx"), "--passes", "dedupe-qdq",
                                      "--patterns", str(USER_PATTERNS / "drop_identity.py"), "--report", str(report)])
    assert result.exit_code == 0, result.output
    out = qdqsurgeon.load(tmp_path / "out.onnx")
    assert ops(out) == ["Relu", "Sigmoid"]
    log = json.loads(report.read_text())
    assert "drop-identity" in log["passes"]
    assert any(c["pass"] == "drop-identity" and c["node"] == "ident" and c["kind"] == "remove" for c in log["changes"])
    assert "drop-identity" in result.output


def test_user_patterns_listed_with_origin():
    result = CliRunner().invoke(cli, ["passes", "--patterns", str(USER_PATTERNS), "--json"])
    assert result.exit_code == 0
    entries = {e["name"]: e for e in json.loads(result.output)["passes"]}
    assert entries["drop-identity"]["origin"].endswith("drop_identity.py")
    assert entries["fold-qdq-pairs"]["origin"] == "builtin"
    text = CliRunner().invoke(cli, ["passes", "--patterns", str(USER_PATTERNS)]).output
    assert "drop-identity" in text and "example user pattern" in text


def test_bad_pattern_files(tmp_path):
    empty = tmp_path / "nothing.py"
    empty.write_text("X = 1\n")
    with pytest.raises(UsageError, match="neither PATTERNS nor PASSES"):
        Registry().load_path(empty)
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('oops')\n")
    with pytest.raises(UsageError, match="oops"):
        Registry().load_path(broken)
    result = CliRunner().invoke(cli, ["passes", "--patterns", str(broken)])
    assert result.exit_code == 2 and "oops" in result.stderr


def test_name_clash_is_an_error():
    reg = Registry.builtin()
    with pytest.raises(UsageError, match="already taken"):
        reg.add_pass(BUILTIN_PASSES[0], origin="file:x.py")


@pytest.fixture(autouse=True)
def _fake_module(monkeypatch):
    """A module importable by name, as an installed plugin package would be."""
    import sys
    import types

    mod = types.ModuleType("patterns_module_for_test")
    from qdqsurgeon import Match, Pattern

    class DropIdentityEP(Pattern):
        name = "ep-drop-identity"
        summary = "entry point pattern"
        root_ops = ("Identity",)

        def match(self, node, ctx):
            return Match(node)

        def rewrite(self, match, rw):
            rw.bypass(match.node)

    mod.DropIdentityEP = DropIdentityEP
    mod.PATTERNS = [DropIdentityEP]
    monkeypatch.setitem(sys.modules, "patterns_module_for_test", mod)
    yield


def test_entry_point_group(monkeypatch):
    import importlib.metadata as md
    import sys

    ep = SimpleNamespace(name="demo", load=lambda: sys.modules["patterns_module_for_test"])
    monkeypatch.setattr(md, "entry_points", lambda group=None: [ep] if group == "qdqsurgeon.patterns" else [])
    reg = Registry.builtin()
    added = reg.load_entry_points()
    assert [e.name for e in added] == ["ep-drop-identity"]
    assert reg.entry("ep-drop-identity").origin == "entry-point:demo"
    res = qdqsurgeon.optimize(_identity_model(), passes=["ep-drop-identity"], registry=reg, analyze=False)
    assert ops(res.model) == ["Relu", "Sigmoid"]


def test_failing_user_pattern_is_named(tmp_path):
    pat = tmp_path / "boom.py"
    pat.write_text(
        "from qdqsurgeon import Match, Pattern\n"
        "class Boom(Pattern):\n"
        "    name = 'boom'\n"
        "    root_ops = ('Identity',)\n"
        "    def match(self, node, ctx):\n"
        "        return Match(node)\n"
        "    def rewrite(self, match, rw):\n"
        "        raise KeyError('oops')\n"
        "PATTERNS = [Boom()]\n")
    src = tmp_path / "in.onnx"
    qdqsurgeon.save(_identity_model(), src)
    result = CliRunner().invoke(cli, ["optimize", str(src), str(tmp_path / "o.onnx"), "--passes", "dedupe-qdq", "--patterns", str(pat)])
    assert result.exit_code == 1
    assert "pattern boom failed at node ident" in result.stderr and "internal error" not in result.stderr


def test_pattern_pass_runs_to_a_fixpoint():
    """Two chained Identities need two sweeps of the pattern pass: both go in one run."""
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"),
             helper.make_node("Identity", ["a"], ["b"], name="i1"),
             helper.make_node("Identity", ["b"], ["c"], name="i2"),
             helper.make_node("Sigmoid", ["c"], ["y"], name="sig")]
    model = make_model(nodes, [("x", F, [1, 4])], [("y", F, [1, 4])])
    reg = Registry.builtin()
    reg.load_path(USER_PATTERNS)
    res = qdqsurgeon.optimize(model, passes=["drop-identity"], registry=reg, analyze=False)
    assert ops(res.model) == ["Relu", "Sigmoid"]


def test_pass_manager_fixpoint_repeats_from_after_the_one_shot_passes():
    """Iteration 2+ skips the first ``repeat_from`` passes; a repeated identical note is logged once."""
    from qdqsurgeon.graph import import_model
    from qdqsurgeon.passes.base import Pass, PassManager

    calls: list[str] = []

    class Once(Pass):
        name = "once"

        def run(self, graph, rw, ctx):
            calls.append(self.name)

    class DropIdentity(Pass):
        """Removes one Identity per call and notes the same thing every time."""
        name = "drop-one"

        def run(self, graph, rw, ctx):
            calls.append(self.name)
            rw.note(graph.nodes[0], "looked at the graph")
            ident = next((n for n in graph.nodes if n.op == "Identity"), None)
            if ident is not None:
                rw.bypass(ident, detail="one Identity per sweep")

    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"),
             helper.make_node("Identity", ["a"], ["b"], name="i1"),
             helper.make_node("Identity", ["b"], ["c"], name="i2"),
             helper.make_node("Sigmoid", ["c"], ["y"], name="sig")]
    graph = import_model(make_model(nodes, [("x", F, [1, 4])], [("y", F, [1, 4])]))
    res = PassManager([Once(), DropIdentity()], fixpoint=True, repeat_from=1).run(graph)
    assert calls == ["once", "drop-one", "drop-one", "drop-one"]  # two removals, then a quiet sweep
    assert res.iterations == 3 and [n.op for n in res.graph.nodes] == ["Relu", "Sigmoid"]
    assert [c.detail for c in res.changes if c.kind == "note"] == ["looked at the graph"]
