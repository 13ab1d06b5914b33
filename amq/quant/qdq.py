"""QuantPlan + float model -> QDQ model. A pure function: the same plan and model give the same bytes.

Activations: each quantized tensor gets one QuantizeLinear -> DequantizeLinear pair right after its
producer; its readers take the dequantized value. Weights are stored already quantized (integer
initializer + DequantizeLinear, per channel on the handler's axis; an 8-bit batched MatMul weight
as one block per channel, see ``_blocked``); Conv/Gemm biases as int32 with scale
s_input * s_weight. This is the placement onnxruntime fuses into QLinearConv / QLinearMatMul /
QGemm at INT8.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx

from amq.errors import ModelError
from amq.graph import edit
from amq.graph.model import Graph, NameScope, all_names, drop_unused_initializers, opset_version
from amq.plan import QuantPlan, TensorPlan
from amq.quant import qmath
from amq.quant.algorithms import adaround
from amq.quant.planner import node_attrs
from amq.quant.qdq_dynamic import dynamic_layer
from amq.quant.registry import OWN_GRID, handler


def opset_for_bits(bits: Iterable[int]) -> int:
    """Per-channel DequantizeLinear needs 13; INT4/INT16 types need 21."""
    return 21 if any(b in (4, 16) for b in bits) else 13


def required_opset(plan: QuantPlan) -> int:
    """Per-channel DequantizeLinear needs 13; INT4/INT16 types and blocked weights (below) 21."""
    if any(_blocked(plan, tp) or tp.block_size for tp in plan.tensors.values()):
        return 21
    return opset_for_bits((4, 16) if plan.uses_bits(4, 16) else ())


def _q_values(tp: TensorPlan, w: np.ndarray) -> np.ndarray:
    if tp.block_size:  # [K, N], zero point 0
        g = qmath.grid(tp.bits, tp.signed, tp.narrow)
        scale = np.asarray(tp.scale, dtype=np.float32)
        return qmath.quantize_blocked(w, scale.reshape(-1, w.shape[1]), tp.block_size, g)
    return adaround.codes(tp, w)


def _identity_qdq(tp: TensorPlan) -> bool:
    """Q/DQ on the output of a value-preserving op (MaxPool, Reshape, a Relu on a [0, hi] grid)
    whose input is on the same grid changes nothing; it is kept only at 8 bits, where onnxruntime
    needs it to fuse integer kernels. (onnxruntime 1.31 drops such pairs around MaxPool at 4 bits
    and then fails to load the model: no uint4 MaxPool kernel.)"""
    if tp.via is None or tp.bits == 8:
        return False
    h = handler(tp.via)
    return h.exact_share or h.clamp is not None


def _container_bits(plan: QuantPlan, tp: TensorPlan) -> int:
    """The integer type that stores a weight: its bits, except an 8-bit weight of a layer that
    reads 4-bit activations, stored in int16 (same values): onnxruntime 1.31 would fuse the 8-bit
    weight with the uint4 input into a QLinearConv, which has no 4-bit kernel, and fail to load."""
    if tp.role != "weight" or tp.bits != 8:
        return tp.bits
    for lname in tp.consumers:
        lp = plan.layers.get(lname)
        if lp is not None and any(
            plan.tensors[t].bits == 4 for t in lp.act_inputs if t in plan.tensors
        ):
            return 16
    return tp.bits


def _blocked(plan: QuantPlan, tp: TensorPlan) -> bool:
    """A per-channel batched MatMul weight [..., K, N] (rank > 2, channels on its last axis, so
    axis >= 2) stored in 8 bits: written as a blocked DequantizeLinear (opset 21) whose one block
    spans K, its scale [..., 1, N] the N channel scales repeated over the leading axes (the same
    values as per axis). Measured with a default session of each onnxruntime from 1.20.1 to
    1.32.0 (PITFALLS 10), on [3, 16, 8] weights with x of [3, 5, 16], [5, 16] and [1, 5, 16]:

    - per axis (scale [N], axis -1), with 8-bit activations: onnxruntime fuses it into
      QLinearMatMul (output quantized) or MatMulIntegerToFloat (output float), which load but
      fail on their first call: 1.20-1.31 QLinearMatMul "weight zero point must be a scalar, 1D
      tensor of size 1, or last to second dimension is 1"; MatMulIntegerToFloat "b zero point
      is not valid" on every version, 1.32 included (1.32 leaves the QLinearMatMul case unfused);
    - per tensor: runs everywhere (QLinearMatMul / MatMulIntegerToFloat), with one scale for
      channels that may be far apart;
    - blocked, scale [..., 1, N]: runs everywhere with the per-channel values: QLinearMatMul on
      1.20-1.31 (DequantizeLinear + float MatMul on 1.32), MatMulIntegerToFloat on all;
    - 4-bit, 16-bit weights or 16-bit activations: no integer kernel, every form runs (the
      DequantizeLinear in float), so per axis stays. An 8-bit weight in an int16 container
      (``_container_bits``) likewise."""
    return (
        tp.role == "weight"
        and tp.axis is not None
        and tp.axis >= 2
        and _container_bits(plan, tp) == 8
        and any(
            handler(plan.layers[c].op_type).batched_weights
            for c in tp.consumers
            if c in plan.layers
        )
    )


def emit_qdq(model: onnx.ModelProto, plan: QuantPlan) -> onnx.ModelProto:
    need = required_opset(plan)
    if opset_version(model) < need:
        raise ModelError(
            f"model opset {opset_version(model)} < {need} needed by the plan; upgrade first"
        )
    out = onnx.ModelProto()
    out.CopyFrom(model)
    e = _Emitter(out, plan)
    dynamic = {lp.name for lp in plan.layers.values() if lp.quantized and lp.act_dynamic}
    const_dq = {
        tp.name: e.dequantized_constant(tp)
        for tp in plan.tensors.values()
        if tp.role in ("weight", "bias")
        and tp.name in e.g.initializers
        and not set(tp.consumers) <= dynamic
    }
    # constants are replaced only in the layers the plan quantizes
    for lp in plan.layers.values():
        if not lp.quantized or lp.name in dynamic:
            continue
        node = e.g.node_by_name[lp.name]
        for i, name in enumerate(node.input):
            if name and name in const_dq and name in (lp.weight, lp.bias):
                node.input[i] = const_dq[name]
    body = e.activations()
    if dynamic:
        body = [m for n in body for m in (e.dynamic(n) if n.name in dynamic else [n])]
    blocked = {lp.name for lp in plan.layers.values() if lp.quantized and lp.block_size}
    nodes = _wire(e, e.head + body, blocked)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(e.inits)
    dyn_weights = {plan.layers[n].weight for n in dynamic} - {None}
    # the float weights of dynamic layers, and the scales of Q/DQ pairs _wire dropped
    drop_unused_initializers(out, set(const_dq) | dyn_weights | {t.name for t in e.inits})  # type: ignore[arg-type]
    # stale value_info would pin float types onto renamed tensors
    keep = [v for v in out.graph.value_info if v.name not in e.rewire and v.name not in e.outputs]
    del out.graph.value_info[:]
    out.graph.value_info.extend(keep)
    return out


def _wire(e: _Emitter, nodes: list[onnx.NodeProto], blocked: set[str]) -> list[onnx.NodeProto]:
    """Readers of quantized tensors read their dequantized copies, except float readers of a
    tensor no quantized layer writes (_Emitter.reads_float) and a block-wise layer's
    activation input (and a dynamic layer's, whose nodes are in ``e.added``): it reads the float
    tensor, as onnxruntime's MatMulNBits fusion needs (a DequantizeLinear there too and the
    MatMul stays unfused, dequantizing its weight on every call). Q/DQ pairs left unread then go."""
    for node in nodes:
        if id(node) in e.added:
            continue
        for i, name in enumerate(node.input):
            if name in e.rewire and not (i == 0 and node.name in blocked):
                if not e.reads_float(node, name):
                    node.input[i] = e.rewire[name]
    if not blocked and not any(n.op_type == "DynamicQuantizeLinear" for n in nodes):
        return nodes
    while True:  # a DQ nobody reads, then its Q
        read = {i for n in nodes for i in n.input} | e.outputs
        dead = {
            id(n)
            for n in nodes
            if id(n) in e.added
            and n.op_type in ("QuantizeLinear", "DequantizeLinear")
            and not any(o in read for o in n.output)
        }
        if not dead:
            return nodes
        nodes = [n for n in nodes if id(n) not in dead]


class _Emitter:
    """One emit_qdq's state: the names taken, the initializers and nodes added (``head``:
    weight/bias DQ and graph-input Q/DQ), one scale and zero point per grid, and what the
    readers of each quantized tensor read instead (``rewire``)."""

    def __init__(self, out: onnx.ModelProto, plan: QuantPlan) -> None:
        self.plan = plan
        self.g = Graph(out)
        self.scope = NameScope(all_names(out))
        self.inits: list[onnx.TensorProto] = []
        self.head: list[onnx.NodeProto] = []
        self.act = {
            t: tp
            for t, tp in plan.tensors.items()
            if tp.role == "activation" and not _identity_qdq(tp)
        }
        self.grids: dict[str, tuple[str, str]] = {}
        self.rewire: dict[str, str] = {}
        self.outputs = set(self.g.output_names)
        self.added: set[int] = set()

    def dequantized_constant(self, tp: TensorPlan) -> str:
        """Quantized initializers of a weight or bias and its DequantizeLinear (in ``head``);
        returns the dequantized name."""
        w = self.g.array(tp.name)
        if tp.correction:  # bias correction (quant/algorithms/bias_correction.py)
            w = w + np.asarray(tp.correction, np.float32).reshape(w.shape)
        q = _q_values(tp, w)
        etype = edit.elem_type(_container_bits(self.plan, tp), tp.signed)
        qn = self.scope.new(f"{tp.name}_quantized")
        sn = self.scope.new(f"{tp.name}_scale")
        zn = self.scope.new(f"{tp.name}_zero_point")
        dn = self.scope.new(f"{tp.name}_dequantized")
        per_axis = tp.axis is not None
        scale = np.asarray(tp.scale, dtype=np.float32)
        zp = np.asarray(tp.zero_point, dtype=np.int64)
        axis, block = tp.axis, None
        if tp.block_size:  # [K, N] in blocks along K, int4 without a zero point: MatMulNBits
            axis, block = 0, tp.block_size
            scale = scale.reshape(-1, w.shape[1])
            self.inits.append(edit.int_tensor(qn, q, etype, raw=True))
            self.inits.append(edit.float_tensor(sn, scale))
            name = self.scope.new(f"{tp.name}_DequantizeLinear")
            self.head.append(edit.dequantize_node(name, qn, sn, "", dn, axis, block))
            return dn
        if _blocked(self.plan, tp):  # [..., K, N]: one block over K, scale [..., 1, N]
            axis, block = w.ndim - 2, w.shape[-2]
            shape = (*w.shape[:-2], 1, w.shape[-1])
            scale, zp = np.broadcast_to(scale, shape), np.broadcast_to(zp, shape)
        self.inits.append(edit.int_tensor(qn, q, etype))
        self.inits.append(edit.float_tensor(sn, scale if per_axis else scale[0]))
        self.inits.append(edit.int_tensor(zn, zp if per_axis else zp[0], etype))
        name = self.scope.new(f"{tp.name}_DequantizeLinear")
        self.head.append(edit.dequantize_node(name, qn, sn, zn, dn, axis, block))
        return dn

    def dynamic(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        """A dynamic layer's nodes in place of ``node`` (they read its float input)."""
        lp = self.plan.layers[node.name]
        tp = self.plan.tensors[lp.weight]  # type: ignore[index]
        q = _q_values(tp, self.g.array(tp.name))
        nodes, inits = dynamic_layer(node, tp, q, node_attrs(node), self.scope)
        self.inits.extend(inits)
        self.added.update(id(n) for n in nodes)
        return nodes

    def reads_float(self, node: onnx.NodeProto, t: str) -> bool:
        """``node`` keeps reading the float ``t``: it is a float op (not a quantized layer, not
        a transparent op passing the grid on) and ``t`` comes from a float op too. The
        residual Add beside the Q/K/V MatMuls reading a LayerNorm output then adds the exact
        value instead of its rounded copy. A quantized layer's output is not such a tensor:
        onnxruntime fuses its Q into the layer only when nothing else reads the float output."""
        tp = self.act.get(t)
        if tp is not None and node.doc_string == OWN_GRID:  # its own grid reads the exact values
            return True
        if tp is None or tp.producer is not None or tp.via is not None:
            return False
        lp = self.plan.layers.get(node.name)
        if lp is not None and lp.quantized:
            return False
        return not any(o in self.act for o in node.output)

    def quantized_output(self, t: str) -> bool:
        """A graph output carries its Q/DQ only when the plan quantizes it as a layer's output
        (quantize_outputs). A graph output (or input) that is also read by quantized layers
        otherwise stays float for the user; its readers take a dequantized copy."""
        tp = self.act[t]
        return t in self.outputs and (tp.producer is not None or tp.via is not None)

    def qdq(self, t: str, src: str) -> list[onnx.NodeProto]:
        tp = self.act[t]
        key = f"{tp.root or t}@{tp.bits}{'s' if tp.signed else 'u'}"
        if key not in self.grids:
            sn = self.scope.new(f"{tp.root or t}_scale")
            zn = self.scope.new(f"{tp.root or t}_zero_point")
            self.inits.append(edit.float_tensor(sn, tp.scale[0]))
            zp = np.asarray(tp.zero_point[0])
            self.inits.append(edit.int_tensor(zn, zp, edit.elem_type(tp.bits, tp.signed)))
            self.grids[key] = (sn, zn)
        sn, zn = self.grids[key]
        qn = self.scope.new(f"{t}_quantized")
        dn = t if self.quantized_output(t) else self.scope.new(f"{t}_dequantized")
        qnode = edit.quantize_node(self.scope.new(f"{t}_QuantizeLinear"), src, sn, zn, qn)
        dnode = edit.dequantize_node(self.scope.new(f"{t}_DequantizeLinear"), qn, sn, zn, dn)
        self.added.update((id(qnode), id(dnode)))
        if not self.quantized_output(t):
            self.rewire[t] = dn
        return [qnode, dnode]

    def activations(self) -> list[onnx.NodeProto]:
        """Q/DQ after each quantized graph input (in ``head``) and node output; returns the
        graph's nodes with them."""
        for inp in self.g.inputs:
            if inp.name in self.act:
                self.head.extend(self.qdq(inp.name, inp.name))
        body: list[onnx.NodeProto] = []
        for node in self.g.nodes:
            body.append(node)
            for i, o in enumerate(node.output):
                if o in self.act:
                    src = o
                    if self.quantized_output(o):  # the graph output keeps its name on the DQ
                        src = self.scope.new(f"{o}_float")
                        node.output[i] = src
                    body.extend(self.qdq(o, src))
        return body
