"""Bad input gives one line on stderr, exit 2 (usage) or 1 (model), no traceback; the input is untouched (issue 2)."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
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
