"""SmoothQuant side by side on a real transformer (bench/REAL_MODELS.md's models): amq with
``smoothquant`` off / auto / alpha 0.5 everywhere, and onnxruntime's quantize_static without and
with ``extra_options={"SmoothQuant": True}`` (Intel Neural Compressor's ORTSmoothQuant, one
global alpha 0.5). Each model is measured against float on the ideal Q/DQ math and on this
CPU's kernels.

onnxruntime's SmoothQuant needs neural-compressor 2.x (its ONNX adaptor); a benchmark-only
install, never a dependency of amq: ``pip install --target DIR --no-deps neural-compressor==2.6
schema py-cpuinfo prettytable psutil six pycocotools "setuptools<70"`` (and a stand-in ``cv2``
package if OpenCV is absent) and pass ``--inc DIR[:DIR]``.

Usage: PYTHONPATH=$PWD python bench/smoothquant_bench.py [--models minilm] [--calib 48]
       [--eval 60] [--inc /tmp/sq/inc:/tmp/sq/stubs] [--extra '{"calibration": {...}}']
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_models as rm  # noqa: E402

AMQ_VARIANTS = {
    "amq sq off": {"smoothquant": {"enabled": False}},
    "amq sq auto": {"smoothquant": {"enabled": "auto"}},
    "amq sq alpha 0.5": {"smoothquant": {"enabled": True, "alpha": 0.5}},
}


def ort_static(path: Path, calib: list, out: Path, smooth: bool, matmul_only: bool) -> Path:
    """onnxruntime quantize_static as bench/real_models.py's baseline (QDQ, u8/s8 per channel,
    MinMax), optionally with its SmoothQuant extra option (alpha 0.5, folding on) and only
    MatMul quantized (what BERT users set by hand: the attention-mask sentinel stays float)."""
    import logging

    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    logging.getLogger().setLevel(logging.ERROR)
    feeds = rm._fresh(calib)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

        def rewind(self):
            self.it = iter(feeds)

    quantize_static(
        str(path),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"] if matmul_only else None,
        extra_options={"SmoothQuant": True, "SmoothQuantAlpha": 0.5} if smooth else {},
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="minilm")
    ap.add_argument("--calib", type=int, default=None)
    ap.add_argument("--eval", type=int, default=None)
    ap.add_argument("--inc", default=None, help="extra sys.path entries for neural-compressor")
    ap.add_argument("--extra", default="{}", help="config dict merged into every amq variant")
    ap.add_argument("--variants", default=None, help="comma-separated labels to run (default all)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.inc:
        sys.path.extend(args.inc.split(":"))
    extra = json.loads(args.extra)
    out: dict = {}
    tmp = Path(tempfile.mkdtemp(prefix="amq_sq_"))
    for key in args.models.split(","):
        m = rm.MODELS[key]
        path = m.find_model()
        calib = m.calib_inputs(args.calib or rm.DEFAULT_CALIB[key])
        feeds = m.eval_inputs(args.eval or rm.DEFAULT_EVAL[key])
        f_out = m.run(path, feeds)
        res: dict = {}
        runs = [(k, cfg) for k, cfg in AMQ_VARIANTS.items()] + [
            (f"ort quantize_static{mm}{sqo}", None)
            for mm in ("", " MatMul-only")
            for sqo in ("", " SmoothQuant")
        ]
        if args.variants:
            runs = [r for r in runs if r[0] in args.variants.split(",")]
        for label, cfg in runs:
            q = tmp / f"{key}_{label.replace(' ', '_')}.onnx"
            t0 = time.perf_counter()
            notes: list = []
            try:
                if cfg is None:
                    ort_static(path, calib, q, "SmoothQuant" in label, "MatMul-only" in label)
                else:
                    _, summary = rm.quantize_fn(path, calib, q, {**extra, **cfg})
                    notes = [n for n in summary.get("notes", []) if "SmoothQuant" in n]
            except Exception as e:  # noqa: BLE001 - a baseline that cannot run is reported
                res[label] = {"error": f"{type(e).__name__}: {e}"}
                print(f"{key} {label}: {res[label]['error']}", flush=True)
                continue
            seconds = time.perf_counter() - t0
            ex = rm.compare_executions(m, q, feeds, f_out, 0)
            res[label] = {"seconds": seconds, **ex, "smoothquant_notes": notes}
            line = " | ".join(
                f"{e} cos {ex[e]['cosine_mean']:.4f} nn {ex[e]['nn_top1_agreement']:.3f} "
                f"sqnr {ex[e]['sqnr_db']:.2f}"
                for e in ("ideal", "native")
            )
            print(f"{key} {label} ({seconds:.0f} s): {line}", flush=True)
        out[key] = res
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
