"""The efficacy study: does OCT knowledge reach the fundus student, and does it help?

For each label setting (``scarce``: few fundus train labels per class; ``full``: as many as
OCT), on the synthetic MultiEYE with latent findings (multieye_dist/data/synth.py):

1. the data, the concept alignment of each modality and the OCT teacher, once (seed 0);
2. for every seed, every arm, from the same aligned fundus init, with the same seed and so the
   same fundus batches (partners have their own generator) and the same steps:
   fundus-only, OCT-CoDA (paper), OCT-CoDA (official), gate-never (OCT-CoDA whose gate never
   opens: everything computed, nothing of distillation trained) and permuted teacher (each
   fundus class paired with another class's OCT, relabelled: a teacher as confident as the real
   one about the wrong class);
3. a table of test macro-F1 (best dev checkpoint) per arm, mean +- sd over seeds, and the paired
   difference to fundus-only (same seed) with its 95% t-interval.

Nothing is tuned to the answer: the arms share every setting but the one that defines them.

    python benchmarks/efficacy.py                      # 5 seeds x 5 arms x 2 settings, 2 jobs
    python benchmarks/efficacy.py --seeds 3 --settings scarce --arms fundus-only,OCT-CoDA \
        loss.distill_warmup_steps=32                   # any override, for every run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from multieye_dist.atomic import write_text  # noqa: E402
from multieye_dist.demo import ARMS, make_data, pretrain, student_overrides  # noqa: E402

# Two-sided 95% Student t quantiles by degrees of freedom.
T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    15: 2.131,
    20: 2.086,
    30: 2.042,
}


def t975(df: int) -> float:
    return T975.get(df) or T975[max(k for k in T975 if k <= df)]


def _student(task: tuple[str, str, list[str], bool]) -> dict:
    """One student run in a worker process (one thread: two runs share the two cores). With
    ``resume``, a run whose summary is already there is read, not repeated. Only
    its summary, metrics and evaluations are kept: its checkpoints and exports (~300 MB a run
    at 64 px) are deleted, as the study reads nothing else."""
    import logging
    import shutil

    import torch

    name, out_dir, overrides, resume = task
    done = Path(out_dir) / "summary.json"
    if resume and done.is_file() and "test/best/f1" in (summary := json.loads(done.read_text())):
        return summary
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    from multieye_dist.demo import train_stage

    summary = train_stage(name, Path(out_dir), overrides, quiet=True)
    shutil.rmtree(Path(out_dir) / "checkpoints", ignore_errors=True)
    for export in ("best", "last"):
        (Path(out_dir) / f"{export}.safetensors").unlink(missing_ok=True)
    return summary


def interval(diffs: list[float]) -> tuple[float, float, float]:
    m = statistics.fmean(diffs)
    if len(diffs) < 2:
        return m, math.nan, math.nan
    half = t975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return m, m - half, m + half


def table(results: dict, settings: list[str], arms: list[str], seeds: list[int]) -> str:
    head = (
        f"| setting | arm | test macro-F1 (mean +- sd, n={len(seeds)}) | "
        "paired diff. to fundus-only | 95% interval |"
    )
    lines = [head, "|---|---|---|---|---|"]
    for setting in settings:
        base = [results[setting]["fundus-only"][s] for s in seeds]
        for arm in arms:
            f1 = [100 * results[setting][arm][s] for s in seeds]
            sd = statistics.stdev(f1) if len(f1) > 1 else math.nan
            cells = [setting, arm, f"{statistics.fmean(f1):.2f} +- {sd:.2f}"]
            if arm == "fundus-only" or "fundus-only" not in arms:
                cells += ["", ""]
            else:
                d = [100 * (results[setting][arm][s] - b) for s, b in zip(seeds, base, strict=True)]
                m, lo, hi = interval(d)
                cells += [f"{m:+.2f}", f"[{lo:+.2f}, {hi:+.2f}]"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/efficacy"))
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    p.add_argument("--settings", default="scarce,full")
    p.add_argument("--arms", default=",".join(ARMS), help=f"of {', '.join(ARMS)}")
    p.add_argument("--per-class", type=int, default=100, help="OCT (and full fundus) per class")
    p.add_argument("--scarce", type=int, default=30, help="fundus train labels per class, scarce")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--jobs", type=int, default=2, help="student runs at once (1 thread each)")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=OVERRIDE[,OVERRIDE]",
        help="an extra arm 'OCT-CoDA NAME': OCT-CoDA with these overrides (repeatable), e.g. "
        "--option norm=model.level2_norm=true",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="finish an interrupted study: reuse its pre-training and every student run that "
        "completed (run the same command again)",
    )
    p.add_argument(
        "--reuse-pretrained",
        action="store_true",
        help="keep a setting's data, alignment and teacher from an earlier run under --out "
        "(studies of student options); default: made anew",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides for every run")
    args = p.parse_args(argv)
    settings = args.settings.split(",")
    arms = args.arms.split(",")
    arm_overrides = dict(ARMS)
    for text in args.option:
        name, eq, over = text.partition("=")
        if not (eq and name and over):
            p.error(f"--option {text!r}: expected NAME=OVERRIDE[,OVERRIDE]")
        arm_overrides[f"OCT-CoDA {name}"] = (*ARMS["OCT-CoDA"], *over.split(","))
        arms.append(f"OCT-CoDA {name}")
    unknown = [a for a in arms if a not in arm_overrides] + [
        s for s in settings if s not in ("scarce", "full")
    ]
    if unknown:
        p.error(f"unknown arm or setting {unknown}: arms {list(ARMS)}, settings scarce, full")
    seeds = list(range(args.seeds))
    t0 = time.perf_counter()
    os.environ.setdefault("WANDB_SILENT", "true")
    from multieye_dist.data.workers import process_pool

    results: dict = {}
    for setting in settings:
        out = args.out / setting
        fundus = args.scarce if setting == "scarce" else None
        reuse = (args.reuse_pretrained or args.resume) and (
            out / "teacher" / "best.safetensors"
        ).is_file()
        if reuse:
            shards = out / "shards"
        else:
            shards = make_data(out, args.per_class, args.image_size, 0, 0, fundus_per_class=fundus)
        common = [
            f"data.shards={shards}",
            f"data.image_size={args.image_size}",
            "train.resume=never",
            "train.progress=false",
            "tracking.backend=local",
            *args.overrides,
        ]
        pre = pretrain(out, [*common, "train.seed=0", "data.seed=0"], reuse=reuse)
        tasks, keys = [], []
        for seed in seeds:
            for arm in arms:
                seeded = [*common, f"train.seed={seed}", f"data.seed={seed}"]
                run_dir = out / "students" / f"{arm.replace(' ', '-')}-seed{seed}"
                tasks.append(
                    (
                        arm,
                        str(run_dir),
                        student_overrides(arm_overrides[arm], pre, seeded),
                        args.resume,
                    )
                )
                keys.append((arm, seed))
        print(f"[{setting}] {len(tasks)} student runs, {args.jobs} at a time")
        with process_pool(args.jobs) as pool:
            summaries = list(pool.map(_student, tasks))
        results[setting] = {arm: {} for arm in arms}
        for (arm, seed), s in zip(keys, summaries, strict=True):
            results[setting][arm][seed] = s["test/best/f1"]
        results[setting]["teacher_f1"] = pre.summaries["teacher"]["test/best/f1"]
        print(
            f"[{setting}] done at {time.perf_counter() - t0:.0f}s; teacher (OCT) test "
            f"macro-F1 {100 * results[setting]['teacher_f1']:.2f}"
        )
    text = table(results, settings, arms, seeds)
    minutes = (time.perf_counter() - t0) / 60
    write_text(
        args.out / "efficacy.json",
        json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1
        ),
    )
    write_text(args.out / "efficacy.md", text + "\n")
    print(f"\n{text}\n\n({minutes:.1f} min; {args.out / 'efficacy.json'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
