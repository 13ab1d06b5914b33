"""amq.calib.cache: TensorStats on disk, keyed by model, data and settings (DESIGN.md §4)."""

from __future__ import annotations

import hashlib
import math
import zipfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from amq.calib import cache
from amq.quant import observers as obs


def tiny_model(weight: float = 1.0, name: str = "w") -> onnx.ModelProto:
    w = numpy_helper.from_array(np.full((2, 2), weight, np.float32), name=name)
    node = helper.make_node("MatMul", ["x", name], ["y"], name="/mm/MatMul")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def some_stats() -> dict[str, obs.TensorStats]:
    r = np.random.default_rng(0)
    h = obs.HistogramObserver(bins=128)
    for i in range(3):
        h.update(r.normal(0, 1 + i, (4, 5)).astype(np.float32))
    relu = obs.clamp(h.compute(), 0.0)
    h2 = obs.HistogramObserver(bins=64)
    h2.update(np.array([1.0, np.nan, np.inf, 2.0], np.float32))
    big = obs.HistogramObserver(bins=32)
    big.update(np.full(3, 1e30, np.float32))  # i0 far beyond int64
    return {
        "/a/Conv_output_0": h.compute(),
        "relu:0": relu,
        "with nonfinite": h2.compute(),
        "empty": obs.TensorStats(bins=16),
        "big": big.compute(),
    }


def assert_stats_equal(a: obs.TensorStats, b: obs.TensorStats) -> None:
    for f in ("bins", "count", "nonfinite", "width_log2", "i0", "batches", "clamped_low"):
        assert getattr(a, f) == getattr(b, f), f
        assert type(getattr(a, f)) is type(getattr(b, f)), f
    for f in ("min", "max"):
        x, y = getattr(a, f), getattr(b, f)
        assert (math.isnan(x) and math.isnan(y)) or x == y, (f, x, y)
    assert (a.min_hits, a.max_hits) == (b.min_hits, b.max_hits)
    assert a.shape == b.shape
    assert a.counts.dtype == b.counts.dtype == np.int64
    np.testing.assert_array_equal(a.counts, b.counts)


def test_round_trip(tmp_path):
    stats = some_stats()
    path = cache.save(tmp_path, "k1", stats)
    assert path is not None and path.is_file() and path.parent == tmp_path
    back = cache.load(tmp_path, "k1")
    assert list(back) == list(stats)
    for name in stats:
        assert_stats_equal(back[name], stats[name])
    e = back["empty"]
    assert e.empty and e.min == math.inf and e.max == -math.inf and e.width_log2 is None
    assert back["relu:0"].clamped_low > 0
    assert back["with nonfinite"].nonfinite == 2
    # the loaded statistics still work with the range methods
    assert obs.range_percentile(back["/a/Conv_output_0"], 99.0) == obs.range_percentile(
        stats["/a/Conv_output_0"], 99.0
    )


def test_loaded_stats_keep_streaming(tmp_path):
    r = np.random.default_rng(1)
    a, b = r.normal(size=300).astype(np.float32), r.normal(0, 5, 300).astype(np.float32)
    h = obs.HistogramObserver(bins=64)
    h.update(a)
    cache.save(tmp_path, "k", {"t": h.compute()})
    h2 = obs.HistogramObserver(bins=64)
    h2.stats = cache.load(tmp_path, "k")["t"]
    h2.update(b)
    ref = obs.HistogramObserver(bins=64)
    ref.update(np.concatenate([a, b]))
    s, t = h2.compute(), ref.compute()
    assert (s.min, s.max, s.width_log2, s.i0, s.count) == (
        t.min,
        t.max,
        t.width_log2,
        t.i0,
        t.count,
    )
    np.testing.assert_array_equal(s.counts, t.counts)


def test_missing_and_none(tmp_path):
    assert cache.load(tmp_path, "absent") == {}
    assert cache.load(None, "k") == {}
    assert cache.save(None, "k", some_stats()) is None


def test_empty_mapping_round_trip(tmp_path):
    cache.save(tmp_path, "k", {})
    assert cache.load(tmp_path, "k") == {}


def _damage(path, how: str) -> None:
    raw = path.read_bytes()
    if how == "garbage":
        path.write_bytes(b"not an npz at all\x00\x01")
    elif how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "bitflip_counts":
        # flip one bit inside the first counts array (stored uncompressed, CRC-protected)
        with zipfile.ZipFile(path) as z:
            info = z.getinfo("c0.npy")
        hdr = raw[info.header_offset : info.header_offset + 30]
        assert hdr[:4] == b"PK\x03\x04"
        name_len, extra_len = (
            int.from_bytes(hdr[26:28], "little"),
            int.from_bytes(hdr[28:30], "little"),
        )
        data_start = info.header_offset + 30 + name_len + extra_len
        assert info.compress_type == zipfile.ZIP_STORED
        b = bytearray(raw)
        b[data_start + info.file_size - 3] ^= 0x10
        path.write_bytes(bytes(b))
    elif how == "no_meta":
        np.savez(path.open("wb"), c0=np.zeros(3, np.int64))
    elif how == "bad_meta_json":
        np.savez(path.open("wb"), __meta__=np.array("{not json"), c0=np.zeros(3, np.int64))
    elif how == "meta_missing_array":
        meta = '{"t": {"key": "c9", "shape": []}}'
        np.savez(path.open("wb"), __meta__=np.array(meta))
    else:  # pragma: no cover
        raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "garbage",
        "truncated",
        "empty",
        "bitflip_counts",
        "no_meta",
        "bad_meta_json",
        "meta_missing_array",
    ],
)
def test_damaged_file_is_not_trusted(tmp_path, how):
    path = cache.save(tmp_path, "k", some_stats())
    assert cache.load(tmp_path, "k") != {}
    _damage(path, how)
    assert cache.load(tmp_path, "k") == {}
    # a fresh save replaces the damaged file
    cache.save(tmp_path, "k", some_stats())
    assert set(cache.load(tmp_path, "k")) == set(some_stats())


def test_atomic_write_leaves_no_temp_files(tmp_path):
    d = tmp_path / "nested" / "cache"
    for i in range(3):
        cache.save(d, f"k{i}", some_stats())
    cache.save(d, "k0", some_stats())  # overwrite
    names = sorted(p.name for p in d.iterdir())
    assert names == [f"stats-k{i}.npz" for i in range(3)]


def test_unwritable_cache_is_skipped(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cache.save(blocker / "sub", "k", some_stats()) is None  # parent is a file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# ---------------------------------------------------------------------------------------------
# Keys

SETTINGS = {"batch_size": 16, "bins": 2048}


def test_key_is_deterministic_and_order_insensitive():
    k = cache.cache_key(tiny_model(), "data-abc", SETTINGS)
    assert k == cache.cache_key(tiny_model(), "data-abc", dict(SETTINGS))
    assert k == cache.cache_key(tiny_model(), "data-abc", {"bins": 2048, "batch_size": 16})
    assert isinstance(k, str) and len(k) >= 16 and all(c in "0123456789abcdef" for c in k)


@pytest.mark.parametrize(
    "model,fingerprint,settings",
    [
        (tiny_model(weight=2.0), "data-abc", SETTINGS),  # a weight byte changes
        (tiny_model(name="w2"), "data-abc", SETTINGS),  # a name changes
        (tiny_model(), "data-abd", SETTINGS),
        (tiny_model(), "", SETTINGS),
        (tiny_model(), "data-abc", {"batch_size": 8, "bins": 2048}),
        (tiny_model(), "data-abc", {"batch_size": 16, "bins": 1024}),
        (tiny_model(), "data-abc", {"batch_size": 16}),
        (tiny_model(), "data-abc", {**SETTINGS, "method": "mse"}),
    ],
    ids=[
        "weights",
        "initializer_name",
        "data",
        "no_data",
        "batch_size",
        "bins",
        "fewer_settings",
        "more_settings",
    ],
)
def test_key_changes(model, fingerprint, settings):
    base = cache.cache_key(tiny_model(), "data-abc", SETTINGS)
    assert cache.cache_key(model, fingerprint, settings) != base


def test_different_keys_do_not_share_files(tmp_path):
    k1 = cache.cache_key(tiny_model(), "d1", SETTINGS)
    k2 = cache.cache_key(tiny_model(), "d2", SETTINGS)
    cache.save(tmp_path, k1, some_stats())
    assert cache.load(tmp_path, k2) == {}
    assert set(cache.load(tmp_path, k1)) == set(some_stats())


def test_cache_keeps_to_its_size_budget_dropping_the_least_recently_used(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("AMQ_CACHE_MAX_MB", str(2.5 * 100_000 / 2**20))  # room for two files
    blob = {"a": np.zeros(100_000 // 4, np.float32)}  # ~100 kB each
    keys = [f"{i:032x}" for i in range(3)]
    foreign = tmp_path / "mine.npz"
    foreign.write_bytes(b"\0" * 400_000)  # not amq's: never removed
    for i, k in enumerate(keys[:2]):
        cache.save_arrays(tmp_path, "grams", k, blob)
        os.utime(tmp_path / f"grams-{k}.npz", (1000 + i, 1000 + i))
    assert cache.load_arrays(tmp_path, "grams", keys[0])  # a hit makes keys[0] the most recent
    cache.save_arrays(tmp_path, "grams", keys[2], blob)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["grams-" + keys[0] + ".npz", "grams-" + keys[2] + ".npz", "mine.npz"]


def test_a_file_larger_than_the_budget_is_still_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("AMQ_CACHE_MAX_MB", "0")
    cache.save_arrays(tmp_path, "grams", "f" * 32, {"a": np.ones(10)})
    assert cache.load_arrays(tmp_path, "grams", "f" * 32)["a"].sum() == 10


def test_workspace_keys_the_cache_on_the_model_before_its_opset_upgrade(tmp_path):
    """The statistics cache key is the prepared model's before an opset upgrade (every bit width
    shares one entry); once it is computed, the pre-upgrade model is let go; without a cache the
    Workspace never keeps it."""
    from amq.calib.data import open_data
    from amq.calib.prepare import prepare
    from amq.calib.statistics import stats_key
    from amq.calib.workspace import Workspace, plan_in_workspace
    from amq.config import config_from_dict
    from amq.graph.model import opset_version
    from tests import models as M

    model, calib, _ = M.build("opset11")
    cfg = config_from_dict({"activations": {"bits": 16}})  # int16 Q/DQ: opset 21
    prep = prepare(model, cfg)
    data = open_data(calib, prep.specs, cfg)
    want = stats_key(prep.model, data, cfg)
    ws, _, _ = plan_in_workspace(prep, cfg, data, tmp_path, show_progress=False)
    assert opset_version(ws.prep.model) == 21 and opset_version(prep.model) == 11
    assert ws.stats_key() == want and ws._key_model is None
    assert list(tmp_path.glob(f"stats-{want}.npz"))  # the pass wrote under that key
    assert Workspace(prep, cfg, data, None, show_progress=False)._key_model is None


def test_the_data_is_hashed_only_for_a_cache(tmp_path, monkeypatch):
    """The data's fingerprint is the statistics cache's key and nothing else's: without a cache
    the samples are never hashed (in memory or in files); with one, once, and the key is what
    hashing them up front gave."""
    import amq
    from amq.calib import data
    from amq.calib.prepare import prepare
    from amq.config import Config
    from tests.conftest import CALIB, EXAMPLE

    calls: list[str] = []
    arrays, files = data._arrays_digest, data._file_digest
    monkeypatch.setattr(data, "_arrays_digest", lambda s: calls.append("arrays") or arrays(s))
    monkeypatch.setattr(data, "_file_digest", lambda p: calls.append("files") or files(p))
    rng = np.random.default_rng(0)
    feeds = [{"input": rng.uniform(0, 1, (1, 1, 8, 8)).astype(np.float32)} for _ in range(8)]
    amq.quantize(str(EXAMPLE), feeds, cache_dir=None, show_progress=False)
    amq.quantize(str(EXAMPLE), str(CALIB), cache_dir=None, show_progress=False)
    assert calls == []
    amq.quantize(str(EXAMPLE), feeds, cache_dir=tmp_path, show_progress=False)
    assert calls == ["arrays"]
    specs = prepare(str(EXAMPLE), Config()).specs
    ds = data.open_data(feeds, specs, Config())
    assert ds.fingerprint == arrays(list(ds))
    head = hashlib.sha256(f"{ds.fingerprint}:head4".encode()).hexdigest()
    assert ds.head(4).fingerprint == head != ds.fingerprint
