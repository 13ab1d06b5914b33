"""The calibration's memory budget (``calibration.memory_mb``): the batches of the passes whose
memory grows with the batch - the calibration pass, bias correction and the summary's
float-vs-quantized runs (PP-OCR det at batch 16: +470, +400..700 and +300 MB over what the
process held) - are sized so that the process stays near the budget (during an API call, less
what the process held before it past a fresh process's FRESH_MB: ``budgeted``). Those passes
give the same results at any batching (runner.collect_stats; bias correction adds per-sample
sums), so the budget changes memory and time, never the model. It is a sizing, not a hard
limit: the model and the data are what they are. The overflow check, whose results depend on its batches of 4,
keeps them and exposes its layers' inputs in as many runs as the budget asks for instead
(calib/saturation.py).

The memory a sample costs is measured, not estimated from shapes: an estimate from the live
tensors' sizes was 4-7x off against onnxruntime's real use on PP-OCR det, and one pass's cost
from another's (a float run's, times a factor per pass) missed PP-OCRv6 rec's calibration by 2x
(its taps hold 3.1 float runs a sample, against 1.5 assumed). The calibration pass and bias
correction each run their first sample alone while a second thread polls the process's resident
size (Linux /proc/self/statm) and size their later batches from what it added
(measured_batches); the summary's batch comes from a float run's cost (sample_cost). Where the
resident size cannot be read, the configured batch is kept and the summary says so."""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import numpy as np
import onnx

from amq.calib import runner
from amq.calib.data import Dataset, InputSpec, batches
from amq.runtime import release_free_memory

MB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
POLL_SECONDS = 0.0005
# what a sample costs in the summary's runs, in float runs of a sample (its Q/DQ sessions cost
# about what the calibration session's taps do: PP-OCR det 0.7-1.1x); the calibration pass and
# bias correction measure their own (measured_batches)
CALIBRATION = 1.5
BIAS_BATCH = 8  # bias correction's batch at most
# a sample of a larger batch costs more than the first sample alone (resident size a pass adds
# past its session; PP-OCRv6 det: bias correction 126 MB alone, 135 / 145 / 210 MB a sample in
# batches of 2 / 3 / 5, calibration 96 MB alone, 121 MB a sample in batches of 7; PP-OCRv6 rec:
# calibration 38 MB alone, 61 MB a sample in batches of 13)
HEADROOM = 2.0
SUMMARY_SECONDS = 1.0  # what the summary's runs may take, in float-run time ...
SUMMARY_RUNS = 5.0  # ... with a sample's two quantized runs worth this many float runs
MIN_SUMMARY = 4  # samples the summary takes at least (8 cost PP-OCRv6 det and the YOLOv8n layout
# detector 4.3 and 4.9 s, a fifth of their quantize time; the summary reports, it decides nothing)
SUMMARY_SAMPLES = 64  # ... and at most, by default
# what a fresh process holds once amq and its libraries are imported, with room to spare (86 MB
# measured, the CLI about 110 MB): what a call finds held past this is the caller's (``budgeted``)
FRESH_MB = 256.0
_outside: float | None = None  # MB not counted, set by the outermost ``budgeted`` call

P = ParamSpec("P")
R = TypeVar("R")


def budgeted(fn: Callable[P, R]) -> Callable[P, R]:
    """For the API's verbs: during the call, the budget counts the process's resident size
    less what it held past FRESH_MB when the call began - a notebook's data, a host
    application's own memory, the caller's in-memory calibration samples - so that the budget
    sizes what amq adds. Counted whole, a process already over the budget ran every pass a
    sample at a time and the overflow check once per layer (PP-OCR det with 1.2 GB held by the
    caller: 5.3 -> 9.8 s). Nested verbs keep the outermost call's baseline. A fresh process
    (the CLI) counts everything, as before."""

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        global _outside
        if _outside is not None:
            return fn(*args, **kwargs)
        now = resident_mb()
        _outside = max(0.0, now - FRESH_MB) if now is not None else 0.0
        try:
            return fn(*args, **kwargs)
        finally:
            _outside = None

    return call


def outside_mb() -> float:
    """What the budget does not count: the caller's memory (``budgeted``), 0 outside a verb."""
    return _outside or 0.0


def counted_mb() -> float | None:
    """The resident size the budget counts (``budgeted``), None where it cannot be read."""
    now = resident_mb()
    return None if now is None else now - outside_mb()


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

    def summary_samples(self, limit: int) -> int:
        """How many samples the summary's float-vs-quantized runs take: ``limit``, or fewer
        (not under MIN_SUMMARY) where a sample is slow, so that the summary's two quantized
        runs (the Q/DQ math unoptimized, about 4 float runs, and the runtime's) stay near
        SUMMARY_SECONDS: the summary was 28% of PP-OCR det's quantize time."""
        if not self.sample_seconds or limit <= MIN_SUMMARY:
            return limit
        fit = int(SUMMARY_SECONDS / (SUMMARY_RUNS * self.sample_seconds))
        return max(MIN_SUMMARY, min(limit, fit))

    @property
    def batch(self) -> int:
        """The summary's batch where the calibration pass measured none: its samples cost
        CALIBRATION float runs each (its Q/DQ sessions about what the calibration's taps do), at
        most the configured batch."""
        if self.room_mb is None or not self.per_sample_mb:
            return self.configured
        fit = int(np.floor(self.room_mb / (CALIBRATION * self.per_sample_mb)))
        return max(1, min(self.configured, fit))

    def note(self, measured: Mapping[str, Measured] | None = None) -> str | None:
        """A line for the summary where the budget made a pass's batches smaller than configured
        (``measured``: each pass's, from measured_batches) or could not be applied."""
        if self.budget_mb <= 0:
            return None
        if not self.measurable:
            return (
                f"memory budget {self.budget_mb} MB: the process's memory cannot be read on this "
                f"system; batches of {self.configured} samples as configured"
            )
        cut = {k: m for k, m in (measured or {}).items() if m.batch < m.cap and m.sample_mb}
        if not cut:
            return None
        parts = ", ".join(
            f"{k} in batches of {m.batch} (a sample took {m.sample_mb:.0f} MB of it, "
            f"{m.held_mb:.0f} MB were held)"
            for k, m in cut.items()
        )
        return (
            f"memory budget {self.budget_mb} MB: {parts}; configured {self.configured}: "
            f"more passes, the same statistics and model{uncounted()}"
        )


@dataclass(frozen=True)
class Measured:
    """A pass's batch as measured_batches sized it: at most ``cap``; ``sample_mb`` what its
    first sample added to the resident size, ``held_mb`` the resident size before it."""

    batch: int
    cap: int
    sample_mb: float | None = None  # None where the resident size could not be measured
    held_mb: float | None = None


def uncounted() -> str:
    """The clause a budget note ends with where the caller's memory was not counted."""
    out = outside_mb()
    return f" (not counted: {out:.0f} MB the process held before this call)" if out else ""


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
    with PeakWatch() as watch:
        sess.run(names, feeds)
    t0 = time.perf_counter()
    sess.run(names, feeds)
    return watch.added_mb, time.perf_counter() - t0


class PeakWatch:
    """The resident size a block adds at its peak (``added_mb``, at least 1 MB; None where the
    resident size cannot be read), polled from a second thread after the heap's free memory went
    back to the system (glibc keeps what onnxruntime freed, and a run reusing it would not
    show); polled rather than read from VmHWM, as resetting that would spoil the peak anyone
    else measures of this process."""

    def __init__(self) -> None:
        self.before: float | None = None
        self.peak = 0.0
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakWatch:
        if resident_mb() is not None and release_free_memory():
            self.before = self.peak = resident_mb() or 0.0
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, resident_mb() or 0.0)
            self._done.wait(POLL_SECONDS)

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self.peak = max(self.peak, resident_mb() or 0.0)
            self._done.set()
            self._thread.join()

    @property
    def added_mb(self) -> float | None:
        return None if self.before is None else max(self.peak - self.before, 1.0)


def measured_batches(
    data: Dataset,
    specs: list[InputSpec],
    batch: int,
    budget_mb: int,
    first: int = 0,
    record: Callable[[Measured], None] | None = None,
) -> Iterator[tuple[dict[str, np.ndarray], list, int]]:
    """Batches (as calib.data.batches yields them) for a pass whose results do not depend on
    the batching, sized by what the pass's own first sample costs: that sample comes alone, and
    the resident size the pass adds while it runs and folds it (from this yield until the next
    batch is asked for), times HEADROOM, is a sample's cost; the later batches hold as many
    samples as the budget's room at the pass's start fits at that cost, at most ``batch``.
    ``first``: no batch crosses it (the summary's samples). ``record``: told the batch chosen.
    Without a budget, a second sample or a readable resident size: batches of ``batch``."""
    if budget_mb <= 0 or batch <= 1 or len(data) < 2 or resident_mb() is None:
        yield from _split_batches(data, specs, batch, first)
        return
    with PeakWatch() as watch:
        yield from batches(data.head(1), specs, 1)
    n, held = batch, None if watch.before is None else watch.before - outside_mb()
    if watch.added_mb is not None and held is not None:
        n = max(1, min(batch, int((budget_mb - held) // (HEADROOM * watch.added_mb))))
    if record is not None:
        record(Measured(n, batch, watch.added_mb, held))
    yield from _split_batches(data.after(1), specs, n, max(first - 1, 0))


def replayed_batches(
    data: Dataset, specs: list[InputSpec], measured: Measured | None, batch: int
) -> Iterator[tuple[dict[str, np.ndarray], list, int]]:
    """The batches measured_batches gave the first samples of ``data`` (its first sample alone,
    then batches of the size it chose), for a pass that reads outputs kept per batch of it; where
    it measured nothing (``measured`` None), batches of ``batch``."""
    if measured is None:
        yield from batches(data, specs, batch)
        return
    yield from batches(data.head(1), specs, 1)
    yield from batches(data.after(1), specs, measured.batch)


def _split_batches(
    data: Dataset, specs: list[InputSpec], batch: int, first: int
) -> Iterator[tuple[dict[str, np.ndarray], list, int]]:
    """calib.data.batches, with no batch across sample ``first`` (when inside the data)."""
    if 0 < first < len(data):
        yield from batches(data.head(first), specs, batch)
        yield from batches(data.after(first), specs, batch)
    else:
        yield from batches(data, specs, batch)


def choose_batch(
    model: onnx.ModelProto, data: Dataset, specs: list[InputSpec], configured: int, budget_mb: int
) -> BatchChoice:
    """What the budget leaves the passes, and what the summary's runs may take, from a sample's
    measured cost."""
    if len(data) <= 1:
        return BatchChoice(configured, budget_mb)
    per, seconds = sample_cost(model, data, specs)
    held = counted_mb()
    if budget_mb <= 0 or configured <= 1:
        return BatchChoice(configured, budget_mb, sample_seconds=seconds)
    if per is None or held is None:
        return BatchChoice(configured, budget_mb, measurable=False, sample_seconds=seconds)
    room = max(budget_mb - held, 0.0)
    return BatchChoice(configured, budget_mb, room, per, held, sample_seconds=seconds)
