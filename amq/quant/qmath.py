"""The one reference for quantization arithmetic (DESIGN.md §3). numpy only, no ONNX.

Grid for b bits: signed [-2^(b-1), 2^(b-1)-1], unsigned [0, 2^b-1].
q = clip(round_half_even(x / scale) + zero_point, qmin, qmax); x' = (q - zero_point) * scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

INT32_MAX = 2**31 - 1
# The smallest scale amq ever emits; keeps x / scale finite for any float32 x.
MIN_SCALE = float(np.finfo(np.float32).tiny) * 2**24


@dataclass(frozen=True)
class Grid:
    bits: int
    signed: bool
    narrow: bool = False  # restricted grid: drop the most negative value (symmetric weights)

    @property
    def qmin(self) -> int:
        if self.signed:
            return -(2 ** (self.bits - 1)) + (1 if self.narrow else 0)
        return 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin


def grid(bits: int, signed: bool, narrow: bool = False) -> Grid:
    if bits not in (4, 8, 16, 32):
        raise ValueError(f"unsupported bit width {bits}")
    return Grid(bits, signed, narrow)


def quantize(
    x: np.ndarray,
    scale: np.ndarray | float,
    zero_point: np.ndarray | int,
    g: Grid,
    axis: int | None = None,
) -> np.ndarray:
    """Float -> integer codes (int64 array). ``axis`` broadcasts per-channel scale/zero_point."""
    s, z = broadcast_qparams(x, scale, zero_point, axis)
    q = np.rint(np.asarray(x, dtype=np.float64) / s) + z
    return np.clip(q, g.qmin, g.qmax).astype(np.int64)


def dequantize(
    q: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | int, axis: int | None = None
) -> np.ndarray:
    s, z = broadcast_qparams(q, scale, zero_point, axis)
    return ((np.asarray(q, dtype=np.float64) - z) * s).astype(np.float32)


def fake_quantize(
    x: np.ndarray,
    scale: np.ndarray | float,
    zero_point: np.ndarray | int,
    g: Grid,
    axis: int | None = None,
    overwrite: bool = False,
) -> np.ndarray:
    """``dequantize(quantize(x, ...))``, the same float32 values, in one float64 buffer: the
    codes are whole numbers within the grid, exact in float64, so they need no int64 copy (the
    search passes fake-quantize weights of millions of values many times). ``overwrite``: ``x``
    is a float64 array the caller no longer needs, used as that buffer (a fresh one of tens of
    MB costs more in page faults than the arithmetic)."""
    s, z = broadcast_qparams(x, scale, zero_point, axis)
    own = overwrite and isinstance(x, np.ndarray) and x.dtype == np.float64
    t = np.divide(x, s, out=x) if own else np.divide(x, s, dtype=np.float64)
    np.rint(t, out=t)
    t += z  # also where z is 0: -0.0 + 0 is 0.0, as the int64 codes give
    np.clip(t, g.qmin, g.qmax, out=t)
    if np.any(z):
        t -= z
    t *= s
    return t.astype(np.float32)


def broadcast_qparams(x: np.ndarray, scale, zero_point, axis: int | None):
    s = np.asarray(scale, dtype=np.float64)
    z = np.asarray(zero_point, dtype=np.float64)
    if axis is not None and s.ndim == 1:
        shape = [1] * np.ndim(x)
        shape[axis] = -1
        s = s.reshape(shape)
        z = z.reshape(shape) if z.ndim == 1 else z
    return s, z


def channel_absmax(w: np.ndarray, axis: int | None) -> np.ndarray:
    """max |w| per index of ``axis`` (None: of the whole tensor), as max(max w, -min w): exact
    in w's own float type, and no copy of w (a weight of millions of values, many times)."""
    others = None if axis is None else tuple(i for i in range(w.ndim) if i != axis % w.ndim)
    return np.maximum(w.max(axis=others), -w.min(axis=others))


def weight_qparams(w: np.ndarray, bits: int, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric signed restricted-grid scales: scale = max|w| / qmax, per channel along ``axis``
    (None: per tensor). An all-zero channel gets the largest scale of the tensor (1.0 if all zero),
    never a division by zero. Returns (scale float32 [C] or [], zero_point int [C] or [])."""
    g = grid(bits, signed=True, narrow=True)
    w = np.asarray(w)
    if w.dtype.kind != "f":
        w = w.astype(np.float64)
    if not w.size:
        amax = np.zeros(() if axis is None else w.shape[axis])
    else:
        amax = channel_absmax(w, axis)
    scale = np.asarray(amax, dtype=np.float64) / g.qmax
    scale = _safe_scale(scale)
    return scale.astype(np.float32), np.zeros(scale.shape, dtype=np.int64)


def fake_quantize_weight(
    w: np.ndarray, bits: int, axis: int | None, overwrite: bool = False
) -> np.ndarray:
    """``w`` on its symmetric restricted grid (``weight_qparams``: per channel along ``axis``,
    None: per tensor), back in float32. ``overwrite``: as in ``fake_quantize``."""
    scale, zp = weight_qparams(w, bits, axis)
    return fake_quantize(w, scale, zp, grid(bits, True, narrow=True), axis, overwrite)


def block_weight_qparams(w: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """Symmetric signed restricted-grid scales per block of ``block_size`` rows of a 2-D [K, N]
    weight (blocks along K, the reduction axis; the last block may be shorter): scale =
    max|w over the block| / qmax, shape [ceil(K / block_size), N], float32. An all-zero block
    gets a safe scale, as in ``weight_qparams``."""
    g = grid(bits, signed=True, narrow=True)
    a = np.abs(np.asarray(w, dtype=np.float64))
    k, n = a.shape
    nb = -(-k // block_size)
    pad = np.zeros((nb * block_size - k, n))
    amax = np.concatenate([a, pad]).reshape(nb, block_size, n).max(axis=1)
    return _safe_scale(amax / g.qmax).astype(np.float32)


def expand_blocks(scale: np.ndarray, block_size: int, k: int) -> np.ndarray:
    """Block scales [nb, N] repeated over their rows: [K, N], one scale per weight element."""
    return np.repeat(np.asarray(scale), block_size, axis=0)[:k]


def quantize_blocked(w: np.ndarray, scale: np.ndarray, block_size: int, g: Grid) -> np.ndarray:
    """Codes of a [K, N] weight on block scales [nb, N] (zero point 0)."""
    return quantize(w, expand_blocks(scale, block_size, np.shape(w)[0]), 0, g)


def dequantize_blocked(q: np.ndarray, scale: np.ndarray, block_size: int) -> np.ndarray:
    return dequantize(q, expand_blocks(scale, block_size, np.shape(q)[0]), 0)


def dynamic_qparams(x: np.ndarray) -> tuple[float, int]:
    """What ONNX DynamicQuantizeLinear computes from a tensor at run time: uint8, range
    [min(x, 0), max(x, 0)], scale = (hi - lo) / 255, zero_point = saturate(round(-lo / scale))
    (round half to even)."""
    lo = min(float(np.min(x)), 0.0)
    hi = max(float(np.max(x)), 0.0)
    scale = np.float32((hi - lo) / 255.0)
    if scale == 0:
        return 0.0, 0
    zp = int(np.clip(np.rint(np.float32(-lo) / scale), 0, 255))
    return float(scale), zp


def _safe_scale(scale: np.ndarray) -> np.ndarray:
    scale = np.asarray(scale, dtype=np.float64)
    bad = ~(scale > 0) | ~np.isfinite(scale)
    if np.any(bad):
        good = scale[~bad]
        fill = float(good.max()) if good.size else 1.0
        scale = np.where(bad, fill, scale)
    return np.maximum(scale, MIN_SCALE)


RANGE_BITS = 12  # significant bits an activation range keeps (see snap_range)


def snap(x: np.ndarray) -> np.ndarray:
    """Every value rounded to RANGE_BITS significant bits (as ``snap_range`` does a range): a
    statistic computed from float results, which differ in their last bits between CPUs."""
    m, e = np.frexp(np.asarray(x, dtype=np.float64))
    return np.ldexp(np.round(m * 2.0**RANGE_BITS) / 2.0**RANGE_BITS, e)


def snap_range(lo: float, hi: float) -> tuple[float, float]:
    """An activation range rounded outward to RANGE_BITS significant bits (it grows by at most
    2^-11 of itself, 0.05%): float results differ in their last bits between CPUs (a sum in
    another order), and unsnapped they would give a model that differs in its scales from one
    machine to the next. Snapped, the same data give the same bytes on any machine (unless a
    value sits within float noise of a 2^-11 step)."""

    def snap(v: float, up: bool) -> float:
        if v == 0.0 or not math.isfinite(v):
            return v
        step = 2.0 ** (math.frexp(v)[1] - RANGE_BITS)
        return (math.ceil if up else math.floor)(v / step) * step

    return snap(float(lo), False), snap(float(hi), True)


def activation_qparams(lo: float, hi: float, bits: int, symmetric: bool) -> tuple[float, int, Grid]:
    """Scale and zero point for an activation range (DESIGN.md §3).

    Asymmetric: the range is widened to contain 0, unsigned grid,
    scale = (hi - lo) / (qmax - qmin), zero_point = clip(round(qmin - lo / scale)).
    Symmetric: signed grid, zero_point 0, scale = max(|lo|, |hi|) / qmax.
    """
    scale, zp, g = activation_qparams_many(np.array([lo]), np.array([hi]), bits, symmetric)
    return float(scale[0]), int(zp[0]), g


def activation_qparams_many(
    lo: np.ndarray, hi: np.ndarray, bits: int, symmetric: bool
) -> tuple[np.ndarray, np.ndarray, Grid]:
    """``activation_qparams`` of many ranges at once, each on its own (float64 scales, int64
    zero points): a scale that is not positive and finite becomes 1, as a range of its own."""
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    g = grid(bits, signed=symmetric)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        raw = np.maximum(-lo, hi) / g.qmax if symmetric else (hi - lo) / g.levels
        scale = np.maximum(np.where((raw > 0) & np.isfinite(raw), raw, 1.0), MIN_SCALE)
        if symmetric:
            return scale, np.zeros(scale.shape, dtype=np.int64), g
        zp = np.clip(np.rint(g.qmin - lo / scale), g.qmin, g.qmax).astype(np.int64)
    return scale, zp, g


def bias_qparams(
    bias: np.ndarray, input_scale: float, weight_scale: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int32 bias with scale = s_input * s_weight (per channel), zero_point 0.
    Returns (q int32, scale float32, zero_point int32). Use ``fit_weight_scale_for_bias`` first so
    that no value overflows int32."""
    b = np.asarray(bias, dtype=np.float64)
    scale = np.float64(input_scale) * np.asarray(weight_scale, dtype=np.float32).astype(np.float64)
    scale = np.broadcast_to(scale, b.shape)
    q = np.clip(np.rint(b / scale), -INT32_MAX, INT32_MAX).astype(np.int32)
    return q, scale.astype(np.float32), np.zeros(b.shape, dtype=np.int32)


def fit_weight_scale_for_bias(
    bias: np.ndarray, input_scale: float, weight_scale: np.ndarray
) -> np.ndarray:
    """Widen a weight scale where the bias would not fit int32 at scale s_input * s_weight."""
    b = np.abs(np.asarray(bias, dtype=np.float64))
    need = b / (float(input_scale) * INT32_MAX)
    out = np.maximum(np.asarray(weight_scale, dtype=np.float64), need).astype(np.float32)
    # float32 rounding to nearest may land just below what is needed: step up where it did
    short = out.astype(np.float64) < need
    out = np.where(short, np.nextafter(out, np.float32(np.inf)), out).astype(np.float32)
    if np.size(weight_scale) == 1:  # per-tensor: one scale, wide enough for every channel's bias
        return np.asarray(out.max(), dtype=np.float32).reshape(np.shape(weight_scale))
    return out


def quant_error_bound(scale: float) -> float:
    """Largest rounding error for a value inside the representable range."""
    return scale / 2.0
