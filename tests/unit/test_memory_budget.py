"""calibration.memory_mb (amq/calib/memory.py): the batches of the calibration pass, bias
correction and the summary are sized from a sample's measured cost; the model does not change."""

from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import amq
from amq.calib import memory
from amq.calib.data import open_data
from amq.calib.prepare import prepare
from amq.config import config_from_dict
from amq.errors import ConfigError


def conv_net(size: int = 16, channels: int = 8) -> onnx.ModelProto:
    r = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(r.normal(size=(channels, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(r.normal(size=channels).astype(np.float32), "b1"),
        numpy_helper.from_array(r.normal(size=(4, channels, 3, 3)).astype(np.float32) * 0.2, "w2"),
        numpy_helper.from_array(r.normal(size=4).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="c1", pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="c2", pads=[1] * 4),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def feeds(n: int, size: int = 16):
    r = np.random.default_rng(1)
    return [{"x": r.normal(size=(1, 3, size, size)).astype(np.float32)} for _ in range(n)]


def test_batches_from_the_room_left():
    c = memory.BatchChoice(16, 1024, room_mb=300.0, per_sample_mb=20.0, held_mb=724.0)
    assert c.batch == 10  # 300 / (1.5 x 20)
    assert c.batch_for(memory.BIAS_CORRECTION, 8) == 5  # 300 / (3 x 20)
    assert memory.BatchChoice(16, 1024, room_mb=0.0, per_sample_mb=20.0, held_mb=1e3).batch == 1
    assert memory.BatchChoice(16, 1024, room_mb=1e6, per_sample_mb=20.0, held_mb=0).batch == 16
    assert memory.BatchChoice(16, 0).batch == 16 and memory.BatchChoice(16, 0).note() is None
    note = c.note()
    assert "memory budget 1024 MB" in note and "batches of 10" in note and "of 5" in note
    assert "cannot be read" in memory.BatchChoice(16, 1024, measurable=False).note()


def test_bias_correction_takes_the_room_left_when_it_runs(monkeypatch):
    """Bias correction runs in a process that holds more than at the measurement: its batch
    comes from the budget less the resident size then, never from more room than measured."""
    c = memory.BatchChoice(16, 1024, room_mb=800.0, per_sample_mb=40.0, held_mb=224.0)
    monkeypatch.setattr(memory, "release_free_memory", lambda: True)
    monkeypatch.setattr(memory, "resident_mb", lambda: 724.0)  # 300 MB left
    late = c.at_bias_correction()
    assert c.batch_for(memory.BIAS_CORRECTION, 8) == 6 and late.bias_batch == 2  # 300 / 120
    assert late.batch == c.batch == 13  # calibration's batch is what it was: 800 / 60
    assert "bias correction of 2" in late.note()
    monkeypatch.setattr(memory, "resident_mb", lambda: 100.0)  # less than at the measurement
    assert c.at_bias_correction().bias_batch == 6  # the measured room, not more
    full = memory.BatchChoice(16, 1024, room_mb=1e4, per_sample_mb=1.0, held_mb=10.0)
    assert full.note() is None and "bias correction of 3" in replace(full, bias_batch=3).note()


def test_the_model_is_the_same_at_any_budget(monkeypatch):
    """A budget that leaves room for one sample a batch: calibration, bias correction and the
    summary run sample by sample, and the model's bytes are those of the configured batch."""
    m, fs = conv_net(), feeds(24)
    base = amq.quantize(m, fs, config_from_dict({"calibration": {"memory_mb": 0}}), cache_dir=None)
    monkeypatch.setattr(memory, "sample_cost", lambda *a: (1e5, 1e-4))
    tight = amq.quantize(m, fs, config_from_dict({}), cache_dir=None)
    note = next(n for n in tight.summary.notes if "memory budget" in n)
    assert "calibration in batches of 1 samples, bias correction of 1" in note
    assert not any("memory budget" in n for n in base.summary.notes)
    assert tight.plan.notes and any("bias correction" in n for n in tight.plan.notes)
    assert tight.model.SerializeToString() == base.model.SerializeToString()
    a, b = base.summary.fidelity["y"]["sqnr_db"], tight.summary.fidelity["y"]["sqnr_db"]
    assert a == pytest.approx(b, rel=1e-6)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_a_sample_costs_at_least_its_largest_tensor():
    """64 channels of 256 x 256 floats per sample: 16 MB each for the Conv's output and its
    Relu; the measured cost of one sample is at least one of them and not absurdly more."""
    m, fs = conv_net(256, 64), feeds(2, 256)
    cfg = config_from_dict({})
    prep = prepare(m, cfg)
    cost, seconds = memory.sample_cost(prep.model, open_data(fs, prep.specs, cfg), prep.specs)
    assert cost is not None and 16 <= cost < 400
    assert seconds is not None and 0 < seconds < 10


def _session_sources(monkeypatch) -> list:
    """The ``source`` of every session runtime.session builds from now on."""
    from amq import runtime

    made: list = []
    real = runtime.session

    def spy(model, *a, **k):
        made.append(k.get("source"))
        return real(model, *a, **k)

    monkeypatch.setattr(runtime, "session", spy)
    return made


def test_the_summary_takes_fewer_samples_where_a_sample_is_slow(monkeypatch):
    """A sample's float run of 0.1 s: the summary compares on 4 samples (not 64), on the float
    outputs the calibration pass kept (its first batch holds them), and says so; the
    model is the same. An explicit summary_samples is kept as given."""
    m, fs = conv_net(), feeds(24)
    base = amq.quantize(m, fs, cache_dir=None, summary_samples=24)
    monkeypatch.setattr(memory, "sample_cost", lambda *a: (1.0, 0.1))
    floats = _session_sources(monkeypatch)
    slow = amq.quantize(m, fs, cache_dir=None)
    assert slow.summary.samples == memory.MIN_SUMMARY
    assert "float model" not in floats  # the summary reused the calibration's float outputs
    assert any("summary on the first 4 calibration samples" in n for n in slow.summary.notes)
    assert slow.model.SerializeToString() == base.model.SerializeToString()
    assert base.summary.samples == 24
    assert memory.BatchChoice(16, 0, sample_seconds=0.1).summary_samples(64) == 4
    assert memory.BatchChoice(16, 0, sample_seconds=0.001).summary_samples(64) == 64
    assert memory.BatchChoice(16, 0, sample_seconds=0.01).summary_samples(64) == 20


def test_summary_samples_not_a_whole_number_of_batches_need_no_float_session(monkeypatch):
    """8 summary samples with batches of 5: the calibration pass runs them as 5 + 3, so its kept
    float outputs are exactly the summary's calls, and no float session is built for the last
    3 (it was, beside the two quantized ones: all-mpnet-base-v2's peak). Same model."""
    m, fs = conv_net(), feeds(24)
    cfg = config_from_dict({"calibration": {"batch_size": 5, "memory_mb": 0}})
    base = amq.quantize(m, fs, cfg, cache_dir=None, summary_samples=0)
    made = _session_sources(monkeypatch)
    res = amq.quantize(m, fs, cfg, cache_dir=None, summary_samples=8)
    assert res.summary.samples == 8
    assert "float model" not in made
    assert res.model.SerializeToString() == base.model.SerializeToString()


def test_memory_mb_in_the_config():
    assert config_from_dict({}).calibration.memory_mb == 1024
    assert config_from_dict({"calibration": {"memory_mb": 0}}).calibration.memory_mb == 0
    with pytest.raises(ConfigError, match="memory_mb"):
        config_from_dict({"calibration": {"memory_mb": -5}})
