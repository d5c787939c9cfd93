"""Read TensorRT calibration caches (implicit-INT8 PTQ) as per-tensor scales.

A cache is text: a header such as ``TRT-8600-EntropyCalibration2`` (any
``TRT-<version>-<Name>Calibration<suffix>``: MinMax, Legacy, Entropy, EntropyCalibration2),
then one ``tensor_name: hex`` line per tensor, the hex being the big-endian IEEE-754 float32
scale (amax = scale * 127). Tensor names may contain spaces and colons, so each line is split
at its last colon.
"""

from __future__ import annotations

import logging
import math
import re
import struct
from pathlib import Path

from qdqsurgeon.errors import DataError

__all__ = ["read_trt_cache", "parse_trt_cache", "CACHE_HEADER"]

logger = logging.getLogger(__name__)

CACHE_HEADER = re.compile(r"^TRT-\d+-\w*Calibration\w*$")
_HEX = re.compile(r"^[0-9a-fA-F]{1,8}$")


def parse_trt_cache(text: str, source: str = "<cache>") -> dict[str, float]:
    """Parse cache text; ``source`` names the file in error messages."""
    lines = text.splitlines()
    if not lines or not CACHE_HEADER.match(lines[0].strip()):
        first = lines[0].strip()[:60] if lines else ""
        raise DataError(
            f"line 1: not a TensorRT calibration cache header (expected e.g. TRT-8600-EntropyCalibration2, got {first!r})",
            path=source,
        )
    scales: dict[str, float] = {}
    for number, raw in enumerate(lines[1:], start=2):
        line = raw.strip()
        if not line:
            continue
        name, sep, value = line.rpartition(":")
        name, value = name.strip(), value.strip()
        if not sep or not name or not _HEX.match(value):
            raise DataError(f"line {number}: expected 'tensor_name: hex', got {line[:80]!r}", path=source)
        scale = struct.unpack(">f", bytes.fromhex(value.zfill(8)))[0]
        if not math.isfinite(scale) or scale < 0:
            raise DataError(f"line {number}: scale of {name!r} is {scale}, not a finite non-negative number", path=source)
        if name in scales and scales[name] != scale:
            logger.warning("%s: line %d: %s repeated with another scale; keeping the last", source, number, name)
        scales[name] = scale
    return scales


def read_trt_cache(path: str | Path) -> dict[str, float]:
    """Tensor name -> float32 scale from a TensorRT calibration cache file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError("no such calibration cache", path=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read calibration cache: {exc}", path=str(path)) from None
    return parse_trt_cache(text, str(path))
