"""Experiment tracking: a local JSON-lines log that always works, plus W&B when configured.

This is the only module that imports ``wandb``, and it does so lazily (when a run starts), so
importing it costs nothing and ``mode: disabled`` never loads wandb at all.

What a :class:`Tracker` on rank 0 writes under ``run_dir`` (other ranks write nothing):

* ``wandb_run_id.txt``: the run id, made once per run directory and written atomically; a later
  Tracker on the same directory (a resumed job) reuses it, so W&B sees one run. An explicit
  ``run_id=`` (say, from a checkpoint) wins and rewrites the file.
* ``metrics.jsonl``: one line ``{"step": ..., "time": ..., **scalars}`` per :meth:`Tracker.log`
  call, flushed per line, in every W&B mode (``disabled`` included). This is what tests, the sweep
  summary and users without W&B read back, with :func:`read_metrics`. A resumed job appends, so
  steps replayed after the last checkpoint appear twice; the later line is the one that counts.
* ``summary.json``: the merged :meth:`Tracker.summary` values, written atomically.
* ``wandb/``: W&B's own files (``dir=run_dir``); in offline mode
  ``wandb/offline-run-<time>-<id>/run-<id>.wandb``, uploaded later with ``wandb sync``.

Secrets: the W&B API key is read by wandb itself from ``WANDB_API_KEY`` in online mode; this
module never reads, logs or writes it. The config logged to W&B is the caller's dict only (never
the environment), and keys that look like secrets are refused.

W&B limitation (wandb 0.31): offline runs cannot really be resumed. A resumed offline job writes a
second ``offline-run-*`` directory with the same id, and ``wandb sync`` of both may keep only one
part of the history; ``metrics.jsonl`` has all of it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import string
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from multieye_dist.atomic import write_text

if TYPE_CHECKING:
    from multieye_dist.config import WandbConfig

__all__ = [
    "METRICS_FILE",
    "RUN_ID_FILE",
    "SUMMARY_FILE",
    "Tracker",
    "TrackerError",
    "read_metrics",
]

logger = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id.txt"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"

# W&B run ids end up in URLs and directory names; keep them to a safe alphabet.
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_RUN_ID_ALPHABET = string.ascii_lowercase + string.digits
# Same spirit as multieye_dist.config: a key that names a secret never reaches W&B.
_SECRET_PARTS = ("api_key", "apikey", "token", "password", "secret")
_RESERVED_KEYS = ("step", "time")  # the metrics.jsonl line's own fields


class TrackerError(RuntimeError):
    """The run directory cannot be used; the message names the path."""


# ----------------------------------------------------------------------------- files


def _new_run_id() -> str:
    # 8 characters of [a-z0-9], like wandb's own ids, without importing wandb.
    return "".join(secrets.choice(_RUN_ID_ALPHABET) for _ in range(8))


def _check_run_id(run_id: str, where: str) -> str:
    if not isinstance(run_id, str) or not _RUN_ID_RE.match(run_id):
        raise ValueError(f"{where}: run id must match {_RUN_ID_RE.pattern}, got {run_id!r}")
    return run_id


def _resolve_run_id(run_dir: Path, explicit: str | None) -> str:
    """The persisted id, or ``explicit`` (which wins and is persisted), or a new one."""
    path = run_dir / RUN_ID_FILE
    persisted = None
    if path.exists():
        persisted = _check_run_id(path.read_text(encoding="utf-8").strip(), str(path))
    if explicit is not None:
        _check_run_id(explicit, "run_id")
        if persisted is not None and persisted != explicit:
            logger.warning(
                "run_id %r replaces the id %r persisted in %s", explicit, persisted, path
            )
    run_id = explicit or persisted or _new_run_id()
    if run_id != persisted:
        write_text(path, run_id + "\n")
    return run_id


def _tail_start(fh: Any, size: int) -> int:
    """Offset just past the last newline of a binary file open for reading (0 if none)."""
    pos, chunk = size, 1 << 16
    while pos > 0:
        start = max(0, pos - chunk)
        fh.seek(start)
        cut = fh.read(pos - start).rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        pos = start
    return 0


def _repair_torn_tail(path: Path) -> None:
    """Before appending: a job killed mid-write leaves a last line without its newline. Appending
    to it would glue the next record onto the fragment and lose both, so a fragment that is not
    a complete record is cut off; a complete one only gets its newline."""
    if not path.exists():
        return
    with path.open("rb+") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return
        start = _tail_start(fh, size)
        fh.seek(start)
        tail = fh.read()
        if _parse_record(tail) is not None:
            fh.seek(size)
            fh.write(b"\n")
            return
        logger.warning("%s: dropping a torn last line (%d bytes) before appending", path, len(tail))
        fh.truncate(start)


def _parse_record(line: bytes | str) -> dict[str, Any] | None:
    """A metrics.jsonl record (a JSON object with an int ``step``), or None."""
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        return None
    return record


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record of ``run_dir/metrics.jsonl`` (or of that file, if given directly), in order.

    A torn last line (the writer died mid-line) is skipped with a warning; a bad line anywhere
    else is real corruption and raises ValueError naming ``path:line``. Non-finite values come
    back as ``float('nan')``/``inf`` (Python's JSON extension, as written).
    """
    path = Path(run_dir)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no metrics log at {path}")
    lines = path.read_bytes().split(b"\n")
    if lines and not lines[-1].strip():
        lines.pop()  # the empty string after the final newline
    records, skipped = [], 0
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = _parse_record(line)
        if record is not None:
            records.append(record)
        elif lineno == len(lines):
            skipped += 1
        else:
            raise ValueError(f"{path}:{lineno}: not a metrics record: {line[:80]!r}")
    if skipped:
        logger.warning("%s: skipped %d torn last line (a crash mid-write)", path, skipped)
    return records


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
                if any(part in str(key).lower().replace("-", "_") for part in _SECRET_PARTS):
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


# ----------------------------------------------------------------------------- wandb


def _wandb_settings(wandb: Any) -> Any:
    """Settings for fast, quiet, secret-free runs. Console capture is off (stdout goes to the
    job's own log; capturing it interferes with multi-process output); code, git, requirements
    and system metadata (which includes the command line) are not collected. System metrics
    (GPU utilisation and memory) stay on: they cost nothing at startup (measured) and are what
    one looks at when a distributed run is slow."""
    return wandb.Settings(
        console="off",
        save_code=False,
        disable_code=True,
        disable_git=True,
        disable_job_creation=True,
        x_disable_meta=True,
        x_disable_machine_info=True,
        x_save_requirements=False,
        quiet=True,
    )


def _eval_media(wandb: Any, result: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The W&B objects for an ``metrics.evaluate`` result: a per-class table, the confusion
    matrix as W&B's own chart (its long table is stored under ``{key}_table``) and the same
    counts as a readable C x C table (rows true class, columns predicted)."""
    from multieye_dist.metrics import PER_CLASS_KEYS

    names = [str(n) for n in result["class_names"]]
    per_class = wandb.Table(
        columns=["class", *PER_CLASS_KEYS],
        data=[
            [name, *(row[k] for k in PER_CLASS_KEYS)] for name, row in result["per_class"].items()
        ],
    )
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


# ----------------------------------------------------------------------------- tracker


class Tracker:
    """Rank 0's experiment log; on every other rank each method is a no-op that touches no file
    and never imports or starts wandb (timm may still import wandb on its own, see the tests).

    ``cfg`` is the ``wandb`` config section (project, mode, entity, tags, run_name); ``config``
    is the resolved run config (``config.to_dict(cfg)``) that W&B records with the run;
    ``run_id`` forces the id (it wins over the one persisted in ``run_dir``).

    ``run_id`` is the run's id on rank 0; on other ranks it is the explicit ``run_id`` or None.
    Use as a context manager, or call :meth:`finish`.
    """

    def __init__(
        self,
        cfg: WandbConfig,
        run_dir: str | os.PathLike[str],
        *,
        rank: int,
        config: Mapping[str, Any] | None = None,
        job_type: str | None = None,
        run_id: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.rank = rank
        self.run_dir = Path(run_dir)
        self.run_id: str | None = run_id
        self._run: Any = None  # the wandb Run, when W&B is on
        self._metrics_fh: Any = None
        self._finished = False
        if rank != 0:
            return
        if not str(run_dir):
            raise TrackerError("run_dir is empty")
        config = _check_config(config)  # before any file is written
        self._prepare_run_dir(run_id)
        if cfg.mode != "disabled":
            try:
                self._start_wandb(config, job_type)
            except BaseException:
                self._metrics_fh.close()  # the caller never gets an object to finish()
                raise
        logger.info("tracking run %s in %s (wandb mode %s)", self.run_id, self.run_dir, cfg.mode)

    @property
    def active(self) -> bool:
        """True on rank 0 until :meth:`finish`."""
        return self.rank == 0 and not self._finished

    def _prepare_run_dir(self, run_id: str | None) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.run_id = _resolve_run_id(self.run_dir, run_id)
            metrics = self.run_dir / METRICS_FILE
            _repair_torn_tail(metrics)
            self._metrics_fh = metrics.open("a", encoding="utf-8")
        except OSError as exc:
            raise TrackerError(
                f"run_dir {self.run_dir}: cannot create or write it ({exc.strerror or exc})"
            ) from exc

    def _start_wandb(self, config: dict[str, Any], job_type: str | None) -> None:
        import wandb  # lazily: see the module docstring

        started = time.perf_counter()
        self._run = wandb.init(
            project=self.cfg.project,
            entity=self.cfg.entity,
            name=self.cfg.run_name,
            tags=list(self.cfg.tags) or None,
            job_type=job_type,
            config=config,
            dir=str(self.run_dir),
            id=self.run_id,
            # Offline runs cannot be resumed by wandb (see the module docstring); there the
            # persisted id alone ties the parts together.
            resume="allow" if self.cfg.mode == "online" else None,
            mode=self.cfg.mode,
            # Independent runs, never the wandb.run global: a second Tracker in the process
            # must not finish this one behind its back.
            reinit="create_new",
            settings=_wandb_settings(wandb),
        )
        logger.info(
            "wandb %s run %s started in %.2fs (%s)",
            self.cfg.mode,
            self.run_id,
            time.perf_counter() - started,
            # run.url warns in offline mode; there the files are the place to look.
            self._run.url if self.cfg.mode == "online" else self.run_dir / "wandb",
        )

    def _check_open(self) -> None:
        if self._finished:
            raise RuntimeError(f"Tracker for {self.run_dir} is finished")

    def _write_line(self, step: int, metrics: Mapping[str, int | float]) -> None:
        record = {"step": step, "time": time.time(), **metrics}
        self._metrics_fh.write(json.dumps(record, allow_nan=True) + "\n")
        self._metrics_fh.flush()  # per line: a crash loses at most the line being written

    def log(self, metrics: Mapping[str, Any], *, step: int) -> None:
        """Log scalars at ``step`` (the global optimiser step): one metrics.jsonl line, and the
        same values in W&B's history."""
        if self.rank != 0:
            return
        self._check_open()
        _check_step(step)
        values = _check_metrics(metrics)
        self._write_line(step, values)
        if self._run is not None:
            self._run.log(values, step=step)

    def log_eval(self, result: Mapping[str, Any], *, prefix: str = "dev/", step: int) -> None:
        """Log a :func:`multieye_dist.metrics.evaluate` result: its scalars (macro and per
        class, via ``to_log_dict``) like :meth:`log`, and in W&B also ``{prefix}per_class``,
        ``{prefix}confusion_matrix`` (chart) and ``{prefix}confusion_counts`` tables."""
        if self.rank != 0:
            return
        self._check_open()
        _check_step(step)
        from multieye_dist.metrics import to_log_dict

        scalars = to_log_dict(dict(result), prefix=prefix)
        self._write_line(step, _check_metrics(scalars))
        if self._run is not None:
            import wandb

            self._run.log({**scalars, **_eval_media(wandb, result, prefix)}, step=step)

    def summary(self, values: Mapping[str, Any]) -> None:
        """Set run summary values (merged with earlier ones, also across resumes): W&B's run
        summary and ``run_dir/summary.json``."""
        if self.rank != 0:
            return
        self._check_open()
        values = {str(k): _json_value(str(k), v) for k, v in values.items()}
        path = self.run_dir / SUMMARY_FILE
        merged: dict[str, Any] = {}
        if path.exists():
            try:
                merged = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                # Only a hand edit can break an atomically written file; the summary is
                # re-derivable, a crash at the end of training is not worth it.
                logger.warning("%s: unreadable, starting a new summary", path)
            if not isinstance(merged, dict):
                merged = {}
        merged.update(values)
        write_text(path, json.dumps(merged, indent=2, allow_nan=True) + "\n")
        if self._run is not None:
            self._run.summary.update(values)

    def finish(self, exit_code: int | None = None) -> None:
        """Close the metrics log and the W&B run (idempotent). ``exit_code`` != 0 marks the
        W&B run failed."""
        if self.rank != 0 or self._finished:
            return
        self._finished = True
        if self._metrics_fh is not None:
            self._metrics_fh.close()
        if self._run is not None:
            started = time.perf_counter()
            self._run.finish(exit_code=exit_code)
            logger.info(
                "wandb run %s finished in %.2fs", self.run_id, time.perf_counter() - started
            )

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.finish(exit_code=1 if exc_type is not None else None)


# ----------------------------------------------------------------------------- online sweeps


def create_sweep(spec: Mapping[str, Any], cfg: WandbConfig) -> str:
    """Register a sweep (a validated W&B sweep dict) on the W&B server; returns its id.
    Needs the network and WANDB_API_KEY in the environment."""
    import wandb

    return str(wandb.sweep(dict(spec), project=cfg.project, entity=cfg.entity))


def next_sweep_run(sweep_id: str, cfg: WandbConfig) -> tuple[str, dict[str, Any]]:
    """One agent step: the run id and parameters the sweep controller chose next. The run is
    then continued by a :class:`Tracker` with that id (``resume="allow"``), which logs the
    training itself."""
    import wandb

    got: dict[str, Any] = {}

    def take() -> None:
        run = wandb.init(settings=_wandb_settings(wandb))
        got.update(run_id=run.id, params=dict(run.config))
        run.finish()

    wandb.agent(sweep_id, function=take, count=1, project=cfg.project, entity=cfg.entity)
    if "run_id" not in got:
        raise TrackerError(f"sweep {sweep_id}: the agent got no run (sweep finished?)")
    return got["run_id"], got["params"]
