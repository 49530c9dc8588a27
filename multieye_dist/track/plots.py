"""Pictures people read: training curves, confusion matrices, ROC and precision-recall curves,
concept explanations and shard previews, as PNG files of an exact pixel size.

Everything is drawn from files, so that a picture can be redrawn without the model or the
ranks: ``<run>/metrics.jsonl`` (:func:`multieye_dist.track.records.read_metrics`) for the
curves, ``<run>/eval/<name>.records.json`` for the rest: the per-sample ``{key, label, probs}``
(:func:`write_records`) that the trainer keeps of its last dev evaluation (``dev_last``) and of
the test scores of its best and last models (``test_best``, ``test_last``), through
:func:`multieye_dist.train.evaluation.evaluate_split`'s ``records_path``. :func:`plot_run` writes
``<run>/plots/``:

    curves.png               train/loss and its terms, the dev macro metrics, the learning rate
    confusion_<name>.png     counts, coloured by the fraction of the true class (row)
    roc_pr_<name>.png        one-vs-rest ROC and precision-recall curve per class

matplotlib is imported inside the drawing functions only (the library, the trainer included,
imports without it), and through its object-oriented API with the Agg canvas: no pyplot, no
global backend switch, nothing shared between threads. Figures are ``px / DPI`` inches at
``DPI`` and saved without a tight bounding box, so a PNG is exactly the size its constant says;
each is written atomically (:mod:`multieye_dist.core.atomic`).
"""

from __future__ import annotations

import io
import logging
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from multieye_dist.core.atomic import write_bytes
from multieye_dist.data.classes import CLASS_ABBREV, CLASS_NAMES
from multieye_dist.data.preprocess import open_image
from multieye_dist.track.records import (
    EVAL_DIR,
    METRICS_FILE,
    PLOTS_DIR,
    RECORDS_SUFFIX,
    EvalRecords,
    read_metrics,
    read_records,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from PIL import Image

    from multieye_dist.model.explain import Explanation

logger = logging.getLogger(__name__)

DPI = 100
CURVES_PX = (1800, 560)
CONFUSION_PX = (1000, 760)
ROC_PR_PX = (1600, 720)
EXPLAIN_WIDTH_PX = 1500
PREVIEW_CELL_PX = 140  # one image and its caption
_PREVIEW_LABEL_PX, _PREVIEW_TITLE_PX, _PREVIEW_MARGIN_PX = 240, 60, 12

# Logged under train/ but not terms of the loss: they get their own panel or none.
_NOT_LOSS = frozenset({"train/lr", "train/epoch", "train/samples_per_s", "train/nonfinite_skipped"})
# The macro metrics of multieye_dist.track.metrics.SCALAR_KEYS, in its order (not imported:
# sklearn).
_DEV_KEYS = ("accuracy", "precision", "recall", "specificity", "f1", "auc", "map", "kappa")
# Positive and negative contributions: blue and orange read apart with red-green colour blindness.
_POS, _NEG = "#1f77b4", "#e8710a"


# ----------------------------------------------------------------------------- figures


def _figure(px: tuple[int, int], layout: str | None = "constrained") -> Figure:
    """A figure of exactly `px` pixels when saved by :func:`_save`, on the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(px[0] / DPI, px[1] / DPI), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    """PNG bytes in memory, then one atomic write: never half a picture at `path`."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)  # no bbox_inches="tight": it would change the size
    written = write_bytes(Path(path), buf.getvalue())
    logger.debug("wrote %s", written)
    return written


def _abbrev(names: Sequence[str]) -> list[str]:
    """Short axis labels: the standard abbreviations for the 9 MultiEYE classes."""
    if list(names) == list(CLASS_NAMES):
        return list(CLASS_ABBREV)
    return [n if len(n) <= 10 else n[:9] + "…" for n in names]


def _empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_axis_off()  # not set_xticks([]): that would clear the ticks of a shared axis too


# ----------------------------------------------------------------------------- records

# ----------------------------------------------------------------------------- curves


def metric_series(records: Sequence[Mapping[str, Any]]) -> dict[str, tuple[np.ndarray, ...]]:
    """``{key: (steps, values)}`` sorted by step, from :func:`read_metrics` records. A step
    logged twice (a resumed run replays the steps after its last checkpoint) keeps its later
    value, as the tracker documents."""
    by_key: dict[str, dict[int, float]] = {}
    for r in records:
        for key, value in r.items():
            if key in ("step", "time") or isinstance(value, bool):
                continue
            if isinstance(value, int | float):
                by_key.setdefault(key, {})[r["step"]] = float(value)
    out = {}
    for key, points in by_key.items():
        steps = sorted(points)
        out[key] = (np.array(steps), np.array([points[s] for s in steps]))
    return out


def _curve_groups(series: Mapping[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """(loss keys, train/loss first; dev macro metric keys; the learning rate key)."""
    losses = sorted(k for k in series if k.startswith("train/") and k not in _NOT_LOSS)
    if "train/loss" in losses:
        losses.remove("train/loss")
        losses.insert(0, "train/loss")
    dev = [f"dev/{k}" for k in _DEV_KEYS if f"dev/{k}" in series]
    return losses, dev, [k for k in ("train/lr",) if k in series]


def has_curves(series: Mapping[str, Any]) -> bool:
    return any(_curve_groups(series))


def _line(ax: Axes, steps: np.ndarray, values: np.ndarray, label: str, **kw: Any) -> None:
    # Sparse series (dev: one point per evaluation) get markers: a lone point is no line.
    marker = "o" if len(steps) <= 40 else None
    ax.plot(steps, values, label=label, marker=marker, markersize=4, **kw)


def draw_curves(series: Mapping[str, Any], out: str | Path, title: str = "") -> Path:
    """Three panels against the optimizer step: the loss and its terms, the dev macro
    metrics, the learning rate. A panel with nothing logged says so."""
    from matplotlib.ticker import MaxNLocator

    losses, dev, lr = _curve_groups(series)
    fig = _figure(CURVES_PX)
    # One step axis for all three: a dev point sits under the loss at the same step.
    ax_loss, ax_dev, ax_lr = fig.subplots(1, 3, sharex=True, width_ratios=[1.25, 1.25, 0.8])
    if title:
        fig.suptitle(title, fontsize=13)
    for key in losses:
        bold = key == "train/loss"
        _line(ax_loss, *series[key], key.removeprefix("train/"), lw=2.2 if bold else 1.2,
              color="black" if bold else None, zorder=3 if bold else 2)  # fmt: skip
    for key in dev:
        bold = key == "dev/f1"
        _line(ax_dev, *series[key], key.removeprefix("dev/"), lw=2.2 if bold else 1.2)
    for key in lr:
        _line(ax_lr, *series[key], "lr", color="tab:purple")
    panels = (
        (ax_loss, losses, "training loss (mean over the log interval)", "loss"),
        (ax_dev, dev, "dev metrics (macro over classes)", "value"),
        (ax_lr, lr, "learning rate", "lr"),
    )
    for ax, keys, name, ylabel in panels:
        ax.set_title(name, fontsize=11)
        if not keys:
            _empty(ax, "nothing logged")
            continue
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps: no 1.25
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax is not ax_lr:
            ax.legend(fontsize=9, loc="best", ncols=2 if len(keys) > 4 else 1)
    if dev:
        low = min(0.0, *(float(np.nanmin(series[k][1])) for k in dev))
        ax_dev.set_ylim(low - 0.02, 1.02)
    if lr:
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    return _save(fig, out)


# ----------------------------------------------------------------------------- evaluations


def _scores(rec: EvalRecords) -> dict:
    from multieye_dist.track.metrics import evaluate

    return evaluate(rec.labels, rec.probs, rec.class_names)


def _headline(name: str, rec: EvalRecords, result: dict) -> str:
    return (
        f"{name}: {rec.modality} {rec.split}, N={result['n']}  ·  accuracy "
        f"{100 * result['accuracy']:.1f}%  ·  macro-F1 {100 * result['f1']:.1f}%"
    )


def draw_confusion(rec: EvalRecords, out: str | Path, name: str) -> Path:
    """The confusion matrix: counts in the cells, colour = fraction of the true class, so that
    rare classes read as clearly as common ones."""
    result = _scores(rec)
    cm = np.asarray(result["confusion_matrix"])
    support = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, support, out=np.zeros(cm.shape), where=support > 0)
    short = _abbrev(rec.class_names)
    fig = _figure(CONFUSION_PX)
    ax = fig.subplots()
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i, j in np.ndindex(cm.shape):
        if cm[i, j]:
            color = "white" if frac[i, j] > 0.55 else "black"
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=11, color=color)
    c = len(short)
    ax.set_xticks(range(c), short, fontsize=10)
    names = zip(rec.class_names, short, support[:, 0], strict=True)
    rows = [f"{n} ({s})  n={int(k)}" for n, s, k in names]
    ax.set_yticks(range(c), rows, fontsize=10)
    ax.set_xlabel("predicted class", fontsize=11)
    ax.set_ylabel("true class", fontsize=11)
    # A figure title: over the axes alone, the headline ran into the colour bar.
    fig.suptitle(_headline(name, rec, result), fontsize=12)
    fig.colorbar(im, ax=ax, shrink=0.75, label="fraction of the true class (row)")
    return _save(fig, out)


def draw_roc_pr(rec: EvalRecords, out: str | Path, name: str) -> Path:
    """One-vs-rest ROC and precision-recall curves per class, on the probabilities (as the AUC
    and AP of the metrics). A class with no sample in the split has no curve: its legend entry
    says so instead of leaving it out."""
    from matplotlib import colormaps
    from sklearn.metrics import precision_recall_curve, roc_curve

    result = _scores(rec)
    fig = _figure(ROC_PR_PX)
    ax_roc, ax_pr = fig.subplots(1, 2)
    colors = colormaps["tab10"].colors
    for k, (full, short) in enumerate(zip(rec.class_names, _abbrev(rec.class_names), strict=True)):
        color = colors[k % len(colors)]
        row = result["per_class"][full]
        pos = rec.labels == k
        if row["auc"] is not None:
            fpr, tpr, _ = roc_curve(pos, rec.probs[:, k])
            ax_roc.plot(fpr, tpr, color=color, lw=1.6, label=f"{short}  AUC {row['auc']:.3f}")
        else:
            ax_roc.plot([], [], color=color, label=f"{short}  no AUC (absent)")
        if row["ap"] is not None:
            prec, rec_, _ = precision_recall_curve(pos, rec.probs[:, k])
            ax_pr.step(rec_, prec, where="post", color=color, lw=1.6,
                       label=f"{short}  AP {row['ap']:.3f}")  # fmt: skip
        else:
            ax_pr.plot([], [], color=color, label=f"{short}  no AP (absent)")
    ax_roc.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="chance")
    macro_auc = "n/a" if result["auc"] is None else f"{result['auc']:.3f}"
    macro_ap = "n/a" if result["map"] is None else f"{result['map']:.3f}"
    # Good ROC curves leave the lower right empty; PR curves of 9 classes fill every corner,
    # so that legend goes outside, to the right.
    for ax, title, xl, yl, where in (
        (ax_roc, f"ROC, one class vs rest (macro AUC {macro_auc})", "false positive rate",
         "true positive rate", {"loc": "lower right"}),
        (ax_pr, f"precision-recall (mAP {macro_ap})", "recall", "precision",
         {"loc": "center left", "bbox_to_anchor": (1.02, 0.5)}),
    ):  # fmt: skip
        ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.02), xlabel=xl, ylabel=yl)
        ax.set_title(title, fontsize=11)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9, **where)
    fig.suptitle(_headline(name, rec, result), fontsize=12)
    return _save(fig, out)


# ----------------------------------------------------------------------------- a run


def plot_run(run_dir: str | Path) -> list[Path]:
    """(Re)draw ``<run>/plots/`` from the run's files; returns the pictures written. Every
    input is read and checked before the first picture is written; a problem is an error
    naming the file (and line or record)."""

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    metrics = run_dir / METRICS_FILE
    series = metric_series(read_metrics(metrics)) if metrics.is_file() else {}
    evals = {
        p.name.removesuffix(RECORDS_SUFFIX): read_records(p)
        for p in sorted((run_dir / EVAL_DIR).glob(f"*{RECORDS_SUFFIX}"))
    }
    if not has_curves(series) and not evals:
        raise ValueError(
            f"{run_dir}: nothing to draw: no train/ or dev/ values in {METRICS_FILE} and no "
            f"eval/*{RECORDS_SUFFIX}; give a training run's out_dir"
        )
    out, written = run_dir / PLOTS_DIR, []
    if has_curves(series):
        resolved = Path(run_dir).resolve()  # "run", given relative, is still named with its parent
        title = f"{resolved.parent.name}/{resolved.name}"
        written.append(draw_curves(series, out / "curves.png", title=title))
    else:
        logger.warning("%s: no training curves: no train/ or dev/ values in it yet", metrics)
    for name, rec in evals.items():
        written.append(draw_confusion(rec, out / f"confusion_{name}.png", name))
        written.append(draw_roc_pr(rec, out / f"roc_pr_{name}.png", name))
    return written


def plot_run_safely(run_dir: str | Path) -> list[Path]:
    """:func:`plot_run` at the end of a training: a picture that cannot be drawn (matplotlib
    missing, a full disk) is a warning, never a failed run; the pictures can be redrawn."""
    try:
        written = plot_run(run_dir)
    except Exception as exc:  # whatever it is, the run's results are already saved
        logger.warning(
            "pictures not drawn (%s: %s); the run itself is complete, redraw them with: "
            "multieye-dist plots %s",
            type(exc).__name__,
            exc,
            run_dir,
        )
        return []
    logger.info("drew %d picture(s) in %s", len(written), Path(run_dir) / PLOTS_DIR)
    return written


# ----------------------------------------------------------------------------- explanations


def explanation_px(rows: int, concepts: int) -> tuple[int, int]:
    """The size of :func:`draw_explanations`' picture: one row per image, 520 px high for up
    to 6 concepts and 60 px more per concept beyond."""
    return EXPLAIN_WIDTH_PX, rows * (160 + 60 * max(concepts, 6))


def _wrap(text: str, width: int = 46, lines: int = 3) -> str:
    return "\n".join(textwrap.wrap(text, width, max_lines=lines, placeholder=" …"))


def _explanation_row(ax_img: Axes, ax_bar: Axes, image: Image.Image, e: Explanation) -> None:
    ax_img.imshow(np.asarray(image.convert("RGB")))
    ax_img.set_xticks([])
    ax_img.set_yticks([])
    ranked = sorted(e.probabilities.items(), key=lambda kv: -kv[1])
    runner_up = f"\nnext: {ranked[1][0]} ({ranked[1][1]:.2f})" if len(ranked) > 1 else ""
    ax_img.set_title(
        f"{Path(e.image).name}\npredicted: {e.predicted_name} "
        f"(p={e.probabilities[e.predicted_name]:.2f}){runner_up}",
        fontsize=11,
    )
    values = [c["contribution"] for c in e.concepts]
    if not values:
        _empty(ax_bar, "no concepts")
        return
    y = np.arange(len(values))
    bars = ax_bar.barh(y, values, color=[_POS if v >= 0 else _NEG for v in values], height=0.6)
    ax_bar.bar_label(bars, [f"{v:+.3g}" for v in values], padding=4, fontsize=10)
    ax_bar.set_yticks(y, [_wrap(c["concept"]) for c in e.concepts], fontsize=9)
    ax_bar.invert_yaxis()  # the largest contribution on top
    ax_bar.axvline(0, color="0.3", lw=0.8)
    ax_bar.margins(x=0.18)
    ax_bar.grid(axis="x", alpha=0.3)
    ax_bar.set_xlabel(f"contribution to the logit of {e.predicted_name} (weight × similarity)")
    ax_bar.set_title(
        f"why {e.predicted_name}: top {len(values)} concepts (class bias {e.bias:+.3f})",
        fontsize=11,
    )


def plot_explanations(results: list[Explanation], out: Path) -> Path:
    """`out` (PNG): each explained image beside a bar chart of its top concept contributions
    to the predicted class (:func:`draw_explanations`)."""
    items = []
    for e in results:
        with open_image(Path(e.image), e.image) as img:  # as explain_images read it
            items.append((img.convert("RGB"), e))
    return draw_explanations(items, out)


def draw_explanations(items: Sequence[tuple[Image.Image, Explanation]], out: str | Path) -> Path:
    """Each image beside a bar chart of its top concept contributions to the predicted class
    (blue raises the logit, orange lowers it); one row per image."""
    if not items:
        raise ValueError("no explanation to draw")
    k = max(len(e.concepts) for _, e in items)
    fig = _figure(explanation_px(len(items), k))
    axes = fig.subplots(len(items), 2, width_ratios=[1, 2.1], squeeze=False)
    for (image, e), (ax_img, ax_bar) in zip(items, axes, strict=True):
        _explanation_row(ax_img, ax_bar, image, e)
    return _save(fig, out)


# ----------------------------------------------------------------------------- shard preview


def preview_px(per_class: int, classes: int = len(CLASS_NAMES)) -> tuple[int, int]:
    """The size of :func:`draw_shard_preview`'s picture."""
    width = _PREVIEW_LABEL_PX + per_class * PREVIEW_CELL_PX + _PREVIEW_MARGIN_PX
    return width, _PREVIEW_TITLE_PX + classes * PREVIEW_CELL_PX + _PREVIEW_MARGIN_PX


def draw_preview_grid(
    rows: Sequence[Sequence[tuple[Image.Image, str]]],
    labels: Sequence[str],
    per_class: int,
    title: str,
    out: str | Path,
) -> Path:
    """A grid: one row per class (its label on the left), up to `per_class` captioned images."""
    w, h = preview_px(per_class, len(rows))
    fig = _figure((w, h), layout=None)  # placed by hand, in pixels
    # Wrapped to the width: a grid of one column is narrow.
    fig.text(0.5, 1 - 30 / h, _wrap(title, w // 8, 2), ha="center", va="center", fontsize=12)
    img_px = PREVIEW_CELL_PX - 24  # the rest: the caption and a gap
    for r, (images, label) in enumerate(zip(rows, labels, strict=True)):
        top = h - _PREVIEW_TITLE_PX - r * PREVIEW_CELL_PX
        fig.text(12 / w, (top - PREVIEW_CELL_PX / 2) / h, label, va="center", fontsize=10)
        if not images:
            fig.text((_PREVIEW_LABEL_PX + 8) / w, (top - PREVIEW_CELL_PX / 2) / h,
                     "none in this split", va="center", color="0.45")  # fmt: skip
        for col, (image, caption) in enumerate(images):
            left = _PREVIEW_LABEL_PX + col * PREVIEW_CELL_PX
            ax = fig.add_axes((left / w, (top - img_px) / h, img_px / w, img_px / h))
            ax.imshow(np.asarray(image.convert("RGB")))
            ax.set_axis_off()
            # The end of a long name is what tells samples apart (..._000123).
            short = caption if len(caption) <= 24 else "…" + caption[-23:]
            fig.text((left + img_px / 2) / w, (top - img_px - 11) / h, short,
                     ha="center", va="center", fontsize=7, color="0.25")  # fmt: skip
    return _save(fig, out)


def _first_per_class(shards: Any, want: np.ndarray) -> list[list[tuple[Image.Image, str]]]:
    """Up to want[c] decoded samples of each class c, in shard order, with their names."""
    from multieye_dist.data.decode import decode_pil
    from multieye_dist.data.stream import make_units, read_unit

    picked: list[list[tuple[Image.Image, str]]] = [[] for _ in want]
    if not want.any():
        return picked
    for unit in make_units(shards, 1):
        for s in read_unit(unit, shards.image_ext):  # strict: a damaged shard is a DataError
            if len(picked[s.label]) < want[s.label]:
                image = decode_pil(s.data, f"{unit.url}: sample {s.key}")
                picked[s.label].append((image, str(s.metadata().get("name", s.key))))
            if all(len(p) >= n for p, n in zip(picked, want, strict=True)):
                return picked
    return picked


def draw_shard_preview(
    shard_dir: str | Path, modality: str, split: str, per_class: int, out: str | Path
) -> Path:
    """The first `per_class` samples of each class of a converted split, in shard order, read
    through its manifest (every shard read is checked as training checks it)."""
    from multieye_dist.data.stream import ShardSet

    shards = ShardSet.from_manifest(shard_dir, modality, split)
    counts = shards.total_class_counts
    picked = _first_per_class(shards, np.minimum(counts, per_class))
    short = _abbrev(shards.class_names)  # the manifest's classes (MultiEYE's 9 for old shards)
    labels = [
        f"{_wrap(name, 26, 2)}\n({short[c]}, {int(counts[c])} in split)"
        for c, name in enumerate(shards.class_names)
    ]
    title = f"{modality}-{split}: {shards.listed} samples, the first {per_class} of each class"
    return draw_preview_grid(picked, labels, per_class, title, out)
