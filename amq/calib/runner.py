"""One onnxruntime session, batches streamed into observers; each batch's outputs are dropped."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from amq.errors import ModelError
from amq.graph.edit import expose_outputs
from amq.graph.model import Graph
from amq.quant.observers import MAX_PER_SAMPLE, HistogramObserver, TensorStats
from amq.quant.planner import TensorInfo

HISTOGRAM_VALUES = 2**21  # values per tensor that reach its histogram (min/max see all)

TWO_GB = 2**31 - 1


class SharedWeights:
    """Float initializers handed to many sessions without serializing them again: each session
    gets the same OrtValues (add_external_initializers) and its model carries only stubs. For
    sensitivity and search, where every trial is the same big model with a few layers changed."""

    STUB_LOCATION = "amq-shared-weights"

    def __init__(self, model: onnx.ModelProto) -> None:
        from onnx import numpy_helper

        self.arrays: dict[str, np.ndarray] = {}
        self.values: dict[str, ort.OrtValue] = {}
        for t in model.graph.initializer:
            if t.data_type == onnx.TensorProto.FLOAT and int(np.prod(t.dims)) >= 1024:
                a = np.ascontiguousarray(numpy_helper.to_array(t))
                self.arrays[t.name] = a  # keeps the buffer the OrtValue points at alive
                self.values[t.name] = ort.OrtValue.ortvalue_from_numpy(a)

    def strip(self, model: onnx.ModelProto) -> list[str]:
        """Replace (in place) the model's copies of shared initializers with external stubs."""
        used = []
        for t in model.graph.initializer:
            a = self.arrays.get(t.name)
            if a is None or tuple(t.dims) != a.shape or t.data_type != onnx.TensorProto.FLOAT:
                continue
            t.ClearField("raw_data")
            t.ClearField("float_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            del t.external_data[:]
            for k, v in (
                ("location", self.STUB_LOCATION),
                ("offset", "0"),
                ("length", str(a.nbytes)),
            ):
                e = t.external_data.add()
                e.key, e.value = k, v
            used.append(t.name)
        return used


def session(
    model: onnx.ModelProto | str | os.PathLike[str],
    optimize: bool = True,
    threads: int | None = None,
    optimized_path: str | None = None,
    source: str = "model",
    shared: SharedWeights | None = None,
) -> ort.InferenceSession:
    """An onnxruntime CPU session for a ModelProto (external data written to a temp dir when the
    model is over 2 GB) or a path. ``shared``: float weights to take from the shared OrtValues
    (the ModelProto is then modified in place: pass a model you do not keep)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    providers = ["CPUExecutionProvider"]
    try:
        if isinstance(model, onnx.ModelProto) and shared is not None:
            names = shared.strip(model)
            if names:
                so.add_external_initializers(names, [shared.values[n] for n in names])
        if isinstance(model, onnx.ModelProto):
            try:  # one pass; protobuf refuses messages over 2 GB
                data = model.SerializeToString()
            except ValueError:
                data = None
            if data is not None and len(data) < TWO_GB:
                return ort.InferenceSession(data, so, providers=providers)
            tmp = tempfile.mkdtemp(prefix="amq-")
            path = os.path.join(tmp, "model.onnx")
            onnx.save(model, path, save_as_external_data=True, location="model.data")
            return ort.InferenceSession(path, so, providers=providers)
        return ort.InferenceSession(os.fspath(model), so, providers=providers)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{source}: onnxruntime cannot load it: {msg[:300]}") from None


def run(
    sess: ort.InferenceSession, feeds: dict[str, np.ndarray], names: Sequence[str] | None = None
):
    return sess.run(list(names) if names is not None else None, feeds)


def probe(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, TensorInfo]:
    """Run one call exposing every main-graph tensor: shapes and dtypes even where static shape
    inference gives up (PITFALLS 3)."""
    g = Graph(model)
    names = []
    seen = set(feeds)
    for n in g.nodes:
        for o in n.output:
            if o and o not in seen:
                names.append(o)
                seen.add(o)
    sess = session(expose_outputs(model, names), optimize=False)
    outs = sess.get_outputs()
    values = sess.run(None, feeds)
    info: dict[str, TensorInfo] = {}
    for k, v in feeds.items():
        info[k] = TensorInfo(tuple(int(d) for d in v.shape), np.asarray(v).dtype.name)
    for o, v in zip(outs, values, strict=True):
        if isinstance(v, np.ndarray):
            info[o.name] = TensorInfo(tuple(int(d) for d in v.shape), v.dtype.name)
    return info


def with_range_outputs(
    model: onnx.ModelProto, tensors: Sequence[str]
) -> tuple[onnx.ModelProto, list[str]]:
    """The model exposing ``tensors`` plus, for each, its ReduceMin and ReduceMax over all axes:
    onnxruntime computes the exact extremes on its threads, numpy only bins a subsample."""
    from amq.graph.model import NameScope, all_names

    out = expose_outputs(model, list(tensors))
    scope = NameScope(all_names(out))
    extra = []
    for t in tensors:
        mn, mx = scope.new(f"{t}_amq_min"), scope.new(f"{t}_amq_max")
        out.graph.node.extend(
            [
                onnx.helper.make_node(
                    "ReduceMin", [t], [mn], name=scope.new(f"{t}_amq_ReduceMin"), keepdims=0
                ),
                onnx.helper.make_node(
                    "ReduceMax", [t], [mx], name=scope.new(f"{t}_amq_ReduceMax"), keepdims=0
                ),
            ]
        )
        out.graph.output.extend([onnx.ValueInfoProto(name=mn), onnx.ValueInfoProto(name=mx)])
        extra += [mn, mx]
    return out, extra


def collect_stats(
    model: onnx.ModelProto,
    tensors: Sequence[str],
    batches: Iterable[tuple[dict[str, np.ndarray], list, int]],
    bins: int,
    on_batch: Callable[[int], None] | None = None,
    keep_outputs: tuple[int, list] | None = None,
    samples: int | None = None,
) -> dict[str, TensorStats]:
    """Stream batches through one session that exposes only ``tensors`` (and their extremes,
    computed by onnxruntime); fold each into its observer and drop it. Graph inputs are observed
    straight from the feeds. ``keep_outputs=(n, list)``: append the model's own outputs of the
    batches holding the first n samples to the list. (Folding on a worker thread while onnxruntime runs the next batch was
    measured slower on 2 cores: onnxruntime's spinning threads and numpy fight for them.)"""
    g = Graph(model)
    input_names = {i.name for i in g.inputs}
    exposed = [t for t in tensors if t not in input_names]
    # about HISTOGRAM_VALUES values per tensor reach its histogram whatever the number of samples
    # (min/max always see every value); the tail of a 99.99 percentile then holds ~200 of them
    per_sample = (
        MAX_PER_SAMPLE
        if not samples
        else max(2048, min(MAX_PER_SAMPLE, HISTOGRAM_VALUES // samples))
    )
    observers = {t: HistogramObserver(bins, per_sample) for t in tensors}
    sess = None
    outputs = [o.name for o in model.graph.output]
    if exposed:
        augmented, extremes = with_range_outputs(model, exposed)
        # weights go to onnxruntime as shared buffers, not through a serialized copy of the model
        sess = session(augmented, shared=SharedWeights(model))
        names = exposed + extremes
    k = len(exposed)
    kept = 0
    for feeds, _labels, n in batches:
        if keep_outputs is not None and kept < keep_outputs[0] and sess is not None:
            # the model's own outputs of the first samples, for the float-vs-quantized summary
            # (the same session computes them: no second float pass)
            both = sess.run(names + outputs, feeds)
            keep_outputs[1].append(both[len(names) :])
            values = both[: len(names)]
            kept += n
        elif sess is not None:
            values = sess.run(names, feeds)
        if sess is not None:
            for j, name in enumerate(exposed):
                observers[name].update(
                    values[j], float(values[k + 2 * j]), float(values[k + 2 * j + 1])
                )
            del values
        for name in tensors:
            if name in input_names:
                observers[name].update(feeds[name])
        if on_batch:
            on_batch(n)
    return {t: o.compute() for t, o in observers.items()}
