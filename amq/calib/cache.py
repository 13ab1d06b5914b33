"""Calibration statistics on disk, keyed by model, data and calibration settings, so that
``sensitivity``, ``search`` and a second ``quantize`` reuse them."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path

import numpy as np
import onnx

from amq.quant.observers import TensorStats

# 3: runtime-side subsampling, Relu outputs observed directly; 4: balanced strides; 5: extreme
# hits; 6: per-channel extremes (ch_axis, ch_min, ch_max)
CACHE_VERSION = 6
_ARRAYS = ("counts", "ch_min", "ch_max")
_OURS = re.compile(r"^[a-z]+-[0-9a-f]{32}[-0-9]*\.npz$")
_SCALARS = [f.name for f in fields(TensorStats) if f.name not in (*_ARRAYS, "shape")]


def default_dir() -> Path:
    env = os.environ.get("AMQ_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "amq"


def cache_key(model: onnx.ModelProto, data_fingerprint: str, settings: Mapping[str, object]) -> str:
    h = hashlib.sha256()
    h.update(f"amq-stats-v{CACHE_VERSION}".encode())
    h.update(hashlib.sha256(model.SerializeToString(deterministic=True)).digest())
    h.update(data_fingerprint.encode())
    h.update(json.dumps(dict(settings), sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def _file(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"stats-{key}.npz"


def load(cache_dir: Path | None, key: str) -> dict[str, TensorStats]:
    """Every tensor's statistics the cache file holds ({} when absent or unreadable)."""
    if cache_dir is None:
        return {}
    path = _file(cache_dir, key)
    if not path.exists():
        return {}
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["__meta__"]))
            out = {}
            for t, m in meta.items():
                s = TensorStats(
                    **{k: (float(m[k]) if isinstance(m[k], str) else m[k]) for k in _SCALARS}
                )
                s.counts = z[m["key"]].astype(np.int64)
                s.ch_min = z[m["key"] + "lo"].astype(np.float64)
                s.ch_max = z[m["key"] + "hi"].astype(np.float64)
                s.shape = tuple(m["shape"])
                out[t] = s
        _touch(path)
        return out
    except Exception:
        return {}  # a damaged cache file is recomputed, never trusted


def save(cache_dir: Path | None, key: str, stats: Mapping[str, TensorStats]) -> Path | None:
    """Write atomically (temp file, then rename); a cache that cannot be written is skipped."""
    if cache_dir is None:
        return None
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        meta = {}
        arrays = {}
        for i, (t, s) in enumerate(stats.items()):
            k = f"c{i}"
            meta[t] = {
                **{f: _jsonable(getattr(s, f)) for f in _SCALARS},
                "key": k,
                "shape": list(s.shape),
            }
            arrays[k] = s.counts
            arrays[k + "lo"], arrays[k + "hi"] = s.ch_min, s.ch_max
        buf = io.BytesIO()
        np.savez(buf, __meta__=np.array(json.dumps(meta)), **arrays)
        return _write(_file(cache_dir, key), buf.getvalue())
    except OSError:
        return None


def load_arrays(cache_dir: Path | None, kind: str, key: str) -> dict[str, np.ndarray]:
    """Named arrays of one kind (e.g. the layer input moments of calib/grams.py) from the cache
    ({} when absent or unreadable)."""
    path = cache_dir / f"{kind}-{key}.npz" if cache_dir is not None else None
    if path is None or not path.exists():
        return {}
    try:
        with np.load(path, allow_pickle=False) as z:
            names = json.loads(str(z["__names__"]))
            out = {n: z[f"a{i}"] for i, n in enumerate(names)}
        _touch(path)
        return out
    except Exception:
        return {}  # recomputed, never trusted


def save_arrays(
    cache_dir: Path | None, kind: str, key: str, arrays: Mapping[str, np.ndarray]
) -> None:
    """Write named arrays atomically (temp file, then rename); skipped when it cannot be."""
    if cache_dir is None:
        return
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        names = list(arrays)
        buf = io.BytesIO()
        np.savez(
            buf,
            __names__=np.array(json.dumps(names)),
            **{f"a{i}": np.asarray(arrays[n]) for i, n in enumerate(names)},
        )
        _write(cache_dir / f"{kind}-{key}.npz", buf.getvalue())
    except OSError:
        return


def max_bytes() -> int:
    """The cache's size budget: ``AMQ_CACHE_MAX_MB`` megabytes, 2048 unless set."""
    try:
        return int(float(os.environ.get("AMQ_CACHE_MAX_MB", "2048")) * 2**20)
    except ValueError:
        return 2048 * 2**20


def _write(path: Path, data: bytes) -> Path:
    """Write atomically (temp file, then rename), then drop the least recently used files beyond
    the size budget: without one the cache grew by a file per model, data and setting, forever."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    prune(path.parent, keep=path)
    return path


def prune(cache_dir: Path, keep: Path | None = None) -> list[Path]:
    """Remove the least recently used cache files (by modification time, which a load renews)
    until the rest fit in ``max_bytes()``; ``keep`` is never removed. Returns what was removed."""
    files = []
    for p in cache_dir.glob("*.npz"):
        if not _OURS.match(p.name):
            continue  # a file amq did not write, in a folder the user named
        try:
            st = p.stat()
        except OSError:
            continue
        files.append((st.st_mtime, st.st_size, p))
    files.sort(key=lambda f: (f[2] != keep, -f[0]))
    budget, total, removed = max_bytes(), 0, []
    for _, size, p in files:
        total += size
        if total > budget and p != keep:
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


def _jsonable(v):
    if isinstance(v, float) and not np.isfinite(v):
        return str(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    return v
