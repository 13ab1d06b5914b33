"""The search's report: trials.csv, trials.json and search.html (report.py's one template: a
verdict, the Pareto front with each trial's CI, the bits per layer of the best trial, every trial).

A trial is evaluated (its drop measured on the whole evaluation set), pruned (stopped early: its
running drop was confidently over the budget) or not evaluated at all (it could not beat the best
feasible cost; optuna records it COMPLETE so the sampler learns from its cost): the report names
these three apart, and "within budget" is a question only for an evaluated trial."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from amq import report
from amq.report import fmt, with_unit
from amq.search import space as S
from amq.search.study import TrialRecord, best_of, pareto_front


def _csv_columns(objective: str, metric: str) -> list[str]:
    return [
        "trial",
        "state",
        f"{objective} / INT8",
        "drop",
        "drop CI low",
        "drop CI high",
        metric,
        "feasible",
        "bits",
        "note",
    ]


def status(r: TrialRecord) -> str:
    """evaluated | pruned | not evaluated | failed | running (optuna's state, told apart)."""
    if r.state == "COMPLETE":
        return "evaluated" if r.drop is not None else "not evaluated"
    return {"PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running"}.get(r.state, r.state)


def _drop_text(r: TrialRecord, unit: str) -> str:
    ci = f" (95% CI {fmt(r.drop_ci[0])} to {fmt(r.drop_ci[1])})" if r.drop_ci else ""
    return f"{fmt(r.drop)}{' ' + unit if unit else ''}{ci}"


def _cost_text(cost: float, objective: str) -> str:
    change = f"{1 - cost:.0%} less" if cost <= 1 else f"{cost - 1:.0%} more"
    return f"{cost:.3f}x the {objective} of all-INT8 ({change})"


def verdict(records: list[TrialRecord], budget: float, metric: str, objective: str) -> str:
    """One paragraph: the best feasible trial against the budget, or that none met it (and the
    closest), then what became of the trials."""
    unit = report.metric_unit(metric)
    best, closest = best_of(records)
    limit = f"{fmt(budget)}{' ' + unit if unit else ''}"
    if best is not None:
        head = (
            f"Trial {best.number} is the cheapest within the budget: {metric} drop "
            f"{_drop_text(best, unit)} against a budget of {limit}, at "
            f"{_cost_text(best.cost, objective)}."
        )
    elif closest is not None:
        head = (
            f"No trial met the budget (a {metric} drop of at most {limit}). The closest is trial "
            f"{closest.number} ({status(closest)}): drop {_drop_text(closest, unit)} at "
            f"{_cost_text(closest.cost, objective)}."
        )
    else:
        head = f"No trial was evaluated, so none is known to meet the budget of {limit}."
    n = {s: sum(status(r) == s for r in records) for s in ("evaluated", "pruned", "not evaluated")}
    tail = (
        f" Of {len(records)} trials, {n['evaluated']} were evaluated, {n['pruned']} pruned early "
        f"(running drop confidently over the budget) and {n['not evaluated']} not evaluated "
        "(they could not beat the best cost found)."
    )
    return head + tail


def _pareto_section(records: list[TrialRecord], budget: float, metric: str, objective: str) -> str:
    unit = report.metric_unit(metric)
    front = {r.number for r in pareto_front(records)}
    points = [
        report.Point(
            r.cost,
            r.drop,
            r.drop_ci,
            front=r.number in front,
            tooltip=f"trial {r.number}: drop {_drop_text(r, unit)}, {r.cost:.3f}x",
        )
        for r in records
        if status(r) == "evaluated" and r.cost is not None
    ]
    chart = report.svg_scatter(
        points,
        f"{objective} (x all-INT8)",
        with_unit(f"{metric} drop", unit),
        budget,
        "budget",
    )
    return report.section(
        f"Evaluated trials: {metric} drop against {objective}",
        report.legend([("Pareto front", report.RED), ("other evaluated trials", "#777")]),
        chart,
        report.small(
            "Whiskers: the drop's 95% bootstrap CI. Dashed: the budget. Pruned and not evaluated "
            "trials have no measured drop and are not drawn."
        ),
    )


def _bits_section(pick: TrialRecord, is_best: bool, sp: S.Space) -> str:
    """The bits of each layer of ``pick``: weight bits for a layer with weights, activation bits
    for one without (Add, pooling, ...), float drawn as 32."""
    a = S.assign(sp, pick.params)
    kinds = {
        "w": ("weight bits (layer with weights)", report.BLUE),
        "a": ("activation bits (layer without weights)", report.ORANGE),
        "f": ("float (drawn as 32)", report.GREY),
    }
    bars = []
    for n in sp.layers:
        ch = a[n]
        k = "f" if ch.float else ("w" if ch.weight_bits else "a")
        value = 32 if ch.float else (ch.weight_bits or ch.act_bits)
        bars.append(report.Bar(n, value, color=kinds[k][1], text=ch.label()))
    why = "the best" if is_best else "the closest; the budget was not met"
    return report.section(
        f"Bits per layer of trial {pick.number} ({why})",
        report.legend(list(kinds.values())),
        report.svg_bars(bars, "bits (weights where the layer has them, else activations)", "layer"),
        report.small("After each bar: the layer's choice (W: weight bits, A: activation bits)."),
    )


def _table_section(records: list[TrialRecord], metric: str, objective: str) -> str:
    unit = report.metric_unit(metric)
    cols = [
        "trial",
        "status",
        f"{objective} (x all-INT8)",
        with_unit(f"{metric} drop", unit),
        "drop 95% CI",
        with_unit(metric, "%" if unit == "points" else unit),
        "within budget",
        "layers per choice",
        "note",
    ]
    rows = []
    marks = []
    for r in records:
        st = status(r)
        rows.append(
            [
                r.number,
                st,
                r.cost,
                r.drop,
                f"{fmt(r.drop_ci[0])} to {fmt(r.drop_ci[1])}" if r.drop_ci else "-",
                r.value,
                ("yes" if r.feasible else "no") if st == "evaluated" else "-",
                ", ".join(f"{v} {k}" for k, v in r.bits.items()),
                r.reason,
            ]
        )
        marks.append(("good" if r.feasible else "bad") if st == "evaluated" else "")
    table = report.html_table(cols, rows, text_columns=(1, 7, 8), marks=marks, mark_column=6)
    return report.section("Every trial", table)


def _csv_rows(records: list[TrialRecord]) -> list[tuple[Any, ...]]:
    """trials.csv: optuna's state as is; "feasible" is empty for a trial never evaluated."""
    return [
        (
            r.number,
            r.state,
            r.cost,
            r.drop,
            r.drop_ci[0] if r.drop_ci else None,
            r.drop_ci[1] if r.drop_ci else None,
            r.value,
            r.feasible if status(r) == "evaluated" else None,
            " ".join(f"{k}:{v}" for k, v in r.bits.items()),
            r.reason,
        )
        for r in records
    ]


def write_search_report(
    out: Path,
    records: list[TrialRecord],
    budget: float,
    metric: str,
    float_value: float | None,
    objective: str,
    sp: S.Space,
) -> list[Path]:
    """search.html, trials.csv and trials.json in ``out``."""
    best, closest = best_of(records)
    pick = best or closest
    blocks = [_pareto_section(records, budget, metric, objective)]
    if pick is not None:
        blocks.append(_bits_section(pick, best is not None, sp))
    blocks.append(_table_section(records, metric, objective))
    sub = (
        f"budget: {metric} drop at most {fmt(budget)} (float {metric} {fmt(float_value)}); "
        f"objective: the lowest {objective} as a ratio to all-INT8."
    )
    page = report.html_page("amq search", verdict(records, budget, metric, objective), blocks, sub)
    cols = _csv_columns(objective, metric)
    summary = {
        "budget": budget,
        "metric": metric,
        "float_value": float_value,
        "trials": [asdict(r) for r in records],
        "pareto": [r.number for r in pareto_front(records)],
    }
    return [
        report.atomic_write(out / "search.html", page),
        report.atomic_write(out / "trials.csv", report.to_csv(cols, _csv_rows(records))),
        report.atomic_write(out / "trials.json", report.to_json(summary)),
    ]
