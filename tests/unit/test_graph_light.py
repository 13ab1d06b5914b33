"""graph.model.infer_types and upgrade_opset: onnx's inference and version converter see large
float weights as dims only, and give the models onnx's own calls give, subgraphs and model
fields included; a model inference rejects comes back unchanged; where the converter does not
keep a weight as it was, the upgrade converts the whole model."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from amq.graph import model as gm


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = nh.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w")  # stubbed
    b = nh.from_array(rng.standard_normal(32).astype(np.float32), "b")  # small: kept
    shape = nh.from_array(np.array([-1, 4, 8], np.int64), "shape")  # read by Reshape's inference
    then = h.make_graph(
        [h.make_node("Relu", ["r"], ["t"])],
        "then",
        [],
        [h.make_tensor_value_info("t", T.FLOAT, None)],
    )
    other = h.make_graph(
        [h.make_node("Neg", ["r"], ["e"])],
        "else",
        [],
        [h.make_tensor_value_info("e", T.FLOAT, None)],
    )
    nodes = [
        h.make_node("MatMul", ["x", "w"], ["m"]),
        h.make_node("Add", ["m", "b"], ["a"]),
        h.make_node("Reshape", ["a", "shape"], ["r"]),
        h.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        h.make_node("Greater", ["s", "zero"], ["c"]),
        h.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other),
    ]
    zero = nh.from_array(np.array(0.0, np.float32), "zero")
    g = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("x", T.FLOAT, [2, 64])],
        [h.make_tensor_value_info("y", T.FLOAT, None)],
        [w, b, shape, zero],
    )
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


def test_same_model_as_onnx_inference_and_weights_untouched(monkeypatch):
    m = _model()
    before = m.SerializeToString()
    want = onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=False)
    seen = {}
    real = onnx.shape_inference.infer_shapes

    def spy(model, *a, **k):
        seen.update({t.name: len(t.raw_data) for t in model.graph.initializer})
        return real(model, *a, **k)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", spy)
    got = gm.infer_types(m)
    assert got.SerializeToString() == want.SerializeToString()
    assert m.SerializeToString() == before
    assert seen["w"] == 0 and seen["shape"] == 24  # the weight as dims only; Reshape's shape read
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in got.graph.value_info
    }
    assert shapes["r"] == [2, 4, 8]


def test_a_model_inference_rejects_comes_back_unchanged(monkeypatch):
    def refuse(*a, **k):
        raise onnx.shape_inference.InferenceError("[ShapeInferenceError] refused")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", refuse)
    m = _model()
    assert gm.infer_types(m) is m


def _old_model() -> onnx.ModelProto:
    """Opset 10 with a Clip whose bounds are attributes (the converter moves them to inputs), a
    large MatMul weight and model-level fields the conversion keeps."""
    rng = np.random.default_rng(1)
    w = nh.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w")
    g = h.make_graph(
        [
            h.make_node("MatMul", ["x", "w"], ["m"]),
            h.make_node("Clip", ["m"], ["y"], min=-1.0, max=1.0),
        ],
        "g",
        [h.make_tensor_value_info("x", T.FLOAT, [2, 64])],
        [h.make_tensor_value_info("y", T.FLOAT, [2, 32])],
        [w],
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 10)], producer_name="test")
    h.set_model_props(m, {"k": "v"})
    return m


def test_upgrade_matches_onnx_converter_and_keeps_the_weights():
    from onnx import version_converter

    m = _old_model()
    want = version_converter.convert_version(m, 21)
    got = gm._convert_light(m, 21)
    assert got is not None and got.SerializeToString() == want.SerializeToString()
    assert gm.opset_version(gm.upgrade_opset(m, 21)) == 21


def test_upgrade_falls_back_where_the_converter_does_not_keep_a_weight(monkeypatch):
    from onnx import version_converter

    real = version_converter.convert_version
    full = real(_old_model(), 21)

    def drop_weights(model, target):
        out = real(model, target)
        if not any(t.raw_data for t in out.graph.initializer if t.name == "w"):  # the light copy
            del out.graph.initializer[:]
        return out

    monkeypatch.setattr(version_converter, "convert_version", drop_weights)
    assert gm._convert_light(_old_model(), 21) is None
    got = gm.upgrade_opset(_old_model(), 21)
    got.ir_version = full.ir_version
    assert got.SerializeToString() == full.SerializeToString()
