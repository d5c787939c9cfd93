"""Bad and unusual inputs through the CLI, one table row each (issue 17 "Deliver").

Every row builds its files in ``tmp_path`` and runs one command. Per row the test asserts:

- the exit code (a row may accept several while another part of the code is being changed);
- on failure, exactly one stderr line, starting ``error:``, containing the row's ``needle``, and
  (unless the row says otherwise) no output written: the refusal came before the work;
- never a traceback or an internal error;
- every input file byte-identical afterwards;
- on exit 0, an output that passes ``onnx.checker`` (full check) and whose numerics follow the
  input in onnxruntime with graph optimizations disabled: bit-identical where the row's command
  claims to change nothing (its change log is empty, which is asserted too), within cosine 0.98
  where it quantizes.

Adding a row: write a builder ``def _my_case(tmp: Path) -> Run`` decorated with
``@case("name", exit=..., needle=...)``. Keep builders small; graph builders are at the top.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import qdqsurgeon.examples
from qdqsurgeon.cli import cli

from .helpers import F, random_feeds, run

pytestmark = pytest.mark.timeout(120)  # a row that blocks (reading a pipe) fails instead of hanging

# ----------------------------------------------------------------------------- the row type


@dataclass
class Run:
    """What a row's builder made: the command line and what to verify afterwards."""

    args: list[str]
    inputs: list[Path]  # files that must be byte-identical after the run
    output: Path | None = None  # the model written on exit 0
    reference: Path | None = None  # the model the output's numerics are compared with
    numerics: str = "none"  # "exact" (and an empty change log), "quantized" (cosine > 0.98) or "none"
    report: Path | None = None  # the --report file, read for "exact"
    feeds: dict[str, np.ndarray] = field(default_factory=dict)  # inputs for the numeric check (default: random)
    written_on_failure: bool = False  # else a refusal must come before the output is written


@dataclass(frozen=True)
class Case:
    """One row: a name, a builder that writes the files and returns the command, the accepted exits."""

    name: str
    build: Callable[[Path], Run]
    exit: tuple[int, ...]
    needle: str = ""  # must appear in the one error line


CASES: list[Case] = []


def case(name: str, *, exit: int | tuple[int, ...], needle: str = "") -> Callable[[Callable[[Path], Run]], Callable[[Path], Run]]:
    """Register the decorated builder as a table row."""

    def register(build: Callable[[Path], Run]) -> Callable[[Path], Run]:
        CASES.append(Case(name, build, exit if isinstance(exit, tuple) else (exit,), needle))
        return build

    return register


# ----------------------------------------------------------------------------- graph builders

RNG = np.random.default_rng(17)


def _save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def tiny_conv(opset: int = 17, graph_output_inside: bool = False) -> onnx.ModelProto:
    """x[1,3,16,16] -> Conv(8) -> Relu -> Conv(4) -> Relu -> y; optionally the first Relu is a graph output too."""
    w1 = (RNG.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
    w2 = (RNG.standard_normal((4, 8, 3, 3)) * 0.2).astype(np.float32)
    b1, b2 = RNG.standard_normal(8).astype(np.float32) * 0.1, RNG.standard_normal(4).astype(np.float32) * 0.1
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["y"], name="relu2"),
    ]
    outputs = [helper.make_tensor_value_info("y", F, [1, 4, 16, 16])]
    if graph_output_inside:
        outputs.append(helper.make_tensor_value_info("r1", F, [1, 8, 16, 16]))
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", F, [1, 3, 16, 16])], outputs,
                              [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))])
    if opset < 9:  # as exporters of that time wrote it: IR 3, every initializer also a graph input
        graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in graph.initializer)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 3 if opset < 9 else 8
    onnx.checker.check_model(model, full_check=True)
    return model


def qdq_relu(scale: float) -> onnx.ModelProto:
    """x -> Q(scale) -> DQ(scale) -> Relu -> y: a Q/DQ model with a chosen (possibly invalid) scale."""
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xdq"], name="dq"),
             helper.make_node("Relu", ["xdq"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", F, [1, 8])],
                              [helper.make_tensor_value_info("y", F, [1, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _model_file(tmp: Path, name: str = "model.onnx", **kw) -> Path:
    return _save(tiny_conv(**kw), tmp / name)


def _optimize(tmp: Path, src: Path, *extra: str, numerics: str = "quantized", report: bool = False) -> Run:
    out = tmp / "out" / "out.onnx"
    out.parent.mkdir(exist_ok=True)
    args = ["optimize", str(src), str(out), *extra]
    rep = None
    if report:
        rep = tmp / "out" / "changes.json"
        args += ["--report", str(rep)]
    return Run(args, [src], out, src, numerics, rep)


# ----------------------------------------------------------------------------- rows: files that are not models


@case("missing file", exit=2, needle="no such file")
def _missing(tmp: Path) -> Run:
    return Run(["optimize", str(tmp / "nope.onnx"), str(tmp / "o.onnx"), "--calib-random", "2"], [])


@case("directory as input", exit=2, needle="is a folder")
def _directory(tmp: Path) -> Run:
    (tmp / "dir.onnx").mkdir()
    return Run(["optimize", str(tmp / "dir.onnx"), str(tmp / "o.onnx"), "--calib-random", "2"], [])


@case("empty file", exit=1, needle="not an ONNX model")
def _empty(tmp: Path) -> Run:
    (tmp / "empty.onnx").write_bytes(b"")
    return Run(["inspect", str(tmp / "empty.onnx")], [tmp / "empty.onnx"])


@case("truncated file", exit=1, needle="not an ONNX model")
def _truncated(tmp: Path) -> Run:
    src = tmp / "cut.onnx"
    src.write_bytes(tiny_conv().SerializeToString()[:700])
    return _optimize(tmp, src, "--calib-random", "2")


@case("random bytes", exit=1, needle="not an ONNX model")
def _random_bytes(tmp: Path) -> Run:
    src = tmp / "noise.onnx"
    src.write_bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return _optimize(tmp, src, "--calib-random", "2")


@case("a pipe as input", exit=2, needle="not a regular file")
def _fifo(tmp: Path) -> Run:
    import os

    if not hasattr(os, "mkfifo"):
        pytest.skip("no named pipes on this platform")
    os.mkfifo(tmp / "pipe.onnx")  # reading it would block forever
    return Run(["inspect", str(tmp / "pipe.onnx")], [])


@case("an unknown option value", exit=2, needle="--method")
def _bad_option(tmp: Path) -> Run:
    return _optimize(tmp, _model_file(tmp), "--calib-random", "2", "--method", "median")


# ----------------------------------------------------------------------------- rows: output locations


@case("output in a missing folder", exit=2, needle="output folder does not exist")
def _missing_folder(tmp: Path) -> Run:
    src = _model_file(tmp)
    return Run(["optimize", str(src), str(tmp / "no" / "such" / "o.onnx"), "--calib-random", "2"], [src])


@case("output is the input", exit=2, needle="never overwrites its input")
def _output_is_input(tmp: Path) -> Run:
    src = _model_file(tmp)
    return Run(["optimize", str(src), str(src), "--calib-random", "2"], [src])


@case("output path is a folder", exit=2, needle="output path is a folder")
def _output_folder(tmp: Path) -> Run:
    src = _model_file(tmp)
    (tmp / "out.onnx").mkdir()
    return Run(["optimize", str(src), str(tmp / "out.onnx"), "--calib-random", "2"], [src])


@case("output inside a file", exit=2, needle="is a file, not a folder")
def _output_inside_file(tmp: Path) -> Run:
    src = _model_file(tmp)
    return Run(["optimize", str(src), str(src / "o.onnx"), "--calib-random", "2"], [src])


@case("unwritable output location", exit=2, needle="not writable")
def _unwritable(tmp: Path) -> Run:
    # Root ignores permission bits; /proc refuses to create files even for root.
    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux /proc")
    src = _model_file(tmp)
    return Run(["optimize", str(src), "/proc/qdqsurgeon-out.onnx", "--calib-random", "2"], [src])


@case("unwritable --report location", exit=2, needle="not writable")
def _unwritable_report(tmp: Path) -> Run:
    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux /proc")
    src = _model_file(tmp)
    return Run(["optimize", str(src), str(tmp / "o.onnx"), "--calib-random", "2", "--report", "/proc/r.json"], [src])


# ----------------------------------------------------------------------------- rows: calibration and check data


@case("missing calibration path", exit=2, needle="no such file")
def _bad_calib(tmp: Path) -> Run:
    return _optimize(tmp, _model_file(tmp), "--calib", str(tmp / "nowhere.npz"))


@case("calibration data of the wrong rank", exit=2, needle="the file's array has shape [4, 16, 16] (rank 3")
def _calib_rank(tmp: Path) -> Run:
    np.savez(tmp / "calib.npz", x=np.zeros((4, 16, 16), np.float32))
    run_ = _optimize(tmp, _model_file(tmp), "--calib", str(tmp / "calib.npz"))
    run_.inputs.append(tmp / "calib.npz")
    return run_


@case("all-NaN calibration data", exit=2, needle="no finite values")
def _calib_nan(tmp: Path) -> Run:
    np.savez(tmp / "calib.npz", x=np.full((4, 3, 16, 16), np.nan, np.float32))
    run_ = _optimize(tmp, _model_file(tmp), "--calib", str(tmp / "calib.npz"))
    run_.inputs.append(tmp / "calib.npz")
    return run_


@case("all-NaN check data", exit=2, needle="nothing to compare")
def _check_nan(tmp: Path) -> Run:
    src = _model_file(tmp)
    np.savez(tmp / "eval.npz", x=np.full((2, 3, 16, 16), np.nan, np.float32))
    return Run(["check", str(src), str(src), "--data", str(tmp / "eval.npz")], [src, tmp / "eval.npz"])


@case("optimize --check on all-NaN data", exit=2, needle="nothing to compare")
def _optimize_check_nan(tmp: Path) -> Run:
    np.savez(tmp / "calib.npz", x=np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32))
    np.savez(tmp / "eval.npz", x=np.full((2, 3, 16, 16), np.nan, np.float32))
    run_ = _optimize(tmp, _model_file(tmp), "--calib", str(tmp / "calib.npz"), "--check", "--eval", str(tmp / "eval.npz"))
    run_.inputs += [tmp / "calib.npz", tmp / "eval.npz"]
    run_.written_on_failure = True  # the model is saved, then the check finds nothing to compare
    return run_


@case("optimize --check data of the wrong shape", exit=2, needle="axis 1 the data has 5")
def _optimize_check_shape(tmp: Path) -> Run:
    # Refused before calibration, not after the whole run.
    np.savez(tmp / "eval.npz", x=np.zeros((2, 5, 16, 16), np.float32))
    run_ = _optimize(tmp, _model_file(tmp), "--calib-random", "2", "--check", "--eval", str(tmp / "eval.npz"))
    run_.inputs.append(tmp / "eval.npz")
    return run_


# ----------------------------------------------------------------------------- rows: graphs


@case("a cycle", exit=1, needle="the graph has a cycle: conv1 -> relu1 -> conv1")
def _cycle(tmp: Path) -> Run:
    model = tiny_conv()
    model.graph.node[0].input[0] = "r1"  # conv1 reads relu1's output, which reads conv1's
    return _optimize(tmp, _save(model, tmp / "cycle.onnx"), "--calib-random", "2")


@case("unknown operator domain", exit=1, needle="unknown opset domain 'com.example.nowhere'")
def _unknown_domain(tmp: Path) -> Run:
    model = tiny_conv()
    node = model.graph.node[1]
    node.domain, node.op_type = "com.example.nowhere", "Frobnicate"
    model.opset_import.append(helper.make_opsetid("com.example.nowhere", 1))
    return _optimize(tmp, _save(model, tmp / "domain.onnx"), "--calib-random", "2")


# Another part of the code is moving to an automatic opset upgrade: a clear refusal or a valid,
# numerically faithful upgrade are both right; anything else (a traceback, a silent damage) is not.
@case("opset 7 model", exit=(0, 1), needle="opset")
def _opset7(tmp: Path) -> Run:
    return _optimize(tmp, _save(tiny_conv(opset=7), tmp / "old.onnx"), "--calib-random", "8")


@case("Q/DQ with a zero scale", exit=1, needle="zero scale")
def _zero_scale(tmp: Path) -> Run:
    return _optimize(tmp, _save(qdq_relu(0.0), tmp / "zero.onnx"))


@case("Q/DQ with a zero scale, --repair-zero-scales", exit=0)
def _zero_scale_repaired(tmp: Path) -> Run:
    # The fix pipeline logs the repair (0 -> 1e-8, V1) and then drops the pair, read only by a
    # float Relu (P2): the output follows the change log, not the input's division by zero.
    return _optimize(tmp, _save(qdq_relu(0.0), tmp / "zero.onnx"), "--repair-zero-scales", numerics="none")


@case("Q/DQ with a negative scale", exit=1, needle="scale")
def _negative_scale(tmp: Path) -> Run:
    return _optimize(tmp, _save(qdq_relu(-0.05), tmp / "negative.onnx"))


@case("intermediate tensor that is also a graph output", exit=0)
def _graph_output_inside(tmp: Path) -> Run:
    return _optimize(tmp, _save(tiny_conv(graph_output_inside=True), tmp / "two_outputs.onnx"), "--calib-random", "8")


# ----------------------------------------------------------------------------- rows: ordinary runs, as a control


@case("float model, PTQ on random calibration", exit=0)
def _ptq(tmp: Path) -> Run:
    return _optimize(tmp, _model_file(tmp), "--calib-random", "8")


@case("float model, passes that change nothing", exit=0)
def _no_op_passes(tmp: Path) -> Run:
    return _optimize(tmp, _model_file(tmp), "--passes", "dedupe-qdq,fold-qdq-pairs", numerics="exact", report=True)


@case("Q/DQ model, fix pipeline on a valid model", exit=0)
def _fix_valid(tmp: Path) -> Run:
    return _optimize(tmp, _save(qdq_relu(0.05), tmp / "qdq.onnx"), numerics="none")


# ----------------------------------------------------------------------------- the test


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _check_output(r: Run) -> None:
    assert r.output is not None and r.output.is_file(), "exit 0 without an output model"
    out = onnx.load(str(r.output))
    onnx.checker.check_model(out, full_check=True)
    if r.numerics == "none" or r.reference is None:
        return
    ref = onnx.load(str(r.reference))
    feeds = r.feeds or random_feeds(ref, seed=1)
    want, got = run(ref, feeds), run(out, feeds)
    assert len(want) == len(got)
    if r.numerics == "exact":
        assert r.report is not None, "an 'exact' row needs --report to show that nothing changed"
        changes = [c for c in json.loads(r.report.read_text())["changes"] if c["kind"] != "note"]
        assert changes == [], changes
        for w, g in zip(want, got):
            np.testing.assert_array_equal(w, g)
    else:
        for w, g in zip(want, got):
            assert w.shape == g.shape and np.isfinite(g).all()
            assert _cosine(w, g) > 0.98


@pytest.mark.parametrize("row", CASES, ids=[c.name for c in CASES])
def test_reliability(row: Case, tmp_path: Path) -> None:
    r = row.build(tmp_path)
    before = {p: _sha(p) for p in r.inputs}
    result = CliRunner().invoke(cli, r.args)
    text = result.stdout + result.stderr
    assert "Traceback" not in text and "internal error" not in text, text
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code in row.exit, (result.exit_code, result.stderr)
    for p, sha in before.items():
        assert _sha(p) == sha, f"{p} was modified"
    if result.exit_code == 0:
        _check_output(r)
    else:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert row.needle in lines[0], lines[0]
        if r.output is not None and not r.written_on_failure:
            assert not r.output.exists(), "refused only after the output was written"


def test_table_names_are_unique() -> None:
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
