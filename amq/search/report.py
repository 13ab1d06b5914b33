"""The search's report: trials.csv, trials.json and search.html (Pareto front, bits per layer, every
trial)."""

from __future__ import annotations

from pathlib import Path

from amq import report
from amq.search import space as S


def write_search_report(
    out, records, best, closest, budget, metric, float_value, objective, sp, sens
) -> list[Path]:
    from dataclasses import asdict

    cols = [
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
    rows = [
        (
            r.number,
            r.state,
            r.cost,
            r.drop,
            r.drop_ci[0] if r.drop_ci else None,
            r.drop_ci[1] if r.drop_ci else None,
            r.value,
            r.feasible,
            " ".join(f"{k}:{v}" for k, v in r.bits.items()),
            r.reason,
        )
        for r in records
    ]
    from amq.search.study import pareto_front

    front = pareto_front(records)
    pts = [
        (r.cost, r.drop)
        for r in records
        if r.state == "COMPLETE" and r.cost is not None and r.drop is not None
    ]
    sections = [
        (
            f"Pareto front: {objective} (ratio to all-INT8) vs {metric} drop; dashed: the budget",
            report.svg_scatter(
                pts,
                [(r.cost, r.drop) for r in front],
                f"{objective} / all-INT8",
                f"{metric} drop",
                budget,
            ),
        )
    ]
    pick = best or closest
    if pick is not None:
        a = S.assign(sp, pick.params)
        order = sp.layers
        val = {"float": 32}
        sections.append(
            (
                f"Bits per layer of trial {pick.number} ({'best' if best else 'closest; budget not met'})",
                report.svg_bars(
                    order,
                    [
                        val.get(a[n].label(), a[n].weight_bits or a[n].act_bits)
                        if not a[n].float
                        else 32
                        for n in order
                    ],
                    unit="weight bits (32 = float)",
                ),
            )
        )
    intro = (
        f"budget: {metric} drop <= {budget:.4g} (float value {report.fmt(float_value)}); trials {len(records)}, "
        f"pruned {sum(r.state == 'PRUNED' for r in records)}; "
        + (
            f"best: trial {best.number}, {best.cost:.4f}x all-INT8, drop {best.drop:.4g}"
            if best
            else "no trial met the budget"
        )
    )
    files = [
        report.atomic_write(
            out / "search.html", report.html_page("amq search", intro, sections, cols, rows)
        ),
        report.atomic_write(out / "trials.csv", report.to_csv(cols, rows)),
        report.atomic_write(
            out / "trials.json",
            report.to_json(
                {
                    "budget": budget,
                    "metric": metric,
                    "float_value": float_value,
                    "trials": [asdict(r) for r in records],
                    "pareto": [r.number for r in front],
                }
            ),
        ),
    ]
    return files
