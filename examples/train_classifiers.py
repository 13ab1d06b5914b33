"""Train a ResNet-style and a MobileNet-style classifier on scikit-learn's digits and export them,
for the W4A8 accuracy targets (issue #13): the bundled example's data, split and preprocessing
(``examples/train_digits.py``: calib_data/ and eval_data/ serve all three models).

- ``examples/resnet_digits.onnx``: stem Conv(1->32)+BN+ReLU, two stages of two basic blocks
  (32 and 64 channels, the second stage at stride 2 with a 1x1 projection), global average
  pooling, Linear(64->10). About 120k parameters.
- ``examples/mobilenet_digits.onnx``: stem Conv(1->16)+BN+ReLU6, four inverted residual blocks
  (1x1 expand x4 + ReLU6, 3x3 depthwise + ReLU6, 1x1 linear projection; residual where the
  shape allows), 1x1 Conv to 96 + ReLU6, global average pooling, Linear(96->10).

Deterministic (fixed seeds, one thread); float top-1 on the 540 eval images is written to
``examples/classifiers.json``. Run from the repository root (about a minute on one thread)::

    pip install torch==2.13.0 scikit-learn onnx onnxruntime
    python examples/train_classifiers.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples.train_digits import load_data, set_determinism, train  # noqa: E402

SEED = 0
EPOCHS = 40
OPSET = 17
REPO_ROOT = Path(__file__).resolve().parent.parent


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *conv_bn(cin, cout, 3, stride), nn.ReLU(), *conv_bn(cout, cout, 3)
        )
        self.skip = (
            nn.Sequential(*conv_bn(cin, cout, 1, stride))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


class ResNetDigits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(1, 32), nn.ReLU())
        self.stages = nn.Sequential(
            BasicBlock(32, 32, 1),
            BasicBlock(32, 32, 1),
            BasicBlock(32, 64, 2),
            BasicBlock(64, 64, 1),
        )
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stages(self.stem(x)).mean(dim=(2, 3)))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        mid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.body = nn.Sequential(
            *conv_bn(cin, mid, 1),
            nn.ReLU6(),
            *conv_bn(mid, mid, 3, stride, groups=mid),
            nn.ReLU6(),
            *conv_bn(mid, cout, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.use_res else y


class MobileNetDigits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(1, 16), nn.ReLU6())
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16, 1),
            InvertedResidual(16, 24, 2),
            InvertedResidual(24, 24, 1),
            InvertedResidual(24, 32, 1),
        )
        self.head = nn.Sequential(*conv_bn(32, 96, 1), nn.ReLU6())
        self.fc = nn.Linear(96, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.blocks(self.stem(x))).mean(dim=(2, 3)))


def export(model: nn.Module, path: Path) -> None:
    model.eval()
    torch.onnx.export(
        model,
        (torch.zeros(1, 1, 8, 8),),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=OPSET,
        dynamo=False,
    )


def main() -> None:
    data = load_data(SEED)
    report = {"dataset": "sklearn.datasets.load_digits", "eval_samples": len(data["y_eval"])}
    for name, cls in (("resnet_digits", ResNetDigits), ("mobilenet_digits", MobileNetDigits)):
        set_determinism(SEED)
        model = cls()
        loss = train(model, data["x_train"], data["y_train"], SEED, EPOCHS)
        path = REPO_ROOT / "examples" / f"{name}.onnx"
        export(model, path)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        logits = sess.run(None, {"input": data["x_eval"]})[0]
        with torch.no_grad():
            ref = model(torch.from_numpy(data["x_eval"])).numpy()
        top1 = float((logits.argmax(1) == data["y_eval"]).mean())
        report[name] = {
            "onnx": f"examples/{name}.onnx",
            "params": sum(p.numel() for p in model.parameters()),
            "float_top1": top1,
            "final_train_loss": loss,
            "onnx_vs_torch_max_abs_diff": float(np.abs(logits - ref).max()),
        }
        print(f"{name}: top-1 {100 * top1:.2f}% ({report[name]['params']} parameters)")
    (REPO_ROOT / "examples" / "classifiers.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
