"""SmoothQuant (amq/quant/algorithms/smoothquant.py, amq/calib/smoothing.py): the scales against a
numpy reference, float equality after folding or an inserted Div, alpha selection on a planted
outlier, the config, and no effect on CNNs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import amq
from amq.calib import smoothing
from amq.calib.data import open_data
from amq.calib.prepare import prepare
from amq.config import Config, SmoothMode, SmoothQuantConfig, config_from_dict, dump_config
from amq.errors import ConfigError
from amq.graph.model import Graph
from amq.quant.algorithms import smoothquant as sq
from amq.runtime import Execution, session_for
from tests import models as tm

K, N, S = 32, 24, 16
BIG = [3, 7]  # the planted outlier channels


def _i(name: str, a) -> onnx.TensorProto:
    return nh.from_array(np.asarray(a, np.float32), name)


def _model(nodes, inits, shape=("b", S, K)) -> onnx.ModelProto:
    g = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("x", T.FLOAT, list(shape))],
        [h.make_tensor_value_info("y", T.FLOAT, None)],
        inits,
    )
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def ln_qkv(residual: bool = False) -> onnx.ModelProto:
    """LayerNorm (outlier channels in its scale) -> Q, K, V MatMuls sharing its output; with
    ``residual`` the LayerNorm output also feeds an Add (nothing can be folded then)."""
    r = np.random.default_rng(0)
    g = np.ones(K, np.float32)
    g[BIG] = 40.0
    inits = [_i("ln_s", g), _i("ln_b", r.normal(size=K) * 0.1)]
    nodes = [h.make_node("LayerNormalization", ["x", "ln_s", "ln_b"], ["ln"], name="ln", axis=-1)]
    for q in "qkv":
        inits.append(_i(f"w{q}", r.normal(size=(K, N)) * 0.2))
        nodes.append(h.make_node("MatMul", ["ln", f"w{q}"], [q], name=f"mm_{q}"))
    nodes += [
        h.make_node("Add", ["q", "k"], ["qk"], name="add1"),
        h.make_node("Add", ["qk", "v"], ["y0" if residual else "y"], name="add2"),
    ]
    if residual:
        inits.append(_i("wr", r.normal(size=(K, N)) * 0.2))
        nodes += [
            h.make_node("Add", ["ln", "x"], ["res"], name="residual"),
            h.make_node("MatMul", ["res", "wr"], ["r2"], name="mm_res"),
            h.make_node("Add", ["y0", "r2"], ["y"], name="add3"),
        ]
    return _model(nodes, inits)


def bias_add() -> onnx.ModelProto:
    """MatMul -> bias Add (outlier channels from W0's columns) -> MatMul."""
    r = np.random.default_rng(0)
    w0 = r.normal(size=(K, K)).astype(np.float32) * 0.2
    w0[:, BIG] *= 50
    inits = [_i("w0", w0), _i("b0", r.normal(size=K) * 0.1), _i("w1", r.normal(size=(K, N)) * 0.2)]
    nodes = [
        h.make_node("MatMul", ["x", "w0"], ["h0"], name="mm0"),
        h.make_node("Add", ["h0", "b0"], ["h1"], name="bias0"),
        h.make_node("MatMul", ["h1", "w1"], ["y"], name="mm1"),
    ]
    return _model(nodes, inits)


def lone(gemm: bool = False) -> onnx.ModelProto:
    """One MatMul (or Gemm transB=1 with a bias) reading the model input."""
    r = np.random.default_rng(0)
    w = r.normal(size=(K, N)).astype(np.float32) * 0.2
    if gemm:
        node = h.make_node("Gemm", ["x", "w", "c"], ["y"], name="gemm", transB=1)
        return _model([node], [_i("w", w.T), _i("c", r.normal(size=N))], ("b", K))
    return _model([h.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [_i("w", w)])


def gemm_relu_gemm() -> onnx.ModelProto:
    """Gemm (transB=1, bias C, outlier output channels) -> Relu -> Gemm: 1/s passes the Relu
    (relu(x / s) = relu(x) / s for s > 0) into the first Gemm's weight rows and C."""
    r = np.random.default_rng(0)
    w1 = r.normal(size=(K, K)).astype(np.float32) * 0.2
    w1[BIG, :] *= 50
    inits = [_i("w1", w1), _i("c1", r.normal(size=K) * 0.1), _i("w2", r.normal(size=(N, K)) * 0.2)]
    nodes = [
        h.make_node("Gemm", ["x", "w1", "c1"], ["h"], name="fc1", transB=1),
        h.make_node("Relu", ["h"], ["hr"], name="relu"),
        h.make_node("Gemm", ["hr", "w2"], ["y"], name="fc2", transB=1),
    ]
    return _model(nodes, inits, ("b", K))


def outlier_x(n: int = 48, seed: int = 1, shape=(S, K)) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)
    x[..., BIG] *= 60.0
    return x


def normal_x(n: int = 48, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, S, K)).astype(np.float32)


def _data(model: onnx.ModelProto, x: np.ndarray, cfg: Config):
    prep = prepare(model, cfg)
    return prep, open_data([{"x": xi[None]} for xi in x], prep.specs, cfg)


def _run(model: onnx.ModelProto, x: np.ndarray, execution=Execution.IDEAL) -> np.ndarray:
    return session_for(model, execution).run(None, {"x": x})[0]


ON_05 = config_from_dict({"smoothquant": {"enabled": True, "alpha": 0.5}})


# ---------------------------------------------------------------------------------------------
# The scales


def test_scales_match_numpy_reference():
    r = np.random.default_rng(3)
    xa, wa = r.uniform(0.01, 50, 64), r.uniform(0.01, 2, 64)
    for a in (0.0, 0.25, 0.5, 0.85, 1.0):
        ref = np.clip(xa**a / wa ** (1 - a), *sq.SCALE_CLIP)
        np.testing.assert_allclose(sq.smooth_scales(xa, wa, a), ref, rtol=1e-12)
    # a dead channel (all zero in X or in W) is left alone, never a division by zero
    s = sq.smooth_scales(np.array([0.0, 4.0, 4.0]), np.array([1.0, 0.0, 1.0]), 0.5)
    np.testing.assert_allclose(s, [1.0, 1.0, 2.0])


def test_output_error_sums_float32_parts_in_float64():
    r = np.random.default_rng(5)
    big = (1e4 * r.normal(size=(64, 24))).astype(np.float32)
    small = r.normal(size=(64, 24)).astype(np.float32)
    y = big.astype(np.float64) + small.astype(np.float64)
    ref = y + r.normal(scale=1e-6, size=y.shape)
    expected = float(np.sum((y - ref) ** 2) / np.sum(ref**2))
    assert sq.output_error([big, small], ref) == pytest.approx(expected, rel=1e-9, abs=0)
    # summed in float32 first, the small part's low bits would be lost: a far larger error
    f32 = float(np.sum(((big + small).astype(np.float64) - ref) ** 2) / np.sum(ref**2))
    assert f32 > 100 * expected
    assert sq.output_error([big], np.zeros_like(ref)) > 0  # no 0 / 0


def test_shared_group_scale_uses_max_over_weights():
    m = ln_qkv()
    cfg = ON_05
    prep, data = _data(m, normal_x(), cfg)
    (group,) = sq.find_groups(prep.graph, cfg)
    assert group.fold == "LayerNormalization"
    assert {mb.node for mb in group.members} == {"mm_q", "mm_k", "mm_v"}
    new, choices = smoothing.smooth(prep, cfg, data)
    (c,) = choices
    g0, g1 = Graph(m), Graph(new.model)
    assert c.scales is not None and c.scales.shape == (K,)
    w_max = np.max([np.abs(g0.array(f"w{q}")).max(axis=1) for q in "qkv"], axis=0)
    ln = prep.graph.array("ln_s")
    # the s every member got (W' / W, row by row) is one vector, and it follows the reference
    got = [g1.array(f"w{q}")[:, 0] / g0.array(f"w{q}")[:, 0] for q in "qkv"]
    np.testing.assert_allclose(got[0], got[1], rtol=1e-5)
    np.testing.assert_allclose(got[0], got[2], rtol=1e-5)
    np.testing.assert_allclose(g1.array("ln_s"), ln / got[0], rtol=1e-5)
    # s = max|X|^0.5 / max|W|^0.5 with max|X| measured by the pass (LayerNorm output)
    st = smoothing.channel_stats(prep, data, ["ln"], 16, False)[0]["ln"]
    ref = np.sqrt(np.maximum(np.abs(st.lo), np.abs(st.hi))) / np.sqrt(w_max)
    np.testing.assert_allclose(got[0], ref, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Float outputs unchanged


@pytest.mark.parametrize(
    ("build", "x", "fold"),
    [
        (ln_qkv, normal_x(), "LayerNormalization"),
        (lambda: ln_qkv(residual=True), normal_x(), ""),
        (bias_add, normal_x(), "Add"),
        (lone, outlier_x(), ""),
        (lambda: lone(gemm=True), outlier_x(shape=(K,)), ""),
        (gemm_relu_gemm, outlier_x(shape=(K,)), "Relu > Gemm"),
    ],
    ids=["layernorm", "residual_reader", "bias_add", "lone_matmul", "gemm_transb", "relu_gemm"],
)
def test_float_outputs_equal_after_smoothing(build, x, fold):
    m = build()
    prep, data = _data(m, x, ON_05)
    new, choices = smoothing.smooth(prep, ON_05, data)
    folds = {c.group.fold for c in choices if c.layers[-1] not in ("mm0", "fc1")}
    assert fold in folds
    assert all(c.alpha == 0.5 for c in choices)
    inserted = sq.inserted_ops(new.model)
    assert bool(inserted) == any(not c.group.fold for c in choices)
    assert new.model.SerializeToString() != m.SerializeToString()
    ref, got = _run(m, x), _run(new.model, x)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_residual_reader_keeps_original_tensor():
    """A tensor also read by a non-candidate (the residual Add) cannot take 1/s in its
    producer: a Div is inserted and only the group's MatMuls read its output."""
    prep, data = _data(ln_qkv(residual=True), normal_x(), ON_05)
    new, _ = smoothing.smooth(prep, ON_05, data)
    g = Graph(new.model)
    assert g.node_by_name["residual"].input[0] == "ln"
    assert all(g.node_by_name[f"mm_{q}"].input[0] != "ln" for q in "qkv")
    np.testing.assert_array_equal(g.array("ln_s"), prep.graph.array("ln_s"))


def test_runtime_check_rejects_a_wrong_transform(monkeypatch):
    prep, data = _data(lone(), outlier_x(), ON_05)
    real = sq.apply_smoothing

    def broken(model, choices):
        out = real(model, choices)
        for t in out.graph.initializer:
            if t.name == "w":
                t.CopyFrom(_i("w", nh.to_array(t) * 1.5))
        return out

    monkeypatch.setattr(sq, "apply_smoothing", broken)
    new, choices = smoothing.smooth(prep, ON_05, data)
    assert choices == []
    assert new.model.SerializeToString() == prep.model.SerializeToString()
    assert "changed the float outputs" in new.notes[-1]


def test_the_float_check_builds_a_session_of_the_smoothed_model_only(sessions_built):
    """The original model's outputs come from the statistics pass's first batch (they are what
    a plain session gives on those samples), so smoothing builds two sessions, not three."""
    x = outlier_x()
    prep, data = _data(lone(), x, ON_05)
    stats, ref = smoothing.channel_stats(prep, data, ["x"], 16, False)
    assert ref.samples == 16 and stats["x"].seen == len(x)
    np.testing.assert_array_equal(ref.feeds["x"], x[:16])
    np.testing.assert_allclose(ref.outputs["y"], _run(lone(), x[:16]), rtol=1e-5, atol=1e-4)
    made = sessions_built
    made.clear()  # the statistics pass above
    new, choices = smoothing.smooth(prep, ON_05, data)
    assert choices and len(made) == 2
    assert "changed the float outputs" not in new.notes[-1]


# ---------------------------------------------------------------------------------------------
# Choosing alpha


def _error(x, w, s):
    """Independent reference: X/s at a min/max uint8 grid, s*W per column int8, relative error."""
    xs = x.reshape(-1, K) / s
    lo, hi = min(xs.min(), 0.0), max(xs.max(), 0.0)
    sc = (hi - lo) / 255
    zp = np.clip(np.rint(-lo / sc), 0, 255)
    xq = (np.clip(np.rint(xs / sc) + zp, 0, 255) - zp) * sc
    ws = w * s[:, None]
    wsc = np.abs(ws).max(axis=0) / 127
    wq = np.clip(np.rint(ws / wsc), -127, 127) * wsc
    ref = x.reshape(-1, K) @ w
    return float(np.sum((xq @ wq - ref) ** 2) / np.sum(ref**2))


def test_alpha_selection_lowers_error_on_planted_outlier():
    m = lone()
    w = Graph(m).array("w").astype(np.float64)
    x = outlier_x()
    rows = x.reshape(-1, K)
    lo, hi = rows.min(0), rows.max(0)
    group = sq.Group("x", (sq.Member("mm", "w"),))
    auto = config_from_dict({"smoothquant": {"enabled": "auto"}}).smoothquant
    both = (sq.Sample(rows, lo, hi),) * 2  # ranges fitted on the rows they are scored on
    c = sq.choose(group, both, [w], (auto, sq.LayerGrid()))
    assert c.alpha is not None and 0.0 < c.alpha <= 1.0
    # the error model agrees with an independent numpy reference (two folds: twice the error)
    assert c.err_off == pytest.approx(2 * _error(x, w, np.ones(K)), rel=1e-6)
    assert c.err == pytest.approx(2 * _error(x, w, c.scales), rel=1e-6)
    x_absmax = np.abs(rows).max(0)
    a0 = _error(x, w, sq.smooth_scales(x_absmax, np.abs(w).max(1), 0.0))
    assert c.err < 0.5 * c.err_off and c.err <= 2 * a0
    # end to end: the quantized model's output error is lower with auto than with smoothing off
    ref = _run(m, x)
    errs = {}
    for mode in (False, "auto"):
        cfg = config_from_dict(
            {"smoothquant": {"enabled": mode}, "outlier_split": {"enabled": False}}
        )
        res = amq.quantize(m, [{"x": xi[None]} for xi in x], cfg, cache_dir=None)
        errs[mode] = float(np.sum((_run(res.model, x) - ref) ** 2) / np.sum(ref**2))
        assert any("SmoothQuant mm: alpha" in n for n in res.summary.notes) == (mode == "auto")
    assert errs["auto"] < 0.5 * errs[False]


def test_a_wide_group_is_scored_on_a_subset_of_its_columns_with_scales_from_all(monkeypatch):
    """A group with more output columns than SCORE_COLUMNS is scored on evenly spaced ones: the
    same alpha and nearly the same error as scored on all 6000, and the scales from max |W| over
    every column (the largest weight of each input channel sits in a column left out)."""
    r = np.random.default_rng(3)
    w = r.normal(size=(K, 6000)) * 0.2
    x = outlier_x()
    rows = x.reshape(-1, K)
    halves = tuple(sq.Sample(h_, h_.min(0), h_.max(0)) for h_ in (rows[0::2], rows[1::2]))
    scored = sq.scored_columns([w])[0]
    assert scored.shape == (K, sq.SCORE_COLUMNS)
    np.testing.assert_array_equal(scored[:, [0, -1]], w[:, [0, -1]])
    left_out = np.setdiff1d(np.arange(6000), np.linspace(0, 5999, sq.SCORE_COLUMNS).astype(int))
    w[np.arange(K), left_out[:K]] = 5.0  # each channel's largest |W|, in columns not scored
    scored = sq.scored_columns([w])[0]
    group = sq.Group("x", (sq.Member("mm", "w"),))
    auto, grid = Config().smoothquant, sq.LayerGrid()
    sub = sq.choose(group, halves, [scored], (auto, grid), None, sq.weights_absmax([w]))
    monkeypatch.setattr(sq, "SCORE_COLUMNS", 10**6)
    full = sq.choose(group, halves, [w], (auto, grid))
    assert sub.alpha == full.alpha is not None
    assert sub.err == pytest.approx(full.err, rel=0.1)
    assert sub.err_off == pytest.approx(full.err_off, rel=0.1)
    both = np.maximum(np.abs(rows).max(0), 0)
    np.testing.assert_allclose(sub.scales, sq.smooth_scales(both, np.full(K, 5.0), sub.alpha))
    np.testing.assert_allclose(sub.scales, full.scales)


def test_auto_leaves_an_outlier_free_layer_alone():
    m = lone()
    x = normal_x()
    rows = x.reshape(-1, K)
    group = sq.Group("x", (sq.Member("mm", "w"),))
    auto = Config().smoothquant
    assert auto.enabled == SmoothMode.AUTO
    w = Graph(m).array("w")
    halves = tuple(sq.Sample(r, r.min(0), r.max(0)) for r in (rows[0::2], rows[1::2]))
    c = sq.choose(group, halves, [w], (auto, sq.LayerGrid()))
    if c.alpha is not None:  # smoothed only when that measurably lowered the error
        assert c.err < (1 - sq.MIN_GAIN) * c.err_off
    else:
        assert c.err >= (1 - sq.MIN_GAIN) * c.err_off


@pytest.mark.parametrize("name", ["conv_bn_relu", "conv_transpose", "add_residual", "mul"])
def test_cnn_models_have_no_candidates(name):
    model, calib, _ = tm.build(name)[:3]
    cfg = Config()
    prep = prepare(model, cfg)
    assert sq.find_groups(prep.graph, cfg) == []
    data = open_data(calib, prep.specs, cfg)
    new, choices = smoothing.smooth(prep, cfg, data)
    assert choices == [] and new is prep


def test_quantize_writes_alpha_in_resolved_config(tmp_path):
    m = lone()
    x = outlier_x()
    out = tmp_path / "m.q.onnx"
    no_split = config_from_dict({"outlier_split": {"enabled": False}})  # it would take mm
    res = amq.quantize(m, [{"x": xi[None]} for xi in x], no_split, out, cache_dir=None)
    text = res.config_path.read_text()
    assert "# SmoothQuant mm: alpha" in text
    assert config_from_dict(yaml.safe_load(text)).smoothquant == Config().smoothquant
    assert sq.inserted_ops(res.model)  # the Div stays float: its input has no QDQ
    g = Graph(res.model)
    mul = g.node_by_name[sq.inserted_ops(res.model)[0]]
    assert g.producer.get(mul.input[0]) is None


# ---------------------------------------------------------------------------------------------
# Config


def test_config_round_trip_and_errors():
    for d in (
        {"enabled": "auto", "alpha": "auto"},
        {"enabled": True, "alpha": 0.5},
        {"enabled": False, "alpha": 1},
    ):
        cfg = config_from_dict({"smoothquant": d})
        again = config_from_dict(yaml.safe_load(dump_config(cfg)))
        assert again == cfg
    cfg = config_from_dict({"smoothquant": {"enabled": True, "alpha": 0.5}})
    assert cfg.smoothquant.enabled == SmoothMode.ON and cfg.smoothquant.alpha == 0.5
    assert Config().smoothquant.alpha is None
    for bad, msg in (
        ({"enabled": "yes"}, "expected auto, true or false"),
        ({"enabled": 1}, "expected auto, true or false"),
        ({"alpha": 1.5}, "expected a number in [0, 1]"),
        ({"alpha": "half"}, "expected a number in [0, 1]"),
        ({"alfa": 0.5}, "did you mean 'alpha'"),
    ):
        with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            config_from_dict({"smoothquant": bad})


@pytest.mark.parametrize("seed", range(6))
def test_alpha_search_finds_the_best_grid_alpha_of_a_valley_with_fewer_evaluations(seed):
    r = np.random.default_rng(seed)
    centre, width, power = r.uniform(0, 1), r.uniform(0.05, 1.0), r.uniform(1, 3)
    calls = []

    def err(a):
        calls.append(a)
        return abs(a - centre) ** power / width + 0.1

    want = min(sq.ALPHAS, key=lambda a: (err(a), a))
    calls.clear()
    e, a = sq.search_alpha(err)
    assert a == want and e == err(a)
    assert len(set(calls)) <= 12 < len(sq.ALPHAS)


def test_alpha_search_stops_after_the_coarse_pass_when_its_best_is_hopeless():
    calls = []

    def err(a):
        calls.append(a)
        return (a - 0.33) ** 2 + 1.0

    coarse = {sq.ALPHAS[i] for i in range(0, len(sq.ALPHAS), sq.COARSE)} | {sq.ALPHAS[-1]}
    e, a = sq.search_alpha(err, hopeless=1.0)  # every error is >= 1.0
    assert set(calls) == coarse and a == 0.4 and e == err(0.4)
    calls.clear()
    e, a = sq.search_alpha(err, hopeless=1.5)  # the coarse best (1.0049) is below: fine pass
    assert a == 0.35 and len(set(calls)) > len(coarse)


def test_auto_skips_the_fine_pass_only_where_smoothing_cannot_halve_the_error(monkeypatch):
    """On auto, a group smoothing cannot help is scored on the coarse alphas only; one with an
    outlier channel still gets the fine pass and is smoothed at the best fine alpha."""
    seen = []
    real = sq.cross_error

    def spy(halves, weights, alpha, grid, refs=None, w_absmax=None):
        seen.append(alpha)
        return real(halves, weights, alpha, grid, refs, w_absmax)

    monkeypatch.setattr(sq, "cross_error", spy)
    r = np.random.default_rng(0)
    w = [r.normal(size=(16, 8)).astype(np.float32)]
    grid = sq.LayerGrid(method="minmax")
    cfg = (SmoothQuantConfig(enabled=SmoothMode.AUTO), grid)
    group = sq.Group("x", (sq.Member("mm", "w"),))

    def halves(x):
        return tuple(sq.Sample(h, h.min(axis=0), h.max(axis=0)) for h in (x[::2], x[1::2]))

    flat = r.normal(size=(256, 16)).astype(np.float32)  # no outlier channel
    c = sq.choose(group, halves(flat), w, cfg)
    n_coarse = len({*range(0, len(sq.ALPHAS), sq.COARSE), len(sq.ALPHAS) - 1})
    assert c.alpha is None and len(seen) == 1 + n_coarse  # the unsmoothed error + coarse
    seen.clear()
    spiky = flat.copy()
    spiky[:, 3] *= 300.0  # one channel 300x wider: smoothing pays
    c = sq.choose(group, halves(spiky), w, cfg)
    assert c.alpha is not None and c.err < sq.MIN_GAIN * c.err_off
    assert len(seen) > 1 + n_coarse
    full = min(sq.ALPHAS, key=lambda a: sq.cross_error(halves(spiky), w, a, grid))
    assert c.alpha == full


def test_quantize_lets_the_model_before_smoothing_go(monkeypatch):
    """Once smoothed, the float model as prepared is no longer held (by quantize nor by the
    workspace): a transformer's weights were kept twice for the whole run."""
    import gc
    import weakref

    from amq import api
    from amq.calib import workspace

    seen: dict = {}
    real_init, real_summarize = workspace.Workspace.__init__, api.summarize

    def init(self, prep, *a, **k):
        seen["before"] = weakref.ref(prep)
        real_init(self, prep, *a, **k)

    def summarize(ws, *a, **k):
        gc.collect()
        seen["alive"] = seen["before"]() is not None
        seen["smoothed"] = ws.prep is not seen["before"]()
        return real_summarize(ws, *a, **k)

    monkeypatch.setattr(workspace.Workspace, "__init__", init)
    monkeypatch.setattr(api, "summarize", summarize)
    res = amq.quantize(ln_qkv(), [{"x": xi[None]} for xi in outlier_x()], ON_05, cache_dir=None)
    assert res.model is not None
    assert (seen["alive"], seen["smoothed"]) == (False, True)
