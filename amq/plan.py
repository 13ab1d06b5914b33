"""QuantPlan: what is quantized and how, per layer and per tensor; serialisable (qparams.json).

Calibration, sensitivity, search and the QAT handoff all produce or consume this one object;
writing Q/DQ nodes is a pure function of a QuantPlan and a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

PLAN_VERSION = 1
FLOAT_BITS = 32  # what a float tensor counts as in bitops


@dataclass
class LayerPlan:
    name: str
    op_type: str
    quantized: bool
    reason: str = ""  # why it stays float (when not quantized) or a note
    weight_bits: int | None = None  # None: no constant weight
    act_bits: int = 8
    per_channel: bool = True
    act_symmetric: bool = False
    weight: str | None = None  # initializer name of the weight
    bias: str | None = None
    act_inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    flops: int = 0
    params: int = 0
    float_operand: bool = False  # a data input is a float constant that is not quantized
    # int16 pair-sum saturation on x86 without VNNI (PITFALLS 9): the config's setting (auto |
    # guard | off) until decided, then guard or off ("" where no such kernel runs the layer);
    # the measured reason when auto decided
    overflow: str = ""
    overflow_note: str = ""
    # the input is quantized at run time (DynamicQuantizeLinear: 8 bits from each batch's own
    # min/max), no calibrated grid; its weight int8
    act_dynamic: bool = False
    # its weight is 4-bit block-wise along K (0: not): onnxruntime runs it as MatMulNBits, whose
    # kernel quantizes the float input to int8 per block (accuracy_level 4)
    block_size: int = 0


@dataclass
class TensorPlan:
    """Quantization of one tensor. Activations of one group share the root's parameters."""

    name: str
    role: str  # activation | weight | bias
    bits: int
    signed: bool
    symmetric: bool
    narrow: bool = False
    axis: int | None = None
    scale: list[float] = field(default_factory=list)
    zero_point: list[int] = field(default_factory=list)
    root: str | None = None  # activation: the observed tensor whose grid this one shares
    clamp: tuple[float | None, float | None] | None = None  # ahead-relu transform of the root stats
    range: tuple[float, float] | None = None  # activation: calibrated [lo, hi]
    method: str = ""
    consumers: list[str] = field(default_factory=list)  # quantized layers reading this tensor
    producer: str | None = None  # quantized layer writing this tensor
    via: str | None = None  # activation: joined its group through this transparent op type
    # weight under the overflow guard: the output-channel axis along whose channels every pair of
    # codes the x86 kernel adds in one int16 is kept within PAIR_LIMIT (quant.overflow)
    pair_safe_axis: int | None = None
    # weight: blocks of this many along ``axis`` (the reduction axis K of a [K, N] weight), each
    # with its own scale; ``scale`` then holds [ceil(K / block_size), N] row-major (0: not blocked)
    block_size: int = 0
    # bias: added to the float bias before it is quantized (bias correction, per output channel)
    correction: list[float] = field(default_factory=list)
    # weight: per output channel (one value per tensor), the clipping ratio scale search chose:
    # scale = ratio x absmax / qmax (quant/algorithms/scale_search.py)
    clip: list[float] = field(default_factory=list)
    # weight: AdaRound's rounding, one "up from floor" bit per value, packed and base64
    # (quant/algorithms/adaround.py); "" = to nearest
    rounding: str = ""

    @property
    def grid(self) -> str:
        return f"{'int' if self.signed else 'uint'}{self.bits}"


@dataclass
class QuantPlan:
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    tensors: dict[str, TensorPlan] = field(default_factory=dict)
    float_tensors: dict[str, str] = field(default_factory=dict)  # kept float on purpose: reason
    float_ops: dict[str, str] = field(default_factory=dict)  # node name -> why it stays float
    notes: list[str] = field(default_factory=list)
    # the plans of the If branches and Loop bodies of this graph, each a model of its own:
    # "<node name>.<then|else|body>"
    branches: dict[str, QuantPlan] = field(default_factory=dict)
    # float ops with real compute (LSTM, GRU, RNN): node name -> FLOPs, counted at 32 x 32 bits
    float_flops: dict[str, int] = field(default_factory=dict)

    def layer_bits(self, lp: LayerPlan) -> tuple[int, int]:
        """(activation bits, weight-side bits) that a layer actually computes with: the bits of
        its quantized inputs (32 where float). A layer without constant weights multiplies its
        first input by its second, so the second input's bits take the weight's place."""
        if not lp.quantized:
            return FLOAT_BITS, FLOAT_BITS
        if lp.act_dynamic or lp.block_size:  # int8 input quantized at run time
            w = self.tensors[lp.weight].bits if lp.weight in self.tensors else FLOAT_BITS
            return 8, w
        ins = [self.tensors[t].bits if t in self.tensors else FLOAT_BITS for t in lp.act_inputs]
        a = ins[0] if ins else FLOAT_BITS
        if lp.weight is not None:
            w = self.tensors[lp.weight].bits if lp.weight in self.tensors else FLOAT_BITS
        else:  # two operands: the second's bits; a float constant operand computes at 32
            w = ins[1] if len(ins) > 1 else (FLOAT_BITS if lp.float_operand else a)
        return a, w

    def flat(self) -> QuantPlan:
        """This plan with its branches' (nested ones too) in one set of tables, for reports and
        qparams.json. A name both quantize on their own grids (a weight the main graph and a
        branch share) is listed twice: the branch's as NAME@<If name>.<branch>."""
        if not self.branches:
            return self
        out = QuantPlan(
            dict(self.layers),
            dict(self.tensors),
            dict(self.float_tensors),
            dict(self.float_ops),
            list(self.notes),
            float_flops=dict(self.float_flops),
        )
        for where, sub in self.branches.items():
            sub = sub.flat()
            for mine, theirs in (
                (out.layers, sub.layers),
                (out.tensors, sub.tensors),
                (out.float_tensors, sub.float_tensors),
                (out.float_ops, sub.float_ops),
                (out.float_flops, sub.float_flops),
            ):
                for k, v in theirs.items():
                    mine[k if k not in mine else f"{k}@{where}"] = v
        return out

    def activation_roots(self) -> list[str]:
        """Tensors whose statistics the plan needs (sorted, deterministic)."""
        return sorted({t.root or t.name for t in self.tensors.values() if t.role == "activation"})

    def max_bits(self) -> int:
        bits = [t.bits for t in self.tensors.values() if t.role != "bias"]
        return max(bits, default=8)

    def uses_bits(self, *bits: int) -> bool:
        return any(t.bits in bits for t in self.tensors.values() if t.role != "bias")

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            # the overflow measurement is a note of the run that decided, not part of the plan
            # (the resolved config gives the decision, and reproduces the same qparams.json)
            "layers": {
                k: {f: x for f, x in _fields(v).items() if f != "overflow_note"}
                for k, v in self.layers.items()
            },
            "tensors": {k: {**_fields(v), "grid": v.grid} for k, v in self.tensors.items()},
            "float_tensors": dict(self.float_tensors),
            "float_ops": dict(self.float_ops),
            "float_flops": dict(self.float_flops),
            "notes": list(self.notes),
            "branches": {k: v.to_dict() for k, v in self.branches.items()},
        }

    def to_json(self) -> str:
        """One line per layer and per tensor (json's C encoder writes each line; its indenting
        encoder is pure Python and costs milliseconds on a small model)."""
        d = self.to_dict()
        parts = []
        for key, value in d.items():
            if isinstance(value, dict) and value:
                rows = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items())
                parts.append(f" {json.dumps(key)}: {{\n{rows}\n }}")
            else:
                parts.append(f" {json.dumps(key)}: {json.dumps(value)}")
        return "{\n" + ",\n".join(parts) + "\n}"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantPlan:
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"qparams version {d.get('version')!r} is not {PLAN_VERSION}")
        tensors = {}
        for k, v in d["tensors"].items():
            v = {kk: vv for kk, vv in v.items() if kk != "grid"}
            for key in ("clamp", "range"):
                if v.get(key) is not None:
                    v[key] = tuple(v[key])
            tensors[k] = TensorPlan(**v)
        return cls(
            layers={k: LayerPlan(**v) for k, v in d["layers"].items()},
            tensors=tensors,
            float_tensors=dict(d.get("float_tensors", {})),
            float_ops=dict(d.get("float_ops", {})),
            notes=list(d.get("notes", [])),
            float_flops={k: int(v) for k, v in d.get("float_flops", {}).items()},
            branches={k: cls.from_dict(v) for k, v in d.get("branches", {}).items()},
        )

    @classmethod
    def from_json(cls, text: str) -> QuantPlan:
        return cls.from_dict(json.loads(text))


# fields written only when set: plans without them keep their bytes (and golden hashes)
_OPTIONAL: dict[str, Any] = {
    "act_dynamic": False,
    "block_size": 0,
    "correction": [],
    "clip": [],
    "rounding": "",
}


def _fields(obj: Any) -> dict[str, Any]:
    """A dataclass of plain values as a dict (lists copied): what ``asdict`` gives, without its
    recursive deep copy."""
    return {
        f.name: (list(v) if isinstance(v, list) else v)
        for f in fields(obj)
        for v in (getattr(obj, f.name),)
        if not (f.name in _OPTIONAL and v == _OPTIONAL[f.name])
    }
