"""Layers quantized at run time rather than on a calibrated grid: dynamic activations
(DynamicQuantizeLinear + MatMulInteger) and block-wise INT4 weights (MatMulNBits). Which layers
of a plan they are, what must stay float around them for onnxruntime's fusions, their overflow
guard, and why a layer the config asked them of has not got them."""

from __future__ import annotations

from amq.config import LayerSettings
from amq.graph.model import Graph
from amq.plan import LayerPlan, QuantPlan
from amq.quant.registry import Kind, handler


def block_written(g: Graph, plan: QuantPlan) -> set[str]:
    """What block-wise layers write, and what ops that move values (Transpose, Reshape, ...)
    make of it: onnxruntime fuses a blocked DQ + MatMul into MatMulNBits only when no
    QuantizeLinear reads the MatMul's output, and it moves a QuantizeLinear after a Transpose up
    before it. These tensors stay float (their readers read float)."""
    todo = [o for lp in plan.layers.values() if lp.quantized and lp.block_size for o in lp.outputs]
    out: set[str] = set()
    while todo:
        t = todo.pop()
        if t in out:
            continue
        out.add(t)
        for c in g.consumers.get(t, []):
            h = handler(c.op_type)
            if h.kind == Kind.TRANSPARENT and c.input and c.input[h.data_input] == t:
                todo.extend(o for o in c.output if o)
    return out


def runtime_quant_note(lp: LayerPlan, s: LayerSettings) -> str:
    """Why a layer the config asks block-wise weights or dynamic activations of has not got
    them (the resolved config's notes); "" when it has them or was not asked."""
    if not lp.quantized:
        return ""
    h = handler(lp.op_type)
    if s.block_size and not lp.block_size and lp.weight is not None:
        return (
            f"{lp.name}: block_size {s.block_size} is for a MatMul with a constant 2-D weight "
            f"at 4 bits: per channel here ({lp.op_type}, {lp.weight_bits} bits)"
        )
    if s.act_dynamic and not lp.act_dynamic and not lp.block_size and h.dynamic_activations:
        return (
            f"{lp.name}: dynamic activations are for a MatMul/Gemm with a constant 2-D 8-bit "
            "weight (Gemm without transA): calibrated here"
        )
    return ""


# paraphrase-MiniLM-L3-v2, all MatMuls dynamic: unguarded, 23.06 dB SQNR on VNNI and 4.46 dB
# less on AVX2 (qemu); guarded, 22.80 dB on VNNI and 0.02 dB less on AVX2
DYNAMIC_GUARD_NOTE = (
    "dynamic activations span the whole uint8 grid in every batch (no grid to emulate before "
    "run time): guarded on every machine"
)


def dynamic_pair_sum_layers(plan: QuantPlan) -> list[LayerPlan]:
    """Dynamic layers onnxruntime runs with the same uint8 x int8 GEMM (DynamicQuantizeMatMul),
    whose pair sums saturate on x86 without VNNI: ``auto`` guards them (there is no grid to
    emulate before run time, and the batch's codes span all of 0..255), ``off`` does not."""
    return [
        lp
        for lp in plan.layers.values()
        if lp.quantized
        and lp.act_dynamic
        and handler(lp.op_type).pair_sums is not None
        and lp.weight in plan.tensors
        and plan.tensors[lp.weight].bits == 8
    ]
