"""Load and prepare a float model once: constants to initializers, names, BatchNorm and bias folds,
folded constant weights, and a checked opset upgrade (PITFALLS 1)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from amq.calib import runner
from amq.calib.data import Dataset, InputSpec, check_sample, input_specs
from amq.config import (
    Config,
)
from amq.errors import ModelError
from amq.graph import subgraphs
from amq.graph.model import (
    QDQ_OPS,
    Graph,
    constants_to_initializers,
    infer_types,
    load_model,
    name_nodes,
    opset_version,
    upgrade_opset,
)
from amq.graph.patterns import fold_batchnorm, fold_bias_add, fold_constants, fold_scale_mul
from amq.quant.planner import (
    constant_weight_inputs,
)
from amq.quant.registry import bias_add_ops, bias_channels

PathLike = str | os.PathLike[str]


DataSource = PathLike | Iterable[Mapping[str, np.ndarray]]


UPGRADE_TOLERANCE = 1e-4


@dataclass
class Prepared:
    """A float model ready to calibrate: named nodes, constants as initializers, BN folded."""

    model: onnx.ModelProto
    source: str
    notes: list[str] = field(default_factory=list)

    @property
    def graph(self) -> Graph:
        return Graph(self.model)

    @property
    def specs(self) -> list[InputSpec]:
        return input_specs(self.graph)


def prepare(model: PathLike | onnx.ModelProto, cfg: Config) -> Prepared:
    if isinstance(model, onnx.ModelProto):
        proto, source = model, "model"
        proto = copy_model(proto)
    else:
        proto, source = load_model(model), str(model)
    if any(n.op_type in QDQ_OPS for n in proto.graph.node):
        raise ModelError(
            f"{source}: already contains QuantizeLinear/DequantizeLinear; give amq the float model"
        )
    notes = []
    moved = constants_to_initializers(proto)
    weights = constant_weight_inputs(proto)
    if weights:  # weights the graph computes from initializers: folded, so they quantize as such
        fold_constants(proto, _constant_values(proto, weights, source))
        notes.append(
            f"{len(weights)} weight/bias tensor(s) the graph computes from initializers folded "
            "into initializers"
        )
    renamed = name_nodes(proto)
    if renamed:
        notes.append(f"{renamed} unnamed node(s) given generated names (<OpType>_<index>)")
    if moved:
        notes.append(f"{moved} Constant node(s) turned into initializers")
    biases = fold_bias_add(proto, bias_add_ops())
    if biases:
        notes.append(f"{len(biases)} bias Add(s) folded into the preceding Conv")
    if cfg.fold_batchnorm:
        folded = fold_batchnorm(proto, bias_channels)
        if folded:
            notes.append(
                f"{len(folded)} BatchNormalization node(s) folded into the preceding Conv/Gemm"
            )
    scaled = fold_scale_mul(proto, bias_add_ops())
    if scaled:  # a Mul, then often an Add: its bias
        after = fold_bias_add(proto, bias_add_ops())
        notes.append(
            f"{len(scaled)} per-channel Mul(s) and {len(after)} Add(s) after them folded into "
            "the preceding Conv"
        )
    proto = infer_types(proto)
    return Prepared(proto, source, notes)


def _constant_values(
    model: onnx.ModelProto, names: list[str], source: str
) -> dict[str, np.ndarray]:
    """Values the graph computes from initializers alone: one onnxruntime call of the model
    cut down to the nodes that compute them (no inputs needed)."""
    derived = subgraphs.constant_names(model.graph)
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    nodes = [n for n in cut.graph.node if all(o in derived for o in n.output if o)]
    cut.graph.ClearField("node")
    cut.graph.node.extend(nodes)
    cut.graph.ClearField("input")
    cut.graph.ClearField("output")
    cut.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    sess = runner.session(cut, optimize=False, source=f"{source} (its constant weights)")
    return dict(zip(names, sess.run(names, {}), strict=True))


def copy_model(m: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(m)
    return out


def first_feeds(ds: Dataset, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    return check_sample(ds[0], specs)


def upgrade_checked(
    prep: Prepared,
    target: int,
    feeds: dict[str, np.ndarray],
    before: runner.Probe | None = None,
) -> tuple[Prepared, runner.Probe]:
    """Upgrade the opset and verify the upgraded float model gives the same outputs (PITFALLS 1).
    Returns it with its probe. ``before``: the probe of ``prep.model`` on ``feeds``; where both
    probes ran the model (unoptimized), their outputs are compared and no other session is built
    (a transformer: two sessions of the model less)."""
    old = opset_version(prep.model)
    upgraded = upgrade_opset(prep.model, target, prep.source)
    name_nodes(upgraded)
    upgraded = infer_types(upgraded)
    after = runner.probed(upgraded, feeds)
    if before is not None and before.outputs is not None and after.outputs is not None:
        ref, new = before.outputs, after.outputs
    else:
        ref = runner.session(prep.model, source=prep.source).run(None, feeds)
        new = runner.session(upgraded, source=f"{prep.source} (opset {target})").run(None, feeds)
    for r, n in zip(ref, new, strict=True):
        r = np.asarray(r)
        n = np.asarray(n)
        if r.shape != n.shape or (
            r.dtype.kind == "f"
            and np.max(np.abs(r.astype(np.float64) - n), initial=0.0)
            > UPGRADE_TOLERANCE * (1.0 + float(np.max(np.abs(r), initial=0.0)))
        ):
            raise ModelError(
                f"{prep.source}: the opset {old} -> {target} upgrade changed the model's outputs; "
                f"re-export at opset {target} or use per_tensor weights and 8-bit only"
            )
    notes = prep.notes + [f"opset upgraded {old} -> {target} (outputs verified equal)"]
    return Prepared(upgraded, prep.source, notes), after
