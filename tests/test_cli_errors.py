"""Bad input gives one line on stderr, exit 2 (usage) or 1 (model), no traceback; the input is untouched (issue 2)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

import qdqsurgeon.examples
from qdqsurgeon.cli import cli

from .helpers import F, make_model


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def _assert_one_line_error(result, code: int, *needles: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    for n in needles:
        assert n in lines[0]


@pytest.fixture
def good(tmp_path):
    p = tmp_path / "good.onnx"
    p.write_bytes(qdqsurgeon.examples.example_model().read_bytes())
    return p


def _bad_files(tmp_path):
    rng = np.random.default_rng(0)
    random_bytes = tmp_path / "random.onnx"
    random_bytes.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(qdqsurgeon.examples.example_model().read_bytes()[:5000])
    npy = tmp_path / "array.npy"
    np.save(npy, np.arange(10.0))
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    # fails onnx.checker: a node reads a tensor nobody produces
    bad_graph = helper.make_graph([helper.make_node("Relu", ["nowhere"], ["y"], name="r")], "g",
                                  [helper.make_tensor_value_info("x", F, [1])], [helper.make_tensor_value_info("y", F, [1])])
    checker = tmp_path / "checker.onnx"
    checker.write_bytes(helper.make_model(bad_graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    # an op from a domain nobody defines
    dom_graph = helper.make_graph([helper.make_node("Frobnicate", ["x"], ["y"], name="f", domain="com.example.unknown")], "g",
                                  [helper.make_tensor_value_info("x", F, [1])], [helper.make_tensor_value_info("y", F, [1])])
    domain = tmp_path / "domain.onnx"
    domain.write_bytes(helper.make_model(dom_graph, opset_imports=[helper.make_opsetid("", 17),
                                                                    helper.make_opsetid("com.example.unknown", 1)]).SerializeToString())
    return {"random": random_bytes, "truncated": truncated, "npy": npy, "empty": empty, "checker": checker, "domain": domain}


@pytest.mark.parametrize("kind,needle", [
    ("random", "not an ONNX model"), ("truncated", "not an ONNX model"), ("npy", "not an ONNX model"),
    ("empty", "not an ONNX model"), ("checker", "onnx.checker"), ("domain", "unknown opset domain"),
])
@pytest.mark.parametrize("command", ["optimize", "inspect"])
def test_bad_model_files(tmp_path, kind, needle, command):
    path = _bad_files(tmp_path)[kind]
    before = _sha(path)
    args = ["optimize", str(path), str(tmp_path / "out.onnx")] if command == "optimize" else ["inspect", str(path)]
    result = _invoke(*args)
    _assert_one_line_error(result, 1, needle, str(path))
    assert _sha(path) == before
    assert not (tmp_path / "out.onnx").exists()


def test_missing_file(tmp_path):
    result = _invoke("optimize", str(tmp_path / "missing.onnx"), str(tmp_path / "out.onnx"))
    _assert_one_line_error(result, 2, "no such file", "missing.onnx")
    _assert_one_line_error(_invoke("inspect", str(tmp_path / "missing.onnx")), 2, "no such file")


def test_output_equal_to_input(good):
    before = _sha(good)
    result = _invoke("optimize", str(good), str(good), "--calib-random", "2")
    _assert_one_line_error(result, 2, "input path")
    assert _sha(good) == before


def test_unwritable_output_directory(good, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    before = _sha(good)
    for out in (tmp_path / "missing_dir" / "out.onnx", blocker / "out.onnx"):
        result = _invoke("optimize", str(good), str(out), "--passes", "dedupe-qdq")
        _assert_one_line_error(result, 2, "output folder")
    assert _sha(good) == before


def test_float_model_without_calibration_data(good, tmp_path):
    result = _invoke("optimize", str(good), str(tmp_path / "o.onnx"))
    _assert_one_line_error(result, 2, "calibration data")


def test_unknown_pass(good, tmp_path):
    result = _invoke("optimize", str(good), str(tmp_path / "o.onnx"), "--passes", "no-such-pass")
    _assert_one_line_error(result, 2, "unknown pass 'no-such-pass'")


def test_wrong_argument_count(tmp_path):
    result = _invoke("optimize", str(tmp_path / "only_one.onnx"))
    _assert_one_line_error(result, 2, "IN and OUT")


def test_debug_shows_traceback(tmp_path):
    result = CliRunner().invoke(cli, ["--debug", "inspect", str(tmp_path / "missing.onnx")])
    assert result.exit_code == 2
    assert "Traceback" in result.stderr


@pytest.mark.parametrize("command", ["optimize", "passes", "inspect"])
def test_help_has_example(command):
    result = _invoke(command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.output


def test_version():
    result = _invoke("--version")
    assert result.exit_code == 0 and qdqsurgeon.__version__ in result.output


def test_output_piped_to_head_stops_quietly(tmp_path):
    """`qdqsurgeon ... | head`: no traceback or internal error when the reader goes away."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "from qdqsurgeon.cli import main; main()", "passes"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first write
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert b"Traceback" not in err and b"internal error" not in err


# --- damaged copies of the bundled example (found by fuzzing the file's bytes) -------------------


def _damaged(tmp_path, edit) -> Path:
    model = onnx.load(str(qdqsurgeon.examples.example_model()))
    edit(model)
    p = tmp_path / "damaged.onnx"
    p.write_bytes(model.SerializeToString())
    return p


def _attr(model, node: str, name: str, ints: list[int]) -> None:
    n = next(n for n in model.graph.node if n.name == node)
    a = next(a for a in n.attribute if a.name == name)
    del a.ints[:]
    a.ints.extend(ints)


def test_name_that_is_not_utf8(tmp_path):
    src = qdqsurgeon.examples.example_model().read_bytes()
    assert src.count(b"layer2.add") >= 1
    p = tmp_path / "damaged.onnx"
    p.write_bytes(src.replace(b"layer2.add", b"layer2.\xeedd"))
    digest = _sha(p)
    _assert_one_line_error(_invoke("optimize", str(p), str(tmp_path / "o.onnx"), "--calib-random", "1"), 1,
                           "not UTF-8")
    assert _sha(p) == digest


def test_inconsistent_shapes_name_the_untyped_tensor(tmp_path):
    p = _damaged(tmp_path, lambda m: _attr(m, "layer2.conv1", "pads", [1, 17, 1, 1]))
    result = _invoke("optimize", str(p), str(tmp_path / "o.onnx"), "--calib-random", "1")
    assert result.exit_code == 1
    errors = [l for l in result.stderr.splitlines() if l.startswith("error")]
    assert len(errors) == 1 and "shape inference cannot type tensor" in errors[0], result.stderr


def test_onnxruntime_failure_is_one_line_without_its_native_log(tmp_path, capfd):
    """onnxruntime's C++ logger writes to file descriptor 2 before raising; only our line may appear."""
    stem = next(n.name for n in onnx.load(str(qdqsurgeon.examples.example_model())).graph.node if n.op_type == "Conv")
    p = _damaged(tmp_path, lambda m: _attr(m, stem, "kernel_shape", [3, 11]))
    result = _invoke("optimize", str(p), str(tmp_path / "o.onnx"), "--calib-random", "1")
    assert result.exit_code in (1, 2)
    errors = [l for l in result.stderr.splitlines() if l.startswith("error")]
    assert len(errors) == 1 and "onnxruntime" in errors[0], result.stderr
    assert "onnxruntime:" not in capfd.readouterr().err  # the native "[E:onnxruntime:, ...]" line


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["flip", "zero", "truncate"]), st.floats(0, 1), st.integers(0, 255)),
                min_size=1, max_size=6))
def test_damaged_bytes_never_crash(tmp_path_factory, edits):
    """Flipped, zeroed or truncated bytes of the example model: the CLI either optimizes it (a valid output)
    or stops with exit 1/2 and an error line, never an internal error, and never touches the input."""
    src = bytearray(qdqsurgeon.examples.example_model().read_bytes())
    for kind, where, value in edits:
        i = int(where * (len(src) - 1))
        if kind == "flip":
            src[i] ^= value or 1
        elif kind == "zero":
            src[i:i + 16] = bytes(len(src[i:i + 16]))
        else:
            src = src[:max(i, 1)]
    d = tmp_path_factory.mktemp("fuzz")
    p = d / "damaged.onnx"
    p.write_bytes(bytes(src))
    result = _invoke("optimize", str(p), str(d / "o.onnx"), "--calib-random", "1")
    assert p.read_bytes() == bytes(src)
    assert "internal error" not in result.stderr and "Traceback" not in result.output, result.stderr
    if result.exit_code == 0:
        onnx.checker.check_model(str(d / "o.onnx"), full_check=True)
    else:
        assert result.exit_code in (1, 2)
        assert [l for l in result.stderr.splitlines() if l.startswith("error: ")], result.stderr


def test_model_failing_the_full_check_is_named_not_the_pass(tmp_path):
    """A QAT export with one DequantizeLinear missing (a Conv reads the int8 tensor): onnx's plain checker
    passes it at load; the first pass's full check fails. The error names the model, not the pass."""
    from qdqsurgeon.pipelines import PIPELINES

    from .passes.placement_graphs import optimize, ranges_of
    from .passes.test_properties import build

    model = build((("stem", "relu"), [("residual", True), ("conv", "relu")], "gap_gemm"))
    naive = optimize(model, list(PIPELINES["insert-only"]), ranges_of(model)).model
    prod = {o: n for n in naive.graph.node for o in n.output}
    conv = [n for n in naive.graph.node if n.op_type == "Conv"][-1]
    dq = prod[conv.input[0]]
    assert dq.op_type == "DequantizeLinear"
    conv.input[0] = dq.input[0]  # the Conv now reads the int8 Q output
    p = tmp_path / "broken.onnx"
    onnx.save(naive, str(p))
    digest = _sha(p)
    _assert_one_line_error(_invoke("optimize", str(p), str(tmp_path / "o.onnx")), 1,
                           "fails onnx's full check", conv.name)
    assert _sha(p) == digest and not (tmp_path / "o.onnx").exists()


# ----------------------------------------------------------------------------- late and badly worded checks (issue 17 item 9)


def _deny(monkeypatch, path, mode_bit):
    """Simulate permission bits that root would ignore: os.access says no for ``path``."""
    import os

    real = os.access

    def access(p, mode, *args, **kwargs):
        if Path(p).resolve() == Path(path).resolve() and mode & mode_bit:
            return False
        return real(p, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def _no_loading(monkeypatch):
    import qdqsurgeon.io

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(qdqsurgeon.io, "load", load)


def test_unwritable_output_folder_is_refused_before_loading(good, tmp_path, monkeypatch):
    import os

    out_dir = tmp_path / "ro"
    out_dir.mkdir()
    _deny(monkeypatch, out_dir, os.W_OK)
    _no_loading(monkeypatch)
    _assert_one_line_error(_invoke("optimize", str(good), str(out_dir / "o.onnx"), "--calib-random", "2"), 2, "not writable")
    report = _invoke("optimize", str(good), str(tmp_path / "o.onnx"), "--calib-random", "2", "--report", str(out_dir / "r.json"))
    _assert_one_line_error(report, 2, "r.json", "not writable")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_folder_even_root_cannot_write_is_refused_before_loading(good, monkeypatch):
    """Root passes every os.access check; the probe file finds what really happens (/proc refuses creation)."""
    _no_loading(monkeypatch)
    _assert_one_line_error(_invoke("optimize", str(good), "/proc/out.onnx", "--calib-random", "2"), 2, "not writable")


def test_output_inside_a_file_says_so(good, tmp_path):
    _assert_one_line_error(_invoke("optimize", str(good), str(good / "o.onnx"), "--calib-random", "2"), 2,
                           "is a file, not a folder")


@pytest.mark.parametrize("command", ["inspect", "optimize", "check"])
def test_unreadable_input_is_one_line(good, tmp_path, monkeypatch, command):
    import os

    _deny(monkeypatch, good, os.R_OK)
    args = {"inspect": ["inspect", str(good)],
            "optimize": ["optimize", str(good), str(tmp_path / "o.onnx"), "--calib-random", "2"],
            "check": ["check", str(good), str(good), "--data", str(qdqsurgeon.examples.example_calibration())]}[command]
    _assert_one_line_error(_invoke(*args), 2, "cannot read", str(good))


@pytest.mark.timeout(60)  # before the fix, reading the pipe blocked forever
def test_fifo_input_is_refused_not_read(tmp_path):
    import os

    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)  # reading it would block forever
    _assert_one_line_error(_invoke("inspect", str(fifo)), 2, "not a regular file")


def test_click_argument_errors_are_one_line(good):
    _assert_one_line_error(_invoke("optimize", str(good), "o.onnx", "--method", "bogus"), 2, "--method", "--help")
    _assert_one_line_error(_invoke("inspect", str(good), "--no-such-flag"), 2, "--no-such-flag")


def test_cycle_is_named_in_full(tmp_path):
    nodes = [helper.make_node("Add", ["x", "c"], ["a"], name="add_1"), helper.make_node("Relu", ["a"], ["b"], name="relu_1"),
             helper.make_node("Neg", ["b"], ["c"], name="neg_1")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [1])], [helper.make_tensor_value_info("c", F, [1])])
    path = tmp_path / "cycle.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    result = _invoke("inspect", str(path))
    _assert_one_line_error(result, 1, "the graph has a cycle: add_1 -> relu_1 -> neg_1 -> add_1")


def test_unsorted_graph_is_sorted_and_a_missing_tensor_named_in_full(tmp_path):
    nodes = [helper.make_node("Relu", ["a"], ["b"], name="relu_1"), helper.make_node("Neg", ["x"], ["a"], name="neg_1")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [1])], [helper.make_tensor_value_info("b", F, [1])])
    path = tmp_path / "unsorted.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    before = _sha(path)
    result = _invoke("inspect", str(path))
    assert result.exit_code == 0, result.output  # out of order but acyclic: sorted in memory, file untouched
    assert _sha(path) == before
    # a node reading a tensor nobody makes still fails after the one sort, with the checker's whole sentence
    nodes = [helper.make_node("Relu", ["nowhere"], ["b"], name="relu_1"), helper.make_node("Neg", ["x"], ["a"], name="neg_1")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [1])], [helper.make_tensor_value_info("b", F, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    result = _invoke("inspect", str(path))
    _assert_one_line_error(result, 1, "topologically sorted", "relu_1", "is not output of any previous nodes")
