"""amq.quant.observers: the streaming contract and the range methods against direct computations on
the concatenated data (DESIGN.md §4, design rule 2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amq.quant import observers as obs
from amq.quant.entropy import entropy_threshold

# ---------------------------------------------------------------------------------------------
# Helpers


def observe(batches, bins: int = obs.DEFAULT_BINS) -> obs.TensorStats:
    h = obs.HistogramObserver(bins)
    for b in batches:
        h.update(np.asarray(b, dtype=np.float32))
    return h.compute()


def one_pass(batches, bins: int = obs.DEFAULT_BINS) -> obs.TensorStats:
    flat = np.concatenate([np.asarray(b, dtype=np.float32).ravel() for b in batches])
    return observe([flat], bins)


def assert_same_stats(a: obs.TensorStats, b: obs.TensorStats) -> None:
    assert a.min == b.min
    assert a.max == b.max
    assert a.width_log2 == b.width_log2
    assert a.i0 == b.i0
    assert a.count == b.count
    assert a.nonfinite == b.nonfinite
    assert a.counts.shape == b.counts.shape
    np.testing.assert_array_equal(a.counts, b.counts)
    assert a.ch_axis == b.ch_axis
    np.testing.assert_array_equal(a.ch_min, b.ch_min)
    np.testing.assert_array_equal(a.ch_max, b.ch_max)


def direct_hist(x: np.ndarray, width_log2: int, i0: int, bins: int) -> np.ndarray:
    """Counts of x on the zero-aligned grid [(i0+j)*2^k, (i0+j+1)*2^k), in float64."""
    idx = np.floor(np.asarray(x, np.float64) / math.ldexp(1.0, width_log2)).astype(np.int64) - i0
    assert idx.min() >= 0 and idx.max() < bins, "value outside the grid"
    return np.bincount(idx, minlength=bins)


def merge_onto(s: obs.TensorStats, width_log2: int, i0: int) -> np.ndarray:
    """Counts of ``s`` moved onto a coarser zero-aligned grid (independent exact merge)."""
    out = np.zeros(s.bins, dtype=np.int64)
    shift = width_log2 - s.width_log2
    assert shift >= 0
    for j in np.nonzero(s.counts)[0]:
        out[((int(s.i0) + int(j)) >> shift) - int(i0)] += s.counts[j]
    return out


def _rng(seed):
    return np.random.default_rng(seed)


def split(x, n, rng):
    cuts = np.sort(rng.choice(np.arange(1, len(x)), size=n - 1, replace=False))
    return np.split(x, cuts)


DISTRIBUTIONS = {
    "normal": lambda r: [r.standard_normal(1000) for _ in range(8)],
    "relu": lambda r: [np.maximum(r.standard_normal((4, 250)), 0) for _ in range(8)],
    "uniform_far_from_zero": lambda r: [r.uniform(1000.0, 1001.0, 700) for _ in range(6)],
    "negative_offset": lambda r: [r.normal(-50.0, 0.1, 500) for _ in range(6)],
    "heavy_tailed": lambda r: [r.standard_cauchy(2000) for _ in range(5)],
    "student_t2": lambda r: [r.standard_t(2, 2000) for _ in range(5)],
    "constant": lambda r: [np.full(100, 3.25) for _ in range(5)],
    "constant_negative": lambda r: [np.full((2, 3), -0.125) for _ in range(5)],
    "single_value": lambda r: [np.array([0.7])],
    "scalar_batches": lambda r: [r.normal(size=1) for _ in range(60)],
    "small_first": lambda r: [r.normal(0, 1e-3, 500), r.normal(0, 1.0, 500), r.normal(0, 1e4, 500)],
    "big_first": lambda r: [r.normal(0, 1e4, 500), r.normal(0, 1.0, 500), r.normal(0, 1e-3, 500)],
    "tiny_then_huge_positive": lambda r: [np.abs(r.normal(0, 1e-30, 100)), r.uniform(0, 1e30, 100)],
    "growing_ranges": lambda r: [r.normal(0, 2.0**i, 64) for i in range(-20, 20)],
    "sentinel_mask": lambda r: [np.r_[r.normal(0, 1, 300), np.full(20, -3.4e38)] for _ in range(4)],
}

# ---------------------------------------------------------------------------------------------
# Streaming N batches == one pass over the concatenated data


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_streaming_equals_one_pass(name):
    batches = DISTRIBUTIONS[name](_rng(sum(map(ord, name))))
    streamed = observe(batches)
    single = one_pass(batches)
    assert_same_stats(streamed, single)
    flat = np.concatenate([np.asarray(b, np.float32).ravel() for b in batches])
    assert streamed.count == flat.size == streamed.counts.sum()
    assert streamed.min == float(flat.min()) and streamed.max == float(flat.max())


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_streaming_per_channel_equals_one_pass(name):
    """The per-channel extremes (the last axis, one vector per tensor) obey the same contract."""
    batches = [np.asarray(b, np.float32) for b in DISTRIBUTIONS[name](_rng(sum(map(ord, name))))]
    if batches[0].ndim == 1:  # rows of w channels (the largest common divisor up to 50)
        w = max(d for d in range(1, 51) if all(b.size % d == 0 for b in batches))
        batches = [b.reshape(-1, w) for b in batches]
    if batches[0].shape[-1] < 2:
        pytest.skip("one value per row: no channels")
    last = batches[0].ndim - 1

    def run(bs):
        h = obs.HistogramObserver(obs.DEFAULT_BINS, channel_axis=last)
        for b in bs:
            h.update(b)
        return h.compute()

    whole = np.concatenate(batches, axis=0)
    streamed, single = run(batches), run([whole])
    assert_same_stats(streamed, single)
    rest = tuple(range(last))
    np.testing.assert_array_equal(streamed.ch_min, np.min(whole, axis=rest) if rest else whole)
    np.testing.assert_array_equal(streamed.ch_max, np.max(whole, axis=rest) if rest else whole)


@pytest.mark.parametrize("name", ["normal", "small_first", "heavy_tailed", "growing_ranges"])
def test_streaming_order_and_split_do_not_matter(name):
    r = _rng(5)
    flat = np.concatenate([np.asarray(b, np.float32).ravel() for b in DISTRIBUTIONS[name](r)])
    ref = observe([flat])
    for n in (2, 7, 31):
        assert_same_stats(observe(split(flat, n, r)), ref)
    assert_same_stats(observe(split(flat[::-1].copy(), 5, r)), ref)


@settings(max_examples=150, deadline=None)
@given(
    data=st.lists(
        st.one_of(
            st.floats(-1e6, 1e6, allow_nan=False, width=32),
            st.floats(allow_nan=False, allow_infinity=False, width=32),  # any float32
        ),
        min_size=2,
        max_size=300,
    ),
    seed=st.integers(0, 2**16),
    n=st.integers(2, 6),
    bins=st.sampled_from([16, 64, 2048]),
)
def test_prop_streaming_equals_one_pass(data, seed, n, bins):
    x = np.array(data, np.float32)
    n = min(n, len(x))
    assert_same_stats(observe(split(x, n, _rng(seed)), bins=bins), observe([x], bins=bins))


@pytest.mark.parametrize(
    "batches",
    [
        [np.full(16, 1e7), np.array([0.0, 1.0])],
        [[8388608.0], [0.0]],  # found by hypothesis: 2**23 alone, then 0
        [np.full(4, 1e30), np.array([-1e30, 5.0])],
        [np.full(4, -3.4e38), np.array([3.4e38])],
    ],
    ids=["1e7", "2**23", "1e30", "float_limits"],
)
def test_streaming_big_constant_first_batch_then_wider(batches):
    assert_same_stats(observe(batches), one_pass(batches))


@pytest.mark.parametrize(
    "batches,bins",
    [
        ([_rng(3).normal(0, 1e-30, 100), _rng(4).normal(0, 1e30, 100)], 2048),
        # found by hypothesis: the smallest negative subnormal, then a batch that sets k = 1
        ([[-1.401298464324817e-45], [63.0]], 64),
    ],
    ids=["1e-30_then_1e30", "neg_subnormal_then_63"],
)
def test_streaming_tiny_negatives_then_huge(batches, bins):
    assert_same_stats(observe(batches, bins), one_pass(batches, bins))


def test_negative_zero_and_underflowing_negatives_binned_exactly():
    # a range wide enough for bins wider than 1: the smallest negative subnormals scale to -0.0 in
    # float32 and must still land in bin -1, while an input -0.0 is 0 and lands in bin 0
    tiny = -1.401298464324817e-45
    x = np.array([-0.0, tiny, 0.0, -0.0, tiny, -5000.0, 7000.0, -0.0, 1.0], np.float32)
    s = observe([x])
    assert s.width_log2 > 0
    np.testing.assert_array_equal(s.counts, direct_hist(x, s.width_log2, s.i0, s.bins))
    zero_bin = -s.i0
    assert s.counts[zero_bin] == 5 and s.counts[zero_bin - 1] == 2


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("bins", [16, 100, 2048])
def test_histogram_matches_direct_float64_binning(seed, bins):
    r = _rng(seed)
    scales = 10.0 ** r.uniform(-3, 3, 3)
    batches = [r.normal(r.uniform(-2, 2) * sc, sc, 300) for sc in scales]
    s = observe(batches, bins)
    flat = np.concatenate(batches).astype(np.float32)
    np.testing.assert_array_equal(s.counts, direct_hist(flat, s.width_log2, s.i0, s.bins))
    assert s.i0 == math.floor(s.min / s.width)
    # the grid is the finest power of two that holds [min, max] in `bins` bins
    w = math.ldexp(1.0, s.width_log2)
    assert math.floor(s.max / w) - math.floor(s.min / w) + 1 <= s.bins
    w2 = w / 2
    assert math.floor(s.max / w2) - math.floor(s.min / w2) + 1 > s.bins


def test_memory_constant_after_many_updates():
    h = obs.HistogramObserver(bins=256)
    r = _rng(9)
    for i in range(200):
        h.update(r.normal(0, 1.05**i, size=(2, 50)).astype(np.float32))
        assert h.stats.counts.shape == (256,)
    assert h.stats.count == 200 * 100 == h.stats.counts.sum()
    assert h.stats.batches == 200


def test_bins_below_minimum_rejected():
    with pytest.raises(ValueError):
        obs.HistogramObserver(bins=8)


# ---------------------------------------------------------------------------------------------
# Non-finite values


def test_nonfinite_counted_and_kept_out_of_histogram():
    r = _rng(10)
    a = r.normal(size=100).astype(np.float32)
    a[[3, 50]] = np.nan
    a[7] = np.inf
    b = r.normal(size=50).astype(np.float32)
    b[0] = -np.inf
    s = observe([a, b, np.array([np.nan, np.inf], np.float32)])
    finite = np.concatenate([a, b])[np.isfinite(np.concatenate([a, b]))]
    assert s.nonfinite == 6
    assert s.count == finite.size == s.counts.sum()
    assert s.min == float(finite.min()) and s.max == float(finite.max())
    np.testing.assert_array_equal(s.counts, observe([finite]).counts)
    assert obs.is_sentinel_dominated(s)


def test_all_nonfinite_is_empty():
    s = observe([np.array([np.nan, np.inf, -np.inf], np.float32)])
    assert s.empty and s.nonfinite == 3
    assert obs.range_minmax(s) == (0.0, 0.0)
    assert obs.is_sentinel_dominated(s)


# ---------------------------------------------------------------------------------------------
# Range methods


def _flat(batches) -> np.ndarray:
    return np.concatenate([np.asarray(b, np.float32).ravel() for b in batches]).astype(np.float64)


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_minmax_exact(name):
    batches = DISTRIBUTIONS[name](_rng(1))
    x = _flat(batches)
    assert obs.range_minmax(observe(batches)) == (x.min(), x.max())
    assert obs.select_range(observe(batches), "minmax", 8, False) == (x.min(), x.max())


@pytest.mark.parametrize("p", [90.0, 99.0, 99.9, 99.99])
@pytest.mark.parametrize(
    "name",
    ["normal", "relu", "uniform_far_from_zero", "negative_offset", "student_t2", "big_first"],
)
def test_percentile_within_one_bin(name, p):
    """The histogram quantile lies in the bin of the order statistic of rank ceil(q * N), which is
    np.percentile's "inverted_cdf" (up to one rank: 1 - p/100 is not exact in floating point);
    np's default (linear) may differ by one order-statistic gap more."""
    batches = DISTRIBUTIONS[name](_rng(2))
    s = observe(batches)
    x = np.sort(_flat(batches))
    lo, hi = obs.range_percentile(s, p)
    w = s.width
    for got, q in ((hi, p), (lo, 100.0 - p)):
        exact = np.percentile(x, q, method="inverted_cdf")
        r = int(np.searchsorted(x, exact))
        lo_ok, hi_ok = x[max(r - 1, 0)] - w, x[min(r + 1, x.size - 1)] + w
        assert lo_ok <= got <= hi_ok, (got, exact, w)
        linear = np.percentile(x, q)
        k = np.searchsorted(x, linear)
        gap = x[min(k + 1, x.size - 1)] - x[max(k - 2, 0)]
        assert abs(got - linear) <= w + gap
    assert s.min <= lo <= hi <= s.max


def test_percentile_100_is_minmax_and_constant_is_exact():
    batches = DISTRIBUTIONS["normal"](_rng(4))
    s = observe(batches)
    assert obs.range_percentile(s, 100.0) == (s.min, s.max)
    c = observe(DISTRIBUTIONS["constant"](_rng(0)))
    assert obs.range_percentile(c, 99.99) == (3.25, 3.25)


def test_empty_stats_ranges_are_zero():
    s = obs.HistogramObserver().compute()
    for method in ("minmax", "percentile", "entropy", "mse"):
        assert obs.select_range(s, method, 8, False) == (0.0, 0.0)
    with pytest.raises(ValueError):
        obs.select_range(s, "kl", 8, False)


# --- mse: compare the chosen range's true error with a brute-force grid on the raw data


def ref_fake_quant(x, lo, hi, bits, symmetric):
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        s, z = max(-lo, hi) / qmax, 0.0
    else:
        qmin, qmax = 0, 2**bits - 1
        s = (hi - lo) / (qmax - qmin)
        z = np.clip(np.round(qmin - lo / s), qmin, qmax)
    q = np.clip(np.round(x / s) + z, qmin, qmax)
    return (q - z) * s


def true_mse(x, lo, hi, bits, symmetric) -> float:
    return float(np.mean((x - ref_fake_quant(x, lo, hi, bits, symmetric)) ** 2))


def brute_force_best(x, bits, symmetric) -> float:
    lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
    return min(
        true_mse(x, lo * a, hi * a, bits, symmetric) for a in np.linspace(1.0 / 400, 1.0, 400)
    )


MSE_DATA = {
    "normal": lambda r: r.standard_normal(60000),
    "laplace": lambda r: r.laplace(size=60000),
    "student_t3": lambda r: r.standard_t(3, 60000),
    "relu": lambda r: np.maximum(r.standard_normal(60000), 0),
    "uniform_far_from_zero": lambda r: r.uniform(5.0, 9.0, 60000),
    "lognormal": lambda r: r.lognormal(0, 1, 60000),
}


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(
    "name",
    [
        *sorted(MSE_DATA),
        "cauchy",
    ],
)
def test_mse_close_to_brute_force(name, bits, symmetric):
    gen = MSE_DATA.get(name, lambda r: r.standard_cauchy(60000))
    x = gen(_rng(12)).astype(np.float32)
    s = observe(np.array_split(x, 6))
    x = x.astype(np.float64)
    lo, hi = obs.range_mse(s, bits, symmetric)
    assert min(s.min, 0.0) <= lo <= 0.0 <= hi <= max(s.max, 0.0)
    chosen = true_mse(x, lo, hi, bits, symmetric)
    best = brute_force_best(x, bits, symmetric)
    assert chosen <= best * 1.10 + 1e-12, (chosen, best)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(
    "name",
    [
        "laplace",
        "student_t3",
        "lognormal",
        # not Cauchy: its tail is so heavy that no clip beats minmax by 5% on true MSE
    ],
)
def test_mse_beats_minmax_on_heavy_tails(name, bits):
    gen = MSE_DATA.get(name, lambda r: r.standard_cauchy(60000))
    x = gen(_rng(13)).astype(np.float32)
    s = observe(np.array_split(x, 4))
    x = x.astype(np.float64)
    lo, hi = obs.range_mse(s, bits, False)
    assert hi < s.max  # it clips
    assert true_mse(x, lo, hi, bits, False) < 0.95 * true_mse(x, s.min, s.max, bits, False)


# --- entropy


def test_entropy_normal_8bit():
    x = _rng(14).standard_normal(200000).astype(np.float32)
    s = observe(np.array_split(x, 10))
    t = entropy_threshold(s, 8)
    amax = float(np.abs(x).max())
    assert 2.5 <= t <= 4.8
    assert t < amax  # a clip of the max
    assert obs.range_entropy(s, 8) == (max(s.min, -t), min(s.max, t))
    assert obs.select_range(s, "entropy", 8, True) == obs.range_entropy(s, 8)


def test_entropy_below_8_bits_falls_back_to_mse():
    x = _rng(15).standard_normal(20000).astype(np.float32)
    s = observe([x])
    assert obs.select_range(s, "entropy", 4, False) == obs.range_mse(s, 4, False)


# ---------------------------------------------------------------------------------------------
# clamp (ahead-relu)


@pytest.mark.parametrize(
    "gen",
    [
        lambda r: r.standard_normal(5000),
        lambda r: r.standard_normal(5000) + 2.5,
        lambda r: r.uniform(-100.0, 1.0, 3000),
        lambda r: r.uniform(-1.0, 100.0, 3000),
        lambda r: r.standard_t(2, 4000),
    ],
    ids=["normal", "mostly_positive", "mostly_negative", "barely_negative", "t2"],
)
def test_clamp_zero_equals_observing_relu(gen):
    x = gen(_rng(16)).astype(np.float32)
    s = observe(np.array_split(x, 4))
    c = obs.clamp(s, 0.0)
    d = observe(np.array_split(np.maximum(x, 0), 4))
    assert (c.min, c.max, c.count) == (d.min, d.max, d.count)
    assert c.width_log2 == s.width_log2 and c.i0 == s.i0  # same grid as the source
    np.testing.assert_array_equal(c.counts, merge_onto(d, c.width_log2, c.i0))
    np.testing.assert_array_equal(
        c.counts, direct_hist(np.maximum(x, 0), c.width_log2, c.i0, c.bins)
    )
    assert c.clamped_low == int(np.count_nonzero(x < 0))
    assert obs.range_minmax(c) == (0.0, float(x.max()))
    # the source statistics are untouched
    assert s.min == float(x.min()) and s.counts.sum() == x.size


def test_clamp_below_min_is_identity():
    x = _rng(17).uniform(1.0, 2.0, 1000).astype(np.float32)
    s = observe([x])
    c = obs.clamp(s, 0.0)
    assert_same_stats(c, s)
    assert c.clamped_low == 0


def test_clamp_all_negative_ranges_are_zero():
    x = -_rng(18).uniform(1.0, 2.0, 1000).astype(np.float32)
    c = obs.clamp(observe([x]), 0.0)
    assert (c.min, c.max, c.count) == (0.0, 0.0, 1000)
    for method in ("minmax", "percentile", "entropy", "mse"):
        assert obs.select_range(c, method, 8, False) == (0.0, 0.0)


def test_clamp_all_negative_mass_sits_at_zero():
    x = -_rng(18).uniform(1.0, 2.0, 1000).astype(np.float32)
    c = obs.clamp(observe([x]), 0.0)
    edges = c.edges()
    j = np.nonzero(c.counts)[0]
    assert j.size == 1
    assert edges[j[0]] <= 0.0 < edges[j[0] + 1]


# ---------------------------------------------------------------------------------------------
# Sentinels


def test_sentinel_float_min_mask_detected():
    r = _rng(19)
    batches = []
    for _ in range(5):
        scores = r.normal(0, 3, (4, 8, 8)).astype(np.float32)
        scores[:, :, 6:] = -3.4e38  # padding positions masked with ~float min, same every batch
        batches.append(scores)
    s = observe(batches)
    assert s.min_hits == 5
    assert obs.is_sentinel_dominated(s)


def test_moderate_constant_sentinel_detected():
    r = _rng(20)
    batches = [np.r_[r.normal(0, 1, 5000), -1e9] for _ in range(4)]
    assert obs.is_sentinel_dominated(observe(batches))


@pytest.mark.parametrize(
    "name",
    [
        "normal",
        "relu",
        "uniform_far_from_zero",
        "negative_offset",
        "student_t2",
        "small_first",
        "constant",
    ],
)
def test_ordinary_data_not_sentinel(name):
    assert not obs.is_sentinel_dominated(observe(DISTRIBUTIONS[name](_rng(21))))


@pytest.mark.parametrize("fill", [-1e4, -1e9])
def test_mask_missing_from_some_batches_still_detected(fill):
    """Padding in only some batches (the others' minimum is an ordinary score): the mask value is
    still the extreme of several batches, far from the scores."""
    r = _rng(23)
    batches = []
    for i in range(6):
        scores = r.normal(0, 3, (4, 8, 8)).astype(np.float32)
        if i % 2:
            scores[:, :, 6:] = fill
        batches.append(scores)
    s = observe(batches)
    assert s.min == fill and s.min_hits == 3
    assert obs.is_sentinel_dominated(s)


def test_mask_in_a_single_batch_detected_by_its_spike():
    r = _rng(24)
    batches = [r.normal(0, 3, (4, 8, 8)).astype(np.float32) for _ in range(5)]
    batches[2][:, :, 7] = -1e4  # 32 masked positions, one batch
    s = observe(batches)
    assert s.min_hits == 1
    assert obs.is_sentinel_dominated(s)


def test_single_far_outlier_is_not_a_sentinel():
    """One genuine extreme value in one batch: no repeat, no spike, so its range is kept."""
    r = _rng(25)
    batches = [r.normal(0, 1, 5000).astype(np.float32) for _ in range(4)]
    batches[1][17] = -40.0
    assert not obs.is_sentinel_dominated(observe(batches))


def test_outlier_not_constant_across_batches_not_sentinel():
    r = _rng(22)
    batches = [np.r_[r.normal(0, 1, 5000), -1e6 * (1 + i)] for i in range(4)]
    assert not obs.is_sentinel_dominated(observe(batches))


@pytest.mark.parametrize("splits", [[5], [1, 1, 3], [2, 3], [4, 1]])
def test_subsampled_histogram_streaming_equals_one_pass(splits):
    """Large tensors feed every k-th value (by global stream position) to the histogram; any
    batching of the same samples gives the same statistics, and min/max still see everything."""
    r = _rng(21)
    x = r.normal(size=(5, 3, 40, 40)).astype(np.float32)
    x[3, 1, 7, 9] = 55.0  # an extreme that the stride may skip: min/max must still see it
    one = obs.HistogramObserver(256, max_per_sample=500)
    one.update(x)
    streamed = obs.HistogramObserver(256, max_per_sample=500)
    i = 0
    for n in splits:
        streamed.update(x[i : i + n])
        i += n
    a, b = one.compute(), streamed.compute()
    # 4800 values per sample, at most ~500 of them: 10, moved to 11 (shares no factor with 40)
    assert a.stride == b.stride == 11
    assert_same_stats(a, b)
    assert a.max == 55.0 and a.count == x.size
    # the subsample is every 11th value of the flattened stream
    flat = x.reshape(-1)[::11]
    assert a.counts.sum() == flat.size
    np.testing.assert_array_equal(a.counts, direct_hist(flat, a.width_log2, a.i0, a.bins))


@pytest.mark.parametrize(
    ("per_sample", "cap", "last", "want"),
    [(4800, 500, 40, 11), (4800, 500, 7, 10), (100, 500, 40, 1), (49152, 16384, 384, 5)],
)
def test_sample_stride_visits_every_column(per_sample, cap, last, want):
    k = obs.sample_stride(per_sample, cap, last)
    assert k == want
    # every column of the last axis is hit by a stride-k walk over a few rows
    cols = {(i * k) % last for i in range(last * 2)}
    assert k == 1 or len(cols) == last


def test_subsampled_percentile_close_to_full():
    x = _rng(22).normal(size=(64, 16, 32, 32)).astype(np.float32)
    sub = obs.HistogramObserver(max_per_sample=2048)
    full = obs.HistogramObserver(max_per_sample=10**9)
    for k in range(0, 64, 8):
        sub.update(x[k : k + 8])
        full.update(x[k : k + 8])
    lo_s, hi_s = obs.range_percentile(sub.compute(), 99.9)
    lo_f, hi_f = obs.range_percentile(full.compute(), 99.9)
    assert abs(hi_s - hi_f) < 0.05 and abs(lo_s - lo_f) < 0.05
