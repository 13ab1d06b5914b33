"""The overflow guard's decisions, and on the bundled example the whole written model, do not
depend on the CPU amq runs on (DESIGN.md §6b): the same model, data and config give a
byte-identical QDQ model on a CPU of another kind, whose onnxruntime and numpy kernels round
floats differently. The other CPU is emulated by ``qemu-x86_64``: an AVX2-only Haswell where this
host has VNNI (onnxruntime's saturating int16 kernels: the guard's decisions), an SSE4.2-only
Nehalem where it has none (other float kernels again: bias corrections of 16-bit layers
differed between an AVX-512 Xeon and an AVX2 EPYC). Bias correction's shifts move with the float
kernels by about 2% (quant/algorithms/bias_correction.py): on larger models a few int32 bias
codes may differ by a step."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _avx2():
    spec = importlib.util.spec_from_file_location(
        "avx2_runtime", ROOT / "bench" / "avx2_runtime.py"
    )
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def _other_cpu() -> tuple[list[str], str]:
    """The command prefix of this Python on an emulated CPU of the other kind, and the ISA amq
    must see there (skips where no emulator is installed)."""
    avx2 = _avx2()
    if avx2.available() and avx2.mode() == "qemu":
        pytest.skip(avx2.available())
    qemu = avx2._qemu_binary()
    if avx2.mode() == "qemu":
        return avx2.command(), "avx2"
    if qemu is None:
        pytest.skip("no qemu-x86_64 to emulate an SSE-only CPU (apt-get install -y qemu-user)")
    return [qemu, "-cpu", "Nehalem", sys.executable], "sse"


@pytest.mark.parametrize("config", [None, "configs/int16.yaml"], ids=["int8", "int16"])
def test_quantize_gives_the_same_bytes_on_another_cpu(tmp_path, config):
    other, isa = _other_cpu()
    args = ["-m", "amq", "quantize", "examples/digits_cnn.onnx", "--calib", "calib_data/"]
    args += ["--no-cache", "-q", "--samples", "64"] + (["-c", config] if config else [])
    here = [sys.executable, *args, "-o", str(tmp_path / "here.onnx")]
    there = [*other, *args, "-o", str(tmp_path / "there.onnx")]
    for cmd in (here, there):
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
    probe = subprocess.run(
        [*other, "-c", "from amq.runtime import cpu_isa; print(cpu_isa().name)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert probe.stdout.strip() == isa  # the second run really was on the other CPU
    a, b = (tmp_path / "here.onnx").read_bytes(), (tmp_path / "there.onnx").read_bytes()
    assert a == b
    qa = (tmp_path / "here.qparams.json").read_text()
    assert qa == (tmp_path / "there.qparams.json").read_text()
    if config is None:  # the guard's decision, whichever CPU took it
        assert '"overflow": "guard"' in qa
