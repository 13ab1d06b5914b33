"""Cross-layer equalization's pass on the float model, before calibration
(quant/algorithms/equalization.py): the scales from the weights alone, then, for high-bias
absorption, one pass over the first calibration samples for the per-channel extremes of each
pair's pre-activation (two vectors per tensor, reduced inside onnxruntime), the edited model, and
a check that its float outputs equal the original's. Calibration then observes the edited model."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from amq import report
from amq.calib import runner
from amq.calib.data import Dataset, batches
from amq.calib.prepare import Prepared, copy_model
from amq.calib.smoothing import outputs_equal
from amq.config import Config, Granularity, SmoothMode
from amq.graph import edit
from amq.graph.model import Graph, infer_types, opset_version
from amq.graph.patterns import set_initializer
from amq.quant.algorithms import equalization as cle

SAMPLES = 64  # calibration samples whose pre-activation extremes set the absorbed biases


@dataclass
class Equalization:
    """What the pass did: the pairs it equalized, the bias amounts it absorbed per pair, and the
    tensors and initializers whose values now differ from the float model's of the same name."""

    pairs: list[cle.Pair] = field(default_factory=list)
    absorbed: dict[cle.Pair, np.ndarray] = field(default_factory=dict)
    rescaled: list[str] = field(default_factory=list)


def chosen_pairs(g: Graph, cfg: Config) -> list[cle.Pair]:
    """The pairs ``cfg.algorithms.equalization`` asks for: every pair on true; on auto, the pairs
    with a layer whose weights are on one per-tensor grid (where equalizing the channels' ranges
    is what the grid needs; per-channel grids already fit each output channel)."""
    mode = cfg.algorithms.equalization
    if mode == SmoothMode.OFF:
        return []
    pairs = cle.find_pairs(g)
    if mode == SmoothMode.ON:
        return pairs

    def per_tensor(name: str) -> bool:
        s = cfg.settings_for(name, "Conv")
        return not s.skip and s.granularity == Granularity.PER_TENSOR

    return [p for p in pairs if per_tensor(p.first) or per_tensor(p.second)]


def extremes(
    model: onnx.ModelProto,
    source: str,
    tensors: dict[str, int],
    data: Dataset,
    batch_size: int,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per channel (axis 1) min and max of each of ``tensors`` (name -> rank) over ``data``:
    ReduceMin/ReduceMax nodes over every other axis, so only two vectors per tensor leave
    onnxruntime."""
    m = copy_model(model)
    g = m.graph
    opset = opset_version(m)
    names: dict[str, tuple[str, str]] = {}
    del g.output[:]
    for t, rank in tensors.items():
        axes = [0, *range(2, rank)]
        lo, hi = f"{t}/amq_cle_min", f"{t}/amq_cle_max"
        g.node.extend(edit.reduce_node(g, "ReduceMin", t, lo, axes, opset))
        g.node.extend(edit.reduce_node(g, "ReduceMax", t, hi, axes, opset))
        g.output.extend(onnx.ValueInfoProto(name=n) for n in (lo, hi))
        names[t] = (lo, hi)
    sess = runner.session(m, source=f"{source} (equalization statistics)")
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    flat = [n for pair in names.values() for n in pair]
    specs = Prepared(model, source).specs
    for b in runner.run_batches(sess, flat, batches(data, specs, batch_size)):
        for t, (lo, hi) in names.items():
            a = np.asarray(b.values[lo], np.float64)
            z = np.asarray(b.values[hi], np.float64)
            if t in out:
                a, z = np.minimum(out[t][0], a), np.maximum(out[t][1], z)
            out[t] = (a, z)
    return out


def _write(model: onnx.ModelProto, g: Graph, arrays: dict[str, np.ndarray]) -> None:
    """The new values as float32 initializers; a new bias becomes the Conv's third input."""
    for name, value in arrays.items():
        set_initializer(model, name, value.astype(np.float32))
    for n in model.graph.node:
        if n.op_type == "Conv" and len(n.input) < 3 and cle.bias_name(n) in arrays:
            n.input.append(cle.bias_name(n))


def equalize(
    prep: Prepared, cfg: Config, data: Dataset, show_progress: bool = False
) -> tuple[Prepared, Equalization]:
    """The model with cross-layer equalization and high-bias absorption where ``cfg`` asks, and
    what changed (nothing when the pass is off or finds no pair)."""
    g = prep.graph
    pairs = chosen_pairs(g, cfg)
    if not pairs:
        return prep, Equalization()
    arrays = cle.equalize(g, pairs)
    model = copy_model(prep.model)
    _write(model, g, arrays)
    done = Equalization(pairs)
    absorb = [p for p in pairs if cle.absorbable(g, p)]
    if absorb and len(data):
        sub = data.head(min(SAMPLES, len(data)))
        with report.progress(len(sub), "equalization statistics", show_progress) as advance:
            ranks = {p.tensor: g.array(g.node_by_name[p.first].input[1]).ndim for p in absorb}
            ext = extremes(model, prep.source, ranks, sub, 8)  # a Conv's output: its weight's rank
            advance(len(sub))
        biases: set[str] = set()
        for p in absorb:
            act = g.node_by_name[p.act].op_type if p.act else None
            c = cle.absorbed_amount(act, *ext[p.tensor])
            if np.any(c != 0):
                biases.update(cle.absorb(g, arrays, p, c))
                done.absorbed[p] = c
        _write(model, g, {b: arrays[b] for b in biases})  # the weights are written already
    done.rescaled = sorted(set(arrays) | {t for p in pairs for t in (p.tensor, p.read)})
    if not outputs_equal(prep, model, data, "equalized"):
        note = "cross-layer equalization changed the float outputs; left the model as it was"
        return Prepared(prep.model, prep.source, prep.notes + [note]), Equalization()
    return Prepared(infer_types(model), prep.source, prep.notes + [_note(g, done, arrays)]), done


def _note(g: Graph, done: Equalization, arrays: dict[str, np.ndarray]) -> str:
    """'cross-layer equalization: 12 Conv pair(s) equalized (output-channel weight range spread
    31x -> 4.2x, median over first layers); high-bias absorption in 5 pair(s)'."""
    before, after = [], []
    for p in done.pairs:
        name = g.node_by_name[p.first].input[1]
        before.append(_spread(cle.out_ranges(g.array(name).astype(np.float64))))
        after.append(_spread(cle.out_ranges(arrays[name])))
    text = (
        f"cross-layer equalization: {len(done.pairs)} Conv pair(s) equalized (output-channel "
        f"weight range spread {np.median(before):.3g}x -> {np.median(after):.3g}x, median over "
        "first layers)"
    )
    if done.absorbed:
        text += f"; high-bias absorption in {len(done.absorbed)} pair(s)"
    return text


def _spread(r: np.ndarray) -> float:
    r = r[r > 0]
    return float(r.max() / r.min()) if r.size else 1.0
