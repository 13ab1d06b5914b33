"""Streaming statistics of activation tensors and the range methods that read them (DESIGN.md §4).

numpy only. An observer keeps O(bins) memory whatever the number of samples: ``update(batch)`` folds
a batch into a running min/max and a histogram, then the batch can be dropped. ``update_sample``
takes a batch that onnxruntime has already reduced (exact extremes, the number of values and a
subsample; see ``amq.calib.runner.Tap``): the histogram is then built from the subsample, taken at
the same positions of every sample (or by global stream position), so batching changes nothing.

The histogram lives on a grid aligned at zero whose bin width is a power of two. When a batch falls
outside the covered range, the width doubles (pairs of bins merge exactly) until the range fits.
Because bin edges never move, streaming N batches gives exactly the histogram of one pass over the
concatenated data: the final width is the smallest power of two that fits the whole range either way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from amq.quant.entropy import range_entropy
from amq.quant.qmath import activation_qparams_many

MIN_WIDTH_LOG2 = -40  # smallest bin width: 2**-40
DEFAULT_BINS = 2048
FLUSH_VALUES = 1 << 16  # histogram samples are binned in chunks of about this many values
MAX_PER_SAMPLE = 65536  # histogram values per sample of a tensor (min/max always see everything)


def sample_stride(per_sample: int, max_per_sample: int, last_dim: int = 1) -> int:
    """Take every k-th value of a stream so that a sample of ``per_sample`` values gives at most
    about ``max_per_sample``; k shares no factor with the last axis, so every feature/column is
    visited rather than the same few."""
    k = max(1, -(-int(per_sample) // max(1, int(max_per_sample))))
    while k > 1 and last_dim > 1 and math.gcd(k, int(last_dim)) != 1:
        k += 1
    return k


def _fits(lo: float, hi: float, k: int, bins: int) -> bool:
    w = math.ldexp(1.0, k)
    return math.floor(hi / w) - math.floor(lo / w) + 1 <= bins


def _smallest_width_log2(lo: float, hi: float, bins: int, start: int | None) -> int:
    """Smallest power-of-two exponent k >= start (or the minimum) whose grid covers [lo, hi]."""
    kmin = MIN_WIDTH_LOG2 if start is None else start
    mag = max(abs(lo), abs(hi))
    if mag > 0:
        # bin indices stay below 2**52 (exact in float64, far inside int64)
        kmin = max(kmin, math.frexp(mag)[1] - 52)
    span = hi - lo
    if span <= 0:
        k = kmin
    else:
        k = max(kmin, math.floor(math.log2(span / bins)) - 1)
    while not _fits(lo, hi, k, bins):
        k += 1
    return k


@dataclass
class TensorStats:
    """Bit-independent statistics of one tensor. ``counts[j]`` counts values in
    [(i0 + j) * width, (i0 + j + 1) * width)."""

    bins: int = DEFAULT_BINS
    count: int = 0
    min: float = math.inf
    max: float = -math.inf
    nonfinite: int = 0
    width_log2: int | None = None
    i0: int = 0
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    batches: int = 0
    min_hits: int = 0  # batches whose minimum is exactly the overall minimum
    max_hits: int = 0
    shape: tuple[int, ...] = ()  # shape of the last batch seen
    clamped_low: int = 0  # values moved onto the lower clamp bound by ``clamp`` (exact on the grid)
    stride: int = 0  # the histogram holds every stride-th value of the stream (0: not set yet)
    offset: int = 0  # values seen so far (the stream position, for the stride)
    # per-channel extremes along ``ch_axis`` (the input-channel axis of the layer reading the
    # tensor): one vector each, whatever the number of samples; empty when not gathered (no
    # axis, or the channel count changed between batches)
    ch_axis: int = -1
    ch_min: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float64))
    ch_max: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float64))

    @property
    def width(self) -> float:
        return math.ldexp(1.0, self.width_log2 if self.width_log2 is not None else MIN_WIDTH_LOG2)

    @property
    def empty(self) -> bool:
        return self.count == 0

    def edges(self) -> np.ndarray:
        return (self.i0 + np.arange(self.bins + 1, dtype=np.float64)) * self.width


class HistogramObserver:
    """Running min/max and a range-growing histogram; constant memory."""

    def __init__(
        self, bins: int = DEFAULT_BINS, max_per_sample: int = MAX_PER_SAMPLE, channel_axis: int = -1
    ) -> None:
        if bins < 16:
            raise ValueError("bins must be >= 16")
        self._s = TensorStats(bins=bins, ch_axis=channel_axis)
        self._ch_broken = False  # the channel count changed: no per-channel statistics
        self.max_per_sample = max_per_sample
        # histogram samples waiting to be binned: one binning for many small batches
        self._pending: list[np.ndarray] = []
        self._pending_n = 0

    @property
    def stats(self) -> TensorStats:
        self._flush()
        return self._s

    @stats.setter
    def stats(self, value: TensorStats) -> None:
        """Resume streaming from saved statistics."""
        self._pending, self._pending_n = [], 0
        self._s = value
        self._ch_broken = False

    @property
    def offset(self) -> int:
        """Values seen so far: the stream position of the next batch."""
        return self._s.offset

    def update(
        self,
        x: np.ndarray,
        lo: float | None = None,
        hi: float | None = None,
        clamped: bool = False,
        owned: bool = False,
    ) -> None:
        """Fold a whole batch in (numpy does the work). ``lo``/``hi``: its exact min and max when
        already known, to save two passes; ignored unless both are finite. ``clamped``: as for
        ``update_sample``. ``owned``: the array is the observer's to keep (not copied before it
        is binned)."""
        s = self._s
        a = np.asarray(x)
        s.shape = tuple(int(d) for d in a.shape)
        if a.size == 0:
            return
        if a.dtype not in (np.float32, np.float64):
            a = a.astype(np.float32)
        if 0 <= s.ch_axis < a.ndim:
            rest = tuple(i for i in range(a.ndim) if i != s.ch_axis)
            self.update_channels(np.fmin.reduce(a, axis=rest), np.fmax.reduce(a, axis=rest))
        if s.stride == 0:
            per_sample = a.size // a.shape[0] if a.ndim >= 1 and a.shape[0] else a.size
            s.stride = sample_stride(per_sample, self.max_per_sample, a.shape[-1] if a.ndim else 1)
        a = a.ravel()
        # the histogram takes every stride-th value of the whole stream (by global position, so
        # batching does not change which values): large tensors cost a fraction of a pass
        start = (-s.offset) % s.stride
        s.offset += a.size
        # a copy unless owned (the caller may reuse its buffer before the sample is binned), and
        # always of a strided view, which would keep the whole batch alive until then
        sub = a[start :: s.stride] if s.stride > 1 else a
        if not owned or s.stride > 1:
            sub = sub.copy()
        known = lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi)
        if not known:  # min and max propagate NaN and show Inf: one check covers both
            lo, hi = float(a.min()), float(a.max())
            known = math.isfinite(lo) and math.isfinite(hi)
        if not known:
            finite = np.isfinite(a)
            n_finite = int(np.count_nonzero(finite))
            if n_finite < a.size:
                s.nonfinite += int(a.size - n_finite)
                a = a[finite]
                sub = sub[np.isfinite(sub)]
            if a.size == 0:
                return
            lo, hi = float(a.min()), float(a.max())
        else:
            n_finite = a.size
        if clamped:
            s.clamped_low += int(np.count_nonzero(sub == 0))
        self._fold(sub, n_finite, float(lo), float(hi))

    def update_sample(
        self,
        sample: np.ndarray,
        count: int,
        lo: float,
        hi: float,
        clamped: bool = False,
        stride: int = 1,
        shape: tuple[int, ...] = (),
    ) -> None:
        """Fold a batch that the runtime has already reduced: ``count`` values with exact
        extremes ``lo``/``hi`` and a subsample of them (taken at the same positions of every
        sample, or by global stream position, so batching changes nothing). Where an extreme is
        not finite, the sample's finite values stand in for it (the sentinel guard keeps such a
        tensor float anyway). ``clamped``: the tensor is a Relu's output, whose exact zeros are
        the values it clamped (exact at any scale). ``stride``/``shape``: how the runtime sampled
        (recorded); the stream position advances by ``count``."""
        s = self._s
        s.stride, s.shape = stride, tuple(shape)
        s.offset += int(count)
        if count == 0:
            return
        sub = np.asarray(sample, dtype=np.float32).ravel()
        finite = np.isfinite(sub)
        bad = int(sub.size - np.count_nonzero(finite))
        n = int(count)
        if bad or not (math.isfinite(lo) and math.isfinite(hi)):
            s.nonfinite += max(bad, 1)
            n -= max(bad, 1)
            sub = sub[finite]
            if sub.size == 0:
                return
            lo = lo if math.isfinite(lo) else float(sub.min())
            hi = hi if math.isfinite(hi) else float(sub.max())
        if clamped:
            s.clamped_low += int(np.count_nonzero(sub == 0))
        self._fold(sub, max(n, 0), float(lo), float(hi))

    def update_channels(self, lo: np.ndarray, hi: np.ndarray) -> None:
        """Fold one batch's per-channel extremes (vectors along ``ch_axis``) into the running
        ones: elementwise min and max, so any batching of the same samples gives the same
        vectors. A batch with another channel count drops them for good (not a channel axis)."""
        s = self._s
        lo = np.asarray(lo, dtype=np.float64).reshape(-1)
        hi = np.asarray(hi, dtype=np.float64).reshape(-1)
        if self._ch_broken or s.ch_axis < 0 or lo.size == 0 or lo.shape != hi.shape:
            return
        if s.ch_min.size == 0:
            s.ch_min, s.ch_max = lo.copy(), hi.copy()
        elif s.ch_min.shape != lo.shape:
            self._ch_broken = True
            s.ch_min = s.ch_max = np.zeros(0, dtype=np.float64)
        else:
            np.fmin(s.ch_min, lo, out=s.ch_min)
            np.fmax(s.ch_max, hi, out=s.ch_max)

    def _fold(self, sub: np.ndarray, n_finite: int, mn: float, mx: float) -> None:
        """Add ``n_finite`` values with extremes mn/mx, whose histogram sample is ``sub`` (binned
        on the next flush: the grid only grows, by exact power-of-two merges, so binning later on
        a coarser grid gives the same counts)."""
        s = self._s
        s.min_hits = 1 if s.batches == 0 or mn < s.min else s.min_hits + (mn == s.min)
        s.max_hits = 1 if s.batches == 0 or mx > s.max else s.max_hits + (mx == s.max)
        s.batches += 1
        if s.count == 0 or mn < s.min or mx > s.max:
            self._grow(min(mn, s.min), max(mx, s.max))
            s.min = min(mn, s.min)
            s.max = max(mx, s.max)
        s.count += int(n_finite)
        if sub.size:
            self._pending.append(sub)
            self._pending_n += sub.size
            if self._pending_n >= FLUSH_VALUES:
                self._flush()

    def _flush(self) -> None:
        if self._pending:
            sub = self._pending[0] if len(self._pending) == 1 else np.concatenate(self._pending)
            self._pending, self._pending_n = [], 0
            self._s.counts += _bin_counts(sub, self._s)

    def _grow(self, lo: float, hi: float) -> None:
        s = self._s
        k = _smallest_width_log2(lo, hi, s.bins, s.width_log2)
        new_i0 = math.floor(lo / math.ldexp(1.0, k))
        if s.width_log2 is None or s.count == 0:
            s.width_log2, s.i0 = k, new_i0
            s.counts = np.zeros(s.bins, dtype=np.int64)
            return
        if k == s.width_log2 and new_i0 == s.i0:
            return
        s.counts = _regrid(s, k, new_i0)
        s.width_log2, s.i0 = k, new_i0

    def compute(self) -> TensorStats:
        return self.stats


def _regrid(s: TensorStats, k: int, i0: int) -> np.ndarray:
    """Counts of ``s`` on the coarser grid of width 2**k starting at bin i0 (exact merge)."""
    nz = np.nonzero(s.counts)[0]
    old_abs = s.i0 + nz.astype(np.int64)
    shift = k - (s.width_log2 if s.width_log2 is not None else k)
    if shift <= 62:
        new_abs = np.floor_divide(old_abs, np.int64(1) << np.int64(shift))
    else:  # pragma: no cover - only for absurd range jumps
        new_abs = np.floor(old_abs.astype(np.float64) / math.ldexp(1.0, shift)).astype(np.int64)
    counts = np.zeros(s.bins, dtype=np.int64)
    np.add.at(counts, new_abs - i0, s.counts[nz])
    return counts


def _bin_counts(a: np.ndarray, s: TensorStats) -> np.ndarray:
    inv = math.ldexp(1.0, -(s.width_log2 or 0))
    big = max(abs(s.min), abs(s.max)) * inv
    t = np.multiply(
        a, inv, dtype=np.float64 if big >= 2**23 else np.float32
    )  # one pass, a new array
    np.floor(t, out=t)
    if s.min < 0 and inv < 1.0 and t.dtype == np.float32:
        # a tiny negative value whose scaled product underflowed to -0.0 belongs to bin -1 (an
        # input -0.0 stays in bin 0); looked for by bit pattern, a masked ufunc costs 10 ns/value
        neg_zero = t.view(np.uint32) == np.uint32(0x80000000)
        if neg_zero.any():
            t[neg_zero & (a < 0)] = -1.0
    t -= s.i0
    np.clip(t, 0, s.bins - 1, out=t)  # exact integers: clipped before the (wider) cast
    return np.bincount(t.astype(np.intp), minlength=s.bins)


# ---------------------------------------------------------------------------------------------
# Transforms of statistics


def clamp(s: TensorStats, lo: float | None = None, hi: float | None = None) -> TensorStats:
    """Statistics of clip(x, lo, hi), e.g. the non-negative part seen by a Relu (ahead-relu).
    Exact for lo = 0 (a bin edge); otherwise mass moves into the bin holding the bound."""
    if s.empty:
        return replace(s)
    if s.ch_min.size and (lo is not None or hi is not None):
        s = replace(s, ch_min=np.clip(s.ch_min, lo, hi), ch_max=np.clip(s.ch_max, lo, hi))
    if lo is not None and lo >= s.max:  # everything lands on the lower bound
        i0 = math.floor(lo / s.width)
        counts = np.zeros(s.bins, dtype=np.int64)
        counts[0] = s.counts.sum()
        low = s.clamped_low + int(counts[0])
        return replace(s, counts=counts, i0=i0, min=lo, max=lo, clamped_low=low)
    counts = s.counts.copy()
    nmin, nmax = s.min, s.max
    moved = 0
    if lo is not None and lo > s.min:
        j = min(max(math.floor(lo / s.width) - s.i0, 0), s.bins - 1)
        moved = int(counts[:j].sum())
        counts[j] += moved
        counts[:j] = 0
        nmin = min(lo, s.max) if lo <= s.max else lo
        nmax = max(nmax, lo)
    if hi is not None and hi < nmax:
        j = min(max(math.floor(hi / s.width) - s.i0, 0), s.bins - 1)
        counts[j] += counts[j + 1 :].sum()
        counts[j + 1 :] = 0
        nmax = hi
        nmin = min(nmin, hi)
    return replace(s, counts=counts, min=nmin, max=nmax, clamped_low=s.clamped_low + moved)


def _centers(s: TensorStats) -> np.ndarray:
    e = s.edges()
    return np.clip((e[:-1] + e[1:]) / 2.0, s.min, s.max)


def _quantile(s: TensorStats, q: float) -> float:
    """Value below which a fraction q of the values lie, interpolated inside a bin, within
    [min, max]."""
    total = s.counts.sum()
    if total == 0:
        return 0.0
    e = np.clip(s.edges(), s.min, s.max)
    cum = np.concatenate([[0], np.cumsum(s.counts)]).astype(np.float64)
    target = q * total
    j = int(np.searchsorted(cum, target, side="left"))
    j = min(max(j, 1), s.bins)
    c0, c1 = cum[j - 1], cum[j]
    frac = 0.0 if c1 == c0 else (target - c0) / (c1 - c0)
    return float(e[j - 1] + frac * (e[j] - e[j - 1]))


def range_minmax(s: TensorStats) -> tuple[float, float]:
    return (s.min, s.max) if not s.empty else (0.0, 0.0)


def range_percentile(s: TensorStats, percentile: float) -> tuple[float, float]:
    """[lower, upper] = the (100 - p)-th and p-th percentiles of the observed values."""
    if s.empty:
        return 0.0, 0.0
    p = percentile / 100.0
    lo = _quantile(s, 1.0 - p)
    hi = _quantile(s, p)
    return max(lo, s.min), min(hi, s.max)


def _sawtooth_integral(x: np.ndarray, scale: float) -> np.ndarray:
    """F(x) = integral from 0 to x of (t - scale * round(t / scale))^2 dt (grid at multiples of
    scale): whole periods contribute scale^3/12 each, the partial one a cubic."""
    u = x / scale + 0.5
    k = np.floor(u)
    d = u - k - 0.5
    return scale**3 * (k / 12.0 + (d * d * d + 0.125) / 3.0)


def expected_sq_error(s: TensorStats, lo: float, hi: float, bits: int, symmetric: bool) -> float:
    """Mean squared quantization error of the observed distribution for the range [lo, hi], taking
    the values as uniform inside each histogram bin: clipping error outside the grid; inside, the
    exact mean rounding error over the bin (about scale^2/12 for bins spanning many steps, less
    for mass sitting near grid points), and none for values a Relu clamped onto 0."""
    rounding, clipping = sq_error_parts(s, lo, hi, bits, symmetric)
    return rounding + clipping


def sq_error_parts(
    s: TensorStats, lo: float, hi: float, bits: int, symmetric: bool
) -> tuple[float, float]:
    """``expected_sq_error`` as its two parts: (rounding error of the values inside the grid,
    clipping error of those outside it), each a mean over all values."""
    r, c = sq_error_curves(s, [(lo, hi)], bits, symmetric)
    return float(r[0]), float(c[0])


def sq_error_curves(
    s: TensorStats, ranges: Sequence[tuple[float, float]], bits: int, symmetric: bool
) -> tuple[np.ndarray, np.ndarray]:
    """``sq_error_parts`` for many candidate ranges at once (one row of bins per range)."""
    bounds = np.asarray(ranges, dtype=np.float64).reshape(-1, 2)
    scale, zp, g = activation_qparams_many(bounds[:, 0], bounds[:, 1], bits, symmetric)
    scale, zp = scale[:, None], zp.astype(np.float64)[:, None]
    qlo = (g.qmin - zp) * scale
    qhi = (g.qmax - zp) * scale
    counts = s.counts.astype(np.float64)
    total = max(counts.sum(), 1)
    if s.clamped_low and s.min >= 0:  # exact zeros: no error at all
        j = -s.i0 if 0 <= -s.i0 < s.bins else None
        if j is not None and counts[j]:
            counts = counts.copy()
            counts[j] -= min(float(s.clamped_low), counts[j])
    used = np.flatnonzero(counts)  # empty bins add nothing: only the others are evaluated
    edges = np.clip(s.edges(), s.min, s.max)
    lo_e, hi_e = edges[used][None, :], edges[used + 1][None, :]
    c = _centers(s)[used][None, :]
    counts = counts[used]
    width = np.maximum(hi_e - lo_e, 1e-300)
    rounding = np.maximum(
        (_sawtooth_integral(hi_e, scale) - _sawtooth_integral(lo_e, scale)) / width, 0.0
    )
    thin = (hi_e - lo_e) <= 0
    rounding = np.where(thin, (c - np.rint(c / scale) * scale) ** 2, rounding)
    inside = (c >= qlo) & (c <= qhi)
    round_err = (np.where(inside, rounding, 0.0) * counts).sum(axis=1) / total
    clip_err = (np.where(inside, 0.0, (c - np.clip(c, qlo, qhi)) ** 2) * counts).sum(axis=1) / total
    return round_err, clip_err


MSE_STEP = 8  # range_mse's coarse pass scores every 8th shrink


def range_mse(
    s: TensorStats, bits: int, symmetric: bool, candidates: int = 128
) -> tuple[float, float]:
    """The clip range (a shrink of [min, max] towards zero by k / candidates) with the least
    expected error: every MSE_STEP-th shrink first, then every one around the best of those."""
    if s.empty:
        return 0.0, 0.0
    lo, hi = min(s.min, 0.0), max(s.max, 0.0)
    alphas = np.linspace(1.0 / candidates, 1.0, candidates)
    err: dict[int, float] = {}

    def score(idx: list[int]) -> None:
        r, c = sq_error_curves(s, [(lo * alphas[i], hi * alphas[i]) for i in idx], bits, symmetric)
        err.update(zip(idx, (r + c).tolist(), strict=True))

    score(list(range(MSE_STEP - 1, candidates, MSE_STEP)) or [candidates - 1])
    best = min(err, key=lambda i: (err[i], i))
    score([i for i in range(best - MSE_STEP + 1, best + MSE_STEP) if 0 <= i < candidates])
    best = min(err, key=lambda i: (err[i], i))
    return lo * alphas[best], hi * alphas[best]


def widened(rng: tuple[float, float], other: tuple[float, float]) -> tuple[float, float]:
    """``rng`` widened on each side to ``other`` where that reaches further."""
    return min(rng[0], other[0]), max(rng[1], other[1])


def select_range(
    s: TensorStats,
    method: str,
    bits: int,
    symmetric: bool,
    percentile: float = 99.99,
    widen: bool = False,
) -> tuple[float, float]:
    """Dispatch on the range method name (minmax, percentile, entropy, mse). ``widen``: a
    percentile range is widened on each side to the ``mse`` range where that clips less (a tail
    is clipped only where the error model also finds that clipping it pays)."""
    if method == "minmax":
        return range_minmax(s)
    if method == "percentile":
        rng = range_percentile(s, percentile)
        return widened(rng, range_mse(s, bits, symmetric)) if widen and not s.empty else rng
    if method == "entropy":
        # KL calibration (TensorRT) is made for >= 8 bits; with 2^3 levels it clips absurdly
        return range_entropy(s, bits) if bits >= 8 else range_mse(s, bits, symmetric)
    if method == "mse":
        return range_mse(s, bits, symmetric)
    raise ValueError(f"unknown range method {method!r}")


SENTINEL_BIN_COUNT = 16  # histogram values beyond the gap that make a far cluster a sentinel


def is_sentinel_dominated(s: TensorStats) -> bool:
    """True when the range is set by sentinel values (PITFALLS 5): an extreme near the float limit,
    values that are not finite, or a far cluster of values cut off from the rest (the side that
    holds zero) by an empty stretch of at least a quarter of the range, that recurs - the extreme
    of two or more batches, or many values (padding) - and narrow (under 1/64 of the range, as one
    filled value, or scores plus it, are) - while the rest of the values would get fewer than 16
    of the 256 levels of one grid over the whole range. A mask of -1e4 or -1e9, or scores plus
    such a mask, is caught even when some calibration samples have no padding. Not flagged: a
    wide far cluster (outlier features of a transformer: data), a far value seen once
    (percentile clips it), and two exact points such as a {0, 1} or {0, -1e4} mask (both land
    on the grid)."""
    if s.empty:
        return s.nonfinite > 0
    if s.nonfinite > 0 or max(abs(s.min), abs(s.max)) >= 1e30:
        return True
    occupied = np.nonzero(s.counts)[0]
    if len(occupied) < 2:
        return False
    span = s.max - s.min
    gaps = np.diff(occupied) - 1
    k = int(np.argmax(gaps))  # the widest empty stretch: between occupied[k] and occupied[k + 1]
    if gaps[k] * s.width < 0.25 * span:
        return False
    low, high = occupied[: k + 1], occupied[k + 1 :]
    zero = -s.i0  # the bin that holds 0 (may lie outside the grid)
    if low[0] <= zero <= low[-1]:
        far_is_low = False
    elif high[0] <= zero <= high[-1]:
        far_is_low = True
    else:  # zero in the gap (or outside): the cluster whose nearest edge is farther from it
        far_is_low = abs(low[-1] + 1 - zero) > abs(high[0] - zero)
    far, near = (low, high) if far_is_low else (high, low)
    if (far[-1] - far[0] + 1) * s.width > span / 64:
        return False  # a wide far cluster is data (outlier features), not one filled value
    hits = s.min_hits if far_is_low else s.max_hits
    if hits < 2 and int(s.counts[far].sum()) < SENTINEL_BIN_COUNT:
        return False  # an outlier seen once: the percentile method clips it
    if (near[-1] - near[0] + 1) * s.width > span / 16:
        return False  # the rest keeps more than 16 of 256 levels: a saturating op, not a mask
    near_edge = s.max if far_is_low else s.min
    if len(near) == 1 and near[0] == zero and near_edge == 0:
        return False  # the rest is exact zeros (a {0, x} mask): quantizes exactly
    return True
