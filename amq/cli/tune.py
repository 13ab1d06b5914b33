"""The commands that look for better bits: amq sensitivity and amq search."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from amq import artifacts, render
from amq.cli.app import (
    DIR,
    FILE,
    Opts,
    cli,
    config_option,
    json_option,
    no_cache_option,
    output_name_option,
    quiet_option,
    runtime_option,
    samples_option,
    show,
    takes_opts,
    top_option,
)
from amq.cli.values import parse_bits_list
from amq.errors import GoalNotMet


@cli.command("sensitivity")
@click.argument("model", type=FILE)
@click.option("--calib", required=True, help="Calibration data (folder or module:function).")
@click.option(
    "--eval", "eval_data", required=True, help="Evaluation data (held out; labels for top1)."
)
@config_option()
@click.option(
    "--bits",
    default="4,8,16",
    show_default=True,
    help="Bit widths to try (weights; activations at max(bits, 8)).",
)
@click.option(
    "--metric",
    help="top1 | agreement | cosine | sqnr | neg_mse | module:function [top1 with labels, else sqnr].",
)
@output_name_option
@samples_option()
@click.option(
    "--mode",
    type=click.Choice(["single", "leave-one-out"]),
    default="single",
    show_default=True,
    help="One layer quantized, or all but one.",
)
@click.option(
    "--layers", "layer_patterns", help="Only these layers (comma-separated names or globs)."
)
@click.option(
    "--dynamic",
    is_flag=True,
    help="Also measure dynamic activations (W8, input quantized at run time) of MatMul/Gemm.",
)
@click.option(
    "-o",
    "--out",
    "out_dir",
    type=DIR,
    help="Write sensitivity.csv, sensitivity.json, sensitivity.html here.",
)
@top_option("Rows per bit width in the table.")
@runtime_option
@no_cache_option
@json_option
@quiet_option
@takes_opts
def sensitivity_cmd(o: Opts) -> None:
    """Per-layer sensitivity: for each layer and bit width, that layer alone quantized (the rest
    float): the metric drop against float with its bootstrap 95% CI, and the local error of the
    layer's output (cosine, MSE, SQNR). --mode leave-one-out quantizes every layer but one: which
    single layer kept in float recovers the most. Calibration statistics are reused (cached).

    \b
    Examples:
      amq sensitivity examples/digits_cnn.onnx --calib calib_data/ --eval eval_data/ -o sens/
      amq sensitivity model.onnx --calib c/ --eval e/ --bits 8 --metric cosine --samples 200
      amq sensitivity model.onnx --calib c/ --eval e/ --mode leave-one-out --bits 4
      amq sensitivity model.onnx --calib c/ --eval e/ --bits 8 --dynamic
    """
    from amq import api

    if o.out_dir is not None:  # fail before the work, not after it
        artifacts.check_folder(o.out_dir)
    rep = api.sensitivity(
        o.model,
        o.calib,
        o.eval_data,
        config=o.config_path,
        bits=parse_bits_list(o.bits, "--bits"),
        metric=o.metric,
        output=o.output_name,
        samples=o.samples,
        mode=o.mode.replace("-", "_"),
        layers=o.layer_patterns.split(",") if o.layer_patterns else None,
        cache_dir=o.cache,
        show_progress=o.show_progress,
        execution=o.execution,
        dynamic=o.dynamic,
    )
    files = api.save_report(rep, o.out_dir, o.top)
    show(o, rep, lambda: render.render_sensitivity(rep, o.top, written=files))


@cli.command("search")
@click.argument("model", type=FILE)
@click.option("--calib", required=True, help="Calibration data.")
@click.option("--eval", "eval_data", required=True, help="Evaluation data (held out).")
@click.option(
    "--budget", required=True, help="Largest accepted metric drop: 1% (relative) or 0.5 (absolute)."
)
@click.option(
    "-o",
    "--out",
    "out_dir",
    type=DIR,
    default=Path("amq-search"),
    show_default=True,
    help="Output folder.",
)
@config_option("Base YAML config.")
@click.option(
    "--metric",
    help="top1 | agreement | cosine | neg_mse | module:function [top1 with labels, else agreement].",
)
@output_name_option
@click.option(
    "--weight-bits", default="4,8,16,float", show_default=True, help="Weight choices per layer."
)
@click.option("--act-bits", default="8,16", show_default=True, help="Activation choices per layer.")
@click.option(
    "--dynamic",
    is_flag=True,
    help="Also offer dynamic activations (quantized at run time, W8) to MatMul/Gemm layers.",
)
@click.option(
    "--block-size",
    type=int,
    default=0,
    help="W4 of MatMul layers block-wise with this block (32, 64, 128; MatMulNBits) [per channel].",
)
@click.option(
    "--trials",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Trials in all (over all workers).",
)
@click.option(
    "--timeout", type=click.FloatRange(min=1), help="Stop cleanly after this many seconds."
)
@click.option(
    "--objective", type=click.Choice(["bitops", "size"]), default="bitops", show_default=True
)
@click.option(
    "--space",
    type=click.Choice(["auto", "ranking", "per_layer"]),
    default="auto",
    show_default=True,
    help="ranking: thresholds on the sensitivity ranking (large models); per_layer: a choice per layer.",
)
@click.option(
    "--storage",
    help="Optuna storage: journal:FILE, sqlite:///FILE.db or postgresql://user@host/db [memory].",
)
@click.option("--study", "study_name", help="Study name in the storage [amq-search].")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Processes on this machine sharing the study.",
)
@click.option(
    "--worker", is_flag=True, help="Join an existing study as a worker only (other machines)."
)
@click.option(
    "--resume", is_flag=True, help="Continue the study in --storage (after a kill or a timeout)."
)
@click.option(
    "--confidence",
    is_flag=True,
    help="The budget must hold for the upper end of the drop's bootstrap 95% CI.",
)
@samples_option("Evaluate on a seeded subset of this size.")
@click.option("--seed", type=int, default=0, show_default=True)
@runtime_option
@no_cache_option
@json_option
@quiet_option
@takes_opts
def search_cmd(o: Opts) -> None:
    """Mixed-precision search with Optuna: the per-layer bits with the lowest bitops (or size)
    whose metric drop stays within --budget. Calibration runs once; each trial is evaluated batch
    by batch and pruned when hopeless; the best config, model and an HTML report (Pareto front,
    bits per layer, trials) are on disk in --out as soon as they are found. Exit code 1 when no
    trial meets the budget (the closest trade-off is written).

    \b
    Examples:
      amq search examples/digits_cnn.onnx --calib calib_data/ --eval eval_data/ --budget 1% -o search/
      amq search model.onnx --calib c/ --eval e/ --budget 0.5 --storage sqlite:///s.db --resume
      amq search model.onnx --calib c/ --eval e/ --budget 1% --workers 2 --timeout 3600
      amq search model.onnx --calib c/ --eval e/ --budget 1% --dynamic --block-size 32
      amq search model.onnx ... --storage postgresql://amq@dbhost/amq --study m1 --worker  # more machines
    """
    from amq import api

    res = api.search(
        o.model,
        o.calib,
        o.eval_data,
        o.budget,
        o.out_dir,
        o.config_path,
        show_progress=o.show_progress,
        metric=o.metric,
        output=o.output_name,
        weight_bits=parse_bits_list(o.weight_bits, "--weight-bits", (4, 8, 16, "float")),
        act_bits=parse_bits_list(o.act_bits, "--act-bits"),
        n_trials=o.trials,
        timeout=o.timeout,
        objective=o.objective,
        storage=o.storage,
        study=o.study_name,
        workers=o.workers,
        seed=o.seed,
        resume=o.resume,
        confidence=o.confidence,
        space=o.space,
        samples=o.samples,
        cache_dir=o.cache,
        worker=o.worker,
        execution=o.execution,
        dynamic=o.dynamic,
        block_size=o.block_size,
    )
    show(o, res, lambda: render.render_search(res))
    if o.worker:
        return
    if res.outcome.interrupted:
        click.echo("amq: interrupted; the best so far is in the output folder", err=True)
        sys.exit(130)
    if not res.met:
        raise GoalNotMet(_not_met(res))


def _not_met(res: Any) -> str:
    msg = f"no trial met the budget {res.budget:.4g} ({res.metric} drop)"
    c = res.outcome.closest
    if c is not None:
        msg += (
            f"; closest: trial {c.number}, drop {c.drop:.4g} at {c.cost:.4f}x all-INT8 "
            f"(written to {res.out_dir})"
        )
    return msg
