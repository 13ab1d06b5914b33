"""The SmoothQuant pass on the float model, before calibration's final statistics: one streamed
pass over the calibration data for the per-channel extremes of every candidate MatMul/Gemm input
(one min and one max vector per tensor, constant memory) and a fixed-size sample of its rows;
then a per-group choice of alpha (amq/quant/algorithms/smoothquant.py), the edited model, and a
check that its float outputs equal the original's. Calibration then observes the smoothed model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from amq import report
from amq.calib import cache as stats_cache
from amq.calib import runner
from amq.calib.data import Dataset, batches
from amq.calib.prepare import Prepared
from amq.config import Config, SmoothMode
from amq.graph.model import Graph, infer_types
from amq.quant.algorithms import outlier_split as split
from amq.quant.algorithms import smoothquant as sq
from amq.quant.planner import TensorInfo
from amq.runtime import Exposed, off_heap, serialized

SAMPLE_ROWS = 512  # rows of each candidate input kept for choosing alpha
CHECK_SAMPLES = 8  # calibration samples the float outputs are compared on
WHOLE_SHARE = 8  # the watch keeps its tensors whole in up to 1/8 of the memory budget
WHOLE_BYTES = 32 << 20  # ... or in this many bytes without a budget (calib/replay.py)
FLOAT_TOLERANCE = 1e-3  # relative to the output's largest magnitude


@dataclass
class Half:
    """Per-channel min and max along the last axis of one tensor over a set of samples, and a
    strided sample of its rows (at most SAMPLE_ROWS)."""

    lo: np.ndarray | None = None
    hi: np.ndarray | None = None
    rows: list[np.ndarray] = field(default_factory=list)
    kept: int = 0

    def update(self, r: np.ndarray, per_batch: int) -> None:
        if r.size == 0:
            return
        lo, hi = r.min(axis=0), r.max(axis=0)
        self.lo = lo if self.lo is None else np.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else np.maximum(self.hi, hi)
        if self.kept < SAMPLE_ROWS:
            take = r[:: max(1, r.shape[0] // per_batch)][: SAMPLE_ROWS - self.kept]
            self.rows.append(take.copy())
            self.kept += take.shape[0]

    def sample(self) -> sq.Sample:
        assert self.lo is not None and self.hi is not None
        return sq.Sample(np.concatenate(self.rows), self.lo, self.hi)


@dataclass
class ChannelStats:
    """One tensor's statistics in two halves: the samples at even and at odd positions of the
    calibration stream (alpha is chosen with ranges fitted on one half, scored on the other)."""

    halves: tuple[Half, Half] = field(default_factory=lambda: (Half(), Half()))
    seen: int = 0

    def update(self, x: np.ndarray, per_batch: int) -> None:
        a = np.asarray(x, dtype=np.float32)
        k = a.shape[-1] if a.ndim else 1
        # axis 0 indexes samples (batches are stacked along it); a 1-D tensor is one sample
        a = a.reshape(a.shape[0] if a.ndim > 1 else 1, -1, k)
        first = self.seen % 2
        for h, part in zip(self.halves, (a[first::2], a[1 - first :: 2]), strict=True):
            h.update(part.reshape(-1, k), per_batch)
        self.seen += a.shape[0]

    @property
    def lo(self) -> np.ndarray:
        return np.minimum(*(h.lo for h in self.halves if h.lo is not None))

    @property
    def hi(self) -> np.ndarray:
        return np.maximum(*(h.hi for h in self.halves if h.hi is not None))


@dataclass
class Reference:
    """The original model's graph outputs on one call, kept by a pass that ran the model anyway
    (SmoothQuant's statistics, the concat split's look): the float check of the edit then builds
    a session of the edited model only."""

    feeds: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    samples: int

    @classmethod
    def of(cls, b: runner.Batch, outputs: list[str]) -> Reference:
        """The graph ``outputs`` of batch ``b`` (fetched with it)."""
        got = {o: b.values[o] if o in b.values else b.feeds[o] for o in outputs}
        return cls(dict(b.feeds), got, b.n)


def graph_outputs(model: onnx.ModelProto) -> list[str]:
    return [o.name for o in model.graph.output]


def channel_stats(
    prep: Prepared, data: Dataset, tensors: list[str], batch_size: int, show_progress: bool
) -> tuple[dict[str, ChannelStats], Reference | None]:
    """Per-channel extremes and row samples of ``tensors`` over the calibration data, and the
    graph outputs of the first batch."""
    outputs = graph_outputs(prep.model)
    names = tensors + [o for o in outputs if o not in tensors]
    sess = runner.session(Exposed(prep.model, tensors), source=prep.source)
    stats = {t: ChannelStats() for t in tensors}
    ref = None
    n_batches = max(1, -(-len(data) // batch_size))
    per_batch = max(1, SAMPLE_ROWS // n_batches)
    with report.progress(len(data), "smoothquant statistics", show_progress) as advance:
        for b in runner.run_batches(sess, names, batches(data, prep.specs, batch_size)):
            for t in tensors:
                stats[t].update(b.values[t], per_batch)
            if ref is None:
                ref = Reference.of(b, outputs)
            advance(b.n)
    return stats, ref


CACHE_KIND = "smooth"  # the statistics' cache files: smooth-<key>.npz


def save_stats(disk: tuple[Path, str] | None, stats: Mapping[str, ChannelStats]) -> None:
    """Keep SmoothQuant's statistics beside the calibration statistics of the model they were
    taken on (calib/cache.py), so that a run on the same model and data decides on the very
    same values without a pass of their own."""
    if disk is None:
        return
    arrays = {}
    for t, st in stats.items():
        for i, h in enumerate(st.halves):
            if h.lo is None or h.hi is None:
                return  # a half saw no sample: not worth keeping
            arrays.update({f"{t}/{i}/lo": h.lo, f"{t}/{i}/hi": h.hi})
            arrays[f"{t}/{i}/rows"] = np.concatenate(h.rows)
    stats_cache.save_arrays(disk[0], CACHE_KIND, f"{disk[1]}-{SAMPLE_ROWS}", arrays)


def load_stats(disk: tuple[Path, str] | None, tensors: list[str]) -> dict[str, ChannelStats]:
    """save_stats' statistics of ``tensors`` ({} unless all are there)."""
    got = stats_cache.load_arrays(disk[0], CACHE_KIND, f"{disk[1]}-{SAMPLE_ROWS}") if disk else {}
    try:
        return {
            t: ChannelStats(
                tuple(  # type: ignore[arg-type]
                    Half(got[f"{t}/{i}/lo"], got[f"{t}/{i}/hi"], [got[f"{t}/{i}/rows"]])
                    for i in (0, 1)
                )
            )
            for t in tensors
        }
    except KeyError:
        return {}


class Watch:
    """channel_stats' statistics, taken by a pass that runs the model over the calibration data
    anyway (the calibration pass: runner.collect_stats' ``watch``), so that a model SmoothQuant
    leaves as it is runs once less. The pass's calls (sized by the memory budget) are regrouped
    into batches of ``batch_size`` in the data's order, as channel_stats reads them: the row
    samples, and so the decisions, are those of a pass of their own. The graph outputs of the
    first calls (at least CHECK_SAMPLES samples) are kept for the float check. ``collected()``
    is None where the pass did not see every sample in order, or where a tensor's first axis
    does not hold the samples (regrouping would mix them): a pass of their own then runs."""

    def __init__(
        self,
        groups: list[sq.Group],
        outputs: list[str],
        samples: int,
        batch_size: int,
        budget_mb: int = 0,
    ) -> None:
        self.groups = groups
        self.tensors = list(dict.fromkeys(gr.tensor for gr in groups))
        self.outputs = outputs
        self.samples, self.batch_size = samples, max(1, batch_size)
        self.per_batch = max(1, SAMPLE_ROWS // max(1, -(-samples // self.batch_size)))
        self.stats = {t: ChannelStats() for t in self.tensors}
        self.refs: list[Reference] = []
        self._held: dict[str, list[np.ndarray]] = {t: [] for t in self.tensors}
        self._held_n = 0  # samples held, not yet a whole batch
        self.seen = 0
        self.usable = True
        self.cached: dict[str, ChannelStats] | None = None  # the cache's (load_stats), if found
        # the candidate tensors whole, per call (while they fit in whole_bytes): what an edit
        # adds is computed from them (calib/replay.py), not by a run of the whole model
        self.whole: dict[str, list[np.ndarray]] = {t: [] for t in self.tensors}
        self.calls: list[int] = []
        self._whole_bytes = 0
        self.whole_bytes = (budget_mb << 20) // WHOLE_SHARE if budget_mb > 0 else WHOLE_BYTES

    def _checked(self) -> int:
        return sum(r.samples for r in self.refs)

    def asked(self) -> list[str]:
        """The tensors the pass must fetch for this watch on its next call."""
        if not self.usable:
            return []
        more = self.outputs if self._checked() < CHECK_SAMPLES else []
        return list(dict.fromkeys(self.tensors + more))

    def take(self, b: runner.Batch) -> None:
        """Fold one call of the pass."""
        if not self.usable:
            return
        if self._checked() < CHECK_SAMPLES:
            self.refs.append(Reference.of(b, self.outputs))
        for t in self.tensors:
            v = np.asarray(b.values[t] if t in b.values else b.feeds[t])
            if v.ndim < 2 or v.shape[0] != b.n:
                self._give_up()
                return
            self._held[t].append(v)
        self._keep_whole([self._held[t][-1] for t in self.tensors], b.n)
        self._held_n += b.n
        self.seen += b.n
        while self._held_n >= self.batch_size:
            self._fold(self.batch_size)
        for t, parts in self._held.items():  # what waits for the next call: copies (a view
            self._held[t] = [np.array(p) for p in parts]  # would keep the call's whole array)

    def _keep_whole(self, values: list[np.ndarray], n: int) -> None:
        """Keep this call's values of every tensor (outside malloc's heap), while they fit."""
        if not self.whole:
            return
        self._whole_bytes += sum(v.nbytes for v in values)
        if self._whole_bytes > self.whole_bytes:
            self.whole.clear()
            return
        for t, v in zip(self.tensors, values, strict=True):
            a = off_heap(v.shape, v.dtype)
            a[...] = v
            self.whole[t].append(a)
        self.calls.append(n)

    def _fold(self, n: int) -> None:
        """Fold the first ``n`` held samples as one batch of channel_stats."""
        for t, parts in self._held.items():
            whole = parts[0] if len(parts) == 1 else np.concatenate(parts)
            self.stats[t].update(whole[:n], self.per_batch)
            self._held[t] = [whole[n:]] if whole.shape[0] > n else []
        self._held_n -= n

    def _give_up(self) -> None:
        self.usable = False
        self._held.clear()
        self.whole.clear()
        self.stats.clear()
        self.refs.clear()

    def collected(self) -> tuple[dict[str, ChannelStats], list[Reference]] | None:
        """The statistics and references, once the pass has seen all ``samples`` (the last,
        shorter batch folded here); None where it did not, or gave up."""
        if not self.usable or self.seen != self.samples:
            return None
        if self._held_n:
            self._fold(self._held_n)
        return self.stats, self.refs


def outputs_equal(
    prep: Prepared,
    model,
    data: Dataset,
    edit: str = "smoothed",
    reference: Reference | Sequence[Reference] | None = None,
) -> bool:
    """The edited float ``model`` (a ModelProto or its bytes) gives the original's outputs on
    the first calibration samples (within FLOAT_TOLERANCE of each output's largest magnitude).
    ``reference``: the original's outputs on calls already run (else it is run here)."""
    names = graph_outputs(prep.model)
    refs = [reference] if isinstance(reference, Reference) else list(reference or ())

    def outputs(m: onnx.ModelProto | bytes, source: str) -> list[dict[str, np.ndarray]]:
        # one session at a time: a transformer's two sessions at once were its peak
        # (all-mpnet-base-v2: 3.7 GB); each is built on a trimmed heap (runtime.session)
        sess = runner.session(m, source=source)
        return [b.values for b in runner.run_batches(sess, names, calls)]

    if refs:
        calls: list = [(r.feeds, [], r.samples) for r in refs]
        ref = [r.outputs for r in refs]
    else:
        sub = data.subset(min(CHECK_SAMPLES, len(data)), 0)
        calls = list(batches(sub, prep.specs, CHECK_SAMPLES))
        ref = outputs(prep.model, prep.source)
    got = outputs(model, f"{prep.source} ({edit})")
    for ra, rb in zip(ref, got, strict=True):
        for name in names:
            r, n = np.asarray(ra[name]), np.asarray(rb[name])
            if r.dtype.kind != "f":
                continue
            if r.shape != n.shape:
                return False
            if r.size and _largest(r - n) > FLOAT_TOLERANCE * (1.0 + _largest(r)):
                return False
    return True


def _largest(a: np.ndarray) -> float:
    """max |a| of a non-empty array, without a temporary of |a|."""
    return max(float(a.max()), -float(a.min()))


def candidates(prep: Prepared, cfg: Config, data: Dataset) -> list[sq.Group]:
    """The MatMul/Gemm groups SmoothQuant or the outlier split may edit: none when both are off,
    with fewer than two calibration samples (one half scores the other's ranges), or in a model
    with no candidate (CNNs)."""
    modes = (cfg.smoothquant.enabled, cfg.outlier_split.enabled)
    if modes == (SmoothMode.OFF, SmoothMode.OFF) or len(data) < 2:
        return []
    return sq.find_groups(prep.graph, cfg)


def smooth(
    prep: Prepared, cfg: Config, data: Dataset, show_progress: bool = False
) -> tuple[Prepared, list]:
    """The model with SmoothQuant or the outlier split applied where ``cfg`` asks, and every
    group's decision (sq.Choice or split.Split; empty when both are off or when the model has
    no candidate: CNNs), on statistics of a pass of their own."""
    groups = candidates(prep, cfg, data)
    if not groups:
        return prep, []
    tensors = list(dict.fromkeys(gr.tensor for gr in groups))
    stats, ref = channel_stats(prep, data, tensors, cfg.calibration.batch_size, show_progress)
    return settle(prep, cfg, data, groups, (stats, [ref] if ref is not None else []))


def settle(
    prep: Prepared,
    cfg: Config,
    data: Dataset,
    groups: list[sq.Group],
    collected: tuple[Mapping[str, ChannelStats], Sequence[Reference]],
) -> tuple[Prepared, list]:
    """smooth() on the statistics ``collected`` (per tensor, and the original model's graph
    outputs on calls already run for the float check: none, and the check runs it)."""
    stats, refs = collected
    g = prep.graph
    decisions = []
    for gr in groups:
        st = stats[gr.tensor]
        if any(h.lo is None for h in st.halves):
            continue
        decisions.append(_decide(g, gr, st, cfg))
    chosen = [d for d in decisions if isinstance(d, split.Split) or d.alpha is not None]
    if not chosen:
        return prep, decisions
    model = sq.apply_smoothing(prep.model, [d for d in chosen if isinstance(d, sq.Choice)])
    model = split.apply_splits(  # in place: apply_smoothing's model is a copy already
        model, [d for d in chosen if isinstance(d, split.Split)], copy=False
    )
    edited = serialized(model)
    if edited is not None:  # checked and kept as bytes: one copy of the weights less while the
        del model  # check's sessions are built (all-mpnet-base-v2: its peak)
    if not outputs_equal(prep, model if edited is None else edited, data, reference=refs):
        note = "SmoothQuant/outlier split changed the float outputs; left the model as it was"
        return Prepared(prep.model, prep.source, prep.notes + [note]), []
    if edited is not None:
        model = onnx.ModelProto.FromString(edited)
        del edited
    out = Prepared(infer_types(model), prep.source, prep.notes + [_count(decisions)])
    del model
    runner.release_free_memory()  # the edit's copies are gone: their heap goes back
    return out, decisions


def _decide(g, gr: sq.Group, st: ChannelStats, cfg: Config) -> sq.Choice | split.Split:
    """One group's decision: split where that at least halves the unchanged error, else
    SmoothQuant at its best alpha where that does, else unchanged (errors on one model: ranges
    fitted on half the calibration samples, scored on the other half). A pass set to true wins
    over one on auto; the split over SmoothQuant when both are true."""
    first = g.node_by_name[gr.members[0].node]
    grid = sq.LayerGrid.of(cfg.settings_for(first.name, first.op_type), cfg.calibration)
    full = [sq._kn(g.array(m.weight), m.transposed) for m in gr.members]
    w_absmax, weights = sq.weights_absmax(full), sq.scored_columns(full)
    del full
    halves = (st.halves[0].sample(), st.halves[1].sample())
    refs = (sq.float_outputs(halves[0], weights), sq.float_outputs(halves[1], weights))
    known = refs, sq.cross_error(halves, weights, None, grid, refs)
    mode = cfg.outlier_split.enabled
    if any(cfg.settings_for(m.node, "MatMul").act_dynamic for m in gr.members):
        mode = SmoothMode.OFF  # quantized from each batch's own range, outlier channels included
    found = None
    if mode != SmoothMode.OFF and split.eligible(g, gr):
        found = split.best_split(halves, weights, grid, refs)
    if found is not None:
        err, index = found
        # the split wins wherever it halves the unchanged error, even where SmoothQuant's error
        # is lower still: SmoothQuant's weight rows scaled by the outlier channels cost more in
        # the whole model than in one layer (measured, SmoothQuant off against auto with the
        # split: paraphrase-MiniLM-L3-v2 29.2 vs 26.7 dB, all-mpnet-base-v2 20.7 vs 20.2 dB);
        # so SmoothQuant's alpha is searched only for the groups the split does not take
        wins = err < (1.0 - sq.MIN_GAIN) * known[1]
        sq_forced = cfg.smoothquant.enabled == SmoothMode.ON  # asked for by name: it stays
        if mode == SmoothMode.ON or (wins and not sq_forced):
            return split.Split(gr, tuple(int(i) for i in index), len(halves[0].lo), known[1], err)
    sq_cfg = cfg.smoothquant
    if sq_cfg.enabled == SmoothMode.OFF:  # scored, never applied
        sq_cfg = replace(sq_cfg, enabled=SmoothMode.AUTO)
    choice = sq.choose(gr, halves, weights, (sq_cfg, grid), known, w_absmax)
    if cfg.smoothquant.enabled == SmoothMode.OFF:
        choice = replace(choice, alpha=None, scales=None)
    return choice


def _count(decisions: list) -> str:
    n_sq = sum(isinstance(d, sq.Choice) and d.alpha is not None for d in decisions)
    n_split = sum(isinstance(d, split.Split) for d in decisions)
    return (
        f"SmoothQuant: {n_sq} of {len(decisions)} MatMul/Gemm group(s) smoothed; "
        f"outlier split: {n_split}"
    )


PROVENANCE_KEY = "amq.float_provenance"  # model metadata: how edited tensors relate to the float


def provenance(model: onnx.ModelProto, decisions: list) -> dict:
    """For ``amq compare``: in the edited float ``model`` (before Q/DQ), the tensors and
    initializers SmoothQuant rescaled per channel (``rescaled``: their same-named float
    counterparts differ); for outlier splits, the float weight and rows each outlier weight
    holds (``rows``), the rows zeroed in the split layers' own weights (``zeroed``) and the
    channels of each split tensor its grid leaves to the outlier part (``masked``)."""
    g = Graph(model)
    rescaled: set[str] = set()
    rows: dict[str, list] = {}
    zeroed: dict[str, list[int]] = {}
    masked: dict[str, list[int]] = {}
    for d in decisions:
        if isinstance(d, split.Split):
            masked[d.group.tensor] = list(d.index)
            for m in d.group.members:
                zeroed[m.weight] = list(d.index)
                node = g.node_by_name.get(f"{m.node}_outliers")
                if node is not None:
                    rows[node.input[1]] = [m.weight, list(d.index)]
        elif d.alpha is not None:
            rescaled.update(m.weight for m in d.group.members)
            if d.group.fold:
                rescaled.update(_fold_chain(g, d.group.tensor))
    return {"rescaled": sorted(rescaled), "rows": rows, "zeroed": zeroed, "masked": masked}


def changed_tensors(before: Graph, after: Graph, decisions: list) -> set[str]:
    """The tensors of the edited model ``after`` whose values differ from the same-named ones of
    ``before`` (SmoothQuant's rescaled fold chains) or that ``before`` does not have (inserted
    Divs, the outlier parts); every other tensor holds what it held (a smoothed or split layer
    writes its original output)."""
    rescaled = set(provenance(after.model, decisions)["rescaled"])
    known = set(before.producer) | {i.name for i in before.inputs}
    return {t for t in after.producer if t not in known} | {
        t for t in rescaled if t not in after.initializers
    }


def edited_info(
    info: Mapping[str, TensorInfo], after: Graph, new: set[str]
) -> dict[str, TensorInfo] | None:
    """The probe's shapes and dtypes for the edited model ``after``, without running it: a
    smoothed tensor has its input's (the inserted Div), the outlier channels gathered the
    tensor's with its last axis cut to them, and the two parts of a split layer its original
    output's (the Add that writes it); None where a ``new`` tensor is not one of these."""
    out = dict(info)
    for n in after.nodes:
        t = n.output[0] if n.output else ""
        if t not in new:
            continue
        src = out.get(n.input[0]) if n.input else None
        if n.op_type == "Div":
            got = src
        elif n.op_type == "Gather" and src is not None and after.is_constant(n.input[1]):
            got = TensorInfo((*src.shape[:-1], after.array(n.input[1]).size), src.dtype)
        else:
            add = [c for c in after.consumers.get(t, []) if c.op_type == "Add"]
            got = out.get(add[0].output[0]) if len(add) == 1 else None
        if got is None:
            return None
        out[t] = got
    return out if new <= set(out) else None


def _fold_chain(g: Graph, tensor: str) -> set[str]:
    """The tensors and initializers 1/s reached when folded into ``tensor``'s producer."""
    out = {tensor}
    p = g.producer.get(tensor)
    while p is not None and p.op_type in sq.POSITIVE_HOMOGENEOUS:
        out.add(p.input[0])
        p = g.producer.get(p.input[0])
    if p is None:
        return out
    out.update(i for i in p.input if g.is_constant(i))
    if p.op_type == "Add":  # a bias after a MatMul/Gemm: its output and weights too
        y = next((i for i in p.input if not g.is_constant(i)), None)
        q = g.producer.get(y) if y else None
        if q is not None:
            out.add(y)
            out.update(i for i in q.input[1:] if g.is_constant(i))
    return out
