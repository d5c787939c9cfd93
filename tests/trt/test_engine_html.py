"""HTML report: self-contained (no network references), every layer name whole, findings grouped
by pattern with their cost, rule IDs explained, GPU/TensorRT cards; rendered in headless Chromium,
where its script runs (data-ok, data-names-whole), sorts the layer table (#sort=key:dir) and
marks a layer (#layer=N)."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from trt_helpers import ENGINES, MB_QAT, MB_QAT_PROFILE, MB_RES, raw

from qdqsurgeon.trt.html import COLOURS, render_html, wrap_name, write_html
from qdqsurgeon.trt.report import RULE_TEXT, engine_report

COOKBOOK = ENGINES / "trt10_mnist_cookbook"

pytestmark = pytest.mark.usefixtures("engines")


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not on PATH: cannot render the HTML report")
    return exe


def _chromium_args(exe: str, profile_dir: Path) -> list[str]:
    return [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile_dir}",
        "--window-size=1280,900",
    ]


def _dump_dom(exe: str, profile_dir: Path, url: str) -> str:
    """The DOM after the page's scripts ran (stderr appended for a failing assertion's message)."""
    run = subprocess.run([*_chromium_args(exe, profile_dir), "--dump-dom", url], capture_output=True, text=True, timeout=120)
    return run.stdout + "\n<!-- stderr: " + run.stderr[-2000:] + " -->"


def test_html_is_self_contained() -> None:
    page = render_html(engine_report(MB_QAT, profile=MB_QAT_PROFILE))
    assert "http://" not in page and "https://" not in page
    # No external resources of any kind: no src=, no <link>, no url(...) other than none.
    assert not re.search(r"<(link|img|iframe)\b", page)
    assert not re.search(r"\bsrc\s*=", page)
    assert "url(" not in page
    assert page.count('class="box ') == len(raw(MB_QAT)["Layers"])


def _labels(page: str) -> dict[str, str]:
    """data-name → the text of the name lines of each SVG layer label."""
    out = {}
    for m in re.finditer(r'<text class="label"[^>]*data-name="([^"]*)">(.*?)</text>', page):
        lines = re.findall(r'<tspan class="nm"[^>]*>(.*?)</tspan>', m.group(2))
        out[html.unescape(m.group(1))] = "".join(html.unescape(x) for x in lines)
    return out


def test_written_atomically_with_the_usual_file_mode(tmp_path) -> None:
    import os

    page = write_html(engine_report(MB_RES), tmp_path / "r.html")
    umask = os.umask(0)
    os.umask(umask)
    assert page.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]  # no temporary file left behind


def test_wrap_name_breaks_only_between_tokens() -> None:
    name = "features.2.conv.2.weight + QuantizeLinear_90 + Conv_94 + (Unnamed Layer* 849) [Shuffle]_output"
    lines = wrap_name(name, 30)
    assert "".join(lines) == name and len(lines) > 1
    assert all(len(line.rstrip()) <= 30 and line.endswith(" ") for line in lines[:-1])
    long_token = "x" * 50
    assert wrap_name(f"a {long_token} b", 30) == ["a ", f"{long_token} ", "b"]  # whole, on its own line
    scope = "resnet50/quant_conv1_conv/LastValueQuant/QuantizeAndDequantizeV4/ReadVariableOp:0 + Q"
    lines = wrap_name(scope, 40)
    assert "".join(lines) == scope and all(line.endswith(("/", " ")) for line in lines[:-1])


def test_every_layer_name_is_whole_and_in_the_table() -> None:
    layers = raw(MB_QAT)["Layers"]
    page = render_html(engine_report(MB_QAT, profile=MB_QAT_PROFILE))
    labels = _labels(page)
    names = [l["Name"] for l in layers]
    assert max(len(n) for n in names) > 150  # the classifier's name: the old label cut it with "..."
    assert labels == {n: n for n in names}
    table = re.search(r'<table id="layers".*?</table>', page, re.S).group(0)
    assert len(re.findall(r"<tr id=\"row-", table)) == len(layers)
    for n in names:
        assert f'data-v="{html.escape(n)}"' in table


def test_findings_grouped_by_pattern_with_their_cost() -> None:
    report = engine_report(MB_QAT, profile=MB_QAT_PROFILE)
    groups = report.finding_groups()
    assert [(g.pattern, g.fix_pass, g.severity, len(g.findings)) for g in groups] == [
        ("E2/P3", "quantize-residual", "warning", 30),
        ("E2/P7", "quantize-pooling", "warning", 2),
        ("E2/P10", None, "info", 1),
    ]
    # The cost of a group is the time of the standalone Quantize layers its pass removes: independently,
    # from the raw dumps, every Origin QDQ layer is charged to exactly one group.
    layers = raw(MB_QAT)["Layers"]
    qdq = {i for i, l in enumerate(layers) if l.get("Origin") == "QDQ"}
    charged = [i for g in groups for i in g.cost_layers]
    assert sorted(charged) == sorted(qdq)
    times = {r["name"]: r["averageMs"] for r in raw(MB_QAT_PROFILE) if "name" in r}
    for g in groups:
        assert g.time_ms == pytest.approx(sum(times[layers[i]["Name"]] for i in g.cost_layers))
    assert groups[0].time_ms > groups[1].time_ms > 0
    assert sum(g.time_ms for g in groups) == pytest.approx(report.qdq_time_ms)

    page = render_html(report)
    rows = re.findall(r'<tr class="group" data-pattern="([^"]+)">(.*?)</tr>', page, re.S)
    assert [p for p, _ in rows] == ["E2/P3", "E2/P7", "E2/P10"]
    assert f"{groups[0].time_ms:.4f} ms" in rows[0][1] and "quantize-residual" in rows[0][1]
    assert 'class="sev warning"' in rows[0][1] and 'class="sev info"' in rows[2][1]
    slow = re.search(r'<ol id="slowest">(.*?)</ol>', page, re.S).group(1)
    fastest_listed = sorted(times.values(), reverse=True)[9]
    assert slow.count("<li ") == 10 and f"{fastest_listed:.4f} ms" in slow


def test_rule_ids_are_explained_on_hover() -> None:
    pages = [render_html(engine_report(MB_QAT, profile=MB_QAT_PROFILE)), render_html(engine_report(MB_RES))]
    for page in pages:
        abbrs = re.findall(r'<abbr class="rule" title="([^"]*)">([^<]+)</abbr>', page)
        assert {rid for _, rid in abbrs} >= {"E2", "P3" if page is pages[0] else "P7", "P10"}
        for title, rid in abbrs:
            assert html.unescape(title) == f"{rid}: {RULE_TEXT[rid]}"
        # No rule ID in a finding message is left without its explanation.
        for msg in re.findall(r'<tr class="f".*?</tr>', page, re.S):
            bare = re.sub(r"<abbr[^>]*>[^<]*</abbr>", "", msg)
            assert not re.search(r"\((?:[CEFPV]\d+)\)", bare), bare


def test_gpu_and_tensorrt_cards() -> None:
    # TREx's *.metadata.json beside the graph file is picked up on its own (no TensorRT version in it).
    report = engine_report(MB_QAT, profile=MB_QAT_PROFILE)
    device = raw(MB_QAT.with_name("mobilenet.qat.onnx.engine.profile.metadata.json"))["device_information"]
    assert report.metadata["GPU"] == device["Selected Device"] == "NVIDIA TITAN RTX"
    assert report.metadata["compute capability"] == "7.5" and "TensorRT" not in report.metadata
    page = render_html(report)
    cards = re.search(r'<div class="cards" id="metadata">(.*?)</div></div>', page, re.S).group(1)
    assert "NVIDIA TITAN RTX" in cards and "FP32+FP16+INT8" in cards
    # A trtexec log named on the command line gives the TensorRT version (TensorRT 10.16 cookbook).
    log = COOKBOOK / "result-04.log"
    report = engine_report(COOKBOOK / "model-trained-exportLayerInfo.log", metadata=[log])
    version = re.search(r"TensorRT version: (\S+)", log.read_text()).group(1)
    assert report.metadata["TensorRT"] == version == "10.16.1"
    assert report.metadata["GPU"] == "NVIDIA H100 PCIe"
    assert '<b>10.16.1</b><span>TensorRT</span>' in render_html(report)
    # Nothing beside the dump, no option: no cards (and no invented values).
    bare = engine_report(ENGINES / "detr_implicit_int8_names_only" / "detr-layer-info.json")
    assert bare.metadata == {} and 'id="metadata"' not in render_html(bare)


def test_html_renders_in_headless_chromium(tmp_path) -> None:
    exe = _chromium()
    report = engine_report(MB_QAT, profile=MB_QAT_PROFILE)
    page = write_html(report, tmp_path / "mobilenet.qat.html")
    png = tmp_path / "shot.png"
    url = page.resolve().as_uri()
    shot = subprocess.run(
        [*_chromium_args(exe, tmp_path / "profile1"), f"--screenshot={png}", url],
        capture_output=True, text=True, timeout=120,
    )
    assert png.exists(), shot.stderr[-2000:]

    from PIL import Image

    img = Image.open(png).convert("RGB")
    assert img.size == (1280, 900)
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, boxes, edges: far from a blank page
    dominant = max(c for c, _ in colours)
    assert dominant < 0.95 * img.size[0] * img.size[1]
    present = {rgb for _, rgb in colours}
    for key in ("int8", "qdq"):  # the INT8 kernels and the standalone Q/DQ boxes are on screen
        want = tuple(int(COLOURS[key][i : i + 2], 16) for i in (1, 3, 5))
        assert any(sum(abs(a - b) for a, b in zip(want, rgb)) < 12 for rgb in present), key

    # The page's script ran: it stamps the number of layer boxes and prefixes the title.
    dom = _dump_dom(exe, tmp_path / "profile2", url)
    assert f'data-ok="{report.layers}"' in dom, dom[-2000:]
    assert "<title>[ok] " in dom
    # Measured by the browser: every label holds the whole name and ends inside the drawing.
    assert f'data-names-whole="{report.layers}"' in dom


def _rows_after_sort(exe: str, page: Path, profile: Path, fragment: str) -> tuple[str, list[list[str]]]:
    """The layer table as the browser left it after the page's own sort (#sort=key:dir → header click)."""
    dom = _dump_dom(exe, profile, page.resolve().as_uri() + fragment)
    table = re.search(r'<table id="layers"([^>]*)>(.*?)</table>', dom, re.S)
    assert table, dom[-2000:]
    rows = re.findall(r'<tr id="row-\d+"[^>]*>(.*?)</tr>', table.group(2), re.S)
    return table.group(1), [[html.unescape(v) for v in re.findall(r'data-v="([^"]*)"', r)] for r in rows]


def test_layer_table_sorts_in_headless_chromium(tmp_path) -> None:
    exe = _chromium()
    report = engine_report(MB_QAT, profile=MB_QAT_PROFILE)
    page = write_html(report, tmp_path / "r.html")
    attrs, rows = _rows_after_sort(exe, page, tmp_path / "p1", "#sort=time:desc")
    assert 'data-sorted="time:desc"' in attrs and len(rows) == report.layers
    times = [float(r[5]) for r in rows]
    assert times == sorted(times, reverse=True) and times != [r.time_ms for r in report.rows]
    assert rows[0][1] == report.slowest(1)[0].name
    # #layer=N marks the layer's box and table row with the same function a click runs.
    slow = report.slowest(1)[0].index
    dom = _dump_dom(exe, tmp_path / "p3", page.resolve().as_uri() + f"#layer={slow}&sort=time:desc")
    assert re.search(rf'<rect id="layer-{slow}" class="[^"]*\bhl\b', dom)
    assert re.search(rf'<tr id="row-{slow}"[^>]*class="hlrow"', dom) and dom.count('class="hlrow"') == 1
    attrs, rows = _rows_after_sort(exe, page, tmp_path / "p2", "#sort=name:asc")
    assert 'data-sorted="name:asc"' in attrs
    names = [r[1].lower() for r in rows]
    assert names == sorted(names) and len(names) == report.layers


_DUMPS = {
    "mobilenet_residuals": (MB_RES, None),
    "resnet50_qat": (ENGINES / "trex_tf_resnet50_rtx3090/qat/resnet-qat.onnx.engine.graph.json",
                     ENGINES / "trex_tf_resnet50_rtx3090/qat/resnet-qat.onnx.engine.profile.json"),
    "resnet50_fp32": (ENGINES / "trex_tf_resnet50_rtx3090/fp32/resnet.onnx.engine.graph.json", None),
    "detr_names_only": (ENGINES / "detr_implicit_int8_names_only/detr-layer-info.json",
                        ENGINES / "detr_implicit_int8_names_only/detr-profile.json"),
    "trt10_cookbook": (COOKBOOK / "model-trained-exportLayerInfo.log", None),
}


@pytest.mark.parametrize("dump", sorted(_DUMPS))
def test_every_dump_shows_whole_names_in_chromium(tmp_path, dump) -> None:
    """Long TensorFlow scope names (ResNet-50: 464 characters) and 840 DETR layers: every label
    whole and inside the drawing, as the browser lays it out."""
    exe = _chromium()
    layers, profile = _DUMPS[dump]
    report = engine_report(layers, profile=profile)
    page = write_html(report, tmp_path / "r.html")
    assert _labels(page.read_text()) == {r.name: r.name for r in report.rows}
    dom = _dump_dom(exe, tmp_path / "profile", page.resolve().as_uri())
    assert f'data-ok="{report.layers}" data-names-whole="{report.layers}"' in dom, dom[:300]
