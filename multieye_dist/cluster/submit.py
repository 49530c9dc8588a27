"""The one module that owns submitit: executors for Slurm (or local subprocesses), and the
training task that runs on every Slurm task of a job, with preemption and requeue.

Rendezvous: submitit starts one process per task (``srun``); each reads its place from
:class:`submitit.JobEnvironment` and exports what :mod:`multieye_dist.core.distributed` reads:
``RANK`` = global rank, ``WORLD_SIZE`` = tasks in the job, ``LOCAL_RANK`` = rank on the node,
``MASTER_ADDR`` = the address of the node whose ``srun`` launched the tasks
(``SLURM_LAUNCH_NODE_IPADDR``: the batch host, the job's first node, where rank 0 runs; an
address, so that no name needs to resolve), ``MASTER_PORT`` = a port derived from the job id (the
same for every task, different for concurrent jobs), and ``GLOO_SOCKET_IFNAME`` = this node's
interface towards that address, unless set already: gloo otherwise binds to what the host name
resolves to, which may be loopback, unreachable from the other nodes.

Preemption and time limits: Slurm sends ``SIGUSR2`` ``signal_delay_s`` seconds before the end
(``--signal``). Saving from inside a signal handler is unsafe (a rank may be in the middle of a
collective), so the handler only sets a flag; the training loop sees it at the next optimizer
step on every rank, all ranks save a checkpoint at that step, and rank 0 then hands over to
submitit's own checkpoint-and-requeue (``TrainTask.checkpoint`` returns the same task, which
resumes from ``latest``). ``SLURM_RESTART_COUNT`` bounds the requeues (``max_requeues``).
The flag is :class:`multieye_dist.train.signals.StopFlag`, which also serves ``multieye-dist
train`` for SIGTERM and SIGINT.
"""

from __future__ import annotations

import logging
import os
import signal
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multieye_dist.train.signals import StopFlag

logger = logging.getLogger(__name__)


class SubmissionError(RuntimeError):
    """sbatch (or the local executor) refused the job; the message is the scheduler's own."""


@dataclass(frozen=True)
class SlurmOptions:
    """Resources of one job (or of each array task); None leaves the cluster's default."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int = 60
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float | None = None
    constraint: str | None = None
    array_parallelism: int = 64
    job_name: str = "multieye-dist"
    signal_delay_s: int = 120  # SIGUSR2 this long before the time limit


def make_executor(folder: Path, cluster: str | None, opts: SlurmOptions):
    """`cluster`: "slurm", "local" (subprocesses on this machine) or None (slurm if a
    controller answers ``sinfo``, else local)."""
    import submitit

    ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster or detect_cluster())
    params: dict = {
        "timeout_min": opts.time_min,
        "cpus_per_task": opts.cpus_per_task,
        "name": opts.job_name,
        "tasks_per_node": opts.tasks_per_node,
    }
    if opts.mem_gb is not None:
        params["mem_gb"] = opts.mem_gb
    if ex.cluster == "slurm":
        params.update(
            nodes=opts.nodes,
            slurm_array_parallelism=opts.array_parallelism,
            slurm_signal_delay_s=opts.signal_delay_s,
        )
        if opts.gpus_per_node:
            params["gpus_per_node"] = opts.gpus_per_node
        for key in ("partition", "account", "qos", "constraint"):
            value = getattr(opts, key)
            if value:
                params[f"slurm_{key}"] = value
    elif opts.gpus_per_node:
        params["gpus_per_node"] = opts.gpus_per_node
    ex.update_parameters(**params)
    return ex


def detect_cluster() -> str:
    """ "slurm" when a Slurm controller answers, else "local". (submitit's own test, srun on
    PATH, picks Slurm on any machine with the client package installed, even without a
    cluster.)"""
    import shutil
    import subprocess

    if shutil.which("sbatch") is None:
        return "local"
    try:
        ok = subprocess.run(["sinfo", "-h"], capture_output=True, timeout=15).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return "slurm" if ok else "local"


def add_dependency(executor, job_ids: list[str]) -> None:
    """Make the next submission wait for `job_ids` to succeed (Slurm only)."""
    if executor.cluster == "slurm":
        executor.update_parameters(
            slurm_additional_parameters={"dependency": "afterok:" + ":".join(job_ids)}
        )


def submit(executor, fn, *args: Any):
    """``executor.submit`` with the scheduler's refusal turned into a :class:`SubmissionError`
    carrying sbatch's own message (unknown partition, impossible resources, ...)."""
    try:
        return executor.submit(fn, *args)
    except Exception as exc:  # submitit raises FailedJobError/CalledProcessError/OSError
        raise SubmissionError(_scheduler_message(exc)) from exc


def submit_array(executor, tasks: list):
    """All of `tasks` as ONE array job (one sbatch): either every task is queued or none."""
    try:
        with executor.batch():
            jobs = [executor.submit(task) for task in tasks]
    except Exception as exc:
        raise SubmissionError(_scheduler_message(exc)) from exc
    return jobs


def _scheduler_message(exc: BaseException) -> str:
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if "error" in ln.lower()]
    return "; ".join(lines) if lines else text


# ----------------------------------------------------------------------------- on the nodes


def rendezvous(job_env) -> dict[str, str]:
    """The launcher variables for this task, from submitit's JobEnvironment."""
    job_id = os.environ.get("SLURM_JOB_ID") or str(job_env.job_id)
    digits = "".join(ch for ch in job_id if ch.isdigit())
    seed = int(digits) if digits else zlib.crc32(job_id.encode())
    master = os.environ.get("SLURM_LAUNCH_NODE_IPADDR") or (
        job_env.hostnames[0] if job_env.hostnames else "127.0.0.1"
    )
    env = {
        "RANK": str(job_env.global_rank),
        "WORLD_SIZE": str(job_env.num_tasks),
        "LOCAL_RANK": str(job_env.local_rank),
        "MASTER_ADDR": master,
        "MASTER_PORT": str(20000 + seed % 20000),
    }
    ifname = None if "GLOO_SOCKET_IFNAME" in os.environ else interface_towards(master)
    if ifname:
        env["GLOO_SOCKET_IFNAME"] = ifname
    return env


def interface_towards(addr: str) -> str | None:
    """The name of this host's network interface that the route to `addr` leaves through (its
    own address's interface when `addr` is local), or None if that cannot be told."""
    import socket

    try:
        import psutil  # a DeepSpeed dependency: present wherever training runs
    except ImportError:
        return None
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((addr, 9))  # UDP: picks the route and source address, sends nothing
            local = s.getsockname()[0]
    except OSError:
        return None
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == local for a in addrs):
            return name
    return None


class TrainTask:
    """What each Slurm task runs: `multieye-dist train` with the given config and overrides.

    Picklable (submitit ships it to the nodes); ``checkpoint`` makes it requeueable.
    ``on_dev_f1``: :func:`multieye_dist.train.loop.run`'s pruning hook (an offline Bayesian sweep's
    :class:`multieye_dist.cluster.search.TrialHook`), itself picklable.
    """

    def __init__(
        self,
        config: str | None,
        overrides: list[str],
        max_requeues: int = 3,
        on_dev_f1: Callable[[int, float], bool] | None = None,
    ):
        self.config = config
        self.overrides = list(overrides)
        self.max_requeues = max_requeues
        self.on_dev_f1 = on_dev_f1

    def __call__(self) -> dict[str, Any]:
        import submitit

        from multieye_dist.config import load_config
        from multieye_dist.train.loop import run

        job_env = submitit.JobEnvironment()
        os.environ.update(rendezvous(job_env))
        _quiet_logging(job_env.global_rank)
        flag = StopFlag()
        submitit_handler = signal.getsignal(signal.SIGUSR2)
        signal.signal(signal.SIGUSR2, flag.set)
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        logger.info(
            "task %d/%d on %s, restart %d",
            job_env.global_rank,
            job_env.num_tasks,
            job_env.hostname,
            restarts,
        )
        cfg = load_config(self.config, self.overrides)
        summary = run(cfg, stop_requested=flag, on_dev_f1=self.on_dev_f1)
        if summary.get("preempted"):
            self._requeue(job_env.global_rank, restarts, submitit_handler)
        return summary

    def _requeue(self, rank: int, restarts: int, submitit_handler) -> None:
        if restarts >= self.max_requeues:
            raise RuntimeError(
                f"stopped by Slurm's warning signal after {restarts} requeue(s) "
                f"(--max-requeues {self.max_requeues}): not requeued again; the checkpoint is "
                "saved, submit the same command again to continue"
            )
        if rank == 0 and callable(submitit_handler):
            # submitit: dump self.checkpoint()'s submission, `scontrol requeue`, exit.
            submitit_handler(signal.SIGUSR2, None)

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit

        # The training state is already saved (every rank, at the same step): the same task
        # resumes from `latest` (train.resume=auto).
        return submitit.helpers.DelayedSubmission(
            TrainTask(self.config, self.overrides, self.max_requeues, self.on_dev_f1)
        )


def job_place() -> tuple[str, int]:
    """(job id, global rank) of the Slurm task this runs in (submitit's JobEnvironment)."""
    import submitit

    env = submitit.JobEnvironment()
    return str(env.job_id), env.global_rank


def resubmission(task: Callable[[], Any]) -> Any:
    """What a task's ``checkpoint`` returns to be requeued as `task` (submitit's
    DelayedSubmission)."""
    import submitit

    return submitit.helpers.DelayedSubmission(task)


def _quiet_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(
        level=level, format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s"
    )
    logging.getLogger().setLevel(level)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
