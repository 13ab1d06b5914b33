"""A registry of tiny, seeded ONNX models built with onnx.helper, for unit, golden and e2e tests.

Every builder returns ``(model, calib, description)``: a float ``onnx.ModelProto``, a list of
calibration feed dicts ``{input_name: np.ndarray}`` (one model call each) and one line saying what
the model exercises. Builders are deterministic: the same call gives the same bytes. ``eval_feeds``
gives held-out feeds for a model (a different seed from its calibration data).

``external_data(tmp_path)`` is the one builder that writes to disk: it returns the path of a model
saved with its weights in a separate file instead of a ModelProto.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

Feeds = dict[str, np.ndarray]
Built = tuple[onnx.ModelProto, list[Feeds], str]

OPSET = 17
IR_VERSION = 8
FLOAT_MIN = -3.4028235e38
CALIB_SAMPLES = 16


# ---------------------------------------------------------------------------------------------
# helpers


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _init(name: str, value: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _w(rng: np.random.Generator, *shape: int, scale: float | None = None) -> np.ndarray:
    """He-style random weights: fan-in is the product of all but the first dim."""
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    s = scale if scale is not None else np.sqrt(2.0 / max(fan_in, 1))
    return (rng.standard_normal(shape) * s).astype(np.float32)


def _b(rng: np.random.Generator, n: int, scale: float = 0.1) -> np.ndarray:
    return (rng.standard_normal(n) * scale).astype(np.float32)


def _vi(name: str, elem: int, shape: list[int | str | None]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    inits: list[TensorProto],
    name: str,
    opset: int = OPSET,
    ir_version: int = IR_VERSION,
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits)
    m = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="amq-tests"
    )
    m.ir_version = ir_version
    onnx.checker.check_model(m, full_check=True)
    return m


def _normal_feeds(
    name: str, shape: tuple[int, ...], n: int, seed: int, scale: float = 1.0
) -> list[Feeds]:
    rng = _rng(seed)
    return [{name: (rng.standard_normal(shape) * scale).astype(np.float32)} for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# models; each builder takes ``seed`` for its calibration data (weights are always seed 0)


def conv_bn_relu(seed: int = 1) -> Built:
    """Conv+BatchNormalization+Relu twice, dynamic batch dim, then a Conv to the output."""
    rng = _rng(0)
    inits = [
        _init("w1", _w(rng, 8, 3, 3, 3)),
        _init("b1", _b(rng, 8)),
        _init("w2", _w(rng, 8, 8, 3, 3)),
        _init("w3", _w(rng, 4, 8, 1, 1)),
        _init("b3", _b(rng, 4)),
    ]
    for i in (1, 2):
        inits += [
            _init(f"bn{i}.gamma", rng.uniform(0.5, 1.5, 8).astype(np.float32)),
            _init(f"bn{i}.beta", _b(rng, 8, 0.2)),
            _init(f"bn{i}.mean", _b(rng, 8, 0.3)),
            _init(f"bn{i}.var", rng.uniform(0.5, 2.0, 8).astype(np.float32)),
        ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="/conv1/Conv", pads=[1] * 4),
        helper.make_node(
            "BatchNormalization",
            ["c1", "bn1.gamma", "bn1.beta", "bn1.mean", "bn1.var"],
            ["n1"],
            name="/bn1/BatchNormalization",
            epsilon=1e-5,
        ),
        helper.make_node("Relu", ["n1"], ["r1"], name="/relu1/Relu"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="/conv2/Conv", pads=[1] * 4),
        helper.make_node(
            "BatchNormalization",
            ["c2", "bn2.gamma", "bn2.beta", "bn2.mean", "bn2.var"],
            ["n2"],
            name="/bn2/BatchNormalization",
            epsilon=1e-3,
        ),
        helper.make_node("Relu", ["n2"], ["r2"], name="/relu2/Relu"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["y"], name="/head/Conv"),
    ]
    m = _model(
        nodes,
        [_vi("x", TensorProto.FLOAT, ["batch", 3, 12, 12])],
        [_vi("y", TensorProto.FLOAT, ["batch", 4, 12, 12])],
        inits,
        "conv_bn_relu",
    )
    return (
        m,
        _normal_feeds("x", (2, 3, 12, 12), CALIB_SAMPLES, seed),
        "Conv+BN+Relu x2, dynamic batch",
    )


def conv_transpose(seed: int = 1) -> Built:
    """Conv -> Relu -> ConvTranspose (stride 2, bias) -> Relu -> Conv."""
    rng = _rng(0)
    inits = [
        _init("w0", _w(rng, 6, 4, 3, 3)),
        _init("b0", _b(rng, 6)),
        _init("wt", _w(rng, 6, 5, 3, 3)),  # ConvTranspose weight: [Cin, Cout, k, k]
        _init("bt", _b(rng, 5)),
        _init("w1", _w(rng, 3, 5, 3, 3)),
        _init("b1", _b(rng, 3)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="/conv0/Conv", pads=[1] * 4),
        helper.make_node("Relu", ["c0"], ["r0"], name="/relu0/Relu"),
        helper.make_node(
            "ConvTranspose",
            ["r0", "wt", "bt"],
            ["t"],
            name="/up/ConvTranspose",
            strides=[2, 2],
            pads=[1, 1, 1, 1],
            output_padding=[1, 1],
        ),
        helper.make_node("Relu", ["t"], ["r1"], name="/relu1/Relu"),
        helper.make_node("Conv", ["r1", "w1", "b1"], ["y"], name="/conv1/Conv", pads=[1] * 4),
    ]
    m = _model(
        nodes,
        [_vi("x", TensorProto.FLOAT, [1, 4, 6, 6])],
        [_vi("y", TensorProto.FLOAT, [1, 3, 12, 12])],
        inits,
        "conv_transpose",
    )
    return (
        m,
        _normal_feeds("x", (1, 4, 6, 6), CALIB_SAMPLES, seed),
        "ConvTranspose (axis 1 weights)",
    )


def gemm(trans_b: int = 1, seed: int = 1) -> Built:
    """Gemm(transB) -> Relu -> Gemm(transB) with biases; dynamic batch."""
    rng = _rng(0)
    w1 = _w(rng, 24, 16)  # [N, K]
    w2 = _w(rng, 10, 24)
    if not trans_b:
        w1, w2 = np.ascontiguousarray(w1.T), np.ascontiguousarray(w2.T)
    inits = [_init("w1", w1), _init("b1", _b(rng, 24)), _init("w2", w2), _init("b2", _b(rng, 10))]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="/fc1/Gemm", transB=trans_b),
        helper.make_node("Relu", ["h"], ["hr"], name="/relu/Relu"),
        helper.make_node("Gemm", ["hr", "w2", "b2"], ["y"], name="/fc2/Gemm", transB=trans_b),
    ]
    m = _model(
        nodes,
        [_vi("x", TensorProto.FLOAT, ["batch", 16])],
        [_vi("y", TensorProto.FLOAT, ["batch", 10])],
        inits,
        f"gemm_transb{trans_b}",
    )
    return m, _normal_feeds("x", (4, 16), CALIB_SAMPLES, seed), f"Gemm transB={trans_b}"


def gemm_transb0(seed: int = 1) -> Built:
    return gemm(0, seed)


def gemm_transb1(seed: int = 1) -> Built:
    return gemm(1, seed)


def matmul_weight(seed: int = 1) -> Built:
    """3-D activation x 2-D weight: MatMul -> Add bias -> Relu -> MatMul."""
    rng = _rng(0)
    inits = [
        _init("w1", _w(rng, 16, 32, scale=0.3)),
        _init("b1", _b(rng, 32)),
        _init("w2", _w(rng, 32, 8, scale=0.2)),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="/fc1/MatMul"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="/fc1/Add"),
        helper.make_node("Relu", ["a1"], ["r1"], name="/relu/Relu"),
        helper.make_node("MatMul", ["r1", "w2"], ["y"], name="/fc2/MatMul"),
    ]
    m = _model(
        nodes,
        [_vi("x", TensorProto.FLOAT, ["batch", 5, 16])],
        [_vi("y", TensorProto.FLOAT, ["batch", 5, 8])],
        inits,
        "matmul_weight",
    )
    return m, _normal_feeds("x", (2, 5, 16), CALIB_SAMPLES, seed), "MatMul 3-D x 2-D weight"


def batched_matmul_weight(seed: int = 1) -> Built:
    """Batched 3-D MatMul weights [E, K, N] (per-expert or per-head projections, as einsum
    exports give): x [1, 5, 16] broadcast against w1 [3, 16, 12] -> Relu -> [3, 5, 12] x
    w2 [3, 12, 4] to the output. The columns of w1 have scales 10x apart, where per-channel
    weights do better than one scale per tensor (PITFALLS 10)."""
    rng = _rng(0)
    col = np.geomspace(0.1, 1.0, 12).astype(np.float32)
    inits = [
        _init("w1", _w(rng, 3, 16, 12, scale=0.3) * col),
        _init("w2", _w(rng, 3, 12, 4, scale=0.3)),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="/experts/fc1/MatMul"),
        helper.make_node("Relu", ["m1"], ["r1"], name="/experts/relu/Relu"),
        helper.make_node("MatMul", ["r1", "w2"], ["y"], name="/experts/fc2/MatMul"),
    ]
    m = _model(
        nodes,
        [_vi("x", TensorProto.FLOAT, [1, 5, 16])],
        [_vi("y", TensorProto.FLOAT, [3, 5, 4])],
        inits,
        "batched_matmul_weight",
    )
    return m, _normal_feeds("x", (1, 5, 16), CALIB_SAMPLES, seed), "MatMul x batched 3-D weight"


def _attention_nodes(x: str, d: int, mask_bias: str | None) -> list[onnx.NodeProto]:
    nodes = [
        helper.make_node("MatMul", [x, "wq"], ["q"], name="/attn/q/MatMul"),
        helper.make_node("MatMul", [x, "wk"], ["k"], name="/attn/k/MatMul"),
        helper.make_node("MatMul", [x, "wv"], ["v"], name="/attn/v/MatMul"),
        helper.make_node("Transpose", ["k"], ["kt"], name="/attn/Transpose", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"], name="/attn/qk/MatMul"),
        helper.make_node("Mul", ["s", "inv_sqrt_d"], ["ss"], name="/attn/scale/Mul"),
    ]
    scores = "ss"
    if mask_bias is not None:
        nodes.append(helper.make_node("Add", ["ss", mask_bias], ["sm"], name="/attn/mask/Add"))
        scores = "sm"
    nodes += [
        helper.make_node("Softmax", [scores], ["p"], name="/attn/Softmax", axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["o"], name="/attn/pv/MatMul"),
        helper.make_node("MatMul", ["o", "wo"], ["y"], name="/attn/out/MatMul"),
    ]
    return nodes


def _attention_inits(rng: np.random.Generator, d: int) -> list[TensorProto]:
    return [
        _init("wq", _w(rng, d, d, scale=0.3)),
        _init("wk", _w(rng, d, d, scale=0.3)),
        _init("wv", _w(rng, d, d, scale=0.3)),
        _init("wo", _w(rng, d, d, scale=0.3)),
        _init("inv_sqrt_d", np.asarray(1.0 / np.sqrt(d), dtype=np.float32)),
    ]


def matmul_two_activations(seed: int = 1) -> Built:
    """Attention-like: Q·Kᵀ (two activations), scale, Softmax, ·V (two activations)."""
    d, t = 16, 6
    rng = _rng(0)
    m = _model(
        _attention_nodes("x", d, None),
        [_vi("x", TensorProto.FLOAT, [1, t, d])],
        [_vi("y", TensorProto.FLOAT, [1, t, d])],
        _attention_inits(rng, d),
        "matmul_two_activations",
    )
    return m, _normal_feeds("x", (1, t, d), CALIB_SAMPLES, seed), "Q·Kᵀ -> Softmax -> ·V"


def add_residual(seed: int = 1) -> Built:
    """Conv -> Relu -> (Conv -> Relu -> Conv) + skip -> Relu -> Conv."""
    rng = _rng(0)
    inits = [
        _init("w0", _w(rng, 8, 3, 3, 3)),
        _init("b0", _b(rng, 8)),
        _init("w1", _w(rng, 8, 8, 3, 3)),
        _init("b1", _b(rng, 8)),
        _init("w2", _w(rng, 8, 8, 3, 3, scale=0.1)),
        _init("b2", _b(rng, 8)),
        _init("w3", _w(rng, 4, 8, 1, 1)),
        _init("b3", _b(rng, 4)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="/stem/Conv", pads=[1] * 4),
        helper.make_node("Relu", ["c0"], ["r0"], name="/stem/Relu"),
        helper.make_node(
            "Conv", ["r0", "w1", "b1"], ["c1"], name="/block/conv1/Conv", pads=[1] * 4
        ),
        helper.make_node("Relu", ["c1"], ["r1"], name="/block/relu1/Relu"),
        helper.make_node(
            "Conv", ["r1", "w2", "b2"], ["c2"], name="/block/conv2/Conv", pads=[1] * 4
        ),
        helper.make_node("Add", ["c2", "r0"], ["s"], name="/block/Add"),
        helper.make_node("Relu", ["s"], ["rs"], name="/block/relu2/Relu"),
        helper.make_node("Conv", ["rs", "w3", "b3"], ["y"], name="/head/Conv"),
    ]
    m = _model(
        nodes,
        [_vi("x", TensorProto.FLOAT, [1, 3, 10, 10])],
        [_vi("y", TensorProto.FLOAT, [1, 4, 10, 10])],
        inits,
        "add_residual",
    )
    return (
        m,
        _normal_feeds("x", (1, 3, 10, 10), CALIB_SAMPLES, seed),
        "residual Add of two activations",
    )


def mul(seed: int = 1) -> Built:
    """Two Conv branches multiplied elementwise (gating), a Mul by a constant, then a Conv."""
    rng = _rng(0)
    inits = [
        _init("wa", _w(rng, 6, 3, 3, 3)),
        _init("ba", _b(rng, 6)),
        _init("wb", _w(rng, 6, 3, 1, 1)),
        _init("bb", _b(rng, 6)),
        _init("gain", rng.uniform(0.5, 2.0, (1, 6, 1, 1)).astype(np.float32)),
        _init("w2", _w(rng, 4, 6, 3, 3)),
        _init("b2", _b(rng, 4)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="/a/Conv", pads=[1] * 4),
        helper.make_node("Conv", ["x", "wb", "bb"], ["b"], name="/b/Conv"),
        helper.make_node("Sigmoid", ["b"], ["g"], name="/b/Sigmoid"),
        helper.make_node("Mul", ["a", "g"], ["ag"], name="/gate/Mul"),
        helper.make_node("Mul", ["ag", "gain"], ["agk"], name="/gain/Mul"),
        helper.make_node("Conv", ["agk", "w2", "b2"], ["y"], name="/out/Conv", pads=[1] * 4),
    ]
    m = _model(
        nodes,
        [_vi("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [_vi("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        inits,
        "mul",
    )
    return (
        m,
        _normal_feeds("x", (1, 3, 8, 8), CALIB_SAMPLES, seed),
        "Mul of two activations, Mul by a constant",
    )


TRANSPARENT_CHAIN_OPS = ("Reshape", "Transpose", "MaxPool", "Flatten")


def transparent_chain(seed: int = 1) -> Built:
    """Conv -> Relu -> Reshape -> Transpose -> MaxPool -> Flatten -> Gemm: the ops between Conv and
    Gemm only move or select values, so they share the Conv output's grid."""
    rng = _rng(0)
    inits = [
        _init("w0", _w(rng, 4, 3, 3, 3)),
        _init("b0", _b(rng, 4)),
        _init("shape", np.asarray([1, 4, 4, 16], dtype=np.int64)),
        _init("wf", _w(rng, 10, 64)),
        _init("bf", _b(rng, 10)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c"], name="/conv/Conv", pads=[1] * 4),
        helper.make_node("Relu", ["c"], ["r"], name="/relu/Relu"),
        helper.make_node("Reshape", ["r", "shape"], ["rs"], name="/Reshape"),
        helper.make_node("Transpose", ["rs"], ["tr"], name="/Transpose", perm=[0, 1, 3, 2]),
        helper.make_node(
            "MaxPool", ["tr"], ["mp"], name="/MaxPool", kernel_shape=[2, 2], strides=[2, 2]
        ),
        helper.make_node("Flatten", ["mp"], ["fl"], name="/Flatten", axis=1),
        helper.make_node("Gemm", ["fl", "wf", "bf"], ["y"], name="/fc/Gemm", transB=1),
    ]
    m = _model(
        nodes,
        [_vi("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [_vi("y", TensorProto.FLOAT, [1, 10])],
        inits,
        "transparent_chain",
    )
    return (
        m,
        _normal_feeds("x", (1, 3, 8, 8), CALIB_SAMPLES, seed),
        "Reshape/Transpose/MaxPool/Flatten between Conv and Gemm",
    )


def concat_mixed_ranges(seed: int = 1) -> Built:
    """A branch in 0..1 (Sigmoid) and one in 0..~500 (Relu of a large Conv) concatenated, then a
    Conv (PITFALLS 4: a detector head's scores and box coordinates)."""
    rng = _rng(0)
    inits = [
        _init("ws", _w(rng, 4, 2, 3, 3)),
        _init("bs", _b(rng, 4)),
        _init("wbox", _w(rng, 4, 2, 3, 3, scale=80.0)),
        _init("bbox", np.full(4, 100.0, dtype=np.float32)),
        _init("w2", _w(rng, 3, 8, 1, 1, scale=0.05)),
        _init("b2", _b(rng, 3)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "ws", "bs"], ["s"], name="/score/Conv", pads=[1] * 4),
        helper.make_node("Sigmoid", ["s"], ["score"], name="/score/Sigmoid"),
        helper.make_node("Conv", ["x", "wbox", "bbox"], ["bx"], name="/box/Conv", pads=[1] * 4),
        helper.make_node("Relu", ["bx"], ["box"], name="/box/Relu"),
        helper.make_node("Concat", ["score", "box"], ["cat"], name="/head/Concat", axis=1),
        helper.make_node("Conv", ["cat", "w2", "b2"], ["y"], name="/out/Conv"),
    ]
    m = _model(
        nodes,
        [_vi("x", TensorProto.FLOAT, [1, 2, 6, 6])],
        [_vi("y", TensorProto.FLOAT, [1, 3, 6, 6])],
        inits,
        "concat_mixed_ranges",
    )
    return (
        m,
        _normal_feeds("x", (1, 2, 6, 6), CALIB_SAMPLES, seed),
        "Concat of a 0..1 and a 0..500 branch",
    )


def sentinel_mask(seed: int = 1, fill: float = FLOAT_MIN) -> Built:
    """BERT-like: mask_bias = (1 - mask) * -3.4028235e38 is added to the attention scores before
    Softmax and ·V, and again to the attention output before a max-pool over the tokens (masked
    max pooling, as in sentence-transformers) that feeds a Gemm classifier. The second use puts
    the sentinel tensor in front of quantized layers (PITFALLS 5). Outputs: the attention output
    ``y`` and the ``logits``. ``fill``: the mask value (older exporters use -1e4, newer ones
    the float minimum or -1e9); some calibration samples have no padding at all."""
    d, t = 16, 6
    rng = _rng(0)
    inits = _attention_inits(rng, d) + [
        _init("one", np.asarray(1.0, dtype=np.float32)),
        _init("neg_big", np.asarray(fill, dtype=np.float32)),
        _init("axes2", np.asarray([2], dtype=np.int64)),
        _init("wc", _w(rng, 3, d, scale=0.3)),
        _init("bc", _b(rng, 3)),
    ]
    nodes = [
        helper.make_node("Unsqueeze", ["mask", "axes2"], ["mask3"], name="/mask/Unsqueeze"),
        helper.make_node("Sub", ["one", "mask3"], ["inv"], name="/mask/Sub"),
        helper.make_node("Mul", ["inv", "neg_big"], ["mask_bias"], name="/mask/Mul"),  # [1,t,1]
        helper.make_node(
            "Transpose", ["mask_bias"], ["mask_bias_k"], name="/mask/Transpose", perm=[0, 2, 1]
        ),  # [1,1,t]: over the keys
    ] + _attention_nodes("x", d, "mask_bias_k")
    nodes += [
        helper.make_node("Add", ["y", "mask_bias"], ["y_masked"], name="/pool/Add"),
        helper.make_node(
            "Transpose", ["y_masked"], ["y_t"], name="/pool/Transpose", perm=[0, 2, 1]
        ),
        helper.make_node("MaxPool", ["y_t"], ["pooled"], name="/pool/MaxPool", kernel_shape=[t]),
        helper.make_node("Flatten", ["pooled"], ["feat"], name="/pool/Flatten", axis=1),
        helper.make_node("Gemm", ["feat", "wc", "bc"], ["logits"], name="/cls/Gemm", transB=1),
    ]
    m = _model(
        nodes,
        [_vi("x", TensorProto.FLOAT, [1, t, d]), _vi("mask", TensorProto.FLOAT, [1, t])],
        [_vi("y", TensorProto.FLOAT, [1, t, d]), _vi("logits", TensorProto.FLOAT, [1, 3])],
        inits,
        "sentinel_mask",
    )
    r = _rng(seed)
    feeds = []
    for _ in range(CALIB_SAMPLES):
        n_valid = int(r.integers(2, t + 1))
        mask = np.zeros((1, t), dtype=np.float32)
        mask[0, :n_valid] = 1.0
        feeds.append({"x": r.standard_normal((1, t, d)).astype(np.float32), "mask": mask})
    return m, feeds, "attention mask of -3.4e38 sentinels (PITFALLS 5)"


def control_flow_if(seed: int = 1) -> Built:
    """A main-graph MatMul feeds an If whose branches each hold a MatMul (one of them shares the
    main MatMul's weight initializer), then a main-graph MatMul to the output."""
    d = 8
    rng = _rng(0)
    w0 = _w(rng, d, d, scale=0.4)
    inits = [
        _init("w0", w0),
        _init("w_else", _w(rng, d, d, scale=0.4)),
        _init("w_out", _w(rng, d, 4, scale=0.4)),
        _init("zero", np.asarray(0.0, dtype=np.float32)),
    ]

    def branch(name: str, weight: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("MatMul", ["h", weight], [f"{name}_out"], name=f"/{name}/MatMul")],
            name,
            [],
            [_vi(f"{name}_out", TensorProto.FLOAT, [1, d])],
        )

    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h"], name="/fc0/MatMul"),
        helper.make_node("ReduceSum", ["x"], ["xs"], name="/ReduceSum", keepdims=0),
        helper.make_node("Greater", ["xs", "zero"], ["cond"], name="/Greater"),
        helper.make_node(
            "If",
            ["cond"],
            ["branch_out"],
            name="/If",
            then_branch=branch("then", "w0"),
            else_branch=branch("else", "w_else"),
        ),
        helper.make_node("MatMul", ["branch_out", "w_out"], ["y"], name="/fc_out/MatMul"),
    ]
    m = _model(
        nodes,
        [_vi("x", TensorProto.FLOAT, [1, d])],
        [_vi("y", TensorProto.FLOAT, [1, 4])],
        inits,
        "control_flow_if",
    )
    return (
        m,
        _normal_feeds("x", (1, d), CALIB_SAMPLES, seed),
        "If with a MatMul in each branch (PITFALLS 6)",
    )


def int_inputs(seed: int = 1) -> Built:
    """int64 token ids -> Gather from an embedding table -> MatMul -> Relu -> MatMul."""
    vocab, d, t = 50, 16, 7
    rng = _rng(0)
    inits = [
        _init("emb", _w(rng, vocab, d, scale=1.0)),
        _init("w1", _w(rng, d, 12, scale=0.3)),
        _init("w2", _w(rng, 12, 4, scale=0.3)),
    ]
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"], name="/embed/Gather", axis=0),
        helper.make_node("MatMul", ["e", "w1"], ["h"], name="/fc1/MatMul"),
        helper.make_node("Relu", ["h"], ["hr"], name="/relu/Relu"),
        helper.make_node("MatMul", ["hr", "w2"], ["y"], name="/fc2/MatMul"),
    ]
    m = _model(
        nodes,
        [_vi("ids", TensorProto.INT64, [1, t])],
        [_vi("y", TensorProto.FLOAT, [1, t, 4])],
        inits,
        "int_inputs",
    )
    r = _rng(seed)
    feeds = [{"ids": r.integers(0, vocab, (1, t)).astype(np.int64)} for _ in range(CALIB_SAMPLES)]
    return m, feeds, "int64 token ids -> Gather -> MatMul"


def opset11(seed: int = 1) -> Built:
    """Conv -> Relu -> Conv at opset 11, IR version 6 (PITFALLS 1)."""
    rng = _rng(0)
    inits = [
        _init("w0", _w(rng, 6, 3, 3, 3)),
        _init("b0", _b(rng, 6)),
        _init("w1", _w(rng, 4, 6, 3, 3)),
        _init("b1", _b(rng, 4)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="/conv0/Conv", pads=[1] * 4),
        helper.make_node("Relu", ["c0"], ["r0"], name="/relu0/Relu"),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["y"], name="/conv1/Conv", pads=[1] * 4),
    ]
    m = _model(
        nodes,
        [_vi("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [_vi("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        inits,
        "opset11",
        opset=11,
        ir_version=6,
    )
    return m, _normal_feeds("x", (1, 3, 8, 8), CALIB_SAMPLES, seed), "Conv model at opset 11, IR 6"


def shared_output(seed: int = 1) -> Built:
    """A tensor that is both a graph output and the input of another layer (features + head), and
    a graph input that is also returned as an output unchanged."""
    rng = _rng(0)
    inits = [
        _init("w0", _w(rng, 6, 3, 3, 3)),
        _init("b0", _b(rng, 6)),
        _init("w1", _w(rng, 4, 6, 3, 3)),
        _init("b1", _b(rng, 4)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="/conv0/Conv", pads=[1] * 4),
        helper.make_node("Relu", ["c0"], ["features"], name="/relu0/Relu"),
        helper.make_node("Conv", ["features", "w1", "b1"], ["y"], name="/conv1/Conv", pads=[1] * 4),
    ]
    m = _model(
        nodes,
        [_vi("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [
            _vi("x", TensorProto.FLOAT, [1, 3, 8, 8]),
            _vi("features", TensorProto.FLOAT, [1, 6, 8, 8]),
            _vi("y", TensorProto.FLOAT, [1, 4, 8, 8]),
        ],
        inits,
        "shared_output",
    )
    return (
        m,
        _normal_feeds("x", (1, 3, 8, 8), CALIB_SAMPLES, seed),
        "graph outputs also read inside",
    )


# names the QDQ generator would produce for tensors "x", "w" and "c:0"
CLASH_NAMES = (
    "x_quantized",
    "x_scale",
    "x_zero_point",
    "x_dequantized",
    "w_scale",
    "w_quantized",
    "w_zero_point",
    "c:0_scale",
)


def names_clash(seed: int = 1) -> Built:
    """Tensor and node names with '/', ':', ';' and spaces, and tensors already named like the
    names the QDQ generator produces (``x_quantized``, ``w_scale``, ...) (PITFALLS 2)."""
    rng = _rng(0)
    inits = [
        _init("w", _w(rng, 4, 3, 3, 3)),
        _init("b", _b(rng, 4)),
        # a real tensor, not Q/DQ; along H, so that the Mul does not fold into the Conv
        _init("w_scale", np.full((1, 1, 4, 1), 0.5, dtype=np.float32)),
        _init("conv 2/weight;0", _w(rng, 4, 4, 3, 3)),
        _init("x_zero_point", np.asarray(0.25, dtype=np.float32)),
        _init("fc/w:0", _w(rng, 5, 64)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c:0"], name="/conv 1/Conv:0", pads=[1] * 4),
        helper.make_node("Mul", ["c:0", "w_scale"], ["x_quantized"], name="x_scale"),
        helper.make_node("Relu", ["x_quantized"], ["x_dequantized"], name="relu;1"),
        helper.make_node(
            "Conv",
            ["x_dequantized", "conv 2/weight;0"],
            ["c:0_scale"],
            name="w_quantized",
            pads=[1] * 4,
        ),
        helper.make_node("Add", ["c:0_scale", "x_zero_point"], ["w_zero_point"], name="add 1;x"),
        helper.make_node("Flatten", ["w_zero_point"], ["flat/0:1"], name="Flatten/0"),
        helper.make_node("Gemm", ["flat/0:1", "fc/w:0"], ["out put:0"], name="fc/Gemm;0", transB=1),
    ]
    m = _model(
        nodes,
        [_vi("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [_vi("out put:0", TensorProto.FLOAT, [1, 5])],
        inits,
        "names_clash",
    )
    return (
        m,
        _normal_feeds("x", (1, 3, 4, 4), CALIB_SAMPLES, seed),
        "special characters and names that clash with generated ones",
    )


def unnamed_nodes(seed: int = 1) -> Built:
    """The add_residual model with every node name erased (and one duplicate name)."""
    m, feeds, _ = add_residual(seed)
    for node in m.graph.node:
        node.name = ""
    return m, feeds, "nodes with empty names"


def build_external(seed: int = 1) -> Built:
    """The model external_data saves (conv_bn_relu); in memory."""
    m, feeds, _ = conv_bn_relu(seed)
    return m, feeds, "weights in an external data file"


def external_data(tmp_path: Path, seed: int = 1) -> tuple[Path, list[Feeds], str]:
    """conv_bn_relu saved with every initializer in ``model.onnx.data`` beside ``model.onnx``."""
    m, feeds, desc = build_external(seed)
    path = Path(tmp_path) / "ext" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(
        m, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0
    )
    return path, feeds, desc


# ---------------------------------------------------------------------------------------------
# the registry

MODELS: dict[str, Callable[..., Built]] = {
    "conv_bn_relu": conv_bn_relu,
    "conv_transpose": conv_transpose,
    "gemm_transb0": gemm_transb0,
    "gemm_transb1": gemm_transb1,
    "matmul_weight": matmul_weight,
    "batched_matmul_weight": batched_matmul_weight,
    "matmul_two_activations": matmul_two_activations,
    "add_residual": add_residual,
    "mul": mul,
    "transparent_chain": transparent_chain,
    "concat_mixed_ranges": concat_mixed_ranges,
    "sentinel_mask": sentinel_mask,
    "control_flow_if": control_flow_if,
    "int_inputs": int_inputs,
    "opset11": opset11,
    "shared_output": shared_output,
    "names_clash": names_clash,
    "unnamed_nodes": unnamed_nodes,
    "external_data": build_external,  # external_data(tmp_path) writes it to disk
}


def build(name: str, seed: int = 1) -> Built:
    return MODELS[name](seed=seed)


def eval_feeds(name: str, n: int = 8) -> list[Feeds]:
    """Held-out feeds for a model: its calibration recipe with another seed."""
    return MODELS[name](seed=1000)[1][:n]
