"""The overflow guard's data pass (PITFALLS 9): which layers would saturate int16 pair sums.

For every Conv/Gemm/MatMul that onnxruntime would run with an 8-bit GEMM, the layer's input is
read on a few calibration samples, quantized with the plan's own activation grid, and fed with
the plan's 8-bit weight codes to a numpy model of the AVX2 kernel (``quant.overflow``). The input
is the float model's tensor, not the quantized model's: the decision then depends only on the
calibration data and the layer's own grids - never on the CPU amq runs on, nor on the bits a
search gives other layers - and a result is cached per (layer, input grid, weight grid), so
sensitivity and search, which build hundreds of plans, pay for each layer once.

A layer is read batch by batch until it has ENOUGH_POSITIONS output positions. Where that takes
more than one batch, the calibration pass keeps its input on those samples (kept_inputs), and
the emulation reads it from there instead of running the model again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from amq.calib import cache as stats_cache
from amq.calib.data import Dataset, InputSpec, batch_limit, batches
from amq.calib.kept import KeptTensors, RowCrop
from amq.calib.memory import MB, counted_mb, uncounted
from amq.calib.runner import run_batches
from amq.config import CalibrationConfig
from amq.graph.model import Graph, opset_version
from amq.plan import LayerPlan, QuantPlan, TensorPlan
from amq.quant import overflow, qmath
from amq.quant.algorithms import adaround, layer_inputs
from amq.quant.conv_geometry import conv_geometry
from amq.quant.planner import (
    TensorInfo,
    apply_overflow_guard,
    node_attrs,
    overflow_candidates,
)
from amq.quant.registry import Kernel, gemm_transposed, handler
from amq.runtime import Exposed, release_free_memory, session

GUARD_SAMPLES = 64  # calibration samples the emulation reads at most (one batch at a time)
# ... and a layer is emulated on no more batches once it has this many output positions (times
# its output channels; the bundled CNN's layers read 16 samples, a 384x512
# detector's first layers one batch). Measured: the same guard decisions on the 76 golden cases
# and the bundled example as at 4096 and at all 64 samples; PP-OCR det's quantize 10.5 -> 9.2 s
ENOUGH_POSITIONS = 1 << 10
# output positions per layer and batch the emulation computes at most: as many as it needs in
# all (ENOUGH_POSITIONS), so a large layer is done after one batch. 4096 read 4x what it needed
# on PP-OCR det's 640-wide maps; the same guard decisions and model bytes on the 8 bench models
# and the 76 goldens at 1024 as at 4096 (det's quantize 8.15 -> 7.72 s, 3 runs each)
MAX_POSITIONS = 1 << 10
BANDS = 4  # ... in this many evenly spaced bands of output rows
KEEP_VALUES = 1 << 17  # values a sample of a layer input the calibration pass may keep whole
# (a larger Conv input: only the rows its bands read) ... and in all, counting what the
# calibration pass fetches for them a batch (a split tensor only on the samples kept, another
# a whole batch), at most this share of the memory budget (128 MB of the default 1024 MB).
# At 1/16 the PP-OCR models' layers on large maps were read by a model run of the overflow
# pass's own; at 1/8, with those rows kept, none of the 5 OCR/layout models in bench/ runs one
# (PP-OCRv6 rec's check 1.6 -> 1.26 s; same bytes and peaks within 15 MB; RESULTS.md #14).
# Before: 32 MB had PP-OCR det's overflow pass run the model for 3 batches, 64 MB for 1.
KEEP_SHARE = 8
KEEP_BYTES = 64 << 20  # ... and this much without a budget
KIND = "overflow"  # the results' cache files: overflow-<key>.npz
VERSION = 1  # of the emulation: a cache entry of another version is not read


def _act_codes(x: np.ndarray, tp: TensorPlan) -> np.ndarray:
    g = qmath.grid(tp.bits, tp.signed, tp.narrow)
    return qmath.quantize(x, tp.scale[0], tp.zero_point[0], g)


def guard_batch(batch_size: int) -> int:
    """The samples a batch of the overflow pass holds: at most 4 (the exposed inputs of many
    layers at once)."""
    return max(1, min(batch_size, 4))


def _outputs_per_position(lp: LayerPlan, shape: Sequence[int], attrs: Mapping[str, object]) -> int:
    """Output values per output position of a layer whose weight has ``shape``: Cout of a Conv,
    N of a MatMul/Gemm (its weight's columns in the kernel's [K, N] order, per slice of a
    batched weight)."""
    if handler(lp.op_type).pair_sums is Kernel.CONV:
        return max(1, int(shape[0]))
    if len(shape) == 2 and gemm_transposed(lp.op_type, attrs):
        return max(1, int(shape[0]))
    return max(1, int(shape[-1]))


def keep_bytes(budget_mb: int) -> int:
    """What the calibration pass may keep for the overflow pass, in bytes: KEEP_SHARE of the
    memory budget, or KEEP_BYTES without one."""
    return budget_mb * MB // KEEP_SHARE if budget_mb > 0 else KEEP_BYTES


def kept_inputs(
    g: Graph,
    plan: QuantPlan,
    info: Mapping[str, TensorInfo],
    samples: int,
    calibration: CalibrationConfig,
    specs: Sequence[InputSpec] = (),
) -> KeptTensors:
    """What the calibration pass (``calibration``'s batches of ``samples`` calibration samples)
    keeps for the overflow pass (which reads GUARD_SAMPLES of them at most, in batches of
    ``guard_batch``, one sample a call where ``specs`` fix the batch), within ``keep_bytes`` of
    its memory budget. The calibration pass runs the model on those samples anyway; without
    this the overflow pass ran the model for as many batches as its neediest layer asked for
    (squeeze-and-excitation Convs on 1x1 maps read every sample; PP-OCR rec ran 8 batches).

    Kept: every candidate layer's input where all fit (then the overflow pass runs no model),
    each on the samples its layer reads; else only those of layers that read more than one
    batch, neediest first (all the layers that read as many samples, or none of them). An
    input over KEEP_VALUES values a sample is kept only where its layers are Convs: as the rows
    their bands read (conv_bands; KeptTensors.rows). An input cannot be kept where it could be
    cut only where batches end while its layer reads fewer than every sample: a tensor whose
    axis 0 holds one sample a row can be cut at any sample (KeptTensors.split). Which layers
    need data at all is known only once their weights are quantized (_may_saturate), so the
    count is an upper bound."""
    calib_batch = calibration.batch_size
    samples, batch = min(GUARD_SAMPLES, samples), guard_batch(calib_batch)
    first = min(samples, batch_limit(specs, batch) if specs else batch)
    found: dict[str, tuple[int, int]] = {}  # input -> (samples the layer reads, values a sample)
    split, unkept = set(), False  # unkept: a layer whose input cannot be kept
    # large input -> (rows its layers read, samples they read); None: it cannot be cut
    crops: dict[str, tuple[set[int], int] | None] = {}
    for lp in overflow_candidates(plan):
        x, y = lp.act_inputs[0], lp.outputs[0] if lp.outputs else None
        w = g.initializers.get(lp.weight) if lp.weight else None
        if w is None or y not in info or x not in info or lp.overflow != "auto":
            continue
        attrs = node_attrs(g.node_by_name[lp.name])
        per_pos = _outputs_per_position(lp, w.dims, attrs)
        positions = max(1, int(np.prod(info[y].shape)) // per_pos)
        values = int(np.prod(info[x].shape))
        reads = min(samples, batch * -(-ENOUGH_POSITIONS // (batch * positions)))
        rows = len(info[x].shape) >= 2 and info[x].shape[0] == 1
        if values > KEEP_VALUES:  # only the rows of its bands, on the batches it reads
            shape = (first, *info[x].shape[1:])
            cuttable = rows and opset_version(g.model) >= 12  # (Min of int64 indices)
            band = band_rows(lp, shape, tuple(w.dims), attrs) if cuttable else None
            have = crops.get(x, (set(), 0))
            if band is None or have is None or band[1] < 1:
                crops[x] = None
            else:
                n = min(samples, first * -(-ENOUGH_POSITIONS // band[1]))
                crops[x] = (have[0] | band[0], max(have[1], n))
            continue
        if not rows and reads < samples:
            unkept = True
            continue
        found[x] = (max(reads, found.get(x, (0, 0))[0]), values)
        if rows:
            split.add(x)
    unkept = unkept or any(r is None for r in crops.values())
    cut = {x: c for x, c in crops.items() if c is not None}
    cut_bytes = {x: 4 * n * len(r) * _row_values(info[x]) for x, (r, n) in cut.items()}
    # a split input is fetched on the samples kept, another whole, a calibration batch at once
    level_bytes = {
        x: 4 * (r if x in split else max(r, calib_batch)) * v for x, (r, v) in found.items()
    }
    room = keep_bytes(calibration.memory_mb)
    if not unkept and sum(cut_bytes.values()) + sum(level_bytes.values()) <= room:
        rows = {x: np.array(sorted(r), dtype=np.int64) for x, (r, _) in cut.items()}
        want = {x: n for x, (_, n) in cut.items()} | {x: r for x, (r, _) in found.items()}
        return KeptTensors(want, split | set(cut), rows=rows)  # the data pass runs no model
    want, total = {}, 0  # it runs at least its first batch: keep what saves it more
    for reads in sorted({r for r, _ in found.values()}, reverse=True):
        level = {x: r for x, (r, _) in found.items() if r == reads}
        total += sum(level_bytes[x] for x in level)
        if total > room or reads <= batch:
            break  # the data pass reads this many samples anyway: keeping fewer saves nothing
        want.update(level)
    return KeptTensors(want, split & set(want))


def _row_values(ti: TensorInfo) -> int:
    """Values of one row of axis 2 of a 4-D tensor, a sample."""
    return int(np.prod(ti.shape[1:])) // max(1, int(ti.shape[2]))


def band_rows(
    lp: LayerPlan, x_shape: tuple[int, ...], w_shape: tuple[int, ...], attrs: Mapping[str, object]
) -> tuple[set[int], int] | None:
    """The rows of a 2-D Conv's input (axis 2, a batch of ``x_shape``) that its emulation reads
    (conv_bands: bands of them on a large map, else all), and the output positions it gets from
    them in such a batch; None for another layer."""
    if handler(lp.op_type).pair_sums is not Kernel.CONV or len(x_shape) != 4:
        return None
    geo = conv_geometry(attrs, w_shape, x_shape)
    rows, positions = set(), 0
    for crop, g in conv_bands(x_shape, w_shape, geo, MAX_POSITIONS):
        a, b, _ = crop[2].indices(x_shape[2])
        out_h, out_w = _output_size((*x_shape[:2], b - a, x_shape[3]), w_shape, g)
        positions += max(0, out_h) * x_shape[0] * max(out_w, 0)
        rows.update(range(a, b))
    return rows, positions


def _output_size(
    x_shape: tuple[int, ...], w_shape: tuple[int, ...], geo: Mapping[str, object]
) -> tuple[int, int]:
    """A 2-D Conv's output height and width on an input [N, C, H, W] (``geo``: conv_geometry's)."""
    (s, sw), (d, dw) = geo["strides"], geo["dilations"]  # type: ignore[misc]
    pads = geo["pads"]
    out_h = (x_shape[2] + pads[0] + pads[2] - (d * (w_shape[2] - 1) + 1)) // s + 1  # type: ignore[index]
    out_w = (x_shape[3] + pads[1] + pads[3] - (dw * (w_shape[3] - 1) + 1)) // sw + 1  # type: ignore[index]
    return out_h, out_w


def _weight_codes(w: np.ndarray, tp: TensorPlan) -> tuple[np.ndarray, np.ndarray]:
    """A weight's codes, in int16 where its grid fits (every grid the guard reads): the pass
    holds every candidate layer's codes at once, which int64 made 4x a transformer's weights."""
    g = qmath.grid(tp.bits, tp.signed, tp.narrow)
    small = g.qmin >= np.iinfo(np.int16).min and g.qmax <= np.iinfo(np.int16).max
    q = adaround.codes(tp, w)
    return q.astype(np.int16 if small else np.int32), np.asarray(tp.scale, dtype=np.float64)


class SaturationPass:
    """Measures, on the first ``samples`` calibration samples, how each candidate layer's int16
    pair sums would saturate; results are kept per layer and grids."""

    def __init__(
        self,
        graph: Graph,
        data: Dataset,
        specs: Sequence[InputSpec],
        batch_size: int,
        kept: KeptTensors | None = None,
        sample_values: Mapping[str, int] | None = None,
        budget_mb: int = 0,
        cache: tuple[Path, str] | None = None,
    ) -> None:
        """``cache``: (folder, key of the model and data) to keep the results on disk."""
        self.graph = graph
        self.data = data.head(GUARD_SAMPLES)
        self.specs = list(specs)
        self.batch_size = guard_batch(batch_size)
        how = (GUARD_SAMPLES, ENOUGH_POSITIONS, MAX_POSITIONS, BANDS, self.batch_size, VERSION)
        self.cache = (cache[0], "-".join(map(str, (cache[1], *how)))) if cache else None
        got = stats_cache.load_arrays(self.cache[0], KIND, self.cache[1]) if self.cache else {}
        self._done = {k: overflow.Saturation.of(v) for k, v in got.items()}
        self.kept = kept  # layer inputs the calibration pass kept (kept_inputs)
        self._batch_sizes: list[int] | None = None
        self.sample_values = sample_values or {}  # values of a tensor a sample (the probe's)
        self.budget_mb = budget_mb  # the layers' inputs a run exposes fit its room (_groups)
        self.split: tuple[int, int, float] | None = None  # (runs, layers, MB held) where it split

    def measure(
        self, plan: QuantPlan, layers: Sequence[LayerPlan]
    ) -> dict[str, overflow.Saturation]:
        """Saturation of each layer's pair sums under ``plan``'s grids (layer name -> result).
        A layer that no activation code of its grid can saturate gets an empty result without
        reading data: the emulation would find nothing there."""
        keys = {lp.name: layer_inputs.grids_key(plan, lp) for lp in layers}
        new = any(keys[lp.name] not in self._done for lp in layers)
        for lp in layers:
            if keys[lp.name] not in self._done and not _may_saturate(self.graph, plan, lp):
                self._done[keys[lp.name]] = overflow.Saturation()
        todo = [lp for lp in layers if keys[lp.name] not in self._done]
        if todo:
            for lp, sat in zip(todo, self._run(plan, todo), strict=True):
                self._done[keys[lp.name]] = sat
        if new and self.cache:
            arrays = {k: sat.array() for k, sat in self._done.items()}
            stats_cache.save_arrays(self.cache[0], KIND, self.cache[1], arrays)
        return {lp.name: self._done[keys[lp.name]] for lp in layers}

    def _run(self, plan: QuantPlan, layers: Sequence[LayerPlan]) -> list[overflow.Saturation]:
        weights = [
            _weight_codes(self.graph.array(lp.weight), plan.tensors[lp.weight]) for lp in layers
        ]  # type: ignore[arg-type]
        prepared = [overflow.WeightsCache() for _ in layers]  # each layer's, across batches
        kept = [
            self._from_kept(plan, *args) for args in zip(layers, weights, prepared, strict=True)
        ]
        results = [sat if sat is not None else overflow.Saturation() for sat in kept]
        run = [i for i, sat in enumerate(kept) if sat is None]
        for i, sat in enumerate(kept):
            if sat is not None:  # done from the kept inputs: its prepared weights go
                prepared[i].groups = None
        for group in self._groups([layers[i] for i in run]) if run else []:
            at = [run[j] for j in group]  # one run of the model for these layers' inputs
            self._run_data(plan, [layers[i] for i in at], [weights[i] for i in at],
                           [results[i] for i in at], [prepared[i] for i in at])  # fmt: skip
        return results

    def _from_kept(
        self,
        plan: QuantPlan,
        lp: LayerPlan,
        weights: tuple[np.ndarray, np.ndarray],
        cache: overflow.WeightsCache,
    ) -> overflow.Saturation | None:
        """``lp`` emulated on its input as the calibration pass kept it, batch by batch as the
        data pass would, until it has read enough; None where what was kept does not reach
        that (nothing kept, or fewer samples than it needs)."""
        t = lp.act_inputs[0]
        # the data pass's batch sizes read every guard sample: only for an input held
        got = self.kept.batches(t, self._sizes()) if self.kept and self.kept.holds(t) else None
        if got is None:
            return None
        need, result = self._enough(lp, weights[0]), overflow.Saturation()
        for x in got:
            if result.outputs >= need:
                return result
            try:
                result.update(self._emulate(plan, lp, x, weights, cache))
            except KeyError:  # its bands read rows that were not kept (another map size)
                return None
        if result.outputs >= need or t not in self.kept.split:
            return result  # enough, or held on exactly these samples (all of them read)
        return result if len(got) == len(self._sizes()) else None  # every batch read, or not

    def _enough(self, lp: LayerPlan, wq: np.ndarray) -> int:
        """The output values after which a layer has been read enough: ENOUGH_POSITIONS output
        positions."""
        attrs = node_attrs(self.graph.node_by_name[lp.name])
        return ENOUGH_POSITIONS * _outputs_per_position(lp, wq.shape, attrs)

    def _sizes(self) -> list[int]:
        """The samples of each batch the data pass runs (batches() cuts where shapes change,
        and runs one sample a call where an input has a fixed batch)."""
        if self._batch_sizes is None:
            self._batch_sizes = [n for _, _, n in batches(self.data, self.specs, self.batch_size)]
        return self._batch_sizes

    def _groups(self, layers: Sequence[LayerPlan]) -> list[list[int]]:
        """The layers that read their inputs from a run of the model (indices), in runs whose
        exposed inputs, a batch's worth, take at most half the budget's room (the run itself
        takes about as much again; each layer's result is the same in any run): PP-OCRv6 det's
        83 Conv inputs, 4 samples a batch, were its quantize's peak at 1.15 GB. In graph order;
        one run without a budget or where the resident size cannot be read. A batch holds what
        batches() puts in one call (``batch_limit``: one sample where an input's batch is fixed;
        the YOLOv8n layout detector's inputs were counted 4 times over, and split into 3 runs)."""
        now = counted_mb() if self.budget_mb > 0 and release_free_memory() else None
        if now is None:
            return [list(range(len(layers)))]
        cap = max(self.budget_mb - now, 0.0) / 2 * MB
        per_batch = batch_limit(self.specs, self.batch_size)
        feeds = {v.name for v in self.graph.inputs}  # from the feeds: not exposed
        groups: list[list[int]] = [[]]
        seen: set[str] = set()
        size = 0.0
        for i, lp in enumerate(layers):
            x = lp.act_inputs[0]
            cost = 0 if x in feeds else 4 * per_batch * self.sample_values.get(x, 0)
            add = 0 if x in seen else cost
            if groups[-1] and size + add > cap:
                groups.append([])
                seen, size, add = set(), 0.0, cost
            groups[-1].append(i)
            seen.add(x)
            size += add
        if len(groups) > 1:
            self.split = (len(groups), len(layers), now)
        return groups

    def note(self) -> str | None:
        """A line for the summary where the budget split the layers' inputs into several runs."""
        if self.split is None:
            return None
        runs, layers, held = self.split
        return (
            f"memory budget {self.budget_mb} MB: the overflow check read its {layers} layers' "
            f"inputs in {runs} runs of the model ({held:.0f} MB were held){uncounted()}"
        )

    def _run_data(
        self,
        plan: QuantPlan,
        layers: Sequence[LayerPlan],
        weights: Sequence[tuple[np.ndarray, np.ndarray]],
        results: Sequence[overflow.Saturation],
        prepared: Sequence[overflow.WeightsCache],
    ) -> None:
        """Run the model over the samples for ``layers``' inputs, batch by batch, each layer
        until it has read enough positions; results are updated in place."""
        inputs = {lp.act_inputs[0] for lp in layers}
        graph_inputs = {v.name for v in self.graph.inputs}
        exposed = sorted(inputs - graph_inputs)
        sess = session(
            Exposed(self.graph.model, exposed),
            source="model (overflow guard: layer inputs)",
        )
        need = [self._enough(lp, wq) for lp, (wq, _) in zip(layers, weights, strict=True)]

        def todo() -> list[int]:
            return [i for i, (r, n) in enumerate(zip(results, need, strict=True)) if r.outputs < n]

        calls = batches(self.data, self.specs, self.batch_size)
        for b in run_batches(sess, exposed, calls, release=True):
            got = {**b.values, **{k: v for k, v in b.feeds.items() if k in inputs}}
            for i in todo():
                x = got[layers[i].act_inputs[0]]
                results[i].update(self._emulate(plan, layers[i], x, weights[i], prepared[i]))
                if results[i].outputs >= need[i]:  # read enough: its prepared weights go
                    prepared[i].groups = None  # (all-mpnet-base-v2's reach 0.6 GB)
            got = x = None  # before the next batch runs
            if not todo():  # before the next batch runs (run_batches is lazy)
                break

    def _emulate(
        self,
        plan: QuantPlan,
        lp: LayerPlan,
        x: np.ndarray | RowCrop,
        weights: tuple[np.ndarray, np.ndarray],
        cache: overflow.WeightsCache,
    ) -> overflow.Saturation:
        """``lp``'s pair sums on one batch of its input ``x`` (a RowCrop: the rows its bands
        read; KeyError where they are not all held)."""
        (wq, ws), a = weights, plan.tensors[lp.act_inputs[0]]
        attrs = node_attrs(self.graph.node_by_name[lp.name])
        s_x, zp = float(a.scale[0]), int(a.zero_point[0])
        if not isinstance(x, RowCrop):
            x = np.asarray(x, dtype=np.float32)
        if handler(lp.op_type).pair_sums is Kernel.CONV:
            geo = conv_geometry(attrs, wq.shape, x.shape)
            out = overflow.Saturation()
            for crop, g in conv_bands(x.shape, wq.shape, geo, MAX_POSITIONS):
                codes = _act_codes(x[crop], a)
                sat = overflow.conv_saturation(
                    codes, zp, wq, ws, s_x, signed=a.signed, cache=cache, **g
                )
                out.update(sat)
            return out
        if wq.ndim != 2:  # a batched weight [E, K, N]: one GEMM per slice (onnxruntime 1.20)
            return _batched_saturation(a, x, wq, ws, s_x, zp)
        if attrs.get("transA", 0):  # Gemm's A transposed
            x = x.T
        if gemm_transposed(lp.op_type, attrs):
            wq = wq.T
        rows = x.reshape(-1, x.shape[-1])
        if len(rows) > MAX_POSITIONS:  # evenly spread rows: the energies' ratio is what decides
            rows = rows[np.linspace(0, len(rows) - 1, MAX_POSITIONS).astype(np.int64)]
        codes = _act_codes(rows, a)
        return overflow.matmul_saturation(codes, zp, wq, ws, s_x, signed=a.signed, cache=cache)


def _slices(x: np.ndarray, w: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """A batched MatMul's (activation rows, weight) pairs per slice of its weight [..., K, N],
    the two broadcast against each other as MatMul does; [] where they cannot be."""
    try:
        lead = np.broadcast_shapes(x.shape[:-2], w.shape[:-2])
    except ValueError:
        return []
    xb = np.broadcast_to(x, lead + x.shape[-2:]).reshape(-1, *x.shape[-2:])
    wb = np.broadcast_to(w, lead + w.shape[-2:]).reshape(-1, *w.shape[-2:])
    seen: dict[int, list[int]] = {}  # slices of the same weight share one emulation's rows
    for i in range(len(wb)):
        seen.setdefault(i % int(np.prod(w.shape[:-2])), []).append(i)
    return [(np.concatenate([xb[i] for i in idx]), wb[idx[0]]) for idx in seen.values()]


def conv_bands(
    x_shape: tuple[int, ...],
    w_shape: tuple[int, ...],
    geo: Mapping[str, object],
    max_positions: int,
) -> list[tuple[tuple[slice, ...], dict[str, object]]]:
    """Where a 2-D Conv's output has more than ``max_positions`` positions per batch, a few
    evenly spaced bands of output rows, each as (the input crop it reads, its geometry): the
    emulation's cost then stays bounded on large images, and its energies (whose ratio decides
    the guard) are sampled evenly. Otherwise the whole input."""
    whole = [((slice(None),) * len(x_shape), dict(geo))]
    if len(x_shape) != 4:
        return whole
    (s, _), (d, _) = geo["strides"], geo["dilations"]  # type: ignore[misc]
    pads = list(geo["pads"])  # type: ignore[call-overload]
    h = x_shape[2]
    span = d * (w_shape[2] - 1) + 1
    out_h, out_w = _output_size(x_shape, w_shape, geo)
    per_row = x_shape[0] * max(out_w, 1)
    if out_h * per_row <= max_positions or out_h < 2 * BANDS:
        return whole
    rows = max(1, max_positions // (per_row * BANDS))
    starts = np.linspace(0, out_h - rows, BANDS).astype(np.int64)
    bands = []
    for r0 in sorted(set(int(v) for v in starts)):
        r1 = min(out_h, r0 + rows)
        first, last = r0 * s - pads[0], (r1 - 1) * s - pads[0] + span  # input rows [first, last)
        g = dict(geo)
        g["pads"] = (max(0, -first), pads[1], max(0, last - h), pads[3])
        crop = (slice(None), slice(None), slice(max(first, 0), min(last, h)), slice(None))
        bands.append((crop, g))
    return bands


def _batched_saturation(
    a: TensorPlan, x: np.ndarray, wq: np.ndarray, ws: np.ndarray, s_x: float, zp: int
) -> overflow.Saturation:
    out = overflow.Saturation()
    for rows, w in _slices(x, wq):
        if len(rows) > MAX_POSITIONS:
            rows = rows[np.linspace(0, len(rows) - 1, MAX_POSITIONS).astype(np.int64)]
        out.update(overflow.matmul_saturation(_act_codes(rows, a), zp, w, ws, s_x, signed=a.signed))
    return out


def decide_overflow(plan: QuantPlan, probe: SaturationPass) -> list[str]:
    """Resolve every ``auto`` layer of ``plan`` to guard or off from the emulation (in place) and
    mark the guarded layers' weights pair-safe. Returns the weights newly marked (their scales,
    and their layers' bias scales, must be assigned again)."""
    auto = [lp for lp in overflow_candidates(plan) if lp.overflow == "auto"]
    found = probe.measure(plan, auto) if auto else {}
    for lp in auto:
        sat = found[lp.name]
        lp.overflow = "guard" if overflow.needs_guard(sat) else "off"
        if sat.saturated:
            lp.overflow_note = (
                f"would saturate {100 * sat.fraction:.2g}% of outputs on x86 without VNNI "
                f"(error {sat.sqnr_db:.1f} dB below the signal; the guard's "
                f"{_db(sat.signal_energy, sat.guard_err_energy):.1f} dB)"
            )
    return apply_overflow_guard(probe.graph, plan)


def _may_saturate(g: Graph, plan: QuantPlan, lp: LayerPlan) -> bool:
    """Whether any activation code of the layer's input grid can saturate one of its weight
    pairs (overflow.channels_at_risk, without data). Batched MatMul weights: assumed so."""
    a, wt = plan.tensors[lp.act_inputs[0]], plan.tensors[lp.weight]  # type: ignore[index]
    wq, _ = _weight_codes(g.array(lp.weight), wt)  # type: ignore[arg-type]
    attrs = node_attrs(g.node_by_name[lp.name])
    conv = handler(lp.op_type).pair_sums is Kernel.CONV
    if not conv and wq.ndim != 2:
        return True
    if not conv and gemm_transposed(lp.op_type, attrs):
        wq = wq.T
    grid = qmath.grid(a.bits, a.signed, a.narrow)
    group = int(attrs.get("group", 1)) if conv else 1  # type: ignore[call-overload]
    risk = overflow.channels_at_risk(wq, lo=grid.qmin, hi=grid.qmax, group=group, signed=a.signed)
    return bool(risk.any())


def _db(signal: float, err: float) -> float:
    return 10 * np.log10(signal / err) if err > 0 and signal > 0 else float("inf")
