"""Every published engine dump in ../shared/models/engines parses, and the report's figures
match the files. Expected figures are computed here from the raw JSON with plain sums, never
from the parser and never hard-coded (E1)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from trt_helpers import MB_QAT, MB_QAT_PROFILE, MB_RES, MB_RES_PROFILE, raw

from qdqsurgeon.trt.engine import load_layer_info
from qdqsurgeon.trt.report import engine_report

pytestmark = pytest.mark.usefixtures("engines")


def _profile_for(graph: Path) -> Path | None:
    if graph.name.endswith(".graph.json"):
        p = graph.with_name(graph.name.replace(".graph.json", ".profile.json"))
        return p if p.exists() else None
    if graph.name == "detr-layer-info.json":
        return graph.with_name("detr-profile.json")
    return None


def _raw_counts(graph: Path) -> dict[str, object]:
    layers = raw(graph)["Layers"]
    origins = Counter(l.get("Origin") for l in layers if isinstance(l, dict) and l.get("Origin"))
    return {
        "layers": len(layers),
        "qdq": origins.get("QDQ", 0),
        "reformat": origins.get("REFORMAT", 0),
        "reformat_type": sum(1 for l in layers if l.get("LayerType") == "Reformat"),
        "types": Counter(l.get("ParameterType") or l.get("LayerType") for l in layers),
    }


def _raw_total_ms(profile: Path) -> float:
    return sum(r["averageMs"] for r in raw(profile) if "name" in r)


def test_every_dump_in_the_folder_parses(engines: Path) -> None:
    dumps = sorted(engines.rglob("*.graph.json")) + sorted(engines.rglob("*layer-info*.json")) + sorted(engines.rglob("*exportLayerInfo*"))
    assert len(dumps) >= 7
    for path in dumps:
        report = engine_report(path, profile=_profile_for(path))
        assert report.layers == len(raw(path)["Layers"]) > 0, path


@pytest.mark.parametrize(
    ("graph", "profile"),
    [(MB_QAT, MB_QAT_PROFILE), (MB_RES, MB_RES_PROFILE)],
    ids=["mobilenet.qat", "mobilenet_v2_residuals.qat"],
)
def test_mobilenet_counts_and_time_match_the_files(graph: Path, profile: Path) -> None:
    expect = _raw_counts(graph)
    report = engine_report(graph, profile=profile)
    assert report.detailed
    assert report.layers == expect["layers"]
    # E1: Reformat layers split by Origin, QDQ = standalone Q/DQ kernels, REFORMAT = layout copies.
    assert report.standalone_qdq_layers == expect["qdq"]
    assert report.reformat_layers == expect["reformat"]
    assert report.reformat_type_layers == expect["reformat_type"]
    assert report.reformat_layers_by_origin == {"QDQ": expect["qdq"], "REFORMAT": expect["reformat"]}
    assert report.layer_types == dict(expect["types"])
    assert report.total_time_ms == pytest.approx(_raw_total_ms(profile), rel=1e-12)
    assert report.unmatched_profile_records == 0
    # The per-layer times add up to the total, and every layer is in exactly one time class.
    assert sum(r.time_ms for r in report.rows if r.time_ms is not None) == pytest.approx(report.total_time_ms)
    qdq_ms = sum(r["averageMs"] for r in raw(profile)[1:] if r["name"] in {l["Name"] for l in raw(graph)["Layers"] if l.get("Origin") == "QDQ"})
    assert report.qdq_time_ms == pytest.approx(qdq_ms)


def test_mobilenet_qat_findings_point_at_residual_and_pooling() -> None:
    report = engine_report(MB_QAT, profile=MB_QAT_PROFILE)
    layers = raw(MB_QAT)["Layers"]
    by_fix = Counter(f.fix_pass for f in report.findings)
    # Every standalone Q/DQ (float → Int8) is an E2 precision-changing reformat ...
    qdq_names = {l["Name"] for l in layers if l.get("Origin") == "QDQ"}
    assert {f.layer for f in report.findings if f.layer in qdq_names} == qdq_names
    # ... and every INT8 conv writing float that is quantized again is an E2 too.
    int8_to_float = [
        l["Name"]
        for l in layers
        if l.get("ParameterType") == "Convolution"
        and "Int8" in l["Inputs"][0]["Format/Datatype"]
        and "Int8" not in l["Outputs"][0]["Format/Datatype"]
        and not l["Name"].startswith("classifier")  # final FC feeds the float output (P9): fine
    ]
    assert {f.layer for f in report.findings if f.layer not in qdq_names} == set(int8_to_float)
    assert all(f.rule == "E2" for f in report.findings)
    # Network-input Quantize: expected (P10), no pass. GAP in float: P7. The rest: residual Adds (P3).
    assert by_fix[None] == 1
    assert by_fix["quantize-pooling"] == 2
    assert by_fix["quantize-residual"] == len(report.findings) - 3
    residual_adds = [f for f in report.findings if "Add_144" in f.layer]
    assert residual_adds and residual_adds[0].fix_pass == "quantize-residual"
    assert "Conv_142" in residual_adds[0].onnx_nodes


def test_mobilenet_residuals_engine_keeps_only_the_pooling_finding() -> None:
    report = engine_report(MB_RES, profile=MB_RES_PROFILE)
    fixes = sorted((f.fix_pass or "-") for f in report.findings)
    assert fixes == ["-", "quantize-pooling", "quantize-pooling"]


def test_detr_names_only(engines: Path) -> None:
    graph = engines / "detr_implicit_int8_names_only" / "detr-layer-info.json"
    profile = engines / "detr_implicit_int8_names_only" / "detr-profile.json"
    doc = raw(graph)
    assert all(isinstance(x, str) for x in doc["Layers"])
    report = engine_report(graph, profile=profile)
    assert not report.detailed
    assert report.layers == len(doc["Layers"])
    assert report.layer_types == {}
    assert report.reformat_layers == sum(1 for n in doc["Layers"] if n.startswith("Reformatting CopyNode"))
    assert report.total_time_ms == pytest.approx(_raw_total_ms(profile))
    assert report.int8_compute_time_ms is None  # no precisions in a names-only dump
    assert report.findings == []
    assert "names-only" in report.to_text()


def test_trt10_cookbook_log(engines: Path) -> None:
    path = engines / "trt10_mnist_cookbook" / "model-trained-exportLayerInfo.log"
    eng = load_layer_info(path)
    doc = raw(path)
    assert eng.detailed and len(eng.layers) == len(doc["Layers"])
    # TRT 10 bare type names and Metadata with both separators (E4).
    assert eng.layers[0].in_precisions == ["fp32"]
    assert eng.layers[0].onnx_names() == ["node_conv2d", "node_relu"]
    gemm = next(l for l in eng.layers if l.layer_type == "gemm")
    assert gemm.onnx_names() == ["node_linear", "node_relu_2"]
    assert "int64" in eng.layers[-1].out_precisions
    assert [t.name for t in eng.io_tensors] == doc["Bindings"]


def test_trtexec_dump_layer_info_log_is_rejected_clearly(engines: Path) -> None:
    from qdqsurgeon.errors import ModelError

    # result-04.log holds --dumpLayerInfo text, not JSON: one clear error, not a crash.
    with pytest.raises(ModelError):
        load_layer_info(engines / "trt10_mnist_cookbook" / "result-04.log")


@pytest.mark.parametrize("variant", ["fp32", "fp16", "qat"])
def test_tf_resnet50_dumps(engines: Path, variant: str) -> None:
    folder = engines / "trex_tf_resnet50_rtx3090" / variant
    (graph,) = folder.glob("*.graph.json")
    expect = _raw_counts(graph)
    report = engine_report(graph, profile=_profile_for(graph))
    assert report.layers == expect["layers"]
    assert report.standalone_qdq_layers == expect["qdq"]
    assert report.reformat_layers == expect["reformat"]
    assert report.total_time_ms == pytest.approx(_raw_total_ms(_profile_for(graph)))
    if variant == "qat":
        assert report.int8_compute_time_ms > report.float_compute_time_ms
        # The only standalone Q/DQ quantizes the network input (after a Pad): expected, P10.
        assert [(f.rule, f.fix_pass, f.severity) for f in report.findings] == [("E2", None, "info")]
    else:
        assert report.int8_compute_time_ms == 0
        assert all(f.fix_pass is None for f in report.findings)
