"""Where this process sits in the job, from the environment, and the few collectives we need.

The same entry point runs under torchrun, the deepspeed launcher and Slurm: they all export
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (our Slurm launcher
does too). With none of them set, the process is a world of one on loopback. Plain torch only:
DeepSpeed's own initialisation is in :mod:`multieye_dist.train.engine`.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _int(environ: Mapping[str, str], key: str) -> int:
    try:
        return int(environ[key])
    except ValueError:
        raise ValueError(f"environment variable {key}={environ[key]!r} is not an integer") from None


def from_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launcher's variables; a partial set is an error naming what is missing."""
    environ = os.environ if environ is None else environ
    present = [k for k in ENV_KEYS if k in environ]
    if not present:
        return DistEnv(0, 1, 0, "127.0.0.1", _free_port())
    missing = [k for k in ENV_KEYS if k not in environ and k != "LOCAL_RANK"]
    if missing:
        raise ValueError(
            f"distributed launch: {', '.join(present)} set but {', '.join(missing)} missing; "
            "launch with torchrun, deepspeed or launch/submit.py (or set all of "
            f"{', '.join(ENV_KEYS)})"
        )
    env = DistEnv(
        rank=_int(environ, "RANK"),
        world=_int(environ, "WORLD_SIZE"),
        local_rank=_int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0,
        master_addr=environ["MASTER_ADDR"],
        master_port=_int(environ, "MASTER_PORT"),
    )
    if not 0 <= env.rank < env.world:
        raise ValueError(f"RANK={env.rank} must be in [0, WORLD_SIZE={env.world})")
    return env


def export_env(env: DistEnv) -> None:
    """Make os.environ agree with `env` (DeepSpeed and env:// initialisation read it)."""
    os.environ.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world),
        LOCAL_RANK=str(env.local_rank),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
    )


def device_for(env: DistEnv) -> torch.device:
    """The GPU this rank owns: LOCAL_RANK among the visible ones, or the only visible one when
    the launcher binds one GPU per task (srun --gpu-bind); else the CPU."""
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        if n == 1 and env.local_rank > 0:  # the launcher bound one GPU to this task
            torch.cuda.set_device(0)
            return torch.device("cuda", 0)
        if env.local_rank >= n:
            raise RuntimeError(
                f"LOCAL_RANK={env.local_rank} but only {n} GPU(s) visible "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
            )
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def barrier() -> None:
    if initialized() and dist.get_world_size() > 1:
        dist.barrier()


def step_flags(loss: torch.Tensor, stop: bool) -> tuple[bool, bool]:
    """(`loss` is finite on every rank, `stop` is true on some rank): the training step's two
    decisions in one all-reduce on the loss's device and one host sync.

    Both travel as "all ranks agree" minima: [finite, not stop]. The stop flag is made on the
    device with a fill (``new_full``), not copied from the host, so that nothing before the
    final read waits for the GPU.
    """
    flags = torch.stack(
        [
            torch.isfinite(loss).all().to(torch.float32),
            loss.new_full((), 0.0 if stop else 1.0, dtype=torch.float32),
        ]
    )
    if initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    finite, go_on = flags.tolist()
    return finite > 0, go_on == 0


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank (our own small Python values, never file content)."""
    if not (initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def average_batchnorm_stats(module: nn.Module) -> int:
    """Average BatchNorm running statistics over ranks; returns how many buffers were averaged.

    Each rank's BN sees only its own batches, so without this the ranks' models drift apart in
    their buffers (gradients are all-reduced, buffers are not). We average before every
    evaluation and save instead of running SyncBatchNorm: one all-reduce per evaluation instead
    of two per BN layer per step, and the running statistics are what evaluation uses.
    """
    if not (initialized() and dist.get_world_size() > 1):
        return 0
    bufs = [
        b
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase)
        for b in (m.running_mean, m.running_var)
        if b is not None
    ]
    if not bufs:
        return 0
    flat = torch.cat([b.detach().float().reshape(-1) for b in bufs])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for b in bufs:
        n = b.numel()
        b.copy_(flat[offset : offset + n].view_as(b).to(b.dtype))
        offset += n
    return len(bufs)
