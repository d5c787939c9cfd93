"""The Python API; the CLI is a thin layer over these functions.

``optimize`` runs a named pipeline (or explicit passes) over a model and returns the new model
with its change log. Which pipeline runs by default depends on the input: an FP32 model takes the
PTQ pipeline (insert and place Q/DQ, needs calibration ranges), a model that already carries Q/DQ
takes the fix pipeline (repair and re-place, keeping learned scales).
"""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import onnx

from .background import Background, can_fork
from .config import Config
from .errors import ModelError, QdqError, UsageError
from .graph import carry_metadata, collect_small, export_model, gc_paused, import_model
from .inspection import has_qdq, validity_problems
from .io import check_model, is_large, tensor_payload
from .opset import UPGRADE_PASS, ensure_opset
from .passes.base import Instrument, Pass, PassContext, PassManager, PassStat, RangeProvider, TimingInstrument, VerifyInstrument
from .pipelines import BASELINES, PIPELINES, RUN_LAST, RUN_ONCE
from .registry import Registry
from .rewriter import Change

__all__ = ["OptimizeResult", "optimize", "detect_mode", "prepare_opset"]

logger = logging.getLogger(__name__)


@dataclass
class OptimizeResult:
    """The optimized model, every change made, and per-pass statistics."""

    model: onnx.ModelProto
    changes: list[Change]
    mode: str
    passes: list[str]
    stats: dict[str, PassStat] = field(default_factory=dict)
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    #: What "before" is: "input" (fix path) or "insert-only" (PTQ: the naive placement of the same model).
    before_label: str = "input"
    #: Ways the result is worse than ``before`` (fix path: more standalone Q/DQ or validity problems); empty if none.
    regressions: list[str] = field(default_factory=list)

    def by_pass(self) -> dict[str, dict[str, int]]:
        """{pass: {rule: number of changes}}, in pipeline order."""
        out: dict[str, Counter[str]] = defaultdict(Counter)
        for name in self.passes:
            out[name]
        for c in self.changes:
            if c.kind != "note":  # notes are findings, not edits; the JSON report keeps them
                out[c.pass_name][c.rule] += 1
        return {k: dict(v) for k, v in out.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "passes": self.passes,
            "summary": self.by_pass(),
            "changes": [c.to_dict() for c in self.changes],
            "timing_s": {k: round(v.seconds, 4) for k, v in self.stats.items()},
            "analysis_before": self.before,
            "analysis_after": self.after,
            "before_is": self.before_label,
            "regressions": list(self.regressions),
        }


def detect_mode(model: onnx.ModelProto) -> str:
    """'fix' for a model that already carries Q/DQ, else 'ptq'."""
    return "fix" if has_qdq(model) else "ptq"


def _analysis(model_graph: Any, trt_version: tuple[int, int] | None = None, own: Any = None) -> dict[str, Any] | None:
    from .analysis import predict

    try:
        return predict(model_graph, trt_version=trt_version, own=own).to_dict()
    except Exception as exc:  # the analysis is a report, never a reason to fail an optimization
        logger.warning("static TensorRT analysis failed: %s", exc)
        return None
    finally:  # the analysis's private graph (under gc_paused nothing else frees its cycles)
        collect_small(len(model_graph.graph.node) if isinstance(model_graph, onnx.ModelProto) else len(model_graph.nodes))


def _resolve(
    model: onnx.ModelProto,
    passes: Sequence[str | Pass] | None,
    mode: str | None,
    registry: Registry,
    extra_passes: Sequence[str | Pass] = (),
) -> tuple[str, list[Pass], list[Pass]]:
    """(mode, pipeline passes, extra passes) for an optimize call."""
    if passes is None:
        mode = mode or detect_mode(model)
        if mode not in PIPELINES:
            raise UsageError(f"unknown pipeline '{mode}' (known: {', '.join(PIPELINES)})")
        names: list[str | Pass] = [n for n in PIPELINES[mode] if n in registry]
    else:
        mode = mode or "custom"
        names = list(passes)
    # A named pipeline repeats until nothing changes (PassManager's fixpoint): its passes open work
    # for each other. Explicit pass lists and user patterns run exactly once, in the order given.
    pipeline = [registry.create(p) if isinstance(p, str) else p for p in names]
    extras = [registry.create(p) if isinstance(p, str) else p for p in extra_passes]
    return mode, pipeline, extras


def prepare_opset(
    model: onnx.ModelProto,
    passes: Sequence[str | Pass] | None = None,
    config: Config | None = None,
    *,
    mode: str | None = None,
    registry: Registry | None = None,
    allow_upgrade: bool = True,
    where: str | None = None,
) -> tuple[onnx.ModelProto, list[Change]]:
    """Give ``model`` the opset its passes need (default: the pipeline for ``mode``) before any costly work.

    The CLI calls this right after loading, so a refusal comes before calibration and calibration
    runs on the model the passes will see. Returns the (possibly upgraded) model and the change to log.
    """
    config = config or Config()
    objs = list(passes) if passes is not None and all(isinstance(p, Pass) for p in passes) else None
    if objs is None:
        _, pipeline, extras = _resolve(model, passes, mode, registry or Registry.builtin())
        objs = pipeline + extras
    needs = [need for p in objs if (need := p.opset_needed(model, config))[0] > 0]
    return ensure_opset(model, needs, allow_upgrade=allow_upgrade, where=where)


def optimize(
    model: onnx.ModelProto,
    passes: Sequence[str | Pass] | None = None,
    *,
    config: Config | None = None,
    registry: Registry | None = None,
    ranges: RangeProvider | None = None,
    mode: str | None = None,
    extra_passes: Sequence[str | Pass] = (),
    instruments: Sequence[Instrument] = (),
    verify: bool = True,
    analyze: bool = True,
    opset_upgrade: bool = True,
    prior_changes: Sequence[Change] = (),
    calib_data: Any = None,
    calib_model: onnx.ModelProto | None = None,
) -> OptimizeResult:
    """Run qdqsurgeon's passes over ``model`` (which is not modified) and return the result.

    ``passes``: names or Pass objects; None runs the pipeline for ``mode`` ("ptq", "fix",
    "cleanup"; detected from the model when None). ``ranges`` supplies calibrated activation
    ranges to passes that insert Q/DQ. ``extra_passes`` run after the pipeline (user patterns).
    A model below the opset a pass needs is upgraded first (logged, numerically checked;
    ``opset_upgrade=False`` refuses instead). ``prior_changes`` (e.g. an upgrade the caller already
    made with :func:`prepare_opset`) head the change log. ``calib_data`` (re-iterable batches of real
    calibration data) and ``calib_model`` (the float model they run through) feed ``bias-correction``;
    by default they are the range provider's (:func:`calibration_source`), none for random data.
    """
    if calib_data is None:
        calib_model, calib_data = calibration_source(ranges)
    with gc_paused():
        return _optimize(model, passes, config, registry, ranges, mode, extra_passes, instruments, verify, analyze,
                         opset_upgrade, prior_changes, calib_data, calib_model)


def calibration_source(ranges: Any) -> tuple[onnx.ModelProto | None, Any]:
    """(float model, real calibration data) behind a range provider, or (None, None): a provider says so
    with a ``calibration_source`` attribute (:class:`~qdqsurgeon.ranges.CalibrationRanges` does, unless
    its data is random; a TensorRT cache through its fallback)."""
    source = getattr(ranges, "calibration_source", None)
    found = source() if callable(source) else None
    return found if found is not None else (None, None)


def _optimize(model: onnx.ModelProto, passes: Sequence[str | Pass] | None, config: Config | None,
              registry: Registry | None, ranges: RangeProvider | None, mode: str | None,
              extra_passes: Sequence[str | Pass], instruments: Sequence[Instrument], verify: bool, analyze: bool,
              opset_upgrade: bool, prior_changes: Sequence[Change], calib_data: Any = None,
              calib_model: onnx.ModelProto | None = None) -> OptimizeResult:
    registry = registry or Registry.builtin()
    config = config or Config()
    mode, pipeline, extras = _resolve(model, passes, mode, registry, extra_passes)
    pass_objs = pipeline + extras
    model, upgraded = prepare_opset(model, pass_objs, config, allow_upgrade=opset_upgrade)

    ctx = PassContext(config=config, ranges=ranges, pipeline=mode, calib_data=calib_data, calib_model=calib_model)
    graph = import_model(model)
    baseline_mode = BASELINES.get(mode) if passes is None else None
    # PTQ's "before" is its insert-only baseline's analysis; the input's own is only needed when
    # the run's analysis fails, and is then taken from a fresh import (the passes edit ``graph``).
    before_later = analyze and mode == "ptq" and baseline_mode is not None
    base_pipeline: list[Pass] = []
    side: _SideJob | None = None
    head: _Staged | None = None
    if analyze and baseline_mode is not None:
        _, base_pipeline, _ = _resolve(model, None, baseline_mode, registry)
        shared = _shared_head(pipeline, base_pipeline)
        fork = can_fork(len(graph.nodes))
        base_graph = graph
        if shared:
            # The passes both pipelines start with (run once: removing Identity, inserting Q/DQ, which
            # calibrates and reads every weight) run here once; the baseline takes the graph from there
            # to its end: a forked child its own copy of the whole process, else a copy of the graph
            # (which shares the weight arrays: on a 2.5 GB model the second insertion was 15 % of a run).
            try:
                head = _stage_passes(model, graph, pipeline[:shared], [], ctx, instruments, False, fixpoint=False)
                base_graph = graph if fork else graph.copy()
            except (QdqError, MemoryError):
                raise
            except Exception as exc:  # everything runs again below, from a fresh import
                logger.debug("pipeline failed (%s)", exc)
                graph = base_graph = import_model(model)
                head, fork = None, False
        side = _SideJob(model, base_graph, base_pipeline, extras, ctx, verify, need_before=not before_later, head=head,
                        fork=fork)
        before = None
    else:
        before = _before(model, config.trt_version) if analyze and not before_later else None
    try:
        run = _run(model, graph, pipeline, extras, ctx, instruments, verify, fixpoint=passes is None, analyze=analyze,
                   head=head)
    except BaseException:
        if side is not None:
            side.close(kill=True)
        raise
    if side is not None and not before_later:
        before = side.before()
    if before_later and run.analysis is None:
        before = _before(model, config.trt_version)
    names = [p.name for p in pass_objs]
    label, regressions = "input", []
    if side is not None and run.analysis is not None:
        # Never worse (issue 12 item 3): the same model through a plainer pipeline is the yardstick.
        # PTQ's is the naive insert-only placement (it also becomes the "before" column); the fix
        # path's is the input's own placement, repaired only where TensorRT would reject it.
        base_analysis = side.analysis()
        if mode == "ptq":
            before, label = base_analysis, "insert-only"
        if base_analysis is not None and _score(base_analysis) < _score(run.analysis):
            lost = f"{run.analysis['standalone_qdq_layers']} standalone Q/DQ and {run.analysis['validity_problems']} validity problems"
            names = [p.name for p in base_pipeline + extras]
            base = side.run()
            # The baseline keeps the pipeline's RUN_LAST tail it lacks (bias correction, FP16 regions): they
            # change no placement (so not the score) and run on the placement kept, not on both.
            kept = set(names)
            tail = [p for p in pipeline if p.name in RUN_LAST and p.name not in kept]
            if tail:  # (the model the user gets is analysed again: FP16 regions change what TensorRT builds)
                fixed = _run(base.model, import_model(base.model), tail, [], ctx, instruments, verify, fixpoint=False,
                             analyze=True)
                base = _Run(fixed.model, base.changes + fixed.changes, {**base.stats, **fixed.stats},
                            fixed.analysis if fixed.analysis is not None else base.analysis)
                names += [p.name for p in tail]
            run = base
            run.changes.insert(0, Change("optimize", "P2", "note", "<model>",
                                         f"the {mode} pipeline would leave {lost}; the {baseline_mode} pipeline leaves "
                                         f"{base_analysis['standalone_qdq_layers']} and {base_analysis['validity_problems']}: kept that"))
        if mode == "fix" and before is not None:
            regressions = _regressions(before, run.analysis)
    if side is not None:
        side.close()
    changes = [*prior_changes, *upgraded, *run.changes]
    if any(c.pass_name == UPGRADE_PASS for c in changes):
        names.insert(0, UPGRADE_PASS)
    return OptimizeResult(run.model, changes, mode, names, run.stats, before, run.analysis, label, regressions)


class _SideJob:
    """The never-worse baseline of an optimize call, and the fix path's analysis of the input.

    Both are independent of the main pipeline. On a large graph they run in a forked child
    (:class:`.background.Background`) while the parent runs the main pipeline (issue 15: a 100k-node
    PTQ run spent about a third of its time on them): the parent has run the passes both pipelines
    start with (``head``: insertion and its calibration among them) on ``graph``, and the
    child takes its copy of that graph through the rest of the baseline. Only the two analyses cross
    back; in the rare case the baseline wins, the parent runs it again itself, from the start, which
    gives the same model (every pass is deterministic). On a small graph (``fork`` false) everything runs
    here at once, the baseline on a copy of ``graph`` after ``head`` (sharing its weight arrays), or from a
    fresh import when there is no ``head``.
    """

    def __init__(self, model: onnx.ModelProto, graph: Any, pipeline: list[Pass], extras: list[Pass], ctx: PassContext,
                 verify: bool, *, need_before: bool, head: _Staged | None = None, fork: bool = False) -> None:
        self.model, self.pipeline, self.extras, self.ctx, self.verify = model, pipeline, extras, ctx, verify
        trt_version = ctx.config.trt_version

        def work() -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
            before = _before(model, trt_version) if need_before else None
            if head is None:
                return before, self.run().analysis
            # the forked copy of the parent's graph (or a copy of it), ``head``'s passes into the pipeline; only
            # its analysis is used, and a baseline that wins is run again (and checked) by the caller: no check
            try:
                return before, _run_passes(model, graph, pipeline, extras, ctx, (), False, fixpoint=True,
                                           analyze=True, head=head, check=False).analysis
            except (QdqError, MemoryError):
                raise
            except Exception as exc:  # from the start, checked after every pass if need be (as _run does)
                logger.debug("baseline failed (%s); running it again from the input", exc)
                return before, self.run().analysis

        def fallback() -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
            return (_before(model, trt_version) if need_before else None), self.run().analysis

        self._job = Background(work, fork=fork and head is not None, fallback=fallback, name="qdqsurgeon-baseline")

    def before(self) -> dict[str, Any] | None:
        """The analysis of the input (fix path); None when it was not asked for or failed."""
        return self._job.result()[0]

    def analysis(self) -> dict[str, Any] | None:
        """The baseline's analysis."""
        return self._job.result()[1]

    def run(self) -> _Run:
        """The baseline's whole result, computed in this process."""
        return _run(self.model, import_model(self.model), self.pipeline, self.extras, self.ctx, (), self.verify,
                    fixpoint=True, analyze=True)

    def close(self, kill: bool = False) -> None:
        self._job.close(kill)


def _shared_head(pipeline: list[Pass], base: list[Pass]) -> int:
    """How many passes both pipelines start with that run once (their fixpoint repeats what follows)."""
    n = 0
    while n < min(len(pipeline), len(base)) and pipeline[n].name == base[n].name and pipeline[n].name in RUN_ONCE:
        n += 1
    return n


def _before(model: onnx.ModelProto, trt_version: tuple[int, int] | None = None) -> dict[str, Any] | None:
    """The analysis of the input ``model`` with its validity problems, on a fresh import the prediction takes over."""
    graph = import_model(model)
    problems = len(validity_problems(graph))
    before = _analysis(model, trt_version, own=graph)
    if before is not None:
        before["validity_problems"] = problems
    return before


@dataclass
class _Run:
    model: onnx.ModelProto
    changes: list[Change]
    stats: dict[str, PassStat]
    analysis: dict[str, Any] | None
    verified: bool = True


def _run(model: onnx.ModelProto, graph: Any, pipeline: list[Pass], extras: list[Pass], ctx: PassContext,
         instruments: Sequence[Instrument], verify: bool, *, fixpoint: bool, analyze: bool,
         head: _Staged | None = None) -> _Run:
    """One pipeline over ``graph`` (imported from ``model``), then the exported, checked model and its analysis.

    Verification (onnx's full check) runs once, on the exported result, rather than on an export
    after every pass that changed the graph: that was most of the time on large graphs. Only when
    the result fails (or a pass fails) is the pipeline run again from ``model`` with the check after
    every pass, which names the pass that broke the model and honours the input's own verdict
    exactly as before (:class:`VerifyInstrument`).

    ``head``: the pipeline's first passes, already run on ``graph``; the rest continue from there.
    """
    if not verify:
        return _run_passes(model, graph, pipeline, extras, ctx, instruments, False, fixpoint=fixpoint, analyze=analyze,
                           head=head)
    try:
        run = _run_passes(model, graph, pipeline, extras, ctx, instruments, False, fixpoint=fixpoint, analyze=analyze,
                          check_result=True, head=head)
        if run.verified:
            return run
    except (QdqError, MemoryError):  # a deliberate refusal (or no memory): running again would say the same
        raise
    except Exception as exc:  # a pass may have failed on what an earlier one broke: find out below
        logger.debug("pipeline failed (%s); running it again with a check after every pass", exc)
    return _run_passes(model, import_model(model), pipeline, extras, ctx, instruments, True, fixpoint=fixpoint,
                       analyze=analyze)


def _run_passes(model: onnx.ModelProto, graph: Any, pipeline: list[Pass], extras: list[Pass], ctx: PassContext,
                instruments: Sequence[Instrument], verify_each: bool, *, fixpoint: bool, analyze: bool,
                check_result: bool = False, head: _Staged | None = None, check: bool = True) -> _Run:
    if head is None:
        staged = _stage_passes(model, graph, pipeline, extras, ctx, instruments, verify_each, fixpoint=fixpoint)
    else:
        rest = _stage_passes(model, graph, pipeline[len(head.passes):], extras, ctx, instruments, verify_each,
                             fixpoint=fixpoint, clean=True)
        staged = _Staged(rest.graph, head.changes + rest.changes, head.modified or rest.modified,
                         {**head.stats, **rest.stats}, head.passes + rest.passes)
    return _finish(model, staged, ctx, check_result=check_result, analyze=analyze, check=check)


@dataclass
class _Staged:
    """A pipeline's passes done, the graph not yet exported."""

    graph: Any
    changes: list[Change]
    modified: bool
    stats: dict[str, PassStat]
    passes: list[str]


def _stage_passes(model: onnx.ModelProto, graph: Any, pipeline: list[Pass], extras: list[Pass], ctx: PassContext,
                  instruments: Sequence[Instrument], verify_each: bool, *, fixpoint: bool, clean: bool = False) -> _Staged:
    """The passes of a pipeline over ``graph``; ``clean``: the graph is as an earlier pipeline run left it."""
    timing = TimingInstrument()
    insts: list[Instrument] = [timing, *instruments]
    if verify_each:
        insts.append(VerifyInstrument(source=model))
    if os.environ.get("QDQSURGEON_AUDIT") or logger.isEnabledFor(logging.DEBUG):
        from .passes.audit import AuditInstrument  # --debug and the test suite: no edit escapes the log

        insts.append(AuditInstrument())
    once = 0
    while fixpoint and once < len(pipeline) and pipeline[once].name in RUN_ONCE:
        once += 1
    last = len(pipeline)
    while fixpoint and last > once and pipeline[last - 1].name in RUN_LAST:
        last -= 1
    result = PassManager(pipeline[:last], instruments=insts, fixpoint=fixpoint, repeat_from=once).run(graph, ctx, clean=clean)
    modified = result.modified
    if last < len(pipeline):  # once, on the placement the fixpoint settled on (pipelines.RUN_LAST)
        tail = PassManager(pipeline[last:], instruments=insts).run(result.graph, ctx, clean=True)
        modified = modified or tail.modified
        result = replace(tail, changes=result.changes + tail.changes, modified=modified)
    if extras:
        tail = PassManager(extras, instruments=insts).run(result.graph, ctx)
        modified = modified or tail.modified
        result = replace(tail, changes=result.changes + tail.changes, modified=modified)
    return _Staged(result.graph, list(result.changes), modified, timing.stats, [p.name for p in pipeline])


def _finish(model: onnx.ModelProto, staged: _Staged, ctx: PassContext, *, check_result: bool, analyze: bool,
            check: bool = True) -> _Run:
    """Export a pipeline's graph, check it (``check``: at all), and analyse it.

    The analysis takes the pipeline's graph over (nothing else reads it after the validity count), with
    the shapes ONNX infers on the exported model, rather than importing the export again. On a large
    graph it runs in a forked child from the export on, while this process checks the model and counts
    validity problems on its own copy of the graph (issue 15).
    """
    out = export_model(staged.graph)
    graph, trt_version = staged.graph, ctx.config.trt_version
    job = None
    if analyze and can_fork(len(graph.nodes)):
        job = Background(lambda: _analysis(out, trt_version, own=graph), fork=True,
                         fallback=lambda: _analysis(out, trt_version), name="qdqsurgeon-analysis")
    try:
        # What VerifyInstrument checked after the last pass that changed the graph (before the metadata).
        full_check = check_result and staged.modified
        payload = tensor_payload(out) if full_check or check else None  # (counted once for the checks below)
        verified = not full_check or VerifyInstrument._problem(out, payload=payload) is None
        if not verified:  # _run runs the pipeline again with a check after every pass, which names the culprit
            return _Run(out, staged.changes, staged.stats, None, False)
        checked_ir = out.ir_version
        carry_metadata(out, model)
        if not check:  # (the never-worse baseline's analysis)
            pass
        elif is_large(out, payload):
            logger.info("model over 2 GB: onnx.checker runs when it is saved, not in memory")
        elif not (full_check and verified and _same_header(out, checked_ir)):  # else the full check covered it
            try:
                check_model(out, payload=payload)
            except onnx.checker.ValidationError as exc:
                raise ModelError(f"the optimized model fails onnx.checker: {str(exc).splitlines()[0]}") from exc
        if not analyze:
            return _Run(out, staged.changes, staged.stats, None, verified)
        problems = len(validity_problems(graph))
        analysis = job.result() if job is not None else _analysis(out, trt_version, own=graph)
    finally:
        if job is not None:
            job.close(kill=True)
    staged.graph = None
    if analysis is not None:
        analysis["validity_problems"] = problems
    return _Run(out, staged.changes, staged.stats, analysis, verified)


def _same_header(out: onnx.ModelProto, checked_ir: int) -> bool:
    """Whether the model-level fields :func:`carry_metadata` copied leave the full check's verdict standing:
    the same IR version as checked, and metadata keys the checker accepts (distinct)."""
    return out.ir_version == checked_ir and len({p.key for p in out.metadata_props}) == len(out.metadata_props)


def _score(analysis: dict[str, Any]) -> tuple[int, int]:
    """Lower is better: TensorRT validity problems first, then predicted standalone Q/DQ kernels."""
    return analysis["validity_problems"], analysis["standalone_qdq_layers"]


def _regressions(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    out = []
    for key, what in (("validity_problems", "TensorRT validity problems"), ("standalone_qdq_layers", "predicted standalone Q/DQ layers")):
        if after[key] > before[key]:
            out.append(f"{what} {before[key]} -> {after[key]}")
    return out
