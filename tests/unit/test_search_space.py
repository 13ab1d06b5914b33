"""amq.search.space: the mixed-precision search space (DESIGN.md §9), without optuna.

The space maps sampler answers (two callables) to a per-layer bit assignment and back to parameter
dicts (the seeds enqueued in the study) and to config layer overrides."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amq.config import ActivationsOverride, Config, Override, WeightsOverride
from amq.search.space import FLOAT, LayerChoice, Space, histogram, overrides

# six layers; "add" has no constant weight. Sensitivity: most sensitive first at 8 bits, and the
# least sensitive first at 4 bits (the two rankings differ on purpose)
LAYERS = ["conv0", "conv1", "add", "conv2", "conv3", "fc"]
HAS_W = {n: n != "add" for n in LAYERS}
HIGH = ["fc", "conv2", "add", "conv0", "conv3", "conv1"]
LOW = ["conv3", "conv1", "add", "conv0", "conv2", "fc"]


def space(kind: str = "ranking", wbits=(4, 8, 16, FLOAT), abits=(8, 16)) -> Space:
    return Space(list(LAYERS), dict(HAS_W), list(HIGH), list(LOW), tuple(wbits), tuple(abits), kind)


class Answers:
    """A sampler that answers from a parameter dict and records what it was asked."""

    def __init__(self, params: Mapping[str, Any]):
        self.params = dict(params)
        self.asked: dict[str, tuple] = {}

    def suggest_int(self, name: str, lo: int, hi: int) -> int:
        assert name not in self.asked, f"{name} asked twice"
        self.asked[name] = (lo, hi)
        v = self.params[name]
        assert lo <= v <= hi, (name, v, lo, hi)
        return v

    def suggest_cat(self, name: str, choices: Sequence[Any]) -> Any:
        assert name not in self.asked, f"{name} asked twice"
        self.asked[name] = tuple(choices)
        v = self.params[name]
        assert v in choices, (name, v, choices)
        return v


def sample(sp: Space, params: Mapping[str, Any]) -> tuple[dict[str, LayerChoice], Answers]:
    a = Answers(params)
    out = sp.sample(a.suggest_int, a.suggest_cat)
    assert set(a.asked) == set(params), "every parameter is asked for, and nothing else"
    return out, a


def labels(assignment: Mapping[str, LayerChoice]) -> dict[str, str]:
    return {n: c.label() for n, c in assignment.items()}


# ---------------------------------------------------------------------------------------------
# LayerChoice, histogram, kind


def test_layer_choice_labels() -> None:
    assert LayerChoice(8, 8).label() == "W8A8"
    assert LayerChoice(4, 16).label() == "W4A16"
    assert LayerChoice(None, 16).label() == "A16"
    assert LayerChoice(None, 16, float=True).label() == "float"


def test_histogram_counts_labels_sorted() -> None:
    a = {"a": LayerChoice(8, 8), "b": LayerChoice(8, 8), "c": LayerChoice(None, 8, float=True)}
    assert histogram(a) == {"W8A8": 2, "float": 1}
    assert list(histogram(a)) == sorted(histogram(a))


def test_auto_kind_is_per_layer_up_to_12_layers() -> None:
    def auto(n: int) -> str:
        names = [f"l{i}" for i in range(n)]
        return Space(names, dict.fromkeys(names, True), names, names, kind="auto").kind

    assert auto(1) == auto(12) == "per_layer"
    assert auto(13) == auto(60) == "ranking"


# ---------------------------------------------------------------------------------------------
# ranking: counts along the two rankings


def test_from_counts_zero_is_all_int8() -> None:
    a = space().from_counts(0, 0, 0)
    assert labels(a) == {n: ("W8A8" if HAS_W[n] else "A8") for n in LAYERS}


def test_from_counts_allocates_float_then_16_along_the_high_ranking_and_w4_along_the_low() -> None:
    a = space().from_counts(1, 2, 2)
    assert a["fc"].float  # the most sensitive
    assert labels(a)["conv2"] == "W16A16" and labels(a)["add"] == "A16"  # the next two
    # W4 for the two least sensitive at 4 bits that are not taken and have a weight
    assert labels(a)["conv3"] == "W4A8" and labels(a)["conv1"] == "W4A8"
    assert labels(a)["conv0"] == "W8A8"


def test_from_counts_w4_skips_layers_without_weight_and_layers_taken() -> None:
    a = space().from_counts(0, 0, 3)  # LOW: conv3, conv1, (add: no weight), conv0
    assert [n for n in LAYERS if a[n].weight_bits == 4] == ["conv0", "conv1", "conv3"]
    assert labels(a)["add"] == "A8"
    b = space().from_counts(0, 5, 6)  # every weighted layer but conv1 is at 16 first
    assert [n for n in LAYERS if b[n].weight_bits == 4] == ["conv1"]


@pytest.mark.parametrize("kind", ["ranking", "per_layer"])
def test_from_counts_counts_for_every_combination(kind: str) -> None:
    sp = space(kind)
    n = len(LAYERS)
    for nf, n16, n4 in itertools.product(range(n + 2), repeat=3):
        a = sp.from_counts(nf, n16, n4)
        assert set(a) == set(LAYERS)
        floats = [x for x in HIGH if a[x].float]
        assert floats == HIGH[: min(nf, n)]  # exactly the top of the ranking
        at16 = [x for x in HIGH if not a[x].float and a[x].act_bits == 16]
        assert at16 == HIGH[min(nf, n) : min(nf + n16, n)]
        assert all(a[x].weight_bits == (16 if HAS_W[x] else None) for x in at16)
        rest = [x for x in LOW if x not in HIGH[: nf + n16] and HAS_W[x]]
        w4 = [x for x in LOW if a[x].weight_bits == 4]
        assert w4 == rest[:n4]
        assert all(a[x].act_bits == 8 for x in w4)
        others = set(LAYERS) - set(floats) - set(at16) - set(w4)
        assert all(labels(a)[x] == ("W8A8" if HAS_W[x] else "A8") for x in others)


def test_from_counts_without_16_bit_weights_raises_activations_only() -> None:
    a = space(wbits=(4, 8)).from_counts(0, 1, 0)
    assert labels(a)["fc"] == "W8A16"
    b = space(wbits=(4, 8, 16), abits=(8,)).from_counts(0, 1, 0)
    assert labels(b)["fc"] == "W16A8"


def test_default_bits_without_8() -> None:
    sp = space(wbits=(4, 16), abits=(16,))
    assert sp.default_bits() == (4, 16)
    assert labels(sp.from_counts(0, 0, 0))["conv0"] == "W4A16"


def test_ranking_sample_asks_three_integers_over_all_layers() -> None:
    sp = space("ranking")
    a, ans = sample(sp, {"n_float": 1, "n_16": 2, "n_4": 2})
    n = len(LAYERS)
    assert ans.asked == {"n_float": (0, n), "n_16": (0, n), "n_4": (0, n)}
    assert a == sp.from_counts(1, 2, 2)


def test_ranking_sample_asks_only_for_allowed_choices() -> None:
    _, ans = sample(space("ranking", wbits=(4, 8)), {"n_16": 0, "n_4": 1})
    assert set(ans.asked) == {"n_16", "n_4"}  # no float
    _, ans = sample(space("ranking", wbits=(8,), abits=(8,)), {})
    assert ans.asked == {}  # one point: nothing to ask


# ---------------------------------------------------------------------------------------------
# seeds


@pytest.mark.parametrize("kind", ["ranking", "per_layer"])
def test_seeds_are_valid_params_and_cover_int16_int8_int4_float(kind: str) -> None:
    sp = space(kind)
    seeds = sp.seeds()
    if kind == "ranking":  # (per_layer: counts past the layers give equal dicts; optuna's
        # enqueue_trial(skip_if_exists=True) drops those)
        assert len(seeds) == len({tuple(sorted(s.items())) for s in seeds}), "no duplicate seed"
    got = [labels(sample(sp, s)[0]) for s in seeds]
    n16 = {n: ("W16A16" if HAS_W[n] else "A16") for n in LAYERS}
    n8 = {n: ("W8A8" if HAS_W[n] else "A8") for n in LAYERS}
    assert got[0] == n16, "all-INT16 first: a feasible cost to beat early"
    assert got[1] == n8, "then all-INT8"
    w4 = [g for g in got if any(v.startswith("W4") for v in g.values())]
    assert w4, "INT4 variants"
    assert any(all(v in ("W4A8", "A8") for v in g.values()) for g in w4), "W4 on every weight"
    assert any("W16A16" in g.values() for g in w4), "W4 with the most sensitive at 16"
    assert any("float" in g.values() for g in got), "a float variant"
    # greedy by sensitivity: the most sensitive layer is the one raised when only one is
    one16 = [g for g in got if sum(v in ("W16A16", "A16") for v in g.values()) == 1]
    assert one16 and all(g[HIGH[0]] == "W16A16" for g in one16)


def test_seeds_respect_the_choices() -> None:
    for wbits, abits in [((8,), (8,)), ((4, 8), (8,)), ((8, 16), (8, 16)), ((4, 8, 16), (8,))]:
        for kind in ("ranking", "per_layer"):
            sp = space(kind, wbits, abits)
            for s in sp.seeds():
                a, _ = sample(sp, s)
                for c in a.values():
                    assert not c.float, "float is not a choice"
                    assert c.act_bits in abits
                    assert c.weight_bits is None or c.weight_bits in wbits
    assert len(space(wbits=(8,), abits=(8,)).seeds()) == 1  # all-INT8 only


def test_ranking_seed_params_are_counts_in_range() -> None:
    sp = space("ranking")
    n = len(LAYERS)
    for s in sp.seeds():
        assert set(s) == {"n_float", "n_16", "n_4"}
        assert all(isinstance(v, int) and 0 <= v <= n for v in s.values())
    assert {"n_float": 0, "n_16": n, "n_4": 0} in sp.seeds()
    assert {"n_float": 0, "n_16": 0, "n_4": 0} in sp.seeds()


# ---------------------------------------------------------------------------------------------
# per_layer: params <-> assignment round trip


def test_per_layer_sample_asks_one_categorical_per_layer() -> None:
    sp = space("per_layer")
    params = sp.params_for(sp.from_counts(1, 1, 1), (1, 1, 1))
    a, ans = sample(sp, params)
    assert ans.asked["w:conv0"] == (4, 8, 16, FLOAT)
    assert ans.asked["a:conv0"] == (8, 16)
    assert ans.asked["f:add"] == (False, True)  # no weight: float or not, then activation bits
    assert "w:add" not in ans.asked
    assert "a:fc" not in ans.asked  # fc is float: no activation bits to choose
    assert a == sp.from_counts(1, 1, 1)


@st.composite
def assignments(draw, wbits=(4, 8, 16, FLOAT), abits=(8, 16)):
    out = {}
    for n in LAYERS:
        allow_float = FLOAT in wbits
        if HAS_W[n]:
            wb = draw(st.sampled_from(wbits))
            if wb == FLOAT:
                out[n] = LayerChoice(None, max(abits), float=True)
            else:
                out[n] = LayerChoice(wb, draw(st.sampled_from(abits)))
        elif allow_float and draw(st.booleans()):
            out[n] = LayerChoice(None, max(abits), float=True)
        else:
            out[n] = LayerChoice(None, draw(st.sampled_from(abits)))
    return out


@settings(max_examples=200, deadline=None)
@given(assignments())
def test_per_layer_params_round_trip(a: dict[str, LayerChoice]) -> None:
    sp = space("per_layer")
    params = sp.params_for(a, (0, 0, 0))
    back, _ = sample(sp, params)
    assert back == a


@settings(max_examples=100, deadline=None)
@given(assignments(wbits=(4, 8), abits=(8, 16)))
def test_per_layer_params_round_trip_without_float(a: dict[str, LayerChoice]) -> None:
    sp = space("per_layer", wbits=(4, 8), abits=(8, 16))
    params = sp.params_for(a, (0, 0, 0))
    assert not any(k.startswith("f:") for k in params)
    back, _ = sample(sp, params)
    assert back == a


def test_ranking_params_round_trip() -> None:
    sp = space("ranking")
    n = len(LAYERS)
    for c in itertools.product(range(n + 1), repeat=3):
        params = sp.params_for(sp.from_counts(*c), c)
        assert params == {"n_float": c[0], "n_16": c[1], "n_4": c[2]}
        back, _ = sample(sp, params)
        assert back == sp.from_counts(*c)


# ---------------------------------------------------------------------------------------------
# overrides: assignment -> config layer entries


def test_overrides_entries() -> None:
    a = {
        "conv0": LayerChoice(4, 8),
        "add": LayerChoice(None, 16),
        "fc": LayerChoice(None, 16, float=True),
        "conv1": LayerChoice(16, 16),
    }
    ov = dict(overrides(a))
    assert list(ov) == list(a), "one entry per layer, exact names, in order"
    assert ov["conv0"] == Override(
        weights=WeightsOverride(bits=4), activations=ActivationsOverride(bits=8), skip=False
    )
    assert ov["add"] == Override(
        weights=WeightsOverride(), activations=ActivationsOverride(bits=16), skip=False
    )
    assert ov["fc"] == Override(skip=True)
    assert ov["conv1"].weights.bits == 16 and ov["conv1"].activations.bits == 16


def test_overrides_resolve_to_the_assignment_and_win_over_user_entries() -> None:
    a = space().from_counts(1, 2, 2)
    user = (("*", Override(skip=True)), ("conv*", Override(weights=WeightsOverride(bits=16))))
    cfg = Config(layers=user + overrides(a))
    for n, c in a.items():
        s = cfg.settings_for(n, "Conv" if HAS_W[n] else "Add")
        assert s.skip == c.float, n
        if not c.float:
            assert s.act_bits == c.act_bits, n
            if c.weight_bits is not None:
                assert s.weight_bits == c.weight_bits, n


def test_overrides_on_the_example_model_give_the_planned_bits() -> None:
    """The overrides of an assignment, applied to the bundled example, plan those bits."""
    from pathlib import Path

    from amq import api

    model = Path(__file__).resolve().parents[2] / "examples" / "digits_cnn.onnx"
    _, base = api.bitops_of(model)
    names = [lp.name for lp in base.layers.values() if lp.quantized]
    has_w = {n: base.layers[n].weight is not None for n in names}
    sp = Space(names, has_w, names, list(reversed(names)), kind="ranking")
    a = sp.from_counts(1, 1, 2)
    _, plan = api.bitops_of(model, Config(layers=overrides(a)))
    for n, c in a.items():
        lp = plan.layers[n]
        assert lp.quantized == (not c.float), n
        if not c.float:
            assert lp.act_bits == c.act_bits, n
            if has_w[n]:
                assert lp.weight_bits == c.weight_bits, n


def test_ctrl_c_inside_optunas_bookkeeping_of_a_trial_ends_the_study_as_interrupted(monkeypatch):
    """A Ctrl-C that lands in optuna's own bookkeeping of a finished trial (_tell_with_warning)
    surfaces from optuna 5 as an UnboundLocalError raised while handling it: the study ends as
    interrupted, with the trials it finished, and no error (the CLI then exits 130, not 1)."""
    import numpy as np
    from optuna.study import _optimize

    from amq.search import study as S

    real = _optimize._tell_with_warning
    calls = []

    def tell(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(_optimize, "_tell_with_warning", tell)
    problem = S.Problem(
        space=space(),
        cost_of=lambda a: float(len(a)),
        evaluate=lambda a: S.Evaluation(iter([np.zeros(4)]), 4),
        ci_of=lambda d: (0.0, 0.0),
        value_of=lambda d: 1.0 - d,
        budget=0.01,
    )
    out = S.run_study(problem, S.StudyRun(None, "t", seed=0, n_trials=10, enqueue_seeds=False))
    assert out.interrupted and len(calls) == 3
    assert sum(r.state == "COMPLETE" for r in out.records) == 2
    with pytest.raises(ValueError, match="not a Ctrl-C"):  # any other error still surfaces
        try:
            raise ValueError("not a Ctrl-C")
        except ValueError as e:
            assert not S.from_ctrl_c(e)
            raise
