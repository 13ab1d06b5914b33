"""FLOPs and bitops per layer (DESIGN.md §3): bitops = FLOPs x activation bits x weight bits,
FLOPs counted as 2 x MACs. Float layers count as 32 x 32; the reference is every layer at INT8."""

from __future__ import annotations

from dataclasses import dataclass

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
