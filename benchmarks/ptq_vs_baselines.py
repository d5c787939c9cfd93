"""PTQ benchmark: qdqsurgeon vs NVIDIA ModelOpt ONNX PTQ vs ONNX Runtime quantize_static.

For every FP32 model in ``<shared>/models/fp32`` the same calibration and evaluation arrays are
written once (first 8 photos of ``<shared>/models/images`` calibrate, the next 8 evaluate; 8+8
sentences for MiniLM) and each tool quantizes the model in its own subprocess. Each result is
scored against the FP32 model on the evaluation arrays with ``qdqsurgeon.check.compare`` and
inspected with ``qdqsurgeon.inspection.inspect_model``.

    python benchmarks/ptq_vs_baselines.py                       # all models, all tools
    python benchmarks/ptq_vs_baselines.py --models resnet18_cifar10,yolov8n_320 --skip-modelopt
    python benchmarks/ptq_vs_baselines.py --json results.json --workdir /tmp/ptq-bench

See benchmarks/README.md for the columns.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    BENCH_DIR,
    DEFAULT_MODELOPT_PYTHON,
    DEFAULT_SHARED,
    MODELS,
    ModelSpec,
    env_without_pythonpath,
    fmt,
    io_seconds,
    last_json_line,
    markdown_table,
    model_path,
    prepare_data,
    rss_method,
    run_measured,
    score,
)

TOOLS = ("qdqsurgeon", "modelopt", "ort")


def qdqsurgeon_cmd(spec: ModelSpec, src: Path, dst: Path, calib: Path, method: str | None) -> list[str]:
    exe = shutil.which("qdqsurgeon")
    base = [exe] if exe else [sys.executable, "-c", "from qdqsurgeon.cli import main; main()"]
    cmd = [*base, "optimize", str(src), str(dst), "--calib", str(calib)]
    if spec.preprocess:
        cmd += ["--preprocess", spec.preprocess]
    if spec.opset:
        cmd += ["--opset", str(spec.opset)]
    if method:
        cmd += ["--method", method]
    return cmd


def run_tool(tool: str, spec: ModelSpec, src: Path, out_dir: Path, calib: Path, eval_npz: Path,
             args: argparse.Namespace) -> dict[str, Any]:
    dst = out_dir / f"{spec.name}.{tool}.onnx"
    if tool == "qdqsurgeon":
        cmd = qdqsurgeon_cmd(spec, src, dst, calib, args.qdq_method)
        env = None
    elif tool == "modelopt":
        # ModelOpt runs onnx.shape_inference.infer_shapes_path(onnx_path) on its input, which rewrites
        # the input file in place, and writes intermediate *_static.onnx files beside it: give it a copy.
        copy_dir = out_dir / "modelopt_input"
        copy_dir.mkdir(exist_ok=True)
        model_in = copy_dir / src.name
        shutil.copyfile(src, model_in)
        cmd = [str(args.modelopt_python), str(BENCH_DIR / "modelopt_ptq.py"), str(model_in), str(dst), "--calib", str(calib),
               "--method", args.modelopt_method, "--high-precision-dtype", args.modelopt_dtype]
        env = env_without_pythonpath()
    else:
        cmd = [sys.executable, str(BENCH_DIR / "ort_ptq.py"), str(src), str(dst), "--calib", str(calib),
               "--method", args.ort_method]
        env = None
    row: dict[str, Any] = {"model": spec.name, "tool": tool, "command": cmd, "output": str(dst)}
    before = _stamp(src)
    res = run_measured(cmd, timeout=args.timeout, env=env)
    if _stamp(src) != before:
        print(f"  warning: {tool} modified its input {src}", file=sys.stderr, flush=True)
        row["modified_input"] = True
    row.update(wall_s=res.wall_s, peak_rss_mb=res.peak_rss_mb, returncode=res.returncode)
    if res.returncode != 0 or not dst.exists():
        row["error"] = res.error_line() if res.returncode != 0 else "no output written"
        row["stderr_tail"] = "\n".join(res.stderr.splitlines()[-15:])
        return row
    if tool == "qdqsurgeon":
        m = re.search(r"changes, ([0-9.]+) s", res.stdout)
        row["core_s"] = float(m.group(1)) if m else None
        row["method"] = args.qdq_method or "default"
    else:
        info = last_json_line(res.stdout)
        row["core_s"] = info.get("quantize_s")
        row["method"] = info.get("method")
        row["version"] = info.get("version")
    try:
        s = score(src, dst, eval_npz, spec.classifier)
        row.update(sqnr_db=s.sqnr_db, cosine=s.cosine, top1=s.top1, quantize=s.quantize, dequantize=s.dequantize,
                   problems=s.problems, problem_rules=s.problem_rules, outputs=s.outputs)
    except Exception as exc:  # scoring a broken model must not stop the run
        first = str(exc).splitlines()[0] if str(exc) else ""
        row["error"] = f"scoring failed: {type(exc).__name__}: {first}"
    return row


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


def rules_text(rules: dict[str, int] | None) -> str:
    if not rules:
        return ""
    return " (" + ", ".join(f"{k}:{v}" for k, v in rules.items()) + ")"


def table(rows: list[dict[str, Any]]) -> str:
    headers = ["model", "tool", "wall s", "core s", "peak RSS MB", "SQNR dB", "cosine", "top-1",
               "Q/DQ", "TRT problems", "core / io"]
    body = []
    for r in rows:
        if r.get("skipped"):
            body.append([r["model"], r["tool"], *(["-"] * 8), f"skipped: {r['skipped']}"])
            continue
        wall = fmt(r.get("wall_s"), 1)
        rss = fmt(r.get("peak_rss_mb"), 0)
        if "error" in r:
            body.append([r["model"], r["tool"], wall, fmt(r.get("core_s"), 1), rss, f"error: {r['error']}",
                         "", "", "", "", ""])
            continue
        ratio = r["core_s"] / r["io_s"] if r.get("core_s") is not None and r.get("io_s") else None
        body.append([
            r["model"], r["tool"], wall, fmt(r.get("core_s"), 1), rss, fmt(r.get("sqnr_db"), 2),
            fmt(r.get("cosine"), 5), fmt(r.get("top1"), 3), f"{r['quantize']}/{r['dequantize']}",
            f"{r['problems']}{rules_text(r.get('problem_rules'))}", (fmt(ratio, 1) + "x") if ratio is not None else "n/a",
        ])
    return markdown_table(headers, body)


def targets(rows: list[dict[str, Any]], models: list[str]) -> str:
    by = {(r["model"], r["tool"]): r for r in rows}
    headers = ["model", "qdqsurgeon SQNR", "ModelOpt SQNR", "SQNR >= ModelOpt", "wall qdq/ModelOpt",
               "wall <= 0.5x", "core qdq/ModelOpt"]
    body = []
    for m in models:
        q, mo = by.get((m, "qdqsurgeon")), by.get((m, "modelopt"))
        if not q or not mo or "error" in q or "error" in mo or q.get("skipped") or mo.get("skipped"):
            body.append([m, fmt(q.get("sqnr_db") if q else None), fmt(mo.get("sqnr_db") if mo else None),
                         "n/a", "n/a", "n/a", "n/a"])
            continue
        sq_ok = q["sqnr_db"] >= mo["sqnr_db"] if not (math.isnan(q["sqnr_db"]) or math.isnan(mo["sqnr_db"])) else False
        wall_ratio = q["wall_s"] / mo["wall_s"]
        core_ratio = q["core_s"] / mo["core_s"] if q.get("core_s") and mo.get("core_s") else None
        body.append([m, fmt(q["sqnr_db"]), fmt(mo["sqnr_db"]), "yes" if sq_ok else "NO", fmt(wall_ratio, 2),
                     "yes" if wall_ratio <= 0.5 else "NO", fmt(core_ratio, 2)])
    return markdown_table(headers, body)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="The shared folder (default: ../shared beside the repo).")
    ap.add_argument("--models", default=None, help=f"Comma-separated subset of: {', '.join(MODELS)}.")
    ap.add_argument("--skip-modelopt", action="store_true")
    ap.add_argument("--skip-ort", action="store_true")
    ap.add_argument("--skip-qdqsurgeon", action="store_true")
    ap.add_argument("--modelopt-python", type=Path, default=DEFAULT_MODELOPT_PYTHON,
                    help="Python of the venv with nvidia-modelopt[onnx] (default: %(default)s).")
    ap.add_argument("--modelopt-method", default="entropy", choices=["entropy", "max"])
    ap.add_argument("--modelopt-dtype", default="fp32", choices=["fp32", "fp16"],
                    help="ModelOpt high_precision_dtype (fp16 scores lower on ONNX Runtime CPU).")
    ap.add_argument("--ort-method", default="minmax", choices=["minmax", "entropy", "percentile"])
    ap.add_argument("--qdq-method", default=None, choices=["max", "percentile", "entropy", "mse"],
                    help="qdqsurgeon --method (default: qdqsurgeon's default).")
    ap.add_argument("--timeout", type=float, default=3600, help="Seconds per tool run.")
    ap.add_argument("--workdir", type=Path, default=None, help="Keep data and outputs here (default: a temp dir, removed).")
    ap.add_argument("--json", dest="json_out", type=Path, default=None, help="Also write all results as JSON.")
    args = ap.parse_args()

    shared = args.shared.resolve()
    names = [n.strip() for n in args.models.split(",") if n.strip()] if args.models else list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    tools = [t for t in TOOLS if not getattr(args, f"skip_{t}")]
    modelopt_missing = "modelopt" in tools and not args.modelopt_python.exists()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="ptq-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"# PTQ benchmark ({time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, {platform.processor() or platform.machine()}, "
          f"peak RSS via {rss_method()})", flush=True)
    rows: list[dict[str, Any]] = []
    data_notes: dict[str, str] = {}
    try:
        for name in names:
            spec = MODELS[name]
            src = model_path(shared, spec)
            mdir = work / name
            try:
                if not src.exists():
                    raise FileNotFoundError(f"{src} not found")
                prepared = prepare_data(spec, shared, mdir)
                io_s = io_seconds(src)
            except Exception as exc:
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                for tool in tools:
                    rows.append({"model": name, "tool": tool, "error": f"data: {first}"})
                print(f"{name}: data preparation failed: {first}", flush=True)
                continue
            data_notes[name] = prepared.description
            print(f"{name}: data {prepared.description}; onnx load+save {io_s:.3f} s", flush=True)
            for tool in tools:
                if tool == "modelopt" and modelopt_missing:
                    rows.append({"model": name, "tool": tool, "skipped": f"{args.modelopt_python} not found"})
                    continue
                row = run_tool(tool, spec, src, mdir, prepared.calib, prepared.eval, args)
                row["io_s"] = io_s
                rows.append(row)
                status = f"error: {row['error']}" if "error" in row else \
                    f"SQNR {fmt(row.get('sqnr_db'))} dB, {fmt(row.get('problems'))} problems"
                print(f"  {tool:<10} {row['wall_s']:7.1f} s  {fmt(row.get('peak_rss_mb'), 0):>6} MB  {status}", flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(table(rows))
    print()
    if "qdqsurgeon" in tools and "modelopt" in tools:
        print("Targets (issue 3): qdqsurgeon SQNR >= ModelOpt's, qdqsurgeon wall time <= 0.5x ModelOpt's")
        print()
        print(targets(rows, names))
        print()
    print("Settings: qdqsurgeon " + (args.qdq_method or "default method") +
          f"; ModelOpt int8 {args.modelopt_method}, high_precision_dtype={args.modelopt_dtype}, CPU EP; "
          f"ORT quantize_static QDQ, int8 symmetric activations+weights, per-channel, {args.ort_method}.")
    for name, note in data_notes.items():
        extra = f"; {MODELS[name].note}" if MODELS[name].note else ""
        print(f"Data {name}: {note}{extra}")
    if args.json_out:
        payload = {"shared": str(shared), "tools": tools, "rss_method": rss_method(), "data": data_notes,
                   "settings": {"qdq_method": args.qdq_method, "modelopt_method": args.modelopt_method,
                                "modelopt_dtype": args.modelopt_dtype, "ort_method": args.ort_method},
                   "rows": rows}
        args.json_out.write_text(json.dumps(_clean(payload), indent=2, default=_json_default, allow_nan=False))
        print(f"JSON written to {args.json_out}")
    return 0


def _json_default(value: Any) -> Any:
    return str(value)


def _clean(obj: Any) -> Any:
    """Non-finite floats as the strings "inf", "-inf", "nan" (like qdqsurgeon check's JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


if __name__ == "__main__":
    sys.exit(main())
