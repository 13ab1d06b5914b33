"""The data passes that refine a complete plan's weights and biases (quant/algorithms/): scale
search and AdaRound on the layers' input moments (calib/grams.py), bias correction on its own
pass (calib/corrections.py). What they measure is kept per (layer, grid), so that the many plans
of one workspace's model (sensitivity, search) pay for each layer once."""

from __future__ import annotations

from typing import TYPE_CHECKING

from amq import report
from amq.calib import grams
from amq.calib.corrections import BiasCorrectionPass
from amq.calib.grams import GramPass
from amq.config import Config
from amq.plan import QuantPlan
from amq.quant.algorithms import adaround, bias_correction, layer_inputs, scale_search
from amq.quant.qparams import assign_weight_qparams

if TYPE_CHECKING:
    from amq.calib.workspace import Workspace


class PlanPasses:
    """The passes of one workspace's model (a new one when its model changes)."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self._grams: GramPass | None = None
        self._bias: BiasCorrectionPass | None = None
        self._searched: dict = {}  # scale search's and AdaRound's results per (layer, grid)
        self._rounded: dict = {}

    def refine_weights(self, plan: QuantPlan, cfg: Config) -> None:
        """Scale search, then AdaRound (quant/algorithms/), as ``cfg.algorithms`` asks, on the
        input moments of the layers they take; a note per pass says what it changed."""
        ws = self.ws
        ranks = {
            tp.name: len(ws.graph.initializers[tp.name].dims)
            for tp in plan.tensors.values()
            if tp.role == "weight" and tp.name in ws.graph.initializers
        }
        a = cfg.algorithms
        searched = layer_inputs.targets(plan, a.scale_search, ranks)
        rounded = layer_inputs.targets(plan, a.adaround, ranks)
        wanted = {lp.name: lp for lp in searched + rounded if grams.fits(ws.graph, lp)}
        if not wanted:
            return
        if self._grams is None:
            self._grams = GramPass(
                ws.graph, ws.data, ws.prep.specs, ws.cfg.calibration.batch_size, ws.disk
            )
        h = self._grams.grams(list(wanted.values()), ws.show_progress)
        if searched:
            todo = {lp.name: h[lp.name] for lp in searched if lp.name in h}
            done = scale_search.apply(plan, todo, ws.graph, self._searched)
            assign_weight_qparams(plan, ws.graph.array)
            plan.notes.append(f"scale search: {len(done)} of {len(searched)} weight(s) clipped")
        if rounded:
            todo = {lp.name: h[lp.name] for lp in rounded if lp.name in h}
            with report.progress(len(todo), "adaround", ws.show_progress) as advance:
                done = adaround.apply(plan, todo, ws.graph, self._rounded, advance)
            plan.notes.append(
                f"adaround: {len(done)} of {len(rounded)} weight(s) rounded as learned"
            )

    def correct_biases(self, plan: QuantPlan, cfg: Config) -> None:
        """Bias correction (quant/algorithms/bias_correction.py) of the plan's layers, as
        ``cfg.algorithms.bias_correction`` asks; a note says how many layers it changed."""
        ws = self.ws
        layers = bias_correction.targets(plan, cfg.algorithms.bias_correction)
        if not layers:
            return
        if self._bias is None:
            self._bias = BiasCorrectionPass.of(ws)
        shifts = self._bias.shifts(plan, layers, ws.show_progress)
        done = bias_correction.apply(plan, shifts, ws.graph.array)
        if done:
            n, of = self._bias.samples_read(plan, layers), len(self._bias.data)
            read = f"{n} of {of}" if n < of else f"{n}"
            plan.notes.append(
                f"bias correction: {len(done)} of {len(layers)} layer(s) corrected "
                f"(mean output shift of rounding, {read} calibration sample(s))"
            )
