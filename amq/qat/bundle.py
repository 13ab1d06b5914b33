"""The QAT handoff bundle (DESIGN.md §10): what ``amq qat`` writes and ``load_handoff`` reads.

DIR/
  model.amq.yaml     the resolved config (every layer with its effective settings)
  qparams.json       the QuantPlan: per tensor scale, zero_point, bits, grid, axis, role
  model.float.onnx   amq's prepared float model (BN folded, opset as quantized): the graph the
                     torch model mirrors and the one ``export`` writes trained values into
  model.q.onnx       the PTQ QDQ model (the starting point, for comparison)
  qat_model.pt       state_dict of the torch model of model.float.onnx with fake quantization
  handoff.json       BN folds (the per-channel k = gamma / sqrt(var + eps) and the BN values),
                     the source graph's node names (to map a user's nn.Module), parity figures
  README.md          how to train from here

This module imports torch: it is loaded only through amq.qat (lazily). It writes the torch parts
and reads bundles; the ONNX/YAML/JSON files are written by ``amq.api.qat_handoff``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from amq import report, runtime
from amq.analysis.metrics import Fidelity
from amq.errors import ModelError
from amq.graph.model import Graph, constants_to_initializers, load_model, name_nodes
from amq.graph.patterns import fold_batchnorm
from amq.plan import QuantPlan
from amq.qat.convert import SUPPORTED, OnnxModule, build_torch_model
from amq.quant.planner import node_attrs
from amq.quant.registry import bias_channels
from amq.runtime import Execution

HANDOFF_VERSION = 1
FILES = {
    "config": "model.amq.yaml",
    "qparams": "qparams.json",
    "float_model": "model.float.onnx",
    "qdq_model": "model.q.onnx",
    "torch_model": "qat_model.pt",
    "handoff": "handoff.json",
    "readme": "README.md",
}
# torch vs onnxruntime on the QDQ model: Conv/Gemm sum in a different order in the two, so a
# value within ~1e-6 of a rounding boundary can land on the other side (about 1 in 1e5 values);
# that flip moves the outputs by a few steps of the grids after it, and never changes top-1 on
# the bundled example. The bundle is written with these figures; tests hold them.
PARITY_COSINE = 0.9999
PARITY_MAX_ABS_STEPS = 8  # max |diff| <= this many steps of the coarsest activation grid


# ---------------------------------------------------------------------------------------------
# BN folds and the source graph


def _named_source(source: onnx.ModelProto) -> onnx.ModelProto:
    """The source model as amq's prepare sees it before folding (same node names)."""
    m = onnx.ModelProto()
    m.CopyFrom(source)
    constants_to_initializers(m)
    name_nodes(m)
    return m


def fold_records(source: onnx.ModelProto, prepared: onnx.ModelProto) -> list[dict[str, Any]]:
    """One record per BatchNormalization amq folded: which weight/bias became which ``_bnfold``
    initializer, the BN values and k = gamma / sqrt(var + eps) per output channel, so that a user's
    unfolded weight w quantizes exactly as amq's folded weight w * k (scale s_folded / |k|)."""
    named = _named_source(source)
    g = Graph(named)
    folded = onnx.ModelProto()
    folded.CopyFrom(named)
    pg = Graph(prepared)
    out = []
    for f in fold_batchnorm(folded, bias_channels):
        conv, bn = g.node_by_name[f.into], g.node_by_name[f.bn]
        pnode = pg.node_by_name.get(f.into)
        if pnode is None or len(pnode.input) < 3:
            continue
        channels = bias_channels(conv.op_type, node_attrs(conv), g.array(conv.input[1]).shape)
        assert channels is not None  # fold_batchnorm folded into it
        axis, beta_g = channels[0], float(g.attr(conv, "beta", 1.0))
        gamma, beta, mean, var = (g.array(n).astype(np.float64) for n in bn.input[1:5])
        eps = float(g.attr(bn, "epsilon", 1e-5))
        bias = conv.input[2] if len(conv.input) > 2 and conv.input[2] else None
        out.append(
            {
                "bn": f.bn,
                "into": f.into,
                "op_type": conv.op_type,
                "weight": conv.input[1],
                "bias": bias,
                "folded_weight": pnode.input[1],
                "folded_bias": pnode.input[2],
                "axis": axis,
                "gemm_beta": beta_g,
                "eps": eps,
                "bn_inputs": list(bn.input[1:5]),  # gamma, beta, mean, var initializer names
                "gamma": gamma.tolist(),
                "beta": beta.tolist(),
                "mean": mean.tolist(),
                "var": var.tolist(),
                "bias_value": g.array(bias).astype(np.float64).reshape(-1).tolist()
                if bias
                else None,
                "k": (gamma / np.sqrt(var + eps)).tolist(),
            }
        )
    return out


def graph_summary(source: onnx.ModelProto) -> dict[str, Any]:
    """Node names, op types and tensor names of the source graph (before BN folding), with
    initializer shapes: what ``prepare`` needs to find a user's modules and parameters."""
    g = Graph(_named_source(source))
    return {
        "inputs": [v.name for v in g.inputs],
        "outputs": list(g.output_names),
        "initializers": {k: list(v.dims) for k, v in g.initializers.items()},
        "nodes": [
            {
                "name": n.name,
                "op_type": n.op_type,
                "inputs": list(n.input),
                "outputs": list(n.output),
            }
            for n in g.nodes
        ],
    }


# ---------------------------------------------------------------------------------------------
# parity


def _figures(acc: Mapping[str, Fidelity]) -> dict[str, Any]:
    used = {n: a for n, a in acc.items() if a.samples}
    if not used:
        return {"max_abs_diff": None, "cosine": None, "top1_agreement": None, "outputs": {}}
    return {
        "max_abs_diff": max(a.max_abs for a in used.values()),
        "cosine": min(a.cosine for a in used.values()),
        "top1_agreement": min(
            (a.agreement for a in used.values() if a.agreement is not None), default=None
        ),
        "outputs": {
            n: {"max_abs_diff": a.max_abs, "cosine": a.cosine, "top1_agreement": a.agreement}
            for n, a in used.items()
        },
    }


def parity(
    module: OnnxModule, qdq: onnx.ModelProto, feeds: Iterable[Mapping[str, np.ndarray]]
) -> dict[str, Any]:
    """The torch model vs the QDQ model's Q/DQ math (the ideal execution: the same on every
    machine), and, stated apart under ``runtime``, vs this CPU's onnxruntime integer kernels (what
    ``amq eval`` runs; on x86 without VNNI they may saturate where the math does not)."""
    sessions = {
        e: runtime.session_for(qdq, e, "QDQ model") for e in (Execution.IDEAL, Execution.RUNTIME)
    }
    names = [o.name for o in sessions[Execution.IDEAL].get_outputs()]
    acc = {e: {n: Fidelity() for n in names} for e in sessions}
    module.eval()
    seen = 0
    with torch.no_grad():
        for f in feeds:
            got = module(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in f.items()})
            got = got if isinstance(got, tuple) else (got,)
            for e, sess in sessions.items():
                for n, r, t in zip(names, sess.run(names, dict(f)), got, strict=True):
                    r = np.asarray(r)
                    if r.dtype.kind == "f":
                        acc[e][n].update(r, t.detach().cpu().numpy())
            seen += int(next(iter(f.values())).shape[0]) if f else 1
    out = {"samples": seen, **_figures(acc[Execution.IDEAL])}
    out["reference"] = "the QDQ model's Q/DQ math (onnxruntime, graph optimizations off)"
    out["runtime"] = {
        **_figures(acc[Execution.RUNTIME]),
        "isa": runtime.cpu_isa().describe(),
        "reference": "onnxruntime's integer kernels on this CPU (as amq eval runs it)",
    }
    return out


def parity_ok(par: Mapping[str, Any]) -> bool:
    """The parity (against the Q/DQ math) is within its own tolerance."""
    if par.get("max_abs_diff") is None:
        return True
    return par["cosine"] >= par["bound_cosine"] and par["max_abs_diff"] <= par["bound_max_abs_diff"]


def parity_bound(plan: QuantPlan) -> float:
    """The max |diff| the parity figure is held to: a few steps of the coarsest activation grid."""
    scales = [t.scale[0] for t in plan.tensors.values() if t.role == "activation" and t.scale]
    return PARITY_MAX_ABS_STEPS * max(scales, default=0.0)


# ---------------------------------------------------------------------------------------------
# writing


def write_bundle(
    out: Path,
    *,
    source: onnx.ModelProto,
    source_name: str,
    prepared: onnx.ModelProto,
    plan: QuantPlan,
    qdq: onnx.ModelProto,
    parity_feeds: Iterable[Mapping[str, np.ndarray]],
    config_summary: str,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """The torch parts of the bundle: qat_model.pt, handoff.json, README.md. Returns the parity
    figures and the files written."""
    module = build_torch_model(prepared, plan)
    par = parity(module, qdq, parity_feeds)
    par["bound_max_abs_diff"] = parity_bound(plan)
    par["bound_cosine"] = PARITY_COSINE
    files = {}
    pt = out / FILES["torch_model"]
    tmp = out / f".{pt.name}.tmp"
    torch.save(module.state_dict(), tmp)
    os.replace(tmp, pt)
    files["torch_model"] = pt
    folds = fold_records(source, prepared)
    meta = {
        "amq_handoff": HANDOFF_VERSION,
        "source": source_name,
        "files": FILES,
        "inputs": [v.name for v in Graph(prepared).inputs],
        "outputs": list(Graph(prepared).output_names),
        "folds": folds,
        "graph": graph_summary(source),
        "parity": par,
        "defaults": {
            "act_averaging_constant": 0.0,
            "weight_averaging_constant": 1.0,
            "learnable_scales": False,
        },
        "versions": _versions(),
    }
    files["handoff"] = report.atomic_write(out / FILES["handoff"], json.dumps(meta, indent=1))
    files["readme"] = report.atomic_write(
        out / FILES["readme"], readme(plan, meta, config_summary, out)
    )
    return par, files


def _versions() -> dict[str, str]:
    import onnxruntime

    import amq

    return {
        "amq": amq.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def readme(plan: QuantPlan, meta: Mapping[str, Any], config_summary: str, folder: Path) -> str:
    """The bundle's README.md: its files, the parity figures, the quantized layers and how to
    train; ``meta``: the contents of handoff.json (source, inputs, folds, parity)."""
    q = [lp for lp in plan.layers.values() if lp.quantized]
    rows = "\n".join(
        f"| `{lp.name}` | {lp.op_type} | "
        + (f"int{lp.weight_bits}" if lp.weight else "-")
        + f" | {'int' if lp.act_symmetric else 'uint'}{lp.act_bits} |"
        for lp in q
    )
    source, folds = meta["source"], meta["folds"]
    head = f"""# amq QAT handoff for `{source}`

Made by `amq qat` ({config_summary}). amq calibrated the model and wrote a QDQ model; this folder
hands the same scales and zero points to quantization-aware training (QAT) in PyTorch.

| file | content |
| --- | --- |
| `model.amq.yaml` | the resolved config: every layer with its effective settings |
| `qparams.json` | per tensor: scale, zero_point, bits, grid, axis, role (amq's QuantPlan) |
| `model.float.onnx` | amq's prepared float model: BatchNormalization folded ({len(folds)} fold(s)), opset as quantized |
| `model.q.onnx` | the PTQ QDQ model (the starting point; `amq eval model.q.onnx --data DATA`) |
| `qat_model.pt` | state_dict of a torch model of `model.float.onnx` with fake quantization |
| `handoff.json` | BN folds (k = gamma / sqrt(var + eps) per channel), the source graph's names, parity |

"""
    layers = f"""Quantized layers ({len(q)}):

| layer | op | weights | activations |
| --- | --- | --- | --- |
{rows}

Weights: per output channel (or per tensor when the config says so), symmetric, signed narrow
grid, zero point 0. Activations: asymmetric (unsigned grid, zero point) unless the config asks for
symmetric. Biases of quantized Conv/Gemm: int32 at scale s_input * s_weight.

"""
    return head + _readme_parity(meta["parity"]) + layers + _readme_training(meta, folder)


def _readme_parity(par: Mapping[str, Any]) -> str:
    fmt = report.fmt
    return f"""## Parity

The torch model reproduces `model.q.onnx`: on {par.get("samples")} calibration samples its outputs
differ from onnxruntime's by at most **{fmt(par.get("max_abs_diff"))}** (max |diff|), cosine
**{par.get("cosine") or float("nan"):.6f}**, top-1 agreement {fmt(par.get("top1_agreement"))}. Tolerance:
cosine >= {PARITY_COSINE} and max |diff| <= {PARITY_MAX_ABS_STEPS} steps of the coarsest activation
grid ({fmt(par.get("bound_max_abs_diff"))}). The rounding is identical (round half to even, float32
division for activations as onnxruntime does, float64 for weights as amq stores them); what is
left comes from Conv/Gemm summing in a different order in torch and onnxruntime, which moves a
value sitting within ~1e-6 of a rounding boundary to the next level (about 1 value in 1e5).

"""


def _readme_training(meta: Mapping[str, Any], folder: Path) -> str:
    inputs = ", ".join(f"`{n}`" for n in meta["inputs"])
    return f"""## Train the converted model

```python
import torch
import amq.qat

handoff = amq.qat.load_handoff("{os.fspath(folder)}")   # this folder
model = handoff.torch_model()          # fake quantization initialised from qparams.json
opt = torch.optim.Adam(model.parameters(), lr=1e-5)
model.train()
for x, y in loader:                    # inputs as for the ONNX model: {inputs}
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
amq.qat.export(model, "model.qat.onnx")    # a QDQ model: amq eval / amq compare accept it
```

## Or train your own nn.Module

```python
net = MyNet(); net.load_state_dict(torch.load("weights.pt"))
rep = amq.qat.prepare(net, "{os.fspath(folder)}")   # fake quantization on net's weights and activations
print(rep)                              # what it mapped and what it could not
# ... the same training loop on net ...
amq.qat.export(net, "model.qat.onnx")
```

`prepare` maps ONNX initializer names to parameter names (`layer1.conv1.weight`, as
`torch.onnx.export` writes them) and ONNX node names to modules (`/layer1/conv1/Conv` ->
`layer1.conv1`); weights are fake-quantized with a parametrization (`torch.nn.utils.parametrize`),
activations with forward hooks on the module that produces them (or reads them). A weight amq
folded with BatchNormalization is quantized as the folded weight w * k, k = gamma / sqrt(var + eps)
(the per-channel scale on the unfolded weight is s_folded / |k|), with k read live from the BN
module. `export` writes your model's trained values into a copy of `model.float.onnx` (folding BN
again as amq does) and emits the QDQ model with the trained scales. Parameters `prepare` could not
map keep their handoff values in the export.

Scale updates: `scale = (1 - c) * scale + c * current_scale`. Defaults: weights c = 1 (the scale
follows max|w| / qmax), activations c = 0 (frozen at the calibrated value). Change them with
`torch_model(act_averaging_constant=..., weight_averaging_constant=...)` or the same arguments of
`prepare`; `learnable_scales=True` trains the scales instead (LSQ; zero points stay fixed).

## Why amq converts ONNX to torch itself

onnx2torch would add a dependency and still not put fake quantization where amq's QDQ model has
Q/DQ, nor keep initializer names for the way back. amq's converter covers the ops amq quantizes and
typical CNNs use ({", ".join(SUPPORTED)}); any other op stops `amq qat` with an error naming the
node.

Limitations: in the converted model BatchNormalization is already folded, so it trains the folded
weights and biases (there are no BN statistics to update); with `prepare`, BatchNormalization in train mode normalises with batch
statistics while the weight quantization uses the running variance (freeze BN statistics for the
last epochs, or all of them for a short fine-tune); activations produced by functional ops
(`x + y`) are quantized through the module that reads them, or reported as unmapped.
"""


# ---------------------------------------------------------------------------------------------
# reading


@dataclass
class Handoff:
    """A QAT handoff bundle loaded from disk."""

    path: Path
    plan: QuantPlan
    float_model: onnx.ModelProto
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def folds(self) -> list[dict[str, Any]]:
        return list(self.meta.get("folds", []))

    @property
    def graph(self) -> dict[str, Any]:
        return dict(self.meta.get("graph", {}))

    def torch_model(
        self,
        *,
        act_averaging_constant: float = 0.0,
        weight_averaging_constant: float = 1.0,
        learnable_scales: bool = False,
    ) -> OnnxModule:
        """The torch model of the ONNX graph with fake quantization, from qat_model.pt."""
        m = build_torch_model(
            self.float_model,
            self.plan,
            act_averaging_constant=act_averaging_constant,
            weight_averaging_constant=weight_averaging_constant,
            learnable_scales=learnable_scales,
        )
        pt = self.path / FILES["torch_model"]
        if pt.exists():
            state = torch.load(pt, map_location="cpu", weights_only=True)
            m.load_state_dict(state)
        return m


def load_handoff(path: str | os.PathLike[str] | Handoff) -> Handoff:
    if isinstance(path, Handoff):
        return path
    p = Path(path)
    meta_path = p / FILES["handoff"]
    if not meta_path.is_file():
        raise ModelError(
            f"{p}: not an amq QAT handoff folder (no {FILES['handoff']}); make one with amq qat"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        plan = QuantPlan.from_json((p / FILES["qparams"]).read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(
            f"{p}: unreadable QAT handoff ({e}); write it again with amq qat"
        ) from None
    if meta.get("amq_handoff") != HANDOFF_VERSION:
        raise ModelError(
            f"{p}: handoff version {meta.get('amq_handoff')!r} is not {HANDOFF_VERSION}"
        )
    meta["dir"] = str(p)
    return Handoff(p, plan, load_model(p / FILES["float_model"]), meta)
