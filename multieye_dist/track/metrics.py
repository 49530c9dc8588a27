"""Evaluation metrics of the release (single-label, C-class retinal disease classification).

``evaluate(labels, probs)`` takes integer labels ``[N]`` and class probabilities ``[N, C]``
(softmax outputs; numpy arrays or anything ``np.asarray`` accepts, e.g. CPU torch tensors) and
returns a plain dict of Python floats in [0, 1] (kappa in [-1, 1]), computed with scikit-learn:

* ``accuracy``: ``accuracy_score`` on ``pred = argmax(probs)``.
* ``precision``, ``recall``, ``f1``: macro means over ALL C classes (``labels=range(C)``,
  ``zero_division=0``).
* ``specificity``: per class TN / (TN + FP) from the one-vs-rest counts of the C x C confusion
  matrix, macro mean over all C classes (0 if TN + FP == 0, i.e. every sample is that class).
* ``auc``: per class ``roc_auc_score(labels == k, probs[:, k])`` (one-vs-rest, on probabilities,
  not on argmax), macro mean.
* ``map``: per class ``average_precision_score(labels == k, probs[:, k])``, macro mean.
* ``kappa``: unweighted multi-class ``cohen_kappa_score(labels, pred)``.
* ``per_class``: ``{name: {precision, recall, specificity, f1, auc, ap, support}}``.
* ``confusion_matrix``: C x C nested list of ints, rows = true class, columns = predicted class,
  every class gets a row and a column even when absent.
* ``n``, ``num_classes``, ``class_names``, ``absent_classes`` (names with support 0).

Absent classes (no sample of class k in ``labels``): ROC AUC and AP have no positives and are
undefined. Their per-class ``auc``/``ap`` are ``None`` and they are left out of the macro ``auc``
and ``map`` means (AUC is also undefined, hence ``None``, when every sample is class k). Precision,
recall, F1 and specificity stay in the macro means (0 where undefined, ``zero_division=0``). A macro
AUC/mAP with no defined class, or a degenerate kappa (both raters use one single class), is
``None``; ``to_log_dict`` drops ``None`` values.

Release: MultiEYE's training/evaluation path (``process/finetune.py``) imports
``utils/eval_single.py``, not ``utils/eval.py``; ``utils/eval.py`` holds the multi-label variant
(``multilabel_confusion_matrix``, per-class binary kappa and accuracy averaged over classes), which
the single-label fundus/OCT classifier does not use. This module follows ``eval_single.py``:
sklearn macro precision/recall/F1, ``accuracy_score``, unweighted ``cohen_kappa_score``,
specificity TN/(TN+FP) per class from ``confusion_matrix(labels=0..8)`` averaged with
``np.mean``, AUC/AP per class one-vs-rest on the softmax probabilities (``label_binarize``),
averaged with ``np.mean``; predictions are ``argmax`` of the softmax. Differences, none of which
matter when every class occurs in the labels and predictions (the MultiEYE test split):

* the release calls ``precision_score(..., average='macro')`` without ``labels=``, which averages
  over the classes present in labels or predictions only; here all C classes count;
* the release does not set ``zero_division`` (sklearn warns and uses 0, same value);
* for an absent class the release's ``roc_auc_score`` raises (old sklearn) or gives NaN, poisoning
  the mean; here the class is excluded from the mean and reported as ``None``;
* the release hard-codes 9 classes; here C = ``probs.shape[1]``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    cohen_kappa_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

__all__ = ["NonFiniteError", "evaluate", "format_table", "to_log_dict"]

SCALAR_KEYS = ("accuracy", "precision", "recall", "specificity", "f1", "auc", "map", "kappa")
PER_CLASS_KEYS = ("precision", "recall", "specificity", "f1", "auc", "ap", "support")


class NonFiniteError(ValueError):
    """Predictions with NaN or inf: a diverged model (the trainer stops it with advice), not a
    caller's bad input."""


def _as_numpy(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor: no torch import needed
        x = x.detach().cpu()
    try:
        return np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise ValueError(f"{name}: cannot convert to a numpy array ({exc})") from exc


def _validate(labels, probs, class_names) -> tuple[np.ndarray, np.ndarray, list[str]]:
    labels = _as_numpy(labels, "labels")
    probs = _as_numpy(probs, "probs")
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D [N], got shape {labels.shape}")
    if probs.ndim != 2:
        raise ValueError(f"probs must be 2-D [N, C], got shape {probs.shape}")
    n, c = probs.shape
    if labels.shape[0] != n:
        raise ValueError(f"labels has N={labels.shape[0]} but probs has N={n}")
    if n == 0:
        raise ValueError("no samples: N must be > 0")
    if c < 2:
        raise ValueError(f"probs must have at least 2 classes (columns), got C={c}")
    if labels.dtype == bool or not (
        np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)
    ):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if np.issubdtype(labels.dtype, np.floating):
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise ValueError("labels must be integer class indices")
    labels = labels.astype(np.int64)
    bad = (labels < 0) | (labels >= c)
    if bad.any():
        raise ValueError(
            f"labels must be in [0, {c - 1}] (C={c} from probs), got {sorted(set(labels[bad]))}"
        )
    if not np.issubdtype(probs.dtype, np.number) or probs.dtype == bool:
        raise ValueError(f"probs must be numeric, got dtype {probs.dtype}")
    probs = probs.astype(np.float64)
    if not np.all(np.isfinite(probs)):
        bad = int((~np.isfinite(probs)).any(axis=1).sum())
        raise NonFiniteError(f"probs contains NaN or inf ({bad} of {n} samples)")
    if class_names is None:
        names = [str(i) for i in range(c)]
    else:
        names = [str(s) for s in class_names]
        if len(names) != c:
            raise ValueError(f"class_names has {len(names)} names but probs has C={c} columns")
        if len(set(names)) != c:
            raise ValueError(f"class_names must be unique, got {names}")
    return labels, probs, names


def _float_or_none(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def _mean_defined(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def evaluate(labels, probs, class_names: Sequence[str] | None = None) -> dict:
    """Release metrics for integer ``labels`` [N] and class probabilities ``probs`` [N, C].

    See the module docstring for definitions and the handling of absent classes.
    Raises ValueError for bad shapes, N == 0, C < 2, labels outside [0, C), non-finite probs.
    """
    labels, probs, names = _validate(labels, probs, class_names)
    n, c = probs.shape
    classes = list(range(c))
    pred = probs.argmax(axis=1)

    cm = confusion_matrix(labels, pred, labels=classes)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, pred, labels=classes, average=None, zero_division=0
    )
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    tn = n - tp - fp - fn
    negatives = (tn + fp).astype(np.float64)
    specificity = np.divide(tn, negatives, out=np.zeros(c), where=negatives > 0)

    aucs: list[float | None] = []
    aps: list[float | None] = []
    for k in classes:
        pos = labels == k
        npos = int(pos.sum())
        aps.append(float(average_precision_score(pos, probs[:, k])) if npos > 0 else None)
        aucs.append(float(roc_auc_score(pos, probs[:, k])) if 0 < npos < n else None)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate kappa: sklearn warns and returns NaN
        with np.errstate(divide="ignore", invalid="ignore"):
            kappa = _float_or_none(cohen_kappa_score(labels, pred, labels=classes))

    per_class = {
        names[k]: {
            "precision": float(precision[k]),
            "recall": float(recall[k]),
            "specificity": float(specificity[k]),
            "f1": float(f1[k]),
            "auc": aucs[k],
            "ap": aps[k],
            "support": int(support[k]),
        }
        for k in classes
    }
    return {
        "accuracy": float(accuracy_score(labels, pred)),
        "precision": float(np.mean(precision)),
        "recall": float(np.mean(recall)),
        "specificity": float(np.mean(specificity)),
        "f1": float(np.mean(f1)),
        "auc": _mean_defined(aucs),
        "map": _mean_defined(aps),
        "kappa": kappa,
        "n": int(n),
        "num_classes": int(c),
        "class_names": names,
        "absent_classes": [names[k] for k in classes if support[k] == 0],
        "per_class": per_class,
        "confusion_matrix": cm.astype(int).tolist(),
    }


def concept_auc(
    sims,
    findings: Sequence[Sequence[int]],
    concept_findings: Sequence[int],
    finding_names: Sequence[str],
) -> dict:
    """The concept readout: how well the model's level-1 concept similarities ``sims`` [N, K]
    rank the images that have each finding above those that do not.

    ``findings[i]`` are image i's finding indices, ``concept_findings[k]`` the finding that
    concept k describes (several concepts may describe one finding: their similarities are
    averaged). Per finding ``roc_auc_score(has_finding, mean similarity of its concepts)``;
    ``None`` where no concept describes it or the split has no image with (or without) it.
    Returns ``{"concept_auc": macro mean over the defined findings (None if none),
    "concept_auc_per_finding": {name: auc}}``. It pools every image-finding pair of the split,
    so it varies far less between seeds than macro-F1 does."""
    sims = np.asarray(sims, dtype=np.float64)
    n, k = sims.shape
    if len(findings) != n or len(concept_findings) != k:
        raise ValueError(
            f"concept_auc: {n} x {k} similarities, {len(findings)} findings lists and "
            f"{len(concept_findings)} concept_findings"
        )
    if not np.isfinite(sims).all():
        raise ValueError("concept_auc: the similarities are not all finite")
    has = np.zeros((n, len(finding_names)), dtype=bool)
    for i, found in enumerate(findings):
        has[i, list(found)] = True
    mapping = np.asarray(concept_findings)
    per: dict[str, float | None] = {}
    for f, name in enumerate(finding_names):
        cols = np.flatnonzero(mapping == f)
        npos = int(has[:, f].sum())
        defined = len(cols) and 0 < npos < n
        per[name] = float(roc_auc_score(has[:, f], sims[:, cols].mean(1))) if defined else None
    return {"concept_auc": _mean_defined(list(per.values())), "concept_auc_per_finding": per}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100.0 * x:.2f}"


def format_table(result: dict) -> str:
    """Per-class table plus summary lines, values in % with 2 decimals (``n/a`` if undefined)."""
    names = list(result["per_class"])
    width = max(8, *(len(s) for s in names)) + 2
    cols = ("Prec", "Rec", "Spec", "F1", "AUC", "AP")
    keys = ("precision", "recall", "specificity", "f1", "auc", "ap")
    lines = ["Class".ljust(width) + "".join(f"{h:>8}" for h in cols) + f"{'Support':>9}"]
    for name, row in result["per_class"].items():
        cells = "".join(f"{_pct(row[k]):>8}" for k in keys)
        lines.append(name.ljust(width) + cells + f"{row['support']:>9d}")
    macro = [result[k] for k in ("precision", "recall", "specificity", "f1", "auc", "map")]
    lines.append(
        "Macro".ljust(width) + "".join(f"{_pct(v):>8}" for v in macro) + f"{result['n']:>9d}"
    )
    lines.append(
        f"Accuracy {_pct(result['accuracy'])}  Precision {_pct(result['precision'])}  "
        f"Recall {_pct(result['recall'])}  Specificity {_pct(result['specificity'])}  "
        f"F1 {_pct(result['f1'])}"
    )
    lines.append(
        f"AUC {_pct(result['auc'])}  mAP {_pct(result['map'])}  Kappa {_pct(result['kappa'])}  "
        f"(N={result['n']}, C={result['num_classes']})"
    )
    if result.get("concept_auc") is not None:
        per = ", ".join(f"{k} {_pct(v)}" for k, v in result["concept_auc_per_finding"].items())
        lines.append(f"Concept AUC {_pct(result['concept_auc'])} ({per})")
    if result["absent_classes"]:
        absent = ", ".join(result["absent_classes"])
        lines.append(f"Absent from labels (excluded from AUC/mAP): {absent}")
    return "\n".join(lines)


def to_log_dict(result: dict, prefix: str = "dev/") -> dict[str, float]:
    """Flat ``{prefix+name: float}`` for W&B: the macro scalars and per-class values
    (``{prefix}{metric}/{class}``); undefined (``None``) values are left out."""
    out: dict[str, float] = {}
    for key in SCALAR_KEYS:
        if result[key] is not None:
            out[f"{prefix}{key}"] = float(result[key])
    for name, row in result["per_class"].items():
        for key in PER_CLASS_KEYS:
            if key != "support" and row[key] is not None:
                out[f"{prefix}{key}/{name}"] = float(row[key])
    if result.get("concept_auc") is not None:  # the concept readout, where findings exist
        out[f"{prefix}concept_auc"] = float(result["concept_auc"])
        for name, auc in result["concept_auc_per_finding"].items():
            if auc is not None:
                out[f"{prefix}concept_auc/{name}"] = float(auc)
    return out
