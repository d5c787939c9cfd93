"""Self-contained HTML engine report, laid out to act from: findings grouped by pattern with
their cost and fixing pass, the slowest layers, the engine graph as inline SVG, a sortable
per-layer table and the findings; GPU/TensorRT cards when metadata was found.

Everything (CSS, SVG, a small script) is inline and the page loads nothing: it must open from
a CI artifact or an air-gapped machine. Layers are drawn as boxes in execution order, coloured
by precision, with Q/DQ and reformat layers outlined; the box width grows with the layer's
time; edges are rebuilt from tensor names (§4 rule 3), skip edges arc on the left. Layer names
are never cut: they wrap after spaces and ``/`` and the drawing widens for a longer token. Rule
IDs carry their one-line meaning (``RULE_TEXT``) as a hover title.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
import tempfile
from pathlib import Path

from qdqsurgeon.trt.report import RULE_TEXT, EngineReport, LayerRow

__all__ = ["COLOURS", "wrap_name", "render_html", "write_html", "render_diff_html", "write_diff_html"]

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
_LINE = 14  # text line pitch inside a row
_BOX_H = 20
_X0 = 190  # left of the boxes: room for skip-edge arcs
_BOX_MIN = 36
_BOX_MAX = 300
_TEXT_X = _X0 + _BOX_MAX + 16
_WIDTH = 1180
_CHAR_W = 7.0  # a little above the 6.6 px advance of 11 px monospace: labels must fit, not be clipped
_NAME_CHARS = 64  # wrap layer names at this many characters (after spaces and '/' only)
_NAME_CHARS_MIN = 40
_SLOWEST = 10

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:16px 24px;color:#1d1d1f;background:#fafafa}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:22px 0 8px}
.src{color:#666;font-size:12px;word-break:break-all}
.cards{display:flex;gap:10px;flex-wrap:wrap;margin:12px 0}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:120px}
.card b{display:block;font-size:20px}
.card span{font-size:12px;color:#555}
.card.meta b{font-size:15px}
.legend span{display:inline-block;margin-right:14px;font-size:12px}
.legend i{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:-2px;border-radius:2px}
.wide{overflow-x:auto}
table{border-collapse:collapse;background:#fff;font-size:12px;width:100%}
th,td{border:1px solid #ddd;padding:4px 6px;text-align:left;vertical-align:top}
th{background:#f0f0f0} tr.f,li.slow{cursor:pointer} tr.f:hover,li.slow:hover{background:#eef5ff}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.name{font-family:ui-monospace,Menlo,Consolas,monospace;overflow-wrap:normal;word-break:normal;min-width:24em}
table.sortable th{cursor:pointer;user-select:none;white-space:nowrap}
table.sortable th::after{content:' \2195';color:#aaa}
table.sortable th[aria-sort=ascending]::after{content:' \25B2';color:#333}
table.sortable th[aria-sort=descending]::after{content:' \25BC';color:#333}
tr.hlrow{background:#fff3cd !important}
abbr.rule{font-weight:bold;text-decoration:underline dotted;cursor:help}
.sev{display:inline-block;border-radius:3px;padding:0 6px;font-size:11px;font-weight:bold;color:#fff}
.sev.warning{background:#c0392b} .sev.info{background:#7f8c8d} .sev.error{background:#000}
.fix{font-family:monospace;color:#0a5;white-space:nowrap}
ol#slowest{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 8px 8px 40px;font-size:12px}
ol#slowest li{padding:2px 0} ol#slowest code{white-space:normal}
#graph{background:#fff;border:1px solid #ddd;border-radius:6px;overflow-x:auto}
svg text{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:11px;fill:#222}
.box.qdq{stroke:#7a0000;stroke-width:2.5}
.box.reformat{stroke:#b30000;stroke-width:2;stroke-dasharray:4 2}
.box{stroke:#333;stroke-width:.6}
.hl{stroke:#000 !important;stroke-width:4 !important}
.edge{fill:none;stroke-width:1.3;opacity:.75}
"""

# Plain inline script: stamps what it checked (data-* attributes the tests read), sorts tables on a
# header click (or on #sort=<key>:<asc|desc> in the URL) and highlights a layer from any list.
_JS = """
(function(){
  var root=document.documentElement;
  var boxes=document.querySelectorAll('rect.box');
  root.setAttribute('data-ok', String(boxes.length));
  document.title='[ok] '+document.title;
  // Every layer label shows the whole name and ends inside the drawing.
  var svg=document.getElementById('engine-graph'), whole=0;
  if(svg){
    var right=svg.getBoundingClientRect().right+0.5;
    svg.querySelectorAll('text.label').forEach(function(t){
      var parts=[]; var fits=true;
      t.querySelectorAll('tspan.nm').forEach(function(s){
        parts.push(s.textContent);
        if(s.getBoundingClientRect().right>right) fits=false;
      });
      if(fits && parts.join('')===t.getAttribute('data-name')) whole++;
    });
  }
  root.setAttribute('data-names-whole', String(whole));
  var last=null, lastRow=null;
  function show(i, jump){
    var el=document.getElementById('layer-'+i);
    if(el){ if(last) last.classList.remove('hl'); el.classList.add('hl'); last=el;
      if(jump && el.scrollIntoView) el.scrollIntoView({block:'center'}); }
    var row=document.getElementById('row-'+i);
    if(row){ if(lastRow) lastRow.classList.remove('hlrow'); row.classList.add('hlrow'); lastRow=row; }
  }
  // Findings and the slowest list jump to the layer's box; a row of the layer table only marks it.
  document.querySelectorAll('[data-layer]').forEach(function(el){
    el.addEventListener('click',function(){show(el.getAttribute('data-layer'), true);});
  });
  document.querySelectorAll('#layers tbody tr').forEach(function(tr){
    tr.addEventListener('click',function(){show(tr.getAttribute('data-i'), false);});
  });
  function sortBy(table, th){
    var col=Array.prototype.indexOf.call(th.parentNode.children, th);
    var num=th.getAttribute('data-type')==='num';
    var dir=th.getAttribute('aria-sort')==='ascending'?'descending':'ascending';
    if(!th.hasAttribute('aria-sort') && num) dir='descending';  // numbers: biggest first
    var body=table.tBodies[0], rows=Array.prototype.slice.call(body.rows);
    function key(r){ var v=r.cells[col].getAttribute('data-v'); return num?(v===''?-Infinity:parseFloat(v)):(v||'').toLowerCase(); }
    rows.sort(function(a,b){ var x=key(a), y=key(b); var c=x<y?-1:x>y?1:0;
      if(c===0) c=parseInt(a.getAttribute('data-i'))-parseInt(b.getAttribute('data-i'));
      else if(dir==='descending') c=-c; return c; });
    rows.forEach(function(r){ body.appendChild(r); });
    table.querySelectorAll('th').forEach(function(h){ if(h!==th) h.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', dir);
    table.setAttribute('data-sorted', th.getAttribute('data-key')+':'+(dir==='ascending'?'asc':'desc'));
  }
  document.querySelectorAll('table.sortable').forEach(function(table){
    table.querySelectorAll('th[data-key]').forEach(function(th){
      th.addEventListener('click',function(){ sortBy(table, th); });
    });
  });
  var lm=/layer=(\\d+)/.exec(location.hash||'');  // #layer=N: a link to one layer
  if(lm) show(lm[1], true);
  var m=/sort=([\\w-]+)(?::(asc|desc))?/.exec(location.hash||'');
  if(m){
    var th=document.querySelector('table.sortable th[data-key="'+m[1]+'"]');
    if(th){ th.click(); var want=m[2]==='asc'?'ascending':m[2]==='desc'?'descending':null;
      if(want && th.getAttribute('aria-sort')!==want) th.click(); }
  }
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


def wrap_name(name: str, width: int = _NAME_CHARS) -> list[str]:
    """Split ``name`` into lines of at most ``width`` characters, breaking only after a space or a
    ``/`` (TensorFlow-style scope paths), so ``"".join(lines) == name``; a longer token stays whole
    on a line of its own."""
    lines: list[str] = []
    current = ""
    for piece in _BREAK_AFTER.split(name):
        if current and len((current + piece).rstrip(" ")) > width:
            lines.append(current)
            current = ""
        current += piece
    lines.append(current)
    return lines


def _prec(row: LayerRow, sep: str = "→") -> str:
    return ",".join(p or "?" for p in row.in_precisions) + sep + ",".join(p or "?" for p in row.out_precisions)


def _time(row: LayerRow) -> str:
    return f"{row.time_ms:.4f} ms" if row.time_ms is not None else ""


def _svg(report: EngineReport) -> str:
    rows = report.rows
    tmax = max((r.time_ms or 0.0 for r in rows), default=0.0)
    kind_w = max((len(r.kind) for r in rows), default=0)
    prec_w = max((len(_prec(r)) for r in rows), default=0)
    time_w = max((len(_time(r)) for r in rows), default=0)
    prefix_w = 3 + 1 + kind_w + 1 + prec_w + 1 + time_w + 2
    name_x = _TEXT_X + prefix_w * _CHAR_W
    # Names wrap to fit the default width; only a token longer than that widens the drawing.
    chars = max(_NAME_CHARS_MIN, int((_WIDTH - 24 - name_x) / _CHAR_W))
    wrapped = {r.index: wrap_name(r.name, chars) for r in rows}
    longest = max((len(line) for lines in wrapped.values() for line in lines), default=0)
    width = max(_WIDTH, int(name_x + longest * _CHAR_W + 24))
    y_of: dict[int, int] = {}
    y = 10
    for r in rows:
        y_of[r.index] = y
        y += max(_ROW, 8 + _LINE * len(wrapped[r.index]))
    height = y + 10
    producer: dict[str, tuple[int, str | None]] = {}
    parts: list[str] = [f'<svg id="engine-graph" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">']
    edges: list[str] = []
    boxes: list[str] = []
    for r in rows:
        for k, t in enumerate(r.outputs):
            precision = r.out_precisions[k] if k < len(r.out_precisions) else None
            producer.setdefault(t, (r.index, precision))
    for r in rows:
        y = y_of[r.index]
        for t in r.inputs:
            if t not in producer:
                continue
            src, precision = producer[t]
            y0 = y_of[src] + _BOX_H
            y1 = y
            colour = _edge_colour(precision)
            if src + 1 == r.index or y1 - y0 <= _ROW:  # next layer: a short straight edge
                edges.append(f'<line class="edge" x1="{_X0 + 12}" y1="{y0}" x2="{_X0 + 12}" y2="{y1}" stroke="{colour}"/>')
            else:  # skip edge: arc on the left, wider for longer jumps
                bend = min(_X0 - 10, 20 + (y1 - y0) / _ROW * 6)
                ya, yb = y0 - _BOX_H / 2, y1 + _BOX_H / 2
                edges.append(
                    f'<path class="edge" d="M{_X0} {ya:.0f} C{_X0 - bend:.0f} {ya:.0f} {_X0 - bend:.0f} {yb:.0f} {_X0} {yb:.0f}" stroke="{colour}"/>'
                )
        box_w = _BOX_MIN
        if r.time_ms and tmax > 0:
            box_w = _BOX_MIN + (_BOX_MAX - _BOX_MIN) * r.time_ms / tmax
        tip = f"#{r.index} {r.name}\n{r.kind} {_prec(r)} {_time(r)}"
        if r.onnx_nodes:
            tip += "\nONNX: " + ", ".join(r.onnx_nodes)
        prefix = f"{r.index:>3} {r.kind:<{kind_w}} {_prec(r):<{prec_w}} {_time(r):>{time_w}}"
        name_lines = "".join(
            f'<tspan class="nm" x="{name_x:.0f}"{"" if k == 0 else f" dy={chr(34)}{_LINE}{chr(34)}"}>{html.escape(line)}</tspan>'
            for k, line in enumerate(wrapped[r.index])
        )
        boxes.append(
            f'<g><title>{html.escape(tip)}</title>'
            f'<rect id="layer-{r.index}" class="box {r.category}" data-index="{r.index}" x="{_X0}" y="{y}" '
            f'width="{box_w:.1f}" height="{_BOX_H}" rx="3" fill="{_colour(r)}"/>'
            f'<rect x="{_X0}" y="{y}" width="6" height="{_BOX_H}" fill="{_precision_colour(r.in_precisions)}"/>'
            f'<text class="label" y="{y + 14}" xml:space="preserve" data-name="{html.escape(r.name)}">'
            f'<tspan x="{_TEXT_X}">{html.escape(prefix)}</tspan>{name_lines}</text></g>'
        )
    parts.extend(edges)
    parts.extend(boxes)
    parts.append("</svg>")
    return "\n".join(parts)


_BREAK_AFTER = re.compile(r"(?<=[ /])")
_RULE_ID = re.compile(r"\b([CEFPV]\d{1,2})\b")


def _rule(rule_id: str | None) -> str:
    """A rule ID with its one-line meaning on hover."""
    if not rule_id:
        return "-"
    text = RULE_TEXT.get(rule_id)
    if text is None:
        return html.escape(rule_id)
    return f'<abbr class="rule" title="{html.escape(rule_id + ": " + text)}">{html.escape(rule_id)}</abbr>'


def _with_rules(text: str) -> str:
    """Escape ``text`` and explain every known rule ID in it on hover."""
    return _RULE_ID.sub(lambda m: _rule(m.group(1)) if m.group(1) in RULE_TEXT else m.group(0), html.escape(text))


def _severity(severity: str) -> str:
    return f'<span class="sev {html.escape(severity)}">{html.escape(severity)}</span>'


def _card(value: str, label: str, cls: str = "card") -> str:
    return f'<div class="{cls}"><b>{html.escape(value)}</b><span>{html.escape(label)}</span></div>'


def _cards(report: EngineReport) -> str:
    total = "n/a" if report.total_time_ms is None else f"{report.total_time_ms:.4f} ms"
    qdq = f"{report.standalone_qdq_layers}"
    share = report.share(report.qdq_time_ms)
    if share is not None:
        qdq += f" ({share:.1f} %)"
    items = [
        _card(str(report.layers), "layers"),
        _card(qdq, "standalone Q/DQ layers"),
        _card(str(report.reformat_layers), "reformat layers"),
        _card(total, "total time (Σ averageMs)"),
        _card(str(len(report.findings)), "findings"),
    ]
    if report.int8_compute_time_ms is not None and report.float_compute_time_ms is not None:
        items.append(_card(f"{report.int8_compute_time_ms:.4f} / {report.float_compute_time_ms:.4f} ms", "INT8 / float compute"))
    if report.prediction is not None:
        items.append(_card(f"{report.prediction.predicted} / {report.prediction.actual}", "Q/DQ predicted / actual"))
    out = '<div class="cards" id="summary">' + "".join(items) + "</div>"
    if report.metadata:
        out += '<div class="cards" id="metadata">' + "".join(
            _card(v, k, "card meta") for k, v in report.metadata.items()) + "</div>"
    return out


def _share(report: EngineReport, value: float | None) -> str:
    share = report.share(value)
    return "" if share is None else f"{share:.1f} %"


def _groups_table(report: EngineReport) -> str:
    groups = report.finding_groups()
    if not groups:
        return "<p>No findings.</p>"
    out = [
        '<table id="patterns"><thead><tr><th>severity</th><th>pattern</th><th>cause</th><th>findings</th>'
        '<th class="num">time the fix saves</th><th class="num">% of total</th><th>fix pass</th><th>layers</th></tr></thead><tbody>'
    ]
    for g in groups:
        kinds = ", ".join(f"{n} {html.escape(k)}" for k, n in g.kinds.items())
        cause = html.escape(RULE_TEXT.get(g.cause or "", "")) if g.cause else ""
        time = "n/a" if g.time_ms is None else f"{g.time_ms:.4f} ms"
        layers = "".join(
            f'<li data-layer="{f.layer_index}"><code>{html.escape(f.layer)}</code></li>' for f in g.findings
        )
        fix = f'<span class="fix">{html.escape(g.fix_pass)}</span>' if g.fix_pass else "none (expected)"
        out.append(
            f'<tr class="group" data-pattern="{html.escape(g.pattern)}"><td>{_severity(g.severity)}</td>'
            f"<td>{_rule(g.rule)} from {_rule(g.cause)}</td><td>{cause}</td>"
            f'<td class="num">{len(g.findings)}<br><small>{kinds}</small></td>'
            f'<td class="num">{time}</td><td class="num">{_share(report, g.time_ms)}</td><td>{fix}</td>'
            f"<td><details><summary>{len(g.findings)} layer(s)</summary><ul>{layers}</ul></details></td></tr>"
        )
    out.append("</tbody></table>")
    out.append(
        "<p><small>Time: the profile time of the standalone Q/DQ and reformat layers the pass would remove, "
        "each counted once; an INT8 layer that writes float also moves twice the bytes, which the profile "
        "does not separate.</small></p>"
    )
    return "\n".join(out)


def _rules_of(report: EngineReport) -> dict[int, list[str]]:
    by: dict[int, list[str]] = {}
    for f in report.findings:
        for rid in (f.rule, f.cause):
            if rid and rid not in by.setdefault(f.layer_index, []):
                by[f.layer_index].append(rid)
    return by


def _slowest(report: EngineReport) -> str:
    rows = report.slowest(_SLOWEST)
    if not rows:
        return "<p>No profile: run with --profile for layer times.</p>"
    rules = _rules_of(report)
    items = []
    for r in rows:
        flags = " ".join(_rule(x) for x in rules.get(r.index, []))
        items.append(
            f'<li class="slow" data-layer="{r.index}"><b>{r.time_ms:.4f} ms</b> ({_share(report, r.time_ms)}) '
            f"{html.escape(r.kind)} {html.escape(_prec(r))} <code>{html.escape(r.name)}</code> {flags}</li>"
        )
    return '<ol id="slowest">' + "".join(items) + "</ol>"


_LAYER_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("index", "#", "num"),
    ("name", "layer", "text"),
    ("type", "type", "text"),
    ("category", "category", "text"),
    ("precision", "in → out", "text"),
    ("time", "time ms", "num"),
    ("share", "% of total", "num"),
    ("findings", "findings", "text"),
    ("onnx", "ONNX nodes", "text"),
)


def _layers_table(report: EngineReport) -> str:
    rules = _rules_of(report)
    head = "".join(
        f'<th data-key="{key}" data-type="{kind}"{" class=num" if kind == "num" else ""}>{html.escape(label)}</th>'
        for key, label, kind in _LAYER_COLUMNS
    )
    out = [f'<div class="wide"><table id="layers" class="sortable"><thead><tr>{head}</tr></thead><tbody>']
    for r in report.rows:
        share = report.share(r.time_ms)
        found = rules.get(r.index, [])
        time = "" if r.time_ms is None else repr(r.time_ms)
        cells = [
            (str(r.index), str(r.index), "num"),
            (r.name, html.escape(r.name), "name"),
            (r.kind, html.escape(r.kind), ""),
            (r.category, html.escape(r.category), ""),
            (_prec(r), html.escape(_prec(r)), ""),
            (time, "" if r.time_ms is None else f"{r.time_ms:.4f}", "num"),
            ("" if share is None else repr(share), "" if share is None else f"{share:.1f}", "num"),
            (" ".join(found), " ".join(_rule(x) for x in found), ""),
            (", ".join(r.onnx_nodes), html.escape(", ".join(r.onnx_nodes)), ""),
        ]
        tds = "".join(
            f'<td{f" class={cls}" if cls else ""} data-v="{html.escape(v)}">{shown}</td>' for v, shown, cls in cells
        )
        out.append(f'<tr id="row-{r.index}" data-i="{r.index}">{tds}</tr>')
    out.append("</tbody></table></div>")
    return "\n".join(out)


def _findings_table(report: EngineReport) -> str:
    if not report.findings:
        return "<p>No findings.</p>"
    out = ['<table id="findings"><thead><tr><th>severity</th><th>rule</th><th>cause</th><th>layer</th>'
           "<th>ONNX nodes</th><th>message</th><th>fix pass</th></tr></thead><tbody>"]
    for f in report.findings:
        out.append(
            f'<tr class="f" data-layer="{f.layer_index}"><td>{_severity(f.severity)}</td><td>{_rule(f.rule)}</td>'
            f'<td>{_rule(f.cause)}</td><td class="name">{html.escape(f.layer)}</td>'
            f"<td>{html.escape(', '.join(f.onnx_nodes))}</td><td>{_with_rules(f.message)}</td>"
            f"<td class=\"fix\">{html.escape(f.fix_pass or '-')}</td></tr>"
        )
    out.append("</tbody></table>")
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
            "<h2>Findings by pattern (what to fix first)</h2>",
            _groups_table(report),
            f"<h2>Slowest layers (top {_SLOWEST})</h2>",
            _slowest(report),
            "<h2>Engine graph (execution order)</h2>",
            f'<div class="legend">{legend}<span>box width ∝ layer time</span></div>',
            f'<div id="graph">{_svg(report)}</div>',
            "<h2>Layers (click a header to sort)</h2>",
            _layers_table(report),
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
        # mkstemp makes the file private (0600); a report is for sharing, so use the usual umask mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
