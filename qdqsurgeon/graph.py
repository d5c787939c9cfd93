"""Everything that touches onnx-graphsurgeon internals, so the rest of the package reads as domain code.

The graph type throughout qdqsurgeon is ``onnx_graphsurgeon.Graph``. This module converts to and from
``onnx.ModelProto`` (keeping metadata the gs exporter drops), and answers the questions passes ask
about Q/DQ nodes: is this a Q or a DQ, what are its scale, zero point and axis, what constant sits
behind a tensor (looking through Constant/Identity/Cast), who produces and who consumes a tensor.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.importers import onnx_importer as _gs_importer
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx_graphsurgeon.util.misc import SynchronizedList

from .io import is_plugin_domain

__all__ = [
    "Graph",
    "Node",
    "Tensor",
    "Q_OP",
    "DQ_OP",
    "WEIGHTED_OPS",
    "import_model",
    "import_graph",
    "export_model",
    "export_graph",
    "new_variable",
    "new_constant",
    "new_node",
    "gc_paused",
    "collect_small",
    "carry_metadata",
    "is_q",
    "is_dq",
    "is_qdq",
    "producer",
    "consumers",
    "const_value",
    "is_constant",
    "QParams",
    "qparams",
    "same_qparams",
    "qparams_key",
    "graph_output_names",
    "is_graph_output",
    "weight_input_index",
    "activation_input_index",
    "weighted_weight",
    "behind_constant",
    "opset_version",
    "iter_qdq_pairs",
    "is_plugin",
    "subgraphs",
    "nested_nodes",
    "after_plugins",
    "np_dtype",
    "is_float_dtype",
    "is_blocked",
    "cleanup_graph",
    "toposort_graph",
    "used_names",
]

logger = logging.getLogger(__name__)

Graph = gs.Graph
Node = gs.Node
Tensor = gs.Tensor

Q_OP = "QuantizeLinear"
DQ_OP = "DequantizeLinear"
# Ops that carry a weight operand and have INT8 kernels in TensorRT (rule F1).
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Ops a constant may hide behind in exported graphs (e.g. PyTorch's Identity on shared weights).
_TRANSPARENT_CONST_OPS = ("Identity", "Cast")


def import_model(model: onnx.ModelProto) -> gs.Graph:
    """Build a gs graph from a model; the model proto itself is not modified.

    ONNX allows empty and repeated node names; the change log and TensorRT's layer names need
    distinct ones, so those (and only those) get ``<op>_<index>`` style names.
    """
    graph = import_graph(model)
    # gs lets a value_info entry for a graph input/output override its declaration (ModelOpt's fp16
    # YOLOv8n carries one with unknown dims for its output): the declaration is the model's contract.
    declared = {v.name: v for v in [*model.graph.input, *model.graph.output]}
    for t in [*graph.inputs, *graph.outputs]:
        vi = declared.get(t.name)
        if vi is not None and vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            t.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in vi.type.tensor_type.shape.dim]
    for t in _all_tensors(graph):
        # gs leaves types numpy cannot name (bfloat16, float8) as ONNX enum integers; their
        # ml_dtypes types compare and print like any other, and gs exports them back the same.
        if isinstance(t, gs.Variable) and isinstance(t.dtype, (int, np.integer)):
            t.dtype = np_dtype(t.dtype) or t.dtype
    seen: set[str] = set()
    renamed = 0
    for i, node in enumerate(graph.nodes):
        if not node.name or node.name in seen:
            base = node.name or f"{node.op}_{i}"
            name, k = base, 1
            while name in seen:
                name, k = f"{base}_{k}", k + 1
            node.name = name
            renamed += 1
        seen.add(node.name)
    if renamed:
        logger.info("named %d unnamed or duplicately named node(s)", renamed)
    return graph


# ------------------------------------------------------------------------------------------------
# Fast construction and import
#
# gs's Tensor and Node constructors route every list through ``__setattr__`` (an AttributeError per
# new object) and gs's importer rebuilds type information per tensor: together about half the time
# of a run on a 20k-node graph. These build the very same objects (same classes, same fields, same
# list types and cross-links) directly.


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while graphs are built and rewritten.

    A graph is a web of cycles (node <-> tensor, and each gs list <-> its owner) and a run allocates
    millions of objects; the collector's automatic passes rescan the ever-growing heap and took about
    30% of a run on a 20k-node graph. A full collection of such a heap takes seconds too, so none is
    forced on leaving: the collector resumes its normal schedule. Graphs dropped inside are freed by
    :func:`collect_small`.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def collect_small(nodes: int, limit: int = 10_000) -> None:
    """Free the cycles of a dropped graph of ``nodes`` nodes now, when that is cheap (small graphs,
    which is where big weights live); a large graph's garbage waits for the collector."""
    if nodes <= limit:
        gc.collect()


def _synced(parent: object, field_name: str) -> SynchronizedList:
    lst = list.__new__(SynchronizedList)
    lst.parent_obj = parent
    lst.field_name = field_name
    return lst


def _new_tensor(cls: type, name: str, **fields: object) -> gs.Tensor:
    """An instance of a gs tensor class with ``name``, empty linked producer/consumer lists, then ``fields``."""
    t = object.__new__(cls)
    d = t.__dict__
    d["name"] = name
    d["inputs"] = _synced(t, "outputs")
    d["outputs"] = _synced(t, "inputs")
    d.update(fields)
    return t


def new_variable(name: str, dtype: object = None, shape: object = None, type: str = "tensor_type") -> gs.Variable:
    """``gs.Variable(name, dtype, shape, type)``."""
    return _new_tensor(gs.Variable, name, dtype=dtype, shape=shape, type=type)


def new_constant(name: str, values: np.ndarray | LazyValues, data_location: int | None = None) -> gs.Constant:
    """``gs.Constant(name, values, data_location)`` for a numpy array or LazyValues."""
    return _new_tensor(gs.Constant, name, _values=values, data_location=data_location, _export_dtype=None)


def new_node(op: str, name: str = "", attrs: dict | None = None, inputs: list | None = None,
             outputs: list | None = None, domain: str | None = None) -> gs.Node:
    """``gs.Node(op, name, attrs, inputs, outputs, domain)``: links each tensor back to the node as gs does."""
    node = object.__new__(gs.Node)
    d = node.__dict__
    d["op"] = op
    d["name"] = name if name is not None else ""
    d["attrs"] = attrs if attrs is not None else OrderedDict()
    ins, outs = _synced(node, "outputs"), _synced(node, "inputs")
    d["inputs"], d["outputs"] = ins, outs
    d["domain"] = domain
    for t in inputs or ():
        list.append(ins, t)
        list.append(t.outputs, node)
    for t in outputs or ():
        list.append(outs, t)
        list.append(t.inputs, node)
    return node


_NP_TYPES: dict[int, object] = {}
_ITEMSIZE: dict[object, int] = {}


def _np_type(elem: int) -> object:
    """gs's ``get_numpy_type`` (cached; it lists every ONNX type per call)."""
    try:
        return _NP_TYPES[elem]
    except KeyError:
        _NP_TYPES[elem] = out = _gs_importer.get_numpy_type(elem)
        return out


def _lazy(tensor: onnx.TensorProto) -> LazyValues:
    """``LazyValues(tensor)``."""
    dtype = _np_type(tensor.data_type)
    if dtype is None:
        return LazyValues(tensor)  # gs logs its warning for types numpy cannot name
    lv = object.__new__(LazyValues)
    lv.tensor = tensor
    lv.shape = tensor.dims
    lv.dtype = dtype
    try:
        size = _ITEMSIZE[dtype]
    except KeyError:
        size = _ITEMSIZE[dtype] = _gs_importer.get_itemsize(dtype)
    n = 1
    for dim in tensor.dims:
        n *= dim
    lv.nbytes = n * size
    return lv


def _tensor_type(vi: onnx.ValueInfoProto) -> tuple[object, object] | None:
    """(dtype, shape) of a plain tensor ``vi`` as gs reads them; None for anything else (gs's own import).

    Parsed once per distinct type (a graph's hundreds of thousands of tensors share a few hundred
    types, and reading a shape's dims through protobuf costs microseconds each); the shape is a new list.
    """
    typ = vi.type
    key = typ.SerializeToString()
    found = _TYPES.get(key, _UNSEEN)
    if found is _UNSEEN:
        found = _parse_tensor_type(typ)
        if len(_TYPES) >= _TYPES_KEPT:
            _TYPES.clear()
        _TYPES[key] = found
    if found is None:
        return None
    dtype, shape = found
    return dtype, (list(shape) if shape is not None else None)


_TYPES: dict[bytes, tuple[object, tuple | None] | None] = {}
_TYPES_KEPT = 1 << 14
_UNSEEN = object()


def _parse_tensor_type(typ: onnx.TypeProto) -> tuple[object, tuple | None] | None:
    if not typ.HasField("tensor_type"):
        return None
    tt = typ.tensor_type
    dtype = _np_type(tt.elem_type)
    if dtype is None:
        return None
    if not tt.HasField("shape"):
        return dtype, None
    return dtype, tuple(d.dim_param if d.HasField("dim_param") else d.dim_value if d.HasField("dim_value") else None
                        for d in tt.shape.dim)


def value_info_type(vi: onnx.ValueInfoProto) -> tuple[object, object]:
    """(dtype, shape) of the tensor :func:`_value_info_tensor` would build from ``vi``, without building it."""
    found = _tensor_type(vi)
    if found is not None:
        return found
    t = _value_info_tensor(vi)
    return t.dtype, t.shape


def types_complete(model: onnx.ModelProto) -> bool:
    """Whether every input, output and node output of ``model`` (a flat one: :func:`_flat_model`) is
    declared with an element type and a static shape.

    ONNX's shape inference (not strict) keeps a declared type as it is and only fills in what is
    missing, so on such a model it returns the same types: a model this tool loaded or exported
    (``tests/test_scale.py`` checks that on every shared model). On a 100k-node graph inference
    took about 4 s, and it ran up to four times per optimize.
    """
    if not _flat_model(model):
        return False
    g = model.graph
    declared = set()
    for vi in (*g.input, *g.output, *g.value_info):
        found = _tensor_type(vi)
        if found is None or found[1] is None or not all(type(d) is int for d in found[1]):
            return False
        declared.add(vi.name)
    return all(o in declared for n in g.node for o in n.output if o)


def infer_missing_shapes(model: onnx.ModelProto, **kwargs) -> onnx.ModelProto:
    """``onnx.shape_inference.infer_shapes(model, **kwargs)`` (not strict), or ``model`` itself when
    :func:`types_complete` says inference would add nothing."""
    if kwargs.get("strict_mode") or not types_complete(model):
        return onnx.shape_inference.infer_shapes(model, **kwargs)
    return model


def _value_info_tensor(vi: onnx.ValueInfoProto) -> gs.Variable:
    """gs's ``OnnxImporter.import_tensor`` of a ValueInfoProto."""
    found = _tensor_type(vi)
    if found is not None:
        return new_variable(vi.name, found[0], found[1], "tensor_type")
    return _gs_importer.OnnxImporter.import_tensor(vi)


_SIMPLE_ATTRS = {
    onnx.AttributeProto.INT: lambda a: a.i,
    onnx.AttributeProto.FLOAT: lambda a: a.f,
    onnx.AttributeProto.STRING: lambda a: a.s.decode(),
    onnx.AttributeProto.INTS: lambda a: list(a.ints),
    onnx.AttributeProto.FLOATS: lambda a: list(a.floats),
    onnx.AttributeProto.STRINGS: lambda a: [p.decode() for p in a.strings],
}
_GRAPH_ATTRS = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def _flat_model(model: onnx.ModelProto) -> bool:
    """A model gs's import treats simply: no functions, sparse initializers or control-flow bodies."""
    g = model.graph
    if model.functions or g.sparse_initializer:
        return False
    return not any(a.type in _GRAPH_ATTRS for n in g.node for a in n.attribute)


def import_graph(model: onnx.ModelProto, initializers: dict[str, onnx.TensorProto] | None = None) -> gs.Graph:
    """``gs.import_onnx(model)``: the same graph, built several times faster for models without
    functions, sparse initializers or subgraphs (the others go through gs).

    ``initializers``: protos to import in place of the model's initializers of the same names (the
    analysis infers shapes on a copy without the weights' bytes, then reads the weights from the original).
    """
    if not _flat_model(model):
        if initializers:
            raise ValueError("initializers= needs a model without functions, sparse initializers or subgraphs")
        return gs.import_onnx(model)
    g = model.graph
    tensors: dict[str, gs.Tensor] = {}
    for init in g.initializer:
        if init.name not in tensors:
            init = initializers.get(init.name, init) if initializers else init
            loc = int(init.data_location) if init.HasField("data_location") else None
            tensors[init.name] = new_constant(init.name, _lazy(init), loc)
    for vi in g.value_info:
        new = _value_info_tensor(vi)
        old = tensors.get(vi.name)
        if old is None:
            tensors[vi.name] = new
        elif isinstance(old, gs.Variable):  # gs merges what each entry knows, with these exact truth tests
            old.dtype = old.dtype or new.dtype
            old.shape = old.shape or new.shape
    inits = {t.name for t in g.initializer}
    graph_inputs = []
    for vi in g.input:
        if vi.name not in inits:
            t = tensors.get(vi.name)
            if t is None:
                t = tensors[vi.name] = _value_info_tensor(vi)
            graph_inputs.append(t)
    graph_outputs = []
    for vi in g.output:
        t = tensors.get(vi.name)
        if t is None:
            t = tensors[vi.name] = _value_info_tensor(vi)
        graph_outputs.append(t)

    def get(name: str) -> gs.Tensor:
        t = tensors.get(name)
        if t is None:
            if not name:
                return new_variable("")  # an omitted optional input or output: never shared
            t = tensors[name] = new_variable(name)
        return t

    opset = _gs_importer.OnnxImporter.get_opset(model)
    domains = _gs_importer.OnnxImporter.get_import_domains(model)
    nodes = []
    simple = _SIMPLE_ATTRS
    for n in g.node:
        attrs: dict = OrderedDict()
        for a in n.attribute:
            conv = simple.get(a.type)
            if conv is None or a.ref_attr_name:
                attrs = _gs_importer.OnnxImporter.import_attributes(n.attribute, {}, tensors, opset, domains)
                break
            attrs[a.name] = conv(a)
        nodes.append(new_node(n.op_type, n.name, attrs, [get(x) for x in n.input], [get(x) for x in n.output],
                              n.domain if n.HasField("domain") else None))
    return gs.Graph(nodes=nodes, inputs=graph_inputs, outputs=graph_outputs, name=g.name, doc_string=g.doc_string,
                    producer_name=model.producer_name, producer_version=model.producer_version, opset=opset,
                    import_domains=domains, functions=[], ir_version=model.ir_version)


class _NotFlat(Exception):
    """Raised by :func:`_export_flat` for anything it leaves to gs's exporter."""


_ONNX_TYPES: dict[object, int] = {}
_AP = onnx.AttributeProto


def _onnx_type(dtype: object) -> int:
    """gs's ``dtype_to_onnx`` (cached per dtype)."""
    try:
        return _ONNX_TYPES[dtype]
    except (KeyError, TypeError):
        pass
    from onnx_graphsurgeon.exporters.onnx_exporter import dtype_to_onnx

    out = dtype_to_onnx(dtype)
    try:
        _ONNX_TYPES[dtype] = out
    except TypeError:  # an unhashable dtype: convert it each time
        pass
    return out


def _set_attribute(node: onnx.NodeProto, key: str, value: object) -> None:
    """What gs's ``export_attributes`` + ``onnx.helper.make_attribute`` write for one attribute."""
    kind = type(value)
    if kind is int or kind is bool:
        a = node.attribute.add()
        a.name, a.i, a.type = key, int(value), _AP.INT
    elif kind is float:
        a = node.attribute.add()
        a.name, a.f, a.type = key, value, _AP.FLOAT
    elif kind is str:
        a = node.attribute.add()
        a.name, a.s, a.type = key, value.encode("utf-8"), _AP.STRING
    elif kind is list and value and all(type(v) is int for v in value):
        a = node.attribute.add()
        a.name, a.type = key, _AP.INTS
        a.ints.extend(value)
    elif kind is list and value and all(type(v) is float for v in value):
        a = node.attribute.add()
        a.name, a.type = key, _AP.FLOATS
        a.floats.extend(value)
    else:  # tensors, graphs, references, dtypes, numpy scalars, strings lists: gs's own conversion
        from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

        node.attribute.extend(OnnxExporter.export_attributes({key: value}))


_VI_TYPES: dict[tuple, bytes] = {}  # (dtype, dim types, dims) -> the TypeProto's bytes: a graph has few distinct


def _set_value_info(vi: onnx.ValueInfoProto, t: gs.Tensor) -> None:
    """gs's ``export_value_info_proto`` (no type check) into ``vi``."""
    vi.name = t.name
    if t.dtype is None:
        return
    if not isinstance(t, gs.Constant) and t.type != "tensor_type":
        raise _NotFlat("sequence or sparse value info")
    shape = t.shape
    try:
        key = (t.dtype, None, None) if shape is None else (t.dtype, tuple(map(type, shape)), tuple(shape))
        found = _VI_TYPES.get(key)
    except TypeError:  # unhashable
        key, found = None, None
    if found is None:
        tp = onnx.TypeProto()
        _write_tensor_type(tp.tensor_type, t.dtype, shape)
        found = tp.SerializeToString()
        if key is not None and len(_VI_TYPES) < 16384:
            _VI_TYPES[key] = found
    vi.type.MergeFromString(found)


def _write_tensor_type(tt: onnx.TypeProto.Tensor, dtype: object, shape: object) -> None:
    tt.elem_type = _onnx_type(dtype)
    if shape is not None:
        dims = tt.shape.dim
        dims.extend([])  # an empty (scalar) shape is written as present, as onnx.helper does
        for d in shape:
            dim = dims.add()
            if d is None:
                continue
            if type(d) is int:
                dim.dim_value = d
            elif type(d) is str:
                dim.dim_param = d
            else:
                raise _NotFlat(f"shape entry {d!r}")


def _write_constant(init: onnx.TensorProto, t: gs.Constant) -> None:
    """gs's ``export_tensor_proto`` of a numpy-valued constant, written into ``init`` (one copy of the bytes)."""
    values = t._values
    if not isinstance(values, np.ndarray):
        raise _NotFlat("sparse constant")
    kind = _onnx_type(values.dtype)
    if (t._export_dtype is not None and _onnx_type(t._export_dtype) != kind) or dtype_name(values.dtype) in _PACKED_DTYPES:
        raise _NotFlat("exported dtype conversion or packed constant")
    init.data_type = kind
    init.name = t.name
    init.dims.extend(values.shape)
    init.raw_data = values.tobytes()
    if t.data_location is not None:
        init.data_location = t.data_location


def _export_flat(graph: gs.Graph) -> onnx.ModelProto:
    """``gs.export_onnx(graph, do_type_check=False)``, byte for byte, built in place.

    gs builds every node, tensor and value info as a standalone proto through ``onnx.helper``, then
    copies them all into a GraphProto and that into a ModelProto: on a 100k-node graph that was the
    largest single cost of a run. This writes each field once into the model. Anything unusual
    (functions, subgraphs, sparse constants, exported dtype conversions, non-tensor value infos)
    raises :class:`_NotFlat`, and :func:`export_model` leaves that graph to gs.
    """
    from onnx_graphsurgeon.exporters.onnx_exporter import update_import_domains

    if graph.functions:
        raise _NotFlat("functions")
    model = onnx.ModelProto()
    model.ir_version = onnx.IR_VERSION
    g = model.graph
    tensor_map: dict[str, gs.Tensor] = {}

    def add(t: gs.Tensor) -> None:
        if t.name != "":
            tensor_map[t.name] = t

    for t in graph.inputs:
        add(t)
    for n in graph.nodes:
        node = g.node.add()
        node.op_type = n.op
        ins, outs = n.inputs, n.outputs
        node.input.extend([t.name for t in ins])
        node.output.extend([t.name for t in outs])
        if n.name:
            node.name = n.name
        if n.domain is not None:
            node.domain = n.domain
        for key, value in n.attrs.items():
            if isinstance(value, gs.Graph):
                raise _NotFlat("subgraph")
            _set_attribute(node, key, value)
        for t in ins:
            add(t)
        for t in outs:
            add(t)
    for t in graph.outputs:
        add(t)
    g.name = graph.name
    for t in graph.inputs:
        _set_value_info(g.input.add(), t)
    for t in graph.outputs:
        _set_value_info(g.output.add(), t)
    for t in tensor_map.values():
        if not isinstance(t, gs.Constant):
            continue
        values = t._values
        if isinstance(values, LazyValues):
            values.tensor.name = t.name  # as gs does: the imported proto takes the constant's name
            g.initializer.append(values.tensor)
            continue
        _write_constant(g.initializer.add(), t)
    for t in graph.inputs + graph.outputs:
        tensor_map.pop(t.name, None)
    for t in tensor_map.values():
        if isinstance(t, gs.Variable) and (t.dtype is not None or t.shape is not None):
            _set_value_info(g.value_info.add(), t)
    if graph.doc_string:
        g.doc_string = graph.doc_string
    model.opset_import.extend(update_import_domains(graph))
    model.producer_name = graph.producer_name
    model.producer_version = graph.producer_version
    if graph.ir_version is not None:
        model.ir_version = graph.ir_version
    return model


def export_graph(graph: gs.Graph) -> onnx.ModelProto:
    """``gs.export_onnx(graph, do_type_check=False)``: the same model, several times faster for
    graphs without functions, subgraphs or sparse constants (the others go through gs)."""
    try:
        return _export_flat(graph)
    except _NotFlat as why:
        logger.debug("exporting through gs: %s", why)
        return gs.export_onnx(graph, do_type_check=False)


def np_dtype(dtype: object) -> np.dtype | None:
    """The numpy dtype of a gs tensor's ``dtype``, or None when unknown.

    gs keeps ONNX types numpy cannot name (bfloat16, float8) as the TensorProto enum integer;
    onnx maps those to their ml_dtypes types, which the rest of the package can compare.
    """
    if dtype is None:
        return None
    try:
        if isinstance(dtype, (int, np.integer)) and not isinstance(dtype, bool):
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(dtype)))
        return np.dtype(dtype)
    except (TypeError, KeyError, ValueError):
        return None


def is_float_dtype(dtype: object) -> bool:
    """Whether ``dtype`` (numpy, ml_dtypes or an ONNX enum) is a floating-point type: float16/32/64, bfloat16."""
    dt = np_dtype(dtype)
    if dt is None:
        return False
    # ml_dtypes' bfloat16 reports kind 'V'; float8 types are storage formats, not compute types.
    return dt.kind == "f" or dt.name == "bfloat16"


# 4-bit types numpy stores one per byte but ONNX packs two per byte: gs's exporter writes
# ``values.tobytes()`` as raw data, which is twice too long for them once their values were read.
_PACKED_DTYPES = ("int4", "uint4", "float4_e2m1fn")


_DTYPE_NAMES: dict[object, str] = {}


def dtype_name(dtype: object) -> str:
    """``np.dtype(dtype).name``, cached (numpy computes the name in Python on every call)."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        _DTYPE_NAMES[dtype] = name = np.dtype(dtype).name
        return name
    except TypeError:  # an unhashable description
        return np.dtype(dtype).name


def _repack_subbyte_constants(graph: gs.Graph) -> None:
    for t in _all_tensors(graph):
        if isinstance(t, gs.Constant) and isinstance(t._values, np.ndarray) and dtype_name(t._values.dtype) in _PACKED_DTYPES:
            t._values = LazyValues(onnx.numpy_helper.from_array(t._values, t.name))


def _all_tensors(graph: gs.Graph) -> Iterator[gs.Tensor]:
    """Every tensor of ``graph`` and its subgraphs (those of ``tensors()``), each once.

    A flat graph is walked directly: ``tensors()`` also checks names, at several times the cost.
    """
    if graph.functions or any(isinstance(v, gs.Graph) for n in graph.nodes for v in n.attrs.values()):
        for g in [graph, *graph.subgraphs(recursive=True)]:
            yield from g.tensors().values()
        return
    seen: set[int] = set()
    for group in (graph.inputs, graph.outputs, *(t for n in graph.nodes for t in (n.inputs, n.outputs))):
        for t in group:
            if id(t) not in seen:
                seen.add(id(t))
                yield t


def export_model(graph: gs.Graph, template: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """Export ``graph`` to a model, carrying over what gs drops from ``template``.

    gs keeps nodes, tensors, opsets and producer fields; model-level metadata, doc strings and
    the model version live only in the original proto, so they are copied from there.
    """
    _repack_subbyte_constants(graph)
    big = _big_constants(graph)
    if not big:
        model = export_graph(graph)
    else:
        model = _export_heavy(graph, big)
    if template is not None:
        carry_metadata(model, template)
    return model


# gs's exporter holds every weight several times at once (the array's bytes, the TensorProto made of
# them, its copy in the GraphProto, that graph's copy in the ModelProto): 4x the weights of a big
# model. Above this many bytes of large constants, each is written into the exported model on its own.
_HEAVY_CONSTANTS = 2**28
_BIG_CONSTANT = 2**20


def _big_constants(graph: gs.Graph) -> list[gs.Constant]:
    """The initializer constants over 1 MiB of a flat graph, when they total over 256 MB; else none."""
    if graph.functions or any(isinstance(v, gs.Graph) for n in graph.nodes for v in n.attrs.values()):
        return []
    found: dict[int, gs.Constant] = {}
    for n in graph.nodes:
        for t in n.inputs:
            if isinstance(t, gs.Constant) and id(t) not in found and t.name:
                values = t._values
                size = values.nbytes if isinstance(values, (np.ndarray, LazyValues)) else 0
                if size >= _BIG_CONSTANT and not isinstance(values, gs.ir.tensor.SparseValues):
                    found[id(t)] = t
    big = list(found.values())
    return big if sum(t._values.nbytes for t in big) > _HEAVY_CONSTANTS else []


def _export_heavy(graph: gs.Graph, big: list[gs.Constant]) -> onnx.ModelProto:
    """``gs.export_onnx`` with the big constants exported one at a time into their slots.

    gs exports them as empty stand-ins first (same names, so the same places among the
    initializers); each slot then receives what gs's own tensor export makes of the constant. The
    constant is left reading that exported tensor (lazily), so the graph drops its own copy.
    """
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter, dtype_to_onnx

    saved = [(t, t._values) for t in big]
    try:
        for t, values in saved:
            kind = values.tensor.data_type if isinstance(values, LazyValues) else dtype_to_onnx(t.export_dtype)
            t._values = LazyValues(onnx.TensorProto(name=t.name, data_type=kind, dims=list(values.shape)))
        model = export_graph(graph)
    finally:
        for t, values in saved:
            t._values = values
    slots = {init.name: init for init in model.graph.initializer}
    for t, _ in saved:
        slot = slots[t.name]
        try:
            slot.Clear()
            _write_constant(slot, t)
        except _NotFlat:
            slot.CopyFrom(OnnxExporter.export_tensor_proto(t))
        t._values = _lazy(slot)
    return model


def carry_metadata(model: onnx.ModelProto, template: onnx.ModelProto) -> None:
    """Copy into ``model`` (in place) the model-level fields gs's exporter drops, from ``template``."""
    model.ir_version = template.ir_version
    model.doc_string = template.doc_string
    model.model_version = template.model_version
    model.domain = template.domain
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    if not model.producer_name:
        model.producer_name = template.producer_name
        model.producer_version = template.producer_version
    if template.graph.doc_string and not model.graph.doc_string:
        model.graph.doc_string = template.graph.doc_string


def opset_version(graph_or_model: gs.Graph | onnx.ModelProto) -> int:
    """The default-domain opset of a graph or model."""
    if isinstance(graph_or_model, onnx.ModelProto):
        for imp in graph_or_model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                return int(imp.version)
        return 0
    return int(graph_or_model.opset or 0)


def is_q(node: gs.Node | None) -> bool:
    return node is not None and node.op == Q_OP


def is_dq(node: gs.Node | None) -> bool:
    return node is not None and node.op == DQ_OP


def is_qdq(node: gs.Node | None) -> bool:
    return is_q(node) or is_dq(node)


def producer(tensor: gs.Tensor) -> gs.Node | None:
    """The node writing ``tensor``, or None for graph inputs and initializers."""
    return tensor.inputs[0] if tensor.inputs else None


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    return list(tensor.outputs)


def const_value(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The constant value behind ``tensor``, looking through Constant, Identity and Cast nodes.

    Returns None when the tensor is computed at run time.
    """
    seen = 0
    casts: list[int] = []
    while tensor is not None and seen < 16:
        seen += 1
        if isinstance(tensor, gs.Constant):
            value = np.asarray(tensor.values)
            for to in reversed(casts):
                value = value.astype(onnx.helper.tensor_dtype_to_np_dtype(to))
            return value
        node = producer(tensor)
        if node is None:
            return None
        if node.op == "Constant":
            value = node.attrs.get("value")
            if isinstance(value, gs.Constant):
                out = np.asarray(value.values)
            elif "value_float" in node.attrs:
                out = np.asarray(node.attrs["value_float"], dtype=np.float32)
            elif "value_floats" in node.attrs:
                out = np.asarray(node.attrs["value_floats"], dtype=np.float32)
            elif "value_int" in node.attrs:
                out = np.asarray(node.attrs["value_int"], dtype=np.int64)
            elif "value_ints" in node.attrs:
                out = np.asarray(node.attrs["value_ints"], dtype=np.int64)
            else:
                return None
            for to in reversed(casts):
                out = out.astype(onnx.helper.tensor_dtype_to_np_dtype(to))
            return out
        if node.op in _TRANSPARENT_CONST_OPS and node.inputs:
            if node.op == "Cast":
                casts.append(int(node.attrs["to"]))
            tensor = node.inputs[0]
            continue
        return None
    return None


def is_constant(tensor: gs.Tensor | None) -> bool:
    """Whether :func:`const_value` finds a value behind ``tensor``, answered without loading it
    (a weight's values are read, and copied, only by the code that needs them)."""
    seen = 0
    while tensor is not None and seen < 16:
        seen += 1
        if isinstance(tensor, gs.Constant):
            return True
        node = producer(tensor)
        if node is None:
            return False
        if node.op == "Constant":
            return isinstance(node.attrs.get("value"), gs.Constant) or any(
                k in node.attrs for k in ("value_float", "value_floats", "value_int", "value_ints"))
        if node.op in _TRANSPARENT_CONST_OPS and node.inputs:
            tensor = node.inputs[0]
            continue
        return False
    return False


@dataclass(frozen=True)
class QParams:
    """Quantization parameters of one Q or DQ node."""

    scale: np.ndarray
    zero_point: np.ndarray | None
    axis: int | None  # None when per-tensor
    axis_written: bool  # whether the node carries an explicit ``axis`` attribute (rule V3)
    block_size: int = 0  # > 0: blocked quantization (opset 21), ``axis`` is the blocked axis
    data_dtype: np.dtype | None = None  # the quantized side's type when no zero point says it

    @property
    def per_channel(self) -> bool:
        """More than one scale: per-channel along ``axis``, or blocked (check :attr:`blocked` before reading it as per-axis)."""
        return self.scale.size > 1

    @property
    def blocked(self) -> bool:
        return self.block_size > 0

    @property
    def qdtype(self) -> np.dtype:
        if self.zero_point is not None:
            return self.zero_point.dtype
        return self.data_dtype if self.data_dtype is not None else np.dtype(np.uint8)


def qparams(node: gs.Node) -> QParams | None:
    """Scale, zero point and axis of a Q/DQ node; None when the scale is not constant (V1)."""
    scale = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if scale is None:
        return None
    zp = None
    if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
        zp = const_value(node.inputs[2])
    elif node.op == Q_OP and "output_dtype" in node.attrs and node.attrs["output_dtype"]:
        zp = np.zeros((), dtype=onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["output_dtype"])))
    written = "axis" in node.attrs
    block = int(node.attrs.get("block_size", 0) or 0)
    axis = int(node.attrs.get("axis", 1)) if np.asarray(scale).size > 1 or block else None
    data = None
    if zp is None and node.op == DQ_OP:
        # Without a zero point, a DQ's quantized type is its input's (int8, int4, float8...).
        src = node.inputs[0]
        data = np_dtype(src.dtype)  # a Constant's dtype is read without loading its values
    return QParams(np.asarray(scale), None if zp is None else np.asarray(zp), axis, written, block, data)


def is_blocked(node: gs.Node | None) -> bool:
    """A Q/DQ with blocked quantization (``block_size`` > 0, opset 21): one scale per block of ``axis``."""
    return node is not None and node.op in (Q_OP, DQ_OP) and int(node.attrs.get("block_size", 0) or 0) > 0


def qparams_key(node: gs.Node) -> tuple | None:
    """Hashable identity of a Q/DQ's quantization, or None when its parameters are not constants.

    Bit-exact on the scale's values *and* its type (the scale type is the DQ's output type, a
    precision switch under strong typing), the quantized type, the zero point (absent = zeros of
    that type), the axis when there is more than one scale, and the block size. The passes
    (:func:`same_qparams`) and the static analysis merge and cancel Q/DQ by this one key.
    """
    qp = qparams(node)
    if qp is None:
        return None
    scale = np.asarray(qp.scale)
    zp = qp.zero_point if qp.zero_point is not None else np.zeros_like(scale, dtype=qp.qdtype)
    zp = np.broadcast_to(np.asarray(zp).astype(np.int64), scale.shape)
    axis = qp.axis if (qp.per_channel or qp.blocked) else None
    return (scale.dtype.str, scale.shape, scale.tobytes(), str(qp.qdtype), zp.tobytes(), axis, qp.block_size)


def same_qparams(a: gs.Node, b: gs.Node) -> bool:
    """Bit-exact equality of the quantization of two Q/DQ nodes (:func:`qparams_key`)."""
    ka = qparams_key(a)
    return ka is not None and ka == qparams_key(b)


def graph_output_names(graph: gs.Graph) -> set[str]:
    return {t.name for t in graph.outputs}


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in graph.outputs)


def weight_input_index(node: gs.Node) -> int | None:
    """Which input of a weighted op holds the weight (rule F1), or None if no constant operand."""
    if node.op in ("Conv", "ConvTranspose", "Gemm"):
        return 1 if len(node.inputs) > 1 else None
    if node.op == "MatMul":
        for idx in (1, 0):
            if behind_constant(node.inputs[idx]):
                return idx
        return None
    return None


def activation_input_index(node: gs.Node) -> int:
    """Which input of a weighted op carries the activation: the non-weight operand of a MatMul, else 0."""
    widx = weight_input_index(node)
    return 1 - widx if node.op == "MatMul" and widx is not None else 0


def behind_constant(tensor: gs.Tensor) -> bool:
    """True if ``tensor`` is a constant, or a (Q→)DQ of a constant (a weight already quantized)."""
    node = producer(tensor)
    while node is not None and node.op in (DQ_OP, Q_OP, "Transpose", "Identity", "Cast"):
        tensor = node.inputs[0]
        node = producer(tensor)
    return is_constant(tensor)


def weighted_weight(node: gs.Node) -> gs.Tensor | None:
    """The weight input tensor of a weighted op, or None."""
    idx = weight_input_index(node)
    return None if idx is None else node.inputs[idx]


def iter_qdq_pairs(graph: gs.Graph) -> Iterator[tuple[gs.Node, gs.Node]]:
    """Every (Q, DQ) pair where the DQ reads the Q's output directly."""
    for node in graph.nodes:
        if is_q(node):
            for cons in node.outputs[0].outputs:
                if is_dq(cons):
                    yield node, cons


# --------------------------------------------------------------------------------------------
# Control flow and plugins


def is_plugin(node: gs.Node) -> bool:
    """A TensorRT plugin node (``TRT::EfficientNMS_TRT`` and the like): TensorRT runs it, onnxruntime cannot."""
    return is_plugin_domain(node.domain or "")


def subgraphs(node: gs.Node) -> list[tuple[str, gs.Graph]]:
    """The bodies of an If (then_branch, else_branch), Loop or Scan (body), as (attribute, graph)."""
    return [(k, v) for k, v in node.attrs.items() if isinstance(v, gs.Graph)]


def nested_nodes(graph: gs.Graph) -> Iterator[tuple[gs.Node, list[tuple[gs.Node, str]]]]:
    """Every node inside a control-flow body, with its path of (If/Loop/Scan node, attribute) from the top.

    The top-level nodes themselves are not yielded: passes see them in ``graph.nodes``.
    """
    def walk(g: gs.Graph, path: list[tuple[gs.Node, str]]):
        for node in g.nodes:
            if path:
                yield node, path
            for attr, body in subgraphs(node):
                yield from walk(body, [*path, (node, attr)])
    yield from walk(graph, [])


def after_plugins(graph: gs.Graph) -> dict[int, gs.Node]:
    """id(node) -> the plugin it (transitively) reads from, for every top-level node downstream of a plugin.

    onnxruntime cannot run a plugin, so nothing after one can be calibrated or checked numerically.
    """
    top = {id(n) for n in graph.nodes}
    below: dict[int, gs.Node] = {}
    for plugin in (n for n in graph.nodes if is_plugin(n)):
        work = [plugin]
        while work:
            node = work.pop()
            for t in node.outputs:
                for c in t.outputs:
                    if id(c) in top and id(c) not in below and not is_plugin(c):
                        below[id(c)] = plugin
                        work.append(c)
    return below


# ------------------------------------------------------------------------------------------------
# Linear-time cleanup, sort and name census
#
# gs's ``cleanup()`` and ``toposort()`` walk every node several times per call through generic
# machinery (subgraph scans, name maps, recursive levels); run after every pass they were half of
# the time on 5k-node graphs. These give exactly gs's result (same kept nodes, same node order) on
# graphs without subgraphs or local functions, and defer to gs for the others.


def _flat(graph: gs.Graph) -> bool:
    """No local functions, no control-flow subgraphs and no node listed twice: gs's semantics are simple."""
    if graph.functions:
        return False
    nodes = graph.nodes
    if len({id(n) for n in nodes}) != len(nodes):
        return False
    return not any(isinstance(v, gs.Graph) for n in nodes for v in n.attrs.values())


def _local_names(graph: gs.Graph) -> set[str]:
    """Names gs counts as local to ``graph``: node outputs, graph inputs and constants (``Graph._local_tensors``)."""
    local = {t.name for n in graph.nodes for t in n.outputs if t.name != ""}
    local.update(t.name for t in graph.inputs)
    for t in graph.inputs:
        if isinstance(t, gs.Constant) and t.name:
            local.add(t.name)
    for n in graph.nodes:
        for t in n.inputs:
            if isinstance(t, gs.Constant) and t.name:
                local.add(t.name)
    for t in graph.outputs:
        if isinstance(t, gs.Constant) and t.name:
            local.add(t.name)
    return local


def cleanup_graph(graph: gs.Graph) -> gs.Graph:
    """``graph.cleanup(remove_unused_graph_inputs=False)`` in one pass over the nodes."""
    if not _flat(graph):
        return graph.cleanup(remove_unused_graph_inputs=False)
    for inp in graph.inputs:
        inp.inputs.clear()
    index = {id(n) for n in graph.nodes}
    local = _local_names(graph)
    seen: set[str] = set()

    def keep(t: gs.Tensor) -> bool:
        if t.name == "":
            return True
        if t.name not in local or t.name in seen:
            return False
        seen.add(t.name)
        return True

    used: set[int] = set()
    work = [t for t in graph.outputs if keep(t)]
    i = 0
    while i < len(work):
        t = work[i]
        i += 1
        for node in t.inputs:
            key = id(node)
            if key in used:  # (reached before through another of its outputs: its inputs are queued)
                continue
            if key not in index:  # a producer outside the graph: gs reports it
                return graph.cleanup(remove_unused_graph_inputs=False)
            used.add(key)
            for x in node.inputs:
                name = x.name
                if name == "":
                    work.append(x)
                elif name in local and name not in seen:
                    seen.add(name)
                    work.append(x)
    graph.inputs = list(graph.inputs)
    nodes = []
    for node in graph.nodes:
        if id(node) in used:
            nodes.append(node)
        else:
            node.inputs.clear()
            node.outputs.clear()
    graph.nodes = nodes
    return graph


def _levels_in_order(nodes: list[gs.Node]) -> dict[int, int] | None:
    """gs's toposort levels of ``nodes`` when they are already in a topological order, else None.

    gs's recursion then finishes the nodes in their own order, and each node's level follows from its
    producers' in one forward pass. (A named tensor with a producer in the graph is local to it; a later
    producer, a cycle or a producer outside the graph returns None: the full walk handles those.)
    """
    levels: dict[int, int] = {}
    for node in nodes:
        top = -1
        for t in node.inputs:
            if t.name == "":
                continue
            for p in t.inputs:
                level = levels.get(id(p))
                if level is None:
                    return None
                top = max(top, level)
        levels[id(node)] = top + 1
    return levels


def toposort_graph(graph: gs.Graph) -> gs.Graph:
    """``graph.toposort()`` without recursion: the same order (levels, ties in gs's visiting order)."""
    if not _flat(graph):
        return graph.toposort()
    nodes = graph.nodes
    levels = _levels_in_order(nodes)
    if levels is not None:
        graph.nodes = sorted(nodes, key=lambda n: levels[id(n)])
        return graph
    levels = {}
    index = {id(n) for n in nodes}
    local = _local_names(graph)
    order: list[gs.Node] = []  # in the order gs's recursion finishes nodes

    def producers(node: gs.Node) -> list[gs.Node] | None:
        found: dict[int, gs.Node] = {}
        for t in node.inputs:
            if t.name in local:
                for p in t.inputs:
                    found[id(p)] = p
        if any(k not in index for k in found):
            return None
        return list(found.values())

    for start in nodes:
        if id(start) in levels:
            continue
        first = producers(start)
        if first is None:
            return graph.toposort()  # a producer outside the graph: gs reports it
        stack: list[list] = [[start, first, 0, -1]]
        on_stack = {id(start)}
        while stack:
            frame = stack[-1]
            node, prods, i, top = frame
            if i < len(prods):
                frame[2] = i + 1
                p = prods[i]
                if id(p) in levels:
                    frame[3] = max(top, levels[id(p)])
                    continue
                if id(p) in on_stack:
                    return graph.toposort()  # a cycle: gs names it
                nxt = producers(p)
                if nxt is None:
                    return graph.toposort()
                on_stack.add(id(p))
                stack.append([p, nxt, 0, -1])
                continue
            stack.pop()
            on_stack.discard(id(node))
            levels[id(node)] = top + 1
            order.append(node)
            if stack:
                stack[-1][3] = max(stack[-1][3], top + 1)
    # sorted() is stable: equal levels keep the order in which gs's recursion finished them
    graph.nodes = sorted(order, key=lambda n: levels[id(n)])
    return graph


def used_names(graph: gs.Graph) -> set[str]:
    """Node names and the names of every tensor ``graph`` uses (the keys of ``graph.tensors()``)."""
    names = {n.name for n in graph.nodes}
    names.update(t.name for t in graph.inputs if t.name != "")
    for n in graph.nodes:
        names.update(t.name for t in n.inputs if t.name != "")
        names.update(t.name for t in n.outputs if t.name != "")
    names.update(t.name for t in graph.outputs if t.name != "")
    return names
