"""Terminal drawing: tables and lines for each result type, fit to the terminal (DESIGN.md §2).

Tables and lines fit the terminal's width (80 columns when the output is not a terminal): long
layer and tensor names are shortened from the left to a tail that is still unique among the
column's names ("…/layer2/conv/Conv"), text wraps between words only, and when even that does not
fit, a table's optional columns are left out (named below it; --json has them all)."""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import click

from amq.analysis import sensitivity_report
from amq.report import fmt, fmt_ci, human_bytes

ELLIPSIS = "…"
GAP = 2  # spaces between two columns
NAME_WIDTH = 24  # names get at least this much room before optional columns are left out
Cells = list[list[str]]  # a table's rows of formatted cells


def width() -> int:
    """The columns to draw in: $COLUMNS, else the terminal's when stdout is one, else 80."""
    env = os.environ.get("COLUMNS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        if sys.stdout.isatty():
            return os.get_terminal_size(sys.stdout.fileno()).columns
    except (OSError, ValueError):
        pass
    return 80


def echo(text: str = "", sep: str = "; ") -> None:
    """One line of a command's output, wrapped to the terminal: between ``sep``-separated
    clauses where it can (a clause stays whole), else between words; continuations indented."""
    click.echo("\n".join(wrap(text, width(), sep)))


def wrap(text: str, w: int, sep: str = "; ") -> list[str]:
    """``text`` in lines of at most ``w`` characters (a word longer than that stands alone)."""
    lines = [""]

    def put(piece: str) -> None:
        if not lines[-1]:
            lines[-1] = piece
        elif len(lines[-1]) + 1 + len(piece) <= w:
            lines[-1] += " " + piece
        else:
            lines.append("  " + piece)

    parts = text.split(sep)
    for i, part in enumerate(parts):
        clause = part + (sep.rstrip() if i < len(parts) - 1 else "")
        if len(lines[-1]) + 1 + len(clause) <= w or len(clause) + 2 <= w:
            put(clause)
        else:
            for word in clause.split(" "):
                put(word)
    return lines


def _tails(name: str) -> list[str]:
    """The name's proper tails that start at a path separator ('/x', or 'x' after a '.'),
    shortest first."""
    return [name[i:] for i in range(len(name) - 1, 0, -1) if name[i] == "/" or name[i - 1] == "."]


def shorten(names: Iterable[str], w: int) -> dict[str, str]:
    """Each name longer than ``w`` as '…' + a tail of it that no other name ends with: the
    longest such tail starting at a separator that fits in ``w``, else cut anywhere to fit, else
    the shortest unique tail (wider than ``w``; a name that ends another stays whole)."""
    distinct = set(names)
    long = [n for n in distinct if len(n) > w]
    if not long:
        return {n: n for n in distinct}
    ends = Counter(n[i:] for n in distinct for i in range(len(n)))  # each name once per suffix
    out = {n: n for n in distinct}
    room = max(w - len(ELLIPSIS), 1)
    for n in long:
        fits = [t for t in _tails(n) if ends[t] == 1 and len(t) <= room]
        k = next((k for k in range(1, len(n)) if ends[n[-k:]] == 1), len(n))
        if fits:
            out[n] = ELLIPSIS + fits[-1]
        elif k < len(n):
            out[n] = ELLIPSIS + n[-max(k, room) :]
    return out


def _words(cell: str) -> list[str]:
    return cell.split() or [""]


def table(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    names: Sequence[int] = (0,),
    optional: Sequence[str] = (),
) -> None:
    """Print a table fit to the terminal's width. ``names``: the columns holding layer or tensor
    names (each word shortened from the left when too long); ``optional``: the columns left out,
    in this order, while the rest does not fit without breaking words."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    w = width()
    named = {columns[j] for j in names}
    cols, full = list(columns), [[fmt(v) for v in r] for r in rows]
    dropped: list[str] = []
    while True:  # leave out optional columns while the rest does not fit
        at = [i for i, c in enumerate(cols) if c in named]
        cells = _shorten_names(cols, [list(r) for r in full], at, w)
        left = [c for c in optional if c in cols]
        if not left or _fits(cols, cells, full, at, w):
            break
        k = cols.index(left[0])
        cols, full = cols[:k] + cols[k + 1 :], [r[:k] + r[k + 1 :] for r in full]
        dropped.append(left[0])
    widths = _widths(cols, cells, w)
    echo(title)
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    for c, cw in zip(cols, widths, strict=True):
        t.add_column(c, width=cw, overflow="fold")
    for r in cells:
        t.add_row(*r)
    Console(file=sys.stdout, width=w, soft_wrap=False).print(t)
    if dropped:
        echo(f"(left out to fit {w} columns: {', '.join(dropped)}; --json has every column)")


def _natural(col: str, cells: Cells, i: int) -> int:
    return max([len(col), *(len(r[i]) for r in cells)])


def _minimum(col: str, cells: Cells, i: int) -> int:
    return max(len(x) for cell in [col, *(r[i] for r in cells)] for x in _words(cell))


def _comfort(col: str, cells: Cells, i: int) -> int:
    """A column's width with its short cells (a number, a CI) on one line and prose wrapped."""
    short = [len(r[i]) if len(r[i].split()) <= 2 else _minimum("", [r], i) for r in cells]
    return max([_minimum(col, [], i), *short])


def _fits(cols: list[str], cells: Cells, full: Cells, at: list[int], w: int) -> bool:
    """Whether every column fits with its short cells whole (``cells``), the name columns
    (``at``) at NAME_WIDTH or their full length (``full``) when shorter."""
    need = GAP * (len(cols) - 1)
    for i, c in enumerate(cols):
        short = _comfort(c, cells, i)
        need += max(short, min(_minimum(c, full, i), NAME_WIDTH)) if i in at else short
    return need <= w


def _shorten_names(cols: list[str], cells: Cells, at: list[int], w: int) -> Cells:
    """Shorten the words of the name columns (``at``) to the room the other columns leave them:
    all they need when the others fit whole, else NAME_WIDTH, but never so much that a short
    cell elsewhere (a number, a CI) has to wrap, unless that leaves names almost nothing."""
    if not at or not cells:
        return cells
    room = w - GAP * (len(cols) - 1)
    others = [i for i in range(len(cols)) if i not in at]

    def spare(width_of) -> int:
        return (room - sum(width_of(cols[i], cells, i) for i in others)) // len(at)

    cap = spare(_comfort) if spare(_comfort) >= 8 else spare(_minimum)
    for i in at:
        longest = _minimum(cols[i], cells, i)
        budget = min(max(spare(_natural), min(longest, NAME_WIDTH)), cap, longest)
        budget = max(budget, len(cols[i]), 1)
        short = shorten((x for r in cells for x in _words(r[i])), budget)
        for r in cells:
            r[i] = " ".join(short.get(x, x) for x in r[i].split(" "))
    return cells


def _widths(cols: list[str], cells: Cells, w: int) -> list[int]:
    """Each column's width: the natural ones when they fit; else short cells whole (or, when
    even that does not fit, every column at its longest word) and the room left shared in
    proportion to what each column still lacks."""
    nat = [_natural(c, cells, i) for i, c in enumerate(cols)]
    room = w - GAP * (len(cols) - 1)
    if sum(nat) <= room:
        return nat
    widths = [_comfort(c, cells, i) for i, c in enumerate(cols)]
    if sum(widths) > room:
        widths = [_minimum(c, cells, i) for i, c in enumerate(cols)]
    spare, lack = room - sum(widths), [n - b for n, b in zip(nat, widths, strict=True)]
    if spare > 0 and sum(lack):
        widths = [b + d * spare // sum(lack) for b, d in zip(widths, lack, strict=True)]
    return widths


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
        a, w = plan.layer_bits(lp)
        wtxt = f"int{w}" if lp.quantized and lp.weight else ("-" if lp.quantized else "float")
        atxt = f"int{a}" if lp.quantized else "float"
        rows.append((lp.name, lp.op_type, wtxt, atxt, lp.flops, lp.reason or ""))
    cols = ["layer", "op", "weights", "activations", "FLOPs", "note"]
    table("Layers", cols, rows, optional=("FLOPs", "op"))
    if s.float_ops or s.float_tensors:
        frows = [*s.float_ops.items(), *s.float_tensors.items()]
        table("Left float", ["node / tensor", "why"], frows)
    _fidelity_table(s)
    _quantize_lines(result)


def _fidelity_table(s: Any) -> None:
    if not s.fidelity:
        echo("float vs quantized outputs: not measured (--no-summary)")
        return
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
    if s.outliers:
        echo(
            f"tensors with outlier channels: {len(s.outliers)}: "
            + "; ".join(f"{k}: {v}" for k, v in s.outliers.items())
        )
    for n in s.notes:
        echo(f"note: {n}")
    _wrote([result.model_path, result.config_path, result.qparams_path])


# ---------------------------------------------------------------------------------------------
# eval


def render_eval(res: Any, model: Any) -> None:
    """amq eval: the value with its CI, against the reference when given, and the speed."""
    row = [res.metric, res.output, res.samples, res.value, fmt_ci(res.value_ci)]
    cols = ["metric", "output", "samples", "value", "95% CI"]
    if res.reference_value is not None:
        cols += ["float", "drop", "drop 95% CI"]
        row += [res.reference_value, res.drop, fmt_ci(res.drop_ci or (None, None))]
    table(f"Evaluation of {model}", cols, [row], names=(1,), optional=("samples",))
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
    title = f"bitops of {model} (FLOPs = 2 x MACs)"
    table(title, BITOPS_COLUMNS, rows, optional=("params", "op", "FLOPs"))
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


def _dtype_counts(d: dict[str, int], side: str) -> str:
    """'8 int8, 4 int32': how many of an op type's inputs (or outputs) have each type."""
    return ", ".join(f"{n} {k.split(':', 1)[1]}" for k, n in d.items() if k.startswith(side) and n)


def render_check(rep: Any, model: Any) -> None:
    """amq check: the findings, the ops left float, the integer types per op type, the counts."""
    rows = [(f.kind, f.where, f.detail) for k in CHECK_KINDS for f in rep.by_kind(k)]
    rows = rows or [("none", "-", "-")]
    table(f"Check of {model}", ["finding", "where", "detail"], rows, names=(1,))
    if rep.unsupported:
        table("Ops amq leaves float", ["op type", "count"], list(rep.unsupported.items()), names=())
    if rep.dtype_stats:
        drows = [
            (op, _dtype_counts(d, "in") or "-", _dtype_counts(d, "out") or "-")
            for op, d in rep.dtype_stats.items()
        ]
        cols = ["op type", "inputs", "outputs"]
        table("Input/output types per op type", cols, drows, names=())
    echo(", ".join(f"{k}: {len(rep.by_kind(k))}" for k in CHECK_KINDS), sep=", ")


# ---------------------------------------------------------------------------------------------
# sensitivity


def render_sensitivity(rep: Any, top: int, written: Sequence[Any] = ()) -> None:
    """amq sensitivity: per bit width, the ``top`` most sensitive layers."""
    what = "All but one quantized" if rep.mode == "leave_one_out" else "One layer quantized"
    for b in rep.bits:
        title = (
            f"{what} at W{b}A{max(b, 8)} ({rep.metric}, float {fmt(rep.float_value)}, "
            f"{rep.samples} samples)"
        )
        if b in rep.baselines:
            title += f"; all quantized: {fmt(rep.baselines[b]['value'])}"
        rows = [sensitivity_report.row(r) for r in rep.ranked(b)[:top]]
        optional = ("FLOPs", "local MSE", "op", "local cosine", "drop 95% CI")
        table(title, sensitivity_report.columns(rep), rows, optional=optional)
    dyn = [sensitivity_report.row(r) for r in rep.ranked(dynamic=True)[:top]]
    if dyn:
        title = f"{what} with dynamic activations, W8 ({rep.metric})"
        table(title, sensitivity_report.columns(rep), dyn, optional=optional)
    _wrote(written)


def _wrote(files: Sequence[Any]) -> None:
    if files:
        echo(f"wrote {', '.join(map(str, files))}", sep=", ")


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


def render_compare(rep: Any, top: int, written: Sequence[Any] = ()) -> None:
    """amq compare: the worst ``top`` tensors, the model outputs, the suggested fixes, counts."""
    rows = [_compare_row(r) for r in rep.rows[:top]]
    table(
        f"{rep.quant_source} vs {rep.float_source}: worst {len(rows)} of {len(rep.rows)} "
        f"tensors ({rep.samples} samples)",
        COMPARE_COLUMNS,
        rows,
        optional=("input SQNR", "own SQNR", "overshoot", "scale", "cosine", "type"),
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
    echo(", ".join(f"{k}: {v}" for k, v in sorted(rep.counts().items())), sep=", ")
    for n in rep.notes:
        echo(f"note: {n}")
    _wrote(written)


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
            fmt_ci(r.drop_ci),
            r.value,
            " ".join(f"{k}:{v}" for k, v in r.bits.items()),
        )
        for r in o.pareto
    ]
    table(
        f"Pareto front ({res.cost_name} / all-INT8 vs {res.metric} drop; budget {res.budget:.4g})",
        ["trial", f"{res.cost_name} ratio", "drop", "drop 95% CI", res.metric, "bits"],
        rows,
        names=(),
        optional=("drop 95% CI",),
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
