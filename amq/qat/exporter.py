"""``amq.qat.export``: a trained torch model back to a QDQ ONNX model with the trained scales.

The float ONNX model of the handoff (``model.float.onnx``: BN folded, as amq quantized it) gets
the trained values (from the converted model's parameters, or from the user's prepared model
through the name mapping of ``prepare``, BatchNormalization folded again as amq folds it), the
plan gets the fake-quant modules' scales and zero points (biases re-derived: int32 at
s_input * s_weight), and amq's own QDQ emitter writes the model. So ``amq eval``, ``amq compare``
and onnxruntime read it like any ``amq quantize`` output.

This module imports torch: it is loaded only through amq.qat (lazily).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from amq import report
from amq.errors import ModelError
from amq.graph.model import Graph
from amq.plan import QuantPlan
from amq.qat.convert import OnnxModule, grid_key
from amq.qat.fakequant import FakeQuantize
from amq.quant import qmath
from amq.quant.qdq import emit_qdq
from amq.quant.qparams import final_weight_scale


def _set(model: onnx.ModelProto, name: str, value: np.ndarray) -> bool:
    for t in model.graph.initializer:
        if t.name == name:
            old = numpy_helper.to_array(t)
            if tuple(old.shape) != tuple(value.shape):
                raise ModelError(
                    f"export: '{name}' has shape {list(value.shape)} in torch, {list(old.shape)} in ONNX"
                )
            t.CopyFrom(numpy_helper.from_array(value.astype(old.dtype), name))
            return True
    return False


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def refreshed_plan(
    plan: QuantPlan,
    model: onnx.ModelProto,
    act: dict[str, tuple[np.ndarray, np.ndarray]],
    weights: dict[str, np.ndarray | None],
) -> QuantPlan:
    """A copy of ``plan`` with trained activation qparams (per tensor name), weight scales (None:
    max|w| / qmax of the weight in ``model``, as amq computes it) and biases re-derived the way
    amq's planner does (weight scales widened where a bias would overflow int32)."""
    new = QuantPlan.from_dict(plan.to_dict())
    g = Graph(model)
    for t, (s, z) in act.items():
        tp = new.tensors.get(t)
        if tp is None or tp.role != "activation":
            continue
        s0, z0 = float(np.float32(s.reshape(-1)[0])), int(z.reshape(-1)[0])
        gr = qmath.grid(tp.bits, tp.signed, tp.narrow)
        tp.scale, tp.zero_point = [s0], [z0]
        tp.range = (float((gr.qmin - z0) * s0), float((gr.qmax - z0) * s0))
        tp.method = f"qat ({tp.method})" if not tp.method.startswith("qat") else tp.method
    for name, given in weights.items():
        tp = new.tensors.get(name)
        if tp is None or name not in g.initializers:
            continue
        w = g.array(name)
        if given is None:
            scale, _ = qmath.weight_qparams(w, tp.bits, tp.axis)
        else:
            scale = np.asarray(given, dtype=np.float32)
            scale = scale if tp.axis is not None else scale.reshape(-1)[:1].reshape(())
        # the overflow guard and the int32 bias limit hold for trained weights too
        tp.clip, tp.rounding = [], ""  # the trained weights, rounded to nearest
        tp.scale = final_weight_scale(new, tp, w, scale, g.array)
        tp.zero_point = [0] * len(tp.scale)
        tp.method = "absmax" if given is None else "qat"
    for lp in new.layers.values():
        if not lp.quantized or lp.bias is None or lp.bias not in new.tensors:
            continue
        x, wt, bt = (
            new.tensors.get(lp.act_inputs[0]),
            new.tensors.get(lp.weight),
            new.tensors[lp.bias],
        )
        if x is None or wt is None:
            continue
        _, bscale, _ = qmath.bias_qparams(
            g.array(lp.bias), x.scale[0], np.asarray(wt.scale, dtype=np.float32)
        )
        bt.correction = []  # the torch bias started corrected (qat.convert)
        vals = bscale.reshape(-1)
        bt.scale = [float(v) for v in (vals if bt.axis is not None else vals[:1])]
        bt.zero_point = [0] * len(bt.scale)
    return new


def _weight_scale(fq: FakeQuantize) -> np.ndarray | None:
    """None where the scale follows the weights (recomputed from the exported weight)."""
    if not fq.learnable and fq.averaging_constant >= 1.0:
        return None
    return fq.qparams()[0]


def from_converted(module: OnnxModule) -> tuple[onnx.ModelProto, QuantPlan]:
    if module.plan is None:
        raise ModelError("export: the torch model has no quantization plan (built without one)")
    m = onnx.ModelProto()
    m.CopyFrom(module.onnx_model)
    floats = {t.name for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    for name in module.keys:
        if name in floats:
            _set(m, name, _np(module.parameter(name)).astype(np.float32))
    act = {t: module.act_quant[k].qparams() for t, k in module._akeys.items()}
    weights = {t: _weight_scale(module.weight_quant[k]) for t, k in module._wkeys.items()}
    return m, refreshed_plan(module.plan, m, act, weights)


def from_prepared(model: torch.nn.Module) -> tuple[onnx.ModelProto, QuantPlan]:
    st = model._amq_qat
    h = st.handoff
    m = onnx.ModelProto()
    m.CopyFrom(h.float_model)
    values = {name: _np(ref.value()).astype(np.float64) for name, ref in st.values.items()}
    folded_from: set[str] = set()
    for f in h.folds:
        folded_from.update([f["weight"], *([f["bias"]] if f["bias"] else []), *f["bn_inputs"]])
        if f["weight"] not in values:
            continue  # the folded weight keeps its handoff value (reported by prepare)
        w = values[f["weight"]]
        c = len(f["k"])
        b = values.get(f["bias"]) if f["bias"] else None
        if b is None:
            b = np.asarray(f["bias_value"]) if f["bias_value"] is not None else np.zeros(c)
        stored = dict(zip(("gamma", "beta", "mean", "var"), f["bn_inputs"], strict=True))
        gamma, beta, mean, var = (
            values[n] if n in values else np.asarray(f[k], dtype=np.float64)
            for k, n in stored.items()
        )
        # as amq.graph.patterns.fold_batchnorm computes it
        k = gamma / np.sqrt(var + f["eps"])
        shape = [1] * w.ndim
        shape[f["axis"]] = -1
        beta_g = f["gemm_beta"]
        b_new = (beta_g * b.reshape(-1) - mean) * k + beta
        _set(m, f["folded_weight"], (w * k.reshape(shape)).astype(np.float32))
        _set(m, f["folded_bias"], (b_new / beta_g if beta_g else b_new).astype(np.float32))
    for name, v in values.items():
        if name not in folded_from:
            _set(m, name, v.astype(np.float32))
    act = {t: st.act_quant[k].qparams() for t, k in st.tensor_keys.items()}
    # tensors sharing a mapped group's grid take its values too
    for t, tp in h.plan.tensors.items():
        if tp.role == "activation" and t not in act:
            if grid_key(tp) in st.act_quant:
                act[t] = st.act_quant[grid_key(tp)].qparams()
    weights = {n: _weight_scale(fq) for n, fq in st.weight_quant.items()}
    return m, refreshed_plan(h.plan, m, act, weights)


def export(model: torch.nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` (from ``load_handoff(...).torch_model()`` / ``build_torch_model`` or a model
    prepared with ``prepare``) as a QDQ ONNX model with its trained weights and scales, and the plan
    beside it (``<name>.qparams.json``). Returns the model path."""
    if isinstance(model, OnnxModule):
        fm, plan = from_converted(model)
    elif getattr(model, "_amq_qat", None) is not None:
        fm, plan = from_prepared(model)
    else:
        raise ModelError(
            "export: not an amq QAT model; use amq.qat.load_handoff(DIR).torch_model() or "
            "amq.qat.prepare(model, DIR) first"
        )
    q = emit_qdq(fm, plan)
    out = Path(path)
    report.check_writable(out)
    if q.ByteSize() < 2**31 - 1:
        report.atomic_write(out, q.SerializeToString(deterministic=True))
    else:
        onnx.save(q, str(out), save_as_external_data=True, location=out.name + ".data")
    stem = out.name[: -len(".onnx")] if out.name.endswith(".onnx") else out.name
    report.atomic_write(out.with_name(stem + ".qparams.json"), plan.to_json())
    return out
