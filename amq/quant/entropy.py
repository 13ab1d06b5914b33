"""TensorRT's KL-divergence ("entropy") calibration on a tensor's histogram (the ``entropy``
range method of quant/observers.py)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from amq.quant.observers import TensorStats


def _abs_hist(s: TensorStats) -> tuple[np.ndarray, float]:
    """Histogram of |x| on the same zero-aligned grid: bin j covers [j*w, (j+1)*w)."""
    absolute = s.i0 + np.arange(s.bins, dtype=np.int64)
    folded = np.where(absolute >= 0, absolute, -absolute - 1)
    n = int(folded.max()) + 1
    out = np.zeros(n, dtype=np.float64)
    np.add.at(out, folded, s.counts.astype(np.float64))
    if s.clamped_low and s.min >= 0:
        # values clamped onto 0 by a Relu are exact at any threshold: leave them out of the KL
        out[0] -= min(s.clamped_low, out[0])  # |x| bin 0 holds the clamp bound 0
    return out, s.width


def entropy_threshold(s: TensorStats, bits: int) -> float:
    """TensorRT's KL-divergence calibration on the |x| histogram: the threshold whose quantized
    distribution (2^(bits-1) levels) diverges least from the clipped reference."""
    hist, w = _abs_hist(s)
    amax = max(abs(s.min), abs(s.max))
    levels = 2 ** (bits - 1)
    nz = np.nonzero(hist)[0]
    if nz.size == 0:
        return 0.0
    last = int(nz[-1]) + 1
    hist = hist[:last]
    if last <= levels:
        return amax
    step = max(1, (last - levels) // 512)
    best_kl, best_i = math.inf, last
    for i in range(levels, last + 1, step):
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()
        ref = hist[:i]
        # quantize ref into `levels` buckets, expand back over the non-empty bins
        idx = (np.arange(i) * levels) // i
        sums = np.bincount(idx, weights=ref, minlength=levels)
        nonzero = (ref > 0).astype(np.float64)
        norm = np.bincount(idx, weights=nonzero, minlength=levels)
        q = np.where(nonzero > 0, sums[idx] / np.maximum(norm[idx], 1), 0.0)
        kl = _kl(p, q)
        if kl < best_kl:
            best_kl, best_i = kl, i
    return min((best_i + 0.5) * w, amax)


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    ps, qs = p.sum(), q.sum()
    if ps == 0 or qs == 0:
        return math.inf
    p = p / ps
    q = q / qs
    mask = p > 0
    if np.any(q[mask] == 0):
        q = np.where(q == 0, 1e-12, q)
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def range_entropy(s: TensorStats, bits: int) -> tuple[float, float]:
    if s.empty:
        return 0.0, 0.0
    t = entropy_threshold(s, bits)
    return max(s.min, -t), min(s.max, t)
