"""Float vs quantized model outputs, on both executions of the quantized model (DESIGN.md §6b).

The ideal execution (Q/DQ evaluated in float) is what amq's math promises on every machine; the
runtime execution (a default onnxruntime session) is what this CPU's integer kernels deliver.
``quantize``'s summary and ``compare`` both report the two, and the runtime against the ideal, so
that neither can call a model fine while the outputs users get are off.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
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

    Float outputs that ``reference`` lacks are computed first, up to REFERENCE_BYTES of them,
    with the float session gone before the quantized ones are built: three sessions at once
    were the peak of a run whose statistics came from the cache (all-mpnet-base-v2: 3.3 GB,
    against 2.4 GB with the calibration pass's outputs). Beyond that budget the float session
    runs beside them, batch by batch."""
    calls = [(dict(f), n) for f, n in calls]
    given = min(len(reference or []), len(calls))
    reference, fsess, fnames = _float_reference(float_model, calls, reference)
    ideal = runtime.session_for(quant_model, Execution.IDEAL, "quantized model")
    rt = runtime.session_for(
        quant_model, Execution.RUNTIME, "quantized model", optimized_path=optimized_path
    )
    names = [o.name for o in ideal.get_outputs()]
    if fnames is not None and fnames != names:  # computed here in the float model's order
        at = {n: i for i, n in enumerate(fnames)}
        reference[given:] = [[r[at[n]] for n in names] for r in reference[given:]]
    out = OutputFidelity(isa=runtime.cpu_isa().describe())
    accs = (out.ideal, out.runtime, out.runtime_vs_ideal)
    runs = run_batches(ideal, names, ((f, [], n) for f, n in calls))
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


REFERENCE_BYTES = 256 << 20  # float outputs computed ahead of the quantized sessions, at most


def _float_reference(
    float_model: onnx.ModelProto | str | os.PathLike[str],
    calls: list[tuple[dict[str, np.ndarray], int]],
    reference: list | None,
) -> tuple[list, Any, list[str] | None]:
    """(the float outputs of ``calls`` as far as ``reference`` has them or REFERENCE_BYTES
    allow, the float session where some are still missing (else None), the output order of
    those computed here (None: none were))."""
    known = list(reference or [])[: len(calls)]
    if len(known) == len(calls):
        return known, None, None
    fsess = runtime.session(float_model, source="float model")
    names = [o.name for o in fsess.get_outputs()]
    held = sum(int(getattr(v, "nbytes", 0)) for r in known for v in r)
    for feeds, _n in calls[len(known) :]:
        r = fsess.run(names, feeds)
        known.append(r)
        held += sum(int(getattr(v, "nbytes", 0)) for v in r)
        if held > REFERENCE_BYTES:
            return known, fsess, names  # the rest runs beside the quantized sessions
    del fsess
    runtime.release_free_memory()
    return known, None, names


def _same_shapes(a: list, b: list) -> bool:
    """Two output lists of the same batch: same length and the same shape, output by output."""
    return len(a) == len(b) and all(np.shape(x) == np.shape(y) for x, y in zip(a, b, strict=True))
