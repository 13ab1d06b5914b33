"""What the calibration pass keeps of a few tensors on the first calibration samples, for a later
pass that would otherwise run the model again for them (the overflow guard's emulation,
calib/saturation.py; SmoothQuant's replays, calib/replay.py): a small tensor whole, or, of a
large one, only the rows its reader looks at (RowCrop: the bands of output rows the overflow
emulation computes on a large feature map)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from amq.graph.model import NameScope
from amq.runtime import off_heap

if TYPE_CHECKING:
    from amq.calib.runner import Batch


@dataclass
class KeptTensors:
    """The values of a few tensors on the first calibration samples. ``want``: tensor -> samples
    to keep. ``split``: tensors whose axis 0 holds the samples, one row each (checked on every
    batch, as are their other dims): held as one buffer of rows, they may be cut at any sample;
    the others are held one array per batch, only where a batch ends at their count (a batch
    across it drops them, and the later pass runs the model for them). ``rows``: split 4-D
    tensors of which only these indices of axis 2 are held (gathered in the session, so the
    rest is never fetched); their full height is checked equal on every batch. Held outside
    malloc's heap (runtime.off_heap): they outlive the passes around them, whose freed pages
    they would pin."""

    want: dict[str, int]
    split: set[str] = field(default_factory=set)
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    values: dict[str, list[np.ndarray]] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)  # samples held, per tensor
    counts: dict[str, list[int]] = field(default_factory=dict)  # samples of each array held
    heights: dict[str, int] = field(default_factory=dict)  # a row-cut tensor's full axis 2
    fetch: dict[str, Fetch] = field(default_factory=dict)  # a split tensor's session outputs

    def wanted(self) -> list[str]:
        return [t for t, n in self.want.items() if self.kept.get(t, 0) < n]

    def name_outputs(self, scope: NameScope, inputs: set[str]) -> dict[str, Fetch]:
        """What a session outputs of each split tensor still wanted, but the graph ``inputs``
        (cut from the feeds): only the samples wanted, and of a row-cut one only its rows and
        its height (names new in ``scope``, the model's), so that the rest is never fetched."""
        for t in self.split - inputs - set(self.fetch):
            rows = self.rows.get(t)
            height = scope.new(f"{t}_amq_height") if rows is not None else None
            self.fetch[t] = Fetch(self.want[t], scope.new(f"{t}_amq_kept"), rows, height)
        return {t: self.fetch[t] for t in self.wanted() if t in self.fetch}

    def outputs(self, inputs: set[str]) -> list[str]:
        """What a session run must output for the tensors still wanted (graph ``inputs`` come
        from the feeds)."""
        out: list[str] = []
        for t in self.wanted():
            if t in self.fetch:
                out += self.fetch[t].names()
            elif t not in inputs:
                out.append(t)
        return out

    def take(self, b: Batch) -> None:
        for t in self.wanted():
            v = self._value(t, b)
            if v is None:
                self._drop(t)
                continue
            have = self.kept.get(t, 0)
            held = self.values.get(t)
            if t in self.split:  # one buffer of the rows wanted, filled batch by batch
                n = min(b.n, self.want[t]) if t in self.fetch or t in self.rows else b.n
                if v.ndim < 1 or v.shape[0] != n or (held and held[0].shape[1:] != v.shape[1:]):
                    self._drop(t)  # not a row a sample, or rows of another shape
                    continue
                if not held:
                    held = self.values[t] = [off_heap((self.want[t], *v.shape[1:]))]
                rows = v[: self.want[t] - have]
                held[0][have : have + len(rows)] = rows
                self.kept[t] = have + len(rows)
            elif have + b.n > self.want[t]:
                self._drop(t)  # cannot be cut there
            else:
                a = off_heap(v.shape)
                a[...] = v
                self.values.setdefault(t, []).append(a)
                self.counts.setdefault(t, []).append(b.n)
                self.kept[t] = have + b.n

    def _value(self, t: str, b: Batch) -> np.ndarray | None:
        """``t`` in batch ``b`` as it is held (a row-cut tensor: its rows; None where its
        height is not the one held so far, or where they could not be cut)."""
        f = self.fetch.get(t)
        if t in b.feeds:
            v = np.asarray(b.feeds[t])
            if t not in self.rows:
                return v
            if v.ndim != 4 or int(self.rows[t][-1]) >= v.shape[2]:
                return None
            height, v = v.shape[2], v[: self.want[t], :, self.rows[t], :]  # a graph input: here
        elif f is not None and f.out in b.values:
            v = b.values[f.out]
            if f.height is None:
                return v
            height = int(b.values[f.height][0])
            if int(self.rows[t][-1]) >= height:
                return None  # the session clamped the rows to a shorter map
        elif t in b.values and t not in self.fetch:
            return np.asarray(b.values[t])
        else:
            return None
        return v if self.heights.setdefault(t, height) == height else None

    def _drop(self, t: str) -> None:
        self.want[t] = 0
        self.values.pop(t, None)
        self.kept.pop(t, None)
        self.counts.pop(t, None)

    def adopt(self, other: KeptTensors, skip: set[str]) -> None:
        """Take what ``other`` (kept by an earlier pass) holds of the tensors both want alike,
        but those in ``skip`` (whose values have changed since)."""
        for t, n in self.want.items():
            same = (t in self.split) == (t in other.split) and other.want.get(t) == n
            same = same and np.array_equal(self.rows.get(t, ()), other.rows.get(t, ()))
            if t not in skip and same and other.kept.get(t, 0) == n:
                self.values[t], self.kept[t] = other.values[t], n
                if t in other.counts:
                    self.counts[t] = other.counts[t]
                if t in other.heights:
                    self.heights[t] = other.heights[t]

    def holds(self, t: str) -> bool:
        """Some values of ``t`` are held."""
        return bool(self.values.get(t))

    def batches(self, t: str, sizes: Sequence[int]) -> list[np.ndarray | RowCrop] | None:
        """``t`` cut into a later pass's batches of ``sizes`` samples (a split tensor: as many of
        them as the rows kept fill; a row-cut one as RowCrops), or as kept (the others: only when
        held in batches of exactly ``sizes``, so that what the later pass computes per batch
        never depends on how the calibration pass was batched); None where nothing usable is
        held."""
        if not self.holds(t):
            return None
        got = self.values[t]
        if t not in self.split:
            return got if self.counts.get(t) == list(sizes) else None
        rows, out, pos = got[0][: self.kept[t]], [], 0
        for size in sizes:
            if pos + size > len(rows):
                break  # the rows kept end inside this batch
            part = rows[pos : pos + size]
            out.append(RowCrop(part, self.rows[t], self.heights[t]) if t in self.rows else part)
            pos += size
        return out


class Fetch(NamedTuple):
    """What a session outputs of a split tensor that the calibration pass keeps: ``out``, its
    first ``samples`` (rows of axis 0); of a row-cut one, only its ``rows`` of axis 2 on them,
    and ``height``, its axis 2."""

    samples: int
    out: str
    rows: np.ndarray | None = None
    height: str | None = None

    def names(self) -> list[str]:
        """The session outputs it asks for."""
        return [self.out] if self.height is None else [self.out, self.height]


class RowCrop:
    """A 4-D tensor [N, C, H, W] of which only some rows of axis 2 are held: indexed with a
    slice of rows that are all held, it gives their values; else KeyError."""

    def __init__(self, held: np.ndarray, rows: np.ndarray, height: int) -> None:
        self.held, self.rows = held, np.asarray(rows, dtype=np.int64)
        self.shape = (held.shape[0], held.shape[1], int(height), held.shape[3])

    def __getitem__(self, crop: tuple[slice, ...]) -> np.ndarray:
        s = crop[2]
        start, stop, _ = s.indices(self.shape[2])
        at = int(np.searchsorted(self.rows, start))
        n = stop - start
        got = self.rows[at : at + n]  # sorted and unique: all held where both ends are, in place
        if n <= 0 or len(got) < n or got[0] != start or got[-1] != stop - 1:
            raise KeyError(f"rows {start}:{stop} are not held")
        return self.held[crop[0], crop[1], at : at + n, crop[3]]
