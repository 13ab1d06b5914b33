"""Statistics of tensors computed from others that an earlier pass kept whole: a sub-model of the
graph from those tensors and constants to the wanted ones, fed the kept values call by call,
instead of a run of the whole model. Used for what an edit after the calibration pass adds
(SmoothQuant's Div, the outlier split's parts: all computed from the tensor the calibration
pass kept for SmoothQuant's decision; calib/smoothing.py's Watch)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from amq.calib import runner
from amq.calib.kept import KeptTensors
from amq.graph.model import Graph
from amq.graph.subgraphs import keep_needed, subgraph_attrs
from amq.quant.observers import TensorStats
from amq.quant.planner import TensorInfo


def sub_model(
    g: Graph, sources: Mapping[str, TensorInfo], outputs: Iterable[str]
) -> tuple[onnx.ModelProto, list[str]] | None:
    """The nodes of ``g`` that compute ``outputs`` from ``sources`` and constants, as a model
    whose inputs are the sources they read (returned with it); None where one needs anything
    else (a graph input, an activation not kept) or holds a subgraph (If, Loop)."""
    wanted = list(dict.fromkeys(outputs))
    graph = helper.make_graph(g.nodes, "replay", [], [onnx.ValueInfoProto(name=o) for o in wanted])
    keep_needed(graph, given=sources)
    made = {o for n in graph.node for o in n.output}
    read = {i for n in graph.node for i in n.input if i}
    known = made | set(sources) | set(g.initializers)
    if any(subgraph_attrs(n) for n in graph.node) or not (read | set(wanted)) <= known:
        return None
    inputs = [s for s in sources if s in read]
    graph.input.extend(
        helper.make_tensor_value_info(
            s,
            helper.np_dtype_to_tensor_dtype(np.dtype(sources[s].dtype)),
            ["n", *sources[s].shape[1:]],
        )
        for s in inputs
    )
    graph.initializer.extend(g.initializers[i] for i in sorted(read) if g.is_constant(i))
    model = helper.make_model(graph, opset_imports=g.model.opset_import)
    model.ir_version = g.model.ir_version
    return model, inputs


@dataclass
class Replay:
    """Tensors kept whole by a pass (per call, in ``calls`` samples each) over a model whose
    edit followed it: ``graph`` is the edited model's."""

    graph: Graph
    kept: Mapping[str, Sequence[np.ndarray]]
    calls: Sequence[int]

    def stats(
        self,
        tensors: Sequence[str],
        info: Mapping[str, TensorInfo],
        bins: int,
        keep: KeptTensors | None = None,
        **collect: Any,
    ) -> dict[str, TensorStats] | None:
        """runner.collect_stats of ``tensors`` on the sub-model from the kept tensors, with the
        inputs ``keep`` still wants kept from it; None where the sub-model cannot compute all."""
        wanted = keep.wanted() if keep is not None else []
        sources = {t: info[t] for t in self.kept if t in info}
        got = sub_model(self.graph, sources, [*tensors, *wanted])
        if got is None:
            return None
        model, inputs = got
        calls = [({t: self.kept[t][i] for t in inputs}, [], n) for i, n in enumerate(self.calls)]
        return runner.collect_stats(
            model, tensors, calls, bins, info=info, keep_tensors=keep, **collect
        )
