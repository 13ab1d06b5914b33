"""The one declarative registry of op handlers (DESIGN.md rule 3).

Each op type is described once: its kind, which inputs carry weights and biases, the output-channel
axis of its weights, whether its output can share its input's quantization grid or holds exactly
its input's values, how it clamps values (for ahead-relu) and how many FLOPs it costs. Unknown op
types fall back to FLOAT (left float). Code elsewhere asks the registry instead of naming op types;
graph/ (below quant/ in the import order) gets what it needs passed in. tests/unit/test_registry.py
checks every entry against onnxruntime.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

Shape = Sequence[int]


class Kind(str, Enum):
    WEIGHTED = "weighted"  # Conv, Gemm, MatMul with a constant weight: weights and activations
    ACTIVATION = "activation"  # compute on activations only: Add, Mul, MatMul of two tensors, pools
    CONCAT = "concat"  # joins tensors: guarded against very different ranges
    TRANSPARENT = "transparent"  # moves or selects values: output shares the input's grid
    FLOAT = "float"  # left float


class Kernel(str, Enum):
    """How onnxruntime's 8-bit kernel adds pairs of products in int16 (PITFALLS 9; emulated in
    overflow.py): over each output position's window of the input, or rows times a [K, N]
    weight (the weight's output-channel axis last: Gemm's transB weight transposed)."""

    CONV = "conv"
    GEMM = "gemm"


@dataclass(frozen=True)
class NodeView:
    """What a handler may know about a node: attributes and shapes (None where unknown)."""

    attrs: Mapping[str, object]
    input_shapes: Sequence[Shape | None]
    output_shapes: Sequence[Shape | None]
    weight_shape: Shape | None = None


def _prod(s: Shape | None) -> int:
    return int(math.prod(int(d) for d in s)) if s is not None else 0


def _flops_conv(v: NodeView) -> int:
    out, w = v.output_shapes[0], v.weight_shape
    if out is None or w is None:
        return 0
    return 2 * _prod(out) * _prod(w[1:])  # W: [Cout, Cin/group, k...]


def _flops_convtranspose(v: NodeView) -> int:
    x, w = v.input_shapes[0], v.weight_shape
    if x is None or w is None:
        return 0
    return 2 * _prod(x) * _prod(w[1:])  # W: [Cin, Cout/group, k...]


def _flops_gemm(v: NodeView) -> int:
    out, a = v.output_shapes[0], v.input_shapes[0]
    if out is None or a is None:
        return 0
    k = a[0] if v.attrs.get("transA", 0) else a[-1]
    return 2 * _prod(out) * int(k)


def _flops_matmul(v: NodeView) -> int:
    out, a = v.output_shapes[0], v.input_shapes[0]
    if out is None or a is None:
        return 0
    return 2 * _prod(out) * int(a[-1])


def _flops_elementwise(v: NodeView) -> int:
    return _prod(v.output_shapes[0]) if v.output_shapes and v.output_shapes[0] is not None else 0


def _flops_pool(v: NodeView) -> int:
    x = v.input_shapes[0] if v.input_shapes else None
    return _prod(x) if x is not None else 0


def _flops_recurrent(v: NodeView) -> int:
    """LSTM/GRU/RNN: every step of every direction multiplies [x, h] by all gates' weights."""
    if len(v.input_shapes) < 3:
        return 0
    x, w, r = v.input_shapes[0], v.input_shapes[1], v.input_shapes[2]
    if x is None or w is None or r is None or len(x) != 3 or len(w) != 3 or len(r) != 3:
        return 0
    steps, batch = (x[1], x[0]) if v.attrs.get("layout", 0) else (x[0], x[1])
    return 2 * int(steps) * int(batch) * int(w[0]) * int(w[1]) * (int(w[2]) + int(r[2]))


Bounds = tuple[float | None, float | None]  # (lo, hi); None: unbounded


@dataclass(frozen=True)
class Clamp:
    """The op's output is its input clamped to [lo, hi]. ``bounds``: the bounds by default;
    ``attrs``: the attributes that set (lo, hi) (Clip before opset 11); ``inputs``: the indices of
    the optional scalar inputs that set them (Clip from opset 11 on)."""

    bounds: Bounds = (None, None)
    attrs: tuple[str, str] | None = None
    inputs: tuple[int, int] | None = None

    @property
    def fixed(self) -> bool:
        """The bounds are the same for every node (Relu): nothing of the node needs reading."""
        return self.attrs is None and self.inputs is None


def _axis_conv(attrs: Mapping[str, object], rank: int) -> int:
    return 0


def _axis_convtranspose(attrs: Mapping[str, object], rank: int) -> int:
    return 1


def _axis_gemm(attrs: Mapping[str, object], rank: int) -> int:
    return 0 if attrs.get("transB", 0) else 1


def _axis_matmul(attrs: Mapping[str, object], rank: int) -> int:
    return rank - 1


@dataclass(frozen=True)
class Fusion:
    """A pattern a fold or onnxruntime's fusions would merge: the op's output read by one node
    alone, of one of the ``readers`` op types (which also reads a constant, with
    ``constant_operand``). ``amq check`` reports it as ``name`` when the model leaves it unfused."""

    name: str
    readers: tuple[str, ...]
    detail: str
    constant_operand: bool = False


BN_FOLD = Fusion(
    "unfolded BatchNorm", ("BatchNormalization",), "fold it (amq does with fold_batchnorm: true)"
)
CONV_ACTIVATION = Fusion(
    "Conv + activation",
    ("Relu", "Clip", "LeakyRelu", "HardSwish", "Sigmoid"),
    "fusable; the activation shares the Conv's output grid",
)
MATMUL_BIAS = Fusion(
    "MatMul + bias Add",
    ("Add",),
    "a Gemm (or fused MatMul+bias) would keep the bias in int32",
    constant_operand=True,
)


@dataclass(frozen=True)
class OpHandler:
    op_type: str
    kind: Kind
    act_inputs: tuple[int, ...] = (0,)  # inputs quantized as activations (when not constant)
    weight_input: int | None = None  # constant input quantized as weights
    bias_input: int | None = None  # constant input quantized to int32
    # (attributes, weight rank) -> the weight's output-channel axis: per-channel scales, BN folds
    weight_axis: Callable[[Mapping[str, object], int], int] | None = None
    data_input: int = 0  # for TRANSPARENT: the input whose values flow to the outputs
    exact_share: bool = True  # TRANSPARENT: output values are a subset of input values
    clamp: Clamp | None = None  # Relu / Clip: output is the input clamped (ahead-relu)
    # TRANSPARENT: the output holds exactly the input's values, each as often (a permutation or
    # a reshape): its statistics are the input's, so it needs no observing of its own
    same_values: bool = False
    flops: Callable[[NodeView], int] | None = None
    note: str = ""
    # at INT8 onnxruntime runs it as a uint8 x int8 GEMM (MLAS) that adds pairs of products in a
    # saturating int16 on x86 without VNNI: a candidate for the overflow guard (PITFALLS 9)
    pair_sums: Kernel | None = None
    # with attribute group > 1 the output has group x weight.shape[axis] channels (ConvTranspose):
    # no slice of the weight per output channel
    group_multiplies_channels: bool = False
    fusions: tuple[Fusion, ...] = ()  # patterns starting at this op that ``amq check`` reports
    # onnxruntime's QLinearAdd / QLinearMul: an integer kernel only when both operands are
    # quantized tensors, and worth it only when the output reaches a quantized layer
    elementwise: bool = False
    # a constant per-output-channel Add after it (a bias exported apart, as PaddlePaddle does)
    # folds into its bias (amq.graph.patterns.fold_bias_add): weight [Cout, ...], output
    # [N, Cout, ...]
    bias_add_folds: bool = False
    # a weight of rank > 2 is a stack of [K, N] matrices, one per leading index (MatMul
    # broadcasts its batch axes); at 8 bits amq writes it as a blocked DequantizeLinear
    batched_weights: bool = False
    # with a constant 2-D weight, its input may be quantized at run time (activations: {dynamic:
    # true}): DynamicQuantizeLinear + MatMulInteger, which onnxruntime fuses into
    # DynamicQuantizeMatMul
    dynamic_activations: bool = False
    # a constant 2-D [K, N] weight may be 4-bit block-wise along K (weights: {block_size}):
    # a blocked DequantizeLinear onnxruntime fuses with the op into MatMulNBits
    block_weights: bool = False
    # onnxruntime runs it on integer inputs with a float output (MatMulIntegerToFloat, QGemm
    # without y_scale): an output no quantized layer reads needs no Q/DQ, which would only clip
    # and round it (a transformer's MatMul outputs, with their outlier channels, feed float Adds)
    float_output: bool = False
    # the axis of each activation input (by input index) along which the op reduces: its input
    # channels (per-channel statistics and outlier channels are counted along it); a negative
    # value counts from the last axis
    act_channel_axis: tuple[int, ...] = ()
    # the op's output lies in this range whatever its input (Softmax [0, 1]): a quantized reader
    # gets this grid instead of a calibrated one
    fixed_range: tuple[float, float] | None = None
    # a product of two activations neither of which has a fixed range (attention's Q x K^T)
    # gets activations of this many bits by default (target ort, 8-bit activations, no bits set
    # for the layer): each operand's per-tensor rounding multiplies the other's values, with no
    # per-channel weight scale to absorb their outlier channels. Measured on all-mpnet-base-v2:
    # pooled-embedding SQNR 16.9 -> 19.4 dB, NN agreement 0.941 -> 0.957, for +4% bitops at
    # sequence 64 (softmax x V at 8 bits: float would gain 0.1 dB)
    free_product_bits: int = 0


# A node whose doc_string is this starts an activation group of its own even when its op type is
# transparent: the Gather of an outlier split (amq/quant/algorithms/outlier_split.py) selects the
# few channels that must not share the grid of the tensor they come from.
OWN_GRID = "amq: own activation grid"


def _h(*hs: OpHandler) -> dict[str, OpHandler]:
    return {h.op_type: h for h in hs}


REGISTRY: dict[str, OpHandler] = _h(
    OpHandler(
        "Conv",
        Kind.WEIGHTED,
        (0,),
        1,
        2,
        _axis_conv,
        flops=_flops_conv,
        pair_sums=Kernel.CONV,
        act_channel_axis=(1,),
        fusions=(BN_FOLD, CONV_ACTIVATION),
        bias_add_folds=True,
    ),
    OpHandler(
        "ConvTranspose",
        Kind.WEIGHTED,
        (0,),
        1,
        2,
        _axis_convtranspose,
        flops=_flops_convtranspose,
        group_multiplies_channels=True,
        act_channel_axis=(1,),
        fusions=(BN_FOLD,),
    ),
    OpHandler(
        "Gemm",
        Kind.WEIGHTED,
        (0, 1),
        1,
        2,
        _axis_gemm,
        flops=_flops_gemm,
        pair_sums=Kernel.GEMM,
        fusions=(BN_FOLD,),
        dynamic_activations=True,
        float_output=True,
        act_channel_axis=(-1, 0),
    ),
    OpHandler(
        "MatMul",
        Kind.WEIGHTED,
        (0, 1),
        1,
        None,
        _axis_matmul,
        flops=_flops_matmul,
        pair_sums=Kernel.GEMM,
        fusions=(MATMUL_BIAS,),
        batched_weights=True,
        dynamic_activations=True,
        block_weights=True,
        float_output=True,
        act_channel_axis=(-1, -2),
        free_product_bits=16,
    ),
    OpHandler("Add", Kind.ACTIVATION, (0, 1), flops=_flops_elementwise, elementwise=True),
    OpHandler("Mul", Kind.ACTIVATION, (0, 1), flops=_flops_elementwise, elementwise=True),
    OpHandler("AveragePool", Kind.ACTIVATION, (0,), flops=_flops_pool),
    OpHandler("GlobalAveragePool", Kind.ACTIVATION, (0,), flops=_flops_pool),
    OpHandler("Concat", Kind.CONCAT, ()),  # act inputs: all of them
    OpHandler("Relu", Kind.TRANSPARENT, clamp=Clamp((0.0, None))),
    OpHandler("Clip", Kind.TRANSPARENT, clamp=Clamp((None, None), ("min", "max"), (1, 2))),
    OpHandler("MaxPool", Kind.TRANSPARENT),
    OpHandler("GlobalMaxPool", Kind.TRANSPARENT),
    OpHandler("Reshape", Kind.TRANSPARENT, same_values=True),
    OpHandler("Flatten", Kind.TRANSPARENT, same_values=True),
    OpHandler("Transpose", Kind.TRANSPARENT, same_values=True),
    OpHandler("Squeeze", Kind.TRANSPARENT, same_values=True),
    OpHandler("Unsqueeze", Kind.TRANSPARENT, same_values=True),
    OpHandler("Identity", Kind.TRANSPARENT, same_values=True),
    OpHandler("Slice", Kind.TRANSPARENT),
    OpHandler("Split", Kind.TRANSPARENT),
    OpHandler("Gather", Kind.TRANSPARENT),
    OpHandler("Expand", Kind.TRANSPARENT),
    OpHandler("Tile", Kind.TRANSPARENT),
    OpHandler("DepthToSpace", Kind.TRANSPARENT),
    OpHandler("SpaceToDepth", Kind.TRANSPARENT),
    OpHandler("Pad", Kind.TRANSPARENT, exact_share=False),  # adds the pad value (0 is on grid)
    OpHandler("Resize", Kind.TRANSPARENT, exact_share=False),  # linear modes interpolate in range
)

FLOAT_COMPUTE_NOTE = "no QDQ integer kernel in onnxruntime: left float, counted at 32 x 32 bits"
REGISTRY.update(
    _h(
        *(
            OpHandler(op, Kind.FLOAT, (), flops=_flops_recurrent, note=FLOAT_COMPUTE_NOTE)
            for op in ("LSTM", "GRU", "RNN")
        )
    )
)

# float ops whose output range is known whatever their input: a quantized reader of it gets that
# grid, not a calibrated one (Softmax: probabilities; Sigmoid (0, 1); Tanh (-1, 1))
REGISTRY.update(
    _h(
        OpHandler("Softmax", Kind.FLOAT, (), note="left float", fixed_range=(0.0, 1.0)),
        OpHandler("Sigmoid", Kind.FLOAT, (), note="left float", fixed_range=(0.0, 1.0)),
        OpHandler("Tanh", Kind.FLOAT, (), note="left float", fixed_range=(-1.0, 1.0)),
    )
)

FALLBACK = OpHandler("*", Kind.FLOAT, (), note="no handler: left float")

# ops that compute shapes, masks or casts, not values: float by nature (they go to FALLBACK), so
# ``amq check`` calls neither them nor a float one between quantized layers a finding
SHAPE_OPS = frozenset(
    ("Shape", "Constant", "ConstantOfShape", "Cast", "Range", "NonZero", "Equal", "Not")
)

QUANTIZABLE_KINDS = (Kind.WEIGHTED, Kind.ACTIVATION, Kind.CONCAT)


def handler(op_type: str) -> OpHandler:
    return REGISTRY.get(op_type, FALLBACK)


def clamp_bounds(
    op_type: str,
    attrs: Mapping[str, object],
    inputs: Sequence[str],
    const: Callable[[str], float | None],
) -> Bounds | None:
    """The bounds an op clamps its input to (see ``Clamp``); None when it clamps nothing or a
    bound is not constant. ``inputs``: the node's input names; ``const(name)``: the scalar value
    of a constant input, None when it is not constant."""
    c = handler(op_type).clamp
    if c is None:
        return None
    lo, hi = c.bounds
    if c.attrs is not None:
        lo, hi = attrs.get(c.attrs[0], lo), attrs.get(c.attrs[1], hi)
    for k, idx in enumerate(c.inputs or ()):
        if len(inputs) > idx and inputs[idx]:
            v = const(inputs[idx])
            if v is None:
                return None
            lo, hi = (v, hi) if k == 0 else (lo, v)
    return (None if lo is None else float(lo), None if hi is None else float(hi))  # type: ignore[arg-type]


def fixed_clamp(op_type: str) -> Bounds | None:
    """The bounds of an op that clamps to the same bounds whatever the node (Relu: (0, None)),
    None for any other op: its output's statistics follow from its input's."""
    c = handler(op_type).clamp
    return c.bounds if c is not None and c.fixed else None


def gemm_transposed(op_type: str, attrs: Mapping[str, object]) -> bool:
    """Whether an op run as a GEMM (``Kernel.GEMM``) stores its 2-D weight as [N, K], the
    output-channel axis first (Gemm with transB): the kernel's [K, N] is its transpose."""
    h = handler(op_type)
    return h.pair_sums is Kernel.GEMM and h.weight_axis is not None and h.weight_axis(attrs, 2) == 0


def bias_channels(
    op_type: str, attrs: Mapping[str, object], weight_shape: Sequence[int]
) -> tuple[int, int] | None:
    """(the weight's output-channel axis, output channels) of an op that adds a bias with one
    value per output channel, each channel one slice of the weight along that axis: the length a
    bias must have, and where a BatchNormalization after the op folds in
    (amq.graph.patterns.fold_batchnorm). None for any other op (MatMul: no bias input; a grouped
    ConvTranspose)."""
    h = handler(op_type)
    if h.bias_input is None or h.weight_axis is None:
        return None
    if h.group_multiplies_channels and int(attrs.get("group", 1)) != 1:  # type: ignore[call-overload]
        return None
    axis = h.weight_axis(attrs, len(weight_shape))
    if not 0 <= axis < len(weight_shape):
        return None
    return axis, int(weight_shape[axis])


def bias_add_ops() -> frozenset[str]:
    """Op types whose bias a following constant per-channel Add folds into."""
    return frozenset(op for op, h in REGISTRY.items() if h.bias_add_folds)


def batched_weight_ops() -> frozenset[str]:
    """Op types whose weight may be a stack of [K, N] matrices (rank > 2)."""
    return frozenset(op for op, h in REGISTRY.items() if h.batched_weights)


def act_channel_axis(op_type: str, input_index: int, attrs: Mapping[str, object], rank: int) -> int:
    """The axis of activation input ``input_index`` along which the op reduces (its input
    channels), in [0, rank); -1 when the registry has none for it (the caller picks one). Gemm's
    transA/transB swap which axis of A and B is K."""
    axes = handler(op_type).act_channel_axis
    if input_index >= len(axes) or rank < 1:
        return -1
    a = axes[input_index]
    if op_type == "Gemm" and attrs.get("transA" if input_index == 0 else "transB", 0):
        a = 0 if a != 0 else -1
    return a % rank


def output_channel_axis(op_type: str, rank: int) -> int:
    """The channel axis of a layer's output: axis 1 of a Conv's [N, C, ...], the last axis of a
    MatMul/Gemm's [..., N] (and of any other op's output)."""
    if rank < 1:
        return -1
    return 1 if handler(op_type).act_channel_axis == (1,) and rank >= 2 else rank - 1


def fixed_output_range(op_type: str) -> tuple[float, float] | None:
    """The range an op's output always lies in (Softmax [0, 1]), None when not known."""
    return handler(op_type).fixed_range


def known_op_types() -> list[str]:
    return sorted(REGISTRY)


def layer_op_types() -> list[str]:
    """Op types that are layers (can be configured with bits or skip)."""
    return sorted(k for k, h in REGISTRY.items() if h.kind in QUANTIZABLE_KINDS)
