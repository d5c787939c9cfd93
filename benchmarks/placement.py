"""Placement quality: predicted TensorRT engine structure of qdqsurgeon's output vs the baselines.

For every model in ``shared/models/fp32`` (same calibration/evaluation data as
``ptq_vs_baselines.py``), it runs qdqsurgeon's full PTQ pipeline and its insert-only pipeline
(``insert-qdq`` + cleanup: what a naive QAT/PTQ placement looks like) and, when the ModelOpt venv is
there, ModelOpt ONNX PTQ; it also reads ModelOpt's ready-made outputs in ``shared/models/qdq``. For
each it prints the static TensorRT analysis (standalone Q/DQ layers, INT8 weighted ops, INT8 MAC
fraction), TensorRT validity problems and SQNR vs the FP32 model on the evaluation photos.

Targets checked (issue: TensorRT-aware placement): standalone Q/DQ layers at most 1 on our output;
ModelOpt's outputs show at least as many; full-pipeline SQNR within 0.5 dB of insert-only or better.
The SQNR difference comes with a 90 % paired bootstrap interval over the evaluation samples: with
8 photos it spans several dB, so it shows how much of a difference this data can resolve.

    python benchmarks/placement.py [--models a,b] [--skip-modelopt] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEFAULT_MODELOPT_PYTHON, DEFAULT_SHARED, MODELS, fmt, markdown_table, model_path, prepare_data, score  # noqa: E402
from ptq_vs_baselines import run_tool  # noqa: E402

# ModelOpt PTQ outputs that ship in shared/models/qdq, by the fp32 model they were made from.
SHIPPED_MODELOPT = {
    "resnet18_cifar10": "resnet18_cifar10_modelopt_ptq.onnx",
    "yolov8n_320": "yolov8n_320_modelopt_ptq_fp16.onnx",
}


def analyse(path: Path) -> dict[str, Any]:
    import onnx

    from qdqsurgeon.analysis import predict
    from qdqsurgeon.inspection import inspect_model

    model = onnx.load(str(path))
    pred = predict(model).to_dict()
    insp = inspect_model(model).to_dict()
    return {
        "standalone": pred["standalone_qdq_layers"],
        "standalone_nodes": pred["standalone_qdq"],
        "int8_ops": pred["int8_weighted_ops"],
        "weighted": insp["weighted_ops"]["total"],
        "mac": pred["int8_mac_fraction"],
        "problems": len(insp["problems"]),
    }


def paired_gap(src: Path, ours: Path, naive: Path, eval_npz: Path, draws: int = 2000) -> tuple[float, float, float]:
    """SQNR(ours) − SQNR(naive) against FP32 on the evaluation batches, and its 90 % paired bootstrap interval.

    Both SQNRs are the worst over the model's outputs, as in the table. With 8 evaluation samples the
    interval is wide: it says how much of a difference the data can resolve.
    """
    import numpy as np
    import onnx

    from qdqsurgeon.calibration import open_data
    from qdqsurgeon.calibration.collect import make_session

    ref = onnx.load(str(src))
    sessions = [make_session(m, optimize=False) for m in (ref, onnx.load(str(ours)), onnx.load(str(naive)))]
    sig, err_ours, err_naive = [], [], []  # per batch, per output: sums of squares
    for batch in open_data(eval_npz, ref):
        outs = [s.run(None, {i.name: batch[i.name] for i in s.get_inputs()}) for s in sessions]
        r = [o.astype(np.float64) for o in outs[0]]
        sig.append([float((x ** 2).sum()) for x in r])
        err_ours.append([float(((x - y) ** 2).sum()) for x, y in zip(r, outs[1])])
        err_naive.append([float(((x - y) ** 2).sum()) for x, y in zip(r, outs[2])])
    sig_a, eo, en = (np.asarray(a) for a in (sig, err_ours, err_naive))

    def gap(idx: np.ndarray) -> float:
        s = sig_a[idx].sum(0)
        return float(np.min(10 * np.log10(s / eo[idx].sum(0))) - np.min(10 * np.log10(s / en[idx].sum(0))))

    rng = np.random.default_rng(0)
    n = len(sig_a)
    boot = [gap(rng.integers(0, n, n)) for _ in range(draws)]
    lo, hi = np.percentile(boot, [5, 95])
    return gap(np.arange(n)), float(lo), float(hi)


def qdqsurgeon_run(spec, src: Path, dst: Path, calib: Path, passes: str | None, **config: Any) -> None:
    import qdqsurgeon
    from qdqsurgeon.config import Config

    model = qdqsurgeon.load(src, opset=spec.opset)
    ranges = qdqsurgeon.build_ranges(model, calib=calib, progress=False)
    res = qdqsurgeon.optimize(model, passes.split(",") if passes else None, ranges=ranges, config=Config(**config),
                              analyze=False)
    qdqsurgeon.save(res.model, dst)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--skip-modelopt", action="store_true")
    ap.add_argument("--modelopt-python", type=Path, default=DEFAULT_MODELOPT_PYTHON)
    ap.add_argument("--modelopt-method", default="entropy")
    ap.add_argument("--modelopt-dtype", default="fp32")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.qdq_method = None
    args.ort_method = "minmax"
    run_modelopt = not args.skip_modelopt and args.modelopt_python.exists()

    rows: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="qdq-placement-"))
    for name in args.models.split(","):
        spec = MODELS[name]
        src = model_path(args.shared, spec)
        data = prepare_data(spec, args.shared, work / name)
        variants: list[tuple[str, Path]] = []
        runs: list[tuple[str, str | None, dict[str, Any]]] = [("qdqsurgeon", None, {}),
                                                               ("insert-only", "insert-qdq,fold-qdq-pairs,dedupe-qdq", {})]
        if spec.kind == "text":  # attention: Q/DQ before both batch GEMMs (INT8 MHA fusion) is the default; without it
            runs.append(("qdqsurgeon --no-quantize-bmm", None, {"quantize_bmm": False}))
        for label, passes, config in runs:
            dst = work / name / f"{label.replace(' ', '_')}.onnx"
            qdqsurgeon_run(spec, src, dst, data.calib, passes, **config)
            variants.append((label, dst))
        if run_modelopt:
            row = run_tool("modelopt", spec, src, work / name, data.calib, data.eval, args)
            if "error" not in row:
                variants.append(("modelopt (run)", Path(row["output"])))
            else:
                print(f"{name}: modelopt failed: {row['error']}", file=sys.stderr)
        shipped = SHIPPED_MODELOPT.get(name)
        if shipped and (args.shared / "models" / "qdq" / shipped).exists():
            variants.append(("modelopt (shipped)", args.shared / "models" / "qdq" / shipped))
        for label, path in variants:
            info = analyse(path)
            s = score(src, path, data.eval, spec.classifier)
            info.update(model=name, tool=label, sqnr_db=s.sqnr_db, cosine=s.cosine, file=str(path))
            rows.append(info)
            print(f"{name:24s} {label:20s} standalone {info['standalone']:3d}  int8 {info['int8_ops']}/{info['weighted']}  "
                  f"SQNR {fmt(info['sqnr_db'])}", file=sys.stderr, flush=True)

    headers = ["model", "tool", "standalone Q/DQ (pred.)", "INT8 weighted ops", "INT8 MAC frac.", "TRT problems", "SQNR dB", "cosine"]
    print(markdown_table(headers, [[r["model"], r["tool"], str(r["standalone"]), f"{r['int8_ops']}/{r['weighted']}",
                                    fmt(r["mac"], 3), str(r["problems"]), fmt(r["sqnr_db"]), fmt(r["cosine"], 5)] for r in rows]))
    print()
    checks = []
    for name in args.models.split(","):
        mine = next(r for r in rows if r["model"] == name and r["tool"] == "qdqsurgeon")
        naive = next(r for r in rows if r["model"] == name and r["tool"] == "insert-only")
        _, lo, hi = paired_gap(model_path(args.shared, MODELS[name]), Path(mine["file"]), Path(naive["file"]),
                               work / name / "eval.npz")
        others = [r for r in rows if r["model"] == name and r["tool"].startswith("modelopt")]
        checks.append([name, str(mine["standalone"]), "yes" if mine["standalone"] <= 1 else "NO",
                       ", ".join(f"{r['tool']}: {r['standalone']}" for r in others) or "n/a",
                       "yes" if all(r["standalone"] >= mine["standalone"] for r in others) else "NO",
                       fmt(mine["sqnr_db"] - naive["sqnr_db"]), f"{fmt(lo)} .. {fmt(hi)}",
                       "yes" if mine["sqnr_db"] >= naive["sqnr_db"] - 0.5 else "NO"])
    print(markdown_table(["model", "ours standalone", "<= 1", "ModelOpt standalone", "ModelOpt >= ours",
                          "SQNR full - insert-only (dB)", "90% bootstrap", ">= -0.5 dB"], checks))
    for r in rows:
        if r["tool"] == "qdqsurgeon" and r["standalone"] > 1:
            print(f"\n{r['model']}: standalone layers {', '.join(r['standalone_nodes'])}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
