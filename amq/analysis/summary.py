"""What quantize reports: layers, sizes, bitops, the integer kernels onnxruntime fused, and the outputs
against float on both executions, with a warning when this CPU's kernels fall below the Q/DQ math."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import onnx

from amq import runtime
from amq.analysis.bitops import BitopsReport, bitops
from amq.analysis.fidelity import RUNTIME_GAP_DB, output_fidelity
from amq.analysis.metrics import Fidelity
from amq.calib.data import Dataset
from amq.calib.memory import replayed_batches
from amq.calib.workspace import (
    Workspace,
)
from amq.graph.model import (
    iter_all_graphs,
    iter_all_nodes,
    opset_version,
)
from amq.plan import QuantPlan
from amq.quant.outliers import find_outliers
from amq.quant.planner import (
    overflow_candidates,
)


@dataclass
class Summary:
    layers_quantized: int
    layers_float: int
    float_ops: dict[str, str]
    float_tensors: dict[str, str]
    size_float: int
    size_quant: int
    bitops: BitopsReport
    fidelity: dict[str, dict[str, float | None]]
    samples: int
    calibration_samples: int
    cache_hit: bool
    notes: list[str]
    opset: int
    integer_kernels: dict[str, int] = field(default_factory=dict)
    float_compute: dict[str, int] = field(default_factory=dict)
    # the same outputs on this CPU's integer kernels (``fidelity`` is the ideal Q/DQ math)
    fidelity_runtime: dict[str, dict[str, float | None]] = field(default_factory=dict)
    isa: str = ""
    guarded: dict[str, str] = field(default_factory=dict)  # layer -> why its weights are pair-safe
    # activation tensor with outlier channels -> 'outlier channels: k of n ..., kept|clipped'
    outliers: dict[str, str] = field(default_factory=dict)

    def runtime_gap(self) -> dict[str, float]:
        """Outputs whose runtime SQNR is more than RUNTIME_GAP_DB below the ideal one (dB lost)."""
        out = {}
        for k, v in self.fidelity.items():
            r = self.fidelity_runtime.get(k)
            if r is None or v["sqnr_db"] is None or r["sqnr_db"] is None:
                continue
            gap = min(float(v["sqnr_db"]), 100.0) - min(float(r["sqnr_db"]), 100.0)
            if gap > RUNTIME_GAP_DB:
                out[k] = gap
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers_quantized": self.layers_quantized,
            "layers_float": self.layers_float,
            "float_ops": self.float_ops,
            "float_tensors": self.float_tensors,
            "size_float_bytes": self.size_float,
            "size_quant_bytes": self.size_quant,
            "flops": self.bitops.flops,
            "bitops": self.bitops.total,
            "bitops_int8": self.bitops.int8_total,
            "bitops_ratio_to_int8": self.bitops.ratio_to_int8,
            "fidelity": self.fidelity,
            "fidelity_samples": self.samples,
            "calibration_samples": self.calibration_samples,
            "stats_from_cache": self.cache_hit,
            "notes": self.notes,
            "opset": self.opset,
            "ort_integer_kernels": self.integer_kernels,
            "ort_float_compute": self.float_compute,
            "fidelity_runtime": self.fidelity_runtime,
            "isa": self.isa,
            "overflow_guarded": self.guarded,
            "outlier_tensors": self.outliers,
            "runtime_gap_db": self.runtime_gap(),
        }


def fidelity_dict(fid: Mapping[str, Fidelity]) -> dict[str, dict[str, float | None]]:
    return {
        k: {
            "sqnr_db": v.sqnr_db,
            "cosine": v.cosine,
            "max_abs_diff": v.max_abs,
            "top1_agreement": v.agreement,
        }
        for k, v in fid.items()
    }


def model_size(model: onnx.ModelProto) -> int:
    """Bytes of the weights: initializers and Constant-node tensors, those of If/Loop/Scan bodies
    included (INT4 counted at half a byte)."""
    total = 0
    tensors = [t for g in iter_all_graphs(model.graph) for t in g.initializer] + [
        a.t
        for n in iter_all_nodes(model.graph)
        if n.op_type == "Constant"
        for a in n.attribute
        if a.name == "value" and a.type == onnx.AttributeProto.TENSOR
    ]
    for t in tensors:
        n = math.prod(t.dims)
        bits = {
            onnx.TensorProto.FLOAT: 32,
            onnx.TensorProto.DOUBLE: 64,
            onnx.TensorProto.FLOAT16: 16,
            onnx.TensorProto.INT64: 64,
            onnx.TensorProto.INT32: 32,
            onnx.TensorProto.INT16: 16,
            onnx.TensorProto.UINT16: 16,
            onnx.TensorProto.INT8: 8,
            onnx.TensorProto.UINT8: 8,
            onnx.TensorProto.INT4: 4,
            onnx.TensorProto.UINT4: 4,
            onnx.TensorProto.BOOL: 8,
        }.get(t.data_type, 32)
        total += (n * bits + 7) // 8
    return total


INTEGER_KERNELS = (
    "QLinear",
    "QGemm",
    "MatMulInteger",
    "ConvInteger",
    "DynamicQuantize",
    "QAttention",
)


FLOAT_COMPUTE = (
    "Conv",
    "ConvTranspose",
    "Gemm",
    "MatMul",
    "FusedConv",
    "FusedGemm",
    "FusedMatMul",
    "LSTM",
    "GRU",
    "RNN",
)


def kernel_counts(optimized: onnx.ModelProto) -> tuple[dict[str, int], dict[str, int]]:
    """(integer kernels, float compute ops) in onnxruntime's optimized graph, If/Loop/Scan bodies
    included (PITFALLS 8)."""
    ints: dict[str, int] = {}
    floats: dict[str, int] = {}
    for n in iter_all_nodes(optimized.graph):
        if n.op_type.startswith(INTEGER_KERNELS):
            ints[n.op_type] = ints.get(n.op_type, 0) + 1
        elif n.op_type in FLOAT_COMPUTE:
            floats[n.op_type] = floats.get(n.op_type, 0) + 1
    return dict(sorted(ints.items())), dict(sorted(floats.items()))


def runtime_warnings(summary: Summary, suspects: Callable[[], list[str]]) -> list[str]:
    """A warning per output whose runtime (this CPU's kernels) is far below the ideal math,
    naming the unguarded layers the overflow emulation finds saturating (``suspects``, called
    only when there is a gap on a CPU whose kernels saturate: elsewhere they are not the cause)."""
    gaps = summary.runtime_gap()
    if not gaps:
        return []
    names = suspects() if runtime.cpu_isa().saturates else []
    where = (
        f"layers that saturate int16 pair sums unguarded: {', '.join(names)} "
        "(set weights: {overflow: guard} on them)"
        if names
        else "run amq compare FLOAT QUANT to see where"
    )
    return [
        f"output '{k}': {gap:.1f} dB lower SQNR on this CPU's onnxruntime kernels "
        f"({summary.isa}) than with the Q/DQ math; {where}"
        for k, gap in gaps.items()
    ]


def _budget_note(ws: Workspace) -> list[str]:
    return [n for n in (ws.batch.note(ws.measured), ws.overflow_note(), ws.summary_note) if n]


def saturating_layers(ws: Workspace, plan: QuantPlan) -> list[str]:
    """The main graph's unguarded layers whose pair sums the emulation finds saturating."""
    off = [lp for lp in overflow_candidates(plan) if lp.overflow == "off"]
    found = ws.saturation_probe().measure(plan, off) if off else {}
    return [name for name, sat in found.items() if sat.saturated]


def outlier_tensors(ws: Workspace, plan: QuantPlan) -> dict[str, str]:
    """The activation groups of the main graph whose statistics show outlier channels, each
    with its channels, their range and whether the group's grid keeps or clips them."""
    out = {}
    for root, s in ws.root_stats(plan).items():
        tp = plan.tensors[root]
        o = find_outliers(s)
        if o is not None and tp.range is not None:
            out[root] = f"{o.describe(tp.range)} ({tp.method})"
    return out


def summarize(
    ws: Workspace,
    plan: QuantPlan,
    qmodel: onnx.ModelProto,
    data: Dataset,
    samples: int | None,
    notes: list[str],
) -> tuple[Summary, list[str]]:
    """quantize's summary of ``qmodel`` (``plan``'s QDQ model, its branches included), on the
    first ``samples`` of the calibration ``data``, and its runtime warnings. ``notes``: more
    notes for the summary (after those of the model, the plan and its branches)."""
    prep, hit, flat = ws.prep, ws.cache_hit, plan.flat()
    branch_notes = ws.branch_notes(plan)
    with tempfile.TemporaryDirectory(prefix="amq-") as tmp:
        opt = os.path.join(tmp, "optimized.onnx")
        # the calibration's batches (its kept float outputs are per batch), else the budget's
        calls = replayed_batches(
            data.head(samples), prep.specs, ws.measured.get("calibration"), ws.batch.batch
        )
        fid = output_fidelity(
            prep.model, qmodel, ((f, n) for f, _l, n in calls), ws.reference_outputs, opt
        )
        ints, floats = (
            kernel_counts(onnx.load(opt, load_external_data=False))
            if os.path.exists(opt)
            else ({}, {})
        )
    layers = flat.layers.values()
    summary = Summary(
        layers_quantized=sum(lp.quantized for lp in layers),
        layers_float=sum(not lp.quantized for lp in layers),
        float_ops=dict(flat.float_ops),
        float_tensors=dict(flat.float_tensors),
        size_float=model_size(prep.model),
        size_quant=model_size(qmodel),
        bitops=bitops(flat),
        fidelity=fidelity_dict(fid.ideal),
        fidelity_runtime=fidelity_dict(fid.runtime),
        isa=runtime.cpu_isa().describe(),
        guarded={
            lp.name: lp.overflow_note or "overflow: guard in the config"
            for lp in layers
            if lp.overflow == "guard"
        },
        samples=fid.samples,
        calibration_samples=len(data),
        cache_hit=hit,
        notes=prep.notes + flat.notes + branch_notes + notes + _budget_note(ws),
        opset=opset_version(qmodel),
        integer_kernels=ints,
        float_compute=floats,
        outliers=outlier_tensors(ws, plan),
    )
    return summary, runtime_warnings(summary, lambda: saturating_layers(ws, plan))
