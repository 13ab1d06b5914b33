import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "digits_cnn.onnx"
CALIB = ROOT / "calib_data"
EVAL = ROOT / "eval_data"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's ~/.cache/amq from tests."""
    monkeypatch.setenv("AMQ_CACHE_DIR", str(tmp_path_factory.mktemp("amq-cache")))
    os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def count_calibration(monkeypatch):
    """The tensor lists of every calibration pass (runner.collect_stats call) during the test."""
    import amq.calib.runner

    calls: list[list[str]] = []
    real = amq.calib.runner.collect_stats

    def counting(model, tensors, *a, **k):
        calls.append(sorted(tensors))
        return real(model, tensors, *a, **k)

    monkeypatch.setattr(amq.calib.runner, "collect_stats", counting)
    return calls


@pytest.fixture
def sessions_built(monkeypatch):
    """One entry for every onnxruntime session built during the test (any caller)."""
    import onnxruntime as ort

    made: list[int] = []
    real = ort.InferenceSession.__init__

    def counting(self, *a, **k):
        made.append(1)
        real(self, *a, **k)

    monkeypatch.setattr(ort.InferenceSession, "__init__", counting)
    return made


@pytest.fixture
def batches_read(monkeypatch):
    """``watch(module)``: from then on, the samples of every batch ``module.run_batches`` yields
    (a pass's data run) are appended to the list it returns."""

    def watch(module) -> list[int]:
        read: list[int] = []
        real = module.run_batches

        def counting(*a, **k):
            for b in real(*a, **k):
                read.append(b.n)
                yield b

        monkeypatch.setattr(module, "run_batches", counting)
        return read

    return watch


@pytest.fixture
def overflow_runs(monkeypatch):
    """The layers of each model run the overflow check makes of its own, as it makes them."""
    from amq.calib import saturation

    runs: list[list[str]] = []
    real = saturation.SaturationPass._run_data

    def spy(self, plan, layers, *a):
        runs.append([lp.name for lp in layers])
        return real(self, plan, layers, *a)

    monkeypatch.setattr(saturation.SaturationPass, "_run_data", spy)
    return runs
