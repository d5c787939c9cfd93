"""Calibration statistics and the methods that turn them into an amax (pure numpy).

:class:`TensorStats` accumulates, batch by batch, the exact absolute maximum of a tensor and
optionally a histogram of ``|x|`` with a fixed number of bins whose range grows as needed.

The histogram covers ``[0, 2**e)`` with ``2**e`` the smallest power of two strictly above the
running absmax, so the bin width is ``2**e / num_bins``. When a batch exceeds the range, the range doubles and adjacent bin pairs are merged;
merging is exact because the new edges are a subset of the old ones, and ``x / width`` is exact
in binary floating point. The final histogram is therefore identical to a one-shot histogram of
all the data, whatever the batching (the price: between ``num_bins/2`` and ``num_bins`` bins
are in use).

Methods (each returns ``0 < amax <= absmax``; an all-zero tensor gets :data:`MIN_AMAX`):

- ``max``: the absolute maximum.
- ``percentile``: the given percentile of ``|x|``, interpolated linearly inside its bin.
- ``entropy``: TensorRT's entropy calibration (v2): for every candidate threshold from bin 128
  up, clip the histogram there (outliers folded into the last bin), quantize it to 128 levels,
  expand it back and keep the threshold of minimum KL divergence.
- ``mse``: the threshold minimising the expected squared error of symmetric int8 fake
  quantization, rounding and clipping error both, assuming values spread uniformly within a bin.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import numpy as np

from qdqsurgeon.errors import UsageError

__all__ = [
    "TensorStats",
    "CALIBRATION_METHODS",
    "HISTOGRAM_METHODS",
    "METHODS",
    "DEFAULT_METHOD",
    "MIN_AMAX",
    "compute_amax",
    "amax_max",
    "amax_percentile",
    "amax_entropy",
    "amax_mse",
    "amax_mse_fast",
    "amax_entropy_fast",
    "kl_curve",
    "mse_curve",
    "hist_sq_error",
    "hist_energy",
]

logger = logging.getLogger(__name__)

# TensorRT rejects zero scales (rule V1); a dead tensor gets this amax instead.
MIN_AMAX = 1e-6
_QMAX = 127
_ENTROPY_LEVELS = 128


class TensorStats:
    """Running absmax, element count and (optionally) a histogram of ``|x|`` of one tensor."""

    def __init__(self, name: str, *, histogram: bool = False, num_bins: int = 2048) -> None:
        if num_bins < 2 or num_bins % 2:
            raise UsageError(f"num_bins must be an even number >= 2, got {num_bins}")
        self.name = name
        self.absmax = 0.0
        self.count = 0
        self.nonfinite = 0
        self.num_bins = num_bins
        self.hist: np.ndarray | None = np.zeros(num_bins, dtype=np.int64) if histogram else None
        self.width = 0.0  # bin width; 0 until the first non-zero value arrives

    @property
    def hist_range(self) -> float:
        return self.width * self.num_bins

    def update(self, x: np.ndarray) -> None:
        a = np.abs(np.asarray(x, dtype=np.float64).ravel())
        if a.size == 0:
            return
        m = float(a.max())
        if not math.isfinite(m):
            finite = np.isfinite(a)
            self.nonfinite += int(a.size - finite.sum())
            a = a[finite]
            m = float(a.max()) if a.size else 0.0
        self.count += int(a.size)
        self.absmax = max(self.absmax, m)
        if self.hist is None:
            return
        if m > 0.0 and m >= self.hist_range:
            self._grow(m)
        if self.width == 0.0:
            self.hist[0] += a.size  # only zeros so far; bin 0 holds them whatever the width
            return
        idx = np.floor(a / self.width).astype(np.int64)
        self.hist += np.bincount(idx, minlength=self.num_bins)

    def _grow(self, m: float) -> None:
        # Smallest power of two strictly above m (frexp: m = f * 2**e, 0.5 <= f < 1).
        target = math.ldexp(1.0, math.frexp(m)[1])
        if self.width == 0.0:
            self.width = target / self.num_bins
            return
        assert self.hist is not None
        while self.hist_range < target:
            merged = self.hist.reshape(-1, 2).sum(axis=1)
            self.hist = np.concatenate([merged, np.zeros(self.num_bins // 2, dtype=np.int64)])
            self.width *= 2.0

    def merged(self, other: "TensorStats") -> "TensorStats":
        """Statistics of both inputs' data together (exact: bin edges are powers of two apart)."""
        out = TensorStats(self.name, histogram=self.hist is not None, num_bins=self.num_bins)
        out.absmax = max(self.absmax, other.absmax)
        out.count = self.count + other.count
        out.nonfinite = self.nonfinite + other.nonfinite
        if out.hist is None or self.hist is None or other.hist is None:
            return out
        parts = [s for s in (self, other) if s.width > 0.0]
        out.width = max((s.width for s in parts), default=0.0)
        for s in (self, other):
            hist = s.hist.copy()
            if s.width == 0.0:
                out.hist[0] += hist.sum()  # only zeros: bin 0 whatever the width
                continue
            width = s.width
            while width < out.width:
                hist = np.concatenate([hist.reshape(-1, 2).sum(axis=1), np.zeros(self.num_bins // 2, dtype=np.int64)])
                width *= 2.0
            out.hist += hist
        return out

    def coarsened(self, factor: int) -> "TensorStats":
        """The same statistics with ``factor`` adjacent bins merged (``num_bins / factor`` bins)."""
        if factor <= 1 or self.hist is None:
            return self
        out = TensorStats(self.name, histogram=True, num_bins=self.num_bins // factor)
        out.absmax, out.count, out.nonfinite = self.absmax, self.count, self.nonfinite
        out.width = self.width * factor
        out.hist = self.hist.reshape(-1, factor).sum(axis=1)
        return out

    def used_bins(self) -> int:
        """Number of bins up to and including the last non-empty one."""
        assert self.hist is not None
        nz = np.flatnonzero(self.hist)
        return int(nz[-1]) + 1 if nz.size else 0


def _finish(amax: float, stats: TensorStats) -> float:
    """Clamp into ``(0, absmax]``; a vanishing amax would make a zero float32 scale."""
    if stats.absmax <= 0.0:
        return MIN_AMAX
    if not math.isfinite(amax):
        return stats.absmax
    return float(min(max(amax, MIN_AMAX), stats.absmax))


def _need_hist(stats: TensorStats, method: str) -> np.ndarray:
    if stats.hist is None:
        raise UsageError(f"method {method!r} needs a histogram; collect statistics with histogram=True")
    return stats.hist


def amax_max(stats: TensorStats) -> float:
    """The absolute maximum seen."""
    return _finish(stats.absmax, stats)


def amax_percentile(stats: TensorStats, percentile: float = 99.99) -> float:
    """The ``percentile`` of ``|x|`` from the histogram, linearly interpolated within its bin."""
    if not 0.0 < percentile <= 100.0:
        raise UsageError(f"percentile must be in (0, 100], got {percentile}")
    hist = _need_hist(stats, "percentile")
    total = int(hist.sum())
    if total == 0 or stats.width == 0.0:
        return _finish(0.0, stats)
    if percentile == 100.0:
        return _finish(stats.absmax, stats)
    target = total * percentile / 100.0
    cdf = np.cumsum(hist)
    j = int(np.searchsorted(cdf, target, side="left"))
    below = float(cdf[j - 1]) if j else 0.0
    frac = (target - below) / float(hist[j]) if hist[j] else 1.0
    return _finish((j + frac) * stats.width, stats)


def amax_entropy(stats: TensorStats, start_bin: int = _ENTROPY_LEVELS, levels: int = _ENTROPY_LEVELS,
                 *, step: int = 1) -> float:
    """Threshold minimising KL(P || Q) as TensorRT's entropy calibrator v2 does.

    ``step`` > 1 searches every ``step``-th threshold and then the ones around the best of them
    (what ``auto`` uses: about ``used / step + 2 step`` divergences instead of ``used``).

    For candidate ``i`` (number of bins kept): P is ``hist[:i]`` with everything above added to
    its last bin; Q is ``hist[:i]`` merged into ``levels`` groups, each group's mass spread
    evenly over its originally non-empty bins. Q lacks the clipped mass, which is what makes
    clipping cost something. The threshold is the upper edge of bin ``i - 1``.
    """
    hist = _need_hist(stats, "entropy").astype(np.float64)
    used = stats.used_bins()
    if used == 0 or stats.width == 0.0:
        return _finish(0.0, stats)
    # Exact zeros (half of every ReLU output) pile up in bin 0; left alone, that spike dominates
    # P and drags the threshold down. Flatten it to its neighbour, as NVIDIA's calibrators do.
    hist[0] = hist[1]
    if used <= start_bin:
        return _finish(stats.absmax, stats)  # too few bins to clip anything meaningfully
    total = hist.sum()
    tail = total - np.cumsum(hist)  # tail[i - 1] = mass in bins >= i

    def search(candidates: Iterable[int]) -> tuple[int, float]:
        best_i, best_kl = used, math.inf
        for i in candidates:
            kl = _kl_at(hist, tail, total, i, levels)
            if kl < best_kl:
                best_kl, best_i = kl, i
        return best_i, best_kl

    if step <= 1:
        best_i, _ = search(range(start_bin, used + 1))
    else:
        def best_of(idx: list[int]) -> int:
            kl = _kl_many(hist[:used], total, np.asarray(idx), levels)
            return idx[int(np.argmin(kl))] if np.isfinite(kl).any() else used

        best_i = _coarse_to_fine(start_bin, used, step, best_of)
    return _finish(best_i * stats.width, stats)


def _kl_many(hist: np.ndarray, total: float, keep: np.ndarray, levels: int) -> np.ndarray:
    """:func:`_kl_at` for many bin counts ``keep`` at once (a [len(keep), bins] computation).

    Bin ``b < i`` falls in group ``((b + 1)·levels - 1) // i`` of the ``levels`` groups
    ``[floor(j·i/levels), floor((j+1)·i/levels))``; group sums come from cumulative sums.
    """
    n = hist.size
    i = keep.reshape(-1, 1).astype(np.int64)
    b = np.arange(n).reshape(1, -1)
    inside = b < i
    csum = np.concatenate([[0.0], np.cumsum(hist)])
    cnz = np.concatenate([[0.0], np.cumsum(hist > 0)])
    j = ((b + 1) * levels - 1) // i
    lo = np.minimum((j * i) // levels, n)
    hi = np.minimum(((j + 1) * i) // levels, n)
    mass, nz = csum[hi] - csum[lo], cnz[hi] - cnz[lo]
    q = np.where(inside & (hist > 0), mass / np.maximum(nz, 1.0), 0.0)
    tail = total - csum[np.minimum(i, n)]  # mass in bins >= i, folded into bin i - 1
    p = np.where(inside, hist, 0.0) + np.where(b == i - 1, tail, 0.0)
    qsum = csum[np.minimum(i, n)]
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, (p / total) * np.log((p / total) / (q / qsum)), 0.0)
    kl = terms.sum(axis=1)
    kl[((p > 0) & (q == 0)).any(axis=1)] = np.inf
    return kl


def kl_curve(stats: TensorStats, start_bin: int = _ENTROPY_LEVELS, levels: int = _ENTROPY_LEVELS, *,
             counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """KL(P || Q) of :func:`amax_entropy` for every bin count ``i`` from ``start_bin`` up (or for ``counts``),
    in O(levels) per count.

    Per ``i``, with the clipped tail folded into bin ``i - 1``: ``sum p log p`` comes from a prefix sum of
    ``h log h`` and the last bin; ``sum p log q`` is, per group, its mass times the log of its mass per
    non-empty bin (Q is constant on a group's non-empty bins), so it needs only the groups' prefix sums.
    (bin counts, divergences); inf where P has mass Q lacks. The same values as :func:`_kl_many`.
    """
    hist = _need_hist(stats, "entropy").astype(np.float64)
    used = stats.used_bins()
    if used == 0 or stats.width == 0.0 or used < start_bin:
        return np.zeros(0, np.int64), np.zeros(0)
    hist[0] = hist[1]  # the zero spike, as amax_entropy
    h = hist[:used]
    total = h.sum()
    csum = np.concatenate([[0.0], np.cumsum(h)])
    cnz = np.concatenate([[0.0], np.cumsum(h > 0)])
    with np.errstate(divide="ignore", invalid="ignore"):
        hlogh = np.where(h > 0, h * np.log(np.where(h > 0, h, 1.0)), 0.0)
    cplogp = np.concatenate([[0.0], np.cumsum(hlogh)])
    i = np.arange(start_bin, used + 1) if counts is None else np.asarray(counts, dtype=np.int64)
    tail = total - csum[i]
    last = h[i - 1] + tail
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = cplogp[i - 1] + np.where(last > 0, last * np.log(np.where(last > 0, last, 1.0)), 0.0)
        bounds = (np.arange(levels + 1)[np.newaxis, :] * i[:, np.newaxis]) // levels  # [n, levels + 1]
        mass = np.diff(csum[bounds], axis=1)
        nz = np.diff(cnz[bounds], axis=1)
        per_bin = np.where(mass > 0, mass / np.maximum(nz, 1.0), 1.0)
        plogq_groups = np.sum(mass * np.log(per_bin), axis=1)
        qsum = csum[i]
        # the tail sits in bin i - 1, of the last group
        plogq = plogq_groups + tail * np.log(np.where(h[i - 1] > 0, per_bin[:, -1], 1.0))
        kl = (plogp - plogq) / total - np.log(total) + np.log(qsum)
    kl[(tail > 0) & (h[i - 1] == 0)] = np.inf
    return i, kl


def amax_entropy_fast(stats: TensorStats, step: int = 8, keep: int = 4) -> float:
    """:func:`amax_entropy`'s threshold from :func:`kl_curve` at every ``step``-th bin count, then at every
    count around the ``keep`` best of those (a bumpy curve has several minima): ``auto``'s entropy candidate."""
    used = stats.used_bins() if stats.hist is not None else 0
    if used < _ENTROPY_LEVELS or stats.width == 0.0:
        return _finish(stats.absmax, stats)
    i, kl = kl_curve(stats, counts=np.unique(np.r_[np.arange(_ENTROPY_LEVELS, used + 1, step), used]))
    if not np.isfinite(kl).any():
        return _finish(stats.absmax, stats)
    near = i[np.argsort(kl)[:keep]]
    fine = np.unique(np.clip((near[:, None] + np.arange(-step + 1, step)).ravel(), _ENTROPY_LEVELS, used))
    i, kl = kl_curve(stats, counts=fine)
    return _finish(float(i[int(np.argmin(kl))]) * stats.width, stats)


def _coarse_to_fine(lo: int, hi: int, step: int, best_of: Callable[[list[int]], int]) -> int:
    """Search integers in ``[lo, hi]``: every ``step``-th, then ever finer steps (÷8) around the best so far."""
    best = best_of(sorted({*range(lo, hi + 1, step), hi}))
    while step > 1:
        fine = max(1, step // 8)
        best = best_of(sorted({*range(max(lo, best - step + fine), min(hi, best + step - fine) + 1, fine), best}))
        step = fine
    return best


def _kl_at(hist: np.ndarray, tail: np.ndarray, total: float, i: int, levels: int) -> float:
    """KL(P || Q) of keeping ``i`` bins (see :func:`amax_entropy`); inf when Q misses mass P has."""
    p = hist[:i].copy()
    p[-1] += tail[i - 1]
    nonzero = hist[:i] > 0
    bounds = (np.arange(levels + 1) * i) // levels
    group_mass = np.add.reduceat(hist[:i], bounds[:-1])
    group_nz = np.add.reduceat(nonzero.astype(np.float64), bounds[:-1])
    per_bin = np.divide(group_mass, group_nz, out=np.zeros_like(group_mass), where=group_nz > 0)
    q = np.repeat(per_bin, np.diff(bounds)) * nonzero
    mask = p > 0
    if np.any(q[mask] == 0):
        return math.inf  # P has mass where Q has none: infinite divergence
    p_n = p[mask] / total
    q_n = q[mask] / q.sum()
    return float(np.sum(p_n * np.log(p_n / q_n)))


def _sawtooth_integral(x: np.ndarray, s: float) -> np.ndarray:
    """``G(x) = ∫_0^x (t - s·round(t/s))² dt``: accumulated squared rounding error, x >= 0."""
    k = np.floor(x / s + 0.5)
    u = x - k * s
    return k * (s**3 / 12.0) + (u**3 + s**3 / 8.0) / 3.0 - s**3 / 24.0


def hist_sq_error(stats: TensorStats, thresholds: np.ndarray, *, merge: int = 1) -> np.ndarray:
    """Expected total squared error of int8 fake quantization with amax ``T``, for each of ``thresholds``.

    Values below ``T`` cost the mean rounding error ``(x - s·round(x/s))²`` (``s = T / 127``) over
    their bin, values above it the clipping error ``(x - T)²``; values are uniform within a bin, and
    a bin that ``T`` cuts is split at ``T``. One vectorized evaluation for all thresholds;
    ``merge`` > 1 first merges that many adjacent bins (a coarser, cheaper estimate).
    """
    hist = _need_hist(stats, "mse").astype(np.float64)
    t = np.asarray(thresholds, dtype=np.float64).reshape(-1, 1)
    used = stats.used_bins()
    if used == 0 or stats.width == 0.0:
        return np.zeros(t.shape[0])
    w = stats.width
    counts = hist[:used]
    if merge > 1:
        counts = np.add.reduceat(counts, np.arange(0, used, merge))
        w *= merge
    keep = np.flatnonzero(counts)
    counts = counts[keep]
    lo = keep * w
    hi = lo + w
    s = t / _QMAX
    a, b = np.minimum(lo, t), np.minimum(hi, t)
    rounding = _sawtooth_integral(b, s) - _sawtooth_integral(a, s)
    clipping = ((np.maximum(hi, t) - t) ** 3 - (np.maximum(lo, t) - t) ** 3) / 3.0
    return (rounding + clipping) @ (counts / w)


def hist_energy(stats: TensorStats) -> float:
    """``sum(x²)`` estimated from the histogram (values uniform within a bin)."""
    hist = _need_hist(stats, "mse").astype(np.float64)
    used = stats.used_bins()
    if used == 0 or stats.width == 0.0:
        return 0.0
    lo = np.arange(used) * stats.width
    hi = lo + stats.width
    return float(np.sum(hist[:used] * (hi**3 - lo**3) / (3.0 * stats.width)))


def mse_curve(stats: TensorStats, exact_steps: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Expected squared error of int8 fake quantization at every bin edge as amax, in O(bins · exact_steps).

    The model of :func:`hist_sq_error` (values uniform within a bin; clipping error ``(x - T)²``
    above ``T``, rounding error ``(x - s·round(x/s))²`` below it, ``s = T / 127``) computed from
    prefix sums of the bins' moments: the rounding error exactly for values that round to the
    first ``exact_steps`` levels, as the uniform-noise mean ``s²/12`` above them (where the density
    varies little within one step). (thresholds, errors).
    """
    hist = _need_hist(stats, "mse").astype(np.float64)
    used = stats.used_bins()
    if used == 0 or stats.width == 0.0:
        return np.zeros(0), np.zeros(0)
    w = stats.width
    c = hist[:used]
    lo = np.arange(used) * w
    hi = lo + w
    moments = [c, c * (hi**2 - lo**2) / (2.0 * w), c * (hi**3 - lo**3) / (3.0 * w)]  # count, sum x, sum x² per bin
    prefix = [np.concatenate([[0.0], np.cumsum(m)]) for m in moments]

    def below(x: np.ndarray) -> list[np.ndarray]:
        """Count, sum x and sum x² of the values below each ``x`` (uniform within bins)."""
        i = np.minimum((x * (1.0 / w)).astype(np.int64), used - 1)
        a, cw = lo[i], c[i] / w
        d1 = x - a
        d2 = d1 * (x + a)
        d3 = d1 * (x * x + x * a + a * a)
        return [prefix[0][i] + cw * d1, prefix[1][i] + cw * d2 / 2.0, prefix[2][i] + cw * d3 / 3.0]

    t = np.arange(1, used + 1) * w
    j = np.arange(1, used + 1)
    clipping = ((prefix[2][-1] - prefix[2][j]) - 2.0 * t * (prefix[1][-1] - prefix[1][j])
                + t * t * (prefix[0][-1] - prefix[0][j]))
    step = t / _QMAX
    rounding = np.zeros_like(t)
    prev = [np.zeros_like(t)] * 3
    for k in range(exact_steps):  # values rounding to level k: [(k - 1/2) s, (k + 1/2) s) below T
        cur = below(np.minimum((k + 0.5) * step, t))
        n, s1, s2 = (cu - pr for cu, pr in zip(cur, prev))
        ks = k * step
        rounding += s2 - 2.0 * ks * s1 + ks * ks * n
        prev = cur
    rounding += (prefix[0][j] - prev[0]) * step * step / 12.0
    return t, rounding + clipping


def amax_mse_fast(stats: TensorStats) -> float:
    """The threshold of least :func:`mse_curve` error (a bin edge): ``auto``'s MSE candidate."""
    t, err = mse_curve(stats)
    return _finish(float(t[int(np.argmin(err))]) if t.size else 0.0, stats)


def amax_mse(stats: TensorStats, *, step: int = 1) -> float:
    """Threshold (a bin edge) minimising expected squared error of int8 fake quantization.

    With ``T`` the threshold and ``s = T / 127``, a bin ``[a, b)`` below ``T`` costs its count times
    the mean of the rounding error ``(x - s·round(x/s))²`` over the bin, a bin above ``T`` the
    mean clipping error ``(x - T)²``; values are assumed uniform within each bin. ``step`` > 1
    searches every ``step``-th edge, then the edges around the best one (vectorized; ``auto``).
    """
    hist = _need_hist(stats, "mse").astype(np.float64)
    used = stats.used_bins()
    if used == 0 or stats.width == 0.0:
        return _finish(0.0, stats)
    if step > 1:
        # Searched on the histogram merged to at most 512 bins: a quarter of the work per threshold, and a
        # range resolution of 1/512 of the histogram's span.
        coarse = stats.coarsened(max(1, stats.num_bins // 512))
        used_c = coarse.used_bins()

        def best_of(idx: list[int]) -> int:
            edges = np.asarray(idx)
            return int(edges[np.argmin(hist_sq_error(coarse, edges * coarse.width))])

        return _finish(_coarse_to_fine(1, used_c, max(1, step * used_c // used), best_of) * coarse.width, stats)
    w = stats.width
    counts = hist[:used]
    lo = np.arange(used) * w
    hi = lo + w
    # Mean of (x - T)² over [lo, hi) for bins wholly above T: ((hi-T)³ - (lo-T)³) / (3w).
    best_j, best_err = used, math.inf
    for j in range(1, used + 1):
        t = j * w
        s = t / _QMAX
        inner = counts[:j] * (_sawtooth_integral(hi[:j], s) - _sawtooth_integral(lo[:j], s)) / w
        if j < used:
            outer = counts[j:] * ((hi[j:] - t) ** 3 - (lo[j:] - t) ** 3) / (3.0 * w)
            err = inner.sum() + outer.sum()
        else:
            err = inner.sum()
        if err < best_err:
            best_err, best_j = err, j
    return _finish(best_j * w, stats)


CALIBRATION_METHODS: dict[str, Callable[..., float]] = {
    "max": amax_max,
    "percentile": amax_percentile,
    "entropy": amax_entropy,
    "mse": amax_mse,
}
HISTOGRAM_METHODS = frozenset({"percentile", "entropy", "mse"})
# Every method name calibrate() takes: ``auto`` (qdqsurgeon.calibration.auto) chooses among the
# others per tensor, so it is not a function of one tensor's statistics.
METHODS = ("auto", "max", "percentile", "entropy", "mse")
# Measured by fake-quantizing every Conv/Gemm input (weights per-channel max) of
# resnet18_cifar10, mobilenetv2_bottleneck and efficientnet_lite0, calibrating on 8 photos and
# scoring output SQNR on 8 others: percentile 99.99 had the best mean SQNR; entropy the worst,
# as it clips ReLU6 outputs that saturate at 6.
DEFAULT_METHOD = "percentile"


def compute_amax(stats: TensorStats, method: str = DEFAULT_METHOD, *, percentile: float = 99.99) -> float:
    """Apply a named method to collected statistics."""
    if method not in CALIBRATION_METHODS:
        raise UsageError(f"unknown calibration method {method!r}; choose from {', '.join(CALIBRATION_METHODS)}")
    if method == "percentile":
        return amax_percentile(stats, percentile)
    return CALIBRATION_METHODS[method](stats)
