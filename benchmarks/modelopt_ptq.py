"""NVIDIA ModelOpt ONNX INT8 PTQ on one model. Runs inside the ModelOpt venv (only numpy + modelopt needed).

    /root/venv-modelopt/bin/python benchmarks/modelopt_ptq.py IN.onnx OUT.onnx --calib calib.npz

``calib.npz`` holds one array per model input (axis 0 = samples). Calibration runs on CPU with
batch 1 (``calibration_shapes`` from the arrays). The last stdout line is a JSON object with the
seconds spent inside ``quantize()`` and the ModelOpt version.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("onnx_path")
    ap.add_argument("output_path")
    ap.add_argument("--calib", required=True, help=".npz keyed by input name")
    ap.add_argument("--method", default="entropy", choices=["entropy", "max"])
    ap.add_argument("--high-precision-dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--override-shapes", action="store_true", help="Also fix the model's input shapes to batch 1.")
    ap.add_argument("--log-level", default="WARNING")
    args = ap.parse_args()

    import numpy as np

    t_import = time.perf_counter()
    import modelopt
    from modelopt.onnx.quantization import quantize

    import_s = time.perf_counter() - t_import

    with np.load(args.calib, allow_pickle=False) as npz:
        data = {k: npz[k] for k in npz.files}
    shapes = ",".join(f"{k}:" + "x".join(str(d) for d in (1, *v.shape[1:])) for k, v in data.items())

    t0 = time.perf_counter()
    quantize(
        onnx_path=args.onnx_path,
        quantize_mode="int8",
        calibration_data=data,
        calibration_method=args.method,
        calibration_shapes=shapes,
        calibration_eps=["cpu"],
        override_shapes=shapes if args.override_shapes else None,
        output_path=args.output_path,
        high_precision_dtype=args.high_precision_dtype,
        log_level=args.log_level,
    )
    seconds = time.perf_counter() - t0
    print(json.dumps({"tool": "modelopt", "version": modelopt.__version__, "quantize_s": seconds,
                      "import_s": import_s, "calibration_shapes": shapes, "method": args.method,
                      "high_precision_dtype": args.high_precision_dtype}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
