"""amq compare: the float model and its QDQ model run side by side on the same data, every quantized
tensor compared (branches of If/Loop/Scan as models of their own), and the model outputs on both
executions."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from amq import report, runtime
from amq.analysis.compare.accumulate import Comparison
from amq.analysis.compare.diagnose import CompareReport, _rank_key
from amq.analysis.compare.match import match
from amq.analysis.fidelity import output_fidelity
from amq.calib import runner
from amq.calib.bodies import BRANCH_BYTES, body_model, branch_calls
from amq.calib.data import batches, input_specs, open_data
from amq.calib.prepare import DataSource, PathLike, prepare
from amq.config import (
    Config,
    load_config,
)
from amq.errors import ModelError
from amq.graph import subgraphs
from amq.graph.model import (
    QDQ_OPS,
    Graph,
    iter_all_nodes,
    load_model,
)
from amq.runtime import Execution, Exposed


def compare(
    float_model: PathLike | onnx.ModelProto,
    quant_model: PathLike | onnx.ModelProto,
    data: DataSource,
    config: Config | PathLike | None = None,
    batch_size: int = 16,
    samples: int | None = None,
    show_progress: bool = False,
) -> CompareReport:
    """Per quantized tensor of ``quant_model`` (matched by name through its Q/DQ nodes): the error
    against ``float_model`` on ``data``, the own quantizer's clipping/rounding split and a
    diagnosis with a suggested fix; rows worst first (amq.analysis.compare). Streamed batch by
    batch; ``samples``: a seeded subset of the data."""
    cfg = config if isinstance(config, Config) else load_config(config)
    fsrc = str(float_model) if not isinstance(float_model, onnx.ModelProto) else "float model"
    qsrc = str(quant_model) if not isinstance(quant_model, onnx.ModelProto) else "quantized model"
    fproto = (
        load_model(float_model) if not isinstance(float_model, onnx.ModelProto) else float_model
    )
    qproto = (
        load_model(quant_model) if not isinstance(quant_model, onnx.ModelProto) else quant_model
    )
    f_qdq = any(n.op_type in QDQ_OPS for n in iter_all_nodes(fproto.graph))
    q_qdq = any(n.op_type in QDQ_OPS for n in iter_all_nodes(qproto.graph))
    if f_qdq and not q_qdq:
        raise ModelError(
            f"{fsrc}: the first model is quantized and {qsrc} is not; give FLOAT first, QUANT second"
        )
    if f_qdq:
        raise ModelError(
            f"{fsrc}: contains QuantizeLinear/DequantizeLinear; give the float model as FLOAT"
        )
    if not q_qdq:
        raise ModelError(
            f"{qsrc}: no QuantizeLinear/DequantizeLinear nodes: not a QDQ model "
            "(make one with amq quantize)"
        )
    specs = input_specs(Graph(fproto))
    qnames = [s.name for s in input_specs(Graph(qproto))]
    if sorted(qnames) != sorted(s.name for s in specs):
        raise ModelError(
            f"{qsrc}: inputs ({', '.join(qnames)}) differ from {fsrc}'s "
            f"({', '.join(s.name for s in specs)}); are they the same model?"
        )
    ds = open_data(data, specs, cfg)
    if samples is not None:
        ds = ds.subset(samples, cfg.calibration.seed)

    def calls(bs: int) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]]:
        return ((f, f, n) for f, _labels, n in batches(ds, specs, bs))

    rep = compare_level(
        ModelPair(fproto, qproto, fsrc, qsrc), calls, len(ds), cfg, batch_size, show_progress
    )
    # the model outputs on both executions: compare never says "ok" while what users get is off
    outs = output_fidelity(fproto, qproto, ((f, n) for f, _q, n in calls(batch_size)))
    rep.outputs, rep.isa = outs.rows(), outs.isa
    if not rep.rows:
        raise ModelError(
            f"{qsrc}: none of its quantized tensors matches a tensor of {fsrc}; "
            "are they the same model?" + (f" ({rep.notes[0]})" if rep.notes else "")
        )
    return rep


Calls = Callable[[int], Iterable[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray], int]]]


@dataclass(frozen=True)
class ModelPair:
    """The float model and its QDQ model (or two matching control-flow bodies of them), with the
    names the report shows for them."""

    float_model: onnx.ModelProto
    quant_model: onnx.ModelProto
    float_source: str = "float model"
    quant_source: str = "quantized model"


def compare_level(
    pair: ModelPair,
    calls: Calls,
    count: int,
    cfg: Config,
    batch_size: int = 16,
    show_progress: bool = False,
) -> CompareReport:
    """compare() for one graph: its own Q/DQ tensors, streamed over ``calls(batch_size)`` (feeds
    of the float model, of the quantized one, samples), then the branches of its If nodes, each
    compared as a pair of models of their own on the outer-scope values each model's branch
    reads on the calls that take the same branch in both (so errors from upstream count)."""
    rep = _compare_tensors(pair, calls, count, cfg, batch_size, show_progress)
    qnodes = {n.name: n for n in pair.quant_model.graph.node if subgraphs.bodies(n)}
    nodes = [
        n
        for n in pair.float_model.graph.node
        if subgraphs.bodies(n)
        and n.name in qnodes
        and any(
            m.op_type in QDQ_OPS
            for a in subgraphs.bodies(n)
            for m in iter_all_nodes(subgraphs.branch(qnodes[n.name], a))
        )
    ]
    if nodes:
        _compare_bodies(rep, pair, [(n, qnodes[n.name]) for n in nodes], calls, cfg)
    rep.rows.sort(key=_rank_key)
    return rep


def _float_weights(fproto: onnx.ModelProto, cfg: Config) -> dict[str, np.ndarray]:
    """Float references for stored weights: the user's initializers and the BN-folded ones amq
    quantized (named <weight>_bnfold)."""
    weights = {t.name: t for t in fproto.graph.initializer}
    weights.update({t.name: t for t in prepare(fproto, cfg).model.graph.initializer})
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
    return {k: numpy_helper.to_array(t) for k, t in weights.items() if t.data_type in floats}


def _compare_tensors(
    pair: ModelPair, calls: Calls, count: int, cfg: Config, batch_size: int, show_progress: bool
) -> CompareReport:
    """The rows of one graph's own Q/DQ tensors (not those inside its bodies)."""
    fproto, qproto = pair.float_model, pair.quant_model
    targets, notes = match(fproto, qproto, _float_weights(fproto, cfg))
    acc = Comparison(targets)
    inputs = {i.name for i in fproto.graph.input}
    fnames = [n for n in acc.float_names() if n not in inputs]
    qnames = [n for n in acc.quant_names() if n not in inputs]
    fsrc, qsrc = pair.float_source, pair.quant_source
    fsess = runner.session(Exposed(fproto, fnames), source=fsrc) if fnames else None
    qsess = (  # tensors are compared on the Q/DQ math: the same on every machine
        runtime.session_for(Exposed(qproto, qnames), Execution.IDEAL, qsrc) if qnames else None
    )
    if targets:
        # each call feeds the two models their own inputs: two runs of the one batch loop, in
        # lockstep (tee holds one call at a time)
        fcalls, qcalls = itertools.tee(calls(batch_size))
        fside = runner.run_batches(fsess, fnames, ((dict(f), [], n) for f, _q, n in fcalls))
        qside = runner.run_batches(qsess, qnames, ((dict(q), [], n) for _f, q, n in qcalls))
        with report.progress(count, "comparing", show_progress) as advance:
            for fb, qb in zip(fside, qside, strict=True):
                acc.update({**fb.feeds, **fb.values}, {**qb.feeds, **qb.values}, fb.n)
                advance(fb.n)
    rep = acc.report(fsrc, qsrc)
    rep.notes = notes + rep.notes
    rep.samples = count
    return rep


NodePairs = list[tuple[onnx.NodeProto, onnx.NodeProto]]
BodyCalls = dict[tuple[str, str], list[tuple[dict, dict]]]


def _record_bodies(pair: ModelPair, nodes: NodePairs, calls: Calls) -> tuple[BodyCalls, dict]:
    """Per (node, body): the (float, quantized) outer-scope values of the calls that ran that
    body in both models (at most BRANCH_BYTES of them); per node: how many calls ran differently."""
    pairs: BodyCalls = {(n.name, a): [] for n, _q in nodes for a in subgraphs.bodies(n)}
    size = dict.fromkeys(pairs, 0)
    split = dict.fromkeys((n.name for n, _q in nodes), 0)
    ones = list(calls(1))
    fcalls = branch_calls(pair.float_model, [n for n, _q in nodes], (f for f, _q, _n in ones))
    qcalls = branch_calls(pair.quant_model, [q for _n, q in nodes], (q for _f, q, _n in ones))
    for ftaken, qtaken in zip(fcalls, qcalls, strict=True):
        for name, (attr, fbody) in ftaken.items():
            qattr, qbody = qtaken[name]
            if qattr != attr or len(qbody) != len(fbody):
                split[name] += 1
                continue
            for fvalues, qvalues in zip(fbody, qbody, strict=True):
                if size[(name, attr)] < BRANCH_BYTES:
                    pairs[(name, attr)].append((fvalues, qvalues))
                    size[(name, attr)] += sum(v.nbytes for v in fvalues.values())
    return pairs, split


def _compare_bodies(
    rep: CompareReport, pair: ModelPair, nodes: NodePairs, calls: Calls, cfg: Config
) -> None:
    """Each body with Q/DQ nodes, compared as a pair of models of their own on the values both
    models' bodies read; its rows and notes are added to ``rep`` (``name@node.body`` on a clash)."""
    pairs, split = _record_bodies(pair, nodes, calls)
    seen = {r.name for r in rep.rows}
    for n, qn in nodes:
        if split[n.name]:
            rep.notes.append(
                f"{n.op_type} {n.name}: {split[n.name]} sample(s) ran differently in the two "
                "models (another branch, or another number of iterations): not compared inside"
            )
        for attr in subgraphs.bodies(n):
            got = pairs[(n.name, attr)]
            if not got or not any(m.op_type in QDQ_OPS for m in subgraphs.branch(qn, attr).node):
                continue
            fsub, fcalls_in = body_model(pair.float_model, n, attr, [f for f, _q in got])
            qsub, qcalls_in = body_model(pair.quant_model, qn, attr, [q for _f, q in got])
            got = list(zip(fcalls_in, qcalls_in, strict=True))
            where = f"{n.name}.{attr.split('_')[0]}"
            sub = compare_level(
                ModelPair(
                    fsub, qsub, f"{pair.float_source} ({where})", f"{pair.quant_source} ({where})"
                ),
                lambda _bs, got=got: ((f, q, 1) for f, q in got),
                len(got),
                cfg,
                batch_size=1,
            )
            for r in sub.rows:
                if r.name in seen:
                    r.name = f"{r.name}@{where}"
                seen.add(r.name)
                rep.rows.append(r)
            rep.notes += [f"{where}: {x}" for x in sub.notes]
