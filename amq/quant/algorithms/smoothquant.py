"""SmoothQuant (Xiao et al. 2022): move activation outliers into the weights of the MatMul/Gemm that
read them. Per input channel j of X (the reduction axis K, X's last axis):
``s_j = max|X_j|^a / max|W_j|^(1-a)``; X is divided by s, the weight's row j multiplied by s, so
the float product is unchanged. MatMuls reading the same tensor (Q/K/V) share one s, computed from
the max over their weights. 1/s is folded into the tensor's producer (LayerNormalization scale and
bias, a bias Add after a MatMul/Gemm, a Mul by a constant, through a Relu) when the tensor feeds
nothing else; otherwise a Div by s is inserted before the group (a float op: an op amq does not
quantize, so that the unsmoothed tensor is never rounded on its way to the group).

``a`` is chosen per group on calibration rows of X by the group's output error after quantization
(weights per output channel at the layer's bits, X at one per-tensor grid over its calibrated
range): ``choose`` compares every a of the grid with no smoothing at all (s = 1; note that a = 0
is not "no smoothing": it gives s = 1 / max|W_j|).

The three references differ: onnxruntime's quantize_static(SmoothQuant=True) runs Intel Neural
Compressor's ORTSmoothQuant with one global a (0.5), one Mul per MatMul (Q/K/V get three), folded
only into a producer with a single consumer, Conv included; NNCF uses a fixed a (0.95 MatMul, 0.05
Conv), shares one s per source tensor (the member with the flattest s wins) and always inserts a
Mul; INC's own ``alpha: auto`` searches a in [0.3, 0.7] per op by the op's output loss.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from amq.config import CalibrationConfig, Config, LayerSettings, SmoothMode, SmoothQuantConfig
from amq.graph.model import Graph, NameScope, all_names
from amq.quant import observers, qmath

ALPHAS = tuple(round(0.05 * i, 2) for i in range(21))  # 0.0 .. 1.0
COARSE = 4  # search_alpha's first pass: every 4th alpha (0, 0.2, ..., 1.0)
MIN_GAIN = 0.5  # auto: smooth a group only where its (cross-validated) output error halves
# on auto, a group whose coarse best error is above the bar by this factor is left unsmoothed
# without search_alpha's fine pass: the fine pass lowered the coarse best by at most 1.07x on
# PP-OCR rec's 9 groups, 1.11x on paraphrase-MiniLM-L3-v2's 12 and 1.40x on
# all-mpnet-base-v2's 48 (measured)
FINE_GAIN = 1.6
# output columns a group's error is scored on at most: per-channel weight grids make each
# column's error its own, so an evenly spaced subset estimates the relative error over all. The
# 18710-class output layer of PP-OCRv6 rec took 5 of its 8.5 s of SmoothQuant decisions
SCORE_COLUMNS = 2048
SCALE_CLIP = (1e-4, 1e4)
POSITIVE_HOMOGENEOUS = ("Relu",)  # f(x / s) = f(x) / s for every s > 0


@dataclass(frozen=True)
class Member:
    """One MatMul/Gemm of a group: its node, its constant weight and whether that weight is
    stored [N, K] (Gemm transB=1) rather than [K, N]."""

    node: str
    weight: str
    transposed: bool = False


@dataclass(frozen=True)
class Group:
    """The candidate MatMul/Gemm layers reading one activation tensor; ``fold``: the op type of
    the producer 1/s folds into, or "" (a Div is inserted)."""

    tensor: str
    members: tuple[Member, ...]
    fold: str = ""


@dataclass(frozen=True)
class LayerGrid:
    """How a group is quantized: activation bits, weight bits, symmetric activations, and the
    calibration's range method (the error model picks X/s's range the way calibration will)."""

    act_bits: int = 8
    weight_bits: int = 8
    symmetric: bool = False
    method: str = "minmax"
    percentile: float = 99.99
    widen: bool = False  # calibration.widen_to_mse

    @classmethod
    def of(cls, ls: LayerSettings, c: CalibrationConfig) -> LayerGrid:
        """How a layer with settings ``ls`` is quantized under calibration settings ``c``
        (widening only where it is on: auto is decided later, on the edited model)."""
        method, widen = c.method.value, c.widen_to_mse == SmoothMode.ON
        return cls(ls.act_bits, ls.weight_bits, ls.act_symmetric, method, c.percentile, widen)


@dataclass(frozen=True)
class Choice:
    """What was decided for a group: ``alpha`` None = left as is; the relative output errors
    (sum over members of ||Y_q - Y||^2 / ||Y||^2) without smoothing and at ``alpha``."""

    group: Group
    alpha: float | None
    err_off: float
    err: float
    scales: np.ndarray | None = None

    @property
    def layers(self) -> list[str]:
        return [m.node for m in self.group.members]

    def describe(self) -> str:
        where = f"folded into {self.group.fold}" if self.group.fold else "Div inserted"
        names = ", ".join(self.layers)
        if self.alpha is None:
            return f"{names}: not smoothed (error {self.err_off:.3g}, best {self.err:.3g})"
        return (
            f"{names}: alpha {self.alpha:g}, error {self.err_off:.3g} -> {self.err:.3g} ({where})"
        )


# ---------------------------------------------------------------------------------------------
# Which layers


def _kn(w: np.ndarray, transposed: bool) -> np.ndarray:
    return w.T if transposed else w


def _single_use(g: Graph, name: str) -> bool:
    return len(g.consumers.get(name, [])) == 1 and name not in g.output_names


def _member(g: Graph, node: onnx.NodeProto, cfg: Config) -> Member | None:
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        return None
    x, w = node.input[0], node.input[1]
    if g.is_constant(x) or not g.is_constant(w) or len(g.initializers[w].dims) != 2:
        return None
    if g.elem_type(w) != onnx.TensorProto.FLOAT or not _single_use(g, w):
        return None  # a tied weight would change for its other reader too
    if node.op_type == "Gemm" and g.attr(node, "transA", 0):
        return None
    if cfg.settings_for(node.name, node.op_type).skip:
        return None
    return Member(node.name, w, bool(node.op_type == "Gemm" and g.attr(node, "transB", 0)))


def _init_k(g: Graph, name: str, k: int) -> bool:
    """A float initializer used by one node that broadcasts along X's last axis only."""
    if not g.is_constant(name) or not _single_use(g, name):
        return False
    dims = list(g.initializers[name].dims)
    return g.elem_type(name) == onnx.TensorProto.FLOAT and (
        all(d == 1 for d in dims) or (dims[-1] == k and all(d == 1 for d in dims[:-1]))
    )


def _scalable_outputs(g: Graph, node: onnx.NodeProto, k: int) -> bool:
    """A MatMul/Gemm whose output channels (k of them) can each take a factor: constant weight,
    and a Gemm bias C, if any, a constant of its own broadcasting along the output channels."""
    if _member(g, node, Config()) is None:
        return False
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        return _init_k(g, node.input[2], k)
    return True


def _producer_fold(g: Graph, tensor: str, k: int) -> str:
    """How 1/s reaches into the producer of ``tensor`` (read only by the group): the op type it
    folds into, after the positively homogeneous ops it passes ("Relu > Gemm"), or ""."""
    p = g.producer.get(tensor)
    if p is None or tensor in g.output_names:
        return ""
    if p.op_type in POSITIVE_HOMOGENEOUS and _single_use(g, p.input[0]):
        inner = _producer_fold(g, p.input[0], k)  # relu(x) / s = relu(x / s) for s > 0
        return f"{p.op_type} > {inner}" if inner else ""
    if p.op_type in ("MatMul", "Gemm"):
        return p.op_type if _scalable_outputs(g, p, k) else ""
    if p.op_type == "LayerNormalization":
        rank = len(g.shape(tensor) or ())
        axis = g.attr(p, "axis", -1)
        last = axis == -1 or (rank > 0 and axis == rank - 1)
        params = [i for i in p.input[1:3] if i]
        ok = last and all(
            g.is_constant(i) and _single_use(g, i) and list(g.initializers[i].dims) == [k]
            for i in params
        )
        return p.op_type if ok else ""
    if p.op_type not in ("Add", "Mul"):
        return ""
    consts = [i for i in p.input if g.is_constant(i)]
    if len(consts) != 1 or not _init_k(g, consts[0], k):
        return ""
    if p.op_type == "Mul":
        return "Mul"
    y = next(i for i in p.input if i != consts[0])  # Add: the bias of a MatMul/Gemm
    q = g.producer.get(y)
    if q is None or not _single_use(g, y) or not _scalable_outputs(g, q, k):
        return ""
    return "Add"


def _fold_target(g: Graph, tensor: str, members: tuple[Member, ...], k: int) -> str:
    """Where 1/s folds, or "" when the tensor is read by anything else than the group or its
    producer cannot absorb a per-channel scale (then a Div is inserted)."""
    readers = {n.name for n in g.consumers.get(tensor, [])}
    if readers != {m.node for m in members}:
        return ""
    return _producer_fold(g, tensor, k)


def find_groups(g: Graph, cfg: Config) -> list[Group]:
    """The candidate groups of a model: MatMul/Gemm with one activation input and one constant
    2-D weight, grouped by the tensor they read. Conv layers are not candidates."""
    by_tensor: dict[str, list[Member]] = {}
    for node in g.nodes:
        m = _member(g, node, cfg)
        if m is not None and g.is_float(node.input[0]):
            by_tensor.setdefault(node.input[0], []).append(m)
    groups = []
    for tensor, members in by_tensor.items():
        ks = {_kn(g.array(m.weight), m.transposed).shape[0] for m in members}
        if len(ks) != 1:
            continue
        group = tuple(members)
        groups.append(Group(tensor, group, _fold_target(g, tensor, group, ks.pop())))
    return groups


# ---------------------------------------------------------------------------------------------
# The math


def smooth_scales(
    x_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float
) -> np.ndarray:  # fmt: skip
    """s_j = max|X_j|^a / max|W_j|^(1-a), clipped to SCALE_CLIP; 1 where a channel is all zero
    in X or in W (nothing to balance)."""
    x = np.asarray(x_absmax, dtype=np.float64)
    w = np.asarray(w_absmax, dtype=np.float64)
    dead = (x <= 0) | (w <= 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.power(x, alpha) / np.power(w, 1.0 - alpha)
    s = np.where(dead | ~np.isfinite(s), 1.0, s)
    return np.clip(s, *SCALE_CLIP)


@dataclass(frozen=True)
class Sample:
    """Rows of a group's input X ([R, K]) and the per-channel min/max of the samples they come
    from (every value of those samples, not only the kept rows)."""

    rows: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    @functools.cached_property
    def rows64(self) -> np.ndarray:
        """``rows`` in float64, made once: every alpha and every split candidate reads them."""
        return self.rows.astype(np.float64)


def fitted_grid(rows: np.ndarray, lo: float, hi: float, grid: LayerGrid) -> tuple:
    """The activation grid (scale, zero point, Grid) calibration's method picks for ``rows``
    (their histogram) with exact extremes ``lo`` and ``hi``."""
    rows = np.asarray(rows)
    if grid.method == "minmax" and rows.size and np.isfinite(lo) and np.isfinite(hi):
        return qmath.activation_qparams(lo, hi, grid.act_bits, grid.symmetric)  # no histogram
    obs = observers.HistogramObserver()
    obs.update(np.asarray(rows, dtype=np.float32), lo, hi)
    r_lo, r_hi = observers.select_range(
        obs.stats, grid.method, grid.act_bits, grid.symmetric, grid.percentile, grid.widen
    )
    return qmath.activation_qparams(r_lo, r_hi, grid.act_bits, grid.symmetric)


def group_error(
    fit: Sample,
    test: Sample,
    weights: list[np.ndarray],
    s: np.ndarray,
    grid: LayerGrid,
    refs: list[np.ndarray] | None = None,
) -> float:
    """Relative output error of a group after quantization with scales ``s``, on ``test``'s rows:
    X/s at one per-tensor grid whose range the calibration's method picks from ``fit`` (its
    rows' histogram and its exact extremes [min_j lo_j/s_j, max_j hi_j/s_j]), each s-scaled
    weight ([K, N]) per output channel. Fitting the range on other samples than the ones scored
    keeps the headroom a flattened tensor loses (on a handful of samples, ranges fitted in-sample
    reward smoothing that clips every unseen sample). ``refs``: the float outputs x @ w of
    ``test``'s rows, when already computed (they do not depend on s)."""
    xs_fit = fit.rows64 / s
    scale, zp, agrid = fitted_grid(
        xs_fit, float(np.min(fit.lo / s)), float(np.max(fit.hi / s)), grid
    )
    x = test.rows64
    # the fake-quantized operands are float32 values: their product in float32 (half the time
    # of float64; its rounding is 1e-7 of an error measured at 1e-2 .. 1e-5)
    xq = qmath.fake_quantize(x / s, scale, zp, agrid, overwrite=True)
    err = 0.0
    for i, w in enumerate(weights):
        ref = refs[i] if refs is not None else x @ w
        wq = qmath.fake_quantize_weight(w * s[:, None], grid.weight_bits, 1, overwrite=True)
        err += output_error([xq @ wq], ref)
    return err


def output_error(parts: list[np.ndarray], ref: np.ndarray) -> float:
    """||sum(parts) - ref||^2 / ||ref||^2, the float32 ``parts`` summed in float64 into one
    buffer, the squares summed by dot products (no temporaries: a third of an alpha's scoring
    went to the copies)."""
    y = parts[0].astype(np.float64)
    for p in parts[1:]:
        y += p
    y -= ref
    return float(np.vdot(y, y)) / max(float(np.vdot(ref, ref)), 1e-30)


def _absmax(sample: Sample) -> np.ndarray:
    return np.maximum(np.abs(sample.lo), np.abs(sample.hi))


def weights_absmax(weights: list[np.ndarray]) -> np.ndarray:
    """max |W_j| per input channel j over the members' [K, N] weights."""
    return np.max([qmath.channel_absmax(w, 0) for w in weights], axis=0)


def cross_error(
    halves: tuple[Sample, Sample],
    weights: list[np.ndarray],
    alpha: float | None,
    grid: LayerGrid,
    refs: tuple[list[np.ndarray], list[np.ndarray]] | None = None,
    w_absmax: np.ndarray | None = None,
) -> float:
    """Two-fold error at ``alpha`` (None: no smoothing): s and the range fitted on each half,
    scored on the other, so that a channel exceeding its fitted extreme on unseen samples is
    clipped as it will be in use. ``refs``: each half's float outputs (``float_outputs``);
    ``w_absmax``: ``weights_absmax(weights)``, when already computed."""
    if alpha is not None and w_absmax is None:
        w_absmax = weights_absmax(weights)
    err = 0.0
    for k, (fit, test) in enumerate((halves, halves[::-1])):
        s = (
            np.ones(weights[0].shape[0])
            if alpha is None
            else smooth_scales(_absmax(fit), w_absmax, alpha)
        )
        err += group_error(fit, test, weights, s, grid, refs[1 - k] if refs else None)
    return err


def search_alpha(
    error: Callable[[float], float], hopeless: float = float("inf")
) -> tuple[float, float]:
    """The (error, alpha) of ALPHAS with the lowest error, coarse to fine: every COARSE-th
    alpha first, then the grid values between the best one's neighbours. The error over alpha
    is one valley on the models measured, where this finds the same alpha as trying all 21
    with at most 12 evaluations (the same alpha on all 21 groups of PP-OCR rec and
    paraphrase-MiniLM-L3-v2; rec's SmoothQuant pass 5.6 -> 4.1 s, profiled). Where the coarse
    best is at least ``hopeless``, the fine pass is skipped (that best is returned)."""
    seen: dict[int, float] = {}

    def at(i: int) -> float:
        if i not in seen:
            seen[i] = error(ALPHAS[i])
        return seen[i]

    last = len(ALPHAS) - 1
    coarse = sorted({*range(0, last + 1, COARSE), last})
    best = min(coarse, key=at)
    if seen[best] >= hopeless:
        return seen[best], ALPHAS[best]
    lo, hi = max(0, best - COARSE + 1), min(last, best + COARSE - 1)
    best = min(range(lo, hi + 1), key=at)
    return seen[best], ALPHAS[best]


def scored_columns(weights: list[np.ndarray], limit: int = SCORE_COLUMNS) -> list[np.ndarray]:
    """The members' [K, N] weights with at most ``limit`` evenly spaced output columns each, for
    scoring (SCORE_COLUMNS); the scales still come from every column (``weights_absmax``)."""
    return [
        w if w.shape[1] <= limit else w[:, np.linspace(0, w.shape[1] - 1, limit).astype(np.int64)]
        for w in weights
    ]


def float_outputs(sample: Sample, weights: list[np.ndarray]) -> list[np.ndarray]:
    """x @ w of a sample's rows for each weight, in float64 (what every alpha is scored against)."""
    return [sample.rows64 @ w for w in weights]


def choose(
    group: Group,
    halves: tuple[Sample, Sample],
    weights: list[np.ndarray],
    settings: tuple[SmoothQuantConfig, LayerGrid],
    known: tuple[tuple[list[np.ndarray], list[np.ndarray]], float] | None = None,
    w_absmax: np.ndarray | None = None,
) -> Choice:
    """The group's a: the grid value (or the configured one) with the lowest output error,
    compared with no smoothing. ``halves``: two disjoint sets of calibration samples;
    ``weights``: the members' weights as [K, N]; ``settings``: the SmoothQuant config and how
    the group is quantized; ``known``: each half's float outputs (``float_outputs``) and the
    unsmoothed error (``cross_error`` at None), when already computed; ``w_absmax``: max |W| per
    input channel over every column, where ``weights`` are a scored subset (scored_columns).
    The scales applied come from both halves' extremes."""
    sq, grid = settings
    if known is None:
        refs = (float_outputs(halves[0], weights), float_outputs(halves[1], weights))
        known = refs, cross_error(halves, weights, None, grid, refs)
    refs, err_off = known
    if w_absmax is None:
        w_absmax = weights_absmax(weights)
    if sq.alpha is None:
        auto = sq.enabled == SmoothMode.AUTO
        hopeless = (1.0 - MIN_GAIN) * err_off * FINE_GAIN if auto else float("inf")
        err, alpha = search_alpha(
            lambda a: cross_error(halves, weights, a, grid, refs, w_absmax), hopeless
        )
    else:
        err, alpha = cross_error(halves, weights, sq.alpha, grid, refs, w_absmax), sq.alpha
    on = sq.enabled == SmoothMode.ON or (
        sq.enabled == SmoothMode.AUTO and err < (1.0 - MIN_GAIN) * err_off
    )
    if not on:
        return Choice(group, None, err_off, err)
    both = np.maximum(_absmax(halves[0]), _absmax(halves[1]))
    return Choice(group, alpha, err_off, err, smooth_scales(both, w_absmax, alpha))


# ---------------------------------------------------------------------------------------------
# The edit


class _Weights:
    """The initializers being edited: each read from the latest edit, so a weight both scaled
    by rows (its own group) and by columns (a fold into the bias Add after it) keeps both."""

    def __init__(self, model: onnx.ModelProto, g: Graph) -> None:
        self.model, self.g, self.now = model, g, dict[str, np.ndarray]()

    def __getitem__(self, name: str) -> np.ndarray:
        return self.now[name] if name in self.now else self.g.array(name)

    def __setitem__(self, name: str, value: np.ndarray) -> None:
        self.now[name] = value
        _set(self.model, name, value)


def _set(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for t in model.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
            return
    raise KeyError(name)  # pragma: no cover - groups name initializers of this model


def _scale_outputs(ws: _Weights, node: onnx.NodeProto, inv: np.ndarray) -> None:
    """Multiply a MatMul/Gemm's output channels by ``inv``: weight columns and Gemm's C."""
    m = _member(ws.g, node, Config())
    assert m is not None
    ws[m.weight] = ws[m.weight] * (inv[:, None] if m.transposed else inv[None, :])
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        ws[node.input[2]] = np.broadcast_to(ws[node.input[2]], inv.shape) * inv


def _fold(ws: _Weights, group: Group, inv: np.ndarray) -> None:
    """Fold the per-channel factor ``inv`` (= 1/s) into the tensor's producer."""
    g = ws.g
    p = g.producer[group.tensor]
    while p.op_type in POSITIVE_HOMOGENEOUS:
        p = g.producer[p.input[0]]
    if p.op_type in ("MatMul", "Gemm"):
        _scale_outputs(ws, p, inv)
        return
    if p.op_type == "LayerNormalization":
        for i in p.input[1:3]:
            if i:
                ws[i] = ws[i] * inv
        return
    c = next(i for i in p.input if g.is_constant(i))
    ws[c] = np.broadcast_to(ws[c], inv.shape) * inv
    if p.op_type == "Add":  # y = x @ W + c: scale W's output columns and the bias c
        _scale_outputs(ws, g.producer[next(i for i in p.input if i != c)], inv)


def apply_smoothing(model: onnx.ModelProto, choices: Iterable[Choice]) -> onnx.ModelProto:
    """A copy of ``model`` with every chosen group smoothed: weights scaled by s, 1/s folded into
    the producer or applied by an inserted Div."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    ws = _Weights(out, Graph(model))
    scope = NameScope(all_names(model))
    for c in choices:
        if c.scales is None:
            continue
        s = c.scales.astype(np.float64)
        inv = (1.0 / s).astype(np.float32)
        for m in c.group.members:
            ws[m.weight] = ws[m.weight] * (s[None, :] if m.transposed else s[:, None])
        if c.group.fold:
            _fold(ws, c.group, inv)
            continue
        _insert_div(out, c.group, s, scope)
    return out


def _insert_div(
    model: onnx.ModelProto, group: Group, s: np.ndarray, scope: NameScope
) -> None:  # fmt: skip
    const = scope.new(f"{group.tensor}_smooth_scale")
    out = scope.new(f"{group.tensor}_smoothed")
    name = scope.new(f"{group.members[0].node}_smooth")
    model.graph.initializer.append(numpy_helper.from_array(s.astype(np.float32), const))
    node = onnx.helper.make_node("Div", [group.tensor, const], [out], name=name)
    members = {m.node for m in group.members}
    nodes = list(model.graph.node)
    first = next(i for i, n in enumerate(nodes) if n.name in members)
    for n in nodes:
        if n.name in members:
            n.input[0] = out
    model.graph.node.insert(first, node)


def inserted_ops(model: onnx.ModelProto) -> list[str]:
    """Names of the Div nodes SmoothQuant inserted (float ops)."""
    return [n.name for n in model.graph.node if n.op_type == "Div" and n.name.endswith("_smooth")]


def read_float_inputs(qmodel: onnx.ModelProto) -> int:
    """Make every inserted smoothing Div of a QDQ model read its float input: when the tensor it
    scales is quantized for another reader, the Div would otherwise take the dequantized copy and
    the group would be quantized twice (once before, once after the smoothing). Q/DQ pairs left
    without readers are dropped. Returns how many were rewired."""
    g = Graph(qmodel)
    done = 0
    for name in inserted_ops(qmodel):
        mul = g.node_by_name[name]
        dq = g.producer.get(mul.input[0])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = g.producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue
        mul.input[0] = q.input[0]
        done += 1
    if done:
        _drop_dead_qdq(qmodel)
    return done


def _drop_dead_qdq(model: onnx.ModelProto) -> None:
    while True:
        g = Graph(model)
        dead = [
            n
            for n in g.nodes
            if n.op_type in ("QuantizeLinear", "DequantizeLinear")
            and not any(g.consumers.get(o) or o in g.output_names for o in n.output)
            and not g.is_constant(n.input[0])
        ]
        if not dead:
            return
        keep = [n for n in model.graph.node if n not in dead]
        model.graph.ClearField("node")
        model.graph.node.extend(keep)


def notes(choices: list) -> list[str]:
    """One line per group for the summary and the resolved config (a Choice, or another pass's
    decision on the group with a describe() of its own: outlier_split.Split)."""
    return [
        f"SmoothQuant {c.describe()}" if isinstance(c, Choice) else c.describe() for c in choices
    ]


def per_layer_alpha(choices: list[Choice]) -> Mapping[str, float | None]:
    return {n: c.alpha for c in choices for n in c.layers}
