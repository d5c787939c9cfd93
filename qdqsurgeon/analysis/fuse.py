"""Step 3 of the static TensorRT model: which nodes fuse into which kernel, and in which precision.

A weighted op and its epilogue chain (F1, F3, F5, F10, GELU) are one kernel; other quantizable ops
run INT8 only fully wrapped (P7); attention with Q/DQ before both batch GEMMs is one MHA kernel.
Works on the propagated graph of :mod:`.simulate`; :mod:`.predict` turns the result into the report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from .. import trt_rules as R
from ..graph import is_dq, is_q, producer, weight_input_index

from .simulate import _Sim

logger = logging.getLogger(__name__)

@dataclass
class _Chain:
    head: gs.Node
    members: list[gs.Node]
    end: gs.Tensor
    int8_in: bool
    int8_out: bool
    residual: gs.Node | None
    skip_dq: gs.Node | None
    reason: str


def _fuse(sim: _Sim):
    """Step 3: fusion and precision. Returns (chains, absorbed DQ edges, absorbed Qs, node reasons)."""
    claimed: set[int] = set()
    absorbed_edges: set[tuple[int, int]] = set()
    absorbed_q: set[int] = set()
    float_reason: dict[int, tuple[str, str]] = {}  # node id -> (rule, why it runs float)
    end_reason: dict[int, tuple[str, str]] = {}  # tensor id -> (rule, why its producer writes float)
    chains: list[_Chain] = []
    int8_units: list[gs.Node] = []

    def single_q_reader(t: gs.Tensor) -> gs.Node | None:
        if sim.is_graph_output(t) or len(t.outputs) != 1:
            return None
        c = t.outputs[0]
        return c if sim.act_q(c) else None

    for n in sim.nodes:
        rule = R.rule_for(n.op)
        if rule is None or rule.role != "weighted" or id(n) in claimed or not n.outputs:
            continue
        widx = weight_input_index(n)
        if widx is None:
            if len(rule.data_inputs) < 2:
                continue
            act_idx = list(rule.data_inputs)  # activation x activation GEMM (attention): INT8 with both from DQs
        else:
            act_idx = [i for i in rule.data_inputs if i != widx]
        missing_act = [i for i in act_idx if sim.dq_of(n.inputs[i]) is None]
        weight_ok = widx is None or sim.qweight(n.inputs[widx])
        int8_in = not missing_act and weight_ok
        if missing_act:
            reason = ("F1", f"{n.name}: activation input not from a DQ; runs float"
                      + (" with its quantized weight dequantized (weight-only)" if widx is not None and weight_ok else ""))
        elif not weight_ok:
            reason = ("F1", f"{n.name}: weight not quantized (no DQ); runs float")
        else:
            reason = ("", "")
        members = [n]
        t = n.outputs[0]
        residual = skip_dq = None
        while not sim.is_graph_output(t):
            cons = list(t.outputs)
            if len(cons) == 1 and id(cons[0]) not in claimed:
                e = cons[0]
                er = R.rule_for(e.op)
                if residual is None and R.is_residual_add(e):
                    other = e.inputs[1] if e.inputs[0] is t else e.inputs[0]
                    if other is t:
                        break
                    if not R.residual_add_joins_chain(members, sim.version):
                        break  # E8.1: after an activation the Add is a PointWise layer of its own
                    residual, skip_dq = e, sim.dq_of(other)
                elif (R.is_epilogue(e) and not R.is_residual_add(e) and not R.is_silu_mul(e)
                      and er is not None and n.op in er.fuses_after):
                    pass
                else:
                    break
                members.append(e)
                claimed.add(id(e))
                t = e.outputs[0]
                continue
            if len(cons) == 2:  # SiLU: t feeds Sigmoid and Mul(t, Sigmoid(t)) (F10)
                sig = next((c for c in cons if R.is_silu_sigmoid(c)), None)
                mul = next((c for c in cons if R.is_silu_mul(c) and not R.is_silu_sigmoid(c)), None)
                if (sig is not None and mul is not None and id(sig) not in claimed and id(mul) not in claimed
                        and list(sig.outputs[0].outputs) == [mul] and any(x is t for x in mul.inputs)):
                    members += [sig, mul]
                    claimed.update((id(sig), id(mul)))
                    t = mul.outputs[0]
                    continue
            # Erf-form GELU after a GEMM/conv: one epilogue (F3; seen fused in NVIDIA/TensorRT#4397).
            gelu = R.gelu_region(t) if n.op in R.RULES["Gelu"].fuses_after else None
            if gelu is not None and not any(id(g) in claimed or sim.is_graph_output(g.outputs[0]) for g in gelu[0][:-1]):
                members += gelu[0]
                claimed.update(id(g) for g in gelu[0])
                t = gelu[1]
                continue
            break
        end_q = single_q_reader(t)
        skip_ok = residual is None or skip_dq is not None
        int8_out = int8_in and end_q is not None and skip_ok
        if int8_in:
            for i in act_idx:
                absorbed_edges.add((id(sim.dq_of(n.inputs[i])), id(n)))
        if int8_out:
            absorbed_q.add(id(end_q))
            if skip_dq is not None:
                absorbed_edges.add((id(skip_dq), id(residual)))
            # F11: an INT8 MaxPool reading the chain's INT8 output joins the kernel (ConvActPool).
            readers = list(end_q.outputs[0].outputs)
            if len(readers) == 1 and id(readers[0]) in sim.int8_ops and R.fuses_with_conv_act(readers[0]):
                members.append(readers[0])
        if not int8_in:
            end_reason[id(t)] = reason
        elif residual is not None and skip_dq is None:
            end_reason[id(t)] = ("F5", f"residual {residual.name} has a float skip operand, so the fused "
                                       f"{n.name} chain writes float")
        elif not int8_out:
            end_reason[id(t)] = ("F2", f"{n.name} chain output is not read by a single Q; it writes float")
        if residual is not None and skip_dq is not None and not int8_out:
            float_reason[id(residual)] = ("F5", f"{residual.name} fused into {n.name} writes float, so its skip "
                                                f"operand must be dequantized")
        if not int8_in:
            float_reason[id(n)] = reason
            for m in members[1:]:
                float_reason[id(m)] = reason
        chains.append(_Chain(n, members, t, int8_in, int8_out, residual, skip_dq, reason[1]))

    # Non-weighted compute: INT8 only fully wrapped (P7), float otherwise.
    for n in sim.nodes:
        if id(n) in claimed or is_q(n) or is_dq(n) or id(n) in sim.int8_ops or R.is_shape_op(n):
            continue
        rule = R.rule_for(n.op)
        if rule is not None and rule.role == "weighted":
            continue
        if R.is_silu_sigmoid(n):
            continue  # judged together with its Mul
        unit = [n]
        if R.is_silu_mul(n):
            sig = next(producer(t) for t in n.inputs if producer(t) is not None and R.is_silu_sigmoid(producer(t)))
            data = [sig.inputs[0]]
            unit = [sig, n]
        elif R.is_quantizable_wrapped(n) and not R.is_float_only(n):
            # Constant operands (also DQ'd constants, e.g. ORT's quantized anchors) need no DQ of their own.
            data = [n.inputs[i] for i in R.data_input_indices(n) if not sim.const_path(n.inputs[i])]
        else:
            why = ("P9", f"{n.name} ({n.op}) has no INT8 kernel; runs float") if rule is not None else \
                ("P9", f"{n.name} ({n.op}) is not in the TensorRT rules table; assumed float")
            if rule is not None and rule.role == "commuting":
                why = ("C1", f"{n.name} ({n.op}) commutes but its Q/DQ could not move through it "
                             f"(unquantized input, readers disagree, or unequal scales P4/P5); runs float")
            float_reason[id(n)] = why
            for o in n.outputs:
                end_reason[id(o)] = why
            continue
        out = unit[-1].outputs[0] if unit[-1].outputs else None
        dqs = [sim.dq_of(t) for t in data]
        end_q = single_q_reader(out) if out is not None and len(unit[-1].outputs) == 1 else None
        if data and all(d is not None for d in dqs) and end_q is not None:
            for d in dqs:
                absorbed_edges.add((id(d), id(unit[0])))
                if len(unit) > 1:
                    absorbed_edges.add((id(d), id(unit[-1])))
            absorbed_q.add(id(end_q))
            int8_units.extend(unit)
            continue
        missing = "its output is not read by a single Q" if all(d is not None for d in dqs) and data else \
            "not every data input comes from a DQ"
        why = ("P7", f"{n.name} ({n.op}) is not fully wrapped in Q/DQ ({missing}); runs float")
        for u in unit:
            float_reason[id(u)] = why
        if out is not None:
            end_reason[id(out)] = why
    _fuse_mha(sim, chains, absorbed_q)
    return chains, absorbed_edges, absorbed_q, float_reason, end_reason, int8_units


def _fuse_mha(sim: _Sim, chains: list[_Chain], absorbed_q: set[int]) -> None:
    """Attention with Q/DQ before both batch GEMMs fuses into one MHA kernel (NVIDIA/TensorRT#3243).

    ``MatMul(DQ, DQ) → [scale, mask] → Softmax → Q → DQ → MatMul(·, DQ)``: the Quantize of the
    Softmax output is inside the fused kernel, not a layer of its own. A maintainer's statement
    (explicit quantization needs Q/DQ before the two batch GEMMs for INT8 MHA fusion); the kernel
    boundaries of 10.x/11.x Myelin MHA are not in our engine dumps.
    """
    int8_heads = {id(c.head) for c in chains if c.int8_in}
    for score, context in R.attention_gemms(sim.g):
        if id(score) not in int8_heads or id(context) not in int8_heads:
            continue
        dq = sim.dq_of(context.inputs[0])
        q = producer(dq.inputs[0]) if dq is not None else None
        soft = producer(q.inputs[0]) if sim.act_q(q) else None
        if soft is not None and soft.op == "Softmax":
            absorbed_q.add(id(q))
