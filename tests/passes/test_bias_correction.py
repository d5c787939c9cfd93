"""bias-correction: INT8 layers' float biases absorb the mean output shift of their own rounding (PTQ with data)."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdqsurgeon
from qdqsurgeon.config import Config
from qdqsurgeon.examples import example_calibration, example_model
from qdqsurgeon.passes.audit import AuditInstrument
from qdqsurgeon.passes.bias_correction import NO_DATA_MESSAGE, _pads, _rounding_error, _tap_sums, _transposed_tap_sums


def _naive_tap_sums(x, geometry):
    kernel, strides, dilations, _, _, _ = geometry
    sp = len(kernel)
    ins = x.shape[2:]
    pads = _pads(ins, geometry)
    xp = np.pad(x.astype(np.float64), [(0, 0), (0, 0)] + [(pads[i], pads[i + sp]) for i in range(sp)])
    outs = [(ins[i] + pads[i] + pads[i + sp] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1 for i in range(sp)]
    res = np.empty((x.shape[1], *kernel))
    for tap in np.ndindex(*kernel):
        sl = tuple(slice(tap[i] * dilations[i], tap[i] * dilations[i] + (outs[i] - 1) * strides[i] + 1, strides[i])
                   for i in range(sp))
        res[(slice(None), *tap)] = xp[(slice(None), slice(None), *sl)].sum(axis=tuple([0, *range(2, 2 + sp)]))
    return res, x.shape[0] * int(np.prod(outs))


def _ints(rng, low, high, n):
    return tuple(int(v) for v in rng.integers(low, high, n))


def _geometries(seed: int, draws: int, transposed: bool = False):
    """Random (input [2, 3, *spatial], geometry) pairs: 1-3 spatial axes (ConvTranspose: 1-2), every stride,
    dilation and padding (Conv: every auto_pad too; ConvTranspose: output_padding), inputs of up to 11 (6) per
    axis. A Conv geometry whose window does not fit its padded input is not yielded (ConvTranspose's are)."""
    rng = np.random.default_rng(seed)
    for _ in range(draws):
        sp = int(rng.integers(1, 3 if transposed else 4))
        kernel = _ints(rng, 1, 5 if transposed else 6, sp)
        strides, dilations = _ints(rng, 1, 4, sp), _ints(rng, 1, 3, sp)
        if transposed:
            pads = _ints(rng, 0, 3, 2 * sp)
            out_pad = tuple(int(rng.integers(0, s)) for s in strides)
            ins = _ints(rng, 1, 7, sp)
            geometry = (kernel, strides, dilations, pads, "NOTSET", 1, out_pad)
        else:
            ins = _ints(rng, 1, 12, sp)
            auto_pad = str(rng.choice(["NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
            geometry = (kernel, strides, dilations, _ints(rng, 0, 4, 2 * sp), auto_pad, 1)
            pads = _pads(ins, geometry)
            if any(ins[i] + pads[i] + pads[i + sp] - (kernel[i] - 1) * dilations[i] - 1 < 0 for i in range(sp)):
                continue
        yield rng.normal(size=(2, 3, *ins)).astype(np.float32), geometry


def test_tap_sums_match_a_padded_convolution_window():
    """The per-tap means of the zero-padded input are exact for every stride, dilation, padding and auto_pad."""
    checked = 0
    for x, geometry in _geometries(0, 300):
        got, n = _tap_sums(x, geometry)
        want, m = _naive_tap_sums(x, geometry)
        assert n == m
        np.testing.assert_allclose(got, want, atol=1e-4)
        checked += 1
    assert checked > 150


def test_tap_sums_rows_first_are_the_same_to_the_bit():
    """Summing an axis moved to the front adds the same rows in the same order as summing it in place: the sums
    (so the corrected biases) are the same bits, on the random geometries and on feature-map shapes of real
    models (large channel counts, a trailing axis of 1 that numpy would sum pairwise, one sample or several)."""
    cases = [(x * 100, g) for x, g in _geometries(11, 400)]
    rng = np.random.default_rng(12)
    for shape, kernel, strides, pads in [((1, 144, 56, 56), (3, 3), (1, 1), (1, 1, 1, 1)),
                                         ((1, 672, 7, 7), (5, 5), (1, 1), (2, 2, 2, 2)),
                                         ((4, 32, 40, 40), (3, 3), (2, 2), (0, 1, 0, 1)),
                                         ((1, 16, 300, 1), (7, 1), (1, 1), (3, 0, 3, 0)),
                                         ((2, 8, 9, 200), (1, 9), (1, 2), (0, 4, 0, 4)),
                                         ((1, 12, 6, 10, 10), (3, 3, 3), (1, 2, 1), (1, 1, 1, 1, 1, 1))]:
        sp = len(kernel)
        cases.append((rng.normal(0.5, 3.0, shape).astype(np.float32), (kernel, strides, (1,) * sp, pads, "NOTSET", 1)))
    moved = 0
    for x, geometry in cases:
        fast, n = _tap_sums(x, geometry)
        plain, m = _tap_sums(x, geometry, rows_first=False)
        assert n == m and fast.tobytes() == plain.tobytes(), geometry
        moved += len(geometry[0]) > 1 and geometry[0][0] > 1
    assert moved > 100


def test_rounding_error_leaves_saturated_elements_out():
    x = np.array([0.013, -0.011, 5.0, -5.0, 0.0], np.float32)
    d = _rounding_error(x, (0.02, 0.0, -128, 127))
    np.testing.assert_allclose(d, [0.02 - 0.013, -0.02 + 0.011, 0.0, 0.0, 0.0], atol=1e-7)


def _conv_model(bias: str = "bias") -> onnx.ModelProto:
    """Conv(3->8, 3x3, stride 2, pad 1) -> Relu -> Conv(8->4, 1x1) -> output: the first conv is INT8 (the second
    feeds the output and stays float, P9). ``bias``: "bias", "none" (no bias input) or "bn" (no bias, then a
    BatchNormalization, as PaddlePaddle exports it)."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.zeros(4, np.float32), "b2"),
    ]
    first = [helper.make_node("Conv", ["x", "w1", "b1"] if bias == "bias" else ["x", "w1"], ["y1"], name="conv1",
                              pads=[1, 1, 1, 1], strides=[2, 2])]
    if bias == "bn":
        first = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], strides=[2, 2]),
                 helper.make_node("BatchNormalization", ["c1", "g", "beta", "mu", "var"], ["y1"], name="bn1")]
        inits += [numpy_helper.from_array(v.astype(np.float32), n) for n, v in
                  (("g", rng.uniform(0.5, 2, 8)), ("beta", rng.normal(0, 0.1, 8)), ("mu", rng.normal(0, 0.2, 8)),
                   ("var", rng.uniform(0.5, 2, 8)))]
    nodes = [
        *first,
        helper.make_node("Relu", ["y1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="conv2"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _matmul_model() -> onnx.ModelProto:
    """MatMul(32->24) + Add(bias) -> Relu -> MatMul(24->8) + Add -> output: the first MatMul is INT8."""
    rng = np.random.default_rng(2)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.2, (32, 24)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.1, 24).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(0, 0.2, (24, 8)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.zeros(8, np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["y1"], name="add1"),
        helper.make_node("Relu", ["y1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "w2"], ["m2"], name="mm2"),
        helper.make_node("Add", ["m2", "b2"], ["y"], name="add2"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _calib(tmp_path, shape, n=8, constant=True):
    """Random inputs with constant regions (one value per channel over a block: a coherent rounding error)."""
    rng = np.random.default_rng(3)
    x = rng.normal(0.3, 1.0, (n, *shape[1:])).astype(np.float32)
    if not constant:
        pass
    elif len(shape) == 4:
        x[:, :, :8, :] = np.resize(np.array([0.417, -0.23, 0.151], np.float32), shape[1])[None, :, None, None]
    else:
        x[:, :3, :] = 0.417
    path = tmp_path / "calib.npz"
    np.savez(path, x=x)
    return path, x


def _mean_output(model, tensor, x, axis):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(helper.make_empty_tensor_value_info(tensor))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    outs = np.concatenate([sess.run([tensor], {"x": x[i:i + 1]})[0] for i in range(len(x))]).astype(np.float64)
    return outs.mean(axis=tuple(i for i in range(outs.ndim) if i != axis))


@pytest.mark.parametrize("rounding", ["input", "all"])
@pytest.mark.parametrize("kind", ["conv", "conv-bn", "conv-nobias", "matmul"])
def test_corrected_layer_output_mean_matches_float(kind, rounding, tmp_path):
    """With max ranges nothing saturates, so with its rounding term the correction is exact: on the calibration
    data the INT8 layer's mean output per channel equals the float layer's (it did not before)."""
    model = _conv_model({"conv": "bias", "conv-bn": "bn", "conv-nobias": "none"}[kind]) if kind != "matmul" else _matmul_model()
    calib, x = _calib(tmp_path, [1, 3, 16, 16] if kind != "matmul" else [1, 6, 32])
    # the tensor after the corrected constant; the node holding it (a MatMul's bias is its Add's, a BN's mean)
    tensor, axis, op = {"matmul": ("y1", 2, "add1"), "conv-bn": ("y1", 1, "bn1")}.get(kind, ("y1", 1, "conv1"))
    ranges = qdqsurgeon.build_ranges(model, calib=calib, method="max", progress=False)
    plain = qdqsurgeon.optimize(model, ranges=ranges, config=Config(bias_correction=False), analyze=False)
    res = qdqsurgeon.optimize(model, ranges=ranges, instruments=[AuditInstrument()],
                              config=Config(bias_correction=True, bias_correction_rounding=rounding))
    want = _mean_output(model, tensor, x, axis)
    before = _mean_output(plain.model, tensor, x, axis)
    after = _mean_output(res.model, tensor, x, axis)
    assert np.max(np.abs(before - want)) > 1e-3  # there was a shift to remove
    assert np.max(np.abs(after - want)) < 1e-5 * max(1.0, np.max(np.abs(want)))
    changes = [c for c in res.changes if c.pass_name == "bias-correction"]
    # the held-out check's verdict, then the one corrected layer
    assert [(c.kind, c.rule, c.node) for c in changes] == [("note", "V4", "<model>"), ("constant", "V4", op)]
    assert changes[0].detail.startswith("applied: held out on 8 folds")
    assert "bias correction of" in changes[1].detail
    onnx.checker.check_model(res.model, full_check=True)
    # only a float initializer changed: same nodes, same Q/DQ parameters
    assert [n.op_type for n in res.model.graph.node] == [n.op_type for n in plain.model.graph.node]


@pytest.mark.parametrize("kind", ["conv", "matmul"])
def test_default_removes_the_weight_rounding_shift(kind, tmp_path):
    """By default the correction is the weight term only: on inputs without constant regions (activation
    rounding averages out) most of the mean shift goes; with the rounding term as well (first layer) all of it."""
    model = _conv_model() if kind == "conv" else _matmul_model()
    calib, x = _calib(tmp_path, [1, 3, 16, 16] if kind == "conv" else [1, 6, 32], constant=False)
    axis = 1 if kind == "conv" else 2
    ranges = qdqsurgeon.build_ranges(model, calib=calib, method="max", progress=False)
    want = _mean_output(model, "y1", x, axis)
    err = {}
    # the correction's arithmetic: without the held-out check (folds=1), which may refuse a correction of random data
    for label, config in (("off", Config(bias_correction=False)),
                          ("default", Config(bias_correction=True, bias_correction_folds=1)),
                          ("input", Config(bias_correction=True, bias_correction_rounding="input", bias_correction_folds=1))):
        out = qdqsurgeon.optimize(model, ranges=ranges, config=config, analyze=False).model
        err[label] = float(np.sqrt(np.mean((_mean_output(out, "y1", x, axis) - want) ** 2)))
    assert err["default"] < 0.5 * err["off"]
    assert err["input"] < 1e-5 * max(1.0, float(np.max(np.abs(want))))


ON = Config(bias_correction=True)


def test_on_by_default_where_the_check_passes(tmp_path):
    """With real calibration data the default is the explicit --bias-correction (held-out check included): the
    example model is corrected; data the check refuses (input means flipping between folds) is not."""
    model = qdqsurgeon.load(example_model())
    ranges = qdqsurgeon.build_ranges(model, calib=example_calibration(), progress=False)
    res = qdqsurgeon.optimize(model, ranges=ranges, analyze=False)
    on = qdqsurgeon.optimize(model, ranges=ranges, analyze=False, config=ON)
    assert res.model.SerializeToString() == on.model.SerializeToString()
    assert [c.kind for c in res.changes if c.pass_name == "bias-correction"][:2] == ["note", "constant"]
    small = _conv_model()
    alternating = qdqsurgeon.build_ranges(small, calib=_alternating_calib(tmp_path, [1, 3, 16, 16]), progress=False)
    refused = qdqsurgeon.optimize(small, ranges=alternating, analyze=False)
    assert [c.detail.split(":")[0] for c in refused.changes if c.pass_name == "bias-correction"] == ["not applied"]


def test_example_ptq_deterministic_idempotent_and_fix_path_untouched():
    model = qdqsurgeon.load(example_model())
    ranges = qdqsurgeon.build_ranges(model, calib=example_calibration(), progress=False)
    a = qdqsurgeon.optimize(model, ranges=ranges, analyze=False, config=ON)
    b = qdqsurgeon.optimize(model, ranges=qdqsurgeon.build_ranges(model, calib=example_calibration(), progress=False),
                            analyze=False, config=ON)
    assert a.model.SerializeToString() == b.model.SerializeToString()
    notes = [c for c in a.changes if c.pass_name == "bias-correction" and c.kind == "note"]
    assert [c.detail.split(":")[0] for c in notes] == ["applied"]  # the held-out check's verdict, once
    corrected = [c for c in a.changes if c.pass_name == "bias-correction" and c.kind != "note"]
    assert corrected and all(c.kind == "constant" and c.rule == "V4" for c in corrected)
    assert len({c.node for c in corrected}) == len(corrected)  # one entry per layer
    onnx.checker.check_model(a.model, full_check=True)
    # a second optimize is the fix path: it changes nothing, with or without calibration data
    again = qdqsurgeon.optimize(a.model, analyze=False, config=ON)
    assert again.mode == "fix" and [c for c in again.changes if c.kind != "note"] == []
    with_data = qdqsurgeon.optimize(a.model, ranges=ranges, analyze=False, config=ON)
    assert not [c for c in with_data.changes if c.pass_name == "bias-correction"]


def test_no_correction_without_real_data_or_when_off(caplog):
    model = qdqsurgeon.load(example_model())
    rnd = qdqsurgeon.build_ranges(model, calib_random=4, progress=False)
    with caplog.at_level("WARNING", logger="qdqsurgeon.passes.bias_correction"):
        res = qdqsurgeon.optimize(model, ranges=rnd, analyze=False, config=ON)
    # asked for with random data: nothing corrected, and said once (a warning and a change-log note)
    changes = [c for c in res.changes if c.pass_name == "bias-correction"]
    assert [(c.kind, c.node, c.detail) for c in changes] == [("note", "<model>", NO_DATA_MESSAGE)]
    assert [r.getMessage() for r in caplog.records if r.name.endswith("bias_correction")] == [NO_DATA_MESSAGE]
    plain = qdqsurgeon.optimize(model, ranges=rnd, analyze=False, config=Config(bias_correction=False))
    assert res.model.SerializeToString() == plain.model.SerializeToString()
    caplog.clear()
    with caplog.at_level("WARNING", logger="qdqsurgeon.passes.bias_correction"):
        default = qdqsurgeon.optimize(model, ranges=rnd, analyze=False)  # not asked for: silent
    assert not [c for c in default.changes if c.pass_name == "bias-correction"] and not caplog.records
    ranges = qdqsurgeon.build_ranges(model, calib=example_calibration(), progress=False)
    off = qdqsurgeon.optimize(model, ranges=ranges, config=Config(bias_correction=False), analyze=False)
    assert not [c for c in off.changes if c.pass_name == "bias-correction"]
    on = qdqsurgeon.optimize(model, ranges=ranges, analyze=False, config=ON)
    # the placement is the same: only float bias initializers differ
    assert [(n.op_type, list(n.input)[:2]) for n in on.model.graph.node] == \
        [(n.op_type, list(n.input)[:2]) for n in off.model.graph.node]


def test_cli_switch(tmp_path):
    from click.testing import CliRunner

    from qdqsurgeon.cli import cli

    outs = {}
    for i, flag in enumerate(([], ["--bias-correction"], ["--no-bias-correction"])):
        out = tmp_path / f"out{i}.onnx"
        r = CliRunner().invoke(cli, ["optimize", str(example_model()), str(out), "--calib", str(example_calibration()),
                                      "-q", *flag])
        assert r.exit_code == 0, r.output
        outs[i] = {t.name for t in onnx.load(str(out)).graph.initializer}
    assert [any("bias_corrected" in n for n in outs[i]) for i in range(3)] == [True, True, False]  # on by default


def test_cli_says_once_that_random_data_gives_no_correction(tmp_path):
    """`optimize --bias-correction --calib-random N` used to do nothing silently: one warning line on stderr now,
    and the output is the one without the flag."""
    from click.testing import CliRunner

    from qdqsurgeon.cli import cli

    runs = {}
    for flag in ("--bias-correction", None):
        out = tmp_path / f"{flag}.onnx"
        r = CliRunner().invoke(cli, ["optimize", str(example_model()), str(out), "--calib-random", "4",
                                                      "-q", *([flag] if flag else [])])
        assert r.exit_code == 0, r.output + r.stderr
        runs[flag] = (r.stderr, onnx.load(str(out)).SerializeToString())
    stderr, model = runs["--bias-correction"]
    assert [line for line in stderr.splitlines() if "bias correction" in line] == [f"WARNING: {NO_DATA_MESSAGE}"]
    assert "bias correction" not in runs[None][0]
    assert model == runs[None][1]


def _alternating_calib(tmp_path, shape):
    """Calibration samples whose mean flips sign from one batch to the next: fold 0 (even batches) and fold 1 (odd
    batches) of the held-out check see opposite input means, so a shift fitted on one is wrong on the other."""
    rng = np.random.default_rng(5)
    x = rng.normal(0, 0.3, (8, *shape[1:])).astype(np.float32)
    x[0::2] += 1.0
    x[1::2] -= 1.0
    path = tmp_path / "alternating.npz"
    np.savez(path, x=x)
    return path


@pytest.mark.parametrize("kind", ["conv", "matmul"])
def test_held_out_check_refuses_a_correction_the_folds_disagree_on(kind, tmp_path):
    """The correction is applied only if, fitted on some batches of the calibration data, it improves the model's
    outputs on the others: with input means that flip between the folds it makes them worse, so nothing changes
    and the change log says why (with the two SQNRs); ``bias_correction_folds=1`` (no check) still corrects."""
    model = _conv_model() if kind == "conv" else _matmul_model()
    calib = _alternating_calib(tmp_path, [1, 3, 16, 16] if kind == "conv" else [1, 6, 32])
    ranges = qdqsurgeon.build_ranges(model, calib=calib, method="max", progress=False)
    plain = qdqsurgeon.optimize(model, ranges=ranges, config=Config(bias_correction=False), analyze=False)
    res = qdqsurgeon.optimize(model, ranges=ranges, config=ON, analyze=False)
    changes = [c for c in res.changes if c.pass_name == "bias-correction"]
    assert [(c.kind, c.node) for c in changes] == [("note", "<model>")]
    assert changes[0].detail.startswith("not applied: held out on 8 folds")
    # without it, with it, with half of it (tried since the full one did not help): both worse
    without, *with_ = (float(v) for v in re.findall(r"([-\d.]+) dB", changes[0].detail))
    assert len(with_) == 2 and max(with_) < without and "at 0.5x" in changes[0].detail
    assert res.model.SerializeToString() == plain.model.SerializeToString()
    unchecked = qdqsurgeon.optimize(model, ranges=ranges, config=Config(bias_correction=True, bias_correction_folds=1),
                                    analyze=False)
    assert [c.kind for c in unchecked.changes if c.pass_name == "bias-correction"] == ["constant"]


def test_held_out_check_needs_a_batch_per_fold(tmp_path):
    """One calibration batch cannot be split into folds: no correction, and a note saying so."""
    model = _conv_model()
    calib, _ = _calib(tmp_path, [1, 3, 16, 16], n=1)
    ranges = qdqsurgeon.build_ranges(model, calib=calib, method="max", progress=False)
    res = qdqsurgeon.optimize(model, ranges=ranges, config=ON, analyze=False)
    changes = [c for c in res.changes if c.pass_name == "bias-correction"]
    assert [c.kind for c in changes] == ["note"]
    assert "has 1 batch, too few" in changes[0].detail


def _naive_transposed_tap_sums(x, geometry):
    kernel, strides, dilations, pads, _, _, out_pad = geometry
    sp = len(kernel)
    ins = x.shape[2:]
    outs = [strides[i] * (ins[i] - 1) + out_pad[i] + (kernel[i] - 1) * dilations[i] + 1 - pads[i] - pads[i + sp]
            for i in range(sp)]
    res = np.zeros((x.shape[1], *kernel))
    for tap in np.ndindex(*kernel):
        for pos in np.ndindex(*ins):
            o = [pos[i] * strides[i] + tap[i] * dilations[i] - pads[i] for i in range(sp)]
            if all(0 <= o[i] < outs[i] for i in range(sp)):
                res[(slice(None), *tap)] += x[(slice(None), slice(None), *pos)].sum(axis=0)
    return res, x.shape[0] * int(np.prod(outs))


def test_transposed_tap_sums_match_a_scatter():
    """ConvTranspose: each tap's sum is over the input positions whose output lands inside the (cropped) output."""
    checked = 0
    for x, geometry in _geometries(7, 200, transposed=True):
        want, m = _naive_transposed_tap_sums(x, geometry)
        if m <= 0:
            continue
        got, n = _transposed_tap_sums(x, geometry)
        assert n == m
        np.testing.assert_allclose(got, want, atol=1e-4)
        checked += 1
    assert checked > 100


def _convtranspose_model(bias: bool, group: int = 1) -> onnx.ModelProto:
    """ConvTranspose(4->8, 3x3, stride 2, pad 1, output_padding 1) -> Relu -> Conv(8->4) -> output: the ConvTranspose
    is INT8 (the last conv feeds the output and stays float, P9)."""
    rng = np.random.default_rng(8)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (4, 8 // group, 3, 3)).astype(np.float32), "wt"),
        numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "bt"),
        numpy_helper.from_array(rng.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("ConvTranspose", ["x", "wt", "bt"] if bias else ["x", "wt"], ["y1"], name="deconv",
                         pads=[1, 1, 1, 1], strides=[2, 2], output_padding=[1, 1], group=group),
        helper.make_node("Relu", ["y1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 32, 32])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _gemm_model() -> onnx.ModelProto:
    """Gemm(32->24, transB, no C, alpha 0.5, beta 2) -> Relu -> Gemm(24->8): the first is INT8 and has no bias."""
    rng = np.random.default_rng(9)
    inits = [numpy_helper.from_array(rng.normal(0, 0.2, (24, 32)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.2, (8, 24)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.zeros(8, np.float32), "b2")]
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["y1"], name="gemm1", transB=1, alpha=0.5, beta=2.0),
             helper.make_node("Relu", ["y1"], ["r1"], name="relu1"),
             helper.make_node("Gemm", ["r1", "w2", "b2"], ["y"], name="gemm2", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("kind", ["deconv", "deconv-nobias", "deconv-group", "gemm-noc"])
def test_convtranspose_and_biasless_gemm_are_corrected(kind, tmp_path):
    """A ConvTranspose (with a bias, without one: one added, grouped) and a Gemm without C (one added, scaled by
    alpha/beta): with max ranges and the rounding term the INT8 layer's mean output per channel equals the float
    layer's on the calibration data (the correction's arithmetic: no held-out check, folds=1)."""
    if kind == "gemm-noc":
        model, shape, axis, op = _gemm_model(), [1, 32], 1, "gemm1"
    else:
        model, shape, axis, op = _convtranspose_model(kind != "deconv-nobias", 2 if kind == "deconv-group" else 1), \
            [1, 4, 16, 16], 1, "deconv"
    calib, x = _calib(tmp_path, shape if len(shape) > 2 else [1, 1, 32])
    if kind == "gemm-noc":
        x = x.reshape(len(x), 32)
        np.savez(calib, x=x)
    ranges = qdqsurgeon.build_ranges(model, calib=calib, method="max", progress=False)
    plain = qdqsurgeon.optimize(model, ranges=ranges, config=Config(bias_correction=False), analyze=False)
    res = qdqsurgeon.optimize(model, ranges=ranges, analyze=False,
                              config=Config(bias_correction=True, bias_correction_rounding="all", bias_correction_folds=1))
    want = _mean_output(model, "y1", x, axis)
    before = _mean_output(plain.model, "y1", x, axis)
    after = _mean_output(res.model, "y1", x, axis)
    assert np.max(np.abs(before - want)) > 1e-3
    assert np.max(np.abs(after - want)) < 1e-5 * max(1.0, np.max(np.abs(want)))
    changes = [c for c in res.changes if c.pass_name == "bias-correction" and c.node == op]
    assert len(changes) == 1 and changes[0].kind == "constant"
    assert ("one added" in changes[0].detail) == (kind in ("deconv-nobias", "gemm-noc"))
    onnx.checker.check_model(res.model, full_check=True)


def test_dequantized_weights_are_onnxruntimes_to_the_bit():
    """The held-out check computes its weights' Q/DQ once: the values it feeds are the ones onnxruntime's
    QuantizeLinear/DequantizeLinear compute (per tensor and per channel on either axis, int8 and uint8 with zero
    points, ties to even, saturation), the chains it cannot do exactly (float16 scale, a DQ output that is a graph
    output) are left in place, and the rewritten model computes what the original did."""
    from qdqsurgeon.passes.bias_correction import _dequantized_weights

    rng = np.random.default_rng(21)
    w = rng.normal(0, 1.0, (6, 10)).astype(np.float32)
    w[0, :4] = [0.25, -0.25, 0.75, 40.0]  # ties (x / scale = k + 0.5) and one that saturates
    scale_t = np.float32(0.5)
    scale_c0 = rng.uniform(0.005, 0.05, 6).astype(np.float32)
    scale_c1 = rng.uniform(0.005, 0.05, 10).astype(np.float32)
    inits = [numpy_helper.from_array(v, n) for n, v in (
        ("w", w), ("s_t", scale_t), ("s_c0", scale_c0), ("s_c1", scale_c1), ("zp_t", np.int8(3)),
        ("zp_c0", np.zeros(6, np.int8)), ("zp_c1", rng.integers(100, 156, 10).astype(np.uint8)),
        ("q8", rng.integers(-128, 128, (6, 10)).astype(np.int8)), ("zp_q8", np.int8(-7)),
        ("w16", w.astype(np.float16)), ("s_h", np.float16(0.01)), ("zp_h", np.int8(0)))]
    chains = {"t": ("w", "s_t", "zp_t", None), "c0": ("w", "s_c0", "zp_c0", 0), "c1": ("w", "s_c1", "zp_c1", 1),
              "h": ("w16", "s_h", "zp_h", None)}
    nodes, outputs = [], []
    for name, (x, s, zp, axis) in chains.items():
        nodes += _qdq(x, f"{name}_dq", s, zp, name, axis)
    nodes.append(helper.make_node("DequantizeLinear", ["q8", "s_c0", "zp_c0"], ["i8_dq"], axis=0))
    nodes.append(helper.make_node("DequantizeLinear", ["q8", "s_t", "zp_q8"], ["out_dq"]))  # a graph output
    for name in [*chains, "i8"]:
        nodes.append(helper.make_node("Identity", [f"{name}_dq"], [f"{name}_out"]))
        outputs.append(f"{name}_out")
    graph = helper.make_graph(nodes, "g", [], [helper.make_empty_tensor_value_info(n) for n in [*outputs, "out_dq"]],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = dict(zip([*outputs, "out_dq"], ort.InferenceSession(model.SerializeToString(), so).run(None, {})))
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    feeds = _dequantized_weights(rewritten)
    assert sorted(feeds) == ["c0_dq", "c1_dq", "i8_dq", "t_dq"]
    for name, value in feeds.items():
        assert value.dtype == np.float32 and value.tobytes() == want[name.replace("_dq", "_out")].tobytes(), name
    left = {n.output[0] for n in rewritten.graph.node}
    assert {"h_q", "h_dq", "out_dq"} <= left and not {"t_q", "t_dq", "c1_q", "i8_dq"} & left
    again = ort.InferenceSession(rewritten.SerializeToString(), so).run(None, feeds)
    assert all(a.tobytes() == want[n].tobytes() for a, n in zip(again, [*outputs, "out_dq"]))


def _qdq(x, out, scale, zp, prefix, axis):
    kw = {} if axis is None else {"axis": axis}
    return [helper.make_node("QuantizeLinear", [x, scale, zp], [f"{prefix}_q"], **kw),
            helper.make_node("DequantizeLinear", [f"{prefix}_q", scale, zp], [out], **kw)]


def _previous_check(monkeypatch, weights: bool = True):
    """The held-out check as it was before it was made faster: a float reference session of its own (not the
    statistics pass's outputs), every weight's Q/DQ run by onnxruntime on every batch (``weights``), and each
    fold's shift from ``_shift`` on ``pooled(leave_out=f)``."""
    from qdqsurgeon.passes import bias_correction as bc

    def per_fold(t, w, st, used):
        return [np.sum(bc.BiasCorrection._shift(t, w, *st.pooled(leave_out=f)), axis=0) for f in used]

    monkeypatch.setattr(bc._Reference, "batches", lambda self, model, names: None)
    if weights:
        monkeypatch.setattr(bc, "_dequantized_weights", lambda model: {})
    monkeypatch.setattr(bc, "_held_out_shifts", per_fold)


def _spy_fast_check(monkeypatch) -> dict:
    """Counts of the faster check's parts taking effect (kept reference outputs, weights computed once), and the
    check's Q/DQ model before and after its weights were taken out, with their values."""
    from qdqsurgeon.passes import bias_correction as bc

    used: dict = {"reference": 0, "weights": 0}
    batches, weights = bc._Reference.batches, bc._dequantized_weights

    def spy_batches(self, model, names):
        found = batches(self, model, names)
        used["reference"] += found is not None
        return found

    def spy_weights(model):
        before = onnx.ModelProto()
        before.CopyFrom(model)
        found = weights(model)
        used["weights"] += len(found)
        used["models"] = (before, model, found)
        return found

    monkeypatch.setattr(bc._Reference, "batches", spy_batches)
    monkeypatch.setattr(bc, "_dequantized_weights", spy_weights)
    return used


def _check_notes(res) -> list[str]:
    return [c.detail for c in res.changes if c.pass_name == "bias-correction" and c.kind == "note"]


@pytest.mark.parametrize("kind", ["conv", "conv-bn", "matmul", "deconv", "gemm-noc", "alternating"])
def test_faster_check_gives_the_previous_verdict_and_sqnrs(kind, tmp_path, monkeypatch):
    """The check's SQNRs (to the printed hundredth), its verdict and the model written are those of the previous
    check on every kind of layer, applied or refused, and the faster parts took effect."""
    if kind == "gemm-noc":
        model, calib = _gemm_model(), tmp_path / "g.npz"
        np.savez(calib, x=_calib(tmp_path, [1, 1, 32])[1].reshape(8, 32))
    elif kind == "deconv":
        model, calib = _convtranspose_model(True), _calib(tmp_path, [1, 4, 16, 16])[0]
    elif kind == "matmul":
        model, calib = _matmul_model(), _calib(tmp_path, [1, 6, 32])[0]
    elif kind == "alternating":
        model, calib = _conv_model(), _alternating_calib(tmp_path, [1, 3, 16, 16])
    else:
        model, calib = _conv_model("bn" if kind == "conv-bn" else "bias"), _calib(tmp_path, [1, 3, 16, 16])[0]
    ranges = qdqsurgeon.build_ranges(model, calib=calib, method="max", progress=False)
    with monkeypatch.context() as m:
        used = _spy_fast_check(m)
        new = qdqsurgeon.optimize(model, ranges=ranges, analyze=False)
    assert used["reference"] == 1 and used["weights"] > 0
    with monkeypatch.context() as m:
        _previous_check(m)
        old = qdqsurgeon.optimize(model, ranges=ranges, analyze=False)
    assert _check_notes(new) == _check_notes(old) and len(_check_notes(new)) == 1
    # (the random data's correction helps the MatMul, ConvTranspose and Gemm layers, not the Convs)
    refused = kind in ("alternating", "conv", "conv-bn")
    assert _check_notes(new)[0].startswith("not applied: held out" if refused else "applied: held out")
    assert new.model.SerializeToString() == old.model.SerializeToString()


def test_check_without_kept_outputs_runs_the_float_model(monkeypatch):
    """Past its memory budget the statistics pass keeps no outputs and the check runs the float model itself:
    the same verdict and SQNRs."""
    from qdqsurgeon.passes import bias_correction as bc

    model = qdqsurgeon.load(example_model())
    ranges = qdqsurgeon.build_ranges(model, calib=example_calibration(), progress=False)
    with monkeypatch.context() as m:
        used = _spy_fast_check(m)
        kept = qdqsurgeon.optimize(model, ranges=ranges, analyze=False)
    assert used["reference"] == 1
    with monkeypatch.context() as m:
        m.setattr(bc, "_REFERENCE_BYTES", 0)
        used = _spy_fast_check(m)
        budget = qdqsurgeon.optimize(model, ranges=ranges, analyze=False)
    assert used["reference"] == 0
    assert _check_notes(kept) == _check_notes(budget) and _check_notes(kept)[0].startswith("applied")
    assert kept.model.SerializeToString() == budget.model.SerializeToString()


@pytest.mark.slow
@pytest.mark.parametrize("name,samples", [("resnet18_cifar10", 8), ("all_minilm_l6_v2", 4)])
def test_faster_check_on_shared_models(name, samples, tmp_path, monkeypatch):
    """On real models, a CNN and a transformer: the faster check's verdict, SQNRs and output are the previous
    check's, and its Q/DQ model with the weights computed once gives the outputs of the one that computes them on
    every run, to the bit. (The transformer's previous check, its weights' per-channel Q/DQ on every run, took
    most of a minute here: it is compared with that part on one batch only.)"""
    import sys

    from ..helpers import REPO, need_shared

    shared = need_shared().parent
    sys.path.insert(0, str(REPO / "benchmarks"))
    import zoo_data as zd

    entry = next(m for m in zd.models() if m.name == name)
    data = zd.build(entry, shared, zd.DEFAULT_CACHE, tmp_path, n_calib=samples, n_eval=1)
    calib = zd.save_npz(tmp_path / "calib.npz", data.calib)
    model = qdqsurgeon.load(zd.model_path(entry, shared, zd.DEFAULT_CACHE))
    ranges = qdqsurgeon.build_ranges(model, calib=calib, progress=False)
    # the edit audit (tests/conftest.py) hashes every tensor after every pass, 2/3 of this test on MiniLM: the
    # pipeline's edits are audited on these models by test_zoo.py, this test is about the check
    monkeypatch.delenv("QDQSURGEON_AUDIT", raising=False)
    with monkeypatch.context() as m:
        used = _spy_fast_check(m)
        new = qdqsurgeon.optimize(model, ranges=ranges, analyze=False, verify=False)
    assert used["reference"] == 1 and used["weights"] > 0
    with monkeypatch.context() as m:
        _previous_check(m, weights=name != "all_minilm_l6_v2")
        old = qdqsurgeon.optimize(model, ranges=ranges, analyze=False, verify=False)
    assert _check_notes(new) == _check_notes(old)
    assert re.search(r"held out on \d folds", _check_notes(new)[0])
    assert new.model.SerializeToString() == old.model.SerializeToString()
    before, after, weights = used["models"]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    feed = {k: v[:1] for k, v in data.calib.items()}
    outs = [o.name for o in before.graph.output]
    rng = np.random.default_rng(0)
    biases = {i.name: rng.normal(0, 0.1, [d.dim_value for d in i.type.tensor_type.shape.dim]).astype(
        helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)) for i in before.graph.input
        if i.name.startswith("__bias_correction_check_")}
    assert biases
    want = ort.InferenceSession(before.SerializeToString(), so).run(outs, {**feed, **biases})
    got = ort.InferenceSession(after.SerializeToString(), so).run(outs, {**feed, **biases, **weights})
    assert all(a.tobytes() == b.tobytes() for a, b in zip(want, got))
