"""What a weight multiplies: the rows a Conv/Gemm/MatMul's weight matrix is applied to (im2col
patches of a Conv input, rows of a Gemm/MatMul input) and their second moment H = E[x x^T] per
group, the one statistic scale search and AdaRound need (the output error of a weight change D
is D H D^T, summed over output channels).

Layouts: the weight as [G, Cout/G, K] (``weight_matrix``) and patches as [P, G, K], K in the
order (input channel, kernel position), so that y[g] = W[g] @ x[g].
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np

from amq.config import SmoothMode
from amq.plan import LayerPlan, QuantPlan
from amq.quant import qmath
from amq.quant.registry import gemm_transposed

MAX_ROWS = 2048  # rows (output positions) per batch that reach H
AUTO_MAX_BITS = 4  # on auto, the weight passes take weights of at most this many bits


def targets(plan: QuantPlan, mode: SmoothMode, weight_rank: dict[str, int]) -> list[LayerPlan]:
    """The layers a weight pass (scale search, AdaRound) takes under ``mode``: quantized Conv
    (1-D, 2-D), Gemm and MatMul (2-D weight) layers with a static input and a weight of their own
    on a per-channel or per-tensor grid; on auto only weights of AUTO_MAX_BITS or fewer bits.
    ``weight_rank``: the rank of each weight."""
    out: list[LayerPlan] = []
    if mode == SmoothMode.OFF:
        return out
    for lp in plan.layers.values():
        tp = plan.tensors.get(lp.weight or "")
        if not lp.quantized or lp.act_dynamic or lp.block_size or tp is None or tp.block_size:
            continue
        if tp.consumers != [lp.name] or not lp.act_inputs or lp.act_inputs[0] not in plan.tensors:
            continue
        rank = weight_rank.get(tp.name, 0)
        ok = {"Conv": rank in (3, 4), "Gemm": rank == 2, "MatMul": rank == 2}.get(lp.op_type)
        if ok and (mode == SmoothMode.ON or tp.bits <= AUTO_MAX_BITS):
            out.append(lp)
    return out


def layer_grids(plan: QuantPlan, lp: LayerPlan) -> tuple:
    """What a per-layer measurement on float inputs depends on besides the data (the overflow
    emulation, bias correction): the layer, its input's grid and its weight's grid (the weight's
    values are the model's)."""
    x = plan.tensors[lp.act_inputs[0]]
    w = plan.tensors[lp.weight]  # type: ignore[index]
    return (
        lp.name,
        (x.bits, x.signed, float(x.scale[0]), int(x.zero_point[0])),
        (w.bits, w.signed, w.narrow, w.axis, np.asarray(w.scale, np.float32).tobytes(), w.rounding),
    )


def grids_key(plan: QuantPlan, lp: LayerPlan) -> str:
    """``layer_grids`` as a short string, for a cache entry on disk (calib/cache.py)."""
    return hashlib.sha1(repr(layer_grids(plan, lp)).encode()).hexdigest()


def matrix_scales(scale, m: np.ndarray) -> np.ndarray:
    """A weight's scales (one per output channel, or one) laid out like its weight_matrix ``m``
    [G, Cout/G, K]: [G, Cout/G, 1], or [1, 1, 1]."""
    s = np.asarray(scale, np.float64).reshape(-1)
    return s.reshape(m.shape[0], m.shape[1], 1) if s.size > 1 else s.reshape(1, 1, 1)


def weight_matrix(op_type: str, w: np.ndarray, attrs: Mapping[str, object]) -> np.ndarray:
    """[G, Cout/G, K]: a Conv's [Cout, Cin/G, *k] by group; a Gemm/MatMul's [K, N] transposed
    (a Gemm with transB keeps its [N, K])."""
    if op_type == "Conv":
        g = int(attrs.get("group", 1))  # type: ignore[call-overload]
        return w.reshape(g, w.shape[0] // g, -1)
    m = w if gemm_transposed(op_type, attrs) else w.T
    return m[None]


def from_matrix(op_type: str, m: np.ndarray, like: np.ndarray, attrs: Mapping[str, object]):
    """The inverse of ``weight_matrix``: ``m`` [G, Cout/G, K] in the layout of ``like``."""
    if op_type == "Conv":
        return m.reshape(like.shape)
    return m[0] if gemm_transposed(op_type, attrs) else m[0].T


def _rows(n: int, max_rows: int, seed: int) -> np.ndarray:
    if n <= max_rows:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False))


def conv_patches(
    x: np.ndarray,
    w_shape: Sequence[int],
    geometry: tuple,
    max_rows: int = MAX_ROWS,
    seed: int = 0,
) -> np.ndarray:
    """[P, G, K] im2col patches of a Conv input [N, C, *spatial] at up to ``max_rows`` output
    positions (a seeded sample); ``geometry``: (group, strides, pads, dilations), pads as in
    ONNX (all begins, then all ends)."""
    group, strides, pads, dil = geometry
    nd = len(w_shape) - 2
    k = list(w_shape[2:])
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    out = [(xp.shape[2 + i] - (dil[i] * (k[i] - 1) + 1)) // strides[i] + 1 for i in range(nd)]
    pos = _rows(x.shape[0] * int(np.prod(out)), max_rows, seed)
    n, *o = np.unravel_index(pos, [x.shape[0], *out])
    shape = (-1, 1) + (1,) * nd
    idx: list[np.ndarray] = [n.reshape(shape), np.arange(x.shape[1]).reshape((1, -1) + (1,) * nd)]
    for i in range(nd):
        s = [1] * (nd + 2)
        s[0], s[2 + i] = -1, k[i]
        idx.append((o[i][:, None] * strides[i] + np.arange(k[i]) * dil[i]).reshape(s))
    cols = xp[tuple(idx)]  # [P, C, *k]
    return cols.reshape(len(pos), group, -1)


def matmul_rows(
    x: np.ndarray, attrs: Mapping[str, object], max_rows: int = MAX_ROWS, seed: int = 0
) -> np.ndarray:
    """[P, 1, K] rows of a Gemm/MatMul input (Gemm's transA undone)."""
    if attrs.get("transA", 0):
        x = x.T
    rows = x.reshape(-1, x.shape[-1])
    return rows[_rows(len(rows), max_rows, seed)][:, None, :]


class Gram:
    """Streams H = E[x x^T] per group over batches of patches [P, G, K] (float64)."""

    def __init__(self) -> None:
        self.sum: np.ndarray | None = None
        self.rows = 0

    def add(self, patches: np.ndarray) -> None:
        p = np.asarray(patches, dtype=np.float64)
        pt = np.ascontiguousarray(p.transpose(1, 2, 0))  # [G, K, P]: one BLAS product per group
        h = np.matmul(pt, pt.transpose(0, 2, 1))
        self.sum = h if self.sum is None else self.sum + h
        self.rows += p.shape[0]

    def value(self) -> np.ndarray:
        """[G, K, K], snapped to qmath.RANGE_BITS significant bits: the passes that read it
        then decide the same on any CPU (unless a value sits within float noise of a step)."""
        assert self.sum is not None, "no rows added"
        return qmath.snap(self.sum / max(self.rows, 1))
