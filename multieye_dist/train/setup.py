"""Building a training job (:func:`setup`): the data's classes, the checks, the stream and its
loader, the process group, the run directory's lock and config.yaml, the student's DeepSpeed
engine, the frozen teacher, the resumed state and the tracker, gathered in a :class:`Job`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from multieye_dist.config import Config, ConfigError, save_resolved, to_dict
from multieye_dist.core.distributed import DistEnv, barrier, broadcast_object, device_for, from_env
from multieye_dist.core.resources import user_path
from multieye_dist.core.runlock import NoLock, RunLock, RunLocked, acquire
from multieye_dist.data.prepare import BatchPreparer
from multieye_dist.data.remote import resolve_shards
from multieye_dist.data.stream import (
    PairedTrainStream,
    ShardSet,
    StreamConfig,
    make_loader,
    resolve_augment_on,
)
from multieye_dist.model.checkpoint import load_inference
from multieye_dist.model.concept_model import FrozenTeacher, ModelConfig, build_model
from multieye_dist.track.records import CHECKPOINTS_DIR
from multieye_dist.track.tracking import Tracker
from multieye_dist.train.engine import build_engine, init_distributed, remove_stale_temps
from multieye_dist.train.objectives import Objective, build_objective, objective_class
from multieye_dist.train.preflight import Checked, preflight
from multieye_dist.train.resume import TrainState, resume, universal_resume

logger = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Job:
    """Everything the loop needs, built once by :func:`setup`."""

    cfg: Config
    env: DistEnv
    device: torch.device
    run_dir: Path
    engine: Any
    teacher: FrozenTeacher | None
    stream: PairedTrainStream
    loader: Any
    tracker: Tracker
    sentences: list[str]
    objective: Objective  # what the stage reads, trains and evaluates, and its loss
    prepare: BatchPreparer  # uint8 loader batches -> model input, on the device
    usable_batches: int  # per epoch and rank: a multiple of grad_accum
    lock: RunLock = field(default_factory=NoLock)  # the run directory's (rank 0 holds it)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.cfg.train.precision == "autocast-bf16" else None


def setup(cfg: Config) -> tuple[Job, TrainState]:
    """Checks, data, process group, the run directory's lock, then (the first write into the
    run directory) its config.yaml, models, engine, resume, tracker, in that order."""
    env = from_env()
    # Whatever can refuse the command fails here, on every rank alike, before any collective
    # and before anything is written.
    checked = preflight(cfg, env.world)
    device = device_for(env)
    objective = build_objective(cfg, device)
    # Reads the manifests: a missing split fails here.
    stream = build_stream(cfg, env, objective, checked.streams)
    steps_per_epoch = len(stream) // cfg.optim.grad_accum
    if steps_per_epoch < 1:
        raise ValueError(
            f"data.samples_per_epoch={cfg.data.samples_per_epoch} gives {len(stream)} batch(es) "
            f"per rank, fewer than optim.grad_accum={cfg.optim.grad_accum}: no optimizer step"
        )
    if env.is_main:
        _log_start(cfg, env, device, objective, stream, steps_per_epoch)
    init_distributed(env, device)
    # Every rank's preflight (its probe of the run directory's lock included) is over before
    # rank 0 takes the lock: joining a new process group waits for all ranks, but a group made
    # before run() (a caller's own) would not, and a slow rank would see its own job's lock.
    barrier()
    run_dir = Path(cfg.train.out_dir)
    lock = _lock_run_dir(env, run_dir)
    try:
        if env.is_main:
            remove_stale_temps(run_dir / CHECKPOINTS_DIR)  # what a killed save left
            save_resolved(cfg, run_dir)
        return _build(cfg, env, device, objective, stream, checked, lock, steps_per_epoch)
    except BaseException:
        lock.release()
        raise


def _build(
    cfg: Config,
    env: DistEnv,
    device: torch.device,
    objective: Objective,
    stream: PairedTrainStream,
    checked: Checked,
    lock: RunLock,
    steps_per_epoch: int,
) -> tuple[Job, TrainState]:
    """Models, engine, resume and tracker of :func:`setup`, once the run directory is ours."""
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    # Student weights stay in the default layout: DeepSpeed broadcasts them as byte views and
    # ZeRO keeps them as views of one flat buffer. perf.channels_last makes the inputs NHWC,
    # which is what makes convolutions pick NHWC kernels.
    model = build_model(cfg.model, checked.bank).to(device)
    objective.freeze_unreached(model)
    teacher = build_teacher(cfg, checked.bank, device) if objective.needs_teacher else None
    universal = universal_resume(cfg, checked.resharded)
    engine = build_engine(
        model,
        optim=cfg.optim,
        ds=cfg.deepspeed,
        precision=cfg.train.precision,
        micro_batch=cfg.data.batch_size,
        world=env.world,
        steps_per_epoch=steps_per_epoch,
        epochs=cfg.train.epochs,
        universal=universal,
    )
    if cfg.perf.compile:
        engine.compile()  # DeepSpeed's wrapper around torch.compile of the student
    state = resume(engine, checked.checkpoint, env.world, universal)
    state.identity = checked.identity
    loader = make_loader(stream, cfg.data.num_workers)
    # The tracker last: from here on run() owns it and finishes it, failed or not.
    run_dir = Path(cfg.train.out_dir)
    tracker = Tracker(
        cfg.tracking,
        run_dir,
        config=to_dict(cfg),
        rank=env.rank,
        job_type=cfg.train.stage,
        run_id=state.run_id,
    )
    state.run_id = tracker.run_id
    job = Job(
        cfg,
        env,
        device,
        run_dir,
        engine,
        teacher,
        stream,
        loader,
        tracker,
        checked.sentences,
        objective,
        BatchPreparer(cfg.data.image_size),
        usable_batches=steps_per_epoch * cfg.optim.grad_accum,
        lock=lock,
    )
    if state.step:
        logger.info("resumed at step %d (epoch %d)", state.step, state.epoch + 1)
    return job, state


def _log_start(
    cfg: Config,
    env: DistEnv,
    device: torch.device,
    objective: Objective,
    stream: PairedTrainStream,
    steps_per_epoch: int,
) -> None:
    """The first lines of a training (rank 0): what it reads, where and how it runs."""
    sets = [s for s in (stream.fundus, stream.oct) if s is not None]
    read = "; ".join(
        f"{s.modality} {s.split} {s.listed} samples, {len(s.urls)} shards" for s in sets
    )
    logger.info("shards %s: %s", resolve_shards(cfg.data.shards), read)
    logger.info(
        "%s: %d rank(s) on %s, precision %s, ZeRO %d, %d steps/epoch x %d epochs, "
        "augmentation on the %s",
        objective.describe(),
        env.world,
        device,
        cfg.train.precision,
        cfg.deepspeed.zero_stage,
        steps_per_epoch,
        cfg.train.epochs,
        resolve_augment_on(cfg.data.augment_on),
    )


def _lock_run_dir(env: DistEnv, run_dir: Path) -> RunLock:
    """Rank 0 takes the run directory's lock (the ranks of one job must not conflict); every
    rank learns the outcome through one broadcast, so that a refused job stops on all its ranks
    at once instead of leaving the others waiting in a collective."""
    lock: RunLock = NoLock()
    error, problem = None, None
    if env.is_main:
        try:
            lock = acquire(run_dir)
        except Exception as exc:  # held, or an OS error (rank 0 raises it as it is)
            error, problem = exc, str(exc)
    try:
        problem = broadcast_object(problem)
    except BaseException:
        lock.release()
        raise
    if error is not None:
        raise error
    if problem:
        raise RunLocked(f"rank 0: {problem}")
    return lock


def data_classes(cfg: Config) -> Config:
    """`cfg` with ``model.num_classes`` from the train manifest of the stage's modality (its
    ``class_names``; MultiEYE's 9 without). A config that leaves it at the default takes the
    data's count; another count is an error naming both. The partner modality's manifest
    must name the same classes (the stream checks that, naming both manifests)."""
    if not cfg.data.shards:
        return cfg  # preflight names the missing setting
    cls = objective_class(cfg.train.stage, cfg.loss)
    shards = ShardSet.from_manifest(resolve_shards(cfg.data.shards), cls.modality, "train")
    n, default = shards.num_classes, ModelConfig.num_classes
    if cfg.model.num_classes == n:
        return cfg
    if cfg.model.num_classes != default:
        raise ConfigError(
            f"model.num_classes={cfg.model.num_classes} but {shards.manifest} lists {n} "
            f"classes ({', '.join(shards.class_names)}); set model.num_classes={n} or leave "
            "it unset"
        )
    logger.info("model.num_classes=%d from %s (%s)", n, shards.manifest, shards.class_names)
    return replace(cfg, model=replace(cfg.model, num_classes=n))


def build_stream(
    cfg: Config, env: DistEnv, objective: Objective, streams: int = 0
) -> PairedTrainStream:
    """The objective's primary modality, with partners when it reads them (the fundus-only
    baseline reads fundus alone: decoding partners it would not use costs half the loader)."""
    shard_dir = resolve_shards(cfg.data.shards)  # a directory or a URL prefix
    primary = ShardSet.from_manifest(shard_dir, objective.modality, "train")
    partner = None
    if objective.partner is not None:
        partner = ShardSet.from_manifest(shard_dir, objective.partner, "train")
    scfg = StreamConfig.from_data(cfg.data, streams=streams)
    return PairedTrainStream(
        primary,
        partner,
        scfg,
        rank=env.rank,
        world=env.world,
        partner_classes=objective.partner_classes,
    )


def build_teacher(cfg: Config, bank: torch.Tensor, device: torch.device) -> FrozenTeacher:
    path = user_path(cfg.teacher.checkpoint)  # checked by preflight (check_teacher)
    model, meta = load_inference(path)
    logger.info(
        "teacher %s (%s, %d px)", path, meta["model_config"]["backbone"], meta["image_size"]
    )
    if model.cfg.level2_norm != cfg.model.level2_norm:
        # Both sides of the distillation in one level-2 space: the student's setting rules.
        logger.info("teacher: level2_norm=%s as the student's", cfg.model.level2_norm)
        model.cfg = replace(model.cfg, level2_norm=cfg.model.level2_norm)
    model = model.to(device)
    if cfg.perf.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.perf.compile:
        model.backbone = torch.compile(model.backbone)  # never saved: no key renaming issue
    return FrozenTeacher(
        model,
        dtype=_DTYPES[cfg.teacher.dtype],
        inference_mode=cfg.perf.teacher_inference_mode,
    )
