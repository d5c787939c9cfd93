"""The build command: shape flags, profile format, the no-TensorRT path (exit 3), and the real
TensorRT path behind the ``tensorrt`` marker (skipped where TensorRT is not installed)."""

from __future__ import annotations

import json
import sys

import click
import pytest
from click.testing import CliRunner
from trt_helpers import qdq_conv_model

from qdqsurgeon.errors import TensorRTMissingError, UsageError
from qdqsurgeon.trt.build import ShapeRange, build_engine, normalise_shapes, parse_shapes, profile_records, shape_ranges
from qdqsurgeon.trt.commands import build_command
from qdqsurgeon.trt.engine import load_layer_info, parse_profile

MISSING = "TensorRT is not installed: pip install tensorrt (needs an NVIDIA GPU)"


# --------------------------------------------------------------------------- shape flags


def test_parse_shapes() -> None:
    assert parse_shapes("input:1x3x224x224,mask:1x128") == {"input": (1, 3, 224, 224), "mask": (1, 128)}
    assert parse_shapes("input_1:0:8x3x224x224") == {"input_1:0": (8, 3, 224, 224)}  # name ends at the last colon
    assert parse_shapes(None) == {} and parse_shapes(" ") == {}
    assert parse_shapes("x:1X3") == {"x": (1, 3)}


@pytest.mark.parametrize("bad", ["input", ":1x3", "x:1xa", "x:1x-3", "x:1,x:2"])
def test_parse_shapes_errors(bad: str) -> None:
    with pytest.raises(UsageError, match="--opt-shapes"):
        parse_shapes(bad, flag="--opt-shapes")


def test_shape_ranges() -> None:
    r = shape_ranges(parse_shapes("x:1x3"), parse_shapes("x:4x3"), parse_shapes("x:8x3"))
    assert r == {"x": ShapeRange((1, 3), (4, 3), (8, 3))}
    # Like trtexec: a lone opt shape fixes min and max too.
    assert shape_ranges({}, {"x": (2, 3)}, {}) == {"x": ShapeRange((2, 3), (2, 3), (2, 3))}
    with pytest.raises(UsageError, match="min <= opt <= max"):
        shape_ranges({"x": (4, 3)}, {"x": (2, 3)}, {})
    with pytest.raises(UsageError, match="rank"):
        shape_ranges({"x": (1, 3, 3)}, {"x": (2, 3)}, {})


def test_normalise_shapes_for_the_python_api() -> None:
    fixed = ShapeRange((1, 3, 8, 8), (1, 3, 8, 8), (1, 3, 8, 8))
    assert normalise_shapes({"x": (1, 3, 8, 8)}) == {"x": fixed}
    assert normalise_shapes("x:1x3x8x8") == {"x": fixed}
    assert normalise_shapes({"x": fixed}) == {"x": fixed}
    assert normalise_shapes(None) == {}
    with pytest.raises(UsageError):
        normalise_shapes({"x": "1x3"})


def test_profile_records_are_trtexec_export_profile_format() -> None:
    recs = profile_records({"conv": [1.0, 3.0, 2.0], "q": [0.5, 0.5, 0.5]}, order=["q", "conv"])
    assert recs[0] == {"count": 3}
    assert [r["name"] for r in recs[1:]] == ["q", "conv"]
    conv = recs[2]
    assert conv["timeMs"] == 6.0 and conv["averageMs"] == 2.0 and conv["medianMs"] == 2.0
    assert conv["percentage"] == pytest.approx(80.0)
    # And the report's parser reads it back.
    prof = parse_profile(json.loads(json.dumps(recs)))
    assert prof.count == 3 and prof.total_average_ms == pytest.approx(2.5)


# --------------------------------------------------------------------------- without TensorRT


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import tensorrt`` fail even where it is installed (blocks it; fakes nothing)."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def _main_group() -> click.Group:
    """The real qdqsurgeon group when it has the command; else its error wrapper around ours."""
    from qdqsurgeon import cli as cli_module

    if "build" in cli_module.cli.commands:
        return cli_module.cli
    group_cls = getattr(cli_module, "_Group", None)
    if group_cls is None:
        pytest.skip("qdqsurgeon.cli has neither the build command nor its error-handling group")
    group = group_cls(name="qdqsurgeon")
    group.add_command(build_command)
    return group


@pytest.mark.usefixtures("no_tensorrt")
def test_build_without_tensorrt_exits_3_with_one_line(tmp_path) -> None:
    model = qdq_conv_model(tmp_path / "m.onnx")
    result = CliRunner().invoke(_main_group(), ["build", str(model), "--engine", str(tmp_path / "m.plan")])
    assert result.exit_code == 3, result.output
    assert result.stderr.strip().splitlines() == [f"error: {MISSING}"]
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    assert not (tmp_path / "m.plan").exists()


@pytest.mark.usefixtures("no_tensorrt")
def test_build_command_raises_tensorrt_missing(tmp_path) -> None:
    model = qdq_conv_model(tmp_path / "m.onnx")
    result = CliRunner().invoke(build_command, [str(model), "--engine", str(tmp_path / "m.plan")])
    assert isinstance(result.exception, TensorRTMissingError)
    assert str(result.exception) == MISSING and result.exception.exit_code == 3
    with pytest.raises(TensorRTMissingError):
        build_engine(model, tmp_path / "m.plan")


@pytest.mark.usefixtures("no_tensorrt")
def test_bad_arguments_fail_before_tensorrt_is_needed(tmp_path) -> None:
    with pytest.raises(UsageError, match="file not found"):
        build_engine(tmp_path / "missing.onnx", tmp_path / "m.plan")
    model = qdq_conv_model(tmp_path / "m.onnx")
    result = CliRunner().invoke(build_command, [str(model), "--engine", str(tmp_path / "m.plan"), "--opt-shapes", "x:1xz"])
    assert isinstance(result.exception, UsageError) and result.exit_code != 0
    with pytest.raises(UsageError, match="--workspace"):
        build_engine(model, tmp_path / "m.plan", workspace_mb=0)


# --------------------------------------------------------------------------- with TensorRT


@pytest.mark.tensorrt
def test_tensorrt_build_writes_engine_and_layer_info(tmp_path) -> None:
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (needs an NVIDIA GPU)")
    model = qdq_conv_model(tmp_path / "m.onnx")
    result = build_engine(model, tmp_path / "m.plan", layer_info=tmp_path / "m.layers.json", profile=tmp_path / "m.profile.json", workspace_mb=256)
    assert result.engine_path.stat().st_size == result.engine_bytes > 0
    assert result.strongly_typed
    eng = load_layer_info(tmp_path / "m.layers.json")
    assert eng.detailed  # DETAILED verbosity was set
    # F1: Q/DQ on the activation and the weight give an INT8 conv.
    assert any(l.is_compute and l.activation_precision == "int8" for l in eng.layers)
    if result.profile_path is not None:
        names = {l.name for l in eng.layers}
        prof = json.loads(result.profile_path.read_text())
        assert prof[0]["count"] >= 1 and {r["name"] for r in prof[1:]} <= names
    else:
        assert any("profiling needs" in n for n in result.notes)


@pytest.mark.tensorrt
def test_tensorrt_parser_error_names_the_node(tmp_path) -> None:
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (needs an NVIDIA GPU)")
    from qdqsurgeon.errors import ModelError

    model = qdq_conv_model(tmp_path / "bad.onnx", bad_op=True)
    with pytest.raises(ModelError, match="Relu_6|NoSuchOp"):
        build_engine(model, tmp_path / "bad.plan")
    assert not (tmp_path / "bad.plan").exists()
