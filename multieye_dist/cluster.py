"""The one module that owns submitit: executors for Slurm (or local subprocesses)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlurmOptions:
    """Resources of one Slurm task; None leaves the cluster's default."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int = 60
    cpus_per_task: int = 1
    mem_gb: float | None = None
    constraint: str | None = None
    array_parallelism: int = 64
    job_name: str = "multieye-dist"


def make_executor(folder: Path, cluster: str | None, opts: SlurmOptions):
    """`cluster`: "slurm", "local" (subprocesses on this machine) or None (slurm if sbatch is
    on PATH, else local)."""
    import submitit

    ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params: dict = {
        "timeout_min": opts.time_min,
        "cpus_per_task": opts.cpus_per_task,
        "name": opts.job_name,
    }
    if opts.mem_gb is not None:
        params["mem_gb"] = opts.mem_gb
    if ex.cluster == "slurm":
        params["slurm_array_parallelism"] = opts.array_parallelism
        for key in ("partition", "account", "qos", "constraint"):
            value = getattr(opts, key)
            if value:
                params[f"slurm_{key}"] = value
    ex.update_parameters(**params)
    return ex


def add_dependency(executor, job_ids: list[str]) -> None:
    """Make the next submission wait for `job_ids` to succeed (Slurm only)."""
    if executor.cluster == "slurm":
        executor.update_parameters(
            slurm_additional_parameters={"dependency": "afterok:" + ":".join(job_ids)}
        )
