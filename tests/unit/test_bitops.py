"""FLOPs and bitops (DESIGN.md §3): FLOPs = 2 x MACs against hand counts, bitops = FLOPs x
activation bits x weight bits with per-layer config overrides, the ratio to all-INT8, and
`amq bitops`."""

from __future__ import annotations

import csv
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import amq
from amq import api
from amq.analysis.bitops import bitops
from amq.config import config_from_dict
from amq.errors import DataError
from tests.cli_helpers import assert_one_line_error, run_cli


def _model(nodes, inputs, outputs, inits, opset=17) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "bitops", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _w(seed, *shape):
    return numpy_helper.from_array(
        np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.3,
        f"w{seed}",
    )


def _b(seed, n):
    return numpy_helper.from_array(np.full(n, 0.1, np.float32), f"b{seed}")


def _ort_shape(m: onnx.ModelProto, feeds) -> tuple[int, ...]:
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return tuple(s.run(None, feeds)[0].shape)


def _layer(model, name, cfg=None, **kw):
    rep, plan = api.bitops_of(model, cfg, **kw)
    rows = {r.name: r for r in rep.layers}
    return rows[name], rep, plan


# ---------------------------------------------------------------------------------------------
# FLOPs against hand counts


def test_conv_group_dilation_stride_pads():
    # x [1, 4, 11, 11], W [6, 4/2, 3, 3], group 2, dilation 2, stride 2, pads 1
    # effective kernel 2*(3-1)+1 = 5; out = floor((11 + 1 + 1 - 5) / 2) + 1 = 5 -> [1, 6, 5, 5]
    # MACs per output value: (4/2 input channels) * 3 * 3 = 18; MACs = 6*5*5*18 = 2700
    m = _model(
        [
            helper.make_node(
                "Conv",
                ["x", "w1", "b1"],
                ["y"],
                name="/conv/Conv",
                group=2,
                dilations=[2, 2],
                strides=[2, 2],
                pads=[1, 1, 1, 1],
            )
        ],
        [_vi("x", [1, 4, 11, 11])],
        [_vi("y", [1, 6, 5, 5])],
        [_w(1, 6, 2, 3, 3), _b(1, 6)],
    )
    assert _ort_shape(m, {"x": np.zeros((1, 4, 11, 11), np.float32)}) == (1, 6, 5, 5)
    r, _, _ = _layer(m, "/conv/Conv")
    assert r.flops == 2 * 2700
    assert r.params == 6 * 2 * 3 * 3 + 6
    assert (r.act_bits, r.weight_bits, r.bitops) == (8, 8, 2 * 2700 * 64)


def test_conv_asymmetric_pads_and_batch():
    # x [3, 2, 7, 9], W [4, 2, 2, 3], stride (1, 2), pads (top 1, left 0, bottom 0, right 2)
    # H: 7 + 1 + 0 - 2 + 1 = 7; W: floor((9 + 0 + 2 - 3) / 2) + 1 = 5 -> [3, 4, 7, 5]
    # MACs = 3*4*7*5 * (2*2*3) = 420 * 12 = 5040
    m = _model(
        [
            helper.make_node(
                "Conv", ["x", "w1"], ["y"], name="/c/Conv", strides=[1, 2], pads=[1, 0, 0, 2]
            )
        ],
        [_vi("x", [3, 2, 7, 9])],
        [_vi("y", [3, 4, 7, 5])],
        [_w(1, 4, 2, 2, 3)],
    )
    assert _ort_shape(m, {"x": np.zeros((3, 2, 7, 9), np.float32)}) == (3, 4, 7, 5)
    r, _, _ = _layer(m, "/c/Conv")
    assert r.flops == 2 * 5040
    assert r.params == 4 * 2 * 2 * 3


def test_depthwise_conv():
    # x [1, 8, 10, 10], W [8, 1, 3, 3], group 8, pads 1 -> [1, 8, 10, 10]; MACs = 800 * 9
    m = _model(
        [helper.make_node("Conv", ["x", "w1"], ["y"], name="/dw/Conv", group=8, pads=[1] * 4)],
        [_vi("x", [1, 8, 10, 10])],
        [_vi("y", [1, 8, 10, 10])],
        [_w(1, 8, 1, 3, 3)],
    )
    r, _, _ = _layer(m, "/dw/Conv")
    assert r.flops == 2 * 7200


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_stride2(group):
    # x [1, 4, 5, 5], W [Cin=4, Cout/group=3, 3, 3], stride 2 -> out (5-1)*2 + 3 = 11
    # every input value is multiplied into Cout/group * 3 * 3 outputs: MACs = 4*5*5 * 3*9 = 2700
    cout = 3 * group
    m = _model(
        [
            helper.make_node(
                "ConvTranspose", ["x", "w1"], ["y"], name="/up/ConvTranspose", strides=[2, 2],
                group=group,
            )
        ],
        [_vi("x", [1, 4, 5, 5])],
        [_vi("y", [1, cout, 11, 11])],
        [_w(1, 4, 3, 3, 3)],
    )  # fmt: skip
    assert _ort_shape(m, {"x": np.zeros((1, 4, 5, 5), np.float32)}) == (1, cout, 11, 11)
    r, _, _ = _layer(m, "/up/ConvTranspose")
    assert r.flops == 2 * 2700
    # the same count seen from the output side: each output value of a stride-2 transpose conv
    # gathers a varying number of taps; summed over the output it is the same 2700
    taps = np.zeros(11)
    for i in range(5):
        taps[2 * i : 2 * i + 3] += 1
    assert int(np.outer(taps, taps).sum()) * 4 * cout // group == 2700


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_transb(trans_b):
    # x [3, 16] x W (16 -> 10) + b: MACs = 3 * 10 * 16 = 480
    w = (16, 10) if trans_b == 0 else (10, 16)
    m = _model(
        [helper.make_node("Gemm", ["x", "w1", "b1"], ["y"], name="/fc/Gemm", transB=trans_b)],
        [_vi("x", [3, 16])],
        [_vi("y", [3, 10])],
        [_w(1, *w), _b(1, 10)],
    )
    r, _, plan = _layer(m, "/fc/Gemm")
    assert r.flops == 2 * 480
    assert r.params == 160 + 10
    assert plan.tensors["w1"].axis == (0 if trans_b else 1)


def test_gemm_trans_a():
    # A given as [16, 3] with transA: still K = 16, out [3, 10]
    m = _model(
        [helper.make_node("Gemm", ["x", "w1"], ["y"], name="/fc/Gemm", transA=1, transB=1)],
        [_vi("x", [16, 3])],
        [_vi("y", [3, 10])],
        [_w(1, 10, 16)],
    )
    r, _, _ = _layer(m, "/fc/Gemm")
    assert r.flops == 2 * 480


def test_batched_matmul_two_activations():
    # [2,3,4,5] x [2,3,5,6] -> [2,3,4,6]; MACs = 2*3*4*6 * 5 = 720
    m = _model(
        [helper.make_node("MatMul", ["a", "b"], ["y"], name="/bmm/MatMul")],
        [_vi("a", [2, 3, 4, 5]), _vi("b", [2, 3, 5, 6])],
        [_vi("y", [2, 3, 4, 6])],
        [],
    )
    r, _, plan = _layer(m, "/bmm/MatMul")
    assert r.flops == 2 * 720
    assert r.params == 0
    assert plan.layers["/bmm/MatMul"].weight is None
    # the second activation takes the weight's place; a product of two free activations is
    # 16-bit by default (registry free_product_bits)
    assert (r.act_bits, r.weight_bits, r.bitops) == (16, 16, 2 * 720 * 256)
    cfg = config_from_dict({"layers": {"/bmm/MatMul": {"activations": {"bits": 8}}}})
    r, _, _ = _layer(m, "/bmm/MatMul", cfg)
    assert (r.act_bits, r.weight_bits, r.bitops) == (8, 8, 2 * 720 * 64)


def test_broadcast_matmul_with_a_weight():
    # [1, 7, 12] x W [12, 9] -> [1, 7, 9]; MACs = 7 * 9 * 12 = 756
    m = _model(
        [helper.make_node("MatMul", ["x", "w1"], ["y"], name="/fc/MatMul")],
        [_vi("x", [1, 7, 12])],
        [_vi("y", [1, 7, 9])],
        [_w(1, 12, 9)],
    )
    r, _, plan = _layer(m, "/fc/MatMul")
    assert r.flops == 2 * 756
    assert r.params == 12 * 9
    assert plan.tensors["w1"].axis == 1


def test_matmul_with_a_constant_first_input_counts_what_is_emitted():
    # W [4, 5] x x [5, 6] -> [4, 6]; MACs = 4 * 6 * 5 = 120
    m = _model(
        [helper.make_node("MatMul", ["w1", "x"], ["y"], name="/mm/MatMul")],
        [_vi("x", [5, 6])],
        [_vi("y", [4, 6])],
        [_w(1, 4, 5)],
    )
    feeds = [
        {"x": np.random.default_rng(i).standard_normal((5, 6)).astype(np.float32)} for i in range(4)
    ]
    res = amq.quantize(m, feeds, cache_dir=None)
    w_dequantized = any(
        n.op_type == "DequantizeLinear"
        and n.output[0] in _inputs_of(res.model, "/mm/MatMul")
        and n.input[0] != "x_quantized"
        for n in res.model.graph.node
    )
    r = {x.name: x for x in bitops(res.plan).layers}["/mm/MatMul"]
    assert r.flops == 2 * 120
    assert r.weight_bits == (8 if w_dequantized else 32)
    assert r.params == 20


def _inputs_of(model, name):
    return list(next(n for n in model.graph.node if n.name == name).input)


# ---------------------------------------------------------------------------------------------
# bitops with config overrides, ratio to all-INT8


def _chain() -> onnx.ModelProto:
    """x[batch,3,8,8] -> /c1/Conv (8, 3x3, pad 1) -> Relu -> /c2/Conv (8, 3x3, pad 1) -> Relu ->
    /c3/Conv (4, 1x1) -> Flatten -> /fc/Gemm (256 -> 10)."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="/c1/Conv", pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"], name="/r1/Relu"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="/c2/Conv", pads=[1] * 4),
        helper.make_node("Relu", ["c2"], ["r2"], name="/r2/Relu"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="/c3/Conv"),
        helper.make_node("Flatten", ["c3"], ["f"], name="/Flatten"),
        helper.make_node("Gemm", ["f", "w4", "b4"], ["y"], name="/fc/Gemm", transB=1),
    ]
    inits = [
        _w(1, 8, 3, 3, 3),
        _b(1, 8),
        _w(2, 8, 8, 3, 3),
        _b(2, 8),
        _w(3, 4, 8, 1, 1),
        _b(3, 4),
        _w(4, 10, 256),
        _b(4, 10),
    ]
    return _model(nodes, [_vi("x", ["batch", 3, 8, 8])], [_vi("y", ["batch", 10])], inits)


# MACs by hand: c1 64*8*27, c2 64*8*72, c3 64*4*8, fc 10*256
CHAIN_FLOPS = {
    "/c1/Conv": 2 * 64 * 8 * 27,
    "/c2/Conv": 2 * 64 * 8 * 72,
    "/c3/Conv": 2 * 64 * 4 * 8,
    "/fc/Gemm": 2 * 10 * 256,
}


def test_chain_flops_and_int8_bitops():
    rep, _ = api.bitops_of(_chain())
    assert {r.name: r.flops for r in rep.layers} == CHAIN_FLOPS
    assert rep.flops == sum(CHAIN_FLOPS.values())
    assert rep.total == rep.int8_total == 64 * rep.flops
    assert rep.ratio_to_int8 == 1.0


def test_config_overrides_per_layer_bits_and_skip():
    cfg = config_from_dict(
        {
            "layers": {
                "/c2/Conv": {"weights": {"bits": 4}, "activations": {"bits": 16}},
                "/fc/Gemm": {"skip": True},
            }
        }
    )
    rep, _ = api.bitops_of(_chain(), cfg)
    rows = {r.name: r for r in rep.layers}
    want_bits = {
        "/c1/Conv": (8, 8),
        "/c2/Conv": (16, 4),
        "/c3/Conv": (8, 8),
        "/fc/Gemm": (32, 32),
    }
    for name, (a, w) in want_bits.items():
        assert (rows[name].act_bits, rows[name].weight_bits) == (a, w), name
        assert rows[name].bitops == CHAIN_FLOPS[name] * a * w, name
    total = sum(CHAIN_FLOPS[n] * a * w for n, (a, w) in want_bits.items())
    assert rep.total == total
    assert rep.int8_total == 64 * sum(CHAIN_FLOPS.values())
    assert rep.ratio_to_int8 == pytest.approx(total / (64 * sum(CHAIN_FLOPS.values())))


def test_global_w4a8_halves_bitops():
    cfg = config_from_dict({"weights": {"bits": 4}})
    rep, _ = api.bitops_of(_chain(), cfg)
    assert rep.ratio_to_int8 == pytest.approx(0.5)
    cfg = config_from_dict({"weights": {"bits": 16}, "activations": {"bits": 16}})
    assert api.bitops_of(_chain(), cfg)[0].ratio_to_int8 == pytest.approx(4.0)


def test_input_shape_scales_with_batch():
    rep1, _ = api.bitops_of(_chain())  # dynamic batch -> 1
    rep4, _ = api.bitops_of(_chain(), input_shapes={"x": (4, 3, 8, 8)})
    assert rep4.flops == 4 * rep1.flops


def _dynamic_spatial() -> onnx.ModelProto:
    return _model(
        [helper.make_node("Conv", ["x", "w1"], ["y"], name="/c/Conv", pads=[1] * 4)],
        [_vi("x", ["batch", 3, "h", "w"])],
        [_vi("y", ["batch", 8, "h", "w"])],
        [_w(1, 8, 3, 3, 3)],
    )


def test_unknown_dims_need_a_shape():
    with pytest.raises(DataError, match="--input-shape x:"):
        api.bitops_of(_dynamic_spatial())
    rep, _ = api.bitops_of(_dynamic_spatial(), input_shapes={"x": (1, 3, 5, 6)})
    assert rep.flops == 2 * 30 * 8 * 27


# ---------------------------------------------------------------------------------------------
# amq bitops


@pytest.fixture
def chain_path(tmp_path):
    p = tmp_path / "chain.onnx"
    onnx.save(_chain(), p)
    return p


def test_cli_table(capsys, chain_path):
    code, out, err = run_cli(capsys, "bitops", str(chain_path))
    assert code == 0, err
    assert "FLOPs = 2 x MACs" in " ".join(out.split())  # the title may wrap
    for name in CHAIN_FLOPS:
        assert name in out
    total = sum(CHAIN_FLOPS.values())
    assert f"total: {total:,} FLOPs, {64 * total:,} bitops = 1.000x all-INT8" in out


def test_cli_json_and_csv_with_config(capsys, chain_path, tmp_path):
    cfgp = tmp_path / "c.yaml"
    cfgp.write_text("layers:\n  /c2/Conv: {weights: {bits: 4}}\n  /fc/Gemm: {skip: true}\n")
    csvp = tmp_path / "b.csv"
    code, out, err = run_cli(
        capsys, "bitops", str(chain_path), "-c", str(cfgp), "--csv", str(csvp), "--json"
    )
    assert code == 0, err
    d = json.loads(out)
    bits = {"/c1/Conv": (8, 8), "/c2/Conv": (8, 4), "/c3/Conv": (8, 8), "/fc/Gemm": (32, 32)}
    total = sum(CHAIN_FLOPS[n] * a * w for n, (a, w) in bits.items())
    assert d["bitops"] == total
    assert d["flops"] == sum(CHAIN_FLOPS.values())
    assert d["bitops_int8"] == 64 * d["flops"]
    assert d["ratio_to_int8"] == pytest.approx(total / d["bitops_int8"])
    layers = {r["layer"]: r for r in d["layers"]}
    for n, (a, w) in bits.items():
        assert (layers[n]["act bits"], layers[n]["weight bits"]) == (a, w)
        assert layers[n]["FLOPs"] == CHAIN_FLOPS[n]
    assert sum(r["share"] for r in d["layers"]) == pytest.approx(1.0)
    rows = list(csv.DictReader(csvp.open()))
    assert [r["layer"] for r in rows] == list(CHAIN_FLOPS)
    assert {r["layer"]: int(r["bitops"]) for r in rows} == {
        n: CHAIN_FLOPS[n] * a * w for n, (a, w) in bits.items()
    }


def test_cli_weight_and_act_bits_flags(capsys, chain_path):
    code, out, err = run_cli(
        capsys, "bitops", str(chain_path), "--weight-bits", "4", "--act-bits", "16", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["ratio_to_int8"] == pytest.approx(1.0)  # 16 x 4 == 8 x 8


def test_cli_unknown_dims_error_and_input_shape(capsys, tmp_path):
    p = tmp_path / "dyn.onnx"
    onnx.save(_dynamic_spatial(), p)
    code, _, err = run_cli(capsys, "bitops", str(p))
    assert_one_line_error(code, err, "input 'x'", "--input-shape x:")
    code, out, err = run_cli(capsys, "bitops", str(p), "--input-shape", "x:2,3,4,4", "--json")
    assert code == 0, err
    assert json.loads(out)["flops"] == 2 * 2 * 16 * 8 * 27
    code, _, err = run_cli(capsys, "bitops", str(p), "--input-shape", "x=2,3")
    assert_one_line_error(code, err, "--input-shape")


def test_cli_shape_from_data(capsys, tmp_path):
    p = tmp_path / "dyn.onnx"
    onnx.save(_dynamic_spatial(), p)
    d = tmp_path / "data"
    d.mkdir()
    np.save(d / "x.npy", np.zeros((3, 1, 3, 6, 6), np.float32))
    code, out, err = run_cli(capsys, "bitops", str(p), "--data", str(d), "--json")
    assert code == 0, err
    assert json.loads(out)["flops"] == 2 * 36 * 8 * 27


def test_cli_errors(capsys, chain_path, tmp_path):
    code, _, err = run_cli(capsys, "bitops", str(tmp_path / "missing.onnx"))
    assert_one_line_error(code, err, "missing.onnx")
    code, _, err = run_cli(capsys, "bitops", str(chain_path), "--weight-bits", "3")
    assert_one_line_error(code, err, "--weight-bits")
    bad = tmp_path / "bad.yaml"
    bad.write_text("layers:\n  /c2/Conv: {weights: {bits: 5}}\n")
    code, _, err = run_cli(capsys, "bitops", str(chain_path), "-c", str(bad))
    assert_one_line_error(code, err, "bits")


def _lstm_head(direction: str = "bidirectional") -> onnx.ModelProto:
    """Conv features [1, 4, 6, 10] -> a sequence of 10 steps -> a float LSTM (hidden 5) -> Gemm."""
    d = 2 if direction == "bidirectional" else 1
    rng = np.random.default_rng(3)
    inits = [
        _w(1, 4, 2, 3, 3),
        numpy_helper.from_array(np.array([10, 1, 24], np.int64), "seq_shape"),
        numpy_helper.from_array((rng.standard_normal((d, 20, 24)) * 0.2).astype(np.float32), "W"),
        numpy_helper.from_array((rng.standard_normal((d, 20, 5)) * 0.2).astype(np.float32), "R"),
        numpy_helper.from_array(np.array([10, d * 5], np.int64), "flat_shape"),
        _w(2, d * 5, 3),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["f"], name="/conv/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Transpose", ["f"], ["ft"], name="/t/Transpose", perm=[3, 0, 1, 2]),
        helper.make_node("Reshape", ["ft", "seq_shape"], ["seq"], name="/r/Reshape"),
        helper.make_node(
            "LSTM", ["seq", "W", "R"], ["y"], name="/rnn/LSTM", hidden_size=5, direction=direction
        ),
        helper.make_node("Transpose", ["y"], ["yt"], name="/t2/Transpose", perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["yt", "flat_shape"], ["flat"], name="/r2/Reshape"),
        helper.make_node("MatMul", ["flat", "w2"], ["out"], name="/fc/MatMul"),
    ]
    return _model(nodes, [_vi("x", [1, 2, 6, 10])], [_vi("out", [10, 3])], inits)


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_float_lstm_counts_at_32_bits(direction):
    d = 2 if direction == "bidirectional" else 1
    row, rep, plan = _layer(_lstm_head(direction), "/rnn/LSTM")
    # 10 steps x batch 1 x directions x 4 gates x hidden 5 x (input 24 + hidden 5) MACs, x2
    assert row.flops == 2 * 10 * 1 * d * 20 * (24 + 5)
    assert (row.act_bits, row.weight_bits, row.bitops) == (32, 32, row.flops * 32 * 32)
    assert rep.int8_total == 64 * rep.flops
    assert rep.ratio_to_int8 > 1.0  # the float LSTM is not at INT8 cost
    assert "/rnn/LSTM" in plan.float_ops and "32 x 32" in plan.float_ops["/rnn/LSTM"]


def test_quantize_summary_lists_a_float_lstm_as_float_compute():
    res = api.quantize(
        _lstm_head(),
        [{"x": np.random.default_rng(i).random((1, 2, 6, 10), np.float32)} for i in range(4)],
        cache_dir=None,
    )
    assert res.summary.float_compute.get("LSTM") == 1
    assert res.summary.bitops.ratio_to_int8 > 1.0


@pytest.mark.parametrize(
    "cfg", ["configs/w4a8.yaml", "configs/mixed_example.yaml", "configs/int16.yaml"]
)
def test_bitops_reads_the_bits_of_a_qdq_model(cfg, tmp_path):
    """bitops of amq's QDQ model = bitops of the float model under the config that made it."""
    from tests.conftest import CALIB, EXAMPLE, ROOT

    q = amq.quantize(EXAMPLE, CALIB, ROOT / cfg, output=tmp_path / "q.onnx", cache_dir=None)
    want, _ = api.bitops_of(EXAMPLE, q.config_path)
    got, _ = api.bitops_of(tmp_path / "q.onnx")
    w = {r.name: (r.flops, r.weight_bits, r.act_bits) for r in want.layers}
    g = {r.name: (r.flops, r.weight_bits, r.act_bits) for r in got.layers}
    assert g == w and got.total == want.total


def test_cli_bitops_of_a_qdq_model(capsys, tmp_path):
    from tests.conftest import CALIB, EXAMPLE

    amq.quantize(
        EXAMPLE,
        CALIB,
        config_from_dict({"weights": {"bits": 4}}),
        output=tmp_path / "q.onnx",
        cache_dir=None,
    )
    code, out, err = run_cli(capsys, "bitops", str(tmp_path / "q.onnx"), "--json")
    assert code == 0, err
    assert json.loads(out)["ratio_to_int8"] == pytest.approx(0.5, abs=0.01)
