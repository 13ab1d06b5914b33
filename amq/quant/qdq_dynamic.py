"""A layer with dynamic activations (LayerPlan.act_dynamic) as onnxruntime runs it fastest on CPU:
the form onnxruntime's quantize_dynamic writes,

    x -> DynamicQuantizeLinear -> (x_q uint8, x_scale, x_zero_point)
    MatMulInteger(x_q, W_q int8 [K, N], x_zero_point, 0) -> Cast(float) -> Mul(x_scale * w_scale)
    (+ Add(bias) for a Gemm with C),

which onnxruntime's graph optimizer fuses into com.microsoft DynamicQuantizeMatMul (measured with
onnxruntime 1.32 on a 6-layer 384 x 1536 stack, bench/w4_dynamic_stack.py: 5-13x the float
model's speed; writing DynamicQuantizeMatMul directly runs the same; DynamicQuantizeLinear ->
DequantizeLinear -> MatMul, a QDQ form, fuses only in part and ran slower than float). With graph
optimizations off the same standard ops run, so the ideal execution needs nothing else. Weights:
symmetric int8 per output channel (a [N] scale and zero point, which MatMulInteger and
DynamicQuantizeMatMul take per column). uint8 weights (u8u8) would avoid the int16 pair sums of
x86 without VNNI but ran 5-7x slower than u8s8 here."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper

from amq.graph import edit
from amq.graph.model import NameScope
from amq.plan import TensorPlan


def dynamic_layer(
    node: onnx.NodeProto,
    tp: TensorPlan,
    q: np.ndarray,
    attrs: Mapping[str, object],
    scope: NameScope,
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The nodes and initializers that replace a MatMul or Gemm ``node`` whose input is quantized
    at run time. ``q``: the weight's int8 codes (as stored in the model, [N, K] for a Gemm with
    transB), ``tp``: its plan (scale per channel on ``tp.axis`` or one). The node's output keeps
    its name."""
    x, wname = node.input[0], node.input[1]
    y = node.output[0]
    gemm = node.op_type == "Gemm"
    if gemm and attrs.get("transB", 0):
        q = q.T
    alpha = float(attrs.get("alpha", 1.0)) if gemm else 1.0  # type: ignore[arg-type]
    scale = np.asarray(tp.scale, dtype=np.float32) * np.float32(alpha)
    per_channel = tp.axis is not None
    n = q.shape[1]
    names = {k: scope.new(f"{wname}_{k}") for k in ("quantized", "scale", "zero_point")}
    inits = [
        edit.int_tensor(names["quantized"], q, TensorProto.INT8),
        edit.float_tensor(names["scale"], scale if per_channel else scale[0]),
        edit.int_tensor(
            names["zero_point"], np.zeros(n if per_channel else (), np.int8), TensorProto.INT8
        ),
    ]
    t = {k: scope.new(f"{y}_{k}") for k in ("x_q", "x_scale", "x_zp", "int", "float", "scale")}
    base = node.name or y
    nodes = [
        helper.make_node(
            "DynamicQuantizeLinear",
            [x],
            [t["x_q"], t["x_scale"], t["x_zp"]],
            name=scope.new(f"{base}_DynamicQuantizeLinear"),
        ),
        helper.make_node(
            "MatMulInteger",
            [t["x_q"], names["quantized"], t["x_zp"], names["zero_point"]],
            [t["int"]],
            name=scope.new(f"{base}_MatMulInteger"),
        ),
        helper.make_node(
            "Cast", [t["int"]], [t["float"]], to=TensorProto.FLOAT, name=scope.new(f"{base}_Cast")
        ),
        helper.make_node(
            "Mul", [t["x_scale"], names["scale"]], [t["scale"]], name=scope.new(f"{base}_Scale")
        ),
    ]
    c = node.input[2] if gemm and len(node.input) > 2 and node.input[2] else None
    out = scope.new(f"{y}_product") if c is not None else y
    nodes.append(
        helper.make_node("Mul", [t["float"], t["scale"]], [out], name=scope.new(f"{base}_Mul"))
    )
    if c is not None:
        beta = float(attrs.get("beta", 1.0))  # type: ignore[arg-type]
        if beta != 1.0:
            bn = scope.new(f"{c}_beta")
            inits.append(edit.float_tensor(bn, np.float32(beta)))
            scaled = scope.new(f"{c}_scaled")
            nodes.append(helper.make_node("Mul", [c, bn], [scaled], name=scope.new(f"{base}_Beta")))
            c = scaled
        nodes.append(helper.make_node("Add", [out, c], [y], name=scope.new(f"{base}_Bias")))
    return nodes, inits
