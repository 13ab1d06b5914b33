"""The QAT handoff (DESIGN.md §10): a folder with the resolved config, qparams.json, the float and
QDQ models, a PyTorch fake-quant model initialised from amq's scales and its parity with the Q/DQ
math. torch is imported only when a handoff is made."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnx

from amq import report
from amq.artifacts import resolved_config, save_model, write_quantized
from amq.calib.data import batches, open_data
from amq.calib.memory import budgeted
from amq.calib.prepare import DataSource, PathLike, copy_model, prepare
from amq.calib.statistics import resolve_cache_dir
from amq.calib.workspace import plan_in_workspace
from amq.config import (
    Config,
    SmoothMode,
    load_config,
)
from amq.errors import ConfigError
from amq.graph.model import (
    load_model,
)
from amq.plan import QuantPlan


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


def _refuse_blocked(plan: QuantPlan) -> QuantPlan:
    """``plan`` (flat), unless it has block-wise weights: the fake-quant modules hold one scale
    per channel."""
    blocked = [lp.name for lp in plan.layers.values() if lp.quantized and lp.block_size]
    if blocked:
        raise ConfigError(
            f"qat: block-wise weights (block_size) are not in the QAT handoff yet ({blocked[0]}"
            f"{f' and {len(blocked) - 1} more' if len(blocked) > 1 else ''}); give those layers "
            "per-channel weights (block_size: 0)"
        )
    return plan


POST_TRAINING = ("bias_correction", "equalization", "concat_split", "scale_search", "adaround")


def _no_auto_smoothing(cfg: Config) -> Config:
    """qat.prepare maps the bundle onto the user's own PyTorch weights by name: weights rescaled
    by SmoothQuant would not match them, so ``auto`` means off here (``true`` still smooths).
    Bias correction, scale search and AdaRound are post-training fixes of what fine-tuning
    trains, cross-layer equalization rescales the weights as SmoothQuant does, and the concat
    split replaces a layer by parts no PyTorch module matches: off on ``auto``, refused when
    asked for."""
    a = cfg.algorithms
    for key in POST_TRAINING:
        if getattr(a, key) == SmoothMode.ON:
            raise ConfigError(
                f"algorithms.{key}: true is for post-training quantization; the QAT handoff "
                "trains the weights and biases (set it to auto or false)"
            )
    off = {k: SmoothMode.OFF for k in POST_TRAINING}
    cfg = replace(cfg, algorithms=replace(a, **off))
    if cfg.smoothquant.enabled != SmoothMode.AUTO:
        return cfg
    return replace(cfg, smoothquant=replace(cfg.smoothquant, enabled=SmoothMode.OFF))


@budgeted
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

    cfg = _no_auto_smoothing(config if isinstance(config, Config) else load_config(config))
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
    plan = _refuse_blocked(plan.flat())
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
