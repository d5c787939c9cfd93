"""Activation ranges for the passes that insert Q/DQ: from calibration data or a TensorRT cache.

A range provider is called with tensor names and returns their absolute maxima (amax, so that
scale = amax / 127). Results are cached, so later passes asking again (align-scales) cost nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx

from .errors import UsageError

__all__ = ["CalibrationRanges", "CacheRanges", "StaticRanges", "build_ranges"]

logger = logging.getLogger(__name__)


class StaticRanges:
    """Ranges from a fixed mapping (tests, API users with their own statistics)."""

    def __init__(self, amax: Mapping[str, float]) -> None:
        self._amax = dict(amax)
        self.missing: set[str] = set()

    def __call__(self, names: Sequence[str]) -> dict[str, float]:
        self.missing |= {n for n in names if n not in self._amax}
        return {n: self._amax[n] for n in names if n in self._amax}


class CalibrationRanges:
    """Runs the original float model in onnxruntime over the calibration data, on demand."""

    def __init__(self, model: onnx.ModelProto, data: Iterable, method: str, *, percentile: float = 99.99,
                 progress: bool = True) -> None:
        self.model = model
        self.data = data
        self.method = method
        self.percentile = percentile
        self.progress = progress
        self._cache: dict[str, float] = {}
        self.missing: set[str] = set()
        self.runs = 0
        self._auto = None  # one AutoSelector for every request: graph analysis once, tied groups remembered

    def calibration_source(self) -> tuple[onnx.ModelProto, Iterable] | None:
        """(float model, data) for bias correction; None for random data, which says nothing about real inputs."""
        from .calibration.data import _RandomSource

        return None if isinstance(self.data, _RandomSource) else (self.model, self.data)

    def __call__(self, names: Sequence[str]) -> dict[str, float]:
        from .calibration import calibrate

        todo = [n for n in dict.fromkeys(names) if n not in self._cache and n not in self.missing]
        if todo:
            self.runs += 1
            if self.method == "auto":
                from .calibration.auto import AutoSelector

                self._auto = self._auto or AutoSelector(self.model, percentile=self.percentile)
                found = self._auto.select(todo, self.data, progress=self.progress)
            else:
                found = calibrate(self.model, todo, self.data, self.method, percentile=self.percentile, progress=self.progress)
            self._cache.update({k: float(v) for k, v in found.items()})
            self.missing |= {n for n in todo if n not in found}
        return {n: self._cache[n] for n in names if n in self._cache}


class CacheRanges:
    """Ranges imported from a TensorRT calibration cache (scale · 127), optionally backed by calibration."""

    def __init__(self, scales: Mapping[str, float], fallback: CalibrationRanges | None = None) -> None:
        self.amax = {k: float(v) * 127.0 for k, v in scales.items() if np.isfinite(v) and v > 0}
        self.fallback = fallback
        self.missing: set[str] = set()

    def calibration_source(self) -> tuple[onnx.ModelProto, Iterable] | None:
        return self.fallback.calibration_source() if self.fallback is not None else None

    def __call__(self, names: Sequence[str]) -> dict[str, float]:
        out = {n: self.amax[n] for n in names if n in self.amax}
        rest = [n for n in names if n not in out]
        if rest and self.fallback is not None:
            out.update(self.fallback(rest))
            rest = [n for n in rest if n not in out]
        if rest:
            new = set(rest) - self.missing
            if new:
                logger.warning("%d tensor(s) missing from the calibration cache, left unquantized: %s",
                               len(new), ", ".join(sorted(new)[:8]) + (" ..." if len(new) > 8 else ""))
            self.missing |= set(rest)
        return out


def build_ranges(
    model: onnx.ModelProto,
    *,
    calib: str | Path | None = None,
    method: str | None = None,
    percentile: float = 99.99,
    preprocess: str | None = None,
    calib_random: int | None = None,
    calib_cache: str | Path | None = None,
    progress: bool = True,
):
    """A range provider from the CLI's calibration options, or None when none was given."""
    from .calibration import DEFAULT_METHOD, Preprocess, open_data, random_data, read_trt_cache

    method = method or DEFAULT_METHOD
    backing: CalibrationRanges | None = None
    if calib is not None and calib_random:
        raise UsageError("--calib and --calib-random are exclusive")
    if calib is not None:
        pre = Preprocess.parse(preprocess) if preprocess else None
        backing = CalibrationRanges(model, open_data(calib, model, pre), method, percentile=percentile, progress=progress)
    elif calib_random:
        backing = CalibrationRanges(model, random_data(model, int(calib_random)), method, percentile=percentile, progress=progress)
    if calib_cache is not None:
        return CacheRanges(read_trt_cache(calib_cache), fallback=backing)
    return backing
