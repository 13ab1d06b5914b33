"""Bias correction: per output channel of a quantized layer with an int32 bias (Conv,
ConvTranspose, Gemm), the mean over calibration data of what quantizing its input and its weight
changes in its output, E[W x] - E[W_q x_q], added to its bias (Nagel et al., 2019; NNCF's fast
bias correction).

x is the float model's input to the layer, read on calibration samples, and x_q its copy on the
plan's own grid: each layer is corrected for its own rounding and clipping alone, never for the
errors of the layers before it. A correction then depends only on the data and the layer's own
two grids, like the overflow guard's measurement, and is kept per (layer, grids), so
sensitivity and search pay for each layer once per bit width.

NNCF estimates E[W_q x_q] by passing the per-channel mean of x through the quantized layer (one
evaluation, exact only where the layer is affine and x's rounding has zero mean). Here the
difference is summed over every calibration position, exactly: the probe model holds, beside the
float model, for each target layer either the window sums of x - DQ(Q(x)) and DQ(Q(x)) from
which numpy gets a Conv's output sums by linearity (window_sums.py: where the convolution is
costly), or a copy of the layer on [DQ(Q(x)), DQ(Q(W))] whose output difference is reduced to
one sum per channel; onnxruntime runs all layers in one pass over the data.

A channel whose mean difference is within ``NOISE`` standard errors of zero (its samples' means
scatter more than the shift) keeps its bias: the shift would be noise of this calibration set.

The pass stops reading samples once every layer's shift is known well enough: at a checkpoint
(8, 16, 32 samples) where, for every layer, the standard errors of its channels' shifts, RMS
over the channels, are under ``SETTLED`` steps of its output grid. The error then left in a bias
adds under 3% to the power of the rounding noise on that grid (step^2 / 12). On the YOLOv8n
layout detector (1024^2 pages) all layers have settled at 16 samples; on the small OCR models
some never do, and the pass reads every sample (at most the pass's 64).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from amq.config import SmoothMode
from amq.graph import edit
from amq.graph.model import Graph, opset_version
from amq.plan import LayerPlan, QuantPlan, TensorPlan
from amq.quant import qmath
from amq.quant.algorithms import adaround, window_sums
from amq.quant.registry import output_channel_axis

NOISE = 2.0  # a channel's shift is kept when |mean| >= NOISE x its standard error over samples
SETTLED = 0.05  # a layer has read enough once its shifts' standard error (RMS) is this many steps
CHECKPOINTS = (8, 16, 32)  # ... looked at after exactly these many samples, whatever the batches
PREFIX = "amq_bias_correction"


# the layer kinds ``auto`` corrects: where the ablation on real models found it helps
# (bench/RESULTS_ALGORITHMS.md)
AUTO_OPS = frozenset({"Conv", "ConvTranspose", "Gemm"})


def targets(plan: QuantPlan, mode: SmoothMode = SmoothMode.ON) -> list[LayerPlan]:
    """The layers bias correction applies to under ``mode``: quantized, a constant weight on a
    per-tensor or per-channel grid, an int32 bias of their own, a calibrated (static) activation
    input; of the AUTO_OPS kinds on auto, none when off."""
    out: list[LayerPlan] = []
    if mode == SmoothMode.OFF:
        return out
    for lp in plan.layers.values():
        if mode == SmoothMode.AUTO and lp.op_type not in AUTO_OPS:
            continue
        if not lp.quantized or lp.act_dynamic or lp.block_size or not lp.act_inputs:
            continue
        w = plan.tensors.get(lp.weight or "")
        b = plan.tensors.get(lp.bias or "")
        x = plan.tensors.get(lp.act_inputs[0])
        if w is None or b is None or x is None or b.consumers != [lp.name] or w.block_size:
            continue
        out.append(lp)
    return out


def dequantized_weight(tp: TensorPlan, w: np.ndarray) -> np.ndarray:
    """The float values the quantized model multiplies with: DQ(Q(w)) on the plan's grid (its
    learned rounding included)."""
    scale = np.asarray(tp.scale, dtype=np.float64)
    zp = np.asarray(tp.zero_point, dtype=np.int64)
    if tp.axis is None:
        return qmath.dequantize(adaround.codes(tp, w), scale[0], zp[0])
    return qmath.dequantize(adaround.codes(tp, w), scale, zp, tp.axis)


@dataclass
class Probe:
    """The float model plus, per target layer, three outputs. A layer copied on its quantized
    input and weight: the sum and the mean over positions of y - y_q per sample and channel
    [N, C], and the shape [N, C, L] of the difference. A Conv done by its window sums (``sums``:
    its float and quantized weight and group): the window sums of x - x_q and of x_q [N, C_in,
    kernel offsets] and its output's shape."""

    model: onnx.ModelProto
    outputs: dict[str, list[str]] = field(default_factory=dict)
    sums: dict[str, tuple[np.ndarray, np.ndarray, window_sums.Windows]] = field(
        default_factory=dict
    )

    def terms(self, name: str, values: Mapping[str, np.ndarray]) -> tuple:
        """One batch's (per-sample sums [N, C], per-sample means [N, C], [N, C, positions]) of
        layer ``name``'s output difference, from the probe's outputs ``values``."""
        got = [values[o] for o in self.outputs[name]]
        if name not in self.sums:
            return tuple(got)
        w, wq, win = self.sums[name]
        x_shape, y_shape = got[-2:]
        half = (len(got) - 2) // 2  # the parts of x - x_q, then those of x_q
        s_d, s_q = (
            window_sums.window_sums(win, p, int(x_shape[2])) for p in (got[:half], got[half:-2])
        )
        totals = window_sums.output_sums(w, wq, s_d, s_q, win.geo["group"])
        positions = int(np.prod(y_shape[2:]))
        return totals, totals / max(positions, 1), (y_shape[0], y_shape[1], positions)


def probe_model(
    graph: Graph,
    plan: QuantPlan,
    layers: list[LayerPlan],
    shapes: Mapping[str, tuple[int, ...]],
) -> Probe:
    """The probe model for ``layers`` (``shapes``: each layer's output shape as probed; a layer
    whose output channels are not on axis 1 is left out)."""
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    del model.graph.output[:]
    g = model.graph
    opset = opset_version(model)
    probe = Probe(model)
    after: dict[str, list[onnx.NodeProto]] = {}  # each layer's probe nodes, placed right after it
    for lp in layers:
        if output_channel_axis(lp.op_type, len(shapes[lp.name])) != 1:
            continue
        node = graph.node_by_name[lp.name]
        b = f"{PREFIX}/{lp.name}"
        xt = plan.tensors[lp.act_inputs[0]]
        zp = np.asarray(xt.zero_point[0])
        g.initializer.extend(
            [
                edit.float_tensor(f"{b}/x_scale", xt.scale[0]),
                edit.int_tensor(f"{b}/x_zp", zp, edit.elem_type(xt.bits, xt.signed)),
            ]
        )
        quantized = [
            edit.quantize_node(f"{b}/Q", xt.name, f"{b}/x_scale", f"{b}/x_zp", f"{b}/xc"),
            edit.dequantize_node(f"{b}/DQ", f"{b}/xc", f"{b}/x_scale", f"{b}/x_zp", f"{b}/xq"),
        ]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        wt = plan.tensors[lp.weight]  # type: ignore[index]
        w = graph.array(wt.name)
        geo = window_sums.geometry(attrs, w.shape) if lp.op_type == "Conv" else None
        if geo is not None and window_sums.pays(geo, w.shape, shapes[lp.name]):
            win = window_sums.windows(geo)
            probe.sums[lp.name] = (w, dequantized_weight(wt, w), win)
            nodes, probe.outputs[lp.name] = _sum_nodes(g, node, b, win, opset)
        else:
            nodes = _copy_nodes(g, (node, attrs), lp, b, dequantized_weight(wt, w), opset)
            probe.outputs[lp.name] = [n.output[0] for n in nodes[-3:]]
        after[node.name] = quantized + nodes
        g.output.extend(onnx.ValueInfoProto(name=o) for o in probe.outputs[lp.name])
    # in graph order, each probe right after its layer: onnxruntime then frees the layer's copy
    # and difference before the next layer runs, instead of keeping every one to the end
    nodes = [m for n in g.node for m in (n, *after.get(n.name, ()))]
    del g.node[:]
    g.node.extend(nodes)
    return probe


def _copy_nodes(
    g: onnx.GraphProto,
    layer: tuple[onnx.NodeProto, dict],
    lp: LayerPlan,
    b: str,
    w: np.ndarray,
    opset: int,
) -> list[onnx.NodeProto]:
    """The layer's own output minus a copy (``layer``: its node and attributes) on the quantized
    input ``{b}/xq`` and weight ``w`` (same bias), reduced: the last three nodes write the sum,
    the means and the shape."""
    node, attrs = layer
    g.initializer.extend(
        [
            edit.float_tensor(f"{b}/w", w),
            numpy_helper.from_array(np.asarray([0, 0, -1], np.int64), f"{b}/to"),
        ]
    )
    x, wname = lp.act_inputs[0], lp.weight
    ins_q = [f"{b}/xq" if i == x else (f"{b}/w" if i == wname else i) for i in node.input]
    return [
        helper.make_node(lp.op_type, ins_q, [f"{b}/yq"], name=f"{b}/q", **attrs),
        helper.make_node("Sub", [node.output[0], f"{b}/yq"], [f"{b}/d"], name=f"{b}/sub"),
        helper.make_node("Reshape", [f"{b}/d", f"{b}/to"], [f"{b}/r"], name=f"{b}/r"),
        *edit.reduce_node(g, "ReduceSum", f"{b}/r", f"{b}/sum", [2], opset),
        *edit.reduce_node(g, "ReduceMean", f"{b}/r", f"{b}/mean", [2], opset),
        helper.make_node("Shape", [f"{b}/r"], [f"{b}/shape"], name=f"{b}/shape"),
    ]


def _sum_nodes(
    g: onnx.GraphProto, node: onnx.NodeProto, b: str, win: window_sums.Windows, opset: int
) -> tuple[list[onnx.NodeProto], list[str]]:
    """What the window sums of x - x_q and of x_q read (window_sums.py), then the shapes of x
    and of the layer's output: the nodes and their outputs, in that order."""
    x = node.input[0]
    sub = helper.make_node("Sub", [x, f"{b}/xq"], [f"{b}/dx"], name=f"{b}/sub")
    d, d_outs = window_sums.sum_nodes(g, f"{b}/dx", win, opset)
    q, q_outs = window_sums.sum_nodes(g, f"{b}/xq", win, opset)
    shapes = [
        helper.make_node("Shape", [x], [f"{b}/x_shape"], name=f"{b}/x_shape"),
        helper.make_node("Shape", [node.output[0]], [f"{b}/shape"], name=f"{b}/shape"),
    ]
    return [sub, *d, *q, *shapes], [*d_outs, *q_outs, f"{b}/x_shape", f"{b}/shape"]


class Accumulator:
    """Sums of one layer's probe outputs over batches: the positions-weighted mean difference
    per channel, and the per-sample means' spread for the noise test. ``step``: the layer's
    output grid step, against which it has read enough at a checkpoint (``settled``); None:
    never, every sample is read."""

    def __init__(self, step: float | None = None) -> None:
        self.total: np.ndarray | None = None
        self.positions = 0
        self.samples = 0
        self.m1: np.ndarray | None = None  # sum over samples of the per-sample means
        self.m2: np.ndarray | None = None  # ... of their squares
        self.step = step
        self.settled: dict[int, tuple] = {}  # checkpoint -> the sums then, where it had settled

    def add(self, totals: np.ndarray, means: np.ndarray, shape: np.ndarray) -> None:
        """One batch's per-sample sums and means [N, C], ``shape`` [N, C, positions a sample]:
        added sample by sample in float64, so that any batching of the same samples gives the
        same result (the memory budget may choose the batch)."""
        totals = np.asarray(totals, np.float64).reshape(-1, np.shape(means)[-1])
        means = np.asarray(means, np.float64).reshape(totals.shape)
        if self.total is None:
            self.total = np.zeros(totals.shape[1])
            self.m1 = np.zeros(totals.shape[1])
            self.m2 = np.zeros(totals.shape[1])
        for t, m in zip(totals, means, strict=True):
            self.total += t
            self.m1 += m  # type: ignore[operator]
            self.m2 += m**2  # type: ignore[operator]
            self.positions += int(shape[2])
            self.samples += 1
            if self.samples in CHECKPOINTS and self._settles():
                sums = (self.total.copy(), self.m1.copy(), self.m2.copy(), self.positions)
                self.settled[self.samples] = sums

    def rewind(self, checkpoint: int) -> None:
        """Back to the sums of the first ``checkpoint`` samples (one of ``settled``): where the
        pass stops, whatever batch it stopped in."""
        total, m1, m2, self.positions = self.settled[checkpoint]
        self.total, self.m1, self.m2, self.samples = total, m1, m2, checkpoint

    def _settles(self) -> bool:
        """Its channels' standard errors, RMS, are under SETTLED steps of its output grid."""
        if not self.step or self.samples < 2:
            return False
        return float(np.sqrt(np.mean(self._stderr() ** 2))) <= SETTLED * self.step

    def _stderr(self) -> np.ndarray:
        """The standard error of each channel's mean, from the spread of the per-sample means."""
        assert self.m1 is not None and self.m2 is not None
        n = self.samples
        var = np.maximum(self.m2 / n - (self.m1 / n) ** 2, 0.0) * n / (n - 1)
        return np.sqrt(var / n)

    def shift(self) -> np.ndarray:
        """The correction per channel: the mean difference, 0 where it is within NOISE standard
        errors of zero (the spread of the per-sample means; one sample: kept)."""
        assert self.total is not None
        mean = self.total / max(self.positions, 1)
        if self.samples < 2:
            return mean
        return np.where(np.abs(mean) >= NOISE * self._stderr(), mean, 0.0)


def settled(accumulators: Iterable[Accumulator]) -> int | None:
    """The first checkpoint at which every layer had settled (the pass may stop there and each
    layer ``rewind`` to it), or None."""
    common = set(CHECKPOINTS)
    for a in accumulators:
        common &= a.settled.keys()
    return min(common) if common else None


def output_step(plan: QuantPlan, lp: LayerPlan) -> float | None:
    """The step of the grid ``lp``'s output lands on (its largest), or None where it stays
    float: the unit its shift's precision is judged in (Accumulator)."""
    t = plan.tensors.get(lp.outputs[0]) if lp.outputs else None
    if t is None or t.role != "activation" or not t.scale:
        return None
    return float(np.max(t.scale))


def apply(plan: QuantPlan, shifts: Mapping[str, np.ndarray], weight) -> list[str]:
    """Add each layer's shift to its bias plan (``correction``); returns one note per layer
    corrected. ``weight``: name -> float array of the model."""
    done = []
    for name, shift in shifts.items():
        lp = plan.layers[name]
        tp = plan.tensors[lp.bias]  # type: ignore[index]
        bias = np.asarray(weight(tp.name), np.float64).reshape(-1)
        if not np.any(shift) or shift.size != bias.size:
            tp.correction = []
            continue
        # whole steps of the int32 bias grid that 8-bit operands would give: the codes move by
        # integers. Another CPU's float kernels still move a shift a little (its activations
        # differ in their last bits, and a few of their codes on the layer's input grid with
        # them): about 2% of a shift, a step on 7 of 64 channels of one resnet_digits layer
        # between AVX2 and SSE kernels. The grid of 16-bit operands is up to 65536x finer, where
        # that moved every code: int16 models differed between a Xeon (AVX-512) and an AMD EPYC
        # (AVX2)
        unit = np.asarray(tp.scale, np.float64) * _finer(lp.act_bits) * _finer(lp.weight_bits)
        step = np.broadcast_to(unit, shift.shape)
        k = np.rint(shift / step)
        if not k.any():
            tp.correction = []
            continue
        tp.correction = [float(np.float32(v)) for v in k * step]
        done.append(name)
    return done


def _finer(bits: int | None) -> float:
    """How many times finer than an 8-bit one a grid of ``bits`` is (1 at 8 bits and below)."""
    return float(2 ** max(0, (bits or 8) - 8))


def corrections(plan: QuantPlan) -> dict[str, list[float]]:
    """Bias name -> the correction added to it (what `amq compare` adds to the float bias it
    compares with; QDQ metadata amq.float_provenance, key "corrected")."""
    return {
        tp.name: list(tp.correction)
        for tp in plan.tensors.values()
        if tp.role == "bias" and tp.correction
    }
