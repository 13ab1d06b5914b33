"""calibration.memory_mb (amq/calib/memory.py): the batches of the calibration pass, bias
correction and the summary are sized from a sample's measured cost; the model does not change."""

from __future__ import annotations

import sys

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


def test_the_summary_batch_from_the_room_left_and_the_note_from_what_passes_measured():
    c = memory.BatchChoice(16, 1024, room_mb=300.0, per_sample_mb=20.0, held_mb=724.0)
    assert c.batch == 10  # 300 / (1.5 x 20)
    assert memory.BatchChoice(16, 1024, room_mb=0.0, per_sample_mb=20.0, held_mb=1e3).batch == 1
    assert memory.BatchChoice(16, 1024, room_mb=1e6, per_sample_mb=20.0, held_mb=0).batch == 16
    assert memory.BatchChoice(16, 0).batch == 16 and memory.BatchChoice(16, 0).note() is None
    assert c.note() is None  # no pass had to take smaller batches
    measured = {
        "calibration": memory.Measured(3, 16, 95.0, 724.0),
        "bias correction": memory.Measured(8, 8, 20.0, 700.0),  # its cap: not in the note
    }
    note = c.note(measured)
    assert "memory budget 1024 MB: calibration in batches of 3" in note
    assert "95 MB" in note and "bias correction" not in note
    assert "cannot be read" in memory.BatchChoice(16, 1024, measurable=False).note()


class FakeWatch:
    """memory.PeakWatch with a fixed resident size before and cost of the block."""

    before, added_mb = 724.0, 60.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def test_measured_batches_sized_by_what_the_first_sample_cost(monkeypatch):
    """The first sample alone, then batches that the room (1024 - 724 MB) holds at its measured
    cost with headroom (90 MB): 3, at most the batch asked for, never across ``first``; the choice is
    recorded. No budget: the batches asked for."""
    m, fs = conv_net(), feeds(12)
    cfg = config_from_dict({})
    prep = prepare(m, cfg)
    data = open_data(fs, prep.specs, cfg)
    monkeypatch.setattr(FakeWatch, "added_mb", 90.0 / memory.HEADROOM)
    monkeypatch.setattr(memory, "PeakWatch", FakeWatch)
    got: list = []
    sizes = [n for _f, _l, n in memory.measured_batches(data, prep.specs, 16, 1024, 5, got.append)]
    assert sizes == [1, 3, 1, 3, 3, 1] and got == [
        memory.Measured(3, 16, 90.0 / memory.HEADROOM, 724.0)
    ]
    assert [n for *_, n in memory.measured_batches(data, prep.specs, 2, 1024)] == [1] + [2] * 5 + [
        1
    ]
    assert [n for *_, n in memory.measured_batches(data, prep.specs, 5, 0)] == [5, 5, 2]
    replay = memory.replayed_batches(data.head(5), prep.specs, got[0], 16)
    assert [n for *_, n in replay] == [1, 3, 1]  # the summary's calls: those of the kept outputs


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_measured_batches_measure_what_the_pass_holds_while_it_runs_a_sample():
    """The resident size a pass adds between taking the first sample and asking for the next
    (here 64 MB it allocates and touches) is what a sample costs; the batches follow from it."""
    m, fs = conv_net(), feeds(6)
    cfg = config_from_dict({})
    prep = prepare(m, cfg)
    data = open_data(fs, prep.specs, cfg)
    got: list = []
    held = memory.resident_mb()
    sizes = []
    for _f, _l, n in memory.measured_batches(data, prep.specs, 4, int(held + 200), 0, got.append):
        if not sizes:
            block = np.ones(64 << 18, dtype=np.float32)  # 64 MB, resident
            assert block.sum() > 0
            del block
        sizes.append(n)
    (rec,) = got
    assert 60 <= rec.sample_mb < 200 and rec.batch == sizes[1]
    cost = memory.HEADROOM * rec.sample_mb
    assert rec.batch == max(1, min(4, int((held + 200 - rec.held_mb) // cost)))


def test_the_model_is_the_same_at_any_budget(monkeypatch):
    """A budget that leaves room for one sample a batch: calibration, bias correction and the
    summary run sample by sample, and the model's bytes are those of the configured batch; the
    summary's calls replay the calibration's batches, so it builds no float session."""
    m, fs = conv_net(), feeds(24)
    base = amq.quantize(m, fs, config_from_dict({"calibration": {"memory_mb": 0}}), cache_dir=None)
    monkeypatch.setattr(memory, "sample_cost", lambda *a: (1e5, 1e-4))
    monkeypatch.setattr(FakeWatch, "added_mb", 1e5)
    monkeypatch.setattr(memory, "PeakWatch", FakeWatch)
    made = _session_sources(monkeypatch)
    tight = amq.quantize(m, fs, config_from_dict({}), cache_dir=None)
    note = next(n for n in tight.summary.notes if "memory budget" in n)
    assert "calibration in batches of 1" in note and "bias correction in batches of 1" in note
    assert not any("memory budget" in n for n in base.summary.notes)
    assert tight.plan.notes and any("bias correction" in n for n in tight.plan.notes)
    assert tight.model.SerializeToString() == base.model.SerializeToString()
    a, b = base.summary.fidelity["y"]["sqnr_db"], tight.summary.fidelity["y"]["sqnr_db"]
    assert a == pytest.approx(b, rel=1e-6)
    assert "float model" not in made


def test_the_summary_replays_batches_of_three_after_the_first_sample(monkeypatch):
    """Calibration measured 3 a batch after its first sample: the summary's 8 samples run as
    1 + 3 + 3 + 1 on the float outputs the calibration kept (no float session), with the
    fidelity of a run that computed them itself."""
    m, fs = conv_net(), feeds(24)
    base = amq.quantize(m, fs, config_from_dict({"calibration": {"memory_mb": 0}}),
                        cache_dir=None, summary_samples=8)  # fmt: skip
    monkeypatch.setattr(FakeWatch, "before", memory.resident_mb() or 0.0)
    monkeypatch.setattr(FakeWatch, "added_mb", 1024.0 / 3.5 / memory.HEADROOM)
    monkeypatch.setattr(memory, "PeakWatch", FakeWatch)
    made = _session_sources(monkeypatch)
    cfg = config_from_dict({"calibration": {"memory_mb": int(FakeWatch.before) + 1024}})
    res = amq.quantize(m, fs, cfg, cache_dir=None, summary_samples=8)
    assert "float model" not in made and res.summary.samples == 8
    a, b = base.summary.fidelity["y"], res.summary.fidelity["y"]
    assert a["sqnr_db"] == pytest.approx(b["sqnr_db"], rel=1e-6)
    assert res.model.SerializeToString() == base.model.SerializeToString()


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


def test_the_overflow_pass_runs_its_layers_in_groups_that_fit_the_room(monkeypatch, overflow_runs):
    """Where the layers' inputs (4 samples a batch) would take more than half the budget's
    room, the overflow check runs the model once per group of layers that fits: the same
    guard decisions and model as in one run."""
    from amq.calib import saturation

    m, fs = conv_net(160, 8), feeds(6, 160)
    runs = overflow_runs
    monkeypatch.setattr(saturation, "keep_bytes", lambda mb: 0)  # nothing kept: runs needed
    base = amq.quantize(m, fs, config_from_dict({"calibration": {"memory_mb": 0}}), cache_dir=None)
    assert runs == [["c1", "c2"]]  # both read their input from a run (r1: 200k values a sample)
    runs.clear()
    monkeypatch.setattr(saturation, "counted_mb", lambda: 1022.0)  # 1 MB exposed: r1 (3.3) alone
    tight = amq.quantize(m, fs, config_from_dict({}), cache_dir=None)
    assert runs == [["c1"], ["c2"]]
    assert tight.model.SerializeToString() == base.model.SerializeToString()
    assert [lp.overflow for lp in tight.plan.layers.values()] == [
        lp.overflow for lp in base.plan.layers.values()
    ]
    note = "memory budget 1024 MB: the overflow check read its 2 layers' inputs in 2 runs"
    assert any(n.startswith(note) for n in tight.summary.notes)
    assert not any("overflow check read" in n for n in base.summary.notes)
    # an input of fixed batch 1: the data pass runs one sample a call, so a batch holds one
    # sample's inputs (0.8 MB), not 4, and both layers fit one run
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    runs.clear()
    fixed = amq.quantize(m, fs, config_from_dict({}), cache_dir=None)
    assert runs == [["c1", "c2"]]
    assert fixed.plan.to_dict() == base.plan.to_dict()  # (the model differs in its input's shape)


def test_a_verb_counts_what_the_process_held_before_it_past_a_fresh_process(monkeypatch):
    """``budgeted``: during the call the budget counts the resident size less what the process
    held past FRESH_MB when it began; nested verbs keep the outermost baseline; nothing is
    discounted outside a verb or in a fresh process."""
    now = [3000.0]
    monkeypatch.setattr(memory, "resident_mb", lambda: now[0])
    seen: list = []

    @memory.budgeted
    def inner() -> None:
        seen.append(("inner", memory.counted_mb()))

    @memory.budgeted
    def outer() -> str:
        seen.append(("outer", memory.counted_mb()))
        now[0] += 500.0  # what the call itself adds counts
        inner()
        return "done"

    assert outer() == "done"
    assert seen == [("outer", memory.FRESH_MB), ("inner", memory.FRESH_MB + 500.0)]
    assert memory.outside_mb() == 0.0 and memory.counted_mb() == 3500.0
    now[0] = 100.0  # a fresh process: all of it counts
    seen.clear()
    outer()
    assert seen == [("outer", 100.0), ("inner", 600.0)]
    with pytest.raises(ZeroDivisionError):  # a failing call leaves no baseline behind
        memory.budgeted(lambda: 1 / 0)()
    assert memory.outside_mb() == 0.0


def test_memory_the_caller_holds_does_not_shrink_the_batches(monkeypatch, overflow_runs):
    """A process holding 3 GB before amq.quantize (a notebook's data): the passes keep their
    batches and the overflow check its single run, as in a fresh process. Counted whole, that
    memory left no room: a sample a batch and one run of the model per layer."""
    from amq.calib import saturation

    m, fs = conv_net(160, 8), feeds(6, 160)
    runs = overflow_runs
    monkeypatch.setattr(saturation, "keep_bytes", lambda mb: 0)  # nothing kept: a run needed
    fresh = amq.quantize(m, fs, config_from_dict({}), cache_dir=None)
    assert runs == [["c1", "c2"]]
    runs.clear()
    own = memory.resident_mb
    monkeypatch.setattr(memory, "resident_mb", lambda: own() + 3000.0)
    held = amq.quantize(m, fs, config_from_dict({}), cache_dir=None)
    assert runs == [["c1", "c2"]]
    assert held.model.SerializeToString() == fresh.model.SerializeToString()
    assert not any("batches of 1 " in n or "runs of the model" in n for n in held.summary.notes)
