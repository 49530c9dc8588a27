"""W&B sweep files: validation and deterministic offline expansion.

A sweep file is a standard W&B sweep configuration (``method``: grid, random or bayes;
``metric``: name and goal; ``parameters``). Parameter names are our dotted config keys
(``optim.lr``), so a run is the base config plus one override per parameter.

Offline (no account, or no network on the compute nodes), grid and random sweeps are expanded
here, deterministically: grid in the order of the file, random from ``seed``; bayes runs an
optuna study in the sweep directory instead (:mod:`multieye_dist.cluster.search`, the module that
owns optuna; :mod:`multieye_dist.cluster.summaries` tabulates a sweep's results). Only YAML
(``yaml.safe_load``) is read; no pickle.

A run is *finished* when its ``summary.json`` says so: the trainer's final summary
(``best_dev_f1``, written by ``finish``) or a pruned run's (``pruned: true``). What is not
finished is what ``launch/sweep.py --resubmit-failed`` submits again (:func:`unfinished`).
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from multieye_dist.config import ConfigError, load_config

METHODS = ("grid", "random", "bayes")
GOALS = ("maximize", "minimize")
# Distributions expanded offline (W&B's names); others need the W&B server.
OFFLINE_DISTRIBUTIONS = ("uniform", "log_uniform_values", "int_uniform", "q_uniform", "normal")


class SweepError(ValueError):
    """The sweep file is not a valid W&B sweep (the message names the file and key)."""


def load_sweep(path: Path) -> dict[str, Any]:
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SweepError(f"{path}: cannot read the sweep file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise SweepError(f"{path}: invalid YAML: {exc}") from None
    validate(spec, str(path))
    return spec


def validate(spec: Any, where: str) -> None:
    if not isinstance(spec, dict):
        raise SweepError(f"{where}: a sweep file is a mapping (method, metric, parameters)")
    method = spec.get("method")
    if method not in METHODS:
        raise SweepError(f"{where}: method={method!r}: choose one of {', '.join(METHODS)}")
    metric = spec.get("metric")
    if not isinstance(metric, dict) or not isinstance(metric.get("name"), str):
        raise SweepError(f"{where}: metric must be a mapping with a name (e.g. dev/f1)")
    if metric.get("goal", "maximize") not in GOALS:
        raise SweepError(f"{where}: metric.goal={metric.get('goal')!r}: maximize or minimize")
    params = spec.get("parameters")
    if not isinstance(params, dict) or not params:
        raise SweepError(f"{where}: parameters must be a non-empty mapping")
    for name, p in params.items():
        key = f"{where}: parameters.{name}"
        if not isinstance(p, dict):
            raise SweepError(f"{key}: expected a mapping (values, value, distribution, ...)")
        if "values" in p and (not isinstance(p["values"], list) or not p["values"]):
            raise SweepError(f"{key}.values: expected a non-empty list")
        if not ({"values", "value", "min", "max", "distribution"} & set(p)):
            raise SweepError(f"{key}: give values, value, or a distribution with min/max")
        if method == "grid" and not ({"values", "value"} & set(p)):
            raise SweepError(f"{key}: a grid sweep needs values or value for every parameter")


def distribution_of(p: dict) -> str:
    """A parameter's W&B distribution, as W&B infers it when none is named."""
    if "distribution" in p:
        return str(p["distribution"])
    if "values" in p:
        return "categorical"
    if "value" in p:
        return "constant"
    both_int = isinstance(p.get("min"), int) and isinstance(p.get("max"), int)
    return "int_uniform" if both_int else "uniform"  # W&B's inference from min/max


def _sample(name: str, p: dict, rng: np.random.Generator) -> Any:
    kind = distribution_of(p)
    if kind == "categorical":
        return p["values"][int(rng.integers(len(p["values"])))]
    if kind == "constant":
        return p["value"]
    if kind not in OFFLINE_DISTRIBUTIONS:
        raise SweepError(
            f"parameters.{name}: distribution {kind!r} needs the W&B server "
            f"(offline: {', '.join(OFFLINE_DISTRIBUTIONS)}, values, value)"
        )
    if kind == "normal":
        return float(rng.normal(p.get("mu", 0.0), p.get("sigma", 1.0)))
    lo, hi = p.get("min"), p.get("max")
    if lo is None or hi is None or not lo < hi:
        raise SweepError(f"parameters.{name}: {kind} needs min < max, got {lo!r}, {hi!r}")
    if kind == "int_uniform":
        return int(rng.integers(int(lo), int(hi) + 1))
    if kind == "log_uniform_values":
        if lo <= 0:
            raise SweepError(f"parameters.{name}: log_uniform_values needs min > 0")
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    x = float(rng.uniform(lo, hi))
    if kind == "q_uniform":
        q = p.get("q", 1.0)
        x = round(x / q) * q
    return x


def expand(spec: dict, count: int | None, seed: int = 0) -> list[dict[str, Any]]:
    """The runs of an offline sweep: one {dotted key: value} per run."""
    params = spec["parameters"]
    if spec["method"] == "bayes":
        raise SweepError("method bayes is not expanded in advance: its trials come from a study")
    if spec["method"] == "grid":
        names = list(params)
        choices = [
            params[n]["values"] if "values" in params[n] else [params[n]["value"]] for n in names
        ]
        runs = [dict(zip(names, combo, strict=True)) for combo in itertools.product(*choices)]
        return runs[:count] if count else runs
    if not count:
        raise SweepError("a random sweep needs --count (how many runs to draw)")
    rng = np.random.default_rng(seed)
    return [{n: _sample(n, p, rng) for n, p in params.items()} for _ in range(count)]


def overrides_for(run: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, str | list) else v}" for k, v in run.items()]


def check_runs(config: Path | None, base: list[str], runs: list[dict]) -> None:
    """Every run's config resolves (names, types, ranges), before anything is submitted."""
    for i, run in enumerate(runs):
        try:
            load_config(config, [*base, *overrides_for(run)])
        except ConfigError as exc:
            raise SweepError(f"run {i} ({run}): {exc}") from None


def run_finished(out_dir: str | Path) -> bool:
    """The run's summary is a final one: ``finish`` wrote it (``best_dev_f1``), or the sweep's
    pruner stopped the run (``pruned``): a pruned run is finished, not failed."""
    path = Path(out_dir) / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and ("best_dev_f1" in summary or bool(summary.get("pruned")))


def bayes_records(sweep_dir: Path) -> list[dict]:
    """A bayes sweep's runs: the latest hand-off record per run directory (a run continued by a
    resubmission has one per attempt), in trial order."""
    latest: dict[str, dict] = {}
    for f in sorted((Path(sweep_dir) / "trials").glob("*.json")):
        rec = json.loads(f.read_text(encoding="utf-8"))
        if rec["out_dir"] not in latest or rec["trial"] > latest[rec["out_dir"]]["trial"]:
            latest[rec["out_dir"]] = rec
    return sorted(latest.values(), key=lambda r: r["trial"])


def unfinished(manifest: dict, sweep_dir: Path) -> tuple[list[dict], int]:
    """(the runs to submit again, how many new bayes trials to ask for): the runs without a
    finished summary, and for bayes also the tasks that never got a trial (``count`` minus the
    runs that did)."""
    if manifest["method"] != "bayes":
        return [r for r in manifest["runs"] if not run_finished(r["out_dir"])], 0
    records = bayes_records(sweep_dir)
    return [r for r in records if not run_finished(r["out_dir"])], manifest["count"] - len(records)
