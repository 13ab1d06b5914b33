"""`amq check` / api.check: unfused patterns, shared tensors, unsupported ops on float models; for
QDQ models, per-op-type integer types (counted here independently from the graph) and float
islands."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter, defaultdict

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import amq
from amq import api
from amq.config import Config, SmoothMode, SmoothQuantConfig, config_from_dict
from tests.cli_helpers import run_cli

QDQ = ("QuantizeLinear", "DequantizeLinear")


def _model(nodes, inputs, outputs, inits, name="m") -> onnx.ModelProto:
    g = helper.make_graph(nodes, name, inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _init(name, *shape, scale=0.3, seed=0):
    rng = np.random.default_rng(abs(hash(name)) % 1000 + seed)
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def patterns_model(
    bn: bool = False,
    relu: bool = False,
    matmul_add: bool = False,
    shared: bool = False,
    unsupported: str | None = None,
) -> onnx.ModelProto:
    """x[1,3,8,8] -> /conv1/Conv [-> /bn/BatchNormalization] -> /conv2/Conv [-> /relu/Relu]
    -> t2 -> /conv3/Conv [+ /conv4/Conv reading t2 too, -> /sum/Add] [-> /odd/<unsupported>]
    -> /Flatten -> /fc/MatMul [-> /fc/Add bias] -> y. Each flag plants one finding."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="/conv1/Conv", pads=[1] * 4)]
    inits = [_init("w1", 4, 3, 3, 3), _init("w2", 4, 4, 3, 3), _init("w3", 2, 4, 1, 1)]
    t = "c1"
    if bn:
        nodes.append(
            helper.make_node(
                "BatchNormalization",
                ["c1", "g", "be", "mu", "var"],
                ["n1"],
                name="/bn/BatchNormalization",
            )
        )
        inits += [
            numpy_helper.from_array(np.full(4, 1.5, np.float32), "g"),
            numpy_helper.from_array(np.full(4, 0.1, np.float32), "be"),
            numpy_helper.from_array(np.full(4, 0.2, np.float32), "mu"),
            numpy_helper.from_array(np.full(4, 2.0, np.float32), "var"),
        ]
        t = "n1"
    nodes.append(helper.make_node("Conv", [t, "w2"], ["c2"], name="/conv2/Conv", pads=[1] * 4))
    t = "c2"
    if relu:
        nodes.append(helper.make_node("Relu", ["c2"], ["t2"], name="/relu/Relu"))
        t = "t2"
    nodes.append(helper.make_node("Conv", [t, "w3"], ["c3"], name="/conv3/Conv"))
    t3 = "c3"
    if shared:
        inits.append(_init("w4", 2, 4, 1, 1))
        nodes += [
            helper.make_node("Conv", [t, "w4"], ["c4"], name="/conv4/Conv"),
            helper.make_node("Add", ["c3", "c4"], ["s"], name="/sum/Add"),
        ]
        t3 = "s"
    if unsupported:
        nodes.append(helper.make_node(unsupported, [t3], ["u"], name=f"/odd/{unsupported}"))
        t3 = "u"
    nodes += [
        helper.make_node("Flatten", [t3], ["f"], name="/Flatten"),
        helper.make_node("MatMul", ["f", "wf"], ["m" if matmul_add else "y"], name="/fc/MatMul"),
    ]
    inits.append(_init("wf", 128, 5))
    if matmul_add:
        nodes.append(helper.make_node("Add", ["m", "bf"], ["y"], name="/fc/Add"))
        inits.append(numpy_helper.from_array(np.full(5, 0.1, np.float32), "bf"))
    return _model(nodes, [_vi("x", [1, 3, 8, 8])], [_vi("y", [1, 5])], inits)


def _feeds(shape=(1, 3, 8, 8), n=8, seed=1):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def kinds(rep) -> Counter:
    return Counter(f.kind for f in rep.findings)


# ---------------------------------------------------------------------------------------------
# float models: each planted pattern found, and only when planted


def test_clean_model_has_no_findings():
    rep = api.check(patterns_model())
    assert not rep.quantized_model
    assert rep.findings == [] and rep.unsupported == {} and rep.dtype_stats == {}


@pytest.mark.parametrize(
    "flag, kind, where",
    [
        ("bn", "unfolded BatchNorm", "/conv1/Conv -> /bn/BatchNormalization"),
        ("relu", "Conv + activation", "/conv2/Conv -> /relu/Relu"),
        ("matmul_add", "MatMul + bias Add", "/fc/MatMul -> /fc/Add"),
        ("shared", "shared tensor", "c2"),
    ],
)
def test_each_pattern_found_alone(flag, kind, where):
    rep = api.check(patterns_model(**{flag: True}))
    assert kinds(rep) == Counter({kind: 1}), rep.findings
    assert rep.by_kind(kind)[0].where == where
    assert rep.unsupported == {}  # a BatchNorm that folds is not an unsupported op


def test_shared_tensor_detail_names_readers():
    rep = api.check(patterns_model(shared=True, relu=True))
    (f,) = rep.by_kind("shared tensor")
    assert f.where == "t2"
    assert "read by 2 quantizable nodes" in f.detail
    assert "/conv3/Conv" in f.detail and "/conv4/Conv" in f.detail
    # the Relu is still /conv2/Conv's only consumer
    assert rep.by_kind("Conv + activation")[0].where == "/conv2/Conv -> /relu/Relu"


def test_all_patterns_together():
    rep = api.check(
        patterns_model(bn=True, relu=True, matmul_add=True, shared=True, unsupported="Erf")
    )
    assert kinds(rep) == Counter(
        {
            "unfolded BatchNorm": 1,
            "Conv + activation": 1,
            "MatMul + bias Add": 1,
            "shared tensor": 1,
        }
    )
    assert rep.unsupported == {"Erf": 1}


@pytest.mark.parametrize("op", ["Erf", "Softplus", "Tanh"])
def test_unsupported_op_counted(op):
    rep = api.check(patterns_model(unsupported=op))
    assert rep.unsupported == {op: 1}
    assert rep.findings == []


def test_topk_and_batchnorm_that_cannot_fold_are_unsupported():
    """TopK (two outputs) after a Gemm; a BatchNorm after an Add (no Conv/Gemm to fold into)."""
    nodes = [
        helper.make_node("Gemm", ["x", "w"], ["h"], name="/fc/Gemm", transB=1),
        helper.make_node("Add", ["h", "h2"], ["a"], name="/Add"),
        helper.make_node("BatchNormalization", ["a", "g", "b", "mu", "var"], ["n"], name="/bn/BN"),
        helper.make_node("TopK", ["n", "k"], ["vals", "idx"], name="/TopK", axis=-1),
    ]
    inits = [
        _init("w", 6, 4),
        numpy_helper.from_array(np.ones(6, np.float32), "g"),
        numpy_helper.from_array(np.zeros(6, np.float32), "b"),
        numpy_helper.from_array(np.zeros(6, np.float32), "mu"),
        numpy_helper.from_array(np.ones(6, np.float32), "var"),
        numpy_helper.from_array(np.array([2], np.int64), "k"),
    ]
    m = _model(
        nodes,
        [_vi("x", [2, 4]), _vi("h2", [2, 6])],
        [_vi("vals", [2, 2]), _vi("idx", [2, 2], TensorProto.INT64)],
        inits,
    )
    rep = api.check(m)
    assert rep.unsupported == {"BatchNormalization": 1, "TopK": 1}
    assert rep.findings == []


def test_conv_relu_not_reported_when_conv_output_is_read_twice():
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="/c1/Conv"),
        helper.make_node("Relu", ["c1"], ["r"], name="/Relu"),
        helper.make_node("Sigmoid", ["c1"], ["s"], name="/Sigmoid"),
        helper.make_node("Add", ["r", "s"], ["y"], name="/Add"),
    ]
    m = _model(nodes, [_vi("x", [1, 3, 4, 4])], [_vi("y", [1, 2, 4, 4])], [_init("w1", 2, 3, 1, 1)])
    rep = api.check(m)
    assert rep.by_kind("Conv + activation") == []
    assert rep.by_kind("shared tensor") == []  # one quantizable reader (Add reads r and s)
    assert rep.unsupported == {"Sigmoid": 1}


def test_matmul_add_of_two_activations_is_no_bias_pattern():
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"], name="/fc/MatMul"),
        helper.make_node("Add", ["m", "x2"], ["y"], name="/res/Add"),
    ]
    m = _model(nodes, [_vi("x", [2, 4]), _vi("x2", [2, 3])], [_vi("y", [2, 3])], [_init("w", 4, 3)])
    assert api.check(m).findings == []


# ---------------------------------------------------------------------------------------------
# quantized models: dtype statistics counted independently


TYPE = {
    TensorProto.INT4: "int4",
    TensorProto.UINT4: "int4",
    TensorProto.INT8: "int8",
    TensorProto.UINT8: "int8",
    TensorProto.INT16: "int16",
    TensorProto.UINT16: "int16",
    TensorProto.INT32: "int32",
}


def count_dtypes(model: onnx.ModelProto) -> dict[str, dict[str, int]]:
    """Per op type: how many float / integer inputs and outputs, read off the QDQ graph with
    onnx's own shape inference for the types of the quantized tensors."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    elem = {}
    for vi in (
        list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    ):
        elem[vi.name] = vi.type.tensor_type.elem_type
    for t in model.graph.initializer:
        elem[t.name] = t.data_type
    dq_input = {
        n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"
    }
    q_of = {n.input[0]: n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    stats: dict[str, Counter] = defaultdict(Counter)
    for n in model.graph.node:
        if n.op_type in QDQ:
            continue
        for i in n.input:
            if i in dq_input:
                stats[n.op_type]["in:" + TYPE[elem[dq_input[i]]]] += 1
            elif i and elem.get(i) == TensorProto.FLOAT:
                stats[n.op_type]["in:float"] += 1
        for o in n.output:
            if o in q_of:
                stats[n.op_type]["out:" + TYPE[elem[q_of[o]]]] += 1
            else:
                stats[n.op_type]["out:float"] += 1
    return {k: dict(v) for k, v in stats.items()}


def _quantize(model, cfg=None):
    # the dtype facts below are those of the graph as built: SmoothQuant would insert a Div
    # before /fc/MatMul or not depending on the weights, which _init seeds from hash(name)
    cfg = dataclasses.replace(
        cfg or Config(), smoothquant=SmoothQuantConfig(enabled=SmoothMode.OFF)
    )
    return amq.quantize(model, _feeds(), cfg, cache_dir=None).model


def test_dtype_stats_int8_match_graph_counts():
    q = _quantize(patterns_model(relu=True, shared=True, matmul_add=True))
    rep = api.check(q)
    assert rep.quantized_model
    assert rep.dtype_stats == count_dtypes(q)
    # and a few facts by hand: 4 Convs read an int8 activation and int8 weights (no bias)
    conv = rep.dtype_stats["Conv"]
    assert conv["in:int8"] == 8 and "in:float" not in conv and "in:int32" not in conv
    assert rep.dtype_stats["MatMul"]["in:int8"] == 2
    assert rep.by_kind("float island") == []


def test_dtype_stats_int4_weights_and_int16_activations():
    cfg = config_from_dict(
        {"weights": {"bits": 4}, "layers": {"/conv3/Conv": {"activations": {"bits": 16}}}}
    )
    q = _quantize(patterns_model(relu=True), cfg)
    rep = api.check(q)
    assert rep.dtype_stats == count_dtypes(q)
    conv = rep.dtype_stats["Conv"]
    assert conv["in:int4"] == 3  # every Conv weight
    assert conv["out:int16"] == 1  # /conv2/Conv writes the group /conv3/Conv reads at 16 bits
    assert rep.dtype_stats["Relu"]["in:int16"] == 1
    assert rep.dtype_stats["MatMul"]["in:int4"] == 1


def test_dtype_stats_on_skipped_layer_show_float():
    cfg = config_from_dict({"layers": {"/fc/MatMul": {"skip": True}}})
    q = _quantize(patterns_model(relu=True), cfg)
    rep = api.check(q)
    assert rep.dtype_stats == count_dtypes(q)
    # the skipped MatMul reads its float weight; its input is still the int8 output of the
    # quantized /conv3/Conv
    assert rep.dtype_stats["MatMul"] == {"in:float": 1, "in:int8": 1, "out:float": 1}


def test_unsupported_op_in_quantized_model():
    q = _quantize(patterns_model(relu=True, unsupported="Erf"))
    rep = api.check(q)
    assert rep.unsupported == {"Erf": 1}
    assert rep.by_kind("float island") == []  # Q/DQ around it: not an island
    assert rep.dtype_stats == count_dtypes(q)


# ---------------------------------------------------------------------------------------------
# float islands


def island_model() -> onnx.ModelProto:
    """x -> /pre/Sigmoid -> /c1/Conv -> /Sigmoid -> /c2/Conv -> /post/Erf -> y: a float op
    between the two Convs, one before the first (on the input) and one after the last."""
    nodes = [
        helper.make_node("Sigmoid", ["x"], ["xs"], name="/pre/Sigmoid"),
        helper.make_node("Conv", ["xs", "w1"], ["c1"], name="/c1/Conv", pads=[1] * 4),
        helper.make_node("Sigmoid", ["c1"], ["s"], name="/Sigmoid"),
        helper.make_node("Conv", ["s", "w2"], ["c2"], name="/c2/Conv", pads=[1] * 4),
        helper.make_node("Erf", ["c2"], ["y"], name="/post/Erf"),
    ]
    inits = [_init("w1", 4, 3, 3, 3), _init("w2", 2, 4, 3, 3)]
    return _model(nodes, [_vi("x", [1, 3, 8, 8])], [_vi("y", [1, 2, 8, 8])], inits)


def strip_qdq(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """Remove the Q -> DQ pair after each of ``tensors``: its readers read the float tensor."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in tensors:
        q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == t)
        dq = next(
            n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0]
        )
        for n in m.graph.node:
            for k, i in enumerate(n.input):
                if i == dq.output[0]:
                    n.input[k] = t
        m.graph.node.remove(q)
        m.graph.node.remove(dq)
    onnx.checker.check_model(m)
    return m


def test_float_island_reported_only_when_planted():
    q = _quantize(island_model())
    rep = api.check(q)
    # amq puts Q/DQ around /Sigmoid (DQ(c1) -> Sigmoid -> Q/DQ(s) -> /c2/Conv): no island
    assert rep.by_kind("float island") == []
    assert rep.unsupported == {"Erf": 1, "Sigmoid": 2}
    # by hand: drop the Q/DQ after /c1/Conv, so /Sigmoid computes on the raw float output
    cut = strip_qdq(q, ["c1"])
    rep = api.check(cut)
    islands = {f.where: f.detail for f in rep.by_kind("float island")}
    assert islands == {"/Sigmoid": "Sigmoid runs in float between quantized layers"}
    assert rep.dtype_stats == count_dtypes(cut)
    # /pre/Sigmoid reads the float graph input and /Sigmoid the raw c1
    assert rep.dtype_stats["Sigmoid"]["in:float"] == 2


def test_float_op_before_first_or_after_last_quantized_layer_is_no_island():
    q = _quantize(island_model())
    # with the Q/DQ before the first Conv and after the last one removed, /pre/Sigmoid and
    # /post/Erf compute in float, but not between quantized layers: no island
    cut = strip_qdq(q, ["xs", "c2"])
    assert any(n.name == "/pre/Sigmoid" for n in cut.graph.node)
    rep = api.check(cut)
    assert rep.by_kind("float island") == []
    assert rep.dtype_stats["Erf"] == {"in:float": 1, "out:float": 1}


# ---------------------------------------------------------------------------------------------
# amq check


def test_cli_check_float_model(capsys, tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(
        patterns_model(bn=True, relu=True, matmul_add=True, shared=True, unsupported="Erf"), p
    )
    code, out, err = run_cli(capsys, "check", str(p))
    assert code == 0, err
    flat = " ".join(out.split())
    for s in ("unfolded BatchNorm", "Conv + activation", "MatMul + bias Add", "shared tensor"):
        assert s in flat
    assert "Ops amq leaves float" in flat and "Erf" in flat
    assert (
        "unfolded BatchNorm: 1, Conv + activation: 1, MatMul + bias Add: 1, shared tensor: 1, "
        "float island: 0" in flat
    )
    code, out, err = run_cli(capsys, "check", str(p), "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["quantized_model"] is False
    assert d["unsupported_ops"] == {"Erf": 1}
    assert len(d["findings"]) == 4


def test_cli_check_quantized_model_json(capsys, tmp_path):
    q = strip_qdq(_quantize(island_model()), ["c1"])
    p = tmp_path / "q.onnx"
    onnx.save(q, p)
    code, out, err = run_cli(capsys, "check", str(p), "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["quantized_model"] is True
    assert d["dtype_stats"] == count_dtypes(q)
    assert [f["where"] for f in d["findings"] if f["kind"] == "float island"] == ["/Sigmoid"]
    code, out, err = run_cli(capsys, "check", str(p))
    assert code == 0, err
    assert "Input/output types per op type" in " ".join(out.split())
    assert "float island: 1" in out


def test_cli_check_errors(capsys, tmp_path):
    code, _, err = run_cli(capsys, "check", str(tmp_path / "nope.onnx"))
    assert code == 2 and err.startswith("amq: error: ") and "nope.onnx" in err
    assert len(err.strip().splitlines()) == 1
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model at all")
    code, _, err = run_cli(capsys, "check", str(bad))
    assert code == 2 and "bad.onnx" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# int16 pair-sum overflow on x86 without VNNI (PITFALLS 9)

EXAMPLE = "examples/digits_cnn.onnx"
CALIB = "calib_data/"


def _digits(overflow: str) -> onnx.ModelProto:
    cfg = config_from_dict({"weights": {"overflow": overflow}, "calibration": {"num_samples": 64}})
    return amq.quantize(EXAMPLE, CALIB, cfg, cache_dir=None).model


def _overflow(rep, kind: str) -> dict[str, str]:
    return {f.where: f.detail for f in rep.by_kind(kind)}


def test_check_lists_overflow_risk_and_measures_it_with_data():
    off = _digits("off")
    risk = _overflow(api.check(off), "overflow risk")
    assert "/stem/conv/Conv" in risk and "output channels" in risk["/stem/conv/Conv"]
    assert not _overflow(api.check(off), "overflow measured")  # no data, no measurement
    measured = _overflow(api.check(off, CALIB), "overflow measured")
    pct = float(measured["/stem/conv/Conv"].split("%")[0])
    assert 5 < pct < 40  # the image's high codes: the note measured 14.6 % on this model


def test_check_finds_no_risk_where_amq_guarded():
    auto = _digits("auto")
    risk = _overflow(api.check(auto, CALIB), "overflow risk")
    assert "/stem/conv/Conv" not in risk  # its weights are pair-safe for any input
    guarded = _digits("guard")
    rep = api.check(guarded, CALIB)
    assert not _overflow(rep, "overflow risk") and not _overflow(rep, "overflow measured")


def test_cli_check_data(capsys):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "q.onnx"
        onnx.save(_digits("off"), path)
        code, out, _ = run_cli(capsys, "check", str(path), "--data", CALIB, "--json")
    assert code == 0
    kinds = Counter(f["kind"] for f in json.loads(out)["findings"])
    assert kinds["overflow risk"] >= 1 and kinds["overflow measured"] >= 1
