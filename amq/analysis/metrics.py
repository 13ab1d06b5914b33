"""Metrics: "higher is better" numbers over an evaluation set (DESIGN.md §8), plus streaming
fidelity of a quantized model's outputs against the float model's."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(sum ref^2 / sum (ref - test)^2)."""
    r = np.asarray(reference, dtype=np.float64)
    e = r - np.asarray(test, dtype=np.float64)
    return _db(float(np.sum(r * r)), float(np.sum(e * e)))


def _db(signal: float, noise: float) -> float:
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
    per_sample_cos: list[float] = field(default_factory=list)

    def update(self, ref: np.ndarray, test: np.ndarray) -> None:
        r = np.asarray(ref, dtype=np.float64)
        t = np.asarray(test, dtype=np.float64)
        e = r - t
        self.signal += float(np.sum(r * r))
        self.noise += float(np.sum(e * e))
        if e.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(e))))
        n = r.shape[0] if r.ndim >= 1 else 1
        rs = r.reshape(n, -1) if r.ndim >= 1 else r.reshape(1, -1)
        ts = t.reshape(n, -1) if t.ndim >= 1 else t.reshape(1, -1)
        for i in range(n):
            c = cosine(rs[i], ts[i])
            self.cos_sum += c
            self.per_sample_cos.append(c)
        self.samples += n
        if r.ndim == 2 and r.shape[1] > 1:
            self.agree += int(np.sum(np.argmax(r, axis=1) == np.argmax(t, axis=1)))
            self.agree_n += r.shape[0]

    @property
    def sqnr_db(self) -> float:
        return _db(self.signal, self.noise)

    @property
    def cosine(self) -> float:
        return self.cos_sum / self.samples if self.samples else float("nan")

    @property
    def agreement(self) -> float | None:
        return self.agree / self.agree_n if self.agree_n else None
