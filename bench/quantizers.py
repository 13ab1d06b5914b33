"""Quantizers side by side, each in a fresh subprocess (time from spawn to exit, imports included;
peak RSS from wait4's ru_maxrss; a process past MEM_LIMIT_GB is killed and reported).

Methods:
    amq ...                 amq.quantize with a config (JSON)
    ort static minmax       onnxruntime quantize_static: QDQ, u8 activations, s8 per-channel
    ort static percentile   the same with CalibrationMethod.Percentile
    ort static matmul-only  the same, op_types_to_quantize=['MatMul']
    ort dynamic             quantize_dynamic, QInt8 weights
    nncf default            nncf.quantize(model, Dataset) with its defaults (CNN preset, fast
                            bias correction), in NNCF_PYTHON (its own venv)
    nncf transformer        the same with model_type=TRANSFORMER

The peers get the hand fixes they need (``hand_fixed``): Constant-node weights turned into
initializers, opset upgraded to 13 (onnxruntime writes per-tensor weights below it, silently).
amq gets none. Calibration feeds travel in one .npz (``save_calib``: key "<sample>:<input>").

Child usage (what run_quantizer spawns):
    python bench/quantizers.py --child METHOD --model-path M --calib-npz C --out O --result R
        [--config JSON]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
THREADS = int(os.environ.get("AMQ_BENCH_THREADS", "2"))
MEM_LIMIT_GB = float(os.environ.get("AMQ_BENCH_MEM_GB", "12"))
NNCF_PYTHON = os.environ.get("AMQ_NNCF_PYTHON", "/work/venv-nncf/bin/python")


def child_env() -> dict[str, str]:
    """The environment of a timed child: amq importable from this tree, THREADS threads, and
    Python's bytecode cache on. Some machines set PYTHONDONTWRITEBYTECODE=1, and a child then
    compiled amq's ~100 modules from source at every start (0.17 s of its 0.47 s import), while
    the peers' modules load from the .pyc files pip wrote at install, as amq's do on a user's
    machine after its first run. amq's are compiled once per bench process, before the first
    timed child (into the tree's __pycache__ folders, which git ignores)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(THREADS))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    _compile_once(str(REPO / "amq"))
    return env


@functools.cache
def _compile_once(package: str) -> None:
    cmd = [sys.executable, "-m", "compileall", "-q", package]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def save_calib(feeds: list[dict], path: Path) -> Path:
    np.savez(path, **{f"{i}:{k}": v for i, f in enumerate(feeds) for k, v in f.items()})
    return path


def load_calib(path: str | Path) -> list[dict]:
    z = np.load(path)
    out: dict[int, dict] = {}
    for key in z.files:
        i, name = key.split(":", 1)
        out.setdefault(int(i), {})[name] = z[key]
    return [out[i] for i in sorted(out)]


def hand_fixed(model_path: Path, out_path: Path) -> Path:
    """The model as a peer needs it: Constant nodes holding tensors become initializers (NNCF
    reads weights only from initializers) and an opset below 13 is upgraded to 13 (onnxruntime
    quantizes weights per channel only from there). The model itself when nothing changes."""
    import onnx  # noqa: PLC0415
    from onnx import numpy_helper, version_converter  # noqa: PLC0415

    m = onnx.load(str(model_path))
    keep, moved = [], 0
    consts = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    for n in m.graph.node:
        val = next((a for a in n.attribute if a.name == "value"), None)
        t = None
        if n.op_type == "Constant" and val is not None and len(n.attribute) == 1:
            t = numpy_helper.to_array(val.t)
        elif n.op_type == "Cast" and n.input[0] in consts:  # NNCF wants a type on Cast inputs
            to = next(a.i for a in n.attribute if a.name == "to")
            t = consts[n.input[0]].astype(onnx.helper.tensor_dtype_to_np_dtype(to))
        if t is not None:
            consts[n.output[0]] = t
            m.graph.initializer.append(numpy_helper.from_array(t, n.output[0]))
            moved += 1
            continue
        keep.append(n)
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    if not moved and opset >= 13:
        return model_path
    del m.graph.node[:]
    m.graph.node.extend(keep)
    if opset < 13:
        m = version_converter.convert_version(m, 13)
    onnx.save(m, str(out_path))
    return out_path


# --------------------------------------------------------------------------------------------
# The child side
# --------------------------------------------------------------------------------------------
def _child_amq(model: str, calib: list[dict], out: str, config: dict, summary: bool = True) -> dict:
    import amq  # noqa: PLC0415
    from amq.config import config_from_dict  # noqa: PLC0415

    # no statistics cache: amq.quantize's default one would let a repeated run skip calibration
    res = amq.quantize(
        model,
        calib=calib,
        config=config_from_dict(config),
        output=out,
        cache_dir=None,
        summary_samples=None if summary else 0,  # 0: `amq quantize --no-summary`
    )
    return {"warnings": [str(w) for w in res.warnings][:10], "notes": res.summary.notes}


def _child_ort(kind: str, model: str, calib: list[dict], out: str) -> dict:
    import logging  # noqa: PLC0415

    from onnxruntime.quantization import (  # noqa: PLC0415
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    logging.getLogger().setLevel(logging.ERROR)
    if kind == "ort dynamic":
        quantize_dynamic(model, out, weight_type=QuantType.QInt8)
        return {}

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)

    kw = {}
    if kind == "ort static percentile":
        kw["calibrate_method"] = CalibrationMethod.Percentile
    if kind == "ort static matmul-only":
        kw["op_types_to_quantize"] = ["MatMul"]
    quantize_static(
        model,
        out,
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        **kw,
    )
    return {}


def _child_nncf(kind: str, model: str, calib: list[dict], out: str) -> dict:
    import nncf  # noqa: PLC0415
    import onnx  # noqa: PLC0415

    kw = {"model_type": nncf.ModelType.TRANSFORMER} if kind == "nncf transformer" else {}
    q = nncf.quantize(onnx.load(model), nncf.Dataset(calib), subset_size=len(calib), **kw)
    onnx.save(q, out)
    return {"nncf": nncf.__version__}


def child_main(args) -> None:
    calib = load_calib(args.calib_npz)
    t0 = time.perf_counter()
    if args.child.startswith("amq"):
        config = json.loads(args.config or "{}")
        info = _child_amq(args.model_path, calib, args.out, config, "no summary" not in args.child)
    elif args.child.startswith("ort"):
        info = _child_ort(args.child, args.model_path, calib, args.out)
    else:
        info = _child_nncf(args.child, args.model_path, calib, args.out)
    info["quant_seconds"] = time.perf_counter() - t0
    Path(args.result).write_text(json.dumps(info))


# --------------------------------------------------------------------------------------------
# The parent side
# --------------------------------------------------------------------------------------------
def _watch_rss(pid: int, limit_bytes: float, killed: list, hwm: list) -> None:
    """Kill ``pid`` past ``limit_bytes``; keep its VmHWM (the peak of the exec'd process; wait4's
    ru_maxrss also counts the parent's memory the child had at fork)."""
    while True:
        try:
            with open(f"/proc/{pid}/status") as f:
                status = {ln.split(":")[0]: ln.split()[1:2] for ln in f}
            rss = int(status["VmRSS"][0]) * 1024
            hwm.append(int(status["VmHWM"][0]) * 1024)
        except (OSError, KeyError, IndexError, ValueError):
            return
        if rss > limit_bytes:
            killed.append(rss)
            os.kill(pid, 9)
            return
        time.sleep(0.1)


def run_quantizer(method: str, model: Path, calib_npz: Path, out: Path, config: dict | None):
    """Run one quantizer in a fresh subprocess; return info with wall_seconds and peak_rss_mb
    (or error)."""
    python = NNCF_PYTHON if method.startswith("nncf") else sys.executable
    result = out.with_suffix(".json")
    result.unlink(missing_ok=True)
    cmd = [python, __file__, "--child", method, "--model-path", str(model)]
    cmd += ["--calib-npz", str(calib_npz), "--out", str(out), "--result", str(result)]
    cmd += ["--config", json.dumps(config or {})]
    env = child_env()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    killed: list = []
    hwm: list = []
    watch = (p.pid, MEM_LIMIT_GB * 2**30, killed, hwm)
    threading.Thread(target=_watch_rss, args=watch).start()
    err = p.stderr.read().decode(errors="replace")  # type: ignore[union-attr]
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    peak = max(hwm) / 2**20 if hwm else ru.ru_maxrss / 1024  # VmHWM polled every 0.1 s
    info = {"wall_seconds": time.perf_counter() - t0, "peak_rss_mb": peak}
    if killed:
        info["error"] = f"killed: RSS {killed[0] / 2**30:.1f} GB > {MEM_LIMIT_GB} GB"
    elif p.returncode != 0 or not result.is_file():
        tail = [ln for ln in err.strip().splitlines() if ln.strip()][-1:] or ["?"]
        info["error"] = f"exit {p.returncode}: {tail[0][:300]}"
    else:
        info.update(json.loads(result.read_text()))
    return info


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", required=True)
    for a in ("--model-path", "--calib-npz", "--out", "--result", "--config"):
        ap.add_argument(a)
    child_main(ap.parse_args())
