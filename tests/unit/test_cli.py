"""The command line: exit codes, one-line errors naming the culprit, outputs written."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import yaml

from tests.cli_helpers import assert_one_line_error, run_cli
from tests.conftest import CALIB, EXAMPLE

run = run_cli


def test_quantize_writes_outputs_and_json(capsys, tmp_path):
    out = tmp_path / "m.q.onnx"
    code, stdout, err = run(
        capsys, "quantize", str(EXAMPLE), "--calib", str(CALIB), "-o", str(out), "--json"
    )
    assert code == 0, err
    res = json.loads(stdout)
    assert res["summary"]["layers_quantized"] == 7
    assert res["summary"]["fidelity"]["logits"]["sqnr_db"] > 25
    onnx.checker.check_model(onnx.load(out))
    cfg = yaml.safe_load((tmp_path / "m.q.amq.yaml").read_text())
    assert cfg["layers"]["/fc/Gemm"]["weights"]["bits"] == 8
    qp = json.loads((tmp_path / "m.q.qparams.json").read_text())
    assert any(t["role"] == "weight" and t["axis"] == 0 for t in qp["tensors"].values())
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind


def test_quantize_table_summary(capsys, tmp_path):
    code, stdout, err = run(
        capsys,
        "quantize",
        str(EXAMPLE),
        "--calib",
        str(CALIB),
        "-o",
        str(tmp_path / "a.onnx"),
        "--weight-bits",
        "4",
    )
    assert code == 0, err
    assert "/layer1/conv1/Conv" in stdout and "int4" in stdout
    assert "bitops" in stdout and "SQNR" in stdout and "opset 21" in stdout


def test_corrupt_model(capsys, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    code, _, err = run(capsys, "quantize", str(bad), "--calib", str(CALIB))
    assert_one_line_error(code, err, str(bad))


def test_missing_model(capsys, tmp_path):
    code, _, err = run(capsys, "quantize", str(tmp_path / "nope.onnx"), "--calib", str(CALIB))
    assert_one_line_error(code, err, "nope.onnx", "not found")


def test_unwritable_output(capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    target = ro / "sub" / "x.onnx"
    (ro / "sub").write_text("a file where a folder should be")
    code, _, err = run(capsys, "quantize", str(EXAMPLE), "--calib", str(CALIB), "-o", str(target))
    assert_one_line_error(code, err, "x.onnx")
    assert not (ro / "x.onnx").exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("calibraton: {method: mse}\n", ("calibraton", "did you mean 'calibration'")),
        (
            "layers:\n  /fc/Gemm: {weights: {bits: 6}}\n",
            ("bits must be one of 4, 8, 16", "/fc/Gemm"),
        ),
        ("op_types:\n  Conv2d: {weights: {bits: 4}}\n", ("Conv2d", "did you mean 'Conv'")),
    ],
    ids=["typo_did_you_mean", "bad_bits", "unknown_op_type"],
)
def test_config_errors(capsys, tmp_path, text, expected):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    code, _, err = run(capsys, "quantize", str(EXAMPLE), "--calib", str(CALIB), "-c", str(cfg))
    assert_one_line_error(code, err, *expected)


def test_cli_bad_bits(capsys):
    code, _, err = run(capsys, "quantize", str(EXAMPLE), "--calib", str(CALIB), "--act-bits", "2")
    assert_one_line_error(code, err, "--act-bits")


def test_layer_pattern_matches_nothing_warns(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("layers:\n  /layer1/conv9/Conv: {weights: {bits: 4}}\n")
    code, _, err = run(
        capsys,
        "quantize",
        str(EXAMPLE),
        "--calib",
        str(CALIB),
        "-c",
        str(cfg),
        "-o",
        str(tmp_path / "o.onnx"),
        "-q",
    )
    assert code == 0, err
    assert "amq: warning: layers: pattern '/layer1/conv9/Conv' matches no node" in err
    assert "/layer1/conv1/Conv" in err  # close names are listed


def test_data_shape_mismatch_names_file(capsys, tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    np.save(d / "input.npy", np.zeros((4, 1, 9, 9), np.float32))
    code, _, err = run(capsys, "quantize", str(EXAMPLE), "--calib", str(d))
    assert_one_line_error(code, err, "input.npy", "[?,1,8,8]")


def test_data_nan_names_file(capsys, tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    x = np.zeros((4, 1, 8, 8), np.float32)
    x[2, 0, 3, 3] = np.nan
    np.save(d / "input.npy", x)
    code, _, err = run(capsys, "quantize", str(EXAMPLE), "--calib", str(d))
    assert_one_line_error(code, err, "input.npy", "NaN")


def test_data_wrong_dtype(capsys, tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    np.save(d / "input.npy", np.zeros((4, 1, 8, 8), np.int64))
    code, _, err = run(capsys, "quantize", str(EXAMPLE), "--calib", str(d))
    assert_one_line_error(code, err, "input.npy", "float32")


def test_missing_data_folder(capsys, tmp_path):
    code, _, err = run(capsys, "quantize", str(EXAMPLE), "--calib", str(tmp_path / "none"))
    assert_one_line_error(code, err, "none", "not found")


def test_bad_input_shape_flag(capsys, tmp_path):
    code, _, err = run(
        capsys, "quantize", str(EXAMPLE), "--calib", str(CALIB), "--input-shape", "input=1,2"
    )
    assert_one_line_error(code, err, "--input-shape", "NAME:D1,D2")


def test_raw_bin_data(capsys, tmp_path):
    d = tmp_path / "bins"
    d.mkdir()
    x = np.load(CALIB / "input.npy")[:32]
    x.tofile(d / "calib.bin")
    out = tmp_path / "b.onnx"
    code, stdout, err = run(
        capsys,
        "quantize",
        str(EXAMPLE),
        "--calib",
        str(d),
        "--input-shape",
        "input:1,1,8,8",
        "--data-types",
        "float32",
        "-o",
        str(out),
        "--json",
    )
    assert code == 0, err
    assert json.loads(stdout)["summary"]["calibration_samples"] == 32
    # a file that is not a whole number of calls is named in the error
    (d / "calib.bin").write_bytes(x.tobytes()[:-4])
    code, _, err = run(
        capsys, "quantize", str(EXAMPLE), "--calib", str(d), "--input-shape", "input:1,1,8,8"
    )
    assert_one_line_error(code, err, "calib.bin", "whole number")


def test_raw_bin_needs_shape(capsys, tmp_path):
    d = tmp_path / "bins"
    d.mkdir()
    np.zeros(64, np.float32).tofile(d / "a.bin")
    code, _, err = run(capsys, "quantize", str(EXAMPLE), "--calib", str(d))
    assert_one_line_error(code, err, "a.bin", "--input-shape input:")


def test_already_quantized_model_rejected(capsys, tmp_path):
    out = tmp_path / "q.onnx"
    code, _, err = run(
        capsys, "quantize", str(EXAMPLE), "--calib", str(CALIB), "-o", str(out), "-q"
    )
    assert code == 0, err
    code, _, err = run(capsys, "quantize", str(out), "--calib", str(CALIB))
    assert_one_line_error(code, err, "q.onnx", "float model")


def test_help_has_examples(capsys):
    code, stdout, _ = run(capsys, "quantize", "--help")
    assert code == 0
    assert "Examples:" in stdout and "amq quantize" in stdout


def test_w8a4_loads_in_onnxruntime(capsys, tmp_path):
    """onnxruntime 1.31 fuses an int8 weight with a uint4 input into QLinearConv (no kernel) and
    refuses the model; amq stores such weights in int16 (same values) so the model loads."""
    out = tmp_path / "w8a4.onnx"
    code, stdout, err = run(
        capsys,
        "quantize",
        str(EXAMPLE),
        "--calib",
        str(CALIB),
        "-o",
        str(out),
        "--weight-bits",
        "8",
        "--act-bits",
        "4",
        "--json",
    )
    assert code == 0, err
    s = json.loads(stdout)["summary"]
    assert s["fidelity"]["logits"]["top1_agreement"] >= 0.95
    m = onnx.load(out)
    w = next(
        t
        for t in m.graph.initializer
        if t.name.startswith("stem.conv.weight") and t.name.endswith("_quantized")
    )
    assert w.data_type == onnx.TensorProto.INT16
    assert int(np.abs(onnx.numpy_helper.to_array(w)).max()) <= 127  # values on the 8-bit grid


def test_summary_reuses_calibration_outputs_and_agrees_with_a_float_run(tmp_path):
    """The float outputs of the summary come from the calibration pass when it runs; a second
    run (statistics cached, no calibration) runs the float model instead: same figures."""
    import amq

    cache = tmp_path / "cache"
    first = amq.quantize(EXAMPLE, CALIB, cache_dir=cache)
    second = amq.quantize(EXAMPLE, CALIB, cache_dir=cache)
    assert not first.summary.cache_hit and second.summary.cache_hit
    a, b = first.summary.fidelity["logits"], second.summary.fidelity["logits"]
    assert first.summary.samples == second.summary.samples == 64
    assert abs(a["sqnr_db"] - b["sqnr_db"]) < 0.01
    assert abs(a["cosine"] - b["cosine"]) < 1e-6


def test_quantize_warns_when_the_runtime_falls_below_the_math(monkeypatch):
    """The summary states both executions; a runtime more than 1 dB below the Q/DQ math is a
    warning naming the output, the ISA and the layers the emulation found saturating."""
    import dataclasses

    from amq import api, runtime
    from amq.analysis import summary
    from amq.config import config_from_dict

    res = api.quantize(
        EXAMPLE, CALIB, config_from_dict({"weights": {"overflow": "off"}}), cache_dir=None
    )
    s = res.summary
    assert s.isa and set(s.fidelity_runtime) == set(s.fidelity) == {"logits"}
    low = {k: {**v, "sqnr_db": v["sqnr_db"] - 5.0} for k, v in s.fidelity.items()}
    worse = dataclasses.replace(s, fidelity_runtime=low)
    assert worse.runtime_gap() == pytest.approx({"logits": 5.0})
    # on a CPU whose kernels do not saturate, saturation is not named as the cause
    monkeypatch.setattr(runtime, "cpu_isa", lambda: runtime.Isa("avx512-vnni", False))
    (w,) = summary.runtime_warnings(worse, lambda: ["/stem/conv/Conv"])
    assert "/stem/conv/Conv" not in w and "amq compare" in w
    monkeypatch.setattr(runtime, "cpu_isa", lambda: runtime.Isa("avx2", True))
    (w,) = summary.runtime_warnings(worse, lambda: ["/stem/conv/Conv"])
    assert "'logits'" in w and "5.0 dB" in w and s.isa in w
    assert "/stem/conv/Conv" in w and "overflow: guard" in w
    assert summary.runtime_warnings(worse, list)[0].endswith(
        "run amq compare FLOAT QUANT to see where"
    )
    assert not summary.runtime_warnings(s, list) or s.runtime_gap()


def test_saturating_layers_are_found_for_the_warning():
    from amq import api
    from amq.analysis import summary
    from amq.calib.data import open_data
    from amq.config import config_from_dict

    cfg = config_from_dict({"weights": {"overflow": "off"}, "calibration": {"num_samples": 32}})
    prep = api.prepare(EXAMPLE, cfg)
    data = open_data(CALIB, prep.specs, cfg).subset(32)
    ws, plan, _ = api.plan_in_workspace(prep, cfg, data, None, False)
    assert "/stem/conv/Conv" in summary.saturating_layers(ws, plan)


def test_old_option_spellings_still_work_with_a_warning(capsys, tmp_path):
    """-o/--out is where results go, --output-name picks a model output, --samples counts samples:
    the old spellings (quantize --output/--num-samples, eval --output) work one more release."""
    out = tmp_path / "q.onnx"
    code, _, err = run_cli(
        capsys,
        "quantize",
        str(EXAMPLE),
        "--calib",
        str(CALIB),
        "--output",
        str(out),
        "--num-samples=32",
        "--no-cache",
        "-q",
    )
    assert code == 0 and out.is_file()
    assert "--output is deprecated; use --out" in err and "--num-samples is deprecated" in err
    code, stdout, err = run_cli(
        capsys,
        "eval",
        str(out),
        "--data",
        str(CALIB),
        "--reference",
        str(EXAMPLE),
        "--output",
        "logits",
        "-q",
    )
    assert code == 0 and "--output is deprecated; use --output-name" in err
    assert stdout == ""  # -q: no table either
    code, _, err = run_cli(capsys, "eval", "--help")
    assert "--output-name" in _ and "--output " not in _


@pytest.mark.parametrize(
    "args,needle",
    [
        (["bitops", str(EXAMPLE), "--input-shape", "foo:1,2"], "no input 'foo'"),
        (["bitops", str(EXAMPLE), "--input-shape", "input:1,8"], "rank 4"),
        (
            ["quantize", str(EXAMPLE), "--calib", str(CALIB), "--input-shape", "input:1,1,8,8"],
            "raw .bin",
        ),
    ],
)
def test_invalid_option_values_are_one_line_errors(capsys, tmp_path, args, needle):
    code, _, err = run_cli(
        capsys, *args, *(["-o", str(tmp_path / "q.onnx")] if args[0] == "quantize" else [])
    )
    assert_one_line_error(code, err, needle)


def test_no_summary_skips_the_fidelity_runs_and_writes_the_same_model(tmp_path, capsys):
    a, b = tmp_path / "a" / "m.onnx", tmp_path / "b" / "m.onnx"
    code, out, _ = run_cli(capsys, "quantize", str(EXAMPLE), "--calib", str(CALIB), "-o", str(a))
    assert code == 0 and "SQNR ideal" in out
    code, out, _ = run_cli(
        capsys, "quantize", str(EXAMPLE), "--calib", str(CALIB), "-o", str(b), "--no-summary"
    )
    assert code == 0 and "SQNR ideal" not in out and "not measured (--no-summary)" in out
    assert onnx.load(a).graph == onnx.load(b).graph


def test_summary_samples_sets_the_summary_s_samples(tmp_path, capsys):
    out_model = tmp_path / "m.onnx"
    code, out, _ = run_cli(
        capsys, "quantize", str(EXAMPLE), "--calib", str(CALIB), "-o", str(out_model),
        "--summary-samples", "20", "--json",
    )  # fmt: skip
    assert code == 0
    assert json.loads(out)["summary"]["fidelity_samples"] == 20
    code, _, err = run_cli(
        capsys, "quantize", str(EXAMPLE), "--calib", str(CALIB), "--summary-samples", "0"
    )
    assert code == 2 and "--summary-samples" in err
