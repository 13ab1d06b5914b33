"""Which products onnxruntime's x86 8-bit kernels add into one saturating int16 (PITFALLS 9).

On x86 with AVX2 but no VNNI, MLAS multiplies uint8 activations by int8 weights with VPMADDUBSW,
which adds each *pair* of adjacent bytes' products into an int16 with saturation. Which two
reduction elements end up adjacent depends on how each kernel packs its operands. This script
finds out by running tiny QDQ models in a *default* onnxruntime session (ORT_ENABLE_ALL, so the
QDQ groups are fused into QLinearConv / QGemm / QLinearMatMul exactly as in a real model):

* pair maps: output channel (or column) ``j`` of a probe has weight 127 on exactly two reduction
  elements (p, q) and 0 elsewhere, and every activation code is 255, so its exact accumulator is
  2 x 255 x 127 = 64770. If the kernel puts p and q in one int16 pair the result is 32767 instead,
  which the requantized output shows. Every pair (p, q) is probed, so the map is exhaustive.
* random data: random codes and large random weights; the runtime's requantized output is
  compared with numpy emulations of several hypotheses (reduction order, the code used for
  padding, signed activations shifted by 128, no saturation at all). The one with zero
  mismatches is what the kernel does.

Run it on a CPU without VNNI, or emulate one (a VNNI host never saturates):
    qemu-x86_64 -cpu Haswell /work/venv/bin/python bench/kernel_pairs.py 2>/dev/null
    python bench/kernel_pairs.py            # natively: on a VNNI CPU every case is 'exact'
Options: --quick skips the largest pair map (Cin=16 3x3, 10296 probes); --case TEXT runs the
cases whose name contains TEXT. About 25 s under qemu, 2 s natively. It is self-contained (numpy, onnx, onnxruntime); at the end it checks amq.quant.overflow's
emulation against the same runtime outputs when amq is importable.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

S_X = 1.0 / 64  # activation scale: (code - zp) * S_X is exact in float32
S_W = 1.0 / 128  # weight scale (per output channel, all equal)

# ----------------------------------------------------------------------------------------------
# Models (float in, float out: input -> Q -> DQ -> op(DQ(weight)) -> Q -> DQ -> output)


@dataclass
class Layer:
    """One QDQ layer to probe. ``op`` is Conv, MatMul or Gemm; ``w`` holds the weight codes in
    the op's own layout (Conv [Cout, Cin/g, *k], MatMul [K, N], Gemm [K, N] or [N, K] when
    ``trans_b``)."""

    op: str
    w: np.ndarray
    x_shape: tuple[int, ...]
    x_dtype: type = np.uint8
    x_zp: int = 0
    w_zp: int = 0  # 128 with uint8 weights
    y_scale: float = 1.0
    y_zp: int = 0
    group: int = 1
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    trans_b: int = 0

    @property
    def cout(self) -> int:
        if self.op == "Conv":
            return self.w.shape[0]
        return self.w.shape[0] if self.trans_b else self.w.shape[-1]

    @property
    def w_axis(self) -> int:
        return 0 if self.op == "Conv" or self.trans_b else 1


def build(layer: Layer) -> bytes:
    nodes, inits = [], []

    def const(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))

    const("sx", np.float32(S_X))
    const("zx", np.array(layer.x_zp, dtype=layer.x_dtype))
    const("sy", np.float32(layer.y_scale))
    const("zy", np.array(layer.y_zp, dtype=layer.x_dtype))
    const("wq", layer.w)
    const("sw", np.full(layer.cout, S_W, np.float32))
    const("zw", np.full(layer.cout, layer.w_zp, dtype=layer.w.dtype))
    nodes.append(helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]))
    nodes.append(helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]))
    nodes.append(
        helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=layer.w_axis)
    )
    if layer.op == "Conv":
        nd = layer.w.ndim - 2
        attrs = {
            "group": layer.group,
            "strides": list(layer.strides or (1,) * nd),
            "pads": list(layer.pads or (0,) * (2 * nd)),
            "dilations": list(layer.dilations or (1,) * nd),
        }
        nodes.append(helper.make_node("Conv", ["xd", "wd"], ["y"], **attrs))
    elif layer.op == "Gemm":
        nodes.append(helper.make_node("Gemm", ["xd", "wd"], ["y"], transB=layer.trans_b))
    else:
        nodes.append(helper.make_node("MatMul", ["xd", "wd"], ["y"]))
    nodes.append(helper.make_node("QuantizeLinear", ["y", "sy", "zy"], ["yq"]))
    nodes.append(helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["out"]))
    graph = helper.make_graph(
        nodes,
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(layer.x_shape))],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def run(layer: Layer, codes: np.ndarray) -> tuple[np.ndarray, str]:
    """The runtime's output codes for activation ``codes``, and the fused op with its input
    types as the optimized graph shows it (e.g. 'QLinearConv(u8,i8)')."""
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
        sess = ort.InferenceSession(build(layer), so, providers=["CPUExecutionProvider"])
        x = ((codes.astype(np.float64) - layer.x_zp) * S_X).astype(np.float32)
        (y,) = sess.run(None, {"x": x})
        fused = describe_fused(onnx.load(so.optimized_model_filepath))
    q = np.rint(y.astype(np.float64) / layer.y_scale) + layer.y_zp
    return q.astype(np.int64), fused


def describe_fused(model: onnx.ModelProto) -> str:
    """The op that does the layer's arithmetic in the optimized graph, with the types of its
    activation zero point and weight (the fused ops take them as inputs 2 and 3)."""
    types = {t.name: t.data_type for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "Transpose"):
            continue
        if node.op_type in ("QLinearConv", "QGemm", "QLinearMatMul"):
            x, w = (_short(types.get(node.input[i], 0)) for i in (2, 3))
            return f"{node.op_type}({x},{w})"
        return node.op_type + " (float)"  # not fused
    return "?"


def _short(dt: int) -> str:
    return {TensorProto.UINT8: "u8", TensorProto.INT8: "i8"}.get(dt, "?")


# ----------------------------------------------------------------------------------------------
# Reference emulation (plain numpy; used only here, independent of amq)


def im2col(x: np.ndarray, kshape, strides, pads, dilations, pad_value: int) -> np.ndarray:
    """[N, C, *S] -> [N, C, P, *O] where P runs over kernel positions in row-major order."""
    nd = len(kshape)
    width = [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)]
    xp = np.pad(x, width, constant_values=pad_value)
    out = [
        (xp.shape[2 + i] - dilations[i] * (kshape[i] - 1) - 1) // strides[i] + 1 for i in range(nd)
    ]
    cols = []
    for off in itertools.product(*(range(k) for k in kshape)):
        sl = tuple(
            slice(
                off[i] * dilations[i],
                off[i] * dilations[i] + strides[i] * (out[i] - 1) + 1,
                strides[i],
            )
            for i in range(nd)
        )
        cols.append(xp[(slice(None), slice(None)) + sl])
    return np.stack(cols, axis=2)


@dataclass(frozen=True)
class Hypothesis:
    name: str
    order: str = "khw_c"  # reduction order: kernel position then channel (fastest) | "c_khw"
    pad: str = "zp"  # code of padded positions: "zp" or "0"
    pairs: bool = True  # False: exact int32 arithmetic (no saturation)
    shift: int = 0  # added to signed activation codes (and zero point) before the kernel
    centered: bool = False  # the zero point is subtracted from the codes before the products


def gemm_operands(layer: Layer, codes: np.ndarray, h: Hypothesis):
    """Per group: A [M, K] raw activation codes and W [K, Cout_g] in the hypothesis's order, and
    the activation zero point the kernel subtracts afterwards."""
    x = codes.astype(np.int64) + h.shift
    zp = layer.x_zp + h.shift
    if h.centered:
        x, zp = x - zp, 0
    w = layer.w.astype(np.int64) - layer.w_zp
    if layer.op != "Conv":
        a = x.reshape(-1, x.shape[-1])
        wm = w.T if layer.trans_b else w
        return [(a, wm)], zp
    nd = layer.w.ndim - 2
    k = layer.w.shape[2:]
    col = im2col(
        x,
        k,
        layer.strides or (1,) * nd,
        layer.pads or (0,) * (2 * nd),
        layer.dilations or (1,) * nd,
        zp if h.pad == "zp" else 0,
    )
    g, cg = layer.group, layer.w.shape[1]
    cout_g = layer.w.shape[0] // g
    p = int(np.prod(k))
    out = []
    for gi in range(g):
        c = col[:, gi * cg : (gi + 1) * cg]  # [N, Cg, P, *O]
        wg = w[gi * cout_g : (gi + 1) * cout_g].reshape(cout_g, cg, p)
        if h.order == "khw_c":
            a = np.moveaxis(c, (1, 2), (-1, -2)).reshape(-1, p * cg)
            wm = wg.transpose(2, 1, 0).reshape(p * cg, cout_g)
        else:
            a = np.moveaxis(c, (1, 2), (-2, -1)).reshape(-1, cg * p)
            wm = wg.reshape(cout_g, cg * p).T
        out.append((a, wm))
    return out, zp


def emulate(layer: Layer, codes: np.ndarray, h: Hypothesis) -> np.ndarray:
    """Zero-point corrected accumulators under hypothesis ``h``, in the op's output layout."""
    groups, zp = gemm_operands(layer, codes, h)
    accs = []
    for a, wm in groups:
        prod = a[:, :, None] * wm[None, :, :]  # [M, K, N]
        if h.pairs:
            if prod.shape[1] % 2:
                prod = np.concatenate([prod, np.zeros_like(prod[:, :1])], axis=1)
            pair = prod.reshape(prod.shape[0], -1, 2, prod.shape[2]).sum(axis=2)
            raw = np.clip(pair, -32768, 32767).sum(axis=1)
        else:
            raw = prod.sum(axis=1)
        accs.append(raw - zp * wm.sum(axis=0))
    acc = np.concatenate(accs, axis=1)  # [M, Cout]
    if layer.op != "Conv":
        return acc.reshape(codes.shape[:-1] + (acc.shape[-1],))
    n = codes.shape[0]
    nd = layer.w.ndim - 2
    k = layer.w.shape[2:]
    col_shape = im2col(
        codes[:1, :1],
        k,
        layer.strides or (1,) * nd,
        layer.pads or (0,) * (2 * nd),
        layer.dilations or (1,) * nd,
        0,
    ).shape[3:]
    return np.moveaxis(acc.reshape((n, *col_shape, acc.shape[-1])), -1, 1)


def requantize(acc: np.ndarray, layer: Layer) -> np.ndarray:
    """As MLAS does it: float32 accumulator x float32 (s_x s_w / s_y), round half even, + zp."""
    mult = np.float32(np.float32(S_X) * np.float32(S_W) / np.float32(layer.y_scale))
    lo, hi = (0, 255) if layer.x_dtype == np.uint8 else (-128, 127)
    return np.clip(np.rint(acc.astype(np.float32) * mult).astype(np.int64) + layer.y_zp, lo, hi)


# ----------------------------------------------------------------------------------------------
# Pair maps


def reduction_index(layer: Layer) -> Callable[[int], tuple]:
    """Kernel-order reduction index r -> weight index (channel, *kernel position) of one group."""
    if layer.op != "Conv":
        return lambda r: (r,)
    cg, k = layer.w.shape[1], layer.w.shape[2:]

    def idx(r: int) -> tuple:
        pos, c = divmod(r, cg)
        return (c, *np.unravel_index(pos, k))

    return idx


def pair_map_layer(template: Layer, pairs: list[tuple[int, int]], align: int = 16) -> Layer:
    """``template`` with one output channel per probed pair (weights 127 on the pair, per group)
    and the channel count padded with zero channels to a multiple of ``align``."""
    t = template
    n = -(-len(pairs) // align) * align
    to_w = reduction_index(t)
    if t.op == "Conv":
        g = t.group
        w = np.zeros((g * n, *t.w.shape[1:]), dtype=t.w.dtype) + t.w_zp
        for gi in range(g):
            for j, (p, q) in enumerate(pairs):
                for r in (p, q):
                    w[(gi * n + j, *to_w(r))] = t.w_zp + 127
    else:
        k = t.w.shape[1] if t.trans_b else t.w.shape[0]
        w = np.zeros((k, n), dtype=t.w.dtype) + t.w_zp
        for j, (p, q) in enumerate(pairs):
            w[[p, q], j] = t.w_zp + 127
        if t.trans_b:
            w = np.ascontiguousarray(w.T)
    exact = 2 * 255 * 127
    return Layer(**{**t.__dict__, "w": w, "y_scale": exact * S_X * S_W / 120, "y_zp": 0})


def probe_pairs(template: Layer, k: int, pairs: list[tuple[int, int]] | None = None):
    """Which of ``pairs`` (default: all pairs of the ``k`` reduction elements) saturate, for
    every group and every output position."""
    pairs = pairs if pairs is not None else list(itertools.combinations(range(k), 2))
    layer = pair_map_layer(template, pairs)
    hi = 127 if template.x_dtype == np.int8 else 255  # the largest code (255 after a +128 shift)
    codes = np.full(template.x_shape, hi, dtype=np.int64)
    got, fused = run(layer, codes)
    want = requantize(emulate(layer, codes, Hypothesis("exact", pairs=False)), layer)
    bad = got != want  # [..., Cout, *O] for Conv, [..., N] otherwise
    ch_axis = 1 if template.op == "Conv" else -1
    per_ch = np.moveaxis(bad, ch_axis, 0).reshape(bad.shape[ch_axis], -1)
    hit = per_ch.all(axis=1) if per_ch.shape[1] else per_ch[:, 0]
    mixed = per_ch.any(axis=1) & ~per_ch.all(axis=1)
    n_per_group = layer.cout // (template.group if template.op == "Conv" else 1)
    saturating = set()
    for ch in np.flatnonzero(hit):
        j = ch % n_per_group
        if j < len(pairs):
            saturating.add(pairs[j])
    return saturating, fused, int(mixed.sum())


def describe_pairs(saturating: set, k: int, probed: list | None = None) -> str:
    adjacent = {(2 * m, 2 * m + 1) for m in range(k // 2)}
    if probed is not None:
        adjacent &= set(probed)
    if saturating == adjacent:
        tail = f", element {k - 1} alone" if k % 2 else ""
        return f"(2m, 2m+1) in kernel order{tail}" if adjacent else "no pair saturates"
    extra, missing = sorted(saturating - adjacent)[:4], sorted(adjacent - saturating)[:4]
    return f"NOT adjacent: extra {extra} missing {missing}"


# ----------------------------------------------------------------------------------------------
# The cases


def conv(cin, cout, k, *, group=1, strides=(), pads=(), dil=(), hw=None, n=1, **kw) -> Layer:
    k = (k, k) if isinstance(k, int) else tuple(k)
    nd = len(k)
    hw = hw or tuple(1 + (dil[i] if dil else 1) * (k[i] - 1) for i in range(nd))
    w = np.zeros((cout, cin // group, *k), dtype=kw.pop("w_dtype", np.int8))
    return Layer(
        "Conv", w, (n, cin, *hw), group=group, strides=strides, pads=pads, dilations=dil, **kw
    )


def matmul(k, n_out, a_shape, op="MatMul", trans_b=0, **kw) -> Layer:
    shape = (n_out, k) if trans_b else (k, n_out)
    w = np.zeros(shape, dtype=kw.pop("w_dtype", np.int8))
    return Layer(op, w, tuple(a_shape) + (k,), trans_b=trans_b, **kw)


def k_of(layer: Layer) -> int:
    if layer.op == "Conv":
        return int(np.prod(layer.w.shape[1:]))
    return layer.w.shape[1] if layer.trans_b else layer.w.shape[0]


PAIR_CASES: dict[str, Layer] = {
    "conv Cin=3 3x3 (K=27)": conv(3, 1, 3),
    "conv Cin=4 3x3 (K=36)": conv(4, 1, 3),
    "conv Cin=5 1x1 (K=5)": conv(5, 1, 1),
    "conv Cin=16 3x3 (K=144)": conv(16, 1, 3),
    "conv Cin=6 g=2 3x3 (K=27/group)": conv(6, 2, 3, group=2),
    "conv Cin=3 1-D k=5 (K=15)": conv(3, 1, (5,)),
    "conv Cin=2 3-D 2x2x2 (K=16)": conv(2, 1, (2, 2, 2)),
    "conv dw multiplier 2 (C=4 g=4, K=9)": conv(4, 4, 3, group=4),
    "matmul [4,37] (K=37)": matmul(37, 1, (4,)),
    "matmul M=1 [1,37]": matmul(37, 1, (1,)),
    "matmul rank 3 [2,3,37]": matmul(37, 1, (2, 3)),
    "gemm transB=0 [4,37]": matmul(37, 1, (4,), op="Gemm"),
    "gemm transB=1 [4,37]": matmul(37, 1, (4,), op="Gemm", trans_b=1),
    "int8 act conv Cin=16 3x3": conv(16, 1, 3, x_dtype=np.int8),
    "int8 act conv Cin=3 3x3": conv(3, 1, 3, x_dtype=np.int8),
    "int8 act matmul [4,37]": matmul(37, 1, (4,), x_dtype=np.int8),
}
BIG_PAIR_CASES = ("conv Cin=16 3x3 (K=144)",)

# long reductions: only the adjacent pairs (2m, 2m+1) and the shifted ones (2m+1, 2m+2)
ADJACENT_CASES: dict[str, Layer] = {
    "matmul [4,1030] (K=1030)": matmul(1030, 1, (4,)),
    "conv Cin=64 3x3 (K=576)": conv(64, 1, 3),
    "conv Cin=3 7x7 s2 (K=147)": conv(3, 1, 7),
}


def dw_probe(c: int, k: int = 3) -> tuple[str, Layer, list[tuple[int, int]]]:
    """Depthwise: one probed pair of kernel positions per channel (all pairs, cycled)."""
    pairs = list(itertools.combinations(range(k * k), 2))
    layer = conv(c, c, k, group=c)
    w = np.zeros_like(layer.w)
    for ch in range(c):
        p, q = pairs[ch % len(pairs)]
        w[ch, 0].flat[p] = w[ch, 0].flat[q] = 127
    layer.w = w
    layer.y_scale = 2 * 255 * 127 * S_X * S_W / 120
    return f"depthwise C={c} 3x3", layer, pairs


def rand_case(name: str, layer: Layer, seed: int, x_lo: int = 0, x_hi: int = 255):
    """Random data: codes uniform in [x_lo, x_hi], weights of magnitude 64..127 (random sign),
    so that many same-signed pairs saturate; output scale covers the exact accumulators."""
    rng = np.random.default_rng(seed)
    w = rng.integers(64, 128, size=layer.w.shape) * rng.choice([-1, 1], size=layer.w.shape)
    if layer.w.dtype == np.uint8:
        w = w + 128
        w = np.clip(w, 0, 255)
    layer.w = w.astype(layer.w.dtype)
    codes = rng.integers(x_lo, x_hi + 1, size=layer.x_shape)
    exact = emulate(layer, codes, Hypothesis("exact", pairs=False))
    layer.y_scale = float(np.abs(exact).max()) * S_X * S_W / 100
    return name, layer, codes


def rand_conv_cases() -> list:
    """Random-data convolutions (uint8 activations, int8 weights)."""
    return [
        rand_case("conv Cin=3 3x3 p1", conv(3, 16, 3, pads=(1, 1, 1, 1), hw=(6, 6), n=2), 1),
        rand_case("conv Cin=16 3x3 p1 (ConvSym)", conv(16, 16, 3, pads=(1,) * 4, hw=(5, 5)), 2),
        rand_case("conv Cin=16 Cout=8 3x3 (GEMM)", conv(16, 8, 3, pads=(1,) * 4, hw=(5, 5)), 3),
        rand_case(
            "conv Cin=6 3x3 p1 zp=200", conv(6, 16, 3, pads=(1,) * 4, hw=(5, 5), x_zp=200), 4
        ),
        rand_case(
            "conv Cin=8 3x3 p1 zp=200", conv(8, 16, 3, pads=(1,) * 4, hw=(5, 5), x_zp=200), 5
        ),
        rand_case(
            "conv Cin=3 3x3 s2 p(0,1,1,0)",
            conv(3, 16, 3, strides=(2, 2), pads=(0, 1, 1, 0), hw=(7, 7)),
            6,
        ),
        rand_case(
            "conv Cin=4 3x3 dil 2 s2 p2",
            conv(4, 16, 3, strides=(2, 2), pads=(2,) * 4, dil=(2, 2), hw=(7, 7)),
            7,
        ),
        rand_case("conv Cin=5 1x1", conv(5, 16, 1, hw=(4, 4)), 8),
        rand_case("conv Cin=16 1x1 (ConvSym direct)", conv(16, 16, 1, hw=(4, 4)), 9),
        rand_case("conv Cin=8 g=2 3x3 p1", conv(8, 16, 3, group=2, pads=(1,) * 4, hw=(5, 5)), 10),
        rand_case("conv Cin=6 g=2 3x3 p1", conv(6, 16, 3, group=2, pads=(1,) * 4, hw=(5, 5)), 11),
        rand_case(
            "depthwise C=16 3x3 p1 (ConvSym dw)",
            conv(16, 16, 3, group=16, pads=(1,) * 4, hw=(5, 5)),
            12,
        ),
        rand_case("depthwise C=8 3x3 p1", conv(8, 8, 3, group=8, pads=(1,) * 4, hw=(5, 5)), 13),
        rand_case(
            "dw multiplier 2 C=4 3x3 p1", conv(4, 8, 3, group=4, pads=(1,) * 4, hw=(5, 5)), 14
        ),
        rand_case("conv 1-D Cin=3 k=5 p2", conv(3, 16, (5,), pads=(2, 2), hw=(9,)), 15),
    ]


def rand_cases() -> list:
    """Random-data cases: convolutions, then MatMul/Gemm, int8 activations, uint8 weights."""
    u8w = {"w_dtype": np.uint8, "w_zp": 128}
    return rand_conv_cases() + [
        rand_case("matmul [3,5,37]x[37,16]", matmul(37, 16, (3, 5)), 16),
        rand_case("matmul M=1 [1,37]x[37,16]", matmul(37, 16, (1,)), 17),
        rand_case("matmul [6,37] zp=100", matmul(37, 16, (6,), x_zp=100), 29),
        rand_case("gemm transB=0 [6,37]", matmul(37, 16, (6,), op="Gemm"), 18),
        rand_case("gemm transB=1 [6,37]", matmul(37, 16, (6,), op="Gemm", trans_b=1), 19),
        rand_case(
            "int8 act conv Cin=16 3x3 p1",
            conv(16, 16, 3, pads=(1,) * 4, hw=(5, 5), x_dtype=np.int8),
            20,
            -128,
            127,
        ),
        rand_case(
            "int8 act conv Cin=3 3x3 p1",
            conv(3, 16, 3, pads=(1,) * 4, hw=(5, 5), x_dtype=np.int8),
            21,
            -128,
            127,
        ),
        rand_case(
            "int8 act depthwise C=16",
            conv(16, 16, 3, group=16, pads=(1,) * 4, hw=(5, 5), x_dtype=np.int8),
            22,
            -128,
            127,
        ),
        rand_case("int8 act matmul [6,37]", matmul(37, 16, (6,), x_dtype=np.int8), 23, -128, 127),
        rand_case(
            "u8 weights conv Cin=16 3x3", conv(16, 16, 3, pads=(1,) * 4, hw=(5, 5), **u8w), 24
        ),
        rand_case("u8 weights conv Cin=3 3x3", conv(3, 16, 3, pads=(1,) * 4, hw=(5, 5), **u8w), 25),
        rand_case(
            "u8 weights depthwise C=16",
            conv(16, 16, 3, group=16, pads=(1,) * 4, hw=(5, 5), **u8w),
            26,
        ),
        rand_case("u8 weights matmul [6,37]", matmul(37, 16, (6,), **u8w), 27),
        rand_case(
            "u8 weights gemm transB=1", matmul(37, 16, (6,), op="Gemm", trans_b=1, **u8w), 28
        ),
        rand_case("u8 weights gemm transB=0", matmul(37, 16, (6,), op="Gemm", **u8w), 30),
        rand_case(
            "int8 act conv zp=-50 Cin=4 3x3 p1",
            conv(4, 16, 3, pads=(1,) * 4, hw=(5, 5), x_dtype=np.int8, x_zp=-50),
            31,
            -128,
            127,
        ),
        rand_case(
            "stem: conv Cin=3 7x7 s2 p3 zp=114",
            conv(3, 16, 7, strides=(2, 2), pads=(3,) * 4, hw=(12, 12), x_zp=114),
            32,
        ),
    ]


def hypotheses(layer: Layer) -> list[Hypothesis]:
    signed = layer.x_dtype == np.int8
    sh = 128 if signed else 0
    hs = [Hypothesis("exact (no saturation)", pairs=False)]
    name = "pairs, kernel order, pad=zp" + (", codes+128" if signed else "")
    if layer.w.dtype == np.uint8:
        name += " (as U8S8 would: w - 128)"
    hs.append(Hypothesis(name, shift=sh))
    if layer.op == "Conv":
        hs.append(Hypothesis("pairs, ONNX order (c, kh, kw)", order="c_khw", shift=sh))
        if layer.pads and any(layer.pads):
            hs.append(Hypothesis("pairs, kernel order, pad=0", pad="0", shift=sh))
    if layer.x_zp:
        hs.append(Hypothesis("pairs of (code - zp)", centered=True, shift=sh))
    if signed:
        hs.append(Hypothesis("pairs, signed codes as is", shift=0))
    return hs


# ----------------------------------------------------------------------------------------------
# Main


def kernel_saturates() -> bool:
    """The MatMulInteger smoke test: 4 x 255 x 127 gives 129540 exactly, 65534 when saturated."""
    g = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B"], ["Y"])],
        "g",
        [
            helper.make_tensor_value_info("A", TensorProto.UINT8, [1, 4]),
            helper.make_tensor_value_info("B", TensorProto.INT8, [4, 1]),
        ],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [1, 1])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    a, b = np.full((1, 4), 255, np.uint8), np.full((4, 1), 127, np.int8)
    return int(s.run(None, {"A": a, "B": b})[0][0, 0]) != 4 * 255 * 127


def print_row(cols: list[str], widths: list[int]) -> None:
    print(" | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip(), flush=True)


def main_pairs(selected: Callable[[str], bool], quick: bool) -> None:
    print("\n## Pair maps (weight 127 on two reduction elements, all activation codes 255)")
    print("kernel order = (kernel position row-major, then input channel fastest), per group\n")
    widths = [38, 22, 6, 50]
    print_row(["case", "fused op", "probes", "saturating pairs"], widths)
    for name, layer in PAIR_CASES.items():
        if not selected(name) or (quick and name in BIG_PAIR_CASES):
            continue
        k = k_of(layer)
        sat, fused, mixed = probe_pairs(layer, k)
        note = f" ({mixed} channels differ by position!)" if mixed else ""
        print_row([name, fused, str(k * (k - 1) // 2), describe_pairs(sat, k) + note], widths)
    for name, layer in ADJACENT_CASES.items():
        if not selected(name):
            continue
        k = k_of(layer)
        probed = [(i, i + 1) for i in range(k - 1)]
        sat, fused, mixed = probe_pairs(layer, k, probed)
        print_row(
            [name, fused, str(len(probed)), describe_pairs(sat, k, probed) + " (adjacent only)"],
            widths,
        )
    for c in (16, 40):
        name, layer, pairs = dw_probe(c)
        if not selected(name):
            continue
        codes = np.full(layer.x_shape, 255, dtype=np.int64)
        got, fused = run(layer, codes)
        want = requantize(emulate(layer, codes, Hypothesis("exact", pairs=False)), layer)
        bad = sorted(
            {pairs[ch % len(pairs)] for ch in np.flatnonzero((got != want).reshape(c, -1).any(1))}
        )
        shown = (
            f"{len(bad)} of {min(c, len(pairs))} probed: {bad[:4]}"
            if bad
            else "none (no int16 pairs)"
        )
        print_row([name, fused, str(min(c, len(pairs))), shown], widths)


def main_random(selected: Callable[[str], bool]) -> list:
    print("\n## Random data: outputs (requantized) that differ from each hypothesis")
    widths = [36, 22, 8, 60]
    print_row(
        ["case", "fused op", "outputs", "mismatches per hypothesis (0 = what the kernel does)"],
        widths,
    )
    done = []
    for name, layer, codes in rand_cases():
        if not selected(name):
            continue
        got, fused = run(layer, codes)
        parts = []
        for h in hypotheses(layer):
            miss = int((requantize(emulate(layer, codes, h), layer) != got).sum())
            parts.append(f"{h.name}: {miss}")
        print_row([name, fused, str(got.size), "; ".join(parts)], widths)
        done.append((name, layer, codes, got))
    return done


def check_amq(done: list) -> None:
    """amq.quant.overflow's emulation against the same runtime outputs."""
    try:
        from amq.quant import overflow
    except ImportError as e:
        print(f"\n(amq.quant.overflow not importable: {e})")
        return
    print(
        "\n## amq.quant.overflow.{conv,matmul}_accumulators against the runtime (0 expected without VNNI)"
    )
    widths = [36, 10, 14]
    print_row(["case", "outputs", "mismatches"], widths)
    for name, layer, codes, got in done:
        acc = amq_accumulators(overflow, layer, codes)
        print_row([name, str(got.size), str(int((requantize(acc, layer) != got).sum()))], widths)


def amq_accumulators(overflow, layer: Layer, codes: np.ndarray) -> np.ndarray:
    signed = layer.x_dtype == np.int8
    w = layer.w.astype(np.int64)
    if layer.w.dtype == np.uint8:
        w_codes, w_unsigned = w - layer.w_zp, True
    else:
        w_codes, w_unsigned = w, False
    if layer.op == "Conv":
        nd = layer.w.ndim - 2
        return overflow.conv_accumulators(
            codes,
            layer.x_zp,
            w_codes,
            signed=signed,
            weights_unsigned=w_unsigned,
            group=layer.group,
            strides=layer.strides or (1,) * nd,
            pads=layer.pads or (0,) * (2 * nd),
            dilations=layer.dilations or (1,) * nd,
        )
    wm = w_codes.T if layer.trans_b else w_codes
    return overflow.matmul_accumulators(
        codes, layer.x_zp, wm, signed=signed, weights_unsigned=w_unsigned
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="skip the largest pair map")
    ap.add_argument("--case", default="", help="run only cases whose name contains this")
    ap.add_argument("--no-amq", action="store_true", help="skip the check of amq's emulation")
    args = ap.parse_args()
    t0 = time.time()
    sat = kernel_saturates()
    print(f"onnxruntime {ort.__version__}, numpy {np.__version__}")
    print(
        "8-bit kernels: "
        + (
            "SATURATING (x86 without VNNI: VPMADDUBSW int16 pairs)"
            if sat
            else "exact (VNNI, or not x86 AVX2)"
        )
    )

    def selected(name: str) -> bool:
        return args.case.lower() in name.lower()

    main_pairs(selected, args.quick)
    done = main_random(selected)
    if not args.no_amq:
        check_amq(done)
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
