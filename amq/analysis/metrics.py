"""Metrics: "higher is better" numbers over an evaluation set (DESIGN.md §8) behind one Metric
protocol, the paired drop from the float model with its bootstrap CI, the budget on that drop,
and the streaming fidelity of a quantized model's outputs against the float model's."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from amq.errors import ConfigError


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
# Task metrics over an evaluation set: one Metric protocol for the built-ins and for a user's
# module:function. Scores are kept per sample, so every metric gets a bootstrap CI the same way.


FIDELITY_METRICS = ("agreement", "cosine", "sqnr", "neg_mse")
BUILTIN_METRICS = ("top1", *FIDELITY_METRICS)
USER_METRIC_ROUNDS = 200  # bootstrap rounds at most for a user function (each round calls it)


@runtime_checkable
class Metric(Protocol):
    """How a metric turns a model's outputs into one "higher is better" number.

    ``scores(outputs, references, labels)`` keeps one row per sample (axis 0) and ``value(scores)``
    reduces any subset of those rows, so a bootstrap resamples rows for every metric alike;
    ``join`` concatenates the scores of consecutive batches. ``ideal``: the value a perfect copy
    of the reference gets (the baseline of a drop); ``scores_reference``: the reference model is
    scored too and its value is the baseline instead (top1, user metrics); neither: no drop
    (sqnr). ``averaged``: the value is the mean of per-sample scores, so a drop splits into
    per-sample parts (search prunes on their running mean). ``max_rounds``: bootstrap rounds at
    most (None: as asked)."""

    name: str
    needs_labels: bool
    needs_reference: bool
    ideal: float | None
    scores_reference: bool
    averaged: bool
    max_rounds: int | None

    def scores(self, outputs: Any, references: Any, labels: Any) -> Any: ...

    def value(self, scores: Any) -> float: ...

    def join(self, parts: Sequence[Any]) -> Any: ...


def _rows(a: Any, n: int) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).reshape(n, -1)


def _top1(o2: np.ndarray, _r: Any, labels: Any) -> np.ndarray:
    assert labels is not None
    return 100.0 * (np.argmax(o2, axis=1) == np.asarray(labels).reshape(-1)).astype(np.float64)


def _agreement(o2: np.ndarray, r2: np.ndarray, _labels: Any) -> np.ndarray:
    return 100.0 * (np.argmax(o2, axis=1) == np.argmax(r2, axis=1)).astype(np.float64)


def _cosine(o2: np.ndarray, r2: np.ndarray, _labels: Any) -> np.ndarray:
    return np.array([cosine(r2[i], o2[i]) for i in range(len(o2))])


def _neg_mse(o2: np.ndarray, r2: np.ndarray, _labels: Any) -> np.ndarray:
    return -np.mean((o2 - r2) ** 2, axis=1)


@dataclass(frozen=True)
class Averaged:
    """A built-in metric that is the mean of one score per sample (top1 and agreement in %,
    cosine, neg_mse)."""

    name: str
    score: Callable[[np.ndarray, Any, Any], np.ndarray]  # (outputs, references as rows, labels)
    needs_labels: bool = False
    needs_reference: bool = True
    ideal: float | None = None
    scores_reference: bool = False
    averaged: bool = True
    max_rounds: int | None = None

    def scores(self, outputs: Any, references: Any, labels: Any) -> np.ndarray:
        o = np.asarray(outputs, dtype=np.float64)
        n = o.shape[0] if o.ndim else 1
        r2 = None if self.needs_labels else _rows(references, n)
        return self.score(o.reshape(n, -1), r2, labels)

    def value(self, scores: np.ndarray) -> float:
        return float(np.mean(scores)) if len(scores) else float("nan")

    def join(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts, axis=0)


@dataclass(frozen=True)
class Sqnr:
    """Output SQNR in dB over the whole set: per sample, its signal and noise sums (two columns),
    summed before the ratio (a mean of per-sample dB would let quiet samples dominate)."""

    name: str = "sqnr"
    needs_labels: bool = False
    needs_reference: bool = True
    ideal: float | None = None
    scores_reference: bool = False
    averaged: bool = False
    max_rounds: int | None = None

    def scores(self, outputs: Any, references: Any, labels: Any) -> np.ndarray:
        o = np.asarray(outputs, dtype=np.float64)
        n = o.shape[0] if o.ndim else 1
        o2, r2 = o.reshape(n, -1), _rows(references, n)
        return np.stack([np.sum(r2 * r2, axis=1), np.sum((r2 - o2) ** 2, axis=1)], axis=1)

    def value(self, scores: np.ndarray) -> float:
        return ratio_db(float(scores[:, 0].sum()), float(scores[:, 1].sum()))

    def join(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts, axis=0)


@dataclass(frozen=True)
class Samples:
    """A user metric's scores: the outputs and references themselves (its function sees whole
    sets), indexed by sample like per-sample scores, so resampling works the same way."""

    outputs: np.ndarray
    references: Any

    def __len__(self) -> int:
        return len(self.outputs)

    def __getitem__(self, i: Any) -> Samples:
        return Samples(self.outputs[i], self.references[i])


@dataclass(frozen=True)
class UserMetric:
    """``module:function(outputs, references) -> float`` as a Metric: references are the float
    model's outputs (labels when there is no reference); the float model scored the same way is
    the baseline of a drop."""

    name: str
    fn: Callable[[Any, Any], Any]
    needs_labels: bool = False
    needs_reference: bool = True
    ideal: float | None = None
    scores_reference: bool = True
    averaged: bool = False
    max_rounds: int | None = USER_METRIC_ROUNDS

    def scores(self, outputs: Any, references: Any, labels: Any) -> Samples:
        refs = references if references is not None else np.asarray(labels)
        return Samples(np.asarray(outputs), refs)

    def value(self, scores: Samples) -> float:
        return float(self.fn(scores.outputs, scores.references))

    def join(self, parts: Sequence[Samples]) -> Samples:
        return Samples(
            np.concatenate([p.outputs for p in parts], axis=0),
            np.concatenate([np.asarray(p.references) for p in parts], axis=0),
        )


_BUILTINS: dict[str, Metric] = {
    "top1": Averaged(
        "top1", _top1, needs_labels=True, needs_reference=False, scores_reference=True
    ),
    "agreement": Averaged("agreement", _agreement, ideal=100.0),
    "cosine": Averaged("cosine", _cosine, ideal=1.0),
    "sqnr": Sqnr(),
    "neg_mse": Averaged("neg_mse", _neg_mse, ideal=0.0),
}


def get_metric(name: str) -> Metric:
    """A built-in metric by name, or a user's ``module:function`` (imported here)."""
    if name in _BUILTINS:
        return _BUILTINS[name]
    return UserMetric(name, _load_user_metric(name))


metric_spec = get_metric  # the name before the Metric protocol


def _load_user_metric(ref: str) -> Callable[[Any, Any], Any]:
    from amq.calib.data import import_callable

    if ":" not in ref:
        raise ConfigError(
            f"--metric '{ref}': not one of {', '.join(BUILTIN_METRICS)} nor module:function"
        )
    return import_callable(ref, ConfigError, "metric")


def per_sample_scores(
    metric: str, out: np.ndarray, ref: np.ndarray | None, labels: np.ndarray | None
) -> Any:
    """``metric``'s scores of ``out``, one row per sample (see Metric)."""
    return get_metric(metric).scores(out, ref, labels)


def aggregate(metric: str, scores: Any) -> float:
    return get_metric(metric).value(scores)


def baseline(metric: Metric, reference_scores: Any) -> float | None:
    """What a drop is measured from: the ideal value, else the reference model's own value
    (top1, user metrics), else None (no drop: sqnr)."""
    if metric.ideal is not None:
        return metric.ideal
    if metric.scores_reference and reference_scores is not None:
        return metric.value(reference_scores)
    return None


def drop_parts(metric: Metric, scores: Any, reference_scores: Any) -> np.ndarray | None:
    """Per-sample parts whose mean is the drop (averaged metrics with a baseline), else None."""
    if not metric.averaged:
        return None
    if metric.ideal is not None:
        return metric.ideal - scores
    if metric.scores_reference and reference_scores is not None:
        return reference_scores - scores
    return None


def drop_stat(
    metric: Metric, scores: Any, reference_scores: Any
) -> Callable[[np.ndarray], float] | None:
    """The drop on a subset of the samples (indices), paired with the reference; None where the
    metric has no baseline. ``stat(all indices)`` is the drop itself."""
    ideal = metric.ideal
    if ideal is not None:
        return lambda i: ideal - metric.value(scores[i])
    if not metric.scores_reference or reference_scores is None:
        return None
    parts = drop_parts(metric, scores, reference_scores)
    if parts is not None:
        return lambda i: float(np.mean(parts[i]))
    return lambda i: metric.value(reference_scores[i]) - metric.value(scores[i])


def rounds_for(metric: Metric, rounds: int) -> int:
    return rounds if metric.max_rounds is None else min(rounds, metric.max_rounds)


def drop_with_ci(
    metric: Metric, scores: Any, reference_scores: Any, rounds: int
) -> tuple[float | None, tuple[float, float] | None]:
    """The drop from the baseline and its paired bootstrap CI (None, None without a baseline)."""
    stat = drop_stat(metric, scores, reference_scores)
    if stat is None:
        return None, None
    n = len(scores)
    return stat(np.arange(n)), bootstrap_ci(stat, n, rounds_for(metric, rounds))


def parse_budget(text: str | float, metric: str, float_value: float | None) -> float:
    """'1%': relative to the float model's value (for fidelity metrics, to the ideal value);
    '0.5': absolute, in the metric's units."""
    s = str(text).strip()
    try:
        if s.endswith("%"):
            pct = float(s[:-1])
            if float_value is None or float_value == 0:
                raise ConfigError(
                    f"--budget {s}: metric {metric} has no float value to take a percentage of; give an absolute budget"
                )
            b = abs(float_value) * pct / 100.0
        else:
            b = float(s)
    except ValueError:
        raise ConfigError(
            f"--budget '{s}': give a drop such as 1% (relative) or 0.5 (absolute)"
        ) from None
    if not b >= 0 or not math.isfinite(b):
        raise ConfigError(f"--budget '{s}': must be a non-negative number")
    return b


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
