"""One model, one calibration set: statistics collected once (and cached), then any config becomes a
QuantPlan with every scale, a QDQ model or a session, without running the model again (DESIGN.md §1)."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

from amq import runtime
from amq.calib import cache as stats_cache
from amq.calib import range_choice, runner, smoothing
from amq.calib.bodies import Branch, branch_notes, branch_opset, branch_workspaces
from amq.calib.data import Dataset
from amq.calib.float_edits import FloatEdits
from amq.calib.kept import KeptTensors
from amq.calib.memory import (
    SUMMARY_SAMPLES,
    BatchChoice,
    Measured,
    choose_batch,
)
from amq.calib.prepare import Prepared, first_feeds, upgrade_checked
from amq.calib.refining import PlanPasses
from amq.calib.saturation import (
    SaturationPass,
    decide_overflow,
    kept_inputs,
)
from amq.calib.statistics import calibrate, stats_key
from amq.config import Config, SmoothMode
from amq.errors import ModelError
from amq.graph import subgraphs
from amq.graph.model import (
    Graph,
    drop_unused_initializers,
    opset_version,
)
from amq.plan import QuantPlan
from amq.quant import observers
from amq.quant.activations import calibrated_roots, channel_axis
from amq.quant.algorithms import (
    bias_correction,
    outlier_split,
    smoothquant,
)
from amq.quant.observers import TensorStats
from amq.quant.planner import (
    check_config_names,
    plan_structure,
)
from amq.quant.qdq import emit_qdq, opset_for_bits, required_opset
from amq.quant.qparams import assign_qparams, assign_weight_qparams, guard_decisions
from amq.quant.registry import fixed_clamp, handler
from amq.runtime import Execution


class Workspace(FloatEdits):
    """One model, one calibration set, one config: statistics are collected once (and cached),
    then any variant of the config becomes a QuantPlan with every scale, without running the
    model again for tensors already observed (DESIGN.md §1)."""

    def __init__(
        self,
        prep: Prepared,
        cfg: Config,
        data: Dataset,
        cache_dir: Path | None,
        show_progress: bool = True,
        smooth_model: bool = True,
        defer_smoothing: bool = False,
    ) -> None:
        self._init_edits()
        self._spare: tuple[Config, Graph, QuantPlan] | None = None  # see ensure_opset_for
        if smooth_model:
            prep = self._edit_float(prep, cfg, data, show_progress, defer_smoothing)
        self.masked = outlier_split.masked(self.smoothing)
        self.cfg = cfg
        self.data = data
        self._batch: BatchChoice | None = None
        self.measured: dict[str, Measured] = {}  # the batches the passes measured and chose
        # keep the float outputs of the first samples while calibrating (None: as many as the
        # summary takes, sized to a sample's cost by summary_samples())
        self.keep_first: int | None = 0
        self.summary_note: str | None = None
        self.cache_dir = cache_dir
        self.show_progress = show_progress
        self.feeds = first_feeds(data, prep.specs)
        self.prep = prep
        # the cache's key model, kept (only with a cache) until its key is computed
        self._key_model: onnx.ModelProto | None = prep.model if cache_dir is not None else None
        self._key: str | None = None
        self._cached: dict[str, TensorStats] | None = None
        self.reference_outputs: list | None = None
        self._shared: runner.SharedWeights | None = None
        self._probe: runner.Probe | None = runner.probed(prep.model, self.feeds)
        self.info = self._probe.info
        self.stats: dict[str, TensorStats] = {}
        self._widen: bool | None = None  # calibration.widen_to_mse: auto, once decided
        self._widen_note = ""
        self._from_cache = False  # some statistics came from the cache
        self._calibrated = False  # a calibration pass ran
        if self._watch is not None and (not defer_smoothing or self._smoothing_cached(self._watch)):
            self.settle_smoothing()  # (deferred: settled after the first calibration pass)

    @property
    def cache_hit(self) -> bool:
        """The statistics this workspace used came from the cache (no calibration pass ran)."""
        return self._from_cache and not self._calibrated

    @property
    def graph(self) -> Graph:
        return self._graph

    @property
    def prep(self) -> Prepared:
        return self._prep

    @prep.setter
    def prep(self, value: Prepared) -> None:
        self._prep = value
        self._graph = value.graph
        self._shared = None
        self._saturation: SaturationPass | None = None
        self._guard_inputs: KeptTensors | None = None  # kept by the calibration pass for it
        self._refining = PlanPasses(self)  # scale search, AdaRound, bias correction
        self._branches: list[Branch] | None = None  # built from this model when first needed

    def stats_key(self) -> str:
        """The statistics cache key (of the model before any opset upgrade; computed once)."""
        if self._key is None:
            self._key = stats_key(self._key_model or self.prep.model, self.data, self.cfg)
            self._key_model = None
        return self._key

    @property
    def disk(self) -> tuple[Path, str] | None:
        """(cache folder, statistics key) for a pass that keeps its results on disk too."""
        return (self.cache_dir, self.stats_key()) if self.cache_dir is not None else None

    def ensure_opset(self, need: int) -> None:
        if opset_version(self.prep.model) < need:
            if self.cache_dir is not None:
                self.stats_key()  # of the model before the upgrade, which is then let go
            self.prep, probe = upgrade_checked(self.prep, need, self.feeds, self._probe)
            self.info, self._probe = probe.info, None

    def ensure_opset_for(self, cfg: Config, bits: Iterable[int] = ()) -> None:
        """Upgrade once, before any plan is built (an upgrade may rename nodes, and the If
        branches are taken apart from this model): to what ``cfg``'s plan needs, its branches'
        included, and to what any of ``bits`` would need (sensitivity, search)."""
        plan = plan_structure(self.graph, cfg, self.info)
        self._spare = (cfg, self.graph, plan)  # structure(cfg) takes it where nothing changed
        self.ensure_opset(
            max(required_opset(plan), branch_opset(self.prep.model, cfg), opset_for_bits(bits))
        )

    def structure(self, cfg: Config) -> QuantPlan:
        """Which layers and tensors ``cfg`` quantizes, with the structures of the If branches and
        Loop bodies (no statistics needed)."""
        spare, self._spare = self._spare, None
        if spare is not None and spare[0] is cfg and spare[1] is self.graph:
            plan = spare[2]
        else:
            plan = plan_structure(self.graph, cfg, self.info)
        if self._guard_inputs is None:  # for the calibration pass to keep (the first plan's)
            n = len(self.data)
            self._guard_inputs = kept_inputs(
                self.graph, plan, self.info, n, cfg.calibration, self.prep.specs
            )
            if self._kept_before is not None:  # kept before SmoothQuant's edit, still valid
                self._guard_inputs.adopt(*self._kept_before)
                self._kept_before = None
        for b in self.branches():
            if b.ws is not None:
                plan.branches[b.where] = b.ws.structure(cfg)
        return plan

    def branches(self) -> list[Branch]:
        """The branches of the main graph's If nodes and the bodies of its Loops, each a
        Workspace of its own over what it reads on the calibration samples that run it (recorded
        on one float pass, one sample per call; None where none runs it)."""
        if self._branches is None:
            self._branches = branch_workspaces(self)
        return self._branches

    def branch_notes(self, plan: QuantPlan) -> list[str]:
        """One line per If or Loop (nested ones prefixed with where they sit): what became of
        its branches or body under ``plan`` (calib/bodies.py)."""
        return branch_notes(self, plan)

    @property
    def batch(self) -> BatchChoice:
        """The batch of the calibration pass and the summary's runs under the memory budget
        (calib/memory.py), chosen once, when first needed."""
        if self._batch is None:
            c = self.cfg.calibration
            self._batch = choose_batch(
                self.prep.model, self.data, self.prep.specs, c.batch_size, c.memory_mb
            )
        return self._batch

    def summary_samples(self) -> int:
        """The calibration samples the summary compares on: ``keep_first``; when that is None,
        up to SUMMARY_SAMPLES, fewer where a sample is slow (BatchChoice.summary_samples),
        decided once."""
        if self.keep_first is None:
            self.keep_first = self.batch.summary_samples(SUMMARY_SAMPLES)
            if self.keep_first < min(SUMMARY_SAMPLES, len(self.data)):
                self.summary_note = (
                    f"summary on the first {self.keep_first} calibration samples: a sample's "
                    f"float run took {1000 * (self.batch.sample_seconds or 0):.0f} ms "
                    "(summary_samples sets it)"
                )
        return self.keep_first

    def observe(self, tensors: Iterable[str]) -> None:
        """Make sure statistics exist for ``tensors``: derived where a tensor is a clamp or a
        reshuffle of one already observed (exact), else one streamed pass for all missing ones."""
        missing = sorted(set(tensors) - set(self.stats))
        if missing and self.cache_dir is not None and self._cached is None:
            self._cached = stats_cache.load(self.cache_dir, self.stats_key())
        cached = self._cached or {}
        for t in list(missing):
            if t in cached:
                self.stats[t] = cached[t]
                self._from_cache = True
        missing = [t for t in missing if t not in self.stats and not self._derive(t, cached)]
        if missing:
            axes = {
                t: channel_axis(self.graph, t, len(self.info[t].shape))
                for t in missing
                if t in self.info
            }
            if self._replayed(missing, axes):
                return
            keep = None
            first = self.summary_samples()
            if self.reference_outputs is None and first:
                self.reference_outputs = []
                keep = (first, self.reference_outputs)
            watch = self.first_watch()
            got, hit = calibrate(
                self.prep,
                self.data,
                missing,
                self.cfg,
                self.cache_dir,
                self.show_progress,
                self.stats_key() if self.cache_dir is not None else None,
                functools.partial(self.measured.setdefault, "calibration"),  # the first pass:
                # the summary's calls replay its batches (it kept their float outputs)
                keep_outputs=keep,
                info=self.info,
                channel_axes=axes,
                keep_tensors=self._guard_inputs,
                watch=watch,
            )
            if keep is not None and not keep[1]:
                self.reference_outputs = None
            self.stats.update(got)
            if hit:
                self._from_cache = True
            else:
                self._calibrated = True

    def _derive(self, t: str, cached: Mapping[str, TensorStats]) -> bool:
        """Relu output = clamp of the input's statistics; Reshape-like outputs hold the same
        values as their input. Both exact, so no model run is needed for them."""
        node = self.graph.producer.get(t)
        if node is None or not node.input:
            return False
        x = node.input[0]
        if x not in self.stats and x in cached:
            self.stats[x] = cached[x]
        if x not in self.stats and not self._derive(x, cached):
            return False
        src = self.stats[x]
        bounds = fixed_clamp(node.op_type)
        if bounds is not None:
            self.stats[t] = observers.clamp(src, *bounds)
            return True
        if handler(node.op_type).same_values:
            self.stats[t] = src
            return True
        return False

    def sources(self, plan: QuantPlan) -> set[str]:
        """The tensors to observe for a plan: its activation roots, except that a root read only
        by a Relu, whose group uses only its non-negative part (ahead-relu), is observed at the
        Relu's output. Clamped at a bound >= 0, both give the same statistics, and onnxruntime
        keeps the Conv+Relu fused while calibrating. A root of a known range (a Sigmoid's
        output) is not observed: no statistics choose its grid."""
        return {self._source(plan, r) for r in calibrated_roots(plan)}

    def _source(self, plan: QuantPlan, root: str) -> str:
        tp = plan.tensors.get(root)
        if tp is None or tp.clamp is None or tp.clamp[0] is None or tp.clamp[0] < 0:
            return root
        readers = self.graph.consumers.get(root, [])
        relu = len(readers) == 1 and fixed_clamp(readers[0].op_type) == (0.0, None)
        if not relu or root in self.graph.output_names:
            return root
        return readers[0].output[0]

    def root_stats(self, plan: QuantPlan) -> dict[str, TensorStats]:
        """Statistics of every activation root of the plan (observed at its source, see
        ``sources``) but those of a known range; the plan's clamps still have to be applied. An
        outlier-split tensor whose only quantized readers are the split layers (their outlier
        rows zeroed) takes the range of its other channels (outlier_split.masked)."""
        out = {
            r: self.stats[r if r in self.stats else self._source(plan, r)]
            for r in calibrated_roots(plan)
        }
        for t, (index, layers) in self.masked.items():
            s = out.get(t)
            readers = {
                c for tp in plan.tensors.values() if (tp.root or tp.name) == t for c in tp.consumers
            }
            if s is None or s.ch_min.size <= max(index) or not readers <= set(layers):
                continue
            rest = np.ones(s.ch_min.size, dtype=bool)
            rest[list(index)] = False
            out[t] = observers.clamp(s, float(s.ch_min[rest].min()), float(s.ch_max[rest].max()))
        return out

    def plan(self, cfg: Config | None = None, structure: QuantPlan | None = None) -> QuantPlan:
        """A complete plan (guards applied, every scale set) for ``cfg`` (default: the base).
        ``structure``: ``self.structure(cfg)`` when already at hand (it is filled in place)."""
        cfg = self.ranges(cfg or self.cfg)
        plan = structure if structure is not None else self.structure(cfg)
        self.observe(self.sources(plan))
        float_layers, float_roots = guard_decisions(self.graph, plan, self.root_stats(plan), cfg)
        if float_layers or float_roots:
            plan = plan_structure(self.graph, cfg, self.info, float_layers, float_roots)
            self.observe(self.sources(plan))
        assign_qparams(plan, self.root_stats(plan), cfg, self.graph.array)
        if decide_overflow(plan, self.saturation_probe()):  # guarded: new weight, bias scales
            assign_weight_qparams(plan, self.graph.array)
        self._refining.refine_weights(plan, cfg)
        self._refining.correct_biases(plan, cfg)
        if self._widen_note:
            plan.notes.append(self._widen_note)
        for b in self.branches():
            if b.ws is not None:
                sub = structure.branches.get(b.where) if structure is not None else None
                plan.branches[b.where] = b.ws.plan(cfg, sub)
        return plan

    def ranges(self, cfg: Config) -> Config:
        """``cfg`` with ``calibration.widen_to_mse: auto`` decided, once per workspace, on the
        first calibration samples' outputs (calib/range_choice.py)."""
        if cfg.calibration.widen_to_mse != SmoothMode.AUTO:
            return cfg
        if self._widen is None:
            self.ensure_opset_for(cfg)  # the choice emits and runs the plans
            self._widen, self._widen_note = range_choice.choose(
                self.plan, self.emit, self.prep.model, self.data, self.prep.specs, cfg
            )
        return range_choice.with_widen(cfg, self._widen)

    def overflow_note(self) -> str | None:
        """The overflow check's line for the summary, where the budget split its runs."""
        return self._saturation.note() if self._saturation is not None else None

    def saturation_probe(self) -> SaturationPass:
        """The overflow guard's emulation over this workspace's calibration samples."""
        if self._saturation is None:
            self._saturation = SaturationPass(
                self.graph,
                self.data,
                self.prep.specs,
                self.cfg.calibration.batch_size,
                kept=self._guard_inputs,
                sample_values={t: int(np.prod(i.shape)) for t, i in self.info.items()},
                budget_mb=self.cfg.calibration.memory_mb,
                cache=self.disk,
            )
        return self._saturation

    def emit(self, plan: QuantPlan) -> onnx.ModelProto:
        """The QDQ model of a plan, its If branches and Loop bodies quantized in place."""
        q = emit_qdq(self.prep.model, plan)
        if self.smoothing and smoothquant.read_float_inputs(q):
            drop_unused_initializers(q)
        told = smoothing.provenance(self.prep.model, self.smoothing)
        told["rescaled"] = sorted({*told["rescaled"], *self.equalization.rescaled})
        told["corrected"] = bias_correction.corrections(plan)
        if any(told.values()):  # the float model was edited before quantizing
            q.metadata_props.add(key=smoothing.PROVENANCE_KEY, value=json.dumps(told))
        if plan.branches:
            by = {b.where: b for b in self.branches()}
            for where, sub in plan.branches.items():
                b = by[where]
                assert b.ws is not None
                bq = b.ws.emit(sub)
                if opset_version(bq) > opset_version(q):  # pragma: no cover - see branch_opset
                    raise ModelError(
                        f"{b.node}: its {b.attr} needs opset {opset_version(bq)}; the model has "
                        f"{opset_version(q)}"
                    )
                subgraphs.splice_branch(q, b.node, b.attr, bq)
            drop_unused_initializers(q)
        return q

    def session(
        self,
        plan_or_model: QuantPlan | onnx.ModelProto,
        source: str = "trial model",
        execution: Execution | str = Execution.IDEAL,
    ):
        """An onnxruntime session for a plan's QDQ model (or a model built from one, which is
        modified in place), sharing the float weights with every other such session. Ideal by
        default: sensitivity and search rank the same way on every machine (DESIGN.md §6b)."""
        if self._shared is None:
            self._shared = runner.SharedWeights(self.prep.model)
        model = self.emit(plan_or_model) if isinstance(plan_or_model, QuantPlan) else plan_or_model
        return runtime.session_for(model, execution, source, shared=self._shared)


def build_plan(
    prep: Prepared,
    cfg: Config,
    data: Dataset,
    cache_dir: Path | None,
    show_progress: bool = True,
) -> tuple[Prepared, QuantPlan, dict[str, TensorStats], bool, list[str]]:
    """Model + config + data -> a QuantPlan with every scale (the model is upgraded if needed)."""
    ws, plan, warnings = plan_in_workspace(prep, cfg, data, cache_dir, show_progress)
    return ws.prep, plan, {**ws.stats, **ws.root_stats(plan)}, ws.cache_hit, warnings


def plan_in_workspace(
    prep: Prepared,
    cfg: Config,
    data: Dataset,
    cache_dir: Path | None,
    show_progress: bool = True,
    keep_first: int | None = 0,
) -> tuple[Workspace, QuantPlan, list[str]]:
    """build_plan, returning the Workspace (with the float outputs of the first ``keep_first``
    samples when calibration ran, for the summary; None: up to SUMMARY_SAMPLES, fewer where a
    sample is slow - ``ws.summary_samples()`` says how many)."""
    ws = Workspace(prep, cfg, data, cache_dir, show_progress, defer_smoothing=True)
    del prep  # the model before smoothing/equalization: let go (a transformer's is 0.4 GB)
    ws.keep_first = keep_first
    edited = True
    while edited:  # twice where SmoothQuant edits the model its first pass observed
        ws.ensure_opset_for(cfg)
        base = ws.structure(cfg)
        # the roots of this plan and of the all-quantized one: other plans find them in the cache
        everything = ws.structure(replace(cfg, layers=(), op_types=()))
        ws.observe(ws.sources(base) | ws.sources(everything))
        edited = ws.settle_smoothing()
    warnings = check_config_names(ws.graph, cfg)
    plan = ws.plan(cfg, base)
    return ws, plan, warnings
