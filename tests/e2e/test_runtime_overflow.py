"""PITFALLS 9 / DESIGN §6b end to end: on an x86 CPU with AVX2 but no VNNI, onnxruntime's uint8 x
int8 kernels saturate int16 pair sums. With the overflow guard on (the default), every INT8 model
amq writes must run there as well as its ideal Q/DQ math says; with it off, the bundled example
must visibly lose accuracy there (so the first test can fail), and the emulation that decides the
guard must see the saturation that the real kernels show.

The real kernels run natively when this CPU lacks VNNI (amq.runtime.cpu_isa().saturates), else in
one subprocess under ``qemu-x86_64 -cpu Haswell`` (bench/avx2_runtime.py gives the command), else
the tests that need them skip. The emulation test runs everywhere. Besides tests/models.py's
registry, test_if_branches.py's rnn_loop runs too: a known miss of the guard (KNOWN, strict xfail).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import amq
from amq import runtime
from amq.config import Config, with_overrides
from amq.quant import overflow
from amq.runtime import Execution
from tests import models as M
from tests.e2e.test_if_branches import _mixed, rnn_loop

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "digits_cnn.onnx"
CALIB = ROOT / "calib_data" / "input.npy"
STEM = "/stem/conv/Conv"
EXAMPLE_NAMES = ("example", "example_overflow_off")
# Known to fail (report numbers, fix in amq, then drop the entry: the xfail is strict).
# rnn_loop: the guard decides on the first GUARD_SAMPLES (64) calibration samples
# (amq/calib/saturation.py); the Loop output h_T that /head/MatMul reads reaches code 255 only on
# later samples, so that layer is left unguarded: on the AVX2 kernels 21.7 dB against 35.4 dB
# ideal (calibration feeds, measured with 16), 18.0 against 30.7 on held-out ones. With all 256
# samples it is guarded and both give 35.5 dB.
# (batched_matmul_weight, fixed: onnxruntime 1.20 runs batched MatMul weights on u8s8 kernels
# per expert slice, and the emulation now covers them: 1.1% of fc1's outputs saturate, guarded.)
ORT = tuple(int(p) for p in ort.__version__.split(".")[:2])
KNOWN = {
    "rnn_loop": (
        True,
        "the guard's emulation reads 64 calibration samples: misses rare later saturation",
    ),
}


def _name(n: str):
    if n not in KNOWN:
        return n
    cond, reason = KNOWN[n]
    return pytest.param(n, marks=pytest.mark.xfail(cond, reason=reason, strict=True))


NAMES = [_name(n) for n in ["example", *M.MODELS, "rnn_loop"]]
GAP_DB = 1.0  # runtime SQNR at most this far below the ideal one, with the guard (<= 0.16 today)
OFF_GAP_DB = 10.0  # without it, the example loses at least this much (37.1 -> 12.3 dB today)
NO_AVX2 = "no CPU without VNNI and no qemu-x86_64 to emulate one"
QEMU_TIMEOUT_S = 600


def _avx2_runtime():
    spec = importlib.util.spec_from_file_location(
        "amq_bench_avx2_runtime", ROOT / "bench" / "avx2_runtime.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# The child, on the AVX2-only CPU: each job's model in a default session (amq's runtime execution)
# on its feeds. It checks the CPU with numpy's CPUID dispatch, as bench/avx2_runtime.py does:
# importing amq there would cost ~20 s of emulated start-up.
CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as cpu
    except ImportError:
        from numpy.core._multiarray_umath import __cpu_features__ as cpu
    if not cpu.get("AVX2") or cpu.get("AVX512VNNI") or cpu.get("AVX_VNNI"):
        sys.exit(f"the child's CPU is not AVX2 without VNNI: {cpu}")
    import onnxruntime as ort
    tmp = sys.argv[1]
    jobs = json.load(open(f"{tmp}/jobs.json"))
    feeds = np.load(f"{tmp}/in.npz")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    outs = {}
    for j, job in enumerate(jobs):
        sess = ort.InferenceSession(job["model"], so, providers=["CPUExecutionProvider"])
        for i, names in enumerate(job["feeds"]):
            feed = {n: feeds[f"{j}_{i}_{k}"] for k, n in enumerate(names)}
            res = sess.run(None, feed)  # an output may be a graph input: copy while feed lives
            outs.update({f"{j}_{i}_{k}": np.array(o, copy=True) for k, o in enumerate(res)})
    np.savez(f"{tmp}/out.npz", **outs)
    """
)


def _avx2_command() -> list[str] | None:
    """None: this CPU's own kernels saturate (run in-process). Else the command prefix that
    starts Python on an emulated AVX2-only CPU; skips when there is none."""
    if runtime.cpu_isa().saturates:
        return None
    avx2 = _avx2_runtime()
    old = os.environ.get("AMQ_AVX2_FORCE_QEMU")
    os.environ["AMQ_AVX2_FORCE_QEMU"] = "1"  # also an x86 without VNNI or AVX2: emulate one
    try:
        reason = avx2.available()
        if reason is not None:
            pytest.skip(f"{NO_AVX2} ({reason})")
        return avx2.command()
    finally:
        if old is None:
            del os.environ["AMQ_AVX2_FORCE_QEMU"]
        else:
            os.environ["AMQ_AVX2_FORCE_QEMU"] = old


def _run_avx2(
    jobs: list[tuple[Path, list[dict[str, np.ndarray]]]], tmp: Path, cmd: list[str] | None
) -> list[list]:
    """outputs[job][feed] (list of arrays) of each job's model in a runtime session on an
    AVX2-only CPU: in this process when ``cmd`` is None (this CPU is one), else all jobs in one
    process started by ``cmd`` (qemu)."""
    if cmd is None:
        out = []
        for path, feeds in jobs:
            sess = runtime.session_for(path, Execution.RUNTIME)
            out.append([sess.run(None, f) for f in feeds])
        return out
    arrays = {
        f"{j}_{i}_{k}": np.asarray(v)
        for j, (_, feeds) in enumerate(jobs)
        for i, feed in enumerate(feeds)
        for k, v in enumerate(feed.values())
    }
    np.savez(tmp / "in.npz", **arrays)
    spec = [{"model": str(p), "feeds": [list(f) for f in feeds]} for p, feeds in jobs]
    (tmp / "jobs.json").write_text(json.dumps(spec))
    proc = subprocess.run(
        [*cmd, "-c", CHILD, str(tmp)],
        capture_output=True,
        text=True,
        timeout=QEMU_TIMEOUT_S,
    )
    noise = "TCG doesn't support requested feature"
    err = "\n".join(ln for ln in proc.stderr.splitlines() if noise not in ln)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{err[-3000:]}"
    with np.load(tmp / "out.npz") as z:
        return [
            [[z[f"{j}_{i}_{k}"] for k in range(_count(z, j, i))] for i in range(len(feeds))]
            for j, (_, feeds) in enumerate(jobs)
        ]


def _count(z, j: int, i: int) -> int:
    k = 0
    while f"{j}_{i}_{k}" in z.files:
        k += 1
    return k


def sqnr_db(ref: list[list[np.ndarray]], test: list[list[np.ndarray]]) -> float:
    """Output SQNR over every float output of every feed."""
    r = np.concatenate([np.ravel(o) for outs in ref for o in outs]).astype(np.float64)
    t = np.concatenate([np.ravel(o) for outs in test for o in outs]).astype(np.float64)
    noise = float(np.sum((r - t) ** 2))
    return math.inf if noise == 0 else 10 * math.log10(float(np.sum(r * r)) / noise)


def _float_outputs(outs: list[list[np.ndarray]], keep: list[int]) -> list[list[np.ndarray]]:
    return [[o[k] for k in keep] for o in outs]


@functools.cache
def _example(overflow_off: bool = False) -> amq.api.QuantizeResult:
    """The bundled example quantized with the defaults (overflow: auto), or with overflow off."""
    cfg = Config()
    if overflow_off:
        cfg = with_overrides(cfg, weights={"overflow": "off"})
    return amq.quantize(EXAMPLE, CALIB.parent, cfg, cache_dir=None)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> dict[str, dict]:
    """name -> model path, calibration feeds, float and ideal outputs, guarded layers."""
    tmp = tmp_path_factory.mktemp("runtime-overflow")
    x = np.load(CALIB)
    built = {
        "example": (EXAMPLE, [{"input": x}]),
        "example_overflow_off": (EXAMPLE, [{"input": x}]),
    }
    for name in M.MODELS:
        model, calib, _ = M.build(name)
        built[name] = (model, calib)
    built["rnn_loop"] = (rnn_loop(), _mixed(256, 1))  # tests/e2e/test_if_branches.py
    out = {}
    for name, (model, feeds) in built.items():
        if name in EXAMPLE_NAMES:
            r = _example(overflow_off=name == "example_overflow_off")
        else:
            r = amq.quantize(model, feeds, Config(), cache_dir=None)
        path = tmp / f"{name}.onnx"
        onnx.save(r.model, path)
        ref = runtime.session_for(model, Execution.RUNTIME)
        floats = [
            k
            for k, o in enumerate(ref.get_outputs())
            if o.type in ("tensor(float)", "tensor(double)", "tensor(float16)")
        ]
        ideal = runtime.session_for(r.model, Execution.IDEAL)
        out[name] = {
            "path": path,
            "feeds": feeds,
            "floats": floats,
            "ref": _float_outputs([ref.run(None, f) for f in feeds], floats),
            "ideal": _float_outputs([ideal.run(None, f) for f in feeds], floats),
            "guarded": dict(r.summary.guarded),
        }
    return out


@pytest.fixture(scope="module")
def avx2_command() -> list[str] | None:
    """How to reach an AVX2-only CPU (see _avx2_command); skips before anything is quantized."""
    return _avx2_command()


@pytest.fixture(scope="module")
def avx2_outputs(avx2_command, quantized, tmp_path_factory) -> dict[str, list[list[np.ndarray]]]:
    """Each quantized model's float outputs on its calibration feeds, on the real AVX2 kernels."""
    names = list(quantized)
    jobs = [(quantized[n]["path"], quantized[n]["feeds"]) for n in names]
    outs = _run_avx2(jobs, tmp_path_factory.mktemp("avx2"), avx2_command)
    return {n: _float_outputs(o, quantized[n]["floats"]) for n, o in zip(names, outs, strict=True)}


@pytest.mark.parametrize("name", NAMES)
def test_guarded_int8_runs_on_avx2_as_its_ideal_math(name, quantized, avx2_outputs):
    q = quantized[name]
    ideal = sqnr_db(q["ref"], q["ideal"])
    avx2 = sqnr_db(q["ref"], avx2_outputs[name])
    assert math.isinf(ideal) or ideal > 20.0, f"{name}: ideal {ideal:.2f} dB: a broken model"
    assert avx2 >= min(ideal, 100.0) - GAP_DB, (
        f"{name}: {avx2:.2f} dB on the AVX2 kernels, {ideal:.2f} dB ideal "
        f"(guarded: {sorted(q['guarded'])})"
    )


def test_example_without_the_guard_saturates_on_avx2(quantized, avx2_outputs):
    """The check above can fail: the same example with overflow off loses > 10 dB there."""
    q = quantized["example_overflow_off"]
    assert not q["guarded"]
    assert STEM in quantized["example"]["guarded"]
    ideal = sqnr_db(q["ref"], q["ideal"])
    avx2 = sqnr_db(q["ref"], avx2_outputs["example_overflow_off"])
    assert ideal > 30.0
    assert ideal - avx2 > OFF_GAP_DB, f"ideal {ideal:.2f} dB, AVX2 {avx2:.2f} dB"


# ---------------------------------------------------------------------------------------------
# The emulation, on any machine


def _init(model: onnx.ModelProto, name: str) -> np.ndarray:
    (t,) = [t for t in model.graph.initializer if t.name == name]
    return numpy_helper.to_array(t)


def _stem_codes(model: onnx.ModelProto, x: np.ndarray) -> dict:
    """The stem conv's input codes (as the model's QuantizeLinear makes them), its weight codes
    (zero point subtracted) and geometry, read from the QDQ model."""
    producer = {o: n for n in model.graph.node for o in n.output}
    (conv,) = [n for n in model.graph.node if n.name == STEM]
    dq_x, dq_w = producer[conv.input[0]], producer[conv.input[1]]
    assert dq_x.op_type == dq_w.op_type == "DequantizeLinear"
    q_x = producer[dq_x.input[0]]
    assert q_x.op_type == "QuantizeLinear" and q_x.input[0] == "input"
    scale, zp = float(_init(model, q_x.input[1])), _init(model, q_x.input[2])
    info = np.iinfo(zp.dtype)
    codes = np.clip(np.rint(x / np.float32(scale)) + int(zp), info.min, info.max)
    wq = _init(model, dq_w.input[0])
    wzp = _init(model, dq_w.input[2]) if len(dq_w.input) > 2 else np.zeros((), wq.dtype)
    w = wq.astype(np.int64) - wzp.astype(np.int64).reshape((-1,) + (1,) * (wq.ndim - 1))
    attrs = {a.name: list(a.ints) if a.ints else a.i for a in conv.attribute}
    return {
        "x_codes": codes.astype(np.int64),
        "x_zero_point": int(zp),
        "w_codes": w,
        "signed": zp.dtype == np.int8,
        "weights_unsigned": wq.dtype == np.uint8,
        "group": int(attrs.get("group", 1)),
        "strides": attrs.get("strides"),
        "pads": attrs.get("pads"),
        "dilations": attrs.get("dilations"),
    }


def _exact_conv(c: dict) -> np.ndarray:
    """The int64 accumulators [N, Cout, H, W] of the stem conv, without any saturation."""
    assert c["group"] == 1 and set(c["dilations"] or [1]) == {1}
    x = c["x_codes"] - c["x_zero_point"]  # padded positions hold the zero point: 0 here
    p = c["pads"] or [0, 0, 0, 0]
    x = np.pad(x, ((0, 0), (0, 0), (p[0], p[2]), (p[1], p[3])))
    w = c["w_codes"]
    kh, kw = w.shape[2:]
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
    sh, sw = c["strides"] or [1, 1]
    win = win[:, :, ::sh, ::sw]
    return np.einsum("nchwij,ocij->nohw", win, w)


@pytest.mark.parametrize("overflow_off", [True, False], ids=["overflow-off", "guarded"])
def test_emulation_sees_the_stem_saturate_only_without_the_guard(overflow_off):
    r = _example(overflow_off)
    c = _stem_codes(r.model, np.load(CALIB))
    acc = overflow.conv_accumulators(
        c["x_codes"],
        c["x_zero_point"],
        c["w_codes"],
        signed=c["signed"],
        weights_unsigned=c["weights_unsigned"],
        group=c["group"],
        strides=c["strides"],
        pads=c["pads"],
        dilations=c["dilations"],
    )
    exact = _exact_conv(c)
    assert acc.shape == exact.shape
    lost = int((acc != exact).sum())
    if overflow_off:
        assert STEM not in r.summary.guarded
        assert lost > 0, "overflow off: the emulation sees no saturation in the stem"
    else:
        assert STEM in r.summary.guarded
        assert lost == 0, f"guarded: {lost} stem accumulators still saturate"
