"""Run an ONNX model as onnxruntime would on an AVX2-only x86 CPU (no VNNI), from any x86 machine.

Why: on x86 without VNNI, onnxruntime's uint8 x int8 integer kernels (VPMADDUBSW) add each pair of
products into a saturating int16, so a quantized model whose Q/DQ math is right can lose accuracy
at run time only (shared/PITFALLS.md item 9, shared/notes/int16-pair-overflow.md). On a VNNI
machine that never shows. This module runs the model in a *default* onnxruntime session inside
``qemu-x86_64 -cpu Haswell`` (user-mode emulation of an AVX2 CPU without AVX-512 or VNNI), so a
benchmark on a VNNI machine can measure "accuracy and runtime on an AVX2-only CPU". When the host
itself has no VNNI (no ``avx512_vnni`` / ``avx_vnni`` in /proc/cpuinfo) it runs natively instead,
still in a subprocess, so results mean the same thing on every machine.

How: the parent writes the feeds to a temporary .npz plus a JSON job, runs this same file with
``--child DIR`` (under qemu or natively), and reads the outputs back from another .npz. The child
also reports what the (emulated) CPU offers, as numpy's runtime dispatch sees it (cpuid), and
raises if it still sees VNNI, so a wrong ``-cpu`` cannot pass silently.

Emulation is slow, and float kernels far more than integer ones (measured on this 2-core VNNI
machine, qemu 7.2, onnxruntime 1.32, one default session): start-up (Python, numpy, onnxruntime,
session) costs 3-7 s; amq INT8 models then take per feed: digits CNN 0.002 s, silero_vad 0.024 s
per frame, silero_vad_seq 6.8 s per 485-frame clip, ocr_cls 0.48 s, minilm 1.0-1.3 s, ocr_rec
(48x320) 2.4 s, ocr_det (384x512) 9.6 s; the float models are 2-40x slower still (ocr_rec float:
57-104 s per feed, minilm float 18 s). So run the reference (float) model natively, and only the
quantized model here, on few feeds.

API:
    available() -> str | None        None when run_avx2 can be used, else why not
    run_avx2(model_path, feeds, output_names=None) -> list[list[np.ndarray]]
    run_avx2_info(...) -> (outputs, info)   the same plus timings and the CPU features seen
        (carry={"stateN": "state"}, reset=[...] streams a recurrent state from feed to feed)
    sqnr_db(reference, test) -> float

Environment: AMQ_QEMU (qemu binary, default ``qemu-x86_64`` on PATH), AMQ_QEMU_CPU (default
``Haswell``), AMQ_AVX2_FORCE_QEMU=1 (use qemu even on a host without VNNI).

CLI (from the repository root):
    python bench/avx2_runtime.py --check
    python bench/avx2_runtime.py MODEL.onnx --npy calib_data/input.npy --limit 64 [--reference F.onnx]
    python bench/avx2_runtime.py [MODEL.onnx] --real ocr_cls --limit 1 [--reference F.onnx]
``--npy`` splits an array along axis 0 into one-sample feeds for the model's single input;
``--real KEY`` takes evaluation feeds from bench/real_models.py (MODEL defaults to the float
model there). With ``--reference`` the CLI prints the output SQNR of MODEL against the reference
(float) model run natively, for three executions of MODEL: the ideal Q/DQ math
(ORT_DISABLE_ALL, native), a native default session, and a default session on the AVX2-only CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import numpy as np

QEMU_CPU = os.environ.get("AMQ_QEMU_CPU", "Haswell")
_VNNI_FLAGS = ("avx512_vnni", "avx_vnni")
# numpy's names for the CPU features the child reports (cpuid, as the emulated CPU answers it)
_REPORTED = ("SSE41", "AVX", "FMA3", "AVX2", "AVX512F", "AVX512BW", "AVX512VNNI", "AVX_VNNI")
_QEMU_NOISE = "TCG doesn't support requested feature"  # qemu's harmless warnings for Haswell


@lru_cache(maxsize=1)
def host_vnni_flags() -> tuple[str, ...]:
    """VNNI flags of the host CPU from /proc/cpuinfo (empty: the host has no VNNI)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return tuple(f for f in _VNNI_FLAGS if f in flags)


def _qemu_binary() -> str | None:
    name = os.environ.get("AMQ_QEMU", "qemu-x86_64")
    return shutil.which(name) or shutil.which("qemu-x86_64-static")


def mode() -> str:
    """'qemu' (emulate an AVX2-only CPU) or 'native' (the host already lacks VNNI)."""
    if host_vnni_flags() or os.environ.get("AMQ_AVX2_FORCE_QEMU") == "1":
        return "qemu"
    return "native"


def available() -> str | None:
    """None when :func:`run_avx2` can run here, else the reason it cannot."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"host is {platform.machine()}, not x86_64: the AVX2 int16 kernels do not apply"
    if mode() == "native":
        return None
    if _qemu_binary() is None:
        return (
            f"host CPU has {', '.join(host_vnni_flags())} and no qemu-x86_64 to emulate an "
            "AVX2-only CPU (apt-get install -y qemu-user)"
        )
    return None


def command(python: str | None = None) -> list[str]:
    """The command prefix that starts Python on the AVX2-only CPU (qemu or native)."""
    python = python or sys.executable
    if mode() == "native":
        return [python]
    qemu = _qemu_binary()
    if qemu is None:
        raise RuntimeError(available())
    return [qemu, "-cpu", QEMU_CPU, python]


def sqnr_db(reference, test) -> float:
    """10 log10(sum ref^2 / sum (ref - test)^2) over all values (lists are concatenated)."""
    if isinstance(reference, (list, tuple)):
        reference = np.concatenate([np.asarray(r, np.float64).ravel() for r in reference])
        test = np.concatenate([np.asarray(t, np.float64).ravel() for t in test])
    r = np.asarray(reference, np.float64)
    e = r - np.asarray(test, np.float64)
    noise, signal = float(np.sum(e * e)), float(np.sum(r * r))
    return float("inf") if noise == 0.0 else float(10.0 * np.log10(signal / noise))


def _session_options(ort, graph_optimization_level=None, intra_op_num_threads=None, config=None):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if graph_optimization_level is not None:
        level = graph_optimization_level
        if isinstance(level, str):
            level = getattr(ort.GraphOptimizationLevel, level)
        else:
            level = ort.GraphOptimizationLevel(int(level))
        so.graph_optimization_level = level
    if intra_op_num_threads:
        so.intra_op_num_threads = int(intra_op_num_threads)
    for k, v in (config or {}).items():
        so.add_session_config_entry(str(k), str(v))
    return so


def run_native(
    model_path,
    feeds: list[dict[str, np.ndarray]],
    output_names=None,
    *,
    graph_optimization_level=None,
    intra_op_num_threads=None,
    session_config=None,
) -> list[list[np.ndarray]]:
    """Run in this process (the host CPU): the same options as :func:`run_avx2`."""
    import onnxruntime as ort

    so = _session_options(ort, graph_optimization_level, intra_op_num_threads, session_config)
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    return [list(sess.run(output_names, f)) for f in feeds]


def run_avx2_info(
    model_path,
    feeds: list[dict[str, np.ndarray]],
    output_names: list[str] | None = None,
    *,
    graph_optimization_level=None,
    intra_op_num_threads: int | None = None,
    session_config: dict[str, str] | None = None,
    timeout: float | None = None,
    carry: dict[str, str] | None = None,
    reset: list[bool] | None = None,
) -> tuple[list[list[np.ndarray]], dict]:
    """Run ``model_path`` on each feed on an AVX2-only CPU; return (outputs, info).

    outputs[i] is the list of outputs of feed i (``output_names`` order, or the model's).
    ``carry`` streams a recurrent model's state: {output name: input name}, each such input of
    feed i is replaced by that output of feed i-1, except for the first feed and the feeds where
    ``reset[i]`` is true (a new stream: the feed's own value is used).
    By default the session is onnxruntime's default one (what a user gets); the keyword
    options change it (graph_optimization_level: a GraphOptimizationLevel name or int;
    session_config: add_session_config_entry pairs, e.g. {"session.x64quantprecision": "1"}).
    info: mode ('qemu' or 'native'), cpu (the command prefix), cpu_features (what the child's
    CPU reports), ort_version, seconds_wall (whole subprocess, with Python start-up),
    seconds_import, seconds_session, seconds_run (all feeds), seconds_per_feed (list).
    """
    reason = available()
    if reason is not None:
        raise RuntimeError(f"cannot run on an AVX2-only CPU: {reason}")
    with tempfile.TemporaryDirectory(prefix="amq_avx2_") as tmp:
        tmpd = Path(tmp)
        arrays, names = {}, []
        for i, feed in enumerate(feeds):
            names.append(list(feed))
            for j, (_, value) in enumerate(feed.items()):
                arrays[f"f{i}_{j}"] = np.asarray(value)
        np.savez(tmpd / "in.npz", **arrays)
        job = {
            "model": str(Path(model_path).resolve()),
            "names": names,
            "output_names": list(output_names) if output_names else None,
            "graph_optimization_level": graph_optimization_level,
            "intra_op_num_threads": intra_op_num_threads,
            "session_config": session_config or {},
            "carry": carry or {},
            "reset": [bool(r) for r in reset] if reset is not None else [],
            "expect_no_vnni": mode() == "qemu",
        }
        (tmpd / "job.json").write_text(json.dumps(job))
        cmd = command() + [str(Path(__file__).resolve()), "--child", str(tmpd)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            err = "\n".join(ln for ln in proc.stderr.splitlines() if _QEMU_NOISE not in ln)
            raise RuntimeError(
                f"AVX2 child failed (exit {proc.returncode}): {' '.join(cmd)}\n{err[-3000:]}"
            )
        info = json.loads((tmpd / "result.json").read_text())
        with np.load(tmpd / "out.npz") as z:
            outputs = [[z[f"o{i}_{k}"] for k in range(n)] for i, n in enumerate(info["n_outputs"])]
    info.update(mode=mode(), command=cmd[: cmd.index(str(Path(__file__).resolve()))])
    info["seconds_wall"] = wall
    del info["n_outputs"]
    return outputs, info


def run_avx2(
    model_path,
    feeds: list[dict[str, np.ndarray]],
    output_names: list[str] | None = None,
    **options,
) -> list[list[np.ndarray]]:
    """Outputs of ``model_path`` on each feed in a default onnxruntime session on an AVX2-only
    CPU (qemu-x86_64 -cpu Haswell on a VNNI host, natively otherwise). See run_avx2_info."""
    return run_avx2_info(model_path, feeds, output_names, **options)[0]


def _cpu_features() -> dict[str, bool]:
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as feats
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as feats
    return {k: bool(feats[k]) for k in _REPORTED if k in feats}


def _child(tmpd: Path) -> int:
    """Runs on the AVX2-only CPU: job.json + in.npz -> out.npz + result.json."""
    t0 = time.perf_counter()
    feats = _cpu_features()
    job = json.loads((tmpd / "job.json").read_text())
    if job["expect_no_vnni"] and (feats.get("AVX512VNNI") or feats.get("AVX_VNNI")):
        print(f"the emulated CPU still reports VNNI: {feats}", file=sys.stderr)
        return 3
    import onnxruntime as ort

    t1 = time.perf_counter()
    so = _session_options(
        ort, job["graph_optimization_level"], job["intra_op_num_threads"], job["session_config"]
    )
    sess = ort.InferenceSession(job["model"], so, providers=["CPUExecutionProvider"])
    t2 = time.perf_counter()
    with np.load(tmpd / "in.npz") as z:
        feeds = [
            {n: z[f"f{i}_{j}"] for j, n in enumerate(names)} for i, names in enumerate(job["names"])
        ]
    out_arrays, n_outputs, per_feed = {}, [], []
    out_names = job["output_names"] or [o.name for o in sess.get_outputs()]
    carry, reset, prev = job["carry"], job["reset"], None
    run_names = out_names + [n for n in carry if n not in out_names]
    for i, feed in enumerate(feeds):
        if carry and prev is not None and not (i < len(reset) and reset[i]):
            feed = {**feed, **{dst: prev[src] for src, dst in carry.items()}}
        s = time.perf_counter()
        outs = sess.run(run_names, feed)
        prev = dict(zip(run_names, outs, strict=True))
        outs = outs[: len(out_names)]
        per_feed.append(time.perf_counter() - s)
        n_outputs.append(len(outs))
        for k, o in enumerate(outs):
            out_arrays[f"o{i}_{k}"] = np.asarray(o)
    np.savez(tmpd / "out.npz", **out_arrays)
    result = {
        "n_outputs": n_outputs,
        "cpu_features": feats,
        "ort_version": ort.__version__,
        "seconds_import": t1 - t0,
        "seconds_session": t2 - t1,
        "seconds_run": float(sum(per_feed)),
        "seconds_per_feed": per_feed,
    }
    (tmpd / "result.json").write_text(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def _npy_feeds(model_path: str, npy: str, limit: int, input_name: str | None) -> list[dict]:
    import onnx

    if input_name is None:
        m = onnx.load(model_path, load_external_data=False)
        inits = {i.name for i in m.graph.initializer}
        inputs = [i.name for i in m.graph.input if i.name not in inits]
        if len(inputs) != 1:
            raise SystemExit(f"model has inputs {inputs}: pass --input NAME")
        input_name = inputs[0]
    data = np.load(npy, mmap_mode="r")[:limit]
    return [{input_name: np.ascontiguousarray(data[i : i + 1])} for i in range(len(data))]


def _real_feeds(key: str, limit: int):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import real_models

    m = real_models.MODELS[key]
    return m.find_model(), m.eval_inputs(limit)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", help="ONNX model to run")
    ap.add_argument("--check", action="store_true", help="print availability and CPU features")
    ap.add_argument("--npy", help="array split along axis 0 into one-sample feeds")
    ap.add_argument("--input", help="input name for --npy (default: the model's only input)")
    ap.add_argument("--real", help="feeds from bench/real_models.py (e.g. ocr_cls)")
    ap.add_argument("--limit", type=int, default=64, help="number of feeds (default 64)")
    ap.add_argument("--reference", help="float model: print output SQNR of MODEL against it")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(Path(args.child))

    reason = available()
    print(f"host VNNI flags: {', '.join(host_vnni_flags()) or 'none'}; mode: {mode()}")
    if reason is not None:
        print(f"NOT AVAILABLE: {reason}")
        return 2
    print(f"command: {' '.join(command())} <script>")
    if args.check:
        _, info = run_avx2_info(_tiny_model(), [{"x": np.ones((1, 4), np.float32)}])
        print(f"child CPU features: {info['cpu_features']}; onnxruntime {info['ort_version']}")
        print(f"start-up + import: {info['seconds_wall']:.1f} s wall")
        return 0
    if args.real:
        float_path, feeds = _real_feeds(args.real, args.limit)
        model = args.model or str(float_path)
    elif args.npy and args.model:
        model = args.model
        feeds = _npy_feeds(model, args.npy, args.limit, args.input)
    else:
        ap.error("give MODEL with --npy, or --real KEY (or --check)")

    outs, info = run_avx2_info(model, feeds)
    per = info["seconds_per_feed"]
    print(f"model: {model}; {len(feeds)} feeds; onnxruntime {info['ort_version']}")
    print(f"child CPU features: {info['cpu_features']}")
    print(
        f"AVX2 run: wall {info['seconds_wall']:.1f} s (import {info['seconds_import']:.1f} s, "
        f"session {info['seconds_session']:.1f} s, run {info['seconds_run']:.2f} s: "
        f"first feed {per[0]:.3f} s, median {float(np.median(per)):.3f} s/feed)"
    )
    t0 = time.perf_counter()
    native = run_native(model, feeds)
    t_native = time.perf_counter() - t0
    print(f"native default session (this process, incl. session): {t_native:.2f} s")
    if args.reference:
        import onnxruntime as ort

        names = [o.name for o in ort.InferenceSession(model).get_outputs()]
        ref = run_native(args.reference, feeds)
        ideal = run_native(model, feeds, graph_optimization_level="ORT_DISABLE_ALL")
        runs = {
            "(a) ideal Q/DQ (ORT_DISABLE_ALL, native)": ideal,
            "(b) native default session": native,
            f"(c) default session, AVX2-only CPU ({mode()})": outs,
        }
        floats = [
            k for k, v in enumerate(ref[0]) if np.issubdtype(np.asarray(v).dtype, np.floating)
        ]
        print(f"output SQNR dB vs {args.reference} ({len(feeds)} feeds), float outputs only:")
        print(f"  {'execution':<46}" + "".join(f" {names[k][:18]:>18}" for k in floats))
        for label, res in runs.items():
            cells = [sqnr_db([r[k] for r in ref], [q[k] for q in res]) for k in floats]
            print(f"  {label:<46}" + "".join(f" {c:18.2f}" for c in cells))
    return 0


def _tiny_model() -> str:
    """A one-node model (Relu) in a temp file, for --check."""
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    path = Path(tempfile.gettempdir()) / "amq_avx2_tiny.onnx"
    onnx.save(m, path)
    return str(path)


if __name__ == "__main__":
    sys.exit(main())
