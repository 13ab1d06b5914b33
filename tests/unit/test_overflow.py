"""amq.quant.overflow: the numpy model of onnxruntime's AVX2 int16 pair sums (PITFALLS 9).

Expected values come from hand arithmetic and from a brute-force reference written plainly here
(every output position, every pair, no pruning, no chunking). The last test runs small QDQ
models in onnxruntime on a CPU without VNNI (qemu-x86_64 -cpu Haswell on a VNNI host) and
compares the real kernels with the emulation; bench/kernel_pairs.py is the full probe.
"""

from __future__ import annotations

import itertools
import math
import platform
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amq.quant import overflow
from amq.quant.conv_geometry import ConvGeometry
from amq.quant.overflow import Saturation

# ---------------------------------------------------------------------------------------------
# Brute-force reference


def ref_patch_order(cg: int, kshape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The kernel's reduction order: kernel position (row-major), then channel fastest."""
    return [(c, *pos) for pos in itertools.product(*(range(k) for k in kshape)) for c in range(cg)]


def ref_pair_sums(a: list[int], w: list[int]) -> tuple[int, int, bool]:
    """Kernel and exact raw sums of one dot product: adjacent pairs clipped to int16."""
    prods = [
        int(x) * (float(y) if isinstance(y, float) else int(y)) for x, y in zip(a, w, strict=True)
    ]
    prods += [0]
    pairs = [prods[i] + prods[i + 1] for i in range(0, len(a), 2)]
    clipped = [min(max(p, -32768), 32767) for p in pairs]
    return sum(clipped), sum(prods), clipped != pairs


def ref_conv(x, zp, w, group, strides, pads, dil, signed=False):
    """Kernel accumulators, exact accumulators and saturated flags, one output at a time."""
    shift = 128 if signed else 0
    x, zp = np.asarray(x, np.int64) + shift, zp + shift
    n, _, *size = x.shape
    cout, cg, *kshape = w.shape
    nd = len(kshape)
    xp = np.pad(
        x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)], constant_values=zp
    )
    out = [
        (size[i] + pads[i] + pads[i + nd] - dil[i] * (kshape[i] - 1) - 1) // strides[i] + 1
        for i in range(nd)
    ]
    dt = np.float64 if np.asarray(w).dtype.kind == "f" else np.int64  # the guard's weights: floats
    kern, exact = np.zeros((n, cout, *out), dt), np.zeros((n, cout, *out), dt)
    sat = np.zeros((n, cout, *out), bool)
    order = ref_patch_order(cg, tuple(kshape))
    depthwise = group > 1 and cg == 1 and cout == group
    for b, oc, *o in itertools.product(range(n), range(cout), *(range(k) for k in out)):
        g = oc // (cout // group)
        a = [
            xp[(b, g * cg + c, *(o[i] * strides[i] + p[i] * dil[i] for i in range(nd)))]
            for c, *p in order
        ]
        wv = [w[(oc, c, *p)] for c, *p in order]
        k, e, s = ref_pair_sums(a, wv)
        if depthwise:
            k, s = e, False
        kern[(b, oc, *o)] = k - zp * sum(wv)
        exact[(b, oc, *o)] = e - zp * sum(wv)
        sat[(b, oc, *o)] = s
    return kern, exact, sat


def ref_matmul(a, zp, w, signed=False):
    shift = 128 if signed else 0
    a2 = np.asarray(a, np.int64).reshape(-1, np.shape(a)[-1]) + shift
    zp = zp + shift
    dt = np.float64 if np.asarray(w).dtype.kind == "f" else np.int64  # the guard's weights: floats
    kern = np.zeros((a2.shape[0], w.shape[1]), dt)
    exact, sat = np.zeros_like(kern), np.zeros(kern.shape, bool)
    for m, j in itertools.product(range(a2.shape[0]), range(w.shape[1])):
        k, e, s = ref_pair_sums(list(a2[m]), list(w[:, j]))
        kern[m, j], exact[m, j], sat[m, j] = k - zp * w[:, j].sum(), e - zp * w[:, j].sum(), s
    shape = np.shape(a)[:-1] + (w.shape[1],)
    return kern.reshape(shape), exact.reshape(shape), sat.reshape(shape)


def pair_safe_ratio(v: list[float]) -> float:
    """For one output channel's weights in kernel order: how much its scale must widen so that
    every same-signed pair sums to at most 127 (then at most 128 after rounding)."""
    v = list(v) + [0] * (len(v) % 2)
    need = 0.0
    for i in range(0, len(v), 2):
        pos = max(v[i], 0) + max(v[i + 1], 0)
        neg = max(-v[i], 0) + max(-v[i + 1], 0)
        need = max(need, pos, neg)
    return need / 127 if need > 128 else 1.0  # codes summing to <= 128 are already safe


def guard_weights(w: np.ndarray) -> np.ndarray:
    """The 8-bit codes re-rounded on each channel's pair-safe scale, in 8-bit code units (a Conv
    weight [Cout, Cg, *k] reduces in kernel order: positions, then channels fastest)."""
    w = np.asarray(w, dtype=np.float64)
    out = np.empty_like(w)
    if w.ndim == 2:  # [K, N]
        for j in range(w.shape[1]):
            r = pair_safe_ratio(list(w[:, j]))
            out[:, j] = r * np.rint(w[:, j] / r)
        return out
    for o in range(w.shape[0]):
        r = pair_safe_ratio(list(np.moveaxis(w[o], 0, -1).reshape(-1)))
        out[o] = r * np.rint(w[o] / r)
    return out


def ref_saturation(kern, exact, sat, scale, guard_exact=None) -> Saturation:
    guard = 0.0 if guard_exact is None else float(np.sum(((guard_exact - exact) * scale) ** 2))
    return Saturation(
        outputs=kern.size,
        saturated=int(sat.sum()),
        err_energy=float(np.sum(((kern - exact) * scale) ** 2)),
        signal_energy=float(np.sum((exact * scale) ** 2)),
        guard_err_energy=guard,
    )


def assert_same(got: Saturation, want: Saturation) -> None:
    assert (got.outputs, got.saturated) == (want.outputs, want.saturated)
    assert got.err_energy == pytest.approx(want.err_energy, rel=1e-9, abs=1e-12)
    assert got.signal_energy == pytest.approx(want.signal_energy, rel=1e-9, abs=1e-12)
    # the guard's weights are fractional codes, summed in float32 BLAS
    assert got.guard_err_energy == pytest.approx(want.guard_err_energy, rel=1e-5, abs=1e-12)


def large_weights(rng, shape) -> np.ndarray:
    """Many same-signed pairs of large magnitude, and some small and zero weights."""
    w = rng.integers(-127, 128, size=shape)
    big = rng.random(shape) < 0.6
    return np.where(big, np.sign(w) * rng.integers(90, 128, size=shape), w)


# ---------------------------------------------------------------------------------------------
# Hand-computed pair sums


def test_matmul_hand_pairs():
    a = np.array([[255, 255, 255, 0, 200]])  # K = 5: pairs (0,1) (2,3), element 4 alone
    w = np.array(
        [
            [127, -128, 127],
            [127, -128, -128],  # column 2: opposite signs, 255*127 - 255*128 = -255
            [-128, 0, 0],
            [-128, 0, 0],
            [100, 0, 127],  # alone: 200*127 = 25400, fits
        ]
    )
    # column 0: 255*127 + 255*127 = 64770 -> 32767; 255*-128 + 0 = -32640; 200*100 = 20000
    # column 1: 255*-128 * 2 = -65280 -> -32768
    acc = overflow.matmul_accumulators(a, 0, w)
    assert acc.tolist() == [[32767 - 32640 + 20000, -32768, -255 + 25400]]
    # a zero point of 10 is subtracted after the pairs: 10 x column sum
    acc10 = overflow.matmul_accumulators(a, 10, w)
    assert acc10.tolist() == [[20127 - 10 * 98, -32768 - 10 * -256, 25145 - 10 * 126]]
    sat = overflow.matmul_saturation(a, 0, w, np.array([0.25, 0.5, 1.0]), 0.5)
    assert (sat.outputs, sat.saturated) == (3, 2)
    err0, err1 = (32767 - 64770) * 0.5 * 0.25, (-32768 + 65280) * 0.5 * 0.5
    assert sat.err_energy == pytest.approx(err0**2 + err1**2)
    exact = np.array([64770 - 32640 + 20000, -65280, 25145]) * 0.5 * np.array([0.25, 0.5, 1.0])
    assert sat.signal_energy == pytest.approx(float(np.sum(exact**2)))


def test_conv_hand_kernel_order():
    """Cin=2, kernel 1x2: the reduction is (p0 c0, p0 c1, p1 c0, p1 c1), channel fastest."""
    x = np.array([[[[255, 0]], [[255, 255]]]])  # [1, 2, 1, 2]: c0 = (255, 0), c1 = (255, 255)
    w = np.array([[[[127, 100]], [[127, 100]]]])  # [1, 2, 1, 2]
    # kernel order: a = (255, 255, 0, 255), w = (127, 127, 100, 100)
    # pairs: 255*127 + 255*127 = 64770 -> 32767; 0*100 + 255*100 = 25500
    acc = overflow.conv_accumulators(x, 0, w)
    assert acc.tolist() == [[[[32767 + 25500]]]]  # (ONNX order (c, kw) would give 65152)


def test_conv_pads_with_the_zero_point_code():
    """1x1 input of code 0, zero point 200, 1x3 kernel, pad 1 each side: the padded positions
    hold code 200, the products use raw codes and 200 x sum(w) is subtracted afterwards."""
    x = np.zeros((1, 1, 1, 1), dtype=np.int64)
    w = np.array([[[[127, 127, 127]]]])
    acc = overflow.conv_accumulators(x, 200, w, pads=(0, 1, 0, 1))
    # kernel order (200, 0, 200): pairs 200*127 + 0 = 25400 and 200*127 = 25400 alone: no clip
    assert acc.tolist() == [[[[25400 + 25400 - 200 * 381]]]]
    w2 = np.array([[[[127, 127, 0]], [[127, 0, 0]]]])  # Cin = 2: (200, 0 | 200, 0 | 200, 200)
    x2 = np.zeros((1, 2, 1, 1), dtype=np.int64)
    acc2 = overflow.conv_accumulators(x2, 200, w2, pads=(0, 1, 0, 1))
    # pairs: 200*127 + 200*127 = 50800 -> 32767 (padded p0, both channels); 0*127 + 0 = 0; 0
    assert acc2.tolist() == [[[[32767 - 200 * 381]]]]


def test_signed_activations_run_as_uint8_plus_128():
    a = np.array([[127, 127, -128, -128]], dtype=np.int64)  # kernel codes 255, 255, 0, 0
    w = np.array([[127], [127], [127], [127]])
    acc = overflow.matmul_accumulators(a, 0, w, signed=True)
    # raw: 32767 (clipped 64770) + 0; zero point 0 + 128: minus 128 x 508
    assert acc.tolist() == [[32767 - 128 * 508]]
    assert overflow.matmul_saturation(a, 0, w, 1.0, 1.0, signed=True).saturated == 1


def test_conv_geometry_keywords_are_checked():
    """The Conv geometry travels as ConvGeometry's fields: a misspelt one is an error, and
    unset ones are ONNX's defaults."""
    x, w = np.full((1, 2, 4, 4), 3), np.full((2, 2, 3, 3), 5)
    with pytest.raises(TypeError, match="stride"):
        overflow.conv_saturation(x, 0, w, 1.0, 1.0, stride=(2, 2))
    assert ConvGeometry().full(w) == (1, (1, 1), (0, 0, 0, 0), (1, 1))
    same = overflow.conv_accumulators(x, 0, w, group=1, strides=(1, 1), dilations=(1, 1))
    np.testing.assert_array_equal(overflow.conv_accumulators(x, 0, w), same)


def test_depthwise_and_uint8_weights_never_saturate():
    x = np.full((1, 4, 3, 3), 255)
    w = np.full((4, 1, 3, 3), 127)
    dw = overflow.conv_saturation(x, 0, w, 1.0, 1.0, group=4)
    assert (dw.outputs, dw.saturated, dw.err_energy) == (4, 0, 0.0)
    assert dw.signal_energy == pytest.approx(4 * (9 * 255 * 127) ** 2)
    mult = overflow.conv_saturation(x, 0, np.full((8, 1, 3, 3), 127), 1.0, 1.0, group=4)
    assert mult.saturated == 8  # depthwise with a channel multiplier: a GEMM with pairs
    u8 = overflow.matmul_saturation(
        np.full((2, 4), 255), 0, np.full((4, 3), 127), 1.0, 1.0, weights_unsigned=True
    )
    assert (u8.outputs, u8.saturated, u8.err_energy) == (6, 0, 0.0)


def test_saturation_accumulates_and_reports():
    s = Saturation()
    assert (s.fraction, s.sqnr_db) == (0.0, math.inf)
    s.update(Saturation(outputs=10, saturated=1, err_energy=1.0, signal_energy=1000.0))
    s.update(Saturation(10, 0, err_energy=0.0, signal_energy=0.0, guard_err_energy=0.5))
    assert (s.outputs, s.saturated, s.fraction, s.guard_err_energy) == (20, 1, 0.05, 0.5)
    assert s.sqnr_db == pytest.approx(30.0)
    assert overflow.needs_guard(s)  # saturation loses 1.0, the guard would lose 0.5
    s.update(Saturation(guard_err_energy=1.0))
    assert not overflow.needs_guard(s)
    assert not overflow.needs_guard(Saturation(outputs=5, signal_energy=1.0))


def test_channels_at_risk_hand():
    w = np.array([[127, 127, -128, 63, 2], [127, -128, -128, 63, 127]])  # [K=2, N=5]
    # pairs (0,1): col0 255*254 yes; col1 no (opposite); col2 -256*255 yes; col3 126*255 = 32130
    # no (a pair-safe channel's bound); col4 255*129 = 32895 yes
    assert overflow.channels_at_risk(w).tolist() == [True, False, True, False, True]
    assert overflow.channels_at_risk(w, hi=200).tolist() == [True, False, True, False, False]
    # signed codes in [-128, 127] run as [0, 255]; [-128, 0] as [0, 128]
    assert overflow.channels_at_risk(w, lo=-128, hi=0, signed=True).tolist() == [False] * 5
    assert not overflow.channels_at_risk(np.full((8, 1, 3, 3), 127), group=8).any()  # depthwise


# ---------------------------------------------------------------------------------------------
# Against the brute-force reference

CONV_CASES = [
    # cin, cout, kernel, group, strides, pads, dilations, input spatial, zero point
    (3, 4, (3, 3), 1, (1, 1), (1, 1, 1, 1), (1, 1), (5, 6), 0),
    (5, 3, (1, 1), 1, (1, 1), (0, 0, 0, 0), (1, 1), (3, 3), 17),
    (4, 6, (3, 3), 1, (2, 2), (0, 1, 1, 0), (1, 1), (7, 6), 200),
    (3, 4, (3, 2), 1, (1, 2), (2, 1, 0, 2), (2, 1), (6, 7), 128),
    (6, 4, (3, 3), 2, (1, 1), (1, 1, 1, 1), (1, 1), (4, 4), 90),  # groups of 3 channels
    (4, 8, (3, 3), 4, (1, 1), (1, 1, 1, 1), (1, 1), (4, 4), 30),  # channel multiplier 2
    (4, 4, (3, 3), 4, (2, 1), (1, 1, 1, 1), (1, 1), (5, 4), 250),  # depthwise
    (3, 5, (5,), 1, (2,), (2, 1), (1,), (9,), 5),  # 1-D
    (2, 3, (2, 2, 2), 1, (1, 1, 1), (1, 0, 0, 0, 1, 0), (1, 1, 1), (3, 3, 2), 40),  # 3-D
]


@pytest.mark.parametrize(
    "case", CONV_CASES, ids=lambda c: f"cin{c[0]}-g{c[3]}-k{'x'.join(map(str, c[2]))}"
)
@pytest.mark.parametrize("signed", [False, True])
def test_conv_matches_reference(case, signed):
    cin, cout, k, group, strides, pads, dil, size, zp = case
    rng = np.random.default_rng(abs(hash(case)) % 2**32)
    lo, hi, zp = (-128, 127, zp - 128) if signed else (0, 255, zp)
    x = rng.integers(lo, hi + 1, size=(2, cin, *size))
    w = large_weights(rng, (cout, cin // group, *k))
    ws, xs = rng.uniform(0.001, 0.01, size=cout), 0.05
    geo = dict(group=group, strides=strides, pads=pads, dilations=dil)
    kern, exact, sat = ref_conv(x, zp, w, group, strides, pads, dil, signed)
    got = overflow.conv_accumulators(x, zp, w, signed=signed, **geo)
    np.testing.assert_array_equal(got, kern)
    scale = (ws * xs).reshape((1, cout) + (1,) * len(k))
    depthwise = group > 1 and cin == group and cout == group
    guard = (
        None
        if depthwise
        else ref_conv(x, zp, guard_weights(w), group, strides, pads, dil, signed)[1]
    )
    assert_same(
        overflow.conv_saturation(x, zp, w, ws, xs, signed=signed, **geo),
        ref_saturation(kern, exact, sat, scale, guard),
    )


@pytest.mark.parametrize(
    "shape,k,zp", [((4,), 7, 0), ((2, 3), 8, 40), ((1,), 37, 128), ((3, 2, 2), 1, 9)]
)
def test_matmul_matches_reference(shape, k, zp):
    rng = np.random.default_rng(k)
    a = rng.integers(0, 256, size=(*shape, k))
    w = large_weights(rng, (k, 5))
    ws = rng.uniform(0.001, 0.01, size=5)
    kern, exact, sat = ref_matmul(a, zp, w)
    np.testing.assert_array_equal(overflow.matmul_accumulators(a, zp, w), kern)
    guard = ref_matmul(a, zp, guard_weights(w))[1]
    want = ref_saturation(kern, exact, sat, ws * 0.02, guard)
    assert_same(overflow.matmul_saturation(a, zp, w, ws, 0.02), want)
    assert overflow.matmul_saturation(a, zp, w, 0.1, 0.02).outputs == kern.size  # scalar scale


@pytest.mark.parametrize("signed", [False, True])
def test_a_wide_layers_energies_come_from_its_gram_matrix(monkeypatch, signed):
    """Where K < N (PP-OCRv6 rec's [120, 18710] head) the output and guard energies are sums of
    a G a^T with G = W diag(s^2) W^T [K, K], not of the [m, N] product: the reference's values,
    for a MatMul and a Conv whose groups each have more columns than their K."""
    grams = []
    real = overflow._gram
    monkeypatch.setattr(overflow, "_gram", lambda m, s2: grams.append(m.shape) or real(m, s2))
    rng = np.random.default_rng(5)
    lo, hi, zp = (-128, 127, -90) if signed else (0, 255, 38)
    a = rng.integers(lo, hi + 1, size=(3, 7, 6))
    w = large_weights(rng, (6, 70))
    ws = rng.uniform(0.001, 0.01, size=70)
    kern, exact, sat = ref_matmul(a, zp, w, signed)
    guard = ref_matmul(a, zp, guard_weights(w), signed)[1]
    got = overflow.matmul_saturation(a, zp, w, ws, 0.02, signed=signed)
    assert_same(got, ref_saturation(kern, exact, sat, ws * 0.02, guard))
    assert got.saturated > 0 and grams == [(6, 70), (6, 70)]  # the weights' and the guard's
    grams.clear()
    x = rng.integers(lo, hi + 1, size=(2, 4, 5, 5))
    wc = large_weights(rng, (40, 2, 1, 2))  # 2 groups: K = 2 x 1 x 2 = 4, 20 columns each
    wsc = rng.uniform(0.001, 0.01, size=40)
    geo = dict(group=2, strides=(1, 1), pads=(0, 1, 0, 0), dilations=(1, 1))
    kern, exact, sat = ref_conv(x, zp, wc, 2, (1, 1), (0, 1, 0, 0), (1, 1), signed)
    guard = ref_conv(x, zp, guard_weights(wc), 2, (1, 1), (0, 1, 0, 0), (1, 1), signed)[1]
    got = overflow.conv_saturation(x, zp, wc, wsc, 0.05, signed=signed, **geo)
    assert_same(got, ref_saturation(kern, exact, sat, (wsc * 0.05).reshape(1, 40, 1, 1), guard))
    assert len(grams) == 4


def test_pairs_out_of_reach_of_a_chunks_codes_are_skipped_with_the_same_result(monkeypatch):
    """Codes of one chunk in [0, 255] make every same-signed large pair a candidate; a chunk
    whose codes stay under 100 on half the channels reaches only the pairs of the other half:
    fewer pairs are computed, and the result is the reference's."""
    rng = np.random.default_rng(11)
    w = large_weights(rng, (16, 40))
    a = rng.integers(0, 256, size=(30, 16))
    a[:, ::2] = rng.integers(0, 100, size=(30, 8))  # each pair's first element small
    a[0, 0], a[1, 1] = 255, 0  # the grid's range, [0, 255], as on the full grid
    kern, exact, sat = ref_matmul(a, 3, w)
    guard = ref_matmul(a, 3, guard_weights(w))[1]
    seen: list = []
    real = overflow._Group._reachable

    def spy(self, codes):
        out = real(self, codes)
        seen.append((self.k0.size, out[0].size))
        return out

    monkeypatch.setattr(overflow._Group, "_reachable", spy)
    got = overflow.matmul_saturation(a, 3, w, 0.01, 0.02)
    assert_same(got, ref_saturation(kern, exact, sat, np.full(40, 0.01 * 0.02), guard))
    assert got.saturated > 0 and all(0 < kept < total for total, kept in seen)
    seen.clear()
    small = np.minimum(a, 99)  # 2 x 99 x 127 < 32767: no pair reachable, nothing computed
    assert overflow.matmul_saturation(small, 3, w, 0.01, 0.02).saturated == 0
    assert seen and all(kept == 0 for _, kept in seen)


def test_chunking_does_not_change_results(monkeypatch):
    """Tiny chunks: several images per chunk, then rows of one image, then one row."""
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, size=(3, 4, 6, 5))
    w = large_weights(rng, (6, 4, 3, 3))
    geo = dict(strides=(1, 1), pads=(1, 1, 1, 1))
    want = overflow.conv_accumulators(x, 7, w, **geo)
    want_sat = overflow.conv_saturation(x, 7, w, 0.01, 0.1, **geo)
    for chunk, segment in ((36 * 40, 1000), (36 * 9, 5), (36 * 2, 2), (1, 1)):
        monkeypatch.setattr(overflow, "CHUNK", chunk)
        monkeypatch.setattr(overflow, "SEGMENT", segment)
        np.testing.assert_array_equal(overflow.conv_accumulators(x, 7, w, **geo), want)
        assert_same(overflow.conv_saturation(x, 7, w, 0.01, 0.1, **geo), want_sat)
    a = rng.integers(0, 256, size=(10, 9))
    wm = large_weights(rng, (9, 4))
    np.testing.assert_array_equal(overflow.matmul_accumulators(a, 3, wm), ref_matmul(a, 3, wm)[0])


def test_weights_kept_across_calls_give_each_calls_own_results():
    """A WeightsCache kept across calls of one layer (prepared for the widest code range seen)
    gives what each call gives on its own, whether the next call's codes lie inside the range
    prepared for or reach past it (the weights are prepared again, for both ranges)."""
    rng = np.random.default_rng(11)
    w = large_weights(rng, (6, 4, 3, 3))
    geo = dict(strides=(1, 1), pads=(1, 1, 1, 1), group=2)
    conv_cache, mm_cache = overflow.WeightsCache(), overflow.WeightsCache()
    wm = large_weights(rng, (16, 5))
    saturated = 0
    for lo, hi in ((100, 200), (120, 180), (0, 255), (30, 90)):
        x = rng.integers(lo, hi + 1, size=(2, 8, 5, 5))
        zp = (lo + hi) // 2
        kept = overflow.conv_saturation(x, zp, w, 0.01, 0.1, cache=conv_cache, **geo)
        assert_same(kept, overflow.conv_saturation(x, zp, w, 0.01, 0.1, **geo))
        saturated += kept.saturated
        assert conv_cache.lo <= x.min() and x.max() <= conv_cache.hi  # widened, never narrowed
        assert conv_cache.lo <= 100 and conv_cache.hi >= 200
        a = rng.integers(lo, hi + 1, size=(7, 16))
        kept = overflow.matmul_saturation(a, zp, wm, 0.02, 0.1, cache=mm_cache)
        assert_same(kept, overflow.matmul_saturation(a, zp, wm, 0.02, 0.1))
        saturated += kept.saturated
    assert saturated > 0  # the wide calls saturate: the candidate pairs matter


# ---------------------------------------------------------------------------------------------
# The data-free bound never misses what the emulation finds


@st.composite
def conv_problems(draw):
    cg = draw(st.integers(1, 4))
    group = draw(st.integers(1, 3))
    cout = group * draw(st.integers(1, 3))
    k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    pad = draw(st.integers(0, 1))
    size = (draw(st.integers(k[0], 5)), draw(st.integers(k[1], 5)))
    seed = draw(st.integers(0, 2**32 - 1))
    lo = draw(st.integers(0, 255))
    hi = draw(st.integers(lo, 255))
    zp = draw(st.integers(lo, hi))
    return cg * group, cout, k, group, pad, size, seed, lo, hi, zp


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_problems())
def test_bound_never_misses_a_saturation(problem):
    cin, cout, k, group, pad, size, seed, lo, hi, zp = problem
    rng = np.random.default_rng(seed)
    x = rng.integers(lo, hi + 1, size=(2, cin, *size))
    w = large_weights(rng, (cout, cin // group, *k))
    acc = overflow.conv_accumulators(x, zp, w, group=group, pads=(pad,) * 4)
    exact = overflow.conv_accumulators(
        x, zp, w, group=group, pads=(pad,) * 4, weights_unsigned=True
    )
    hit = (acc != exact).any(axis=(0, 2, 3))
    risk = overflow.channels_at_risk(w, lo=lo, hi=hi, group=group)
    assert not (hit & ~risk).any()
    assert overflow.channels_at_risk(w, group=group)[risk].all()  # the full range covers [lo, hi]
    assert not overflow.channels_at_risk(np.clip(w, -63, 63), group=group).any()  # 7-bit grid


# ---------------------------------------------------------------------------------------------
# The real kernels: onnxruntime on a CPU without VNNI

CHILD = """
import sys, numpy as np, onnxruntime as ort
so = ort.SessionOptions()
so.log_severity_level = 3
outs = {}
for name in sys.argv[2:]:
    data = np.load(f"{sys.argv[1]}/{name}.npz")
    sess = ort.InferenceSession(f"{sys.argv[1]}/{name}.onnx", so, providers=["CPUExecutionProvider"])
    outs[name] = sess.run(None, {"x": data["x"]})[0]
np.savez(f"{sys.argv[1]}/out.npz", **outs)
"""


def avx2_command() -> list[str]:
    """How to run Python on an x86 CPU with AVX2 but no VNNI, or skip."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(
            f"host is {platform.machine()}: onnxruntime's x86 int16 pair kernels do not run"
        )
    try:
        flags = set(
            " ".join(
                line
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("flags")
            ).split()
        )
    except OSError:
        pytest.skip("no /proc/cpuinfo to tell whether this CPU has VNNI")
    if flags & {"avx512_vnni", "avx_vnni"}:
        qemu = shutil.which("qemu-x86_64")
        if qemu is None:
            pytest.skip(
                "host CPU has VNNI and qemu-x86_64 (to emulate an AVX2-only CPU) is not installed"
            )
        return [qemu, "-cpu", "Haswell", sys.executable]
    if "avx2" not in flags:
        pytest.skip("host CPU has no AVX2: onnxruntime uses other kernels")
    return [sys.executable]


def qdq_model(op: str, w: np.ndarray, x_shape, zp: int, y_scale: float, pads=None):
    """input -> Q -> DQ -> Conv/MatMul(DQ(int8 weights, per channel)) -> Q -> DQ -> output."""
    from onnx import TensorProto, helper, numpy_helper

    cout = w.shape[0] if op == "Conv" else w.shape[1]
    inits = [
        numpy_helper.from_array(np.float32(1 / 64), "sx"),
        numpy_helper.from_array(np.uint8(zp), "zx"),
        numpy_helper.from_array(np.float32(y_scale), "sy"),
        numpy_helper.from_array(np.uint8(128), "zy"),
        numpy_helper.from_array(w.astype(np.int8), "wq"),
        numpy_helper.from_array(np.full(cout, 1 / 128, np.float32), "sw"),
        numpy_helper.from_array(np.zeros(cout, np.int8), "zw"),
    ]
    attrs = {"pads": list(pads)} if pads else {}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
        helper.make_node(
            "DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=0 if op == "Conv" else 1
        ),
        helper.make_node(op, ["xd", "wd"], ["y"], **attrs),
        helper.make_node("QuantizeLinear", ["y", "sy", "zy"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def requantize(acc: np.ndarray, y_scale: float) -> np.ndarray:
    """MLAS: float32 accumulator x float32 (s_x s_w / s_y), round half even, + 128, clip."""
    mult = np.float32(np.float32(1 / 64) * np.float32(1 / 128) / np.float32(y_scale))
    return np.clip(np.rint(acc.astype(np.float32) * mult) + 128, 0, 255).astype(np.int64)


def test_emulation_matches_the_avx2_kernels(tmp_path):
    cmd = avx2_command()
    rng = np.random.default_rng(0)
    cases = {
        "conv": ("Conv", large_weights(rng, (16, 3, 3, 3)), (2, 3, 6, 6), 60, (1, 1, 1, 1)),
        "convsym": ("Conv", large_weights(rng, (16, 8, 3, 3)), (1, 8, 5, 5), 0, (1, 1, 1, 1)),
        "matmul": ("MatMul", large_weights(rng, (37, 16)), (2, 3, 37), 100, None),
    }
    expected = {}
    for name, (op, w, x_shape, zp, pads) in cases.items():
        x = rng.integers(0, 256, size=x_shape)
        if op == "Conv":
            acc = overflow.conv_accumulators(x, zp, w, pads=pads)
            _, exact, sat = ref_conv(x, zp, w, 1, (1, 1), pads, (1, 1))
        else:
            acc = overflow.matmul_accumulators(x, zp, w)
            _, exact, sat = ref_matmul(x, zp, w)
        y_scale = float(np.abs(exact).max()) / 64 / 128 / 120
        model = qdq_model(op, w, x_shape, zp, y_scale, pads)
        (tmp_path / f"{name}.onnx").write_bytes(model.SerializeToString())
        np.savez(tmp_path / f"{name}.npz", x=((x - zp) / 64).astype(np.float32))
        expected[name] = (requantize(acc, y_scale), requantize(exact, y_scale), sat, y_scale)
    proc = subprocess.run(
        [*cmd, "-c", CHILD, str(tmp_path), *cases], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = np.load(tmp_path / "out.npz")
    for name, (want, exact, sat, y_scale) in expected.items():
        runtime = np.rint(got[name].astype(np.float64) / y_scale).astype(np.int64) + 128
        differs = runtime != exact  # where the kernel lost something visible after requantizing
        assert differs.sum() > 0, f"{name}: nothing saturated: the probe proves nothing"
        np.testing.assert_array_equal(runtime, want, err_msg=name)  # the emulation, exactly
        assert not (differs & ~sat).any(), name  # every visible loss is a saturated output


# ---------------------------------------------------------------------------------------------
# The guard: pair-safe scales


@pytest.mark.parametrize(
    "shape,axis", [((6, 4, 3, 3), 0), ((3, 5, 1, 1), 0), ((37, 8), 1), ((8, 37), 0)]
)
def test_pair_safe_scale_never_saturates_and_widens_only_channels_at_risk(shape, axis):
    rng = np.random.default_rng(sum(shape))
    w = rng.standard_normal(shape)
    w[..., 0] = np.abs(w[..., 0]) * 5  # same-signed large values: pairs at risk
    base = np.abs(w).max(axis=tuple(i for i in range(w.ndim) if i != axis)) / 127
    scale = overflow.pair_safe_scale(w, base, axis)
    assert np.all(scale >= base.astype(np.float32))
    bshape = [1] * w.ndim
    bshape[axis] = -1
    q = np.rint(w / scale.reshape(bshape)).astype(np.int64)
    # worst case data: every code 255 (or 0): no pair may saturate
    wq = q if w.ndim > 2 else (q if axis == 1 else q.T)
    risky = overflow.channels_at_risk(wq)
    assert not risky.any()
    # a channel whose 8-bit codes are already pair-safe keeps its scale
    q8 = np.rint(w / base.reshape(bshape)).astype(np.int64)
    safe8 = ~overflow.channels_at_risk(q8 if w.ndim > 2 else (q8 if axis == 1 else q8.T))
    np.testing.assert_array_equal(scale[safe8], base.astype(np.float32)[safe8])
    assert (scale <= 2 * base.astype(np.float32) + 1e-12).all()  # never worse than a 7-bit grid


def test_pair_safe_scale_hand():
    # one channel, K = 3 in kernel order: pairs (1.0, 0.5) and (0.9, 0): need 1.5 -> scale 1.5/127
    w = np.array([[1.0], [0.5], [0.9]])  # MatMul [K, N]
    got = overflow.pair_safe_scale(w, np.array([1.0 / 127]), channel_axis=1)
    assert got[0] == pytest.approx(1.5 / 127, rel=1e-6)
    # opposite signs never need it: (1.0, -1.0) stays at max|w| / 127
    w2 = np.array([[1.0], [-1.0]])
    assert overflow.pair_safe_scale(w2, np.array([1.0 / 127]), 1)[0] == pytest.approx(1 / 127)
    # per tensor: the widest channel's need
    assert overflow.pair_safe_scale(np.hstack([w, w2[[0, 1, 1]]]), 1.0 / 127, 1) == pytest.approx(
        1.5 / 127, rel=1e-6
    )


def test_pair_safe_scale_of_a_batched_matmul_weight():
    """[E, K, N] per channel on the last axis: each expert's pairs run along its own K, and one
    scale per channel must make every expert's pairs safe."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((3, 37, 8))
    w[1, :2, 5] = [4.0, 4.0]  # expert 1, channel 5: a large same-signed pair
    base = np.abs(w).max(axis=(0, 1)) / 127
    scale = overflow.pair_safe_scale(w, base, channel_axis=2)
    q = np.rint(w / scale)
    for e in range(3):
        assert not overflow.channels_at_risk(q[e].astype(np.int64)).any()
    assert scale[5] > base[5] and scale[5] == pytest.approx(8.0 / 127, rel=1e-6)
    untouched = [
        c
        for c in range(8)
        if not overflow.channels_at_risk(
            np.rint(w / base)[:, :, c].reshape(3, 37, 1).transpose(1, 0, 2).reshape(37, 3)
        ).any()
    ]
    np.testing.assert_array_equal(scale[untouched], base.astype(np.float32)[untouched])


def test_layers_no_code_can_saturate_are_off_without_reading_data(monkeypatch):
    """The overflow pass emulates only layers whose weight pairs some activation code of their
    grid can push out of int16 (channels_at_risk); the others are off, as the emulation would
    find them, and the summary's check of unguarded layers reads no data for them either. Two 1x1 Convs on the same input: one whose weight pairs have
    opposite signs (each same-signed pair sum <= 127: never saturates), one with same-signed
    large pairs (saturates on large codes)."""
    from onnx import TensorProto, helper, numpy_helper

    import amq
    from amq.calib import saturation

    r = np.random.default_rng(0)
    k = 16
    safe = np.tile([1.0, -1.0], k // 2)[None, :, None, None] * r.uniform(0.5, 1, (4, k, 1, 1))
    risky = r.uniform(0.5, 1.0, (4, k, 1, 1))  # all positive: pairs of ~127 + ~127 codes
    inits = [
        numpy_helper.from_array(a.astype(np.float32), n) for a, n in ((safe, "ws"), (risky, "wr"))
    ]
    nodes = [
        helper.make_node("Conv", ["x", "ws"], ["ys"], name="safe"),
        helper.make_node("Conv", ["x", "wr"], ["yr"], name="risky"),
    ]
    vi = helper.make_tensor_value_info
    g = helper.make_graph(
        nodes,
        "g",
        [vi("x", TensorProto.FLOAT, [1, k, 4, 4])],
        [vi("ys", TensorProto.FLOAT, None), vi("yr", TensorProto.FLOAT, None)],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    feeds = [{"x": r.uniform(0, 4, (1, k, 4, 4)).astype(np.float32)} for _ in range(8)]
    asked: list[str] = []
    run = saturation.SaturationPass._run

    def spy(self, plan, layers):
        asked.extend(lp.name for lp in layers)
        return run(self, plan, layers)

    monkeypatch.setattr(saturation.SaturationPass, "_run", spy)
    res = amq.quantize(m, feeds, cache_dir=None)
    assert set(asked) == {"risky"}
    assert res.plan.layers["safe"].overflow == "off"
    assert (
        res.plan.layers["risky"].overflow in ("guard", "off")
        and res.plan.layers["risky"].overflow_note
    )


def test_the_guard_holds_weight_codes_in_int16():
    """The overflow pass holds every candidate layer's codes at once: int16 where the grid fits
    (int64 held 4x a transformer's float weights), int32 for an unsigned 16-bit grid; the
    values are the plan's codes."""
    from amq.calib import saturation
    from amq.plan import TensorPlan
    from amq.quant.algorithms import adaround

    w = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    for bits, signed, dtype in ((8, True, np.int16), (16, True, np.int16), (16, False, np.int32)):
        tp = TensorPlan("w", "weight", bits, signed, True, axis=1, scale=[0.01] * 4)
        tp.zero_point = [0 if signed else 1 << (bits - 1)] * 4
        q, s = saturation._weight_codes(w, tp)
        assert q.dtype == dtype
        np.testing.assert_array_equal(q, adaround.codes(tp, w))
        np.testing.assert_array_equal(s, [0.01] * 4)


def test_a_matmul_is_emulated_until_its_rows_reach_enough_positions(monkeypatch, batches_read):
    """A layer stops being emulated once it has ENOUGH_POSITIONS output rows (times its N
    output columns): a MatMul [K, N] and a Gemm storing [N, K] (transB) with K = 8 N both stop
    after 1024 rows, 8 batches of 4 samples of 32 rows; counting K as the outputs made them read
    all 64 samples (a transformer's FFN output layers, the pass's longest). The model runs those
    8 batches and no more, and a layer's prepared weights, kept across its batches, are let go
    once it has read enough."""
    from onnx import TensorProto, helper, numpy_helper

    import amq
    from amq.calib import saturation

    r = np.random.default_rng(0)
    k, n = 64, 8
    w = r.uniform(0.5, 1.0, (k, n)).astype(np.float32)  # same-signed pairs: at risk
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y1"], name="mm"),
        helper.make_node("Gemm", ["x", "wt"], ["y2"], name="gemm", transB=1),
    ]
    vi = helper.make_tensor_value_info
    g = helper.make_graph(
        nodes,
        "g",
        [vi("x", TensorProto.FLOAT, ["rows", k])],
        [vi("y1", TensorProto.FLOAT, None), vi("y2", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w.T.copy(), "wt")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    feeds = [{"x": r.uniform(0, 4, (32, k)).astype(np.float32)} for _ in range(64)]
    seen: dict[str, list[int]] = {}
    caches: dict[str, list] = {}
    emulate = saturation.SaturationPass._emulate

    def spy(self, plan, lp, x, weights, cache):
        out = emulate(self, plan, lp, x, weights, cache)
        seen.setdefault(lp.name, []).append(out.outputs)
        caches.setdefault(lp.name, []).append((cache, cache.groups is not None))
        return out

    monkeypatch.setattr(saturation.SaturationPass, "_emulate", spy)
    runs = batches_read(saturation)
    amq.quantize(m, feeds, cache_dir=None)
    per_batch = 4 * 32 * n
    assert seen["mm"] == [per_batch] * 8 and seen["gemm"] == [per_batch] * 8
    assert len(runs) == 8  # no ninth batch run only to find that nothing is left to do
    assert saturation.ENOUGH_POSITIONS * n == 8 * per_batch
    for name in ("mm", "gemm"):
        assert all(held for _c, held in caches[name])  # kept from batch to batch ...
        assert caches[name][-1][0].groups is None  # ... and let go after the last


def _se_model(k: int = 16):
    """x -> GlobalAveragePool -> a 1x1 Conv with same-signed large weight pairs (at risk): a
    squeeze-and-excitation Conv, one output position a sample."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).uniform(0.5, 1.0, (4, k, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["p"], name="pool"),
        helper.make_node("Conv", ["p", "w"], ["y"], name="se"),
    ]
    vi = helper.make_tensor_value_info
    g = helper.make_graph(
        nodes,
        "g",
        [vi("x", TensorProto.FLOAT, ["n", k, 8, 8])],
        [vi("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _rows_model(k: int = 64, n: int = 8):
    """x [1, 32, K] a sample -> a MatMul [K, N] with same-signed large pairs: 32 output rows a
    sample, so the overflow pass reads 8 batches of 4 samples (1024 rows) of 64."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).uniform(0.5, 1.0, (k, n)).astype(np.float32)
    vi = helper.make_tensor_value_info
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [vi("x", TensorProto.FLOAT, ["n", 32, k])],
        [vi("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _map_model(c: int = 16):
    """x [1, 16, 96, 96] a sample (147456 values: over KEEP_VALUES) -> a 3x3 Conv (pads 1) with
    same-signed large pairs: its emulation reads 4 bands of one output row (1536 positions in
    a batch of 4), so the calibration pass keeps only the 12 input rows they read."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).uniform(0.5, 1.0, (4, c, 3, 3)).astype(np.float32)
    vi = helper.make_tensor_value_info
    g = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Conv", ["r", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
        ],
        "g",
        [vi("x", TensorProto.FLOAT, ["n", c, "h", 96])],
        [vi("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize(
    ("build", "shape", "samples", "layer", "outputs"),
    [
        (_se_model, (1, 16, 8, 8), 24, "se", 24 * 4),  # every sample, one position each
        (_rows_model, (1, 32, 64), 64, "mm", 8 * 4 * 32 * 8),  # 8 batches of 4 of the 64
        (_map_model, (1, 16, 96, 96), 8, "conv", 4 * 96 * 4 * 4),  # 4 bands of a row, batch 4
    ],
)
def test_layers_are_emulated_on_the_inputs_the_calibration_pass_kept(
    monkeypatch, build, shape, samples, layer, outputs
):
    """A layer that needs more than one batch of the overflow pass gets its input from the
    calibration pass, which runs the model on those samples anyway, cut into the overflow
    pass's batches: the pass runs no batch of the model for it, and measures what running the
    model gave (same saturation counts and energies, same model): an SE block's Conv (one
    output position a sample: every sample), a MatMul on 32 rows a sample (8 batches), and a
    Conv on a map too large to keep whole, of which it keeps the rows its bands read."""
    import amq
    from amq.calib import saturation

    r = np.random.default_rng(1)
    feeds = [{"x": r.uniform(0, 4, shape).astype(np.float32)} for _ in range(samples)]
    got: dict[str, list] = {}
    ran: list[list[str]] = []
    measure, run_data = saturation.SaturationPass.measure, saturation.SaturationPass._run_data

    def spy_measure(self, plan, layers):
        out = measure(self, plan, layers)
        got.setdefault(tag[0], []).append({k: vars(v) for k, v in out.items()})
        return out

    def spy_run(self, plan, layers, *a):
        ran.append([lp.name for lp in layers])
        return run_data(self, plan, layers, *a)

    sized: list[int] = []  # calls of the data pass's batch sizes (they read every sample)
    sizes = saturation.SaturationPass._sizes
    monkeypatch.setattr(saturation.SaturationPass, "measure", spy_measure)
    monkeypatch.setattr(saturation.SaturationPass, "_run_data", spy_run)
    monkeypatch.setattr(saturation.SaturationPass, "_sizes", lambda s: sized.append(1) or sizes(s))
    tag = ["kept"]
    kept = amq.quantize(build(), feeds, cache_dir=None)
    assert ran == [] and kept.plan.layers[layer].overflow_note
    tag[0] = "run"
    monkeypatch.setattr(saturation, "keep_bytes", lambda mb: 0)  # no room to keep anything
    assert sized
    sized.clear()
    again = amq.quantize(build(), feeds, cache_dir=None)
    assert ran == [[layer]] and sized == []  # nothing held: no batch sizes read
    first = got["kept"][0][layer]
    assert first["outputs"] == outputs and first["saturated"] > 0
    for k, v in first.items():
        assert v == pytest.approx(got["run"][0][layer][k], rel=1e-9), k
    assert kept.model.SerializeToString() == again.model.SerializeToString()
    assert kept.plan.layers[layer].overflow_note == again.plan.layers[layer].overflow_note


def test_kept_tensors_cut_rows_into_the_later_passs_batches():
    """runner.KeptTensors keeps each tensor on the samples it wants: a split tensor (one row a
    sample on axis 0) is cut at any sample and regrouped into the later pass's batches, as many
    as its rows fill; another is kept only where batches end at its count, and given back only
    to a pass batched as the calibration was; a batch across that count, or a split tensor whose axis 0 is not the samples or whose
    rows change shape, drops it. Graph inputs come from the feeds."""
    from amq.calib.kept import KeptTensors
    from amq.calib.runner import Batch

    def batch(n, start, trailing=(1,)):
        v = np.arange(start, start + n, dtype=np.float32).reshape(n, *([1] * len(trailing)))
        v = np.broadcast_to(v, (n, *trailing)).copy()
        return Batch({"x": v}, [], n, {"t": 2 * v, "u": v[None], "e": v})

    k = KeptTensors({"t": 6, "x": 8, "u": 8, "e": 6}, split={"t", "x", "u"})
    for start in (0, 4, 8):
        k.take(batch(4, start))
    assert k.kept == {"t": 6, "x": 8} and set(k.values) == {"t", "x"}  # u: axis 0 is not n
    assert [b[:, 0].tolist() for b in k.batches("t", [4, 4])] == [[0, 2, 4, 6]]  # 6 rows: one
    assert [b[:, 0].tolist() for b in k.batches("x", [3, 3, 2])] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert k.batches("e", [4, 2]) is None  # dropped: the second batch ran past its 6
    exact = KeptTensors({"e": 8})
    for start in (0, 4):
        exact.take(batch(4, start))
    assert [b[:, 0].tolist() for b in exact.batches("e", [4, 4])] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert exact.batches("e", [3, 3, 2]) is None  # batched otherwise: what a batch gives differs
    assert exact.batches("e", [4]) is None  # held on 8 samples, not on these 4
    odd = KeptTensors({"t": 8}, split={"t"})
    odd.take(batch(4, 0, (3,)))
    assert [b.shape for b in odd.batches("t", [4, 4])] == [(4, 3)]
    odd.take(batch(4, 4, (5,)))  # rows of another shape: dropped
    assert odd.batches("t", [4, 4]) is None and odd.wanted() == []


def test_row_cut_tensors_are_fetched_as_their_rows_on_the_samples_kept():
    """A large 4-D tensor kept as rows: the calibration session outputs only those rows of its
    first samples (never the whole batch), equal to numpy's cut; a graph input is cut from the
    feeds; a later batch whose map has another height drops it (the overflow pass then runs
    the model for it); a RowCrop gives back exactly the rows held, and a KeyError for others."""
    from onnx import TensorProto, helper

    from amq.calib.kept import KeptTensors, RowCrop
    from amq.calib.runner import collect_stats

    vi = helper.make_tensor_value_info
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"])],
        "g",
        [vi("x", TensorProto.FLOAT, ["n", 2, "h", 5])],
        [vi("r", TensorProto.FLOAT, None)],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    r = np.random.default_rng(0)
    x = r.normal(size=(8, 2, 12, 5)).astype(np.float32)
    rows = np.array([0, 1, 6, 11])

    def run(k: KeptTensors, batches) -> None:
        collect_stats(m, ["r"], ((dict(x=b), [], len(b)) for b in batches), 64, keep_tensors=k)

    k = KeptTensors({"r": 6, "x": 6}, split={"r", "x"}, rows={"r": rows, "x": rows})
    run(k, [x[:4], x[4:]])
    relu = np.maximum(x, 0)
    for t, want in (("r", relu), ("x", x)):
        (got,) = k.batches(t, [6])
        assert isinstance(got, RowCrop) and got.shape == (6, 2, 12, 5)
        np.testing.assert_array_equal(got.held, want[:6][:, :, rows])
        np.testing.assert_array_equal(got[:, :, 6:7, :], want[:6, :, 6:7])
        np.testing.assert_array_equal(got[:, :, 0:2, :], want[:6, :, 0:2])
        with pytest.raises(KeyError):
            got[:, :, 1:3, :]  # row 2 is not held
    assert k.fetch["r"].samples == 6 and k.fetch["r"].height is not None
    short = np.concatenate([x[:4, :, :8], x[4:, :, :8]])  # a map of 8 rows: row 11 is not there
    k = KeptTensors({"r": 6}, split={"r"}, rows={"r": rows})
    run(k, [x[:4], short[4:]])
    assert k.batches("r", [6]) is None and k.wanted() == []


def test_inputs_are_kept_only_where_that_saves_model_runs(monkeypatch):
    """The calibration pass keeps the inputs of layers that read more than one batch; a layer
    that reads one batch only where every input can be kept (then no batch runs at all: with
    one input that cannot be kept, the overflow pass runs its first batch anyway). A large
    Conv input is kept as the rows its emulation reads."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from amq.calib import saturation
    from amq.calib.data import open_data
    from amq.calib.prepare import prepare
    from amq.calib.workspace import Workspace
    from amq.config import Config

    r = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(r.uniform(0.5, 1, (c, k, 1, 1)).astype(np.float32), n)
        for n, c, k in (("wb", 4, 8), ("ws", 4, 4), ("we", 4, 4))
    ]
    nodes = [
        helper.make_node("Conv", ["x", "wb"], ["y1"], name="big"),  # 1024 positions: 1 batch
        helper.make_node("Conv", ["y1", "ws"], ["y2"], name="small"),  # the same
        helper.make_node("GlobalAveragePool", ["y1"], ["p"], name="pool"),
        helper.make_node("Conv", ["p", "we"], ["y3"], name="se"),  # 1 position: every sample
    ]
    vi = helper.make_tensor_value_info
    g = helper.make_graph(
        nodes,
        "g",
        [vi("x", TensorProto.FLOAT, ["n", 8, 32, 32])],
        [vi("y2", TensorProto.FLOAT, None), vi("y3", TensorProto.FLOAT, None)],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    feeds = [{"x": r.uniform(0, 4, (1, 8, 32, 32)).astype(np.float32)} for _ in range(24)]

    rows: dict[str, list[int]] = {}

    def kept(limit: int, budget_mb: int = 1024, model=m) -> dict[str, int]:
        monkeypatch.setattr(saturation, "KEEP_VALUES", limit)
        cfg = Config()
        cfg = replace(cfg, calibration=replace(cfg.calibration, memory_mb=budget_mb))
        prep = prepare(model, cfg)
        ws = Workspace(prep, cfg, open_data(feeds, prep.specs, cfg), None, show_progress=False)
        ws.structure(cfg)
        rows.clear()
        rows.update({t: r.tolist() for t, r in ws._guard_inputs.rows.items()})
        return ws._guard_inputs.want

    assert kept(1 << 17) == {"p": 24, "x": 4, "y1": 4}  # all: no model run for the pass
    assert rows == {}
    # x (8192 values a sample) is over the limit: only the rows of big's 4 bands of output
    # rows are kept, 2 rows each (1024 positions in a batch of 4: 32 x 4 per row), evenly
    # spaced over its 32
    assert kept(4096) == {"p": 24, "x": 4, "y1": 4}
    assert rows == {"x": [0, 1, 10, 11, 20, 21, 30, 31]}
    # x read whole by a MatMul too: it cannot be cut, and the pass runs its first batch anyway
    both = onnx.ModelProto()
    both.CopyFrom(m)
    w = numpy_helper.from_array(r.uniform(0.5, 1, (32, 4)).astype(np.float32), "wm")
    both.graph.initializer.append(w)
    both.graph.node.append(helper.make_node("MatMul", ["x", "wm"], ["y4"], name="mm"))
    both.graph.output.append(vi("y4", TensorProto.FLOAT, None))
    assert kept(4096, model=both) == {"p": 24}
    # below opset 12 the session cannot clamp the rows' indices (Min of int64): not cut either
    old = onnx.ModelProto()
    old.CopyFrom(m)
    old.opset_import[0].version = 11
    assert kept(4096, model=old) == {"p": 24} and rows == {}
    # the budget's share: x, y1 and p on the samples kept (4 of x's 8192 and y1's 4096 values,
    # 24 of p's 4: 192.4 KB) fit 1/8 of 2 MB, not of 1 MB, where p alone (384 bytes) fits
    assert saturation.keep_bytes(16) == 2 << 20 and saturation.keep_bytes(0) == 64 << 20
    assert kept(1 << 17, budget_mb=2) == {"p": 24, "x": 4, "y1": 4}
    assert kept(1 << 17, budget_mb=1) == {"p": 24}


def test_a_cache_hit_runs_the_model_for_the_inputs_a_calibration_pass_would_keep(
    tmp_path, monkeypatch, overflow_runs
):
    """With the statistics from the cache no calibration pass runs, so nothing is kept: the
    overflow results come from their own cache file (no model run), or, without it, the pass
    runs the model for the SE Conv itself; the model is the same each time."""
    import amq
    from amq.calib import saturation

    r = np.random.default_rng(1)
    feeds = [{"x": r.uniform(0, 4, (1, 16, 8, 8)).astype(np.float32)} for _ in range(24)]
    ran = overflow_runs
    fresh = amq.quantize(_se_model(), feeds, cache_dir=tmp_path)
    hit = amq.quantize(_se_model(), feeds, cache_dir=tmp_path)
    assert not fresh.summary.cache_hit and hit.summary.cache_hit
    assert ran == []  # the first from the kept inputs, the second from the cache
    (kept,) = tmp_path.glob(f"{saturation.KIND}-*.npz")
    kept.unlink()
    again = amq.quantize(_se_model(), feeds, cache_dir=tmp_path)
    assert ran == [["se"]]  # no kept inputs, no cached results: the model runs
    for res in (hit, again):
        assert res.model.SerializeToString() == fresh.model.SerializeToString()
        assert res.plan.layers["se"].overflow_note == fresh.plan.layers["se"].overflow_note


def test_weights_reassigned_after_the_guard_match_a_full_assignment():
    """After the overflow guard marks weights pair-safe, only weight and bias scales are
    assigned again (assign_weight_qparams): the same qparams as assigning every tensor anew,
    activations untouched (the bundled example, whose guard takes two layers)."""
    import copy

    from amq.calib.data import open_data
    from amq.calib.prepare import prepare
    from amq.calib.workspace import plan_in_workspace
    from amq.config import Config
    from amq.quant.planner import apply_overflow_guard
    from amq.quant.qparams import assign_qparams, assign_weight_qparams
    from tests.conftest import CALIB, EXAMPLE

    cfg = Config()
    prep = prepare(str(EXAMPLE), cfg)
    ws, plan, _ = plan_in_workspace(prep, cfg, open_data(str(CALIB), prep.specs, cfg), None, False)
    guarded = [lp.name for lp in plan.layers.values() if lp.overflow == "guard"]
    assert guarded
    for tp in plan.tensors.values():  # as before the guard: no weight pair-safe
        tp.pair_safe_axis = None
    assign_qparams(plan, ws.root_stats(plan), ws.cfg, ws.graph.array)
    full, part = copy.deepcopy(plan), copy.deepcopy(plan)
    assert apply_overflow_guard(ws.graph, full) and apply_overflow_guard(ws.graph, part)
    assign_qparams(full, ws.root_stats(full), ws.cfg, ws.graph.array)
    acts = {n: (t.scale, t.zero_point) for n, t in part.tensors.items() if t.role == "activation"}
    assign_weight_qparams(part, ws.graph.array)
    for name, tp in full.tensors.items():
        got = part.tensors[name]
        assert (got.scale, got.zero_point, got.method) == (tp.scale, tp.zero_point, tp.method)
    assert acts == {n: (t.scale, t.zero_point) for n, t in part.tensors.items() if n in acts}
    assert any(full.tensors[n].scale != plan.tensors[n].scale for n in full.tensors)


@pytest.mark.parametrize("heights", [[96] * 2 + [80] * 6, [80, 96] * 4])
def test_rows_kept_for_another_map_size_fall_back_to_a_run(monkeypatch, overflow_runs, heights):
    """Samples whose maps change height within the first batches: the rows kept do not match
    the bands the emulation reads there, so the overflow pass runs the model for that layer,
    and writes the same model as with nothing kept."""
    import amq
    from amq.calib import saturation

    r = np.random.default_rng(1)
    feeds = [{"x": r.uniform(0, 4, (1, 16, h, 96)).astype(np.float32)} for h in heights]
    ran = overflow_runs
    kept = amq.quantize(_map_model(), feeds, cache_dir=None)
    assert ran == [["conv"]]
    monkeypatch.setattr(saturation, "keep_bytes", lambda mb: 0)
    again = amq.quantize(_map_model(), feeds, cache_dir=None)
    assert kept.model.SerializeToString() == again.model.SerializeToString()
    assert kept.plan.layers["conv"].overflow == "guard"
