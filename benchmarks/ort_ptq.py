"""ONNX Runtime ``quantize_static`` on one model (QDQ format, symmetric int8, per-channel weights).

    python benchmarks/ort_ptq.py IN.onnx OUT.onnx --calib calib.npz [--method minmax|entropy] [--opset 13]

A model below opset 13 is first upgraded to ``--opset`` (per-channel Q/DQ needs 13). The last
stdout line is a JSON object with the seconds spent inside ``quantize_static`` (plus the upgrade).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("onnx_path")
    ap.add_argument("output_path")
    ap.add_argument("--calib", required=True, help=".npz keyed by input name")
    ap.add_argument("--method", default="minmax", choices=["minmax", "entropy", "percentile"])
    ap.add_argument("--opset", type=int, default=13, help="Upgrade models below this opset first.")
    args = ap.parse_args()

    import numpy as np
    import onnx
    import onnxruntime
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class NpzReader(CalibrationDataReader):
        """One sample per call, from arrays keyed by input name."""

        def __init__(self, path: str):
            with np.load(path, allow_pickle=False) as npz:
                self.arrays = {k: npz[k] for k in npz.files}
            self.n = len(next(iter(self.arrays.values())))
            self.i = 0

        def get_next(self):
            if self.i >= self.n:
                return None
            feed = {k: v[self.i : self.i + 1] for k, v in self.arrays.items()}
            self.i += 1
            return feed

        def rewind(self) -> None:
            self.i = 0

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[args.method]
    t0 = time.perf_counter()
    src = args.onnx_path
    upgraded = None
    with tempfile.TemporaryDirectory() as tmp:
        model = onnx.load(src)
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        if opset < args.opset:
            model = onnx.version_converter.convert_version(model, args.opset)
            src = str(Path(tmp) / "upgraded.onnx")
            onnx.save(model, src)
            upgraded = args.opset
        del model
        quantize_static(
            src,
            args.output_path,
            NpzReader(args.calib),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=method,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
    seconds = time.perf_counter() - t0
    print(json.dumps({"tool": "ort", "version": onnxruntime.__version__, "quantize_s": seconds,
                      "method": args.method, "upgraded_to_opset": upgraded}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
