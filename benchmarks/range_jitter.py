"""How much of a calibration method's SQNR is its ranges, and how much is luck: SQNR under range jitter.

On a few evaluation samples, the output SQNR of a quantized model moves by a dB or more when every
activation range moves by 1 % (the rounding grid lands elsewhere on every tensor), which no
calibration method decides. For each model and method this script records the ranges the method
gives (as ``qdqsurgeon optimize --method M`` would), then scores the model again with every range
multiplied by ``1 + scale * N(0, 1)`` (``--draws`` times, fixed seed): the mean over the draws is
the method's SQNR with the luck averaged out, the standard deviation the noise of one number in
``accuracy.py``'s table. Data as ``accuracy.py`` (``zoo_data.py``: 8 calibration, up to 8 evaluation samples).

    python benchmarks/range_jitter.py [--models a,b] [--methods max,percentile,mse,entropy,auto] [--draws 6] [--scale 0.01]

A method ``M@k=v+k=v`` is method M with those Config fields, as in ``accuracy.py``; every draw keeps the real
calibration data, which ``bias-correction`` reads (only the ranges are jittered).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy  # noqa: E402
import zoo_data as zd  # noqa: E402
from common import fmt, markdown_table  # noqa: E402

MODELS = ["resnet18_cifar10", "yolov8n_320", "openwakeword_embedding", "easyocr_english_g2"]


def jitter_row(m: zd.ZooModel | None, shared: Path, cache: Path, work: Path, methods: list[str], draws: int,
               scale: float) -> dict[str, Any]:
    import numpy as np
    import onnx

    import qdqsurgeon
    from qdqsurgeon.api import prepare_opset
    from qdqsurgeon.ranges import StaticRanges
    from zoo import run_outputs, sqnr_cosine

    if m is None:
        src = accuracy.ppocr_cls_path(cache)
        calib_arrays, eval_arrays, _ = accuracy.ppocr_cls_data(shared, 8)
        data = zd.Inputs(calib_arrays, eval_arrays, "")
    else:
        src = zd.model_path(m, shared, cache)
        data = zd.build(m, shared, cache, work, n_calib=8)
    calib = zd.save_npz(work / "calib.npz", data.calib)
    ref = run_outputs(src, data.eval)
    model, upgraded = prepare_opset(qdqsurgeon.load(str(src)), mode="ptq")

    def score(ranges, config=None, source=(None, None)) -> float:
        # the jittered draws keep the real calibration data, which bias-correction reads (``source``)
        out = qdqsurgeon.optimize(model, ranges=ranges, mode="ptq", prior_changes=upgraded, config=config,
                                  calib_model=source[0], calib_data=source[1]).model
        path = work / "jitter.onnx"
        onnx.save(out, str(path))
        return sqnr_cosine(ref, run_outputs(path, data.eval))[0]

    row: dict[str, Any] = {"model": m.name if m else accuracy.PPOCR_CLS[0], "methods": {}}
    from qdqsurgeon.config import Config

    for spec in methods:  # ``M@k=v+k=v``: method M with those Config fields, as in accuracy.py
        method, _, options = spec.partition("@")
        fields = dict(kv.split("=", 1) for kv in options.split("+") if kv)
        config = Config(**{k: {"true": True, "false": False}.get(v, v) for k, v in fields.items()}) if fields else None
        inner = qdqsurgeon.build_ranges(model, calib=str(calib), method=method, progress=False)
        source = inner.calibration_source()
        seen: dict[str, float] = {}

        def recording(names, inner=inner, seen=seen):
            got = inner(names)
            seen.update(got)
            return got

        base = score(recording, config, source)
        rng = np.random.default_rng(0)
        jittered = [score(StaticRanges({k: v * (1.0 + scale * rng.standard_normal()) for k, v in seen.items()}),
                          config, source)
                    for _ in range(draws)]
        method = spec
        row["methods"][method] = {"base": base, "draws": jittered, "mean": statistics.fmean(jittered),
                                  "sd": statistics.pstdev(jittered)}
        print(f"{row['model']} {method}: {base:.2f} dB; jittered {statistics.fmean(jittered):.2f} "
              f"± {statistics.pstdev(jittered):.2f}", file=sys.stderr, flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--methods", default="max,percentile,mse,entropy,auto")
    ap.add_argument("--draws", type=int, default=6)
    ap.add_argument("--scale", type=float, default=0.01, help="relative standard deviation of the range jitter")
    ap.add_argument("--shared", type=Path, default=zd.DEFAULT_SHARED)
    ap.add_argument("--cache", type=Path, default=zd.DEFAULT_CACHE)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.ERROR)
    available: dict[str, Any] = {m.name: m for m in zd.models()}
    available[accuracy.PPOCR_CLS[0]] = None
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in available]
    if unknown:
        ap.error(f"unknown model(s): {', '.join(unknown)}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows = []
    with tempfile.TemporaryDirectory(prefix="qdq-jitter-") as tmp:
        for name in names:
            work = Path(tmp) / name
            work.mkdir(parents=True)
            rows.append(jitter_row(available[name], args.shared, args.cache, work, methods, args.draws, args.scale))
            if args.json:
                args.json.write_text(json.dumps(rows, indent=2))
    fixed = [m for m in methods if m in accuracy.FIXED]
    headers = ["model", *[f"{m} dB (jittered mean ± sd)" for m in methods]]
    if "auto" in methods and fixed:
        headers += ["auto − best fixed, jittered means dB"]
    lines = []
    for r in rows:
        ms = r["methods"]
        cells = [r["model"], *[f"{fmt(ms[m]['base'])} ({fmt(ms[m]['mean'])} ± {fmt(ms[m]['sd'])})" for m in methods]]
        if "auto" in methods and fixed:
            best = max(fixed, key=lambda k: ms[k]["mean"])
            cells.append(f"{fmt(ms['auto']['mean'] - ms[best]['mean'])} ({best})")
        lines.append(cells)
    print(markdown_table(headers, lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
