"""Bias correction (amq/quant/algorithms/bias_correction.py, data pass amq/calib/corrections.py):
the shift against an independent numpy reference, the noise test, the int32 bias written, the
output's mean error removed on held-out data, the per-(layer, grids) reuse, and the config."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

import amq
from amq.calib import corrections
from amq.config import config_from_dict, dump_config, load_config
from amq.errors import ConfigError
from amq.quant import qmath
from amq.quant.algorithms import bias_correction as bc
from amq.runtime import Execution, session_for

C_IN, C_OUT, HW = 6, 5, 4
W4 = {"weights": {"bits": 4}}
OFF = {"algorithms": {"bias_correction": False}}


def conv1x1() -> onnx.ModelProto:
    """One 1x1 Conv with a bias, its output the graph output: y = W x + b per position."""
    r = np.random.default_rng(0)
    w = (r.standard_normal((C_OUT, C_IN, 1, 1)) * 0.4).astype(np.float32)
    b = (r.standard_normal(C_OUT) * 0.1).astype(np.float32)
    g = h.make_graph(
        [h.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")],
        "conv1x1",
        [h.make_tensor_value_info("x", T.FLOAT, ["n", C_IN, HW, HW])],
        [h.make_tensor_value_info("y", T.FLOAT, ["n", C_OUT, HW, HW])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


def feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Inputs with a positive mean per channel (as after a Relu), so that rounding the weights
    moves the output's mean."""
    r = np.random.default_rng(seed)
    base = np.linspace(0.5, 2.0, C_IN, dtype=np.float32)[None, :, None, None]
    return [
        {"x": (np.abs(r.standard_normal((1, C_IN, HW, HW))) + base).astype(np.float32)}
        for _ in range(n)
    ]


def reference_shift(model: onnx.ModelProto, plan, calib) -> np.ndarray:
    """E[W x] - E[W_q x_q] per output channel, in numpy, over the samples the pass reads."""
    w = numpy_helper.to_array(model.graph.initializer[0]).reshape(C_OUT, C_IN)
    wt, xt = plan.tensors["w"], plan.tensors["x"]
    wq = qmath.fake_quantize(w, np.asarray(wt.scale), 0, qmath.grid(wt.bits, True, wt.narrow), 0)
    ag = qmath.grid(xt.bits, xt.signed)
    diffs = []
    for f in calib[: corrections.SAMPLES]:
        x = f["x"][0].reshape(C_IN, -1).astype(np.float64)
        xq = qmath.fake_quantize(x, xt.scale[0], xt.zero_point[0], ag)
        diffs.append(w.astype(np.float64) @ x - wq.astype(np.float64) @ xq)
    return np.concatenate(diffs, axis=1).mean(axis=1)


def test_shift_matches_numpy_reference():
    m, calib = conv1x1(), feeds(80, 1)
    res = amq.quantize(m, calib, config_from_dict(W4), cache_dir=None, summary_samples=0)
    corr = np.asarray(res.plan.tensors["b"].correction)
    ref = reference_shift(m, res.plan, calib)
    assert corr.shape == (C_OUT,)
    kept = corr != 0
    assert kept.sum() >= C_OUT - 1  # a W4 rounding shift of a positive input is not noise
    step = np.asarray(res.plan.tensors["b"].scale)  # whole steps of the int32 bias grid
    assert np.all(np.abs(corr - ref)[kept] <= step[kept] * 0.5 + 1e-7)
    np.testing.assert_allclose(corr / step, np.rint(corr / step), atol=1e-3)
    assert any("bias correction: 1 of 1 layer(s) corrected" in n for n in res.summary.notes)


def test_int32_bias_holds_the_corrected_values():
    m, calib = conv1x1(), feeds(64, 1)
    res = amq.quantize(m, calib, config_from_dict(W4), cache_dir=None, summary_samples=0)
    tp = res.plan.tensors["b"]
    b = numpy_helper.to_array(m.graph.initializer[1]).astype(np.float64)
    q = {i.name: numpy_helper.to_array(i) for i in res.model.graph.initializer}["b_quantized"]
    want = np.rint((b + np.asarray(tp.correction)) / np.asarray(tp.scale))
    np.testing.assert_array_equal(q, want.astype(np.int32))


@pytest.mark.parametrize("bits", [8, 16])
def test_corrections_are_whole_8_bit_steps_that_float_noise_does_not_move(bits):
    """A shift becomes whole steps of the bias grid that 8-bit operands give (at 16 bits,
    65536 of its own steps): another CPU's float noise in a shift's last bits (here 1e-5 of it,
    several 16-bit steps) moves no code, and a shift under half such a step is dropped."""
    from amq.plan import LayerPlan, QuantPlan, TensorPlan

    step8 = np.array([1e-4, 2e-4, 4e-4])
    own = step8 / (65536.0 if bits == 16 else 1.0)  # s_x * s_w of this layer's own grids
    shift = np.array([3.4e-4, -1.1e-3, 1.9e-4])

    def corrected(s: np.ndarray) -> list[float]:
        lp = LayerPlan("conv", "Conv", True, weight_bits=bits, act_bits=bits, bias="b")
        tp = TensorPlan("b", "bias", 32, True, True, axis=0, scale=list(own))
        plan = QuantPlan({"conv": lp}, {"b": tp})
        bc.apply(plan, {"conv": s}, lambda name: np.zeros(3, np.float32))
        return tp.correction

    want = [float(np.float32(v)) for v in (3e-4, -1.2e-3, 0.0)]
    assert corrected(shift) == want
    assert corrected(shift * (1 + 1e-5)) == want


def _mean_error(model: onnx.ModelProto, qmodel: onnx.ModelProto, data) -> np.ndarray:
    f = session_for(model, Execution.IDEAL)
    q = session_for(qmodel, Execution.IDEAL)
    err = [q.run(None, d)[0] - f.run(None, d)[0] for d in data]
    return np.concatenate(err).mean(axis=(0, 2, 3))


def test_held_out_mean_error_shrinks():
    m, calib, held = conv1x1(), feeds(64, 1), feeds(64, 7)
    on = amq.quantize(m, calib, config_from_dict(W4), cache_dir=None, summary_samples=0)
    off = amq.quantize(m, calib, config_from_dict({**W4, **OFF}), cache_dir=None, summary_samples=0)
    e_on, e_off = _mean_error(m, on.model, held), _mean_error(m, off.model, held)
    assert np.abs(e_on).max() < 0.3 * np.abs(e_off).max()
    assert not off.plan.tensors["b"].correction


def test_noise_is_not_a_shift():
    r = np.random.default_rng(0)
    acc = bc.Accumulator()
    for _ in range(8):  # per-sample means scatter around 0 with sd 1; one channel offset by 3
        means = r.standard_normal((4, 2)) + np.array([0.0, 3.0])
        acc.add(means * 10, means, np.array([4, 2, 10]))
    s = acc.shift()
    assert s[0] == 0.0
    assert s[1] == pytest.approx(acc.total[1] / 320)


def test_any_batching_gives_the_same_shift():
    """Per-sample sums added one by one: 12 samples in batches of 5, 5, 2 or one at a time give
    the same bits (the memory budget may pick the batch)."""
    r = np.random.default_rng(1)
    sums = r.standard_normal((12, 3)).astype(np.float32) * 1e3
    means = sums / 7

    def shift(cuts):
        acc = bc.Accumulator()
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            acc.add(sums[a:b], means[a:b], np.array([b - a, 3, 7]))
        return acc.shift(), acc.total

    one = shift(list(range(13)))
    for cuts in ([0, 5, 10, 12], [0, 12]):
        got = shift(cuts)
        assert np.array_equal(got[0], one[0]) and np.array_equal(got[1], one[1])


def test_one_pass_per_layer_and_grids(monkeypatch):
    runs = []
    real = corrections.BiasCorrectionPass._run

    def counting(self, plan, layers, shapes, show):
        runs.append([lp.name for lp in layers])
        return real(self, plan, layers, shapes, show)

    monkeypatch.setattr(corrections.BiasCorrectionPass, "_run", counting)
    from amq.calib.data import open_data
    from amq.calib.prepare import prepare
    from amq.calib.workspace import Workspace

    cfg = config_from_dict(W4)
    prep = prepare(conv1x1(), cfg)
    ws = Workspace(prep, cfg, open_data(feeds(16, 1), prep.specs, cfg), None, False)
    a = ws.plan(cfg)
    b = ws.plan(cfg)  # same grids: no second pass
    assert runs == [["conv"]]
    assert a.tensors["b"].correction == b.tensors["b"].correction
    ws.plan(config_from_dict({"weights": {"bits": 8}}))  # new weight grid: one more
    assert runs == [["conv"], ["conv"]]


def test_gemm_layers_are_corrected():
    from tests.models import gemm

    m, calib, _ = gemm()
    res = amq.quantize(m, calib, config_from_dict(W4), cache_dir=None, summary_samples=0)
    assert any(res.plan.tensors[b].correction for b in ("b1", "b2"))


def test_config_round_trip_and_errors(tmp_path):
    cfg = config_from_dict(OFF)
    assert cfg.algorithms.bias_correction.value == "false"
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p).algorithms == cfg.algorithms
    assert config_from_dict({}).algorithms.bias_correction.value == "auto"
    with pytest.raises(ConfigError, match="algorithms.*bias_corection.*did you mean"):
        config_from_dict({"algorithms": {"bias_corection": True}})
    with pytest.raises(ConfigError, match="expected auto, true or false"):
        config_from_dict({"algorithms": {"bias_correction": "sometimes"}})


def test_qparams_json_carries_the_correction_only_when_set(tmp_path):
    m, calib = conv1x1(), feeds(32, 1)
    on = amq.quantize(m, calib, config_from_dict(W4), tmp_path / "on.onnx", cache_dir=None)
    off = amq.quantize(
        m, calib, config_from_dict({**W4, **OFF}), tmp_path / "off.onnx", cache_dir=None
    )
    d_on = json.loads(on.qparams_path.read_text())["tensors"]["b"]
    d_off = json.loads(off.qparams_path.read_text())["tensors"]["b"]
    assert len(d_on["correction"]) == C_OUT and "correction" not in d_off


def test_qat_handoff_refuses_it_and_turns_auto_off(tmp_path):
    from amq.qat.handoff import _no_auto_smoothing

    with pytest.raises(ConfigError, match="bias_correction: true is for post-training"):
        _no_auto_smoothing(config_from_dict({"algorithms": {"bias_correction": True}}))
    assert _no_auto_smoothing(config_from_dict({})).algorithms.bias_correction.value == "false"


def test_compare_measures_a_corrected_bias_against_the_corrected_float_bias():
    from amq import api

    m, calib = conv1x1(), feeds(64, 1)
    res = amq.quantize(m, calib, config_from_dict(W4), cache_dir=None, summary_samples=0)
    rep = api.compare(m, res.model, calib[:8])
    row = rep.row("b")
    # only the int32 rounding is left (half a step at most), not the shift (many steps)
    step = max(res.plan.tensors["b"].scale)
    assert row.max_abs_diff <= step / 2 + 1e-7
    assert max(abs(v) for v in res.plan.tensors["b"].correction) > 4 * step
    assert row.note.startswith("bias corrected")


def test_a_layer_first_seen_in_a_later_plan_is_corrected():
    """Sensitivity and search build plans with other layers quantized than the first one: the
    pass must measure those too (it once kept only the first plan's layers)."""
    from amq.calib.data import open_data
    from amq.calib.prepare import prepare
    from amq.calib.workspace import Workspace
    from tests.models import gemm

    m, calib, _ = gemm()
    first = config_from_dict({**W4, "layers": {"/fc2/Gemm": {"skip": True}}})
    prep = prepare(m, first)
    ws = Workspace(prep, first, open_data(calib, prep.specs, first), None, False)
    assert "b2" not in ws.plan(first).tensors
    later = ws.plan(config_from_dict(W4))
    assert later.tensors["b2"].correction


def _conv_ref(x: np.ndarray, w: np.ndarray, geo: dict) -> np.ndarray:
    """A direct convolution in float64 (no bias), one loop per output position: the reference
    the window sums are checked against."""
    nd = len(geo["kernel"])
    pads = geo["pads"]
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    g, c_out = geo["group"], w.shape[0]
    cin_g = w.shape[1]
    span = [geo["dilations"][i] * (geo["kernel"][i] - 1) + 1 for i in range(nd)]
    outs = [(xp.shape[2 + i] - span[i]) // geo["strides"][i] + 1 for i in range(nd)]
    y = np.zeros((x.shape[0], c_out, *outs))
    for pos in np.ndindex(*outs):
        sl = tuple(
            slice(p * geo["strides"][i], p * geo["strides"][i] + span[i], geo["dilations"][i])
            for i, p in enumerate(pos)
        )
        for c in range(c_out):
            gi = c // (c_out // g)
            patch = xp[(slice(None), slice(gi * cin_g, (gi + 1) * cin_g), *sl)]
            y[(slice(None), c, *pos)] = np.tensordot(patch, w[c], axes=w.ndim - 1)
    return y


GEOMETRIES = [  # (x shape, weight shape, attributes)
    ((2, 4, 9, 9), (6, 4, 3, 3), {"pads": [1, 1, 1, 1]}),
    ((2, 4, 9, 8), (6, 4, 3, 3), {"pads": [0, 1, 1, 0], "strides": [2, 2]}),
    ((2, 4, 11, 10), (6, 2, 3, 2), {"pads": [2, 0, 1, 3], "strides": [2, 3], "dilations": [2, 1], "group": 2}),
    ((2, 4, 7, 7), (4, 1, 5, 5), {"pads": [2, 2, 2, 2], "group": 4}),
    ((2, 4, 7, 7), (6, 4, 3, 3), {"pads": [4, 0, 0, 4]}),  # padding wider than the window
    ((2, 4, 8, 8), (6, 4, 1, 1), {"strides": [2, 2]}),
    ((2, 4, 8, 8), (6, 4, 3, 3), {"auto_pad": "VALID", "strides": [1, 2]}),
    ((2, 3, 17), (5, 3, 5), {"pads": [2, 1], "strides": [2], "dilations": [2]}),
    ((2, 4, 2, 3), (6, 4, 5, 3), {"pads": [2, 1, 2, 1]}),  # fewer rows than the window
    ((2, 4, 3, 9), (6, 4, 5, 3), {"pads": [3, 1, 3, 0], "strides": [3, 2], "dilations": [1, 2]}),
]  # fmt: skip


@pytest.mark.parametrize("shape_x, shape_w, attrs", GEOMETRIES)
def test_window_sums_give_the_convolutions_mean_difference(shape_x, shape_w, attrs, monkeypatch):
    """The probe's Conv path (window sums of x - x_q and x_q, no copy of the layer) gives per
    sample and channel the sum over output positions of conv(x, W) - conv(x_q, W_q), as a
    direct convolution of both copies computes it; strides, dilations, groups and padding
    (asymmetric, wider than the window, VALID) included."""
    from amq.graph.model import Graph
    from amq.quant.algorithms import window_sums

    r = np.random.default_rng(3)
    w = (r.standard_normal(shape_w) * 0.5).astype(np.float32)
    b = np.zeros(shape_w[0], np.float32)
    node = h.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", **attrs)
    dyn = ["n", shape_x[1], *(f"d{i}" for i in range(len(shape_x) - 2))]
    g = h.make_graph(
        [node], "c", [h.make_tensor_value_info("x", T.FLOAT, dyn)],
        [h.make_tensor_value_info("y", T.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )  # fmt: skip
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    calib = [
        {"x": (r.standard_normal((1, *shape_x[1:])) + 0.7).astype(np.float32)} for _ in range(8)
    ]
    res = amq.quantize(m, calib, config_from_dict(W4), cache_dir=None, summary_samples=0)
    lp = res.plan.layers["conv"]
    monkeypatch.setattr(window_sums, "MIN_MACS", 0)  # small layers: the sums forced
    monkeypatch.setattr(window_sums, "MIN_MACS_PER_VALUE", 0)
    probe = bc.probe_model(Graph(m), res.plan, [lp], {"conv": (1, shape_w[0], *shape_x[2:])})
    assert "conv" in probe.sums  # the window-sum path, not a copy of the layer
    x = (r.standard_normal(shape_x) + 0.7).astype(np.float32)
    values = dict(zip([o.name for o in probe.model.graph.output], session_for(probe.model, Execution.IDEAL).run(None, {"x": x}), strict=True))  # fmt: skip
    totals, means, shape = probe.terms("conv", values)
    xt = res.plan.tensors["x"]
    xq = qmath.fake_quantize(
        x.astype(np.float64), xt.scale[0], xt.zero_point[0], qmath.grid(xt.bits, xt.signed)
    )
    wq = bc.dequantized_weight(res.plan.tensors["w"], w)
    geo = window_sums.geometry(attrs, shape_w)
    if attrs.get("auto_pad") == "VALID":
        geo["pads"] = (0,) * (2 * (len(shape_x) - 2))
    d = _conv_ref(x.astype(np.float64), w.astype(np.float64), geo) - _conv_ref(xq, wq, geo)
    want = d.reshape(*d.shape[:2], -1)
    np.testing.assert_allclose(
        totals, want.sum(axis=2), rtol=1e-5, atol=1e-5 * np.abs(want).sum(axis=2).max()
    )
    assert shape[2] == want.shape[2]
    np.testing.assert_allclose(
        means, want.mean(axis=2), rtol=1e-5, atol=1e-5 * np.abs(want).mean(axis=2).max()
    )


def test_window_sums_are_used_where_they_cost_less_than_a_copy():
    """A dense 3x3 Conv of 64 channels on a 128x128 map: window sums; a depthwise 3x3 (9
    multiply-adds an input value) or a small layer: a quantized copy."""
    from amq.quant.algorithms import window_sums

    def pays(w_shape, y_shape, group=1, strides=(1, 1)):
        geo = window_sums.geometry(
            {"group": group, "strides": list(strides), "pads": [1] * 4}, w_shape
        )
        return window_sums.pays(geo, w_shape, y_shape)

    assert pays((64, 64, 3, 3), (1, 64, 128, 128))
    assert not pays((64, 1, 3, 3), (1, 64, 128, 128), group=64)
    assert not pays((64, 64, 3, 3), (1, 64, 8, 8))  # 2.4 M multiply-adds
    assert pays((32, 16, 3, 3), (1, 32, 256, 256), strides=(2, 2))  # 72 a value
    assert not pays((16, 16, 1, 1), (1, 16, 256, 256), strides=(2, 2))  # 4 a value


def test_shifts_are_kept_on_disk_beside_the_statistics(tmp_path, monkeypatch):
    """A second quantize of the same model and data with the same cache reads the shifts (no
    probe run) and writes the same corrections; a damaged cache file is recomputed."""
    runs = []
    real = corrections.BiasCorrectionPass._run

    def counting(self, plan, layers, shapes, show):
        runs.append(len(layers))
        return real(self, plan, layers, shapes, show)

    monkeypatch.setattr(corrections.BiasCorrectionPass, "_run", counting)
    m, calib = conv1x1(), feeds(16, 1)
    first = amq.quantize(m, calib, config_from_dict(W4), cache_dir=tmp_path, summary_samples=0)
    files = list(tmp_path.glob(f"{corrections.KIND}-*.npz"))
    assert runs == [1] and len(files) == 1
    again = amq.quantize(m, calib, config_from_dict(W4), cache_dir=tmp_path, summary_samples=0)
    assert runs == [1]  # read from the cache
    assert again.plan.tensors["b"].correction == first.plan.tensors["b"].correction != []
    files[0].write_bytes(b"not an npz")
    third = amq.quantize(m, calib, config_from_dict(W4), cache_dir=tmp_path, summary_samples=0)
    assert runs == [1, 1]
    assert third.plan.tensors["b"].correction == first.plan.tensors["b"].correction
    other = feeds(16, 2)  # other data: another key, another pass
    amq.quantize(m, other, config_from_dict(W4), cache_dir=tmp_path, summary_samples=0)
    assert runs == [1, 1, 1]


def test_window_sums_and_the_copy_agree_on_samples_of_different_sizes(monkeypatch):
    """Calibration images of two sizes (the batches cut where shapes change): the window sums,
    whose slices count from each tensor's ends and whose numpy side reads each batch's rows,
    give the copy's shifts (the same channels kept, values within float rounding)."""
    from amq.quant.algorithms import window_sums

    r = np.random.default_rng(5)
    w = (r.standard_normal((6, 4, 3, 3)) * 0.5).astype(np.float32)
    g = h.make_graph(
        [h.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[0, 0, 0, 2], strides=[2, 1])],
        "sizes",
        [h.make_tensor_value_info("x", T.FLOAT, ["n", 4, "h", "w"])],
        [h.make_tensor_value_info("y", T.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(6, np.float32), "b")],
    )  # fmt: skip
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    calib = [
        {"x": (r.standard_normal((1, 4, *((17, 12) if i % 2 else (10, 21)))) + 0.6).astype(np.float32)}
        for i in range(24)
    ]  # fmt: skip
    assert len({f["x"].shape for f in calib}) == 2  # two sizes (odd and even rows), interleaved

    def shifts(force: bool):
        monkeypatch.setattr(window_sums, "pays", lambda *a: force)
        res = amq.quantize(m, calib, config_from_dict(W4), cache_dir=None, summary_samples=0)
        return np.asarray(res.plan.tensors["b"].correction)

    sums, copy = shifts(True), shifts(False)
    assert sums.shape == copy.shape == (6,) and np.any(copy != 0)
    np.testing.assert_allclose(sums, copy, rtol=1e-4, atol=1e-6)


def conv_relu() -> onnx.ModelProto:
    """conv1x1 with a Relu after it: the Conv's output lands on the Relu's quantized grid, the
    step its shift's precision is judged in."""
    m = conv1x1()
    m.graph.node.append(h.make_node("Relu", ["y"], ["r"], name="relu"))
    m.graph.output[0].name = "r"
    return m


def _settling_point(model, plan, calib) -> int | None:
    """The first checkpoint where the per-sample mean differences' standard errors, RMS over
    the channels, are under SETTLED steps of the output grid: numpy, from the samples."""
    w = numpy_helper.to_array(model.graph.initializer[0]).reshape(C_OUT, C_IN).astype(np.float64)
    wt, xt = plan.tensors["w"], plan.tensors["x"]
    wq = qmath.fake_quantize(w, np.asarray(wt.scale), 0, qmath.grid(wt.bits, True, wt.narrow), 0)
    ag = qmath.grid(xt.bits, xt.signed)
    means = []
    for f in calib:
        x = f["x"][0].reshape(C_IN, -1).astype(np.float64)
        xq = qmath.fake_quantize(x, xt.scale[0], xt.zero_point[0], ag)
        means.append((w @ x - wq @ xq).mean(axis=1))
    step = max(plan.tensors["y"].scale)
    for k in bc.CHECKPOINTS:
        se = np.std(means[:k], axis=0, ddof=1) / np.sqrt(k)
        if k <= len(calib) and np.sqrt(np.mean(se**2)) <= bc.SETTLED * step:
            return k
    return None


def test_the_pass_stops_once_every_shift_has_settled(batches_read):
    """Where the shift's standard error is a small part of the output grid's step after a
    checkpoint's samples, the probe reads no more; the shift is the mean over those samples."""
    read = batches_read(corrections)
    m, calib = conv_relu(), feeds(64, 1)
    res = amq.quantize(m, calib, config_from_dict(W4), cache_dir=None, summary_samples=0)
    k = _settling_point(m, res.plan, calib)
    assert k is not None and k < 64  # this data settles (the test's premise)
    assert sum(read) < 64 and sum(read) - read[-1] < k <= sum(read)  # stopped in k's batch
    assert any(f"{k} of 64 calibration sample(s)" in n for n in res.summary.notes)
    corr = np.asarray(res.plan.tensors["b"].correction)
    step = np.asarray(res.plan.tensors["b"].scale)
    assert np.all(np.abs(corr - reference_shift(m, res.plan, calib[:k])) <= step * 0.5 + 1e-7)
    assert not np.all(np.abs(corr - reference_shift(m, res.plan, calib)) <= step * 0.5 + 1e-7)


def test_a_float_output_reads_every_sample():
    """No output grid to judge the shift in: every sample the pass takes is read."""
    m, calib = conv1x1(), feeds(40, 1)
    res = amq.quantize(m, calib, config_from_dict(W4), cache_dir=None, summary_samples=0)
    assert any("40 calibration sample(s))" in n for n in res.summary.notes)


def test_settling_is_the_same_in_any_batches():
    """Layers stop at the first checkpoint where all of them had settled, with the sums of
    exactly that many samples, whether the batches cross it or not; a layer that never settles
    (its samples scatter too much, or no step) keeps the others reading."""
    r = np.random.default_rng(2)
    calm = (r.standard_normal((40, 3)) * 0.01 + 1.0) * 7
    wild = r.standard_normal((40, 3)) * 7

    def run(cuts, rows, step):
        accs = [bc.Accumulator(0.1), bc.Accumulator(step)]
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            for acc, sums in zip(accs, (calm, rows), strict=True):
                acc.add(sums[a:b], sums[a:b] / 7, np.array([b - a, 3, 7]))
            stop = bc.settled(accs)
            if stop is not None:
                for acc in accs:
                    acc.rewind(stop)
                break
        return stop, [(acc.samples, acc.shift().tolist(), acc.positions) for acc in accs]

    one = run(list(range(41)), calm, 0.1)
    assert one[0] == 8 and one[1][0] == (8, (calm[:8].sum(0) / 56).tolist(), 56)
    for cuts in ([0, 5, 10, 40], [0, 40], [0, 3, 6, 9, 12]):
        assert run(cuts, calm, 0.1) == one
    assert run([0, 5, 10, 40], wild, 0.1)[0] is None  # reads on
    assert run([0, 40], calm, None)[0] is None


def test_a_kept_shift_serves_a_coarser_output_grid_not_a_finer_one(tmp_path, monkeypatch):
    """A shift that settled on its output's step is read again from the cache where the output
    grid is as coarse or coarser; where it is finer the pass reads more samples."""
    runs = []
    real_run, real_step = corrections.BiasCorrectionPass._run, bc.output_step

    def counting(self, plan, layers, shapes, show):
        got = real_run(self, plan, layers, shapes, show)
        runs.append(next(iter(got.values()))[1][0])  # samples read
        return got

    monkeypatch.setattr(corrections.BiasCorrectionPass, "_run", counting)
    m, calib = conv_relu(), feeds(64, 1)

    def quantize(factor):
        monkeypatch.setattr(bc, "output_step", lambda p, lp: factor * real_step(p, lp))
        return amq.quantize(m, calib, config_from_dict(W4), cache_dir=tmp_path, summary_samples=0)

    quantize(1.0)
    assert len(runs) == 1 and runs[0] < 64
    quantize(2.0)
    assert len(runs) == 1  # coarser: from the cache
    quantize(0.01)
    assert runs[1:] == [64]  # finer: every sample
    quantize(0.001)
    assert len(runs) == 2  # read every sample: serves any grid
