#!/usr/bin/env python
"""Convert a large MultiEYE root to shards as a Slurm job array, through submitit.

    python shards/convert_slurm.py --root /data/MultiEYE --out /scratch/multieye-shards \
        --tasks 32 --cpus-per-task 8 --partition cpu --time 120

Every array task takes a contiguous range of the shard plan and writes those shards atomically;
a final job (Slurm dependency afterok) checks every shard and writes the manifests. The layout is
validated before anything is submitted. Rerunning the same command redoes only missing or
damaged shards. `--cluster local` runs the same tasks as local subprocesses.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from multieye_dist.cli import add_convert_options, convert_options
from multieye_dist.cluster.submit import SlurmOptions, add_dependency, make_executor
from multieye_dist.data.layout import LayoutError
from multieye_dist.data.shards import (
    ConversionError,
    convert_range,
    finalize,
    make_plan,
    prepare_out,
    split_ranges,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_convert_options(p)
    p.add_argument("--tasks", type=int, default=16, help="array tasks (ranges of shards)")
    p.add_argument("--cluster", choices=("auto", "slurm", "local"), default="auto")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--constraint")
    p.add_argument("--time", type=int, default=60, help="minutes per task")
    p.add_argument("--cpus-per-task", type=int, default=4)
    p.add_argument("--mem", type=float, default=None, help="GB per task")
    p.add_argument("--logs", type=Path, default=None, help="submitit folder (default OUT/_slurm)")
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="Slurm: return after submitting (the manifest job runs by dependency)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        # Each task uses its own CPUs; the plan is validated here, before anything is submitted.
        options = replace(convert_options(args), workers=args.cpus_per_task)
        plan = make_plan(args.root, options)
    except (LayoutError, ValueError) as exc:
        print(f"convert_slurm: error: {exc}", file=sys.stderr)
        return 2
    prepare_out(args.out, plan)
    slurm = SlurmOptions(
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        constraint=args.constraint,
        time_min=args.time,
        cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem,
        job_name="multieye-convert",
    )
    cluster = None if args.cluster == "auto" else args.cluster
    ex = make_executor(args.logs or args.out / "_slurm", cluster, slurm)
    ranges = split_ranges(len(plan.tasks), args.tasks)
    n = len(ranges)
    jobs = ex.map_array(
        convert_range,
        [args.root] * n,
        [args.out] * n,
        [options] * n,
        [lo for lo, _ in ranges],
        [hi for _, hi in ranges],
    )
    print(f"submitted {n} conversion task(s): {', '.join(j.job_id for j in jobs)}")
    print(f"logs: {Path(jobs[0].paths.stdout).parent}")
    if ex.cluster == "slurm" and args.no_wait:
        add_dependency(ex, [jobs[0].job_id.split("_")[0]])
        final = ex.submit(finalize, args.root, args.out, options)
        print(f"manifest job {final.job_id} runs after the array succeeds")
        return 0
    try:
        done = sum(job.result() for job in jobs)
        summary = finalize(args.root, args.out, options)
    except (ConversionError, Exception) as exc:  # submitit re-raises task failures with logs
        print(f"convert_slurm: error: {exc}", file=sys.stderr)
        return 1
    print(f"{done} shard task(s) finished")
    print(summary.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
