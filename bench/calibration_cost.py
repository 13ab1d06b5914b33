"""What quantizing costs against quantize_static MinMax and one float pass (issue #14), on the real
models of bench/real_models.py, side by side in one run, with amq's phase breakdown.

Per model, interleaved ``--reps`` times (medians reported):
  float pass      a fresh default onnxruntime session over the calibration samples, batch 16
                  (session creation included), in this process
  amq             ``amq.quantize`` with its defaults, no cache, in a fresh subprocess (imports
                  included; peak RSS = the child's VmHWM; bench/quantizers.py)
  amq fast        the same without the summary (``--no-summary``) and without bias correction
                  (``algorithms: {bias_correction: false}``): what the defaults' extras cost
  ORT MinMax      quantize_static (QDQ, per-channel s8 weights, u8 activations, MinMax), the
                  hand-fixed model, a fresh subprocess
Then once: amq.quantize under cProfile in a fresh subprocess, its time split by phase (the
cumulative time of the function that does each job; the profiler adds some overhead, so the
phases are shown as shares of that run).

Usage:  python bench/calibration_cost.py [--models digits,ocr_det] [--reps 1] [--md out.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_models as rm  # noqa: E402
from algorithms_bench import MODELS  # noqa: E402  (the same models)
from quantizers import REPO, child_env, hand_fixed, run_quantizer, save_calib  # noqa: E402

# (phase, the function whose cumulative time it is); "other" is the rest of amq.quantize
PHASES = (
    ("prepare", "amq/calib/prepare.py", "prepare"),
    ("equalization", "amq/calib/equalizing.py", "equalize"),
    ("smoothquant", "amq/calib/float_edits.py", "settle_smoothing"),  # decisions, edit, check
    ("calibration", "amq/calib/runner.py", "collect_stats"),
    ("overflow check", "amq/calib/saturation.py", "decide_overflow"),
    ("bias correction", "amq/calib/refining.py", "correct_biases"),
    ("weight passes", "amq/calib/refining.py", "refine_weights"),
    ("emit QDQ", "amq/calib/workspace.py", "emit"),
    ("summary", "amq/analysis/summary.py", "summarize"),
    ("write files", "amq/artifacts.py", "write_quantized"),
)
FAST = {"algorithms": {"bias_correction": False}}  # "amq fast", with no summary (see above)
PROFILE_CHILD = """
import cProfile, json, pstats, sys, time
sys.path.insert(0, {bench!r})
from quantizers import load_calib
t0 = time.perf_counter()
import amq
imports = time.perf_counter() - t0
calib = load_calib({npz!r})
prof = cProfile.Profile()
prof.enable()
amq.quantize({model!r}, calib, None, {out!r}, cache_dir=None, show_progress=False)
prof.disable()
total = time.perf_counter() - t0
st = pstats.Stats(prof).stats
out = {{"total": total, "imports": imports}}
for name, path, func in {phases!r}:
    out[name] = sum(v[3] for (f, _l, fn), v in st.items() if f.endswith(path) and fn == func)
print(json.dumps(out))
"""


def float_pass(m, path: Path, calib: list[dict]) -> float:
    import numpy as np
    import onnxruntime as ort

    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for i in range(0, len(calib), 16):
        part = calib[i : i + 16]
        feeds = {k: np.concatenate([c[k] for c in part]) for k in part[0]}
        try:
            sess.run(None, feeds)
        except Exception:  # noqa: BLE001  (a model with a fixed batch of 1: one call each)
            for c in part:
                sess.run(None, c)
    return time.perf_counter() - t0


def phases(path: Path, npz: Path, out: Path) -> dict:
    code = PROFILE_CHILD.format(
        bench=str(REPO / "bench"), npz=str(npz), model=str(path), out=str(out), phases=PHASES
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
        env=child_env(),
    )
    if res.returncode:
        return {"error": res.stderr.strip().splitlines()[-1][:200]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_model(name: str, reps: int, work: Path) -> dict:
    m = rm.MODELS[name]
    path = m.find_model()
    calib = m.calib_inputs(rm.DEFAULT_CALIB[name])
    npz = save_calib(calib, work / f"{name}.npz")
    fixed = hand_fixed(path, work / f"{name}_fixed.onnx")
    runs: dict[str, list] = {"float": [], "amq": [], "fast": [], "ort": []}
    for _ in range(reps):
        runs["float"].append(float_pass(m, path, calib))
        runs["amq"].append(run_quantizer("amq default", path, npz, work / "amq.onnx", {}))
        runs["fast"].append(run_quantizer("amq no summary", path, npz, work / "fast.onnx", FAST))
        runs["ort"].append(run_quantizer("ort static minmax", fixed, npz, work / "ort.onnx", None))
    row = {"model": name, "samples": len(calib), "float_s": statistics.median(runs["float"])}
    for k in ("amq", "fast", "ort"):
        row[f"{k}_s"] = statistics.median(r["wall_seconds"] for r in runs[k])
        row[f"{k}_mb"] = statistics.median(r["peak_rss_mb"] for r in runs[k])
    row["phases"] = phases(path, npz, work / "amq_prof.onnx")
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict], header: str) -> str:
    out = [header, ""]
    out.append(
        "| model (calibration samples) | float pass s | amq s / peak RSS MB | quantize_static "
        "MinMax s / MB | amq / MinMax time | amq / float pass | amq fast s / MB | fast / MinMax |"
    )
    out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        out.append(
            f"| {r['model']} ({r['samples']}) | {r['float_s']:.2f} | {r['amq_s']:.1f} / "
            f"{r['amq_mb']:.0f} | {r['ort_s']:.1f} / {r['ort_mb']:.0f} | "
            f"{r['amq_s'] / r['ort_s']:.2f}x | {r['amq_s'] / max(r['float_s'], 1e-9):.1f}x | "
            f"{r['fast_s']:.1f} / {r['fast_mb']:.0f} | {r['fast_s'] / r['ort_s']:.2f}x |"
        )
    names = ["imports"] + [p[0] for p in PHASES]
    out += [
        "",
        "amq's time by phase (one profiled run; share of its total, seconds in brackets):",
        "",
    ]
    out.append("| model | total s | " + " | ".join(names) + " | other |")
    out.append("| --- | ---: | " + " | ".join("---:" for _ in names) + " | ---: |")
    for r in rows:
        p = r["phases"]
        if "error" in p:
            out.append(f"| {r['model']} | error: {p['error']} |")
            continue
        total = p["total"]
        cells = [f"{100 * p[n] / total:.0f}% ({p[n]:.1f})" for n in names]
        rest = total - sum(p[n] for n in names)
        out.append(f"| {r['model']} | {total:.1f} | " + " | ".join(cells) + f" | {rest:.1f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--md", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="amq-cost-") as tmp:
        rows = [bench_model(n.strip(), args.reps, Path(tmp)) for n in args.models.split(",")]
    header = "\n".join(f"- {line}" for line in rm.machine_header())
    md = markdown(rows, header)
    print(md)
    if args.md:
        args.md.write_text(md)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
