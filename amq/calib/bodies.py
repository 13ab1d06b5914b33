"""If branches and Loop/Scan bodies as models of their own: what they read is recorded on one float
pass, one sample per call, and each gets a Workspace of its own (calib/workspace.py)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import numpy_helper

from amq import report
from amq.calib import runner
from amq.calib.data import batches, open_data
from amq.calib.prepare import prepare
from amq.config import (
    Config,
    with_overrides,
)
from amq.graph import subgraphs
from amq.graph.model import (
    NameScope,
    all_names,
    iter_all_nodes,
)
from amq.quant.qdq import opset_for_bits
from amq.quant.registry import batched_weight_ops
from amq.runtime import Exposed

if TYPE_CHECKING:  # workspace.py imports this module: the class is needed for hints only
    from amq.calib.workspace import Workspace


@dataclass
class Branch:
    """One branch of an If, or the body of a Loop, in a Workspace's main graph."""

    where: str  # "<node name>.<then|else|body>"
    node: str  # the If or Loop node
    op: str  # If | Loop
    attr: str  # then_branch | else_branch | body
    ws: Workspace | None  # None: left float (see why)
    samples: int = 0  # its calls: calibration samples (If branch) or iterations (Loop body)
    why: str = "not taken by any calibration sample"


def branch_opset(model: onnx.ModelProto, cfg: Config) -> int:
    """The opset the quantized If branches and Loop bodies will need (0 without them): the bits
    the config gives their layers, resolved now so that the parent is upgraded once, before any
    Q/DQ is written."""
    nodes = [n for n in model.graph.node if subgraphs.bodies(n)]
    if not nodes:
        return 0
    bits: set[int] = set()
    for n in (
        n
        for i in nodes
        for attr in subgraphs.bodies(i)
        for n in iter_all_nodes(subgraphs.branch(i, attr))
    ):
        s = cfg.settings_for(n.name, n.op_type)
        bits |= {s.weight_bits, s.act_bits}
    ops = batched_weight_ops()
    batched = any(  # a batched MatMul weight is written as a blocked DequantizeLinear (opset 21)
        subgraphs.reads_batched_weight(subgraphs.branch(i, attr), model.graph, ops)
        for i in nodes
        for attr in subgraphs.bodies(i)
    )
    return max(opset_for_bits(bits), 21 if batched else 0)


def branch_calls(
    model: onnx.ModelProto, nodes: list[onnx.NodeProto], calls: Iterable[Mapping[str, np.ndarray]]
) -> Iterator[dict[str, tuple[str, list[dict[str, np.ndarray]]]]]:
    """For each call of ``model`` (one sample: an If's condition is one value per call), per If
    or Loop of ``nodes``: the body it ran (the branch an If takes; a Loop's body) and that body's
    own calls - one for an If branch, one per iteration for a Loop body, with its formal inputs
    (iteration number, condition, loop-carried values) - each holding the outer-scope values the
    body reads (outer initializers excluded: they go into the body model as initializers)."""
    outer = {t.name: t for t in model.graph.initializer}
    inputs = {i.name for i in model.graph.input}
    run = onnx.ModelProto()
    run.CopyFrom(model)
    scope = NameScope(all_names(run))
    iters = {
        n.name: subgraphs.expose_loop_inputs(run, n.name, scope) for n in nodes if n.op_type != "If"
    }
    free = {
        (n.name, a): subgraphs.free_names(subgraphs.branch(n, a)) - set(outer)
        for n in nodes
        for a in subgraphs.bodies(n)
    }
    expose = sorted(
        {n.input[0] for n in nodes if n.op_type == "If"}
        | set().union(*free.values())
        | {stacked for pairs in iters.values() for _formal, stacked in pairs} - inputs - set(outer)
    )
    sess = runner.session(Exposed(run, expose), source="model (If/Loop body inputs)")
    for b in runner.run_batches(sess, expose, ((dict(f), [], 1) for f in calls)):
        values = {**b.values, **b.feeds}
        out = {}
        for n in nodes:
            if n.op_type == "If":
                c = n.input[0]
                cond = values[c] if c in values else numpy_helper.to_array(outer[c])
                attr = "then_branch" if bool(np.asarray(cond).reshape(-1)[0]) else "else_branch"
                out[n.name] = (attr, [{k: np.asarray(values[k]) for k in free[(n.name, attr)]}])
                continue
            shared = {k: np.asarray(values[k]) for k in free[(n.name, "body")]}
            stacked = [(formal, np.asarray(values[s])) for formal, s in iters[n.name]]
            steps = len(stacked[0][1]) if stacked else 0
            out[n.name] = (
                "body",
                [{**shared, **{f: np.asarray(v[i]) for f, v in stacked}} for i in range(steps)],
            )
        yield out


def branch_workspaces(ws: Workspace) -> list[Branch]:
    """Branch list of ``Workspace.branches``: record each If branch's and Loop body's calls on
    the calibration samples (at most BRANCH_BYTES of them), then one Workspace per body that ran
    (its own calibration, batch 1: a body's inputs have no batch axis of their own; statistics
    cached like the parent's). A body amq cannot take apart stays float, with the reason."""
    model = ws.prep.model
    nodes = [n for n in model.graph.node if subgraphs.bodies(n)]
    if not nodes:
        return []
    recorded: dict[tuple[str, str], list[dict[str, np.ndarray]]] = {
        (n.name, a): [] for n in nodes for a in subgraphs.bodies(n)
    }
    size = dict.fromkeys(recorded, 0)
    calls = (f for f, _labels, _n in batches(ws.data, ws.prep.specs, 1))
    failed = None
    try:
        with report.progress(len(ws.data), "If/Loop/Scan inputs", ws.show_progress) as advance:
            for taken in branch_calls(model, nodes, calls):
                for name, (attr, body_calls) in taken.items():
                    for values in body_calls:
                        if size[(name, attr)] >= BRANCH_BYTES:  # enough calls of this body
                            break
                        recorded[(name, attr)].append(values)
                        size[(name, attr)] += sum(v.nbytes for v in values.values())
                advance(1)
    except Exception as e:  # a model amq cannot take apart keeps its control flow float
        failed = f"its inputs could not be recorded ({one_line(e)})"
    out = []
    for n in nodes:
        for attr in subgraphs.bodies(n):
            where = f"{n.name}.{attr.split('_')[0]}"
            samples = recorded[(n.name, attr)]
            if failed or not samples:
                why = failed or (Branch.why if n.op_type == "If" else "never ran")
                out.append(Branch(where, n.name, n.op_type, attr, None, why=why))
                continue
            try:
                sub, samples = body_model(model, n, attr, samples)
                bcfg = with_overrides(
                    ws.cfg, calibration={"batch_size": 1, "num_samples": len(samples)}
                )
                bprep = prepare(sub, bcfg)
                bprep.source = f"{ws.prep.source} ({where})"
                bdata = open_data(samples, bprep.specs, bcfg)
                runner.session(bprep.model, source=bprep.source)  # onnxruntime takes it
                bws = type(ws)(bprep, bcfg, bdata, ws.cache_dir, ws.show_progress, False)
            except Exception as e:  # this body stays float; the rest goes on
                why = f"cannot be made a model of its own ({one_line(e)})"
                out.append(Branch(where, n.name, n.op_type, attr, None, len(samples), why))
                continue
            out.append(Branch(where, n.name, n.op_type, attr, bws, len(samples)))
    return out


def body_model(
    parent: onnx.ModelProto,
    node: onnx.NodeProto,
    attr: str,
    calls: list[dict[str, np.ndarray]],
) -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    """Body ``attr`` of ``node`` (in ``parent``'s main graph) as a model of its own
    (subgraphs.branch_model), and its recorded calls cut down to that model's inputs (the outer
    constants it reads became its initializers)."""
    model = subgraphs.branch_model(
        parent,
        subgraphs.branch(node, attr),
        calls,
        {t.name: t for t in parent.graph.initializer},
        subgraphs.constant_names(parent.graph),
    )
    names = {i.name for i in model.graph.input}
    return model, [{k: v for k, v in c.items() if k in names} for c in calls]


# calls recorded per If branch or Loop body: the calibration samples beyond are not used for it
BRANCH_BYTES = 1 << 28


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def branch_notes(ws: Workspace, plan) -> list[str]:
    """One line per If or Loop of ``ws``'s graph (nested ones prefixed with where they sit): what
    became of its branches or body under ``plan``."""
    from amq.quant.registry import QUANTIZABLE_KINDS, handler

    notes: list[str] = []
    by_node: dict[tuple[str, str], list[str]] = {}
    layers: set[tuple[str, str]] = set()  # nodes with a quantizable layer in some body
    for b in ws.branches():
        side = b.attr.split("_")[0]
        sub = plan.branches.get(b.where)
        parts = by_node.setdefault((b.op, b.node), [])
        if b.ws is None or sub is None:
            parts.append(f"{side}: {b.why}, left float")
            graph = subgraphs.branch(ws.graph.node_by_name[b.node], b.attr)
            if any(handler(n.op_type).kind in QUANTIZABLE_KINDS for n in iter_all_nodes(graph)):
                layers.add((b.op, b.node))
            continue
        sub_layers = sub.flat().layers
        k = sum(lp.quantized for lp in sub_layers.values())
        calls = "sample(s)" if b.op == "If" else "iteration(s)"
        parts.append(f"{side}: {k} layer(s) quantized on {b.samples} {calls}")
        if sub_layers:
            layers.add((b.op, b.node))
        notes += [f"{b.where}: {x}" for x in b.ws.branch_notes(sub)]
    # an If or Loop with nothing to quantize in any body (shape logic) is not worth a line
    return notes + [
        f"{op} {name}: {'branches' if op == 'If' else 'body'} quantized as models of their "
        f"own ({'; '.join(parts)})"
        for (op, name), parts in by_node.items()
        if (op, name) in layers
    ]
