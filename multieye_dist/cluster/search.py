"""Offline Bayesian sweeps (``method: bayes`` without the W&B server): the one module that owns
optuna, imported lazily, so the library and grid/random sweeps need none of it.

The study lives in the sweep directory as an append-only optuna journal,
``<sweep_dir>/study.journal``, written under optuna's own file lock (``open(O_EXCL)``, which
works on NFSv3+, unlike sqlite's fcntl). Every array task's rank 0 *asks* it for a trial
(:func:`ask`), trains the trial's parameters, reports each dev evaluation to it
(:class:`TrialHook`: Hyperband pruning) and *tells* it the run's best dev macro-F1
(:func:`tell`). No pickle: the journal is JSON lines.

Why a second lock around ``ask``: optuna locks each journal write, not a whole ask (read the
history, create the trial, sample its parameters). Under ``<sweep_dir>/study.ask.lock`` an ask
sees the history as it is, its trial's number is the number of trials before it, and the
sampler is seeded from (``--seed``, that number): a proposal is a function of the history, and
:func:`propose` on a copy of that history proposes it again (what the tests check). The trials
seen at ask time are recorded in the trial (user attribute ``seen``).

The sweep file is W&B's: ``parameters`` (uniform, log_uniform_values, int_uniform, q_uniform,
``values``, ``value``; min/max alone infer int_uniform or uniform as W&B does), ``metric``
``dev/best_f1`` maximize (the summary's ``best_dev_f1``), ``early_terminate: {type: hyperband,
min_iter, max_iter, eta}`` (optuna's HyperbandPruner on dev macro-F1 per epoch), and one key of
ours, ``tpe: {n_startup_trials, n_ei_candidates, multivariate, constant_liar}`` (optuna's
TPESampler; W&B ignores the key online, the launcher strips it).
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multieye_dist.cluster.sweeps import SweepError, distribution_of

logger = logging.getLogger(__name__)

JOURNAL = "study.journal"
ASK_LOCK = "study.ask"  # optuna's lock object appends ".lock"
STUDY_NAME = "sweep"
METRICS = ("dev/best_f1", "dev/f1")  # both mean the run's best dev macro-F1 here
BAYES_DISTRIBUTIONS = ("uniform", "log_uniform_values", "int_uniform", "q_uniform")
TPE_KEYS = {
    "n_startup_trials": int,
    "n_ei_candidates": int,
    "multivariate": bool,
    "constant_liar": bool,
}
HYPERBAND_KEYS = ("type", "min_iter", "max_iter", "eta")
LOCK_GRACE_S = 120  # a lock file untouched this long is a dead holder's (optuna then breaks it)


@dataclass(frozen=True)
class Param:
    """One sweep parameter as the study samples it (pure data: validated without optuna)."""

    name: str
    kind: str  # one of BAYES_DISTRIBUTIONS, "categorical" or "constant"
    low: float | int | None = None
    high: float | int | None = None
    step: float | None = None
    choices: tuple | None = None
    value: Any = None


# ----------------------------------------------------------------------------- the sweep file


def parse_params(spec: dict, where: str = "sweep") -> list[Param]:
    """The sweep's parameters for optuna; a bad one is a :class:`SweepError` naming its key."""
    return [
        _param(name, p, f"{where}: parameters.{name}") for name, p in spec["parameters"].items()
    ]


def _param(name: str, p: dict, key: str) -> Param:
    kind = distribution_of(p)
    if kind == "constant":
        return Param(name, kind, value=p["value"])
    if kind == "categorical":
        bad = [v for v in p["values"] if not isinstance(v, bool | int | float | str | None)]
        if bad:
            raise SweepError(f"{key}.values: {bad[0]!r}: bayes choices are numbers or strings")
        return Param(name, kind, choices=tuple(p["values"]))
    if kind not in BAYES_DISTRIBUTIONS:
        raise SweepError(
            f"{key}: distribution {kind!r} is not offered offline for bayes "
            f"(choose {', '.join(BAYES_DISTRIBUTIONS)}, values or value)"
        )
    lo, hi = p.get("min"), p.get("max")
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (lo, hi))
    if not numeric or not lo < hi:
        raise SweepError(f"{key}: {kind} needs numbers min < max, got min={lo!r}, max={hi!r}")
    if kind == "int_uniform":
        if not (isinstance(lo, int) and isinstance(hi, int)):
            raise SweepError(f"{key}: int_uniform needs integer min and max")
        return Param(name, kind, low=lo, high=hi)
    if kind == "log_uniform_values" and lo <= 0:
        raise SweepError(f"{key}: log_uniform_values needs min > 0, got {lo!r}")
    step = None
    if kind == "q_uniform":
        step = p.get("q", 1.0)
        n = (hi - lo) / step if isinstance(step, int | float) and step > 0 else -1.0
        if n < 1 or not math.isclose(n, round(n), abs_tol=1e-9):
            # optuna's grid starts at min: a q that does not divide max - min has no last point
            raise SweepError(f"{key}.q: {step!r} must be > 0 and divide max - min ({hi} - {lo})")
    return Param(name, kind, low=float(lo), high=float(hi), step=step)


def tpe_options(spec: dict, where: str = "sweep") -> dict[str, Any]:
    """The ``tpe`` key: TPESampler's options (optuna's defaults for what is not given)."""
    tpe = spec.get("tpe") or {}
    if not isinstance(tpe, dict):
        raise SweepError(f"{where}: tpe: expected a mapping (n_startup_trials, ...)")
    for k, v in tpe.items():
        if k not in TPE_KEYS:
            raise SweepError(f"{where}: tpe.{k}: unknown (choose {', '.join(TPE_KEYS)})")
        if not isinstance(v, TPE_KEYS[k]) or (
            TPE_KEYS[k] is int and (isinstance(v, bool) or v < 1)
        ):
            raise SweepError(f"{where}: tpe.{k}={v!r}: expected {TPE_KEYS[k].__name__} (>= 1)")
    return dict(tpe)


def pruner_options(spec: dict, where: str = "sweep") -> dict[str, Any] | None:
    """W&B's ``early_terminate: {type: hyperband, min_iter, max_iter, eta}`` as optuna's
    HyperbandPruner options (iterations = epochs: the run reports dev macro-F1 per epoch);
    None without the key. W&B's ``s`` and ``strict`` have no optuna counterpart: refused."""
    et = spec.get("early_terminate")
    if et is None:
        return None
    key = f"{where}: early_terminate"
    if not isinstance(et, dict) or et.get("type") != "hyperband":
        raise SweepError(f"{key}: expected {{type: hyperband, min_iter: N, ...}}, got {et!r}")
    for k in et:
        if k not in HYPERBAND_KEYS:
            raise SweepError(f"{key}.{k}: not supported offline (give {', '.join(HYPERBAND_KEYS)})")
    opts: dict[str, Any] = {
        "min_resource": et.get("min_iter", 1),
        "reduction_factor": et.get("eta", 3),
    }
    opts["max_resource"] = et.get("max_iter", "auto")
    for k, name, least in (("min_iter", "min_resource", 1), ("eta", "reduction_factor", 2)):
        if not isinstance(opts[name], int) or isinstance(opts[name], bool) or opts[name] < least:
            raise SweepError(f"{key}.{k}={opts[name]!r}: expected an integer >= {least}")
    mx = opts["max_resource"]
    if mx != "auto" and (not isinstance(mx, int) or mx <= opts["min_resource"]):
        raise SweepError(f"{key}.max_iter={mx!r}: expected an integer > min_iter")
    return opts


def check_spec(spec: dict, where: str = "sweep") -> None:
    """Everything an offline bayes sweep reads from its file, checked without optuna."""
    metric = spec["metric"]
    if metric["name"] not in METRICS or metric.get("goal", "maximize") != "maximize":
        raise SweepError(
            f"{where}: metric={metric!r}: offline bayes maximizes the run's best dev macro-F1 "
            "(metric: {name: dev/best_f1, goal: maximize})"
        )
    if all(p.kind == "constant" for p in parse_params(spec, where)):
        raise SweepError(f"{where}: parameters: bayes needs at least one that varies")
    tpe_options(spec, where)
    pruner_options(spec, where)


def corner_runs(spec: dict) -> list[dict[str, Any]]:
    """Runs that every parameter's extremes appear in (each choice, min and max), for checking
    the config keys and ranges before anything is queued."""
    params = parse_params(spec)
    width = max((len(p.choices) if p.choices else 2) for p in params)
    runs = []
    for i in range(width):
        run = {}
        for p in params:
            if p.kind == "constant":
                run[p.name] = p.value
            elif p.kind == "categorical":
                run[p.name] = p.choices[i % len(p.choices)]
            else:
                run[p.name] = p.low if i % 2 == 0 else p.high
        runs.append(run)
    return runs


# ----------------------------------------------------------------------------- optuna


def require_optuna():
    """optuna, or a :class:`SweepError` saying how to install it."""
    try:
        import optuna
    except ImportError:
        raise SweepError(
            "offline bayes sweeps need optuna (pip install optuna; install.sh installs it)"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def distributions(params: list[Param]) -> dict[str, Any]:
    """optuna distributions of the sampled parameters (constants are not sampled)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for p in params:
        if p.kind == "categorical":
            out[p.name] = CategoricalDistribution(p.choices)
        elif p.kind == "int_uniform":
            out[p.name] = IntDistribution(int(p.low), int(p.high))
        elif p.kind in BAYES_DISTRIBUTIONS:
            log = p.kind == "log_uniform_values"
            out[p.name] = FloatDistribution(p.low, p.high, log=log, step=p.step)
    return out


def make_sampler(spec: dict, seed: int, number: int):
    """The TPE sampler of trial `number`: seeded from (seed, number), so each ask draws its own
    start-up sample yet is reproducible from the history it saw."""
    optuna = require_optuna()
    return optuna.samplers.TPESampler(seed=(seed * 1_000_003 + number) % 2**32, **tpe_options(spec))


def make_pruner(spec: dict):
    opts = pruner_options(spec)
    optuna = require_optuna()
    return optuna.pruners.NopPruner() if opts is None else optuna.pruners.HyperbandPruner(**opts)


def storage(sweep_dir: Path):
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

    require_optuna()
    path = str(Path(sweep_dir) / JOURNAL)
    return JournalStorage(JournalFileBackend(path, JournalFileOpenLock(path, LOCK_GRACE_S)))


def load_study(sweep_dir: Path, spec: dict | None = None, sampler=None, store=None):
    """The sweep's study (created on first use); `spec` gives it its pruner."""
    optuna = require_optuna()
    return optuna.create_study(
        storage=store or storage(sweep_dir),
        study_name=STUDY_NAME,
        direction="maximize",
        sampler=sampler,
        pruner=None if spec is None else make_pruner(spec),
        load_if_exists=True,
    )


@contextmanager
def _ask_lock(sweep_dir: Path):
    require_optuna()
    from optuna.storages.journal import JournalFileOpenLock

    lock = JournalFileOpenLock(str(Path(sweep_dir) / ASK_LOCK), LOCK_GRACE_S)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def propose(
    study, spec: dict, seed: int, fixed: dict[str, Any] | None = None, number: int | None = None
):
    """Ask `study` for its next trial with the sweep's sampler, seeded for trial `number`
    (default: the trials so far, the new trial's number); records the trials it saw (``seen``:
    [number, state] each). `fixed`: the parameters are these (a run continued under a new
    trial), not sampled. Returns the optuna Trial."""
    seen = [[t.number, t.state.name] for t in study.get_trials(deepcopy=False)]
    study.sampler = make_sampler(spec, seed, len(seen) if number is None else number)
    if fixed is not None:
        study.enqueue_trial(fixed, skip_if_exists=False)
    trial = study.ask(distributions(parse_params(spec)))
    trial.set_user_attr("seen", seen)
    return trial


def ask(
    sweep_dir: Path, spec: dict, seed: int, continues: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A new trial of the sweep's study: ``{"trial", "params"}`` (constants included).
    `continues`: a run record (``trial``, ``params``) that did not finish: its trial is failed
    if it is still RUNNING (its task is gone) and a new trial takes over the same parameters."""
    sweep_dir = Path(sweep_dir)
    with _ask_lock(sweep_dir):
        study = load_study(sweep_dir)
        fixed = None
        if continues is not None:
            study.tell(
                continues["trial"],
                state=require_optuna().trial.TrialState.FAIL,
                skip_if_finished=True,
            )
            sampled = distributions(parse_params(spec))
            fixed = {k: v for k, v in continues["params"].items() if k in sampled}
        trial = propose(study, spec, seed, fixed)
        if continues is not None:
            trial.set_user_attr("continues", continues["trial"])
    constants = {p.name: p.value for p in parse_params(spec) if p.kind == "constant"}
    params = {**trial.params, **constants}
    logger.info("trial %d: %s", trial.number, params)
    return {"trial": trial.number, "params": params}


def tell(sweep_dir: Path, number: int, state: str, value: float | None = None) -> None:
    """End trial `number`: ``state`` "complete" (with `value`), "pruned" or "fail". A trial that
    has already ended (a requeued task telling again) is left as it is."""
    states = require_optuna().trial.TrialState
    study = load_study(sweep_dir)
    if state == "complete":
        study.tell(number, value, skip_if_finished=True)
    else:
        study.tell(number, state=states[state.upper()], skip_if_finished=True)


def fail_running(sweep_dir: Path, numbers: list[int]) -> list[int]:
    """Mark `numbers` failed where they are still RUNNING (their tasks are gone); returns those."""
    optuna = require_optuna()
    study = load_study(sweep_dir)
    running = {
        t.number for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING"
    } & set(numbers)
    for n in sorted(running):
        study.tell(n, state=optuna.trial.TrialState.FAIL)
    return sorted(running)


def trial_states(sweep_dir: Path) -> dict[int, dict[str, Any]]:
    """{number: {"state", "value", "params", "user_attrs"}} of the study's trials ({} if none)."""
    if not (Path(sweep_dir) / JOURNAL).is_file():
        return {}
    study = load_study(sweep_dir)
    return {
        t.number: {
            "state": t.state.name.lower(),
            "value": t.value,
            "params": dict(t.params),
            "user_attrs": dict(t.user_attrs),
            "intermediate": dict(t.intermediate_values),
        }
        for t in study.get_trials(deepcopy=False)
    }


class TrialHook:
    """``multieye_dist.train.loop.run``'s ``on_dev_f1`` for one trial (called on rank 0 after each
    dev evaluation; the loop broadcasts the answer): reports (epoch, dev macro-F1) to the trial
    and returns whether the pruner stops it. Plain data: submitit pickles it with the task."""

    def __init__(self, sweep_dir: str, spec: dict, number: int) -> None:
        self.sweep_dir, self.spec, self.number = str(sweep_dir), dict(spec), number

    def __call__(self, epoch: int, f1: float) -> bool:
        st = storage(Path(self.sweep_dir))
        study = load_study(Path(self.sweep_dir), self.spec, store=st)
        # The storage's own API: an optuna.Trial object would run the sampler again.
        study_id = st.get_study_id_from_name(STUDY_NAME)
        trial_id = st.get_trial_id_from_study_id_trial_number(study_id, self.number)
        # the step is the epoch: what min_iter/max_iter count; a requeued run re-reporting an
        # epoch overwrites the same value
        st.set_trial_intermediate_value(trial_id, epoch, float(f1))
        prune = bool(study.pruner.prune(study, st.get_trial(trial_id)))
        if prune:
            logger.info("trial %d: pruned at epoch %d (dev macro-F1 %.4f)", self.number, epoch, f1)
        return prune
