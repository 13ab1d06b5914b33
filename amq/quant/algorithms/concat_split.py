"""Concat split (#13 point 6): a layer that reads a Concat of tensors whose ranges differ a lot
(a detector head's 0..1 scores beside 0..500 box coordinates) gets one input grid for both, and
the narrow part reads as a few steps or zeros. The Concat guard keeps such an input float; the
split instead computes the layer per input-channel group, each group on its own grid (the
tensors the Concat joined, which calibration observes anyway), the partial outputs summed:

    Y = Conv(Concat(a, b), W, B)  ->  Y = Conv(a, W[:, :ca], B) + Conv(b, W[:, ca:])

which the float model computes the same (up to the order of the sums), and each part keeps an
integer kernel. Each part's weight gets per-channel scales of its own. Layers: Conv with one
group (the Concat along channels) and MatMul with a 2-D constant weight (the Concat along the
last axis). The first part keeps the layer's name, so settings and reports that name it still
apply; the others are ``<name>_part<i>``, and the sums ``<name>_part_sum<i>``.

Whether a split pays is measured (calib/concat_splitting.py): the layer's relative output
error on calibration samples with its input float (what the guard does) and split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from amq.graph.model import Graph, NameScope, all_names, drop_unused_initializers, names_read

SPLIT_FACTOR = 2.0  # split where its error is at most this times the float input's (3 dB)


@dataclass(frozen=True)
class Candidate:
    """A layer reading a Concat's output as its data input: ``parts`` are the Concat's inputs
    (each an input-channel group of the layer)."""

    concat: str
    layer: str
    parts: tuple[str, ...]
    weight: str
    op_type: str

    @property
    def channel_axis(self) -> int:
        """The axis of the layer's weight that runs over its input channels."""
        return 1 if self.op_type == "Conv" else 0


@dataclass(frozen=True)
class Decision:
    """A candidate measured: the input-channel widths of its parts, the Concat inputs' range
    ratio, and the layer's relative output errors with its input float, on one grid, and split."""

    cand: Candidate
    widths: tuple[int, ...]
    ratio: float
    err_float: float
    err_one: float
    err_split: float
    split: bool

    def describe(self) -> str:
        verdict = "split" if self.split else "input kept float"
        return (
            f"{self.cand.layer}: Concat inputs' ranges differ {self.ratio:.0f}x; layer output SQNR "
            f"{_db(self.err_one)} dB on one grid, {_db(self.err_split)} dB split, "
            f"{_db(self.err_float)} dB with its input float: {verdict}"
        )


def _db(err: float) -> str:
    return "inf" if err <= 0 else f"{-10 * np.log10(err):.1f}"


def find_candidates(g: Graph) -> list[Candidate]:
    """Layers whose data input is a Concat's output along their input-channel axis."""
    out = []
    for c in g.nodes:
        if c.op_type != "Concat" or len(c.input) < 2 or any(g.is_constant(t) for t in c.input):
            continue
        axis = next((a.i for a in c.attribute if a.name == "axis"), 0)
        for n in g.consumers.get(c.output[0], []):
            if len(n.input) < 2 or n.input[0] != c.output[0] or not g.is_constant(n.input[1]):
                continue
            w = g.array(n.input[1])
            conv = n.op_type == "Conv" and g.attr(n, "group", 1) == 1 and axis == 1
            rank = len(g.shape(c.output[0]) or ())
            last = axis == -1 or (rank > 0 and axis == rank - 1)
            matmul = n.op_type == "MatMul" and w.ndim == 2 and last
            if conv or matmul:
                out.append(Candidate(c.name, n.name, tuple(c.input), n.input[1], n.op_type))
    return out


def range_ratio(widths: list[float]) -> float:
    """How many times the widest range (each including 0) exceeds the narrowest."""
    return float(max(widths) / min(widths)) if min(widths) > 0 else float("inf")


def part_weights(w: np.ndarray, widths: tuple[int, ...], axis: int) -> list[np.ndarray]:
    """The slices of ``w`` along ``axis`` that each part multiplies."""
    edges = np.cumsum((0, *widths))
    return [
        np.take(w, np.arange(a, b), axis=axis) for a, b in zip(edges[:-1], edges[1:], strict=True)
    ]


def apply(model: onnx.ModelProto, chosen: list[Decision]) -> onnx.ModelProto:
    """A copy of ``model`` with each chosen layer computed per part and summed into its original
    output; a Concat (and a weight) that nothing reads any more is removed."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    scope = NameScope(all_names(model))
    inits = {t.name: t for t in g.initializer}
    replaced: dict[str, list[onnx.NodeProto]] = {}
    for d in chosen:
        node = next(n for n in g.node if n.name == d.cand.layer)
        w = numpy_helper.to_array(inits[d.cand.weight])
        weights = part_weights(w, d.widths, d.cand.channel_axis)
        replaced[node.name] = _parts(out, node, weights, d.cand, scope)
    nodes = []
    for n in g.node:
        nodes.extend(replaced.get(n.name, [n]))
    g.ClearField("node")
    g.node.extend(nodes)
    concats = {d.cand.concat for d in chosen}
    read = names_read(g.node) | {o.name for o in g.output}
    nodes = [n for n in g.node if n.name not in concats or n.output[0] in read]
    g.ClearField("node")
    g.node.extend(nodes)
    made = {o for n in nodes for o in n.output}  # no shape left of a removed Concat's output
    kept = [v for v in g.value_info if v.name in made]
    g.ClearField("value_info")
    g.value_info.extend(kept)
    drop_unused_initializers(out, {d.cand.weight for d in chosen})
    return out


def _parts(
    model: onnx.ModelProto,
    node: onnx.NodeProto,
    weights: list[np.ndarray],
    cand: Candidate,
    scope: NameScope,
) -> list[onnx.NodeProto]:
    """The part layers (the first keeps ``node``'s name and bias) and the sums into its output."""
    name, y = node.name, node.output[0]
    nodes, outs = [], []
    for i, (x, w) in enumerate(zip(cand.parts, weights, strict=True)):
        w_name = scope.new(f"{cand.weight}_part{i}")
        model.graph.initializer.append(numpy_helper.from_array(w.astype(np.float32), w_name))
        part = onnx.NodeProto()
        part.CopyFrom(node)
        part.name = name if i == 0 else scope.new(f"{name}_part{i}")
        bias = list(node.input[2:3]) if i == 0 else []
        del part.input[:]
        part.input.extend([x, w_name, *bias])
        part.output[0] = scope.new(f"{y}_part{i}")
        nodes.append(part)
        outs.append(part.output[0])
    acc = outs[0]
    for i, o in enumerate(outs[1:], 1):
        s = y if i == len(outs) - 1 else scope.new(f"{y}_part_sum{i}")
        nodes.append(helper.make_node("Add", [acc, o], [s], name=scope.new(f"{name}_part_sum{i}")))
        acc = s
    return nodes
