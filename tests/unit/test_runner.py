"""The calibration runner: what onnxruntime reduces inside the session (extremes, a subsample)
must give the statistics numpy computes from the full tensors, for any batching."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from amq.calib import runner
from amq.graph.edit import expose_outputs
from amq.quant import qmath
from tests.unit.test_observers import assert_same_stats, direct_hist

TENSORS = ["c1_relu", "c2", "added", "r2", "six", "flat", "logits"]


def _model() -> onnx.ModelProto:
    r = np.random.default_rng(3)
    w1 = r.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32)
    w2 = r.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32)
    wg = r.normal(0, 0.1, (8 * 12 * 12, 10)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["c1_relu"]),
        helper.make_node("Conv", ["c1_relu", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "c1_relu"], ["added"]),
        helper.make_node("Relu", ["added"], ["r2"]),
        helper.make_node("Clip", ["added", "zero", "six_c"], ["six"]),
        helper.make_node("Flatten", ["r2"], ["flat"]),
        helper.make_node("MatMul", ["flat", "wg"], ["logits"]),
        helper.make_node("Add", ["logits", "six_sum"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(wg, "wg"),
        numpy_helper.from_array(np.float32(0.0), "zero"),
        numpy_helper.from_array(np.float32(6.0), "six_c"),
        numpy_helper.from_array(np.zeros(10, np.float32), "six_sum"),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 12, 12])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10]),
            helper.make_tensor_value_info("six", TensorProto.FLOAT, ["n", 8, 12, 12]),
        ],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


X = np.random.default_rng(4).normal(0, 1, (10, 3, 12, 12)).astype(np.float32)


def _info(model):
    return runner.probe(model, {"x": X[:1]})


def _full(model) -> dict[str, np.ndarray]:
    sess = runner.session(expose_outputs(model, TENSORS))
    return dict(zip(TENSORS, sess.run(TENSORS, {"x": X}), strict=True))


def _collect(model, batch: int, per_sample: int | None = None, info="probe", tensors=TENSORS):
    feeds = [({"x": X[i : i + batch]}, [], len(X[i : i + batch])) for i in range(0, len(X), batch)]
    return runner.collect_stats(
        model,
        tensors,
        feeds,
        256,
        info=_info(model) if info == "probe" else info,
        per_sample=per_sample,
    )


def test_taps_use_runtime_reductions_by_kind():
    model = _model()
    _, taps = runner.observation_model(model, TENSORS, _info(model), 200)
    kind = {t.tensor: t for t in taps}
    assert kind["c2"].kind == kind["added"].kind == "spatial"
    assert kind["flat"].kind == "flat"
    assert kind["logits"].kind == "full"  # 10 values per sample: the sample is all of it
    # Relu / Clip(0, 6) outputs: no ReduceMin, their lower bound stands for the minimum
    assert kind["r2"].min is None and kind["r2"].floor == 0.0 and kind["r2"].clamped
    assert kind["six"].min is None and kind["six"].floor == 0.0
    assert kind["c2"].min is not None and kind["c2"].floor is None
    # tensors no larger than the per-sample budget are copied out whole: nothing to reduce
    _, small = runner.observation_model(model, TENSORS, _info(model), 2048)
    assert {t.kind for t in small} == {"full"}
    assert {t.tensor for t in small if t.clamped} == {"c1_relu", "r2", "six"}
    # without a probe, every tensor is copied out whole and folded by numpy
    _, plain = runner.observation_model(model, TENSORS, None, 2048)
    assert {t.kind for t in plain} == {"full"}


@pytest.mark.parametrize("batch", [1, 3, 10])
def test_extremes_and_counts_are_exact(batch):
    model = _model()
    full = _full(model)
    stats = _collect(model, batch, per_sample=64)
    for t in TENSORS:
        s, a = stats[t], full[t]
        assert s.max == pytest.approx(float(a.max()), rel=0, abs=0), t
        assert s.min == float(a.min()), t
        assert s.count == a.size, t
        assert s.counts.sum() > 0


def test_any_batching_gives_the_same_statistics():
    model = _model()
    one = _collect(model, 10, per_sample=64)
    for batch in (1, 4):
        other = _collect(model, batch, per_sample=64)
        for t in TENSORS:
            assert_same_stats(one[t], other[t])
            assert one[t].clamped_low == other[t].clamped_low


def test_spatial_sample_is_a_pixel_grid_of_every_channel():
    model = _model()
    stats = _collect(model, 3, per_sample=200)  # 8 x 12 x 12 values per sample -> stride 3
    s = stats["c2"]
    x = _full(model)["c2"]
    h, w = runner._spatial_strides(8, 12, 12, 200)
    assert (h, w) == (3, 2) and s.stride == 6  # 8 x 4 x 6 = 192 values per sample
    want = direct_hist(x[:, :, ::3, ::2].ravel(), s.width_log2, s.i0, s.bins)
    np.testing.assert_array_equal(s.counts, want)


@pytest.mark.parametrize(
    ("chw", "budget", "want"),
    [((480, 3, 80), 16384, (1, 8)), ((64, 112, 112), 8192, (11, 11)), ((8, 1, 40), 100, (1, 4))],
)
def test_spatial_strides_keep_short_axes(chw, budget, want):
    """A text-line map of 3 rows keeps all 3 rows (striding only its 80 columns); square maps get
    square strides; the budget is kept."""
    c, h, w = chw
    sh, sw = runner._spatial_strides(c, h, w, budget)
    assert (sh, sw) == want
    assert c * -(-h // sh) * -(-w // sw) <= budget


def test_flat_sample_is_every_kth_value_of_the_stream():
    model = _model()
    stats = _collect(model, 3, per_sample=100)  # 1152 values per sample -> k = 12 -> 13
    s = stats["flat"]
    x = _full(model)["flat"]
    assert s.stride == 13  # 12 shares a factor with the 1152 columns
    want = direct_hist(x.ravel()[::13], s.width_log2, s.i0, s.bins)
    np.testing.assert_array_equal(s.counts, want)


def test_relu_zeros_count_as_clamped():
    model = _model()
    stats = _collect(model, 5, per_sample=200)
    s = stats["r2"]
    x = _full(model)["r2"]
    sample = x[:, :, ::3, ::2]
    assert s.clamped_low == int(np.count_nonzero(sample == 0)) > 0
    assert stats["c2"].clamped_low == 0


def test_without_probe_numpy_gives_the_same_extremes():
    model = _model()
    ref = _collect(model, 4, per_sample=64)
    plain = _collect(model, 4, per_sample=64, info=None)
    for t in TENSORS:
        assert plain[t].max == ref[t].max and plain[t].min == ref[t].min
        assert plain[t].count == ref[t].count


def test_nonfinite_values_are_counted():
    model = _model()
    x = X.copy()
    x[2, 0, 0, 0] = np.inf
    feeds = [({"x": x[i : i + 5]}, [], 5) for i in (0, 5)]
    stats = runner.collect_stats(model, ["c2"], feeds, 256, info=_info(model))
    s = stats["c2"]
    assert s.nonfinite >= 1
    assert np.isfinite(s.min) and np.isfinite(s.max)


@pytest.mark.parametrize("ahead_relu", [True, False])
def test_ahead_relu_root_is_observed_at_the_relu_output(ahead_relu, monkeypatch):
    """A conv output read only by a Relu is observed after the Relu when the plan only uses its
    non-negative part (same scale, and onnxruntime keeps Conv+Relu fused); otherwise as is."""
    import amq
    from amq.config import Config, with_overrides

    seen: list[str] = []
    real = runner.collect_stats

    def spy(model, tensors, *a, **k):
        seen.extend(tensors)
        return real(model, tensors, *a, **k)

    monkeypatch.setattr(runner, "collect_stats", spy)
    model = _model()
    cfg = with_overrides(Config(), calibration={"method": "minmax"}, ahead_relu=ahead_relu)
    res = amq.quantize(model, [{"x": X[i : i + 1]} for i in range(len(X))], cfg, cache_dir=None)
    c1 = runner.session(expose_outputs(model, ["c1"])).run(["c1"], {"x": X})[0]
    lo, hi = res.plan.tensors["c1"].range
    if ahead_relu:
        assert "c1_relu" in seen and "c1" not in seen
        assert (lo, hi) == qmath.snap_range(0.0, float(c1.max()))
    else:
        assert "c1" in seen
        assert (lo, hi) == qmath.snap_range(float(c1.min()), float(c1.max()))


@pytest.mark.parametrize("name", sorted(__import__("tests.models", fromlist=["MODELS"]).MODELS))
def test_static_shapes_agree_with_a_probe_run(name):
    """Where static inference is complete, its shapes and dtypes are what a run gives (then no
    probe run is needed); where it is not, the probe runs the model."""
    import amq
    from amq.config import Config
    from tests.models import build

    model, calib, _ = build(name)
    prep = amq.api.prepare(model, Config())
    feeds = calib[0]
    static = runner.static_info(prep.model, feeds)
    ran = runner.run_probe(prep.model, feeds)
    assert runner.probe(prep.model, feeds) == (static if static is not None else ran)
    if static is not None:
        for t, ti in static.items():
            assert ran[t] == ti, t


def test_probe_runs_the_model_when_a_shape_is_data_dependent():
    """A Reshape to a shape computed at run time: static inference cannot give it."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("ReduceProd", ["s"], ["p"], keepdims=1),
        helper.make_node("Reshape", ["x", "p"], ["flat"]),
        helper.make_node("Relu", ["flat"], ["y"]),
    ]
    g = helper.make_graph(
        nodes, "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    m = onnx.shape_inference.infer_shapes(m)
    feeds = {"x": np.ones((2, 6), np.float32)}
    assert runner.static_info(m, feeds) is None
    assert runner.probe(m, feeds)["flat"].shape == (12,)


def test_calibration_session_runs_reductions_early(monkeypatch):
    """The calibration graph's many small reductions must run soon after the tensor they read
    (onnxruntime's priority-based order): in the default order they ran last and kept every
    observed tensor alive (7.6 GB instead of 1.2 GB on PP-OCR det, see bench/RESULTS.md)."""
    import onnxruntime as ort

    seen = []
    real = ort.InferenceSession

    def spy(model, so=None, *a, **k):
        seen.append(so.execution_order if so is not None else None)
        return real(model, so, *a, **k)

    model = _model()
    info = _info(model)
    monkeypatch.setattr(runner.ort, "InferenceSession", spy)
    _collect(model, 5, per_sample=200, info=info)
    assert seen == [ort.ExecutionOrder.PRIORITY_BASED]


def test_images_of_different_sizes_keep_exact_extremes():
    """Dynamic H and W (a detector fed images of several sizes, one call each): the pixel-grid
    sample follows each image, the extremes stay exact."""
    r = np.random.default_rng(5)
    w = r.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, "h", "w"])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    xs = [
        r.normal(0, 1, (1, 3, h, wd)).astype(np.float32) for h, wd in ((20, 30), (12, 8), (40, 16))
    ]
    info = runner.probe(model, {"x": xs[0]})
    feeds = [({"x": x}, [], 1) for x in xs]
    stats = runner.collect_stats(model, ["c", "y"], feeds, 256, info=info, per_sample=64)
    sess = runner.session(expose_outputs(model, ["c"]))
    cs = [sess.run(["c"], {"x": x})[0] for x in xs]
    assert stats["c"].max == max(float(c.max()) for c in cs)
    assert stats["c"].min == min(float(c.min()) for c in cs)
    assert stats["y"].max == stats["c"].max and stats["y"].min == 0.0


def test_old_opset_flat_tensors_are_copied_out():
    """Slice with a fed start needs opset 10: older graphs copy such tensors out whole."""
    r = np.random.default_rng(6)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 5000])
    g = helper.make_graph(
        [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Neg", ["s"], ["y"])],
        "g",
        [x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5000])],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 9)], ir_version=8)
    data = r.normal(0, 2, (6, 5000)).astype(np.float32)
    info = runner.probe(model, {"x": data[:1]})
    _, taps = runner.observation_model(model, ["s"], info, 1000)
    assert taps[0].kind == "full"
    stats = runner.collect_stats(
        model, ["s"], [({"x": data[i : i + 2]}, [], 2) for i in (0, 2, 4)], 256, info=info
    )
    ref = 1.0 / (1.0 + np.exp(-data.astype(np.float64)))
    assert stats["s"].max == pytest.approx(ref.max(), rel=1e-6)
    assert stats["s"].count == data.size


# ---------------------------------------------------------------------------------------------
# run_batches: the one batch loop


def test_run_batches_streams_lazily_and_asks_names_per_batch():
    model = _model()
    sess = runner.session(model)
    batches = [({"x": X[i : i + 4]}, [i], len(X[i : i + 4])) for i in range(0, len(X), 4)]
    asked: list[int] = []

    def names() -> list[str]:
        asked.append(len(asked))
        return ["y", "six"] if len(asked) == 1 else ["y"]

    seconds: list[float] = []
    runs = runner.run_batches(sess, names, batches, None, seconds)
    assert asked == []  # nothing runs before the first batch is asked for
    first = next(runs)
    assert asked == [0] and set(first.values) == {"y", "six"} and first.n == 4
    rest = list(runs)
    assert [set(b.values) for b in rest] == [{"y"}, {"y"}] and [b.n for b in rest] == [4, 2]
    assert [b.labels for b in [first, *rest]] == [[0], [4], [8]] and len(seconds) == 3
    want = sess.run(["y"], {"x": X})[0]
    got = np.concatenate([b.values["y"] for b in [first, *rest]])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_run_batches_with_no_names_runs_nothing_and_feeds_for_adds_inputs():
    class Spy:
        def __init__(self) -> None:
            self.calls: list = []

        def run(self, names, feeds):
            self.calls.append((names, sorted(feeds)))
            return [np.zeros(1) for _ in names]

    spy = Spy()
    batches = [({"x": X[:2]}, [], 2), ({"x": X[2:4]}, [], 2)]
    out = list(runner.run_batches(spy, [], batches))
    assert spy.calls == [] and [b.values for b in out] == [{}, {}]
    assert [b.n for b in out] == [2, 2]
    list(runner.run_batches(spy, ["a", "a"], batches, lambda f: {**f, "start": np.zeros(1)}))
    assert spy.calls == [(["a"], ["start", "x"])] * 2  # duplicates asked once


def test_kept_outputs_are_the_model_outputs_and_leave_the_statistics_alone():
    """keep_outputs: the model's own outputs of the first batches come from the calibration
    session; "six" is both an output and an observed tensor."""
    model = _model()
    feeds = [({"x": X[i : i + 3]}, [], len(X[i : i + 3])) for i in range(0, len(X), 3)]
    kept: list = []
    with_keep = runner.collect_stats(
        model, TENSORS, feeds, 256, info=_info(model), keep_outputs=(5, kept)
    )
    plain = runner.collect_stats(model, TENSORS, feeds, 256, info=_info(model))
    assert len(kept) == 2  # batches of 3: the first two hold the first 5 samples
    sess = runner.session(model)
    for (f, _l, _n), got in zip(feeds, kept, strict=False):
        want = sess.run(None, f)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    for t in TENSORS:
        assert_same_stats(with_keep[t], plain[t])


def _dynamic_opset11():
    """An opset-11 model whose shapes static inference cannot give (a Reshape to a computed
    shape), so that probing it runs it; y = relu(flat(x) * w)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])
    w = onnx.numpy_helper.from_array(np.linspace(-1, 1, 12).astype(np.float32), "w")
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("ReduceProd", ["s"], ["p"], keepdims=1, name="prod"),
        helper.make_node("Reshape", ["x", "p"], ["flat"], name="reshape"),
        helper.make_node("Mul", ["flat", "w"], ["m"], name="mul"),
        helper.make_node("Relu", ["m"], ["y"], name="relu"),
    ]
    g = helper.make_graph(
        nodes, "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w]
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)], ir_version=7)


def test_a_checked_upgrade_compares_the_two_probe_runs(sessions_built):
    """Where probing ran the model before and after the upgrade, those two runs' outputs are the
    check (one session, the new probe's); where it did not, two sessions compare the outputs."""
    from amq.calib.prepare import Prepared, upgrade_checked
    from amq.graph.model import opset_version

    m = _dynamic_opset11()
    feeds = {"x": np.arange(12, dtype=np.float32).reshape(2, 6) - 5}
    before = runner.probed(m, feeds)
    want = np.maximum(feeds["x"].reshape(12) * np.linspace(-1, 1, 12), 0)
    np.testing.assert_allclose(before.outputs[0], want, rtol=1e-6)
    made = sessions_built
    made.clear()  # the probe above
    up, after = upgrade_checked(Prepared(m, "m.onnx"), 13, feeds, before)
    assert opset_version(up.model) == 13 and len(made) == 1
    assert after.info["flat"].shape == (12,)
    np.testing.assert_allclose(after.outputs[0], want, rtol=1e-6)
    assert up.notes[-1] == "opset upgraded 11 -> 13 (outputs verified equal)"
    made.clear()
    upgrade_checked(Prepared(m, "m.onnx"), 13, feeds)  # no probe of the model before
    assert len(made) == 3  # the new probe, then the two compared sessions


@pytest.mark.parametrize("probed_before", [True, False])
def test_an_upgrade_that_changes_the_outputs_is_refused(monkeypatch, probed_before):
    """The converter's result is checked against the model before it on the probe's feeds: a
    weight changed by the upgrade is a one-line error naming the model, from either check."""
    from amq.calib import prepare as P
    from amq.errors import ModelError

    m = _dynamic_opset11()
    feeds = {"x": np.ones((2, 6), np.float32)}
    real = P.upgrade_opset

    def broken(model, target, source="model"):
        out = real(model, target, source)
        out.graph.initializer[0].CopyFrom(
            onnx.numpy_helper.from_array(np.full(12, 2.0, np.float32), "w")
        )
        return out

    monkeypatch.setattr(P, "upgrade_opset", broken)
    before = runner.probed(m, feeds) if probed_before else None
    with pytest.raises(ModelError, match=r"^m\.onnx: the opset 11 -> 13 upgrade changed"):
        P.upgrade_checked(P.Prepared(m, "m.onnx"), 13, feeds, before)
