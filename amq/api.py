"""The Python API, a facade: one short function per verb, each resolving its settings and calling
one workflow. quantize and search are defined here; evaluate (analysis/evaluate.py), check,
bitops_of, sensitivity, compare (analysis/) and qat_handoff (qat/handoff.py) are re-exported.
The CLI is a thin layer over these functions."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from amq import report
from amq.analysis import sensitivity_report
from amq.analysis.bitops import bitops_of as bitops_of  # the verbs of the facade ...
from amq.analysis.check import check as check
from amq.analysis.compare import CompareReport
from amq.analysis.compare import files as compare_files
from amq.analysis.compare.run import compare as compare
from amq.analysis.evaluate import EvalResult as EvalResult
from amq.analysis.evaluate import evaluate as evaluate
from amq.analysis.sensitivity import SensitivityReport, raise_top_to_int16
from amq.analysis.sensitivity import sensitivity as sensitivity
from amq.analysis.summary import Summary, summarize
from amq.artifacts import output_paths, resolved_config, write_files, write_quantized
from amq.calib.data import open_data
from amq.calib.memory import budgeted
from amq.calib.prepare import DataSource, PathLike, prepare
from amq.calib.statistics import resolve_cache_dir
from amq.calib.workspace import Workspace as Workspace  # for benchmarks and tests
from amq.calib.workspace import plan_in_workspace
from amq.config import (
    Config,
    load_config,
)
from amq.errors import ConfigError
from amq.plan import QuantPlan
from amq.qat.handoff import QatResult as QatResult  # ... whose torch part loads lazily
from amq.qat.handoff import qat_handoff as qat_handoff
from amq.quant.algorithms import smoothquant
from amq.search.run import SearchResult, SearchSettings, run_search

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


@dataclass(frozen=True)
class QuantizeOptions:
    """quantize()'s settings besides the model, the data, the config and the output (its
    keywords). ``cache_dir``: True for the default cache, a path, or None/False for no cache.
    ``summary_samples``: calibration samples the summary compares float and quantized outputs
    on (None: up to 64, fewer - not under 8 - where a sample is slow; 0: no summary runs).
    ``int16_top``: raise that percentage of the layers, most sensitive first, to INT16, ranked
    by ``sensitivity_from`` (a report or its JSON file) or by a sensitivity run at 8 bits on
    ``eval_data`` (the calibration data when not given)."""

    cache_dir: PathLike | None | bool = True
    show_progress: bool = False
    summary_samples: int | None = None
    int16_top: float | None = None
    sensitivity_from: SensitivityReport | PathLike | None = None
    eval_data: DataSource | None = None


@budgeted
def quantize(
    model: PathLike | onnx.ModelProto,
    calib: DataSource,
    config: Config | PathLike | None = None,
    output: PathLike | None = None,
    **options: Any,
) -> QuantizeResult:
    """Post-training quantization: calibrate on ``calib``, write a QDQ model (to ``output`` when
    given, with ``<name>.amq.yaml`` and ``<name>.qparams.json`` beside it) and return the plan and
    a summary. ``options``: the fields of QuantizeOptions (cache_dir, show_progress,
    summary_samples, int16_top, sensitivity_from, eval_data)."""
    o = QuantizeOptions(**options)
    cfg = config if isinstance(config, Config) else load_config(config)
    notes: list[str] = []
    if o.int16_top is not None:
        if not 0 < o.int16_top <= 100:
            raise ConfigError(f"--int16-top {o.int16_top:g}%: give a percentage in (0, 100]")
        cfg, raised = raise_top_to_int16(
            model, calib, cfg, o.int16_top, o.sensitivity_from, o.eval_data, o.cache_dir,
            o.show_progress,
        )  # fmt: skip
        if raised:
            notes.append(
                f"raised to INT16 (top {o.int16_top:g}% by sensitivity): {', '.join(raised)}"
            )
    out_path = Path(output) if output is not None else None
    if out_path is not None:
        report.check_writable(out_path)
    prepared = [prepare(model, cfg)]  # handed over, not kept: the workspace replaces the model
    data = open_data(calib, prepared[0].specs, cfg).subset(
        cfg.calibration.num_samples, cfg.calibration.seed
    )
    ws, plan, warnings = plan_in_workspace(
        prepared.pop(), cfg, data, resolve_cache_dir(o.cache_dir), o.show_progress,
        o.summary_samples,
    )  # fmt: skip
    qmodel = ws.emit(plan)
    sq_notes = smoothquant.notes(ws.smoothing)
    summary, runtime_notes = summarize(
        ws, plan, qmodel, data, ws.summary_samples(), notes + sq_notes
    )
    flat = plan.flat()
    resolved = resolved_config(cfg, flat)
    result = QuantizeResult(qmodel, flat, resolved, summary, warnings + runtime_notes)
    if out_path is not None:
        cfg_name = output_paths(out_path)[0].name
        header = (
            f"# amq resolved config for {ws.prep.source}: every layer with its effective settings.\n"
            f"# Edit a line and run: amq quantize {ws.prep.source} --calib DATA -c {cfg_name}\n"
        ) + "".join(f"# {n}\n" for n in sq_notes)
        out_path, cfg_path, qp_path = write_quantized(qmodel, flat, resolved, out_path, header)
        result.model_path, result.config_path, result.qparams_path = out_path, cfg_path, qp_path
    return result


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
# Baselines for benchmarks


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


# ---------------------------------------------------------------------------------------------
# Reports


def save_report(
    rep: SensitivityReport | CompareReport,
    out: PathLike | None = None,
    top: int = 20,
    paths: Mapping[str, PathLike] | None = None,
) -> list[Path]:
    """Write a sensitivity or compare report: into the folder ``out`` its rows (CSV), the report
    (JSON) and the HTML page, whose charts show the ``top`` worst layers or tensors
    (``out``/sensitivity.csv, ... or ``out``/compare.csv, ...); ``paths``: some of those files
    to given paths instead, by name (e.g. {"compare.html": "page.html"}). Returns the paths."""
    files = (
        sensitivity_report.files(rep, top)
        if isinstance(rep, SensitivityReport)
        else compare_files(rep, top)
    )
    written = write_files(out, files) if out is not None else []
    for name, path in (paths or {}).items():
        written.append(report.atomic_write(path, files[name]))
    return written
