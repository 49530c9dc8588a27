#!/usr/bin/env python
"""Run a W&B sweep as ONE Slurm job array: every array task is one run on its own allocation.

    python launch/sweep.py --sweep configs/sweeps/distill.yaml --count 16 --gpus-per-node 8 \
        --partition gpu teacher.checkpoint=runs/teacher/best.safetensors
    python launch/sweep.py --summary runs/sweeps/distill        # the runs, best first

--mode offline (default; no account, or no network on the compute nodes): grid and random
sweeps are expanded here, deterministically (--seed), every run's config is checked, and the
array is submitted with each task's overrides; runs log offline (`wandb sync` later).
--mode online: the sweep is created on the W&B server and each array task runs one agent step
(any method, bayes included); a task's ranks share the run the agent hands to rank 0.
Nothing is submitted unless every run resolves; the array is one sbatch (all or nothing).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_slurm_options, slurm_options  # noqa: E402

from multieye_dist import sweeps  # noqa: E402
from multieye_dist.atomic import write_text  # noqa: E402
from multieye_dist.cluster import (  # noqa: E402
    AgentTask,
    SubmissionError,
    TrainTask,
    make_executor,
    submit_array,
)
from multieye_dist.config import load_config  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sweep", type=Path, help="W&B sweep file (YAML)")
    p.add_argument("--summary", type=Path, metavar="SWEEP_DIR", help="list a sweep's runs")
    p.add_argument(
        "--config",
        type=Path,
        default=Path("configs/distill.yaml"),
        help="base config every run starts from",
    )
    p.add_argument("--count", type=int, help="runs (random: required; grid: at most)")
    p.add_argument("--mode", choices=("offline", "online"), default="offline")
    p.add_argument("--seed", type=int, default=0, help="offline random sweeps")
    p.add_argument("--out", type=Path, help="sweep directory (default runs/sweeps/<file stem>)")
    add_slurm_options(p)
    p.add_argument("overrides", nargs="*", help="dotted overrides for every run")
    return p.parse_args(argv)


def plan(args: argparse.Namespace) -> tuple[dict, Path, list[dict]]:
    """The sweep spec, its directory and (offline) the checked runs; raises on bad input."""
    spec = sweeps.load_sweep(args.sweep)
    if not args.config.is_file():
        raise sweeps.SweepError(f"--config {args.config}: no such file")
    load_config(args.config, args.overrides)  # the base itself must resolve
    out = (args.out or Path("runs/sweeps") / args.sweep.stem).resolve()
    runs: list[dict] = []
    if args.mode == "offline":
        for i, params in enumerate(sweeps.expand(spec, args.count, args.seed)):
            name = f"run-{i:03d}"
            runs.append({"name": name, "params": params, "out_dir": str(out / "runs" / name)})
        sweeps.check_runs(args.config, args.overrides, [r["params"] for r in runs])
    elif not args.count:
        raise sweeps.SweepError("--count: how many agent runs (array tasks) to submit")
    return spec, out, runs


def submit(args: argparse.Namespace) -> int:
    try:
        spec, out, runs = plan(args)
        opts = slurm_options(args, job_name=f"sweep-{args.sweep.stem}")
    except (ValueError, FileNotFoundError) as exc:  # SweepError, ConfigError are ValueErrors
        print(f"sweep: error: {exc}", file=sys.stderr)
        return 2
    manifest = {
        "name": args.sweep.stem,
        "method": spec["method"],
        "metric": spec["metric"],
        "mode": args.mode,
        "config": str(args.config.resolve()),
        "overrides": args.overrides,
        "runs": runs,
    }
    cfg = str(args.config.resolve())
    if args.mode == "offline":
        tasks = [
            TrainTask(
                cfg,
                [
                    *args.overrides,
                    *sweeps.overrides_for(r["params"]),
                    f"train.out_dir={r['out_dir']}",
                    f"wandb.run_name={r['name']}",
                    f"wandb.tags={json.dumps([args.sweep.stem])}",
                ],
                args.max_requeues,
            )
            for r in runs
        ]
    else:
        from multieye_dist.tracking import create_sweep

        base = load_config(args.config, args.overrides)
        manifest["sweep_id"] = create_sweep(spec, base.wandb)
        tasks = [
            AgentTask(manifest["sweep_id"], cfg, args.overrides, str(out), args.max_requeues)
            for _ in range(args.count)
        ]
    executor = make_executor(out / "slurm", "local" if args.local else "slurm", opts)
    try:
        jobs = submit_array(executor, tasks)
    except SubmissionError as exc:
        print(f"sweep: the scheduler refused the array: {exc}", file=sys.stderr)
        return 2
    manifest["job_ids"] = [j.job_id for j in jobs]
    write_text(out / "sweep.json", json.dumps(manifest, indent=1))
    print(
        f"submitted {len(jobs)} run(s) of sweep {args.sweep.stem} ({args.mode}) as array "
        f"{jobs[0].job_id.split('_')[0]}; directory {out}; logs in {out / 'slurm'}"
    )
    if args.wait:
        failed = 0
        for job in jobs:
            try:
                job.results()
            except Exception as exc:  # one failed run does not hide the others
                failed += 1
                print(f"sweep: task {job.job_id} failed: {exc}", file=sys.stderr)
        print(sweeps.format_summary(*sweeps.summarize(out)))
        return 1 if failed else 0
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summary:
        try:
            print(sweeps.format_summary(*sweeps.summarize(args.summary)))
        except FileNotFoundError as exc:
            print(f"sweep: error: {exc}", file=sys.stderr)
            return 2
        return 0
    if not args.sweep:
        print("sweep: error: give --sweep FILE (or --summary SWEEP_DIR)", file=sys.stderr)
        return 2
    return submit(args)


if __name__ == "__main__":
    sys.exit(main())
