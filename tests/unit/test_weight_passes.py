"""Scale search and AdaRound (amq/quant/algorithms/scale_search.py, adaround.py) on the input
moments of layer_inputs.py: patches against onnxruntime's Conv, the search against a brute-force
reference on the rows themselves, AdaRound against rounding to nearest, the codes written, held-out
accuracy end to end, and the config."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

import amq
from amq.config import config_from_dict
from amq.errors import ConfigError
from amq.quant import qmath
from amq.quant.algorithms import adaround, layer_inputs, scale_search
from amq.runtime import Execution, session_for
from tests.models import conv_bn_relu, eval_feeds

INT4 = qmath.grid(4, True, True)


def _conv_model(w: np.ndarray, x_shape, **attrs) -> onnx.ModelProto:
    g = h.make_graph(
        [h.make_node("Conv", ["x", "w"], ["y"], **attrs)],
        "c",
        [h.make_tensor_value_info("x", T.FLOAT, list(x_shape))],
        [h.make_tensor_value_info("y", T.FLOAT, None)],
        [numpy_helper.from_array(w, "w")],
    )
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


@pytest.mark.parametrize(
    "attrs",
    [
        {"group": 1, "strides": [1, 1], "pads": [1, 1, 1, 1], "dilations": [1, 1]},
        {"group": 2, "strides": [2, 1], "pads": [0, 1, 2, 1], "dilations": [2, 1]},
        {"group": 4, "strides": [1, 2], "pads": [1, 0, 1, 0], "dilations": [1, 1]},
    ],
)
def test_patches_times_weight_matrix_is_the_conv(attrs):
    r = np.random.default_rng(0)
    x = r.standard_normal((2, 4, 7, 6)).astype(np.float32)
    w = r.standard_normal((8, 4 // attrs["group"], 3, 2)).astype(np.float32)
    y = session_for(_conv_model(w, x.shape, **attrs), Execution.IDEAL).run(None, {"x": x})[0]
    geo = (attrs["group"], attrs["strides"], attrs["pads"], attrs["dilations"])
    p = layer_inputs.conv_patches(x, w.shape, geo, max_rows=10**6)  # every position, in order
    m = layer_inputs.weight_matrix("Conv", w, attrs)
    got = np.einsum("pgk,gok->pgo", p, m).reshape(p.shape[0], -1)
    np.testing.assert_allclose(got, np.moveaxis(y, 1, -1).reshape(-1, 8), rtol=1e-4, atol=1e-4)


def test_matmul_rows_and_gram():
    r = np.random.default_rng(1)
    x = r.standard_normal((5, 3)).astype(np.float32)
    rows = layer_inputs.matmul_rows(x, {"transA": 1})
    np.testing.assert_array_equal(rows[:, 0, :], x.T)
    g = layer_inputs.Gram()
    g.add(rows[:2])
    g.add(rows[2:])
    np.testing.assert_allclose(
        g.value()[0], (x.astype(np.float64) @ x.T) / 3, rtol=2.5e-4
    )  # snapped
    w = r.standard_normal((6, 4))  # MatMul [K, N] -> [1, N, K] and back
    m = layer_inputs.weight_matrix("MatMul", w, {})
    assert m.shape == (1, 4, 6)
    np.testing.assert_array_equal(layer_inputs.from_matrix("MatMul", m, w, {}), w)


def _layer(seed: int = 0, co: int = 6, k: int = 24, n: int = 4000):
    r = np.random.default_rng(seed)
    x = r.standard_normal((n, k)) * np.linspace(0.2, 3.0, k)  # channels of different energy
    x[:, :4] += 1.5  # and a mean, as after a Relu
    w = r.standard_normal((co, k)) * 0.3
    w[0, 0] = 3.0  # one outlier weight: absmax wastes most of channel 0's grid
    gram = layer_inputs.Gram()
    gram.add(x[:, None, :])
    return x, w[None], gram.value()


def test_search_matches_brute_force_on_the_rows():
    x, w, hm = _layer()
    s0 = np.abs(w).max(axis=2, keepdims=True) / INT4.qmax
    ratios, e_abs, e_best = scale_search.search(w, s0, INT4, hm, per_channel=True)
    for o in range(w.shape[1]):  # each channel's ratio: the least squared error on the rows
        errs = []
        for a in scale_search.RATIOS:
            wq = np.clip(np.rint(w[0, o] / (a * s0[0, o])), INT4.qmin, INT4.qmax) * a * s0[0, o]
            errs.append(np.mean((x @ (wq - w[0, o])) ** 2))
        chosen = errs[list(scale_search.RATIOS).index(ratios[0, o])]
        assert chosen <= min(errs) * (1 + 1e-3)  # H is snapped to 12 bits: near-ties may swap
    assert ratios[0, 0] < 1.0 and e_best < e_abs
    one, *_ = scale_search.search(w, s0, INT4, hm, per_channel=False)
    assert one.shape == (1, 1)


def test_adaround_beats_nearest_and_ends_binary():
    x, w, hm = _layer(seed=3)
    s = np.abs(w).max(axis=2, keepdims=True) / INT4.qmax
    up = adaround.learn(w, s, INT4, hm)
    assert up.dtype == bool and up.shape == w.shape
    nearest = np.clip(np.rint(w / s), INT4.qmin, INT4.qmax) * s
    learned = np.clip(np.floor(w / s) + up, INT4.qmin, INT4.qmax) * s
    e_near = np.mean((x @ (nearest[0] - w[0]).T) ** 2)
    e_learn = np.mean((x @ (learned[0] - w[0]).T) ** 2)
    assert e_learn < 0.8 * e_near
    assert adaround.output_error(w, learned, hm) == pytest.approx(e_learn, rel=1e-3)  # snapped H
    # every code is floor or floor + 1: at most one step from the float value
    assert np.all(np.abs(learned - w) <= s + 1e-12)


def test_pack_round_trip():
    r = np.random.default_rng(0)
    up = r.random((3, 5, 7)) > 0.5
    assert np.array_equal(adaround.unpack(adaround.pack(up), up.shape), up)


def _w4(passes: bool) -> dict:
    a = {} if passes else {"algorithms": {"adaround": False, "scale_search": False}}
    return {"weights": {"bits": 4}, **a}


def _sqnr(model, qmodel, feeds) -> float:
    f, q = session_for(model, Execution.IDEAL), session_for(qmodel, Execution.IDEAL)
    ref = np.concatenate([f.run(None, d)[0].ravel() for d in feeds])
    got = np.concatenate([q.run(None, d)[0].ravel() for d in feeds])
    return float(10 * np.log10(np.sum(ref**2) / np.sum((ref - got) ** 2)))


def test_w4_held_out_accuracy_improves_and_codes_are_written(tmp_path):
    m, calib, _ = conv_bn_relu()
    on = amq.quantize(m, calib, config_from_dict(_w4(True)), tmp_path / "on.onnx", cache_dir=None)
    off = amq.quantize(m, calib, config_from_dict(_w4(False)), cache_dir=None)
    held = eval_feeds("conv_bn_relu", 8)
    assert _sqnr(m, on.model, held) > _sqnr(m, off.model, held) + 1.0
    notes = " ".join(on.summary.notes)
    assert "scale search:" in notes and "adaround:" in notes
    # the written int4 codes are the plan's (floor + learned bit), and qparams.json has them
    plan = json.loads(on.qparams_path.read_text())
    rounded = [n for n, t in plan["tensors"].items() if t.get("rounding")]
    assert rounded
    inits = {i.name: numpy_helper.to_array(i) for i in on.model.graph.initializer}
    folded = {
        i.name: numpy_helper.to_array(i)
        for i in amq.prepare(m, config_from_dict({})).model.graph.initializer
    }
    for name in rounded:
        tp = on.plan.tensors[name]
        want = adaround.codes(tp, folded[name])
        np.testing.assert_array_equal(inits[f"{name}_quantized"].astype(np.int64), want)
        near = np.rint(
            folded[name].astype(np.float64)
            / qmath.broadcast_qparams(folded[name], np.asarray(tp.scale), 0, tp.axis)[0]
        )
        assert np.abs(want - near).max() <= 1


def test_int8_default_leaves_weights_alone():
    m, calib, _ = conv_bn_relu()
    res = amq.quantize(m, calib, config_from_dict({}), cache_dir=None, summary_samples=0)
    assert not any(t.rounding or t.clip for t in res.plan.tensors.values())


def test_config_keys():
    c = config_from_dict({"algorithms": {"adaround": True, "scale_search": False}})
    assert (c.algorithms.adaround.value, c.algorithms.scale_search.value) == ("true", "false")
    with pytest.raises(ConfigError, match="did you mean 'adaround'"):
        config_from_dict({"algorithms": {"adaroud": True}})


def test_input_moments_are_cached_on_disk(tmp_path, monkeypatch):
    """A second W4 quantize with the same cache reads the moments: no model run for them, and
    the same rounding."""
    from amq.calib import grams

    m, calib, _ = conv_bn_relu()
    cfg = config_from_dict(_w4(True))
    first = amq.quantize(m, calib, cfg, cache_dir=tmp_path, summary_samples=0)
    assert list(tmp_path.glob("grams-*.npz"))

    def no_run(self, layers, show):
        raise AssertionError("the moments were recomputed")

    monkeypatch.setattr(grams.GramPass, "_run", no_run)
    second = amq.quantize(m, calib, cfg, cache_dir=tmp_path, summary_samples=0)
    assert {n: t.rounding for n, t in second.plan.tensors.items()} == {
        n: t.rounding for n, t in first.plan.tensors.items()
    }
