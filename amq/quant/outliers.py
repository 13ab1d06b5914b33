"""Outlier channels of activation tensors, and a range that keeps them where clipping them costs
more than rounding everything else (issue #12, point 1). numpy only.

Transformers (BERT-family encoders after a LayerNorm or a residual Add) carry a few hidden
dimensions whose range is 10-100x that of the median one, on every token. A per-tensor
percentile clips exactly those channels, and the layer reading them multiplies the clipped values
by their weight rows. Detection reads the per-channel extremes the observers gather
(``TensorStats.ch_min``/``ch_max``, along the reading layer's input-channel axis); the decision
uses the histogram with the error model of ``mse`` (``observers.sq_error_parts``), its clipping
part weighted by how much the reading layer amplifies the clipped channels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from amq.quant import observers
from amq.quant.observers import TensorStats

# A channel is an outlier when its absolute range is more than OUTLIER_RATIO times the median
# channel's; a tensor has outlier channels when 1 to OUTLIER_MAX_FRACTION of its (at least
# MIN_CHANNELS) channels are. Measured: paraphrase-MiniLM-L3-v2's LayerNorm and GELU outputs
# reach 14-19x, its Q/K/V 1.3-2.6x; see README "Outlier channels".
OUTLIER_RATIO = 8.0
OUTLIER_MAX_FRACTION = 0.05
MIN_CHANNELS = 16


@dataclass(frozen=True)
class Outliers:
    """The outlier channels of one tensor: their indices along ``axis``, of ``channels``;
    ``range`` spans them, ``median`` is the median channel's absolute range."""

    axis: int
    channels: int
    index: tuple[int, ...]
    range: tuple[float, float]
    median: float

    @property
    def ratio(self) -> float:
        """The widest outlier channel's absolute range over the median channel's."""
        return max(abs(self.range[0]), abs(self.range[1])) / max(self.median, 1e-30)

    def describe(self, kept: tuple[float, float] | None = None) -> str:
        """'outlier channels: 2 of 384 (axis 2), range -12..22 (14x the median channel), kept'."""
        lo, hi = self.range
        text = (
            f"outlier channels: {len(self.index)} of {self.channels} (axis {self.axis}), range "
            f"{lo:.3g}..{hi:.3g} ({self.ratio:.0f}x the median channel)"
        )
        if kept is None:
            return text
        return f"{text}, {'kept' if is_kept(self, kept) else 'clipped'}"


def is_kept(o: Outliers, rng: tuple[float, float]) -> bool:
    """The range holds the outlier channels (within 1%): they are not clipped."""
    lo, hi = rng
    return lo <= o.range[0] * 0.99 and hi >= o.range[1] * 0.99


def find_outliers(s: TensorStats, ratio: float = OUTLIER_RATIO) -> Outliers | None:
    """The outlier channels of a tensor from its per-channel extremes (None when it has none,
    or no per-channel statistics): channels whose absolute range exceeds ``ratio`` times the
    median channel's, when they are at most OUTLIER_MAX_FRACTION of the channels."""
    c = s.ch_min.size
    if c < MIN_CHANNELS or s.ch_max.size != c:
        return None
    lo, hi = np.nan_to_num(s.ch_min), np.nan_to_num(s.ch_max)
    amax = np.maximum(np.abs(lo), np.abs(hi))
    med = float(np.median(amax))
    if not med > 0:
        return None
    idx = np.flatnonzero(amax > ratio * med)
    if idx.size == 0 or idx.size > max(1, int(OUTLIER_MAX_FRACTION * c)):
        return None
    rng = (float(min(lo[idx].min(), 0.0)), float(max(hi[idx].max(), 0.0)))
    return Outliers(s.ch_axis, c, tuple(int(i) for i in idx), rng, med)


def clip_weight(o: Outliers, row_energy: np.ndarray | None) -> float:
    """How much more an error in the outlier channels costs at the reading layer's output than
    the same error spread over all channels: mean ||W_k||^2 over the outlier channels k over
    the mean over all channels (1 without a weight, or when the weight's rows do not match)."""
    if row_energy is None or row_energy.size != o.channels:
        return 1.0
    mean = float(row_energy.mean())
    if not mean > 0:
        return 1.0
    return max(float(row_energy[list(o.index)].mean()) / mean, 1.0)


def weighted_error(
    s: TensorStats, rng: tuple[float, float], bits: int, symmetric: bool, weight: float
) -> float:
    """The error model of ``mse`` with the clipping part weighted by ``weight``."""
    rounding, clipping = observers.sq_error_parts(s, rng[0], rng[1], bits, symmetric)
    return rounding + weight * clipping


def outlier_range(
    s: TensorStats,
    base: tuple[float, float],
    bits: int,
    symmetric: bool,
    weight: float = 1.0,
) -> tuple[tuple[float, float], str]:
    """The range for a tensor with outlier channels, and which candidate it is: the method's own
    range (``base``), the ``mse`` range, or the full range (which keeps the outlier channels),
    whichever has the least expected error, clipping weighted by ``weight``. Ties keep
    ``base``."""
    cands = [
        (base, ""),
        (observers.range_mse(s, bits, symmetric), "mse"),
        (observers.range_minmax(s), "minmax"),
    ]
    best, best_err = cands[0], weighted_error(s, base, bits, symmetric, weight)
    for rng, name in cands[1:]:
        err = weighted_error(s, rng, bits, symmetric, weight)
        if err < best_err * (1 - 1e-9):
            best, best_err = (rng, name), err
    return best
