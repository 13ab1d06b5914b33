"""A thin wrapper over onnx.ModelProto: loading, naming, producers/consumers, initializers,
shapes and opset upgrades. Imports onnx only (and numpy for initializer values)."""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from amq.errors import ModelError

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
CONTROL_FLOW_OPS = ("If", "Loop", "Scan")


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Load an ONNX file with its external data; a one-line ModelError for anything unreadable."""
    p = Path(path)
    if not p.exists():
        raise ModelError(f"{p}: model file not found")
    if p.is_dir():
        raise ModelError(f"{p}: is a folder; give the path of an .onnx file")
    try:
        model = onnx.load(str(p), load_external_data=True)
    except FileNotFoundError as e:
        raise ModelError(
            f"{p}: external data file missing ({e.filename or e}); keep the data files next to the model"
        ) from None
    except Exception as e:  # protobuf raises DecodeError and friends
        raise ModelError(
            f"{p}: not a readable ONNX model ({type(e).__name__}); check the file is a complete .onnx export"
        ) from None
    if not model.graph.node and not model.graph.output:
        raise ModelError(f"{p}: not an ONNX model (no graph found); check the file")
    return model


def opset_version(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 1


def upgrade_opset(model: onnx.ModelProto, target: int, source: str = "model") -> onnx.ModelProto:
    """Upgrade the default-domain opset to ``target`` with onnx.version_converter."""
    current = opset_version(model)
    if current >= target:
        return model
    from onnx import version_converter

    try:  # a transformer's weights not serialized there and back (mpnet: 3.8 -> 2.8 GB peak)
        upgraded = _convert_light(model, target) or version_converter.convert_version(model, target)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"{source}: opset upgrade {current} -> {target} failed ({first[:200]}); "
            f"re-export the model at opset {target} or use per_tensor weights and 8-bit only"
        ) from None
    # the converter keeps ir_version; the new opset may need a newer IR
    upgraded.ir_version = max(upgraded.ir_version, _min_ir_for_opset(target))
    return upgraded


def _convert_light(model: onnx.ModelProto, target: int) -> onnx.ModelProto | None:
    """onnx's version converter on ``model`` with its large weights as dims only, their values
    put back after; None where the converter did not keep every one of them as it was."""
    from onnx import version_converter

    lite, stubbed = _weights_as_dims(model)
    converted = version_converter.convert_version(lite, target)
    original = {t.name: t for t in model.graph.initializer if t.name in stubbed}
    kept = [t for t in converted.graph.initializer if t.name in original]
    if len(kept) != len(original):
        return None
    for t in kept:
        o = original[t.name]
        if list(t.dims) != list(o.dims) or t.data_type != o.data_type or t.raw_data:
            return None
        t.CopyFrom(o)
    return converted


def _min_ir_for_opset(opset: int) -> int:
    table = {21: 10, 20: 9, 19: 9, 15: 8, 14: 7, 13: 7, 12: 7, 11: 6, 10: 5}
    for k in sorted(table, reverse=True):
        if opset >= k:
            return table[k]
    return 3


def has_subgraphs(node: onnx.NodeProto) -> bool:
    return any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute
    )


def iter_all_nodes(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
    """Every node, including those inside If/Loop/Scan bodies (graph by graph)."""
    for g in iter_all_graphs(graph):
        yield from g.node


def iter_all_graphs(graph: onnx.GraphProto) -> Iterable[onnx.GraphProto]:
    """The graph and every graph nested in it (If/Loop/Scan bodies)."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from iter_all_graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from iter_all_graphs(g)


def all_names(model: onnx.ModelProto) -> set[str]:
    """Every tensor and node name used anywhere in the model (subgraphs included)."""
    names: set[str] = set()

    def visit(g: onnx.GraphProto) -> None:
        for coll in (g.input, g.output, g.value_info):
            names.update(v.name for v in coll)
        names.update(t.name for t in g.initializer)
        for n in g.node:
            names.add(n.name)
            names.update(n.input)
            names.update(n.output)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    visit(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sg in a.graphs:
                        visit(sg)

    visit(model.graph)
    names.discard("")
    return names


class NameScope:
    """The one place generated names come from: never clashes with a name already in the model."""

    def __init__(self, taken: Iterable[str]) -> None:
        self.taken = set(taken)

    def new(self, base: str) -> str:
        name = base
        i = 1
        while name in self.taken:
            name = f"{base}_{i}"
            i += 1
        self.taken.add(name)
        return name


def name_nodes(model: onnx.ModelProto) -> int:
    """Give unnamed (or duplicate-named) main-graph nodes stable names ``<OpType>_<index>``, the
    index counting nodes of that op type in graph order. Returns how many were renamed."""
    scope = NameScope(all_names(model))
    seen: set[str] = set()
    per_type: dict[str, int] = defaultdict(int)
    renamed = 0
    for node in model.graph.node:
        idx = per_type[node.op_type]
        per_type[node.op_type] += 1
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        node.name = scope.new(f"{node.op_type}_{idx}")
        seen.add(node.name)
        renamed += 1
    return renamed


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Turn main-graph ``Constant`` nodes with a tensor value into initializers."""
    g = model.graph
    keep = []
    moved = 0
    for node in g.node:
        if (
            node.op_type == "Constant"
            and len(node.attribute) == 1
            and node.attribute[0].name == "value"
        ):
            t = onnx.TensorProto()
            t.CopyFrom(node.attribute[0].t)
            t.name = node.output[0]
            g.initializer.append(t)
            moved += 1
        else:
            keep.append(node)
    if moved:
        del g.node[:]
        g.node.extend(keep)
    return moved


def _dims(tt: onnx.TypeProto) -> tuple[int | str | None, ...] | None:
    if not tt.HasField("tensor_type") or not tt.tensor_type.HasField("shape"):
        return None
    out: list[int | str | None] = []
    for d in tt.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return tuple(out)


class Graph:
    """Read-only views of a model's main graph; rebuild after edits."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        g = model.graph
        self.nodes = list(g.node)
        self.node_by_name = {n.name: n for n in self.nodes}
        self.initializers = {t.name: t for t in g.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in self.nodes:
            for o in n.output:
                if o:
                    self.producer[o] = n
            for i in n.input:
                if i:
                    self.consumers[i].append(n)
        self.inputs = [v for v in g.input if v.name not in self.initializers]
        self.output_names = [o.name for o in g.output]
        self.types: dict[str, onnx.TypeProto] = {}
        for v in list(g.input) + list(g.output) + list(g.value_info):
            self.types[v.name] = v.type

    def is_constant(self, name: str) -> bool:
        return name in self.initializers

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.initializers[name])

    def shape(self, name: str) -> tuple[int | str | None, ...] | None:
        if name in self.initializers:
            return tuple(self.initializers[name].dims)
        t = self.types.get(name)
        return _dims(t) if t is not None else None

    def elem_type(self, name: str) -> int | None:
        if name in self.initializers:
            return self.initializers[name].data_type
        t = self.types.get(name)
        if t is not None and t.HasField("tensor_type"):
            return t.tensor_type.elem_type
        return None

    def is_float(self, name: str) -> bool:
        return self.elem_type(name) in (onnx.TensorProto.FLOAT, None)

    def attr(self, node: onnx.NodeProto, name: str, default=None):
        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default


STUB_ELEMENTS = 1024  # float initializers from this size go to onnx's inference and converter
# as dims only


def _copy_fields(src, dst, skip: str) -> None:
    """Every set field of protobuf message ``src`` into ``dst``, but ``skip``."""
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        if not isinstance(value, (str, bytes)) and hasattr(value, "extend"):  # repeated
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _weights_as_dims(model: onnx.ModelProto) -> tuple[onnx.ModelProto, set[str]]:
    """A copy of ``model`` whose large float initializers carry their dims but no values (for
    onnx's shape inference and version converter, which read no weight's values), and their
    names."""
    g = model.graph
    lite = onnx.ModelProto()
    _copy_fields(model, lite, skip="graph")
    lg = lite.graph
    _copy_fields(g, lg, skip="initializer")
    stubbed = set()
    for t in g.initializer:
        if (
            t.data_type == onnx.TensorProto.FLOAT
            and int(np.prod(t.dims)) >= STUB_ELEMENTS
            and t.data_location != onnx.TensorProto.EXTERNAL
        ):
            lg.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims)
            stubbed.add(t.name)
        else:
            lg.initializer.add().CopyFrom(t)
    return lite, stubbed


def infer_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """Static shape/type inference where it works; the model unchanged where it does not
    (PITFALLS 3: shapes come from the calibration run instead). Inference sees the large float
    initializers as dims only (it reads no weight's values), so a transformer's weights are not
    serialized there and back: paraphrase-MiniLM-L3-v2 0.21 -> 0.03 s, the same model."""
    lite, _ = _weights_as_dims(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(lite, strict_mode=False, data_prop=False)
    except Exception:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for f in ("node", "output", "value_info"):  # nodes: their subgraphs' value_info
        del getattr(out.graph, f)[:]
        getattr(out.graph, f).extend(getattr(inferred.graph, f))
    return out


def safe_filename(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "tensor"


def names_used_in_subgraphs(a: onnx.AttributeProto) -> set[str]:
    """Every tensor name read by nodes inside a GRAPH/GRAPHS attribute (outer-scope reads too)."""
    out: set[str] = set()
    graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
    for sg in graphs:
        for n in sg.node:
            out.update(n.input)
            for b in n.attribute:
                if b.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                    out.update(names_used_in_subgraphs(b))
    return out


def names_read(nodes: Iterable[onnx.NodeProto]) -> set[str]:
    """Every tensor name the nodes read, by their inputs or inside their subgraphs."""
    used: set[str] = set()
    for n in nodes:
        used.update(n.input)
        for a in n.attribute:
            if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                used.update(names_used_in_subgraphs(a))
    return used


def drop_unused_initializers(model: onnx.ModelProto, candidates: set[str] | None = None) -> None:
    """Remove initializers (of ``candidates``, default all) that no node, subgraph or graph output
    reads, and the graph inputs that named them (IR < 4 models list initializers as inputs)."""
    used = names_read(model.graph.node)
    used.update(o.name for o in model.graph.output)
    pool = {t.name for t in model.graph.initializer} if candidates is None else candidates
    dropped = {name for name in pool if name not in used}
    if not dropped:
        return
    keep = [t for t in model.graph.initializer if t.name not in dropped]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    inputs = [i for i in model.graph.input if i.name not in dropped]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
