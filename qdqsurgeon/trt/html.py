"""Self-contained HTML engine report: the engine graph as inline SVG and the findings table.

Everything (CSS, SVG, a small script) is inline and the page loads nothing: it must open from
a CI artifact or an air-gapped machine. Layers are drawn as boxes in execution order, coloured
by precision, with Q/DQ and reformat layers outlined; the box width grows with the layer's
time; edges are rebuilt from tensor names (§4 rule 3), skip edges arc on the left.
"""

from __future__ import annotations

import html
import json
import logging
import os
import tempfile
from pathlib import Path

from qdqsurgeon.trt.report import EngineReport, LayerRow

__all__ = ["COLOURS", "render_html", "write_html", "render_diff_html", "write_diff_html"]

logger = logging.getLogger(__name__)

COLOURS: dict[str, str] = {
    "int8": "#2e9d5b",
    "fp16": "#3d7fd9",
    "bf16": "#7a5bd6",
    "fp32": "#e08a2c",
    "qdq": "#d43c3c",
    "reformat": "#f2c94c",
    "other": "#9aa0a6",
}

_ROW = 28
_BOX_H = 20
_X0 = 190  # left of the boxes: room for skip-edge arcs
_BOX_MIN = 36
_BOX_MAX = 300
_TEXT_X = _X0 + _BOX_MAX + 16
_WIDTH = 1180

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:16px 24px;color:#1d1d1f;background:#fafafa}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:20px 0 8px}
.src{color:#666;font-size:12px;word-break:break-all}
.cards{display:flex;gap:10px;flex-wrap:wrap;margin:12px 0}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:120px}
.card b{display:block;font-size:20px}
.card span{font-size:12px;color:#555}
.legend span{display:inline-block;margin-right:14px;font-size:12px}
.legend i{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:-2px;border-radius:2px}
table{border-collapse:collapse;background:#fff;font-size:12px;width:100%}
th,td{border:1px solid #ddd;padding:4px 6px;text-align:left;vertical-align:top}
th{background:#f0f0f0} tr.f{cursor:pointer} tr.f:hover{background:#eef5ff}
td.rule{font-weight:bold} .fix{font-family:monospace;color:#0a5}
#graph{background:#fff;border:1px solid #ddd;border-radius:6px;overflow:auto;max-height:560px}
svg text{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:11px;fill:#222}
.box.qdq{stroke:#7a0000;stroke-width:2.5}
.box.reformat{stroke:#b30000;stroke-width:2;stroke-dasharray:4 2}
.box{stroke:#333;stroke-width:.6}
.hl{stroke:#000 !important;stroke-width:4 !important}
.edge{fill:none;stroke-width:1.3;opacity:.75}
"""

_JS = """
(function(){
  var boxes=document.querySelectorAll('rect.box');
  document.documentElement.setAttribute('data-ok', String(boxes.length));
  document.title='[ok] '+document.title;
  var last=null;
  function show(i){
    var el=document.getElementById('layer-'+i); if(!el) return;
    if(last) last.classList.remove('hl'); el.classList.add('hl'); last=el;
    if(el.scrollIntoView) el.scrollIntoView({block:'center'});
  }
  document.querySelectorAll('tr.f').forEach(function(tr){
    tr.addEventListener('click',function(){show(tr.getAttribute('data-layer'));});
  });
})();
"""


def _precision_colour(precisions: list[str | None]) -> str:
    present = [p for p in precisions if p]
    for p in ("int8", "fp16", "bf16", "fp32"):
        if p in present:
            return COLOURS[p]
    return COLOURS["other"]


def _colour(row: LayerRow) -> str:
    """Fill: Q/DQ and reformats by role, compute layers by output precision (an INT8 kernel
    writing float shows blue/orange with a green input stripe: the E2 boundary)."""
    if row.category in ("qdq", "reformat"):
        return COLOURS[row.category]
    if "int8" in row.out_precisions:
        return COLOURS["int8"]
    return _precision_colour(row.out_precisions)


def _edge_colour(precision: str | None) -> str:
    return COLOURS[precision] if precision in ("int8", "fp16", "bf16", "fp32") else "#888"


def _svg(report: EngineReport) -> str:
    rows = report.rows
    height = max(len(rows), 1) * _ROW + 20
    tmax = max((r.time_ms or 0.0 for r in rows), default=0.0)
    y_of = {r.index: 10 + i * _ROW for i, r in enumerate(rows)}
    producer: dict[str, tuple[int, str | None]] = {}
    parts: list[str] = [f'<svg id="engine-graph" width="{_WIDTH}" height="{height}" viewBox="0 0 {_WIDTH} {height}" role="img">']
    edges: list[str] = []
    boxes: list[str] = []
    for i, r in enumerate(rows):
        for k, t in enumerate(r.outputs):
            precision = r.out_precisions[k] if k < len(r.out_precisions) else None
            producer.setdefault(t, (r.index, precision))
    for i, r in enumerate(rows):
        y = y_of[r.index]
        for t in r.inputs:
            if t not in producer:
                continue
            src, precision = producer[t]
            y0 = y_of[src] + _BOX_H
            y1 = y
            colour = _edge_colour(precision)
            if y1 - y0 <= _ROW:  # next layer: a short straight edge
                edges.append(f'<line class="edge" x1="{_X0 + 12}" y1="{y0}" x2="{_X0 + 12}" y2="{y1}" stroke="{colour}"/>')
            else:  # skip edge: arc on the left, wider for longer jumps
                bend = min(_X0 - 10, 20 + (y1 - y0) / _ROW * 6)
                ya, yb = y0 - _BOX_H / 2, y1 + _BOX_H / 2
                edges.append(
                    f'<path class="edge" d="M{_X0} {ya:.0f} C{_X0 - bend:.0f} {ya:.0f} {_X0 - bend:.0f} {yb:.0f} {_X0} {yb:.0f}" stroke="{colour}"/>'
                )
        width = _BOX_MIN
        if r.time_ms and tmax > 0:
            width = _BOX_MIN + (_BOX_MAX - _BOX_MIN) * r.time_ms / tmax
        prec = ",".join(p or "?" for p in r.in_precisions) + "→" + ",".join(p or "?" for p in r.out_precisions)
        time = f"{r.time_ms:.4f} ms" if r.time_ms is not None else ""
        tip = f"#{r.index} {r.name}\n{r.kind} {prec} {time}"
        if r.onnx_nodes:
            tip += "\nONNX: " + ", ".join(r.onnx_nodes)
        label = f"{r.index:>3} {r.kind[:12]:<12} {prec:<16} {time:>11}  {r.name}"
        if len(label) > 150:
            label = label[:147] + "..."
        boxes.append(
            f'<g><title>{html.escape(tip)}</title>'
            f'<rect id="layer-{r.index}" class="box {r.category}" data-index="{r.index}" x="{_X0}" y="{y}" '
            f'width="{width:.1f}" height="{_BOX_H}" rx="3" fill="{_colour(r)}"/>'
            f'<rect x="{_X0}" y="{y}" width="6" height="{_BOX_H}" fill="{_precision_colour(r.in_precisions)}"/>'
            f'<text x="{_TEXT_X}" y="{y + 14}" xml:space="preserve">{html.escape(label)}</text></g>'
        )
    parts.extend(edges)
    parts.extend(boxes)
    parts.append("</svg>")
    return "\n".join(parts)


def _cards(report: EngineReport) -> str:
    def card(value: str, label: str) -> str:
        return f'<div class="card"><b>{html.escape(value)}</b><span>{html.escape(label)}</span></div>'

    total = "n/a" if report.total_time_ms is None else f"{report.total_time_ms:.4f} ms"
    qdq = f"{report.standalone_qdq_layers}"
    share = report.share(report.qdq_time_ms)
    if share is not None:
        qdq += f" ({share:.1f} %)"
    items = [
        card(str(report.layers), "layers"),
        card(qdq, "standalone Q/DQ layers"),
        card(str(report.reformat_layers), "reformat layers"),
        card(total, "total time (Σ averageMs)"),
        card(str(len(report.findings)), "findings"),
    ]
    if report.int8_compute_time_ms is not None and report.float_compute_time_ms is not None:
        items.append(card(f"{report.int8_compute_time_ms:.4f} / {report.float_compute_time_ms:.4f} ms", "INT8 / float compute"))
    if report.prediction is not None:
        items.append(card(f"{report.prediction.predicted} / {report.prediction.actual}", "Q/DQ predicted / actual"))
    return '<div class="cards">' + "".join(items) + "</div>"


def _findings_table(report: EngineReport) -> str:
    if not report.findings:
        return "<p>No findings.</p>"
    out = ["<table id=\"findings\"><tr><th>rule</th><th>layer</th><th>ONNX nodes</th><th>message</th><th>fix pass</th></tr>"]
    for f in report.findings:
        out.append(
            f'<tr class="f" data-layer="{f.layer_index}"><td class="rule">{html.escape(f.rule)}</td>'
            f"<td>{html.escape(f.layer)}</td><td>{html.escape(', '.join(f.onnx_nodes))}</td>"
            f"<td>{html.escape(f.message)}</td><td class=\"fix\">{html.escape(f.fix_pass or '-')}</td></tr>"
        )
    out.append("</table>")
    return "\n".join(out)


def render_html(report: EngineReport, *, title: str | None = None) -> str:
    """Return the page as one string (no external references)."""
    title = title or f"Engine report: {Path(report.source).name if report.source else 'engine'}"
    legend = "".join(
        f'<span><i style="background:{c}"></i>{html.escape(k)}</span>'
        for k, c in COLOURS.items()
    )
    note = "" if report.detailed else "<p><b>Names-only layer info</b>: no types or precisions; rebuild with --profilingVerbosity=detailed.</p>"
    # The data block lets other tools (or a curious user) read the numbers back from the page.
    data = json.dumps(report.to_dict(include_layers=False)).replace("</", "<\\/")
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{html.escape(title)}</title>",
            f"<style>{_CSS}</style></head><body>",
            f"<h1>{html.escape(title)}</h1>",
            f'<div class="src">{html.escape(report.source or "")}</div>',
            _cards(report),
            note,
            f'<div class="legend">{legend}<span>box width ∝ layer time</span></div>',
            "<h2>Engine graph (execution order)</h2>",
            f'<div id="graph">{_svg(report)}</div>',
            "<h2>Findings</h2>",
            _findings_table(report),
            f'<script type="application/json" id="report-data">{data}</script>',
            f"<script>{_JS}</script>",
            "</body></html>",
        ]
    )


def render_diff_html(diff, *, title: str | None = None) -> str:
    """An ``engine-diff`` (:class:`qdqsurgeon.trt.diff.EngineDiff`) as one self-contained page: the counts
    of both engines, every matched layer pair (precision changes marked), the layers only one side has."""
    title = title or "Engine diff"
    esc = html.escape
    d = diff.delta
    rows = []
    for label, key in (("layers", "layers"), ("standalone Q/DQ layers", "standalone_qdq_layers"),
                       ("reformat layers", "reformat_layers"), ("total time ms", "total_time_ms")):
        va, vb = getattr(diff.a, key), getattr(diff.b, key)
        rows.append(f"<tr><td>{esc(label)}</td><td>{'' if va is None else esc(str(va))}</td>"
                    f"<td>{'' if vb is None else esc(str(vb))}</td><td>{'' if d[key] is None else esc(str(d[key]))}</td></tr>")
    changed = {c.layer for c in diff.precision_changes}
    prec_a = {r.name: r for r in diff.a.rows}
    prec_b = {r.name: r for r in diff.b.rows}

    def prec(r: LayerRow | None) -> str:
        return "" if r is None else ",".join(p or "?" for p in r.in_precisions) + " → " + ",".join(p or "?" for p in r.out_precisions)

    pairs = []
    for a, b in diff.matched:
        label = a if a == b else f"{a} => {b}"
        mark = ' style="background:#fff3cd"' if label in changed else ""
        pairs.append(f"<tr{mark}><td>{esc(a)}</td><td>{esc(prec(prec_a.get(a)))}</td><td>{esc(b)}</td>"
                     f"<td>{esc(prec(prec_b.get(b)))}</td></tr>")
    def only(names: list[str], rows_by: dict[str, LayerRow]) -> str:
        return "".join(f"<tr><td>{esc(n)}</td><td>{esc(prec(rows_by.get(n)))}</td></tr>" for n in names)

    data = json.dumps(diff.to_dict()).replace("</", "<\\/")
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f'<div class="src">A: {esc(diff.a.source or "")}<br>B: {esc(diff.b.source or "")}</div>',
        "<h2>Counts</h2><table><tr><th></th><th>A</th><th>B</th><th>B − A</th></tr>", *rows, "</table>",
        f"<h2>Matched layers ({len(diff.matched)}; by the ONNX nodes they contain, "
        f"{len(diff.precision_changes)} with a precision change, highlighted)</h2>",
        "<table><tr><th>A layer</th><th>A precision</th><th>B layer</th><th>B precision</th></tr>", *pairs, "</table>",
        f"<h2>Only in A ({len(diff.removed)})</h2><table><tr><th>layer</th><th>precision</th></tr>",
        only(diff.removed, prec_a), "</table>",
        f"<h2>Only in B ({len(diff.added)})</h2><table><tr><th>layer</th><th>precision</th></tr>",
        only(diff.added, prec_b), "</table>",
        f'<script type="application/json" id="diff-data">{data}</script>',
        "</body></html>",
    ])


def write_diff_html(diff, path: str | Path, *, title: str | None = None) -> Path:
    """Write :func:`render_diff_html`'s page atomically."""
    return _write_atomic(Path(path), render_diff_html(diff, title=title))


def write_html(report: EngineReport, path: str | Path, *, title: str | None = None) -> Path:
    """Write the page atomically (a half-written report is worse than none)."""
    return _write_atomic(Path(path), render_html(report, title=title))


def _write_atomic(target: Path, text: str) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=str(target.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
