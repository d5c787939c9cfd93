"""The click commands, invoked directly with CliRunner (the lead registers them in the main group)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from trt_helpers import MB_QAT, MB_QAT_PROFILE, MB_RES, MB_RES_PROFILE, raw, write_json

from qdqsurgeon.errors import ModelError, QdqError, UsageError
from qdqsurgeon.trt.commands import build_command, engine_diff_command, engine_report_command


@pytest.mark.parametrize(("cmd", "name"), [(build_command, "build"), (engine_report_command, "engine-report"), (engine_diff_command, "engine-diff")])
def test_help_has_an_example(cmd, name) -> None:
    assert cmd.name == name
    result = CliRunner().invoke(cmd, ["--help"])
    assert result.exit_code == 0
    assert "Example" in result.output and f"qdqsurgeon {name}" in result.output


@pytest.mark.usefixtures("engines")
def test_engine_report_json(tmp_path) -> None:
    result = CliRunner().invoke(engine_report_command, [str(MB_QAT), "--profile", str(MB_QAT_PROFILE), "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.output)
    layers = raw(MB_QAT)["Layers"]
    assert d["layers"] == len(layers)
    assert d["standalone_qdq_layers"] == sum(1 for l in layers if l.get("Origin") == "QDQ")
    assert d["reformat_layers"] == sum(1 for l in layers if l.get("Origin") == "REFORMAT")
    assert isinstance(d["total_time_ms"], float)
    assert sum(d["layer_types"].values()) == len(layers)
    assert {"rule", "layer", "onnx_nodes", "message", "fix_pass"} <= set(d["findings"][0])
    assert len(d["layer_details"]) == len(layers)


@pytest.mark.usefixtures("engines")
def test_engine_report_text_and_html(tmp_path) -> None:
    out = tmp_path / "r.html"
    result = CliRunner().invoke(engine_report_command, [str(MB_RES), "--html", str(out), "--per-layer"])
    assert result.exit_code == 0, result.output
    assert "standalone Q/DQ layers: 2" in result.output
    assert "total time: n/a" in result.output  # no --profile → null/n-a
    assert "quantize-pooling" in result.output
    assert out.exists() and out.read_text().startswith("<!DOCTYPE html>")
    no_profile = json.loads(CliRunner().invoke(engine_report_command, [str(MB_RES), "--json"]).output)
    assert no_profile["total_time_ms"] is None


@pytest.mark.usefixtures("engines")
def test_engine_diff_json() -> None:
    args = [str(MB_QAT), str(MB_RES), "--profile-a", str(MB_QAT_PROFILE), "--profile-b", str(MB_RES_PROFILE), "--json"]
    result = CliRunner().invoke(engine_diff_command, args)
    assert result.exit_code == 0, result.output
    d = json.loads(result.output)
    assert d["delta"]["standalone_qdq_layers"] < 0 and d["delta"]["reformat_type_layers"] < 0


def _fails_with(result, exc_type) -> None:
    assert result.exit_code != 0
    assert isinstance(result.exception, QdqError), result.exception
    assert isinstance(result.exception, exc_type)
    assert "\n" not in str(result.exception)  # one clear line


def test_errors_are_qdq_errors(tmp_path) -> None:
    runner = CliRunner()
    _fails_with(runner.invoke(engine_report_command, [str(tmp_path / "missing.json")]), UsageError)
    bad = tmp_path / "bad.json"
    bad.write_text("garbage {")
    _fails_with(runner.invoke(engine_report_command, [str(bad)]), ModelError)
    other = write_json(tmp_path / "other.json", {"hello": "world"})
    _fails_with(runner.invoke(engine_report_command, [str(other)]), ModelError)
    _fails_with(runner.invoke(engine_diff_command, [str(other), str(other)]), ModelError)
    layers = write_json(tmp_path / "l.json", {"Layers": ["a"]})
    _fails_with(runner.invoke(engine_report_command, [str(layers), "--profile", str(other)]), ModelError)


@pytest.mark.usefixtures("engines")
def test_engine_report_metadata_option(tmp_path) -> None:
    from trt_helpers import ENGINES

    cookbook = ENGINES / "trt10_mnist_cookbook"
    layers = cookbook / "model-trained-exportLayerInfo.log"
    runner = CliRunner()
    result = runner.invoke(engine_report_command, [str(layers), "--metadata", str(cookbook / "result-04.log"), "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.output)
    assert d["metadata"]["TensorRT"] == "10.16.1" and d["metadata"]["GPU"] == "NVIDIA H100 PCIe"
    text = runner.invoke(engine_report_command, [str(layers), "--metadata", str(cookbook / "result-04.log")]).output
    assert "built on: GPU NVIDIA H100 PCIe, compute capability 9.0, TensorRT 10.16.1" in text
    # A named file without any of the fields, or a missing one: one clear error, not a silent empty card row.
    _fails_with(runner.invoke(engine_report_command, [str(layers), "--metadata", str(cookbook / "main.sh")]), ModelError)
    _fails_with(runner.invoke(engine_report_command, [str(layers), "--metadata", str(tmp_path / "no.log")]), UsageError)


@pytest.mark.usefixtures("engines")
def test_engine_report_json_groups_findings() -> None:
    d = json.loads(CliRunner().invoke(engine_report_command, [str(MB_QAT), "--profile", str(MB_QAT_PROFILE), "--json"]).output)
    groups = d["finding_groups"]
    assert sum(g["findings"] for g in groups) == len(d["findings"])
    assert {f["pattern"] for f in d["findings"]} == {g["pattern"] for g in groups}
    assert sum(g["time_ms"] for g in groups) == pytest.approx(d["qdq_time_ms"])
