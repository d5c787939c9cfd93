"""Pass contract and pass manager (in the manner of onnx-ir passes and torch.fx).

A pass transforms a graph through a :class:`~qdqsurgeon.rewriter.Rewriter` and returns a
:class:`PassResult`. Observation (timing, verification) lives in instruments plugged into the
:class:`PassManager`, so passes only transform.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

import onnx
import onnx_graphsurgeon as gs

from ..config import Config
from ..errors import ModelError
from ..rewriter import Change, Rewriter

__all__ = [
    "Pass",
    "PassResult",
    "PassContext",
    "PassManager",
    "PipelineResult",
    "PassStat",
    "Instrument",
    "TimingInstrument",
    "VerifyInstrument",
    "RangeProvider",
]

logger = logging.getLogger(__name__)

# Given tensor names, return their calibrated absolute maxima (amax); missing names are omitted.
RangeProvider = Callable[[Sequence[str]], Mapping[str, float]]


@dataclass
class PassContext:
    """What a pass may read besides the graph: configuration and activation ranges."""

    config: Config = field(default_factory=Config)
    ranges: RangeProvider | None = None
    model_path: str | None = None
    #: The named pipeline running ("ptq", "fix", ...), "custom" for an explicit pass list.
    pipeline: str = "custom"
    #: Real calibration data (re-iterable batches) and the float model it runs through; None without
    #: ``--calib`` (random data and TensorRT caches give none). Only bias-correction reads them.
    calib_data: Any = None
    calib_model: onnx.ModelProto | None = None
    #: id() of the graph the last pass left cleaned up and sorted (set by the pass manager's passes);
    #: a pass that then edits nothing skips its own cleanup, which would not change that graph.
    clean_graph: int | None = field(default=None, repr=False, compare=False)

    def amax(self, names: Sequence[str]) -> dict[str, float]:
        """Calibrated ranges for ``names`` (empty when no calibration source is set)."""
        if self.ranges is None or not names:
            return {}
        return dict(self.ranges(list(names)))


@dataclass
class PassResult:
    graph: gs.Graph
    modified: bool
    changes: list[Change]


class Pass(ABC):
    """A graph transformation with a kebab-case ``name``, a one-line ``summary`` and its rule IDs."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    rules: ClassVar[tuple[str, ...]] = ()
    #: The ai.onnx opset the pass needs (0: any) and what for; a model below it is upgraded first
    #: (:mod:`qdqsurgeon.opset`). ``opset_needed`` may decide from the model instead.
    min_opset: ClassVar[int] = 0
    opset_reason: ClassVar[str] = ""
    #: The pass edits only through its rewriter (so an unedited graph needs no cleanup). Built-in
    #: passes do; a user pass that edits gs objects directly keeps the default and is always cleaned up.
    edits_through_rewriter: ClassVar[bool] = False

    def opset_needed(self, model: onnx.ModelProto, config: Config) -> tuple[int, str]:
        """(opset, why) this pass needs on ``model``; (0, "") when any opset will do."""
        return self.min_opset, f"{self.name}: {self.opset_reason}" if self.min_opset else ""

    def __call__(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        self.requires(graph, ctx)
        rw = Rewriter(graph, self.name)
        self.run(graph, rw, ctx)
        if rw.edited or not self.edits_through_rewriter or ctx.clean_graph != id(graph):
            rw.cleanup()
            ctx.clean_graph = id(graph)
        self.ensures(graph, ctx)
        return PassResult(graph, rw.edited, rw.changes)

    @abstractmethod
    def run(self, graph: gs.Graph, rw: Rewriter, ctx: PassContext) -> None:
        """Transform ``graph`` in place, editing only through ``rw``."""

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        """Precondition check; raise :class:`ModelError` when the pass cannot run."""

    def ensures(self, graph: gs.Graph, ctx: PassContext) -> None:
        """Postcondition check; raise :class:`AssertionError` on a broken invariant."""


class Instrument:
    """Hook into the pass manager (timing, verification, dumping)."""

    def before_pass(self, pass_: Pass, graph: gs.Graph, ctx: PassContext) -> None:
        pass

    def after_pass(self, pass_: Pass, result: PassResult, ctx: PassContext) -> None:
        pass


@dataclass
class PassStat:
    name: str
    seconds: float = 0.0
    runs: int = 0
    changes: int = 0


class TimingInstrument(Instrument):
    """Wall time per pass, summed over fixpoint iterations."""

    def __init__(self) -> None:
        self.stats: dict[str, PassStat] = {}
        self._start = 0.0

    def before_pass(self, pass_: Pass, graph: gs.Graph, ctx: PassContext) -> None:
        self._start = time.perf_counter()

    def after_pass(self, pass_: Pass, result: PassResult, ctx: PassContext) -> None:
        stat = self.stats.setdefault(pass_.name, PassStat(pass_.name))
        stat.seconds += time.perf_counter() - self._start
        stat.runs += 1
        stat.changes += len(result.changes)


class VerifyInstrument(Instrument):
    """Run onnx.checker after every pass that changed the graph; name the pass that broke it.

    The full check (types and shapes) is stricter than the one a model gets at load. When a pass's
    output fails it, the input (``source``) is checked too, once. If the input already fails it:

    * and onnxruntime cannot load the input either (e.g. a Conv reading an int8 tensor with its
      DequantizeLinear missing), the error names the input, not the pass;
    * but onnxruntime loads it (onnx's shape inference disagrees with a shape the exporter wrote
      inside a Loop body, as in PaddleOCR's SLANet), the problem is onnx's, not the model's: the
      passes are held to the check the input passes (the plain checker), with one warning.

    A model with TensorRT plugins is loaded up to the plugins' inputs (onnxruntime cannot run them).
    """

    def __init__(self, source: onnx.ModelProto | None = None) -> None:
        self.source = source  # the unmodified input, checked only when a pass's output fails
        self._source_verdict: tuple[str | None, bool] | None = None  # (full-check problem, onnxruntime loads it)
        self._warned = False

    @staticmethod
    def _problem(graph_or_model: gs.Graph | onnx.ModelProto, full: bool = True, payload: int | None = None) -> str | None:
        """onnx's check of a graph or model (``payload``: the model's tensor payload, when known)."""
        from ..graph import export_model
        from ..io import check_model, is_large, tensor_payload

        model = graph_or_model if isinstance(graph_or_model, onnx.ModelProto) else export_model(graph_or_model)
        if payload is None or model is not graph_or_model:
            payload = tensor_payload(model)
        if is_large(model, payload):
            return None  # the in-memory checker cannot take 2 GB; the saved model is checked by path
        try:
            check_model(model, full_check=full, payload=payload)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            return str(exc).strip().splitlines()[0]
        return None

    def _source(self) -> tuple[str | None, bool]:
        if self._source_verdict is None:
            problem = self._problem(self.source) if self.source is not None else None
            loads = False
            if problem is not None:
                from ..calibration.collect import cut_at_plugins, make_session

                try:
                    make_session(cut_at_plugins(self.source)[0], optimize=False)
                    loads = True
                except ModelError:
                    loads = False
            self._source_verdict = (problem, loads)
        return self._source_verdict

    def after_pass(self, pass_: Pass, result: PassResult, ctx: PassContext) -> None:
        if not result.modified:
            return
        problem = self._problem(result.graph)
        if problem is None:
            return
        before, loads = self._source()
        if before is not None and not loads:
            raise ModelError(f"the model fails onnx's full check (types and shapes): {before}")
        if before is not None:
            plain = self._problem(result.graph, full=False)
            if plain is None:
                if not self._warned:
                    self._warned = True
                    logger.warning("the input fails onnx's full check (%s) but onnxruntime runs it: passes are "
                                   "verified with the plain checker only", before)
                return
            problem = plain
        raise ModelError(f"pass {pass_.name} produced an invalid model: {problem}")


@dataclass
class PipelineResult:
    graph: gs.Graph
    modified: bool
    changes: list[Change]
    iterations: int


class PassManager:
    """Runs passes in order; with ``fixpoint`` it repeats the sequence until nothing changes.

    A later pass can open work for an earlier one (a move makes an op's neighbours INT8, so the
    pooling pass now wraps it); the fixpoint makes the result idempotent as a whole, not only pass
    by pass. Notes a repeated iteration writes again word for word are dropped from the log.
    ``repeat_from`` leaves the first passes out of the repeats (insertion runs once: repeating it
    would undo what the placement passes decided).
    """

    def __init__(
        self,
        passes: Sequence[Pass],
        *,
        instruments: Sequence[Instrument] = (),
        fixpoint: bool = False,
        max_iterations: int = 8,
        repeat_from: int = 0,
    ) -> None:
        self.passes = list(passes)
        self.instruments = list(instruments)
        self.fixpoint = fixpoint
        self.max_iterations = max_iterations
        self.repeat_from = repeat_from  # iterations after the first start at this pass

    def run(self, graph: gs.Graph, ctx: PassContext | None = None, *, clean: bool = False) -> PipelineResult:
        """``clean``: ``graph`` comes straight from another manager's run with ``ctx`` (it continues a
        pipeline split in two), so it is as clean as that run's last pass left it."""
        ctx = ctx or PassContext()
        if not (clean and ctx.clean_graph == id(graph)):
            ctx.clean_graph = None  # nothing is known about a graph this manager has not cleaned
        changes: list[Change] = []
        notes: set[Change] = set()  # a note a repeated iteration writes again is logged once
        modified = False
        iterations = 0
        while True:
            iterations += 1
            step_modified = False
            for pass_ in self.passes[self.repeat_from if iterations > 1 else 0:]:
                for inst in self.instruments:
                    inst.before_pass(pass_, graph, ctx)
                result = pass_(graph, ctx)
                graph = result.graph
                for inst in self.instruments:
                    inst.after_pass(pass_, result, ctx)
                fresh = [c for c in result.changes if c.kind != "note" or c not in notes]
                notes.update(c for c in fresh if c.kind == "note")
                changes.extend(fresh)
                step_modified |= result.modified
            modified |= step_modified
            if not self.fixpoint or not step_modified:
                break
            if iterations >= self.max_iterations:
                logger.warning("pipeline did not reach a fixpoint after %d iterations", iterations)
                break
        return PipelineResult(graph, modified, changes, iterations)
