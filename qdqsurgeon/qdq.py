"""Q/DQ-level queries and edits shared by the placement passes.

Terms: a *pair* on tensor ``t`` is ``t ─ Q ─ DQ``; a consumer *reads t quantized* when its input
is the output of such a DQ. A tensor is *uniformly quantized* when every consumer of it is a Q
with identical parameters (rule C1: only then may TensorRT move the Q into the producer).
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import numpy as np
import onnx_graphsurgeon as gs

from .graph import is_constant, is_dq, is_graph_output, is_q, producer, qparams, qparams_key, same_qparams
from .rewriter import Rewriter
from .trt_rules import (data_input_indices, fuses_after, gelu_region, is_epilogue, is_residual_add, is_silu_mul, is_weighted,
                        residual_add_joins_chain)

__all__ = [
    "pair_reading",
    "pairs_on",
    "source_of",
    "uniform_q",
    "agreed_q_readers",
    "agreed_dq_sources",
    "scale_of",
    "ensure_pair",
    "dequantized_input",
    "duplicates",
    "cancels",
    "conv_chain",
    "conv_chain_head",
    "reads_fused_chain",
    "chain_is_exclusive",
    "int8_readers",
    "drop_float_only_pairs",
    "unquantize_graph_output",
]

logger = logging.getLogger(__name__)


def pair_reading(tensor: gs.Tensor) -> tuple[gs.Node, gs.Node] | None:
    """If ``tensor`` is the output of DQ(Q(x)), the (Q, DQ) pair; else None."""
    dq = producer(tensor)
    if not is_dq(dq):
        return None
    q = producer(dq.inputs[0])
    if not is_q(q):
        return None
    return q, dq


def source_of(tensor: gs.Tensor) -> gs.Tensor:
    """The float tensor a DQ(Q(x)) output stands for (``x``), or ``tensor`` itself."""
    pair = pair_reading(tensor)
    return pair[0].inputs[0] if pair else tensor


def _same_attrs(a: gs.Node, b: gs.Node) -> bool:
    keys = set(a.attrs) | set(b.attrs)
    defaults = {"saturate": 1, "axis": 1, "block_size": 0}
    return all(a.attrs.get(k, defaults.get(k)) == b.attrs.get(k, defaults.get(k)) for k in keys)


def duplicates(a: gs.Node, b: gs.Node) -> bool:
    """Two Qs (or two DQs) reading one tensor that are one quantizer: same parameters and attributes.
    TensorRT merges them (P6, E8.7); dedupe-qdq and the static analysis ask this one question."""
    return a.op == b.op and (is_q(a) or is_dq(a)) and same_qparams(a, b) and _same_attrs(a, b)


def cancels(dq: gs.Node | None, q: gs.Node | None) -> bool:
    """``DQ → Q`` with identical parameters is an identity round trip: TensorRT removes it (C1) and
    fold-qdq-pairs folds it; the static analysis and the pass ask this one question."""
    return (dq is not None and q is not None and is_dq(dq) and is_q(q) and q.attrs.get("saturate", 1) == 1
            and same_qparams(dq, q))


def pairs_on(tensor: gs.Tensor) -> list[tuple[gs.Node, gs.Node]]:
    """Every (Q, DQ) pair whose Q reads ``tensor``."""
    out = []
    for q in tensor.outputs:
        if is_q(q):
            out.extend((q, dq) for dq in q.outputs[0].outputs if is_dq(dq))
    return out


def uniform_q(graph: gs.Graph, tensor: gs.Tensor) -> list[gs.Node] | None:
    """The Q consumers of ``tensor`` when every consumer is a Q with identical parameters (C1)."""
    readers = _agreed_readers([tensor], lambda t: is_graph_output(graph, t), is_q, qparams_key)
    return None if readers is None else readers[0]


def _agreed_readers(tensors: Iterable[gs.Tensor], is_output: Callable[[gs.Tensor], bool],
                    accept: Callable[[gs.Node], bool], key: Callable[[gs.Node], tuple | None]) -> list[list[gs.Node]] | None:
    found: list[list[gs.Node]] = []
    common = None
    for t in tensors:
        readers = list(t.outputs)
        if not readers or is_output(t) or not all(accept(r) for r in readers):
            return None
        for r in readers:
            k = key(r)
            if k is None or (common is not None and k != common):
                return None
            common = k
        found.append(readers)
    return found


def agreed_q_readers(node: gs.Node, *, is_output: Callable[[gs.Tensor], bool], accept: Callable[[gs.Node], bool] = is_q,
                     key: Callable[[gs.Node], tuple | None] = qparams_key) -> list[list[gs.Node]] | None:
    """C1, the condition for carrying quantization backward across the commuting ``node``: every
    reader of every output is a Q (``accept``) and they are all one quantizer (one ``key``, by default
    :func:`qparams_key`), no output being a graph output. The readers of each output, else None.

    move-qdq copies a pair back across ``node`` when it holds; the static analysis moves TensorRT's
    Q into ``node`` when it holds (and each output has one reader left after merging duplicates).
    """
    return _agreed_readers(node.outputs, is_output, accept, key)


def agreed_dq_sources(node: gs.Node, dq_of: Callable[[gs.Tensor], gs.Node | None],
                      key: Callable[[gs.Node], tuple | None] = qparams_key) -> list[tuple[int, gs.Node]] | None:
    """The other direction (P4, P5): every data input of the commuting ``node`` is the output of a
    DQ (``dq_of``) and they are all one quantizer, so the DQ can move after ``node``; the
    (input index, DQ) pairs, else None. With unequal scales the DQs stay where they are."""
    idx = [i for i in data_input_indices(node) if node.inputs[i] is not None and node.inputs[i].name]
    srcs = [(i, dq_of(node.inputs[i])) for i in idx]
    if not srcs or any(d is None for _, d in srcs):
        return None
    keys = {key(d) for _, d in srcs}
    if len(keys) != 1 or None in keys:
        return None
    return srcs


def scale_of(node: gs.Node) -> np.ndarray | None:
    qp = qparams(node)
    return None if qp is None else qp.scale


def ensure_pair(rw: Rewriter, tensor: gs.Tensor, consumers: Iterable[gs.Node], scale: np.ndarray, *,
                detail: str, rule: str) -> gs.Tensor:
    """Make ``consumers`` read ``tensor`` through a per-tensor pair with ``scale``.

    Reuses an existing pair on ``tensor`` with that exact scale (P6) before inserting a new one.
    Returns the DQ output the consumers now read.
    """
    scale = np.asarray(scale)
    if tensor.dtype is not None and np.dtype(tensor.dtype) == np.float16:
        scale = scale.astype(np.float16)  # a Q's scale has its input's type (opset 19)
    elif scale.dtype != np.float16:
        scale = scale.astype(np.float32)
    scale = scale.reshape(())
    consumers = [c for c in consumers]
    for q, dq in pairs_on(tensor):
        qp = qparams(q)
        if qp is not None and not qp.per_channel and qp.scale.dtype == scale.dtype and np.array_equal(qp.scale.reshape(()), scale) \
                and (qp.zero_point is None or (qp.zero_point.dtype == np.int8 and not np.any(qp.zero_point))):
            out = dq.outputs[0]
            for c in consumers:
                for i, t in enumerate(c.inputs):
                    if t is tensor:
                        rw.set_input(c, i, out, detail=f"share {q.name}: {detail}", rule=rule)
            return out
    _, _, out = rw.insert_qdq(tensor, scale, np.zeros((), np.int8), consumers=consumers, detail=detail, rule=rule)
    return out


def dequantized_input(rw: Rewriter, node: gs.Node, index: int, *, detail: str, rule: str) -> bool:
    """Make ``node`` read the float source of its quantized input ``index``; the pair stays for others."""
    t = node.inputs[index]
    pair = pair_reading(t)
    if pair is None:
        return False
    rw.set_input(node, index, pair[0].inputs[0], detail=detail, rule=rule)
    return True


def _gelu_ending_at(t: gs.Tensor) -> tuple[list[gs.Node], gs.Tensor] | None:
    """The Erf-form GELU region (:func:`trt_rules.gelu_region`) whose output is ``t``: (its nodes, its input)."""
    last = producer(t)
    if last is None or last.op not in ("Mul", "Div"):  # the region ends in ·0.5, ·(1+erf) or /2
        return None
    seen: set[int] = set()
    frontier = [t]
    for _ in range(5):  # the region has five nodes: its input is at most five producers up
        nxt = []
        for cur in frontier:
            node = producer(cur)
            if node is None:
                continue
            for x in node.inputs:
                if x is None or id(x) in seen or is_constant(x):
                    continue
                seen.add(id(x))
                region = gelu_region(x)
                if region is not None and region[1] is t:
                    return region[0], x
                nxt.append(x)
        frontier = nxt
    return None


def conv_chain(tensor: gs.Tensor, *, exclusive: bool = True) -> list[gs.Node] | None:
    """The nodes of the fused chain (F3 epilogues) that produces ``tensor``, weighted head first, or None.

    Walks back through BN, ReLU/Clip/LeakyReLU/HardSigmoid/HardSwish, bias Add, SiLU (Sigmoid·Mul)
    and an Erf-form GELU, keeping only links that fuse after the head (F9: no BN after
    ConvTranspose): the same chain the static analysis walks forward. With ``exclusive`` every
    intermediate tensor must feed only the chain (otherwise TensorRT cannot fuse it into one kernel
    with a residual Add).
    """
    t = tensor
    nodes: list[gs.Node] = []
    for _ in range(16):
        node = producer(t)
        if node is None:
            return None
        if exclusive and len(t.outputs) > 1 and not _silu_fanout_ok(t):
            return None
        if is_weighted(node):
            if not all(fuses_after(n, node) for n in nodes):
                return None
            return [node, *reversed(nodes)]
        if is_silu_mul(node):
            sig = next((i for i in node.inputs if producer(i) is not None and producer(i).op == "Sigmoid"), None)
            nodes += [node] + ([producer(sig)] if sig is not None else [])
            t = next((i for i in node.inputs if i is not sig), node.inputs[0])
            continue
        if not is_epilogue(node) or is_residual_add(node):
            gelu = _gelu_ending_at(t)
            if gelu is None:
                return None
            nodes += list(reversed(gelu[0]))
            t = gelu[1]
            continue
        data = [i for i in node.inputs if not is_constant(i)]
        if len(data) != 1:
            return None
        nodes.append(node)
        t = data[0]
    return None


def conv_chain_head(tensor: gs.Tensor, *, exclusive: bool = True) -> gs.Node | None:
    """The weighted op whose fused chain (:func:`conv_chain`) produces ``tensor``, or None."""
    chain = conv_chain(tensor, exclusive=exclusive)
    return chain[0] if chain else None


def reads_fused_chain(node: gs.Node, tensor: gs.Tensor) -> bool:
    """Whether epilogue ``node`` reading ``tensor`` (through a pair or not) belongs to the fused chain
    of the weighted op behind it (F3): a pair there splits the chain. remove-misplaced-qdq takes such
    pairs out and quantize-pooling must not put them in; both ask this."""
    if not is_epilogue(node):
        return False
    chain = conv_chain(source_of(tensor), exclusive=False)
    if chain is None:
        return False
    # E8.1: a residual Add after an activation is a PointWise layer of its own, not part of the chain;
    # its pair on the branch is the placement quantize-residual chooses there.
    return not is_residual_add(node) or residual_add_joins_chain(chain)


def wraps_standalone(node: gs.Node) -> bool:
    """Whether ``node`` is an op TensorRT runs in INT8 on its own when fully wrapped in Q/DQ (P7).

    Quantizable ops that are not epilogues (F3, F5, F10): an epilogue op (ReLU, Clip, BN,
    HardSwish, a bias or residual Add, SiLU's halves) belongs to a conv chain or reads float.
    quantize-pooling wraps exactly these ops and drop_float_only_pairs counts them as INT8
    readers; one question, so one pass never adds a pair the other removes (issue 12 item 2).
    """
    from .trt_rules import is_quantizable_wrapped

    return is_quantizable_wrapped(node) and not is_epilogue(node)


def _silu_fanout_ok(t: gs.Tensor) -> bool:
    """x feeding exactly Sigmoid(x) and Mul(x, Sigmoid(x)) is still one fusible SiLU."""
    readers = t.outputs
    return len(readers) == 2 and {n.op for n in readers} == {"Sigmoid", "Mul"} and any(is_silu_mul(n) for n in readers)


def chain_is_exclusive(head: gs.Node, tensor: gs.Tensor) -> bool:
    return conv_chain_head(tensor, exclusive=True) is head


def int8_readers(graph: gs.Graph, tensor: gs.Tensor, depth: int = 0) -> bool:
    """Whether any reader of ``tensor`` (a DQ output) can take it as INT8 in TensorRT.

    INT8 readers: a weighted op's activation, a Q (requantize or a shared pair), an Add or other
    op that quantize-residual/quantize-pooling may keep quantized, or a commuting op whose own
    output has such a reader. Anything else (epilogues, float-only ops, graph outputs, a weighted
    op that was excluded and reads its weight in float) takes float.
    """
    from .trt_rules import commutes, weight_input_index

    if depth > 16:
        return True  # be conservative on very long commuting chains
    for n in tensor.outputs:
        if is_q(n):
            if any(n.outputs[0].outputs) or is_graph_output(graph, n.outputs[0]):
                return True
            continue  # an orphaned Q (its DQ was just removed) reads nothing for anyone
        if is_weighted(n):
            widx = weight_input_index(n)
            if widx is not None and n.inputs[widx] is not tensor and is_dq(producer(n.inputs[widx])):
                return True
            continue
        if n.op == "MatMul" and all(is_dq(producer(t)) for t in n.inputs[:2]):
            return True  # a MatMul of two activations quantized on both sides (attention GEMMs, --quantize-bmm)
        if commutes(n):
            if any(int8_readers(graph, o, depth + 1) for o in n.outputs):
                return True
            continue
        if wraps_standalone(n):
            return True
        if is_residual_add(n):
            return True
    return False


def drop_float_only_pairs(graph: gs.Graph, rw: Rewriter, *, rule: str) -> None:
    """Remove activation Q/DQ pairs no reader can use in INT8 (they would be a Quantize + Dequantize kernel).

    Walks from the outputs back, so a pair that only fed another float-only pair goes too.
    Exact in the other direction: the readers get the float value the pair approximated.
    """
    for node in reversed(list(graph.nodes)):
        if rw.is_removed(node) or not is_dq(node):
            continue
        q = producer(node.inputs[0])
        if not is_q(q) or is_constant(q.inputs[0]):
            continue  # weights are quantized for their op, not for readers downstream
        out = node.outputs[0]
        if is_graph_output(graph, out) or int8_readers(graph, out):
            continue
        rw.replace_uses(out, q.inputs[0], detail=f"{node.name} only feeds float layers", rule=rule)
        rw.remove_node(node, detail="Q/DQ pair read only in float: it would run as standalone kernels (P2)", rule=rule)
        if not q.outputs[0].outputs:
            rw.remove_node(q, detail="its only DQ was removed", rule=rule)


def unquantize_graph_output(graph: gs.Graph, rw: Rewriter, q: gs.Node, dq: gs.Node, *, detail: str, rule: str) -> None:
    """The graph output written by ``dq`` comes from the Q's float input instead (P9).

    Interior readers of the DQ keep reading it (they may be INT8 layers); the pair is removed only
    when the graph output was its last reader.
    """
    out = dq.outputs[0]
    if any(not rw.is_removed(n) for n in out.outputs):
        rw.redirect_output(out, q.inputs[0], detail=f"graph output {out.name} reads the float tensor", rule=rule)
        return
    rw.replace_uses(out, q.inputs[0], detail=f"graph output {out.name} reads the float tensor", rule=rule)
    rw.remove_node(dq, detail=detail, rule=rule)
    if not q.outputs[0].outputs:
        rw.remove_node(q, detail="its only DQ was removed", rule=rule)
