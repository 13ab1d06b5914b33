"""The rows of ``amq compare`` and what they mean: the result types and the diagnosis.

Diagnosis (``diagnose``), on the own quantizer's error:
- ``ok`` when its SQNR is at least ``OK_SQNR_DB`` (30 dB), whatever the mix of the error;
- ``clipping`` when the clipping part is the larger share of the error and more than
  ``CLIP_FRACTION`` (1e-4) of the values fall outside the grid;
- ``rounding`` otherwise: the range fits but the step is too coarse for the distribution.
Rows are ranked worst first by the accumulated SQNR (lowest first).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from amq.quant import qmath

OK_SQNR_DB = 30.0  # own-quantizer SQNR at or above this: "ok"
CLIP_FRACTION = 1e-4  # fewer values clipped than this never makes a "clipping" diagnosis
ZEROED_MANY = 0.25  # share of non-zero values rounded to zero that marks a non-uniform tensor


@dataclass
class TensorRow:
    name: str
    kind: str
    node: str
    dtype: str
    bits: int
    scale: float
    scale_min: float
    zero_point: int | None
    axis: int | None  # channel axis of a per-channel quantizer
    grid_min: float
    grid_max: float
    sqnr_db: float | None = None
    own_sqnr_db: float | None = None
    input_sqnr_db: float | None = None
    cosine: float | None = None
    mse: float | None = None
    l1: float | None = None
    kl: float | None = None
    max_abs_diff: float | None = None
    clipped_fraction: float | None = None
    overshoot: float | None = None  # largest distance beyond the grid end, in units of scale
    clip_share: float | None = None  # share of the own quantizer's squared error from clipping
    zeroed_fraction: float | None = None  # non-zero values that round to zero
    float_min: float | None = None
    float_max: float | None = None
    float_mean: float | None = None
    float_var: float | None = None
    quant_min: float | None = None
    quant_max: float | None = None
    quant_mean: float | None = None
    quant_var: float | None = None
    worst_channel: int | None = None
    worst_channel_sqnr_db: float | None = None
    samples: int = 0
    values: int = 0
    seen_through: str | None = None
    # activations: 'outlier channels: k of n (axis a), range x..y (Rx the median channel),
    # kept|clipped' (a few channels far wider than the rest: a transformer's hidden dimensions)
    outlier_channels: str = ""
    diagnosis: str = ""
    suggestion: str = ""
    note: str = ""


COLUMNS = [f.name for f in fields(TensorRow)]


def _rank_key(r: TensorRow) -> tuple[int, float]:
    if r.sqnr_db is None or math.isnan(r.sqnr_db):
        return (1, 0.0)
    return (0, r.sqnr_db)


@dataclass
class CompareReport:
    rows: list[TensorRow]  # worst first
    notes: list[str] = field(default_factory=list)
    samples: int = 0
    float_source: str = "float model"
    quant_source: str = "quantized model"
    # model outputs: ideal vs float, runtime vs float (with a verdict), runtime vs ideal
    outputs: list[dict[str, Any]] = field(default_factory=list)
    isa: str = ""

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.diagnosis] = out.get(r.diagnosis, 0) + 1
        off = sum(str(o["verdict"]).startswith("off") for o in self.outputs)
        if off:
            out["runtime off (outputs)"] = off
        return out

    def row(self, name: str) -> TensorRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def table_rows(self) -> list[list[Any]]:
        return [[getattr(r, c) for c in COLUMNS] for r in self.rows]

    def to_dict(self) -> dict[str, Any]:
        return {
            "float_model": self.float_source,
            "quant_model": self.quant_source,
            "samples": self.samples,
            "diagnoses": self.counts(),
            "rows": [asdict(r) for r in self.rows],
            "outputs": self.outputs,
            "isa": self.isa,
            "notes": self.notes,
        }


def diagnose(r: TensorRow) -> tuple[str, str]:
    """(diagnosis, suggested fix) from the own quantizer's error split (see the module doc)."""
    own = r.own_sqnr_db if r.own_sqnr_db is not None else math.inf
    frac = r.clipped_fraction or 0.0
    share = r.clip_share or 0.0
    bits = r.bits
    if own >= OK_SQNR_DB:
        if r.sqnr_db is not None and r.sqnr_db < OK_SQNR_DB:
            src = (
                f" (input SQNR {r.input_sqnr_db:.1f} dB)"
                if r.input_sqnr_db is not None and math.isfinite(r.input_sqnr_db)
                else ""
            )
            return "ok", f"own quantizer fine; the error arrives from upstream{src}"
        if share > 0.5 and frac > CLIP_FRACTION:
            return "ok", (
                f"fine; most of its small error is clipping ({frac:.3%} of the values, up to "
                f"{r.overshoot:.0f} steps beyond the grid)"
            )
        return "ok", ""
    if r.kind == "bias":
        return (
            "clipping" if share > 0.5 and frac > CLIP_FRACTION else "rounding",
            "the bias grid is s_input x s_weight: more activation or weight bits",
        )
    if r.kind != "activation":
        fix = "more weight bits"
        if r.axis is None:
            fix += " or per_channel scales"
        if share > 0.5 and frac > CLIP_FRACTION:
            return "clipping", f"weights outside their grid: recalibrate the scale ({fix})"
        if r.worst_channel is not None:
            fix += f"; worst channel {r.worst_channel} at {r.worst_channel_sqnr_db:.1f} dB"
        return "rounding", fix
    if share > 0.5 and frac > CLIP_FRACTION:
        fix = "wider range: minmax or percentile 99.999"
        if frac < 1e-3 and (r.overshoot or 0.0) > 0.1 * qmath.grid(bits, False).levels:
            fix += "; the outliers are few and huge: split the tensor or keep it float"
        else:
            fix += ", or split the tensor / keep float if the outliers are few and huge"
        return "clipping", fix
    small = (r.zeroed_fraction or 0.0) >= ZEROED_MANY
    fix = {4: "more bits (INT8, or INT16) or mse range", 8: "more bits (INT16) or mse range"}.get(
        bits, "keep float or split the tensor"
    )
    if small:
        fix += (
            f"; {r.zeroed_fraction:.0%} of the values round to zero (non-uniform distribution): "
            "if small values matter, split the tensor or keep it float"
        )
    else:
        fix += "; if small values matter (non-uniform distribution), consider splitting or keeping float"
    return "rounding", fix
