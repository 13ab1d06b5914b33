"""amq.quantize called from a process that already holds memory (a notebook's data, a host
application), against the same call in a fresh process: the memory budget
(``calibration.memory_mb``) sizes what amq adds, so the two should take the same time and
batches. Each run is a fresh subprocess that first allocates and touches ``--held`` MB, then
times ``amq.quantize`` (defaults, no cache) on a real model of bench/real_models.py; the runs
alternate, ``--reps`` times each; medians are printed with the budget notes of the last run.

Usage:  python bench/held_memory.py [--models ocr_det,doc_layout] [--held 1200] [--reps 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from quantizers import child_env  # noqa: E402
from real_models import machine_header  # noqa: E402

CHILD = """
import json, sys, tempfile, time
sys.path.insert(0, {bench!r})
import numpy as np
import real_models as rm
import amq
ballast = np.ones({held} << 17)  # float64: {held} MB, every page touched
m = rm.MODELS[{name!r}]
calib = m.calib_inputs(rm.DEFAULT_CALIB[{name!r}])
t0 = time.perf_counter()
r = amq.quantize(str(m.find_model()), calib, None, tempfile.mkdtemp() + "/q.onnx",
                 cache_dir=None, show_progress=False)
notes = [n for n in r.summary.notes if "memory budget" in n]
print(json.dumps({{"seconds": time.perf_counter() - t0, "notes": notes}}))
"""


def run(name: str, held: int) -> dict:
    code = CHILD.format(bench=str(HERE), held=held, name=name)
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=child_env()
    )
    if res.returncode:
        raise SystemExit(f"{name}, {held} MB held: {res.stderr.strip().splitlines()[-1]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="ocr_det,doc_layout")
    ap.add_argument("--held", type=int, default=1200)
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()
    for line in machine_header():  # date, machine, versions, command, amq's commit
        print(f"- {line}")
    print(f"\n| model | fresh s | with {a.held} MB held s | held / fresh |")
    print("| --- | ---: | ---: | ---: |")
    notes = {}
    for name in a.models.split(","):
        got: dict[int, list[float]] = {0: [], a.held: []}
        for _ in range(a.reps):
            for held in got:
                r = run(name, held)
                got[held].append(r["seconds"])
                notes[(name, held)] = r["notes"]
        fresh, held_s = (statistics.median(v) for v in got.values())
        print(f"| {name} | {fresh:.1f} | {held_s:.1f} | {held_s / fresh:.2f}x |", flush=True)
    print()
    for (name, held), ns in notes.items():
        for n in ns:
            print(f"- {name}, {held} MB held: {n}")


if __name__ == "__main__":
    main()
