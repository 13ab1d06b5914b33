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
