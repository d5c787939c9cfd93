"""Engine report: what a built engine did with the model's Q/DQ, and which pass would fix it.

Counts (E1), per-layer precision and time, standalone Q/DQ and reformat layers with their
time share, INT8 vs float compute time, and findings for the verification rules of
``trt-rules.md`` §3:

* **E2**: a compute layer reading Int8 and writing float whose output is then quantized
  again (missing output fusion), and every Reformat/Q/DQ layer that changes precision;
* **E3**: a Q/DQ-origin layer with Int8 on both sides (a requantize: scale mismatch);
* **E4**: every layer and finding is mapped back to ONNX node names.

Each finding names the placement rule behind it (its *cause*) and the pass that would remove
it: ``quantize-residual`` (P3), ``align-scales`` (P4–P6), ``quantize-pooling`` (P7) or
``move-qdq`` (C1). :meth:`EngineReport.finding_groups` groups findings per pattern (rule and
cause) with the profile time of the layers the fix removes; :data:`RULE_TEXT` explains each rule
ID in one line; :func:`load_engine_metadata` reads the GPU and TensorRT version from TREx
metadata files or trtexec logs.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qdqsurgeon.errors import ModelError, UsageError
from qdqsurgeon.trt.engine import (
    FLOAT_PRECISIONS,
    EngineInfo,
    Layer,
    Profile,
    any_float,
    load_layer_info,
    load_profile,
)

__all__ = [
    "FIX_PASSES",
    "RULE_TEXT",
    "Finding",
    "FindingGroup",
    "load_engine_metadata",
    "metadata_beside",
    "LayerRow",
    "PredictionComparison",
    "EngineReport",
    "build_report",
    "engine_report",
    "find_issues",
    "map_to_onnx",
    "load_onnx_node_names",
]

logger = logging.getLogger(__name__)

# Placement rule → the qdqsurgeon pass that applies it. One table so the names stay in sync.
FIX_PASSES: dict[str, str] = {
    "P3": "quantize-residual",
    "P4": "align-scales",
    "P5": "align-scales",
    "P6": "align-scales",
    "P7": "quantize-pooling",
    "C1": "move-qdq",
}

# Rule ID → one line on what it means, for hover texts and summaries (trt-rules.md has the full text).
RULE_TEXT: dict[str, str] = {
    "C1": "A Q/DQ slides across an op only when every consumer of the tensor agrees; otherwise the producer writes float",
    "F1": "Conv, ConvTranspose, Gemm and MatMul run in INT8 only with a DQ on both the activation and the weight",
    "F2": "A fused chain writes INT8 only when a Q follows it; otherwise it writes float",
    "F3": "Bias, BatchNorm and pointwise activations after a weighted op fuse into its kernel",
    "F4": "No Q on a weighted op's output unless the next layer runs in INT8",
    "F5": "A residual Add fused into a conv takes the precision of its other operand",
    "P1": "Quantize every input of a weighted op: per-tensor activation, per-channel weight",
    "P2": "Quantize a chain's output only when every consumer runs in INT8",
    "P3": "Residual Add: put the Q/DQ on the skip input only, none between the conv and the Add",
    "P4": "Concat: one scale for every quantized input and the output, all inputs quantized or none",
    "P5": "MaxPool and other ops that commute with Q/DQ: input and output share one scale",
    "P6": "Fan-out: one Q/DQ per tensor, shared by every quantized consumer",
    "P7": "Ops without weights that do not commute (pooling, standalone Add, Resize...) run INT8 only fully wrapped in Q/DQ",
    "P8": "Pad before a Conv: place the Q/DQ before the Pad so the Pad fuses",
    "P9": "The final layer and numerically sensitive ops stay in float",
    "P10": "Float regions run in the ONNX's float type: make them FP16 to match an INT8+FP16 engine",
    "P11": "INT8 tensor-core convs want channel counts that are multiples of 16; small convs may be better left FP16",
    "E1": "Count all layers and the Reformat layers by origin (Q/DQ or layout)",
    "E2": "A layer converts between INT8 and float where the model wanted one INT8 path (missing fusion)",
    "E3": "A Q/DQ layer with INT8 on both sides is a requantize: two scales that should be one",
    "E4": "Every engine layer and finding is traced back to the ONNX nodes it came from",
}

# Layers that only move or copy data: a float tensor passing through them is still "the same"
# float tensor for the purpose of finding who quantizes it next.
_PASS_THROUGH_KINDS = frozenset({"NoOp", "Shuffle", "Slice", "Padding", "Reformat"})
_MAX_HOPS = 4


@dataclass
class Finding:
    """One problem in the engine, attached to the layer and the ONNX nodes it came from."""

    rule: str
    layer: str
    message: str
    fix_pass: str | None
    onnx_nodes: list[str] = field(default_factory=list)
    severity: str = "warning"  # "info" when expected and not fixable by placement (P10)
    layer_index: int = -1
    cause: str | None = None  # the placement rule that explains it (P3, P7, C1, ...)
    kind: str = ""  # what the engine shows: "requantize", "standalone Quantize", ...
    # Layers whose time the fix would save (the standalone Q/DQ or reformat kernel), for the cost.
    cost_layers: list[int] = field(default_factory=list)

    @property
    def pattern(self) -> str:
        """Key of the finding's pattern: its rule and the placement rule behind it (``E2/P3``)."""
        return f"{self.rule}/{self.cause}" if self.cause else self.rule

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "layer": self.layer,
            "onnx_nodes": list(self.onnx_nodes),
            "message": self.message,
            "fix_pass": self.fix_pass,
            "severity": self.severity,
            "cause": self.cause,
            "kind": self.kind,
            "pattern": self.pattern,
        }


_SEVERITY_ORDER = ("info", "warning", "error")


def _severity_rank(severity: str) -> int:
    return _SEVERITY_ORDER.index(severity) if severity in _SEVERITY_ORDER else 0


@dataclass
class FindingGroup:
    """Findings of one pattern, with the time their layers cost and the pass that removes them."""

    pattern: str
    rule: str
    cause: str | None
    fix_pass: str | None
    severity: str
    findings: list[Finding]
    time_ms: float | None  # Σ time of the layers the fix saves, each counted once; None without a profile
    cost_layers: list[int]

    @property
    def kinds(self) -> dict[str, int]:
        return dict(Counter(f.kind for f in self.findings))

    def to_dict(self) -> dict[str, Any]:
        return {
            "pattern": self.pattern,
            "rule": self.rule,
            "cause": self.cause,
            "fix_pass": self.fix_pass,
            "severity": self.severity,
            "findings": len(self.findings),
            "kinds": self.kinds,
            "layers": [f.layer for f in self.findings],
            "cost_layers": list(self.cost_layers),
            "time_ms": self.time_ms,
        }


@dataclass
class LayerRow:
    """Per-layer line of the report."""

    index: int
    name: str
    kind: str
    category: str  # "qdq", "reformat", "int8", "float", "other"
    in_precisions: list[str | None]
    out_precisions: list[str | None]
    time_ms: float | None
    onnx_nodes: list[str]
    inputs: list[str]
    outputs: list[str]
    origin: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PredictionComparison:
    """Static prediction (qdqsurgeon.analysis) against the engine's standalone Q/DQ layers."""

    predicted: int
    actual: int
    predicted_nodes: list[str]
    actual_nodes: list[str]

    @property
    def matched(self) -> list[str]:
        return sorted(set(self.predicted_nodes) & set(self.actual_nodes))

    @property
    def only_predicted(self) -> list[str]:
        return sorted(set(self.predicted_nodes) - set(self.actual_nodes))

    @property
    def only_actual(self) -> list[str]:
        return sorted(set(self.actual_nodes) - set(self.predicted_nodes))

    def to_dict(self) -> dict[str, Any]:
        return {
            "predicted_standalone_qdq_layers": self.predicted,
            "actual_standalone_qdq_layers": self.actual,
            "matched": self.matched,
            "only_predicted": self.only_predicted,
            "only_actual": self.only_actual,
        }


@dataclass
class EngineReport:
    """Summary of one engine; :meth:`to_dict` is the ``--json`` output."""

    source: str | None
    detailed: bool
    layers: int
    layer_types: dict[str, int]
    standalone_qdq_layers: int
    reformat_layers: int
    reformat_layers_by_origin: dict[str, int]
    reformat_type_layers: int  # every layer of type Reformat, Q/DQ origin included (E1's count)
    total_time_ms: float | None
    qdq_time_ms: float | None
    reformat_time_ms: float | None
    int8_compute_time_ms: float | None
    float_compute_time_ms: float | None
    profile_records: int | None
    unmatched_profile_records: int | None
    rows: list[LayerRow]
    findings: list[Finding]
    io_tensors: list[str] = field(default_factory=list)
    onnx_model: str | None = None
    onnx_nodes_mapped: int | None = None
    onnx_nodes_total: int | None = None
    prediction: PredictionComparison | None = None
    # 2:4 sparsity (docs/sparsity.md): layers whose weights TensorRT found 2:4, and layers that run a
    # sparse kernel (tactic name); None for names-only dumps, which show neither.
    sparse_weight_layers: int | None = None
    sparse_kernel_layers: list[str] | None = None
    # GPU, TensorRT version, trtexec figures from metadata files (load_engine_metadata), display-ready.
    metadata: dict[str, str] = field(default_factory=dict)
    metadata_sources: list[str] = field(default_factory=list)

    def finding_groups(self) -> list[FindingGroup]:
        """Findings grouped by pattern (:attr:`Finding.pattern`): warnings before infos, then the costliest first.

        A group's time is the profile time of the layers its fix would remove (standalone
        Q/DQ and reformat kernels), each layer counted once, so an INT8 layer writing float and
        the Quantize behind it are not charged twice.
        """
        times = {r.index: r.time_ms for r in self.rows}
        by: dict[str, list[Finding]] = {}
        for f in self.findings:
            by.setdefault(f.pattern, []).append(f)
        groups = []
        for pattern, items in by.items():
            cost = sorted({i for f in items for i in f.cost_layers})
            time = None
            if self.total_time_ms is not None:
                time = sum(times.get(i) or 0.0 for i in cost)
            groups.append(FindingGroup(
                pattern=pattern,
                rule=items[0].rule,
                cause=items[0].cause,
                fix_pass=items[0].fix_pass,
                severity=max((f.severity for f in items), key=_severity_rank),
                findings=items,
                time_ms=time,
                cost_layers=cost,
            ))
        groups.sort(key=lambda g: (-_severity_rank(g.severity), -(g.time_ms or 0.0), -len(g.findings), g.pattern))
        return groups

    def slowest(self, n: int = 10) -> list[LayerRow]:
        """The ``n`` layers with the largest profile time (empty without a profile)."""
        timed = [r for r in self.rows if r.time_ms is not None]
        return sorted(timed, key=lambda r: (-(r.time_ms or 0.0), r.index))[:n]

    def share(self, value: float | None) -> float | None:
        """Percentage of the total per-layer time."""
        if value is None or not self.total_time_ms:
            return None
        return 100.0 * value / self.total_time_ms

    def to_dict(self, *, include_layers: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "source": self.source,
            "detailed": self.detailed,
            "layers": self.layers,
            "layer_types": dict(self.layer_types),
            "standalone_qdq_layers": self.standalone_qdq_layers,
            "reformat_layers": self.reformat_layers,
            "reformat_layers_by_origin": dict(self.reformat_layers_by_origin),
            "reformat_type_layers": self.reformat_type_layers,
            "total_time_ms": self.total_time_ms,
            "qdq_time_ms": self.qdq_time_ms,
            "qdq_time_percent": self.share(self.qdq_time_ms),
            "reformat_time_ms": self.reformat_time_ms,
            "reformat_time_percent": self.share(self.reformat_time_ms),
            "int8_compute_time_ms": self.int8_compute_time_ms,
            "float_compute_time_ms": self.float_compute_time_ms,
            "profile_records": self.profile_records,
            "unmatched_profile_records": self.unmatched_profile_records,
            "io_tensors": list(self.io_tensors),
            "onnx_model": self.onnx_model,
            "onnx_nodes_mapped": self.onnx_nodes_mapped,
            "onnx_nodes_total": self.onnx_nodes_total,
            "findings": [f.to_dict() for f in self.findings],
            "sparse_weight_layers": self.sparse_weight_layers,
            "sparse_kernel_layers": None if self.sparse_kernel_layers is None else len(self.sparse_kernel_layers),
            "sparse_kernel_layer_names": self.sparse_kernel_layers,
            "metadata": dict(self.metadata),
            "metadata_sources": list(self.metadata_sources),
            "finding_groups": [g.to_dict() for g in self.finding_groups()],
        }
        if self.prediction is not None:
            out["prediction"] = self.prediction.to_dict()
        if include_layers:
            out["layer_details"] = [r.to_dict() for r in self.rows]
        return out

    def to_text(self, *, show_layers: bool = False) -> str:
        """A plain, greppable summary (no colour codes)."""
        lines: list[str] = []
        kind = "detailed" if self.detailed else "names-only (rebuild with --profilingVerbosity=detailed)"
        lines.append(f"engine: {self.source or '-'} ({kind})")
        if self.metadata:
            lines.append("built on: " + ", ".join(f"{k} {v}" for k, v in self.metadata.items()))
        lines.append(f"layers: {self.layers}")
        if self.layer_types:
            types = ", ".join(f"{k} {v}" for k, v in sorted(self.layer_types.items(), key=lambda kv: (-kv[1], kv[0])))
            lines.append(f"layer types: {types}")
        lines.append(f"standalone Q/DQ layers: {self.standalone_qdq_layers}{_time_note(self, self.qdq_time_ms)}")
        lines.append(f"reformat layers: {self.reformat_layers}{_time_note(self, self.reformat_time_ms)}")
        if self.reformat_layers_by_origin:
            by = ", ".join(f"{k} {v}" for k, v in sorted(self.reformat_layers_by_origin.items()))
            lines.append(f"Reformat-type layers: {self.reformat_type_layers} (by Origin: {by})")
        if self.total_time_ms is None:
            lines.append("total time: n/a (no --profile)")
        else:
            lines.append(
                f"total time: {self.total_time_ms:.4f} ms (sum of per-layer averageMs, {self.profile_records} records"
                + (f", {self.unmatched_profile_records} not matched to a layer" if self.unmatched_profile_records else "")
                + ")"
            )
            if self.int8_compute_time_ms is not None and self.float_compute_time_ms is not None:
                lines.append(
                    f"INT8 compute: {self.int8_compute_time_ms:.4f} ms, float compute: {self.float_compute_time_ms:.4f} ms"
                )
        if self.sparse_kernel_layers is not None and (self.sparse_weight_layers or self.sparse_kernel_layers):
            lines.append(f"2:4 sparsity: {self.sparse_weight_layers} layer(s) with 2:4 weights, "
                         f"{len(self.sparse_kernel_layers)} running sparse kernels")
        if self.onnx_model:
            lines.append(f"ONNX: {self.onnx_model} ({self.onnx_nodes_mapped}/{self.onnx_nodes_total} nodes mapped to layers)")
        if self.prediction is not None:
            p = self.prediction
            lines.append(
                f"standalone Q/DQ layers predicted vs actual: {p.predicted} vs {p.actual}"
                f" ({len(p.matched)} matched, {len(p.only_predicted)} only predicted, {len(p.only_actual)} only in the engine)"
            )
        if show_layers and self.rows:
            lines.append("")
            lines.append("  #  type            in -> out            time ms  name")
            for r in self.rows:
                prec = f"{_fmt_prec(r.in_precisions)} -> {_fmt_prec(r.out_precisions)}"
                t = f"{r.time_ms:.4f}" if r.time_ms is not None else "-"
                lines.append(f"{r.index:>3}  {r.kind[:14]:<14}  {prec:<20} {t:>8}  {r.name}")
        lines.append("")
        lines.append(f"findings: {len(self.findings)}")
        groups = self.finding_groups()
        if len(groups) > 1 or any(len(g.findings) > 1 for g in groups):
            for g in groups:
                share = self.share(g.time_ms)
                cost = "" if g.time_ms is None or share is None else f", {g.time_ms:.4f} ms ({share:.1f} %)"
                lines.append(f"  [{g.pattern}] {g.severity}: {len(g.findings)} finding(s){cost}"
                             f" -> {g.fix_pass or 'no pass (expected)'}")
        for f in self.findings:
            nodes = f" [onnx: {', '.join(f.onnx_nodes)}]" if f.onnx_nodes else ""
            fix = f" -> fix: {f.fix_pass}" if f.fix_pass else ""
            lines.append(f"  {f.rule} {f.layer}{nodes}: {f.message}{fix}")
        return "\n".join(lines)


def _fmt_prec(values: list[str | None]) -> str:
    return ",".join(v or "?" for v in values) or "-"


def _time_note(report: EngineReport, value: float | None) -> str:
    share = report.share(value)
    if value is None or share is None:
        return ""
    return f" ({value:.4f} ms, {share:.1f} % of the time)"


# --------------------------------------------------------------------------- ONNX mapping (E4)


def load_onnx_node_names(path: str | Path) -> tuple[set[str], Any]:
    """Node names of the ONNX model's main graph, plus the model (weights not loaded)."""
    import onnx  # local: the parser must work without touching onnx

    p = Path(path)
    if not p.exists():
        raise UsageError("file not found", path=str(p))
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, ValueError, ... for a bad file
        raise ModelError(f"cannot read ONNX model: {exc}", path=str(p)) from exc
    names = {n.name for n in model.graph.node if n.name}
    return names, model


def _heuristic_names(layer: Layer) -> list[str]:
    """Without a model, drop parts that are obviously weights (``*.weight``, TF variable reads)."""
    names = layer.onnx_names()
    if layer.metadata:
        return names
    return [
        n
        for n in names
        if not n.endswith((".weight", ".bias")) and "ReadVariableOp" not in n and not n.startswith("onnx::")
    ]


def map_to_onnx(engine: EngineInfo, node_names: set[str] | None) -> dict[int, list[str]]:
    """Layer index → ONNX node names (E4), keeping only names that are nodes of the model."""
    out: dict[int, list[str]] = {}
    for layer in engine.layers:
        if node_names is None:
            out[layer.index] = _heuristic_names(layer)
        else:
            out[layer.index] = [n for n in layer.onnx_names() if n in node_names]
    return out


# --------------------------------------------------------------------------- findings (E2, E3)


class _Graph:
    """Producer/consumer view of the engine, rebuilt from tensor names (§4 rule 3)."""

    def __init__(self, engine: EngineInfo) -> None:
        self.engine = engine
        self.layers = engine.layers
        self.producers = engine.producers()
        self.consumers = engine.consumers()

    def _pass_through(self, layer: Layer) -> bool:
        return not layer.is_compute and not layer.is_standalone_qdq

    def source_of(self, tensor: str) -> Layer | None:
        """The compute (or Q/DQ) layer behind ``tensor``, skipping layout copies; None = network input."""
        seen = 0
        while seen < _MAX_HOPS:
            idx = self.producers.get(tensor)
            if idx is None:
                return None
            layer = self.layers[idx]
            if not self._pass_through(layer) or not layer.inputs:
                return layer
            tensor = layer.inputs[0].name
            seen += 1
        return self.layers[self.producers[tensor]] if tensor in self.producers else None

    def quantizer_after(self, layer: Layer) -> tuple[Layer | None, list[Layer]]:
        """The first layer that turns this layer's float output back into Int8, and the path to it.

        Walks through layout copies and float pooling (P7's case: Conv → GAP → Quantize).
        """
        frontier = [(t.name, []) for t in layer.outputs if t.precision in FLOAT_PRECISIONS]
        for _ in range(_MAX_HOPS):
            nxt: list[tuple[str, list[Layer]]] = []
            for tensor, path in frontier:
                for cidx, pos in self.consumers.get(tensor, []):
                    c = self.layers[cidx]
                    reads = c.inputs[pos].precision if pos < len(c.inputs) else None
                    if reads in FLOAT_PRECISIONS and "int8" in c.out_precisions:
                        return c, path
                    float_pool = c.kind == "Pooling" and c.activation_precision in FLOAT_PRECISIONS
                    if self._pass_through(c) or float_pool:
                        nxt.extend((t.name, [*path, c]) for t in c.outputs)
            frontier = nxt
            if not frontier:
                break
        return None, []

    def float_residual_reader(self, tensor: str) -> Layer | None:
        """A compute layer reading ``tensor`` as a non-first (residual) operand in float."""
        for cidx, pos in self.consumers.get(tensor, []):
            c = self.layers[cidx]
            if pos >= 1 and c.is_compute and c.inputs[pos].precision in FLOAT_PRECISIONS:
                return c
        return None

    def float_readers(self, tensor: str, exclude: int) -> list[Layer]:
        out = []
        for cidx, pos in self.consumers.get(tensor, []):
            c = self.layers[cidx]
            if cidx != exclude and c.inputs[pos].precision in FLOAT_PRECISIONS and "int8" not in c.out_precisions:
                out.append(c)
        return out


def _has_float_residual(layer: Layer) -> bool:
    return layer.is_compute and len(layer.inputs) > 1 and any_float(t.precision for t in layer.inputs[1:])


def _diagnose_quantize(graph: _Graph, tensor: str, src: Layer | None, path: list[Layer], quantizer_index: int) -> tuple[str, str]:
    """Which placement rule explains a float tensor that is quantized by a separate kernel."""
    if src is None:
        return "P10", "quantizes the float network input; expected unless the input itself is INT8 (P10)"
    if any(l.kind == "Pooling" for l in path) or (src.kind == "Pooling" and src.activation_precision in FLOAT_PRECISIONS):
        return "P7", "pooling runs in float between INT8 layers; quantize its input too (P7)"
    if _has_float_residual(src):
        return "P3", "the fused residual Add has a float skip operand, so its output is float (F5); quantize the skip input (P3)"
    reader = graph.float_residual_reader(tensor)
    if reader is not None:
        return "P3", f"the tensor is also the float skip operand of '{reader.name}'; quantize the residual input (P3)"
    others = graph.float_readers(tensor, exclude=quantizer_index)
    if others:
        return "C1", f"the tensor also feeds float consumer '{others[0].name}', so the producer writes float (C1)"
    return "C1", "the Quantize did not fuse into its producer; move it next to the producer output (C1)"


def find_issues(engine: EngineInfo, onnx_map: dict[int, list[str]]) -> list[Finding]:
    """E2 and E3 findings, in execution order."""
    if not engine.detailed:
        return []
    graph = _Graph(engine)
    findings: list[Finding] = []

    def add(rule: str, layer: Layer, kind: str, message: str, cause: str, cost: Layer | None = None) -> None:
        fix = FIX_PASSES.get(cause)
        severity = "warning" if fix else "info"  # no pass to run: expected (P10), shown for completeness
        nodes = list(onnx_map.get(layer.index, []))
        if not nodes and layer.is_reformat:
            # A reformat has no ONNX node of its own (E4): point at the layer it feeds.
            for t in layer.outputs:
                for cidx, _ in graph.consumers.get(t.name, []):
                    nodes.extend(n for n in onnx_map.get(cidx, []) if n not in nodes)
        cost = layer if cost is None else cost
        findings.append(Finding(rule, layer.name, message, fix, nodes, severity, layer.index, cause, kind,
                                [cost.index] if cost.is_standalone_qdq or cost.is_reformat else []))

    for layer in engine.layers:
        ins = [p for p in layer.in_precisions if p]
        outs = [p for p in layer.out_precisions if p]
        if layer.is_standalone_qdq and ins and outs and set(ins) == {"int8"} and set(outs) == {"int8"}:
            # E3: a Q/DQ layer left with Int8 on both sides is a requantize → scales differ.
            add("E3", layer, "requantize", "requantize Int8 -> Int8: the scales around a Concat, MaxPool or fan-out differ (P4-P6)", "P4")
            continue
        if (layer.is_standalone_qdq or layer.is_reformat) and layer.changes_precision:
            step = f"{_fmt_prec(layer.in_precisions)} -> {_fmt_prec(layer.out_precisions)}"
            if "int8" in outs and "int8" not in ins:
                tensor = layer.inputs[0].name
                src = graph.source_of(tensor)
                path = []
                if src is not None and src.kind == "Pooling":
                    path = [src]
                cause, why = _diagnose_quantize(graph, tensor, src, path, layer.index)
                add("E2", layer, "standalone Quantize", f"standalone Quantize {step}: {why}", cause)
            elif "int8" in ins and "int8" not in outs:
                cause, why = _diagnose_dequantize(graph, layer)
                add("E2", layer, "standalone Dequantize", f"standalone Dequantize {step}: {why}", cause)
            else:
                add("E2", layer, "float reformat", f"reformat changes float precision {step}: keep the float region in one type (P10)", "P10")
            continue
        if layer.is_compute and layer.activation_precision == "int8" and any_float(outs):
            quantizer, path = graph.quantizer_after(layer)
            if quantizer is None:
                continue  # float output consumed in float (e.g. the final layer, P9): fine
            tensor = next(t.name for t in layer.outputs if t.precision in FLOAT_PRECISIONS)
            cause, why = _diagnose_quantize(graph, tensor, layer, path, quantizer.index)
            step = f"{_fmt_prec(layer.in_precisions)} -> {_fmt_prec(layer.out_precisions)}"
            add(
                "E2",
                layer,
                "INT8 layer writes float",
                f"INT8 layer writes float ({step}) and '{quantizer.name}' quantizes it again: {why}",
                cause,
                cost=quantizer,  # the fix saves the extra Quantize kernel (and half the bytes written)
            )
    return findings


def _diagnose_dequantize(graph: _Graph, layer: Layer) -> tuple[str, str]:
    frontier = [t.name for t in layer.outputs]
    for _ in range(_MAX_HOPS):
        nxt: list[str] = []
        for tensor in frontier:
            for cidx, pos in graph.consumers.get(tensor, []):
                c = graph.layers[cidx]
                if c.kind == "Pooling":
                    return "P7", f"feeds float pooling '{c.name}'; quantize the pooling input (P7)"
                if pos >= 1 and c.is_compute:
                    return "P3", f"float skip operand of '{c.name}'; quantize the residual input (P3)"
                nxt.extend(t.name for t in c.outputs)
        frontier = nxt
    return "C1", "an INT8 tensor is read in float; quantize its consumer or move the DQ (C1)"


# --------------------------------------------------------------------------- the report


def _names_only_qdq(name: str) -> bool:
    if " + " in name or " || " in name:
        return False
    low = name.lower()
    return any(k in low for k in ("quantizelinear", "quantlinearnode", "dequantlinearnode"))


def build_report(
    engine: EngineInfo,
    profile: Profile | None = None,
    *,
    onnx_node_names: set[str] | None = None,
    onnx_model_path: str | None = None,
    prediction: PredictionComparison | None = None,
) -> EngineReport:
    """Summarise ``engine`` (and ``profile`` when given); see the module docstring."""
    onnx_map = map_to_onnx(engine, onnx_node_names)
    times: dict[str, float] = {}
    unmatched: int | None = None
    if profile is not None:
        by_name = profile.by_name()
        names = {l.name for l in engine.layers}
        for layer in engine.layers:
            rec = by_name.get(layer.name)
            if rec is not None:
                times[layer.name] = rec.average_ms
        unmatched = sum(1 for r in profile.records if r.name not in names)

    rows: list[LayerRow] = []
    qdq = reformat = 0
    sums = Counter()
    for layer in engine.layers:
        if engine.detailed:
            if layer.is_standalone_qdq:
                cat = "qdq"
            elif layer.is_reformat:
                cat = "reformat"
            elif layer.is_compute and layer.activation_precision == "int8":
                cat = "int8"
            elif layer.is_compute and layer.activation_precision in FLOAT_PRECISIONS:
                cat = "float"
            else:
                cat = "other"
        else:
            cat = "qdq" if _names_only_qdq(layer.name) else "reformat" if layer.name.startswith("Reformatting CopyNode") else "other"
        qdq += cat == "qdq"
        reformat += cat == "reformat"
        t = times.get(layer.name)
        if t is not None:
            sums[cat] += t
        rows.append(
            LayerRow(
                index=layer.index,
                name=layer.name,
                kind=layer.kind if engine.detailed else "Unknown",
                category=cat,
                in_precisions=layer.in_precisions,
                out_precisions=layer.out_precisions,
                time_ms=t,
                onnx_nodes=list(onnx_map.get(layer.index, [])),
                inputs=[x.name for x in layer.inputs],
                outputs=[x.name for x in layer.outputs],
                origin=layer.origin,
            )
        )

    layer_types = Counter(l.kind for l in engine.layers) if engine.detailed else Counter()
    by_origin = Counter(
        (l.origin or "none") for l in engine.layers if l.is_reformat_type or l.origin is not None
    )
    have_profile = profile is not None
    mapped = None
    if onnx_node_names is not None:
        mapped = len({n for names in onnx_map.values() for n in names})
    return EngineReport(
        source=engine.source,
        detailed=engine.detailed,
        layers=len(engine.layers),
        layer_types=dict(layer_types),
        standalone_qdq_layers=qdq,
        reformat_layers=reformat,
        reformat_layers_by_origin=dict(by_origin),
        reformat_type_layers=sum(1 for l in engine.layers if l.is_reformat_type),
        total_time_ms=profile.total_average_ms if have_profile else None,
        qdq_time_ms=sums["qdq"] if have_profile else None,
        reformat_time_ms=sums["reformat"] if have_profile else None,
        # Names-only dumps carry no precisions, so the INT8/float split is unknown there.
        int8_compute_time_ms=sums["int8"] if have_profile and engine.detailed else None,
        float_compute_time_ms=sums["float"] if have_profile and engine.detailed else None,
        profile_records=len(profile.records) if have_profile else None,
        unmatched_profile_records=unmatched,
        rows=rows,
        findings=find_issues(engine, onnx_map),
        io_tensors=[t.name for t in engine.io_tensors],
        onnx_model=onnx_model_path,
        onnx_nodes_mapped=mapped,
        onnx_nodes_total=len(onnx_node_names) if onnx_node_names is not None else None,
        prediction=prediction,
        sparse_weight_layers=sum(1 for l in engine.layers if l.has_sparse_weights) if engine.detailed else None,
        sparse_kernel_layers=[l.name for l in engine.layers if l.sparse_kernel] if engine.detailed else None,
    )


# --------------------------------------------------------------------------- build/profile metadata

# Display label → the key trtexec prints (and TREx's *.metadata.json keeps) for it, in card order.
_METADATA_KEYS: tuple[tuple[str, str], ...] = (
    ("GPU", "Selected Device"),
    ("compute capability", "Compute Capability"),
    ("TensorRT", "TensorRT version"),
    ("precision flags", "Precision"),
    ("trtexec mean latency", "Latency"),
    ("trtexec throughput", "Throughput"),
)
_LOG_LINE = re.compile(r"\[I\] (Selected Device|Compute Capability|TensorRT version|Precision|Throughput|Latency): (.+?)\s*$", re.M)
_VERSION_KEY = re.compile(r"^(tensorrt|trt)[ _]?version$", re.I)


def metadata_beside(*paths: str | Path | None) -> list[Path]:
    """TREx's metadata files next to a layer-info or profile dump (``X.graph.json`` →
    ``X.build.metadata.json``, ``X.profile.json`` → ``X.profile.metadata.json``), those that exist."""
    out: list[Path] = []
    for path in paths:
        if path is None:
            continue
        p = Path(path)
        name = p.name
        stems = []
        for suffix in (".graph.json", ".profile.json", ".json"):
            if name.endswith(suffix):
                stems.append(name[: -len(suffix)])
                break
        for stem in stems:
            for tail in (".build.metadata.json", ".profile.metadata.json", ".metadata.json"):
                q = p.with_name(stem + tail)
                if q.is_file() and q not in out:
                    out.append(q)
    return out


def _flatten(doc: Any, out: dict[str, Any]) -> None:
    if isinstance(doc, dict):
        for k, v in doc.items():
            if isinstance(v, (dict, list)) and not (k == "Latency" and isinstance(v, list)):
                _flatten(v, out)
            else:
                key = "TensorRT version" if _VERSION_KEY.match(str(k)) else str(k)
                out.setdefault(key, v)
    elif isinstance(doc, list):
        for v in doc:
            _flatten(v, out)


def _mean_latency(value: Any) -> str | None:
    """trtexec's latency: TREx keeps [min, max, mean, median, percentiles...]; the log says ``mean = X ms``."""
    if isinstance(value, list) and len(value) >= 3 and isinstance(value[2], (int, float)):
        return f"{value[2]:.4f} ms"
    m = re.search(r"mean = ([0-9.eE+-]+)", str(value))
    return f"{float(m.group(1)):.4f} ms" if m else None


def _display(label: str, value: Any) -> str | None:
    if value is None or value == "":
        return None
    if label == "trtexec mean latency":
        return _mean_latency(value)
    if label == "trtexec throughput":
        m = re.match(r"\s*([0-9.eE+-]+)", str(value))
        return f"{float(m.group(1)):.1f} qps" if m else None
    if label == "compute capability" and isinstance(value, float):
        return f"{value:g}"
    return str(value).strip()


def load_engine_metadata(paths: list[str | Path], *, required: bool = False) -> dict[str, str]:
    """GPU, TensorRT version and trtexec figures from TREx ``*.metadata.json`` files or trtexec logs.

    The first file that has a field wins. With ``required``, a file that yields none of the
    fields is an error (it was named on the command line, so it was meant to have them).
    """
    out: dict[str, str] = {}
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise UsageError("file not found", path=str(p))
        text = p.read_text(encoding="utf-8", errors="replace")
        found: dict[str, Any] = {}
        try:
            _flatten(json.loads(text), found)
        except json.JSONDecodeError:
            for key, value in _LOG_LINE.findall(text):
                found.setdefault(key, value)
        shown = {label: _display(label, found.get(key)) for label, key in _METADATA_KEYS}
        shown = {k: v for k, v in shown.items() if v}
        if required and not shown:
            raise ModelError("no GPU or TensorRT metadata found (expected a TREx *.metadata.json or a trtexec log)", path=str(p))
        for label, value in shown.items():
            out.setdefault(label, value)
    # Keep the card order whatever the file order was.
    return {label: out[label] for label, _ in _METADATA_KEYS if label in out}


def _compare_prediction(model: Any, report_rows: list[LayerRow]) -> PredictionComparison | None:
    """Predicted vs actual standalone Q/DQ, when qdqsurgeon.analysis exists (optional module)."""
    try:
        from qdqsurgeon.analysis import predict  # type: ignore[attr-defined]
    except Exception:  # not written yet, or broken: the report simply leaves it out
        logger.debug("qdqsurgeon.analysis.predict not available; no prediction in the report")
        return None
    try:
        pred = predict(model)
    except Exception as exc:  # a prediction bug must not take the engine report down
        logger.warning("static prediction failed: %s", exc)
        return None
    nodes = [str(n) for n in (getattr(pred, "standalone_qdq", None) or [])]
    count = getattr(pred, "standalone_qdq_layers", None)
    actual_nodes = sorted({n for r in report_rows if r.category == "qdq" for n in r.onnx_nodes})
    actual = sum(1 for r in report_rows if r.category == "qdq")
    return PredictionComparison(
        predicted=int(count) if isinstance(count, int) else len(nodes),
        actual=actual,
        predicted_nodes=nodes,
        actual_nodes=actual_nodes,
    )


def engine_report(
    layer_info: str | Path,
    *,
    profile: str | Path | None = None,
    onnx_model: str | Path | None = None,
    metadata: list[str | Path] | None = None,
) -> EngineReport:
    """Read the dumps (and the ONNX model) and build the report: the ``engine-report`` API.

    ``metadata`` names trtexec logs or TREx metadata files with the GPU and TensorRT version;
    TREx's ``*.metadata.json`` beside the dumps are read too (the named files win).
    """
    engine = load_layer_info(layer_info)
    explicit = [Path(m) for m in metadata or []]
    meta = load_engine_metadata(explicit, required=True)
    beside = [p for p in metadata_beside(layer_info, profile) if p not in explicit]
    for key, value in load_engine_metadata(beside).items():
        meta.setdefault(key, value)
    prof = load_profile(profile) if profile is not None else None
    node_names: set[str] | None = None
    model = None
    if onnx_model is not None:
        node_names, model = load_onnx_node_names(onnx_model)
    report = build_report(
        engine,
        prof,
        onnx_node_names=node_names,
        onnx_model_path=str(onnx_model) if onnx_model is not None else None,
    )
    report.metadata = {label: meta[label] for label, _ in _METADATA_KEYS if label in meta}
    report.metadata_sources = [str(p) for p in [*explicit, *beside]]
    if model is not None:
        report.prediction = _compare_prediction(model, report.rows)
    return report
