"""Predicted engines against every real engine dump here (issue 13 item 4).

For each dump in ``../shared/models/engines`` the static analysis predicts the engine of the model
it was built from and the one matcher (``qdqsurgeon.trt.match``) pairs predicted kernels with the
dump's layers. The dumps' ONNX files are not published, so the models are reconstructions
(``tests/analysis_helpers.py``: same architecture and Q/DQ placement, other node names); their layers
pair by graph order where names differ. Printed per dump: standalone Q/DQ (predicted / real), kernels
(layers that are not free NoOps), matched layers and how, and INT8-vs-float agreement of matched layers.

    python benchmarks/engine_agreement.py [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qdqsurgeon.trt.diff import agreement, diff_reports  # noqa: E402
from qdqsurgeon.trt.predicted import predicted_engine  # noqa: E402
from qdqsurgeon.trt.report import build_report, engine_report  # noqa: E402


def cases(engines: Path):
    """(label, dump path, model builder or None with the reason) for every dump."""
    from tests.analysis_helpers import keras_resnet50_names, mobilenet_v2_from_shared, tf_resnet50

    def strip(model):  # the float builds of the same network
        import qdqsurgeon

        return qdqsurgeon.optimize(model, passes=["remove-qdq"], analyze=False).model

    yield "MobileNetV2 QAT (TREx sample, 8.x)", engines / "trex_mobilenet_v2_a100/mobilenet.qat.onnx.engine.graph.json", \
        lambda: mobilenet_v2_from_shared(False)
    yield "MobileNetV2 QAT + residual Q/DQ", engines / "trex_mobilenet_v2_a100/mobilenet_v2_residuals.qat.onnx.engine.graph.json", \
        lambda: mobilenet_v2_from_shared(True)
    # the Keras ResNet-50 under tf2onnx's node names: these pair with the dumps' layers by name
    yield "TF ResNet-50 QAT (RTX 3090)", engines / "trex_tf_resnet50_rtx3090/qat/resnet-qat.onnx.engine.graph.json", \
        lambda: keras_resnet50_names(tf_resnet50(), qat=True)
    yield "TF ResNet-50 FP16", engines / "trex_tf_resnet50_rtx3090/fp16/resnet.onnx.engine.graph.json", \
        lambda: strip(keras_resnet50_names(tf_resnet50(), qat=False))
    yield "TF ResNet-50 FP32", engines / "trex_tf_resnet50_rtx3090/fp32/resnet.onnx.engine.graph.json", \
        lambda: strip(keras_resnet50_names(tf_resnet50(), qat=False))
    yield "DETR implicit INT8 (names only)", engines / "detr_implicit_int8_names_only/detr-layer-info.json", \
        "no ONNX and no reconstruction; a names-only dump has no types or precisions"


def mobilenet_builds(engines: Path) -> dict:
    """The two MobileNetV2 dumps diffed by the matcher: what the residual Q/DQ removed."""
    a = engine_report(engines / "trex_mobilenet_v2_a100/mobilenet.qat.onnx.engine.graph.json")
    b = engine_report(engines / "trex_mobilenet_v2_a100/mobilenet_v2_residuals.qat.onnx.engine.graph.json")
    d = diff_reports(a, b)
    return {"matched": len(d.matched), "added": len(d.added), "removed": len(d.removed)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", type=Path, default=REPO.parent / "shared" / "models" / "engines")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    results = {}
    print(f"{'dump':<36}{'standalone':>12}{'kernels':>14}{'ratio':>7}{'matched':>9}  by{'':<22}{'prec agree':>10}")
    for label, dump, build in cases(args.engines):
        if isinstance(build, str):
            results[label] = {"skipped": build}
            print(f"{label:<36}  skipped: {build}")
            continue
        a = agreement(build_report(predicted_engine(build())), engine_report(dump))
        results[label] = a
        by = ", ".join(f"{k} {v}" for k, v in a["matched_by"].items())
        print(f"{label:<36}{a['standalone_qdq'][0]:>5} / {a['standalone_qdq'][1]:<4}{a['kernels'][0]:>6} / {a['kernels'][1]:<5}"
              f"{a['kernel_ratio']:>7.2f}{a['matched']:>9}  {by:<24}{a['precision_agreement']:>10.2f}")
    results["mobilenet_builds_diff"] = mobilenet_builds(args.engines)
    print(f"\nengine-diff of the two MobileNetV2 dumps: {results['mobilenet_builds_diff']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
