"""What to compare: the rows of ``amq compare`` read from the QDQ model's Q/DQ nodes.

Matching. In the QDQ model every QuantizeLinear whose input is an activation tensor T gives one row;
the quantized view of T is the output of the DequantizeLinear fed by that Q. T is looked up by name
in the float model (amq names a folded Conv's output after the BatchNormalization output it
replaces, so names match); a graph output quantized by amq keeps its name on the DQ and the tensor
before the Q is ``<name>_float``, so the DQ output's name is tried too. Every DequantizeLinear of a
stored integer initializer (a weight or bias) gives a row as well, compared with the float
initializer of the same base name (``W_quantized`` -> ``W``; the caller passes the float model's
initializers including BN-folded ones). A quantized tensor without a float counterpart is a note.

Values as the next layer sees them: when every reader of the quantized tensor is a Relu (or a Clip
with constant bounds), both sides pass through that clamp before the error metrics, the clip count
and the KL. amq's ahead_relu calibrates such a tensor on its positive side on purpose: its negative
side is clipped by the grid and by the Relu alike, and costs nothing. The float/quantized
min/max/mean/var columns are of the raw values.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from amq.calib.smoothing import PROVENANCE_KEY
from amq.graph.model import Graph
from amq.graph.patterns import HARDSWISH_FLOOR, hardswish_only
from amq.quant import qmath
from amq.quant.activations import node_attrs
from amq.quant.registry import act_channel_axis, clamp_bounds, handler, output_channel_axis

CORRECTED = (
    "bias corrected (the mean output shift of rounding added): compared with the corrected "
    "float bias"
)
RESCALED = "rescaled per channel by SmoothQuant before quantization (the float model's is unscaled)"
INT_TYPES = {
    onnx.TensorProto.UINT8: (8, False, "uint8"),
    onnx.TensorProto.INT8: (8, True, "int8"),
    onnx.TensorProto.UINT16: (16, False, "uint16"),
    onnx.TensorProto.INT16: (16, True, "int16"),
    onnx.TensorProto.UINT4: (4, False, "uint4"),
    onnx.TensorProto.INT4: (4, True, "int4"),
    onnx.TensorProto.INT32: (32, True, "int32"),
}


@dataclass(frozen=True)
class QParams:
    """A quantizer read from a Q/DQ node: scale and zero point (scalar or per channel on ``axis``)."""

    scale: np.ndarray  # float64, shape () or (C,)
    zero_point: np.ndarray  # float64, same shape
    grid: qmath.Grid
    dtype: str
    axis: int | None = None

    def bounds(self, ndim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lowest, highest representable value, scale), broadcastable to a tensor of rank ndim."""
        s, z = self.scale, self.zero_point
        if self.axis is not None and s.ndim == 1 and ndim > 0:
            shape = [1] * ndim
            shape[self.axis % ndim] = -1
            s, z = s.reshape(shape), z.reshape(shape)
        return (self.grid.qmin - z) * s, (self.grid.qmax - z) * s, s

    def fake_quantize(self, x: np.ndarray) -> np.ndarray:
        axis = self.axis if self.scale.ndim == 1 else None
        return qmath.fake_quantize(x, self.scale, self.zero_point, self.grid, axis).astype(
            np.float64
        )


@dataclass
class Target:
    """One row to compute. Activations name tensors to fetch from each model per batch; weights
    carry their two arrays."""

    name: str
    kind: str  # activation | weight | bias
    node: str  # producer (activation) or first reader (weight) in the quantized model
    qparams: QParams
    float_name: str | None = None  # tensor in the float model
    pre_q: str | None = None  # tensor entering the Q in the quantized model
    dq_out: str | None = None  # output of the DQ in the quantized model
    clamp: tuple[float | None, float | None] | None = None  # applied by every reader
    clamp_by: str = ""
    reference: np.ndarray | None = None  # weights: float initializer
    quantized: np.ndarray | None = None  # weights: dequantized initializer
    # activations: the channel axis of a tensor of a given rank (the first reader's input
    # channels, else the producer's output channels; registry), for its outlier channels
    channel_axis: Callable[[int], int] | None = None
    # activations: the quantized tensor's float value from the float model's ``float_name`` when
    # amq derived it before quantizing (an outlier split's Gather, SmoothQuant's Div)
    derive: Callable[[np.ndarray], np.ndarray] | None = None
    # activations: channels (last axis) left out on both sides: an outlier split's channels,
    # which the layers reading this grid multiply by zeroed weight rows
    dropped: tuple[int, ...] = ()
    note: str = ""  # said in the row (bias correction's corrected reference)


def _axis_rule(
    t: str, readers: list[onnx.NodeProto], producer: onnx.NodeProto | None
) -> Callable[[int], int]:
    """The channel axis of activation ``t`` given its rank: the input channels of its first
    reader that has them (registry.act_channel_axis), else the producer's output channels."""

    def axis(rank: int) -> int:
        for r in readers:
            for i, x in enumerate(r.input):
                if x == t:
                    a = act_channel_axis(r.op_type, i, node_attrs(r), rank)
                    if a >= 0:
                        return a
        if producer is not None and handler(producer.op_type).act_channel_axis:
            return output_channel_axis(producer.op_type, rank)
        return -1

    return axis


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    out = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = a.t
    return out


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _qparams(
    node: onnx.NodeProto, consts: Mapping[str, onnx.TensorProto], int_type: int | None
) -> tuple[QParams | None, str]:
    """The quantizer of a Q or DQ node, or (None, why not)."""
    if len(node.input) < 2 or node.input[1] not in consts:
        return None, "its scale is not a constant"
    scale = numpy_helper.to_array(consts[node.input[1]]).astype(np.float64)
    zp_name = node.input[2] if len(node.input) > 2 else ""
    if zp_name:
        if zp_name not in consts:
            return None, "its zero point is not a constant"
        zt = consts[zp_name]
        int_type = zt.data_type
        zp = numpy_helper.to_array(zt).astype(np.float64)
    else:
        zp = np.zeros(scale.shape)
        if int_type is None:
            int_type = _attr(node, "output_dtype", 0) or onnx.TensorProto.UINT8
    if int_type not in INT_TYPES:
        name = onnx.TensorProto.DataType.Name(int_type) if int_type else "unknown"
        return None, f"type {name} is not an integer grid amq compares"
    bits, signed, dtype = INT_TYPES[int_type]
    channel_axis = int(_attr(node, "axis", 1))
    if _attr(node, "block_size", 0):
        channels = _channels_of_blocks(scale, zp)
        if channels is None:
            return None, "blocked quantization is not supported"
        channel_axis = scale.ndim - 1
        scale, zp = channels
    axis = None
    if scale.ndim == 1 and scale.size > 1:
        axis = channel_axis
    else:
        scale = scale.reshape(())
        zp = zp.reshape(()) if zp.size == 1 else zp
    if zp.shape != scale.shape:
        zp = np.broadcast_to(zp, scale.shape).astype(np.float64)
    return QParams(scale, zp, qmath.grid(bits, signed), dtype, axis), ""


def _channels_of_blocks(scale: np.ndarray, zp: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The per-channel (last axis) scale and zero point of a blocked quantizer whose values vary
    along its last axis only, as amq writes batched MatMul weights (quant/qdq.py); else None."""
    if scale.ndim < 2:
        return None
    s = scale.reshape(-1, scale.shape[-1])
    z = np.broadcast_to(zp, scale.shape).reshape(-1, scale.shape[-1])
    if not (np.all(s == s[:1]) and np.all(z == z[:1])):
        return None
    return s[0], z[0]


def _bounds_of(consts: Mapping[str, onnx.TensorProto]):
    """node -> the (lo, hi) a Relu/Clip clamps to with constant bounds, else None."""

    def const(t: str) -> float | None:
        return float(numpy_helper.to_array(consts[t]).reshape(-1)[0]) if t in consts else None

    return lambda r: clamp_bounds(r.op_type, node_attrs(r), r.input, const)


def _reader_clamp(
    qg: Graph, t: str, consts: Mapping[str, onnx.TensorProto]
) -> tuple[tuple[float | None, float | None] | None, str]:
    """The clamp every reader of ``t`` applies: all of one op type that clamps (Relu, Clip) with
    the same constant bounds (amq.quant.registry.clamp_bounds); or hardswish, which makes every
    value below -3 zero (what amq's grid for such a tensor starts at)."""
    readers = qg.consumers.get(t, [])
    bounds_of = _bounds_of(consts)
    if hardswish_only(qg, t, bounds_of):
        return (HARDSWISH_FLOOR, None), "hardswish"
    ops = {r.op_type for r in readers}
    if len(ops) != 1:
        return None, ""
    bounds = {bounds_of(r) for r in readers}
    if len(bounds) == 1 and None not in bounds and bounds != {(None, None)}:
        return bounds.pop(), ops.pop()
    return None, ""


def _strip(name: str, suffixes: Sequence[str]) -> str | None:
    for s in suffixes:
        if name.endswith(s) and len(name) > len(s):
            return name[: -len(s)]
    return None


def match(
    float_model: onnx.ModelProto,
    quant_model: onnx.ModelProto,
    float_weights: Mapping[str, np.ndarray],
) -> tuple[list[Target], list[str]]:
    """Rows to compute and notes (unmatched or unsupported quantized tensors).
    ``float_weights``: float initializers by name (include the BN-folded ones)."""
    m = _Matcher(float_model, quant_model, float_weights)
    for node in m.qg.nodes:
        if node.op_type == "QuantizeLinear" and node.input:
            m.quantize_node(node)
    q_fed = {n.output[0] for n in m.qg.nodes if n.op_type == "QuantizeLinear" and n.output}
    for node in m.qg.nodes:
        if node.op_type == "DequantizeLinear" and node.input:
            x = node.input[0]
            if x not in q_fed and x in m.consts:
                m.stored_initializer(node)
    return m.targets, m.notes


class _Matcher:
    """The state of one ``match``: the two graphs, the rows found so far and the notes."""

    def __init__(
        self,
        float_model: onnx.ModelProto,
        quant_model: onnx.ModelProto,
        float_weights: Mapping[str, np.ndarray],
    ) -> None:
        fg = Graph(float_model)
        self.qg = Graph(quant_model)
        self.consts = _constants(quant_model)
        self.float_weights = float_weights
        self.float_tensors = {i.name for i in fg.inputs} | set(fg.producer)
        self.q_outputs = set(self.qg.output_names)
        self.targets: list[Target] = []
        self.notes: list[str] = []
        self.seen: dict[str, int] = {}
        told = next((p.value for p in quant_model.metadata_props if p.key == PROVENANCE_KEY), "")
        prov = json.loads(told) if told else {}
        self.rescaled: set[str] = set(prov.get("rescaled", ()))
        self.rows: dict[str, list] = prov.get("rows", {})
        self.zeroed: dict[str, list[int]] = prov.get("zeroed", {})
        self.masked: dict[str, list[int]] = prov.get("masked", {})
        self.corrected: dict[str, list[float]] = prov.get("corrected", {})

    def row_name(self, base: str) -> str:
        self.seen[base] = self.seen.get(base, 0) + 1
        return base if self.seen[base] == 1 else f"{base} #{self.seen[base]}"

    def quantize_node(self, node: onnx.NodeProto) -> None:
        """A QuantizeLinear: an activation row, or a float weight quantized in the graph."""
        x = node.input[0]
        qg = self.qg
        dqs = [c for c in qg.consumers.get(node.output[0], []) if c.op_type == "DequantizeLinear"]
        if not dqs:
            self.notes.append(
                f"{x}: QuantizeLinear {node.name or '?'} feeds no DequantizeLinear (QOperator form?); not compared"
            )
            return
        dq = dqs[0]
        qp, why = _qparams(node, self.consts, None)
        if qp is None:
            self.notes.append(f"{x}: {why}; not compared")
            return
        if x in self.consts:  # a float weight quantized in the graph: Q(W) -> DQ
            self.weight_in_graph(x, dq, qp)
            return
        dq_out = dq.output[0]
        cands = [x, dq_out]
        stripped = _strip(x, ("_float",))
        if stripped:
            cands.append(stripped)
        fname = next((c for c in cands if c in self.float_tensors), None)
        derive, row = None, fname
        if fname is None:
            fname, derive = self.derived(x)
            row = x
        if fname is None:
            self.notes.append(
                f"{x}: quantized tensor with no counterpart in the float model (unmatched)"
            )
            return
        if fname in self.rescaled:
            self.notes.append(f"{fname}: {RESCALED}; not compared")
            return
        readers = qg.consumers.get(dq_out, [])
        clamp, by = (
            (None, "") if dq_out in self.q_outputs else _reader_clamp(qg, dq_out, self.consts)
        )
        prod = qg.producer.get(x)
        self.targets.append(
            Target(
                self.row_name(row or fname),
                "activation",
                prod.name if prod is not None else "(graph input)",
                qp,
                float_name=fname,
                pre_q=x,
                dq_out=dq_out,
                clamp=clamp,
                clamp_by=by,
                channel_axis=_axis_rule(dq_out, readers, prod),
                derive=derive,
                dropped=() if derive is not None else tuple(self.masked.get(fname, ())),
            )
        )

    def float_ref(self, name: str) -> np.ndarray | None:
        """The float values a stored initializer is compared with: the float model's, or for an
        outlier split's part the rows of the float weight it holds."""
        if name in self.rows:
            source, index = self.rows[name]
            w = self.float_weights.get(source)
            return None if w is None else np.asarray(w, dtype=np.float64)[index]
        w = np.array(self.float_weights[name], dtype=np.float64)
        if name in self.zeroed:  # a split layer's weight: its outlier rows are the other part's
            w[self.zeroed[name]] = 0.0
        return w

    def derived(self, x: str) -> tuple[str | None, Callable[[np.ndarray], np.ndarray] | None]:
        """A tensor amq derived from a float-model tensor T before quantizing: an outlier
        split's part Gather(T, indices, axis=-1) or SmoothQuant's Div(T, s), both constants;
        (T, how to compute ``x`` from T), else (None, None)."""
        p = self.qg.producer.get(x)
        if p is None or p.op_type not in ("Gather", "Div") or len(p.input) != 2:
            return None, None
        t, c = p.input
        if c not in self.consts or t not in self.float_tensors:
            return None, None
        const = numpy_helper.to_array(self.consts[c])
        if p.op_type == "Div":
            return t, lambda v: v / const
        if _attr(p, "axis", 0) != -1:
            return None, None
        return t, lambda v: np.take(v, const.astype(np.int64), axis=-1)

    def weight_in_graph(self, x: str, dq: onnx.NodeProto, qp: QParams) -> None:
        """Q(W) -> DQ on a float initializer W: compared with the user's W (or the BN-folded one)."""
        w = numpy_helper.to_array(self.consts[x]).astype(np.float64)
        ref = self.float_weights.get(x)
        ref = np.asarray(ref, dtype=np.float64) if ref is not None else w
        if ref.shape != w.shape:
            ref = w
        reader = self.qg.consumers.get(dq.output[0], [])
        qp_w = replace_axis(qp, w.ndim)
        self.targets.append(
            Target(
                self.row_name(x),
                "weight",
                reader[0].name if reader else "",
                qp_w,
                reference=ref,
                quantized=qp_w.fake_quantize(w),
            )
        )

    def stored_initializer(self, node: onnx.NodeProto) -> None:
        """A DequantizeLinear of a stored integer initializer: a weight or bias row."""
        x = node.input[0]
        t = self.consts[x]
        qp, why = _qparams(node, self.consts, t.data_type)
        dq_base = _strip(node.output[0], ("_dequantized", "_DequantizeLinear_Output"))
        base = _strip(x, ("_quantized",)) or dq_base or x
        if qp is None:
            self.notes.append(f"{base}: {why}; not compared")
            return
        q = numpy_helper.to_array(t).astype(np.int64)
        qp = replace_axis(qp, q.ndim)
        ref_name = next(
            (c for c in (base, dq_base, x) if c and (c in self.float_weights or c in self.rows)),
            None,
        )
        if ref_name is None:
            self.notes.append(
                f"{base}: quantized initializer with no float initializer of that name"
            )
            return
        if ref_name in self.rescaled:
            self.notes.append(f"{ref_name}: {RESCALED}; not compared")
            return
        ref = self.float_ref(ref_name)
        if ref is None:
            self.notes.append(f"{base}: its float weight is not in the float model; not compared")
            return
        if ref.shape != q.shape:
            self.notes.append(
                f"{base}: float initializer has shape {list(ref.shape)}, the quantized one {list(q.shape)}; not compared"
            )
            return
        note = ""
        if ref_name in self.corrected:  # the intended bias: float + bias correction's shift
            shift = np.asarray(self.corrected[ref_name], np.float64).reshape(ref.shape)
            ref = np.asarray(ref, np.float64) + shift
            note = CORRECTED
        axis = qp.axis if qp.scale.ndim == 1 else None
        deq = qmath.dequantize(q, qp.scale, qp.zero_point, axis).astype(np.float64)
        readers = self.qg.consumers.get(node.output[0], [])
        self.targets.append(
            Target(
                self.row_name(ref_name),
                "bias" if qp.grid.bits == 32 else "weight",
                readers[0].name if readers else "",
                qp,
                reference=ref,
                quantized=deq,
                note=note,
            )
        )


def replace_axis(qp: QParams, ndim: int) -> QParams:
    """The quantizer with a non-negative channel axis for a tensor of rank ``ndim``."""
    if qp.axis is None or qp.axis >= 0:
        return qp
    return QParams(qp.scale, qp.zero_point, qp.grid, qp.dtype, qp.axis + ndim)
