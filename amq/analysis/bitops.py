"""FLOPs and bitops per layer (DESIGN.md §3): bitops = FLOPs x activation bits x weight bits,
FLOPs counted as 2 x MACs. Float layers count as 32 x 32; the reference is every layer at INT8."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from amq.calib.data import InputSpec, check_sample, open_data
from amq.calib.prepare import DataSource, PathLike, prepare
from amq.calib.workspace import Workspace
from amq.config import Config, load_config
from amq.errors import DataError
from amq.plan import LayerPlan, QuantPlan

FLOAT_BITS = 32


@dataclass(frozen=True)
class LayerBitops:
    name: str
    op_type: str
    flops: int
    params: int
    act_bits: int
    weight_bits: int
    bitops: int


@dataclass(frozen=True)
class BitopsReport:
    layers: list[LayerBitops]
    total: int
    int8_total: int

    @property
    def ratio_to_int8(self) -> float:
        return self.total / self.int8_total if self.int8_total else float("nan")

    @property
    def flops(self) -> int:
        return sum(r.flops for r in self.layers)


def layer_bits(plan: QuantPlan, lp: LayerPlan) -> tuple[int, int]:
    """(activation bits, weight-side bits) that a layer actually computes with: the bits of its
    quantized inputs (32 where float). A layer without constant weights multiplies its first input
    by its second, so the second input's bits take the weight's place."""
    if not lp.quantized:
        return FLOAT_BITS, FLOAT_BITS
    ins = [plan.tensors[t].bits if t in plan.tensors else FLOAT_BITS for t in lp.act_inputs]
    a = ins[0] if ins else FLOAT_BITS
    if lp.weight is not None:
        w = plan.tensors[lp.weight].bits if lp.weight in plan.tensors else FLOAT_BITS
    else:  # two operands: the second's bits; a float constant operand computes at 32
        w = ins[1] if len(ins) > 1 else (FLOAT_BITS if lp.float_operand else a)
    return a, w


def bitops(plan: QuantPlan) -> BitopsReport:
    """Per layer, the layers inside If branches and Loop bodies included (each read against
    its own plan)."""
    rows = []
    total = int8 = 0

    def visit(p: QuantPlan) -> None:
        nonlocal total, int8
        for lp in p.layers.values():
            a, w = layer_bits(p, lp)
            b = lp.flops * a * w
            rows.append(LayerBitops(lp.name, lp.op_type, lp.flops, lp.params, a, w, b))
            total += b
            int8 += lp.flops * 64
        for name, flops in p.float_flops.items():
            op = p.float_ops.get(name, "").split(":")[0] or "float"
            b = flops * FLOAT_BITS * FLOAT_BITS
            rows.append(LayerBitops(name, op, flops, 0, FLOAT_BITS, FLOAT_BITS, b))
            total += b
            int8 += flops * 64
        for sub in p.branches.values():
            visit(sub)

    visit(plan)
    return BitopsReport(rows, total, int8)


def synthetic_feeds(
    specs: list[InputSpec], shapes: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, np.ndarray]:
    """Zero inputs for a probe run: dynamic batch = 1; any other unknown dim must be given."""
    shapes = dict(shapes or {})
    feeds = {}
    for s in specs:
        if s.name in shapes:
            shape = tuple(shapes[s.name])
        elif s.shape is None or any(d is None for d in s.shape[1:]):
            raise DataError(
                f"input '{s.name}' has unknown dims {s.describe()}: give --input-shape {s.name}:1,... or --data DIR"
            )
        else:
            shape = tuple(1 if d is None else d for d in s.shape)
        feeds[s.name] = np.zeros(shape, dtype=s.dtype)
    return feeds


def bitops_of(
    model: PathLike | onnx.ModelProto,
    config: Config | PathLike | None = None,
    data: DataSource | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> tuple[BitopsReport, QuantPlan]:
    """FLOPs (2 x MACs), parameters and bitops per layer for the bits a config asks for."""
    cfg = config if isinstance(config, Config) else load_config(config)
    prep = prepare(model, cfg)
    specs = prep.specs
    if data is not None:
        feeds = check_sample(open_data(data, specs, cfg)[0], specs)
    else:
        shapes = dict(input_shapes or {}) or dict(cfg.data.input_shapes)
        feeds = synthetic_feeds(specs, shapes)
    # a Workspace over this one call, so that the layers inside the If branches it takes (and
    # its Loop bodies) count
    ws = Workspace(prep, cfg, open_data([feeds], specs, cfg), None, False)
    plan = ws.structure(cfg)
    return bitops(plan), plan
