"""End to end: `amq search` (DESIGN.md §8-9) on the bundled example with a planted sensitive layer.

The plant: a `Div` by a per-channel constant (channel 0 multiplied by 1000) is put in front of the
classifier `/fc/Gemm`, and the matching column of the classifier's weight is divided by 1000. The
float function is unchanged, but the classifier's input now has one huge channel: a per-tensor
8-bit activation grid leaves the other channels almost no levels, so all-INT8 collapses, while
16-bit activations on `/fc/Gemm` (its only reader; `Div` stays float, so no other layer quantizes
that tensor) restore it. `/fc/Gemm` costs ~0.1% of the bitops, so a search that keeps it at 16
bits and lowers other layers to W4 gets below all-INT8.

(Why not scale a channel between `/layer1/conv1` and `/layer1/conv2`: that tensor is the quantized
output of conv1 as well as conv2's input, and the matching weight column of conv2 is then too small
for 8-bit per-output-channel weights, so only W16A16 on conv2 recovers it; conv2 is 39% of the
bitops and at 4x that no assignment gets below all-INT8.)

The CLI tests run `python -m amq` in subprocesses; the PostgreSQL test needs AMQ_TEST_PG_URL
(`.ci/run` sets it up with `.ci/postgres`) and skips without it.
"""

from __future__ import annotations

import collections
import csv
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper
from onnx import numpy_helper as nh

import amq
from amq import api
from amq.analysis.sensitivity import SensitivityReport

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "examples" / "digits_cnn.onnx"
CALIB = ROOT / "calib_data"
EVAL = ROOT / "eval_data"

PLANTED = "/fc/Gemm"
PLANTED_INPUT = "/plant/Div_output_0"
FACTOR = 1000.0
CHANNEL = 0
TRIALS = 40
OUTPUTS = (
    "best.onnx",
    "best.amq.yaml",
    "best.qparams.json",
    "search.html",
    "trials.csv",
    "trials.json",
    "sensitivity.json",
)
PG_URL = os.environ.get("AMQ_TEST_PG_URL")


# ---------------------------------------------------------------------------------------------
# helpers


def plant(dst: Path) -> Path:
    m = onnx.load(MODEL)
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    w = nh.to_array(inits["fc.weight"]).copy()  # [10, 32], transB=1: column = input channel
    w[:, CHANNEL] /= FACTOR
    inits["fc.weight"].CopyFrom(nh.from_array(w, "fc.weight"))
    d = np.ones((1, w.shape[1]), np.float32)
    d[0, CHANNEL] = 1.0 / FACTOR
    g.initializer.append(nh.from_array(d, "plant.divisor"))
    fc = next(n for n in g.node if n.name == PLANTED)
    div = helper.make_node(
        "Div", [fc.input[0], "plant.divisor"], [PLANTED_INPUT], name="/plant/Div"
    )
    fc.input[0] = PLANTED_INPUT
    g.node.insert(list(g.node).index(fc), div)
    onnx.checker.check_model(m)
    onnx.save(m, dst)
    return dst


def run_model(model: Path | str, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def top1(model: Path | str) -> float:
    logits = run_model(model, np.load(EVAL / "input.npy"))
    return 100.0 * float(np.mean(np.argmax(logits, axis=1) == np.load(EVAL / "labels.npy")))


def amq_cmd(*args: object) -> list[str]:
    return [sys.executable, "-m", "amq", *map(str, args)]


def search_args(model: Path, out: Path, *extra: object) -> list[str]:
    # without SmoothQuant, which would take the planted channel into the weights
    no_sq = model.parent / "no_smoothquant.yaml"
    no_sq.write_text("amq: 1\nsmoothquant: {enabled: false}\n")
    return amq_cmd(
        "search", model, "--calib", CALIB, "--eval", EVAL, "--budget", "1%", "-o", out,
        "-c", no_sq, *extra,
    )  # fmt: skip


def child_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["AMQ_CACHE_DIR"] = str(cache)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _default_sigint() -> None:
    # a child of a non-interactive shell may inherit SIGINT ignored; Ctrl-C must reach it
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the search exited ({proc.returncode}) before {what}")
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def trials_on_disk(out: Path) -> list[dict]:
    try:
        return json.loads((out / "trials.json").read_text(encoding="utf-8"))["trials"]
    except (FileNotFoundError, ValueError, KeyError):
        return []


_STORAGES: dict[str, object] = {}


def storage(url: str):
    """The storage as amq opens it (it picks the installed PostgreSQL driver)."""
    from amq.search.study import make_storage

    if url not in _STORAGES:
        _STORAGES[url] = make_storage(url, heartbeat=False)
    return _STORAGES[url]


def stored_trials(url: str, study: str):
    """The study's trials as the storage holds them ([] while it does not exist yet)."""
    import optuna

    try:
        return optuna.load_study(study_name=study, storage=storage(url)).get_trials(deepcopy=False)
    except (KeyError, optuna.exceptions.StorageInternalError):  # not yet created, SQLite busy
        return []


def finished(trials) -> list:
    return [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]


def started(trials) -> list:
    return [t for t in trials if t.state.name != "WAITING"]


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("search")


@pytest.fixture(scope="module")
def cache(work: Path) -> Path:
    """One statistics cache for the module (calibration of each model runs once)."""
    return work / "cache"


@pytest.fixture(scope="module")
def planted(work: Path) -> Path:
    return plant(work / "planted.onnx")


@pytest.fixture(scope="module")
def float_top1(planted: Path) -> float:
    return top1(planted)


@pytest.fixture(scope="module")
def searched(planted: Path, cache: Path, work: Path):
    out = work / "search"
    # without SmoothQuant, which would take the planted channel into the weights (see above)
    no_sq = amq.config.config_from_dict({"smoothquant": {"enabled": False}})
    res = api.search(
        planted, CALIB, EVAL, "1%", out, no_sq, n_trials=TRIALS, seed=0, cache_dir=cache
    )
    return res, out


# ---------------------------------------------------------------------------------------------
# the planted layer


def test_planted_model_is_the_same_function_but_fragile_at_int8(
    planted: Path, float_top1: float, cache: Path, tmp_path: Path
) -> None:
    x = np.load(EVAL / "input.npy")
    np.testing.assert_allclose(run_model(planted, x), run_model(MODEL, x), rtol=1e-4, atol=1e-4)
    assert float_top1 == pytest.approx(top1(MODEL))
    budget = 0.01 * float_top1

    # SmoothQuant (on by default) moves the planted channel into the weights: the fragility
    # this module searches around is that of the model without it
    no_sq = tmp_path / "no_sq.yaml"
    no_sq.write_text("amq: 1\nsmoothquant: {enabled: false}\n")
    q8 = amq.quantize(planted, CALIB, no_sq, tmp_path / "int8.onnx", cache_dir=cache)
    assert float_top1 - top1(q8.model_path) > 5.0  # clearly more than 1 point
    smoothed = amq.quantize(planted, CALIB, None, tmp_path / "sq.onnx", cache_dir=cache)
    assert float_top1 - top1(smoothed.model_path) <= budget
    assert any(f"SmoothQuant {PLANTED}: alpha" in n for n in smoothed.summary.notes)

    cfg = tmp_path / "fc16.yaml"
    cfg.write_text(
        f'amq: 1\nsmoothquant: {{enabled: false}}\nlayers:\n  "{PLANTED}": {{activations: {{bits: 16}}}}\n'
    )
    q16 = amq.quantize(planted, CALIB, cfg, tmp_path / "fc16.onnx", cache_dir=cache)
    assert float_top1 - top1(q16.model_path) <= budget


# ---------------------------------------------------------------------------------------------
# the search (one run of 40 trials, shared by the tests below)


def test_search_meets_budget_below_int8_bitops(searched, planted: Path, float_top1: float) -> None:
    res, out = searched
    best = res.outcome.best
    assert res.met and best is not None and best.feasible
    assert res.metric == "top1"
    assert res.budget == pytest.approx(0.01 * float_top1)
    assert best.drop <= res.budget
    assert best.cost < 1.0
    assert len(res.outcome.records) == TRIALS
    # the written config, counted again on its own, is below all-INT8 too
    rep, _plan = api.bitops_of(planted, out / "best.amq.yaml")
    assert rep.ratio_to_int8 == pytest.approx(best.cost)
    assert rep.ratio_to_int8 < 1.0
    # and something really went below 8 bits to pay for the planted layer
    assert any(k.startswith("W4") for k in best.bits)


def test_search_keeps_the_planted_layer_at_higher_precision(searched) -> None:
    res, out = searched
    q = json.loads((out / "best.qparams.json").read_text(encoding="utf-8"))
    fc = q["layers"][PLANTED]
    assert not fc["quantized"] or fc["act_bits"] >= 16, fc
    t = q["tensors"].get(PLANTED_INPUT)
    assert t is None or t["bits"] >= 16, t
    # the model itself: the planted tensor is quantized on a 16-bit grid, if at all
    m = onnx.load(out / "best.onnx")
    inits = {i.name: i for i in m.graph.initializer}
    qs = [n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == PLANTED_INPUT]
    for n in qs:
        zp = inits[n.input[2]]
        assert zp.data_type in (onnx.TensorProto.UINT16, onnx.TensorProto.INT16), zp.data_type
    # the best config says the same
    yaml_text = (out / "best.amq.yaml").read_text(encoding="utf-8")
    cfg = amq.load_config(out / "best.amq.yaml")
    ov = dict(cfg.layers)[PLANTED]
    assert ov.skip or ov.activations.bits >= 16, yaml_text


def test_best_model_meets_budget_in_an_independent_eval(
    searched, planted: Path, cache: Path
) -> None:
    res, out = searched
    r = subprocess.run(
        amq_cmd("eval", out / "best.onnx", "--data", EVAL, "--reference", planted, "--json"),
        capture_output=True,
        text=True,
        env=child_env(cache),
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["metric"] == "top1" and d["samples"] == 540
    assert d["drop"] <= res.budget
    assert d["drop"] == pytest.approx(res.outcome.best.drop, abs=1e-9)


def test_search_writes_every_output(searched) -> None:
    res, out = searched
    for name in OUTPUTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
        if name != "sensitivity.json":
            assert out / name in res.files, name
    html = (out / "search.html").read_text(encoding="utf-8")
    assert "<svg" in html and "Pareto front" in html
    d = json.loads((out / "trials.json").read_text(encoding="utf-8"))
    assert len(d["trials"]) == TRIALS and d["budget"] == pytest.approx(res.budget)
    assert res.outcome.best.number in d["pareto"]
    assert {t["state"] for t in d["trials"]} <= {"COMPLETE", "PRUNED"}
    with open(out / "trials.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0][:2] == ["trial", "state"] and len(rows) == TRIALS + 1
    head = (out / "best.amq.yaml").read_text(encoding="utf-8").splitlines()[0]
    assert f"trial {res.outcome.best.number}," in head and "NOT" not in head
    sens = SensitivityReport.from_dict(json.loads((out / "sensitivity.json").read_text()))
    assert sens.layer_order(8)[0] == PLANTED  # the plant is what sensitivity finds first


# ---------------------------------------------------------------------------------------------
# the budget not met, --timeout, --confidence


def test_no_trial_meets_the_budget_exits_1_and_writes_the_closest(
    planted: Path, cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    # activations at 8 bits only: the planted layer cannot be saved
    r = subprocess.run(
        search_args(planted, out, "--weight-bits", "4,8", "--act-bits", "8", "--trials", 6, "-q"),
        capture_output=True,
        text=True,
        env=child_env(cache),
        timeout=120,
    )
    assert r.returncode == 1, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "no trial met the budget" in err[0] and "closest: trial" in err[0], err[0]
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    head = (out / "best.amq.yaml").read_text(encoding="utf-8").splitlines()[0]
    assert "did NOT meet the budget" in head
    trials = trials_on_disk(out)
    assert len(trials) == 6 and not any(t["feasible"] for t in trials)


def test_timeout_stops_cleanly(planted: Path, cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    t0 = time.monotonic()
    r = subprocess.run(
        search_args(planted, out, "--trials", 100000, "--timeout", 2, "--json"),
        capture_output=True,
        text=True,
        env=child_env(cache),
        timeout=120,
    )
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["met"] and not d["interrupted"]
    assert 1 <= d["trials"] < 100000
    assert elapsed < 60
    assert len(trials_on_disk(out)) == d["trials"]
    assert all((out / name).is_file() for name in OUTPUTS)


def test_confidence_uses_the_upper_bound_of_the_drop(cache: Path, tmp_path: Path) -> None:
    # one point in the space (every layer W4A8): the same drop in every run
    kw = dict(weight_bits=(4,), act_bits=(8,), n_trials=2, cache_dir=cache)
    probe = api.search(MODEL, CALIB, EVAL, "100", tmp_path / "probe", **kw).outcome.best
    lo, hi = probe.drop_ci
    assert lo <= probe.drop < hi
    borderline = (probe.drop + hi) / 2  # the mean meets it, the CI's upper end does not

    by_mean = api.search(MODEL, CALIB, EVAL, repr(borderline), tmp_path / "mean", **kw)
    assert by_mean.met
    assert by_mean.outcome.best.drop == pytest.approx(probe.drop)

    by_upper = api.search(
        MODEL, CALIB, EVAL, repr(borderline), tmp_path / "upper", confidence=True, **kw
    )
    assert not by_upper.met
    c = by_upper.outcome.closest
    assert c.drop == pytest.approx(probe.drop) and c.drop_ci[1] > borderline


def test_fewer_trials_than_seeds(planted: Path, cache: Path, tmp_path: Path) -> None:
    # the seeds enqueued up front are not trials run yet: --trials 3 runs 3 of them
    res = api.search(planted, CALIB, EVAL, "1%", tmp_path, n_trials=3, cache_dir=cache)
    assert [r.number for r in res.outcome.records] == [0, 1, 2]
    assert all(r.state in ("COMPLETE", "PRUNED") for r in res.outcome.records)
    assert len(trials_on_disk(tmp_path)) == 3


def test_existing_study_needs_resume(planted: Path, cache: Path, tmp_path: Path) -> None:
    """A storage that already holds the study is not silently reused: --resume or a new name."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    api.search(planted, CALIB, EVAL, "1%", tmp_path / "a", n_trials=2, storage=url, cache_dir=cache)
    with pytest.raises(
        amq.AmqError, match="already exists in the storage: continue it with --resume"
    ):
        api.search(
            planted, CALIB, EVAL, "1%", tmp_path / "b", n_trials=2, storage=url, cache_dir=cache
        )
    res = api.search(
        planted,
        CALIB,
        EVAL,
        "1%",
        tmp_path / "a",
        n_trials=4,
        storage=url,
        resume=True,
        cache_dir=cache,
    )
    assert len(res.outcome.records) == 4


def test_float_alone_is_not_a_search_space(tmp_path: Path) -> None:
    with pytest.raises(amq.AmqError, match="--weight-bits: give at least one of 4, 8, 16"):
        api.search(MODEL, CALIB, EVAL, "1%", tmp_path, weight_bits=("float",), cache_dir=None)


# ---------------------------------------------------------------------------------------------
# Ctrl-C, resume after a kill, workers


def test_ctrl_c_prints_the_best_writes_outputs_and_exits_130(
    planted: Path, cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    with open(tmp_path / "stdout", "w") as fo, open(tmp_path / "stderr", "w") as fe:
        p = subprocess.Popen(
            search_args(planted, out, "--trials", 5000),
            stdout=fo,
            stderr=fe,
            env=child_env(cache),
            preexec_fn=_default_sigint,
        )
        try:
            # outputs are on disk and updated while the search runs
            n0 = len(wait_for(lambda: trials_on_disk(out), 90, "trials.json", p))
            wait_for(lambda: len(trials_on_disk(out)) > n0, 60, "trials.json to grow", p)
            assert (out / "best.onnx").is_file() and (out / "best.amq.yaml").is_file()
            seen = len(trials_on_disk(out))
            p.send_signal(signal.SIGINT)
            rc = p.wait(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    stdout = (tmp_path / "stdout").read_text()
    stderr = (tmp_path / "stderr").read_text()
    assert rc == 130, stderr
    assert "best: trial" in stdout and "(interrupted)" in stdout, stdout
    assert "interrupted" in stderr and "Traceback" not in stderr, stderr
    trials = trials_on_disk(out)
    assert seen <= len(trials) < 5000
    assert all((out / name).is_file() for name in OUTPUTS)
    best = min((t for t in trials if t["feasible"]), key=lambda t: (t["cost"], t["drop"]))
    assert f"best: trial {best['number']}:" in stdout


def test_resume_after_a_kill_keeps_every_finished_trial(
    planted: Path, cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    url = f"sqlite:///{tmp_path / 's.db'}"
    p = subprocess.Popen(
        search_args(planted, out, "--storage", url, "--trials", 400, "-q"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=child_env(cache),
    )
    try:
        wait_for(
            lambda: len(finished(stored_trials(url, "amq-search"))) >= 5,
            120,
            "5 finished trials",
            p,
        )
    finally:
        p.kill()
        p.wait()
    before = stored_trials(url, "amq-search")
    done = {t.number: (t.state.name, t.params, t.user_attrs.get("cost")) for t in finished(before)}
    assert len(done) >= 5
    total = len(started(before)) + 4

    r = subprocess.run(
        search_args(planted, out, "--storage", url, "--resume", "--trials", total, "-q"),
        capture_output=True,
        text=True,
        env=child_env(cache),
        timeout=240,
    )
    assert r.returncode == 0, r.stderr
    after = {t.number: t for t in stored_trials(url, "amq-search")}
    for number, (state, params, cost) in done.items():
        t = after[number]
        assert (t.state.name, t.params, t.user_attrs.get("cost")) == (state, params, cost)
    assert len(started(after.values())) == total
    assert len(finished(after.values())) >= len(done) + 4
    on_disk = {t["number"] for t in trials_on_disk(out)}
    assert set(done) <= on_disk

    # resumed again with the total already reached: no trial more
    r = subprocess.run(
        search_args(planted, out, "--storage", url, "--resume", "--trials", total, "-q"),
        capture_output=True,
        text=True,
        env=child_env(cache),
        timeout=240,
    )
    assert r.returncode == 0, r.stderr
    assert len(started(stored_trials(url, "amq-search"))) == total


def test_two_local_workers_share_one_study(planted: Path, cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = subprocess.run(
        search_args(planted, out, "--workers", 2, "--trials", 60, "-q"),
        capture_output=True,
        text=True,
        env=child_env(cache),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert (out / "study.journal").is_file()
    trials = trials_on_disk(out)
    assert 60 <= len(trials) <= 61  # two workers finishing at once may each start one more
    pids = collections.Counter(t["pid"] for t in trials)
    assert len(pids) == 2, pids


@pytest.mark.skipif(not PG_URL, reason="AMQ_TEST_PG_URL not set (.ci/run sets up PostgreSQL)")
def test_two_processes_share_one_postgresql_study(
    planted: Path, cache: Path, tmp_path: Path
) -> None:
    import optuna

    url = PG_URL
    study = f"amq-test-{uuid.uuid4().hex[:12]}"
    total = 30
    main = subprocess.Popen(
        search_args(planted, tmp_path / "main", "--storage", url, "--study", study)
        + ["--trials", str(total), "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(cache),
    )
    worker = None
    try:
        # the main process creates and seeds the study; then a second process joins it as a
        # worker, with its own output folder (as on another machine)
        wait_for(lambda: finished(stored_trials(url, study)), 120, "the first trial", main)
        worker = subprocess.Popen(
            search_args(planted, tmp_path / "worker", "--storage", url, "--study", study)
            + ["--trials", str(total), "--worker", "-q"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(cache),
        )
        _, main_err = main.communicate(timeout=300)
        _, worker_err = worker.communicate(timeout=300)
        assert main.returncode == 0, main_err
        assert worker.returncode == 0, worker_err
        trials = stored_trials(url, study)
        # --trials is a total over the processes; two finishing at once may each start one more
        assert total <= len(started(trials)) <= total + 1
        by_pid = collections.Counter(t.user_attrs.get("pid") for t in finished(trials))
        print("trials by pid:", dict(by_pid), "main", main.pid, "worker", worker.pid)
        assert by_pid[main.pid] >= 1 and by_pid[worker.pid] >= 1, (by_pid, main.pid, worker.pid)
        assert not (tmp_path / "worker" / "best.onnx").exists()  # a worker writes no outputs
        assert (tmp_path / "main" / "best.onnx").is_file()
    finally:
        for p in (main, worker):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        try:
            optuna.delete_study(study_name=study, storage=storage(url))
        except Exception:
            pass


def test_search_upgrades_an_old_opset_model_at_8_bits(tmp_path: Path) -> None:
    """Only 8 bits and float in the space: the opset-11 model is still upgraded to 13 for
    per-channel weights, as quantize does, and the search runs."""
    from tests.models import opset11

    m, cal, _ = opset11()
    res = api.search(
        m,
        cal,
        cal[:4],
        "100%",
        tmp_path,
        weight_bits=(8, "float"),
        act_bits=(8,),
        n_trials=2,
        cache_dir=None,
    )
    assert res.outcome.records
    best = onnx.load(tmp_path / "best.onnx")
    assert any(op.version >= 13 for op in best.opset_import if op.domain in ("", "ai.onnx"))
