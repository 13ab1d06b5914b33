"""``amq.qat.prepare``: the handoff's fake quantization on the user's own nn.Module.

Weights: an ONNX initializer maps to the parameter of the same name (``torch.onnx.export`` names
initializers after the state_dict: ``layer1.conv1.weight``), else the ONNX node maps to a module
(``/layer1/conv1/Conv`` -> ``layer1.conv1``; ``/layer1/layer1.0/conv1/Conv`` -> ``layer1.0.conv1``)
whose ``weight`` has the ONNX shape (or its transpose, for MatMul). The weight gets a
parametrization (``torch.nn.utils.parametrize``) that fake-quantizes it as amq quantized it: when
amq folded a BatchNormalization into the layer, as the folded weight w * k with
k = gamma / sqrt(running_var + eps) read live from the BN module (the equivalent per-channel scale
on the unfolded weight is s_folded / |k|).

Activations: each tensor that has a Q/DQ pair in amq's QDQ model gets fake quantization where it
is made: a forward hook on the module of its producing node, a pre-hook on the model for a graph
input, or else pre-hooks on the modules that read it as their first input. What cannot be placed
is reported, never guessed.

This module imports torch: it is loaded only through amq.qat (lazily).
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from amq.errors import ModelError
from amq.plan import LayerPlan
from amq.qat.bundle import Handoff, load_handoff
from amq.qat.convert import grid_key
from amq.qat.fakequant import FakeQuantize
from amq.quant.qdq import _identity_qdq

ACT_MODULE = "amq_act_quant"


@dataclass
class PrepareReport:
    """What ``prepare`` mapped and what it could not."""

    weights: dict[str, str] = field(default_factory=dict)  # ONNX weight -> torch parameter
    batchnorms: dict[str, str] = field(default_factory=dict)  # ONNX BN node -> torch module
    activations: dict[str, str] = field(default_factory=dict)  # ONNX tensor -> where
    unmapped: list[str] = field(default_factory=list)  # one line each
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unmapped

    def to_dict(self) -> dict[str, Any]:
        return {
            "weights": dict(self.weights),
            "batchnorms": dict(self.batchnorms),
            "activations": dict(self.activations),
            "unmapped": list(self.unmapped),
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        lines = [
            f"amq.qat.prepare: {len(self.weights)} weight(s), {len(self.activations)} activation(s) "
            f"fake-quantized, {len(self.batchnorms)} BatchNorm(s) folded live; "
            + (f"{len(self.unmapped)} not mapped:" if self.unmapped else "everything mapped")
        ]
        lines += [f"  not mapped: {u}" for u in self.unmapped]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass
class _Ref:
    """A tensor of the user's model: module attribute, maybe transposed against ONNX."""

    module: nn.Module
    attr: str
    path: str
    transposed: bool = False

    def value(self) -> torch.Tensor:
        if parametrize.is_parametrized(self.module, self.attr):
            t = self.module.parametrizations[self.attr].original
        else:
            t = getattr(self.module, self.attr)
        return t.t() if self.transposed else t


@dataclass
class QatState:
    """Kept on a prepared model (``model._amq_qat``) for ``export``."""

    handoff: Handoff
    report: PrepareReport
    values: dict[str, _Ref]  # ONNX initializer (source graph) -> user tensor
    weight_quant: dict[str, FakeQuantize]  # plan weight (folded name) -> its FakeQuantize
    act_quant: dict[str, FakeQuantize]  # grid key -> FakeQuantize
    tensor_keys: dict[str, str]  # plan activation tensor -> grid key (mapped ones)
    handles: list[Any] = field(default_factory=list)


class _WeightQuant(nn.Module):
    """Parametrization: w -> fake_quant(w * k) / k (k = 1 without a folded BatchNorm)."""

    def __init__(
        self,
        fq: FakeQuantize,
        axis: int,
        bn: nn.Module | None,
        k: np.ndarray | None,
        bias: Callable[[], torch.Tensor | None] | None,
        input_fq: FakeQuantize | None,
    ) -> None:
        super().__init__()
        self.fq = fq
        self.axis = axis
        # references, not submodules (they belong to the user's model / the activation dict)
        self._refs = {"bn": bn, "bias": bias, "input_fq": input_fq}
        if k is not None:
            self.register_buffer("k_handoff", torch.tensor(np.asarray(k, dtype=np.float64)))
        else:
            self.k_handoff = None

    def k(self) -> torch.Tensor | None:
        bn = self._refs["bn"]
        if bn is not None:
            gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
            return (gamma.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)).detach()
        return self.k_handoff

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        input_fq = self._refs["input_fq"]
        bias = self._refs["bias"]() if self._refs["bias"] is not None else None
        s_in = input_fq.current_scale() if input_fq is not None and bias is not None else None
        k = self.k()
        if k is None:
            return self.fq(w, bias, s_in)
        shape = [1] * w.dim()
        shape[self.axis] = -1
        kk = torch.where(k == 0, torch.ones_like(k), k).reshape(shape)
        wf = (w.double() * kk).to(w.dtype)  # amq folds in float64, stores float32
        return (self.fq(wf, bias, s_in).double() / kk).to(w.dtype)


# ---------------------------------------------------------------------------------------------
# name resolution


def _components(node_name: str) -> list[str] | None:
    """'/layer1/conv1/Conv' -> ['layer1', 'conv1'] (the last part names the op)."""
    if not node_name.startswith("/"):
        return None
    parts = [p for p in node_name.split("/") if p]
    return parts[:-1] if len(parts) > 1 else None


def _resolve(node_name: str, modules: dict[str, nn.Module]) -> tuple[str | None, bool]:
    """(module path or None, whether a ``_N`` call suffix was stripped: a module called again)."""
    comps = _components(node_name)
    if not comps:
        return None, False
    path = ""
    stripped = False
    for i, comp in enumerate(comps):
        found = None
        cands = [comp]
        m = re.fullmatch(r"(.+)_(\d+)", comp)
        if m and i == len(comps) - 1:
            cands.append(m.group(1))
        for j, c in enumerate(cands):
            nested = f"{path}.{c}" if path else c
            if nested in modules:
                found = nested
            elif c in modules and (not path or c.startswith(path + ".")):
                found = c  # the exporter repeats the full path: /layer1/layer1.0/conv1
            if found:
                stripped = stripped or j > 0
                break
        if not found:
            return None, False
        path = found
    return path, stripped


def _param_owner(name: str, modules: dict[str, nn.Module]) -> tuple[nn.Module, str, str] | None:
    path, _, attr = name.rpartition(".")
    mod = modules.get(path)
    if mod is None:
        return None
    if attr in dict(mod.named_parameters(recurse=False)) or attr in dict(
        mod.named_buffers(recurse=False)
    ):
        return mod, attr, path
    if parametrize.is_parametrized(mod, attr):
        return mod, attr, path
    return None


def _shape_ref(ref: _Ref, onnx_shape: list[int]) -> _Ref | None:
    t = ref.value()
    if list(t.shape) == list(onnx_shape):
        return ref
    if t.dim() == 2 and list(t.shape) == list(reversed(onnx_shape)):
        return _Ref(ref.module, ref.attr, ref.path, transposed=True)
    return None


def _is_bn(m: nn.Module | None) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


# ---------------------------------------------------------------------------------------------
# prepare


def prepare(
    model: nn.Module,
    handoff: str | os.PathLike[str] | Handoff,
    *,
    act_averaging_constant: float = 0.0,
    weight_averaging_constant: float = 1.0,
    learnable_scales: bool = False,
    strict: bool = False,
) -> PrepareReport:
    """Attach amq's fake quantization from ``handoff`` (a bundle folder or ``load_handoff``) to
    ``model`` in place; returns what was mapped and what was not (``strict``: an error then)."""
    if getattr(model, "_amq_qat", None) is not None:
        raise ModelError("amq.qat.prepare: this model is prepared already")
    m = _Mapper(model, load_handoff(handoff))
    plan = m.h.plan
    # activations first: a weight's bias fit reads its layer's input scale
    for t, tp in plan.tensors.items():
        if tp.role == "activation" and not _identity_qdq(tp):
            fq = m.act_quant.get(grid_key(tp)) or FakeQuantize.from_plan(
                tp, averaging_constant=act_averaging_constant, learnable=learnable_scales
            )
            m.map_activation(t, fq)
    weight_quant: dict[str, FakeQuantize] = {}
    folds = {f["into"]: f for f in m.h.folds}
    for lp in plan.layers.values():
        if not lp.quantized or lp.weight is None or lp.weight not in plan.tensors:
            continue
        fq = FakeQuantize.from_plan(
            plan.tensors[lp.weight],
            averaging_constant=weight_averaging_constant,
            learnable=learnable_scales,
        )
        if m.map_weight(lp, folds.get(lp.name), fq):
            weight_quant[lp.weight] = fq
    rep = m.rep
    model.add_module(ACT_MODULE, nn.ModuleDict({_safe(k): v for k, v in m.act_quant.items()}))
    model._amq_qat = QatState(
        m.h, rep, m.values, weight_quant, m.act_quant, m.tensor_keys, m.handles
    )
    if strict and rep.unmapped:
        raise ModelError(
            f"amq.qat.prepare: {len(rep.unmapped)} item(s) not mapped; first: {rep.unmapped[0]}"
        )
    return rep


class _Mapper:
    """One ``prepare``: the handoff's graph (producers, readers, initializer shapes) against the
    model's modules, and what has been mapped so far (``values``: ONNX initializer -> user
    tensor; the activation FakeQuantizes by grid key; the hooks)."""

    def __init__(self, model: nn.Module, h: Handoff) -> None:
        self.model, self.h = model, h
        graph = h.graph
        nodes = {n["name"]: n for n in graph.get("nodes", [])}
        self.inputs: list[str] = graph.get("inputs", [])
        self.producer = {o: n for n in nodes.values() for o in n["outputs"] if o}
        self.consumers: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for n in nodes.values():
            for i in n["inputs"]:
                if i:
                    self.consumers[i].append(n)
        self.init_shapes: dict[str, list[int]] = graph.get("initializers", {})
        self.modules = dict(model.named_modules())
        self.rep = PrepareReport()
        # modules reached from more than one node (a module called twice): output hooks ambiguous
        self.calls: dict[str, list[str]] = defaultdict(list)
        for name in nodes:
            path, _ = _resolve(name, self.modules)
            if path is not None:
                self.calls[path].append(name)
        self.values: dict[str, _Ref] = {}
        for name, shape in self.init_shapes.items():
            owner = _param_owner(name, self.modules)
            if owner is not None:
                ref = _shape_ref(_Ref(owner[0], owner[1], owner[2]), shape)
                if ref is not None:
                    self.values[name] = ref
        self.act_quant: dict[str, FakeQuantize] = {}
        self.tensor_keys: dict[str, str] = {}  # plan activation tensor -> grid key
        self.handles: list[Any] = []

    def node_ref(self, node: str, attr: str, shape: list[int]) -> _Ref | None:
        path, _ = _resolve(node, self.modules)
        mod = self.modules.get(path) if path is not None else None
        if mod is None or not isinstance(getattr(mod, attr, None), torch.Tensor):
            return None
        return _shape_ref(_Ref(mod, attr, path), shape)

    def map_activation(self, t: str, fq: FakeQuantize) -> None:
        where, attached, complete = self._attach_activation(t, fq)
        if attached:
            key = grid_key(self.h.plan.tensors[t])
            self.act_quant[key] = fq
            self.tensor_keys[t] = key
            self.rep.activations[t] = where
        if not complete:
            self.rep.unmapped.append(f"activation '{t}': {where}")

    def map_weight(self, lp: LayerPlan, fold: dict[str, Any] | None, fq: FakeQuantize) -> bool:
        """Parametrize the user's tensor of ``lp``'s weight (unfolded when amq folded a BN into
        it: ``fold``) with ``fq``; False (and a line in the report) when there is none."""
        plan = self.h.plan
        fold = fold if fold is not None and fold.get("folded_weight") == lp.weight else None
        orig = fold["weight"] if fold else lp.weight
        ref = self._weight_ref(lp, orig)  # type: ignore[arg-type]
        if ref is None:
            return False
        self.values[orig] = ref  # type: ignore[index]
        tp = plan.tensors[lp.weight]  # type: ignore[index]
        t_axis = tp.axis if tp.axis is None or not ref.transposed else 1 - tp.axis
        fq.axis = t_axis if fq.axis is not None else None
        # the layer's bias (folded when BN was folded) and input scale: amq widens a weight scale
        # where the bias would overflow int32 at s_input * s_weight
        bias_ref = self._bias_ref(lp, fold)
        in_key = self.tensor_keys.get(lp.act_inputs[0]) if lp.act_inputs else None
        if in_key is None and lp.act_inputs and lp.act_inputs[0] in plan.tensors:
            in_key = grid_key(plan.tensors[lp.act_inputs[0]])
        input_fq = self.act_quant.get(in_key) if in_key else None
        bn_mod, k, k_axis = self._folded_bn(fold, ref, orig, t_axis)  # type: ignore[arg-type]
        bias_fn = _bias_fn(fold, bias_ref, bn_mod) if lp.bias in plan.tensors else None
        wq = _WeightQuant(fq, k_axis, bn_mod, k, bias_fn, input_fq)
        parametrize.register_parametrization(ref.module, ref.attr, wq)
        transposed = " (transposed)" if ref.transposed else ""
        self.rep.weights[orig] = f"{ref.path}.{ref.attr}{transposed}"  # type: ignore[index]
        return True

    def _weight_ref(self, lp: LayerPlan, orig: str) -> _Ref | None:
        shape = self.init_shapes.get(orig)
        if shape is None:
            self.rep.unmapped.append(
                f"weight '{orig}' of {lp.name}: not an initializer of the source graph"
            )
            return None
        ref = self.values.get(orig) or self.node_ref(lp.name, "weight", shape)
        if ref is None:
            path, _ = _resolve(lp.name, self.modules)
            self.rep.unmapped.append(
                f"weight '{orig}' of {lp.name} ({lp.op_type}): no parameter named '{orig}' "
                + (
                    f"and module '{path}' has no weight of shape {shape}"
                    if path
                    else "and no module for the node"
                )
                + "; it trains unquantized and export keeps its handoff values"
            )
            return None
        if parametrize.is_parametrized(ref.module, ref.attr):
            self.rep.unmapped.append(
                f"weight '{orig}' of {lp.name}: '{ref.path}.{ref.attr}' is shared with another layer"
            )
            return None
        return ref

    def _bias_ref(self, lp: LayerPlan, fold: dict[str, Any] | None) -> _Ref | None:
        bname = fold["bias"] if fold else lp.bias
        if lp.bias is None or lp.bias not in self.h.plan.tensors or bname is None:
            return None
        ref = self.values.get(bname) or self.node_ref(
            lp.name, "bias", self.init_shapes.get(bname, [])
        )
        if ref is not None:
            self.values[bname] = ref
        return ref

    def _folded_bn(
        self, fold: dict[str, Any] | None, ref: _Ref, orig: str, t_axis: int | None
    ) -> tuple[nn.Module | None, np.ndarray | None, int]:
        """(the BN module amq folded into the layer, else k from the handoff, the axis of k)."""
        if not fold:
            return None, None, t_axis if t_axis is not None else 0
        k_axis = fold["axis"] if not ref.transposed else 1 - fold["axis"]
        bn_mod = _find_bn(fold, self.modules)
        if bn_mod is None:
            self.rep.notes.append(
                f"BatchNormalization {fold['bn']}: no module found; {orig} uses k from the handoff (frozen)"
            )
            return None, np.asarray(fold["k"]), k_axis
        path = next(p for p, m in self.modules.items() if m is bn_mod)
        self.rep.batchnorms[fold["bn"]] = path
        for onnx_name, attr in zip(
            fold["bn_inputs"], ("weight", "bias", "running_mean", "running_var"), strict=True
        ):
            if isinstance(getattr(bn_mod, attr, None), torch.Tensor):
                self.values.setdefault(onnx_name, _Ref(bn_mod, attr, path))
        return bn_mod, None, k_axis

    def _attach_activation(self, t: str, fq: FakeQuantize) -> tuple[str, bool, bool]:
        """Hook fake quantization of tensor ``t``: (where or why not, attached, for every
        reader)."""
        if t in self.inputs:
            idx = self.inputs.index(t)

            def pre(mod, args, kwargs):
                if len(args) > idx:
                    args = (*args[:idx], fq(args[idx]), *args[idx + 1 :])
                elif t in kwargs:
                    kwargs = {**kwargs, t: fq(kwargs[t])}
                return args, kwargs

            self.handles.append(self.model.register_forward_pre_hook(pre, with_kwargs=True))
            return f"model input {idx} ('{t}')", True, True
        p = self.producer.get(t)
        why = "no module produces it"
        if p is not None:
            path, _ = _resolve(p["name"], self.modules)
            if path is not None and path != "" and len(self.calls.get(path, [])) == 1:
                out_idx = p["outputs"].index(t)

                def post(mod, args, out):
                    if torch.is_tensor(out):
                        return fq(out) if out_idx == 0 else out
                    if isinstance(out, tuple) and len(out) > out_idx:
                        return (*out[:out_idx], fq(out[out_idx]), *out[out_idx + 1 :])
                    return out

                self.handles.append(self.modules[path].register_forward_hook(post))
                return f"{path} output", True, True
            if path is not None and len(self.calls.get(path, [])) > 1:
                why = (
                    f"module '{path}' runs for {len(self.calls[path])} nodes ({', '.join(self.calls[path][:3])}); "
                    "give each call its own module"
                )
            else:
                why = f"node {p['name']} ({p['op_type']}) has no module (a functional op?)"
        # fall back on the modules reading it as their first input
        hooked, missed = [], []
        for c in self.consumers.get(t, []):
            path, _ = _resolve(c["name"], self.modules)
            if path and c["inputs"] and c["inputs"][0] == t and len(self.calls.get(path, [])) == 1:

                def pre0(mod, args):
                    return (fq(args[0]), *args[1:]) if args else None

                self.handles.append(self.modules[path].register_forward_pre_hook(pre0))
                hooked.append(path)
            else:
                missed.append(c["name"])
        if hooked and not missed:
            return ", ".join(f"{p} input" for p in hooked), True, True
        if hooked:
            return (
                f"{why}; quantized where {', '.join(hooked)} read(s) it, not for {', '.join(missed)}",
                True,
                False,
            )
        return (
            f"{why} and no module reads it as its first input; it stays float in training",
            False,
            False,
        )


def _safe(key: str) -> str:
    return re.sub(r"\W", "_", key).strip("_") or "q"


def _find_bn(fold: dict[str, Any], modules: dict[str, nn.Module]) -> nn.Module | None:
    gamma = fold["bn_inputs"][0]
    path, _, attr = gamma.rpartition(".")
    if attr == "weight" and _is_bn(modules.get(path)):
        return modules[path]
    p, _ = _resolve(fold["bn"], modules)
    return modules[p] if p is not None and _is_bn(modules.get(p)) else None


def _bias_fn(fold, bias_ref: _Ref | None, bn: nn.Module | None):
    """The layer's bias as amq quantizes it (folded with BN: (beta_g * b - mean) * k + beta)."""
    if fold is None:
        return (lambda: bias_ref.value().detach()) if bias_ref is not None else None
    stored_b = np.asarray(
        fold["bias_value"] if fold["bias_value"] is not None else np.zeros(len(fold["k"]))
    )
    stored = {n: np.asarray(fold[n]) for n in ("gamma", "beta", "mean", "var")}
    beta_g, eps = float(fold["gemm_beta"]), float(fold["eps"])

    def fn() -> torch.Tensor:
        dev = bn.running_var.device if bn is not None else None
        if bias_ref is not None:
            b = bias_ref.value().detach().double()
            dev = b.device
        else:
            b = torch.from_numpy(stored_b).to(dev)
        if bn is not None:
            gamma = bn.weight.detach().double() if bn.weight is not None else None
            gamma = gamma if gamma is not None else torch.ones_like(bn.running_var).double()
            beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(gamma)
            mean, var = bn.running_mean.detach().double(), bn.running_var.detach().double()
        else:
            gamma, beta, mean, var = (
                torch.from_numpy(stored[n]).to(dev) for n in ("gamma", "beta", "mean", "var")
            )
        k = gamma / torch.sqrt(var + eps)
        bf = (beta_g * b.to(k.device) - mean) * k + beta
        return (bf / beta_g if beta_g else bf).float()

    return fn
