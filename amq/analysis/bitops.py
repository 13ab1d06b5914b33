"""FLOPs and bitops per layer (DESIGN.md §3): bitops = FLOPs x activation bits x weight bits,
FLOPs counted as 2 x MACs. Float layers count as 32 x 32; the reference is every layer at INT8."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import numpy_helper

from amq.calib.data import InputSpec, check_sample, open_data
from amq.calib.prepare import DataSource, PathLike, prepare
from amq.calib.workspace import Workspace
from amq.config import ActivationsOverride, Config, Override, WeightsOverride, load_config
from amq.errors import DataError
from amq.graph.model import QDQ_OPS, Graph, drop_unused_initializers, load_model
from amq.plan import FLOAT_BITS, QuantPlan
from amq.quant import qmath
from amq.quant.registry import Kind, handler


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


def bitops(plan: QuantPlan) -> BitopsReport:
    """Per layer, the layers inside If branches and Loop bodies included (each read against
    its own plan)."""
    rows = []
    total = int8 = 0

    def visit(p: QuantPlan) -> None:
        nonlocal total, int8
        for lp in p.layers.values():
            a, w = p.layer_bits(lp)
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
    names = [s.name for s in specs]
    for name, shape in shapes.items():
        spec = next((s for s in specs if s.name == name), None)
        if spec is None:
            raise DataError(
                f"--input-shape {name}: the model has no input '{name}' (inputs: {', '.join(names)})"
            )
        if spec.shape is not None and len(shape) != len(spec.shape):
            raise DataError(
                f"--input-shape {name}:{','.join(map(str, shape))}: input '{name}' has rank "
                f"{len(spec.shape)} {spec.describe()}"
            )
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
    """FLOPs (2 x MACs), parameters and bitops per layer for the bits a config asks for; for a
    QDQ model, the bits it holds (the config then only adds to them)."""
    cfg = config if isinstance(config, Config) else load_config(config)
    proto = load_model(model) if not isinstance(model, onnx.ModelProto) else model
    if any(n.op_type in QDQ_OPS for n in proto.graph.node):
        proto, read = float_model_and_bits(proto)
        cfg = replace(cfg, layers=read + cfg.layers)
        model = proto
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


BITS_OF_TYPE = {
    onnx.TensorProto.INT4: 4,
    onnx.TensorProto.UINT4: 4,
    onnx.TensorProto.INT8: 8,
    onnx.TensorProto.UINT8: 8,
    onnx.TensorProto.INT16: 16,
    onnx.TensorProto.UINT16: 16,
}


def float_model_and_bits(
    qdq: onnx.ModelProto,
) -> tuple[onnx.ModelProto, tuple[tuple[str, Override], ...]]:
    """A QDQ model (main graph) back to float, and the bits its layers compute with as config
    layer entries: each DequantizeLinear of an integer initializer becomes its float values, each
    QuantizeLinear -> DequantizeLinear pair goes, and a layer reading dequantized tensors gets
    their integer widths (weights: its constant input's; activations: its first one's); a layer
    reading none is float."""
    m = onnx.ModelProto()
    m.CopyFrom(qdq)
    g = Graph(m)
    inits = dict(g.initializers)
    rewire: dict[str, str] = {}  # a DequantizeLinear output -> the float tensor it stands for
    bits_of: dict[str, tuple[int, bool]] = {}  # that float tensor -> (bits, from a constant)
    new_inits, keep = [], []
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            q = numpy_helper.to_array(inits[n.input[0]])
            scale = numpy_helper.to_array(inits[n.input[1]]).astype(np.float64)
            zp = (
                numpy_helper.to_array(inits[n.input[2]]).astype(np.float64)
                if len(n.input) > 2 and n.input[2]
                else 0.0
            )
            axis = int(g.attr(n, "axis", 1)) if np.ndim(scale) else None
            if axis is not None and np.ndim(scale) == q.ndim:  # blocked: scale has q's rank
                w = (q - zp) * scale
            else:
                w = qmath.dequantize(q, scale, zp, axis)
            new_inits.append(numpy_helper.from_array(w.astype(np.float32), n.output[0]))
            bits_of[n.output[0]] = (BITS_OF_TYPE.get(inits[n.input[0]].data_type, 32), True)
        elif n.op_type == "DequantizeLinear" and g.producer.get(n.input[0]) is not None:
            qn = g.producer[n.input[0]]
            if qn.op_type != "QuantizeLinear":
                keep.append(n)
                continue
            zp_t = inits.get(qn.input[2]) if len(qn.input) > 2 else None
            rewire[n.output[0]] = qn.input[0]
            bits = BITS_OF_TYPE.get(zp_t.data_type, 8) if zp_t is not None else 8
            bits_of[qn.input[0]] = (bits, False)
        elif n.op_type != "QuantizeLinear":
            keep.append(n)
    layers = []
    quantized_out = {n.input[0] for n in m.graph.node if n.op_type == "QuantizeLinear"}
    for n in keep:
        n.input[:] = [rewire.get(i, i) for i in n.input]
        read = [bits_of[i] for i in n.input if i in bits_of]
        h = handler(n.op_type)
        if h.kind == Kind.TRANSPARENT and n.input and n.input[h.data_input] in bits_of:
            for o in n.output:  # moves values: its output stays on its input's grid
                bits_of[o] = (bits_of[n.input[h.data_input]][0], False)
        acts = [b for b, const in read if not const]
        weights = [b for b, const in read if const]
        # a layer without weights is quantized when it reads two quantized tensors, or one and
        # its output is quantized again (a GlobalAveragePool left float reads a quantized tensor
        # other layers share, and writes float)
        alone = not weights and len(acts) < 2 and not (set(n.output) & quantized_out)
        if not read or (alone and h.kind != Kind.TRANSPARENT):
            layers.append((n.name, Override(skip=True)))
            continue
        layers.append(
            (
                n.name,
                Override(
                    weights=WeightsOverride(bits=weights[0]) if weights else WeightsOverride(),
                    activations=ActivationsOverride(bits=acts[0] if acts else 8),
                ),
            )
        )
    for o in m.graph.output:
        o.name = rewire.get(o.name, o.name)
    del m.graph.node[:]
    m.graph.node.extend(keep)
    m.graph.initializer.extend(new_inits)
    drop_unused_initializers(m)
    return m, tuple((k, v) for k, v in layers if k)
