"""The fix path on Q/DQ models made by other tools: predicted TensorRT structure and accuracy, before vs after.

For every model in ``shared/models/qdq``: ``qdqsurgeon optimize`` (fix pipeline, learned scales kept),
then the static TensorRT analysis of input and output (standalone Q/DQ layers, INT8 weighted ops),
TensorRT validity problems, and, where the float original is in ``shared/models/fp32``, SQNR and
cosine of both against it on the evaluation photos. For the YOLOv8 models it also checks the
detection scores (every score in [0, 1]; mean |score - fp32 score| over the FP32 model's top-20
detections per photo, input vs output).

    python benchmarks/fix.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEFAULT_SHARED, MODELS, fmt, markdown_table, prepare_data  # noqa: E402

# Q/DQ model -> the float model it was made from (None: the float original is not available).
ORIGINS = {
    "mobilenetv2_bottleneck_torch_qat_export.onnx": "mobilenetv2_bottleneck",
    "mobilenetv2_ort_static_u8.onnx": None,
    "resnet18_cifar10_modelopt_ptq.onnx": "resnet18_cifar10",
    "resnet18_cifar10_ort_static_s8.onnx": "resnet18_cifar10",
    "yolov8n_320_modelopt_ptq_fp16.onnx": "yolov8n_320",
    "yolov8n_320_ort_static_u8.onnx": "yolov8n_320",
}


def outputs(model_path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    n = len(next(iter(feeds.values())))
    per_sample = [sess.run(None, {k: feeds[k][i:i + 1] for k in names}) for i in range(n)]
    return [np.concatenate([s[j] for s in per_sample]) for j in range(len(per_sample[0]))]


def sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    noise = np.sum((ref - got) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref ** 2) / noise))


def cosine(ref: np.ndarray, got: np.ndarray) -> float:
    a, b = ref.ravel().astype(np.float64), got.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def yolo_scores(out: np.ndarray) -> np.ndarray:
    """[N, 4 + classes, anchors] -> best class score per anchor, [N, anchors]."""
    return out[:, 4:, :].max(axis=1)


def score_stats(ref: np.ndarray, got: np.ndarray, k: int = 20) -> dict[str, float]:
    ref_s, got_s = yolo_scores(ref), yolo_scores(got)
    top = np.argsort(-ref_s, axis=1)[:, :k]
    diffs = np.abs(np.take_along_axis(got_s, top, 1) - np.take_along_axis(ref_s, top, 1))
    scores = got[:, 4:, :]
    return {"score_min": float(scores.min()), "score_max": float(scores.max()), "top20_mean_abs_err": float(diffs.mean())}


def analyse(path: Path) -> dict[str, Any]:
    import onnx

    from qdqsurgeon.analysis import predict
    from qdqsurgeon.inspection import inspect_model

    model = onnx.load(str(path))
    pred = predict(model).to_dict()
    insp = inspect_model(model).to_dict()
    return {"standalone": pred["standalone_qdq_layers"], "int8_ops": pred["int8_weighted_ops"],
            "weighted": insp["weighted_ops"]["total"], "problems": len(insp["problems"]), "nodes": insp["nodes"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import qdqsurgeon

    work = Path(tempfile.mkdtemp(prefix="qdq-fix-"))
    rows: list[dict[str, Any]] = []
    for name, origin in ORIGINS.items():
        src = args.shared / "models" / "qdq" / name
        if not src.exists():
            continue
        dst = work / name.replace(".onnx", ".fixed.onnx")
        res = qdqsurgeon.optimize(qdqsurgeon.load(src), analyze=False)
        qdqsurgeon.save(res.model, dst)
        row: dict[str, Any] = {"model": name, "mode": res.mode, "changes": len([c for c in res.changes if c.kind != "note"])}
        before, after = analyse(src), analyse(dst)
        row.update({f"{k}_before": v for k, v in before.items()})
        row.update({f"{k}_after": v for k, v in after.items()})
        if origin is not None:
            spec = MODELS[origin]
            data = prepare_data(spec, args.shared, work / origin)
            feeds = dict(np.load(data.eval))
            fp32 = args.shared / "models" / "fp32" / spec.file
            ref = outputs(fp32, feeds)[0]
            got_before, got_after = outputs(src, feeds)[0], outputs(dst, feeds)[0]
            row.update(sqnr_before=sqnr(ref, got_before), sqnr_after=sqnr(ref, got_after),
                       cosine_before=cosine(ref, got_before), cosine_after=cosine(ref, got_after))
            # With --calib the fix path also calibrates the pairs placement adds (learned scales kept).
            model = qdqsurgeon.load(src)
            ranges = qdqsurgeon.build_ranges(model, calib=data.calib, progress=False)
            dst_c = work / name.replace(".onnx", ".fixed_calib.onnx")
            qdqsurgeon.save(qdqsurgeon.optimize(model, ranges=ranges, analyze=False).model, dst_c)
            row.update(standalone_calib=analyse(dst_c)["standalone"], sqnr_calib=sqnr(ref, outputs(dst_c, feeds)[0]))
            if origin.startswith("yolov8"):
                row["scores_before"] = score_stats(ref, got_before)
                row["scores_after"] = score_stats(ref, got_after)
        rows.append(row)
        print(f"{name}: standalone {before['standalone']} -> {after['standalone']}", file=sys.stderr, flush=True)

    table = []
    for r in rows:
        table.append([r["model"], f"{r['standalone_before']} -> {r['standalone_after']}",
                      f"{r['int8_ops_before']}/{r['weighted_before']} -> {r['int8_ops_after']}/{r['weighted_after']}",
                      f"{r['problems_before']} -> {r['problems_after']}",
                      f"{fmt(r.get('sqnr_before'))} -> {fmt(r.get('sqnr_after'))}" if "sqnr_before" in r else "n/a (no float original)",
                      f"{fmt(r.get('cosine_before'), 5)} -> {fmt(r.get('cosine_after'), 5)}" if "cosine_before" in r else "n/a",
                      f"{r['standalone_calib']} ({fmt(r['sqnr_calib'])} dB)" if "standalone_calib" in r else "n/a"])
    print(markdown_table(["model", "standalone Q/DQ (pred.)", "INT8 weighted ops", "TRT problems", "SQNR vs FP32 dB", "cosine vs FP32",
                          "standalone with --calib (SQNR)"], table))
    for r in rows:
        if "scores_before" in r:
            b, a = r["scores_before"], r["scores_after"]
            print(f"\n{r['model']}: scores in [{b['score_min']:.3f}, {b['score_max']:.3f}] -> [{a['score_min']:.3f}, {a['score_max']:.3f}]; "
                  f"top-20 mean |score - fp32| {b['top20_mean_abs_err']:.4f} -> {a['top20_mean_abs_err']:.4f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
