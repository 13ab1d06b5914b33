"""Per-layer weight scale search: per output channel, the clipping ratio a (scale = a x absmax /
qmax) that minimizes the layer's output error on calibration data, (W_q - W) H (W_q - W)^T with
H = E[x x^T] of its float input (layer_inputs.py). AIMET's sequential MSE searches the same
candidates on the output with the quantized model's input; here the float input's moments
stand in for it, which makes one pass of statistics serve every layer and bit width.

A per-tensor weight gets one ratio, the one with the least error summed over channels.
"""

from __future__ import annotations

import numpy as np

from amq.graph.model import Graph
from amq.plan import QuantPlan
from amq.quant import qmath
from amq.quant.activations import node_attrs
from amq.quant.algorithms import layer_inputs

RATIOS = np.round(np.linspace(0.5, 1.0, 26), 4)  # candidate clipping ratios, 1.0 = absmax


def search(
    w: np.ndarray, s: np.ndarray, grid: qmath.Grid, h: np.ndarray, per_channel: bool
) -> tuple[np.ndarray, float, float]:
    """Ratios for weight matrix ``w`` [G, Co, K] at absmax scale ``s`` [G, Co, 1] (or a
    scalar) with input moments ``h`` [G, K, K]: ([G, Co] ratios, or [1, 1] per tensor), and
    the output error at ratio 1 and at the chosen ratios."""
    w = np.asarray(w, np.float64)
    s = np.broadcast_to(np.asarray(s, np.float64), (*w.shape[:2], 1))
    errs = []
    for a in RATIOS:
        d = np.clip(np.rint(w / (a * s)), grid.qmin, grid.qmax) * (a * s) - w
        errs.append((np.matmul(d, h) * d).sum(axis=-1))
    e = np.stack(errs)  # [A, G, Co]
    n = w.shape[0] * w.shape[1]
    if per_channel:
        best = e.argmin(axis=0)
        chosen = np.take_along_axis(e, best[None], axis=0)[0]
        return RATIOS[best], float(e[-1].sum() / n), float(chosen.sum() / n)
    total = e.sum(axis=(1, 2))
    i = int(total.argmin())
    return np.full((1, 1), RATIOS[i]), float(total[-1] / n), float(total[i] / n)


def apply(plan: QuantPlan, grams: dict[str, np.ndarray], graph: Graph, memo: dict) -> list[str]:
    """Search every weight whose layer has input moments (sets TensorPlan.clip from the absmax
    scale; the caller re-derives the scales). ``memo`` keeps results per (layer, grid) across
    plans. One note per weight clipped."""
    notes = []
    for name, h in grams.items():
        lp = plan.layers[name]
        tp = plan.tensors[lp.weight]  # type: ignore[index]
        key = (name, tp.bits, tp.axis, tp.narrow)
        if key not in memo:
            memo[key] = _search_layer(lp.op_type, tp, graph, name, h)
        tp.clip, note = memo[key]
        if note:
            notes.append(note)
    return notes


def _search_layer(op_type: str, tp, graph: Graph, name: str, h: np.ndarray):
    """(ratios or [], note) of one weight."""
    w = graph.array(tp.name)
    m = layer_inputs.weight_matrix(op_type, w, node_attrs(graph.node_by_name[name]))
    scale, _ = qmath.weight_qparams(w, tp.bits, tp.axis)
    s = layer_inputs.matrix_scales(scale, m)
    g = qmath.grid(tp.bits, tp.signed, tp.narrow)
    ratios, e0, e1 = search(m, s, g, h, per_channel=tp.axis is not None)
    if np.all(ratios == 1.0):
        return [], ""
    note = (
        f"{name}: ratios {ratios.min():.2f}..{ratios.max():.2f}, output error {e0:.3g} -> {e1:.3g}"
    )
    return [float(r) for r in ratios.reshape(-1)], note
