"""How a model is executed (DESIGN.md §6b): ideal Q/DQ math or this CPU's integer kernels.

The same QDQ model gives different numbers on different CPUs. With graph optimizations off,
onnxruntime evaluates every QuantizeLinear/DequantizeLinear and the float op between them: the
**ideal** math, the same on every machine. With them on (a default session, what a deployment
runs), it fuses Q/DQ into integer kernels: the **runtime**. On x86 with AVX2 but no VNNI those
kernels add each pair of uint8 x int8 products into a saturating int16 (VPMADDUBSW), so the
runtime can lose what the ideal math keeps; with VNNI (VPDPBUSD) they add into int32 and match.

This module names the two executions, creates every onnxruntime session amq uses, and tells which
instruction set this CPU's kernels use. The ISA comes from the CPUID instruction itself (numpy's
dispatcher, and leaf 7.1 for AVX-VNNI read directly), not from /proc/cpuinfo, so it is right under
an emulator (``qemu-x86_64 -cpu Haswell`` runs the AVX2 kernels on a VNNI host) too.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import platform
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np
import onnx
import onnxruntime as ort

from amq.errors import ModelError

TWO_GB = 2**31 - 1


class Execution(str, Enum):
    """IDEAL: Q/DQ evaluated in float (graph optimizations off), identical on every machine.
    RUNTIME: a default session, this CPU's integer kernels."""

    IDEAL = "ideal"
    RUNTIME = "runtime"


@dataclass(frozen=True)
class Isa:
    """The instruction set onnxruntime's 8-bit kernels use on this CPU."""

    name: str  # avx512-vnni | avx-vnni | avx512 | avx2 | sse | arm64 | <machine>
    saturates: bool  # uint8 x int8 pair sums saturate in int16 (x86 AVX2/AVX-512 without VNNI)

    def describe(self) -> str:
        if self.saturates:
            return f"{self.name} (no VNNI: uint8 x int8 pair sums saturate in int16)"
        return self.name


def _cpuid_leaf7_1_eax() -> int | None:
    """EAX of CPUID leaf 7, sub-leaf 1 (bit 4: AVX-VNNI), by running the instruction from an
    executable page; None where that cannot be done."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    # push rbx; mov eax,7; mov ecx,1; cpuid; pop rbx; ret
    code = b"\x53\xb8\x07\x00\x00\x00\xb9\x01\x00\x00\x00\x0f\xa2\x5b\xc3"
    try:
        buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, ValueError, AttributeError):
        return None
    try:
        buf.write(code)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        fn = ctypes.CFUNCTYPE(ctypes.c_uint32)(addr)
        value = int(fn())
        del fn
        return value
    except Exception:  # pragma: no cover - hardened kernels refuse executable pages
        return None
    finally:
        try:
            buf.close()
        except BufferError:  # pragma: no cover - a view still alive; the page is freed at exit
            pass


def _proc_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=1)
def cpu_isa() -> Isa:
    """This CPU's 8-bit kernel ISA. ``AMQ_ISA`` overrides the name (for a report made elsewhere)."""
    forced = os.environ.get("AMQ_ISA")
    if forced:
        return Isa(forced, forced in ("avx2", "avx512"))
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64"):
        return Isa("arm64", False)
    if machine not in ("x86_64", "amd64", "i386", "i686"):
        return Isa(machine or "unknown", False)
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as feats
    except ImportError:  # pragma: no cover - numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as feats
    eax = _cpuid_leaf7_1_eax()
    if eax is None:  # no CPUID of our own: the kernel's view (wrong only under an emulator)
        avx_vnni = "avx_vnni" in _proc_flags()
    else:
        avx_vnni = bool(eax & (1 << 4))
    if feats.get("AVX512VNNI"):
        return Isa("avx512-vnni", False)
    if avx_vnni and feats.get("AVX2"):
        return Isa("avx-vnni", False)
    if feats.get("AVX512BW"):
        return Isa("avx512", True)
    if feats.get("AVX2"):
        return Isa("avx2", True)
    return Isa("sse", False)


class SharedWeights:
    """Float initializers handed to many sessions without serializing them again: each session
    gets the same OrtValues (add_external_initializers) and its model carries only stubs. For
    sensitivity and search, where every trial is the same big model with a few layers changed."""

    STUB_LOCATION = "amq-shared-weights"

    def __init__(self, model: onnx.ModelProto) -> None:
        from onnx import numpy_helper

        self.arrays: dict[str, np.ndarray] = {}
        self.values: dict[str, ort.OrtValue] = {}
        for t in model.graph.initializer:
            if _shareable(t):
                a = np.ascontiguousarray(numpy_helper.to_array(t))
                self.arrays[t.name] = a  # keeps the buffer the OrtValue points at alive
                self.values[t.name] = ort.OrtValue.ortvalue_from_numpy(a)

    def shell(self, model: onnx.ModelProto | Exposed) -> tuple[onnx.ModelProto, list[str]]:
        """The model with its copies of the shared initializers as external stubs, and their
        names; ``model`` is left as it is and its weights are not copied (only its nodes and
        the other tensors are): a copy then a strip cost a transformer both a copy of its
        weights and a serialization (paraphrase-MiniLM-L3: 66 MB, a session 0.20 -> 0.10 s)."""
        base = model.model if isinstance(model, Exposed) else model
        out = onnx.ModelProto()
        _copy_fields(base, out, skip="graph")
        _copy_fields(base.graph, out.graph, skip="initializer")
        used = []
        for t in base.graph.initializer:
            a = self.arrays.get(t.name)
            if a is None or tuple(t.dims) != a.shape or t.data_type != onnx.TensorProto.FLOAT:
                out.graph.initializer.append(t)
                continue
            stub = out.graph.initializer.add(name=t.name, data_type=t.data_type)
            stub.dims.extend(t.dims)
            stub.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (
                ("location", self.STUB_LOCATION),
                ("offset", "0"),
                ("length", str(a.nbytes)),
            ):
                e = stub.external_data.add()
                e.key, e.value = k, v
            used.append(t.name)
        if isinstance(model, Exposed):
            out.graph.output.extend(model.outputs())
        return out, used

    @staticmethod
    def worth(model: onnx.ModelProto | Exposed) -> bool:
        """Whether a session of ``model`` should take its float weights as shared buffers: where
        they hold at least SHARE_BYTES (a small model's serialization costs less than the
        buffers)."""
        base = model.model if isinstance(model, Exposed) else model
        total = 0
        for t in base.graph.initializer:
            if _shareable(t):
                total += 4 * int(np.prod(t.dims))
                if total >= SHARE_BYTES:
                    return True
        return False


SHARE_BYTES = 16 << 20  # float weights from which a session takes them as shared buffers


def _shareable(t: onnx.TensorProto) -> bool:
    """A float initializer of at least 1024 values held in the model (not external data)."""
    return (
        t.data_type == onnx.TensorProto.FLOAT
        and int(np.prod(t.dims)) >= 1024
        and t.data_location != onnx.TensorProto.EXTERNAL
    )


def _copy_fields(src, dst, skip: str) -> None:
    """Every field set in message ``src`` but ``skip``, into the empty message ``dst``."""
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        repeated = getattr(field, "is_repeated", None)
        if repeated is None:  # protobuf < 5.28
            repeated = field.label == field.LABEL_REPEATED
        if repeated:
            getattr(dst, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


@dataclass(frozen=True)
class Exposed:
    """A model that also outputs ``names``, for a session, without copying it: serialized as
    the model's bytes followed by a patch holding only the extra graph outputs (a protobuf
    parser merges a message field met twice, appending the repeated ones). A copy held a
    transformer's weights twice while its session was built (0.4 GB on all-mpnet-base-v2)."""

    model: onnx.ModelProto
    names: Sequence[str]

    def outputs(self) -> list[onnx.ValueInfoProto]:
        """The graph outputs to append: ``names`` not outputs already, each once."""
        existing = {o.name for o in self.model.graph.output}
        return [onnx.ValueInfoProto(name=n) for n in dict.fromkeys(self.names) if n not in existing]

    def serialized(self) -> bytes:
        """The exposed model's bytes (ValueError over protobuf's 2 GB, as SerializeToString)."""
        patch = onnx.ModelProto()
        patch.graph.output.extend(self.outputs())
        return self.model.SerializeToString() + patch.SerializeToString()

    def proto(self) -> onnx.ModelProto:
        """The exposed model as a copy (graph.edit.expose_outputs)."""
        out = onnx.ModelProto()
        out.CopyFrom(self.model)
        out.graph.output.extend(self.outputs())
        return out


PROVIDERS = ["CPUExecutionProvider"]  # amq's sessions run on the CPU


def session(
    model: onnx.ModelProto | Exposed | bytes | str | os.PathLike[str],
    optimize: bool = True,
    optimized_path: str | None = None,
    source: str = "model",
    shared: SharedWeights | None = None,
    early_reads: bool = False,
    qdq_fusion: bool = True,
    arena: bool = False,
) -> ort.InferenceSession:
    """An onnxruntime CPU session for a ModelProto or an Exposed one (external data written to a
    temp dir when the model is over 2 GB), a serialized model or a path. ``optimize``: False for
    the ideal execution (every Q/DQ and float op run as written), True for the runtime one.
    ``shared``: float weights to take from the shared OrtValues (the model is not modified);
    a model with SHARE_BYTES of float weights or more shares its own (SharedWeights.worth).
    ``early_reads``: onnxruntime's priority-based node order, which runs a node soon after its
    input is ready - for the calibration graph, whose many small reductions otherwise run late and
    keep every observed tensor alive (PP-OCR det at batch 16: 7.6 GB and 5.7 s for a first run,
    against 1.2 GB and 1.2 s). ``qdq_fusion``: False keeps Q/DQ pairs out of onnxruntime's
    integer-kernel fusions while the float ops are optimized (Q/DQ math, float speed).
    ``arena``: onnxruntime's CPU memory arena, which it keeps by default but which grows by
    powers of two and never shrinks (PP-OCR det's calibration: 1.59 GB with it, 0.81 GB without,
    no slower; PP-OCR rec 655 -> 578 MB): on only for timing what a default session would do."""
    # the heap that earlier sessions and passes freed goes back first: glibc keeps what
    # onnxruntime's threads freed in their arenas, and a session built on top of it adds its
    # weights to that (all-mpnet-base-v2: 1.97 GB resident after the overflow check, about 0.6
    # GB of it in use)
    release_free_memory()
    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = arena
    if not qdq_fusion:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    so.log_severity_level = 3
    if early_reads:
        so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    try:
        return _load(model, so, shared)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{source}: onnxruntime cannot load it: {msg[:300]}") from None


def _load(model, so: ort.SessionOptions, shared: SharedWeights | None) -> ort.InferenceSession:
    """session's model, of any kind it takes, into onnxruntime: bytes in one pass where protobuf
    can hold them, else through a temporary copy with external data. A model with many float
    weights hands them over as shared buffers (SharedWeights.worth), ``shared`` or its own."""
    if isinstance(model, (onnx.ModelProto, Exposed)):
        if shared is None and SharedWeights.worth(model):
            shared = SharedWeights(model.model if isinstance(model, Exposed) else model)
        if shared is not None:
            model, names = shared.shell(model)
            if names:
                so.add_external_initializers(names, [shared.values[n] for n in names])
    if isinstance(model, (onnx.ModelProto, Exposed)):
        data = serialized(model)
        if data is None:
            return _load_large(model if isinstance(model, onnx.ModelProto) else model.proto(), so)
        model = data
    if isinstance(model, bytes):
        return ort.InferenceSession(model, so, providers=PROVIDERS)
    return ort.InferenceSession(os.fspath(model), so, providers=PROVIDERS)


def _load_large(model: onnx.ModelProto, so: ort.SessionOptions) -> ort.InferenceSession:
    """Over 2 GB: through a temporary copy with external data, removed once onnxruntime has
    read it (it was left behind, a copy of the whole model per session)."""
    tmp = tempfile.mkdtemp(prefix="amq-")
    try:
        path = os.path.join(tmp, "model.onnx")
        onnx.save(model, path, save_as_external_data=True, location="model.data")
        return ort.InferenceSession(path, so, providers=PROVIDERS)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def serialized(model: onnx.ModelProto | Exposed) -> bytes | None:
    """The model's bytes in one pass (a session's input), or None where protobuf cannot hold
    them (2 GB)."""
    try:
        data = (
            model.SerializeToString() if isinstance(model, onnx.ModelProto) else model.serialized()
        )
    except ValueError:
        return None
    return data if len(data) < TWO_GB else None


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Give the C heap's free memory back to the system (glibc's malloc_trim): with
    onnxruntime's arena off, glibc keeps what a run freed, and the process's resident size grew
    pass after pass (PP-OCR det: 0.53 -> 0.79 GB across the calibration pass alone). False where
    there is no glibc."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def off_heap(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """A zeroed array in an anonymous mapping of its own, outside malloc's heap. For arrays kept
    across passes: one in the heap pins the pages around it, between the transient arrays of
    those passes, which malloc_trim then cannot give back (glibc trims free pages, not used
    ones); a mapping goes back whole when the array is freed."""
    n = int(np.prod(shape, dtype=np.int64))
    size = n * np.dtype(dtype).itemsize
    return np.frombuffer(mmap.mmap(-1, max(size, 1)), dtype=dtype, count=n).reshape(shape)


def session_for(
    model: onnx.ModelProto | Exposed | bytes | str | os.PathLike[str],
    execution: Execution | str,
    source: str = "model",
    **kwargs,
) -> ort.InferenceSession:
    """A session that runs ``model`` the named way (ideal or runtime)."""
    return session(
        model, optimize=Execution(execution) == Execution.RUNTIME, source=source, **kwargs
    )


def time_sessions(
    sessions: list[ort.InferenceSession],
    feeds: list[dict[str, np.ndarray]],
    min_repeats: int = 7,
    min_seconds: float = 1.0,
    max_repeats: int = 200,
) -> np.ndarray:
    """Inference time of several sessions on the same batches, measured side by side: after one
    untimed pass each, passes are interleaved (A, B, A, B, ...) so that a noisy machine slows
    them alike, repeated until ``min_seconds`` have passed (at least ``min_repeats``). Returns
    seconds per pass, [repeats, sessions]; compare sessions by the ratio within each repeat."""
    import time

    for s in sessions:
        for f in feeds:
            s.run(None, f)
    rows: list[list[float]] = []
    start = time.perf_counter()
    while len(rows) < max_repeats and (
        len(rows) < min_repeats or time.perf_counter() - start < min_seconds
    ):
        row = []
        for s in sessions:
            t0 = time.perf_counter()
            for f in feeds:
                s.run(None, f)
            row.append(time.perf_counter() - t0)
        rows.append(row)
    return np.asarray(rows)
