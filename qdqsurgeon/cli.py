"""Command-line interface: a thin layer over the Python API (``qdqsurgeon.api``)."""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import DataError, ModelError, QdqError, UsageError

__all__ = ["cli", "main"]

logger = logging.getLogger(__name__)


class _Group(click.Group):
    """Turns expected failures into one line on stderr and an exit code; never a traceback unless --debug."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except QdqError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except click.UsageError as exc:
            # Bad arguments to a command (an unreadable path, an unknown option, a bad choice):
            # one line like every other refusal, not click's three-line usage block.
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            click.echo(f"error: {' '.join(exc.format_message().split())}{hint}", err=True)
            ctx.exit(exc.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            ctx.exit(130)
        except BrokenPipeError:
            # `qdqsurgeon ... | head`: the reader left; stop quietly, as Unix tools do.
            import os

            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            ctx.exit(0)
        except Exception as exc:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            msg = str(exc).splitlines()[0] if str(exc) else ""
            click.echo(f"error: internal error: {type(exc).__name__}: {msg} (run with --debug for a traceback)", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="qdqsurgeon")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logging.")
@click.option("-v", "--verbose", is_flag=True, help="Show info logging.")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: bool) -> None:
    """Place and repair Q/DQ nodes in ONNX models so TensorRT builds fast, accurate INT8 engines.

    \b
    Example:
      qdqsurgeon optimize model.onnx model.int8.onnx --calib images/ --preprocess size=224
      qdqsurgeon inspect model.int8.onnx --trt
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr, force=True)
    # onnx-graphsurgeon logs through its own logger; keep it quiet unless debugging.
    from onnx_graphsurgeon.logger import G_LOGGER

    G_LOGGER.severity = G_LOGGER.DEBUG if debug else G_LOGGER.ERROR


def main() -> None:
    cli(prog_name="qdqsurgeon")


def _write_atomic(path: Path, text: str) -> None:
    """Write a small text file through a temporary file and a rename, like the models."""
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise UsageError(f"cannot write: {exc.strerror or exc}", path=str(path)) from exc


def _checked_regexes(patterns: tuple[str, ...]) -> tuple[str, ...]:
    import re

    for p in patterns:
        try:
            re.compile(p)
        except re.error as exc:
            raise UsageError(f"--exclude {p!r} is not a valid regular expression: {exc}") from None
    return patterns


def _trt_version(text: str | None) -> tuple[int, int] | None:
    """``--trt-version`` as (major, minor), None for the default (the newest release the rules describe)."""
    if text is None:
        return None
    from .trt_rules import parse_version

    try:
        return parse_version(text)
    except ValueError as exc:
        raise UsageError(f"--trt-version: {exc}") from None


_TRT_VERSION_HELP = ("TensorRT release to target, e.g. 10.6 (default: the newest the rules describe). Selects the "
                     "version-dependent rules (ConvTranspose weight axis, INT8 weight initializers, E8.1) and which "
                     "predictions are flagged unverified.")


def _split(values: tuple[str, ...] | str | None) -> list[str]:
    if not values:
        return []
    if isinstance(values, str):
        values = (values,)
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


# ------------------------------------------------------------------------------------------------
# passes
@cli.command("passes")
@click.option("--patterns", "pattern_paths", multiple=True, type=click.Path(), help="User pattern file or folder to load.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def passes_cmd(pattern_paths: tuple[str, ...], as_json: bool) -> None:
    """List passes and patterns with their summary and origin.

    \b
    Example:
      qdqsurgeon passes --patterns patterns/
    """
    from .pipelines import PIPELINES
    from .registry import Registry

    reg = Registry.builtin()
    reg.load_entry_points()
    for p in pattern_paths:
        reg.load_path(p)
    entries = reg.entries()
    if as_json:
        click.echo(json.dumps({
            "passes": [{"name": e.name, "kind": e.kind, "summary": e.summary, "origin": e.origin, "rules": list(e.rules)} for e in entries],
            "pipelines": {k: list(v) for k, v in PIPELINES.items()},
        }, indent=2))
        return
    width = max(len(e.name) for e in entries)
    for e in entries:
        rules = f" [{', '.join(e.rules)}]" if e.rules else ""
        click.echo(f"{e.name:<{width}}  {e.summary}{rules}  ({e.origin})")
    click.echo("")
    for name, seq in PIPELINES.items():
        click.echo(f"pipeline {name}: {' -> '.join(seq)}")


# ------------------------------------------------------------------------------------------------
# inspect
@cli.command("inspect")
@click.argument("model", type=click.Path(readable=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--trt", is_flag=True, help="Add the static TensorRT analysis (predicted INT8 layers, standalone Q/DQ).")
@click.option("--trt-version", "trt_version", default=None, help=_TRT_VERSION_HELP)
def inspect_cmd(model: str, as_json: bool, trt: bool, trt_version: str | None) -> None:
    """Q/DQ census of MODEL and its validity problems against TensorRT (rules V1-V6).

    Exit code 0 whether or not problems are found; problems are listed.

    \b
    Example:
      qdqsurgeon inspect model.onnx --json
    """
    from .inspection import inspect_model
    from .io import load

    version = _trt_version(trt_version)
    result = inspect_model(load(model, infer_shapes=True), trt=trt, trt_version=version)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    d = result.to_dict()
    click.echo(f"{model}: opset {d['opset']}, {d['nodes']} nodes")
    top = ", ".join(f"{k} {v}" for k, v in list(d["ops"].items())[:12])
    click.echo(f"  ops: {top}{', ...' if len(d['ops']) > 12 else ''}")
    click.echo(f"  Q/DQ: {d['qdq']['quantize']} QuantizeLinear, {d['qdq']['dequantize']} DequantizeLinear")
    w = d["weighted_ops"]
    click.echo(f"  weighted ops: {w['quantized']}/{w['total']} with quantized activation and weight")
    if d["scale_dtypes"]:
        click.echo(f"  scale dtypes: {d['scale_dtypes']}; zero-point dtypes: {d['zero_point_dtypes']}")
    if d["per_channel"]:
        axes = sorted({str(p['axis']) for p in d['per_channel']})
        click.echo(f"  per-channel Q/DQ: {len(d['per_channel'])} (axes {', '.join(axes)})")
    if d["blocked"]:
        kinds = sorted({f"{b['dtype']} block {b['block_size']}" for b in d["blocked"]})
        click.echo(f"  block-quantized Q/DQ: {len(d['blocked'])} ({', '.join(kinds)})")
    if trt and d.get("trt"):
        t = d["trt"]
        click.echo(f"  TensorRT (static prediction): {t['int8_weighted_ops']} INT8 weighted ops, "
                   f"INT8 MAC fraction {t['int8_mac_fraction']:.3f}, {t['standalone_qdq_layers']} standalone Q/DQ layers, "
                   f"{t['precision_transitions']} precision transitions; {len(t.get('kernels', []))} kernels "
                   f"(engine layers, --json lists them)")
        for name in t["standalone_qdq"][:20]:
            click.echo(f"    standalone: {name}")
        if t.get("unverified"):
            click.echo(f"  predictions resting on rules unverified for TensorRT {t['trt_version']}:")
            for u in t["unverified"]:
                names = ", ".join(u["nodes"][:3]) + (f", ... ({len(u['nodes'])} in all)" if len(u["nodes"]) > 3 else "")
                click.echo(f"    [{u['rule']}] {u['claim']}: {names}")
    _print_sparsity(d.get("sparsity"))
    probs = d["problems"]
    click.echo(f"  problems: {len(probs)}")
    for p in probs[:30]:
        click.echo(f"    [{p['rule']}] {p['node']}: {p['message']}")
    if len(probs) > 30:
        click.echo(f"    ... {len(probs) - 30} more (use --json)")


def _print_sparsity(s: dict[str, Any] | None) -> None:
    """2:4 sparsity lines of ``inspect`` (issue 16); the per-layer rows only when some weight is sparse."""
    if not s or not s["layers_total"]:
        return
    click.echo(f"  2:4 sparsity: {s['layers_2_4']}/{s['layers_total']} weighted ops 2:4 along the reduction axis, "
               f"{s['layers_sparse_ready']} could run TensorRT sparse kernels; sparse-ready MAC share "
               f"{s['sparse_mac_fraction']:.3f} ({s['sparse_mac_fraction_int8']:.3f} if every layer ran INT8)")
    rows = s["details"]
    if not any(r["is_2_4"] or (r["eligible"] and r["sparse_group_fraction"] >= 0.5) for r in rows):
        return
    for r in rows[:30]:
        why = "; ".join(r["reasons"]) or "all conditions hold"
        click.echo(f"    {r['node']} ({r['op']}): {100 * r['sparse_group_fraction']:.0f}% of groups 2:4, "
                   f"{r['precision']}, {'sparse-ready' if r['sparse_ready'] else 'not sparse-ready'}: {why}")
    if len(rows) > 30:
        click.echo(f"    ... {len(rows) - 30} more (use --json)")


# ------------------------------------------------------------------------------------------------
# optimize
def _example_paths() -> tuple[Path, Path]:
    from .examples import example_calibration, example_model

    return example_model(), example_calibration()


def _print_summary(res: Any, src: str, dst: str, seconds: float) -> None:
    n = len([c for c in res.changes if c.kind != "note"])
    click.echo(f"qdqsurgeon optimize: {src} -> {dst}")
    label = {"ptq": "PTQ (float model: insert and place Q/DQ)",
             "fix": "fix (model already has Q/DQ: repair and re-place, keeping learned scales)"}.get(res.mode, res.mode)
    click.echo(f"  pipeline: {label}; {len(res.passes)} passes, {n} changes, {seconds:.2f} s")
    summary = res.by_pass()
    width = max([len(p) for p in summary] + [4])
    for name, rules in summary.items():
        total = sum(rules.values())
        detail = ", ".join(f"{r}:{c}" for r, c in sorted(rules.items(), key=lambda kv: -kv[1]))
        click.echo(f"  {name:<{width}}  {total:5d}  {detail}")
    for c in res.changes:
        if c.pass_name == "optimize":
            click.echo(f"  note: {c.detail}")
    if res.before is not None and res.after is not None:
        b, a = res.before, res.after
        click.echo(f"  static TensorRT analysis   {res.before_label:>12}   after")
        click.echo(f"    standalone Q/DQ layers    {b['standalone_qdq_layers']:12d}  {a['standalone_qdq_layers']:6d}")
        click.echo(f"    validity problems         {b.get('validity_problems', 0):12d}  {a.get('validity_problems', 0):6d}")
        click.echo(f"    INT8 weighted ops         {b['int8_weighted_ops']:12d}  {a['int8_weighted_ops']:6d}")
        click.echo(f"    INT8 MAC fraction         {b['int8_mac_fraction']:12.3f}  {a['int8_mac_fraction']:6.3f}")
    for r in res.regressions:
        click.echo(click.style(f"  REGRESSION: {r} (worse than the input)", fg="red", bold=True))


@cli.command("optimize")
@click.argument("paths", nargs=-1, type=click.Path(readable=False))
@click.option("--example", is_flag=True, help="Use the bundled example model and calibration data as input.")
@click.option("--passes", "pass_names", default=None, help="Comma-separated pass names to run instead of the default pipeline.")
@click.option("--patterns", "pattern_paths", multiple=True, type=click.Path(), help="User pattern file or folder (PATTERNS/PASSES); run after the pipeline.")
@click.option("--report", "report_path", type=click.Path(readable=False), help="Write the full change log as JSON.")
@click.option("--opset", type=int, default=None, help="Upgrade the model to this opset first (onnx version converter).")
@click.option("--no-opset-upgrade", is_flag=True,
              help="Refuse a model below the opset a pass needs (13 for per-channel weights) instead of upgrading it.")
@click.option("--calib", type=click.Path(readable=False), help="Calibration data: .npz, folder of .npz/.npy, or folder of images.")
@click.option("--method", type=click.Choice(["auto", "max", "percentile", "entropy", "mse"]), default=None,
              help="Calibration method (default: percentile; auto departs from it, for the model or a tensor, where another method's error at the layers reading the tensors is lower on every calibration fold, held out too)." )
@click.option("--percentile", type=float, default=99.99, show_default=True, help="Percentile for --method percentile.")
@click.option("--preprocess", default=None, help="Image preprocessing, e.g. 'size=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,scale=1/255'.")
@click.option("--calib-random", type=int, default=None, help="Smoke test only: calibrate on N random inputs.")
@click.option("--calib-cache", type=click.Path(readable=False), help="Import activation scales from a TensorRT calibration cache.")
@click.option("--weights", type=click.Choice(["float", "int8"]), default="float", show_default=True, help="Weights as float+Q/DQ or int8 initializer+DQ.")
@click.option("--trt-version", "trt_version", default=None, help=_TRT_VERSION_HELP)
@click.option("--exclude", multiple=True, help="Regex over node names to leave unquantized (repeatable).")
@click.option("--exclude-op", multiple=True, help="Op type to leave unquantized (repeatable).")
@click.option("--quantize-bmm/--no-quantize-bmm", default=None,
              help="MatMuls between two activations: by default the two of each attention block are quantized "
                   "(INT8 MHA fusion) and others stay float; --quantize-bmm quantizes all, --no-quantize-bmm none.")
@click.option("--align", type=click.Choice(["max", "scales", "output"]), default="max", show_default=True,
              help="Scale unification policy (P4-P6): union of the tied tensors' calibrated ranges, largest existing scale, or the consumer's.")
@click.option("--quantize-small-convs", is_flag=True,
              help="Also quantize Convs whose small channel counts misalign INT8 kernels (left float by default, P11).")
@click.option("--keep-output-layers", is_flag=True, help="Also quantize weighted ops that feed graph outputs (P9).")
@click.option("--bias-correction/--no-bias-correction", default=None,
              help="PTQ with --calib: each INT8 layer's float bias absorbs the mean output shift of its own weight "
                   "rounding (measured on the calibration data), applied only if a held-out check on the calibration "
                   "batches finds it improves the outputs (default: on; --no-bias-correction: off; "
                   "--bias-correction without real data says so).")
@click.option("--bias-correction-rounding", type=click.Choice(["none", "input", "all"]), default="none", show_default=True,
              help="Bias correction: whose activation rounding it corrects besides the weight rounding: none, layers "
                   "reading a network input, or every INT8 layer (measured on the float model's inputs: YOLOv8n +8.9 dB "
                   "on letterboxed photos, but the PP-OCR classifier -12.6 dB).")
@click.option("--float16", is_flag=True, help="Convert float regions to FP16 for strongly typed TensorRT builds (P10).")
@click.option("--io-float16", is_flag=True, help="With --float16: make graph inputs/outputs FP16 too.")
@click.option("--requantize", is_flag=True, help="Model already has Q/DQ: drop it and calibrate afresh (needs --calib).")
@click.option("--repair-zero-scales", is_flag=True,
              help="Give zero Q/DQ scales (refused by default, V1) the smallest scale 1e-8 instead of stopping.")
@click.option("--check", "run_check", is_flag=True, help="Compare the result with the input in onnxruntime (SQNR).")
@click.option("--eval", "--data", "eval_path", type=click.Path(readable=False),
              help="Evaluation data for --check and --target (default: the calibration data).")
@click.option("--target", "target_text", default=None,
              help="Mixed precision: keep the most harmful groups float until the target is met on the evaluation data: "
                   "cosine>=X, sqnr>=X (dB) or top1>=X (a fraction; accuracy with --labels, else agreement with the float model).")
@click.option("--max-drop", type=float, default=None, help="Mixed precision: top-1 at most this many points below the float model's.")
@click.option("--labels", "labels_path", type=click.Path(readable=False),
              help="Class labels of the evaluation samples (.npy of integers) for top1 targets.")
@click.option("--save-precision", "save_precision_path", type=click.Path(readable=False),
              help="Write the per-layer precision --target chose (JSON: node name -> int8/float).")
@click.option("--precision", "precision_path", type=click.Path(readable=False),
              help="Apply a per-layer precision file (from --save-precision) instead of searching: no evaluation data needed.")
@click.option("--jobs", type=int, default=1, show_default=True, help="Worker processes for --target's sensitivity analysis.")
@click.option("--build", "engine_path", type=click.Path(readable=False), help="Build a TensorRT engine from the result (needs TensorRT).")
@click.option("--no-analysis", is_flag=True, help="Skip the before/after static TensorRT analysis.")
@click.option("--allow-regression", is_flag=True,
              help="Exit 0 even when the fixed model is predicted worse than the input (more standalone Q/DQ or validity problems).")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
def optimize_cmd(paths: tuple[str, ...], example: bool, pass_names: str | None, pattern_paths: tuple[str, ...],
                 report_path: str | None, opset: int | None, no_opset_upgrade: bool, calib: str | None, method: str | None, percentile: float,
                 preprocess: str | None, calib_random: int | None, calib_cache: str | None, weights: str, trt_version: str | None,
                 exclude: tuple[str, ...], exclude_op: tuple[str, ...], quantize_bmm: bool | None, align: str,
                 quantize_small_convs: bool, keep_output_layers: bool, bias_correction: bool | None,
                 bias_correction_rounding: str, float16: bool, io_float16: bool, requantize: bool, repair_zero_scales: bool,
                 run_check: bool, eval_path: str | None, target_text: str | None, max_drop: float | None, labels_path: str | None,
                 save_precision_path: str | None, precision_path: str | None, jobs: int,
                 engine_path: str | None, no_analysis: bool, allow_regression: bool, quiet: bool) -> None:
    """Optimize IN into OUT: insert (FP32 input) or repair (Q/DQ input) Q/DQ for TensorRT.

    An FP32 model takes the PTQ pipeline and needs calibration data (--calib, --calib-cache or
    --calib-random). A model that already has Q/DQ takes the fix pipeline and keeps its scales;
    with --calib it also calibrates the pairs placement adds where the model has none.

    \b
    Examples:
      qdqsurgeon optimize --example out.onnx
      qdqsurgeon optimize resnet.onnx resnet.int8.onnx --calib photos/ --preprocess size=224,scale=1/255
      qdqsurgeon optimize qat.onnx fixed.onnx --report changes.json
    """
    from .api import detect_mode, optimize, prepare_opset
    from .config import Config
    from .io import load, save
    from .ranges import build_ranges
    from .registry import Registry

    if example:
        if len(paths) != 1:
            raise UsageError("with --example give only the output path: qdqsurgeon optimize --example OUT.onnx")
        model_path, example_calib = _example_paths()
        src, dst = str(model_path), paths[0]
        if calib is None and calib_cache is None and not calib_random:
            calib = str(example_calib)
    else:
        if len(paths) != 2:
            raise UsageError("expected IN and OUT paths: qdqsurgeon optimize IN.onnx OUT.onnx")
        src, dst = paths
    if Path(dst).suffix.lower() != ".onnx":
        logger.warning("output %s does not end in .onnx", dst)
    if float16 is False and io_float16:
        raise UsageError("--io-float16 needs --float16")
    version = _trt_version(trt_version)
    if version is not None and weights == "int8":
        from .trt_rules import int8_weight_initializers

        if not int8_weight_initializers(version):
            raise UsageError(f"--weights int8: TensorRT {trt_version} does not read INT8 weight initializers "
                             "(from 10.0 only); use --weights float")
    t0 = time.perf_counter()
    # Every path is checked before any expensive work (loading, calibration): a run must not
    # spend minutes and then fail on an unwritable output (issue 17 item 9).
    from .io import check_output_path, check_readable, same_file

    check_readable(src)
    check_output_path(dst, src)
    if report_path:
        if same_file(Path(report_path), Path(src)) or same_file(Path(report_path), Path(dst)):
            raise UsageError("--report path is the input or output model; give the change log its own file", path=report_path)
        check_output_path(report_path, src)
    if engine_path:
        check_output_path(engine_path, src)
    for data_path in (calib, eval_path, calib_cache):
        if data_path and not Path(data_path).exists():
            raise UsageError("no such file or folder", path=data_path)
    if run_check and not (eval_path or calib):
        raise UsageError("--check needs --eval PATH or --calib PATH")
    target = _mixed_options(target_text, max_drop, precision_path, save_precision_path, labels_path, eval_path, calib, jobs, src)
    exclude = _checked_regexes(exclude)

    model = load(src, opset=opset)
    check_data = None
    if run_check:
        from .calibration import Preprocess, open_data

        # Opened (names, shapes, dtypes checked) now, before calibration, not after the run.
        check_data = open_data(eval_path or calib, model, Preprocess.parse(preprocess) if preprocess else None)
    registry = Registry.builtin()
    registry.load_entry_points()
    user = [e.name for p in pattern_paths for e in registry.load_path(p)]
    config = Config(weights=weights, exclude=list(exclude), exclude_ops=_split(exclude_op), quantize_bmm=quantize_bmm,
                    align=align, keep_output_layers=keep_output_layers, float16=float16, io_float16=io_float16,
                    trt_version=version, repair_zero_scales=repair_zero_scales, quantize_small_convs=quantize_small_convs,
                    bias_correction=bias_correction, bias_correction_rounding=bias_correction_rounding)
    if version is not None:
        from .trt_rules import convtranspose_axis_for

        config.convtranspose_axis = convtranspose_axis_for(version)
    mode = detect_mode(model)
    from .inspection import OPERATOR_QUANT_OPS
    from .passes.normalize_qdq import OPERATOR_QUANT_MESSAGE

    operator_ops = sorted({n.op_type for n in model.graph.node if n.op_type in OPERATOR_QUANT_OPS})
    if operator_ops:  # refused now, not after calibration (normalize-qdq would refuse it too)
        raise ModelError(OPERATOR_QUANT_MESSAGE.format(ops=", ".join(operator_ops)), path=src)
    ranges = None
    if requantize:
        if mode != "fix":
            raise UsageError("--requantize is for models that already have Q/DQ")
        if calib is None and calib_cache is None and not calib_random:
            raise UsageError("--requantize needs calibration data: --calib PATH (or --calib-cache/--calib-random)")
        # Strip the old quantization first, so calibration runs on the float model it stood for.
        model = optimize(model, ["remove-qdq"], registry=registry, analyze=False).model
        mode = "ptq"
    passes = _split(pass_names) or None
    # Opset first: a refusal comes before calibration, and calibration sees the model the passes get.
    model, upgraded = prepare_opset(model, passes, config, mode=None if passes else mode, registry=registry,
                                    allow_upgrade=not no_opset_upgrade, where=src)
    if mode == "ptq" or calib or calib_cache or calib_random:
        ranges = build_ranges(model, calib=calib, method=method, percentile=percentile, preprocess=preprocess,
                              calib_random=calib_random, calib_cache=calib_cache, progress=not quiet)
        if ranges is None and passes is None:
            raise UsageError(f"{src} is a float model: PTQ needs calibration data (--calib PATH, --calib-cache FILE, "
                             f"or --calib-random N for a smoke test)")
    mixed = None
    if target is not None or precision_path:
        if mode != "ptq" or passes is not None:
            raise UsageError("--target and --precision choose precision for the PTQ pipeline: give a float model and no --passes")
        if ranges is None:
            raise UsageError("--target and --precision need calibration data for the INT8 layers (--calib or --calib-cache)")
        mixed, config = _mixed_precision(model, ranges, config, target, precision_path, eval_path or calib, preprocess,
                                         labels_path, jobs, quiet)
    res = optimize(model, passes, config=config, registry=registry, ranges=ranges,
                   mode=None if passes else mode, extra_passes=user, analyze=not no_analysis,
                   opset_upgrade=not no_opset_upgrade, prior_changes=upgraded)
    save(res.model, dst, input_path=src)
    if save_precision_path and mixed is not None:
        from .mixed_precision import precision_text

        _write_atomic(Path(save_precision_path), precision_text(mixed.decision))
    if report_path:
        payload = res.to_dict()
        payload.update({"input": src, "output": dst})
        missing = sorted(getattr(ranges, "missing", set()) or [])
        if missing:
            payload["uncalibrated_tensors"] = missing
        _write_atomic(Path(report_path), json.dumps(payload, indent=2))
    if not quiet:
        _print_summary(res, src, dst, time.perf_counter() - t0)
    if mixed is not None:
        _report_mixed(mixed, quiet)
    if check_data is not None:
        from .check import compare

        report = compare(model, res.model, check_data)
        nonfinite = report.nonfinite_error()
        if isinstance(nonfinite, DataError):
            raise nonfinite
        for name, o in report.outputs.items():
            bad = f", NaN/inf in {o.nonfinite_candidate} of {o.values} values" if o.nonfinite_candidate else ""
            click.echo(f"  check {name}: SQNR {o.sqnr_db:.2f} dB, cosine {o.cosine:.6f}, max abs {o.max_abs:.4g}{bad}")
        if report.top1_agreement is not None:
            click.echo(f"  check top-1 agreement: {report.top1_agreement:.3f}")
        if nonfinite is not None:
            raise nonfinite
    if res.regressions and not allow_regression:
        raise ModelError(f"the fixed model is predicted worse than the input ({'; '.join(res.regressions)}); it was written "
                         f"to {dst} anyway: pass --allow-regression to accept it")
    if engine_path:
        from .trt.build import build_engine

        build_engine(dst, engine_path)
        if not quiet:
            click.echo(f"  engine written to {engine_path}")


def _mixed_options(target_text: str | None, max_drop: float | None, precision_path: str | None,
                   save_precision_path: str | None, labels_path: str | None, eval_path: str | None, calib: str | None,
                   jobs: int, src: str) -> Any:
    """--target/--max-drop/--precision checked before any work; the parsed target or None."""
    from .io import check_output_path, check_readable
    from .mixed_precision import drop_target, parse_target

    if target_text is not None and max_drop is not None:
        raise UsageError("give --target or --max-drop, not both")
    target = parse_target(target_text) if target_text is not None else drop_target(max_drop) if max_drop is not None else None
    if target is not None and precision_path:
        raise UsageError("--precision applies a saved decision; it does not search: drop --target/--max-drop")
    if save_precision_path and target is None:
        raise UsageError("--save-precision writes what --target (or --max-drop) chose: give one of them")
    if labels_path and (target is None or target.metric != "top1"):
        raise UsageError("--labels is for top1 targets (--target top1>=X or --max-drop)")
    if target is not None and not (eval_path or calib):
        raise UsageError("--target needs evaluation data: --data PATH (or --calib PATH)")
    if jobs < 1:
        raise UsageError("--jobs must be at least 1")
    for path in (precision_path, labels_path):
        if path:
            check_readable(path)
    if save_precision_path:
        check_output_path(save_precision_path, src)
    return target


def _mixed_precision(model: Any, ranges: Any, config: Any, target: Any, precision_path: str | None, data_path: str,
                     preprocess: str | None, labels_path: str | None, jobs: int, quiet: bool) -> tuple[Any, Any]:
    """The search (--target) or the saved decision (--precision), and the configuration that places it."""
    from .mixed_precision import load_precision, precision_config, search

    if precision_path:
        return None, precision_config(config, load_precision(precision_path, model))
    import numpy as np

    from .calibration import Preprocess, open_data

    labels = None
    if labels_path:
        try:
            labels = np.load(labels_path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read the labels (.npy of integers): {exc}", path=labels_path) from None
    data = open_data(data_path, model, Preprocess.parse(preprocess) if preprocess else None)
    say = None if quiet else (lambda msg: click.echo(f"  target search: {msg}", err=True))
    found = search(model, ranges, config, data, target, labels=labels, jobs=jobs, progress=not quiet, log=say)
    return found, precision_config(config, found.decision)


def _report_mixed(found: Any, quiet: bool) -> None:
    d = found.to_dict()
    if not quiet:
        click.echo(f"  mixed precision: target {d['target']}: {found.target.describe(found.measured)} "
                   f"(all INT8: {found.target.describe(found.baseline.measured)}); {len(d['float_groups'])} group(s), "
                   f"{len(d['float_layers'])} layer(s) float; INT8 MAC share {d['int8_mac_fraction']:.3f}, "
                   f"{d['standalone_qdq_layers']} standalone Q/DQ predicted; {d['evaluations']} evaluations, {d['seconds']:.1f} s")
        for name in d["float_layers"][:10]:
            click.echo(f"    float: {name}")
        if len(d["float_layers"]) > 10:
            click.echo(f"    ... {len(d['float_layers']) - 10} more (--save-precision FILE)")
    if not found.met:
        click.echo(f"warning: target {d['target']} not met: best {found.target.describe(found.measured)} with "
                   f"{len(d['float_groups'])} group(s) float; the model written is that best one", err=True)


# ------------------------------------------------------------------------------------------------
# sensitivity
@cli.command("sensitivity")
@click.argument("model", type=click.Path(readable=False))
@click.option("--calib", type=click.Path(readable=False), required=True, help="Calibration data (as for optimize).")
@click.option("--data", "eval_path", type=click.Path(readable=False), help="Evaluation data (default: the calibration data).")
@click.option("--method", type=click.Choice(["auto", "max", "percentile", "entropy", "mse"]), default=None, help="Calibration method.")
@click.option("--preprocess", default=None, help="Image preprocessing for image folders (as for optimize).")
@click.option("--samples", type=int, default=None, help="Use at most this many evaluation samples.")
@click.option("--exclude", multiple=True, help="Regex over node names to leave unquantized (as for optimize).")
@click.option("--jobs", type=int, default=1, show_default=True, help="Worker processes.")
@click.option("--ray", "ray_address", default=None, help="Run on an existing Ray cluster (e.g. ray://host:10001 or auto).")
@click.option("--json", "json_path", type=click.Path(readable=False), help="Write the ranked results as JSON.")
@click.option("--html", "html_path", type=click.Path(readable=False), help="Write a bar chart page (self-contained HTML).")
@click.option("--png", "png_path", type=click.Path(readable=False), help="Write a bar chart PNG (needs matplotlib).")
@click.option("--top", type=int, default=20, show_default=True, help="Rows of the printed table.")
@click.option("--full", is_flag=True,
              help="Measure every figure on all samples (two forward passes per group) instead of screening and estimating.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
def sensitivity_cmd(model: str, calib: str, eval_path: str | None, method: str | None, preprocess: str | None,
                    samples: int | None, exclude: tuple[str, ...], jobs: int, ray_address: str | None,
                    json_path: str | None, html_path: str | None, png_path: str | None, top: int, full: bool,
                    quiet: bool) -> None:
    """Which quantized groups of MODEL cost accuracy: each alone INT8, and each alone left float.

    MODEL is quantized once as optimize does; its Q/DQ pairs are grouped by the layer they feed
    (tied Concat/MaxPool groups and attention blocks together), and every group is measured end
    to end against the float model (worst-output SQNR) on the evaluation data.

    \b
    Example:
      qdqsurgeon sensitivity model.onnx --calib calib.npz --data eval.npz --jobs 2 --html sens.html
    """
    from .api import detect_mode, optimize, prepare_opset
    from .calibration import Preprocess, open_data
    from .config import Config
    from .io import check_output_path, check_readable, load
    from .ranges import build_ranges
    from .sensitivity import analyze, check_ray, render_html, render_png

    check_readable(model)
    for data_path in (calib, eval_path):
        if data_path and not Path(data_path).exists():
            raise UsageError("no such file or folder", path=data_path)
    for out in (json_path, html_path, png_path):
        if out:
            check_output_path(out, model)
    if jobs < 1:
        raise UsageError("--jobs must be at least 1")
    if samples is not None and samples < 1:
        raise UsageError("--samples must be at least 1")
    if ray_address:
        check_ray(ray_address)
    if png_path:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError("--png needs matplotlib, which is not installed; use --html for the same chart")
    exclude = _checked_regexes(exclude)
    t0 = time.perf_counter()
    src = load(model)
    if detect_mode(src) != "ptq":
        raise UsageError("sensitivity takes a float model (it quantizes it once itself); this one already has Q/DQ")
    pre = Preprocess.parse(preprocess) if preprocess else None
    eval_data = open_data(eval_path or calib, src, pre)  # checked now, before calibration
    # without bias correction: its corrected biases assume every layer INT8, and the analysis switches groups to
    # float (a float layer with a corrected bias would carry the correction as an error of its own)
    config = Config(exclude=list(exclude), bias_correction=False)
    src, upgraded = prepare_opset(src, None, config, mode="ptq")
    ranges = build_ranges(src, calib=calib, method=method, preprocess=preprocess, progress=not quiet)
    quantized = optimize(src, config=config, ranges=ranges, mode="ptq", prior_changes=upgraded).model
    report = analyze(quantized, eval_data, jobs=jobs, ray_address=ray_address, progress=not quiet, samples=samples, full=full)
    if json_path:
        _write_atomic(Path(json_path), json.dumps({"model": model, **report.to_dict()}, indent=2))
    if html_path:
        _write_atomic(Path(html_path), render_html(report, f"qdqsurgeon sensitivity: {Path(model).name}"))
    if png_path:
        render_png(report, png_path)
    if quiet:
        return
    click.echo(f"qdqsurgeon sensitivity: {model}: {len(report.results)} groups, {report.samples} samples, "
               f"{report.workers}, {time.perf_counter() - t0:.1f} s")
    click.echo(f"  all INT8: SQNR {report.sqnr_all_int8:.2f} dB, cosine {report.cosine_all_int8:.5f}")
    click.echo(f"  {report.method()}; ~ marks an estimate, * a figure on {report.screen_samples} sample(s)")
    click.echo(f"  {'rank':>4}  {'group':<40} {'ops':<16} {'alone INT8 dB':>14} {'gain if float dB':>17}")
    for i, r in enumerate(report.ranked()[:top], 1):
        few = "*" if r.samples_alone_int8 < report.samples else " "
        guess = "~" if r.alone_float_estimated else " "
        click.echo(f"  {i:>4}  {r.group.name[:40]:<40} {','.join(r.group.ops)[:16]:<16} "
                   f"{r.sqnr_alone_int8:>13.2f}{few} {guess}{r.sqnr_alone_float - report.sqnr_all_int8:>+16.2f}")
    if len(report.results) > top:
        click.echo(f"  ... {len(report.results) - top} more (--top N, --json FILE)")


# ------------------------------------------------------------------------------------------------
# commands defined beside their features
def _add_feature_commands() -> None:
    from .cli_check import check_command
    from .cli_sparsify import sparsify_command
    from .trt.commands import COMMANDS

    for command in (check_command, sparsify_command, *COMMANDS):
        cli.add_command(command)


_add_feature_commands()
