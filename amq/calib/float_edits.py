"""The float model's edits a Workspace makes before it calibrates (cross-layer equalization),
or decides on what its first calibration pass collected (deferred: the concat split, then
SmoothQuant and the outlier split), and how the workspace then takes the edited model: only the
statistics of what the edit changed go, those of what it added are computed from the tensors
the pass kept whole where they can be (calib/replay.py), and the cache key follows the model.
A mixin of calib/workspace.py's Workspace, whose state it reads and sets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from amq.calib import cache as stats_cache
from amq.calib import concat_splitting, runner, smoothing
from amq.calib.concat_splitting import split_concats
from amq.calib.data import Dataset
from amq.calib.equalizing import Equalization, equalize
from amq.calib.kept import KeptTensors
from amq.calib.prepare import Prepared
from amq.calib.replay import Replay
from amq.calib.runner import Batch, Watcher
from amq.config import Config
from amq.quant.algorithms import outlier_split
from amq.quant.registry import fixed_clamp, handler

if TYPE_CHECKING:
    from collections.abc import Sequence


@dataclass
class Watches:
    """Several watchers of one pass, as one."""

    each: Sequence[Watcher]

    def asked(self) -> list[str]:
        return [t for w in self.each for t in w.asked()]

    def take(self, b: Batch) -> None:
        for w in self.each:
            w.take(b)


class FloatEdits:
    """Workspace's float edits (see the module's docstring)."""

    def _init_edits(self) -> None:
        self.smoothing: list = []
        self.equalization = Equalization()
        self.concat_splits: list = []
        self._watch: smoothing.Watch | None = None  # SmoothQuant's, until settle_smoothing
        self._concat_watch: concat_splitting.RangeWatch | None = None  # deferred: see there
        self._watching = False  # given to a calibration pass already
        self._kept_before: tuple[KeptTensors, set[str]] | None = None  # see _adopt
        self._replay: Replay | None = None  # see _adopt

    def first_watch(self) -> Watches | None:
        """What the first calibration pass takes for the deferred edits (None after it)."""
        watches = [w for w in (self._watch, self._concat_watch) if w is not None]
        watch = Watches(watches) if watches and not self._watching else None
        self._watching = True
        return watch

    def _edit_float(
        self, prep: Prepared, cfg: Config, data: Dataset, progress: bool, defer: bool
    ) -> Prepared:
        """The float model's edits before calibration, so that every verb (quantize,
        sensitivity, search, qat) sees one model and shares one statistics cache entry (not
        inside If/Loop bodies: their weights may belong to the outer graph). Cross-layer
        equalization (calib/equalizing.py) first: it rescales Conv chains, which SmoothQuant's
        MatMul/Gemm groups do not share; then the concat split (calib/concat_splitting.py),
        whose parts SmoothQuant may then smooth. SmoothQuant and the outlier split
        (calib/smoothing.py), one decision per MatMul/Gemm group, come last: their statistics
        are taken by the first calibration pass where the constructor's ``defer_smoothing``
        asks (a model they leave alone then runs once less), else by a pass of their own in
        the constructor (settle_smoothing). Deferred, the concat split's first look at its
        candidates is taken by that pass too, and it is decided first, after it."""
        prep, self.equalization = equalize(prep, cfg, data, progress)
        cands = concat_splitting.candidates(prep, cfg, data) if defer else []
        if cands:  # its first look taken by the calibration pass too
            ratio_min = cfg.guards.concat_range_ratio
            self._concat_watch = concat_splitting.RangeWatch(cands, len(data), ratio_min)
        elif not defer:
            prep, self.concat_splits = split_concats(prep, cfg, data, progress)
        self._watch = self._new_watch(prep, cfg, data)
        return prep

    def _new_watch(self, prep: Prepared, cfg: Config, data: Dataset) -> smoothing.Watch | None:
        """SmoothQuant's watch of ``prep``'s candidate groups (None: it has none)."""
        groups = smoothing.candidates(prep, cfg, data)
        if not groups:
            return None
        c, outs = cfg.calibration, smoothing.graph_outputs(prep.model)
        return smoothing.Watch(groups, outs, len(data), c.batch_size, c.memory_mb)

    def _smoothing_cached(self, w: smoothing.Watch) -> bool:
        """SmoothQuant's statistics for ``w`` are in the cache (kept with it, to be used)."""
        if w.cached is None and self.cache_dir is not None:
            w.cached = smoothing.load_stats(self.disk, w.tensors) or None
        return w.cached is not None

    def _replayed(self, missing: list[str], axes: Mapping[str, int]) -> bool:
        """Statistics of ``missing`` (SmoothQuant's edit's tensors) computed from the tensors
        the first pass kept (calib/replay.py), where they can be: no run of the whole model."""
        replay, self._replay = self._replay, None  # once: it holds the kept values
        c = self.cfg.calibration
        if replay is None:
            return False
        got = replay.stats(
            missing,
            self.info,
            c.bins,
            self._guard_inputs,
            channel_axes=axes,
            samples=len(self.data),
        )
        if got is None:
            return False
        self.stats.update(got)
        self._calibrated = True
        if self.cache_dir is not None:
            stats_cache.save(self.cache_dir, self.stats_key(), {**(self._cached or {}), **got})
        return True

    def settle_smoothing(self) -> bool:
        """Decide the concat split, then SmoothQuant and the outlier split (deferred: see
        __init__), on what the first calibration pass collected for them, or on passes of
        their own where it collected nothing (every statistic came from the cache). True where
        the model was edited: the structures built before are of the model before, and the
        statistics of the tensors the edit changed are gone (observe() collects them again)."""
        edited = self._settle_concats()
        w, self._watch = self._watch, None
        if w is None:
            return edited
        got = self._smoothing_stats(w)
        prep, self.smoothing = smoothing.settle(self.prep, self.cfg, self.data, w.groups, got)
        self.masked = outlier_split.masked(self.smoothing)
        if prep.model is self.prep.model:
            self._prep = prep  # its notes only (the float check failed): nothing else changes
            return edited
        self._adopt(prep, self.smoothing, w)
        return True

    def _settle_concats(self) -> bool:
        """The concat split, deferred: nothing to split where the calibration pass's look says
        so; else split_concats with its passes, and where it edits, SmoothQuant's candidates
        are found again on the edited model (and decided on a pass of their own)."""
        cw, self._concat_watch = self._concat_watch, None
        if cw is None or cw.settled():
            return False
        prep, self.concat_splits = split_concats(self.prep, self.cfg, self.data, self.show_progress)
        if prep.model is self.prep.model:
            self._prep = prep
            return False
        self._watch = self._new_watch(prep, self.cfg, self.data)
        self._adopt(prep, [])
        return True

    def _adopt(self, prep: Prepared, decisions: list, w: smoothing.Watch | None = None) -> None:
        """Take the model an edit after the first calibration pass made (``decisions``:
        SmoothQuant's, for what it rescaled): the statistics of what the edit changed go (those
        of what it added are computed from the tensors ``w`` kept whole, where they can be),
        the probe's shapes are derived where they can be, the overflow guard's kept inputs
        the edit left alone are carried over, and the statistics get a cache key of their own."""
        before, prev = self.graph, self._kept_before
        kept = self._guard_inputs if self._guard_inputs is not None else (prev and prev[0])
        self.prep = prep
        changed = smoothing.changed_tensors(before, self.graph, decisions)
        for n in self.graph.nodes:  # and what _derive made of them (nodes in order)
            if n.input and n.input[0] in changed and _derivable(n.op_type):
                changed.update(n.output)
        for t in changed:
            self.stats.pop(t, None)
        self._kept_before = (kept, changed | (prev[1] if prev else set())) if kept else None
        kept_whole = {t: v for t, v in (w.whole if w else {}).items() if t not in changed}
        if w is not None and kept_whole and w.collected() is not None:  # what the edit adds,
            self._replay = Replay(self.graph, kept_whole, w.calls)  # from what it read
        info = smoothing.edited_info(self.info, self.graph, changed - set(before.producer))
        self._probe = (
            runner.Probe(info) if info is not None else runner.probed(prep.model, self.feeds)
        )
        self.info = self._probe.info
        self._key, self._cached = None, None  # statistics of the edited model: a key of its own
        self._key_model = prep.model if self.cache_dir is not None else None
        if self.cache_dir is not None and self.stats:  # those the edit kept, under it too (for
            key = self.stats_key()  # a verb that reads the edited model's entry only)
            self._cached = {**stats_cache.load(self.cache_dir, key), **self.stats}
            stats_cache.save(self.cache_dir, key, self._cached)  # (observe reads it from here)

    def _smoothing_stats(self, w: smoothing.Watch) -> tuple[dict, list]:
        """SmoothQuant's statistics and float-check references: the first calibration pass's,
        else the cache's (no references: the check runs the model itself), else a pass of
        their own; kept in the cache under the key of the model they were taken on."""
        got = w.collected()
        if got is None:
            if self._smoothing_cached(w):
                return w.cached, []
            stats, ref = smoothing.channel_stats(
                self.prep, self.data, w.tensors, self.cfg.calibration.batch_size, self.show_progress
            )
            got = stats, [ref] if ref is not None else []
        if self.cache_dir is not None:
            smoothing.save_stats(self.disk, got[0])
        return got


def _derivable(op_type: str) -> bool:
    """Workspace._derive derives an output of this op from its first input's statistics."""
    return fixed_clamp(op_type) is not None or handler(op_type).same_values
