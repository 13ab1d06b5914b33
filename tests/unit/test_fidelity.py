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
