"""The commands that write a quantized model: amq quantize and amq qat."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from amq import render
from amq.artifacts import default_output
from amq.cli.app import (
    DIR,
    FILE,
    Opts,
    act_bits_option,
    cli,
    config_of,
    config_option,
    json_option,
    method_option,
    no_cache_option,
    overflow_option,
    per_tensor_option,
    quiet_option,
    show,
    takes_opts,
    weight_bits_option,
)
from amq.cli.values import parse_data_types, parse_input_shapes, parse_percent
from amq.config import Target
from amq.errors import EXIT_GOAL_NOT_MET


@cli.command()
@click.argument("model", type=FILE)
@click.option(
    "--calib",
    "calib",
    required=True,
    help="Calibration data: folder (.npy/.npz/.bin/images) or module:function.",
)
@config_option()
@click.option("-o", "--out", "output", type=FILE, help="Output model [MODEL.q.onnx].")
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
    "--no-summary",
    is_flag=True,
    default=False,
    help="Skip the summary's float-vs-quantized runs (scripted use; the model written is the same).",
)
@click.option(
    "--summary-samples",
    type=click.IntRange(min=1),
    help="Calibration samples the summary compares on [up to 64, fewer where a sample is slow].",
)
@click.option("--cache-dir", type=DIR, help="Statistics cache [~/.cache/amq].")
@no_cache_option
@json_option
@quiet_option
@takes_opts
def quantize(o: Opts) -> None:
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

    shapes = parse_input_shapes(o.input_shape)
    types = parse_data_types(o.data_types, shapes)
    data = {"input_shapes": shapes, "data_types": types} if shapes or types else None
    result = api.quantize(
        o.model,
        o.calib,
        config_of(o, data=data),
        o.output or default_output(o.model),
        cache_dir=o.cache,
        show_progress=o.show_progress,
        int16_top=None if o.int16_top is None else parse_percent(o.int16_top, "--int16-top"),
        sensitivity_from=o.sensitivity_file,
        eval_data=o.eval_data,
        summary_samples=0 if o.no_summary else o.summary_samples,
    )
    show(o, result, lambda: render.render_quantize(result))


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
@quiet_option
@takes_opts
def qat_cmd(o: Opts) -> None:
    """Hand amq's calibration over to quantization-aware training in PyTorch: writes to --out the
    resolved config, qparams.json, the float and QDQ models, a torch model of the graph with fake
    quantization initialised from amq's scales (qat_model.pt) and a README with a training loop.
    Prints how closely the torch model reproduces the QDQ model in onnxruntime (max |diff|,
    cosine); exit code 1 when that parity is outside its tolerance. Needs PyTorch
    (pip install 'amq[qat]'). Train, then amq.qat.export(model, path).

    \b
    Examples:
      amq qat examples/digits_cnn.onnx -c configs/w4a8.yaml --calib calib_data/ -o qat/
      amq qat model.onnx --calib data/ --weight-bits 4 --per-tensor -o qat-w4/
      python -c "import amq.qat as q; m = q.load_handoff('qat/').torch_model(); print(m)"
    """
    from amq import api

    res = api.qat_handoff(
        o.model,
        o.calib,
        config_of(o),
        o.out_dir,
        cache_dir=o.cache,
        show_progress=o.show_progress,
        parity_samples=o.parity_samples,
    )
    show(o, res, lambda: render.render_qat(res))
    if not res.parity_ok:
        sys.exit(EXIT_GOAL_NOT_MET)
