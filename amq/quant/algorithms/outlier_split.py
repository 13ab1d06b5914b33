"""Outlier split: a MatMul whose activation input carries a few outlier channels (the massive
dimensions of a transformer's LayerNorm and GELU outputs, 10-100x the median channel) is split
by input channel into two MatMuls, each on its own activation grid, their outputs summed:

    Y = X @ W  ->  Y = X @ W0 + Gather(X, outliers) @ W[outliers]

where W0 is W with the outlier rows zeroed. X's own grid is fitted on its other channels
(calib/workspace.root_stats): it clips the outlier channels, whose rows in W0 are zero, so the
main MatMul reads X as it is (no copy of the tensor: onnxruntime's Gather of most channels of a
[B, S, 3072] tensor took 19% of paraphrase-MiniLM-L3-v2's run time) and only the few outlier
channels are gathered, onto a grid of their own (registry OWN_GRID on the Gather). The float
model computes the same (up to the order of the sums). Unlike SmoothQuant, the weights
are not rescaled: SmoothQuant moves the outliers into the weight rows they multiply, and with
weights quantized per output channel those rows then set every column's step (measured on
all-mpnet-base-v2: weights-only SQNR of the pooled embedding 28.6 dB unsmoothed, 19.0 dB after
SmoothQuant). Here the outlier rows get a weight scale of their own as well.

Which channels: the top-k by absolute range, k chosen on calibration rows by the group's output
error (the error model of smoothquant.group_error: ranges fitted on one half of the samples,
scored on the other). The decision between no change, SmoothQuant and a split is made per group
in calib/smoothing.py on that one error scale. Only MatMul members (not Gemm: its bias and
transposes are not worth a second form); the same split serves every MatMul reading the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import helper, numpy_helper

from amq.graph.model import Graph, NameScope, all_names
from amq.quant import qmath
from amq.quant.algorithms.smoothquant import (
    Group,
    LayerGrid,
    Sample,
    fitted_grid,
    float_outputs,
    output_error,
)
from amq.quant.registry import OWN_GRID

MAX_FRACTION = 0.05  # at most this share of a tensor's channels goes to the outlier part
MIN_RATIO = 2.0  # a channel is a candidate when its absolute range exceeds the median's this much
MIN_CHANNELS = 16


@dataclass(frozen=True)
class Split:
    """What was decided for a group: the input channels read by the outlier MatMul (sorted),
    and the relative output errors with no change (``err_off``) and split (``err``)."""

    group: Group
    index: tuple[int, ...]
    channels: int
    err_off: float
    err: float

    @property
    def layers(self) -> list[str]:
        return [m.node for m in self.group.members]

    def describe(self) -> str:
        return (
            f"outlier split {', '.join(self.layers)}: {len(self.index)} of {self.channels} input "
            f"channels on a grid of their own, error {self.err_off:.3g} -> {self.err:.3g}"
        )


def eligible(g: Graph, group: Group) -> bool:
    """Every member is a MatMul (a Gemm keeps its single form)."""
    return all(g.node_by_name[m.node].op_type == "MatMul" for m in group.members)


def candidates(absmax: np.ndarray) -> list[np.ndarray]:
    """Channel sets to try: the top-k channels by absolute range, k = 1, 2, 4, ... up to
    MAX_FRACTION of the channels (at least 2), each channel at least MIN_RATIO x the median's range."""
    k_all = absmax.shape[0]
    if k_all < MIN_CHANNELS:
        return []
    order = np.argsort(-absmax, kind="stable")
    wide = int(np.sum(absmax > MIN_RATIO * max(float(np.median(absmax)), 1e-30)))
    top = min(wide, max(2, int(MAX_FRACTION * k_all)))  # small layers: still a pair
    sets, k = [], 1
    while k <= top:
        sets.append(np.sort(order[:k]))
        k *= 2
    return sets


def _quantized_parts(
    weights: list[np.ndarray], sels: tuple[np.ndarray, np.ndarray], bits: int
) -> list[list[np.ndarray]]:
    """Per weight ([K, N]), the rows of each channel set fake-quantized per output channel on
    their own, as float32."""
    return [[qmath.fake_quantize_weight(w[sel], bits, 1) for sel in sels] for w in weights]


def split_error(
    fit: Sample,
    test: Sample,
    weights: list[np.ndarray],
    index: np.ndarray,
    grid: LayerGrid,
    known: tuple[list[np.ndarray], list[list[np.ndarray]]] | None = None,
) -> float:
    """Relative output error (sum over members) on ``test``'s rows when the channels ``index``
    and the others are each quantized on their own per-tensor grid fitted on ``fit`` (the others
    at their extremes, as ``masked`` calibrates them), and each part's weight rows ([K, N]
    weights) per output channel. ``known``: ``test``'s float outputs (smoothquant.float_outputs)
    and the weights' quantized parts (index, then the rest), when already computed."""
    rest = np.setdiff1d(np.arange(fit.rows.shape[1]), index)
    x = test.rows64
    if known is None:
        refs = [x @ w for w in weights]
        known = refs, _quantized_parts(weights, (index, rest), grid.weight_bits)
    refs, wparts = known
    parts = []
    for sel, g in ((index, grid), (rest, replace(grid, method="minmax"))):
        lo, hi = float(np.min(fit.lo[sel])), float(np.max(fit.hi[sel]))
        rows = fit.rows if g.method == "minmax" else fit.rows[:, sel]  # minmax: no histogram
        scale, zp, agrid = fitted_grid(rows, lo, hi, g)
        parts.append(qmath.fake_quantize(x[:, sel], scale, zp, agrid, overwrite=True))
    # float32 operands and products, as smoothquant.group_error: their rounding is 1e-7 of an
    # error measured at 1e-2 .. 1e-5
    return sum(
        output_error([xq @ w for xq, w in zip(parts, wq, strict=True)], ref)
        for ref, wq in zip(refs, wparts, strict=True)
    )


def best_split(
    halves: tuple[Sample, Sample],
    weights: list[np.ndarray],
    grid: LayerGrid,
    refs: tuple[list[np.ndarray], list[np.ndarray]] | None = None,
) -> tuple[float, np.ndarray] | None:
    """The channel set with the lowest two-fold error and that error, or None (no candidate).
    ``refs``: each half's float outputs (smoothquant.float_outputs), when already computed."""
    both_lo = np.minimum(halves[0].lo, halves[1].lo)
    both_hi = np.maximum(halves[0].hi, halves[1].hi)
    if refs is None:
        refs = (float_outputs(halves[0], weights), float_outputs(halves[1], weights))
    folds = ((halves[0], halves[1], refs[1]), (halves[1], halves[0], refs[0]))
    best: tuple[float, np.ndarray] | None = None
    for index in candidates(np.maximum(np.abs(both_lo), np.abs(both_hi))):
        rest = np.setdiff1d(np.arange(both_lo.shape[0]), index)
        wq = _quantized_parts(weights, (index, rest), grid.weight_bits)  # both folds': the same
        e = sum(split_error(f, t, weights, index, grid, (r, wq)) for f, t, r in folds)
        if best is None or e < best[0]:
            best = (e, index)
    return best


# ---------------------------------------------------------------------------------------------
# The edit


def apply_splits(model: onnx.ModelProto, splits: list[Split], copy: bool = True) -> onnx.ModelProto:
    """A copy of ``model`` (``copy=False``: the model itself, edited in place) with every split
    applied. The member keeps its node name, still reads the whole tensor and its weight with
    the outlier rows zeroed (so the activation grid that clips the outlier channels costs
    nothing: see ``masked``); ``<tensor>_outliers`` gathers the outlier channels (a copy of a
    few channels, not of the tensor), ``<name>_outliers`` multiplies them by the outlier rows,
    ``<name>_outlier_sum`` adds both into the member's original output."""
    out = model
    if copy:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    scope = NameScope(all_names(model))
    before: dict[str, list[onnx.NodeProto]] = {}
    after: dict[str, list[onnx.NodeProto]] = {}
    for sp in splits:
        x = sp.group.tensor
        index = np.asarray(sp.index, dtype=np.int64)
        const, x_o = scope.new(f"{x}_outlier_channels"), scope.new(f"{x}_outliers")
        out.graph.initializer.append(numpy_helper.from_array(index, const))
        gather = helper.make_node(
            "Gather", [x, const], [x_o], name=scope.new(f"{x_o}_gather"), axis=-1
        )
        gather.doc_string = OWN_GRID  # not the grid of x, which clips these channels
        before[sp.group.members[0].node] = [gather]
        for m in sp.group.members:
            after[m.node] = _split_member(out, m.node, m.weight, (index, x_o), scope)
    nodes = []
    for n in out.graph.node:
        nodes.extend(before.get(n.name, []))
        nodes.append(n)
        nodes.extend(after.get(n.name, []))
    out.graph.ClearField("node")
    out.graph.node.extend(nodes)
    return out


def _split_member(
    model: onnx.ModelProto,
    name: str,
    weight_name: str,
    outliers: tuple[np.ndarray, str],
    scope: NameScope,
) -> list[onnx.NodeProto]:
    """Zero the outlier rows of node ``name``'s weight, rename its output; return the outlier
    MatMul and the sum that writes the original output."""
    index, x_o = outliers
    live = next(n for n in model.graph.node if n.name == name)
    weight = next(t for t in model.graph.initializer if t.name == weight_name)
    w = numpy_helper.to_array(weight)
    w_o = scope.new(f"{weight.name}_outliers")
    model.graph.initializer.append(numpy_helper.from_array(w[index], w_o))
    main = w.copy()
    main[index] = 0.0
    weight.CopyFrom(numpy_helper.from_array(main, weight.name))
    y = live.output[0]
    y_m, y_o = scope.new(f"{y}_main"), scope.new(f"{y}_outliers")
    live.output[0] = y_m
    mm = helper.make_node("MatMul", [x_o, w_o], [y_o], name=scope.new(f"{name}_outliers"))
    add = helper.make_node("Add", [y_m, y_o], [y], name=scope.new(f"{name}_outlier_sum"))
    return [mm, add]


def masked(decisions: list) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """Per split tensor: its outlier channels (along the last axis) and the layers that read it
    with those weight rows zeroed. Calibration gives such a tensor the range of its other
    channels when those layers are its only quantized readers."""
    return {d.group.tensor: (d.index, tuple(d.layers)) for d in decisions if isinstance(d, Split)}


def inserted_ops(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes outlier splits added (Gathers, outlier MatMuls, sums)."""
    tails = ("_gather", "_outliers", "_outlier_sum")
    return [n.name for n in model.graph.node if n.name.endswith(tails)]
