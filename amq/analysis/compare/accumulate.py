"""Streaming accumulation of ``amq compare``'s rows: numpy only, the caller runs the two models
and hands each batch's values in.

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
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from amq.analysis.compare.diagnose import CompareReport, TensorRow, _rank_key, diagnose
from amq.analysis.compare.match import QParams, Target
from amq.analysis.metrics import ratio_db
from amq.quant.observers import HistogramObserver
from amq.quant.outliers import find_outliers

KL_EPS = 1e-10  # probability given to empty bins of the quantized histogram
KL_BINS = 4096  # KL bins over a grid (more levels share bins), plus one below and one above
KL_MIN_VALUES = 1024  # fewer values than this: no KL (a histogram of a handful of values is noise)


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
        # activations: per-channel extremes of the float tensor, for its outlier channels
        self.channels: HistogramObserver | None = None
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
        if self.t.channel_axis is not None and raw_r.ndim:
            if self.channels is None:  # only the extremes: update_channels, no histogram
                self.channels = HistogramObserver(16, channel_axis=self.t.channel_axis(raw_r.ndim))
            axis = self.channels.stats.ch_axis
            if 0 <= axis < raw_r.ndim:
                rest = tuple(i for i in range(raw_r.ndim) if i != axis)
                self.channels.update_channels(raw_r.min(axis=rest), raw_r.max(axis=rest))
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
        r.note = "; ".join(x for x in (r.note, t.note) if x)
        o = find_outliers(self.channels.stats) if self.channels is not None else None
        if o is not None:
            r.outlier_channels = o.describe((r.grid_min, r.grid_max))
            r.note = "; ".join(x for x in (r.note, r.outlier_channels) if x)
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
            if ref is not None and t.derive is not None:
                ref = t.derive(ref)
            deq = quant_values.get(t.dq_out or "")
            if ref is None or deq is None:
                a.problem = a.problem or "tensor not produced by the runtime"
                continue
            pre = quant_values.get(t.pre_q or "")
            if t.dropped:
                ref, deq, pre = (
                    None if v is None else np.delete(v, t.dropped, axis=-1) for v in (ref, deq, pre)
                )
            a.update(ref, deq, pre, samples)

    def report(
        self, float_source: str = "float model", quant_source: str = "quantized model"
    ) -> CompareReport:
        rows = sorted((a.row() for a in self.acc), key=_rank_key)
        notes = [f"{r.name}: not compared: {r.note}" for r in rows if r.diagnosis == "n/a"]
        return CompareReport(rows, notes, self.samples, float_source, quant_source)
