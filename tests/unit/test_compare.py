"""amq compare: matching through Q/DQ nodes, streamed metrics against numpy on the full data,
the clipping/rounding diagnosis on planted cases, reports and one-line CLI errors."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import amq
from amq import api
from amq.analysis import compare as C
from amq.config import Config, with_overrides
from amq.errors import ModelError
from tests.conftest import EVAL, EXAMPLE
from tests.unit.test_cli import assert_one_line_error, run

D = 256  # values per sample


# ---------------------------------------------------------------------------------------------
# hand-written float / QDQ pairs whose quantizer we choose


def _zp_tensor(name: str, zp: int, etype: int) -> TensorProto:
    if etype in (TensorProto.INT4, TensorProto.UINT4):
        return helper.make_tensor(name, etype, [], [zp])
    dt = {
        TensorProto.INT8: np.int8,
        TensorProto.UINT8: np.uint8,
        TensorProto.INT16: np.int16,
        TensorProto.UINT16: np.uint16,
    }
    return numpy_helper.from_array(np.array(zp, dtype=dt[etype]), name)


def pair(
    scale: float, zp: int, etype: int, reader: str = "Abs", tensor: str = "t"
) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """float: t = x * 1; y = reader(t).  QDQ: the same with Q/DQ(scale, zp) on t (named ``tensor``
    in the QDQ model, to plant an unmatched name)."""
    one = numpy_helper.from_array(np.array(1.0, np.float32), "one")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", D])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", D])

    def model(nodes, inits):
        g = helper.make_graph(nodes, "pair", [x], [y], initializer=inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
        m.ir_version = 10
        onnx.checker.check_model(m)
        return m

    fm = model(
        [
            helper.make_node("Mul", ["x", "one"], ["t"], name="mul"),
            helper.make_node(reader, ["t"], ["y"], name="reader"),
        ],
        [one],
    )
    inits = [
        one,
        numpy_helper.from_array(np.array(scale, np.float32), "s"),
        _zp_tensor("z", zp, etype),
    ]
    qm = model(
        [
            helper.make_node("Mul", ["x", "one"], [tensor], name="mul"),
            helper.make_node("QuantizeLinear", [tensor, "s", "z"], ["tq"], name="q"),
            helper.make_node("DequantizeLinear", ["tq", "s", "z"], ["td"], name="dq"),
            helper.make_node(reader, ["td"], ["y"], name="reader"),
        ],
        inits,
    )
    return fm, qm


def samples(x: np.ndarray) -> list[dict[str, np.ndarray]]:
    return [{"x": x[i : i + 1]} for i in range(len(x))]


def clipping_data(n: int = 200, frac: float = 0.003, seed: int = 0) -> tuple[np.ndarray, float]:
    """Bulk uniform in (-1, 1), a planted fraction of huge outliers (|x| in 20..50)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-0.999, 0.999, (n, D)).astype(np.float32)
    k = int(round(frac * x.size))
    idx = rng.choice(x.size, k, replace=False)
    x.reshape(-1)[idx] = (rng.choice([-1, 1], k) * rng.uniform(20, 50, k)).astype(np.float32)
    return x, k / x.size


def rounding_data(n: int = 200, seed: int = 1) -> np.ndarray:
    """90% small values (N(0, 0.3)), 10% a wide tail up to |x| = 8: non-uniform."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, D)) * 0.3).astype(np.float32)
    tail = rng.random((n, D)) < 0.1
    x[tail] = (rng.choice([-1, 1], tail.sum()) * rng.uniform(2, 8, tail.sum())).astype(np.float32)
    return x


def _dq_output(qm: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    m = onnx.ModelProto()
    m.CopyFrom(qm)
    m.graph.output.append(onnx.ValueInfoProto(name="td"))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["td"], {"x": x})[0]


# ---------------------------------------------------------------------------------------------
# planted cases


def test_planted_clipping_is_diagnosed_clipping():
    x, planted = clipping_data()
    s = 1.0 / 127  # symmetric int8 for a range of +-1: the outliers are far outside
    fm, qm = pair(s, 0, TensorProto.INT8)
    rep = api.compare(fm, qm, samples(x), batch_size=16)
    r = rep.row("t")
    assert r.diagnosis == "clipping", r
    assert r.clipped_fraction == pytest.approx(planted, rel=1e-9)
    assert r.clip_share > 0.99
    assert r.overshoot == pytest.approx((np.abs(x).max() - 1.0) / s, rel=1e-3)
    assert r.own_sqnr_db < 10
    assert "wider range" in r.suggestion and "percentile 99.999" in r.suggestion
    assert r.dtype == "int8" and r.bits == 8 and r.zero_point == 0
    assert r.scale == pytest.approx(s, rel=1e-6)


def test_planted_rounding_is_diagnosed_rounding():
    x = rounding_data()
    lo, hi = -9.0, 9.0  # uint4 minmax-style range: everything fits, the step is 1.2
    s = (hi - lo) / 15
    zp = int(np.rint(0 - lo / s))
    fm, qm = pair(s, zp, TensorProto.UINT4)
    rep = api.compare(fm, qm, samples(x), batch_size=16)
    r = rep.row("t")
    assert r.diagnosis == "rounding", r
    assert r.clipped_fraction == 0.0 and r.clip_share == 0.0
    assert r.own_sqnr_db < C.OK_SQNR_DB
    assert r.zeroed_fraction > 0.5  # the small values round to zero
    assert "more bits (INT8, or INT16)" in r.suggestion and "round to zero" in r.suggestion
    assert r.dtype == "uint4" and r.bits == 4 and r.zero_point == zp


def test_fine_quantizer_is_ok():
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (64, D)).astype(np.float32)
    fm, qm = pair(2.0 / 65535, 32768, TensorProto.UINT16)  # 16 bits over [-1, 1]
    r = api.compare(fm, qm, samples(x)).row("t")
    assert r.diagnosis == "ok" and r.own_sqnr_db > 80 and r.clipped_fraction == 0.0


def test_metrics_match_numpy_on_the_full_data():
    x, _ = clipping_data(n=90, frac=0.01, seed=5)
    s, zp = 1.5 / 255, 128
    fm, qm = pair(s, zp, TensorProto.UINT8)
    q = _dq_output(qm, x).astype(np.float64)
    r64 = x.astype(np.float64)
    e = r64 - q
    streamed = api.compare(fm, qm, samples(x), batch_size=7).row("t")
    one_pass = api.compare(fm, qm, samples(x), batch_size=1000).row("t")

    fq = (np.clip(np.rint(r64 / s) + zp, 0, 255) - zp) * s
    out = (r64 < (0 - zp - 0.5) * s) | (r64 > (255 - zp + 0.5) * s)
    own = np.sum((r64 - fq) ** 2)
    cos = [
        float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
        for a, b in zip(r64, q, strict=True)
    ]
    expected = {
        "sqnr_db": 10 * math.log10(np.sum(r64**2) / np.sum(e**2)),
        "mse": np.mean(e**2),
        "l1": np.mean(np.abs(e)),
        "max_abs_diff": np.max(np.abs(e)),
        "cosine": np.mean(cos),
        "float_min": r64.min(),
        "float_max": r64.max(),
        "float_mean": r64.mean(),
        "float_var": r64.var(),
        "quant_min": q.min(),
        "quant_max": q.max(),
        "quant_mean": q.mean(),
        "quant_var": q.var(),
        "clipped_fraction": out.mean(),
        "own_sqnr_db": 10 * math.log10(np.sum(r64**2) / own),
        "clip_share": np.sum(((r64 - fq) ** 2)[out]) / own,
        "zeroed_fraction": np.mean((fq == 0) & (r64 != 0)),
        "input_sqnr_db": math.inf,  # the Q reads exactly the float tensor
    }
    for row in (streamed, one_pass):
        for k, v in expected.items():
            assert getattr(row, k) == pytest.approx(v, rel=1e-6, abs=1e-12), k
        assert row.samples == len(x) and row.values == x.size
    assert streamed.kl == pytest.approx(one_pass.kl, rel=1e-9)  # streaming = one pass
    assert streamed.kl > 0.05  # the clipped tails are mass the quantizer moved


def test_relu_reader_absorbs_the_negative_side():
    """ahead_relu: a [0, hi] grid before a Relu clips negatives on purpose; not a clipping case."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((64, D)).astype(np.float32)
    fm, qm = pair(float(x.max()) / 255, 0, TensorProto.UINT8, reader="Relu")
    r = api.compare(fm, qm, samples(x)).row("t")
    assert r.seen_through == "Relu" and "Relu" in r.note
    assert r.clipped_fraction == 0.0 and r.diagnosis == "ok"
    assert r.float_min < 0 and r.quant_min == 0.0  # raw statistics are still reported
    np_q = np.maximum(_dq_output(qm, x), 0).astype(np.float64)
    ref = np.maximum(x, 0).astype(np.float64)
    assert r.mse == pytest.approx(np.mean((ref - np_q) ** 2), rel=1e-6)


def test_unmatched_tensor_is_a_note_not_an_error():
    x, _ = clipping_data(n=16)
    fm, qm = pair(1 / 127, 0, TensorProto.INT8, tensor="renamed")
    # a second, matched Q/DQ so that there is something to compare
    qm.graph.node[-1].input[0] = "td"
    with pytest.raises(ModelError, match="none of its quantized tensors matches"):
        api.compare(fm, qm, samples(x))
    fm2, qm2 = pair(1 / 127, 0, TensorProto.INT8)
    extra = [
        helper.make_node("QuantizeLinear", ["ghost_in", "s", "z"], ["gq"], name="q2"),
        helper.make_node("DequantizeLinear", ["gq", "s", "z"], ["gd"], name="dq2"),
        helper.make_node("Identity", ["td"], ["ghost_in"], name="ghost"),
    ]
    qm2.graph.node.extend([extra[2], extra[0], extra[1]])
    rep = api.compare(fm2, qm2, samples(x))
    assert [r.name for r in rep.rows] == ["t"]
    assert any("ghost_in" in n and "unmatched" in n for n in rep.notes)


def _qp(scale: float, zp: int, bits: int = 8) -> C.QParams:
    from amq.quant import qmath

    return C.QParams(np.array(scale), np.array(float(zp)), qmath.grid(bits, False), f"uint{bits}")


def _fq(x: np.ndarray, qp: C.QParams) -> np.ndarray:
    return qp.fake_quantize(x)


def test_weight_quantized_in_the_graph_and_clip_reader():
    """Q(W) -> DQ on a float initializer (onnxruntime's QDQ form) is a weight row; a Clip reader
    with constant bounds is applied to both sides."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((D, 8)).astype(np.float32)
    sw = np.abs(w).max(axis=0) / 127
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", D])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])
    inits = [
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(sw.astype(np.float32), "sw"),
        numpy_helper.from_array(np.zeros(8, np.int8), "zw"),
        numpy_helper.from_array(np.array(0.05, np.float32), "sa"),
        numpy_helper.from_array(np.array(0, np.int8), "za"),
        numpy_helper.from_array(np.array(-1.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(1.0, np.float32), "hi"),
    ]

    def model(nodes):
        g = helper.make_graph(nodes, "mm", [x], [y], initializer=inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
        m.ir_version = 10
        return m

    fm = model(
        [
            helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
            helper.make_node("Clip", ["m", "lo", "hi"], ["y"], name="clip"),
        ]
    )
    qm = model(
        [
            helper.make_node("QuantizeLinear", ["W", "sw", "zw"], ["Wq"], name="qw", axis=1),
            helper.make_node("DequantizeLinear", ["Wq", "sw", "zw"], ["Wd"], name="dqw", axis=1),
            helper.make_node("MatMul", ["x", "Wd"], ["m"], name="mm"),
            helper.make_node("QuantizeLinear", ["m", "sa", "za"], ["mq"], name="qa"),
            helper.make_node("DequantizeLinear", ["mq", "sa", "za"], ["md"], name="dqa"),
            helper.make_node("Clip", ["md", "lo", "hi"], ["y"], name="clip"),
        ]
    )
    xs = rng.standard_normal((32, D)).astype(np.float32)
    rep = api.compare(fm, qm, samples(xs))
    rw = rep.row("W")
    wq = np.clip(np.rint(w / sw), -128, 127) * sw
    e = w.astype(np.float64) - wq
    assert rw.kind == "weight" and rw.axis == 1 and rw.node == "mm"
    assert rw.sqnr_db == pytest.approx(
        10 * np.log10(np.sum(w.astype(np.float64) ** 2) / np.sum(e**2)), rel=1e-5
    )
    assert rw.worst_channel_sqnr_db <= rw.sqnr_db and rw.diagnosis == "ok"
    ra = rep.row("m")
    assert ra.seen_through == "Clip"
    # the activation's grid [-6.4, 6.35] is far wider than what the Clip keeps: nothing clipped
    assert ra.clipped_fraction == 0.0 and ra.float_max > 1.0


def test_kl_on_the_quantizer_levels():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, 200_000)
    qp = _qp(2 / 255, 128)
    h = C.LevelHistograms(qp)
    h.update(x, _fq(x, qp))
    assert h.kl() == 0.0  # rounding alone moves no value out of its level's bin
    h = C.LevelHistograms(qp)
    h.update(x, _fq(x + 0.2, qp))  # a shift arriving from upstream
    assert h.kl() > 0.05
    wide = x * 3  # two thirds of the values clipped
    h = C.LevelHistograms(qp)
    h.update(wide, _fq(wide, qp))
    assert h.kl() == pytest.approx((2 / 3) * np.log((1 / 3) / C.KL_EPS), rel=0.05)
    # a 16-bit grid: neighbouring levels share a bin, memory stays bounded
    h16 = C.LevelHistograms(_qp(2 / 65535, 32768, bits=16))
    assert h16.p.size == C.KL_BINS + 2
    # streaming == one pass
    a, b = C.LevelHistograms(qp), C.LevelHistograms(qp)
    a.update(x, _fq(x + 0.1, qp))
    for i in range(0, len(x), 30_000):
        b.update(x[i : i + 30_000], _fq(x[i : i + 30_000] + 0.1, qp))
    assert a.kl() == b.kl()


# ---------------------------------------------------------------------------------------------
# an amq-quantized model


def test_amq_percentile_on_rare_outliers_is_clipping(tmp_path):
    """Quantize with a percentile range on data with rare huge outliers: the input's quantizer
    clips them and compare says so; weights are matched by name (W_quantized -> W)."""
    from tests.models import gemm

    model, _, _ = gemm()
    rng = np.random.default_rng(7)
    x = rng.uniform(-0.999, 0.999, (256, 16)).astype(np.float32)
    k = 4  # 0.1% of the 4096 values, below the 0.1% the 99.9 percentile trims per side
    idx = rng.choice(x.size, k, replace=False)
    x.reshape(-1)[idx] = np.array([30.0, -40.0, 25.0, -50.0], np.float32)
    data = [{"x": x[i : i + 1]} for i in range(len(x))]
    cfg = with_overrides(
        Config(),
        calibration={"method": "percentile", "percentile": 99.9, "widen_to_mse": False},
    )
    res = amq.quantize(model, data, cfg, tmp_path / "g.q.onnx", cache_dir=None)
    rep = api.compare(model, res.model, data, cfg)
    r = rep.row("x")
    assert r.diagnosis == "clipping", r
    planted = k / x.size
    # the planted outliers, plus at most what the percentile trims of the bulk
    assert planted <= r.clipped_fraction <= planted + 2 * 0.001
    assert r.overshoot > 1000 and r.clip_share > 0.99
    kinds = {row.name: row.kind for row in rep.rows}
    assert kinds["w1"] == "weight" and kinds["b1"] == "bias"
    assert rep.row("w1").diagnosis == "ok" and rep.row("w1").clipped_fraction == 0.0
    assert rep.row("w1").worst_channel_sqnr_db is not None
    assert not rep.notes


def test_bundled_example_matches_every_tensor(tmp_path):
    out = tmp_path / "d.q.onnx"
    amq.quantize(EXAMPLE, EVAL.parent / "calib_data", output=out, cache_dir=None)
    rep = api.compare(EXAMPLE, out, EVAL, samples=64)
    assert not rep.notes, rep.notes  # every Q/DQ tensor and weight matched (BN-folded ones too)
    names = {r.name for r in rep.rows}
    assert "stem.conv.weight_bnfold" in names and "fc.weight" in names
    bn = rep.row("/stem/bn/BatchNormalization_output_0")
    assert bn.seen_through == "Relu" and bn.node == "/stem/conv/Conv"
    assert rep.samples == 64
    sq = [r.sqnr_db for r in rep.rows]
    assert sq == sorted(sq)  # worst first
    assert all(r.diagnosis == "ok" for r in rep.rows)


def test_quantized_graph_output_matches_its_float_name(tmp_path):
    from tests.models import gemm

    model, calib, _ = gemm()
    cfg = with_overrides(Config(), quantize_outputs=True)
    res = amq.quantize(model, calib, cfg, cache_dir=None)
    pre = [n.input[0] for n in res.model.graph.node if n.op_type == "QuantizeLinear"]
    assert "y_float" in pre  # the graph output keeps its name on the DQ
    rep = api.compare(model, res.model, calib, cfg)
    assert rep.row("y").kind == "activation" and not rep.notes


def test_batched_matmul_weights_written_in_blocks_are_compared_per_channel():
    """amq writes an 8-bit weight [E, K, N] as one DequantizeLinear block over K, scale
    [E, 1, N] (quant/qdq.py): compare reads it back as per channel on N."""
    from tests.models import batched_matmul_weight

    model, calib, _ = batched_matmul_weight()
    res = amq.quantize(model, calib, cache_dir=None)
    assert any(
        a.name == "block_size" for n in res.model.graph.node for a in n.attribute
    )  # the blocked form is what this test reads
    rep = api.compare(model, res.model, calib)
    assert not rep.notes, rep.notes
    for w in ("w1", "w2"):
        row = rep.row(w)
        assert row.kind == "weight" and row.axis == 2 and row.diagnosis == "ok"
        assert row.scale == pytest.approx(max(res.plan.tensors[w].scale))


# ---------------------------------------------------------------------------------------------
# command line


@pytest.fixture()
def saved_pair(tmp_path):
    fm, qm = pair(1 / 127, 0, TensorProto.INT8)
    x, _ = clipping_data(n=32)
    f, q, d = tmp_path / "f.onnx", tmp_path / "q.onnx", tmp_path / "data"
    onnx.save(fm, f)
    onnx.save(qm, q)
    d.mkdir()
    np.save(d / "x.npy", x[:, None, :])  # 32 stacked samples of [1, 256]
    return f, q, d


def test_cli_writes_csv_html_json(capsys, tmp_path, saved_pair):
    f, q, d = saved_pair
    csv_p, html_p = tmp_path / "o" / "c.csv", tmp_path / "o" / "c.html"
    code, out, err = run(
        capsys,
        "compare",
        str(f),
        str(q),
        "--data",
        str(d),
        "--csv",
        str(csv_p),
        "--html",
        str(html_p),
    )
    assert code == 0, err
    assert "clipping" in out and "wider range" in out and "wrote" in out
    head, first = csv_p.read_text().splitlines()[:2]
    assert head.split(",")[:2] == ["name", "kind"] and first.startswith("t,activation")
    page = html_p.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "<table>" in page
    assert "<script" not in page and "http" not in page.replace("http://www.w3.org/2000/svg", "")
    code, out, err = run(capsys, "compare", str(f), str(q), "--data", str(d), "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["rows"][0]["diagnosis"] == "clipping" and res["samples"] == 32
    code, out, err = run(
        capsys, "compare", str(f), str(q), "--data", str(d), "-q", "--samples", "8"
    )
    assert code == 0 and out == "", err


def test_cli_missing_files(capsys, tmp_path, saved_pair):
    f, q, d = saved_pair
    code, _, err = run(capsys, "compare", str(tmp_path / "nope.onnx"), str(q), "--data", str(d))
    assert_one_line_error(code, err, "nope.onnx", "not found")
    code, _, err = run(capsys, "compare", str(f), str(tmp_path / "nq.onnx"), "--data", str(d))
    assert_one_line_error(code, err, "nq.onnx", "not found")
    code, _, err = run(capsys, "compare", str(f), str(q), "--data", str(tmp_path / "none"))
    assert_one_line_error(code, err, "none", "not found")
    code, _, err = run(capsys, "compare", str(f), str(q))
    assert_one_line_error(code, err, "--data")


def test_cli_quant_without_qdq_nodes(capsys, saved_pair):
    f, q, d = saved_pair
    code, _, err = run(capsys, "compare", str(f), str(f), "--data", str(d))
    assert_one_line_error(code, err, str(f), "no QuantizeLinear/DequantizeLinear")
    code, _, err = run(capsys, "compare", str(q), str(f), "--data", str(d))
    assert_one_line_error(code, err, "FLOAT first")


def test_cli_data_mismatch(capsys, tmp_path, saved_pair):
    f, q, _ = saved_pair
    d = tmp_path / "bad"
    d.mkdir()
    np.save(d / "x.npy", np.zeros((4, 1, 100), np.float32))
    code, _, err = run(capsys, "compare", str(f), str(q), "--data", str(d))
    assert_one_line_error(code, err, "x.npy", "shape")


def test_cli_models_of_different_graphs(capsys, tmp_path, saved_pair):
    _, q, d = saved_pair
    code, _, err = run(capsys, "compare", str(EXAMPLE), str(q), "--data", str(d))
    assert code == 2
    assert_one_line_error(code, err)


def test_cli_unwritable_report(capsys, tmp_path, saved_pair):
    f, q, d = saved_pair
    (tmp_path / "file").write_text("x")
    code, _, err = run(
        capsys,
        "compare",
        str(f),
        str(q),
        "--data",
        str(d),
        "--html",
        str(tmp_path / "file" / "r.html"),
    )
    assert_one_line_error(code, err, "r.html")


# ---------------------------------------------------------------------------------------------
# model outputs on both executions (DESIGN.md §6b)


def test_compare_reports_the_outputs_on_both_executions(tmp_path):
    x = np.load(EVAL / "input.npy")[:32]
    feeds = [{"input": x[i : i + 1]} for i in range(len(x))]
    q = amq.quantize(EXAMPLE, EVAL, cache_dir=None, output=tmp_path / "q.onnx")
    rep = api.compare(EXAMPLE, tmp_path / "q.onnx", feeds)
    by = {o["compared"]: o for o in rep.outputs if o["output"] == "logits"}
    assert set(by) == {"ideal vs float", "runtime vs float", "runtime vs ideal"}
    # ideal vs float: the Q/DQ math, computed here independently with graph optimizations off
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ideal = ort.InferenceSession(str(tmp_path / "q.onnx"), so, providers=["CPUExecutionProvider"])
    flt = ort.InferenceSession(str(EXAMPLE), providers=["CPUExecutionProvider"])
    a = flt.run(None, {"input": x})[0].astype(np.float64)
    b = ideal.run(None, {"input": x})[0].astype(np.float64)
    want = 10 * math.log10(float(np.sum(a**2) / np.sum((a - b) ** 2)))
    assert by["ideal vs float"]["sqnr_db"] == pytest.approx(want, abs=0.05)
    verdict = by["runtime vs float"]["verdict"]
    assert verdict == "ok" or verdict.startswith("off: ")
    assert rep.isa and rep.to_dict()["outputs"] == rep.outputs
    assert q.summary.isa == rep.isa


def test_output_rows_say_off_when_the_runtime_falls_below_the_math():
    from amq.analysis.fidelity import OutputFidelity
    from amq.analysis.metrics import Fidelity

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((8, 10)).astype(np.float32)
    good, bad = Fidelity(), Fidelity()
    good.update(ref, ref + 0.01 * rng.standard_normal(ref.shape).astype(np.float32))
    bad.update(ref, ref + 0.3 * rng.standard_normal(ref.shape).astype(np.float32))
    of = OutputFidelity({"y": good}, {"y": bad}, {"y": bad}, samples=8, isa="avx2")
    assert of.gaps()["y"] > 20
    rows = {r["compared"]: r for r in of.rows()}
    assert rows["runtime vs float"]["verdict"].startswith("off: ")
    rep = C.CompareReport(rows=[], outputs=of.rows())
    assert rep.counts()["runtime off (outputs)"] == 1
    same = OutputFidelity({"y": good}, {"y": good}, {"y": good})
    assert not same.gaps() and {r["verdict"] for r in same.rows()} == {"-", "ok"}


def test_hardswish_reader_absorbs_values_below_minus_three():
    """A grid from -3 before a hardswish clips what hardswish zeroes anyway: not clipping."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((64, D)) * 3).astype(np.float32)
    scale = (float(x.max()) + 3.0) / 255
    fm, qm = pair(scale, round(3.0 / scale), TensorProto.UINT8, reader="HardSwish")
    r = api.compare(fm, qm, samples(x)).row("t")
    assert r.seen_through == "hardswish" and r.clipped_fraction == 0.0
    assert r.float_min < -3 and r.diagnosis == "ok"
