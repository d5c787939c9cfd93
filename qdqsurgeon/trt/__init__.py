"""TensorRT integration: build the rewritten model, and read the engine back.

* :mod:`~qdqsurgeon.trt.build`: build an engine (TensorRT imported lazily);
* :mod:`~qdqsurgeon.trt.engine`: parse layer-info and profile JSON;
* :mod:`~qdqsurgeon.trt.report`: counts, precisions, times and E2/E3 findings mapped to ONNX;
* :mod:`~qdqsurgeon.trt.diff`: compare two engines;
* :mod:`~qdqsurgeon.trt.html`: self-contained HTML report;
* :mod:`~qdqsurgeon.trt.commands`: the click commands.

Importing this package never imports TensorRT.
"""

from __future__ import annotations

import logging

from qdqsurgeon.trt.build import BuildResult, ShapeRange, build_engine, parse_shapes, shape_ranges
from qdqsurgeon.trt.diff import EngineDiff, diff_reports, engine_diff
from qdqsurgeon.trt.engine import EngineInfo, Layer, Profile, load_layer_info, load_profile
from qdqsurgeon.trt.report import EngineReport, Finding, build_report, engine_report

__all__ = [
    "BuildResult",
    "ShapeRange",
    "build_engine",
    "parse_shapes",
    "shape_ranges",
    "EngineDiff",
    "diff_reports",
    "engine_diff",
    "EngineInfo",
    "Layer",
    "Profile",
    "load_layer_info",
    "load_profile",
    "EngineReport",
    "Finding",
    "build_report",
    "engine_report",
]

logger = logging.getLogger(__name__)
