"""amq.quant.qmath against an independent numpy reference written here (DESIGN.md §3).

Expected values never come from qmath itself: grid ends are literal tables, rounding is an explicit
half-to-even written with floor, scales and zero points follow the formulas of DESIGN.md §3.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amq.quant import qmath

INT32_MAX = 2147483647
F32_EPS = 2.0**-23

# ---------------------------------------------------------------------------------------------
# The independent reference


def round_half_even(v) -> np.ndarray:
    """Round to nearest, ties to even, written without np.rint/np.round."""
    v = np.asarray(v, dtype=np.float64)
    f = np.floor(v)
    d = v - f
    odd = np.mod(f, 2.0) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return f + up


def ref_grid(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    if not signed:
        return 0, 2**bits - 1
    return -(2 ** (bits - 1)) + (1 if narrow else 0), 2 ** (bits - 1) - 1


def ref_quantize(x, scale, zp, qmin, qmax) -> np.ndarray:
    return np.clip(round_half_even(np.asarray(x, np.float64) / scale) + zp, qmin, qmax)


def ref_dequantize(q, scale, zp) -> np.ndarray:
    return (np.asarray(q, np.float64) - zp) * scale


def ref_activation(lo: float, hi: float, bits: int, symmetric: bool):
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        scale = max(-lo, hi) / qmax
        return scale, 0, qmin, qmax
    qmin, qmax = 0, 2**bits - 1
    scale = (hi - lo) / (qmax - qmin)
    zp = int(np.clip(round_half_even(qmin - lo / scale), qmin, qmax))
    return scale, zp, qmin, qmax


def ref_weight_scale(w: np.ndarray, bits: int, axis: int | None) -> np.ndarray:
    qmax = 2 ** (bits - 1) - 1
    if axis is None:
        return np.array(np.abs(w).max() / qmax)
    n = w.shape[axis]
    return np.array([np.abs(np.take(w, c, axis=axis)).max() / qmax for c in range(n)])


# ---------------------------------------------------------------------------------------------
# Sanity of the reference itself (so that a broken reference cannot make tests pass vacuously)


def test_reference_round_half_even_table():
    v = [0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 0.49999, 0.50001, -0.50001, 7.0]
    assert round_half_even(v).tolist() == [0, 2, 2, 4, -0, -2, -2, 0, 1, -1, 7]


# ---------------------------------------------------------------------------------------------
# Grids

GRID_TABLE = [
    (4, True, False, -8, 7),
    (4, True, True, -7, 7),
    (4, False, False, 0, 15),
    (8, True, False, -128, 127),
    (8, True, True, -127, 127),
    (8, False, False, 0, 255),
    (16, True, False, -32768, 32767),
    (16, True, True, -32767, 32767),
    (16, False, False, 0, 65535),
]


@pytest.mark.parametrize("bits,signed,narrow,qmin,qmax", GRID_TABLE)
def test_grid_ends(bits, signed, narrow, qmin, qmax):
    g = qmath.grid(bits, signed, narrow)
    assert (g.qmin, g.qmax) == (qmin, qmax)
    assert g.levels == qmax - qmin
    assert ref_grid(bits, signed, narrow) == (qmin, qmax)


@pytest.mark.parametrize("bits", [0, 1, 2, 3, 5, 7, 12, 24, 64])
def test_grid_rejects_unsupported_bits(bits):
    with pytest.raises(ValueError):
        qmath.grid(bits, signed=True)


# ---------------------------------------------------------------------------------------------
# quantize / dequantize


@pytest.mark.parametrize("zp", [0, 3, -2])
def test_quantize_rounds_half_to_even(zp):
    s = 0.25
    ratios = np.array([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -3.5])
    q = qmath.quantize(ratios * s, s, zp, qmath.grid(8, True))
    assert q.tolist() == [0 + zp, 2 + zp, 2 + zp, 4 + zp, 0 + zp, -2 + zp, -2 + zp, -4 + zp]


@pytest.mark.parametrize("bits,signed,narrow,qmin,qmax", GRID_TABLE)
def test_quantize_dequantize_match_reference(bits, signed, narrow, qmin, qmax):
    rng = np.random.default_rng(bits * 10 + signed * 2 + narrow)
    scale = float(rng.uniform(1e-3, 2.0))
    zp = int(rng.integers(qmin, qmax + 1)) if not signed else 0
    # values inside, on ties and far outside the grid
    x = np.concatenate(
        [
            rng.uniform((qmin - zp - 5) * scale, (qmax - zp + 5) * scale, 2000),
            (np.arange(qmin - zp, qmax - zp, max(1, (qmax - qmin) // 64)) + 0.5) * scale,
            [-1e30, 1e30, 0.0],
        ]
    ).astype(np.float32)
    g = qmath.grid(bits, signed, narrow)
    q = qmath.quantize(x, scale, zp, g)
    assert q.dtype == np.int64
    np.testing.assert_array_equal(q, ref_quantize(x, scale, zp, qmin, qmax))
    assert q.min() == qmin and q.max() == qmax  # the far values hit both grid ends
    xd = qmath.dequantize(q, scale, zp)
    assert xd.dtype == np.float32
    np.testing.assert_allclose(xd, ref_dequantize(q, scale, zp), rtol=2 * F32_EPS, atol=0)
    np.testing.assert_array_equal(qmath.fake_quantize(x, scale, zp, g), xd)


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_quantize_per_channel_axis(axis):
    rng = np.random.default_rng(7 + axis)
    x = rng.normal(size=(3, 4, 5)).astype(np.float32) * 3
    n = x.shape[axis]
    scales = rng.uniform(0.01, 0.1, n)
    zps = rng.integers(-3, 4, n)
    g = qmath.grid(8, True)
    q = qmath.quantize(x, scales, zps, g, axis=axis)
    xd = qmath.dequantize(q, scales, zps, axis=axis)
    for c in range(n):
        xc = np.take(x, c, axis=axis)
        qc = ref_quantize(xc, scales[c], zps[c], -128, 127)
        np.testing.assert_array_equal(np.take(q, c, axis=axis), qc)
        np.testing.assert_allclose(
            np.take(xd, c, axis=axis), ref_dequantize(qc, scales[c], zps[c]), rtol=2 * F32_EPS
        )


# ---------------------------------------------------------------------------------------------
# Weights


@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("axis", [None, 0, 1, 2, -1])
def test_weight_qparams_match_reference(bits, axis):
    rng = np.random.default_rng(bits + (axis if axis is not None else 9))
    # channels of very different magnitudes
    w = rng.normal(size=(4, 3, 5)) * np.logspace(-3, 2, 60).reshape(4, 3, 5)
    w = w.astype(np.float32)
    scale, zp = qmath.weight_qparams(w, bits, axis)
    ref = ref_weight_scale(w.astype(np.float64), bits, axis)
    assert scale.dtype == np.float32
    assert scale.shape == ref.shape == zp.shape
    np.testing.assert_allclose(scale, ref, rtol=2 * F32_EPS)
    assert np.all(zp == 0)
    qmax = 2 ** (bits - 1) - 1
    g = qmath.grid(bits, signed=True, narrow=True)
    q = qmath.quantize(w, scale, 0, g, axis=axis)
    assert q.min() >= -qmax and q.max() <= qmax
    # the largest |w| of each channel lands on +-qmax
    if axis is None:
        assert np.abs(q).max() == qmax
    else:
        per_ch = np.moveaxis(np.abs(q), axis, 0).reshape(w.shape[axis], -1).max(axis=1)
        assert np.all(per_ch == qmax)
    err = np.abs(qmath.fake_quantize(w, scale, 0, g, axis=axis).astype(np.float64) - w)
    s_b = scale.astype(np.float64)
    if axis is not None:
        shape = [1] * w.ndim
        shape[axis] = -1
        s_b = s_b.reshape(shape)
    assert np.all(err <= s_b / 2 * (1 + 1e-6) + F32_EPS * np.abs(w))


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_weight_qparams_zero_channel_is_safe(bits):
    rng = np.random.default_rng(bits)
    w = rng.normal(size=(5, 3, 3, 3)).astype(np.float32)
    w[2] = 0.0
    with np.errstate(all="raise"):  # any division by zero or invalid op raises
        scale, zp = qmath.weight_qparams(w, bits, axis=0)
        g = qmath.grid(bits, signed=True, narrow=True)
        wq = qmath.fake_quantize(w, scale, zp, g, axis=0)
    assert np.all(np.isfinite(scale)) and np.all(scale > 0)
    assert np.all(wq[2] == 0.0)
    ref = ref_weight_scale(w.astype(np.float64), bits, 0)
    keep = [0, 1, 3, 4]
    np.testing.assert_allclose(scale[keep], ref[keep], rtol=2 * F32_EPS)


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_weight_qparams_all_zero_tensor(axis):
    w = np.zeros((3, 4), dtype=np.float32)
    with np.errstate(all="raise"):
        scale, zp = qmath.weight_qparams(w, 8, axis)
        wq = qmath.fake_quantize(w, scale, zp, qmath.grid(8, True, True), axis=axis)
    assert np.all(np.isfinite(scale)) and np.all(scale > 0)
    assert np.all(wq == 0.0)


def test_weight_qparams_subnormal_weights():
    w = np.array([[1e-45, -1e-45], [0.0, 3e-40]], dtype=np.float32)
    with np.errstate(all="raise"):
        scale, _ = qmath.weight_qparams(w, 8, axis=0)
        q = qmath.quantize(w, scale, 0, qmath.grid(8, True, True), axis=0)
    assert np.all(np.isfinite(scale)) and np.all(scale > 0)
    assert np.all(np.abs(q) <= 127)


# ---------------------------------------------------------------------------------------------
# Activations

ACT_RANGES = [
    (-1.0, 3.0),
    (-7.5, 0.25),
    (0.0, 6.0),
    (2.0, 5.0),  # widened to [0, 5]
    (-5.0, -2.0),  # widened to [-5, 0]
    (-1e-3, 1e4),
    (-123.456, 0.789),
]


@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("lo,hi", ACT_RANGES)
def test_activation_qparams_asymmetric(lo, hi, bits):
    scale, zp, g = qmath.activation_qparams(lo, hi, bits, symmetric=False)
    r_scale, r_zp, qmin, qmax = ref_activation(lo, hi, bits, False)
    assert (g.qmin, g.qmax) == (qmin, qmax) == (0, 2**bits - 1)
    assert scale == pytest.approx(r_scale, rel=1e-12)
    assert zp == r_zp
    assert qmin <= zp <= qmax
    # real zero is exactly representable
    assert qmath.fake_quantize(np.array([0.0]), scale, zp, g)[0] == 0.0
    # the widened range ends land within half a step of the grid ends
    lo_w, hi_w = min(lo, 0.0), max(hi, 0.0)
    assert abs((qmin - zp) * scale - lo_w) <= scale / 2 * (1 + 1e-9)
    assert abs((qmax - zp) * scale - hi_w) <= scale / 2 * (1 + 1e-9)


@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("lo,hi", ACT_RANGES)
def test_activation_qparams_symmetric(lo, hi, bits):
    scale, zp, g = qmath.activation_qparams(lo, hi, bits, symmetric=True)
    r_scale, _, qmin, qmax = ref_activation(lo, hi, bits, True)
    assert zp == 0
    assert (g.qmin, g.qmax) == (qmin, qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert scale == pytest.approx(r_scale, rel=1e-12)
    assert scale * qmax == pytest.approx(max(abs(lo), abs(hi), 0.0), rel=1e-12)


@pytest.mark.parametrize("symmetric", [False, True])
def test_activation_qparams_degenerate_range(symmetric):
    with np.errstate(all="raise"):
        scale, zp, g = qmath.activation_qparams(0.0, 0.0, 8, symmetric)
    assert np.isfinite(scale) and scale > 0
    assert g.qmin <= zp <= g.qmax
    assert qmath.fake_quantize(np.array([0.0]), scale, zp, g)[0] == 0.0


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_activation_qparams_many_is_each_range_on_its_own(bits, symmetric):
    """Many ranges at once (range_mse's candidates): the reference's scale and zero point for
    each, a degenerate range among them included (scale 1, not borrowed from the others)."""
    ranges = ACT_RANGES + [(0.0, 0.0)]
    lo, hi = np.array(ranges).T
    scale, zp, g = qmath.activation_qparams_many(lo, hi, bits, symmetric)
    assert (g.qmin, g.qmax) == ref_activation(1.0, 2.0, bits, symmetric)[2:]
    for (a, b), s, z in zip(ranges, scale, zp, strict=True):
        if a == b == 0.0:
            assert (s, z) == (1.0, 0)
            continue
        r_scale, r_zp, _, _ = ref_activation(a, b, bits, symmetric)
        assert s == pytest.approx(r_scale, rel=1e-12)
        assert z == (0 if symmetric else r_zp)


# ---------------------------------------------------------------------------------------------
# Bias


def test_bias_qparams_per_channel():
    rng = np.random.default_rng(11)
    b = rng.normal(size=6) * 5
    s_in = 0.0173
    s_w = rng.uniform(1e-3, 1e-2, 6).astype(np.float32)
    q, scale, zp = qmath.bias_qparams(b, s_in, s_w)
    assert q.dtype == np.int32 and zp.dtype == np.int32 and scale.dtype == np.float32
    ref_scale = s_in * s_w.astype(np.float64)
    np.testing.assert_allclose(scale, ref_scale, rtol=2 * F32_EPS)
    np.testing.assert_array_equal(q, round_half_even(b / ref_scale))
    assert np.all(zp == 0)
    err = np.abs(q * scale.astype(np.float64) - b)
    assert np.all(err <= ref_scale / 2 + 4 * F32_EPS * np.abs(b))


def test_bias_qparams_per_tensor_weight_scale():
    b = np.array([1.0, -2.5, 0.0, 1e-6])
    q, scale, zp = qmath.bias_qparams(b, 0.5, np.float32(0.01))
    assert q.shape == b.shape == scale.shape == zp.shape
    np.testing.assert_array_equal(q, round_half_even(b / 0.005))
    assert q.tolist() == [200, -500, 0, 0]


def test_bias_qparams_clips_to_int32():
    b = np.array([1e6, -1e6, 1e-6])
    s_w = np.array([2.0**-30, 2.0**-30, 2.0**-30], np.float32)
    q, _, _ = qmath.bias_qparams(b, 2.0**-10, s_w)
    assert q.tolist() == [INT32_MAX, -INT32_MAX, round(1e-6 * 2.0**40)]


def test_fit_weight_scale_for_bias_widens_only_where_needed():
    b = np.array([1e6, 0.5, -3e5, 0.0])
    s_in = 1e-3
    s_w = np.array([1e-9, 1e-2, 1e-9, 1e-9], np.float32)
    fit = qmath.fit_weight_scale_for_bias(b, s_in, s_w)
    assert fit.dtype == np.float32
    # channels whose bias already fits are left exactly alone
    assert fit[1] == s_w[1] and fit[3] == s_w[3]
    # the others are widened to about |b| / (s_in * INT32_MAX)
    need = np.abs(b) / (s_in * INT32_MAX)
    np.testing.assert_allclose(fit[[0, 2]], need[[0, 2]], rtol=1e-6)
    assert np.all(fit >= s_w)


@settings(max_examples=150, deadline=None)
@given(
    b=st.lists(
        st.floats(-1e7, 1e7, allow_nan=False, allow_subnormal=False), min_size=1, max_size=8
    ),
    s_in_exp=st.floats(-8, -1),
    s_w_exp=st.floats(-12, -1),
)
def test_fit_weight_scale_for_bias_nearly_fits(b, s_in_exp, s_w_exp):
    """After fitting, |b| / (s_in * s_w) exceeds INT32_MAX by at most float32 rounding."""
    b = np.array(b)
    s_in = 10.0**s_in_exp
    s_w = np.full(b.shape, 10.0**s_w_exp, np.float32)
    fit = qmath.fit_weight_scale_for_bias(b, s_in, s_w).astype(np.float64)
    assert np.all(fit >= s_w.astype(np.float64))
    assert np.all(np.abs(b) / (s_in * fit) <= INT32_MAX * (1 + 2 * F32_EPS) + 0.5)


def test_fit_weight_scale_then_bias_never_clips():
    b = np.array([1e6])
    s_in = 1e-3
    fit = qmath.fit_weight_scale_for_bias(b, s_in, np.array([1e-9], np.float32))
    q, scale, _ = qmath.bias_qparams(b, s_in, fit)
    # the bias must be representable: no code on the clip bound, error within half a step
    assert abs(int(q[0])) < INT32_MAX
    assert abs(float(q[0]) * s_in * float(fit[0]) - b[0]) <= s_in * float(fit[0]) / 2


# ---------------------------------------------------------------------------------------------
# Properties of activation fake quantization

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, allow_subnormal=False)
fractions = st.lists(st.floats(0.0, 1.0), min_size=1, max_size=20)
BITS = st.sampled_from([4, 8, 16])


def _tol(scale: float, lo: float, hi: float) -> float:
    # scale/2 plus float32 rounding of the dequantized value
    return scale / 2 * (1 + 1e-9) + 4 * F32_EPS * max(abs(lo), abs(hi), scale)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(a=finite, b=finite, bits=BITS, symmetric=st.booleans(), fr=fractions)
def test_prop_inside_range_error_at_most_half_step(a, b, bits, symmetric, fr):
    lo, hi = min(a, b), max(a, b)
    scale, zp, g = qmath.activation_qparams(lo, hi, bits, symmetric)
    lo_w, hi_w = min(lo, 0.0), max(hi, 0.0)
    x = lo_w + np.array(fr) * (hi_w - lo_w)
    x = np.concatenate([x, [lo_w, hi_w, lo, hi]])
    err = np.abs(qmath.fake_quantize(x, scale, zp, g).astype(np.float64) - x)
    assert np.all(err <= _tol(scale, lo_w, hi_w)), (scale, zp, err.max())


@settings(max_examples=200, deadline=None)
@given(a=finite, b=finite, bits=BITS, symmetric=st.booleans())
def test_prop_zero_maps_exactly(a, b, bits, symmetric):
    scale, zp, g = qmath.activation_qparams(min(a, b), max(a, b), bits, symmetric)
    assert isinstance(zp, int)
    q = qmath.quantize(np.array([0.0, -0.0]), scale, zp, g)
    assert q.tolist() == [zp, zp]
    assert qmath.fake_quantize(np.array([0.0]), scale, zp, g)[0] == 0.0


@settings(max_examples=200, deadline=None)
@given(
    a=finite,
    b=finite,
    bits=BITS,
    symmetric=st.booleans(),
    steps=st.lists(st.floats(1.0, 1e6), min_size=1, max_size=10),
)
def test_prop_outside_values_clip_to_grid_ends(a, b, bits, symmetric, steps):
    scale, zp, g = qmath.activation_qparams(min(a, b), max(a, b), bits, symmetric)
    qmin, qmax = ref_grid(bits, symmetric)
    top = (qmax - zp) * scale
    bottom = (qmin - zp) * scale
    d = np.array(steps) * scale
    above = qmath.fake_quantize(top + d, scale, zp, g)
    below = qmath.fake_quantize(bottom - d, scale, zp, g)
    np.testing.assert_array_equal(above, np.float32(top))
    np.testing.assert_array_equal(below, np.float32(bottom))


@settings(max_examples=200, deadline=None)
@given(
    a=finite,
    b=finite,
    bits=BITS,
    symmetric=st.booleans(),
    xs=st.lists(
        st.floats(-3e38, 3e38, allow_nan=False, allow_infinity=False), min_size=1, max_size=30
    ),
)
def test_prop_codes_within_grid(a, b, bits, symmetric, xs):
    scale, zp, g = qmath.activation_qparams(min(a, b), max(a, b), bits, symmetric)
    qmin, qmax = ref_grid(bits, symmetric)
    q = qmath.quantize(np.array(xs, np.float32), scale, zp, g)
    assert q.min() >= qmin and q.max() <= qmax
    np.testing.assert_array_equal(q, ref_quantize(np.array(xs, np.float32), scale, zp, qmin, qmax))


def test_fit_per_tensor_scale_covers_every_channel_bias():
    """A per-tensor weight scale widened for a bias must fit the largest channel's bias."""
    bias = np.array([1.0, 1e6, 10.0])
    s = qmath.fit_weight_scale_for_bias(bias, 1e-3, np.float32(1e-9))
    assert np.size(s) == 1
    q, _, _ = qmath.bias_qparams(bias, 1e-3, np.full(3, s, np.float32))
    assert np.all(np.abs(q.astype(np.float64)) < 2**31 - 1)
    np.testing.assert_allclose(q * (1e-3 * float(s)), bias, rtol=1e-6, atol=1e-3 * float(s))


def test_snap_range_rounds_outward_to_12_significant_bits():
    lo, hi = qmath.snap_range(-3.5484097, 3.7513002)
    assert lo <= -3.5484097 and hi >= 3.7513002
    assert (hi - 3.7513002) / 3.7513002 <= 2**-11 and (-3.5484097 - lo) / 3.5484097 <= 2**-11
    assert qmath.snap_range(lo, hi) == (lo, hi)  # already on the grid: unchanged
    m, _ = __import__("math").frexp(hi)
    assert (m * 2**12) == int(m * 2**12)  # 12 significant bits
    assert qmath.snap_range(0.0, 0.0) == (0.0, 0.0)
    # float noise in the last bits (another CPU's sum order) gives the same range
    assert qmath.snap_range(-1.2345678, 2.3456789) == qmath.snap_range(
        -1.2345678 * (1 + 1e-7), 2.3456789 * (1 - 1e-7)
    )


def test_fake_quantize_weight_is_per_channel_symmetric_narrow():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((5, 7)).astype(np.float32)
    for axis, bits in ((1, 8), (0, 4), (None, 8)):
        qmax = 2 ** (bits - 1) - 1
        amax = np.abs(w).max() if axis is None else np.abs(w).max(axis=1 - axis, keepdims=True)
        s = (amax / qmax).astype(np.float32).astype(np.float64)
        want = (np.clip(np.rint(w / s), -qmax, qmax) * s).astype(np.float32)
        np.testing.assert_array_equal(qmath.fake_quantize_weight(w, bits, axis), want)


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("axis", [None, 0, 1])
def test_fake_quantize_is_the_reference_round_trip_bit_for_bit(axis, overwrite):
    """The fused fake_quantize (one float64 buffer, optionally the caller's) gives the float32
    values of the reference quantize -> dequantize, signed zeros and clipped values included,
    and leaves its input alone unless asked to overwrite a float64 one."""
    rng = np.random.default_rng(11)
    for bits, signed, narrow in (
        (8, False, False),
        (8, True, True),
        (4, True, False),
        (16, True, False),
    ):
        qmin, qmax = ref_grid(bits, signed, narrow)
        x = rng.standard_normal((9, 6)) * 40
        x[0, 0], x[1, 1], x[2, 2] = -0.0, -1e-9, 1e9  # a negative zero, -0 after rounding, a clip
        n = 1 if axis is None else x.shape[axis]
        scale = rng.uniform(0.01, 1.0, n).astype(np.float32)
        zp = rng.integers(qmin, qmax + 1, n)
        shape = [1, 1] if axis is None else [-1 if a == axis else 1 for a in range(2)]
        s64, z64 = scale.astype(np.float64).reshape(shape), zp.astype(np.float64).reshape(shape)
        for z in (zp, np.zeros_like(zp)):
            zz = z64 if z is zp else np.zeros_like(z64)
            want = ref_dequantize(ref_quantize(x, s64, zz, qmin, qmax), s64, zz).astype(np.float32)
            arg = x.copy()
            got = qmath.fake_quantize(
                arg,
                scale[0] if axis is None else scale,
                z[0] if axis is None else z,
                qmath.grid(bits, signed, narrow),
                axis,
                overwrite=overwrite,
            )
            assert got.dtype == np.float32 and got.tobytes() == want.tobytes()
            if not overwrite:
                assert arg.tobytes() == x.tobytes()
