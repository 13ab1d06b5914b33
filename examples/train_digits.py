"""Train the bundled example model (a small residual CNN on scikit-learn's digits) and export it.

The ONNX file is written by hand with ``onnx.helper`` (not ``torch.onnx.export``) so that the graph
keeps explicit, unfused BatchNormalization nodes, readable node/tensor names and initializers named
exactly like the torch ``state_dict`` keys (``stem.conv.weight``, ``stem.bn.running_mean``, ...);
the QAT handoff maps parameters to initializers by those names.

Run from the repository root::

    python examples/train_digits.py

Outputs (relative to ``--out-dir``, default: the repository root):

    examples/digits_cnn.onnx   the float model, input ``input`` [batch,1,8,8], output ``logits`` [batch,10]
    examples/digits_cnn.pt     the torch state_dict (starting point for QAT)
    examples/digits_cnn.json   float top-1 on the eval split, split sizes, seed, mean/std, versions
    calib_data/input.npy       256 training-split samples, float32 [256,1,8,8], preprocessed
    eval_data/input.npy        all eval-split samples, float32 [N,1,8,8], preprocessed
    eval_data/labels.npy       eval-split labels, int64 [N]

Preprocessing expected by the model: ``x = (pixels / 16 - mean) / std`` with the scalar mean/std of
the training split recorded in ``digits_cnn.json``.

Torch is only needed to run this script; ``DigitsCNN`` can be imported from it
(``from examples.train_digits import DigitsCNN``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

SEED = 0
EVAL_FRACTION = 0.3
N_CALIB = 256
EPOCHS = 30
BATCH_SIZE = 64
LR = 3e-3
WEIGHT_DECAY = 1e-4
OPSET = 13
IR_VERSION = 8
BN_EPS = 1e-5
MIN_TOP1 = 0.95
MAX_ABS_DIFF = 1e-4

REPO_ROOT = Path(__file__).resolve().parent.parent


class ResidualBlock(nn.Module):
    """conv1-bn1-relu1-conv2-bn2, add the block input, relu2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu2(y + x)


class ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class DigitsCNN(nn.Module):
    """Input [batch,1,8,8] (preprocessed), output logits [batch,10]."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = ConvBNReLU(1, 16)
        self.layer1 = ResidualBlock(16)
        self.pool = nn.MaxPool2d(2)
        self.layer2 = ConvBNReLU(16, 32)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer1(x)
        x = self.pool(x)
        x = self.layer2(x)
        x = self.gap(x)
        x = self.flatten(x)
        return self.fc(x)


# ----------------------------------------------------------------------------- data


def load_data(seed: int = SEED) -> dict:
    """Stratified train/eval split of sklearn digits, preprocessed to float32 [N,1,8,8]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float64) / 16.0  # [1797, 8, 8] in [0, 1]
    labels = digits.target.astype(np.int64)
    x_train, x_eval, y_train, y_eval = train_test_split(
        images, labels, test_size=EVAL_FRACTION, stratify=labels, random_state=seed
    )
    mean = float(x_train.mean())
    std = float(x_train.std())

    def prep(x: np.ndarray) -> np.ndarray:
        return ((x - mean) / std).astype(np.float32)[:, None, :, :]

    return {
        "x_train": np.ascontiguousarray(prep(x_train)),
        "y_train": np.ascontiguousarray(y_train),
        "x_eval": np.ascontiguousarray(prep(x_eval)),
        "y_eval": np.ascontiguousarray(y_eval),
        "mean": mean,
        "std": std,
    }


# ----------------------------------------------------------------------------- training


def set_determinism(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def train(model: DigitsCNN, x: np.ndarray, y: np.ndarray, seed: int, epochs: int) -> float:
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    loss_fn = nn.CrossEntropyLoss()
    last = float("nan")
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total, count = 0.0, 0
        for i in range(0, len(perm), BATCH_SIZE):
            idx = perm[i : i + BATCH_SIZE]
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
        sched.step()
        last = total / count
    model.eval()
    return last


@torch.no_grad()
def torch_logits(model: DigitsCNN, x: np.ndarray) -> np.ndarray:
    model.eval()
    return model(torch.from_numpy(x)).numpy()


# ----------------------------------------------------------------------------- ONNX export


class _GraphBuilder:
    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def init(self, name: str) -> str:
        arr = self.state[name].detach().cpu().numpy().astype(np.float32)
        self.initializers.append(numpy_helper.from_array(arr, name))
        return name

    def node(
        self, op: str, scope: str, inputs: list[str], output: str | None = None, **attrs
    ) -> str:
        name = f"/{scope}/{op}"
        out = output or f"{name}_output_0"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def conv(self, scope: str, x: str) -> str:
        prefix = scope.replace("/", ".")
        w = self.init(f"{prefix}.weight")
        b = self.init(f"{prefix}.bias")
        k = list(self.state[w].shape[2:])
        return self.node(
            "Conv",
            scope,
            [x, w, b],
            kernel_shape=k,
            pads=[1, 1, 1, 1],
            strides=[1, 1],
            dilations=[1, 1],
            group=1,
        )

    def bn(self, scope: str, x: str) -> str:
        p = scope.replace("/", ".")
        ins = [x] + [
            self.init(f"{p}.{s}") for s in ("weight", "bias", "running_mean", "running_var")
        ]
        return self.node("BatchNormalization", scope, ins, epsilon=BN_EPS, momentum=0.9)

    def relu(self, scope: str, x: str) -> str:
        return self.node("Relu", scope, [x])


def build_onnx(model: DigitsCNN) -> onnx.ModelProto:
    """Write the trained model as an opset-13 ONNX graph with unfused BatchNormalization nodes."""
    g = _GraphBuilder(model.state_dict())
    x = "input"
    x = g.relu("stem/relu", g.bn("stem/bn", g.conv("stem/conv", x)))
    skip = x
    y = g.relu("layer1/relu1", g.bn("layer1/bn1", g.conv("layer1/conv1", x)))
    y = g.bn("layer1/bn2", g.conv("layer1/conv2", y))
    y = g.node("Add", "layer1/add", [y, skip])
    x = g.relu("layer1/relu2", y)
    x = g.node("MaxPool", "pool", [x], kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 0, 0])
    x = g.relu("layer2/relu", g.bn("layer2/bn", g.conv("layer2/conv", x)))
    x = g.node("GlobalAveragePool", "gap", [x])
    x = g.node("Flatten", "flatten", [x], axis=1)
    g.node(
        "Gemm",
        "fc",
        [x, g.init("fc.weight"), g.init("fc.bias")],
        output="logits",
        alpha=1.0,
        beta=1.0,
        transB=1,
    )

    num_classes = model.fc.out_features
    graph = helper.make_graph(
        g.nodes,
        "digits_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes])],
        initializer=g.initializers,
    )
    m = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="amq-examples",
        producer_version="1",
        doc_string="Small residual CNN on scikit-learn digits; see examples/README.md.",
    )
    m.ir_version = IR_VERSION
    onnx.checker.check_model(m, full_check=True)
    return m


def onnx_logits(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out-dir",
        type=Path,
        default=REPO_ROOT,
        help="root of the output layout (default: repo root)",
    )
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    args = ap.parse_args(argv)

    set_determinism(args.seed)
    data = load_data(args.seed)
    model = DigitsCNN()
    final_loss = train(model, data["x_train"], data["y_train"], args.seed, args.epochs)

    out = args.out_dir
    for sub in ("examples", "calib_data", "eval_data"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    onnx_path = out / "examples" / "digits_cnn.onnx"
    onnx.save_model(build_onnx(model), str(onnx_path))
    torch.save(model.state_dict(), out / "examples" / "digits_cnn.pt")

    x_eval, y_eval = data["x_eval"], data["y_eval"]
    ref = torch_logits(model, x_eval)
    got = onnx_logits(onnx_path, x_eval)
    diff = float(np.abs(ref - got).max())
    torch_top1 = float((ref.argmax(1) == y_eval).mean())
    onnx_top1 = float((got.argmax(1) == y_eval).mean())
    print(f"final train loss {final_loss:.4f}")
    print(
        f"eval top-1: torch {torch_top1:.4f}  onnx {onnx_top1:.4f}  (max |torch - onnx| = {diff:.2e})"
    )
    if diff >= MAX_ABS_DIFF:
        print(
            f"error: onnxruntime differs from torch by {diff:.2e} >= {MAX_ABS_DIFF}",
            file=sys.stderr,
        )
        return 1
    if onnx_top1 < MIN_TOP1:
        print(f"error: eval top-1 {onnx_top1:.4f} < {MIN_TOP1}", file=sys.stderr)
        return 1

    np.save(out / "calib_data" / "input.npy", data["x_train"][:N_CALIB])
    np.save(out / "eval_data" / "input.npy", x_eval)
    np.save(out / "eval_data" / "labels.npy", y_eval)

    import onnxruntime as ort
    import sklearn

    meta = {
        "model": "examples/digits_cnn.onnx",
        "dataset": "sklearn.datasets.load_digits",
        "input": {"name": "input", "shape": ["batch", 1, 8, 8], "dtype": "float32"},
        "output": {"name": "logits", "shape": ["batch", 10], "dtype": "float32"},
        "preprocess": "x = (pixels / 16 - mean) / std",
        "mean": data["mean"],
        "std": data["std"],
        "seed": args.seed,
        "split": {
            "method": "sklearn.model_selection.train_test_split(stratify=labels)",
            "eval_fraction": EVAL_FRACTION,
            "train": int(len(data["y_train"])),
            "eval": int(len(y_eval)),
            "calib": int(min(N_CALIB, len(data["y_train"]))),
            "calib_selection": "first samples of the (shuffled) training split",
        },
        "training": {
            "optimizer": "Adam",
            "lr": LR,
            "weight_decay": WEIGHT_DECAY,
            "schedule": "cosine",
            "epochs": args.epochs,
            "batch_size": BATCH_SIZE,
            "final_train_loss": round(final_loss, 6),
        },
        "float_top1_eval": onnx_top1,
        "torch_top1_eval": torch_top1,
        "max_abs_diff_torch_vs_onnxruntime": float(f"{diff:.3g}"),
        "opset": OPSET,
        "ir_version": IR_VERSION,
        "versions": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "scikit-learn": sklearn.__version__,
            "numpy": np.__version__,
        },
    }
    (out / "examples" / "digits_cnn.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {onnx_path}, calib_data/, eval_data/ under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
