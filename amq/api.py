"""The Python API. The CLI is a thin layer over these functions."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from amq import report, runtime
from amq.analysis.bitops import BitopsReport, bitops
from amq.analysis.check import CheckReport, check_graph
from amq.analysis.compare import CompareReport
from amq.analysis.evaluate import EvalResult as EvalResult
from amq.analysis.evaluate import evaluate as evaluate  # a verb of the facade
from amq.analysis.fidelity import RUNTIME_GAP_DB, OutputFidelity, output_fidelity
from amq.analysis.metrics import Fidelity
from amq.analysis.sensitivity import SensitivityReport, raise_top_to_int16
from amq.analysis.sensitivity import sensitivity as sensitivity  # a verb of the facade
from amq.artifacts import output_paths, resolved_config, save_model, write_quantized
from amq.calib import runner
from amq.calib.bodies import BRANCH_BYTES, body_model, branch_calls
from amq.calib.data import Dataset, InputSpec, batches, check_sample, input_specs, open_data
from amq.calib.prepare import DataSource, PathLike, copy_model, prepare
from amq.calib.workspace import (
    Workspace,
    plan_in_workspace,
    resolve_cache_dir,
)
from amq.config import (
    Config,
    load_config,
)
from amq.errors import AmqError, ConfigError, DataError, ModelError
from amq.graph import subgraphs
from amq.graph.edit import expose_outputs
from amq.graph.model import (
    QDQ_OPS,
    Graph,
    constants_to_initializers,
    infer_types,
    iter_all_graphs,
    iter_all_nodes,
    load_model,
    name_nodes,
    opset_version,
)
from amq.plan import QuantPlan
from amq.quant.planner import (
    overflow_candidates,
)
from amq.runtime import Execution
from amq.search.run import SearchResult, SearchSettings, run_search

SUMMARY_SAMPLES = 64


# ---------------------------------------------------------------------------------------------
# Preparing a model


# ---------------------------------------------------------------------------------------------
# Calibration


# ---------------------------------------------------------------------------------------------
# Quantize


@dataclass
class Summary:
    layers_quantized: int
    layers_float: int
    float_ops: dict[str, str]
    float_tensors: dict[str, str]
    size_float: int
    size_quant: int
    bitops: BitopsReport
    fidelity: dict[str, dict[str, float | None]]
    samples: int
    calibration_samples: int
    cache_hit: bool
    notes: list[str]
    opset: int
    integer_kernels: dict[str, int] = field(default_factory=dict)
    float_compute: dict[str, int] = field(default_factory=dict)
    # the same outputs on this CPU's integer kernels (``fidelity`` is the ideal Q/DQ math)
    fidelity_runtime: dict[str, dict[str, float | None]] = field(default_factory=dict)
    isa: str = ""
    guarded: dict[str, str] = field(default_factory=dict)  # layer -> why its weights are pair-safe

    def runtime_gap(self) -> dict[str, float]:
        """Outputs whose runtime SQNR is more than RUNTIME_GAP_DB below the ideal one (dB lost)."""
        out = {}
        for k, v in self.fidelity.items():
            r = self.fidelity_runtime.get(k)
            if r is None or v["sqnr_db"] is None or r["sqnr_db"] is None:
                continue
            gap = min(float(v["sqnr_db"]), 100.0) - min(float(r["sqnr_db"]), 100.0)
            if gap > RUNTIME_GAP_DB:
                out[k] = gap
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers_quantized": self.layers_quantized,
            "layers_float": self.layers_float,
            "float_ops": self.float_ops,
            "float_tensors": self.float_tensors,
            "size_float_bytes": self.size_float,
            "size_quant_bytes": self.size_quant,
            "flops": self.bitops.flops,
            "bitops": self.bitops.total,
            "bitops_int8": self.bitops.int8_total,
            "bitops_ratio_to_int8": self.bitops.ratio_to_int8,
            "fidelity": self.fidelity,
            "fidelity_samples": self.samples,
            "calibration_samples": self.calibration_samples,
            "stats_from_cache": self.cache_hit,
            "notes": self.notes,
            "opset": self.opset,
            "ort_integer_kernels": self.integer_kernels,
            "ort_float_compute": self.float_compute,
            "fidelity_runtime": self.fidelity_runtime,
            "isa": self.isa,
            "overflow_guarded": self.guarded,
            "runtime_gap_db": self.runtime_gap(),
        }


def _fidelity_dict(fid: Mapping[str, Fidelity]) -> dict[str, dict[str, float | None]]:
    return {
        k: {
            "sqnr_db": v.sqnr_db,
            "cosine": v.cosine,
            "max_abs_diff": v.max_abs,
            "top1_agreement": v.agreement,
        }
        for k, v in fid.items()
    }


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


def model_size(model: onnx.ModelProto) -> int:
    """Bytes of the weights: initializers and Constant-node tensors, those of If/Loop/Scan bodies
    included (INT4 counted at half a byte)."""
    total = 0
    tensors = [t for g in iter_all_graphs(model.graph) for t in g.initializer] + [
        a.t
        for n in iter_all_nodes(model.graph)
        if n.op_type == "Constant"
        for a in n.attribute
        if a.name == "value" and a.type == onnx.AttributeProto.TENSOR
    ]
    for t in tensors:
        n = math.prod(t.dims)
        bits = {
            onnx.TensorProto.FLOAT: 32,
            onnx.TensorProto.DOUBLE: 64,
            onnx.TensorProto.FLOAT16: 16,
            onnx.TensorProto.INT64: 64,
            onnx.TensorProto.INT32: 32,
            onnx.TensorProto.INT16: 16,
            onnx.TensorProto.UINT16: 16,
            onnx.TensorProto.INT8: 8,
            onnx.TensorProto.UINT8: 8,
            onnx.TensorProto.INT4: 4,
            onnx.TensorProto.UINT4: 4,
            onnx.TensorProto.BOOL: 8,
        }.get(t.data_type, 32)
        total += (n * bits + 7) // 8
    return total


def fidelity(
    float_model: onnx.ModelProto | PathLike,
    quant_model: onnx.ModelProto | PathLike,
    data: Dataset,
    specs: list[InputSpec],
    batch_size: int,
    limit: int | None = SUMMARY_SAMPLES,
    optimized_path: str | None = None,
    reference: list | None = None,
) -> OutputFidelity:
    """Float vs quantized outputs over the first ``limit`` samples, streamed batch by batch, for
    both executions of the quantized model (DESIGN.md §6b). ``optimized_path``: where
    onnxruntime writes the quantized model as it optimized it (to see which integer kernels it
    fused). ``reference``: the float outputs of those batches, already computed (by the
    calibration pass); else the float model runs here."""
    calls = ((f, n) for f, _l, n in batches(data.head(limit), specs, batch_size))
    return output_fidelity(float_model, quant_model, calls, reference, optimized_path)


INTEGER_KERNELS = (
    "QLinear",
    "QGemm",
    "MatMulInteger",
    "ConvInteger",
    "DynamicQuantize",
    "QAttention",
)
FLOAT_COMPUTE = (
    "Conv",
    "ConvTranspose",
    "Gemm",
    "MatMul",
    "FusedConv",
    "FusedGemm",
    "FusedMatMul",
    "LSTM",
    "GRU",
    "RNN",
)


def kernel_counts(optimized: onnx.ModelProto) -> tuple[dict[str, int], dict[str, int]]:
    """(integer kernels, float compute ops) in onnxruntime's optimized graph, If/Loop/Scan bodies
    included (PITFALLS 8)."""
    ints: dict[str, int] = {}
    floats: dict[str, int] = {}
    for n in iter_all_nodes(optimized.graph):
        if n.op_type.startswith(INTEGER_KERNELS):
            ints[n.op_type] = ints.get(n.op_type, 0) + 1
        elif n.op_type in FLOAT_COMPUTE:
            floats[n.op_type] = floats.get(n.op_type, 0) + 1
    return dict(sorted(ints.items())), dict(sorted(floats.items()))


def _runtime_warnings(summary: Summary, suspects: Callable[[], list[str]]) -> list[str]:
    """A warning per output whose runtime (this CPU's kernels) is far below the ideal math,
    naming the unguarded layers the overflow emulation finds saturating (``suspects``, called
    only when there is a gap)."""
    gaps = summary.runtime_gap()
    if not gaps:
        return []
    names = suspects()
    where = (
        f"layers that saturate int16 pair sums unguarded: {', '.join(names)} "
        "(set weights: {overflow: guard} on them)"
        if names
        else "run amq compare FLOAT QUANT to see where"
    )
    return [
        f"output '{k}': {gap:.1f} dB lower SQNR on this CPU's onnxruntime kernels "
        f"({summary.isa}) than with the Q/DQ math; {where}"
        for k, gap in gaps.items()
    ]


def _saturating(ws: Workspace, plan: QuantPlan) -> list[str]:
    """The main graph's unguarded layers whose pair sums the emulation finds saturating."""
    off = [lp for lp in overflow_candidates(plan) if lp.overflow == "off"]
    found = ws.saturation_probe().measure(plan, off) if off else {}
    return [name for name, sat in found.items() if sat.saturated]


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
        fidelity=_fidelity_dict(fid.ideal),
        fidelity_runtime=_fidelity_dict(fid.runtime),
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
    warnings += _runtime_warnings(summary, lambda: _saturating(ws, main_plan))
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


def synthetic_feeds(
    specs: list[InputSpec], shapes: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, np.ndarray]:
    """Zero inputs for a probe run: dynamic batch = 1; any other unknown dim must be given."""
    shapes = dict(shapes or {})
    feeds = {}
    for s in specs:
        if s.name in shapes:
            shape = tuple(shapes[s.name])
        elif s.shape is None or any(d is None for d in s.shape[1:]):
            raise DataError(
                f"input '{s.name}' has unknown dims {s.describe()}: give --input-shape {s.name}:1,... or --data DIR"
            )
        else:
            shape = tuple(1 if d is None else d for d in s.shape)
        feeds[s.name] = np.zeros(shape, dtype=s.dtype)
    return feeds


def bitops_of(
    model: PathLike | onnx.ModelProto,
    config: Config | PathLike | None = None,
    data: DataSource | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> tuple[BitopsReport, QuantPlan]:
    """FLOPs (2 x MACs), parameters and bitops per layer for the bits a config asks for."""
    cfg = config if isinstance(config, Config) else load_config(config)
    prep = prepare(model, cfg)
    specs = prep.specs
    if data is not None:
        feeds = check_sample(open_data(data, specs, cfg)[0], specs)
    else:
        shapes = dict(input_shapes or {}) or dict(cfg.data.input_shapes)
        feeds = synthetic_feeds(specs, shapes)
    # a Workspace over this one call, so that the layers inside the If branches it takes (and
    # its Loop bodies) count
    ws = Workspace(prep, cfg, open_data([feeds], specs, cfg), None, False)
    plan = ws.structure(cfg)
    return bitops(plan), plan


# ---------------------------------------------------------------------------------------------
# Check


def check(
    model: PathLike | onnx.ModelProto,
    data: DataSource | None = None,
    samples: int = 64,
    batch_size: int = 16,
) -> CheckReport:
    """Model check of a float or QDQ model (no data needed). For a QDQ model with ``data``, also
    the measured int16 pair-sum saturation of each 8-bit layer on its first ``samples``."""
    from amq.analysis.check import Finding, unfused_in_runtime

    proto = load_model(model) if not isinstance(model, onnx.ModelProto) else copy_model(model)
    source = str(model) if not isinstance(model, onnx.ModelProto) else "model"
    constants_to_initializers(proto)
    name_nodes(proto)
    rep = check_graph(Graph(infer_types(proto)))
    if rep.quantized_model:  # what onnxruntime makes of the Q/DQ (no data needed)
        with tempfile.TemporaryDirectory(prefix="amq-") as tmp:
            opt = os.path.join(tmp, "optimized.onnx")
            try:
                runner.session(proto, optimized_path=opt, source=source)
                optimized = onnx.load(opt, load_external_data=False)
            except (AmqError, OSError) as e:  # the runtime cannot load it: said, not raised
                rep.findings.append(Finding("float in onnxruntime", "-", f"not checked: {e}"))
            else:
                rep.findings += unfused_in_runtime(optimized, INTEGER_KERNELS)
        rep.findings += _overflow_findings(proto, data, samples, batch_size)
    return rep


def _overflow_findings(
    proto: onnx.ModelProto, data: DataSource | None, samples: int, batch_size: int
) -> list:
    """`check`'s overflow lines: the worst case from the weights, and with data the measured
    fraction of outputs that saturate (on the Q/DQ math's codes: the same on every machine)."""
    from amq.analysis import overflow_check as OC
    from amq.analysis.check import Finding
    from amq.quant.overflow import Saturation

    g = Graph(proto)
    layers = OC.pair_layers(g)
    found = [
        Finding(
            "overflow risk",
            name,
            f"{k}/{n} output channels have a weight pair that can saturate int16 on x86 without "
            "VNNI (worst case, any input)",
        )
        for name, (k, n) in OC.worst_case(layers).items()
        if k
    ]
    if data is None or not layers:
        return found
    specs = input_specs(g)
    ds = open_data(data, specs, Config()).head(samples)
    names = sorted({lp.codes for lp in layers} - {s.name for s in specs})
    sess = runtime.session_for(expose_outputs(proto, names), Execution.IDEAL, "QDQ model")
    acc = {lp.name: Saturation() for lp in layers}
    for feeds, _l, _n in batches(ds, specs, batch_size):
        codes = dict(zip(names, sess.run(names, feeds), strict=True)) if names else {}
        codes.update(feeds)
        for name, sat in OC.measure(layers, codes).items():
            acc[name].update(sat)
    return found + [
        Finding(
            "overflow measured",
            name,
            f"{100 * sat.fraction:.3g}% of outputs saturate on x86 without VNNI on {len(ds)} "
            f"samples (error {sat.sqnr_db:.1f} dB below the signal)",
        )
        for name, sat in acc.items()
        if sat.saturated
    ]


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


@dataclass
class QatResult:
    out_dir: Path
    files: dict[str, Path]
    parity: dict[str, Any]  # torch model vs the QDQ model's Q/DQ math (and the runtime apart)
    plan: QuantPlan
    config: Config
    warnings: list[str]
    notes: list[str]
    parity_ok: bool = True  # the parity with the Q/DQ math is within its tolerance

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "files": {k: str(v) for k, v in self.files.items()},
            "parity": self.parity,
            "parity_ok": self.parity_ok,
            "layers_quantized": sum(lp.quantized for lp in self.plan.layers.values()),
            "warnings": self.warnings,
            "notes": self.notes,
        }


def qat_handoff(
    model: PathLike | onnx.ModelProto,
    calib: DataSource,
    config: Config | PathLike | None = None,
    out_dir: PathLike = "amq-qat",
    cache_dir: PathLike | None | bool = True,
    show_progress: bool = False,
    parity_samples: int = 64,
) -> QatResult:
    """Calibrate like ``quantize`` and write the QAT handoff bundle to ``out_dir``: the resolved
    config, qparams.json, the prepared float and the QDQ models, a torch model of the graph with
    fake quantization initialised from amq's scales and zero points, handoff.json (BN folds, the
    source graph's names) and a README. The torch model is checked against onnxruntime on the QDQ
    model over ``parity_samples`` calibration samples (``QatResult.parity``)."""
    from amq import qat

    qat.require_torch()
    from amq.qat import bundle as qat_bundle

    cfg = config if isinstance(config, Config) else load_config(config)
    out = Path(out_dir)
    report.check_writable(out / "handoff.json")
    cdir = resolve_cache_dir(cache_dir)
    source = copy_model(model) if isinstance(model, onnx.ModelProto) else load_model(model)
    prep = prepare(source, cfg)
    prep.source = "model" if isinstance(model, onnx.ModelProto) else str(model)
    specs = prep.specs
    data = open_data(calib, specs, cfg).subset(cfg.calibration.num_samples, cfg.calibration.seed)
    ws, plan, warnings = plan_in_workspace(prep, cfg, data, cdir, show_progress)
    prep = ws.prep
    qmodel = ws.emit(plan)  # If/Loop/Scan bodies quantized as in amq quantize (torch: float)
    plan = plan.flat()
    resolved = resolved_config(cfg, plan)
    out.mkdir(parents=True, exist_ok=True)
    names = qat_bundle.FILES
    files = {
        "config": out / names["config"],
        "qparams": out / names["qparams"],
        "float_model": out / names["float_model"],
        "qdq_model": out / names["qdq_model"],
    }
    header = (
        f"# amq resolved config for {prep.source} (QAT handoff): every layer with its effective settings.\n"
        f"# Edit a line and run: amq qat {prep.source} --calib DATA -c {names['config']} -o DIR\n"
    )
    save_model(prep.model, files["float_model"])
    write_quantized(
        qmodel, plan, resolved, files["qdq_model"], header, (files["config"], files["qparams"])
    )
    par_data = data.subset(parity_samples, cfg.calibration.seed)
    feeds = (f for f, _labels, _n in batches(par_data, specs, cfg.calibration.batch_size))
    q = [lp for lp in plan.layers.values() if lp.quantized]
    wbits = sorted({lp.weight_bits for lp in q if lp.weight and lp.weight_bits})
    gran = sorted({"per channel" if lp.per_channel else "per tensor" for lp in q if lp.weight})
    summary = (
        f"weights {'/'.join(f'int{b}' for b in wbits) or '-'} {'/'.join(gran)}, activations "
        + "/".join(f"{b}-bit" for b in sorted({lp.act_bits for lp in q}))
        if q
        else "nothing quantized"
    )
    parity, more = qat_bundle.write_bundle(
        out,
        source=source,
        source_name=prep.source,
        prepared=prep.model,
        plan=plan,
        qdq=qmodel,
        parity_feeds=feeds,
        config_summary=summary,
    )
    files.update(more)
    ok = qat_bundle.parity_ok(parity)
    if not ok:
        warnings.append(
            f"parity outside its tolerance: the torch model is off the QDQ model's Q/DQ math by "
            f"max |diff| {parity['max_abs_diff']:.4g} (bound {parity['bound_max_abs_diff']:.4g}), "
            f"cosine {parity['cosine']:.6f} (bound {parity['bound_cosine']}); check the layers "
            "the handoff notes and report it"
        )
    return QatResult(out, files, parity, plan, resolved, warnings, prep.notes + plan.notes, ok)


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
