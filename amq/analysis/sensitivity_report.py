"""The sensitivity report's HTML page (sensitivity.py measures; this file only draws)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from amq.report import fmt, html_page, svg_bars

if TYPE_CHECKING:
    from amq.analysis.sensitivity import SensitivityReport


def html_report(rep: SensitivityReport, top: int = 20) -> str:
    sections = []
    for b in rep.bits:
        rows = rep.ranked(b)[:top]
        if not rows:
            continue
        label = "drop" if rows[0].drop is not None else rep.metric
        vals = [r.loss for r in rows]
        sections.append(
            (
                f"{'Leave one out' if rep.mode == 'leave_one_out' else 'One layer quantized'} at W{b}A{max(b, 8)}: {label} of {rep.metric}",
                svg_bars([r.layer for r in rows], vals, unit=label),
            )
        )
    cols = [
        "layer",
        "op",
        "W bits",
        "A bits",
        rep.metric,
        "drop",
        "drop 95% CI",
        "local cosine",
        "local MSE",
        "local SQNR dB",
    ]
    body_rows = [
        [
            r.layer,
            r.op_type,
            r.weight_bits,
            r.act_bits,
            r.value,
            r.drop,
            None if r.drop_ci is None else f"[{r.drop_ci[0]:.4g}, {r.drop_ci[1]:.4g}]",
            r.local_cosine,
            r.local_mse,
            r.local_sqnr_db,
        ]
        for b in rep.bits
        for r in rep.ranked(b)
    ]
    intro = (
        f"metric {rep.metric} on output '{rep.output}' over {rep.samples} samples; float value "
        f"{fmt(rep.float_value)}"
    )
    return html_page(f"amq sensitivity ({rep.mode})", intro, sections, cols, body_rows)
