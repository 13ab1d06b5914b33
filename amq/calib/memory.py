"""The calibration's memory budget (``calibration.memory_mb``): the batches of the passes whose
memory grows with the batch - the calibration pass, bias correction and the summary's
float-vs-quantized runs (PP-OCR det at batch 16: +470, +400..700 and +300 MB over what the
process held) - are sized so that the process stays near the budget. Those passes give the same
results at any batching (runner.collect_stats; bias correction adds per-sample sums), so the
budget changes memory and time, never the model. It is a sizing, not a hard limit: the model,
the data and the passes with small fixed batches (the overflow check's 4) are what they are.

The memory a sample costs is measured, not estimated from shapes: an estimate from the live
tensors' sizes was 4-7x off against onnxruntime's real use on PP-OCR det. The first calibration
sample runs alone through a float session while a second thread polls the process's resident
size (Linux /proc/self/statm). Where that cannot be read, the configured
batch is kept and the summary says so."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, replace

import numpy as np
import onnx

from amq.calib import runner
from amq.calib.data import Dataset, InputSpec, batches
from amq.runtime import release_free_memory

MB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
POLL_SECONDS = 0.0005
# what a sample costs in each pass, in float runs of a sample (PP-OCR det, measured as the
# resident size the pass adds over what the process held: the calibration session with its
# taps about 1.1x, the summary's Q/DQ sessions 0.7x, bias correction's probe, a float and a
# quantized copy of every layer, 1.1-2x), with room for the heap's fragmentation, which varies
# from run to run (bias correction's phase on det at 2.5: 741-1032 MB in three runs, the
# process's peak; at 3.0: 734-834 MB)
CALIBRATION, BIAS_CORRECTION = 1.5, 3.0
BIAS_BATCH = 8  # bias correction's batch at most
SUMMARY_SECONDS = 1.0  # what the summary's runs may take, in float-run time ...
SUMMARY_RUNS = 5.0  # ... with a sample's two quantized runs worth this many float runs
MIN_SUMMARY = 4  # samples the summary takes at least (8 cost PP-OCRv6 det and the YOLOv8n layout
# detector 4.3 and 4.9 s, a fifth of their quantize time; the summary reports, it decides nothing)
SUMMARY_SAMPLES = 64  # ... and at most, by default


@dataclass(frozen=True)
class BatchChoice:
    """What the budget leaves each pass: ``room_mb`` (None: no budget, or not measurable here),
    ``per_sample_mb`` a sample's cost in a float run, ``held_mb`` the process's resident size
    when it was measured."""

    configured: int
    budget_mb: int
    room_mb: float | None = None
    per_sample_mb: float | None = None
    held_mb: float | None = None
    measurable: bool = True
    sample_seconds: float | None = None  # a sample's float run
    bias_batch: int | None = None  # bias correction's, once sized (``at_bias_correction``)

    def summary_samples(self, limit: int) -> int:
        """How many samples the summary's float-vs-quantized runs take: ``limit``, or fewer
        (not under MIN_SUMMARY) where a sample is slow, so that the summary's two quantized
        runs (the Q/DQ math unoptimized, about 4 float runs, and the runtime's) stay near
        SUMMARY_SECONDS: the summary was 28% of PP-OCR det's quantize time."""
        if not self.sample_seconds or limit <= MIN_SUMMARY:
            return limit
        fit = int(SUMMARY_SECONDS / (SUMMARY_RUNS * self.sample_seconds))
        return max(MIN_SUMMARY, min(limit, fit))

    def batch_for(self, factor: float, cap: int | None = None) -> int:
        """The batch of a pass whose samples cost ``factor`` float runs each (at most ``cap``,
        default the configured batch)."""
        top = min(self.configured, cap or self.configured)
        if self.room_mb is None or not self.per_sample_mb:
            return top
        fit = int(np.floor(self.room_mb / (factor * self.per_sample_mb)))
        return max(1, min(top, fit))

    def at_bias_correction(self) -> BatchChoice:
        """This choice with bias correction's batch sized from the room left now: the budget
        less the resident size once the heap's free memory went back, where that is less than
        at the measurement (the process holds more by then: PP-OCR det 330 MB at the
        measurement, about 400 MB at bias correction, where its peak reached 1.15 GB)."""
        room = self.room_mb
        if room is not None and self.per_sample_mb and release_free_memory():
            now = resident_mb()
            if now is not None:
                room = min(room, max(self.budget_mb - now, 0.0))
        return replace(self, bias_batch=replace(self, room_mb=room, bias_batch=None).bias)

    @property
    def bias(self) -> int:
        """Bias correction's batch: as ``at_bias_correction`` sized it, else from the
        measurement."""
        return self.bias_batch or self.batch_for(BIAS_CORRECTION, BIAS_BATCH)

    @property
    def batch(self) -> int:
        """The calibration pass's batch (and the summary's: its kept float outputs are per
        calibration batch; its Q/DQ sessions cost about what the calibration's does)."""
        return self.batch_for(CALIBRATION)

    def note(self) -> str | None:
        """A line for the summary where the budget changed the batch or could not be applied."""
        if self.budget_mb <= 0:
            return None
        if not self.measurable:
            return (
                f"memory budget {self.budget_mb} MB: the process's memory cannot be read on this "
                f"system; batches of {self.configured} samples as configured"
            )
        if self.batch >= self.configured and self.bias >= min(BIAS_BATCH, self.configured):
            return None
        return (
            f"memory budget {self.budget_mb} MB: calibration in batches of {self.batch} samples, "
            f"bias correction of {self.bias} (configured "
            f"{self.configured}; a sample took {self.per_sample_mb:.0f} MB in a float run, "
            f"{self.held_mb:.0f} MB were held): more passes, the same statistics and model"
        )


def resident_mb() -> float | None:
    """The process's resident size (Linux /proc/self/statm), or None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE / MB
    except (OSError, ValueError, IndexError):
        return None


def sample_cost(
    model: onnx.ModelProto, data: Dataset, specs: list[InputSpec]
) -> tuple[float | None, float | None]:
    """What one calibration sample costs in a float session: the peak memory it adds (MB; None
    where the resident size cannot be read) and its run time (s, a second run: the first pays
    for allocations). The memory is the resident size polled from a second thread while the
    sample runs, after the heap's free memory went back to the system (glibc keeps what
    onnxruntime freed, and a run reusing it would not show); polled rather than read from VmHWM,
    as resetting that would spoil the peak anyone else measures of this process."""
    if not len(data):
        return None, None
    sess = runner.session(model, source="model (sample cost)")
    names = [o.name for o in model.graph.output]
    feeds = next(iter(batches(data.head(1), specs, 1)))[0]
    mb = None
    if resident_mb() is not None and release_free_memory():
        before = resident_mb() or 0.0
        peak = [before]
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], resident_mb() or 0.0)
                done.wait(POLL_SECONDS)

        t = threading.Thread(target=poll, daemon=True)
        t.start()
        try:
            sess.run(names, feeds)
            peak[0] = max(peak[0], resident_mb() or 0.0)
        finally:
            done.set()
            t.join()
        mb = max(peak[0] - before, 1.0)
    else:
        sess.run(names, feeds)
    t0 = time.perf_counter()
    sess.run(names, feeds)
    return mb, time.perf_counter() - t0


def choose_batch(
    model: onnx.ModelProto, data: Dataset, specs: list[InputSpec], configured: int, budget_mb: int
) -> BatchChoice:
    """What the budget leaves the passes, and what the summary's runs may take, from a sample's
    measured cost."""
    if len(data) <= 1:
        return BatchChoice(configured, budget_mb)
    per, seconds = sample_cost(model, data, specs)
    held = resident_mb()
    if budget_mb <= 0 or configured <= 1:
        return BatchChoice(configured, budget_mb, sample_seconds=seconds)
    if per is None or held is None:
        return BatchChoice(configured, budget_mb, measurable=False, sample_seconds=seconds)
    room = max(budget_mb - held, 0.0)
    return BatchChoice(configured, budget_mb, room, per, held, sample_seconds=seconds)
