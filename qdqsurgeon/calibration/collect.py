"""Run the model in onnxruntime and stream per-tensor statistics for calibration.

The requested intermediate tensors are made extra graph outputs of a copy of the model, then
the data is fed batch by batch; each batch's outputs are folded into :class:`TensorStats` and
dropped, so memory is one batch plus the statistics. Histogram methods need a single pass too:
the histogram's range grows by exact bin merging (see :mod:`.methods`), so the result does not
depend on how the data is batched.

Graph optimizations stay enabled: onnxruntime never fuses away a tensor that is a graph
output, so the values are the model's own.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from qdqsurgeon.calibration.methods import (
    DEFAULT_METHOD,
    HISTOGRAM_METHODS,
    METHODS,
    TensorStats,
    compute_amax,
)
from qdqsurgeon.background import can_fork
from qdqsurgeon.errors import DataError, ModelError, QdqError, UsageError
from qdqsurgeon.io import copy_fields, heavy, is_plugin_domain, raw_nbytes, tensor_payload, without_weight_bytes
from qdqsurgeon.graph import types_complete

__all__ = [
    "tensor_elem_types",
    "expose_tensors",
    "cut_at_plugins",
    "inline_constant_ifs",
    "make_session",
    "collect_stats",
    "calibrate",
    "progress_bar",
    "has_bfloat16",
    "float32_copy",
]

logger = logging.getLogger(__name__)

# protobuf cannot serialize a message of 2 GiB or more; stay clear of it.
_PROTO_LIMIT = 2**31 - 2**24
_FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
)


# From this size on, onnxruntime gets a model as a file with external data rather than serialized
# bytes: serializing is a second copy of the weights in memory, the file path streams them.
_FILE_SESSION_BYTES = 2**28
# Initializers from this size on go to the external data file (onnx.save's default threshold).
_EXTERNAL_THRESHOLD = 1024


def _write_external(model: onnx.ModelProto, folder: Path, extra_outputs: Sequence[onnx.ValueInfoProto] = (),
                    *, data: bool = True) -> Path:
    """Write ``model`` (plus ``extra_outputs``) to ``folder``/model.onnx with its initializers in weights.bin.

    Unlike ``onnx.save(copy, save_as_external_data=True)`` this never copies the model in memory: the
    proto written is a skeleton (everything but the big initializers' bytes), and each big initializer
    is streamed to the data file on its own, so a model over 2 GB costs one tensor of extra memory, not
    one model. ``data=False`` writes the references only (shape inference reads no tensor bytes).
    """
    path, weights = folder / "model.onnx", folder / "weights.bin"
    skeleton = onnx.ModelProto()
    copy_fields(model, skeleton, "graph")
    copy_fields(model.graph, skeleton.graph, "initializer")
    skeleton.graph.output.extend(extra_outputs)
    offset = 0
    with open(weights, "wb") as f:
        for t in model.graph.initializer:
            out = skeleton.graph.initializer.add()
            if t.data_location == onnx.TensorProto.EXTERNAL or (raw_nbytes(t) or 0) < _EXTERNAL_THRESHOLD:
                out.CopyFrom(t)
                continue
            copy_fields(t, out, "raw_data")
            raw = t.raw_data  # one tensor's bytes at a time
            if data:
                f.write(raw)
            out.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", weights.name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = out.external_data.add()
                entry.key, entry.value = key, value
            offset += len(raw)
            del raw
    if _too_big(skeleton):  # the bulk sits elsewhere (e.g. in subgraphs): onnx's own writer, on a copy
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        copy.graph.output.extend(extra_outputs)
        del skeleton
        onnx.save(copy, str(path), save_as_external_data=True, location=weights.name)
        return path
    onnx.save(skeleton, str(path))
    return path


_BF16 = onnx.TensorProto.BFLOAT16


def _graphs(graph: onnx.GraphProto) -> Iterable[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def has_bfloat16(model: onnx.ModelProto) -> bool:
    """Whether the model's inputs, outputs or initializers are bfloat16."""
    g = model.graph
    return (any(t.data_type == _BF16 for t in g.initializer)
            or any(v.type.tensor_type.elem_type == _BF16 for v in [*g.input, *g.output]))


def float32_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a bfloat16 model computing in float32, with the same tensor names.

    onnxruntime's CPU provider has almost no bfloat16 kernels (Relu, Conv, Add... are missing), so
    a bfloat16 model is calibrated through this copy: initializers, declared types, Cast targets
    and Constant values in bfloat16 become float32. Every bfloat16 value is exactly a float32
    value, so the weights are the model's own; activations differ by bfloat16's rounding of
    intermediate results (relative 2^-8), far below the INT8 step the ranges are used for.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for g in _graphs(out.graph):
        for i, t in enumerate(g.initializer):
            if t.data_type == _BF16:
                g.initializer[i].CopyFrom(onnx.numpy_helper.from_array(
                    onnx.numpy_helper.to_array(t).astype(np.float32), t.name))
        for vi in [*g.input, *g.output, *g.value_info]:
            if vi.type.tensor_type.elem_type == _BF16:
                vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.INT and attr.name in ("to", "dtype") and attr.i == _BF16:
                    attr.i = onnx.TensorProto.FLOAT
                elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == _BF16:
                    attr.t.CopyFrom(onnx.numpy_helper.from_array(
                        onnx.numpy_helper.to_array(attr.t).astype(np.float32), attr.t.name))
    return out


def _as_float32(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float32) if np.asarray(v).dtype.name == "bfloat16" else v for k, v in batch.items()}


def _too_big(model: onnx.ModelProto, limit: int | None = None, payload: int | None = None) -> bool:
    limit = _PROTO_LIMIT if limit is None else min(limit, _PROTO_LIMIT)
    # The tensors decide it; the exact size (ByteSize encodes the whole message, a copy of the
    # weights) only when they come within 10% of the limit. ``payload``: the model's tensor_payload, if known.
    payload = tensor_payload(model) if payload is None else payload
    if payload < 0.9 * limit:
        return False
    if payload >= limit:  # the encoded message holds at least these bytes
        return True
    try:
        return model.ByteSize() >= limit
    except Exception:  # upb refuses to size a message over 2 GB at all
        return True


def _inferred_types(model: onnx.ModelProto, payload: int | None = None) -> dict[str, onnx.TypeProto]:
    """Type (with shape where known) of every tensor after shape inference (``payload``: the model's
    :func:`tensor_payload`, when the caller has it)."""
    if types_complete(model):  # inference would add nothing
        inferred = model
    elif _too_big(model, payload=(payload := tensor_payload(model) if payload is None else payload)):
        # The in-memory API serializes the model; big ones go through a file with external data.
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = _write_external(model, Path(tmp), data=False), Path(tmp) / "inferred.onnx"
            onnx.shape_inference.infer_shapes_path(str(src), str(dst))
            inferred = onnx.load(dst, load_external_data=False)
    else:
        try:
            # a heavy model's weights need not be serialized to infer their readers' types
            inferred = onnx.shape_inference.infer_shapes(without_weight_bytes(model)[0] if heavy(model, payload) else model)
        except Exception as exc:  # onnx raises several unrelated types here
            logger.warning("shape inference failed (%s); using only the types the model declares", exc)
            inferred = model
    types: dict[str, onnx.TypeProto] = {}
    g = inferred.graph
    for vi in [*g.input, *g.value_info, *g.output]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type
    for init in g.initializer:
        types[init.name] = helper.make_tensor_type_proto(init.data_type, list(init.dims))
    for node in g.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = helper.make_tensor_type_proto(attr.t.data_type, list(attr.t.dims))
    return types


def tensor_elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type (``onnx.TensorProto`` enum) of every tensor whose type is known after shape inference."""
    return {name: t.tensor_type.elem_type for name, t in _inferred_types(model).items()}


def expose_tensors(
    model: onnx.ModelProto, names: Sequence[str], types: dict[str, onnx.TypeProto] | None = None
) -> onnx.ModelProto:
    """A copy of ``model`` with ``names`` (node outputs) added as graph outputs.

    Names that already are graph outputs are left as they are. Raises :class:`ModelError` for a
    name no node produces. ``types`` (from an earlier shape inference) saves running it again.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.extend(_output_infos(model, names, types))
    return copy


def _output_infos(model: onnx.ModelProto, names: Sequence[str],
                  types: dict[str, onnx.TypeProto] | None) -> list[onnx.ValueInfoProto]:
    """Graph outputs exposing ``names`` (see :func:`expose_tensors`)."""
    produced = {out for node in model.graph.node for out in node.output if out}
    missing = [n for n in names if n not in produced]
    if missing:
        raise ModelError(f"no node produces tensor(s) {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
    existing = {o.name for o in model.graph.output}
    wanted = [n for n in dict.fromkeys(names) if n not in existing]
    if types is None:
        types = _inferred_types(model) if wanted else {}
    infos = []
    for name in wanted:
        if name not in types:
            raise ModelError(f"cannot infer the type of tensor {name!r}; run shape inference on the model first")
        vi = onnx.ValueInfoProto()
        vi.name = name
        vi.type.CopyFrom(types[name])
        infos.append(vi)
    return infos


def _referenced(node: onnx.NodeProto) -> set[str]:
    """Names a node reads, including the outer-scope names its If/Loop/Scan bodies read."""
    names = set(node.input)
    for a in node.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for inner in g.node:
                names |= _referenced(inner)
    return names


def cut_at_plugins(
    model: onnx.ModelProto, types: dict[str, onnx.TypeProto] | None = None
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The part of ``model`` onnxruntime can run: TensorRT plugin nodes and everything after them dropped.

    onnxruntime has no kernel for a TensorRT plugin (``TRT::EfficientNMS_TRT``, ``com.nvidia``
    ...), so the model is cut at the plugins' inputs, which become its outputs in place of the
    graph outputs computed from a plugin. Returns the cut model (``model`` itself when it has no
    plugin) and {tensor: plugin node} for every tensor computed from a plugin: those cannot be
    calibrated or compared.
    """
    plugins = [n for n in model.graph.node if is_plugin_domain(n.domain)]
    if not plugins:
        return model, {}
    after: dict[str, str] = {}
    keep: list[onnx.NodeProto] = []
    for node in model.graph.node:  # ONNX keeps nodes in topological order
        source = node.name or node.op_type if is_plugin_domain(node.domain) else \
            next((after[i] for i in _referenced(node) if i in after), None)
        if source is None:
            keep.append(node)
            continue
        for out in node.output:
            if out:
                after[out] = source
    if types is None:
        types = _inferred_types(model)
    outputs = [o for o in model.graph.output if o.name not in after]
    have = {o.name for o in outputs}
    for plugin in plugins:
        for name in plugin.input:
            if name and name not in after and name not in have and name in types:
                outputs.append(helper.make_value_info(name, types[name]))
                have.add(name)
    if not outputs:
        raise ModelError("onnxruntime cannot run TensorRT plugin(s) "
                         f"{', '.join(sorted({n.name or n.op_type for n in plugins}))} and nothing before them has a known type")
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    del cut.graph.node[:]
    cut.graph.node.extend(keep)
    del cut.graph.output[:]
    cut.graph.output.extend(outputs)
    logger.info("onnxruntime runs the model up to the inputs of TensorRT plugin(s) %s",
                ", ".join(sorted({n.name or n.op_type for n in plugins})))
    return cut, after


def _constant_bool(model: onnx.ModelProto, name: str) -> bool | None:
    """The value of a one-element constant (an initializer or Constant, seen through Identity/Cast), else None.

    The same constants :func:`qdqsurgeon.graph.const_value` sees, so this inlines exactly the Ifs insert-qdq inlines.
    """
    producers = {o: n for n in model.graph.node for o in n.output}
    for _ in range(16):
        node = producers.get(name)
        if node is None or node.op_type not in ("Identity", "Cast"):
            break
        name = node.input[0]
    for t in model.graph.initializer:
        if t.name == name:
            value = onnx.numpy_helper.to_array(t)
            return bool(value.reshape(())) if value.size == 1 else None
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            attr = next((a for a in node.attribute if a.name in ("value", "value_int")), None)
            if attr is None:
                return None
            value = onnx.numpy_helper.to_array(attr.t) if attr.name == "value" else np.asarray(attr.i)
            return bool(value.reshape(())) if value.size == 1 else None
    return None


def inline_constant_ifs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with every top-level If whose condition is a constant replaced by the branch it takes.

    insert-qdq inlines such Ifs too (as TensorRT's parser does) and then asks for ranges of the
    branch's tensors; onnxruntime can expose them only once they are top-level. The branch
    outputs reach the If's output names through Identity nodes.
    """
    if not any(n.op_type == "If" for n in model.graph.node):
        return model
    changed = False
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        cond = _constant_bool(model, node.input[0]) if node.op_type == "If" else None
        if cond is None:
            nodes.append(node)
            continue
        body = next(a.g for a in node.attribute if a.name == ("then_branch" if cond else "else_branch"))
        nodes.extend(body.node)
        nodes.extend(helper.make_node("Identity", [src.name], [dst], name=f"{node.name}_{dst}_inlined")
                     for src, dst in zip(body.output, node.output) if dst)
        changed = True
    if not changed:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return inline_constant_ifs(out)


def make_session(
    model: onnx.ModelProto,
    *,
    optimize: bool = True,
    threads: int = 0,
    outputs: Sequence[str] = (),
    types: dict[str, onnx.TypeProto] | None = None,
    in_memory: bool = False,
) -> ort.InferenceSession:
    """An onnxruntime CPU session; ``optimize=False`` disables every graph optimization.

    ``outputs``: intermediate tensors to expose as extra outputs (as :func:`expose_tensors`). A model
    over 2 GB is handed to onnxruntime as a file with external data, written without an in-memory copy
    (``in_memory``: the caller knows the model is below the size for which a file is used).
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.intra_op_num_threads = threads  # 0 = onnxruntime's default (one per core)
    # fatal only: onnxruntime's logger writes errors straight to stderr before raising, and the
    # caller turns the exception into the one error line the CLI prints
    opts.log_severity_level = 4
    try:
        if not in_memory and _too_big(model, _FILE_SESSION_BYTES):
            with tempfile.TemporaryDirectory() as tmp:
                path = _write_external(model, Path(tmp), _output_infos(model, outputs, types) if outputs else ())
                return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        if outputs:
            model = expose_tensors(model, outputs, types)
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except (ModelError, DataError):
        raise
    except Exception as exc:  # onnxruntime raises its own unexported exception types
        raise ModelError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0]}") from None


# onnxruntime's session setup grows faster than linearly with the node count (on a chain of residual
# conv blocks: 12 s at 20k nodes, 77 s at 40k, optimizations off; 4x that with them on; per node, a
# 4000-node slice costs 1.2x a 2000-node one). Graphs larger than twice this are calibrated through
# consecutive slices of about this many nodes, each its own session.
_SEGMENT_NODES = 2000


class _Segments:
    """Run ``model`` as consecutive slices of its (topologically sorted) nodes, one session each.

    A slice reads the tensors earlier slices (or the feed) made and writes the ones later slices,
    the graph outputs or the caller (``wanted``) need. Slices end where every tensor crossing the
    cut is one the caller asked for, when one comes within twice the slice size, so that no fusion
    onnxruntime would make across an unexposed tensor is split (exposed tensors are never fused away).
    """

    def __init__(self, model: onnx.ModelProto, wanted: Sequence[str], types: dict[str, onnx.TypeProto],
                 size: int | None = None, payload: int | None = None) -> None:
        size = size or _SEGMENT_NODES
        nodes = list(model.graph.node)
        inits = {t.name for t in model.graph.initializer}
        reads = [[n for n in _referenced(node) if n and n not in inits] for node in nodes]
        last_use: dict[str, int] = {}
        for i, names in enumerate(reads):
            for n in names:
                last_use[n] = i
        final = {o.name for o in model.graph.output}
        for n in final:
            last_use[n] = len(nodes)
        wanted_set = set(wanted)
        produced_at = {o: i for i, node in enumerate(nodes) for o in node.output if o}
        bounds, start, live = [], 0, set()
        for i, node in enumerate(nodes):
            live |= {o for o in node.output if o}
            live = {t for t in live if last_use.get(t, -1) > i}
            n = i + 1 - start
            if n >= size and (live <= wanted_set or n >= 2 * size) and i + 1 < len(nodes):
                bounds.append((start, i + 1))
                start = i + 1
        bounds.append((start, len(nodes)))
        self.drop_after: list[list[str]] = []
        graph_inputs = {i.name: i for i in model.graph.input}
        init_protos = {t.name: t for t in model.graph.initializer}
        specs: list[tuple[onnx.ModelProto, list[str], list[str]]] = []
        for a, b in bounds:
            part = nodes[a:b]
            used = {n for names in reads[a:b] for n in names}
            part_inits = [init_protos[n] for n in dict.fromkeys(x for node in part for x in _referenced(node)) if n in init_protos]
            ins = [n for n in dict.fromkeys(x for names in reads[a:b] for x in names) if produced_at.get(n, -1) < a]
            outs = [o for node in part for o in node.output
                    if o and (last_use.get(o, -1) >= b or o in wanted_set or o in final)]
            g = helper.make_graph(
                part, f"{model.graph.name}_{a}",
                [graph_inputs[n] if n in graph_inputs else helper.make_value_info(n, types[n]) for n in ins],
                [helper.make_value_info(o, types[o]) for o in outs],
                part_inits)
            m = helper.make_model(g, opset_imports=model.opset_import, ir_version=model.ir_version)
            m.functions.extend(model.functions)
            specs.append((m, ins, outs))
            self.drop_after.append([t for t in used | set(outs) if last_use.get(t, -1) < b and t not in wanted_set])
        small = not _too_big(model, _FILE_SESSION_BYTES, payload)  # then so is every slice: no size check per slice
        # Session setup is most of a large graph's calibration, on one core: a forked child sets up and runs
        # the second half of the slices while this process does the first half (the values crossing the cut
        # go to the child, the wanted ones of its half come back).
        half = len(specs) // 2 if len(specs) >= 4 and can_fork(len(nodes)) else len(specs)
        self._remote: _RemoteSlices | None = None
        if half < len(specs):
            self._remote = _RemoteSlices(specs[half:], self.drop_after[half:], wanted_set, small)
        self.slices = [(make_session(m, in_memory=small), ins, outs) for m, ins, outs in specs[:half]]
        if self._remote is not None and not self._remote.ready():  # the child failed: its half is built here
            self._remote = None
            self.slices += [(make_session(m, in_memory=small), ins, outs) for m, ins, outs in specs[half:]]
        self._specs = specs[half:] if self._remote is not None else []
        self._drops = self.drop_after[half:] if self._remote is not None else []
        self.drop_after = self.drop_after[:len(self.slices)]
        self._small = small

    def run(self, feed: dict[str, np.ndarray], wanted: Sequence[str]) -> list[np.ndarray]:
        values = dict(feed)
        wanted_set = set(wanted)
        found = _run_slices(self.slices, self.drop_after, values, wanted_set)
        if self._remote is not None:
            remote = self._remote.run({n: values[n] for n in self._remote.reads})
            if remote is None:  # the child died: its half is built and run here from now on
                self._remote = None
                self.slices += [(make_session(m, in_memory=self._small), ins, outs) for m, ins, outs in self._specs]
                self.drop_after += self._drops
                return self.run(feed, wanted)
            found.update(remote)
        return [found[n] for n in wanted]

    def close(self) -> None:
        if self._remote is not None:
            self._remote.close()
            self._remote = None


@contextlib.contextmanager
def _closing(segments: _Segments | None) -> Iterator[None]:
    try:
        yield
    finally:
        if segments is not None:
            segments.close()


def _run_slices(slices: Sequence[tuple[ort.InferenceSession, list[str], list[str]]], drops: Sequence[list[str]],
                values: dict[str, np.ndarray], wanted: set[str]) -> dict[str, np.ndarray]:
    """Run consecutive slices on ``values`` (updated in place); the ``wanted`` tensors they made."""
    found: dict[str, np.ndarray] = {}
    for (session, ins, outs), drop in zip(slices, drops):
        for name, value in zip(outs, _run(session, outs, {n: values[n] for n in ins})):
            values[name] = value
        for name in drop:
            values.pop(name, None)
        for name in outs:
            if name in wanted:
                found[name] = values[name]
    return found


class _RemoteSlices:
    """Slices set up and run in a forked child (:func:`_serve`), one batch at a time through a pipe.

    Its sessions are the same as this process would build, on the same inputs, so the values are the same.
    ``ready`` and ``run`` answer False / None when the child died or failed other than by a QdqError (which
    is raised here, as it would have been in turn); the caller then does the work itself.
    """

    def __init__(self, specs: list[tuple[onnx.ModelProto, list[str], list[str]]], drops: list[list[str]],
                 wanted: set[str], small: bool) -> None:
        made: set[str] = set()
        reads: list[str] = []
        for _, ins, outs in specs:  # what the half reads from before it: the feed and the first half
            reads += [n for n in ins if n not in made]
            made |= set(outs)
        self.reads = list(dict.fromkeys(reads))
        ctx = multiprocessing.get_context("fork")
        self._conn, child = ctx.Pipe()
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        self._proc = ctx.Process(target=_serve, args=(child, specs, drops, wanted, small), daemon=True,
                                 name="qdqsurgeon-calibration")
        self._proc.start()
        child.close()

    def _answer(self) -> tuple[str, Any]:
        try:
            status, payload = self._conn.recv()
        except (EOFError, OSError) as exc:
            status, payload = "died", repr(exc)
        if status == "error" and isinstance(payload, QdqError):
            self.close()
            raise payload
        if status not in ("ok", "ready"):
            logger.debug("calibration worker failed (%s); continuing in this process", payload)
            self.close(kill=True)
        return status, payload

    def ready(self) -> bool:
        return self._answer()[0] == "ready"

    def run(self, values: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        try:
            self._conn.send(values)
        except (OSError, ValueError):
            self.close(kill=True)
            return None
        status, payload = self._answer()
        return payload if status == "ok" else None

    def close(self, kill: bool = False) -> None:
        if self._proc is None:
            return
        try:
            if not kill:
                self._conn.send(None)
        except (OSError, ValueError):
            pass
        self._conn.close()
        if kill:
            self._proc.kill()
        self._proc.join()
        self._proc = None


def _serve(conn: Any, specs: list[tuple[onnx.ModelProto, list[str], list[str]]], drops: list[list[str]],
           wanted: set[str], small: bool) -> None:
    """The child of :class:`_RemoteSlices`: set up the sessions, then run each batch it is sent until None."""
    from qdqsurgeon import background

    background._in_child = True  # its work runs in turn
    try:
        slices = [(make_session(m, in_memory=small), ins, outs) for m, ins, outs in specs]
        del specs
        conn.send(("ready", None))
        while (values := conn.recv()) is not None:
            conn.send(("ok", _run_slices(slices, drops, values, wanted)))
    except EOFError:
        pass
    except BaseException as exc:  # the parent raises a QdqError, or does the work itself
        try:
            conn.send(("error", exc if isinstance(exc, QdqError) else repr(exc)))
        except Exception:
            pass
    finally:
        conn.close()


def progress_bar(enabled: bool, description: str, total: int | None):
    """A rich progress bar on stderr, silent when disabled or stderr is not a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(file=sys.stderr)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not (enabled and console.is_terminal),
        transient=True,
    )
    task = progress.add_task(description, total=total)
    return progress, task


def _feed_for(session: ort.InferenceSession, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if n not in batch]
    if missing:
        raise DataError(f"data lacks model input(s) {missing}; it provides {sorted(batch)}")
    return {n: batch[n] for n in names}


def _feed_for_model(model: onnx.ModelProto, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    missing = [n for n in names if n not in batch]
    if missing:
        raise DataError(f"data lacks model input(s) {missing}; it provides {sorted(batch)}")
    return {n: batch[n] for n in names}


def _run(session: ort.InferenceSession, outputs: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    try:
        return session.run(outputs, feed)
    except Exception as exc:  # shape/dtype problems surface here as onnxruntime errors
        raise DataError(f"onnxruntime rejected a batch: {str(exc).splitlines()[0]}") from None


def collect_stats(
    model: onnx.ModelProto,
    tensors: Sequence[str],
    data: Iterable[dict[str, np.ndarray]],
    *,
    histogram: bool,
    num_bins: int = 2048,
    progress: bool = True,
    observe: Callable[[str, np.ndarray], None] | None = None,
    accumulate: bool = True,
    outputs: bool = False,
) -> dict[str, TensorStats]:
    """Stream ``data`` through ``model`` and accumulate statistics of ``tensors``.

    Graph inputs and initializers among ``tensors`` are read from the feed / the model directly.
    Tensors that are not floating point are skipped with a warning (absent from the result).
    ``observe(name, value)``, when given, also sees every batch's value of each tensor (``auto``
    keeps small samples with it). ``accumulate=False`` leaves the statistics empty (only ``observe`` sees
    the values; bias correction needs no ranges). ``outputs=True``: ``observe`` also sees the model's float graph
    outputs (bias correction's check compares with them), where the run is one session: they are outputs already,
    so asking for them changes nothing in it; a model run in slices (:class:`_Segments`) does not give them.
    """
    model = inline_constant_ifs(model)
    bf16 = has_bfloat16(model)
    if bf16:
        logger.info("bfloat16 model: calibrating a float32 copy (onnxruntime's CPU provider lacks bfloat16 kernels)")
        model = float32_copy(model)
    payload = tensor_payload(model)  # (counted once: the size checks below need it)
    full_types = _inferred_types(model, payload)
    types = {name: t.tensor_type.elem_type for name, t in full_types.items()}
    uncut = model
    model, after_plugin = cut_at_plugins(model, full_types)
    if model is not uncut:
        payload = None
    initializers = {t.name: t for t in model.graph.initializer}
    graph_inputs = {i.name for i in model.graph.input} - set(initializers)
    produced = {o for n in model.graph.node for o in n.output}
    stats: dict[str, TensorStats] = {}
    for name in dict.fromkeys(tensors):
        if name in after_plugin:
            logger.warning("skipping %s: it is computed from TensorRT plugin %s, which onnxruntime cannot run",
                           name, after_plugin[name])
            continue
        elem = types.get(name)
        if elem is None and name not in initializers:
            if name in produced:
                raise ModelError(f"shape inference cannot type tensor {name!r}: the graph is inconsistent before it "
                                 "(check the model with onnx.shape_inference.infer_shapes(..., strict_mode=True))")
            raise ModelError(f"tensor {name!r} is not in the model")
        if elem not in _FLOAT_TYPES:
            logger.warning("skipping %s: %s is not a float tensor", name,
                           onnx.TensorProto.DataType.Name(elem) if elem else "untyped")
            continue
        stats[name] = TensorStats(name, histogram=histogram, num_bins=num_bins)
    if not stats:
        return stats

    for name in stats:
        if name in initializers:
            stats[name].update(onnx.numpy_helper.to_array(initializers[name]))
    run_names = [n for n in stats if n not in initializers and n not in graph_inputs]
    feed_names = [n for n in stats if n in graph_inputs]
    session = segments = None
    if run_names and len(model.graph.node) > 2 * _SEGMENT_NODES and not _too_big(model, payload=payload):
        try:
            segments = _Segments(model, run_names, full_types, payload=payload)
        except KeyError as exc:  # a tensor crossing a cut has no inferred type: one session after all
            logger.debug("calibrating in one session: no type for %s", exc)
    extra = []  # graph outputs only observe sees (``outputs``)
    if outputs and observe is not None and segments is None:
        extra = [o.name for o in model.graph.output if o.name in produced and o.name not in stats
                 and types.get(o.name) in _FLOAT_TYPES]
    fetch = run_names + extra
    if fetch and segments is None:
        session = make_session(model, outputs=fetch, types=full_types)

    total = len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]
    bar, task = progress_bar(progress, "calibrating", total)
    batches = 0
    with bar, _closing(segments):
        for batch in data:
            if bf16:
                batch = _as_float32(batch)
            for name in feed_names:
                if accumulate:
                    stats[name].update(batch[name])
                if observe is not None:
                    observe(name, batch[name])
            if session is not None:
                for name, value in zip(fetch, _run(session, fetch, _feed_for(session, batch))):
                    if accumulate and name in stats:
                        stats[name].update(value)
                    if observe is not None:
                        observe(name, value)
            elif segments is not None:
                for name, value in zip(run_names, segments.run(_feed_for_model(model, batch), run_names)):
                    if accumulate:
                        stats[name].update(value)
                    if observe is not None:
                        observe(name, value)
            batches += 1
            bar.advance(task)
    if batches == 0:
        raise DataError("the calibration data yielded no batches")
    for s in stats.values() if accumulate else ():
        if s.nonfinite and s.count == 0:
            # Nothing but NaN/inf: every scale would be meaningless, so the data is wrong, not the model.
            where = "calibration input" if s.name in graph_inputs else "tensor (computed from the calibration data)"
            raise DataError(f"{where} {s.name!r} has no finite values ({s.nonfinite} NaN/inf): check the calibration data")
        if s.nonfinite:
            logger.warning("%s: ignored %d non-finite value(s)", s.name, s.nonfinite)
    return stats


def calibrate(
    model: onnx.ModelProto,
    tensors: Sequence[str],
    data: Iterable[dict[str, np.ndarray]],
    method: str = DEFAULT_METHOD,
    *,
    percentile: float = 99.99,
    num_bins: int = 2048,
    progress: bool = True,
) -> dict[str, float]:
    """Calibrated absolute max per tensor (``amax > 0``; scale = amax / 127).

    One pass over ``data``. ``auto`` (:mod:`.auto`) also returns the other members of the tied
    groups of ``tensors`` (one range per group). Non-float tensors are skipped with a warning and absent from the
    result; an all-zero tensor gets a tiny positive amax.
    """
    if method not in METHODS:
        raise UsageError(f"unknown calibration method {method!r}; choose from {', '.join(METHODS)}")
    if method == "percentile" and not 0.0 < percentile <= 100.0:
        raise UsageError(f"percentile must be in (0, 100], got {percentile}")
    if method == "auto":
        from qdqsurgeon.calibration.auto import AutoSelector

        return AutoSelector(model).select(tensors, data, num_bins=num_bins, progress=progress)
    stats = collect_stats(
        model, tensors, data, histogram=method in HISTOGRAM_METHODS, num_bins=num_bins, progress=progress
    )
    return {name: compute_amax(s, method, percentile=percentile) for name, s in stats.items()}
