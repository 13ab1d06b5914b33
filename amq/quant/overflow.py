"""A numpy model of onnxruntime's x86 8-bit kernels' int16 pair sums (PITFALLS 9, DESIGN §6b).

On x86 with AVX2 but no VNNI, MLAS multiplies uint8 activation codes by int8 weight codes with
VPMADDUBSW, which adds each *pair* of adjacent products into an int16 with saturation. Measured
with bench/kernel_pairs.py under ``qemu-x86_64 -cpu Haswell`` (onnxruntime 1.32, default session;
QLinearConv via im2col GEMM and via its indirect "ConvSym" kernel, QLinearMatMul, QGemm):

* Reduction order, per group: kernel position (row-major), then input channel, fastest ("kernel
  order", a channels-last im2col); MatMul/Gemm: the K axis. Elements (2m, 2m+1) are a pair; an
  odd last element is alone. The same for 1x1, strided, dilated, padded, grouped, 1-D and 3-D
  convolutions, a depthwise one with a channel multiplier > 1, rank-3 MatMul inputs, M = 1.
* Products use the raw codes (the zero point is subtracted afterwards as zp x column sum) and
  padded positions hold the zero-point code, so a mid-grid zero point costs headroom.
* Int8 activations: onnxruntime rewrites their Q/DQ to uint8 (code + 128) before fusing.
* Depthwise convolutions (one input and one output channel per group) and uint8 weights (zero
  point 128: the U8U8 kernel widens to int16 first) never saturate.

One uint8 x int8 product fits in int16 (255 x -128 = -32640), so only a pair whose weights have
the same sign can leave [-32768, 32767]: with codes in [lo, hi], weights (w0, w1) give pair sums
in [sum min(lo w, hi w), sum max(lo w, hi w)]. That bound prunes the emulation to the few pairs
that can saturate, and alone (``channels_at_risk``) says which channels are at risk without
data. Weights whose same-signed pairs sum to at most 128 codes never are: the guard
(``pair_safe_scale``) widens the scale of just the channels that need it. Memory: a few copies of the weights, the
candidate pairs, and a working set of CHUNK-sized arrays (tens of MB), whatever the batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import astuple, dataclass
from typing import Any

import numpy as np

from amq.quant.conv_geometry import ConvGeometry

INT16_MIN, INT16_MAX = -(2**15), 2**15 - 1
SIGNED_SHIFT = 128  # int8 activation codes run as uint8 codes + 128
CHUNK = 1 << 20  # values per working array (rows x max(K, outputs, candidates)): 4-8 MB
SEGMENT = CHUNK // 16  # candidate pairs handled at once


@dataclass
class Saturation:
    """How one layer's kernel results differ from the exact ones, accumulated over batches.
    Energies are sums over outputs of squares in real units (accumulator x s_x x s_w)."""

    outputs: int = 0  # output values counted (N x Cout x spatial)
    saturated: int = 0  # outputs with at least one pair sum outside the int16 range
    err_energy: float = 0.0  # (kernel - exact accumulator)^2
    signal_energy: float = 0.0  # exact (zero-point corrected) accumulator^2
    guard_err_energy: float = 0.0  # (exact - exact with the pair-safe guard's weights)^2

    def update(self, other: Saturation) -> None:
        """Add another batch's counts (streaming: constant memory)."""
        self.outputs += other.outputs
        self.saturated += other.saturated
        self.err_energy += other.err_energy
        self.signal_energy += other.signal_energy
        self.guard_err_energy += other.guard_err_energy

    def array(self) -> np.ndarray:
        """The five counts as float64 (exact: the counts are below 2**53), for a cache."""
        return np.asarray(astuple(self), np.float64)

    @staticmethod
    def of(a: np.ndarray) -> Saturation:
        """The inverse of ``array``."""
        outputs, saturated, *energies = (float(v) for v in np.ravel(a))
        return Saturation(int(outputs), int(saturated), *energies)

    @property
    def fraction(self) -> float:
        return self.saturated / self.outputs if self.outputs else 0.0

    @property
    def sqnr_db(self) -> float:
        """Signal to saturation error in dB (inf when nothing saturates)."""
        if self.err_energy == 0.0:
            return math.inf
        if self.signal_energy == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal_energy / self.err_energy)


def needs_guard(sat: Saturation) -> bool:
    """Whether to guard: unguarded, a CPU without VNNI loses ``err_energy``; guarded (pair-safe
    scales), every CPU loses ``guard_err_energy``. Both add to the same accumulators, so the
    smaller worst case wins; a threshold on the fraction or SQNR alone ignores the guard's cost."""
    return sat.saturated > 0 and sat.err_energy > sat.guard_err_energy


# ----------------------------------------------------------------------------------------------
# Weights in kernel order and the data-free bound


def weight_matrix(w_codes: np.ndarray, group: int = 1) -> np.ndarray:
    """Weights as the kernel reduces them: [G, K, Cout/G] with K in kernel order. A Conv weight
    [Cout, Cin/G, *kernel] gives K = kernel positions x Cin/G (channel fastest); a MatMul or Gemm
    weight [K, N] (transB already undone) gives [1, K, N]."""
    w = np.asarray(w_codes)
    if w.ndim == 2:
        return w[None]
    cout, cg = w.shape[:2]
    k = int(np.prod(w.shape[2:]))
    wg = w.reshape(group, cout // group, cg, k)  # [G, Cout_g, Cg, P]
    return wg.transpose(0, 3, 2, 1).reshape(group, k * cg, cout // group)


def _risky_pairs(wm: np.ndarray, lo: int, hi: int) -> Iterator[tuple[int, np.ndarray]]:
    """Column blocks (first column, [K // 2, columns] bool) of one group's [K, N] weights: the
    pairs whose sum can leave int16 when kernel codes lie in [lo, hi] (0 <= lo). A lone last
    element never can: one product fits. Blocks keep the int32 temporaries under CHUNK values."""
    k2 = wm.shape[0] // 2
    step = max(1, CHUNK // max(1, k2))
    for c in range(0, wm.shape[1], step):
        w0 = wm[0 : 2 * k2 : 2, c : c + step].astype(np.int32)
        w1 = wm[1 : 2 * k2 : 2, c : c + step].astype(np.int32)
        yield c, _may_leave_int16((w0, lo, hi), (w1, lo, hi))


def _may_leave_int16(*elements: tuple) -> np.ndarray:
    """Whether pair sums w0 a0 + w1 a1 can leave int16, each element given as (weights, lowest
    code, highest code) (codes scalars or arrays, broadcast against the weights): the largest sum
    takes each weight's sign's extreme code, the smallest the other."""
    top = bottom = 0
    for w, lo, hi in elements:
        pos = w > 0
        top = top + np.where(pos, hi, lo) * w
        bottom = bottom + np.where(pos, lo, hi) * w
    return (top > INT16_MAX) | (bottom < INT16_MIN)


def _no_pairs(w: np.ndarray, group: int, weights_unsigned: bool) -> bool:
    """Kernels without int16 pairs: depthwise convolutions, and uint8 weights (U8U8)."""
    depthwise = w.ndim > 2 and group > 1 and w.shape[1] == 1 and w.shape[0] == group
    return weights_unsigned or depthwise


def channels_at_risk(
    w_codes: np.ndarray,
    *,
    lo: int = 0,
    hi: int = 255,
    group: int = 1,
    signed: bool = False,
    weights_unsigned: bool = False,
) -> np.ndarray:
    """Without data: which output channels have a weight pair that can saturate when every
    activation code lies in [lo, hi] (codes of the activation's own grid; ``signed`` shifts them
    by 128 as the kernel does; with padding, [lo, hi] must hold the zero point). A Conv weight
    [Cout, Cin/G, *k] or a MatMul/Gemm weight [K, N]; ``.mean()`` is the fraction at risk."""
    w = np.asarray(w_codes)
    cout = w.shape[0] if w.ndim > 2 else w.shape[1]
    if _no_pairs(w, group, weights_unsigned):
        return np.zeros(cout, dtype=bool)
    shift = SIGNED_SHIFT if signed else 0
    risky = [
        r.any(axis=0)
        for wm in weight_matrix(w, group)
        for _, r in _risky_pairs(wm, lo + shift, hi + shift)
    ]
    return np.concatenate(risky)


# ----------------------------------------------------------------------------------------------
# The emulation: per chunk of output positions, the exact accumulators and the kernel's error


@dataclass(frozen=True)
class _Group:
    """One group's weights, prepared for the chunks: the weights and the guard's rounding
    error as floats (float64 when the accumulators must be exact integers), and the (pair,
    output column) candidates that can saturate, handled SEGMENT at a time."""

    w: np.ndarray  # [K, N]
    guard: np.ndarray | None  # [K, N]: the pair-safe guard's change, in code units
    k0: np.ndarray  # int32 reduction index of each candidate pair's first element
    w0: np.ndarray  # int32 weights of the pair's two elements
    w1: np.ndarray
    n: np.ndarray  # int32 output column of each candidate
    # where K < N and the energies are all that is asked (``scale``: per output column): [K, K]
    # W diag(scale^2) W^T and the same of the guard's change, so that a chunk's output energy
    # is sum(a G a^T) over its rows (K^2 a row, not K x N: PP-OCRv6 rec's [120, 18710] head)
    gram: tuple[np.ndarray, np.ndarray | None] | None = None

    @staticmethod
    def of(
        wm: np.ndarray, lo: int, hi: int, no_pairs: bool, guard: bool, dtype, scale=None
    ) -> _Group:
        wm = wm.astype(np.int16)  # codes in [-128, 127]; small temporaries
        g = _guard_error(wm).astype(dtype) if guard and not no_pairs else None
        # the blocks' masks (K / 2 x N bools) kept, then one pass: no lists of parts to join
        blocks = [] if no_pairs else list(_risky_pairs(wm, lo, hi))
        total = sum(int(r.sum()) for _, r in blocks)
        k, col, w0, w1 = (np.zeros(total, np.int32) for _ in range(4))
        i = 0
        for c, risky in blocks:
            cn, cj = np.nonzero(risky.T)  # sorted by output column
            j = i + cn.size
            k[i:j], col[i:j] = 2 * cj, cn + c
            w0[i:j], w1[i:j] = wm[2 * cj, cn + c], wm[2 * cj + 1, cn + c]
            i = j
        gram = None
        if scale is not None and wm.shape[0] < wm.shape[1]:
            s2 = np.asarray(scale, np.float64) ** 2
            gram = tuple(None if m is None else _gram(m, s2) for m in (wm, g))
        return _Group(wm.astype(dtype), g, k, w0, w1, col, gram)  # type: ignore[arg-type]

    def chunk(self, a: np.ndarray, zp: int):
        """For kernel codes ``a`` [m, K] (int32): exact accumulators, the kernel's error
        (int64), whether any pair saturated, and the guard's error (or None). With ``gram``,
        the accumulators' and the guard error's energies (scaled) stand for them."""
        if self.gram is not None:
            c64 = (a - zp).astype(np.float64)
            exact, guard = (
                None if m is None else float(np.sum((c64 @ m) * c64)) for m in self.gram
            )
            shape: tuple[int, ...] = (a.shape[0], self.w.shape[1])
        else:
            centered = (a - zp).astype(self.w.dtype)
            exact = centered @ self.w
            guard = centered @ self.guard if self.guard is not None else None
            shape = exact.shape
        err = np.zeros(shape, dtype=np.int64)
        sat = np.zeros(shape, dtype=bool)
        k0s, w0s, w1s, ns = self._reachable(a)
        for c0 in range(0, k0s.size, SEGMENT):
            c1 = c0 + SEGMENT
            k0 = k0s[c0:c1]
            p = a[:, k0] * w0s[c0:c1] + a[:, k0 + 1] * w1s[c0:c1]  # |p| <= 65280
            e = np.clip(p, INT16_MIN, INT16_MAX) - p
            rows, cand = np.nonzero(e)  # few or none: most candidate pairs never saturate
            if rows.size:
                cols = ns[c0:c1][cand]
                np.add.at(err, (rows, cols), e[rows, cand])
                sat[rows, cols] = True
        return exact, err, sat, guard

    def _reachable(self, a: np.ndarray) -> tuple[np.ndarray, ...]:
        """The candidates (k0, w0, w1, n) whose pair sum can leave int16 with the codes of ``a``
        [m, K] as they are: each element's own code range in this chunk, not the grid's (the
        others' error is an exact zero). PP-OCRv6 rec's 18710-column output layer had 1.1 M
        candidates by the grid's range, most of them out of reach of its chunks' codes."""
        if not self.k0.size or not a.size:
            return self.k0, self.w0, self.w1, self.n
        amax, amin = a.max(axis=0), a.min(axis=0)
        k1 = self.k0 + 1
        reach = _may_leave_int16(
            (self.w0, amin[self.k0], amax[self.k0]), (self.w1, amin[k1], amax[k1])
        )
        keep = np.flatnonzero(reach)
        return self.k0[keep], self.w0[keep], self.w1[keep], self.n[keep]

    @property
    def width(self) -> int:
        return max(*self.w.shape, min(self.k0.size, SEGMENT))


PAIR_LIMIT = 127  # codes: |q0 + q1| <= PAIR_LIMIT + 1 after rounding, and 255 x 128 fits int16


def _pair_need(wm: np.ndarray) -> np.ndarray:
    """[N]: the largest same-signed pair sum |w0| + |w1| of each column of [K, N] weights in
    kernel order (an odd last element pairs with zero)."""
    w = np.asarray(wm, dtype=np.float64)
    if w.shape[0] % 2:
        w = np.concatenate([w, np.zeros((1, w.shape[1]))])
    p = w.reshape(w.shape[0] // 2, 2, w.shape[1])
    pos = np.clip(p, 0, None).sum(axis=1).max(axis=0, initial=0.0)
    neg = np.clip(-p, 0, None).sum(axis=1).max(axis=0, initial=0.0)
    return np.maximum(pos, neg)


def pair_safe_scale(w: np.ndarray, scale: np.ndarray | float, channel_axis: int) -> np.ndarray:
    """The overflow guard: weight scales no smaller than ``scale`` with which every pair of codes
    the kernel adds in one int16 sums to at most PAIR_LIMIT + 1 = 128 in magnitude, so that no
    activation code (<= 255) can saturate it, on any data. Only the channels whose largest
    same-signed pair needs it get a wider scale (at most 2x: what a 7-bit grid would cost every
    channel). ``w``: float weights, [Cout, Cin/g, *k] for a Conv, 2-D with the output channels on
    ``channel_axis`` for Gemm/MatMul; ``scale`` per channel or per tensor."""
    w = np.asarray(w, dtype=np.float64)
    if w.ndim > 2 and channel_axis == w.ndim - 1:  # a batched MatMul weight [..., K, N]
        slices = list(w.reshape(-1, *w.shape[-2:]))  # each slice's pairs run along its own K
    elif w.ndim > 2:  # [K, Cout]: per output channel the same pairs for any group
        slices = [weight_matrix(w, 1)[0]]
    else:
        slices = [w if channel_axis == w.ndim - 1 else w.T]
    base = np.asarray(scale, dtype=np.float32)
    b = base.reshape(-1).astype(np.float64)
    need = np.max([_pair_need(m) for m in slices], axis=0)
    codes_need = np.max([_pair_need(np.rint(m / b)) for m in slices], axis=0)  # safe up to 128
    widen = np.where(codes_need > PAIR_LIMIT + 1, need / PAIR_LIMIT, 0.0)
    if base.size == 1:
        return np.maximum(base, np.float32(widen.max(initial=0.0))).reshape(base.shape)
    return np.maximum(base.reshape(-1), widen.astype(np.float32)).reshape(base.shape)


def _gram(m: np.ndarray, s2: np.ndarray) -> np.ndarray:
    """[K, K] m diag(s2) m^T of [K, N] weights in float64: sum(a G a^T) is the energy of a @ m
    with each column scaled by its sqrt(s2)."""
    m64 = np.asarray(m, np.float64)
    return (m64 * s2) @ m64.T


def _guard_error(w: np.ndarray) -> np.ndarray:
    """What the guard changes, in 8-bit code units: each column's codes re-rounded on its
    pair-safe scale (ratio r = max(1, need / PAIR_LIMIT)): r round_half_even(w / r) - w. amq's
    guard rounds the float weights instead, whose error this approximates."""
    need = _pair_need(w)
    r = np.where(need > PAIR_LIMIT + 1, need / PAIR_LIMIT, 1.0)  # as pair_safe_scale widens
    return r * np.rint(w / r) - w


def _kernel_codes(codes: np.ndarray, zero_point: int, signed: bool) -> tuple[np.ndarray, int]:
    """The codes the kernel multiplies (int8 activations run as uint8 codes + 128)."""
    shift = SIGNED_SHIFT if signed else 0
    return np.asarray(codes).astype(np.int32) + shift, int(zero_point) + shift


@dataclass
class WeightsCache:
    """One layer's weights prepared for the emulation, kept across its calls (batches, bands):
    prepared for the widest code range [lo, hi] seen so far. A wider range only adds candidate
    pairs that the narrower codes cannot saturate, whose error is an exact zero, so the results
    are those of weights prepared for each call's own range."""

    lo: int = 0
    hi: int = -1
    groups: list[_Group] | None = None


@dataclass(frozen=True)
class _Setup:
    """What the chunk loops need besides the activations; ``cache``: the layer's prepared
    weights, when the caller keeps them across calls with the same weights."""

    signed: bool = False
    weights_unsigned: bool = False
    guard: bool = False  # Saturation: also the guard's error; energies in float32 BLAS (or Gram)
    cache: WeightsCache | None = None
    out_scale: np.ndarray | None = None  # Saturation: each output column's, for _Group.gram

    def groups(self, w: np.ndarray, wms: np.ndarray, lo: int, hi: int, group: int) -> list[_Group]:
        c = self.cache
        if c is not None and c.groups is not None:
            if c.lo <= lo and hi <= c.hi:
                return c.groups
            lo, hi = min(lo, c.lo), max(hi, c.hi)
        no_pairs = _no_pairs(w, group, self.weights_unsigned)
        dtype = np.float32 if self.guard else np.float64  # float64: exact integer accumulators
        n = wms.shape[2]  # each group's columns, side by side in the output's
        scales = [None if self.out_scale is None else self.out_scale[i * n : (i + 1) * n]
                  for i in range(len(wms))]  # fmt: skip
        groups = [
            _Group.of(wm, lo, hi, no_pairs, self.guard, dtype, sc)
            for wm, sc in zip(wms, scales, strict=True)
        ]
        if c is not None:
            c.lo, c.hi, c.groups = lo, hi, groups
        return groups


def _matmul_chunks(a_codes, a_zero_point, w_codes, setup: _Setup) -> Iterator:
    """(row slice, chunk results) over the rows of the flattened activation [M, K]."""
    a, zp = _kernel_codes(a_codes, a_zero_point, setup.signed)
    a = a.reshape(-1, a.shape[-1])
    w = np.asarray(w_codes)
    lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
    (grp,) = setup.groups(w, w[None], lo, hi, 1)
    rows = max(1, CHUNK // grp.width)
    for r0 in range(0, a.shape[0], rows):
        yield slice(r0, r0 + rows), grp.chunk(a[r0 : r0 + rows], zp)


def _conv_steps(n: int, out: list[int], rows: int) -> list[tuple[int, int, int, int]]:
    """Chunks as (image begin, end, first output dim begin, end) of at most ``rows`` positions
    (or one row of the first output dim)."""
    per_image = int(np.prod(out))
    if per_image <= rows:
        k = rows // per_image
        return [(b, min(b + k, n), 0, out[0]) for b in range(0, n, k)]
    r = max(1, rows * out[0] // per_image)
    return [(b, b + 1, o, min(o + r, out[0])) for b in range(n) for o in range(0, out[0], r)]


def _conv_chunks(x_codes, x_zero_point, w_codes, setup: _Setup, geometry) -> Iterator:
    """((images, first output dim) ranges, chunk results) with the groups' columns side by side:
    [m, Cout] with m = images x rows x the other output dims. The im2col of a chunk is built
    by one fancy index into the padded input (padding holds the zero-point code)."""
    group, strides, pads, dil = geometry
    x, zp = _kernel_codes(x_codes, x_zero_point, setup.signed)
    w = np.asarray(w_codes)
    nd, kshape, cg = w.ndim - 2, w.shape[2:], w.shape[1]
    xp = np.pad(
        x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)], constant_values=zp
    )
    out = _conv_out(x.shape, w.shape, geometry)
    wms = weight_matrix(w, group)
    lo, hi = (int(xp.min()), int(xp.max())) if xp.size else (0, 0)
    groups = setup.groups(w, wms, lo, hi, group)
    pos, chan = np.divmod(np.arange(wms.shape[1]), cg)  # kernel order: channel fastest
    offs = [o * d for o, d in zip(np.unravel_index(pos, kshape), dil, strict=True)]
    width = max(w.shape[0], *(g.width for g in groups))
    for b0, b1, o0, o1 in _conv_steps(x.shape[0], out, max(1, CHUNK // width)):
        idx = []
        for i in range(nd):
            o = (np.arange(o0, o1) if i == 0 else np.arange(out[i])) * strides[i]
            shape = [1] * (nd + 1)
            shape[i + 1] = -1
            idx.append(offs[i].reshape((-1,) + (1,) * nd) + o.reshape(shape))
        parts = []
        for gi, grp in enumerate(groups):
            ch = (gi * cg + chan).reshape((-1,) + (1,) * nd)
            cols = xp[(slice(b0, b1), ch, *idx)]  # [nb, K, rows, *out[1:]]
            parts.append(grp.chunk(np.moveaxis(cols, 1, -1).reshape(-1, len(pos)), zp))
        yield (b0, b1, o0, o1), [_merged(p) for p in zip(*parts, strict=True)]


def _merged(parts: tuple) -> Any:
    """The groups' results of one chunk side by side (energies: their sum)."""
    if parts[0] is None:
        return None
    if isinstance(parts[0], float):
        return sum(parts)
    return np.concatenate(parts, axis=1)


def _conv_out(x_shape, w_shape, geometry) -> list[int]:
    """Output spatial dims of a Conv."""
    _, strides, pads, dil = geometry
    nd = len(w_shape) - 2
    span = [dil[i] * (w_shape[2 + i] - 1) + 1 for i in range(nd)]
    return [
        (x_shape[2 + i] + pads[i] + pads[i + nd] - span[i]) // strides[i] + 1 for i in range(nd)
    ]


def _saturation(chunks: Iterator, out_scale: np.ndarray) -> Saturation:
    res = Saturation()
    for _, (exact, err, sat, guard) in chunks:
        res.outputs += sat.size
        saturated = int(sat.sum())
        res.saturated += saturated
        if saturated:  # else every error is 0
            res.err_energy += float(np.sum((err * out_scale) ** 2))
        res.signal_energy += _energy(exact, out_scale)
        if guard is not None:
            res.guard_err_energy += _energy(guard, out_scale)
    return res


def _energy(v: np.ndarray | float, out_scale: np.ndarray) -> float:
    """Sum of squares of outputs ``v`` scaled per column, or ``v`` where it is that already."""
    return v if isinstance(v, float) else float(np.sum((v * out_scale) ** 2))


def _out_scale(w_scale: np.ndarray | float, x_scale: float, cout: int) -> np.ndarray:
    s = np.broadcast_to(np.asarray(w_scale, dtype=np.float64).reshape(-1), (cout,))
    return s * float(x_scale)


# ----------------------------------------------------------------------------------------------
# Public entry points


def matmul_saturation(
    a_codes: np.ndarray,
    a_zero_point: int,
    w_codes: np.ndarray,
    w_scale: np.ndarray | float,
    a_scale: float,
    *,
    signed: bool = False,
    weights_unsigned: bool = False,
    cache: WeightsCache | None = None,
) -> Saturation:
    """Saturation of a MatMul/Gemm with a constant 2-D weight: activation codes [..., K] on
    their own grid (``signed``: int8 codes), weight codes [K, N] (zero point subtracted; a Gemm
    with transB passes the transpose, with transA the caller transposes the activation), weight
    scale per column or scalar. ``cache``: kept by the caller across calls with these weights."""
    w = np.asarray(w_codes)
    out_scale = _out_scale(w_scale, a_scale, w.shape[1])
    setup = _Setup(signed, weights_unsigned, guard=True, cache=cache, out_scale=out_scale)
    return _saturation(_matmul_chunks(a_codes, a_zero_point, w, setup), out_scale)


def conv_saturation(
    x_codes: np.ndarray,
    x_zero_point: int,
    w_codes: np.ndarray,
    w_scale: np.ndarray | float,
    x_scale: float,
    *,
    signed: bool = False,
    weights_unsigned: bool = False,
    cache: WeightsCache | None = None,
    **geometry: Any,
) -> Saturation:
    """Saturation of a Conv (1-D, 2-D or 3-D): input codes [N, C, *spatial] on their own grid,
    weight codes [Cout, C/group, *kernel] (zero point subtracted), weight scale per output
    channel or scalar; ``geometry``: the fields of ``ConvGeometry`` (group, strides, pads,
    dilations); ``cache`` as for ``matmul_saturation``."""
    w = np.asarray(w_codes)
    geo = ConvGeometry(**geometry).full(w)
    out_scale = _out_scale(w_scale, x_scale, w.shape[0])
    setup = _Setup(signed, weights_unsigned, True, cache, out_scale)
    chunks = _conv_chunks(x_codes, x_zero_point, w, setup, geo)
    return _saturation(chunks, out_scale)


def matmul_accumulators(
    a_codes: np.ndarray,
    a_zero_point: int,
    w_codes: np.ndarray,
    *,
    signed: bool = False,
    weights_unsigned: bool = False,
) -> np.ndarray:
    """The kernel's zero-point corrected int32 accumulators [..., N] (before requantization),
    saturation included. Materializes the whole output: for tests and small checks."""
    a, w = np.asarray(a_codes), np.asarray(w_codes)
    out = np.zeros((int(np.prod(a.shape[:-1])), w.shape[1]), dtype=np.int64)
    for rows, (exact, err, _, _) in _matmul_chunks(
        a, a_zero_point, w, _Setup(signed, weights_unsigned)
    ):
        out[rows] = np.rint(exact).astype(np.int64) + err
    return out.reshape(a.shape[:-1] + (w.shape[1],))


def conv_accumulators(
    x_codes: np.ndarray,
    x_zero_point: int,
    w_codes: np.ndarray,
    *,
    signed: bool = False,
    weights_unsigned: bool = False,
    **geometry: Any,
) -> np.ndarray:
    """The kernel's zero-point corrected accumulators [N, Cout, *out] of a Conv, saturation
    included (as ``conv_saturation`` sees them; ``geometry`` likewise). Materializes the
    output: for tests."""
    x, w = np.asarray(x_codes), np.asarray(w_codes)
    geo = ConvGeometry(**geometry).full(w)
    out = _conv_out(x.shape, w.shape, geo)
    acc = np.zeros((x.shape[0], *out, w.shape[0]), dtype=np.int64)
    setup = _Setup(signed, weights_unsigned)
    for (b0, b1, o0, o1), (exact, err, _, _) in _conv_chunks(x, x_zero_point, w, setup, geo):
        block = np.rint(exact).astype(np.int64) + err
        acc[b0:b1, o0:o1] = block.reshape(b1 - b0, o1 - o0, *out[1:], w.shape[0])
    return np.moveaxis(acc, -1, 1)
