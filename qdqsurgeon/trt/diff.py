"""Compare two engine reports: did a placement change remove Q/DQ kernels and reformats (E1)?

Layers are matched by the ONNX nodes they contain (:mod:`qdqsurgeon.trt.match`), not by their
names, which change between builds of differently placed models: a matched pair is checked for
precision changes, the rest are listed as added or removed. Either side may be a static
prediction (:func:`qdqsurgeon.trt.predicted.predicted_engine`) instead of a dump.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qdqsurgeon.trt.engine import onnx_names_from_layer_name
from qdqsurgeon.trt.match import MatchUnit, match_units
from qdqsurgeon.trt.report import EngineReport, LayerRow, build_report, engine_report

__all__ = ["PrecisionChange", "EngineDiff", "diff_reports", "engine_diff", "match_rows", "agreement"]

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
    matched: list[tuple[str, str]] = field(default_factory=list)

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
            "matched": [list(m) for m in self.matched],
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
        lines.append("")
        lines.append(f"matched layers (by the ONNX nodes they contain): {len(self.matched)}")
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


def _unit(row: LayerRow) -> MatchUnit:
    names = frozenset(row.onnx_nodes) | frozenset(onnx_names_from_layer_name(row.name))
    category = row.category if row.category in ("qdq", "reformat") else "compute"
    return MatchUnit(row.name, names, category, tuple(row.inputs), tuple(row.outputs))


def match_rows(a: EngineReport, b: EngineReport):
    """The :class:`~qdqsurgeon.trt.match.Matching` of two reports' layers."""
    return match_units([_unit(r) for r in a.rows], [_unit(r) for r in b.rows])


def diff_reports(a: EngineReport, b: EngineReport) -> EngineDiff:
    """Compare two reports (counts, time, matched/added/removed layers, precision changes)."""
    m = match_rows(a, b)
    changes = []
    for i, j in m.pairs:
        ra, rb = a.rows[i], b.rows[j]
        if (ra.in_precisions, ra.out_precisions) != (rb.in_precisions, rb.out_precisions):
            label = ra.name if ra.name == rb.name else f"{ra.name} => {rb.name}"
            changes.append(PrecisionChange(label, _prec(ra), _prec(rb)))
    return EngineDiff(a=a, b=b, added=[b.rows[j].name for j in m.only_b], removed=[a.rows[i].name for i in m.only_a],
                      precision_changes=changes, matched=[(a.rows[i].name, b.rows[j].name) for i, j in m.pairs])


def _report(path: str | Path, profile: str | Path | None, trt_version: str | None) -> EngineReport:
    """A dump's report, or for an ``.onnx`` path the report of its predicted engine."""
    if str(path).lower().endswith(".onnx"):
        from qdqsurgeon.trt.predicted import predicted_engine

        return build_report(predicted_engine(path, trt_version=trt_version))
    return engine_report(path, profile=profile)


def engine_diff(
    layers_a: str | Path,
    layers_b: str | Path,
    *,
    profile_a: str | Path | None = None,
    profile_b: str | Path | None = None,
    trt_version: str | None = None,
) -> EngineDiff:
    """Read two layer-info dumps (and profiles) and compare them: the ``engine-diff`` API.

    A path ending in ``.onnx`` stands for the engine the static analysis predicts for that model.
    """
    return diff_reports(_report(layers_a, profile_a, trt_version), _report(layers_b, profile_b, trt_version))


def _cls(precisions: list[str | None]) -> str:
    """int8 when any tensor is INT8, else float: a weakly typed dump's fp16 and a prediction's "float" agree."""
    return "int8" if "int8" in precisions else "float"


def agreement(predicted: EngineReport, dump: EngineReport) -> dict[str, Any]:
    """How well a predicted engine agrees with a real dump, layer by layer (issue 13 item 4).

    Kernels are the layers that are not free (``NoOp``); precisions are compared as INT8 vs float
    on both sides of each matched layer (a weakly typed build's fp16 is float).
    """
    m = match_rows(predicted, dump)
    kernels_dump = sum(1 for r in dump.rows if r.kind != "NoOp")
    kernels_pred = sum(1 for r in predicted.rows if r.kind != "NoOp")
    same = sum(1 for i, j in m.pairs
               if (_cls(predicted.rows[i].in_precisions), _cls(predicted.rows[i].out_precisions))
               == (_cls(dump.rows[j].in_precisions), _cls(dump.rows[j].out_precisions)))
    return {
        "standalone_qdq": [predicted.standalone_qdq_layers, dump.standalone_qdq_layers],
        "standalone_exact": predicted.standalone_qdq_layers == dump.standalone_qdq_layers,
        "kernels": [kernels_pred, kernels_dump],
        "kernel_ratio": kernels_pred / kernels_dump if kernels_dump else None,
        "matched": len(m.pairs),
        "matched_by": dict(sorted({h: sum(1 for v in m.how.values() if v == h) for h in set(m.how.values())}.items())),
        "precision_agreement": same / len(m.pairs) if m.pairs else None,
        "only_predicted": [predicted.rows[i].name for i in m.only_a],
        "only_dump": [dump.rows[j].name for j in m.only_b],
    }
