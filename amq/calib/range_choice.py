"""``calibration.widen_to_mse: auto``: percentile ranges as they are, or widened to the ``mse``
range where that clips less, whichever gives the smaller float-vs-quantized output error on the
first calibration samples (ideal Q/DQ math, so the choice is the same on every CPU).

Why per model: the widened ranges keep tails that the error model finds costly to clip (the
torch-exported classifiers gain 4-5 dB, PP-OCR cls 3 dB), but a tail that the model's later ops
saturate anyway (an LSTM's gates, a detector's sigmoid) costs nothing when clipped, and the
coarser grid then loses (silero VAD -3.7 dB, PP-OCR det -0.5 dB); see bench/RESULTS_ALGORITHMS.md.
One tensor's error model cannot see that; the model's outputs do. The price: a second plan and
two quantized runs over up to MAX_SAMPLES samples (PP-OCR det 10.5 -> 18.7 s, rec 14.1 -> 19.5
s), which is why the default is ``true`` (widened everywhere), the better choice on 5 of the 7
real models."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import onnx

from amq.calib import runner
from amq.calib.data import Dataset, InputSpec, batches
from amq.config import Config, SmoothMode
from amq.plan import QuantPlan
from amq.runtime import Execution, session_for

MAX_SAMPLES = 16  # calibration samples the choice runs on (on 2 of PP-OCR det's images or 1 of
# silero VAD's sequences it chose wrong)
MARGIN = 0.98  # widening must cut the output error by 2% (0.09 dB) to be chosen


def with_widen(cfg: Config, on: bool) -> Config:
    mode = SmoothMode.ON if on else SmoothMode.OFF
    return replace(cfg, calibration=replace(cfg.calibration, widen_to_mse=mode))


def differs(a: QuantPlan, b: QuantPlan) -> bool:
    """Some activation got another range."""
    return any(
        tp.role == "activation" and b.tensors.get(t) is not None and b.tensors[t].range != tp.range
        for t, tp in a.tensors.items()
    )


def output_error(
    float_model: onnx.ModelProto,
    models: list[onnx.ModelProto],
    data: Dataset,
    specs: list[InputSpec],
    batch_size: int,
) -> list[float]:
    """Per quantized model, the mean over the float outputs of noise / signal energy on
    ``data`` (ideal execution)."""
    fsess = runner.session(float_model, source="float model")
    names = [o.name for o in float_model.graph.output]
    sessions = [session_for(m, Execution.IDEAL, "quantized model") for m in models]
    noise = np.zeros((len(models), len(names)))
    signal = np.zeros(len(names))
    for b in runner.run_batches(fsess, names, batches(data, specs, batch_size)):
        ref = [np.asarray(b.values[n]) for n in names]
        for i, s in enumerate(sessions):
            for j, q in enumerate(s.run(names, b.feeds)):
                r = ref[j]
                if r.dtype.kind != "f":
                    continue
                d = r.astype(np.float64) - np.asarray(q, np.float64)
                noise[i, j] += float(np.sum(d * d))
                if i == 0:
                    signal[j] += float(np.sum(r.astype(np.float64) ** 2))
    used = signal > 0
    if not used.any():
        return [0.0] * len(models)
    return [float(np.mean(noise[i, used] / signal[used])) for i in range(len(models))]


def choose(
    plan_for: Callable[[Config], QuantPlan],
    emit: Callable[[QuantPlan], onnx.ModelProto],
    float_model: onnx.ModelProto,
    data: Dataset,
    specs: list[InputSpec],
    cfg: Config,
) -> tuple[bool, str]:
    """(widen or not, a note saying what was measured) for ``cfg`` on ``auto``."""
    plans = [plan_for(with_widen(cfg, on)) for on in (False, True)]
    if not differs(*plans):
        return False, ""
    sub = data.head(min(MAX_SAMPLES, len(data)))
    off, on = output_error(
        float_model, [emit(p) for p in plans], sub, specs, cfg.calibration.batch_size
    )
    widen = on < MARGIN * off
    db = [10 * np.log10(1 / max(e, 1e-30)) for e in (off, on)]
    note = (
        f"activation ranges: percentile {'widened to mse' if widen else 'as is'} (output "
        f"SQNR on {len(sub)} calibration sample(s), ideal: {db[0]:.1f} dB as is, {db[1]:.1f} dB "
        "widened)"
    )
    return widen, note
