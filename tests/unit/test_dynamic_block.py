"""Dynamic activations (DynamicQuantizeLinear + MatMulInteger) and block-wise INT4 weights
(blocked DequantizeLinear -> MatMulNBits): config, plan, emitted graph, numbers against numpy
references of the ONNX definitions, the runtime's fusions, bitops, search space, sensitivity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

import amq
from amq.analysis.bitops import bitops
from amq.analysis.sensitivity import sensitivity
from amq.config import (
    ActivationsOverride,
    Override,
    WeightsOverride,
    config_from_dict,
    dump_config,
)
from amq.errors import ConfigError
from amq.quant import qmath
from amq.runtime import Execution, session_for
from amq.search.space import DYNAMIC, LayerChoice, Space, overrides
from tests import models

DYN = {"activations": {"dynamic": True}}
W4B = {"weights": {"bits": 4, "block_size": 32}}


def _stack(k: int = 64, n: int = 48, layers: int = 2, seed: int = 0) -> onnx.ModelProto:
    """x [M, k] -> MatMul [k, n] -> MatMul [n, k] ... (no activation between: onnxruntime fuses
    a blocked DQ + MatMul into MatMulNBits, except where a Relu follows, as of 1.32)."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        kk, nn = (k, n) if i % 2 == 0 else (n, k)
        w = (rng.standard_normal((kk, nn)) / np.sqrt(kk)).astype(np.float32)
        w[:, 0] *= 8.0  # one wide output channel: per-channel / per-block scales matter
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"], name=f"/l{i}/MatMul"))
        x = f"y{i}"
    g = helper.make_graph(
        nodes,
        "stack",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["M", k if layers % 2 == 0 else n])],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _feeds(k: int = 64, n: int = 4, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": (rng.standard_normal((8, k)) * 2 + 0.5).astype(np.float32)} for _ in range(n)]


def _quantize(model: onnx.ModelProto, feeds, cfg: dict) -> amq.QuantizeResult:
    return amq.quantize(model, feeds, config_from_dict(cfg), cache_dir=False)


def _optimized_ops(model: onnx.ModelProto, tmp_path: Path) -> list[str]:
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    # onnxruntime 1.20 stores fused MatMulNBits weights as in-memory external data: the node
    # list is all that is read
    optimized = onnx.load(so.optimized_model_filepath, load_external_data=False)
    return [n.op_type for n in optimized.graph.node]


# ---------------------------------------------------------------------------------------------
# config


def test_config_round_trip_with_dynamic_and_block_size() -> None:
    d = {
        "weights": {"bits": 4, "block_size": 64},
        "activations": {"dynamic": True},
        "op_types": {"Gemm": {"activations": {"dynamic": False}}},
        "layers": {
            "/l1/*": {"weights": {"block_size": 128}},
            "/l0/MatMul": {"weights": {"bits": 8}},
        },
    }
    cfg = config_from_dict(d)
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg
    s = cfg.settings_for("/l1/MatMul", "MatMul")
    assert (s.weight_bits, s.block_size, s.act_dynamic) == (4, 128, True)
    assert cfg.settings_for("/fc/Gemm", "Gemm").act_dynamic is False
    # off by default, and then absent from the YAML (existing configs dump as before)
    text = dump_config(config_from_dict({}))
    assert "dynamic" not in text and "block_size" not in text


@pytest.mark.parametrize(
    "d, key",
    [
        ({"weights": {"block_size": 32}}, "weights.block_size"),  # bits 8
        ({"weights": {"bits": 4, "block_size": 24}}, "weights.block_size"),
        ({"weights": {"bits": 4, "block_size": 8}}, "weights.block_size"),
        ({"weights": {"bits": 4, "block_size": True}}, "weights.block_size"),
        (
            {"layers": {"a": {"weights": {"bits": 16, "block_size": 32}}}},
            "layers.a.weights.block_size",
        ),
        ({"activations": {"dynamic": "yes"}}, "activations.dynamic"),
        (
            {"op_types": {"MatMul": {"activations": {"dynamic": 1}}}},
            "op_types.MatMul.activations.dynamic",
        ),
        ({"activations": {"dynamik": True}}, "activations"),
    ],
)
def test_config_errors_are_one_line_naming_the_key(d: dict, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict(d)
    msg = str(e.value)
    assert "\n" not in msg and f"config.{key}" in msg


# ---------------------------------------------------------------------------------------------
# dynamic activations


def _dynamic_reference(x: np.ndarray, w: np.ndarray, ws: np.ndarray | None = None) -> np.ndarray:
    """DynamicQuantizeLinear as ONNX defines it (uint8 from x's own min/max widened to 0), then
    the integer product with symmetric per-column int8 weights (scales ``ws``, absmax / 127 when
    not given), scaled back (numpy only)."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    s = np.float32((hi - lo) / 255.0)
    zp = np.clip(np.rint(np.float32(-lo) / s), 0, 255)
    xq = np.clip(np.rint(x / s) + zp, 0, 255)
    if ws is None:
        ws = (np.abs(w).max(axis=0) / 127.0).astype(np.float32)
    ws = np.asarray(ws, dtype=np.float32)
    wq = np.clip(np.rint(w / ws), -127, 127)
    acc = (xq - zp).astype(np.float64) @ wq.astype(np.float64)
    return (acc * (np.float32(s) * ws).astype(np.float32)).astype(np.float32)


def test_dynamic_layer_graph_and_numbers_match_the_onnx_definition(tmp_path: Path) -> None:
    m = _stack(layers=1)
    feeds = _feeds()
    res = _quantize(m, feeds, {**DYN, "weights": {"overflow": "off"}})  # plain absmax weights
    ops = [n.op_type for n in res.model.graph.node]
    assert ops == ["DynamicQuantizeLinear", "MatMulInteger", "Cast", "Mul", "Mul"]
    assert "QuantizeLinear" not in ops  # no calibrated grid anywhere
    # the float weight is gone: one int8 copy (the model is about a quarter of the float one)
    assert [t.data_type for t in res.model.graph.initializer if t.dims == [64, 48]] == [
        TensorProto.INT8
    ]
    assert res.model.ByteSize() < 0.4 * m.ByteSize()
    lp = res.plan.layers["/l0/MatMul"]
    assert lp.act_dynamic and res.plan.layer_bits(lp) == (8, 8)
    w = numpy_helper.to_array(m.graph.initializer[0])
    absmax = (np.abs(w).max(axis=0) / 127.0).astype(np.float32)
    np.testing.assert_allclose(res.plan.tensors[lp.weight].scale, absmax, rtol=1e-6)
    # the numbers, on the guarded model (the default): MatMulInteger is an integer kernel even
    # with graph optimizations off, and on x86 without VNNI its int16 pair sums saturate unless
    # the weights are pair-safe; guarded, the ONNX definition holds on every CPU
    guarded = _quantize(m, feeds, DYN)
    ws = np.asarray(guarded.plan.tensors[lp.weight].scale, dtype=np.float32)
    x = (np.random.default_rng(5).standard_normal((8, 64)) * 3 - 1).astype(np.float32)
    ref = _dynamic_reference(x, w, ws)
    for ex in (Execution.IDEAL, Execution.RUNTIME):
        out = session_for(guarded.model, ex).run(None, {"x": x})[0]
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # the batch's own range: a 10x wider input keeps the same relative error (no clipping)
    out10 = session_for(guarded.model, Execution.IDEAL).run(None, {"x": x * 10})[0]
    np.testing.assert_allclose(out10, _dynamic_reference(x * 10, w, ws), rtol=1e-5, atol=1e-3)
    assert "DynamicQuantizeMatMul" in _optimized_ops(res.model, tmp_path)


def test_dynamic_layers_are_guarded_against_int16_pair_sums_by_default() -> None:
    """auto: guard (machine-independent; no grid to emulate); off: plain absmax weights."""
    m = _stack(layers=1)
    res = _quantize(m, _feeds(), DYN)
    lp = res.plan.layers["/l0/MatMul"]
    assert lp.overflow == "guard" and "dynamic activations" in lp.overflow_note
    tp = res.plan.tensors[lp.weight]
    assert tp.pair_safe_axis == 1
    w = numpy_helper.to_array(m.graph.initializer[0])
    q = np.clip(np.rint(w / np.asarray(tp.scale, np.float32)), -127, 127).astype(np.int64)
    # every pair of codes the kernel adds in one int16 (rows 2i, 2i + 1), times uint8 codes up
    # to 255: the positive parts sum to at most 128, the negative ones to at least -128
    pos, neg = np.maximum(q, 0), np.minimum(q, 0)
    assert (pos[0::2] + pos[1::2]).max() <= 128 and (neg[0::2] + neg[1::2]).min() >= -128
    off = _quantize(m, _feeds(), {**DYN, "weights": {"overflow": "off"}})
    assert off.plan.tensors[lp.weight].pair_safe_axis is None
    assert "overflow: guard" in dump_config(res.config)


def test_dynamic_gemm_transb_bias_alpha_beta_match_float() -> None:
    m, calib, _ = models.gemm_transb1()
    for node in m.graph.node:
        if node.op_type == "Gemm":
            node.attribute.extend(
                [helper.make_attribute("alpha", 0.5), helper.make_attribute("beta", 2.0)]
            )
    res = _quantize(m, calib, DYN)
    assert not any(n.op_type == "Gemm" for n in res.model.graph.node)
    f = session_for(m, Execution.IDEAL).run(None, calib[0])[0]
    q = session_for(res.model, Execution.IDEAL).run(None, calib[0])[0]
    err = np.abs(q - f).max() / np.abs(f).max()
    assert err < 0.03, err
    assert all(lp.act_dynamic for lp in res.plan.layers.values())


def test_dynamic_is_per_layer_and_two_activation_matmuls_stay_calibrated() -> None:
    m, calib, _ = models.matmul_two_activations()
    cfg = {**DYN, "layers": {"/attn/v/MatMul": {"activations": {"dynamic": False}}}}
    res = _quantize(m, calib, cfg)
    lps = res.plan.layers
    assert lps["/attn/q/MatMul"].act_dynamic and not lps["/attn/v/MatMul"].act_dynamic
    assert not lps["/attn/qk/MatMul"].act_dynamic and lps["/attn/qk/MatMul"].quantized
    assert any("/attn/qk/MatMul: dynamic activations" in n for n in res.plan.notes)
    # the resolved config says so per layer and reproduces the plan
    res2 = _quantize(m, calib, yaml.safe_load(dump_config(res.config)))
    assert {k: v.act_dynamic for k, v in res2.plan.layers.items()} == {
        k: v.act_dynamic for k, v in lps.items()
    }


def test_bitops_counts_dynamic_at_8x8_and_block_w4_at_8x4() -> None:
    m = _stack(layers=2)
    cfg = {**DYN, "layers": {"/l1/MatMul": {"weights": {"bits": 4, "block_size": 16}}}}
    res = _quantize(m, _feeds(), cfg)
    rows = {r.name: (r.act_bits, r.weight_bits) for r in bitops(res.plan).layers}
    assert rows == {"/l0/MatMul": (8, 8), "/l1/MatMul": (8, 4)}


# ---------------------------------------------------------------------------------------------
# block-wise INT4


def test_block_weight_qparams_against_a_loop() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((80, 6)).astype(np.float32)  # 80 = 2 full blocks of 32 + 16
    w[40:64, 2] = 0.0  # an all-zero block
    s = qmath.block_weight_qparams(w, 4, 32)
    assert s.shape == (3, 6)
    for b in range(3):
        for c in range(6):
            blk = w[b * 32 : (b + 1) * 32, c]
            want = np.abs(blk).max() / 7.0
            if want > 0:
                assert s[b, c] == pytest.approx(want, rel=1e-6)
            else:
                assert s[b, c] > 0
    g = qmath.grid(4, signed=True, narrow=True)
    q = qmath.quantize_blocked(w, s, 32, g)
    assert q.min() >= -7 and q.max() <= 7
    back = qmath.dequantize_blocked(q, s, 32)
    err = np.abs(back - w)
    assert np.all(err <= qmath.expand_blocks(s, 32, 80) / 2 + 1e-6)


def test_block_w4_graph_numbers_and_matmulnbits_fusion(tmp_path: Path) -> None:
    m = _stack(k=64, n=48, layers=2)
    feeds = _feeds()
    res = _quantize(m, feeds, W4B)
    assert res.model.opset_import[0].version == 21
    dqs = [n for n in res.model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 2 and not any(n.op_type == "QuantizeLinear" for n in res.model.graph.node)
    inits = {t.name: t for t in res.model.graph.initializer}
    for dq in dqs:
        attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        assert attrs == {"axis": 0, "block_size": 32}
        assert inits[dq.input[0]].data_type == TensorProto.INT4
        k, n = inits[dq.input[0]].dims
        assert list(inits[dq.input[1]].dims) == [-(-k // 32), n]
        assert len(dq.input) == 2  # no zero point
    # ideal math: x @ (blocked fake-quantized weights), against numpy
    x = feeds[0]["x"]
    ref = x
    for t in m.graph.initializer:  # [64, 48]: two blocks; [48, 64]: one and a half
        w = numpy_helper.to_array(t)
        wq = np.empty_like(w)
        for r in range(0, w.shape[0], 32):
            blk = w[r : r + 32]
            s = (np.abs(blk).max(axis=0) / 7.0).astype(np.float32)
            wq[r : r + 32] = np.clip(np.rint(blk / s), -7, 7) * s
        ref = ref @ wq
    out = session_for(res.model, Execution.IDEAL).run(None, {"x": x})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    ops = _optimized_ops(res.model, tmp_path)
    assert ops.count("MatMulNBits") == 2 and "MatMul" not in ops
    rt = session_for(res.model, Execution.RUNTIME).run(None, {"x": x})[0]
    assert np.abs(rt - ref).max() < 0.02 * np.abs(ref).max()  # int8 activations in the kernel


def test_block_w4_layer_after_a_quantized_attention_reads_float_and_fuses(tmp_path: Path) -> None:
    """/attn/out/MatMul reads the output of ·V, which a static QLinearMatMul writes quantized:
    the block-wise layer reads the float tensor, else onnxruntime leaves DQ + MatMul unfused."""
    m, calib, _ = models.matmul_two_activations()
    res = _quantize(m, calib, {"weights": {"bits": 4, "block_size": 16}})
    out = next(n for n in res.model.graph.node if n.name == "/attn/out/MatMul")
    producers = {o: n.op_type for n in res.model.graph.node for o in n.output}
    assert producers[out.input[0]] == "MatMul" and producers[out.input[1]] == "DequantizeLinear"
    read = {i for n in res.model.graph.node for i in n.input}
    assert all(o in read for n in res.model.graph.node for o in n.output if o != "y")
    assert {t.name for t in res.model.graph.initializer} <= read
    # Q, K, V and out: none of their outputs is quantized where written (nor after the
    # Transpose of K, which onnxruntime would move up), else the fusion does not happen
    assert all(t in res.plan.float_tensors for t in ("q", "kt", "v"))
    assert not {"q", "k", "kt", "v"} & set(res.plan.tensors)
    assert res.plan.layers["/attn/qk/MatMul"].quantized
    ops = _optimized_ops(res.model, tmp_path)
    assert ops.count("MatMulNBits") == 4
    f = session_for(m, Execution.IDEAL).run(None, calib[0])[0]
    q = session_for(res.model, Execution.IDEAL).run(None, calib[0])[0]
    assert np.abs(q - f).max() < 0.15 * np.abs(f).max()


def test_block_size_applies_to_matmul_only_others_per_channel_with_a_note() -> None:
    m, calib, _ = models.gemm_transb1()
    res = _quantize(m, calib, W4B)
    assert all(not lp.block_size for lp in res.plan.layers.values())
    assert all(res.plan.tensors[lp.weight].axis == 0 for lp in res.plan.layers.values())
    assert any("/fc1/Gemm: block_size 32 is for a MatMul" in n for n in res.plan.notes)


# ---------------------------------------------------------------------------------------------
# search space and sensitivity


def test_search_space_offers_dynamic_and_block_w4() -> None:
    names = ["a", "b", "c"]
    sp = Space(names, dict.fromkeys(names, True), names, list(reversed(names)), kind="per_layer")
    sp.dynamic_ok = {"a": True, "b": True, "c": False}
    sp.block_ok = {"a": True, "b": False, "c": True}
    sp.block_size = 32
    assert DYNAMIC in sp.act_choices("a") and DYNAMIC not in sp.act_choices("c")
    asked: dict[str, list] = {}

    def cat(name, choices):
        asked[name] = list(choices)
        return {"w:a": 8, "a:a": DYNAMIC, "w:b": 4, "a:b": 8, "w:c": 4, "a:c": 8}[name]

    a = sp.sample(lambda n, lo, hi: lo, cat)
    assert a["a"] == LayerChoice(8, 8, dynamic=True, block_size=0)
    assert a["c"].block_size == 32 and a["b"].block_size is None
    assert a["a"].label() == "W8Adyn" and a["c"].label() == "W4b32A8"
    ov = dict(overrides(a))
    assert ov["a"].activations == ActivationsOverride(bits=8, dynamic=True)
    assert ov["c"].weights == WeightsOverride(bits=4, block_size=32)
    assert sp.params_for(a, (0, 0, 0))["a:a"] == DYNAMIC
    # ranking: n_dyn takes the most sensitive layers that can
    sp2 = Space(names, dict.fromkeys(names, True), names, list(reversed(names)))
    sp2.dynamic_ok = {"a": False, "b": True, "c": True}
    got = sp2.from_counts(0, 0, 0, 1)
    assert got["b"].dynamic and not got["c"].dynamic and got["a"].dynamic is None
    assert any(p.get("n_dyn") for p in sp2.seeds())
    assert isinstance(overrides(got)[0][1], Override)


def test_sensitivity_lists_dynamic_candidates() -> None:
    m, calib, _ = models.matmul_two_activations()
    rep = sensitivity(m, calib, calib, bits=[8], dynamic=True, cache_dir=False)
    dyn = rep.ranked(dynamic=True)
    assert {r.layer for r in dyn} == {
        "/attn/q/MatMul",
        "/attn/k/MatMul",
        "/attn/v/MatMul",
        "/attn/out/MatMul",
    }
    assert all(r.act_dynamic and r.weight_bits == 8 for r in dyn)
    assert not any(r.act_dynamic for r in rep.ranked(8))
    assert all(r.local_sqnr_db is not None for r in dyn)
