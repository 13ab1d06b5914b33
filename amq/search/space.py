"""The mixed-precision search space: layers x bit choices <-> config overrides (DESIGN.md §9).

Two parameterisations:
- ``per_layer``: one categorical per layer (weight bits incl. "float", and activation bits);
  right for small models.
- ``ranking``: three integers on the sensitivity ranking: how many of the most sensitive layers
  stay float, how many more go to INT16, how many of the least sensitive (at 4 bits) go to W4.
  A 50+ layer model then has a 3-parameter space that 100 trials cover well.
No optuna here: a sampler is passed in as two callables.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from amq.config import ActivationsOverride, Override, WeightsOverride

FLOAT = "float"


@dataclass(frozen=True)
class LayerChoice:
    weight_bits: int | None  # None: the layer has no constant weight
    act_bits: int
    float: bool = False

    def label(self) -> str:
        if self.float:
            return "float"
        return f"W{self.weight_bits}A{self.act_bits}" if self.weight_bits else f"A{self.act_bits}"


Assignment = dict[str, LayerChoice]
SuggestInt = Callable[[str, int, int], int]
SuggestCat = Callable[[str, Sequence[Any]], Any]


@dataclass
class Space:
    layers: list[str]
    has_weight: dict[str, bool]
    rank_high: list[str]  # most sensitive first (at 8 bits): candidates for INT16 / float
    rank_low: list[str]  # least sensitive first (at 4 bits): candidates for W4
    weight_bits: tuple[Any, ...] = (4, 8, 16, FLOAT)
    act_bits: tuple[int, ...] = (8, 16)
    kind: str = "ranking"
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind == "auto":
            self.kind = "per_layer" if len(self.layers) <= 12 else "ranking"

    @property
    def allow_float(self) -> bool:
        return FLOAT in self.weight_bits

    @property
    def wbits(self) -> list[int]:
        return sorted(b for b in self.weight_bits if b != FLOAT)

    def _choice(self, layer: str, wb: Any, ab: int) -> LayerChoice:
        if wb == FLOAT:
            return LayerChoice(None, ab, float=True)
        return LayerChoice(int(wb) if self.has_weight[layer] else None, ab)

    def default_bits(self) -> tuple[int, int]:
        w = 8 if 8 in self.wbits else self.wbits[0]
        a = 8 if 8 in self.act_bits else min(self.act_bits)
        return w, a

    def sample(self, suggest_int: SuggestInt, suggest_cat: SuggestCat) -> Assignment:
        if self.kind == "per_layer":
            out: Assignment = {}
            for layer in self.layers:
                wb = (
                    suggest_cat(f"w:{layer}", list(self.weight_bits))
                    if self.has_weight[layer]
                    else None
                )
                if wb is None and self.allow_float:
                    wb = suggest_cat(f"f:{layer}", [False, True])
                    wb = FLOAT if wb else None
                ab = (
                    suggest_cat(f"a:{layer}", list(self.act_bits))
                    if wb != FLOAT
                    else max(self.act_bits)
                )
                out[layer] = (
                    self._choice(layer, wb, ab) if wb is not None else LayerChoice(None, ab)
                )
            return out
        n = len(self.layers)
        n_float = suggest_int("n_float", 0, n) if self.allow_float else 0
        n16 = suggest_int("n_16", 0, n) if (16 in self.wbits or 16 in self.act_bits) else 0
        n4 = suggest_int("n_4", 0, n) if 4 in self.wbits else 0
        return self.from_counts(n_float, n16, n4)

    def from_counts(self, n_float: int, n16: int, n4: int) -> Assignment:
        """Float for the n_float most sensitive layers, INT16 for the next n16, W4A8 for the n4
        least sensitive (at 4 bits) of the rest, W8A8 (or the smallest allowed) elsewhere."""
        w, a = self.default_bits()
        out: Assignment = {layer: self._choice(layer, w, a) for layer in self.layers}
        high = self.rank_high
        for layer in high[:n_float]:
            out[layer] = LayerChoice(None, max(self.act_bits), float=True)
        top = high[n_float : n_float + n16]
        for layer in top:
            out[layer] = self._choice(
                layer, 16 if 16 in self.wbits else w, 16 if 16 in self.act_bits else a
            )
        taken = set(high[: n_float + n16])
        low = [layer for layer in self.rank_low if layer not in taken and self.has_weight[layer]]
        for layer in low[:n4]:
            out[layer] = self._choice(layer, 4, a)
        return out

    def seeds(self) -> list[dict[str, Any]]:
        """First trials: all-INT16, all-INT8, greedy by sensitivity at several K, INT4 on the
        least sensitive layers (as parameter dicts of this space)."""
        n = len(self.layers)
        cands: list[tuple[int, int, int]] = []
        has16 = 16 in self.wbits or 16 in self.act_bits
        if has16:
            cands.append((0, n, 0))
        cands.append((0, 0, 0))
        for k in (0.05, 0.1, 0.25):
            if has16:
                cands.append((0, max(1, math.ceil(k * n)), 0))
        if 4 in self.wbits:
            for k in (0.25, 0.5, 0.75, 1.0):
                cands.append((0, 0, math.ceil(k * n)))
                if has16:
                    cands.append((0, max(1, math.ceil(0.1 * n)), math.ceil(k * n)))
        if self.allow_float:
            cands.append((max(1, math.ceil(0.05 * n)), 0, 0))
        seen = set()
        out = []
        for c in cands:
            if c in seen:
                continue
            seen.add(c)
            out.append(self.params_for(self.from_counts(*c), c))
        return out

    def params_for(self, assignment: Assignment, counts: tuple[int, int, int]) -> dict[str, Any]:
        if self.kind == "ranking":
            p: dict[str, Any] = {}
            if self.allow_float:
                p["n_float"] = counts[0]
            if 16 in self.wbits or 16 in self.act_bits:
                p["n_16"] = counts[1]
            if 4 in self.wbits:
                p["n_4"] = counts[2]
            return p
        p = {}
        for layer, ch in assignment.items():
            if self.has_weight[layer]:
                p[f"w:{layer}"] = FLOAT if ch.float else ch.weight_bits
            elif self.allow_float:
                p[f"f:{layer}"] = ch.float
            if not ch.float:
                p[f"a:{layer}"] = ch.act_bits
        return p


def overrides(assignment: Assignment) -> tuple[tuple[str, Override], ...]:
    """Config layer entries (exact names) for an assignment."""
    out = []
    for layer, ch in assignment.items():
        if ch.float:
            out.append((layer, Override(skip=True)))
        else:
            out.append(
                (
                    layer,
                    Override(
                        weights=WeightsOverride(bits=ch.weight_bits)
                        if ch.weight_bits
                        else WeightsOverride(),
                        activations=ActivationsOverride(bits=ch.act_bits),
                        skip=False,
                    ),
                )
            )
    return tuple(out)


def histogram(assignment: Assignment) -> dict[str, int]:
    h: dict[str, int] = {}
    for ch in assignment.values():
        h[ch.label()] = h.get(ch.label(), 0) + 1
    return dict(sorted(h.items()))


def assign(sp: Space, params: Mapping[str, Any]) -> Assignment:
    """The assignment a trial's parameters (optuna's, or stored ones) stand for."""
    return sp.sample(lambda n, lo, hi: int(params[n]), lambda n, ch: params[n])
