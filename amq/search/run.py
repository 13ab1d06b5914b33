"""Running a mixed-precision search (DESIGN.md §9): SearchSettings (frozen, pickled to worker
processes) and run_search, which calibrates once, ranks layers by sensitivity, and drives the
Optuna study (search/study.py) over QuantPlans built from the cached statistics."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from amq import report
from amq.analysis import metrics as M
from amq.analysis.bitops import bitops
from amq.analysis.sensitivity import (
    SensitivityReport,
    float_reference,
    sensitivity,
)
from amq.artifacts import resolved_config, write_quantized
from amq.calib import runner
from amq.calib.data import batches
from amq.calib.memory import budgeted
from amq.calib.prepare import prepare
from amq.calib.statistics import calib_and_eval, resolve_cache_dir
from amq.calib.workspace import Workspace
from amq.config import (
    Config,
    check_block_size,
    load_config,
)
from amq.errors import ConfigError, ModelError
from amq.runtime import Execution
from amq.search import space as S
from amq.search import study as ST
from amq.search.report import write_search_report


@dataclass
class SearchResult:
    outcome: Any  # amq.search.study.SearchOutcome
    budget: float
    metric: str
    float_value: float | None
    out_dir: Path
    files: list[Path]
    cost_name: str

    @property
    def met(self) -> bool:
        return self.outcome.best is not None

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        o = self.outcome
        return {
            "met": self.met,
            "budget": self.budget,
            "metric": self.metric,
            "float_value": self.float_value,
            "objective": self.cost_name,
            "best": asdict(o.best) if o.best else None,
            "closest": asdict(o.closest) if o.closest else None,
            "pareto": [asdict(r) for r in o.pareto],
            "trials": len(o.records),
            "pruned": sum(r.state == "PRUNED" for r in o.records),
            "interrupted": o.interrupted,
            "files": [str(f) for f in self.files],
        }


@dataclass(frozen=True)
class SearchSettings:
    """Everything one search needs, given once: the CLI and the API build it, worker processes
    receive it pickled (so no option can be forgotten on the way to them)."""

    model: Any  # a path (workers need paths) or a ModelProto
    calib: Any  # a path, or a list of feed dicts
    eval_data: Any
    budget: str | float
    out_dir: str | os.PathLike[str]
    config: Config | str | os.PathLike[str] | None = None
    metric: str | None = None
    output: str | None = None
    weight_bits: tuple[Any, ...] = (4, 8, 16, "float")
    act_bits: tuple[int, ...] = (8, 16)
    n_trials: int | None = 100
    timeout: float | None = None
    objective: str = "bitops"
    storage: str | None = None
    study: str | None = None
    workers: int = 1
    seed: int = 0
    resume: bool = False
    confidence: bool = False
    space: str = "auto"
    samples: int | None = None
    cache_dir: Any = True
    execution: str = "ideal"
    dynamic: bool = False  # offer dynamic activations to MatMul/Gemm layers
    block_size: int = 0  # W4 of MatMul layers block-wise (0: per channel)

    def checked(self) -> SearchSettings:
        """The settings with their choices validated (one-line errors) and normalised."""
        if self.objective not in ("bitops", "size"):
            raise ConfigError(f"--objective '{self.objective}': use bitops or size")
        w = tuple(self.weight_bits)
        a = tuple(sorted(set(int(b) for b in self.act_bits)))
        if not w or any(b not in (4, 8, 16, "float") for b in w):
            raise ConfigError("--weight-bits: choose from 4, 8, 16, float")
        if all(b == "float" for b in w):
            raise ConfigError(
                "--weight-bits: give at least one of 4, 8, 16 (float alone searches nothing)"
            )
        if not a or any(b not in (8, 16, 4) for b in a):
            raise ConfigError("--act-bits: choose from 4, 8, 16")
        if self.workers > 1 and not all(
            isinstance(d, (str, os.PathLike)) for d in (self.model, self.calib, self.eval_data)
        ):
            raise ConfigError(
                "--workers > 1 needs the model and the data as paths (worker processes open them)"
            )
        execution = Execution(self.execution).value
        if self.block_size:
            check_block_size(self.block_size, "--block-size")
            if 4 not in w:
                raise ConfigError(
                    "--block-size: block-wise weights are 4-bit; add 4 to --weight-bits"
                )
        if self.dynamic and 8 not in w:
            raise ConfigError("--dynamic: dynamic activations need 8-bit weights in --weight-bits")
        return replace(self, weight_bits=w, act_bits=a, execution=execution)


class _Search:
    """One search's state: the workspace with its statistics, the space, the float reference,
    the budget; trials are built and scored from it."""

    def __init__(self, st: SearchSettings, show_progress: bool, worker: bool) -> None:
        self.st = st
        self.out = Path(st.out_dir)
        report.check_writable(self.out / "x")
        self.out.mkdir(parents=True, exist_ok=True)
        cfg = st.config if isinstance(st.config, Config) else load_config(st.config)
        self.cfg = cfg
        prep = prepare(st.model, cfg)
        self.specs = prep.specs
        cal, self.ev = calib_and_eval(st.calib, st.eval_data, self.specs, cfg, st.samples)
        has_labels = all(s.label is not None for s in self.ev)
        self.metric = st.metric or ("top1" if has_labels else "agreement")
        self.m = M.get_metric(self.metric)
        if self.m.ideal is None and not self.m.scores_reference:
            raise ConfigError(
                f"--metric {self.metric} has no float value to drop from; use cosine, neg_mse, agreement or top1"
            )
        self.sens = self._sensitivity(cfg, show_progress and not worker, worker)
        ws = Workspace(
            prep, cfg, cal, resolve_cache_dir(st.cache_dir), show_progress and not worker
        )
        ws.ensure_opset_for(cfg, [b for b in st.weight_bits + st.act_bits if isinstance(b, int)])
        self.ws = ws
        structure = ws.structure(cfg)
        base = structure.flat()  # the layers inside If branches and Loop bodies too
        self.layers = [lp.name for lp in base.layers.values() if lp.quantized]
        if not self.layers:
            raise ModelError(f"{prep.source}: no quantizable layer to search over")
        self.params_total = {n: base.layers[n].params for n in self.layers}
        self.sp = self._space(base)
        self.bs = cfg.calibration.batch_size
        self.ref, _ = float_reference(
            ws.prep.model, self.ev, self.specs, st.output, self.m, self.bs
        )
        self.float_value = self.ref.float_value
        self.budget = M.parse_budget(st.budget, self.metric, self.float_value)
        # everything a trial may need is observed up front (workers then find it in the cache)
        roots = ws.sources(structure)
        for p in self.sp.seeds():
            roots |= ws.sources(ws.structure(self.variant(S.assign(self.sp, p))))
        ws.observe(roots)

    def _sensitivity(self, cfg: Config, show_progress: bool, worker: bool) -> SensitivityReport:
        """The ranking that shapes the space: computed once, shared with workers via out_dir."""
        st = self.st
        path = self.out / "sensitivity.json"
        if (worker or st.resume) and path.exists():  # a worker elsewhere computes its own
            return SensitivityReport.from_dict(json.loads(path.read_text(encoding="utf-8")))
        sens = sensitivity(
            st.model,
            st.calib,
            st.eval_data,
            cfg,
            bits=sorted({8} | ({4} if 4 in st.weight_bits else set())),
            metric=self.metric,
            output=st.output,
            samples=st.samples,
            cache_dir=st.cache_dir,
            show_progress=show_progress,
        )
        report.atomic_write(path, sens.to_json())
        return sens

    def _space(self, base) -> S.Space:
        has_w = {n: base.layers[n].weight is not None for n in self.layers}
        order8 = self.sens.layer_order(8)
        high = [n for n in order8 if n in has_w] + [n for n in self.layers if n not in order8]
        low_src = self.sens.layer_order(4) if 4 in self.sens.bits else order8
        low = [n for n in reversed(low_src) if n in has_w] + [
            n for n in self.layers if n not in low_src
        ]
        st = self.st
        sp = S.Space(self.layers, has_w, high, low, st.weight_bits, st.act_bits, st.space)
        # which layers can take the runtime choices: what the planner decides with them asked
        # of every layer
        if st.dynamic:
            cfg = replace(self.cfg, activations=replace(self.cfg.activations, dynamic=True))
            lps = self.ws.structure(cfg).flat().layers
            sp.dynamic_ok = {n: lps[n].act_dynamic for n in self.layers if n in lps}
        if st.block_size:
            w4 = replace(self.cfg.weights, bits=4, block_size=st.block_size)
            lps = self.ws.structure(replace(self.cfg, weights=w4)).flat().layers
            sp.block_ok = {n: bool(lps[n].block_size) for n in self.layers if n in lps}
            sp.block_size = st.block_size
        return sp

    def variant(self, a: S.Assignment) -> Config:
        return replace(self.cfg, layers=self.cfg.layers + S.overrides(a))

    def cost_of(self, a: S.Assignment) -> float:
        if self.st.objective == "size":
            p = self.params_total
            num = sum(p[n] * (32 if a[n].float else (a[n].weight_bits or 8)) for n in self.layers)
            return num / (sum(p[n] * 8 for n in self.layers) or 1)
        return bitops(self.ws.structure(self.variant(a))).ratio_to_int8

    def evaluate(self, a: S.Assignment) -> ST.Evaluation:
        sess = self.ws.session(self.ws.plan(self.variant(a)), "trial model", self.st.execution)
        ref, m, ev = self.ref, self.m, self.ev

        def gen():
            """Per-sample drop parts batch by batch (averaged metrics: search prunes on their
            running mean); else the scores are joined and the drop is one number at the end."""
            start, whole = 0, []
            runs = runner.run_batches(sess, [ref.output], batches(ev, self.specs, self.bs))
            for k, b in enumerate(runs):
                q = m.scores(np.asarray(b.values[ref.output]), ref.batches[k], ref.labels[k])
                r = ref.float_scores[start : start + len(q)] if m.scores_reference else None
                start += len(q)
                parts = M.drop_parts(m, q, r)
                if parts is not None:
                    yield parts
                else:
                    whole.append(q)
            if whole:
                yield np.array([self.float_value - m.value(m.join(whole))])

        return ST.Evaluation(gen(), len(ev), per_sample=m.averaged)

    def ci_of(self, d: np.ndarray) -> tuple[float, float]:
        return M.bootstrap_ci(lambda i: float(np.mean(d[i])), len(d), 500)

    def value_of(self, drop: float) -> float:
        return self.float_value - drop if self.float_value is not None else -drop

    def write_best(self, records: list[ST.TrialRecord], written: dict) -> list[Path]:
        """The report, and the best (else the closest) trial's model, config and qparams."""
        best, closest = ST.best_of(records)
        pick = best or closest
        out, st = self.out, self.st
        files = write_search_report(
            out, records, self.budget, self.metric, self.float_value, st.objective, self.sp
        )
        if pick is not None and written.get("best") != (pick.number, best is not None):
            a = S.assign(self.sp, pick.params)
            plan = self.ws.plan(self.variant(a))
            head = (
                f"# amq search: trial {pick.number}, {st.objective} {pick.cost:.4f}x all-INT8, "
                f"{self.metric} drop {pick.drop:.4g} (budget {self.budget:.4g})"
                f"{'' if best else ' -- did NOT meet the budget'}\n"
            )
            flat = plan.flat()
            resolved = resolved_config(self.variant(a), flat)
            write_quantized(self.ws.emit(plan), flat, resolved, out / "best.onnx", head)
            written["best"] = (pick.number, best is not None)
        names = ("best.onnx", "best.amq.yaml", "best.qparams.json")
        return files + [out / f for f in names if (out / f).exists()]

    def run_study(self, storage, name: str, seed: int, resume: bool, seeds: bool, on_trial=None):
        st = self.st
        problem = ST.Problem(
            self.sp,
            self.cost_of,
            self.evaluate,
            self.ci_of,
            self.value_of,
            self.budget,
            use_upper_bound=st.confidence,
        )
        how = ST.StudyRun(storage, name, seed, st.n_trials, st.timeout, resume, seeds)
        return ST.run_study(problem, how, on_trial)

    def result(self, outcome, files: list[Path]) -> SearchResult:
        return SearchResult(
            outcome, self.budget, self.metric, self.float_value, self.out, files, self.st.objective
        )


@budgeted
def run_search(
    settings: SearchSettings, show_progress: bool = False, worker: bool = False
) -> SearchResult:
    """The cheapest per-layer bit assignment whose metric drop stays within the budget. Writes
    the best config, model and report to ``out_dir`` whenever a better one is found. ``worker``:
    join a study another process created (no seeding, its own sampler seed)."""
    st = settings.checked()
    run = _Search(st, show_progress, worker)
    storage_url = st.storage or (f"journal:{run.out / 'study.journal'}" if st.workers > 1 else None)
    storage = ST.make_storage(storage_url)
    name = st.study or "amq-search"
    if worker:
        outcome = run.run_study(storage, name, st.seed + 1000 + os.getpid() % 1000, True, False)
        return run.result(outcome, [])
    files: list[Path] = []
    written: dict = {}
    procs = []
    with report.progress(st.n_trials, "search", show_progress) as advance:
        state = {"n": 0}

        def on_trial(records: list[ST.TrialRecord]) -> None:
            files[:] = run.write_best(records, written)
            done = sum(r.state in ("COMPLETE", "PRUNED", "FAIL") for r in records)
            pruned = sum(r.state == "PRUNED" for r in records)
            best, _ = ST.best_of(records)
            status = f"search: {done} done, {pruned} pruned; " + (
                f"best {best.cost:.3f}x INT8 {st.objective}, drop {best.drop:.3g}"
                if best
                else "no feasible trial yet"
            )
            advance(max(0, done - state["n"]), status)
            state["n"] = done

        if storage is not None:  # created here (an existing study needs --resume), then shared
            ST.open_study(run.sp, storage, name, None, st.resume, True)
        if st.workers > 1:
            shared = replace(
                st,
                storage=storage_url,
                study=name,
                config=run.cfg,
                model=str(st.model),
                calib=str(st.calib),
                eval_data=str(st.eval_data),
                out_dir=str(run.out),
            )
            procs = _spawn_workers(st.workers - 1, shared)
        resume = True if storage is not None else st.resume
        outcome = run.run_study(storage, name, st.seed, resume, True, on_trial)
    for p in procs:
        p.join()
    if procs:
        outcome = ST.load_outcome(storage, name, outcome.interrupted)
    files[:] = run.write_best(outcome.records, written)
    return run.result(outcome, list(files))


def _worker_entry(settings: SearchSettings) -> None:
    run_search(settings, show_progress=False, worker=True)


def _spawn_workers(n: int, settings: SearchSettings) -> list[Any]:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = []
    for _ in range(n):
        p = ctx.Process(target=_worker_entry, args=(settings,), daemon=False)
        p.start()
        procs.append(p)
    return procs
