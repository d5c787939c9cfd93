"""2:4 sparsity: detection along the right axis, TensorRT's conditions, sparsify, inspect, and the
digits CNN (issue 16)."""

from __future__ import annotations

import hashlib
import importlib.util
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from qdqsurgeon import Config, build_ranges, optimize
from qdqsurgeon.cli import cli
from qdqsurgeon.sparsity import group_stats, m4n2_mask, sparsify, sparsity_report

from .helpers import REPO, SHARED, make_model, run
from .sparse_helpers import DIGITS_DENSE, DIGITS_SPARSE, sparse_cnn

DIGITS = SHARED / "models" / "images" / "digits.csv.gz"


def _rows(model) -> dict:
    return {l.node: l for l in sparsity_report(model).layers}


def _conv_model(w: np.ndarray, *, group: int = 1, weight_nodes=None, inits=None) -> onnx.ModelProto:
    k, c = w.shape[0], w.shape[1] * group
    nodes = list(weight_nodes or []) + [helper.make_node("Conv", ["x", "W"], ["y"], name="conv", group=group, pads=[1] * 4)]
    return make_model(nodes, [("x", TensorProto.FLOAT, [1, c, 6, 6])], [("y", TensorProto.FLOAT, [1, k, 6, 6])],
                      inits if inits is not None else [numpy_helper.from_array(w, "W")])


# --------------------------------------------------------------------------- detection


def test_mask_keeps_the_two_largest_per_group_of_four():
    w = np.array([[0.1, -0.9, 0.5, 0.2, 3.0, 0.0, -0.1, 0.0]], np.float32)
    keep = m4n2_mask(w, 1)
    assert keep.tolist() == [[False, True, True, False, True, False, True, False]]
    assert group_stats(w * keep, 1) == (2, 2) and group_stats(w, 1) == (1, 2)


def test_conv_pattern_is_read_along_input_channels_not_output_channels():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8, 3, 3)).astype(np.float32)
    along_c = w * m4n2_mask(w, 1)
    along_k = w * m4n2_mask(w, 0)  # 50% zeros too, but in the wrong direction for TensorRT
    assert _rows(_conv_model(along_c))["conv"].is_2_4
    row = _rows(_conv_model(along_k))["conv"]
    assert not row.is_2_4 and row.reduction_axis == 1 and 0 < row.fraction < 1


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_reduction_axis_follows_trans_b(trans_b):
    rng = np.random.default_rng(1)
    k, n = 16, 8
    w = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    axis = 1 if trans_b else 0
    sparse_right, sparse_wrong = w * m4n2_mask(w, axis), w * m4n2_mask(w, 1 - axis)
    for weight, expect in ((sparse_right, True), (sparse_wrong, False)):
        m = make_model([helper.make_node("Gemm", ["x", "W"], ["y"], name="fc", transB=trans_b)],
                       [("x", TensorProto.FLOAT, [2, k])], [("y", TensorProto.FLOAT, [2, n])], [numpy_helper.from_array(weight, "W")])
        row = _rows(m)["fc"]
        assert row.reduction_axis == axis and row.is_2_4 is expect and row.eligible


def test_int8_initializer_behind_dq_and_a_transpose_counts_the_dequantized_zeros():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((16, 8)).astype(np.float32)  # stored [N, K], transposed to MatMul's [K, N]
    w = w * m4n2_mask(w, 1)
    s = np.max(np.abs(w), axis=1) / 127
    q = np.rint(w / s[:, None]).astype(np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "Ws"], ["Wdq"], name="w_dq", axis=0),
             helper.make_node("Transpose", ["Wdq"], ["Wt"], name="w_t", perm=[1, 0]),
             helper.make_node("MatMul", ["x", "Wt"], ["y"], name="mm")]
    m = make_model(nodes, [("x", TensorProto.FLOAT, [2, 8])], [("y", TensorProto.FLOAT, [2, 16])],
                   [numpy_helper.from_array(q, "Wq"), numpy_helper.from_array(s.astype(np.float32), "Ws")])
    row = _rows(m)["mm"]
    assert row.is_2_4 and row.reduction_axis == 0 and row.weight_shape == [8, 16]
    assert row.precision == "int8-weight-only" and not row.sparse_ready  # the activation is float (S5)


def test_conditions_grouped_odd_channels_and_convtranspose():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    w = w * m4n2_mask(w, 1)
    grouped = _rows(_conv_model(w, group=2))["conv"]
    assert grouped.is_2_4 and not grouped.eligible and any(r.startswith("S2") for r in grouped.reasons)
    odd = rng.standard_normal((8, 6, 3, 3)).astype(np.float32)
    row = _rows(_conv_model(odd * m4n2_mask(odd, 1)))["conv"]
    assert not row.is_2_4 and any(r.startswith("S1") for r in row.reasons)
    ct = make_model([helper.make_node("ConvTranspose", ["x", "W"], ["y"], name="deconv")],
                    [("x", TensorProto.FLOAT, [1, 8, 4, 4])], [("y", TensorProto.FLOAT, [1, 4, 6, 6])],
                    [numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "W")])
    row = _rows(ct)["deconv"]
    assert row.reduction_axis == 0 and not row.eligible and any(r.startswith("S3") for r in row.reasons)


def test_mac_shares_and_precision_after_ptq():
    m = sparse_cnn()
    rep = sparsity_report(m)
    assert rep.sparse_mac_fraction == 0.0 and rep.sparse_mac_fraction_int8 == pytest.approx(1.0)
    out = optimize(m, ranges=build_ranges(m, calib_random=4, progress=False)).model
    rep = sparsity_report(out)
    fc2 = next(l for l in rep.layers if l.node == "fc2")
    assert fc2.precision == "fp32"  # the classifier stays float (P9)
    assert rep.sparse_mac_fraction == pytest.approx(1 - fc2.macs / rep.total_macs)


# --------------------------------------------------------------------------- sparsify


def test_sparsify_makes_every_eligible_layer_2_4_and_leaves_the_rest():
    model = onnx.load(DIGITS_DENSE)
    before = _rows(model)
    res = sparsify(model)
    after = _rows(res.model)
    eligible = {n for n, r in before.items() if r.eligible}
    assert eligible == {"/2/Conv", "/5/Conv", "/9/Gemm", "/11/Gemm"} and set(res.pruned) == eligible
    assert all(after[n].is_2_4 for n in eligible)
    assert not after["/0/Conv"].is_2_4 or after["/0/Conv"].fraction == before["/0/Conv"].fraction
    assert "/0/Conv" in res.skipped and res.skipped["/0/Conv"].startswith("S1")
    onnx.checker.check_model(res.model, full_check=True)
    # Exactly half the weights of every pruned layer are zero; the kept ones are unchanged.
    w_before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for t in res.model.graph.initializer:
        a, b = w_before[t.name], numpy_helper.to_array(t)
        changed = a != b
        assert np.all(b[changed] == 0)
    assert sparsify(res.model).pruned == []  # idempotent: already 2:4
    assert set(sparsify(res.model).already) == eligible


def test_sparsify_int8_weights_and_exclude():
    m = sparse_cnn()
    dense = optimize(m, ranges=build_ranges(m, calib_random=4, progress=False), config=Config(weights="int8")).model
    # Make the INT8 model dense again by overwriting the pruned int8 values: the product must prune the int8 values.
    rng = np.random.default_rng(0)
    for t in dense.graph.initializer:
        v = numpy_helper.to_array(t)
        if v.dtype == np.int8 and v.ndim >= 2:
            t.CopyFrom(numpy_helper.from_array(rng.integers(1, 100, v.shape).astype(np.int8), t.name))
    assert {n for n, r in _rows(dense).items() if r.is_2_4} == {"fc2"}  # the float classifier (P9) kept its zeros
    res = sparsify(dense, exclude=["^conv3$"])
    after = _rows(res.model)
    assert {n for n, r in after.items() if r.is_2_4} == {"conv1", "conv2", "fc1", "matmul", "fc2"}
    assert res.skipped == {"conv3": "excluded"} and res.already == ["fc2"]
    zero = {t.name for t in res.model.graph.initializer if numpy_helper.to_array(t).dtype == np.int8
            and numpy_helper.to_array(t).ndim >= 2 and np.any(numpy_helper.to_array(t) == 0)}
    assert len(zero) == 4  # the int8 values themselves were pruned (to the zero point 0)


def test_sparsify_max_drop_leaves_sensitive_layers_dense():
    model = onnx.load(DIGITS_DENSE)
    fx = _fixture()
    if not DIGITS.exists():
        pytest.skip("digits data not found")
    (_, _), (xte, _) = fx.split(*fx.load_digits(DIGITS))
    batches = [{"image": xte[i:i + 100]} for i in range(0, 300, 100)]
    free = sparsify(model, data=batches)
    strict = sparsify(model, data=batches, max_drop=0.0)
    assert free.drop is not None and free.drop > 0  # unpruned fine-tuning: pruning everything costs something
    assert strict.drop <= 0.0 + 1e-9
    assert set(strict.pruned) < set(free.pruned)
    assert all("max-drop" in strict.skipped[n] for n in set(free.pruned) - set(strict.pruned))
    # Most sensitive last: whatever was kept dense is at least as sensitive as anything pruned.
    kept = [strict.sensitivity[n] for n in strict.pruned]
    left = [strict.sensitivity[n] for n in set(free.pruned) - set(strict.pruned)]
    assert not kept or not left or max(kept) <= max(left)


def test_sparsify_cli(tmp_path):
    src = tmp_path / "in.onnx"
    src.write_bytes(DIGITS_DENSE.read_bytes())
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    res = CliRunner().invoke(cli, ["sparsify", str(src), str(out), "--exclude", "11", "--report", str(report)])
    assert res.exit_code == 0, res.output
    assert "pruned to 2:4: 3 layer(s)" in res.output and "/11/Gemm: excluded" in res.output
    assert "fine-tun" in res.output
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest
    assert json.loads(report.read_text())["pruned"] == ["/2/Conv", "/5/Conv", "/9/Gemm"]
    assert _rows(onnx.load(out))["/9/Gemm"].is_2_4
    for args, msg in ((["--max-drop", "1"], "--max-drop needs evaluation data"),
                      (["--exclude", "("], "not a valid regular expression")):
        res = CliRunner().invoke(cli, ["sparsify", str(src), str(tmp_path / "o2.onnx"), *args])
        assert res.exit_code == 2 and msg in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = CliRunner().invoke(cli, ["sparsify", str(src), str(src)])
    assert res.exit_code == 2 and "never overwrites its input" in res.stderr


# --------------------------------------------------------------------------- inspect


def test_inspect_reports_the_sparse_share():
    res = CliRunner().invoke(cli, ["inspect", str(DIGITS_SPARSE), "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.output)["sparsity"]
    assert s["layers_2_4"] == 4 and s["layers_total"] == 5 and s["sparse_mac_fraction"] == 0.0
    assert s["sparse_mac_fraction_int8"] == pytest.approx(0.98, abs=0.01)
    text = CliRunner().invoke(cli, ["inspect", str(DIGITS_SPARSE)]).output
    assert "2:4 sparsity: 4/5 weighted ops" in text and "/2/Conv (Conv): 100% of groups 2:4" in text
    dense = CliRunner().invoke(cli, ["inspect", str(DIGITS_DENSE)]).output
    assert "2:4 sparsity: 0/5" in dense and "(Conv): " not in dense  # no per-layer rows for a dense model


# --------------------------------------------------------------------------- the digits CNN


def _fixture():
    spec = importlib.util.spec_from_file_location("make_digits_sparse", REPO / "fixtures" / "make_digits_sparse.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_digits_sparse_int8_within_one_point_of_dense_int8(tmp_path):
    if not DIGITS.exists():
        pytest.skip(f"digits data not found at {DIGITS}")
    spec = importlib.util.spec_from_file_location("sparse_int8", REPO / "benchmarks" / "sparse_int8.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.run(DIGITS, tmp_path)
    dense, sparse = res["dense"], res["sparse"]
    assert dense["fp32"] >= 0.97 and sparse["fp32"] >= 0.97
    assert sparse["int8"] >= dense["int8"] - 0.01
    assert sparse["sparsity"]["sparse_mac_fraction"] > 0.9 and dense["sparsity"]["sparse_mac_fraction"] == 0.0
    # The INT8 model still computes what it computed: same argmax as the model it came from on most samples.
    fx = _fixture()
    (_, _), (xte, _) = fx.split(*fx.load_digits(DIGITS))
    ref = run(onnx.load(DIGITS_SPARSE), {"image": xte})[0].argmax(1)
    got = run(sparse["int8_model"], {"image": xte})[0].argmax(1)
    assert np.mean(ref == got) >= 0.98
