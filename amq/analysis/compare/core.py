"""Layer-by-layer comparison of a float model and its QDQ model (``amq compare``, DESIGN.md §6).

numpy and ONNX graph reading only: the caller runs the two models and hands each batch's values in.

Matching. In the QDQ model every QuantizeLinear whose input is an activation tensor T gives one row;
the quantized view of T is the output of the DequantizeLinear fed by that Q. T is looked up by name
in the float model (amq names a folded Conv's output after the BatchNormalization output it
replaces, so names match); a graph output quantized by amq keeps its name on the DQ and the tensor
before the Q is ``<name>_float``, so the DQ output's name is tried too. Every DequantizeLinear of a
stored integer initializer (a weight or bias) gives a row as well, compared with the float
initializer of the same base name (``W_quantized`` -> ``W``; the caller passes the float model's
initializers including BN-folded ones). A quantized tensor without a float counterpart is a note.

Per row, streamed batch by batch in constant memory:
- accumulated error: the DQ output of the quantized model against the float model's tensor
  (SQNR, per-sample cosine averaged, MSE, L1, max |diff|, KL of the value distributions);
- the error of the tensor's OWN quantizer: qmath fake-quant with the Q node's scale/zero point
  applied to the float model's values, split into the clipping part (values the clip() of
  q = clip(round(x / s) + zp, qmin, qmax) changes: more than half a step outside the grid
  [(qmin - zp) * s, (qmax - zp) * s]; a value closer to the grid end rounds onto it with an error
  below s/2, like any value inside) and the rounding part (the rest); the diagnosis rests on this
  split, so it is not blurred by error arriving from upstream layers. The overshoot is the
  largest distance of a clipped value beyond the grid end, in units of scale;
- input SQNR: the tensor entering the Q in the quantized model against the float tensor (the
  error that arrives from upstream).

The quantized model runs with its DQ outputs exposed, which keeps onnxruntime from fusing those
Q/DQ groups into integer kernels: the values are the QDQ model's reference semantics (float
compute on dequantized values); integer kernels may round intermediate sums slightly differently.

Values as the next layer sees them: when every reader of the quantized tensor is a Relu (or a Clip
with constant bounds), both sides pass through that clamp before the error metrics, the clip count
and the KL. amq's ahead_relu calibrates such a tensor on its positive side on purpose: its negative
side is clipped by the grid and by the Relu alike, and costs nothing. The float/quantized
min/max/mean/var columns are of the raw values.

Diagnosis (``diagnose``), on the own quantizer's error:
- ``ok`` when its SQNR is at least ``OK_SQNR_DB`` (30 dB), whatever the mix of the error;
- ``clipping`` when the clipping part is the larger share of the error and more than
  ``CLIP_FRACTION`` (1e-4) of the values fall outside the grid;
- ``rounding`` otherwise: the range fits but the step is too coarse for the distribution.
Rows are ranked worst first by the accumulated SQNR (lowest first).
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from amq.analysis.metrics import ratio_db
from amq.graph.model import Graph
from amq.quant import qmath
from amq.report import fmt

OK_SQNR_DB = 30.0  # own-quantizer SQNR at or above this: "ok"
CLIP_FRACTION = 1e-4  # fewer values clipped than this never makes a "clipping" diagnosis
ZEROED_MANY = 0.25  # share of non-zero values rounded to zero that marks a non-uniform tensor
KL_EPS = 1e-10  # probability given to empty bins of the quantized histogram
KL_BINS = 4096  # KL bins over a grid (more levels share bins), plus one below and one above
KL_MIN_VALUES = 1024  # fewer values than this: no KL (a histogram of a handful of values is noise)

INT_TYPES = {
    onnx.TensorProto.UINT8: (8, False, "uint8"),
    onnx.TensorProto.INT8: (8, True, "int8"),
    onnx.TensorProto.UINT16: (16, False, "uint16"),
    onnx.TensorProto.INT16: (16, True, "int16"),
    onnx.TensorProto.UINT4: (4, False, "uint4"),
    onnx.TensorProto.INT4: (4, True, "int4"),
    onnx.TensorProto.INT32: (32, True, "int32"),
}


# ---------------------------------------------------------------------------------------------
# What to compare


@dataclass(frozen=True)
class QParams:
    """A quantizer read from a Q/DQ node: scale and zero point (scalar or per channel on ``axis``)."""

    scale: np.ndarray  # float64, shape () or (C,)
    zero_point: np.ndarray  # float64, same shape
    grid: qmath.Grid
    dtype: str
    axis: int | None = None

    def bounds(self, ndim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lowest, highest representable value, scale), broadcastable to a tensor of rank ndim."""
        s, z = self.scale, self.zero_point
        if self.axis is not None and s.ndim == 1 and ndim > 0:
            shape = [1] * ndim
            shape[self.axis % ndim] = -1
            s, z = s.reshape(shape), z.reshape(shape)
        return (self.grid.qmin - z) * s, (self.grid.qmax - z) * s, s

    def fake_quantize(self, x: np.ndarray) -> np.ndarray:
        axis = self.axis if self.scale.ndim == 1 else None
        return qmath.fake_quantize(x, self.scale, self.zero_point, self.grid, axis).astype(
            np.float64
        )


@dataclass
class Target:
    """One row to compute. Activations name tensors to fetch from each model per batch; weights
    carry their two arrays."""

    name: str
    kind: str  # activation | weight | bias
    node: str  # producer (activation) or first reader (weight) in the quantized model
    qparams: QParams
    float_name: str | None = None  # tensor in the float model
    pre_q: str | None = None  # tensor entering the Q in the quantized model
    dq_out: str | None = None  # output of the DQ in the quantized model
    clamp: tuple[float | None, float | None] | None = None  # applied by every reader
    clamp_by: str = ""
    reference: np.ndarray | None = None  # weights: float initializer
    quantized: np.ndarray | None = None  # weights: dequantized initializer


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    out = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = a.t
    return out


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _qparams(
    node: onnx.NodeProto, consts: Mapping[str, onnx.TensorProto], int_type: int | None
) -> tuple[QParams | None, str]:
    """The quantizer of a Q or DQ node, or (None, why not)."""
    if len(node.input) < 2 or node.input[1] not in consts:
        return None, "its scale is not a constant"
    scale = numpy_helper.to_array(consts[node.input[1]]).astype(np.float64)
    zp_name = node.input[2] if len(node.input) > 2 else ""
    if zp_name:
        if zp_name not in consts:
            return None, "its zero point is not a constant"
        zt = consts[zp_name]
        int_type = zt.data_type
        zp = numpy_helper.to_array(zt).astype(np.float64)
    else:
        zp = np.zeros(scale.shape)
        if int_type is None:
            int_type = _attr(node, "output_dtype", 0) or onnx.TensorProto.UINT8
    if int_type not in INT_TYPES:
        name = onnx.TensorProto.DataType.Name(int_type) if int_type else "unknown"
        return None, f"type {name} is not an integer grid amq compares"
    bits, signed, dtype = INT_TYPES[int_type]
    channel_axis = int(_attr(node, "axis", 1))
    if _attr(node, "block_size", 0):
        channels = _channels_of_blocks(scale, zp)
        if channels is None:
            return None, "blocked quantization is not supported"
        channel_axis = scale.ndim - 1
        scale, zp = channels
    axis = None
    if scale.ndim == 1 and scale.size > 1:
        axis = channel_axis
    else:
        scale = scale.reshape(())
        zp = zp.reshape(()) if zp.size == 1 else zp
    if zp.shape != scale.shape:
        zp = np.broadcast_to(zp, scale.shape).astype(np.float64)
    return QParams(scale, zp, qmath.grid(bits, signed), dtype, axis), ""


def _channels_of_blocks(scale: np.ndarray, zp: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The per-channel (last axis) scale and zero point of a blocked quantizer whose values vary
    along its last axis only, as amq writes batched MatMul weights (quant/qdq.py); else None."""
    if scale.ndim < 2:
        return None
    s = scale.reshape(-1, scale.shape[-1])
    z = np.broadcast_to(zp, scale.shape).reshape(-1, scale.shape[-1])
    if not (np.all(s == s[:1]) and np.all(z == z[:1])):
        return None
    return s[0], z[0]


def _clip_bounds(
    node: onnx.NodeProto, consts: Mapping[str, onnx.TensorProto]
) -> tuple[float | None, float | None] | None:
    """Constant bounds of a Clip (attributes before opset 11, inputs after); None if dynamic."""
    lo, hi = _attr(node, "min"), _attr(node, "max")
    for i in (1, 2):
        if len(node.input) > i and node.input[i]:
            if node.input[i] not in consts:
                return None
            v = float(numpy_helper.to_array(consts[node.input[i]]).reshape(-1)[0])
            lo, hi = (v, hi) if i == 1 else (lo, v)
    return lo, hi


def _reader_clamp(
    readers: Sequence[onnx.NodeProto], consts: Mapping[str, onnx.TensorProto]
) -> tuple[tuple[float | None, float | None] | None, str]:
    """The clamp every reader applies (all Relu, or all Clip with the same constant bounds)."""
    if not readers:
        return None, ""
    if all(r.op_type == "Relu" for r in readers):
        return (0.0, None), "Relu"
    if all(r.op_type == "Clip" for r in readers):
        bounds = {_clip_bounds(r, consts) for r in readers}
        if len(bounds) == 1 and None not in bounds and bounds != {(None, None)}:
            return bounds.pop(), "Clip"
    return None, ""


def _strip(name: str, suffixes: Sequence[str]) -> str | None:
    for s in suffixes:
        if name.endswith(s) and len(name) > len(s):
            return name[: -len(s)]
    return None


def match(
    float_model: onnx.ModelProto,
    quant_model: onnx.ModelProto,
    float_weights: Mapping[str, np.ndarray],
) -> tuple[list[Target], list[str]]:
    """Rows to compute and notes (unmatched or unsupported quantized tensors).
    ``float_weights``: float initializers by name (include the BN-folded ones)."""
    fg = Graph(float_model)
    qg = Graph(quant_model)
    consts = _constants(quant_model)
    float_tensors = {i.name for i in fg.inputs} | set(fg.producer)
    q_outputs = set(qg.output_names)
    targets: list[Target] = []
    notes: list[str] = []
    seen: dict[str, int] = {}

    def row_name(base: str) -> str:
        seen[base] = seen.get(base, 0) + 1
        return base if seen[base] == 1 else f"{base} #{seen[base]}"

    for node in qg.nodes:
        if node.op_type != "QuantizeLinear" or not node.input:
            continue
        x = node.input[0]
        dqs = [c for c in qg.consumers.get(node.output[0], []) if c.op_type == "DequantizeLinear"]
        if not dqs:
            notes.append(
                f"{x}: QuantizeLinear {node.name or '?'} feeds no DequantizeLinear (QOperator form?); not compared"
            )
            continue
        dq = dqs[0]
        qp, why = _qparams(node, consts, None)
        if qp is None:
            notes.append(f"{x}: {why}; not compared")
            continue
        if x in consts:  # a float weight quantized in the graph: Q(W) -> DQ
            w = numpy_helper.to_array(consts[x]).astype(np.float64)
            ref = float_weights.get(x)
            ref = np.asarray(ref, dtype=np.float64) if ref is not None else w
            if ref.shape != w.shape:
                ref = w
            reader = qg.consumers.get(dq.output[0], [])
            qp_w = replace_axis(qp, w.ndim)
            targets.append(
                Target(
                    row_name(x),
                    "weight",
                    reader[0].name if reader else "",
                    qp_w,
                    reference=ref,
                    quantized=qp_w.fake_quantize(w),
                )
            )
            continue
        dq_out = dq.output[0]
        cands = [x, dq_out]
        stripped = _strip(x, ("_float",))
        if stripped:
            cands.append(stripped)
        fname = next((c for c in cands if c in float_tensors), None)
        if fname is None:
            notes.append(
                f"{x}: quantized tensor with no counterpart in the float model (unmatched)"
            )
            continue
        readers = qg.consumers.get(dq_out, [])
        clamp, by = (None, "") if dq_out in q_outputs else _reader_clamp(readers, consts)
        prod = qg.producer.get(x)
        targets.append(
            Target(
                row_name(fname),
                "activation",
                prod.name if prod is not None else "(graph input)",
                qp,
                float_name=fname,
                pre_q=x,
                dq_out=dq_out,
                clamp=clamp,
                clamp_by=by,
            )
        )

    q_fed = {n.output[0] for n in qg.nodes if n.op_type == "QuantizeLinear" and n.output}
    for node in qg.nodes:
        if node.op_type != "DequantizeLinear" or not node.input:
            continue
        x = node.input[0]
        if x in q_fed or x not in consts:
            continue
        t = consts[x]
        qp, why = _qparams(node, consts, t.data_type)
        base = (
            _strip(x, ("_quantized",))
            or _strip(node.output[0], ("_dequantized", "_DequantizeLinear_Output"))
            or x
        )
        if qp is None:
            notes.append(f"{base}: {why}; not compared")
            continue
        q = numpy_helper.to_array(t).astype(np.int64)
        qp = replace_axis(qp, q.ndim)
        cands = [base, _strip(node.output[0], ("_dequantized", "_DequantizeLinear_Output")), x]
        ref_name = next((c for c in cands if c and c in float_weights), None)
        if ref_name is None:
            notes.append(f"{base}: quantized initializer with no float initializer of that name")
            continue
        ref = np.asarray(float_weights[ref_name], dtype=np.float64)
        if ref.shape != q.shape:
            notes.append(
                f"{base}: float initializer has shape {list(ref.shape)}, the quantized one {list(q.shape)}; not compared"
            )
            continue
        axis = qp.axis if qp.scale.ndim == 1 else None
        deq = qmath.dequantize(q, qp.scale, qp.zero_point, axis).astype(np.float64)
        readers = qg.consumers.get(node.output[0], [])
        targets.append(
            Target(
                row_name(ref_name),
                "bias" if qp.grid.bits == 32 else "weight",
                readers[0].name if readers else "",
                qp,
                reference=ref,
                quantized=deq,
            )
        )
    return targets, notes


def replace_axis(qp: QParams, ndim: int) -> QParams:
    """The quantizer with a non-negative channel axis for a tensor of rank ``ndim``."""
    if qp.axis is None or qp.axis >= 0:
        return qp
    return QParams(qp.scale, qp.zero_point, qp.grid, qp.dtype, qp.axis + ndim)


# ---------------------------------------------------------------------------------------------
# Streaming accumulation


@dataclass
class _Moments:
    """Count, min, max, mean and variance, merged batch by batch (Chan et al.)."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    min: float = math.inf
    max: float = -math.inf

    def update(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        nb = x.size
        mb = float(x.mean())
        m2b = float(np.sum((x - mb) ** 2))
        tot = self.n + nb
        delta = mb - self.mean
        self.mean += delta * nb / tot
        self.m2 += m2b + delta * delta * self.n * nb / tot
        self.n = tot
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))

    @property
    def var(self) -> float | None:
        return self.m2 / self.n if self.n else None


def _row_cosines(r: np.ndarray, q: np.ndarray, rows: int) -> np.ndarray:
    a = r.reshape(rows, -1)
    b = q.reshape(rows, -1)
    dot = np.einsum("ij,ij->i", a, b)
    na = np.sqrt(np.einsum("ij,ij->i", a, a))
    nb = np.sqrt(np.einsum("ij,ij->i", b, b))
    with np.errstate(divide="ignore", invalid="ignore"):
        c = dot / (na * nb)
    c = np.where((na == 0) | (nb == 0), 0.0, c)
    return np.where((na == 0) & (nb == 0), 1.0, c)


class TensorAccumulator:
    """Every metric of one row, folded in batch by batch in O(bins) memory."""

    def __init__(self, target: Target, bins: int = KL_BINS) -> None:
        self.t = target
        self.n = 0
        self.samples = 0
        self.signal = 0.0
        self.noise = 0.0
        self.l1 = 0.0
        self.max_abs = 0.0
        self.cos_sum = 0.0
        self.cos_n = 0
        self.clipped = 0
        self.overshoot = 0.0
        self.clip_sq = 0.0
        self.round_sq = 0.0
        self.zeroed = 0
        self.in_noise = 0.0
        self.in_signal = 0.0
        self.has_input = False
        self.fmom = _Moments()
        self.qmom = _Moments()
        self.hist = LevelHistograms(target.qparams, bins)
        self.chan_signal: np.ndarray | None = None
        self.chan_noise: np.ndarray | None = None
        self.problem = ""

    def _clamp(self, x: np.ndarray) -> np.ndarray:
        if self.t.clamp is None:
            return x
        lo, hi = self.t.clamp
        return np.clip(x, lo if lo is not None else -np.inf, hi if hi is not None else np.inf)

    def update(
        self,
        reference: np.ndarray,
        quantized: np.ndarray,
        pre_q: np.ndarray | None = None,
        samples: int | None = None,
    ) -> None:
        """Fold one batch: the float model's tensor, the DQ output and (optionally) the tensor
        entering the Q in the quantized model. ``samples``: model samples in this batch (rows of
        axis 0 when the tensor's leading dim equals it, else the batch counts as one sample)."""
        if self.problem:
            return
        raw_r = np.asarray(reference, dtype=np.float64)
        raw_q = np.asarray(quantized, dtype=np.float64)
        if raw_r.shape != raw_q.shape:
            self.problem = (
                f"shapes differ: float {list(raw_r.shape)}, quantized {list(raw_q.shape)}"
            )
            return
        if not (np.all(np.isfinite(raw_r)) and np.all(np.isfinite(raw_q))):
            self.problem = "NaN or Inf values"
            return
        self.fmom.update(raw_r.ravel())
        self.qmom.update(raw_q.ravel())
        r = self._clamp(raw_r)
        q = self._clamp(raw_q)
        e = r - q
        self.n += r.size
        self.signal += float(np.sum(r * r))
        self.noise += float(np.sum(e * e))
        self.l1 += float(np.sum(np.abs(e)))
        if e.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(e))))
        rows = samples if samples and r.ndim >= 1 and r.shape[0] == samples else 1
        self.samples += samples or 1
        if r.size:
            c = _row_cosines(r, q, rows)
            self.cos_sum += float(c.sum())
            self.cos_n += rows
        self.hist.update(r, q)
        # the own quantizer on the float model's values
        qp = self.t.qparams
        fq = qp.fake_quantize(r)
        lo, hi, s = qp.bounds(r.ndim)
        # clip() in q = clip(round(x / s) + zp) changes a value only beyond half a step past
        # the grid end; closer values round onto the end level like any value inside
        out = (r < lo - s / 2) | (r > hi + s / 2)
        d2 = (r - fq) ** 2
        nclip = int(np.count_nonzero(out))
        self.clipped += nclip
        if nclip:
            over = np.maximum(lo - r, r - hi) / s
            self.overshoot = max(self.overshoot, float(np.max(np.where(out, over, 0.0))))
            self.clip_sq += float(np.sum(d2[out]))
            self.round_sq += float(np.sum(d2[~out]))
        else:
            self.round_sq += float(np.sum(d2))
        self.zeroed += int(np.count_nonzero((fq == 0) & (r != 0)))
        if pre_q is not None:
            p = self._clamp(np.asarray(pre_q, dtype=np.float64))
            if p.shape == r.shape:
                self.has_input = True
                self.in_signal += float(np.sum(r * r))
                self.in_noise += float(np.sum((r - p) ** 2))
        if self.t.kind != "activation" and qp.axis is not None and r.ndim > qp.axis:
            rr = np.moveaxis(r, qp.axis, 0).reshape(r.shape[qp.axis], -1)
            ee = np.moveaxis(e, qp.axis, 0).reshape(r.shape[qp.axis], -1)
            self.chan_signal = np.sum(rr * rr, axis=1)
            self.chan_noise = np.sum(ee * ee, axis=1)

    def kl(self) -> float | None:
        if self.n < KL_MIN_VALUES:
            return None
        return self.hist.kl()

    def row(self) -> TensorRow:
        t = self.t
        qp = t.qparams
        scale = np.asarray(qp.scale)
        lo = (qp.grid.qmin - qp.zero_point) * scale
        hi = (qp.grid.qmax - qp.zero_point) * scale
        r = TensorRow(
            name=t.name,
            kind=t.kind,
            node=t.node,
            dtype=qp.dtype,
            bits=qp.grid.bits,
            scale=float(scale.max()),
            scale_min=float(scale.min()),
            zero_point=int(qp.zero_point) if qp.zero_point.ndim == 0 else None,
            axis=qp.axis if scale.ndim == 1 else None,
            grid_min=float(np.min(lo)),
            grid_max=float(np.max(hi)),
            seen_through=t.clamp_by or None,
        )
        if self.problem or self.n == 0:
            r.diagnosis = "n/a"
            r.note = self.problem or "no values"
            return r
        r.samples = self.samples
        r.values = self.n
        r.sqnr_db = ratio_db(self.signal, self.noise)
        r.cosine = self.cos_sum / self.cos_n if self.cos_n else None
        r.mse = self.noise / self.n
        r.l1 = self.l1 / self.n
        r.kl = self.kl()
        r.max_abs_diff = self.max_abs
        r.float_min, r.float_max = self.fmom.min, self.fmom.max
        r.float_mean, r.float_var = self.fmom.mean, self.fmom.var
        r.quant_min, r.quant_max = self.qmom.min, self.qmom.max
        r.quant_mean, r.quant_var = self.qmom.mean, self.qmom.var
        r.clipped_fraction = self.clipped / self.n
        r.overshoot = self.overshoot
        own = self.clip_sq + self.round_sq
        r.own_sqnr_db = ratio_db(self.signal, own)
        r.clip_share = self.clip_sq / own if own > 0 else 0.0
        r.zeroed_fraction = self.zeroed / self.n
        r.input_sqnr_db = ratio_db(self.in_signal, self.in_noise) if self.has_input else None
        if self.chan_signal is not None and self.chan_noise is not None:
            per = [
                ratio_db(float(a), float(b))
                for a, b in zip(self.chan_signal, self.chan_noise, strict=True)
            ]
            r.worst_channel = int(np.argmin(per))
            r.worst_channel_sqnr_db = float(per[r.worst_channel])
        if t.clamp_by:
            r.note = f"seen through the following {t.clamp_by}: values it clamps are not counted"
        r.diagnosis, r.suggestion = diagnose(r)
        return r


class LevelHistograms:
    """The float and the quantized values binned on the quantizer's own levels, for
    KL(P_float || P_quantized) in nats.

    The grid is fixed before any data: in code units u = x / s + zp - qmin + 1/2 (per channel
    when the quantizer is), bin j holds u in [j, j + 1): the values that round to level j, and
    the quantized values sitting on level j. One bin below and one above the grid hold the float
    values the quantizer clips (the quantized histogram never has mass there: probability
    ``KL_EPS``, so clipped mass gives a large KL, not infinity). Above ``bins`` levels (16 and
    32 bits), 2^bits / bins neighbouring levels share a bin, so memory is O(bins) whatever the
    data. Rounding alone moves no value to another bin: for a tensor's own quantizer the KL is
    the clipped mass; on the quantized model's tensor it adds the shifts that arrive from
    upstream layers. Bins aligned with the levels avoid the aliasing of an unrelated grid (bins
    holding one or two levels would differ even for a perfect copy) and the spikes of exact
    values such as the zeros a Relu leaves.
    """

    def __init__(self, qp: QParams, bins: int = KL_BINS) -> None:
        self.qp = qp
        span = 2**qp.grid.bits
        self.levels_per_bin = max(1, span // int(bins))
        self.bins = span // self.levels_per_bin
        self.p = np.zeros(self.bins + 2, dtype=np.int64)  # [below, grid bins..., above]
        self.q = np.zeros(self.bins + 2, dtype=np.int64)

    def _index(self, x: np.ndarray) -> np.ndarray:
        _, _, s = self.qp.bounds(x.ndim)
        z = self.qp.zero_point
        if self.qp.axis is not None and z.ndim == 1 and x.ndim > 0:
            shape = [1] * x.ndim
            shape[self.qp.axis % x.ndim] = -1
            z = z.reshape(shape)
        u = x / s + z - self.qp.grid.qmin + 0.5
        f = np.floor(u / self.levels_per_bin)
        return (np.clip(f, -1, self.bins) + 1).astype(np.int64).ravel()

    def update(self, reference: np.ndarray, quantized: np.ndarray) -> None:
        self.p += np.bincount(self._index(reference), minlength=self.bins + 2)
        self.q += np.bincount(self._index(quantized), minlength=self.bins + 2)

    def kl(self) -> float | None:
        p = self.p.astype(np.float64)
        q = self.q.astype(np.float64)
        if p.sum() == 0 or q.sum() == 0:
            return None
        p /= p.sum()
        q /= q.sum()
        mask = p > 0
        qm = np.where(q[mask] > 0, q[mask], KL_EPS)
        return float(max(0.0, np.sum(p[mask] * np.log(p[mask] / qm))))


def diagnose(r: TensorRow) -> tuple[str, str]:
    """(diagnosis, suggested fix) from the own quantizer's error split (see the module doc)."""
    own = r.own_sqnr_db if r.own_sqnr_db is not None else math.inf
    frac = r.clipped_fraction or 0.0
    share = r.clip_share or 0.0
    bits = r.bits
    if own >= OK_SQNR_DB:
        if r.sqnr_db is not None and r.sqnr_db < OK_SQNR_DB:
            src = (
                f" (input SQNR {r.input_sqnr_db:.1f} dB)"
                if r.input_sqnr_db is not None and math.isfinite(r.input_sqnr_db)
                else ""
            )
            return "ok", f"own quantizer fine; the error arrives from upstream{src}"
        if share > 0.5 and frac > CLIP_FRACTION:
            return "ok", (
                f"fine; most of its small error is clipping ({frac:.3%} of the values, up to "
                f"{r.overshoot:.0f} steps beyond the grid)"
            )
        return "ok", ""
    if r.kind == "bias":
        return (
            "clipping" if share > 0.5 and frac > CLIP_FRACTION else "rounding",
            "the bias grid is s_input x s_weight: more activation or weight bits",
        )
    if r.kind != "activation":
        fix = "more weight bits"
        if r.axis is None:
            fix += " or per_channel scales"
        if share > 0.5 and frac > CLIP_FRACTION:
            return "clipping", f"weights outside their grid: recalibrate the scale ({fix})"
        if r.worst_channel is not None:
            fix += f"; worst channel {r.worst_channel} at {r.worst_channel_sqnr_db:.1f} dB"
        return "rounding", fix
    if share > 0.5 and frac > CLIP_FRACTION:
        fix = "wider range: minmax or percentile 99.999"
        if frac < 1e-3 and (r.overshoot or 0.0) > 0.1 * qmath.grid(bits, False).levels:
            fix += "; the outliers are few and huge: split the tensor or keep it float"
        else:
            fix += ", or split the tensor / keep float if the outliers are few and huge"
        return "clipping", fix
    small = (r.zeroed_fraction or 0.0) >= ZEROED_MANY
    fix = {4: "more bits (INT8, or INT16) or mse range", 8: "more bits (INT16) or mse range"}.get(
        bits, "keep float or split the tensor"
    )
    if small:
        fix += (
            f"; {r.zeroed_fraction:.0%} of the values round to zero (non-uniform distribution): "
            "if small values matter, split the tensor or keep it float"
        )
    else:
        fix += "; if small values matter (non-uniform distribution), consider splitting or keeping float"
    return "rounding", fix


# ---------------------------------------------------------------------------------------------
# The report


@dataclass
class TensorRow:
    name: str
    kind: str
    node: str
    dtype: str
    bits: int
    scale: float
    scale_min: float
    zero_point: int | None
    axis: int | None  # channel axis of a per-channel quantizer
    grid_min: float
    grid_max: float
    sqnr_db: float | None = None
    own_sqnr_db: float | None = None
    input_sqnr_db: float | None = None
    cosine: float | None = None
    mse: float | None = None
    l1: float | None = None
    kl: float | None = None
    max_abs_diff: float | None = None
    clipped_fraction: float | None = None
    overshoot: float | None = None  # largest distance beyond the grid end, in units of scale
    clip_share: float | None = None  # share of the own quantizer's squared error from clipping
    zeroed_fraction: float | None = None  # non-zero values that round to zero
    float_min: float | None = None
    float_max: float | None = None
    float_mean: float | None = None
    float_var: float | None = None
    quant_min: float | None = None
    quant_max: float | None = None
    quant_mean: float | None = None
    quant_var: float | None = None
    worst_channel: int | None = None
    worst_channel_sqnr_db: float | None = None
    samples: int = 0
    values: int = 0
    seen_through: str | None = None
    diagnosis: str = ""
    suggestion: str = ""
    note: str = ""


COLUMNS = [f.name for f in fields(TensorRow)]


def _rank_key(r: TensorRow) -> tuple[int, float]:
    if r.sqnr_db is None or math.isnan(r.sqnr_db):
        return (1, 0.0)
    return (0, r.sqnr_db)


@dataclass
class CompareReport:
    rows: list[TensorRow]  # worst first
    notes: list[str] = field(default_factory=list)
    samples: int = 0
    float_source: str = "float model"
    quant_source: str = "quantized model"
    # model outputs: ideal vs float, runtime vs float (with a verdict), runtime vs ideal
    outputs: list[dict[str, Any]] = field(default_factory=list)
    isa: str = ""

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.diagnosis] = out.get(r.diagnosis, 0) + 1
        off = sum(str(o["verdict"]).startswith("off") for o in self.outputs)
        if off:
            out["runtime off (outputs)"] = off
        return out

    def row(self, name: str) -> TensorRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def table_rows(self) -> list[list[Any]]:
        return [[getattr(r, c) for c in COLUMNS] for r in self.rows]

    def to_dict(self) -> dict[str, Any]:
        return {
            "float_model": self.float_source,
            "quant_model": self.quant_source,
            "samples": self.samples,
            "diagnoses": self.counts(),
            "rows": [asdict(r) for r in self.rows],
            "outputs": self.outputs,
            "isa": self.isa,
            "notes": self.notes,
        }


class Comparison:
    """Rows being accumulated. Feed ``update`` each batch's tensors from both models; weights
    are folded in at construction (they do not change between batches)."""

    def __init__(self, targets: Sequence[Target], bins: int = KL_BINS) -> None:
        self.acc = [TensorAccumulator(t, bins) for t in targets]
        self.samples = 0
        for a in self.acc:
            if a.t.reference is not None and a.t.quantized is not None:
                a.update(a.t.reference, a.t.quantized)

    def float_names(self) -> list[str]:
        return sorted({a.t.float_name for a in self.acc if a.t.float_name})

    def quant_names(self) -> list[str]:
        out = set()
        for a in self.acc:
            if a.t.kind == "activation":
                out.update(n for n in (a.t.dq_out, a.t.pre_q) if n)
        return sorted(out)

    def update(
        self,
        float_values: Mapping[str, np.ndarray],
        quant_values: Mapping[str, np.ndarray],
        samples: int,
    ) -> None:
        self.samples += samples
        for a in self.acc:
            t = a.t
            if t.kind != "activation":
                continue
            ref = float_values.get(t.float_name or "")
            deq = quant_values.get(t.dq_out or "")
            if ref is None or deq is None:
                a.problem = a.problem or "tensor not produced by the runtime"
                continue
            a.update(ref, deq, quant_values.get(t.pre_q or ""), samples)

    def report(
        self, float_source: str = "float model", quant_source: str = "quantized model"
    ) -> CompareReport:
        rows = sorted((a.row() for a in self.acc), key=_rank_key)
        notes = [f"{r.name}: not compared: {r.note}" for r in rows if r.diagnosis == "n/a"]
        return CompareReport(rows, notes, self.samples, float_source, quant_source)


# ---------------------------------------------------------------------------------------------
# HTML


COLORS = {"clipping": "#d62728", "rounding": "#ff7f0e", "ok": "#2ca02c", "n/a": "#999999"}


def _svg_chart(rows: Sequence[TensorRow]) -> str:
    """Horizontal bars of the accumulated SQNR (and a thin bar for the own quantizer's SQNR)."""
    if not rows:
        return ""
    label_w, bar_w, row_h, top = 360, 480, 24, 28
    finite = [
        v
        for r in rows
        for v in (r.sqnr_db, r.own_sqnr_db)
        if v is not None and math.isfinite(v) and v > 0
    ]
    vmax = max([60.0, *finite])
    h = top + row_h * len(rows) + 10
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + bar_w + 90}" height="{h}" '
        f'font-family="sans-serif" font-size="12">'
    ]
    for db in range(0, int(vmax) + 1, 10):
        x = label_w + bar_w * db / vmax
        out.append(
            f'<line x1="{x:.1f}" y1="{top - 6}" x2="{x:.1f}" y2="{h - 8}" stroke="#ddd"/>'
            f'<text x="{x:.1f}" y="{top - 10}" text-anchor="middle" fill="#555">{db} dB</text>'
        )
    for i, r in enumerate(rows):
        y = top + i * row_h
        name = r.name if len(r.name) <= 52 else "…" + r.name[-51:]
        col = COLORS.get(r.diagnosis, "#999")

        def width(v: float | None) -> float:
            if v is None or math.isnan(v):
                return 0.0
            return bar_w * min(max(v, 0.0), vmax) / vmax

        out.append(
            f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end">'
            f"<title>{html.escape(r.name)}</title>{html.escape(name)}</text>"
            f'<rect x="{label_w}" y="{y + 3}" width="{width(r.sqnr_db):.1f}" height="12" fill="{col}">'
            f"<title>{html.escape(r.name)}: {fmt(r.sqnr_db)} dB ({r.diagnosis})</title></rect>"
            f'<rect x="{label_w}" y="{y + 16}" width="{width(r.own_sqnr_db):.1f}" height="4" fill="#555">'
            f"<title>own quantizer: {fmt(r.own_sqnr_db)} dB</title></rect>"
            f'<text x="{label_w + width(r.sqnr_db) + 4:.1f}" y="{y + 14}" fill="#333">'
            f"{fmt(r.sqnr_db)} {html.escape(r.diagnosis)}</text>"
        )
    out.append("</svg>")
    return "".join(out)


CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}
table{border-collapse:collapse;font-size:12px}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:right;white-space:nowrap}
th{background:#f4f4f4;position:sticky;top:0}
td.l{text-align:left}
tr.clipping td.d{background:#fadbd8}tr.rounding td.d{background:#fde5c8}tr.ok td.d{background:#d9f2d9}
.legend span{display:inline-block;margin-right:14px}
.legend i{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:middle}
.wrap{overflow-x:auto}
p.small{font-size:12px;color:#555;max-width:900px}
"""


def to_html(rep: CompareReport, top: int = 20) -> str:
    """A self-contained page: inline CSS, an inline SVG chart of the worst ``top`` rows and a
    table with every row and column. No scripts, nothing fetched."""
    text_cols = {"name", "kind", "node", "dtype", "seen_through", "diagnosis", "suggestion", "note"}
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = []
    for r in rep.rows:
        cells = []
        for c in COLUMNS:
            cls = []
            if c in text_cols:
                cls.append("l")
            if c == "diagnosis":
                cls.append("d")
            attr = f' class="{" ".join(cls)}"' if cls else ""
            cells.append(f"<td{attr}>{html.escape(fmt(getattr(r, c)))}</td>")
        body.append(f'<tr class="{html.escape(r.diagnosis)}">{"".join(cells)}</tr>')
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(rep.counts().items()))
    legend = "".join(
        f'<span><i style="background:{c}"></i>{k}</span>' for k, c in COLORS.items() if k != "n/a"
    )
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in rep.notes)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>amq compare: {html.escape(rep.quant_source)}</title><style>{CSS}</style></head><body>"
        f"<h1>amq compare</h1><p>float: <code>{html.escape(rep.float_source)}</code><br>"
        f"quantized: <code>{html.escape(rep.quant_source)}</code><br>"
        f"{rep.samples} samples; {len(rep.rows)} tensors ({html.escape(counts)})</p>"
        f"<h2>Worst {min(top, len(rep.rows))} tensors by SQNR (thick: float vs quantized model; "
        f"thin: the tensor's own quantizer)</h2><div class=legend>{legend}</div>"
        f"<div class=wrap>{_svg_chart(rep.rows[:top])}</div>"
        "<p class=small>SQNR: accumulated error of the quantized model's tensor against the float "
        "model's. own SQNR: the tensor's own quantizer applied to the float values. Diagnosis: "
        f"<b>clipping</b> when clipped values (outside the grid) make most of the own error and more "
        f"than {CLIP_FRACTION:g} of the values are clipped; <b>rounding</b> when the range fits but "
        f"the step is too coarse; <b>ok</b> when the own SQNR is at least {OK_SQNR_DB:g} dB. "
        "overshoot: largest distance beyond the grid end in units of scale.</p>"
        f"<h2>All tensors, worst first</h2><div class=wrap><table><thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table></div>"
        + (f"<h2>Notes</h2><ul>{notes}</ul>" if notes else "")
        + "</body></html>\n"
    )
