"""analysis/fidelity.output_fidelity: float outputs kept from other batches (calibration's, of
another size) are not paired with these calls' outputs; they are recomputed."""

from __future__ import annotations

import numpy as np

import amq
from amq.analysis.fidelity import output_fidelity
from amq.runtime import Execution, session_for
from tests.unit.test_smoothquant import lone, normal_x


def test_reference_of_another_batch_size_is_recomputed():
    m = lone()
    calib = [{"x": xi[None]} for xi in normal_x(16)]
    q = amq.quantize(m, calib, cache_dir=None, summary_samples=0).model
    one = {k: v[:1] for k, v in calib[0].items()}
    two = {k: np.concatenate([calib[0][k], calib[1][k]]) for k in calib[0]}
    names = [o.name for o in m.graph.output]
    stale = [session_for(m, Execution.IDEAL).run(names, two)]  # a 2-sample batch's outputs
    got = output_fidelity(m, q, [(one, 1)], stale)
    ref = output_fidelity(m, q, [(one, 1)], None)
    assert got.samples == ref.samples == 1
    for name in names:
        assert got.ideal[name].sqnr_db == ref.ideal[name].sqnr_db


def _tracked_sessions(monkeypatch) -> list[int]:
    """The number of amq sessions alive as each new one is built (weak references)."""
    import weakref  # noqa: PLC0415

    from amq import runtime  # noqa: PLC0415

    real, alive, seen = runtime.session, [], []

    def tracked(*args, **kwargs):
        seen.append(sum(r() is not None for r in alive))
        s = real(*args, **kwargs)
        alive.append(weakref.ref(s))
        return s

    monkeypatch.setattr(runtime, "session", tracked)
    return seen


def test_missing_float_outputs_are_computed_before_the_quantized_sessions(monkeypatch):
    """Without the calibration pass's outputs (a statistics-cache hit), the float model runs
    first and its session is gone before the two quantized ones are built: never three at once
    (all-mpnet-base-v2's peak). The figures equal those from given float outputs."""
    m = lone()
    calib = [{"x": xi[None]} for xi in normal_x(16)]
    q = amq.quantize(m, calib, cache_dir=None, summary_samples=0).model
    calls = [(c, 1) for c in calib[:3]]
    names = [o.name for o in m.graph.output]
    given = [session_for(m, Execution.IDEAL).run(names, f) for f, _ in calls]
    ref = output_fidelity(m, q, calls, given)
    seen = _tracked_sessions(monkeypatch)
    got = output_fidelity(m, q, calls, None)
    assert seen == [0, 0, 1]  # float, then ideal alone, then runtime beside ideal
    assert got.samples == ref.samples == 3
    for name in names:
        assert got.ideal[name].sqnr_db == ref.ideal[name].sqnr_db
        assert got.runtime[name].sqnr_db == ref.runtime[name].sqnr_db


def test_past_the_budget_the_float_session_runs_beside_with_the_same_figures(monkeypatch):
    """With no room for float outputs computed ahead, the first call is computed ahead and the
    float session stays for the rest (three sessions, as before the budget): same figures."""
    from amq.analysis import fidelity  # noqa: PLC0415

    m = lone()
    calib = [{"x": xi[None]} for xi in normal_x(16)]
    q = amq.quantize(m, calib, cache_dir=None, summary_samples=0).model
    calls = [(c, 1) for c in calib[:3]]
    ref = output_fidelity(m, q, calls, None)
    monkeypatch.setattr(fidelity, "REFERENCE_BYTES", 0)
    seen = _tracked_sessions(monkeypatch)
    got = output_fidelity(m, q, iter(calls), None)
    assert seen == [0, 1, 2]
    assert got.samples == ref.samples == 3
    for name in (o.name for o in m.graph.output):
        assert got.ideal[name].sqnr_db == ref.ideal[name].sqnr_db
        assert got.runtime_vs_ideal[name].sqnr_db == ref.runtime_vs_ideal[name].sqnr_db
