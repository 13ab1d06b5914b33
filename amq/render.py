"""Terminal drawing: tables and lines for each result type, fit to the terminal (DESIGN.md §2)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import click

from amq.analysis.bitops import layer_bits
from amq.report import fmt, human_bytes


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], file=None) -> None:
    """Print a table to the terminal (rich), plain when not a TTY."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, title_justify="left", show_lines=False)
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*[fmt(v) for v in r])
    Console(file=file or sys.stdout, width=max(100, min(160, _width()))).print(t)


def _width() -> int:
    try:
        return os.get_terminal_size().columns
    except OSError:
        return 120


def echo(text: str = "") -> None:
    """One line of a command's terminal output (stdout)."""
    click.echo(text)


def _ci(ci: Sequence[Any] | None) -> str:
    return "" if ci is None else f"[{fmt(ci[0])}, {fmt(ci[1])}]"


def pct(fraction: float | None) -> str:
    """An agreement (a fraction in the API and JSON) as amq prints it everywhere: a percentage."""
    return "-" if fraction is None else f"{100 * fraction:.2f}%"


# ---------------------------------------------------------------------------------------------
# quantize


def render_quantize(result: Any) -> None:
    """amq quantize: the layers, what was left float, the fidelity and the one-line summary."""
    s, plan = result.summary, result.plan
    rows = []
    for lp in plan.layers.values():
        a, w = layer_bits(plan, lp)
        wtxt = f"int{w}" if lp.quantized and lp.weight else ("-" if lp.quantized else "float")
        atxt = f"int{a}" if lp.quantized else "float"
        rows.append((lp.name, lp.op_type, wtxt, atxt, lp.flops, lp.reason or ""))
    table("Layers", ["layer", "op", "weights", "activations", "FLOPs", "note"], rows)
    if s.float_ops or s.float_tensors:
        frows = [*s.float_ops.items(), *s.float_tensors.items()]
        table("Left float", ["node / tensor", "why"], frows)
    _fidelity_table(s)
    _quantize_lines(result)


def _fidelity_table(s: Any) -> None:
    fid_rows = []
    for k, v in s.fidelity.items():
        r = s.fidelity_runtime.get(k, {})
        fid_rows.append(
            (
                k,
                v["sqnr_db"],
                r.get("sqnr_db"),
                v["cosine"],
                v["max_abs_diff"],
                pct(v["top1_agreement"]),
                pct(r.get("top1_agreement")),
            )
        )
    table(
        f"Float vs quantized outputs ({s.samples} calibration samples): ideal = Q/DQ math, "
        f"runtime = this CPU's onnxruntime kernels ({s.isa})",
        ["output", "SQNR ideal", "SQNR rt", "cosine", "max |diff|", "top-1 agr.", "top-1 rt"],
        fid_rows,
    )


def _quantize_lines(result: Any) -> None:
    s = result.summary
    bo = s.bitops
    echo(
        f"layers quantized: {s.layers_quantized}, float: {s.layers_float}; "
        f"size {human_bytes(s.size_float)} -> {human_bytes(s.size_quant)} "
        f"({s.size_quant / max(s.size_float, 1):.1%}); bitops {bo.ratio_to_int8:.3f}x all-INT8 "
        f"(FLOPs = 2 x MACs: {bo.flops:,}); opset {s.opset}; "
        f"calibration: {s.calibration_samples} samples{' (cached statistics)' if s.cache_hit else ''}"
    )
    kern = ", ".join(f"{v} {k}" for k, v in s.integer_kernels.items()) or "none"
    flt = ", ".join(f"{v} {k}" for k, v in s.float_compute.items()) or "none"
    echo(f"onnxruntime integer kernels: {kern}; float compute left: {flt}")
    if s.guarded:
        echo(
            f"overflow guard (int16 pair sums on x86 without VNNI): {len(s.guarded)} layer(s) "
            "with pair-safe weight scales: " + "; ".join(f"{k}: {v}" for k, v in s.guarded.items())
        )
    for n in s.notes:
        echo(f"note: {n}")
    echo(f"wrote {result.model_path}, {result.config_path}, {result.qparams_path}")


# ---------------------------------------------------------------------------------------------
# eval


def render_eval(res: Any, model: Any) -> None:
    """amq eval: the value with its CI, against the reference when given, and the speed."""
    row = [res.metric, res.output, res.samples, res.value, _ci(res.value_ci)]
    cols = ["metric", "output", "samples", "value", "95% CI"]
    if res.reference_value is not None:
        cols += ["float", "drop", "drop 95% CI"]
        row += [res.reference_value, res.drop, _ci(res.drop_ci or (None, None))]
    table(f"Evaluation of {model}", cols, [row])
    if res.speed is not None:
        lo, hi = res.speed_range or (res.speed, res.speed)
        echo(
            f"inference on this CPU ({res.isa}): {res.seconds:.4f} s against "
            f"{res.reference_seconds:.4f} s for the reference, {res.speed:.2f}x its speed "
            f"(fastest of {res.timed_repeats} interleaved passes each over {res.timed_samples} "
            f"samples after a warm-up; per-pass ratios' interquartile range {lo:.2f}x-{hi:.2f}x)"
        )
    else:
        echo(f"onnxruntime on this CPU: {res.isa}")


# ---------------------------------------------------------------------------------------------
# bitops

BITOPS_COLUMNS = ["layer", "op", "FLOPs", "params", "weight bits", "act bits", "bitops", "share"]


def bitops_rows(rep: Any) -> list[tuple[Any, ...]]:
    """The rows of the bitops table (also its CSV and JSON): one per layer, share a fraction."""
    return [
        (
            r.name,
            r.op_type,
            r.flops,
            r.params,
            r.weight_bits,
            r.act_bits,
            r.bitops,
            r.bitops / rep.total if rep.total else 0.0,
        )
        for r in rep.layers
    ]


def render_bitops(rep: Any, model: Any) -> None:
    """amq bitops: per layer, and the totals against all-INT8."""
    rows = [(*r[:-1], f"{r[-1]:.1%}") for r in bitops_rows(rep)]
    table(f"bitops of {model} (FLOPs = 2 x MACs)", BITOPS_COLUMNS, rows)
    ratio = f"{rep.ratio_to_int8:.3f}x" if rep.int8_total else "-"
    echo(
        f"total: {rep.flops:,} FLOPs, {rep.total:,} bitops = {ratio} all-INT8 ({rep.int8_total:,})"
    )


# ---------------------------------------------------------------------------------------------
# check

CHECK_KINDS = [
    "unfolded BatchNorm",
    "Conv + activation",
    "MatMul + bias Add",
    "shared tensor",
    "float island",
    "float in onnxruntime",
    "overflow risk",
    "overflow measured",
]
DTYPE_COLUMNS = [
    "op type",
    "in:float",
    "in:int4",
    "in:int8",
    "in:int16",
    "in:int32",
    "out:float",
    "out:int4",
    "out:int8",
    "out:int16",
]


def render_check(rep: Any, model: Any) -> None:
    """amq check: the findings, the ops left float, the integer types per op type, the counts."""
    rows = [(f.kind, f.where, f.detail) for k in CHECK_KINDS for f in rep.by_kind(k)]
    table(f"Check of {model}", ["finding", "where", "detail"], rows or [("none", "-", "-")])
    if rep.unsupported:
        table("Ops amq leaves float", ["op type", "count"], list(rep.unsupported.items()))
    if rep.dtype_stats:
        cols = DTYPE_COLUMNS
        drows = [(op, *[d.get(c, 0) for c in cols[1:]]) for op, d in rep.dtype_stats.items()]
        table("Input/output types per op type", cols, drows)
    echo(", ".join(f"{k}: {len(rep.by_kind(k))}" for k in CHECK_KINDS))


# ---------------------------------------------------------------------------------------------
# sensitivity


def sensitivity_columns(rep: Any) -> list[str]:
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


def sensitivity_row(r: Any) -> tuple[Any, ...]:
    """One layer at one bit width: its row in the table and in the CSV."""
    wb = f"W{r.weight_bits}A{r.act_bits}" if r.weight_bits else f"A{r.act_bits}"
    return (
        r.layer,
        r.op_type,
        wb,
        r.value,
        r.drop,
        _ci(r.drop_ci),
        r.local_cosine,
        r.local_mse,
        r.local_sqnr_db,
        r.flops,
    )


def render_sensitivity(rep: Any, top: int) -> None:
    """amq sensitivity: per bit width, the ``top`` most sensitive layers."""
    what = "All but one quantized" if rep.mode == "leave_one_out" else "One layer quantized"
    for b in rep.bits:
        title = (
            f"{what} at W{b}A{max(b, 8)} ({rep.metric}, float {fmt(rep.float_value)}, "
            f"{rep.samples} samples)"
        )
        if b in rep.baselines:
            title += f"; all quantized: {fmt(rep.baselines[b]['value'])}"
        rows = [sensitivity_row(r) for r in rep.ranked(b)[:top]]
        table(title, sensitivity_columns(rep), rows)


# ---------------------------------------------------------------------------------------------
# compare

COMPARE_COLUMNS = [
    "tensor",
    "type",
    "scale",
    "SQNR dB",
    "own SQNR",
    "input SQNR",
    "cosine",
    "clipped",
    "overshoot",
    "diagnosis",
]


def _compare_row(r: Any) -> tuple[Any, ...]:
    scale = fmt(r.scale) if r.scale == r.scale_min else f"{fmt(r.scale_min)}..{fmt(r.scale)}"
    kind = {"weight": " (W)", "bias": " (B)"}.get(r.kind, "")
    clipped = "-" if r.clipped_fraction is None else f"{r.clipped_fraction:.3%}"
    return (
        r.name,
        r.dtype + kind,
        scale,
        r.sqnr_db,
        r.own_sqnr_db,
        r.input_sqnr_db,
        r.cosine,
        clipped,
        r.overshoot,
        r.diagnosis,
    )


def render_compare(rep: Any, top: int) -> None:
    """amq compare: the worst ``top`` tensors, the model outputs, the suggested fixes, counts."""
    rows = [_compare_row(r) for r in rep.rows[:top]]
    table(
        f"{rep.quant_source} vs {rep.float_source}: worst {len(rows)} of {len(rep.rows)} "
        f"tensors ({rep.samples} samples)",
        COMPARE_COLUMNS,
        rows,
    )
    table(
        f"Model outputs (tensors above: Q/DQ math; runtime: this CPU's kernels, {rep.isa})",
        ["output", "compared", "SQNR dB", "cosine", "max |diff|", "verdict"],
        [
            (o["output"], o["compared"], o["sqnr_db"], o["cosine"], o["max_abs_diff"], o["verdict"])
            for o in rep.outputs
        ],
    )
    fixes = [(r.name, r.diagnosis, r.suggestion) for r in rep.rows[:top] if r.suggestion]
    if fixes:
        table("Suggested fixes", ["tensor", "diagnosis", "fix"], fixes)
    echo(", ".join(f"{k}: {v}" for k, v in sorted(rep.counts().items())))
    for n in rep.notes:
        echo(f"note: {n}")


# ---------------------------------------------------------------------------------------------
# search


def render_search(res: Any) -> None:
    """amq search: the Pareto front, the trial counts and the best trial."""
    o = res.outcome
    rows = [
        (
            r.number,
            r.cost,
            r.drop,
            _ci(r.drop_ci),
            r.value,
            " ".join(f"{k}:{v}" for k, v in r.bits.items()),
        )
        for r in o.pareto
    ]
    table(
        f"Pareto front ({res.cost_name} / all-INT8 vs {res.metric} drop; budget {res.budget:.4g})",
        ["trial", f"{res.cost_name} ratio", "drop", "drop 95% CI", res.metric, "bits"],
        rows,
    )
    pruned = sum(r.state == "PRUNED" for r in o.records)
    stop = " (interrupted)" if o.interrupted else ""
    echo(f"trials: {len(o.records)}, pruned: {pruned}{stop}; outputs in {res.out_dir}")
    if o.best:
        b = o.best
        lo, hi = (fmt(b.drop_ci[0]), fmt(b.drop_ci[1])) if b.drop_ci else ("-", "-")
        echo(
            f"best: trial {b.number}: {b.cost:.4f}x all-INT8 {res.cost_name}, "
            f"{res.metric} drop {b.drop:.4g} (95% CI {lo}..{hi})"
        )


# ---------------------------------------------------------------------------------------------
# qat

QAT_FILES = (
    ("config", "resolved config"),
    ("qparams", "scales and zero points per tensor"),
    ("float_model", "prepared float model (BN folded)"),
    ("qdq_model", "PTQ QDQ model"),
    ("torch_model", "torch model with fake quantization (state_dict)"),
    ("handoff", "BN folds, names, parity"),
    ("readme", "how to train and export"),
)


def render_qat(res: Any) -> None:
    """amq qat: the bundle's files, the notes, and the parity with the QDQ model."""
    rows = [(str(res.files[k]), what) for k, what in QAT_FILES if k in res.files]
    table(f"QAT handoff in {res.out_dir}", ["file", "content"], rows)
    for n in res.notes:
        echo(f"note: {n}")
    render_parity(res.parity)


def render_parity(p: dict[str, Any]) -> None:
    """The torch model against the QDQ model: on the Q/DQ math and on this CPU's kernels."""
    rt = p.get("runtime", {})
    for what, fig in (
        ("the QDQ model's Q/DQ math", p),
        (f"this CPU's kernels ({rt.get('isa')})", rt),
    ):
        agr = fig.get("top1_agreement")
        echo(
            f"parity (torch vs {what}, {p.get('samples')} samples): "
            f"max |diff| {fmt(fig.get('max_abs_diff'))}, cosine {fmt(fig.get('cosine'))}"
            + (f", top-1 agreement {pct(agr)}" if agr is not None else "")
        )
