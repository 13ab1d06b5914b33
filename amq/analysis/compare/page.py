"""The compare report's HTML page, in report.py's one template: a verdict (where the error starts
and whether it is clipping or rounding), the SQNR chart of the worst tensors, the model outputs,
and every tensor in two tables of human-named columns that fit the page (every field is in the
CSV and JSON)."""

from __future__ import annotations

import math

from amq import report
from amq.analysis.compare.diagnose import (
    CLIP_FRACTION,
    COLUMNS,
    OK_SQNR_DB,
    CompareReport,
    TensorRow,
)
from amq.report import fmt

COLORS = {"clipping": "#d62728", "rounding": "#ff7f0e", "ok": "#2ca02c", "n/a": "#999999"}
MARKS = {"clipping": "bad", "rounding": "warn", "ok": "good"}


def _db(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} dB"


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def _why(r: TensorRow) -> str:
    if r.diagnosis == "clipping":
        return (
            f"clipping: {r.clipped_fraction:.3%} of its values fall outside the grid, up to "
            f"{fmt(r.overshoot)} steps beyond its end"
        )
    zeroed = (
        f"; {r.zeroed_fraction:.0%} of its non-zero values round to zero"
        if r.zeroed_fraction
        else ""
    )
    return f"rounding: the range fits but the step ({fmt(r.scale)}) is too coarse{zeroed}"


def _outputs_sentence(rep: CompareReport) -> str:
    off = [o for o in rep.outputs if str(o["verdict"]).startswith("off")]
    if off:
        return f" On this CPU's integer kernels output {off[0]['output']} is {off[0]['verdict']}."
    ideal = [o for o in rep.outputs if o["compared"] == "ideal vs float" and _finite(o["sqnr_db"])]
    if ideal:
        worst = min(ideal, key=lambda o: o["sqnr_db"])
        return f" The model output {worst['output']} keeps {_db(worst['sqnr_db'])} against float."
    return ""


def verdict(rep: CompareReport) -> str:
    """Where the error starts (the worst quantizer whose input still arrives clean), whether it
    is clipping or rounding and the fix; how many tensors are below the bar; the outputs."""
    rows = [r for r in rep.rows if r.diagnosis != "n/a"]
    if not rows:
        return "No quantized tensor could be compared (see the notes)."
    bad = [r for r in rows if r.diagnosis in ("clipping", "rounding")]
    if not bad:
        worst = rows[0]
        text = (
            f"All {len(rows)} compared tensors are quantized well: every tensor's own quantizer "
            f"keeps at least {OK_SQNR_DB:g} dB. The accumulated error is largest at {worst.name} "
            f"({_db(worst.sqnr_db)})."
        )
        return text + _outputs_sentence(rep)
    clean = [r for r in bad if not _finite(r.input_sqnr_db) or r.input_sqnr_db >= OK_SQNR_DB]
    start = min(clean or bad, key=lambda r: r.own_sqnr_db if _finite(r.own_sqnr_db) else 1e9)
    n_clip = sum(r.diagnosis == "clipping" for r in bad)
    text = (
        f"The error starts at {start.name} ({start.kind}, {start.dtype}): its own quantizer keeps "
        f"{_db(start.own_sqnr_db)} and the loss is {_why(start)}. Suggested fix: "
        f"{start.suggestion}. {len(bad)} of {len(rows)} tensors have a quantizer below "
        f"{OK_SQNR_DB:g} dB ({n_clip} clipping, {len(bad) - n_clip} rounding)."
    )
    return text + _outputs_sentence(rep)


def _chart(rows: list[TensorRow]) -> str:
    finite = [v for r in rows for v in (r.sqnr_db, r.own_sqnr_db) if _finite(v)]
    cap = max([60.0, *finite])  # a perfect tensor (infinite SQNR) is drawn full length

    def capped(v: float | None) -> float | None:
        return None if v is None or math.isnan(v) else min(v, cap)

    bars = [
        report.Bar(
            r.name,
            capped(r.sqnr_db),
            color=COLORS.get(r.diagnosis, report.GREY),
            inner=capped(r.own_sqnr_db),
            text=f"{fmt(r.sqnr_db)} {r.diagnosis}",
            tooltip=f"{r.name}: {_db(r.sqnr_db)}; own quantizer {_db(r.own_sqnr_db)} ({r.diagnosis})",
        )
        for r in rows
    ]
    return report.svg_bars(bars, "SQNR (dB)", "tensor")


MAIN_COLUMNS = [
    "tensor",
    "type",
    "scale",
    "SQNR (dB)",
    "own SQNR (dB)",
    "input SQNR (dB)",
    "cosine",
    "clipped",
    "overshoot (steps)",
    "diagnosis",
]

VALUE_COLUMNS = [
    "tensor",
    "float range",
    "quantized range",
    "grid range",
    "MSE",
    "max |diff|",
    "KL (nats)",
    "rounded to zero",
    "worst channel",
]


def _range(lo: float | None, hi: float | None) -> str:
    return "-" if lo is None or hi is None else f"{fmt(lo)} to {fmt(hi)}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.3%}"


def _main_row(r: TensorRow) -> list[object]:
    scale = fmt(r.scale) if r.scale == r.scale_min else f"{fmt(r.scale_min)} to {fmt(r.scale)}"
    kind = "" if r.kind == "activation" else f" {r.kind}"
    grid = r.dtype + kind + ("" if r.axis is None else f", per channel (axis {r.axis})")
    return [
        r.name,
        grid,
        scale,
        r.sqnr_db,
        r.own_sqnr_db,
        r.input_sqnr_db,
        r.cosine,
        _pct(r.clipped_fraction),
        r.overshoot,
        r.diagnosis,
    ]


def _value_row(r: TensorRow) -> list[object]:
    worst = (
        "-" if r.worst_channel is None else f"{r.worst_channel} ({_db(r.worst_channel_sqnr_db)})"
    )
    return [
        r.name,
        _range(r.float_min, r.float_max),
        _range(r.quant_min, r.quant_max),
        _range(r.grid_min, r.grid_max),
        r.mse,
        r.max_abs_diff,
        r.kl,
        _pct(r.zeroed_fraction),
        worst,
    ]


def to_html(rep: CompareReport, top: int = 20) -> str:
    """The page: the verdict, a chart of the worst ``top`` tensors, the model outputs and tables
    of every tensor, worst first."""
    counts = ", ".join(f"{v} {k}" for k, v in sorted(rep.counts().items()))
    shown = rep.rows[:top]
    legend = [(k, c) for k, c in COLORS.items() if k != "n/a"] + [("own quantizer", "#555")]
    blocks = [
        report.section(
            f"Worst {len(shown)} tensors by SQNR",
            report.legend(legend),
            _chart(shown),
            report.small(
                "Thick bar: the quantized model's tensor against the float model's (the error "
                "accumulated so far). Thin bar: the tensor's own quantizer applied to the float "
                f"values. Diagnosis: clipping when values outside the grid make most of the own "
                f"error and more than {CLIP_FRACTION:g} of the values are clipped; rounding when "
                f"the range fits but the step is too coarse; ok when the own SQNR is at least "
                f"{OK_SQNR_DB:g} dB. Overshoot: the largest distance beyond the grid end, in steps."
            ),
        )
    ]
    if rep.outputs:
        cols = ["output", "compared", "SQNR (dB)", "cosine", "max |diff|", "verdict"]
        keys = ["output", "compared", "sqnr_db", "cosine", "max_abs_diff", "verdict"]
        rows = [[o[k] for k in keys] for o in rep.outputs]
        blocks.append(
            report.section(
                f"Model outputs (ideal: the Q/DQ math; runtime: this CPU's kernels, {rep.isa})",
                report.html_table(cols, rows, text_columns=(0, 1, 5)),
            )
        )
    marks = [MARKS.get(r.diagnosis, "") for r in rep.rows]
    main = [_main_row(r) for r in rep.rows]
    blocks.append(
        report.section(
            "Every tensor, worst first",
            report.html_table(MAIN_COLUMNS, main, (0, 1, 9), marks, mark_column=9),
        )
    )
    fixes = [r for r in rep.rows if r.suggestion or r.note]
    if fixes:
        rows = [[r.name, r.diagnosis, r.suggestion or r.note] for r in fixes]
        table = report.html_table(
            ["tensor", "diagnosis", "suggested fix or note"],
            rows,
            (0, 1, 2),
            [MARKS.get(r.diagnosis, "") for r in fixes],
            mark_column=1,
        )
        blocks.append(report.section("Suggested fixes", table))
    values = [_value_row(r) for r in rep.rows]
    blocks.append(
        report.section(
            "Values and errors of every tensor",
            report.html_table(VALUE_COLUMNS, values, (0,)),
            report.small(
                "Every field (means, variances, mean |diff| too) is in the CSV and JSON output."
            ),
        )
    )
    if rep.notes:
        blocks.append(report.section("Notes", report.bullet_list(rep.notes)))
    sub = (
        f"float: {rep.float_source}; quantized: {rep.quant_source}; {rep.samples} samples; "
        f"{len(rep.rows)} tensors ({counts})"
    )
    return report.html_page("amq compare", verdict(rep), blocks, sub)


def files(rep: CompareReport, top: int = 20) -> dict[str, str]:
    """What `amq compare -o DIR` writes, by file name: every row and column worst first (CSV),
    the report (JSON) and the page."""
    return {
        "compare.csv": report.to_csv(COLUMNS, rep.table_rows()),
        "compare.json": report.to_json(rep.to_dict()),
        "compare.html": to_html(rep, top),
    }
