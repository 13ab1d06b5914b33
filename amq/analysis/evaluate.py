"""The task metric of a model on a data set, with a reference: the float value, the drop and its
bootstrap CI, and the speed against the reference on this CPU (amq eval)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from amq import report, runtime
from amq.analysis import metrics as M
from amq.calib import runner
from amq.calib.data import Dataset, batches, input_specs, open_data
from amq.calib.prepare import DataSource, PathLike
from amq.config import (
    Config,
    load_config,
)
from amq.errors import DataError
from amq.graph.model import (
    Graph,
    load_model,
)

SPEED_BATCHES = 8  # eval times the first batches (at least 7 interleaved repeats, 1 s)


@dataclass
class EvalResult:
    metric: str
    output: str
    samples: int
    value: float
    value_ci: tuple[float, float]
    reference_value: float | None = None
    drop: float | None = None
    drop_ci: tuple[float, float] | None = None
    seconds: float | None = None  # in onnxruntime's run calls: fastest pass (one without reference)
    reference_seconds: float | None = None
    speed_ratio: float | None = None  # fastest reference pass / fastest model pass
    speed_range: tuple[float, float] | None = None  # their interquartile range
    timed_samples: int = 0
    timed_repeats: int = 0
    isa: str = ""  # this CPU's 8-bit kernels (runtime.cpu_isa)

    @property
    def speed(self) -> float | None:
        """The model's inference speed relative to the reference (> 1: faster); one pass each,
        on this machine: PITFALLS 8's check that quantization paid off."""
        if self.speed_ratio is not None:
            return self.speed_ratio
        if not self.seconds or self.reference_seconds is None:
            return None
        return self.reference_seconds / self.seconds

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "output": self.output,
            "samples": self.samples,
            "value": self.value,
            "value_ci95": list(self.value_ci),
            "reference_value": self.reference_value,
            "drop": self.drop,
            "drop_ci95": list(self.drop_ci) if self.drop_ci else None,
            "seconds": self.seconds,
            "reference_seconds": self.reference_seconds,
            "speed_vs_reference": self.speed,
            "speed_range": list(self.speed_range) if self.speed_range else None,
            "timed_samples": self.timed_samples,
            "isa": self.isa,
        }


FLOAT_OUTPUTS = ("tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)")


def pick_output(sess, output: str | None, source: str) -> str:
    """The output to score: ``output``, else the first float one (an int output, such as an
    attention mask a transformer export passes through, is the same in every model and would
    score every configuration as perfect), else the first."""
    outs = sess.get_outputs()
    names = [o.name for o in outs]
    if output is None:
        return next((o.name for o in outs if o.type in FLOAT_OUTPUTS), names[0])
    if output not in names:
        raise DataError(f"{source}: no output named '{output}' (outputs: {', '.join(names)})")
    return output


def collect_outputs(
    model: PathLike | onnx.ModelProto,
    data: Dataset,
    output: str | None,
    batch_size: int,
    source: str,
    show_progress: bool = False,
    seconds: list[float] | None = None,
) -> tuple[str, np.ndarray, list[Any]]:
    """Run a model over a dataset; return one output stacked over samples and the labels.
    ``seconds``: the time spent in onnxruntime's run calls is appended to it."""
    sess = runner.session(model, source=source)
    name = pick_output(sess, output, source)
    specs = input_specs(
        Graph(load_model(model) if not isinstance(model, onnx.ModelProto) else model)
    )
    outs, labels = [], []
    spent: list[float] = []
    with report.progress(len(data), f"running {Path(source).name}", show_progress) as advance:
        for b in runner.run_batches(sess, [name], batches(data, specs, batch_size), None, spent):
            outs.append(np.asarray(b.values[name]))
            labels.extend(b.labels)
            advance(b.n)
    if seconds is not None:
        seconds.append(sum(spent))
    return name, np.concatenate(outs, axis=0), labels


@dataclass(frozen=True)
class EvalOptions:
    """evaluate()'s settings besides what is scored (given to it as keywords). ``limit``: a
    seeded subset of the data; ``bootstrap_rounds``: for the CIs (a user metric's at most
    metrics.USER_METRIC_ROUNDS)."""

    batch_size: int = 16
    limit: int | None = None
    show_progress: bool = False
    bootstrap_rounds: int = 1000


def evaluate(
    model: PathLike | onnx.ModelProto,
    data: DataSource,
    reference: PathLike | onnx.ModelProto | None = None,
    metric: str | None = None,
    output: str | None = None,
    config: Config | PathLike | None = None,
    **options: Any,
) -> EvalResult:
    """The task metric of ``model`` on ``data``; with a float ``reference``, the reference's value,
    the drop and its bootstrap 95% confidence interval over the samples (paired), and the speed
    against it. ``options``: the fields of EvalOptions (batch_size, limit, show_progress,
    bootstrap_rounds)."""
    opt = EvalOptions(**options)
    cfg = config if isinstance(config, Config) else load_config(config)
    src = str(model) if not isinstance(model, onnx.ModelProto) else "model"
    proto = load_model(model) if not isinstance(model, onnx.ModelProto) else model
    specs = input_specs(Graph(proto))
    ds = open_data(data, specs, cfg)
    if opt.limit is not None:
        ds = ds.subset(opt.limit, cfg.calibration.seed)
    has_labels = all(smp.label is not None for smp in ds)
    m = _metric_for(metric, has_labels, reference is not None, data)
    seconds: list[float] = []
    bs, progress = opt.batch_size, opt.show_progress
    name, out, labels = collect_outputs(proto, ds, output, bs, src, progress, seconds)
    ref_out = None
    if reference is not None:
        rsrc = str(reference) if not isinstance(reference, onnx.ModelProto) else "reference"
        _, ref_out, _ = collect_outputs(reference, ds, name, bs, rsrc, progress, seconds)
        if ref_out.shape != out.shape:
            raise DataError(
                f"{rsrc}: output '{name}' has shape {list(ref_out.shape)}, the model's is {list(out.shape)}"
            )
    res = _scores(m, out, ref_out, labels if has_labels else None, name, opt.bootstrap_rounds)
    res.isa = runtime.cpu_isa().describe()
    if reference is not None:  # speed: warm-up, then interleaved repeats on the first batches
        timed = [f for f, _l, _n in itertools.islice(batches(ds, specs, bs), SPEED_BATCHES)]
        _time_against(res, [(proto, src), (reference, "reference")], timed)
    else:
        res.seconds = seconds[0]
    return res


def _metric_for(
    metric: str | None, has_labels: bool, has_reference: bool, data: DataSource
) -> M.Metric:
    """The metric asked for (default: top1 with labels, else agreement with a reference), once
    the data and the reference it needs are there."""
    metric = metric or ("top1" if has_labels else "agreement" if has_reference else None)
    if metric is None:
        raise DataError(
            f"{data}: no labels found and no --reference given; add labels.npy or compare with --reference FLOAT"
        )
    m = M.get_metric(metric)
    if m.needs_labels and not has_labels:
        raise DataError(
            f"{data}: metric {metric} needs labels (labels.npy, labels.csv, a label key or class folders)"
        )
    if m.needs_reference and not has_reference:
        raise DataError(f"metric {metric} compares with the float model: give --reference FLOAT")
    return m


def _time_against(res: EvalResult, models: list[tuple[Any, str]], timed: list[dict]) -> None:
    """The model's speed against the reference (``models``: both with their sources) on the
    ``timed`` feeds, into ``res``."""
    sessions = [runner.session(m, source=src, arena=True) for m, src in models]  # as deployed
    t = runtime.time_sessions(sessions, timed)
    # the fastest pass of each: noise only ever adds time (a busy machine's medians of
    # millisecond passes vary 5x); the per-repeat ratios' quartiles say how noisy it was
    ratio = t[:, 1] / t[:, 0]
    res.seconds, res.reference_seconds = (float(v) for v in t.min(axis=0))
    res.speed_ratio = res.reference_seconds / res.seconds
    res.speed_range = (float(np.percentile(ratio, 25)), float(np.percentile(ratio, 75)))
    res.timed_samples = sum(int(next(iter(f.values())).shape[0]) for f in timed)
    res.timed_repeats = len(t)


def _scores(
    metric: M.Metric,
    out: np.ndarray,
    ref_out: np.ndarray | None,
    labels: list[Any] | None,
    name: str,
    bootstrap_rounds: int,
) -> EvalResult:
    """evaluate()'s numbers from the outputs: the value with its bootstrap CI; with a reference,
    the baseline (ideal, or the reference's own value) and the paired drop with its CI."""
    lab = np.asarray(labels) if labels is not None else None
    n = out.shape[0]
    rounds = M.rounds_for(metric, bootstrap_rounds)
    q = metric.scores(out, ref_out, lab)
    value = metric.value(q)
    value_ci = M.bootstrap_ci(lambda i: metric.value(q[i]), n, rounds)
    res = EvalResult(metric.name, name, n, value, value_ci)
    if ref_out is None:
        return res
    r = metric.scores(ref_out, ref_out, lab) if metric.scores_reference else None
    res.reference_value = M.baseline(metric, r)
    res.drop, res.drop_ci = M.drop_with_ci(metric, q, r, bootstrap_rounds)
    return res
