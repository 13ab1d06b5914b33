"""`amq search` with a cosine budget against amq's default, on a transformer encoder (issue #12:
"search with a cosine budget meets the budget at lower bitops than the default").

Same sentences, tokenizer and metrics as bench/transformer_bench.py (128 calibration, 256
evaluation sentences, sequence 64). The search scores each trial by the cosine of the model
output (last_hidden_state: ``--output-name``; the model's first output is an integer-valued
passthrough, on which every trial scores 1.0) to the float model's on the evaluation sentences (ideal math) and
minimises bitops; the budget is a relative drop of that cosine. Both the default and the search's
best model are then measured like every row of transformer_bench: pooled-embedding cosine,
nearest-neighbour agreement and SQNR, on the ideal math and on this CPU's kernels.

Usage:
  python bench/search_budget.py [--model minilm] [--budget 1%] [--trials 40] [--dynamic]
      [--block-size 32] [--out /tmp/amq_search_budget] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import transformer_bench as tb  # noqa: E402

import amq  # noqa: E402
from amq.api import evaluate_config, search  # noqa: E402


def pooled(enc: tb.Encoder, path: Path, ev: list[dict], ref: dict) -> dict:
    return {
        ex: tb.agreement(ref[ex], tb.embeddings(tb.session(path, ex), enc.hidden_output, ev))
        for ex in ("ideal", "native")
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--budget", default="1%")
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--dynamic", action="store_true")
    ap.add_argument("--block-size", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/amq_search_budget"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    enc = tb.ENCODERS[args.model]
    calib_txt, eval_txt = tb.texts(128, 256)
    calib, ev = enc.feeds(calib_txt), enc.feeds(eval_txt)
    args.out.mkdir(parents=True, exist_ok=True)
    ref = {
        ex: tb.embeddings(tb.session(enc.onnx, ex), enc.hidden_output, ev)
        for ex in ("ideal", "native")
    }

    t0 = time.perf_counter()
    default = evaluate_config(str(enc.onnx), calib, ev, metric="cosine", output=enc.hidden_output)
    default_path = args.out / "default.onnx"
    amq.quantize(str(enc.onnx), calib=calib, output=default_path)
    t1 = time.perf_counter()
    res = search(
        str(enc.onnx), calib, ev, args.budget, args.out / "search", metric="cosine",
        output=enc.hidden_output,
        n_trials=args.trials, dynamic=args.dynamic, block_size=args.block_size, seed=0,
    )  # fmt: skip
    t2 = time.perf_counter()
    d = res.to_dict()
    best = res.outcome.best
    row = {
        "model": args.model, "budget": args.budget, "trials": d["trials"], "pruned": d["pruned"],
        "search_seconds": round(t2 - t1, 1), "default_seconds": round(t1 - t0, 1),
        "default": {"cosine_drop": default["drop"], "bitops_ratio": default["bitops_ratio"],
                    **pooled(enc, default_path, ev, ref)},
    }  # fmt: skip
    if best is not None:
        best_model = next(f for f in res.files if str(f).endswith(".onnx"))
        again = evaluate_config(str(enc.onnx), calib, ev, config=next(
            f for f in res.files if str(f).endswith(".yaml")), metric="cosine",
            output=enc.hidden_output)  # fmt: skip
        row["search"] = {
            "cosine_drop": best.drop, "bitops_ratio": again["bitops_ratio"],
            "bits": best.bits, **pooled(enc, Path(best_model), ev, ref),
        }  # fmt: skip
    print(json.dumps(row, indent=1))
    if args.json:
        args.json.write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
