"""Contract suite over the whole op registry (DESIGN.md rule 3): every registered op type's facts
agree with each other and with what onnxruntime computes, on one-node models built with
onnx.helper. A new entry without a case here fails (each table must cover its facts' ops)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from amq.config import config_from_dict, load_config
from amq.errors import ConfigError
from amq.graph.model import Graph, infer_types
from amq.graph.patterns import fold_batchnorm, fold_bias_add, fold_scale_mul
from amq.quant import registry as R
from amq.quant.planner import check_config_names, node_attrs, plan_structure

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RNG = np.random.default_rng(0)


def _run(nodes, x: np.ndarray, inits=(), opset: int = 17) -> np.ndarray:
    """Run a graph reading float input x and writing y on onnxruntime (no graph optimizations,
    so the model's own ops run)."""
    g = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        list(inits),
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return _session(m).run(["y"], {"x": x})[0]


def _session(m: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _i64(name: str, *values: int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def _f32(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


# ---------------------------------------------------------------------------------------------
# every entry: facts consistent with each other and with the ONNX schema


@pytest.mark.parametrize("op", R.known_op_types())
def test_entry_is_consistent(op: str) -> None:
    h = R.handler(op)
    assert h.op_type == op and h is not R.FALLBACK
    schema = onnx.defs.get_schema(op)  # a real ONNX op (a typo raises)
    n_in = schema.max_input
    assert all(i < n_in for i in h.act_inputs)
    weighted = h.kind == R.Kind.WEIGHTED
    assert (h.weight_input is not None) == weighted == (h.weight_axis is not None)
    if weighted:
        assert h.weight_input < n_in
        # fold_batchnorm and the BN fusion rely on x, W, B at inputs 0, 1, 2
        assert h.bias_input in (None, 2) and h.weight_input == 1
    else:
        assert h.bias_input is None and h.pair_sums is None
    assert (R.BN_FOLD in h.fusions) == (h.bias_input is not None)
    assert not h.group_multiplies_channels or h.bias_input is not None
    transparent = h.kind == R.Kind.TRANSPARENT
    assert transparent or (h.clamp is None and not h.same_values)
    assert h.data_input < n_in
    assert not h.same_values or h.exact_share  # the same values are a subset of them
    assert h.clamp is None or not h.same_values
    assert not h.elementwise or h.kind == R.Kind.ACTIVATION
    if h.kind in R.QUANTIZABLE_KINDS and h.kind != R.Kind.CONCAT:
        assert h.flops is not None, "a layer's FLOPs are counted"
    assert h.kind != R.Kind.FLOAT or h.note
    if h.bias_add_folds:  # fold_bias_add: weight [Cout, ...], bias at input 2
        assert h.bias_input == 2 and h.weight_axis({}, 4) == 0
    if h.batched_weights:  # a stack of [K, N]: channels last, a case with such a weight below
        assert h.weight_axis({}, 3) == 2 and any(len(w) > 2 for _, _, w in WEIGHT_CASES[op])


def test_fusions_name_real_ops_and_start_at_registered_ones() -> None:
    starts = {op: R.handler(op).fusions for op in R.known_op_types() if R.handler(op).fusions}
    assert set(starts) == {"Conv", "ConvTranspose", "Gemm", "MatMul"}
    for fusions in starts.values():
        for f in fusions:
            assert f.name and f.detail and f.readers
            for reader in f.readers:
                assert onnx.defs.has(reader), f"{f.name}: {reader} is no ONNX op"
    # the readers amq handles are registered with the role the fusion assumes
    assert R.handler("Relu").clamp is not None and R.handler("Clip").clamp is not None
    assert R.handler("Add").elementwise


def test_shape_ops_are_real_ops_left_to_the_fallback() -> None:
    for op in R.SHAPE_OPS:
        assert onnx.defs.has(op) and R.handler(op) is R.FALLBACK


def test_unknown_ops_fall_back_to_float() -> None:
    assert R.handler("NoSuchOp") is R.FALLBACK and R.FALLBACK.kind == R.Kind.FLOAT
    assert R.clamp_bounds("NoSuchOp", {}, ["x"], lambda t: None) is None
    assert R.bias_channels("NoSuchOp", {}, (4, 3)) is None
    assert R.fixed_clamp("NoSuchOp") is None and not R.gemm_transposed("NoSuchOp", {})
    # planned: the unknown op stays float with the fallback's note, the layers around it do not
    w = _f32("w", RNG.standard_normal((4, 3, 1, 1)))
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Sin", ["c"], ["s"], name="sin"),
        helper.make_node("Conv", ["s", "w2"], ["y"], name="conv2"),
    ]
    w2 = _f32("w2", RNG.standard_normal((2, 4, 1, 1)))
    g = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
        [w, w2],
    )
    m = infer_types(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    plan = plan_structure(Graph(m), config_from_dict({}), {})
    assert "sin" not in plan.layers and plan.float_ops["sin"] == f"Sin: {R.FALLBACK.note}"
    assert plan.layers["conv"].quantized and plan.layers["conv2"].quantized


def test_config_op_types_are_registered_layers() -> None:
    """Op types a config names are checked against the registry: each layer type is accepted,
    anything else (a typo, an op amq leaves float) is an error; the shipped configs pass."""
    g = Graph(helper.make_model(helper.make_graph([], "m", [], [])))
    layers = R.layer_op_types()
    assert layers and all(R.handler(op).kind in R.QUANTIZABLE_KINDS for op in layers)
    for op in layers:
        check_config_names(g, config_from_dict({"op_types": {op: {"skip": True}}}))
    for op in ("Conv2d", "Relu", "NoSuchOp"):
        with pytest.raises(ConfigError, match=op):
            check_config_names(g, config_from_dict({"op_types": {op: {"skip": True}}}))
    for path in sorted(CONFIGS.glob("*.yaml")):
        for op, _ in load_config(path).op_types:
            assert op in layers, f"{path.name}: {op}"


# ---------------------------------------------------------------------------------------------
# weights: the output-channel axis is the axis whose slices make the output's channels


# op -> cases of (attributes, input shape, weight shape)
WEIGHT_CASES: dict[str, list[tuple[dict, tuple[int, ...], tuple[int, ...]]]] = {
    "Conv": [({}, (1, 3, 5, 5), (4, 3, 3, 3)), ({"group": 3}, (1, 3, 5, 5), (6, 1, 3, 3))],
    "ConvTranspose": [({}, (1, 3, 4, 4), (3, 4, 3, 3))],
    "Gemm": [({}, (2, 5), (5, 4)), ({"transB": 1}, (2, 5), (4, 5))],
    "MatMul": [({}, (2, 3, 5), (5, 4)), ({}, (2, 3, 5), (2, 5, 4))],
}


def test_weight_cases_cover_every_weighted_op() -> None:
    weighted = {op for op in R.known_op_types() if R.handler(op).kind == R.Kind.WEIGHTED}
    assert set(WEIGHT_CASES) == weighted


@pytest.mark.parametrize(
    "op, attrs, x_shape, w_shape",
    [(op, *case) for op, cases in WEIGHT_CASES.items() for case in cases],
)
def test_weight_axis_slices_are_output_channels(op, attrs, x_shape, w_shape) -> None:
    """Zeroing one slice of the weight along its output-channel axis zeroes exactly one
    channel of the output (a slice of it along one output axis), and changes nothing else."""
    h = R.handler(op)
    axis = h.weight_axis(attrs, len(w_shape))
    x = RNG.standard_normal(x_shape).astype(np.float32)
    w = RNG.standard_normal(w_shape).astype(np.float32)
    node = helper.make_node(op, ["x", "w"], ["y"], **attrs)
    y = _run([node], x, [_f32("w", w)])
    j = w_shape[axis] // 2
    w0 = w.copy()
    np.moveaxis(w0, axis, 0)[j] = 0
    y0 = _run([node], x, [_f32("w", w0)])
    changed = y0 != y
    assert changed.any()
    hits = [
        c
        for c in range(y.ndim)
        if y.shape[c] == w_shape[axis]
        and changed.sum() == np.take(changed, [j], axis=c).sum() == np.take(y0, [j], axis=c).size
        and not np.take(y0, [j], axis=c).any()
    ]
    assert hits, f"{op}: zeroing weight slice {j} on axis {axis} is no output channel"


@pytest.mark.parametrize(
    "op, attrs, x_shape, w_shape",
    [(op, *case) for op, cases in WEIGHT_CASES.items() for case in cases],
)
def test_bias_channels_is_the_bias_onnxruntime_adds(op, attrs, x_shape, w_shape) -> None:
    """A bias of ``bias_channels`` values adds one value per output channel in onnxruntime."""
    got = R.bias_channels(op, attrs, w_shape)
    if R.handler(op).bias_input is None:
        assert got is None
        return
    assert got is not None
    axis, n = got
    assert axis == R.handler(op).weight_axis(attrs, len(w_shape)) and n == w_shape[axis]
    x = RNG.standard_normal(x_shape).astype(np.float32)
    w = _f32("w", RNG.standard_normal(w_shape))
    b = np.arange(1, n + 1, dtype=np.float32)
    y = _run([helper.make_node(op, ["x", "w"], ["y"], **attrs)], x, [w])
    yb = _run([helper.make_node(op, ["x", "w", "b"], ["y"], **attrs)], x, [w, _f32("b", b)])
    c = 1 if op.startswith("Conv") else y.ndim - 1
    shape = [1] * y.ndim
    shape[c] = n
    np.testing.assert_allclose(yb - y, np.broadcast_to(b.reshape(shape), y.shape), atol=1e-4)


def test_grouped_conv_transpose_has_no_per_channel_bias_slices() -> None:
    assert R.bias_channels("ConvTranspose", {"group": 2}, (4, 3, 3, 3)) is None
    assert R.bias_channels("ConvTranspose", {"group": 1}, (4, 3, 3, 3)) == (1, 3)


@pytest.mark.parametrize(
    "op, attrs, x_shape, w_shape",
    [(op, *case) for op, cases in WEIGHT_CASES.items() for case in cases if op != "MatMul"],
)
def test_batchnorm_folds_along_bias_channels(op, attrs, x_shape, w_shape) -> None:
    """fold_batchnorm with the registry's channels: the same outputs on onnxruntime, no BN."""
    got = R.bias_channels(op, attrs, w_shape)
    assert got is not None
    n = got[1]
    inits = [
        _f32("w", RNG.standard_normal(w_shape)),
        _f32("b", RNG.standard_normal(n)),
        _f32("g", RNG.uniform(0.5, 2, n)),
        _f32("be", RNG.standard_normal(n)),
        _f32("mu", RNG.standard_normal(n)),
        _f32("var", RNG.uniform(0.5, 2, n)),
    ]
    x = RNG.standard_normal(x_shape).astype(np.float32)
    nodes = [
        helper.make_node(op, ["x", "w", "b"], ["t"], name="op", **attrs),
        helper.make_node("BatchNormalization", ["t", "g", "be", "mu", "var"], ["y"], name="bn"),
    ]
    g = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    before = _session(m).run(["y"], {"x": x})[0]
    folded = fold_batchnorm(m, R.bias_channels)
    assert [f.into for f in folded] == ["op"] and [n.op_type for n in m.graph.node] == [op]
    np.testing.assert_allclose(_session(m).run(["y"], {"x": x})[0], before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op", sorted(R.bias_add_ops()))
def test_bias_add_folds_into_the_bias(op: str) -> None:
    """A per-channel constant Add after the op, folded into its bias: the same outputs."""
    attrs, x_shape, w_shape = WEIGHT_CASES[op][0]
    n = w_shape[0]
    c = RNG.standard_normal((1, n) + (1,) * (len(x_shape) - 2)).astype(np.float32)
    nodes = [
        helper.make_node(op, ["x", "w"], ["t"], name="op", **attrs),
        helper.make_node("Add", ["t", "c"], ["y"], name="add"),
    ]
    g = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [_f32("w", RNG.standard_normal(w_shape)), _f32("c", c)],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    x = RNG.standard_normal(x_shape).astype(np.float32)
    before = _session(m).run(["y"], {"x": x})[0]
    assert fold_bias_add(m, R.bias_add_ops()) == ["add"]
    assert [n.op_type for n in m.graph.node] == [op]
    np.testing.assert_allclose(_session(m).run(["y"], {"x": x})[0], before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", sorted(R.bias_add_ops()))
@pytest.mark.parametrize("per_channel", [True, False])
def test_scale_mul_then_add_fold_into_the_op(op: str, per_channel: bool) -> None:
    """PP-LCNetV3's affine block: a Mul, then an Add, of per-channel (or scalar) constants after
    the op, folded into its weight and bias: the same outputs, the op alone left."""
    attrs, x_shape, w_shape = WEIGHT_CASES[op][0]
    n = w_shape[0]
    shape = (1, n) + (1,) * (len(x_shape) - 2) if per_channel else ()
    a = RNG.uniform(0.5, 2.0, shape).astype(np.float32)
    c = RNG.standard_normal(shape).astype(np.float32)
    nodes = [
        helper.make_node(op, ["x", "w", "b"], ["t"], name="op", **attrs),
        helper.make_node("Mul", ["a", "t"], ["u"], name="mul"),
        helper.make_node("Add", ["u", "c"], ["y"], name="add"),
    ]
    g = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            _f32("w", RNG.standard_normal(w_shape)),
            _f32("b", RNG.standard_normal(n)),
            _f32("a", a),
            _f32("c", c),
        ],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    x = RNG.standard_normal(x_shape).astype(np.float32)
    before = _session(m).run(["y"], {"x": x})[0]
    assert fold_scale_mul(m, R.bias_add_ops()) == ["mul"]
    assert fold_bias_add(m, R.bias_add_ops()) == ["add"]
    assert [n.op_type for n in m.graph.node] == [op]
    np.testing.assert_allclose(_session(m).run(["y"], {"x": x})[0], before, rtol=1e-5, atol=1e-5)


def _hardswish_graph(form: str) -> onnx.ModelProto:
    three, six = _f32("three", np.float32(3.0)), _f32("six", np.float32(6.0))
    zero = _f32("zero", np.float32(0.0))
    if form == "HardSwish":
        nodes = [helper.make_node("HardSwish", ["t"], ["y"])]
    elif form == "HardSigmoid":
        nodes = [
            helper.make_node("HardSigmoid", ["t"], ["h"], alpha=1 / 6, beta=0.5),
            helper.make_node("Mul", ["t", "h"], ["y"]),
        ]
    else:  # t * clip(t + 3, 0, 6) / 6, or a Clip from -1 (not hardswish)
        lo = "zero" if form == "decomposed" else "minus_one"
        nodes = [
            helper.make_node("Add", ["t", "three"], ["p"]),
            helper.make_node("Clip", ["p", lo, "six"], ["q"]),
            helper.make_node("Mul", ["q", "t"], ["r"]),
            helper.make_node("Div", ["r", "six"], ["y"]),
        ]
    g = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [three, six, zero, _f32("minus_one", np.float32(-1.0))],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("form", ["HardSwish", "HardSigmoid", "decomposed", "clip_from_minus_1"])
def test_hardswish_readers_ignore_values_below_minus_three(form: str) -> None:
    """hardswish_only finds the three forms (not a Clip from -1), and for each, clamping the input
    at -3 (what its grid then does) changes no output: the clamp is exact."""
    from amq.graph.model import Graph
    from amq.graph.patterns import HARDSWISH_FLOOR, hardswish_only
    from amq.quant.planner import _clamp_bounds

    m = _hardswish_graph(form)
    g = Graph(m)
    found = hardswish_only(g, "t", lambda n: _clamp_bounds(g, n))
    assert found == (form != "clip_from_minus_1")
    t = np.linspace(-12, 8, 64).astype(np.float32)
    s = _session(m)
    y, y_clamped = s.run(["y"], {"t": t})[0], s.run(["y"], {"t": np.maximum(t, HARDSWISH_FLOOR)})[0]
    if found:
        np.testing.assert_allclose(y_clamped, y, atol=1e-6)
    else:
        assert not np.allclose(y_clamped, y)


@pytest.mark.parametrize("op, attrs", [("Gemm", {}), ("Gemm", {"transB": 1}), ("MatMul", {})])
def test_gemm_transposed_gives_the_kernels_k_by_n_weight(op, attrs) -> None:
    """Rows times the weight in [K, N] order (transposed where the registry says) is the op."""
    x = RNG.standard_normal((3, 5)).astype(np.float32)
    w = RNG.standard_normal((4, 5) if attrs.get("transB") else (5, 4)).astype(np.float32)
    assert R.handler(op).pair_sums is R.Kernel.GEMM
    kn = w.T if R.gemm_transposed(op, attrs) else w
    y = _run([helper.make_node(op, ["x", "w"], ["y"], **attrs)], x, [_f32("w", w)])
    np.testing.assert_allclose(x @ kn, y, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# clamps: the bounds the registry reads are the ones onnxruntime applies

# op -> cases of (extra inputs as (name, value or None for a dynamic one), attributes, opset)
CLAMP_CASES = {
    "Relu": [((), {}, 17)],
    "Clip": [
        ((("lo", -0.5), ("hi", 0.75)), {}, 17),
        ((("lo", 0.0),), {}, 17),
        ((("", None), ("hi", 1.0)), {}, 17),
        ((), {"min": -0.25, "max": 0.5}, 6),
        ((), {}, 17),
    ],
}


def test_clamp_cases_cover_every_clamping_op() -> None:
    assert set(CLAMP_CASES) == {op for op in R.known_op_types() if R.handler(op).clamp}


@pytest.mark.parametrize(
    "op, extra, attrs, opset", [(op, *c) for op, cases in CLAMP_CASES.items() for c in cases]
)
def test_clamp_bounds_match_onnxruntime(op, extra, attrs, opset) -> None:
    x = np.linspace(-2, 2, 41, dtype=np.float32).reshape(1, 41)
    inputs = ["x"] + [name for name, _ in extra]
    consts = {name: v for name, v in extra if name}
    node = helper.make_node(op, inputs, ["y"], **attrs)
    bounds = R.clamp_bounds(op, node_attrs(node), inputs, consts.get)
    assert bounds is not None
    y = _run([node], x, [_f32(k, v) for k, v in consts.items()], opset=opset)
    lo, hi = (
        (-np.inf if bounds[0] is None else bounds[0]),
        (np.inf if bounds[1] is None else bounds[1]),
    )
    np.testing.assert_array_equal(y, np.clip(x, np.float32(lo), np.float32(hi)))
    assert R.fixed_clamp(op) in (None, bounds)


def test_clamp_with_a_dynamic_bound_has_no_constant_bounds() -> None:
    assert R.clamp_bounds("Clip", {}, ["x", "lo", "hi"], {"hi": 1.0}.get) is None
    assert R.fixed_clamp("Relu") == (0.0, None) and R.fixed_clamp("Clip") is None


# ---------------------------------------------------------------------------------------------
# transparent ops: their outputs hold the input's values (all of them, for same_values ones)

X_SHAPE = (1, 4, 4, 4)
# op -> (node inputs after x, initializers, attributes)
TRANSPARENT_CASES: dict[str, tuple[list[str], list[onnx.TensorProto], dict]] = {
    "Relu": ([], [], {}),
    "Clip": (["lo"], [_f32("lo", 0.1)], {}),
    "MaxPool": ([], [], {"kernel_shape": [2, 2]}),
    "GlobalMaxPool": ([], [], {}),
    "Reshape": (["s"], [_i64("s", 2, -1)], {}),
    "Flatten": ([], [], {"axis": 2}),
    "Transpose": ([], [], {"perm": [0, 2, 3, 1]}),
    "Squeeze": (["a"], [_i64("a", 0)], {}),
    "Unsqueeze": (["a"], [_i64("a", 1)], {}),
    "Identity": ([], [], {}),
    "Slice": (["st", "en"], [_i64("st", 1), _i64("en", 3)], {}),
    "Split": ([], [], {"axis": 1, "num_outputs": 2}),
    "Gather": (["i"], [_i64("i", 3, 0, 3)], {"axis": 1}),
    "Expand": (["s"], [_i64("s", 2, 4, 4, 4)], {}),
    "Tile": (["r"], [_i64("r", 1, 2, 1, 1)], {}),
    "DepthToSpace": ([], [], {"blocksize": 2}),
    "SpaceToDepth": ([], [], {"blocksize": 2}),
    "Pad": (["p"], [_i64("p", 0, 0, 1, 1, 0, 0, 1, 1)], {}),
    "Resize": (["", "sc"], [_f32("sc", [1, 1, 2, 2])], {"mode": "linear"}),
}


def test_transparent_cases_cover_every_transparent_op() -> None:
    transparent = {op for op in R.known_op_types() if R.handler(op).kind == R.Kind.TRANSPARENT}
    assert set(TRANSPARENT_CASES) == transparent


@pytest.mark.parametrize("op", sorted(TRANSPARENT_CASES))
def test_transparent_outputs_hold_the_inputs_values(op: str) -> None:
    """exact_share: every output value is an input value (a grid passes through); same_values:
    the output holds exactly the input's values, each as often (its statistics are the
    input's); the others (Pad, Resize) stay within the input's range and zero."""
    h = R.handler(op)
    extra, inits, attrs = TRANSPARENT_CASES[op]
    x = RNG.standard_normal(X_SHAPE).astype(np.float32)
    outputs = ["y", "y2"] if op == "Split" else ["y"]
    node = helper.make_node(op, ["x", *extra], outputs, **attrs)
    assert h.data_input == 0
    y = _run([node], x, inits, opset=18)
    if h.same_values:
        np.testing.assert_array_equal(np.sort(y, axis=None), np.sort(x, axis=None))
    elif h.clamp is not None:  # the input's values and the bounds they were clamped to
        bounds = R.clamp_bounds(op, attrs, ["x", *extra], lambda t: 0.1)
        assert bounds is not None
        kept = np.asarray([b for b in bounds if b is not None], dtype=np.float32)
        assert np.isin(y, np.append(x, kept)).all()
    elif h.exact_share:
        assert np.isin(y, x).all()
    else:
        lo, hi = min(x.min(), 0), max(x.max(), 0)
        assert ((y >= lo) & (y <= hi)).all() and not np.isin(y, x).all()


def test_scale_mul_fold_leaves_a_shared_weight_alone() -> None:
    """Two Convs share one weight; a Mul follows only the first: the first gets a scaled copy,
    the second keeps the shared weight, and both outputs are unchanged."""
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["t"], name="c1", pads=[1] * 4),
        helper.make_node("Mul", ["t", "a"], ["y1"], name="mul"),
        helper.make_node("Conv", ["x", "w"], ["y2"], name="c2", pads=[1] * 4),
    ]
    g = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])],
        [
            helper.make_tensor_value_info("y1", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("y2", TensorProto.FLOAT, None),
        ],
        [_f32("w", w), _f32("a", RNG.uniform(0.5, 2.0, (1, 4, 1, 1)))],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    x = RNG.standard_normal((1, 3, 5, 5)).astype(np.float32)
    before = _session(m).run(None, {"x": x})
    assert fold_scale_mul(m, R.bias_add_ops()) == ["mul"]
    convs = {n.name: n for n in m.graph.node}
    assert convs["c2"].input[1] == "w" and convs["c1"].input[1] != "w"
    after = _session(m).run(None, {"x": x})
    for a, b in zip(after, before, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
