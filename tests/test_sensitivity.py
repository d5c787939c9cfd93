"""sensitivity: groups of Q/DQ by the layer they feed, one switchable session, end-to-end SQNR per group."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import qdqsurgeon
from qdqsurgeon.calibration import open_data
from qdqsurgeon.cli import cli
from qdqsurgeon.examples import example_calibration, example_model
from qdqsurgeon.sensitivity import SWITCH_INPUT, analyze, find_groups, render_html, switch_model


@pytest.fixture(scope="module")
def quantized():
    model = qdqsurgeon.load(example_model())
    ranges = qdqsurgeon.build_ranges(model, calib=example_calibration(), progress=False)
    return model, qdqsurgeon.optimize(model, ranges=ranges).model


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
        # Where(off, y, x) is x exactly; the placement passes' own rewrites move the float result by an ulp at most
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * float(np.abs(ref).max()))
    for got, ref in zip(_run(sw, {**feed, SWITCH_INPUT: np.ones(n, np.float32)}), _run(q, feed)):
        assert np.array_equal(got, ref)  # Where(on, y, x) is the quantized model's own value


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


@pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="ray is installed")
def test_cli_ray_missing_is_one_line():
    res = CliRunner().invoke(cli, ["sensitivity", str(example_model()), "--calib", str(example_calibration()),
                                   "--ray", "auto", "-q"])
    assert res.exit_code == 2 and res.output.strip().count("\n") == 0 and "ray" in res.output


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")
def test_ray_local_cluster(quantized):
    model, q = quantized
    rep = analyze(q, open_data(example_calibration(), model), ray_address="local", progress=False)
    assert len(rep.results) == len(find_groups(q))


def test_cli_sensitivity_refuses_a_qdq_model(tmp_path, quantized):
    _, q = quantized
    path = tmp_path / "q.onnx"
    onnx.save(q, str(path))
    res = CliRunner().invoke(cli, ["sensitivity", str(path), "--calib", str(example_calibration())])
    assert res.exit_code == 2 and "float model" in res.output and res.output.strip().count("\n") == 0
