"""AdaRound (Nagel et al., 2020): each weight rounded up or down as learned on calibration data,
not to nearest. Per layer, a soft rounding h(V) in [0, 1] (the rectified sigmoid) is optimized
with Adam on the layer's output error plus the paper's regularizer, whose exponent beta is
annealed from 20 to 2 so that every h ends at 0 or 1:

    min_V  sum_o (W~_o - W_o) H (W~_o - W_o)^T / C_out  +  lambda * sum (1 - |2 h(V) - 1|^beta)
    W~ = s * clip(floor(W / s) + h(V), qmin, qmax)

H = E[x x^T] of the layer's float input (layer_inputs.py), so an iteration costs one
[C_out, K] x [K, K] product and never touches the data: numpy, no torch. AIMET and the paper
reconstruct from the quantized model's input; this is the float-input variant (the same
statistic serves scale search).

The result is one bit per weight, "rounded up" from floor(W / s), kept in the plan
(TensorPlan.rounding, base64 of the packed bits); ``codes`` gives a weight's integer codes
with or without it, for every writer of them.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np

from amq.graph.model import Graph
from amq.plan import QuantPlan, TensorPlan
from amq.quant import qmath
from amq.quant.activations import node_attrs
from amq.quant.algorithms import layer_inputs

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch


@dataclass(frozen=True)
class Settings:
    iterations: int = 1000
    reg: float = 0.01  # lambda
    beta: tuple[float, float] = (20.0, 2.0)
    warm_start: float = 0.2  # the first 20% of iterations without the regularizer
    lr: float = 1e-2


def pack(up: np.ndarray) -> str:
    return base64.b64encode(np.packbits(up.astype(bool).ravel()).tobytes()).decode()


def unpack(text: str, shape: tuple[int, ...]) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))
    return bits[: int(np.prod(shape))].reshape(shape).astype(bool)


def codes(tp: TensorPlan, w: np.ndarray) -> np.ndarray:
    """Integer codes of a (not block-wise) weight on its plan's grid: to nearest, or with the
    plan's learned rounding (floor + the up bit)."""
    g = qmath.grid(tp.bits, tp.signed, tp.narrow)
    scale = np.asarray(tp.scale, dtype=np.float64)
    zp = np.asarray(tp.zero_point, dtype=np.int64)
    if not tp.rounding:
        if tp.axis is None:
            return qmath.quantize(w, scale[0], zp[0], g)
        return qmath.quantize(w, scale, zp, g, tp.axis)
    s, z = qmath.broadcast_qparams(w, scale if tp.axis is not None else scale[0], zp, tp.axis)
    q = np.floor(np.asarray(w, np.float64) / s) + unpack(tp.rounding, w.shape) + z
    return np.clip(q, g.qmin, g.qmax).astype(np.int64)


def _h(v: np.ndarray) -> np.ndarray:
    return np.clip(1.0 / (1.0 + np.exp(-v)) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def learn(
    w: np.ndarray, s: np.ndarray, grid: qmath.Grid, h: np.ndarray, cfg: Settings = Settings()
) -> np.ndarray:
    """The up bits [G, Co, K] of weight matrix ``w`` [G, Co, K] with scale ``s`` (broadcast to
    it, zero point 0) and input moments ``h`` [G, K, K]."""
    w = np.asarray(w, np.float64)
    base = np.floor(w / s)
    rest = np.clip(w / s - base, 1e-4, 1 - 1e-4)
    v = -np.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)  # h(v) = rest: start at the float value
    m1, m2 = np.zeros_like(v), np.zeros_like(v)
    channels = w.shape[0] * w.shape[1]
    warm = int(cfg.warm_start * cfg.iterations)
    for t in range(cfg.iterations):
        sig = 1.0 / (1.0 + np.exp(-v))
        hv = np.clip(sig * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)
        q = base + hv
        d = s * np.clip(q, grid.qmin, grid.qmax) - w
        g = 2.0 * np.matmul(d, h) / channels * s
        g *= (q > grid.qmin) & (q < grid.qmax)
        if t >= warm:
            rel = (t - warm) / max(cfg.iterations - warm, 1)
            beta = cfg.beta[1] + (cfg.beta[0] - cfg.beta[1]) * (1.0 - rel)
            u = 2.0 * hv - 1.0
            g -= cfg.reg * 2.0 * beta * np.abs(u) ** (beta - 1.0) * np.sign(u)
        g *= sig * (1.0 - sig) * (ZETA - GAMMA) * ((hv > 0.0) & (hv < 1.0))
        m1 = 0.9 * m1 + 0.1 * g
        m2 = 0.999 * m2 + 0.001 * g * g
        v -= cfg.lr * (m1 / (1 - 0.9 ** (t + 1))) / (np.sqrt(m2 / (1 - 0.999 ** (t + 1))) + 1e-8)
    return _h(v) >= 0.5


def output_error(w: np.ndarray, wq: np.ndarray, h: np.ndarray) -> float:
    """Mean over output channels of the output's squared error, (Wq - W) H (Wq - W)^T."""
    d = np.asarray(wq, np.float64) - np.asarray(w, np.float64)
    return float((np.matmul(d, h) * d).sum() / (d.shape[0] * d.shape[1]))


LAYER_FLOPS = 5e9  # a layer gets fewer iterations past this much work (at least MIN_ITERATIONS)
MIN_ITERATIONS = 100


def iterations(cost: float) -> int:
    """Iterations for a layer whose one iteration costs ``cost`` flops: the paper's count, cut
    to stay within LAYER_FLOPS (at least MIN_ITERATIONS). A count of the layer's own, not a
    clock: the same layer and grid get the same rounding in any plan, on any machine."""
    return int(min(Settings.iterations, max(MIN_ITERATIONS, LAYER_FLOPS / max(cost, 1.0))))


def apply(
    plan: QuantPlan,
    grams: dict[str, np.ndarray],
    graph: Graph,
    memo: dict,
    advance=lambda n, text=None: None,
) -> list[str]:
    """Learn the rounding of every weight whose layer has input moments (sets
    TensorPlan.rounding; a weight under the overflow guard keeps nearest rounding: its codes
    are bounded pair by pair). ``memo`` keeps results per (layer, grid) across plans. Returns
    one note per weight rounded: the output error before and after."""
    notes = []
    for name, h in grams.items():
        lp = plan.layers[name]
        tp = plan.tensors[lp.weight]  # type: ignore[index]
        advance(1, f"adaround {name}")
        if tp.pair_safe_axis is not None:
            continue
        key = (name, tp.bits, tp.axis, tp.narrow, np.asarray(tp.scale, np.float32).tobytes())
        if key not in memo:
            memo[key] = _learn_layer(lp.op_type, tp, graph, name, h)
        tp.rounding, note = memo[key]
        if note:
            notes.append(note)
    return notes


def _learn_layer(op_type: str, tp: TensorPlan, graph: Graph, name: str, h: np.ndarray):
    """(packed rounding or "", note) of one weight."""
    w = graph.array(tp.name)
    attrs = node_attrs(graph.node_by_name[name])
    m = layer_inputs.weight_matrix(op_type, w, attrs)
    s = layer_inputs.matrix_scales(tp.scale, m)
    g = qmath.grid(tp.bits, tp.signed, tp.narrow)
    its = iterations(2.0 * m.shape[0] * m.shape[1] * m.shape[2] ** 2)
    up = learn(m, s, g, h, Settings(iterations=its))
    nearest = np.clip(np.rint(m / s), g.qmin, g.qmax) * s
    learned = np.clip(np.floor(m / s) + up, g.qmin, g.qmax) * s
    e0, e1 = output_error(m, nearest, h), output_error(m, learned, h)
    if e1 >= e0:
        return "", ""
    packed = pack(layer_inputs.from_matrix(op_type, up, w, attrs))
    return packed, f"{name}: output error {e0:.3g} -> {e1:.3g} ({its} iterations)"
