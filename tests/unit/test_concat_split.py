"""The concat split (#13 point 6): a Conv or MatMul reading a Concat of very different ranges,
computed per input-channel group, each group on its own activation grid and its own weight
scales, the partial outputs summed; or its input kept float where the split does not pay."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import amq
from amq import api
from amq.calib.concat_splitting import split_concats
from amq.calib.data import open_data
from amq.calib.prepare import prepare
from amq.config import config_from_dict
from amq.errors import ConfigError
from amq.graph.model import Graph
from amq.quant import qmath
from amq.quant.algorithms import concat_split as cs
from amq.quant.algorithms.smoothquant import LayerGrid, fitted_grid

F = TensorProto.FLOAT


def _init(name: str, a) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(a, np.float32), name)


def conv_head(
    narrow_weight: float = 1.0, wide: str = "Relu", group: int = 1, extra_reader: bool = False
) -> onnx.ModelProto:
    """tanh(conv(x)) (+-1) and 1000 * wide(conv(x)) concatenated on channels, then a 3x3 Conv
    with a bias. ``narrow_weight`` scales the head's weights on the wide part, so that both
    parts matter to its output; ``wide``: Relu, or Exp (a heavy tail)."""
    rng = np.random.default_rng(0)
    head = np.concatenate(
        [
            rng.normal(size=(6, 4 // group, 3, 3)),
            rng.normal(size=(6, 4 // group, 3, 3)) * narrow_weight,
        ],
        axis=1,
    )
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="ca", pads=[1] * 4),
        helper.make_node("Tanh", ["a"], ["ta"], name="tanh"),
        helper.make_node("Conv", ["x", "wb"], ["b"], name="cb", pads=[1] * 4),
        helper.make_node(wide, ["b"], ["rb"], name="wide"),
        helper.make_node("Mul", ["rb", "k"], ["big"], name="scale"),
        helper.make_node("Concat", ["ta", "big"], ["cat"], name="cat", axis=1),
        helper.make_node(
            "Conv", ["cat", "w2", "b2"], ["y"], name="head", pads=[1] * 4, group=group
        ),
    ]
    outputs = [helper.make_tensor_value_info("y", F, None)]
    if extra_reader:
        nodes.append(helper.make_node("ReduceMax", ["cat"], ["m"], name="other", keepdims=0))
        outputs.append(helper.make_tensor_value_info("m", F, None))
    inits = [
        _init("wa", rng.normal(size=(4, 3, 3, 3))),
        _init("wb", rng.normal(size=(4, 3, 3, 3)) * (0.3 if wide == "Relu" else 0.5)),
        _init("k", 1000.0),
        _init("w2", head),
        _init("b2", rng.normal(size=6)),
    ]
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", F, [1, 3, 8, 8])], outputs, inits
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def matmul_head() -> onnx.ModelProto:
    """[B, 5, 8] tokens: tanh(x @ wa) and 500 * relu(x @ wb) concatenated on the last axis, then
    a MatMul by a [12, 3] weight whose wide rows are small."""
    rng = np.random.default_rng(1)
    w2 = np.concatenate([rng.normal(size=(4, 3)), rng.normal(size=(8, 3)) * 2e-3])
    nodes = [
        helper.make_node("MatMul", ["x", "wa"], ["a"], name="ma"),
        helper.make_node("Tanh", ["a"], ["ta"], name="tanh"),
        helper.make_node("MatMul", ["x", "wb"], ["b"], name="mb"),
        helper.make_node("Relu", ["b"], ["rb"], name="relu"),
        helper.make_node("Mul", ["rb", "k"], ["big"], name="scale"),
        helper.make_node("Concat", ["ta", "big"], ["cat"], name="cat", axis=-1),
        helper.make_node("MatMul", ["cat", "w2"], ["y"], name="head"),
    ]
    inits = [
        _init("wa", rng.normal(size=(8, 4))),
        _init("wb", rng.normal(size=(8, 8))),
        _init("k", 500.0),
        _init("w2", w2),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", F, ["B", 5, 8])],
        [helper.make_tensor_value_info("y", F, None)],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def feeds(n: int, seed: int, shape=(1, 3, 8, 8)) -> list[dict[str, np.ndarray]]:
    r = np.random.default_rng(seed)
    return [{"x": r.normal(size=shape).astype(np.float32)} for _ in range(n)]


def run(model: onnx.ModelProto, fs) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the ideal math
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(["y"], f)[0] for f in fs])


def sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref**2) / np.sum((ref - got) ** 2)))


def _split(model, fs, algorithms=None):
    cfg = config_from_dict({"algorithms": algorithms or {}})
    prep = prepare(model, cfg)
    return split_concats(prep, cfg, open_data(fs, prep.specs, cfg), False)


# --- the graph edit -----------------------------------------------------------------------------


def test_candidates_are_conv_with_one_group_and_matmul_on_the_concat_axis():
    (c,) = cs.find_candidates(Graph(conv_head()))
    assert (c.concat, c.layer, c.parts, c.weight, c.channel_axis) == (
        "cat",
        "head",
        ("ta", "big"),
        "w2",
        1,
    )
    assert cs.find_candidates(Graph(conv_head(group=2))) == []
    (m,) = cs.find_candidates(Graph(matmul_head()))
    assert (m.layer, m.channel_axis) == ("head", 0)
    wrong_axis = matmul_head()
    wrong_axis.graph.node[5].attribute[0].i = 1  # the Concat joins tokens, not channels
    assert cs.find_candidates(Graph(wrong_axis)) == []


@pytest.mark.parametrize("build", [conv_head, matmul_head])
def test_split_computes_what_the_layer_computed(build):
    m = build()
    c = cs.find_candidates(Graph(m))[0]
    fs = feeds(3, 2, (1, 3, 8, 8) if build is conv_head else (2, 5, 8))
    widths = (4, 4) if build is conv_head else (4, 8)
    d = cs.Decision(c, widths, 100.0, 1.0, 1.0, 1.0, True)
    out = cs.apply(m, [d])
    np.testing.assert_allclose(run(out, fs), run(m, fs), rtol=1e-5, atol=1e-3)
    names = {n.name: n for n in out.graph.node}
    assert "cat" not in names and "w2" not in {t.name for t in out.graph.initializer}
    assert list(names["head"].input[:1]) == ["ta"] and list(names["head_part1"].input[:1]) == [
        "big"
    ]
    assert names["head_part_sum1"].output[0] == "y"
    if build is conv_head:  # the bias is added once, by the first part
        assert len(names["head"].input) == 3 and len(names["head_part1"].input) == 2


def test_a_concat_read_elsewhere_stays():
    m = conv_head(extra_reader=True)
    d = cs.Decision(cs.find_candidates(Graph(m))[0], (4, 4), 100.0, 1.0, 1.0, 1.0, True)
    out = cs.apply(m, [d])
    assert "cat" in {n.name for n in out.graph.node}
    fs = feeds(2, 3)
    np.testing.assert_allclose(run(out, fs), run(m, fs), rtol=1e-5, atol=1e-3)


# --- the measured decision ----------------------------------------------------------------------


def test_errors_match_an_independent_numpy_reference():
    """The MatMul case, in numpy: the layer output error with its input float, on one grid and
    split, as the pass measures them with the layer in onnxruntime."""
    m, fs = matmul_head(), feeds(16, 4, (2, 5, 8))
    _, (d,) = _split(m, fs)
    g = Graph(m)
    probe = onnx.ModelProto()
    probe.CopyFrom(m)
    probe.graph.output.extend([helper.make_tensor_value_info(t, F, None) for t in ("ta", "big")])
    s = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    ta, big = (np.concatenate(v) for v in zip(*[s.run(["ta", "big"], f) for f in fs], strict=True))
    w = g.array("w2").astype(np.float64)
    grid = LayerGrid(8, 8, False, "percentile", 99.99, True)

    def fq_act(x):
        scale, zp, gr = fitted_grid(x.ravel(), float(min(x.min(), 0)), float(max(x.max(), 0)), grid)
        return qmath.fake_quantize(x, scale, zp, gr)

    def fq_w(a):
        scale, zp = qmath.weight_qparams(a, 8, 1)
        return qmath.fake_quantize(a, scale, zp, qmath.grid(8, True, narrow=True), 1)

    x = np.concatenate([ta, big], -1)
    ref = x @ w
    rel = lambda y: float(np.sum((y - ref) ** 2) / np.sum(ref**2))  # noqa: E731
    want_float = rel(x @ fq_w(w))
    want_one = rel(fq_act(x) @ fq_w(w))
    want_split = rel(fq_act(ta) @ fq_w(w[:4]) + fq_act(big) @ fq_w(w[4:]))
    assert d.widths == (4, 8) and d.ratio > 16
    np.testing.assert_allclose(
        [d.err_float, d.err_one, d.err_split], [want_float, want_one, want_split], rtol=0.02
    )
    assert d.err_split < d.err_one / 100  # the narrow half is gone on one grid, kept split
    assert d.split


def test_auto_keeps_the_input_float_where_the_split_does_not_pay():
    """A heavy-tailed wide part (1000 * exp(conv)) read by large weights: its own grid still
    costs far more than the weights alone, so auto leaves the guard to keep the input float;
    true splits all the same."""
    m, fs = conv_head(narrow_weight=1.0, wide="Exp"), feeds(16, 5)
    prep, (d,) = _split(m, fs)
    assert not d.split and d.err_split > cs.SPLIT_FACTOR * d.err_float
    assert "head_part1" not in {n.name for n in prep.model.graph.node}
    assert any("input kept float" in n for n in prep.notes)
    prep, (d,) = _split(m, fs, {"concat_split": True})
    assert d.split and "head_part1" in {n.name for n in prep.model.graph.node}


def test_ranges_within_the_guard_ratio_are_left_alone():
    m = conv_head()
    cfg = config_from_dict({"guards": {"concat_range_ratio": 1e6}})
    prep = prepare(m, cfg)
    out, decisions = split_concats(prep, cfg, open_data(feeds(8, 6), prep.specs, cfg), False)
    assert decisions == [] and out.model is prep.model


# --- end to end ---------------------------------------------------------------------------------


def test_split_saves_a_layer_that_one_grid_and_a_float_input_both_lose(tmp_path):
    """The issue's case: a tanh feature (+-1) beside a x1000 feature, both weighed alike by the
    next Conv. One grid reads the tanh half as zeros; a float input still puts both weight
    halves on one per-channel scale, which zeroes the small weights. Split, each part has its
    grid and its weight scales, and the layer keeps integer kernels."""
    m, fs = conv_head(narrow_weight=1e-3), feeds(48, 7)
    ref = run(m, fs[32:])
    off = {"algorithms": {"concat_split": False}}
    default = amq.quantize(m, fs[:32], cache_dir=None, summary_samples=0)
    kept = amq.quantize(m, fs[:32], config_from_dict(off), cache_dir=None, summary_samples=0)
    assert sqnr(ref, run(default.model, fs[32:])) > 25
    assert sqnr(ref, run(kept.model, fs[32:])) < 10
    assert default.plan.layers["head"].quantized and default.plan.layers["head_part1"].quantized
    assert "cat" not in default.plan.float_tensors
    assert any("concat split: head" in n and ": split" in n for n in default.summary.notes)
    q_inputs = {n.input[0] for n in default.model.graph.node if n.op_type == "QuantizeLinear"}
    assert {"ta", "big"} <= q_inputs
    # onnxruntime runs both parts on integer kernels (the float-input layer had none)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(default.model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    assert ops.count("QLinearConv") == 4, ops  # ca, cb and the two parts of head


def test_config_and_qat():
    from amq.qat.handoff import _no_auto_smoothing

    assert config_from_dict({}).algorithms.concat_split.value == "auto"
    on = config_from_dict({"algorithms": {"concat_split": True}})
    with pytest.raises(ConfigError, match="concat_split: true is for post-training"):
        _no_auto_smoothing(on)
    assert _no_auto_smoothing(config_from_dict({})).algorithms.concat_split.value == "false"


def test_compare_runs_on_a_split_model():
    m, fs = conv_head(narrow_weight=1e-3), feeds(16, 8)
    res = amq.quantize(m, fs, cache_dir=None, summary_samples=0)
    rep = api.compare(m, res.model, fs[:4])
    rows = {r.name: r for r in rep.rows}
    assert {"ta", "big"} <= set(rows)  # each part on its own grid, measured against the float
    assert any(n.startswith("y_part1") and "no counterpart" in n for n in rep.notes)


def test_the_float_check_reuses_the_look_at_the_parts(sessions_built):
    """The split's float check compares with the original outputs that the pass over the parts
    fetched on its first batch: sessions for the 4-sample look, the 16-sample pass, the layer's
    measure and the split model; none for the original model again."""
    m, fs = conv_head(narrow_weight=1.0, wide="Exp"), feeds(16, 5)
    prep, (d,) = _split(m, fs, {"concat_split": True})
    assert d.split and "head_part1" in {n.name for n in prep.model.graph.node}
    assert len(sessions_built) == 4


# --- the first look, taken by quantize's calibration pass -----------------------------------------


def test_the_calibration_pass_look_gives_the_look_s_ratios():
    """RangeWatch over calls of 1, 3, 5 and 7 samples: each part's range over the first 4 and
    the first 16 samples, as split_concats' look computes it from their values."""
    from amq.calib import concat_splitting as csp
    from amq.calib.runner import Batch

    cand = cs.Candidate("cat", "head", ("ta", "big"), "w2", "Conv")
    r = np.random.default_rng(0)
    ta = np.tanh(r.normal(size=(16, 4, 8, 8))).astype(np.float32)
    big = np.maximum(r.normal(size=(16, 4, 8, 8)), 0).astype(np.float32) * np.linspace(
        1, 300, 16, dtype=np.float32
    ).reshape(16, 1, 1, 1)  # wider with every sample: the two looks differ
    w = csp.RangeWatch([cand], 16, 2.0)  # a ratio the first 4 samples pass: read on
    pos = 0
    for n in (1, 3, 5, 7):
        assert w.asked() == ["big", "ta"]
        w.take(Batch({}, [], n, {"ta": ta[pos : pos + n], "big": big[pos : pos + n]}))
        pos += n
    assert w.asked() == []
    for limit in (csp.PRECHECK, csp.SAMPLES):
        values = {"ta": [ta[:limit]], "big": [big[:limit]]}
        assert w.ratio(cand, limit) == csp._ratio(values, cand)
    assert w.ratio(cand, csp.SAMPLES) > 4 * w.ratio(cand, csp.PRECHECK)
    # a guard the first 4 samples stay well within: nothing is fetched after them, and the
    # look is settled (nothing to split) though it saw 4 of the 16 samples
    w = csp.RangeWatch([cand], 16, 1e6)
    w.take(Batch({}, [], 1, {"ta": ta[:1], "big": big[:1]}))
    assert w.asked() == ["big", "ta"]
    w.take(Batch({}, [], 3, {"ta": ta[1:4], "big": big[1:4]}))
    assert w.asked() == [] and w.settled()


def _deferred_and_eager(model, fs, cfg, monkeypatch=None):
    from dataclasses import replace

    from amq.calib import concat_splitting as csp
    from amq.calib.workspace import Workspace, plan_in_workspace

    prep = prepare(model, cfg)
    data = open_data(fs, prep.specs, cfg)
    eager = Workspace(prep, cfg, data, None, False)  # the look's own passes
    eager.ensure_opset_for(cfg)
    base = eager.structure(cfg)
    eager.observe(eager.sources(base) | eager.sources(eager.structure(replace(cfg, layers=()))))
    eager_plan = eager.plan(cfg, base)
    if monkeypatch is not None:
        monkeypatch.setattr(csp, "_part_values", lambda *a, **k: pytest.fail("a look's pass"))
    ws, plan, _ = plan_in_workspace(prep, cfg, data, None, False)
    return (eager, eager_plan), (ws, plan)


def test_a_concat_within_the_ratio_runs_no_look_of_its_own(monkeypatch):
    cfg = config_from_dict({"guards": {"concat_range_ratio": 1e6}})
    (eager, eager_plan), (ws, plan) = _deferred_and_eager(
        conv_head(), feeds(8, 6), cfg, monkeypatch
    )
    assert ws.concat_splits == eager.concat_splits == []
    assert ws.emit(plan).SerializeToString() == eager.emit(eager_plan).SerializeToString()


def test_a_split_decided_after_the_calibration_pass_gives_the_eager_split():
    cfg = config_from_dict({})
    (eager, eager_plan), (ws, plan) = _deferred_and_eager(
        conv_head(narrow_weight=1e-3), feeds(32, 7), cfg
    )
    assert [d.describe() for d in ws.concat_splits] == [d.describe() for d in eager.concat_splits]
    assert any(d.split for d in ws.concat_splits) and "head_part1" in plan.layers
    assert ws.prep.model.SerializeToString() == eager.prep.model.SerializeToString()
    for name, tp in eager_plan.tensors.items():
        np.testing.assert_allclose(plan.tensors[name].scale, tp.scale, rtol=1e-5)
