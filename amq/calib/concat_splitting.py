"""The concat split's pass on the float model, before calibration
(quant/algorithms/concat_split.py): one run over the first calibration samples that keeps each
candidate's parts (the tensors its Concat joins); where their ranges differ more than the Concat
guard's ratio, the layer's relative output error is measured on those samples three ways, with
the layer itself run by onnxruntime: its input float (what the guard does), on one grid, and
split (each part on the grid calibration's method fits to it, each part's weight on its own
per-channel scales). ``auto`` splits where that error is at most SPLIT_FACTOR times the
float input's; ``true`` splits every such layer. Then the edited model, checked equal to the
original in float. Calibration then observes the edited model. quantize lets its calibration
pass take the first look (RangeWatch): in most models no Concat needs more."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from amq import report
from amq.calib import runner
from amq.calib.data import Dataset, batches
from amq.calib.prepare import Prepared
from amq.calib.smoothing import Reference, graph_outputs, outputs_equal
from amq.config import Config, Granularity, SmoothMode
from amq.graph.model import Graph, infer_types, opset_version
from amq.quant import qmath
from amq.quant.algorithms import concat_split as cs
from amq.quant.algorithms.smoothquant import LayerGrid, fitted_grid
from amq.runtime import Exposed

SAMPLES = 16  # calibration samples the errors are measured on
PRECHECK = 4  # samples whose ranges say whether a Concat may need the split at all
# ... and go on only where their ratio is within this factor of the guard's (PP-OCR det's head
# Concat: 4.5x on 4 samples, 3.5x on 16)
PRECHECK_MARGIN = 2.0
GRID_VALUES = 1 << 21  # values of each part its grid is fitted on (a stride through them)


def candidates(prep: Prepared, cfg: Config, data: Dataset) -> list[cs.Candidate]:
    """The layers the concat split may take (none when it is off or there is no data)."""
    if cfg.algorithms.concat_split == SmoothMode.OFF or not len(data):
        return []
    g = prep.graph
    return [c for c in cs.find_candidates(g) if not cfg.settings_for(c.layer, c.op_type).skip]


def split_concats(
    prep: Prepared, cfg: Config, data: Dataset, show_progress: bool = False
) -> tuple[Prepared, list[cs.Decision]]:
    """The model with the layers ``cfg.algorithms.concat_split`` asks for split, and a decision
    for every layer whose Concat inputs' ranges differ more than the guard's ratio."""
    cands = candidates(prep, cfg, data)
    if not cands:
        return prep, []
    ratio_min = cfg.guards.concat_range_ratio
    # a look at the first few samples first: most Concats join like ranges, and a float pass
    # over all SAMPLES cost PP-OCR det 1.0 s of its 10 s for nothing
    values, ref = _part_values(prep, cands, data.head(min(PRECHECK, len(data))), show_progress)
    cands = [c for c in cands if _ratio(values, c) > ratio_min / PRECHECK_MARGIN]
    if not cands:
        return prep, []
    if len(data) > PRECHECK:
        values, ref = _part_values(prep, cands, data.head(min(SAMPLES, len(data))), show_progress)
    decisions = []
    for c in cands:
        ratio = _ratio(values, c)
        if ratio > ratio_min:
            decisions.append(_measure(prep, c, [values[t] for t in c.parts], ratio, cfg))
    chosen = [d for d in decisions if d.split]
    if not chosen:
        notes = [f"concat split: {d.describe()}" for d in decisions]
        return Prepared(prep.model, prep.source, prep.notes + notes), decisions
    model = cs.apply(prep.model, chosen)
    if not outputs_equal(prep, model, data, "concat split", ref):
        note = "concat split changed the float outputs; left the model as it was"
        return Prepared(prep.model, prep.source, prep.notes + [note]), []
    notes = [f"concat split: {d.describe()}" for d in decisions]
    return Prepared(infer_types(model), prep.source, prep.notes + notes), decisions


class RangeWatch:
    """The look split_concats takes first, taken by the calibration pass instead
    (runner.collect_stats' ``watch``): each candidate part's range, 0 included, over the first
    PRECHECK and the first SAMPLES samples. Where no candidate's parts differ enough for the
    split's measure (``settle``), the model runs no pass of the split's own."""

    def __init__(self, cands: list[cs.Candidate], samples: int, ratio_min: float) -> None:
        self.cands = cands
        self.parts = sorted({t for c in cands for t in c.parts})
        self.want = min(SAMPLES, samples)
        self.ranges = {n: {t: (0.0, 0.0) for t in self.parts} for n in (PRECHECK, SAMPLES)}
        self.ratio_min = ratio_min
        self.seen = 0
        self.usable = True

    def asked(self) -> list[str]:
        return self.parts if self.usable and self.seen < self.want else []

    def _passing(self) -> list[cs.Candidate]:
        """The candidates split_concats' first look (PRECHECK samples) lets through."""
        cut = self.ratio_min / PRECHECK_MARGIN
        return [c for c in self.cands if self.ratio(c, PRECHECK) > cut]

    def _prechecked(self) -> None:
        """After the first PRECHECK samples: only the candidates that passed are read on (most
        models: none, and the pass fetches no part again)."""
        self.cands = self._passing()
        self.parts = sorted({t for c in self.cands for t in c.parts})

    def take(self, b: runner.Batch) -> None:
        if not self.usable or self.seen >= self.want:
            return
        for t in self.parts:
            v = b.values[t] if t in b.values else b.feeds.get(t)
            if v is None or np.ndim(v) < 1 or np.shape(v)[0] != b.n:
                self.usable = False  # not one row a sample: split_concats' own look
                return
            for limit, got in self.ranges.items():
                k = min(b.n, limit - self.seen)
                if k > 0:
                    lo, hi = got[t]
                    x = np.asarray(v[:k])
                    got[t] = (
                        min(lo, float(x.min(initial=0.0))),
                        max(hi, float(x.max(initial=0.0))),
                    )
        if self.seen < PRECHECK <= self.seen + b.n:
            self._prechecked()
        self.seen += b.n

    def ratio(self, c: cs.Candidate, limit: int) -> float:
        return cs.range_ratio([hi - lo for lo, hi in (self.ranges[limit][t] for t in c.parts)])

    def settled(self) -> bool:
        """Whether this look settles split_concats (no candidate whose parts differ enough for
        the split's measure: nothing to split, as split_concats would find); False where it
        does not (split_concats runs then, passes and all)."""
        if not self.usable or (self.seen < self.want and self.cands):
            return False
        full = SAMPLES if self.want > PRECHECK else PRECHECK
        return all(self.ratio(c, full) <= self.ratio_min for c in self._passing())


def _part_values(
    prep: Prepared, cands: list[cs.Candidate], sub: Dataset, show_progress: bool
) -> tuple[dict[str, list[np.ndarray]], Reference | None]:
    """Each candidate part's values, one array per batch (shapes may differ between batches),
    and the graph outputs of the first batch (the reference of the split's float check)."""
    tensors = sorted({t for c in cands for t in c.parts})
    outputs = graph_outputs(prep.model)
    sess = runner.session(Exposed(prep.model, tensors), source=prep.source)
    out: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    ref = None
    names = tensors + [o for o in outputs if o not in tensors]
    with report.progress(len(sub), "concat split", show_progress) as advance:
        for b in runner.run_batches(sess, names, batches(sub, prep.specs, 8)):
            for t in tensors:
                out[t].append(np.asarray(b.values[t], np.float32))
            if ref is None:
                ref = Reference.of(b, outputs)
            advance(b.n)
    return out, ref


def _ratio(values: dict[str, list[np.ndarray]], c: cs.Candidate) -> float:
    """The Concat guard's measure: the widest part's range (0 included) over the narrowest."""
    widths = []
    for t in c.parts:
        lo = min(float(b.min(initial=0.0)) for b in values[t])
        hi = max(float(b.max(initial=0.0)) for b in values[t])
        widths.append(hi - lo)
    return cs.range_ratio(widths)


def _measure(
    prep: Prepared, c: cs.Candidate, parts: list[list[np.ndarray]], ratio: float, cfg: Config
) -> cs.Decision:
    g = prep.graph
    node = g.node_by_name[c.layer]
    ls = cfg.settings_for(c.layer, c.op_type)
    grid = LayerGrid.of(ls, cfg.calibration)
    x_axis = 1 if c.op_type == "Conv" else -1
    widths = tuple(int(p[0].shape[x_axis]) for p in parts)
    w = g.array(c.weight)
    out_axis = None if ls.granularity == Granularity.PER_TENSOR else (0 if x_axis == 1 else 1)
    w_one = qmath.fake_quantize_weight(w, ls.weight_bits, out_axis)
    w_split = np.concatenate(
        [
            qmath.fake_quantize_weight(p, ls.weight_bits, out_axis)
            for p in cs.part_weights(w, widths, c.channel_axis)
        ],
        axis=c.channel_axis,
    )
    grids = [_grid(p, grid) for p in parts]
    one = _grid([np.concatenate([p[i] for p in parts], x_axis) for i in range(len(parts[0]))], grid)
    sess = runner.session(_layer_model(prep.model, g, node), source=f"{prep.source} ({c.layer})")
    bias = {"b": g.array(node.input[2])} if len(node.input) > 2 and node.input[2] else {}
    errs = np.zeros(3)
    power = 0.0
    for i in range(len(parts[0])):
        xs = [p[i] for p in parts]
        x = np.concatenate(xs, x_axis)
        ref = sess.run(None, {"x": x, "w": w, **bias})[0].astype(np.float64)
        split_x = np.concatenate([_fake(a, gr) for a, gr in zip(xs, grids, strict=True)], x_axis)
        for j, (xv, wv) in enumerate(((x, w_one), (_fake(x, one), w_one), (split_x, w_split))):
            y = sess.run(None, {"x": xv, "w": wv.astype(np.float32), **bias})[0]
            errs[j] += float(np.sum((y - ref) ** 2))
        power += float(np.sum(ref**2))
    e_float, e_one, e_split = (errs / power if power > 0 else errs).tolist()
    split = cfg.algorithms.concat_split == SmoothMode.ON or e_split <= cs.SPLIT_FACTOR * e_float
    return cs.Decision(c, widths, ratio, e_float, e_one, e_split, split)


def _grid(batches_: list[np.ndarray], grid: LayerGrid) -> tuple:
    """The grid calibration's method fits to these values (exact extremes, a strided sample)."""
    flat = np.concatenate([b.ravel() for b in batches_])
    lo, hi = float(flat.min(initial=0.0)), float(flat.max(initial=0.0))
    step = max(1, flat.size // GRID_VALUES)
    return fitted_grid(flat[::step], lo, hi, grid)


def _fake(x: np.ndarray, qp: tuple) -> np.ndarray:
    scale, zp, gr = qp
    return qmath.fake_quantize(x, scale, zp, gr)


def _layer_model(model: onnx.ModelProto, g: Graph, node: onnx.NodeProto) -> onnx.ModelProto:
    """The layer alone, its data, weight and bias all graph inputs (``x``, ``w``, ``b``)."""
    inputs = ["x", "w"] + (["b"] if len(node.input) > 2 and node.input[2] else [])
    n = onnx.NodeProto()
    n.CopyFrom(node)
    del n.input[:]
    n.input.extend(inputs)
    del n.output[:]
    n.output.append("y")
    f = onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        [n],
        "layer",
        [helper.make_tensor_value_info(t, f, None) for t in inputs],
        [helper.make_tensor_value_info("y", f, None)],
    )
    opset = [helper.make_opsetid("", opset_version(model))]
    return helper.make_model(graph, opset_imports=opset, ir_version=model.ir_version)
