"""Activation tensors beyond the layer rules of the planner: which layer outputs need no Q/DQ
(nobody quantized reads them and the layer's integer kernel can give a float output), which take
a range known from their producer op (Softmax [0, 1]) instead of a calibrated one, and along which
axis a tensor's per-channel statistics are gathered. Facts about op types come from the registry."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Protocol

import onnx

from amq.graph.model import Graph, has_subgraphs, names_read
from amq.plan import QuantPlan, TensorPlan
from amq.quant.registry import (
    act_channel_axis,
    fixed_output_range,
    handler,
    output_channel_axis,
)

FIXED_METHOD = "fixed"  # an activation range known from its producer op, not calibrated


class TensorInfoLike(Protocol):
    shape: tuple[int, ...]


def node_attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def channel_axis(g: Graph, t: str, rank: int) -> int:
    """The axis of tensor ``t`` along which its per-channel statistics are gathered: the input
    channels of a layer that reads it (MatMul/Gemm input A: K, the last axis; input B: K, the
    next to last; Conv: axis 1; the registry's ``act_channel_axis``), else the output channels
    of the layer that writes it; -1 when neither says (rank 0, or no such op)."""
    if rank < 1:
        return -1
    for c in g.consumers.get(t, []):
        for i, x in enumerate(c.input):
            if x == t:
                a = act_channel_axis(c.op_type, i, node_attrs(c), rank)
                if a >= 0:
                    return a
    p = g.producer.get(t)
    if p is not None and handler(p.op_type).act_channel_axis:
        return output_channel_axis(p.op_type, rank)
    return -1


def drop_unread_float_outputs(
    g: Graph, info: Mapping[str, TensorInfoLike], plan: QuantPlan, model_outputs: set[str]
) -> None:
    """A group of activations that no quantized layer reads, written by layers whose integer
    kernel can give a float output (MatMul, Gemm: the registry's ``float_output``), gets no Q/DQ:
    onnxruntime runs the layer as MatMulIntegerToFloat or QGemm with float output, and the
    Q/DQ would only clip and round it. In a transformer these are the Q/K/V and FFN MatMul
    outputs that feed float bias and residual Adds, whose outlier channels (100x the median
    channel after the FFN) a per-tensor grid cannot hold (paraphrase-MiniLM-L3-v2: SQNR 13.8 ->
    20.9 dB, cosine 0.979 -> 0.996). A model output the config quantizes keeps its Q/DQ, and
    so does a 2-D output of a layer whose bias Add onnxruntime folds into it first (MatMul +
    Add -> Gemm with a float bias, which no integer kernel takes: PP-OCR cls's classifier), and
    so does one that an If/Loop/Scan reads (its bodies are planned apart)."""
    sub = _subgraph_reads(g)
    members: dict[str, list[TensorPlan]] = defaultdict(list)
    for tp in plan.tensors.values():
        if tp.role == "activation":
            members[tp.root or tp.name].append(tp)
    for mem in members.values():
        if any(tp.consumers or tp.name in model_outputs for tp in mem):
            continue
        writers = [plan.layers[tp.producer] for tp in mem if tp.producer]
        if any(_bias_fuses(g, info, tp.name) or tp.name in sub for tp in mem):
            continue
        if writers and all(handler(lp.op_type).float_output for lp in writers):
            for tp in mem:
                del plan.tensors[tp.name]


def _subgraph_reads(g: Graph) -> set[str]:
    """Names the If/Loop/Scan bodies of the graph read (outer-scope reads included): their
    branches quantize them on grids of their own, planned apart, and the main graph keeps its
    Q/DQ on them as it was."""
    return names_read(n for n in g.nodes if has_subgraphs(n))


def _bias_fuses(g: Graph, info: Mapping[str, TensorInfoLike], t: str) -> bool:
    """``t`` is a 2-D output of a layer with a bias-Add fusion (registry ``fusions``), read by
    such an Add: onnxruntime merges the two into a Gemm with a float bias before it looks at
    the Q/DQ, and then runs it in float unless the output is quantized."""
    p = g.producer.get(t)
    ti = info.get(t)
    if p is None or ti is None or len(ti.shape) != 2:
        return False
    readers = {c.op_type for c in g.consumers.get(t, [])}
    return any(f.constant_operand and readers & set(f.readers) for f in handler(p.op_type).fusions)


def known_range(plan: QuantPlan, root: str) -> tuple[float, float] | None:
    """The range of a group whose root's producer fixes it (``fix_known_ranges``), None for a
    calibrated one: its grid needs no statistics, so the calibration pass does not observe it
    (57 Sigmoid outputs of a YOLOv8n, each a ReduceMin, a GlobalMaxPool and a subsample)."""
    tp = plan.tensors.get(root)
    if tp is None or tp.method != FIXED_METHOD or tp.range is None:
        return None
    return tp.range


def calibrated_roots(plan: QuantPlan) -> list[str]:
    """The plan's activation roots whose grids come from statistics (sorted)."""
    return [r for r in plan.activation_roots() if known_range(plan, r) is None]


def fix_known_ranges(g: Graph, plan: QuantPlan) -> None:
    """A group whose root is the output of an op with a known output range (Softmax: [0, 1])
    takes that range, not a calibrated one (method ``fixed``; assign_qparams keeps it): softmax
    x V reads probabilities on an unsigned grid with zero point 0 and scale 1/255 at 8 bits."""
    for tp in plan.tensors.values():
        if tp.role != "activation" or (tp.root or tp.name) != tp.name:
            continue
        node = g.producer.get(tp.name)
        fixed = fixed_output_range(node.op_type) if node is not None else None
        if fixed is not None:
            tp.range, tp.method = fixed, FIXED_METHOD
