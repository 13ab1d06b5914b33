"""Cross-layer equalization's pass on the float model, before calibration
(quant/algorithms/equalization.py): the scales from the weights alone, then one pass over the
first calibration samples for the per-channel extremes (two vectors per tensor, reduced inside
onnxruntime) of each absorbing pair's pre-activation and of each depthwise input whose channels
are equalized, the edited model, and a check that its float outputs equal the original's.
Calibration then observes the edited model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from amq import report
from amq.calib import runner
from amq.calib.data import Dataset, batches
from amq.calib.prepare import Prepared, copy_model
from amq.calib.smoothing import CHECK_SAMPLES, Reference, outputs_equal
from amq.config import Config, Granularity, SmoothMode
from amq.graph import edit
from amq.graph.model import Graph, infer_types, opset_version
from amq.graph.patterns import set_initializer
from amq.graph.subgraphs import keep_needed
from amq.quant.algorithms import equalization as cle

SAMPLES = 64  # calibration samples whose pre-activation extremes set the absorbed biases


@dataclass
class Equalization:
    """What the pass did: the pairs it equalized, the bias amounts it absorbed per pair, and the
    tensors and initializers whose values now differ from the float model's of the same name."""

    pairs: list[cle.Pair] = field(default_factory=list)
    absorbed: dict[cle.Pair, np.ndarray] = field(default_factory=dict)
    rescaled: list[str] = field(default_factory=list)
    # pairs whose tensor's channel ranges were equalized -> max/min of channel max |x| before
    activations: dict[cle.Pair, float] = field(default_factory=dict)


def chosen_pairs(g: Graph, cfg: Config) -> tuple[list[cle.Pair], list[cle.Pair]]:
    """The pairs ``cfg.algorithms.equalization`` asks for, as (weight pairs, activation pairs).
    Activation pairs, on auto and true: both layers quantized on per-channel weight grids and the
    second depthwise (the rescaling costs the weights nothing and gives the tensor between them
    one range per channel). Weight pairs: the others on true; on auto, those with a layer whose
    weights are on one per-tensor grid (where equalizing the channels' weight ranges is what the
    grid needs; per-channel grids already fit each output channel)."""
    mode = cfg.algorithms.equalization
    if mode == SmoothMode.OFF:
        return [], []
    pairs = cle.find_pairs(g)

    def grid(name: str) -> Granularity | None:
        s = cfg.settings_for(name, "Conv")
        return None if s.skip else s.granularity

    per_channel = Granularity.PER_CHANNEL
    act = [
        p for p in pairs if grid(p.first) == grid(p.second) == per_channel and cle.depthwise(g, p)
    ]
    rest = [p for p in pairs if p not in act]
    if mode == SmoothMode.AUTO:
        per_tensor = Granularity.PER_TENSOR
        rest = [p for p in rest if per_tensor in (grid(p.first), grid(p.second))]
    return rest, act


def extremes(
    model: onnx.ModelProto,
    source: str,
    tensors: dict[str, int],
    data: Dataset,
    batch_size: int,
    keep: Sequence[str] = (),
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], Reference | None]:
    """Per channel (axis 1) min and max of each of ``tensors`` (name -> rank) over ``data``:
    ReduceMin/ReduceMax nodes over every other axis, so only two vectors per tensor leave
    onnxruntime, in a model cut after the last node they need. ``keep``: tensors whose values
    on the first batch come back too, as a Reference (None without ``keep``)."""
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
    g.output.extend(onnx.ValueInfoProto(name=t) for t in keep)
    keep_needed(g)
    sess = runner.session(m, source=f"{source} (equalization statistics)")
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    flat = [n for pair in names.values() for n in pair]
    specs = Prepared(model, source).specs
    ref: Reference | None = None

    def asked() -> list[str]:
        return flat + list(keep) if keep and ref is None else flat

    for b in runner.run_batches(sess, asked, batches(data, specs, batch_size)):
        if keep and ref is None:
            ref = Reference.of(b, list(keep))
        for t, (lo, hi) in names.items():
            a = np.asarray(b.values[lo], np.float64)
            z = np.asarray(b.values[hi], np.float64)
            if t in out:
                a, z = np.minimum(out[t][0], a), np.maximum(out[t][1], z)
            out[t] = (a, z)
    return out, ref


def _ends(g: Graph, pairs: list[cle.Pair]) -> list[str]:
    """The outputs of the pairs' second layers that are no pair's first (a chain's last)."""
    firsts = {p.first for p in pairs}
    return sorted({g.node_by_name[p.second].output[0] for p in pairs if p.second not in firsts})


def _cut(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs are ``outputs``, with only the nodes they need."""
    m = copy_model(model)
    del m.graph.output[:]
    m.graph.output.extend(onnx.ValueInfoProto(name=o) for o in outputs)
    keep_needed(m.graph)
    return m


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
    pairs, act_pairs = chosen_pairs(g, cfg)
    if not pairs and not act_pairs:
        return prep, Equalization()
    arrays = cle.equalize(g, pairs)
    model = copy_model(prep.model)
    _write(model, g, arrays)
    done = Equalization(pairs)
    absorb = [p for p in pairs if cle.absorbable(g, p)]
    written = dict(arrays)
    ref = None
    if (absorb or act_pairs) and len(data):
        sub = data.head(min(SAMPLES, len(data)))
        with report.progress(len(sub), "equalization statistics", show_progress) as advance:
            # a Conv's output (and its activation's): its weight's rank
            ranks = {
                t: g.array(g.node_by_name[p.first].input[1]).ndim
                for p in absorb + act_pairs
                for t in (p.tensor, p.read)
            }
            # with no weight pair, the statistics run the model as it was: the outputs the
            # float check compares come back with its first batch
            keep = [] if pairs else _ends(g, act_pairs)
            ext, ref = extremes(model, prep.source, ranks, sub, CHECK_SAMPLES, keep)
            advance(len(sub))
        for p in absorb:
            act = g.node_by_name[p.act].op_type if p.act else None
            c = cle.absorbed_amount(act, *ext[p.tensor])
            if np.any(c != 0):
                cle.absorb(g, arrays, p, c)
                done.absorbed[p] = c
        for p in act_pairs:
            lo, hi = ext[p.read]
            s = cle.activation_scales(lo, hi)
            if np.any(s != 1):
                cle.rescale(g, arrays, p, s)
                done.activations[p] = _spread(np.maximum(np.abs(lo), np.abs(hi)))
        # what absorption and rescaling set anew (they replace arrays, never edit them)
        _write(model, g, {k: v for k, v in arrays.items() if written.get(k) is not v})
    if not pairs and not done.activations:
        return prep, Equalization()  # every depthwise input's channels share one range already
    touched = pairs + list(done.activations)
    done.rescaled = sorted(set(arrays) | {t for p in touched for t in (p.tensor, p.read)})
    # every value that changed feeds a pair's second layer and nothing else: equal outputs of
    # the second layers that are no pair's first (those of a chain's last) are equal outputs of
    # the model, and the models cut there run only up to them
    ends = _ends(g, touched)
    # else (a chain cut short, a first batch smaller than the check's) the check runs the model
    # as it was itself
    n_check = min(CHECK_SAMPLES, len(data))
    usable = ref is not None and set(ends) <= set(ref.outputs) and ref.samples >= n_check
    cut = Prepared(_cut(prep.model, ends), prep.source)
    if not outputs_equal(cut, _cut(model, ends), data, "equalized", ref if usable else None):
        note = "cross-layer equalization changed the float outputs; left the model as it was"
        return Prepared(prep.model, prep.source, prep.notes + [note]), Equalization()
    return Prepared(infer_types(model), prep.source, prep.notes + [_note(g, done, arrays)]), done


def _note(g: Graph, done: Equalization, arrays: dict[str, np.ndarray]) -> str:
    """'cross-layer equalization: 12 Conv pair(s) equalized (output-channel weight range spread
    31x -> 4.2x, median over first layers); high-bias absorption in 5 pair(s); the input
    channels of 3 depthwise Conv(s) brought to one range (max |x| spread 12.3x, median)'."""
    parts = []
    if done.pairs:
        before, after = [], []
        for p in done.pairs:
            name = g.node_by_name[p.first].input[1]
            before.append(_spread(cle.out_ranges(g.array(name).astype(np.float64))))
            after.append(_spread(cle.out_ranges(arrays[name])))
        parts.append(
            f"{len(done.pairs)} Conv pair(s) equalized (output-channel weight range spread "
            f"{np.median(before):.3g}x -> {np.median(after):.3g}x, median over first layers)"
        )
    if done.absorbed:
        parts.append(f"high-bias absorption in {len(done.absorbed)} pair(s)")
    if done.activations:
        spread = float(np.median(list(done.activations.values())))
        parts.append(
            f"the input channels of {len(done.activations)} depthwise Conv(s) brought to one "
            f"range (max |x| spread {spread:.3g}x, median)"
        )
    return "cross-layer equalization: " + "; ".join(parts)


def _spread(r: np.ndarray) -> float:
    r = r[r > 0]
    return float(r.max() / r.min()) if r.size else 1.0
