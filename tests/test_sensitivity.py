"""sensitivity: groups of Q/DQ by the layer they feed, one switchable session, end-to-end SQNR per group."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import qdqsurgeon
from qdqsurgeon.calibration import open_data
from qdqsurgeon.cli import cli
from qdqsurgeon.config import Config
from qdqsurgeon.examples import example_calibration, example_model
from qdqsurgeon.sensitivity import SWITCH_INPUT, analyze, find_groups, render_html, switch_model


@pytest.fixture(scope="module")
def quantized():
    model = qdqsurgeon.load(example_model())
    ranges = qdqsurgeon.build_ranges(model, calib=example_calibration(), progress=False)
    # as `qdqsurgeon sensitivity` quantizes it: without bias correction (corrected biases assume every layer INT8)
    return model, qdqsurgeon.optimize(model, ranges=ranges, config=Config(bias_correction=False)).model


def _run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def test_groups_cover_every_dq_once_and_keep_layers_whole(quantized):
    _, q = quantized
    groups = find_groups(q)
    dqs = [n.name for n in q.graph.node if n.op_type == "DequantizeLinear"]
    listed = [d for g in groups for d in g.dq_nodes]
    assert sorted(listed) == sorted(dqs)  # every DQ in exactly one group
    producer = {o: n for n in q.graph.node for o in n.output}
    group_of = {d: g.index for g in groups for d in g.dq_nodes}
    for node in q.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            feeding = {producer[i].name for i in node.input if i in producer and producer[i].op_type == "DequantizeLinear"}
            assert len({group_of[d] for d in feeding}) == 1, node.name  # activation and weight pairs together
    assert all(g.layers for g in groups)


def test_switch_model_is_float_at_zero_and_quantized_at_one(quantized):
    model, q = quantized
    groups = find_groups(q)
    sw = switch_model(q, groups)
    onnx.checker.check_model(sw, full_check=True)
    feed = next(iter(open_data(example_calibration(), model)))
    n = len(groups)
    float_out = _run(model, feed)
    for got, ref in zip(_run(sw, {**feed, SWITCH_INPUT: np.zeros(n, np.float32)}), float_out):
        # If(off) is Identity(x), exactly; the placement passes' own rewrites move the float result by an ulp at most
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * float(np.abs(ref).max()))
    for got, ref in zip(_run(sw, {**feed, SWITCH_INPUT: np.ones(n, np.float32)}), _run(q, feed)):
        assert np.array_equal(got, ref)  # If(on) runs the same Q and DQ: the quantized model's own value


def test_analyze_ranks_groups_and_agrees_across_workers(quantized):
    model, q = quantized
    one = analyze(q, open_data(example_calibration(), model), jobs=1, progress=False)
    two = analyze(q, open_data(example_calibration(), model), jobs=2, progress=False)
    assert len(one.results) == len(find_groups(q))
    for a, b in zip(one.results, two.results):  # equal up to thread-count rounding
        assert a.sqnr_alone_int8 == pytest.approx(b.sqnr_alone_int8, abs=1e-3)
        assert a.sqnr_alone_float == pytest.approx(b.sqnr_alone_float, abs=1e-3)
    ranked = one.ranked()
    assert [r.sqnr_alone_int8 for r in ranked] == sorted(r.sqnr_alone_int8 for r in ranked)
    # one group quantized is never as noisy as all of them here: the noise of the others adds up
    assert all(r.sqnr_alone_int8 > one.sqnr_all_int8 for r in ranked)
    page = render_html(one)
    assert page.count("<tr>") == len(ranked) + 1 and ranked[0].group.name in page


def test_cli_sensitivity_json_and_html(tmp_path):
    js, page = tmp_path / "s.json", tmp_path / "s.html"
    res = CliRunner().invoke(cli, ["sensitivity", str(example_model()), "--calib", str(example_calibration()),
                                   "--json", str(js), "--html", str(page), "--top", "3"])
    assert res.exit_code == 0, res.output
    data = json.loads(js.read_text())
    assert data["groups"] == len(data["ranked"]) > 3
    assert "all INT8: SQNR" in res.output and "more (--top N" in res.output
    assert page.read_text().startswith("<!doctype html>")


def test_cli_ray_missing_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails, installed or not (a cluster: test_sensitivity_ray)
    res = CliRunner().invoke(cli, ["sensitivity", str(example_model()), "--calib", str(example_calibration()),
                                   "--ray", "auto", "-q"])
    assert res.exit_code == 2 and res.output.strip().count("\n") == 0 and "pip install 'ray[default]'" in res.output


def test_cli_sensitivity_refuses_a_qdq_model(tmp_path, quantized):
    _, q = quantized
    path = tmp_path / "q.onnx"
    onnx.save(q, str(path))
    res = CliRunner().invoke(cli, ["sensitivity", str(path), "--calib", str(example_calibration())])
    assert res.exit_code == 2 and "float model" in res.output and res.output.strip().count("\n") == 0


def _spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def _order(report, key) -> list[str]:
    return [r.group.name for r in sorted(report.results, key=key)]


def test_fast_ranking_agrees_with_the_full_measurement(quantized):
    """Screening + estimate (default) against every figure measured on all samples (``full``)."""
    model, q = quantized
    fast = analyze(q, open_data(example_calibration(), model), progress=False)
    full = analyze(q, open_data(example_calibration(), model), progress=False, full=True)
    assert any(r.samples_alone_int8 < fast.samples for r in fast.results)  # something was screened
    assert all(r.alone_float_estimated for r in fast.results) and not any(r.alone_float_estimated for r in full.results)
    assert "estimated" in fast.method() and "measured on all" in full.method()
    alone = lambda r: r.sqnr_alone_int8  # noqa: E731
    assert _order(fast, alone)[:3] == _order(full, alone)[:3]
    assert _spearman([r.sqnr_alone_int8 for r in fast.results], [r.sqnr_alone_int8 for r in full.results]) >= 0.9
    gain = lambda r: -r.sqnr_alone_float  # noqa: E731
    assert _order(fast, gain)[0] == _order(full, gain)[0]  # the group worth keeping float most
    assert fast.sqnr_all_int8 == pytest.approx(full.sqnr_all_int8, abs=1e-6)
    # the groups re-measured on all samples carry exactly the full run's figure
    for a, b in zip(fast.results, full.results):
        if a.samples_alone_int8 == fast.samples:
            assert a.sqnr_alone_int8 == pytest.approx(b.sqnr_alone_int8, abs=1e-6)


@pytest.mark.slow
def test_fast_ranking_agrees_on_mobilenetv2():
    """A real 51-group CNN: screening on 1 of 8 photos ranks like measuring every group on all 8."""
    from qdqsurgeon.api import prepare_opset
    from qdqsurgeon.calibration import Preprocess

    from .helpers import FP32, MODELS, need_shared

    need_shared()
    src, _ = prepare_opset(qdqsurgeon.load(str(FP32 / "mobilenetv2_bottleneck.onnx")), mode="ptq")
    pre = "size=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,scale=1/255"
    images = str(MODELS / "images")
    q = qdqsurgeon.optimize(src, ranges=qdqsurgeon.build_ranges(src, calib=images, preprocess=pre, progress=False), mode="ptq").model
    data = lambda: open_data(images, src, Preprocess.parse(pre))  # noqa: E731
    fast = analyze(q, data(), progress=False, samples=8)
    ref = analyze(q, data(), progress=False, samples=8, screen_samples=8)  # every group alone INT8 on all 8
    assert fast.screen_samples == 1 and ref.screen_samples == 8
    alone = lambda r: r.sqnr_alone_int8  # noqa: E731
    assert _order(fast, alone)[:2] == _order(ref, alone)[:2]
    assert _spearman([r.sqnr_alone_int8 for r in fast.results], [r.sqnr_alone_int8 for r in ref.results]) >= 0.85
