"""`amq check` on a QDQ model: which layers can saturate int16 pair sums on x86 without VNNI.

Read from the QDQ model alone: a Conv/Gemm/MatMul whose activation comes through an 8-bit
DequantizeLinear and whose weight is an int8 initializer behind a DequantizeLinear runs, at
INT8, on onnxruntime's uint8 x int8 GEMM. Without data the bound is the worst case (every
activation code anywhere on its grid, ``quant.overflow.channels_at_risk``); with data the
emulation counts the outputs that would saturate on the codes the model really produces (its
Q/DQ math run with graph optimizations off, so the figure is the same on every machine).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from amq.graph.model import Graph
from amq.quant import overflow
from amq.quant.conv_geometry import conv_geometry
from amq.quant.planner import node_attrs
from amq.quant.registry import Kernel, gemm_transposed, handler

EIGHT_BIT = {onnx.TensorProto.UINT8: False, onnx.TensorProto.INT8: True}  # -> signed


@dataclass
class PairLayer:
    """One layer that runs on the 8-bit pair-sum kernel, as the QDQ model gives it."""

    name: str
    op_type: str
    codes: str  # the integer tensor of its activation (a QuantizeLinear output or graph input)
    x_scale: float
    x_zero_point: int
    signed: bool
    w_codes: np.ndarray  # Conv [Cout, Cin/g, *k]; Gemm/MatMul [K, N]
    w_scale: np.ndarray
    attrs: dict[str, object]

    @property
    def group(self) -> int:
        return int(self.attrs.get("group", 1))  # type: ignore[call-overload]


def _const(g: Graph, name: str) -> np.ndarray | None:
    return numpy_helper.to_array(g.initializers[name]) if name in g.initializers else None


def _dq_input(g: Graph, t: str) -> onnx.NodeProto | None:
    p = g.producer.get(t)
    return p if p is not None and p.op_type == "DequantizeLinear" else None


def _int_type(g: Graph, dq: onnx.NodeProto) -> int | None:
    """The integer type a DequantizeLinear reads: its zero point's (uint8 when it has none)."""
    if len(dq.input) > 2 and dq.input[2] in g.initializers:
        return g.initializers[dq.input[2]].data_type
    return g.elem_type(dq.input[0]) or onnx.TensorProto.UINT8


def pair_layers(g: Graph) -> list[PairLayer]:
    """The QDQ model's layers whose 8-bit kernels add products in int16 pairs (main graph)."""
    out = []
    for node in g.nodes:
        kernel = handler(node.op_type).pair_sums
        if kernel is None or len(node.input) < 2:
            continue
        xd, wd = _dq_input(g, node.input[0]), _dq_input(g, node.input[1])
        if xd is None or wd is None or len(wd.input) < 2:
            continue
        wq = _const(g, wd.input[0])
        if wq is None or wq.dtype != np.int8:
            continue  # uint8 weights (U8U8) never saturate; wider ones run no 8-bit kernel
        x_type = _int_type(g, xd)
        if x_type not in EIGHT_BIT:
            continue
        xs, xz = _const(g, xd.input[1]), _const(g, xd.input[2]) if len(xd.input) > 2 else None
        ws = _const(g, wd.input[1])
        if xs is None or ws is None:
            continue
        attrs = node_attrs(node)
        w = wq.astype(np.int64)
        if kernel is Kernel.GEMM and w.ndim != 2:
            continue  # a batched weight: not the GEMM kernel
        if gemm_transposed(node.op_type, attrs):
            w = w.T
        out.append(
            PairLayer(
                node.name,
                node.op_type,
                xd.input[0],
                float(xs.reshape(-1)[0]),
                int(xz.reshape(-1)[0]) if xz is not None else 0,
                EIGHT_BIT[x_type],
                w,
                ws.astype(np.float64).reshape(-1),
                attrs,
            )
        )
    return out


def worst_case(layers: Iterable[PairLayer]) -> dict[str, tuple[int, int]]:
    """Layer -> (output channels at risk with any code on the grid, output channels)."""
    out = {}
    for lp in layers:
        lo, hi = (-128, 127) if lp.signed else (0, 255)
        risk = overflow.channels_at_risk(lp.w_codes, lo=lo, hi=hi, group=lp.group, signed=lp.signed)
        out[lp.name] = (int(risk.sum()), int(risk.size))
    return out


def measure(
    layers: Iterable[PairLayer], codes: Mapping[str, np.ndarray]
) -> dict[str, overflow.Saturation]:
    """The emulation on one batch of activation codes (tensor name -> integer array)."""
    out = {}
    for lp in layers:
        x = codes[lp.codes].astype(np.int64)
        if handler(lp.op_type).pair_sums is Kernel.CONV:
            geo = conv_geometry(lp.attrs, lp.w_codes.shape, x.shape)
            out[lp.name] = overflow.conv_saturation(
                x, lp.x_zero_point, lp.w_codes, lp.w_scale, lp.x_scale, signed=lp.signed, **geo
            )
        else:
            out[lp.name] = overflow.matmul_saturation(
                x, lp.x_zero_point, lp.w_codes, lp.w_scale, lp.x_scale, signed=lp.signed
            )
    return out
