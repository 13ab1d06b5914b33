"""Bias correction's data pass (quant/algorithms/bias_correction.py): the probe model over the
first calibration samples, one batch at a time, until every layer's shift has settled
(bias_correction.Accumulator) or the samples run out; results kept per (layer, grids), so that
the plans sensitivity and search build pay for each layer once per bit width, and on disk beside
the statistics (calib/cache.py), so that another run on the same model and data reads them."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from amq import report
from amq.calib import cache as stats_cache
from amq.calib.data import Dataset, InputSpec
from amq.calib.memory import BIAS_BATCH, Measured, measured_batches
from amq.calib.runner import run_batches
from amq.graph.model import Graph
from amq.plan import LayerPlan, QuantPlan
from amq.quant.algorithms import bias_correction, layer_inputs
from amq.quant.planner import TensorInfo
from amq.runtime import session

SAMPLES = 64  # calibration samples the pass reads
KIND = "bias"  # its cache files: bias-<key>.npz
VERSION = 2  # of the shifts' computation: a cache entry of another version is not read
READ = "/read"  # a cache entry's key + this: [samples its shift read, the step it settled on]


class BiasCorrectionPass:
    """Shifts per output channel of bias-correction targets, measured on the first ``samples``
    calibration samples and kept per (layer, input grid, weight grid)."""

    def __init__(
        self,
        graph: Graph,
        data: Dataset,
        specs: Sequence[InputSpec],
        info: Mapping[str, TensorInfo],
        batch_size: int,
        budget_mb: int = 0,
        record: Callable[[Measured], None] | None = None,
        cache: tuple[Path, str] | None = None,
    ) -> None:
        """``cache``: (folder, key of the model and data) to keep the shifts on disk."""
        self.graph = graph
        self.data = data.head(SAMPLES)
        self.specs = list(specs)
        self.info = info  # the probe's shapes: each layer's output rank
        self.batch_size = max(1, min(batch_size, BIAS_BATCH))
        self.budget_mb = budget_mb  # the batches' sizes come from the probe's measured cost
        self.record = record
        bc = bias_correction
        suffix = f"{SAMPLES}-{bc.NOISE}-{bc.SETTLED}-{bc.CHECKPOINTS}-v{VERSION}"
        self.cache = (cache[0], f"{cache[1]}-{suffix}") if cache else None
        got = stats_cache.load_arrays(self.cache[0], KIND, self.cache[1]) if self.cache else {}
        self._done = {k: v for k, v in got.items() if not k.endswith(READ)}
        self._read = {
            k[: -len(READ)]: (int(v[0]), float(v[1])) for k, v in got.items() if k.endswith(READ)
        }

    @classmethod
    def of(cls, ws) -> BiasCorrectionPass:
        """The pass of a Workspace (calib/workspace.py): its float model, samples and budget;
        the batches are sized by their measured cost (per-sample sums: any batching gives the
        same shifts), and the shifts kept beside the workspace's statistics."""
        c = ws.cfg.calibration
        record = functools.partial(ws.measured.__setitem__, "bias correction")
        return cls(
            ws.graph, ws.data, ws.prep.specs, ws.info, c.batch_size, c.memory_mb, record, ws.disk
        )

    def shifts(
        self, plan: QuantPlan, layers: Sequence[LayerPlan], show_progress: bool = False
    ) -> dict[str, np.ndarray]:
        keys = {lp.name: layer_inputs.grids_key(plan, lp) for lp in layers}
        shapes = {
            lp.name: tuple(self.info[lp.outputs[0]].shape)
            for lp in layers
            if lp.outputs and lp.outputs[0] in self.info
        }
        todo = [
            lp for lp in layers if not self._known(plan, lp, keys[lp.name]) and lp.name in shapes
        ]
        if todo:
            for name, (shift, read) in self._run(plan, todo, shapes, show_progress).items():
                self._done[keys[name]], self._read[keys[name]] = shift, read
            if self.cache:
                read = {k + READ: np.array(v, np.float64) for k, v in self._read.items()}
                stats_cache.save_arrays(self.cache[0], KIND, self.cache[1], {**self._done, **read})
        return {n: self._done[k] for n, k in keys.items() if k in self._done}

    def _known(self, plan: QuantPlan, lp: LayerPlan, key: str) -> bool:
        """Whether the shift kept for ``key`` serves ``lp`` in ``plan``: it read every sample,
        or it settled on an output step no coarser than this plan's (a plan where the layer's
        output lands on a finer grid needs more samples)."""
        if key not in self._done:
            return False
        read, step = self._read.get(key, (0, 0.0))
        now = bias_correction.output_step(plan, lp)
        return read >= len(self.data) or (step > 0 and now is not None and step <= now)

    def samples_read(self, plan: QuantPlan, layers: Sequence[LayerPlan]) -> int:
        """The most samples any of ``layers``' shifts was measured on (they stop once settled)."""
        keys = (layer_inputs.grids_key(plan, lp) for lp in layers)
        return max((self._read.get(k, (0, 0.0))[0] for k in keys), default=0)

    def _run(
        self,
        plan: QuantPlan,
        layers: Sequence[LayerPlan],
        shapes: Mapping[str, tuple[int, ...]],
        show_progress: bool,
    ) -> dict[str, tuple[np.ndarray, tuple[int, float]]]:
        """Each layer's shift, the samples it read and the step it settled on (0: it did not):
        the pass stops once every layer's has settled."""
        probe = bias_correction.probe_model(self.graph, plan, list(layers), shapes)
        if not probe.outputs:
            return {}
        sess = session(
            probe.model, source="model (bias correction probe)", qdq_fusion=False, early_reads=True
        )  # float kernels at full optimization; the Q/DQ pairs stay as they are written
        acc = {
            name: bias_correction.Accumulator(bias_correction.output_step(plan, plan.layers[name]))
            for name in probe.outputs
        }
        names = [o for outs in probe.outputs.values() for o in outs]
        with report.progress(len(self.data), "bias correction", show_progress) as advance:
            calls = measured_batches(
                self.data, self.specs, self.batch_size, self.budget_mb, record=self.record
            )
            for b in run_batches(sess, names, calls, release=True):
                for name in probe.outputs:
                    acc[name].add(*probe.terms(name, b.values))
                advance(b.n)
                stop = bias_correction.settled(acc.values())
                if stop is not None:  # before the next batch runs (run_batches is lazy)
                    for a in acc.values():
                        a.rewind(stop)
                    advance(0, f"bias correction: every shift settled after {stop} samples")
                    break
        return {
            name: (a.shift(), (a.samples, a.step if a.samples in a.settled else 0.0))
            for name, a in acc.items()
        }
