"""Outlier split (amq/quant/algorithms/outlier_split.py, decided in amq/calib/smoothing.py): the
float model is unchanged by the split, the channel sets tried, the error model against an
independent numpy reference, the choice on a planted outlier, end to end accuracy against the
unsplit model, and the config."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto as T
from onnx import helper as h

import amq
from amq.calib import smoothing
from amq.config import config_from_dict, dump_config
from amq.errors import ConfigError
from amq.graph.model import Graph
from amq.quant.algorithms import outlier_split as split
from amq.quant.algorithms import smoothquant as sq
from tests.unit.test_smoothquant import BIG, K, _data, _run, ln_qkv, lone, normal_x, outlier_x

SPLIT_ON = config_from_dict({"outlier_split": {"enabled": True}})
OFF = config_from_dict({"smoothquant": {"enabled": False}, "outlier_split": {"enabled": False}})


def _sample(x: np.ndarray) -> sq.Sample:
    rows = x.reshape(-1, K).astype(np.float64)
    return sq.Sample(rows, rows.min(0), rows.max(0))


def test_candidates_are_top_channels_within_the_fraction():
    a = np.ones(100)
    a[[5, 60, 61]] = [50.0, 40.0, 30.0]
    sets = split.candidates(a)
    assert [s.tolist() for s in sets] == [[5], [5, 60]]  # k = 1, 2 (k = 4 > 3 wide channels)
    assert split.candidates(np.ones(100)) == []  # no channel wider than MIN_RATIO x median
    assert split.candidates(np.r_[np.ones(10), 50.0]) == []  # under MIN_CHANNELS
    many = np.ones(400)
    many[:40] = 100.0
    assert max(len(s) for s in split.candidates(many)) == 16  # 5% of 400 = 20 -> k <= 16


@pytest.mark.parametrize("build", [lone, ln_qkv], ids=["one_matmul", "qkv_group"])
def test_float_outputs_equal_after_split(build):
    m = build()
    x = outlier_x() if build is lone else normal_x()
    prep, data = _data(m, x, SPLIT_ON)
    new, decisions = smoothing.smooth(prep, SPLIT_ON, data)
    (d,) = decisions
    assert isinstance(d, split.Split)
    g = Graph(new.model)
    g0 = Graph(m)
    for name in d.layers:  # the member keeps its name and input, its outlier rows zeroed
        node = g.node_by_name[name]
        assert node.input[0] == d.group.tensor
        w0, w = g0.array(node.input[1]), g.array(node.input[1])
        assert not w[list(d.index)].any()
        np.testing.assert_array_equal(np.delete(w, d.index, 0), np.delete(w0, d.index, 0))
        out = g.node_by_name[f"{name}_outliers"]
        np.testing.assert_array_equal(g.array(out.input[1]), w0[list(d.index)])
        assert g.node_by_name[f"{name}_outlier_sum"].op_type == "Add"
    (gather,) = [n for n in g.nodes if n.op_type == "Gather"]  # one for the whole group
    assert g.shape(gather.output[0])[-1] == len(d.index)
    ref, got = _run(m, x), _run(new.model, x)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def _error(x: np.ndarray, w: np.ndarray, index: list[int]) -> float:
    """Independent reference: each channel part at its own min/max uint8 grid, its weight rows
    per column int8 (symmetric, 127), the parts' products summed; relative error."""
    rows = x.reshape(-1, K).astype(np.float64)
    rest = [j for j in range(K) if j not in index]
    y = 0.0
    for sel in (index, rest):
        xs = rows[:, sel]
        lo, hi = min(xs.min(), 0.0), max(xs.max(), 0.0)
        sc = (hi - lo) / 255
        zp = np.clip(np.rint(-lo / sc), 0, 255)
        xq = (np.clip(np.rint(xs / sc) + zp, 0, 255) - zp) * sc
        ws = w[sel]
        wsc = np.abs(ws).max(axis=0) / 127
        y = y + xq @ (np.clip(np.rint(ws / wsc), -127, 127) * wsc)
    ref = rows @ w
    return float(np.sum((y - ref) ** 2) / np.sum(ref**2))


def test_error_model_matches_reference_and_finds_the_outliers():
    w = Graph(lone()).array("w").astype(np.float64)
    x = outlier_x()
    s = _sample(x)
    got = split.split_error(s, s, [w], np.array(BIG), sq.LayerGrid())
    assert got == pytest.approx(_error(x, w, BIG), rel=1e-6)
    best = split.best_split((s, s), [w], sq.LayerGrid())
    assert best is not None
    err, index = best
    assert index.tolist() == BIG  # both planted channels, not one
    # far below the unsplit error, and below SmoothQuant's best on the same scale
    off = sq.cross_error((s, s), [w], None, sq.LayerGrid())
    smooth_best = min(sq.cross_error((s, s), [w], a, sq.LayerGrid()) for a in sq.ALPHAS)
    assert err < 0.1 * off and err < smooth_best


def test_auto_splits_the_planted_outlier_and_is_more_accurate(tmp_path):
    """With SmoothQuant off (on this Gaussian layer SmoothQuant at alpha 1 is better still: the
    decision between the two is the error model's, tested above)."""
    m, x = lone(), outlier_x(n=64)
    cfg = config_from_dict({"smoothquant": {"enabled": False}})
    calib = [{"x": xi[None]} for xi in x[:48]]
    res = amq.quantize(m, calib=calib, config=cfg, output=tmp_path / "a.onnx")
    ops = {n.name for n in res.model.graph.node}
    assert {"mm_outliers", "mm_outlier_sum"} <= ops
    assert any("outlier split mm: 2 of 32 input channels" in n for n in res.summary.notes)
    assert "outlier split mm" in (tmp_path / "a.amq.yaml").read_text()
    off = amq.quantize(m, calib=calib, config=OFF)
    test = x[48:]
    ref = _run(m, test)

    def err(model):
        return float(np.sum((_run(model, test) - ref) ** 2) / np.sum(ref**2))

    assert err(res.model) < 0.2 * err(off.model)


def test_auto_leaves_outlier_free_input_alone():
    prep, data = _data(lone(), normal_x(), config_from_dict({}))
    new, decisions = smoothing.smooth(prep, config_from_dict({}), data)
    assert not any(isinstance(d, split.Split) for d in decisions)
    assert split.inserted_ops(new.model) == []


def test_smoothquant_true_is_not_overridden_by_auto_split():
    cfg = config_from_dict({"smoothquant": {"enabled": True}})
    prep, data = _data(lone(), outlier_x(), cfg)
    _, decisions = smoothing.smooth(prep, cfg, data)
    assert all(isinstance(d, sq.Choice) and d.alpha is not None for d in decisions)


def test_config_round_trip_and_errors():
    assert config_from_dict({}).outlier_split.enabled.value == "auto"
    cfg = config_from_dict({"outlier_split": {"enabled": False}})
    assert "outlier_split: {enabled: false}" in dump_config(cfg)
    assert config_from_dict(__import__("yaml").safe_load(dump_config(cfg))) == cfg
    with pytest.raises(ConfigError, match=r"outlier_split.enabled: expected auto, true or false"):
        config_from_dict({"outlier_split": {"enabled": "sometimes"}})
    with pytest.raises(ConfigError, match="outlier_split"):
        config_from_dict({"outlier_split": {"ratio": 3}})


def test_float_readers_of_a_float_op_output_read_the_exact_value():
    """A float Add beside the Q/K/V MatMuls reads the LayerNorm output itself, not its Q/DQ
    copy (emit_qdq: _Emitter.reads_float); the MatMuls read the copy."""
    m = ln_qkv()
    m.graph.node.append(h.make_node("Add", ["ln", "x"], ["res"], name="residual"))
    m.graph.output.append(h.make_tensor_value_info("res", T.FLOAT, None))
    res = amq.quantize(m, [{"x": xi[None]} for xi in normal_x(16)], OFF, cache_dir=None)
    assert not res.plan.layers["residual"].quantized
    g = Graph(res.model)
    assert g.node_by_name["residual"].input[0] == "ln"
    for q in "qkv":
        dq = g.producer[g.node_by_name[f"mm_{q}"].input[0]]
        assert dq.op_type == "DequantizeLinear" and g.producer[dq.input[0]].input[0] == "ln"


def test_float_readers_of_a_quantized_layer_output_keep_the_copy():
    """A quantized layer's output keeps one reader form: its Q must be the only reader of the
    float output for onnxruntime to fuse it into the layer (QLinearMatMul)."""
    from tests import models as tm  # noqa: PLC0415

    m, calib = tm.add_residual()[:2]
    res = amq.quantize(m, calib, cache_dir=None, summary_samples=0)
    g = Graph(res.model)
    for name, lp in res.plan.layers.items():
        if not lp.quantized or lp.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        for o in lp.outputs:
            readers = {c.op_type for c in g.consumers.get(o, [])}
            assert readers <= {"QuantizeLinear"} or o not in res.plan.tensors, (name, readers)


def test_compare_matches_split_parts_and_skips_rescaled_tensors():
    """compare reads the model's float provenance: a split part is compared with its channels
    (activations) or rows (weights) of the float tensor; a tensor or weight SmoothQuant
    rescaled is a note, not a row with a wrong reference."""
    from amq.api import compare  # noqa: PLC0415

    m, x = lone(), outlier_x(n=48)
    cfg = config_from_dict({"smoothquant": {"enabled": False}, "outlier_split": {"enabled": True}})
    calib = [{"x": xi[None]} for xi in x]
    res = amq.quantize(m, calib, cfg, cache_dir=None, summary_samples=0)
    rep = compare(m, res.model, calib[:8])
    names = {r.name for r in rep.rows}
    assert {"x", "x_outliers", "w", "w_outliers"} <= names, names
    for n in ("x", "x_outliers", "w", "w_outliers"):
        assert rep.row(n).sqnr_db > 30, (n, rep.row(n).sqnr_db)  # right reference: no mismatch
    # x is compared without the outlier channels its grid clips (their weight rows are zero)
    assert rep.row("x").clipped_fraction < 0.01
    assert not any("unmatched" in n or "shape" in n for n in rep.notes), rep.notes
    # SmoothQuant: the Q/K/V weights are rescaled (a Div before them: the LayerNorm output
    # also feeds the residual Add); the Div's output is compared with the float tensor / s
    on = config_from_dict({"smoothquant": {"enabled": True}, "outlier_split": {"enabled": False}})
    m2 = ln_qkv(residual=True)
    calib2 = [{"x": xi[None]} for xi in normal_x(16)]
    res2 = amq.quantize(m2, calib2, on, cache_dir=None, summary_samples=0)
    rep2 = compare(m2, res2.model, calib2[:8])
    names2 = {r.name for r in rep2.rows}
    assert {"ln_smoothed", "res_smoothed"} <= names2 and not {"wq", "wk", "wv"} & names2, names2
    assert rep2.row("ln_smoothed").sqnr_db > 30  # against the float ln / s
    for t in ("wq", "wk", "wv", "wr"):
        assert any(n.startswith(f"{t}: rescaled per channel by SmoothQuant") for n in rep2.notes)


def test_dynamic_layers_are_not_split():
    """A dynamic layer quantizes its input from each batch's own extremes, outlier channels
    included: the split's fitted grid would not apply, so it is not split."""
    cfg = config_from_dict({"activations": {"dynamic": True}, "outlier_split": {"enabled": True}})
    prep, data = _data(lone(), outlier_x(), cfg)
    _, decisions = smoothing.smooth(prep, cfg, data)
    assert not any(isinstance(d, split.Split) for d in decisions)


def test_auto_prefers_the_split_where_it_halves_the_error():
    """Both on auto: the split is taken where it halves the unchanged error, even where
    SmoothQuant's one-layer error is lower (on this Gaussian layer it is: alpha 1); a Gemm is
    left to SmoothQuant."""
    cfg = config_from_dict({})
    prep, data = _data(lone(), outlier_x(), cfg)
    _, (d,) = smoothing.smooth(prep, cfg, data)
    assert isinstance(d, split.Split) and d.err < 0.5 * d.err_off
    prep, data = _data(lone(gemm=True), outlier_x(shape=(K,)), cfg)
    _, (d,) = smoothing.smooth(prep, cfg, data)
    assert isinstance(d, sq.Choice)  # a Gemm is never split


def test_alpha_search_runs_only_for_groups_the_split_does_not_take(monkeypatch):
    """The split is scored first: where it wins on auto, SmoothQuant's alpha is never searched
    (it could not change the decision); where SmoothQuant is asked for by name, or the split is
    off, it is."""
    calls = []
    real = sq.search_alpha

    def spy(error, hopeless=float("inf")):
        calls.append(1)
        return real(error, hopeless)

    monkeypatch.setattr(sq, "search_alpha", spy)
    cfg = config_from_dict({})
    prep, data = _data(lone(), outlier_x(), cfg)
    _, (d,) = smoothing.smooth(prep, cfg, data)
    assert isinstance(d, split.Split) and calls == []
    for forced in ({"smoothquant": {"enabled": True}}, {"outlier_split": {"enabled": False}}):
        cfg = config_from_dict(forced)
        prep, data = _data(lone(), outlier_x(), cfg)
        _, (d,) = smoothing.smooth(prep, cfg, data)
        assert isinstance(d, sq.Choice) and d.alpha is not None and calls
        calls.clear()


def test_split_error_with_known_parts_is_the_plain_error():
    w = Graph(lone()).array("w").astype(np.float64)
    x = outlier_x()
    fit, test = _sample(x[::2]), _sample(x[1::2])
    index = np.array(BIG)
    rest = np.setdiff1d(np.arange(K), index)
    plain = split.split_error(fit, test, [w], index, sq.LayerGrid())
    known = ([test.rows.astype(np.float64) @ w], split._quantized_parts([w], (index, rest), 8))
    assert split.split_error(fit, test, [w], index, sq.LayerGrid(), known) == plain > 0


def test_splits_applied_in_place_are_the_copy_s_edits():
    """copy=False edits the model it is given (smooth passes apply_smoothing's own copy) into
    exactly what the copying call returns, and smooth leaves the prepared model untouched."""
    m, x = lone(), outlier_x()
    prep, data = _data(m, x, SPLIT_ON)
    before = prep.model.SerializeToString()
    new, decisions = smoothing.smooth(prep, SPLIT_ON, data)
    assert prep.model.SerializeToString() == before
    splits = [d for d in decisions if isinstance(d, split.Split)]
    assert splits
    copied = split.apply_splits(prep.model, splits)
    assert prep.model.SerializeToString() == before
    mine = sq.apply_smoothing(prep.model, [])
    edited = split.apply_splits(mine, splits, copy=False)
    assert edited is mine
    assert edited.SerializeToString() == copied.SerializeToString()
