"""The efficacy study: does the OCT teacher's knowledge reach the fundus student?

On the synthetic MultiEYE with latent findings (multieye_dist/data/synth.py), where the answer
can be checked: the findings are known for every image, so the student's concept similarities
can be scored against them (the concept readout, ``test/concept_auc``), and oracle teachers
(multieye_dist/model/oracle.py) can stand in for a perfect, a wrong and a meaningless teacher.

Factors (every combination asked for is run):

* ``--families``: data families. Each draws its own data, pretraining pool, concept alignment
  and teacher (synth seed = the family), so a result is not one teacher's.
* ``--banks``: the concept bank's size, 8 (one caption per finding) or 96 (12 paraphrases per
  finding), both MiniLM like the shipped banks. Each bank has its own alignment and teacher.
* ``--weights``: the distillation's weights, ``release`` (alpha 0.6, beta 0.05) or ``strong``
  (alpha 6, beta 5).
* ``--budgets``: fundus train labels per class. The OCT data (and so the teacher), dev and
  test are the same for every budget of a family.
* ``--arms``: students (multieye_dist.demo.ARMS); ``--seeds``: e.g. ``0-4`` or ``100-119``.

Per family and bank, once: the concept alignment of each modality on the family's pool (the
FLAIR stand-in; no student image is in it), then the OCT teacher from the OCT alignment,
trained until its dev macro-F1 stops improving. Per cell (family, bank, weights, budget), seed
and arm: one student from the fundus alignment; every arm of a seed sees the same fundus
batches and makes the same steps. Arms whose training does not read the weights (fundus-only,
gate-never) run once per seed and serve every weights level.

Reported per cell and arm: test macro-F1 and concept AUC of the best-dev checkpoint (mean +- sd
over seeds), the gate's open share and the contrastive term against its chance value; and the
paired contrasts (``--contrasts``: arm minus reference, same seed) with 95% t-intervals from
scipy. Nothing is tuned to the answer: the factors and the decision rule of a confirmatory run
are written in BENCHMARKS.md before it runs.

    python benchmarks/efficacy.py --out runs/efficacy/pilot --seeds 0-4       # (see BENCHMARKS)
    python benchmarks/efficacy.py ... --resume     # finish an interrupted study, same command
    python benchmarks/efficacy.py --smoke --out /tmp/e                       # the test's size
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from multieye_dist.core.atomic import write_text  # noqa: E402
from multieye_dist.demo import (  # noqa: E402
    ARMS,
    Data,
    Pretrained,
    distill_diagnostics,
    make_pool,
    make_students_data,
    pretrain,
    student_overrides,
)
from multieye_dist.track.records import CHECKPOINTS_DIR, CONFIG_FILE, export_path  # noqa: E402

BANKS = {
    "8": "configs/concepts/synth-findings-minilm.safetensors",
    "96": "configs/concepts/synth-paraphrases-minilm.safetensors",
}
WEIGHTS = {
    "release": ("loss.alpha=0.6", "loss.beta=0.05"),
    "strong": ("loss.alpha=6", "loss.beta=5"),
}
WEIGHTLESS = ("fundus-only", "gate-never")  # their training never reads alpha and beta
DEFAULT_CONTRASTS = (
    "oracle:fundus-only",
    "oracle:oracle-permuted",
    "oracle:oracle-shuffled",
    "oracle-class:fundus-only",
    "OCT-CoDA:fundus-only",
    "OCT-CoDA:permuted teacher",
    "OCT-CoDA gate-open:fundus-only",
    "oracle gate-open:fundus-only",
    "gate-never:fundus-only",
)
METRICS = {"f1": "test/best/f1", "cauc": "test/best/concept_auc"}
# The smoke size (the test): tiny model, few steps, two seeds.
SMOKE = [
    "model.backbone=test_resnet",
    "data.samples_per_epoch=64",
    "train.epochs=2",
    "data.batch_size=8",
    "train.plots=false",  # pictures cost seconds per run and the smoke reads none
]


@dataclass(frozen=True)
class Cell:
    family: int
    bank: str
    weights: str
    budget: int

    def name(self) -> str:
        return f"fam{self.family}/K{self.bank}/{self.weights}/b{self.budget}"


def student_dir(out: Path, cell: Cell, arm: str, seed: int) -> Path:
    """A student's run directory; arms that do not read the weights share one per seed."""
    level = "any" if arm in WEIGHTLESS else cell.weights
    where = out / f"fam{cell.family}" / f"K{cell.bank}" / f"b{cell.budget}" / level
    return where / f"{arm.replace(' ', '-')}-seed{seed}"


def parse_seeds(text: str) -> list[int]:
    """``0-4,10,20-21`` -> [0, 1, 2, 3, 4, 10, 20, 21]."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, dash, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
    return seeds


def _student(task: tuple[str, str, list[str], bool]) -> dict:
    """One student run in a worker process (one thread: runs share the cores). With
    ``resume``, a run whose summary is already there is read, not repeated. Only its summary,
    metrics and evaluations are kept (checkpoints and exports deleted: the study reads
    nothing else)."""
    import logging
    import shutil

    import torch

    name, out_dir, overrides, resume = task
    run = Path(out_dir)
    done = run / "result.json"
    if resume and done.is_file():
        return json.loads(done.read_text())
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    from multieye_dist.config import load_config
    from multieye_dist.demo import train_stage

    summary = train_stage(name, run, overrides, quiet=True)
    batch = load_config(run / CONFIG_FILE).data.batch_size
    result = {**summary, **distill_diagnostics(run, batch)}
    shutil.rmtree(run / CHECKPOINTS_DIR, ignore_errors=True)
    for export in ("best", "last"):
        export_path(run, export).unlink(missing_ok=True)
    write_text(done, json.dumps(result, indent=1))
    return result


def _pretrain(task: tuple) -> dict:
    """Alignment of both modalities and the teacher of one (family, bank), in a worker."""
    import logging

    import torch

    out, common, data, reuse, teacher = task
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    pre = pretrain(Path(out), common, data, quiet=True, reuse=reuse, teacher=teacher)
    return {"init": str(pre.fundus_init), "teacher_path": str(pre.teacher), **pre.summaries}


def interval(diffs: list[float]) -> tuple[float, float, float]:
    """Mean and two-sided 95% t-interval (scipy) of paired differences."""
    from scipy import stats

    m = statistics.fmean(diffs)
    if len(diffs) < 2:
        return m, math.nan, math.nan
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    if se == 0:
        return m, m, m
    lo, hi = stats.t.interval(0.95, len(diffs) - 1, loc=m, scale=se)
    return m, float(lo), float(hi)


def seeds_for_power(sd: float, effect: float, power: float = 0.8, alpha: float = 0.05) -> int:
    """Seeds a paired two-sided t-test needs to detect a mean difference ``effect`` with
    probability ``power``, when the paired differences have standard deviation ``sd`` (the
    noncentral t distribution, scipy)."""
    from scipy import stats

    if sd <= 0:
        return 2
    for n in range(2, 10_000):
        crit = stats.t.ppf(1 - alpha / 2, n - 1)
        nc = effect / (sd / math.sqrt(n))
        if stats.nct.sf(crit, n - 1, nc) + stats.nct.cdf(-crit, n - 1, nc) >= power:
            return n
    return 10_000


def _pm(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else math.nan
    return f"{statistics.fmean(values):.2f} +- {sd:.2f}"


def _values(runs: dict, arm: str, seeds: list[int], key: str) -> list[float]:
    out = []
    for s in seeds:
        v = runs.get(arm, {}).get(str(s), {}).get(key)
        if v is not None:
            out.append(100 * v)
    return out


def arm_table(results: dict, cells: list[Cell], arms: list[str], seeds: list[int]) -> str:
    lines = [
        f"| cell | arm | test macro-F1 (n={len(seeds)}) | concept AUC | gate open | "
        "contrastive / chance |",
        "|---|---|---|---|---|---|",
    ]
    for cell in cells:
        runs = results[cell.name()]
        for arm in arms:
            f1 = _values(runs, arm, seeds, METRICS["f1"])
            cauc = _values(runs, arm, seeds, METRICS["cauc"])
            gate = _values(runs, arm, seeds, "gate_open")
            con = [
                r["contrastive"] / r["contrastive_chance"]
                for r in runs.get(arm, {}).values()
                if r.get("contrastive") is not None
            ]
            cells_ = [
                cell.name(),
                arm,
                _pm(f1),
                _pm(cauc),
                f"{statistics.fmean(gate):.0f}%" if gate else "-",
                f"{statistics.fmean(con):.3f}" if con else "-",
            ]
            lines.append("| " + " | ".join(cells_) + " |")
    return "\n".join(lines)


def contrast_table(
    results: dict,
    cells: list[Cell],
    contrasts: list[tuple[str, str]],
    seeds: list[int],
    effects: dict[str, float],
) -> tuple[str, dict]:
    """Paired contrasts (arm - reference, same seed) per cell and metric: mean, 95% interval,
    the differences' sd and the seeds needed for 80% power at ``effects[metric]`` points."""
    lines = [
        "| cell | contrast | metric | n | mean diff. (points) | 95% interval | sd | "
        "seeds for 80% power at " + ", ".join(f"{m} {e:g}" for m, e in effects.items()) + " |",
        "|---|---|---|---|---|---|---|---|",
    ]
    found: dict = {}
    for cell in cells:
        runs = results[cell.name()]
        for arm, ref in contrasts:
            if arm not in runs or ref not in runs:
                continue
            for metric, key in METRICS.items():
                pairs = [
                    (runs[arm][str(s)].get(key), runs[ref][str(s)].get(key))
                    for s in seeds
                    if str(s) in runs[arm] and str(s) in runs[ref]
                ]
                d = [100 * (a - b) for a, b in pairs if a is not None and b is not None]
                if not d:
                    continue
                m, lo, hi = interval(d)
                sd = statistics.stdev(d) if len(d) > 1 else math.nan
                need = seeds_for_power(sd, effects[metric]) if len(d) > 1 else None
                found[f"{cell.name()}|{arm} - {ref}|{metric}"] = {
                    "n": len(d), "mean": m, "lo": lo, "hi": hi, "sd": sd, "seeds_for_power": need,
                }  # fmt: skip
                lines.append(
                    f"| {cell.name()} | {arm} - {ref} | {metric} | {len(d)} | {m:+.2f} | "
                    f"[{lo:+.2f}, {hi:+.2f}] | {sd:.2f} | {need} |"
                )
    return "\n".join(lines), found


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/efficacy"))
    p.add_argument("--seeds", default="0-4", help="e.g. 0-4 or 100-119,200 (default 0-4)")
    p.add_argument("--families", default="0", help="data families (synth seeds), e.g. 0,1")
    p.add_argument("--banks", default="8", help=f"of {', '.join(BANKS)}")
    p.add_argument("--weights", default="release", help=f"of {', '.join(WEIGHTS)}")
    p.add_argument(
        "--budgets", default=None, help="fundus train labels per class, e.g. 10,30 (default 30)"
    )
    p.add_argument("--arms", default=",".join(ARMS), help=f"of {', '.join(ARMS)}")
    p.add_argument(
        "--contrasts",
        default=";".join(DEFAULT_CONTRASTS),
        help="ARM:REFERENCE pairs separated by ';' (those whose arms ran are reported)",
    )
    p.add_argument(
        "--effect",
        default="f1=2,cauc=1",
        help="the effect sizes (points) the power column is computed for (default f1=2,cauc=1)",
    )
    p.add_argument("--per-class", type=int, default=100, help="OCT train images per class")
    p.add_argument("--pool-per-class", type=int, default=100, help="pool images per class")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--jobs", type=int, default=2, help="runs at once (1 thread each)")
    p.add_argument(
        "--teacher",
        default="train.epochs=16,train.early_stop_evals=3",
        help="the teacher's overrides (comma-separated): trained until dev F1 stops improving",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="finish an interrupted study: reuse its data, pre-training and every finished run",
    )
    p.add_argument(
        "--report",
        default="efficacy",
        help="name of the tables written under --out: NAME.json and NAME.md (default efficacy); "
        "studies that share --out (and so, with --resume, their data and pre-training) keep "
        "their own",
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes (the test): 2 min on 2 cores")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every run")
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.smoke:
        args.per_class, args.pool_per_class, args.image_size = 6, 6, 32
        args.teacher = "train.epochs=3,train.early_stop_evals=1"
        args.overrides = [*SMOKE, *args.overrides]
        args.budgets = args.budgets or "3"
    seeds = parse_seeds(args.seeds)
    families = [int(f) for f in args.families.split(",")]
    banks, weights = args.banks.split(","), args.weights.split(",")
    budgets = [int(b) for b in (args.budgets or "30").split(",")]
    arms = args.arms.split(",")
    contrasts = [tuple(c.split(":", 1)) for c in args.contrasts.split(";") if c]
    bad = [a for a in arms if a not in ARMS] + [b for b in banks if b not in BANKS]
    bad += [w for w in weights if w not in WEIGHTS] + [c for c in contrasts if len(c) != 2]
    if bad:
        p.error(f"unknown {bad}: arms {list(ARMS)}, banks {list(BANKS)}, weights {list(WEIGHTS)}")
    t0 = time.perf_counter()
    os.environ.setdefault("WANDB_SILENT", "true")
    from multieye_dist.data.workers import process_pool

    common = [
        f"data.image_size={args.image_size}",
        "train.resume=never",
        "train.progress=false",
        "train.plots=false",
        "tracking.backend=local",
        *args.overrides,
    ]
    # Data: per family, the pool and one students' data per budget (the OCT side identical).
    data: dict[tuple[int, int], Data] = {}
    for fam in families:
        fam_dir = args.out / f"fam{fam}"
        ready = args.resume and (fam_dir / "pool" / "shards" / "fundus-train.manifest.json")
        pool = fam_dir / "pool" / "shards"
        if not (ready and ready.is_file()):
            pool = make_pool(fam_dir / "pool", args.pool_per_class, args.image_size, fam, 0)
        for b in budgets:
            where = fam_dir / f"data-b{b}"
            shards = where / "shards"
            if not (args.resume and (shards / "fundus-test.manifest.json").is_file()):
                shards = make_students_data(where, args.per_class, args.image_size, fam, 0, b)
            data[fam, b] = Data(shards, pool)
    # Pre-training per family and bank (the teacher reads the OCT of the first budget's data:
    # the same OCT for every budget), in parallel.
    tasks, keys = [], []
    for fam in families:
        for bank in banks:
            out = args.out / f"fam{fam}" / f"K{bank}"
            reuse = args.resume and (out / "teacher" / "summary.json").is_file()
            seeded = [*common, "train.seed=0", f"data.seed={fam}", f"concepts.bank={BANKS[bank]}"]
            d = data[fam, budgets[0]]
            pre_common = [f"data.shards={d.shards}", *seeded]
            tasks.append((str(out), pre_common, d, reuse, tuple(args.teacher.split(","))))
            keys.append((fam, bank))
    print(f"[pretrain] {len(tasks)} family x bank pre-trainings, {args.jobs} at a time")
    with process_pool(min(args.jobs, len(tasks))) as pool_:
        pre = dict(zip(keys, pool_.map(_pretrain, tasks), strict=True))
    for (fam, bank), p_ in pre.items():
        t = p_["teacher"]
        print(
            f"  fam{fam} K{bank}: teacher (OCT) test macro-F1 {100 * t['test/best/f1']:.2f}, "
            f"acc {100 * t['test/best/accuracy']:.2f} after {t.get('epochs')} epochs (best "
            f"{t['best_epoch']}); fundus alignment probe F1 "
            f"{100 * p_['align-fundus']['test/best/f1']:.2f}"
        )
    # Students.
    cells = [Cell(f, k, w, b) for f in families for k in banks for w in weights for b in budgets]
    tasks, keys = [], []
    for cell in cells:
        p_ = pre[cell.family, cell.bank]
        pretrained = Pretrained(Path(p_["init"]), Path(p_["teacher_path"]), {})
        for seed in seeds:
            for arm in arms:
                run_dir = student_dir(args.out, cell, arm, seed)
                key = (cell, arm, seed)
                keys.append(key)
                if any(str(t[1]) == str(run_dir) for t in tasks):
                    continue  # a weightless arm already queued by another weights level
                over = [
                    f"data.shards={data[cell.family, cell.budget].shards}",
                    *common,
                    f"concepts.bank={BANKS[cell.bank]}",
                    *WEIGHTS[cell.weights],
                    f"train.seed={seed}",
                    f"data.seed={seed}",
                ]
                tasks.append((arm, str(run_dir), student_overrides(ARMS[arm], pretrained, over),
                              args.resume))  # fmt: skip
    print(f"[students] {len(tasks)} runs, {args.jobs} at a time")
    with process_pool(args.jobs) as pool_:
        done = dict(zip((t[1] for t in tasks), pool_.map(_student, tasks), strict=True))
    results: dict = {c.name(): {} for c in cells}
    for cell, arm, seed in keys:
        r = done[str(student_dir(args.out, cell, arm, seed))]
        results[cell.name()].setdefault(arm, {})[str(seed)] = {
            k: r.get(k)
            for k in (*METRICS.values(), "gate_open", "contrastive", "contrastive_chance")
        }
    text = arm_table(results, cells, arms, seeds)
    effects = {k: float(v) for k, _, v in (e.partition("=") for e in args.effect.split(","))}
    ctext, found = contrast_table(results, cells, contrasts, seeds, effects)
    minutes = (time.perf_counter() - t0) / 60
    teachers = {
        f"fam{f}/K{k}": {
            n: {m: p_[n].get(m) for m in ("test/best/f1", "test/best/accuracy", "best_epoch")}
            for n in ("teacher", "align-fundus", "align-oct")
        }
        for (f, k), p_ in pre.items()
    }
    write_text(
        args.out / f"{args.report}.json",
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "pretraining": teachers,
                "results": results,
                "contrasts": found,
                "minutes": minutes,
            },
            indent=1,
        ),
    )
    write_text(args.out / f"{args.report}.md", text + "\n\n" + ctext + "\n")
    print(f"\n{text}\n\n{ctext}\n\n({minutes:.1f} min; {args.out / args.report}.json)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
