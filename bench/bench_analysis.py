"""Benchmarks of the analysis and search commands (issues 3 and 4), written to bench/RESULTS_ANALYSIS.md.

1. Sensitivity: time per layer evaluation against one float evaluation pass over the same samples
   (session creation included). Per layer = (t(all layers) - t(one layer)) / (layers - 1) with the
   calibration statistics already cached, so calibration and the float reference cancel out.
   Target: at most 1.5x.
2. Search (budget 1%): bitops ratio to all-INT8, trials until the first feasible one, wall time,
   share pruned; against all-INT8 and the greedy sensitivity baseline (the smallest top-K% at INT16
   that meets the budget). Target: >= 25% fewer bitops than all-INT8 on the bundled example.

Run: python bench/bench_analysis.py [--quick]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def float_pass(model: Path, data: Path, n: int) -> float:
    import onnxruntime as ort

    x = np.load(data / "input.npy", mmap_mode="r")[:n]
    t = time.perf_counter()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    for i in range(0, len(x), 16):
        s.run(None, {s.get_inputs()[0].name: np.ascontiguousarray(x[i : i + 16])})
    return time.perf_counter() - t


def bench_sensitivity(
    name: str, model: Path, calib: Path, ev: Path, n_eval: int, cache: Path, metric: str
) -> dict:
    from amq import api

    # warm the statistics cache (and the OS file cache)
    api.sensitivity(model, calib, ev, bits=(8,), metric=metric, samples=n_eval, cache_dir=cache)
    floats, alls, ones = [], [], []
    rep = None
    for _ in range(2):
        floats.append(float_pass(model, ev, n_eval))
        t = time.perf_counter()
        rep = api.sensitivity(
            model, calib, ev, bits=(8,), metric=metric, samples=n_eval, cache_dir=cache
        )
        alls.append(time.perf_counter() - t)
        first = rep.rows[0].layer
        t = time.perf_counter()
        api.sensitivity(
            model,
            calib,
            ev,
            bits=(8,),
            metric=metric,
            samples=n_eval,
            layers=[first],
            cache_dir=cache,
        )
        ones.append(time.perf_counter() - t)
    n = len(rep.rows)
    per_layer = (min(alls) - min(ones)) / max(n - 1, 1)
    return {
        "model": name,
        "layers": n,
        "samples": n_eval,
        "float_pass_s": min(floats),
        "per_layer_s": per_layer,
        "ratio": per_layer / min(floats),
        "total_s": min(alls),
    }


def bench_search(
    name: str,
    model: Path,
    calib: Path,
    ev: Path,
    n_eval: int,
    trials: int,
    cache: Path,
    metric: str,
    out: Path,
) -> dict:
    from amq import api
    from amq.config import Config

    t = time.perf_counter()
    res = api.search(
        model, calib, ev, "1%", out, metric=metric, n_trials=trials, samples=n_eval, cache_dir=cache
    )
    wall = time.perf_counter() - t
    recs = sorted(res.outcome.records, key=lambda r: r.number)
    first_feasible = next((r.number + 1 for r in recs if r.feasible), None)
    best = res.outcome.best
    # all-INT8 and the greedy baseline: top-K% of the sensitivity ranking at INT16
    rep8 = api.evaluate_config(
        model, calib, ev, Config(), metric=metric, samples=n_eval, cache_dir=cache
    )
    greedy = None
    for k in (5, 10, 20, 30, 50, 75, 100):
        r = api.evaluate_config(
            model,
            calib,
            ev,
            Config(),
            metric=metric,
            samples=n_eval,
            cache_dir=cache,
            int16_top=k,
            sensitivity_from=out / "sensitivity.json",
        )
        if r["drop"] <= res.budget:
            greedy = {"k": k, **r}
            break
    return {
        "model": name,
        "budget": res.budget,
        "metric": metric,
        "trials": len(recs),
        "pruned_share": sum(r.state == "PRUNED" for r in recs) / max(len(recs), 1),
        "first_feasible": first_feasible,
        "wall_s": wall,
        "best_ratio": best.cost if best else None,
        "best_drop": best.drop if best else None,
        "int8_ratio": rep8["bitops_ratio"],
        "int8_drop": rep8["drop"],
        "greedy": greedy,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="amq-bench-analysis-"))
    cache = work / "cache"
    rows_s, rows_q = [], []
    digits = ROOT / "examples" / "digits_cnn.onnx"
    rows_s.append(
        bench_sensitivity(
            "digits", digits, ROOT / "calib_data", ROOT / "eval_data", 540, cache, "top1"
        )
    )
    rows_q.append(
        bench_search(
            "digits",
            digits,
            ROOT / "calib_data",
            ROOT / "eval_data",
            540,
            40 if args.quick else 100,
            cache,
            "top1",
            work / "s-digits",
        )
    )
    from bench_quantize import build_resnet18, write_images

    r18 = work / "resnet18.onnx"
    cal = work / "r18_calib"
    ev = work / "r18_eval"
    n_cal = 32 if args.quick else 128
    n_ev = 16 if args.quick else 48
    write_images(cal / "input.npy", n_cal, seed=1)
    write_images(ev / "input.npy", n_ev, seed=2)
    build_resnet18(r18, seed=0, stat_samples=np.load(cal / "input.npy")[:32])
    rows_s.append(bench_sensitivity("resnet18", r18, cal, ev, n_ev, cache, "agreement"))
    rows_q.append(
        bench_search(
            "resnet18",
            r18,
            cal,
            ev,
            n_ev,
            12 if args.quick else 40,
            cache,
            "cosine",
            work / "s-r18",
        )
    )
    write_results(rows_s, rows_q, args)


def write_results(rows_s: list[dict], rows_q: list[dict], args) -> None:
    import onnxruntime
    import optuna

    lines = [
        "# amq analysis and search benchmarks",
        "",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- command: `python bench/bench_analysis.py{' --quick' if args.quick else ''}` (from the repository root)",
        f"- machine: {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores, Linux {platform.release()} (shared and noisy: compare ratios)",
        f"- versions: python {platform.python_version()}, onnxruntime {onnxruntime.__version__}, optuna {optuna.__version__}",
        "",
        "## Sensitivity: time per layer evaluation vs one float evaluation pass (target <= 1.5x)",
        "",
        "Per layer = (t(all layers) - t(one layer)) / (layers - 1), statistics cached; the float pass",
        "creates its session and runs the same samples in batches of 16.",
        "",
        "| model | layers | eval samples | float pass s | per layer s | ratio | whole run s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows_s:
        lines.append(
            f"| {r['model']} | {r['layers']} | {r['samples']} | {r['float_pass_s']:.3f} | {r['per_layer_s']:.3f} | "
            f"**{r['ratio']:.2f}x** {'(met)' if r['ratio'] <= 1.5 else '(NOT met)'} | {r['total_s']:.2f} |"
        )
    lines += [
        "",
        "## Search, budget 1% (target on the example: >= 25% fewer bitops than all-INT8)",
        "",
        "| model | metric | budget (abs) | trials | pruned | first feasible trial | wall s | best bitops / INT8 | best drop | all-INT8 drop | greedy top-K% INT16: K, bitops / INT8, drop |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows_q:
        g = r["greedy"]
        gtxt = (
            f"{g['k']}%, {g['bitops_ratio']:.3f}, {g['drop']:.4g}" if g else "none met the budget"
        )
        best = f"**{r['best_ratio']:.3f}**" if r["best_ratio"] is not None else "none"
        bdrop = "-" if r["best_drop"] is None else f"{r['best_drop']:.4g}"
        lines.append(
            f"| {r['model']} | {r['metric']} | {r['budget']:.4g} | {r['trials']} | {r['pruned_share']:.0%} | "
            f"{r['first_feasible']} | {r['wall_s']:.1f} | {best} | {bdrop} | {r['int8_drop']:.4g} | {gtxt} |"
        )
    from bench_quantize import write_keeping_notes

    write_keeping_notes(ROOT / "bench" / "RESULTS_ANALYSIS.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
