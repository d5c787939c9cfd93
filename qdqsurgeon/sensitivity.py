"""Sensitivity analysis: which quantized groups cost accuracy, measured end to end.

The model is quantized once, as ``optimize`` does (calibration and placement run once). Its Q/DQ
pairs are then grouped by what TensorRT runs as one INT8 unit: the pairs read by one node (a
weighted op's activation and weight, a wrapped pooling op's inputs) belong together, pairs on
tensors TensorRT ties into one buffer (Concat/Split, MaxPool, reshapes, fan-out: align-scales'
:func:`~qdqsurgeon.passes.align_scales.tied_groups`, rules P4-P6) belong together, and so do the
two batch GEMMs of an attention block (P1, INT8 MHA). For every group two configurations are run
on the evaluation data: the group alone quantized (everything else float) and the group alone
left float (everything else quantized); their worst-output SQNR against the float model is the
result, with the all-float and all-quantized runs as references.

Every configuration runs in one onnxruntime session built once per worker: each DequantizeLinear
output ``y`` of group ``g`` (Q input ``x``) is replaced by ``Where(s[g] > 0.5, y, x)`` with ``s`` a
graph input of one switch per group, so 0 gives the float tensor and 1 the quantized one, exactly. Configurations are spread over worker processes
(``jobs``) or over an existing Ray cluster (``ray_address``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from .errors import DataError, UsageError

__all__ = ["QuantGroup", "GroupResult", "SensitivityReport", "find_groups", "switch_model", "analyze", "render_html"]

logger = logging.getLogger(__name__)

SWITCH_INPUT = "qdqsurgeon_switch"


@dataclass
class QuantGroup:
    """Q/DQ pairs TensorRT treats as one INT8 unit, named by the layers they feed."""

    index: int
    name: str
    layers: list[str]  # the nodes reading the group's DequantizeLinear outputs (weighted ops first)
    ops: list[str]
    dq_nodes: list[str]
    fixed: list[str] = field(default_factory=list)  # DQ of stored int8 weights: cannot be switched to float


@dataclass
class GroupResult:
    group: QuantGroup
    sqnr_alone_int8: float  # only this group quantized
    sqnr_alone_float: float  # everything but this group quantized
    cosine_alone_int8: float
    cosine_alone_float: float

    def to_dict(self, all_int8: float) -> dict[str, Any]:
        return {
            "group": self.group.name, "layers": self.group.layers, "ops": self.group.ops,
            "dq_nodes": self.group.dq_nodes,
            "sqnr_db_alone_int8": _num(self.sqnr_alone_int8), "sqnr_db_alone_float": _num(self.sqnr_alone_float),
            "gain_db_when_float": _num(self.sqnr_alone_float - all_int8),
            "cosine_alone_int8": _num(self.cosine_alone_int8), "cosine_alone_float": _num(self.cosine_alone_float),
            **({"stays_int8": self.group.fixed} if self.group.fixed else {}),
        }


@dataclass
class SensitivityReport:
    """Per-group results, most harmful first (lowest SQNR when quantized alone)."""

    results: list[GroupResult]
    sqnr_all_int8: float
    cosine_all_int8: float
    samples: int
    seconds: float = 0.0
    workers: str = "1 process"

    def ranked(self) -> list[GroupResult]:
        return sorted(self.results, key=lambda r: (r.sqnr_alone_int8, -(r.sqnr_alone_float - self.sqnr_all_int8)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "sqnr_db_all_int8": _num(self.sqnr_all_int8), "cosine_all_int8": _num(self.cosine_all_int8),
            "samples": self.samples, "groups": len(self.results), "seconds": round(self.seconds, 3),
            "workers": self.workers,
            "ranked": [r.to_dict(self.sqnr_all_int8) for r in self.ranked()],
        }


def _num(v: float) -> float | str:
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return round(float(v), 4)


# ------------------------------------------------------------------------------------------------ groups


def find_groups(model: onnx.ModelProto) -> list[QuantGroup]:
    """The quantizable groups of a Q/DQ model, in graph order (see the module docstring)."""
    from .graph import import_model, is_dq, is_q
    from .passes.align_scales import _UnionFind, tied_groups
    from .trt_rules import attention_gemms, is_weighted

    graph = import_model(model)
    dqs = [n for n in graph.nodes if is_dq(n)]
    if not dqs:
        raise UsageError("the model has no DequantizeLinear: nothing to analyse")
    key = {d.name: i for i, d in enumerate(dqs)}
    uf = _UnionFind()  # over DQ indices

    def union(nodes: list) -> None:
        for d in nodes[1:]:
            uf.union(key[nodes[0].name], key[d.name])

    for i in range(len(dqs)):
        uf.find(i)
    for q in (n for n in graph.nodes if is_q(n)):  # DQs fed by one Q are one quantizer (P6)
        union([d for d in q.outputs[0].outputs if is_dq(d)])
    readers: dict[str, list] = {}
    for node in graph.nodes:
        if is_q(node) or is_dq(node):
            continue
        feeding = [t.inputs[0] for t in node.inputs if t.inputs and is_dq(t.inputs[0])]
        for d in feeding:
            readers.setdefault(d.name, []).append(node)
        union(feeding)
    for group in tied_groups(graph):
        members = {id(t) for t in group}
        union([d for d in dqs if d.inputs[0].inputs and is_q(d.inputs[0].inputs[0])
               and id(d.inputs[0].inputs[0].inputs[0]) in members])
    for a, b in attention_gemms(graph):
        union([t.inputs[0] for n in (a, b) for t in n.inputs if t.inputs and is_dq(t.inputs[0])])

    order = {n.name: i for i, n in enumerate(graph.nodes)}
    comps: dict[int, list] = {}
    for d in dqs:
        comps.setdefault(uf.find(key[d.name]), []).append(d)
    groups = []
    for members in sorted(comps.values(), key=lambda ds: min(order[d.name] for d in ds)):
        layers: list = []
        for d in members:
            for r in readers.get(d.name, []):
                if r not in layers:
                    layers.append(r)
        layers.sort(key=lambda n: (not is_weighted(n), order.get(n.name, 0)))
        if not layers:  # a pair nobody reads outside Q/DQ (cleanup removes these; be safe)
            continue
        head = layers[0].name or layers[0].op
        name = head if len(layers) == 1 else f"{head} (+{len(layers) - 1})"
        fixed = [d.name for d in members if not (d.inputs[0].inputs and is_q(d.inputs[0].inputs[0]))]
        groups.append(QuantGroup(len(groups), name, [n.name for n in layers], sorted({n.op for n in layers}),
                                 [d.name for d in members], fixed))
    return groups


# ------------------------------------------------------------------------------------------------ switch model


def switch_model(model: onnx.ModelProto, groups: Sequence[QuantGroup]) -> onnx.ModelProto:
    """``model`` with input ``qdqsurgeon_switch`` [G]: 0 makes a group's Q/DQ exact float, 1 keeps it quantized (Where)."""
    import onnx_graphsurgeon as gs

    from .graph import export_model, import_model

    graph = import_model(model)
    nodes = {n.name: n for n in graph.nodes}
    switch = gs.Variable(SWITCH_INPUT, dtype=np.float32, shape=[len(groups)])
    graph.inputs.append(switch)
    for g in groups:
        dq_nodes = [nodes[d] for d in g.dq_nodes if d not in g.fixed and d in nodes]
        if not dq_nodes:
            continue
        s = gs.Variable(f"{SWITCH_INPUT}_{g.index}", dtype=np.float32, shape=[])
        on = gs.Variable(f"{SWITCH_INPUT}_{g.index}_on", dtype=np.bool_, shape=[])
        graph.nodes += [gs.Node("Gather", f"{SWITCH_INPUT}_gather_{g.index}",
                                inputs=[switch, gs.Constant(f"{SWITCH_INPUT}_idx_{g.index}", np.array(g.index, np.int64))],
                                outputs=[s], attrs={"axis": 0}),
                        gs.Node("Greater", f"{SWITCH_INPUT}_on_{g.index}",
                                inputs=[s, gs.Constant(f"{SWITCH_INPUT}_half_{g.index}", np.array(0.5, np.float32))],
                                outputs=[on])]
        for d in dq_nodes:
            x = d.inputs[0].inputs[0].inputs[0]  # the Q's float input
            y = d.outputs[0]
            out = gs.Variable(f"{d.name}_switch_out", dtype=y.dtype, shape=y.shape)
            consumers = list(y.outputs)
            graph.nodes.append(gs.Node("Where", f"{d.name}_switch", inputs=[on, y, x], outputs=[out]))
            for c in consumers:
                c.inputs = [out if t is y else t for t in c.inputs]
            graph.outputs = [out if t is y else t for t in graph.outputs]
    graph.toposort()
    return export_model(graph, template=model)


# ------------------------------------------------------------------------------------------------ evaluation


def _metrics(ref: list[np.ndarray], got: list[np.ndarray]) -> tuple[float, float]:
    """Worst SQNR (dB) and worst cosine over the float outputs."""
    from .check import sqnr_db

    worst_s, worst_c = math.inf, 1.0
    for r, g in zip(ref, got):
        if r.dtype.kind != "f" or r.shape != g.shape:
            continue
        r64, g64 = r.astype(np.float64).ravel(), g.astype(np.float64).ravel()
        finite = np.isfinite(r64)
        r64, g64 = r64[finite], g64[finite]
        noise = float(np.sum((r64 - g64) ** 2)) if np.all(np.isfinite(g64)) else math.inf
        worst_s = min(worst_s, sqnr_db(float(np.sum(r64 ** 2)), noise))
        denom = float(np.linalg.norm(r64) * np.linalg.norm(g64))
        worst_c = min(worst_c, float(r64 @ g64) / denom if denom > 0 else (1.0 if not r64.any() and not g64.any() else 0.0))
    return worst_s, worst_c


class _Evaluator:
    """One onnxruntime session of the switch model and the evaluation feeds; runs configurations."""

    def __init__(self, model_bytes: bytes, feeds: list[dict[str, np.ndarray]], threads: int = 0) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 4
        self.session = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]
        inputs = [i.name for i in self.session.get_inputs() if i.name != SWITCH_INPUT]
        self.feeds = [{k: f[k] for k in inputs} for f in feeds]
        self.ref: list[np.ndarray] | None = None
        self._batch()

    def _batch(self) -> None:
        """All samples in one run when the model takes any batch size (much faster than one run each)."""
        if len(self.feeds) < 2 or any(np.ndim(v) == 0 for f in self.feeds for v in f.values()):
            return
        joined = {k: np.concatenate([f[k] for f in self.feeds]) for k in self.feeds[0]}
        n = len(next(iter(self.feeds[0].values())))
        try:
            probe = self.session.run(self.outputs, {**joined, SWITCH_INPUT: self._switch_zeros()})
            single = self.session.run(self.outputs, {**self.feeds[0], SWITCH_INPUT: self._switch_zeros()})
        except Exception:  # a fixed batch dimension: one run per batch
            return
        total = sum(len(next(iter(f.values()))) for f in self.feeds)
        if all(np.ndim(a) and np.ndim(b) and a.shape[0] == total and b.shape[0] == n for a, b in zip(probe, single)):
            self.feeds = [joined]

    def _switch_zeros(self) -> np.ndarray:
        shape = next(i.shape for i in self.session.get_inputs() if i.name == SWITCH_INPUT)
        return np.zeros(int(shape[0]), np.float32)

    def outputs_for(self, config: np.ndarray) -> list[np.ndarray]:
        per_output: list[list[np.ndarray]] = [[] for _ in self.outputs]
        for feed in self.feeds:
            for acc, value in zip(per_output, self.session.run(self.outputs, {**feed, SWITCH_INPUT: config})):
                acc.append(np.asarray(value))
        return [np.concatenate([v.reshape(1, -1) if v.ndim == 0 else v for v in vals]) for vals in per_output]

    def score(self, config: np.ndarray) -> tuple[float, float]:
        if self.ref is None:
            self.ref = self.outputs_for(np.zeros_like(config))
        return _metrics(self.ref, self.outputs_for(config))


_WORKER: _Evaluator | None = None


def _init_worker(model_bytes: bytes, feeds: list[dict[str, np.ndarray]], threads: int) -> None:
    global _WORKER
    _WORKER = _Evaluator(model_bytes, feeds, threads)


def _score_chunk(configs: list[np.ndarray]) -> list[tuple[float, float]]:
    assert _WORKER is not None
    return [_WORKER.score(c) for c in configs]


def _configs(n: int) -> list[np.ndarray]:
    """All quantized, then per group: alone quantized, alone float."""
    out = [np.ones(n, np.float32)]
    for g in range(n):
        alone = np.zeros(n, np.float32)
        alone[g] = 1.0
        rest = np.ones(n, np.float32)
        rest[g] = 0.0
        out += [alone, rest]
    return out


def _chunks(items: list, parts: int) -> list[list]:
    size = max(1, math.ceil(len(items) / max(1, parts)))
    return [items[i:i + size] for i in range(0, len(items), size)]


def _run_local(model_bytes: bytes, feeds: list, configs: list[np.ndarray], jobs: int,
               advance: Callable[[int], None]) -> list[tuple[float, float]]:
    if jobs <= 1:
        ev = _Evaluator(model_bytes, feeds)
        out = []
        for c in configs:
            out.append(ev.score(c))
            advance(1)
        return out
    import concurrent.futures as cf
    import multiprocessing as mp

    # spawn, not fork: the parent holds onnxruntime thread pools from calibration.
    chunks = _chunks(configs, jobs * 4)
    results: list[list[tuple[float, float]] | None] = [None] * len(chunks)
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                initargs=(model_bytes, feeds, 1)) as pool:
        futures = {pool.submit(_score_chunk, chunk): i for i, chunk in enumerate(chunks)}
        for fut in cf.as_completed(futures):
            results[futures[fut]] = fut.result()
            advance(len(chunks[futures[fut]]))
    return [r for chunk in results for r in (chunk or [])]


def _run_ray(address: str, model_bytes: bytes, feeds: list, configs: list[np.ndarray], jobs: int,
             advance: Callable[[int], None]) -> list[tuple[float, float]]:
    try:
        import ray  # type: ignore[import-not-found]
    except ImportError:
        raise UsageError("--ray needs the ray package (pip install 'ray[default]'), which is not installed") from None
    try:
        ray.init(address=address, ignore_reinit_error=True, logging_level=logging.ERROR)
    except Exception as exc:  # ray raises ConnectionError and its own types
        raise UsageError(f"cannot connect to the Ray cluster at {address}: {str(exc).splitlines()[0]}") from None

    @ray.remote
    def score_chunk(model_ref, feeds_ref, chunk):
        ev = _Evaluator(model_ref, feeds_ref, 0)
        return [ev.score(c) for c in chunk]

    model_ref, feeds_ref = ray.put(model_bytes), ray.put(feeds)
    workers = max(jobs, int(ray.cluster_resources().get("CPU", 1)))
    chunks = _chunks(configs, workers * 2)
    pending = {score_chunk.remote(model_ref, feeds_ref, chunk): i for i, chunk in enumerate(chunks)}
    results: list[list | None] = [None] * len(chunks)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            i = pending.pop(ref)
            results[i] = ray.get(ref)
            advance(len(chunks[i]))
    return [r for chunk in results for r in (chunk or [])]


def _materialize(data: Iterable[dict[str, np.ndarray]], limit: int | None) -> list[dict[str, np.ndarray]]:
    feeds: list[dict[str, np.ndarray]] = []
    count = 0
    for batch in data:
        feeds.append({k: np.asarray(v) for k, v in batch.items()})
        count += len(next(iter(batch.values()))) if batch and np.ndim(next(iter(batch.values()))) else 1
        if limit is not None and count >= limit:
            break
    if not feeds:
        raise DataError("the evaluation data yielded no batches")
    return feeds


def analyze(
    qdq_model: onnx.ModelProto,
    data: Iterable[dict[str, np.ndarray]],
    *,
    jobs: int = 1,
    ray_address: str | None = None,
    progress: bool = True,
    samples: int | None = None,
) -> SensitivityReport:
    """Per-group sensitivity of ``qdq_model`` (the output of ``optimize``) on ``data``.

    ``jobs`` worker processes (1: this process), or an existing Ray cluster at ``ray_address``.
    ``samples`` caps how many evaluation samples are used.
    """
    import time

    from .calibration.collect import progress_bar

    t0 = time.perf_counter()
    groups = find_groups(qdq_model)
    model_bytes = switch_model(qdq_model, groups).SerializeToString()
    feeds = _materialize(data, samples)
    configs = _configs(len(groups))
    jobs = max(1, int(jobs))
    bar, task = progress_bar(progress, "sensitivity", len(configs))
    with bar:
        def advance(n: int) -> None:
            bar.advance(task, n)

        if ray_address:
            scores = _run_ray(ray_address, model_bytes, feeds, configs, jobs, advance)
            workers = f"Ray cluster at {ray_address}"
        else:
            scores = _run_local(model_bytes, feeds, configs, jobs, advance)
            workers = f"{jobs} process{'es' if jobs > 1 else ''}"
    all_s, all_c = scores[0]
    results = [GroupResult(g, *_pair(scores[1 + 2 * g.index], scores[2 + 2 * g.index])) for g in groups]
    n = sum(len(next(iter(f.values()))) if np.ndim(next(iter(f.values()))) else 1 for f in feeds)
    return SensitivityReport(results, all_s, all_c, n, time.perf_counter() - t0, workers)


def _pair(alone: tuple[float, float], rest: tuple[float, float]) -> tuple[float, float, float, float]:
    return alone[0], rest[0], alone[1], rest[1]


# ------------------------------------------------------------------------------------------------ picture


def render_html(report: SensitivityReport, title: str = "qdqsurgeon sensitivity") -> str:
    """A self-contained HTML page: one row per group, two bars (SQNR alone INT8, dB gained when float)."""
    import html

    ranked = report.ranked()
    finite = [r.sqnr_alone_int8 for r in ranked if math.isfinite(r.sqnr_alone_int8)]
    top = max(finite + [1.0])
    gains = [r.sqnr_alone_float - report.sqnr_all_int8 for r in ranked]
    gmax = max([abs(g) for g in gains if math.isfinite(g)] + [0.1])
    rows = []
    for r, gain in zip(ranked, gains):
        s = r.sqnr_alone_int8
        w1 = 0 if not math.isfinite(s) else max(0.0, min(100.0, 100.0 * s / top))
        w2 = 0 if not math.isfinite(gain) else min(100.0, 100.0 * abs(gain) / gmax)
        colour = "#c0392b" if gain > 0 else "#7f8c8d"
        rows.append(
            f"<tr><td>{html.escape(r.group.name)}</td><td>{html.escape(', '.join(r.group.ops))}</td>"
            f"<td class=n>{s:.2f}</td><td><div class=bar style='width:{w1:.1f}%;background:#2980b9'></div></td>"
            f"<td class=n>{gain:+.2f}</td><td><div class=bar style='width:{w2:.1f}%;background:{colour}'></div></td></tr>")
    return f"""<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title><style>
body{{font:13px sans-serif;margin:1.5em}} table{{border-collapse:collapse;width:100%}}
td,th{{padding:2px 6px;border-bottom:1px solid #eee;text-align:left}} td.n{{text-align:right;font-family:monospace}}
.bar{{height:11px}} th{{background:#f4f4f4}}</style></head><body>
<h2>{html.escape(title)}</h2>
<p>All groups INT8: SQNR {report.sqnr_all_int8:.2f} dB (cosine {report.cosine_all_int8:.5f}) against the float model on
{report.samples} samples. Ranked by the SQNR with only that group quantized (lowest first: most harmful);
the red bar is what keeping only that group float gains over all INT8.</p>
<table><tr><th>group (layers it feeds)</th><th>ops</th><th>SQNR dB, alone INT8</th><th></th>
<th>dB gained, alone float</th><th></th></tr>
{''.join(rows)}
</table></body></html>
"""


def render_png(report: SensitivityReport, path: str, top: int = 40) -> bool:
    """A bar chart PNG when matplotlib is installed; False (nothing written) when it is not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ranked = report.ranked()[:top]
    fig, ax = plt.subplots(figsize=(8, max(2.0, 0.25 * len(ranked))))
    ax.barh([r.group.name for r in ranked][::-1], [r.sqnr_alone_float - report.sqnr_all_int8 for r in ranked][::-1])
    ax.set_xlabel("dB gained when left float (all others INT8)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def default_jobs() -> int:
    return max(1, (os.cpu_count() or 1))
