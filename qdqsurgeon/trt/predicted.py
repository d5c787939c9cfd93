"""The static prediction as an engine dump (:class:`~qdqsurgeon.trt.engine.EngineInfo`).

``engine-diff`` and ``engine-report`` then treat a prediction like a real dump: its layers are
the predicted kernels (:class:`qdqsurgeon.analysis.Kernel`), named as TensorRT names fused
layers (``a + b + c``), standalone Q/DQ with ``Origin: "QDQ"``, precisions on the tensors.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from qdqsurgeon.trt.engine import EngineInfo, Layer, TensorInfo

__all__ = ["engine_from_prediction", "predicted_engine"]

_PRECISION = {"float": "fp32", "int8": "int8", "fp8": "fp8", "int4": "int4"}


def engine_from_prediction(pred, *, source: str | None = None) -> EngineInfo:
    """An :class:`EngineInfo` whose layers are ``pred.kernels`` (a :class:`qdqsurgeon.analysis.TrtPrediction`)."""
    layers = []
    for i, k in enumerate(pred.kernels):
        name = " + ".join([*k.weights, *k.nodes])
        ins = [TensorInfo(t, precision=_PRECISION.get(k.in_precision, k.in_precision)) for t in k.inputs]
        outs = [TensorInfo(t, precision=_PRECISION.get(k.out_precision, k.out_precision)) for t in k.outputs]
        kind = "Reformat" if k.standalone_qdq else k.kind
        layers.append(Layer(i, name, layer_type=kind, origin="QDQ" if k.standalone_qdq else None, inputs=ins, outputs=outs,
                            metadata="".join(f"[ONNX Layer: {n}]\x1e" for n in k.nodes)))
    return EngineInfo(layers, detailed=True, source=source)


def predicted_engine(model: str | Path | onnx.ModelProto, *, trt_version: str | None = None) -> EngineInfo:
    """Load ``model`` (a path or a ModelProto), predict its engine and return it as an :class:`EngineInfo`."""
    from qdqsurgeon.analysis import predict
    from qdqsurgeon.io import load

    proto = model if isinstance(model, onnx.ModelProto) else load(model, infer_shapes=True)
    source = None if isinstance(model, onnx.ModelProto) else f"{model} (predicted)"
    return engine_from_prediction(predict(proto, trt_version=trt_version), source=source)
