"""Running models over data: run_batches, the one batch loop (evaluation, sensitivity, search,
fidelity, the overflow guard and calibration all stream through it), and calibration's session,
whose batches are folded into observers and dropped."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import onnx
import onnxruntime as ort  # noqa: F401  (the module tests patch: runner.ort)

from amq.calib.kept import Fetch, KeptTensors
from amq.graph.model import Graph, NameScope, all_names
from amq.quant.observers import MAX_PER_SAMPLE, HistogramObserver, TensorStats, sample_stride
from amq.quant.planner import TensorInfo, output_floor
from amq.runtime import TWO_GB, Exposed, SharedWeights, off_heap, release_free_memory, session  # noqa: F401  (re-exported)

HISTOGRAM_VALUES = 2**21  # values per tensor that reach its histogram (min/max see all)


@dataclass
class Batch:
    """One batch through a session: its feeds and labels, how many samples it holds, and the
    outputs asked for, by name."""

    feeds: dict[str, np.ndarray]
    labels: list[Any]
    n: int
    values: dict[str, np.ndarray]


def run_batches(
    sess: Any,
    names: Sequence[str] | Callable[[], Sequence[str]],
    batches: Iterable[tuple[dict[str, np.ndarray], list[Any], int]],
    feeds_for: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
    seconds: list[float] | None = None,
    release: bool = False,
) -> Iterator[Batch]:
    """The one batch loop: each of ``batches`` ((feeds, labels, n) as calib.data.batches yields
    them) through ``sess``, asking for ``names``; each Batch is yielded and then dropped, so
    memory stays that of one batch unless the caller keeps what it needs. Lazy: the next batch
    runs only when asked for, after the caller has folded this one.

    ``names``: a callable is asked again before each batch (an empty list runs nothing: the
    batch is yielded with its feeds only). ``feeds_for``: the feeds actually passed to the
    session (extra inputs computed per batch). ``seconds``: the time of each run call is
    appended to it. ``release``: a Batch's values are emptied once the next batch is asked for,
    before it runs (for callers that keep no Batch: else its outputs stay alive through the
    next run, two batches' worth at the peak - PP-OCRv6 det's overflow pass 1.1 GB)."""
    for feeds, labels, n in batches:
        want = list(dict.fromkeys(names() if callable(names) else names))
        values: dict[str, np.ndarray] = {}
        if want:
            run_feeds = feeds_for(feeds) if feeds_for is not None else feeds
            t0 = time.perf_counter()
            got = sess.run(want, run_feeds)
            if seconds is not None:
                seconds.append(time.perf_counter() - t0)
            values = dict(zip(want, got, strict=True))
            del got
        yield Batch(feeds, labels, n, values)
        if release:
            values.clear()
    release_free_memory()  # what the pass's runs freed goes back before the next pass


def static_info(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray]
) -> dict[str, TensorInfo] | None:
    """Shapes and dtypes of every main-graph tensor from the model's (inferred) value_info, the
    batch dimension taken from the feeds; None unless every tensor has a complete entry."""
    g = model.graph
    batch: dict[str, int] = {}
    for i in g.input:
        dims = i.type.tensor_type.shape.dim
        if i.name in feeds and dims and dims[0].HasField("dim_param") and feeds[i.name].ndim:
            batch[dims[0].dim_param] = int(feeds[i.name].shape[0])
    known = {v.name: v for v in list(g.value_info) + list(g.output)}
    info = {
        k: TensorInfo(tuple(int(d) for d in v.shape), np.asarray(v).dtype.name)
        for k, v in feeds.items()
    }
    for n in g.node:
        for o in n.output:
            if not o or o in info:
                continue
            v = known.get(o)
            if v is None or not v.type.HasField("tensor_type"):
                return None
            tt = v.type.tensor_type
            if not tt.elem_type or not tt.HasField("shape"):
                return None
            shape = []
            for d in tt.shape.dim:
                if d.HasField("dim_value"):
                    shape.append(int(d.dim_value))
                elif d.HasField("dim_param") and d.dim_param in batch:
                    shape.append(batch[d.dim_param])
                else:
                    return None
            try:
                dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
            except Exception:
                return None
            info[o] = TensorInfo(tuple(shape), dtype)
    return info


@dataclass
class Probe:
    """What probing a model found: every main-graph tensor's shape and dtype, and, where a call
    gave them (static inference gave up), the graph outputs' values on the probe's feeds."""

    info: dict[str, TensorInfo]
    outputs: list | None = None  # in graph output order


def probe(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, TensorInfo]:
    """Shapes and dtypes of every main-graph tensor: from static inference when it is complete,
    else from one call exposing every tensor (PITFALLS 3: where static inference gives up)."""
    return probed(model, feeds).info


def probed(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> Probe:
    """``probe``, keeping the graph outputs of the call where one ran."""
    info = static_info(model, feeds)
    if info is not None:
        return Probe(info)
    return _run_probe(model, feeds)


def run_probe(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, TensorInfo]:
    """One call exposing every main-graph tensor: its shapes and dtypes."""
    return _run_probe(model, feeds).info


def _run_probe(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> Probe:
    g = Graph(model)
    names = []
    seen = set(feeds)
    for n in g.nodes:
        for o in n.output:
            if o and o not in seen:
                names.append(o)
                seen.add(o)
    sess = session(Exposed(model, names), optimize=False)
    outs = sess.get_outputs()
    values = sess.run(None, feeds)
    info: dict[str, TensorInfo] = {}
    for k, v in feeds.items():
        info[k] = TensorInfo(tuple(int(d) for d in v.shape), np.asarray(v).dtype.name)
    got = {}
    for o, v in zip(outs, values, strict=True):
        got[o.name] = v
        if isinstance(v, np.ndarray):
            info[o.name] = TensorInfo(tuple(int(d) for d in v.shape), v.dtype.name)
    wanted = [o.name for o in model.graph.output]
    outputs = [got[k] for k in wanted] if all(k in got for k in wanted) else None
    return Probe(info, outputs)


@dataclass
class Tap:
    """How one tensor is observed inside onnxruntime. Only its extremes and a subsample of its
    values leave the session: the full tensor is never copied out, and reductions that onnxruntime
    runs in its blocked (NCHWc) layout - GlobalMaxPool, a 1x1 MaxPool with a stride - keep the
    convolutions around it in that layout and fused with their Relu.

    kind ``spatial`` (float32 [N, C, H, W] with H*W > 1): max = GlobalMaxPool, the sample = every
    ``strides``-th pixel of every channel of every sample. kind ``flat`` (other float32 tensors):
    ReduceMax, and every ``stride``-th value of the flattened stream by global position (the start
    is an input fed per batch). kind ``full`` (tensors whose sample would be all of them, other
    dtypes, old opsets, no probe shape): the tensor itself, folded by numpy.

    ``min`` is None for the output of a Relu (or of a Clip with a constant lower bound >= 0): its
    minimum is taken as that bound, unmeasured (no scale depends on it: every range holds 0), and a
    Relu's zeros are counted as the values it clamped. For ``spatial`` taps the count of a batch is
    N * C (from the GlobalMaxPool) times the probed H * W."""

    tensor: str
    kind: str
    max: str = ""
    min: str | None = None
    sample: str = ""
    size: str | None = None
    start: str | None = None
    stride: int = 1
    floor: float | None = None  # a Relu/Clip output's constant lower bound: its min, unmeasured
    shape: tuple[int, ...] = ()  # as probed
    # per-channel extremes along this axis (-1: none): ``max``/``min`` are then vectors over it
    # (spatial taps with axis 1: the GlobalMaxPool's [N, C, 1, 1]; other axes: ``ch_max``)
    axis: int = -1
    ch_max: str | None = None

    @property
    def clamped(self) -> bool:
        """A Relu's (or Clip(0, ...)'s) output: its exact zeros are the values it clamped."""
        return self.floor == 0.0

    def outputs(self) -> list[str]:
        if self.kind == "full":
            return [self.tensor]
        return [n for n in (self.max, self.min, self.sample, self.size, self.ch_max) if n]


def _spatial_strides(c: int, h: int, w: int, per_sample: int) -> tuple[int, int]:
    """Row and column strides of the pixel grid sampled from a [C, H, W] sample: at most about
    ``per_sample`` values, striding the axis that keeps more positions first, so a short axis
    (3 rows of a text-line feature map) is not cut down to its border row."""
    sh = sw = 1
    while c * -(-h // sh) * -(-w // sw) > per_sample and (sh < h or sw < w):
        if sw >= w or (sh < h and -(-h // sh) >= -(-w // sw)):
            sh += 1
        else:
            sw += 1
    return sh, sw


def observation_model(
    model: onnx.ModelProto,
    tensors: Sequence[str],
    info: Mapping[str, TensorInfo] | None,
    per_sample: int,
    axes: Mapping[str, int] | None = None,
    extra: Sequence[str] = (),
    kept: Mapping[str, Fetch] | None = None,
) -> tuple[onnx.ModelProto, list[Tap]]:
    """The model with, for each of ``tensors``, the outputs of its Tap (see there); ``axes``:
    the channel axis of a tensor whose per-channel extremes are wanted; ``extra``: tensors
    output whole besides; ``kept``: tensors of which only some samples (and rows) are output
    (KeptTensors.name_outputs)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    build = _TapBuilder(model, out)
    axes = axes or {}
    taps = [
        build.tap(t, info.get(t) if info else None, per_sample, axes.get(t, -1)) for t in tensors
    ]
    for t, f in (kept or {}).items():
        build.kept(t, f)
        extra = [*extra, *f.names()]
    for n in build.nodes:
        n.name = build.scope.new(f"{n.output[0]}_{n.op_type}")
    out.graph.node.extend(build.nodes)
    have = {o.name for o in out.graph.output}
    for o in [o for tap in taps for o in tap.outputs()] + list(extra):
        if o not in have:
            out.graph.output.append(onnx.ValueInfoProto(name=o))
            have.add(o)
    return out, taps


class _TapBuilder:
    """observation_model's nodes, new names and int64 constants, added to ``out``."""

    def __init__(self, model: onnx.ModelProto, out: onnx.ModelProto) -> None:
        from amq.graph.model import NameScope, all_names, opset_version

        self.g = Graph(model)
        self.out = out
        self.scope = NameScope(all_names(out))
        self.opset = opset_version(model)
        self.nodes: list[onnx.NodeProto] = []
        self.consts: dict[str, str] = {}

    def const(self, values: list[int]) -> str:
        from onnx import TensorProto, helper

        key = ",".join(map(str, values))
        if key not in self.consts:
            self.consts[key] = self.scope.new(f"amq_i64_{key.replace(',', '_').replace('-', 'm')}")
            self.out.graph.initializer.append(
                helper.make_tensor(self.consts[key], TensorProto.INT64, [len(values)], values)
            )
        return self.consts[key]

    def reduce(self, op: str, t: str, out: str, axes: list[int] | None) -> onnx.NodeProto:
        """ReduceMax/ReduceMin of ``t`` over ``axes`` (None: all), no kept dims; the axes as an
        attribute before opset 18, as an input from 18 on."""
        from onnx import helper

        if axes is None:
            return helper.make_node(op, [t], [out], keepdims=0)
        if self.opset >= 18:
            return helper.make_node(op, [t, self.const(axes)], [out], keepdims=0)
        return helper.make_node(op, [t], [out], keepdims=0, axes=axes)

    def kept(self, t: str, f: Fetch) -> None:
        """``f.out``: the first ``f.samples`` of ``t``'s axis 0; of a row-cut tensor, only its
        rows ``f.rows`` of axis 2 there, each clamped to the last one it has (so that a shorter
        map gives a wrong value, never an error: ``f.height``, its axis 2, says so)."""
        from onnx import helper

        self.scope.taken |= {f.out} | ({f.height} if f.height else set())
        head = f.out if f.rows is None else self.scope.new(f"{t}_amq_head")
        one = [self.const([0])]
        self.nodes.append(
            helper.make_node("Slice", [t, *one, self.const([f.samples]), *one], [head])
        )
        if f.rows is None or f.height is None:
            return
        new = {k: self.scope.new(f"{t}_amq_{k}") for k in ("shape", "last", "at")}
        self.nodes += [
            helper.make_node("Shape", [t], [new["shape"]]),
            helper.make_node("Gather", [new["shape"], self.const([2])], [f.height], axis=0),
            helper.make_node("Sub", [f.height, self.const([1])], [new["last"]]),
            helper.make_node(
                "Min", [self.const([int(r) for r in f.rows]), new["last"]], [new["at"]]
            ),
            helper.make_node("Gather", [head, new["at"]], [f.out], axis=2),
        ]

    def tap(self, t: str, ti: TensorInfo | None, per_sample: int, axis: int = -1) -> Tap:
        from onnx import helper

        shape = ti.shape if ti is not None else ()
        producer = self.g.producer.get(t)
        floor = output_floor(self.g, producer) if producer is not None else None
        if ti is None or ti.dtype != "float32" or not shape or 0 in shape:
            return Tap(t, "full", floor=floor)
        spatial = len(shape) == 4 and shape[2] * shape[3] > 1
        if spatial:
            sh, sw = _spatial_strides(shape[1], shape[2], shape[3], per_sample)
            stride = sh * sw
        else:
            per = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            stride = sample_stride(per, per_sample, shape[-1])
        if stride == 1 or (not spatial and self.opset < 10):
            # the sample would be the whole tensor (or Slice-10 is missing): copy it out as it
            # is and let numpy take the extremes - cheaper than more nodes for a small tensor
            return Tap(t, "full", floor=floor, shape=shape)
        tap = Tap(t, "spatial" if spatial else "flat", floor=floor, shape=shape, stride=stride)
        tap.axis = axis if 0 <= axis < len(shape) else -1
        rest = [i for i in range(len(shape)) if i != tap.axis] if tap.axis >= 0 else None
        tap.max = self.scope.new(f"{t}_amq_max")
        tap.sample = self.scope.new(f"{t}_amq_sample")
        if floor is None:
            tap.min = self.scope.new(f"{t}_amq_min")
            self.nodes.append(self.reduce("ReduceMin", t, tap.min, rest))
        if rest is not None and (not spatial or tap.axis != 1):
            tap.ch_max = self.scope.new(f"{t}_amq_chmax")
            self.nodes.append(self.reduce("ReduceMax", t, tap.ch_max, rest))
        if spatial:
            self.nodes += [
                helper.make_node("GlobalMaxPool", [t], [tap.max]),
                helper.make_node(
                    "MaxPool", [t], [tap.sample], kernel_shape=[1, 1], strides=[sh, sw]
                ),
            ]
        else:
            self._flat_sample(tap)
        return tap

    def _flat_sample(self, tap: Tap) -> None:
        """ReduceMax, Size, and every ``stride``-th value of the flattened tensor from a start
        fed per batch."""
        from onnx import TensorProto, helper

        t = tap.tensor
        flat = self.scope.new(f"{t}_amq_flat")
        tap.size = self.scope.new(f"{t}_amq_size")
        tap.start = self.scope.new(f"{t}_amq_start")
        self.out.graph.input.append(
            helper.make_tensor_value_info(tap.start, TensorProto.INT64, [1])
        )
        self.nodes += [
            helper.make_node("ReduceMax", [t], [tap.max], keepdims=0),
            helper.make_node("Size", [t], [tap.size]),
            helper.make_node("Reshape", [t, self.const([-1])], [flat]),
            helper.make_node(
                "Slice",
                [flat, tap.start, self.const([2**62]), self.const([0]), self.const([tap.stride])],
                [tap.sample],
            ),
        ]


class Watcher(Protocol):
    def asked(self) -> list[str]: ...
    def take(self, b: Batch) -> None: ...


@dataclass(frozen=True)
class CollectOptions:
    """collect_stats' optional settings (given to it as keywords).

    ``on_batch(n)``: called after each batch. ``keep_outputs=(n, list)``: append the model's own
    outputs of the batches holding the first n samples to the list. ``samples``: how many the
    batches hold. ``info``: the probe's shapes and dtypes (they choose how onnxruntime reduces
    each tensor). ``per_sample``: histogram values per sample (default: about HISTOGRAM_VALUES
    per tensor over ``samples``). ``channel_axes``: the axis along which each tensor's
    per-channel extremes are gathered (the reading layer's input channels). ``keep_tensors``:
    small tensors whose whole values the pass keeps on the first samples (KeptTensors).
    ``watch``: another job's reader of this pass's calls (asked for the tensors it wants before
    each, given each before the observers fold it: calib/smoothing.py's Watch)."""

    on_batch: Callable[[int], None] | None = None
    keep_outputs: tuple[int, list] | None = None
    samples: int | None = None
    info: Mapping[str, TensorInfo] | None = None
    per_sample: int | None = None
    channel_axes: Mapping[str, int] | None = None  # tensor -> axis of its per-channel extremes
    keep_tensors: KeptTensors | None = None
    watch: Watcher | None = None

    def values_per_sample(self) -> int:
        # about HISTOGRAM_VALUES values per tensor reach its histogram whatever the number of
        # samples (min/max always see every value); the tail of a 99.99 percentile then holds
        # ~200 of them
        if self.per_sample is not None:
            return self.per_sample
        if not self.samples:
            return MAX_PER_SAMPLE
        return max(2048, min(MAX_PER_SAMPLE, HISTOGRAM_VALUES // self.samples))


def collect_stats(
    model: onnx.ModelProto,
    tensors: Sequence[str],
    batches: Iterable[tuple[dict[str, np.ndarray], list, int]],
    bins: int,
    **options: Any,
) -> dict[str, TensorStats]:
    """Stream batches through one session that outputs, for each of ``tensors``, its extremes
    and a subsample (``observation_model``); fold each batch into its observer and drop it.
    Graph inputs are observed straight from the feeds. ``options``: the fields of
    CollectOptions. (Folding on a worker thread while onnxruntime runs the next batch was
    measured slower on 2 cores: onnxruntime's spinning threads and numpy fight for them.)"""
    opt = CollectOptions(**options)
    input_names = {i.name for i in Graph(model).inputs}
    exposed = [t for t in tensors if t not in input_names]
    per_sample = opt.values_per_sample()
    axes = opt.channel_axes or {}
    observers = {t: HistogramObserver(bins, per_sample, axes.get(t, -1)) for t in tensors}
    sess = None
    taps: list[Tap] = []
    names: list[str] = []
    held = opt.keep_tensors if opt.keep_tensors is not None and opt.keep_tensors.wanted() else None
    cut = held.name_outputs(NameScope(all_names(model)), input_names) if held else {}
    watch = opt.watch
    watched = [t for t in watch.asked() if t not in input_names] if watch is not None else []
    if held is not None and not exposed and not watched:  # no session: inputs, from the feeds
        held.want = {t: n if t in input_names else 0 for t, n in held.want.items()}
    if exposed or watched:
        whole = [t for t in held.wanted() if t not in held.fetch] if held is not None else []
        extra = [t for t in whole if t not in input_names] + watched
        augmented, taps = observation_model(model, exposed, opt.info, per_sample, axes, extra, cut)
        # weights go to onnxruntime as shared buffers, not through a serialized copy of the model
        sess = session(augmented, shared=SharedWeights(model), early_reads=True)
        names = list(dict.fromkeys(n for tap in taps for n in tap.outputs()))
    keep = _KeptOutputs(model, names, taps, opt.keep_outputs)

    def feeds_for(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        run_feeds = dict(feeds)
        for tap in taps:
            if tap.start is not None:
                offset = observers[tap.tensor].offset
                run_feeds[tap.start] = np.array([(-offset) % tap.stride], dtype=np.int64)
        return run_feeds

    def asked() -> list[str]:
        more = held.outputs(input_names) if held is not None else []
        more += watch.asked() if watch is not None else []
        return list(dict.fromkeys(keep.asked() + [t for t in more if t not in input_names]))

    for b in run_batches(sess, asked, batches, feeds_for, release=True):
        keep.take(b)
        if held is not None:
            held.take(b)
        if watch is not None:
            watch.take(b)
        for tap in taps:
            _fold(observers[tap.tensor], tap, b.values)
        for name in tensors:
            if name in input_names:
                observers[name].update(b.feeds[name])
        if opt.on_batch:
            opt.on_batch(b.n)
    return {t: o.compute() for t, o in observers.items()}


class _KeptOutputs:
    """The model's own outputs of the first samples, for the float-vs-quantized summary: the
    calibration session computes them alongside the taps (no second float pass)."""

    def __init__(
        self,
        model: onnx.ModelProto,
        names: list[str],
        taps: list[Tap],
        keep: tuple[int, list] | None,
    ) -> None:
        self.names = names
        self.outputs = [o.name for o in model.graph.output]
        self.folded = {tap.tensor for tap in taps if tap.kind == "full"}  # kept by an observer
        self.limit, self.into = keep if keep is not None else (0, [])
        self.kept = 0

    def asked(self) -> list[str]:
        if not self.names:
            return []
        return self.names + self.outputs if self.kept < self.limit else self.names

    def take(self, b: Batch) -> None:
        if not self.names or self.kept >= self.limit:
            return
        v = b.values
        self.into.append([v[o].copy() if o in self.folded else v[o] for o in self.outputs])
        self.kept += b.n


def _fold(obs: HistogramObserver, tap: Tap, got: Mapping[str, np.ndarray]) -> None:
    if tap.kind == "full":
        obs.update(got[tap.tensor], clamped=tap.clamped, owned=True)
        return
    mx = np.asarray(got[tap.max])
    sample = np.asarray(got[tap.sample])
    if tap.kind == "spatial":  # N and C of this batch, H and W as probed
        count = int(mx.shape[0]) * int(mx.shape[1]) * tap.shape[2] * tap.shape[3]
    else:
        count = int(np.asarray(got[tap.size]))
    empty = count == 0 or mx.size == 0
    hi = float(mx.max()) if not empty else 0.0
    mn = np.asarray(got[tap.min]) if tap.min and not empty else None
    lo = float(mn.min()) if mn is not None else float(tap.floor or 0.0)
    if tap.axis >= 0 and not empty:
        ch_hi = np.asarray(got[tap.ch_max]) if tap.ch_max else mx.max(axis=(0, 2, 3))
        ch_lo = mn if mn is not None else np.full(ch_hi.shape, float(tap.floor or 0.0))
        obs.update_channels(ch_lo, ch_hi)
    obs.update_sample(
        sample, 0 if empty else count, lo, hi, tap.clamped, stride=tap.stride, shape=tap.shape
    )
