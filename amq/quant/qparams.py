"""From calibration statistics to QParams: the guards that keep layers or groups float on what
the statistics show, then the scale and zero point of every tensor of a QuantPlan (activations
from their ranges, weights from their values, biases from both). Arithmetic from qmath."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from amq.config import Config, OutlierRanges, SmoothMode
from amq.graph.model import Graph
from amq.plan import QuantPlan, TensorPlan
from amq.quant import observers, outliers, overflow, qmath
from amq.quant.activations import FIXED_METHOD, known_range
from amq.quant.registry import Kind, handler


def guard_decisions(
    g: Graph, plan: QuantPlan, stats: Mapping[str, observers.TensorStats], cfg: Config
) -> tuple[dict[str, str], dict[str, str]]:
    """Layers and activation groups to keep float because their ranges would wreck the model:
    sentinel-dominated tensors (PITFALLS 5) and Concats of very different ranges (PITFALLS 4)."""
    float_layers: dict[str, str] = {}
    float_roots: dict[str, str] = {}
    if cfg.guards.sentinels:
        for root in plan.activation_roots():
            s = stats.get(root)
            if s is not None and observers.is_sentinel_dominated(s):
                float_roots[root] = (
                    f"sentinel values (range {s.min:.3g}..{s.max:.3g} set by a few constant extremes)"
                )
    for lp in plan.layers.values():
        if handler(lp.op_type).kind != Kind.CONCAT or not lp.quantized:
            continue
        widths = []
        for t in lp.act_inputs:
            tp = plan.tensors.get(t)
            s = stats.get(tp.root) if tp is not None else None
            fixed = known_range(plan, tp.root) if tp is not None and tp.root else None
            if fixed is not None and (s is None or s.empty):  # its grid's range: not observed
                widths.append(max(fixed[1], 0.0) - min(fixed[0], 0.0))
                continue
            if s is None or s.empty:
                continue
            if tp.clamp is not None:
                s = observers.clamp(s, *tp.clamp)
            widths.append(max(s.max, 0.0) - min(s.min, 0.0))
        if len(widths) >= 2 and min(widths) > 0:
            ratio = max(widths) / min(widths)
            if ratio > cfg.guards.concat_range_ratio:
                why = f"guard: Concat inputs' ranges differ {ratio:.0f}x (> {cfg.guards.concat_range_ratio:g}x): kept float"
                float_layers[lp.name] = why
                for o in _passed_on(g, lp.outputs):
                    float_roots[o] = why
    return float_layers, float_roots


def _passed_on(g: Graph, tensors: list[str]) -> list[str]:
    """``tensors`` and every tensor a chain of transparent ops (Reshape, Relu, MaxPool, ...)
    passes their values to: a guarded Concat's values reach the next layer through them, and a
    grid there would put both ranges on one grid all the same."""
    out, todo = [], list(tensors)
    while todo:
        t = todo.pop()
        if t in out:
            continue
        out.append(t)
        for c in g.consumers.get(t, []):
            h = handler(c.op_type)
            if (
                h.kind == Kind.TRANSPARENT
                and len(c.input) > h.data_input
                and c.input[h.data_input] == t
            ):
                todo.extend(o for o in c.output if o)
    return out


def assign_qparams(
    plan: QuantPlan,
    stats: Mapping[str, observers.TensorStats],
    cfg: Config,
    weight: Callable[[str], np.ndarray],
    method: str | None = None,
) -> QuantPlan:
    """Fill scale/zero_point of every tensor in the plan from the statistics (in place)."""
    method = method or cfg.calibration.method.value
    roots: dict[tuple[str, int, bool], tuple[float, float, float, int, str]] = {}
    for tp in plan.tensors.values():
        if tp.role != "activation":
            continue
        root = tp.root or tp.name
        key = (root, tp.bits, tp.symmetric)
        rtp = plan.tensors.get(root, tp)
        if key not in roots and rtp.method == FIXED_METHOD and rtp.range is not None:
            lo, hi = rtp.range  # known from the producer op (Softmax: [0, 1]), not calibrated
            scale, zp, _ = qmath.activation_qparams(lo, hi, tp.bits, tp.symmetric)
            roots[key] = (lo, hi, scale, zp, FIXED_METHOD)
        if key not in roots:
            s = stats[root]
            if tp.clamp is not None:
                s = observers.clamp(s, *tp.clamp)
            m = _range_method(method, tp.bits)
            c = cfg.calibration
            widen = c.widen_to_mse == SmoothMode.ON  # auto is resolved by the Workspace
            lo, hi = observers.select_range(s, m, tp.bits, tp.symmetric, c.percentile, widen)
            if widen and m == "percentile":
                base = observers.range_percentile(s, c.percentile)
                if qmath.snap_range(*base) != qmath.snap_range(lo, hi):
                    m = "percentile, widened to mse"
            if cfg.calibration.outliers == OutlierRanges.AUTO and m != "minmax":
                (lo, hi), m = _outlier_range(plan, root, s, (lo, hi), m, weight)
            lo, hi = qmath.snap_range(lo, hi)  # the same bytes whatever CPU computed the stats
            scale, zp, _ = qmath.activation_qparams(lo, hi, tp.bits, tp.symmetric)
            roots[key] = (lo, hi, scale, zp, m)
        lo, hi, scale, zp, m = roots[key]
        tp.range = (float(lo), float(hi))
        tp.scale = [float(np.float32(scale))]
        tp.zero_point = [int(zp)]
        tp.method = m
    return assign_weight_qparams(plan, weight)


def assign_weight_qparams(plan: QuantPlan, weight: Callable[[str], np.ndarray]) -> QuantPlan:
    """Fill the scales of every weight and bias in the plan (in place), its activations' kept:
    what changes when the overflow guard marks weights pair-safe or scale search clips them
    (neither moves an activation range), without choosing every activation range again."""
    for tp in plan.tensors.values():
        if tp.role == "weight":
            _weight_qparams(plan, tp, weight)
    # biases: int32, scale = s_input * s_weight
    for lp in plan.layers.values():
        if not lp.quantized or lp.bias is None or lp.weight is None or lp.act_dynamic:
            continue  # a dynamic layer adds its bias in float
        x = plan.tensors.get(lp.act_inputs[0]) if lp.act_inputs else None
        wt = plan.tensors.get(lp.weight)
        prev = plan.tensors.get(lp.bias)
        if x is None or wt is None or (prev is not None and prev.consumers != [lp.name]):
            continue  # a bias another layer quantized first keeps that layer's scale
        s_w = np.asarray(wt.scale, dtype=np.float32)
        _, bscale, _ = qmath.bias_qparams(weight(lp.bias), x.scale[0], s_w)
        per_channel = wt.axis is not None
        plan.tensors[lp.bias] = TensorPlan(
            name=lp.bias,
            role="bias",
            bits=32,
            signed=True,
            symmetric=True,
            axis=0 if per_channel else None,
            scale=[float(v) for v in bscale.reshape(-1)]
            if per_channel
            else [float(bscale.reshape(-1)[0])],
            zero_point=[0] * (bscale.size if per_channel else 1),
            consumers=[lp.name],
            method="s_in*s_w",
        )
    return plan


def _weight_qparams(plan: QuantPlan, tp: TensorPlan, weight: Callable[[str], np.ndarray]) -> None:
    """A weight's scales: absmax per channel (times scale search's ratios), or per block."""
    w = weight(tp.name)
    if tp.block_size:  # [K, N] in blocks along K: no bias, no pair-sum kernel
        bscale = qmath.block_weight_qparams(w, tp.bits, tp.block_size)
        tp.scale = [float(v) for v in bscale.reshape(-1)]
        tp.zero_point = [0] * len(tp.scale)
        tp.method = f"absmax per block of {tp.block_size}"
        return
    scale, _ = qmath.weight_qparams(w, tp.bits, tp.axis)
    if tp.clip:  # scale search's clipping ratios
        ratio = np.asarray(tp.clip, np.float32).reshape(scale.shape)
        scale = (scale * ratio).astype(np.float32)
    tp.scale = final_weight_scale(plan, tp, w, scale, weight)
    tp.zero_point = [0] * len(tp.scale)
    tp.method = "absmax, pair-safe" if tp.pair_safe_axis is not None else "absmax"
    if tp.clip:
        tp.method += " x searched ratio"


def _outlier_range(
    plan: QuantPlan,
    root: str,
    s: observers.TensorStats,
    base: tuple[float, float],
    method: str,
    weight: Callable[[str], np.ndarray],
) -> tuple[tuple[float, float], str]:
    """A group with outlier channels (calibration.outliers: auto): the method's range, the mse
    one or the full one, whichever costs least, the clipping of the outlier channels weighted by
    how much the layer that reads them amplifies them (its weight rows' energy); the method is
    then named e.g. ``percentile -> minmax (outlier channels)``."""
    tp = plan.tensors[root]
    o = outliers.find_outliers(s)
    if o is None:
        return base, method
    amp = 1.0
    for t in plan.tensors.values():
        if (t.root or t.name) != root:
            continue
        for c in t.consumers:
            lp = plan.layers[c]
            if lp.weight is not None and lp.act_inputs and lp.act_inputs[0] == t.name:
                amp = max(amp, outliers.clip_weight(o, _row_energy(plan, lp.weight, weight)))
    rng, pick = outliers.outlier_range(s, base, tp.bits, tp.symmetric, amp)
    return rng, (f"{method} -> {pick} (outlier channels)" if pick else method)


def _row_energy(
    plan: QuantPlan, name: str, weight: Callable[[str], np.ndarray]
) -> np.ndarray | None:
    """Per input channel k of a weight, sum of w^2 over everything else (its row's energy: how
    much an error in input channel k reaches the output); the input-channel axis is the one that
    is not the output-channel axis of a 2-D weight, axis 1 of a conv weight."""
    w = np.asarray(weight(name), dtype=np.float64)
    axis = plan.tensors[name].axis
    if w.ndim < 2 or axis is None:
        return None
    if w.ndim == 2:
        k = 1 - axis
    else:  # MatMul [.., K, N]: N last; Conv [Cout, Cin, ..]; ConvTranspose [Cin, Cout, ..]
        k = w.ndim - 2 if axis == w.ndim - 1 else (1 if axis == 0 else 0)
    return (np.moveaxis(w, k, 0).reshape(w.shape[k], -1) ** 2).sum(axis=1)


def _range_method(method: str, bits: int) -> str:
    """Percentile clipping trades clipping error for finer rounding, which pays at 8 bits; at 16
    bits the grid is 256x finer and any clipped tail dominates the error (INT16 would be hardly
    better than INT8), so 16-bit activations take the full observed range."""
    return "minmax" if method == "percentile" and bits >= 16 else method


def final_weight_scale(
    plan: QuantPlan,
    tp: TensorPlan,
    w: np.ndarray,
    scale: np.ndarray,
    array_of: Callable[[str], np.ndarray],
) -> list[float]:
    """A weight's scale as written: ``scale`` (from absmax, or trained by QAT) widened where the
    overflow guard asks for pair-safe codes, then where a consumer's bias would overflow int32
    (its channel's weight scale grows so that bias / (s_input * s_weight) fits)."""
    if tp.pair_safe_axis is not None:
        scale = overflow.pair_safe_scale(w, scale, tp.pair_safe_axis)
    for lname in tp.consumers:
        lp = plan.layers[lname]
        if (
            lp.bias is None
            or lp.act_dynamic
            or not lp.act_inputs
            or lp.act_inputs[0] not in plan.tensors
        ):
            continue
        s_in = plan.tensors[lp.act_inputs[0]].scale[0]
        scale = qmath.fit_weight_scale_for_bias(array_of(lp.bias), s_in, scale)
    return [float(v) for v in np.asarray(scale, dtype=np.float32).reshape(-1)]
