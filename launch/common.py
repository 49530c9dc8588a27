"""Command-line options shared by launch/submit.py and launch/sweep.py."""

from __future__ import annotations

import argparse
import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from multieye_dist.cluster.submit import SlurmOptions, SubmissionError
from multieye_dist.config import Config


def add_slurm_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Slurm resources (per job, or per array task)")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=0, help="one task (rank) per GPU")
    g.add_argument(
        "--tasks-per-node", type=int, default=None, help="default: --gpus-per-node, or 1 on CPU"
    )
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--constraint")
    g.add_argument("--time", type=int, default=60, help="minutes")
    g.add_argument("--mem", type=float, default=None, help="GB per node")
    g.add_argument("--cpus-per-task", type=int, default=1)
    g.add_argument(
        "--signal-delay",
        type=int,
        default=120,
        help="seconds before the time limit at which Slurm sends SIGUSR2",
    )
    g.add_argument(
        "--max-requeues",
        type=int,
        default=3,
        help="requeues after preemption or time limit before giving up",
    )
    g.add_argument(
        "--local",
        action="store_true",
        help="run through submitit's local executor instead of Slurm",
    )
    g.add_argument("--wait", action="store_true", help="wait for the job(s) and report")


def slurm_options(args: argparse.Namespace, job_name: str) -> SlurmOptions:
    for name in ("nodes", "time", "cpus_per_task"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    if args.gpus_per_node < 0 or args.max_requeues < 0:
        raise ValueError("--gpus-per-node and --max-requeues must be >= 0")
    parallel = getattr(args, "max_parallel", None)  # launch/sweep.py's arrays only
    if parallel is not None and parallel < 1:
        raise ValueError(
            f"--max-parallel={parallel}: must be >= 1 (how many array tasks may run at once)"
        )
    tasks = args.tasks_per_node or max(args.gpus_per_node, 1)
    if args.gpus_per_node and tasks != args.gpus_per_node:
        raise ValueError(
            f"--tasks-per-node={tasks} with --gpus-per-node={args.gpus_per_node}: one task per "
            "GPU, so every GPU has the rank that owns it"
        )
    extra = {} if parallel is None else {"array_parallelism": parallel}
    return SlurmOptions(
        **extra,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        constraint=args.constraint,
        time_min=args.time,
        nodes=args.nodes,
        tasks_per_node=tasks,
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem,
        job_name=job_name,
        signal_delay_s=args.signal_delay,
    )


def check_run(cfg: Config, world: int, *, in_run_dir: bool = True) -> None:
    """What the trainer checks before it writes anything
    (:func:`multieye_dist.train.preflight.preflight`: backbone, teacher export, concept bank,
    batch geometry for `world` ranks, a resume's compatibility;
    :func:`~multieye_dist.train.setup.data_classes`: the classes), and that no live training holds
    the run directory: before anything is queued, so that a job is not refused only once it has
    waited for its allocation. ``in_run_dir=False``: a config whose run directory is not known yet
    (an online sweep's base), checked without the resume and the lock."""
    from multieye_dist.train.preflight import preflight
    from multieye_dist.train.setup import data_classes

    # model.num_classes against the data's manifest too, as the trainer does first.
    preflight(data_classes(cfg), world, in_run_dir=in_run_dir)


@contextlib.contextmanager
def undone_if_refused(root: Path) -> Iterator[None]:
    """Around a submission into ``root``: if the scheduler refuses it, remove what the attempt
    created there (submitit writes its batch script and pickles before it calls sbatch, and
    makes the folders), so that a refused command leaves ``root`` as it was."""
    existed = root.exists()
    before = set(root.rglob("*")) if existed else set()
    try:
        yield
    except SubmissionError:
        if not existed:
            shutil.rmtree(root, ignore_errors=True)
        else:
            new = sorted(set(root.rglob("*")) - before, key=lambda p: len(p.parts), reverse=True)
            for path in new:  # deepest first: files, then the folders that held them
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        raise
