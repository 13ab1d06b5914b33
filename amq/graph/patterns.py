"""Graph patterns: BatchNorm folding and the structural facts the planner needs. onnx only."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from amq.graph.model import Graph, NameScope, all_names, drop_unused_initializers, names_read
from amq.graph.subgraphs import constant_names


@dataclass(frozen=True)
class FoldedBN:
    bn: str
    into: str


def set_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(value, name))
            return
    model.graph.initializer.append(numpy_helper.from_array(value, name))


# (op type, attributes, weight shape) -> (the weight's output-channel axis, output channels) of
# an op computing x (input 0) times a weight (input 1) plus one bias value per output channel
# (input 2); None for any other op. The one in use is amq.quant.registry.bias_channels: graph/
# sits below quant/ in the import order, so the op facts are passed in.
ChannelsOf = Callable[[str, Mapping[str, object], tuple[int, ...]], tuple[int, int] | None]


def fold_batchnorm(model: onnx.ModelProto, channels: ChannelsOf) -> list[FoldedBN]:
    """Fold inference-mode BatchNormalization into the op before it (Conv, ConvTranspose, Gemm:
    the ops ``channels`` knows), when that node's output feeds only the BN and weights/BN
    parameters are constants. In place.

    Conv:  W' = W * g / sqrt(v + eps) (per output channel), b' = (b - m) * g / sqrt(v + eps) + beta.
    """
    folded: list[FoldedBN] = []
    scope = NameScope(all_names(model))
    g = Graph(model)
    removed: set[object] = set()
    stale: set[str] = set()  # the tensors between op and BN: their value_info is stale now
    for bn in g.nodes:
        if bn.op_type != "BatchNormalization" or len(bn.output) > 1 and any(bn.output[1:]):
            continue
        prev = g.producer.get(bn.input[0])
        old = _fold_into(g, scope, prev, bn, channels) if prev is not None else None
        if old is None:
            continue
        stale.add(old)
        removed.add(bn.name or id(bn))
        folded.append(FoldedBN(bn=bn.name, into=prev.name))  # type: ignore[union-attr]
    if folded:
        keep = [n for n in model.graph.node if (n.name or id(n)) not in removed]
        del model.graph.node[:]
        model.graph.node.extend(keep)
        drop_unused_initializers(model)
        vi = [v for v in model.graph.value_info if v.name not in stale]
        del model.graph.value_info[:]
        model.graph.value_info.extend(vi)
    return folded


def _fold_into(
    g: Graph, scope: NameScope, prev: onnx.NodeProto, bn: onnx.NodeProto, channels: ChannelsOf
) -> str | None:
    """Fold ``bn`` into ``prev`` (new weight and bias initializers; ``prev`` now produces what
    ``bn`` produced). Returns the tensor between them, None when the fold does not apply."""
    x = bn.input[0]
    if len(g.consumers.get(x, [])) != 1 or x in g.output_names:
        return None
    if not all(g.is_constant(n) for n in bn.input[1:5]):
        return None
    if len(prev.input) < 2 or not g.is_constant(prev.input[1]):
        return None
    has_bias = len(prev.input) > 2 and bool(prev.input[2])
    if has_bias and not g.is_constant(prev.input[2]) or g.attr(prev, "transA", 0):
        return None
    w = g.array(prev.input[1]).astype(np.float64)
    attrs = {a.name: helper.get_attribute_value(a) for a in prev.attribute}
    got = channels(prev.op_type, attrs, tuple(w.shape))
    if got is None:
        return None
    axis, c = got
    gamma, beta, mean, var = (g.array(n).astype(np.float64) for n in bn.input[1:5])
    if gamma.shape != (c,):
        return None
    k = gamma / np.sqrt(var + float(g.attr(bn, "epsilon", 1e-5)))
    shape = [1] * w.ndim
    shape[axis] = -1
    b = g.array(prev.input[2]).astype(np.float64) if has_bias else np.zeros(c)
    if has_bias and b.size == 1:
        b = np.full(c, float(b.reshape(-1)[0]))
    if b.shape != (c,):
        return None
    # Gemm: y = alpha*A*B + beta*C; fold into B (scaled) and C (so beta stays valid)
    beta_g = float(g.attr(prev, "beta", 1.0))
    b_new = (beta_g * b - mean) * k + beta
    w_name = scope.new(f"{prev.input[1]}_bnfold")
    b_name = scope.new(f"{prev.input[2] if has_bias else prev.name + '.bias'}_bnfold")
    set_initializer(g.model, w_name, (w * k.reshape(shape)).astype(np.float32))
    set_initializer(g.model, b_name, (b_new / beta_g if beta_g else b_new).astype(np.float32))
    new_inputs = [prev.input[0], w_name, b_name]
    del prev.input[:]
    prev.input.extend(new_inputs)
    old = prev.output[0]
    prev.output[0] = bn.output[0]  # prev now produces what BN produced
    return old


def _channel_constant(
    g: Graph, node: onnx.NodeProto, into: Collection[str]
) -> tuple[onnx.NodeProto, np.ndarray] | None:
    """(the Conv, the constant per output channel [Cout]) when ``node`` (an Add or Mul of two
    inputs) combines the output of a Conv of ``into``, read by it alone, with a constant that
    broadcasts along the channel axis only (or a scalar); else None."""
    if len(node.input) != 2:
        return None
    for i in (0, 1):
        x, c = node.input[i], node.input[1 - i]
        conv = g.producer.get(x)
        if conv is None or conv.op_type not in into or not g.is_constant(c):
            continue
        if len(g.consumers.get(x, [])) != 1 or x in g.output_names:
            continue
        if len(conv.input) < 2 or not g.is_constant(conv.input[1]):
            continue
        if len(conv.input) > 2 and conv.input[2] and not g.is_constant(conv.input[2]):
            continue
        w = g.array(conv.input[1])
        channels, rank = w.shape[0], w.ndim  # the output has the weight's rank
        v = g.array(c).astype(np.float64)
        if v.ndim > rank:
            continue
        shape = (1,) * (rank - v.ndim) + v.shape
        if any(d != 1 for k, d in enumerate(shape) if k != 1) or shape[1] not in (1, channels):
            continue
        if len(conv.input) > 2 and conv.input[2] and g.array(conv.input[2]).size != channels:
            continue
        return conv, np.broadcast_to(v.reshape(-1), (channels,)).copy()
    return None


def _fold_channel_op(model: onnx.ModelProto, op: str, into: Collection[str]) -> list[str]:
    """Fold each ``op`` (Add: into the bias; Mul: into the weight and the bias) of a per-channel
    constant that follows a Conv of ``into`` (see _channel_constant). In place; returns the
    nodes folded."""
    g = Graph(model)
    scope = NameScope(all_names(model))
    removed: set[str] = set()
    folded: list[str] = []
    for node in g.nodes:
        found = _channel_constant(g, node, into) if node.op_type == op else None
        if found is None:
            continue
        conv, v = found
        channels = v.size
        old = (
            g.array(conv.input[2]).astype(np.float64).reshape(-1)
            if len(conv.input) > 2 and conv.input[2]
            else np.zeros(channels)
        )
        w_name = conv.input[1]
        if op == "Add":
            bias = old + v
        else:  # y * v = (W * v) x + b * v, per output channel
            bias = old * v
            w = g.array(w_name).astype(np.float64)
            w_name = scope.new(f"{conv.name or conv.output[0]}.weight_mulfold")
            scaled = w * v.reshape((-1,) + (1,) * (w.ndim - 1))
            set_initializer(model, w_name, scaled.astype(np.float32))
        b_name = scope.new(f"{conv.name or conv.output[0]}.bias_{op.lower()}fold")
        set_initializer(model, b_name, bias.astype(np.float32))
        new_inputs = [conv.input[0], w_name, b_name]
        del conv.input[:]
        conv.input.extend(new_inputs)
        conv.output[0] = node.output[0]  # the Conv now produces what the node produced
        removed.add(node.name or str(id(node)))
        folded.append(node.name)
    if folded:
        keep = [n for n in model.graph.node if (n.name or str(id(n))) not in removed]
        del model.graph.node[:]
        model.graph.node.extend(keep)
        drop_unused_initializers(model)
    return folded


def fold_bias_add(model: onnx.ModelProto, into: Collection[str]) -> list[str]:
    """Fold an Add of a per-channel constant that follows a Conv (the Conv's output read by that
    Add alone) into the Conv's bias, as PaddlePaddle exports a conv bias: the Add would otherwise
    run in float between the QLinearConv's quantize and a dequantize. In place; returns the Adds
    folded. The constant must broadcast along the channel axis only (or be a scalar). ``into``:
    the op types it folds into, each with weight [Cout, ...], bias input 2 and output
    [N, Cout, ...] (amq.quant.registry.bias_add_ops: Conv)."""
    return _fold_channel_op(model, "Add", into)


def fold_scale_mul(model: onnx.ModelProto, into: Collection[str]) -> list[str]:
    """Fold a Mul of a per-channel constant that follows a Conv into its weight and bias (as
    fold_bias_add does an Add): PP-LCNetV3's learnable affine blocks (a scalar Mul and Add after
    each Conv) then leave the Conv's output as the tensor the activation reads, with no float
    ops between the QLinearConv and its reader. In place; returns the Muls folded."""
    return _fold_channel_op(model, "Mul", into)


def fold_constants(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> None:
    """In place: the tensors of ``values`` (computed from initializers alone) become
    initializers, the nodes that produced them are removed, and so is what only fed those nodes."""
    g = model.graph
    derived = constant_names(g)
    for name, value in values.items():
        set_initializer(model, name, np.asarray(value))
    keep = [n for n in g.node if not any(o in values for o in n.output)]
    while True:  # drop the constant nodes whose outputs nothing reads any more
        used = {o.name for o in g.output} | names_read(keep)
        pruned = [
            n
            for n in keep
            if any(o in used for o in n.output if o) or not all(o in derived for o in n.output if o)
        ]
        if len(pruned) == len(keep):
            break
        keep = pruned
    g.ClearField("node")
    g.node.extend(keep)
    drop_unused_initializers(model)


HARDSWISH_FLOOR = -3.0  # hardswish(x) = x * relu6(x + 3) / 6 is 0 for every x <= -3


def hardswish_only(
    g: Graph, t: str, bounds: Callable[[onnx.NodeProto], tuple[float | None, float | None] | None]
) -> bool:
    """Every reader of ``t`` computes hardswish(t), so that t's values below -3 never matter
    (its grid may start there, exactly): a HardSwish; or a gate - HardSigmoid (alpha 1/6, beta
    1/2), or Add(t, 3) -> Clip(0, 6) - and a Mul of ``t`` with the gate's output (the / 6 may
    come anywhere after). ``bounds(node)``: the (lo, hi) a Relu/Clip node clamps to."""
    readers = g.consumers.get(t, [])
    if not readers or t in g.output_names:
        return False
    if len(readers) == 1:
        return readers[0].op_type == "HardSwish"
    if len(readers) != 2:
        return False
    for gate, mul in (readers, readers[::-1]):
        if mul.op_type == "Mul" and t in mul.input:
            out = _hardswish_gate(g, t, gate, bounds)
            if out is not None and out in mul.input:
                return True
    return False


def _hardswish_gate(g: Graph, t: str, gate: onnx.NodeProto, bounds) -> str | None:
    """The output of hardsigmoid(t) or relu6(t + 3) computed from ``gate`` on; else None."""
    if gate.op_type == "HardSigmoid":
        a = {x.name: helper.get_attribute_value(x) for x in gate.attribute}
        alpha, beta = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))
        return gate.output[0] if abs(alpha - 1 / 6) < 1e-3 and abs(beta - 0.5) < 1e-6 else None
    if gate.op_type != "Add" or len(gate.input) != 2 or t not in gate.input:
        return None
    three = gate.input[1] if gate.input[0] == t else gate.input[0]
    if not g.is_constant(three) or g.array(three).size != 1:
        return None
    clip = g.consumers.get(gate.output[0], [])
    if float(g.array(three).reshape(-1)[0]) != 3.0 or len(clip) != 1:
        return None
    return clip[0].output[0] if bounds(clip[0]) == (0.0, 6.0) else None
