"""How optimize runs its work (issue 15): the never-worse baseline in a forked process, the analysis on the
pipeline's own graph.

On graphs of ``background.FORK_NODES`` nodes or more, ``optimize`` runs the baseline pipeline's export and
analysis in a child process beside the main pipeline. Forced on for small real models here, the result
must be the same as the in-turn run in every field a user sees: the model's bytes, the change log, the
before/after analyses; also when the child dies or the baseline wins. The analysis of the result takes the
pipeline's graph over instead of importing the exported model again; it must predict exactly what the import
would (every shared model here; benchmarks/scale.py and the zoo test run it on the rest).
"""

from __future__ import annotations

import os
import zlib

import pytest

import qdqsurgeon
import qdqsurgeon.api as api
import qdqsurgeon.background as background
import qdqsurgeon.graph
from qdqsurgeon.inspection import validity_problems
from qdqsurgeon.ranges import StaticRanges

from .helpers import FP32, QDQ, need_shared


def _ranges(model):
    """Fixed ranges for every tensor (no calibration: the comparison is about the pipeline, not data)."""
    names = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    return StaticRanges({n: 3.0 + (zlib.crc32(n.encode()) % 7) / 7 for n in sorted(names)})


def _optimize(model, monkeypatch, *, fork: bool, **kw):
    monkeypatch.setattr(background, "FORK_NODES", 0 if fork else 10**12)
    res = qdqsurgeon.optimize(model, ranges=_ranges(model), **kw)
    return res


def _same(a, b) -> None:
    assert a.model.SerializeToString() == b.model.SerializeToString()
    assert [c.to_dict() for c in a.changes] == [c.to_dict() for c in b.changes]
    assert (a.before, a.after, a.before_label, a.regressions, a.passes) == (b.before, b.after, b.before_label, b.regressions, b.passes)


@pytest.mark.parametrize("path", [FP32 / "resnet18_cifar10.onnx", FP32 / "yolov8n_320.onnx",
                                  QDQ / "mobilenetv2_ort_static_u8.onnx", QDQ / "resnet18_cifar10_modelopt_ptq.onnx"],
                         ids=lambda p: p.stem)
def test_forked_baseline_gives_the_same_result(path, monkeypatch):
    need_shared()
    model = qdqsurgeon.load(path)
    forked = _optimize(model, monkeypatch, fork=True)
    in_turn = _optimize(model, monkeypatch, fork=False)
    _same(forked, in_turn)
    assert forked.before is not None and forked.after is not None
    assert forked.before_label == ("insert-only" if forked.mode == "ptq" else "input")


def test_a_dead_child_is_replaced_by_the_parent(monkeypatch, tmp_path):
    """The child exits without a word (as when the kernel kills it): the parent does the work itself."""
    need_shared()
    mark = tmp_path / "child"
    model = qdqsurgeon.load(QDQ / "resnet18_cifar10_ort_static_s8.onnx")
    in_turn = _optimize(model, monkeypatch, fork=False)
    parent = os.getpid()
    real = background.Background.__init__

    def dying(self, fn, **kw):
        def run():
            if os.getpid() != parent:
                mark.write_text(str(os.getpid()))
                os._exit(3)
            return fn()

        real(self, run, **kw)

    monkeypatch.setattr(background.Background, "__init__", dying)
    _same(_optimize(model, monkeypatch, fork=True), in_turn)
    assert mark.exists()  # the work did go to a child


@pytest.mark.parametrize("path", [FP32 / "resnet18_cifar10.onnx", QDQ / "mobilenetv2_ort_static_u8.onnx"],
                         ids=lambda p: p.stem)
def test_baseline_on_a_copy_after_the_shared_head_equals_a_fresh_one(path, monkeypatch):
    """In turn, the baseline continues a copy of the graph after the passes both pipelines start with (insertion
    reads every weight once); it must give what the baseline run from a fresh import gives."""
    need_shared()
    model = qdqsurgeon.load(path)
    copies = []
    real_copy = qdqsurgeon.graph.gs.Graph.copy
    monkeypatch.setattr(qdqsurgeon.graph.gs.Graph, "copy", lambda g: copies.append(1) or real_copy(g))
    shared = _optimize(model, monkeypatch, fork=False)
    assert copies  # the head ran once and the baseline took a copy
    monkeypatch.setattr(api, "_shared_head", lambda pipeline, base: 0)
    fresh = _optimize(model, monkeypatch, fork=False)
    _same(shared, fresh)


def test_the_baseline_is_not_checked_unless_it_wins(monkeypatch):
    """The baseline's model is only analysed (a baseline that wins is run again, checked): the side job runs no
    onnx check; the main pipeline's result is checked once."""
    need_shared()
    model = qdqsurgeon.load(FP32 / "resnet18_cifar10.onnx")
    checked = []
    real = qdqsurgeon.io.check_model

    def counted(m, *a, **k):
        checked.append(m)
        return real(m, *a, **k)

    monkeypatch.setattr(api, "check_model", counted)  # the plain check of the result
    monkeypatch.setattr(qdqsurgeon.io, "check_model", counted)  # VerifyInstrument's full check
    res = _optimize(model, monkeypatch, fork=False)
    assert len(checked) == 1 and checked[0] is res.model


def test_forked_baseline_that_wins_is_kept(monkeypatch):
    """When the baseline scores better, the parent runs it again and keeps it, as the in-turn run does."""
    need_shared()
    model = qdqsurgeon.load(QDQ / "resnet18_cifar10_ort_static_s8.onnx")
    results = []
    for fork in (True, False):
        scores = iter([(0, 1), (0, 5)])  # _score(repair-only), then _score(fix pipeline)
        monkeypatch.setattr(api, "_score", lambda analysis, s=scores: next(s))
        results.append(_optimize(model, monkeypatch, fork=fork))
    _same(*results)
    assert any(c.pass_name == "optimize" and "kept that" in c.detail for c in results[0].changes)
    assert "align-scales" not in results[0].passes


def test_a_kept_baseline_is_analysed_after_its_tail(monkeypatch):
    """A baseline that wins gets the pipeline's RUN_LAST passes (here FP16 regions); the "after" analysis is that
    of the model returned, not of the baseline before them."""
    need_shared()
    model = qdqsurgeon.load(FP32 / "resnet18_cifar10.onnx")
    scores = iter([(0, 1), (0, 5)])  # _score(insert-only), then _score(ptq)
    monkeypatch.setattr(api, "_score", lambda analysis: next(scores))
    res = _optimize(model, monkeypatch, fork=False, config=qdqsurgeon.Config(float16=True))
    assert "float16-regions" in res.passes and any(c.pass_name == "float16-regions" for c in res.changes)
    fresh = api._analysis(res.model)
    fresh["validity_problems"] = len(validity_problems(qdqsurgeon.graph.import_model(res.model)))
    assert res.after == fresh


def test_no_fork_below_the_threshold_or_when_switched_off(monkeypatch):
    monkeypatch.setattr(background, "FORK_NODES", 3)
    assert background.can_fork(3)
    monkeypatch.setenv("QDQSURGEON_NO_FORK", "1")
    assert not background.can_fork(3)
    monkeypatch.delenv("QDQSURGEON_NO_FORK")
    assert not background.can_fork(2)
    import threading

    gate = threading.Event()
    other = threading.Thread(target=gate.wait)
    other.start()
    try:
        assert not background.can_fork(3)  # another Python thread is running
    finally:
        gate.set()
        other.join()
    assert background.can_fork(3)


def test_background_gives_the_child_s_value_or_the_fallback_s():
    parent = os.getpid()
    job = background.Background(lambda: {"pid": os.getpid()}, fork=True)
    assert job.forked and job.result()["pid"] != parent
    failing = background.Background(lambda: 1 / 0, fork=True, fallback=lambda: "fallback")
    assert failing.result() == "fallback"
    now = background.Background(lambda: os.getpid(), fork=False)
    assert not now.forked and now.result() == parent


# MiniLM (18 s here) is left to benchmarks: the other ten cover Conv, Concat/Split, residual and fix-path graphs.
@pytest.mark.parametrize("path", [*sorted(p for p in FP32.glob("*.onnx") if "minilm" not in p.name), *sorted(QDQ.glob("*.onnx"))],
                         ids=lambda p: p.stem)
def test_analysis_of_the_pipeline_graph_equals_that_of_the_exported_model(path, monkeypatch):
    """optimize's analysis takes the pipeline's own graph over (with the shapes ONNX infers on its export)
    instead of importing the export: the prediction must be the one a fresh import gives, field for field."""
    need_shared()
    model = qdqsurgeon.load(path)
    res = _optimize(model, monkeypatch, fork=False)
    fresh = api._analysis(res.model)
    fresh["validity_problems"] = len(validity_problems(qdqsurgeon.graph.import_model(res.model)))
    assert res.after == fresh


@pytest.mark.parametrize("fork", [False, True], ids=["in-turn", "forked"])
@pytest.mark.parametrize("path", sorted(QDQ.glob("*.onnx")), ids=lambda p: p.stem)
def test_inspect_prediction_on_its_own_graph_equals_the_import(path, fork, monkeypatch):
    """inspect --trt hands its private graph to the prediction (no export and import again; on a large graph
    in a forked child while the census runs): the same report as predicting on a fresh import."""
    need_shared()
    from qdqsurgeon.analysis import predict
    from qdqsurgeon.inspection import inspect_model

    monkeypatch.setattr(background, "FORK_NODES", 0 if fork else 10**12)
    model = qdqsurgeon.load(path)
    plain = inspect_model(model)
    res = inspect_model(model, trt=True)
    assert res.trt == predict(qdqsurgeon.graph.import_model(model)).to_dict()
    assert (res.problems, res.sparsity, res.ops) == (plain.problems, plain.sparsity, plain.ops)
