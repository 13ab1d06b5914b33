"""The Metric protocol (DESIGN.md §2, analysis/metrics.py): built-ins and a user's
module:function go through the same scores/value/join, and a user function that computes what a
built-in computes gives the same numbers through every path (value, drop, bootstrap CI)."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest

from amq import api
from amq.analysis import metrics as M
from amq.errors import ConfigError
from tests.unit.test_metrics import _eval_data, _feeds, _linear_model, _outs


@pytest.fixture
def agreement_module(tmp_path, monkeypatch):
    """A user metric computing top-1 agreement in %, as the built-in does."""
    name = f"amq_agree_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(
        "import numpy as np\n"
        "def agreement(outputs, references):\n"
        "    o = outputs.reshape(len(outputs), -1).argmax(1)\n"
        "    r = references.reshape(len(references), -1).argmax(1)\n"
        "    return 100.0 * float(np.mean(o == r))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield f"{name}:agreement"
    sys.modules.pop(name, None)


@pytest.mark.parametrize("name", M.BUILTIN_METRICS)
def test_every_builtin_is_a_metric(name):
    m = M.get_metric(name)
    assert isinstance(m, M.Metric)
    out, ref, labels = _outs(1)
    q = m.scores(out, ref, labels)
    assert len(q) == len(out)
    # value of the joined batch scores = value over the whole set
    parts = [m.scores(out[a:b], ref[a:b], labels[a:b]) for a, b in ((0, 13), (13, 40))]
    assert m.value(m.join(parts)) == pytest.approx(m.value(q), rel=1e-12)


def test_user_metric_equals_the_builtin_through_the_protocol(agreement_module):
    out, ref, labels = _outs(2)
    user, builtin = M.get_metric(agreement_module), M.get_metric("agreement")
    assert isinstance(user, M.Metric)
    qu, qb = user.scores(out, ref, labels), builtin.scores(out, ref, labels)
    assert user.value(qu) == pytest.approx(builtin.value(qb))
    # resampled subsets agree too: a bootstrap CI means the same thing for both kinds
    idx = np.random.default_rng(0).integers(0, len(out), len(out))
    assert user.value(qu[idx]) == pytest.approx(builtin.value(qb[idx]))
    # the baseline: the built-in's ideal is what the user function gives the reference itself
    rq = user.scores(ref, ref, labels)
    assert M.baseline(user, rq) == M.baseline(builtin, None) == 100.0
    du, _ = M.drop_with_ci(user, qu, rq, rounds=50)
    db, _ = M.drop_with_ci(builtin, qb, None, rounds=50)
    assert du == pytest.approx(db)


def test_user_metric_and_builtin_give_the_same_evaluation(agreement_module):
    x, _ = _eval_data()
    fm, qm = _linear_model(0), _linear_model(1, noise=0.6)
    a = api.evaluate(qm, _feeds(x), reference=fm, metric="agreement", bootstrap_rounds=200)
    b = api.evaluate(qm, _feeds(x), reference=fm, metric=agreement_module, bootstrap_rounds=200)
    assert 0 < a.value < 100
    assert b.value == pytest.approx(a.value)
    assert b.reference_value == pytest.approx(a.reference_value)
    assert b.drop == pytest.approx(a.drop)
    # the same resamples (one seed): the same percentile CIs
    assert b.value_ci == pytest.approx(a.value_ci)
    assert b.drop_ci == pytest.approx(a.drop_ci)


def test_sqnr_has_no_baseline_and_top1_scores_the_reference():
    out, ref, labels = _outs(3)
    sq, top1 = M.get_metric("sqnr"), M.get_metric("top1")
    assert M.baseline(sq, sq.scores(out, ref, None)) is None
    assert M.drop_with_ci(sq, sq.scores(out, ref, None), None, 10) == (None, None)
    r = top1.scores(ref, None, labels)
    q = top1.scores(out, None, labels)
    drop, ci = M.drop_with_ci(top1, q, r, 200)
    assert drop == pytest.approx(top1.value(r) - top1.value(q))
    assert ci[0] <= drop <= ci[1]


@pytest.mark.parametrize("bad", ["accuracy", "top-1", "Top1"])
def test_bad_metric_name_is_one_line(bad):
    with pytest.raises(ConfigError) as e:
        M.get_metric(bad)
    msg = str(e.value)
    assert "\n" not in msg and bad in msg and "top1" in msg and "module:function" in msg


def test_sensitivity_with_a_user_metric_equals_the_builtin(agreement_module):
    """Sensitivity scores a user metric through the same path as a built-in: same values and
    drops per layer, a drop CI and the local error for both."""
    from tests.e2e.test_sensitivity import cnn, feeds

    m = cnn("act")
    cal, ev = feeds(m)
    unlabelled = [{"x": f["x"]} for f in ev]
    kw = {"bits": (4,), "cache_dir": None}
    a = api.sensitivity(m, cal, unlabelled, metric="agreement", **kw)
    b = api.sensitivity(m, cal, unlabelled, metric=agreement_module, **kw)
    assert b.float_value == a.float_value == 100.0
    assert [r.layer for r in b.ranked(4)] == [r.layer for r in a.ranked(4)]
    for ra, rb in zip(a.rows, b.rows, strict=True):
        assert rb.value == pytest.approx(ra.value) and rb.drop == pytest.approx(ra.drop)
        assert rb.drop_ci is not None and rb.drop_ci[0] <= rb.drop <= rb.drop_ci[1]
        assert rb.local_sqnr_db == pytest.approx(ra.local_sqnr_db)


def test_search_with_a_user_metric_equals_the_builtin(agreement_module, tmp_path):
    """A search scores trials through the protocol: the user metric's one number per trial
    equals the built-in's mean of per-sample drops, trial by trial (same seed, same trials)."""
    x, _ = _eval_data()
    model = tmp_path / "m.onnx"
    onnx.save(_linear_model(0), model)
    kw = {"n_trials": 4, "cache_dir": None, "weight_bits": (4, 8), "act_bits": (8,)}
    runs = {}
    for name in ("agreement", agreement_module):
        out = tmp_path / name.replace(":", "_")
        runs[name] = api.search(model, _feeds(x), _feeds(x), "50", out, metric=name, **kw)
    a, b = runs["agreement"], runs[agreement_module]
    assert a.float_value == b.float_value == 100.0
    da = {r.number: r.drop for r in a.outcome.records if r.drop is not None}
    db = {r.number: r.drop for r in b.outcome.records if r.drop is not None}
    assert da and da.keys() == db.keys()
    for k in da:
        assert db[k] == pytest.approx(da[k], abs=1e-9)
