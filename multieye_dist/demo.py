"""The main job on the embedded default: synthetic MultiEYE with latent findings -> shards ->
concept alignment of each modality -> OCT teacher -> two fundus students (fundus-only and
OCT-CoDA, same seed, steps and fundus batches) -> comparison with their paired difference -> one
explanation.

Every stage goes through the same :func:`multieye_dist.train.run` that the cluster runs (a world
of one, CPU). The pieces (:func:`make_data`, :func:`pretrain`, :func:`train_student`, ``ARMS``)
are also what ``benchmarks/efficacy.py`` runs, over seeds, arms and label budgets. Outputs under
``--out`` (default ``runs/demo``).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from multieye_dist.atomic import write_text
from multieye_dist.config import load_config
from multieye_dist.resources import packaged

logger = logging.getLogger(__name__)

DEMO_CONFIG = packaged("configs/demo.yaml")  # package data: the demo runs from any install

# The student arms a study can run: name -> overrides of the distill stage. The controls are
# OCT-CoDA with the teacher's knowledge removed (gate-never) or scrambled across classes.
ARMS: dict[str, tuple[str, ...]] = {
    "fundus-only": ("loss.name=fundus-only",),
    "OCT-CoDA": ("loss.name=octcoda", "loss.variant=paper"),
    "OCT-CoDA official": ("loss.name=octcoda", "loss.variant=official"),
    "gate-never": ("loss.name=octcoda", "loss.control=gate-never"),
    "permuted teacher": ("loss.name=octcoda", "loss.control=permuted-teacher"),
}
DEMO_ARMS = ("fundus-only", "OCT-CoDA")
# The fundus findings at 3x their calibrated opacity: at 1x a 128-step CPU run learns nothing
# from fundus (align probe F1 10.6, students at chance); at 3x it does (21.3; students ~26).
DEMO_VISIBILITY = 3.0
METRICS = ("accuracy", "f1", "auc", "map", "kappa")


def make_data(
    out: Path,
    per_class: int,
    image_size: int,
    seed: int,
    workers: int,
    fundus_per_class: int | None = None,
    fundus_visibility: float | None = None,
) -> Path:
    """Synthetic MultiEYE under ``out/raw``, converted and verified under ``out/shards``."""
    from multieye_dist.data.preprocess import Preprocess
    from multieye_dist.data.shards import ConvertOptions, convert
    from multieye_dist.data.synth import SynthOptions, generate
    from multieye_dist.data.verify import verify
    from multieye_dist.data.workers import resolve_workers

    raw, shard_dir = out / "raw", out / "shards"
    fundus = per_class if fundus_per_class is None else fundus_per_class
    print(f"[data] synthetic MultiEYE ({fundus} fundus, {per_class} OCT per class) -> {raw}")
    opts = SynthOptions(
        per_class=per_class,
        fundus_per_class=fundus_per_class,
        seed=seed,
        image_size=image_size,
        workers=resolve_workers(workers),
        fundus_visibility=DEMO_VISIBILITY if fundus_visibility is None else fundus_visibility,
    )
    generate(raw, opts)
    pp = Preprocess(image_size=image_size)
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


def train_stage(name: str, out_dir: Path, overrides: list[str], quiet: bool = False) -> dict:
    """One training run of the demo config (its previous output removed first)."""
    from multieye_dist.train import run

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
    """What every student of one data setting starts from."""

    fundus_init: Path  # concept-aligned fundus backbone and projection
    teacher: Path  # the OCT teacher's inference export
    summaries: dict[str, dict]  # align-oct, align-fundus, teacher


def pretrain(out: Path, common: list[str], quiet: bool = False, reuse: bool = False) -> Pretrained:
    """Align each modality to the concept bank, then train the OCT teacher from its init.
    ``reuse``: take the runs already under ``out`` (their summaries) instead."""
    names = ("align-oct", "align-fundus", "teacher")
    if reuse:
        runs = {n: json.loads((out / n / "summary.json").read_text()) for n in names}
        return Pretrained(
            out / names[1] / "best.safetensors", out / names[2] / "best.safetensors", runs
        )
    runs = {}
    for modality in ("oct", "fundus"):
        name = f"align-{modality}"
        runs[name] = train_stage(
            f"concept alignment ({modality})",
            out / name,
            ["train.stage=align", f"align.modality={modality}", *common],
            quiet,
        )
    teacher_init = out / "align-oct" / "best.safetensors"
    runs["teacher"] = train_stage(
        "teacher (OCT)",
        out / "teacher",
        ["train.stage=teacher", f"model.weights={teacher_init}", *common],
        quiet,
    )
    return Pretrained(
        out / "align-fundus" / "best.safetensors", out / "teacher" / "best.safetensors", runs
    )


def student_overrides(arm: tuple[str, ...], pre: Pretrained, common: list[str]) -> list[str]:
    """The distill stage of an arm (its overrides, e.g. ``ARMS[name]``) from the aligned fundus
    init (the teacher where it reads one): every arm of one seed differs in these only."""
    over = ["train.stage=distill", f"model.weights={pre.fundus_init}", *arm, *common]
    if "loss.name=octcoda" in arm:
        over.append(f"teacher.checkpoint={pre.teacher}")
    return over


def comparison_table(rows: list[tuple[str, str, dict]]) -> str:
    head = (
        f"{'model':<22}{'test on':<9}"
        + "".join(f"{h:>9}" for h in ("Acc", "F1", "AUC", "mAP", "Kappa"))
        + f"{'time':>7}"
    )
    lines = [head, "-" * len(head)]
    for name, modality, s in rows:
        cells = "".join(
            f"{100 * s[f'test/best/{k}']:>9.2f}"
            if s.get(f"test/best/{k}") is not None
            else f"{'n/a':>9}"
            for k in METRICS
        )
        lines.append(f"{name:<22}{modality:<9}{cells}{s['seconds']:>6.0f}s")
    return "\n".join(lines)


def paired_difference(a: dict, b: dict) -> str:
    """``a - b`` on every test metric (same seed, steps and fundus batches)."""
    cells = "".join(f"{100 * (a[f'test/best/{k}'] - b[f'test/best/{k}']):>+9.2f}" for k in METRICS)
    return f"{'OCT-CoDA - fundus-only':<22} {'fundus':<8}{cells}"


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
) -> int:
    t0 = time.perf_counter()
    out = Path(out)
    shard_dir = make_data(
        out, per_class, image_size, seed, workers, fundus_per_class, fundus_visibility
    )
    common = [
        f"data.shards={shard_dir}",
        f"data.image_size={image_size}",
        f"train.seed={seed}",
        f"data.seed={seed}",
        "train.resume=never",
        *extra,
    ]
    print("[pretrain] concept alignment of OCT and fundus, then the OCT teacher")
    pre = pretrain(out, common)
    rows = [("teacher (OCT)", "OCT", pre.summaries["teacher"])]
    print("[students] fundus, same seed, steps and fundus batches")
    students = {}
    for arm in DEMO_ARMS:
        key = ARMS[arm][0].split("=")[1]
        students[arm] = train_stage(arm, out / key, student_overrides(ARMS[arm], pre, common))
        rows.append((arm, "fundus", students[arm]))
    table = comparison_table(rows)
    diff = paired_difference(students["OCT-CoDA"], students["fundus-only"])
    write_text(out / "comparison.txt", table + "\n" + diff + "\n")
    write_text(out / "comparison.json", json.dumps({n: s for n, _, s in rows}, indent=1))
    print("\nTest split, best dev macro-F1 checkpoint of each run (%):\n" + table)
    print("paired difference (points; one seed: see benchmarks/efficacy.py for intervals)")
    print(diff)
    print("\n[explain] one fundus test image with the OCT-CoDA student")
    _explain_one(out, out / "octcoda" / "best.safetensors")
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f}s; everything is under {out}/")
    return 0


def _explain_one(out: Path, checkpoint: Path) -> None:
    from multieye_dist.checkpoint import load_inference
    from multieye_dist.data.layout import read_split
    from multieye_dist.explain import explain_images

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
