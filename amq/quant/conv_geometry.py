"""A Conv's geometry from its attributes (group, strides, pads, dilations, auto_pad resolved),
as the overflow emulation (quant/overflow.py), bias correction's window sums and the Gram
statistics read it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ConvGeometry:
    """A Conv's group, strides, pads (all begins, then all ends, as in ONNX; auto_pad resolved)
    and dilations; None: the ONNX default. The keywords of ``conv_saturation`` and
    ``conv_accumulators`` (``conv_geometry`` gives them from a node)."""

    group: int = 1
    strides: Sequence[int] | None = None
    pads: Sequence[int] | None = None
    dilations: Sequence[int] | None = None

    def full(self, w: np.ndarray) -> tuple:
        """(group, strides, pads, dilations) with every default filled in for weight ``w``."""
        nd = w.ndim - 2
        full = [
            tuple(int(x) for x in v) if v else (d,) * n
            for v, n, d in ((self.strides, nd, 1), (self.pads, 2 * nd, 0), (self.dilations, nd, 1))
        ]
        return (int(self.group), *full)


def auto_pad(attrs: Mapping[str, object]) -> str:
    """A Conv's auto_pad attribute as text (NOTSET where absent)."""
    auto = attrs.get("auto_pad", b"NOTSET")
    return auto.decode() if isinstance(auto, bytes) else str(auto)


def conv_geometry(
    attrs: Mapping[str, object], w_shape: tuple[int, ...], x_shape: tuple[int, ...]
) -> dict[str, object]:
    """A Conv's strides, pads, dilations and group (the keywords of ``conv_saturation``), with
    auto_pad resolved to explicit pads (``x_shape`` is read for SAME padding only)."""
    k = w_shape[2:]
    nd = len(k)
    strides = list(attrs.get("strides", [1] * nd))  # type: ignore[call-overload]
    dil = list(attrs.get("dilations", [1] * nd))  # type: ignore[call-overload]
    pads = list(attrs.get("pads", [0] * (2 * nd)))  # type: ignore[call-overload]
    auto = auto_pad(attrs)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * nd)
        for i in range(nd):
            size = x_shape[2 + i]
            out = -(-size // strides[i])
            total = max(0, (out - 1) * strides[i] + (k[i] - 1) * dil[i] + 1 - size)
            small, big = total // 2, total - total // 2
            pads[i], pads[i + nd] = (small, big) if auto == "SAME_UPPER" else (big, small)
    elif auto == "VALID":
        pads = [0] * (2 * nd)
    return {
        "group": int(attrs.get("group", 1)),  # type: ignore[call-overload]
        "strides": tuple(int(s) for s in strides),
        "pads": tuple(int(p) for p in pads),
        "dilations": tuple(int(d) for d in dil),
    }
