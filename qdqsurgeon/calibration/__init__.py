"""Post-training calibration: data sources, statistics collection, amax methods, TensorRT caches.

Typical use::

    src = open_data("calib/", model, Preprocess.parse("mean=0.485/0.456/0.406,std=0.229/0.224/0.225"))
    amax = calibrate(model, ["conv1_out", "relu3_out"], src, method="entropy")
    scales = {name: a / 127 for name, a in amax.items()}
"""

from __future__ import annotations

from qdqsurgeon.calibration.cache import read_trt_cache
from qdqsurgeon.calibration.collect import calibrate, collect_stats, expose_tensors, make_session
from qdqsurgeon.calibration.data import DataSource, InputSpec, Preprocess, model_inputs, open_data, random_data
from qdqsurgeon.calibration.methods import CALIBRATION_METHODS, DEFAULT_METHOD, TensorStats, compute_amax

__all__ = [
    "Preprocess",
    "DataSource",
    "InputSpec",
    "model_inputs",
    "open_data",
    "random_data",
    "calibrate",
    "collect_stats",
    "expose_tensors",
    "make_session",
    "TensorStats",
    "compute_amax",
    "read_trt_cache",
    "CALIBRATION_METHODS",
    "DEFAULT_METHOD",
]
