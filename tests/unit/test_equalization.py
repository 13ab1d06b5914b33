"""Cross-layer equalization (amq/quant/algorithms/equalization.py, pass amq/calib/equalizing.py):
the chains it finds, the equal ranges it reaches (groups and depthwise included, against loop
references), float outputs unchanged, high-bias absorption where it is exact, the gain on a
per-tensor weight grid, and the config."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

import amq
from amq.calib import equalizing
from amq.calib.data import open_data
from amq.calib.prepare import prepare
from amq.config import config_from_dict
from amq.errors import ConfigError
from amq.graph.model import Graph
from amq.quant.algorithms import equalization as cle
from amq.runtime import Execution, session_for

ON = {"algorithms": {"equalization": True}}
PER_TENSOR = {"weights": {"granularity": "per_tensor"}}


def _conv(name, x, y, w, b=None, **attrs):
    inits = [numpy_helper.from_array(w.astype(np.float32), f"{name}.w")]
    ins = [x, f"{name}.w"]
    if b is not None:
        inits.append(numpy_helper.from_array(b.astype(np.float32), f"{name}.b"))
        ins.append(f"{name}.b")
    return [h.make_node("Conv", ins, [y], name=name, **attrs)], inits


def chain(
    acts: tuple[str | None, ...] = ("Relu",),
    seed: int = 0,
    spread: float = 1.5,
    bias: float = 0.5,
    depthwise: bool = False,
    second_pads: int = 0,
    spread_in: float = 1.5,
    compensate: bool = False,
) -> onnx.ModelProto:
    """x [n, 4, 8, 8] -> Conv 3x3 (8 channels whose weight scales differ by e^(spread N(0,1)))
    -> act -> [depthwise 3x3 -> act ->] Conv kxk (6 channels) -> y; the later layers' input
    channels scaled by e^(spread_in N(0,1)), and by the inverse of the first layer's scales with
    ``compensate`` (an equivalent network with balanced channels: what CLE is made to recover)."""
    r = np.random.default_rng(seed)
    c = 8
    k1 = np.exp(spread * r.standard_normal(c))
    w1 = r.standard_normal((c, 4, 3, 3)) * k1.reshape(-1, 1, 1, 1)
    nodes, inits = _conv("c1", "x", "h1", w1, r.standard_normal(c) * bias, pads=[1] * 4)
    t = "h1"
    layers = [("dw", (c, 1, 3, 3), {"group": c, "pads": [1] * 4})] if depthwise else []
    k = 2 * second_pads + 1
    layers.append(("c2", (6, c, k, k), {"pads": [second_pads] * 4}))
    for i, (name, shape, attrs) in enumerate(layers):
        act = acts[min(i, len(acts) - 1)]
        if act is not None:
            nodes.append(
                h.make_node(act, [t], [f"{t}_a"], name=f"{name}_act", alpha=0.1)
                if act == "LeakyRelu"
                else h.make_node(act, [t], [f"{t}_a"], name=f"{name}_act")
            )
            t = f"{t}_a"
        w = r.standard_normal(shape) * np.exp(spread_in * r.standard_normal((1, shape[1], 1, 1)))
        if compensate and i == len(layers) - 1 and not depthwise:
            w = w / k1.reshape(1, -1, 1, 1)
        out = "y" if name == "c2" else f"{name}_out"
        n, i2 = _conv(name, t, out, w, r.standard_normal(shape[0]) * bias, **attrs)
        nodes += n
        inits += i2
        t = out
    g = h.make_graph(
        nodes,
        "chain",
        [h.make_tensor_value_info("x", T.FLOAT, ["n", 4, 8, 8])],
        [h.make_tensor_value_info("y", T.FLOAT, None)],
        inits,
    )
    return h.make_model(g, opset_imports=[h.make_opsetid("", 13)])


def feeds(n: int, seed: int, shift: float = 0.0) -> list[dict[str, np.ndarray]]:
    r = np.random.default_rng(seed)
    return [{"x": (r.standard_normal((1, 4, 8, 8)) + shift).astype(np.float32)} for _ in range(n)]


def _run(model: onnx.ModelProto, data) -> np.ndarray:
    s = session_for(model, Execution.IDEAL)
    return np.concatenate([s.run(None, d)[0] for d in data])


def _equalized(model, data, cfg=ON):
    cfg = config_from_dict(cfg)
    prep = prepare(model, cfg)
    ds = open_data(data, prep.specs, cfg)
    return equalizing.equalize(prep, cfg, ds)


def test_finds_chains_through_positively_homogeneous_activations_only():
    for acts, found in (
        (("Relu",), 1),
        (("LeakyRelu",), 1),
        ((None,), 1),
        (("Clip",), 0),  # clip(h / s, 0, 6) is not clip(h, 0, 6) / s
        (("Sigmoid",), 0),
    ):
        pairs = cle.find_pairs(Graph(chain(acts)))
        assert len(pairs) == found, acts
    dw = cle.find_pairs(Graph(chain(("Relu",), depthwise=True)))
    assert [(p.first, p.second) for p in dw] == [("c1", "dw"), ("dw", "c2")]


def test_a_tensor_with_two_readers_is_not_a_chain():
    m = chain()
    m.graph.output.append(h.make_tensor_value_info("h1", T.FLOAT, None))  # h1 is also an output
    assert cle.find_pairs(Graph(m)) == []


def test_group_layout_matches_a_loop_reference():
    r = np.random.default_rng(3)
    w = r.standard_normal((6, 2, 3, 3))  # 3 groups of 2 input / 2 output channels
    s = r.uniform(0.5, 2.0, 6)
    ref_r, ref_w = np.zeros(6), w.copy()
    for o in range(6):
        g = o // 2
        for j in range(2):
            i = g * 2 + j  # input channel
            ref_r[i] = max(ref_r[i], np.abs(w[o, j]).max())
            ref_w[o, j] *= s[i]
    np.testing.assert_allclose(cle.in_ranges(w, 3), ref_r)
    np.testing.assert_allclose(cle.scale_inputs(w, 3, s), ref_w)


@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize("act", ["Relu", "LeakyRelu", None])
def test_ranges_equal_and_float_outputs_unchanged(depthwise, act):
    # per-tensor weights: on per-channel ones a pair into a depthwise layer is equalized by its
    # activation ranges instead (test_depthwise_inputs_...)
    m = chain((act,), depthwise=depthwise)
    data = feeds(16, 1)
    prep, done = _equalized(m, data, {**ON, **PER_TENSOR})
    assert len(done.pairs) == (2 if depthwise else 1) and not done.activations
    g = Graph(prep.model)
    for p in done.pairs:
        n1, n2 = g.node_by_name[p.first], g.node_by_name[p.second]
        r1 = cle.out_ranges(g.array(n1.input[1]))
        r2 = cle.in_ranges(g.array(n2.input[1]), int(g.attr(n2, "group", 1)))
        np.testing.assert_allclose(r1, r2, rtol=2e-3)  # both sqrt(r1 r2) once settled
    held_out = feeds(8, 2)
    ref = _run(m, held_out)
    np.testing.assert_allclose(_run(prep.model, held_out), ref, atol=1e-5 * np.abs(ref).max())


def test_high_bias_absorption_moves_a_positive_floor_into_the_next_bias():
    # a bias of +30 keeps every pre-activation positive: Relu is the identity there
    m = chain(("Relu",), spread=0.0, bias=0.0)
    b = {i.name: i for i in m.graph.initializer}["c1.b"]
    b.CopyFrom(numpy_helper.from_array(np.full(8, 30.0, np.float32), "c1.b"))
    data = feeds(32, 1)
    prep, done = _equalized(m, data)
    (p,) = done.pairs
    c = done.absorbed[p]
    assert np.all(c > 1)
    g0, g1 = Graph(m), Graph(prep.model)
    eq_scale = cle.out_ranges(g0.array("c1.w")) / cle.out_ranges(g1.array("c1.w"))
    np.testing.assert_allclose(g1.array("c1.b"), 30.0 / eq_scale - c, rtol=1e-4, atol=1e-4)
    # the Relu output now starts near 0: its range shrank by the floor
    top, _ = equalizing.extremes(
        prep.model, "m", {"h1_a": 4}, open_data(data, prep.specs, config_from_dict(ON)), 8
    )
    assert float(top["h1_a"][0].min()) < 1e-3
    np.testing.assert_allclose(_run(prep.model, data), _run(m, data), rtol=1e-4, atol=1e-3)


def test_no_absorption_into_a_padded_layer():
    m = chain((None,), second_pads=1)
    prep, done = _equalized(m, feeds(16, 1, shift=3.0))
    (p,) = done.pairs
    assert not cle.absorbable(Graph(m), p) and not done.absorbed
    cfg_m = chain((None,), second_pads=0)
    _, done0 = _equalized(cfg_m, feeds(16, 1, shift=3.0))
    assert done0.absorbed  # without an activation the mid-range is always absorbed


def test_per_tensor_weights_gain_and_the_pass_is_named():
    # the first layer's output channels scaled apart and the second's inputs scaled back (a
    # model equivalent to one with balanced channels): the case CLE is made for
    m = chain(("Relu",), spread=2.0, spread_in=0.2, compensate=True)
    calib, held_out = feeds(64, 1), feeds(32, 2)
    ref = _run(m, held_out)

    def sqnr(cfg):
        res = amq.quantize(m, calib, config_from_dict(cfg), cache_dir=None, summary_samples=0)
        err = _run(res.model, held_out) - ref
        return 10 * np.log10((ref**2).mean() / (err**2).mean()), res

    off, _ = sqnr({**PER_TENSOR, "algorithms": {"equalization": False}})
    on, res = sqnr(PER_TENSOR)  # auto: on for per-tensor weight grids
    assert on > off + 6, (on, off)
    assert any(n.startswith("cross-layer equalization: 1 Conv pair") for n in res.summary.notes)


def test_auto_leaves_per_channel_grids_alone():
    prep, done = _equalized(chain(), feeds(8, 1), {})
    assert not done.pairs
    prep, done = _equalized(
        chain(), feeds(8, 1), {"algorithms": {"equalization": False}, **PER_TENSOR}
    )
    assert not done.pairs


def test_config_and_qat():
    from amq.qat.handoff import _no_auto_smoothing

    assert config_from_dict({}).algorithms.equalization.value == "auto"
    assert config_from_dict(ON).algorithms.equalization.value == "true"
    with pytest.raises(ConfigError, match="expected auto, true or false"):
        config_from_dict({"algorithms": {"equalization": "yes please"}})
    with pytest.raises(ConfigError, match="equalization: true is for post-training"):
        _no_auto_smoothing(config_from_dict(ON))
    assert _no_auto_smoothing(config_from_dict({})).algorithms.equalization.value == "false"


def test_compare_does_not_measure_rescaled_tensors_against_the_unscaled_float():
    from amq import api

    m, calib = chain(("Relu",)), feeds(32, 1)
    res = amq.quantize(m, calib, config_from_dict(ON), cache_dir=None, summary_samples=0)
    rep = api.compare(m, res.model, calib[:4])
    names = {r.name for r in rep.rows}
    assert "h1_a" not in names and "c1.w" not in names
    assert any("h1_a" in n and "rescaled" in n for n in rep.notes)


def test_conv1d_chain_with_absorption():
    r = np.random.default_rng(5)
    w1 = r.standard_normal((8, 4, 3)) * np.exp(1.5 * r.standard_normal((8, 1, 1)))
    n1, i1 = _conv("c1", "x", "h", w1, np.full(8, 20.0), pads=[1, 1])
    n2, i2 = _conv("c2", "a", "y", r.standard_normal((3, 8, 1)), r.standard_normal(3))
    g = h.make_graph(
        [*n1, h.make_node("Relu", ["h"], ["a"], name="relu"), *n2],
        "conv1d",
        [h.make_tensor_value_info("x", T.FLOAT, ["n", 4, 16])],
        [h.make_tensor_value_info("y", T.FLOAT, None)],
        i1 + i2,
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 13)])
    data = [{"x": r.standard_normal((1, 4, 16)).astype(np.float32)} for _ in range(16)]
    prep, done = _equalized(m, data)
    (p,) = done.pairs
    assert p.tensor in done.rescaled and np.all(done.absorbed[p] > 0)
    ref = _run(m, data)
    np.testing.assert_allclose(_run(prep.model, data), ref, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("act", ["Relu", None])
def test_depthwise_inputs_get_one_range_per_channel_on_per_channel_weights(act):
    # channels of the depthwise layer's input 50x apart: on one per-tensor activation grid the
    # narrow ones get a few codes; moving each channel's range into the per-channel weights on
    # both sides (free there) gives each the widest one's
    m = chain((act,), spread=2.0, depthwise=True)
    calib, held_out = feeds(64, 1), feeds(32, 2)
    # the depthwise weights balance its outputs again (as a BatchNorm would): the input grid is
    # then what limits the model
    read = "h1_a" if act else "h1"
    ds = open_data(calib, prepare(m, config_from_dict({})).specs, config_from_dict({}))
    lo, hi = equalizing.extremes(m, "m", {read: 4}, ds, 8)[0][read]
    r = np.maximum(np.abs(lo), np.abs(hi))
    w = {i.name: i for i in m.graph.initializer}["dw.w"]
    balanced = numpy_helper.to_array(w) * (r.mean() / r).reshape(-1, 1, 1, 1)
    w.CopyFrom(numpy_helper.from_array(balanced.astype(np.float32), "dw.w"))
    prep, done = _equalized(m, calib, {})  # auto
    (p,) = done.activations
    assert not done.pairs and (p.first, p.second) == ("c1", "dw") and done.activations[p] > 10
    assert {p.tensor, p.read, "c1.w", "c1.b", "dw.w"} <= set(done.rescaled)
    ds = open_data(calib, prep.specs, config_from_dict({}))
    lo, hi = equalizing.extremes(prep.model, "m", {p.read: 4}, ds, 8)[0][p.read]
    top = np.maximum(np.abs(lo), np.abs(hi))
    # every channel at the geometric mean of its range and the widest one's (ACT_STRENGTH 0.5)
    np.testing.assert_allclose(top, np.sqrt(r * r.max()), rtol=1e-4)
    ref = _run(m, held_out)
    np.testing.assert_allclose(_run(prep.model, held_out), ref, atol=1e-5 * np.abs(ref).max())

    def sqnr(cfg):
        res = amq.quantize(m, calib, config_from_dict(cfg), cache_dir=None, summary_samples=0)
        err = _run(res.model, held_out) - ref
        return 10 * np.log10((ref**2).mean() / (err**2).mean()), res

    off, _ = sqnr({"algorithms": {"equalization": False}})
    on, res = sqnr({})
    assert on > off + 6, (on, off)
    assert any("input channels of 1 depthwise Conv(s)" in n for n in res.summary.notes)


def test_activation_scales_bring_channel_ranges_together():
    lo, hi = np.array([-1.0, 0.0, -0.5, 0.0]), np.array([0.5, 4.0, 2.0, 0.0])
    np.testing.assert_allclose(cle.activation_scales(lo, hi, 1.0), [0.25, 1.0, 0.5, 1.0])
    np.testing.assert_allclose(cle.activation_scales(lo, hi, 0.5), [0.5, 1.0, 0.5**0.5, 1.0])
    r = np.maximum(np.abs(lo), np.abs(hi))
    eq = r / cle.activation_scales(lo, hi, 1.0)
    assert np.all(eq[r > 0] == 4.0) and eq[3] == 0.0  # a dead channel keeps its scale
    tiny = cle.activation_scales(np.zeros(2), np.array([1e-9, 1.0]), 1.0)
    assert tiny[0] == cle.SCALE_BOUNDS[0]


def test_a_wrong_edit_is_caught_on_the_cut_models_and_undone(monkeypatch):
    m = chain(("Relu",), spread=2.0, depthwise=True)
    right = cle.rescale

    def wrong(g, arrays, p, s):  # the second layer forgets to take the scales back
        right(g, arrays, p, s)
        n2 = g.node_by_name[p.second]
        arrays[n2.input[1]] = g.array(n2.input[1]).astype(np.float64)

    monkeypatch.setattr(cle, "rescale", wrong)
    prep, done = _equalized(m, feeds(16, 1), {})
    assert not done.activations and not done.rescaled
    assert prep.notes[-1].startswith("cross-layer equalization changed the float outputs")
    assert Graph(prep.model).array("c1.w").tobytes() == Graph(m).array("c1.w").tobytes()


def _session_sources(monkeypatch) -> list[str]:
    """The ``source`` of every session the calib passes build from here on."""
    from amq.calib import runner

    sources: list[str] = []
    build = runner.session

    def spy(model, *a, source="model", **k):
        sources.append(source)
        return build(model, *a, source=source, **k)

    monkeypatch.setattr(runner, "session", spy)
    return sources


def test_the_float_check_reuses_the_statistics_run_where_it_ran_the_model_as_it_was(monkeypatch):
    """Depthwise inputs only (auto, per-channel weights: no weight pair): the statistics run the
    unedited model, so their first batch gives the check its reference, and the check builds a
    session of the edited model only; with weight pairs (true) the statistics run an edited
    model, and the check runs the model as it was itself. A wrong edit is caught either way."""
    m = chain(("Relu",), spread=2.0, depthwise=True)
    sources = _session_sources(monkeypatch)
    prep, done = _equalized(m, feeds(16, 1), {})
    assert done.activations and not done.pairs
    assert [s for s in sources if s.startswith(prep.source)] == [
        f"{prep.source} (equalization statistics)",
        f"{prep.source} (equalized)",
    ]
    sources.clear()
    prep, done = _equalized(m, feeds(16, 1))  # true: the weight pair too
    assert done.pairs
    assert prep.source in sources  # the check's own run of the model as it was
    right = cle.rescale

    def wrong(g, arrays, p, s):
        right(g, arrays, p, s)
        n2 = g.node_by_name[p.second]
        arrays[n2.input[1]] = g.array(n2.input[1]).astype(np.float64)

    monkeypatch.setattr(cle, "rescale", wrong)
    sources.clear()
    prep, done = _equalized(m, feeds(16, 1), {})
    assert prep.notes[-1].startswith("cross-layer equalization changed the float outputs")
    assert prep.source not in sources  # caught against the statistics run's reference


def test_keep_needed_runs_a_model_only_up_to_its_outputs():
    from amq.graph.subgraphs import keep_needed

    m = chain(("Relu",), depthwise=True)
    g = onnx.ModelProto()
    g.CopyFrom(m)
    del g.graph.output[:]
    g.graph.output.extend([onnx.ValueInfoProto(name="h1_a")])
    keep_needed(g.graph)
    assert [n.name for n in g.graph.node] == ["c1", "dw_act"]
    full = Graph(m)
    keep_needed(m.graph)  # everything feeds y
    assert [n.name for n in m.graph.node] == [n.name for n in full.nodes]


def test_keep_needed_follows_what_a_subgraph_reads_from_outside():
    from amq.graph.subgraphs import keep_needed

    then = h.make_graph(
        [h.make_node("Identity", ["a"], ["t"], name="then_id")],
        "then",
        [],
        [h.make_tensor_value_info("t", T.FLOAT, None)],
    )
    other = h.make_graph(
        [h.make_node("Neg", ["b"], ["e"], name="else_neg")],
        "else",
        [],
        [h.make_tensor_value_info("e", T.FLOAT, None)],
    )
    nodes = [
        h.make_node("Relu", ["x"], ["a"], name="relu"),  # read only inside the If's branch
        h.make_node("Abs", ["x"], ["b"], name="abs"),  # ... only inside the other branch
        h.make_node("Sigmoid", ["x"], ["s"], name="unused"),
        h.make_node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=other),
    ]
    g = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("x", T.FLOAT, [2]), h.make_tensor_value_info("c", T.BOOL, [])],
        [
            h.make_tensor_value_info("y", T.FLOAT, None),
            h.make_tensor_value_info("s", T.FLOAT, None),
        ],
    )
    keep_needed(g)
    assert [n.name for n in g.node] == ["relu", "abs", "unused", "if"]
    del g.output[1:]  # without "s", the Sigmoid feeds nothing
    keep_needed(g)
    assert [n.name for n in g.node] == ["relu", "abs", "if"]
