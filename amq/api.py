"""The Python API. The CLI is a thin layer over these functions."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from amq import report, runtime
from amq.analysis.bitops import bitops
from amq.analysis.bitops import bitops_of as bitops_of  # the verbs of the facade ...
from amq.analysis.check import check as check
from amq.analysis.compare.run import compare as compare
from amq.analysis.evaluate import EvalResult as EvalResult
from amq.analysis.evaluate import evaluate as evaluate
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
from amq.calib.data import open_data
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
from amq.errors import ConfigError
from amq.graph.model import (
    opset_version,
)
from amq.plan import QuantPlan
from amq.qat.handoff import QatResult as QatResult  # ... whose torch part loads lazily
from amq.qat.handoff import qat_handoff as qat_handoff
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
