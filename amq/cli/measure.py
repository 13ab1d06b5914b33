"""The commands that measure a model: amq eval, bitops, check and compare."""

from __future__ import annotations

import click

from amq import artifacts, render, report
from amq.cli.app import (
    DIR,
    FILE,
    Opts,
    act_bits_option,
    cli,
    config_of,
    config_option,
    json_option,
    output_name_option,
    quiet_option,
    samples_option,
    show,
    takes_opts,
    top_option,
    weight_bits_option,
)
from amq.cli.values import parse_input_shapes


@cli.command("eval")
@click.argument("model", type=FILE)
@click.option(
    "--data", required=True, help="Evaluation data: folder or module:function (labels for top1)."
)
@click.option("--reference", type=FILE, help="Float model to compare with.")
@click.option(
    "--metric",
    help="top1 | agreement | cosine | sqnr | neg_mse | module:function(outputs, references).",
)
@output_name_option
@config_option("YAML config (image preprocess).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@samples_option()
@json_option
@quiet_option
@takes_opts
def eval_cmd(o: Opts) -> None:
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
        o.model,
        o.data,
        reference=o.reference,
        metric=o.metric,
        output=o.output_name,
        config=o.config_path,
        batch_size=o.batch_size,
        limit=o.samples,
        show_progress=o.show_progress,
    )
    show(o, res, lambda: render.render_eval(res, o.model))


@cli.command("bitops")
@click.argument("model", type=FILE)
@config_option("YAML config (bits per layer).")
@click.option("--data", help="A data folder whose first sample sets the input shapes.")
@click.option("--input-shape", multiple=True, help="NAME:D1,D2,... for inputs with unknown dims.")
@weight_bits_option
@act_bits_option
@click.option("--csv", "csv_path", type=FILE, help="Also write the table as CSV.")
@json_option
@quiet_option
@takes_opts
def bitops_cmd(o: Opts) -> None:
    """FLOPs (counted as 2 x MACs), parameters, weight and activation bits and bitops
    (FLOPs x activation bits x weight bits) per layer, with totals and the ratio to all-INT8.
    Float layers count as 32 x 32 bits. A QDQ model is counted at the bits it holds.

    \b
    Examples:
      amq bitops examples/digits_cnn.onnx
      amq bitops model.onnx -c configs/mixed_example.yaml --csv bitops.csv
      amq bitops detector.onnx --input-shape images:1,3,640,640
    """
    from amq import api

    if o.csv_path:  # fail before the work, not after it
        report.check_writable(o.csv_path)
    shapes = parse_input_shapes(o.input_shape)
    rep, _ = api.bitops_of(o.model, config_of(o), o.data, shapes)
    cols, rows = render.BITOPS_COLUMNS, render.bitops_rows(rep)
    if o.csv_path:
        report.atomic_write(o.csv_path, report.to_csv(cols, rows))
    data = {
        "layers": [dict(zip(cols, r, strict=True)) for r in rows],
        "flops": rep.flops,
        "bitops": rep.total,
        "bitops_int8": rep.int8_total,
        "ratio_to_int8": rep.ratio_to_int8,
    }
    show(o, rep, lambda: render.render_bitops(rep, o.model), data)


@cli.command("check")
@click.argument("model", type=FILE)
@click.option(
    "--data",
    help="For a QDQ model: measure on this data how often each 8-bit layer's int16 pair sums "
    "would saturate on x86 without VNNI.",
)
@samples_option("Samples of --data to measure on.", default=64, show_default=True)
@json_option
@quiet_option
@takes_opts
def check_cmd(o: Opts) -> None:
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

    rep = api.check(o.model, o.data, o.samples)
    show(o, rep, lambda: render.render_check(rep, o.model))


@cli.command("compare")
@click.argument("float_model", type=FILE)
@click.argument("quant_model", type=FILE)
@click.option(
    "--data", required=True, help="Data to run both models on (folder or module:function)."
)
@config_option("YAML config (image preprocess, BN folding of the weight references).")
@samples_option("Compare on a seeded subset of this size.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option(
    "-o", "--out", "out_dir", type=DIR, help="Write compare.csv, compare.json, compare.html here."
)
@click.option(
    "--csv", "csv_path", type=FILE, help="Write every row and column as CSV (worst first)."
)
@click.option(
    "--html",
    "html_path",
    type=FILE,
    help="Write a self-contained HTML report (SQNR chart and the full table).",
)
@top_option("Rows in the terminal table and the HTML chart.")
@json_option
@quiet_option
@takes_opts
def compare_cmd(o: Opts) -> None:
    """Layer-by-layer error of QUANT (a QDQ model) against FLOAT on --data. Per quantized tensor,
    matched by name through the Q/DQ nodes: type, scale, SQNR, cosine, MSE, L1, KL, max |diff|,
    float vs quantized min/max/mean/var, the fraction of values clipped and how far beyond the
    grid (in units of scale), and a diagnosis of the tensor's own quantizer: clipping (the range
    is too narrow) or rounding (the step is too coarse for the distribution), with a suggested
    fix. Weights are compared with their float initializers. Rows worst first (lowest SQNR).

    \b
    Examples:
      amq compare examples/digits_cnn.onnx digits.q.onnx --data eval_data/
      amq compare model.onnx model.q.onnx --data eval/ -o cmp/   # cmp/compare.html, ...
      amq compare model.onnx model.q.onnx --data eval/ --csv cmp.csv --html report.html
      amq compare model.onnx model.q.onnx --data eval/ --samples 64 --json
    """
    from amq import api

    paths = {"compare.csv": o.csv_path, "compare.html": o.html_path}
    paths = {name: path for name, path in paths.items() if path is not None}
    if o.out_dir is not None:  # fail before the work, not after it
        artifacts.check_folder(o.out_dir)
    for path in paths.values():
        report.check_writable(path)
    rep = api.compare(
        o.float_model,
        o.quant_model,
        o.data,
        config=o.config_path,
        batch_size=o.batch_size,
        samples=o.samples,
        show_progress=o.show_progress,
    )
    files = api.save_report(rep, o.out_dir, o.top, paths)
    show(o, rep, lambda: render.render_compare(rep, o.top, written=files))
