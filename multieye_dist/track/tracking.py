"""Experiment tracking behind one small interface: a :class:`Tracker` on rank 0 fans each call
out to its backends. The local backend (``metrics.jsonl`` + ``summary.json``) is always on; the
``tracking.backend`` setting adds one more (today ``wandb``: Weights & Biases).

Why an interface: the trainer, the config and the launchers only know :class:`Tracker` and the
``tracking`` config section (:class:`TrackingConfig`, defined here and assembled into the run
config by :mod:`multieye_dist.config`); which service receives the numbers is this module's
business. This is the only module that imports ``wandb``, and it does so lazily (when a W&B run
starts), so importing it costs nothing, and ``tracking.backend=local`` or
``tracking.wandb.mode=disabled`` never loads wandb at all. The sweep launcher (``launch/sweep.py``)
reaches the W&B sweep controller through it too (:func:`create_wandb_sweep`,
:func:`next_wandb_sweep_run`).

What a :class:`Tracker` on rank 0 writes under ``run_dir`` (other ranks write nothing):

* ``run_id.txt`` (:data:`RUN_ID_FILE`): the run id, made once per run directory and written
  atomically; a later Tracker on the same directory (a resumed job) reuses it, so W&B sees one
  run. An explicit ``run_id=`` (say, from a checkpoint) wins and rewrites the file. A directory
  from before the rename, with only ``wandb_run_id.txt``, keeps its id.
* ``metrics.jsonl``: one line ``{"step": ..., "time": ..., **scalars}`` per :meth:`Tracker.log`
  call, flushed per line, whatever the backend. This is what tests, the sweep summary and users
  without W&B read back, with :func:`read_metrics`. A resumed job appends, so steps replayed
  after the last checkpoint appear twice; the later line is the one that counts.
* ``summary.json``: the merged :meth:`Tracker.summary` values, written atomically, with
  ``dev/best_f1`` (the best dev macro-F1 so far, see :meth:`Tracker.log_eval`). A part of the
  run that ends with an error (``finish(exit_code=N)``, N != 0) also records ``"exit_code": N``
  there; a later part that ends normally sets it back to 0.
* ``wandb/`` (W&B backend): W&B's own files (``dir=run_dir``); in offline mode
  ``wandb/offline-run-<time>-<id>/run-<id>.wandb``, uploaded later with ``wandb sync``. A run
  that ends with an error is marked failed there (its exit record holds the exit code). Besides
  the scalars it holds system metrics (``tracking.wandb.system_metrics``), ``dev/f1``'s maximum
  as its summary, per-class tables, confusion matrices and ROC/PR charts
  (:meth:`Tracker.log_outputs`), the code version in the config (``_code``), and with
  ``tracking.wandb.log_model`` the exports as model artifacts. W&B's own code and git capture
  stay off (:func:`wandb_settings`).

A new backend is a class with the four methods of :class:`Backend` (values arrive checked), a
choice in ``TrackingConfig.backend``, its settings as a nested section like :class:`WandbConfig`
if it has any, and one branch in :func:`_configured_backend`.

Secrets: the W&B API key is read by wandb itself from ``WANDB_API_KEY`` in online mode; this
module never reads, logs or writes it. The config logged to W&B is the caller's dict only (never
the environment), and keys that look like secrets are refused.

Failures: :func:`multieye_dist.train.loop.run` finishes the Tracker with exit code 1 when the run
raises (then re-raises), so a crashed run is marked failed in every backend, not left running.

W&B limitations (wandb 0.31): offline runs cannot really be resumed. A resumed offline job writes
a second ``offline-run-*`` directory with the same id, and ``wandb sync`` of both may keep only
one part of the history; ``metrics.jsonl`` has all of it. And wandb-core may still be writing an
offline run's file for a moment after ``finish`` returns (a reader waits for its exit record).
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Literal, Protocol

from multieye_dist.core.atomic import write_text
from multieye_dist.core.sections import SECRET_PARTS, Section
from multieye_dist.track.records import (
    EVAL_DIR,
    METRICS_FILE,
    SUMMARY_FILE,
    export_path,
    repair_torn_tail,
    resolve_run_id,
)

__all__ = [
    "BEST_DEV_F1",
    "CODE_KEY",
    "Backend",
    "LocalBackend",
    "Tracker",
    "TrackerError",
    "TrackingConfig",
    "WandbBackend",
    "WandbConfig",
    "code_version",
    "wandb_settings",
]

logger = logging.getLogger(__name__)

_RESERVED_KEYS = ("step", "time")  # the metrics.jsonl line's own fields
_EXIT_CODE_KEY = "exit_code"  # summary.json, for a part that ended with an error


class TrackerError(RuntimeError):
    """The run directory cannot be used; the message names the path."""


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class WandbConfig(Section):
    """W&B's own settings (``tracking.wandb.*``), read when ``tracking.backend`` is ``wandb``.
    The API key is never configuration: W&B reads ``WANDB_API_KEY`` from the environment."""

    _key: ClassVar[str] = "tracking.wandb"
    # offline: no account, files under run_dir/wandb, `wandb sync` later; disabled: local only.
    mode: Literal["offline", "online", "disabled"] = "offline"
    # CPU, GPU, memory, disk and network samples in the run's system charts (offline too).
    system_metrics: bool = True
    # Seconds between system metric samples (W&B's default; lower only for short test runs).
    stats_interval_s: float = 15.0
    # Upload best.safetensors and last.safetensors as model artifacts at the end of training.
    log_model: bool = False

    def _validate(self) -> None:
        self._check(self.stats_interval_s > 0, "stats_interval_s", "a positive number of seconds")


@dataclass(frozen=True)
class TrackingConfig(Section):
    """The ``tracking`` section: where rank 0's metrics go besides ``metrics.jsonl``.

    ``project``, ``entity``, ``tags`` and ``run_name`` mean what they mean in any experiment
    tracker (W&B: project, entity, tags, display name); each backend's own settings are a nested
    section named after it (``tracking.wandb.mode``).
    """

    _key: ClassVar[str] = "tracking"
    # Where the old ``wandb:`` section's keys went; the loader names them in its error.
    _moved: ClassVar[dict[str, str]] = {
        "wandb": "tracking",
        "wandb.mode": "tracking.wandb.mode",
        "wandb.project": "tracking.project",
        "wandb.entity": "tracking.entity",
        "wandb.tags": "tracking.tags",
        "wandb.run_name": "tracking.run_name",
    }
    backend: Literal["local", "wandb"] = "wandb"  # local: metrics.jsonl and summary.json only
    project: str = "multieye-dist"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)
    run_name: str | None = None
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def _validate(self) -> None:
        self._check(bool(self.project), "project", "a non-empty name")


# ----------------------------------------------------------------------------- values


def _plain_scalar(key: str, value: Any) -> int | float:
    """An int or float from a Python/numpy/0-d torch scalar; anything else is a caller bug."""
    if hasattr(value, "item") and not isinstance(value, int | float):
        value = value.item()  # numpy scalar, 0-d array or tensor: no numpy/torch import needed
    if isinstance(value, bool):
        return int(value)
    if not isinstance(value, int | float):
        raise TypeError(f"metric {key!r}: expected a number, got {type(value).__name__}")
    return value


def _check_step(step: Any) -> None:
    # W&B drops rows whose step goes backwards; a bad type here is a trainer bug, caught early.
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")


def _check_metrics(metrics: Mapping[str, Any]) -> dict[str, int | float]:
    out = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"metric names must be non-empty strings, got {key!r}")
        if key in _RESERVED_KEYS:
            raise ValueError(f"metric name {key!r} is reserved for the metrics.jsonl record")
        out[key] = _plain_scalar(key, value)
    return out


def _check_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """A JSON-plain copy of ``config`` (detached from the caller's objects); refuses keys that
    look like secrets, whatever their nesting."""
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping, got {type(config).__name__}")

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                dotted = f"{prefix}{key}"
                if any(part in str(key).lower().replace("-", "_") for part in SECRET_PARTS):
                    raise ValueError(
                        f"config key {dotted!r} looks like a secret; secrets come from the "
                        "environment and are never logged"
                    )
                walk(value, dotted + ".")
        elif isinstance(node, list | tuple):
            for i, value in enumerate(node):
                walk(value, f"{prefix}{i}.")

    walk(config, "")
    try:
        return json.loads(json.dumps(config, allow_nan=True))
    except TypeError as exc:
        raise TypeError(f"config must be JSON-serialisable (use config.to_dict): {exc}") from None


def _json_value(key: str, value: Any) -> Any:
    if hasattr(value, "item") and not isinstance(value, int | float | str):
        value = value.item()
    try:
        json.dumps(value)
    except TypeError:
        raise TypeError(
            f"summary {key!r}: not JSON-serialisable ({type(value).__name__})"
        ) from None
    return value


# ----------------------------------------------------------------------------- backends


class Backend(Protocol):
    """One destination of rank 0's log. Only :class:`Tracker` calls it, on rank 0, with values
    it has already checked: ``step`` a non-negative int, metrics plain ints and floats under
    non-empty names, summary values JSON-serialisable. ``finish`` is called once; ``exit_code``
    is None or 0 for a normal end, non-zero for a run that ended with an error."""

    name: str  # for the log line, e.g. "local", "wandb offline"

    def log(self, metrics: Mapping[str, int | float], step: int) -> None: ...

    def log_eval(
        self,
        result: Mapping[str, Any],
        scalars: Mapping[str, int | float],
        prefix: str,
        step: int,
    ) -> None:
        """``result`` is a :func:`multieye_dist.track.metrics.evaluate` result, ``scalars`` its flat
        scalars (``to_log_dict``), to log like :meth:`log`; a backend that can show tables or
        charts makes them from ``result``."""

    def log_predictions(
        self, prefix: str, labels: Any, probs: Any, class_names: Sequence[str], step: int
    ) -> None:
        """One evaluation's per-sample labels ``[N]`` (ints) and probabilities ``[N, C]``
        (numpy arrays), for charts under ``prefix`` (``test/best/``)."""

    def log_model(self, paths: Sequence[Path]) -> None:
        """The run's existing model exports (``best.safetensors``, ``last.safetensors``)."""

    def summary(self, values: Mapping[str, Any]) -> None: ...

    def finish(self, exit_code: int | None) -> None: ...


class LocalBackend:
    """``metrics.jsonl`` and ``summary.json`` in ``run_dir`` (module docstring): always on,
    needs nothing installed, and is what :func:`read_metrics` and the sweep summary read."""

    name = "local"

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        metrics = run_dir / METRICS_FILE
        repair_torn_tail(metrics)
        self._metrics_fh = metrics.open("a", encoding="utf-8")

    def log(self, metrics: Mapping[str, int | float], step: int) -> None:
        record = {"step": step, "time": time.time(), **metrics}
        self._metrics_fh.write(json.dumps(record, allow_nan=True) + "\n")
        self._metrics_fh.flush()  # per line: a crash loses at most the line being written

    def log_eval(
        self,
        result: Mapping[str, Any],
        scalars: Mapping[str, int | float],
        prefix: str,
        step: int,
    ) -> None:
        self.log(scalars, step)

    def log_predictions(
        self, prefix: str, labels: Any, probs: Any, class_names: Sequence[str], step: int
    ) -> None:
        pass  # they are in run_dir/eval already; plots.py draws them from there

    def log_model(self, paths: Sequence[Path]) -> None:
        pass  # the exports are in run_dir already

    def _read_summary(self) -> dict[str, Any]:
        path = self.run_dir / SUMMARY_FILE
        if not path.exists():
            return {}
        try:
            merged = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            # Only a hand edit can break an atomically written file; the summary is
            # re-derivable, a crash at the end of training is not worth it.
            logger.warning("%s: unreadable, starting a new summary", path)
            return {}
        return merged if isinstance(merged, dict) else {}

    def summary(self, values: Mapping[str, Any]) -> None:
        merged = {**self._read_summary(), **values}
        write_text(self.run_dir / SUMMARY_FILE, json.dumps(merged, indent=2, allow_nan=True) + "\n")

    def close(self) -> None:
        self._metrics_fh.close()

    def finish(self, exit_code: int | None) -> None:
        self.close()
        if exit_code:
            self.summary({_EXIT_CODE_KEY: exit_code})
        elif _EXIT_CODE_KEY in self._read_summary():  # an earlier part failed, this one did not
            self.summary({_EXIT_CODE_KEY: 0})


# ----------------------------------------------------------------------------- W&B backend


def wandb_settings(
    wandb: Any, *, system_metrics: bool = True, stats_interval_s: float = 15.0
) -> Any:
    """Settings for fast, quiet, secret-free W&B runs (the tracker's and the sweep agent's).
    Console capture is off (stdout goes to the job's own log; capturing it interferes with
    multi-process output); code, git, requirements and system metadata (which includes the
    command line) are not collected: the code version goes into the run config instead
    (:func:`code_version`), without the git remote, whose URL may hold a token.

    System metrics (CPU, GPU utilisation and memory, disk, network), sampled every
    ``stats_interval_s``, are on unless ``system_metrics`` is False: they are what one looks at
    when a distributed run is slow. wandb-core ties its system monitor to machine info, so
    ``x_disable_machine_info`` must be off for them (with it on, no ``stats`` record is written,
    measured with wandb 0.31); the metadata file stays off through ``x_disable_meta``.
    """
    return wandb.Settings(
        console="off",
        save_code=False,
        disable_code=True,
        disable_git=True,
        disable_job_creation=True,
        x_disable_meta=True,
        x_disable_machine_info=not system_metrics,
        x_disable_stats=not system_metrics,
        x_stats_sampling_interval=stats_interval_s,
        x_save_requirements=False,
        quiet=True,
    )


# The W&B sweep controller, for launch/sweep.py: wandb stays this module's import.


def create_wandb_sweep(spec: Mapping[str, Any], tracking: TrackingConfig) -> str:
    """Register a sweep (a validated W&B sweep dict) on the W&B server; returns its id.
    Needs the network and WANDB_API_KEY in the environment."""
    import wandb

    spec = {k: v for k, v in spec.items() if k != "tpe"}  # ours: the offline sampler's options
    return str(wandb.sweep(spec, project=tracking.project, entity=tracking.entity))


def next_wandb_sweep_run(sweep_id: str, tracking: TrackingConfig) -> tuple[str, dict[str, Any]]:
    """One agent step: the run id and parameters the sweep controller chose next. The run is
    then continued by the training's Tracker with that id (``resume="allow"`` online), which
    logs the training itself."""
    import wandb

    got: dict[str, Any] = {}

    def take() -> None:
        run = wandb.init(settings=wandb_settings(wandb))
        got.update(run_id=run.id, params=dict(run.config))
        run.finish()

    wandb.agent(sweep_id, function=take, count=1, project=tracking.project, entity=tracking.entity)
    if "run_id" not in got:
        raise RuntimeError(f"sweep {sweep_id}: the agent got no run (sweep finished?)")
    return got["run_id"], got["params"]


def code_version() -> dict[str, Any]:
    """The package version and, from a git checkout, the commit and whether the tree had
    uncommitted changes (None for both outside a checkout, e.g. an installed wheel)."""
    from multieye_dist import __version__

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(
                ["git", "-C", str(Path(__file__).parent), *args],
                capture_output=True,
                text=True,
                timeout=10,
            )
        except (OSError, subprocess.TimeoutExpired):  # no git, or a hung file system
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "version": __version__,
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
    }


# The run config key of code_version(); not a config section, so no clash with a real key.
CODE_KEY = "_code"
# Running maximum of dev/f1 that the tracker keeps in history and summary: W&B's own
# summary="max" is computed per process, so a resumed run would forget the earlier epochs.
BEST_DEV_F1 = "dev/best_f1"


def _per_class_table(wandb: Any, result: Mapping[str, Any]) -> Any:
    from multieye_dist.track.metrics import PER_CLASS_KEYS

    return wandb.Table(
        columns=["class", *PER_CLASS_KEYS],
        data=[
            [name, *(row[k] for k in PER_CLASS_KEYS)] for name, row in result["per_class"].items()
        ],
    )


def _eval_media(wandb: Any, result: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The W&B objects for an ``metrics.evaluate`` result: a per-class table, the confusion
    matrix as W&B's own chart (its long table is stored under ``{key}_table``) and the same
    counts as a readable C x C table (rows true class, columns predicted)."""
    names = [str(n) for n in result["class_names"]]
    per_class = _per_class_table(wandb, result)
    cm = [[int(v) for v in row] for row in result["confusion_matrix"]]
    long = wandb.Table(
        columns=["Actual", "Predicted", "nPredictions"],
        data=[[names[i], names[j], cm[i][j]] for i in range(len(names)) for j in range(len(names))],
    )
    # The spec and field names of wandb.plot.confusion_matrix, which only takes raw predictions.
    chart = wandb.plot_table(
        vega_spec_name="wandb/confusion_matrix/v1",
        data_table=long,
        fields={"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"},
        string_fields={"title": f"{prefix}confusion matrix"},
    )
    counts = wandb.Table(
        columns=["true \\ predicted", *names], data=[[names[i], *cm[i]] for i in range(len(names))]
    )
    return {
        f"{prefix}per_class": per_class,
        f"{prefix}confusion_matrix": chart,
        f"{prefix}confusion_counts": counts,
    }


_CURVE_POINTS = 201  # per class and curve: bounded tables, whatever the number of samples


def _curve_rows(labels: Any, probs: Any, names: Sequence[str]) -> tuple[list, list]:
    """(ROC rows [class, fpr, tpr], PR rows [class, recall, precision]), one-vs-rest per class,
    on a fixed grid of :data:`_CURVE_POINTS`: TPR interpolated along FPR, and PR's interpolated
    precision (the best precision at that recall or more). A class without positives or without
    negatives has no curve, as its AUC/AP are undefined in the metrics."""
    import numpy as np
    from sklearn.metrics import precision_recall_curve, roc_curve

    grid = np.linspace(0.0, 1.0, _CURVE_POINTS)
    roc, pr = [], []
    for k, name in enumerate(names):
        pos = labels == k
        if pos.all() or not pos.any():
            continue
        fpr, tpr, _ = roc_curve(pos, probs[:, k])
        tpr_at = np.interp(grid, fpr, tpr)
        roc += [[name, float(x), float(y)] for x, y in zip(grid, tpr_at, strict=True)]
        precision, recall, _ = precision_recall_curve(pos, probs[:, k])
        # recall falls along the arrays; the running max from the end is the interpolation
        best = np.maximum.accumulate(precision[::-1])[::-1]
        at = np.searchsorted(-recall, -grid, side="right") - 1  # last index with recall >= r
        pr += [[name, float(r), float(best[max(i, 0)])] for r, i in zip(grid, at, strict=True)]
    return roc, pr


def _curve_chart(
    wandb: Any, rows: list, axes: tuple[str, str], title: str, axis_titles: tuple[str, str]
) -> Any:
    """Per-class curves (rows of [class, x, y]) in W&B's area-under-curve chart spec."""
    return wandb.plot_table(
        vega_spec_name="wandb/area-under-curve/v0",
        data_table=wandb.Table(columns=["class", *axes], data=rows),
        fields={"x": axes[0], "y": axes[1], "class": "class"},
        string_fields={
            "title": title,
            "x-axis-title": axis_titles[0],
            "y-axis-title": axis_titles[1],
        },
    )


def _prediction_media(
    wandb: Any, labels: Any, probs: Any, names: Sequence[str], prefix: str
) -> dict[str, Any]:
    """W&B charts of one evaluation's per-sample predictions: per-class table,
    ``wandb.plot.confusion_matrix`` of the arg-max predictions, and ROC and PR curves in the
    chart spec of ``wandb.plot.roc_curve``/``pr_curve``. Those two need pandas, which is no
    dependency here; the same spec over our own table needs only scikit-learn."""
    from multieye_dist.track.metrics import evaluate

    result = evaluate(labels, probs, names)
    roc, pr = _curve_rows(labels, probs, names)
    title = prefix.rstrip("/")
    return {
        f"{prefix}per_class": _per_class_table(wandb, result),
        f"{prefix}confusion_matrix": wandb.plot.confusion_matrix(
            y_true=labels.tolist(),
            preds=probs.argmax(axis=1).tolist(),
            class_names=list(names),
            title=f"{title} confusion matrix",
        ),
        f"{prefix}roc": _curve_chart(
            wandb,
            roc,
            ("fpr", "tpr"),
            f"{title} ROC",
            ("False positive rate", "True positive rate"),
        ),
        f"{prefix}pr": _curve_chart(
            wandb, pr, ("recall", "precision"), f"{title} precision-recall", ("Recall", "Precision")
        ),
    }


class WandbBackend:
    """A W&B run in ``run_dir/wandb`` with the tracker's run id, in ``tracking.wandb.mode``
    (offline or online). Logs the same scalars as the local backend, plus per-class and
    confusion-matrix tables for evaluations, confusion matrix, ROC and PR charts of per-sample
    predictions, and (``tracking.wandb.log_model``) the exports as model artifacts; the run
    config is ``config`` plus :func:`code_version` under ``_code``. The summary's ``dev/f1``
    is its maximum over the run (``define_metric(summary="max")``)."""

    def __init__(
        self,
        cfg: TrackingConfig,
        run_dir: Path,
        *,
        run_id: str,
        config: dict[str, Any],
        job_type: str | None,
    ) -> None:
        import wandb  # lazily: see the module docstring

        self.mode = cfg.wandb.mode
        self.name = f"wandb {self.mode}"
        self.run_id = run_id
        self.upload_models = cfg.wandb.log_model
        started = time.perf_counter()
        self._run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.run_name,
            tags=list(cfg.tags) or None,
            job_type=job_type,
            config={**config, CODE_KEY: code_version()},
            dir=str(run_dir),
            id=run_id,
            # Offline runs cannot be resumed by wandb (see the module docstring); there the
            # persisted id alone ties the parts together.
            resume="allow" if self.mode == "online" else None,
            mode=self.mode,
            # Independent runs, never the wandb.run global: a second Tracker in the process
            # must not finish this one behind its back.
            reinit="create_new",
            settings=wandb_settings(
                wandb,
                system_metrics=cfg.wandb.system_metrics,
                stats_interval_s=cfg.wandb.stats_interval_s,
            ),
        )
        # Every key is logged at the optimiser step (log(step=)), so W&B's own step is the x
        # axis throughout; the summary keeps the best dev macro-F1, not the last epoch's.
        # (dev/best_f1 keeps the default, last: it is a running max, and a plain number in the
        # summary is what a sweep's metric name can name; "max" would nest it as {"max": x}.)
        self._run.define_metric("dev/f1", summary="max")
        logger.info(
            "wandb %s run %s started in %.2fs (%s)",
            self.mode,
            run_id,
            time.perf_counter() - started,
            # run.url warns in offline mode; there the files are the place to look.
            self._run.url if self.mode == "online" else run_dir / "wandb",
        )

    def log(self, metrics: Mapping[str, int | float], step: int) -> None:
        self._run.log(dict(metrics), step=step)

    def log_eval(
        self,
        result: Mapping[str, Any],
        scalars: Mapping[str, int | float],
        prefix: str,
        step: int,
    ) -> None:
        import wandb

        self._run.log({**scalars, **_eval_media(wandb, result, prefix)}, step=step)

    def log_predictions(
        self, prefix: str, labels: Any, probs: Any, class_names: Sequence[str], step: int
    ) -> None:
        import wandb

        self._run.log(_prediction_media(wandb, labels, probs, class_names, prefix), step=step)

    def log_model(self, paths: Sequence[Path]) -> None:
        """Each export as a version of the model artifact ``model-<run id>``, aliased by its
        name (``best``, ``last``); off unless ``tracking.wandb.log_model``."""
        if not self.upload_models:
            return
        import wandb

        for path in paths:
            artifact = wandb.Artifact(f"model-{self.run_id}", type="model")
            artifact.add_file(str(path), name=path.name)
            self._run.log_artifact(artifact, aliases=[path.stem])
            logger.info("wandb: %s logged as model artifact model-%s", path, self.run_id)

    def summary(self, values: Mapping[str, Any]) -> None:
        self._run.summary.update(dict(values))

    def finish(self, exit_code: int | None) -> None:
        started = time.perf_counter()
        self._run.finish(exit_code=exit_code)  # non-zero: W&B marks the run failed
        logger.info("wandb run %s finished in %.2fs", self.run_id, time.perf_counter() - started)


def _configured_backend(
    cfg: TrackingConfig,
    run_dir: Path,
    run_id: str,
    config: dict[str, Any],
    job_type: str | None,
) -> Backend | None:
    """The backend ``cfg.backend`` names besides the local one, started; None for local only."""
    if cfg.backend == "wandb" and cfg.wandb.mode != "disabled":
        return WandbBackend(cfg, run_dir, run_id=run_id, config=config, job_type=job_type)
    return None


# ----------------------------------------------------------------------------- tracker


class Tracker:
    """Rank 0's experiment log; on every other rank each method is a no-op that touches no file
    and never imports or starts wandb (timm may still import wandb on its own, see the tests).

    ``cfg`` is the ``tracking`` config section; ``config`` is the resolved run config
    (``config.to_dict(cfg)``) that a backend records with the run; ``run_id`` forces the id (it
    wins over the one persisted in ``run_dir``); ``backends`` are further started backends to
    fan out to, after the local one and the configured one.

    ``run_id`` is the run's id on rank 0; on other ranks it is the explicit ``run_id`` or None.
    Use as a context manager (an exception finishes with exit code 1), or call :meth:`finish`.
    """

    def __init__(
        self,
        cfg: TrackingConfig,
        run_dir: str | os.PathLike[str],
        *,
        rank: int,
        config: Mapping[str, Any] | None = None,
        job_type: str | None = None,
        run_id: str | None = None,
        backends: Sequence[Backend] = (),
    ) -> None:
        self.cfg = cfg
        self.rank = rank
        self.run_dir = Path(run_dir)
        self.run_id: str | None = run_id
        self.backends: list[Backend] = []
        self._finished = False
        self._best_dev_f1: float | None = None
        if rank != 0:
            return
        if not str(run_dir):
            raise TrackerError("run_dir is empty")
        config = _check_config(config)  # before any file is written
        local = self._prepare_run_dir(run_id)
        self.backends.append(local)
        best = local._read_summary().get(BEST_DEV_F1)  # an earlier part of this run (resume)
        if isinstance(best, int | float) and math.isfinite(best):
            self._best_dev_f1 = float(best)
        try:
            remote = _configured_backend(cfg, self.run_dir, self.run_id, config, job_type)
        except BaseException:
            local.close()  # the caller never gets an object to finish()
            raise
        if remote is not None:
            self.backends.append(remote)
        self.backends.extend(backends)
        logger.info(
            "tracking run %s in %s (%s)",
            self.run_id,
            self.run_dir,
            ", ".join(b.name for b in self.backends),
        )

    @property
    def active(self) -> bool:
        """True on rank 0 until :meth:`finish`."""
        return self.rank == 0 and not self._finished

    def _prepare_run_dir(self, run_id: str | None) -> LocalBackend:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.run_id = resolve_run_id(self.run_dir, run_id)
            return LocalBackend(self.run_dir)
        except OSError as exc:
            raise TrackerError(
                f"run_dir {self.run_dir}: cannot create or write it ({exc.strerror or exc})"
            ) from exc

    def _check_open(self) -> None:
        if self._finished:
            raise RuntimeError(f"Tracker for {self.run_dir} is finished")

    def log(self, metrics: Mapping[str, Any], *, step: int) -> None:
        """Log scalars at ``step`` (the global optimiser step): one metrics.jsonl line, and the
        same values in the other backend's history."""
        if self.rank != 0:
            return
        self._check_open()
        _check_step(step)
        values = _check_metrics(metrics)
        for backend in self.backends:
            backend.log(values, step)

    def log_eval(self, result: Mapping[str, Any], *, prefix: str = "dev/", step: int) -> None:
        """Log a :func:`multieye_dist.track.metrics.evaluate` result: its scalars (macro and per
        class, via ``to_log_dict``) like :meth:`log`, and in W&B also ``{prefix}per_class``,
        ``{prefix}confusion_matrix`` (chart) and ``{prefix}confusion_counts`` tables.

        A dev result (``prefix="dev/"``) also logs ``dev/best_f1`` (:data:`BEST_DEV_F1`), the
        best ``dev/f1`` of the run so far (earlier parts included, from ``summary.json``), and
        sets it in the summary: what sweeps rank runs by, in every backend."""
        if self.rank != 0:
            return
        self._check_open()
        _check_step(step)
        from multieye_dist.track.metrics import to_log_dict

        scalars = _check_metrics(to_log_dict(dict(result), prefix=prefix))
        f1 = scalars.get("dev/f1") if prefix == "dev/" else None
        if f1 is not None and math.isfinite(f1):
            self._best_dev_f1 = max(f1, self._best_dev_f1 if self._best_dev_f1 is not None else f1)
            scalars[BEST_DEV_F1] = self._best_dev_f1
        for backend in self.backends:
            backend.log_eval(result, scalars, prefix, step)
        if BEST_DEV_F1 in scalars:
            self.summary({BEST_DEV_F1: scalars[BEST_DEV_F1]})

    def log_outputs(self, *, step: int) -> None:
        """At the end of training, what the trainer left in ``run_dir``: the per-sample records
        ``eval/<name>.records.json`` (:mod:`multieye_dist.track.plots`) as prediction charts under
        ``<name>`` with ``_`` as ``/`` (``test_best`` -> ``test/best/confusion_matrix``, ``roc``,
        ``pr``, ``per_class``), and the exports ``best.safetensors``/``last.safetensors`` that
        exist, as model artifacts where asked (``tracking.wandb.log_model``). A records file
        that cannot be read is a ValueError naming it."""
        if self.rank != 0:
            return
        self._check_open()
        _check_step(step)
        from multieye_dist.track.records import RECORDS_SUFFIX, read_records

        for path in sorted((self.run_dir / EVAL_DIR).glob(f"*{RECORDS_SUFFIX}")):
            rec = read_records(path)
            prefix = path.name.removesuffix(RECORDS_SUFFIX).replace("_", "/") + "/"
            for backend in self.backends:
                backend.log_predictions(prefix, rec.labels, rec.probs, rec.class_names, step)
        exports = [export_path(self.run_dir, name) for name in ("best", "last")]
        exports = [path for path in exports if path.is_file()]
        for backend in self.backends:
            backend.log_model(exports)

    def summary(self, values: Mapping[str, Any]) -> None:
        """Set run summary values (merged with earlier ones, also across resumes):
        ``run_dir/summary.json`` and the other backend's run summary."""
        if self.rank != 0:
            return
        self._check_open()
        values = {str(k): _json_value(str(k), v) for k, v in values.items()}
        for backend in self.backends:
            backend.summary(values)

    def finish(self, exit_code: int | None = None) -> None:
        """Finish every backend (idempotent): close the metrics log, end the W&B run.
        ``exit_code`` != 0 marks the run failed (W&B's run state, ``summary.json``'s
        ``exit_code``). A backend that fails to finish does not stop the others; the first
        error is raised after all have been tried."""
        if self.rank != 0 or self._finished:
            return
        self._finished = True
        error: Exception | None = None
        for backend in self.backends:
            try:
                backend.finish(exit_code)
            except Exception as exc:
                logger.warning("tracking backend %s failed to finish: %s", backend.name, exc)
                error = error or exc
        if error is not None:
            raise error

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.finish(exit_code=1 if exc_type is not None else None)
