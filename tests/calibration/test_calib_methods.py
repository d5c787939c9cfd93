"""Calibration methods and the streaming histogram on synthetic data with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qdqsurgeon.calibration.methods import (
    CALIBRATION_METHODS,
    MIN_AMAX,
    TensorStats,
    compute_amax,
)
from qdqsurgeon.errors import UsageError


def stats_of(x: np.ndarray, chunks: int = 1, num_bins: int = 2048) -> TensorStats:
    s = TensorStats("t", histogram=True, num_bins=num_bins)
    for part in np.array_split(np.asarray(x).ravel(), chunks):
        s.update(part)
    return s


def one_shot_hist(x: np.ndarray, width: float, num_bins: int) -> np.ndarray:
    a = np.abs(np.asarray(x, dtype=np.float64).ravel())
    return np.bincount(np.floor(a / width).astype(np.int64), minlength=num_bins)


@pytest.fixture(scope="module")
def gauss() -> np.ndarray:
    return np.random.default_rng(1).standard_normal(100_000)


def test_max_is_exact():
    x = np.array([0.5, -7.25, 3.0, 1e-3], dtype=np.float32)
    assert compute_amax(stats_of(x), "max") == 7.25
    s = TensorStats("t")  # no histogram needed for max
    s.update(x[:2])
    s.update(x[2:])
    assert compute_amax(s, "max") == 7.25


def test_percentile_matches_numpy_within_a_bin(gauss):
    s = stats_of(gauss, chunks=5)
    for p in (50.0, 99.0, 99.9, 99.99):
        got = compute_amax(s, "percentile", percentile=p)
        assert abs(got - np.percentile(np.abs(gauss), p)) <= s.width
    assert compute_amax(s, "percentile", percentile=100.0) == pytest.approx(np.abs(gauss).max())


@pytest.mark.parametrize("method", sorted(CALIBRATION_METHODS))
def test_every_method_is_positive_at_most_max_and_deterministic(method, gauss):
    x = gauss.copy()
    x[:3] = [40.0, -55.0, 60.0]
    s = stats_of(x, chunks=3)
    amax = compute_amax(s, method)
    assert 0 < amax <= np.abs(x).max()
    assert compute_amax(stats_of(x, chunks=3), method) == amax  # repeated run
    # The power-of-two histogram does not depend on batching, so neither does the result.
    assert compute_amax(stats_of(x, chunks=17), method) == amax
    assert compute_amax(stats_of(x[::-1], chunks=2), method) == amax


@pytest.mark.parametrize("method", sorted(CALIBRATION_METHODS))
def test_all_zero_tensor_gets_a_tiny_positive_amax(method):
    s = stats_of(np.zeros(1000))
    assert compute_amax(s, method) == MIN_AMAX > 0


@pytest.mark.parametrize("method", sorted(CALIBRATION_METHODS))
def test_tiny_tensor_never_exceeds_its_max(method):
    x = np.full(100, 1e-9)
    assert 0 < compute_amax(stats_of(x), method) <= 1e-9


def test_entropy_clips_outliers_of_a_gaussian(gauss):
    x = gauss.copy()
    x[:5] = [30.0, -35.0, 40.0, 45.0, -50.0]
    amax = compute_amax(stats_of(x), "entropy")
    # Outliers are clipped, the bulk (|x| < 4 sigma) is kept.
    assert 2.5 < amax < 10.0


def test_entropy_handles_relu_zero_spike():
    x = np.maximum(np.random.default_rng(2).standard_normal(100_000), 0.0)
    amax = compute_amax(stats_of(x), "entropy")
    # Half the values are exact zeros; the threshold must still cover the bulk of the positives.
    assert 2.5 < amax <= x.max()


def test_mse_on_uniform_data_is_close_to_max():
    x = np.random.default_rng(3).uniform(-3.0, 3.0, 200_000)
    amax = compute_amax(stats_of(x), "mse")
    # Analytically the optimum for uniform data is max / (1 + 1/254) ~ 0.996 max.
    assert amax == pytest.approx(np.abs(x).max(), rel=0.015)


def test_mse_clips_a_long_tail():
    x = np.random.default_rng(4).laplace(size=200_000)
    amax = compute_amax(stats_of(x), "mse")
    assert amax < 0.8 * np.abs(x).max()


def test_nonfinite_values_are_ignored():
    s = TensorStats("t", histogram=True)
    s.update(np.array([1.0, np.inf, np.nan, -2.0]))
    assert s.absmax == 2.0 and s.nonfinite == 2 and s.count == 2
    assert s.hist is not None and s.hist.sum() == 2


def test_unknown_method_and_bad_percentile():
    s = stats_of(np.ones(10))
    with pytest.raises(UsageError, match="unknown calibration method"):
        compute_amax(s, "bogus")
    with pytest.raises(UsageError, match="percentile"):
        compute_amax(s, "percentile", percentile=0.0)
    with pytest.raises(UsageError, match="histogram"):
        compute_amax(TensorStats("t"), "entropy")


def test_streaming_histogram_matches_numpy_histogram(gauss):
    s = stats_of(gauss * 3.0, chunks=9)
    ref, _ = np.histogram(np.abs(gauss * 3.0), bins=s.num_bins, range=(0.0, s.hist_range))
    np.testing.assert_array_equal(s.hist, ref)
    assert s.hist_range > np.abs(gauss * 3.0).max() >= s.hist_range / 2


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=150, deadline=None)
@given(
    x=hnp.arrays(np.float32, st.integers(1, 300), elements=finite),
    cuts=st.lists(st.integers(0, 300), max_size=6),
    num_bins=st.sampled_from([2, 8, 64, 2048]),
)
def test_streaming_histogram_equals_one_shot(x, cuts, num_bins):
    s = TensorStats("t", histogram=True, num_bins=num_bins)
    for part in np.split(x, sorted(c for c in cuts if c <= len(x))):
        s.update(part)
    assert s.absmax == float(np.abs(x).max())
    assert s.hist is not None and s.hist.sum() == x.size
    if s.absmax == 0:
        assert s.hist[0] == x.size
        return
    assert s.hist_range > s.absmax >= s.hist_range / 2
    np.testing.assert_array_equal(s.hist, one_shot_hist(x, s.width, num_bins))
