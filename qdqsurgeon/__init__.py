"""qdqsurgeon: place and repair Q/DQ nodes in ONNX models so TensorRT builds fast INT8 engines.

Python API (the CLI is a thin layer over it)::

    import qdqsurgeon
    model = qdqsurgeon.load("model.onnx")
    result = qdqsurgeon.optimize(model, ranges=...)    # or passes=["fold-qdq-pairs", ...]
    qdqsurgeon.save(result.model, "model.int8.onnx")
"""

from __future__ import annotations

__version__ = "0.1.0"

from .api import OptimizeResult, detect_mode, optimize
from .config import Config
from .errors import DataError, ModelError, QdqError, TensorRTMissingError, UsageError
from .inspection import inspect_model
from .io import load, save
from .passes.base import Instrument, Pass, PassContext, PassManager, PassResult, TimingInstrument, VerifyInstrument
from .patterns.base import Match, NoMatch, Pattern, PatternPass
from .pipelines import PIPELINES
from .ranges import StaticRanges, build_ranges
from .registry import Registry
from .rewriter import Change, Rewriter

__all__ = [
    "__version__",
    "Change",
    "Config",
    "DataError",
    "Instrument",
    "Match",
    "ModelError",
    "NoMatch",
    "OptimizeResult",
    "PIPELINES",
    "Pass",
    "PassContext",
    "PassManager",
    "PassResult",
    "Pattern",
    "PatternPass",
    "QdqError",
    "Registry",
    "Rewriter",
    "StaticRanges",
    "TensorRTMissingError",
    "TimingInstrument",
    "UsageError",
    "VerifyInstrument",
    "detect_mode",
    "inspect_model",
    "load",
    "optimize",
    "build_ranges",
    "save",
]
