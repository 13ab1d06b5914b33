"""Bias correction of a Conv by linearity: the mean of a Conv's output over its positions is its
weight applied to, per input channel and kernel offset, the sum of the input values that offset
reads over all output positions (zero padding reads nothing). So E[W x] - E[W_q x_q] per output
channel needs only those window sums of x - x_q and of x_q,

    sum_pos (W x - W_q x_q) = W . S(x - x_q) + (W - W_q) . S(x_q),

[N, C_in, kernel offsets] a sample each, instead of a float and a quantized copy of the layer on
every position. Both terms are small by construction (a rounding error and a weight's rounding),
so nothing large is subtracted from something large.

The graph gives, per tensor, one ReduceSum over its rows (per residue class of the row stride)
and its first and last few rows (``Windows``); numpy takes off the rows an offset does not read
and sums the columns it reads, in float64. Shapes stay dynamic: every slice is counted from the
tensor's own ends, and numpy reads the rows' count of each batch. On the YOLOv8n layout model
(1024x1024 pages, fixed batch 1) bias correction went from 13.6 to 9.4 s, the float pass being
5.5 s; where a layer's convolution is cheap (depthwise, small maps) the copy stays (``pays``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from amq.graph import edit
from amq.quant import conv_geometry

END = np.iinfo(np.int64).max
# a layer takes the window sums from these sizes on (pays(); PP-OCR cls, whose layers are small,
# spent 0.2 s more with the sums everywhere, PP-OCR det with its depthwise layers 0.1 s)
MIN_MACS = 1 << 22  # multiply-adds a sample
MIN_MACS_PER_VALUE = 16  # multiply-adds an input value


def geometry(attrs: Mapping[str, object], w_shape: tuple[int, ...]) -> dict | None:
    """A Conv's kernel, strides, dilations, pads (begins then ends) and group, for 1-D and 2-D
    Convs with explicit or no padding; None where the window sums do not apply (SAME padding,
    whose pads depend on each input's size; 3-D)."""
    if len(w_shape) - 2 not in (1, 2) or conv_geometry.auto_pad(attrs) not in ("NOTSET", "VALID"):
        return None
    kernel = tuple(int(v) for v in w_shape[2:])
    return {"kernel": kernel, **conv_geometry.conv_geometry(attrs, w_shape, ())}


def pays(geo: Mapping, w_shape: tuple[int, ...], y_shape: tuple[int, ...]) -> bool:
    """Whether the window sums cost less than a quantized copy of the layer: they take a few
    passes over the input and a few small nodes and numpy steps, the copy a convolution. So
    a layer of at least MIN_MACS a sample whose convolution takes at least MIN_MACS_PER_VALUE
    multiply-adds per input value (a depthwise 3x3 takes 9: its copy costs about as much)."""
    macs = int(np.prod(y_shape[1:])) * int(np.prod(w_shape[1:]))
    per_value = w_shape[0] // max(geo["group"], 1) * int(np.prod(w_shape[2:]))
    return macs >= MIN_MACS and per_value >= MIN_MACS_PER_VALUE * int(np.prod(geo["strides"]))


def rows_read(offset: int, k: int, stride: int, dilation: int, begin: int, end: int) -> tuple:
    """(start, end, step) of the input rows kernel ``offset`` reads along one axis over all
    output positions, as a Slice takes them: ``end`` counted from the axis's end (END: to it),
    so that the rows hold for any input size. Rows in the padding are left out (zeros)."""
    start = offset * dilation - begin
    if start < 0:
        start %= stride  # the first row of the strided sequence inside the input
    last = end - dilation * (k - 1 - offset)  # rows of the padded input left after the window
    return start, (END if last >= 0 else last), stride


@dataclass(frozen=True)
class Windows:
    """What the graph gives of a tensor for one Conv's window sums: per residue class of rows
    an offset reads (modulo the row stride) the sum over those rows [N, C, W], and the first
    ``head`` and last ``tail`` rows whole [N, C, rows, W] (those some offset does not read).
    The rest is numpy's, exact in float64, on a few rows' worth of values."""

    geo: Mapping
    classes: tuple[int, ...]
    head: int
    tail: int


def windows(geo: Mapping) -> Windows:
    """What ``window_sums`` needs of a Conv's input, from its geometry (``geometry``)."""
    k, s, d = geo["kernel"][0], geo["strides"][0], geo["dilations"][0]
    nd = len(geo["kernel"])
    begin, end = geo["pads"][0], geo["pads"][nd]
    classes = sorted({rows_read(i, k, s, d, begin, end)[0] % s for i in range(k)})
    return Windows(geo, tuple(classes), max(0, d * (k - 1) - begin), max(0, d * (k - 1) - end))


def sum_nodes(g: onnx.GraphProto, x: str, win: Windows, opset: int) -> tuple[list, list[str]]:
    """The nodes and outputs ``window_sums`` reads for tensor ``x``: one ReduceSum over the rows
    of each class (a strided Slice first where the row stride is above 1) and two Slices of a
    few rows."""
    nodes: list[onnx.NodeProto] = []
    outs = []
    stride = win.geo["strides"][0]
    for r in win.classes:
        src = x
        if stride > 1:
            src = f"{x}/class{r}"
            nodes.append(_slice(g, x, src, r, END, stride))
        outs.append(f"{x}/sum{r}")
        nodes += edit.reduce_node(g, "ReduceSum", src, outs[-1], [2], opset)
    for name, rows, (lo, hi) in (
        ("head", win.head, (0, win.head)),
        ("tail", win.tail, (-win.tail, END)),
    ):
        if rows:
            outs.append(f"{x}/{name}")
            nodes.append(_slice(g, x, outs[-1], lo, hi, 1))
    return nodes, outs


def window_sums(win: Windows, parts: list[np.ndarray], h: int) -> np.ndarray:
    """[N, C, prod(kernel)]: per input channel and kernel offset (the weight's order), the sum
    over output positions of the input value that offset reads, from ``sum_nodes``' outputs
    ``parts`` of a tensor with ``h`` rows."""
    nd = len(win.geo["kernel"])
    it = iter(np.asarray(p, np.float64) for p in parts)
    cls = {r: next(it) for r in win.classes}
    head = next(it) if win.head else None
    tail = next(it) if win.tail else None
    if nd == 1:  # one spatial axis: its rows have one column each
        cls = {r: v[..., None] for r, v in cls.items()}
        head, tail = (None if v is None else v[..., None] for v in (head, tail))
    geo, pads = win.geo, win.geo["pads"]
    kw, sw, dw = (
        (geo["kernel"][1], geo["strides"][1], geo["dilations"][1]) if nd == 2 else (1, 1, 1)
    )
    left, right = (pads[1], pads[3]) if nd == 2 else (0, 0)
    k, s, d = geo["kernel"][0], geo["strides"][0], geo["dilations"][0]
    n, c, w = next(iter(cls.values())).shape
    cols = np.empty((k, n, c, w))  # per row offset, the column sums of the rows it reads
    for i in range(k):
        lo, hi, _ = rows_read(i, k, s, d, pads[0], pads[nd])
        cols[i] = cls[lo % s]
        for a in _left_out(lo, h if hi == END else h + hi, s, h):  # of its class, not read
            cols[i] -= _row(a, head, tail, h)
    read = np.zeros((w, kw))  # which columns each column offset reads
    for j in range(kw):
        c0, c1, _ = rows_read(j, kw, sw, dw, left, right)
        read[c0 : (w if c1 == END else w + c1) : sw, j] = 1.0
    return (cols @ read).transpose(1, 2, 0, 3).reshape(n, c, -1)


def _left_out(lo: int, stop: int, s: int, h: int) -> list[int]:
    """The rows of residue class ``lo % s`` in [0, h) outside [lo, stop): before the first row
    an offset reads, and from its end on."""
    r = lo % s
    first_after = max(stop, r)
    first_after += (r - first_after) % s
    return [*range(r, min(lo, h), s), *range(first_after, h, s)]


def _row(a: int, head: np.ndarray | None, tail: np.ndarray | None, h: int) -> np.ndarray:
    """Row ``a`` of a tensor with ``h`` rows, from its first rows or its last ones."""
    if head is not None and a < head.shape[2]:
        return head[:, :, a]
    assert tail is not None and a >= h - tail.shape[2]
    return tail[:, :, a - (h - tail.shape[2])]


def _slice(g: onnx.GraphProto, x: str, y: str, lo: int, hi: int, step: int) -> onnx.NodeProto:
    ins = [x]
    for what, v in (("starts", lo), ("ends", hi), ("axes", 2), ("steps", step)):
        ins.append(f"{y}/{what}")
        g.initializer.append(numpy_helper.from_array(np.asarray([v], np.int64), ins[-1]))
    return helper.make_node("Slice", ins, [y], name=y)


def output_sums(
    w: np.ndarray, wq: np.ndarray, s_diff: np.ndarray, s_xq: np.ndarray, group: int
) -> np.ndarray:
    """Per sample and output channel [N, C_out], the sum over output positions of W x - W_q x_q,
    from the window sums of x - x_q and x_q [N, C_in, kernel offsets] (float64)."""
    c_out = w.shape[0]
    w64 = np.asarray(w, np.float64).reshape(group, c_out // group, w.shape[1], -1)
    dw = w64 - np.asarray(wq, np.float64).reshape(w64.shape)
    n = s_diff.shape[0]
    d = np.asarray(s_diff, np.float64).reshape(n, group, w.shape[1], -1)
    q = np.asarray(s_xq, np.float64).reshape(d.shape)
    out = np.einsum("gock,ngck->ngo", w64, d) + np.einsum("gock,ngck->ngo", dw, q)
    return out.reshape(n, c_out)
