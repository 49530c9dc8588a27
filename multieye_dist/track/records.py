"""The run directory's records: the names and formats of the files a run leaves beside its
checkpoints, written and read back here and nowhere else.

* ``run_id.txt`` (:data:`RUN_ID_FILE`): the run id, made once per run directory and written
  atomically (:func:`write_run_id`); a directory from before the rename, with only
  ``wandb_run_id.txt``, keeps its id.
* ``metrics.jsonl`` (:data:`METRICS_FILE`): one JSON line per logged step, read back with
  :func:`read_metrics`; :func:`repair_torn_tail` mends a line a killed writer left half done.
* ``summary.json`` (:data:`SUMMARY_FILE`): the run's merged summary values.
* ``config.yaml``, ``checkpoints/<tag>/`` (with ``trainer_state.json``), ``best.safetensors``
  and ``last.safetensors`` (:func:`export_path`), ``eval/``, ``plots/``, ``train.lock``: the
  names the trainer, the pictures and the tools agree on.
* ``eval/<name>.records.json`` (:data:`RECORDS_SUFFIX`): one evaluation's per-sample labels and
  probabilities (:func:`write_records`, :func:`read_records`), what the pictures are drawn from.

The writers (:class:`multieye_dist.track.tracking.Tracker`, the evaluation) and the readers
(:mod:`multieye_dist.track.plots`, sweep summaries, users) meet here, so neither imports the other.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from multieye_dist.core.atomic import write_text
from multieye_dist.core.runlock import LOCK_FILE  # noqa: F401  (a name of the run directory)

logger = logging.getLogger(__name__)

RUN_ID_FILE = "run_id.txt"
_OLD_RUN_ID_FILE = "wandb_run_id.txt"  # run directories from before the tracker interface
# The key under which older checkpoints' trainer state kept the run id (now ``run_id``).
OLD_RUN_ID_KEY = "wandb_run_id"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"  # the resolved config (multieye_dist.config.save_resolved)
CHECKPOINTS_DIR = "checkpoints"  # DeepSpeed checkpoints, a folder per tag, and `latest`
STATE_FILE = "trainer_state.json"  # in each checkpoint's folder: the trainer's state
EVAL_DIR = "eval"  # dev/test results (<name>.json) and their per-sample records
PLOTS_DIR = "plots"  # pictures (multieye_dist.track.plots)


def export_path(run_dir: str | os.PathLike[str], name: str) -> Path:
    """The inference export `name` (``best``, ``last``) of a run: ``<run>/<name>.safetensors``."""
    return Path(run_dir) / f"{name}.safetensors"


def eval_path(run_dir: str | os.PathLike[str], name: str, suffix: str = ".json") -> Path:
    """An evaluation's file: ``<run>/eval/<name>.json``, or its records (``RECORDS_SUFFIX``)."""
    return Path(run_dir) / EVAL_DIR / f"{name}{suffix}"


# Run ids end up in W&B URLs and directory names; keep them to a safe alphabet.
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_RUN_ID_ALPHABET = string.ascii_lowercase + string.digits


def _new_run_id() -> str:
    # 8 characters of [a-z0-9], like wandb's own ids, without importing wandb.
    return "".join(secrets.choice(_RUN_ID_ALPHABET) for _ in range(8))


def _check_run_id(run_id: str, where: str) -> str:
    if not isinstance(run_id, str) or not _RUN_ID_RE.match(run_id):
        raise ValueError(f"{where}: run id must match {_RUN_ID_RE.pattern}, got {run_id!r}")
    return run_id


def read_run_id(run_dir: str | os.PathLike[str]) -> str | None:
    """The run id persisted in ``run_dir`` (``run_id.txt``, or the older ``wandb_run_id.txt``),
    or None."""
    for name in (RUN_ID_FILE, _OLD_RUN_ID_FILE):
        path = Path(run_dir) / name
        if path.exists():
            return _check_run_id(path.read_text(encoding="utf-8").strip(), str(path))
    return None


def write_run_id(run_dir: str | os.PathLike[str], run_id: str) -> Path:
    """Persist ``run_id`` as ``run_dir/run_id.txt``, atomically: a Tracker started on
    ``run_dir`` later continues that run (the sweep hand-off does this)."""
    _check_run_id(run_id, "run_id")
    return write_text(Path(run_dir) / RUN_ID_FILE, run_id + "\n")


def resolve_run_id(run_dir: Path, explicit: str | None) -> str:
    """The persisted id, or ``explicit`` (which wins and is persisted), or a new one."""
    persisted = read_run_id(run_dir)
    if explicit is not None:
        _check_run_id(explicit, "run_id")
        if persisted is not None and persisted != explicit:
            logger.warning(
                "run_id %r replaces the id %r persisted in %s", explicit, persisted, run_dir
            )
    run_id = explicit or persisted or _new_run_id()
    if run_id != persisted or not (run_dir / RUN_ID_FILE).exists():
        write_run_id(run_dir, run_id)
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


def repair_torn_tail(path: Path) -> None:
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


RECORDS_SUFFIX = ".records.json"  # <run>/eval/<name>.records.json


def write_records(
    path: Path,
    records: list[dict],
    *,
    split: str,
    modality: str,
    class_names: Sequence[str],
) -> Path:
    """The per-sample ``{key, label, probs}`` of one evaluation, with what they are of, as one
    JSON document (atomically: a reader never sees half of it)."""
    doc = {
        "split": split,
        "modality": modality,
        "class_names": list(class_names),
        "records": [{"key": r["key"], "label": r["label"], "probs": r["probs"]} for r in records],
    }
    return write_text(path, json.dumps(doc, separators=(",", ":")) + "\n")


@dataclass(frozen=True)
class EvalRecords:
    """A records file read back: labels ``[N]`` and probabilities ``[N, C]``."""

    path: Path
    split: str
    modality: str
    class_names: list[str]
    keys: list[str]
    labels: np.ndarray
    probs: np.ndarray


def read_records(path: str | Path) -> EvalRecords:
    """A file of :func:`write_records`, checked: a problem is a ValueError naming the file and
    the key or record (``records[12].probs``)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: not JSON ({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a records file (byte {exc.start} is not UTF-8)") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: not a records file (a JSON object with 'records')")
    for key, kind in (("split", str), ("modality", str), ("class_names", list), ("records", list)):
        if not isinstance(doc.get(key), kind):
            raise ValueError(f"{path}: key {key!r} missing or not a {kind.__name__}")
    names = [str(n) for n in doc["class_names"]]
    if len(names) < 2:
        raise ValueError(f"{path}: 'class_names' lists {len(names)} class(es), at least 2 needed")
    if not doc["records"]:
        raise ValueError(f"{path}: 'records' is empty")
    keys, labels, probs = [], [], []
    for i, r in enumerate(doc["records"]):
        where = f"{path}: records[{i}]"
        if not isinstance(r, dict) or not {"key", "label", "probs"} <= r.keys():
            raise ValueError(f"{where}: not an object with key, label and probs")
        label, p = r["label"], r["probs"]
        if type(label) is not int or not 0 <= label < len(names):
            raise ValueError(f"{where}.label: {label!r} is not a class index 0..{len(names) - 1}")
        if not isinstance(p, list) or len(p) != len(names):
            got = len(p) if isinstance(p, list) else type(p).__name__
            raise ValueError(f"{where}.probs: {got} values, {len(names)} classes in class_names")
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in p):
            raise ValueError(f"{where}.probs: not all finite numbers")
        keys.append(str(r["key"]))
        labels.append(label)
        probs.append(p)
    return EvalRecords(
        path, doc["split"], doc["modality"], names, keys, np.array(labels), np.array(probs, float)
    )
