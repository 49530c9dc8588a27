"""The main job on the embedded default: synthetic MultiEYE -> shards -> teacher -> two students
(fundus-only and OCT-CoDA, same seed and steps) -> comparison table -> one explanation.

Runs in one process (a world of one, CPU), each stage through the same :func:`train.run` that
the cluster runs. Outputs under ``--out`` (default ``runs/demo``).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from multieye_dist.atomic import write_text
from multieye_dist.config import load_config

logger = logging.getLogger(__name__)

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"

STUDENTS = (("fundus-only", "fundus-only"), ("OCT-CoDA", "octcoda"))


def make_data(out: Path, per_class: int, image_size: int, seed: int, workers: int) -> Path:
    from multieye_dist.data.preprocess import Preprocess
    from multieye_dist.data.shards import ConvertOptions, convert
    from multieye_dist.data.synth import SynthOptions, generate
    from multieye_dist.data.verify import verify
    from multieye_dist.data.workers import resolve_workers

    raw, shard_dir = out / "raw", out / "shards"
    print(f"[1/5] synthetic MultiEYE ({per_class} train images per class) -> {raw}")
    generate(
        raw,
        SynthOptions(
            per_class=per_class, seed=seed, image_size=image_size, workers=resolve_workers(workers)
        ),
    )
    print(f"[2/5] shards -> {shard_dir}")
    opts = ConvertOptions(
        shard_samples=200, workers=workers, preprocess=Preprocess(image_size=image_size)
    )
    convert(raw, shard_dir, opts, progress=False)
    report = verify(shard_dir, workers=resolve_workers(workers))
    if not report.ok:
        raise RuntimeError(f"demo shards failed verification:\n{report.text()}")
    print(f"      verified: {report.text().splitlines()[-1]}")
    return shard_dir


def train_stage(name: str, out_dir: Path, overrides: list[str]) -> dict:
    from multieye_dist.train import run

    shutil.rmtree(out_dir, ignore_errors=True)  # the demo's own previous output
    cfg = load_config(DEMO_CONFIG, [f"train.out_dir={out_dir}", *overrides])
    t0 = time.perf_counter()
    summary = run(cfg)
    summary["seconds"] = time.perf_counter() - t0
    print(
        f"      {name}: {summary['step']} steps in {summary['seconds']:.0f}s, "
        f"test macro-F1 {100 * summary['test/best/f1']:.2f} (best dev epoch "
        f"{summary['best_epoch']})"
    )
    return summary


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
            for k in ("accuracy", "f1", "auc", "map", "kappa")
        )
        lines.append(f"{name:<22}{modality:<9}{cells}{s['seconds']:>6.0f}s")
    return "\n".join(lines)


def run_demo(
    out: Path, *, per_class: int, image_size: int, seed: int, workers: int, extra: list[str]
) -> int:
    t0 = time.perf_counter()
    out = Path(out)
    shard_dir = make_data(out, per_class, image_size, seed, workers)
    common = [
        f"data.shards={shard_dir}",
        f"data.image_size={image_size}",
        f"train.seed={seed}",
        f"data.seed={seed}",
        "train.resume=never",
        *extra,
    ]
    print("[3/5] teacher: OCT, cross-entropy")
    teacher = train_stage("teacher", out / "teacher", ["train.stage=teacher", *common])
    rows = [("teacher (OCT)", "OCT", teacher)]
    print("[4/5] students: fundus, same seed and steps")
    for name, loss in STUDENTS:
        overrides = ["train.stage=distill", f"loss.name={loss}", *common]
        if loss == "octcoda":
            overrides.append(f"teacher.checkpoint={out / 'teacher' / 'best.safetensors'}")
        rows.append((name, "fundus", train_stage(name, out / loss, overrides)))
    table = comparison_table(rows)
    write_text(out / "comparison.txt", table + "\n")
    write_text(out / "comparison.json", json.dumps({n: s for n, _, s in rows}, indent=1))
    print("\nTest split, best dev macro-F1 checkpoint of each run (%):\n" + table)
    print("\n[5/5] explain one fundus test image with the OCT-CoDA student")
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
