"""Typed configuration: frozen dataclasses, validated at load, versioned YAML (DESIGN.md §5).

Every field is optional in YAML. Unknown keys are errors with a did-you-mean. Priority of settings
for a layer: ``layers`` entry (later entries win) > ``op_types`` entry > global ``weights`` /
``activations``.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from amq.errors import ConfigError

SCHEMA_VERSION = 1
ALLOWED_BITS = (4, 8, 16)
BLOCK_BITS = (4,)  # weight bits that take block_size (block-wise weights, MatMulNBits)


class Target(str, Enum):
    ORT = "ort"
    TRT = "trt"
    GENERIC = "generic"


class RangeMethod(str, Enum):
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"
    MSE = "mse"


class Granularity(str, Enum):
    PER_CHANNEL = "per_channel"
    PER_TENSOR = "per_tensor"


class Overflow(str, Enum):
    """What to do about int16 pair-sum saturation in the uint8 x int8 kernels of x86 CPUs without
    VNNI (PITFALLS 9). AUTO: emulate the kernels on calibration data and guard the layers that
    would saturate; GUARD: always guard (pair-safe weight scales: every pair of weight codes the
    kernel adds in one int16 sums to at most 128, widening only the channels that need it); OFF:
    never."""

    AUTO = "auto"
    GUARD = "guard"
    OFF = "off"


class OutlierRanges(str, Enum):
    """Activation tensors with outlier channels (a few channels whose range is far wider than
    the median channel's). AUTO: their range is the method's, the ``mse`` one or the full one,
    whichever has the least expected error with the clipping of the outlier channels weighted by
    how much the reading layer amplifies them; OFF: the method's range, as for any tensor."""

    AUTO = "auto"
    OFF = "off"


class SmoothMode(str, Enum):
    """SmoothQuant per MatMul/Gemm group: AUTO where it measurably lowers the layer's output error,
    ON for every candidate group, OFF never."""

    AUTO = "auto"
    ON = "true"
    OFF = "false"


@dataclass(frozen=True)
class CalibrationConfig:
    method: RangeMethod = RangeMethod.PERCENTILE
    percentile: float = 99.99
    outliers: OutlierRanges = OutlierRanges.AUTO
    # percentile ranges widened on each side to the mse range where that clips less; auto: only
    # where that lowers the output error on the first calibration samples (calib/range_choice.py)
    widen_to_mse: SmoothMode = SmoothMode.ON
    num_samples: int = 256
    batch_size: int = 16
    seed: int = 0
    bins: int = 2048
    # the process's memory the calibration pass and the summary's runs size their batch to
    # (calib/memory.py); 0: no budget, the configured batch
    memory_mb: int = 1024


@dataclass(frozen=True)
class WeightsConfig:
    bits: int = 8
    granularity: Granularity = Granularity.PER_CHANNEL
    overflow: Overflow = Overflow.AUTO
    # block-wise weights along the reduction axis K of a MatMul's constant [K, N] weight (0: per
    # channel); 4-bit only: onnxruntime runs them as MatMulNBits. Other layers keep per channel.
    block_size: int = 0


@dataclass(frozen=True)
class ActivationsConfig:
    bits: int = 8
    symmetric: bool = False
    # MatMul/Gemm with a constant weight: the input is quantized at run time from each batch's
    # own min/max (DynamicQuantizeLinear + MatMulInteger), no calibrated grid; 8 bits
    dynamic: bool = False


@dataclass(frozen=True)
class GuardsConfig:
    """Protections against ranges that would wreck a model (PITFALLS 4 and 5)."""

    sentinels: bool = True  # keep float a tensor whose range is set by sentinel values
    concat_range_ratio: float = 16.0  # keep a Concat float when its inputs' ranges differ more


@dataclass(frozen=True)
class SmoothQuantConfig:
    """SmoothQuant (amq/quant/algorithms/smoothquant.py). ``alpha``: None = chosen per group on
    calibration data (YAML ``auto``), else one migration strength in [0, 1] for every group."""

    enabled: SmoothMode = SmoothMode.AUTO
    alpha: float | None = None


@dataclass(frozen=True)
class OutlierSplitConfig:
    """The outlier split of MatMul inputs (amq/quant/algorithms/outlier_split.py): AUTO splits a
    group where that at least halves its output error (before SmoothQuant is considered), ON
    wherever a tensor has wide channels, OFF never."""

    enabled: SmoothMode = SmoothMode.AUTO


@dataclass(frozen=True)
class AlgorithmsConfig:
    """Accuracy-recovering passes that run after the ranges are set (amq/quant/algorithms/).
    AUTO turns a pass on where the measured ablation found it helps (bench/RESULTS_ALGORITHMS.md),
    ON for every layer it applies to, OFF never. ``bias_correction``: Conv/ConvTranspose/Gemm
    biases; ``scale_search``: per-channel weight clipping ratios (auto: weights of 4 bits);
    ``adaround``: learned weight rounding (auto: weights of 4 bits); ``equalization``:
    cross-layer equalization of Conv chains before calibration (auto: pairs with a per-tensor
    weight grid, and the input channels of a depthwise Conv brought to closer ranges where both
    layers have per-channel weight grids); ``concat_split``: a Conv/MatMul reading a Concat of
    very different ranges computed per input-channel group, each on its own grid (auto: where
    its measured error is at most twice the float input's, else the input stays float)."""

    bias_correction: SmoothMode = SmoothMode.AUTO
    equalization: SmoothMode = SmoothMode.AUTO
    concat_split: SmoothMode = SmoothMode.AUTO
    scale_search: SmoothMode = SmoothMode.AUTO
    adaround: SmoothMode = SmoothMode.AUTO


@dataclass(frozen=True)
class PreprocessConfig:
    """How image files become model input (only for image folders)."""

    resize: tuple[int, int] | None = None  # (height, width) before the crop
    crop: tuple[int, int] | None = None  # centre crop (height, width)
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    layout: str = "NCHW"
    channel_order: str = "RGB"
    grayscale: bool = False


@dataclass(frozen=True)
class DataConfig:
    """Raw .bin inputs (AMCT style) need their shapes and dtypes given."""

    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    data_types: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class WeightsOverride:
    bits: int | None = None
    granularity: Granularity | None = None
    overflow: Overflow | None = None
    block_size: int | None = None


@dataclass(frozen=True)
class ActivationsOverride:
    bits: int | None = None
    symmetric: bool | None = None
    dynamic: bool | None = None


@dataclass(frozen=True)
class Override:
    """Settings for an op type or a layer; None means 'inherit'."""

    weights: WeightsOverride = WeightsOverride()
    activations: ActivationsOverride = ActivationsOverride()
    skip: bool | None = None


@dataclass(frozen=True)
class LayerSettings:
    """The effective settings of one layer after priority resolution."""

    weight_bits: int
    granularity: Granularity
    act_bits: int
    act_symmetric: bool
    skip: bool
    overflow: Overflow = Overflow.AUTO
    act_dynamic: bool = False
    block_size: int = 0


@dataclass(frozen=True)
class Config:
    amq: int = SCHEMA_VERSION
    target: Target = Target.ORT
    calibration: CalibrationConfig = CalibrationConfig()
    weights: WeightsConfig = WeightsConfig()
    activations: ActivationsConfig = ActivationsConfig()
    fold_batchnorm: bool = True
    ahead_relu: bool = True
    quantize_outputs: bool = False
    guards: GuardsConfig = GuardsConfig()
    smoothquant: SmoothQuantConfig = SmoothQuantConfig()
    outlier_split: OutlierSplitConfig = OutlierSplitConfig()
    algorithms: AlgorithmsConfig = AlgorithmsConfig()
    preprocess: PreprocessConfig | None = None
    data: DataConfig = DataConfig()
    op_types: tuple[tuple[str, Override], ...] = ()
    layers: tuple[tuple[str, Override], ...] = field(default=())

    def settings_for(self, name: str, op_type: str) -> LayerSettings:
        """Resolve layer > op type > global for one node."""
        s = LayerSettings(
            weight_bits=self.weights.bits,
            granularity=self.weights.granularity,
            act_bits=self.activations.bits,
            act_symmetric=self.activations.symmetric,
            skip=False,
            overflow=self.weights.overflow,
            act_dynamic=self.activations.dynamic,
            block_size=self.weights.block_size,
        )
        for op, ov in self.op_types:
            if op == op_type:
                s = _apply(s, ov)
        for pattern, ov in self.layers:
            if layer_matches(pattern, name):
                s = _apply(s, ov)
        return s


def layer_matches(pattern: str, name: str) -> bool:
    """A layer pattern is an exact node name or a glob (``*``, ``?``, ``[...]``)."""
    return pattern == name or fnmatch.fnmatchcase(name, pattern)


def _apply(s: LayerSettings, ov: Override) -> LayerSettings:
    return LayerSettings(
        weight_bits=ov.weights.bits if ov.weights.bits is not None else s.weight_bits,
        granularity=ov.weights.granularity if ov.weights.granularity is not None else s.granularity,
        act_bits=ov.activations.bits if ov.activations.bits is not None else s.act_bits,
        act_symmetric=(
            ov.activations.symmetric if ov.activations.symmetric is not None else s.act_symmetric
        ),
        skip=ov.skip if ov.skip is not None else s.skip,
        overflow=ov.weights.overflow if ov.weights.overflow is not None else s.overflow,
        act_dynamic=(
            ov.activations.dynamic if ov.activations.dynamic is not None else s.act_dynamic
        ),
        block_size=ov.weights.block_size if ov.weights.block_size is not None else s.block_size,
    )


# ---------------------------------------------------------------------------------------------
# Loading


def _did_you_mean(key: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else f"; allowed: {', '.join(choices)}"


def _check_keys(d: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    for k in d:
        if k not in allowed:
            raise ConfigError(f"{where}: unknown key '{k}'{_did_you_mean(str(k), allowed)}")


def _enum(cls: type[Enum], value: Any, where: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        choices = [e.value for e in cls]
        raise ConfigError(
            f"{where}: '{value}' is not one of {', '.join(choices)}"
            f"{_did_you_mean(str(value), choices) if isinstance(value, str) else ''}"
        ) from None


def _bits(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in ALLOWED_BITS:
        raise ConfigError(f"{where}: bits must be one of 4, 8, 16 (got {value!r})")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false (got {value!r})")
    return value


def _number(value: Any, where: str, lo: float, hi: float, integer: bool = False) -> Any:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not (lo <= value <= hi):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{where}: expected {kind} in [{lo:g}, {hi:g}] (got {value!r})")
    return value


def _section(cls: type, d: Mapping[str, Any] | None, where: str, base: Any = None) -> Any:
    """Build a frozen dataclass section from a mapping, validating each field."""
    obj = base if base is not None else cls()
    if d is None:
        return obj
    names = [f.name for f in fields(cls)]
    _check_keys(d, names, where)
    updates: dict[str, Any] = {}
    for k, v in d.items():
        w = f"{where}.{k}"
        updates[k] = _field_value(cls, k, v, w)
    out = replace(obj, **updates)
    _check_block(out, where)
    return out


def _check_block(section: Any, where: str) -> None:
    """block_size with bits other than 4 in one section is an error (a layer whose inherited
    bits are not 4 keeps per channel, and the plan says so)."""
    block = getattr(section, "block_size", None)
    bits = getattr(section, "bits", None)
    if block and bits is not None and bits not in BLOCK_BITS:
        raise ConfigError(f"{where}.block_size: block-wise weights need bits: 4 (got bits: {bits})")


def check_block_size(value: Any, where: str) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or (value != 0 and (value < 16 or value & (value - 1)))
    ):
        raise ConfigError(
            f"{where}: block_size must be a power of two >= 16, e.g. 32, 64, 128 "
            f"(0: per channel; got {value!r})"
        )
    return value


def _field_value(cls: type, k: str, v: Any, w: str) -> Any:
    if k == "bits":
        return None if v is None and cls in (WeightsOverride, ActivationsOverride) else _bits(v, w)
    if k == "method":
        return _enum(RangeMethod, v, w)
    if k == "granularity":
        return _enum(Granularity, v, w)
    if k == "outliers":  # YAML reads a bare off as false
        return _enum(OutlierRanges, ("auto" if v else "off") if isinstance(v, bool) else v, w)
    if k == "overflow":
        return None if v is None and cls is WeightsOverride else _enum(Overflow, v, w)
    if k == "block_size":
        return None if v is None and cls is WeightsOverride else check_block_size(v, w)
    if k == "dynamic" and v is None and cls is ActivationsOverride:
        return None
    if k in ("symmetric", "skip", "sentinels", "grayscale", "dynamic"):
        return _bool(v, w)
    if k == "percentile":
        return float(_number(v, w, 50.0, 100.0))
    if k in ("num_samples", "batch_size", "bins"):
        return int(_number(v, w, 1, 10**9, integer=True))
    if k == "memory_mb":
        return int(_number(v, w, 0, 10**7, integer=True))
    if k == "seed":
        return int(_number(v, w, 0, 2**32 - 1, integer=True))
    if k == "concat_range_ratio":
        return float(_number(v, w, 1.0, 1e12))
    if k == "scale":
        return float(_number(v, w, 0.0, 1e12))
    if k in (
        "enabled",
        "bias_correction",
        "equalization",
        "concat_split",
        "scale_search",
        "adaround",
        "widen_to_mse",
    ):
        if isinstance(v, bool):
            return SmoothMode.ON if v else SmoothMode.OFF
        if v == "auto":
            return SmoothMode.AUTO
        raise ConfigError(f"{w}: expected auto, true or false (got {v!r})")
    if k == "alpha":
        return None if v == "auto" else float(_number(v, w, 0.0, 1.0))
    if k in ("resize", "crop"):
        if v is None:
            return None
        if isinstance(v, int):
            v = [v, v]
        if not (
            isinstance(v, list) and len(v) == 2 and all(isinstance(i, int) and i > 0 for i in v)
        ):
            raise ConfigError(f"{w}: expected [height, width] in pixels (got {v!r})")
        return tuple(v)
    if k in ("mean", "std"):
        if not (isinstance(v, list) and v and all(isinstance(i, (int, float)) for i in v)):
            raise ConfigError(f"{w}: expected a list of numbers, one per channel (got {v!r})")
        if k == "std" and any(i == 0 for i in v):
            raise ConfigError(f"{w}: std must not contain 0")
        return tuple(float(i) for i in v)
    if k == "layout":
        if v not in ("NCHW", "NHWC"):
            raise ConfigError(f"{w}: layout must be NCHW or NHWC (got {v!r})")
        return v
    if k == "channel_order":
        if v not in ("RGB", "BGR"):
            raise ConfigError(f"{w}: channel_order must be RGB or BGR (got {v!r})")
        return v
    raise ConfigError(f"{w}: unsupported key")  # pragma: no cover - guarded by _check_keys


def _override(d: Any, where: str) -> Override:
    if d is None:
        return Override()
    _check_keys(d, ["weights", "activations", "skip"], where)
    return Override(
        weights=_section(WeightsOverride, d.get("weights"), f"{where}.weights"),
        activations=_section(ActivationsOverride, d.get("activations"), f"{where}.activations"),
        skip=_bool(d["skip"], f"{where}.skip") if "skip" in d else None,
    )


def _data_section(d: Any, where: str) -> DataConfig:
    if d is None:
        return DataConfig()
    _check_keys(d, ["input_shapes", "data_types"], where)
    shapes = []
    for name, shape in (d.get("input_shapes") or {}).items():
        if not (isinstance(shape, list) and all(isinstance(i, int) and i > 0 for i in shape)):
            raise ConfigError(f"{where}.input_shapes.{name}: expected a list of positive ints")
        shapes.append((str(name), tuple(shape)))
    dtypes = [(str(n), str(t)) for n, t in (d.get("data_types") or {}).items()]
    return DataConfig(input_shapes=tuple(shapes), data_types=tuple(dtypes))


TOP_KEYS = [f.name for f in fields(Config)]


def config_from_dict(d: Mapping[str, Any] | None, source: str = "config") -> Config:
    """Validate a parsed YAML mapping into a Config. Raises ConfigError naming the key."""
    if d is not None and not isinstance(d, Mapping):
        raise ConfigError(f"{source}: expected a mapping of settings, got {type(d).__name__}")
    d = dict(d or {})
    _check_keys(d, TOP_KEYS, source)
    version = d.get("amq", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise ConfigError(
            f"{source}: schema version amq: {version!r} is not supported (this amq reads {SCHEMA_VERSION})"
        )
    target = _enum(Target, d.get("target", "ort"), f"{source}.target")
    acts_base = ActivationsConfig(symmetric=True) if target == Target.TRT else ActivationsConfig()
    cfg = Config(
        target=target,
        calibration=_section(CalibrationConfig, d.get("calibration"), f"{source}.calibration"),
        weights=_section(WeightsConfig, d.get("weights"), f"{source}.weights"),
        activations=_section(
            ActivationsConfig, d.get("activations"), f"{source}.activations", base=acts_base
        ),
        fold_batchnorm=_bool(d.get("fold_batchnorm", True), f"{source}.fold_batchnorm"),
        ahead_relu=_bool(d.get("ahead_relu", True), f"{source}.ahead_relu"),
        quantize_outputs=_bool(d.get("quantize_outputs", False), f"{source}.quantize_outputs"),
        guards=_section(GuardsConfig, d.get("guards"), f"{source}.guards"),
        smoothquant=_section(SmoothQuantConfig, d.get("smoothquant"), f"{source}.smoothquant"),
        outlier_split=_section(
            OutlierSplitConfig, d.get("outlier_split"), f"{source}.outlier_split"
        ),
        algorithms=_section(AlgorithmsConfig, d.get("algorithms"), f"{source}.algorithms"),
        preprocess=(
            _section(PreprocessConfig, d["preprocess"], f"{source}.preprocess")
            if d.get("preprocess") is not None
            else None
        ),
        data=_data_section(d.get("data"), f"{source}.data"),
        op_types=tuple(
            (str(k), _override(v, f"{source}.op_types.{k}"))
            for k, v in _mapping(d.get("op_types"), f"{source}.op_types").items()
        ),
        layers=tuple(
            (str(k), _override(v, f"{source}.layers.{k}"))
            for k, v in _mapping(d.get("layers"), f"{source}.layers").items()
        ),
    )
    return cfg


def _mapping(v: Any, where: str) -> Mapping[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise ConfigError(f"{where}: expected a mapping of name -> settings")
    return v


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Load a YAML config file (None gives the defaults)."""
    if path is None:
        return Config()
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        d = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{p}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    return config_from_dict(d, source=str(p))


def with_overrides(cfg: Config, **changes: Any) -> Config:
    """Apply CLI overrides with dataclasses.replace on nested sections, e.g.
    ``with_overrides(cfg, weights={'bits': 4}, calibration={'method': 'mse'})``."""
    top: dict[str, Any] = {}
    for key, val in changes.items():
        if val is None:
            continue
        if key not in TOP_KEYS:
            raise ConfigError(f"override: unknown key '{key}'{_did_you_mean(key, TOP_KEYS)}")
        current = getattr(cfg, key)
        if key == "data" and isinstance(val, Mapping):
            val = _data_section(val, "override.data")
        elif key == "target":
            val = _enum(Target, val.value if isinstance(val, Target) else val, "override.target")
        elif key in ("fold_batchnorm", "ahead_relu", "quantize_outputs"):
            val = _bool(val, f"override.{key}")
        elif isinstance(val, Mapping) and dataclasses.is_dataclass(current):
            val = _section(type(current), val, f"override.{key}", base=current)
        top[key] = val
    acts = changes.get("activations")
    given = isinstance(acts, Mapping) and acts.get("symmetric") is not None
    if top.get("target") == Target.TRT and cfg.target != Target.TRT and not given:
        # as a config file saying target: trt (config_from_dict): symmetric activations
        top["activations"] = replace(top.get("activations", cfg.activations), symmetric=True)
    return replace(cfg, **top)


# the YAML writer (its own module; re-exported here, where readers and writers meet)
from amq.config_dump import config_to_dict, dump_config  # noqa: E402, F401
