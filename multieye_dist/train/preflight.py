"""The checks that can refuse a training, run before anything is written: :func:`preflight`
(on each rank before the process group, and in the Slurm launchers before anything is queued),
the data's logical streams it settles (:func:`resolve_streams`) and the teacher export's check
(:func:`check_teacher`). What they read, the setup reuses (:class:`Checked`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from multieye_dist.config import Config, ConfigError, check_world
from multieye_dist.core.resources import user_path
from multieye_dist.core.runlock import check_free
from multieye_dist.model.checkpoint import FORMAT
from multieye_dist.model.concepts import load_bank
from multieye_dist.track.records import CHECKPOINTS_DIR
from multieye_dist.train.engine import find_checkpoint
from multieye_dist.train.objectives import objective_class
from multieye_dist.train.resume import check_resume, checkpoint_state, run_identity


@dataclass(frozen=True)
class Checked:
    """What :func:`preflight` read and the setup reuses."""

    bank: torch.Tensor
    sentences: list[str]
    checkpoint: Path | None  # the one to resume from
    identity: dict[str, Any]
    streams: int  # the data's logical streams (data.streams resolved; kept by a resume)
    resharded: bool = False  # resuming on another number of ranks than the checkpoint's


def preflight(cfg: Config, world: int, *, in_run_dir: bool = True) -> Checked:
    """Every check that can refuse a training, run before anything is written (the trainer on
    each rank, before the process group; the Slurm launchers before anything is queued): the
    batch geometry against `world` ranks; in the run directory, that no live training holds
    it and the checkpoint to resume from; the objective's needs, the concept bank, the init
    weights, the teacher export; and a resume's compatibility with the checkpoint's run.
    ``in_run_dir=False`` (a config whose run directory is not known yet: an online sweep's
    base) leaves out the lock and the resume."""
    if not cfg.data.shards:
        raise ConfigError(
            "data.shards is not set: name the converted shards (a directory of `shards "
            "convert` output, or a URL prefix), e.g. data.shards=data/shards"
        )
    check_world(cfg, world)
    checkpoint = None
    if in_run_dir:
        # A probe that creates nothing, on every rank: refused here, the job stops before any
        # collective (rank 0 takes the lock itself once the process group exists).
        check_free(cfg.train.out_dir)
        checkpoint = find_checkpoint(cfg.train.resume, Path(cfg.train.out_dir) / CHECKPOINTS_DIR)
    cls = objective_class(cfg.train.stage, cfg.loss)
    needs_teacher = cls.needs_teacher and cfg.teacher.kind == "model"  # not an oracle's
    if needs_teacher and cfg.teacher.checkpoint is None:
        raise ValueError(
            "teacher.checkpoint is not set: distillation needs the teacher run's inference "
            "export (e.g. teacher.checkpoint=runs/teacher/best.safetensors), or use "
            "loss.name=fundus-only"
        )
    bank, sentences, _ = load_bank(user_path(cfg.concepts.bank))
    if cfg.model.weights is not None and not Path(cfg.model.weights).is_file():
        raise FileNotFoundError(f"model.weights={cfg.model.weights}: no such file")
    if needs_teacher:
        check_teacher(cfg, bank)
    saved = checkpoint_state(checkpoint) if checkpoint is not None else {}
    streams = resolve_streams(cfg, world, saved)
    identity = run_identity(cfg, world, bank, streams)
    if checkpoint is not None:
        check_resume(checkpoint, identity, saved, world)
    saved_world = saved.get("world") or world
    return Checked(bank, sentences, checkpoint, identity, streams, saved_world != world)


def resolve_streams(cfg: Config, world: int, saved: dict[str, Any]) -> int:
    """data.streams; 0 (auto): what the resumed checkpoint's run used (`saved`: its trainer
    state), else ranks x loader workers now. A run keeps it for good: its epochs are the same
    micro-batches on any number of ranks (multieye_dist.data.stream)."""
    if cfg.data.streams:
        return cfg.data.streams
    kept = (saved.get("identity") or {}).get("data.streams")
    if isinstance(kept, int) and kept > 0:
        return kept
    return world * max(cfg.data.num_workers, 1)


def check_teacher(cfg: Config, bank: torch.Tensor) -> None:
    """teacher.checkpoint is an inference export of an OCT teacher over `bank` (its header and
    concept tensor only: the weights are read once, by
    :func:`multieye_dist.train.setup.build_teacher`)."""
    from safetensors import safe_open

    path = user_path(cfg.teacher.checkpoint)
    where = f"teacher.checkpoint={cfg.teacher.checkpoint}"
    if not path.is_file():
        raise FileNotFoundError(f"{where}: no such file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            concepts = fh.get_tensor("concepts") if "concepts" in fh.keys() else None
        extra = json.loads(meta.get("extra") or "{}")
    except Exception as exc:  # safetensors' own error types for a damaged header
        raise ValueError(f"{where}: not a readable inference export ({exc})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{where}: format {meta.get('format')!r}, not an inference export ({FORMAT!r}); "
            "use the teacher run's best.safetensors"
        )
    modality = extra.get("modality") if isinstance(extra, dict) else None
    stage = ((extra.get("config") or {}).get("train") or {}).get("stage") if modality else None
    if modality != "oct":
        raise ValueError(
            f"{where}: not an OCT teacher (its export's modality is {modality!r}); use the "
            "teacher stage's export (e.g. runs/teacher/best.safetensors)"
        )
    if stage == "align":
        raise ValueError(
            f"{where}: a concept-alignment export (an init, not a teacher): train the teacher "
            "from it (train teacher model.weights=...) and distil from that run's export"
        )
    if concepts is None or concepts.shape != bank.shape or not torch.allclose(concepts, bank):
        shape = None if concepts is None else tuple(concepts.shape)
        raise ValueError(
            f"{where}: its concept bank {shape} differs from concepts.bank={cfg.concepts.bank} "
            f"{tuple(bank.shape)}; teacher and student must share one concept space"
        )
