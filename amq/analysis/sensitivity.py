"""Per-layer sensitivity: the metric drop when one layer alone is quantized (or when all but one
are), plus the local error of that layer's output, measured in the same run through a float
"shadow" copy of the layer."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from amq.analysis import metrics as M
from amq.graph.edit import expose_outputs
from amq.graph.model import Graph, NameScope, all_names

SENSITIVITY_VERSION = 1


@dataclass
class LayerSensitivity:
    layer: str
    op_type: str
    weight_bits: int | None
    act_bits: int
    mode: str  # single | leave_one_out
    bits: int  # the bit width of the sweep (weights at bits, activations at max(bits, 8))
    value: float
    drop: float | None
    drop_ci: tuple[float, float] | None
    local_cosine: float | None = None
    local_mse: float | None = None
    local_sqnr_db: float | None = None
    flops: int = 0

    @property
    def loss(self) -> float:
        """What ranking sorts on: the drop where it is defined, else minus the value."""
        return self.drop if self.drop is not None else -self.value


@dataclass
class SensitivityReport:
    metric: str
    output: str
    float_value: float | None
    samples: int
    bits: list[int]
    mode: str
    rows: list[LayerSensitivity] = field(default_factory=list)
    baselines: dict[int, dict[str, float | None]] = field(
        default_factory=dict
    )  # all quantized at b
    warnings: list[str] = field(default_factory=list)

    def ranked(self, bits: int | None = None) -> list[LayerSensitivity]:
        """Most harmful first (single) / most recovering first (leave-one-out); ties broken by
        the local SQNR (lower first)."""
        rows = [r for r in self.rows if bits is None or r.bits == bits]
        if self.mode == "leave_one_out":
            return sorted(rows, key=lambda r: (r.loss, r.layer))
        return sorted(rows, key=lambda r: (-r.loss, _sqnr_key(r), r.layer))

    def layer_order(self, bits: int = 8) -> list[str]:
        """Layer names, most sensitive first, at ``bits`` (the lowest measured if absent)."""
        have = sorted({r.bits for r in self.rows})
        b = bits if bits in have else (have[0] if have else bits)
        seen: list[str] = []
        for r in self.ranked(b):
            if r.layer not in seen:
                seen.append(r.layer)
        return seen

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": SENSITIVITY_VERSION,
            "metric": self.metric,
            "output": self.output,
            "float_value": self.float_value,
            "samples": self.samples,
            "bits": self.bits,
            "mode": self.mode,
            "baselines": {str(k): v for k, v in self.baselines.items()},
            "rows": [asdict(r) for r in self.rows],
            "warnings": self.warnings,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SensitivityReport:
        if not isinstance(d, dict) or d.get("version") != SENSITIVITY_VERSION:
            raise ValueError("not an amq sensitivity file (version mismatch)")
        rows = []
        for r in d["rows"]:
            r = dict(r)
            if r.get("drop_ci") is not None:
                r["drop_ci"] = tuple(r["drop_ci"])
            rows.append(LayerSensitivity(**r))
        return cls(
            metric=d["metric"],
            output=d["output"],
            float_value=d["float_value"],
            samples=d["samples"],
            bits=list(d["bits"]),
            mode=d["mode"],
            rows=rows,
            baselines={int(k): v for k, v in d.get("baselines", {}).items()},
            warnings=list(d.get("warnings", [])),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=True)


def _sqnr_key(r: LayerSensitivity) -> float:
    v = r.local_sqnr_db
    return math.inf if v is None or math.isnan(v) else v


def add_shadow(
    qmodel: onnx.ModelProto, float_model: onnx.ModelProto, layer: str
) -> tuple[onnx.ModelProto, str, str]:
    """A copy of ``qmodel`` that also computes ``layer`` in float from the float inputs (a shadow
    node) and exposes both its float output and the quantized model's view of that output (the
    DequantizeLinear after it, or the raw output where it is not quantized)."""
    fg = Graph(float_model)
    node = fg.node_by_name[layer]
    out = onnx.ModelProto()
    out.CopyFrom(qmodel)
    qg = Graph(out)
    scope = NameScope(all_names(out))
    inputs = []
    for i in node.input:
        if i and i in fg.initializers and i not in qg.initializers:
            t = onnx.TensorProto()
            t.CopyFrom(fg.initializers[i])
            t.name = scope.new(f"{i}_float")
            out.graph.initializer.append(t)
            inputs.append(t.name)
        else:
            inputs.append(i)
    o = node.output[0]
    fo = scope.new(f"{o}_amq_float")
    shadow = onnx.helper.make_node(
        node.op_type, inputs, [fo], name=scope.new(f"{layer}_amq_shadow"), domain=node.domain
    )
    shadow.attribute.extend(node.attribute)
    # the quantized view of the output: o -> QuantizeLinear -> DequantizeLinear
    qview = o
    for c in qg.consumers.get(o, []):
        if c.op_type == "QuantizeLinear":
            for d in qg.consumers.get(c.output[0], []):
                if d.op_type == "DequantizeLinear":
                    qview = d.output[0]
    pos = next(
        (k for k, n in enumerate(out.graph.node) if n.name == layer), len(out.graph.node) - 1
    )
    out.graph.node.insert(pos + 1, shadow)
    return expose_outputs(out, [fo, qview]), fo, qview


@dataclass
class Reference:
    """The float model's scored output on the evaluation set, batch by batch."""

    output: str
    batches: list[np.ndarray]
    labels: list[np.ndarray | None]
    float_scores: np.ndarray | None  # per-sample metric of the float model (top1 / user: None)
    float_value: float | None


def score_batches(
    run: Callable[[dict[str, np.ndarray]], list[np.ndarray]],
    feeds: Iterable[dict[str, np.ndarray]],
    metric: str,
    ref: Reference,
    local: bool,
    clamp: tuple[float | None, float | None] | None = None,
) -> tuple[np.ndarray, M.Fidelity | None]:
    """Run a model batch by batch; per-sample scores of ``metric`` against the reference, and
    (``local``) the fidelity of the two extra outputs (float shadow, quantized view). ``clamp``:
    the float output is clamped the same way first (ahead-relu: the Relu after it drops the rest)."""
    scores = []
    acc = M.Fidelity() if local else None
    for k, f in enumerate(feeds):
        outs = run(f)
        lab = ref.labels[k]
        scores.append(M.per_sample_scores(metric, outs[0], ref.batches[k], lab))
        if acc is not None:
            fl = outs[1] if clamp is None else np.clip(outs[1], clamp[0], clamp[1])
            acc.update(fl, outs[2])
    return np.concatenate(scores, axis=0), acc


def row_from_scores(
    metric: str,
    ref: Reference,
    scores: np.ndarray,
    base: dict[str, Any],
    rounds: int = 200,
) -> LayerSensitivity:
    n = len(scores)
    value = M.aggregate(metric, scores)
    spec = M.metric_spec(metric)
    drop = drop_ci = None
    if metric == "top1" and ref.float_scores is not None:
        d = ref.float_scores - scores
        drop = float(np.mean(d))
        drop_ci = M.bootstrap_ci(lambda i: float(np.mean(d[i])), n, rounds)
    elif spec.ideal is not None:
        drop = spec.ideal - value
        drop_ci = M.bootstrap_ci(lambda i: spec.ideal - M.aggregate(metric, scores[i]), n, rounds)
    return LayerSensitivity(value=value, drop=drop, drop_ci=drop_ci, **base)


# ---------------------------------------------------------------------------------------------
# HTML


def html_report(rep: SensitivityReport, top: int = 20) -> str:
    from amq.report import fmt, html_page, svg_bars

    sections = []
    for b in rep.bits:
        rows = rep.ranked(b)[:top]
        if not rows:
            continue
        label = "drop" if rows[0].drop is not None else rep.metric
        vals = [r.loss for r in rows]
        sections.append(
            (
                f"{'Leave one out' if rep.mode == 'leave_one_out' else 'One layer quantized'} at W{b}A{max(b, 8)}: {label} of {rep.metric}",
                svg_bars([r.layer for r in rows], vals, unit=label),
            )
        )
    cols = [
        "layer",
        "op",
        "W bits",
        "A bits",
        rep.metric,
        "drop",
        "drop 95% CI",
        "local cosine",
        "local MSE",
        "local SQNR dB",
    ]
    body_rows = [
        [
            r.layer,
            r.op_type,
            r.weight_bits,
            r.act_bits,
            r.value,
            r.drop,
            None if r.drop_ci is None else f"[{r.drop_ci[0]:.4g}, {r.drop_ci[1]:.4g}]",
            r.local_cosine,
            r.local_mse,
            r.local_sqnr_db,
        ]
        for b in rep.bits
        for r in rep.ranked(b)
    ]
    intro = (
        f"metric {rep.metric} on output '{rep.output}' over {rep.samples} samples; float value "
        f"{fmt(rep.float_value)}"
    )
    return html_page(f"amq sensitivity ({rep.mode})", intro, sections, cols, body_rows)
