"""The input moments H = E[x x^T] of weighted layers (quant/algorithms/layer_inputs.py) over the
first calibration samples, for scale search and AdaRound: one pass for all layers asked for,
kept per layer (they depend on the model and the data only, not on any plan)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from amq import report
from amq.calib import cache as stats_cache
from amq.calib.data import Dataset, InputSpec, batches
from amq.calib.runner import run_batches
from amq.graph.model import Graph
from amq.plan import LayerPlan
from amq.quant.activations import node_attrs
from amq.quant.algorithms import layer_inputs
from amq.quant.conv_geometry import conv_geometry
from amq.runtime import Exposed, session

SAMPLES = 32  # calibration samples read
KIND = "grams"  # their cache files: grams-<key>.npz
MAX_BYTES = 64 << 20  # a layer whose H would take more (K over ~2900) is left out


def fits(graph: Graph, lp: LayerPlan) -> bool:
    """H of this layer's input is small enough to keep."""
    w = graph.array(lp.weight)  # type: ignore[arg-type]
    attrs = node_attrs(graph.node_by_name[lp.name])
    m = layer_inputs.weight_matrix(lp.op_type, w, attrs)
    return m.shape[0] * m.shape[2] ** 2 * 8 <= MAX_BYTES


class GramPass:
    def __init__(
        self,
        graph: Graph,
        data: Dataset,
        specs: Sequence[InputSpec],
        batch_size: int,
        cache: tuple[Path, str] | None = None,
        samples: int = SAMPLES,
    ) -> None:
        """``cache``: (folder, key of the model and data) to keep the moments on disk beside
        the statistics (calib/cache.py), so that another quantize, sensitivity or search run
        with 4-bit weights reads them instead of running the model."""
        self.graph = graph
        self.data = data.head(samples)
        self.specs = list(specs)
        self.batch_size = max(1, min(batch_size, 4))
        self.cache = (cache[0], f"{cache[1]}-{samples}-{layer_inputs.MAX_ROWS}") if cache else None
        self._done: dict[str, np.ndarray] = (
            stats_cache.load_arrays(self.cache[0], KIND, self.cache[1]) if self.cache else {}
        )

    def grams(
        self, layers: Sequence[LayerPlan], show_progress: bool = False
    ) -> dict[str, np.ndarray]:
        """H [G, K, K] per layer name."""
        key = {lp.name: f"{lp.name}|{lp.weight}" for lp in layers}
        todo = [lp for lp in layers if key[lp.name] not in self._done]
        if todo:
            got = self._run(todo, show_progress)
            self._done.update({key[n]: h for n, h in got.items()})
            if self.cache:
                stats_cache.save_arrays(self.cache[0], KIND, self.cache[1], self._done)
        return {n: self._done[k] for n, k in key.items() if k in self._done}

    def _run(self, layers: Sequence[LayerPlan], show_progress: bool) -> dict[str, np.ndarray]:
        inputs = {lp.act_inputs[0] for lp in layers}
        graph_inputs = {v.name for v in self.graph.inputs}
        exposed = sorted(inputs - graph_inputs)
        sess = session(Exposed(self.graph.model, exposed), source="model (layer input moments)")
        acc = {lp.name: layer_inputs.Gram() for lp in layers}
        attrs = {lp.name: node_attrs(self.graph.node_by_name[lp.name]) for lp in layers}
        shapes = {lp.name: self.graph.array(lp.weight).shape for lp in layers}  # type: ignore[arg-type]
        seed = 0
        with report.progress(len(self.data), "layer input moments", show_progress) as advance:
            for b in run_batches(sess, exposed, batches(self.data, self.specs, self.batch_size)):
                got = {**b.values, **{k: v for k, v in b.feeds.items() if k in inputs}}
                for lp in layers:
                    x = np.asarray(got[lp.act_inputs[0]], np.float32)
                    if lp.op_type == "Conv":
                        geo = conv_geometry(attrs[lp.name], shapes[lp.name], x.shape)
                        full = (geo["group"], geo["strides"], geo["pads"], geo["dilations"])
                        p = layer_inputs.conv_patches(x, shapes[lp.name], full, seed=seed)
                    else:
                        p = layer_inputs.matmul_rows(x, attrs[lp.name], seed=seed)
                    acc[lp.name].add(p)
                seed += 1
                advance(b.n)
        return {name: a.value() for name, a in acc.items() if a.rows}
