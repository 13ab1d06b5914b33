"""If branches quantized as models of their own (PITFALLS 6): each branch is calibrated on the
calibration samples that take it, its Q/DQ live inside the branch, nested If nodes are handled in
turn, a branch no sample takes stays as it was, names never clash, and the result runs in
onnxruntime close to the float model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import amq
from amq.config import config_from_dict
from amq.graph import subgraphs
from amq.quant import qmath
from amq.runtime import Execution, session_for
from tests import models as M

MINMAX = config_from_dict({"calibration": {"method": "minmax"}})
D = 8
BRANCHES = ("then_branch", "else_branch")
QDQ = ("QuantizeLinear", "DequantizeLinear")


def _run(
    model: onnx.ModelProto,
    feeds: list[dict[str, np.ndarray]],
    execution: Execution = Execution.IDEAL,
) -> np.ndarray:
    """The first output over ``feeds``. By default the ideal execution (the Q/DQ math, the same on
    every CPU: what a test of quantization checks); RUNTIME, a default session, where a test checks
    that onnxruntime runs the model (on x86 without VNNI its integer kernels saturate int16 pair
    sums: PITFALLS 9)."""
    sess = session_for(model, execution)
    return np.concatenate([sess.run(None, f)[0] for f in feeds], axis=0)


def _sqnr(ref: np.ndarray, test: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref**2) / max(np.sum((ref - test) ** 2), 1e-30)))


def _if(model: onnx.ModelProto, name: str = "/If") -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _branch(node: onnx.NodeProto, attr: str) -> onnx.GraphProto:
    return next(a.g for a in node.attribute if a.name == attr)


def _defined_names(g: onnx.GraphProto) -> list[str]:
    """Every name a graph and its nested graphs define (initializers, node outputs, node names)."""
    out = [t.name for t in g.initializer]
    for n in g.node:
        out += [n.name] + [o for o in n.output if o]
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out += _defined_names(a.g)
    return out


def _assert_minmax_grid(
    model: onnx.ModelProto, body: onnx.GraphProto, tensor: str, values: np.ndarray
) -> None:
    """The body's QuantizeLinear of ``tensor`` uses the asymmetric uint8 grid of minmax over
    ``values`` (its scale read from the body, or from the main graph when identical there)."""
    (q,) = [n for n in body.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor]
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    consts.update({t.name: numpy_helper.to_array(t) for t in body.initializer})
    # the observed extremes, rounded outward to 12 significant bits (qmath.snap_range: the same
    # bytes on any CPU)
    lo, hi = qmath.snap_range(min(values.min(), 0.0), max(values.max(), 0.0))
    np.testing.assert_allclose(float(consts[q.input[1]]), (hi - lo) / 255, rtol=1e-5)


def _feeds(sign: float, n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {"x": (sign * np.abs(rng.standard_normal((1, D)))).astype(np.float32)} for _ in range(n)
    ]


def _mixed(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, D)).astype(np.float32)} for _ in range(n)]


def test_each_branch_is_calibrated_on_the_samples_that_take_it() -> None:
    model, calib, _ = M.build("control_flow_if")
    r = amq.quantize(model, calib, MINMAX, cache_dir=None)
    node = _if(r.model)
    w0 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w0"))
    h = np.concatenate([f["x"] @ w0 for f in calib])
    then = np.array([float(f["x"].sum()) > 0 for f in calib])
    assert 0 < then.sum() < len(calib)  # both branches are taken
    for attr, rows in (("then_branch", h[then]), ("else_branch", h[~then])):
        # asymmetric uint8 over the range of h on this branch's samples only
        _assert_minmax_grid(r.model, _branch(node, attr), "h", rows)
    note = next(n for n in r.summary.notes if n.startswith("If /If"))
    assert f"then: 1 layer(s) quantized on {then.sum()} sample(s)" in note
    assert f"else: 1 layer(s) quantized on {(~then).sum()} sample(s)" in note


def test_branches_hold_their_qdq_and_stay_close_to_float() -> None:
    model, _, _ = M.build("control_flow_if")
    calib = _mixed(256, 1)
    r = amq.quantize(model, calib, cache_dir=None)
    onnx.checker.check_model(r.model, full_check=True)
    names = _defined_names(r.model.graph)
    assert len(names) == len(set(names))  # no name defined twice anywhere
    node = _if(r.model)
    for attr, layer in (("then_branch", "/then/MatMul"), ("else_branch", "/else/MatMul")):
        g = _branch(node, attr)
        mm = next(n for n in g.node if n.name == layer)
        producers = {o: n for n in g.node for o in n.output}
        assert all(producers[i].op_type == "DequantizeLinear" for i in mm.input)
        assert r.plan.layers[layer].quantized and r.plan.layers[layer].weight_bits == 8
    # the branch holds its own copy of the quantized w0 (the main graph's values): onnxruntime
    # looks for a DequantizeLinear's initializers in the body's own graph
    assert "w0" not in {t.name for t in r.model.graph.initializer}
    then = _branch(node, "then_branch")
    (dq,) = [
        n for n in then.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("w0")
    ]
    local = {t.name: numpy_helper.to_array(t) for t in then.initializer}
    main = {t.name: numpy_helper.to_array(t) for t in r.model.graph.initializer}
    np.testing.assert_array_equal(local[dq.input[0]], main["w0_quantized"])
    # onnxruntime fuses inside the branches too, and the summary counts those kernels (the main
    # graph alone holds two MatMuls)
    assert sum(r.summary.integer_kernels.values()) >= 3
    held_out = _mixed(200, 5)
    # samples whose condition (a sum of the quantized input) sits within quantization noise of
    # 0 may take the other branch than in float: a branch decision, not the branches' accuracy
    then = [f for f in held_out if f["x"].sum() > 0.5]
    other = [f for f in held_out if f["x"].sum() < -0.5]
    for feeds in (then, other):  # each branch on held-out samples like the calibration ones
        assert len(feeds) > 40
        assert _sqnr(_run(model, feeds), _run(r.model, feeds)) > 24  # ~28-34 dB today


def test_branch_no_sample_takes_stays_as_it_was() -> None:
    model, _, _ = M.build("control_flow_if")
    r = amq.quantize(model, _feeds(1.0, 12, 1), cache_dir=None)
    before, after = _if(model), _if(r.model)
    assert (
        _branch(after, "else_branch").SerializeToString()
        == _branch(before, "else_branch").SerializeToString()
    )
    assert any(n.op_type == "QuantizeLinear" for n in _branch(after, "then_branch").node)
    assert "else: not taken by any calibration sample, left float" in " ".join(r.summary.notes)
    assert "w_else" in {t.name for t in r.model.graph.initializer}  # still read by else
    neg = _feeds(-1.0, 8, 2)
    np.testing.assert_allclose(_run(r.model, neg).shape, _run(model, neg).shape)


def nested_if() -> onnx.ModelProto:
    """x -> If(sum(x) > 0): then [Conv-free MatMul with a weight held as a Constant node inside
    the branch -> If(sum > 1): MatMul(w_a) | MatMul(w_b) reading the outer weight] | else
    [MatMul(w_c)]. Names inside both branches repeat on purpose: 'mid' and 'k' appear in two
    sibling graphs."""
    rng = np.random.default_rng(0)

    def w(name: str) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal((D, D)) * 0.4).astype(np.float32), name)

    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    one = numpy_helper.from_array(np.array(1.0, np.float32), "one")

    def mm_branch(name: str, inp: str, weight: str, out: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("MatMul", [inp, weight], [out], name=f"/{name}/MatMul")],
            name,
            [],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, D])],
        )

    w_in = numpy_helper.from_array((rng.standard_normal((D, D)) * 0.4).astype(np.float32), "w_in")
    inner = helper.make_node(
        "If",
        ["c2"],
        ["inner_out"],
        name="/outer/inner/If",
        then_branch=mm_branch("inner_then", "mid", "w_a", "ia"),
        else_branch=mm_branch("inner_else", "mid", "w_b", "ib"),
    )
    then = helper.make_graph(
        [
            helper.make_node("Constant", [], ["w_in_c"], name="/outer/w/Constant", value=w_in),
            helper.make_node("MatMul", ["x", "w_in_c"], ["mid"], name="/outer/MatMul"),
            helper.make_node("ReduceSum", ["mid"], ["s2"], name="/outer/ReduceSum", keepdims=0),
            helper.make_node("Greater", ["s2", "one"], ["c2"], name="/outer/Greater"),
            inner,
        ],
        "then",
        [],
        [helper.make_tensor_value_info("inner_out", TensorProto.FLOAT, [1, D])],
    )
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], name="/ReduceSum", keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["c"], name="/Greater"),
        helper.make_node(
            "If",
            ["c"],
            ["y0"],
            name="/If",
            then_branch=then,
            else_branch=mm_branch("else", "x", "w_c", "ec"),
        ),
        helper.make_node("Relu", ["y0"], ["y"], name="/Relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "nested_if",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, D])],
        [w("w_a"), w("w_b"), w("w_c"), zero, one],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def test_nested_if_quantized_at_every_level() -> None:
    model = nested_if()
    calib = _mixed(48, 3)
    r = amq.quantize(model, calib, cache_dir=None)
    onnx.checker.check_model(r.model, full_check=True)
    names = _defined_names(r.model.graph)
    assert len(names) == len(set(names))
    for layer in ("/outer/MatMul", "/inner_then/MatMul", "/inner_else/MatMul", "/else/MatMul"):
        assert r.plan.layers[layer].quantized, layer
    then = _branch(_if(r.model), "then_branch")
    # the weight held as a Constant node inside the branch is now an int8 initializer there
    (dq,) = [n for n in then.node if n.op_type == "DequantizeLinear" and "w_in_c" in n.input[0]]
    q = next(t for t in then.initializer if t.name == dq.input[0])
    assert q.data_type == TensorProto.INT8 and list(q.dims) == [D, D]
    inner = next(n for n in then.node if n.op_type == "If")
    for attr in ("then_branch", "else_branch"):
        assert any(n.op_type == "QuantizeLinear" for n in _branch(inner, attr).node)
    notes = " ".join(r.summary.notes + r.plan.notes)
    assert "/If.then: If /outer/inner/If: branches quantized" in notes
    held_out = _mixed(64, 9)
    assert _sqnr(_run(model, held_out), _run(r.model, held_out)) > 25


def test_int16_branches_upgrade_the_model_once() -> None:
    """16-bit layers inside a branch need opset 21: the parent is upgraded before any Q/DQ is
    written, so the branch and the main graph agree."""
    model, _, _ = M.build("control_flow_if")
    calib = _mixed(256, 1)
    cfg = config_from_dict({"layers": {"/then/MatMul": {"activations": {"bits": 16}}}})
    r = amq.quantize(model, calib, cfg, cache_dir=None)
    assert r.summary.opset == 21
    onnx.checker.check_model(r.model, full_check=True)
    g = _branch(_if(r.model), "then_branch")
    (q,) = [n for n in g.node if n.op_type == "QuantizeLinear"]
    zp = next(t for t in g.initializer if t.name == q.input[2])
    assert zp.data_type == TensorProto.UINT16
    held_out = [f for f in _mixed(100, 5) if abs(f["x"].sum()) > 0.5]  # no branch flips
    assert _sqnr(_run(model, held_out), _run(r.model, held_out)) > 28


@pytest.mark.parametrize("cfg", [{}, {"layers": {"/then/MatMul": {"activations": {"bits": 16}}}}])
def test_branch_qdq_read_their_initializers_from_the_branch(cfg: dict) -> None:
    """The then branch shares w0 with the main graph: its quantized copy (and every scale and
    zero point a branch's Q/DQ reads) is an initializer of the branch itself, not read from the
    main graph, where onnxruntime's QDQ transforms would not find it (1.32.0 fails to load the
    model at opset 21: "TransposeDQWeightsForMatMulNBits Missing required weight")."""
    model, _, _ = M.build("control_flow_if")
    r = amq.quantize(model, _mixed(64, 1), config_from_dict(cfg), cache_dir=None)
    outer = {t.name for t in r.model.graph.initializer}
    node = _if(r.model)
    for attr in BRANCHES:
        g = _branch(node, attr)
        local = {t.name for t in g.initializer}
        read = {i for n in g.node if n.op_type in QDQ for i in n.input[1:]}
        read |= {n.input[0] for n in g.node if n.op_type == "DequantizeLinear"} & (local | outer)
        assert read and read <= local, (attr, sorted(read - local))
    _run(r.model, _mixed(4, 5), Execution.RUNTIME)  # a default session runs it


def batched_weight_if() -> onnx.ModelProto:
    """x [1, 5, D] -> If(sum(x) > 0): each branch a MatMul by the outer batched weight
    wb [3, D, 4] -> Relu; then a main-graph MatMul to the output (opset 17)."""
    rng = np.random.default_rng(0)

    def body(name: str) -> onnx.GraphProto:
        return helper.make_graph(
            [
                helper.make_node("MatMul", ["x", "wb"], [f"{name}_m"], name=f"/{name}/MatMul"),
                helper.make_node("Relu", [f"{name}_m"], [f"{name}_r"], name=f"/{name}/Relu"),
            ],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_r", TensorProto.FLOAT, [3, 5, 4])],
        )

    inits = [
        numpy_helper.from_array((rng.standard_normal((3, D, 4)) * 0.4).astype(np.float32), "wb"),
        numpy_helper.from_array((rng.standard_normal((4, 2)) * 0.4).astype(np.float32), "wo"),
        numpy_helper.from_array(np.asarray(0.0, dtype=np.float32), "zero"),
    ]
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["xs"], name="/ReduceSum", keepdims=0),
        helper.make_node("Greater", ["xs", "zero"], ["cond"], name="/Greater"),
        helper.make_node(
            "If", ["cond"], ["b"], name="/If", then_branch=body("then"), else_branch=body("else")
        ),
        helper.make_node("MatMul", ["b", "wo"], ["y"], name="/out/MatMul"),
    ]
    g = helper.make_graph(
        nodes,
        "batched_weight_if",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5, 2])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_batched_matmul_weights_of_a_body_are_found() -> None:
    """What the parent's opset upgrade reads: a body's MatMul by an outer initializer of rank 3."""
    for model, found in ((batched_weight_if(), True), (M.build("control_flow_if")[0], False)):
        for attr in BRANCHES:
            body = _branch(_if(model), attr)
            assert subgraphs.reads_batched_weight(body, model.graph, {"MatMul"}) == found


def test_batched_matmul_weight_inside_a_branch_runs() -> None:
    """A batched MatMul weight [E, K, N] read inside the branches is written as a blocked
    DequantizeLinear (PITFALLS 10), which needs opset 21: the parent is upgraded for it before
    any Q/DQ is written, and the model runs in a default session close to float."""
    model = batched_weight_if()
    rng = np.random.default_rng(1)
    calib = [{"x": rng.standard_normal((1, 5, D)).astype(np.float32)} for _ in range(48)]
    r = amq.quantize(model, calib, cache_dir=None)
    assert r.summary.opset == 21
    onnx.checker.check_model(r.model, full_check=True)
    for attr in BRANCHES:
        g = _branch(_if(r.model), attr)
        (dq,) = [
            n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("wb")
        ]
        assert {a.name: a.i for a in dq.attribute} == {"axis": 1, "block_size": D}
    held_out = [{"x": rng.standard_normal((1, 5, D)).astype(np.float32)} for _ in range(40)]
    assert _sqnr(_run(model, held_out), _run(r.model, held_out, Execution.RUNTIME)) > 25


def test_same_inputs_give_the_same_bytes() -> None:
    model = nested_if()
    calib = _mixed(24, 4)
    a = amq.quantize(model, calib, cache_dir=None).model.SerializeToString(deterministic=True)
    b = amq.quantize(model, calib, cache_dir=None).model.SerializeToString(deterministic=True)
    assert a == b


@pytest.mark.parametrize("skip", ["/then/MatMul", "/*/MatMul"])
def test_layer_settings_reach_the_branches(skip: str) -> None:
    model, calib, _ = M.build("control_flow_if")
    cfg = config_from_dict({"layers": {skip: {"skip": True}}})
    r = amq.quantize(model, calib, cfg, cache_dir=None)
    assert not r.plan.layers["/then/MatMul"].quantized
    assert r.plan.layers["/else/MatMul"].quantized == (skip == "/then/MatMul")
    assert not r.warnings  # the pattern matches a node inside a branch: no 'matches no node'
    g = _branch(_if(r.model), "then_branch")
    assert not any(n.op_type == "QuantizeLinear" for n in g.node)


def test_size_counts_the_weights_inside_branches() -> None:
    model = nested_if()
    r = amq.quantize(model, _mixed(24, 4), cache_dir=None)
    # float: w_a, w_b, w_c (initializers) and w_in (a Constant node inside a branch), 8x8 float32
    # each, plus the two float32 scalars 'zero' and 'one'
    assert r.summary.size_float == 4 * 64 * 4 + 2 * 4
    # quantized: the four weights as int8 (64 bytes each) plus their scales and zero points
    assert 4 * 64 < r.summary.size_quant < 4 * 64 + 4 * 8 * (4 + 1) + 64


def test_nothing_to_calibrate_in_the_main_graph_is_not_a_cache_hit(tmp_path) -> None:
    """Everything quantizable sits in the branches (as in silero VAD): the summary must not claim
    the statistics came from the cache."""
    r = amq.quantize(nested_if(), _mixed(16, 4), cache_dir=tmp_path)
    assert not r.summary.cache_hit


def test_check_lists_no_control_flow_as_unsupported() -> None:
    from amq.analysis.check import check_graph
    from amq.graph.model import Graph

    for model in (M.build("control_flow_if")[0], rnn_loop()):
        assert not [
            k for k in check_graph(Graph(model)).unsupported if k.startswith(("If", "Loop"))
        ]


STEPS = 4


def rnn_loop(grow: bool = False) -> onnx.ModelProto:
    """h_{t+1} = Relu(h_t W + x U) for STEPS iterations of a Loop (h_0 = 0), y = h_T V. The MatMuls
    with W and U sit in the body; x, U and W come from the outer scope. ``grow``: the body also
    carries a tensor that gains a row at each iteration (its per-iteration values cannot be
    stacked)."""
    rng = np.random.default_rng(0)

    def w(name: str, rows: int = D, cols: int = D) -> onnx.TensorProto:
        return numpy_helper.from_array(
            (rng.standard_normal((rows, cols)) * 0.35).astype(np.float32), name
        )

    body_nodes = [
        helper.make_node("MatMul", ["h_in", "W"], ["hw"], name="/loop/hw/MatMul"),
        helper.make_node("MatMul", ["x", "U"], ["xu"], name="/loop/xu/MatMul"),
        helper.make_node("Add", ["hw", "xu"], ["pre"], name="/loop/Add"),
        helper.make_node("Relu", ["pre"], ["h_out"], name="/loop/Relu"),
        helper.make_node("Identity", ["cond_in"], ["cond_out"], name="/loop/cond"),
        helper.make_node("Identity", ["h_out"], ["y_t"], name="/loop/scan"),
    ]
    b_in = [
        helper.make_tensor_value_info("iter", TensorProto.INT64, []),
        helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
        helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [1, D]),
    ]
    b_out = [
        helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
        helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, D]),
    ]
    loop_in, loop_out = ["steps", "", "h0"], ["h_T"]
    if grow:
        body_nodes.append(
            helper.make_node("Concat", ["g_in", "h_out"], ["g_out"], axis=0, name="/loop/grow")
        )
        b_in.append(helper.make_tensor_value_info("g_in", TensorProto.FLOAT, [None, D]))
        b_out.append(helper.make_tensor_value_info("g_out", TensorProto.FLOAT, [None, D]))
        loop_in.append("g0")
        loop_out.append("g_T")
    b_out.append(helper.make_tensor_value_info("y_t", TensorProto.FLOAT, [1, D]))
    loop_out.append("ys")
    body = helper.make_graph(body_nodes, "body", b_in, b_out)
    nodes = [
        helper.make_node("Loop", loop_in, loop_out, name="/Loop", body=body),
        helper.make_node("MatMul", ["h_T", "V"], ["y"], name="/head/MatMul"),
    ]
    inits = [
        w("W"),
        w("U"),
        w("V", D, 4),
        numpy_helper.from_array(np.array(STEPS, np.int64), "steps"),
        numpy_helper.from_array(np.zeros((1, D), np.float32), "h0"),
    ]
    if grow:
        inits.append(numpy_helper.from_array(np.zeros((1, D), np.float32), "g0"))
    graph = helper.make_graph(
        nodes,
        "rnn_loop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def test_loop_body_is_calibrated_over_every_iteration() -> None:
    model, calib = rnn_loop(), _mixed(256, 1)
    r = amq.quantize(model, calib, MINMAX, cache_dir=None)
    onnx.checker.check_model(r.model, full_check=True)
    names = _defined_names(r.model.graph)
    assert len(names) == len(set(names))
    note = next(n for n in r.summary.notes if n.startswith("Loop /Loop"))
    assert f"body: 2 layer(s) quantized on {STEPS * len(calib)} iteration(s)" in note
    for layer in ("/loop/hw/MatMul", "/loop/xu/MatMul", "/head/MatMul"):
        assert r.plan.layers[layer].quantized, layer
    # the Add feeds only the body's outputs: no integer kernel to gain (the planner's rule)
    assert "no quantized layer" in r.plan.layers["/loop/Add"].reason
    # h_in's grid: minmax over h at every iteration of every sample, computed here with numpy
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    hs = []
    for f in calib:
        h = np.zeros((1, D), np.float32)
        for _ in range(STEPS):
            hs.append(h)
            h = np.maximum(h @ inits["W"] + f["x"] @ inits["U"], 0)
    hs = np.concatenate(hs)
    body = next(n for n in r.model.graph.node if n.name == "/Loop").attribute[0].g
    assert [v.name for v in body.input] == ["iter", "cond_in", "h_in"]  # formal inputs kept
    _assert_minmax_grid(r.model, body, "h_in", hs)
    held_out = _mixed(64, 9)
    assert _sqnr(_run(model, held_out), _run(r.model, held_out)) > 25


def test_compare_reaches_into_a_loop_body() -> None:
    from amq import api

    model = rnn_loop()
    r = amq.quantize(model, _mixed(64, 1), cache_dir=None)
    rep = api.compare(model, r.model, _mixed(16, 2))
    names = {row.name for row in rep.rows}
    assert {"h_in", "hw", "xu"} <= names  # tensors inside the body, over every iteration
    assert all(row.sqnr_db is not None and row.sqnr_db > 15 for row in rep.rows)


def test_loop_body_that_cannot_be_recorded_stays_float() -> None:
    model = rnn_loop(grow=True)
    r = amq.quantize(model, _mixed(16, 1), cache_dir=None)
    note = next(n for n in r.summary.notes if n.startswith("Loop /Loop"))
    assert "body: its inputs could not be recorded (" in note and "left float" in note
    assert r.plan.layers["/head/MatMul"].quantized
    body = next(n for n in r.model.graph.node if n.name == "/Loop").attribute[0].g
    assert not any(n.op_type == "QuantizeLinear" for n in body.node)
    held_out = _mixed(16, 2)
    assert _sqnr(_run(model, held_out), _run(r.model, held_out)) > 25


def test_compare_reaches_into_the_branches() -> None:
    """amq compare on a model whose branches amq quantized: a row per quantized tensor inside
    each branch (a name the main graph also quantizes gets @IF.BRANCH), its SQNR against an
    independent numpy computation: the float h on the samples that take the branch against the
    quantized model's own h put through that branch's grid."""
    from amq import api

    model, _, _ = M.build("control_flow_if")
    r = amq.quantize(model, _mixed(256, 1), MINMAX, cache_dir=None)
    ev = _mixed(64, 7)
    rep = api.compare(model, r.model, ev)
    names = {row.name for row in rep.rows}
    assert {"h", "h@/If.then", "h@/If.else"} <= names
    w0 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w0"))
    qh_model = onnx.ModelProto()
    qh_model.CopyFrom(r.model)
    qh_model.graph.output.append(onnx.ValueInfoProto(name="h"))
    sess = session_for(qh_model, Execution.IDEAL)  # the Q/DQ math, as compare measures it
    for side, pick in (("then", lambda s: s > 0), ("else", lambda s: s <= 0)):
        feeds = [f for f in ev if pick(f["x"].sum())]
        fh = np.concatenate([f["x"] @ w0 for f in feeds]).astype(np.float64)
        qh = np.concatenate([sess.run(["h"], f)[0] for f in feeds]).astype(np.float64)
        g = _branch(_if(r.model), f"{side}_branch")
        (q,) = [n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] == "h"]
        # the branch's own grid (read from the main graph when identical to one there)
        inits = {t.name: numpy_helper.to_array(t) for t in r.model.graph.initializer}
        inits.update({t.name: numpy_helper.to_array(t) for t in g.initializer})
        scale, zp = float(inits[q.input[1]]), int(inits[q.input[2]])
        deq = (np.clip(np.rint(qh / scale) + zp, 0, 255) - zp) * scale
        want = 10 * np.log10(np.sum(fh**2) / np.sum((fh - deq) ** 2))
        row = rep.row(f"h@/If.{side}")
        assert row.sqnr_db == pytest.approx(want, rel=1e-3)
    assert rep.samples == len(ev)


def test_compare_of_a_model_quantized_only_inside_branches() -> None:
    """All Q/DQ inside branches (as silero VAD after amq): compare works instead of calling it
    'not a QDQ model'; nested branches are reached too."""
    from amq import api

    model = nested_if()
    r = amq.quantize(model, _mixed(64, 3), cache_dir=None)
    assert not any(n.op_type == "QuantizeLinear" for n in r.model.graph.node)
    rep = api.compare(model, r.model, _mixed(32, 8))
    names = {row.name for row in rep.rows}
    assert {"x", "mid"} <= names  # x read by the then and else branches, mid by the inner If
    assert all(row.sqnr_db is not None and row.sqnr_db > 15 for row in rep.rows)


def test_sensitivity_ranks_layers_inside_branches() -> None:
    """A layer inside a branch gets a row, and its value is that of quantizing it alone with
    amq.quantize, scored here."""
    from amq import api

    model, _, _ = M.build("control_flow_if")
    calib, ev = _mixed(128, 1), _mixed(48, 2)
    rep = api.sensitivity(model, calib, ev, bits=(4,), metric="sqnr", cache_dir=None)
    assert {r.layer for r in rep.rows} == {
        "/fc0/MatMul",
        "/fc_out/MatMul",
        "/then/MatMul",
        "/else/MatMul",
    }
    cfg = config_from_dict(
        {
            "layers": {
                "*": {"skip": True},
                "/then/MatMul": {"weights": {"bits": 4}, "activations": {"bits": 8}, "skip": False},
            }
        }
    )
    q = amq.quantize(model, calib, cfg, cache_dir=None)
    assert [n for n, lp in q.plan.layers.items() if lp.quantized] == ["/then/MatMul"]
    want = _sqnr(_run(model, ev), _run(q.model, ev))
    (row,) = [r for r in rep.rows if r.layer == "/then/MatMul"]
    assert row.value == pytest.approx(want, rel=1e-4)


def test_search_assigns_bits_to_layers_inside_branches(tmp_path) -> None:
    from amq import api

    model, _, _ = M.build("control_flow_if")
    calib = _mixed(64, 1)
    res = api.search(
        model,
        calib,
        _mixed(32, 2),
        "100%",
        tmp_path,
        metric="cosine",
        weight_bits=(4, 8),
        act_bits=(8,),
        n_trials=3,
        cache_dir=None,
    )
    done = [r for r in res.outcome.records if r.state == "COMPLETE"]
    # every trial chooses the weight bits of the two layers inside the branches
    assert done and all({"w:/then/MatMul", "w:/else/MatMul"} <= set(r.params) for r in done)
    best = onnx.load(tmp_path / "best.onnx")
    assert any(n.op_type == "QuantizeLinear" for n in _branch(_if(best), "then_branch").node)


def test_bitops_count_layers_inside_the_branch_a_call_takes() -> None:
    """bitops runs one call (synthetic zeros: sum 0, so the else branch) and counts the layers of
    the branch it takes, at the bits each branch's own plan gives them."""
    from amq import api

    model, _, _ = M.build("control_flow_if")
    cfg = config_from_dict({"layers": {"/else/MatMul": {"weights": {"bits": 4}}}})
    rep, _plan = api.bitops_of(model, cfg)
    rows = {r.name: r for r in rep.layers}
    assert set(rows) == {"/fc0/MatMul", "/fc_out/MatMul", "/else/MatMul"}
    assert rows["/else/MatMul"].flops == 2 * D * D
    assert (rows["/else/MatMul"].weight_bits, rows["/else/MatMul"].act_bits) == (4, 8)
    # 2*8*8 + 2*8*8 + 2*8*4 FLOPs; the else MatMul at 4x8 bits, the others at 8x8
    assert rep.total == 128 * 64 + 64 * 64 + 128 * 32


def test_branch_that_cannot_be_taken_apart_stays_float_and_says_why() -> None:
    """The then branch reads a sequence from the outer graph (not a tensor: it cannot become an
    input of a model of its own). It stays as it was, the summary says why, and the rest of the
    model is still quantized."""
    rng = np.random.default_rng(0)
    w = [
        numpy_helper.from_array((rng.standard_normal((D, D)) * 0.4).astype(np.float32), f"w{i}")
        for i in range(3)
    ]
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    pos = numpy_helper.from_array(np.array(0, np.int64), "pos")
    then = helper.make_graph(
        [
            helper.make_node("SequenceAt", ["seq", "pos"], ["item"], name="/then/SequenceAt"),
            helper.make_node("MatMul", ["item", "w1"], ["t_out"], name="/then/MatMul"),
        ],
        "then",
        [],
        [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [1, D])],
    )
    other = helper.make_graph(
        [helper.make_node("MatMul", ["h", "w2"], ["e_out"], name="/else/MatMul")],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [1, D])],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h"], name="/fc0/MatMul"),
        helper.make_node("SequenceConstruct", ["h"], ["seq"], name="/SequenceConstruct"),
        helper.make_node("ReduceSum", ["x"], ["s"], name="/ReduceSum", keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["c"], name="/Greater"),
        helper.make_node("If", ["c"], ["y"], name="/If", then_branch=then, else_branch=other),
    ]
    graph = helper.make_graph(
        nodes,
        "seq_if",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, D])],
        [*w, zero, pos],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    r = amq.quantize(model, _mixed(32, 1), cache_dir=None)
    note = next(n for n in r.summary.notes if n.startswith("If /If"))
    assert "then: cannot be made a model of its own (" in note and "left float" in note
    assert "else: 1 layer(s) quantized" in note
    assert r.plan.layers["/fc0/MatMul"].quantized
    before = [n.SerializeToString() for n in _branch(_if(model), "then_branch").node]
    assert [n.SerializeToString() for n in _branch(_if(r.model), "then_branch").node] == before
    ev = _mixed(16, 2)
    assert _sqnr(_run(model, ev), _run(r.model, ev)) > 20


def test_second_run_takes_the_branch_statistics_from_the_cache(tmp_path, count_calibration) -> None:
    calls = count_calibration
    model, calib = nested_if(), _mixed(32, 4)
    first = amq.quantize(model, calib, cache_dir=tmp_path)
    assert len(calls) == 4  # the main graph's If reads x only: 4 branch graphs calibrate
    calls.clear()
    second = amq.quantize(model, calib, cache_dir=tmp_path)
    assert calls == []
    assert second.model.SerializeToString() == first.model.SerializeToString()


def test_check_reads_the_integer_types_inside_branches() -> None:
    from amq import api

    model, _, _ = M.build("control_flow_if")
    q = amq.quantize(model, _mixed(64, 1), cache_dir=None).model
    rep = api.check(q)
    assert rep.quantized_model
    # four MatMuls (two in the main graph, one in each branch), each reading two int8 inputs;
    # the branches' outputs stay float
    assert rep.dtype_stats["MatMul"] == {"in:int8": 8, "out:float": 3, "out:int8": 1}
    # all of a model's Q/DQ inside a branch still makes it a quantized model
    inner = amq.quantize(nested_if(), _mixed(32, 1), cache_dir=None).model
    assert api.check(inner).quantized_model


def test_if_with_nothing_to_quantize_gets_no_note() -> None:
    """An If whose branches only move shapes around is not worth a line in the summary."""
    model = nested_if()
    # the else branch's MatMul reads x: make it an Identity, and the outer If has a MatMul left
    r = amq.quantize(model, _mixed(16, 1), cache_dir=None)
    assert any(n.startswith("If /If:") for n in r.summary.notes)
    then = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["t"], name="/then/Identity")],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, D])],
    )
    other = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e"], name="/else/Neg")],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, D])],
    )
    w = numpy_helper.from_array(np.eye(D, dtype=np.float32), "w")
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["x"], ["s"], name="/ReduceSum", keepdims=0),
            helper.make_node("Greater", ["s", "zero"], ["c"], name="/Greater"),
            helper.make_node("If", ["c"], ["b"], name="/If", then_branch=then, else_branch=other),
            helper.make_node("MatMul", ["b", "w"], ["y"], name="/fc/MatMul"),
        ],
        "shape_if",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, D])],
        [w, zero],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    r = amq.quantize(m, _mixed(16, 1), cache_dir=None)
    assert not [n for n in r.summary.notes if "/If" in n]
    assert r.plan.layers["/fc/MatMul"].quantized


def rnn_scan() -> onnx.ModelProto:
    """The Scan version of rnn_loop: xs [STEPS, 1, D] is scanned, h_{t+1} = Relu(h_t W + x_t U),
    y = h_T V; the scan output (every h) goes unused."""
    rng = np.random.default_rng(0)

    def w(name: str, cols: int = D) -> onnx.TensorProto:
        return numpy_helper.from_array(
            (rng.standard_normal((D, cols)) * 0.35).astype(np.float32), name
        )

    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["h_in", "W"], ["hw"], name="/scan/hw/MatMul"),
            helper.make_node("MatMul", ["x_t", "U"], ["xu"], name="/scan/xu/MatMul"),
            helper.make_node("Add", ["hw", "xu"], ["pre"], name="/scan/Add"),
            helper.make_node("Relu", ["pre"], ["h_out"], name="/scan/Relu"),
            helper.make_node("Identity", ["h_out"], ["y_t"], name="/scan/out"),
        ],
        "body",
        [
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [1, D]),
            helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [1, D]),
        ],
        [
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, D]),
            helper.make_tensor_value_info("y_t", TensorProto.FLOAT, [1, D]),
        ],
    )
    nodes = [
        helper.make_node(
            "Scan",
            ["h0", "xs"],
            ["h_T", "ys"],
            name="/Scan",
            body=body,
            num_scan_inputs=1,
            scan_output_axes=[0],
        ),
        helper.make_node("MatMul", ["h_T", "V"], ["y"], name="/head/MatMul"),
    ]
    graph = helper.make_graph(
        nodes,
        "rnn_scan",
        [helper.make_tensor_value_info("xs", TensorProto.FLOAT, [STEPS, 1, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [w("W"), w("U"), w("V", 4), numpy_helper.from_array(np.zeros((1, D), np.float32), "h0")],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def _sequences(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"xs": rng.standard_normal((STEPS, 1, D)).astype(np.float32)} for _ in range(n)]


def test_scan_body_is_calibrated_over_every_step() -> None:
    model, calib = rnn_scan(), _sequences(256, 1)
    r = amq.quantize(model, calib, MINMAX, cache_dir=None)
    onnx.checker.check_model(r.model, full_check=True)
    note = next(n for n in r.summary.notes if n.startswith("Scan /Scan"))
    assert f"body: 2 layer(s) quantized on {STEPS * len(calib)} iteration(s)" in note
    xs = np.concatenate([f["xs"] for f in calib])  # every x_t the body sees
    body = next(n for n in r.model.graph.node if n.name == "/Scan").attribute[0].g
    assert [v.name for v in body.input] == ["h_in", "x_t"]
    _assert_minmax_grid(r.model, body, "x_t", xs)
    held_out = _sequences(64, 9)
    assert _sqnr(_run(model, held_out), _run(r.model, held_out)) > 25
    # the Scan's own attributes are as they were (the recording outputs live on a copy)
    scan = next(n for n in r.model.graph.node if n.name == "/Scan")
    assert list(scan.output) == ["h_T", "ys"]
    assert [list(a.ints) for a in scan.attribute if a.name == "scan_output_axes"] == [[0]]


def test_plan_with_branches_round_trips_through_json() -> None:
    """QuantPlan.to_dict keeps the plans of If branches (and nested bodies): a plan read back
    from JSON is the same plan and emits the same model."""
    from dataclasses import replace

    from amq.calib.data import open_data
    from amq.calib.workspace import plan_in_workspace
    from amq.config import Config
    from amq.plan import QuantPlan

    model, calib, _ = M.build("control_flow_if")
    cfg = Config()
    prep = amq.prepare(model, cfg)
    ws, plan, _w = plan_in_workspace(prep, cfg, open_data(calib, prep.specs, cfg), None, False)
    assert plan.branches  # the If's two branches
    back = QuantPlan.from_json(plan.to_json())  # (the overflow notes are not part of a plan)
    assert back.to_dict() == plan.to_dict() and set(back.branches) == set(plan.branches)
    where = next(iter(plan.branches))
    assert back.branches[where].layers == {
        k: replace(v, overflow_note="") for k, v in plan.branches[where].layers.items()
    }
    assert ws.emit(back).SerializeToString() == ws.emit(plan).SerializeToString()
