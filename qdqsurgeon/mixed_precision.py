"""Automatic mixed precision: keep the most harmful groups float until an accuracy target is met.

``optimize --target cosine>=0.995`` (or ``sqnr>=X``, ``top1>=X``, ``--max-drop P``) quantizes the
float model with every output layer a candidate too (``keep_output_layers``: P9's default is
replaced by evidence), measures it on the evaluation data and, when the target is missed, runs
the sensitivity analysis (:mod:`qdqsurgeon.sensitivity`) on it. Groups with a weighted layer are
then ordered by the noise each removes per unit of cost, cost taken from the static TensorRT
model (:func:`qdqsurgeon.analysis.predict`): the MAC share its layers take out of INT8, plus
:data:`QDQ_COST` per standalone Q/DQ kernel its own placement adds. The prefix of that order the
additive noise model says is enough is placed and measured; when it falls short it is kept and
the next round ranks the rest by a sensitivity analysis of that placement (:data:`MAX_ROUNDS`),
the last round growing its prefix until the target is met. The meeting prefix is bisected, and
groups are dropped again where the target holds without them, most costly first.

Keeping a group float never edits Q/DQ after the fact: its weighted layers go into the exclusion
list that ``insert-qdq`` honours (``Config.exclude``, anchored node names) and the whole PTQ
placement runs again, so residual, pooling and alignment passes see the new float layers and the
fusion rules stay intact. Under ``--float16`` the float layers are FP16 (``float16-regions``).

The decision is a per-layer precision map, node name -> ``"int8"`` or ``"float"`` (NNI's
config_list in spirit), written with sorted keys by :func:`save_precision`; :func:`precision_config`
turns it back into the configuration the placement ran with, so ``--precision FILE`` reproduces
the model without evaluation data.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .config import Config
from .errors import DataError, UsageError

__all__ = ["Target", "Measured", "Scorer", "MixedResult", "parse_target", "drop_target", "precision_config",
           "precision_text", "save_precision", "load_precision", "search"]

logger = logging.getLogger(__name__)

INT8, FLOAT = "int8", "float"
#: A standalone Quantize/Dequantize kernel weighed as this share of the model's MACs (a memory-bound
#: pass over one activation tensor; a judgement, not a measurement: no engine was built here).
QDQ_COST = 0.005
#: Evaluations of candidate sets at most (each is one placement and one run over the evaluation data).
MAX_EVALS = 24
#: Groups whose alone-float gain the sensitivity analysis measures (instead of estimating) for the search.
MAX_FLOAT_MEASURED = 16
#: Sensitivity analyses at most: one of the all-INT8 placement, then one on top of each set that missed.
MAX_ROUNDS = 3

_TARGET = re.compile(r"^\s*(cosine|sqnr|top1)\s*>=\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class Target:
    """An accuracy target: ``metric`` (cosine, sqnr in dB, top1 as a fraction) at least ``value``.

    ``drop`` targets (``--max-drop P``) are top-1 within ``P`` points of the float model: of its
    accuracy when labels are given, else of perfect agreement with its own top-1.
    """

    metric: str
    value: float
    text: str
    drop: float | None = None

    def threshold(self, m: Measured) -> float:
        if self.drop is not None:
            return (m.top1_float if m.top1_float is not None else 1.0) - self.drop / 100.0
        return self.value

    def achieved(self, m: Measured) -> float | None:
        return {"cosine": m.cosine, "sqnr": m.sqnr, "top1": m.top1}[self.metric]

    def met(self, m: Measured) -> bool:
        got = self.achieved(m)
        return got is not None and not math.isnan(got) and got >= self.threshold(m) - 1e-12

    def allowed_noise(self, m: Measured) -> float | None:
        """The relative output noise power the target allows (sqnr and cosine), for the additive prediction."""
        if self.metric == "sqnr":
            return 10.0 ** (-self.value / 10.0)
        if self.metric == "cosine" and 0.0 < self.value < 1.0:
            return 1.0 / self.value ** 2 - 1.0  # cos = 1/sqrt(1 + noise/signal) for noise orthogonal to the signal
        return None

    def describe(self, m: Measured) -> str:
        got = self.achieved(m)
        shown = "n/a" if got is None else f"{got:.2f} dB" if self.metric == "sqnr" else f"{got:.6f}" if self.metric == "cosine" else f"{got:.4f}"
        return f"{self.metric} {shown}"


def parse_target(text: str) -> Target:
    """``cosine>=0.995``, ``sqnr>=25`` (dB) or ``top1>=0.99``; a :class:`UsageError` in one line otherwise."""
    m = _TARGET.match(text or "")
    if not m:
        raise UsageError(f"--target {text!r}: expected cosine>=X, sqnr>=X (dB) or top1>=X (a fraction), e.g. cosine>=0.995")
    metric, value = m.group(1), float(m.group(2))
    if metric in ("cosine", "top1") and not -1.0 <= value <= 1.0:
        raise UsageError(f"--target {text!r}: {metric} is at most 1 (top1 is a fraction: top1>=0.99)")
    return Target(metric, value, f"{metric}>={m.group(2)}")


def drop_target(points: float) -> Target:
    """``--max-drop P``: top-1 at most ``P`` points below the float model's."""
    if not 0.0 <= points <= 100.0:
        raise UsageError(f"--max-drop {points}: give points of top-1 between 0 and 100")
    return Target("top1", 0.0, f"top-1 drop <= {points:g} points", drop=float(points))


# ------------------------------------------------------------------------------------------------ measuring


@dataclass
class Measured:
    """A model's accuracy against the float model on the evaluation data."""

    sqnr: float
    cosine: float
    top1: float | None  # accuracy when labels were given, else agreement with the float model's top-1
    top1_float: float | None = None  # the float model's accuracy (labels only)

    def to_dict(self) -> dict[str, Any]:
        from .sensitivity import _num

        return {"sqnr_db": _num(self.sqnr), "cosine": _num(self.cosine), "top1": self.top1, "top1_float": self.top1_float}


class Scorer:
    """The float model's outputs on the evaluation data, kept; candidates are run and compared with them.

    Sessions run with every graph optimization off, as ``check`` does, so onnxruntime's own
    Q/DQ fusions do not stand in for TensorRT's numerics. Metrics as in ``sensitivity``: worst
    float output, SQNR and cosine over the whole evaluation batch.
    """

    def __init__(self, float_model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]],
                 labels: np.ndarray | None = None) -> None:
        from .check import _class_scores

        self.feeds = feeds
        self.ref = self._run(float_model)
        self.samples = sum(len(v) if np.ndim(v) else 1 for v in (next(iter(f.values())) for f in feeds))
        self.class_output = next((i for i, r in enumerate(self.ref) if _class_scores(r, len(self.ref) == 1) is not None), None)
        if labels is not None:
            labels = np.asarray(labels).reshape(-1)
            if self.class_output is None:
                raise UsageError("--labels: the model has no output that looks like class scores ([batch, classes])")
            if len(labels) != len(self.ref[self.class_output]):
                raise DataError(f"--labels holds {len(labels)} labels for {len(self.ref[self.class_output])} evaluation samples")
        self.labels = labels
        self.float_top1 = self._top1(self.ref) if labels is not None else None

    def _run(self, model: onnx.ModelProto) -> list[np.ndarray]:
        from .calibration.collect import make_session

        session = make_session(model, optimize=False)
        names = [o.name for o in session.get_outputs()]
        inputs = {i.name for i in session.get_inputs()}
        per: list[list[np.ndarray]] = [[] for _ in names]
        for feed in self.feeds:
            for acc, value in zip(per, session.run(names, {k: v for k, v in feed.items() if k in inputs})):
                acc.append(np.asarray(value))
        return [np.concatenate([v.reshape(1, -1) if v.ndim == 0 else v for v in vals]) for vals in per]

    def _top1(self, outs: list[np.ndarray]) -> float | None:
        from .check import _class_scores

        if self.class_output is None:
            return None
        got = _class_scores(outs[self.class_output], len(outs) == 1)
        if got is None:
            return None
        pred = np.argmax(got, axis=1)
        if self.labels is not None:
            return float(np.mean(pred == self.labels))
        ref = np.argmax(_class_scores(self.ref[self.class_output], len(outs) == 1), axis=1)
        return float(np.mean(pred == ref))

    def __call__(self, model: onnx.ModelProto) -> Measured:
        from .sensitivity import _noise, _sqnr

        outs = self._run(model)
        rel, cos = _noise(self.ref, outs)
        return Measured(_sqnr(rel), min(cos, default=1.0), self._top1(outs), self.float_top1)


# ------------------------------------------------------------------------------------------------ precision files


def precision_config(config: Config, decision: Mapping[str, str]) -> Config:
    """The configuration that places ``decision``: its float layers excluded by exact name, P9 by evidence.

    Output layers follow the decision like every other layer (``keep_output_layers``), which is
    what ``--target`` searched with; this one function serves ``--target`` and ``--precision``.
    """
    floats = sorted(n for n, p in decision.items() if p == FLOAT)
    return replace(config, keep_output_layers=True, exclude=[*config.exclude, *(f"^{re.escape(n)}$" for n in floats)])


def precision_text(decision: Mapping[str, str]) -> str:
    """``decision`` as stable JSON: sorted keys, one layer a line, a trailing newline."""
    return json.dumps({k: decision[k] for k in sorted(decision)}, indent=1, sort_keys=True) + "\n"


def save_precision(path: str | Path, decision: Mapping[str, str]) -> None:
    Path(path).write_text(precision_text(decision))


def load_precision(path: str | Path, model: onnx.ModelProto) -> dict[str, str]:
    """Read a precision file and check it against ``model``: one line of :class:`UsageError` when it does not fit."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UsageError(f"cannot read the precision file: {exc.strerror or exc}", path=str(path)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"the precision file is not JSON: {exc}", path=str(path)) from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and v in (INT8, FLOAT) for k, v in data.items()):
        raise UsageError('the precision file must map node names to "int8" or "float"', path=str(path))
    names = {n.name for n in model.graph.node}
    unknown = sorted(k for k in data if k not in names)
    if unknown:
        raise UsageError(f"the precision file names {len(unknown)} node(s) this model does not have "
                         f"({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}): written for another model?",
                         path=str(path))
    return dict(data)


# ------------------------------------------------------------------------------------------------ search


@dataclass
class Step:
    """One candidate set placed and measured."""

    floats: tuple[str, ...]  # group names kept float
    measured: Measured
    met: bool
    int8_mac_fraction: float
    standalone_qdq: int


@dataclass
class MixedResult:
    """The chosen per-layer precision and what it reached."""

    target: Target
    decision: dict[str, str]
    float_groups: list[str]
    measured: Measured
    met: bool
    int8_mac_fraction: float
    standalone_qdq: int
    baseline: Step  # every candidate INT8
    steps: list[Step] = field(default_factory=list)
    sensitivity_seconds: float = 0.0
    seconds: float = 0.0
    sensitivity_method: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target.text, "met": self.met, "float_groups": self.float_groups,
            "float_layers": sorted(k for k, v in self.decision.items() if v == FLOAT),
            "achieved": self.measured.to_dict(), "int8_mac_fraction": round(self.int8_mac_fraction, 4),
            "standalone_qdq_layers": self.standalone_qdq,
            "all_int8": {**self.baseline.measured.to_dict(), "int8_mac_fraction": round(self.baseline.int8_mac_fraction, 4),
                         "standalone_qdq_layers": self.baseline.standalone_qdq},
            "evaluations": len(self.steps), "seconds": round(self.seconds, 2),
            "sensitivity_seconds": round(self.sensitivity_seconds, 2), "sensitivity": self.sensitivity_method,
        }


@dataclass
class _Candidate:
    name: str
    layers: tuple[str, ...]  # weighted layers kept float with the group
    noise: float  # relative output noise power removed by keeping the group float (measured or estimated)
    macs: float  # share of the model's weighted MACs
    qdq: float = 1.0  # standalone Q/DQ it is expected to add (learned from placements)

    def cost(self) -> float:
        return self.macs + QDQ_COST * max(self.qdq, 0.0)


def search(
    model: onnx.ModelProto,
    ranges: Any,
    config: Config,
    data: Iterable[dict[str, np.ndarray]],
    target: Target,
    *,
    labels: np.ndarray | None = None,
    jobs: int = 1,
    samples: int | None = None,
    progress: bool = False,
    max_evals: int = MAX_EVALS,
    log: Callable[[str], None] | None = None,
) -> MixedResult:
    """Find the cheapest set of groups to keep float so that ``target`` is met on ``data`` (see the module docstring).

    ``model`` is the float model (opset already prepared), ``ranges`` the calibration range
    provider, ``config`` the user's placement options. Returns the decision even when the target
    is not met (``met`` False): then it is the best set measured.
    """
    from .analysis import predict
    from .api import optimize
    from .sensitivity import _materialize, analyze

    t0 = time.perf_counter()
    say = log or (lambda _msg: None)
    feeds = _materialize(data, samples)
    scorer = Scorer(model, feeds, labels)
    if target.metric == "top1" and scorer.class_output is None:
        raise UsageError(f"{target.text}: the model has no output that looks like class scores ([batch, classes]); "
                         "use a cosine or sqnr target")
    # Candidates are placed without bias correction (one more pass over the data each); the chosen
    # placement gets it when optimize runs with the decision.
    base = replace(config, keep_output_layers=True, bias_correction=False)
    plans: dict[frozenset[str], Any] = {}  # static predictions
    measured: dict[frozenset[str], Step] = {}
    steps: list[Step] = []
    names: dict[str, str] = {}  # weighted layer -> the name of the group it was chosen with

    last: list[tuple[frozenset[str], onnx.ModelProto]] = []  # the latest placed model only: models can be large

    def plan(floats: frozenset[str]) -> tuple[onnx.ModelProto, Any]:
        """The placement with the weighted layers ``floats`` float and its static TensorRT prediction (no data needed)."""
        if floats in plans and last and last[0][0] == floats:
            return last[0][1], plans[floats]
        placed = optimize(model, config=precision_config(base, dict.fromkeys(floats, FLOAT)), ranges=ranges,
                          mode="ptq", analyze=False).model
        if floats not in plans:
            plans[floats] = predict(placed, trt_version=config.trt_version)
        last[:] = [(floats, placed)]
        return placed, plans[floats]

    def place(floats: frozenset[str]) -> Step:
        if floats not in measured:
            placed, pred = plan(floats)
            m = scorer(placed)
            groups = tuple(sorted({names.get(n, n) for n in floats}))
            step = Step(groups, m, target.met(m), pred.int8_mac_fraction, pred.standalone_qdq_layers)
            measured[floats] = step
            steps.append(step)
            say(f"{len(groups)} group(s) float: {target.describe(m)}, INT8 MACs {pred.int8_mac_fraction:.3f}, "
                f"{pred.standalone_qdq_layers} standalone Q/DQ{' (met)' if step.met else ''}")
        return measured[floats]

    start = place(frozenset())
    pred0 = plan(frozenset())[1]
    int8_layers = {w["node"]: w for w in pred0.weighted_ops if str(w["precision"]).startswith(INT8)}
    total_macs = float(sum(w["macs"] for w in pred0.weighted_ops)) or 1.0
    allowed = target.allowed_noise(start.measured)
    sens_s, methods = 0.0, []

    def rank(floats: frozenset[str], current: Step) -> list[_Candidate]:
        """Candidates to add to ``floats``, best first, from a sensitivity analysis of that placement."""
        nonlocal sens_s
        now = _rel(current.measured.sqnr)

        def candidates(results: list[Any]) -> list[tuple[int, _Candidate]]:
            out = []
            for r in results:
                layers = tuple(n for n in r.group.layers if n in int8_layers and n not in floats)
                if not layers:
                    continue  # no weighted INT8 layer: nothing insert-qdq could leave float
                # the noise removed by keeping it float: measured (all INT8 minus alone float) or,
                # where that was estimated, its own alone-INT8 noise (the same by additivity)
                gain = now - _rel(r.sqnr_alone_float) if not r.alone_float_estimated else _rel(r.sqnr_alone_int8)
                out.append((r.group.index, _Candidate(r.group.name, layers, max(gain, 0.0),
                                                       sum(int8_layers[n]["macs"] for n in layers) / total_macs)))
            return out

        def float_for(results: list[Any]) -> list[int]:
            """Groups whose alone-float gain is worth measuring: the leading candidates, twice the predicted prefix."""
            ranked = sorted(candidates(results), key=lambda ic: _priority(ic[1]))
            k = _predicted_length([c for _, c in ranked], now, allowed)
            return [i for i, _ in ranked[:min(len(ranked), 2 * k + 4, MAX_FLOAT_MEASURED)]]

        t1 = time.perf_counter()
        report = analyze(plan(floats)[0], feeds, jobs=jobs, progress=progress, float_for=float_for)
        sens_s += time.perf_counter() - t1
        methods.append(report.method())
        cands = [c for _, c in candidates(report.results)]
        order = sorted(cands, key=_priority)
        # Standalone Q/DQ each leading candidate adds, from its own placement (static model, no data).
        base_qdq = current.standalone_qdq
        for c in order[:min(len(order), 2 * _predicted_length(order, now, allowed) + 4)]:
            c.qdq = max(0, plan(floats | frozenset(c.layers))[1].standalone_qdq_layers - base_qdq)
        return sorted(cands, key=_priority)

    chosen: frozenset[str] = frozenset()
    if not start.met:
        chosen = _choose(rank, place, start, target, max_evals, say, names)
    final = place(chosen)
    decision = {n: INT8 for n in int8_layers}
    decision.update(dict.fromkeys(chosen, FLOAT))
    return MixedResult(target, decision, sorted({names.get(n, n) for n in chosen}), final.measured, final.met,
                       final.int8_mac_fraction, final.standalone_qdq, start, steps, sensitivity_seconds=sens_s,
                       seconds=time.perf_counter() - t0, sensitivity_method="; ".join(dict.fromkeys(methods)))


def _choose(rank: Callable[[frozenset[str], Step], list[_Candidate]], place: Callable[[frozenset[str]], Step],
            start: Step, target: Target, max_evals: int, say: Callable[[str], None], names: dict[str, str]) -> frozenset[str]:
    """The cheapest set of float layers found (see the module docstring).

    Rounds: the sensitivity of the current placement ranks the remaining groups; the prefix the
    additive noise model says meets the target is placed and measured; when it misses, it is kept
    and the next round ranks again on top of it (noise removed early changes what is left). Once a
    set meets the target, the last round's prefix is bisected and then groups are dropped again,
    most costly first, where the target holds without them.
    """
    seen: set[frozenset[str]] = set()

    def trial(floats: frozenset[str]) -> Step | None:
        if floats not in seen and len(seen) >= max_evals:
            return None  # out of evaluations
        seen.add(floats)
        return place(floats)

    costs: dict[str, float] = {}

    def with_(base: frozenset[str], cands: Sequence[_Candidate]) -> frozenset[str]:
        for c in cands:
            costs.setdefault(c.name, c.cost())
            for layer in c.layers:
                names.setdefault(layer, c.name)
        return base | frozenset(layer for c in cands for layer in c.layers)

    allowed = target.allowed_noise(start.measured)
    kept, current = frozenset(), start
    best: tuple[frozenset[str], Step] = (kept, start)
    met: tuple[frozenset[str], list[_Candidate], int, int] | None = None  # (base, order, failing k, meeting k)
    for _round in range(MAX_ROUNDS):
        order = rank(kept, current)
        if not order:
            break
        k = _predicted_length(order, _rel(current.measured.sqnr), allowed)
        last_round = allowed is None or _round == MAX_ROUNDS - 1
        lo = 0
        while True:  # the predicted prefix; in the last round (or for top-1) grown until it meets
            step = trial(with_(kept, order[:k]))
            if step is None:
                break
            if _better(step, best[1], target):
                best = (with_(kept, order[:k]), step)
            if step.met:
                met = (kept, order, lo, k)
                break
            if not last_round or k >= len(order):
                break
            lo, k = k, min(len(order), max(k + 1, 2 * k))
        if met is not None or step is None or last_round:
            break
        kept, current = with_(kept, order[:k]), step
    if met is None:
        say(f"no set of groups met {target.text}")
        return best[0]
    base, order, lo, hi = met
    while hi - lo > 1:
        mid = (lo + hi) // 2
        step = trial(with_(base, order[:mid]))
        if step is None:
            break
        lo, hi = (lo, mid) if step.met else (mid, hi)
    # Prune: most costly first (the earlier rounds' groups too), drop a group where the target holds without it.
    chosen = with_(base, order[:hi])
    groups: dict[str, list[str]] = {}
    for layer in sorted(chosen):
        groups.setdefault(names[layer], []).append(layer)
    for name in sorted(groups, key=lambda g: (-costs.get(g, 1.0), g)):
        if len(groups) == 1:
            break
        rest = chosen - frozenset(groups[name])
        step = trial(rest)
        if step is None:
            break
        if step.met:
            chosen = rest
            del groups[name]
    return chosen


def _rel(sqnr_db: float) -> float:
    """Relative noise power from an SQNR in dB."""
    return 10.0 ** (-sqnr_db / 10.0) if math.isfinite(sqnr_db) else (0.0 if sqnr_db > 0 else math.inf)


def _priority(c: _Candidate) -> tuple[float, str]:
    """Sort key: noise removed per unit of cost, highest first (ties by name, so runs are stable)."""
    return (-c.noise / (c.cost() + 1e-4), c.name)


def _predicted_length(order: list[_Candidate], now: float, allowed: float | None) -> int:
    """How long a prefix of ``order`` the additive noise model says meets the target (at least 1)."""
    if allowed is None:
        return 1
    acc = now
    for k, c in enumerate(order, 1):
        acc -= c.noise
        if acc <= allowed:
            return k
    return len(order)


def _better(a: Step, b: Step, target: Target) -> bool:
    va, vb = target.achieved(a.measured), target.achieved(b.measured)
    return (va if va is not None else -math.inf) > (vb if vb is not None else -math.inf)
