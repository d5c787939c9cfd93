"""The one choke point through which passes edit a graph, so the change log is complete by construction.

Every structural edit (add, remove, rewire, attribute or constant change) goes through a
:class:`Rewriter`, which records a :class:`Change`. Nodes that gs ``cleanup()`` drops because
an edit orphaned them are recorded too (kind ``cleanup``).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from .graph import (DQ_OP, Q_OP, cleanup_graph, dtype_name, is_graph_output, nested_nodes, new_constant, new_node, new_variable,
                    toposort_graph, used_names)

__all__ = ["Change", "Rewriter"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Change:
    """One edit: which pass made it, under which TensorRT rule, what kind, on which node, and why."""

    pass_name: str
    rule: str
    kind: str
    node: str
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"pass": self.pass_name, "rule": self.rule, "kind": self.kind, "node": self.node, "detail": self.detail}


def _fmt(values: np.ndarray) -> str:
    flat = np.asarray(values).ravel()
    if flat.size == 1:
        return f"{flat[0]:.9g}"
    head = ", ".join(f"{v:.6g}" for v in flat[:4])
    return f"[{head}{', ...' if flat.size > 4 else ''}] ({flat.size} values)"


class Rewriter:
    """Edits ``graph`` on behalf of one pass and logs each edit as a :class:`Change`."""

    def __init__(self, graph: gs.Graph, pass_name: str, *, record: bool = True) -> None:
        self.graph = graph
        self.pass_name = pass_name
        # record=False: the same edits with no change log (the static analysis simulating TensorRT on its own copy).
        self.record = record
        self.changes: list[Change] = []
        self.removed: set[int] = set()
        self._rule = ""
        # The names in use when the pass starts, taken lazily (most passes add nothing): before the
        # first edit that can drop a name from the graph, or at the first fresh name.
        self._names_at_start: set[str] | None = None

    # -- bookkeeping -------------------------------------------------------------------------
    @contextlib.contextmanager
    def rule(self, rule: str) -> Iterator[None]:
        """Default rule ID for the edits made inside the block."""
        old, self._rule = self._rule, rule
        try:
            yield
        finally:
            self._rule = old

    def log(self, kind: str, node: str, detail: str, rule: str | None = None) -> None:
        if not self.record:
            return
        change = Change(self.pass_name, rule or self._rule or "-", kind, node, detail)
        self.changes.append(change)
        logger.debug("%s [%s] %s %s: %s", change.pass_name, change.rule, kind, node, detail)

    def note(self, node: gs.Node | str, detail: str, rule: str | None = None) -> None:
        """A finding that changes nothing in the graph but belongs in the report."""
        self.log("note", node if isinstance(node, str) else node.name, detail, rule)

    @property
    def edited(self) -> bool:
        """Whether an edit (not a note) was logged: every edit method logs one, so a pass that edited
        nothing left the graph as it was (and its cleanup can be skipped)."""
        return any(c.kind != "note" for c in self.changes)

    @property
    def _names(self) -> set[str]:
        return self._snapshot_names()

    def _snapshot_names(self) -> set[str]:
        if self._names_at_start is None:
            self._names_at_start = used_names(self.graph)
        return self._names_at_start

    def fresh_name(self, base: str) -> str:
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def is_removed(self, node: gs.Node) -> bool:
        return id(node) in self.removed

    # -- creation ----------------------------------------------------------------------------
    def constant(self, base: str, values: np.ndarray) -> gs.Constant:
        return new_constant(self.fresh_name(base), np.asarray(values))

    def add_node(
        self,
        op: str,
        inputs: Sequence[gs.Tensor | None],
        *,
        name: str,
        attrs: dict[str, Any] | None = None,
        outputs: Sequence[gs.Tensor] | None = None,
        out_dtype: Any = None,
        out_shape: Any = None,
        detail: str = "",
        rule: str | None = None,
        domain: str | None = None,
    ) -> gs.Node:
        node_name = self.fresh_name(name)
        if outputs is None:
            outputs = [new_variable(self.fresh_name(f"{node_name}_output"), out_dtype, out_shape)]
        ins = [t if t is not None else new_variable("") for t in inputs]
        node = new_node(op, node_name, dict(attrs or {}), ins, list(outputs), domain)
        self.graph.nodes.append(node)
        self.log("add", node_name, detail or f"add {op}", rule)
        return node

    def insert_qdq(
        self,
        tensor: gs.Tensor,
        scale: np.ndarray,
        zero_point: np.ndarray,
        *,
        axis: int | None = None,
        consumers: Sequence[gs.Node] | None = None,
        name: str | None = None,
        detail: str = "",
        rule: str | None = None,
    ) -> tuple[gs.Node, gs.Node, gs.Tensor]:
        """Put Q→DQ on ``tensor`` and feed its output to ``consumers`` (default: all of them).

        Graph outputs keep reading the original tensor: Q/DQ never lands on a graph output (P9).
        """
        base = name or tensor.name
        attrs = {} if axis is None else {"axis": int(axis)}
        scale = np.asarray(scale)
        # The scale type is the precision of the DQ output (trt-rules section 1): float16 data keeps float16 scales.
        keep = scale.dtype in (np.float16, np.float32) or dtype_name(scale.dtype) == "bfloat16"
        scale_c = self.constant(f"{base}_scale", scale if keep else scale.astype(np.float32))
        zp_c = self.constant(f"{base}_zero_point", np.asarray(zero_point))
        q_out = new_variable(self.fresh_name(f"{base}_quantized"), np.asarray(zero_point).dtype, tensor.shape)
        # Without a known type, the DQ's output type is its scale's type (opset 19 semantics, V1).
        dq_out = new_variable(self.fresh_name(f"{base}_dequantized"), tensor.dtype or scale_c.values.dtype, tensor.shape)
        targets = list(tensor.outputs) if consumers is None else list(consumers)
        q = self.add_node(Q_OP, [tensor, scale_c, zp_c], name=f"{base}_QuantizeLinear", attrs=attrs,
                          outputs=[q_out], detail=detail or f"quantize {tensor.name}", rule=rule)
        dq = self.add_node(DQ_OP, [q_out, scale_c, zp_c], name=f"{base}_DequantizeLinear", attrs=attrs,
                           outputs=[dq_out], detail=detail or f"dequantize {tensor.name}", rule=rule)
        for node in targets:
            if node is q:
                continue
            for i, inp in enumerate(node.inputs):
                if inp is tensor:
                    node.inputs[i] = dq_out
        return q, dq, dq_out

    # -- rewiring ----------------------------------------------------------------------------
    def set_input(self, node: gs.Node, index: int, tensor: gs.Tensor, *, detail: str = "", rule: str | None = None) -> None:
        self._rebind(node, node.inputs, "input", index, tensor, detail, rule)

    def set_output(self, node: gs.Node, index: int, tensor: gs.Tensor, *, detail: str = "", rule: str | None = None) -> None:
        """Make ``node`` write ``tensor`` as its output ``index`` (its old output loses its producer)."""
        self._rebind(node, node.outputs, "output", index, tensor, detail, rule)

    def _rebind(self, node: gs.Node, slots: list, what: str, index: int, tensor: gs.Tensor, detail: str,
                rule: str | None) -> None:
        self._snapshot_names()  # this edit can drop a name from the graph
        old = slots[index]
        if old is tensor:
            return
        slots[index] = tensor
        self.log("rewire", node.name, detail or f"{what} {index}: {old.name} -> {tensor.name}", rule)

    def replace_uses(
        self,
        old: gs.Tensor,
        new: gs.Tensor,
        *,
        exclude: Sequence[gs.Node] = (),
        detail: str = "",
        rule: str | None = None,
    ) -> int:
        """Make every consumer of ``old`` (except ``exclude``) read ``new``; returns how many inputs moved.

        If ``old`` is a graph output, the output keeps its name: ``new`` is renamed to it when
        it is a plain intermediate tensor, else an Identity bridges the two.
        """
        self._snapshot_names()  # this edit can drop a name from the graph
        moved = 0
        skip = {id(n) for n in exclude}
        for node in list(old.outputs):
            if id(node) in skip:
                continue
            for i, inp in enumerate(node.inputs):
                if inp is old:
                    node.inputs[i] = new
                    moved += 1
                    self.log("rewire", node.name, detail or f"input {i}: {old.name} -> {new.name}", rule)
        if is_graph_output(self.graph, old):
            self._redirect_output(old, new, detail, rule)
            moved += 1
        return moved

    def redirect_output(self, old: gs.Tensor, new: gs.Tensor, *, detail: str = "", rule: str | None = None) -> None:
        """Make the graph output ``old`` come from ``new`` (keeping the output's name); other readers of ``old`` stay."""
        self._redirect_output(old, new, detail, rule)

    def _redirect_output(self, old: gs.Tensor, new: gs.Tensor, detail: str, rule: str | None) -> None:
        self._snapshot_names()  # this edit can drop a name from the graph
        idx = next(i for i, t in enumerate(self.graph.outputs) if t is old)
        is_io = any(t is new for t in self.graph.inputs) or is_graph_output(self.graph, new) or isinstance(new, gs.Constant)
        if is_io:
            out = new_variable(self.fresh_name(old.name + "_bridge"), old.dtype, old.shape)
            self.add_node("Identity", [new], name=old.name + "_Identity", outputs=[out], detail="keep graph output name", rule=rule)
            new = out
        name = old.name
        old.name = self.fresh_name(name + "_replaced")
        self._names.add(name)
        new.name = name
        if new.dtype is None:
            new.dtype = old.dtype
        if new.shape is None:
            new.shape = old.shape
        self.graph.outputs[idx] = new
        self.log("rewire", name, detail or f"graph output {name} now produced upstream", rule)

    def bypass(self, node: gs.Node, *, detail: str = "", rule: str | None = None) -> None:
        """Remove a one-input, one-output node, connecting its input straight to its consumers."""
        src, dst = node.inputs[0], node.outputs[0]
        self.replace_uses(dst, src, exclude=(), detail=f"bypass {node.name}", rule=rule)
        self.remove_node(node, detail=detail or f"remove {node.op}", rule=rule)

    def remove_node(self, node: gs.Node, *, detail: str = "", rule: str | None = None) -> None:
        """Disconnect ``node``; its outputs must no longer be read."""
        self._snapshot_names()  # this edit can drop a name from the graph
        node.inputs.clear()
        node.outputs.clear()
        self.removed.add(id(node))
        if not self.record:  # no log refers to the name, so a later node may take it
            self._names.discard(node.name)
        self.log("remove", node.name, detail or f"remove {node.op}", rule)

    def set_attr(self, node: gs.Node, key: str, value: Any, *, detail: str = "", rule: str | None = None) -> None:
        old = node.attrs.get(key, "<unset>")
        if key in node.attrs and _equal(old, value):
            return
        node.attrs[key] = value
        self.log("attr", node.name, detail or f"{key}: {old} -> {value}", rule)

    def set_constant(self, node: gs.Node, index: int, values: np.ndarray, *, base: str | None = None,
                     detail: str = "", rule: str | None = None) -> gs.Constant:
        """Give input ``index`` of ``node`` a new constant (e.g. a scale), logging old and new values.

        ``index`` may be one past the last input: an optional input (a Conv's bias) is added."""
        old = node.inputs[index] if index < len(node.inputs) else None
        old_values = old.values if isinstance(old, gs.Constant) else None
        new = self.constant(base or f"{node.name}_in{index}", values)
        if index == len(node.inputs):
            node.inputs.append(new)
        else:
            node.inputs[index] = new
        what = f"{_fmt(old_values)} -> {_fmt(new.values)}" if old_values is not None else f"-> {_fmt(new.values)}"
        self.log("constant", node.name, f"{detail}: {what}" if detail else f"input {index}: {what}", rule)
        return new

    def set_dtype(self, tensor: gs.Tensor, dtype: Any, *, node: gs.Node | None = None, detail: str = "",
                  rule: str | None = None) -> None:
        """Declare ``tensor``'s element type (a retyped output, a graph input made float16); logged
        on ``node`` (the tensor's producer by default) or, for a graph input, on the tensor."""
        old = tensor.dtype
        if old is not None and np.dtype(old) == np.dtype(dtype):
            return
        tensor.dtype = np.dtype(dtype)
        owner = node if node is not None else (tensor.inputs[0] if tensor.inputs else None)
        self.log("retype", owner.name if owner is not None else tensor.name,
                 detail or f"{tensor.name}: {np.dtype(old).name if old is not None else '?'} -> {np.dtype(dtype).name}", rule)

    def set_opset(self, version: int, *, detail: str = "", rule: str | None = None) -> None:
        """Set the default-domain opset (graph and opset import) to ``version``; logged on ``<model>``."""
        old = self.graph.opset
        if old == version:
            return
        self.graph.opset = version
        for imp in self.graph.import_domains or []:
            if imp.domain in ("", "ai.onnx"):
                imp.version = version
        self.log("opset", "<model>", detail or f"opset {old} -> {version}", rule)

    # -- cleanup -----------------------------------------------------------------------------
    def cleanup(self) -> None:
        """Drop orphaned nodes, logging those the pass did not remove itself, and re-sort."""
        before = {id(n): n for n in self.graph.nodes}
        inner = {id(n): (n, path[0][0]) for n, path in nested_nodes(self.graph)}
        cleanup_graph(self.graph)
        after = {id(n) for n in self.graph.nodes}
        for key, node in before.items():
            if key not in after and key not in self.removed:
                self.removed.add(key)
                self.log("cleanup", node.name, f"{node.op} orphaned by {self.pass_name}, removed", "cleanup")
        if inner:  # gs's cleanup also drops dead nodes inside If/Loop bodies: logged on their top-level node
            left = {id(n) for n, _ in nested_nodes(self.graph)}
            for key, (node, top) in inner.items():
                if key not in left and key not in self.removed:
                    self.removed.add(key)
                    self.log("cleanup", top.name, f"{node.op} {node.name} in the body of {top.name} is dead, removed",
                             "cleanup")
        toposort_graph(self.graph)


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    except Exception:
        return a == b
