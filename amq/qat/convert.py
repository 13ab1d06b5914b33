"""ONNX -> torch: an nn.Module that runs an ONNX graph with amq's fake quantization.

amq converts the graph itself instead of using onnx2torch: the ops that amq quantizes and that
typical CNNs use are few (``SUPPORTED``), the fake quantization must sit exactly where amq's QDQ
emitter puts Q/DQ (after each quantized tensor's producer, weights and biases inside the quantized
layers only), and the parameters must keep their ONNX initializer names so the trained values go
back into the ONNX model. An op outside ``SUPPORTED`` is a one-line error naming the node.

The module interprets the graph node by node (no code generation): initializers become parameters
(float) or buffers (integers); each quantized activation group shares one ``FakeQuantize`` (one
scale and zero point, as in the QDQ model); each quantized weight has its own; biases of quantized
Conv/Gemm are rounded to int32 at scale s_input * s_weight.

This module imports torch: it is loaded only through amq.qat (lazily).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

from amq.errors import ModelError
from amq.graph.model import Graph, opset_version
from amq.plan import QuantPlan, TensorPlan
from amq.qat.fakequant import FakeQuantize, fake_quantize_bias
from amq.quant.algorithms.bias_correction import dequantized_weight
from amq.quant.qdq import _identity_qdq

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


# ---------------------------------------------------------------------------------------------
# ops: f(attrs, inputs, opset) -> list of outputs


def _spatial(x: torch.Tensor) -> int:
    return x.dim() - 2


def _pads(
    a: dict[str, Any], x: torch.Tensor, kernel: Sequence[int], strides: Sequence[int], dil
) -> list[int]:
    """ONNX pads [b1, b2, ..., e1, e2, ...] with auto_pad resolved against the input shape."""
    n = len(kernel)
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for i in range(n):
            size = x.shape[2 + i]
            out = -(-size // strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - size, 0)
            small, big = total // 2, total - total // 2
            begin.append(small if auto == "SAME_UPPER" else big)
            end.append(big if auto == "SAME_UPPER" else small)
        return begin + end
    if auto == "VALID":
        return [0] * (2 * n)
    return list(a.get("pads", [0] * (2 * n)))


def _torch_pad(pads: Sequence[int]) -> list[int]:
    """ONNX [b1..bn, e1..en] -> F.pad order (last dim first)."""
    n = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(n)):
        out += [int(pads[i]), int(pads[n + i])]
    return out


def _symmetric(pads: Sequence[int]) -> bool:
    n = len(pads) // 2
    return list(pads[:n]) == list(pads[n:])


def op_conv(a, ins, opset):
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    n = _spatial(x)
    kernel = list(a.get("kernel_shape", w.shape[2:]))
    strides = list(a.get("strides", [1] * n))
    dil = list(a.get("dilations", [1] * n))
    pads = _pads(a, x, kernel, strides, dil)
    if not _symmetric(pads):
        x = F.pad(x, _torch_pad(pads))
        pads = [0] * (2 * n)
    fn = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    return [fn(x, w, b, strides, pads[:n], dil, int(a.get("group", 1)))]


def op_conv_transpose(a, ins, opset):
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    n = _spatial(x)
    if "output_shape" in a:
        raise NotImplementedError("ConvTranspose with output_shape")
    auto = a.get("auto_pad", b"NOTSET")
    if (auto.decode() if isinstance(auto, bytes) else str(auto)) not in ("NOTSET", "VALID"):
        raise NotImplementedError("ConvTranspose with auto_pad SAME_*")
    strides = list(a.get("strides", [1] * n))
    dil = list(a.get("dilations", [1] * n))
    pads = list(a.get("pads", [0] * (2 * n)))
    out_pad = list(a.get("output_padding", [0] * n))
    group = int(a.get("group", 1))
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]
    y = fn(x, w, b, strides, 0, out_pad, group, dil)
    # crop the pads (ONNX allows begin != end)
    index = [slice(None), slice(None)]
    for i in range(n):
        size = y.shape[2 + i]
        index.append(slice(pads[i], size - pads[n + i]))
    return [y[tuple(index)]]


def op_gemm(a, ins, opset):
    A, B = ins[0], ins[1]
    C = ins[2] if len(ins) > 2 else None
    if a.get("transA", 0):
        A = A.t()
    if a.get("transB", 0):
        B = B.t()
    y = torch.matmul(A, B)
    alpha = float(a.get("alpha", 1.0))
    if alpha != 1.0:
        y = y * alpha
    if C is not None:
        beta = float(a.get("beta", 1.0))
        y = y + (C * beta if beta != 1.0 else C)
    return [y]


def op_matmul(a, ins, opset):
    return [torch.matmul(ins[0], ins[1])]


def op_add(a, ins, opset):
    return [ins[0] + ins[1]]


def op_sub(a, ins, opset):
    return [ins[0] - ins[1]]


def op_mul(a, ins, opset):
    return [ins[0] * ins[1]]


def op_div(a, ins, opset):
    x, y = ins
    if not x.is_floating_point():
        return [torch.div(x, y, rounding_mode="trunc")]
    return [x / y]


def op_relu(a, ins, opset):
    return [F.relu(ins[0])]


def op_sigmoid(a, ins, opset):
    return [torch.sigmoid(ins[0])]


def op_clip(a, ins, opset):
    x = ins[0]
    if opset < 11:
        lo, hi = a.get("min"), a.get("max")
    else:
        lo = ins[1] if len(ins) > 1 else None
        hi = ins[2] if len(ins) > 2 else None
    if lo is not None:
        x = torch.clamp(x, min=lo if not torch.is_tensor(lo) else lo.reshape(()).to(x.dtype))
    if hi is not None:
        x = torch.clamp(x, max=hi if not torch.is_tensor(hi) else hi.reshape(()).to(x.dtype))
    return [x]


def op_softmax(a, ins, opset):
    x = ins[0]
    if opset >= 13:
        return [torch.softmax(x, dim=int(a.get("axis", -1)))]
    axis = int(a.get("axis", 1))
    axis = axis + x.dim() if axis < 0 else axis
    lead = int(math.prod(x.shape[:axis]))
    return [torch.softmax(x.reshape(lead, -1), dim=1).reshape(x.shape)]


def _pool_params(a, x):
    n = _spatial(x)
    kernel = list(a["kernel_shape"])
    strides = list(a.get("strides", [1] * n))
    dil = list(a.get("dilations", [1] * n))
    pads = _pads(a, x, kernel, strides, dil)
    return n, kernel, strides, dil, pads, bool(a.get("ceil_mode", 0))


def op_maxpool(a, ins, opset):
    x = ins[0]
    n, kernel, strides, dil, pads, ceil = _pool_params(a, x)
    if any(pads):
        x = F.pad(x, _torch_pad(pads), value=-math.inf)
    fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
    return [fn(x, kernel, strides, 0, dil, ceil_mode=ceil)]


def op_avgpool(a, ins, opset):
    x = ins[0]
    n, kernel, strides, dil, pads, ceil = _pool_params(a, x)
    if any(d != 1 for d in dil):
        raise NotImplementedError("AveragePool with dilations")
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
    if not any(pads):
        return [fn(x, kernel, strides, 0, ceil_mode=ceil)]
    tp = _torch_pad(pads)
    y = fn(F.pad(x, tp), kernel, strides, 0, ceil_mode=ceil)
    if int(a.get("count_include_pad", 0)):
        return [y]
    ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    return [y / fn(F.pad(ones, tp), kernel, strides, 0, ceil_mode=ceil)]


def op_global_avgpool(a, ins, opset):
    x = ins[0]
    return [x.mean(dim=tuple(range(2, x.dim())), keepdim=True)]


def op_global_maxpool(a, ins, opset):
    x = ins[0]
    return [x.amax(dim=tuple(range(2, x.dim())), keepdim=True)]


def op_flatten(a, ins, opset):
    x = ins[0]
    axis = int(a.get("axis", 1))
    axis = axis + x.dim() if axis < 0 else axis
    return [x.reshape(int(math.prod(x.shape[:axis])), -1)]


def op_reshape(a, ins, opset):
    x, shape = ins[0], [int(v) for v in ins[1].reshape(-1).tolist()]
    if not int(a.get("allowzero", 0)):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return [x.reshape(shape)]


def op_transpose(a, ins, opset):
    x = ins[0]
    perm = a.get("perm", list(reversed(range(x.dim()))))
    return [x.permute(*perm)]


def op_concat(a, ins, opset):
    return [torch.cat([t for t in ins if t is not None], dim=int(a["axis"]))]


def op_identity(a, ins, opset):
    return [ins[0]]


def op_batchnorm(a, ins, opset):
    x, gamma, beta, mean, var = ins[:5]
    return [F.batch_norm(x, mean, var, gamma, beta, False, 0.0, float(a.get("epsilon", 1e-5)))]


OPS: dict[str, Callable[[dict[str, Any], list[Any], int], list[torch.Tensor]]] = {
    "Conv": op_conv,
    "ConvTranspose": op_conv_transpose,
    "Gemm": op_gemm,
    "MatMul": op_matmul,
    "Add": op_add,
    "Sub": op_sub,
    "Mul": op_mul,
    "Div": op_div,
    "Relu": op_relu,
    "Clip": op_clip,
    "Sigmoid": op_sigmoid,
    "Softmax": op_softmax,
    "MaxPool": op_maxpool,
    "AveragePool": op_avgpool,
    "GlobalAveragePool": op_global_avgpool,
    "GlobalMaxPool": op_global_maxpool,
    "Flatten": op_flatten,
    "Reshape": op_reshape,
    "Transpose": op_transpose,
    "Concat": op_concat,
    "Identity": op_identity,
    "BatchNormalization": op_batchnorm,
}
SUPPORTED = tuple(sorted(OPS))


def check_supported(model: onnx.ModelProto) -> None:
    """A one-line ModelError naming the first node the converter cannot run."""
    for n in model.graph.node:
        why = None
        if n.op_type not in OPS or n.domain not in ("", "ai.onnx"):
            why = "op not supported by amq's ONNX-to-torch converter"
        elif n.op_type == "MaxPool" and len(n.output) > 1 and n.output[1]:
            why = "MaxPool with an Indices output is not supported"
        elif n.op_type == "BatchNormalization" and len(n.output) > 1 and any(n.output[1:]):
            why = "training-mode BatchNormalization is not supported"
        if why:
            raise ModelError(
                f"node '{n.name}' ({n.op_type}): {why} (supported: {', '.join(SUPPORTED)})"
            )


# ---------------------------------------------------------------------------------------------
# the module


def _key(name: str, taken: set[str]) -> str:
    k = re.sub(r"\W", "_", name).strip("_") or "t"
    if k[0].isdigit():
        k = "t_" + k
    base, i = k, 1
    while k in taken:
        k = f"{base}_{i}"
        i += 1
    taken.add(k)
    return k


def grid_key(tp: TensorPlan) -> str:
    """Tensors sharing one Q/DQ scale in the QDQ model share one FakeQuantize."""
    return f"{tp.root or tp.name}@{tp.bits}{'s' if tp.signed else 'u'}"


class _Node:
    __slots__ = ("name", "op_type", "inputs", "outputs", "attrs", "fn")

    def __init__(self, n: onnx.NodeProto) -> None:
        self.name = n.name
        self.op_type = n.op_type
        self.inputs = list(n.input)
        self.outputs = list(n.output)
        self.attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        self.fn = OPS[n.op_type]


class OnnxModule(nn.Module):
    """An ONNX graph as an nn.Module, with amq's fake quantization when a plan is given.

    ``module.parameter(onnx_name)`` returns the parameter of an initializer; ``weight_quant``
    holds one FakeQuantize per quantized weight (keyed like the initializer), ``act_quant`` one per
    activation grid (``<root tensor>@<bits><s|u>``); ``set_quantization(False)`` runs float."""

    def __init__(
        self,
        model: onnx.ModelProto,
        plan: QuantPlan | None = None,
        *,
        act_averaging_constant: float = 0.0,
        weight_averaging_constant: float = 1.0,
        learnable_scales: bool = False,
    ) -> None:
        super().__init__()
        check_supported(model)
        g = Graph(model)
        self.opset = opset_version(model)
        self.onnx_model = model  # the float graph this module mirrors (export writes into it)
        self.plan = plan
        self.input_names = [v.name for v in g.inputs]
        self.output_names = list(g.output_names)
        self._nodes = [_Node(n) for n in g.nodes]
        self.initializers = nn.Module()
        self.keys: dict[str, str] = {}
        taken: set[str] = set()
        for name, t in g.initializers.items():
            key = _key(name, taken)
            self.keys[name] = key
            value = torch.from_numpy(np.array(numpy_helper.to_array(t)))
            tp = plan.tensors.get(name) if plan is not None else None
            if tp is not None and tp.correction:  # a corrected bias (bias_correction.py)
                value = value + torch.tensor(tp.correction, dtype=value.dtype).reshape(value.shape)
            if tp is not None and (tp.rounding or tp.clip):
                # learned rounding or clipping: start from the PTQ weight's values on its grid
                # (absmax of a clipped channel is then its searched scale)
                w = dequantized_weight(tp, value.numpy())
                value = torch.from_numpy(w.astype(np.float32))
            if t.data_type in FLOAT_TYPES:
                self.initializers.register_parameter(key, nn.Parameter(value.float()))
            else:
                self.initializers.register_buffer(key, value)
        self.weight_quant = nn.ModuleDict()
        self.act_quant = nn.ModuleDict()
        self._wkeys: dict[str, str] = {}
        self._akeys: dict[str, str] = {}
        self._act: set[str] = set()  # tensors with a Q/DQ pair after their producer
        self._qout: set[str] = set()  # ... that are graph outputs carrying the quantized value
        self._layer_ports: dict[tuple[int, int], tuple[str, str]] = {}
        if plan is not None:
            self._attach(
                g, plan, act_averaging_constant, weight_averaging_constant, learnable_scales
            )

    def _attach(self, g: Graph, plan: QuantPlan, ca: float, cw: float, learnable: bool) -> None:
        taken: set[str] = set()
        for t, tp in plan.tensors.items():
            if tp.role == "weight" and t in g.initializers:
                k = _key(t, taken)
                self._wkeys[t] = k
                self.weight_quant[k] = FakeQuantize.from_plan(
                    tp, averaging_constant=cw, learnable=learnable
                )
        taken = set()
        grid_keys: dict[str, str] = {}
        for t, tp in plan.tensors.items():
            if tp.role != "activation":
                continue
            gk = grid_key(tp)
            if gk not in grid_keys:
                grid_keys[gk] = _key(gk, taken)
                self.act_quant[grid_keys[gk]] = FakeQuantize.from_plan(
                    tp, averaging_constant=ca, learnable=learnable
                )
            self._akeys[t] = grid_keys[gk]
            if not _identity_qdq(tp):
                self._act.add(t)
                if t in self.output_names and (tp.producer is not None or tp.via is not None):
                    self._qout.add(t)
        index = {n.name: i for i, n in enumerate(self._nodes)}
        for lp in plan.layers.values():
            if not lp.quantized or lp.name not in index:
                continue
            i = index[lp.name]
            for j, name in enumerate(self._nodes[i].inputs):
                if not name:
                    continue
                if name == lp.weight and name in self._wkeys:
                    self._layer_ports[(i, j)] = ("weight", lp.name)
                elif name == lp.bias and name in plan.tensors and lp.weight in self._wkeys:
                    if lp.act_inputs and lp.act_inputs[0] in self._akeys:
                        self._layer_ports[(i, j)] = ("bias", lp.name)

    # -- access ----------------------------------------------------------------------------------

    def parameter(self, onnx_name: str) -> torch.Tensor:
        return getattr(self.initializers, self.keys[onnx_name])

    def fake_quant_modules(self) -> list[FakeQuantize]:
        return [m for m in self.modules() if isinstance(m, FakeQuantize)]

    def set_quantization(self, enabled: bool) -> OnnxModule:
        for m in self.fake_quant_modules():
            m.enabled = enabled
        return self

    # -- forward ---------------------------------------------------------------------------------

    def _bind(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
        if len(args) > len(self.input_names):
            raise TypeError(f"expected at most {len(self.input_names)} inputs, got {len(args)}")
        feeds = dict(zip(self.input_names, args, strict=False))
        feeds.update(kwargs)
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise TypeError(f"missing input(s): {', '.join(missing)}")
        return {
            k: v if torch.is_tensor(v) else torch.as_tensor(np.asarray(v)) for k, v in feeds.items()
        }

    def forward(self, *args: Any, **kwargs: Any):
        env: dict[str, torch.Tensor] = {}
        qenv: dict[str, torch.Tensor] = {}

        def produced(name: str, value: torch.Tensor) -> None:
            env[name] = value
            if name in self._act:
                q = self.act_quant[self._akeys[name]](value)
                if name in self._qout:
                    env[name] = q
                else:
                    qenv[name] = q

        for name, value in self._bind(args, kwargs).items():
            produced(name, value)
        for i, node in enumerate(self._nodes):
            ins: list[Any] = []
            for j, name in enumerate(node.inputs):
                if not name:
                    ins.append(None)
                    continue
                port = self._layer_ports.get((i, j))
                if port is not None:
                    ins.append(self._quantized_constant(port, qenv, env))
                elif name in qenv:
                    ins.append(qenv[name])
                elif name in env:
                    ins.append(env[name])
                else:
                    ins.append(self.parameter(name))
            try:
                outs = node.fn(node.attrs, ins, self.opset)
            except NotImplementedError as e:
                raise ModelError(
                    f"node '{node.name}' ({node.op_type}): {e} is not supported"
                ) from None
            for name, value in zip(node.outputs, outs, strict=False):
                if name:
                    produced(name, value)
        outs = tuple(env[n] for n in self.output_names)
        return outs[0] if len(outs) == 1 else outs

    def _quantized_constant(self, port: tuple[str, str], qenv, env) -> torch.Tensor:
        kind, layer = port
        lp = self.plan.layers[layer]
        x = lp.act_inputs[0] if lp.act_inputs else None
        fq_in = self.act_quant[self._akeys[x]] if x in self._akeys else None
        has_bias = lp.bias is not None and lp.bias in self.plan.tensors and fq_in is not None
        if kind == "weight":
            fq = self.weight_quant[self._wkeys[lp.weight]]
            if not has_bias:
                return fq(self.parameter(lp.weight))
            s_in = fq_in.current_scale()
            return fq(self.parameter(lp.weight), self.parameter(lp.bias), s_in)
        # bias: int32 at scale s_input * s_weight (the weight was quantized first)
        s_w = self.weight_quant[self._wkeys[lp.weight]].last_scale
        return fake_quantize_bias(self.parameter(lp.bias), fq_in.current_scale(), s_w)


def build_torch_model(
    model: onnx.ModelProto,
    plan: QuantPlan | None = None,
    *,
    act_averaging_constant: float = 0.0,
    weight_averaging_constant: float = 1.0,
    learnable_scales: bool = False,
) -> OnnxModule:
    """The ONNX graph (amq's prepared float model: BN folded) as a torch module with fake
    quantization from ``plan`` (None: float)."""
    return OnnxModule(
        model,
        plan,
        act_averaging_constant=act_averaging_constant,
        weight_averaging_constant=weight_averaging_constant,
        learnable_scales=learnable_scales,
    )
