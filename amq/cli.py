"""Command line: parse -> config -> one API call -> render, exit code. No logic of its own."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from amq import __version__, render, report
from amq.artifacts import default_output
from amq.config import (
    ALLOWED_BITS,
    Granularity,
    Overflow,
    RangeMethod,
    Target,
    load_config,
    with_overrides,
)
from amq.errors import EXIT_GOAL_NOT_MET, EXIT_USER_ERROR, AmqError, ConfigError


def _fail(msg: str, code: int = EXIT_USER_ERROR) -> None:
    click.echo(f"amq: error: {msg}", err=True)
    sys.exit(code)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """User mistakes become one line on stderr and exit code 2 (1 when a goal is not met)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AmqError as e:
            _fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            click.echo("amq: interrupted", err=True)
            sys.exit(130)

    return wrapper


def _parse_shapes(values: tuple[str, ...]) -> dict[str, list[int]]:
    out = {}
    for v in values:
        name, sep, dims = v.rpartition(":")
        try:
            shape = [int(d) for d in dims.split(",")]
        except ValueError:
            shape = []
        if not sep or not name or not shape or any(d <= 0 for d in shape):
            raise ConfigError(
                f"--input-shape '{v}': expected NAME:D1,D2,... e.g. input:1,3,224,224"
            )
        out[name] = shape
    return out


def _parse_types(values: tuple[str, ...], shapes: dict[str, list[int]]) -> dict[str, str]:
    out = {}
    allowed = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")
    for v in values:
        name, sep, t = v.rpartition(":")
        if not sep:  # one type for every input given a shape (AMCT style)
            name, t = "", v
        if t not in allowed:
            raise ConfigError(f"--data-types '{v}': type must be one of {', '.join(allowed)}")
        if name:
            out[name] = t
        else:
            out.update({n: t for n in shapes})
    return out


# old spellings, kept one release: the same meaning in every command (DESIGN.md §6)
DEPRECATED: dict[str, dict[str, str]] = {
    "quantize": {"--output": "--out", "--num-samples": "--samples"},
    "eval": {"--output": "--output-name"},
    "sensitivity": {"--output": "--output-name"},
    "search": {"--output": "--output-name"},
}


class AmqCommand(click.Command):
    """A command that still takes its deprecated option spellings, with a warning."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        old = DEPRECATED.get(self.name or "", {})
        out = []
        for a in args:
            name, eq, value = a.partition("=")
            if name in old:
                click.echo(f"amq: warning: {name} is deprecated; use {old[name]}", err=True)
                a = old[name] + eq + value
            out.append(a)
        return super().parse_args(ctx, out)


class AmqGroup(click.Group):
    command_class = AmqCommand


@click.group(
    cls=AmqGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="amq")
def cli() -> None:
    """amq: post-training quantization of ONNX models (INT4 / INT8 / INT16, QDQ).

    \b
    Example:
      amq quantize model.onnx --calib calib_data/ -o model.q.onnx
    """


# options shared by several commands (each use makes its own click Option)
json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print machine-readable results."
)
no_cache_option = click.option(
    "--no-cache", is_flag=True, help="Do not read or write cached statistics."
)


def quiet_option(help_text: str = "No progress bar or tables."):
    return click.option("-q", "--quiet", is_flag=True, help=help_text)


BITS = click.Choice([str(b) for b in ALLOWED_BITS])
FILE = click.Path(dir_okay=False, path_type=Path)
DIR = click.Path(file_okay=False, path_type=Path)


def config_option(help_text: str = "YAML config."):
    return click.option("-c", "--config", "config_path", type=FILE, help=help_text)


def top_option(help_text: str):
    return click.option(
        "--top", type=click.IntRange(min=1), default=20, show_default=True, help=help_text
    )


weight_bits_option = click.option("--weight-bits", type=BITS, help="Weight bits for every layer.")
act_bits_option = click.option("--act-bits", type=BITS, help="Activation bits for every layer.")
per_tensor_option = click.option(
    "--per-tensor",
    is_flag=True,
    default=None,
    help="Per-tensor weight scales (default per channel).",
)
runtime_option = click.option(
    "--runtime",
    "on_runtime",
    is_flag=True,
    help="Evaluate on this CPU's onnxruntime integer kernels instead of the Q/DQ math (the "
    "default, which ranks the same on every machine).",
)
overflow_option = click.option(
    "--overflow",
    type=click.Choice([o.value for o in Overflow]),
    help="int16 pair-sum saturation on x86 without VNNI: auto (emulate on the calibration data "
    "and widen the weight scales of the layers that would saturate, only where a weight pair "
    "needs it), guard (every Conv/Gemm/MatMul), "
    "off [auto].",
)
method_option = click.option(
    "--method", type=click.Choice([m.value for m in RangeMethod]), help="Activation range method."
)


def _given(**fields: Any) -> dict[str, Any] | None:
    """The options given on the command line (None: not given) as a config section, or None."""
    return {k: v for k, v in fields.items() if v is not None} or None


def _weights(
    weight_bits: str | None, per_tensor: bool | None, overflow: str | None = None
) -> dict[str, Any] | None:
    return _given(
        bits=int(weight_bits) if weight_bits else None,
        granularity=Granularity.PER_TENSOR.value if per_tensor else None,
        overflow=overflow,
    )


output_name_option = click.option(
    "--output-name", "output_name", help="Model output to score [the first]."
)


@cli.command()
@click.argument("model", type=FILE)
@click.option(
    "--calib",
    "calib",
    required=True,
    help="Calibration data: folder (.npy/.npz/.bin/images) or module:function.",
)
@config_option()
@click.option(
    "-o",
    "--out",
    "output",
    type=FILE,
    help="Output model [MODEL.q.onnx].",
)
@click.option(
    "--target",
    type=click.Choice([t.value for t in Target]),
    help="Runtime preset (trt: signed symmetric INT8 activations).",
)
@method_option
@click.option("--percentile", type=float, help="Percentile for --method percentile [99.99].")
@weight_bits_option
@act_bits_option
@per_tensor_option
@overflow_option
@click.option(
    "--symmetric", is_flag=True, default=None, help="Symmetric activations (signed, zero point 0)."
)
@click.option(
    "--samples", "num_samples", type=click.IntRange(min=1), help="Calibration samples to use [256]."
)
@click.option("--batch-size", type=click.IntRange(min=1), help="Samples per calibration call [16].")
@click.option(
    "--quantize-outputs", is_flag=True, default=None, help="Also quantize the model's own outputs."
)
@click.option(
    "--input-shape", multiple=True, help="Raw .bin data: NAME:D1,D2,... (repeat per input)."
)
@click.option(
    "--data-types", multiple=True, help="Raw .bin data: TYPE or NAME:TYPE (default: the model's)."
)
@click.option("--int16-top", help="Raise the K% most sensitive layers to INT16, e.g. 10%.")
@click.option(
    "--sensitivity",
    "sensitivity_file",
    type=FILE,
    help="Ranking for --int16-top: a JSON from amq sensitivity -o (else computed now).",
)
@click.option(
    "--eval",
    "eval_data",
    help="Data for the on-the-spot sensitivity of --int16-top [the calibration data].",
)
@click.option(
    "--cache-dir",
    type=DIR,
    help="Statistics cache [~/.cache/amq].",
)
@no_cache_option
@json_option
@quiet_option("No progress bar or tables.")
@handle_errors
def quantize(
    model: Path,
    calib: str,
    config_path: Path | None,
    output: Path | None,
    target: str | None,
    method: str | None,
    percentile: float | None,
    weight_bits: str | None,
    act_bits: str | None,
    per_tensor: bool | None,
    overflow: str | None,
    symmetric: bool | None,
    num_samples: int | None,
    batch_size: int | None,
    quantize_outputs: bool | None,
    input_shape: tuple[str, ...],
    data_types: tuple[str, ...],
    int16_top: str | None,
    sensitivity_file: Path | None,
    eval_data: str | None,
    cache_dir: Path | None,
    no_cache: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Calibrate MODEL on --calib data and write a QDQ model, its resolved YAML config
    (OUT.amq.yaml) and its quantization parameters (OUT.qparams.json).

    \b
    Examples:
      amq quantize examples/digits_cnn.onnx --calib calib_data/ -o digits.q.onnx
      amq quantize model.onnx --calib data/ -c configs/w4a8.yaml --method mse
      amq quantize model.onnx --calib bins/ --input-shape input:1,3,224,224 --data-types float32
      amq quantize model.onnx --calib c/ --int16-top 10% --sensitivity sens.json
    """
    from amq import api

    cfg = load_config(config_path)
    shapes = _parse_shapes(input_shape)
    types = _parse_types(data_types, shapes)
    if target == "trt" and symmetric is None and cfg.target != Target.TRT:
        symmetric = True
    cfg = with_overrides(
        cfg,
        target=Target(target) if target else None,
        calibration=_given(
            method=method, percentile=percentile, num_samples=num_samples, batch_size=batch_size
        ),
        weights=_weights(weight_bits, per_tensor, overflow),
        activations=_given(bits=int(act_bits) if act_bits else None, symmetric=symmetric),
        quantize_outputs=quantize_outputs,
        data={"input_shapes": shapes, "data_types": types} if shapes or types else None,
    )
    out = output or default_output(model)
    cache: Any = False if no_cache else (cache_dir or True)
    top = None
    if int16_top is not None:
        try:
            if not int16_top.strip().endswith("%"):
                raise ValueError(int16_top)
            top = float(int16_top.strip()[:-1])
        except ValueError:
            raise ConfigError(f"--int16-top '{int16_top}': give a percentage such as 10%") from None
    result = api.quantize(
        model,
        calib,
        cfg,
        out,
        cache_dir=cache,
        show_progress=not quiet and not as_json,
        int16_top=top,
        sensitivity_from=sensitivity_file,
        eval_data=eval_data,
    )
    for w in result.warnings:
        click.echo(f"amq: warning: {w}", err=True)
    if as_json:
        click.echo(report.to_json(result.to_dict()))
        return
    if not quiet:
        render.render_quantize(result)


@cli.command("eval")
@click.argument("model", type=FILE)
@click.option(
    "--data", required=True, help="Evaluation data: folder or module:function (labels for top1)."
)
@click.option(
    "--reference",
    type=FILE,
    help="Float model to compare with.",
)
@click.option(
    "--metric",
    help="top1 | agreement | cosine | sqnr | neg_mse | module:function(outputs, references).",
)
@output_name_option
@config_option("YAML config (image preprocess).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option(
    "--samples", type=click.IntRange(min=1), help="Evaluate a seeded subset of this size."
)
@json_option
@quiet_option("No progress bar or table.")
@handle_errors
def eval_cmd(
    model, data, reference, metric, output_name, config_path, batch_size, samples, as_json, quiet
) -> None:
    """Score MODEL on --data: a task metric, or fidelity to a float --reference; with a reference,
    the float value, the drop and its bootstrap 95% confidence interval over the samples.

    \b
    Examples:
      amq eval digits.q.onnx --data eval_data/ --reference examples/digits_cnn.onnx
      amq eval model.q.onnx --data eval/ --reference model.onnx --metric cosine --json
      amq eval model.q.onnx --data eval/ --reference model.onnx --metric mymetrics:f1
    """
    from amq import api

    res = api.evaluate(
        model,
        data,
        reference,
        metric,
        output_name,
        config_path,
        batch_size,
        samples,
        not quiet and not as_json,
    )
    if as_json:
        click.echo(report.to_json(res.to_dict()))
        return
    if not quiet:
        render.render_eval(res, model)


@cli.command("bitops")
@click.argument("model", type=FILE)
@config_option("YAML config (bits per layer).")
@click.option("--data", help="A data folder whose first sample sets the input shapes.")
@click.option("--input-shape", multiple=True, help="NAME:D1,D2,... for inputs with unknown dims.")
@weight_bits_option
@act_bits_option
@click.option(
    "--csv",
    "csv_path",
    type=FILE,
    help="Also write the table as CSV.",
)
@json_option
@handle_errors
def bitops_cmd(
    model, config_path, data, input_shape, weight_bits, act_bits, csv_path, as_json
) -> None:
    """FLOPs (counted as 2 x MACs), parameters, weight and activation bits and bitops
    (FLOPs x activation bits x weight bits) per layer, with totals and the ratio to all-INT8.
    Float layers count as 32 x 32 bits.

    \b
    Examples:
      amq bitops examples/digits_cnn.onnx
      amq bitops model.onnx -c configs/mixed_example.yaml --csv bitops.csv
      amq bitops detector.onnx --input-shape images:1,3,640,640
    """
    from amq import api

    cfg = with_overrides(
        load_config(config_path),
        weights=_weights(weight_bits, None),
        activations=_given(bits=int(act_bits) if act_bits else None),
    )
    rep, _ = api.bitops_of(model, cfg, data, _parse_shapes(input_shape))
    rows = render.bitops_rows(rep)
    cols = render.BITOPS_COLUMNS
    if csv_path:
        report.atomic_write(csv_path, report.to_csv(cols, rows))
    if as_json:
        click.echo(
            report.to_json(
                {
                    "layers": [dict(zip(cols, r, strict=True)) for r in rows],
                    "flops": rep.flops,
                    "bitops": rep.total,
                    "bitops_int8": rep.int8_total,
                    "ratio_to_int8": rep.ratio_to_int8,
                }
            )
        )
        return
    render.render_bitops(rep, model)


@cli.command("check")
@click.argument("model", type=FILE)
@click.option(
    "--data",
    help="For a QDQ model: measure on this data how often each 8-bit layer's int16 pair sums "
    "would saturate on x86 without VNNI.",
)
@click.option("--samples", type=click.IntRange(min=1), default=64, show_default=True)
@json_option
@handle_errors
def check_cmd(model, data, samples, as_json) -> None:
    """Model check: Conv+BN, Conv+activation and MatMul+Add patterns left unfused; tensors read by
    several quantizable nodes (one range for different uses); ops amq cannot quantize; and for a
    QDQ model, float islands between quantized layers and per op type how many inputs and outputs
    are float, int4, int8 or int16.

    \b
    Examples:
      amq check examples/digits_cnn.onnx
      amq check digits.q.onnx --json
      amq check digits.q.onnx --data calib_data/   # measured int16 pair-sum saturation
    """
    from amq import api

    rep = api.check(model, data, samples)
    if as_json:
        click.echo(report.to_json(rep.to_dict()))
        return
    render.render_check(rep, model)


def _bits_list(text: str) -> list[int]:
    try:
        out = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        out = []
    if not out or any(b not in ALLOWED_BITS for b in out):
        raise ConfigError(f"--bits '{text}': a comma-separated list of 4, 8, 16")
    return out


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
@click.option(
    "--samples", type=click.IntRange(min=1), help="Evaluate a seeded subset of this size."
)
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
    "-o",
    "--out",
    "out_prefix",
    type=FILE,
    help="Write OUT.csv, OUT.json, OUT.html.",
)
@top_option("Rows per bit width in the table.")
@runtime_option
@no_cache_option
@json_option
@quiet_option("No progress bar or tables.")
@handle_errors
def sensitivity_cmd(
    model,
    calib,
    eval_data,
    config_path,
    bits,
    metric,
    output_name,
    samples,
    mode,
    layer_patterns,
    out_prefix,
    top,
    on_runtime,
    no_cache,
    as_json,
    quiet,
) -> None:
    """Per-layer sensitivity: for each layer and bit width, that layer alone quantized (the rest
    float): the metric drop against float with its bootstrap 95% CI, and the local error of the
    layer's output (cosine, MSE, SQNR). --mode leave-one-out quantizes every layer but one: which
    single layer kept in float recovers the most. Calibration statistics are reused (cached).

    \b
    Examples:
      amq sensitivity examples/digits_cnn.onnx --calib calib_data/ --eval eval_data/ -o sens
      amq sensitivity model.onnx --calib c/ --eval e/ --bits 8 --metric cosine --samples 200
      amq sensitivity model.onnx --calib c/ --eval e/ --mode leave-one-out --bits 4
    """
    from amq import api
    from amq.analysis.sensitivity import html_report

    if out_prefix:  # fail before the work, not after it
        for ext in (".csv", ".json", ".html"):
            report.check_writable(out_prefix.with_name(out_prefix.name + ext))
    rep = api.sensitivity(
        model,
        calib,
        eval_data,
        config_path,
        _bits_list(bits),
        metric,
        output_name,
        samples,
        mode.replace("-", "_"),
        layer_patterns.split(",") if layer_patterns else None,
        cache_dir=False if no_cache else True,
        show_progress=not quiet and not as_json,
        execution="runtime" if on_runtime else "ideal",
    )
    for w in rep.warnings:
        click.echo(f"amq: warning: {w}", err=True)
    cols = render.sensitivity_columns(rep)
    row = render.sensitivity_row

    if out_prefix:
        all_rows = [row(r) for b in rep.bits for r in rep.ranked(b)]
        report.atomic_write(
            out_prefix.with_name(out_prefix.name + ".csv"), report.to_csv(cols, all_rows)
        )
        report.atomic_write(out_prefix.with_name(out_prefix.name + ".json"), rep.to_json())
        report.atomic_write(out_prefix.with_name(out_prefix.name + ".html"), html_report(rep, top))
    if as_json:
        click.echo(rep.to_json())
        return
    if quiet:
        return
    render.render_sensitivity(rep, top)
    if out_prefix:
        click.echo(f"wrote {out_prefix}.csv, {out_prefix}.json, {out_prefix}.html")


@cli.command("compare")
@click.argument("float_model", type=FILE)
@click.argument("quant_model", type=FILE)
@click.option(
    "--data", required=True, help="Data to run both models on (folder or module:function)."
)
@config_option("YAML config (image preprocess, BN folding of the weight references).")
@click.option(
    "--samples", type=click.IntRange(min=1), help="Compare on a seeded subset of this size."
)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option(
    "--csv",
    "csv_path",
    type=FILE,
    help="Write every row and column as CSV (worst first).",
)
@click.option(
    "--html",
    "html_path",
    type=FILE,
    help="Write a self-contained HTML report (SQNR chart and the full table).",
)
@top_option("Rows in the terminal table and the HTML chart.")
@json_option
@quiet_option("No progress bar or tables.")
@handle_errors
def compare_cmd(
    float_model,
    quant_model,
    data,
    config_path,
    samples,
    batch_size,
    csv_path,
    html_path,
    top,
    as_json,
    quiet,
) -> None:
    """Layer-by-layer error of QUANT (a QDQ model) against FLOAT on --data. Per quantized tensor,
    matched by name through the Q/DQ nodes: type, scale, SQNR, cosine, MSE, L1, KL, max |diff|,
    float vs quantized min/max/mean/var, the fraction of values clipped and how far beyond the
    grid (in units of scale), and a diagnosis of the tensor's own quantizer: clipping (the range
    is too narrow) or rounding (the step is too coarse for the distribution), with a suggested
    fix. Weights are compared with their float initializers. Rows worst first (lowest SQNR).

    \b
    Examples:
      amq compare examples/digits_cnn.onnx digits.q.onnx --data eval_data/
      amq compare model.onnx model.q.onnx --data eval/ --csv cmp.csv --html cmp.html
      amq compare model.onnx model.q.onnx --data eval/ --samples 64 --json
    """
    from amq import api
    from amq.analysis.compare import COLUMNS, to_html

    for path in (csv_path, html_path):
        if path is not None:
            report.check_writable(path)
    rep = api.compare(
        float_model,
        quant_model,
        data,
        config_path,
        batch_size,
        samples,
        show_progress=not quiet and not as_json,
    )
    written = []
    if csv_path:
        report.atomic_write(csv_path, report.to_csv(COLUMNS, rep.table_rows()))
        written.append(str(csv_path))
    if html_path:
        report.atomic_write(html_path, to_html(rep, top))
        written.append(str(html_path))
    if as_json:
        click.echo(report.to_json(rep.to_dict()))
        return
    if quiet:
        return

    render.render_compare(rep, top)
    if written:
        click.echo(f"wrote {', '.join(written)}")


def _choices(text: str, allowed: tuple, what: str) -> list:
    out = []
    for tok in text.split(","):
        tok = tok.strip()
        if not tok:
            continue
        v = tok if tok == "float" else (int(tok) if tok.isdigit() else tok)
        if v not in allowed:
            raise ConfigError(f"{what} '{text}': choose from {', '.join(map(str, allowed))}")
        out.append(v)
    if not out:
        raise ConfigError(f"{what} '{text}': give at least one choice")
    return out


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
@click.option(
    "--samples", type=click.IntRange(min=1), help="Evaluate on a seeded subset of this size."
)
@click.option("--seed", type=int, default=0, show_default=True)
@runtime_option
@no_cache_option
@json_option
@quiet_option("No progress bar or tables.")
@handle_errors
def search_cmd(
    model,
    calib,
    eval_data,
    budget,
    out_dir,
    config_path,
    metric,
    output_name,
    weight_bits,
    act_bits,
    trials,
    timeout,
    objective,
    space,
    storage,
    study_name,
    workers,
    worker,
    resume,
    confidence,
    samples,
    seed,
    on_runtime,
    no_cache,
    as_json,
    quiet,
) -> None:
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
      amq search model.onnx ... --storage postgresql://amq@dbhost/amq --study m1 --worker  # more machines
    """
    from amq import api
    from amq.errors import GoalNotMet

    res = api.search(
        model,
        calib,
        eval_data,
        budget,
        out_dir,
        config_path,
        show_progress=not quiet and not as_json,
        metric=metric,
        output=output_name,
        weight_bits=_choices(weight_bits, (4, 8, 16, "float"), "--weight-bits"),
        act_bits=_choices(act_bits, (4, 8, 16), "--act-bits"),
        n_trials=trials,
        timeout=timeout,
        objective=objective,
        storage=storage,
        study=study_name,
        workers=workers,
        seed=seed,
        resume=resume,
        confidence=confidence,
        space=space,
        samples=samples,
        cache_dir=False if no_cache else True,
        worker=worker,
        execution="runtime" if on_runtime else "ideal",
    )
    o = res.outcome
    if as_json:
        click.echo(report.to_json(res.to_dict()))
    elif not quiet:
        render.render_search(res)
    if worker:
        return
    if o.interrupted:
        click.echo("amq: interrupted; the best so far is in the output folder", err=True)
        sys.exit(130)
    if not o.best:
        c = o.closest
        msg = f"no trial met the budget {res.budget:.4g} ({res.metric} drop)"
        if c is not None:
            msg += f"; closest: trial {c.number}, drop {c.drop:.4g} at {c.cost:.4f}x all-INT8 (written to {res.out_dir})"
        raise GoalNotMet(msg)


@cli.command("qat")
@click.argument("model", type=FILE)
@click.option("--calib", required=True, help="Calibration data: folder or module:function.")
@config_option("YAML config (bits, granularity, layers).")
@click.option(
    "-o",
    "--out",
    "out_dir",
    type=DIR,
    default=Path("amq-qat"),
    show_default=True,
    help="Output folder (the bundle).",
)
@weight_bits_option
@act_bits_option
@per_tensor_option
@method_option
@click.option(
    "--parity-samples",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Calibration samples for the torch-vs-onnxruntime parity check.",
)
@no_cache_option
@json_option
@quiet_option("No progress bar or file list.")
@handle_errors
def qat_cmd(
    model,
    calib,
    config_path,
    out_dir,
    weight_bits,
    act_bits,
    per_tensor,
    method,
    parity_samples,
    no_cache,
    as_json,
    quiet,
) -> None:
    """Hand amq's calibration over to quantization-aware training in PyTorch: writes to --out the
    resolved config, qparams.json, the float and QDQ models, a torch model of the graph with fake
    quantization initialised from amq's scales (qat_model.pt) and a README with a training loop.
    Prints how closely the torch model reproduces the QDQ model in onnxruntime (max |diff|,
    cosine). Needs PyTorch (pip install 'amq[qat]'). Train, then amq.qat.export(model, path).

    \b
    Examples:
      amq qat examples/digits_cnn.onnx -c configs/w4a8.yaml --calib calib_data/ -o qat/
      amq qat model.onnx --calib data/ --weight-bits 4 --per-tensor -o qat-w4/
      python -c "import amq.qat as q; m = q.load_handoff('qat/').torch_model(); print(m)"
    """
    from amq import api

    cfg = with_overrides(
        load_config(config_path),
        calibration=_given(method=method),
        weights=_weights(weight_bits, per_tensor),
        activations=_given(bits=int(act_bits) if act_bits else None),
    )
    res = api.qat_handoff(
        model,
        calib,
        cfg,
        out_dir,
        cache_dir=False if no_cache else True,
        show_progress=not quiet and not as_json,
        parity_samples=parity_samples,
    )
    for w in res.warnings:
        click.echo(f"amq: warning: {w}", err=True)
    if as_json:
        click.echo(report.to_json(res.to_dict()))
        if not res.parity_ok:
            sys.exit(EXIT_GOAL_NOT_MET)
        return
    if not quiet:
        render.render_qat(res)
    else:
        render.render_parity(res.parity)
    if not res.parity_ok:
        sys.exit(EXIT_GOAL_NOT_MET)


def main(argv: list[str] | None = None) -> None:
    """Entry point: click usage errors become one line and exit code 2, like every user error."""
    try:
        cli.main(args=argv, prog_name="amq", standalone_mode=False)
    except click.UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `amq` alone: the help, like --help
            click.echo(e.format_message())
            sys.exit(0)
        hint = (
            f" (see 'amq {e.ctx.info_name} --help')" if e.ctx and e.ctx.info_name != "amq" else ""
        )
        _fail(f"{e.format_message()}{hint}")
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo("amq: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
