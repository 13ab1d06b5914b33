"""Model check: patterns left unfused, shared tensors, float islands, ops amq cannot quantize, and
(for a QDQ model) the integer types each op type reads and writes."""

from __future__ import annotations

import os
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import onnx

from amq import runtime
from amq.analysis.summary import INTEGER_KERNELS
from amq.calib import runner
from amq.calib.data import batches, input_specs, open_data
from amq.calib.prepare import DataSource, PathLike, copy_model
from amq.config import Config
from amq.errors import AmqError
from amq.graph.model import (
    CONTROL_FLOW_OPS,
    QDQ_OPS,
    Graph,
    constants_to_initializers,
    infer_types,
    iter_all_graphs,
    iter_all_nodes,
    load_model,
    name_nodes,
)
from amq.quant.registry import BN_FOLD, QUANTIZABLE_KINDS, SHAPE_OPS, Kind, handler
from amq.runtime import Execution, Exposed

TYPE_NAMES = {
    onnx.TensorProto.INT4: "int4",
    onnx.TensorProto.UINT4: "int4",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "int8",
    onnx.TensorProto.INT16: "int16",
    onnx.TensorProto.UINT16: "int16",
    onnx.TensorProto.INT32: "int32",
}


@dataclass
class Finding:
    kind: str
    where: str
    detail: str


@dataclass
class CheckReport:
    quantized_model: bool
    findings: list[Finding] = field(default_factory=list)
    unsupported: dict[str, int] = field(default_factory=dict)
    dtype_stats: dict[str, dict[str, int]] = field(
        default_factory=dict
    )  # op type -> "in:int8" -> n

    def by_kind(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    def to_dict(self) -> dict:
        return {
            "quantized_model": self.quantized_model,
            "findings": [f.__dict__ for f in self.findings],
            "unsupported_ops": self.unsupported,
            "dtype_stats": self.dtype_stats,
        }


def _single_consumer(g: Graph, t: str) -> bool:
    return len(g.consumers.get(t, [])) == 1 and t not in g.output_names


def check_graph(g: Graph) -> CheckReport:
    # Q/DQ anywhere, If branches and Loop bodies included (amq quantizes inside them)
    quantized = any(n.op_type in QDQ_OPS for n in iter_all_nodes(g.model.graph))
    rep = CheckReport(quantized_model=quantized)
    rep.findings += _unfused(g)
    rep.findings += _shared_tensors(g)
    folded = {f.where.split(" -> ")[1] for f in rep.findings if f.kind == BN_FOLD.name}
    rep.unsupported = _unsupported(g, folded)
    if quantized:
        rep.findings += _float_islands(g)
        rep.dtype_stats = _all_dtype_stats(g)
    return rep


def _real_consumers(g: Graph, t: str) -> list[onnx.NodeProto]:
    """The nodes reading ``t``, looking through Q/DQ pairs."""
    out = []
    for c in g.consumers.get(t, []):
        if c.op_type in QDQ_OPS:
            for o in c.output:
                out.extend(_real_consumers(g, o))
        else:
            out.append(c)
    return out


def _unfused(g: Graph) -> list[Finding]:
    """Patterns not folded or fused (the registry's fusions)."""
    out = []
    for n in g.nodes:
        fusions = handler(n.op_type).fusions
        cons = _real_consumers(g, n.output[0]) if fusions else []
        if len(cons) != 1:
            continue
        c = cons[0]
        for f in fusions:
            if c.op_type in f.readers and (
                not f.constant_operand or any(g.is_constant(i) for i in c.input)
            ):
                out.append(Finding(f.name, f"{n.name} -> {c.name}", f.detail))
                break
    return out


def _shared_tensors(g: Graph) -> list[Finding]:
    """Tensors read by several quantizable nodes (one range for different uses)."""
    out = []
    for t in list(g.consumers):
        p = g.producer.get(t)
        if g.is_constant(t) or (p is not None and p.op_type in QDQ_OPS):
            continue
        q = [c for c in _real_consumers(g, t) if handler(c.op_type).kind in QUANTIZABLE_KINDS]
        if len(q) > 1:
            names = ", ".join(c.name for c in q[:4]) + (" ..." if len(q) > 4 else "")
            out.append(Finding("shared tensor", t, f"read by {len(q)} quantizable nodes: {names}"))
    return out


def _unsupported(g: Graph, folded: set[str]) -> dict[str, int]:
    """Ops amq cannot quantize (BatchNorms it would fold left out), most frequent first."""
    unsupported: Counter[str] = Counter()
    for n in g.nodes:
        if n.name in folded or n.op_type in QDQ_OPS or n.op_type in SHAPE_OPS:
            continue
        if n.op_type in CONTROL_FLOW_OPS:
            continue  # amq quantizes inside (If branches, Loop and Scan bodies)
        if handler(n.op_type).kind == Kind.FLOAT:
            unsupported[n.op_type] += 1
    return dict(sorted(unsupported.items(), key=lambda kv: (-kv[1], kv[0])))


def _float_islands(g: Graph) -> list[Finding]:
    """In a QDQ model, a compute op reading no dequantized input, between quantized layers (a
    quantized layer before it and one after it)."""
    dq_out = {n.output[0] for n in g.nodes if n.op_type == "DequantizeLinear"}
    qlayers = {
        n.name
        for n in g.nodes
        if handler(n.op_type).kind in QUANTIZABLE_KINDS and any(i in dq_out for i in n.input)
    }
    up = _reach(g, qlayers, forward=True)
    down = _reach(g, qlayers, forward=False)
    out = []
    for n in g.nodes:
        if n.op_type in QDQ_OPS or n.name in qlayers or n.op_type in SHAPE_OPS:
            continue
        if handler(n.op_type).kind == Kind.TRANSPARENT:
            continue
        if n.name in up and n.name in down and not any(i in dq_out for i in n.input):
            out.append(
                Finding(
                    "float island", n.name, f"{n.op_type} runs in float between quantized layers"
                )
            )
    return out


def unfused_in_runtime(
    optimized: onnx.ModelProto, integer_kernels: tuple[str, ...]
) -> list[Finding]:
    """Ops of onnxruntime's optimized graph (bodies included) that still read a
    DequantizeLinear output and feed a QuantizeLinear: they run in float, between a dequantize
    and a quantize, where the runtime found no integer kernel (PITFALLS 8)."""
    out = []
    for g in iter_all_graphs(optimized.graph):
        producer = {o: n for n in g.node for o in n.output}
        readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in g.node:
            for i in n.input:
                readers[i].append(n)
        for n in g.node:
            if n.op_type in QDQ_OPS or n.op_type.startswith(integer_kernels):
                continue
            reads_dq = any(
                i in producer and producer[i].op_type == "DequantizeLinear" for i in n.input
            )
            feeds_q = any(r.op_type == "QuantizeLinear" for o in n.output for r in readers[o])
            if reads_dq and feeds_q:
                out.append(
                    Finding(
                        "float in onnxruntime",
                        n.name or n.op_type,
                        f"{n.op_type} runs in float between DequantizeLinear and QuantizeLinear "
                        "in onnxruntime's optimized graph (no integer kernel): a dequantize and a "
                        "quantize each call; keep the layers around it float or accept the cost",
                    )
                )
    return out


def _reach(g: Graph, start: set[str], forward: bool) -> set[str]:
    """Nodes reachable downstream (forward) or upstream of any node in ``start`` (excluded)."""
    seen: set[str] = set()
    stack = [g.node_by_name[s] for s in start]
    while stack:
        n = stack.pop()
        nxt = []
        if forward:
            for o in n.output:
                nxt.extend(g.consumers.get(o, []))
        else:
            for i in n.input:
                p = g.producer.get(i)
                if p is not None:
                    nxt.append(p)
        for m in nxt:
            if m.name not in seen:
                seen.add(m.name)
                stack.append(m)
    return seen


def _all_dtype_stats(g: Graph) -> dict[str, dict[str, int]]:
    """_dtype_stats of the main graph and of every graph nested in it, added up."""
    total: dict[str, Counter[str]] = defaultdict(Counter)
    for sub in iter_all_graphs(g.model.graph):
        if sub is g.model.graph:
            sg = g
        else:
            m = onnx.ModelProto()
            m.opset_import.extend(g.model.opset_import)
            m.graph.CopyFrom(sub)
            sg = Graph(m)
        dq_out = {n.output[0]: n for n in sg.nodes if n.op_type == "DequantizeLinear"}
        for op, counts in _dtype_stats(sg, dq_out).items():
            total[op].update(counts)
    return {k: dict(sorted(v.items())) for k, v in sorted(total.items())}


def _dtype_stats(g: Graph, dq_out: dict[str, onnx.NodeProto]) -> dict[str, dict[str, int]]:
    q_in: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in g.nodes:
        if n.op_type == "QuantizeLinear":
            q_in[n.input[0]].append(n)
    stats: dict[str, Counter[str]] = defaultdict(Counter)

    def int_type(t: str) -> str:
        d = dq_out.get(t)
        if d is None:
            return "float"
        return TYPE_NAMES.get(g.elem_type(d.input[0]) or 0, _q_type(g, d.input[0]))

    for n in g.nodes:
        if n.op_type in QDQ_OPS:
            continue
        for i in n.input:
            if i and (g.is_float(i) or i in dq_out):
                stats[n.op_type][f"in:{int_type(i)}"] += 1
        for o in n.output:
            if not o:
                continue
            qs = q_in.get(o)
            if qs:
                q = qs[0]
                stats[n.op_type][f"out:{_q_type(g, q.output[0])}"] += 1
            else:
                stats[n.op_type]["out:float"] += 1
    return {k: dict(sorted(v.items())) for k, v in sorted(stats.items())}


def _q_type(g: Graph, t: str) -> str:
    """Integer type of a QuantizeLinear output (from its zero point) or an initializer."""
    if t in g.initializers:
        return TYPE_NAMES.get(g.initializers[t].data_type, "float")
    p = g.producer.get(t)
    if (
        p is not None
        and p.op_type == "QuantizeLinear"
        and len(p.input) > 2
        and p.input[2] in g.initializers
    ):
        return TYPE_NAMES.get(g.initializers[p.input[2]].data_type, "int8")
    return "int8"


def check(
    model: PathLike | onnx.ModelProto,
    data: DataSource | None = None,
    samples: int = 64,
    batch_size: int = 16,
) -> CheckReport:
    """Model check of a float or QDQ model (no data needed). For a QDQ model with ``data``, also
    the measured int16 pair-sum saturation of each 8-bit layer on its first ``samples``."""
    from amq.analysis.check import Finding, unfused_in_runtime

    proto = load_model(model) if not isinstance(model, onnx.ModelProto) else copy_model(model)
    source = str(model) if not isinstance(model, onnx.ModelProto) else "model"
    constants_to_initializers(proto)
    name_nodes(proto)
    rep = check_graph(Graph(infer_types(proto)))
    if rep.quantized_model:  # what onnxruntime makes of the Q/DQ (no data needed)
        with tempfile.TemporaryDirectory(prefix="amq-") as tmp:
            opt = os.path.join(tmp, "optimized.onnx")
            try:
                runner.session(proto, optimized_path=opt, source=source)
                optimized = onnx.load(opt, load_external_data=False)
            except (AmqError, OSError) as e:  # the runtime cannot load it: said, not raised
                rep.findings.append(Finding("float in onnxruntime", "-", f"not checked: {e}"))
            else:
                rep.findings += unfused_in_runtime(optimized, INTEGER_KERNELS)
        rep.findings += overflow_findings(proto, data, samples, batch_size)
    return rep


def overflow_findings(
    proto: onnx.ModelProto, data: DataSource | None, samples: int, batch_size: int
) -> list:
    """`check`'s overflow lines: the worst case from the weights, and with data the measured
    fraction of outputs that saturate (on the Q/DQ math's codes: the same on every machine)."""
    from amq.analysis import overflow_check as OC
    from amq.analysis.check import Finding
    from amq.quant.overflow import Saturation

    g = Graph(proto)
    layers = OC.pair_layers(g)
    found = [
        Finding(
            "overflow risk",
            name,
            f"{k}/{n} output channels have a weight pair that can saturate int16 on x86 without "
            "VNNI (worst case, any input)",
        )
        for name, (k, n) in OC.worst_case(layers).items()
        if k
    ]
    if data is None or not layers:
        return found
    specs = input_specs(g)
    ds = open_data(data, specs, Config()).head(samples)
    names = sorted({lp.codes for lp in layers} - {s.name for s in specs})
    sess = runtime.session_for(Exposed(proto, names), Execution.IDEAL, "QDQ model")
    acc = {lp.name: Saturation() for lp in layers}
    for b in runner.run_batches(sess, names, batches(ds, specs, batch_size)):
        codes = {**b.values, **b.feeds}
        for name, sat in OC.measure(layers, codes).items():
            acc[name].update(sat)
    return found + [
        Finding(
            "overflow measured",
            name,
            f"{100 * sat.fraction:.3g}% of outputs saturate on x86 without VNNI on {len(ds)} "
            f"samples (error {sat.sqnr_db:.1f} dB below the signal)",
        )
        for name, sat in acc.items()
        if sat.saturated
    ]
