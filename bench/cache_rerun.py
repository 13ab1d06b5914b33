"""What a second `amq quantize` of the same model and data costs with the cache (the default:
statistics, bias-correction shifts and overflow results are kept on disk), against the first.

For each model, one fresh subprocess quantizes it twice with defaults into one new cache folder
and reports each call's time (imports excluded) and the md5 of each written model, which must be
the same. Models and calibration feeds: bench/real_models.py's defaults.

    python bench/cache_rerun.py --models doc_layout,ocr6_rec,minilm,ocr_det --md out.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_models as rm  # noqa: E402
from quantizers import REPO, child_env, save_calib  # noqa: E402

CHILD = """
import hashlib, json, sys, time
sys.path.insert(0, {bench!r})
from quantizers import load_calib
import amq
calib = load_calib({npz!r})
out = []
for _ in range(2):
    t = time.perf_counter()
    amq.quantize({model!r}, calib, None, {out!r}, cache_dir={cache!r}, show_progress=False)
    out.append([time.perf_counter() - t, hashlib.md5(open({out!r}, "rb").read()).hexdigest()])
print(json.dumps(out))
"""


def rerun(name: str, work: Path) -> dict:
    m = rm.MODELS[name]
    npz = save_calib(m.calib_inputs(rm.DEFAULT_CALIB[name]), work / f"{name}.npz")
    code = CHILD.format(
        bench=str(REPO / "bench"),
        npz=str(npz),
        model=str(m.find_model()),
        out=str(work / f"{name}.q.onnx"),
        cache=str(work / f"cache-{name}"),
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=child_env()
    )
    if res.returncode:
        return {"model": name, "error": res.stderr.strip().splitlines()[-1][:200]}
    (t1, md1), (t2, md2) = json.loads(res.stdout.strip().splitlines()[-1])
    return {"model": name, "first_s": t1, "second_s": t2, "same_bytes": md1 == md2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="doc_layout,ocr6_rec,minilm,ocr_det")
    ap.add_argument("--md", default=None)
    args = ap.parse_args()
    lines = [
        "| model | first quantize s | second, from the cache s | ratio | same bytes |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    with tempfile.TemporaryDirectory(prefix="amq-rerun-") as tmp:
        for name in args.models.split(","):
            r = rerun(name, Path(tmp))
            print(json.dumps(r), flush=True)
            if "error" in r:
                lines.append(f"| {name} | {r['error']} | | | |")
                continue
            ratio = r["second_s"] / r["first_s"]
            lines.append(
                f"| {name} | {r['first_s']:.1f} | {r['second_s']:.1f} | {ratio:.2f}x | "
                f"{'yes' if r['same_bytes'] else 'NO'} |"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        Path(args.md).write_text(text)


if __name__ == "__main__":
    main()
