"""Metrics (DESIGN.md §8): each built-in metric against numpy written here, the bootstrap CI,
streaming Fidelity, api.evaluate on a tiny model, user metrics and `amq eval`."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from amq import api
from amq.analysis import metrics as M
from amq.errors import ConfigError, DataError
from tests.cli_helpers import assert_one_line_error, run_cli

# ---------------------------------------------------------------------------------------------
# numpy references (written independently of amq.analysis.metrics)


def np_top1(out, labels):
    o = np.asarray(out, np.float64).reshape(len(out), -1)
    return 100.0 * float(np.mean(o.argmax(1) == np.asarray(labels).reshape(-1)))


def np_agreement(out, ref):
    o = np.asarray(out, np.float64).reshape(len(out), -1)
    r = np.asarray(ref, np.float64).reshape(len(ref), -1)
    return 100.0 * float(np.mean(o.argmax(1) == r.argmax(1)))


def np_cosine(out, ref):
    o = np.asarray(out, np.float64).reshape(len(out), -1)
    r = np.asarray(ref, np.float64).reshape(len(ref), -1)
    per = (o * r).sum(1) / (np.sqrt((o * o).sum(1)) * np.sqrt((r * r).sum(1)))
    return float(per.mean())


def np_neg_mse(out, ref):
    return -float(np.mean((np.asarray(out, np.float64) - np.asarray(ref, np.float64)) ** 2))


def np_sqnr(out, ref):
    r = np.asarray(ref, np.float64)
    e = r - np.asarray(out, np.float64)
    return 10.0 * math.log10(float((r * r).sum()) / float((e * e).sum()))


NP = {
    "agreement": np_agreement,
    "cosine": np_cosine,
    "neg_mse": np_neg_mse,
    "sqnr": np_sqnr,
}


def _outs(seed: int, shape=(40, 10), noise=0.5):
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal(shape).astype(np.float32)
    out = (ref + noise * rng.standard_normal(shape)).astype(np.float32)
    labels = rng.integers(0, shape[1], shape[0])
    return out, ref, labels


# ---------------------------------------------------------------------------------------------
# per-sample scores and aggregate


@pytest.mark.parametrize("shape", [(40, 10), (12, 3, 4, 5)])
@pytest.mark.parametrize("metric", sorted(NP))
def test_fidelity_metrics_match_numpy(metric, shape):
    out, ref, _ = _outs(3, shape)
    scores = M.per_sample_scores(metric, out, ref, None)
    assert len(scores) == shape[0]
    assert M.aggregate(metric, scores) == pytest.approx(NP[metric](out, ref), rel=1e-9, abs=1e-12)


def test_top1_matches_numpy_and_per_sample_is_0_or_100():
    out, _, labels = _outs(4)
    labels[:10] = out[:10].argmax(1)  # some certainly right
    scores = M.per_sample_scores("top1", out, None, labels)
    assert set(np.unique(scores)) <= {0.0, 100.0}
    assert scores[:10].tolist() == [100.0] * 10
    assert M.aggregate("top1", scores) == pytest.approx(np_top1(out, labels))
    # labels given as a column [N, 1] are the same labels
    col = M.per_sample_scores("top1", out, None, labels.reshape(-1, 1))
    assert np.array_equal(col, scores)


def test_sqnr_is_a_ratio_of_sums_not_a_mean_of_ratios():
    # two samples: a loud one with small error and a quiet one with large relative error
    ref = np.array([[10.0, 10.0], [0.1, 0.1]])
    out = np.array([[10.1, 9.9], [0.2, 0.0]])
    s = M.per_sample_scores("sqnr", out, ref, None)
    assert s.shape == (2, 2)
    want = 10 * math.log10(200.02 / 0.04)
    assert M.aggregate("sqnr", s) == pytest.approx(want)
    mean_of_db = np.mean([10 * math.log10(200 / 0.02), 10 * math.log10(0.02 / 0.02)])
    assert abs(M.aggregate("sqnr", s) - mean_of_db) > 1.0


def test_identical_outputs_are_ideal():
    out, _, _ = _outs(5)
    for metric, ideal in (("agreement", 100.0), ("cosine", 1.0), ("neg_mse", 0.0)):
        v = M.aggregate(metric, M.per_sample_scores(metric, out, out, None))
        assert v == pytest.approx(ideal, abs=1e-12)
        assert M.metric_spec(metric).ideal == ideal
    assert M.aggregate("sqnr", M.per_sample_scores("sqnr", out, out, None)) == math.inf


def test_cosine_zero_vectors():
    z = np.zeros(5)
    assert M.cosine(z, z) == 1.0
    assert M.cosine(z, np.ones(5)) == 0.0
    assert M.cosine(np.ones(5), -np.ones(5)) == pytest.approx(-1.0)


def test_sqnr_db_function_matches_numpy():
    out, ref, _ = _outs(6)
    assert M.sqnr_db(ref, out) == pytest.approx(np_sqnr(out, ref))
    assert M.sqnr_db(ref, ref) == math.inf
    assert M.sqnr_db(np.zeros(3), np.ones(3)) == -math.inf


def test_unknown_metric_name_is_a_config_error():
    with pytest.raises(ConfigError, match="not one of"):
        M.metric_spec("accuracy")


# ---------------------------------------------------------------------------------------------
# bootstrap


def _ci_width(n: int, seed: int = 0) -> tuple[float, float, float]:
    x = np.random.default_rng(seed).standard_normal(n)
    lo, hi = M.bootstrap_ci(lambda i: float(np.mean(x[i])), n, rounds=500)
    return float(np.mean(x)), lo, hi


@pytest.mark.parametrize("n", [20, 200, 2000])
def test_bootstrap_ci_contains_the_point_estimate(n):
    m, lo, hi = _ci_width(n)
    assert lo < m < hi
    # a 95% percentile interval of a mean is about mean +- 1.96 sigma / sqrt(n)
    assert hi - lo == pytest.approx(2 * 1.96 / math.sqrt(n), rel=0.35)


def test_bootstrap_ci_narrows_with_n():
    widths = [hi - lo for _, lo, hi in (_ci_width(n) for n in (25, 250, 2500))]
    assert widths[0] > 2.5 * widths[1] > 2.5 * 2.5 * widths[2]


def test_bootstrap_ci_is_seeded_and_handles_tiny_n():
    x = np.arange(30.0)
    a = M.bootstrap_ci(lambda i: float(np.mean(x[i])), 30, rounds=200, seed=7)
    b = M.bootstrap_ci(lambda i: float(np.mean(x[i])), 30, rounds=200, seed=7)
    assert a == b
    assert M.bootstrap_ci(lambda i: float(np.sum(x[i])), 1) == (0.0, 0.0)


def test_bootstrap_ci_of_constant_scores_is_a_point():
    d = np.zeros(50)
    assert M.bootstrap_ci(lambda i: float(np.mean(d[i])), 50, rounds=100) == (0.0, 0.0)


# ---------------------------------------------------------------------------------------------
# Fidelity: streaming equals one shot


def _fid(chunks_ref, chunks_out) -> M.Fidelity:
    f = M.Fidelity()
    for r, o in zip(chunks_ref, chunks_out, strict=True):
        f.update(r, o)
    return f


@settings(max_examples=25, deadline=None)
@given(
    cuts=st.lists(st.integers(1, 29), max_size=5, unique=True).map(sorted),
    seed=st.integers(0, 10),
)
def test_fidelity_streaming_equals_one_shot(cuts, seed):
    out, ref, _ = _outs(seed, (30, 7))
    one = _fid([ref], [out])
    many = _fid(np.split(ref, cuts), np.split(out, cuts))
    assert many.samples == one.samples == 30
    assert many.elements == one.elements == 30 * 7
    assert many.agree == one.agree and many.agree_n == one.agree_n == 30
    assert many.max_abs == one.max_abs
    assert many.sqnr_db == pytest.approx(one.sqnr_db, rel=1e-12)
    assert many.cosine == pytest.approx(one.cosine, rel=1e-12)


def test_fidelity_values_match_numpy():
    out, ref, _ = _outs(8, (25, 6))
    f = _fid([ref[:10], ref[10:]], [out[:10], out[10:]])
    assert f.sqnr_db == pytest.approx(np_sqnr(out, ref))
    assert f.cosine == pytest.approx(np_cosine(out, ref))
    assert f.agreement == pytest.approx(np_agreement(out, ref) / 100.0)
    assert f.max_abs == pytest.approx(float(np.max(np.abs(out - ref))))
    assert f.noise / f.elements == pytest.approx(-np_neg_mse(out, ref))


def test_fidelity_agreement_only_for_class_scores():
    out, ref, _ = _outs(9, (6, 2, 3))
    f = _fid([ref], [out])
    assert f.agreement is None
    assert M.Fidelity().cosine != M.Fidelity().cosine  # nan before any update


# ---------------------------------------------------------------------------------------------
# evaluate() on a tiny model


def _linear_model(seed: int, noise: float = 0.0) -> onnx.ModelProto:
    """x[batch, 12] -> Gemm(transB) -> y[batch, 5]; ``noise`` perturbs the weights (a stand-in
    for a quantized copy)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 12)).astype(np.float32)
    b = (0.1 * rng.standard_normal(5)).astype(np.float32)
    if noise:
        w = w + (noise * np.random.default_rng(seed).standard_normal(w.shape)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="/fc/Gemm", transB=1)],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


N_EVAL = 60


def _eval_data(with_labels: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    x = rng.standard_normal((N_EVAL, 1, 12)).astype(np.float32)
    labels = rng.integers(0, 5, N_EVAL)
    # half the labels are the float model's prediction, so top1 is well inside (0, 100)
    y = _run(_linear_model(0), x)
    labels[::2] = y[::2].argmax(1)
    return x, labels


def _feeds(x, labels=None):
    out = []
    for i in range(len(x)):
        d = {"x": x[i]}
        if labels is not None:
            d["label"] = int(labels[i])
        out.append(d)
    return out


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, {"x": x[i]})[0] for i in range(len(x))], axis=0)


def test_evaluate_top1_value_and_paired_drop():
    x, labels = _eval_data()
    fm, qm = _linear_model(0), _linear_model(1, noise=0.6)
    yf, yq = _run(fm, x), _run(qm, x)
    res = api.evaluate(qm, _feeds(x, labels), reference=fm, batch_size=7)
    assert res.metric == "top1" and res.output == "y" and res.samples == N_EVAL
    assert res.value == pytest.approx(np_top1(yq, labels))
    assert res.reference_value == pytest.approx(np_top1(yf, labels))
    assert res.drop == pytest.approx(res.reference_value - res.value)
    assert res.value_ci[0] <= res.value <= res.value_ci[1]
    assert res.drop_ci[0] <= res.drop <= res.drop_ci[1]
    assert 0 < res.value < 100
    # the same numbers whatever the batch size
    res1 = api.evaluate(qm, _feeds(x, labels), reference=fm, batch_size=1)
    assert (res1.value, res1.drop) == (res.value, res.drop)


def test_time_sessions_interleaves_after_a_warm_up(monkeypatch):
    """Each pass of A costs 1 s and of B 3 s on a fake clock; passes alternate A, B, A, B after
    one untimed pass each, until the time budget is spent (at least min_repeats)."""
    import time as real_time

    from amq import runtime

    clock = {"t": 0.0}
    order: list[str] = []

    class Fake:
        def __init__(self, name: str, cost: float) -> None:
            self.name, self.cost = name, cost

        def run(self, _names, _feeds):
            order.append(self.name)
            clock["t"] += self.cost

    monkeypatch.setattr(real_time, "perf_counter", lambda: clock["t"])
    t = runtime.time_sessions(
        [Fake("A", 1.0), Fake("B", 3.0)], [{}, {}], min_repeats=3, min_seconds=20
    )
    assert order[:4] == ["A", "A", "B", "B"]  # warm-up: one pass (2 batches) each
    assert order[4:8] == ["A", "A", "B", "B"]  # then interleaved passes
    assert t.shape[1] == 2 and len(t) == 3  # 3 repeats of 8 s reach the 20 s budget
    np.testing.assert_allclose(t, [[2.0, 6.0]] * 3)


def test_evaluate_speed_is_the_ratio_of_fastest_passes(monkeypatch):
    """A noisy repeat (one slow pass) does not move the figure: the fastest pass of each model
    counts (noise only adds time); the quartiles of the per-repeat ratios show the noise."""
    from amq import runtime

    x, labels = _eval_data()
    fm, qm = _linear_model(0), _linear_model(1, noise=0.6)
    times = np.array([[1.0, 3.0], [1.1, 3.2], [9.0, 3.1], [1.0, 3.0]])
    monkeypatch.setattr(runtime, "time_sessions", lambda sessions, feeds, **kw: times)
    res = api.evaluate(qm, _feeds(x, labels), reference=fm, batch_size=7)
    assert (res.seconds, res.reference_seconds) == (1.0, 3.0)
    assert res.speed == pytest.approx(3.0)
    lo, hi = res.speed_range
    assert lo < 3.0 <= hi and res.timed_repeats == 4 and res.isa
    d = res.to_dict()
    assert d["speed_vs_reference"] == pytest.approx(3.0) and d["isa"] == res.isa
    alone = api.evaluate(fm, _feeds(x, labels))
    assert alone.reference_seconds is None and alone.speed is None and alone.seconds > 0


def test_evaluate_drop_ci_is_paired():
    """Identical models: every paired difference is 0, so the drop CI is exactly [0, 0] (an
    unpaired bootstrap of two resampled means would not be)."""
    x, labels = _eval_data()
    fm = _linear_model(0)
    res = api.evaluate(fm, _feeds(x, labels), reference=fm)
    assert 0 < res.value < 100
    assert res.drop == 0.0
    assert res.drop_ci == (0.0, 0.0)
    assert res.value_ci[1] - res.value_ci[0] > 5.0  # the value itself is uncertain
    for metric in ("agreement", "neg_mse"):
        r = api.evaluate(fm, _feeds(x, labels), reference=fm, metric=metric)
        assert r.drop == pytest.approx(0.0, abs=1e-12)
        assert r.drop_ci == pytest.approx((0.0, 0.0), abs=1e-12)


@pytest.mark.parametrize("metric", ["agreement", "cosine", "sqnr", "neg_mse"])
def test_evaluate_fidelity_metrics_match_numpy(metric):
    x, _ = _eval_data()
    fm, qm = _linear_model(0), _linear_model(1, noise=0.3)
    yf, yq = _run(fm, x), _run(qm, x)
    res = api.evaluate(qm, _feeds(x), reference=fm, metric=metric, bootstrap_rounds=200)
    assert res.value == pytest.approx(NP[metric](yq, yf), rel=1e-6)
    spec = M.metric_spec(metric)
    if spec.ideal is not None:
        assert res.reference_value == spec.ideal
        assert res.drop == pytest.approx(spec.ideal - res.value)
        assert res.drop_ci[0] <= res.drop <= res.drop_ci[1]
    assert res.value_ci[0] <= res.value <= res.value_ci[1]


def test_evaluate_without_labels_defaults_to_agreement():
    x, _ = _eval_data()
    fm, qm = _linear_model(0), _linear_model(1, noise=0.6)
    res = api.evaluate(qm, _feeds(x), reference=fm)
    assert res.metric == "agreement"
    assert res.value == pytest.approx(np_agreement(_run(qm, x), _run(fm, x)))


def test_evaluate_limit_takes_a_subset():
    x, labels = _eval_data()
    res = api.evaluate(_linear_model(0), _feeds(x, labels), limit=25)
    assert res.samples == 25


def test_evaluate_errors():
    x, labels = _eval_data()
    fm = _linear_model(0)
    with pytest.raises(DataError, match="needs labels"):
        api.evaluate(fm, _feeds(x), reference=fm, metric="top1")
    with pytest.raises(DataError, match="--reference"):
        api.evaluate(fm, _feeds(x, labels), metric="cosine")
    with pytest.raises(DataError, match="no labels"):
        api.evaluate(fm, _feeds(x))
    with pytest.raises(DataError, match="no output named 'z'"):
        api.evaluate(fm, _feeds(x, labels), output="z")


# ---------------------------------------------------------------------------------------------
# user metrics: module:function(outputs, references) -> float


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A metric module in tmp_path (the working directory); removed from sys.modules after."""
    name = f"amq_user_metric_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(
        "import numpy as np\n"
        "CALLS = []\n"
        "def max_abs_score(outputs, references):\n"
        "    CALLS.append(len(outputs))\n"
        "    return -float(np.max(np.abs(outputs - references)))\n"
        "not_callable = 3\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield name
    sys.modules.pop(name, None)


def test_user_metric_module_function(user_module):
    x, _ = _eval_data()
    fm, qm = _linear_model(0), _linear_model(1, noise=0.3)
    yf, yq = _run(fm, x), _run(qm, x)
    res = api.evaluate(qm, _feeds(x), reference=fm, metric=f"{user_module}:max_abs_score")
    want = -float(np.max(np.abs(yq - yf)))
    assert res.metric == f"{user_module}:max_abs_score"
    assert res.value == pytest.approx(want, rel=1e-6)
    assert res.reference_value == 0.0
    assert res.drop == pytest.approx(-want, rel=1e-6)
    assert res.drop_ci is not None and res.drop_ci[0] <= res.drop_ci[1]
    assert sys.modules[user_module].CALLS[0] == N_EVAL  # called on every output at once


def test_user_metric_by_file_path(user_module, tmp_path):
    x, _ = _eval_data()
    fm, qm = _linear_model(0), _linear_model(1, noise=0.3)
    res = api.evaluate(
        qm, _feeds(x), reference=fm, metric=str(tmp_path / f"{user_module}.py") + ":max_abs_score"
    )
    assert res.value == pytest.approx(-float(np.max(np.abs(_run(qm, x) - _run(fm, x)))), rel=1e-6)


@pytest.mark.parametrize(
    "ref, match",
    [
        ("{mod}:nope", "no function 'nope'"),
        ("{mod}:not_callable", "no function 'not_callable'"),
        ("no_such_module_xyz:f", "cannot import"),
        ("missing_file.py:f", "not found"),
    ],
)
def test_user_metric_errors(user_module, ref, match):
    with pytest.raises(ConfigError, match=match):
        M.metric_spec(ref.format(mod=user_module))


# ---------------------------------------------------------------------------------------------
# amq eval


@pytest.fixture
def eval_files(tmp_path):
    x, labels = _eval_data()
    d = tmp_path / "eval"
    d.mkdir()
    np.save(d / "x.npy", x)
    np.save(d / "labels.npy", labels)
    nolab = tmp_path / "eval_nolabels"
    nolab.mkdir()
    np.save(nolab / "x.npy", x)
    fm, qm = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(_linear_model(0), fm)
    onnx.save(_linear_model(1, noise=0.6), qm)
    return {"data": d, "nolabels": nolab, "float": fm, "quant": qm, "x": x, "labels": labels}


def test_eval_cli_json(capsys, eval_files):
    f = eval_files
    code, out, err = run_cli(
        capsys, "eval", str(f["quant"]), "--data", str(f["data"]), "--reference", str(f["float"]),
        "--json",
    )  # fmt: skip
    assert code == 0, err
    d = json.loads(out)
    yq, yf = _run(onnx.load(f["quant"]), f["x"]), _run(onnx.load(f["float"]), f["x"])
    assert d["metric"] == "top1" and d["samples"] == N_EVAL
    assert d["value"] == pytest.approx(np_top1(yq, f["labels"]))
    assert d["reference_value"] == pytest.approx(np_top1(yf, f["labels"]))
    assert d["drop"] == pytest.approx(d["reference_value"] - d["value"])
    lo, hi = d["drop_ci95"]
    assert lo <= d["drop"] <= hi
    assert len(d["value_ci95"]) == 2


def test_eval_cli_table_shows_float_drop_and_ci(capsys, eval_files):
    f = eval_files
    code, out, err = run_cli(
        capsys, "eval", str(f["quant"]), "--data", str(f["data"]), "--reference", str(f["float"]),
    )  # fmt: skip
    assert code == 0, err
    for col in ("metric", "value", "95% CI", "float", "drop", "drop 95% CI", "top1"):
        assert col in out, col
    # without a reference: no float/drop columns
    code, out, err = run_cli(capsys, "eval", str(f["quant"]), "--data", str(f["data"]))
    assert code == 0, err
    assert "95% CI" in out and "drop" not in out
    # -q: nothing on stdout
    code, out, err = run_cli(capsys, "eval", str(f["quant"]), "--data", str(f["data"]), "-q")
    assert code == 0 and out == "", err


def test_eval_cli_errors(capsys, eval_files):
    f = eval_files
    code, _, err = run_cli(
        capsys, "eval", str(f["quant"]), "--data", str(f["nolabels"]), "--metric", "top1",
        "--reference", str(f["float"]),
    )  # fmt: skip
    assert_one_line_error(code, err, "top1", "labels")
    code, _, err = run_cli(capsys, "eval", str(f["quant"]), "--data", str(f["nolabels"]))
    assert_one_line_error(code, err, "--reference")
    code, _, err = run_cli(
        capsys, "eval", str(f["quant"]), "--data", str(f["data"]), "--metric", "cosine"
    )
    assert_one_line_error(code, err, "cosine", "--reference")
    code, _, err = run_cli(
        capsys, "eval", str(f["quant"]), "--data", str(f["data"]), "--metric", "accuracy"
    )
    assert_one_line_error(code, err, "accuracy")
    code, _, err = run_cli(
        capsys, "eval", str(f["quant"]), "--data", str(f["data"]), "--output-name", "logits"
    )
    assert_one_line_error(code, err, "logits")
    code, _, err = run_cli(capsys, "eval", str(f["quant"]), "--data", str(f["data"] / "nope"))
    assert_one_line_error(code, err, "nope")


def test_the_default_output_is_the_first_float_one():
    """An int output first (a mask a transformer export passes through) is not what is scored."""
    from onnx import TensorProto as T
    from onnx import helper as h

    from amq.analysis.evaluate import pick_output
    from amq.runtime import session

    g = h.make_graph(
        [
            h.make_node("Identity", ["mask"], ["mask_out"]),
            h.make_node("Relu", ["x"], ["y"]),
        ],
        "g",
        [
            h.make_tensor_value_info("mask", T.INT64, [2]),
            h.make_tensor_value_info("x", T.FLOAT, [2]),
        ],
        [
            h.make_tensor_value_info("mask_out", T.INT64, [2]),
            h.make_tensor_value_info("y", T.FLOAT, [2]),
        ],
    )
    sess = session(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]))
    assert pick_output(sess, None, "m") == "y"
    assert pick_output(sess, "mask_out", "m") == "mask_out"
