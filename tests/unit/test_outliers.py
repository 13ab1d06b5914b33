"""Outlier channels (issue #12, point 1) and known output ranges (point 5): per-channel statistics
streamed in constant memory, detection, the range decision on the ideal Q/DQ math against a
numpy reference, Softmax's [0, 1] grid, unread MatMul outputs left float, and the summary and
``compare`` naming the outlier tensor."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import amq
from amq.api import compare
from amq.calib import runner
from amq.config import config_from_dict
from amq.quant import observers as obs
from amq.quant import outliers as ol
from amq.quant import qmath
from amq.runtime import Execution, session_for
from tests.models import _init, _model, _vi

# ---------------------------------------------------------------------------------------------
# per-channel statistics: streaming N batches == one pass, along the channel axis


def _planted(seed: int, n: int = 64, t: int = 64, c: int = 256, value: float = 50.0):
    """[n, t, c] standard normal with channel 5 at ``value`` on token 0 of every sample (one
    value in t * c: rarer than a 99.99 percentile's tail, as a transformer's outlier dimension
    on its first token is)."""
    x = np.random.default_rng(seed).standard_normal((n, t, c)).astype(np.float32)
    x[:, 0, 5] = value
    return x


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_per_channel_streaming_equals_one_pass(axis):
    x = _planted(1, n=24, t=8, c=32)
    one = obs.HistogramObserver(256, channel_axis=axis)
    one.update(x)
    rng = np.random.default_rng(3)
    cuts = np.sort(rng.choice(np.arange(1, 24), size=5, replace=False))
    streamed = obs.HistogramObserver(256, channel_axis=axis)
    for b in np.split(x, cuts):
        streamed.update(b)
    a, b = one.compute(), streamed.compute()
    if axis == 0:  # the batch axis changes size: not a channel axis, nothing gathered
        assert a.ch_min.size == 24 and b.ch_min.size == 0
        return
    rest = tuple(i for i in range(3) if i != axis)
    np.testing.assert_array_equal(a.ch_min, x.min(axis=rest))
    np.testing.assert_array_equal(a.ch_max, x.max(axis=rest))
    np.testing.assert_array_equal(b.ch_min, a.ch_min)
    np.testing.assert_array_equal(b.ch_max, a.ch_max)


def test_runner_taps_gather_the_same_channels_as_numpy():
    """collect_stats' onnxruntime reductions (flat taps, a strided sample) give the exact
    per-channel extremes numpy gives on the whole tensor."""
    c = 32
    m = _model(
        [
            helper.make_node("Neg", ["x"], ["a"], name="n1"),
            helper.make_node("Neg", ["a"], ["b"], name="n2"),
            helper.make_node("MatMul", ["b", "w"], ["y"], name="mm"),
        ],
        [_vi("x", TensorProto.FLOAT, ["n", 64, c])],
        [_vi("y", TensorProto.FLOAT, ["n", 64, 8])],
        [_init("w", np.ones((c, 8), np.float32))],
        "taps",
    )
    x = _planted(2, n=32, t=64, c=c)
    batches = [({"x": x[i : i + 4]}, [], 4) for i in range(0, 32, 4)]
    info = runner.probe(m, {"x": x[:4]})
    stats = runner.collect_stats(
        m, ["b"], iter(batches), 256, info=info, per_sample=256, channel_axes={"b": 2}
    )
    s = stats["b"]
    assert s.stride > 1  # the histogram saw a subsample; the extremes saw everything
    np.testing.assert_array_equal(s.ch_min, x.min(axis=(0, 1)))
    np.testing.assert_array_equal(s.ch_max, x.max(axis=(0, 1)))


# ---------------------------------------------------------------------------------------------
# detection


def _stats(x: np.ndarray, axis: int = -1) -> obs.TensorStats:
    h = obs.HistogramObserver(2048, channel_axis=axis % x.ndim)
    h.update(x)
    return h.compute()


def test_planted_outlier_channels_found():
    x = np.random.default_rng(0).standard_normal((512, 384)).astype(np.float32)
    x[:, [7, 200]] *= 30.0
    o = ol.find_outliers(_stats(x))
    assert o is not None and o.index == (7, 200) and o.channels == 384 and o.axis == 1
    assert o.range == (float(x[:, [7, 200]].min()), float(x[:, [7, 200]].max()))
    assert 20 < o.ratio < 40
    assert o.describe((-1.0, 1.0)).startswith("outlier channels: 2 of 384 (axis 1)")
    assert o.describe((-1.0, 1.0)).endswith("clipped")
    assert o.describe(o.range).endswith("kept")


@pytest.mark.parametrize("seed", range(5))
def test_gaussian_tensor_has_no_outliers(seed):
    x = np.random.default_rng(seed).standard_normal((512, 384)).astype(np.float32)
    assert ol.find_outliers(_stats(x)) is None


def test_many_wide_channels_are_not_a_few_outliers():
    x = np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32)
    x[:, :16] *= 30.0  # a quarter of the channels: a scale difference, not outliers
    assert ol.find_outliers(_stats(x)) is None


# ---------------------------------------------------------------------------------------------
# the range decision on a tiny model with a planted outlier channel


def _outlier_model():
    """x [n, 64, 256] -> Neg -> Neg -> MatMul w [256, 32] -> y; w's row 5 (the outlier
    channel's) is 4x the others, so clipping that channel costs 16x at the output."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((256, 32)) * 0.1).astype(np.float32)
    w[5] *= 4.0
    m = _model(
        [
            helper.make_node("Neg", ["x"], ["a"], name="n1"),
            helper.make_node("Neg", ["a"], ["b"], name="n2"),
            helper.make_node("MatMul", ["b", "w"], ["y"], name="/fc/MatMul"),
        ],
        [_vi("x", TensorProto.FLOAT, ["n", 64, 256])],
        [_vi("y", TensorProto.FLOAT, ["n", 64, 32])],
        [_init("w", w)],
        "outliers",
    )
    calib = [{"x": _planted(s, n=1)} for s in range(64)]
    return m, calib, w


def _sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref**2) / np.sum((ref - out) ** 2)))


def test_outlier_range_beats_percentile_on_the_ideal_math():
    m, calib, w = _outlier_model()
    x = _planted(99, n=8)
    ref = x @ w
    got = {}
    for mode in ("auto", "off"):
        cfg = config_from_dict(
            {
                "calibration": {"outliers": mode, "widen_to_mse": False},
                "smoothquant": {"enabled": False},
                "outlier_split": {"enabled": False},  # this tests the range alone
            }
        )
        res = amq.quantize(m, calib, cfg, cache_dir=None, summary_samples=0)
        tp = res.plan.tensors["b"]
        y = session_for(res.model, Execution.IDEAL).run(None, {"x": x})[0]
        # independent reference: the same grids applied in numpy
        scale, zp = np.float32(tp.scale[0]), tp.zero_point[0]
        xq = (np.clip(np.rint(x / scale) + zp, 0, 255) - zp) * scale
        wt = res.plan.tensors["w"]
        ws = np.asarray(wt.scale, np.float32)
        wq = np.clip(np.rint(w / ws), -127, 127) * ws
        np.testing.assert_allclose(y, xq @ wq, rtol=1e-4, atol=1e-3)
        got[mode] = (tp, _sqnr(ref, y))
    auto, off = got["auto"][0], got["off"][0]
    lo, hi = qmath.snap_range(min(float(np.min([c["x"] for c in calib])), 0.0), 50.0)
    assert auto.range == (lo, hi) and auto.method == "percentile -> minmax (outlier channels)"
    assert off.method == "percentile" and off.range[1] < 5.0  # clipped 50 to the bulk's tail
    assert got["auto"][1] > got["off"][1] + 10.0


def test_error_model_weighs_the_amplified_clipping():
    """Plain mse on the tensor alone clips the rare outlier (its few values cost less than the
    coarser step); weighted by the reader's row energy, keeping them wins."""
    x = _planted(0, n=64)
    s = _stats(x)
    o = ol.find_outliers(s)
    assert o is not None and o.index == (5,)
    base = obs.range_percentile(s, 99.99)
    energy = np.ones(256)
    energy[5] = 400.0
    assert ol.clip_weight(o, energy) == pytest.approx(400.0 / (255 + 400) * 256)
    _, plain = ol.outlier_range(s, base, 8, False, 1.0)
    rng, weighted = ol.outlier_range(s, base, 8, False, ol.clip_weight(o, energy))
    assert plain != "minmax" and weighted == "minmax" and ol.is_kept(o, rng)


# ---------------------------------------------------------------------------------------------
# attention: Softmax output on [0, 1]; MatMul outputs no quantized layer reads stay float


def _attention():
    d, t = 16, 6
    rng = np.random.default_rng(0)
    w = {k: (rng.standard_normal((d, d)) * 0.3).astype(np.float32) for k in "qkvo"}
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="q"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="k"),
        helper.make_node("MatMul", ["x", "wv"], ["v"], name="v"),
        helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"], name="qk"),
        helper.make_node("Softmax", ["s"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["o"], name="pv"),
        helper.make_node("MatMul", ["o", "wo"], ["u"], name="out"),
        helper.make_node("Add", ["u", "x"], ["y"], name="residual"),
    ]
    m = _model(
        nodes,
        [_vi("x", TensorProto.FLOAT, [1, t, d])],
        [_vi("y", TensorProto.FLOAT, [1, t, d])],
        [_init(f"w{k}", v) for k, v in w.items()],
        "attention",
    )
    feeds = [
        {"x": np.random.default_rng(s).standard_normal((1, t, d)).astype(np.float32)}
        for s in range(16)
    ]
    return m, feeds


def test_softmax_output_is_exactly_zero_to_one_unsigned():
    m, feeds = _attention()
    res = amq.quantize(m, feeds, cache_dir=None, summary_samples=0)
    p = res.plan.tensors["p"]
    assert (p.grid, p.range, p.method, p.zero_point) == ("uint8", (0.0, 1.0), "fixed", [0])
    assert p.scale == [float(np.float32(1.0 / 255.0))]
    assert res.plan.layers["pv"].quantized and "p" in res.plan.layers["pv"].act_inputs
    # the Q/DQ written: zero point 0 of type uint8, scale 1/255
    qn = next(
        n for n in res.model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "p"
    )
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in res.model.graph.initializer}
    assert inits[qn.input[2]].dtype == np.uint8 and int(inits[qn.input[2]]) == 0
    assert float(inits[qn.input[1]]) == np.float32(1.0 / 255.0)
    # Q·Kᵀ and softmax·V read both operands quantized, as any two-activation MatMul
    assert set(res.plan.layers["qk"].act_inputs) == {"q", "kt"}


def test_unread_matmul_outputs_stay_float_and_fuse_to_integer_kernels(tmp_path):
    m, feeds = _attention()
    no_sq = config_from_dict(
        {
            "smoothquant": {"enabled": False},  # it would put a Div before o
            "layers": {"qk": {"activations": {"bits": 8}}},  # 16 by default: float compute
        }
    )
    res = amq.quantize(m, feeds, no_sq, cache_dir=None, summary_samples=4)
    assert "u" not in res.plan.tensors and "s" not in res.plan.tensors  # read by float ops only
    assert {"q", "kt", "v", "p", "o"} <= set(res.plan.tensors)  # read by quantized layers
    kernels = res.summary.integer_kernels
    assert kernels.get("MatMulIntegerToFloat", 0) >= 2 and not res.summary.float_compute


# ---------------------------------------------------------------------------------------------
# naming: the summary and compare


def test_summary_and_compare_name_the_outlier_tensor():
    m, calib, _ = _outlier_model()
    auto = config_from_dict(
        {
            "calibration": {"outliers": "auto"},
            "smoothquant": {"enabled": False},
            "outlier_split": {"enabled": False},
        }
    )
    res = amq.quantize(m, calib, auto, cache_dir=None, summary_samples=0)
    text = res.summary.to_dict()["outlier_tensors"]["b"]
    assert text.startswith("outlier channels: 1 of 256 (axis 2), range") and ", kept" in text
    off_cfg = {
        "calibration": {"outliers": False, "widen_to_mse": False},
        "smoothquant": {"enabled": False},
        "outlier_split": {"enabled": False},
    }
    off = amq.quantize(m, calib, config_from_dict(off_cfg), cache_dir=None, summary_samples=0)
    assert off.summary.outliers["b"].endswith("clipped (percentile)")
    rep = compare(m, off.model, calib[:8])
    row = rep.row("b")
    assert row.outlier_channels.startswith("outlier channels: 1 of 256 (axis 2)")
    assert row.outlier_channels.endswith("clipped") and row.outlier_channels in row.note
    assert compare(m, res.model, calib[:8]).row("b").outlier_channels.endswith("kept")


# ---------------------------------------------------------------------------------------------
# config


def test_config_outliers_key(tmp_path):
    from amq.config import ConfigError, OutlierRanges, dump_config, load_config

    assert config_from_dict({}).calibration.outliers == OutlierRanges.AUTO
    for v, want in (("auto", "auto"), ("off", "off"), (False, "off"), (True, "auto")):
        cfg = config_from_dict({"calibration": {"outliers": v}})
        assert cfg.calibration.outliers.value == want
        p = tmp_path / f"{want}.yaml"
        p.write_text(dump_config(cfg))
        assert load_config(p) == cfg
    p = tmp_path / "bare.yaml"
    p.write_text("calibration: {outliers: off}\n")  # YAML 1.1 reads a bare off as false
    assert load_config(p).calibration.outliers == OutlierRanges.OFF
    with pytest.raises(ConfigError, match="calibration.outliers: 'keep' is not one of auto, off"):
        config_from_dict({"calibration": {"outliers": "keep"}})


def test_query_key_product_gets_16_bit_activations_by_default():
    """Q x K^T (two activations, no fixed range) is planned at 16-bit activations by default
    (registry free_product_bits); softmax x V keeps 8 bits (P has its fixed [0, 1] grid); a
    config that sets the layer's bits, target trt, or global activation bits win."""
    m, feeds = _attention()
    res = amq.quantize(m, feeds, cache_dir=None, summary_samples=0)
    qk, pv = res.plan.layers["qk"], res.plan.layers["pv"]
    assert (qk.act_bits, pv.act_bits) == (16, 8)
    assert res.plan.tensors["q"].bits == 16 and res.plan.tensors["kt"].bits == 16
    assert res.plan.tensors["p"].bits == 8
    assert "two activations without a fixed range" in qk.reason
    # the product is closer to float than at 8 bits (ideal math), measured on the scores
    x = feeds[0]["x"]
    eight = amq.quantize(
        m, feeds, config_from_dict({"layers": {"qk": {"activations": {"bits": 8}}}}), cache_dir=None
    )
    assert eight.plan.layers["qk"].act_bits == 8
    for cfg in (
        {"target": "trt"},
        {"activations": {"bits": 16}},
        {"op_types": {"MatMul": {"activations": {"bits": 8}}}},
    ):
        r = amq.quantize(m, feeds, config_from_dict(cfg), cache_dir=None, summary_samples=0)
        assert r.plan.layers["qk"].act_bits == (16 if "activations" in cfg else 8), cfg

    # the scores are closer to float than at 8 bits (ideal math)
    def scores(model):
        out = onnx.ModelProto()
        out.CopyFrom(model)
        out.graph.output.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, None))
        return session_for(out, Execution.IDEAL).run(["s"], {"x": x})[0]

    ref = scores(m)
    err16, err8 = (float(np.sum((scores(r.model) - ref) ** 2)) for r in (res, eight))
    assert err16 < 0.8 * err8  # the rest is the 8-bit x and weights upstream


def test_a_known_range_is_not_observed(count_calibration):
    """The softmax output's grid is [0, 1] whatever the data: the calibration pass leaves it
    out (no ReduceMin, GlobalMaxPool or subsample for it) and the grid is the same."""
    m, feeds = _attention()
    res = amq.quantize(m, feeds, cache_dir=None, summary_samples=0)
    seen = [t for call in count_calibration for t in call]
    assert "p" not in seen and "v" in seen  # the other operand of softmax x V: observed
    assert res.plan.tensors["p"].scale == [float(np.float32(1.0 / 255.0))]


def test_a_concat_of_a_known_range_and_a_wide_one_is_still_guarded():
    """A Sigmoid output (its grid [0, 1], not observed) joined to a x1000 tensor: the Concat
    guard reads the known range and keeps the Concat float, as with observed statistics."""
    nodes = [
        helper.make_node("Sigmoid", ["a"], ["sa"], name="sig"),
        helper.make_node("Mul", ["b", "k"], ["wide"], name="scale"),
        helper.make_node("Concat", ["sa", "wide"], ["c"], name="cat", axis=1),
        helper.make_node("Conv", ["c", "w"], ["y"], name="conv"),
    ]
    rng = np.random.default_rng(1)
    m = _model(
        nodes,
        [_vi("a", TensorProto.FLOAT, [1, 4, 6, 6]), _vi("b", TensorProto.FLOAT, [1, 4, 6, 6])],
        [_vi("y", TensorProto.FLOAT, [1, 3, 6, 6])],
        [
            _init("k", np.asarray(1000.0, np.float32)),
            _init("w", (rng.standard_normal((3, 8, 1, 1)) * 0.3).astype(np.float32)),
        ],
        "known_concat",
    )
    feeds = [
        {k: rng.standard_normal((1, 4, 6, 6)).astype(np.float32) for k in "ab"} for _ in range(8)
    ]
    res = amq.quantize(m, feeds, cache_dir=None, summary_samples=0)
    assert not res.plan.layers["cat"].quantized
    assert "ranges differ" in (res.plan.layers["cat"].reason or "")
