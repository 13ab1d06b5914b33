"""Per-layer sensitivity end to end on a small seeded CNN with a planted bad layer: the planted
layer ranks first (single and leave-one-out), the CLI writes CSV/JSON/HTML, statistics are
reused from the cache, `quantize --int16-top` raises the most sensitive layers, and the error
paths are one-line errors with exit code 2."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import amq
import amq.calib.runner
from amq import api
from amq.analysis.sensitivity import SensitivityReport
from amq.config import Config, config_from_dict
from amq.errors import ConfigError, DataError
from tests.cli_helpers import assert_one_line_error, run_cli

LAYERS = [
    "/conv1/Conv",
    "/conv2/Conv",
    "/conv3/Conv",
    "/conv4/Conv",
    "/conv5/Conv",
    "/fc/Gemm",
]
CLASSES = 4
N_CALIB, N_EVAL = 32, 128
# cross-layer equalization (on auto for per-tensor weights) would spread the planted channel's
# range over the next layer: these tests measure sensitivity to it as planted
PER_TENSOR = config_from_dict(
    {"weights": {"granularity": "per_tensor"}, "algorithms": {"equalization": False}}
)


def _data(seed: int, n: int) -> np.ndarray:
    """n samples of one model call each: [n, 1, 3, 8, 8]."""
    return np.random.default_rng(seed).standard_normal((n, 1, 3, 8, 8)).astype(np.float32)


def _session(m: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _predict(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return _session(m).run(None, {"x": x[:, 0]})[0].argmax(1)


def cnn(plant: str | None = None) -> onnx.ModelProto:
    """x[batch,3,8,8] -> 5 x (Conv 3x3 + Relu; the last with stride 2) -> Flatten -> Gemm(128->4).

    plant="weight": /conv2/Conv output channel 0 has weights 50x the largest other weight, all
    negative with a negative bias, so the channel is always cut by the Relu (the activation range
    is unchanged) but a per-tensor weight scale leaves the other channels almost no levels.
    plant="act": a Div (not a quantizable layer) scales channel 0 of /conv3's Relu output by 200
    just before /conv4/Conv, whose weights for that channel are divided by 200 (the float
    function is unchanged): /conv4/Conv's input activation has one channel 200x wider."""
    rng = np.random.default_rng(0)

    def w(*s):
        return (rng.standard_normal(s) * np.sqrt(2.0 / np.prod(s[1:]))).astype(np.float32)

    W = {f"w{i}": w(8, 3 if i == 1 else 8, 3, 3) for i in range(1, 6)}
    W["wf"] = w(CLASSES, 128)
    B = {f"b{i}": (0.05 * rng.standard_normal(8)).astype(np.float32) for i in range(1, 6)}
    B["bf"] = (0.05 * rng.standard_normal(CLASSES)).astype(np.float32)
    inits = []
    if plant == "weight":
        W["w2"][0] = -50.0 * np.abs(W["w2"]).max()
        B["b2"][0] = -1.0
    nodes = []
    t = "x"
    for i in range(1, 6):
        if i == 4 and plant == "act":
            gain = np.ones((1, 8, 1, 1), np.float32)
            gain[0, 0] = 1.0 / 200.0
            inits.append(numpy_helper.from_array(gain, "gain"))
            nodes.append(helper.make_node("Div", [t, "gain"], ["d3"], name="/wide/Div"))
            W["w4"][:, 0] /= 200.0
            t = "d3"
        nodes += [
            helper.make_node(
                "Conv",
                [t, f"w{i}", f"b{i}"],
                [f"c{i}"],
                name=f"/conv{i}/Conv",
                pads=[1] * 4,
                strides=[2, 2] if i == 5 else [1, 1],
            ),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"/relu{i}/Relu"),
        ]
        t = f"r{i}"
    nodes += [
        helper.make_node("Flatten", [t], ["f"], name="/Flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], name="/fc/Gemm", transB=1),
    ]
    inits += [numpy_helper.from_array(v, k) for k, v in {**W, **B}.items()]
    g = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    # centre the logits over a reference batch, so that the prediction depends on the sample
    logits = _session(m).run(None, {"x": _data(99, 256)[:, 0]})[0]
    bf = next(i for i in m.graph.initializer if i.name == "bf")
    bf.CopyFrom(numpy_helper.from_array((B["bf"] - logits.mean(0)).astype(np.float32), "bf"))
    onnx.checker.check_model(m, full_check=True)
    return m


def feeds(m: onnx.ModelProto) -> tuple[list[dict], list[dict]]:
    """Calibration feeds and evaluation feeds labelled by the float model's argmax."""
    cal, ev = _data(1, N_CALIB), _data(2, N_EVAL)
    labels = _predict(m, ev)
    assert len(np.unique(labels)) == CLASSES  # every class occurs: top1 is informative
    return [{"x": c} for c in cal], [
        {"x": e, "label": int(k)} for e, k in zip(ev, labels, strict=True)
    ]


def write_data(tmp_path, m: onnx.ModelProto) -> tuple[str, str, str]:
    """The model and its data as files: (model.onnx, calib folder, eval folder with labels)."""
    mp = tmp_path / "cnn.onnx"
    onnx.save(m, mp)
    cal, ev = tmp_path / "calib", tmp_path / "eval"
    cal.mkdir()
    ev.mkdir()
    np.save(cal / "x.npy", _data(1, N_CALIB))
    x = _data(2, N_EVAL)
    np.save(ev / "x.npy", x)
    np.save(ev / "labels.npy", _predict(m, x))
    return str(mp), str(cal), str(ev)


def expected_order(rows: list[dict], bits: int) -> list[str]:
    """Most sensitive first, from the JSON rows: largest drop, ties by the lower local SQNR."""
    rs = [r for r in rows if r["bits"] == bits]
    sq = [math.inf if r["local_sqnr_db"] is None else r["local_sqnr_db"] for r in rs]
    order = sorted(range(len(rs)), key=lambda i: (-rs[i]["drop"], sq[i], rs[i]["layer"]))
    return [rs[i]["layer"] for i in order]


# ---------------------------------------------------------------------------------------------
# the planted layer ranks first


def test_outlier_weight_channel_ranks_first_with_per_tensor_weights():
    m = cnn("weight")
    cal, ev = feeds(m)
    rep = api.sensitivity(m, cal, ev, PER_TENSOR, bits=(4,), cache_dir=None)
    assert rep.metric == "top1" and rep.float_value == 100.0 and rep.samples == N_EVAL
    assert {r.layer for r in rep.rows} == set(LAYERS)
    ranked = rep.ranked(4)
    assert ranked[0].layer == "/conv2/Conv"
    assert ranked[0].drop > 50 and ranked[0].drop > 2 * ranked[1].drop
    assert ranked[0].drop_ci[0] > ranked[1].drop_ci[1]  # the CIs do not even overlap
    # its local error is the worst by far (the other channels lost their weights)
    sq = {r.layer: r.local_sqnr_db for r in rep.rows}
    assert sq["/conv2/Conv"] < 3 and min(v for k, v in sq.items() if k != "/conv2/Conv") > 10
    for r in rep.rows:
        assert r.drop == pytest.approx(100.0 - r.value)
        assert r.drop_ci[0] <= r.drop <= r.drop_ci[1]
        assert (r.weight_bits, r.act_bits, r.mode) == (4, 8, "single")
    assert rep.layer_order(4)[0] == "/conv2/Conv"


def test_outlier_weight_channel_is_harmless_per_channel():
    """The default per-channel weights give the outlier channel its own scale."""
    m = cnn("weight")
    cal, ev = feeds(m)
    rep = api.sensitivity(m, cal, ev, bits=(4,), layers=["/conv2/*"], cache_dir=None)
    (row,) = rep.rows
    assert row.layer == "/conv2/Conv"
    assert row.local_sqnr_db > 10 and row.drop < 30


def test_wide_activation_ranks_first_single_and_leave_one_out():
    m = cnn("act")
    cal, ev = feeds(m)
    single = api.sensitivity(m, cal, ev, bits=(4,), cache_dir=None)
    ranked = single.ranked(4)
    assert ranked[0].layer == "/conv4/Conv"
    assert ranked[0].drop > 1.5 * ranked[1].drop
    assert ranked[0].local_sqnr_db == min(r.local_sqnr_db for r in single.rows)

    loo = api.sensitivity(m, cal, ev, bits=(4,), mode="leave_one_out", cache_dir=None)
    assert loo.mode == "leave_one_out"
    assert 4 in loo.baselines
    base = loo.baselines[4]
    assert base["drop"] == pytest.approx(100.0 - base["value"]) and base["drop"] > 20
    ranked = loo.ranked(4)
    # keeping the planted layer float recovers the most: the lowest drop, below all-quantized
    assert ranked[0].layer == "/conv4/Conv"
    assert ranked[0].drop < base["drop"] - 10
    assert ranked[0].drop < ranked[1].drop - 10
    assert all(r.local_sqnr_db is None and r.mode == "leave_one_out" for r in loo.rows)


def test_sensitivity_value_equals_a_direct_quantization():
    """The row of the planted layer equals quantizing that layer alone with amq.quantize and
    scoring the model here."""
    m = cnn("act")
    cal, ev = feeds(m)
    rep = api.sensitivity(m, cal, ev, bits=(4,), layers=["/conv4/Conv"], cache_dir=None)
    cfg = config_from_dict(
        {
            "layers": {
                "*": {"skip": True},
                "/conv4/Conv": {"weights": {"bits": 4}, "activations": {"bits": 8}, "skip": False},
            }
        }
    )
    q = amq.quantize(m, cal, cfg, cache_dir=None)
    assert [lp.name for lp in q.plan.layers.values() if lp.quantized] == ["/conv4/Conv"]
    x = np.stack([f["x"] for f in ev])
    labels = np.array([f["label"] for f in ev])
    top1 = 100.0 * float(np.mean(_predict(q.model, x) == labels))
    (row,) = rep.rows
    assert row.value == pytest.approx(top1)


def test_sqnr_metric_without_labels_ranks_by_value():
    m = cnn("act")
    cal, ev = feeds(m)
    unlabelled = [{"x": f["x"]} for f in ev]
    rep = api.sensitivity(m, cal, unlabelled, bits=(8,), cache_dir=None)
    assert rep.metric == "sqnr"
    assert all(r.drop is None for r in rep.rows)
    assert rep.ranked(8)[0].layer == "/conv4/Conv"
    values = [r.value for r in rep.ranked(8)]
    assert values == sorted(values)  # the lowest SQNR first


# ---------------------------------------------------------------------------------------------
# the CLI: CSV / JSON / HTML


def test_cli_writes_csv_json_html(capsys, tmp_path):
    model, cal, ev = write_data(tmp_path, cnn("act"))
    out_dir = tmp_path / "out" / "sens"  # made by amq, parents included
    code, out, err = run_cli(
        capsys, "sensitivity", model, "--calib", cal, "--eval", ev, "--bits", "4,8", "-o",
        str(out_dir),
    )  # fmt: skip
    assert code == 0, err
    flat = " ".join(out.split())
    assert "One layer quantized at W4A8" in flat and "One layer quantized at W8A8" in flat
    files = ", ".join(str(out_dir / f"sensitivity.{x}") for x in ("csv", "json", "html"))
    assert f"wrote {files}" in flat

    d = json.loads((out_dir / "sensitivity.json").read_text())
    rep = SensitivityReport.from_dict(d)
    assert json.loads(rep.to_json()) == d  # round trip
    assert all(isinstance(r.drop_ci, tuple) for r in rep.rows)
    assert rep.bits == [4, 8] and len(rep.rows) == 2 * len(LAYERS)
    assert rep.ranked(4)[0].layer == "/conv4/Conv"
    assert rep.layer_order(8) == expected_order(d["rows"], 8)

    with (out_dir / "sensitivity.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * len(LAYERS)
    assert {"layer", "op", "bits", "top1", "drop", "drop 95% CI", "local SQNR dB"} <= set(rows[0])
    assert rows[0]["layer"] == "/conv4/Conv" and rows[0]["bits"] == "W4A8"
    assert [r["layer"] for r in rows[len(LAYERS) :]] == expected_order(d["rows"], 8)

    html = (out_dir / "sensitivity.html").read_text()
    assert "<svg" in html and "/conv4/Conv" in html and "</html>" in html.lower()


def test_cli_leave_one_out_json(capsys, tmp_path):
    model, cal, ev = write_data(tmp_path, cnn("act"))
    code, out, err = run_cli(
        capsys, "sensitivity", model, "--calib", cal, "--eval", ev, "--bits", "4", "--mode",
        "leave-one-out", "--layers", "/conv3/*,/conv4/*", "--json",
    )  # fmt: skip
    assert code == 0, err
    d = json.loads(out)
    assert d["mode"] == "leave_one_out"
    assert [r["layer"] for r in d["rows"]] == ["/conv3/Conv", "/conv4/Conv"]
    assert "4" in d["baselines"]
    assert SensitivityReport.from_dict(d).ranked(4)[0].layer == "/conv4/Conv"


# ---------------------------------------------------------------------------------------------
# calibration statistics are reused


# (count_calibration: tests/conftest.py)


def test_second_sensitivity_run_does_not_calibrate(count_calibration, tmp_path):
    m = cnn("act")
    cal, ev = feeds(m)
    cache = tmp_path / "cache"
    first = api.sensitivity(m, cal, ev, bits=(4, 8), cache_dir=cache)
    assert len(count_calibration) == 1  # one streamed pass for every variant
    assert any(cache.iterdir())
    second = api.sensitivity(m, cal, ev, bits=(4, 8), cache_dir=cache)
    assert len(count_calibration) == 1
    assert [(r.layer, r.bits, r.value) for r in second.rows] == [
        (r.layer, r.bits, r.value) for r in first.rows
    ]
    # without a cache, a run calibrates again
    api.sensitivity(m, cal, ev, bits=(8,), layers=["/fc/Gemm"], cache_dir=None)
    assert len(count_calibration) == 2


def test_sensitivity_after_quantize_reuses_its_statistics(count_calibration, tmp_path):
    """DESIGN.md §4: stats are cached so that sensitivity reuses quantize's calibration."""
    m = cnn("act")
    cal, ev = feeds(m)
    cache = tmp_path / "cache"
    amq.quantize(m, cal, cache_dir=cache)
    # its pass, and one for the tensor SmoothQuant's edit of the Gemm's input changed
    assert [len(c) > 1 for c in count_calibration] == [True, False]
    api.sensitivity(m, cal, ev, bits=(8,), cache_dir=cache)
    assert count_calibration[2:] == []


def test_statistics_are_shared_across_bit_widths(count_calibration, tmp_path):
    """DESIGN.md §1: Stats are bit-independent; a 4-bit sweep reuses an 8-bit sweep's."""
    m = cnn("act")
    cal, ev = feeds(m)
    cache = tmp_path / "cache"
    api.sensitivity(m, cal, ev, bits=(8,), cache_dir=cache)
    assert len(count_calibration) == 1
    api.sensitivity(m, cal, ev, bits=(4,), cache_dir=cache)
    assert count_calibration[1:] == []


# ---------------------------------------------------------------------------------------------
# quantize --int16-top


def _int16_layers(qparams: dict, plan_layers: dict) -> set[str]:
    """Layers whose weights are at 16 bits in the written plan (qparams.json)."""
    return {
        name
        for name, lp in plan_layers.items()
        if lp["weight"] is not None and qparams["tensors"][lp["weight"]]["bits"] == 16
    }


def test_int16_top_from_saved_json_and_on_the_spot(capsys, tmp_path):
    model, cal, ev = write_data(tmp_path, cnn("act"))
    prefix = tmp_path / "sens"
    code, _, err = run_cli(
        capsys, "sensitivity", model, "--calib", cal, "--eval", ev, "--bits", "8", "-o",
        str(prefix), "-q",
    )  # fmt: skip
    assert code == 0, err
    rows = json.loads((tmp_path / "sens" / "sensitivity.json").read_text())["rows"]
    k = math.ceil(0.2 * len(LAYERS))
    assert k == 2
    want = set(expected_order(rows, 8)[:k])
    assert "/conv4/Conv" in want

    raised = {}
    for tag, extra in (
        ("saved", ["--sensitivity", str(tmp_path / "sens" / "sensitivity.json")]),
        ("spot", ["--eval", ev]),
    ):
        out = tmp_path / f"{tag}.q.onnx"
        code, stdout, err = run_cli(
            capsys, "quantize", model, "--calib", cal, "--int16-top", "20%", "-o", str(out),
            "--json", *extra,
        )  # fmt: skip
        assert code == 0, (tag, err)
        res = json.loads(stdout)
        qp = json.loads((tmp_path / f"{tag}.q.qparams.json").read_text())
        raised[tag] = _int16_layers(qp, qp["layers"])
        assert raised[tag] == want, tag
        # the raised layers read 16-bit activations; every other weight stays at 8 bits
        for name, lp in qp["layers"].items():
            assert lp["quantized"], name
            wbits = qp["tensors"][lp["weight"]]["bits"]
            abits = {qp["tensors"][t]["bits"] for t in lp["act_inputs"]}
            assert wbits == (16 if name in want else 8), name
            if name in want:
                assert abits == {16}, name
            assert res["layers"][name]["weight_bits"] == wbits
        assert any("raised to INT16 (top 20% by sensitivity)" in n for n in res["summary"]["notes"])
        assert res["summary"]["opset"] == 21
    assert raised["saved"] == raised["spot"]


def test_int16_top_api_with_a_report_object():
    m = cnn("act")
    cal, ev = feeds(m)
    rep = api.sensitivity(m, cal, ev, bits=(8,), cache_dir=None)
    for pct, k in ((1, 1), (20, 2), (34, 3), (100, 6)):
        res = amq.quantize(m, cal, int16_top=pct, sensitivity_from=rep, cache_dir=None)
        sixteen = [
            lp.name for lp in res.plan.layers.values() if res.plan.tensors[lp.weight].bits == 16
        ]
        assert sorted(sixteen) == sorted(rep.layer_order(8)[:k]), pct


def test_int16_top_with_a_report_of_another_model():
    m = cnn("act")
    cal, ev = feeds(m)
    rep = api.sensitivity(m, cal, ev, bits=(8,), cache_dir=None)
    for r in rep.rows:  # the same ranking, written for a model whose layers are named otherwise
        r.layer = r.layer.replace("/conv", "/block")
    try:
        res = amq.quantize(m, cal, int16_top=50, sensitivity_from=rep, cache_dir=None)
    except ConfigError as e:  # refusing the file is a fine answer
        assert "sensitivity" in str(e)
        return
    notes = [n for n in res.summary.notes if n.startswith("raised to INT16")]
    named = notes[0].split(": ", 1)[1].split(", ") if notes else []
    for name in named:  # whatever the note says was raised, was raised
        assert name in res.plan.layers, name
        assert res.plan.tensors[res.plan.layers[name].weight].bits == 16, name


# ---------------------------------------------------------------------------------------------
# error paths


@pytest.fixture
def files(tmp_path):
    model, cal, ev = write_data(tmp_path, cnn())
    nolab = tmp_path / "eval_nolabels"
    nolab.mkdir()
    np.save(nolab / "x.npy", _data(2, 8))
    return {"model": model, "calib": cal, "eval": ev, "nolabels": str(nolab), "tmp": tmp_path}


@pytest.mark.parametrize("bits", ["5", "abc", "4,,6", ""])
def test_cli_bad_bits(capsys, files, bits):
    code, _, err = run_cli(
        capsys, "sensitivity", files["model"], "--calib", files["calib"], "--eval", files["eval"],
        "--bits", bits,
    )  # fmt: skip
    assert_one_line_error(code, err, "--bits")


@pytest.mark.parametrize(
    "value, needle",
    [
        ("0%", "(0, 100]"),
        ("abc", "'abc'"),
        ("150%", "(0, 100]"),
        ("-5%", "(0, 100]"),
        ("10", "percentage"),  # a bare number: a percentage must say so
    ],
)
def test_cli_bad_int16_top(capsys, files, value, needle):
    code, _, err = run_cli(
        capsys, "quantize", files["model"], "--calib", files["calib"], "--int16-top", value,
        "-o", str(files["tmp"] / "q.onnx"),
    )  # fmt: skip
    assert_one_line_error(code, err, "--int16-top", needle)
    assert not (files["tmp"] / "q.onnx").exists()


def test_cli_missing_sensitivity_file(capsys, files):
    missing = files["tmp"] / "nope.json"
    code, _, err = run_cli(
        capsys, "quantize", files["model"], "--calib", files["calib"], "--int16-top", "10%",
        "--sensitivity", str(missing), "-o", str(files["tmp"] / "q.onnx"),
    )  # fmt: skip
    assert_one_line_error(code, err, "nope.json", "not found")


@pytest.mark.parametrize(
    "content",
    [
        '{"layers": {}, "tensors": {}}',
        '{"version": 1, "metric": "top1"}',
        '{"version": 1, "metric": "top1", "output": "y", "float_value": 1, "samples": 1, '
        '"bits": [8], "mode": "single", "rows": [{"layer": "a", "colour": 3}]}',
        "[1, 2, 3]",
        "not json at all",
    ],
)
def test_cli_not_a_sensitivity_json(capsys, files, content):
    p = files["tmp"] / "other.json"
    p.write_text(content)
    code, _, err = run_cli(
        capsys, "quantize", files["model"], "--calib", files["calib"], "--int16-top", "10%",
        "--sensitivity", str(p), "-o", str(files["tmp"] / "q.onnx"),
    )  # fmt: skip
    assert_one_line_error(code, err, "other.json", "not an amq sensitivity JSON")


def test_cli_layers_matching_nothing(capsys, files):
    code, _, err = run_cli(
        capsys, "sensitivity", files["model"], "--calib", files["calib"], "--eval", files["eval"],
        "--layers", "/nothing/*,/nope/Conv",
    )  # fmt: skip
    assert_one_line_error(code, err, "--layers", "matches no quantizable layer")


def test_cli_top1_without_labels(capsys, files):
    code, _, err = run_cli(
        capsys, "sensitivity", files["model"], "--calib", files["calib"], "--eval",
        files["nolabels"], "--metric", "top1", "--bits", "8",
    )  # fmt: skip
    assert_one_line_error(code, err, "top1", "labels")


def test_cli_bad_metric_and_mode(capsys, files):
    common = ["sensitivity", files["model"], "--calib", files["calib"], "--eval", files["eval"]]
    code, _, err = run_cli(capsys, *common, "--metric", "accuracy")
    assert_one_line_error(code, err, "accuracy")
    code, _, err = run_cli(capsys, *common, "--mode", "all")
    assert_one_line_error(code, err, "--mode")
    code, _, err = run_cli(capsys, *common[:4], "--eval", str(files["tmp"] / "none"))
    assert_one_line_error(code, err, "none", "not found")


def test_api_errors():
    m = cnn()
    cal, ev = feeds(m)
    with pytest.raises(ConfigError, match="each must be 4, 8 or 16"):
        api.sensitivity(m, cal, ev, bits=(2,), cache_dir=None)
    with pytest.raises(ConfigError, match="single or leave_one_out"):
        api.sensitivity(m, cal, ev, mode="both", cache_dir=None)
    with pytest.raises(DataError, match="labels"):
        api.sensitivity(m, cal, [{"x": f["x"]} for f in ev], metric="top1", cache_dir=None)
    with pytest.raises(ConfigError, match=r"\(0, 100\]"):
        amq.quantize(m, cal, Config(), int16_top=0, cache_dir=None)


def test_cli_unwritable_prefix_fails_before_the_work(capsys, files, count_calibration):
    blocker = files["tmp"] / "afile"
    blocker.write_text("a file where a folder should be")
    code, _, err = run_cli(
        capsys, "sensitivity", files["model"], "--calib", files["calib"], "--eval", files["eval"],
        "--bits", "8", "-o", str(blocker / "sens"),
    )  # fmt: skip
    assert_one_line_error(code, err, "sens")
    assert count_calibration == []  # failed before any calibration


def test_old_opset_model_is_upgraded_for_8_bit_sensitivity():
    """Per-channel Q/DQ needs opset 13: an opset-11 model is upgraded (as quantize does) even when
    only 8 bits are asked for, instead of failing with 'upgrade first'."""
    from tests.models import opset11

    m, cal, _ = opset11()
    ev = cal[:4]
    rep = api.sensitivity(m, cal, ev, bits=(8,), cache_dir=None)
    assert {r.layer for r in rep.rows} == {"/conv0/Conv", "/conv1/Conv"}
    assert all(r.value is not None and math.isfinite(r.value) for r in rep.rows)


@pytest.mark.parametrize("execution", ["ideal", "runtime"])
def test_sensitivity_evaluates_on_the_ideal_math_by_default(monkeypatch, execution):
    """Rankings must not depend on the machine (DESIGN.md §6b): every trial model runs with its
    Q/DQ math in float unless this CPU's kernels are asked for."""
    from amq import runtime

    used = []
    real = runtime.session_for

    def spy(model, ex, source="model", **kw):
        used.append((runtime.Execution(ex), source))
        return real(model, ex, source, **kw)

    monkeypatch.setattr(runtime, "session_for", spy)
    m = cnn("act")
    cal, ev = feeds(m)
    kw = {} if execution == "ideal" else {"execution": execution}
    api.sensitivity(m, cal, ev, bits=(8,), layers=["/conv4/Conv"], cache_dir=None, **kw)
    trials = [e for e, src in used if "quantized" in src and "model with" in src]
    assert trials and set(trials) == {runtime.Execution(execution)}
