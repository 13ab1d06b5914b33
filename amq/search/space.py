"""The mixed-precision search space: layers x bit choices <-> config overrides (DESIGN.md §9).

Two parameterisations:
- ``per_layer``: one categorical per layer (weight bits incl. "float", and activation bits);
  right for small models.
- ``ranking``: three integers on the sensitivity ranking: how many of the most sensitive layers
  stay float, how many more go to INT16, how many of the least sensitive (at 4 bits) go to W4
  (and with dynamic activations offered, a fourth: how many of the next most sensitive MatMul/Gemm
  layers quantize their input at run time). A 50+ layer model then has a 3-4 parameter space
  that 100 trials cover well.
Runtime choices (``dynamic``, ``block_size``): a MatMul/Gemm layer that can (``dynamic_ok``) gets
the activation choice DYNAMIC (W8, its input quantized at run time; bitops 8 x 8); with a
``block_size``, W4 of a MatMul that can (``block_ok``) is block-wise (MatMulNBits).
No optuna here: a sampler is passed in as two callables.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from amq.config import ActivationsOverride, Override, WeightsOverride

FLOAT = "float"
DYNAMIC = "dynamic"  # an activation choice: quantized at run time, 8 bits


@dataclass(frozen=True)
class LayerChoice:
    weight_bits: int | None  # None: the layer has no constant weight
    act_bits: int
    float: bool = False
    # None: left to the config; set (False / 0 too) where the space offers the choice
    dynamic: bool | None = None
    block_size: int | None = None

    def label(self) -> str:
        if self.float:
            return "float"
        if self.dynamic:
            return f"W{self.weight_bits}Adyn"
        w = f"W{self.weight_bits}" + (f"b{self.block_size}" if self.block_size else "")
        return f"{w}A{self.act_bits}" if self.weight_bits else f"A{self.act_bits}"


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
    dynamic_ok: dict[str, bool] = field(default_factory=dict)  # offered DYNAMIC where true
    block_ok: dict[str, bool] = field(default_factory=dict)  # W4 block-wise where true
    block_size: int = 0  # 0: W4 per channel everywhere

    def __post_init__(self) -> None:
        if self.kind == "auto":
            self.kind = "per_layer" if len(self.layers) <= 12 else "ranking"

    @property
    def allow_float(self) -> bool:
        return FLOAT in self.weight_bits

    @property
    def wbits(self) -> list[int]:
        return sorted(b for b in self.weight_bits if b != FLOAT)

    @property
    def offers_dynamic(self) -> bool:
        return any(self.dynamic_ok.values())

    def _choice(self, layer: str, wb: Any, ab: Any) -> LayerChoice:
        if wb == FLOAT:
            return LayerChoice(None, ab, float=True)
        w = int(wb) if self.has_weight[layer] else None
        dyn = (ab == DYNAMIC and w == 8) if self.dynamic_ok.get(layer) else None
        blk = None
        if self.block_size and self.block_ok.get(layer):
            blk = self.block_size if w == 4 and not dyn else 0
        a = 8 if ab == DYNAMIC else int(ab)
        return LayerChoice(w, a, dynamic=dyn, block_size=blk)

    def act_choices(self, layer: str) -> list[Any]:
        extra = [DYNAMIC] if self.dynamic_ok.get(layer) and 8 in self.wbits else []
        return list(self.act_bits) + extra

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
                    suggest_cat(f"a:{layer}", self.act_choices(layer))
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
        ndyn = suggest_int("n_dyn", 0, n) if self.offers_dynamic else 0
        return self.from_counts(n_float, n16, n4, ndyn)

    def from_counts(self, n_float: int, n16: int, n4: int, n_dyn: int = 0) -> Assignment:
        """Float for the n_float most sensitive layers, INT16 for the next n16, W4A8 for the n4
        least sensitive (at 4 bits) of the rest, dynamic activations for the n_dyn most sensitive
        of what is left that can take them, W8A8 (or the smallest allowed) elsewhere."""
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
        taken |= set(low[:n4])
        dyn = [x for x in high if x not in taken and self.dynamic_ok.get(x) and w == 8]
        for layer in dyn[:n_dyn]:
            out[layer] = self._choice(layer, w, DYNAMIC)
        return out

    def seeds(self) -> list[dict[str, Any]]:
        """First trials: all-INT16, all-INT8, greedy by sensitivity at several K, INT4 on the
        least sensitive layers (as parameter dicts of this space)."""
        n = len(self.layers)
        cands: list[tuple[int, ...]] = []
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
        if self.offers_dynamic:  # every layer that can, dynamic; and the most sensitive quarter
            cands += [(0, 0, 0, n), (0, 0, 0, math.ceil(0.25 * n))]
        seen = set()
        out = []
        for c in cands:
            if c in seen:
                continue
            seen.add(c)
            out.append(self.params_for(self.from_counts(*c), c))
        return out

    def params_for(self, assignment: Assignment, counts: tuple[int, ...]) -> dict[str, Any]:
        if self.kind == "ranking":
            p: dict[str, Any] = {}
            if self.allow_float:
                p["n_float"] = counts[0]
            if 16 in self.wbits or 16 in self.act_bits:
                p["n_16"] = counts[1]
            if 4 in self.wbits:
                p["n_4"] = counts[2]
            if self.offers_dynamic:
                p["n_dyn"] = counts[3] if len(counts) > 3 else 0
            return p
        p = {}
        for layer, ch in assignment.items():
            if self.has_weight[layer]:
                p[f"w:{layer}"] = FLOAT if ch.float else ch.weight_bits
            elif self.allow_float:
                p[f"f:{layer}"] = ch.float
            if not ch.float:
                p[f"a:{layer}"] = DYNAMIC if ch.dynamic else ch.act_bits
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
                        weights=WeightsOverride(bits=ch.weight_bits, block_size=ch.block_size)
                        if ch.weight_bits
                        else WeightsOverride(),
                        activations=ActivationsOverride(bits=ch.act_bits, dynamic=ch.dynamic),
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
