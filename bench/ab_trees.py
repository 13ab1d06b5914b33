"""Two amq trees side by side on the real models: each tree's ``amq quantize`` defaults in fresh
child processes (bench/quantizers.py of that tree: wall time with imports, peak RSS), the
written models compared by digest, and where they differ both models' task metric and output
SQNR on held-out feeds, ideal / native (this CPU's kernels).

Usage:  python bench/ab_trees.py BASE_TREE NEW_TREE --models doc_layout,ocr_det [--reps 2]
        [--eval 48]
(a tree: a checkout of this repository, e.g. ``git worktree add /tmp/base <commit>``)
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_models as rm  # noqa: E402
from quantizers import save_calib  # noqa: E402


def quantizers_of(tree: Path):
    """The bench/quantizers.py of ``tree``: its children import that tree's amq."""
    spec = importlib.util.spec_from_file_location(f"q_{tree.name}", tree / "bench/quantizers.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def compare(name: str, trees: dict, reps: int, n_eval: int, work: Path) -> None:
    m = rm.MODELS[name]
    path = m.find_model()
    npz = save_calib(m.calib_inputs(rm.DEFAULT_CALIB[name]), work / f"{name}.npz")
    runs: dict[str, list] = {k: [] for k in trees}
    for _ in range(reps):  # interleaved
        for k, q in trees.items():
            r = q.run_quantizer("amq default", path, npz, work / f"{name}_{k}.onnx", {})
            if "error" in r:
                raise SystemExit(f"{name} ({k}): {r['error']}")
            runs[k].append((round(r["wall_seconds"], 2), round(r["peak_rss_mb"])))
    digest = {
        k: hashlib.md5((work / f"{name}_{k}.onnx").read_bytes()).hexdigest()[:8] for k in trees
    }
    same = len(set(digest.values())) == 1
    print(name, json.dumps(runs), digest, "same bytes" if same else "differ", flush=True)
    if same or not n_eval:
        return
    feeds = m.eval_inputs(n_eval)
    ref = m.run(path, feeds, "ideal")
    for k in trees:
        q = work / f"{name}_{k}.onnx"
        got = {e: rm.measure(m, ref, m.run(q, feeds, e)) for e in ("ideal", "native")}
        print("  ", k, json.dumps(got, default=float), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--models", required=True)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--eval", type=int, default=0, help="held-out feeds where the models differ")
    ap.add_argument("--work", type=Path, default=Path("/tmp/amq-ab"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print("\n".join(f"- {line}" for line in rm.machine_header()))
    trees = {"base": quantizers_of(args.base.resolve()), "new": quantizers_of(args.new.resolve())}
    for name in args.models.split(","):
        compare(name.strip(), trees, args.reps, args.eval, args.work)


if __name__ == "__main__":
    main()
