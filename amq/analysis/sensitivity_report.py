"""The sensitivity report's HTML page (sensitivity.py measures; this file only draws, in
report.py's one template): a verdict in plain words, per bit width a chart of the drop per layer
with its bootstrap CI, and every row."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from amq.report import (
    BLUE,
    GREY,
    RED,
    Bar,
    bullet_list,
    fmt,
    fmt_ci,
    html_page,
    html_table,
    legend,
    metric_unit,
    section,
    svg_bars,
    to_csv,
    with_unit,
)

if TYPE_CHECKING:
    from amq.analysis.sensitivity import LayerSensitivity, SensitivityReport


def _costs(r: LayerSensitivity) -> bool:
    """The layer alone costs the metric beyond noise: its drop's 95% CI lies above zero."""
    return r.drop is not None and r.drop_ci is not None and r.drop_ci[0] > 0


def _amount(r: LayerSensitivity, unit: str) -> str:
    ci = f" (95% CI {fmt(r.drop_ci[0])} to {fmt(r.drop_ci[1])})" if r.drop_ci else ""
    return f"{fmt(r.drop)}{' ' + unit if unit else ''}{ci}"


def _single_verdict(rep: SensitivityReport, b: int, unit: str, advice: bool) -> str:
    rows = rep.ranked(b)
    at = f"At W{b}A{max(b, 8)},"
    if not rows:
        return f"{at} no layer was measured."
    top = rows[0]
    if top.drop is None:
        return (
            f"{at} the layer whose quantization lowers {rep.metric} the most is {top.layer} "
            f"({top.op_type}): {fmt(top.value)}{' ' + unit if unit else ''}."
        )
    costly = [r for r in rows if _costs(r)]
    if not costly:
        return (
            f"{at} no layer alone costs {rep.metric} beyond noise: the largest drop, "
            f"{_amount(top, unit)} at {top.layer}, has a CI reaching zero."
        )
    return (
        f"{at} {len(costly)} of {len(rows)} layers each cost {rep.metric} on their own (95% CI "
        f"above zero); the most sensitive is {top.layer} ({top.op_type}), dropping "
        f"{_amount(top, unit)}."
        + (
            f" Keeping {'it' if len(costly) == 1 else 'those layers'} at INT16 (or float) is the "
            "first thing to try."
            if advice
            else ""
        )
    )


def _leave_one_out_verdict(rep: SensitivityReport, b: int, unit: str) -> str:
    rows = rep.ranked(b)
    at = f"At W{b}A{max(b, 8)}"
    base = rep.baselines.get(b, {}).get("drop")
    if not rows or rows[0].drop is None or base is None:
        return f"{at}, the drop with every layer quantized is not defined for {rep.metric}."
    top = rows[0]
    return (
        f"{at}, with every layer quantized {rep.metric} drops {fmt(base)}"
        f"{' ' + unit if unit else ''}; keeping {top.layer} ({top.op_type}) float recovers the "
        f"most: the drop falls to {_amount(top, unit)}."
    )


def verdict(rep: SensitivityReport) -> str:
    """One paragraph in plain words: per bit width, how many layers cost the metric and which
    one the most (single), or which layer kept float recovers the most (leave-one-out)."""
    unit = metric_unit(rep.metric)
    bits = sorted(rep.bits, reverse=True)
    if rep.mode == "leave_one_out":
        parts = [_leave_one_out_verdict(rep, b, unit) for b in bits]
    else:  # the advice once, after the highest bit width
        parts = [_single_verdict(rep, b, unit, advice=k == 0) for k, b in enumerate(bits)]
    fl = f" (float {fmt(rep.float_value)})" if rep.float_value is not None else ""
    return " ".join(parts) + f" Measured on {rep.samples} samples{fl}."


def _chart(rep: SensitivityReport, b: int, top: int) -> str:
    rows = rep.ranked(b)[:top]
    if not rows:
        return ""
    unit = metric_unit(rep.metric)
    what = (
        "All but this layer quantized"
        if rep.mode == "leave_one_out"
        else "Only this layer quantized"
    )
    head = f"{what}, W{b}A{max(b, 8)}: the {len(rows)} most sensitive layers"
    if rows[0].drop is None:
        bars = [Bar(r.layer, r.value, color=GREY) for r in rows]
        return section(head, svg_bars(bars, with_unit(rep.metric, unit), "layer"))
    loo = rep.mode == "leave_one_out"  # every bar is the drop of a mostly quantized model
    bars = [
        Bar(
            r.layer,
            r.drop,
            r.drop_ci,
            color=BLUE if loo else (RED if _costs(r) else GREY),
            tooltip=f"{r.layer} ({r.op_type}): drop {_amount(r, unit)}",
        )
        for r in rows
    ]
    keys = legend([("drop's 95% CI above zero", RED), ("within noise", GREY)])
    axis = with_unit(f"{rep.metric} drop", unit)
    return section(head, "" if loo else keys, svg_bars(bars, axis, "layer"))


def columns(rep: SensitivityReport) -> list[str]:
    """The CSV's and the terminal table's columns (the page adds units to the same ones)."""
    return [
        "layer",
        "op",
        "bits",
        rep.metric,
        "drop",
        "drop 95% CI",
        "local cosine",
        "local MSE",
        "local SQNR dB",
        "FLOPs",
    ]


def row(r: LayerSensitivity) -> list[Any]:
    """One layer at one bit width: its row in the CSV, the page and the terminal table."""
    wb = f"W{r.weight_bits}A{r.act_bits}" if r.weight_bits else f"A{r.act_bits}"
    if r.act_dynamic:
        wb = f"W{r.weight_bits}Adyn"
    return [
        r.layer,
        r.op_type,
        wb,
        r.value,
        r.drop,
        fmt_ci(r.drop_ci),
        r.local_cosine,
        r.local_mse,
        r.local_sqnr_db,
        r.flops,
    ]


def files(rep: SensitivityReport, top: int = 20) -> dict[str, str]:
    """What `amq sensitivity -o DIR` writes, by file name: the rows (CSV), the report (JSON, what
    `quantize --sensitivity` and `search` read) and the page."""
    rows = [row(r) for b in rep.bits for r in rep.ranked(b)]
    rows += [row(r) for r in rep.ranked(dynamic=True)]
    return {
        "sensitivity.csv": to_csv(columns(rep), rows),
        "sensitivity.json": rep.to_json(),
        "sensitivity.html": html_report(rep, top),
    }


def html_report(rep: SensitivityReport, top: int = 20) -> str:
    unit = metric_unit(rep.metric)
    value_unit = "%" if unit == "points" else unit
    cols = [
        "layer",
        "op",
        "bits",
        with_unit(rep.metric, value_unit),
        with_unit("drop", unit),
        "drop 95% CI",
        "local cosine",
        "local MSE",
        "local SQNR (dB)",
        "FLOPs",
    ]
    rows = [row(r) for b in rep.bits for r in rep.ranked(b)]
    rows += [row(r) for r in rep.ranked(dynamic=True)]
    blocks = [_chart(rep, b, top) for b in rep.bits]
    blocks.append(section("Every layer, most sensitive first", html_table(cols, rows)))
    if rep.warnings:
        blocks.append(section("Warnings", bullet_list(rep.warnings)))
    mode = "leave one out" if rep.mode == "leave_one_out" else "one layer at a time"
    sub = (
        f"metric {rep.metric} on output '{rep.output}', {rep.samples} samples, float value "
        f"{fmt(rep.float_value)}; {mode}. Local error: the layer's output against a float copy "
        "of the layer fed the same input."
    )
    return html_page(f"amq sensitivity: {mode}", verdict(rep), blocks, sub)
