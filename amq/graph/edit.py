"""Pure graph edits: expose intermediate outputs, build Q/DQ nodes and integer initializers.
No arithmetic on scales here: values arrive already computed."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from amq.runtime import Exposed

ELEM_TYPES = {
    (4, True): TensorProto.INT4,
    (4, False): TensorProto.UINT4,
    (8, True): TensorProto.INT8,
    (8, False): TensorProto.UINT8,
    (16, True): TensorProto.INT16,
    (16, False): TensorProto.UINT16,
    (32, True): TensorProto.INT32,
}
NP_TYPES = {
    TensorProto.INT8: np.int8,
    TensorProto.UINT8: np.uint8,
    TensorProto.INT16: np.int16,
    TensorProto.UINT16: np.uint16,
    TensorProto.INT32: np.int32,
}


def elem_type(bits: int, signed: bool) -> int:
    return ELEM_TYPES[(bits, signed)]


def int_tensor(name: str, values: np.ndarray, etype: int, raw: bool = False) -> TensorProto:
    """An integer initializer of ONNX type ``etype`` (INT4/UINT4 packed two per byte; ``raw``:
    in raw_data, one byte per pair, where onnx's int32_data takes up to two)."""
    values = np.asarray(values)
    if etype in (TensorProto.INT4, TensorProto.UINT4):
        flat = values.astype(np.int64).reshape(-1)
        if raw:
            nib = (flat & 0xF).astype(np.uint8)
            if nib.size % 2:
                nib = np.append(nib, np.uint8(0))
            packed = (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)
            return helper.make_tensor(name, etype, list(values.shape), packed.tobytes(), raw=True)
        return helper.make_tensor(name, etype, list(values.shape), flat.tolist())
    return numpy_helper.from_array(values.astype(NP_TYPES[etype]), name)


def float_tensor(name: str, values: np.ndarray | float) -> TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.float32), name)


def quantize_node(
    name: str, x: str, scale: str, zp: str, y: str, axis: int | None = None
) -> onnx.NodeProto:
    kw = {"axis": axis} if axis is not None else {}
    return helper.make_node("QuantizeLinear", [x, scale, zp], [y], name=name, **kw)


def dequantize_node(
    name: str,
    x: str,
    scale: str,
    zp: str,
    y: str,
    axis: int | None = None,
    block_size: int | None = None,
) -> onnx.NodeProto:
    """A DequantizeLinear: per tensor, per channel on ``axis``, or blocked along ``axis`` (opset
    21: scale and zero point of the input's rank, ``block_size`` values per block)."""
    kw: dict[str, int] = {"axis": axis} if axis is not None else {}
    if block_size is not None:
        kw["block_size"] = block_size
    ins = [x, scale, zp] if zp else [x, scale]  # no zero point: 0
    return helper.make_node("DequantizeLinear", ins, [y], name=name, **kw)


def expose_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of the model whose graph also outputs ``names`` (the types are left to the runtime;
    a session needs no copy: runtime.Exposed)."""
    return Exposed(model, names).proto()


def set_opset(model: onnx.ModelProto, version: int) -> None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = version
            return
    model.opset_import.append(helper.make_opsetid("", version))


def reduce_node(
    g: onnx.GraphProto,
    op: str,
    x: str,
    y: str,
    axes: list[int],
    opset: int,
    keepdims: int = 0,
) -> list[onnx.NodeProto]:
    """A reduction over ``axes``, keepdims=0 unless asked (an input from opset 13 for
    ReduceSum, 18 for the others; an attribute before)."""
    if opset >= (13 if op == "ReduceSum" else 18):
        g.initializer.append(numpy_helper.from_array(np.asarray(axes, np.int64), f"{y}/axes"))
        return [helper.make_node(op, [x, f"{y}/axes"], [y], keepdims=keepdims, name=y)]
    return [helper.make_node(op, [x], [y], axes=axes, keepdims=keepdims, name=y)]
