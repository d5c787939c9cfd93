"""Compare two engine reports: did a placement change remove Q/DQ kernels and reformats (E1)?

Layer names change between builds of differently placed models, so layers are matched by
name only: a layer present in both is checked for precision changes, the rest are listed as
added or removed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qdqsurgeon.trt.report import EngineReport, LayerRow, engine_report

__all__ = ["PrecisionChange", "EngineDiff", "diff_reports", "engine_diff"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrecisionChange:
    """A layer present in both engines whose input or output precision differs."""

    layer: str
    before: str
    after: str

    def to_dict(self) -> dict[str, str]:
        return {"layer": self.layer, "before": self.before, "after": self.after}


@dataclass
class EngineDiff:
    """``b`` relative to ``a``; :meth:`to_dict` is the ``--json`` output."""

    a: EngineReport
    b: EngineReport
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    precision_changes: list[PrecisionChange] = field(default_factory=list)

    @staticmethod
    def _summary(r: EngineReport) -> dict[str, Any]:
        return {
            "source": r.source,
            "layers": r.layers,
            "standalone_qdq_layers": r.standalone_qdq_layers,
            "reformat_layers": r.reformat_layers,
            "reformat_type_layers": r.reformat_type_layers,
            "total_time_ms": r.total_time_ms,
            "findings": len(r.findings),
        }

    @property
    def delta(self) -> dict[str, Any]:
        a, b = self.a, self.b
        time = None
        if a.total_time_ms is not None and b.total_time_ms is not None:
            time = b.total_time_ms - a.total_time_ms
        return {
            "layers": b.layers - a.layers,
            "standalone_qdq_layers": b.standalone_qdq_layers - a.standalone_qdq_layers,
            "reformat_layers": b.reformat_layers - a.reformat_layers,
            "reformat_type_layers": b.reformat_type_layers - a.reformat_type_layers,
            "total_time_ms": time,
            "total_time_percent": (100.0 * time / a.total_time_ms) if time is not None and a.total_time_ms else None,
            "findings": len(b.findings) - len(a.findings),
        }

    def layer_types(self) -> dict[str, list[int]]:
        kinds = sorted(set(self.a.layer_types) | set(self.b.layer_types))
        return {k: [self.a.layer_types.get(k, 0), self.b.layer_types.get(k, 0)] for k in kinds}

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self._summary(self.a),
            "b": self._summary(self.b),
            "delta": self.delta,
            "layer_types": self.layer_types(),
            "added": list(self.added),
            "removed": list(self.removed),
            "precision_changes": [c.to_dict() for c in self.precision_changes],
        }

    def to_text(self, *, max_names: int = 20) -> str:
        a, b, d = self.a, self.b, self.delta
        lines = [f"A: {a.source}", f"B: {b.source}", ""]

        def row(label: str, va: Any, vb: Any, dv: Any, fmt: str = "{}") -> str:
            def f(v: Any) -> str:
                return "n/a" if v is None else fmt.format(v)

            sign = "" if dv is None else ("+" if dv > 0 else "")
            return f"{label:<24}{f(va):>12}{f(vb):>12}   {sign}{f(dv)}"

        lines.append(f"{'':<24}{'A':>12}{'B':>12}   B-A")
        lines.append(row("layers", a.layers, b.layers, d["layers"]))
        lines.append(row("standalone Q/DQ layers", a.standalone_qdq_layers, b.standalone_qdq_layers, d["standalone_qdq_layers"]))
        lines.append(row("reformat layers", a.reformat_layers, b.reformat_layers, d["reformat_layers"]))
        lines.append(
            row("Reformat-type layers", a.reformat_type_layers, b.reformat_type_layers, d["reformat_type_layers"])
        )
        lines.append(row("total time ms", a.total_time_ms, b.total_time_ms, d["total_time_ms"], "{:.4f}"))
        lines.append(row("findings", len(a.findings), len(b.findings), d["findings"]))
        for kind, (na, nb) in self.layer_types().items():
            if na != nb:
                lines.append(row(f"  {kind}", na, nb, nb - na))
        for label, names in (("added layers", self.added), ("removed layers", self.removed)):
            lines.append("")
            lines.append(f"{label}: {len(names)}")
            lines.extend(f"  {n}" for n in names[:max_names])
            if len(names) > max_names:
                lines.append(f"  ... {len(names) - max_names} more")
        lines.append("")
        lines.append(f"precision changes: {len(self.precision_changes)}")
        lines.extend(f"  {c.layer}: {c.before} => {c.after}" for c in self.precision_changes)
        return "\n".join(lines)


def _prec(row: LayerRow) -> str:
    return ",".join(p or "?" for p in row.in_precisions) + " -> " + ",".join(p or "?" for p in row.out_precisions)


def diff_reports(a: EngineReport, b: EngineReport) -> EngineDiff:
    """Compare two reports (counts, time, added/removed layers, precision changes)."""
    rows_a = {r.name: r for r in a.rows}
    rows_b = {r.name: r for r in b.rows}
    added = [r.name for r in b.rows if r.name not in rows_a]
    removed = [r.name for r in a.rows if r.name not in rows_b]
    changes = []
    for r in a.rows:
        other = rows_b.get(r.name)
        if other is not None and (r.in_precisions, r.out_precisions) != (other.in_precisions, other.out_precisions):
            changes.append(PrecisionChange(r.name, _prec(r), _prec(other)))
    return EngineDiff(a=a, b=b, added=added, removed=removed, precision_changes=changes)


def engine_diff(
    layers_a: str | Path,
    layers_b: str | Path,
    *,
    profile_a: str | Path | None = None,
    profile_b: str | Path | None = None,
) -> EngineDiff:
    """Read two layer-info dumps (and profiles) and compare them: the ``engine-diff`` API."""
    return diff_reports(engine_report(layers_a, profile=profile_a), engine_report(layers_b, profile=profile_b))
