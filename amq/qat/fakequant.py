"""Fake quantization in torch with amq's arithmetic (DESIGN.md §3, amq.quant.qmath).

q = clamp(round_half_even(x / scale) + zero_point, qmin, qmax); x' = (q - zero_point) * scale,
with a straight-through estimator for the rounding (the gradient is 1 inside the grid and 0 where
the value is clipped). Activations divide in float32 like onnxruntime's QuantizeLinear; weights
divide in float64 like amq's own ``qmath.quantize`` that wrote the stored integer weights, so the
torch model reproduces amq's QDQ model to float rounding.

Scale updates (DESIGN.md §10): scale = (1 - c) * scale + c * current_scale, where c is the
averaging constant. Weights: current_scale = max|w| / qmax (per channel), c = 1 by default (the
scale follows the weights, recomputed on every call); activations: c = 0 by default (frozen at
the calibrated value); with 0 < c activations average their range [lo, hi] over training batches
(ranges always contain 0, so the scale then follows exactly the formula above). ``learnable``:
the scale is a parameter trained by gradient descent (LSQ, Esser et al. 2020: gradient scaled by
1 / sqrt(numel * qmax)); zero points stay at their calibrated values.

This module imports torch: it is loaded only through amq.qat (lazily).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from amq.quant import overflow, qmath

INT32_MAX = qmath.INT32_MAX
MIN_SCALE = qmath.MIN_SCALE


class _RoundSTE(torch.autograd.Function):
    """Round half to even; the gradient passes straight through."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g


class _GradScale(torch.autograd.Function):
    """Identity forward; the gradient multiplied by ``k`` (LSQ step-size gradient scale)."""

    @staticmethod
    def forward(ctx, x, k: float):  # type: ignore[override]
        ctx.k = k
        return x.clone()

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g * ctx.k, None


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return _RoundSTE.apply(x)


@dataclass(frozen=True)
class FakeQuantOptions:
    """The keyword options of a FakeQuantize (see there): role, averaging_constant, learnable,
    clamp, symmetric (default: weights only) and pair_safe_axis (a weight under amq's overflow
    guard: its scales stay pair-safe, quant.overflow)."""

    role: str = "activation"
    averaging_constant: float | None = None
    learnable: bool = False
    clamp: tuple[float | None, float | None] | None = None
    symmetric: bool | None = None
    pair_safe_axis: int | None = None


class FakeQuantize(nn.Module):
    """Quantize-dequantize one tensor on an amq grid.

    bits/signed/narrow: the grid (``qmath.grid``); axis: the channel axis of per-channel scales
    (None: one scale); scale/zero_point: initial values (from amq's qparams). Keywords (the
    fields of ``FakeQuantOptions``): role: ``weight`` (symmetric, zero point 0, scale from
    max|w|) or ``activation``; averaging_constant: c in scale = (1 - c) * scale + c *
    current_scale (default 1 for weights, 0 for activations); learnable: train the scale (LSQ);
    clamp: the ahead-relu bounds of an activation's range."""

    def __init__(
        self,
        bits: int,
        signed: bool,
        narrow: bool = False,
        axis: int | None = None,
        scale: float | list[float] | np.ndarray = 1.0,
        zero_point: int | list[int] | np.ndarray = 0,
        **options: Any,
    ) -> None:
        super().__init__()
        o = FakeQuantOptions(**options)
        role, clamp, learnable = o.role, o.clamp, o.learnable
        self.pair_safe_axis = o.pair_safe_axis
        if role not in ("weight", "activation"):
            raise ValueError(f"role {role!r}: use weight or activation")
        g = qmath.grid(bits, signed, narrow)
        self.bits, self.signed, self.narrow = bits, signed, narrow
        self.qmin, self.qmax = g.qmin, g.qmax
        self.axis = axis
        self.role = role
        self.symmetric = role == "weight" if o.symmetric is None else bool(o.symmetric)
        c = o.averaging_constant
        c = (1.0 if role == "weight" else 0.0) if c is None else c
        if not 0.0 <= float(c) <= 1.0:
            raise ValueError(f"averaging_constant {c}: must be in [0, 1]")
        self.averaging_constant = float(c)
        self.learnable = learnable
        self.clamp = tuple(clamp) if clamp is not None else None
        self.enabled = True
        s = torch.tensor(np.asarray(scale, dtype=np.float32).reshape(-1))
        z = torch.tensor(np.asarray(zero_point, dtype=np.float32).reshape(-1))
        if learnable:
            self.scale = nn.Parameter(s)
        else:
            self.register_buffer("scale", s)
        self.register_buffer("zero_point", z)
        self.last_scale = s.detach().clone()  # the scale of the last call (after a bias fit)
        # activations averaging their range: [lo, hi] (asymmetric) or [-amax, amax] (symmetric),
        # started from the calibrated grid
        lo = (self.qmin - z) * s
        hi = (self.qmax - z) * s
        if self.symmetric:
            lo, hi = -torch.maximum(-lo, hi), torch.maximum(-lo, hi)
        self.register_buffer("range_lo", lo.clone())
        self.register_buffer("range_hi", hi.clone())

    @classmethod
    def from_plan(cls, tp, **kwargs) -> FakeQuantize:
        """From an amq TensorPlan (weight or activation)."""
        per_channel = tp.role == "weight" and tp.axis is not None
        # a per-tensor plan may list one value per channel: the QDQ model uses the first
        return cls(
            tp.bits,
            tp.signed,
            tp.narrow,
            tp.axis if per_channel else None,
            tp.scale if per_channel else tp.scale[:1],
            tp.zero_point if per_channel else tp.zero_point[:1],
            role="weight" if tp.role == "weight" else "activation",
            clamp=tp.clamp,
            symmetric=tp.symmetric,
            pair_safe_axis=getattr(tp, "pair_safe_axis", None),
            **kwargs,
        )

    def extra_repr(self) -> str:
        grid = f"{'int' if self.signed else 'uint'}{self.bits}{' narrow' if self.narrow else ''}"
        axis = f", axis={self.axis}" if self.axis is not None else ""
        how = "learnable" if self.learnable else f"averaging_constant={self.averaging_constant:g}"
        return f"{self.role}, {grid}{axis}, {how}, channels={self.scale.numel()}"

    # -- scales --------------------------------------------------------------------------------

    def _shape(self, x: torch.Tensor) -> list[int]:
        shape = [1] * x.dim()
        if self.axis is not None and self.scale.numel() > 1:
            shape[self.axis] = -1
        return shape

    def _safe(self, s: torch.Tensor) -> torch.Tensor:
        """amq's safe scale: a zero or non-finite channel takes the largest good scale (or 1)."""
        bad = ~(s > 0) | ~torch.isfinite(s)
        if bool(bad.any()):
            good = s[~bad]
            fill = good.max() if good.numel() else torch.ones((), dtype=s.dtype, device=s.device)
            s = torch.where(bad, fill, s)
        return torch.clamp(s, min=MIN_SCALE)

    @torch.no_grad()
    def weight_scale_of(self, w: torch.Tensor) -> torch.Tensor:
        """max|w| / qmax per channel (amq's weight_qparams), computed in float64."""
        a = w.detach().abs().double()
        if self.axis is None or self.scale.numel() == 1:
            amax = a.max().reshape(1) if a.numel() else torch.zeros(1, dtype=torch.float64)
        else:
            amax = a.movedim(self.axis, 0).reshape(a.shape[self.axis], -1).amax(dim=1)
        s = self._safe(amax / self.qmax).float()
        if self.pair_safe_axis is not None:
            safe = overflow.pair_safe_scale(
                w.detach().cpu().numpy(), s.numpy(), self.pair_safe_axis
            )
            s = torch.from_numpy(np.asarray(safe, dtype=np.float32).reshape(-1))
        return s

    @torch.no_grad()
    def _observe_weight(self, w: torch.Tensor) -> None:
        c = self.averaging_constant
        if c >= 1.0:
            self.scale.copy_(self.weight_scale_of(w))  # follows the weights, in every mode
        elif c > 0.0 and self.training:
            self.scale.mul_(1.0 - c).add_(c * self.weight_scale_of(w))

    @torch.no_grad()
    def _observe_activation(self, x: torch.Tensor) -> None:
        c = self.averaging_constant
        if not (self.training and c > 0.0) or x.numel() == 0:
            return
        xd = x.detach()
        lo, hi = float(xd.min()), float(xd.max())
        if self.clamp is not None:  # ahead-relu: the consumers see the clamped values only
            clo, chi = self.clamp
            lo, hi = (v if clo is None else max(v, clo) for v in (lo, hi))
            lo, hi = (v if chi is None else min(v, chi) for v in (lo, hi))
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        if self.symmetric:
            lo, hi = -max(-lo, hi), max(-lo, hi)
        self.range_lo.mul_(1.0 - c).add_(c * lo)
        self.range_hi.mul_(1.0 - c).add_(c * hi)
        s, z = self._range_qparams(self.range_lo.double(), self.range_hi.double())
        self.scale.copy_(s.float())
        self.zero_point.copy_(z.float())

    def _range_qparams(
        self, lo: torch.Tensor, hi: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """qmath.activation_qparams on tensors."""
        lo = torch.clamp(lo, max=0.0)
        hi = torch.clamp(hi, min=0.0)
        if self.symmetric:
            s = self._safe(torch.maximum(-lo, hi) / self.qmax)
            return s, torch.zeros_like(s)
        s = self._safe((hi - lo) / (self.qmax - self.qmin))
        z = torch.clamp(torch.round(self.qmin - lo / s), self.qmin, self.qmax)
        return s, z

    def current_scale(self) -> torch.Tensor:
        """The scale in use (a learnable scale kept positive; a buffer copied, since averaging
        updates it in place while autograd may still hold the value of an earlier call)."""
        s = self.scale
        return torch.clamp(s, min=MIN_SCALE) if self.learnable else s.clone()

    def qparams(self) -> tuple[np.ndarray, np.ndarray]:
        """(scale float32 [C], zero_point int64 [C]) as amq stores them."""
        s = self.current_scale().detach().cpu().numpy().astype(np.float32).reshape(-1)
        z = self.zero_point.detach().cpu().numpy().astype(np.int64).reshape(-1)
        return s, z

    # -- forward -------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        bias: torch.Tensor | None = None,
        input_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``bias``, ``input_scale``: a weight's layer bias and input scale: the weight scale is
        widened where the bias would overflow int32 at scale s_input * s_weight (as amq does)."""
        if not self.enabled:
            return x
        if not self.learnable:
            if self.role == "weight":
                self._observe_weight(x)
            else:
                self._observe_activation(x)
        shape = self._shape(x)
        s = self.current_scale()
        if bias is not None and input_scale is not None:
            s = fit_scale_for_bias(s, bias, input_scale)
        self.last_scale = s.detach()
        if self.learnable:
            per = max(x.numel() // max(s.numel(), 1), 1)
            s = _GradScale.apply(s, 1.0 / math.sqrt(per * max(self.qmax, 1)))
        s = s.reshape(shape)
        z = self.zero_point.clone().reshape(shape)
        if self.role == "weight":
            v = x.double() / s.double()  # amq stores weights quantized in float64 arithmetic
        else:
            v = x / s.to(x.dtype)  # onnxruntime QuantizeLinear: float32 division
        q = torch.clamp(round_ste(v) + z.to(v.dtype), self.qmin, self.qmax)
        return (q.to(x.dtype) - z.to(x.dtype)) * s.to(x.dtype)


def fit_scale_for_bias(
    scale: torch.Tensor, bias: torch.Tensor, input_scale: torch.Tensor
) -> torch.Tensor:
    """qmath.fit_weight_scale_for_bias in torch: a weight scale widened where the bias would not
    fit int32 at scale s_input * s_weight (float64; stepped up where float32 rounding fell
    short). A per-tensor scale takes the widest channel's need, as the QDQ model does."""
    b = bias.detach().abs().double().reshape(-1)
    need = b / (float(input_scale.detach().reshape(-1)[0]) * INT32_MAX)
    if not bool((need > scale.detach().double().reshape(-1)).any()):
        return scale
    up = torch.maximum(scale.detach().double().reshape(-1), need).float()
    short = up.double() < need
    up = torch.where(short, torch.nextafter(up, torch.full_like(up, math.inf)), up)
    if scale.numel() == 1:  # per-tensor: the widest need (qmath.fit_weight_scale_for_bias)
        up = up.max().reshape(1)
    # the widened channels take the fitted value (no gradient), the others keep theirs
    return torch.where(up > scale.detach().reshape(-1), up, scale.reshape(-1))


def fake_quantize_bias(
    b: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor
) -> torch.Tensor:
    """int32 bias with scale s_input * s_weight (qmath.bias_qparams), straight-through."""
    s64 = input_scale.detach().double().reshape(-1)[0] * weight_scale.detach().double().reshape(-1)
    s64 = s64.expand(b.shape) if s64.numel() == 1 else s64.reshape(b.shape)
    q = torch.clamp(round_ste(b.double() / s64), -INT32_MAX, INT32_MAX)
    return q.to(b.dtype) * s64.float().to(b.dtype)
