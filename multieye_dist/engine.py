"""The one module that owns DeepSpeed: process group, engine, and resumable checkpoints.

Precision (``train.precision``):

* ``autocast-bf16`` (default): DeepSpeed's ``torch_autocast`` mode. Weights, BatchNorm and the
  optimizer stay fp32; convolutions and matmuls run in bf16 under ``torch.autocast``. Exported
  weights are the exact fp32 ones. Chosen by measurement: see BENCHMARKS.md ("Precision").
* ``bf16``: DeepSpeed's bf16 mode. The module's weights are bf16 with fp32 master copies in the
  optimizer; inputs are cast to bf16.
* ``fp32``: no mixed precision.

Checkpoints: ``<out_dir>/checkpoints/<tag>/`` holds DeepSpeed's files and our
``trainer_state.json``; ``<out_dir>/checkpoints/latest`` names the newest *complete* one. Every
state file is written through :mod:`multieye_dist.atomic` (DeepSpeed's plain copies of its
``zero_to_fp32.py`` recovery scripts aside), ``latest`` is replaced only after every rank has
finished writing, and loading uses ``torch.load(weights_only=True)`` with exactly the DeepSpeed
classes its optimizer state holds allow-listed (no arbitrary unpickling).
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from multieye_dist.atomic import open_atomic, write_text
from multieye_dist.config import DeepSpeedConfig, OptimConfig, merge_dicts
from multieye_dist.distributed import DistEnv, backend_for, barrier, export
from multieye_dist.model import param_groups
from multieye_dist.schedule import lr_at

logger = logging.getLogger(__name__)

LATEST = "latest"
STATE_FILE = "trainer_state.json"


def init_distributed(env: DistEnv, device: torch.device, timeout_s: int = 1800) -> None:
    """Join the process group (gloo on CPU, NCCL on GPU) through DeepSpeed, from `env`."""
    import deepspeed

    export(env)
    deepspeed.init_distributed(
        dist_backend=backend_for(device),
        auto_mpi_discovery=False,
        timeout=timedelta(seconds=timeout_s),
        rank=env.rank,
        world_size=env.world,
    )


def ds_config(
    optim: OptimConfig, ds: DeepSpeedConfig, precision: str, micro_batch: int, world: int
) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": optim.grad_accum,
        "train_batch_size": micro_batch * optim.grad_accum * world,
        "zero_optimization": {"stage": ds.zero_stage},
        # Our optimizer is torch's AdamW (fused on CUDA): DeepSpeed's FusedAdam would need a
        # CUDA extension build at run time.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # our own logging
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif precision == "autocast-bf16":
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return merge_dicts(cfg, ds.extra)


def build_engine(
    model: torch.nn.Module,
    *,
    optim: OptimConfig,
    ds: DeepSpeedConfig,
    precision: str,
    micro_batch: int,
    world: int,
    steps_per_epoch: int,
    epochs: int,
):
    """DeepSpeed engine over `model` with AdamW and the warm-up + cosine schedule (per step)."""
    import deepspeed

    on_cuda = next(model.parameters()).device.type == "cuda"
    opt = torch.optim.AdamW(
        param_groups(model, optim.weight_decay, optim.lr, optim.lr_scale),
        lr=optim.lr,
        betas=optim.betas,
        fused=on_cuda,  # one kernel for all parameters on GPU
    )
    warmup, total = optim.warmup_epochs * steps_per_epoch, epochs * steps_per_epoch

    def factor(step: int) -> float:
        return (
            lr_at(step, lr=optim.lr, min_lr=optim.min_lr, warmup_steps=warmup, total_steps=total)
            / optim.lr
        )

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=opt,
        lr_scheduler=sched,
        config=ds_config(optim, ds, precision, micro_batch, world),
    )
    engine.checkpoint_engine = _safe_checkpoint_engine(engine.checkpoint_engine)
    if precision == "bf16":
        # DeepSpeed casts parameters, not buffers: BatchNorm's fp32 running statistics beside
        # bf16 weights make batch_norm fail on CPU ("expected scalar type BFloat16").
        for buf in engine.module.buffers():
            if buf.is_floating_point():
                buf.data = buf.data.to(torch.bfloat16)
    return engine


def current_lr(engine) -> float:
    return float(engine.get_lr()[0])


# ----------------------------------------------------------------------------- checkpoints


def _safe_checkpoint_engine(current):
    """DeepSpeed's torch checkpoint engine with atomic saves and weights-only loads."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    if type(current) is not TorchCheckpointEngine:  # a user-chosen engine (nebula, ...): keep
        logger.warning("checkpoint engine %s kept as configured", type(current).__name__)
        return current

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def save(self, state_dict, path: str) -> None:
            # DeepSpeed writes every model, optimizer and ZeRO state file through this method:
            # torch.save streams into the atomic writer's file, so no rank leaves half a file.
            with open_atomic(path, "wb") as fh:
                torch.save(
                    state_dict, fh, _use_new_zipfile_serialization=self.zipfile_serialization
                )

        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    safe = SafeTorchCheckpointEngine.__new__(SafeTorchCheckpointEngine)
    safe.__dict__.update(current.__dict__)
    return safe


def _deepspeed_safe_globals() -> list:
    """The non-tensor classes DeepSpeed's optimizer state files hold (checked on 0.19)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def save_checkpoint(engine, ckpt_dir: Path, tag: str, state: dict[str, Any], keep: int = 0) -> Path:
    """Collective: every rank writes its part; `latest` moves to `tag` once all are done. With
    ``keep`` > 0, rank 0 then deletes all but the newest ``keep`` complete checkpoints (by
    step; `latest` is always among them): a run's disk use stays bounded."""
    ckpt_dir = Path(ckpt_dir)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={}, save_latest=False)
    barrier()
    if engine.global_rank == 0:
        write_text(ckpt_dir / tag / STATE_FILE, json.dumps(state, indent=1))
        write_text(ckpt_dir / LATEST, tag)
        logger.info("checkpoint %s saved (step %s)", ckpt_dir / tag, state.get("step"))
        if keep > 0:
            prune_checkpoints(ckpt_dir, keep)
    barrier()
    return ckpt_dir / tag


def prune_checkpoints(ckpt_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints under ``ckpt_dir`` (ordered by
    their trainer state's step; the one `latest` names is never deleted). Returns the deleted."""
    import shutil

    latest = (ckpt_dir / LATEST).read_text(encoding="utf-8").strip()
    done = [d for d in ckpt_dir.iterdir() if (d / STATE_FILE).is_file()]
    steps = {d: json.loads((d / STATE_FILE).read_text(encoding="utf-8"))["step"] for d in done}
    old = sorted(done, key=steps.__getitem__, reverse=True)[keep:]
    old = [d for d in old if d.name != latest]
    for d in old:
        shutil.rmtree(d)
        logger.info("checkpoint %s deleted (train.keep_checkpoints=%d)", d, keep)
    return old


def find_checkpoint(resume: str, ckpt_dir: Path) -> Path | None:
    """`resume`: "auto" (the latest complete one under ckpt_dir, if any), "never", or a path to a
    checkpoint tag directory. A named checkpoint that is not there is an error."""
    if resume == "never":
        return None
    if resume == "auto":
        latest = Path(ckpt_dir) / LATEST
        if not latest.is_file():
            return None
        tag = latest.read_text(encoding="utf-8").strip()
        path = Path(ckpt_dir) / tag
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"{latest} names {tag!r} but {path / STATE_FILE} is missing")
        return path
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"train.resume={resume!r}: not a checkpoint directory (no {STATE_FILE}); use 'auto', "
            "'never' or a path like <out_dir>/checkpoints/<tag>"
        )
    return path


def load_checkpoint(engine, path: Path) -> dict[str, Any]:
    """Restore weights, optimizer, schedule and DeepSpeed's counters; return our trainer state."""
    path = Path(path)
    loaded, _ = engine.load_checkpoint(
        str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    logger.info("resumed from %s (step %s)", path, state.get("step"))
    return state
