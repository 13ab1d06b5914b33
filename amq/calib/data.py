"""Calibration and evaluation data (DESIGN.md §7): folders of .npy / .npz / raw .bin / images, or a
Python reader ``module:function``; checked against the model's inputs with messages that name the
file. Samples are loaded lazily (.npy files are memory-mapped) so memory does not grow with N.
What a sample, a Dataset and a batch are, and the checks against the model's inputs, are in
samples.py (re-exported here)."""

from __future__ import annotations

import csv
import hashlib
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from amq.calib.samples import (  # noqa: F401  (re-exported: the data API in one place)
    ONNX_TO_NP,
    Dataset,
    InputSpec,
    Rows,
    Sample,
    batch_limit,
    batches,
    check_sample,
    input_specs,
)
from amq.config import Config, PreprocessConfig
from amq.errors import DataError
from amq.graph.model import safe_filename

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
LABEL_FILES = ("labels.npy", "label.npy", "labels.csv")


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
        return _from_iterable(source, limit)
    text = os.fspath(source)
    p = Path(text)
    if not p.exists() and re.fullmatch(r"(?:[\w.]+|.+\.py):[A-Za-z_]\w*", text):
        loaders = _plugin_reader(text, specs, limit)
        if not loaders:
            raise DataError(f"{text}: the reader gave no samples")
        samples = [f() for f in loaders]
        return Dataset(loaders, lambda: _arrays_digest(samples), f"reader {text}")
    if not p.exists():
        raise DataError(f"{p}: data folder not found")
    return _from_folder(p, specs, cfg)


def _from_iterable(source: Iterable[Mapping[str, np.ndarray]], limit: int | None) -> Dataset:
    """In-memory samples (the Python API): dicts of input name -> array, "label" optional."""
    samples = []
    for i, d in enumerate(source):
        if limit is not None and i >= limit:
            break
        d = dict(d)
        label = d.pop("label", None)
        samples.append(Sample({k: np.asarray(v) for k, v in d.items()}, label, f"data item {i}"))
    if not samples:
        raise DataError("data: the iterable gave no samples")
    return Dataset(
        [lambda s=s: s for s in samples],
        lambda: _arrays_digest(samples),
        f"{len(samples)} in-memory samples",
    )


def _data_files(p: Path, cfg: Config) -> tuple[Path, list[Path], dict[str, list[Path]]]:
    """The folder, its files and the one kind of data among them (npy, npz, bin, images);
    a folder that mixes kinds, or --input-shape/--data-types for data other than .bin, is an
    error."""
    if p.is_file():
        folder, files = p.parent, [p]
    else:
        folder = p
        files = sorted(q for q in p.iterdir() if q.is_file() and not q.name.startswith("."))
    by_kind = {
        "npy": [f for f in files if f.suffix == ".npy" and f.name not in LABEL_FILES],
        "npz": [f for f in files if f.suffix == ".npz"],
        "bin": [f for f in files if f.suffix == ".bin"],
        "images": [f for f in files if f.suffix.lower() in IMAGE_EXTS],
    }
    kinds = [k for k, v in by_kind.items() if v]
    if len(kinds) > 1:
        raise DataError(f"{p}: mixes {' and '.join(kinds)} files; keep one kind of data per folder")
    if (cfg.data.input_shapes or cfg.data.data_types) and kinds and kinds != ["bin"]:
        raise DataError(
            f"{p}: holds {kinds[0]} files, whose shapes and types are their own; --input-shape and "
            "--data-types are for raw .bin data: drop them"
        )
    return folder, files, by_kind


def _from_folder(p: Path, specs: Sequence[InputSpec], cfg: Config) -> Dataset:
    """A folder (or one file) of .npy, .npz, raw .bin or images (class subfolders: labels)."""
    folder, files, kind = _data_files(p, cfg)
    npy, npz, bins = kind["npy"], kind["npz"], kind["bin"]
    subdirs = [d for d in p.iterdir() if d.is_dir()] if p.is_dir() else []
    rows: Rows | None = None
    if npy or bins:
        loaders, rows = _arrays_from_files(p, folder, npy or bins, specs, cfg, bool(npy))
        hashed = npy or bins + [q for q in files if q.name in LABEL_FILES]
        fp: Callable[[], str] = lambda: _file_digest(hashed)  # noqa: E731  (read when needed)
        desc = f"{folder} ({len(loaders)} samples from {len(npy or bins)} file(s))"
    elif npz:
        loaders = _npz_reader(npz, specs)
        fp = lambda: _file_digest(npz)  # noqa: E731
        desc = f"{folder} ({len(loaders)} samples from {len(npz)} .npz file(s))"
    elif kind["images"] or subdirs:
        loaders, used = _image_reader(folder, specs, cfg.preprocess)
        how = repr(cfg.preprocess)
        fp = lambda: hashlib.sha256((_file_digest(used) + how).encode()).hexdigest()  # noqa: E731
        desc = f"{folder} ({len(loaders)} images)"
    else:
        raise DataError(
            f"{p}: no .npy, .npz, .bin or image files found; see 'amq quantize --help' for the data layout"
        )
    if not loaders:
        raise DataError(f"{p}: no samples found")
    return Dataset(loaders, fp, desc, rows)


def _arrays_from_files(
    p: Path,
    folder: Path,
    files: list[Path],
    specs: Sequence[InputSpec],
    cfg: Config,
    is_npy: bool,
) -> tuple[list[Callable[[], Sample]], Rows | None]:
    """.npy or .bin files, one per input (or per input and group), with the folder's labels."""
    load = _npy_load if is_npy else _bin_loader(cfg)
    groups = _per_input_files(folder, files, specs)
    loaders: list[Callable[[], Sample]] = []
    rows: Rows | None = None
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
    return loaders, rows
