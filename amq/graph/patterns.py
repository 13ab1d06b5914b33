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


def _set_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
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
    _set_initializer(g.model, w_name, (w * k.reshape(shape)).astype(np.float32))
    _set_initializer(g.model, b_name, (b_new / beta_g if beta_g else b_new).astype(np.float32))
    new_inputs = [prev.input[0], w_name, b_name]
    del prev.input[:]
    prev.input.extend(new_inputs)
    old = prev.output[0]
    prev.output[0] = bn.output[0]  # prev now produces what BN produced
    return old


def fold_bias_add(model: onnx.ModelProto, into: Collection[str]) -> list[str]:
    """Fold an Add of a per-channel constant that follows a Conv (the Conv's output read by that
    Add alone) into the Conv's bias, as PaddlePaddle exports a conv bias: the Add would otherwise
    run in float between the QLinearConv's quantize and a dequantize. In place; returns the Adds
    folded. The constant must broadcast along the channel axis only (or be a scalar). ``into``:
    the op types it folds into, each with weight [Cout, ...], bias input 2 and output
    [N, Cout, ...] (amq.quant.registry.bias_add_ops: Conv)."""
    g = Graph(model)
    scope = NameScope(all_names(model))
    removed: set[str] = set()
    folded: list[str] = []
    for add in g.nodes:
        if add.op_type != "Add" or len(add.input) != 2:
            continue
        for i in (0, 1):
            x, c = add.input[i], add.input[1 - i]
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
            add_b = np.broadcast_to(v.reshape(-1), (channels,))
            old = (
                g.array(conv.input[2]).astype(np.float64).reshape(-1)
                if len(conv.input) > 2 and conv.input[2]
                else np.zeros(channels)
            )
            if old.size != channels:
                continue
            b_name = scope.new(f"{conv.name or conv.output[0]}.bias_addfold")
            _set_initializer(model, b_name, (old + add_b).astype(np.float32))
            new_inputs = [conv.input[0], conv.input[1], b_name]
            del conv.input[:]
            conv.input.extend(new_inputs)
            conv.output[0] = add.output[0]  # the Conv now produces what the Add produced
            removed.add(add.name or str(id(add)))
            folded.append(add.name)
            break
    if folded:
        keep = [n for n in model.graph.node if (n.name or str(id(n))) not in removed]
        del model.graph.node[:]
        model.graph.node.extend(keep)
        drop_unused_initializers(model)
    return folded


def fold_constants(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> None:
    """In place: the tensors of ``values`` (computed from initializers alone) become
    initializers, the nodes that produced them are removed, and so is what only fed those nodes."""
    g = model.graph
    derived = constant_names(g)
    for name, value in values.items():
        _set_initializer(model, name, np.asarray(value))
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
