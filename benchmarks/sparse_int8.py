"""Sparse INT8 on a real case: the digits CNN, dense vs 2:4-sparse, FP32 vs qdqsurgeon PTQ.

Models: ``fixtures/digits_cnn_dense.onnx`` and ``fixtures/digits_cnn_sparse24.onnx`` (made by
``fixtures/make_digits_sparse.py``: trained on the real digits data, the sparse one pruned to 2:4
and fine-tuned). Both go through ``qdqsurgeon`` PTQ (``optimize`` with default settings, calibrated
on 256 training samples); accuracy is measured in onnxruntime on the 500 held-out samples. Also
prints what ``inspect`` reports for each INT8 model's 2:4 sparsity.

Run: ``python benchmarks/sparse_int8.py [--shared ../shared]``. No TensorRT is involved: whether
TensorRT picks sparse kernels for these layers was not measured (no GPU here).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CALIB_SAMPLES = 256


def _fixture_module():
    spec = importlib.util.spec_from_file_location("make_digits_sparse", REPO / "fixtures" / "make_digits_sparse.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of an ONNX model (proto) in onnxruntime, graph optimizations off."""
    from qdqsurgeon.calibration.collect import make_session

    session = make_session(model, optimize=False)
    name = session.get_inputs()[0].name
    logits = session.run(None, {name: x})[0]
    return float(np.mean(np.argmax(logits, axis=1) == y))


def run(digits: Path, workdir: Path, *, pruned_rows: bool = False) -> dict[str, Any]:
    """Accuracy of FP32, dense INT8 and sparse INT8 on the held-out split, and the INT8 models' 2:4 report."""
    import qdqsurgeon
    from qdqsurgeon.sparsity import sparsity_report

    fx = _fixture_module()
    (xtr, _), (xte, yte) = fx.split(*fx.load_digits(digits))
    calib = workdir / "calib.npz"
    np.savez(calib, **{fx.INPUT: xtr[:CALIB_SAMPLES]})
    out: dict[str, Any] = {}
    dense = qdqsurgeon.load(fx.DENSE)
    candidates = {"dense": dense, "sparse": qdqsurgeon.load(fx.SPARSE)}
    if pruned_rows:
        from qdqsurgeon.sparsity import sparsify

        # The same dense model pruned by qdqsurgeon without fine-tuning: everything eligible, and with
        # --max-drop 1 measured on 200 training samples (never the held-out split).
        candidates["sparsify"] = sparsify(dense).model
        candidates["sparsify-max-drop-1"] = sparsify(dense, data=[{fx.INPUT: xtr[:200]}], max_drop=1.0).model
    for kind, model in candidates.items():
        ranges = qdqsurgeon.build_ranges(model, calib=calib, progress=False)
        int8 = qdqsurgeon.optimize(model, ranges=ranges).model
        report = sparsity_report(int8)
        out[kind] = {
            "fp32": accuracy(model, xte, yte),
            "int8": accuracy(int8, xte, yte),
            "int8_model": int8,
            "sparsity": report.to_dict(),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    args = parser.parse_args(argv)
    digits = args.shared / "models" / "images" / "digits.csv.gz"
    if not digits.exists():
        print(f"missing {digits}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        res = run(digits, Path(tmp), pruned_rows=True)
    print("digits CNN, 500 held-out samples (onnxruntime CPU)")
    print("| model | FP32 accuracy | INT8 accuracy (qdqsurgeon PTQ) | layers 2:4 | sparse-ready MAC share (INT8) |")
    print("|---|---|---|---|---|")
    labels = {"dense": "dense (trained)", "sparse": "2:4 pruned + fine-tuned 10 epochs (torch)",
              "sparsify": "dense -> qdqsurgeon sparsify, no fine-tuning",
              "sparsify-max-drop-1": "dense -> sparsify --max-drop 1, no fine-tuning"}
    for kind in res:
        r = res[kind]
        s = r["sparsity"]
        print(f"| {labels[kind]} | {100 * r['fp32']:.1f} % | {100 * r['int8']:.1f} % | {s['layers_2_4']}/{s['layers_total']} "
              f"| {s['sparse_mac_fraction']:.3f} |")
    gap = 100 * (res["dense"]["int8"] - res["sparse"]["int8"])
    print(f"sparse-INT8 vs dense-INT8: {gap:+.1f} points lower" if gap > 0 else f"sparse-INT8 vs dense-INT8: {-gap:.1f} points higher or equal")
    for row in res["sparse"]["sparsity"]["details"]:
        why = "; ".join(row["reasons"]) or "-"
        print(f"  {row['node']}: {row['op']} 2:4 {row['sparse_group_fraction']:.2f} of groups, {row['precision']}, "
              f"sparse-ready {row['sparse_ready']} ({why})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
