"""Symmetric INT8 arithmetic shared by the passes: scales from ranges, weight scales, quantization.

TensorRT quantizes symmetrically with zero point 0 (rule V2). Scales are never zero (V1): a
dead channel or an all-zero tensor gets :data:`MIN_SCALE`.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MIN_SCALE", "QMAX", "scale_from_amax", "weight_scales", "quantize_int8", "dequantize", "expand_blocks", "fake_quant", "scale_in"]

QMAX = 127.0
# The smallest scale emitted. Far above float32's denormal range, so that TensorRT's
# requantization factor s_out / (s_in * s_w) stays finite even for a dead weight channel.
MIN_SCALE = 1e-8


def scale_from_amax(amax: float | np.ndarray) -> np.ndarray:
    """Symmetric INT8 scale covering [-amax, amax], as float32, never below MIN_SCALE."""
    s = np.asarray(amax, dtype=np.float64) / QMAX
    s = np.where(np.isfinite(s) & (s > MIN_SCALE), s, MIN_SCALE)
    return s.astype(np.float32)


def scale_in(scale: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``scale`` in the float type of the tensor it quantizes (opset 19: the DQ output type is the scale's).

    float16 scales are clamped to [2^-14, 65504]: a subnormal or zero scale breaks V1, an
    infinite one every value. bfloat16 shares float32's exponent range, so MIN_SCALE survives.
    """
    dtype = np.dtype(dtype)
    scale = np.asarray(scale, dtype=np.float32)
    if dtype == np.float16:
        info = np.finfo(np.float16)
        scale = np.clip(scale, float(info.tiny), float(info.max))
    return scale.astype(dtype)


def weight_scales(w: np.ndarray, axis: int | None) -> np.ndarray:
    """Per-channel (along ``axis``) or per-tensor (``axis`` None) symmetric scales of a weight."""
    w = np.asarray(w, dtype=np.float32)
    if axis is None:
        return scale_from_amax(_amax(w, None) if w.size else 0.0).reshape(())
    axis = axis % w.ndim
    reduce = tuple(i for i in range(w.ndim) if i != axis)
    return scale_from_amax(_amax(w, reduce) if reduce else np.abs(w))


def _amax(w: np.ndarray, axis: tuple[int, ...] | None) -> np.ndarray:
    """``np.max(np.abs(w), axis)``, the same values, without the weight-sized temporary of ``np.abs``
    (on a 1 GB weight that was 1 GB more memory and most of the time)."""
    return np.maximum(np.max(w, axis=axis), -np.min(w, axis=axis)) + np.float32(0)  # + 0 turns -0.0 into 0.0


def _bshape(scale: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if scale.ndim == 0 or axis is None or scale.ndim == ndim:
        return scale
    shape = [1] * ndim
    shape[axis % ndim] = scale.size
    return scale.reshape(shape)


def quantize_int8(x: np.ndarray, scale: np.ndarray, axis: int | None = None) -> np.ndarray:
    """round-half-to-even(x / scale) saturated to int8, exactly as ONNX QuantizeLinear does."""
    x = np.asarray(x, dtype=np.float32)
    q = np.rint(x / _bshape(np.asarray(scale, dtype=np.float32), x.ndim, axis))
    return np.clip(q, -128, 127).astype(np.int8)


def expand_blocks(values: np.ndarray, axis: int, block_size: int, extent: int) -> np.ndarray:
    """Blocked scale/zero point (one value per ``block_size`` elements of ``axis``) repeated to the data's extent."""
    values = np.asarray(values)
    return np.repeat(values, block_size, axis=axis).take(np.arange(extent), axis=axis)


def dequantize(q: np.ndarray, scale: np.ndarray, axis: int | None = None, zero_point: np.ndarray | None = None,
               block_size: int = 0) -> np.ndarray:
    """``(q - zp)·s`` in float32: per-tensor, per-channel along ``axis``, or blocked (``block_size`` > 0, opset 21)."""
    q = np.asarray(q).astype(np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    zp = None if zero_point is None else np.asarray(zero_point).astype(np.float32)
    if block_size and axis is not None:
        axis = axis % q.ndim
        scale = expand_blocks(scale, axis, block_size, q.shape[axis])
        zp = None if zp is None else expand_blocks(zp, axis, block_size, q.shape[axis])
        axis = None  # now elementwise
    if zp is not None:
        q = q - _bshape(zp, q.ndim, axis)
    return (q * _bshape(scale, q.ndim, axis)).astype(np.float32)


def fake_quant(x: np.ndarray, scale: np.ndarray, axis: int | None = None) -> np.ndarray:
    return dequantize(quantize_int8(x, scale, axis), scale, axis)
