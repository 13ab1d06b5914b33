"""SmoothQuant's statistics taken by the first calibration pass (calib/smoothing.py's Watch,
calib/workspace.py's settle_smoothing): the regrouped calls give channel_stats' own statistics;
a model SmoothQuant leaves alone runs one pass and gets the plan it got with a pass of its own;
an edited one re-observes only what the edit changed, on the edited model, and computes what the
edit added from the tensor the first pass kept (calib/replay.py) where it can; a cached re-run
decides on the same statistics and writes the same bytes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import amq
from amq.calib import runner, smoothing
from amq.calib.runner import Batch
from amq.calib.workspace import Workspace, plan_in_workspace
from amq.config import Config
from amq.quant.algorithms import smoothquant as sq
from amq.quant.algorithms.outlier_split import Split
from tests.unit.test_outlier_split import SPLIT_ON
from tests.unit.test_smoothquant import ON_05, K, _data, ln_qkv, lone, normal_x, outlier_x


def _batches(x: np.ndarray, sizes: list[int]) -> list[Batch]:
    out, pos = [], 0
    for n in sizes:
        v = x[pos : pos + n]
        out.append(Batch({"x": v}, [], n, {"t": v.copy(), "y": v[:, :1].copy()}))
        pos += n
    assert pos == len(x)
    return out


def _group() -> sq.Group:
    return sq.Group("t", (sq.Member("mm", "w", False),), "")


def test_watch_regroups_the_calls_into_batches_of_batch_size():
    """Calls of 1, 7, 7, ... samples give, bit for bit, what channel_stats reads from batches
    of 16: the same extremes per half and the same row samples."""
    x = np.random.default_rng(0).normal(size=(37, 64, K)).astype(np.float32)  # rows strided
    w = smoothing.Watch([_group()], ["y"], len(x), 16)
    for b in _batches(x, [1, 7, 7, 7, 7, 7, 1]):
        assert set(w.asked()) >= {"t"}
        w.take(b)
        b.values["t"][...] = np.nan  # the call's arrays are not held (a remainder is copied)
    stats, refs = w.collected()
    want = smoothing.ChannelStats()
    per_batch = smoothing.SAMPLE_ROWS // 3  # 3 batches of 16 over 37 samples
    for i in range(0, len(x), 16):
        want.update(x[i : i + 16], per_batch)
    for got_h, want_h in zip(stats["t"].halves, want.halves, strict=True):
        np.testing.assert_array_equal(got_h.lo, want_h.lo)
        np.testing.assert_array_equal(got_h.hi, want_h.hi)
        np.testing.assert_array_equal(np.concatenate(got_h.rows), np.concatenate(want_h.rows))
    # the float check's references: the first calls, until CHECK_SAMPLES samples
    assert [r.samples for r in refs] == [1, 7]
    np.testing.assert_array_equal(refs[1].outputs["y"], x[1:8, :1])
    assert "y" not in w.asked()


def test_watch_keeps_its_tensors_whole_within_its_share_of_the_budget():
    x = np.random.default_rng(0).normal(size=(20, 64, K)).astype(np.float32)  # 160 KB
    roomy, tight = (smoothing.Watch([_group()], ["y"], 20, 16, mb) for mb in (8, 1))
    for w in (roomy, tight):  # 8 MB: 1 MB kept whole; 1 MB: 128 KB
        for b in _batches(x, [1, 19]):
            w.take(b)
    assert roomy.calls == [1, 19]
    np.testing.assert_array_equal(np.concatenate(roomy.whole["t"]), x)
    assert tight.whole == {} and tight.collected() is not None  # the statistics all the same


@pytest.mark.parametrize(
    "case", ["sample axis elsewhere", "samples missed"], ids=["axis", "incomplete"]
)
def test_watch_gives_up_where_regrouping_would_mix_samples(case):
    x = np.random.default_rng(0).normal(size=(8, 5, K)).astype(np.float32)
    w = smoothing.Watch([_group()], ["y"], 8 if case == "samples missed" else 4, 4)
    for b in _batches(x, [4, 4]):
        if case == "sample axis elsewhere":
            b.values["t"] = np.swapaxes(b.values["t"], 0, 1)
        w.take(b)
        if case == "samples missed":
            break
    assert w.collected() is None


def _old_flow(prep, cfg: Config, data):
    """plan_in_workspace as it was: SmoothQuant's own pass in the Workspace's constructor."""
    ws = Workspace(prep, cfg, data, None, False)
    ws.ensure_opset_for(cfg)
    base = ws.structure(cfg)
    everything = ws.structure(replace(cfg, layers=(), op_types=()))
    ws.observe(ws.sources(base) | ws.sources(everything))
    return ws, ws.plan(cfg, base)


class Passes:
    """The tensors of every calibration pass, and the nodes of the model it ran."""

    def __init__(self) -> None:
        self.tensors: list[list[str]] = []
        self.nodes: list[int] = []

    def clear(self) -> None:
        self.tensors.clear()
        self.nodes.clear()


@pytest.fixture
def passes(monkeypatch):
    """Every calibration pass (Passes); SmoothQuant's own pass fails the test."""
    seen = Passes()
    real = runner.collect_stats

    def counting(model, tensors, *a, **k):
        seen.tensors.append(list(tensors))
        seen.nodes.append(len(model.graph.node))
        return real(model, tensors, *a, **k)

    monkeypatch.setattr(runner, "collect_stats", counting)
    return seen


def _no_own_pass(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("SmoothQuant ran a pass of its own")

    monkeypatch.setattr(smoothing, "channel_stats", fail)


def _qparams(plan) -> dict:
    return {t.name: (t.scale, t.zero_point) for t in plan.tensors.values()}


def test_a_model_smoothquant_leaves_alone_runs_one_pass(monkeypatch, passes):
    cfg = Config()
    prep, data = _data(lone(), normal_x(), cfg)
    old_ws, old_plan = _old_flow(prep, cfg, data)
    passes.clear()
    _no_own_pass(monkeypatch)
    ws, plan, _ = plan_in_workspace(prep, cfg, data, None, False)
    assert len(passes.tensors) == 1
    assert ws.smoothing and all(d.alpha is None for d in ws.smoothing)  # decided: no edit
    assert ws.prep.model is prep.model
    assert _qparams(plan) == _qparams(old_plan)
    assert ws.emit(plan).SerializeToString() == old_ws.emit(old_plan).SerializeToString()


@pytest.mark.parametrize(
    ("build", "x", "cfg"),
    [(lone, outlier_x(), ON_05), (ln_qkv, normal_x(), ON_05), (ln_qkv, normal_x(), SPLIT_ON)],
    ids=["div_inserted", "folded_into_layernorm", "outlier_split"],
)
def test_an_edited_model_observes_again_only_what_the_edit_changed(
    monkeypatch, passes, build, x, cfg
):
    prep, data = _data(build(), x, cfg)
    old_ws, old_plan = _old_flow(prep, cfg, data)
    passes.clear()
    _no_own_pass(monkeypatch)
    ws, plan, _ = plan_in_workspace(prep, cfg, data, None, False)
    # the same decisions on the same statistics: the same edited model
    assert [d.describe() for d in ws.smoothing] == [d.describe() for d in old_ws.smoothing]
    assert ws.prep.model.SerializeToString() == old_ws.prep.model.SerializeToString()
    changed = smoothing.changed_tensors(prep.graph, ws.graph, ws.smoothing)
    assert changed and len(passes.tensors) == 2 and set(passes.tensors[1]) <= changed
    # computed from the tensor the first pass kept (a few nodes), where the edit reads it: the
    # Div and the outlier parts; a LayerNorm's rescaled output needs the model itself
    (d,) = ws.smoothing
    replayed = passes.nodes[1] < len(ws.graph.nodes)
    assert replayed == (isinstance(d, Split) or not d.group.fold)
    # the changed tensors' statistics are those of the edited model, the rest the same values
    for t, s in old_ws.stats.items():
        got = ws.stats[t]
        if t in changed:
            assert (got.min, got.max, got.count) == (s.min, s.max, s.count)
        else:
            np.testing.assert_allclose([got.min, got.max], [s.min, s.max], rtol=1e-5)
    old, new = _qparams(old_plan), _qparams(plan)
    assert old.keys() == new.keys()
    for t, (scale, zp) in old.items():
        np.testing.assert_allclose(new[t][0], scale, rtol=1e-4)
        assert np.abs(np.subtract(new[t][1], zp)).max(initial=0) <= 1
    # the probe's shapes of the new tensors, derived without running the model
    assert ws.info == runner.probed(ws.prep.model, ws.feeds).info


def test_a_cached_rerun_decides_on_the_same_statistics(tmp_path, monkeypatch, passes):
    model = lone()
    calib = [{"x": xi[None]} for xi in outlier_x()]
    cfg = tmp_path / "sq.yaml"
    cfg.write_text("smoothquant: {enabled: true, alpha: 0.5}\n")
    first = amq.quantize(model, calib, cfg, tmp_path / "a.onnx", cache_dir=tmp_path / "c")
    assert len(passes.tensors) == 2  # the first pass, then the smoothed tensor (from the kept x)
    passes.clear()
    _no_own_pass(monkeypatch)
    second = amq.quantize(model, calib, cfg, tmp_path / "b.onnx", cache_dir=tmp_path / "c")
    assert passes.tensors == [] and second.summary.cache_hit and not first.summary.cache_hit
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert any("SmoothQuant: 1 of 1" in n for n in second.summary.notes)


def test_sub_model_computes_from_the_kept_tensor_only():
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    from amq.calib.replay import sub_model
    from amq.graph.model import Graph
    from amq.quant.planner import TensorInfo
    from amq.runtime import session

    r = np.random.default_rng(0)
    s, w = r.uniform(1, 2, K).astype(np.float32), r.normal(size=(K, 4)).astype(np.float32)
    g = h.make_graph(
        [
            h.make_node("Relu", ["x"], ["a"], name="relu"),
            h.make_node("Div", ["a", "s"], ["b"], name="div"),
            h.make_node("MatMul", ["b", "w"], ["c"], name="mm"),
        ],
        "g",
        [h.make_tensor_value_info("x", T.FLOAT, ["n", K])],
        [h.make_tensor_value_info("c", T.FLOAT, None)],
        [nh.from_array(s, "s"), nh.from_array(w, "w")],
    )
    graph = Graph(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]))
    info = {"a": TensorInfo((1, K), "float32")}
    model, inputs = sub_model(graph, info, ["c", "b"])
    assert inputs == ["a"] and [n.name for n in model.graph.node] == ["div", "mm"]
    a = np.abs(r.normal(size=(5, K))).astype(np.float32)
    c, b = session(model).run(["c", "b"], {"a": a})
    np.testing.assert_allclose(b, a / s, rtol=1e-6)
    np.testing.assert_allclose(c, (a / s) @ w, rtol=1e-5, atol=1e-5)
    assert sub_model(graph, {}, ["c"]) is None  # it would need the graph input
