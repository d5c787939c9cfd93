"""qdqsurgeon: place and repair Q/DQ nodes in ONNX models for TensorRT INT8."""

from __future__ import annotations

__version__ = "0.1.0"
