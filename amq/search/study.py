"""The Optuna study behind ``amq search`` (the only optuna import in amq).

Objective: the lowest cost (bitops or size, as a ratio to all-INT8) subject to a metric drop within
the budget, through Optuna's constraint support (``Trial.set_constraint``: drop - budget <= 0). Each
trial evaluates batch by batch and is pruned as soon as the running drop is confidently over the
budget; a trial that cannot beat the best feasible cost is not evaluated at all (it completes with
its cost, so the sampler still learns from it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from amq.errors import ConfigError
from amq.search.space import Assignment, Space, histogram

PRUNE_MIN_FRACTION = 0.2  # look at the running drop only after this share of the samples
PRUNE_Z = 2.5  # prune when mean - z * stderr is over the budget


@dataclass
class TrialRecord:
    number: int
    state: str  # COMPLETE | PRUNED | FAIL | RUNNING
    cost: float | None
    drop: float | None
    drop_ci: tuple[float, float] | None
    value: float | None
    feasible: bool
    bits: dict[str, int]
    params: dict[str, Any]
    reason: str = ""
    pid: int | None = None


@dataclass
class SearchOutcome:
    records: list[TrialRecord]
    best: TrialRecord | None  # feasible, lowest cost
    closest: TrialRecord | None  # when none is feasible: the smallest drop
    pareto: list[TrialRecord] = field(default_factory=list)
    interrupted: bool = False


def _lazy_optuna():
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def make_storage(url: str | None, heartbeat: bool = True):
    """None: in memory; 'journal:PATH' or a .journal/.log path: a journal file (safe for several
    processes on one machine); 'sqlite:///x.db', 'postgresql://...': an RDB storage."""
    optuna = _lazy_optuna()
    if url is None:
        return None
    if url.startswith("journal:") or url.endswith((".journal", ".log")):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        path = url.split(":", 1)[1] if url.startswith("journal:") else url
        return JournalStorage(JournalFileBackend(path))
    kw: dict[str, Any] = {"heartbeat_interval": 5, "grace_period": 20} if heartbeat else {}
    try:
        return optuna.storages.RDBStorage(_rdb_url(url), **kw)
    except ImportError as e:
        raise ConfigError(f"--storage {_shown(url)}: {e} (install the database driver)") from None
    except Exception as e:  # SQLAlchemy: a bad URL, no server, a refused login
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--storage {_shown(url)}: cannot open the storage: {first}") from None


def _rdb_url(url: str) -> str:
    """postgresql:// without a driver means the installed one: SQLAlchemy 2.1 defaults to psycopg
    (3), older versions to psycopg2, so a bare URL failed with whichever one is missing."""
    import importlib.util

    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        return url
    for module in ("psycopg2", "psycopg"):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{module}://{rest}"
    raise ConfigError(
        f"--storage {_shown(url)}: no PostgreSQL driver installed; pip install psycopg2-binary"
    )


def _shown(url: str) -> str:
    """The URL without its password."""
    import re

    return re.sub(r"://([^:/@]*):[^@/]*@", r"://\1:***@", url)


def pareto_front(records: list[TrialRecord]) -> list[TrialRecord]:
    """Completed trials not dominated in (cost lower, drop lower)."""
    done = [
        r for r in records if r.state == "COMPLETE" and r.cost is not None and r.drop is not None
    ]
    front = []
    for r in done:
        dominated = any(
            (o.cost <= r.cost and o.drop <= r.drop) and (o.cost < r.cost or o.drop < r.drop)
            for o in done
        )
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: (r.cost, r.drop))


def records_of(study) -> list[TrialRecord]:
    out = []
    for t in study.get_trials(deepcopy=False):
        if t.state.name == "WAITING":  # enqueued seeds not started yet
            continue
        ua = t.user_attrs
        ci = ua.get("drop_ci")
        out.append(
            TrialRecord(
                number=t.number,
                state=t.state.name,
                cost=ua.get("cost"),
                drop=ua.get("drop"),
                drop_ci=tuple(ci) if ci else None,
                value=ua.get("value"),
                feasible=bool(ua.get("feasible", False)) and t.state.name == "COMPLETE",
                bits=ua.get("bits", {}),
                params=dict(t.params),
                reason=ua.get("reason", ""),
                pid=ua.get("pid"),
            )
        )
    return out


def best_of(records: list[TrialRecord]) -> tuple[TrialRecord | None, TrialRecord | None]:
    feas = [r for r in records if r.feasible]
    best = min(feas, key=lambda r: (r.cost, r.drop, r.number)) if feas else None
    done = [r for r in records if r.state == "COMPLETE" and r.drop is not None]
    if not done:  # every evaluated trial was pruned: its running drop is the estimate there is
        done = [r for r in records if r.state == "PRUNED" and r.drop is not None]
    closest = min(done, key=lambda r: (r.drop, r.cost, r.number)) if done else None
    return best, closest


@dataclass
class Evaluation:
    """What a trial evaluation yields batch by batch: per-sample drop contributions."""

    contributions: Iterator[np.ndarray]
    samples: int
    per_sample: bool = True  # False: one number for the whole set (user metric)


@dataclass(frozen=True)
class Problem:
    """What a study optimises: the space; a trial's cost, its evaluation (Evaluation), the CI
    of its per-sample drops and the metric value of a drop; the budget on the drop, met by the
    drop itself or (``use_upper_bound``) by its CI's upper end."""

    space: Space
    cost_of: Callable[[Assignment], float]
    evaluate: Callable[[Assignment], Evaluation]
    ci_of: Callable[[np.ndarray], tuple[float, float]]
    value_of: Callable[[float], float]
    budget: float
    use_upper_bound: bool = False


@dataclass(frozen=True)
class StudyRun:
    """How a study runs: its storage (None: in memory) and name, the sampler's seed, the trial
    limit (a total over every process sharing the study) and time limit, whether an existing
    study is continued and whether the space's seed trials are enqueued."""

    storage: Any
    study_name: str
    seed: int
    n_trials: int | None = None
    timeout: float | None = None
    resume: bool = False
    enqueue_seeds: bool = True


def run_study(
    problem: Problem,
    how: StudyRun,
    on_trial: Callable[[list[TrialRecord]], None] | None = None,
) -> SearchOutcome:
    """Run (or join) the study; ``on_trial`` gets every trial's record after each trial."""
    optuna = _lazy_optuna()
    n_trials = how.n_trials
    sampler = optuna.samplers.TPESampler(
        seed=how.seed, n_startup_trials=max(5, min(10, (n_trials or 50) // 5)), multivariate=True
    )
    study = open_study(
        problem.space, how.storage, how.study_name, sampler, how.resume, how.enqueue_seeds
    )
    objective = _Objective(problem, study)

    def callback(study, _trial) -> None:
        if on_trial is not None:
            on_trial(records_of(study))

    interrupted = False
    callbacks = [callback]
    left = n_trials
    if n_trials is not None:  # a total over every process sharing the study
        # enqueued seeds (WAITING) are not trials run yet: counting them stopped a run with
        # fewer trials than seeds after its first trial
        started = tuple(s for s in optuna.trial.TrialState if s != optuna.trial.TrialState.WAITING)
        callbacks.append(optuna.study.MaxTrialsCallback(n_trials, states=started))
        # a process joining (or resuming) a study that already has them all runs none
        left = max(0, n_trials - len(study.get_trials(deepcopy=False, states=started)))
    try:
        study.optimize(objective, n_trials=left, timeout=how.timeout, callbacks=callbacks, catch=())
    except KeyboardInterrupt:  # outside a trial (a callback, the sampler)
        interrupted = True
    except Exception as e:
        if not from_ctrl_c(e):
            raise
        interrupted = True
    interrupted = interrupted or objective.interrupted
    recs = records_of(study)
    best, closest = best_of(recs)
    return SearchOutcome(recs, best, closest, pareto_front(recs), interrupted)


def from_ctrl_c(e: BaseException) -> bool:
    """Whether ``e`` was raised while a Ctrl-C was being handled. optuna 5 has one such place:
    a KeyboardInterrupt inside its bookkeeping of a finished trial (``_tell_with_warning``)
    leaves a variable unset that its ``finally`` then reads, so the Ctrl-C surfaces as an
    UnboundLocalError (seen once in CI: exit 1 and a traceback instead of 130)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__context__  # type: ignore[assignment]
    return False


def _constrain(trial: Any, value: float) -> None:
    trial.set_user_attr("constraint", float(value))
    trial.set_constraint("drop_minus_budget", float(value))


class _Objective:
    """One trial: sample an assignment, cost it, skip it when it cannot beat the best feasible
    cost, else evaluate it batch by batch (pruned when confidently over the budget) and record
    its drop, CI, value and feasibility."""

    def __init__(self, problem: Problem, study: Any) -> None:
        self.p = problem
        self.study = study
        self.optuna = _lazy_optuna()
        self.interrupted = False

    def __call__(self, trial: Any) -> float:
        try:
            return self.run_trial(trial)
        except KeyboardInterrupt:  # Ctrl-C: end this trial and the study, without a traceback
            self.interrupted = True
            trial.set_user_attr("reason", "interrupted")
            _constrain(trial, 1.0)
            trial.study.stop()
            raise self.optuna.TrialPruned() from None

    def run_trial(self, trial: Any) -> float:
        p = self.p
        assignment = p.space.sample(trial.suggest_int, trial.suggest_categorical)
        cost = float(p.cost_of(assignment))
        trial.set_user_attr("cost", cost)
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("bits", histogram(assignment))
        best, _ = best_of(records_of(self.study))
        if best is not None and cost >= best.cost:
            # not evaluated, but completed with its cost: the sampler learns that this region
            # costs more than what is already feasible (a pruned trial would teach it nothing)
            trial.set_user_attr("reason", "not evaluated: cannot beat the best feasible cost")
            trial.set_user_attr("feasible", False)
            _constrain(trial, 0.0)
            return cost
        ev = p.evaluate(assignment)
        d = self._drops(trial, ev)
        drop = float(np.mean(d))
        ci = p.ci_of(d) if ev.per_sample else (drop, drop)
        used = ci[1] if p.use_upper_bound else drop
        trial.set_user_attr("drop", drop)
        trial.set_user_attr("drop_ci", [ci[0], ci[1]])
        trial.set_user_attr("value", p.value_of(drop))
        trial.set_user_attr("feasible", bool(used <= p.budget))
        _constrain(trial, used - p.budget)
        return cost

    def _drops(self, trial: Any, ev: Evaluation) -> np.ndarray:
        """The evaluation's drop contributions, concatenated; the trial is pruned as soon as the
        running drop's lower bound is over the budget (after PRUNE_MIN_FRACTION of the samples)."""
        parts: list[np.ndarray] = []
        seen = 0
        for chunk in ev.contributions:
            parts.append(np.asarray(chunk, dtype=np.float64).reshape(-1))
            seen += len(parts[-1])
            if ev.per_sample and seen >= PRUNE_MIN_FRACTION * ev.samples and seen < ev.samples:
                d = np.concatenate(parts)
                se = float(np.std(d, ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
                lower = float(np.mean(d)) - PRUNE_Z * se
                trial.report(float(np.mean(d)), seen)
                if se > 0 and lower > self.p.budget:
                    trial.set_user_attr("drop", float(np.mean(d)))
                    trial.set_user_attr(
                        "reason", f"running drop {np.mean(d):.4g} over budget after {seen} samples"
                    )
                    _constrain(trial, lower - self.p.budget)
                    raise self.optuna.TrialPruned()
        return np.concatenate(parts) if parts else np.zeros(1)


def open_study(
    space: Space, storage: Any, study_name: str, sampler: Any, resume: bool, enqueue_seeds: bool
):
    """Create (or, with ``resume``, load) the study; seed it with the space's first trials once.
    Trials left RUNNING by a killed process are marked failed when their heartbeat is stale."""
    optuna = _lazy_optuna()
    try:
        study = optuna.create_study(
            storage=storage,
            sampler=sampler,
            study_name=study_name,
            direction="minimize",
            load_if_exists=resume,
        )
    except optuna.exceptions.DuplicatedStudyError:
        from amq.errors import ConfigError

        raise ConfigError(
            f"study '{study_name}' already exists in the storage: continue it with --resume, "
            "or name a new one with --study"
        ) from None
    if resume and storage is not None:
        try:
            optuna.storages.fail_stale_trials(study)
        except Exception:
            pass
    if enqueue_seeds and not study.get_trials(deepcopy=False):
        for p in space.seeds():
            study.enqueue_trial(p, skip_if_exists=True)
    return study


def load_outcome(storage: Any, study_name: str, interrupted: bool = False) -> SearchOutcome:
    """The outcome of a study as stored (all processes' trials)."""
    optuna = _lazy_optuna()
    study = optuna.load_study(study_name=study_name, storage=storage)
    recs = records_of(study)
    best, closest = best_of(recs)
    return SearchOutcome(recs, best, closest, pareto_front(recs), interrupted)
