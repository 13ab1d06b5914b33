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
from amq.graph.model import Graph
from amq.quant.observers import TensorStats
from amq.quant.planner import TensorInfo


def sub_model(
    g: Graph, sources: Mapping[str, TensorInfo], outputs: Iterable[str]
) -> tuple[onnx.ModelProto, list[str]] | None:
    """The nodes of ``g`` that compute ``outputs`` from ``sources`` and constants, as a model
    whose inputs are the sources they read (returned with it); None where one needs anything
    else (a graph input, an activation not kept) or holds a subgraph (If, Loop)."""
    picked: set[int] = set()
    need, seen = list(outputs), set()
    while need:
        t = need.pop()
        if t in seen or t in sources or g.is_constant(t):
            continue
        seen.add(t)
        p = g.producer.get(t)
        if p is None or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                            for a in p.attribute):  # fmt: skip
            return None
        picked.add(id(p))
        need.extend(i for i in p.input if i)
    nodes = [n for n in g.nodes if id(n) in picked]
    read = {i for n in nodes for i in n.input if i}
    inputs = [s for s in sources if s in read]
    value_info = [
        helper.make_tensor_value_info(
            s,
            helper.np_dtype_to_tensor_dtype(np.dtype(sources[s].dtype)),
            ["n", *sources[s].shape[1:]],
        )
        for s in inputs
    ]
    graph = helper.make_graph(
        nodes,
        "replay",
        value_info,
        [onnx.ValueInfoProto(name=o) for o in dict.fromkeys(outputs)],
        [g.initializers[i] for i in sorted(read) if g.is_constant(i)],
    )
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
        keep: runner.KeptTensors | None = None,
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
