"""runtime.session on models too large for one protobuf message: they go through a temporary
copy with external data, which must give the same outputs and be removed afterwards."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from amq import runtime


def _matmul_model(w: np.ndarray) -> onnx.ModelProto:
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, w.shape[1]])],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_large_model_session_runs_and_leaves_no_temporary_copy(tmp_path, monkeypatch):
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    monkeypatch.setattr(runtime.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(runtime, "TWO_GB", 16)  # every model takes the external-data path
    sess = runtime.session(_matmul_model(w), optimize=False)
    assert list(tmp_path.iterdir()) == []  # the copy is gone once the session is built
    (y,) = sess.run(None, {"x": x})
    np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-5)
