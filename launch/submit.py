#!/usr/bin/env python
"""Submit a training run to Slurm through submitit: one task per GPU on N nodes.

    python launch/submit.py --config distill --nodes 2 --gpus-per-node 8 \
        --partition gpu --time 720 teacher.checkpoint=runs/teacher/best.safetensors

The config and overrides are resolved and checked here, as the trainer checks them (backbone,
teacher export, concept bank, batch geometry for the job's ranks, a resume's compatibility, no
live training in the run directory), before anything is submitted; once sbatch has accepted the
job, the resolved config goes to <train.out_dir>/config.yaml and submitit's logs to
<train.out_dir>/slurm/. A refusal (ours or sbatch's: exit status 2) writes nothing there.
Ranks meet through the Slurm environment (multieye_dist/cluster/submit.py). On Slurm's warning
signal before a time limit or preemption, every rank saves a checkpoint at the same step and the job
is requeued (at most --max-requeues times); it resumes from that checkpoint in the same W&B run.
`--local` runs the same job through submitit's local executor.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_slurm_options, check_run, slurm_options, undone_if_refused  # noqa: E402

from multieye_dist.cluster.submit import SubmissionError, TrainTask, make_executor, submit  # noqa: E402
from multieye_dist.config import ConfigError, load_config, save_resolved  # noqa: E402
from multieye_dist.core.resources import config_argument  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--config",
        type=config_argument,
        required=True,
        help="a packaged config (distill, teacher, ...) or a YAML file (train.stage inside)",
    )
    add_slurm_options(p)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if not args.config.is_file():
            raise ConfigError(f"--config {args.config}: no such file")
        cfg = load_config(args.config, args.overrides)
        opts = slurm_options(args, job_name=f"multieye-{cfg.train.stage}")
        check_run(cfg, opts.nodes * opts.tasks_per_node)
    except (ValueError, FileNotFoundError) as exc:  # ConfigError, RunLocked are ValueErrors
        print(f"submit: error: {exc}", file=sys.stderr)
        return 2
    run_dir = Path(cfg.train.out_dir).resolve()
    task = TrainTask(str(args.config.resolve()), args.overrides, args.max_requeues)
    try:
        with undone_if_refused(run_dir):
            executor = make_executor(run_dir / "slurm", "local" if args.local else "slurm", opts)
            job = submit(executor, task)
    except SubmissionError as exc:
        print(f"submit: the scheduler refused the job: {exc}", file=sys.stderr)
        return 2
    save_resolved(cfg, run_dir)  # the trainer's rank 0 writes the same file when it starts
    print(
        f"submitted job {job.job_id}: {opts.nodes} node(s) x {opts.tasks_per_node} task(s), "
        f"stage {cfg.train.stage}"
    )
    print(f"run directory: {run_dir}")
    print(f"logs: {job.paths.stdout}")
    print(f"      {job.paths.stderr}  (task 0; every task logs in {job.paths.folder})")
    if not args.wait:
        return 0
    try:
        result = job.results()[0]  # rank 0's summary
    except Exception as exc:  # submitit re-raises the task's error with its traceback
        print(f"submit: job {job.job_id} failed: {exc}", file=sys.stderr)
        return 1
    print(f"job {job.job_id} finished: {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
