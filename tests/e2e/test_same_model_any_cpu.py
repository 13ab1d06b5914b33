"""The overflow guard's decisions never depend on the CPU amq runs on (DESIGN.md §6b): the same
model, data and config give a byte-identical QDQ model on a VNNI CPU and on an AVX2-only one
(onnxruntime's AVX2 kernels under ``qemu-x86_64 -cpu Haswell`` when this host has VNNI)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from amq import runtime

ROOT = Path(__file__).resolve().parents[2]


def _avx2():
    spec = importlib.util.spec_from_file_location(
        "avx2_runtime", ROOT / "bench" / "avx2_runtime.py"
    )
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def test_quantize_gives_the_same_bytes_on_a_cpu_without_vnni(tmp_path):
    if runtime.cpu_isa().saturates:
        pytest.skip("this CPU has no VNNI and no VNNI CPU can be emulated here: nothing to compare")
    avx2 = _avx2()
    why = avx2.available()
    if why:
        pytest.skip(why)
    args = ["-m", "amq", "quantize", "examples/digits_cnn.onnx", "--calib", "calib_data/"]
    args += ["--no-cache", "-q", "--samples", "64"]
    here = [sys.executable, *args, "-o", str(tmp_path / "vnni.onnx")]
    there = [*avx2.command(), *args, "-o", str(tmp_path / "avx2.onnx")]
    for cmd in (here, there):
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
    probe = subprocess.run(
        [*avx2.command(), "-c", "from amq.runtime import cpu_isa; print(cpu_isa().name)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert probe.stdout.strip() == "avx2"  # the second run really was on an AVX2-only CPU
    a, b = (tmp_path / "vnni.onnx").read_bytes(), (tmp_path / "avx2.onnx").read_bytes()
    assert a == b
    qa = (tmp_path / "vnni.qparams.json").read_text()
    assert qa == (tmp_path / "avx2.qparams.json").read_text() and '"overflow": "guard"' in qa
