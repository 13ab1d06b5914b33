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


def _chain_model(k: int = 4) -> onnx.ModelProto:
    """x -> MatMul (2 I) -> m -> Relu -> h -> Neg -> y, with a weight to carry some bytes."""
    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"]),
            helper.make_node("Relu", ["m"], ["h"]),
            helper.make_node("Neg", ["h"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, k])],
        [numpy_helper.from_array(np.eye(k, dtype=np.float32) * 2, "w")],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_exposed_model_is_the_copy_without_copying():
    """An Exposed model's bytes parse into exactly expose_outputs' copy (outputs appended once,
    a name already an output not repeated), its session returns the exposed tensors, and the
    model itself is left as it was."""
    from amq.graph.edit import expose_outputs
    from amq.runtime import Exposed

    m = _chain_model()
    before = m.SerializeToString()
    ex = Exposed(m, ["h", "m", "y", "h"])
    parsed = onnx.ModelProto()
    parsed.ParseFromString(ex.serialized())
    assert parsed == expose_outputs(m, ["h", "m", "y", "h"])
    assert [o.name for o in parsed.graph.output] == ["y", "h", "m"]
    assert m.SerializeToString() == before
    x = np.array([[-1, 2, -3, 4], [5, -6, 7, -8]], np.float32)
    sess = runtime.session(ex, optimize=False)
    y, h, mm = sess.run(["y", "h", "m"], {"x": x})
    np.testing.assert_array_equal(mm, 2 * x)
    np.testing.assert_array_equal(h, np.maximum(2 * x, 0))
    np.testing.assert_array_equal(y, -np.maximum(2 * x, 0))


def test_exposed_model_over_two_gb_goes_through_the_copy(tmp_path, monkeypatch):
    """Where protobuf cannot hold the bytes, the Exposed model is copied and saved with
    external data as any large model (and the temporary copy is removed)."""
    from amq.runtime import Exposed

    monkeypatch.setattr(runtime.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(runtime, "TWO_GB", 16)
    sess = runtime.session(Exposed(_chain_model(), ["h"]), optimize=False)
    assert list(tmp_path.iterdir()) == []
    x = np.ones((2, 4), np.float32)
    np.testing.assert_array_equal(sess.run(["h"], {"x": x})[0], 2 * x)


def test_off_heap_arrays_live_in_mappings_of_their_own():
    """runtime.off_heap: a zeroed, writable array of the shape and dtype asked for, backed by an
    anonymous mapping (not malloc's heap), which goes when the array goes."""
    import gc
    import mmap
    import weakref

    from amq.runtime import off_heap

    def owner(x):
        while isinstance(x, np.ndarray):
            x = x.base
        return x.obj if isinstance(x, memoryview) else x

    a = off_heap((3, 4))
    assert a.shape == (3, 4) and a.dtype == np.float32 and not a.any()
    a[1] = 7
    assert a.sum() == 28 and isinstance(owner(a), mmap.mmap)
    assert off_heap((0, 5)).shape == (0, 5)
    ref = weakref.ref(owner(a))
    del a
    gc.collect()
    assert ref() is None


def test_a_model_with_many_float_weights_hands_them_over_shared_and_is_not_modified(monkeypatch):
    """From SHARE_BYTES of float weights on, a session takes them as shared buffers: the model
    given (a ModelProto or an Exposed one) is left as it was, onnxruntime gets a copy of its
    other fields with stubs for the weights, and the outputs are the model's."""
    from amq.runtime import Exposed, SharedWeights

    m = _chain_model(32)
    m.doc_string, m.producer_name = "kept", "amq-test"
    before = m.SerializeToString()
    assert not SharedWeights.worth(m)  # 4 KB of weights: serialized as they are
    monkeypatch.setattr(runtime, "SHARE_BYTES", 16)
    assert SharedWeights.worth(m)
    shells: list = []
    real = SharedWeights.shell
    monkeypatch.setattr(
        SharedWeights, "shell", lambda self, x: shells.append(real(self, x)) or shells[-1]
    )
    x = np.random.default_rng(2).standard_normal((2, 32)).astype(np.float32)
    for model in (m, Exposed(m, ["h"])):
        sess = runtime.session(model, optimize=False)
        np.testing.assert_array_equal(sess.run(["y"], {"x": x})[0], -np.maximum(2 * x, 0))
    np.testing.assert_array_equal(sess.run(["h"], {"x": x})[0], np.maximum(2 * x, 0))
    assert m.SerializeToString() == before
    (shell, names), (exposed, _) = shells
    assert names == ["w"]
    (stub,) = shell.graph.initializer
    assert stub.data_location == TensorProto.EXTERNAL and not stub.raw_data
    assert list(stub.dims) == [32, 32]
    assert [o.name for o in exposed.graph.output] == ["y", "h"]
    del shell.graph.initializer[:]  # all else as the model's
    plain = onnx.ModelProto.FromString(before)
    del plain.graph.initializer[:]
    assert shell == plain
