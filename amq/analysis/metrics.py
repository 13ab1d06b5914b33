"""Metrics: "higher is better" numbers over an evaluation set (DESIGN.md §8), plus streaming
fidelity of a quantized model's outputs against the float model's."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(sum ref^2 / sum (ref - test)^2)."""
    r = np.asarray(reference, dtype=np.float64)
    e = r - np.asarray(test, dtype=np.float64)
    return ratio_db(float(np.sum(r * r)), float(np.sum(e * e)))


def ratio_db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def cosine(reference: np.ndarray, test: np.ndarray) -> float:
    a = np.asarray(reference, dtype=np.float64).ravel()
    b = np.asarray(test, dtype=np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


@dataclass
class Fidelity:
    """Streaming comparison of one output: accumulates over batches in constant memory."""

    signal: float = 0.0
    noise: float = 0.0
    cos_sum: float = 0.0
    samples: int = 0
    max_abs: float = 0.0
    agree: int = 0  # top-1 agreement for [N, C] outputs
    agree_n: int = 0
    elements: int = 0

    def update(self, ref: np.ndarray, test: np.ndarray) -> None:
        """Fold one batch (axis 0 = samples) in; float32 passes with float64 accumulation."""
        r = np.asarray(ref)
        t = np.asarray(test)
        n = r.shape[0] if r.ndim >= 1 else 1
        r2 = r.reshape(n, -1).astype(np.float32, copy=False)
        t2 = t.reshape(n, -1).astype(np.float32, copy=False)
        e = r2 - t2
        rr = np.einsum("ij,ij->i", r2, r2, dtype=np.float64)
        tt = np.einsum("ij,ij->i", t2, t2, dtype=np.float64)
        rt = np.einsum("ij,ij->i", r2, t2, dtype=np.float64)
        ee = np.einsum("ij,ij->i", e, e, dtype=np.float64)
        self.signal += float(rr.sum())
        self.noise += float(ee.sum())
        self.elements += int(e.size)
        if e.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(e))))
        den = np.sqrt(rr * tt)
        cos = np.where(
            den > 0, rt / np.where(den > 0, den, 1.0), np.where((rr == 0) & (tt == 0), 1.0, 0.0)
        )
        self.cos_sum += float(cos.sum())
        self.samples += n
        if r.ndim == 2 and r.shape[1] > 1:
            self.agree += int(np.sum(np.argmax(r, axis=1) == np.argmax(t, axis=1)))
            self.agree_n += r.shape[0]

    @property
    def sqnr_db(self) -> float:
        return ratio_db(self.signal, self.noise)

    @property
    def cosine(self) -> float:
        return self.cos_sum / self.samples if self.samples else float("nan")

    @property
    def agreement(self) -> float | None:
        return self.agree / self.agree_n if self.agree_n else None


# ---------------------------------------------------------------------------------------------
# Task metrics over an evaluation set (per-sample scores, so a bootstrap CI is possible)


FIDELITY_METRICS = ("agreement", "cosine", "sqnr", "neg_mse")
BUILTIN_METRICS = ("top1", *FIDELITY_METRICS)


@dataclass
class MetricSpec:
    """How a metric turns outputs into a number. ``per_sample`` scores are averaged (top1,
    agreement in %, cosine, neg_mse); sqnr aggregates signal and noise sums."""

    name: str
    needs_labels: bool = False
    needs_reference: bool = False
    ideal: float | None = None  # the value a perfect copy of the reference would get
    user_fn: object = None  # module:function(outputs, references) -> float


def metric_spec(name: str) -> MetricSpec:
    if name == "top1":
        return MetricSpec("top1", needs_labels=True)
    if name == "agreement":
        return MetricSpec("agreement", needs_reference=True, ideal=100.0)
    if name == "cosine":
        return MetricSpec("cosine", needs_reference=True, ideal=1.0)
    if name == "sqnr":
        return MetricSpec("sqnr", needs_reference=True, ideal=None)
    if name == "neg_mse":
        return MetricSpec("neg_mse", needs_reference=True, ideal=0.0)
    return MetricSpec(name, needs_reference=True, user_fn=_load_user_metric(name))


def _load_user_metric(ref: str):
    from amq.calib.data import import_callable
    from amq.errors import ConfigError

    if ":" not in ref:
        raise ConfigError(
            f"--metric '{ref}': not one of {', '.join(BUILTIN_METRICS)} nor module:function"
        )
    return import_callable(ref, ConfigError, "metric")


def per_sample_scores(
    metric: str, out: np.ndarray, ref: np.ndarray | None, labels: np.ndarray | None
) -> np.ndarray:
    """One score per sample (rows of axis 0) for the averaged metrics."""
    o = np.asarray(out, dtype=np.float64)
    n = o.shape[0] if o.ndim else 1
    o2 = o.reshape(n, -1)
    if metric == "top1":
        assert labels is not None
        return 100.0 * (np.argmax(o2, axis=1) == np.asarray(labels).reshape(-1)).astype(np.float64)
    r2 = np.asarray(ref, dtype=np.float64).reshape(n, -1)
    if metric == "agreement":
        return 100.0 * (np.argmax(o2, axis=1) == np.argmax(r2, axis=1)).astype(np.float64)
    if metric == "cosine":
        return np.array([cosine(r2[i], o2[i]) for i in range(n)])
    if metric == "neg_mse":
        return -np.mean((o2 - r2) ** 2, axis=1)
    if metric == "sqnr":  # two columns: signal and noise per sample, summed before the ratio
        return np.stack([np.sum(r2 * r2, axis=1), np.sum((r2 - o2) ** 2, axis=1)], axis=1)
    raise ValueError(metric)


def aggregate(metric: str, scores: np.ndarray) -> float:
    if metric == "sqnr":
        return ratio_db(float(scores[:, 0].sum()), float(scores[:, 1].sum()))
    return float(np.mean(scores)) if len(scores) else float("nan")


def bootstrap_ci(
    stat, n: int, rounds: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap over samples: ``stat(indices) -> float`` evaluated on resamples."""
    if n < 2:
        v = stat(np.arange(n))
        return v, v
    rng = np.random.default_rng(seed)
    vals = np.array([stat(rng.integers(0, n, n)) for _ in range(rounds)], dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    if not len(vals):
        return float("nan"), float("nan")
    a = (1.0 - level) / 2.0
    return float(np.quantile(vals, a)), float(np.quantile(vals, 1.0 - a))
