"""TensorRT calibration cache import, checked against a hand-rolled IEEE-754 decoder."""

from __future__ import annotations

from pathlib import Path

import pytest

from qdqsurgeon.calibration import read_trt_cache
from qdqsurgeon.errors import DataError

CACHES = Path(__file__).resolve().parents[2] / ".." / "shared" / "models" / "calib_caches"
needs_shared = pytest.mark.skipif(not CACHES.is_dir(), reason=f"shared models folder not found at {CACHES}")


def decode_by_hand(h: str) -> float:
    """float32 from its big-endian hex, by sign/exponent/mantissa arithmetic (normal numbers)."""
    bits = int(h, 16)
    sign = -1.0 if bits >> 31 else 1.0
    exponent = (bits >> 23) & 0xFF
    mantissa = bits & 0x7FFFFF
    assert 0 < exponent < 255
    return sign * (1.0 + mantissa / 2**23) * 2.0 ** (exponent - 127)


@needs_shared
@pytest.mark.parametrize(
    ("name", "count", "entries"),
    [
        (
            "yolov5s_qat_trt86_entropy2.cache",
            197,
            {"images": "3c00f9f4", "/model.0/act/Mul_output_0": "3e6c9314", "/model.2/cv1/act/Mul_output_0": "3df899ac"},
        ),
        (
            "resnet18_imagenet_trt1015_entropy2.cache",
            74,
            {"images": "3cb6ca49", "node_linear_output": "3e50102d", "node_Conv_335 expanded_const_filter": "3f800000"},
        ),
    ],
)
def test_shared_caches(name, count, entries):
    scales = read_trt_cache(CACHES / name)
    assert len(scales) == count
    for tensor, h in entries.items():
        assert scales[tensor] == decode_by_hand(h)
    assert scales.get("node_Conv_335 expanded_const_filter", 1.0) == 1.0  # 0x3f800000 is exactly 1
    assert all(v >= 0 for v in scales.values())


def test_other_calibrator_headers_and_colons_in_names(tmp_path):
    for header in ("TRT-8601-MinMaxCalibration", "TRT-7000-LegacyCalibration", "TRT-100-EntropyCalibration"):
        p = tmp_path / "c.cache"
        p.write_text(f"{header}\nscope:a/b:0: 3f800000\nx: 40000000\n\n")
        assert read_trt_cache(p) == {"scope:a/b:0": 1.0, "x": 2.0}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not a cache\nx: 3f800000\n", "line 1"),
        ("", "line 1"),
        ("TRT-8600-EntropyCalibration2\nx: 3f800000\nbroken line\n", "line 3"),
        ("TRT-8600-EntropyCalibration2\nx: zz\n", "line 2"),
        ("TRT-8600-EntropyCalibration2\nx: 7fc00000\n", "line 2"),  # NaN scale
    ],
)
def test_bad_caches_name_the_line(tmp_path, text, message):
    p = tmp_path / "bad.cache"
    p.write_text(text)
    with pytest.raises(DataError, match=message) as info:
        read_trt_cache(p)
    assert str(p) in str(info.value)


def test_missing_cache(tmp_path):
    with pytest.raises(DataError, match="no such"):
        read_trt_cache(tmp_path / "nope.cache")
