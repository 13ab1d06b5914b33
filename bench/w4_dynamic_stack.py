"""Block-wise W4 and dynamic activations against static INT8 and float on a synthetic transformer
stack: model size, speed (ratios measured interleaved in one process, runtime.time_sessions) and
output cosine / SQNR against float, on the ideal math and on this CPU's kernels.

The stack: 6 encoder layers, hidden 384, FFN 1536 (MiniLM-sized), single-head attention:
x -> LayerNorm(x + O(softmax(Q K^T / sqrt(d)) V)) -> LayerNorm(h + W2 gelu(W1 h + b1) + b2).
Weights are random with a few wide output channels; inputs random [B, S, 384]. Everything is
built here (nothing downloaded).

Usage: PYTHONPATH=$PWD python bench/w4_dynamic_stack.py [--layers 6] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import amq
from amq.analysis.bitops import bitops
from amq.config import config_from_dict
from amq.runtime import Execution, session_for, time_sessions

D, F = 384, 1536


def _w(rng: np.random.Generator, k: int, n: int) -> np.ndarray:
    w = rng.standard_normal((k, n)) / np.sqrt(k)
    w[:, rng.choice(n, 4, replace=False)] *= 6.0  # a few wide output channels
    return w.astype(np.float32)


def build(layers: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def init(name: str, v: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(v, np.float32), name))
        return name

    def node(op: str, ins: list[str], out: str, **kw) -> str:
        nodes.append(helper.make_node(op, ins, [out], name=f"/{out}/{op}", **kw))
        return out

    init("scale", np.float32(1 / np.sqrt(D)))
    init("half", np.float32(0.5))
    init("one", np.float32(1.0))
    init("rsqrt2", np.float32(1 / np.sqrt(2)))
    x = "x"
    for i in range(layers):
        p = f"l{i}"
        init(f"{p}.g", np.ones(D))
        init(f"{p}.b", np.zeros(D))
        q = node("MatMul", [x, init(f"{p}.wq", _w(rng, D, D))], f"{p}.q")
        k = node("MatMul", [x, init(f"{p}.wk", _w(rng, D, D))], f"{p}.k")
        v = node("MatMul", [x, init(f"{p}.wv", _w(rng, D, D))], f"{p}.v")
        kt = node("Transpose", [k], f"{p}.kt", perm=[0, 2, 1])
        s = node("MatMul", [q, kt], f"{p}.s")
        s = node("Mul", [s, "scale"], f"{p}.ss")
        a = node("Softmax", [s], f"{p}.a", axis=-1)
        c = node("MatMul", [a, v], f"{p}.c")
        o = node("MatMul", [c, init(f"{p}.wo", _w(rng, D, D))], f"{p}.o")
        h = node("Add", [x, o], f"{p}.r1")
        h = node("LayerNormalization", [h, f"{p}.g", f"{p}.b"], f"{p}.ln1", axis=-1)
        u = node("MatMul", [h, init(f"{p}.w1", _w(rng, D, F))], f"{p}.u")
        u = node("Add", [u, init(f"{p}.b1", rng.standard_normal(F) * 0.1)], f"{p}.ub")
        e = node("Mul", [u, "rsqrt2"], f"{p}.e0")  # gelu (erf form, fused by onnxruntime)
        e = node("Erf", [e], f"{p}.e1")
        e = node("Add", [e, "one"], f"{p}.e2")
        e = node("Mul", [u, e], f"{p}.e3")
        e = node("Mul", [e, "half"], f"{p}.gelu")
        dn = node("MatMul", [e, init(f"{p}.w2", _w(rng, F, D))], f"{p}.d")
        dn = node("Add", [dn, init(f"{p}.b2", rng.standard_normal(D) * 0.1)], f"{p}.db")
        h = node("Add", [h, dn], f"{p}.r2")
        x = node("LayerNormalization", [h, f"{p}.g", f"{p}.b"], f"{p}.ln2", axis=-1)
    g = helper.make_graph(
        nodes,
        "stack",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", D])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["B", "S", D])],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


CONFIGS = {
    "int8 static (default)": {},
    "int8 dynamic (MatMul/Gemm)": {"activations": {"dynamic": True}},
    "W4 block 32 (MatMul)": {"weights": {"bits": 4, "block_size": 32}},
    "W4 block 128 (MatMul)": {"weights": {"bits": 4, "block_size": 128}},
}


def _metrics(ref: list[np.ndarray], out: list[np.ndarray]) -> tuple[float, float]:
    a = np.concatenate([r.reshape(-1) for r in ref]).astype(np.float64)
    b = np.concatenate([o.reshape(-1) for o in out]).astype(np.float64)
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    sqnr = float(10 * np.log10((a @ a) / max(((a - b) ** 2).sum(), 1e-30)))
    return cos, sqnr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    rng = np.random.default_rng(1)
    model = build(args.layers)
    calib = [{"x": rng.standard_normal((1, 64, D)).astype(np.float32)} for _ in range(16)]
    evals = [{"x": rng.standard_normal((1, 64, D)).astype(np.float32)} for _ in range(8)]
    fsess = session_for(model, Execution.RUNTIME)
    ref = [fsess.run(None, f)[0] for f in evals]
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    ort.set_default_logger_severity(3)
    sessions = {"float": ort.InferenceSession(model.SerializeToString(), so)}
    rows = []
    fsize = model.ByteSize()
    print(f"{args.layers}-layer stack, hidden {D}, FFN {F}; float {fsize / 1e6:.2f} MB")
    for name, cfg in CONFIGS.items():
        t0 = time.perf_counter()
        res = amq.quantize(model, calib, config_from_dict(cfg), cache_dir=False)
        qt = time.perf_counter() - t0
        q = res.model
        cols = [name, f"{q.ByteSize() / 1e6:.2f} MB ({q.ByteSize() / fsize:.2f}x)"]
        for ex in (Execution.IDEAL, Execution.RUNTIME):
            s = session_for(q, ex)
            cos, sqnr = _metrics(ref, [s.run(None, f)[0] for f in evals])
            cols.append(f"{ex.value}: cos {cos:.5f} / {sqnr:.1f} dB")
        cols.append(f"bitops {bitops(res.plan).ratio_to_int8:.2f}x int8")
        opt = ort.SessionOptions()
        opt.intra_op_num_threads = args.threads
        opt.optimized_model_filepath = f"/tmp/amq_stack_{len(rows)}.onnx"
        sessions[name] = ort.InferenceSession(q.SerializeToString(), opt)
        fused = sorted(
            {
                n.op_type
                for n in onnx.load(opt.optimized_model_filepath).graph.node
                if n.op_type in ("MatMulNBits", "DynamicQuantizeMatMul", "QLinearMatMul", "MatMul")
                or n.op_type.startswith("MatMulInteger")
            }
        )
        cols.append(",".join(fused) + f"; quantize {qt:.1f}s")
        rows.append(cols)
    for r in rows:
        print(" | ".join(r))
    names = list(sessions)
    for b, s in ((1, 1), (1, 64), (1, 128), (16, 64), (16, 128)):
        feeds = [{"x": rng.standard_normal((b, s, D)).astype(np.float32)}]
        t = time_sessions([sessions[n] for n in names], feeds, min_seconds=args.seconds)
        ratio = np.median(t[:, :1] / t, axis=0)  # float time / each: > 1 is faster
        ms = np.median(t, axis=0) * 1e3
        print(
            f"batch {b:2d} seq {s:3d}: "
            + "; ".join(
                f"{n} {m:.1f} ms ({r:.2f}x)" for n, m, r in zip(names, ms, ratio, strict=True)
            )
        )


if __name__ == "__main__":
    main()
