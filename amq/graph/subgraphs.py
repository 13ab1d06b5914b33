"""If branches and Loop bodies as models of their own, and back (PITFALLS 6).

amq quantizes the branches of an If, and the body of a Loop, the way it quantizes a model: each
becomes a standalone model whose inputs are the outer-scope values it reads (recorded on the
calibration samples that take that branch; for a Loop body, with its formal inputs recorded at
every iteration) and whose initializers are its own plus the outer initializers it reads; the
quantized graph is then put back in place of the original, reading the outer scope again.
Imports onnx only (numpy for the recorded shapes)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from amq.graph.model import QDQ_OPS, NameScope, all_names

BRANCHES = ("then_branch", "else_branch")
# the control-flow ops amq quantizes inside (all of ONNX's)
BODIES = {"If": BRANCHES, "Loop": ("body",), "Scan": ("body",)}


def bodies(node: onnx.NodeProto) -> tuple[str, ...]:
    """The graph attributes of an If, Loop or Scan that amq quantizes as models of their own."""
    return BODIES.get(node.op_type, ())


def subgraph_attrs(node: onnx.NodeProto) -> list[onnx.AttributeProto]:
    return [
        a
        for a in node.attribute
        if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    ]


def _graphs(a: onnx.AttributeProto) -> list[onnx.GraphProto]:
    return [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)


def free_names(g: onnx.GraphProto) -> set[str]:
    """Names a graph reads from its outer scope: used by its nodes (or those of graphs nested in
    them) or returned as outputs, and defined by none of its inputs, initializers or nodes."""
    defined = {v.name for v in g.input} | {t.name for t in g.initializer}
    used: set[str] = {o.name for o in g.output}
    for n in g.node:
        defined.update(o for o in n.output if o)
        used.update(i for i in n.input if i)
        for a in subgraph_attrs(n):
            for sg in _graphs(a):
                used |= free_names(sg)
    return used - defined


def keep_needed(g: onnx.GraphProto, given: Collection[str] = ()) -> None:
    """Drop the nodes of ``g`` that none of its outputs depends on (the outer-scope reads of a
    node's subgraphs count as its inputs): a model made to read a few early tensors then runs
    only up to them. ``given``: tensors fed to ``g`` as they are, whose producers it drops too."""
    producer = {o: i for i, n in enumerate(g.node) for o in n.output if o}
    need, seen, keep = [o.name for o in g.output], set(given), set()
    while need:
        t = need.pop()
        if t in seen:
            continue
        seen.add(t)
        i = producer.get(t)
        if i is None or i in keep:
            continue
        keep.add(i)
        need.extend(x for x in g.node[i].input if x)
        for a in subgraph_attrs(g.node[i]):
            for sg in _graphs(a):
                need.extend(free_names(sg))
    nodes = [n for i, n in enumerate(g.node) if i in keep]
    del g.node[:]
    g.node.extend(nodes)


def expose_loop_inputs(
    model: onnx.ModelProto, node_name: str, scope: NameScope
) -> list[tuple[str, str]]:
    """In place: the body of the Loop or Scan ``node_name`` also returns each of its formal
    inputs (a Loop's iteration number, condition and loop-carried values; a Scan's state and
    scan-input slices) as a scan output, so that the node stacks them over its iterations (along
    axis 0). Returns (formal input, new node output) pairs."""
    node = next(n for n in model.graph.node if n.name == node_name)
    body = branch(node, "body")
    for a in node.attribute:  # a Scan's per-output axes/directions: the new outputs take 0
        if a.name in ("scan_output_axes", "scan_output_directions"):
            a.ints.extend([0] * len(body.input))
    pairs = []
    for v in list(body.input):
        inner = scope.new(f"{v.name}_amq_iter")
        body.node.append(
            helper.make_node("Identity", [v.name], [inner], name=scope.new(f"{inner}_Identity"))
        )
        out = onnx.ValueInfoProto()
        out.CopyFrom(v)
        out.name = inner
        body.output.append(out)
        stacked = scope.new(f"{node_name}_{v.name}_amq_iters")
        node.output.append(stacked)
        pairs.append((v.name, stacked))
    return pairs


def branch(node: onnx.NodeProto, attr: str) -> onnx.GraphProto:
    for a in node.attribute:
        if a.name == attr:
            return a.g
    raise KeyError(f"{node.name}: no attribute {attr}")


RANDOM_OPS = (
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
)


def constant_names(graph: onnx.GraphProto) -> set[str]:
    """Values of a graph that depend on none of its inputs: its initializers and what its nodes
    compute from those alone (Constant nodes included; nodes are in graph order)."""
    inputs = {v.name for v in graph.input}
    const = {t.name for t in graph.initializer} - inputs
    for n in graph.node:
        if n.op_type in RANDOM_OPS or subgraph_attrs(n):
            continue
        if all(not i or i in const for i in n.input):
            const.update(o for o in n.output if o)
    return const


def reads_batched_weight(
    graph: onnx.GraphProto, outer: onnx.GraphProto, ops: Collection[str]
) -> bool:
    """Whether a node of ``graph`` (or of a graph nested in it) of one of ``ops`` (the op types
    that take batched weights at input 1: amq.quant.registry.batched_weight_ops, MatMul)
    multiplies by an initializer of rank > 2 - its own, a nested graph's or one of ``outer`` -:
    a batched weight [..., K, N], which amq writes at 8 bits as a blocked DequantizeLinear
    (opset 21, quant/qdq.py)."""

    def walk(g: onnx.GraphProto, ranks: dict[str, int]) -> bool:
        ranks = {**ranks, **{t.name: len(t.dims) for t in g.initializer}}
        for n in g.node:
            if n.op_type in ops and len(n.input) > 1 and ranks.get(n.input[1], 0) > 2:
                return True
            if any(walk(sg, ranks) for a in subgraph_attrs(n) for sg in _graphs(a)):
                return True
        return False

    return walk(graph, {t.name: len(t.dims) for t in outer.initializer})


def branch_model(
    parent: onnx.ModelProto,
    graph: onnx.GraphProto,
    samples: Sequence[Mapping[str, np.ndarray]],
    outer_initializers: Mapping[str, onnx.TensorProto],
    outer_constants: set[str] = frozenset(),
) -> onnx.ModelProto:
    """A standalone model of ``graph`` (a branch of ``parent``): the outer initializers it reads
    become its initializers, and so do the outer values computed from initializers alone
    (``outer_constants``, their recorded value: weights a branch gets from its parent, such as
    an LSTM's sliced and stacked in the outer graph); every other outer value becomes an input,
    typed and shaped from ``samples`` (a dim that differs between samples is left symbolic)."""
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.ir_version = parent.ir_version
    m.opset_import.extend(parent.opset_import)
    m.graph.CopyFrom(graph)
    free = free_names(graph)
    for name in sorted(free):
        if name in outer_initializers:
            m.graph.initializer.append(outer_initializers[name])
            continue
        if name in outer_constants:
            m.graph.initializer.append(numpy_helper.from_array(np.asarray(samples[0][name]), name))
            continue
        values = [np.asarray(s[name]) for s in samples]
        first = values[0]
        dims: list[int | str] = [
            d if all(v.shape[i] == d for v in values if v.ndim == first.ndim) else f"amq_dim{i}"
            for i, d in enumerate(first.shape)
        ]
        elem = helper.np_dtype_to_tensor_dtype(first.dtype)
        m.graph.input.append(helper.make_tensor_value_info(name, elem, dims))
    return m


def _rename_graph(g: onnx.GraphProto, mapping: Mapping[str, str]) -> None:
    def r(x: str) -> str:
        return mapping.get(x, x)

    for coll in (g.input, g.output, g.value_info):
        for v in coll:
            v.name = r(v.name)
    for t in g.initializer:
        t.name = r(t.name)
    for n in g.node:
        n.name = r(n.name)
        n.input[:] = [r(i) for i in n.input]
        n.output[:] = [r(o) for o in n.output]
        for a in subgraph_attrs(n):
            for sg in _graphs(a):
                _rename_graph(sg, mapping)


def _graph_names(g: onnx.GraphProto) -> set[str]:
    m = onnx.ModelProto()
    m.graph.CopyFrom(g)
    return all_names(m)


def _defined(g: onnx.GraphProto) -> set[str]:
    """Names a graph (with the graphs nested in it) defines: initializers, node outputs and node
    names."""
    out = {t.name for t in g.initializer}
    for n in g.node:
        out.add(n.name)
        out.update(o for o in n.output if o)
        for a in subgraph_attrs(n):
            for sg in _graphs(a):
                out |= _defined(sg)
    out.discard("")
    return out


def splice_branch(
    parent: onnx.ModelProto,
    node_name: str,
    attr: str,
    quantized: onnx.ModelProto,
) -> None:
    """Put the quantized standalone model of body ``attr`` of the If or Loop ``node_name`` back
    into ``parent`` (in place): the inputs it was given for outer-scope values become outer-scope
    reads again (a Loop body keeps its own formal inputs), initializers copied from the outer
    scope and left unchanged are dropped (read from there again) unless a QuantizeLinear or
    DequantizeLinear reads them, and names it created that clash with a name elsewhere in
    ``parent`` are renamed."""
    node = next(n for n in parent.graph.node if n.name == node_name)
    original = branch(node, attr)
    new = onnx.GraphProto()
    new.CopyFrom(quantized.graph)
    new.name = original.name
    del new.input[:]
    new.input.extend(original.input)
    outer = {t.name: t for t in parent.graph.initializer}
    # what a Q/DQ reads stays in the body even where the outer graph holds the same initializer
    # (a weight shared with a main-graph layer): onnxruntime's QDQ transforms look for them in
    # the body's own graph (1.32.0 fuses an 8-bit weight's DequantizeLinear + MatMul at opset
    # 21 and fails to load the model: "TransposeDQWeightsForMatMulNBits Missing required
    # weight"); they are renamed below like any name the body now defines
    qdq_inputs = {i for n in new.node if n.op_type in QDQ_OPS for i in n.input}
    keep = [
        t
        for t in new.initializer
        if t.name in qdq_inputs
        or t.name not in outer
        or t.SerializeToString() != outer[t.name].SerializeToString()
    ]
    del new.initializer[:]
    new.initializer.extend(keep)
    # a name the new branch defines that is defined outside the original branch (a generated
    # name the parent already uses, or an outer initializer the branch now holds changed)
    taken = all_names(parent)
    elsewhere = taken - _defined(original)
    scope = NameScope(taken | _graph_names(new))
    clashes = {x: scope.new(f"{x}_{attr.split('_')[0]}") for x in sorted(_defined(new) & elsewhere)}
    if clashes:
        _rename_graph(new, clashes)
    original.CopyFrom(new)
