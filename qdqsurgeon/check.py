"""Numeric check of a Q/DQ model against its float original in onnxruntime.

Both models run on CPU with every graph optimization disabled (so onnxruntime's own Q/DQ
fusions cannot hide or add error) on the same inputs. Per output, over all batches:

- SQNR in dB, ``10·log10(Σ ref² / Σ (ref - cand)²)``: ``inf`` when identical;
- cosine similarity of the flattened outputs;
- the largest absolute difference.

``top1_agreement`` is the fraction of samples whose argmax agrees, computed on the first output
that looks like class scores (``[batch, C]`` with ``C >= 2`` after dropping trailing unit
axes, or a lone ``[C]`` output), else ``None``. With ``per_layer=True``, every QuantizeLinear
of the candidate whose input tensor also exists in the reference is scored: the SQNR of its
DequantizeLinear's output (the fake-quantized value) against the reference float tensor,
worst first.

Non-finite values (NaN, inf) are never averaged in: the sums run over the elements where both
models give finite values, and each output counts the elements where the reference is not
finite (``nonfinite_reference``) and where only the candidate is not (``nonfinite_candidate``).
An output whose reference is non-finite everywhere has nothing to compare, and a candidate that
gives NaN/inf where the reference does not is broken: :meth:`CheckReport.nonfinite_error` names
either case, so a caller can refuse instead of printing ``SQNR nan, cosine 1.0`` (issue 17).

JSON: :meth:`CheckReport.to_dict` writes an infinite SQNR as the *string* ``"inf"`` (or
``"-inf"`` when the reference is all zeros and the candidate is not) and NaN as ``null``, so
``json.dumps(..., allow_nan=False)`` works and no reader mistakes a sentinel for a measurement.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from qdqsurgeon.calibration.collect import cut_at_plugins, expose_tensors, float32_copy, has_bfloat16, make_session, progress_bar
from qdqsurgeon.errors import DataError, ModelError, QdqError

__all__ = ["OutputMetrics", "LayerMetric", "CheckReport", "compare", "sqnr_db"]

logger = logging.getLogger(__name__)

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(bfloat16)": None,  # numpy has no bfloat16: feed as is and let onnxruntime complain
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def sqnr_db(signal_power: float, noise_power: float) -> float:
    """``10·log10(signal / noise)`` with the limits spelled out: no noise is ``inf``."""
    if noise_power == 0.0:
        return math.inf
    if signal_power == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal_power / noise_power)


def _json_float(value: float | None) -> float | str | None:
    if value is None or math.isnan(value):
        return None
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return float(value)


@dataclass(frozen=True)
class OutputMetrics:
    """Agreement of one output over all batches."""

    sqnr_db: float
    cosine: float
    max_abs: float
    values: int = 0
    nonfinite_reference: int = 0
    nonfinite_candidate: int = 0


@dataclass(frozen=True)
class LayerMetric:
    """SQNR of one fake-quantized tensor (DequantizeLinear output) against the float tensor."""

    tensor: str
    sqnr_db: float


@dataclass
class CheckReport:
    """Result of :func:`compare`."""

    outputs: dict[str, OutputMetrics]
    top1_agreement: float | None = None
    top1_output: str | None = None
    layers: list[LayerMetric] | None = None
    num_batches: int = 0
    num_samples: int = 0
    output_pairs: dict[str, str] = field(default_factory=dict)  # reference name -> candidate name
    input_values: int = 0  # float input elements fed, over all batches
    nonfinite_inputs: int = 0  # of those, NaN or inf

    @property
    def worst_sqnr(self) -> float:
        """The lowest output SQNR (NaN counts as lowest)."""
        values = [m.sqnr_db for m in self.outputs.values()]
        if any(math.isnan(v) for v in values):
            return math.nan
        return min(values) if values else math.inf

    def below(self, min_sqnr: float) -> list[str]:
        """Outputs whose SQNR is below ``min_sqnr`` dB (or NaN)."""
        return [n for n, m in self.outputs.items() if math.isnan(m.sqnr_db) or m.sqnr_db < min_sqnr]

    def nonfinite_error(self) -> QdqError | None:
        """Why the comparison is meaningless, when NaN/inf make it so; ``None`` otherwise.

        A reference that is non-finite on every element is a data problem (:class:`DataError`);
        a candidate that is non-finite where the reference is finite is a broken model
        (:class:`ModelError`). Counts are over all batches.
        """
        for name, m in self.outputs.items():
            if m.values and m.nonfinite_reference == m.values:
                data = (f"; the data itself has NaN/inf in {self.nonfinite_inputs} of {self.input_values} input values"
                        if self.nonfinite_inputs else "")
                return DataError(f"nothing to compare: the float model's output {name!r} is NaN/inf in all "
                                 f"{m.values} values on this data{data}")
        for name, m in self.outputs.items():
            if m.nonfinite_candidate:
                return ModelError(f"the quantized model's output {name!r} is NaN/inf in {m.nonfinite_candidate} of "
                                  f"{m.values} values where the float model's is finite")
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (see the module docstring for how inf/NaN are written)."""
        outputs: dict[str, Any] = {}
        for name, m in self.outputs.items():
            row: dict[str, Any] = {"sqnr_db": _json_float(m.sqnr_db), "cosine": _json_float(m.cosine),
                                   "max_abs": _json_float(m.max_abs)}
            # Only when present, so the common report keeps its three keys.
            if m.nonfinite_reference or m.nonfinite_candidate:
                row.update(values=m.values, nonfinite_reference=m.nonfinite_reference,
                           nonfinite_candidate=m.nonfinite_candidate)
            outputs[name] = row
        result: dict[str, Any] = {"outputs": outputs, "top1_agreement": self.top1_agreement}
        if self.layers is not None:
            result["layers"] = [{"tensor": lm.tensor, "sqnr_db": _json_float(lm.sqnr_db)} for lm in self.layers]
        return result


class _Agreement:
    """Running sums for SQNR, cosine and max abs error of one tensor pair, over finite elements."""

    def __init__(self) -> None:
        self.ref2 = 0.0
        self.cand2 = 0.0
        self.err2 = 0.0
        self.dot = 0.0
        self.max_abs = 0.0
        self.values = 0
        self.nonfinite_reference = 0
        self.nonfinite_candidate = 0

    def update(self, ref: np.ndarray, cand: np.ndarray, what: str) -> None:
        if ref.shape != cand.shape:
            raise ModelError(f"{what}: reference shape {list(ref.shape)} != candidate shape {list(cand.shape)}")
        r = np.asarray(ref, dtype=np.float64).ravel()
        c = np.asarray(cand, dtype=np.float64).ravel()
        ref_ok = np.isfinite(r)
        both_ok = ref_ok & np.isfinite(c)
        self.values += r.size
        self.nonfinite_reference += int(r.size - np.count_nonzero(ref_ok))
        self.nonfinite_candidate += int(np.count_nonzero(ref_ok & ~both_ok))
        if not both_ok.all():
            r, c = r[both_ok], c[both_ok]
        d = r - c
        self.ref2 += float(r @ r)
        self.cand2 += float(c @ c)
        self.err2 += float(d @ d)
        self.dot += float(r @ c)
        if d.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(d))))

    @property
    def _meaningless(self) -> bool:
        """Nothing finite to compare, or the candidate broke where the reference did not."""
        return self.nonfinite_candidate > 0 or (self.values > 0 and self.nonfinite_reference == self.values)

    @property
    def sqnr(self) -> float:
        if self._meaningless or math.isnan(self.err2) or math.isnan(self.ref2):
            return math.nan
        return sqnr_db(self.ref2, self.err2)

    @property
    def cosine(self) -> float:
        if self._meaningless:
            return math.nan
        if self.ref2 == 0.0 and self.cand2 == 0.0:
            return 1.0
        if self.ref2 == 0.0 or self.cand2 == 0.0:
            return 0.0
        return max(-1.0, min(1.0, self.dot / math.sqrt(self.ref2 * self.cand2)))

    def metrics(self) -> OutputMetrics:
        max_abs = math.inf if self.nonfinite_candidate else math.nan if self._meaningless else self.max_abs
        return OutputMetrics(self.sqnr, self.cosine, max_abs, self.values, self.nonfinite_reference,
                             self.nonfinite_candidate)


def _class_scores(a: np.ndarray, single_output: bool) -> np.ndarray | None:
    """``a`` as ``[samples, classes]`` when it looks like classifier scores, else ``None``."""
    while a.ndim > 2 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2 and a.shape[1] >= 2:
        return a
    if a.ndim == 1 and single_output and a.shape[0] >= 2:
        return a[np.newaxis]
    return None


def _pair_outputs(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> dict[str, str]:
    ref = [o.name for o in reference.graph.output]
    cand = [o.name for o in candidate.graph.output]
    if set(ref) <= set(cand):
        return {n: n for n in ref}
    if len(ref) == len(cand):
        logger.info("output names differ; matching outputs by position")
        return dict(zip(ref, cand))
    raise ModelError(f"cannot match outputs: reference has {ref}, candidate has {cand}")


def _quantized_tensors(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> dict[str, str]:
    """Reference tensor name -> candidate DequantizeLinear output, for Q->DQ pairs on shared tensors."""
    ref_names = {o for n in reference.graph.node for o in n.output} | {i.name for i in reference.graph.input}
    ref_names |= {t.name for t in reference.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in candidate.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    pairs: dict[str, str] = {}
    for node in candidate.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in ref_names or node.input[0] in pairs:
            continue
        dq = next((c for c in consumers.get(node.output[0], []) if c.op_type == "DequantizeLinear"), None)
        if dq is not None:
            pairs[node.input[0]] = dq.output[0]
    return pairs


def _feed(session: ort.InferenceSession, batch: dict[str, np.ndarray], by_position: list[str] | None) -> dict[str, np.ndarray]:
    feed = {}
    for i, arg in enumerate(session.get_inputs()):
        key = by_position[i] if by_position else arg.name
        if key not in batch:
            raise DataError(f"data lacks model input {key!r}; it provides {sorted(batch)}")
        value = batch[key]
        dtype = _ORT_DTYPES.get(arg.type)
        feed[arg.name] = value.astype(dtype) if dtype is not None and value.dtype != dtype else value
    return feed


def _run(session: ort.InferenceSession, names: list[str], feed: dict[str, np.ndarray], which: str) -> list[np.ndarray]:
    try:
        return session.run(names, feed)
    except Exception as exc:  # onnxruntime's exception types are not importable
        raise DataError(f"onnxruntime failed on the {which} model: {str(exc).splitlines()[0]}") from None


def compare(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    data: Iterable[dict[str, np.ndarray]],
    *,
    per_layer: bool = False,
    progress: bool = False,
) -> CheckReport:
    """Run both models on ``data`` and measure how closely the candidate follows the reference.

    onnxruntime cannot run TensorRT plugins: models with one are compared at the plugins' inputs.
    """
    reference, ref_after = cut_at_plugins(reference)
    candidate, _ = cut_at_plugins(candidate)
    if ref_after:
        logger.warning("onnxruntime cannot run TensorRT plugin(s) %s: comparing the tensors they read instead of "
                       "the outputs computed from them", ", ".join(sorted(set(ref_after.values()))))
    if has_bfloat16(reference) or has_bfloat16(candidate):
        # onnxruntime's CPU provider has no bfloat16 kernels: compare float32 copies (same weights and scales).
        logger.warning("bfloat16 model: comparing float32 copies (onnxruntime has no bfloat16 CPU kernels)")
        reference, candidate = float32_copy(reference), float32_copy(candidate)
    pairs = _pair_outputs(reference, candidate)
    layer_pairs = _quantized_tensors(reference, candidate) if per_layer else {}
    if per_layer and not layer_pairs:
        logger.warning("per-layer check: no QuantizeLinear in the candidate reads a tensor of the reference")

    ref_inits = {t.name: t for t in reference.graph.initializer}
    ref_inputs = {i.name for i in reference.graph.input} - set(ref_inits)
    ref_run = [n for n in layer_pairs if n not in ref_inits and n not in ref_inputs]
    ref_session = make_session(expose_tensors(reference, ref_run), optimize=False)
    cand_session = make_session(expose_tensors(candidate, list(layer_pairs.values())), optimize=False)

    ref_in = [i.name for i in ref_session.get_inputs()]
    cand_in = [i.name for i in cand_session.get_inputs()]
    cand_by_position = None
    if set(cand_in) != set(ref_in):
        if len(cand_in) != len(ref_in):
            raise ModelError(f"the models take different inputs: reference {ref_in}, candidate {cand_in}")
        cand_by_position = ref_in

    ref_out_names = list(pairs) + ref_run
    cand_out_names = list(pairs.values()) + list(layer_pairs.values())
    outputs = {name: _Agreement() for name in pairs}
    layers = {name: _Agreement() for name in layer_pairs}
    constants = {n: numpy_helper.to_array(ref_inits[n]) for n in layer_pairs if n in ref_inits}

    top1_output: str | None = None
    top1_decided = False
    agree = seen = 0
    batches = samples = 0
    input_values = nonfinite_inputs = 0
    total = len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]
    bar, task = progress_bar(progress, "checking", total)
    with bar:
        for batch in data:
            ref_vals = dict(zip(ref_out_names, _run(ref_session, ref_out_names, _feed(ref_session, batch, None), "reference")))
            cand_vals = dict(zip(cand_out_names, _run(cand_session, cand_out_names, _feed(cand_session, batch, cand_by_position), "candidate")))
            for rname, cname in pairs.items():
                outputs[rname].update(ref_vals[rname], cand_vals[cname], f"output {rname!r}")
            for tname, dq_out in layer_pairs.items():
                ref_value = constants[tname] if tname in constants else batch[tname] if tname in ref_inputs else ref_vals[tname]
                layers[tname].update(np.asarray(ref_value), cand_vals[dq_out], f"tensor {tname!r}")
            if not top1_decided:
                top1_decided = True
                for rname in pairs:
                    if _class_scores(ref_vals[rname], len(pairs) == 1) is not None:
                        top1_output = rname
                        break
            if top1_output is not None:
                r = _class_scores(ref_vals[top1_output], len(pairs) == 1)
                c = _class_scores(cand_vals[pairs[top1_output]], len(pairs) == 1)
                if r is not None and c is not None:
                    agree += int(np.sum(np.argmax(r, axis=1) == np.argmax(c, axis=1)))
                    seen += r.shape[0]
            for value in batch.values():
                if np.issubdtype(np.asarray(value).dtype, np.floating):
                    input_values += value.size
                    nonfinite_inputs += int(value.size - np.count_nonzero(np.isfinite(value)))
            first = next(iter(batch.values()), None)
            samples += int(first.shape[0]) if first is not None and first.ndim else 1
            batches += 1
            bar.advance(task)
    if batches == 0:
        raise DataError("the evaluation data yielded no batches")
    for name, acc in outputs.items():
        if 0 < acc.nonfinite_reference < acc.values:
            logger.warning("the float model's output %r is NaN/inf in %d of %d values; those are left out of the "
                           "comparison", name, acc.nonfinite_reference, acc.values)

    layer_list = None
    if per_layer:
        # Worst first; NaN (a broken layer) sorts before everything.
        layer_list = sorted(
            (LayerMetric(name, acc.sqnr) for name, acc in layers.items()),
            key=lambda lm: (not math.isnan(lm.sqnr_db), lm.sqnr_db if not math.isnan(lm.sqnr_db) else 0.0),
        )
    return CheckReport(
        outputs={name: acc.metrics() for name, acc in outputs.items()},
        top1_agreement=agree / seen if seen else None,
        top1_output=top1_output if seen else None,
        layers=layer_list,
        num_batches=batches,
        num_samples=samples,
        output_pairs=pairs,
        input_values=input_values,
        nonfinite_inputs=nonfinite_inputs,
    )
