"""amq.qat: the QAT handoff (DESIGN.md §10). The only place amq uses torch.

Importing this package does not import torch; each function below imports its torch submodule
when called (torch is the optional extra ``qat``: ``pip install 'amq[qat]'``).

- ``load_handoff(DIR)``: a bundle written by ``amq qat``; ``.torch_model()`` is the ONNX graph as
  a torch module with fake quantization initialised from amq's scales and zero points.
- ``build_torch_model(onnx_model, plan)``: the same from a float ONNX model and a QuantPlan.
- ``prepare(model, DIR)``: the same fake quantization attached to the user's own nn.Module.
- ``export(model, path)``: either kind of model back to a QDQ ONNX model with the trained scales.
- ``FakeQuantize``: the fake-quant module (amq's grids and rounding, straight-through gradient).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from amq.errors import AmqError

if TYPE_CHECKING:  # pragma: no cover
    import onnx
    import torch

    from amq.plan import QuantPlan
    from amq.qat.bundle import Handoff
    from amq.qat.convert import OnnxModule
    from amq.qat.fakequant import FakeQuantize
    from amq.qat.mapping import PrepareReport

__all__ = [
    "FakeQuantize",
    "Handoff",
    "OnnxModule",
    "PrepareReport",
    "build_torch_model",
    "export",
    "load_handoff",
    "prepare",
    "require_torch",
]

TORCH_REQUIREMENT = "torch==2.13.0"


def require_torch() -> None:
    """A one-line AmqError when PyTorch is not installed."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise AmqError(
            f"the QAT handoff needs PyTorch: pip install 'amq[qat]' (or pip install {TORCH_REQUIREMENT})"
        ) from None


def load_handoff(path: str | os.PathLike[str]) -> Handoff:
    """Read a bundle written by ``amq qat`` (``.plan``, ``.float_model``, ``.torch_model()``)."""
    require_torch()
    from amq.qat.bundle import load_handoff as _load

    return _load(path)


def build_torch_model(
    model: onnx.ModelProto, plan: QuantPlan | None = None, **kwargs: Any
) -> OnnxModule:
    """An ONNX graph as a torch module with fake quantization from ``plan`` (None: float).
    kwargs: act_averaging_constant (0), weight_averaging_constant (1), learnable_scales (False)."""
    require_torch()
    from amq.qat.convert import build_torch_model as _build

    return _build(model, plan, **kwargs)


def prepare(model: torch.nn.Module, handoff: Any, **kwargs: Any) -> PrepareReport:
    """Attach the handoff's fake quantization to the user's nn.Module in place; returns what was
    mapped and what was not. kwargs: act_averaging_constant (0), weight_averaging_constant (1),
    learnable_scales (False), strict (False: report; True: error when anything is unmapped)."""
    require_torch()
    from amq.qat.mapping import prepare as _prepare

    return _prepare(model, handoff, **kwargs)


def export(model: torch.nn.Module, path: str | os.PathLike[str]) -> Any:
    """Write a QDQ ONNX model with the trained weights and scales (and ``<name>.qparams.json``)."""
    require_torch()
    from amq.qat.exporter import export as _export

    return _export(model, path)


def __getattr__(name: str) -> Any:
    if name == "FakeQuantize":
        require_torch()
        from amq.qat.fakequant import FakeQuantize

        return FakeQuantize
    if name == "OnnxModule":
        require_torch()
        from amq.qat.convert import OnnxModule

        return OnnxModule
    if name == "Handoff":
        require_torch()
        from amq.qat.bundle import Handoff

        return Handoff
    if name == "PrepareReport":
        require_torch()
        from amq.qat.mapping import PrepareReport

        return PrepareReport
    raise AttributeError(f"module 'amq.qat' has no attribute {name!r}")
