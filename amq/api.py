"""The Python API. The CLI is a thin layer over these functions."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from amq import report, runtime
from amq.analysis.bitops import bitops
from amq.analysis.bitops import bitops_of as bitops_of  # the verbs of the facade ...
from amq.analysis.check import check as check
from amq.analysis.compare import CompareReport
from amq.analysis.evaluate import EvalResult as EvalResult
from amq.analysis.evaluate import evaluate as evaluate
from amq.analysis.fidelity import output_fidelity
from amq.analysis.sensitivity import SensitivityReport, raise_top_to_int16
from amq.analysis.sensitivity import sensitivity as sensitivity
from amq.analysis.summary import (
    SUMMARY_SAMPLES,
    Summary,
    fidelity,
    fidelity_dict,
    kernel_counts,
    model_size,
    runtime_warnings,
    saturating_layers,
)
from amq.artifacts import output_paths, resolved_config, write_quantized
from amq.calib import runner
from amq.calib.bodies import BRANCH_BYTES, body_model, branch_calls
from amq.calib.data import batches, input_specs, open_data
from amq.calib.prepare import DataSource, PathLike, prepare
from amq.calib.workspace import Workspace as Workspace  # for benchmarks and tests
from amq.calib.workspace import (
    plan_in_workspace,
    resolve_cache_dir,
)
from amq.config import (
    Config,
    load_config,
)
from amq.errors import ConfigError, ModelError
from amq.graph import subgraphs
from amq.graph.edit import expose_outputs
from amq.graph.model import (
    QDQ_OPS,
    Graph,
    iter_all_nodes,
    load_model,
    opset_version,
)
from amq.plan import QuantPlan
from amq.qat.handoff import QatResult as QatResult  # ... whose torch part loads lazily
from amq.qat.handoff import qat_handoff as qat_handoff
from amq.runtime import Execution
from amq.search.run import SearchResult, SearchSettings, run_search

# ---------------------------------------------------------------------------------------------
# Preparing a model


# ---------------------------------------------------------------------------------------------
# Calibration


# ---------------------------------------------------------------------------------------------
# Quantize


@dataclass
class QuantizeResult:
    model: onnx.ModelProto
    plan: QuantPlan
    config: Config
    summary: Summary
    warnings: list[str]
    model_path: Path | None = None
    config_path: Path | None = None
    qparams_path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": str(self.model_path) if self.model_path else None,
            "config": str(self.config_path) if self.config_path else None,
            "qparams": str(self.qparams_path) if self.qparams_path else None,
            "warnings": self.warnings,
            "summary": self.summary.to_dict(),
            "layers": {
                n: {
                    "op_type": lp.op_type,
                    "quantized": lp.quantized,
                    "weight_bits": lp.weight_bits if lp.quantized else None,
                    "act_bits": lp.act_bits if lp.quantized else None,
                    "reason": lp.reason,
                }
                for n, lp in self.plan.layers.items()
            },
        }


def quantize(
    model: PathLike | onnx.ModelProto,
    calib: DataSource,
    config: Config | PathLike | None = None,
    output: PathLike | None = None,
    *,
    cache_dir: PathLike | None | bool = True,
    show_progress: bool = False,
    summary_samples: int | None = SUMMARY_SAMPLES,
    int16_top: float | None = None,
    sensitivity_from: SensitivityReport | PathLike | None = None,
    eval_data: DataSource | None = None,
) -> QuantizeResult:
    """Post-training quantization: calibrate on ``calib``, write a QDQ model (to ``output`` when
    given, with ``<name>.amq.yaml`` and ``<name>.qparams.json`` beside it) and return the plan and
    a summary. ``cache_dir``: True for the default cache, a path, or None/False for no cache.
    ``int16_top``: raise that percentage of the layers, most sensitive first, to INT16, ranked by
    ``sensitivity_from`` (a report or its JSON file) or by a sensitivity run at 8 bits on
    ``eval_data`` (the calibration data when not given)."""
    cfg = config if isinstance(config, Config) else load_config(config)
    raised: list[str] = []
    if int16_top is not None:
        if not 0 < int16_top <= 100:
            raise ConfigError(f"--int16-top {int16_top:g}%: give a percentage in (0, 100]")
        cfg, raised = raise_top_to_int16(
            model, calib, cfg, int16_top, sensitivity_from, eval_data, cache_dir, show_progress
        )
    out_path = Path(output) if output is not None else None
    if out_path is not None:
        report.check_writable(out_path)
    cdir = resolve_cache_dir(cache_dir)
    prep = prepare(model, cfg)
    specs = prep.specs
    data = open_data(calib, specs, cfg).subset(cfg.calibration.num_samples, cfg.calibration.seed)
    ws, plan, warnings = plan_in_workspace(
        prep, cfg, data, cdir, show_progress, summary_samples or 0
    )
    prep, hit = ws.prep, ws.cache_hit
    qmodel = ws.emit(plan)
    branch_notes = ws.branch_notes(plan)
    main_plan, plan = plan, plan.flat()
    with tempfile.TemporaryDirectory(prefix="amq-") as tmp:
        opt = os.path.join(tmp, "optimized.onnx")
        fid = fidelity(
            prep.model,
            qmodel,
            data,
            specs,
            cfg.calibration.batch_size,
            summary_samples,
            opt,
            reference=ws.reference_outputs,
        )
        ints, floats = (
            kernel_counts(onnx.load(opt, load_external_data=False))
            if os.path.exists(opt)
            else ({}, {})
        )
    bo = bitops(plan)
    summary = Summary(
        layers_quantized=sum(lp.quantized for lp in plan.layers.values()),
        layers_float=sum(not lp.quantized for lp in plan.layers.values()),
        float_ops=dict(plan.float_ops),
        float_tensors=dict(plan.float_tensors),
        size_float=model_size(prep.model),
        size_quant=model_size(qmodel),
        bitops=bo,
        fidelity=fidelity_dict(fid.ideal),
        fidelity_runtime=fidelity_dict(fid.runtime),
        isa=runtime.cpu_isa().describe(),
        guarded={
            lp.name: lp.overflow_note or "overflow: guard in the config"
            for lp in plan.layers.values()
            if lp.overflow == "guard"
        },
        samples=fid.samples,
        calibration_samples=len(data),
        cache_hit=hit,
        notes=prep.notes
        + plan.notes
        + branch_notes
        + (
            [f"raised to INT16 (top {int16_top:g}% by sensitivity): {', '.join(raised)}"]
            if raised
            else []
        ),
        opset=opset_version(qmodel),
        integer_kernels=ints,
        float_compute=floats,
    )
    warnings += runtime_warnings(summary, lambda: saturating_layers(ws, main_plan))
    resolved = resolved_config(cfg, plan)
    result = QuantizeResult(qmodel, plan, resolved, summary, warnings)
    if out_path is not None:
        cfg_name = output_paths(out_path)[0].name
        header = (
            f"# amq resolved config for {prep.source}: every layer with its effective settings.\n"
            f"# Edit a line and run: amq quantize {prep.source} --calib DATA -c {cfg_name}\n"
        )
        out_path, cfg_path, qp_path = write_quantized(qmodel, plan, resolved, out_path, header)
        result.model_path, result.config_path, result.qparams_path = out_path, cfg_path, qp_path
    return result


# ---------------------------------------------------------------------------------------------
# Evaluate


# ---------------------------------------------------------------------------------------------
# Bitops (no calibration: shapes from one probe run)


# ---------------------------------------------------------------------------------------------
# Check


# ---------------------------------------------------------------------------------------------
# Sensitivity


# ---------------------------------------------------------------------------------------------
# Compare (layer by layer: float model vs its QDQ model)


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

    rep = _compare_level(
        fproto, qproto, calls, len(ds), cfg, batch_size, show_progress, (fsrc, qsrc)
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


def _compare_level(
    fproto: onnx.ModelProto,
    qproto: onnx.ModelProto,
    calls: Calls,
    count: int,
    cfg: Config,
    batch_size: int,
    show_progress: bool,
    sources: tuple[str, str],
) -> CompareReport:
    """compare() for one graph: its own Q/DQ tensors, streamed over ``calls(batch_size)`` (feeds
    of the float model, of the quantized one, samples), then the branches of its If nodes, each
    compared as a pair of models of their own on the outer-scope values each model's branch
    reads on the calls that take the same branch in both (so errors from upstream count)."""

    from amq.analysis import compare as C

    # float references for stored weights: the user's initializers and the BN-folded ones amq
    # quantized (named <weight>_bnfold)
    weights = {t.name: t for t in fproto.graph.initializer}
    weights.update({t.name: t for t in prepare(fproto, cfg).model.graph.initializer})
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
    float_weights = {
        k: numpy_helper.to_array(t) for k, t in weights.items() if t.data_type in floats
    }
    targets, notes = C.match(fproto, qproto, float_weights)
    acc = C.Comparison(targets)
    inputs = {i.name for i in fproto.graph.input}
    fnames = [n for n in acc.float_names() if n not in inputs]
    qnames_run = [n for n in acc.quant_names() if n not in inputs]
    fsrc, qsrc = sources
    fsess = runner.session(expose_outputs(fproto, fnames), source=fsrc) if fnames else None
    qsess = (  # tensors are compared on the Q/DQ math: the same on every machine
        runtime.session_for(expose_outputs(qproto, qnames_run), Execution.IDEAL, qsrc)
        if qnames_run
        else None
    )
    if targets:
        with report.progress(count, "comparing", show_progress) as advance:
            for ffeeds, qfeeds, n in calls(batch_size):
                fvals: dict[str, np.ndarray] = dict(ffeeds)
                qvals: dict[str, np.ndarray] = dict(qfeeds)
                if fsess is not None:
                    fvals.update(zip(fnames, fsess.run(fnames, dict(ffeeds)), strict=True))
                if qsess is not None:
                    qvals.update(zip(qnames_run, qsess.run(qnames_run, dict(qfeeds)), strict=True))
                acc.update(fvals, qvals, n)
                del fvals, qvals
                advance(n)
    rep = acc.report(fsrc, qsrc)
    rep.notes = notes + rep.notes
    rep.samples = count
    qnodes = {n.name: n for n in qproto.graph.node if subgraphs.bodies(n)}
    nodes = [
        n
        for n in fproto.graph.node
        if subgraphs.bodies(n)
        and n.name in qnodes
        and any(
            m.op_type in QDQ_OPS
            for a in subgraphs.bodies(n)
            for m in iter_all_nodes(subgraphs.branch(qnodes[n.name], a))
        )
    ]
    if not nodes:
        return rep
    pairs: dict[tuple[str, str], list[tuple[dict, dict]]] = {
        (n.name, a): [] for n in nodes for a in subgraphs.bodies(n)
    }
    size = dict.fromkeys(pairs, 0)
    split = dict.fromkeys((n.name for n in nodes), 0)
    ones = list(calls(1))
    fcalls = branch_calls(fproto, nodes, (f for f, _q, _n in ones))
    qcalls = branch_calls(qproto, [qnodes[n.name] for n in nodes], (q for _f, q, _n in ones))
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
    del ones
    seen = {r.name for r in rep.rows}
    for n in nodes:
        if split[n.name]:
            rep.notes.append(
                f"{n.op_type} {n.name}: {split[n.name]} sample(s) ran differently in the two "
                "models (another branch, or another number of iterations): not compared inside"
            )
        for attr in subgraphs.bodies(n):
            got = pairs[(n.name, attr)]
            qbranch = subgraphs.branch(qnodes[n.name], attr)
            if not got or not any(m.op_type in QDQ_OPS for m in qbranch.node):
                continue
            fsub, fcalls_in = body_model(fproto, n, attr, [f for f, _q in got])
            qsub, qcalls_in = body_model(qproto, qnodes[n.name], attr, [q for _f, q in got])
            got = list(zip(fcalls_in, qcalls_in, strict=True))
            where = f"{n.name}.{attr.split('_')[0]}"
            sub = _compare_level(
                fsub,
                qsub,
                lambda _bs, got=got: ((f, q, 1) for f, q in got),
                len(got),
                cfg,
                1,
                False,
                (f"{fsrc} ({where})", f"{qsrc} ({where})"),
            )
            for r in sub.rows:
                if r.name in seen:
                    r.name = f"{r.name}@{where}"
                seen.add(r.name)
                rep.rows.append(r)
            rep.notes += [f"{where}: {x}" for x in sub.notes]
    rep.rows.sort(key=C._rank_key)
    return rep


# ---------------------------------------------------------------------------------------------
# Mixed-precision search


def search(
    model: PathLike | onnx.ModelProto,
    calib: DataSource,
    eval_data: DataSource,
    budget: str | float,
    out_dir: PathLike,
    config: Config | PathLike | None = None,
    show_progress: bool = False,
    **options: Any,
) -> SearchResult:
    """The cheapest per-layer bit assignment whose metric drop stays within ``budget``; the best
    config, model and report are written to ``out_dir`` whenever a better one is found.
    ``options``: the other fields of amq.search.run.SearchSettings (metric, weight_bits,
    n_trials, storage, workers, ...), and ``worker=True`` to join a running study."""
    worker = bool(options.pop("worker", False))
    settings = SearchSettings(model, calib, eval_data, budget, out_dir, config, **options)
    return run_search(settings, show_progress, worker)


# ---------------------------------------------------------------------------------------------
# QAT handoff (DESIGN.md §10; torch is imported by amq.qat, only when this runs)


def evaluate_config(
    model: PathLike | onnx.ModelProto,
    calib: DataSource,
    eval_data: DataSource,
    config: Config | PathLike | None = None,
    metric: str | None = None,
    samples: int | None = None,
    cache_dir: PathLike | None | bool = True,
    output: str | None = None,
    **quantize_options: Any,
) -> dict[str, Any]:
    """Quantize in memory with ``config`` and score it against the float model on ``eval_data``:
    {"value", "drop", "drop_ci95", "bitops_ratio", "metric"} (baselines for search benchmarks)."""
    res = quantize(
        model, calib, config, None, cache_dir=cache_dir, summary_samples=1, **quantize_options
    )
    prep = prepare(model, res.config)
    ev = evaluate(
        res.model, eval_data, reference=prep.model, metric=metric, output=output, limit=samples
    )
    return {
        "metric": ev.metric,
        "value": ev.value,
        "drop": ev.drop,
        "drop_ci95": ev.drop_ci,
        "bitops_ratio": res.summary.bitops.ratio_to_int8,
    }
