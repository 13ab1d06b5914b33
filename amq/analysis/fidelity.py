"""Float vs quantized model outputs, on both executions of the quantized model (DESIGN.md §6b).

The ideal execution (Q/DQ evaluated in float) is what amq's math promises on every machine; the
runtime execution (a default onnxruntime session) is what this CPU's integer kernels deliver.
``quantize``'s summary and ``compare`` both report the two, and the runtime against the ideal, so
that neither can call a model fine while the outputs users get are off.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from amq import runtime
from amq.analysis.metrics import Fidelity
from amq.calib.runner import run_batches
from amq.runtime import Execution

RUNTIME_GAP_DB = 1.0  # runtime this much below ideal (output SQNR): a warning


@dataclass
class OutputFidelity:
    """Per model output: the quantized model's ideal and runtime outputs against the float ones,
    and the runtime against the ideal."""

    ideal: dict[str, Fidelity] = field(default_factory=dict)
    runtime: dict[str, Fidelity] = field(default_factory=dict)
    runtime_vs_ideal: dict[str, Fidelity] = field(default_factory=dict)
    samples: int = 0
    isa: str = ""

    def gaps(self) -> dict[str, float]:
        """Outputs whose runtime SQNR is more than RUNTIME_GAP_DB below the ideal one (dB lost)."""
        out = {}
        for k, v in self.ideal.items():
            r = self.runtime.get(k)
            if r is None:
                continue
            gap = min(v.sqnr_db, 100.0) - min(r.sqnr_db, 100.0)
            if gap > RUNTIME_GAP_DB:
                out[k] = gap
        return out

    def rows(self) -> list[dict[str, Any]]:
        """One row per output and comparison, with a verdict on the runtime."""
        gaps = self.gaps()
        rows = []
        for k in self.ideal:
            for what, acc in (
                ("ideal vs float", self.ideal),
                ("runtime vs float", self.runtime),
                ("runtime vs ideal", self.runtime_vs_ideal),
            ):
                f = acc.get(k)
                if f is None:
                    continue
                verdict = "-"
                if what == "runtime vs float":
                    verdict = (
                        f"off: {gaps[k]:.1f} dB below the Q/DQ math on this CPU ({self.isa})"
                        if k in gaps
                        else "ok"
                    )
                rows.append(
                    {
                        "output": k,
                        "compared": what,
                        "sqnr_db": f.sqnr_db,
                        "cosine": f.cosine,
                        "max_abs_diff": f.max_abs,
                        "top1_agreement": f.agreement,
                        "verdict": verdict,
                    }
                )
        return rows


def output_fidelity(
    float_model: onnx.ModelProto | str | os.PathLike[str],
    quant_model: onnx.ModelProto | str | os.PathLike[str],
    calls: Iterable[tuple[Mapping[str, np.ndarray], int]],
    reference: list | None = None,
    optimized_path: str | None = None,
) -> OutputFidelity:
    """Stream ``calls`` (feeds, samples in them) through the float model (or take its outputs
    from ``reference``, one list per call) and both executions of the quantized model.
    ``optimized_path``: where onnxruntime writes the runtime's optimized graph.

    Without ``reference`` (a statistics-cache hit, or ``compare``), the float outputs are
    computed first, for as many calls as REFERENCE_BYTES of feeds and outputs hold, and the
    float session is gone before the quantized ones are built: three sessions at once were the
    peak of a cache hit (all-mpnet-base-v2: 3.3 GB, against 2.4 GB with the calibration pass's
    outputs). Past that budget the float session runs beside them, batch by batch."""
    fsess, fnames = None, None
    if reference is None:
        ahead, calls, fsess, fnames = _float_ahead(float_model, calls)
        reference = [r for _f, _n, r in ahead]
        calls = itertools.chain(((f, n) for f, n, _r in ahead), calls)
    ideal = runtime.session_for(quant_model, Execution.IDEAL, "quantized model")
    rt = runtime.session_for(
        quant_model, Execution.RUNTIME, "quantized model", optimized_path=optimized_path
    )
    names = [o.name for o in ideal.get_outputs()]
    if fnames is not None and fnames != names:  # computed here in the float model's order
        at = {n: i for i, n in enumerate(fnames)}
        reference = [[r[at[n]] for n in names] for r in reference]
    out = OutputFidelity(isa=runtime.cpu_isa().describe())
    accs = (out.ideal, out.runtime, out.runtime_vs_ideal)
    runs = run_batches(ideal, names, ((dict(f), [], n) for f, n in calls))
    for i, batch in enumerate(runs):  # the ideal execution streams; the others run on its batches
        r = reference[i] if i < len(reference) else None
        qi = [batch.values[k] for k in names]
        if r is not None and not _same_shapes(r, qi):
            r = None  # kept for other batches (calibration's, larger than these calls)
        if r is None:
            if fsess is None:
                fsess = runtime.session(float_model, source="float model")
            r = fsess.run(names, batch.feeds)
        qr = rt.run(names, batch.feeds)
        for name, a, b, c in zip(names, r, qi, qr, strict=True):
            if not (isinstance(a, np.ndarray) and a.dtype.kind == "f"):
                continue
            for acc, (x, y) in zip(accs, ((a, b), (a, c), (b, c)), strict=True):
                acc.setdefault(name, Fidelity()).update(x, y)
        out.samples += batch.n
    return out


REFERENCE_BYTES = 256 << 20  # feeds and float outputs computed ahead of the quantized sessions


def _float_ahead(
    float_model: onnx.ModelProto | str | os.PathLike[str],
    calls: Iterable[tuple[Mapping[str, np.ndarray], int]],
) -> tuple[list, Iterator, Any, list[str]]:
    """((feeds, samples, float outputs) of the first calls, as many as REFERENCE_BYTES hold;
    the calls not run yet; the float session where some are left (else None); the order of
    its outputs)."""
    it = iter(calls)
    fsess = runtime.session(float_model, source="float model")
    names = [o.name for o in fsess.get_outputs()]
    ahead, held = [], 0
    for feeds, n in it:
        r = fsess.run(names, dict(feeds))
        ahead.append((feeds, n, r))
        held += sum(int(getattr(v, "nbytes", 0)) for v in (*feeds.values(), *r))
        if held > REFERENCE_BYTES:
            return ahead, it, fsess, names  # the rest runs beside the quantized sessions
    return ahead, it, None, names  # the float session goes with this frame


def _same_shapes(a: list, b: list) -> bool:
    """Two output lists of the same batch: same length and the same shape, output by output."""
    return len(a) == len(b) and all(np.shape(x) == np.shape(y) for x, y in zip(a, b, strict=True))
