"""The main job on the embedded default: synthetic MultiEYE with latent findings and its
disjoint pretraining pool -> shards -> concept alignment of each modality on the pool -> OCT
teacher (until its dev F1 stops improving) -> three fundus students on the same seed, steps and
fundus batches (fundus-only, OCT-CoDA, and OCT-CoDA from the oracle teacher: the positive
control) -> a table of test F1, concept AUC, gate and contrastive term -> one explanation.

Every stage goes through the same :func:`multieye_dist.train.loop.run` that the cluster runs (a
world of one, CPU). The pieces (:func:`make_students_data`, :func:`make_pool`, :func:`pretrain`,
:func:`student_overrides`, :func:`distill_diagnostics`, ``ARMS``) are also what
``benchmarks/efficacy.py`` runs, over data families, banks, weights, label budgets, seeds and
arms. Outputs under ``--out`` (default ``runs/demo``).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from multieye_dist.config import load_config
from multieye_dist.core.atomic import write_text
from multieye_dist.core.resources import packaged
from multieye_dist.track.records import CONFIG_FILE, export_path

logger = logging.getLogger(__name__)

DEMO_CONFIG = packaged("configs/demo.yaml")  # package data: the demo runs from any install

# The student arms a study can run: name -> overrides of the distill stage. The controls are
# OCT-CoDA with the teacher's knowledge removed (gate-never), scrambled across classes (permuted
# teacher) or let in at every step (gate-open), and the oracle teachers
# (multieye_dist.model.oracle): the partners' true findings (oracle: the positive control), their
# class's finding rates (oracle-class), another class's findings (oracle-permuted) or findings that
# mean nothing (oracle-shuffled: the negative controls).
ARMS: dict[str, tuple[str, ...]] = {
    "fundus-only": ("loss.name=fundus-only",),
    "OCT-CoDA": ("loss.name=octcoda", "loss.variant=paper"),
    "OCT-CoDA official": ("loss.name=octcoda", "loss.variant=official"),
    "gate-never": ("loss.name=octcoda", "loss.control=gate-never"),
    "permuted teacher": ("loss.name=octcoda", "loss.control=permuted-teacher"),
    "OCT-CoDA gate-open": ("loss.name=octcoda", "loss.control=gate-open"),
    "oracle": ("loss.name=octcoda", "teacher.kind=oracle"),
    "oracle gate-open": ("loss.name=octcoda", "teacher.kind=oracle", "loss.control=gate-open"),
    "oracle-class": ("loss.name=octcoda", "teacher.kind=oracle-class"),
    "oracle-permuted": ("loss.name=octcoda", "teacher.kind=oracle-permuted"),
    "oracle-shuffled": ("loss.name=octcoda", "teacher.kind=oracle-shuffled"),
}
DEMO_ARMS = ("fundus-only", "OCT-CoDA", "oracle")
# The fundus findings at 3x their calibrated opacity: at 1x a 128-step CPU run learns nothing
# from fundus (align probe F1 10.6, students at chance); at 3x it does (21.3; students ~26).
DEMO_VISIBILITY = 3.0
METRICS = ("accuracy", "f1", "auc", "map", "kappa")
# The OCT teacher trains until dev macro-F1 stops improving (at most this many epochs of the
# demo config's 128 steps): an undertrained teacher would close the gate for the wrong reason.
TEACHER = ("train.epochs=30", "train.early_stop_evals=5")


@dataclass(frozen=True)
class Data:
    """The shards of one synthetic data family."""

    shards: Path  # the students' and the teacher's data
    pool: Path  # the pretraining pool (concept alignment): no image of it is in `shards`


def _synth_shards(raw: Path, shard_dir: Path, opts, workers: int) -> Path:
    from multieye_dist.data.preprocess import Preprocess
    from multieye_dist.data.shards import ConvertOptions, convert
    from multieye_dist.data.synth import generate
    from multieye_dist.data.verify import verify
    from multieye_dist.data.workers import resolve_workers

    generate(raw, opts)
    pp = Preprocess(image_size=opts.image_size)
    convert(
        raw,
        shard_dir,
        ConvertOptions(shard_samples=200, workers=workers, preprocess=pp),
        progress=False,
    )
    report = verify(shard_dir, workers=resolve_workers(workers))
    if not report.ok:
        raise RuntimeError(f"demo shards failed verification:\n{report.text()}")
    print(f"[data] shards -> {shard_dir}: {report.text().splitlines()[-1]}")
    return shard_dir


def make_data(
    out: Path,
    per_class: int,
    image_size: int,
    seed: int,
    workers: int,
    fundus_per_class: int | None = None,
    fundus_visibility: float | None = None,
    pool_per_class: int | None = None,
) -> Data:
    """Synthetic MultiEYE under ``out/raw`` -> ``out/shards`` and its pretraining pool under
    ``out/pool`` (:func:`make_pool`; ``pool_per_class`` None: ``per_class``)."""
    shards = make_students_data(
        out, per_class, image_size, seed, workers, fundus_per_class, fundus_visibility
    )
    pool = per_class if pool_per_class is None else pool_per_class
    return Data(shards, make_pool(out / "pool", pool, image_size, seed, workers, fundus_visibility))


def _options(image_size: int, seed: int, workers: int, visibility: float | None) -> dict:
    from multieye_dist.data.workers import resolve_workers

    return dict(
        seed=seed,
        image_size=image_size,
        workers=resolve_workers(workers),
        fundus_visibility=DEMO_VISIBILITY if visibility is None else visibility,
    )


def make_students_data(
    out: Path,
    per_class: int,
    image_size: int,
    seed: int,
    workers: int,
    fundus_per_class: int | None = None,
    fundus_visibility: float | None = None,
) -> Path:
    """The students' and the teacher's data: synthetic MultiEYE under ``out/raw``, converted
    and verified under ``out/shards`` (returned)."""
    from multieye_dist.data.synth import SynthOptions

    fundus = per_class if fundus_per_class is None else fundus_per_class
    print(f"[data] synthetic MultiEYE ({fundus} fundus, {per_class} OCT per class) -> {out}/raw")
    opts = SynthOptions(
        per_class=per_class,
        fundus_per_class=fundus_per_class,
        **_options(image_size, seed, workers, fundus_visibility),
    )
    return _synth_shards(out / "raw", out / "shards", opts, workers)


def make_pool(
    out: Path,
    per_class: int,
    image_size: int,
    seed: int,
    workers: int,
    fundus_visibility: float | None = None,
) -> Path:
    """The pretraining pool, the FLAIR stand-in: other eyes of the same synthetic world with
    their captions (``synth --pool``: no image or name in common with the data of the same
    seed), ``per_class`` train images per class and modality, under ``out/raw`` ->
    ``out/shards`` (returned). Only the concept alignment reads it."""
    from multieye_dist.data.synth import SynthOptions

    print(f"[data] pretraining pool ({per_class} per class and modality, disjoint) -> {out}/raw")
    opts = SynthOptions(
        per_class=per_class, pool=True, **_options(image_size, seed, workers, fundus_visibility)
    )
    return _synth_shards(out / "raw", out / "shards", opts, workers)


def train_stage(name: str, out_dir: Path, overrides: list[str], quiet: bool = False) -> dict:
    """One training run of the demo config (its previous output removed first)."""
    from multieye_dist.train.loop import run

    shutil.rmtree(out_dir, ignore_errors=True)
    cfg = load_config(DEMO_CONFIG, [f"train.out_dir={out_dir}", *overrides])
    t0 = time.perf_counter()
    summary = run(cfg)
    summary["seconds"] = time.perf_counter() - t0
    if not quiet:
        print(
            f"      {name}: {summary['step']} steps in {summary['seconds']:.0f}s, "
            f"test macro-F1 {100 * summary['test/best/f1']:.2f} (best dev epoch "
            f"{summary['best_epoch']})"
        )
    return summary


@dataclass(frozen=True)
class Pretrained:
    """What every student of one data family starts from."""

    fundus_init: Path  # fundus backbone and projection aligned on the pool
    teacher: Path  # the OCT teacher's inference export
    summaries: dict[str, dict]  # align-oct, align-fundus, teacher


def pretrain(
    out: Path,
    common: list[str],
    data: Data,
    quiet: bool = False,
    reuse: bool = False,
    teacher: tuple[str, ...] = TEACHER,
) -> Pretrained:
    """Align each modality to the concept bank on the pretraining pool (never on the students'
    images: the student's init knows the findings of other eyes, not of its own training
    images), then train the OCT teacher from the OCT init on the data's OCT until dev F1 stops
    improving (``teacher``: its overrides). ``reuse``: the runs already under ``out``."""
    names = ("align-oct", "align-fundus", "teacher")
    if reuse:
        runs = {n: json.loads((out / n / "summary.json").read_text()) for n in names}
        return Pretrained(
            export_path(out / names[1], "best"), export_path(out / names[2], "best"), runs
        )
    runs = {}
    for modality in ("oct", "fundus"):
        name = f"align-{modality}"
        runs[name] = train_stage(
            f"concept alignment ({modality}, pool)",
            out / name,
            [
                "train.stage=align",
                f"align.modality={modality}",
                *common,
                f"data.shards={data.pool}",
            ],
            quiet,
        )
    teacher_init = export_path(out / "align-oct", "best")
    runs["teacher"] = train_stage(
        "teacher (OCT)",
        out / "teacher",
        ["train.stage=teacher", f"model.weights={teacher_init}", *common, *teacher],
        quiet,
    )
    return Pretrained(
        export_path(out / "align-fundus", "best"), export_path(out / "teacher", "best"), runs
    )


def student_overrides(arm: tuple[str, ...], pre: Pretrained, common: list[str]) -> list[str]:
    """The distill stage of an arm (its overrides, e.g. ``ARMS[name]``) from the aligned fundus
    init (the teacher where it reads one): every arm of one seed differs in these only."""
    over = ["train.stage=distill", f"model.weights={pre.fundus_init}", *arm, *common]
    if "loss.name=octcoda" in arm and not any(a.startswith("teacher.kind=") for a in arm):
        over.append(f"teacher.checkpoint={pre.teacher}")
    return over


def distill_diagnostics(run_dir: Path, batch_size: int) -> dict[str, float | None]:
    """How much distillation did in a run, from its metrics log: the mean of ``train/gate_open``
    (the share of steps the gate let distillation in) and of ``train/contrastive`` over the
    logged intervals, and the contrastive term's chance value, log(2B - 1): its value when
    every anchor's logits are equal (B fundus and B OCT anchors). None for a run without them."""
    from multieye_dist.track.records import read_metrics

    records = read_metrics(run_dir)

    def mean(key: str) -> float | None:
        values = [r[key] for r in records if key in r and math.isfinite(r[key])]
        return sum(values) / len(values) if values else None

    gate = mean("train/gate_open")
    return {
        "gate_open": gate,
        "contrastive": mean("train/contrastive"),
        "contrastive_chance": math.log(2 * batch_size - 1) if gate is not None else None,
    }


# The demo's students: arm -> run directory under --out.
DEMO_DIRS = {"fundus-only": "fundus-only", "OCT-CoDA": "octcoda", "oracle": "oracle"}
ONE_SEED = (
    "One seed shows the pipeline and the mechanism, not a gain: the paired F1 difference of two "
    "students varies by\n~3 points (sd) from seed to seed, concept AUC by ~0.5-1. Over 20 seeds "
    "in each of two data families (BENCHMARKS.md\n'Efficacy', benchmarks/efficacy.py) OCT-CoDA "
    "stayed within 1.5 F1 points of fundus-only and lowered concept AUC by\n1.2-2.4 points; "
    "the oracle raised concept AUC by 3-4.5 points and did not raise F1."
)


def _pct(value: float | None, width: int = 8) -> str:
    return f"{'-':>{width}}" if value is None else f"{100 * value:>{width}.2f}"


def comparison_table(rows: list[tuple[str, str, dict]]) -> str:
    """One line per run: test metrics of its best-dev checkpoint (%), the concept readout, and
    what distillation did (gate open share; contrastive term against its chance value)."""
    head = (
        f"{'model':<24}{'test on':<8}"
        + "".join(f"{h:>8}" for h in ("Acc", "F1", "AUC", "cAUC", "gate"))
        + f"{'contr./chance':>15}{'time':>7}"
    )
    lines = [head, "-" * len(head)]
    for name, modality, s in rows:
        cells = "".join(_pct(s.get(f"test/best/{k}")) for k in ("accuracy", "f1", "auc"))
        cells += _pct(s.get("test/best/concept_auc")) + _pct(s.get("gate_open"))
        con, chance = s.get("contrastive"), s.get("contrastive_chance")
        cells += f"{'-':>15}" if con is None else f"{f'{con:.2f} / {chance:.2f}':>15}"
        lines.append(f"{name:<24}{modality:<8}{cells}{s['seconds']:>6.0f}s")
    return "\n".join(lines)


def paired_difference(a: dict, b: dict, name: str) -> str:
    """``a - b`` in points on test accuracy, F1, AUC and concept AUC (same seed, steps and
    fundus batches)."""
    keys = ("accuracy", "f1", "auc", "concept_auc")
    cells = ""
    for k in keys:
        x, y = a.get(f"test/best/{k}"), b.get(f"test/best/{k}")
        cells += f"{'-':>8}" if x is None or y is None else f"{100 * (x - y):>+8.2f}"
    return f"{name:<24}{'fundus':<8}{cells}"


def run_demo(
    out: Path,
    *,
    per_class: int,
    image_size: int,
    seed: int,
    workers: int,
    extra: list[str],
    fundus_per_class: int | None = None,
    fundus_visibility: float | None = None,
    pool_per_class: int | None = None,
) -> int:
    t0 = time.perf_counter()
    out = Path(out)
    data = make_data(
        out,
        per_class,
        image_size,
        seed,
        workers,
        fundus_per_class,
        fundus_visibility,
        pool_per_class,
    )
    common = [
        f"data.shards={data.shards}",
        f"data.image_size={image_size}",
        f"train.seed={seed}",
        f"data.seed={seed}",
        "train.resume=never",
        *extra,
    ]
    print("[pretrain] concept alignment of OCT and fundus on the pool, then the OCT teacher")
    pre = pretrain(out, common, data, teacher=(*TEACHER, *extra))  # the user's overrides win
    rows = [("teacher (OCT)", "OCT", pre.summaries["teacher"])]
    print("[students] fundus, same seed, steps and fundus batches; the oracle is the control")
    students = {}
    for arm in DEMO_ARMS:
        run_dir = out / DEMO_DIRS[arm]
        summary = train_stage(arm, run_dir, student_overrides(ARMS[arm], pre, common))
        batch = load_config(run_dir / CONFIG_FILE).data.batch_size
        students[arm] = {**summary, **distill_diagnostics(run_dir, batch)}
        rows.append((arm if arm != "oracle" else "oracle teacher", "fundus", students[arm]))
    table = comparison_table(rows)
    diffs = [
        paired_difference(students[a], students["fundus-only"], f"{a} - fundus-only")
        for a in ("OCT-CoDA", "oracle")
    ]
    text = "\n".join([table, "paired differences (points):", *diffs])
    write_text(out / "comparison.txt", text + "\n")
    write_text(out / "comparison.json", json.dumps({n: s for n, _, s in rows}, indent=1))
    print(
        "\nTest split, best dev macro-F1 checkpoint of each run (%; cAUC: concept AUC, the "
        "student's concept similarities against\nthe images' true findings; gate: share of "
        "steps with distillation on):\n" + text
    )
    print(ONE_SEED)
    print("\n[explain] one fundus test image with the OCT-CoDA student")
    _explain_one(out, export_path(out / "octcoda", "best"))
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f}s; everything is under {out}/")
    return 0


def _explain_one(out: Path, checkpoint: Path) -> None:
    from multieye_dist.data.layout import read_split
    from multieye_dist.model.checkpoint import load_inference
    from multieye_dist.model.explain import explain_images

    model, meta = load_inference(checkpoint)
    sample = read_split(out / "raw", "fundus", "test", seen={})[0][0]
    path, label = sample.path, sample.label
    result = explain_images(
        model,
        [path],
        class_names=meta["class_names"],
        sentences=meta["concept_sentences"],
        image_size=meta["image_size"],
        topk=5,
    )[0]
    print(
        f"(true class: {meta['class_names'][label]}; the same with: multieye-dist explain "
        f"--checkpoint {checkpoint} {path})"
    )
    print(result.text())
