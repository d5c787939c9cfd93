"""Regression tests for defects a review of the core and CLI found (all fixed)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from qdqsurgeon.cli import cli

_RNG = np.random.default_rng(0)


def _w(name, shape):
    return nh.from_array((_RNG.standard_normal(shape) * 0.1).astype(np.float32), name)


def _invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _conv_model(names: bool = True) -> onnx.ModelProto:
    """x -> Conv -> Relu -> Conv -> Add(skip) -> Conv -> Relu -> y, all at opset 17."""
    n = (lambda s: s) if names else (lambda s: "")
    nodes = [
        h.make_node("Conv", ["x", "w1", "b1"], ["c1"], name=n("conv1"), pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["c1"], ["r1"], name=n("relu1")),
        h.make_node("Conv", ["r1", "w2"], ["c2"], name=n("conv2"), pads=[1, 1, 1, 1]),
        h.make_node("Add", ["c2", "r1"], ["a"], name=n("add")),
        h.make_node("Conv", ["a", "w3"], ["c3"], name=n("conv3"), pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["c3"], ["y"], name=n("relu2")),
    ]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 16, 16])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1, 8, 16, 16])],
                     [_w("w1", [8, 3, 3, 3]), _w("b1", [8]), _w("w2", [8, 8, 3, 3]), _w("w3", [8, 8, 3, 3])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


@pytest.fixture
def fp32(tmp_path):
    p = tmp_path / "in.onnx"
    onnx.save(_conv_model(), p)
    return p


# ------------------------------------------------------------------------------------------------
# CLI: --report


def test_report_path_equal_to_input_never_touches_input(fp32, tmp_path):
    before = _sha(fp32)
    _invoke("optimize", str(fp32), str(tmp_path / "out.onnx"), "--calib-random", "1", "-q", "--report", str(fp32))
    assert _sha(fp32) == before


def test_report_path_equal_to_output_is_refused(fp32, tmp_path):
    out = tmp_path / "out.onnx"
    r = _invoke("optimize", str(fp32), str(out), "--calib-random", "1", "-q", "--report", str(out))
    if r.exit_code == 0:
        onnx.load(str(out))  # the output must still be a model
    else:
        assert r.exit_code == 2


def test_report_in_missing_folder_is_usage_error(fp32, tmp_path):
    out = tmp_path / "out.onnx"
    r = _invoke("optimize", str(fp32), str(out), "--calib-random", "1", "-q", "--report", str(tmp_path / "nodir" / "r.json"))
    assert r.exit_code == 2, r.output
    assert "internal error" not in r.output
    assert not out.exists()  # validated before any work, like the output folder


# ------------------------------------------------------------------------------------------------
# CLI: options and user pattern files


def test_bad_exclude_regex_is_usage_error(fp32, tmp_path):
    r = _invoke("optimize", str(fp32), str(tmp_path / "out.onnx"), "--calib-random", "1", "-q", "--exclude", "(")
    assert r.exit_code == 2, r.output
    assert "internal error" not in r.output


def test_pattern_file_with_abstract_pattern_is_usage_error(fp32, tmp_path):
    pat = tmp_path / "abstract.py"
    pat.write_text("from qdqsurgeon import Pattern\nclass P(Pattern):\n    name = 'p'\nPATTERNS = [P]\n")
    r = _invoke("optimize", str(fp32), str(tmp_path / "out.onnx"), "--calib-random", "1", "-q", "--patterns", str(pat))
    assert r.exit_code == 2, r.output
    assert "internal error" not in r.output


def test_pattern_file_calling_sys_exit_is_usage_error(fp32, tmp_path):
    pat = tmp_path / "exits.py"
    pat.write_text("import sys\nsys.exit(3)\n")
    r = _invoke("passes", "--patterns", str(pat))
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert "error:" in r.output


# ------------------------------------------------------------------------------------------------
# onnx-graphsurgeon log noise


def test_quiet_optimize_prints_nothing_for_duplicate_node_names(tmp_path):
    # A Q/DQ model (fix path: no onnxruntime involved) whose nodes share one name; onnx.checker accepts it.
    s, zp = nh.from_array(np.array(0.05, np.float32), "s"), nh.from_array(np.array(0, np.int8), "zp")
    ws, wzp = nh.from_array(np.full([8], 0.01, np.float32), "ws"), nh.from_array(np.zeros([8], np.int8), "wzp")
    wq = nh.from_array(_RNG.integers(-100, 100, [8, 3, 3, 3]).astype(np.int8), "wq")
    nodes = [h.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="same"),
             h.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], name="same"),
             h.make_node("DequantizeLinear", ["wq", "ws", "wzp"], ["wd"], name="same", axis=0),
             h.make_node("Conv", ["xd", "wd"], ["c"], name="same", pads=[1, 1, 1, 1]),
             h.make_node("QuantizeLinear", ["c", "s", "zp"], ["cq"], name="same"),
             h.make_node("DequantizeLinear", ["cq", "s", "zp"], ["y"], name="same")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 16, 16])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1, 8, 16, 16])], [s, zp, ws, wzp, wq])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    p = tmp_path / "dup.onnx"
    onnx.save(m, p)
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", "from qdqsurgeon.cli import main; main()", "optimize", str(p),
                        str(tmp_path / "out.onnx"), "-q", "--no-analysis"], capture_output=True, text=True, timeout=300)
    assert "Found distinct Nodes" not in r.stdout + r.stderr, (r.stdout + r.stderr)[:300]


# ------------------------------------------------------------------------------------------------
# change log with unnamed nodes (ONNX allows empty node names)


def test_change_log_names_every_node_even_when_unnamed(tmp_path):
    import qdqsurgeon
    from qdqsurgeon.ranges import StaticRanges

    m = _conv_model(names=False)
    names = {o for n in m.graph.node for o in n.output} | {"x"}
    res = qdqsurgeon.optimize(m, ranges=StaticRanges({n: 1.0 for n in names}))
    unnamed = [c for c in res.changes if not c.node.strip()]
    assert not unnamed, unnamed[:3]


# ------------------------------------------------------------------------------------------------
# models over 2 GB (PROTOBUF_LIMIT patched down to exercise the path-based branches)


def test_big_model_type_inference_does_not_mutate_model(monkeypatch):
    import qdqsurgeon
    import qdqsurgeon.calibration.collect as col
    from qdqsurgeon.examples import example_model

    model = qdqsurgeon.load(example_model())
    before = model.SerializeToString()
    monkeypatch.setattr(col, "_PROTO_LIMIT", 1000)
    col.tensor_elem_types(model)
    assert model.SerializeToString() == before


def test_big_model_ptq_end_to_end(monkeypatch, tmp_path):
    import qdqsurgeon
    import qdqsurgeon.calibration.collect as col
    import qdqsurgeon.io as qio
    from qdqsurgeon.examples import example_calibration, example_model

    src = tmp_path / "big.onnx"
    onnx.save(onnx.load(str(example_model())), src, save_as_external_data=True, location="big.onnx.data", size_threshold=0)
    monkeypatch.setattr(qio, "PROTOBUF_LIMIT", 1000)
    monkeypatch.setattr(col, "_PROTO_LIMIT", 1000)
    model = qdqsurgeon.load(src)
    ranges = qdqsurgeon.build_ranges(model, calib=example_calibration(), progress=False)
    res = qdqsurgeon.optimize(model, ranges=ranges)
    out = qdqsurgeon.save(res.model, tmp_path / "big.int8.onnx")
    assert (tmp_path / "big.int8.onnx.data").exists() and out.exists()


# ------------------------------------------------------------------------------------------------
# subgraphs


def test_float16_with_loop_body_reading_outer_tensor_is_valid(tmp_path):
    body = h.make_graph(
        [h.make_node("Identity", ["cond_in"], ["cond_out"]), h.make_node("Add", ["v_in", "r1"], ["v_out"])], "body",
        [h.make_tensor_value_info("i", T.INT64, []), h.make_tensor_value_info("cond_in", T.BOOL, []),
         h.make_tensor_value_info("v_in", T.FLOAT, [1, 8, 16, 16])],
        [h.make_tensor_value_info("cond_out", T.BOOL, []), h.make_tensor_value_info("v_out", T.FLOAT, [1, 8, 16, 16])])
    nodes = [h.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             h.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             h.make_node("Loop", ["trip", "", "r1"], ["l_out"], name="loop", body=body),
             h.make_node("Conv", ["l_out", "w3"], ["y"], name="conv3", pads=[1, 1, 1, 1])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 16, 16])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1, 8, 16, 16])],
                     [_w("w1", [8, 3, 3, 3]), _w("w3", [8, 8, 3, 3]), nh.from_array(np.array(2, np.int64), "trip")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    src, out = tmp_path / "loop.onnx", tmp_path / "loop.fp16.onnx"
    onnx.save(m, src)
    r = _invoke("optimize", str(src), str(out), "--calib-random", "2", "-q", "--float16")
    if r.exit_code == 0:
        onnx.checker.check_model(onnx.load(str(out)), full_check=True)
        ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    else:
        assert r.exit_code == 1 and "internal error" not in r.output


# ------------------------------------------------------------------------------------------------
# calibration data


def _scalar_input_model() -> onnx.ModelProto:
    """A model with a rank-0 bool input (an If condition)."""
    then_g = h.make_graph([h.make_node("Conv", ["r1", "w2"], ["t_out"], name="then_conv", pads=[1, 1, 1, 1])], "then", [],
                          [h.make_tensor_value_info("t_out", T.FLOAT, [1, 8, 16, 16])], [_w("w2", [8, 8, 3, 3])])
    else_g = h.make_graph([h.make_node("Relu", ["r1"], ["e_out"], name="else_relu")], "else", [],
                          [h.make_tensor_value_info("e_out", T.FLOAT, [1, 8, 16, 16])])
    nodes = [h.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             h.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             h.make_node("If", ["cond"], ["i_out"], name="if", then_branch=then_g, else_branch=else_g),
             h.make_node("Conv", ["i_out", "w3"], ["y"], name="conv3", pads=[1, 1, 1, 1])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 16, 16]), h.make_tensor_value_info("cond", T.BOOL, [])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1, 8, 16, 16])], [_w("w1", [8, 3, 3, 3]), _w("w3", [8, 8, 3, 3])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def test_scalar_input_model_calibrates(tmp_path):
    src = tmp_path / "if.onnx"
    onnx.save(_scalar_input_model(), src)
    r = _invoke("optimize", str(src), str(tmp_path / "out.onnx"), "--calib-random", "2", "-q")
    assert "internal error" not in r.output, r.output
    assert r.exit_code in (0, 1, 2)


def test_all_nan_calibration_data_is_rejected(fp32, tmp_path):
    data = tmp_path / "nan.npz"
    np.savez(data, x=np.full((2, 3, 16, 16), np.nan, np.float32))
    out = tmp_path / "out.onnx"
    r = _invoke("optimize", str(fp32), str(out), "--calib", str(data), "-q")
    assert r.exit_code == 2, r.output
    assert not out.exists()


def test_16bit_png_is_not_saturated(tmp_path):
    from PIL import Image

    from qdqsurgeon.calibration import Preprocess

    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    p = tmp_path / "g16.png"
    Image.fromarray(ramp).save(p)
    with Image.open(p) as img:
        assert img.mode.startswith("I;16")
        x = Preprocess(size=(64, 64), resize="stretch")(img)
    assert abs(float(x.mean()) - 0.5) < 0.1  # a ramp from black to white (mean ~0.5), not a white image


def test_nested_image_folder_message_is_not_empty(fp32, tmp_path):
    from PIL import Image

    sub = tmp_path / "photos" / "class_a"
    sub.mkdir(parents=True)
    Image.new("RGB", (16, 16), (10, 20, 30)).save(sub / "a.png")
    r = _invoke("optimize", str(fp32), str(tmp_path / "out.onnx"), "--calib", str(tmp_path / "photos"), "-q")
    assert r.exit_code == 0 or "(empty)" not in r.output, r.output
