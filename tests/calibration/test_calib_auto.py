"""--method auto: ranges chosen by the error at the reading layer, tied groups jointly, fast searches exact enough."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from qdqsurgeon.calibration import calibrate
from qdqsurgeon.calibration.auto import AutoSelector, _fake_quant, _matmul, candidate_ranges, gate, layer_error
from qdqsurgeon.calibration.methods import (
    TensorStats,
    _kl_at,
    _kl_many,
    amax_entropy,
    amax_mse,
    amax_entropy_fast,
    amax_mse_fast,
    kl_curve,
    hist_sq_error,
    mse_curve,
)
from qdqsurgeon.cli import cli
from qdqsurgeon.examples import example_calibration, example_model

from tests.helpers import init, make_model


def _stats(x: np.ndarray) -> TensorStats:
    s = TensorStats("t", histogram=True)
    s.update(x)
    return s


def _conv_reader_model(w_outlier: float) -> onnx.ModelProto:
    """x [1,4,8,8] -> Relu -> r -> Conv(1x1, 8 out) -> y; input channel 0 carries the outliers."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4, 1, 1)).astype(np.float32)
    w[:, 0] = w_outlier
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w"], ["y"], name="conv")]
    return make_model(nodes, [("x", TensorProto.FLOAT, [None, 4, 8, 8])], [("y", TensorProto.FLOAT, [None, 8, 8, 8])],
                      [init("w", w)], opset=17)


def _outlier_data(batches: int = 8):
    rng = np.random.default_rng(1)
    out = []
    for _ in range(batches):
        x = np.abs(rng.standard_normal((1, 4, 8, 8))).astype(np.float32)
        x[0, 0] = np.abs(rng.standard_t(1.5, (8, 8)))  # channel 0: a heavy tail; the others stay below ~4
        out.append({"x": x})
    return out


def test_auto_scores_at_the_reading_layer():
    # The tensor is the same in both models; only the weights reading its outlier channel differ.
    # Tensor-level MSE would give both the same range; auto must not.
    data = _outlier_data()
    ignored = calibrate(_conv_reader_model(0.0), ["r"], data, "auto", progress=False)["r"]
    needed = calibrate(_conv_reader_model(3.0), ["r"], data, "auto", progress=False)["r"]
    absmax = max(float(d["x"].max()) for d in data)
    # channel 0 feeds nothing: clipping its tail costs nothing at the output, rounding the rest does
    assert ignored < 0.5 * absmax
    # channel 0 carries the output: much more of its tail must survive
    assert needed > 2 * ignored
    assert calibrate(_conv_reader_model(0.0), ["r"], data, "auto", progress=False)["r"] == ignored  # deterministic


def _concat_model() -> onnx.ModelProto:
    # a (small) and b (large) are Concat inputs read by a Conv: TensorRT needs one scale (P4).
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Relu", ["x1"], ["a"], name="ra"), helper.make_node("Relu", ["x2"], ["b"], name="rb"),
             helper.make_node("Concat", ["a", "b"], ["c"], axis=1, name="cat"),
             helper.make_node("Conv", ["c", "w"], ["y"], name="conv"),
             helper.make_node("Conv", ["a", "w2"], ["y2"], name="conv_a")]
    return make_model(nodes, [("x1", TensorProto.FLOAT, [None, 2, 6, 6]), ("x2", TensorProto.FLOAT, [None, 2, 6, 6])],
                      [("y", TensorProto.FLOAT, [None, 4, 4, 4]), ("y2", TensorProto.FLOAT, [None, 4, 6, 6])],
                      [init("w", rng.standard_normal((4, 4, 3, 3)).astype(np.float32)),
                       init("w2", rng.standard_normal((4, 2, 1, 1)).astype(np.float32))])


def _concat_data(batches: int, seed: int = 2) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x1": rng.standard_normal((1, 2, 6, 6)).astype(np.float32),
             "x2": 10 * rng.standard_normal((1, 2, 6, 6)).astype(np.float32)} for _ in range(batches)]


def test_tied_group_is_chosen_jointly():
    model = _concat_model()
    sel = AutoSelector(model)
    assert set(sel.members("c")) == {"a", "b", "c"}
    got = sel.select(["c", "a"], _concat_data(8), progress=False)
    assert sel.chosen["a"] == sel.chosen["b"] == sel.chosen["c"]  # one decision for the group
    if sel.chosen["c"] != sel.baseline:  # a departure: one range, covering b (the wide member)
        assert got["c"] == got["a"] == sel.decided["b"]
    else:  # kept at the baseline: each member its own percentile, which align-scales ties as for --method percentile
        assert got == calibrate(model, ["c", "a"], _concat_data(8), "percentile", progress=False)


def test_tied_group_ends_with_one_scale():
    import qdqsurgeon
    from qdqsurgeon.config import Config
    from qdqsurgeon.ranges import CalibrationRanges

    model = _concat_model()
    out = qdqsurgeon.optimize(model, ranges=CalibrationRanges(model, _concat_data(8), "auto", progress=False),
                              mode="ptq", config=Config(keep_output_layers=True)).model
    onnx.checker.check_model(out, full_check=True)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in out.graph.initializer}
    produced = {o: n for n in out.graph.node for o in n.output}
    scales = set()
    for n in out.graph.node:
        if n.op_type == "Concat":
            for i in n.input:  # each input is a DequantizeLinear's output
                scales.add(float(inits[produced[i].input[1]]))
    assert len(scales) == 1


def test_gate_departs_only_on_consistent_evidence():
    labels = ["max", "percentile 99.99", "mse"]
    rng = np.random.default_rng(11)
    base = 1.0 + 0.2 * rng.random(8)
    # mse wins on every fold by about 10 %: chosen
    errors = np.stack([base * 1.3, base, base * 0.9 + 0.001 * rng.random(8)])
    got, why = gate(labels, errors, "percentile 99.99")
    assert got == "mse" and why["reason"] == "consistent gain" and why["t"] > 3
    # noisy ties (the others are the baseline plus noise): departures at the test's level, 1 % per candidate
    noise = np.random.default_rng(12).standard_normal((1000, 2, 8)) * 0.05
    departed = sum(gate(labels, np.stack([base + n[0], base, base + n[1]]), "percentile 99.99")[0] != "percentile 99.99"
                   for n in noise)
    assert departed <= 40  # 2 x 1 % of 1000 expected; far more would mean the threshold is wrong
    # a large gain on one fold and small losses on the others: less error in total, not consistently
    errors = np.stack([base * 1.3, base, base * 1.02])
    errors[2, 3] = 0.01
    assert errors[2].sum() < errors[1].sum()
    assert gate(labels, errors, "percentile 99.99") == ("percentile 99.99", gate(labels, errors, "percentile 99.99")[1])
    # two folds are no evidence
    assert gate(labels, np.stack([base[:2] * 9, base[:2], base[:2] * 0.1]), "percentile 99.99")[0] == "percentile 99.99"
    # several pass: the least total error among them
    errors = np.stack([base * 0.8, base, base * 0.9])
    assert gate(labels, errors, "percentile 99.99")[0] == "max"


def test_consistent_winner_is_chosen_on_real_data():
    # Channel 0's heavy tail meets zero weights: clipping it costs nothing at the output on every batch,
    # while the percentile range wastes the grid on it. A narrower candidate wins on every fold.
    data = _outlier_data()
    sel = AutoSelector(_conv_reader_model(0.0))
    got = sel.select(["r"], data, progress=False)
    assert sel.chosen["r"] != sel.baseline
    # the model's only tensor: end to end (the model's output is that layer's) the model's method moves too
    assert sel.model_choice != sel.baseline and sel.model_evidence["reason"].startswith("end to end")
    assert got["r"] < calibrate(_conv_reader_model(0.0), ["r"], data, "percentile", progress=False)["r"]


def _three_readers_model() -> onnx.ModelProto:
    """Three Relu -> Conv(1x1) branches; input channel 0 of each carries the outliers and meets zero weights."""
    rng = np.random.default_rng(0)
    nodes, inits, outs = [], [], []
    for i in range(3):
        w = rng.standard_normal((8, 4, 1, 1)).astype(np.float32)
        w[:, 0] = 0.0
        nodes += [helper.make_node("Relu", [f"x{i}"], [f"r{i}"], name=f"relu{i}"),
                  helper.make_node("Conv", [f"r{i}", f"w{i}"], [f"y{i}"], name=f"conv{i}")]
        inits.append(init(f"w{i}", w))
        outs.append((f"y{i}", TensorProto.FLOAT, [None, 8, 8, 8]))
    return make_model(nodes, [(f"x{i}", TensorProto.FLOAT, [None, 4, 8, 8]) for i in range(3)], outs, inits, opset=17)


def test_model_method_moves_on_summed_evidence():
    # Every tensor prefers a narrower range on every fold: the model's method moves (end to end, held out) and the
    # tensors keep it, each at its own value, as that fixed method would give.
    data = [{f"x{i}": d["x"] * (i + 1) for i in range(3)} for d in _outlier_data()]
    model = _three_readers_model()
    sel = AutoSelector(model)
    got = sel.select(["r0", "r1", "r2"], data, progress=False)
    assert sel.model_choice != sel.baseline and sel.model_evidence["gain_db"][sel.model_choice] > 0
    assert all(sel.chosen[t] == sel.model_choice or sel.evidence[t]["reason"] == "consistent gain" for t in got)
    method = sel.model_choice.split()[0]
    if method in ("mse", "entropy", "max"):
        fixed = calibrate(model, ["r0"], data, method, progress=False)
        assert sel.chosen["r0"] != sel.model_choice or got["r0"] == pytest.approx(fixed["r0"], rel=1e-6)


def test_held_out_candidates_leave_the_fold_out():
    data = _outlier_data()
    sel = AutoSelector(_conv_reader_model(3.0))
    sel.select(["r"], data, progress=False)
    # pending again for the check (select decided it): re-collect
    sel2 = AutoSelector(_conv_reader_model(3.0))
    sel2._collect(["r"], data, 2048, False)
    labels = list(candidate_ranges(sel2._pending["r"].stats))
    for f in range(8):
        cands = dict(zip(labels, sel2._fold_candidates(["r"], labels, f)))
        others = max(float(np.maximum(d["x"], 0).max()) for i, d in enumerate(data) if i != f)
        assert cands["max"] == pytest.approx(others, rel=1e-6)


def test_departure_needs_held_out_confirmation(monkeypatch):
    # In-sample the narrow candidate wins on every fold; held out it is made to lose: the baseline is kept.
    sel = AutoSelector(_conv_reader_model(0.0))
    sel._collect(["r"], _outlier_data(), 2048, False)
    _group, _own, labels, _cands, errors = sel._scored("r")
    assert gate(labels, errors, sel.baseline)[0] != sel.baseline
    base = errors[labels.index(sel.baseline)]
    monkeypatch.setattr(sel, "_held_out", lambda name, compared: np.stack(
        [base if k == sel.baseline else 1.5 * base for k in compared]))
    best, why = sel._pick("r", sel.baseline)
    assert best == sel.baseline and why["reason"] == "not confirmed held out"


def test_no_evidence_is_the_percentile_method():
    # With one calibration batch there are no folds to compare: auto gives exactly the percentile ranges,
    # tied groups and network inputs included (so the optimized model is --method percentile's).
    import qdqsurgeon
    from qdqsurgeon.config import Config
    from qdqsurgeon.ranges import CalibrationRanges

    model = _concat_model()
    data = [{k: np.concatenate([d[k] for d in _concat_data(8)]) for k in ("x1", "x2")}]  # one batch of 8
    names = ["x1", "x2", "a", "b", "c"]
    sel = AutoSelector(model)
    assert sel.select(names, data, progress=False) == calibrate(model, names, data, "percentile", progress=False)
    assert set(sel.chosen.values()) == {sel.baseline}

    def optimized(method: str) -> bytes:
        out = qdqsurgeon.optimize(model, ranges=CalibrationRanges(model, data, method, progress=False), mode="ptq",
                                  config=Config(keep_output_layers=True))
        assert any(n.op_type == "QuantizeLinear" for n in out.model.graph.node)
        return out.model.SerializeToString()

    assert optimized("auto") == optimized("percentile")


def test_baseline_follows_the_configured_percentile():
    data = [{k: np.concatenate([d[k] for d in _concat_data(8)]) for k in ("x1", "x2")}]
    sel = AutoSelector(_concat_model(), percentile=99.9)
    assert sel.baseline == "percentile 99.9"
    assert sel.select(["c"], data, progress=False)["c"] == \
        calibrate(_concat_model(), ["c"], data, "percentile", percentile=99.9, progress=False)["c"]


def test_candidates_and_fast_searches():
    rng = np.random.default_rng(3)
    for x in (np.maximum(rng.standard_normal(200_000), 0) ** 1.5, rng.standard_t(3, 200_000)):
        s = _stats(x)
        cands = candidate_ranges(s)
        assert list(cands) == ["max", "percentile 99.9", "percentile 99.99", "percentile 99.999", "mse", "entropy"]
        assert cands["max"] == s.absmax and all(0 < v <= s.absmax for v in cands.values())
        step = s.used_bins() // 16
        # the coarse-to-fine MSE lands where the expected error is within 1 % of the exhaustive search's
        exact, fast = amax_mse(s), amax_mse(s, step=step)
        e_exact, e_fast = hist_sq_error(s, np.array([exact, fast]))
        assert e_fast <= 1.01 * e_exact
        assert 0 < amax_entropy(s, step=step) <= s.absmax
        # the vectorized KL is the loop's KL
        h = s.hist.astype(np.float64)
        h[0] = h[1]
        used, total = s.used_bins(), h.sum()
        tail = total - np.cumsum(h)
        idx = np.arange(128, used + 1, 97)
        loop = np.array([_kl_at(h, tail, total, i, 128) for i in idx])
        vec = _kl_many(h[:used], total, idx, 128)
        finite = np.isfinite(loop)
        assert np.array_equal(finite, np.isfinite(vec))
        np.testing.assert_allclose(vec[finite], loop[finite], rtol=1e-9)


def test_mse_curve_is_the_exhaustive_search():
    # auto's MSE candidate: the whole error curve from prefix sums, so no local minimum of a bumpy
    # curve (a sparse tail) can stop the search; its minimum is the exhaustive search's within 1 %.
    rng = np.random.default_rng(5)
    sparse = np.concatenate([np.abs(rng.standard_normal(100_000)), 4 + 5 * rng.random(40)])
    for x in (np.maximum(rng.standard_normal(200_000), 0) ** 1.5, rng.standard_t(3, 200_000), sparse):
        s = _stats(x)
        t, err = mse_curve(s)
        assert t.size == s.used_bins()
        # every point is hist_sq_error's model within a few percent (exact below 8 levels, s²/12 above)
        pick = np.linspace(0, t.size - 1, 40).astype(int)
        np.testing.assert_allclose(err[pick], hist_sq_error(s, t[pick]), rtol=0.05)
        exact, fast = amax_mse(s), amax_mse_fast(s)
        e_exact, e_fast = hist_sq_error(s, np.array([exact, fast]))
        assert e_fast <= 1.01 * e_exact


def test_kl_curve_is_the_per_threshold_kl():
    rng = np.random.default_rng(7)
    for x in (np.maximum(rng.standard_normal(200_000), 0) ** 1.5, rng.standard_t(3, 200_000)):
        s = _stats(x)
        counts, kl = kl_curve(s)
        h = s.hist.astype(np.float64)
        h[0] = h[1]
        used = s.used_bins()
        ref = _kl_many(h[:used], h.sum(), counts, 128)
        finite = np.isfinite(ref)
        assert np.array_equal(finite, np.isfinite(kl))
        np.testing.assert_allclose(kl[finite], ref[finite], rtol=1e-9, atol=1e-12)
        # the sampled search lands on (or next to) the exhaustive minimum's divergence
        fast = amax_entropy_fast(s)
        at = dict(zip(counts.tolist(), kl.tolist()))[int(round(fast / s.width))]
        assert at <= kl[finite].min() + 0.01
        assert amax_entropy(s) == float(counts[int(np.argmin(kl))]) * s.width


def test_layer_error_batched_equals_one_candidate_at_a_time():
    rng = np.random.default_rng(6)
    rows = np.abs(rng.standard_t(2, (1, 200, 36))).astype(np.float32)
    w = rng.standard_normal((1, 36, 16)).astype(np.float32)
    ref = _matmul(rows, w)
    amaxes = [0.5, 2.0, 5.0, float(rows.max())]
    energy = float(np.sum(np.square(ref, dtype=np.float64)))
    one = [float(np.sum(np.square(_matmul(_fake_quant(rows, a), w) - ref, dtype=np.float64))) / energy for a in amaxes]
    np.testing.assert_allclose(layer_error(rows, w, ref, amaxes), one, rtol=1e-5)
    grouped = np.concatenate([rows, rows[:, ::-1]])  # two groups take the per-candidate path
    wg = np.concatenate([w, w])
    np.testing.assert_allclose(layer_error(grouped, wg, _matmul(grouped, wg), amaxes), one, rtol=1e-5)


def test_merged_stats_equal_one_pass():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal(5000) * 3, rng.standard_normal(5000) * 50
    one = TensorStats("t", histogram=True)
    one.update(a)
    one.update(b)
    merged = _stats(a).merged(_stats(b))
    assert np.array_equal(merged.hist, one.hist) and merged.width == one.width and merged.absmax == one.absmax


def test_optimize_method_auto_cli(tmp_path):
    out = tmp_path / "auto.onnx"
    res = CliRunner().invoke(cli, ["optimize", str(example_model()), str(out), "--calib", str(example_calibration()),
                                   "--method", "auto", "--check", "-q"])
    assert res.exit_code == 0, res.output
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    # a second run changes nothing (learned scales kept on the fix path)
    again = tmp_path / "again.onnx"
    res = CliRunner().invoke(cli, ["optimize", str(out), str(again), "--calib", str(example_calibration()),
                                   "--method", "auto", "-q"])
    assert res.exit_code == 0, res.output


def test_unknown_method_is_one_line():
    res = CliRunner().invoke(cli, ["optimize", str(example_model()), "/tmp/x.onnx", "--method", "best"])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "best" in res.output


@pytest.mark.parametrize("method", ["auto"])
def test_auto_through_build_ranges(method):
    import qdqsurgeon

    model = qdqsurgeon.load(example_model())
    ranges = qdqsurgeon.build_ranges(model, calib=example_calibration(), method=method, progress=False)
    first = ranges(["input"])
    assert first and ranges.runs == 1
    # later requests for tensors the first pass prefetched (Add inputs) need no second pass
    adds = [n for n in model.graph.node if n.op_type == "Add"]
    if adds:
        ranges([adds[0].input[0]])
        assert ranges.runs in (1, 2)


def test_conv_rows_are_im2col_patches():
    # strided, dilated, padded: every sampled row is the zero-padded input window of its output position
    from qdqsurgeon.calibration.auto import _Reader

    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 3, 9, 11)).astype(np.float32)
    w = rng.standard_normal((1, 27, 4)).astype(np.float32)
    conv = {"kernel": [3, 3], "strides": [2, 1], "dilations": [1, 2], "pads": [1, 2, 1, 2], "auto_pad": "NOTSET", "group": 1}
    rows = _Reader("n", "conv", w, w, 50, conv)._conv_rows(x, np.random.default_rng(1), 50)
    oh, ow = 5, 11
    pos = np.sort(np.random.default_rng(1).integers(0, 2 * oh * ow, size=50))
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (2, 2)))
    expected = []
    for p in pos:
        b, rest = divmod(int(p), oh * ow)
        yi, xi = divmod(rest, ow)
        expected.append(xp[b, :, yi * 2:yi * 2 + 3, xi:xi + 5:2].ravel())
    assert rows.shape == (1, 50, 27)
    np.testing.assert_array_equal(rows[0], np.array(expected))


def test_end_to_end_score_is_the_held_out_fake_quantized_model(monkeypatch):
    # The model's method is scored by running a fake-quantized copy: each calibration batch with the ranges found on
    # the other folds, against the float outputs. Recomputed here in numpy for max: Relu -> Conv(1x1) is an einsum.
    from qdqsurgeon.calibration import auto
    from qdqsurgeon.quant import fake_quant, scale_from_amax, weight_scales

    monkeypatch.setattr(auto, "_E2E_SCREEN", 8)  # every method on every fold
    model, data = _conv_reader_model(3.0), _outlier_data()
    sel = AutoSelector(model)
    sel._first_request = ["r"]
    sel._collect(["r"], data, 2048, False)
    labels = ["max", sel.baseline]
    noise, signal, screened = sel._end_to_end(labels)
    assert screened == []
    assert noise.shape == (2, 8, 1) and signal.shape == (8, 1)
    w = onnx.numpy_helper.to_array(model.graph.initializer[0])[:, :, 0, 0]
    wq = fake_quant(w, weight_scales(w, 0), 0)
    for f, d in enumerate(data):
        r = np.maximum(d["x"], 0)
        amax = max(float(np.maximum(o["x"], 0).max()) for i, o in enumerate(data) if i != f)
        s = scale_from_amax(amax)
        got = np.einsum("oc,nchw->nohw", wq, np.clip(np.rint(r / s), -128, 127) * s)
        ref = np.einsum("oc,nchw->nohw", w, r)
        assert signal[f, 0] == pytest.approx(float(np.sum(ref.astype(np.float64) ** 2)), rel=1e-4)
        assert noise[0, f, 0] == pytest.approx(float(np.sum((got - ref).astype(np.float64) ** 2)), rel=1e-3)
    # the model's method is the end-to-end pick, and a tensor kept at it gets that fixed method's range
    sel = AutoSelector(model)
    sel.select(["r"], data, progress=False)
    assert "gain_db" in sel.model_evidence and sel.model_evidence["reason"].startswith("end to end")
    if sel.chosen["r"] == sel.model_choice and sel.model_choice == "max":
        assert sel.decided["r"] == pytest.approx(max(float(np.maximum(d["x"], 0).max()) for d in data))


def test_end_to_end_pick_is_gated_on_the_worst_output():
    from qdqsurgeon.calibration.auto import pick_end_to_end

    labels = ["max", "percentile 99.99", "mse"]
    rng = np.random.default_rng(13)
    signal = np.ones((8, 2))
    noise = np.stack([1e-3 * (1 + 0.2 * rng.random((8, 2))) for _ in labels])
    noise[:, :, 1] *= 0.1  # output 0 is the worst for every method
    noise[0, :, 1] *= 0.5  # max better on output 1 only: the worst output is the same, no departure
    assert pick_end_to_end(labels, noise, signal, [], "percentile 99.99")[0] == "percentile 99.99"
    moved = noise.copy()
    moved[2, :, 0] = 0.7 * noise[1, :, 0]  # mse 1.5 dB better on the worst output, on every fold: the model moves
    got, why = pick_end_to_end(labels, moved, signal, [], "percentile 99.99")
    assert got == "mse" and why["reason"] == "end to end: consistent gain"
    assert why["gain_db"]["mse"] == pytest.approx(1.55, abs=0.01)
    lucky = noise.copy()
    lucky[2, 3, 0] = 0.0  # a large gain on one fold only: more held-out SQNR in total, not consistently
    got, why = pick_end_to_end(labels, lucky, signal, [], "percentile 99.99")
    assert why["gain_db"]["mse"] > 0 and got == "percentile 99.99"
    # screened: max and mse worse on the first three folds, not run further; the baseline stopped there too
    screened = noise.copy()
    screened[[0, 2]] = 2.0 * noise[1]
    screened[:, 3:] = np.nan
    got, why = pick_end_to_end(labels, screened, signal, ["max", "mse"], "percentile 99.99")
    assert got == "percentile 99.99" and why["folds"] == 3 and why["reason"] == "end to end: no method better on the first folds"
    assert why["gain_db"]["mse"] == pytest.approx(-3.01, abs=0.01)
    # one method screened out, one run on: the gate compares the baseline with the survivor on every fold
    partly = moved.copy()
    partly[0, 3:] = np.nan
    got, why = pick_end_to_end(labels, partly, signal, ["max"], "percentile 99.99")
    assert got == "mse" and why["folds"] == 8


def test_end_to_end_falls_back_to_the_per_layer_gate():
    # A bfloat16-free model whose copy cannot be scored (no float output kept): the per-layer gate decides, as before.
    sel = AutoSelector(_conv_reader_model(0.0))
    sel._runnable_outputs = lambda: []  # noqa: E731 - what a model over _E2E_MAX_NODES or with bfloat16 gets
    sel.select(["r"], _outlier_data(), progress=False)
    assert "gain_db" not in sel.model_evidence and sel.model_evidence["reason"] == "consistent gain"


@pytest.mark.slow
def test_end_to_end_copy_scores_what_the_placement_gives(tmp_path):
    # The copy the model's method is chosen on (Q/DQ on the first request, weights fake-quantized, scales fed) must
    # score a method as the placed model does: ResNet-18 with the percentile ranges, on the calibration photos.
    import onnxruntime as ort

    import qdqsurgeon
    from qdqsurgeon.calibration.auto import _fake_quant_copy
    from qdqsurgeon.check import sqnr_db
    from qdqsurgeon.config import Config
    from qdqsurgeon.quant import scale_from_amax

    from tests.helpers import FP32, MODELS, need_shared

    need_shared()
    photos = sorted(p for p in (MODELS / "images").iterdir() if p.suffix.lower() in (".jpg", ".png"))[:8]
    for p in photos:
        (tmp_path / p.name).symlink_to(p)
    pre = "size=32,scale=1/255,mean=0.5/0.5/0.5,std=0.5/0.5/0.5"
    model = qdqsurgeon.load(FP32 / "resnet18_cifar10.onnx", opset=13)
    auto_ranges = qdqsurgeon.build_ranges(model, calib=tmp_path, preprocess=pre, method="auto", progress=False)
    qdqsurgeon.optimize(model, ranges=auto_ranges, mode="ptq")
    sel = auto_ranges._auto
    assert "gain_db" in sel.model_evidence  # chosen end to end
    fixed = qdqsurgeon.build_ranges(model, calib=tmp_path, preprocess=pre, method="percentile", progress=False)
    placed = qdqsurgeon.optimize(model, ranges=fixed, mode="ptq", config=Config(bias_correction=False)).model
    tensors = list(sel._first_request)
    amax = fixed(tensors)
    copy, names = _fake_quant_copy(sel._runnable, tensors, sel._fake_quant_weights(set(tensors)))

    def worst_sqnr(m: onnx.ModelProto, extra: dict) -> float:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        s = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        outs = list(sel._reference)
        feeds = [i.name for i in s.get_inputs() if i.name not in extra]
        sig, err = np.zeros(len(outs)), np.zeros(len(outs))
        for i, batch in enumerate(sel._data):
            got = s.run(outs, {**{k: batch[k] for k in feeds}, **extra})
            for j, o in enumerate(outs):
                r = sel._reference[o][i].astype(np.float64)
                sig[j] += np.sum(r * r)
                err[j] += np.sum((r - got[j]) ** 2)
        return min(sqnr_db(a, b) for a, b in zip(sig, err))

    copied = worst_sqnr(copy, {n: np.asarray(scale_from_amax(amax[t])) for n, t in zip(names, tensors)})
    assert copied == pytest.approx(worst_sqnr(placed, {}), abs=1.0)


def test_data_read_once_is_scored_per_layer():
    # A generator cannot be run again for the end-to-end score: the per-layer gate decides, as before.
    sel = AutoSelector(_conv_reader_model(0.0))
    data = _outlier_data()
    got = sel.select(["r"], (d for d in data), progress=False)
    assert "gain_db" not in sel.model_evidence and got["r"] > 0
