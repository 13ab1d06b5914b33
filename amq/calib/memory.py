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
from dataclasses import dataclass

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
# quantized copy of every layer, 1.1-2x), with room for the heap's fragmentation
CALIBRATION, SUMMARY, BIAS_CORRECTION = 1.5, 1.5, 2.5


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

    def batch_for(self, factor: float, cap: int | None = None) -> int:
        """The batch of a pass whose samples cost ``factor`` float runs each (at most ``cap``,
        default the configured batch)."""
        top = min(self.configured, cap or self.configured)
        if self.room_mb is None or not self.per_sample_mb:
            return top
        fit = int(np.floor(self.room_mb / (factor * self.per_sample_mb)))
        return max(1, min(top, fit))

    @property
    def batch(self) -> int:
        """The calibration pass's batch (and the summary's: its kept float outputs are per
        calibration batch)."""
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
        if self.batch >= self.configured:
            return None
        return (
            f"memory budget {self.budget_mb} MB: calibration in batches of {self.batch} samples, "
            f"bias correction of {self.batch_for(BIAS_CORRECTION, 8)} (configured "
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


def sample_cost_mb(model: onnx.ModelProto, data: Dataset, specs: list[InputSpec]) -> float | None:
    """The peak memory one calibration sample adds in a float session (MB), or None: the
    resident size polled from a second thread while the sample runs, after the heap's free
    memory went back to the system (glibc keeps what onnxruntime freed, and a run reusing it
    would not show). Polled rather than read from VmHWM: resetting that would spoil the peak
    anyone else measures of this process."""
    if not len(data) or resident_mb() is None or not release_free_memory():
        return None
    sess = runner.session(model, source="model (memory budget)")
    names = [o.name for o in model.graph.output]
    call = next(iter(batches(data.head(1), specs, 1)))
    release_free_memory()
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
        for _ in runner.run_batches(sess, names, iter([call])):
            peak[0] = max(peak[0], resident_mb() or 0.0)
    finally:
        done.set()
        t.join()
    return max(peak[0] - before, 1.0)


def choose_batch(
    model: onnx.ModelProto, data: Dataset, specs: list[InputSpec], configured: int, budget_mb: int
) -> BatchChoice:
    """What the budget leaves the passes, from a sample's measured cost."""
    if budget_mb <= 0 or configured <= 1 or len(data) <= 1:
        return BatchChoice(configured, budget_mb)
    per = sample_cost_mb(model, data, specs)
    held = resident_mb()
    if per is None or held is None:
        return BatchChoice(configured, budget_mb, measurable=False)
    return BatchChoice(configured, budget_mb, max(budget_mb - held, 0.0), per, held)
