"""amq.config: defaults, YAML load/dump, validation messages, layer priority (DESIGN.md §5)."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from amq.config import (
    ActivationsConfig,
    Config,
    Granularity,
    RangeMethod,
    Target,
    config_from_dict,
    dump_config,
    load_config,
    with_overrides,
)
from amq.errors import ConfigError

FULL_YAML = """\
amq: 1
target: generic
calibration: {method: mse, percentile: 99.9, num_samples: 64, batch_size: 8, seed: 7, bins: 4096}
weights: {bits: 4, granularity: per_tensor}
activations: {bits: 16, symmetric: true}
fold_batchnorm: false
ahead_relu: false
quantize_outputs: true
guards: {sentinels: false, concat_range_ratio: 32.0}
preprocess:
  resize: [256, 320]
  crop: 224
  scale: 0.5
  mean: [0.485, 0.456, 0.406]
  std: [0.229, 0.224, 0.225]
  layout: NHWC
  channel_order: BGR
  grayscale: false
data:
  input_shapes: {input: [1, 3, 224, 224], mask: [1, 128]}
  data_types: {input: float32, mask: int64}
op_types:
  MatMul: {activations: {bits: 16}}
  Conv: {weights: {bits: 8, granularity: per_channel}, skip: false}
layers:
  "/layer1/*/Conv": {weights: {bits: 4}}
  "/fc/Gemm": {activations: {bits: 16, symmetric: false}}
  "/head/*": {skip: true}
"""


def write(tmp_path, text: str, name: str = "cfg.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    return p


def config_error(tmp_path, text: str) -> str:
    with pytest.raises(ConfigError) as ei:
        load_config(write(tmp_path, text))
    msg = str(ei.value)
    assert "\n" not in msg, msg
    assert msg.strip() == msg and msg
    return msg


# ---------------------------------------------------------------------------------------------
# Defaults and a full file


def test_defaults():
    c = load_config(None)
    assert c == Config()
    assert c.amq == 1
    assert c.target is Target.ORT
    assert c.calibration.method is RangeMethod.PERCENTILE
    assert c.calibration.percentile == 99.99
    assert (c.calibration.num_samples, c.calibration.batch_size, c.calibration.seed) == (256, 16, 0)
    assert (c.weights.bits, c.weights.granularity) == (8, Granularity.PER_CHANNEL)
    assert (c.activations.bits, c.activations.symmetric) == (8, False)
    assert c.fold_batchnorm is True and c.ahead_relu is True
    assert c.op_types == () and c.layers == ()


@pytest.mark.parametrize("text", ["", "{}\n", "# only a comment\n"])
def test_empty_file_is_defaults(tmp_path, text):
    assert load_config(write(tmp_path, text)) == Config()


def test_full_yaml_loads(tmp_path):
    c = load_config(write(tmp_path, FULL_YAML))
    assert c.target is Target.GENERIC
    cal = c.calibration
    assert cal.method is RangeMethod.MSE
    assert (cal.percentile, cal.num_samples, cal.batch_size, cal.seed, cal.bins) == (
        99.9,
        64,
        8,
        7,
        4096,
    )
    assert (c.weights.bits, c.weights.granularity) == (4, Granularity.PER_TENSOR)
    assert (c.activations.bits, c.activations.symmetric) == (16, True)
    assert (c.fold_batchnorm, c.ahead_relu, c.quantize_outputs) == (False, False, True)
    assert (c.guards.sentinels, c.guards.concat_range_ratio) == (False, 32.0)
    pp = c.preprocess
    assert pp is not None
    assert pp.resize == (256, 320) and pp.crop == (224, 224)
    assert pp.mean == (0.485, 0.456, 0.406) and pp.std == (0.229, 0.224, 0.225)
    assert (pp.scale, pp.layout, pp.channel_order, pp.grayscale) == (0.5, "NHWC", "BGR", False)
    assert c.data.input_shapes == (("input", (1, 3, 224, 224)), ("mask", (1, 128)))
    assert c.data.data_types == (("input", "float32"), ("mask", "int64"))
    assert [k for k, _ in c.op_types] == ["MatMul", "Conv"]
    assert [k for k, _ in c.layers] == ["/layer1/*/Conv", "/fc/Gemm", "/head/*"]
    conv = dict(c.op_types)["Conv"]
    assert conv.weights.bits == 8 and conv.weights.granularity is Granularity.PER_CHANNEL
    assert conv.skip is False and conv.activations.bits is None
    assert dict(c.layers)["/head/*"].skip is True


@pytest.mark.parametrize(
    "text", [FULL_YAML, "", "target: trt\n", "target: trt\nactivations: {symmetric: false}\n"]
)
def test_dump_load_round_trip(tmp_path, text):
    c = load_config(write(tmp_path, text))
    dumped = dump_config(c, header="# resolved by amq\n")
    assert dumped.startswith("# resolved by amq\n")
    again = load_config(write(tmp_path, dumped, "again.yaml"))
    assert again == c
    assert dump_config(again) == dump_config(c)


def test_dump_lists_every_section(tmp_path):
    d = yaml.safe_load(dump_config(load_config(write(tmp_path, FULL_YAML))))
    for key in ("amq", "target", "calibration", "weights", "activations", "guards", "layers"):
        assert key in d
    assert d["layers"]["/fc/Gemm"] == {"activations": {"bits": 16, "symmetric": False}}
    assert d["calibration"]["method"] == "mse"


# ---------------------------------------------------------------------------------------------
# Errors: one line, naming the key, with a did-you-mean


def test_unknown_top_key_did_you_mean(tmp_path):
    msg = config_error(tmp_path, "calibraton: {method: mse}\n")
    assert "calibraton" in msg and "did you mean 'calibration'" in msg


def test_unknown_nested_key_did_you_mean(tmp_path):
    msg = config_error(tmp_path, "weights: {bitz: 4}\n")
    assert "weights" in msg and "bitz" in msg and "did you mean 'bits'" in msg


def test_unknown_key_in_layer_override(tmp_path):
    msg = config_error(tmp_path, 'layers:\n  "/a/Conv": {activation: {bits: 16}}\n')
    assert "/a/Conv" in msg and "did you mean 'activations'" in msg
    msg = config_error(tmp_path, "op_types:\n  Conv: {weights: {granularty: per_tensor}}\n")
    assert "did you mean 'granularity'" in msg


def test_unknown_key_without_close_match_lists_allowed(tmp_path):
    msg = config_error(tmp_path, "activations: {zzz: 1}\n")
    assert "zzz" in msg and "bits" in msg and "symmetric" in msg


@pytest.mark.parametrize("bits", [0, 1, 2, 3, 5, 7, 12, 32, 64, -8, "'8'", "8.0", "true"])
@pytest.mark.parametrize(
    "where",
    [
        "weights: {{bits: {b}}}",
        "activations: {{bits: {b}}}",
        "op_types: {{Conv: {{weights: {{bits: {b}}}}}}}",
        "layers: {{'/a/*': {{activations: {{bits: {b}}}}}}}",
    ],
)
def test_bits_outside_allowed(tmp_path, bits, where):
    msg = config_error(tmp_path, where.format(b=bits) + "\n")
    assert "bits" in msg and "4, 8, 16" in msg


def test_null_bits_error_globally_but_inherit_in_overrides(tmp_path):
    assert "4, 8, 16" in config_error(tmp_path, "weights: {bits: null}\n")
    c = load_config(write(tmp_path, "op_types: {Conv: {weights: {bits: null}}}\n"))
    assert c.settings_for("/c/Conv", "Conv").weight_bits == 8


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_bits_allowed(tmp_path, bits):
    c = load_config(write(tmp_path, f"weights: {{bits: {bits}}}\nactivations: {{bits: {bits}}}\n"))
    assert c.weights.bits == bits and c.activations.bits == bits


@pytest.mark.parametrize(
    "text,bad,suggest",
    [
        ("target: tensorrt\n", "tensorrt", None),
        ("target: ortt\n", "ortt", "ort"),
        ("calibration: {method: percentle}\n", "percentle", "percentile"),
        ("calibration: {method: kl}\n", "kl", None),
        ("weights: {granularity: per_chanel}\n", "per_chanel", "per_channel"),
    ],
)
def test_enum_errors(tmp_path, text, bad, suggest):
    msg = config_error(tmp_path, text)
    assert f"'{bad}'" in msg
    if suggest:
        assert f"did you mean '{suggest}'" in msg
    else:
        assert "did you mean" not in msg


@pytest.mark.parametrize(
    "text",
    [
        "amq: 2\n",
        "calibration: {percentile: 120}\n",
        "calibration: {num_samples: 0}\n",
        "calibration: {batch_size: 2.5}\n",
        "activations: {symmetric: yes please}\n",
        "fold_batchnorm: 1\n",
        "layers: [a, b]\n",
        "weights: 8\n",
        "preprocess: {std: [0.2, 0, 0.2]}\n",
        "preprocess: {layout: CHW}\n",
        "data: {input_shapes: {x: [1, -3]}}\n",
        "layers:\n  a: {skip: maybe}\n",
        "weights: {bits: [8\n",  # not YAML
    ],
)
def test_other_errors_are_one_line(tmp_path, text):
    config_error(tmp_path, text)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as ei:
        load_config(tmp_path / "nope.yaml")
    assert "\n" not in str(ei.value) and "nope.yaml" in str(ei.value)


# ---------------------------------------------------------------------------------------------
# Target TensorRT


def test_trt_makes_activations_symmetric(tmp_path):
    c = load_config(write(tmp_path, "target: trt\n"))
    assert c.target is Target.TRT
    assert c.activations.symmetric is True
    c = load_config(write(tmp_path, "target: trt\nactivations: {bits: 16}\n"))
    assert c.activations == ActivationsConfig(bits=16, symmetric=True)


def test_trt_respects_explicit_asymmetric(tmp_path):
    c = load_config(write(tmp_path, "target: trt\nactivations: {symmetric: false}\n"))
    assert c.activations.symmetric is False


@pytest.mark.parametrize("target", ["ort", "generic"])
def test_other_targets_stay_asymmetric(tmp_path, target):
    assert load_config(write(tmp_path, f"target: {target}\n")).activations.symmetric is False


# ---------------------------------------------------------------------------------------------
# settings_for: layer > op type > global; later layer entries win


def cfg_from(text: str) -> Config:
    return config_from_dict(yaml.safe_load(textwrap.dedent(text)))


PRIORITY = cfg_from(
    """\
    weights: {bits: 8}
    activations: {bits: 8, symmetric: false}
    op_types:
      Conv: {weights: {bits: 16}, activations: {symmetric: true}}
      MatMul: {activations: {bits: 16}}
    layers:
      "/layer1/*": {weights: {bits: 4}}
      "/layer1/0/conv/Conv": {weights: {bits: 8}}
      "/layer1/*/Relu*": {skip: true}
      "/head/*": {skip: true, activations: {bits: 16}}
      "/head/*/Gemm": {skip: false}
      "/odd[1]/Conv": {weights: {bits: 16}}
    """
)


def test_global_settings_when_nothing_matches():
    s = PRIORITY.settings_for("/stem/Add", "Add")
    assert (s.weight_bits, s.act_bits, s.act_symmetric, s.skip) == (8, 8, False, False)
    assert s.granularity is Granularity.PER_CHANNEL


def test_op_type_over_global():
    s = PRIORITY.settings_for("/stem/Conv", "Conv")
    assert (s.weight_bits, s.act_bits, s.act_symmetric) == (16, 8, True)
    s = PRIORITY.settings_for("/attn/MatMul", "MatMul")
    assert (s.weight_bits, s.act_bits) == (8, 16)


def test_layer_over_op_type_and_fields_inherit():
    s = PRIORITY.settings_for("/layer1/3/conv/Conv", "Conv")
    assert s.weight_bits == 4  # layer glob beats op type 16
    assert s.act_symmetric is True  # not set by the layer: op type still applies


def test_later_layer_entries_win():
    assert PRIORITY.settings_for("/layer1/0/conv/Conv", "Conv").weight_bits == 8
    assert PRIORITY.settings_for("/head/fc/Gemm", "Gemm").skip is False
    s = PRIORITY.settings_for("/head/fc/Relu", "Relu")
    assert s.skip is True and s.act_bits == 16
    # the same two entries in the other order: the glob, now later, wins
    swapped = cfg_from(
        """\
        layers:
          "/layer1/0/conv/Conv": {weights: {bits: 8}}
          "/layer1/*": {weights: {bits: 4}}
        """
    )
    assert swapped.settings_for("/layer1/0/conv/Conv", "Conv").weight_bits == 4


def test_glob_star_crosses_slashes():
    assert PRIORITY.settings_for("/layer1/a/b/c/Relu_3", "Relu").skip is True
    assert PRIORITY.settings_for("/layer10/Conv", "Conv").weight_bits == 16  # no match: op type


def test_exact_name_with_glob_characters():
    # op type Gemm has no entry: 16 can only come from the exact-name layer entry
    assert PRIORITY.settings_for("/odd[1]/Conv", "Gemm").weight_bits == 16
    assert PRIORITY.settings_for("/odd[2]/Conv", "Add").weight_bits == 8


def test_matching_is_case_sensitive():
    assert PRIORITY.settings_for("/HEAD/x", "Relu").skip is False


# ---------------------------------------------------------------------------------------------
# with_overrides


def test_with_overrides_merges_nested_sections():
    base = cfg_from("weights: {bits: 16, granularity: per_tensor}\ncalibration: {seed: 3}\n")
    c = with_overrides(base, weights={"bits": 4}, calibration={"method": "mse"}, ahead_relu=False)
    assert c.weights.bits == 4 and c.weights.granularity is Granularity.PER_TENSOR
    assert c.calibration.method is RangeMethod.MSE and c.calibration.seed == 3
    assert c.ahead_relu is False
    # the original is untouched (frozen, replaced not mutated)
    assert base.weights.bits == 16 and base.calibration.method is RangeMethod.PERCENTILE


def test_with_overrides_none_is_ignored_and_target_enum():
    base = Config()
    assert with_overrides(base, weights=None, calibration=None) == base
    c = with_overrides(base, target=Target.TRT, activations={"symmetric": True})
    assert c.target is Target.TRT and c.activations.symmetric is True


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"weigths": {"bits": 4}}, "did you mean 'weights'"),
        ({"weights": {"bits": 3}}, "4, 8, 16"),
        ({"weights": {"bitz": 4}}, "did you mean 'bits'"),
        ({"calibration": {"method": "entropyy"}}, "did you mean 'entropy'"),
    ],
)
def test_with_overrides_validates(kwargs, needle):
    with pytest.raises(ConfigError) as ei:
        with_overrides(Config(), **kwargs)
    assert needle in str(ei.value) and "\n" not in str(ei.value)


def test_with_overrides_converts_and_checks_enum_strings():
    c = with_overrides(Config(), target="trt")
    assert c.target is Target.TRT
    assert "target: trt" in dump_config(c)
    with pytest.raises(ConfigError):
        with_overrides(Config(), target="tensorrt")


# ---------------------------------------------------------------------------------------------
# weights.overflow (PITFALLS 9)


def test_overflow_setting_is_validated_with_a_did_you_mean():
    from amq.config import Overflow

    assert config_from_dict({}).weights.overflow == Overflow.AUTO
    with pytest.raises(ConfigError, match=r"weights\.overflow.*did you mean 'guard'"):
        config_from_dict({"weights": {"overflow": "gaurd"}})


def test_overflow_resolves_layer_over_op_type_over_global():
    from amq.config import Overflow

    cfg = config_from_dict(
        {
            "weights": {"overflow": "guard"},
            "op_types": {"Gemm": {"weights": {"overflow": "off"}}},
            "layers": {
                "/stem/*": {"weights": {"overflow": "off"}},
                "/fc/Gemm": {"weights": {"overflow": "auto"}},
            },
        }
    )
    assert cfg.settings_for("/stem/conv/Conv", "Conv").overflow == Overflow.OFF
    assert cfg.settings_for("/layer1/conv1/Conv", "Conv").overflow == Overflow.GUARD
    assert cfg.settings_for("/other/Gemm", "Gemm").overflow == Overflow.OFF
    assert cfg.settings_for("/fc/Gemm", "Gemm").overflow == Overflow.AUTO


def test_resolved_config_lists_each_layers_overflow_decision(tmp_path):
    import amq
    from tests.conftest import CALIB, EXAMPLE

    cfg = config_from_dict({"layers": {"/layer1/conv1/Conv": {"weights": {"overflow": "guard"}}}})
    res = amq.quantize(EXAMPLE, CALIB, cfg, output=tmp_path / "q.onnx", cache_dir=None)
    layers = dict(load_config(res.config_path).layers)
    got = {k: v.weights.overflow.value for k, v in layers.items() if v.weights.overflow}
    assert got["/stem/conv/Conv"] == "guard"  # decided by the emulation (15% saturate)
    assert got["/layer1/conv1/Conv"] == "guard"  # asked for
    assert got["/layer2/conv/Conv"] == "off"
    assert "/layer1/add/Add" not in got  # no pair-sum kernel: nothing to decide
    text = res.config_path.read_text()
    assert "# overflow guard: /stem/conv/Conv: would saturate" in text
    tp = res.plan.tensors[res.plan.layers["/layer1/conv1/Conv"].weight]
    assert tp.pair_safe_axis == 0 and tp.method == "absmax, pair-safe"


def test_cli_overflow_flag(capsys, tmp_path):
    from tests.cli_helpers import assert_one_line_error, run_cli
    from tests.conftest import CALIB, EXAMPLE

    code, _, err = run_cli(
        capsys, "quantize", str(EXAMPLE), "--calib", str(CALIB), "--overflow", "bogus"
    )
    assert_one_line_error(code, err, "--overflow")
    out = tmp_path / "g.onnx"
    code, _, _ = run_cli(
        capsys,
        "quantize",
        str(EXAMPLE),
        "--calib",
        str(CALIB),
        "-o",
        str(out),
        "--overflow",
        "guard",
        "--no-cache",
        "-q",
    )
    assert code == 0
    layers = dict(load_config(tmp_path / "g.amq.yaml").layers)
    assert {v.weights.overflow.value for v in layers.values() if v.weights.overflow} == {"guard"}
