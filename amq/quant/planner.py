"""From a model and a config to a QuantPlan: which layers and tensors, with which bits, grouped on
which grids; no statistics needed (qparams.py turns statistics into scales). Graph structure
comes from amq.graph, facts about op types from the registry."""

from __future__ import annotations

import difflib
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from amq.config import BLOCK_BITS, Config, Granularity, Target, layer_matches
from amq.errors import ConfigError
from amq.graph.model import CONTROL_FLOW_OPS, QDQ_OPS, Graph, has_subgraphs, iter_all_nodes
from amq.graph.patterns import HARDSWISH_FLOOR, hardswish_only
from amq.graph.subgraphs import constant_names
from amq.plan import LayerPlan, QuantPlan, TensorPlan
from amq.quant.activations import (
    drop_unread_float_outputs,
    fix_known_ranges,
    node_attrs,  # noqa: F401  (moved there; importers of planner.node_attrs keep working)
)
from amq.quant.registry import (
    OWN_GRID,
    QUANTIZABLE_KINDS,
    Bounds,
    Kind,
    NodeView,
    bias_channels,
    clamp_bounds,
    fixed_output_range,
    handler,
    layer_op_types,
)
from amq.quant.runtime_layers import (
    DYNAMIC_GUARD_NOTE,
    block_written,
    dynamic_pair_sum_layers,
    runtime_quant_note,
)


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of a tensor as seen in a probe run of the float model."""

    shape: tuple[int, ...]
    dtype: str  # numpy dtype name


def check_config_names(g: Graph, cfg: Config) -> list[str]:
    """Op types in the config must be layer types (error with did-you-mean); layer patterns that
    match no node give a warning listing close names."""
    types = layer_op_types()
    for op, _ in cfg.op_types:
        if op not in types:
            close = difflib.get_close_matches(op, types, n=1)
            hint = (
                f"; did you mean '{close[0]}'?"
                if close
                else f"; layer op types: {', '.join(types)}"
            )
            raise ConfigError(f"op_types: '{op}' is not a quantizable op type{hint}")
    warnings = []
    names = [n.name for n in iter_all_nodes(g.model.graph)]  # If/Loop bodies are quantized too
    for pattern, _ in cfg.layers:
        if not any(layer_matches(pattern, n) for n in names):
            close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.5)
            if not close:
                stem = pattern.split("*")[0]
                close = [n for n in names if stem and n.startswith(stem[: max(3, len(stem) // 2)])][
                    :3
                ]
            hint = f" (close: {', '.join(close)})" if close else ""
            warnings.append(f"layers: pattern '{pattern}' matches no node{hint}")
    return warnings


def constant_weight_inputs(model: onnx.ModelProto) -> list[str]:
    """Weight and bias inputs of quantizable layers that the graph computes from initializers
    alone (a Transpose, Reshape, Split or Concat of weights), and the constant operand of an Add
    right after a Conv (a conv bias exported apart, often reshaped in the graph), with every
    other output of the nodes producing them: what ``fold_constants`` should turn into
    initializers so that the layers get weight quantization (and the bias can be folded)."""
    g = model.graph
    derived = constant_names(g) - {t.name for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output if o}
    wanted: list[str] = []
    for n in g.node:
        h = handler(n.op_type)
        for idx in (h.weight_input, h.bias_input):
            if idx is not None and len(n.input) > idx and n.input[idx] in derived:
                wanted.append(n.input[idx])
        if n.op_type == "Add" and len(n.input) == 2:
            for i in (0, 1):
                p = producer.get(n.input[i])
                if (
                    p is not None
                    and handler(p.op_type).bias_add_folds
                    and n.input[1 - i] in derived
                ):
                    wanted.append(n.input[1 - i])
    out: list[str] = []
    for name in wanted:
        for o in producer[name].output:
            if o and o not in out:
                out.append(o)
    return out


def output_floor(g: Graph, node: onnx.NodeProto) -> float | None:
    """The constant lower bound of a Relu or Clip output (None when there is none or it is < 0)."""
    bounds = _clamp_bounds(g, node)
    if bounds is None or bounds[0] is None or bounds[0] < 0:
        return None
    return bounds[0]


def _clamp_bounds(g: Graph, node: onnx.NodeProto) -> tuple[float | None, float | None] | None:
    def const(t: str) -> float | None:
        return float(g.array(t).reshape(-1)[0]) if g.is_constant(t) else None

    return clamp_bounds(node.op_type, node_attrs(node), node.input, const)


def plan_structure(
    g: Graph,
    cfg: Config,
    info: Mapping[str, TensorInfo],
    float_layers: Mapping[str, str] | None = None,
    float_roots: Mapping[str, str] | None = None,
) -> QuantPlan:
    """Decide which layers are quantized with which bits and which activation tensors get Q/DQ
    (grouped: a group shares one grid, observed at its root). No statistics needed."""
    float_roots = dict(float_roots or {})
    plan = QuantPlan()
    outputs = set(g.output_names)
    # values computed from initializers alone (weights sliced, stacked or reshaped in the graph,
    # as an LSTM's are): constants, not activations - the runtime folds them
    sc = _Scope(g, cfg, info, constant_names(g.model.graph))
    _plan_layers(sc, plan, dict(float_layers or {}))
    forced = {
        pattern for pattern, ov in cfg.layers if ov.skip is False and pattern in g.node_by_name
    }
    if cfg.target == Target.ORT:
        _drop_constant_operand_elementwise(plan, forced)
    _drop_dead_end_elementwise(g, plan, outputs if not cfg.quantize_outputs else set(), forced)
    needed: dict[str, list[str]] = defaultdict(list)
    produced: dict[str, str] = {}
    block_out = block_written(g, plan)
    for lp in plan.layers.values():
        if not lp.quantized or lp.act_dynamic or lp.block_size:
            continue  # a dynamic or block-wise layer reads and writes float tensors
        for t in lp.act_inputs:
            if t in block_out:
                plan.float_tensors[t] = (
                    "written by a block-wise W4 layer (MatMulNBits reads and writes float)"
                )
                continue
            needed[t].append(lp.name)
        for o in lp.outputs:
            if o not in outputs or cfg.quantize_outputs:
                produced[o] = lp.name
    groups = _group_activations(sc, set(needed) | set(produced))
    _plan_activations(plan, groups, needed, produced, float_roots)
    drop_unread_float_outputs(sc.g, sc.info, plan, outputs)
    fix_known_ranges(g, plan)
    _plan_weights(g, plan)
    for t, reason in float_roots.items():
        plan.float_tensors.setdefault(t, reason)
    eligible = {lp.name for lp in overflow_candidates(plan) + dynamic_pair_sum_layers(plan)}
    for lp in plan.layers.values():
        if lp.name not in eligible:
            lp.overflow = ""  # no pair-sum kernel: nothing to decide
    for lp in dynamic_pair_sum_layers(plan):
        if lp.overflow == "auto":
            lp.overflow, lp.overflow_note = "guard", DYNAMIC_GUARD_NOTE
    apply_overflow_guard(g, plan)
    return plan


@dataclass(frozen=True)
class _Scope:
    """What planning a node reads besides the node: the graph, the config, the probe's tensor
    infos and the values computed from initializers alone (``derived``)."""

    g: Graph
    cfg: Config
    info: Mapping[str, TensorInfo]
    derived: set[str]

    def is_float_act(self, t: str) -> bool:
        if not t or t in self.derived:
            return False
        ti = self.info.get(t)
        if ti is not None:
            return ti.dtype == "float32"
        return self.g.elem_type(t) == onnx.TensorProto.FLOAT


def _plan_layers(sc: _Scope, plan: QuantPlan, float_layers: Mapping[str, str]) -> None:
    """A LayerPlan per quantizable node; the float ops (with their FLOPs) noted."""
    g = sc.g
    for node in g.nodes:
        h = handler(node.op_type)
        if node.op_type in CONTROL_FLOW_OPS:
            continue  # its branches / body are planned as models of their own (Workspace.branches)
        if has_subgraphs(node):
            plan.float_ops[node.name] = (
                f"{node.op_type} with a subgraph: its body stays float (not quantized)"
            )
            continue
        if node.op_type in QDQ_OPS:
            continue
        if h.kind not in QUANTIZABLE_KINDS:
            if h.kind == Kind.FLOAT:
                plan.float_ops[node.name] = f"{node.op_type}: {h.note}"
                if h.flops is not None:
                    plan.float_flops[node.name] = _flops(g, node, node_attrs(node), sc.info, None)
            continue
        lp = _layer_plan(sc, node, float_layers.get(node.name))
        plan.layers[node.name] = lp
        note = runtime_quant_note(lp, sc.cfg.settings_for(node.name, node.op_type))
        if note:
            plan.notes.append(note)


def _layer_plan(sc: _Scope, node: onnx.NodeProto, float_reason: str | None) -> LayerPlan:
    g, h = sc.g, handler(node.op_type)
    s = sc.cfg.settings_for(node.name, node.op_type)
    attrs = node_attrs(node)
    lp = LayerPlan(
        name=node.name,
        op_type=node.op_type,
        quantized=not s.skip,
        reason="skip: true in config" if s.skip else "",
        act_bits=s.act_bits,
        per_channel=s.granularity == Granularity.PER_CHANNEL,
        act_symmetric=s.act_symmetric,
        overflow=s.overflow.value,
    )
    if float_reason is not None:
        lp.quantized, lp.reason = False, float_reason
    wi = h.weight_input
    if (
        wi is not None
        and len(node.input) > wi
        and g.is_constant(node.input[wi])
        and g.elem_type(node.input[wi]) == onnx.TensorProto.FLOAT
    ):
        lp.weight = node.input[wi]
        lp.weight_bits = s.weight_bits
        lp.params = int(np.prod(g.initializers[lp.weight].dims))
        bi = h.bias_input
        if (
            bi is not None
            and len(node.input) > bi
            and node.input[bi]
            and g.is_constant(node.input[bi])
        ):
            lp.params += int(np.prod(g.initializers[node.input[bi]].dims))
            if _bias_quantizable(g, node, attrs, lp.weight, node.input[bi], lp.per_channel):
                lp.bias = node.input[bi]
    act_idx = h.act_inputs if h.kind != Kind.CONCAT else tuple(range(len(node.input)))
    ins = [node.input[i] for i in act_idx if i < len(node.input) and node.input[i] != lp.weight]
    lp.act_inputs = [t for t in ins if sc.is_float_act(t)]
    lp.outputs = [o for o in node.output if o]
    consts = [t for t in ins if t in sc.derived]
    lp.float_operand = bool(consts)
    lp.params += sum(int(np.prod(g.initializers[c].dims)) for c in consts if g.is_constant(c))
    lp.flops = _flops(g, node, attrs, sc.info, lp.weight)
    if lp.quantized and not all(sc.is_float_act(o) for o in lp.outputs):
        lp.quantized, lp.reason = False, "output is not float32"
    if lp.quantized and not lp.act_inputs and lp.weight is None:
        lp.quantized, lp.reason = False, "no float32 input to quantize"
    if lp.quantized and lp.act_inputs and lp.weight is not None:
        rank2 = len(g.initializers[lp.weight].dims) == 2
        if s.block_size and h.block_weights and rank2 and s.weight_bits in BLOCK_BITS:
            lp.block_size = s.block_size
        elif (
            s.act_dynamic
            and h.dynamic_activations
            and rank2
            and s.weight_bits == 8
            and not attrs.get("transA", 0)
        ):
            lp.act_dynamic, lp.act_bits, lp.act_symmetric = True, 8, False
    if lp.quantized and lp.weight is None and _free_product(sc, node, lp):
        lp.act_bits = h.free_product_bits
        lp.reason = f"two activations without a fixed range: {lp.act_bits}-bit activations"
    return lp


def _free_product(sc: _Scope, node: onnx.NodeProto, lp: LayerPlan) -> bool:
    """A product of two activations, neither from an op with a fixed range (through reshapes
    and transposes), that keeps the default grid: registry free_product_bits applies."""
    h, cfg = handler(node.op_type), sc.cfg
    if not h.free_product_bits or len(lp.act_inputs) != 2 or cfg.target != Target.ORT:
        return False
    if lp.act_bits != 8 or lp.act_dynamic or cfg.activations.bits != 8:
        return False
    if any(op == node.op_type and ov.activations.bits is not None for op, ov in cfg.op_types):
        return False
    if any(layer_matches(p, node.name) and ov.activations.bits is not None for p, ov in cfg.layers):
        return False
    return not any(_fixed_source(sc.g, t) for t in lp.act_inputs)


def _fixed_source(g: Graph, t: str) -> bool:
    """``t`` comes from an op with a fixed output range, possibly through same-values ops."""
    p = g.producer.get(t)
    while p is not None and handler(p.op_type).same_values and p.input:
        p = g.producer.get(p.input[0])
    return p is not None and fixed_output_range(p.op_type) is not None


@dataclass
class _Groups:
    """Activation tensors grouped on one grid: each tensor's root, the op it was reached
    through (a transparent op) and each root's clamp (ahead-relu)."""

    group_of: dict[str, str] = field(default_factory=dict)
    via: dict[str, str] = field(default_factory=dict)
    clamp: dict[str, Bounds] = field(default_factory=dict)
    chain: dict[str, bool] = field(default_factory=dict)  # root -> each member has one reader


def _group_activations(sc: _Scope, quantized: set[str]) -> _Groups:
    """Tensors that get Q/DQ and those a transparent op passes their grid to, by root."""
    g, cfg, gr = sc.g, sc.cfg, _Groups()
    outputs = set(g.output_names)

    def single(t: str) -> bool:
        return len(g.consumers.get(t, [])) == 1 and t not in outputs

    for inp in g.inputs:
        if inp.name in quantized:
            gr.group_of[inp.name] = inp.name
            gr.chain[inp.name] = single(inp.name)
    for node in g.nodes:
        h = handler(node.op_type)
        root = gr.group_of.get(node.input[h.data_input]) if len(node.input) > h.data_input else None
        if node.doc_string == OWN_GRID:  # its output starts a group of its own
            root = None
        if h.kind == Kind.TRANSPARENT and root is not None:
            x = node.input[h.data_input]
            for y in node.output:
                if not y or (y in outputs and not cfg.quantize_outputs) or not sc.is_float_act(y):
                    continue
                if h.clamp is not None:
                    bounds = _clamp_bounds(g, node)
                    if cfg.ahead_relu and bounds is not None and gr.chain[root] and single(x):
                        gr.group_of[y] = root
                        gr.via[y] = node.op_type
                        old = gr.clamp.get(root, (None, None))
                        gr.clamp[root] = (_maxn(old[0], bounds[0]), _minn(old[1], bounds[1]))
                        gr.chain[root] = gr.chain[root] and single(y)
                    continue
                gr.group_of[y] = root
                gr.via[y] = node.op_type
                gr.chain[root] = gr.chain[root] and single(x) and single(y)
        for o in node.output:
            if o in quantized and o not in gr.group_of:
                gr.group_of[o] = o
                gr.chain[o] = single(o)
    if cfg.ahead_relu:
        for root in set(gr.group_of.values()):
            if hardswish_only(g, root, lambda n: _clamp_bounds(g, n)):
                old = gr.clamp.get(root, (None, None))  # below -3 hardswish gives 0: clamp there
                gr.clamp[root] = (_maxn(old[0], HARDSWISH_FLOOR), old[1])
    return gr


def _plan_activations(
    plan: QuantPlan,
    gr: _Groups,
    needed: Mapping[str, list[str]],
    produced: Mapping[str, str],
    float_roots: Mapping[str, str],
) -> None:
    """A TensorPlan per grouped activation (a float root's members noted float instead), its
    bits the widest of the layers reading any member of its group (else the producer's)."""
    for t, root in gr.group_of.items():
        if root in float_roots:
            plan.float_tensors[t] = float_roots[root]
            continue
        plan.tensors[t] = TensorPlan(
            name=t,
            role="activation",
            bits=8,
            signed=False,
            symmetric=False,
            root=root,
            clamp=gr.clamp.get(root),
            consumers=list(needed.get(t, [])),
            producer=produced.get(t),
            via=gr.via.get(t),
        )
    members: dict[str, list[TensorPlan]] = defaultdict(list)
    for tp in plan.tensors.values():
        members[tp.root or tp.name].append(tp)
    for mem in members.values():
        readers = [plan.layers[c] for tp in mem for c in tp.consumers]
        if not readers:
            readers = [plan.layers[tp.producer] for tp in mem if tp.producer]
        bits = max(lp.act_bits for lp in readers)
        sym = any(lp.act_symmetric for lp in readers)
        for tp in mem:
            tp.bits, tp.symmetric, tp.signed = bits, sym, sym


def _plan_weights(g: Graph, plan: QuantPlan) -> None:
    """A TensorPlan per quantized weight (tied weights: the widest bits; per-channel only if
    every use agrees on the axis)."""
    for lp in plan.layers.values():
        if not lp.quantized or lp.weight is None:
            continue
        h = handler(lp.op_type)
        rank = len(g.initializers[lp.weight].dims)
        axis = (
            h.weight_axis(node_attrs(g.node_by_name[lp.name]), rank)
            if (lp.per_channel and h.weight_axis and rank >= 2)
            else None
        )
        if lp.block_size:
            axis = 0  # blocks along K of [K, N]
        prev = plan.tensors.get(lp.weight)
        if prev is not None:
            prev.bits = max(prev.bits, lp.weight_bits or 8)
            if prev.axis != axis or prev.block_size != lp.block_size:
                prev.axis, prev.block_size = None, 0  # tied weights that disagree: per tensor
            prev.consumers.append(lp.name)
            continue
        plan.tensors[lp.weight] = TensorPlan(
            name=lp.weight,
            role="weight",
            bits=lp.weight_bits or 8,
            signed=True,
            symmetric=True,
            narrow=True,
            axis=axis,
            consumers=[lp.name],
            block_size=lp.block_size,
        )


def overflow_candidates(plan: QuantPlan) -> list[LayerPlan]:
    """Layers onnxruntime runs with an 8-bit GEMM whose pair sums can saturate int16 on x86
    without VNNI: quantized Conv/Gemm/MatMul with 8-bit activations and 8-bit constant weights."""
    out = []
    for lp in plan.layers.values():
        tp = plan.tensors.get(lp.weight) if lp.weight is not None else None
        if (
            lp.quantized
            and not lp.act_dynamic  # quantized at run time: no calibrated input grid to emulate
            and handler(lp.op_type).pair_sums is not None
            and tp is not None
            and tp.bits == 8
            and lp.act_bits == 8
            and lp.act_inputs
            and lp.act_inputs[0] in plan.tensors
        ):
            out.append(lp)
    return out


def apply_overflow_guard(g: Graph, plan: QuantPlan) -> list[str]:
    """Mark the weights of every layer whose overflow setting is ``guard`` pair-safe (a weight
    shared with an unguarded layer too: the guard wins), so that ``assign_qparams`` widens the
    scales of the channels that need it. Returns the weights newly marked."""
    changed = []
    for lp in overflow_candidates(plan) + dynamic_pair_sum_layers(plan):
        tp = plan.tensors[lp.weight]  # type: ignore[index]
        if lp.overflow == "guard" and tp.pair_safe_axis is None:
            h = handler(lp.op_type)
            assert h.weight_axis is not None
            tp.pair_safe_axis = h.weight_axis(
                node_attrs(g.node_by_name[lp.name]), len(g.initializers[tp.name].dims)
            )
            changed.append(tp.name)
    return changed


def _drop_constant_operand_elementwise(plan: QuantPlan, forced: set[str]) -> None:
    """onnxruntime turns an Add/Mul into QLinearAdd/QLinearMul only when both operands are
    quantized tensors. One with a float constant operand (x + 3 and x / 6 of a hard-swish, a
    bias vector) would run in float between a dequantize and a quantize, which costs more than
    it gains (PITFALLS 8: PP-OCR rec ran at 0.89x the float model's speed with them quantized,
    1.11x without, at the same accuracy). A layer named exactly in the config with ``skip:
    false`` is quantized all the same."""
    for lp in plan.layers.values():
        if (
            handler(lp.op_type).elementwise
            and lp.quantized
            and lp.float_operand
            and lp.name not in forced
        ):
            lp.quantized = False
            lp.reason = (
                "a float constant operand: onnxruntime has no integer kernel for it, left float"
            )


def _drop_dead_end_elementwise(
    g: Graph, plan: QuantPlan, float_outputs: set[str], forced: set[str] = frozenset()
) -> None:
    """An Add/Mul whose output reaches no quantized layer (through transparent ops) gains no
    integer kernel; quantizing its inputs and output only adds error. The typical case is the
    residual Add before a LayerNorm in a transformer, whose outlier channels wreck a per-tensor
    grid. Decided in reverse graph order, so chains of such ops are found. A layer named exactly
    in the config with ``skip: false`` is quantized all the same (the user asked for it)."""

    def reaches_quantized(t: str, seen: set[str]) -> bool:
        if t in seen:
            return False
        seen.add(t)
        for c in g.consumers.get(t, []):
            lp = plan.layers.get(c.name)
            if lp is not None and lp.quantized:
                return True
            h = handler(c.op_type)
            if h.kind == Kind.TRANSPARENT and c.input and c.input[h.data_input] == t:
                if any(
                    reaches_quantized(o, seen) for o in c.output if o and o not in float_outputs
                ):
                    return True
        return False

    for lp in reversed(list(plan.layers.values())):
        if not handler(lp.op_type).elementwise or not lp.quantized or lp.name in forced:
            continue
        if not any(reaches_quantized(o, set()) for o in lp.outputs if o not in float_outputs):
            lp.quantized = False
            lp.reason = "output reaches no quantized layer: no integer kernel to gain, left float"


def _maxn(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def _minn(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def _bias_quantizable(
    g: Graph, node: onnx.NodeProto, attrs: Mapping[str, object], w: str, b: str, per_channel: bool
) -> bool:
    if g.elem_type(b) != onnx.TensorProto.FLOAT:
        return False
    channels = bias_channels(node.op_type, attrs, tuple(g.initializers[w].dims))
    if channels is None:
        return False
    # Gemm: y = alpha * A * B + beta * C; an int32 bias on the s_in * s_w grid needs both at 1
    if float(attrs.get("alpha", 1.0)) != 1.0 or float(attrs.get("beta", 1.0)) != 1.0:  # type: ignore[arg-type]
        return False
    return tuple(g.initializers[b].dims) == (channels[1],)


def _flops(
    g: Graph,
    node: onnx.NodeProto,
    attrs: Mapping[str, object],
    info: Mapping[str, TensorInfo],
    w: str | None,
) -> int:
    h = handler(node.op_type)
    if h.flops is None:
        return 0

    def shape(t: str):
        if not t:
            return None
        if g.is_constant(t):
            return tuple(g.initializers[t].dims)
        ti = info.get(t)
        if ti is not None:
            return ti.shape
        s = g.shape(t)
        return s if s is not None and all(isinstance(d, int) for d in s) else None

    view = NodeView(
        attrs=attrs,
        input_shapes=[shape(i) for i in node.input],
        output_shapes=[shape(o) for o in node.output],
        weight_shape=tuple(g.initializers[w].dims) if w else None,
    )
    return int(h.flops(view))
