"""Config -> YAML: the resolved config amq writes beside each model (read back by
amq.config.load_config to the same Config)."""

from __future__ import annotations

import dataclasses
from dataclasses import fields
from enum import Enum
from typing import Any

import yaml

from amq.config import Config, Override, SmoothMode


def _mode(m: SmoothMode) -> str | bool:
    """auto, true or false as YAML writes them."""
    return {"auto": "auto", "true": True, "false": False}[m.value]


def _plain(v: Any) -> Any:
    if isinstance(v, SmoothMode):
        return _mode(v)
    if isinstance(v, Enum):
        return v.value
    if isinstance(v, tuple):
        return [_plain(i) for i in v]
    if dataclasses.is_dataclass(v):
        return {f.name: _plain(getattr(v, f.name)) for f in fields(v)}
    return v


def _override_dict(ov: Override) -> dict[str, Any]:
    out: dict[str, Any] = {}
    w = {k: _plain(v) for k, v in dataclasses.asdict(ov.weights).items() if v is not None}
    a = {k: _plain(v) for k, v in dataclasses.asdict(ov.activations).items() if v is not None}
    if w:
        out["weights"] = w
    if a:
        out["activations"] = a
    if ov.skip is not None:
        out["skip"] = ov.skip
    return out


def _without(d: dict[str, Any], **defaults: Any) -> dict[str, Any]:
    """``d`` without the keys at the given values (settings that are off stay out of the YAML)."""
    return {k: v for k, v in d.items() if k not in defaults or v != defaults[k]}


def config_to_dict(cfg: Config) -> dict[str, Any]:
    d: dict[str, Any] = {
        "amq": cfg.amq,
        "target": cfg.target.value,
        "calibration": _plain(cfg.calibration),
        "weights": _without(_plain(cfg.weights), block_size=0),
        "activations": _without(_plain(cfg.activations), dynamic=False),
        "fold_batchnorm": cfg.fold_batchnorm,
        "ahead_relu": cfg.ahead_relu,
        "quantize_outputs": cfg.quantize_outputs,
        "guards": _plain(cfg.guards),
        "smoothquant": {
            "enabled": _mode(cfg.smoothquant.enabled),
            "alpha": "auto" if cfg.smoothquant.alpha is None else cfg.smoothquant.alpha,
        },
        "outlier_split": {"enabled": _mode(cfg.outlier_split.enabled)},
        "algorithms": {
            f.name: _mode(getattr(cfg.algorithms, f.name)) for f in fields(cfg.algorithms)
        },
    }
    if cfg.preprocess is not None:
        d["preprocess"] = _plain(cfg.preprocess)
    if cfg.data.input_shapes or cfg.data.data_types:
        d["data"] = {
            "input_shapes": {n: list(s) for n, s in cfg.data.input_shapes},
            "data_types": dict(cfg.data.data_types),
        }
    d["op_types"] = {k: _override_dict(v) for k, v in cfg.op_types}
    d["layers"] = {k: _override_dict(v) for k, v in cfg.layers}
    return d


def dump_config(cfg: Config, header: str = "") -> str:
    # libyaml's dumper when PyYAML has it: about 10x faster than the pure-Python one
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    text = yaml.dump(
        config_to_dict(cfg), Dumper=dumper, sort_keys=False, default_flow_style=None, width=100
    )
    return header + text
