"""What a sample is and how samples reach a model (DESIGN.md §7): the model's input specs, a
Sample and a lazily loaded Dataset, the check of a sample against the inputs (messages that name
the file), and batches. The readers that open a folder or a reader function are in data.py."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from amq.errors import DataError
from amq.graph.model import Graph

ONNX_TO_NP = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.INT16: np.int16,
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.BOOL: np.bool_,
}


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None  # None entries are dynamic; None: rank unknown

    def describe(self) -> str:
        if self.shape is None:
            return f"{self.name} ({self.dtype.name}, any shape)"
        dims = ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name} {self.dtype.name}[{dims}]"

    @property
    def dynamic_batch(self) -> bool:
        return self.shape is not None and len(self.shape) > 0 and self.shape[0] is None


def input_specs(g: Graph) -> list[InputSpec]:
    specs = []
    for v in g.inputs:
        tt = v.type.tensor_type
        dtype = np.dtype(ONNX_TO_NP.get(tt.elem_type, np.float32))
        shape = None
        if tt.HasField("shape"):
            shape = tuple(
                int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
                for d in tt.shape.dim
            )
        specs.append(InputSpec(v.name, dtype, shape))
    return specs


@dataclass(frozen=True)
class Sample:
    feeds: dict[str, np.ndarray]
    label: Any
    source: str


class Rows:
    """Samples that are rows of the same arrays (one .npy/.bin per input holding every call):
    a batch of them is read with one read per input instead of one per sample."""

    def __init__(self, arrays: Mapping[str, Any], stacked: Mapping[str, bool], source: str) -> None:
        self.arrays, self.stacked, self.source = dict(arrays), dict(stacked), source
        self.labels: list[Any] | None = None

    def read(self, rows: Sequence[int]) -> tuple[dict[str, np.ndarray], list[Any]]:
        runs, start = [], 0
        for k in range(1, len(rows) + 1):  # contiguous runs of row numbers
            if k == len(rows) or rows[k] != rows[k - 1] + 1:
                runs.append((rows[start], rows[k - 1] + 1))
                start = k
        feeds = {}
        for name, a in self.arrays.items():
            parts = [np.asarray(a[i:j]) for i, j in runs]
            b = parts[0] if len(parts) == 1 else np.concatenate(parts)
            # a stack of calls: the calls' own batch axes are concatenated, as batches() does
            feeds[name] = b.reshape(-1, *b.shape[2:]) if self.stacked[name] else b
        labels = [self.labels[i] for i in rows] if self.labels is not None else [None] * len(rows)
        return feeds, labels


class Dataset:
    """An indexable set of samples; each sample is one model call (its arrays have the input's rank)."""

    def __init__(
        self,
        loaders: list[Callable[[], Sample]],
        fingerprint: str | Callable[[], str],
        description: str,
        rows: Rows | None = None,
        index: list[int] | None = None,
    ) -> None:
        """``fingerprint``: or a function that computes it, called when it is first read (only
        the statistics cache reads it: hashing in-memory arrays took the YOLOv8n layout
        detector's 32 pages 0.29 s, for nothing without a cache)."""
        self._loaders = loaders
        self._fingerprint = fingerprint
        self.description = description
        self.rows = rows  # when set, sample i is row index[i] of rows (read in blocks)
        self._index = index if index is not None else list(range(len(loaders)))

    @property
    def fingerprint(self) -> str:
        """What identifies these samples' contents (the statistics cache's key)."""
        if callable(self._fingerprint):
            self._fingerprint = self._fingerprint()
        return self._fingerprint

    def _derived(self, what: str) -> Callable[[], str]:
        return lambda: hashlib.sha256(f"{self.fingerprint}:{what}".encode()).hexdigest()

    def read_block(self, positions: Sequence[int]) -> tuple[dict[str, np.ndarray], list[Any]]:
        """Several samples stacked on the batch axis in one read (needs ``rows``)."""
        assert self.rows is not None
        return self.rows.read([self._index[i] for i in positions])

    def __len__(self) -> int:
        return len(self._loaders)

    def __getitem__(self, i: int) -> Sample:
        return self._loaders[i]()

    def head(self, n: int | None) -> Dataset:
        """The first n samples (in order)."""
        if n is None or n >= len(self):
            return self
        return Dataset(
            self._loaders[:n],
            self._derived(f"head{n}"),
            f"{self.description} (first {n})",
            self.rows,
            self._index[:n],
        )

    def after(self, n: int) -> Dataset:
        """The samples after the first n (in order)."""
        return Dataset(
            self._loaders[n:],
            self._derived(f"after{n}"),
            f"{self.description} (from {n + 1})",
            self.rows,
            self._index[n:],
        )

    def subset(self, n: int | None, seed: int = 0) -> Dataset:
        """At most n samples: a seeded random choice (kept in order) when there are more."""
        if n is None or n >= len(self):
            return self
        rng = np.random.default_rng(seed)
        idx = sorted(rng.choice(len(self), size=n, replace=False).tolist())
        return Dataset(
            [self._loaders[i] for i in idx],
            self._derived(str(idx)),
            f"{self.description} ({n} of {len(self)})",
            self.rows,
            [self._index[i] for i in idx],
        )

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]


# ---------------------------------------------------------------------------------------------
# Checks


def check_sample(sample: Sample, specs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    """Cast within a dtype kind, check names, rank, static dims and finiteness; return feeds."""
    feeds = {}
    for spec in specs:
        if spec.name not in sample.feeds:
            have = ", ".join(sorted(sample.feeds)) or "nothing"
            raise DataError(
                f"{sample.source}: missing model input '{spec.name}' (expected {spec.describe()}; found {have})"
            )
        a = np.asarray(sample.feeds[spec.name])
        if a.dtype != spec.dtype:
            kind_ok = (a.dtype.kind == "f" and spec.dtype.kind == "f") or (
                a.dtype.kind in "iub" and spec.dtype.kind in "iub"
            )
            if not kind_ok:
                raise DataError(
                    f"{sample.source}: input '{spec.name}' has dtype {a.dtype.name}, the model expects "
                    f"{spec.dtype.name}; save it as {spec.dtype.name}"
                )
            a = a.astype(spec.dtype)
        if spec.shape is not None:
            bad = a.ndim != len(spec.shape) or any(
                d is not None and d != s for d, s in zip(spec.shape, a.shape, strict=False)
            )
            if bad:
                raise DataError(
                    f"{sample.source}: input '{spec.name}' has shape {list(a.shape)}, the model expects "
                    f"{spec.describe()} per call (or a stack of those with one more leading axis)"
                )
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise DataError(
                f"{sample.source}: input '{spec.name}' contains NaN or Inf; clean the data"
            )
        feeds[spec.name] = a
    return feeds


def batch_limit(specs: Sequence[InputSpec], batch_size: int) -> int:
    """The samples a call of ``batches`` holds at most: ``batch_size`` where every input has a
    dynamic batch axis, else 1."""
    return batch_size if batch_size > 1 and all(s.dynamic_batch for s in specs) else 1


def batches(
    ds: Dataset, specs: Sequence[InputSpec], batch_size: int
) -> Iterator[tuple[dict[str, np.ndarray], list[Any], int]]:
    """Feed dicts of up to ``batch_size`` samples concatenated on axis 0 when every input has a
    dynamic batch axis (and shapes agree); else one sample per call (``batch_limit``). Yields
    (feeds, labels, n)."""
    can_batch = batch_limit(specs, batch_size) > 1
    if can_batch and ds.rows is not None:
        yield from _row_batches(ds, specs, batch_size)
        return
    pending: list[dict[str, np.ndarray]] = []
    labels: list[Any] = []

    def flush():
        if len(pending) == 1:
            out = pending[0]
        else:
            out = {k: np.concatenate([p[k] for p in pending], axis=0) for k in pending[0]}
        n = sum(next(iter(p.values())).shape[0] if p else 1 for p in pending) if can_batch else 1
        return out, list(labels), n

    for s in ds:
        feeds = check_sample(s, specs)
        if not can_batch:
            yield feeds, [s.label], 1
            continue
        if pending and any(pending[0][k].shape[1:] != feeds[k].shape[1:] for k in feeds):
            yield flush()
            pending.clear()
            labels.clear()
        pending.append(feeds)
        labels.append(s.label)
        if len(pending) >= batch_size:
            yield flush()
            pending.clear()
            labels.clear()
    if pending:
        yield flush()


def _row_batches(
    ds: Dataset, specs: Sequence[InputSpec], batch_size: int
) -> Iterator[tuple[dict[str, np.ndarray], list[Any], int]]:
    """batches() for samples that are rows of the same arrays: one read and one check per batch
    (a failed check is repeated sample by sample, so the message names the sample)."""
    assert ds.rows is not None
    for start in range(0, len(ds), batch_size):
        positions = range(start, min(start + batch_size, len(ds)))
        feeds, labels = ds.read_block(positions)
        try:
            feeds = check_sample(Sample(feeds, None, ds.rows.source), specs)
        except DataError:
            for i in positions:
                check_sample(ds[i], specs)
            raise
        yield feeds, labels, int(next(iter(feeds.values())).shape[0])
