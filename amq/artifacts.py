"""The one writer of amq's outputs (DESIGN.md §2): the QDQ model, its resolved YAML config and its
qparams.json, each written atomically (a temp file, then a rename), so a crash never leaves a
half-written file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import onnx

from amq import report
from amq.config import (
    ActivationsOverride,
    Config,
    Granularity,
    Overflow,
    Override,
    WeightsOverride,
    dump_config,
)
from amq.errors import OutputError
from amq.plan import QuantPlan
from amq.runtime import TWO_GB

PathLike = str | os.PathLike[str]


def output_paths(model_out: Path) -> tuple[Path, Path]:
    stem = model_out.name[: -len(".onnx")] if model_out.name.endswith(".onnx") else model_out.name
    return model_out.with_name(stem + ".amq.yaml"), model_out.with_name(stem + ".qparams.json")


def default_output(model: PathLike) -> Path:
    p = Path(model)
    return p.with_name(p.stem + ".q.onnx")


def resolved_config(cfg: Config, plan: QuantPlan) -> Config:
    """The config with every layer listed with its effective settings."""
    layers = []
    # dynamic activations and block-wise weights are written per layer where the config uses
    # them anywhere (a layer's false / 0 must not inherit a global true / size)
    overrides = [ov for _, ov in cfg.op_types + cfg.layers]
    dyn = cfg.activations.dynamic or any(ov.activations.dynamic is not None for ov in overrides)
    blk = cfg.weights.block_size or any(ov.weights.block_size is not None for ov in overrides)
    for lp in plan.layers.values():
        # skip: true where the config chose float; where a rule or a data guard did, the key is
        # left out so the same rule decides again (and gives the same reason)
        skip = False if lp.quantized else (True if lp.reason.startswith("skip") else None)
        layers.append(
            (
                lp.name,
                Override(
                    weights=WeightsOverride(
                        bits=lp.weight_bits,
                        granularity=Granularity.PER_CHANNEL
                        if lp.per_channel
                        else Granularity.PER_TENSOR,
                        overflow=Overflow(lp.overflow) if lp.overflow else None,
                        block_size=lp.block_size if blk else None,
                    )
                    if lp.weight_bits is not None
                    else WeightsOverride(),
                    activations=ActivationsOverride(
                        bits=lp.act_bits,
                        symmetric=lp.act_symmetric,
                        dynamic=lp.act_dynamic if dyn else None,
                    ),
                    skip=skip,
                ),
            )
        )
    return replace(cfg, layers=tuple(layers))


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Atomic save; models over 2 GB get their weights in ``<name>.data`` beside them."""
    if model.ByteSize() < TWO_GB:
        report.atomic_write(path, model.SerializeToString(deterministic=True))
        return
    tmpdir = Path(tempfile.mkdtemp(dir=path.parent, prefix=".amq-"))
    data_name = path.name + ".data"
    onnx.save(model, str(tmpdir / path.name), save_as_external_data=True, location=data_name)
    os.replace(tmpdir / data_name, path.parent / data_name)
    os.replace(tmpdir / path.name, path)
    tmpdir.rmdir()


def plan_notes(plan: QuantPlan) -> str:
    """YAML comment lines for what a plan decided from data: tensors kept float and why, and the
    overflow guard's measurements (the config itself holds only the decisions)."""
    out = "".join(f"# kept float: {t}: {why}\n" for t, why in sorted(plan.float_tensors.items()))
    out += "".join(
        f"# overflow {lp.overflow}: {lp.name}: {lp.overflow_note}\n"
        for lp in plan.layers.values()
        if lp.overflow_note
    )
    out += "".join(f"# note: {n}\n" for n in plan.notes)
    return out


def write_quantized(
    model: onnx.ModelProto,
    plan: QuantPlan,
    config: Config,
    model_path: Path,
    header: str = "",
    paths: tuple[Path, Path] | None = None,
) -> tuple[Path, Path, Path]:
    """The QDQ model, its resolved config (YAML, with ``header`` comments) and its plan
    (qparams.json), each atomically; ``paths``: the config's and qparams' paths when not the
    model's own names beside it. Returns (model, config, qparams) paths."""
    cfg_path, qp_path = paths if paths is not None else output_paths(model_path)
    save_model(model, model_path)
    report.atomic_write(cfg_path, dump_config(config, header + plan_notes(plan)))
    report.atomic_write(qp_path, plan.to_json())
    return model_path, cfg_path, qp_path


def check_folder(out_dir: PathLike) -> None:
    """Fail early (before long work) when the output folder cannot be created or written."""
    p = Path(out_dir)
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is a file" if probe == p else f"cannot be made: {probe} is a file"
        raise OutputError(f"{p}: {where}; give a folder for the output")
    if not os.access(probe, os.W_OK):
        raise OutputError(f"{p}: folder {probe} is not writable; choose another output folder")


def write_files(out_dir: PathLike, files: Mapping[str, str | bytes]) -> list[Path]:
    """A report's files (name -> content) into the folder ``out_dir``, each atomically."""
    return [report.atomic_write(Path(out_dir) / name, data) for name, data in files.items()]
