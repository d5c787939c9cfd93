"""HTML report: self-contained (no network references) and renders to a non-blank page in
headless Chromium, with its script run (it stamps data-ok with the number of layer boxes)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from trt_helpers import MB_QAT, MB_QAT_PROFILE, raw

from qdqsurgeon.trt.html import COLOURS, render_html, write_html
from qdqsurgeon.trt.report import engine_report

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


def test_html_is_self_contained() -> None:
    page = render_html(engine_report(MB_QAT, profile=MB_QAT_PROFILE))
    assert "http://" not in page and "https://" not in page
    # No external resources of any kind: no src=, no <link>, no url(...) other than none.
    assert not re.search(r"<(link|img|iframe)\b", page)
    assert not re.search(r"\bsrc\s*=", page)
    assert "url(" not in page
    assert page.count('class="box ') == len(raw(MB_QAT)["Layers"])


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
    dom = subprocess.run(
        [*_chromium_args(exe, tmp_path / "profile2"), "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )
    assert f'data-ok="{report.layers}"' in dom.stdout, dom.stderr[-2000:]
    assert "<title>[ok] " in dom.stdout
