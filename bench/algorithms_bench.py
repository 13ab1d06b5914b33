"""Accuracy-recovering passes (issue #13): an ablation per real model against quantize_static and
NNCF, side by side in one run.

For each model of bench/real_models.py (its calibration and held-out feeds, its task metric):
amq's default, amq with each pass off (or on where its default is off), onnxruntime's
quantize_static (MinMax, Percentile) and NNCF's default ``nncf.quantize`` (CNN preset: its range
estimators, fast bias correction), each in a fresh subprocess (bench/quantizers.py: time with
imports, peak RSS). The peers get the hand fixes they need (Constant nodes to initializers, opset
13); amq gets none. Every quantized model is compared with the float model on the ideal Q/DQ
math and on this CPU's integer kernels.

Usage:  python bench/algorithms_bench.py [--models digits,ocr_cls] [--methods 'amq default,...']
            [--md out.md] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_models as rm  # noqa: E402
from quantizers import hand_fixed, run_quantizer, save_calib  # noqa: E402

_OFF = {"bias_correction": False, "scale_search": False, "adaround": False}
_W4 = {"weights": {"bits": 4}}
AMQ_VARIANTS: dict[str, dict] = {
    # INT8: the default runs bias correction only (scale search and AdaRound are on auto for
    # weights of 4 bits)
    "amq default": {},
    "amq no passes": {"algorithms": _OFF},
    "amq no bias correction": {"algorithms": {"bias_correction": False}},
    # activation ranges: percentile widened to mse (the default), as is, or chosen per model
    "amq no widening": {"calibration": {"widen_to_mse": False}},
    "amq widening auto": {"calibration": {"widen_to_mse": "auto"}},
    "amq all passes": {"algorithms": {"scale_search": True, "adaround": True}},
    # cross-layer equalization: auto runs it for per-tensor weight grids, and brings a depthwise
    # Conv's input channels closer together where both layers have per-channel weights
    "amq equalization": {"algorithms": {"equalization": True}},
    "amq no equalization": {"algorithms": {"equalization": False}},
    "amq per-tensor": {"weights": {"granularity": "per_tensor"}},
    "amq per-tensor no equalization": {
        "weights": {"granularity": "per_tensor"},
        "algorithms": {"equalization": False},
    },
    # W4A8 (per-channel): the default runs all three
    "amq w4a8": _W4,
    "amq w4a8 no passes": {**_W4, "algorithms": _OFF},
    "amq w4a8 bias correction only": {**_W4, "algorithms": {**_OFF, "bias_correction": True}},
    "amq w4a8 scale search only": {**_W4, "algorithms": {**_OFF, "scale_search": True}},
    "amq w4a8 adaround only": {**_W4, "algorithms": {**_OFF, "adaround": True}},
}
PEERS = ("ort static minmax", "ort static percentile", "nncf default")
MODELS = (
    "digits",
    "resnet_digits",
    "mobilenet_digits",
    "ocr_cls",
    "ocr_rec",
    "ocr_det",
    "silero_vad_seq",
    "ocr6_det",
    "ocr6_rec",
    "doc_layout",
)


def bench_model(name: str, methods: list[str], work: Path, n_eval: int | None = None) -> dict:
    m = rm.MODELS[name]
    path = m.find_model()
    calib = m.calib_inputs(rm.DEFAULT_CALIB[name])
    feeds = m.eval_inputs(n_eval or rm.DEFAULT_EVAL[name])
    t0 = time.perf_counter()
    f_out = m.run(path, feeds)
    float_s = time.perf_counter() - t0
    npz = save_calib(calib, work / f"{name}_calib.npz")
    fixed = hand_fixed(path, work / f"{name}_fixed.onnx")
    rows: dict = {}
    for method in methods:
        out = work / f"{name}_{method.replace(' ', '_')}.onnx"
        config = AMQ_VARIANTS.get(method)
        src = path if config is not None else fixed
        row = run_quantizer(method, src, npz, out, config)
        if "error" not in row:
            try:
                row.update(rm.compare_executions(m, out, feeds, f_out, 0))
            except Exception as e:  # noqa: BLE001  (a model onnxruntime rejects is a finding)
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows[method] = row
        print(f"[{name}] {method}: {json.dumps(row, default=str)[:400]}", flush=True)
    return {
        "model": name,
        "key": m.KEY[0] if isinstance(m.KEY, (list, tuple)) else m.KEY,
        "calib": len(calib),
        "eval": len(feeds),
        "float_eval_seconds": float_s,
        "rows": rows,
    }


def _cell(row: dict, key: str) -> str:
    if "error" in row:
        return "fails"
    return " / ".join(f"{row[ex].get(key, float('nan')):.3f}" for ex in ("ideal", "native"))


def markdown(results: list[dict], header: list[str]) -> str:
    lines = [*header, ""]
    for r in results:
        key = r["key"]
        lines += [
            f"**{r['model']}** ({r['calib']} calibration / {r['eval']} held-out feeds; "
            f"metric `{key}` and output SQNR dB, ideal / native)",
            "",
            f"| method | {key} | SQNR dB | quantize s | peak RSS MB |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for method, row in r["rows"].items():
            err = f" ({row['error'][:80]})" if "error" in row else ""
            lines.append(
                f"| {method}{err} | {_cell(row, key)} | {_cell(row, 'sqnr_db')} | "
                f"{row.get('wall_seconds', float('nan')):.1f} | "
                f"{row.get('peak_rss_mb', float('nan')):.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--methods", default=",".join([*AMQ_VARIANTS, *PEERS]))
    ap.add_argument("--work", type=Path, default=Path("/tmp/amq_algorithms_bench"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    ap.add_argument("--eval", type=int, help="held-out feeds per model (default: each model's)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    methods = [x.strip() for x in args.methods.split(",") if x.strip()]
    unknown = [x for x in methods if x not in AMQ_VARIANTS and x not in PEERS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {[*AMQ_VARIANTS, *PEERS]}")
    header = [
        f"Run {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC: "
        f"`python bench/algorithms_bench.py {' '.join(sys.argv[1:])}`",
        *rm.machine_header(),
    ]
    results = []
    for name in args.models.split(","):
        results.append(bench_model(name, methods, args.work, args.eval))
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str))
    md = markdown(results, header)
    print(md)
    if args.md:
        args.md.write_text(md)


if __name__ == "__main__":
    main()
