"""Data readers: every folder layout of DESIGN.md §7, checked against the model's inputs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from amq.calib.data import InputSpec, batches, check_sample, open_data
from amq.config import Config, config_from_dict
from amq.errors import DataError

IMG = InputSpec("image", np.dtype("float32"), (None, 3, 6, 4))
TWO = [
    InputSpec("input_ids", np.dtype("int64"), (1, None)),
    InputSpec("mask", np.dtype("float32"), (1, None)),
]


def feeds(ds, specs):
    return [check_sample(s, specs) for s in ds]


def test_npy_single_input_any_name_and_stack(tmp_path):
    x = np.arange(5 * 3 * 6 * 4, dtype=np.float32).reshape(5, 3, 6, 4)
    np.save(tmp_path / "whatever.npy", x)
    ds = open_data(tmp_path, [IMG], Config())
    assert len(ds) == 5  # dynamic batch axis: one sample per row
    got = feeds(ds, [IMG])
    np.testing.assert_array_equal(got[3]["image"], x[3:4])


def test_npy_stack_of_calls_for_fixed_batch(tmp_path):
    spec = InputSpec("x", np.dtype("float32"), (1, 2))
    np.save(tmp_path / "x.npy", np.arange(6, dtype=np.float64).reshape(3, 1, 2))  # rank + 1
    ds = open_data(tmp_path, [spec], Config())
    out = feeds(ds, [spec])
    assert len(out) == 3 and out[2]["x"].dtype == np.float32
    np.testing.assert_array_equal(out[2]["x"], [[4.0, 5.0]])


def test_multi_input_files_named_after_inputs(tmp_path):
    np.save(tmp_path / "input_ids.npy", np.ones((4, 1, 7), np.int32))
    np.save(tmp_path / "mask.npy", np.ones((4, 1, 7), np.float32))
    out = feeds(open_data(tmp_path, TWO, Config()), TWO)
    assert len(out) == 4 and out[0]["input_ids"].dtype == np.int64  # int kinds are cast


def test_multi_input_unknown_file_is_named(tmp_path):
    np.save(tmp_path / "input_ids.npy", np.ones((4, 1, 7), np.int64))
    np.save(tmp_path / "attention.npy", np.ones((4, 1, 7), np.float32))
    with pytest.raises(DataError, match="attention.npy.*input_ids, mask"):
        open_data(tmp_path, TWO, Config())


def test_multi_input_counts_must_agree(tmp_path):
    np.save(tmp_path / "input_ids.npy", np.ones((4, 1, 7), np.int64))
    np.save(tmp_path / "mask.npy", np.ones((3, 1, 7), np.float32))
    with pytest.raises(DataError, match="different numbers of samples"):
        open_data(tmp_path, TWO, Config())


STATEFUL = [
    InputSpec("input", np.dtype("float32"), (None, None)),  # dynamic batch
    InputSpec("state", np.dtype("float32"), (2, None, 128)),  # recurrent state: no batch axis
    InputSpec("sr", np.dtype("int64"), ()),
]


def _stateful_call(i: int) -> dict[str, np.ndarray]:
    return {
        "input": np.full((1, 576), i, np.float32),
        "state": np.full((2, 1, 128), -i, np.float32),
        "sr": np.array(16000, np.int64),
    }


def test_npz_batch_one_next_to_a_fixed_state_is_one_call(tmp_path):
    """A VAD's call (silero): input [1, 576] on a dynamic batch axis, state [2, 1, 128] and a
    scalar sample rate. Batch 1 beside fixed-shape arrays is one call, not a count mismatch."""
    for i in range(3):
        np.savez(tmp_path / f"c{i}.npz", **_stateful_call(i))
    out = feeds(open_data(tmp_path, STATEFUL, Config()), STATEFUL)
    assert len(out) == 3
    for i, f in enumerate(out):
        for k, v in _stateful_call(i).items():
            np.testing.assert_array_equal(f[k], v)


def test_array_files_batch_one_next_to_a_fixed_state_is_one_call(tmp_path):
    for k, v in _stateful_call(7).items():
        np.save(tmp_path / f"{k}.npy", v)
    (f,) = feeds(open_data(tmp_path, STATEFUL, Config()), STATEFUL)
    assert f["input"].shape == (1, 576) and f["state"].shape == (2, 1, 128) and f["sr"] == 16000


def test_npz_counts_that_disagree_are_named(tmp_path):
    call = _stateful_call(0)
    call["input"] = np.zeros((4, 576), np.float32)  # 4 samples beside one state
    np.savez(tmp_path / "a.npz", **call)
    with pytest.raises(
        DataError,
        match=r"a\.npz: inputs hold different numbers of samples \('input': 4 samples, 'state': 1 call",
    ):
        open_data(tmp_path, STATEFUL, Config())


def test_npz_with_labels(tmp_path):
    np.savez(
        tmp_path / "a.npz",
        input_ids=np.ones((3, 1, 5), np.int64),
        mask=np.ones((3, 1, 5), np.float32),
        label=np.array([0, 1, 2]),
    )
    ds = open_data(tmp_path, TWO, Config())
    assert [s.label for s in ds] == [0, 1, 2]


def test_labels_npy_and_csv(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((3, 3, 6, 4), np.float32))
    np.save(tmp_path / "labels.npy", np.array([2, 0, 1]))
    assert [int(s.label) for s in open_data(tmp_path, [IMG], Config())] == [2, 0, 1]
    (tmp_path / "labels.npy").unlink()
    (tmp_path / "labels.csv").write_text("file,label\na,1\nb,1\nc,0\n")
    assert [s.label for s in open_data(tmp_path, [IMG], Config())] == [1, 1, 0]
    (tmp_path / "labels.csv").write_text("a,1\n")
    with pytest.raises(DataError, match="1 labels for 3 samples"):
        open_data(tmp_path, [IMG], Config())


def _img(path, rgb):
    Image.fromarray(np.full((10, 8, 3), rgb, np.uint8)).save(path)


def test_image_folder_with_classes_and_preprocess(tmp_path):
    for c, rgb in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / c).mkdir()
        _img(tmp_path / c / "a.png", rgb)
    cfg = config_from_dict(
        {
            "preprocess": {
                "resize": [8, 6],
                "crop": [6, 4],
                "mean": [0.5, 0.5, 0.5],
                "std": [0.5, 0.5, 0.5],
                "channel_order": "BGR",
            }
        }
    )
    ds = open_data(tmp_path, [IMG], cfg)
    s = list(ds)
    assert [x.label for x in s] == [0, 1]
    x = check_sample(s[0], [IMG])["image"]
    assert x.shape == (1, 3, 6, 4)
    # red in RGB, BGR order puts it last: (1 - 0.5) / 0.5 = 1, (0 - 0.5) / 0.5 = -1
    np.testing.assert_allclose(x[0, :, 0, 0], [-1.0, -1.0, 1.0], atol=1e-6)


def test_image_folder_needs_preprocess(tmp_path):
    _img(tmp_path / "a.jpg", (1, 2, 3))
    with pytest.raises(DataError, match="preprocess"):
        open_data(tmp_path, [IMG], Config())


def test_python_reader(tmp_path, monkeypatch):
    (tmp_path / "myreader.py").write_text(
        "import numpy as np\n"
        "def samples():\n"
        "    for i in range(6):\n"
        "        yield {'image': np.full((1, 3, 6, 4), i, np.float32), 'label': i % 2}\n"
    )
    monkeypatch.chdir(tmp_path)
    ds = open_data("myreader:samples", [IMG], Config(), limit=4)
    assert len(ds) == 4 and [s.label for s in ds] == [0, 1, 0, 1]
    ds2 = open_data(str(tmp_path / "myreader.py") + ":samples", [IMG], Config())
    assert len(ds2) == 6
    with pytest.raises(DataError, match="no function 'nope'"):
        open_data("myreader:nope", [IMG], Config())


def test_missing_input_is_named(tmp_path):
    ds = open_data([{"input_ids": np.ones((1, 4), np.int64)}], TWO, Config())
    with pytest.raises(DataError, match="missing model input 'mask'"):
        feeds(ds, TWO)


def test_mixed_kinds_rejected(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((1, 3, 6, 4), np.float32))
    np.savez(tmp_path / "b.npz", image=np.zeros((1, 3, 6, 4), np.float32))
    with pytest.raises(DataError, match="mixes npy and npz"):
        open_data(tmp_path, [IMG], Config())


def test_subset_is_seeded_and_sorted(tmp_path):
    np.save(
        tmp_path / "x.npy",
        np.arange(20, dtype=np.float32).reshape(20, 1, 1, 1) * np.ones((1, 3, 6, 4), np.float32),
    )
    ds = open_data(tmp_path, [IMG], Config())
    a = [float(check_sample(s, [IMG])["image"][0, 0, 0, 0]) for s in ds.subset(5, seed=1)]
    b = [float(check_sample(s, [IMG])["image"][0, 0, 0, 0]) for s in ds.subset(5, seed=1)]
    c = [float(check_sample(s, [IMG])["image"][0, 0, 0, 0]) for s in ds.subset(5, seed=2)]
    assert a == b and a == sorted(a) and len(set(a)) == 5 and a != c
    assert ds.subset(5, 1).fingerprint != ds.fingerprint


def test_batches_concatenate_dynamic_batch(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((10, 3, 6, 4), np.float32))
    out = list(batches(open_data(tmp_path, [IMG], Config()), [IMG], 4))
    assert [f["image"].shape[0] for f, _, _ in out] == [4, 4, 2]
    assert [n for _, _, n in out] == [4, 4, 2]


def test_npy_rows_read_on_demand_not_mapped(tmp_path):
    """Samples are read row by row with seek+read (no memory map that would keep every page of a
    large calibration file resident)."""
    from amq.calib.data import RowFile

    x = np.arange(7 * 3 * 6 * 4, dtype=np.float32).reshape(7, 3, 6, 4)
    np.save(tmp_path / "x.npy", x)
    ds = open_data(tmp_path, [IMG], Config())
    got = feeds(ds, [IMG])
    assert len(got) == 7
    for i in (0, 3, 6):
        np.testing.assert_array_equal(got[i]["image"], x[i : i + 1])
    rf = RowFile(tmp_path / "x.npy", x.shape, x.dtype, 128)
    np.testing.assert_array_equal(rf[2:4], x[2:4])
    np.testing.assert_array_equal(np.asarray(rf), x)
    (tmp_path / "y.npy").write_bytes((tmp_path / "x.npy").read_bytes()[:-8])  # truncated body
    with pytest.raises(DataError, match="shorter than its header"):
        feeds(open_data(tmp_path / "y.npy", [IMG], Config()), [IMG])


def _per_sample_batches(ds, specs, size):
    """batches() as it is for samples read one by one (the reference for the block reads)."""
    from amq.calib.data import Dataset

    plain = Dataset([lambda i=i: ds[i] for i in range(len(ds))], ds.fingerprint, "plain")
    assert plain.rows is None
    return list(batches(plain, specs, size))


@pytest.mark.parametrize("stacked", [False, True])
def test_row_block_batches_equal_sample_by_sample(tmp_path, stacked):
    """One .npy per input: a batch is read in one go (contiguous runs of a subset too) and gives
    exactly the batches of reading the samples one by one, labels included."""
    x = np.arange(12 * 3 * 6 * 4, dtype=np.float64).reshape(12, 3, 6, 4)
    if stacked:  # a stack of calls of batch 2: rank + 1
        x = x.reshape(6, 2, 3, 6, 4)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "labels.npy", np.arange(len(x)) * 10)
    ds = open_data(tmp_path, [IMG], Config())
    assert ds.rows is not None
    for part in (ds, ds.subset(5, seed=3), ds.head(4)):
        got = list(batches(part, [IMG], 3))
        want = _per_sample_batches(part, [IMG], 3)
        assert len(got) == len(want)
        for (f, lab, n), (f2, lab2, n2) in zip(got, want, strict=True):
            assert f["image"].dtype == np.float32
            np.testing.assert_array_equal(f["image"], f2["image"])
            assert list(lab) == list(lab2) and n == n2


def test_row_block_bad_sample_is_named(tmp_path):
    x = np.zeros((9, 3, 6, 4), np.float32)
    x[5, 1, 2, 3] = np.nan
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(DataError, match=r"x\.npy \[sample 5\].*NaN or Inf"):
        list(batches(open_data(tmp_path, [IMG], Config()), [IMG], 4))
