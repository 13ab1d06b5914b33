"""Calibration and evaluation data (DESIGN.md §7): folders of .npy / .npz / raw .bin / images, or a
Python reader ``module:function``; checked against the model's inputs with messages that name the
file. Samples are loaded lazily (.npy files are memory-mapped) so memory does not grow with N."""

from __future__ import annotations

import csv
import hashlib
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from amq.config import Config, PreprocessConfig
from amq.errors import DataError
from amq.graph.model import Graph, safe_filename

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
LABEL_FILES = ("labels.npy", "label.npy", "labels.csv")
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
        fingerprint: str,
        description: str,
        rows: Rows | None = None,
        index: list[int] | None = None,
    ) -> None:
        self._loaders = loaders
        self.fingerprint = fingerprint
        self.description = description
        self.rows = rows  # when set, sample i is row index[i] of rows (read in blocks)
        self._index = index if index is not None else list(range(len(loaders)))

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
        fp = hashlib.sha256(f"{self.fingerprint}:head{n}".encode()).hexdigest()
        return Dataset(
            self._loaders[:n], fp, f"{self.description} (first {n})", self.rows, self._index[:n]
        )

    def subset(self, n: int | None, seed: int = 0) -> Dataset:
        """At most n samples: a seeded random choice (kept in order) when there are more."""
        if n is None or n >= len(self):
            return self
        rng = np.random.default_rng(seed)
        idx = sorted(rng.choice(len(self), size=n, replace=False).tolist())
        fp = hashlib.sha256(f"{self.fingerprint}:{idx}".encode()).hexdigest()
        return Dataset(
            [self._loaders[i] for i in idx],
            fp,
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


# ---------------------------------------------------------------------------------------------
# Readers


def _match_input(stem: str, specs: Sequence[InputSpec]) -> InputSpec | None:
    for s in specs:
        if stem in (s.name, safe_filename(s.name)):
            return s
    return None


def _stack_or_single(
    arr_shape: tuple[int, ...], spec: InputSpec, source: str
) -> tuple[int | None, bool]:
    """How an array maps to model calls: (None, _) one call; (n, True) a stack of n calls along a
    new leading axis; (n, False) n calls of batch 1 split off the dynamic batch axis."""
    if spec.shape is None:
        return None, False
    r = len(spec.shape)
    if len(arr_shape) == r:
        if spec.dynamic_batch and r > 0:
            return int(arr_shape[0]), False
        return None, False
    if len(arr_shape) == r + 1:
        return int(arr_shape[0]), True
    raise DataError(
        f"{source}: array of shape {list(arr_shape)} does not fit input {spec.describe()}: give one call "
        f"(rank {r}) or a stack of calls (rank {r + 1})"
    )


def _sample_count(
    modes: dict[str, tuple[int | None, bool]], names: Mapping[str, str], where: str
) -> int | None:
    """The number of calls a set of arrays holds (None: one call), once they agree. An array of
    batch 1 on a dynamic batch axis is one call, like a fixed-shape array beside it (a model
    input next to its recurrent state). ``modes`` is updated to match; ``names``: what to call
    each array in the message."""
    ns = {m[0] for m in modes.values()}
    if ns == {None, 1}:
        for k, (n, _stacked) in modes.items():
            if n == 1:
                modes[k] = (None, False)
        ns = {None}
    if len(ns) > 1:
        desc = ", ".join(
            f"{names[k]}: {'1 call' if v[0] is None else f'{v[0]} samples'}"
            for k, v in modes.items()
        )
        raise DataError(
            f"{where}: inputs hold different numbers of samples ({desc}); give every input the "
            "same number, or one call each"
        )
    return ns.pop() if ns else None


def _take(a: np.ndarray, i: int | None, stacked: bool) -> np.ndarray:
    if i is None:
        return np.asarray(a)
    return np.asarray(a[i]) if stacked else np.asarray(a[i : i + 1])


def _file_digest(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        st = p.stat()
        h.update(str(p.name).encode())
        h.update(str(st.st_size).encode())
        if st.st_size <= 64 * 2**20:
            h.update(hashlib.sha256(p.read_bytes()).digest())
        else:
            h.update(str(st.st_mtime_ns).encode())
    return h.hexdigest()


def _labels_for(folder: Path, n: int) -> list[Any] | None:
    p = folder / "labels.npy"
    if not p.exists():
        p = folder / "label.npy"
    if p.exists():
        lab = np.load(p, allow_pickle=False)
        if len(lab) != n:
            raise DataError(f"{p}: {len(lab)} labels for {n} samples; give one label per sample")
        return list(lab)
    p = folder / "labels.csv"
    if p.exists():
        rows = list(csv.reader(p.read_text(encoding="utf-8").splitlines()))
        vals = [r[-1] for r in rows if r and not r[0].startswith("#")]
        if vals and not _is_int(vals[0]):
            vals = vals[1:]  # header
        if len(vals) != n:
            raise DataError(f"{p}: {len(vals)} labels for {n} samples; give one label per sample")
        return [int(v) if _is_int(v) else v for v in vals]
    return None


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


def _array_reader(
    files: dict[str, Path],
    specs: Sequence[InputSpec],
    load: Callable[[Path, InputSpec], np.ndarray],
) -> tuple[list[Callable[[], Sample]], Rows | None]:
    """Per input one file holding one call or a stack of calls; all inputs must agree on N."""
    arrays = {name: load(p, next(s for s in specs if s.name == name)) for name, p in files.items()}
    counts = {}
    for name, a in arrays.items():
        spec = next(s for s in specs if s.name == name)
        counts[name] = _stack_or_single(a.shape, spec, str(files[name]))
    n = _sample_count(
        counts, {k: p.name for k, p in files.items()}, str(next(iter(files.values())).parent)
    )

    def loader(i: int | None) -> Callable[[], Sample]:
        def f() -> Sample:
            feeds = {k: _take(a, i, counts[k][1]) for k, a in arrays.items()}
            src = ", ".join(str(files[k]) for k in files)
            return Sample(feeds, None, src if i is None else f"{src} [sample {i}]")

        return f

    if n is None:
        return [loader(None)], None
    src = ", ".join(str(p) for p in files.values())
    rows = Rows(arrays, {k: c[1] for k, c in counts.items()}, src)
    return [loader(i) for i in range(n)], rows


class RowFile:
    """Rows of an array stored in a file (an .npy body or raw .bin), read on demand with a seek
    and a read: unlike a memory map, nothing stays resident once a batch is done, so memory does
    not grow with the number of samples."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype, offset: int) -> None:
        self.path, self.shape, self.dtype, self.offset = path, tuple(shape), np.dtype(dtype), offset
        self.ndim = len(self.shape)
        self._row = int(np.prod(self.shape[1:], dtype=np.int64)) if self.ndim else 1

    def _read(self, start: int, count: int) -> np.ndarray:
        with open(self.path, "rb") as f:
            f.seek(self.offset + start * self._row * self.dtype.itemsize)
            a = np.fromfile(f, dtype=self.dtype, count=count * self._row)
        if a.size != count * self._row:
            raise DataError(f"{self.path}: file is shorter than its header says; re-save it")
        return a

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step != 1:
                raise IndexError("RowFile reads contiguous rows only")
            n = max(0, stop - start)
            return self._read(start, n).reshape((n, *self.shape[1:]))
        i = int(key) % self.shape[0]
        return self._read(i, 1).reshape(self.shape[1:])

    def __array__(self, dtype=None, copy=None):
        a = self._read(0, self.shape[0] if self.ndim else 1).reshape(self.shape)
        return a if dtype is None else a.astype(dtype)

    def __len__(self) -> int:
        return self.shape[0]


def _npy_load(p: Path, spec: InputSpec) -> RowFile | np.ndarray:
    try:
        with open(p, "rb") as f:
            major, _minor = np.lib.format.read_magic(f)
            read = (
                np.lib.format.read_array_header_1_0
                if major == 1
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read(f)
            offset = f.tell()
    except Exception as e:
        raise DataError(f"{p}: not a readable .npy file ({type(e).__name__})") from None
    if fortran or dtype.hasobject or not shape:
        return np.load(p, allow_pickle=False)  # rare layouts: read whole
    return RowFile(p, shape, dtype, offset)


def _bin_loader(cfg: Config) -> Callable[[Path, InputSpec], np.ndarray]:
    shapes = dict(cfg.data.input_shapes)
    types = dict(cfg.data.data_types)

    def load(p: Path, spec: InputSpec) -> np.ndarray:
        shape = shapes.get(spec.name)
        if shape is None:
            raise DataError(
                f"{p}: raw .bin data needs the input's shape: --input-shape {spec.name}:1,3,224,224"
            )
        dtype = np.dtype(types.get(spec.name, spec.dtype.name))
        per = int(np.prod(shape))
        size = p.stat().st_size
        if size % (per * dtype.itemsize):
            raise DataError(
                f"{p}: {size} bytes is not a whole number of {dtype.name}{list(shape)} calls "
                f"({per * dtype.itemsize} bytes each); check --input-shape and --data-types"
            )
        n = size // (per * dtype.itemsize)
        return RowFile(p, (n, *shape), dtype, 0)

    return load


def _folder_files(folder: Path, exts: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in exts)


def _per_input_files(
    folder: Path, files: list[Path], specs: Sequence[InputSpec]
) -> list[dict[str, Path]]:
    """Group files into per-call sets: named after the inputs, or (single input) any names."""
    files = [p for p in files if p.name not in LABEL_FILES]
    if len(specs) == 1:
        return [{specs[0].name: p} for p in files]
    mapping: dict[str, Path] = {}
    for p in files:
        spec = _match_input(p.stem, specs)
        if spec is None:
            names = ", ".join(s.name for s in specs)
            raise DataError(
                f"{p}: file name does not name a model input (expected one of: {names})"
            )
        mapping[spec.name] = p
    missing = [s.describe() for s in specs if s.name not in mapping]
    if missing:
        raise DataError(f"{folder}: no file for model input(s) {', '.join(missing)}")
    return [mapping]


def _npz_reader(files: list[Path], specs: Sequence[InputSpec]) -> list[Callable[[], Sample]]:
    loaders: list[Callable[[], Sample]] = []
    for p in files:
        try:
            z = np.load(p, allow_pickle=False)
        except Exception as e:
            raise DataError(f"{p}: not a readable .npz file ({type(e).__name__})") from None
        keys = list(z.keys())
        label_key = next((k for k in ("label", "labels") if k in keys), None)
        arrays: dict[str, np.ndarray] = {}
        for k in keys:
            if k == label_key:
                continue
            spec = (
                _match_input(k, specs)
                if len(specs) > 1 or k in {s.name for s in specs}
                else specs[0]
            )
            if spec is None:
                raise DataError(
                    f"{p}: key '{k}' names no model input (inputs: {', '.join(s.name for s in specs)})"
                )
            arrays[spec.name] = z[k]
        modes = {
            n: _stack_or_single(a.shape, next(s for s in specs if s.name == n), str(p))
            for n, a in arrays.items()
        }
        n = _sample_count(modes, {k: f"'{k}'" for k in modes}, str(p))
        labels = z[label_key] if label_key else None

        def mk(
            i: int | None, arrays=arrays, labels=labels, p=p, modes=modes
        ) -> Callable[[], Sample]:
            def f() -> Sample:
                feeds = {k: _take(a, i, modes[k][1]) for k, a in arrays.items()}
                lab = None if labels is None else (labels if i is None else labels[i])
                return Sample(feeds, lab, str(p) if i is None else f"{p} [sample {i}]")

            return f

        loaders.extend([mk(None)] if n is None else [mk(i) for i in range(n)])
    return loaders


def _image_reader(folder: Path, specs: Sequence[InputSpec], pre: PreprocessConfig | None):
    if pre is None:
        raise DataError(
            f"{folder}: an image folder needs a 'preprocess:' section in the config (resize, crop, mean, std, layout)"
        )
    if len(specs) != 1 or specs[0].dtype.kind != "f":
        raise DataError(f"{folder}: image folders work for models with one float input")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    items: list[tuple[Path, Any]] = []
    if classes:
        for ci, c in enumerate(classes):
            items.extend((p, ci) for p in _folder_files(folder / c, IMAGE_EXTS))
    else:
        files = _folder_files(folder, IMAGE_EXTS)
        labels = _labels_for(folder, len(files))
        items = [(p, None if labels is None else labels[i]) for i, p in enumerate(files)]
    spec = specs[0]

    def mk(p: Path, label: Any) -> Callable[[], Sample]:
        return lambda: Sample({spec.name: load_image(p, pre, spec)}, label, str(p))

    return [mk(p, lab) for p, lab in items], [p for p, _ in items]


def load_image(path: Path, pre: PreprocessConfig, spec: InputSpec) -> np.ndarray:
    """Read and preprocess one image into a [1, C, H, W] (or NHWC) float32 array."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("L" if pre.grayscale else "RGB")
            if pre.resize is not None:
                im = im.resize((pre.resize[1], pre.resize[0]), Image.BILINEAR)
            if pre.crop is not None:
                w, h = im.size
                ch, cw = pre.crop
                if ch > h or cw > w:
                    raise DataError(
                        f"{path}: crop {ch}x{cw} is larger than the image {h}x{w}; resize first"
                    )
                top, left = (h - ch) // 2, (w - cw) // 2
                im = im.crop((left, top, left + cw, top + ch))
            a = np.asarray(im, dtype=np.float32)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot read image ({type(e).__name__})") from None
    if a.ndim == 2:
        a = a[:, :, None]
    if pre.channel_order == "BGR":
        a = a[:, :, ::-1]
    a = a * pre.scale
    c = a.shape[2]
    mean = np.asarray(pre.mean[:c] if len(pre.mean) >= c else pre.mean * c, dtype=np.float32)[:c]
    std = np.asarray(pre.std[:c] if len(pre.std) >= c else pre.std * c, dtype=np.float32)[:c]
    a = (a - mean) / std
    if pre.layout == "NCHW":
        a = a.transpose(2, 0, 1)
    return np.ascontiguousarray(a[None].astype(np.float32))


def import_callable(ref: str, error: type[Exception], what: str) -> Callable[..., Any]:
    """``module:function`` (importable, or found from the current folder) or
    ``path/file.py:function`` -> the function; ``error`` with one line naming ``ref`` otherwise."""
    mod_name, sep, fn_name = ref.rpartition(":")
    if not sep or not mod_name or not fn_name:
        raise error(f"{ref}: expected module:function or path/file.py:function for the {what}")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise error(f"{ref}: {what} file {path} not found")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            assert spec and spec.loader
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            mod = importlib.import_module(mod_name)
    except error:
        raise
    except Exception as e:
        raise error(f"{ref}: cannot import the {what} module ({type(e).__name__}: {e})") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise error(f"{ref}: module has no function '{fn_name}'")
    return fn


def _plugin_reader(
    ref: str, specs: Sequence[InputSpec], limit: int | None
) -> list[Callable[[], Sample]]:
    fn = import_callable(ref, DataError, "reader")
    items = []
    for i, d in enumerate(fn()):
        if limit is not None and i >= limit:
            break
        if not isinstance(d, Mapping):
            raise DataError(
                f"{ref}: item {i} is a {type(d).__name__}, expected a dict of input name -> array"
            )
        d = dict(d)
        label = d.pop("label", None)
        items.append(Sample({k: np.asarray(v) for k, v in d.items()}, label, f"{ref} [item {i}]"))
    return [lambda s=s: s for s in items]


def _with_label(f: Callable[[], Sample], label: Any) -> Callable[[], Sample]:
    def g() -> Sample:
        s = f()
        return Sample(s.feeds, label, s.source)

    return g


def _arrays_digest(samples: Sequence[Sample]) -> str:
    h = hashlib.sha256()
    for s in samples:
        for k in sorted(s.feeds):
            a = np.ascontiguousarray(s.feeds[k])
            h.update(k.encode())
            h.update(str(a.dtype).encode() + str(a.shape).encode())
            h.update(a.tobytes())
    return h.hexdigest()


def open_data(
    source: str | os.PathLike[str] | Iterable[Mapping[str, np.ndarray]],
    specs: Sequence[InputSpec],
    cfg: Config,
    limit: int | None = None,
) -> Dataset:
    """Open calibration/evaluation data: a folder, a ``module:function`` reader, or (Python API)
    an iterable of {input name: array} dicts."""
    if not isinstance(source, (str, os.PathLike)):
        samples = []
        for i, d in enumerate(source):
            if limit is not None and i >= limit:
                break
            d = dict(d)
            label = d.pop("label", None)
            samples.append(
                Sample({k: np.asarray(v) for k, v in d.items()}, label, f"data item {i}")
            )
        if not samples:
            raise DataError("data: the iterable gave no samples")
        return Dataset(
            [lambda s=s: s for s in samples],
            _arrays_digest(samples),
            f"{len(samples)} in-memory samples",
        )
    text = os.fspath(source)
    p = Path(text)
    if not p.exists() and re.fullmatch(r"(?:[\w.]+|.+\.py):[A-Za-z_]\w*", text):
        loaders = _plugin_reader(text, specs, limit)
        if not loaders:
            raise DataError(f"{text}: the reader gave no samples")
        samples = [f() for f in loaders]
        return Dataset(loaders, _arrays_digest(samples), f"reader {text}")
    if not p.exists():
        raise DataError(f"{p}: data folder not found")
    if p.is_file():
        folder, files = p.parent, [p]
    else:
        folder = p
        files = sorted(q for q in p.iterdir() if q.is_file() and not q.name.startswith("."))
    npy = [f for f in files if f.suffix == ".npy" and f.name not in LABEL_FILES]
    npz = [f for f in files if f.suffix == ".npz"]
    bins = [f for f in files if f.suffix == ".bin"]
    images = [f for f in files if f.suffix.lower() in IMAGE_EXTS]
    subdirs = [d for d in p.iterdir() if d.is_dir()] if p.is_dir() else []
    kinds = [k for k, v in (("npy", npy), ("npz", npz), ("bin", bins), ("images", images)) if v]
    if len(kinds) > 1:
        raise DataError(f"{p}: mixes {' and '.join(kinds)} files; keep one kind of data per folder")
    if (cfg.data.input_shapes or cfg.data.data_types) and kinds and kinds != ["bin"]:
        raise DataError(
            f"{p}: holds {kinds[0]} files, whose shapes and types are their own; --input-shape and "
            "--data-types are for raw .bin data: drop them"
        )
    loaders: list[Callable[[], Sample]] = []
    rows: Rows | None = None
    if npy or bins:
        load = _npy_load if npy else _bin_loader(cfg)
        groups = _per_input_files(folder, npy or bins, specs)
        for group in groups:
            got, rows = _array_reader(group, specs, load)
            loaders.extend(got)
        if len(groups) != 1:
            rows = None  # block reads only within one set of arrays
        labels = _labels_for(folder, len(loaders)) if p.is_dir() else None
        if labels is not None:
            loaders = [_with_label(f, lab) for f, lab in zip(loaders, labels, strict=True)]
            if rows is not None:
                rows.labels = list(labels)
        fp = _file_digest(npy or bins + [q for q in files if q.name in LABEL_FILES])
        desc = f"{folder} ({len(loaders)} samples from {len(npy or bins)} file(s))"
    elif npz:
        loaders = _npz_reader(npz, specs)
        fp = _file_digest(npz)
        desc = f"{folder} ({len(loaders)} samples from {len(npz)} .npz file(s))"
    elif images or subdirs:
        loaders, used = _image_reader(folder, specs, cfg.preprocess)
        fp = _file_digest(used) + repr(cfg.preprocess)
        fp = hashlib.sha256(fp.encode()).hexdigest()
        desc = f"{folder} ({len(loaders)} images)"
    else:
        raise DataError(
            f"{p}: no .npy, .npz, .bin or image files found; see 'amq quantize --help' for the data layout"
        )
    if not loaders:
        raise DataError(f"{p}: no samples found")
    return Dataset(loaders, fp, desc, rows)


def batches(
    ds: Dataset, specs: Sequence[InputSpec], batch_size: int
) -> Iterator[tuple[dict[str, np.ndarray], list[Any], int]]:
    """Feed dicts of up to ``batch_size`` samples concatenated on axis 0 when every input has a
    dynamic batch axis (and shapes agree); else one sample per call. Yields (feeds, labels, n)."""
    can_batch = batch_size > 1 and all(s.dynamic_batch for s in specs)
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
