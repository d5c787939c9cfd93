"""AuditInstrument: fails a pass whose edits escaped the change log (issue 13 item 6).

Every pass edits through a :class:`~qdqsurgeon.rewriter.Rewriter`, which logs each edit. This
debug instrument checks that promise from outside: it fingerprints every node (op, inputs,
outputs, attributes, constant inputs by content), the graph's inputs, outputs and opset before a
pass and after it, and raises when

* a node was added, removed or changed but no logged edit names it, or
* the graph's inputs, outputs or opset changed and the pass logged no edit at all.

It checksums constant contents (CRC-32 over the raw bytes, without a copy: any change of up to 32
consecutive bits is always caught, which is what an edit check needs), so it costs a pass over the
loaded weights each time; a constant still held lazily by onnx-graphsurgeon is checksummed once and
not loaded into the graph. On under ``--debug`` and in the test suite (``QDQSURGEON_AUDIT=1``), off
in normal runs.
"""

from __future__ import annotations

import hashlib
import weakref
import zlib
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from .base import Instrument, Pass, PassContext, PassResult

__all__ = ["AuditInstrument", "EscapedEdit", "fingerprint"]


class EscapedEdit(AssertionError):
    """A pass changed the graph without logging the change."""


# digests of constants not yet loaded, by their LazyValues (immutable until loaded)
_LAZY_DIGESTS: weakref.WeakKeyDictionary[LazyValues, str] = weakref.WeakKeyDictionary()


def _value_digest(values: Any) -> str:
    arr = np.asarray(values)
    head = f"{arr.dtype.str}{arr.shape}"
    if arr.dtype.hasobject:  # strings: no fixed-size bytes to view
        return f"{head}:{hashlib.blake2b(repr(arr.tolist()).encode(), digest_size=8).hexdigest()}"
    return f"{head}:{zlib.crc32(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)):08x}"


def _constant_digest(t: gs.Constant) -> str:
    lazy = t._values  # not t.values, which would load the constant into the graph for good
    if isinstance(lazy, LazyValues):
        if lazy not in _LAZY_DIGESTS:
            _LAZY_DIGESTS[lazy] = _value_digest(lazy.load())
        return _LAZY_DIGESTS[lazy]
    return _value_digest(t.values)


def _tensor_sig(t: gs.Tensor | None, digests: dict[int, str]) -> str:
    if t is None or not t.name:
        return ""
    if isinstance(t, gs.Constant):
        key = id(t)
        if key not in digests:
            digests[key] = _constant_digest(t)
        return f"{t.name}={digests[key]}"
    return f"{t.name}:{t.dtype}"


def _attr_sig(value: Any, digests: dict[int, str]) -> str:
    if isinstance(value, gs.Graph):
        return fingerprint(value, digests)[1]
    if isinstance(value, gs.Tensor):
        return _tensor_sig(value, digests)
    if isinstance(value, np.ndarray):
        return _value_digest(value)
    return repr(value)


def fingerprint(graph: gs.Graph, digests: dict[int, str] | None = None) -> tuple[dict[str, tuple], str]:
    """({node name: (op, domain, input sigs, output sigs, attrs)}, whole-graph digest) for ``graph``;
    unnamed nodes are keyed by their op and output names."""
    digests = {} if digests is None else digests
    nodes: dict[str, tuple] = {}
    for i, n in enumerate(graph.nodes):
        attrs = ";".join(f"{k}={_attr_sig(v, digests)}" for k, v in sorted(n.attrs.items()))
        # an unnamed node is keyed by what it writes, not its position: a re-sort is not an edit
        nodes[n.name or f"#{n.op}:{','.join(t.name for t in n.outputs) or i}"] = (n.op, n.domain or "", tuple(_tensor_sig(t, digests) for t in n.inputs),
                                           tuple(_tensor_sig(t, digests) for t in n.outputs), attrs)
    top = "|".join([",".join(_tensor_sig(t, digests) for t in graph.inputs),
                    ",".join(_tensor_sig(t, digests) for t in graph.outputs),
                    str(graph.opset), repr(sorted((graph.import_domains or []), key=repr))])
    whole = hashlib.blake2b("\n".join([top, *sorted(f"{k}\t{v}" for k, v in nodes.items())]).encode(),
                            digest_size=16).hexdigest()
    return nodes, whole


def _name(sig: str) -> str:
    return sig.split("=")[0].split(":")[0]


def _rewired_to_logged(old: tuple, new: tuple, logged: set[str]) -> bool:
    """Whether a node changed only in which tensors it reads or writes, each such tensor named by the
    log or made by a node the log names: the consumers :meth:`Rewriter.insert_qdq` rewires, a producer
    whose output takes a graph output's name (:meth:`Rewriter.redirect_output`)."""
    if old[:2] != new[:2] or old[4] != new[4] or len(old[2]) != len(new[2]) or len(old[3]) != len(new[3]):
        return False
    pairs = list(zip(old[2], new[2])) + list(zip(old[3], new[3]))
    return all(a == b or _name(a) in logged or _name(b) in logged for a, b in pairs)


def _inner_names(graph: gs.Graph, name: str) -> set[str]:
    """Names of the nodes inside ``name``'s subgraphs (If/Loop/Scan bodies), at any depth: a body node
    reading an outer tensor is rewired, and logged, under its own name."""
    node = next((n for n in graph.nodes if n.name == name), None)
    out: set[str] = set()
    stack = [v for v in (node.attrs.values() if node is not None else ()) if isinstance(v, gs.Graph)]
    while stack:
        g = stack.pop()
        for n in g.nodes:
            out.add(n.name)
            stack.extend(v for v in n.attrs.values() if isinstance(v, gs.Graph))
    return out


class AuditInstrument(Instrument):
    """Raise :class:`EscapedEdit` when a pass edits nodes its change log does not name."""

    def __init__(self) -> None:
        self._before: tuple[dict[str, str], str] | None = None
        self._top: str = ""

    @staticmethod
    def _top_sig(graph: gs.Graph) -> str:
        return fingerprint(gs.Graph(inputs=graph.inputs, outputs=graph.outputs, opset=graph.opset,
                                    import_domains=graph.import_domains))[1]

    def before_pass(self, pass_: Pass, graph: gs.Graph, ctx: PassContext) -> None:
        self._before = fingerprint(graph)
        self._top = self._top_sig(graph)

    def after_pass(self, pass_: Pass, result: PassResult, ctx: PassContext) -> None:
        if self._before is None:
            return
        before, whole_before = self._before
        after, whole_after = fingerprint(result.graph)
        self._before = None
        if whole_before == whole_after:
            return
        edits = [c for c in result.changes if c.kind != "note"]
        named = {c.node for c in edits}
        touched = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        logged = named | {_name(sig) for nodes in (before, after) for k in named if k in nodes for sig in nodes[k][3]}
        escaped = [k for k in touched if k not in named and not any(k in c.detail for c in edits)
                   and not (k in before and k in after and _rewired_to_logged(before[k], after[k], logged))
                   and not (_inner_names(result.graph, k) & named)]
        if escaped:
            raise EscapedEdit(f"pass {pass_.name} changed {len(escaped)} node(s) without logging it: "
                              f"{', '.join(escaped[:5])}{' ...' if len(escaped) > 5 else ''}")
        if not edits and self._top_sig(result.graph) != self._top:
            raise EscapedEdit(f"pass {pass_.name} changed the graph's inputs, outputs or opset without logging it")
