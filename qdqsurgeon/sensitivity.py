"""Sensitivity analysis: which quantized groups cost accuracy, measured end to end.

The model is quantized once, as ``optimize`` does (calibration and placement run once). Its Q/DQ
pairs are then grouped by what TensorRT runs as one INT8 unit: the pairs read by one node (a
weighted op's activation and weight, a wrapped pooling op's inputs) belong together, pairs on
tensors TensorRT ties into one buffer (Concat/Split, MaxPool, reshapes, fan-out: align-scales'
:func:`~qdqsurgeon.passes.align_scales.tied_groups`, rules P4-P6) belong together, and so do the
two batch GEMMs of an attention block (P1, INT8 MHA).

Every configuration runs in one onnxruntime session built once per worker: each Q→DQ of group
``g`` becomes ``If(s[g] > 0.5, Q→DQ, Identity)`` with ``s`` a graph input of one switch per group,
so 0 gives the float tensor and 1 the quantized one, exactly, and only the taken branch costs time.

What is measured and what is estimated (the report and its JSON say which, per group):

- all groups INT8 and the float reference: measured on all evaluation samples;
- each group alone INT8 (everything else float): measured on the first ``screen_samples``
  samples for every group (by default as many as make this screening cost one pass over the
  data: samples / groups, at least 1), and again on all samples for the ``top`` (2) most harmful;
- each group alone float (everything else INT8): estimated, as the all-INT8 noise power minus
  the group's own alone-INT8 noise power (independent roundings add their noise powers to
  first order), unless ``full=True`` measures it (two forward passes per group on all samples).

Configurations are spread over worker processes (``jobs``) or an existing Ray cluster (``ray_address``).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from .errors import DataError, ModelError, UsageError
from .graph import infer_missing_shapes

__all__ = ["QuantGroup", "GroupResult", "SensitivityReport", "find_groups", "switch_model", "analyze", "check_ray",
           "render_html"]

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
    samples_alone_int8: int = 0  # samples the alone-INT8 figures were measured on
    alone_float_estimated: bool = False  # alone-float figures from noise additivity, not a run

    def to_dict(self, all_int8: float) -> dict[str, Any]:
        return {
            "group": self.group.name, "layers": self.group.layers, "ops": self.group.ops,
            "dq_nodes": self.group.dq_nodes,
            "sqnr_db_alone_int8": _num(self.sqnr_alone_int8), "sqnr_db_alone_float": _num(self.sqnr_alone_float),
            "gain_db_when_float": _num(self.sqnr_alone_float - all_int8),
            "cosine_alone_int8": _num(self.cosine_alone_int8), "cosine_alone_float": _num(self.cosine_alone_float),
            "alone_int8_samples": self.samples_alone_int8, "alone_float_is_estimate": self.alone_float_estimated,
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
    screen_samples: int = 0  # samples every group's alone-INT8 run used
    remeasured: int = 0  # groups whose alone-INT8 run was repeated on all samples
    full: bool = False  # alone-float measured too (not estimated)
    float_measured: int = 0  # groups whose alone-float figures were measured (float_for)

    def method(self) -> str:
        """One line saying which figures are measurements and which are estimates."""
        if self.full or self.screen_samples >= self.samples:
            how = f"alone INT8 measured on all {self.samples} samples"
        else:
            how = (f"alone INT8 measured on {self.screen_samples} of {self.samples} samples, the {self.remeasured} most "
                   f"harmful again on all")
        if self.full:
            return how + "; alone float measured"
        extra = f", measured on all samples for {self.float_measured}" if self.float_measured else ""
        return how + f"; alone float estimated (noise additivity){extra}"

    def ranked(self) -> list[GroupResult]:
        return sorted(self.results, key=lambda r: (r.sqnr_alone_int8, -(r.sqnr_alone_float - self.sqnr_all_int8)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "sqnr_db_all_int8": _num(self.sqnr_all_int8), "cosine_all_int8": _num(self.cosine_all_int8),
            "samples": self.samples, "groups": len(self.results), "seconds": round(self.seconds, 3),
            "workers": self.workers, "method": self.method(),
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
    """``model`` with input ``qdqsurgeon_switch`` [G]: 0 makes a group's Q/DQ exact float, 1 keeps it quantized.

    Each switchable Q→DQ becomes ``If(s[g] > 0.5)`` whose then-branch is the same Q→DQ and whose
    else-branch is ``Identity(x)`` (a Cast when the DQ writes another float type than the Q reads). Only the taken branch runs, so a configuration with few groups
    on costs about one float forward pass (a ``Where`` between both values ran every Q/DQ always).
    """
    from onnx import helper

    from .graph import export_model, import_model

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    nodes = list(g.node)
    by_name = {n.name: n for n in nodes}
    producer = {o: n for n in nodes for o in n.output}
    readers: dict[str, int] = {}
    for n in nodes:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    try:  # element types of every tensor: a Q's input and its DQ's output may differ (float16 regions)
        typed = infer_missing_shapes(model).graph
    except Exception:  # noqa: BLE001 - inference is a help here, not a requirement
        typed = g
    elem = {v.name: v.type.tensor_type.elem_type for v in [*typed.value_info, *typed.input, *typed.output]}
    elem.update({t.name: t.data_type for t in g.initializer})
    g.input.append(helper.make_tensor_value_info(SWITCH_INPUT, onnx.TensorProto.FLOAT, [len(groups)]))
    half = f"{SWITCH_INPUT}_half"
    g.initializer.append(onnx.numpy_helper.from_array(np.array(0.5, np.float32), half))
    added: list[onnx.NodeProto] = []
    removed: set[int] = set()
    for grp in groups:
        dqs = [by_name[d] for d in grp.dq_nodes if d not in grp.fixed and d in by_name]
        if not dqs:
            continue
        s, on, idx = f"{SWITCH_INPUT}_{grp.index}", f"{SWITCH_INPUT}_{grp.index}_on", f"{SWITCH_INPUT}_idx_{grp.index}"
        g.initializer.append(onnx.numpy_helper.from_array(np.array(grp.index, np.int64), idx))
        added += [helper.make_node("Gather", [SWITCH_INPUT, idx], [s], name=f"{s}_gather", axis=0),
                  helper.make_node("Greater", [s, half], [on], name=f"{s}_greater")]
        for d in dqs:
            q = producer[d.input[0]]
            x, y = q.input[0], d.output[0]
            dtype = elem.get(y) or elem.get(x) or onnx.TensorProto.FLOAT
            then = helper.make_graph(
                [helper.make_node("QuantizeLinear", list(q.input), [f"{y}_sw_q"], name=f"{d.name}_sw_q"),
                 helper.make_node("DequantizeLinear", [f"{y}_sw_q", *d.input[1:]], [f"{y}_sw_then"], name=f"{d.name}_sw_dq")],
                f"{d.name}_quantized", [], [helper.make_tensor_value_info(f"{y}_sw_then", dtype, None)])
            then.node[0].attribute.extend(q.attribute)
            then.node[1].attribute.extend(d.attribute)
            exact = (helper.make_node("Cast", [x], [f"{y}_sw_else"], name=f"{d.name}_sw_cast", to=dtype)
                     if elem.get(x) and elem.get(x) != dtype else
                     helper.make_node("Identity", [x], [f"{y}_sw_else"], name=f"{d.name}_sw_id"))
            other = helper.make_graph([exact], f"{d.name}_float", [], [helper.make_tensor_value_info(f"{y}_sw_else", dtype, None)])
            added.append(helper.make_node("If", [on], [y], name=f"{d.name}_switch", then_branch=then, else_branch=other))
            removed.add(id(d))
            readers[d.input[0]] -= 1
            if readers[d.input[0]] == 0:  # the Q fed only switched DQs
                removed.add(id(q))
    del g.node[:]
    g.node.extend([n for n in nodes if id(n) not in removed] + added)
    graph = import_model(out)
    graph.toposort()
    return export_model(graph, template=out)


# ------------------------------------------------------------------------------------------------ evaluation


def _noise(ref: list[np.ndarray], got: list[np.ndarray]) -> tuple[list[float], list[float]]:
    """Per float output: noise power relative to signal power, and cosine (the output's whole batch flattened)."""
    rel, cos = [], []
    for r, g in zip(ref, got):
        if r.dtype.kind != "f" or r.shape != g.shape:
            continue
        r64, g64 = r.astype(np.float64).ravel(), g.astype(np.float64).ravel()
        finite = np.isfinite(r64)
        r64, g64 = r64[finite], g64[finite]
        signal = float(np.sum(r64 ** 2))
        noise = float(np.sum((r64 - g64) ** 2)) if np.all(np.isfinite(g64)) else math.inf
        rel.append(noise / signal if signal > 0 else (0.0 if noise == 0 else math.inf))
        denom = float(np.linalg.norm(r64) * np.linalg.norm(g64))
        cos.append(float(r64 @ g64) / denom if denom > 0 else (1.0 if not r64.any() and not g64.any() else 0.0))
    return rel, cos


def _sqnr(rel: Sequence[float]) -> float:
    """Worst-output SQNR (dB) from relative noise powers."""
    worst = max(rel, default=0.0)
    if worst == 0.0:
        return math.inf
    return -10.0 * math.log10(worst) if math.isfinite(worst) else -math.inf


def _metrics(ref: list[np.ndarray], got: list[np.ndarray]) -> tuple[float, float]:
    """Worst SQNR (dB) and worst cosine over the float outputs."""
    rel, cos = _noise(ref, got)
    return _sqnr(rel), min(cos, default=1.0)


def _count(feed: dict[str, np.ndarray]) -> int:
    first = next(iter(feed.values()))
    return len(first) if np.ndim(first) else 1


class _Evaluator:
    """One onnxruntime session of the switch model and the evaluation feeds; runs configurations.

    A configuration is run on the first ``n`` samples (``n=None``: all of them). Outputs are
    returned, not scores: the caller holds the one float reference run and compares.
    """

    def __init__(self, model_bytes: bytes, feeds: list[dict[str, np.ndarray]], threads: int = 0) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 4
        self.session = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]
        inputs = [i.name for i in self.session.get_inputs() if i.name != SWITCH_INPUT]
        self.size = next(int(i.shape[0]) for i in self.session.get_inputs() if i.name == SWITCH_INPUT)
        self.feeds = [{k: f[k] for k in inputs} for f in feeds]
        self._batch()

    def _batch(self) -> None:
        """All samples in one run when the model takes any batch size (much faster than one run each)."""
        if len(self.feeds) < 2 or any(np.ndim(v) == 0 for f in self.feeds for v in f.values()):
            return
        joined = {k: np.concatenate([f[k] for f in self.feeds]) for k in self.feeds[0]}
        one = {k: v[:1] for k, v in joined.items()}
        two = {k: v[:2] for k, v in joined.items()}
        zeros = np.zeros(self.size, np.float32)
        try:  # a probe on one and two samples: the outputs' first axis must follow the batch
            a = self.session.run(self.outputs, {**one, SWITCH_INPUT: zeros})
            b = self.session.run(self.outputs, {**two, SWITCH_INPUT: zeros})
        except Exception:  # a fixed batch dimension: one run per batch
            return
        if len(next(iter(joined.values()))) >= 2 and all(np.ndim(x) and np.ndim(y) and x.shape[0] == 1 and y.shape[0] == 2
                                                         for x, y in zip(a, b)):
            self.feeds = [joined]

    def _feeds(self, n: int | None) -> list[dict[str, np.ndarray]]:
        if n is None:
            return self.feeds
        out, have = [], 0
        for f in self.feeds:
            if have >= n:
                break
            take = min(_count(f), n - have)
            out.append({k: v[:take] if np.ndim(v) and take < _count(f) else v for k, v in f.items()})
            have += take
        return out

    def outputs_for(self, config: np.ndarray, n: int | None = None) -> list[np.ndarray]:
        per_output: list[list[np.ndarray]] = [[] for _ in self.outputs]
        for feed in self._feeds(n):
            for acc, value in zip(per_output, self.session.run(self.outputs, {**feed, SWITCH_INPUT: config})):
                acc.append(np.asarray(value))
        return [np.concatenate([v.reshape(1, -1) if v.ndim == 0 else v for v in vals]) for vals in per_output]



Task = tuple[np.ndarray, "int | None"]  # a configuration and how many samples it runs on (None: all)
Outputs = list[np.ndarray]

_WORKER: _Evaluator | None = None


def _init_worker(model_bytes: bytes, feeds: list[dict[str, np.ndarray]], threads: int) -> None:
    global _WORKER
    _WORKER = _Evaluator(model_bytes, feeds, threads)


def _run_chunk(tasks: list[Task]) -> list[Outputs]:
    assert _WORKER is not None
    return [_WORKER.outputs_for(c, n) for c, n in tasks]


def _chunks(items: list, parts: int) -> list[list]:
    size = max(1, math.ceil(len(items) / max(1, parts)))
    return [items[i:i + size] for i in range(0, len(items), size)]


class _LocalRunner:
    """Runs tasks in this process (``jobs`` 1) or in a pool of ``jobs`` spawned processes kept for every batch."""

    def __init__(self, model_bytes: bytes, feeds: list, jobs: int) -> None:
        self.jobs = jobs
        self.pool = None
        self.workers = f"{jobs} process{'es' if jobs > 1 else ''}"
        if jobs <= 1:
            self.ev = _Evaluator(model_bytes, feeds)
            return
        import concurrent.futures as cf
        import multiprocessing as mp

        # spawn, not fork: the parent holds onnxruntime thread pools from calibration.
        self.pool = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                           initargs=(model_bytes, feeds, 1))

    def run(self, tasks: list[Task], advance: Callable[[int], None]) -> list[Outputs]:
        if self.pool is None:
            out = []
            for c, n in tasks:
                out.append(self.ev.outputs_for(c, n))
                advance(1)
            return out
        import concurrent.futures as cf

        chunks = _chunks(tasks, self.jobs * 4)
        results: list[list[Outputs] | None] = [None] * len(chunks)
        futures = {self.pool.submit(_run_chunk, chunk): i for i, chunk in enumerate(chunks)}
        for fut in cf.as_completed(futures):
            results[futures[fut]] = fut.result()
            advance(len(chunks[futures[fut]]))
        return [r for chunk in results for r in (chunk or [])]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


class _RayWorker:
    """A Ray actor's evaluator: the session is built once per worker, as in a local worker process.

    One intra-op thread, as a local ``--jobs N`` worker, so the figures do not depend on a node's core
    count (onnxruntime's kernels round differently per thread count); nodes with another onnxruntime
    or another CPU kind (MLAS picks AVX2 or AVX-512 kernels) may still differ in the last digits.
    """

    def __init__(self, model_bytes: bytes, feeds: list[dict[str, np.ndarray]]) -> None:
        self.ev = _Evaluator(model_bytes, feeds, 1)

    def run(self, tasks: list[Task]) -> list[Outputs]:
        return [self.ev.outputs_for(c, n) for c, n in tasks]


def _ray_endpoint(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``host:port`` or ``ray://host:port``; None for ``auto``, ``local`` and the like."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    return (host.strip("[]") or "127.0.0.1", int(port)) if sep and port.isdigit() else None


def _last_line(exc: BaseException) -> str:
    """The line of a Ray error that names the cause (its text is a whole remote traceback)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def check_ray(address: str, timeout: float = 5.0) -> Any:
    """The ``ray`` module, once Ray is importable and ``address`` (``host:port``, ``ray://host:port``) answers.

    Run before calibration so a wrong address costs seconds, not a whole quantization: Ray itself
    waits minutes on a head that does not answer. ``auto`` means ``$RAY_ADDRESS`` when it is set (as
    for ``ray.init``); otherwise ``auto`` and ``local`` are left to ``ray.init``.
    """
    try:
        import ray  # type: ignore[import-not-found]
    except ImportError:
        raise UsageError("--ray needs the ray package (pip install 'ray[default]'), which is not installed") from None
    target = (os.environ.get("RAY_ADDRESS") or address) if address == "auto" else address
    endpoint = _ray_endpoint(target)
    if endpoint is not None:
        try:
            socket.create_connection(endpoint, timeout).close()
        except OSError as exc:
            via = f" (RAY_ADDRESS={target})" if target != address else ""
            raise UsageError(f"cannot reach the Ray cluster at {address}{via}: {exc.strerror or exc}") from None
    return ray


class _RayRunner:
    """Runs tasks on an existing Ray cluster (imported only here): one actor per CPU, at most ``jobs`` when above 1
    and at most ``tasks`` (a large cluster would otherwise start actors with nothing to do).

    The switch model and the feeds go into the object store once (each node fetches them once);
    this package travels with the job (``py_modules``), so the workers run the driver's code
    whether or not, or in whichever version, qdqsurgeon is installed on the cluster. The workers
    need numpy and onnxruntime.
    """

    def __init__(self, address: str, model_bytes: bytes, feeds: list, jobs: int, tasks: int) -> None:
        ray = check_ray(address)
        self.ray, self.address, self.actors = ray, address, []
        # A caller's own Ray session is used as it is (its runtime env must provide this package), and left open.
        self.owned = not ray.is_initialized()
        if self.owned:
            package = os.path.dirname(os.path.abspath(__file__))
            env = {"py_modules": [package], "excludes": ["__pycache__", "examples/"]}  # uploads only at the job level
            # The Ray client's per-connection server sometimes dies as it is forked (ray-project/ray#63202,
            # "Starting Ray client server failed", about 1 connection in 15): a new connection gets a new one.
            attempts = 3 if address.startswith("ray://") else 1
            for attempt in range(1, attempts + 1):
                try:
                    with warnings.catch_warnings():  # the Ray client warns before it raises
                        warnings.simplefilter("ignore")
                        ray.init(address=address, runtime_env=env, logging_level=logging.ERROR, log_to_driver=False)
                    break
                except Exception as exc:  # ConnectionError, and Ray's own types
                    if attempt == attempts or not isinstance(exc, (RuntimeError, ConnectionAbortedError)):
                        raise UsageError(f"cannot connect to the Ray cluster at {address}: {_last_line(exc)}") from None
                    logger.info("Ray client connection %d failed (%s); retrying", attempt, _last_line(exc))
        try:
            cpus = int(ray.cluster_resources().get("CPU", 0))
            if cpus < 1:
                raise UsageError(f"the Ray cluster at {address} has no CPUs")
            actor = ray.remote(num_cpus=1)(_RayWorker)
            model_ref, feeds_ref = ray.put(model_bytes), ray.put(feeds)
            count = min(jobs if jobs > 1 else cpus, cpus, max(1, tasks))
            self.actors = [actor.remote(model_ref, feeds_ref) for _ in range(count)]
            self.workers = f"Ray cluster at {address}, {len(self.actors)} worker{'s' if len(self.actors) > 1 else ''}"
        except BaseException:
            self.close()
            raise

    def run(self, tasks: list[Task], advance: Callable[[int], None]) -> list[Outputs]:
        """Chunks go to whichever actor is idle, so a slow node takes fewer and the bar moves per chunk."""
        ray = self.ray
        chunks = _chunks(tasks, len(self.actors) * 4)
        results: list[list[Outputs] | None] = [None] * len(chunks)
        todo, idle, pending = list(range(len(chunks)))[::-1], list(self.actors), {}
        while todo or pending:
            while todo and idle:
                i, actor = todo.pop(), idle.pop()
                pending[actor.run.remote(chunks[i])] = (i, actor)
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i, actor = pending.pop(ref)
                try:
                    results[i] = ray.get(ref)
                except ray.exceptions.RayError as exc:  # a worker's exception, a lost node, a bad runtime env
                    raise ModelError(f"a Ray worker failed on the cluster at {self.address}: {_last_line(exc)}") from None
                idle.append(actor)
                advance(len(chunks[i]))
        return [r for chunk in results for r in (chunk or [])]

    def close(self) -> None:
        """Ends the actors, and the connection when this runner opened it."""
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        if self.owned and self.ray.is_initialized():
            self.ray.shutdown()


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


def _result(g: QuantGroup, alone: tuple[tuple[list[float], list[float]], int], all_rel: list[float],
            measured_float: tuple[list[float], list[float]] | None) -> GroupResult:
    """A group's figures; alone float from ``measured_float`` when given, else by noise additivity."""
    (rel, cos), measured_on = alone
    if measured_float is not None:
        f_rel, f_cos = measured_float
    else:  # noise powers of independent roundings add: all-INT8 noise minus this group's
        f_rel = [max(a - b, a * 1e-3) for a, b in zip(all_rel, rel)]
        f_cos = [1.0 / math.sqrt(1.0 + r) if math.isfinite(r) else 0.0 for r in f_rel]
    return GroupResult(g, _sqnr(rel), _sqnr(f_rel), min(cos, default=1.0), min(f_cos, default=1.0), measured_on,
                       measured_float is None)


def _one_hot(n: int, g: int, value: float) -> np.ndarray:
    c = np.full(n, 1.0 - value, np.float32)
    c[g] = value
    return c


def analyze(
    qdq_model: onnx.ModelProto,
    data: Iterable[dict[str, np.ndarray]],
    *,
    jobs: int = 1,
    ray_address: str | None = None,
    progress: bool = True,
    samples: int | None = None,
    full: bool = False,
    screen_samples: int | None = None,
    top: int = 2,
    float_for: Callable[[list[GroupResult]], Sequence[int]] | None = None,
) -> SensitivityReport:
    """Per-group sensitivity of ``qdq_model`` (the output of ``optimize``, without bias correction: its corrected
    biases assume every layer INT8, and groups are switched to float here) on ``data``.

    Default (fast): every group alone INT8 on the first ``screen_samples`` samples (default: the
    number of samples over the number of groups, at least 1, so screening costs about one pass
    over the data); the ``top``
    most harmful of them measured again on all samples; "alone float" estimated from the
    measured noise by additivity (all-INT8 noise minus the group's own). ``full=True`` measures
    both configurations of every group on all samples (two forward passes per group).
    ``float_for`` (used by ``optimize --target``) is given the results so far and returns the
    indices of groups whose alone-float figures are then measured on all samples instead of estimated.
    ``jobs`` worker processes (1: this process), or an existing Ray cluster at ``ray_address`` (one
    worker per CPU of the cluster, at most ``jobs`` when above 1).
    ``samples`` caps how many evaluation samples are used.
    """
    import time

    from .calibration.collect import progress_bar

    t0 = time.perf_counter()
    groups = find_groups(qdq_model)
    model_bytes = switch_model(qdq_model, groups).SerializeToString()
    feeds = _materialize(data, samples)
    n_all = sum(_count(f) for f in feeds)
    G = len(groups)
    jobs = max(1, int(jobs))
    if screen_samples is None:
        screen_samples = max(1, n_all // max(1, G))
    screen = None if full or screen_samples >= n_all else max(1, int(screen_samples))
    tasks: list[Task] = [(np.zeros(G, np.float32), None), (np.ones(G, np.float32), None)]
    tasks += [(_one_hot(G, g.index, 1.0), screen) for g in groups]
    if full:
        tasks += [(_one_hot(G, g.index, 0.0), None) for g in groups]
    top = 0 if screen is None else min(max(0, int(top)), G)
    bar, task = progress_bar(progress, "sensitivity", len(tasks) + top)
    runner = (_RayRunner(ray_address, model_bytes, feeds, jobs, len(tasks)) if ray_address
              else _LocalRunner(model_bytes, feeds, jobs))
    try:
        with bar:
            def advance(n: int) -> None:
                bar.advance(task, n)

            outs = runner.run(tasks, advance)
            ref = outs[0]

            def score(got: Outputs) -> tuple[list[float], list[float]]:
                # a run on the first n samples is compared with the first rows of the reference
                return _noise([r[:len(o)] if r.ndim and o.ndim else r for r, o in zip(ref, got)], got)

            scores = [score(o) for o in outs[1:]]
            alone = {g.index: (scores[1 + g.index], screen or n_all) for g in groups}
            if top:
                worst = sorted(groups, key=lambda g: -max(scores[1 + g.index][0], default=0.0))[:top]
                again = runner.run([(_one_hot(G, g.index, 1.0), None) for g in worst], advance)
                alone.update({g.index: (score(o), n_all) for g, o in zip(worst, again)})
            all_rel, all_cos = scores[0]
            results = [_result(g, alone[g.index], all_rel, scores[1 + G + g.index] if full else None) for g in groups]
            wanted = [i for i in (float_for(results) if float_for and not full else []) if 0 <= i < G]
            if wanted:
                bar.update(task, total=len(tasks) + top + len(wanted))
                again = runner.run([(_one_hot(G, i, 0.0), None) for i in wanted], advance)
                for i, o in zip(wanted, again):
                    results[i] = _result(groups[i], alone[i], all_rel, score(o))
    finally:
        runner.close()
    return SensitivityReport(results, _sqnr(all_rel), min(all_cos, default=1.0), n_all, time.perf_counter() - t0,
                             runner.workers, screen_samples=screen or n_all, remeasured=top, full=full,
                             float_measured=len(wanted))


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
the red bar is what keeping only that group float gains over all INT8. {html.escape(report.method())}.</p>
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
