"""Cross-layer equalization with high-bias absorption (Nagel et al., 2019, "Data-Free
Quantization Through Weight Equalization and Bias Correction"; issue #13, point 2). numpy only.

For two Conv layers in a chain, h = W1 x + b1, a = f(h), y = W2 a + b2, with f positively
homogeneous (Relu, LeakyRelu, PRelu: f(h / s) = f(h) / s for s > 0) or absent, dividing output
channel i of the first layer (its weight row and bias) by s_i and multiplying input channel i of
the second by s_i leaves y unchanged. s_i = sqrt(r1_i / r2_i), r1_i the first weight's range in
output channel i and r2_i the second's in input channel i, makes both ranges sqrt(r1_i r2_i):
per-tensor weight grids then fit every channel. Chains of three (depthwise-separable blocks:
pointwise, depthwise, pointwise) are equalized by iterating over their pairs until the scales
settle, as the paper does.

High-bias absorption: a channel whose pre-activation never falls below c_i > 0 on the
calibration data gives f(h_i) - c_i = f(h_i - c_i), so c_i leaves the first bias and enters the
second as W2 c (per output channel: the sum of its weights over the kernel times c). That is
exact only when the second layer reads no padding (a padded zero would then stand for -c_i): it
is done for second layers without pads (pointwise convolutions). Without an activation, any c_i
is exact; the channel's mid-range is taken, which centres it on zero.

Activation-range equalization: where both layers' weights are on per-channel grids and the
second is depthwise (each output channel reads one input channel), rescaling channel i costs the
weights nothing (each channel has its own grid), but the tensor between them is on one
per-tensor activation grid, where a channel of range r_i gets r_i / R of its codes (R the
widest channel's max |x|, measured on calibration data after the activation). Dividing channel
i by s_i = (r_i / R)^ACT_STRENGTH brings the channels' ranges together: all to R at strength 1
(per-channel activation grids for the price of a per-tensor one; NNCF quantizes such inputs per
channel instead, which onnxruntime cannot fuse into an integer Conv), to sqrt(r_i R) at 0.5.
Measured on PP-OCR det and cls, 0.5 and 1 gain the same; PP-OCR rec's output swings with the
strength (0.25 / 0.5 / 1: 0.50 / 0.67 / 0.57 exact-string agreement, against 0.65 without)
though the equalized tensor itself gains 13 dB at 1; 0.5 moves the model least for the gain
(bench/RESULTS_ALGORITHMS.md).

Clip (ReLU6) is not positively homogeneous: clip(h / s, 0, 6) is not clip(h, 0, 6) / s, so a
chain through it is left as it is (AIMET replaces ReLU6 by ReLU first, which changes the model).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from amq.graph.model import Graph

ACTIVATIONS = ("Relu", "LeakyRelu", "PRelu")  # positively homogeneous
MAX_ROUNDS = 64  # iterations over all pairs (a three-layer chain needs a few)
SETTLED = 1e-4  # stop when every scale of a round is within this of 1 (relative)
SCALE_BOUNDS = (1.0 / 4096.0, 4096.0)  # keeps a near-zero channel from blowing up its partner
ACT_STRENGTH = 0.5  # activation-range equalization: the exponent of r_i / R (module docstring)


@dataclass(frozen=True)
class Pair:
    """Two Conv nodes in a chain: ``first``'s output ``tensor`` reaches ``second`` through the
    activation node ``act`` (None: directly) as ``read``."""

    first: str
    second: str
    act: str | None
    tensor: str
    read: str


def _sole_reader(g: Graph, t: str) -> object | None:
    readers = g.consumers.get(t, [])
    if len(readers) != 1 or t in g.output_names:
        return None
    return readers[0]


def _own_constant(g: Graph, node, index: int) -> bool:
    """Input ``index`` of ``node`` is an initializer only this node reads (absent counts)."""
    if len(node.input) <= index or not node.input[index]:
        return index == 2  # a missing bias is fine, a missing weight is not
    name = node.input[index]
    return g.is_constant(name) and len(g.consumers.get(name, [])) == 1


def _conv_ok(g: Graph, node) -> bool:
    return (
        node.op_type == "Conv"
        and _own_constant(g, node, 1)
        and _own_constant(g, node, 2)
        and g.array(node.input[1]).ndim >= 3
    )


def find_pairs(g: Graph) -> list[Pair]:
    """Every Conv -> (Relu | LeakyRelu | PRelu | nothing) -> Conv chain of the main graph whose
    middle tensors have one reader each, whose weights and biases are initializers of their own,
    and whose channel counts match (groups and depthwise included)."""
    pairs: list[Pair] = []
    for n in g.nodes:
        if not _conv_ok(g, n):
            continue
        h = n.output[0]
        nxt = _sole_reader(g, h)
        act, read = None, h
        if nxt is not None and nxt.op_type in ACTIVATIONS:
            if nxt.op_type == "PRelu" and not g.is_constant(nxt.input[1]):
                continue
            act, read = nxt, nxt.output[0]
            nxt = _sole_reader(g, read)
        if nxt is None or not _conv_ok(g, nxt) or nxt.input[0] != read:
            continue
        c1 = g.array(n.input[1]).shape[0]
        w2 = g.array(nxt.input[1])
        if w2.shape[1] * int(g.attr(nxt, "group", 1)) != c1:
            continue
        if act is not None and act.op_type == "PRelu" and g.array(act.input[1]).size not in (1, c1):
            continue
        pairs.append(Pair(n.name, nxt.name, act.name if act is not None else None, h, read))
    return pairs


def depthwise(g: Graph, p: Pair) -> bool:
    """The second layer of ``p`` reads each input channel in a group of its own."""
    n2 = g.node_by_name[p.second]
    return g.array(n2.input[1]).shape[1] == 1 and int(g.attr(n2, "group", 1)) > 1


def out_ranges(w: np.ndarray) -> np.ndarray:
    """max |w| per output channel (axis 0) of a Conv weight."""
    return np.abs(w).reshape(w.shape[0], -1).max(axis=1)


def in_ranges(w: np.ndarray, group: int) -> np.ndarray:
    """max |w| per input channel of a Conv weight [Cout, Cin / group, k...], over every output
    channel that reads it (the output channels of its group)."""
    cout, cpg = w.shape[0], w.shape[1]
    a = np.abs(w).reshape(group, cout // group, cpg, -1)
    return a.max(axis=(1, 3)).reshape(-1)


def scale_inputs(w: np.ndarray, group: int, s: np.ndarray) -> np.ndarray:
    """The Conv weight with input channel i multiplied by s_i."""
    cout, cpg = w.shape[0], w.shape[1]
    a = w.reshape(group, cout // group, cpg, -1) * s.reshape(group, 1, cpg, 1)
    return a.reshape(w.shape)


def pair_scales(w1: np.ndarray, w2: np.ndarray, group2: int) -> np.ndarray:
    """Nagel's s_i = sqrt(r1_i / r2_i) (1 where a range is zero), within SCALE_BOUNDS."""
    r1, r2 = out_ranges(w1), in_ranges(w2, group2)
    ok = (r1 > 0) & (r2 > 0)
    s = np.ones_like(r1)
    s[ok] = np.sqrt(r1[ok] / r2[ok])
    return np.clip(s, *SCALE_BOUNDS)


def activation_scales(lo: np.ndarray, hi: np.ndarray, strength: float = ACT_STRENGTH) -> np.ndarray:
    """s_i = (r_i / R)^strength per channel of a tensor with observed range [lo, hi] (r_i =
    max |x|, R its largest): dividing channel i by s_i gives it r_i^(1 - strength) R^strength
    (R at strength 1; 1 where r_i is zero), within SCALE_BOUNDS."""
    r = np.maximum(np.abs(lo), np.abs(hi))
    top = float(r.max(initial=0.0))
    s = np.ones_like(r)
    if top > 0:
        s[r > 0] = (r[r > 0] / top) ** strength
    return np.clip(s, *SCALE_BOUNDS)


def rescale(g: Graph, arrays: dict[str, np.ndarray], p: Pair, s: np.ndarray) -> None:
    """Divide output channel i of ``p``'s first layer (weight row, bias) by s_i and multiply
    input channel i of its second by s_i (in ``arrays``, float64)."""
    n1, n2 = g.node_by_name[p.first], g.node_by_name[p.second]
    w1 = value(g, arrays, n1.input[1])
    arrays[n1.input[1]] = w1 / s.reshape((-1,) + (1,) * (w1.ndim - 1))
    if len(n1.input) > 2 and n1.input[2]:
        arrays[n1.input[2]] = value(g, arrays, n1.input[2]) / s
    w2 = value(g, arrays, n2.input[1])
    arrays[n2.input[1]] = scale_inputs(w2, int(g.attr(n2, "group", 1)), s)


def value(g: Graph, arrays: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """An initializer's current value: as edited in ``arrays``, else the model's (float64)."""
    return arrays[name] if name in arrays else g.array(name).astype(np.float64)


def _bias(g: Graph, node, arrays: Mapping[str, np.ndarray], channels: int) -> np.ndarray:
    if len(node.input) > 2 and node.input[2]:
        return value(g, arrays, node.input[2])
    return np.zeros(channels)


def bias_name(node) -> str:
    """The bias initializer of a Conv node, or the name a new one gets."""
    return node.input[2] if len(node.input) > 2 and node.input[2] else f"{node.name}.amq_bias"


def equalize(g: Graph, pairs: list[Pair]) -> dict[str, np.ndarray]:
    """Scales for every pair, iterated until they settle; the new values (float64) of the
    weights and biases they change."""
    arrays: dict[str, np.ndarray] = {}
    rounds, worst = 0, np.inf
    while rounds < MAX_ROUNDS and worst >= SETTLED:
        rounds += 1
        worst = 0.0
        for p in pairs:
            n1, n2 = g.node_by_name[p.first], g.node_by_name[p.second]
            w1, w2 = value(g, arrays, n1.input[1]), value(g, arrays, n2.input[1])
            s = pair_scales(w1, w2, int(g.attr(n2, "group", 1)))
            rescale(g, arrays, p, s)
            worst = max(worst, float(np.max(np.abs(np.log(s)), initial=0.0)))
    return arrays


def absorbable(g: Graph, p: Pair) -> bool:
    """The second layer reads no padding, so a constant moved into its input is exact."""
    n2 = g.node_by_name[p.second]
    pads = g.attr(n2, "pads", None)
    auto = g.attr(n2, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    return auto in ("NOTSET", "VALID") and not any(pads or [])


def absorbed_amount(act_op: str | None, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """c per channel of the pre-activation with observed range [lo, hi]: its lower bound where
    positive (f(h) - c = f(h - c) while h >= c >= 0), the mid-range without an activation."""
    if act_op is None:
        return (lo + hi) / 2.0
    return np.maximum(lo, 0.0)


def absorb(g: Graph, arrays: dict[str, np.ndarray], p: Pair, c: np.ndarray) -> list[str]:
    """Move c out of the first layer's bias into the second's (in ``arrays``); the two bias
    names."""
    n1, n2 = g.node_by_name[p.first], g.node_by_name[p.second]
    group2 = int(g.attr(n2, "group", 1))
    w2 = value(g, arrays, n2.input[1])
    b1 = _bias(g, n1, arrays, c.size)
    b2 = _bias(g, n2, arrays, w2.shape[0])
    cout, cpg = w2.shape[0], w2.shape[1]
    per_in = w2.reshape(group2, cout // group2, cpg, -1).sum(axis=3)  # [G, Cout/G, Cin/G]
    shift = np.einsum("goj,gj->go", per_in, c.reshape(group2, cpg)).reshape(-1)
    arrays[bias_name(n1)] = b1 - c
    arrays[bias_name(n2)] = b2 + shift
    return [bias_name(n1), bias_name(n2)]
