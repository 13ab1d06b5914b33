"""Per-layer sensitivity: the metric drop when one layer alone is quantized (or when all but one
are), plus the local error of that layer's output, measured in the same run through a float
"shadow" copy of the layer."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from amq import report
from amq.analysis import metrics as M
from amq.analysis.evaluate import pick_output
from amq.analysis.sensitivity_report import html_report as html_report  # the HTML page
from amq.calib import runner
from amq.calib.data import Dataset, InputSpec, batches
from amq.calib.memory import budgeted
from amq.calib.prepare import DataSource, PathLike, prepare
from amq.calib.statistics import calib_and_eval, resolve_cache_dir
from amq.calib.workspace import Workspace
from amq.config import ActivationsOverride, Config, Override, WeightsOverride, load_config
from amq.errors import ConfigError, DataError
from amq.graph.edit import expose_outputs
from amq.graph.model import Graph, NameScope, all_names
from amq.runtime import Execution

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
    act_dynamic: bool = False  # the input quantized at run time (a candidate of MatMul/Gemm)

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

    def ranked(self, bits: int | None = None, dynamic: bool = False) -> list[LayerSensitivity]:
        """Most harmful first (single) / most recovering first (leave-one-out); ties broken by
        the local SQNR (lower first). ``dynamic``: the rows of dynamic activations instead (a
        choice of their own, not part of the ranking at a bit width)."""
        rows = [
            r for r in self.rows if (bits is None or r.bits == bits) and r.act_dynamic == dynamic
        ]
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
    """The float model's output on the evaluation set, batch by batch, and what a drop is
    measured from."""

    output: str
    batches: list[np.ndarray]
    labels: list[np.ndarray | None]
    float_scores: Any  # the float model's own scores (metrics that score it: top1, user metrics)
    float_value: float | None  # the baseline of a drop (M.baseline), None without one


def score_batches(
    runs: Iterable[runner.Batch],
    metric: M.Metric,
    ref: Reference,
    shadow: tuple[str, str] | None = None,
    clamp: tuple[float | None, float | None] | None = None,
) -> tuple[Any, M.Fidelity | None]:
    """The scores of ``metric`` against the reference over a model's batches (runner.run_batches),
    and (``shadow``: the names of a layer's float shadow output and of the quantized model's view
    of it) the fidelity of the two. ``clamp``: the float output is clamped the same way first
    (ahead-relu: the Relu after it drops the rest)."""
    scores = []
    acc = M.Fidelity() if shadow else None
    for k, b in enumerate(runs):
        scores.append(metric.scores(b.values[ref.output], ref.batches[k], ref.labels[k]))
        if shadow is not None and acc is not None:
            fl = b.values[shadow[0]]
            acc.update(
                fl if clamp is None else np.clip(fl, clamp[0], clamp[1]), b.values[shadow[1]]
            )
    return metric.join(scores), acc


def row_from_scores(
    metric: M.Metric,
    ref: Reference,
    scores: Any,
    base: dict[str, Any],
    rounds: int = 200,
) -> LayerSensitivity:
    """A row: the value of ``scores`` and the paired drop from the float baseline with its CI."""
    drop, drop_ci = M.drop_with_ci(metric, scores, ref.float_scores, rounds)
    return LayerSensitivity(value=metric.value(scores), drop=drop, drop_ci=drop_ci, **base)


def raise_top_to_int16(
    model: PathLike | onnx.ModelProto,
    calib: DataSource,
    cfg: Config,
    percent: float,
    source: SensitivityReport | PathLike | None,
    eval_data: DataSource | None,
    cache_dir: PathLike | None | bool,
    show_progress: bool,
) -> tuple[Config, list[str]]:
    import json
    import math

    if isinstance(source, SensitivityReport):
        rep = source
    elif source is not None:
        p = Path(source)
        try:
            rep = SensitivityReport.from_dict(json.loads(p.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise ConfigError(f"{p}: sensitivity file not found") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(
                f"{p}: not an amq sensitivity JSON ({e}); write one with amq sensitivity -o"
            ) from None
    else:
        rep = sensitivity(
            model,
            calib,
            eval_data if eval_data is not None else calib,
            cfg,
            bits=(8,),
            cache_dir=cache_dir,
            show_progress=show_progress,
        )
    names = {n.name for n in prepare(model, cfg).model.graph.node}
    order = [n for n in rep.layer_order(8) if n in names]
    if not order:
        raise ConfigError(
            "--int16-top: the sensitivity report names no layer of this model; run amq sensitivity on it"
        )
    k = max(1, math.ceil(len(order) * percent / 100.0))
    top = order[:k]
    ov = Override(weights=WeightsOverride(bits=16), activations=ActivationsOverride(bits=16))
    return replace(cfg, layers=cfg.layers + tuple((name, ov) for name in top)), top


def _variant(cfg: Config, layer: str | None, bits: int, mode: str, dynamic: bool = False) -> Config:
    """single: only ``layer`` quantized (weights at bits, activations at max(bits, 8), or
    quantized at run time with ``dynamic``); leave_one_out: every layer at those bits but
    ``layer`` (None: all of them)."""
    ov = Override(
        weights=WeightsOverride(bits=bits),
        activations=ActivationsOverride(bits=max(bits, 8), dynamic=dynamic),
        skip=False,
    )
    if mode == "single":
        return replace(cfg, op_types=(), layers=(("*", Override(skip=True)), (layer, ov)))
    layers: tuple = (("*", ov),)
    if layer is not None:
        layers += ((layer, Override(skip=True)),)
    return replace(cfg, op_types=(), layers=layers)


def _overlap_warning(calib: Dataset, ev: Dataset, limit: int = 512) -> str | None:
    """Calibration samples that also appear in the evaluation set (calibrate on training data,
    evaluate on held-out data)."""
    import hashlib

    def digests(ds: Dataset) -> set[str]:
        out = set()
        for i in range(min(len(ds), limit)):
            h = hashlib.sha256()
            for k, v in sorted(ds[i].feeds.items()):
                h.update(k.encode() + np.ascontiguousarray(v).tobytes())
            out.add(h.hexdigest())
        return out

    common = digests(calib) & digests(ev)
    if common:
        return f"{len(common)} calibration sample(s) also appear in the evaluation data; evaluate on held-out data"
    return None


def float_reference(
    model: onnx.ModelProto,
    ev: Dataset,
    specs: list[InputSpec],
    output: str | None,
    metric: M.Metric,
    batch_size: int,
) -> tuple[Reference, bool]:
    """The float model's output batch by batch, scored where the metric scores it."""
    sess = runner.session(model, source="float model")
    name = pick_output(sess, output, "float model")
    outs, labels = [], []
    for b in runner.run_batches(sess, [name], batches(ev, specs, batch_size)):
        outs.append(np.asarray(b.values[name]))
        labels.append(None if any(lab is None for lab in b.labels) else np.asarray(b.labels))
    has_labels = all(lab is not None for lab in labels)
    if metric.needs_labels and not has_labels:
        raise DataError(
            f"metric {metric.name} needs labels in the evaluation data (labels.npy, labels.csv, label key, class folders)"
        )
    scores = None
    if metric.scores_reference:
        scores = metric.join(
            [metric.scores(o, o, lab) for o, lab in zip(outs, labels, strict=True)]
        )
    return Reference(name, outs, labels, scores, M.baseline(metric, scores)), has_labels


@dataclass(frozen=True)
class SensitivitySettings:
    """sensitivity()'s settings besides the model, the data and the config (its keywords).
    ``bits``: the widths swept; ``mode``: single or leave_one_out; ``layers``: name patterns
    (None: every quantizable layer); ``samples``: a seeded subset of the evaluation data."""

    bits: Iterable[int] = (4, 8, 16)
    metric: str | None = None
    output: str | None = None
    samples: int | None = None
    mode: str = "single"
    layers: Iterable[str] | None = None
    cache_dir: PathLike | None | bool = True
    show_progress: bool = False
    execution: Execution | str = Execution.IDEAL
    dynamic: bool = False  # also dynamic activations (W8) for the MatMul/Gemm layers that can

    def checked(self) -> SensitivitySettings:
        """The settings with mode and bits validated (one-line errors) and normalised."""
        if self.mode not in ("single", "leave_one_out"):
            raise ConfigError(f"mode '{self.mode}': use single or leave_one_out")
        bits = sorted(set(int(b) for b in self.bits))
        if not bits or any(b not in (4, 8, 16) for b in bits):
            raise ConfigError(f"--bits {','.join(map(str, bits))}: each must be 4, 8 or 16")
        layers = None if self.layers is None else tuple(self.layers)
        return replace(self, bits=tuple(bits), layers=layers)


@budgeted
def sensitivity(
    model: PathLike | onnx.ModelProto,
    calib: DataSource,
    eval_data: DataSource,
    config: Config | PathLike | None = None,
    **options: Any,
) -> SensitivityReport:
    """For each layer and bit width, that layer alone quantized (mode ``single``) or every layer
    but that one (``leave_one_out``): the metric drop against float and (single) the local error
    of the layer's output. Calibration statistics are collected once and reused. ``options``:
    the fields of SensitivitySettings (bits, metric, output, samples, mode, layers, cache_dir,
    show_progress, execution)."""
    st = SensitivitySettings(**options).checked()
    bits = list(st.bits)
    cfg = config if isinstance(config, Config) else load_config(config)
    prep = prepare(model, cfg)
    specs = prep.specs
    cal, ev = calib_and_eval(calib, eval_data, specs, cfg, st.samples)
    warnings = [w for w in [_overlap_warning(cal, ev)] if w]
    has_labels = all(s.label is not None for s in ev)
    m = M.get_metric(st.metric or ("top1" if has_labels else "sqnr"))
    ws = Workspace(prep, cfg, cal, resolve_cache_dir(st.cache_dir), st.show_progress)
    del prep  # the model before smoothing: let go (the workspace holds the one it uses)
    ws.ensure_opset_for(cfg, bits)
    base = ws.structure(cfg).flat()  # the layers inside If branches and Loop bodies too
    cands = _candidates(base, st.layers)
    variants = [(layer, b, False) for b in bits for layer in cands]
    if st.dynamic:
        variants += [(layer, 8, True) for layer in _dynamic_candidates(ws, cfg, cands)]
    baselines = [(None, b, False) for b in bits] if st.mode == "leave_one_out" else []
    roots: set[str] = set()
    for layer, b, dyn in variants + baselines:
        roots |= ws.sources(ws.structure(_variant(cfg, layer, b, st.mode, dyn)))
    ws.observe(roots)
    bs = cfg.calibration.batch_size
    ref, _ = float_reference(ws.prep.model, ev, specs, st.output, m, bs)
    rep = SensitivityReport(
        m.name, ref.output, ref.float_value, len(ev), bits, st.mode, warnings=warnings
    )
    sweep = _Sweep(ws, ev, specs, m, ref, st)
    with report.progress(
        len(variants) + len(baselines), f"sensitivity ({st.mode})", st.show_progress
    ) as advance:
        for _layer, b, _ in baselines:
            r = sweep.row(None, b, _row_base("(all)", "-", b, b, st.mode, 0))
            rep.baselines[b] = {"value": r.value, "drop": r.drop}
            advance(1)
        for layer, b, dyn in variants:
            lp = base.layers[layer]
            wbits = b if lp.weight else None
            meta = _row_base(layer, lp.op_type, wbits, max(b, 8), st.mode, lp.flops)
            meta["bits"] = b
            if dyn:
                meta["act_dynamic"] = True
            rep.rows.append(sweep.row(layer, b, meta, dyn))
            advance(1)
    return rep


def _dynamic_candidates(ws: Workspace, cfg: Config, cands: list[str]) -> list[str]:
    """The layers of ``cands`` that take dynamic activations (what the planner decides with them
    asked of every layer: MatMul/Gemm with a constant 2-D weight)."""
    dyn = replace(cfg, activations=replace(cfg.activations, dynamic=True), op_types=(), layers=())
    lps = ws.structure(dyn).flat().layers
    return [n for n in cands if n in lps and lps[n].act_dynamic]


def _candidates(base: Any, patterns: Iterable[str] | None) -> list[str]:
    """The quantizable layers of ``base`` (a flat plan), those matching ``patterns`` if given."""
    from amq.config import layer_matches

    cands = [lp.name for lp in base.layers.values() if lp.quantized]
    if patterns is not None:
        pats = list(patterns)
        cands = [n for n in cands if any(layer_matches(p, n) for p in pats)]
        if not cands:
            raise ConfigError(f"--layers {','.join(pats)}: matches no quantizable layer")
    return cands


@dataclass
class _Sweep:
    """sensitivity's inner step: one variant's plan, its session over the evaluation data, its
    row (with the layer's local error in mode single)."""

    ws: Workspace
    ev: Dataset
    specs: list[InputSpec]
    metric: M.Metric
    ref: Reference
    st: SensitivitySettings

    def row(
        self, layer: str | None, bits: int, meta: dict[str, Any], dynamic: bool = False
    ) -> LayerSensitivity:
        ws, ref = self.ws, self.ref
        plan = ws.plan(_variant(ws.cfg, layer, bits, self.st.mode, dynamic))
        q = ws.emit(plan)
        names = [ref.output]
        shadow = clamp = None
        # the local error of a layer's output: for main-graph layers (one inside an If branch
        # or a Loop body is scored by the metric only)
        if self.st.mode == "single" and layer is not None and layer in ws.graph.node_by_name:
            q, fo, qo = add_shadow(q, ws.prep.model, layer)
            names += [fo, qo]
            shadow = (fo, qo)
            tp = plan.tensors.get(ws.graph.node_by_name[layer].output[0])
            clamp = tp.clamp if tp is not None else None
        sess = ws.session(q, f"model with {layer or 'all layers'} quantized", self.st.execution)
        feeds = batches(self.ev, self.specs, ws.cfg.calibration.batch_size)
        scores, acc = score_batches(
            runner.run_batches(sess, names, feeds), self.metric, ref, shadow, clamp
        )
        row = row_from_scores(self.metric, ref, scores, meta)
        if acc is not None and acc.samples:
            row.local_cosine, row.local_sqnr_db = acc.cosine, acc.sqnr_db
            row.local_mse = acc.noise / max(acc.elements, 1)
        return row


def _row_base(
    layer: str, op: str, wbits: int | None, abits: int, mode: str, flops: int
) -> dict[str, Any]:
    return {
        "layer": layer,
        "op_type": op,
        "weight_bits": wbits,
        "act_bits": abits,
        "mode": mode,
        "bits": abits,
        "flops": flops,
    }
