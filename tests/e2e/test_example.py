"""End to end on the bundled example: examples/digits_cnn.onnx with calib_data/ and eval_data/.
Top-1 on the 540 held-out samples, float vs INT8 / INT16 / each range method."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import amq
from amq.config import Config, with_overrides

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "examples" / "digits_cnn.onnx"
CALIB = ROOT / "calib_data"
EVAL_X = ROOT / "eval_data" / "input.npy"
EVAL_Y = ROOT / "eval_data" / "labels.npy"


def top1(model: onnx.ModelProto | Path) -> float:
    """Top-1 accuracy in percent on the eval split, computed with onnxruntime."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    x = np.load(EVAL_X)
    y = np.load(EVAL_Y)
    logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    return 100.0 * float(np.mean(np.argmax(logits, axis=1) == y))


@pytest.fixture(scope="module")
def float_top1() -> float:
    acc = top1(MODEL)
    assert acc == pytest.approx(99.44, abs=0.01)  # examples/README.md: 537/540
    return acc


def test_int8_keeps_top1_within_one_point(float_top1: float, tmp_path: Path) -> None:
    r = amq.quantize(MODEL, CALIB, Config(), tmp_path / "digits.q.onnx", cache_dir=None)
    assert r.summary.layers_quantized == 7 and r.summary.layers_float == 0
    assert r.summary.calibration_samples == 256
    assert float_top1 - top1(r.model_path) <= 1.0


def test_int16_keeps_top1_within_a_fifth_of_a_point(float_top1: float) -> None:
    cfg = with_overrides(Config(), weights={"bits": 16}, activations={"bits": 16})
    r = amq.quantize(MODEL, CALIB, cfg, cache_dir=None)
    assert float_top1 - top1(r.model) <= 0.2


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_each_range_method_at_int8(method: str, float_top1: float, tmp_path: Path) -> None:
    cfg = with_overrides(Config(), calibration={"method": method})
    r = amq.quantize(MODEL, CALIB, cfg, cache_dir=tmp_path / "cache")
    methods = {t.method for t in r.plan.tensors.values() if t.role == "activation"}
    # percentile: each range as is or widened to the mse one (calibration.widen_to_mse)
    allowed = {method, "percentile, widened to mse"} if method == "percentile" else {method}
    assert methods and methods <= allowed
    assert float_top1 - top1(r.model) <= 1.0


def test_int8_example_runs_on_integer_kernels(tmp_path: Path) -> None:
    """PITFALLS 8: the QDQ placement lets onnxruntime 1.31 fuse every layer into an integer kernel."""
    out = tmp_path / "digits.q.onnx"
    amq.quantize(MODEL, CALIB, Config(), out, cache_dir=None)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "digits.opt.onnx")
    ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
    got = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    for op, n in {
        "QLinearConv": 4,
        "QLinearAdd": 1,
        "QLinearGlobalAveragePool": 1,
        "QGemm": 1,
    }.items():
        assert got[op] == n, dict(got)
    assert got["Conv"] == 0 and got["Gemm"] == 0 and got["Add"] == 0, dict(got)
