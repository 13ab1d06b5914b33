"""Percentile ranges widened to the mse range (``calibration.widen_to_mse``): the mse search
against brute force, the widened range, and ``auto`` choosing by the outputs - widening where
the tails reach the output, not where a saturating op drops them."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

import amq
from amq.calib import range_choice
from amq.config import SmoothMode, config_from_dict, dump_config, load_config
from amq.errors import ConfigError
from amq.quant import observers as obs
from amq.quant import qmath
from amq.runtime import Execution, session_for


def _stats(x: np.ndarray) -> obs.TensorStats:
    o = obs.HistogramObserver()
    o.update(x.astype(np.float32), float(x.min()), float(x.max()))
    return o.stats


DISTS = {
    "normal": lambda r: r.standard_normal(50_000),
    "laplace": lambda r: r.laplace(0, 1, 50_000),
    "cube": lambda r: r.standard_normal(50_000) ** 3,
    "relu": lambda r: np.maximum(r.standard_normal(50_000), 0),
    "two clusters": lambda r: np.concatenate([r.normal(0, 1, 45_000), r.normal(30, 1, 5_000)]),
    "uniform": lambda r: r.uniform(-1, 1, 50_000),
}


@pytest.mark.parametrize("name", list(DISTS))
@pytest.mark.parametrize("bits", [4, 8])
def test_mse_search_finds_the_brute_force_minimum(name, bits):
    s = _stats(DISTS[name](np.random.default_rng(0)))
    lo, hi = min(s.min, 0.0), max(s.max, 0.0)
    alphas = np.linspace(1 / 128, 1, 128)
    ranges = [(lo * a, hi * a) for a in alphas]
    r, c = obs.sq_error_curves(s, ranges, bits, False)
    best = ranges[int(np.argmin(r + c))]
    got = obs.range_mse(s, bits, False)
    e = obs.expected_sq_error
    assert e(s, *got, bits, False) <= e(s, *best, bits, False) * (1 + 1e-9)


def test_error_curves_match_the_one_range_error():
    s = _stats(np.random.default_rng(1).laplace(0, 1, 20_000))
    ranges = [(-3.0, 2.0), (-1.0, 1.0), (-8.0, 9.0)]
    r, c = obs.sq_error_curves(s, ranges, 8, False)
    for i, (lo, hi) in enumerate(ranges):
        # the scalar form, reimplemented here bin by bin (uniform inside each bin)
        scale, zp, g = qmath.activation_qparams(lo, hi, 8, False)
        qlo, qhi = (g.qmin - zp) * scale, (g.qmax - zp) * scale
        raw = s.edges()
        e = np.clip(raw, s.min, s.max)
        rnd = clip = 0.0
        for j in np.flatnonzero(s.counts):
            xs = np.linspace(e[j], e[j + 1], 2001)
            mid = np.clip((raw[j] + raw[j + 1]) / 2, s.min, s.max)  # the bin's centre
            if qlo <= mid <= qhi:
                rnd += s.counts[j] * np.mean((xs - np.rint(xs / scale) * scale) ** 2)
            else:
                clip += s.counts[j] * (mid - np.clip(mid, qlo, qhi)) ** 2
        n = s.counts.sum()
        assert r[i] == pytest.approx(rnd / n, rel=2e-3)
        assert c[i] == pytest.approx(clip / n, rel=1e-9, abs=1e-12)


def test_widened_range_keeps_what_either_keeps():
    s = _stats(np.random.default_rng(2).laplace(0, 0.3, 200_000))
    p = obs.range_percentile(s, 99.99)
    m = obs.range_mse(s, 8, False)
    w = obs.select_range(s, "percentile", 8, False, 99.99, widen=True)
    assert w == (min(p[0], m[0]), max(p[1], m[1]))
    assert w[1] > p[1] * 1.05  # the Laplace tail is worth keeping at 8 bits
    assert obs.select_range(s, "percentile", 8, False, 99.99) == p


def _two_convs(act: str | None, gain: float) -> onnx.ModelProto:
    """x [n, 8, 16, 16] -> 1x1 Conv (gain x identity) -> act -> 1x1 Conv (8 -> 4) -> y."""
    r = np.random.default_rng(0)
    w1 = (np.eye(8) * gain).reshape(8, 8, 1, 1).astype(np.float32)
    w2 = (r.standard_normal((4, 8, 1, 1)) * 0.5).astype(np.float32)
    nodes = [h.make_node("Conv", ["x", "w1"], ["h"], name="c1")]
    t = "h"
    if act:
        nodes.append(h.make_node(act, ["h"], ["a"], name="act"))
        t = "a"
    nodes.append(h.make_node("Conv", [t, "w2"], ["y"], name="c2"))
    g = h.make_graph(
        nodes,
        "two_convs",
        [h.make_tensor_value_info("x", T.FLOAT, ["n", 8, 16, 16])],
        [h.make_tensor_value_info("y", T.FLOAT, ["n", 4, 16, 16])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


def _laplace(n: int) -> list[dict[str, np.ndarray]]:
    x = np.random.default_rng(1).laplace(0, 0.3, (n, 8, 16, 16)).astype(np.float32)
    return [{"x": x[i : i + 1]} for i in range(n)]


def _noise(model, qmodel, feeds) -> float:
    f, q = session_for(model, Execution.IDEAL), session_for(qmodel, Execution.IDEAL)
    ref = np.concatenate([f.run(None, d)[0] for d in feeds]).astype(np.float64)
    got = np.concatenate([q.run(None, d)[0] for d in feeds]).astype(np.float64)
    return float(((ref - got) ** 2).sum() / (ref**2).sum())


@pytest.mark.parametrize(
    "act, gain, widened",
    [
        (None, 1.0, True),  # a linear model: the Laplace tails reach the output
        ("Tanh", 4.0, False),  # tanh saturates beyond |x| ~ 0.8: clipping there is free
    ],
)
def test_auto_takes_the_range_with_the_smaller_output_error(act, gain, widened):
    m, calib = _two_convs(act, gain), _laplace(128)
    res = {
        w: amq.quantize(
            m,
            calib,
            config_from_dict({"calibration": {"widen_to_mse": w}}),
            cache_dir=None,
            summary_samples=0,
        )  # fmt: skip
        for w in ("auto", True, False)
    }
    used = calib[: range_choice.MAX_SAMPLES]
    err = {w: _noise(m, res[w].model, used) for w in (True, False)}
    assert (err[True] < range_choice.MARGIN * err[False]) == widened, err
    auto = res["auto"]
    assert auto.plan.tensors["x"].method == (
        "percentile, widened to mse" if widened else "percentile"
    )
    assert _noise(m, auto.model, used) == pytest.approx(err[widened], rel=1e-6)
    (note,) = [n for n in auto.summary.notes if n.startswith("activation ranges:")]
    assert ("widened to mse (" in note) == widened and f"{len(used)} calibration sample" in note


def test_no_choice_is_run_when_nothing_would_change(monkeypatch):
    m, calib = _two_convs(None, 1.0), _laplace(16)
    ran = []
    monkeypatch.setattr(range_choice, "output_error", lambda *a, **k: ran.append(1) or [1, 1])
    # minmax ranges are never widened: both plans are the same
    cfg = config_from_dict({"calibration": {"method": "minmax", "widen_to_mse": "auto"}})
    res = amq.quantize(m, calib, cfg, cache_dir=None, summary_samples=0)
    assert not ran and not any(n.startswith("activation ranges") for n in res.summary.notes)


def test_config(tmp_path):
    assert config_from_dict({}).calibration.widen_to_mse == SmoothMode.ON
    cfg = config_from_dict({"calibration": {"widen_to_mse": False}})
    assert cfg.calibration.widen_to_mse == SmoothMode.OFF
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(cfg))
    assert "widen_to_mse: false" in p.read_text()
    assert load_config(p).calibration == cfg.calibration
    with pytest.raises(ConfigError, match="calibration.widen_to_mse.*expected auto, true or false"):
        config_from_dict({"calibration": {"widen_to_mse": "more"}})
