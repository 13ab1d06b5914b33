"""A model's statistics on a calibration set: from the cache where present, the rest in one
streamed pass (calib/runner.py) whose batches the memory budget sizes; the calibration and
evaluation sets a config asks for."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx

from amq import report
from amq.calib import cache as stats_cache
from amq.calib import runner
from amq.calib.data import Dataset, InputSpec, open_data
from amq.calib.memory import Measured, measured_batches
from amq.calib.prepare import DataSource, PathLike, Prepared
from amq.config import Config
from amq.quant.observers import TensorStats


def resolve_cache_dir(cache_dir: PathLike | None | bool) -> Path | None:
    """True: the default cache (~/.cache/amq or $AMQ_CACHE_DIR); a path; None/False: no cache."""
    if cache_dir is True:
        return stats_cache.default_dir()
    return Path(cache_dir) if cache_dir else None


def calib_and_eval(
    calib: DataSource,
    eval_data: DataSource,
    specs: list[InputSpec],
    cfg: Config,
    samples: int | None,
) -> tuple[Dataset, Dataset]:
    """The calibration subset the config asks for and the (optionally subsampled) evaluation set."""
    cal = open_data(calib, specs, cfg).subset(cfg.calibration.num_samples, cfg.calibration.seed)
    ev = open_data(eval_data, specs, cfg)
    return cal, (ev.subset(samples, cfg.calibration.seed) if samples is not None else ev)


def stats_key(model: onnx.ModelProto, data: Dataset, cfg: Config) -> str:
    """The cache key of statistics: the model, the data and the settings that change them."""
    c = cfg.calibration
    settings = {"batch_size": c.batch_size, "bins": c.bins}
    return stats_cache.cache_key(model, data.fingerprint, settings)


def calibrate(
    prep: Prepared,
    data: Dataset,
    tensors: list[str],
    cfg: Config,
    cache_dir: Path | None,
    show_progress: bool = True,
    key: str | None = None,
    record: Callable[[Measured], None] | None = None,
    **collect: Any,
) -> tuple[dict[str, TensorStats], bool]:
    """Statistics for ``tensors``: from the cache where present, the rest in one streamed pass.
    ``key``: the cache key (stats_key of the prepared model before an opset upgrade, which is
    verified to compute the same values, so every bit width shares one cache entry); None:
    that of ``prep.model``.
    ``collect``: keep_outputs and info, as runner.CollectOptions takes them (``info``: the
    probe's shapes and dtypes, which choose how onnxruntime reduces each tensor). The batches are
    sized under the memory budget by what the pass's first sample costs (memory.measured_batches:
    the statistics, and so the cache key, do not depend on the batching); ``record`` is told the
    batch. The summary's samples come in batches of their own, so that their kept float outputs
    end where its calls do (all-mpnet-base-v2: 8 in 5 + 3, not 5 + 5 and a float session for 3)."""
    c = cfg.calibration
    first = (collect.get("keep_outputs") or (0, None))[0]
    calls = measured_batches(data, prep.specs, c.batch_size, c.memory_mb, first, record)
    # hashing the model costs a serialization: only for a cache
    key = "" if cache_dir is None else key or stats_key(prep.model, data, cfg)
    have = stats_cache.load(cache_dir, key)
    missing = [t for t in tensors if t not in have]
    if missing:
        with report.progress(len(data), "calibrating", show_progress) as advance:
            fresh = runner.collect_stats(
                prep.model,
                missing,
                calls,
                c.bins,
                on_batch=advance,
                samples=len(data),
                **collect,
            )
        have.update(fresh)
        stats_cache.save(cache_dir, key, have)
    return {t: have[t] for t in tensors}, not missing
