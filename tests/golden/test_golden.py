"""Golden: the quantized model of every entry in tests/models.py, at each bit-width variant, is
byte-identical to the one recorded in ``quantized.json``.

Refactors must not change what amq writes (issue #11, "behaviour unchanged"). The digest covers
the graph (nodes, initializers, inputs, outputs, bodies of control flow) and the opset imports,
and the plan's JSON; it leaves out producer_version, which names amq's own version. Activation
ranges are snapped to 12 significant bits (qmath.snap_range), so the digests hold on any x86 CPU.

A change that is meant to alter the output regenerates the file and says so in its commit:
    python -m tests.golden.test_golden
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

import amq
from amq.config import Config, config_from_dict
from tests import models as M

GOLDEN = Path(__file__).with_name("quantized.json")
VARIANTS = {
    "int8": {},
    "w4a8": {"weights": {"bits": 4}},
    "int16": {"weights": {"bits": 16}, "activations": {"bits": 16}},
    "trt": {"target": "trt"},
}
CASES = [(m, v) for m in M.MODELS for v in VARIANTS]


def digest(model: str, variant: str) -> dict[str, str]:
    onnx_model, feeds, _ = M.build(model)
    cfg: Config = config_from_dict(VARIANTS[variant])
    res = amq.quantize(onnx_model, feeds, cfg, cache_dir=None, summary_samples=0)
    q = res.model
    graph = hashlib.sha256(q.graph.SerializeToString(deterministic=True))
    for imp in sorted((i.domain, i.version) for i in q.opset_import):
        graph.update(repr(imp).encode())
    plan = hashlib.sha256(json.dumps(res.plan.to_dict(), sort_keys=True).encode())
    return {"graph": graph.hexdigest()[:16], "plan": plan.hexdigest()[:16]}


@pytest.mark.parametrize(("model", "variant"), CASES, ids=[f"{m}-{v}" for m, v in CASES])
def test_quantized_model_unchanged(model: str, variant: str) -> None:
    golden = json.loads(GOLDEN.read_text())
    key = f"{model}/{variant}"
    assert key in golden, f"no golden for {key}: run python -m tests.golden.test_golden"
    assert digest(model, variant) == golden[key], (
        f"{key}: the quantized model changed; if that is intended, regenerate the goldens "
        "(python -m tests.golden.test_golden) and say why in the commit"
    )


def main() -> None:
    out = {f"{m}/{v}": digest(m, v) for m, v in CASES}
    GOLDEN.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(out)} digests to {GOLDEN}", file=sys.stderr)


if __name__ == "__main__":
    main()
